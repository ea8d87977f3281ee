"""CLEVER: an extreme-value estimate of the minimal adversarial distance (an estimate, never a certificate).

Weng, Zhang, Chen, Yi, Su, Gao, Hsieh & Daniel, "Evaluating the Robustness of Neural Networks: An Extreme Value
Theory Approach", ICLR 2018 (Algorithm 1, CLEVER-t, and Algorithm 2, CLEVER-u). Reference code: IBM's
``CLEVER-Robustness-Score`` (``collect_gradients.py``, ``estimate_gradient_norm.py``, ``clever.py``).

The idea. Let ``c`` be the class of ``x0`` and ``g(x) = f_c(x) - f_j(x)`` for another class ``j``. If ``L`` bounds
``||∇g||_q`` on the ball ``B_p(x0, R)`` (``q`` the dual norm of ``p``: 1/p + 1/q = 1), no perturbation of l_p norm
below ``min(g(x0) / L, R)`` reaches class ``j`` (the Cross-Lipschitz bound of Hein & Andriushchenko, NeurIPS 2017).
CLEVER *estimates* that local Lipschitz constant instead of bounding it:

1. sample ``n_batches`` (the paper's N_b = 500) batches of ``batch_size`` (N_s = 1024) points uniformly in the
   ball ``B_p(x0, R)``, clipped to the input domain (:func:`sample_ball`);
2. compute ``||∇g(x)||_q`` at every point (one forward pass per batch of points and one backward pass per class,
   all samples of a call grouped into the same passes) and keep each batch's maximum;
3. the batch maxima of a bounded variable follow, asymptotically, a reverse Weibull distribution whose location
   (the right end of its support) is the maximum of ``||∇g||_q`` on the ball (Fisher-Tippett-Gnedenko): fit it by
   maximum likelihood (``scipy.stats.weibull_min`` on the negated maxima) and read the location as ``L``;
4. the targeted score is ``min(g(x0) / L, R)``; the untargeted score (CLEVER-u) is the minimum over ``j != c``.

Targets (``target=``): ``None`` (untargeted: every class), ``"top2"`` (the runner-up class at ``x0``),
``"random"`` (a uniformly random class other than ``c``), ``"least_likely"`` (the smallest logit), as in the
paper's experiments, or an integer tensor with one class per sample.

The estimator, as in the reference code (``clever.py``, method ``mle_reg``, its default):

* the maxima are shifted by their maximum and divided by their range before fitting (helps the optimiser);
* the maximum-likelihood fit starts from each shape in ``c_init = (0.1, 1, 5, 10, 20, 50, 100)`` with SciPy's
  Nelder-Mead (``scipy.optimize.fmin``) and a penalty ``shape_reg · θ[2]²`` added to the negative log-likelihood
  against divergence (``θ = (c, loc, scale)`` of the rescaled fit; the reference's comment calls ``θ[2]`` the shape
  but the index it penalises is the scale, and that behaviour is what is kept here);
* each fit gets a Kolmogorov-Smirnov test against the fitted distribution; the fit with the best p-value is kept;
* the estimate falls back to the largest sampled maximum when no fit is usable: every fit failed or gave NaN,
  the best p-value is below ``min_pvalue = 0.001`` (the reference's "ill-conditioned samples" rule), or the fitted
  location lies below the sample maximum (impossible for a right end point), and also when all maxima are equal
  (e.g. a linear model, whose gradient is constant: the sample maximum is then exact). The result says so
  (``fallback``, ``reason``).

Default radius ``R`` (``radius=None``): the paper uses ``R = 5`` (on inputs in [-0.5, 0.5]); here ``R`` is both the
sampling radius and the cap of the score, as in Algorithm 1. Defaults per norm: ``l2``: 5 (the paper's value);
``linf``: 0.1 and ``l1``: 30, the largest sampling radii of the reference code for those balls
(``estimate_gradient_norm.py``: l∞ box of half-width 0.1, l1 and l2 radii scaled by U[0, 30] and U[0, 3]); an l∞
radius of 5 would cover the whole [0, 1] box and turn the local estimate into a global one.

Where this deviates from the reference code, and why:

* sampling is uniform in the ball of the score's own norm (the reference samples the l2 ball for every norm and
  reports the three dual-norm scores from the same samples; its l2 and l1 radii are also multiplied by a random
  U[0, b] scale, so its points are not uniform in any ball). Uniform sampling in ``B_p(x0, R)`` is what the paper's
  Algorithm 1 describes and what the theory needs (the maximum over the ball of the score's norm);
* the score is capped at ``R`` (Algorithm 1; the reference's ``clever.py`` does not cap);
* the fits run one after another in-process (the reference runs the seven initial shapes in a process pool);
* every sample has its own random stream, derived from ``(seed, index)``, so a sample's score does not depend on
  which other samples share its call or on where an interrupted :func:`clever_scores` run resumed.

What the score is not. CLEVER is a statistical estimate of a *lower bound*, not a proof: it can exceed the true
minimal adversarial distance (the sampled maximum gradient norm can miss a sharp region; gradient masking makes
this worse, Goodfellow 2018, "Gradient masking causes CLEVER to overestimate adversarial perturbation size").
Results therefore carry ``certified = False`` and ``estimate = True``, and :func:`clever_scores` never writes the
score into a record's ``certified`` field.

Storage. :func:`clever_scores` writes one record per sample whose ``extra`` holds its score and fit (score, target,
location, shape, scale, KS p-value, fallback, reason) and whose ``queries`` counts its model calls; ``certified``
stays None. The run summary also lists every sample's row (``summary["per_sample"]``).
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeAlias

import numpy as np
import scipy.optimize
import scipy.stats
import torch
from torch import Tensor, nn

from bastion.data import Dataset, as_dataset, validate_arrays
from bastion.errors import InputError
from bastion.models.checks import check_logits, eval_mode, model_device, model_fingerprint
from bastion.results import SampleRecord
from bastion.store import Store, resumable_run
from bastion.threat import LpBall, canonical_norm, check_domain, lp_norm

__all__ = [
    "C_INIT",
    "DEFAULT_RADIUS",
    "NORMS",
    "TARGETS",
    "CleverResult",
    "CleverRun",
    "WeibullFit",
    "clever",
    "clever_scores",
    "fit_reverse_weibull",
    "sample_ball",
]

#: Norms CLEVER supports.
NORMS: tuple[str, ...] = ("l2", "linf", "l1")
#: The dual norm ``q`` of each ``p`` (the norm of the gradient that bounds the change of ``g``).
DUAL: dict[str, str] = {"l2": "l2", "linf": "l1", "l1": "linf"}
#: Default sampling radius and score cap per norm (see the module docstring).
DEFAULT_RADIUS: dict[str, float] = {"l2": 5.0, "linf": 0.1, "l1": 30.0}
#: Initial Weibull shapes tried by the fit (the reference code's ``c_init``).
C_INIT: tuple[float, ...] = (0.1, 1.0, 5.0, 10.0, 20.0, 50.0, 100.0)
#: Named target selections of the paper's experiments.
TARGETS: tuple[str, ...] = ("top2", "random", "least_likely")

TargetSpec: TypeAlias = str | int | Tensor | Sequence[int] | None

# One forward pass holds at most this many points by default (memory knob; the result does not depend on it).
_CHUNK_POINTS = 4096
# Golden-ratio multiplier that spreads (seed, index) pairs over the generator's seed space.
_MIX = 0x9E3779B97F4A7C15


# ----------------------------------------------------------------------------------------------------- sampling
def sample_ball(
    x0: Tensor,
    n: int,
    *,
    norm: str,
    radius: float,
    domain: tuple[float, float] = (0.0, 1.0),
    generator: torch.Generator | None = None,
) -> Tensor:
    """``n`` points drawn uniformly from the l_p ball of ``radius`` around ``x0``, then clipped to the domain.

    l2: a Gaussian direction times ``radius · U^(1/d)``; l∞: a uniform point of the box; l1: ``d + 1`` standard
    exponentials normalised by their sum (a uniform point of the simplex) with random signs. The geometry is
    :meth:`bastion.threat.LpBall.random_start`; clipping to the domain moves every coordinate towards ``x0``, so
    the points stay in the ball.

    Args:
        x0: one input, of shape ``input_shape`` (no batch dimension), inside the domain.
        n: number of points.
        norm: ``"l2"``, ``"linf"`` or ``"l1"``.
        radius: radius of the ball, finite and > 0.
        domain: ``(lo, hi)`` box of the inputs.
        generator: random generator (on ``x0``'s device), or ``None`` for PyTorch's global one.

    Returns:
        ``(n, *x0.shape)`` points, in ``x0``'s dtype and on its device.
    """
    name = _check_norm(norm)
    r = _check_radius(radius, name)
    count = _positive_int("n", n)
    ball = LpBall(name, r, check_domain(domain))
    return ball.random_start(x0.unsqueeze(0).expand(count, *x0.shape), generator=generator)


# ----------------------------------------------------------------------------------------------------- the fit
@dataclass(frozen=True)
class WeibullFit:
    """A reverse Weibull fit of batch maxima (the estimate of their right end point).

    Attributes:
        location: the estimated right end point of the maxima's distribution (the maximum gradient norm): the
            fitted location, or the sample maximum on a fallback.
        shape: fitted Weibull shape ``c`` (NaN when nothing was fitted).
        scale: fitted scale (NaN when nothing was fitted).
        ks_statistic: Kolmogorov-Smirnov statistic of the kept fit (NaN when nothing was fitted).
        ks_pvalue: its p-value (NaN when nothing was fitted).
        sample_max: the largest of the maxima.
        fallback: ``True`` when ``location`` is the sample maximum rather than a fitted location.
        reason: why the fit was not used (empty when it was).
        c_init: the initial shape of the kept fit (NaN when nothing was fitted).
    """

    location: float
    shape: float
    scale: float
    ks_statistic: float
    ks_pvalue: float
    sample_max: float
    fallback: bool
    reason: str = ""
    c_init: float = math.nan


def _penalised_fmin(shape_reg: float) -> Any:
    """SciPy's Nelder-Mead with ``shape_reg · θ[2]²`` added to the negative log-likelihood (the reference's
    ``fmin_with_reg``; for ``weibull_min`` ``θ = (c, loc, scale)``)."""

    def optimizer(func: Any, x0: Any, args: tuple[Any, ...] = (), disp: int = 0) -> Any:
        def objective(theta: np.ndarray, *a: Any) -> float:
            return float(func(theta, *a)) + shape_reg * float(theta[2]) ** 2

        return scipy.optimize.fmin(objective, x0, args=args, xtol=1e-4, ftol=1e-4, disp=0)

    return optimizer


def fit_reverse_weibull(
    maxima: np.ndarray | Sequence[float] | Tensor,
    *,
    c_init: Sequence[float] = C_INIT,
    shape_reg: float = 0.01,
    min_pvalue: float = 0.001,
) -> WeibullFit:
    """Fit a reverse Weibull distribution to batch maxima and estimate their right end point.

    The maxima ``s`` are rescaled to ``(s - max s) / (max s - min s)``; ``weibull_min`` is fitted to the negated
    rescaled values from every initial shape in ``c_init`` (penalised likelihood, see the module docstring),
    mapped back, and tested with Kolmogorov-Smirnov against the negated original maxima. The fit with the best
    p-value gives ``location = -loc``. Fallback to ``max s``: all maxima equal, no fit succeeded, best p-value below
    ``min_pvalue``, or a location below ``max s``.

    Args:
        maxima: the batch maxima (1-D, at least 2 values, finite).
        c_init: initial shapes, each finite and > 0 (the reference's seven values by default).
        shape_reg: weight of the penalty of the reference's ``mle_reg`` method (0 for the plain maximum likelihood).
        min_pvalue: smallest acceptable KS p-value, in [0, 1).

    Returns:
        The :class:`WeibullFit`.
    """
    inits = _check_c_init(c_init)
    reg = _nonneg_float("shape_reg", shape_reg)
    pmin = _check_pvalue(min_pvalue)
    s = (maxima.detach().cpu().numpy() if isinstance(maxima, Tensor) else np.asarray(maxima)).astype(np.float64)
    s = s.reshape(-1)
    if s.size < 2 or not np.isfinite(s).all():
        raise InputError(f"maxima must hold at least 2 finite values, got {s.size} values")
    top, bottom = float(s.max()), float(s.min())
    spread = top - bottom
    nan = math.nan
    if spread <= 1e-12 * max(abs(top), 1e-300):
        return WeibullFit(top, nan, nan, nan, nan, top, True, "all maxima are equal")
    rescaled = (s - top) / spread
    optimizer = _penalised_fmin(reg) if reg > 0 else scipy.optimize.fmin
    best: tuple[float, float, float, float, float, float] | None = None  # p, ks, c, loc, scale, c0
    with warnings.catch_warnings(), np.errstate(all="ignore"):
        warnings.simplefilter("ignore")
        for c0 in inits:
            try:
                c, loc, scale = scipy.stats.weibull_min.fit(-rescaled, c0, optimizer=optimizer)
                loc = -top + loc * spread
                scale = scale * spread
                ks, p = scipy.stats.kstest(-s, "weibull_min", args=(c, loc, scale))
            except (ValueError, RuntimeError, FloatingPointError, OverflowError):
                continue
            if not np.isfinite([c, loc, scale, ks, p]).all():
                continue
            if best is None or p > best[0]:
                best = (float(p), float(ks), float(c), float(loc), float(scale), float(c0))
    if best is None:
        return WeibullFit(top, nan, nan, nan, nan, top, True, "every fit failed")
    p, ks, c, loc, scale, c0 = best
    if p < pmin:
        reason = f"best Kolmogorov-Smirnov p-value {p:.3g} < {pmin:g}"
        return WeibullFit(top, c, scale, ks, p, top, True, reason, c0)
    if -loc < top:
        return WeibullFit(top, c, scale, ks, p, top, True, "fitted location below the sample maximum", c0)
    return WeibullFit(-loc, c, scale, ks, p, top, False, "", c0)


# ----------------------------------------------------------------------------------------------------- results
@dataclass
class CleverResult:
    """CLEVER scores of a batch of inputs. **An estimate, not a certificate** (``certified`` is always False).

    Per-sample tensors (CPU) describe the class ``j`` that decided the score: the argmin over classes for the
    untargeted score, the target for a targeted one.

    Attributes:
        scores: ``(N,)`` CLEVER scores ``min(g(x0) / location, R)``; 0 where the model misclassifies ``x0``.
        targets: ``(N,)`` the class ``j`` of the score (-1 where the model misclassifies ``x0``).
        labels: ``(N,)`` the class ``c`` kept (``y`` if given, else the prediction).
        clean_pred: ``(N,)`` predictions at ``x0``.
        margins: ``(N,)`` ``g(x0) = f_c(x0) - f_j(x0)``.
        location: ``(N,)`` estimated maximum of ``||∇g||_q`` on the ball (fitted location, or sample maximum).
        shape: ``(N,)`` fitted reverse Weibull shape (NaN without a fit).
        scale: ``(N,)`` fitted scale (NaN without a fit).
        ks_pvalue: ``(N,)`` Kolmogorov-Smirnov p-value of the kept fit (NaN without a fit).
        sample_max: ``(N,)`` largest sampled gradient norm.
        fallback: ``(N,)`` booleans: ``location`` is the sample maximum (see ``reasons``).
        reasons: why each sample fell back ("" where the fit was used or the sample was misclassified).
        class_scores: ``(N, K)`` score per class (NaN for ``c`` and for classes not evaluated).
        norm: the norm ``p`` of the score.
        radius: the ball radius ``R`` (sampling radius and cap).
        target: ``"untargeted"``, ``"top2"``, ``"random"``, ``"least_likely"`` or ``"given"``.
        n_batches: batches per class (N_b).
        batch_size: points per batch (N_s).
        model_calls: forward evaluations, counted in points (``x0`` included).
        grad_calls: gradient evaluations, counted in points times classes (one backward pass per class).
        seconds: wall time.
        certified: always ``False``: CLEVER proves nothing.
        estimate: always ``True``.
    """

    scores: Tensor
    targets: Tensor
    labels: Tensor
    clean_pred: Tensor
    margins: Tensor
    location: Tensor
    shape: Tensor
    scale: Tensor
    ks_pvalue: Tensor
    sample_max: Tensor
    fallback: Tensor
    reasons: list[str]
    class_scores: Tensor
    norm: str
    radius: float
    target: str
    n_batches: int
    batch_size: int
    model_calls: int = 0
    grad_calls: int = 0
    seconds: float = 0.0
    certified: bool = False
    estimate: bool = True

    def per_sample(self, indices: Sequence[int] | None = None) -> list[dict[str, Any]]:
        """JSON-able per-sample rows (``index``, ``score``, ``target``, ``location``, ``shape``, ``scale``,
        ``ks_pvalue``, ``fallback``, ``reason``), indexed by ``indices`` (default: positions)."""
        idx = list(range(int(self.scores.shape[0]))) if indices is None else [int(i) for i in indices]
        return [
            {
                "index": idx[i], "score": float(self.scores[i]), "target": int(self.targets[i]),
                "location": float(self.location[i]), "shape": float(self.shape[i]), "scale": float(self.scale[i]),
                "ks_pvalue": float(self.ks_pvalue[i]), "fallback": bool(self.fallback[i]), "reason": self.reasons[i],
            }
            for i in range(len(idx))
        ]  # fmt: skip


@dataclass
class CleverRun:
    """CLEVER scores of a data set (from :func:`clever_scores`). **Estimates, not certificates.**

    Attributes:
        n: samples scored.
        threat: key of the sampling ball (``LpBall(norm, radius, domain).key``), the records' threat.
        norm: the norm of the scores.
        radius: the ball radius ``R``.
        target: target selection (``"untargeted"``, ``"top2"``, ``"random"``, ``"least_likely"``, ``"given"``).
        clean_accuracy: fraction of samples classified correctly.
        mean_score: mean score over the correctly classified samples (None if there are none).
        median_score: median score over the correctly classified samples (None if there are none).
        fallback_fraction: fraction of correctly classified samples whose estimate fell back to the sample maximum.
        per_sample: one JSON-able row per sample, in index order (see :meth:`CleverResult.per_sample`).
        records: the per-sample records (status ``unknown``, or ``falsified`` at distance 0 for a clean
            misclassification; ``certified`` is None: a CLEVER score certifies nothing).
        run_id: id of the run in the store, if any.
        seconds: wall time of this call.
        certified: always ``False``.
        estimate: always ``True``.
    """

    n: int
    threat: str
    norm: str
    radius: float
    target: str
    clean_accuracy: float
    mean_score: float | None
    median_score: float | None
    fallback_fraction: float | None
    per_sample: list[dict[str, Any]] = field(repr=False, default_factory=list)
    records: list[SampleRecord] = field(repr=False, default_factory=list)
    run_id: int | None = None
    seconds: float = 0.0
    certified: bool = False
    estimate: bool = True

    def scores(self) -> list[float]:
        """The score of every sample, in index order (0 for clean misclassifications)."""
        return [float(row["score"]) for row in self.per_sample]

    def to_dict(self) -> dict[str, Any]:
        """JSON-able summary, per-sample scores included (the run summary in the store)."""
        return {
            "n": self.n, "threat": self.threat, "norm": self.norm, "radius": self.radius, "target": self.target,
            "clean_accuracy": self.clean_accuracy, "mean_score": self.mean_score, "median_score": self.median_score,
            "fallback_fraction": self.fallback_fraction, "certified": False, "estimate": True,
            "run_id": self.run_id, "seconds": self.seconds, "per_sample": self.per_sample,
        }  # fmt: skip

    def table(self) -> str:
        """A short plain-text summary."""
        lines = [
            f"CLEVER ({self.target}, {self.norm}, R = {self.radius:g}): an estimate, not a certificate",
            f"samples             {self.n}",
            f"clean accuracy      {100 * self.clean_accuracy:.2f}%",
        ]
        if self.mean_score is not None:
            lines.append(f"mean score          {self.mean_score:.6g}")
            lines.append(f"median score        {self.median_score:.6g}")
            lines.append(f"fallback fraction   {self.fallback_fraction:.3f}")
        return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------- checks
def _check_norm(norm: object) -> str:
    name = canonical_norm(norm)  # type: ignore[arg-type]
    if name not in NORMS:
        raise InputError(f"CLEVER supports the norms {', '.join(NORMS)}, not {norm!r}")
    return name


def _check_radius(radius: object, norm: str) -> float:
    if radius is None:
        return DEFAULT_RADIUS[norm]
    if isinstance(radius, bool) or not isinstance(radius, (int, float)) or not math.isfinite(radius) or radius <= 0:
        raise InputError(f"radius must be a finite number > 0, got {radius!r}")
    return float(radius)


def _positive_int(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or int(value) < 1:
        raise InputError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def _nonneg_float(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise InputError(f"{name} must be a finite number >= 0, got {value!r}")
    return float(value)


def _check_pvalue(value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1:
        raise InputError(f"min_pvalue must be a number in [0, 1), got {value!r}")
    return float(value)


def _check_c_init(c_init: object) -> tuple[float, ...]:
    try:
        values = tuple(float(c) for c in c_init)  # type: ignore[attr-defined]
    except (TypeError, ValueError):
        raise InputError(f"c_init must be a sequence of positive numbers, got {c_init!r}") from None
    if not values or not all(math.isfinite(c) and c > 0 for c in values):
        raise InputError(f"c_init must be a non-empty sequence of finite numbers > 0, got {c_init!r}")
    return values


def _target_mode(target: TargetSpec) -> str:
    if target is None:
        return "untargeted"
    if isinstance(target, str):
        if target not in TARGETS:
            raise InputError(
                f"target must be None, one of {', '.join(map(repr, TARGETS))} or class indices, got {target!r}"
            )
        return target
    return "given"


def _given_targets(target: TargetSpec, n: int, k: int, labels: Tensor) -> Tensor:
    """The target classes given as an int, a sequence or a tensor, checked against the shape, K and the labels."""
    if isinstance(target, bool):
        raise InputError(
            f"target must be None, one of {', '.join(map(repr, TARGETS))} or class indices, got {target!r}"
        )
    if isinstance(target, (int, np.integer)):
        t = torch.full((n,), int(target), dtype=torch.int64)
    else:
        try:
            t = torch.as_tensor(target)
        except (TypeError, ValueError, RuntimeError):
            raise InputError(
                f"target must be None, a name in {TARGETS} or integer class indices, got {target!r}"
            ) from None
        if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
            raise InputError(f"target class indices must be integers, got dtype {t.dtype}")
        if t.dim() == 0:
            t = t.expand(n)
        if t.shape != (n,):
            raise InputError(f"target must hold one class per sample, shape ({n},), got shape {tuple(t.shape)}")
        t = t.to(torch.int64).cpu()
    if n and (bool((t < 0).any()) or bool((t >= k).any())):
        raise InputError(f"target classes must lie in [0, {k}) for a model with {k} classes, got {t.tolist()}")
    same = t.to(labels.device) == labels
    if bool(same.any()):
        i = int(same.nonzero()[0])
        raise InputError(f"target of sample {i} is its own class {int(t[i])}; a target must differ from it")
    return t.to(labels.device)


def _seed_for(seed: int, index: int) -> int:
    return (seed * _MIX + index * 0x632BE59BD9B4E019 + 1) % (2**63)


# ----------------------------------------------------------------------------------------------------- core
def _dual_gradient_norms(model: nn.Module, pts: Tensor, c: Tensor, others: Tensor, dual: str) -> Tensor:
    """``||∇(f_c - f_j)||_q`` at every point for every class column of ``others``: (M, T); one backward per column."""
    pts = pts.detach().requires_grad_(True)
    with torch.enable_grad():
        logits = model(pts)
        check_logits(logits, pts.shape[0])
        fc = logits.gather(1, c[:, None]).squeeze(1)
        out = torch.empty(pts.shape[0], others.shape[1], dtype=pts.dtype, device=pts.device)
        for t in range(others.shape[1]):
            g = fc - logits.gather(1, others[:, t : t + 1]).squeeze(1)
            (grad,) = torch.autograd.grad(g.sum(), pts, retain_graph=t < others.shape[1] - 1)
            out[:, t] = lp_norm(grad.reshape(grad.shape[0], -1), dual)
    return out.detach()


def _run(
    model: nn.Module,
    x: Tensor,
    y: Tensor | None,
    indices: Sequence[int],
    *,
    norm: str,
    radius: float,
    n_batches: int,
    batch_size: int,
    target: TargetSpec,
    seed: int,
    domain: tuple[float, float],
    c_init: tuple[float, ...],
    shape_reg: float,
    min_pvalue: float,
    chunk_points: int,
) -> CleverResult:
    """CLEVER on a validated batch already on the model's device (the model in eval mode)."""
    t0 = time.perf_counter()
    n = x.shape[0]
    mode = _target_mode(target)
    with torch.no_grad():
        logits0 = model(x)
    k = check_logits(logits0, n)
    pred = logits0.argmax(1)
    if y is not None and n and int(y.max()) >= k:
        raise InputError(f"labels must lie in [0, {k}) for a model with {k} classes, got a label {int(y.max())}")
    c = pred if y is None else y
    ok = pred == c
    dev = x.device
    gens = [torch.Generator(device=dev) for _ in range(n)]
    for g, i in zip(gens, indices):
        g.manual_seed(_seed_for(seed, int(i)))

    if mode == "untargeted":
        grid = torch.arange(k, device=dev).expand(n, k)
        others = grid[grid != c[:, None]].reshape(n, k - 1)
    elif mode == "top2":
        others = logits0.scatter(1, c[:, None], -math.inf).argmax(1, keepdim=True)
    elif mode == "least_likely":
        others = logits0.scatter(1, c[:, None], math.inf).argmin(1, keepdim=True)
    elif mode == "random":
        # a stream of its own, so that the sampled points are those of every other target mode
        draw = torch.Generator(device="cpu")
        picks = []
        for i in indices:
            draw.manual_seed(_seed_for(seed, int(i)) ^ 0x5DEECE66D)
            picks.append(int(torch.randint(0, k - 1, (1,), generator=draw)))
        r = torch.tensor(picks, dtype=torch.int64, device=dev)
        others = (r + (r >= c).to(torch.int64))[:, None]
    else:
        others = _given_targets(target, n, k, c)[:, None]
    n_t = others.shape[1]
    margins = logits0.gather(1, c[:, None]) - logits0.gather(1, others)  # (N, T)

    ball = LpBall(norm, radius, domain)
    dual = DUAL[norm]
    part = min(batch_size, chunk_points)
    per_pass = max(1, chunk_points // part)
    active = ok.nonzero().squeeze(1).tolist()
    maxima = torch.full((n, n_t, n_batches), -math.inf, dtype=x.dtype, device=dev)
    points = 0
    for g0 in range(0, len(active), per_pass):
        group = active[g0 : g0 + per_pass]
        m = len(group)
        for b in range(n_batches):
            # per-sample streams, a whole batch at a time: a sample's points depend neither on the other samples
            # of the call nor on how the batch is split into forward passes
            full = [
                ball.random_start(x[i].unsqueeze(0).expand(batch_size, *x.shape[1:]), generator=gens[i]) for i in group
            ]
            for start in range(0, batch_size, part):
                cnt = min(part, batch_size - start)
                pts = torch.cat([p[start : start + cnt] for p in full])
                c_rep, o_rep = c[group].repeat_interleave(cnt), others[group].repeat_interleave(cnt, dim=0)
                norms = _dual_gradient_norms(model, pts, c_rep, o_rep, dual)
                part_max = norms.reshape(m, cnt, n_t).amax(1)
                maxima[group, :, b] = torch.maximum(maxima[group, :, b], part_max)
                points += m * cnt

    nan = math.nan
    class_scores = torch.full((n, k), nan, dtype=torch.float64)
    out = {name: torch.full((n,), nan, dtype=torch.float64) for name in ("score", "loc", "shape", "scale", "p", "smax")}
    out["score"].zero_()
    margin_best = torch.full((n,), nan, dtype=torch.float64)
    target_best = torch.full((n,), -1, dtype=torch.int64)
    fallback = torch.zeros(n, dtype=torch.bool)
    reasons = [""] * n
    maxima_np = maxima.detach().cpu().double().numpy()
    margins_np = margins.detach().cpu().double().numpy()
    others_np = others.cpu().numpy()
    for i in active:
        fits = [
            fit_reverse_weibull(maxima_np[i, t], c_init=c_init, shape_reg=shape_reg, min_pvalue=min_pvalue)
            for t in range(n_t)
        ]
        scores = [_score(margins_np[i, t], fit.location, radius) for t, fit in enumerate(fits)]
        for t in range(n_t):
            class_scores[i, int(others_np[i, t])] = scores[t]
        t_best = int(np.argmin(scores))
        fit = fits[t_best]
        out["score"][i] = scores[t_best]
        out["loc"][i], out["shape"][i], out["scale"][i] = fit.location, fit.shape, fit.scale
        out["p"][i], out["smax"][i] = fit.ks_pvalue, fit.sample_max
        margin_best[i] = float(margins_np[i, t_best])
        target_best[i] = int(others_np[i, t_best])
        fallback[i] = fit.fallback
        reasons[i] = fit.reason
    return CleverResult(
        scores=out["score"], targets=target_best, labels=c.cpu(), clean_pred=pred.cpu(), margins=margin_best,
        location=out["loc"], shape=out["shape"], scale=out["scale"], ks_pvalue=out["p"], sample_max=out["smax"],
        fallback=fallback, reasons=reasons, class_scores=class_scores, norm=norm, radius=radius, target=mode,
        n_batches=n_batches, batch_size=batch_size, model_calls=n + points, grad_calls=points * n_t,
        seconds=time.perf_counter() - t0,
    )  # fmt: skip


def _score(margin: float, location: float, radius: float) -> float:
    """``min(g(x0) / L, R)``, with ``g(x0) <= 0`` giving 0 and ``L = 0`` (a flat margin) giving ``R``."""
    if margin <= 0:
        return 0.0
    if location <= 0:
        return radius
    return min(margin / location, radius)


def _prepare(
    model: object, x: Any, y: Any, domain: tuple[float, float]
) -> tuple[nn.Module, Tensor, Tensor | None, torch.device]:
    if not isinstance(model, nn.Module):
        raise InputError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    device = model_device(model)
    labels = y if y is not None else torch.zeros(len(x) if hasattr(x, "__len__") else 0, dtype=torch.int64)
    x_t, y_t, _ = validate_arrays(x, labels, domain=domain, source="x/y given to clever")
    if x_t.shape[0] == 0:
        raise InputError("x holds no samples; give at least one input")
    if torch.is_tensor(x) and x.is_floating_point():
        x_t = x.detach()  # validated; keep the caller's precision (float64 stays float64)
    return model, x_t.to(device), (None if y is None else y_t.to(device)), device


def clever(
    model: nn.Module,
    x: Tensor,
    y: Tensor | None = None,
    *,
    norm: str = "l2",
    radius: float | None = None,
    n_batches: int = 500,
    batch_size: int = 1024,
    target: TargetSpec = None,
    seed: int = 0,
    domain: tuple[float, float] = (0.0, 1.0),
    c_init: Sequence[float] = C_INIT,
    shape_reg: float = 0.01,
    min_pvalue: float = 0.001,
    chunk_points: int = _CHUNK_POINTS,
) -> CleverResult:
    """CLEVER scores of a batch of inputs (Weng et al., ICLR 2018): an estimate of the minimal adversarial distance.

    Not a certificate: see the module docstring; the result has ``certified = False``, ``estimate = True``.

    Args:
        model: a classifier returning logits ``(N, K)``; put in eval mode for the call and restored afterwards.
        x: inputs ``(N, ...)`` inside ``domain``; moved to the model's device (a float tensor keeps its dtype).
        y: labels ``(N,)`` or ``None``. The score is computed for the class ``c = y`` (``None``: the prediction);
            a sample the model misclassifies scores 0 and is not sampled.
        norm: the norm ``p`` of the perturbation: ``"l2"``, ``"linf"`` or ``"l1"``.
        radius: ball radius ``R`` (sampling radius and cap of the score); ``None``: :data:`DEFAULT_RADIUS`
            (l2: 5, the paper's; linf: 0.1; l1: 30).
        n_batches: number of batches ``N_b`` (500 in the paper), i.e. of maxima fitted per class.
        batch_size: points per batch ``N_s`` (1024 in the paper).
        target: ``None`` (untargeted, CLEVER-u: the minimum over every class), ``"top2"``, ``"random"``,
            ``"least_likely"`` (CLEVER-t for the paper's three targets), or integer classes (an int or ``(N,)``).
        seed: seed of the sampling; each sample's stream is derived from ``(seed, position in x)``.
        domain: ``(lo, hi)`` box of the inputs; sampled points are clipped to it.
        c_init: initial Weibull shapes of the fit.
        shape_reg: penalty weight of the fit (the reference's ``mle_reg``; 0 for the plain likelihood).
        min_pvalue: a best KS p-value below this falls back to the sample maximum.
        chunk_points: most points per forward pass (memory only; scores do not depend on it).

    Returns:
        A :class:`CleverResult` (per-sample tensors on the CPU).

    Raises:
        InputError: unknown norm, radius <= 0, n_batches or batch_size < 1, a bad target, NaN or out-of-domain
            inputs, labels out of range, or bad fit parameters.
    """
    dom = check_domain(domain)
    name = _check_norm(norm)
    r = _check_radius(radius, name)
    nb = _positive_int("n_batches", n_batches)
    bs = _positive_int("batch_size", batch_size)
    chunk = _positive_int("chunk_points", chunk_points)
    _target_mode(target)
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise InputError(f"seed must be an integer, got {seed!r}")
    inits = _check_c_init(c_init)
    reg = _nonneg_float("shape_reg", shape_reg)
    pmin = _check_pvalue(min_pvalue)
    model, x_t, y_t, _ = _prepare(model, x, y, dom)
    with eval_mode(model):
        return _run(
            model, x_t, y_t, range(x_t.shape[0]), norm=name, radius=r, n_batches=nb, batch_size=bs, target=target,
            seed=int(seed), domain=dom, c_init=inits, shape_reg=reg, min_pvalue=pmin, chunk_points=chunk,
        )  # fmt: skip


# ----------------------------------------------------------------------------------------------------- data sets


def _summarize(
    records: list[SampleRecord],
    n: int,
    threat: str,
    norm: str,
    radius: float,
    mode: str,
) -> CleverRun:
    mine = sorted((r for r in records if r.threat == threat), key=lambda r: r.index)
    pairs = [(r, {"index": r.index, **r.extra}) for r in mine]
    per_sample = [row for _, row in pairs]
    correct = [row for rec, row in pairs if rec.clean_pred == rec.label]
    scores = [float(row["score"]) for row in correct]
    return CleverRun(
        n=n, threat=threat, norm=norm, radius=radius, target=mode,
        clean_accuracy=sum(r.clean_pred == r.label for r in mine) / n if n else 0.0,
        mean_score=float(np.mean(scores)) if scores else None,
        median_score=float(np.median(scores)) if scores else None,
        fallback_fraction=float(np.mean([bool(row["fallback"]) for row in correct])) if correct else None,
        per_sample=per_sample, records=mine,
    )  # fmt: skip


def clever_scores(
    model: nn.Module,
    data: Dataset | tuple[Tensor, Tensor],
    *,
    norm: str = "l2",
    radius: float | None = None,
    n_batches: int = 500,
    batch_size: int = 1024,
    target: TargetSpec = None,
    seed: int = 0,
    c_init: Sequence[float] = C_INIT,
    shape_reg: float = 0.01,
    min_pvalue: float = 0.001,
    samples_per_write: int = 8,
    chunk_points: int = _CHUNK_POINTS,
    store: Store | str | Path | None = None,
    progress: bool = True,
    config: dict[str, Any] | None = None,
) -> CleverRun:
    """CLEVER score of every sample of a data set, written to the result store as it goes, resumable.

    Each sample gets a record under the threat key of the sampling ball (``LpBall(norm, radius, data.domain).key``):
    status ``unknown`` (CLEVER proves nothing) with ``certified = None`` and ``adv_distance = None``, or
    ``falsified`` at distance 0 (attack ``"clean"``) when the model misclassifies the clean input. Each record's
    ``extra`` holds the sample's score and fit and ``queries`` its model calls, so an interrupted run resumes with the
    samples not yet done and still reports every score. A sample's score depends
    only on ``seed`` and its index, not on how the run was batched or resumed.

    Args:
        model: classifier returning logits ``(N, K)``.
        data: a :class:`~bastion.data.Dataset` or a pair ``(x, y)``; its domain is the sampling box.
        norm: ``"l2"``, ``"linf"`` or ``"l1"``.
        radius: ball radius ``R``; ``None``: :data:`DEFAULT_RADIUS`.
        n_batches: batches ``N_b`` per class (500 in the paper).
        batch_size: points per batch ``N_s`` (1024 in the paper).
        target: ``None`` (untargeted), ``"top2"``, ``"random"``, ``"least_likely"``, or one class per sample of the
            data set (``(len(data),)`` integers).
        seed: seed of the sampling.
        c_init: initial Weibull shapes of the fit.
        shape_reg: penalty weight of the fit.
        min_pvalue: KS p-value below which the estimate falls back to the sample maximum.
        samples_per_write: samples per store transaction (and per call of :func:`clever`).
        chunk_points: most points per forward pass (memory only).
        store: a :class:`~bastion.store.Store`, a path to one, or ``None`` (in memory).
        progress: show a progress bar.
        config: extra JSON-able information stored with the run.

    Returns:
        A :class:`CleverRun` (``certified = False``, ``estimate = True``).

    Raises:
        InputError: on bad arguments (as :func:`clever`).
    """
    t_start = time.perf_counter()
    if not isinstance(model, nn.Module):
        raise InputError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    data = as_dataset(data)
    name = _check_norm(norm)
    r = _check_radius(radius, name)
    nb = _positive_int("n_batches", n_batches)
    bs = _positive_int("batch_size", batch_size)
    spw = _positive_int("samples_per_write", samples_per_write)
    chunk = _positive_int("chunk_points", chunk_points)
    mode = _target_mode(target)
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise InputError(f"seed must be an integer, got {seed!r}")
    inits = _check_c_init(c_init)
    reg = _nonneg_float("shape_reg", shape_reg)
    pmin = _check_pvalue(min_pvalue)
    n = len(data)
    given: Tensor | None = None
    if mode == "given":
        given = _given_targets(target, n, data.num_classes, torch.full((n,), -1, dtype=torch.int64))
    threat = LpBall(name, r, data.domain)
    device = model_device(model)
    payload = {
        "threat": threat.key, "norm": name, "radius": r, "n_batches": nb, "batch_size": bs, "target": mode,
        "targets": None if given is None else given.tolist(), "seed": int(seed), "c_init": list(inits),
        "shape_reg": reg, "min_pvalue": pmin,
    }  # fmt: skip
    with resumable_run(
        store, kind="clever", payload=payload, fingerprints=lambda: (model_fingerprint(model), data.fingerprint()),
        n_samples=n, threats=[threat.key], config={"samples_per_write": spw, **(config or {})},
    ) as run:  # fmt: skip
        with eval_mode(model):
            for idx, xb, yb in run.batches(data, spw, desc=f"clever ({name})", progress=progress):
                res = _run(
                    model, xb.to(device), yb.to(device), idx.tolist(), norm=name, radius=r, n_batches=nb,
                    batch_size=bs, target=target if given is None else given[idx], seed=int(seed), domain=data.domain,
                    c_init=inits, shape_reg=reg, min_pvalue=pmin, chunk_points=chunk,
                )  # fmt: skip
                batch_rows = res.per_sample(idx.tolist())
                share = res.seconds / max(len(idx), 1)
                records = []
                for j, i in enumerate(idx.tolist()):
                    label, pred = int(res.labels[j]), int(res.clean_pred[j])
                    wrong = pred != label
                    extra = {k: v for k, v in batch_rows[j].items() if k != "index"}
                    records.append(
                        SampleRecord(
                            index=int(i), threat=threat.key, label=label, clean_pred=pred,
                            status="falsified" if wrong else "unknown", adv_distance=0.0 if wrong else None,
                            certified=None, attack="clean" if wrong else None, seconds=share,
                            queries=1 if wrong else 1 + nb * bs, extra=extra,
                        )
                    )  # fmt: skip
                run.write(records)
        result = _summarize(run.records(threat.key), n, threat.key, name, r, mode)
        return run.finish(result, started=t_start)
