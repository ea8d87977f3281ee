"""The shard plan and the shard view, without Ray: every sample exactly once, batches of the single-process run."""

from __future__ import annotations

import sys

import pytest
import torch

from bastion.attacks import PGD
from bastion.data import load_digits
from bastion.errors import BastionError, InputError
from bastion.evaluate import evaluate
from bastion.models import build_model
from bastion.scale import IndexedShard, plan_shards, split_evenly
from bastion.threat import LpBall


@pytest.mark.parametrize(
    ("n", "batch", "shards", "done"),
    [
        (100, 16, None, set()),
        (100, 16, 3, set()),
        (100, 16, 50, set()),  # more shards than batches: one batch each
        (7, 16, 2, set()),  # fewer samples than one batch
        (100, 16, 2, set(range(0, 40))),  # batch 2 (32..47) partly done
        (100, 10, 4, {3, 55, 99}),
        (64, 16, 2, set(range(64))),  # nothing left
        (0, 8, None, set()),
    ],
)
def test_plan_partitions_what_is_left_into_whole_batches(
    n: int, batch: int, shards: int | None, done: set[int]
) -> None:
    plan = plan_shards(n, batch, done=done, shards=shards)
    todo = [i for s in plan for i in s.todo]
    assert sorted(todo) == sorted(set(range(n)) - done)  # nothing lost
    assert len(todo) == len(set(todo))  # nothing twice
    for s in plan:
        assert s.positions, "no empty shard"
        assert set(s.todo) <= set(s.positions)
        assert max(s.positions) < n, "no padding past the data"
        # whole batches of the single-process run [k*b, (k+1)*b) ∩ [0, n)
        for k in {i // batch for i in s.positions}:
            assert {i for i in s.positions if i // batch == k} == set(range(k * batch, min((k + 1) * batch, n)))
    batches_left = len({i // batch for i in set(range(n)) - done})
    assert len(plan) == (batches_left if shards is None else min(shards, batches_left))
    assert [s.number for s in plan] == list(range(len(plan)))


def test_plan_rejects_bad_sizes() -> None:
    with pytest.raises(InputError, match="batch_size"):
        plan_shards(10, 0)
    with pytest.raises(InputError, match="shards"):
        plan_shards(10, 2, shards=0)
    with pytest.raises(InputError, match="n must be"):
        plan_shards(-1, 2)


def test_split_evenly() -> None:
    parts = split_evenly(10, 3)
    assert [len(p) for p in parts] == [4, 3, 3]
    assert [i for p in parts for i in p] == list(range(10))
    assert split_evenly(2, 5) == [range(0, 1), range(1, 2)]
    assert split_evenly(0, 3) == []


def test_shard_view_keeps_indices_batches_and_results() -> None:
    """The single-process API on a shard of whole batches gives that part of the whole run, record for record."""
    data = load_digits().subset(slice(0, 48))
    torch.manual_seed(0)
    model = build_model("mlp", data.feature_shape, data.num_classes, hidden=(16,))
    threats = [LpBall("l2", 1.5)]  # l2 distances depend on the random start: a wrong seed shows
    attack = PGD(steps=3)
    whole = evaluate(model, data, threats, attack, batch_size=16, seed=3, progress=False, checks=False)
    view = IndexedShard.of(data, list(range(16, 48)))
    assert [idx.tolist() for idx, _, _ in view.batches(16)] == [list(range(16, 32)), list(range(32, 48))]
    assert view.fingerprint() == data.fingerprint()
    part = evaluate(model, view, threats, attack, batch_size=16, seed=3, progress=False, checks=False)
    got = {r.index: (r.status, r.adv_distance, r.attack) for r in part.records}
    want = {r.index: (r.status, r.adv_distance, r.attack) for r in whole.records if r.index >= 16}
    assert got == want
    # a shard cut inside a batch is seeded differently: the alignment is what makes the results equal
    cut = evaluate(model, data.subset(slice(24, 48)), threats, attack, batch_size=16, seed=3, progress=False)
    shifted = {r.index + 24: r.adv_distance for r in cut.records if r.status == "falsified"}
    assert any(shifted[i] != want[i][1] for i in shifted if want[i][0] == "falsified")


def test_shard_view_rejects_unsorted_positions() -> None:
    with pytest.raises(InputError, match="increasing"):
        IndexedShard.of(load_digits(), [3, 1])


def test_missing_ray_is_one_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    from bastion.scale import ray_certify

    monkeypatch.setitem(sys.modules, "ray", None)  # import ray now raises ImportError
    data = load_digits().subset(slice(0, 4))
    model = build_model("mlp", data.feature_shape, data.num_classes, hidden=(8,))
    with pytest.raises(BastionError, match=r"bastion\[ray\]"):
        ray_certify(model, data, LpBall("linf", 0.1))
