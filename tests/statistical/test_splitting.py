"""Adaptive multilevel splitting: closed-form probabilities (l∞ boxes cut by half-spaces, l2 caps, the clipped
measure), brackets against plain Monte Carlo on random ReLU networks, -inf where the exact MILP proves the property,
exact model-call counts, determinism, the data-set loop with its store and resume, and bad input."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from scipy import special
from tests.verify.nets import random_fc
from torch import Tensor, nn

from bastion.data import Dataset
from bastion.errors import InputError
from bastion.statistical import splitting as splitting_mod
from bastion.statistical.splitting import estimate_violation, multilevel_splitting, naive_monte_carlo
from bastion.store import Store
from bastion.threat import FlowThreat, LpBall
from bastion.verify.ir import Network
from bastion.verify.milp import milp_minimum

# Fewer particles and steps than the paper's defaults (1000, 100) keep the default tests fast.
FAST = {"n_particles": 500, "mh_steps": 50}


class Counting(nn.Module):
    """Counts the inputs the wrapped model is evaluated on, independently of the code under test."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner
        self.rows = 0

    def forward(self, x: Tensor) -> Tensor:
        self.rows += x.shape[0]
        return self.inner(x)


def halfspace_model(a: Tensor, t: float) -> nn.Module:
    """Two logits ``(0, a·x - t)``: for class 0 the margin is ``s(x) = a·x - t``."""
    lin = nn.Linear(a.numel(), 2).double()
    with torch.no_grad():
        lin.weight.zero_()
        lin.bias.zero_()
        lin.weight[1] = a
        lin.bias[1] = -t
    return lin.eval()


def box_halfspace_probability(a: Tensor, t: float, lo: Tensor, hi: Tensor) -> float:
    """Exact ``P(a·U >= t)`` for ``U`` uniform on the box ``[lo, hi]`` and ``a > 0``.

    With ``W_i = a_i (hi_i - U_i)`` uniform on ``[0, c_i]``, the event is ``sum W_i <= a·hi - t``, whose volume is
    the inclusion-exclusion sum over the box's vertices of ``(tau - sum_{i in S} c_i)_+^D / D!``; near the top
    corner only the first terms are non-zero, so tiny probabilities come out without cancellation.
    """
    c = (a * (hi - lo)).tolist()
    tau = float((a * hi).sum()) - t
    d = len(c)
    total = 0.0
    for subset in itertools.product([0, 1], repeat=d):
        r = tau - sum(ci for ci, b in zip(c, subset) if b)
        if r > 0:
            total += (-1) ** sum(subset) * r**d
    return total / (math.factorial(d) * math.prod(c))


def solve_t(prob: float, f, lo: float, hi: float) -> float:
    """The threshold ``t`` in ``[lo, hi]`` with ``f(t) = prob`` (``f`` decreasing), by bisection."""
    for _ in range(100):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if f(mid) > prob else (lo, mid)
    return (lo + hi) / 2


def assert_close_to(res, truth: float, *, factor: float, sigmas: float = 3.0) -> None:
    """``res.log_p`` within ``sigmas`` of its reported spread and within ``factor`` of the true probability."""
    err = abs(res.log_p - math.log(truth))
    assert math.isfinite(res.log_p), f"no estimate: {res.note}"
    assert err <= sigmas * res.log_p_std, f"log p {res.log_p:.3f} vs {math.log(truth):.3f}, std {res.log_p_std:.3f}"
    assert err <= math.log(factor), f"estimate {res.p:.3g} not within x{factor} of {truth:.3g}"


# -------------------------------------------------------------------------------------------- known answers
@pytest.mark.parametrize("target", [1e-2, 1e-3])
def test_linf_box_cut_by_a_halfspace(target: float) -> None:
    # x on the domain's faces in two coordinates: the ball ∩ domain is the box [0, .15] x [.4, .6] x [.85, 1]
    x = torch.tensor([0.05, 0.5, 0.95], dtype=torch.float64)
    a = torch.tensor([1.0, 2.0, 1.5], dtype=torch.float64)
    threat = LpBall("linf", 0.1)
    lo, hi = (x - 0.1).clamp(0, 1), (x + 0.1).clamp(0, 1)
    t = solve_t(target, lambda v: box_halfspace_probability(a, v, lo, hi), float((a * lo).sum()), float(a @ hi))
    truth = box_halfspace_probability(a, t, lo, hi)
    res = multilevel_splitting(halfspace_model(a, t), x, 0, threat, **FAST)
    assert_close_to(res, truth, factor=1.5)
    assert res.termination == "reached-0" and res.spread == "asymptotic" and res.levels[-1] == 0.0
    assert res.n_levels == len(res.acceptance) + 1 and abs(res.n_levels + math.log10(truth)) <= 1
    mc = naive_monte_carlo(halfspace_model(a, t), x, 0, threat, n=200_000)
    assert mc.interval[0] <= truth <= mc.interval[1]


def test_tiny_probability_that_naive_monte_carlo_misses() -> None:
    d, eps = 6, 0.1
    x = torch.full((d,), 0.5, dtype=torch.float64)
    a = torch.linspace(1.0, 2.0, d, dtype=torch.float64)
    lo, hi = x - eps, x + eps
    t = solve_t(1e-7, lambda v: box_halfspace_probability(a, v, lo, hi), float(a @ x), float(a @ hi))
    truth = box_halfspace_probability(a, t, lo, hi)
    assert 0.9e-7 < truth < 1.1e-7
    model = halfspace_model(a, t)
    res = multilevel_splitting(model, x, 0, LpBall("linf", eps), **FAST)
    assert_close_to(res, truth, factor=2.0)
    assert res.n_levels == 7 and res.x_adv is not None
    # the violation is real: re-executed, inside the ball, misclassified
    assert float(model(res.x_adv[None]).detach()[0, 1]) > 0 and res.adv_distance is not None and res.adv_distance <= eps
    mc = naive_monte_carlo(model, x, 0, LpBall("linf", eps), n=res.model_calls, batch_size=50_000)
    assert mc.hits == 0 and mc.log_p == -math.inf and mc.interval[0] == 0.0 and mc.x_adv is None


@pytest.mark.parametrize("measure", ["intersect", "clip"])
def test_l2_cap_of_a_ball(measure: str) -> None:
    # the ball lies inside the domain, so both measures are the uniform distribution on the ball
    d, eps = 5, 0.3
    x = torch.full((d,), 0.5, dtype=torch.float64)
    a = torch.tensor([1.0, -2.0, 0.5, 1.0, 3.0], dtype=torch.float64)

    def cap(h: float) -> float:  # P(a·(X - x) >= h eps |a|) for X uniform in the ball: a regularised beta
        return 0.5 * float(special.betainc((d + 1) / 2, 0.5, 1 - h * h))

    h = solve_t(1e-4, cap, 0.0, 1.0)
    model = halfspace_model(a, float(a @ x) + h * eps * float(a.norm()))
    res = multilevel_splitting(model, x, 0, LpBall("l2", eps), measure=measure, **FAST)
    assert res.measure == measure
    assert_close_to(res, cap(h), factor=1.6)
    assert res.x_adv is not None and float((res.x_adv - x).norm()) <= eps * (1 + 1e-9)


def test_clipped_measure_puts_mass_on_the_domain_face() -> None:
    # x_0 = 0 on the face: under "clip", X_0 = 0 with probability 1/2, else uniform on (0, .2); the event
    # x_0 + x_1 >= .85 needs x_0 > .15, so its probability is half of the uniform box's
    x = torch.tensor([0.0, 0.5], dtype=torch.float64)
    a = torch.ones(2, dtype=torch.float64)
    model = halfspace_model(a, 0.85)
    box = box_halfspace_probability(a, 0.85, torch.tensor([0.0, 0.3]), torch.tensor([0.2, 0.7]))
    assert box == pytest.approx(0.05**2 / 2 / 0.08)
    threat = LpBall("linf", 0.2)
    inter = multilevel_splitting(model, x, 0, threat, **FAST)
    clip = multilevel_splitting(model, x, 0, threat, measure="clip", **FAST)
    assert_close_to(inter, box, factor=1.3)
    assert_close_to(clip, box / 2, factor=1.3)
    assert clip.x_adv is not None and bool(threat.contains(clip.x_adv[None], x[None]))


# -------------------------------------------------------------------------------------------- random networks
def _net_case(seed: int) -> tuple[nn.Module, Tensor, int, tuple[int, ...]]:
    model, shape = random_fc(seed, "relu")
    g = torch.Generator().manual_seed(100 + seed)
    x = 0.2 + 0.6 * torch.rand(shape, generator=g, dtype=torch.float64)
    return model, x, int(model(x[None]).argmax()), shape


@pytest.mark.parametrize(("seed", "eps"), [(3, 0.2), (4, 0.2), (5, 0.3), (10, 0.05), (12, 0.1), (19, 0.5)])
def test_brackets_monte_carlo_on_random_relu_networks(seed: int, eps: float) -> None:
    model, x, y, _ = _net_case(seed)
    threat = LpBall("linf", eps)
    mc = naive_monte_carlo(model, x, y, threat, n=200_000, batch_size=100_000, seed=1)
    assert mc.hits >= 100, "the case is meant to have a probability Monte Carlo measures well"
    res = multilevel_splitting(model, x, y, threat, n_particles=300, mh_steps=30)
    assert abs(res.log_p - mc.log_p) <= 3 * math.hypot(res.log_p_std, mc.log_p_std)
    assert res.x_adv is not None and bool(threat.contains(res.x_adv[None], x[None]))
    assert int(model(res.x_adv[None]).argmax()) != y


def _milp_margin(net: Network, x: Tensor, y: int, eps: float, k: int) -> float:
    """The exact minimum over the box of ``f_y - max_{j != y} f_j`` (positive: the property is proved)."""
    lo, hi = (x - eps).clamp(0, 1), (x + eps).clamp(0, 1)
    values = []
    for j in range(k):
        if j != y:
            c = torch.zeros(k, dtype=torch.float64)
            c[y], c[j] = 1.0, -1.0
            values.append(milp_minimum(net, lo, hi, c)[0])
    return min(values)


@pytest.mark.parametrize("seed", [3, 10])
def test_minus_infinity_where_milp_proves_the_property(seed: int) -> None:
    model, x, y, shape = _net_case(seed)
    net = Network.from_module(model, shape)
    lo, hi = 0.0, 0.6  # bisect the exact robust radius, then estimate just inside and just outside it
    for _ in range(8):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if _milp_margin(net, x, y, mid, 3) > 0 else (lo, mid)
    margin = _milp_margin(net, x, y, 0.95 * lo, 3)
    assert 0 < margin < 0.1, "the proved margin is small: the levels get close to 0 but cannot cross"
    res = multilevel_splitting(model, x, y, LpBall("linf", 0.95 * lo), n_particles=200, mh_steps=20)
    assert res.log_p == -math.inf and math.isnan(res.log_p_std) and res.x_adv is None
    assert res.termination in ("stalled", "floor") and "not a proof" in res.note
    assert -margin - 1e-9 <= res.max_score < 0  # the best point seen, never above the exact maximum
    # just outside the exact radius MILP has a counterexample, and splitting finds violations
    assert _milp_margin(net, x, y, 1.1 * hi, 3) < 0
    out = multilevel_splitting(model, x, y, LpBall("linf", 1.1 * hi), n_particles=200, mh_steps=20)
    assert math.isfinite(out.log_p) and out.x_adv is not None and out.adv_distance <= 1.1 * hi + 1e-9


def test_floor_stops_a_run_with_minus_infinity() -> None:
    x = torch.full((4,), 0.5, dtype=torch.float64)
    a = torch.ones(4, dtype=torch.float64)
    model = halfspace_model(a, float(a @ x) + 0.4 - 1e-3)  # p = 1e-12 / 24 / 0.2^4 ~ 2.6e-11
    res = multilevel_splitting(model, x, 0, LpBall("linf", 0.1), n_particles=200, mh_steps=20, log_p_min=-10.0)
    assert res.log_p == -math.inf and res.termination == "floor" and res.n_levels == 5
    capped = multilevel_splitting(model, x, 0, LpBall("linf", 0.1), n_particles=200, mh_steps=20, max_levels=3)
    assert capped.termination == "max-levels" and capped.levels[-1] == 0.0 and capped.n_levels == 3


def test_several_runs_give_an_empirical_spread() -> None:
    d, eps = 6, 0.1
    x = torch.full((d,), 0.5, dtype=torch.float64)
    a = torch.linspace(1.0, 2.0, d, dtype=torch.float64)
    lo, hi = x - eps, x + eps
    t = solve_t(1e-5, lambda v: box_halfspace_probability(a, v, lo, hi), float(a @ x), float(a @ hi))
    res = multilevel_splitting(halfspace_model(a, t), x, 0, LpBall("linf", eps), n_runs=4, n_particles=300,
                               mh_steps=30)  # fmt: skip
    assert res.spread == "runs" and len(res.runs) == 4
    logs = torch.tensor([r.log_p for r in res.runs], dtype=torch.float64)
    assert res.log_p == pytest.approx(float(logs.exp().mean().log()))
    assert len({tuple(r.levels) for r in res.runs}) == 4, "the runs are independent"
    assert_close_to(res, box_halfspace_probability(a, t, lo, hi), factor=1.5)


def test_eps_zero_evaluates_the_point() -> None:
    a = torch.ones(3, dtype=torch.float64)
    x = torch.full((3,), 0.5, dtype=torch.float64)
    for t, want in ((1.4, 0.0), (1.6, -math.inf)):
        res = multilevel_splitting(halfspace_model(a, t), x, 0, LpBall("linf", 0.0))
        assert res.log_p == want and res.model_calls == 1 + (want == 0.0) and res.termination == "point"


# -------------------------------------------------------------------------------------------- contract
def test_model_calls_are_counted_exactly() -> None:
    model, x, y, _ = _net_case(4)
    for kwargs in ({}, {"n_runs": 3}, {"measure": "clip"}):
        wrapped = Counting(model)
        res = multilevel_splitting(wrapped, x, y, LpBall("linf", 0.2), n_particles=100, mh_steps=10, **kwargs)
        assert res.model_calls == wrapped.rows > 100
    wrapped = Counting(model)
    mc = naive_monte_carlo(wrapped, x, y, LpBall("l2", 0.3), n=5000, batch_size=999)
    assert mc.model_calls == wrapped.rows == 5000 + (mc.x_adv is not None)


def test_deterministic_with_a_seed() -> None:
    model, x, y, _ = _net_case(5)
    threat = LpBall("linf", 0.3)
    first = multilevel_splitting(model, x, y, threat, n_particles=100, mh_steps=10, seed=7)
    again = multilevel_splitting(model, x, y, threat, n_particles=100, mh_steps=10, seed=7)
    other = multilevel_splitting(model, x, y, threat, n_particles=100, mh_steps=10, seed=8)
    assert (first.log_p, first.levels, first.acceptance, first.model_calls) == (
        again.log_p, again.levels, again.acceptance, again.model_calls,
    )  # fmt: skip
    assert torch.equal(first.x_adv, again.x_adv)
    assert first.levels != other.levels
    m1 = naive_monte_carlo(model, x, y, threat, n=3000, seed=3)
    m2 = naive_monte_carlo(model, x, y, threat, n=3000, seed=3)
    assert (m1.hits, m1.adv_distance) == (m2.hits, m2.adv_distance)


def test_eval_mode_for_the_call_and_restored() -> None:
    seen: list[bool] = []

    class Spy(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = halfspace_model(torch.ones(2, dtype=torch.float64), 1.15)
            self.drop = nn.Dropout(0.5)

        def forward(self, x: Tensor) -> Tensor:
            seen.append(self.training)
            return self.drop(self.lin(x))

    model = Spy().train()
    multilevel_splitting(model, torch.full((2,), 0.5, dtype=torch.float64), 0, LpBall("linf", 0.1), n_particles=50,
                         mh_steps=5)  # fmt: skip
    assert seen and not any(seen) and model.training and model.drop.training


def test_float32_model_and_image_shaped_input() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.Flatten(), nn.Linear(2 * 4 * 4, 3)).eval()
    x = torch.rand(1, 6, 6)
    y = int(model(x[None]).argmax())
    res = multilevel_splitting(model, x, y, LpBall("linf", 0.5), n_particles=100, mh_steps=5, max_levels=4)
    assert res.log_p <= 0 and res.n_levels <= 4
    if res.x_adv is not None:
        assert res.x_adv.shape == x.shape and res.x_adv.dtype == torch.float32


# -------------------------------------------------------------------------------------------- data sets
def _linear_data() -> tuple[nn.Module, Dataset]:
    a = torch.tensor([1.0, 1.0, 1.0], dtype=torch.float64)
    model = halfspace_model(a, 1.5)  # class 1 once the sum of the features reaches 1.5
    x = torch.tensor(
        [[0.45, 0.45, 0.45], [0.2, 0.2, 0.2], [0.6, 0.6, 0.6], [0.47, 0.47, 0.47], [0.1, 0.3, 0.2]],
    )  # fmt: skip
    return model, Dataset(x, torch.zeros(5, dtype=torch.long), num_classes=2, name="linear")


def test_estimate_violation_records(tmp_path) -> None:
    model, data = _linear_data()
    threat = LpBall("linf", 0.1)
    res = estimate_violation(model, data, threat, n_particles=200, mh_steps=20, store=tmp_path / "s.db",
                             progress=False)  # fmt: skip
    rec = {r.index: r for r in res.records}
    assert [rec[i].status for i in range(5)] == ["falsified", "unknown", "falsified", "falsified", "unknown"]
    assert rec[2].adv_distance == 0.0 and rec[2].attack == "clean" and rec[2].clean_pred == 1
    for i in (0, 3):
        assert rec[i].attack == "amls" and 0 < rec[i].adv_distance <= 0.1 + 1e-6
    assert rec[1].adv_distance is None and rec[1].certified is None, "an estimate never certifies"
    # sample 0: x·1 = 1.35, the corner simplex of height 0.15 in the box of side 0.2
    want0 = box_halfspace_probability(torch.ones(3), 1.5, torch.full((3,), 0.35), torch.full((3,), 0.55))
    assert abs(res.log_p[0] - math.log(want0)) <= 3 * res.log_p_std[0]
    assert res.log_p[1] == -math.inf and res.log_p[4] == -math.inf
    assert res.clean_accuracy == pytest.approx(0.8) and res.falsified == pytest.approx(0.6)
    with Store(tmp_path / "s.db") as store:
        (run,) = store.runs()
        assert run.status == "complete" and run.kind == "amls"
        assert run.summary is not None and set(run.summary["log_p"]) == {"0", "1", "2", "3", "4"}
        assert run.summary["log_p"]["0"] == res.log_p[0]


def test_estimate_violation_resumes_after_interruption(tmp_path, monkeypatch) -> None:
    model, data = _linear_data()
    threat = LpBall("linf", 0.1)
    kw = {"n_particles": 100, "mh_steps": 10, "progress": False}
    reference = estimate_violation(model, data, threat, **kw)
    real = splitting_mod.multilevel_splitting
    calls: list[int] = []
    interrupt = [True]

    def flaky(*args, **kwargs):
        calls.append(kwargs["seed"])
        if len(calls) == 3 and interrupt[0]:
            interrupt[0] = False
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(splitting_mod, "multilevel_splitting", flaky)
    path = tmp_path / "runs.db"
    with pytest.raises(KeyboardInterrupt):
        estimate_violation(model, data, threat, store=path, **kw)
    with Store(path) as store:
        (run,) = store.runs()
        assert run.status == "running" and run.n_records == 2
    calls.clear()
    resumed = estimate_violation(model, data, threat, store=path, **kw)
    assert len(calls) == 3, "only the samples not yet stored are estimated again"
    assert resumed.log_p == reference.log_p
    got = sorted(resumed.records, key=lambda r: r.index)
    want = sorted(reference.records, key=lambda r: r.index)
    assert [(r.status, r.adv_distance) for r in got] == [(r.status, r.adv_distance) for r in want]
    with Store(path) as store:
        (run,) = store.runs()
        assert run.status == "complete" and len(run.summary["log_p"]) == 5
        stored = store.records(run.id)
    assert {r.index: r.extra["log_p"] for r in stored} == reference.log_p
    assert all(r.queries is not None and r.queries > 1 for r in stored if r.clean_pred == r.label)


# -------------------------------------------------------------------------------------------- bad input
def test_bad_input_raises_input_error() -> None:
    model = halfspace_model(torch.ones(3, dtype=torch.float64), 1.5)
    x = torch.full((3,), 0.5, dtype=torch.float64)
    ball = LpBall("linf", 0.1)
    cases = [
        ({"rho": 0.0}, "rho"), ({"rho": 1.0}, "rho"), ({"rho": 1.5}, "rho"),
        ({"n_particles": 1}, "n_particles"), ({"n_particles": 2.5}, "n_particles"),
        ({"mh_steps": 0}, "mh_steps"), ({"max_levels": 0}, "max_levels"), ({"log_p_min": 0.0}, "log_p_min"),
        ({"target_acceptance": 1.0}, "target_acceptance"), ({"width_dec": 2.0}, "width_dec"),
        ({"width_inc": 0.5}, "width_inc"), ({"n_runs": 0}, "n_runs"), ({"measure": "reject"}, "measure"),
        ({"seed": -1}, "seed"),
    ]  # fmt: skip
    for kwargs, word in cases:
        with pytest.raises(InputError, match=word):
            multilevel_splitting(model, x, 0, ball, **kwargs)
    with pytest.raises(InputError, match="LpBall"):
        multilevel_splitting(model, x, 0, FlowThreat(1.0))
    with pytest.raises(InputError, match="LpBall"):
        naive_monte_carlo(model, x, 0, "linf")  # type: ignore[arg-type]
    with pytest.raises(InputError, match="norms"):
        multilevel_splitting(model, x, 0, LpBall("l1", 0.1))
    with pytest.raises(InputError, match="eps"):
        multilevel_splitting(model, x, 0, LpBall("linf", -0.1))
    with pytest.raises(InputError, match="finite eps"):
        multilevel_splitting(model, x, 0, LpBall("linf", math.inf))
    with pytest.raises(InputError, match="NaN"):
        multilevel_splitting(model, torch.tensor([0.5, math.nan, 0.5]), 0, ball)
    with pytest.raises(InputError, match="outside the threat's domain"):
        multilevel_splitting(model, torch.tensor([0.5, 1.5, 0.5]), 0, ball)
    with pytest.raises(InputError, match="outside the model's 2 classes"):
        multilevel_splitting(model, x, 2, ball)
    with pytest.raises(InputError, match="y must be"):
        multilevel_splitting(model, x, -1, ball)
    with pytest.raises(InputError, match="one integer class"):
        multilevel_splitting(model, x, torch.tensor([0, 1]), ball)
    with pytest.raises(InputError, match=r"torch\.Tensor"):
        multilevel_splitting(model, [0.5, 0.5, 0.5], 0, ball)  # type: ignore[arg-type]
    with pytest.raises(InputError, match=r"torch\.nn\.Module"):
        multilevel_splitting(lambda t: t, x, 0, ball)  # type: ignore[arg-type]
    with pytest.raises(InputError, match="n must be"):
        naive_monte_carlo(model, x, 0, ball, n=0)
    with pytest.raises(InputError, match="confidence"):
        naive_monte_carlo(model, x, 0, ball, confidence=1.0)
    # exact rejection sampling of ball ∩ domain is refused where almost no ball point is in the domain
    corner = torch.zeros(200, dtype=torch.float64)
    wide = halfspace_model(torch.ones(200, dtype=torch.float64), 1.0)
    with pytest.raises(InputError, match="measure='clip'"):
        multilevel_splitting(wide, corner, 0, LpBall("l2", 0.5), measure="intersect", n_particles=10)
    assert multilevel_splitting(wide, corner, 0, LpBall("l2", 0.5), n_particles=10, mh_steps=2).measure == "clip"
    _, data = _linear_data()
    with pytest.raises(InputError, match="domain"):
        estimate_violation(model, data, LpBall("linf", 0.1, domain=(-1.0, 1.0)), progress=False)


# -------------------------------------------------------------------------------------------- slow / cuda
@pytest.mark.slow
def test_paper_defaults_on_a_tiny_probability() -> None:
    d, eps = 8, 0.1
    x = torch.full((d,), 0.5, dtype=torch.float64)
    a = torch.linspace(1.0, 2.0, d, dtype=torch.float64)
    lo, hi = x - eps, x + eps
    for target in (1e-8, 1e-10):
        t = solve_t(target, lambda v: box_halfspace_probability(a, v, lo, hi), float(a @ x), float(a @ hi))
        truth = box_halfspace_probability(a, t, lo, hi)
        for n_runs in (1, 4):
            res = multilevel_splitting(halfspace_model(a, t), x, 0, LpBall("linf", eps), n_runs=n_runs)
            assert_close_to(res, truth, factor=2.0)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_runs_on_cuda() -> None:
    d, eps = 6, 0.1
    x = torch.full((d,), 0.5, dtype=torch.float64)
    a = torch.linspace(1.0, 2.0, d, dtype=torch.float64)
    lo, hi = x - eps, x + eps
    t = solve_t(1e-6, lambda v: box_halfspace_probability(a, v, lo, hi), float(a @ x), float(a @ hi))
    model = halfspace_model(a, t).cuda()
    res = multilevel_splitting(model, x.cuda(), 0, LpBall("linf", eps), **FAST)
    again = multilevel_splitting(model, x.cuda(), 0, LpBall("linf", eps), **FAST)
    assert res.log_p == again.log_p and res.x_adv is not None and res.x_adv.is_cuda
    assert_close_to(res, box_halfspace_probability(a, t, lo, hi), factor=2.0)
    mc = naive_monte_carlo(model, x.cuda(), 0, LpBall("l2", eps), n=1000)
    assert mc.n == 1000
