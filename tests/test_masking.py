"""Gradient-masking checks: silent on a healthy model, each check fires on the defect it is meant to catch."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from bastion.attacks import FGSM, PGD
from bastion.attacks.base import Attack
from bastion.data import Dataset, load_digits
from bastion.defenses.training import train
from bastion.evaluate import evaluate, summarize
from bastion.masking import MaskingWarning, posthoc, preflight, unbounded_check
from bastion.models import build_model
from bastion.results import SampleRecord
from bastion.store import Store
from bastion.threat import LpBall


@pytest.fixture(scope="module")
def setup() -> tuple[nn.Module, Dataset]:
    train_set, test_set = load_digits().train_test_split(test_fraction=0.2, seed=0)
    torch.manual_seed(0)
    model = build_model("mlp", train_set.feature_shape, 10, hidden=(48,))
    train(model, train_set, epochs=10, lr=3e-3, seed=0, progress=False)
    return model, test_set.subset(slice(0, 64))


class Wrap(nn.Module):
    def __init__(self, model: nn.Module, fn) -> None:  # type: ignore[no-untyped-def]
        super().__init__()
        self.model, self.fn = model, fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(self.model, x)


def codes(findings) -> set[str]:  # type: ignore[no-untyped-def]
    return {f.code for f in findings}


def test_healthy_model_passes_every_check(setup) -> None:
    model, data = setup
    assert preflight(model, data.x, data.y) == []
    assert unbounded_check(model, data.x[:32], data.y[:32], LpBall("linf", 0.1)) == []
    with warnings.catch_warnings():
        warnings.simplefilter("error", MaskingWarning)
        res = evaluate(model, data, [LpBall("linf", e) for e in (0.05, 0.2)], [FGSM(), PGD(steps=10)], progress=False)
    assert res.warnings == []


@pytest.mark.parametrize(
    "fn,code",
    [
        (lambda m, x: m(x + 0.05 * torch.randn_like(x)), "random-outputs"),
        (lambda m, x: m(x).softmax(dim=1), "softmax-outputs"),
        (lambda m, x: m(torch.round(x * 3) / 3), "zero-gradients"),
        (lambda m, x: m(torch.sqrt(x)), "nonfinite-gradients"),  # d sqrt(x)/dx is infinite at black pixels
    ],
    ids=["random", "softmax", "quantised", "sqrt"],
)
def test_preflight_catches_each_defect(setup, fn, code: str) -> None:  # type: ignore[no-untyped-def]
    model, data = setup
    torch.manual_seed(0)
    found = codes(preflight(Wrap(model, fn), data.x, data.y))
    assert code in found


def test_random_outputs_check_knows_eot(setup) -> None:
    """A model already wrapped in EOT is not told to be wrapped in EOT; too few draws are still reported."""
    from bastion.attacks import EOT

    model, data = setup
    torch.manual_seed(0)

    def noisy(sigma: float) -> nn.Module:
        return Wrap(model, lambda m, x: m(x + sigma * torch.randn_like(x)))

    found = [f for f in preflight(noisy(0.05), data.x, data.y) if f.code == "random-outputs"]
    assert len(found) == 1 and "EOT(model" in found[0].message
    assert "random-outputs" not in codes(preflight(EOT(noisy(0.05), samples=200), data.x, data.y))
    found = [f for f in preflight(EOT(noisy(0.5), samples=1), data.x, data.y) if f.code == "random-outputs"]
    assert len(found) == 1 and "samples=1" in found[0].message and "raise EOT's samples" in found[0].message


def test_unbounded_radius_must_reach_zero(setup) -> None:
    model, data = setup
    masked = Wrap(model, lambda m, x: m(torch.round(x * 3) / 3))
    found = unbounded_check(masked, data.x[:32], data.y[:32], LpBall("linf", 0.1))
    assert codes(found) == {"unbounded-not-zero"}


@pytest.mark.parametrize("norm", ["linf", "l2", "l1", "l0"])
def test_unbounded_check_covers_every_norm(setup, norm: str) -> None:
    """An unbounded ball of any norm is the whole domain: the check runs (no error) and judges the model alike."""
    model, data = setup
    threat = LpBall(norm, 3 if norm == "l0" else 0.1)
    assert unbounded_check(model, data.x[:32], data.y[:32], threat) == []
    masked = Wrap(model, lambda m, x: m(torch.round(x * 3) / 3))
    assert codes(unbounded_check(masked, data.x[:32], data.y[:32], threat)) == {"unbounded-not-zero"}


def test_l0_evaluation_runs_its_posthoc_checks(setup) -> None:
    """evaluate() on l0 balls finishes with its checks, which find the masking of a quantised model once."""
    from bastion.attacks import JSMA

    model, data = setup
    masked = Wrap(model, lambda m, x: m(torch.round(x * 3) / 3))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", MaskingWarning)
        res = evaluate(masked, data.subset(slice(0, 16)), [LpBall("l0", 2), LpBall("l0", 4)], [JSMA()], progress=False)
    assert [c for c, _ in res.warnings].count("unbounded-not-zero") == 1


class FakeScoreAttack(Attack):
    access = "score"

    def run(self, model, x, criterion, threat, generator):  # type: ignore[no-untyped-def]
        return x


def _records(threat: str, broken: dict[int, str]) -> list[SampleRecord]:
    return [
        SampleRecord(i, threat, 1, 1, "falsified" if i in broken else "unknown", 0.1 if i in broken else None,
                     attack=broken.get(i))
        for i in range(10)
    ]  # fmt: skip


def test_posthoc_flags_flat_eps_and_black_box_wins() -> None:
    threats = [LpBall("linf", 0.1), LpBall("linf", 0.3)]
    attacks = [PGD(), FakeScoreAttack()]
    names = ["pgd", "fakescoreattack"]
    recs = _records("linf:0.1", {0: "pgd"}) + _records("linf:0.3", {0: "pgd", 1: "fakescoreattack"})
    res = summarize(recs, [t.key for t in threats], names, 10)
    assert codes(posthoc(res, attacks, threats)) == {"black-box-beats-white-box"}
    flat = summarize(_records("linf:0.1", {0: "pgd"}) + _records("linf:0.3", {0: "pgd"}), [t.key for t in threats],
                     names, 10)  # fmt: skip
    assert codes(posthoc(flat, attacks, threats)) == {"flat-in-eps"}


def test_evaluate_warns_and_stores_findings(setup, tmp_path) -> None:
    model, data = setup
    masked = Wrap(model, lambda m, x: m(torch.round(x * 3) / 3))
    db = tmp_path / "runs.db"
    with pytest.warns(MaskingWarning):
        res = evaluate(masked, data, LpBall("linf", 0.1), PGD(steps=5), store=db, progress=False)
    assert {"zero-gradients", "unbounded-not-zero"} <= {c for c, _ in res.warnings}
    assert "warning [zero-gradients]" in res.table()
    with Store(db) as store:
        assert {c for c, _ in store.warnings(res.run_id)} == {c for c, _ in res.warnings}
