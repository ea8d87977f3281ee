"""HopSkipJump: decision-based attack by gradient-direction estimates at the boundary (minimal l2 or l∞).

Chen, Jordan & Wainwright, "HopSkipJumpAttack: A Query-Efficient Decision-Based Attack", IEEE S&P 2020.

From an adversarial start (uniform noise or a candidate input: see
:func:`~bastion.attacks.blackbox._decision.adversarial_start`; blended towards ``x`` by the first binary search),
every iteration ``t``

1. **binary search** to the boundary between ``x`` and the current point. l2: on the blending factor ``a`` of
   ``(1 - a) x + a x_t``, down to ``θ = γ / d^{3/2}``; l∞: on the radius ``r`` of the l∞ projection
   ``clip(x_t, x - r, x + r)``, down to ``min(θ r₀, θ)`` with ``θ = γ / d²`` (``d`` the input dimension);
2. **gradient-direction estimate** at the boundary point from ``B_t = min(B₀ √t, B_max)`` label queries (the paper's
   schedule, ``B₀ = 100``, ``B_max = 10 000``) at ``x_t + δ_t u_b``, ``u_b`` uniform on the sphere (l2) or drawn
   uniformly from the cube and normalised (l∞), with the baseline (mean) of the ±1 decisions subtracted unless all
   agree; ``δ_t = √d θ d_{t-1}`` (l2) or ``d θ d_{t-1}`` (l∞), ``d_{t-1}`` the current distance, and
   ``δ_1 = 0.1 (hi - lo)``;
3. **geometric step-size search**: the step ``ξ = d_t / √t`` along the estimate (its sign for l∞) is halved until
   the new point is adversarial; then back to 1.

Defaults are the paper's and its reference code's: ``γ = 1``, ``B₀ = 100``, ``B_max = 10 000``, 40 iterations
(here also bounded by the per-sample query budget, 25 000 by default, the largest budget of the paper's figures).
Deviations: for l2 the initial blending search towards ``x`` and the first binary search, which run on the same line
(from ``x`` to the noise or candidate start), are one search, run to ``θ`` (the reference code blends to ``1e-3``,
then searches the blended point's line again from ``[0, 1]`` to ``θ``: about 10 queries per sample more for the same
boundary point); ``δ_t`` uses the distance of the current boundary point (the paper's ``d_{t-1}``; the reference code
passes the distance before the last binary search); when a sample's budget cannot pay for ``B_t`` estimation queries
and the following searches, the estimate uses what it can pay for; a step-size search that still fails after 30
halvings (the point sits on the boundary at float precision) ends that sample's search instead of looping.

Query accounting (exact, per sample): one query per binary-search step, per estimation direction and per step-size
try, and the final push off the boundary of :meth:`~bastion.attacks.blackbox._decision.LabelSearch.finish`. A sample
that cannot pay for a round stops; the closest adversarial point it queried is returned.
"""

from __future__ import annotations

import math

import torch

from bastion.attacks.base import CountingModel, positive_float, positive_int
from bastion.attacks.blackbox._decision import (
    QUERY_CHUNK,
    DecisionAttack,
    LabelSearch,
    adversarial_start,
    boundary_bisect,
    check_starts,
)
from bastion.results import Criterion
from bastion.threat import LpBall, ThreatModel

#: Halvings of the step size before a sample's geometric search gives up.
_MAX_HALVINGS = 30


class HopSkipJump(DecisionAttack):
    """HopSkipJumpAttack (Chen, Jordan & Wainwright, IEEE S&P 2020): decision-based, minimal l2 or l∞.

    The norm comes from the threat model (``LpBall("l2", ...)`` or ``LpBall("linf", ...)``; the radius is not
    used: success at any radius is read from the distances). See the module docstring for the algorithm.

    Args:
        queries: query budget per sample.
        iterations: most iterations (40, the reference code's).
        init_evals: ``B₀``, estimation queries of the first iteration (100).
        max_evals: ``B_max``, most estimation queries of one iteration (10 000).
        gamma: ``γ``, which sets the binary-search threshold ``θ`` (1.0).
        init_attempts: most uniform-noise draws to find an adversarial start (after ``starts``).
        starts: candidate starting inputs (M, ...) shaped like ``x`` (e.g. training images), tried nearest first;
            needed for targeted attacks (the paper starts them from an image of the target class).
    """

    name = "hopskipjump"
    norms = ("l2", "linf")
    paper = "Chen, Jordan & Wainwright, HopSkipJumpAttack: A Query-Efficient Decision-Based Attack, IEEE S&P 2020"

    def __init__(
        self,
        *,
        queries: int = 25_000,
        iterations: int = 40,
        init_evals: int = 100,
        max_evals: int = 10_000,
        gamma: float = 1.0,
        init_attempts: int = 100,
        starts: torch.Tensor | None = None,
    ) -> None:
        self.queries = positive_int("queries", queries)
        self.iterations = positive_int("iterations", iterations)
        self.init_evals = positive_int("init_evals", init_evals)
        self.max_evals = positive_int("max_evals", max_evals)
        self.gamma = positive_float("gamma", gamma)
        self.init_attempts = positive_int("init_attempts", init_attempts)
        self.starts = check_starts(starts)

    # ----------------------------------------------------------------------------------------------- steps
    def _theta(self, dim: int, norm: str) -> float:
        return self.gamma / (dim**1.5 if norm == "l2" else dim**2)

    def _bisect(
        self,
        search: LabelSearch,
        threat: LpBall,
        x0: torch.Tensor,
        xp: torch.Tensor,
        rows: torch.Tensor,
        theta: float,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Binary search between ``x0`` (not adversarial) and ``xp`` (adversarial) for each row; the paper's step 1.

        l2: on the blending factor, down to ``θ``; l∞: on the projection radius, down to ``min(θ r₀, θ)`` (``r₀``
        the starting distance), as the reference code. Returns the adversarial end of each final bracket (a queried
        point, or ``xp``) and its distance to ``x0``.
        """
        if threat.norm == "l2":
            threshold: float | torch.Tensor = theta
        else:
            threshold = (threat.distance(xp, x0) * theta).clamp(max=theta)
        out, _ = boundary_bisect(search, x0, xp, rows, threshold, norm=threat.norm)
        return out, threat.distance(out, x0)

    def _gradient(
        self,
        search: LabelSearch,
        threat: LpBall,
        at: torch.Tensor,
        rows: torch.Tensor,
        evals: torch.Tensor,
        delta: torch.Tensor,
        generator: torch.Generator | None,
    ) -> torch.Tensor:
        """Monte-Carlo estimate (k, D) of the gradient direction at the boundary points ``at``; the paper's step 2."""
        k, dim = at.shape[0], at[0].numel()
        flat = at.flatten(1)
        most = int(evals.max())
        grads = torch.empty_like(flat)
        group = max(1, QUERY_CHUNK // (most * dim))
        arange = torch.arange(most, device=at.device)
        for s in range(0, k, group):
            e = min(s + group, k)
            g, c, d = e - s, flat[s:e, None], delta[s:e, None, None]
            if threat.norm == "l2":
                rv = torch.randn((g, most, dim), generator=generator, device=at.device, dtype=at.dtype)
            else:
                rv = torch.rand((g, most, dim), generator=generator, device=at.device, dtype=at.dtype) * 2 - 1
            rv = rv / rv.norm(dim=2, keepdim=True).clamp_min(1e-12)
            probes = threat.clip(c + d * rv)
            rv = (probes - c) / d  # what the clipping left of each direction
            valid = arange[None, :] < evals[s:e, None]
            who = rows[s:e, None].expand(g, most)[valid]
            adv = search.adversarial(probes[valid].reshape(-1, *at.shape[1:]), who)
            f = torch.zeros((g, most), dtype=at.dtype, device=at.device)
            f[valid] = adv.to(at.dtype) * 2 - 1
            count = evals[s:e].to(at.dtype)
            mean = f.sum(dim=1) / count
            # baseline subtraction, except when every decision agrees (then the mean is the signal)
            vals = torch.where((mean.abs() == 1)[:, None], f, f - mean[:, None]) * valid
            grad = (vals[:, :, None] * rv).sum(dim=1) / count[:, None]
            grads[s:e] = grad / grad.norm(dim=1, keepdim=True).clamp_min(1e-12)
        return grads

    # ----------------------------------------------------------------------------------------------- run
    def run(
        self,
        model: CountingModel,
        x: torch.Tensor,
        criterion: Criterion,
        threat: ThreatModel,
        generator: torch.Generator | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        ball = self._lp(threat)
        n, dim = x.shape[0], x[0].numel()
        search = LabelSearch(model, self.queries, criterion, ball, n, x.device)
        # l2: the start's blending search is the first binary search itself, run once to θ (the reference blends
        # to 1e-3, then searches the same line again from [0, 1]); l∞: blended, then searched on the radius
        tolerance = None if ball.norm == "l2" else 1e-3
        start, found = adversarial_start(
            search, x, generator, pool=self._pool(x), attempts=self.init_attempts, tolerance=tolerance
        )
        theta = self._theta(dim, ball.norm)
        # the cost of one binary search from a full bracket (l∞: for distances up to 1 / θ times the threshold)
        search_cost = math.ceil(math.log2(1 / theta)) + 1
        rows = found.nonzero().squeeze(1)
        cur = start.clone()
        dist = torch.full((n,), math.inf, dtype=x.dtype, device=x.device)
        if rows.numel():
            cur[rows], dist[rows] = self._bisect(search, ball, x[rows], start[rows], rows, theta)
        best, best_d = cur.clone(), dist.clone()
        stuck = torch.zeros_like(found)
        lo, hi = ball.domain
        view = (-1,) + (1,) * (x.dim() - 1)
        for t in range(1, self.iterations + 1):
            rows = (found & ~stuck & ~search.exhausted).nonzero().squeeze(1)
            if rows.numel() == 0:
                break
            if t == 1:
                delta = torch.full((rows.numel(),), 0.1 * (hi - lo), dtype=x.dtype, device=x.device)
            else:
                delta = (math.sqrt(dim) if ball.norm == "l2" else dim) * theta * dist[rows]
            evals = int(min(self.init_evals * math.sqrt(t), self.max_evals))
            # estimate with what the budget leaves after a step-size try and a binary search
            left = search.ledger.left()[rows]
            count = (left - search_cost - 1).clamp(max=evals)
            search.exhausted[rows[count < 1]] = True
            keep = (count >= 1).nonzero().squeeze(1)
            rows, count, delta = rows[keep], count[keep], delta[keep]
            paid = search.pay(rows, count)
            rows, count, delta = rows[paid], count[paid], delta[paid]
            if rows.numel() == 0:
                break
            grad = self._gradient(search, ball, cur[rows], rows, count, delta, generator)
            update = (grad.sign() if ball.norm == "linf" else grad).reshape(-1, *x.shape[1:])
            # geometric step-size search from d_t / √t, halving until adversarial
            size = dist[rows] / math.sqrt(t)
            moved = cur[rows].clone()
            pending = torch.ones(rows.numel(), dtype=torch.bool, device=x.device)
            for _ in range(_MAX_HALVINGS):
                idx = (pending & ~search.exhausted[rows]).nonzero().squeeze(1)
                idx = idx[search.pay(rows[idx])]
                if idx.numel() == 0:
                    break
                points = ball.clip(cur[rows[idx]] + size[idx].reshape(view) * update[idx])
                hit = search.adversarial(points, rows[idx])
                moved[idx[hit]] = points[hit]
                pending[idx[hit]] = False
                size[idx[~hit]] /= 2
            stuck[rows[pending & ~search.exhausted[rows]]] = True
            go = (~pending).nonzero().squeeze(1)
            if go.numel() == 0:
                continue
            r = rows[go]
            cur[r], dist[r] = self._bisect(search, ball, x[r], moved[go], r, theta)
            better = dist[r] < best_d[r]
            best[r[better]], best_d[r[better]] = cur[r[better]], dist[r[better]]
        out = torch.where(found.reshape(view), best, x)
        return search.finish(x, out, found), search.used
