"""Threat models on point clouds: per-point perturbation, point adding and point dropping.

A point cloud is a tensor (N, P, 3) of P points with x, y, z coordinates each; every coordinate lies in the input
domain (by default :data:`POINT_DOMAIN`, the clouds of :mod:`bastion.pointcloud.data` fit in the unit sphere).
The threat models follow Xiang, Qi & Li, "Generating 3D Adversarial Point Clouds", CVPR 2019, and Zheng, Chen, Cai &
Cai, "PointCloud Saliency Maps", ICCV 2019, and implement bastion's :class:`~bastion.threat.ThreatModel` contract
(``project``, ``distance``, ``contains``, ``random_start``, ``step``), so the shared attack base projects and
re-verifies every attack on them as on an l_p ball.

Distances between point sets are those of Xiang et al. (Sec. 3.2): from the adversarial set ``S'`` to the clean set
``S``, with squared Euclidean point distances,

* Chamfer: ``D_C(S', S) = 1/|S'| Σ_{y ∈ S'} min_{x ∈ S} ||y - x||²``,
* Hausdorff: ``D_H(S', S) = max_{y ∈ S'} min_{x ∈ S} ||y - x||²``.

Both are one-sided (they measure how far the adversarial points stray from the clean surface), as in the paper;
note that the budgets are therefore in squared units of the coordinates.

Adding and dropping change the number of points, but a batch must keep one shape, so both are represented at the
fixed size that symmetric (max-pooling) networks such as PointNet cannot tell apart from the real thing:

* :class:`PointAdding` works on clouds of ``P + k`` points whose last ``k`` are the added ones. :func:`add_points`
  makes such a cloud from a clean one by duplicating ``k`` of its points; a duplicated point leaves a max-pooled
  feature, hence the prediction, unchanged, so the prepared cloud classifies exactly as the clean one.
* :class:`PointDropping` represents a dropped point by moving it onto a kept point (a duplicate), which again is
  exactly a removal for a max-pooling network. For a network that is sensitive to point density this is an
  approximation, and the docstrings say so.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from bastion.errors import InputError
from bastion.threat import LpBall, ThreatModel, check_domain

__all__ = [
    "METRICS",
    "POINT_DOMAIN",
    "PointAdding",
    "PointDropping",
    "PointPerturbation",
    "PointThreat",
    "add_points",
    "chamfer",
    "check_points",
    "drop",
    "drop_sources",
    "hausdorff",
    "nearest",
    "pairwise",
]

#: The coordinate range of the synthetic clouds (they are scaled into the unit sphere).
POINT_DOMAIN: tuple[float, float] = (-1.0, 1.0)
#: The perturbation metrics of :class:`PointPerturbation`.
METRICS: tuple[str, ...] = ("l2", "linf", "chamfer", "hausdorff")
_SET_METRICS = ("chamfer", "hausdorff")


def check_points(x: object, what: str = "x") -> torch.Tensor:
    """``x`` if it is a floating-point batch of point clouds (N, P, 3), else an InputError saying what is wrong."""
    if not torch.is_tensor(x) or not x.is_floating_point():
        raise InputError(f"{what} must be a floating-point tensor of point clouds (N, P, 3), got {type(x).__name__}")
    if x.dim() != 3 or x.shape[-1] != 3 or x.shape[1] < 1:
        hint = ""
        if x.dim() == 3 and x.shape[1] == 3:
            hint = "; it looks like (N, 3, P): pass x.transpose(1, 2)"
        elif x.dim() == 4:
            hint = "; that is an image batch, not point clouds"
        raise InputError(f"{what} must be point clouds of shape (N, P, 3), got shape {tuple(x.shape)}{hint}")
    return x


def pairwise(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Euclidean distances (N, Pa, Pb) between the points of ``a`` (N, Pa, 3) and ``b`` (N, Pb, 3).

    Computed from the differences, not by the matrix-product expansion ``torch.cdist`` uses by default, whose
    cancellation error (about 1e-3 at unit scale) would blur exact copies and the gradient at zero distance.
    """
    return torch.cdist(a, b, compute_mode="donot_use_mm_for_euclid_dist")


def nearest(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Squared distance (N, Pa) of each point of ``a`` (N, Pa, 3) to its nearest point of ``b``, and that index."""
    d2 = pairwise(a, b).square()
    val, idx = d2.min(dim=2)
    return val, idx


def chamfer(x_adv: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Xiang et al.'s Chamfer distance (N,): mean over the points of ``x_adv`` of the squared distance to ``x``."""
    return nearest(x_adv, x)[0].mean(dim=1)


def hausdorff(x_adv: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Xiang et al.'s Hausdorff distance (N,): largest squared distance of a point of ``x_adv`` to ``x``."""
    return nearest(x_adv, x)[0].amax(dim=1)


def add_points(x: torch.Tensor, k: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Clouds (N, P + k, 3) for :class:`PointAdding`: ``x`` followed by copies of ``k`` of its points, drawn at random.

    The copies change nothing for a max-pooling network, so the result classifies as ``x`` does.
    """
    check_points(x)
    k = _count("k", k)
    n, p, _ = x.shape
    if k > p:
        raise InputError(f"cannot add k={k} points by copying from clouds of only {p} points; use k <= {p}")
    where = x.device if generator is None else generator.device
    pick = torch.rand((n, p), generator=generator, device=where).to(x.device).argsort(dim=1)[:, :k]
    return torch.cat([x, x.gather(1, pick[..., None].expand(n, k, 3))], dim=1)


def _count(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or int(value) != value or value < 1:
        raise InputError(f"{name} must be a positive integer number of points, got {value!r}")
    return int(value)


def _budget(eps: object) -> float:
    try:
        e = float(eps)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise InputError(f"eps must be a number, got {eps!r}") from None
    if math.isnan(e) or e < 0:
        raise InputError(f"eps must be >= 0, got {eps!r}")
    return e


def _eps_rows(x: torch.Tensor, eps: torch.Tensor | float) -> torch.Tensor:
    return torch.as_tensor(eps, dtype=x.dtype, device=x.device).expand(x.shape[0])


def _set_distance(metric: str, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return chamfer(a, b) if metric == "chamfer" else hausdorff(a, b)


def _project_set(metric: str, y: torch.Tensor, ref: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """Move the points ``y`` (n, m, 3) into the ``metric`` ball of radius ``eps`` (n,) around the set ``ref``.

    Hausdorff: the set is the union of balls of radius ``sqrt(eps)`` around the points of ``ref``; the nearest
    point of a union of equal balls lies on the ball of the nearest centre, so each stray point is moved radially
    onto the sphere around its nearest reference point: the exact Euclidean projection.

    Chamfer: the set is not convex. For the current nearest-point assignment ``c_i`` the constraint is a ball
    ``Σ ||y_i - c_i||² <= m·eps`` whose projection shrinks every ``y_i - c_i`` by one common factor; a shrunk point
    can only be nearer to the reference set than to ``c_i``, so the result is inside the set (a retraction onto it,
    exact for the assignment, not necessarily the global Euclidean projection).
    """
    d2, idx = nearest(y, ref)
    centre = ref.gather(1, idx[..., None].expand(-1, -1, 3))
    offset = y - centre
    if metric == "hausdorff":
        r = eps.sqrt()[:, None]
        length = d2.sqrt()
        factor = torch.where(length > r, r / length.clamp_min(1e-30), torch.ones_like(length))
        factor = torch.where(torch.isinf(r), torch.ones_like(length), factor)
    else:
        mean = d2.mean(dim=1)
        t = torch.where(mean > eps, (eps / mean.clamp_min(1e-30)).sqrt(), torch.ones_like(mean))
        factor = t[:, None].expand_as(d2)
    return centre + offset * factor[..., None]


def _rms_direction(grad: torch.Tensor) -> torch.Tensor:
    """``grad`` scaled so that its points' displacements have root-mean-square length 1."""
    rms = grad.square().sum(dim=2).mean(dim=1).sqrt()
    return grad / rms.clamp_min(1e-12)[:, None, None]


class PointThreat(ThreatModel):
    """Base of the point-cloud threat models: inputs (N, P, 3) inside the coordinate domain."""

    def check(self, x_adv: torch.Tensor, x: torch.Tensor) -> None:
        """Raise an InputError unless ``x_adv`` and ``x`` are point clouds of one shape."""
        check_points(x, "x")
        check_points(x_adv, "x_adv")
        if x_adv.shape != x.shape:
            raise InputError(f"x_adv has shape {tuple(x_adv.shape)} but x has {tuple(x.shape)}")


@dataclass(frozen=True)
class PointPerturbation(PointThreat):
    """Every point may move; the moved cloud stays within ``eps`` of the clean one in the chosen metric.

    Args:
        metric: ``"l2"`` (Euclidean norm of the whole perturbation, points kept in correspondence), ``"linf"``
            (largest coordinate change), ``"chamfer"`` or ``"hausdorff"`` (Xiang et al.'s set distances, squared
            units; see the module docstring).
        eps: the budget (``math.inf``: only the coordinate domain bounds the points).
        domain: bounds of every coordinate.

    Example:
        >>> PointPerturbation("chamfer", 0.001).key
        'points-chamfer:0.001'
    """

    metric: str
    eps: float
    domain: tuple[float, float] = POINT_DOMAIN

    def __post_init__(self) -> None:
        if self.metric not in METRICS:
            raise InputError(f"metric must be one of {', '.join(METRICS)}, got {self.metric!r}")
        object.__setattr__(self, "eps", _budget(self.eps))
        object.__setattr__(self, "domain", check_domain(self.domain))

    @property
    def key(self) -> str:
        base = f"points-{self.metric}:{self.eps!r}"
        return base if self.domain == POINT_DOMAIN else f"{base}@[{self.domain[0]!r},{self.domain[1]!r}]"

    def _ball(self) -> LpBall:
        return LpBall(self.metric, self.eps, self.domain)

    def distance(self, x_adv: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        self.check(x_adv, x)
        if self.metric in _SET_METRICS:
            return _set_distance(self.metric, x_adv, x)
        return self._ball().distance(x_adv, x)

    def contains(self, x_adv: torch.Tensor, x: torch.Tensor, eps: torch.Tensor | float | None = None) -> torch.Tensor:
        e = _eps_rows(x, self.eps if eps is None else eps)
        tol = 1e-6 + 1e-5 * torch.where(torch.isinf(e), 0.0, e)
        return (self.distance(x_adv, x) <= e + tol) & self.in_domain(x_adv)

    def project(self, x_adv: torch.Tensor, x: torch.Tensor, eps: torch.Tensor | float | None = None) -> torch.Tensor:
        self.check(x_adv, x)
        if self.metric not in _SET_METRICS:
            return self._ball().project(x_adv, x, eps)
        e = _eps_rows(x, self.eps if eps is None else eps)
        # the clean points are in the domain box, so clipping only brings a point nearer to them: still inside
        return self.clip(_project_set(self.metric, x_adv, x, e))

    def random_start(
        self, x: torch.Tensor, generator: torch.Generator | None = None, eps: torch.Tensor | float | None = None
    ) -> torch.Tensor:
        """A random point of the set: uniform in the l_p ball, or Gaussian jitter projected onto the set metric."""
        check_points(x)
        if self.metric not in _SET_METRICS:
            return self._ball().random_start(x, generator, eps)
        e = _eps_rows(x, self.eps if eps is None else eps)
        scale = torch.where(torch.isinf(e), torch.full_like(e, 0.05), e.sqrt())
        noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype) / math.sqrt(3)
        return self.project(x + noise * scale[:, None, None], x, eps)

    def step(self, x_adv: torch.Tensor, grad: torch.Tensor, step_size: torch.Tensor | float) -> torch.Tensor:
        """l2/l∞: the ball's steepest-ascent step; Chamfer/Hausdorff: the gradient scaled to an rms point move of
        ``step_size``."""
        check_points(x_adv, "x_adv")
        if self.metric not in _SET_METRICS:
            return self._ball().step(x_adv, grad, step_size)
        size = step_size if isinstance(step_size, float) else torch.as_tensor(step_size).reshape(-1, 1, 1)
        return x_adv + size * _rms_direction(grad)

    def __repr__(self) -> str:
        extra = "" if self.domain == POINT_DOMAIN else f", domain={self.domain!r}"
        return f"PointPerturbation({self.metric!r}, {self.eps!r}{extra})"


@dataclass(frozen=True)
class PointAdding(PointThreat):
    """``k`` points added to the cloud (Xiang et al., independent points), kept near it in a set metric.

    Inputs are clouds of ``P + k`` points whose last ``k`` are the added ones (:func:`add_points` makes them from
    clean clouds). The first ``P`` points never move; the added ones stay within ``eps`` of the original ``P``
    points in the Chamfer or Hausdorff distance (measured from the added points only, squared units).

    Args:
        k: number of added points.
        metric: ``"chamfer"`` or ``"hausdorff"``.
        eps: the budget (``math.inf``: the added points may go anywhere in the domain).
        domain: bounds of every coordinate.
    """

    k: int
    metric: str = "chamfer"
    eps: float = math.inf
    domain: tuple[float, float] = POINT_DOMAIN

    def __post_init__(self) -> None:
        object.__setattr__(self, "k", _count("k", self.k))
        if self.metric not in _SET_METRICS:
            raise InputError(f"the point-adding metric must be 'chamfer' or 'hausdorff', got {self.metric!r}")
        object.__setattr__(self, "eps", _budget(self.eps))
        object.__setattr__(self, "domain", check_domain(self.domain))

    @property
    def key(self) -> str:
        base = f"add{self.k}-{self.metric}:{self.eps!r}"
        return base if self.domain == POINT_DOMAIN else f"{base}@[{self.domain[0]!r},{self.domain[1]!r}]"

    def check(self, x_adv: torch.Tensor, x: torch.Tensor) -> None:
        super().check(x_adv, x)
        if x.shape[1] <= self.k:
            raise InputError(
                f"PointAdding(k={self.k}) needs clouds of P + k points with the added ones last "
                f"(see add_points), got {x.shape[1]} points"
            )

    def split(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The original points (N, P, 3) and the added ones (N, k, 3) of a prepared cloud."""
        return x[:, : -self.k], x[:, -self.k :]

    def free(self, x: torch.Tensor) -> torch.Tensor:
        """Boolean mask (N, P + k, 1) of the points the adversary moves (the added ones)."""
        mask = torch.zeros(x.shape[:2], dtype=torch.bool, device=x.device)
        mask[:, -self.k :] = True
        return mask[..., None]

    def distance(self, x_adv: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        self.check(x_adv, x)
        return _set_distance(self.metric, self.split(x_adv)[1], self.split(x)[0])

    def contains(self, x_adv: torch.Tensor, x: torch.Tensor, eps: torch.Tensor | float | None = None) -> torch.Tensor:
        e = _eps_rows(x, self.eps if eps is None else eps)
        tol = 1e-6 + 1e-5 * torch.where(torch.isinf(e), 0.0, e)
        kept = (self.split(x_adv)[0] == self.split(x)[0]).flatten(1).all(dim=1)
        return kept & (self.distance(x_adv, x) <= e + tol) & self.in_domain(x_adv)

    def project(self, x_adv: torch.Tensor, x: torch.Tensor, eps: torch.Tensor | float | None = None) -> torch.Tensor:
        self.check(x_adv, x)
        e = _eps_rows(x, self.eps if eps is None else eps)
        original = self.split(x)[0]
        added = self.clip(_project_set(self.metric, self.split(x_adv)[1], original, e))
        return torch.cat([original, added], dim=1)

    def random_start(
        self, x: torch.Tensor, generator: torch.Generator | None = None, eps: torch.Tensor | float | None = None
    ) -> torch.Tensor:
        """The added points jittered by Gaussian noise (of the budget's scale, 0.05 unbounded), then projected."""
        self.check(x, x)
        e = _eps_rows(x, self.eps if eps is None else eps)
        scale = torch.where(torch.isinf(e), torch.full_like(e, 0.05), e.sqrt())
        noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype) / math.sqrt(3)
        return self.project(x + noise * scale[:, None, None] * self.free(x), x, eps)

    def step(self, x_adv: torch.Tensor, grad: torch.Tensor, step_size: torch.Tensor | float) -> torch.Tensor:
        """The added points moved along their gradient, scaled to an rms move of ``step_size``."""
        check_points(x_adv, "x_adv")
        g = grad * self.free(x_adv)
        size = step_size if isinstance(step_size, float) else torch.as_tensor(step_size).reshape(-1, 1, 1)
        return x_adv + size * _rms_direction(g) * math.sqrt(x_adv.shape[1] / self.k)

    def __repr__(self) -> str:
        extra = "" if self.domain == POINT_DOMAIN else f", domain={self.domain!r}"
        return f"PointAdding({self.k!r}, {self.metric!r}, {self.eps!r}{extra})"


@dataclass(frozen=True)
class PointDropping(PointThreat):
    """At most ``k`` points removed from the cloud (Zheng et al., ICCV 2019).

    A removed point is represented by a copy of a kept point (see the module docstring), so the threat set around
    ``x`` is: every point of ``x_adv`` is a point of ``x``, and at most ``k`` positions differ from ``x``. The set
    of ``x_adv``'s points is then ``x`` without at most ``k`` of its points. The distance is the number of changed
    positions.

    Args:
        k: largest number of dropped points.
        domain: bounds of every coordinate.
    """

    k: int
    domain: tuple[float, float] = POINT_DOMAIN

    def __post_init__(self) -> None:
        object.__setattr__(self, "k", _count("k", self.k))
        object.__setattr__(self, "domain", check_domain(self.domain))

    @property
    def key(self) -> str:
        base = f"drop:{self.k}"
        return base if self.domain == POINT_DOMAIN else f"{base}@[{self.domain[0]!r},{self.domain[1]!r}]"

    def _k_rows(self, x: torch.Tensor, eps: torch.Tensor | float | None) -> torch.Tensor:
        k = torch.as_tensor(self.k if eps is None else eps, device=x.device).expand(x.shape[0])
        return torch.where(torch.isinf(k.double()), x.shape[1], k.double()).long()

    def changed(self, x_adv: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Boolean mask (N, P): the positions whose point differs from the clean one."""
        return (x_adv != x).any(dim=2)

    def distance(self, x_adv: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        self.check(x_adv, x)
        return self.changed(x_adv, x).sum(dim=1).to(x.dtype)

    def contains(self, x_adv: torch.Tensor, x: torch.Tensor, eps: torch.Tensor | float | None = None) -> torch.Tensor:
        self.check(x_adv, x)
        on_points = (nearest(x_adv, x)[0] <= 1e-12).all(dim=1)
        return on_points & (self.distance(x_adv, x) <= self._k_rows(x, eps)) & self.in_domain(x_adv)

    def project(self, x_adv: torch.Tensor, x: torch.Tensor, eps: torch.Tensor | float | None = None) -> torch.Tensor:
        """Exact Euclidean projection: snap each point to its nearest clean point where that gains most, at most k.

        Leaving position ``i`` at its clean point costs ``||y_i - x_i||²``; snapping it to its nearest clean point
        costs ``min_j ||y_i - x_j||²``; the ``k`` positions with the largest saving are snapped, the others reset.
        """
        self.check(x_adv, x)
        d2, idx = nearest(x_adv, x)
        snapped = x.gather(1, idx[..., None].expand(-1, -1, 3))
        gain = (x_adv - x).square().sum(dim=2) - d2
        moved = (snapped != x).any(dim=2)
        gain = torch.where(moved, gain, torch.full_like(gain, -math.inf))
        ranks = gain.argsort(dim=1, descending=True).argsort(dim=1)
        take = moved & (ranks < self._k_rows(x, eps)[:, None])
        return torch.where(take[..., None], snapped, x)

    def random_start(
        self, x: torch.Tensor, generator: torch.Generator | None = None, eps: torch.Tensor | float | None = None
    ) -> torch.Tensor:
        """``k`` random points dropped (each replaced by its nearest kept point)."""
        check_points(x)
        ranks = torch.rand(x.shape[:2], generator=generator, device=x.device).argsort(dim=1).argsort(dim=1)
        return drop(x, ranks < self._k_rows(x, eps)[:, None])

    def step(self, x_adv: torch.Tensor, grad: torch.Tensor, step_size: torch.Tensor | float) -> torch.Tensor:
        """A plain gradient step scaled to an rms point move of ``step_size``; :meth:`project` turns it into drops."""
        check_points(x_adv, "x_adv")
        size = step_size if isinstance(step_size, float) else torch.as_tensor(step_size).reshape(-1, 1, 1)
        return x_adv + size * _rms_direction(grad)

    def __repr__(self) -> str:
        extra = "" if self.domain == POINT_DOMAIN else f", domain={self.domain!r}"
        return f"PointDropping({self.k!r}{extra})"


def drop(x: torch.Tensor, dropped: torch.Tensor) -> torch.Tensor:
    """``x`` (N, P, 3) with the points of the mask ``dropped`` (N, P) replaced by their nearest kept point.

    A cloud whose points are all dropped is returned unchanged (there is nothing to copy).
    """
    check_points(x)
    d2 = pairwise(x, x).square()
    d2 = d2.masked_fill(dropped[:, None, :], math.inf)  # only kept points may be copied
    src = d2.argmin(dim=2)
    keep_all = dropped.all(dim=1, keepdim=True)
    use = dropped & ~keep_all
    return torch.where(use[..., None], x.gather(1, src[..., None].expand(-1, -1, 3)), x)


def drop_sources(x: torch.Tensor, x_adv: torch.Tensor) -> torch.Tensor:
    """For each position of a dropped cloud, the position of the clean point it now holds (N, P)."""
    d2 = pairwise(x_adv, x).square()
    same = (x_adv == x).all(dim=2)
    src = d2.argmin(dim=2)
    return torch.where(same, torch.arange(x.shape[1], device=x.device)[None], src)
