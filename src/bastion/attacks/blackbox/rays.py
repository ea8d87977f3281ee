"""RayS: a decision-based l∞ attack by hierarchical search over ray directions (minimal l∞, or until a radius).

Chen & Gu, "RayS: A Ray Searching Method for Hard-label Adversarial Attack", KDD 2020.

RayS looks for the adversarial example along rays ``x + r s`` with sign directions ``s ∈ {-1, 1}^D`` (clipped to
the input domain): the l∞ distance to the boundary along ``s`` is the smallest adversarial ``r``. It starts from
``s = (1, ..., 1)`` and ``r* = ∞``, then flips blocks of ``s`` hierarchically: at level ``l`` the flattened input is
cut into ``2^l`` blocks of ``ceil(D / 2^l)`` coordinates, each flipped in turn (once every block of a level has been
tried, the next level halves them; at one coordinate per block the sweeps go on over single coordinates). A flipped
direction costs **one query** when it cannot improve: the point at the current best radius ``r*`` along it is
checked first, and only if it is adversarial does a **binary search** on ``[0, r*]`` find the new, smaller radius,
and the flip is kept. The first radius is searched from the far corner of the domain, ``r = hi - lo``.

Defaults are the reference code's: 10 000 queries per sample, binary searches to ``1e-3`` on the l2 length of the
ray, i.e. ``1e-3 (hi - lo) / √D`` in l∞ radius. **Two modes**: with a finite radius in the threat model (and
``stop_at_eps=True``, the default) a sample stops as soon as its adversarial example is within the radius (the
paper's robust-accuracy evaluation with early stopping); with ``LpBall("linf", math.inf)`` or ``stop_at_eps=False``
it spends its budget shrinking the radius (the paper's average decision boundary distance, ADBD). Either way the
attack is minimal-distortion in the sense of the base class: it reports the distance of the closest adversarial
example it queried, and success is re-verified on it. Targeted mode replaces "misclassified" by "of the target
class" (the reference supports it; the paper evaluates untargeted attacks only).

Deviations: the reference's batched version keeps querying samples that already met the radius (it reports the
queries at the time they did); here they stop. The binary search's adversarial end is always a queried point.

Query accounting (exact, per sample): one query per direction tried, one per binary-search step, and one for the final
push off the boundary of :meth:`~bastion.attacks.blackbox._decision.LabelSearch.finish`. A sample that cannot pay for a
query stops; the closest adversarial point it queried is returned.
"""

from __future__ import annotations

import math

import torch

from bastion.attacks.base import CountingModel, positive_float, positive_int
from bastion.attacks.blackbox._decision import DecisionAttack, LabelSearch
from bastion.errors import InputError
from bastion.results import Criterion
from bastion.threat import ThreatModel


class RayS(DecisionAttack):
    """RayS (Chen & Gu, KDD 2020): hierarchical sign-flip search of the ray direction; decision-based, l∞.

    Args:
        queries: query budget per sample (10 000, the reference's).
        tolerance: the binary search stops when its bracket on the ray's l2 length (``r √D / (hi - lo)`` in units
            of the domain) is narrower than this (1e-3, the reference's).
        stop_at_eps: stop a sample once its adversarial example lies within the threat model's radius (when that
            is finite); ``False`` keeps shrinking the radius until the budget is spent.
    """

    name = "rays"
    norms = ("linf",)
    paper = "Chen & Gu, RayS: A Ray Searching Method for Hard-label Adversarial Attack, KDD 2020"

    def __init__(self, *, queries: int = 10_000, tolerance: float = 1e-3, stop_at_eps: bool = True) -> None:
        self.queries = positive_int("queries", queries)
        self.tolerance = positive_float("tolerance", tolerance)
        if not isinstance(stop_at_eps, bool):
            raise InputError(f"stop_at_eps must be True or False, got {stop_at_eps!r}")
        self.stop_at_eps = stop_at_eps

    def run(
        self,
        model: CountingModel,
        x: torch.Tensor,
        criterion: Criterion,
        threat: ThreatModel,
        generator: torch.Generator | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        ball = self._lp(threat)
        n, shape = x.shape[0], tuple(x.shape[1:])
        search = LabelSearch(model, self.queries, criterion, ball, n, x.device)
        origin = x.flatten(1)
        dim = origin.shape[1]
        lo, hi = ball.domain
        span = hi - lo
        tol = self.tolerance * span / math.sqrt(dim)
        target = ball.eps if self.stop_at_eps and math.isfinite(ball.eps) else None
        sign = torch.ones_like(origin)  # the best direction so far
        radius = origin.new_full((n,), math.inf)
        best = origin.clone()
        done = torch.zeros(n, dtype=torch.bool, device=x.device)
        # the flipped direction under test, its bracket [low, high] and the queried adversarial point at high
        trial, trial_pts = torch.ones_like(origin), origin.clone()
        low, high = torch.zeros_like(radius), torch.zeros_like(radius)
        searching = torch.zeros_like(done)
        # every sample walks the block schedule at its own pace (a check costs one query, a search several), so
        # each round asks one query of every sample
        level = torch.zeros(n, dtype=torch.long, device=x.device)
        block = torch.zeros_like(level)
        top = math.ceil(math.log2(dim)) if dim > 1 else 0  # from this level on, blocks are single coordinates
        coords = torch.arange(dim, device=x.device)
        view = (-1, 1)

        def accept(rows: torch.Tensor) -> None:
            better = high[rows] < radius[rows]
            r = rows[better]
            radius[r], best[r], sign[r] = high[r], trial_pts[r], trial[r]
            if target is not None and r.numel():
                done[r[ball.distance(best[r], origin[r]) <= target]] = True

        while True:
            rows = (~done & ~search.exhausted).nonzero().squeeze(1)
            rows = rows[search.pay(rows)]
            if rows.numel() == 0:
                break
            check = rows[~searching[rows]]
            if check.numel():
                # flip the next block of the best direction
                blocks = 2 ** level[check]
                size = (dim + blocks - 1) // blocks
                first = block[check] * size
                last = (first + size).clamp(max=dim)
                flip = (coords[None, :] >= first[:, None]) & (coords[None, :] < last[:, None])
                trial[check] = torch.where(flip, -sign[check], sign[check])
                wrap = (block[check] + 1 == blocks) | (last == dim)
                block[check] = torch.where(wrap, 0, block[check] + 1)
                level[check] = torch.where(wrap, (level[check] + 1).clamp(max=top), level[check])
                # first query of a trial: the best radius so far along the flipped ray (the far corner at first)
                high[check] = radius[check].clamp(max=span)
                low[check] = 0.0
            was = searching[rows]
            r = torch.where(was, (low[rows] + high[rows]) / 2, high[rows])
            pts = ball.clip(origin[rows] + r.reshape(view) * trial[rows])
            hit = search.adversarial(pts.reshape(-1, *shape), rows)
            high[rows[hit]], trial_pts[rows[hit]] = r[hit], pts[hit]
            low[rows[was & ~hit]] = r[was & ~hit]
            searching[rows[hit]] = True  # a failed check ends its trial: the flip cannot improve
            # converged searches (or brackets no float can split any more) end their trial
            s = rows[searching[rows]]
            mid = (low[s] + high[s]) / 2
            end = s[(high[s] - low[s] <= tol) | (mid <= low[s]) | (mid >= high[s])]
            accept(end)
            searching[end] = False
        accept(searching.nonzero().squeeze(1))  # out of budget mid-search: its adversarial end still counts
        best = best.reshape(x.shape)
        return search.finish(x, best, torch.isfinite(radius)), search.used
