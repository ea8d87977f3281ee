"""L-BFGS (Szegedy et al.): targeted success re-verified, near-exact on affine models, the search over c, bad input."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from bastion.attacks import ATTACKS
from bastion.attacks.lbfgs import LBFGS, most_likely_wrong_class, update_consts_largest
from bastion.errors import InputError
from bastion.threat import LpBall

L2 = LpBall("l2", math.inf)
FAST = {"binary_search_steps": 6, "max_iter": 50}


@pytest.fixture(scope="module")
def digits_model(
    digits_mlp64: tuple[nn.Module, torch.Tensor, torch.Tensor],
) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """The shared digits MLP (tests/conftest.py) and its first 48 held-out test images."""
    model, x, y = digits_mlp64
    return model, x[:48], y[:48]


def _linear_model(w: torch.Tensor, b: torch.Tensor) -> nn.Module:
    lin = nn.Linear(w.shape[1], w.shape[0]).double()
    with torch.no_grad():
        lin.weight.copy_(w)
        lin.bias.copy_(b)
    return lin


def test_targeted_success_reverified(digits_model) -> None:
    model, x, y = digits_model
    targets = (y + 3) % 10
    res = LBFGS(**FAST)(model, x, y, threat=L2, targets=targets)
    assert res.x_adv.shape == x.shape and res.x_adv.dtype == x.dtype
    assert bool(L2.in_domain(res.x_adv).all())
    with torch.no_grad():
        pred = model(res.x_adv).argmax(dim=1)
    torch.testing.assert_close(res.success, pred == targets)
    assert res.success_rate >= 0.9
    torch.testing.assert_close(res.distance[res.success], (res.x_adv - x).flatten(1).norm(dim=1)[res.success])
    assert bool(torch.isinf(res.distance[~res.success]).all())
    assert ATTACKS["lbfgs"] is LBFGS


def test_untargeted_aims_at_the_most_likely_wrong_class(digits_model) -> None:
    model, x, y = digits_model
    res = LBFGS(**FAST)(model, x, y, threat=L2)
    with torch.no_grad():
        clean_logits = model(x)
        pred = model(res.x_adv).argmax(dim=1)
    torch.testing.assert_close(res.success, pred != y)
    assert res.success_rate >= 0.9
    attacked = res.success & (clean_logits.argmax(dim=1) == y)
    runner_up = most_likely_wrong_class(clean_logits, y)
    torch.testing.assert_close(pred[attacked], runner_up[attacked])
    # the runner-up is the nearest target in most cases: smaller distances than for an arbitrary target
    other = LBFGS(**FAST)(model, x, y, threat=L2, targets=(runner_up + 1 + (runner_up + 1 == y).long()) % 10)
    ok = res.success & other.success
    assert float(res.distance[ok].median()) < float(other.distance[ok].median())


def test_most_likely_wrong_class() -> None:
    logits = torch.tensor([[3.0, 2.0, 1.0], [0.0, 5.0, 4.0], [1.0, 0.0, 2.0]])
    labels = torch.tensor([0, 2, 2])
    torch.testing.assert_close(most_likely_wrong_class(logits, labels), torch.tensor([1, 1, 0]))


def test_near_exact_on_a_two_class_affine_model() -> None:
    # For f(x) = Wx + b with two classes and a domain that never binds, the minimal l2 perturbation that reaches the
    # other class has length |margin| / ||w_1 - w_0||_2. The attack cannot beat it and should come within 5 %.
    g = torch.Generator().manual_seed(0)
    w = torch.randn(2, 20, generator=g, dtype=torch.float64)
    b = torch.randn(2, generator=g, dtype=torch.float64) * 0.1
    model = _linear_model(w, b)
    x = torch.rand(100, 20, generator=g, dtype=torch.float64) * 0.2 + 0.4
    with torch.no_grad():
        logits = model(x)
    y = logits.argmax(dim=1)
    exact = (logits[:, 0] - logits[:, 1]).abs() / (w[1] - w[0]).norm()
    res = LBFGS()(model, x, y, threat=LpBall("l2", math.inf, domain=(-100.0, 100.0)), targets=1 - y)
    assert bool(res.success.all())
    ratio = res.distance / exact
    assert bool((ratio >= 1 - 1e-6).all())
    assert float(ratio.max()) < 1.05


def test_search_for_the_largest_successful_c() -> None:
    inf = math.inf
    const = torch.tensor([1.0, 1.0, 1.0, 4.0], dtype=torch.float64)
    lower = torch.tensor([0.0, 0.0, 0.25, 1.0], dtype=torch.float64)
    upper = torch.tensor([inf, inf, inf, 16.0], dtype=torch.float64)
    success = torch.tensor([True, False, True, False])
    c, lo, up = update_consts_largest(const, lower, upper, success)
    torch.testing.assert_close(lo, torch.tensor([1.0, 0.0, 1.0, 1.0], dtype=torch.float64))
    torch.testing.assert_close(up, torch.tensor([inf, 1.0, inf, 4.0], dtype=torch.float64))
    # success with no failure yet: x10; failure with no success yet: /10; both bounds set: geometric midpoint
    torch.testing.assert_close(c, torch.tensor([10.0, 0.1, 10.0, 2.0], dtype=torch.float64))


@pytest.mark.parametrize(
    "kwargs",
    [
        {"binary_search_steps": 0},
        {"max_iter": -3},
        {"max_iter": 1.5},
        {"initial_const": 0.0},
        {"initial_const": math.nan},
        {"initial_const": True},
    ],
    ids=repr,
)
def test_bad_hyperparameters_are_named(kwargs) -> None:
    with pytest.raises(InputError):
        LBFGS(**kwargs)


def test_bad_input(digits_model) -> None:
    model, x, y = digits_model
    attack = LBFGS(**FAST)
    with pytest.raises(InputError, match="norms"):
        attack(model, x[:4], y[:4], threat=LpBall("l1", math.inf))
    bad = x[:4].clone()
    bad[0, 0, 0, 0] = math.nan
    with pytest.raises(InputError):
        attack(model, bad, y[:4], threat=L2)
    with pytest.raises(InputError):
        attack(model, x[:4], y[:4], threat=L2, targets=torch.tensor([1, 2]))
    with pytest.raises(InputError):
        attack(model, x[:4], y[:4], threat=L2, targets=torch.tensor([1, 2, 3, 10]))
