"""EAD: success re-verified, sparser than l2 attacks, the shrinkage operator and the search over c, bad input named."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from bastion.attacks import ATTACKS, PGD
from bastion.attacks.ead import EAD, shrinkage, update_consts
from bastion.errors import InputError
from bastion.threat import LpBall

L1 = LpBall("l1", math.inf)
FAST = {"steps": 100, "binary_search_steps": 5}  # enough on the digits MLP; the paper's 9 x 1000 is for ImageNet


@pytest.fixture(scope="module")
def digits_model(
    digits_mlp64: tuple[nn.Module, torch.Tensor, torch.Tensor],
) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """The shared digits MLP (tests/conftest.py) and its first 128 held-out test images."""
    model, x, y = digits_mlp64
    return model, x[:128], y[:128]


def _changed(x_adv: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Per-sample fraction of features that moved."""
    return ((x_adv - x).flatten(1).abs() > 1e-6).double().mean(dim=1)


@pytest.mark.parametrize("norm", ["l1", "l2"])
def test_ead_contract_and_success_reverified(digits_model, norm: str) -> None:
    model, x, y = digits_model
    threat = LpBall(norm, math.inf)
    res = EAD(**FAST)(model, x, y, threat=threat)
    assert res.x_adv.shape == x.shape and res.x_adv.dtype == x.dtype
    assert bool(threat.in_domain(res.x_adv).all())
    with torch.no_grad():
        pred = model(res.x_adv).argmax(dim=1)
        clean = model(x).argmax(dim=1)
    torch.testing.assert_close(res.success, pred != y)
    assert res.success_rate >= 0.95
    # distances in the threat's norm, finite exactly where successful, 0 for clean misclassifications
    p = 1 if norm == "l1" else 2
    torch.testing.assert_close(res.distance[res.success], (res.x_adv - x).flatten(1).norm(p=p, dim=1)[res.success])
    assert bool(torch.isinf(res.distance[~res.success]).all())
    assert bool((res.distance[clean != y] == 0).all())
    assert ATTACKS["ead"] is EAD


def test_ead_targeted(digits_model) -> None:
    model, x, y = digits_model
    x, y = x[:48], y[:48]
    targets = (y + 1) % 10
    res = EAD(**FAST)(model, x, y, threat=L1, targets=targets)
    with torch.no_grad():
        pred = model(res.x_adv).argmax(dim=1)
    torch.testing.assert_close(res.success, pred == targets)
    assert res.success_rate >= 0.9


def test_elastic_net_gives_sparser_perturbations_than_l2_attacks(digits_model) -> None:
    model, x, y = digits_model
    x, y = x[:64], y[:64]
    ead = EAD(**FAST, beta=1e-2)(model, x, y, threat=L1)
    ridge = EAD(**FAST, beta=0.0)(model, x, y, threat=L1)  # C&W-l2 by FISTA: no l1 term, no thresholding
    pgd = PGD(steps=20)(model, x, y, threat=LpBall("l2", 1.5))  # an l2 attack at a radius that breaks most
    both = ead.success & ridge.success
    assert int(both.sum()) >= 50 and int((ead.success & pgd.success).sum()) >= 50
    # fewer features changed, and smaller l1 distances, with the l1 term than without it
    assert float(_changed(ead.x_adv, x)[both].mean()) < 0.7 * float(_changed(ridge.x_adv, x)[both].mean())
    assert float(ead.distance[both].median()) < 0.9 * float(ridge.distance[both].median())
    l1_pgd = (pgd.x_adv - x).flatten(1).abs().sum(dim=1)
    assert float(ead.distance[ead.success].median()) < 0.5 * float(l1_pgd[pgd.success].median())


def test_l1_decision_rule_picks_smaller_l1_distances(digits_model) -> None:
    model, x, y = digits_model
    x, y = x[:64], y[:64]
    en = EAD(**FAST, beta=1e-2, decision_rule="EN")(model, x, y, threat=L1)
    l1 = EAD(**FAST, beta=1e-2, decision_rule="L1")(model, x, y, threat=L1)
    torch.testing.assert_close(en.success, l1.success)  # the rule chooses among the same iterates
    ok = en.success
    assert float(l1.distance[ok].median()) <= float(en.distance[ok].median())
    assert bool((l1.distance[ok] <= en.distance[ok] + 1e-6).all())
    assert bool((l1.distance[ok] < en.distance[ok] - 1e-4).any())  # the rule matters

    def elastic(res) -> torch.Tensor:
        d = (res.x_adv - x).flatten(1)
        return d.square().sum(dim=1) + 1e-2 * d.abs().sum(dim=1)

    assert bool((elastic(en)[ok] <= elastic(l1)[ok] + 1e-6).all())


def test_shrinkage_matches_its_closed_form() -> None:
    g = torch.Generator().manual_seed(0)
    lo, hi, beta = -0.5, 0.5, 0.1
    x = torch.rand(50, 30, generator=g, dtype=torch.float64) - 0.5
    z = x + (torch.rand(50, 30, generator=g, dtype=torch.float64) - 0.5) * 1.5
    d = z - x
    expected = torch.where(
        d > beta,
        torch.clamp(z - beta, max=hi),
        torch.where(d < -beta, torch.clamp(z + beta, min=lo), x),
    )
    out = shrinkage(z, x, beta, (lo, hi))
    torch.testing.assert_close(out, expected)
    # all three cases and both clips occur, so the comparison covers every branch
    assert bool((d > beta).any() and (d < -beta).any() and (d.abs() <= beta).any())
    assert bool((z - beta > hi).any() and (z + beta < lo).any())
    # β = 0 is the projection onto the box
    torch.testing.assert_close(shrinkage(z, x, 0.0, (lo, hi)), z.clamp(lo, hi))


def test_binary_search_over_c() -> None:
    const = torch.tensor([1.0, 1.0, 1.0, 1.0], dtype=torch.float64)
    lower = torch.tensor([0.0, 0.0, 0.5, 0.0], dtype=torch.float64)
    upper = torch.tensor([1e10, 1e10, 2.0, 3.0], dtype=torch.float64)
    success = torch.tensor([True, False, False, True])
    c, lo, up = update_consts(const, lower, upper, success)
    torch.testing.assert_close(up, torch.tensor([1.0, 1e10, 2.0, 1.0], dtype=torch.float64))
    torch.testing.assert_close(lo, torch.tensor([0.0, 1.0, 1.0, 0.0], dtype=torch.float64))
    # success: bisect towards smaller c; failure with no upper bound: x10; failure with one: bisect upwards
    torch.testing.assert_close(c, torch.tensor([0.5, 10.0, 1.5, 0.5], dtype=torch.float64))


def test_ead_on_an_affine_model_matches_the_closed_form_with_beta_zero() -> None:
    # With β = 0 and a wide domain, EAD is C&W-l2: on a two-class affine model the minimal l2 distance is
    # |margin| / ||w_1 - w_0||_2, which the search over c approaches from above.
    g = torch.Generator().manual_seed(1)
    w = torch.randn(2, 10, generator=g, dtype=torch.float64)
    lin = nn.Linear(10, 2).double()
    with torch.no_grad():
        lin.weight.copy_(w)
        lin.bias.zero_()
    x = torch.rand(40, 10, generator=g, dtype=torch.float64) * 0.2 + 0.4
    with torch.no_grad():
        logits = lin(x)
    y = logits.argmax(dim=1)
    exact = (logits[:, 0] - logits[:, 1]).abs() / (w[1] - w[0]).norm()
    res = EAD(beta=0.0, steps=100, binary_search_steps=12, initial_const=1e-2)(
        lin, x, y, threat=LpBall("l2", math.inf, domain=(-100.0, 100.0))
    )
    assert bool(res.success.all())
    ratio = res.distance / exact
    assert bool((ratio >= 1 - 1e-6).all())  # no attack can beat the exact minimum
    assert float(ratio.max()) < 1.01


@pytest.mark.parametrize(
    "kwargs",
    [
        {"beta": -1e-3},
        {"beta": math.nan},
        {"binary_search_steps": 0},
        {"steps": 2.5},
        {"lr": 0.0},
        {"lr": math.inf},
        {"initial_const": -1.0},
        {"confidence": -0.1},
        {"decision_rule": "l2"},
        {"abort_early": "yes"},
    ],
    ids=repr,
)
def test_bad_hyperparameters_are_named(kwargs) -> None:
    with pytest.raises(InputError):
        EAD(**kwargs)


def test_bad_threat_and_targets(digits_model) -> None:
    model, x, y = digits_model
    with pytest.raises(InputError, match="norms"):
        EAD(**FAST)(model, x[:4], y[:4], threat=LpBall("linf", 0.1))
    with pytest.raises(InputError):
        EAD(**FAST)(model, x[:4], y[:4], threat=L1, targets=torch.tensor([1.0, 2.0, 3.0, 4.0]))
