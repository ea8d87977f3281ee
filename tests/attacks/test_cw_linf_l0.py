"""Carlini & Wagner l∞ and l0: exact l∞ on a binary affine classifier, at least as strong as PGD / JSMA on digits."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
from torch import nn

from bastion.attacks import ATTACKS, JSMA, PGD
from bastion.attacks.cw import CarliniWagnerL0, CarliniWagnerL2, CarliniWagnerLinf, _remove_features
from bastion.data import load_digits
from bastion.defenses.training import train
from bastion.errors import InputError
from bastion.models import build_model
from bastion.results import AttackResult
from bastion.threat import LpBall, lp_norm

LINF = LpBall("linf", math.inf)
L0 = LpBall("l0", math.inf)
# Test-sized settings: the digits pixels at 0 sit on the flat end of tanh, so the l2 solver of the l0 attack needs a
# larger step than the paper's to move them in a few dozen iterations; c starts at 1 and doubles at most twice.
FAST_LINF: dict[str, Any] = {"steps": 100, "initial_const": 1e-2, "largest_const": 1.0}
FAST_L0: dict[str, Any] = {"steps": 50, "lr": 0.1, "initial_const": 1.0, "largest_const": 4.0}


@pytest.fixture(scope="module")
def digits_model() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """A small MLP trained on digits, and 24 held-out test images it mostly classifies correctly."""
    train_set, test_set = load_digits().train_test_split(test_fraction=0.2, seed=0)
    torch.manual_seed(0)
    model = build_model("mlp", train_set.feature_shape, 10, hidden=(64,))
    train(model, train_set, epochs=12, lr=3e-3, seed=0, progress=False)
    sub = test_set.subset(slice(0, 24))
    return model, sub.x, sub.y


def _check_contract(model: nn.Module, x: torch.Tensor, y: torch.Tensor, res: AttackResult, norm: str) -> None:
    assert res.x_adv.shape == x.shape and res.x_adv.dtype == x.dtype
    assert bool(LpBall(norm, math.inf).in_domain(res.x_adv).all())
    with torch.no_grad():
        pred = model(res.x_adv).argmax(dim=1)
    torch.testing.assert_close(res.success, pred != y)  # success re-verified by prediction
    torch.testing.assert_close(res.distance[res.success], lp_norm((res.x_adv - x).flatten(1), norm)[res.success])
    assert bool(torch.isinf(res.distance[~res.success]).all())
    assert res.success_rate >= 0.95


# ------------------------------------------------------------------------------------------------------ l∞
def test_cw_linf_is_near_exact_on_a_binary_affine_classifier() -> None:
    # Two classes, affine: the minimal l∞ distance is |margin| / ||w_y - w_o||_1, reached at δ = τ · sign(w_o - w_y).
    # The scheme's granularity is the decay of τ (the last success is within 1 / decrease_factor of the first
    # failure), so a decay of 0.97 bounds the gap by 3 %. The domain is wide enough never to bind.
    g = torch.Generator().manual_seed(0)
    w, b = torch.randn(2, 20, generator=g, dtype=torch.float64), torch.randn(2, generator=g, dtype=torch.float64)
    model = nn.Linear(20, 2).double()
    with torch.no_grad():
        model.weight.copy_(w)
        model.bias.copy_(b * 0.1)
        x = torch.rand(200, 20, generator=g, dtype=torch.float64)
        logits = model(x)
    y = logits.argmax(dim=1)
    margin = logits.gather(1, y[:, None]).squeeze(1) - logits.gather(1, (1 - y)[:, None]).squeeze(1)
    exact = margin / (w[1] - w[0]).abs().sum()
    keep = (exact > 0.02).nonzero().squeeze(1)[:24]  # relative accuracy is meaningless on points at the boundary
    x, y, exact = x[keep], y[keep], exact[keep]
    attack = CarliniWagnerLinf(**FAST_LINF, decrease_factor=0.97)
    res = attack(model, x, y, threat=LpBall("linf", math.inf, domain=(-1.0, 2.0)))
    assert bool(res.success.all())
    assert bool((res.distance >= exact * (1 - 1e-9)).all())  # nothing beats the minimal distance
    assert bool((res.distance <= exact * 1.05).all())  # and C&W-l∞ gets within 5 % of it


def test_cw_linf_contract_and_strength_on_digits(digits_model) -> None:
    model, x, y = digits_model
    res = CarliniWagnerLinf(**FAST_LINF)(model, x, y, threat=LINF)
    _check_contract(model, x, y, res, "linf")
    # the smallest eps on a grid at which PGD-l∞ (20 steps) breaks each sample
    ok = res.success & (res.clean_pred == y)
    pgd_eps = torch.full((x.shape[0],), math.inf, dtype=x.dtype)
    for eps in torch.arange(0.02, 0.62, 0.02, dtype=torch.float64).tolist():
        broken = PGD(steps=20, rel_stepsize=0.1)(model, x, y, threat=LpBall("linf", eps)).success
        pgd_eps = torch.where(broken & torch.isinf(pgd_eps), torch.tensor(eps, dtype=x.dtype), pgd_eps)
        if bool(torch.isfinite(pgd_eps[ok]).all()):
            break
    both = ok & torch.isfinite(pgd_eps)
    assert int(both.sum()) >= 0.9 * int((res.clean_pred == y).sum())
    assert float(res.distance[both].median()) <= 1.1 * float(pgd_eps[both].median())


# ------------------------------------------------------------------------------------------------------ l0
def test_cw_l0_contract_and_strength_on_digits(digits_model) -> None:
    model, x, y = digits_model
    res = CarliniWagnerL0(**FAST_L0)(model, x, y, threat=L0)
    _check_contract(model, x, y, res, "l0")
    ok = res.success & (res.clean_pred == y)
    # C&W-l2 changes almost every feature; the l0 scheme keeps only a few of them
    l2 = CarliniWagnerL2(binary_search_steps=5, steps=200, lr=0.1, initial_const=1.0)
    res_l2 = l2(model, x, y, threat=LpBall("l2", math.inf))
    l2_support = lp_norm((res_l2.x_adv - x).flatten(1), "l0")
    both_l2 = ok & res_l2.success
    assert float(res.distance[both_l2].median()) <= 0.25 * float(l2_support[both_l2].median())
    # and it is at least about as sparse as JSMA on the samples both break
    jsma = JSMA()(model, x, y, threat=L0)
    both = ok & jsma.success
    assert int(both.sum()) >= 0.6 * x.shape[0]
    assert float(res.distance[both].median()) <= 1.5 * float(jsma.distance[both].median())


def test_removal_drops_the_lowest_contributions() -> None:
    # contributions |g_i · δ_i| of 8 allowed features (feature 6 already removed, feature 7 unchanged)
    g = torch.tensor([[1.0, -2.0, 0.5, 4.0, -1.0, 3.0, 0.0, 5.0]])
    delta = torch.tensor([[0.5, 0.001, -0.002, 0.25, 0.004, -1.0, 0.9, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 0.0, 1.0]])
    # contributions: 0.5, 0.002, 0.001, 1.0, 0.004, 3.0, (removed), 0.0; 6 features changed -> cap ceil(0.3·√6) = 1
    out = _remove_features(mask, g, delta, threshold=0.01, changed_tol=1e-4)
    torch.testing.assert_close(out, torch.tensor([[1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 0.0, 0.0]]))
    # with more changed features the cap grows: the 4 smallest (0, 0.001, 0.002, 0.004) go, in order, then stop
    wide_g, wide_delta, wide_mask = g.repeat(1, 25), delta.repeat(1, 25), mask.repeat(1, 25)
    wide_g[:, 8:], wide_delta[:, 8:], wide_mask[:, 8:] = 1.0, 1.0, 1.0  # 192 allowed features contributing 1
    # now 198 features changed -> cap ceil(0.3·√198) = 5
    out = _remove_features(wide_mask, wide_g, wide_delta, threshold=0.01, changed_tol=1e-4)
    expected = wide_mask.clone()
    expected[0, [7, 2, 1, 4, 0]] = 0.0  # 0, 0.001, 0.002, 0.004 (<= threshold), then 0.5 goes too and the cap binds
    torch.testing.assert_close(out, expected)
    # a contribution above the threshold stops the removal right after it
    out = _remove_features(wide_mask, wide_g, wide_delta, threshold=0.0015, changed_tol=1e-4)
    expected = wide_mask.clone()
    expected[0, [7, 2, 1]] = 0.0  # 0.0 and 0.001 are <= 0.0015, so the next (0.002) goes, and then removal stops
    torch.testing.assert_close(out, expected)


# ------------------------------------------------------------------------------------------------- registry, bad input
def test_both_are_registered_minimal_attacks() -> None:
    assert ATTACKS["cw-linf"] is CarliniWagnerLinf and CarliniWagnerLinf.minimal
    assert ATTACKS["cw-l0"] is CarliniWagnerL0 and CarliniWagnerL0.minimal


@pytest.mark.parametrize(
    ("cls", "options"),
    [
        (CarliniWagnerLinf, {"steps": 0}),
        (CarliniWagnerLinf, {"lr": 0.0}),
        (CarliniWagnerLinf, {"initial_const": -1.0}),
        (CarliniWagnerLinf, {"largest_const": 1e-6}),
        (CarliniWagnerLinf, {"decrease_factor": 1.0}),
        (CarliniWagnerLinf, {"initial_tau": math.inf}),
        (CarliniWagnerLinf, {"min_tau": 0.0}),
        (CarliniWagnerLinf, {"confidence": math.nan}),
        (CarliniWagnerL0, {"steps": 2.5}),
        (CarliniWagnerL0, {"initial_const": 0.0}),
        (CarliniWagnerL0, {"largest_const": 1e-4}),
        (CarliniWagnerL0, {"threshold": -0.1}),
        (CarliniWagnerL0, {"abort_early": "yes"}),
    ],
    ids=repr,
)
def test_bad_hyperparameters_are_named(cls: type, options: dict[str, object]) -> None:
    with pytest.raises(InputError, match=next(iter(options))):
        cls(**options)


@pytest.mark.parametrize(("attack", "norm"), [(CarliniWagnerLinf(steps=2), "l2"), (CarliniWagnerL0(steps=2), "linf")])
def test_other_norms_are_refused(attack: CarliniWagnerLinf | CarliniWagnerL0, norm: str) -> None:
    model = nn.Linear(4, 3).double()
    x, y = torch.rand(2, 4, dtype=torch.float64), torch.zeros(2, dtype=torch.long)
    with pytest.raises(InputError, match="supports the norms"):
        attack(model, x, y, threat=LpBall(norm, math.inf))
