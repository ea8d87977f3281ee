"""The Boundary attack (decision-based, minimal l2).

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

**Early step-size decisions** (``significance``, default 0.05; ``None`` restores the reference's rule). The
reference changes a step size only once a window is full: 100 orthogonal steps, or 30 steps towards the original,
and a window starts again empty after every change, so one change costs 30–100 queries. That is a small part of the
25 000-step runs the windows were made for, but most of a budget of a few thousand queries, and it is where the
queries of short runs go: the blended start sits on the boundary to within the blending tolerance (``1e-3`` of the
blending factor), closer than a first step towards the original of 1 % of the distance, so nearly every such step
fails until ``ε`` has shrunk. On the benchmark's MNIST MLP at 900 queries, the median sample spent its first ~250
queries without one accepted step (orthogonal steps succeeding 70–85 %, steps towards the original 0–3 %, while the
windows filled) and ended at 0.68× its starting distance. Here a window also decides as soon as its records make the
success rate significantly above the high threshold or below the low one (one-sided binomial test at
``significance``, :func:`binomial_thresholds`; e.g. 14 failures in a row shrink ``ε``, 12 successes of 15 grow
``δ``), and still by the reference's rule when it is full. When the rate is inside the band the windows behave as
the reference's; when it is clearly outside, the step sizes follow within 5–20 queries instead of 30–100. On the same
MLP the success at l2 ≤ 2 went from 11 to 25 of 94 images at 900 queries and stayed at 29 of 49 at 4 500 (median
distance 1.73 → 1.68).

Query accounting (exact, per sample): one query per orthogonal step, one more for its candidate when the orthogonal
step stays adversarial; the start costs one query per draw and one per blending step. A sample that cannot pay for a
query stops; the best adversarial point found so far is returned (every returned point was queried and seen
adversarial), after the final push of :meth:`LabelSearch.finish` (one query).

The machinery shared with the other decision-based attacks (:class:`~bastion.attacks.blackbox._decision.DecisionAttack`,
:class:`~bastion.attacks.blackbox._decision.LabelSearch`, :func:`~bastion.attacks.blackbox._decision.adversarial_start`)
lives in :mod:`bastion.attacks.blackbox._decision`.
"""

from __future__ import annotations

import functools
import math

import torch

from bastion.attacks.base import CountingModel, positive_float, positive_int
from bastion.attacks.blackbox._decision import DecisionAttack, LabelSearch, adversarial_start, check_starts
from bastion.errors import InputError
from bastion.results import Criterion
from bastion.threat import ThreatModel


# --------------------------------------------------------------------------------------------------- the attack
@functools.lru_cache(maxsize=16)
def binomial_thresholds(window: int, low: float, high: float, level: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Early decisions of a success-rate window: for ``k = 0 .. window`` records, the fewest successes that make a
    rate above ``high`` significant at ``level`` (``P(S >= s | k, high) <= level``; ``window + 1``: none) and the
    most that make a rate below ``low`` significant (``P(S <= s | k, low) <= level``; ``-1``: none)."""
    most, least = [window + 1] * (window + 1), [-1] * (window + 1)
    for k in range(1, window + 1):
        upper = [math.comb(k, j) * high**j * (1 - high) ** (k - j) for j in range(k + 1)]
        lower = [math.comb(k, j) * low**j * (1 - low) ** (k - j) for j in range(k + 1)]
        tail = 0.0
        for j in range(k, -1, -1):  # P(S >= j | high), growing as j falls
            tail += upper[j]
            if tail > level:
                break
            most[k] = j
        tail = 0.0
        for j in range(k + 1):  # P(S <= j | low), growing as j rises
            tail += lower[j]
            if tail > level:
                break
            least[k] = j
    return torch.tensor(most), torch.tensor(least)


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
        significance: a window changes the step sizes as soon as its records make a success rate outside the
            band ``thresholds`` significant at this level (one-sided binomial test; 0.05); ``None``: only full
            windows decide, the reference's rule (see the module docstring).
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
        significance: float | None = 0.05,
    ) -> None:
        self.queries = positive_int("queries", queries)
        if significance is not None and (
            isinstance(significance, bool) or not isinstance(significance, (int, float)) or not 0 < significance < 0.5
        ):
            raise InputError(f"significance must be in (0, 0.5) or None, got {significance!r}")
        self.significance = None if significance is None else float(significance)
        self.spherical_step = positive_float("spherical_step", spherical_step)
        self.source_step = positive_float("source_step", source_step)
        self.step_adaptation = positive_float("step_adaptation", step_adaptation)
        if self.step_adaptation <= 1:
            raise InputError(f"step_adaptation must be > 1, got {step_adaptation!r}")
        self.convergence = positive_float("convergence", convergence)
        self.init_attempts = positive_int("init_attempts", init_attempts)
        self.starts = check_starts(starts)

    def _decide(self, hist: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Which samples grow (``up``) or shrink (``down``) the step sizes of a window ``hist`` (k, w; NaN: empty).

        The reference's rule on a full window (its success rate above or below the thresholds), and, with
        ``significance``, as soon as the records so far make a rate above the high (below the low) threshold
        significant by a one-sided binomial test.
        """
        low, high = self.thresholds
        count = (~torch.isnan(hist)).sum(dim=1)
        hits = torch.nan_to_num(hist).sum(dim=1).round().long()
        full = count == hist.shape[1]
        rate = hits.to(hist.dtype) / count.clamp_min(1)
        up, down = full & (rate > high), full & (rate < low)
        if self.significance is not None:
            most, least = binomial_thresholds(hist.shape[1], low, high, self.significance)
            up |= hits >= most.to(hist.device)[count]
            down |= hits <= least.to(hist.device)[count]
        return up, down

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
        a = self.step_adaptation
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
            # step sizes from the windows' success rates; a window that changed a size starts again
            up, down = self._decide(hist_sph[rows])
            factor = torch.where(up, a, torch.where(down, 1 / a, 1.0)).to(x.dtype)
            spherical[rows] *= factor
            source[rows] *= factor
            hist_sph[rows[up | down]] = math.nan
            up, down = self._decide(hist_step[rows])
            source[rows] *= torch.where(up, a, torch.where(down, 1 / a, 1.0)).to(x.dtype)
            hist_step[rows[up | down]] = math.nan
        out = torch.where(found[:, None], cur, origin).reshape(x.shape)
        return search.finish(x, out, found), search.used
