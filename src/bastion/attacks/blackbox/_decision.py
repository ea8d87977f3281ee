"""The machinery every decision-based attack shares (Boundary, HopSkipJump, OPT, Sign-OPT, RayS).

A decision-based attack sees the model's top-1 label only. What the attacks of this package have in common lives
here, once:

* :class:`LabelSearch`: the label queries of one run, each charged to its sample through the counting model's
  ledger, in budget rounds (a sample that cannot pay for its queries of a round makes none and stops), clipped to
  the input domain, and the final push off the boundary (:meth:`LabelSearch.finish`);
* :func:`boundary_bisect`: the binary search to the decision boundary between a clean input and an adversarial
  point, on the blending factor (l2; Boundary's start, HopSkipJump's step 1) or on the l∞ radius of the
  projection (HopSkipJump l∞);
* :func:`adversarial_start`: the starting point of Boundary and HopSkipJump: candidate inputs nearest first, then
  uniform noise over the domain, blended towards the clean input by :func:`boundary_bisect`;
* :class:`DecisionAttack`: the base class (labels-only access, minimal distortion, candidate ``starts``) and
  :func:`check_starts`, the validation of those starts.

Query accounting is exact and per sample: every point sent to the model is one query of the sample it belongs to.
"""

from __future__ import annotations

import hashlib
from typing import Any

import numpy as np
import torch
from torch import nn

from bastion.attacks.base import Attack, CountingModel, adversarial_labels
from bastion.errors import InputError
from bastion.results import AttackResult, Criterion
from bastion.threat import LpBall, ThreatModel

#: Most input elements sent to the model in one labels call (larger query batches are split).
QUERY_CHUNK = 1 << 22
#: Relative push of the final point away from ``x`` (see :meth:`LabelSearch.finish`).
FINAL_PUSH = 1e-4


class LabelSearch:
    """The label queries of one decision-based run, each charged to its sample, in budget rounds.

    An attack asks :meth:`pay` which of the queries it wants to make now can be paid for (a sample that cannot pay
    for all of its queries of the round makes none of them and is marked :attr:`exhausted`: its search is over),
    then :meth:`adversarial` answers them. Points are clipped to the input domain before they are queried, as in
    every reference implementation, so an answer always belongs to the point the attack keeps.

    Every sample keeps ``reserve`` queries of its budget back for :meth:`finish`.

    Args:
        model: the attack's counting model (inside ``run``).
        limit: the attack's own per-sample query budget.
        criterion: what counts as adversarial for the run's samples.
        threat: the threat model (its domain clips every query).
        n: number of samples of the run.
        device: device of the samples.
        reserve: queries per sample held back from :meth:`pay` for :meth:`finish`.
    """

    def __init__(
        self,
        model: CountingModel,
        limit: int,
        criterion: Criterion,
        threat: ThreatModel,
        n: int,
        device: torch.device,
        reserve: int = 1,
    ) -> None:
        self.ledger = model.ledger(limit)
        self.criterion = criterion
        self.threat = threat
        self.exhausted = torch.zeros(n, dtype=torch.bool, device=device)
        self.reserve = reserve

    def pay(self, rows: torch.Tensor, cost: int | torch.Tensor = 1) -> torch.Tensor:
        """Which of the wanted queries can be made now: a boolean mask over ``rows``.

        Args:
            rows: the sample of each wanted entry (k,); repeats allowed (several points of one sample).
            cost: queries each entry needs, one number or one per entry (k,).
        """
        rows = rows.reshape(-1)
        k = rows.numel()
        if k == 0:
            return torch.zeros(0, dtype=torch.bool, device=rows.device)
        c = torch.as_tensor(cost, device=rows.device, dtype=torch.long).expand(k)
        live = ~self.exhausted[rows]
        if k > 1 and not bool((rows[1:] > rows[:-1]).all()):  # repeated samples: add up their queries
            uniq, inverse = rows.unique(return_inverse=True)
            need = torch.zeros(uniq.shape[0], dtype=torch.long, device=rows.device)
            need.scatter_add_(0, inverse, c * live)
        else:
            uniq, need = rows, c * live
        # QueryLedger.afford's rule, as a mask: the sample's own allowance, then the total budget in order
        want = need > 0
        ok = want & (self.ledger.left()[uniq] >= need + self.reserve)
        total = self.ledger.total_left()
        if total is not None:
            ok &= torch.where(ok, need + self.reserve, 0).cumsum(0) <= total
        self.exhausted[uniq[want & ~ok]] = True
        return ~self.exhausted[rows]

    def adversarial(self, points: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """Whether each point (k, ...) meets its sample's criterion (k,), by the model's label; k queries."""
        points = self.threat.clip(points)
        k = points.shape[0]
        if k == 0:
            return torch.zeros(0, dtype=torch.bool, device=points.device)
        step = max(1, QUERY_CHUNK // max(points[0].numel(), 1))
        out = []
        for s in range(0, k, step):
            part = rows[s : s + step]
            pred = self.ledger.labels(points[s : s + step], part)
            out.append(adversarial_labels(self.criterion.subset(part), pred))
        return torch.cat(out)

    def finish(self, x: torch.Tensor, best: torch.Tensor, found: torch.Tensor) -> torch.Tensor:
        """The final points: the best ones pushed by ``FINAL_PUSH`` (relative) away from ``x`` where still adversarial.

        Binary searches end on the boundary to float precision, where the top two logits can tie and the label can
        change with the batch the model evaluates a point in (a different order of float operations): the base's
        re-verification could then disagree with the attack. One query at ``x + (1 + 1e-4) (best - x)`` (clipped),
        paid from the reserve, moves each point off the boundary; where it is not adversarial, ``best`` stays.

        Args:
            x: clean inputs (n, ...).
            best: the best adversarial points found (n, ...), queried adversarial.
            found: which samples have one (n,).
        """
        moved = (best != x).flatten(1).any(dim=1)
        rows = (found & moved).nonzero().squeeze(1)
        if rows.numel() == 0:
            return best
        rows = self.ledger.afford(rows, 1)
        points = self.threat.clip(x[rows] + (1 + FINAL_PUSH) * (best[rows] - x[rows]))
        hit = self.adversarial(points, rows)
        out = best.clone()
        out[rows[hit]] = points[hit]
        return out

    @property
    def used(self) -> torch.Tensor:
        """Queries spent per sample (n,): what ``run`` returns."""
        return self.ledger.used


def boundary_bisect(
    search: LabelSearch,
    x0: torch.Tensor,
    xp: torch.Tensor,
    rows: torch.Tensor,
    threshold: float | torch.Tensor,
    *,
    norm: str = "l2",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Binary search to the boundary between ``x0`` (not adversarial) and ``xp`` (adversarial), batched over entries.

    ``norm="l2"``: on the blending factor ``a`` of ``(1 - a) x0 + a xp``, from the bracket ``[0, 1]``; ``"linf"``:
    on the radius ``r`` of the l∞ projection ``clip(xp, x0 - r, x0 + r)``, from ``[0, ||xp - x0||∞]`` (HopSkipJump's
    two searches). Each halving is one query of the entry's sample; an entry stops when its bracket is no wider than
    its ``threshold``, when no float lies strictly inside it any more, or when its sample cannot pay (then it keeps
    the adversarial end reached so far).

    Args:
        search: the run's label queries (its threat must be an :class:`~bastion.threat.LpBall` for ``"linf"``).
        x0: the clean input of each entry (k, ...).
        xp: an adversarial point of each entry (k, ...), already queried.
        rows: the sample of each entry (k,), ascending.
        threshold: final bracket width, one number or one per entry (k,).
        norm: ``"l2"`` (blending) or ``"linf"`` (projection radius).

    Returns:
        ``(points, high)``: the adversarial end of each final bracket (a queried point, or ``xp``) and its
        bracket value (blending factor or radius).
    """
    k = rows.numel()
    view = (-1,) + (1,) * (x0.dim() - 1)
    if norm == "l2":
        high = x0.new_ones(k)
    else:
        threat = search.threat
        if not isinstance(threat, LpBall):
            raise InputError(f"the l∞ boundary search needs an LpBall threat, got {threat!r}")
        high = threat.distance(xp, x0)
    threshold = torch.as_tensor(threshold, dtype=high.dtype, device=high.device).expand(k)
    low = torch.zeros_like(high)
    out = xp.clone()
    while True:
        mid = (low + high) / 2
        # converged, or no float between the ends any more
        open_ = (high - low > threshold) & (mid > low) & (mid < high) & ~search.exhausted[rows]
        idx = open_.nonzero().squeeze(1)
        idx = idx[search.pay(rows[idx])]
        if idx.numel() == 0:
            break
        m = mid[idx]
        if norm == "l2":
            points = (1 - m.reshape(view)) * x0[idx] + m.reshape(view) * xp[idx]
        else:
            points = threat.project(xp[idx], x0[idx], eps=m)
        points = search.threat.clip(points)
        hit = search.adversarial(points, rows[idx])
        high[idx[hit]], low[idx[~hit]] = m[hit], m[~hit]
        out[idx[hit]] = points[hit]
    return out, high


def adversarial_start(
    search: LabelSearch,
    x: torch.Tensor,
    generator: torch.Generator | None,
    *,
    pool: torch.Tensor | None,
    attempts: int,
    tolerance: float | None = 1e-3,
) -> tuple[torch.Tensor, torch.Tensor]:
    """An adversarial starting point for each sample, blended towards ``x`` (the start of Boundary and HopSkipJump).

    Candidate inputs of ``pool`` are tried first, nearest to ``x`` (l2) first, then up to ``attempts`` uniform noise
    draws over the domain; each try is one query. The start found is blended towards ``x`` by a binary search on the
    blending factor ``a`` of ``(1 - a) x + a start``, down to ``tolerance`` (one query per halving; ``None``: no
    blending; :func:`boundary_bisect`), the initialisation of the HopSkipJump reference code.

    Args:
        search: the run's label queries.
        x: clean inputs (n, ...).
        generator: random numbers of the noise.
        pool: candidate starting inputs (M, ...) in the domain, or ``None``.
        attempts: most noise draws per sample.
        tolerance: final width of the blending factor's bracket, or ``None``.

    Returns:
        ``(start, found)``: the starting points (``x`` where none was found) and which samples have one; every
        start was queried and seen adversarial.
    """
    n = x.shape[0]
    start, found = x.clone(), torch.zeros(n, dtype=torch.bool, device=x.device)

    def open_rows() -> torch.Tensor:
        rows = (~found & ~search.exhausted).nonzero().squeeze(1)
        return rows[search.pay(rows)]

    if pool is not None and pool.shape[0]:
        order = torch.cdist(x.flatten(1), pool.flatten(1).to(x.dtype)).argsort(dim=1)  # no queries: nearest first
        for j in range(pool.shape[0]):
            rows = open_rows()
            if rows.numel() == 0:
                break
            cand = pool[order[rows, j]]
            hit = search.adversarial(cand, rows)
            start[rows[hit]] = search.threat.clip(cand[hit])
            found[rows[hit]] = True
    lo, hi = search.threat.domain
    for _ in range(attempts):
        rows = open_rows()
        if rows.numel() == 0:
            break
        noise = lo + (hi - lo) * torch.rand((rows.numel(), *x.shape[1:]), generator=generator, device=x.device)
        noise = noise.to(x.dtype)
        hit = search.adversarial(noise, rows)
        start[rows[hit]] = noise[hit]
        found[rows[hit]] = True
    if tolerance is None:
        return start, found
    best = start.clone()
    rows = (found & ~search.exhausted).nonzero().squeeze(1)
    if rows.numel():
        best[rows], _ = boundary_bisect(search, x[rows], start[rows], rows, tolerance)
    return best, found


def _describe(t: torch.Tensor) -> str:
    """A short, content-addressed name of a tensor option (for reprs and run keys)."""
    data = t.detach().cpu().contiguous()
    digest = hashlib.sha256(data.numpy().tobytes() + str(tuple(data.shape)).encode()).hexdigest()[:12]
    return f"<{data.shape[0]} inputs of shape {tuple(data.shape[1:])}, sha256 {digest}>"


def check_starts(starts: object) -> torch.Tensor | None:
    """``starts`` as a detached floating tensor (M, ...) with M >= 1, all finite, or an InputError saying why not."""
    if starts is None:
        return None
    if isinstance(starts, np.ndarray):
        starts = torch.from_numpy(starts)
    if not torch.is_tensor(starts) or not starts.is_floating_point() or starts.dim() < 2 or starts.shape[0] < 1:
        what = f"{starts.dtype} tensor of shape {tuple(starts.shape)}" if torch.is_tensor(starts) else type(starts)
        raise InputError(
            f"starts must be a floating-point tensor (M, ...) of candidate starting inputs, got {what}; give e.g. "
            "a few training images, or None"
        )
    if not bool(torch.isfinite(starts).all()):
        raise InputError("starts contains NaN or Inf; give candidate starting inputs inside the input domain")
    return starts.detach()


class DecisionAttack(Attack):
    """Base of the decision-based attacks: label access, every query through the ledger, candidate starts.

    Subclasses set ``name``, ``norms`` and ``paper`` and implement ``run``. They are minimal-distortion attacks
    (``minimal = True``): they return the closest adversarial point they queried and take no radius (success at any
    radius is read from the distances), unless documented otherwise.
    """

    name = ""
    access = "label"
    budgeted = True
    minimal = True
    starts: torch.Tensor | None = None

    def __call__(
        self,
        model: nn.Module,
        x: torch.Tensor,
        y: torch.Tensor,
        *,
        threat: ThreatModel,
        targets: torch.Tensor | None = None,
        seed: int | None = 0,
    ) -> AttackResult:
        """Attack ``model`` (a torch model or a labels-only :class:`~bastion.models.oracle.BlackBox`); see
        :meth:`Attack.__call__`. Candidate starts that cannot be used are refused before any query."""
        if self.starts is not None and isinstance(threat, ThreatModel):
            shape = getattr(x, "shape", None)
            if shape is not None and tuple(self.starts.shape[1:]) != tuple(shape[1:]):
                raise InputError(
                    f"{type(self).__name__}: starts have the per-sample shape {tuple(self.starts.shape[1:])} but x "
                    f"has {tuple(shape[1:])}; give candidate starting inputs shaped like x"
                )
            lo, hi = threat.domain
            if bool((self.starts < lo).any()) or bool((self.starts > hi).any()):
                raise InputError(
                    f"{type(self).__name__}: starts lie outside the input domain [{lo}, {hi}] of {threat!r}"
                )
        return super().__call__(model, x, y, threat=threat, targets=targets, seed=seed)

    def _pool(self, x: torch.Tensor) -> torch.Tensor | None:
        return None if self.starts is None else self.starts.to(device=x.device, dtype=x.dtype)

    def _lp(self, threat: ThreatModel) -> LpBall:
        if not isinstance(threat, LpBall) or threat.norm not in self.norms:
            raise InputError(f"{type(self).__name__} needs an LpBall threat in {', '.join(self.norms)}, got {threat!r}")
        return threat

    def options(self) -> dict[str, Any]:
        opts = super().options()
        if torch.is_tensor(opts.get("starts")):
            opts["starts"] = _describe(opts["starts"])
        return opts
