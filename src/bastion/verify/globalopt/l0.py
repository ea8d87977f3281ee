"""L0-TRE: converging lower and upper bounds on the minimal number of changed features (Hamming distance).

Ruan, Wu, Sun, Huang, Kroening & Kwiatkowska, "Global Robustness Evaluation of Deep Neural Networks with Provable
Guarantees for the Hamming Distance", IJCAI 2019 (reference code: github.com/TrustAI/L0-TRE, "DeepTRE").

For an input ``x`` with label ``y``, the quantity bounded is the minimal adversarial L0 distance

    ``d(x) = min { ||x' - x||_0 : x' in [lo, hi]^D, argmax f(x') != y }``

(the paper's *maximum safe radius*: every input with fewer than ``d(x)`` changed features keeps the label),
counted in *features*: input elements (``feature="element"``) or pixels with all their channels (``feature="pixel"``,
for ``(C, H, W)`` inputs; the same as elements otherwise). A misclassified input has ``d = 0``. The search works
level by level, ``t = 1, 2, ..., max_subset`` (the paper's subspace dimension), on every sample of a batch at once,
and returns after each level a lower bound ``L_t <= d(x)`` and an upper bound ``U_t >= d(x)``, with ``L_t``
non-decreasing and ``U_t`` non-increasing in ``t``; they meet, at the latest, at ``t = d(x)`` when level ``d(x)`` is
within the budget and every lower level is proven.

**Upper bound** (the paper's tensor-based search; the reference's ``GenerateSensitivitySetParal`` /
``GenerateUpperBound`` / ``TightenUpperBound`` and ``l0attack.py``):

1. *Sensitivity.* For every ``t``-subset ``S`` of features and every assignment of the features of ``S`` to the
   grid ``linspace(lo, hi, values)`` (``values = 2``: the two ends of the domain, the reference's ``pixel_num = 2``),
   the perturbed copies are evaluated in large batches (one forward per batch of copies, over all samples); the
   sensitivity of ``S`` is the largest drop of the label's logit, ``f_y(x) - min_v f_y(x[S <- v])``, and ``v*(S)``
   the assignment that attains it.
2. *Accumulation.* Walking the subsets in decreasing sensitivity, their features are set, cumulatively, to ``v*(S)``
   (a feature keeps the value of the first subset that sets it); the first adversarial prefix is the initial upper
   bound.
3. *Tightening.* Each modified feature, in the same order, is put back to its clean value if the input stays
   adversarial; passes repeat until none can be put back.

Every upper bound is the L0 distance of a concrete adversarial example, re-executed on the model at the end, and
counted from the example itself (features that differ from ``x``).

**Lower bound** (sound, replacing the paper's Lipschitz-based checks of each subspace): ``L = t`` is proven when
*no subset of ``t - 1`` features can change the label*: for every ``(t - 1)``-subset ``S``, sound bound propagation
of :mod:`bastion.verify.bounds` on the box where the features of ``S`` range over the whole domain ``[lo, hi]`` and
every other feature is fixed at its clean value shows ``f_y - f_j > 0`` for every ``j != y`` (a cascade of
``methods``, IBP then CROWN by default, each method only on the boxes the previous one left open). Boxes no method
decides are bisected on their widest input element, up to ``splits`` rounds (input splitting; every child's centre is
also executed, so an adversarial example found there is a real one, ``t`` features or fewer). Precisely:

* ``lower = 0`` for a misclassified sample and ``1`` for a correctly classified one;
* ``lower = t + 1`` once every ``t``-subset box, for ``t = 1, ..., lower - 1`` in turn, is proven safe (the proof is
  exhaustive over all ``C(F, t)`` subsets, which is only attempted while ``C(F, t) <= budget``; beyond that the
  lower bound stays at the best proven level: "exhaustive where feasible, else the best proven t");
* when a level is proven for ``t - 1`` and a ``t``-subset corner (or split centre) is adversarial, ``lower = upper =
  t`` (exact).

The bounds are computed in float64 on the traced network (:func:`~bastion.verify.ir.as_network`), so they hold for
the network in exact arithmetic; should a float32 model disagree with a proof by rounding (never seen on the test
networks), the re-executed adversarial example wins: ``lower`` is lowered to its distance, with a
:class:`~bastion.errors.BastionWarning`.

Pruning (sound): a sample leaves the search once its bounds meet; the lower-bound proof at level ``t`` only runs for
samples proven at ``t - 1`` (proving every ``t``-subset would prove every ``(t - 1)``-subset too, since a smaller
subset's box lies inside a larger one's, so a failed level stops the lower bound), and only on subsets none of whose
grid corners is already adversarial.

**Global robustness.** The paper defines the global robustness of a network on a test set as the mean of ``d(x)``
over it; :func:`l0_verify` returns its exact bracket ``[mean L, mean U]``. As an estimate of the expectation over
the input distribution (the data an i.i.d. sample of it), it adds a two-sided Hoeffding interval (Hoeffding, JASA
1963): with ``L_i`` in ``[0, max_subset + 1]`` and ``U_i`` in ``[0, F]``, ``E[d]`` lies in ``[mean L - (max_subset +
1) r, mean U + F r]`` with ``r = sqrt(ln(2 / δ) / (2 n))`` with probability at least ``1 - δ`` (``δ = 1 -
confidence``, split between the two sides). An upper bound that was never found is infinite, and so is the upper
end of the interval then.

Deviations from the reference code, and why:

* The lower bound uses sound bound propagation (and input splitting) instead of the paper's Lipschitz-constant
  global optimisation, which needs a Lipschitz constant the reference code never computes (its MATLAB lower bound
  only checks the grid points); the claim is therefore a proof, not an estimate.
* Adversarial grid corners are looked for among *all* assignments of a subset, not only its most sensitive one.
* Accumulation checks the prefix after every added feature rather than after every added subset: the reference's
  prefixes are among them, so the first adversarial prefix never comes later.
* ``TightenUpperBound`` of the MATLAB code restores a pixel that must stay modified to the first modified value
  (an indexing slip); here it gets its own value back (as ``l0attack.py`` does).
* Beyond the budget (``C(F, t) > budget``), the sensitivity of level ``t`` is computed on the ``m`` most sensitive
  single features (``C(m, t) <= budget``); the reference always enumerates every subset, out of reach for MNIST at
  ``t >= 2`` on a CPU.

Three ways in: :func:`l0_robustness` (bounds for a batch), :class:`L0TRE` (the upper-bound search as an attack for
``LpBall("l0", k)``) and :func:`l0_verify` (a data set, written to the result store and resumable).
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from bastion.attacks.base import positive_int
from bastion.attacks.l0tre import (
    FEATURES,
    L0TRE,
    _check_feature,
    _check_max_features,
    _int_param,
    _Level,
    _Search,
    feature_map,
)
from bastion.data import Dataset, as_dataset, validate_arrays
from bastion.errors import BastionWarning, InputError
from bastion.models.checks import check_logits, eval_mode, model_device, model_fingerprint
from bastion.results import Criterion, SampleRecord
from bastion.store import Store, resumable_run
from bastion.threat import LpBall, check_domain
from bastion.verify.bounds import METHODS as BOUND_METHODS
from bastion.verify.bounds import BoundOptions, compute_bounds, robustness_spec
from bastion.verify.ir import Network, as_network

__all__ = [
    "FEATURES",
    "L0TRE",
    "GlobalL0",
    "L0Bounds",
    "L0VerifyResult",
    "feature_map",
    "global_robustness",
    "l0_robustness",
    "l0_verify",
    "summarize_l0",
]

#: The ``attack`` field of records decided by this module, and of samples the model already gets wrong.
METHOD_NAME = "l0-tre"
CLEAN = "clean"


# --------------------------------------------------------------------------------------------------- validation
def _check_methods(methods: object) -> tuple[str, ...]:
    if isinstance(methods, str):
        methods = (methods,)
    if not isinstance(methods, Sequence) or len(methods) == 0:
        raise InputError(f"methods must be a non-empty sequence of bound methods from {BOUND_METHODS}, got {methods!r}")
    out = []
    for m in methods:
        name = str(m).strip().lower().replace("_", "-") if isinstance(m, str) else m
        if name not in BOUND_METHODS:
            raise InputError(f"unknown bound method {m!r} in methods; choose from {', '.join(BOUND_METHODS)}")
        out.append(str(name))
    return tuple(out)


# --------------------------------------------------------------------------------------------------- the proof
class _Prover:
    """Sound proofs that boxes (some features over the whole domain, the others clean) keep the label."""

    def __init__(
        self,
        net: Network,
        search: _Search,
        num_classes: int,
        *,
        methods: tuple[str, ...],
        splits: int,
        budget: int,
        max_boxes: int,
    ) -> None:
        self.net = net
        self.search = search
        self.k = num_classes
        self.methods = methods
        self.splits = splits
        self.budget = budget
        self.max_boxes = max_boxes
        self.x64 = search.x.to(torch.float64)
        self.boxes = torch.zeros(search.n, dtype=torch.long, device=search.device)

    def _safe(self, lo: Tensor, hi: Tensor, rows: Tensor) -> Tensor:
        """Per box, True when some method proves every margin ``f_y - f_j`` positive over it (chunked cascade)."""
        ok = torch.zeros(lo.shape[0], dtype=torch.bool, device=lo.device)
        shape = self.search.shape
        for method in self.methods:
            todo = (~ok).nonzero().squeeze(1)
            for c0 in range(0, todo.numel(), self.max_boxes):
                idx = todo[c0 : c0 + self.max_boxes]
                spec = robustness_spec(self.search.labels[rows[idx]], self.k).to(torch.float64)
                with torch.no_grad():
                    lb = compute_bounds(
                        self.net,
                        lo[idx].reshape(-1, *shape),
                        hi[idx].reshape(-1, *shape),
                        C=spec,
                        method=method,
                        options=BoundOptions(method=method, bound_upper=False),
                    ).lower
                ok[idx] = (lb > 0).all(dim=1)
                self.boxes.index_add_(0, rows[idx], torch.ones_like(idx))
        return ok

    def _boxes(self, rows: Tensor, ids: Tensor) -> tuple[Tensor, Tensor]:
        """Boxes (B, numel) for the subsets ``ids`` (B, t) of the samples ``rows`` (B,)."""
        search = self.search
        base = self.x64[rows]
        idx = search.elems[ids].reshape(base.shape[0], -1)
        lo = base.scatter(1, idx, torch.full(idx.shape, search.lo, dtype=base.dtype, device=base.device))
        hi = base.scatter(1, idx, torch.full(idx.shape, search.hi, dtype=base.dtype, device=base.device))
        return lo, hi

    def prove(self, rows: Tensor, lvl: _Level) -> tuple[Tensor, Tensor, Tensor]:
        """Try to prove every subset box of the level safe, for each of ``rows`` (none of whose corners is
        adversarial).

        Returns:
            ``(proven, adv_img, adv_cnt)`` per row: the level is proven, and the best adversarial input found at a
            split centre with its distance (``inf`` where none).
        """
        search = self.search
        r_all, s_all, _ = lvl.ids.shape
        proven = torch.ones(r_all, dtype=torch.bool, device=search.device)
        adv_img = search.x[rows].clone()
        adv_cnt = torch.full((r_all,), math.inf, dtype=torch.float64, device=search.device)
        open_lo: list[Tensor] = []
        open_hi: list[Tensor] = []
        open_row: list[Tensor] = []
        per_chunk = max(1, self.max_boxes)
        pairs_r = torch.arange(r_all, device=search.device).repeat_interleave(s_all)
        pairs_s = torch.arange(s_all, device=search.device).repeat(r_all)
        for c0 in range(0, pairs_r.numel(), per_chunk):
            pr, ps = pairs_r[c0 : c0 + per_chunk], pairs_s[c0 : c0 + per_chunk]
            lo, hi = self._boxes(rows[pr], lvl.ids[pr, ps])
            safe = self._safe(lo, hi, rows[pr])
            if not bool(safe.all()):
                open_lo.append(lo[~safe])
                open_hi.append(hi[~safe])
                open_row.append(pr[~safe])
        if not open_row:
            return proven, adv_img, adv_cnt
        lo, hi, owner = torch.cat(open_lo), torch.cat(open_hi), torch.cat(open_row)
        failed = torch.zeros(r_all, dtype=torch.bool, device=search.device)
        for _ in range(self.splits):
            keep = ~failed[owner]
            lo, hi, owner = lo[keep], hi[keep], owner[keep]
            if owner.numel() == 0:
                break
            counts = torch.bincount(owner, minlength=r_all)
            failed |= 2 * counts > self.budget  # the leaves of this row would exceed the budget
            keep = ~failed[owner]
            lo, hi, owner = lo[keep], hi[keep], owner[keep]
            if owner.numel() == 0:
                break
            dim = (hi - lo).argmax(dim=1)
            ar = torch.arange(owner.numel(), device=search.device)
            mid = (lo[ar, dim] + hi[ar, dim]) / 2
            hi_left, lo_right = hi.clone(), lo.clone()
            hi_left[ar, dim] = mid
            lo_right[ar, dim] = mid
            lo = torch.cat([lo, lo_right])
            hi = torch.cat([hi_left, hi])
            owner = torch.cat([owner, owner])
            # every child's centre is a real input with at most `level` changed features: try it
            centre = ((lo + hi) / 2).to(search.x.dtype)
            is_adv = torch.zeros(owner.numel(), dtype=torch.bool, device=search.device)
            for c0 in range(0, owner.numel(), search.batch_size):
                sl = slice(c0, c0 + search.batch_size)
                is_adv[sl] = search.adversarial(centre[sl], rows[owner[sl]])
            if bool(is_adv.any()):
                hit = is_adv.nonzero().squeeze(1)
                cnt = search.changed(centre[hit], rows[owner[hit]]).to(torch.float64)
                # per row, the hit with the fewest changed features (the first of them)
                order = torch.argsort(cnt, stable=True)
                hit, cnt = hit[order], cnt[order]
                o = owner[hit]
                first = torch.ones_like(o, dtype=torch.bool)
                o_sorted, perm = torch.sort(o, stable=True)
                first[perm[1:]] = o_sorted[1:] != o_sorted[:-1]
                hit, cnt, o = hit[first], cnt[first], o[first]
                better = cnt < adv_cnt[o]
                adv_cnt[o[better]] = cnt[better]
                adv_img[o[better]] = centre[hit[better]]
                failed[o] = True
            safe = self._safe(lo, hi, rows[owner])
            keep = ~safe
            lo, hi, owner = lo[keep], hi[keep], owner[keep]
        failed[owner] = True
        proven &= ~failed
        return proven, adv_img, adv_cnt


# --------------------------------------------------------------------------------------------------- results
@dataclass
class L0Bounds:
    """Per-sample bounds on the minimal number of changed features, from :func:`l0_robustness`.

    Attributes:
        lower: ``(N,)`` int64, proven lower bounds ``L <= d(x)`` (0 for a misclassified input, 1 for a correct one
            with nothing more proven).
        upper: ``(N,)`` float64, the distance of ``x_adv``, an upper bound ``d(x) <= U`` (``inf`` where no
            adversarial example was found; 0 for a misclassified input).
        x_adv: the best adversarial example per sample (the clean input where none was found), in the inputs'
            shape; re-executed: ``success`` says it is adversarial.
        success: ``(N,)`` bool, ``x_adv`` is misclassified (re-predicted).
        clean_pred: ``(N,)`` the predictions on the clean inputs.
        evaluations: ``(N,)`` int64, model forward evaluations spent on each sample.
        boxes: ``(N,)`` int64, bound computations (boxes, per method) spent on each sample.
        seconds: ``(N,)`` float64, each sample's share of the wall time.
        lower_history: ``(N, max_subset)`` the lower bound after each level ``t = 1, ...``.
        upper_history: ``(N, max_subset)`` the upper bound after each level.
        feature: the feature granularity (``"pixel"`` or ``"element"``).
        n_features: number of features per input.
    """

    lower: Tensor
    upper: Tensor
    x_adv: Tensor
    success: Tensor
    clean_pred: Tensor
    evaluations: Tensor
    boxes: Tensor
    seconds: Tensor
    lower_history: Tensor
    upper_history: Tensor
    feature: str
    n_features: int

    @property
    def converged(self) -> Tensor:
        """``(N,)`` bool: the bounds meet, so ``d(x)`` is known exactly."""
        return self.lower.to(torch.float64) == self.upper

    @property
    def certified_radius(self) -> Tensor:
        """``(N,)`` int64: the largest ``k`` such that ``LpBall("l0", k)`` is proven safe, ``max(L - 1, 0)``."""
        return (self.lower - 1).clamp(min=0)


@dataclass
class GlobalL0:
    """Global L0 robustness: the mean of the per-input bounds and a Hoeffding interval for the expectation.

    Attributes:
        n: number of inputs.
        lower_mean: mean of the lower bounds (the exact lower end of the data set's global robustness).
        upper_mean: mean of the upper bounds (``inf`` if some input has none).
        confidence: the interval's level ``1 - δ``.
        lower_ci: ``lower_mean - lower_range · r``: the expectation over the distribution is at least this...
        upper_ci: ``upper_mean + upper_range · r``: ...and at most this, together with probability ``>= 1 - δ``,
            ``r = sqrt(ln(2 / δ) / (2 n))`` (Hoeffding's inequality for values in ``[0, range]``, one side each).
        method: ``"hoeffding"``.
    """

    n: int
    lower_mean: float
    upper_mean: float
    confidence: float
    lower_ci: float
    upper_ci: float
    method: str = "hoeffding"

    def to_dict(self) -> dict[str, Any]:
        return {
            "n": self.n, "lower_mean": self.lower_mean, "upper_mean": self.upper_mean, "confidence": self.confidence,
            "lower_ci": self.lower_ci, "upper_ci": self.upper_ci, "method": self.method,
        }  # fmt: skip


def global_robustness(
    lower: Sequence[float] | Tensor,
    upper: Sequence[float] | Tensor,
    *,
    lower_range: float,
    upper_range: float,
    confidence: float = 0.95,
) -> GlobalL0:
    """The global robustness bracket of a data set and a Hoeffding interval for the expectation.

    Args:
        lower: per-input lower bounds, each in ``[0, lower_range]``.
        upper: per-input upper bounds, each in ``[0, upper_range]`` or ``inf``.
        lower_range: the largest value a lower bound can take (``max_subset + 1``).
        upper_range: the largest finite value an upper bound can take (the number of features).
        confidence: level of the interval, in (0, 1).

    Returns:
        A :class:`GlobalL0`.
    """
    if isinstance(confidence, bool) or not isinstance(confidence, (int, float)) or not 0.0 < confidence < 1.0:
        raise InputError(f"confidence must be in (0, 1), got {confidence!r}")
    lo = torch.as_tensor(lower, dtype=torch.float64).reshape(-1).cpu()
    up = torch.as_tensor(upper, dtype=torch.float64).reshape(-1).cpu()
    if lo.shape != up.shape:
        raise InputError(f"lower and upper must have the same length, got {lo.numel()} and {up.numel()}")
    if bool(torch.isnan(lo).any() | torch.isnan(up).any()) or bool((lo > up).any()):
        raise InputError("lower and upper bounds must be numbers with lower <= upper")
    n = lo.numel()
    if n == 0:
        return GlobalL0(0, math.nan, math.nan, float(confidence), -math.inf, math.inf)
    r = math.sqrt(math.log(2.0 / (1.0 - confidence)) / (2.0 * n))
    lm, um = float(lo.mean()), float(up.mean())
    return GlobalL0(n, lm, um, float(confidence), max(0.0, lm - lower_range * r), um + upper_range * r)


# --------------------------------------------------------------------------------------------------- the API
def _model_dtype(model: nn.Module, like: Tensor) -> torch.dtype:
    for p in model.parameters():
        if p.is_floating_point():
            return p.dtype
    return like.dtype


def _prepare(model: nn.Module, x: Any, y: Any, domain: tuple[float, float], where: str) -> tuple[Tensor, Tensor]:
    if not isinstance(model, nn.Module):
        raise InputError(f"{where}: model must be a torch.nn.Module, got {type(model).__name__}")
    x_t, y_t, _ = validate_arrays(x, y, domain=domain, source=f"x/y given to {where}")
    if torch.is_tensor(x) and x.is_floating_point():
        x_t = x.detach()  # validated; keep the caller's values (float64 stays float64)
    device = model_device(model)
    return x_t.to(device=device, dtype=_model_dtype(model, x_t)), y_t.to(device)


def l0_robustness(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    *,
    max_subset: int = 2,
    budget: int = 50_000,
    feature: str = "pixel",
    values: int = 2,
    methods: Sequence[str] = ("ibp", "crown"),
    splits: int = 4,
    max_features: int | None = None,
    refine: bool = True,
    certify: bool = True,
    domain: tuple[float, float] = (0.0, 1.0),
    batch_size: int = 8192,
    max_boxes: int = 2048,
) -> L0Bounds:
    """L0-TRE lower and upper bounds on the minimal number of changed features, for a batch.

    Args:
        model: classifier returning logits ``(N, K)``; for the lower bound it must trace into the verification IR.
        x: inputs ``(N, ...)`` inside ``domain``.
        y: labels ``(N,)`` in ``[0, K)``.
        max_subset: the largest subset size ``t`` searched (the paper's subspace dimension; its case study runs 2).
        budget: the most subsets per level and sample: a level whose ``C(F, t)`` exceeds it is not proven (the
            lower bound stops below it) and its sensitivity is computed on the most sensitive single features only;
            it also caps the leaves of the input splitting per sample and level.
        feature: ``"pixel"`` (the channels of one location of a (C, H, W) input change together, as in the paper)
            or ``"element"``.
        values: grid points per feature in the sensitivity search (``linspace(lo, hi, values)``; the paper's 2).
        methods: the cascade of bound methods tried on each box (see :data:`bastion.verify.bounds.METHODS`).
        splits: rounds of input bisection on boxes no method decides (0: none).
        max_features: the longest prefix of the accumulation, in features (the reference attack's ``mani_range``;
            None: every feature).
        refine: tighten the upper bound by putting features back (the paper's ``TightenUpperBound``).
        certify: compute the proven lower bound (False: only the upper-bound search; ``lower`` then stays 0/1).
        domain: ``(lo, hi)`` of every input element.
        batch_size: inputs per forward evaluation.
        max_boxes: boxes per bound computation.

    Returns:
        An :class:`L0Bounds`.

    Raises:
        InputError: on bad arguments, inputs outside the domain, labels out of range or an untraceable model.
    """
    start = time.perf_counter()
    lo_d, hi_d = check_domain(domain)
    max_subset = _int_param("max_subset", max_subset, 1)
    budget = _int_param("budget", budget, 1)
    feature = _check_feature(feature)
    values = _int_param("values", values, 2)
    mlist = _check_methods(methods)
    splits = _int_param("splits", splits, 0)
    max_features = _check_max_features(max_features)
    batch_size = positive_int("batch_size", batch_size)
    max_boxes = positive_int("max_boxes", max_boxes)
    if not isinstance(refine, bool) or not isinstance(certify, bool):
        raise InputError(f"refine and certify must be True or False, got {refine!r} and {certify!r}")
    x_t, y_t = _prepare(model, x, y, (lo_d, hi_d), "l0_robustness")
    n = x_t.shape[0]
    with eval_mode(model), torch.no_grad():
        logits = model(x_t)
        k = check_logits(logits, n)
        if n and int(y_t.max()) >= k:
            raise InputError(f"labels go up to {int(y_t.max())} but the model returns {k} logits")
        search = _Search(
            model, x_t, Criterion(y_t), feature=feature, values=values, domain=(lo_d, hi_d), batch_size=batch_size
        )
        search.forwards += 1  # the clean prediction above
        net: Network | None = None
        if certify:
            net = as_network(model, x_t.shape[1:]).to(x_t.device, torch.float64)
        return _run(
            search, net, k, logits.argmax(dim=1), start, max_subset=max_subset, budget=budget, methods=mlist,
            splits=splits, max_features=max_features, refine=refine, max_boxes=max_boxes,
        )  # fmt: skip


def _run(
    search: _Search,
    net: Network | None,
    k: int,
    pred: Tensor,
    start: float,
    *,
    max_subset: int,
    budget: int,
    methods: tuple[str, ...],
    splits: int,
    max_features: int | None,
    refine: bool,
    max_boxes: int,
) -> L0Bounds:
    n, dev = search.n, search.device
    correct = pred == search.labels
    lower = correct.to(torch.long)
    upper = torch.where(correct, math.inf, 0.0).to(torch.float64)
    best = search.x.clone()
    lower_hist = torch.zeros(n, max_subset, dtype=torch.long, device=dev)
    upper_hist = torch.zeros(n, max_subset, dtype=torch.float64, device=dev)
    seconds = torch.full((n,), (time.perf_counter() - start) / max(n, 1), dtype=torch.float64, device=dev)
    prover = None
    if net is not None:
        prover = _Prover(net, search, k, methods=methods, splits=splits, budget=budget, max_boxes=max_boxes)
    sens1: Tensor | None = None

    def offer(rows: Tensor, img: Tensor, cnt: Tensor) -> None:
        better = cnt < upper[rows]
        upper[rows[better]] = cnt[better]
        best[rows[better]] = img[better]

    for level in range(1, max_subset + 1):
        t0 = time.perf_counter()
        rows = (correct & (lower.to(torch.float64) < upper)).nonzero().squeeze(1)
        if rows.numel():
            exhaustive = math.comb(search.n_features, level) <= budget
            cand = search.candidates(rows, level, budget, sens1)
            lvl, c_img, c_cnt = search.sensitivity(rows, level, cand)
            if level == 1:
                sens1 = torch.full((n, search.n_features), -math.inf, dtype=lvl.sens.dtype, device=dev)
                sens1[rows] = lvl.sens
            offer(rows, c_img, c_cnt)
            if prover is not None and exhaustive:
                # prove level t for the rows whose lower levels are proven and none of whose corners is adversarial
                sel = ((lower[rows] == level) & ~lvl.corner_adv.any(dim=1)).nonzero().squeeze(1)
                if sel.numel():
                    sub = _Level(lvl.ids[sel], lvl.best_vals[sel], lvl.sens[sel], lvl.corner_adv[sel])
                    proven, p_img, p_cnt = prover.prove(rows[sel], sub)
                    lower[rows[sel[proven]]] = level + 1
                    offer(rows[sel], p_img, p_cnt)
            todo = (lower[rows].to(torch.float64) < upper[rows]).nonzero().squeeze(1)
            if todo.numel():
                sub = _Level(lvl.ids[todo], lvl.best_vals[todo], lvl.sens[todo], lvl.corner_adv[todo])
                u_img, u_cnt = search.upper(rows[todo], sub, max_features, refine)
                offer(rows[todo], u_img, u_cnt)
            seconds[rows] += (time.perf_counter() - t0) / rows.numel()
        # a proof contradicted by a re-executed example (float rounding of the model) gives way to the example
        clash = lower.to(torch.float64) > upper
        if bool(clash.any()):
            warnings.warn(
                f"l0_robustness: {int(clash.sum())} lower bound(s) proven in float64 exceed the distance of an "
                "adversarial example of the model (float rounding?); lowered to that distance",
                BastionWarning,
                stacklevel=3,
            )
            lower = torch.where(clash, upper.clamp(max=search.n_features + 1).to(torch.long), lower)
        lower_hist[:, level - 1] = lower
        upper_hist[:, level - 1] = upper
    t0 = time.perf_counter()
    found = torch.isfinite(upper) & correct
    rows = found.nonzero().squeeze(1)
    success = ~correct
    if rows.numel():
        ok = search.adversarial(best[rows], rows)
        success[rows] = ok
        lost = rows[~ok]  # cannot happen for a deterministic model; never report what did not re-execute
        upper[lost] = math.inf
        best[lost] = search.x[lost]
        upper[rows[ok]] = search.changed(best[rows[ok]], rows[ok]).to(torch.float64)
    seconds += (time.perf_counter() - t0) / max(n, 1)
    return L0Bounds(
        lower=lower,
        upper=upper,
        x_adv=best.reshape(n, *search.shape),
        success=success,
        clean_pred=pred,
        evaluations=search.forwards.clone(),
        boxes=prover.boxes.clone() if prover is not None else torch.zeros(n, dtype=torch.long, device=dev),
        seconds=seconds,
        lower_history=lower_hist,
        upper_history=upper_hist,
        feature=search.feature,
        n_features=search.n_features,
    )


# --------------------------------------------------------------------------------------------------- the attack
# --------------------------------------------------------------------------------------------------- data sets
@dataclass
class L0VerifyResult:
    """Summary of :func:`l0_verify`, derived from its per-sample records.

    Attributes:
        n: samples.
        threat: the records' threat key (``LpBall("l0", eps).key``, with ``|pixels`` appended when features are
            multi-channel pixels, whose count is not bastion's element count).
        eps: the radius ``k`` the status refers to: ``robust`` when ``LpBall("l0", k)`` is proven safe,
            ``falsified`` when an example with at most ``k`` changed features is known.
        clean_accuracy: fraction classified correctly.
        robust: fraction proven robust at ``eps``.
        falsified: fraction falsified at ``eps`` (clean misclassifications included).
        converged: fraction of samples whose bounds meet.
        global_bounds: the data set's global robustness bracket and its Hoeffding interval (:class:`GlobalL0`).
        records: per-sample records: ``certified`` is the certified L0 radius ``max(L - 1, 0)``, ``adv_distance``
            the upper bound ``U`` (None where no example was found).
        run_id: id of the run in the store, if any.
        seconds: wall time of this call.
    """

    n: int
    threat: str
    eps: int
    clean_accuracy: float
    robust: float
    falsified: float
    converged: float
    global_bounds: GlobalL0
    records: list[SampleRecord] = field(repr=False, default_factory=list)
    run_id: int | None = None
    seconds: float = 0.0

    def bounds(self) -> list[tuple[int, float]]:
        """``(L, U)`` per sample, in index order (``U = inf`` where no example was found)."""
        return [_bounds_of(r) for r in sorted(self.records, key=lambda r: r.index)]

    def to_dict(self) -> dict[str, Any]:
        """JSON-able summary (without the records)."""
        return {
            "n": self.n, "threat": self.threat, "eps": self.eps, "clean_accuracy": self.clean_accuracy,
            "robust": self.robust, "falsified": self.falsified, "converged": self.converged,
            "global": self.global_bounds.to_dict(), "run_id": self.run_id, "seconds": self.seconds,
        }  # fmt: skip

    def table(self) -> str:
        """A short plain-text summary."""
        g = self.global_bounds
        return "\n".join(
            [
                f"threat              {self.threat}",
                f"samples             {self.n}",
                f"clean accuracy      {100 * self.clean_accuracy:.2f}%",
                f"robust at k={self.eps:<6d}  {100 * self.robust:.2f}%",
                f"falsified at k={self.eps:<3d}  {100 * self.falsified:.2f}%",
                f"converged           {100 * self.converged:.2f}%",
                f"global robustness   [{g.lower_mean:.4g}, {g.upper_mean:.4g}] (mean L, mean U)",
                f"{100 * g.confidence:.0f}% Hoeffding      [{g.lower_ci:.4g}, {g.upper_ci:.4g}]",
            ]
        )


def _bounds_of(r: SampleRecord) -> tuple[int, float]:
    if r.clean_pred != r.label:
        return 0, 0.0
    return int(r.certified or 0) + 1, math.inf if r.adv_distance is None else float(r.adv_distance)


def summarize_l0(
    records: list[SampleRecord],
    n: int,
    threat: str,
    eps: int,
    lower_range: float,
    upper_range: float,
    confidence: float,
) -> L0VerifyResult:
    """The summary of a run from its records (the only place it is computed, so a resumed run agrees)."""
    mine = sorted((r for r in records if r.threat == threat), key=lambda r: r.index)
    pairs = [_bounds_of(r) for r in mine]
    m = max(len(mine), 1)
    g = global_robustness(
        [p[0] for p in pairs], [p[1] for p in pairs], lower_range=lower_range, upper_range=upper_range,
        confidence=confidence,
    )  # fmt: skip
    return L0VerifyResult(
        n=n,
        threat=threat,
        eps=eps,
        clean_accuracy=sum(r.clean_pred == r.label for r in mine) / m,
        robust=sum(r.status == "robust" for r in mine) / m,
        falsified=sum(r.status == "falsified" for r in mine) / m,
        converged=sum(lo == up for lo, up in pairs) / m,
        global_bounds=g,
        records=mine,
    )


def l0_verify(
    model: nn.Module,
    data: Dataset | tuple[Tensor, Tensor],
    *,
    threat: LpBall | None = None,
    max_subset: int = 2,
    budget: int = 50_000,
    feature: str = "pixel",
    values: int = 2,
    methods: Sequence[str] = ("ibp", "crown"),
    splits: int = 4,
    max_features: int | None = None,
    refine: bool = True,
    confidence: float = 0.95,
    batch_size: int = 16,
    store: Store | str | Path | None = None,
    progress: bool = True,
    config: dict[str, Any] | None = None,
) -> L0VerifyResult:
    """L0-TRE on every sample of a data set: per-sample records in the store, and the global robustness.

    Each sample gets one :class:`~bastion.results.SampleRecord` under the threat ``LpBall("l0", eps)``:
    ``certified`` is the certified L0 radius ``max(L - 1, 0)`` (every input with at most that many changed features
    is proven to keep the label: the convention of every certified radius in bastion, ``certified >= eps`` meaning
    robust at ``eps``), ``adv_distance`` the upper bound ``U`` (the distance of a re-executed adversarial example;
    None if none was found), ``status`` ``robust`` if ``L > eps``, ``falsified`` if ``U <= eps`` (or the clean input
    is misclassified, distance 0), ``unknown`` otherwise. Records are written batch by batch; an interrupted run
    resumes with the samples not yet done.

    Args:
        model: classifier returning logits; must trace into the verification IR.
        data: a :class:`~bastion.data.Dataset` or a pair ``(x, y)``.
        threat: ``LpBall("l0", k)`` naming the radius of the status (default ``k = 1``); its domain must be the
            data's.
        max_subset, budget, feature, values, methods, splits, max_features, refine: as in :func:`l0_robustness`.
        confidence: level of the Hoeffding interval of the global robustness.
        batch_size: samples per batch (and per store transaction).
        store: a :class:`~bastion.store.Store`, a path, or None (records kept in memory).
        progress: show a progress bar.
        config: extra JSON-able information stored with the run.

    Returns:
        An :class:`L0VerifyResult` with the data set's global robustness bracket and interval.
    """
    t_start = time.perf_counter()
    if not isinstance(model, nn.Module):
        raise InputError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    data = as_dataset(data)
    if threat is None:
        threat = LpBall("l0", 1, domain=data.domain)
    if not isinstance(threat, LpBall) or threat.norm != "l0" or not math.isfinite(threat.eps):
        raise InputError(f"threat must be an LpBall('l0', k) with a finite k, got {threat!r}")
    if threat.domain != data.domain:
        raise InputError(f"threat {threat!r} has domain {threat.domain} but the data's domain is {data.domain}")
    eps = int(threat.eps)
    feature = _check_feature(feature)
    max_subset = _int_param("max_subset", max_subset, 1)
    opts = {
        "max_subset": max_subset, "budget": _int_param("budget", budget, 1),
        "feature": feature, "values": _int_param("values", values, 2), "methods": _check_methods(methods),
        "splits": _int_param("splits", splits, 0), "max_features": _check_max_features(max_features),
        "refine": refine,
    }  # fmt: skip
    batch_size = positive_int("batch_size", batch_size)
    global_robustness([], [], lower_range=1.0, upper_range=1.0, confidence=confidence)  # validates confidence
    _, n_features = feature_map(data.feature_shape, feature)
    grouped = n_features != math.prod(data.feature_shape)
    key = threat.key + ("|pixels" if grouped else "")
    n = len(data)
    device = model_device(model)
    payload = {"threat": key, **{k: list(v) if isinstance(v, tuple) else v for k, v in opts.items()}}
    with resumable_run(
        store, kind="l0-verify", payload=payload, fingerprints=lambda: (model_fingerprint(model), data.fingerprint()),
        n_samples=n, threats=[key], config={"batch_size": batch_size, **(config or {})},
    ) as run:  # fmt: skip
        for idx, xb, yb in run.batches(data, batch_size, desc="l0-tre", progress=progress):
            res = l0_robustness(model, xb.to(device), yb.to(device), domain=data.domain, **opts)  # type: ignore[arg-type]
            run.write(_records(res, idx, yb, key, eps))
            found = res.upper[torch.isfinite(res.upper)]
            run.show(lower=float(res.lower.double().mean()), upper=float(found.mean()) if found.numel() else math.inf)
        summary = summarize_l0(run.records(key), n, key, eps, max_subset + 1.0, float(n_features), confidence)
        return run.finish(summary, started=t_start)


def _records(res: L0Bounds, idx: Tensor, y: Tensor, key: str, eps: int) -> list[SampleRecord]:
    out = []
    lower, upper = res.lower.tolist(), res.upper.tolist()
    preds, secs = res.clean_pred.tolist(), res.seconds.tolist()
    for j in range(len(lower)):
        label, pred = int(y[j]), int(preds[j])
        lo, up = int(lower[j]), float(upper[j])
        if pred != label:
            status, attack = "falsified", CLEAN
        elif lo > eps:
            status, attack = "robust", METHOD_NAME
        elif up <= eps:
            status, attack = "falsified", METHOD_NAME
        else:
            status, attack = "unknown", None
        out.append(
            SampleRecord(
                index=int(idx[j]), threat=key, label=label, clean_pred=pred, status=status,  # type: ignore[arg-type]
                adv_distance=up if math.isfinite(up) else None, certified=float(max(lo - 1, 0)), attack=attack,
                seconds=float(secs[j]), queries=int(res.evaluations[j]), extra={"lower": lo, "upper": up},
            )
        )  # fmt: skip
    return out
