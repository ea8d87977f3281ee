"""FAB and FAB-T: the hyperplane ∩ box projection against SciPy, exact on affine classifiers, near-minimal on the
digits MLP (against a PGD eps search), results re-verified, bad input named."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.optimize import linprog, minimize
from torch import nn

from bastion.attacks import PGD
from bastion.attacks.base import ATTACKS
from bastion.attacks.fab import FAB, FABT, project_hyperplane_box
from bastion.errors import InputError
from bastion.threat import LpBall, lp_norm

DUAL = {"l2": 2.0, "linf": 1.0, "l1": math.inf}
WIDE = (-100.0, 100.0)  # a domain so wide that the box never binds: the closed forms hold


@pytest.fixture(scope="module")
def digits_model(
    digits_mlp64: tuple[nn.Module, torch.Tensor, torch.Tensor],
) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """The shared digits MLP (tests/conftest.py) and its first 32 held-out test images."""
    model, x, y = digits_mlp64
    return model, x[:32], y[:32]


@pytest.fixture(scope="module")
def fab_linf(digits_model):
    model, x, y = digits_model
    return FAB()(model, x, y, threat=LpBall("linf", math.inf))


def _linear_model(w: torch.Tensor, b: torch.Tensor) -> nn.Module:
    lin = nn.Linear(w.shape[1], w.shape[0]).double()
    with torch.no_grad():
        lin.weight.copy_(w)
        lin.bias.copy_(b)
    return lin


# ------------------------------------------------------------------------------------------- the projection
def _scipy_projection_norm(x: np.ndarray, w: np.ndarray, r: float, norm: str) -> float:
    """min ||d||_p s.t. w·d = r, 0 <= x + d <= 1, solved by SciPy (LP for l1/l∞, SLSQP for l2)."""
    dim = x.shape[0]
    lb, ub = -x, 1.0 - x
    if norm == "l2":
        sol = minimize(
            lambda v: v @ v,
            np.zeros(dim),
            jac=lambda v: 2 * v,
            bounds=list(zip(lb, ub)),
            constraints=[{"type": "eq", "fun": lambda v: w @ v - r, "jac": lambda v: w}],
            method="SLSQP",
            options={"ftol": 1e-15, "maxiter": 1000},
        )
        assert sol.success
        return float(np.linalg.norm(sol.x))
    if norm == "l1":  # d = p - m with p, m >= 0
        sol = linprog(
            np.ones(2 * dim),
            A_eq=np.concatenate([w, -w])[None],
            b_eq=[r],
            bounds=[(0, u) for u in ub] + [(0, -lo) for lo in lb],
            method="highs",
        )
    else:  # variables (d, τ): min τ with -τ <= d_i <= τ
        eye, ones = np.eye(dim), np.ones((dim, 1))
        sol = linprog(
            np.r_[np.zeros(dim), 1.0],
            A_ub=np.block([[eye, -ones], [-eye, -ones]]),
            b_ub=np.zeros(2 * dim),
            A_eq=np.r_[w, 0.0][None],
            b_eq=[r],
            bounds=[*zip(lb, ub), (0, None)],
            method="highs",
        )
    assert sol.status == 0
    return float(sol.fun)


@pytest.mark.parametrize("norm", ["linf", "l2", "l1"])
def test_projection_matches_scipy(norm: str) -> None:
    rng = np.random.default_rng(1)
    n, dim = 30, 6
    x = rng.uniform(0, 1, (n, dim))
    w = rng.normal(size=(n, dim))
    w[::4, 0] = 0.0  # coordinates that cannot help
    x[1::3, 1] = 1.0  # coordinates already at the box
    # the hyperplane through a random box point: feasible, and often far enough for the box to bind
    c = (w * rng.uniform(0, 1, (n, dim))).sum(axis=1)
    d = project_hyperplane_box(torch.tensor(x), torch.tensor(w), torch.tensor(c), norm, 0.0, 1.0)
    z = (torch.tensor(x) + d).numpy()
    assert np.all(z >= -1e-12) and np.all(z <= 1 + 1e-12)
    np.testing.assert_allclose((w * z).sum(axis=1), c, atol=1e-9)
    got = lp_norm(d, norm).numpy()
    ref = np.array([_scipy_projection_norm(x[i], w[i], c[i] - w[i] @ x[i], norm) for i in range(n)])
    np.testing.assert_allclose(got, ref, atol=1e-6, rtol=0)
    # some instances are decided by the box: the unconstrained projection is shorter there
    free = np.abs(c - (w * x).sum(axis=1)) / np.linalg.norm(w, ord={"linf": 1, "l2": 2, "l1": np.inf}[norm], axis=1)
    assert np.sum(ref > free + 1e-6) >= 3


def test_projection_goes_to_the_nearest_corner_when_the_box_misses_the_hyperplane() -> None:
    x = torch.tensor([[0.5, 0.5, 0.5]], dtype=torch.float64)
    w = torch.tensor([[1.0, -2.0, 0.0]], dtype=torch.float64)
    for norm in ("linf", "l2", "l1"):
        d = project_hyperplane_box(x, w, torch.tensor([10.0], dtype=torch.float64), norm, 0.0, 1.0)
        torch.testing.assert_close(x + d, torch.tensor([[1.0, 0.0, 0.5]], dtype=torch.float64))


# ------------------------------------------------------------------------------------------- known answers
@pytest.mark.parametrize("attack", [FAB(), FABT()], ids=repr)
@pytest.mark.parametrize("norm", ["l2", "linf", "l1"])
def test_exact_on_an_affine_classifier(norm: str, attack: FAB) -> None:
    g = torch.Generator().manual_seed(0)
    classes, dim, n = 3, 20, 60
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
    margin = logits.gather(1, y[:, None]) - logits
    wd = (w[y][:, None, :] - w[None, :, :]).norm(p=DUAL[norm], dim=2)
    ratio = torch.where(torch.arange(classes)[None, :] == y[:, None], math.inf, margin / wd)
    exact, nearest = ratio.min(dim=1)
    runner_up = logits.scatter(1, y[:, None], -math.inf).argmax(dim=1)
    assert bool((nearest != runner_up).any())  # the test is not trivial

    res = attack(model, x, y, threat=LpBall(norm, math.inf, domain=WIDE))
    assert bool(res.success.all())
    assert bool((res.distance >= exact * (1 - 1e-9)).all())  # nothing beats the exact minimum
    torch.testing.assert_close(res.distance, exact, rtol=0.01, atol=0.0)


# ------------------------------------------------------------------------------------------- digits MLP
@pytest.mark.parametrize("norm", ["l2", "l1"])
def test_contract_on_digits(digits_model, norm: str) -> None:
    model, x, y = digits_model
    res = FAB()(model, x, y, threat=LpBall(norm, math.inf))
    _check_contract(model, x, y, res, norm)
    assert res.success_rate > 0.9


def test_linf_contract_and_beats_pgd_eps_search(digits_model, fab_linf) -> None:
    model, x, y = digits_model
    _check_contract(model, x, y, fab_linf, "linf")
    assert fab_linf.success_rate > 0.9
    # the smallest eps of a fine grid (ratio 1.05) at which PGD-l∞ (20 steps) breaks each sample
    pgd_eps = torch.full((x.shape[0],), math.inf)
    for eps in [0.01 * 1.05**i for i in range(95)]:
        todo = torch.isinf(pgd_eps).nonzero().squeeze(1)
        if todo.numel() == 0:
            break
        r = PGD(steps=20, rel_stepsize=0.25)(model, x[todo], y[todo], threat=LpBall("linf", eps))
        pgd_eps[todo[r.success]] = eps
    both = fab_linf.success & torch.isfinite(pgd_eps)
    assert int(both.sum()) >= 0.8 * x.shape[0]
    fab_d, pgd_d = fab_linf.distance[both], pgd_eps[both]
    assert float(fab_d.median()) <= 1.1 * float(pgd_d.median())
    assert float((fab_d <= 1.1 * pgd_d).float().mean()) >= 0.75


def test_fab_t_at_least_as_good_as_fab(digits_model, fab_linf) -> None:
    model, x, y = digits_model
    res = FABT()(model, x, y, threat=LpBall("linf", math.inf))
    _check_contract(model, x, y, res, "linf")
    assert res.success_rate >= fab_linf.success_rate
    assert float(res.distance[res.success].median()) <= 1.05 * float(fab_linf.distance[fab_linf.success].median())
    # one backward pass per step and target instead of one per class
    assert res.grad_calls < 10 * fab_linf.grad_calls


def test_explicit_targets_and_restarts(digits_model) -> None:
    model, x, y = digits_model
    x, y = x[:12], y[:12]
    targets = (y + 1) % 10
    threat = LpBall("l2", 3.0)
    res = FABT(steps=40)(model, x, y, threat=threat, targets=targets)
    with torch.no_grad():
        pred = model(res.x_adv).argmax(dim=1)
    torch.testing.assert_close(res.success, pred == targets)
    assert res.success_rate > 0.8
    # with a finite eps, later targets are tried only on samples not yet broken within eps
    cascade = FABT(steps=30)(model, x, y, threat=LpBall("linf", 0.1))
    _check_contract(model, x, y, cascade, "linf")
    assert bool((cascade.distance <= 0.1).any()) and bool((cascade.distance > 0.1).any())
    # the first run starts at x deterministically: restarts can only shorten the distances
    one = FAB(steps=40)(model, x, y, threat=threat, seed=1)
    three = FAB(steps=40, restarts=3)(model, x, y, threat=threat, seed=1)
    assert bool((three.distance <= one.distance).all())
    assert bool((three.distance < one.distance * (1 - 1e-4)).any())


def _check_contract(model: nn.Module, x: torch.Tensor, y: torch.Tensor, res, norm: str) -> None:
    with torch.no_grad():
        pred = model(res.x_adv).argmax(dim=1)
    torch.testing.assert_close(res.success, pred != y)  # success re-verified by prediction
    assert float(res.x_adv.min()) >= 0.0 and float(res.x_adv.max()) <= 1.0
    dist = lp_norm((res.x_adv - x).reshape(x.shape[0], -1), norm)
    torch.testing.assert_close(res.distance[res.success], dist[res.success])
    assert bool(torch.isinf(res.distance[~res.success]).all())


# ------------------------------------------------------------------------------------------- bad input
def test_bad_input(digits_model) -> None:
    model, x, y = digits_model
    with pytest.raises(InputError, match="norms"):
        FAB()(model, x[:2], y[:2], threat=LpBall("l0", 3))
    with pytest.raises(InputError, match="norms"):
        FABT()(model, x[:2], y[:2], threat=LpBall("l0", 3))
    for bad in ({"alpha_max": 1.5}, {"eta": 0.5}, {"beta": 0.0}, {"steps": 0}, {"rel_init": -1.0}, {"eta": math.inf}):
        with pytest.raises(InputError):
            FAB(**bad)  # type: ignore[arg-type]
    with pytest.raises(InputError):
        FABT(n_target_classes=0)
    with pytest.raises(InputError, match="norm"):
        project_hyperplane_box(x[:1].reshape(1, -1), x[:1].reshape(1, -1), torch.zeros(1), "l0", 0.0, 1.0)
    assert ATTACKS["fab"] is FAB and ATTACKS["fab-t"] is FABT


# ------------------------------------------------------------------------------------- batched targets
@pytest.mark.parametrize("early_stop", [False, True])
@pytest.mark.parametrize("threat", [LpBall("linf", 0.06), LpBall("l2", 0.4)], ids=lambda t: t.key)
def test_batched_targets_break_the_same_samples_as_the_sequential_order(digits_model, threat, early_stop) -> None:
    import copy

    model, x, y = digits_model
    model, x = copy.deepcopy(model).double().eval(), x.double()  # float64: no batch-size rounding effects
    opts = {"steps": 5, "n_target_classes": 5, "early_stop": early_stop}
    seq = FABT(batch_targets=False, **opts)(model, x, y, threat=threat)
    bat = FABT(batch_targets=True, max_rows=40, **opts)(model, x, y, threat=threat)  # chunks of 8 samples
    within = lambda r: r.distance <= threat.eps  # noqa: E731
    torch.testing.assert_close(within(bat), within(seq))
    assert 0 < int(within(seq).sum()) < x.shape[0]
    first = FABT(batch_targets=False, **{**opts, "n_target_classes": 1})(model, x, y, threat=threat)
    assert int(within(seq).sum()) > int(within(first).sum())  # later targets matter here
    if not early_stop:
        # every target ran on every sample: never farther than the sequential order's closest point
        assert bool((bat.distance <= seq.distance * (1 + 1e-6) + 1e-9).all())


def test_early_stop_spends_less_and_breaks_the_same_samples(digits_model) -> None:
    model, x, y = digits_model
    threat = LpBall("linf", 0.1)
    full = FABT(steps=30, n_target_classes=5)(model, x, y, threat=threat)
    early = FABT(steps=30, n_target_classes=5, early_stop=True)(model, x, y, threat=threat)
    torch.testing.assert_close(early.distance <= 0.1, full.distance <= 0.1)
    assert early.grad_calls < full.grad_calls
    with pytest.raises(InputError, match="early_stop"):
        FABT(early_stop="yes")  # type: ignore[arg-type]
