"""DeepFool: exact on affine classifiers, near-minimal on the digits MLP, results re-verified, bad input named."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from bastion.attacks import ATTACKS, PGD
from bastion.attacks.deepfool import DeepFool
from bastion.errors import InputError
from bastion.threat import LpBall, lp_norm

DUAL = {"l2": 2.0, "linf": 1.0}
WIDE = (-100.0, 100.0)  # a domain so wide that the box never binds: the closed forms hold


@pytest.fixture(scope="module")
def digits_model(
    digits_mlp64: tuple[nn.Module, torch.Tensor, torch.Tensor],
) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """The shared digits MLP (tests/conftest.py) and its first 128 held-out test images."""
    model, x, y = digits_mlp64
    return model, x[:128], y[:128]


def _linear_model(w: torch.Tensor, b: torch.Tensor) -> nn.Module:
    lin = nn.Linear(w.shape[1], w.shape[0]).double()
    with torch.no_grad():
        lin.weight.copy_(w)
        lin.bias.copy_(b)
    return lin


def _linear_problem(classes: int = 4, dim: int = 20, n: int = 200, seed: int = 0):
    """An affine classifier, inputs it classifies, their labels and the exact minimal distance for each dual norm."""
    g = torch.Generator().manual_seed(seed)
    # rows of very different lengths: the runner-up class by logit is often not the nearest boundary
    w = (
        torch.randn(classes, dim, generator=g, dtype=torch.float64)
        * torch.logspace(-1, 1, classes, dtype=torch.float64)[:, None]
    )
    b = torch.randn(classes, generator=g, dtype=torch.float64) * 0.1
    model = _linear_model(w, b)
    x = torch.rand(n, dim, generator=g, dtype=torch.float64)
    with torch.no_grad():
        logits = model(x)
    y = logits.argmax(dim=1)

    def exact(dual: float) -> torch.Tensor:
        # min_k (f_y - f_k) / ||w_y - w_k||_q: the distance to the nearest of the half-spaces {f_k >= f_y}
        margin = logits.gather(1, y[:, None]) - logits  # (n, K)
        wd = (w[y][:, None, :] - w[None, :, :]).norm(p=dual, dim=2)  # (n, K)
        ratio = torch.where(torch.arange(classes)[None, :] == y[:, None], math.inf, margin / wd)
        return ratio.min(dim=1).values

    return model, x, y, exact


@pytest.mark.parametrize("overshoot", [0.02, 1e-4])
@pytest.mark.parametrize("norm", ["l2", "linf"])
def test_deepfool_is_exact_on_an_affine_classifier(norm: str, overshoot: float) -> None:
    model, x, y, exact = _linear_problem()
    res = DeepFool(overshoot=overshoot)(model, x, y, threat=LpBall(norm, math.inf, domain=WIDE))
    assert bool(res.success.all())
    # the nearest linearised boundary is the true one: one step lands on it, the overshoot carries it across
    torch.testing.assert_close(res.distance, exact(DUAL[norm]) * (1 + overshoot), rtol=1e-6, atol=0.0)
    assert res.grad_calls == 2 * x.shape[0] * 3  # two linearisations, one iteration, one gradient per other class
    # the l2 step is along w_k - w_y; the l∞ step moves every feature by the same amount
    delta = (res.x_adv - x).abs()
    if norm == "linf":
        torch.testing.assert_close(delta.amin(dim=1), delta.amax(dim=1))


def test_candidates_restrict_the_classes_considered() -> None:
    model, x, y, exact = _linear_problem(classes=6)
    threat = LpBall("l2", math.inf, domain=WIDE)
    full = DeepFool()(model, x, y, threat=threat)
    top2 = DeepFool(candidates=2)(model, x, y, threat=threat)
    assert bool(top2.success.all())
    assert top2.grad_calls == 2 * x.shape[0]  # only the runner-up class: one gradient per sample and linearisation
    assert full.grad_calls == 2 * x.shape[0] * 5
    torch.testing.assert_close(full.distance, exact(2.0) * 1.02, rtol=1e-6, atol=0.0)
    # restricting the classes can only miss the nearest boundary: never closer than the exact distance
    assert bool((top2.distance >= full.distance * (1 - 1e-9)).all())
    assert bool((top2.distance > full.distance * (1 + 1e-6)).any())  # and on this problem it does miss some


@pytest.mark.parametrize("norm", ["l2", "linf"])
def test_deepfool_contract_on_digits(digits_model, norm: str) -> None:
    model, x, y = digits_model
    threat = LpBall(norm, math.inf)
    res = DeepFool()(model, x, y, threat=threat)
    assert res.x_adv.shape == x.shape and res.x_adv.dtype == x.dtype
    assert bool(threat.in_domain(res.x_adv).all())
    with torch.no_grad():
        pred = model(res.x_adv).argmax(dim=1)
        clean = model(x).argmax(dim=1)
    torch.testing.assert_close(res.success, pred != y)  # success re-verified by prediction
    # distances in the threat's norm, finite exactly where successful, 0 for clean misclassifications
    torch.testing.assert_close(res.distance[res.success], lp_norm((res.x_adv - x).flatten(1), norm)[res.success])
    assert bool(torch.isinf(res.distance[~res.success]).all())
    assert bool((res.distance[clean != y] == 0).all())
    # linearising inside the box keeps iterates from stalling on clipped features: (almost) every sample breaks
    assert res.success_rate >= 0.95


def test_best_of_both_linearisations_is_never_longer(digits_model) -> None:
    model, x, y = digits_model
    threat = LpBall("l2", math.inf)
    runs = {box: DeepFool(box=box)(model, x, y, threat=threat) for box in ("best", "ignore", "mask")}
    best = runs["best"].distance
    assert bool((best <= torch.minimum(runs["ignore"].distance, runs["mask"].distance) * (1 + 1e-6)).all())
    # the paper's linearisation stalls on some digits, the box-aware one is longer on others: both matter
    assert runs["ignore"].success_rate < runs["best"].success_rate
    assert bool((runs["mask"].distance > best * 1.01).any())
    with pytest.raises(InputError, match="box"):
        DeepFool(box="clip")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "norm,grid",
    [("l2", [0.3 + 0.05 * i for i in range(13)]), ("linf", [0.06 + 0.005 * i for i in range(21)])],
    ids=["l2", "linf"],
)
def test_deepfool_is_near_minimal_on_digits(digits_model, norm: str, grid: list[float]) -> None:
    # For each sample, the smallest eps of the grid at which PGD (a strong fixed-eps attack) breaks it; DeepFool's
    # median distance must not exceed the median of those (PGD's own radii are rounded up to the grid).
    model, x, y = digits_model
    res = DeepFool()(model, x, y, threat=LpBall(norm, math.inf))
    ok = res.clean_pred == y
    smallest = torch.full((x.shape[0],), math.inf)
    for eps in reversed(grid):
        pgd = PGD(steps=40, rel_stepsize=0.1)(model, x, y, threat=LpBall(norm, eps))
        smallest[pgd.success] = eps
    assert math.isfinite(float(smallest[ok].median()))  # the grid reaches the median: the comparison is not vacuous
    assert float(res.distance[ok].median()) <= float(smallest[ok].median())


def test_more_overshoot_costs_distance_not_success(digits_model) -> None:
    model, x, y = digits_model
    threat = LpBall("l2", math.inf)
    small = DeepFool(overshoot=0.02)(model, x, y, threat=threat)
    large = DeepFool(overshoot=0.5)(model, x, y, threat=threat)
    assert large.success_rate >= small.success_rate
    both = small.success & large.success & (small.clean_pred == y)
    assert float(large.distance[both].median()) > float(small.distance[both].median())


def test_float64_stays_float64_and_attack_is_registered() -> None:
    model, x, y, _ = _linear_problem(n=8)
    res = DeepFool()(model, x, y, threat=LpBall("l2", math.inf, domain=WIDE))
    assert res.x_adv.dtype == torch.float64
    assert ATTACKS["deepfool"] is DeepFool and DeepFool.minimal


# ------------------------------------------------------------------------------------------------- bad input
def test_bad_input_is_named() -> None:
    model, x, y, _ = _linear_problem(n=8)
    with pytest.raises(InputError, match="untargeted"):
        DeepFool()(model, x, y, threat=LpBall("l2", math.inf, domain=WIDE), targets=(y + 1) % 4)
    with pytest.raises(InputError, match="supports the norms"):
        DeepFool()(model, x, y, threat=LpBall("l1", math.inf, domain=WIDE))
    with pytest.raises(InputError, match="steps"):
        DeepFool(steps=0)
    with pytest.raises(InputError, match="overshoot"):
        DeepFool(overshoot=-0.1)
    with pytest.raises(InputError, match="overshoot"):
        DeepFool(overshoot=float("nan"))
    with pytest.raises(InputError, match="candidates"):
        DeepFool(candidates=1)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_deepfool_runs_on_cuda(digits_model) -> None:
    model, x, y = digits_model
    cpu_res = DeepFool()(model, x, y, threat=LpBall("l2", math.inf))
    try:
        res = DeepFool()(model.to("cuda"), x, y, threat=LpBall("l2", math.inf))  # CPU inputs follow the model
        assert res.x_adv.device.type == "cuda"
        assert abs(res.success_rate - cpu_res.success_rate) <= 0.02
    finally:
        model.to("cpu")
