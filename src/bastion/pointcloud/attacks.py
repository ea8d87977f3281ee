"""Attacks on point-cloud classifiers: C&W-style perturbation and point adding (Xiang, Qi & Li, CVPR 2019), and
saliency-map point dropping (Zheng, Chen, Cai & Cai, ICCV 2019).

All three subclass bastion's :class:`~bastion.attacks.base.Attack`: the shared ``__call__`` validates the inputs,
skips already-misclassified samples, then projects every result onto the threat set of
:mod:`bastion.pointcloud.threat` and re-predicts, so a reported success is always a real one inside the budget.

* :class:`PointCW` — Xiang et al.'s perturbation attack: minimise ``D(x', x) + c · f(x')`` over the cloud ``x'`` with
  Adam, ``f`` Carlini & Wagner's margin loss and ``D`` the threat's metric (squared l2, Chamfer or Hausdorff), a
  binary search over ``c``; every iterate is projected onto the threat set (the budget ``eps`` and the coordinate
  domain), and the closest successful iterate is kept.
* :class:`PointAdd` — the same optimisation over ``k`` added independent points only (threat :class:`PointAdding`,
  distance from the added points to the clean cloud). Xiang et al.'s adversarial clusters and objects are not
  implemented.
* :class:`SaliencyDrop` — Zheng et al.'s iterative saliency-map dropping: the saliency of point ``i`` is
  ``s_i = -r_i^(1+α) ∂L/∂r_i``, the change of the loss when the point is shifted towards the cloud's spherical
  core (the coordinate-wise median), with ``r_i`` its distance from the core and ``∂L/∂r_i`` the radial component
  of the loss gradient; the ``per_step`` points of largest saliency are dropped, the saliency recomputed, until
  ``k`` points are dropped or the prediction changes.

Both optimisation attacks take a ``sor_penalty``: the adaptive attack against statistical outlier removal
(:class:`~bastion.pointcloud.defense.SOR`). Run on the SOR-wrapped model (whose forward pass replaces outliers by
inliers, so the gradient reaches the points SOR keeps), it adds ``sor_penalty · Σ_i max(0, d_i - T)`` to the
objective, ``d_i`` the mean distance of free point ``i`` to its ``sor_k`` nearest neighbours and ``T`` SOR's
threshold ``μ + α·σ`` on the current cloud: the points the attack moves are kept in the inlier range, so SOR does
not remove them.

The attacks are not entered in bastion's attack registry (``bastion.attacks.ATTACKS``, ``make_attack``): that registry
lists the attacks on images that ``bastion evaluate`` runs by name; these are built from their classes (or by
``bastion pointcloud attack``), and results name them by their class (``pointcw``, ``pointadd``, ``saliencydrop``).
"""

from __future__ import annotations

import math
from typing import Any

import torch

from bastion.attacks.base import Attack, CountingModel, positive_float, positive_int
from bastion.errors import InputError
from bastion.pointcloud.threat import (
    PointAdding,
    PointDropping,
    PointPerturbation,
    PointThreat,
    check_points,
    drop,
    drop_sources,
    pairwise,
)
from bastion.results import Criterion
from bastion.threat import ThreatModel

__all__ = ["PointAdd", "PointCW", "SaliencyDrop", "knn_mean_distance"]


def knn_mean_distance(x: torch.Tensor, k: int = 2) -> torch.Tensor:
    """Mean Euclidean distance (N, P) of every point of ``x`` (N, P, 3) to its ``k`` nearest other points."""
    d = pairwise(x, x)
    eye = torch.eye(x.shape[1], dtype=torch.bool, device=x.device)
    d = d.masked_fill(eye, math.inf)
    return d.topk(k, dim=2, largest=False).values.mean(dim=2)


class _PointAttack(Attack):
    """Shared checks: point-cloud inputs (N, P, 3) and a threat of the right kind."""

    norms = ()
    threats: tuple[type[PointThreat], ...] = ()

    def check_inputs(self, x: torch.Tensor) -> None:
        check_points(x)

    def _check_threat(self, threat: ThreatModel) -> None:
        if not isinstance(threat, self.threats):
            names = " or ".join(t.__name__ for t in self.threats)
            raise InputError(f"{type(self).__name__} needs a {names} threat model, got {threat!r}")


class _CWSearch(_PointAttack):
    """Xiang et al.'s optimisation, shared by the perturbation and the adding attack."""

    def __init__(
        self,
        *,
        steps: int = 500,
        binary_steps: int = 10,
        lr: float = 0.01,
        initial_const: float = 10.0,
        kappa: float = 0.0,
        sor_penalty: float = 0.0,
        sor_k: int = 2,
        sor_alpha: float = 1.1,
    ) -> None:
        self.steps = positive_int("steps", steps)
        self.binary_steps = positive_int("binary_steps", binary_steps)
        self.lr = positive_float("lr", lr)
        self.initial_const = positive_float("initial_const", initial_const)
        self.kappa = positive_float("kappa", kappa, allow_zero=True)
        self.sor_penalty = positive_float("sor_penalty", sor_penalty, allow_zero=True)
        self.sor_k = positive_int("sor_k", sor_k)
        self.sor_alpha = positive_float("sor_alpha", sor_alpha, allow_zero=True)

    def _free(self, x: torch.Tensor, threat: PointThreat) -> torch.Tensor:
        return torch.ones_like(x[..., :1], dtype=torch.bool)

    def _start(self, x: torch.Tensor, threat: PointThreat, generator: torch.Generator | None) -> torch.Tensor:
        return x.clone()

    def _distortion(self, x_adv: torch.Tensor, x: torch.Tensor, threat: PointThreat) -> torch.Tensor:
        d = threat.distance(x_adv, x)
        return d.square() if isinstance(threat, PointPerturbation) and threat.metric in ("l2", "linf") else d

    def _outlier_penalty(self, x_adv: torch.Tensor, free: torch.Tensor) -> torch.Tensor:
        d = knn_mean_distance(x_adv, self.sor_k)
        with torch.no_grad():
            thr = d.mean(dim=1, keepdim=True) + self.sor_alpha * d.std(dim=1, keepdim=True)
        return ((d - thr).clamp_min(0.0) * free[..., 0]).sum(dim=1)

    def run(
        self,
        model: CountingModel,
        x: torch.Tensor,
        criterion: Criterion,
        threat: ThreatModel,
        generator: torch.Generator | None,
    ) -> torch.Tensor:
        assert isinstance(threat, PointThreat)
        n = x.shape[0]
        free = self._free(x, threat)
        lower = torch.zeros(n, device=x.device, dtype=x.dtype)
        upper = torch.full((n,), math.inf, device=x.device, dtype=x.dtype)
        const = torch.full((n,), self.initial_const, device=x.device, dtype=x.dtype)
        best = x.clone()
        best_dist = torch.full((n,), math.inf, device=x.device, dtype=x.dtype)
        start = self._start(x, threat, generator)
        for _ in range(self.binary_steps):
            x_adv = start.clone().requires_grad_(True)
            opt = torch.optim.Adam([x_adv], lr=self.lr)
            hit_round = torch.zeros(n, dtype=torch.bool, device=x.device)
            c = const

            def objective(logits: torch.Tensor, xa: torch.Tensor = x_adv, c: torch.Tensor = c) -> torch.Tensor:
                # f(x') of Carlini & Wagner: the margin of the class to leave (or to reach) capped at -kappa
                margin = criterion.loss(logits, "cw")
                return c * (-margin).clamp_min(-self.kappa)

            for step in range(self.steps + 1):
                with torch.enable_grad():
                    logits = model.model(x_adv)
                    model.forwards += n
                    with torch.no_grad():  # the iterate is projected: it may be kept as it is
                        hit = criterion.is_adversarial(logits)
                        dist = threat.distance(x_adv, x)
                        better = hit & (dist < best_dist)
                        best[better] = x_adv[better]
                        best_dist[better] = dist[better]
                        hit_round |= hit
                    if step == self.steps:
                        break
                    loss = objective(logits) + self._distortion(x_adv, x, threat)
                    if self.sor_penalty > 0:
                        loss = loss + self.sor_penalty * self._outlier_penalty(x_adv, free)
                    opt.zero_grad(set_to_none=True)
                    loss.sum().backward()
                model.gradients += n
                assert x_adv.grad is not None
                x_adv.grad.mul_(free)
                opt.step()
                with torch.no_grad():
                    x_adv.copy_(threat.project(x_adv, x))
            # Carlini & Wagner's binary search: a smaller constant after a success, a larger one after a failure
            upper = torch.where(hit_round, torch.minimum(upper, const), upper)
            lower = torch.where(hit_round, lower, torch.maximum(lower, const))
            const = torch.where(torch.isinf(upper), const * 10, (lower + upper) / 2)
        return best

    def options(self) -> dict[str, Any]:
        opts = super().options()
        if self.sor_penalty == 0:
            for key in ("sor_k", "sor_alpha"):
                opts.pop(key, None)
        return opts


class PointCW(_CWSearch):
    """C&W-style point perturbation (Xiang, Qi & Li, "Generating 3D Adversarial Point Clouds", CVPR 2019).

    Minimises ``D(x', x) + c · max(Z_y(x') - max_{i != y} Z_i(x'), -κ)`` (the targeted form with the target's
    margin) with Adam, ``D`` the squared l2 norm (or squared l∞) of the perturbation or the Chamfer / Hausdorff
    distance of the threat (:class:`~bastion.pointcloud.threat.PointPerturbation`); ``c`` is found by Carlini &
    Wagner's binary search (x10 until a first success, then bisection). Each Adam iterate is projected onto the
    threat set, so an ``eps``-bounded threat is respected throughout; ``eps = inf`` gives the paper's unbounded
    minimal-distortion attack (only the coordinate domain bounds it). The closest successful iterate is returned.

    The defaults are Carlini & Wagner's (IEEE S&P 2017) optimisation settings as Xiang et al. use them: Adam with
    learning rate 0.01, 500 iterations per constant, 10 binary-search steps, ``κ = 0``; the initial constant of 10
    is ours (the distances here are small, so a large first constant finds a success in the first round).

    Args:
        steps: Adam iterations per binary-search step.
        binary_steps: binary-search steps over the constant ``c``.
        lr: Adam learning rate (in coordinate units).
        initial_const: first value of ``c``.
        kappa: confidence margin of the C&W loss.
        sor_penalty: weight of the outlier penalty of the adaptive attack against SOR (0: the plain attack).
        sor_k: neighbours of SOR's mean distance (2, as DUP-Net).
        sor_alpha: SOR's threshold factor (1.1, as DUP-Net).
    """

    name = ""  # not in the image-attack registry (see the module docstring)
    threats = (PointPerturbation,)
    paper = "Xiang, Qi & Li, Generating 3D Adversarial Point Clouds, CVPR 2019"


class PointAdd(_CWSearch):
    """Adding independent adversarial points (Xiang, Qi & Li, CVPR 2019, Sec. 4.2).

    The input clouds carry ``k`` extra points at the end (:func:`~bastion.pointcloud.threat.add_points`); only those
    move. They start from the copies of clean points they are, jittered by Gaussian noise of standard deviation
    ``init_noise`` (a copy sits on a tie of the max pool and may get no gradient), and are optimised as in
    :class:`PointCW` with the Chamfer or Hausdorff distance from the added points to the clean cloud. The threat is
    :class:`~bastion.pointcloud.threat.PointAdding`. Same arguments as :class:`PointCW`, plus:

    Args:
        init_noise: standard deviation of the jitter of the added points at the start.
    """

    name = ""  # not in the image-attack registry (see the module docstring)
    threats = (PointAdding,)
    paper = "Xiang, Qi & Li, Generating 3D Adversarial Point Clouds, CVPR 2019"

    def __init__(self, *, init_noise: float = 0.05, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.init_noise = positive_float("init_noise", init_noise, allow_zero=True)

    def options(self) -> dict[str, Any]:
        opts = {k: getattr(self, k) for k in ("steps", "binary_steps", "lr", "initial_const", "kappa", "sor_penalty")}
        if self.sor_penalty > 0:
            opts.update(sor_k=self.sor_k, sor_alpha=self.sor_alpha)
        opts["init_noise"] = self.init_noise
        return opts

    def _free(self, x: torch.Tensor, threat: PointThreat) -> torch.Tensor:
        assert isinstance(threat, PointAdding)
        return threat.free(x)

    def _start(self, x: torch.Tensor, threat: PointThreat, generator: torch.Generator | None) -> torch.Tensor:
        noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype) * self.init_noise
        return threat.project(x + noise * self._free(x, threat), x)


class SaliencyDrop(_PointAttack):
    """Iterative saliency-map point dropping (Zheng, Chen, Cai & Cai, "PointCloud Saliency Maps", ICCV 2019).

    At each iteration the loss ``L`` (cross-entropy of the true class, or minus that of the target) is
    differentiated with respect to the points; with the spherical core ``x_c`` (coordinate-wise median of the
    cloud), ``r_i = ||x_i - x_c||`` and ``∂L/∂r_i = ∇_i L · (x_i - x_c) / r_i``, the saliency is
    ``s_i = -r_i^(1+α) ∂L/∂r_i`` (Eq. 5; α = 1 as in the paper). The ``per_step`` kept points of largest saliency
    are dropped, until ``k`` points (the threat's :class:`~bastion.pointcloud.threat.PointDropping` budget) are
    dropped; a sample stops as soon as it is adversarial. Dropped points are represented as copies of kept points
    (see :mod:`bastion.pointcloud.threat`); the gradient of a kept point sums the gradients of its copies.

    Zheng et al. drop 5 points per iteration in their iterative algorithm, the default here.

    Args:
        per_step: points dropped per iteration.
        alpha: the exponent rescaling the saliency (``r^(1+alpha)``).
    """

    name = ""  # not in the image-attack registry (see the module docstring)
    threats = (PointDropping,)
    paper = "Zheng, Chen, Cai & Cai, PointCloud Saliency Maps, ICCV 2019"

    def __init__(self, *, per_step: int = 5, alpha: float = 1.0) -> None:
        self.per_step = positive_int("per_step", per_step)
        self.alpha = positive_float("alpha", alpha, allow_zero=True)

    def saliency(self, x: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
        """Saliency (N, P) of the points ``x`` (N, P, 3) given the loss gradient ``grad`` (N, P, 3)."""
        core = x.median(dim=1, keepdim=True).values
        offset = x - core
        r = offset.norm(dim=2)
        dl_dr = (grad * offset).sum(dim=2) / r.clamp_min(1e-12)
        return -(r ** (1 + self.alpha)) * dl_dr

    def run(
        self,
        model: CountingModel,
        x: torch.Tensor,
        criterion: Criterion,
        threat: ThreatModel,
        generator: torch.Generator | None,
    ) -> torch.Tensor:
        assert isinstance(threat, PointDropping)
        n, p, _ = x.shape
        budget = min(threat.k, p - 1)
        dropped = torch.zeros((n, p), dtype=torch.bool, device=x.device)
        x_adv = x.clone()
        active = torch.ones(n, dtype=torch.bool, device=x.device)

        def loss_fn(logits: torch.Tensor) -> torch.Tensor:
            return criterion.loss(logits, "ce")

        while True:
            logits, _, grad = model.logits_and_grad(x_adv, loss_fn)
            active &= ~criterion.is_adversarial(logits)
            left = budget - dropped.sum(dim=1)
            active &= left > 0
            if not bool(active.any()):
                break
            # a kept point's gradient as a set element: the sum over the positions that hold a copy of it
            src = drop_sources(x, x_adv)
            g = torch.zeros_like(grad).scatter_add_(1, src[..., None].expand(-1, -1, 3), grad)
            s = self.saliency(x, g).masked_fill(dropped, -math.inf)
            take = torch.minimum(left, torch.full_like(left, self.per_step))
            ranks = s.argsort(dim=1, descending=True).argsort(dim=1)
            new = (ranks < take[:, None]) & active[:, None] & ~dropped
            dropped |= new
            x_adv = drop(x, dropped)
        return x_adv
