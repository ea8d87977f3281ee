"""The shared generation loop: budgets, kept tests, records in the store, checkpoint and resume, bad input."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from bastion.data import Dataset
from bastion.errors import InputError
from bastion.store import Store
from bastion.testing import Budget, generate_tests
from bastion.testing.coverage import NeuronCoverage
from bastion.testing.generate import GenerationContext, TestGenerator, run_generator
from bastion.threat import LpBall


class Noise(TestGenerator):
    """A test generator for the loop's tests: uniform noise of ``scale`` around random seeds."""

    name = "noise-test"

    def __init__(self, batch: int = 8, scale: float = 0.5) -> None:
        self.batch, self.scale = batch, scale

    def propose(self, ctx: GenerationContext) -> tuple[torch.Tensor, torch.Tensor]:
        i = torch.randint(0, ctx.seeds.shape[0], (self.batch,), generator=ctx.generator)
        noise = (torch.rand((self.batch, *ctx.seeds.shape[1:]), generator=ctx.generator) - 0.5) * 2 * self.scale
        return ctx.seeds[i] + noise, i


def _setup() -> tuple[nn.Module, Dataset]:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 3))
    x = torch.rand(10, 6) * 0.2 + 0.4
    return net, Dataset(x, net(x).argmax(1).detach(), num_classes=3, name="toy")


def _run(net: nn.Module, data: Dataset, **kw) -> object:  # type: ignore[no-untyped-def]
    return run_generator(net, data.x, data.y, NeuronCoverage(threshold=0.3), Noise(), progress=False,
                         threat=LpBall("linf", 0.3), **kw)  # fmt: skip


def test_kept_tests_raise_coverage_and_stay_in_the_threat_set(tmp_path: Path) -> None:
    net, data = _setup()
    res = _run(net, data, budget=Budget(iterations=15), store=tmp_path / "runs.db")
    assert res.n_tests > 0 and res.coverage.ratio > res.seed_coverage.ratio  # type: ignore[attr-defined]
    assert bool(LpBall("linf", 0.3).contains(res.tests, data.x[res.origins]).all())  # type: ignore[attr-defined]
    torch.testing.assert_close(res.predictions, net(res.tests).argmax(1))  # type: ignore[attr-defined]
    assert torch.equal(res.adversarial, res.predictions != data.y[res.origins])  # type: ignore[attr-defined]
    assert [h[0] for h in res.history] == list(range(1, 16))  # type: ignore[attr-defined]
    with Store(tmp_path / "runs.db") as store:
        (run,) = store.runs()
        records = store.records(run.id)
        assert run.kind == "test-generation" and run.status == "complete" and len(records) == res.n_tests  # type: ignore[attr-defined]
        assert sum(r.status == "falsified" for r in records) == int(res.adversarial.sum())  # type: ignore[attr-defined]


def test_query_budget_and_resume_give_the_uninterrupted_suite(tmp_path: Path) -> None:
    net, data = _setup()
    res = _run(net, data, budget=Budget(iterations=None, queries=50))
    assert 40 < res.queries <= 50  # type: ignore[attr-defined]  # the seeds' measurement is not part of the budget
    full = _run(net, data, budget=Budget(iterations=12))
    ckpt = tmp_path / "gen.ckpt"
    _run(net, data, budget=Budget(iterations=5), checkpoint=ckpt)
    resumed = _run(net, data, budget=Budget(iterations=12), checkpoint=ckpt)
    assert torch.equal(resumed.tests, full.tests) and resumed.iterations == 12  # type: ignore[attr-defined]
    other = nn.Sequential(nn.Linear(6, 4), nn.ReLU(), nn.Linear(4, 3))
    with pytest.raises(InputError, match="another generation run"):
        run_generator(other, data.x, data.y, NeuronCoverage(threshold=0.3), Noise(), progress=False,
                      budget=Budget(iterations=3), checkpoint=ckpt)  # fmt: skip


def test_generate_tests_bad_input() -> None:
    net, data = _setup()
    with pytest.raises(InputError, match="unknown test generation method 'magic'"):
        generate_tests(net, data, "nc", "magic", progress=False)
    with pytest.raises(InputError, match="budget"):
        generate_tests(net, data, "nc", Noise(), budget=0, progress=False)
    with pytest.raises(InputError, match="domain"):
        generate_tests(net, data, "nc", Noise(), threat=LpBall("linf", 0.1, domain=(-1, 1)), progress=False)
    with pytest.raises(InputError, match="at least one limit"):
        Budget(iterations=None)
