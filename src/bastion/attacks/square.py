"""Square Attack: query-efficient black-box random search over square-shaped updates.

Andriushchenko, Croce, Flammarion & Hein, "Square Attack: a query-efficient black-box adversarial attack via random
search", ECCV 2020.

A score-based attack: it only reads the model's logits (no gradients) and counts every forward evaluation of a
sample as one query. It maximises the margin loss ``max_{i != y} z_i - z_y`` (untargeted; ``z_t - max_{i != t} z_i``
when targeted), which is positive exactly when the sample is adversarial, by a random search whose proposals change
one square window of the image at a time:

* l∞: start from vertical stripes of ``±eps`` (one random sign per channel and column); each proposal draws a square
  of side ``h`` at a uniformly random position and one random sign per channel, and sets the square to the
  ``±eps`` corner of the ball in that channel (``x_best ± 2·eps`` projected onto the ball ∩ domain).
* l2: start from a grid of "mountains" (two opposite-sign centred bumps per tile, random signs per channel),
  scaled to norm ``eps``; each proposal draws two squares W1 and W2 of side ``h``, moves the perturbation mass of
  W2 into W1 (adding a fresh random-sign bump to the normalised old content of W1, per channel), and keeps the total
  l2 norm at ``eps``.

A proposal is accepted when it increases the loss. The side ``h`` follows the paper's piecewise-constant schedule of
``p`` (the fraction of the image a square covers): ``p`` halves after iterations 10, 50, 200, 500, 1000, 2000, 4000,
6000 and 8000 of a 10000-query run, rescaled to the query budget. Samples leave the search as soon as they are
adversarial, so broken samples cost fewer queries.
"""

from __future__ import annotations

import math
from typing import Literal

import torch

from bastion.attacks.base import Attack, CountingModel, positive_int
from bastion.errors import InputError
from bastion.models.oracle import QueryLedger
from bastion.results import Criterion
from bastion.threat import LpBall, ThreatModel

SquareLoss = Literal["margin", "ce"]
_LOSS_KIND: dict[str, Literal["cw", "ce"]] = {"margin": "cw", "ce": "ce"}

#: Iterations (of a 10000-query run) after which ``p`` halves (the reference schedule).
_HALVINGS = (10, 50, 200, 500, 1000, 2000, 4000, 6000, 8000)

#: l∞ proposals that would leave the image unchanged: this many sign draws are tried, then the signs that move.
_RESAMPLE_ROUNDS = 9


def p_schedule(p_init: float, i: int, queries: int) -> float:
    """Fraction of the image covered by the square at iteration ``i`` of a run with ``queries`` queries.

    The paper's schedule for 10000 queries (``p_init`` halved after iterations 10, 50, 200, ..., 8000), with ``i``
    rescaled by ``10000 / queries`` so that other budgets go through the same stages.
    """
    it = int(i / queries * 10000)
    return p_init / 2 ** sum(it > t for t in _HALVINGS)


def _rings(a: int, b: int, like: torch.Tensor) -> torch.Tensor:
    """An ``a × b`` "mountain": concentric rectangles around the centre, ring ``k`` weighted ``1/(k+1)²``, unit l2.

    The value at Chebyshev distance ``d`` from the centre ``(a // 2, b // 2)`` is ``Σ_{k=d}^{K-1} 1/(k+1)²``,
    ``K = max(a // 2, b // 2) + 1`` (the bump of eq. (4) of the paper).
    """
    if a == 0 or b == 0:
        return like.new_zeros((a, b))
    rows = (torch.arange(a, device=like.device) - a // 2).abs()
    cols = (torch.arange(b, device=like.device) - b // 2).abs()
    dist = torch.maximum(rows[:, None], cols[None, :])
    k = max(a // 2, b // 2) + 1
    weights = 1.0 / torch.arange(1, k + 1, device=like.device, dtype=like.dtype) ** 2
    tail = weights.flip(0).cumsum(0).flip(0)  # tail[d] = Σ_{k >= d} weights[k]
    bump = tail[dist]
    return bump / bump.norm()


def _eta(s: int, like: torch.Tensor) -> torch.Tensor:
    """The ``s × s`` l2 update shape: a positive bump on the top half, a negative one on the bottom half, unit l2."""
    top = _rings(s // 2, s, like)
    bottom = -_rings(s - s // 2, s, like)
    eta = torch.cat([top, bottom], dim=0)
    return eta / eta.norm()


def _signs(shape: tuple[int, ...], generator: torch.Generator | None, like: torch.Tensor) -> torch.Tensor:
    """Uniform random ``±1`` of the given shape, in the dtype and on the device of ``like``."""
    bits = torch.randint(0, 2, shape, generator=generator, device=like.device)
    return (2 * bits - 1).to(like.dtype)


class _Windows:
    """One square window of side ``s`` per sample, at a uniformly random position inside the image."""

    def __init__(self, n: int, h: int, w: int, s: int, generator: torch.Generator | None, device: torch.device):
        top = torch.randint(0, h - s + 1, (n,), generator=generator, device=device)
        left = torch.randint(0, w - s + 1, (n,), generator=generator, device=device)
        # offsets of every row / column relative to the window's corner: inside the window when in [0, s)
        self.rows = torch.arange(h, device=device)[None, :] - top[:, None]
        self.cols = torch.arange(w, device=device)[None, :] - left[:, None]
        self.s = s
        inside_r = (self.rows >= 0) & (self.rows < s)
        inside_c = (self.cols >= 0) & (self.cols < s)
        self.mask = (inside_r[:, :, None] & inside_c[:, None, :])[:, None]  # (n, 1, h, w)

    def place(self, patterns: torch.Tensor) -> torch.Tensor:
        """Per-sample ``s × s`` patterns (n, s, s) written into their windows of an otherwise zero (n, 1, h, w)."""
        n = patterns.shape[0]
        r = self.rows.clamp(0, self.s - 1)[:, :, None]
        c = self.cols.clamp(0, self.s - 1)[:, None, :]
        placed = patterns[torch.arange(n, device=patterns.device)[:, None, None], r, c]
        return placed[:, None] * self.mask


class Square(Attack):
    """Square Attack (Andriushchenko, Croce, Flammarion & Hein, ECCV 2020), score-based, for the l∞ and l2 balls.

    Random search on the margin loss (or cross-entropy) with square-shaped proposals, using logits only. Every
    forward evaluation of a sample counts one query; samples stop as soon as they are adversarial. ``run`` returns
    the queries spent per sample, including the one on the initial point; the result's ``queries`` adds the clean
    query, so a sample spends at most ``restarts · queries + 1``. Inputs must be images (N, C, H, W).

    Objective: maximise ``L(x') = max_{i != y} z_i(x') - z_y(x')`` (untargeted) or ``z_t(x') - max_{i != t} z_i(x')``
    (targeted) over the threat set; the sample is adversarial once ``L > 0``.

    Algorithm (per sample, batched over the samples still robust; one forward pass per iteration):

    1. l∞: ``x_best`` = ``x`` plus vertical stripes of ``±eps``; l2: ``x`` plus the tiled "mountains" of the paper,
       scaled to l2 norm ``eps``; both projected onto the ball ∩ domain. One query.
    2. For ``i = 0 .. queries - 2`` while not adversarial: ``p = p_schedule(p_init, i, queries)``, side
       ``h = round(sqrt(p · H · W))`` (l2: at least 3 and odd), then propose ``x_new`` as described in the module
       docstring, query it, and keep it if the loss increased.
    3. Restarts run the whole search again from a fresh initialisation on the samples not yet broken, keeping the
       point of highest loss, so more restarts never make the attack weaker.

    Args:
        queries: query budget per sample and restart, counting the query on the initial point (AutoAttack's
            standard version uses 5000).
        p_init: initial fraction of the image's pixels covered by a square (0.8 as in the paper).
        loss: ``"margin"`` (the paper's, the C&W margin above) or ``"ce"`` (cross-entropy, negated target
            cross-entropy when targeted).
        restarts: number of independent searches; each later one runs on the samples still unbroken.
    """

    name = "square"
    norms = ("linf", "l2")
    access = "score"
    budgeted = True
    paper = (
        "Andriushchenko, Croce, Flammarion & Hein, Square Attack: a query-efficient black-box adversarial attack "
        "via random search, ECCV 2020"
    )

    def __init__(
        self,
        *,
        queries: int = 5000,
        p_init: float = 0.8,
        loss: SquareLoss = "margin",
        restarts: int = 1,
    ) -> None:
        self.queries = positive_int("queries", queries)
        if isinstance(p_init, bool) or not isinstance(p_init, (int, float)) or not 0.0 < p_init <= 1.0:
            raise InputError(f"p_init must be a fraction in (0, 1], got {p_init!r}")
        self.p_init = float(p_init)
        if loss not in _LOSS_KIND:
            raise InputError(f"loss must be one of {', '.join(map(repr, _LOSS_KIND))}, got {loss!r}")
        self.loss: SquareLoss = loss
        self.restarts = positive_int("restarts", restarts)

    def check_inputs(self, x: torch.Tensor) -> None:
        shape = tuple(x.shape)
        if len(shape) != 4:
            raise InputError(
                f"Square needs image inputs of shape (N, C, H, W), got x of shape {shape}; reshape flat features "
                "to images or use another attack"
            )

    # ----------------------------------------------------------------------------------------------- search
    def run(
        self,
        model: CountingModel,
        x: torch.Tensor,
        criterion: Criterion,
        threat: ThreatModel,
        generator: torch.Generator | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if not isinstance(threat, LpBall) or threat.norm not in self.norms:
            raise InputError(f"Square needs an l∞ or l2 LpBall threat model, got {threat!r}")
        if x.dim() != 4:
            raise InputError(f"Square needs image inputs of shape (N, C, H, W), got x of shape {tuple(x.shape)}")
        if threat.norm == "l2" and math.isinf(threat.eps):
            raise InputError("the l2 Square Attack needs a finite eps (it keeps the perturbation on the eps-sphere)")
        n = x.shape[0]
        # every query goes through the ledger, so the per-sample and an oracle's total budgets hold
        ledger = model.ledger(self.restarts * self.queries)
        best = x.clone()
        if threat.eps == 0:
            return best, ledger.used  # nothing to search
        best_loss = torch.full((n,), -math.inf, device=x.device, dtype=x.dtype)
        found = torch.zeros(n, dtype=torch.bool, device=x.device)
        # without an oracle budget below the attack's own, every running sample can always pay its next query (a
        # restart spends at most `queries`): the per-iteration affordability check is then skipped
        unbounded = ledger.total_left() is None and (
            ledger.limit is None or ledger.limit >= self.restarts * self.queries
        )
        for _ in range(self.restarts):
            idx = ledger.afford((~found).nonzero().squeeze(1), 1)
            if idx.numel() == 0:
                break
            x_r, loss_r, hit_r = self._search(
                ledger, idx, x[idx], criterion.subset(idx), threat, generator, check_budget=not unbounded
            )
            better = hit_r | (loss_r > best_loss[idx])
            best[idx[better]] = x_r[better]
            best_loss[idx[better]] = loss_r[better]
            found[idx[hit_r]] = True
        return best, ledger.used

    def _search(
        self,
        ledger: QueryLedger,
        rows: torch.Tensor,
        x: torch.Tensor,
        criterion: Criterion,
        threat: LpBall,
        generator: torch.Generator | None,
        check_budget: bool = True,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One random search from a fresh start (``rows``: the samples' rows in the ledger, each able to pay its
        first query): best points, their losses and the success mask.

        The running samples' state is kept compacted (points, best points, losses, criterion and, for l∞, the two
        corners of the ball ∩ domain) and is only re-gathered when samples leave, not gathered and scattered back
        on every iteration: on a 2-conv MNIST net with 40 samples that halved the time spent outside the model.
        """
        kind = _LOSS_KIND[self.loss]
        linf = threat.norm == "linf"
        x_best = self._init_linf(x, threat, generator) if linf else self._init_l2(x, threat, generator)
        logits = ledger.scores(x_best, rows)
        best_loss = criterion.loss(logits, kind)
        done = criterion.is_adversarial(logits)
        act = (~done).nonzero().squeeze(1)
        # per running sample: the clean point, the best point so far and its loss, and (l∞) the ball ∩ domain's
        # upper and lower corners, which are exactly the values an l∞ proposal writes into its square
        xa, ba, la, crit = x[act], x_best[act], best_loss[act], criterion.subset(act)
        corners = (threat.project(xa + 2 * threat.eps, xa), threat.project(xa - 2 * threat.eps, xa)) if linf else None

        def keep(mask: torch.Tensor) -> None:
            """Write the leaving samples' state back and keep the others (``mask``: who stays)."""
            nonlocal act, xa, ba, la, crit, corners
            gone = ~mask
            x_best[act[gone]], best_loss[act[gone]] = ba[gone], la[gone]
            act, xa, ba, la = act[mask], xa[mask], ba[mask], la[mask]
            crit = crit.subset(mask.nonzero().squeeze(1))
            if corners is not None:
                corners = (corners[0][mask], corners[1][mask])

        for i in range(self.queries - 1):
            if act.numel() and check_budget:
                keep(torch.isin(rows[act], ledger.afford(rows[act], 1)))  # a spent budget ends the sample
            if act.numel() == 0:
                break
            p = p_schedule(self.p_init, i, self.queries)
            if corners is not None:
                x_new = self._step_linf(ba, corners, p, generator)
            else:
                x_new = self._step_l2(xa, ba, threat, p, generator)
            logits = ledger.scores(x_new, rows[act])
            loss = crit.loss(logits, kind)
            hit = crit.is_adversarial(logits)
            # an adversarial proposal is always kept (with the margin loss it is an improvement anyway)
            better = hit | (loss > la)
            ba = torch.where(better.view(-1, *([1] * (ba.dim() - 1))), x_new, ba)
            la = torch.where(better, loss, la)
            if bool(hit.any()):
                done[act[hit]] = True
                keep(~hit)
        keep(torch.zeros_like(act, dtype=torch.bool))
        return x_best, best_loss, done

    # ----------------------------------------------------------------------------------------------- l∞
    @staticmethod
    def _init_linf(x: torch.Tensor, threat: LpBall, generator: torch.Generator | None) -> torch.Tensor:
        n, c, _, w = x.shape
        stripes = _signs((n, c, 1, w), generator, x) * threat.eps  # vertical stripes: one sign per channel+column
        return threat.project(x + stripes, x)

    @staticmethod
    def _step_linf(
        x_best: torch.Tensor,
        corners: tuple[torch.Tensor, torch.Tensor],
        p: float,
        generator: torch.Generator | None,
    ) -> torch.Tensor:
        """A proposal: one random square set to the upper or lower corner of the ball ∩ domain, per channel.

        ``x_best ± 2 eps`` projected onto the ball ∩ domain (the paper's update) is exactly the corner ``up`` or
        ``down`` there, so the proposal is written from the corners directly. A proposal equal to ``x_best`` would
        waste a query: as in the reference, its signs are drawn again until it changes something. Whether a sign
        changes channel ``c`` of the square is known from two comparisons per channel, so the redraws run on the
        ``(n, C)`` signs only, never on images, all at once: the first of ``_RESAMPLE_ROUNDS`` draws that changes
        the square is taken, and where none does, the signs of the channels that can move (every proposal
        changes the square unless the ball ∩ domain is a single point there).
        """
        up, down = corners
        n, c, h, w = x_best.shape
        s = min(max(round(math.sqrt(p * h * w)), 1), h, w)
        mask = _Windows(n, h, w, s, generator, x_best.device).mask
        # per sample and channel: does writing the upper (lower) corner change the square?
        moves_up = ((x_best != up) & mask).flatten(2).any(dim=2)
        moves_down = ((x_best != down) & mask).flatten(2).any(dim=2)
        # the reference's redraw-until-it-changes, vectorised: the first of _RESAMPLE_ROUNDS iid draws that
        # changes the square (the same distribution as redrawing one at a time)
        draws = _signs((n, _RESAMPLE_ROUNDS, c), generator, x_best)
        valid = torch.where(draws > 0, moves_up[:, None], moves_down[:, None]).any(dim=2)  # (n, rounds)
        sign = draws[torch.arange(n, device=draws.device), valid.to(torch.int8).argmax(dim=1)]
        # no draw changed it (rare: each draw does with probability >= 1/2 when one can): the signs that move
        sign = torch.where(valid.any(dim=1)[:, None], sign, torch.where(moves_up, 1.0, -1.0).to(sign))
        corner = torch.where(sign[:, :, None, None] > 0, up, down)
        return torch.where(mask, corner, x_best)

    # ----------------------------------------------------------------------------------------------- l2
    @staticmethod
    def _init_l2(x: torch.Tensor, threat: LpBall, generator: torch.Generator | None) -> torch.Tensor:
        n, c, h, w = x.shape
        s = max(min(h, w) // 5, 1)
        eta = _eta(s, x)
        shapes = torch.stack([eta, eta.T])  # each tile's bump is rotated by 90° with probability 1/2
        delta = torch.zeros_like(x)
        # a 5 × 5 grid (more when the image allows) of s × s tiles, centred; the loop runs over tiles, not samples
        for top in range(max((h - 5 * s) // 2, 0), h, s)[: h // s]:
            for left in range(max((w - 5 * s) // 2, 0), w, s)[: w // s]:
                hh, ww = min(s, h - top), min(s, w - left)
                turn = torch.randint(0, 2, (n,), generator=generator, device=x.device)
                bump = shapes[turn][:, None, :hh, :ww]
                delta[:, :, top : top + hh, left : left + ww] += bump * _signs((n, c, 1, 1), generator, x)
        scale = threat.eps / delta.flatten(1).norm(dim=1).clamp_min(1e-12)
        return threat.project(x + delta * scale[:, None, None, None], x)

    def _step_l2(
        self, x: torch.Tensor, x_best: torch.Tensor, threat: LpBall, p: float, generator: torch.Generator | None
    ) -> torch.Tensor:
        n, c, h, w = x.shape
        eps = threat.eps
        s = max(round(math.sqrt(p * h * w)), 3)
        s = min(s + 1 if s % 2 == 0 else s, h, w)
        w1 = _Windows(n, h, w, s, generator, x.device)
        w2 = _Windows(n, h, w, s, generator, x.device)
        eta = _eta(s, x)
        turn = torch.randint(0, 2, (n,), generator=generator, device=x.device)
        bump = w1.place(torch.stack([eta, eta.T])[turn])  # (n, 1, h, w), unit l2, zero outside W1
        rho = _signs((n, c, 1, 1), generator, x)

        nu = x_best - x
        m1, both = w1.mask, w1.mask | w2.mask

        def channel_norm(t: torch.Tensor) -> torch.Tensor:
            return t.pow(2).sum(dim=(2, 3), keepdim=True).sqrt()

        unused2 = (eps**2 - nu.pow(2).sum(dim=(1, 2, 3), keepdim=True)).clamp_min(0.0)
        # per channel: the mass of W1 ∪ W2 plus an equal share of the unused budget goes into W1
        avail = (channel_norm(nu * both).pow(2) + unused2 / c).sqrt()
        old = nu * m1 / (channel_norm(nu * m1) + 1e-12)
        temp = rho * bump + old
        new_w1 = temp / channel_norm(temp).clamp_min(1e-12) * avail
        nu_new = torch.where(m1, new_w1, torch.where(w2.mask, torch.zeros_like(nu), nu))
        scale = eps / nu_new.flatten(1).norm(dim=1).clamp_min(1e-12)
        return threat.project(x + nu_new * scale[:, None, None, None], x)
