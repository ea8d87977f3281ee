"""The operational profile: a Gaussian kernel density estimate of where operational inputs fall, and cell masses.

Zhao, Huang, Banks, Cox, Flynn, Schewe & Huang, "Assessing the Reliability of Deep Learning Classifiers Through
Robustness Evaluation and Operational Profiles", AISafety workshop at IJCAI 2021 (reference code: ReAsDL,
``running_example/main.py``, ``op_learning.py``). The operational profile (OP) is the distribution of the inputs the
classifier meets in operation; the paper estimates it with a Gaussian kernel density estimate (KDE) of operational
data -- in the input space for low-dimensional data, in the latent space of a variational auto-encoder for images --
and gives each cell of the input space the OP's probability mass of that cell.

What this module does:

* :meth:`OperationalProfile.fit` fits ``sklearn.neighbors.KernelDensity`` (Gaussian kernel) to the points, or to
  ``encoder(points)`` when an encoder is given (any callable ``Tensor (N, ...) -> Tensor (N, d)``, called in batches,
  e.g. a VAE's mean encoder). Without a bandwidth, it is chosen by cross-validated log-likelihood
  (``GridSearchCV``, ``cv`` folds, shuffled with ``seed``) over a log grid. The default grid is
  ``logspace(-2, 1, 31)`` times the points' mean per-axis standard deviation, a unit-free version of the reference
  code's ``logspace(-1, 1, 20)`` (commented out there, in latent-space units).
* :meth:`OperationalProfile.log_density` evaluates the KDE exactly (batched log-sum-exp over all kernels; equal to
  ``KernelDensity.score_samples`` with its default zero tolerances, only faster).
* :meth:`OperationalProfile.cell_mass` gives each cell its mass, two ways depending on the cells:

  - **boxes in the profile's space** (grid cells, or ball cells without an encoder): the exact integral of the KDE
    over the box. The KDE is a mixture of isotropic Gaussians, so the mass of a box is the mean over the kernel
    centres ``x_j`` of ``prod_d [Φ((u_d - x_jd) / h) - Φ((l_d - x_jd) / h)]`` (Φ the standard normal CDF). This
    is exact, where the reference code uses the density at the cell's centre (times a common volume that cancels
    on normalisation), a midpoint rule whose error grows with the cell size relative to the bandwidth. On a grid
    the product separates by axis, so the whole grid costs one small matrix product per pair of axes. High
    dimensional boxes are integrated in log space (a product of 784 interval probabilities underflows).
  - **ball cells with an encoder** (the high-dimensional case): an l∞ ball of the input space has no computable
    image in the latent space, so there is no box to integrate over. The mass of a ball is taken, as in the
    reference code, proportional to the KDE density at the latent code of its centre; with balls of equal radius
    the unknown latent volume is a common factor, which normalisation removes. "Raw" masses are then relative:
    the densities divided by their sum over *all* the cells (every operational point), so they sum to 1 over the
    whole cell set and to less over a selection, like true masses.

  Masses come both **raw** (the KDE's probability of each cell; over a grid, the raw masses sum to the KDE mass
  inside the grid's bounds, less than 1 because Gaussian kernels spill over the border) and **renormalised** over
  the enumerated cells (summing to 1). **The pfd uses the renormalised masses**, as the paper and the reference do:
  the operational inputs are assumed to fall in the enumerated cells. The raw ones let the assessment also report
  how much mass the enumerated cells cover.
* :meth:`OperationalProfile.bootstrap` estimates the uncertainty of the masses the paper's way: ``n_boot`` KDEs
  (100 in the reference) of the same bandwidth, each fitted to a resample *with replacement* of ``fraction`` (one
  half in the paper) of the points, give the per-cell mean and variance (``ddof=1``, as the reference) of the cell
  masses. Deviation: each replicate's masses are renormalised over the enumerated cells before the variance is
  taken, so the variance is that of the renormalised mass the pfd uses (the reference divides the variance of the
  raw centre densities by the square of the full fit's normaliser). Note that the variance of a KDE from half the
  data is about twice that of the full-data KDE, so the paper's half-size bootstrap is conservative.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from bastion.errors import InputError
from bastion.reliability.cells import BallCells, Cells, GridCells

__all__ = ["BootstrapMass", "CellMass", "OperationalProfile"]

Encoder = Callable[[Tensor], Any]

# Elements of one intermediate array (kernels x cells x axes); a memory knob only.
_BLOCK = 4_000_000


@dataclass(frozen=True)
class CellMass:
    """The operational-profile mass of a set of cells.

    Attributes:
        raw: ``(k,)`` the KDE probability of each cell (relative masses for ball cells with an encoder, see the
            module docstring); tiny high-dimensional boxes may underflow to 0 here, see ``log_raw``.
        normalised: ``(k,)`` the raw masses divided by their sum (what the pfd uses), computed from ``log_raw`` so
            that it is right even where ``raw`` underflows; uniform when every mass is 0.
        covered: ``raw.sum()``, the profile's mass inside these cells.
        method: ``"box-integral"`` (exact KDE integral over each box) or ``"density-at-centre"``.
        log_raw: ``(k,)`` the natural log of the raw masses.
    """

    raw: np.ndarray
    normalised: np.ndarray
    covered: float
    method: str
    log_raw: np.ndarray

    @classmethod
    def from_log(cls, log_raw: np.ndarray, method: str) -> CellMass:
        return cls(
            raw=np.exp(log_raw), normalised=_softmax(log_raw), covered=float(np.exp(log_raw).sum()), method=method,
            log_raw=log_raw,
        )  # fmt: skip

    def subset(self, idx: Any) -> CellMass:
        """The masses of the cells at positions ``idx``, renormalised over them."""
        return CellMass.from_log(self.log_raw[np.asarray(idx, dtype=np.int64)], self.method)


def _softmax(log_values: np.ndarray) -> np.ndarray:
    """``exp(v) / sum(exp(v))`` computed stably; uniform when every value is -inf (no mass at all)."""
    if log_values.size == 0:
        return log_values.copy()
    top = float(log_values.max())
    if not math.isfinite(top):
        return np.full(log_values.shape, 1.0 / log_values.size)
    w = np.exp(log_values - top)
    return w / w.sum()


@dataclass(frozen=True)
class BootstrapMass:
    """Per-cell mean and variance of the cell masses over bootstrap replicates of the profile.

    Attributes:
        mean: ``(k,)`` mean of the renormalised masses.
        var: ``(k,)`` their variance (``ddof=1``).
        mean_raw: ``(k,)`` mean of the raw masses.
        var_raw: ``(k,)`` their variance.
        n_boot: number of replicates.
        fraction: size of each resample, as a fraction of the points.
    """

    mean: np.ndarray
    var: np.ndarray
    mean_raw: np.ndarray
    var_raw: np.ndarray
    n_boot: int
    fraction: float


def _positive_int(name: str, value: object, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or int(value) < minimum:
        raise InputError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def _positive_float(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.floating)):
        raise InputError(f"{name} must be a finite number > 0, got {value!r}")
    v = float(value)
    if not math.isfinite(v) or v <= 0:
        raise InputError(f"{name} must be a finite number > 0, got {value!r}")
    return v


def _as_points(points: Any, what: str = "points") -> np.ndarray:
    """``points`` as a finite float64 array (N, ...) with N >= 1."""
    if isinstance(points, Tensor):
        arr = points.detach().to("cpu", torch.float64).numpy()
    else:
        try:
            arr = np.asarray(points, dtype=np.float64)
        except (TypeError, ValueError):
            raise InputError(f"{what} must be an array of numbers, got {type(points).__name__}") from None
    if arr.ndim < 1 or arr.shape[0] == 0:
        raise InputError(f"{what} must hold at least one point, got shape {arr.shape}")
    if not np.isfinite(arr).all():
        raise InputError(f"{what} hold NaN or Inf values; remove or impute them first")
    return arr


def _interval_log_prob(a: Tensor, b: Tensor) -> Tensor:
    """``log(Φ(b) - Φ(a))`` for ``a <= b``, accurate in both tails (no difference of two numbers near 1)."""
    # Right of 0 mirror the interval so both ends sit in the lower tail, where log_ndtr is accurate.
    right = a > 0
    lo = torch.where(right, -b, a)
    hi = torch.where(right, -a, b)
    log_hi = torch.special.log_ndtr(hi)
    log_lo = torch.special.log_ndtr(lo)
    tail = log_hi + torch.log1p(-torch.exp(log_lo - log_hi).clamp(max=1.0))
    # Straddling 0, both tails are below one half, so 1 - Φ(a) - Φ(-b) has no cancellation.
    straddle = torch.log1p(-(torch.special.ndtr(a) + torch.special.ndtr(-b)).clamp(max=1.0))
    out = torch.where((a < 0) & (b > 0), straddle, tail)
    return torch.where(b <= a, torch.full_like(out, -math.inf), out)


class OperationalProfile:
    """A Gaussian kernel density estimate of the operational inputs (in the input space or an encoder's space).

    Build it with :meth:`fit`. The constructor takes points already in the profile's space (the latent codes when
    there is an encoder) and a bandwidth, and is what :meth:`bootstrap` uses for its replicates.

    Args:
        points: ``(N, d)`` kernel centres in the profile's space.
        bandwidth: the kernel's standard deviation ``h`` (> 0).
        encoder: the encoder that produced ``points`` from inputs, or ``None`` (the profile is in the input space).
        input_shape: per-point shape of the inputs the profile was fitted to (``None``: ``(d,)``).
        encode_batch: inputs per encoder call.

    Attributes:
        points: the kernel centres ``(N, d)`` (float64).
        bandwidth: ``h``.
        cv_bandwidths: the bandwidths tried by cross-validation (empty when the bandwidth was given).
        cv_scores: their mean held-out log-likelihoods.
    """

    def __init__(
        self,
        points: Any,
        bandwidth: float,
        *,
        encoder: Encoder | None = None,
        input_shape: Sequence[int] | None = None,
        encode_batch: int = 1024,
    ) -> None:
        pts = _as_points(points)
        if pts.ndim != 2:
            raise InputError(f"profile points must have shape (N, d), got {pts.shape}")
        self.points = pts
        self.bandwidth = _positive_float("bandwidth", bandwidth)
        self.encoder = encoder
        self.input_shape: tuple[int, ...] = (
            (pts.shape[1],) if input_shape is None else tuple(int(d) for d in input_shape)
        )
        self.encode_batch = _positive_int("encode_batch", encode_batch)
        self.cv_bandwidths: list[float] = []
        self.cv_scores: list[float] = []
        # codes of the last ball cells' centres (weakly keyed: a new cell set never sees stale codes)
        self._centre_cache: tuple[weakref.ref[BallCells], np.ndarray] | None = None

    # ----------------------------------------------------------------------------------------------- fitting
    @classmethod
    def fit(
        cls,
        points: Any,
        *,
        bandwidth: float | None = None,
        encoder: Encoder | None = None,
        cv: int = 5,
        bandwidths: Sequence[float] | None = None,
        seed: int = 0,
        encode_batch: int = 1024,
    ) -> OperationalProfile:
        """Fit the KDE to operational ``points`` (or to their codes ``encoder(points)``).

        Args:
            points: operational inputs ``(N, ...)``; without an encoder they are flattened to ``(N, d)``.
            bandwidth: the kernel's standard deviation; ``None`` chooses it by cross-validation.
            encoder: a callable mapping a batch of inputs ``(b, ...)`` (a float32 tensor on the encoder's device
                when it is an ``nn.Module``, else on the CPU) to codes ``(b, d)``; ``None`` for the input space.
            cv: folds of the cross-validation (>= 2).
            bandwidths: the bandwidths to try; ``None`` for ``logspace(-2, 1, 31)`` times the codes' mean standard
                deviation per axis.
            seed: seed of the folds' shuffle.
            encode_batch: inputs per encoder call.

        Returns:
            The fitted profile.

        Raises:
            InputError: NaN/Inf points, fewer points than folds, a bandwidth <= 0, an encoder whose output is not
                ``(b, d)`` finite numbers.
        """
        raw = _as_points(points)
        batch = _positive_int("encode_batch", encode_batch)
        input_shape = tuple(int(d) for d in raw.shape[1:])
        if encoder is None:
            codes = raw.reshape(raw.shape[0], -1)
        else:
            if not callable(encoder):
                raise InputError(f"encoder must be a callable Tensor (N, ...) -> Tensor (N, d), got {encoder!r}")
            codes = _encode(encoder, raw, batch)
        if bandwidth is not None:
            prof = cls(codes, bandwidth, encoder=encoder, input_shape=input_shape, encode_batch=batch)
            return prof
        folds = _positive_int("cv", cv, minimum=2)
        if codes.shape[0] < folds:
            raise InputError(f"cross-validating the bandwidth with cv={folds} folds needs >= {folds} points")
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
            raise InputError(f"seed must be an integer, got {seed!r}")
        if bandwidths is None:
            spread = float(codes.std(axis=0).mean())
            grid = np.logspace(-2, 1, 31) * (spread if spread > 0 else 1.0)
        else:
            grid = np.asarray(list(bandwidths), dtype=np.float64)
            if grid.ndim != 1 or grid.size == 0 or not np.isfinite(grid).all() or (grid <= 0).any():
                raise InputError(f"bandwidths must be a non-empty list of numbers > 0, got {list(bandwidths)!r}")
        from sklearn.model_selection import GridSearchCV, KFold
        from sklearn.neighbors import KernelDensity

        search = GridSearchCV(
            KernelDensity(kernel="gaussian"),
            {"bandwidth": grid},
            cv=KFold(n_splits=folds, shuffle=True, random_state=int(seed)),
        )
        search.fit(codes)
        best = float(search.best_params_["bandwidth"])
        prof = cls(codes, best, encoder=encoder, input_shape=input_shape, encode_batch=batch)
        prof.cv_bandwidths = grid.tolist()
        prof.cv_scores = [float(s) for s in search.cv_results_["mean_test_score"]]
        return prof

    # ----------------------------------------------------------------------------------------------- basics
    @property
    def n_points(self) -> int:
        """Number of kernels ``N``."""
        return int(self.points.shape[0])

    @property
    def dim(self) -> int:
        """Dimension ``d`` of the profile's space."""
        return int(self.points.shape[1])

    def kde(self) -> Any:
        """The equivalent fitted ``sklearn.neighbors.KernelDensity`` (Gaussian kernel, this bandwidth)."""
        from sklearn.neighbors import KernelDensity

        return KernelDensity(kernel="gaussian", bandwidth=self.bandwidth).fit(self.points)

    def encode(self, x: Any) -> np.ndarray:
        """Inputs ``(M, *input_shape)`` in the profile's space ``(M, d)``: their codes, or their flattening."""
        raw = _as_points(x, "x")
        if self.encoder is None:
            flat = raw.reshape(raw.shape[0], -1)
            if flat.shape[1] != self.dim:
                raise InputError(f"x has {flat.shape[1]} features per point, the profile's space has {self.dim}")
            return flat
        if tuple(raw.shape[1:]) != self.input_shape:
            raise InputError(f"x has per-point shape {tuple(raw.shape[1:])}, the encoder expects {self.input_shape}")
        return _encode(self.encoder, raw, self.encode_batch)

    def log_density(self, z: Any) -> np.ndarray:
        """The KDE's log density at points ``z`` ``(M, d)`` of the profile's space (latent codes with an encoder).

        ``log p(z) = logsumexp_j(-|z - x_j|² / (2h²)) - log N - (d / 2) log(2π h²)``, exact, in float64.
        """
        q = _as_points(z, "z")
        q = q.reshape(q.shape[0], -1)
        if q.shape[1] != self.dim:
            raise InputError(f"z must have {self.dim} coordinates per point, got {q.shape[1]}")
        pts = torch.from_numpy(self.points)
        qt = torch.from_numpy(np.ascontiguousarray(q))
        h = self.bandwidth
        out = torch.empty(qt.shape[0], dtype=torch.float64)
        rows = max(1, _BLOCK // max(self.n_points, 1))
        for s in range(0, qt.shape[0], rows):
            d2 = torch.cdist(qt[s : s + rows], pts).square()
            out[s : s + rows] = torch.logsumexp(-d2 / (2 * h * h), dim=1)
        const = math.log(self.n_points) + 0.5 * self.dim * math.log(2 * math.pi * h * h)
        return (out - const).numpy()

    def density(self, z: Any) -> np.ndarray:
        """``exp(log_density(z))``."""
        return np.exp(self.log_density(z))

    # ----------------------------------------------------------------------------------------------- masses
    def box_mass(self, lower: Any, upper: Any) -> np.ndarray:
        """The exact KDE probability of each box ``[lower_i, upper_i]`` ``(k, d)`` (profile space, log-space sums)."""
        lo, hi = _as_points(lower, "lower"), _as_points(upper, "upper")
        lo, hi = lo.reshape(lo.shape[0], -1), hi.reshape(hi.shape[0], -1)
        if lo.shape != hi.shape or lo.shape[1] != self.dim:
            raise InputError(f"lower and upper must both have shape (k, {self.dim}), got {lo.shape} and {hi.shape}")
        if (hi < lo).any():
            raise InputError("every box needs upper >= lower")
        return np.exp(self._box_log_mass(lo, hi))

    def _box_log_mass(self, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
        pts = torch.from_numpy(self.points)
        h = self.bandwidth
        lo_t, hi_t = torch.from_numpy(np.ascontiguousarray(lo)), torch.from_numpy(np.ascontiguousarray(hi))
        out = torch.empty(lo.shape[0], dtype=torch.float64)
        rows = max(1, _BLOCK // max(self.n_points * self.dim, 1))
        for s in range(0, lo.shape[0], rows):
            a = (lo_t[s : s + rows, None, :] - pts[None]) / h
            b = (hi_t[s : s + rows, None, :] - pts[None]) / h
            out[s : s + rows] = torch.logsumexp(_interval_log_prob(a, b).sum(dim=2), dim=1)
        return (out - math.log(self.n_points)).numpy()

    def _grid_mass(self, grid: GridCells, idx: np.ndarray | None) -> np.ndarray:
        """Exact KDE masses of grid cells: the per-axis interval probabilities multiplied out by axis."""
        pts = torch.from_numpy(self.points)
        h = self.bandwidth
        axes = []
        for d in range(grid.dim):
            edges = torch.from_numpy(grid.lower[d] + np.arange(grid.shape[d] + 1) * grid.widths[d])
            edges[-1] = float(grid.upper[d])
            z = (edges[None, :] - pts[:, d : d + 1]) / h  # (N, s_d + 1)
            # Φ of every edge once, from both sides: each interval takes its difference in the tail where the two
            # ends are small numbers (right of the kernel's centre, 1 - Φ), so no digits cancel.
            below, above = torch.special.ndtr(z), torch.special.ndtr(-z)
            right = z[:, :-1] > 0
            m = torch.where(right, above[:, :-1] - above[:, 1:], below[:, 1:] - below[:, :-1])
            axes.append(m.clamp_min(0.0))  # (N, s_d)
        n = self.n_points
        if idx is None or idx.shape[0] * grid.dim >= grid.n_cells:
            rest = math.prod(grid.shape[:-1])
            step = max(1, _BLOCK // max(rest, 1))
            total = torch.zeros(rest, grid.shape[-1], dtype=torch.float64)
            for s in range(0, n, step):
                t = torch.ones(min(step, n - s), 1, dtype=torch.float64)
                for m in axes[:-1]:
                    t = (t[:, :, None] * m[s : s + step, None, :]).reshape(t.shape[0], -1)
                total += t.T @ axes[-1][s : s + step]
            flat = (total.reshape(-1) / n).numpy()
            return flat if idx is None else flat[idx]
        coords = torch.from_numpy(grid.unravel(idx))
        out = torch.empty(idx.shape[0], dtype=torch.float64)
        step = max(1, _BLOCK // max(n, 1))
        for s in range(0, idx.shape[0], step):
            prod = torch.ones(n, min(step, idx.shape[0] - s), dtype=torch.float64)
            for d, m in enumerate(axes):
                prod = prod * m[:, coords[s : s + step, d]]
            out[s : s + step] = prod.mean(dim=0)
        return out.numpy()

    def _centre_code(self, cells: BallCells) -> np.ndarray:
        if self._centre_cache is None or self._centre_cache[0]() is not cells:
            self._centre_cache = (weakref.ref(cells), self.encode(cells.centres_t.numpy()))
        return self._centre_cache[1]

    def _unnormalised(self, cells: Cells, idx: np.ndarray | None) -> tuple[np.ndarray, str]:
        """Log box masses, or (ball cells with an encoder) log densities at the centres' codes, of cells ``idx``."""
        if isinstance(cells, GridCells):
            if self.encoder is not None:
                raise InputError(
                    "grid cells live in the input space, but this profile is in an encoder's latent space; use "
                    "ball cells around the operational points, or fit the profile without an encoder"
                )
            if cells.dim != self.dim:
                raise InputError(f"the grid has {cells.dim} axes but the profile's space has {self.dim}")
            with np.errstate(divide="ignore"):
                return np.log(self._grid_mass(cells, idx)), "box-integral"
        if not isinstance(cells, BallCells):
            raise InputError(f"cells must be GridCells or BallCells, got {type(cells).__name__}")
        if self.encoder is None:
            if cells.dim != self.dim:
                raise InputError(f"the ball cells have {cells.dim} features but the profile's space has {self.dim}")
            lo, hi = cells.boxes(idx)
            k = lo.shape[0]
            return self._box_log_mass(lo.reshape(k, -1), hi.reshape(k, -1)), "box-integral"
        codes = self._centre_code(cells)
        sel = codes if idx is None else codes[idx]
        return self.log_density(sel), "density-at-centre"

    def _log_total(self, cells: Cells) -> float:
        """Log of the sum of the centre densities over all ball cells (the normaliser of their raw masses)."""
        logs = self._unnormalised(cells, None)[0]
        top = float(logs.max())
        return top + math.log(float(np.exp(logs - top).sum())) if math.isfinite(top) else top

    def cell_mass(self, cells: Cells, indices: Any = None) -> CellMass:
        """The profile's mass of each cell ``indices`` (all cells for ``None``), raw and renormalised over them.

        Args:
            cells: :class:`~bastion.reliability.cells.GridCells` (in the input space; the profile must have no
                encoder) or :class:`~bastion.reliability.cells.BallCells` (in the input space).
            indices: cell numbers; ``None`` for every cell.

        Returns:
            A :class:`CellMass` (see the module docstring for the two methods).
        """
        idx = None if indices is None else cells._indices(indices)
        logs, method = self._unnormalised(cells, idx)
        if method == "density-at-centre":
            total = self._log_total(cells)
            if math.isfinite(total):
                logs = logs - total
        return CellMass.from_log(logs, method)

    def bootstrap(
        self,
        cells: Cells,
        indices: Any = None,
        *,
        n_boot: int = 100,
        fraction: float = 0.5,
        seed: int = 0,
    ) -> BootstrapMass:
        """Per-cell mean and variance of the masses of cells ``indices`` over ``n_boot`` half-size refits.

        Each replicate is a KDE of the same bandwidth fitted to ``round(fraction · N)`` points drawn with
        replacement (the paper's repeated half-size fits; the reference uses ``sklearn.utils.resample``, which
        also draws with replacement); its masses are renormalised over ``indices`` (see the module docstring).

        Args:
            cells: the cells.
            indices: the enumerated cells (all for ``None``).
            n_boot: replicates (>= 2; 100 in the reference code).
            fraction: resample size as a fraction of the points, in (0, 1].
            seed: seed of the resampling.

        Returns:
            A :class:`BootstrapMass`.
        """
        reps = _positive_int("n_boot", n_boot, minimum=2)
        if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0 < float(fraction) <= 1:
            raise InputError(f"fraction must be in (0, 1], got {fraction!r}")
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
            raise InputError(f"seed must be an integer, got {seed!r}")
        idx = None if indices is None else cells._indices(indices)
        log_scale = 0.0
        if isinstance(cells, BallCells) and self.encoder is not None:
            total = self._log_total(cells)
            log_scale = total if math.isfinite(total) else 0.0
        rng = np.random.default_rng(int(seed))
        size = max(1, round(float(fraction) * self.n_points))
        raws, norms = [], []
        for _ in range(reps):
            pick = rng.integers(0, self.n_points, size=size)
            rep = OperationalProfile(self.points[pick], self.bandwidth, encode_batch=self.encode_batch)
            if isinstance(cells, BallCells) and self.encoder is not None:
                codes = self._centre_code(cells)
                logs = rep.log_density(codes if idx is None else codes[idx]) - log_scale
            else:
                logs = rep._unnormalised(cells, idx)[0]
            raws.append(np.exp(logs))
            norms.append(_softmax(logs))
        r, m = np.stack(raws), np.stack(norms)
        return BootstrapMass(
            mean=m.mean(axis=0), var=m.var(axis=0, ddof=1), mean_raw=r.mean(axis=0), var_raw=r.var(axis=0, ddof=1),
            n_boot=reps, fraction=float(fraction),
        )  # fmt: skip

    def __repr__(self) -> str:
        space = "input space" if self.encoder is None else "latent space"
        return f"OperationalProfile(n={self.n_points}, d={self.dim}, bandwidth={self.bandwidth:.4g}, {space})"


def _encode(encoder: Encoder, raw: np.ndarray, batch: int) -> np.ndarray:
    """``encoder`` applied to ``raw`` in batches of ``batch``, as a finite float64 array ``(N, d)``."""
    device = torch.device("cpu")
    module = encoder if isinstance(encoder, nn.Module) else getattr(encoder, "__self__", None)
    if isinstance(module, nn.Module):
        for t in module.parameters():
            device = t.device
            break
    flags = [(m, m.training) for m in module.modules()] if isinstance(module, nn.Module) else []
    if isinstance(module, nn.Module):
        module.eval()
    parts = []
    try:
        with torch.no_grad():
            for s in range(0, raw.shape[0], batch):
                xb = torch.from_numpy(np.ascontiguousarray(raw[s : s + batch])).to(device, torch.float32)
                out = encoder(xb)
                if isinstance(out, (tuple, list)):
                    # VAE encoders often return (mean, log-variance): the mean is the code
                    out = out[0]
                arr = out.detach().to("cpu", torch.float64).numpy() if isinstance(out, Tensor) else np.asarray(out)
                if arr.ndim != 2 or arr.shape[0] != xb.shape[0]:
                    raise InputError(
                        f"the encoder must map a batch of {xb.shape[0]} inputs to codes of shape "
                        f"({xb.shape[0]}, d), got shape {arr.shape}"
                    )
                parts.append(arr.astype(np.float64))
    finally:
        for m, flag in flags:
            m.training = flag
    codes = np.concatenate(parts)
    if not np.isfinite(codes).all():
        raise InputError("the encoder returned NaN or Inf codes")
    return codes
