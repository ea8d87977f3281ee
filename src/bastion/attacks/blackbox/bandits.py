"""Bandits-TD: gradient estimation with time and data priors (score-based).

Ilyas, Engstrom & Madry, "Prior Convictions: Black-Box Adversarial Attacks with Bandits and Priors", ICLR 2019.

The attack keeps a running estimate ``v`` of the loss gradient (the **time prior**: gradients at successive
iterates are correlated) and updates it as a bandit: two queries estimate the directional derivative of the loss
along a random exploration direction around ``v``, and ``v`` moves along that direction. ``v`` lives on a coarse grid
of tiles that is upsampled to the image (the **data prior**: gradients of images are spatially smooth), so the
bandit explores a space ``tile²`` times smaller. Per iteration, with ``u ~ N(0, I) / sqrt(d)`` (``d`` the prior's
size), exploration ``δ``, finite-difference step ``η`` and ``U`` the nearest-neighbour upsampling:

    q± = U(v ± δ u),   Δ = (L(x_t + η q+ / ||q+||) - L(x_t + η q- / ||q-||)) / (η δ),   ĝ = Δ u,

then ``v ← v + h ĝ`` (l2: gradient ascent on the prior) or the exponentiated-gradient step ``v ← tanh(atanh(v) +
h ĝ)`` that keeps ``v`` in ``[-1, 1]`` (l∞), and the image takes a projected step along the prior: ``x_{t+1} =
Π(x_t + lr · sign(U(v)))`` (l∞) or ``Π(x_t + lr · U(v) / ||U(v)||_2)`` (l2).

Defaults are the reference code's configurations (``src/configs/linf.json`` and ``l2.json``): l∞: exploration 1.0,
η = 0.1, online lr 100, image lr 0.01 at eps 0.05; l2: exploration 0.01, η = 0.01, online lr 0.1, image lr 0.5 at
eps 5. The image step is scaled with the radius (``0.2 · eps`` for l∞, ``0.1 · eps`` for l2; the absolute values for
an unbounded radius). The data prior is a ``prior_size × prior_size`` grid per channel, 50 as in the reference code
(whose ``tile_size`` is this side: a 50 × 50 prior upsampled onto 299 × 299 Inception inputs, tiles of about 6
pixels); images no larger than the grid, and inputs that are not images, get no data prior (the prior has the
input's own shape). The exponentiated-gradient step is written as ``tanh(atanh(v) + h ĝ)``, which equals the reference's
``(p e^{hĝ}) / (p e^{hĝ} + (1 - p) e^{-hĝ})`` form on ``p = (v + 1) / 2`` but never overflows into NaN.

Query accounting (exact, per sample): three queries per iteration, the two finite-difference queries and the new
iterate, whose answer decides success. (The reference counts two per iteration and evaluates the iterate on top
without counting it.) Deviations: the finite-difference points are clipped to the input domain, so only valid inputs
are sent, and one of them that is adversarial and inside the threat set ends its sample's search.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F

from bastion.attacks.base import Attack, CountingModel, positive_float, positive_int
from bastion.errors import InputError
from bastion.results import Criterion
from bastion.threat import LpBall, ThreatModel

BanditsLoss = Literal["ce", "cw"]

#: The reference configurations, per norm: (exploration, fd_eta, online_lr, image lr per unit radius, image lr).
_DEFAULTS = {
    "linf": (1.0, 0.1, 100.0, 0.2, 0.01),
    "l2": (0.01, 0.01, 0.1, 0.1, 0.5),
}


class BanditsTD(Attack):
    """Bandits-TD (Ilyas, Engstrom & Madry, ICLR 2019): a bandit-updated gradient prior over time and tiles.

    Score-based, l∞ and l2, untargeted and targeted. Maximises the cross-entropy of the true class (untargeted) or
    minimises that of the target (targeted). Every iteration costs three queries; samples stop as soon as a queried
    point inside the threat set is adversarial, and the point of highest loss is kept for the others. Any input
    shape; the data prior applies to images (N, C, H, W) larger than ``prior_size``.

    Args:
        queries: query budget per sample (10 000 in the paper).
        prior_size: side of the data prior's grid (50, the reference's); ``None`` disables the data prior.
        exploration: ``δ``, the exploration scale around the prior; ``None`` for the paper's (l∞ 1.0, l2 0.01).
        fd_eta: ``η``, the finite-difference step; ``None`` for the paper's (l∞ 0.1, l2 0.01).
        online_lr: ``h``, the prior's learning rate; ``None`` for the paper's (l∞ 100, l2 0.1).
        image_lr: the image step; ``None`` for the paper's, scaled with the radius (module docstring).
        loss: ``"ce"`` (cross-entropy, the paper's) or ``"cw"`` (the C&W margin).
    """

    name = "bandits-td"
    norms = ("linf", "l2")
    access = "score"
    budgeted = True
    paper = (
        "Ilyas, Engstrom & Madry, Prior Convictions: Black-Box Adversarial Attacks with Bandits and Priors, ICLR 2019"
    )

    def __init__(
        self,
        *,
        queries: int = 10000,
        prior_size: int | None = 50,
        exploration: float | None = None,
        fd_eta: float | None = None,
        online_lr: float | None = None,
        image_lr: float | None = None,
        loss: BanditsLoss = "ce",
    ) -> None:
        self.queries = positive_int("queries", queries)
        self.prior_size = None if prior_size is None else positive_int("prior_size", prior_size)
        self.exploration = None if exploration is None else positive_float("exploration", exploration)
        self.fd_eta = None if fd_eta is None else positive_float("fd_eta", fd_eta)
        self.online_lr = None if online_lr is None else positive_float("online_lr", online_lr)
        self.image_lr = None if image_lr is None else positive_float("image_lr", image_lr)
        if loss not in ("ce", "cw"):
            raise InputError(f"loss must be 'ce' or 'cw', got {loss!r}")
        self.loss: BanditsLoss = loss

    def settings(self, threat: LpBall) -> tuple[float, float, float, float]:
        """``(exploration, fd_eta, online_lr, image_lr)`` on ``threat``: the given values or the paper's."""
        exploration, fd_eta, online_lr, rel, absolute = _DEFAULTS[threat.norm]
        image_lr = absolute if math.isinf(threat.eps) else rel * threat.eps
        return (
            self.exploration if self.exploration is not None else exploration,
            self.fd_eta if self.fd_eta is not None else fd_eta,
            self.online_lr if self.online_lr is not None else online_lr,
            self.image_lr if self.image_lr is not None else image_lr,
        )

    def run(
        self,
        model: CountingModel,
        x: torch.Tensor,
        criterion: Criterion,
        threat: ThreatModel,
        generator: torch.Generator | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if not isinstance(threat, LpBall) or threat.norm not in self.norms:
            raise InputError(f"Bandits-TD needs an l∞ or l2 LpBall threat model, got {threat!r}")
        ledger = model.ledger(self.queries)
        n = x.shape[0]
        best = x.clone()
        if threat.eps == 0:
            return best, ledger.used
        exploration, fd_eta, online_lr, image_lr = self.settings(threat)
        lo, hi = threat.domain
        prior_shape: tuple[int, ...] = tuple(x.shape[1:])
        size = self.prior_size
        tiled = size is not None and x.dim() == 4 and max(x.shape[2:]) > size
        if tiled and size is not None:
            prior_shape = (x.shape[1], min(x.shape[2], size), min(x.shape[3], size))
        dim = math.prod(prior_shape)
        # l∞ keeps the prior in atanh space, so that the exponentiated-gradient step is a plain addition
        prior = torch.zeros((n, *prior_shape), device=x.device, dtype=x.dtype)
        best_loss = torch.full((n,), -math.inf, device=x.device, dtype=x.dtype)
        if model.clean_scores is not None:
            best_loss = criterion.loss(model.clean_scores.to(x.dtype), self.loss)
        x_cur = x.clone()
        done = torch.zeros(n, dtype=torch.bool, device=x.device)

        def upsample(v: torch.Tensor) -> torch.Tensor:
            if not tiled:
                return v
            return F.interpolate(v, size=x.shape[2:], mode="nearest")

        def unit(v: torch.Tensor) -> torch.Tensor:
            return v / v.flatten(1).norm(dim=1).clamp_min(1e-12).reshape((-1,) + (1,) * (v.dim() - 1))

        while True:
            act = ledger.afford((~done).nonzero().squeeze(1), 3)
            if act.numel() == 0:
                break
            a = act.numel()
            x_a, x0 = x_cur[act], x[act]
            v = prior[act].tanh() if threat.norm == "linf" else prior[act]
            u = torch.randn((a, *prior_shape), generator=generator, device=x.device, dtype=x.dtype) / math.sqrt(dim)
            explore = exploration * u
            q_plus, q_minus = upsample(v + explore), upsample(v - explore)
            points = torch.cat([x_a + fd_eta * unit(q_plus), x_a + fd_eta * unit(q_minus)]).clamp(lo, hi)
            rows = torch.cat([act, act])
            crit_rows = criterion.subset(rows)
            scores = ledger.scores(points, rows)
            losses = crit_rows.loss(scores, self.loss)
            inside = crit_rows.is_adversarial(scores) & threat.contains(points, x[rows])
            deriv = (losses[:a] - losses[a:]) / (fd_eta * exploration)
            estimate = deriv.reshape((-1,) + (1,) * len(prior_shape)) * explore
            prior[act] = prior[act] + online_lr * estimate
            v = prior[act].tanh() if threat.norm == "linf" else prior[act]
            x_new = threat.project(threat.step(x_a, upsample(v), image_lr), x0)
            crit = criterion.subset(act)
            out = ledger.scores(x_new, act)
            loss_new, hit = crit.loss(out, self.loss), crit.is_adversarial(out)
            x_cur[act] = x_new
            better = hit | (loss_new > best_loss[act])
            best[act[better]] = x_new[better]
            best_loss[act[better]] = loss_new[better]
            done[act[hit]] = True
            # a finite-difference point already inside the threat set and adversarial is as good as any
            for part in (slice(0, a), slice(a, 2 * a)):
                extra = inside[part] & ~done[act]
                if bool(extra.any()):
                    best[act[extra]] = points[part][extra]
                    done[act[extra]] = True
        return best, ledger.used
