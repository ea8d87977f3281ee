"""DeepXplore (gradient-guided differential testing) on two digits CNNs: coverage, disagreements, constraints."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from bastion.data import Dataset
from bastion.errors import InputError
from bastion.testing.generate import GENERATORS, Budget, generate_tests, make_generator
from bastion.testing.generate.base import TestSuiteResult as Suite
from bastion.testing.generate.deepxplore import DeepXplore
from bastion.threat import LpBall

from .nets import Counting, digits_cnns


@pytest.fixture(scope="module")
def digits_cnns_pair() -> tuple[nn.Module, nn.Module, Dataset]:
    """Two digits CNNs, initialised and shuffled with different seeds, and 40 held-out seeds."""
    (a, b), seeds = digits_cnns((0, 1))
    return a, b, seeds


def _run(model: nn.Module, seeds: Dataset, gen: DeepXplore, iterations: int = 20, **kw: object) -> Suite:
    return generate_tests(model, seeds, "nc", gen, budget=iterations, progress=False, **kw)  # type: ignore[arg-type]


def test_registered() -> None:
    assert GENERATORS["deepxplore"] is DeepXplore
    assert isinstance(make_generator("deepxplore", transformation="occl"), DeepXplore)


@pytest.mark.parametrize("bad", [{"transformation": "fog"}, {"lambda1": -1}, {"step": 0}, {"iterations": 0},
                                 {"others": ["model"]}, {"occlusion_size": (2, 2, 2)}, {"score": "prob"}])  # fmt: skip
def test_bad_options(bad: dict[str, object]) -> None:
    with pytest.raises(InputError):
        DeepXplore(**bad)  # type: ignore[arg-type]


def test_occlusion_must_fit(digits_cnns_pair: tuple[nn.Module, nn.Module, Dataset]) -> None:
    model, _, seeds = digits_cnns_pair
    with pytest.raises(InputError, match="does not fit"):
        _run(model, seeds, DeepXplore(transformation="occl", occlusion_size=3, occlusion_position=(6, 0)), 2)


def test_two_models_disagree_and_coverage_rises(digits_cnns_pair: tuple[nn.Module, nn.Module, Dataset]) -> None:
    model, other, seeds = digits_cnns_pair
    gen = DeepXplore(others=[other])
    suite = _run(model, seeds, gen)
    assert suite.coverage.covered > suite.seed_coverage.covered
    assert len(gen.disagreements) > 0
    index = torch.tensor([i for i, _ in gen.disagreements])
    assert torch.equal(suite.origins[index], torch.tensor([s for _, s in gen.disagreements]))
    with torch.no_grad():
        tests = suite.tests[index]
        assert bool((model(tests).argmax(1) != other(tests).argmax(1)).all())
    # every seed the models already disagreed on was skipped, not followed
    with torch.no_grad():
        skipped = seeds.x[gen.seed_disagreements]
        assert bool((model(skipped).argmax(1) != other(skipped).argmax(1)).all())
    assert not set(gen.seed_disagreements) & set(suite.origins.tolist())


def test_single_model_variant(digits_cnns_pair: tuple[nn.Module, nn.Module, Dataset]) -> None:
    model, _, seeds = digits_cnns_pair
    gen = DeepXplore()
    suite = _run(model, seeds, gen)
    assert suite.coverage.covered > suite.seed_coverage.covered
    assert len(gen.disagreements) > 0  # here: tests the model misclassifies
    index = torch.tensor([i for i, _ in gen.disagreements])
    assert bool(suite.adversarial[index].all())


def test_light_is_a_uniform_shift(digits_cnns_pair: tuple[nn.Module, nn.Module, Dataset]) -> None:
    model, other, seeds = digits_cnns_pair
    suite = _run(model, seeds, DeepXplore(others=[other], transformation="light"))
    assert suite.n_tests > 0
    x0 = seeds.x[suite.origins].flatten(1)
    x = suite.tests.flatten(1)
    inside = (x > 1e-6) & (x < 1 - 1e-6)
    # the shift of each test, read off a pixel that was not clipped
    shift = torch.where(inside, x - x0, torch.nan).nanmedian(dim=1).values
    assert not bool(shift.isnan().any())
    assert torch.allclose(x, (x0 + shift[:, None]).clamp(0, 1), atol=1e-5)
    assert bool((shift.abs() > 0).all())


def test_occlusion_changes_one_rectangle(digits_cnns_pair: tuple[nn.Module, nn.Module, Dataset]) -> None:
    model, other, seeds = digits_cnns_pair
    suite = _run(model, seeds, DeepXplore(others=[other], transformation="occl", occlusion_size=(3, 2),
                                          occlusion_position=(2, 5)))  # fmt: skip
    assert suite.n_tests > 0
    changed = suite.tests != seeds.x[suite.origins]
    mask = torch.zeros(8, 8, dtype=torch.bool)
    mask[2:5, 5:7] = True
    assert not bool(changed[:, :, ~mask].any())
    assert bool(changed.flatten(1).any(dim=1).all())
    # at random positions (the default): the changed pixels of each test fit in one rectangle of the default size
    suite = _run(model, seeds, DeepXplore(others=[other], transformation="occl"))
    changed = (suite.tests != seeds.x[suite.origins])[:, 0]
    for c in changed:
        rows, cols = c.any(dim=1).nonzero().flatten(), c.any(dim=0).nonzero().flatten()
        assert int(rows[-1] - rows[0]) < 3 and int(cols[-1] - cols[0]) < 3  # 10/28 of 8 pixels: 3x3


def test_blackout_sets_small_squares_to_black(digits_cnns_pair: tuple[nn.Module, nn.Module, Dataset]) -> None:
    model, other, seeds = digits_cnns_pair
    gen = DeepXplore(others=[other], transformation="blackout", iterations=10)
    suite = _run(model, seeds, gen)
    assert suite.n_tests > 0
    changed = suite.tests != seeds.x[suite.origins]
    assert bool((suite.tests[changed] == 0).all())
    # at most one 2x2 square (6/28 of 8 pixels) per gradient step
    assert int(changed.flatten(1).sum(dim=1).max()) <= gen.iterations * 4


def test_tests_stay_in_the_threat(digits_cnns_pair: tuple[nn.Module, nn.Module, Dataset]) -> None:
    model, other, seeds = digits_cnns_pair
    threat = LpBall("linf", 0.1)
    suite = _run(model, seeds, DeepXplore(others=[other]), threat=threat)
    assert suite.n_tests > 0
    assert bool(threat.contains(suite.tests, seeds.x[suite.origins]).all())


@pytest.mark.parametrize("queries", [1, 101])
def test_query_budget(digits_cnns_pair: tuple[nn.Module, nn.Module, Dataset], queries: int) -> None:
    """Gradient passes and evaluations together stay within the budget (the seeds' coverage pass aside)."""
    model, other, seeds = digits_cnns_pair
    counted = Counting(model)
    suite = generate_tests(counted, seeds, "nc", DeepXplore(others=[other]),
                           budget=Budget(iterations=None, queries=queries), progress=False)  # fmt: skip
    assert suite.queries <= queries
    assert counted.count == len(seeds) + suite.queries


def test_checkpoint_resume(digits_cnns_pair: tuple[nn.Module, nn.Module, Dataset], tmp_path: Path) -> None:
    model, other, seeds = digits_cnns_pair
    ckpt = tmp_path / "dx.ckpt"
    whole = _run(model, seeds, DeepXplore(others=[other], transformation="blackout"), 12)
    _run(model, seeds, DeepXplore(others=[other], transformation="blackout"), 5, checkpoint=ckpt)
    gen = DeepXplore(others=[other], transformation="blackout")
    resumed = _run(model, seeds, gen, 12, checkpoint=ckpt)
    assert torch.equal(resumed.tests, whole.tests) and torch.equal(resumed.origins, whole.origins)
