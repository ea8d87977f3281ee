"""Coverage-guided fuzzing (TensorFuzz / DeepHunter) on the digits CNN: budget, coverage, constraints, resume."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import Tensor, nn

from bastion.data import Dataset
from bastion.errors import InputError
from bastion.testing.generate import GENERATORS, Budget, GenerationContext, generate_tests, make_generator
from bastion.testing.generate.fuzz import Fuzzer
from bastion.threat import LpBall

from .nets import Counting, digits_cnns


@pytest.fixture(scope="module")
def digits_cnn() -> tuple[nn.Module, Dataset]:
    (model,), seeds = digits_cnns()
    return model, seeds


def test_registered() -> None:
    assert GENERATORS["fuzz"] is Fuzzer
    assert isinstance(make_generator("fuzz", selection="uniform"), Fuzzer)


@pytest.mark.parametrize("bad", [{"selection": "best"}, {"mutations": ["blur"]}, {"mutations": []}, {"parents": 0},
                                 {"p_min": 0.0}, {"scale": (1.2, 0.8)}, {"keep_failures": 1}])  # fmt: skip
def test_bad_options(bad: dict[str, object]) -> None:
    with pytest.raises(InputError):
        Fuzzer(**bad)  # type: ignore[arg-type]


def test_threat_mutation_needs_a_threat(digits_cnn: tuple[nn.Module, Dataset]) -> None:
    model, seeds = digits_cnn
    with pytest.raises(InputError, match="threat"):
        generate_tests(model, seeds, "nc", Fuzzer(mutations=["threat"]), budget=2, progress=False)


@pytest.mark.parametrize("queries", [1, 57, 150])
def test_never_exceeds_the_query_budget(digits_cnn: tuple[nn.Module, Dataset], queries: int) -> None:
    """Counted by an independent wrapper: the loop's budget covers every query of the generation iterations.

    Not counted against the budget (and accounted for exactly here): the seeds' coverage pass before the first
    iteration (one query per seed). The kept tests' predictions come from the loop's own passes.
    """
    model, seeds = digits_cnn
    counted = Counting(model)
    suite = generate_tests(counted, seeds, "nc", Fuzzer(), budget=Budget(iterations=None, queries=queries),
                           progress=False)  # fmt: skip
    assert suite.queries == queries  # spent to the last query, never beyond
    assert counted.count == len(seeds) + suite.queries
    assert counted.count - len(seeds) <= queries


@pytest.mark.parametrize("selection", ["deephunter", "uniform", "tensorfuzz"])
def test_raises_coverage(digits_cnn: tuple[nn.Module, Dataset], selection: str) -> None:
    model, seeds = digits_cnn
    fuzzer = Fuzzer(selection=selection)
    suite = generate_tests(model, seeds, "nc", fuzzer, budget=15, progress=False, criterion_options={"threshold": 0.5})
    assert suite.coverage.covered > suite.seed_coverage.covered
    assert suite.n_tests > 0 and suite.queries == 15 * fuzzer.parents * fuzzer.mutants
    # the failures the fuzzer counted include every adversarial test the loop kept
    assert fuzzer.failures >= int(suite.adversarial.sum())
    assert set(suite.origins[suite.adversarial].tolist()) <= set(fuzzer.failed_seeds)


class Recording(Fuzzer):
    """A fuzzer that keeps what it proposes, before the loop projects it."""

    def propose(self, ctx: GenerationContext) -> tuple[Tensor, Tensor] | None:
        out = super().propose(ctx)
        if out is not None:
            self.seen = getattr(self, "seen", [])
            self.seen.append((out[0].clone(), ctx.seeds[out[1]].clone()))
        return out


def test_mutants_respect_the_threat(digits_cnn: tuple[nn.Module, Dataset]) -> None:
    model, seeds = digits_cnn
    threat = LpBall("linf", 0.1)
    fuzzer = Recording()
    suite = generate_tests(model, seeds, "nc", fuzzer, threat=threat, budget=10, progress=False)
    mutants = torch.cat([m for m, _ in fuzzer.seen])
    origins = torch.cat([o for _, o in fuzzer.seen])
    assert mutants.shape[0] == 10 * fuzzer.parents * fuzzer.mutants
    assert bool(threat.contains(mutants, origins).all())
    assert (mutants - origins).abs().amax() > 0.05  # they do move
    assert bool(threat.contains(suite.tests, seeds.x[suite.origins]).all())


def test_deephunter_constraint(digits_cnn: tuple[nn.Module, Dataset]) -> None:
    """Pixel-value mutants only: every test changes < alpha of the pixels or none by beta or more (Equation 1)."""
    model, seeds = digits_cnn
    fuzzer = Fuzzer(mutations=["contrast", "brightness", "noise"], alpha=0.05, beta=0.1)
    suite = generate_tests(model, seeds, "nc", fuzzer, budget=10, progress=False, criterion_options={"threshold": 0.5})
    assert suite.n_tests > 0
    d = (suite.tests - seeds.x[suite.origins]).flatten(1).abs()
    l0 = (d >= 0.5 / 255).sum(dim=1)
    assert bool(((l0 < 0.05 * 64) | (d.amax(dim=1) < 0.1)).all())
    assert d.amax() > 0


def test_affine_once(digits_cnn: tuple[nn.Module, Dataset]) -> None:
    """Only affine mutations: an entry takes at most one, so every test is one affine step from its seed."""
    model, seeds = digits_cnn
    fuzzer = Fuzzer(mutations=["translate", "scale", "rotate"])
    suite = generate_tests(model, seeds, "nc", fuzzer, budget=10, progress=False, criterion_options={"threshold": 0.5})
    assert suite.n_tests > 0
    corpus = fuzzer.state_dict()["corpus"]
    assert bool(corpus["affine"][len(seeds) :].all()) and not bool(corpus["affine"][: len(seeds)].any())
    # children of transformed entries cannot be made: only the seeds were fuzzed
    assert int(corpus["fuzzed"][len(seeds) :].sum()) == 0


def test_checkpoint_resume_gives_the_same_tests(digits_cnn: tuple[nn.Module, Dataset], tmp_path: Path) -> None:
    model, seeds = digits_cnn
    options = {"criterion_options": {"threshold": 0.5}, "progress": False, "seed": 3}
    whole = generate_tests(model, seeds, "nc", Fuzzer(), budget=8, **options)  # type: ignore[arg-type]
    ckpt = tmp_path / "fuzz.ckpt"
    part = generate_tests(model, seeds, "nc", Fuzzer(), budget=3, checkpoint=ckpt, **options)  # type: ignore[arg-type]
    assert 0 < part.n_tests < whole.n_tests
    resumed = generate_tests(model, seeds, "nc", Fuzzer(), budget=8, checkpoint=ckpt, **options)  # type: ignore[arg-type]
    assert torch.equal(resumed.tests, whole.tests)
    assert torch.equal(resumed.origins, whole.origins)
    assert resumed.coverage.covered == whole.coverage.covered and resumed.queries == whole.queries
