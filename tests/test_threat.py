"""Threat-model geometry: projections against independent references, sampling, steps, membership, errors."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

from bastion.errors import InputError
from bastion.threat import FlowThreat, LpBall, ThreatModel, canonical_norm, warp


def _bisect_l2(y: np.ndarray, x: np.ndarray, eps: float, lo: float, hi: float) -> np.ndarray:
    """Reference l2 ∩ box projection by bisection on the KKT multiplier (a different method from the library's)."""

    def point(lam: float) -> np.ndarray:
        return np.clip((y + lam * x) / (1 + lam), lo, hi)

    if np.linalg.norm(point(0.0) - x) <= eps:
        return point(0.0)
    a, b = 0.0, 1.0
    while np.linalg.norm(point(b) - x) > eps:
        b *= 2
    for _ in range(200):
        m = 0.5 * (a + b)
        a, b = (m, b) if np.linalg.norm(point(m) - x) > eps else (a, m)
    return point(b)


def _bisect_l1(y: np.ndarray, x: np.ndarray, eps: float, lo: float, hi: float) -> np.ndarray:
    """Reference l1 ∩ box projection: bisection on the soft-threshold λ of the separable KKT solution."""
    d = y - x

    def point(lam: float) -> np.ndarray:
        return np.clip(x + np.sign(d) * np.maximum(np.abs(d) - lam, 0.0), lo, hi)

    if np.abs(point(0.0) - x).sum() <= eps:
        return point(0.0)
    a, b = 0.0, float(np.abs(d).max())
    for _ in range(200):
        m = 0.5 * (a + b)
        a, b = (m, b) if np.abs(point(m) - x).sum() > eps else (a, m)
    return point(b)


def _brute_l0(y: np.ndarray, x: np.ndarray, k: int, lo: float, hi: float) -> float:
    """Smallest squared distance from y over every support of size <= k (exhaustive)."""
    best = math.inf
    for size in range(k + 1):
        for support in itertools.combinations(range(len(x)), size):
            z = x.copy()
            idx = list(support)
            z[idx] = np.clip(y[idx], lo, hi)
            best = min(best, float(((z - y) ** 2).sum()))
    return best


@pytest.mark.parametrize("norm", ["l2", "l1"])
@pytest.mark.parametrize("domain", [(0.0, 1.0), (-1.0, 2.0)])
def test_projection_matches_independent_reference(norm: str, domain: tuple[float, float]) -> None:
    rng = np.random.default_rng(0)
    ref = _bisect_l2 if norm == "l2" else _bisect_l1
    lo, hi = domain
    for trial in range(60):
        dim = int(rng.integers(1, 12))
        eps = float(rng.choice([0.05, 0.3, 1.0, 3.0]))
        x = rng.uniform(lo, hi, size=dim)
        x[rng.random(dim) < 0.2] = lo  # inputs on the box boundary are common (black pixels)
        y = x + rng.normal(scale=float(rng.choice([0.1, 1.0, 5.0])), size=dim)
        threat = LpBall(norm, eps, domain=domain)
        got = threat.project(torch.tensor(y)[None], torch.tensor(x)[None])[0].numpy()
        want = ref(y, x, eps, lo, hi)
        np.testing.assert_allclose(got, want, atol=1e-7, err_msg=f"trial {trial}")
        assert bool(threat.contains(torch.tensor(got)[None], torch.tensor(x)[None]))


def test_linf_projection_is_coordinatewise_clip() -> None:
    g = torch.Generator().manual_seed(1)
    x = torch.rand(16, 3, 5, 5, generator=g)
    y = x + torch.randn(16, 3, 5, 5, generator=g)
    threat = LpBall("linf", 0.1)
    want = torch.minimum(torch.maximum(y, x - 0.1), x + 0.1).clamp(0, 1)
    torch.testing.assert_close(threat.project(y, x), want)
    eps = torch.linspace(0.0, 0.5, 16)
    per = threat.project(y, x, eps=eps)
    assert bool((threat.distance(per, x) <= eps + 1e-6).all())


def test_l0_projection_is_optimal_by_exhaustion() -> None:
    rng = np.random.default_rng(3)
    for _ in range(30):
        dim, k = int(rng.integers(2, 7)), int(rng.integers(0, 4))
        x = rng.uniform(0, 1, size=dim)
        y = x + rng.normal(scale=0.8, size=dim)
        threat = LpBall("l0", k)
        got = threat.project(torch.tensor(y)[None], torch.tensor(x)[None])[0].numpy()
        assert (got != x).sum() <= k
        assert float(((got - y) ** 2).sum()) == pytest.approx(_brute_l0(y, x, k, 0.0, 1.0), abs=1e-12)


def test_batched_projection_equals_per_sample() -> None:
    g = torch.Generator().manual_seed(2)
    x = torch.rand(32, 1, 6, 6, generator=g, dtype=torch.float64)
    y = x + 0.7 * torch.randn(32, 1, 6, 6, generator=g, dtype=torch.float64)
    for norm, eps in [("l2", 0.8), ("l1", 2.0), ("l0", 5)]:
        threat = LpBall(norm, eps)
        batched = threat.project(y, x)
        singles = torch.cat([threat.project(y[i : i + 1], x[i : i + 1]) for i in range(32)])
        torch.testing.assert_close(batched, singles)


@pytest.mark.parametrize("norm,eps", [("linf", 0.1), ("l2", 1.0), ("l1", 4.0), ("l0", 7)])
def test_random_start_inside_ball_and_spread(norm: str, eps: float) -> None:
    threat = LpBall(norm, eps)
    x = torch.rand(512, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(5)
    z = threat.random_start(x, g)
    assert bool(threat.contains(z, x).all())
    dist = threat.distance(z, x)
    assert float(dist.mean()) > 0.2 * eps  # not collapsed onto the centre
    again = threat.random_start(x, torch.Generator().manual_seed(5))
    torch.testing.assert_close(z, again)  # reproducible with a seeded generator


def test_random_start_l2_radius_distribution_is_uniform_in_ball() -> None:
    # without the box, the radius of a uniform point of a D-ball has P(r <= t·eps) = t^D
    threat = LpBall("l2", 1.0, domain=(-100.0, 100.0))
    x = torch.zeros(4000, 3)
    r = threat.distance(threat.random_start(x, torch.Generator().manual_seed(0)), x)
    assert float((r <= 0.8).float().mean()) == pytest.approx(0.8**3, abs=0.03)


def test_random_start_l1_is_uniform_in_ball() -> None:
    # for the uniform distribution on the l1 ball in D dims, P(||z||_1 <= t·eps) = t^D as well
    threat = LpBall("l1", 1.0, domain=(-100.0, 100.0))
    x = torch.zeros(4000, 2)
    r = threat.distance(threat.random_start(x, torch.Generator().manual_seed(0)), x)
    assert float((r <= 0.7).float().mean()) == pytest.approx(0.7**2, abs=0.03)


def test_steps_are_normalised_steepest_ascent() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.full((4, 100), 0.5)
    grad = torch.randn(4, 100, generator=g)
    linf = LpBall("linf", 1.0).step(x, grad, 0.1) - x
    torch.testing.assert_close(linf, 0.1 * grad.sign())
    l2 = LpBall("l2", 1.0).step(x, grad, 0.1) - x
    torch.testing.assert_close(l2.norm(dim=1), torch.full((4,), 0.1))
    l1_threat = LpBall("l1", 1.0, l1_sparsity=0.05)
    l1 = l1_threat.step(x, grad, 0.1) - x
    torch.testing.assert_close(l1.abs().sum(dim=1), torch.full((4,), 0.1))
    assert bool(((l1 != 0).sum(dim=1) == 5).all())  # top 5 % of 100 coordinates
    top = grad.abs().topk(5, dim=1).indices
    assert bool((l1.gather(1, top).sign() == grad.gather(1, top).sign()).all())


def test_l1_step_skips_coordinates_blocked_by_the_box() -> None:
    x = torch.tensor([[1.0, 0.0, 0.5, 0.5]])
    grad = torch.tensor([[10.0, -9.0, 1.0, -0.5]])  # the two largest push out of the box
    step = LpBall("l1", 1.0, l1_sparsity=0.25).step(x, grad, 1.0) - x
    assert step[0, 0] == 0 and step[0, 1] == 0 and step[0, 2] == pytest.approx(1.0)


def test_distance_and_contains() -> None:
    x = torch.zeros(2, 4)
    z = torch.tensor([[0.1, -0.2, 0.0, 0.0], [0.0, 0.0, 0.0, 0.3]]).clamp(0, 1)
    assert LpBall("linf", 0.1).distance(z, x).tolist() == pytest.approx([0.1, 0.3])
    assert LpBall("l0", 1).distance(z, x).tolist() == [1.0, 1.0]
    assert LpBall("linf", 0.1).contains(z, x).tolist() == [True, False]
    outside = torch.tensor([[1.5, 0, 0, 0]])
    assert not bool(LpBall("linf", 10.0).contains(outside, torch.zeros(1, 4)))


def test_infinite_eps_means_whole_domain() -> None:
    threat = LpBall("l2", math.inf)
    x, y = torch.rand(3, 5), torch.randn(3, 5) * 4
    torch.testing.assert_close(threat.project(y, x), y.clamp(0, 1))
    assert bool(threat.contains(threat.random_start(x), x).all())


def test_norm_names_and_keys() -> None:
    assert canonical_norm("inf") == "linf" and canonical_norm(2) == "l2" and canonical_norm(math.inf) == "linf"
    assert LpBall("Linf", 0.1).key == "linf:0.1"
    assert LpBall(2, 0.5, domain=(-1, 1)).key == "l2:0.5@[-1.0,1.0]"
    assert LpBall("linf", 0.1).with_eps(0.2) == LpBall("linf", 0.2)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"norm": "l3", "eps": 0.1}, "unknown norm"),
        ({"norm": "linf", "eps": -0.1}, "eps must be >= 0"),
        ({"norm": "linf", "eps": float("nan")}, "eps must be >= 0"),
        ({"norm": "linf", "eps": "big"}, "eps must be a number"),
        ({"norm": "l0", "eps": 2.5}, "integer"),
        ({"norm": "linf", "eps": 0.1, "domain": (1.0, 0.0)}, "lo < hi"),
        ({"norm": "l1", "eps": 1.0, "l1_sparsity": 0.0}, "l1_sparsity"),
    ],
)
def test_bad_threat_arguments_are_named(kwargs: dict, match: str) -> None:
    with pytest.raises(InputError, match=match):
        LpBall(**kwargs)


# ------------------------------------------------------------------------------------------------- spatial flow
def _images(n: int = 3, c: int = 2, h: int = 5, w: int = 7, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, c, h, w, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def test_zero_flow_is_the_identity() -> None:
    x = _images()
    threat = FlowThreat(0.5)
    zero = torch.zeros(3, 2, 5, 7, dtype=torch.float64)
    assert torch.equal(threat.apply(x, zero), x)  # bit for bit
    torch.testing.assert_close(warp(x, zero), x, atol=1e-12, rtol=0)  # the raw warp too, up to rounding
    single = x[:, 0]  # (N, H, W) images are accepted as one channel
    assert torch.equal(threat.apply(single, zero), single)


@pytest.mark.parametrize("dx,dy", [(1, 0), (0, 1), (-2, 0), (1, -1), (3, 2)])
def test_integer_flow_shifts_the_image_exactly(dx: int, dy: int) -> None:
    # output pixel (i, j) reads input pixel (i + dy, j + dx); outside the image it reads the nearest border pixel
    x = _images()
    h, w = x.shape[-2:]
    flow = torch.zeros(3, 2, h, w, dtype=torch.float64)
    flow[:, 0], flow[:, 1] = dx, dy
    rows = (torch.arange(h) + dy).clamp(0, h - 1)
    cols = (torch.arange(w) + dx).clamp(0, w - 1)
    expected = x[:, :, rows][:, :, :, cols]
    torch.testing.assert_close(FlowThreat(math.inf).apply(x, flow), expected, atol=1e-12, rtol=0)


def test_half_pixel_flow_averages_neighbours_and_stays_in_the_domain() -> None:
    x = _images()
    flow = torch.zeros(3, 2, 5, 7, dtype=torch.float64)
    flow[:, 0] = 0.5
    out = FlowThreat(1.0).apply(x, flow)
    torch.testing.assert_close(out[..., :-1], 0.5 * (x[..., :-1] + x[..., 1:]), atol=1e-12, rtol=0)
    big = FlowThreat(math.inf).random_flow(x, torch.Generator().manual_seed(1), eps=40.0)
    warped = FlowThreat(math.inf).apply(x, big)
    assert bool((warped >= x.amin(dim=(1, 2, 3), keepdim=True) - 1e-12).all())  # convex combinations only
    assert bool((warped <= x.amax(dim=(1, 2, 3), keepdim=True) + 1e-12).all())


def test_flow_projection_respects_the_budget_and_is_the_nearest_point() -> None:
    threat = FlowThreat(0.7)
    gen = torch.Generator().manual_seed(0)
    flow = 2 * torch.randn(4, 2, 6, 6, generator=gen, dtype=torch.float64)
    proj = threat.project_flow(flow)
    size = threat.flow_size(proj)
    assert bool((size <= 0.7 + 1e-12).all()) and bool(threat.contains_flow(proj).all())
    assert not bool(threat.contains_flow(flow).any())
    # per pixel: inside the disc unchanged, outside moved radially onto the circle (nearest point of a disc)
    length = flow.norm(dim=1, keepdim=True)
    inside = length <= 0.7
    torch.testing.assert_close(torch.where(inside, flow, 0.0), torch.where(inside, proj, 0.0))
    torch.testing.assert_close(torch.where(inside, 0.7, proj.norm(dim=1, keepdim=True)), torch.full_like(length, 0.7))
    cos = (proj * flow).sum(dim=1) / (proj.norm(dim=1) * flow.norm(dim=1))
    torch.testing.assert_close(cos, torch.ones_like(cos))
    # no sampled point of the set is nearer to the flow than the projection
    other = threat.random_flow(torch.zeros(4, 1, 6, 6, dtype=torch.float64), gen)
    assert bool(((other - flow).flatten(1).norm(dim=1) >= (proj - flow).flatten(1).norm(dim=1)).all())
    # per-sample budgets and the infinite budget
    torch.testing.assert_close(FlowThreat(math.inf).project_flow(flow), flow)
    per = threat.project_flow(flow, eps=torch.tensor([0.1, 0.2, 0.3, 0.4], dtype=torch.float64))
    torch.testing.assert_close(threat.flow_size(per), torch.tensor([0.1, 0.2, 0.3, 0.4], dtype=torch.float64))


def test_random_flow_fills_the_disc_and_random_start_is_a_warp() -> None:
    threat = FlowThreat(0.5)
    x = _images(n=200, c=1, h=4, w=4)
    flow = threat.random_flow(x, torch.Generator().manual_seed(0))
    length = flow.norm(dim=1)
    assert bool((length <= 0.5 + 1e-12).all())
    assert float((length <= 0.25).double().mean()) == pytest.approx(0.25, abs=0.03)  # uniform in the disc
    assert abs(float(flow[:, 0].mean())) < 0.01 and abs(float(flow[:, 1].mean())) < 0.01
    start = threat.random_start(x, torch.Generator().manual_seed(0))
    torch.testing.assert_close(start, threat.apply(x, flow))
    assert bool(threat.in_domain(start).all())


def test_warp_is_differentiable_in_the_flow() -> None:
    x = _images(n=2, c=1, h=4, w=5)
    flow = 0.3 * torch.randn(2, 2, 4, 5, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    flow.requires_grad_(True)
    weights = torch.randn(2, 1, 4, 5, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda f: (warp(x, f) * weights).sum(), (flow,))
    (grad,) = torch.autograd.grad((warp(x, flow) * weights).sum(), flow)
    assert float(grad.abs().sum()) > 0


def test_flow_step_is_per_pixel_normalised_ascent() -> None:
    threat = FlowThreat(1.0)
    grad = torch.randn(2, 2, 3, 3, generator=torch.Generator().manual_seed(0))
    moved = threat.step_flow(torch.zeros_like(grad), grad, 0.25)
    torch.testing.assert_close(moved.norm(dim=1), torch.full((2, 3, 3), 0.25))
    assert bool(((moved * grad).sum(dim=1) > 0).all())


def test_flow_threat_names_errors_and_image_space_methods() -> None:
    threat = FlowThreat(0.5)
    assert isinstance(threat, ThreatModel)
    assert threat.key == "flow:0.5" and repr(threat) == "FlowThreat(0.5)"
    assert FlowThreat(1, domain=(-1, 1)).key == "flow:1.0@[-1.0,1.0]"
    assert threat.with_eps(2.0) == FlowThreat(2.0)
    x = _images()
    for call in (
        lambda: threat.project(x, x),
        lambda: threat.distance(x, x),
        lambda: threat.contains(x, x),
        lambda: threat.step(x, x, 0.1),
    ):
        with pytest.raises(InputError, match="apply"):
            call()
    for kwargs, match in [
        ({"eps": -1.0}, ">= 0"),
        ({"eps": float("nan")}, ">= 0"),
        ({"eps": "far"}, "number"),
        ({"eps": 1.0, "domain": (1.0, 0.0)}, "lo < hi"),
    ]:
        with pytest.raises(InputError, match=match):
            FlowThreat(**kwargs)
    with pytest.raises(InputError, match="images"):
        threat.apply(torch.rand(3, 64), torch.zeros(3, 2, 8, 8))
    with pytest.raises(InputError, match="does not fit"):
        threat.apply(x, torch.zeros(3, 2, 4, 4, dtype=torch.float64))
    with pytest.raises(InputError, match=r"\(N, 2, H, W\)"):
        threat.apply(x, torch.zeros(3, 5, 7, dtype=torch.float64))
    with pytest.raises(InputError, match="NaN"):
        threat.apply(x, torch.full((3, 2, 5, 7), math.nan, dtype=torch.float64))


# ------------------------------------------------------------------------------------- l2 ∩ box projection
@pytest.mark.parametrize("scale", [0.05, 0.2, 1.0])
def test_l2_box_active_set_solver_is_the_exact_projection(scale: float) -> None:
    from bastion.threat import _project_l2_box_active_set, _project_l2_box_sorted

    gen = torch.Generator().manual_seed(0)
    n, dim = 64, 200
    x = (torch.rand(n, dim, generator=gen) > 0.7).double() * torch.rand(n, dim, generator=gen, dtype=torch.float64)
    d = torch.randn(n, dim, generator=gen, dtype=torch.float64) * scale
    lower, upper = -x, 1 - x
    eps = torch.full((n,), 1.5, dtype=torch.float64)
    ref = _project_l2_box_sorted(d, lower, upper, eps)
    projected = LpBall("l2", 1.5).project(x + d, x) - x  # the fast paths, then the active-set solve
    for out in (_project_l2_box_active_set(d, lower, upper, eps), projected):
        torch.testing.assert_close(out, ref, atol=1e-10, rtol=0)
        assert bool((out.norm(dim=1) <= eps * (1 + 1e-12)).all())
        assert bool(((out >= lower) & (out <= upper)).all())
    # the exact projection is closer to d than the cheap "scale onto the ball, then clip" point
    cheap = torch.clamp(d * (eps / d.norm(dim=1)).clamp(max=1)[:, None], min=lower, max=upper)
    assert bool(((ref - d).norm(dim=1) <= (cheap - d).norm(dim=1) + 1e-12).all())
    # and it is the projection: no feasible point nearby is closer (random feasible perturbations of it)
    for _ in range(20):
        z = ref + 1e-3 * torch.randn(n, dim, generator=gen, dtype=torch.float64)
        z = torch.clamp(z, min=lower, max=upper)
        z = z * (eps / z.norm(dim=1)).clamp(max=1)[:, None]
        assert bool(((ref - d).norm(dim=1) <= (z - d).norm(dim=1) + 1e-12).all())


def test_l2_box_active_set_falls_back_to_sorting_when_rounds_run_out(monkeypatch) -> None:
    import bastion.threat as threat_mod

    gen = torch.Generator().manual_seed(1)
    x = torch.rand(16, 100, generator=gen, dtype=torch.float64)
    d = torch.randn(16, 100, generator=gen, dtype=torch.float64)
    eps = torch.full((16,), 2.0, dtype=torch.float64)
    ref = threat_mod._project_l2_box_sorted(d, -x, 1 - x, eps)
    monkeypatch.setattr(threat_mod, "_L2_ACTIVE_SET_ROUNDS", 1)
    torch.testing.assert_close(threat_mod._project_l2_box_active_set(d, -x, 1 - x, eps), ref, atol=1e-10, rtol=0)
