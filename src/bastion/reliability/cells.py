"""Cells of the input space for the reliability assessment model: r-separation, grid cells and ball cells.

The reliability assessment model (RAM) of Zhao, Huang, Banks, Cox, Flynn, Schewe & Huang, "Assessing the
Reliability of Deep Learning Classifiers Through Robustness Evaluation and Operational Profiles", AISafety workshop
at IJCAI 2021, partitions the input space into small cells, estimates the probability mass of each cell under the
operational profile and the model's failure probability inside it, and assembles the two. The cell size comes from
the *r-separation* of the data (Yang, Rashtchian, Zhang, Salakhutdinov & Chaudhuri, "A Closer Look at Accuracy vs.
Robustness", NeurIPS 2020): the smallest distance between two differently labelled points. With cells of radius
``eps = r / 2`` no cell can hold two differently labelled points, so each cell has one ground-truth label.

Two partitions:

* :class:`GridCells` -- a regular grid of boxes over ``[lower, upper]`` (the paper's 2-D running example uses a
  grid over ``[0, 1]²``); cells are numbered in C order (the last axis varies fastest) and
  :meth:`GridCells.unravel` / :meth:`GridCells.ravel` / :meth:`GridCells.boxes` / :meth:`GridCells.locate` map
  between a cell's number, its grid coordinates, its box and the points it holds.
* :class:`BallCells` -- the l∞ balls of radius ``eps`` around operational data points, intersected with the input
  domain (the high-dimensional case, e.g. MNIST). With ``eps = r / 2`` the balls of two differently labelled
  points have disjoint interiors; balls of equally labelled points may overlap, so ball cells cover the data but
  are not a partition of the space (each ball is weighted by its own mass, see
  :class:`~bastion.reliability.profile.OperationalProfile`).

Only cells where the profile has mass need a robustness verdict: :func:`top_k` picks the ``k`` heaviest.
:func:`cell_labels` gives each cell the label of the data inside it (the majority if several labels fall in it,
which r-separated cells never see; the cell is then flagged ``mixed``), or ``-1`` for an empty cell, which the
assessment labels with the model's majority prediction inside it, as the paper does.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from bastion.errors import InputError
from bastion.threat import LpBall, canonical_norm, check_domain

__all__ = [
    "NORMS",
    "BallCells",
    "CellLabels",
    "Cells",
    "GridCells",
    "cell_labels",
    "default_eps",
    "r_separation",
    "top_k",
]

#: Norms of the r-separation.
NORMS: tuple[str, ...] = ("linf", "l2", "l1")
_P = {"linf": math.inf, "l2": 2.0, "l1": 1.0}
# Pairwise distances computed at once by r_separation and cell_labels (rows x columns): a memory knob only.
_PAIRS = 4_000_000


def _as_float64(x: Any, what: str) -> Tensor:
    """``x`` as a float64 CPU tensor of shape (N, ...), finite, or an InputError naming ``what``."""
    if isinstance(x, Tensor):
        t = x.detach().to("cpu", torch.float64)
    else:
        try:
            t = torch.as_tensor(np.asarray(x, dtype=np.float64))
        except (TypeError, ValueError):
            raise InputError(f"{what} must be an array of numbers, got {type(x).__name__}") from None
    if t.dim() < 1:
        raise InputError(f"{what} must have a leading sample dimension, got a scalar")
    if not bool(torch.isfinite(t).all()):
        raise InputError(f"{what} holds NaN or Inf values; remove or impute them first")
    return t


def _as_labels(y: Any, n: int, what: str = "y") -> Tensor:
    t = y.detach().cpu() if isinstance(y, Tensor) else torch.as_tensor(np.asarray(y))
    if t.dim() != 1 or t.shape[0] != n:
        raise InputError(f"{what} must be a vector of {n} labels, got shape {tuple(t.shape)}")
    if t.is_floating_point():
        if not bool(torch.isfinite(t).all()) or not bool((t == t.round()).all()):
            raise InputError(f"{what} must hold whole class numbers")
    elif t.dtype == torch.bool:
        raise InputError(f"{what} must hold class numbers, got booleans")
    t = t.to(torch.int64)
    if n and int(t.min()) < 0:
        raise InputError(f"{what} must hold class numbers >= 0, got {int(t.min())}")
    return t


def r_separation(x: Any, y: Any, norm: str = "linf", *, chunk_size: int | None = None) -> float:
    """The r-separation of a labelled data set: the smallest distance between two differently labelled points.

    Yang, Rashtchian, Zhang, Salakhutdinov & Chaudhuri, "A Closer Look at Accuracy vs. Robustness", NeurIPS 2020,
    Definition 1. Exact: every pair of differently labelled points is compared (batched, in float64 on the CPU,
    ``chunk_size`` rows at a time, each row against all points); the Euclidean distance is computed coordinate-wise,
    not by the ``|a|² + |b|² - 2ab`` shortcut, which loses digits for close points.

    Args:
        x: points ``(N, ...)`` (flattened per point).
        y: labels ``(N,)``.
        norm: ``"linf"`` (the paper's), ``"l2"`` or ``"l1"``.
        chunk_size: rows per distance computation; ``None`` sizes it to about four million pairs.

    Returns:
        The r-separation; ``inf`` when all points share one label (nothing to separate).

    Raises:
        InputError: unknown norm, NaN/Inf points, mismatched or non-integer labels.
    """
    name = canonical_norm(norm)
    if name not in NORMS:
        raise InputError(f"r-separation supports the norms {', '.join(NORMS)}, not {norm!r}")
    pts = _as_float64(x, "x")
    n = int(pts.shape[0])
    pts = pts.reshape(n, -1)
    labels = _as_labels(y, n)
    if n < 2 or int(labels.unique().numel()) < 2:
        return math.inf
    rows = max(1, _PAIRS // max(n, 1)) if chunk_size is None else _positive_int("chunk_size", chunk_size)
    best = math.inf
    for start in range(0, n, rows):
        block, lab = pts[start : start + rows], labels[start : start + rows]
        # Only pairs (i, j) with j after i are needed; comparing each block with every point keeps the code simple
        # and costs at most twice the work.
        dist = torch.cdist(block, pts, p=_P[name], compute_mode="donot_use_mm_for_euclid_dist")
        dist = dist.masked_fill(lab[:, None] == labels[None, :], math.inf)
        best = min(best, float(dist.min()))
    return best


def default_eps(r: float) -> float:
    """The cell radius ``r / 2`` for an r-separation ``r``: differently labelled cells are then disjoint.

    Raises:
        InputError: ``r`` is 0 (two differently labelled points coincide) or infinite (one label only).
    """
    if not math.isfinite(r):
        raise InputError(
            "the data hold a single label, so their r-separation is infinite and gives no cell size; give eps"
        )
    if r <= 0:
        raise InputError(
            "two differently labelled data points coincide (r-separation 0), so no cell size separates them; "
            "clean the duplicates or give eps"
        )
    return r / 2


def _positive_int(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or int(value) < 1:
        raise InputError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def _vector(value: Any, dim: int | None, what: str) -> np.ndarray:
    arr = np.atleast_1d(np.asarray(value, dtype=np.float64))
    if arr.ndim != 1 or (dim is not None and arr.shape[0] not in (1, dim)):
        raise InputError(f"{what} must be a number or a vector of {dim} numbers, got shape {arr.shape}")
    if not np.isfinite(arr).all():
        raise InputError(f"{what} must be finite, got {arr.tolist()}")
    return arr if dim is None or arr.shape[0] == dim else np.full(dim, arr[0])


class GridCells:
    """A regular grid of boxes over ``[lower, upper]`` (low-dimensional input spaces).

    Cell ``i`` has grid coordinates ``unravel(i)`` (C order: the last axis varies fastest) and the box
    ``[lower + c · w, lower + (c + 1) · w]`` with ``w = (upper - lower) / shape``. A point on an inner face belongs
    to the cell above it; a point on ``upper`` belongs to the last cell.

    Args:
        lower: lower corner, a number (every axis) or one number per axis.
        upper: upper corner, likewise; ``upper > lower`` on every axis.
        shape: cells per axis, an int (every axis) or one int per axis.

    Example:
        >>> grid = GridCells(0.0, 1.0, (250, 250))
        >>> grid.n_cells, grid.half_width
        (62500, 0.002)
    """

    def __init__(self, lower: Any, upper: Any, shape: int | Sequence[int]) -> None:
        dims = [shape] if isinstance(shape, (int, np.integer)) else list(shape)
        for s in dims:
            _positive_int("every grid size", s)
        lo, hi = _vector(lower, None, "lower"), _vector(upper, None, "upper")
        dim = max(len(dims), lo.shape[0], hi.shape[0])
        if len(dims) not in (1, dim):
            raise InputError(f"shape has {len(dims)} entries but the grid has {dim} axes")
        self.shape: tuple[int, ...] = tuple(int(s) for s in (dims * dim if len(dims) == 1 else dims))
        self.lower = _vector(lo, dim, "lower")
        self.upper = _vector(hi, dim, "upper")
        if not (self.upper > self.lower).all():
            raise InputError(f"upper must exceed lower on every axis, got lower={self.lower}, upper={self.upper}")
        self.widths = (self.upper - self.lower) / np.asarray(self.shape, dtype=np.float64)

    @property
    def dim(self) -> int:
        """Number of axes."""
        return len(self.shape)

    @property
    def n_cells(self) -> int:
        """Number of cells, ``prod(shape)``."""
        return math.prod(self.shape)

    def __len__(self) -> int:
        return self.n_cells

    @property
    def is_cubic(self) -> bool:
        """All cells are cubes (equal widths on every axis, to 1e-9 relative): each is an l∞ ball."""
        return bool(np.ptp(self.widths) <= 1e-9 * self.widths.max())

    @property
    def half_width(self) -> float:
        """The smallest half-width of a cell: the radius of the largest l∞ ball around a centre inside its cell."""
        return float(self.widths.min() / 2)

    @property
    def domain(self) -> tuple[float, float]:
        """A scalar box ``(min lower, max upper)`` holding the whole grid (for an l∞ threat model's domain)."""
        return float(self.lower.min()), float(self.upper.max())

    @property
    def key(self) -> str:
        """The cells' threat key: the l∞ ball of a cell for a cubic grid, else the grid's description."""
        if self.is_cubic:
            return LpBall("linf", self.half_width, self.domain).key
        shape = "x".join(map(str, self.shape))
        box = "x".join(f"[{a!r},{b!r}]" for a, b in zip(self.lower.tolist(), self.upper.tolist()))
        return f"grid:{shape}@{box}"

    def _indices(self, idx: Any) -> np.ndarray:
        arr = np.arange(self.n_cells) if idx is None else np.asarray(idx)
        if arr.ndim != 1 or not np.issubdtype(arr.dtype, np.integer):
            raise InputError(f"cell indices must be a vector of integers, got dtype {arr.dtype}, shape {arr.shape}")
        if arr.size and (arr.min() < 0 or arr.max() >= self.n_cells):
            raise InputError(f"cell indices must lie in [0, {self.n_cells}), got {arr.min()}..{arr.max()}")
        return arr.astype(np.int64)

    def unravel(self, idx: Any) -> np.ndarray:
        """Grid coordinates ``(k, dim)`` of the cells numbered ``idx``."""
        return np.stack(np.unravel_index(self._indices(idx), self.shape), axis=1).astype(np.int64)

    def ravel(self, coords: Any) -> np.ndarray:
        """Cell numbers ``(k,)`` of the grid coordinates ``coords`` ``(k, dim)``."""
        c = np.asarray(coords)
        if c.ndim != 2 or c.shape[1] != self.dim or not np.issubdtype(c.dtype, np.integer):
            raise InputError(f"coords must be integers of shape (k, {self.dim}), got {c.dtype} {c.shape}")
        if c.size and ((c < 0).any() or (c >= np.asarray(self.shape)).any()):
            raise InputError(f"coords must lie inside the grid {self.shape}")
        return np.ravel_multi_index(tuple(c.T), self.shape).astype(np.int64)

    def boxes(self, idx: Any = None) -> tuple[np.ndarray, np.ndarray]:
        """Lower and upper corners ``(k, dim)`` of the cells ``idx`` (all cells for ``None``)."""
        c = self.unravel(idx).astype(np.float64)
        lo = self.lower + c * self.widths
        # the last cell of each axis ends exactly on ``upper`` (no rounding gap at the border)
        hi = np.where(c + 1 == np.asarray(self.shape), self.upper, self.lower + (c + 1) * self.widths)
        return lo, hi

    def centres(self, idx: Any = None) -> np.ndarray:
        """Centres ``(k, dim)`` of the cells ``idx``."""
        lo, hi = self.boxes(idx)
        return (lo + hi) / 2

    def locate(self, x: Any) -> np.ndarray:
        """The cell number of each point ``x`` ``(N, dim)``, ``-1`` for points outside ``[lower, upper]``."""
        raw = np.asarray(x, dtype=np.float64) if isinstance(x, np.ndarray) else _as_float64(x, "x").numpy()
        if raw.ndim != 2 or raw.shape[1] != self.dim:
            raise InputError(f"x must have shape (N, {self.dim}), got {raw.shape}")
        pts = raw
        inside = ((pts >= self.lower) & (pts <= self.upper)).all(axis=1)
        c = np.floor((pts - self.lower) / self.widths).astype(np.int64)
        c = np.clip(c, 0, np.asarray(self.shape) - 1)
        out = np.full(pts.shape[0], -1, dtype=np.int64)
        if inside.any():
            out[inside] = np.ravel_multi_index(tuple(c[inside].T), self.shape)
        return out

    def __repr__(self) -> str:
        return f"GridCells(lower={self.lower.tolist()}, upper={self.upper.tolist()}, shape={self.shape})"


class BallCells:
    """The l∞ balls of radius ``eps`` around given centres (operational data points), intersected with the domain.

    Each cell is the box ``[max(c - eps, lo), min(c + eps, hi)]``. With ``eps = r / 2`` for the r-separation ``r``
    of the labelled centres, balls of differently labelled centres have disjoint interiors.

    Args:
        centres: ``(m, *feature_shape)`` centres inside the domain.
        eps: the radius, > 0.
        domain: ``(lo, hi)`` box of every feature.
    """

    def __init__(self, centres: Any, eps: float, *, domain: tuple[float, float] = (0.0, 1.0)) -> None:
        c = _as_float64(centres, "centres")
        if c.dim() < 2 or c.shape[0] == 0:
            raise InputError(f"centres must have shape (m, *feature_shape) with m >= 1, got {tuple(c.shape)}")
        self.domain = check_domain(domain)
        lo, hi = self.domain
        if bool((c < lo).any()) or bool((c > hi).any()):
            raise InputError(f"every centre must lie inside the domain {self.domain}")
        if isinstance(eps, bool) or not isinstance(eps, (int, float, np.floating)) or not math.isfinite(eps):
            raise InputError(f"eps must be a finite number > 0, got {eps!r}")
        if eps <= 0:
            raise InputError(f"eps must be > 0, got {eps!r}")
        self.eps = float(eps)
        self.centres_t = c
        self.feature_shape: tuple[int, ...] = tuple(int(d) for d in c.shape[1:])

    @property
    def n_cells(self) -> int:
        """Number of cells (centres)."""
        return int(self.centres_t.shape[0])

    def __len__(self) -> int:
        return self.n_cells

    @property
    def dim(self) -> int:
        """Number of input features."""
        return math.prod(self.feature_shape)

    @property
    def is_cubic(self) -> bool:
        """Always true: a ball cell is an l∞ ball (clipped to the domain)."""
        return True

    @property
    def half_width(self) -> float:
        """The radius ``eps``."""
        return self.eps

    @property
    def key(self) -> str:
        """The cells' threat key: the l∞ ball's."""
        return LpBall("linf", self.eps, self.domain).key

    def _indices(self, idx: Any) -> np.ndarray:
        arr = np.arange(self.n_cells) if idx is None else np.asarray(idx)
        if arr.ndim != 1 or not np.issubdtype(arr.dtype, np.integer):
            raise InputError(f"cell indices must be a vector of integers, got dtype {arr.dtype}, shape {arr.shape}")
        if arr.size and (arr.min() < 0 or arr.max() >= self.n_cells):
            raise InputError(f"cell indices must lie in [0, {self.n_cells}), got {arr.min()}..{arr.max()}")
        return arr.astype(np.int64)

    def centres(self, idx: Any = None) -> np.ndarray:
        """Centres ``(k, *feature_shape)`` of the cells ``idx``."""
        return self.centres_t[torch.as_tensor(self._indices(idx))].numpy()

    def boxes(self, idx: Any = None) -> tuple[np.ndarray, np.ndarray]:
        """Lower and upper corners ``(k, *feature_shape)``: the balls ∩ domain."""
        c = self.centres(idx)
        lo, hi = self.domain
        return np.maximum(c - self.eps, lo), np.minimum(c + self.eps, hi)

    def __repr__(self) -> str:
        return f"BallCells(n={self.n_cells}, eps={self.eps!r}, feature_shape={self.feature_shape})"


Cells = GridCells | BallCells


def top_k(cells: Cells, masses: Any, k: int | None) -> np.ndarray:
    """The numbers of the ``k`` cells of largest mass, heaviest first (ties: the lower cell number first).

    Args:
        cells: the partition the masses belong to.
        masses: one mass per cell of ``cells`` (raw or normalised: only the order matters).
        k: how many; ``None`` or more than the cells: all of them, in the same order.

    Returns:
        ``(min(k, n_cells),)`` int64 cell numbers.

    Raises:
        InputError: masses of the wrong length, NaN masses, ``k < 1``.
    """
    m = np.asarray(masses, dtype=np.float64)
    if m.ndim != 1 or m.shape[0] != cells.n_cells:
        raise InputError(f"masses must hold one value per cell ({cells.n_cells}), got shape {m.shape}")
    if np.isnan(m).any():
        raise InputError("masses hold NaN values")
    count = cells.n_cells if k is None else min(_positive_int("k", k), cells.n_cells)
    # stable sort on minus the mass: equal masses keep the order of their cell numbers
    order = np.argsort(-m, kind="stable")
    return order[:count].astype(np.int64)


@dataclass(frozen=True)
class CellLabels:
    """The ground-truth label of each cell, from the labelled data inside it.

    Attributes:
        label: ``(k,)`` the majority label of the data in the cell, ``-1`` for an empty cell.
        count: ``(k,)`` data points in the cell.
        mixed: ``(k,)`` the cell holds points of more than one label (impossible for cells of radius r/2).
        purity: ``(k,)`` fraction of the cell's points that carry its label (1 for pure cells, NaN when empty).
    """

    label: np.ndarray
    count: np.ndarray
    mixed: np.ndarray
    purity: np.ndarray


def _labels_from_counts(counts: np.ndarray) -> CellLabels:
    total = counts.sum(axis=1)
    label = np.where(total > 0, counts.argmax(axis=1), -1).astype(np.int64)
    mixed = (counts > 0).sum(axis=1) > 1
    with np.errstate(invalid="ignore", divide="ignore"):
        purity = np.where(total > 0, counts.max(axis=1) / np.maximum(total, 1), np.nan)
    return CellLabels(label=label, count=total.astype(np.int64), mixed=mixed, purity=purity)


def cell_labels(cells: Cells, x: Any, y: Any, indices: Any = None, *, num_classes: int | None = None) -> CellLabels:
    """The label of each cell ``indices``: the majority label of the data ``(x, y)`` inside it, -1 if empty.

    Ties between labels go to the smaller label. Grid cells: every point is located once (a point belongs to one
    cell). Ball cells: a point belongs to every ball within ``eps`` of it (l∞, with a tolerance of 1e-12 for
    rounding), computed in batches.

    Args:
        cells: a :class:`GridCells` or :class:`BallCells`.
        x: data points ``(N, ...)`` in the cells' space.
        y: their labels ``(N,)``.
        indices: the cells to label (all for ``None``).
        num_classes: number of classes (``max(y) + 1`` by default).

    Returns:
        A :class:`CellLabels`.
    """
    pts = _as_float64(x, "x")
    n = int(pts.shape[0])
    labels = _as_labels(y, n)
    k_cls = int(labels.max()) + 1 if n else 1
    if num_classes is not None:
        k_cls = max(k_cls, _positive_int("num_classes", num_classes))
    idx = cells._indices(indices)
    counts = np.zeros((idx.shape[0], k_cls), dtype=np.int64)
    if n == 0 or idx.shape[0] == 0:
        return _labels_from_counts(counts)
    if isinstance(cells, GridCells):
        flat = pts.reshape(n, -1)
        if flat.shape[1] != cells.dim:
            raise InputError(f"x has {flat.shape[1]} features per point but the grid has {cells.dim} axes")
        where = cells.locate(flat.numpy())
        order = np.argsort(idx, kind="stable")
        pos = np.searchsorted(idx[order], where)
        pos = np.clip(pos, 0, idx.shape[0] - 1)
        hit = (where >= 0) & (idx[order][pos] == where)
        rows = order[pos[hit]]
        np.add.at(counts, (rows, labels.numpy()[hit]), 1)
        return _labels_from_counts(counts)
    if tuple(pts.shape[1:]) != cells.feature_shape:
        raise InputError(f"x has feature shape {tuple(pts.shape[1:])}, the ball cells {cells.feature_shape}")
    flat = pts.reshape(n, -1)
    centres = cells.centres_t[torch.as_tensor(idx)].reshape(idx.shape[0], -1)
    onehot = torch.nn.functional.one_hot(labels, k_cls).to(torch.float64)
    rows = max(1, _PAIRS // n)
    for start in range(0, idx.shape[0], rows):
        dist = torch.cdist(centres[start : start + rows], flat, p=math.inf)
        inside = (dist <= cells.eps * (1 + 1e-12)).to(torch.float64)
        counts[start : start + rows] = (inside @ onehot).round().to(torch.int64).numpy()
    return _labels_from_counts(counts)
