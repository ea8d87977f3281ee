"""Adversarial reprogramming (Elsayed et al., ICLR 2019) and BAR (Tsai et al., ICML 2020) on the digits MLP."""

from __future__ import annotations

import pytest
import torch

from bastion.applications import (
    BAR,
    Program,
    WhiteBoxReprogramming,
    chance_accuracy,
    label_mapping,
    shapes_task,
)
from bastion.errors import InputError
from bastion.models import BlackBox


@pytest.fixture(scope="module")
def task():
    data = shapes_task(400, size=4, classes=4, seed=1)
    return data.split(300)


def test_shapes_task_is_balanced_and_in_domain() -> None:
    data = shapes_task(120, size=4, classes=4, seed=0)
    assert data.feature_shape == (1, 4, 4) and data.num_classes == 4
    assert data.class_counts().tolist() == [30, 30, 30, 30]
    assert float(data.x.min()) >= 0 and float(data.x.max()) <= 1
    assert torch.equal(data.x, shapes_task(120, size=4, classes=4, seed=0).x)  # seeded


def test_white_box_reprogramming_beats_chance_by_a_wide_margin(digits_mlp64, task) -> None:
    model, _, _ = digits_mlp64
    before = {k: v.clone() for k, v in model.state_dict().items()}
    train, test = task
    res = WhiteBoxReprogramming(epochs=10, progress=False).fit(model, train, test)
    chance = chance_accuracy(test)
    assert res.chance == pytest.approx(chance)
    assert res.accuracy >= chance + 0.4, res.table()
    assert res.accuracy >= 0.7
    # the model is frozen: reprogramming never changes a weight
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    # the program writes only the frame and stays in the domain; the new input sits unchanged at the centre
    assert res.model is not None
    with torch.no_grad():
        x_adv = res.model.program(test.x[:8])
    assert float(x_adv.min()) >= 0 and float(x_adv.max()) <= 1
    assert torch.equal(x_adv[:, :, 2:6, 2:6], test.x[:8])
    # the mapping is many-to-one and disjoint
    flat = [s for row in res.mapping for s in row]
    assert len(res.mapping) == 4 and len(flat) == len(set(flat)) == 8


def test_the_frequency_mapping_beats_the_block_mapping(digits_mlp64, task) -> None:
    model, _, _ = digits_mlp64
    train, test = task
    freq = WhiteBoxReprogramming(epochs=5, progress=False).fit(model, train, test)
    block = WhiteBoxReprogramming(epochs=5, progress=False).fit(model, train, test, mapping=None)
    assert block.mapping == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert freq.accuracy >= block.accuracy


def test_bar_beats_chance_and_counts_every_query(digits_mlp64, task) -> None:
    model, _, _ = digits_mlp64
    train, test = task
    oracle = BlackBox(model, returns="logits", budget=10**6)
    res = BAR(q=5, epochs=10, progress=False).fit(oracle, train, test)
    assert res.accuracy >= chance_accuracy(test) + 0.4, res.table()
    # the probe, the frequency mapping's pass over the training set, and (q + 1) queries per sample per step
    assert res.queries == 1 + len(train) + res.steps * 6 * 50
    assert oracle.queries == res.queries  # the accuracies are measured on the module behind the oracle
    assert res.stopped is None


def test_bar_stops_inside_its_query_budget(digits_mlp64, task) -> None:
    model, _, _ = digits_mlp64
    train, test = task
    oracle = BlackBox(model, returns="logits", budget=3000)
    res = BAR(q=5, epochs=10, progress=False).fit(oracle, train, test)
    assert res.stopped is not None and "budget" in res.stopped
    assert res.queries is not None and res.queries <= 3000
    assert res.steps == (3000 - 1 - len(train)) // 300


def test_bad_input_is_refused() -> None:
    with pytest.raises(InputError, match="do not fit the model input"):
        Program((1, 8, 8), (1, 10, 10))
    with pytest.raises(InputError, match="does not fit the model input"):
        Program((1, 8, 8), (1, 4, 4), init=torch.zeros(1, 6, 6))
    with pytest.raises(InputError, match="outside"):
        Program((1, 8, 8), (1, 4, 4), offset=(6, 0))
    with pytest.raises(InputError, match="channels"):
        Program((1, 8, 8), (3, 4, 4))
    with pytest.raises(InputError, match="source class 12"):
        label_mapping(10, 4, mapping=[[0, 1], [2, 3], [4, 5], [6, 12]])
    with pytest.raises(InputError, match="twice"):
        label_mapping(10, 2, mapping=[[0, 1], [1, 2]])
    with pytest.raises(InputError, match="shape"):
        label_mapping(10, 4, mapping=[[0, 1], [2, 3]])
    with pytest.raises(InputError, match="only 10 classes"):
        label_mapping(10, 4, per_class=3)
    with pytest.raises(InputError, match="lr"):
        WhiteBoxReprogramming(lr=-1)
    with pytest.raises(InputError, match="q must be"):
        BAR(q=0)


def test_fit_refuses_what_cannot_work(digits_mlp64, task) -> None:
    model, _, _ = digits_mlp64
    train, test = task
    with pytest.raises(InputError, match="BAR"):
        WhiteBoxReprogramming(epochs=1, progress=False).fit(BlackBox(model), train, test)
    with pytest.raises(InputError, match="labels only"):
        BAR(epochs=1, progress=False).fit(BlackBox(model, returns="labels", num_classes=10), train, test)
    big = shapes_task(40, size=10, classes=2)
    with pytest.raises(InputError, match="do not fit"):
        WhiteBoxReprogramming(epochs=1, progress=False).fit(model, big)
    with pytest.raises(InputError, match="source class"):
        WhiteBoxReprogramming(epochs=1, progress=False).fit(model, train, mapping=[[0, 1], [2, 3], [4, 5], [6, 10]])
