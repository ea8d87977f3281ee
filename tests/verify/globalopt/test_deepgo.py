"""DeepGO: brackets of the true optimum (dense grids, exact MILP), monotone bounds, sound lower bounds on many
random networks, estimated mode flagged, feature subsets, verdicts with known answers, the data-set run, bad input."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from torch import Tensor, nn

from bastion.errors import InputError
from bastion.store import Store
from bastion.threat import LpBall
from bastion.verify.globalopt.deepgo import (
    MAX_FEATURES,
    ReachResult,
    _sawtooth,
    deepgo_range,
    deepgo_reach,
    deepgo_robustness,
    deepgo_safety,
    deepgo_verify,
)
from bastion.verify.ir import Network
from bastion.verify.milp import milp_minimum

from ..nets import random_fc, randomise


def _mlp(d: int, widths: tuple[int, ...], seed: int, out: int = 1, act: type[nn.Module] = nn.ReLU) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    layers: list[nn.Module] = []
    w = d
    for h in widths:
        layers += [nn.Linear(w, h), act()]
        w = h
    layers.append(nn.Linear(w, out))
    return randomise(nn.Sequential(*layers), g)


def _grid(model: nn.Module, lo: Tensor, hi: Tensor, c: Tensor, steps: int = 201) -> tuple[Tensor, Tensor]:
    """(N,) min and max of ``c · f`` on a dense grid of each 2-D box."""
    t = torch.linspace(0, 1, steps, dtype=torch.float64)
    uv = torch.cartesian_prod(t, t)
    pts = lo.unsqueeze(1) + uv.unsqueeze(0) * (hi - lo).unsqueeze(1)  # (N, S, 2)
    with torch.no_grad():
        v = (model(pts.reshape(-1, 2)).reshape(lo.shape[0], -1, c.shape[-1]) * c).sum(-1)
    return v.amin(1), v.amax(1)


def _check_result(res: ReachResult, model: nn.Module, lo: Tensor, hi: Tensor, c: Tensor) -> None:
    """The point is in the box, attains the reported value, and the history is monotone."""
    assert bool((res.point >= lo).all()) and bool((res.point <= hi).all())
    with torch.no_grad():
        v = (model(res.point).reshape(lo.shape[0], -1) * c).sum(-1)
    torch.testing.assert_close(res.value, v, rtol=1e-12, atol=1e-12)
    attained = res.lower if res.maximize else res.upper
    torch.testing.assert_close(attained, v, rtol=1e-12, atol=1e-12)
    assert bool((res.lower <= res.upper).all())
    assert bool((res.history_lower[1:] >= res.history_lower[:-1] - 1e-12).all()), "lower bound decreased"
    assert bool((res.history_upper[1:] <= res.history_upper[:-1] + 1e-12).all()), "upper bound increased"
    gap = res.history_upper - res.history_lower
    assert bool((gap[1:] <= gap[:-1] + 1e-12).all()), "gap grew"
    torch.testing.assert_close(res.history_lower[-1], res.lower)
    torch.testing.assert_close(res.history_upper[-1], res.upper)


@pytest.mark.parametrize("widths", [(6,), pytest.param((8, 8), marks=pytest.mark.slow)])
def test_experiment1_box_0_10_converges_and_brackets_the_grid(widths: tuple[int, ...]) -> None:
    """The reference's Experiment 1 kind: a 2-input network on [0, 10]^2, tolerance 0.01, min and max both
    converge and bracket the dense-grid optimum (upper - tol <= lower <= true min <= grid min)."""
    model = _mlp(2, widths, seed=1)
    lo, hi = torch.zeros(1, 2, dtype=torch.float64), torch.full((1, 2), 10.0, dtype=torch.float64)
    c = torch.ones(1, dtype=torch.float64)
    mn, mx = deepgo_range(model, lo, hi, c, tolerance=0.01, time_limit=60)
    gmin, gmax = _grid(model, lo, hi, c.reshape(1, 1), steps=1001)
    for res in (mn, mx):
        assert res.sound and bool(res.converged.all()) and not res.timed_out
        assert bool((res.gap <= 0.01).all())
        _check_result(res, model, lo, hi, c.reshape(1, 1))
    assert bool((mn.lower <= gmin + 1e-12).all()) and bool((mn.upper <= gmin + 0.01).all())
    assert bool((mx.upper >= gmax - 1e-12).all()) and bool((mx.lower >= gmax - 0.01).all())
    # at least the 4 corners (the 2 ends of the outer problem, each an inner problem with 2 ends); with CROWN
    # interval bounds a corner optimum on a linear piece can be proven without any iteration
    assert mn.evaluations >= 4 and mx.evaluations >= 4 and mx.evaluations > mx.iterations


def test_batched_boxes_bracket_grid_optimum() -> None:
    """Several networks, four boxes each solved together (one forward pass per iteration): every bound
    brackets the grid optimum within the tolerance, for min and max, with one and with several points per
    iteration."""
    for seed in range(3):
        model = _mlp(2, (6, 5), seed=seed)
        g = torch.Generator().manual_seed(seed)
        lo = torch.rand(4, 2, generator=g, dtype=torch.float64) * 2
        hi = lo + torch.rand(4, 2, generator=g, dtype=torch.float64) * 2
        c = torch.ones(1, dtype=torch.float64)
        gmin, gmax = _grid(model, lo, hi, c.reshape(1, 1))
        for ppi in (1, 4):
            mn = deepgo_reach(model, lo, hi, c, tolerance=0.01, points_per_iteration=ppi)
            mx = deepgo_reach(model, lo, hi, c, tolerance=0.01, maximize=True, points_per_iteration=ppi)
            for res in (mn, mx):
                _check_result(res, model, lo, hi, c.reshape(1, 1))
                assert bool(res.converged.all())
            assert bool((mn.lower <= gmin + 1e-12).all()) and bool((mn.upper <= gmin + 0.01 + 1e-12).all())
            assert bool((mx.upper >= gmax - 1e-12).all()) and bool((mx.lower >= gmax - 0.01 - 1e-12).all())


@pytest.mark.parametrize("d", [2, 3, 4, 5])
def test_brackets_exact_milp_minimum(d: int) -> None:
    """Against the exact MILP minimum (HiGHS) on 2-5 input ReLU networks, also when the budget stops early."""
    for seed in range(2):
        model = _mlp(d, (6, 6), seed=10 * d + seed, out=2)
        net = Network.from_module(model, (d,))
        g = torch.Generator().manual_seed(seed)
        lo = torch.rand(1, d, generator=g, dtype=torch.float64)
        hi = lo + 0.3 * torch.rand(1, d, generator=g, dtype=torch.float64) + 0.05
        c = torch.randn(2, generator=g, dtype=torch.float64)
        exact, _ = milp_minimum(net, lo[0], hi[0], c)
        res = deepgo_reach(model, lo, hi, c, tolerance=0.02, max_iterations=40, time_limit=1.5)
        # HiGHS solves to its feasibility tolerances: its optimum can sit a few 1e-9 above a real attained value
        bracket = (d, seed, float(res.lower), exact, float(res.upper))
        assert float(res.lower) <= exact + 1e-7 and exact <= float(res.upper) + 1e-7, bracket
        _check_result(res, model, lo, hi, c.reshape(1, 2))


def _grid_nd(model: nn.Module, lo: Tensor, hi: Tensor, c: Tensor, steps: int) -> tuple[float, float]:
    """Min and max of ``c · f`` on a dense grid of one ``d``-dimensional box ``(1, d)``."""
    t = torch.linspace(0, 1, steps, dtype=torch.float64)
    uv = torch.cartesian_prod(*([t] * lo.shape[1]))
    with torch.no_grad():
        v = model(lo + uv * (hi - lo)) @ c
    return float(v.min()), float(v.max())


@pytest.mark.parametrize(
    "d, widths, size, tol, steps", [(2, (8, 8), 1.5, 0.02, 301), (3, (8,), 2.0, 0.05, 61)], ids=["2d", "3d"]
)
def test_interval_bounds_bracket_the_grid_and_save_evaluations(
    d: int, widths: tuple[int, ...], size: float, tol: float, steps: int
) -> None:
    """On random 2- and 3-input networks (ReLU, tanh, sigmoid, LeakyReLU), for the minimum and the maximum: with
    CROWN, IBP and no interval bounds the search converges and brackets the dense-grid optimum (``lower <= grid
    min <= upper <= grid min + tol``); CROWN interval bounds never need more evaluations than the pure Lipschitz
    bound, IBP ones no more in total (a tighter bound moves the next points, so one problem can take a few more)."""
    acts: tuple[type[nn.Module], ...] = (nn.ReLU, nn.Tanh, nn.Sigmoid, nn.LeakyReLU)
    total: dict[str | None, int] = {"crown": 0, "ibp": 0, None: 0}
    for seed in range(4):
        model = _mlp(d, widths, seed=100 * d + seed, out=2, act=acts[seed % 4])
        g = torch.Generator().manual_seed(seed)
        lo = torch.rand(1, d, generator=g, dtype=torch.float64) - 1
        hi = lo + size
        c = torch.randn(2, generator=g, dtype=torch.float64)
        gmin, gmax = _grid_nd(model, lo, hi, c, steps)
        for maximize in (False, True):
            evals: dict[str | None, int] = {}
            for ib in ("crown", "ibp", None):
                res = deepgo_reach(model, lo, hi, c, tolerance=tol, maximize=maximize, interval_bounds=ib)
                assert res.sound and bool(res.converged.all()), (seed, maximize, ib)
                _check_result(res, model, lo, hi, c.reshape(1, 2))
                if maximize:
                    assert float(res.upper) >= gmax - 1e-12 and float(res.lower) >= gmax - tol - 1e-12, (seed, ib)
                else:
                    assert float(res.lower) <= gmin + 1e-12 and float(res.upper) <= gmin + tol + 1e-12, (seed, ib)
                evals[ib] = res.evaluations
                total[ib] += res.evaluations
            assert evals["crown"] <= evals[None], (seed, maximize, evals)
    assert total["crown"] <= total["ibp"] <= total[None], total


def test_sawtooth_is_the_minimum_of_the_lower_bounding_function() -> None:
    """The interval value is the minimum over the interval (dense grid) of ``max(bound_p, l0 + s_lo (x - x0),
    l1 - s_hi (x1 - x))`` minimised over the pieces ``p`` too, for random values, signed slopes (both signs,
    monotone and flat pieces) and bounds; the next point lies inside its interval."""
    g = torch.Generator().manual_seed(0)
    b, p, s = 64, 6, 3
    xs = torch.sort(torch.rand(b, p, generator=g, dtype=torch.float64) * 4, dim=1).values
    xs[:, -1] = math.inf  # one padded slot
    lv = torch.randn(b, p, generator=g, dtype=torch.float64)
    lv[:, -1] = math.inf
    s_lo = -torch.rand(b, p - 1, s, generator=g, dtype=torch.float64) * 3 + 0.5  # some pieces increasing
    s_hi = s_lo + torch.rand(b, p - 1, s, generator=g, dtype=torch.float64) * 3
    s_lo[:8], s_hi[:8] = 0.0, 0.0  # flat
    s_hi[8:16] = s_hi[8:16].clamp(max=-0.1)  # decreasing
    s_lo[8:16] = torch.minimum(s_lo[8:16], s_hi[8:16])
    some = torch.rand(b, p - 1, s, generator=g) < 0.3
    bnd = torch.where(some, torch.randn(b, p - 1, s, generator=g, dtype=torch.float64), -math.inf)
    y, z = _sawtooth(xs, lv, s_lo, s_hi, bnd)
    assert bool(torch.isinf(z[:, -1]).all())
    t = torch.linspace(0, 1, 20001, dtype=torch.float64)
    x0, x1 = xs[:, :-2].unsqueeze(-1), xs[:, 1:-1].unsqueeze(-1)
    x = x0 + t * (x1 - x0)  # (B, P - 2, T)
    l0, l1 = lv[:, :-2].reshape(b, p - 2, 1, 1), lv[:, 1:-1].reshape(b, p - 2, 1, 1)
    xx = x.unsqueeze(2)
    left = l0 + s_lo[:, :-1].unsqueeze(-1) * (xx - x0.unsqueeze(2))
    right = l1 - s_hi[:, :-1].unsqueeze(-1) * (x1.unsqueeze(2) - xx)
    f = torch.maximum(left, right)
    f = torch.maximum(f, bnd[:, :-1].unsqueeze(-1)).amin(2).amin(-1)  # (B, P - 2)
    assert bool((z[:, :-1] <= f + 1e-12).all()), "the interval value is above the bounding function"
    slack = (x1 - x0).squeeze(-1) * 6 / 20000  # grid resolution times the largest slope
    assert bool((z[:, :-1] >= f - slack - 1e-12).all()), "the interval value is below the bounding function's minimum"
    assert bool((y[:, :-1] >= xs[:, :-2]).all()) and bool((y[:, :-1] <= xs[:, 1:-1]).all())


def test_sound_lower_bound_never_above_a_sampled_value() -> None:
    """On 20 random networks (ReLU, LeakyReLU, sigmoid, tanh; batch norm, residual blocks) with a budget of a few
    iterations: no lower bound in the history is above any sampled value over the box (two optimised features,
    the others fixed at x0), with both sound constants, local (per-interval) interval constants or not, CROWN, IBP
    or no interval bounds on 1 to 10 pieces, signed or symmetric slopes."""
    _check_sampled(20)


@pytest.mark.slow
def test_sound_lower_bound_on_many_networks() -> None:
    """The same on 300 networks."""
    _check_sampled(300)


def _check_sampled(count: int) -> None:
    kinds = ("relu", "leaky", "sigmoid", "tanh")
    for seed in range(count):
        model, shape = random_fc(seed, kinds[seed % 4])
        d = shape[0]
        g = torch.Generator().manual_seed(seed)
        centre = torch.randn(2, d, generator=g, dtype=torch.float64)
        rad = torch.rand(2, d, generator=g, dtype=torch.float64) + 0.1
        lo, hi = centre - rad, centre + rad
        x0 = lo + torch.rand(2, d, generator=g, dtype=torch.float64) * (hi - lo)
        c = torch.randn(2, 3, generator=g, dtype=torch.float64)
        feats = [0, d - 1]
        lip = "interval" if seed % 3 else "norms"
        bounds = ("crown", None, "ibp")[(seed // 2) % 3]
        res = deepgo_reach(
            model, lo, hi, c, features=feats, x0=x0, reduce="min", max_iterations=6, tolerance=1e-3, lipschitz=lip,
            local_lipschitz=seed % 2 == 0, interval_bounds=bounds, signed_slopes=seed % 5 != 1,
            bound_splits=1 + 3 * (seed % 4),
        )  # fmt: skip
        assert res.sound
        u = torch.rand(2, 400, 2, generator=g, dtype=torch.float64)
        u[:, :4] = torch.tensor([[0.0, 0.0], [0.0, 1.0], [1.0, 0.0], [1.0, 1.0]], dtype=torch.float64)
        pts = x0.unsqueeze(1).repeat(1, 400, 1)
        pts[:, :, feats] = lo[:, feats].unsqueeze(1) + u * (hi - lo)[:, feats].unsqueeze(1)
        with torch.no_grad():
            v = torch.einsum("nsk,nmk->nsm", model(pts.reshape(-1, d)).reshape(2, 400, 3), c.expand(2, 2, 3))
        sampled_min = v.amin(-1).amin(1)
        assert bool((res.history_lower <= sampled_min + 1e-9).all()), f"seed {seed} ({lip}): lower above a sample"
        others = [i for i in range(d) if i not in feats]
        assert torch.equal(res.point[:, others], x0[:, others])


def test_feature_subset_leaves_the_other_features_fixed() -> None:
    """Optimising features 1 and 3 of a 5-input network: the best point keeps every other feature at x0, and the
    bounds bracket the grid optimum over those two features alone (not over the whole box)."""
    model = _mlp(5, (8,), seed=7)
    lo, hi = torch.zeros(1, 5, dtype=torch.float64), torch.ones(1, 5, dtype=torch.float64)
    x0 = torch.tensor([[0.2, 0.5, 0.9, 0.5, 0.4]], dtype=torch.float64)
    c = torch.ones(1, dtype=torch.float64)
    res = deepgo_reach(model, lo, hi, c, features=[1, 3], x0=x0, tolerance=1e-2)
    assert res.details["features"] == [1, 3]
    assert torch.equal(res.point[0, [0, 2, 4]], x0[0, [0, 2, 4]])
    t = torch.linspace(0, 1, 301, dtype=torch.float64)
    pts = x0.repeat(301 * 301, 1)
    pts[:, [1, 3]] = torch.cartesian_prod(t, t)
    with torch.no_grad():
        grid_min = model(pts).min()
    assert float(res.lower) <= float(grid_min) + 1e-12 and float(res.upper) <= float(grid_min) + 1e-2
    full = deepgo_reach(model, lo, hi, c, tolerance=0.05, time_limit=1.0, max_iterations=10)
    assert float(full.lower) <= float(res.upper) + 1e-12  # the whole box reaches at least as low


def _linear_classifier() -> nn.Module:
    """``f(x) = [x0 + x1, 1]``: class 0 wins iff ``x0 + x1 > 1``."""
    m = nn.Linear(2, 2).double()
    with torch.no_grad():
        m.weight.copy_(torch.tensor([[1.0, 1.0], [0.0, 0.0]]))
        m.bias.copy_(torch.tensor([0.0, 1.0]))
    return m.eval()


def test_robustness_and_safety_verdicts_with_known_answers() -> None:
    """Margin ``x0 + x1 - 1`` at ``(0.8, 0.8)``: its minimum over the linf ball is ``0.6 - 2 eps`` (verified at
    0.2, falsified at 0.4 with a re-executed counterexample in the ball); safety of ``f0 - f1 <= 0``."""
    model = _linear_classifier()
    x = torch.tensor([[0.8, 0.8], [0.8, 0.8]], dtype=torch.float64)
    y = torch.tensor([0, 0])
    ok = deepgo_robustness(model, x[:1], y[:1], LpBall("linf", 0.2))
    assert ok[0].status == "verified" and ok[0].lower_bound is not None
    assert abs(ok[0].lower_bound - 0.2) <= 0.01
    bad = deepgo_robustness(model, x, y, LpBall("linf", 0.4))
    for v in bad:
        assert v.status == "falsified" and v.counterexample is not None and v.output is not None
        assert float((v.counterexample - x[0]).abs().max()) <= 0.4 + 1e-12
        assert float(v.output[0] - v.output[1]) < 0
    c = torch.tensor([[1.0, -1.0]], dtype=torch.float64)
    lo, hi = torch.zeros(2, 2, dtype=torch.float64), torch.tensor([[0.4, 0.4], [1.0, 1.0]], dtype=torch.float64)
    safe, unsafe = deepgo_safety(model, lo, hi, c)
    assert safe.status == "verified" and safe.lower_bound is not None and abs(safe.lower_bound - 0.2) <= 0.01
    assert unsafe.status == "falsified" and unsafe.counterexample is not None
    assert float(unsafe.output[0] - unsafe.output[1]) > 0  # type: ignore[index]


def test_estimated_constant_is_flagged_and_never_verifies() -> None:
    """lipschitz="estimate" (the reference's dynamic slopes) and a user constant: sound=False, and a property the
    sound mode verifies is only 'unknown' (marked as an unsound verdict), while falsification still works."""
    model = _linear_classifier()
    x = torch.tensor([[0.8, 0.8]], dtype=torch.float64)
    y = torch.tensor([0])
    for lip in ("estimate", 1.5):
        lo, hi = x - 0.2, x + 0.2
        res = deepgo_reach(model, lo, hi, torch.tensor([1.0, -1.0], dtype=torch.float64), lipschitz=lip)
        assert res.sound is False
        v = deepgo_robustness(model, x, y, LpBall("linf", 0.2), lipschitz=lip)[0]
        assert v.status == "unknown" and v.details["unsound_verdict"] == "verified" and v.lower_bound is None
        assert deepgo_robustness(model, x, y, LpBall("linf", 0.4), lipschitz=lip)[0].status == "falsified"
    # on a network the estimate brackets the grid optimum here too, as the reference's does in practice
    model2 = _mlp(2, (6,), seed=3)
    lo, hi = torch.zeros(1, 2, dtype=torch.float64), torch.ones(1, 2, dtype=torch.float64)
    est = deepgo_reach(model2, lo, hi, torch.ones(1, dtype=torch.float64), lipschitz="estimate")
    gmin, _ = _grid(model2, lo, hi, torch.ones(1, 1, dtype=torch.float64))
    assert float(est.upper) >= float(gmin) - 0.01


def test_time_limit_and_iteration_budget_keep_valid_bounds() -> None:
    model = _mlp(2, (16, 16), seed=5)
    lo, hi = torch.zeros(1, 2, dtype=torch.float64), torch.full((1, 2), 10.0, dtype=torch.float64)
    c = torch.ones(1, dtype=torch.float64)
    # the global constant alone (no interval bounds) is far from converging in 5 iterations or 0.3 s
    pure = {"lipschitz": "norms", "interval_bounds": None}
    res = deepgo_reach(model, lo, hi, c, tolerance=1e-6, max_iterations=5, **pure)  # type: ignore[arg-type]
    gmin, _ = _grid(model, lo, hi, c.reshape(1, 1))
    assert res.iterations == 5 and not bool(res.converged.all())
    assert float(res.lower) <= float(gmin) + 1e-12 and res.history_lower.shape[0] == 6
    timed = deepgo_reach(model, lo, hi, c, tolerance=1e-9, time_limit=0.3, **pure)  # type: ignore[arg-type]
    assert timed.timed_out and float(timed.lower) <= float(gmin) + 1e-12
    v = deepgo_safety(model, lo, hi, c, threshold=float(gmin) + 50, time_limit=0.2, **pure)[0]
    assert v.status in ("verified", "timeout")


def test_deepgo_verify_writes_records_and_resumes(tmp_path: Path) -> None:
    """A data-set run: one record per sample (robust: certified = eps; falsified: the counterexample's linf
    distance; misclassified: distance 0), identical to the per-sample verdicts, and a second call resumes."""
    model = _linear_classifier().float()
    x = torch.tensor([[0.8, 0.8], [0.9, 0.7], [0.55, 0.5], [0.2, 0.1]])
    y = torch.tensor([0, 0, 0, 1])
    threat = LpBall("linf", 0.1)
    path = tmp_path / "runs.db"
    res = deepgo_verify(model, (x, y), threat, store=path, progress=False, batch_size=3)
    recs = sorted(res.records, key=lambda r: r.index)
    assert [r.status for r in recs] == ["robust", "robust", "falsified", "robust"]
    assert recs[0].certified == pytest.approx(0.1) and recs[2].adv_distance is not None
    assert 0 < recs[2].adv_distance <= 0.1 + 1e-6
    assert res.method == "deepgo" and res.certified_accuracy == pytest.approx(0.75)
    again = deepgo_verify(model, (x, y), threat, store=path, progress=False, batch_size=3)
    assert again.run_id == res.run_id
    assert [r.status for r in sorted(again.records, key=lambda r: r.index)] == [r.status for r in recs]
    with Store(path) as store:
        assert len(store.records(res.run_id)) == 4  # type: ignore[arg-type]
    wrong = deepgo_verify(model, (x, torch.tensor([1, 0, 0, 1])), threat, progress=False)
    first = sorted(wrong.records, key=lambda r: r.index)[0]
    assert first.status == "falsified" and first.adv_distance == 0.0


def test_bad_input() -> None:
    model = _mlp(2, (4,), seed=0)
    lo, hi = torch.zeros(1, 2, dtype=torch.float64), torch.ones(1, 2, dtype=torch.float64)
    c = torch.ones(1, dtype=torch.float64)
    cases = [
        (dict(tolerance=0.0), "tolerance"),
        (dict(tolerance=-1.0), "tolerance"),
        (dict(tolerance=float("nan")), "tolerance"),
        (dict(lipschitz="exact"), "lipschitz"),
        (dict(lipschitz=-2.0), "lipschitz"),
        (dict(reduce="mean"), "reduce"),
        (dict(max_iterations=0), "max_iterations"),
        (dict(points_per_iteration=0), "points_per_iteration"),
        (dict(time_limit=0), "time_limit"),
        (dict(inner_tolerance_ratio=2.0), "inner_tolerance_ratio"),
        (dict(interval_bounds="zonotope"), "interval_bounds"),
        (dict(interval_bounds=True), "interval_bounds"),
        (dict(bound_splits=0), "bound_splits"),
        (dict(bound_splits=2.5), "bound_splits"),
        (dict(signed_slopes=1), "signed_slopes"),
        (dict(features=[0, 0]), "duplicates"),
        (dict(features=[2]), "features"),
        (dict(features=[]), "features"),
        (dict(x0=torch.full((1, 2), 2.0, dtype=torch.float64)), "x0"),
    ]
    for kwargs, match in cases:
        with pytest.raises(InputError, match=match):
            deepgo_reach(model, lo, hi, c, **kwargs)  # type: ignore[arg-type]
    with pytest.raises(InputError, match="empty"):
        deepgo_reach(model, hi, lo, c)
    with pytest.raises(InputError, match="NaN"):
        deepgo_reach(model, lo * math.nan, hi, c)
    with pytest.raises(InputError, match="c must have shape"):
        deepgo_reach(model, lo, hi, torch.ones(3, dtype=torch.float64))
    with pytest.raises(InputError, match="limited"):
        big = _mlp(MAX_FEATURES + 1, (3,), seed=0)
        n = MAX_FEATURES + 1
        deepgo_reach(big, torch.zeros(1, n, dtype=torch.float64), torch.ones(1, n, dtype=torch.float64), c)
    with pytest.raises(InputError, match="maximize"):
        deepgo_range(model, lo, hi, c, maximize=True)
    live32 = Network.from_module(nn.Sequential(nn.Linear(2, 3), nn.ReLU(), nn.Linear(3, 1)), (2,), live=True)
    with pytest.raises(InputError, match="live network"):
        deepgo_reach(live32, lo, hi, c)
    clf = _linear_classifier()
    x = torch.tensor([[0.5, 0.5]], dtype=torch.float64)
    with pytest.raises(InputError, match="labels"):
        deepgo_robustness(clf, x, torch.tensor([2]), LpBall("linf", 0.1))
    with pytest.raises(InputError, match="linf"):
        deepgo_robustness(clf, x, torch.tensor([0]), LpBall("l2", 0.1))
    with pytest.raises(InputError, match="domain"):
        deepgo_robustness(clf, x + 1, torch.tensor([0]), LpBall("linf", 0.1))


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu() -> None:
    model = _mlp(2, (8, 8), seed=2)
    lo, hi = torch.zeros(2, 2, dtype=torch.float64), torch.tensor([[1.0, 2.0], [3.0, 1.0]], dtype=torch.float64)
    c = torch.ones(1, dtype=torch.float64)
    cpu = deepgo_reach(model, lo, hi, c, tolerance=0.01)
    gpu = deepgo_reach(model.cuda(), lo.cuda(), hi.cuda(), c.cuda(), tolerance=0.01)
    assert gpu.lower.device.type == "cuda" and gpu.point.device.type == "cuda"
    torch.testing.assert_close(gpu.lower.cpu(), cpu.lower, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(gpu.upper.cpu(), cpu.upper, rtol=1e-6, atol=1e-6)
