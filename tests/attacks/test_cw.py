"""Carlini & Wagner l2: exact on a binary affine classifier, at least as strong as DeepFool, κ and targets honoured."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from bastion.attacks import ATTACKS
from bastion.attacks.cw import CarliniWagnerL2
from bastion.attacks.deepfool import DeepFool
from bastion.errors import InputError
from bastion.results import AttackResult
from bastion.threat import LpBall, lp_norm

L2 = LpBall("l2", math.inf)
# Most digit pixels sit exactly at 0, the flat end of tanh, where Adam needs many steps of lr 1e-2 to move them
# (the paper runs up to 10000); a larger step reaches the same distances in the few hundred steps a test affords.
FAST = {"binary_search_steps": 5, "steps": 200, "lr": 0.1, "initial_const": 1.0}


@pytest.fixture(scope="module")
def digits_model(
    digits_mlp64: tuple[nn.Module, torch.Tensor, torch.Tensor],
) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """The shared digits MLP (tests/conftest.py) and its first 48 held-out test images."""
    model, x, y = digits_mlp64
    return model, x[:48], y[:48]


@pytest.fixture(scope="module")
def cw_digits(digits_model) -> AttackResult:
    model, x, y = digits_model
    return CarliniWagnerL2(**FAST)(model, x, y, threat=L2)


def _linear_model(w: torch.Tensor, b: torch.Tensor) -> nn.Module:
    lin = nn.Linear(w.shape[1], w.shape[0]).double()
    with torch.no_grad():
        lin.weight.copy_(w)
        lin.bias.copy_(b)
    return lin


def _margin(logits: torch.Tensor, cls: torch.Tensor) -> torch.Tensor:
    """``z_cls - max_{i != cls} z_i`` per row."""
    other = logits.scatter(1, cls[:, None], -math.inf).amax(dim=1)
    return logits.gather(1, cls[:, None]).squeeze(1) - other


def test_cw_l2_is_exact_on_a_binary_affine_classifier() -> None:
    # Two classes: the C&W objective is convex and its minimiser over large enough c is the nearest boundary point,
    # at distance (f_y - f_other) / ||w_y - w_other||_2. The domain is wide enough never to bind.
    g = torch.Generator().manual_seed(0)
    w, b = torch.randn(2, 20, generator=g, dtype=torch.float64), torch.randn(2, generator=g, dtype=torch.float64)
    model = _linear_model(w, b * 0.1)
    x = torch.rand(200, 20, generator=g, dtype=torch.float64)
    with torch.no_grad():
        logits = model(x)
    y = logits.argmax(dim=1)
    exact = _margin(logits, y) / (w[1] - w[0]).norm()
    keep = (exact > 0.1).nonzero().squeeze(1)[:24]  # relative accuracy is meaningless on points at the boundary
    x, y, exact = x[keep], y[keep], exact[keep]
    attack = CarliniWagnerL2(binary_search_steps=5, steps=200, lr=3e-3, initial_const=1.0)
    res = attack(model, x, y, threat=LpBall("l2", math.inf, domain=(-1.0, 2.0)))
    assert bool(res.success.all())
    assert bool((res.distance >= exact * (1 - 1e-9)).all())  # nothing beats the minimal distance
    assert bool((res.distance <= exact * 1.01).all())  # and C&W gets within 1 % of it


def test_cw_contract_and_strength_on_digits(digits_model, cw_digits: AttackResult) -> None:
    model, x, y = digits_model
    res = cw_digits
    assert res.x_adv.shape == x.shape and res.x_adv.dtype == x.dtype
    assert bool(L2.in_domain(res.x_adv).all())
    with torch.no_grad():
        pred = model(res.x_adv).argmax(dim=1)
    torch.testing.assert_close(res.success, pred != y)  # success re-verified by prediction
    torch.testing.assert_close(res.distance[res.success], lp_norm((res.x_adv - x).flatten(1), "l2")[res.success])
    assert bool(torch.isinf(res.distance[~res.success]).all())
    assert res.success_rate >= 0.95
    # C&W is the stronger minimal-l2 attack: its median distance is at most DeepFool's (5 % slack)
    df = DeepFool()(model, x, y, threat=L2)
    both = res.success & df.success & (res.clean_pred == y)
    assert int(both.sum()) >= 0.9 * int((res.clean_pred == y).sum())
    assert float(res.distance[both].median()) <= 1.05 * float(df.distance[both].median())


def test_confidence_gives_a_margin(digits_model, cw_digits: AttackResult) -> None:
    model, x, y = digits_model
    kappa = 2.0
    res = CarliniWagnerL2(**FAST, confidence=kappa)(model, x, y, threat=L2)
    ok = res.success & (res.clean_pred == y)
    assert float(ok.double().mean()) >= 0.9
    with torch.no_grad():
        logits = model(res.x_adv)
    assert bool((-_margin(logits, y)[ok] >= kappa - 1e-5).all())  # the best other class wins by at least κ
    plain = cw_digits.success & ok
    assert float(res.distance[plain].median()) > float(cw_digits.distance[plain].median())  # a margin costs distance


def test_targeted_mode_reaches_the_targets(digits_model, cw_digits: AttackResult) -> None:
    model, x, y = digits_model
    targets = (y + 1) % 10
    res = CarliniWagnerL2(**FAST)(model, x, y, threat=L2, targets=targets)
    with torch.no_grad():
        pred = model(res.x_adv).argmax(dim=1)
    torch.testing.assert_close(res.success, pred == targets)
    assert res.success_rate >= 0.9
    # reaching one given class is harder than leaving the true one
    both = res.success & cw_digits.success & (res.clean_pred == y)
    assert float(res.distance[both].median()) > float(cw_digits.distance[both].median())


def test_abort_early_saves_work() -> None:
    g = torch.Generator().manual_seed(1)
    model = _linear_model(torch.randn(3, 10, generator=g, dtype=torch.float64), torch.zeros(3, dtype=torch.float64))
    x = torch.rand(16, 10, generator=g, dtype=torch.float64)
    with torch.no_grad():
        y = model(x).argmax(dim=1)
    threat = LpBall("l2", math.inf, domain=(-1.0, 2.0))
    eager = CarliniWagnerL2(binary_search_steps=2, steps=200, initial_const=1.0)(model, x, y, threat=threat)
    full = CarliniWagnerL2(binary_search_steps=2, steps=200, initial_const=1.0, abort_early=False)(
        model, x, y, threat=threat
    )
    assert full.grad_calls == 2 * 200 * 16
    assert eager.grad_calls < full.grad_calls
    assert ATTACKS["cw-l2"] is CarliniWagnerL2 and CarliniWagnerL2.minimal


# ------------------------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    "options",
    [
        {"binary_search_steps": 0},
        {"steps": 0},
        {"steps": 2.5},
        {"lr": 0.0},
        {"lr": -1e-2},
        {"initial_const": 0.0},
        {"initial_const": math.inf},
        {"confidence": -1.0},
        {"confidence": math.nan},
        {"abort_early": "yes"},
    ],
    ids=repr,
)
def test_bad_hyperparameters_are_named(options: dict[str, object]) -> None:
    with pytest.raises(InputError, match=next(iter(options))):
        CarliniWagnerL2(**options)  # type: ignore[arg-type]


def test_other_norms_are_refused() -> None:
    model = _linear_model(torch.randn(3, 4, dtype=torch.float64), torch.zeros(3, dtype=torch.float64))
    x, y = torch.rand(2, 4, dtype=torch.float64), torch.zeros(2, dtype=torch.long)
    with pytest.raises(InputError, match="supports the norms"):
        CarliniWagnerL2(steps=2)(model, x, y, threat=LpBall("linf", math.inf))


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cw_runs_on_cuda(digits_model, cw_digits: AttackResult) -> None:
    model, x, y = digits_model
    try:
        res = CarliniWagnerL2(**FAST)(model.to("cuda"), x, y, threat=L2)  # CPU inputs follow the model
        assert res.x_adv.device.type == "cuda"
        assert abs(res.success_rate - cw_digits.success_rate) <= 0.05
        ok = res.success.cpu() & cw_digits.success
        assert float(res.distance.cpu()[ok].median()) <= 1.05 * float(cw_digits.distance[ok].median())
    finally:
        model.to("cpu")
