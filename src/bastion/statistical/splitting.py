"""Adaptive multilevel splitting: the probability that a random input of the threat ball violates the property.

Webb, Rainforth, Teh & Kumar, "A Statistical Approach to Assessing Neural Network Robustness", ICLR 2019
(reference code: github.com/oval-group/statistical-robustness), after the adaptive multilevel splitting of
Guyader, Hengartner & Matzner-Løber (Appl. Math. Optim. 2011) and Cérou & Guyader (Stoch. Anal. Appl. 2007).

**What is estimated.** For an input ``x`` of class ``c`` the property function is the margin
``s(x') = max_{j != c} f_j(x') - f_c(x')``; the property is violated where ``s(x') >= 0``. The estimate is of
``log P(s(X') >= 0)`` for ``X'`` drawn from the input distribution below. It is an *estimate*, never a proof:
``-inf`` means that no particle crossed, not that no violation exists (``bastion.verify`` proves that).

**Input distribution** (``measure=``), uniform on the threat ball, meeting the input domain in one of two ways:

* ``"intersect"`` (the default for l∞): uniform on ball ∩ domain. For l∞ the intersection is the box
  ``[max(x - eps, lo), min(x + eps, hi)]`` and is sampled exactly, coordinate by coordinate, as in the reference
  code. For l2 it is sampled by rejection: points uniform in the ball outside the domain are redrawn (no model
  call is spent on them). That is exact but hopeless when ``x`` lies on the domain's faces in many coordinates
  (an MNIST image with 500 black pixels keeps one ball point in about 2^500), so it fails with an InputError
  naming ``measure="clip"`` when fewer than one draw in 1000 would land inside.
* ``"clip"`` (the default for l2): uniform on the ball, then clipped to the domain. Clipping moves every
  coordinate towards ``x``, so each point stays inside ball ∩ domain, but the measure is no longer uniform there:
  it puts positive mass on the domain's faces (all the ball's points beyond a face land on it). Splitting then runs
  on the unclipped ball point ``u`` with the property ``s(clip(u))``, which targets this measure exactly.

**Algorithm** (Webb et al., Algorithm 1). ``N`` particles are drawn from the input distribution. At each level
``k`` the level ``L_k`` is the ``rho``-quantile from the top of ``s`` over the particles (the particle at
ascending rank ``floor((1 - rho) N)``), capped at 0. The estimate gains the factor ``r_k = #{s >= L_k} / N``; the
particles below the level are replaced by copies of uniformly chosen survivors; then every particle takes
``mh_steps`` Metropolis-Hastings steps targeting the input distribution restricted to ``{s >= L_k}``. The proposal,
as in the reference's image experiments, is uniform on the box ``[u - w, u + w]`` truncated to the support's
bounding box, with the Hastings correction for the truncation; a proposal is accepted with probability
``min(1, q(u | u') / q(u' | u))`` if it lies in the support (the ball, for l2) and has ``s >= L_k``. Each chain
carries its own width ``w``, starting at ``initial_width · e / sqrt(D)`` with ``e`` the ball's per-coordinate
half-extent (``eps`` for l∞, ``eps · sqrt(3 / (D + 2))`` for l2, the half-width of a box with the same coordinate
spread) and ``D`` the input dimension; after the ``mh_steps`` steps of a level, a chain whose acceptance rate was
above ``target_acceptance`` widens by ``width_inc``, one below shrinks by ``width_dec`` (0.124, 1.02 and 0.5 in the
reference). All proposals of one step are scored in one batched forward pass on the model's device; several
independent runs (``n_runs``) share that pass.

**Termination** (the reference's rules): the run ends when ``L_k`` reaches 0 (estimate ``prod_k r_k``); when the
level stalls (``L_k == L_{k-1}``: the quantile cannot rise) the level is set to 0, so the estimate is the fraction
of particles already in violation times the levels so far, ``-inf`` when there are none; the same is done at
``max_levels`` (500 in the reference). Besides, a run whose running estimate falls below ``log_p_min`` stops with
``-inf`` (the paper's ``log P_min`` idea; its value, ``log 1e-50``, is ours): at ``rho = 0.1`` that is about 50
levels, past which a violation is too rare to matter and the chains cost ``N · mh_steps`` calls per level.
:attr:`SplittingRun.termination` says which rule ended each run.

**Spread.** With one run, ``log_p_std`` is the asymptotic standard deviation of the log-estimate from the central
limit theorem of fixed-proportion splitting (Cérou & Guyader 2007), ``sqrt(sum_k (1 - r_k) / (N r_k))`` with the
observed ratios ``r_k``: it assumes the Markov chains mix perfectly between levels and is *optimistic* when they do
not (``spread="asymptotic"``). With ``n_runs >= 2`` the estimate is the mean of the runs' probabilities and
``log_p_std`` the empirical standard error of its log (delta method: ``std(p_i) / (sqrt(R) mean(p_i))``), which
includes the effect of imperfect mixing (``spread="runs"``).

**Deviations from the reference code, and why.**

* The initial width. The reference starts at ``eps / 30`` on MNIST (``D = 784``; ``eps / sqrt(784) = eps / 28``)
  and at a fixed 0.01 on its low-dimensional problems; the ``1 / sqrt(D)`` rule (the optimal scaling of random-walk
  proposals, Roberts, Gelman & Gilks, Ann. Appl. Probab. 1997) gives nearly the former on MNIST and a sensible start
  elsewhere. With ``eps / 30`` on an 8-dimensional box the widths, widening by only 2 % per level, stay far too small
  for the chains to mix: over 12 seeds the log-estimate of a known ``log P = -19.2`` averaged -20.0 with a spread of
  1.25 (against 0.28 from the CLT); with the rule, -19.2 and 0.26.
* No Metropolis-Hastings steps after the final level: the reference runs them once more before noticing that the
  level reached 0; they change nothing in the estimate.
* Proposals rejected by the Hastings ratio or outside the support are not sent to the model (the reference scores
  every proposal), so ``model_calls`` counts only informative evaluations.
* Widths are kept in ``[1e-9 w_0, support width]``: the reference defines such limits but does not apply them,
  and without the lower one a float32 width underflows to 0 after about 130 halvings. Particles are kept in float64
  (cast to the model's dtype for the forward pass) for the same reason.
* The ``log_p_min`` floor (the reference has none and stops only at 500 levels).
* The spread estimates above (the reference reports the spread of 30 independent runs in its experiments).

:func:`naive_monte_carlo` is plain Monte Carlo on the same input distribution with an exact (Clopper-Pearson)
confidence interval, for comparison; :func:`estimate_violation` runs splitting on every sample of a data set,
writing one :class:`~bastion.results.SampleRecord` per sample to the store and resuming an interrupted run.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from scipy.stats import beta as _beta
from torch import Tensor, nn

from bastion.attacks.base import positive_float, positive_int
from bastion.data import Dataset, as_dataset
from bastion.errors import InputError
from bastion.models.checks import check_logits, eval_mode, model_device, model_fingerprint
from bastion.results import SampleRecord, Status, cw_margin
from bastion.store import Store, resumable_run
from bastion.threat import LpBall

__all__ = [
    "MEASURES",
    "EstimateResult",
    "MonteCarloResult",
    "SplittingResult",
    "SplittingRun",
    "estimate_violation",
    "multilevel_splitting",
    "naive_monte_carlo",
    "summarize_estimates",
]

#: How the input distribution meets the input domain (see the module docstring).
MEASURES = ("intersect", "clip")
#: The ``attack`` field of records decided by a violation that splitting found.
METHOD = "amls"
#: The ``attack`` field of records of samples the model already gets wrong.
CLEAN = "clean"
_NORMS = ("linf", "l2")
_MIN_WIDTH = 1e-9  # of the initial width
_MIN_ACCEPT = 1e-3  # rejection sampling of ball ∩ domain is refused below this acceptance rate


# ---------------------------------------------------------------------------------------------------- results
@dataclass
class SplittingRun:
    """One independent run of adaptive multilevel splitting.

    Attributes:
        log_p: its estimate of ``log P(violation)`` (natural log; ``-inf`` when no particle crossed).
        levels: the levels ``L_1, ..., L_K`` (the last is 0 unless the run stopped at the floor).
        ratios: the fractions ``r_k`` of particles at or above each level (``log_p = sum log r_k``).
        acceptance: mean Metropolis-Hastings acceptance rate at each level that ran chains (one fewer than levels).
        termination: ``"reached-0"``, ``"stalled"`` (level could not rise; set to 0), ``"max-levels"`` (set to 0
            at the cap), ``"floor"`` (estimate below ``log_p_min``: reported as ``-inf``) or ``"point"`` (eps = 0).
    """

    log_p: float
    levels: list[float] = field(default_factory=list)
    ratios: list[float] = field(default_factory=list)
    acceptance: list[float] = field(default_factory=list)
    termination: str = ""

    @property
    def n_levels(self) -> int:
        return len(self.levels)


@dataclass
class SplittingResult:
    """The outcome of :func:`multilevel_splitting` on one input.

    Attributes:
        log_p: estimate of ``log P(s(X') >= 0)`` (natural log): the mean over runs of their probabilities, in log;
            ``-inf`` when no run saw a violation (an estimate, not a proof).
        log_p_std: standard deviation of ``log_p`` as an estimator (see ``spread``); NaN when ``log_p`` is ``-inf``.
        spread: ``"asymptotic"`` (one run: the splitting CLT, assumes perfect mixing, optimistic otherwise),
            ``"runs"`` (several runs: empirical standard error) or ``"exact"`` (eps = 0: the point is evaluated).
        n_levels: levels of the first run.
        levels: the levels of the first run.
        acceptance: mean Metropolis-Hastings acceptance rate per level of the first run.
        termination: why the first run stopped (see :class:`SplittingRun`).
        runs: every run.
        model_calls: forward evaluations, counted in inputs (every call the function made, re-execution included).
        seconds: wall time.
        max_score: the largest ``s`` seen on any evaluated input.
        x_adv: the violation closest to ``x`` among the evaluated inputs (input shape, no batch dimension),
            re-executed: the model's prediction differs from ``y`` and the point lies in ball ∩ domain; else None.
        adv_distance: ``threat.distance(x_adv, x)``, or None.
        measure: ``"intersect"`` or ``"clip"``.
        note: a sentence on what the number means when it is ``-inf`` or the runs disagree, else ``""``.
    """

    log_p: float
    log_p_std: float
    spread: str
    n_levels: int
    levels: list[float]
    acceptance: list[float]
    termination: str
    runs: list[SplittingRun] = field(repr=False)
    model_calls: int = 0
    seconds: float = 0.0
    max_score: float = -math.inf
    x_adv: Tensor | None = field(default=None, repr=False)
    adv_distance: float | None = None
    measure: str = "intersect"
    note: str = ""

    @property
    def p(self) -> float:
        """The probability estimate ``exp(log_p)``."""
        return math.exp(self.log_p)

    @property
    def log10_p(self) -> float:
        """``log_p`` in base 10."""
        return self.log_p / math.log(10.0)


@dataclass
class MonteCarloResult:
    """The outcome of :func:`naive_monte_carlo`.

    Attributes:
        hits: samples that violate the property (``s >= 0``).
        n: samples drawn.
        log_p: ``log(hits / n)`` (``-inf`` without hits).
        log_p_std: delta-method standard deviation of ``log_p``, ``sqrt((1 - p) / (n p))``; NaN without hits.
        interval: exact Clopper-Pearson interval for the probability at ``confidence``.
        confidence: its level.
        model_calls: forward evaluations, in inputs.
        seconds: wall time.
        max_score: the largest ``s`` sampled.
        x_adv: the closest re-executed violation sampled (input shape), or None.
        adv_distance: its distance to ``x``, or None.
    """

    hits: int
    n: int
    log_p: float
    log_p_std: float
    interval: tuple[float, float]
    confidence: float
    model_calls: int = 0
    seconds: float = 0.0
    max_score: float = -math.inf
    x_adv: Tensor | None = field(default=None, repr=False)
    adv_distance: float | None = None

    @property
    def p(self) -> float:
        return self.hits / self.n


# ---------------------------------------------------------------------------------------------------- checks
def _check_threat(threat: object) -> LpBall:
    if not isinstance(threat, LpBall):
        raise InputError(f"threat must be an LpBall, got {threat!r}")
    if threat.norm not in _NORMS:
        raise InputError(f"multilevel splitting samples the norms {', '.join(_NORMS)}, not {threat.norm!r}")
    if not math.isfinite(threat.eps):
        raise InputError(f"multilevel splitting needs a finite eps, got {threat.eps}")
    return threat


def _check_measure(measure: object, threat: LpBall) -> str:
    if measure is None:
        return "intersect" if threat.norm == "linf" else "clip"
    if measure not in MEASURES:
        raise InputError(f"measure must be one of {', '.join(map(repr, MEASURES))} or None, got {measure!r}")
    return str(measure)


def _check_fraction(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < 1:
        raise InputError(f"{name} must be a number in (0, 1), got {value!r}")
    return float(value)


def _check_seed(seed: object) -> int:
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise InputError(f"seed must be a non-negative integer, got {seed!r}")
    return seed


def _check_model(model: object) -> nn.Module:
    if not isinstance(model, nn.Module):
        raise InputError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    return model


def _model_dtype(model: nn.Module) -> torch.dtype:
    for t in model.parameters():
        if t.is_floating_point():
            return t.dtype
    return torch.get_default_dtype()


def _check_input(x: object, threat: LpBall) -> Tensor:
    if not isinstance(x, Tensor):
        raise InputError(f"x must be a torch.Tensor (one input, without batch dimension), got {type(x).__name__}")
    if not x.is_floating_point():
        raise InputError(f"x must be a floating-point tensor, got dtype {x.dtype}")
    if x.dim() == 0 or x.numel() == 0:
        raise InputError(f"x must be one non-empty input without batch dimension, got shape {tuple(x.shape)}")
    if not bool(torch.isfinite(x).all()):
        raise InputError("x contains NaN or Inf")
    lo, hi = threat.domain
    if bool((x < lo).any()) or bool((x > hi).any()):
        raise InputError(
            f"x has values in [{float(x.min()):.4g}, {float(x.max()):.4g}], outside the threat's domain {threat.domain}"
        )
    return x


def _check_label(y: object) -> int:
    if isinstance(y, Tensor):
        if y.numel() != 1 or y.is_floating_point() or y.is_complex() or y.dtype == torch.bool:
            raise InputError(f"y must be one integer class, got a tensor of shape {tuple(y.shape)} ({y.dtype})")
        y = int(y.item())
    if isinstance(y, bool) or not isinstance(y, int) or y < 0:
        raise InputError(f"y must be a non-negative integer class, got {y!r}")
    return y


@dataclass(frozen=True)
class _Settings:
    n_particles: int
    rho: float
    mh_steps: int
    max_levels: int
    log_p_min: float
    target_acceptance: float
    width_inc: float
    width_dec: float
    initial_width: float
    n_runs: int

    def payload(self) -> dict[str, Any]:
        return dict(vars(self))


def _settings(
    n_particles: object,
    rho: object,
    mh_steps: object,
    max_levels: object,
    log_p_min: object,
    target_acceptance: object,
    width_inc: object,
    width_dec: object,
    initial_width: object,
    n_runs: object,
) -> _Settings:
    n = positive_int("n_particles", n_particles)
    if n < 2:
        raise InputError(f"n_particles must be at least 2, got {n_particles!r}")
    if isinstance(log_p_min, bool) or not isinstance(log_p_min, (int, float)) or math.isnan(log_p_min):
        raise InputError(f"log_p_min must be a number < 0 (a natural log; -inf disables the floor), got {log_p_min!r}")
    if log_p_min >= 0:
        raise InputError(f"log_p_min must be < 0 (a natural log; -inf disables the floor), got {log_p_min!r}")
    inc = positive_float("width_inc", width_inc)
    if inc < 1:
        raise InputError(f"width_inc must be >= 1 (the factor that widens a proposal), got {width_inc!r}")
    dec = positive_float("width_dec", width_dec)
    if dec > 1:
        raise InputError(f"width_dec must be in (0, 1] (the factor that shrinks a proposal), got {width_dec!r}")
    return _Settings(
        n_particles=n,
        rho=_check_fraction("rho", rho),
        mh_steps=positive_int("mh_steps", mh_steps),
        max_levels=positive_int("max_levels", max_levels),
        log_p_min=float(log_p_min),
        target_acceptance=_check_fraction("target_acceptance", target_acceptance),
        width_inc=inc,
        width_dec=dec,
        initial_width=positive_float("initial_width", initial_width),
        n_runs=positive_int("n_runs", n_runs),
    )


# ---------------------------------------------------------------------------------------------------- the problem
class _Problem:
    """The input distribution around one input and the counted, batched property function on it.

    Particles live in float64 "ball coordinates" ``u`` (flattened): the input the model sees is ``clip(u)`` cast to
    the model's dtype (``clip`` is the identity under ``measure="intersect"``, whose particles stay in the domain).
    """

    def __init__(self, model: nn.Module, x: Tensor, label: int, threat: LpBall, measure: str) -> None:
        self.model = model
        self.device = model_device(model)
        self.dtype = _model_dtype(model)
        self.shape = tuple(x.shape)
        self.x = x.detach().to(self.device, self.dtype)
        self.centre = self.x.reshape(-1).to(torch.float64)
        self.dim = self.centre.numel()
        self.threat = threat
        self.measure = measure
        self.eps = threat.eps
        d_lo, d_hi = threat.domain
        if measure == "intersect":
            self.lo, self.hi = (self.centre - self.eps).clamp(min=d_lo), (self.centre + self.eps).clamp(max=d_hi)
        else:
            self.lo, self.hi = self.centre - self.eps, self.centre + self.eps
        self.label = label
        self.calls = 0
        self.max_score = -math.inf
        self.best_x: Tensor | None = None
        self.best_distance = math.inf
        self._labels: Tensor | None = None
        self._rejection_checked = False

    # -- the property --------------------------------------------------------------------------------------
    def inputs(self, u: Tensor) -> Tensor:
        """The model inputs ``clip(u)`` (rows of ``u``), in the model's dtype and shape."""
        lo, hi = self.threat.domain
        return u.clamp(lo, hi).to(self.dtype).reshape(-1, *self.shape)

    def logits(self, xs: Tensor) -> Tensor:
        out = self.model(xs)
        if self.calls == 0:
            k = check_logits(out, xs.shape[0])
            if self.label >= k:
                raise InputError(f"label {self.label} is outside the model's {k} classes [0, {k})")
        elif out.dim() != 2 or out.shape[0] != xs.shape[0]:
            check_logits(out, xs.shape[0])
        self.calls += xs.shape[0]
        return out

    def score(self, u: Tensor) -> Tensor:
        """``s(clip(u))`` for the rows of ``u`` (float64), in one forward pass; remembers the closest violation."""
        if u.shape[0] == 0:
            return torch.empty(0, dtype=torch.float64, device=self.device)
        xs = self.inputs(u)
        logits = self.logits(xs)
        if self._labels is None or self._labels.shape[0] < xs.shape[0]:
            self._labels = torch.full((xs.shape[0],), self.label, dtype=torch.long, device=self.device)
        s = cw_margin(logits, self._labels[: xs.shape[0]]).to(torch.float64)
        top = float(s.max())
        self.max_score = max(self.max_score, top)
        if top > 0:  # strictly: a tie is not a misclassification
            hit = (s > 0).nonzero().squeeze(1)
            dist = self.threat.distance(xs[hit], self.x.expand(hit.numel(), *self.shape))
            j = int(dist.argmin())
            if float(dist[j]) < self.best_distance:
                self.best_distance = float(dist[j])
                self.best_x = xs[hit[j]].detach().clone()
        return s

    def confirmed_violation(self) -> tuple[Tensor | None, float | None]:
        """The closest violation seen, re-executed: inside ball ∩ domain and misclassified, else ``(None, None)``."""
        if self.best_x is None:
            return None, None
        xa = self.best_x[None]
        pred = int(self.logits(xa).argmax(1))
        inside = bool(self.threat.contains(xa, self.x[None]))
        if pred == self.label or not inside:
            return None, None
        return self.best_x, float(self.threat.distance(xa, self.x[None]))

    # -- the input distribution -------------------------------------------------------------------------------
    def initial_width(self, scale: float) -> float:
        """``scale`` times the per-coordinate half-extent of the ball over ``sqrt(D)`` (see the module docstring)."""
        extent = self.eps if self.threat.norm == "linf" else self.eps * math.sqrt(3.0 / (self.dim + 2))
        return scale * extent / math.sqrt(self.dim)

    def in_support(self, u: Tensor) -> Tensor:
        """Per row of ``u`` (..., D): inside the ball (l2; the l∞ proposals never leave the box)."""
        if self.threat.norm == "linf":
            return torch.ones(u.shape[:-1], dtype=torch.bool, device=u.device)
        return (u - self.centre).norm(dim=-1) <= self.eps

    def _ball(self, count: int, gen: torch.Generator) -> Tensor:
        """``count`` points uniform in the l2 ball (float64)."""
        g = torch.randn((count, self.dim), generator=gen, device=self.device, dtype=torch.float64)
        r = torch.rand((count, 1), generator=gen, device=self.device, dtype=torch.float64) ** (1.0 / self.dim)
        return self.centre + g / g.norm(dim=1, keepdim=True).clamp_min(1e-300) * (r * self.eps)

    def sample(self, count: int, gen: torch.Generator) -> Tensor:
        """``count`` independent draws ``u`` (count, D) of the input distribution (float64)."""
        if self.threat.norm == "linf":
            span = torch.rand((count, self.dim), generator=gen, device=self.device, dtype=torch.float64)
            return self.lo + (self.hi - self.lo) * span
        if self.measure == "clip":
            return self._ball(count, gen)
        d_lo, d_hi = self.threat.domain
        if not self._rejection_checked:
            self._check_rejection(gen)
        out = torch.empty((count, self.dim), dtype=torch.float64, device=self.device)
        filled, drawn = 0, 0
        chunk = max(count, 1024)
        while filled < count:
            if drawn > 100 * count / _MIN_ACCEPT:
                raise self._rejection_error(filled / drawn)
            cand = self._ball(chunk, gen)
            take = cand[((cand >= d_lo) & (cand <= d_hi)).all(dim=1)][: count - filled]
            out[filled : filled + take.shape[0]] = take
            filled += take.shape[0]
            drawn += chunk
        return out

    def _check_rejection(self, gen: torch.Generator) -> None:
        """Refuse exact rejection sampling of ball ∩ domain when too few ball points land in the domain.

        The acceptance rate is estimated from 1024 ball points as the larger of the observed rate and the product
        of the per-coordinate rates (the coordinates of a uniform point of a high-dimensional ball are nearly
        independent), which sees rates far below 1/1024.
        """
        d_lo, d_hi = self.threat.domain
        probe = self._ball(1024, gen)
        inside = (probe >= d_lo) & (probe <= d_hi)
        product = float(inside.to(torch.float64).mean(dim=0).clamp_min(1 / 1024).log().sum().exp())
        rate = max(product, float(inside.all(dim=1).to(torch.float64).mean()))
        if rate < _MIN_ACCEPT:
            raise self._rejection_error(rate)
        self._rejection_checked = True

    def _rejection_error(self, rate: float) -> InputError:
        return InputError(
            f"only about {rate:.1e} of the uniform points of the l2 ball of radius {self.eps} around x lie inside the "
            f"domain box, too few for exact rejection sampling of ball ∩ domain (at least {_MIN_ACCEPT:g} needed); "
            "use measure='clip' (uniform on the ball, clipped to the domain)"
        )


# ---------------------------------------------------------------------------------------------------- splitting
def _splitting(problem: _Problem, cfg: _Settings, gen: torch.Generator) -> list[SplittingRun]:
    """Adaptive multilevel splitting, ``cfg.n_runs`` independent runs advanced together (see the module docstring)."""
    R, N, D = cfg.n_runs, cfg.n_particles, problem.dim
    dev, f64 = problem.device, torch.float64
    u = problem.sample(R * N, gen).reshape(R, N, D)
    s = problem.score(u.reshape(R * N, D)).reshape(R, N)
    w0 = problem.initial_width(cfg.initial_width)
    w_min, w_max = w0 * _MIN_WIDTH, float((problem.hi - problem.lo).max())
    w = torch.full((R, N), min(w0, w_max), dtype=f64, device=dev)
    runs = [SplittingRun(log_p=0.0) for _ in range(R)]
    log_p = [0.0] * R
    prev = [-math.inf] * R
    live = list(range(R))
    rank = min(math.floor((1 - cfg.rho) * N), N - 1)
    lo, hi = problem.lo, problem.hi
    for k in range(cfg.max_levels):
        if not live:
            break
        act = torch.tensor(live, device=dev)
        sa = s[act]
        quantiles = sa.sort(dim=1).values[:, rank].clamp(max=0.0).tolist()
        levels, going = [], []
        for j, r in enumerate(live):
            level, why = quantiles[j], ""
            if level >= 0:
                why = "reached-0"
            elif level == prev[r]:
                level, why = 0.0, "stalled"
            elif k == cfg.max_levels - 1:
                level, why = 0.0, "max-levels"
            levels.append(level)
            runs[r].levels.append(level)
            prev[r] = level
            if why:
                runs[r].termination = why
        level_t = torch.tensor(levels, dtype=f64, device=dev)
        keep = sa >= level_t[:, None]
        counts = keep.sum(dim=1).tolist()
        for j, r in enumerate(live):
            ratio = counts[j] / N
            runs[r].ratios.append(ratio)
            log_p[r] = log_p[r] + math.log(ratio) if ratio > 0 else -math.inf
            if runs[r].termination:
                continue
            if log_p[r] < cfg.log_p_min:
                runs[r].termination, log_p[r] = "floor", -math.inf
            else:
                going.append(j)
        live = [live[j] for j in going]
        if not going:
            break
        # resample: every particle below its level becomes a copy of a uniformly chosen survivor of its run
        sel = torch.tensor(going, device=dev)
        grp = act[sel]
        kp = keep[sel]
        draw = torch.multinomial(kp.to(f64), N, replacement=True, generator=gen)
        src = torch.where(kp, torch.arange(N, device=dev).expand_as(draw), draw)
        uc = u[grp].gather(1, src[..., None].expand(-1, -1, D))
        sc = s[grp].gather(1, src)
        wc = w[grp].gather(1, src)
        lev = level_t[sel][:, None]
        accepted = torch.zeros_like(sc)
        C = len(going)
        for _ in range(cfg.mh_steps):
            half = wc[..., None]
            a, b = torch.maximum(uc - half, lo), torch.minimum(uc + half, hi)
            prop = a + (b - a) * torch.rand((C, N, D), generator=gen, device=dev, dtype=f64)
            a2, b2 = torch.maximum(prop - half, lo), torch.minimum(prop + half, hi)
            # Hastings ratio of the truncated uniform proposal (the target is uniform on its support)
            log_alpha = ((b - a).log() - (b2 - a2).log()).sum(dim=-1)
            log_u = torch.rand((C, N), generator=gen, device=dev, dtype=f64).log()
            ok = (log_u <= log_alpha) & problem.in_support(prop)
            s_new = torch.full((C * N,), -math.inf, dtype=f64, device=dev)
            idx = ok.reshape(-1).nonzero().squeeze(1)
            s_new[idx] = problem.score(prop.reshape(C * N, D)[idx])
            take = ok & (s_new.reshape(C, N) >= lev)
            uc = torch.where(take[..., None], prop, uc)
            sc = torch.where(take, s_new.reshape(C, N), sc)
            accepted += take
        rate = accepted / cfg.mh_steps
        wc = torch.where(rate > cfg.target_acceptance, wc * cfg.width_inc, wc)
        wc = torch.where(rate < cfg.target_acceptance, wc * cfg.width_dec, wc).clamp(w_min, w_max)
        u[grp], s[grp], w[grp] = uc, sc, wc
        for j, r in enumerate(live):
            runs[r].acceptance.append(float(rate[j].mean()))
    for r in range(R):
        runs[r].log_p = log_p[r]
    return runs


def _combine(runs: list[SplittingRun], n_particles: int) -> tuple[float, float, str]:
    """The estimate over runs and its standard deviation (see the module docstring, "Spread")."""
    if len(runs) == 1:
        run = runs[0]
        if not math.isfinite(run.log_p):
            return -math.inf, math.nan, "asymptotic"
        var = sum((1 - r) / (n_particles * r) for r in run.ratios)
        return run.log_p, math.sqrt(var), "asymptotic"
    t = torch.tensor([r.log_p for r in runs], dtype=torch.float64)
    top = float(t.max())
    if not math.isfinite(top):
        return -math.inf, math.nan, "runs"
    p = (t - top).exp()  # scaled by exp(-top): the ratio std / mean is scale-free
    mean = float(p.mean())
    rel = float(p.std()) / (math.sqrt(len(runs)) * mean)
    return top + math.log(mean), rel, "runs"


def multilevel_splitting(
    model: nn.Module,
    x: Tensor,
    y: int | Tensor,
    threat: LpBall,
    *,
    n_particles: int = 1000,
    rho: float = 0.1,
    mh_steps: int = 100,
    max_levels: int = 500,
    log_p_min: float = math.log(1e-50),
    target_acceptance: float = 0.124,
    width_inc: float = 1.02,
    width_dec: float = 0.5,
    initial_width: float = 1.0,
    n_runs: int = 1,
    measure: str | None = None,
    seed: int = 0,
) -> SplittingResult:
    """Estimate ``log P(max_{j != y} f_j(X') >= f_y(X'))`` for ``X'`` uniform on the threat ball around ``x``.

    Adaptive multilevel splitting of Webb et al. (ICLR 2019); see the module docstring for the algorithm, the input
    distribution, the termination rules and the spread.

    Args:
        model: classifier returning logits ``(N, K)``.
        x: ONE input, without batch dimension (e.g. ``data.x[i]``), inside the threat's domain.
        y: its class (the property is "the prediction stays ``y``").
        threat: an l∞ or l2 :class:`~bastion.threat.LpBall` with finite eps.
        n_particles: particles per run (``N``; 1000 in the paper's MNIST experiments' smallest setting).
        rho: quantile of the adaptive levels: each level keeps the top ``rho`` fraction of the particles.
        mh_steps: Metropolis-Hastings steps per level (``M``).
        max_levels: cap on the number of levels (the last one is set to 0).
        log_p_min: floor on the running log-estimate below which a run stops with ``-inf`` (``-inf``: no floor).
        target_acceptance: acceptance rate the per-chain proposal widths aim for.
        width_inc: factor that widens a chain's proposal whose acceptance rate was above the target.
        width_dec: factor that shrinks one whose rate was below.
        initial_width: initial proposal half-width, in units of the ball's per-coordinate half-extent over
            ``sqrt(D)``.
        n_runs: independent runs (advanced together, sharing each forward pass); with 2 or more, the estimate is
            their mean and the spread empirical.
        measure: ``"intersect"`` or ``"clip"`` (None: ``"intersect"`` for l∞, ``"clip"`` for l2).
        seed: seed of the random generator (on the model's device); the same seed gives the same result.

    Returns:
        A :class:`SplittingResult`.

    Raises:
        InputError: on bad arguments (shapes, NaN, values outside the domain, label out of range, a threat that is
            not an l∞/l2 ball, hyperparameters out of range).
    """
    t0 = time.perf_counter()
    model = _check_model(model)
    threat = _check_threat(threat)
    meas = _check_measure(measure, threat)
    cfg = _settings(
        n_particles, rho, mh_steps, max_levels, log_p_min, target_acceptance, width_inc, width_dec, initial_width,
        n_runs,
    )  # fmt: skip
    x = _check_input(x, threat)
    label = _check_label(y)
    seed = _check_seed(seed)
    with eval_mode(model), torch.no_grad():
        problem = _Problem(model, x, label, threat, meas)
        gen = torch.Generator(device=problem.device).manual_seed(seed)
        if threat.eps == 0:
            s0 = float(problem.score(problem.centre[None])[0])
            lp = 0.0 if s0 >= 0 else -math.inf
            runs = [SplittingRun(lp, [0.0], [1.0 if s0 >= 0 else 0.0], [], "point") for _ in range(cfg.n_runs)]
            log_p, std, spread = lp, 0.0 if s0 >= 0 else math.nan, "exact"
        else:
            runs = _splitting(problem, cfg, gen)
            log_p, std, spread = _combine(runs, cfg.n_particles)
        x_adv, dist = problem.confirmed_violation()
    note = _note(runs, log_p, x_adv is not None)
    first = runs[0]
    return SplittingResult(
        log_p=log_p, log_p_std=std, spread=spread, n_levels=first.n_levels, levels=list(first.levels),
        acceptance=list(first.acceptance), termination=first.termination, runs=runs, model_calls=problem.calls,
        seconds=time.perf_counter() - t0, max_score=problem.max_score,
        x_adv=None if x_adv is None else x_adv.reshape(x.shape), adv_distance=dist, measure=meas, note=note,
    )  # fmt: skip


def _note(runs: list[SplittingRun], log_p: float, found: bool) -> str:
    if math.isfinite(log_p):
        stopped = [r.termination for r in runs if not math.isfinite(r.log_p)]
        if stopped:
            return f"{len(stopped)} of {len(runs)} runs saw no violation ({', '.join(sorted(set(stopped)))})"
        return ""
    why = {
        "floor": "the estimate fell below log_p_min",
        "stalled": "the level stopped rising and no particle was in violation",
        "max-levels": "no particle was in violation at the last level allowed",
        "reached-0": "no particle was in violation",
        "point": "eps is 0 and x itself satisfies the property",
    }
    reasons = sorted({why.get(r.termination, r.termination) for r in runs})
    tail = "; a violation was nevertheless seen on the way" if found else ""
    return "no run crossed the property: " + "; ".join(reasons) + tail + " (an estimate, not a proof)"


# ---------------------------------------------------------------------------------------------------- naive MC
def _clopper_pearson(hits: int, n: int, confidence: float) -> tuple[float, float]:
    alpha = 1 - confidence
    lower = 0.0 if hits == 0 else float(_beta.ppf(alpha / 2, hits, n - hits + 1))
    upper = 1.0 if hits == n else float(_beta.ppf(1 - alpha / 2, hits + 1, n - hits))
    return lower, upper


def naive_monte_carlo(
    model: nn.Module,
    x: Tensor,
    y: int | Tensor,
    threat: LpBall,
    *,
    n: int = 100_000,
    batch_size: int = 10_000,
    confidence: float = 0.95,
    measure: str | None = None,
    seed: int = 0,
) -> MonteCarloResult:
    """Plain Monte Carlo estimate of the same probability as :func:`multilevel_splitting`, for comparison.

    Args:
        model: classifier returning logits ``(N, K)``.
        x: one input without batch dimension, inside the threat's domain.
        y: its class.
        threat: an l∞ or l2 ball with finite eps.
        n: samples drawn from the input distribution.
        batch_size: samples per forward pass.
        confidence: level of the Clopper-Pearson interval.
        measure: ``"intersect"`` or ``"clip"``, as for :func:`multilevel_splitting`.
        seed: seed of the random generator.

    Returns:
        A :class:`MonteCarloResult`: hits, the log-estimate and the exact interval.

    Raises:
        InputError: on bad arguments.
    """
    t0 = time.perf_counter()
    model = _check_model(model)
    threat = _check_threat(threat)
    meas = _check_measure(measure, threat)
    n = positive_int("n", n)
    batch_size = positive_int("batch_size", batch_size)
    confidence = _check_fraction("confidence", confidence)
    x = _check_input(x, threat)
    label = _check_label(y)
    seed = _check_seed(seed)
    hits = 0
    with eval_mode(model), torch.no_grad():
        problem = _Problem(model, x, label, threat, meas)
        gen = torch.Generator(device=problem.device).manual_seed(seed)
        done = 0
        while done < n:
            m = min(batch_size, n - done)
            u = problem.centre.expand(m, -1) if threat.eps == 0 else problem.sample(m, gen)
            hits += int((problem.score(u) >= 0).sum())
            done += m
        x_adv, dist = problem.confirmed_violation()
    p = hits / n
    log_p = math.log(p) if hits else -math.inf
    std = math.sqrt((1 - p) / (n * p)) if hits else math.nan
    return MonteCarloResult(
        hits=hits, n=n, log_p=log_p, log_p_std=std, interval=_clopper_pearson(hits, n, confidence),
        confidence=confidence, model_calls=problem.calls, seconds=time.perf_counter() - t0,
        max_score=problem.max_score, x_adv=None if x_adv is None else x_adv.reshape(x.shape), adv_distance=dist,
    )  # fmt: skip


# ---------------------------------------------------------------------------------------------------- data sets
@dataclass
class EstimateResult:
    """Summary of :func:`estimate_violation` over a data set.

    Attributes:
        n: samples.
        threat: the threat key.
        measure: the input distribution's measure.
        clean_accuracy: fraction classified correctly.
        falsified: fraction with a known violation (a clean misclassification or a violation splitting found).
        log_p: per-sample estimate of ``log P(violation)`` (natural log), keyed by sample index.
        log_p_std: per-sample standard deviation of ``log_p`` (NaN where ``log_p`` is ``-inf``).
        median_log10_p: median over samples of ``log10 P(violation)`` (``-inf`` counts as the smallest).
        records: the per-sample records: ``falsified`` with ``adv_distance`` where a violation is known, else
            ``unknown`` (an estimate is never a proof).
        run_id: id of the run in the store, if any.
        seconds: wall time of this call.
    """

    n: int
    threat: str
    measure: str
    clean_accuracy: float
    falsified: float
    log_p: dict[int, float]
    log_p_std: dict[int, float]
    median_log10_p: float | None
    records: list[SampleRecord] = field(repr=False, default_factory=list)
    run_id: int | None = None
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        """JSON-able summary, the per-sample estimates included (keys are the sample indices as strings)."""
        return {
            "n": self.n,
            "threat": self.threat,
            "measure": self.measure,
            "clean_accuracy": self.clean_accuracy,
            "falsified": self.falsified,
            "median_log10_p": self.median_log10_p,
            "log_p": {str(k): v for k, v in sorted(self.log_p.items())},
            "log_p_std": {str(k): v for k, v in sorted(self.log_p_std.items())},
            "run_id": self.run_id,
            "seconds": self.seconds,
        }

    def table(self) -> str:
        """A short plain-text summary."""
        med = "-" if self.median_log10_p is None else f"{self.median_log10_p:.3f}"
        return "\n".join([
            f"multilevel splitting, {self.threat} ({self.measure}): an estimate, not a certificate",
            f"samples                 {self.n}",
            f"clean accuracy          {100 * self.clean_accuracy:.2f}%",
            f"known violations        {100 * self.falsified:.2f}%",
            f"median log10 P(viol.)   {med}",
        ])  # fmt: skip


def summarize_estimates(
    records: list[SampleRecord], estimates: dict[int, tuple[float, float]], n: int, threat: str, measure: str
) -> EstimateResult:
    """Summary statistics from the per-sample records and estimates ``{index: (log_p, log_p_std)}``."""
    mine = [r for r in records if r.threat == threat]
    clean = sum(r.clean_pred == r.label for r in mine) / n if n else 0.0
    fals = sum(r.status == "falsified" for r in mine) / n if n else 0.0
    logs = sorted(v[0] for v in estimates.values())
    median = logs[(len(logs) - 1) // 2] / math.log(10.0) if logs else None
    return EstimateResult(
        n=n, threat=threat, measure=measure, clean_accuracy=clean, falsified=fals,
        log_p={k: v[0] for k, v in estimates.items()}, log_p_std={k: v[1] for k, v in estimates.items()},
        median_log10_p=median, records=mine,
    )  # fmt: skip


def _sample_seed(seed: int, index: int) -> int:
    """A per-sample seed, so that a sample's estimate does not depend on which session or batch computed it."""
    return (seed * 0x9E3779B97F4A7C15 + index * 0xBF58476D1CE4E5B9 + 1) % (2**63)


def estimate_violation(
    model: nn.Module,
    data: Dataset | tuple[Tensor, Tensor],
    threat: LpBall,
    *,
    n_particles: int = 1000,
    rho: float = 0.1,
    mh_steps: int = 100,
    max_levels: int = 500,
    log_p_min: float = math.log(1e-50),
    target_acceptance: float = 0.124,
    width_inc: float = 1.02,
    width_dec: float = 0.5,
    initial_width: float = 1.0,
    n_runs: int = 1,
    measure: str | None = None,
    seed: int = 0,
    store: Store | str | Path | None = None,
    progress: bool = True,
    config: dict[str, Any] | None = None,
) -> EstimateResult:
    """Run :func:`multilevel_splitting` on every sample of ``data``, writing one record per sample.

    Each sample's property is "the prediction stays its label". Its record is ``falsified`` when the model already
    misclassifies it (distance 0, attack ``"clean"``) or when splitting evaluated a violation inside ball ∩
    domain (re-executed; ``adv_distance`` is ``threat.distance`` to the sample, attack ``"amls"``), else
    ``unknown``: an estimate is never a proof, so nothing is ever ``robust`` here. Each record's ``extra`` holds the
    sample's estimate (``log_p``, ``log_p_std``, ``spread``, ``n_levels``, ``termination``, ``max_score``) and
    ``queries`` its model calls (the clean prediction included); the run's summary gathers the estimates of every
    session. Sample ``i`` uses a seed
    derived from ``(seed, i)``, so its estimate is the same whichever session computes it.

    Args:
        model: classifier returning logits ``(N, K)``.
        data: a :class:`~bastion.data.Dataset` or a pair ``(x, y)``.
        threat: an l∞ or l2 ball whose domain matches the data's.
        n_particles: see :func:`multilevel_splitting`, as are the other hyperparameters.
        rho: level quantile.
        mh_steps: Metropolis-Hastings steps per level.
        max_levels: cap on the number of levels.
        log_p_min: floor of the log-estimate.
        target_acceptance: target acceptance rate of the proposal widths.
        width_inc: widening factor.
        width_dec: shrinking factor.
        initial_width: initial proposal width (see :func:`multilevel_splitting`).
        n_runs: independent runs per sample.
        measure: ``"intersect"`` or ``"clip"`` (None: by norm).
        seed: base seed.
        store: a :class:`~bastion.store.Store` or a path: records are written sample by sample, and an interrupted
            run resumes with the samples not yet done.
        progress: show a progress bar.
        config: extra JSON-able information stored with the run.

    Returns:
        An :class:`EstimateResult` (its ``to_dict()`` is the run's summary, with the per-sample estimates).

    Raises:
        InputError: on bad arguments or a domain mismatch.
    """
    t_start = time.perf_counter()
    model = _check_model(model)
    data = as_dataset(data)
    threat = _check_threat(threat)
    meas = _check_measure(measure, threat)
    cfg = _settings(
        n_particles, rho, mh_steps, max_levels, log_p_min, target_acceptance, width_inc, width_dec, initial_width,
        n_runs,
    )  # fmt: skip
    seed = _check_seed(seed)
    if threat.domain != data.domain:
        raise InputError(f"threat {threat!r} has domain {threat.domain} but the data's domain is {data.domain}")
    n = len(data)
    payload = {"threat": threat.key, "measure": meas, "seed": seed, **cfg.payload()}
    device = model_device(model)
    with resumable_run(
        store, kind="amls", payload=payload, fingerprints=lambda: (model_fingerprint(model), data.fingerprint()),
        n_samples=n, threats=[threat.key], config=config,
    ) as run:  # fmt: skip
        for idx, xb, yb in run.batches(data, 1, desc="multilevel splitting", progress=progress):
            i, label = int(idx[0]), int(yb[0])
            t0 = time.perf_counter()
            x = xb[0].to(device)
            with eval_mode(model), torch.no_grad():
                pred = int(model(x[None].to(_model_dtype(model))).argmax(1))
            res = multilevel_splitting(
                model, x, label, threat, n_particles=cfg.n_particles, rho=cfg.rho, mh_steps=cfg.mh_steps,
                max_levels=cfg.max_levels, log_p_min=cfg.log_p_min, target_acceptance=cfg.target_acceptance,
                width_inc=cfg.width_inc, width_dec=cfg.width_dec, initial_width=cfg.initial_width,
                n_runs=cfg.n_runs, measure=meas, seed=_sample_seed(seed, i),
            )  # fmt: skip
            status: Status
            dist: float | None
            method: str | None
            if pred != label:
                status, dist, method = "falsified", 0.0, CLEAN
            elif res.x_adv is not None:
                status, dist, method = "falsified", res.adv_distance, METHOD
            else:
                status, dist, method = "unknown", None, None
            seconds = time.perf_counter() - t0
            extra = {
                "log_p": res.log_p, "log_p_std": res.log_p_std, "spread": res.spread, "n_levels": res.n_levels,
                "termination": res.termination, "max_score": res.max_score,
            }  # fmt: skip
            record = SampleRecord(
                index=i, threat=threat.key, label=label, clean_pred=pred, status=status,
                adv_distance=dist, certified=None, attack=method, seconds=seconds, queries=1 + res.model_calls,
                extra=extra,
            )  # fmt: skip
            run.write([record])
        records = run.records(threat.key)
        estimates = {r.index: (float(r.extra["log_p"]), float(r.extra["log_p_std"])) for r in records}
        result = summarize_estimates(records, estimates, n, threat.key, meas)
        return run.finish(result, started=t_start)
