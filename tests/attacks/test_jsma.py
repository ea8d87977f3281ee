"""JSMA: l0 budget respected, success re-verified, targets reached, pair search exact and memory-chunked."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from bastion.attacks import JSMA
from bastion.errors import InputError
from bastion.threat import LpBall


@pytest.fixture(scope="module")
def digits_model(
    digits_mlp64: tuple[nn.Module, torch.Tensor, torch.Tensor],
) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """The shared digits MLP (tests/conftest.py) and its first 64 held-out test images."""
    model, x, y = digits_mlp64
    return model, x[:64], y[:64]


def test_untargeted_jsma_changes_few_features(digits_model) -> None:
    model, x, y = digits_model
    threat = LpBall("l0", math.inf)
    res = JSMA()(model, x, y, threat=threat)
    with torch.no_grad():
        torch.testing.assert_close(res.success, model(res.x_adv).argmax(1) != y)
    changed = (res.x_adv != x).flatten(1).sum(1)
    assert bool((changed <= math.floor(0.145 * 64)).all())  # the paper's gamma of the 64 features
    assert res.success_rate > 0.6
    # changes only go up (theta = +1) and stay in the domain
    assert bool((res.x_adv >= x).all()) and bool(threat.in_domain(res.x_adv).all())


def test_targeted_jsma_reaches_targets_more_with_larger_budget(digits_model) -> None:
    model, x, y = digits_model
    targets = (y + 3) % 10
    small = JSMA(gamma=0.05)(model, x, y, threat=LpBall("l0", math.inf), targets=targets)
    large = JSMA(gamma=0.3)(model, x, y, threat=LpBall("l0", math.inf), targets=targets)
    with torch.no_grad():
        torch.testing.assert_close(large.success, model(large.x_adv).argmax(1) == targets)
    assert large.success_rate >= small.success_rate and large.success_rate > 0.5


def test_l0_eps_caps_the_budget(digits_model) -> None:
    model, x, y = digits_model
    res = JSMA()(model, x, y, threat=LpBall("l0", 4))
    assert bool(((res.x_adv != x).flatten(1).sum(1) <= 4).all())


def test_pair_search_is_exact_and_chunking_does_not_change_it() -> None:
    g = torch.Generator().manual_seed(0)
    alpha, beta = torch.randn(5, 12, generator=g), torch.randn(5, 12, generator=g)
    domain = torch.rand(5, 12, generator=g) > 0.2
    p, q, ok = JSMA()._best_pairs(alpha, beta, domain)
    for i in range(5):  # brute force over pairs
        best, arg = 0.0, None
        for a in range(12):
            for b in range(a + 1, 12):
                sa, sb = alpha[i, a] + alpha[i, b], beta[i, a] + beta[i, b]
                if domain[i, a] and domain[i, b] and sa > 0 and sb < 0 and float(sa * -sb) > best:
                    best, arg = float(sa * -sb), (a, b)
        assert bool(ok[i]) == (arg is not None)
        if arg is not None:
            assert (int(p[i]), int(q[i])) == arg
    p2, q2, ok2 = JSMA(max_pair_elements=100)._best_pairs(alpha, beta, domain)  # one sample per chunk
    assert torch.equal(p, p2) and torch.equal(q, q2) and torch.equal(ok, ok2)


def test_bad_arguments() -> None:
    for kwargs in ({"theta": 0.0}, {"gamma": 0.0}, {"output": "softmax"}, {"candidates": 1}):
        with pytest.raises(InputError):
            JSMA(**kwargs)
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 3))
    with pytest.raises(InputError, match="supports the norms"):
        JSMA()(model, torch.rand(2, 4), torch.tensor([0, 1]), threat=LpBall("linf", 0.1))


def test_stronger_than_random_features_and_candidates_path(digits_model) -> None:
    model, x, y = digits_model
    budget = math.floor(0.145 * 64)
    g = torch.Generator().manual_seed(0)
    chosen = torch.rand(x.shape[0], 64, generator=g).argsort(dim=1)[:, :budget]
    rand_x = x.flatten(1).scatter(1, chosen, 1.0).reshape(x.shape)
    with torch.no_grad():
        random_rate = float((model(rand_x).argmax(1) != y).float().mean())
    jsma = JSMA()(model, x, y, threat=LpBall("l0", math.inf))
    assert jsma.success_rate > random_rate + 0.3
    approx = JSMA(candidates=16)(model, x, y, threat=LpBall("l0", math.inf))
    assert approx.success_rate > random_rate + 0.2
