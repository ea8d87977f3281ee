"""CLEVER: exact on linear classifiers, the fitted end point against known maxima of smooth models, the uniform
ball sampler, targeted against untargeted scores, the bracket with CROWN and FAB where it must hold, the store and
resume, reproducibility and bad input."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import stats
from tests.verify.nets import random_fc
from torch import nn

from bastion.attacks.fab import FAB
from bastion.data import Dataset, load_digits
from bastion.errors import InputError
from bastion.statistical.clever import (
    DEFAULT_RADIUS,
    clever,
    clever_scores,
    fit_reverse_weibull,
    sample_ball,
)
from bastion.store import Store
from bastion.threat import LpBall, lp_norm
from bastion.verify.certify import certified_radius
from bastion.verify.ir import as_network

WIDE = (-10.0, 10.0)  # wide enough that clipping to the domain never matters below
DUAL_ORD = {"l2": 2.0, "linf": 1.0, "l1": math.inf}  # the dual norm q of each p
NORMS = ("l2", "linf", "l1")


def _linear(w: torch.Tensor, b: torch.Tensor) -> nn.Module:
    lin = nn.Linear(w.shape[1], w.shape[0]).double()
    with torch.no_grad():
        lin.weight.copy_(w)
        lin.bias.copy_(b)
    return lin


def _exact_linear(w: torch.Tensor, b: torch.Tensor, x: torch.Tensor, norm: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Per sample: min over j != c of (f_c - f_j) / ||w_c - w_j||_q, and the argmin class (no box)."""
    logits = x @ w.T + b
    c = logits.argmax(1)
    diff = w[c][:, None, :] - w[None, :, :]  # (N, K, D)
    dist = (logits.gather(1, c[:, None]) - logits) / torch.linalg.vector_norm(diff, ord=DUAL_ORD[norm], dim=2)
    dist = dist.scatter(1, c[:, None], math.inf)
    return dist.min(1).values, dist.argmin(1)


class Quadratic(nn.Module):
    """Two logits ``f_0 = a·x + |x|²/2 + 10`` and ``f_1 = 0``: ``∇(f_0 - f_1) = a + x``, whose largest dual norm on
    a ball around ``x0`` has a closed form."""

    def __init__(self, a: torch.Tensor) -> None:
        super().__init__()
        self.a = nn.Parameter(a.clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f0 = x @ self.a + 0.5 * (x * x).sum(1) + 10.0
        return torch.stack([f0, torch.zeros_like(f0)], 1)


def _quadratic_max(a: torch.Tensor, x0: torch.Tensor, norm: str, r: float) -> float:
    v = a + x0
    d = v.numel()
    return {"l2": float(v.norm()) + r, "linf": float(v.abs().sum()) + d * r, "l1": float(v.abs().max()) + r}[norm]


# ------------------------------------------------------------------------------------------- the sampler
@pytest.mark.parametrize("norm", NORMS)
def test_sampler_stays_in_ball_and_domain(norm: str) -> None:
    g = torch.Generator().manual_seed(0)
    x0 = torch.tensor([0.02, 0.5, 0.97, 0.3, 0.0, 1.0], dtype=torch.float64)  # near and on the box faces
    radius = {"l2": 0.4, "linf": 0.1, "l1": 0.6}[norm]
    pts = sample_ball(x0, 4000, norm=norm, radius=radius, domain=(0.0, 1.0), generator=g)
    assert pts.shape == (4000, 6) and pts.dtype == torch.float64
    assert bool((pts >= 0).all()) and bool((pts <= 1).all())
    assert bool(LpBall(norm, radius).contains(pts, x0.expand(4000, 6)).all())
    assert bool((pts != x0).any(1).float().mean() > 0.99)


@pytest.mark.parametrize("norm", NORMS)
def test_sampler_is_uniform_in_the_ball(norm: str) -> None:
    """Without clipping, ``(||δ||_p / R)^d`` is U(0, 1) for l2 and l1, and l∞ coordinates are U(-R, R)."""
    g = torch.Generator().manual_seed(1)
    d, radius, n = 5, 0.7, 3000
    x0 = torch.zeros(d, dtype=torch.float64)
    delta = sample_ball(x0, n, norm=norm, radius=radius, domain=WIDE, generator=g)
    if norm == "linf":
        u = (delta.flatten().numpy() + radius) / (2 * radius)
    else:
        u = (lp_norm(delta, norm) / radius).numpy() ** d
    assert stats.kstest(u, "uniform").pvalue > 1e-3
    # every orthant equally likely: each coordinate's sign is a fair coin
    assert abs(float((delta > 0).double().mean()) - 0.5) < 0.02


# ------------------------------------------------------------------------------------------- the fit
@pytest.mark.parametrize("seed", range(3))
def test_fit_recovers_the_end_point_of_reverse_weibull_maxima(seed: int) -> None:
    """Maxima drawn from a reverse Weibull whose sample maximum stays a few % short of the end point: the fitted
    location is closer to it than the sample maximum, and within 4 %."""
    rng = np.random.default_rng(seed)
    end, shape = 3.0 + seed, 3.0 + 0.5 * seed
    maxima = end - stats.weibull_min.rvs(shape, scale=1.0, size=200, random_state=rng)
    fit = fit_reverse_weibull(maxima)
    assert not fit.fallback, fit.reason
    assert fit.ks_pvalue > 1e-3 and fit.location >= maxima.max() == fit.sample_max
    assert abs(fit.location - end) < abs(maxima.max() - end)
    assert abs(fit.location - end) <= 0.04 * end
    assert abs(fit.shape - shape) <= 0.5 * shape


def test_fit_falls_back_to_the_sample_maximum() -> None:
    const = fit_reverse_weibull(np.full(50, 2.5))
    assert const.fallback and const.location == 2.5 and math.isnan(const.ks_pvalue)
    # two far clusters are no Weibull sample: every fit fails the KS test
    rng = np.random.default_rng(0)
    bimodal = np.concatenate([rng.normal(1.0, 0.01, 200), rng.normal(5.0, 0.01, 200)])
    fit = fit_reverse_weibull(bimodal)
    assert fit.fallback and fit.location == bimodal.max() and "p-value" in fit.reason


# ------------------------------------------------------------------------------------------- known answers
@pytest.mark.parametrize("norm", NORMS)
def test_exact_on_linear_classifiers(norm: str) -> None:
    """On ``f = W x + b`` the gradient is constant: the score is margin / ||w_c - w_j||_q, minimised over j."""
    for seed in range(5):
        g = torch.Generator().manual_seed(seed)
        w = torch.randn(4, 6, generator=g, dtype=torch.float64)
        b = torch.randn(4, generator=g, dtype=torch.float64)
        x = torch.rand(5, 6, generator=g, dtype=torch.float64) * 2 - 1
        exact, argmin = _exact_linear(w, b, x, norm)
        res = clever(_linear(w, b), x, norm=norm, radius=50.0, n_batches=10, batch_size=32, domain=WIDE)
        torch.testing.assert_close(res.scores, exact, rtol=0.05, atol=0.0)
        assert torch.equal(res.targets, argmin)
        assert res.certified is False and res.estimate is True
        assert bool(res.fallback.all()) and set(res.reasons) == {"all maxima are equal"}


def test_score_is_capped_at_the_radius() -> None:
    g = torch.Generator().manual_seed(3)
    w, b = torch.randn(3, 4, generator=g, dtype=torch.float64), torch.randn(3, generator=g, dtype=torch.float64)
    x = torch.rand(6, 4, generator=g, dtype=torch.float64)
    exact, _ = _exact_linear(w, b, x, "l2")
    radius = float(exact.median())
    res = clever(_linear(w, b), x, radius=radius, n_batches=5, batch_size=16, domain=WIDE)
    torch.testing.assert_close(res.scores, exact.clamp(max=radius))


@pytest.mark.parametrize("norm", NORMS)
def test_fitted_location_matches_the_largest_gradient_norm_of_a_smooth_model(norm: str) -> None:
    """Gradient norms vary over the ball: the reverse Weibull fit (not the fallback) finds their maximum."""
    a = torch.tensor([0.7, -0.3], dtype=torch.float64)
    x0 = torch.tensor([[0.2, 0.1]], dtype=torch.float64)
    radius = 0.5
    res = clever(Quadratic(a).double(), x0, norm=norm, radius=radius, n_batches=40, batch_size=256, domain=WIDE)
    true_max = _quadratic_max(a, x0[0], norm, radius)
    assert not bool(res.fallback[0]), res.reasons[0]
    assert float(res.ks_pvalue[0]) > 1e-3
    assert float(res.location[0]) >= float(res.sample_max[0])
    assert abs(float(res.location[0]) - true_max) <= 0.02 * true_max
    with torch.no_grad():
        margin = float(Quadratic(a).double()(x0)[0, 0])
    assert float(res.scores[0]) == pytest.approx(min(margin / float(res.location[0]), radius), rel=1e-9)


# ------------------------------------------------------------------------------------------- targets
def test_untargeted_is_the_minimum_of_the_targeted_scores() -> None:
    """The same per-sample streams in every mode: each targeted score is the untargeted run's class score."""
    # one initial shape keeps the fits cheap; the identity holds for any fit
    kw = {"norm": "l2", "radius": 0.8, "n_batches": 12, "batch_size": 64, "domain": (-3.0, 3.0), "c_init": (5.0,)}
    model, shape = random_fc(1, "tanh")
    x = (torch.randn(3, *shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)).clamp(-2, 2)
    un = clever(model, x, **kw)  # type: ignore[arg-type]
    assert un.target == "untargeted" and not bool(un.fallback.all())
    per_class = []
    for j in range(3):
        keep = un.labels != j
        t = torch.where(keep, torch.full_like(un.labels, j), (un.labels + 1) % 3)
        res = clever(model, x, target=t, **kw)  # type: ignore[arg-type]
        per_class.append(torch.where(keep, res.scores, torch.full_like(res.scores, math.inf)))
        torch.testing.assert_close(res.scores[keep], un.class_scores[keep, j])
    torch.testing.assert_close(un.scores, torch.stack(per_class, 1).min(1).values)
    with torch.no_grad():
        logits = model(x)
    expected = {"top2": logits.topk(2, dim=1).indices[:, 1], "least_likely": logits.argmin(1), "random": None}
    for name, classes in expected.items():
        res = clever(model, x, target=name, **kw)  # type: ignore[arg-type]
        assert res.target == name and bool((res.targets != res.labels).all())
        if classes is not None:
            assert torch.equal(res.targets, classes)
        torch.testing.assert_close(res.scores, un.class_scores.gather(1, res.targets[:, None]).squeeze(1))
        assert bool((res.scores >= un.scores - 1e-12).all())


def test_misclassified_samples_score_zero() -> None:
    g = torch.Generator().manual_seed(0)
    w, b = torch.randn(3, 4, generator=g, dtype=torch.float64), torch.randn(3, generator=g, dtype=torch.float64)
    x = torch.rand(4, 4, generator=g, dtype=torch.float64)
    pred = (x @ w.T + b).argmax(1)
    y = pred.clone()
    y[1] = (pred[1] + 1) % 3
    res = clever(_linear(w, b), x, y, n_batches=4, batch_size=8, domain=WIDE)
    assert float(res.scores[1]) == 0.0 and int(res.targets[1]) == -1
    assert bool((res.scores[[0, 2, 3]] > 0).all())


# ------------------------------------------------------------------------------------------- the bracket
@pytest.fixture(scope="module")
def digits_linear() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """A ridge-regression linear classifier of the digits and six of the images it classifies correctly."""
    data = load_digits()
    x = data.x.reshape(len(data), -1).double()
    onehot = torch.nn.functional.one_hot(data.y, 10).double()
    xa = torch.cat([x, torch.ones(len(x), 1, dtype=torch.float64)], 1)
    sol = torch.linalg.solve(xa.T @ xa + 1e-2 * torch.eye(65, dtype=torch.float64), xa.T @ onehot)
    model = _linear(sol[:64].T.contiguous(), sol[64].contiguous())
    with torch.no_grad():
        ok = (model(x).argmax(1) == data.y).nonzero().squeeze(1)[:6]
    return model, x[ok], data.y[ok]


@pytest.mark.parametrize("norm", NORMS)
def test_linear_model_score_lies_in_the_crown_fab_bracket(norm: str, digits_linear) -> None:
    """With a box that never binds, CROWN is exact on a linear model and FAB cannot beat the true distance, so
    certified <= CLEVER <= found must hold (up to the bisection tolerance)."""
    model, x, y = digits_linear
    exact, _ = _exact_linear(model.weight.detach(), model.bias.detach(), x, norm)
    res = clever(model, x, y, norm=norm, radius=100.0, n_batches=5, batch_size=16, domain=WIDE)
    cert = certified_radius(as_network(model, (64,)), x, y, LpBall(norm, 0.1, WIDE))
    found = FAB(steps=30)(model, x, y, threat=LpBall(norm, math.inf, WIDE))
    assert bool(found.success.all())
    torch.testing.assert_close(res.scores, exact, rtol=1e-6, atol=0.0)
    assert bool((cert <= res.scores * (1 + 1e-6)).all())
    assert bool((cert >= res.scores * (1 - 2e-3)).all())  # CROWN is exact here: only the bisection tolerance
    assert bool((res.scores <= found.distance.double().cpu() * (1 + 1e-6)).all())


# ------------------------------------------------------------------------------------------- data sets, store
class _Failing(nn.Module):
    """Wraps a model and raises after ``budget`` forward passes (the attribute is not in the state dict)."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner
        self.budget = -1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.budget == 0:
            raise RuntimeError("interrupted")
        self.budget -= 1
        return self.inner(x)


def _small_data() -> tuple[nn.Module, Dataset]:
    model, shape = random_fc(4, "tanh")
    g = torch.Generator().manual_seed(4)
    x = torch.rand(7, *shape, generator=g)
    with torch.no_grad():
        y = model(x.double()).argmax(1)
    y[5] = (y[5] + 1) % 3  # one clean misclassification
    return model.float(), Dataset(x, y, num_classes=3, name="random")


def test_clever_scores_records_and_batching_independence() -> None:
    model, data = _small_data()
    kw = {"norm": "linf", "radius": 0.2, "n_batches": 8, "batch_size": 32, "target": "top2", "c_init": (1.0,)}
    kw["progress"] = False
    one = clever_scores(model, data, samples_per_write=2, **kw)  # type: ignore[arg-type]
    two = clever_scores(model, data, samples_per_write=5, **kw)  # type: ignore[arg-type]
    assert one.scores() == two.scores() and len(one.records) == 7
    assert one.certified is False and one.estimate is True
    for rec, row in zip(one.records, one.per_sample):
        assert rec.index == row["index"] and rec.certified is None
        if rec.index == 5:
            assert (rec.status, rec.adv_distance, rec.attack, row["score"]) == ("falsified", 0.0, "clean", 0.0)
        else:
            assert rec.status == "unknown" and rec.adv_distance is None and 0 < row["score"] <= 0.2
    assert one.clean_accuracy == pytest.approx(6 / 7)
    direct = clever(model, data.x[:2], data.y[:2], **{k: v for k, v in kw.items() if k != "progress"})
    assert direct.scores.tolist() == one.scores()[:2]


def test_clever_scores_resumes_after_an_interruption(tmp_path) -> None:
    model, data = _small_data()
    wrapped = _Failing(model)
    kw = {"norm": "l2", "radius": 0.5, "n_batches": 6, "batch_size": 16, "samples_per_write": 2, "progress": False}
    kw.update(target="top2", c_init=(1.0,))
    path = tmp_path / "clever.db"
    wrapped.budget = 1 + 6 + 1 + 3  # the first batch, then an interruption inside the second
    with pytest.raises(RuntimeError, match="interrupted"):
        clever_scores(wrapped, data, store=path, **kw)  # type: ignore[arg-type]
    with Store(path) as store:
        (run,) = store.runs()
        assert run.status == "running" and run.n_records == 2
    wrapped.budget = -1
    resumed = clever_scores(wrapped, data, store=path, **kw)  # type: ignore[arg-type]
    fresh = clever_scores(model, data, **kw)  # type: ignore[arg-type]
    assert resumed.scores() == fresh.scores() and len(resumed.records) == 7
    with Store(path) as store:
        (run,) = store.runs()
        assert run.status == "complete" and run.summary is not None
        assert [row["score"] for row in run.summary["per_sample"]] == fresh.scores()
        assert run.summary["certified"] is False and run.summary["estimate"] is True
        stored = store.records(run.id)
    # each record carries its score and fit, and its model calls (the clean query, then N_b * N_s points)
    assert [r.extra["score"] for r in stored] == fresh.scores()
    assert all(set(r.extra) >= {"target", "location", "shape", "ks_pvalue", "fallback"} for r in stored)
    assert [r.queries for r in stored] == [1 if r.index == 5 else 1 + 6 * 16 for r in stored]
    again = clever_scores(wrapped, data, store=path, **kw)  # type: ignore[arg-type]
    assert again.scores() == fresh.scores()


# ------------------------------------------------------------------------------------------- contract
def test_reproducible_with_the_same_seed_and_eval_mode_restored() -> None:
    model, shape = random_fc(2, "tanh")
    model.train()
    x = torch.randn(2, *shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64).clamp(-2, 2)
    kw = {"radius": 0.8, "n_batches": 10, "batch_size": 32, "domain": (-3.0, 3.0), "c_init": (5.0,)}
    a = clever(model, x, seed=3, **kw)  # type: ignore[arg-type]
    b = clever(model, x, seed=3, **kw)  # type: ignore[arg-type]
    c = clever(model, x, seed=4, **kw)  # type: ignore[arg-type]
    assert torch.equal(a.scores, b.scores) and torch.equal(a.sample_max, b.sample_max)
    assert not torch.equal(a.sample_max, c.sample_max)
    # the chunking of points into forward passes does not change anything
    d = clever(model, x, seed=3, chunk_points=20, **kw)  # type: ignore[arg-type]
    assert torch.equal(a.sample_max, d.sample_max)
    assert all(m.training for m in model.modules())
    assert a.model_calls == 2 + 2 * 10 * 32 and a.grad_calls == 2 * 10 * 32 * 2
    assert DEFAULT_RADIUS == {"l2": 5.0, "linf": 0.1, "l1": 30.0}


def test_bad_input_is_named() -> None:
    model = _linear(torch.eye(3, dtype=torch.float64), torch.zeros(3, dtype=torch.float64))
    x = torch.full((2, 3), 0.5, dtype=torch.float64)
    x[0, 0] = 0.9
    x[1, 1] = 0.9
    ok = {"n_batches": 2, "batch_size": 4}
    cases = [
        ({"norm": "l7"}, "norm"),
        ({"norm": "l0"}, "norm"),
        ({"radius": 0.0}, "radius"),
        ({"radius": -1.0}, "radius"),
        ({"radius": math.nan}, "radius"),
        ({"radius": math.inf}, "radius"),
        ({"n_batches": 0}, "n_batches"),
        ({"batch_size": 0}, "batch_size"),
        ({"n_batches": 2.5}, "n_batches"),
        ({"target": "second"}, "target"),
        ({"target": torch.tensor([1])}, "shape"),
        ({"target": torch.tensor([1, 3])}, r"\[0, 3\)"),
        ({"target": torch.tensor([0, 0])}, "own class"),
        ({"target": torch.tensor([1.0, 2.0])}, "integers"),
        ({"c_init": []}, "c_init"),
        ({"c_init": [1.0, -2.0]}, "c_init"),
        ({"min_pvalue": 1.5}, "min_pvalue"),
        ({"shape_reg": -1.0}, "shape_reg"),
        ({"domain": (1.0, 0.0)}, "domain"),
    ]
    for kwargs, match in cases:
        with pytest.raises(InputError, match=match):
            clever(model, x, **{**ok, **kwargs})  # type: ignore[arg-type]
    with pytest.raises(InputError, match="NaN"):
        clever(model, torch.full((1, 3), math.nan, dtype=torch.float64), **ok)  # type: ignore[arg-type]
    with pytest.raises(InputError):
        clever(model, x + 2, **ok)  # type: ignore[arg-type]
    with pytest.raises(InputError, match="labels"):
        clever(model, x, torch.tensor([0, 5]), **ok)  # type: ignore[arg-type]
    with pytest.raises(InputError, match="model"):
        clever(lambda t: t, x, **ok)  # type: ignore[arg-type]
    with pytest.raises(InputError, match="maxima"):
        fit_reverse_weibull([1.0])
    with pytest.raises(InputError, match="data"):
        clever_scores(model, [x], **ok)  # type: ignore[arg-type]
    with pytest.raises(InputError, match="samples_per_write"):
        clever_scores(model, (x.float(), torch.tensor([0, 1])), samples_per_write=0, **ok)  # type: ignore[arg-type]


@pytest.mark.cuda
def test_runs_on_cuda() -> None:
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    g = torch.Generator().manual_seed(0)
    w, b = torch.randn(4, 6, generator=g, dtype=torch.float64), torch.randn(4, generator=g, dtype=torch.float64)
    x = torch.rand(3, 6, generator=g, dtype=torch.float64)
    exact, _ = _exact_linear(w, b, x, "l2")
    res = clever(_linear(w, b).cuda(), x.cuda(), radius=50.0, n_batches=4, batch_size=64, domain=WIDE)
    torch.testing.assert_close(res.scores, exact, rtol=1e-6, atol=0.0)
    model, shape = random_fc(1, "tanh")
    xs = torch.randn(2, *shape, dtype=torch.float64).clamp(-2, 2)
    on_gpu = clever(model.cuda(), xs.cuda(), radius=0.5, n_batches=8, batch_size=64, domain=(-3.0, 3.0))
    assert bool(torch.isfinite(on_gpu.scores).all()) and bool((on_gpu.scores > 0).all())
