"""The Boundary attack (decision-based, minimal l2) and the machinery every decision-based attack shares.

Brendel, Rauber & Bethge, "Decision-Based Adversarial Attacks: Reliable Attacks Against Black-Box Machine Learning
Models", ICLR 2018.

A decision-based attack sees the model's top-1 label only. The Boundary attack starts from a point that is already
adversarial and walks along the decision boundary towards the clean input ``x``, by rejection sampling. Each step draws
a random **orthogonal (spherical) step** on the sphere around ``x`` through the current point, of relative size ``δ``
(``spherical_step``), and queries it; only if it is still adversarial does it add a **step towards the original** of
relative size ``ε`` (``source_step``) and query the candidate, which replaces the current point when adversarial and
closer to ``x`` (the paper's section 3.3: "First, we check whether the orthogonal perturbation is still adversarial. If
this is true, we then make a small movement towards the target and check again"). Both sizes adapt to the local
geometry of the boundary from these answers, with the windows and thresholds of the authors' original implementation
(Foolbox 1; the class attributes ``windows`` and ``thresholds``): over the last 100 orthogonal steps the success rate
is kept near 50 % (above 0.5: ``δ`` and ``ε`` grow by ``step_adaptation``; below 0.2: both shrink), and over the last
30 steps towards the original (counted when the orthogonal step succeeded) ``ε`` alone grows above 0.5 and shrinks
below 0.2; a window is emptied when it changes a step size. A sample has converged when ``ε`` falls below
``convergence``. Defaults are the authors': ``δ = ε = 0.01``, ``step_adaptation = 1.5``, ``convergence = 1e-7``;
25 000 queries per sample (Foolbox's 25 000 steps).

**Start.** Untargeted: uniform noise over the input domain, drawn until adversarial (at most ``init_attempts``
draws), as in the paper; targeted (or whenever ``starts`` are given): candidate starting inputs, e.g. a few training
images, are tried nearest first until one meets the criterion (of the target class, for a targeted attack: the
paper starts from an image of the target class). The start is then blended towards ``x`` by a binary search on the
blending factor (to ``1e-3``), as Foolbox's ``LinearSearchBlendedUniformNoiseAttack`` initialisation does (with a
linear search there): the paper's pure noise start wastes thousands of steps walking in from the far side of the
domain. A sample for which no start is found within its budget is reported as a failure.

Deviations from the authors' implementations: the orthogonal step is checked at every step, as the paper describes
(Foolbox 1 checks it every 10th step only, trying up to 25 candidates per step in between; Foolbox 3 also checks it
every 10th step and adapts ``ε`` on the unconditional success rate of the candidates, with thresholds 0.25 and 0.1): at
small budgets the step sizes then adapt several times faster, for one query per failed orthogonal step. Every sample
draws its own orthogonal direction (Foolbox 3 shares one across the batch); a converged or out-of-budget sample stops
querying.

Query accounting (exact, per sample): one query per orthogonal step, one more for its candidate when the orthogonal
step stays adversarial; the start costs one query per draw and one per blending step. A sample that cannot pay for a
query stops; the best adversarial point found so far is returned (every returned point was queried and seen
adversarial), after the final push of :meth:`LabelSearch.finish` (one query).

Shared machinery of the decision-based attacks (HopSkipJump, OPT, Sign-OPT, RayS use it too):
:class:`DecisionAttack` (label access, the per-sample ledger, candidate starting inputs), :class:`LabelSearch`
(batched label queries charged to their samples, budget rounds) and :func:`adversarial_start`.
"""

from __future__ import annotations

import hashlib
import math
from typing import Any

import numpy as np
import torch
from torch import nn

from bastion.attacks.base import Attack, CountingModel, adversarial_labels, positive_float, positive_int
from bastion.errors import InputError
from bastion.results import AttackResult, Criterion
from bastion.threat import LpBall, ThreatModel

#: Most input elements sent to the model in one labels call (larger query batches are split).
QUERY_CHUNK = 1 << 22
#: Relative push of the final point away from ``x`` (see :meth:`LabelSearch.finish`).
FINAL_PUSH = 1e-4


# --------------------------------------------------------------------------------------------------- shared
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
    blending), the initialisation of the HopSkipJump reference code.

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
    low, high = x.new_zeros(n), x.new_ones(n)
    best = start.clone()
    while True:
        rows = (found & ~search.exhausted & (high - low > tolerance)).nonzero().squeeze(1)
        rows = rows[search.pay(rows)]
        if rows.numel() == 0:
            break
        mid = (low[rows] + high[rows]) / 2
        a = mid.reshape((-1,) + (1,) * (x.dim() - 1))
        points = search.threat.clip((1 - a) * x[rows] + a * start[rows])
        hit = search.adversarial(points, rows)
        high[rows[hit]], low[rows[~hit]] = mid[hit], mid[~hit]
        best[rows[hit]] = points[hit]
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


# --------------------------------------------------------------------------------------------------- the attack
class BoundaryAttack(DecisionAttack):
    """The Boundary attack (Brendel, Rauber & Bethge, ICLR 2018): decision-based, minimal l2.

    Rejection sampling along the decision boundary: orthogonal steps on the sphere around ``x``, each followed by a
    step towards ``x`` when it stays adversarial, with step sizes adapted to their success rates (see the module
    docstring). Works on any input shape.

    Args:
        queries: query budget per sample (Foolbox's default: 25 000 steps, about 27 500 queries).
        spherical_step: initial relative size ``δ`` of the orthogonal step (0.01).
        source_step: initial relative size ``ε`` of the step towards ``x`` (0.01).
        step_adaptation: factor by which the step sizes grow or shrink (1.5).
        convergence: a sample has converged once ``ε`` is below this (1e-7).
        init_attempts: most uniform-noise draws to find an adversarial start (after ``starts``).
        starts: candidate starting inputs (M, ...) shaped like ``x`` (e.g. training images), tried nearest first;
            needed for targeted attacks, where uniform noise rarely lands in the target class.
    """

    name = "boundary"
    norms = ("l2",)
    #: windows of the success rates (orthogonal steps, steps towards the original) and their thresholds (low, high)
    windows = (100, 30)
    thresholds = (0.2, 0.5)
    paper = (
        "Brendel, Rauber & Bethge, Decision-Based Adversarial Attacks: Reliable Attacks Against Black-Box Machine "
        "Learning Models, ICLR 2018"
    )

    def __init__(
        self,
        *,
        queries: int = 25_000,
        spherical_step: float = 1e-2,
        source_step: float = 1e-2,
        step_adaptation: float = 1.5,
        convergence: float = 1e-7,
        init_attempts: int = 100,
        starts: torch.Tensor | None = None,
    ) -> None:
        self.queries = positive_int("queries", queries)
        self.spherical_step = positive_float("spherical_step", spherical_step)
        self.source_step = positive_float("source_step", source_step)
        self.step_adaptation = positive_float("step_adaptation", step_adaptation)
        if self.step_adaptation <= 1:
            raise InputError(f"step_adaptation must be > 1, got {step_adaptation!r}")
        self.convergence = positive_float("convergence", convergence)
        self.init_attempts = positive_int("init_attempts", init_attempts)
        self.starts = check_starts(starts)

    def run(
        self,
        model: CountingModel,
        x: torch.Tensor,
        criterion: Criterion,
        threat: ThreatModel,
        generator: torch.Generator | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        threat = self._lp(threat)
        n = x.shape[0]
        search = LabelSearch(model, self.queries, criterion, threat, n, x.device)
        start, found = adversarial_start(search, x, generator, pool=self._pool(x), attempts=self.init_attempts)
        shape = x.shape[1:]
        origin, cur = x.flatten(1), start.flatten(1).clone()
        dim = origin.shape[1]
        spherical = torch.full((n,), self.spherical_step, dtype=x.dtype, device=x.device)
        source = torch.full((n,), self.source_step, dtype=x.dtype, device=x.device)
        # success histories (NaN: no record yet) and where each sample writes its next record
        hist_sph = torch.full((n, self.windows[0]), math.nan, device=x.device)
        hist_step = torch.full((n, self.windows[1]), math.nan, device=x.device)
        at_sph = torch.zeros(n, dtype=torch.long, device=x.device)
        at_step = torch.zeros_like(at_sph)
        # a sample whose orthogonal step stayed adversarial queries its candidate in the next round
        pending = torch.zeros(n, dtype=torch.bool, device=x.device)
        cand = origin.clone()
        cur_d, cand_d = (origin - cur).norm(dim=1), torch.zeros(n, dtype=x.dtype, device=x.device)
        tiny = torch.finfo(x.dtype).tiny
        a, (low, high) = self.step_adaptation, self.thresholds
        while True:
            rows = (found & ~search.exhausted & (source >= self.convergence)).nonzero().squeeze(1)
            rows = rows[search.pay(rows)]
            if rows.numel() == 0:
                break
            new, old = rows[~pending[rows]], rows[pending[rows]]
            o = origin[new]
            to_source = o - cur[new]
            norms = cur_d[new]
            unit = to_source / norms.clamp_min(tiny)[:, None]
            # a Gaussian direction orthogonal to the source direction, scaled to δ · ||x - x_adv||
            eta = torch.randn((new.numel(), dim), generator=generator, device=x.device, dtype=x.dtype)
            eta -= (eta * unit).sum(dim=1, keepdim=True) * unit
            eta *= (spherical[new] * norms / eta.norm(dim=1).clamp_min(tiny))[:, None]
            # back onto the sphere of radius ||x - x_adv|| around x (Pythagoras), then into the domain
            sphere = threat.clip(o + (eta - to_source) / (spherical[new] ** 2 + 1).sqrt()[:, None])
            back = o - sphere
            back_norm = back.norm(dim=1)
            # the step towards x, corrected for the part of the sphere the clipping cut off
            length = (source[new] * norms + back_norm - norms).clamp_min(0) / back_norm.clamp_min(tiny)
            step = threat.clip(sphere + length[:, None] * back)
            cand[new], cand_d[new] = step, (o - step).norm(dim=1)
            adv = search.adversarial(torch.cat([sphere, cand[old]]).reshape(-1, *shape), torch.cat([new, old]))
            sph_ok, step_ok = adv[: new.numel()], adv[new.numel() :]
            hist_sph[new, at_sph[new]] = sph_ok.to(hist_sph.dtype)
            at_sph[new] = (at_sph[new] + 1) % self.windows[0]
            hist_step[old, at_step[old]] = step_ok.to(hist_step.dtype)
            at_step[old] = (at_step[old] + 1) % self.windows[1]
            pending[new[sph_ok]] = True
            pending[old] = False
            take = old[step_ok & (cand_d[old] < cur_d[old])]
            cur[take], cur_d[take] = cand[take], cand_d[take]
            # step sizes from full windows; a window that changed a size starts again
            full = ~torch.isnan(hist_sph[rows]).any(dim=1)
            rate = hist_sph[rows].mean(dim=1)
            up, down = full & (rate > high), full & (rate < low)
            factor = torch.where(up, a, torch.where(down, 1 / a, 1.0)).to(x.dtype)
            spherical[rows] *= factor
            source[rows] *= factor
            hist_sph[rows[up | down]] = math.nan
            full = ~torch.isnan(hist_step[rows]).any(dim=1)
            rate = hist_step[rows].mean(dim=1)
            up, down = full & (rate > high), full & (rate < low)
            source[rows] *= torch.where(up, a, torch.where(down, 1 / a, 1.0)).to(x.dtype)
            hist_step[rows[up | down]] = math.nan
        out = torch.where(found[:, None], cur, origin).reshape(x.shape)
        return search.finish(x, out, found), search.used
