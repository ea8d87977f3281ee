"""OPT and Sign-OPT: decision-based attacks that minimise the distance to the boundary along a direction (minimal l2).

* Cheng, Le, Chen, Yi, Zhang & Hsieh, "Query-Efficient Hard-label Black-box Attack: An Optimization-based
  Approach", ICLR 2019 (**OPT**).
* Cheng, Singh, Chen, Chen, Liu & Hsieh, "Sign-OPT: A Query-Efficient Hard-label Adversarial Attack", ICLR 2020
  (**Sign-OPT**).

Both reformulate the hard-label attack as the minimisation of a continuous function of a direction ``θ``::

    g(θ) = min { λ > 0 : x + λ θ / ||θ||  is adversarial }

(points clipped to the input domain, as in the reference code), the l2 distance to the boundary along ``θ``; the
adversarial example is ``x + g(θ*) θ*``. ``g`` is computed by the papers' **fine-grained search then binary
search**: from a guess ``λ₀`` (the current ``g``), steps of 1 % outwards (×1.01) until adversarial or inwards (×0.99)
while adversarial bracket the boundary, and a binary search narrows the bracket to ``β / 500``.

* **OPT** estimates ``∇g`` by random gradient-free differences: ``ĝ = 1/q Σ (g(θ + β u_i) - g(θ)) / β · u_i`` over
  ``q`` Gaussian directions ``u_i`` (each an exact ``g`` evaluation), then takes the best of a line search on
  ``θ - α ĝ`` and of the probed directions.
* **Sign-OPT** estimates only the sign of each directional derivative, with **one query each**: ``x + g(θ) θ'`` for
  ``θ' = (θ + β u) / ||θ + β u||`` is adversarial exactly when ``g(θ') <= g(θ)``, so
  ``ĝ = 1/K Σ sign(g(θ + β u_k) - g(θ)) u_k`` costs ``K`` queries (``K = 200``, the paper's default).

The step size ``α`` is found by the reference code's line search: doubling while ``g`` improves, else shrinking by
4 until it does (at most 15 tries each); when ``α`` falls below 1e-4 it is reset to 1 and ``β`` divided by 10, and a
sample ends once ``β < 1e-8``. Defaults are the reference code's: ``α = 0.2``, ``β = 0.001``, 100 random initial
directions (targeted, or whenever ``starts`` are given: the directions towards candidate inputs that meet the
criterion, e.g. training images of the target class, nearest first, as the reference's targeted attack), ``q = 10``
for OPT, ``K = 200`` for Sign-OPT, 1 500 (OPT) and 1 000 (Sign-OPT) iterations, and budgets of 80 000 and 20 000
queries (their ``query_limit`` defaults). The initial binary searches stop at ``1e-5`` (OPT) and ``1e-3`` (Sign-OPT),
as in each reference.

Deviations: the fine-grained search keeps the last adversarial point of the inwards steps as the bracket's
adversarial end (the reference keeps ``λ₀``, so its binary search starts from a wider bracket: same boundary, more
queries); a line-search candidate that is not adversarial at the current ``g`` is rejected after that one query (its
``g`` is larger, which is all the line search compares: the reference computes it exactly first); the outwards search
gives up at the diameter of the domain, ``(hi - lo) √D`` (the reference: at 20, for [0, 1] images); OPT averages its
difference quotients over the probes whose ``g`` is finite; Sign-OPT's estimate uses fewer than ``K`` directions when
a sample's budget cannot pay for ``K`` and a line-search step; the reference's momentum and SVM variants are not
included.

Query accounting (exact, per sample; the reference code misses the query of each search's last comparison), with one
query for the final push off the boundary of :meth:`~bastion.attacks.blackbox._decision.LabelSearch.finish`. A sample
that cannot pay for a round stops; the closest adversarial point it queried is returned.
"""

from __future__ import annotations

import math

import torch

from bastion.attacks.base import CountingModel, positive_float, positive_int
from bastion.attacks.blackbox._decision import QUERY_CHUNK, DecisionAttack, LabelSearch, check_starts
from bastion.results import Criterion
from bastion.threat import ThreatModel

# states of one search along a ray
_PROBE, _SHRINK, _GROW, _BISECT, _DONE = range(5)


def ray_search(
    search: LabelSearch,
    origin: torch.Tensor,
    rows: torch.Tensor,
    theta: torch.Tensor,
    shape: tuple[int, ...],
    *,
    hi: torch.Tensor,
    tol: torch.Tensor,
    cap: float,
    state: torch.Tensor | None = None,
    lo: torch.Tensor | None = None,
    hi_points: torch.Tensor | None = None,
    shrink: bool = True,
    exact: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``g`` along each direction: the fine-grained search then binary search of OPT, batched over entries.

    Each entry (a sample ``rows[i]`` and a unit direction ``theta[i]``) starts by probing ``hi[i]`` (state PROBE),
    or, with ``state`` given as BISECT, from a bracket ``[lo, hi]`` whose end ``hi`` is known adversarial (at
    ``hi_points``). A probe that is adversarial is followed by inward 1 % steps (``shrink``) or by a binary search
    from ``lo``; one that is not is followed by outward 1 % steps (``exact``) or ends (``g`` known to exceed the probe).

    Args:
        search: the run's label queries.
        origin: the clean input of each entry, flat (k, D).
        rows: the sample of each entry (k,).
        theta: unit directions (k, D).
        shape: the per-sample input shape (to query).
        hi: the probe radius, or the adversarial end of the bracket (k,).
        tol: final bracket width of each entry (k,).
        cap: outward steps give up beyond this radius.
        state: initial state per entry (default: all PROBE).
        lo: the bracket's other end (default: 0).
        hi_points: the adversarial points at ``hi`` for entries that start in BISECT.
        shrink: follow a successful probe by inward steps (else by a binary search from ``lo``).
        exact: follow a failed probe by outward steps (else the entry ends with ``g = inf``).

    Returns:
        ``(g, points)``: ``g`` per entry (``inf`` where no adversarial radius was found) and the queried adversarial
        point at it (flat; meaningless where ``g`` is ``inf``).
    """
    k = rows.numel()
    hi = hi.clone()
    lo = torch.zeros_like(hi) if lo is None else lo.clone()
    state = torch.full((k,), _PROBE, dtype=torch.long, device=rows.device) if state is None else state.clone()
    points = origin.clone() if hi_points is None else hi_points.clone()
    known = state == _BISECT  # entries whose hi is a queried adversarial radius
    view = (-1, 1)
    while True:
        mid = (lo + hi) / 2
        narrow = (hi - lo <= tol) | (mid <= lo) | (mid >= hi)
        state[(state == _BISECT) & narrow] = _DONE
        state[(state != _DONE) & search.exhausted[rows]] = _DONE  # out of budget: the entry ends where it is
        idx = (state != _DONE).nonzero().squeeze(1)
        if idx.numel() == 0:
            break
        idx = idx[search.pay(rows[idx])]
        if idx.numel() == 0:
            continue  # the samples that could not pay are exhausted now: their entries end on the next pass
        s = state[idx]
        lam = torch.where(s == _SHRINK, lo[idx], torch.where(s == _BISECT, mid[idx], hi[idx]))
        pts = search.threat.clip(origin[idx] + lam.reshape(view) * theta[idx])
        hit = search.adversarial(pts.reshape(-1, *shape), rows[idx])
        # every adversarial answer moves the bracket's adversarial end there
        won = idx[hit]
        hi[won], points[won], known[won] = lam[hit], pts[hit], True
        new = s.clone()
        lo_new, hi_new = lo[idx].clone(), hi[idx].clone()
        probe, inward, outward, bisect = s == _PROBE, s == _SHRINK, s == _GROW, s == _BISECT
        # PROBE: adversarial → inward steps (or a binary search from lo); not → outward steps (or the end)
        if shrink:
            new = torch.where(probe & hit, _SHRINK, new)
            lo_new = torch.where(probe & hit, 0.99 * lam, lo_new)
        else:
            new = torch.where(probe & hit, _BISECT, new)
        if exact:
            new = torch.where(probe & ~hit, _GROW, new)
            lo_new = torch.where(probe & ~hit, lam, lo_new)
            hi_new = torch.where(probe & ~hit, 1.01 * lam, hi_new)
        else:
            new = torch.where(probe & ~hit, _DONE, new)
        # SHRINK: still adversarial → one more inward step; not → the bracket is [lam, previous]
        lo_new = torch.where(inward & hit, 0.99 * lam, lo_new)
        new = torch.where(inward & ~hit, _BISECT, new)
        # GROW: adversarial → bisect [previous, lam]; not → one more outward step, up to the cap
        new = torch.where(outward & hit, _BISECT, new)
        grow = outward & ~hit
        lo_new = torch.where(grow, lam, lo_new)
        hi_new = torch.where(grow, 1.01 * lam, hi_new)
        new = torch.where(grow & (1.01 * lam > cap), _DONE, new)
        # BISECT: the half that holds the boundary
        lo_new = torch.where(bisect & ~hit, lam, lo_new)
        hi_new = torch.where(hit, lam, hi_new)
        lo[idx], hi[idx], state[idx] = lo_new, hi_new, new
    g = torch.where(known, hi, torch.full_like(hi, math.inf))
    return g, points


def _unit(v: torch.Tensor) -> torch.Tensor:
    return v / v.norm(dim=-1, keepdim=True).clamp_min(1e-30)


class _DirectionAttack(DecisionAttack):
    """The common part of OPT and Sign-OPT: the initial direction, the line search and the update loop."""

    name = ""
    norms = ("l2",)
    #: tolerance of the initial binary searches (each reference's)
    init_tolerance = 1e-3

    def __init__(
        self,
        *,
        queries: int,
        iterations: int,
        alpha: float,
        beta: float,
        init_directions: int,
        starts: torch.Tensor | None,
    ) -> None:
        self.queries = positive_int("queries", queries)
        self.iterations = positive_int("iterations", iterations)
        self.alpha = positive_float("alpha", alpha)
        self.beta = positive_float("beta", beta)
        self.init_directions = positive_int("init_directions", init_directions)
        self.starts = check_starts(starts)

    # ----------------------------------------------------------------------------------------------- start
    def _initial(
        self,
        search: LabelSearch,
        x: torch.Tensor,
        generator: torch.Generator | None,
        cap: float,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The best initial direction of each sample: (θ (n, D), g (n,), the adversarial point (n, D))."""
        n, shape = x.shape[0], tuple(x.shape[1:])
        origin = x.flatten(1)
        dim = origin.shape[1]
        theta, g, points = torch.zeros_like(origin), origin.new_full((n,), math.inf), origin.clone()
        hits = torch.zeros(n, dtype=torch.long, device=x.device)
        pool = self._pool(x)
        if pool is not None:
            flat_pool = pool.flatten(1)
            order = torch.cdist(origin, flat_pool).argsort(dim=1)  # nearest first, no queries
            columns = flat_pool.shape[0]
        else:
            columns = self.init_directions
        for j in range(columns):
            rows = ((hits < self.init_directions) & ~search.exhausted).nonzero().squeeze(1)
            rows = rows[search.pay(rows)]
            if rows.numel() == 0:
                break
            if pool is not None:
                raw = flat_pool[order[rows, j]] - origin[rows]
            else:
                raw = torch.randn((rows.numel(), dim), generator=generator, device=x.device, dtype=x.dtype)
            end = search.threat.clip(origin[rows] + raw)
            hit = search.adversarial(end.reshape(-1, *shape), rows)
            if pool is not None:
                hits[rows[hit]] += 1  # the reference's targeted start counts the candidates of the target class
            rows, raw, end = rows[hit], raw[hit], end[hit]
            if rows.numel() == 0:
                continue
            lam0 = raw.norm(dim=1)
            th = raw / lam0[:, None]
            best = g[rows]
            # beyond the best g so far, one query at that g tells whether this direction can beat it
            probe = lam0 > best
            state = torch.where(probe, _PROBE, _BISECT)
            new_g, new_pts = ray_search(
                search, origin[rows], rows, th, shape, hi=torch.where(probe, best, lam0),
                tol=torch.full_like(lam0, self.init_tolerance), cap=cap, state=state, hi_points=end, shrink=False,
                exact=False,
            )  # fmt: skip
            better = new_g < best
            r = rows[better]
            theta[r], g[r], points[r] = th[better], new_g[better], new_pts[better]
        return theta, g, points

    # ----------------------------------------------------------------------------------------------- line search
    def _line_search(
        self,
        search: LabelSearch,
        origin: torch.Tensor,
        rows: torch.Tensor,
        theta: torch.Tensor,
        g: torch.Tensor,
        grad: torch.Tensor,
        alpha: torch.Tensor,
        beta: torch.Tensor,
        shape: tuple[int, ...],
        cap: float,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The reference's step-size search on ``θ - α ĝ`` for each row; updates ``alpha`` in place.

        Returns the best direction, its ``g`` and its adversarial point (the current ones where nothing improved).
        """
        th, g0 = theta[rows], g[rows]
        o = origin[rows]
        best_th, best_g, best_pts = th.clone(), g0.clone(), o.clone()
        a = alpha[rows].clone()
        tol = beta[rows] / 500
        for phase in ("grow", "shrink"):
            active = torch.ones_like(g0, dtype=torch.bool) if phase == "grow" else best_g >= g0
            for _ in range(15):
                idx = (active & ~search.exhausted[rows]).nonzero().squeeze(1)
                if idx.numel() == 0:
                    break
                if phase == "shrink":
                    a[idx] *= 0.25
                cand = _unit(th[idx] - a[idx, None] * grad[idx])
                # the reference starts the search of g at the best value so far; not adversarial there: no better
                new_g, new_pts = ray_search(
                    search, o[idx], rows[idx], cand, shape, hi=best_g[idx], tol=tol[idx], cap=cap, exact=False
                )
                better = new_g < best_g[idx]
                won = idx[better]
                best_th[won], best_g[won], best_pts[won] = cand[better], new_g[better], new_pts[better]
                if phase == "grow":
                    a[idx] *= 2
                    active[idx[~better]] = False
                else:
                    active[won] = False
        alpha[rows] = a
        return best_th, best_g, best_pts

    def _estimate(
        self,
        search: LabelSearch,
        origin: torch.Tensor,
        rows: torch.Tensor,
        theta: torch.Tensor,
        g: torch.Tensor,
        beta: torch.Tensor,
        generator: torch.Generator | None,
        shape: tuple[int, ...],
        cap: float,
    ) -> tuple[torch.Tensor, torch.Tensor, tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None]:
        """The gradient estimate for ``rows``: (rows kept, ĝ, the best probed (θ, g, point) or None)."""
        raise NotImplementedError

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
        n, shape = x.shape[0], tuple(x.shape[1:])
        search = LabelSearch(model, self.queries, criterion, ball, n, x.device)
        origin = x.flatten(1)
        lo, hi = ball.domain
        cap = (hi - lo) * math.sqrt(origin.shape[1])
        theta, g, points = self._initial(search, x, generator, cap)
        best_g, best_pts = g.clone(), points.clone()
        alpha = torch.full_like(g, self.alpha)
        beta = torch.full_like(g, self.beta)
        over = ~torch.isfinite(g)
        for _ in range(self.iterations):
            rows = (~over & ~search.exhausted).nonzero().squeeze(1)
            if rows.numel() == 0:
                break
            rows, grad, probed = self._estimate(search, origin, rows, theta, g, beta, generator, shape, cap)
            rows_ok = ~search.exhausted[rows]
            rows, grad = rows[rows_ok], grad[rows_ok]
            if probed is not None:
                probed = (probed[0][rows_ok], probed[1][rows_ok], probed[2][rows_ok])
            if rows.numel() == 0:
                continue
            new_th, new_g, new_pts = self._line_search(search, origin, rows, theta, g, grad, alpha, beta, shape, cap)
            if probed is not None:
                # OPT moves to the best probed direction when it beats the line search
                use = probed[1] < new_g
                new_th = torch.where(use[:, None], probed[0], new_th)
                new_pts = torch.where(use[:, None], probed[2], new_pts)
                new_g = torch.where(use, probed[1], new_g)
            moved = torch.isfinite(new_g)
            r = rows[moved]
            theta[r], g[r] = new_th[moved], new_g[moved]
            better = new_g < best_g[rows]
            best_g[rows[better]], best_pts[rows[better]] = new_g[better], new_pts[better]
            # not moving: restart the step size and refine the finite differences
            small = alpha[rows] < 1e-4
            alpha[rows[small]] = 1.0
            beta[rows[small]] *= 0.1
            over[rows[beta[rows] < 1e-8]] = True
        found = torch.isfinite(best_g)
        out = torch.where(found[:, None], best_pts, origin).reshape(x.shape)
        return search.finish(x, out, found), search.used


class OPT(_DirectionAttack):
    """OPT attack (Cheng, Le, Chen, Yi, Zhang & Hsieh, ICLR 2019): decision-based, minimal l2.

    Minimises the distance to the boundary along a direction with random gradient-free estimates of its gradient
    (see the module docstring).

    Args:
        queries: query budget per sample (80 000, the reference's ``query_limit``).
        iterations: most iterations (1 500).
        directions: ``q``, random directions of each gradient estimate (10, the reference code's).
        alpha: initial step size ``α`` of the line search (0.2).
        beta: initial smoothing ``β`` of the finite differences (0.001).
        init_directions: random initial directions tried (100), or most candidate starts of the target class used.
        starts: candidate starting inputs (M, ...) shaped like ``x`` (e.g. training images), nearest first;
            needed for targeted attacks.
    """

    name = "opt"
    paper = (
        "Cheng, Le, Chen, Yi, Zhang & Hsieh, Query-Efficient Hard-label Black-box Attack: An Optimization-based "
        "Approach, ICLR 2019"
    )
    init_tolerance = 1e-5

    def __init__(
        self,
        *,
        queries: int = 80_000,
        iterations: int = 1500,
        directions: int = 10,
        alpha: float = 0.2,
        beta: float = 0.001,
        init_directions: int = 100,
        starts: torch.Tensor | None = None,
    ) -> None:
        super().__init__(
            queries=queries, iterations=iterations, alpha=alpha, beta=beta, init_directions=init_directions,
            starts=starts,
        )  # fmt: skip
        self.directions = positive_int("directions", directions)

    def _estimate(
        self,
        search: LabelSearch,
        origin: torch.Tensor,
        rows: torch.Tensor,
        theta: torch.Tensor,
        g: torch.Tensor,
        beta: torch.Tensor,
        generator: torch.Generator | None,
        shape: tuple[int, ...],
        cap: float,
    ) -> tuple[torch.Tensor, torch.Tensor, tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None]:
        k, q, dim = rows.numel(), self.directions, origin.shape[1]
        u = _unit(torch.randn((k, q, dim), generator=generator, device=origin.device, dtype=origin.dtype))
        b = beta[rows]
        probes = _unit(theta[rows, None] + b[:, None, None] * u)
        who = rows.repeat_interleave(q)
        g2 = g[rows]
        g1, pts = ray_search(
            search, origin[who], who, probes.reshape(k * q, dim), shape, hi=g2.repeat_interleave(q),
            tol=(b / 500).repeat_interleave(q), cap=cap,
        )  # fmt: skip
        g1, pts = g1.reshape(k, q), pts.reshape(k, q, dim)
        finite = torch.isfinite(g1)
        quotient = torch.where(finite, (g1 - g2[:, None]) / b[:, None], torch.zeros_like(g1))
        grad = (quotient[:, :, None] * u).sum(dim=1) / finite.sum(dim=1).clamp_min(1)[:, None].to(u.dtype)
        pick = g1.argmin(dim=1)
        ar = torch.arange(k, device=rows.device)
        return rows, grad, (probes[ar, pick], g1[ar, pick], pts[ar, pick])


class SignOPT(_DirectionAttack):
    """Sign-OPT attack (Cheng, Singh, Chen, Chen, Liu & Hsieh, ICLR 2020): decision-based, minimal l2.

    OPT with a sign-based gradient estimate of one query per direction (see the module docstring).

    Args:
        queries: query budget per sample (20 000, the reference's ``query_limit``).
        iterations: most iterations (1 000).
        k: ``K``, random directions of each sign estimate (200, the paper's default).
        alpha: initial step size ``α`` of the line search (0.2).
        beta: ``β``, the size of the probing step of the sign estimate (0.001).
        init_directions: random initial directions tried (100), or most candidate starts of the target class used.
        starts: candidate starting inputs (M, ...) shaped like ``x`` (e.g. training images), nearest first;
            needed for targeted attacks.
    """

    name = "sign-opt"
    paper = (
        "Cheng, Singh, Chen, Chen, Liu & Hsieh, Sign-OPT: A Query-Efficient Hard-label Adversarial Attack, ICLR 2020"
    )
    init_tolerance = 1e-3

    def __init__(
        self,
        *,
        queries: int = 20_000,
        iterations: int = 1000,
        k: int = 200,
        alpha: float = 0.2,
        beta: float = 0.001,
        init_directions: int = 100,
        starts: torch.Tensor | None = None,
    ) -> None:
        super().__init__(
            queries=queries, iterations=iterations, alpha=alpha, beta=beta, init_directions=init_directions,
            starts=starts,
        )  # fmt: skip
        self.k = positive_int("k", k)

    def _estimate(
        self,
        search: LabelSearch,
        origin: torch.Tensor,
        rows: torch.Tensor,
        theta: torch.Tensor,
        g: torch.Tensor,
        beta: torch.Tensor,
        generator: torch.Generator | None,
        shape: tuple[int, ...],
        cap: float,
    ) -> tuple[torch.Tensor, torch.Tensor, tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None]:
        dim = origin.shape[1]
        g2 = g[rows]
        # keep what one line-search try needs: a probe and a binary search over 1 % of g
        tol = beta[rows] / 500
        reserve = 2 + torch.log2((0.01 * g2 / tol).clamp_min(1)).ceil().long()
        count = (search.ledger.left()[rows] - reserve).clamp(max=self.k)
        search.exhausted[rows[count < 1]] = True
        keep = (count >= 1).nonzero().squeeze(1)
        rows, count, g2 = rows[keep], count[keep], g2[keep]
        paid = search.pay(rows, count)
        rows, count, g2 = rows[paid], count[paid], g2[paid]
        k = rows.numel()
        grad = origin.new_zeros((k, dim))
        group = max(1, QUERY_CHUNK // (self.k * dim))
        arange = torch.arange(self.k, device=rows.device)
        for s in range(0, k, group):
            e = min(s + group, k)
            r = rows[s:e]
            u = _unit(torch.randn((e - s, self.k, dim), generator=generator, device=origin.device, dtype=origin.dtype))
            probes = _unit(theta[r, None] + beta[r, None, None] * u)
            pts = search.threat.clip(origin[r, None] + g2[s:e, None, None] * probes)
            valid = arange[None, :] < count[s:e, None]
            adv = search.adversarial(pts[valid].reshape(-1, *shape), r[:, None].expand(-1, self.k)[valid])
            # adversarial at the current g: g(θ') <= g(θ), the directional derivative is negative
            sign = torch.zeros((e - s, self.k), dtype=origin.dtype, device=origin.device)
            sign[valid] = 1 - 2 * adv.to(origin.dtype)
            grad[s:e] = (sign[:, :, None] * u).sum(dim=1) / count[s:e, None].to(origin.dtype)
        return rows, grad, None
