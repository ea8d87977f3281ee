"""The reliability assessment model (RAM): the probability of failure per demand of a classifier in operation.

Zhao, Huang, Banks, Cox, Flynn, Schewe & Huang, "Assessing the Reliability of Deep Learning Classifiers Through
Robustness Evaluation and Operational Profiles", AISafety workshop at IJCAI 2021 (reference code: ReAsDL,
``running_example/main.py`` and ``sampling.py`` for the 2-D examples, ``main.py`` and ``output/cal_pfd.py`` for
images). The input space is divided into cells (:mod:`bastion.reliability.cells`); each cell ``i`` gets its
operational-profile mass ``OP_i`` (:mod:`bastion.reliability.profile`) and its *unastuteness* ``λ_i``, the
probability that an input drawn uniformly from the cell is misclassified (the model's prediction differs from the
cell's label). The model's probability of failure per demand -- the paper's "probability of misclassification per
input" -- is

    ``pfd = Σ_i OP_i · λ_i``

over the enumerated cells, with the masses renormalised over them (see the profile's docstring). The two factors
are estimated independently, so, as in the paper and the reference code, its variance is the sum over cells of the
variance of a product of independent estimates,

    ``Var(pfd) = Σ_i (OP_i² · Var(λ_i) + λ_i² · Var(OP_i) + Var(λ_i) · Var(OP_i))``,

with ``Var(OP_i)`` from the profile's half-size bootstrap and ``Var(λ_i)`` the sampling variance of the cell's
estimate (covariances between cells are ignored, as in the paper). The upper bound at confidence ``c`` (default
0.975, the paper's) is the one-sided normal bound ``pfd + Φ⁻¹(c) · sqrt(Var(pfd))`` (clipped to 1). The *average
cell unastuteness* ``ACU = (1 / |C|) Σ_i λ_i`` is the unweighted mean over the enumerated cells (``cal_pfd.py``): a
robustness figure that ignores the profile.

**How λ_i is found**, by bastion's own methods, cheapest verdict first:

1. the prediction at the cell's centre: if it differs from the cell's label the cell is *falsified* at distance 0;
2. certification by a bound method (``certify="crown"``, :func:`bastion.verify.certify.margin_bounds` on
   :func:`bastion.verify.ir.as_network`): a box cell is the l∞ ball of its half-width around its centre
   (``LpBall("linf", eps, domain)``; the radius is inflated by one part in a million so that the proof covers
   the float64 cell around the float32 centre); a certified cell has ``λ = 0`` and is not sampled;
3. an attack inside the cell (``attack="pgd"``: :class:`bastion.attacks.PGD`): a success *falsifies* the cell
   (an adversarial point exists in it);
4. uniform sampling of ``samples_per_cell`` points (10,000 in the paper) in every cell not certified: the
   failure rate ``f / n`` with the variance ``rate (1 - rate) / (n - 1)`` of the reference (``np.var(ddof=1) /
   n``); a sampled failure also falsifies the cell;
5. optionally (``splitting=True`` or a dict of its options), adaptive multilevel splitting
   (:func:`bastion.statistical.multilevel_splitting`, Webb et al., ICLR 2019) for cells that are neither certified
   nor saw a sampled failure, whose failure probability is too small for plain sampling: ``λ = exp(log_p)``
   with the delta-method variance ``(λ · log_p_std)²``. ``log_p`` is a *natural* log; the reference code stores
   ``10 ** lg_p`` (``main.py``), which inflates the probability (``10^-20`` instead of ``e^-20 ≈ 2·10^-9``):
   that slip is not copied here.

Non-square grid cells are not l∞ balls; the bound and the attack then run in rescaled coordinates
``u = x / s`` (``s`` the cells' widths over the smallest width; the model is prefixed by the scaling), in which
the cells are cubes. Models that are not ``torch.nn.Module`` -- any callable returning labels or scores, e.g. a
scikit-learn random forest's ``predict`` wrapped in :class:`CallableModel` -- have no gradients and no network to
bound: only sampling (step 4) applies to them.

**Modes** (``mode=``): what ``λ_i`` stores.

* ``"probability"`` (the paper's): the sampled failure rate (0 for a certified cell; the splitting estimate
  where splitting ran). A falsified cell keeps its sampled rate: falsification says a failure *exists*, not how
  likely it is (a cell falsified by the attack whose samples all passed has rate 0 with variance 0; splitting is
  the tool for such rare failures).
* ``"worst-case"``: 1 for a falsified cell, 0 for a certified one, the sampled rate otherwise ("certified cells
  contribute 0 and falsified cells 1"); a cell neither certified nor falsified saw no sampled failure, so its rate
  is 0, or the splitting estimate. The pfd is then the profile mass of the cells known to hold a failure.

Every record stores both: ``extra["rate"]`` (the sampled rate) and ``extra["falsified"]`` (the flag), beside the
mode's ``extra["lambda"]``.

**Labels.** A cell takes the label of the data inside it (:func:`bastion.reliability.cells.cell_labels`); an empty
cell takes the model's majority prediction over its samples (the reference's rule), so its λ is the fraction of
its samples off the majority, and its certification and attack use the prediction at its centre. A cell holding
several labels (impossible with radius r/2) takes the majority (``mixed="majority"``) or, as the reference
conservatively does, ``λ = 1`` (``mixed="fail"``).

**Deviations from the reference code, and why.**

* A failure is any misclassification. The reference's 2-D script counts only false positives of class 1
  (``fail_type='p'`` in ``sampling.py``), a choice of its case study, not of the model.
* Each cell draws its own samples from a stream seeded by ``(seed, rank)``; the reference reseeds NumPy with 100
  before every cell, so every cell gets the same relative sample pattern and the cells' errors are correlated.
* Cell masses are exact box integrals and the bootstrap variance is that of the renormalised masses (see
  :mod:`bastion.reliability.profile`).
* Mixed cells take their majority label by default; the reference's ``λ = 1`` is ``mixed="fail"``.
* Splitting probabilities are ``exp(log_p)``, not ``10 ** log_p`` (see step 5 above).

**What the number measures.** With the paper's rule for empty cells (the model's own majority is the label), an
empty cell fails only where the model is not constant on it, i.e. where a decision boundary crosses it. On data
the model classifies well, the pfd is then dominated by the cells the boundary crosses and shrinks with the cell
size (halving the cell width about halves it); it is a property of the cells as much as of the model, which is
why the cell radius should come from the data (r/2) rather than be chosen freely.

**Store.** :func:`assess_reliability` writes one :class:`~bastion.results.SampleRecord` per cell (kind
``"reliability"``; index = the cell's rank in the enumeration, threat = the cells' key) batch by batch through
:func:`bastion.store.resumable_run`; a killed run loses at most the batch in flight and resumes with the next cell.
Each cell's random stream depends only on ``seed`` and its rank, so a resumed run gives the same numbers.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import pickle
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from bastion.data import Dataset, as_dataset
from bastion.errors import InputError
from bastion.models.checks import check_logits, eval_mode, model_device, model_fingerprint
from bastion.reliability.cells import (
    BallCells,
    Cells,
    GridCells,
    cell_labels,
    default_eps,
    r_separation,
    top_k,
)
from bastion.reliability.profile import CellMass, OperationalProfile
from bastion.results import SampleRecord, Status
from bastion.store import Store, resumable_run
from bastion.threat import LpBall, check_domain

__all__ = [
    "HIGH_DEMAND_BANDS",
    "LOW_DEMAND_BANDS",
    "MODES",
    "CallableModel",
    "RAMResult",
    "assess_reliability",
    "plot_profile",
    "reliability_summary",
    "sil_level",
]

#: What λ of a cell stores (see the module docstring).
MODES: tuple[str, ...] = ("probability", "worst-case")
#: How a cell holding several labels is treated.
MIXED: tuple[str, ...] = ("majority", "fail")
#: Partitions of the input space.
PARTITIONS: tuple[str, ...] = ("auto", "grid", "balls")
#: IEC 61508-1 Table 2, low-demand mode: (SIL, lowest, highest) average probability of dangerous failure on demand.
LOW_DEMAND_BANDS: tuple[tuple[int, float, float], ...] = (
    (4, 1e-5, 1e-4), (3, 1e-4, 1e-3), (2, 1e-3, 1e-2), (1, 1e-2, 1e-1),
)  # fmt: skip
#: IEC 61508-1 Table 3, high-demand or continuous mode: (SIL, lowest, highest) dangerous failures per hour (PFH).
HIGH_DEMAND_BANDS: tuple[tuple[int, float, float], ...] = (
    (4, 1e-9, 1e-8), (3, 1e-8, 1e-7), (2, 1e-7, 1e-6), (1, 1e-6, 1e-5),
)  # fmt: skip

# Golden-ratio multiplier that spreads (seed, rank) pairs over the generator's seed space.
_MIX = 0x9E3779B97F4A7C15


def _mix(seed: int, index: int) -> int:
    return (int(seed) * _MIX + int(index) * 0xBF58476D1CE4E5B9 + 1) % (2**63 - 1)


# ---------------------------------------------------------------------------------------------------- SIL
def sil_level(value: float, *, demand: str = "low", demands_per_hour: float | None = None) -> int:
    """The safety integrity level of IEC 61508 that a failure measure meets (0: none).

    Low-demand mode (``demand="low"``): ``value`` is the probability of failure per demand and the bands are
    :data:`LOW_DEMAND_BANDS` (SIL 4: 1e-5..1e-4, ..., SIL 1: 1e-2..1e-1). High-demand or continuous mode
    (``demand="high"``): the failure frequency per hour is ``PFH = value · demands_per_hour`` (each demand fails
    independently with probability ``value``), against :data:`HIGH_DEMAND_BANDS` (SIL 4: 1e-9..1e-8 per hour, ...,
    SIL 1: 1e-6..1e-5). A value below the SIL 4 band meets SIL 4 (the standard claims no higher level); a value at a
    band's upper limit belongs to the next band down (the bands are ``[lowest, highest)``).

    Args:
        value: the probability of failure per demand, in [0, 1] (use the upper bound for a claim at a confidence).
        demand: ``"low"`` or ``"high"``.
        demands_per_hour: the demand rate, > 0; needed for ``"high"`` only.

    Returns:
        4, 3, 2, 1, or 0 when not even SIL 1 is met.
    """
    v = _finite("value", value, low=0.0)
    if v > 1:
        raise InputError(f"value must be a probability in [0, 1], got {value!r}")
    if demand == "low":
        measure, bands = v, LOW_DEMAND_BANDS
    elif demand == "high":
        if demands_per_hour is None:
            raise InputError("the high-demand mode needs demands_per_hour (the demand rate per hour, > 0)")
        rate = _finite("demands_per_hour", demands_per_hour, low=0.0)
        if rate <= 0:
            raise InputError(f"demands_per_hour must be > 0, got {demands_per_hour!r}")
        measure, bands = v * rate, HIGH_DEMAND_BANDS
    else:
        raise InputError(f"demand must be 'low' or 'high', got {demand!r}")
    for level, _, high in bands:
        if measure < high:
            return level
    return 0


# ---------------------------------------------------------------------------------------------------- models
class CallableModel:
    """A black-box classifier made from any callable (a scikit-learn ``predict``, ONNX Runtime, a NumPy function).

    The callable gets a batch of inputs ``(N, *feature_shape)`` -- a float32 NumPy array (``numpy=True``) or a
    CPU tensor -- and returns ``(N,)`` labels or ``(N, K)`` scores (the arg-max is taken). Only sampling applies to
    such a model (no gradients for an attack, no network for a bound).

    Args:
        fn: the callable.
        numpy: give it NumPy arrays (else CPU tensors).
        fingerprint: a string identifying the model for the result store; ``None`` hashes the pickled callable
            (a fitted scikit-learn estimator's ``predict`` pickles with its estimator).
        name: a name for reports.
    """

    def __init__(
        self, fn: Callable[[Any], Any], *, numpy: bool = True, fingerprint: str | None = None, name: str | None = None
    ) -> None:
        if not callable(fn):
            raise InputError(f"model must be a torch.nn.Module or a callable, got {type(fn).__name__}")
        if fingerprint is not None and (not isinstance(fingerprint, str) or not fingerprint):
            raise InputError(f"fingerprint must be a non-empty string, got {fingerprint!r}")
        self.fn = fn
        self.numpy = bool(numpy)
        self._fingerprint = fingerprint
        self.name = name or getattr(fn, "__qualname__", type(fn).__name__)

    def __call__(self, x: Tensor) -> Tensor:
        """Labels ``(N,)`` (int64, on ``x``'s device) for the inputs ``x``."""
        arg: Any = x.detach().cpu().numpy() if self.numpy else x.detach().cpu()
        out = self.fn(arg)
        t = out.detach().cpu() if isinstance(out, Tensor) else torch.as_tensor(np.asarray(out))
        n = x.shape[0]
        if t.dim() == 2 and t.shape[0] == n:
            t = t.argmax(dim=1)
        elif t.dim() != 1 or t.shape[0] != n:
            raise InputError(
                f"the model returned shape {tuple(t.shape)} for {n} inputs; expected ({n},) labels or ({n}, K) scores"
            )
        if t.is_floating_point():
            if not bool(torch.isfinite(t).all()) or not bool((t == t.round()).all()):
                raise InputError("the model returned labels that are not whole class numbers")
        return t.to(torch.int64).to(x.device)

    def fingerprint(self) -> str:
        """The given fingerprint, else the SHA-256 of the pickled callable."""
        if self._fingerprint is not None:
            return self._fingerprint
        try:
            blob = pickle.dumps(self.fn, protocol=4)
        except Exception as exc:  # any pickling failure means the same thing to the user
            raise InputError(
                f"cannot fingerprint the model {self.name!r} for the result store ({exc}); "
                "give CallableModel(fn, fingerprint='...')"
            ) from None
        return hashlib.sha256(blob).hexdigest()

    def __repr__(self) -> str:
        return f"CallableModel({self.name})"


class _AxisScale(nn.Module):
    """``u ↦ u · s``: the chart in which non-square cells are cubes (prefixed to the model)."""

    def __init__(self, scale: Tensor) -> None:
        super().__init__()
        self.register_buffer("scale", scale)

    scale: Tensor

    def forward(self, u: Tensor) -> Tensor:
        return u * self.scale


class _Classifier:
    """The model as the assessment sees it: labels of a batch, and the torch module if there is one."""

    def __init__(self, model: Any) -> None:
        if isinstance(model, nn.Module):
            self.module: nn.Module | None = model
            self.black_box: CallableModel | None = None
            self.device = model_device(model)
            dtypes = [p.dtype for p in model.parameters() if p.is_floating_point()]
            self.dtype = dtypes[0] if dtypes else torch.float32
        else:
            self.module = None
            self.black_box = model if isinstance(model, CallableModel) else CallableModel(model)
            self.device = torch.device("cpu")
            self.dtype = torch.float32
        self.checked = False

    def predict(self, x: Tensor) -> Tensor:
        if self.module is not None:
            with torch.no_grad():
                logits = self.module(x)
            if not self.checked:
                check_logits(logits, x.shape[0])
                self.checked = True
            return logits.argmax(dim=1)
        assert self.black_box is not None
        return self.black_box(x)

    def fingerprint(self) -> str:
        if self.module is not None:
            return model_fingerprint(self.module)
        assert self.black_box is not None
        return self.black_box.fingerprint()

    def describe(self) -> str:
        return type(self.module).__name__ if self.module is not None else repr(self.black_box)


# ---------------------------------------------------------------------------------------------------- result
@dataclass
class RAMResult:
    """The reliability assessment of a classifier under an operational profile.

    Attributes:
        pfd: ``Σ OP_i λ_i`` over the enumerated cells (masses renormalised over them).
        variance: its variance (see the module docstring).
        std: ``sqrt(variance)``.
        upper: the one-sided upper bound ``pfd + Φ⁻¹(confidence) · std``, clipped to 1.
        confidence: the confidence of ``upper``.
        acu: the average cell unastuteness, the unweighted mean of ``λ_i``.
        n_cells: enumerated cells.
        mode: ``"probability"`` or ``"worst-case"``.
        partition: ``"grid"`` or ``"balls"``.
        cells_key: the cells' threat key (the records' ``threat``).
        eps: the cells' radius (half-width of a grid cell, the smallest for non-square cells).
        r_separation: the data's r-separation, when it was computed (eps not given).
        bandwidth: the profile's KDE bandwidth.
        mass_method: ``"box-integral"`` or ``"density-at-centre"``.
        mass_covered: the raw profile mass of the enumerated cells (1 minus what they leave out).
        pfd_conservative: ``Σ raw_i λ_i + (1 - mass_covered)``: the pfd if every input outside the enumerated cells
            failed (an upper estimate that does not assume the inputs fall in the cells).
        n_certified: cells certified (``λ = 0``).
        n_falsified: cells with a known failure.
        n_unknown: the others.
        decided: how many cells each method decided (``crown``, ``centre``, ``pgd``, ``sampling``, ``splitting``,
            ``mixed-labels``, ``none``).
        n_empty: cells with no data (labelled by the model's majority prediction).
        samples_per_cell: uniform samples per cell not certified.
        n_boot: bootstrap replicates of the profile (0: no profile variance).
        model_calls: forward evaluations over all cells (inputs).
        cell_seconds: work time summed over the cells (all sessions).
        seconds_per_cell: ``cell_seconds / n_cells``.
        seconds: wall time of this call.
        run_id: the run in the store, or None.
        records: the per-cell records, in rank order.
        profile: the operational profile (not stored).
        cells: the partition (not stored).
        cell_ids: the enumerated cells' numbers in the partition, in rank order (not stored).
    """

    pfd: float
    variance: float
    std: float
    upper: float
    confidence: float
    acu: float
    n_cells: int
    mode: str
    partition: str
    cells_key: str
    eps: float
    r_separation: float | None
    bandwidth: float
    mass_method: str
    mass_covered: float
    pfd_conservative: float
    n_certified: int
    n_falsified: int
    n_unknown: int
    decided: dict[str, int]
    n_empty: int
    samples_per_cell: int
    n_boot: int
    model_calls: int
    cell_seconds: float
    seconds_per_cell: float
    seconds: float = 0.0
    run_id: int | None = None
    records: list[SampleRecord] = field(default_factory=list, repr=False)
    profile: OperationalProfile | None = field(default=None, repr=False)
    cells: Cells | None = field(default=None, repr=False)
    cell_ids: np.ndarray | None = field(default=None, repr=False)

    def lambdas(self) -> np.ndarray:
        """``λ_i`` per cell, in rank order."""
        return np.array([float(r.extra["lambda"]) for r in self.records])

    def masses(self) -> np.ndarray:
        """The renormalised mass ``OP_i`` per cell, in rank order."""
        return np.array([float(r.extra["mass"]) for r in self.records])

    def sil(self, demand: str = "low", demands_per_hour: float | None = None, *, bound: str = "upper") -> int:
        """The IEC 61508 SIL met by the upper bound (``bound="upper"``, a claim at ``confidence``) or the pfd."""
        if bound not in ("upper", "pfd"):
            raise InputError(f"bound must be 'upper' or 'pfd', got {bound!r}")
        value = self.upper if bound == "upper" else self.pfd
        return sil_level(value, demand=demand, demands_per_hour=demands_per_hour)

    def to_dict(self) -> dict[str, Any]:
        """The summary (JSON-able; per-cell values are in the records)."""
        return {
            "pfd": self.pfd, "variance": self.variance, "std": self.std, "upper": self.upper,
            "confidence": self.confidence, "acu": self.acu, "n_cells": self.n_cells, "mode": self.mode,
            "partition": self.partition, "cells_key": self.cells_key, "eps": self.eps,
            "r_separation": self.r_separation, "bandwidth": self.bandwidth, "mass_method": self.mass_method,
            "mass_covered": self.mass_covered, "pfd_conservative": self.pfd_conservative,
            "n_certified": self.n_certified, "n_falsified": self.n_falsified, "n_unknown": self.n_unknown,
            "decided": dict(self.decided), "n_empty": self.n_empty, "samples_per_cell": self.samples_per_cell,
            "n_boot": self.n_boot, "model_calls": self.model_calls, "cell_seconds": self.cell_seconds,
            "seconds_per_cell": self.seconds_per_cell, "seconds": self.seconds, "run_id": self.run_id,
            "sil_low_demand": self.sil("low"),
        }  # fmt: skip

    def table(self) -> str:
        """A markdown table of the assessment."""
        pct = f"{100 * self.confidence:g} %"
        decided = ", ".join(f"{k} {v}" for k, v in self.decided.items() if v)
        rows = [
            ("pfd (Σ OP·λ)", f"{self.pfd:.6g}"),
            ("std", f"{self.std:.3g}"),
            (f"upper bound ({pct})", f"{self.upper:.6g}"),
            ("ACU", f"{self.acu:.6g}"),
            ("SIL (low demand, upper bound)", str(self.sil("low"))),
            ("cells", f"{self.n_cells} ({self.partition}, eps {self.eps:.4g}, {self.mode})"),
            ("certified / falsified / unknown", f"{self.n_certified} / {self.n_falsified} / {self.n_unknown}"),
            ("decided by", decided or "-"),
            ("profile mass covered", f"{self.mass_covered:.6g} ({self.mass_method}, bandwidth {self.bandwidth:.4g})"),
            ("pfd if uncovered mass fails", f"{self.pfd_conservative:.6g}"),
            ("model calls", str(self.model_calls)),
            ("seconds per cell", f"{self.seconds_per_cell:.3g}"),
        ]
        lines = ["| quantity | value |", "|---|---|"]
        lines += [f"| {a} | {b} |" for a, b in rows]
        return "\n".join(lines)


def reliability_summary(
    records: Sequence[SampleRecord], *, confidence: float = 0.975
) -> tuple[float, float, float, float]:
    """``(pfd, variance, upper, acu)`` from per-cell records (their ``extra`` holds mass, mass_var, lambda, var).

    Args:
        records: the cells' records.
        confidence: confidence of the upper bound, in (0, 1).
    """
    conf = _confidence(confidence)
    if not records:
        return 0.0, 0.0, 0.0, 0.0
    m = np.array([float(r.extra["mass"]) for r in records])
    u = np.array([float(r.extra.get("mass_var", 0.0)) for r in records])
    lam = np.array([float(r.extra["lambda"]) for r in records])
    v = np.array([float(r.extra["var"]) for r in records])
    pfd = float(np.sum(m * lam))
    var = float(np.sum(m * m * v + lam * lam * u + v * u))
    from scipy.stats import norm

    upper = min(1.0, pfd + float(norm.ppf(conf)) * math.sqrt(max(var, 0.0)))
    return pfd, var, upper, float(lam.mean())


# ---------------------------------------------------------------------------------------------------- checks
def _finite(name: str, value: object, *, low: float | None = None) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise InputError(f"{name} must be a number, got {value!r}")
    v = float(value)
    if not math.isfinite(v) or (low is not None and v < low):
        bound = "" if low is None else f" >= {low:g}"
        raise InputError(f"{name} must be a finite number{bound}, got {value!r}")
    return v


def _confidence(confidence: object) -> float:
    c = _finite("confidence", confidence)
    if not 0 < c < 1:
        raise InputError(f"confidence must be in (0, 1), e.g. 0.975, got {confidence!r}")
    return c


def _int(name: str, value: object, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or int(value) < minimum:
        raise InputError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def _parse_cells(spec: object) -> int | None:
    """``"all"`` -> None, ``"top:K"`` / ``"K"`` / K -> K."""
    if isinstance(spec, (int, np.integer)) and not isinstance(spec, bool):
        return _int("cells", spec, 1)
    if isinstance(spec, str):
        text = spec.strip().lower()
        if text == "all":
            return None
        count = text[4:] if text.startswith("top:") else text
        if count.isdigit() and int(count) >= 1:
            return int(count)
    raise InputError(f"cells must be 'all', 'top:K' or a positive integer K, got {spec!r}")


def _parse_grid(grid: object, dim: int) -> tuple[int, ...]:
    """``"250x250"`` / 250 / (250, 250) -> a shape of ``dim`` sizes."""
    if isinstance(grid, str):
        parts = grid.lower().replace("×", "x").split("x")
        if not all(p.strip().isdigit() for p in parts):
            raise InputError(f"grid must look like '250x250' (cells per axis), got {grid!r}")
        sizes = [int(p) for p in parts]
    elif isinstance(grid, (int, np.integer)) and not isinstance(grid, bool):
        sizes = [int(grid)]
    elif isinstance(grid, Sequence):
        sizes = [_int("grid size", g, 1) for g in grid]
    else:
        raise InputError(f"grid must be an int, a sequence of ints or a string like '250x250', got {grid!r}")
    if len(sizes) == 1:
        sizes = sizes * dim
    if len(sizes) != dim or min(sizes) < 1:
        raise InputError(f"grid must give {dim} positive cells-per-axis sizes for {dim}-D inputs, got {grid!r}")
    return tuple(sizes)


def _parse_attack(attack: object) -> Any:
    if attack is None or attack is False:
        return None
    from bastion.attacks import ATTACKS, PGD, Attack

    if isinstance(attack, Attack):
        return attack
    if attack is True or attack == "pgd":
        return PGD()
    if isinstance(attack, str) and attack in ATTACKS:
        cls = ATTACKS[attack]
        if cls.minimal or "linf" not in cls.norms or cls.access != "white-box":
            raise InputError(f"attack {attack!r} cannot search an l∞ cell; use 'pgd', 'apgd' or 'fgsm'")
        return cls()
    raise InputError(f"attack must be None, 'pgd', another l∞ attack name or an Attack instance, got {attack!r}")


def _parse_splitting(splitting: object) -> dict[str, Any] | None:
    if splitting is None or splitting is False:
        return None
    if splitting is True:
        return {}
    if isinstance(splitting, Mapping):
        allowed = {
            "n_particles", "rho", "mh_steps", "max_levels", "log_p_min", "target_acceptance", "width_inc",
            "width_dec", "initial_width", "n_runs",
        }  # fmt: skip
        bad = sorted(set(splitting) - allowed)
        if bad:
            raise InputError(f"unknown multilevel-splitting options {bad}; allowed: {sorted(allowed)}")
        return dict(splitting)
    raise InputError(f"splitting must be a bool or a dict of multilevel_splitting options, got {splitting!r}")


def _dataset(op_data: object, domain: tuple[float, float] | None) -> Dataset:
    if isinstance(op_data, Dataset):
        if domain is not None and check_domain(domain) != op_data.domain:
            raise InputError(f"domain {domain!r} differs from the data set's {op_data.domain}; give one of them")
        return op_data
    if isinstance(op_data, (tuple, list)) and len(op_data) == 2:
        x, y = op_data
        if domain is None:
            return as_dataset((x, y))
        yt = torch.as_tensor(np.asarray(y)) if not isinstance(y, Tensor) else y
        k = int(yt.max()) + 1 if yt.numel() else 1
        return Dataset(x, yt, num_classes=k, name="operational data", domain=check_domain(domain))
    raise InputError(f"op_data must be a bastion Dataset or a pair (x, y), got {type(op_data).__name__}")


# ---------------------------------------------------------------------------------------------------- the job
@dataclass
class _Job:
    clf: _Classifier
    cells: Cells
    ids: np.ndarray
    lower: np.ndarray  # (k, D) float64, flattened boxes
    upper: np.ndarray
    centres: np.ndarray  # (k, D) float64: the box centres of grid cells, the ball centres of ball cells
    radius: float  # the l∞ radius of a cell around its centre (in chart coordinates for non-square cells)
    labels: np.ndarray  # (k,) -1: empty
    mixed: np.ndarray  # (k,) bool
    mass: CellMass
    mass_var: np.ndarray
    feature_shape: tuple[int, ...]
    n: int
    mode: str
    mixed_policy: str
    certify: str | None
    attack: Any
    splitting: dict[str, Any] | None
    net: Any
    chart_model: nn.Module | None
    scale: Tensor | None  # (D,) chart scale, None for cubic cells
    threat: LpBall | None
    seed: int
    chunk_points: int
    key: str


def _chart(job_cells: Cells, clf: _Classifier, feature_shape: tuple[int, ...]) -> tuple[Tensor | None, LpBall]:
    """The chart's scale (None when the cells are cubes) and the l∞ ball of a cell in chart coordinates."""
    if isinstance(job_cells, BallCells):
        return None, LpBall("linf", job_cells.eps, job_cells.domain)
    widths = job_cells.widths
    if job_cells.is_cubic:
        return None, LpBall("linf", job_cells.half_width, job_cells.domain)
    s = widths / widths.min()
    lo, hi = float((job_cells.lower / s).min()), float((job_cells.upper / s).max())
    scale = torch.as_tensor(s, dtype=clf.dtype, device=clf.device).reshape(feature_shape)
    return scale, LpBall("linf", float(widths.min() / 2), (lo, hi))


def _assess_batch(job: _Job, pos: np.ndarray) -> tuple[list[SampleRecord], float]:
    """Decide the cells at ranks ``pos``; returns their records (seconds filled) and the batch's time."""
    t0 = time.perf_counter()
    clf, dev, dt = job.clf, job.clf.device, job.clf.dtype
    b = pos.shape[0]
    lo64 = torch.from_numpy(job.lower[pos])
    hi64 = torch.from_numpy(job.upper[pos])
    lo, hi = lo64.to(dev, dt), hi64.to(dev, dt)
    centre = torch.from_numpy(job.centres[pos]).to(dev, dt)
    shape = (b, *job.feature_shape)
    calls = np.ones(b, dtype=np.int64)
    pred_c = clf.predict(centre.reshape(shape))
    data_label = torch.as_tensor(job.labels[pos], device=dev)
    empty = data_label < 0
    label = torch.where(empty, pred_c, data_label)
    mixed_fail = torch.as_tensor(job.mixed[pos] & (job.mixed_policy == "fail"), device=dev)
    at_centre = ~empty & (pred_c != label) & ~mixed_fail
    certified = torch.zeros(b, dtype=torch.bool, device=dev)
    by_attack = torch.zeros(b, dtype=torch.bool, device=dev)
    adv = torch.full((b,), math.inf, dtype=torch.float64)
    adv[at_centre.cpu()] = 0.0
    half = torch.full((b,), job.radius, dtype=torch.float64)
    chart_centre = centre if job.scale is None else centre / job.scale.reshape(-1)
    todo = ~at_centre & ~mixed_fail
    if job.net is not None and job.threat is not None and bool(todo.any()):
        from bastion.verify.certify import margin_bounds

        idx = todo.nonzero().squeeze(1)
        # a hair larger than the cell, so that the proof covers the float64 box around the rounded centre
        radius = (half[idx.cpu()] * (1 + 1e-6) + 1e-7).to(dev, dt)
        with torch.no_grad():
            bounds = margin_bounds(
                job.net, chart_centre[idx].reshape(-1, *job.feature_shape), label[idx], job.threat, eps=radius,
                method=job.certify or "crown",
            )  # fmt: skip
        certified[idx] = (bounds > 0).all(dim=1)
    todo = todo & ~certified
    if job.attack is not None and job.chart_model is not None and job.threat is not None and bool(todo.any()):
        idx = todo.nonzero().squeeze(1)
        res = job.attack(
            job.chart_model, chart_centre[idx].reshape(-1, *job.feature_shape), label[idx], threat=job.threat,
            seed=_mix(job.seed, int(pos[0])) % (2**31),
        )  # fmt: skip
        hit = res.success.to(dev)
        by_attack[idx[hit]] = True
        found = res.x_adv.reshape(idx.shape[0], -1).to(dt)
        if job.scale is not None:
            found = found * job.scale.reshape(-1)
        dist = (found - centre[idx]).abs().amax(dim=1).double().cpu()
        hit_c = hit.cpu()
        adv[idx.cpu()[hit_c]] = torch.minimum(adv[idx.cpu()[hit_c]], dist[hit_c])
        calls[idx.cpu().numpy()] += math.ceil(res.model_calls / max(idx.shape[0], 1))
    sample = ~certified & ~mixed_fail
    failures = np.zeros(b, dtype=np.int64)
    n_used = np.zeros(b, dtype=np.int64)
    final_label = label.clone()
    sampled = sample.nonzero().squeeze(1).cpu().numpy()
    d = job.lower.shape[1]
    # cells sampled together: at most chunk_points inputs per call and about 2^25 numbers in memory
    per_group = max(1, min(job.chunk_points // job.n, 2**25 // (job.n * d)))
    for g0 in range(0, sampled.shape[0], per_group):
        group = sampled[g0 : g0 + per_group]
        pts = torch.empty(group.shape[0], job.n, d, dtype=dt, device=dev)
        for j, c in enumerate(group.tolist()):
            gen = torch.Generator(device=dev).manual_seed(_mix(job.seed, int(pos[c])))
            u = torch.rand(job.n, d, generator=gen, device=dev, dtype=dt)
            pts[j] = lo[c] + u * (hi[c] - lo[c])
        flat = pts.reshape(-1, d)
        preds = torch.cat(
            [clf.predict(flat[s : s + job.chunk_points].reshape(-1, *job.feature_shape))
             for s in range(0, flat.shape[0], job.chunk_points)]
        ).reshape(group.shape[0], job.n)  # fmt: skip
        g_idx = torch.as_tensor(group, device=dev)
        lab = label[g_idx]
        is_empty = empty[g_idx]
        if bool(is_empty.any()):
            # an empty cell takes the majority prediction over its samples (ties: the smaller class)
            k_cls = int(preds.max()) + 1
            rows = torch.arange(group.shape[0], device=dev)[:, None] * k_cls
            counts = torch.bincount((rows + preds).reshape(-1), minlength=group.shape[0] * k_cls)
            majority = counts.reshape(group.shape[0], k_cls).argmax(dim=1)
            lab = torch.where(is_empty, majority, lab)
        final_label[g_idx] = lab
        wrong = preds != lab[:, None]
        n_wrong = wrong.sum(dim=1)
        failures[group] = n_wrong.cpu().numpy()
        n_used[group] = job.n
        calls[group] += job.n
        bad = (n_wrong > 0).nonzero().squeeze(1)
        if bad.numel():
            # the sampled failure nearest to the centre, as the cell's adversarial distance
            dist = (pts[bad] - centre[g_idx[bad]][:, None, :]).abs().amax(dim=2)
            nearest = dist.masked_fill(~wrong[bad], math.inf).amin(dim=1).double().cpu()
            where = torch.as_tensor(group)[bad.cpu()]
            adv[where] = torch.minimum(adv[where], nearest)
    rate = np.where(n_used > 0, failures / np.maximum(n_used, 1), 0.0)
    rate_var = np.where(n_used > 1, rate * (1 - rate) / np.maximum(n_used - 1, 1), 0.0)
    # empty cells whose centre is off the majority are falsified at the centre too
    off = empty & (pred_c != final_label) & ~certified & ~mixed_fail
    at_centre = at_centre | off
    adv[off.cpu()] = 0.0
    split_p = np.full(b, np.nan)
    split_var = np.zeros(b)
    by_split = np.zeros(b, dtype=bool)
    if job.splitting is not None and job.chart_model is not None and job.threat is not None:
        from bastion.statistical.splitting import multilevel_splitting

        quiet = sample.cpu().numpy() & (failures == 0)
        for c in np.nonzero(quiet)[0].tolist():
            res = multilevel_splitting(
                job.chart_model, chart_centre[c].reshape(job.feature_shape), int(final_label[c]),
                job.threat.with_eps(float(half[c])), seed=_mix(job.seed, int(pos[c])) % (2**31), **job.splitting,
            )  # fmt: skip
            p = math.exp(res.log_p) if math.isfinite(res.log_p) else 0.0
            split_p[c] = p
            split_var[c] = (p * res.log_p_std) ** 2 if p > 0 and math.isfinite(res.log_p_std) else 0.0
            calls[c] += res.model_calls
            if res.x_adv is not None:
                by_split[c] = True
                x_found = res.x_adv.reshape(-1).to(dt)
                if job.scale is not None:
                    x_found = x_found * job.scale.reshape(-1)
                adv[c] = min(float(adv[c]), float((x_found - centre[c]).abs().max()))
    seconds = time.perf_counter() - t0
    share = seconds / b
    records = []
    cert_np, attack_np, centre_np = certified.cpu().numpy(), by_attack.cpu().numpy(), at_centre.cpu().numpy()
    mixed_np, empty_np = mixed_fail.cpu().numpy(), empty.cpu().numpy()
    pred_np, label_np = pred_c.cpu().numpy(), final_label.cpu().numpy()
    for j in range(b):
        r = int(pos[j])
        status: Status
        method: str | None
        falsified = bool(centre_np[j] or attack_np[j] or failures[j] > 0 or by_split[j])
        if mixed_np[j]:
            lam, var, status, method = 1.0, 0.0, "unknown", "mixed-labels"
        elif cert_np[j]:
            lam, var, status, method = 0.0, 0.0, "robust", job.certify or "crown"
        else:
            base = float(split_p[j]) if not math.isnan(split_p[j]) else float(rate[j])
            base_var = float(split_var[j]) if not math.isnan(split_p[j]) else float(rate_var[j])
            if job.mode == "worst-case" and falsified:
                lam, var = 1.0, 0.0
            else:
                lam, var = base, base_var
            status = "falsified" if falsified else "unknown"
            method = (
                "centre" if centre_np[j] else job.attack.name if attack_np[j] else "sampling" if failures[j] > 0
                else "splitting" if by_split[j] else None
            )  # fmt: skip
        extra: dict[str, Any] = {
            "cell": int(job.ids[r]), "mass": float(job.mass.normalised[r]), "mass_raw": float(job.mass.raw[r]),
            "mass_var": float(job.mass_var[r]), "lambda": lam, "var": var, "rate": float(rate[j]),
            "rate_var": float(rate_var[j]), "n": int(n_used[j]), "failures": int(failures[j]),
            "falsified": falsified, "certified": bool(cert_np[j]),
            "label_source": "mixed" if job.mixed[r] else "empty" if empty_np[j] else "data",
        }  # fmt: skip
        if not math.isnan(split_p[j]):
            extra["splitting_p"] = float(split_p[j])
        records.append(
            SampleRecord(
                index=r, threat=job.key, label=int(label_np[j]), clean_pred=int(pred_np[j]), status=status,
                adv_distance=None if not math.isfinite(float(adv[j])) else float(adv[j]),
                certified=float(half[j]) if cert_np[j] else None, attack=method, seconds=share,
                queries=int(calls[j]), extra=extra,
            )
        )  # fmt: skip
    return records, seconds


def _summarise(job: _Job, records: list[SampleRecord], confidence: float, meta: dict[str, Any]) -> RAMResult:
    recs = sorted((r for r in records if r.threat == job.key), key=lambda r: r.index)
    pfd, var, upper, acu = reliability_summary(recs, confidence=confidence)
    lam = np.array([float(r.extra["lambda"]) for r in recs]) if recs else np.zeros(0)
    raw = np.array([float(r.extra["mass_raw"]) for r in recs]) if recs else np.zeros(0)
    covered = float(raw.sum())
    names = [job.certify or "crown", "centre", job.attack.name if job.attack is not None else "pgd", "sampling"]
    decided = dict.fromkeys([*names, "splitting", "mixed-labels", "none"], 0)
    for r in recs:
        name = r.attack or "none"
        decided[name] = decided.get(name, 0) + 1
    cell_seconds = float(sum(r.seconds for r in recs))
    return RAMResult(
        pfd=pfd, variance=var, std=math.sqrt(max(var, 0.0)), upper=upper, confidence=confidence, acu=acu,
        n_cells=len(recs), mode=job.mode, partition=meta["partition"], cells_key=job.key, eps=meta["eps"],
        r_separation=meta["r_separation"], bandwidth=meta["bandwidth"], mass_method=job.mass.method,
        mass_covered=covered, pfd_conservative=min(1.0, float(np.sum(raw * lam)) + max(0.0, 1.0 - covered)),
        n_certified=sum(r.status == "robust" for r in recs), n_falsified=sum(r.status == "falsified" for r in recs),
        n_unknown=sum(r.status == "unknown" for r in recs), decided=decided,
        n_empty=sum(r.extra.get("label_source") == "empty" for r in recs), samples_per_cell=job.n,
        n_boot=meta["n_boot"], model_calls=int(sum(r.queries or 0 for r in recs)), cell_seconds=cell_seconds,
        seconds_per_cell=cell_seconds / len(recs) if recs else 0.0, records=recs, profile=meta["profile"],
        cells=job.cells, cell_ids=job.ids,
    )  # fmt: skip


def assess_reliability(
    model: nn.Module | CallableModel | Callable[[Any], Any],
    op_data: Dataset | tuple[Any, Any],
    *,
    cells: str | int = "top:1000",
    partition: str = "auto",
    grid: str | int | Sequence[int] | None = None,
    bounds: tuple[Any, Any] | None = None,
    eps: float | None = None,
    encoder: Callable[[Tensor], Any] | None = None,
    bandwidth: float | None = None,
    n_boot: int = 100,
    boot_fraction: float = 0.5,
    samples_per_cell: int = 10_000,
    confidence: float = 0.975,
    mode: str = "probability",
    certify: str | None = "crown",
    attack: Any = "pgd",
    splitting: bool | Mapping[str, Any] = False,
    mixed: str = "majority",
    domain: tuple[float, float] | None = None,
    cells_per_batch: int = 64,
    chunk_points: int = 262_144,
    store: Store | str | Path | None = None,
    progress: bool = True,
    seed: int = 0,
    config: dict[str, Any] | None = None,
) -> RAMResult:
    """Assess a classifier's reliability under the operational profile of ``op_data`` (Zhao et al., 2021).

    Fits the profile, divides the input space into cells, enumerates the cells with the most mass, decides each
    cell's unastuteness λ (centre, certification, attack, sampling, optionally splitting; see the module
    docstring) and assembles the pfd, its variance, its upper bound and the ACU. Resumable through the store.

    Args:
        model: a ``torch.nn.Module`` returning logits (every method applies), or any callable returning labels or
            scores, or a :class:`CallableModel` (sampling only: ``certify``, ``attack`` and ``splitting`` are
            ignored for it).
        op_data: the operational data: a :class:`~bastion.data.Dataset` or a pair ``(x, y)``.
        cells: which cells to assess: ``"top:K"`` (the K of largest mass), an int K, or ``"all"``.
        partition: ``"grid"`` (boxes over ``bounds``), ``"balls"`` (l∞ balls of radius eps around the operational
            points) or ``"auto"`` (grid for inputs of at most 3 features and no encoder, else balls).
        grid: cells per axis of the grid: ``"250x250"``, an int (every axis) or a sequence; ``None`` derives it
            from ``eps`` (cells of width at most ``2 · eps``).
        bounds: the grid's ``(lower, upper)`` corners (numbers or per-axis vectors); default the data's domain.
        eps: the cells' radius (balls; for a grid, half the widest cell width allowed); ``None``: r/2 for the
            data's l∞ r-separation r (exact, quadratic in the number of points: give eps for large data sets).
        encoder: a callable ``Tensor (N, ...) -> Tensor (N, d)`` putting the profile in a latent space (ball cells);
            a module is identified in the run key by its weights, any other callable by its name only.
        bandwidth: the KDE bandwidth; ``None`` chooses it by 5-fold cross-validation.
        n_boot: bootstrap replicates of the profile for ``Var(OP_i)`` (100 in the reference); 0 for none.
        boot_fraction: size of each bootstrap resample relative to the data (one half in the paper).
        samples_per_cell: uniform samples per cell not certified (10,000 in the paper), >= 2.
        confidence: confidence of the upper bound, in (0, 1).
        mode: ``"probability"`` or ``"worst-case"`` (see the module docstring).
        certify: a bound method of :data:`bastion.verify.certify.METHODS` (``"crown"``), or ``None``.
        attack: ``"pgd"``, another l∞ white-box attack name, an :class:`~bastion.attacks.Attack`, or ``None``.
        splitting: ``True`` or a dict of :func:`~bastion.statistical.multilevel_splitting` options to estimate
            tiny failure probabilities in cells whose samples saw no failure; ``False`` to skip.
        mixed: ``"majority"`` or ``"fail"`` (λ = 1, the reference's rule) for cells holding several labels.
        domain: input domain for a pair ``(x, y)`` (default ``(0, 1)``); a Dataset brings its own.
        cells_per_batch: cells per batch, which is also the unit of a store transaction.
        chunk_points: most inputs per model call (memory only).
        store: a :class:`~bastion.store.Store`, a path to one, or ``None`` (in memory).
        progress: show a progress bar over the cells.
        seed: seed of the bootstrap, the samples, the attack and the folds.
        config: extra JSON-able information stored with the run.

    Returns:
        A :class:`RAMResult`.

    Raises:
        InputError: on bad arguments (the message names the argument and what to do).
    """
    t_start = time.perf_counter()
    # ------------------------------------------------------------------ arguments
    if not isinstance(model, nn.Module) and not callable(model):
        raise InputError(f"model must be a torch.nn.Module or a callable returning labels, got {type(model).__name__}")
    clf = _Classifier(model)
    data = _dataset(op_data, domain)
    if len(data) == 0:
        raise InputError("op_data holds no points; give the operational data")
    k_sel = _parse_cells(cells)
    if partition not in PARTITIONS:
        raise InputError(f"partition must be one of {', '.join(PARTITIONS)}, got {partition!r}")
    if mode not in MODES:
        raise InputError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
    if mixed not in MIXED:
        raise InputError(f"mixed must be one of {', '.join(MIXED)}, got {mixed!r}")
    n = _int("samples_per_cell", samples_per_cell, 2)
    conf = _confidence(confidence)
    boots = _int("n_boot", n_boot, 0)
    if boots == 1:
        raise InputError("n_boot must be 0 (no profile variance) or at least 2")
    frac = _finite("boot_fraction", boot_fraction)
    if not 0 < frac <= 1:
        raise InputError(f"boot_fraction must be in (0, 1], got {boot_fraction!r}")
    per_batch = _int("cells_per_batch", cells_per_batch, 1)
    chunk = _int("chunk_points", chunk_points, 1)
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise InputError(f"seed must be an integer, got {seed!r}")
    if eps is not None:
        e = _finite("eps", eps)
        if e <= 0:
            raise InputError(f"eps must be > 0, got {eps!r}")
    if bandwidth is not None:
        _finite("bandwidth", bandwidth)
        if bandwidth <= 0:
            raise InputError(f"bandwidth must be > 0, got {bandwidth!r}")
    if certify is not None:
        from bastion.verify.certify import check_method

        certify = check_method(certify)
    atk = _parse_attack(attack)
    split_opts = _parse_splitting(splitting)
    if encoder is not None and not callable(encoder):
        raise InputError(f"encoder must be a callable Tensor (N, ...) -> Tensor (N, d), got {encoder!r}")
    feature_shape = data.feature_shape
    dim = math.prod(feature_shape)
    kind = partition if partition != "auto" else ("grid" if dim <= 3 and encoder is None else "balls")
    if kind == "grid" and encoder is not None:
        raise InputError("grid cells live in the input space; with an encoder use partition='balls'")
    x_np = data.x.reshape(len(data), -1).double().numpy()
    y_np = data.y.numpy()

    # ------------------------------------------------------------------ cells
    r_sep: float | None = None
    if kind == "grid":
        if grid is not None and eps is not None:
            raise InputError("give either grid (cells per axis) or eps (cell radius) for a grid, not both")
        if bounds is None:
            lower: Any = np.full(dim, data.domain[0])
            upper: Any = np.full(dim, data.domain[1])
        else:
            try:
                lower, upper = bounds
            except (TypeError, ValueError):
                raise InputError(f"bounds must be a pair (lower, upper), got {bounds!r}") from None
        lo_v = np.broadcast_to(np.asarray(lower, dtype=np.float64), (dim,)).copy()
        hi_v = np.broadcast_to(np.asarray(upper, dtype=np.float64), (dim,)).copy()
        if grid is None:
            radius = eps
            if radius is None:
                r_sep = r_separation(x_np, y_np, "linf")
                radius = default_eps(r_sep)
            shape = tuple(max(1, math.ceil((h - lo_) / (2 * radius) - 1e-9)) for lo_, h in zip(lo_v, hi_v))
            if math.prod(shape) > 50_000_000:
                raise InputError(
                    f"a grid of cells of radius {radius:.3g} would have {math.prod(shape)} cells; give a coarser "
                    "grid= or a larger eps"
                )
        else:
            shape = _parse_grid(grid, dim)
        partition_cells: Cells = GridCells(lo_v, hi_v, shape)
    else:
        if grid is not None or bounds is not None:
            raise InputError(
                "grid= and bounds= describe grid cells; ball cells (an encoder, or inputs of more than 3 features) "
                "take eps= only, or pass partition='grid'"
            )
        radius = eps
        if radius is None:
            r_sep = r_separation(x_np, y_np, "linf")
            radius = default_eps(r_sep)
        partition_cells = BallCells(data.x, float(radius), domain=data.domain)

    # ------------------------------------------------------------------ profile and masses
    prof_points = data.x if encoder is not None else x_np
    profile = OperationalProfile.fit(prof_points, bandwidth=bandwidth, encoder=encoder, seed=int(seed))
    full = profile.cell_mass(partition_cells)
    ids = top_k(partition_cells, full.log_raw, k_sel)
    mass = full.subset(ids)
    if boots >= 2:
        mass_var = profile.bootstrap(partition_cells, ids, n_boot=boots, fraction=frac, seed=int(seed)).var
    else:
        mass_var = np.zeros(ids.shape[0])
    lab = cell_labels(partition_cells, x_np if kind == "grid" else data.x, y_np, ids, num_classes=data.num_classes)
    lo_b, hi_b = partition_cells.boxes(ids)
    k = ids.shape[0]
    centres = partition_cells.centres(ids).reshape(k, -1)

    # ------------------------------------------------------------------ methods
    scale, threat = _chart(partition_cells, clf, feature_shape)
    net = None
    chart_model: nn.Module | None = None
    if clf.module is not None:
        chart_model = clf.module if scale is None else nn.Sequential(_AxisScale(scale), clf.module)
        if certify is not None:
            from bastion.verify.ir import as_network

            try:
                net = as_network(chart_model, feature_shape)
            except InputError as exc:
                raise InputError(
                    f"cannot bound the model for certification ({exc}); pass certify=None to assess it by attack "
                    "and sampling only"
                ) from None
    job = _Job(
        clf=clf, cells=partition_cells, ids=ids, lower=lo_b.reshape(k, -1), upper=hi_b.reshape(k, -1),
        centres=centres, radius=threat.eps,
        labels=lab.label, mixed=lab.mixed, mass=mass, mass_var=mass_var, feature_shape=feature_shape, n=n,
        mode=mode, mixed_policy=mixed, certify=certify if clf.module is not None else None,
        attack=atk if clf.module is not None else None, splitting=split_opts if clf.module is not None else None,
        net=net, chart_model=chart_model, scale=scale, threat=threat, seed=int(seed), chunk_points=chunk,
        key=partition_cells.key,
    )  # fmt: skip
    enc_fp = None
    if encoder is not None:
        # a module (or a module's bound method, e.g. vae.encode) is identified by its weights, else by its name
        owner = encoder if isinstance(encoder, nn.Module) else getattr(encoder, "__self__", None)
        name = getattr(encoder, "__qualname__", type(encoder).__name__)
        enc_fp = f"{name}:{model_fingerprint(owner)}" if isinstance(owner, nn.Module) else name
    payload = {
        "cells": partition_cells.key, "partition": kind, "selection": "all" if k_sel is None else k_sel,
        "grid": list(partition_cells.shape) if isinstance(partition_cells, GridCells) else None,
        "bounds": [partition_cells.lower.tolist(), partition_cells.upper.tolist()]
        if isinstance(partition_cells, GridCells) else None,
        "bandwidth": profile.bandwidth, "encoder": enc_fp, "n_boot": boots, "boot_fraction": frac,
        "samples_per_cell": n, "mode": mode, "mixed": mixed, "certify": job.certify,
        "attack": repr(job.attack) if job.attack is not None else None, "splitting": job.splitting if
        job.splitting is None else sorted(job.splitting.items()), "seed": int(seed),
    }  # fmt: skip
    meta = {
        "partition": kind, "eps": partition_cells.half_width, "r_separation": r_sep, "bandwidth": profile.bandwidth,
        "n_boot": boots, "profile": profile,
    }  # fmt: skip
    from tqdm.auto import tqdm

    module = clf.module
    with resumable_run(
        store, kind="reliability", payload=payload, fingerprints=lambda: (clf.fingerprint(), data.fingerprint()),
        n_samples=k, threats=[job.key],
        config={"cells_per_batch": per_batch, "model": clf.describe(), "confidence": conf, **(config or {})},
    ) as run:  # fmt: skip
        todo = np.asarray(run.todo(k), dtype=np.int64)
        with tqdm(total=k, initial=k - todo.shape[0], desc="reliability", unit="cell", disable=not progress) as bar:
            context = eval_mode(module) if module is not None else contextlib.nullcontext()
            with context:
                for s in range(0, todo.shape[0], per_batch):
                    pos = todo[s : s + per_batch]
                    records, seconds = _assess_batch(job, pos)
                    run.write(records, seconds=seconds)
                    bar.update(pos.shape[0])
        result = _summarise(job, run.records(job.key), conf, meta)
        return run.finish(result, started=t_start)


# ---------------------------------------------------------------------------------------------------- figure
def plot_profile(result: RAMResult, path: str | Path, *, resolution: int = 200, title: str | None = None) -> Path:
    """Draw the operational profile with the failing cells marked, and save it (format from the suffix).

    2-D grids: a heat map of the KDE density over the grid's bounds, the operational points, and every cell with
    ``λ > 0`` outlined in red (filled more strongly the larger its λ). 1-D grids: the density curve with the
    failing cells shaded. Ball cells (high-dimensional inputs): each cell's mass against its λ (log mass axis,
    symmetric-log λ axis), coloured by status.

    Args:
        result: an assessment from :func:`assess_reliability` of this session (it holds the profile and cells).
        path: the figure file.
        resolution: points per axis of the density map.
        title: the figure's title (default: the pfd and its upper bound).

    Returns:
        The path written.
    """
    if not isinstance(result, RAMResult):
        raise InputError(f"result must be a RAMResult, got {type(result).__name__}")
    if result.profile is None or result.cells is None or result.cell_ids is None:
        raise InputError("the result carries no profile or cells (it was not produced by assess_reliability here)")
    res = _int("resolution", resolution, 2)
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    from matplotlib.collections import PatchCollection
    from matplotlib.patches import Rectangle

    from bastion.report.plots import _save

    lam = result.lambdas()
    head = title or (
        f"pfd {result.pfd:.3g} (upper {result.upper:.3g} at {100 * result.confidence:g} %), ACU {result.acu:.3g}"
    )
    cells, prof = result.cells, result.profile
    fig, ax = plt.subplots(figsize=(6.4, 5.2))
    if isinstance(cells, GridCells) and cells.dim == 2 and prof.encoder is None:
        gx = np.linspace(cells.lower[0], cells.upper[0], res)
        gy = np.linspace(cells.lower[1], cells.upper[1], res)
        xx, yy = np.meshgrid(gx, gy)
        dens = prof.density(np.stack([xx.ravel(), yy.ravel()], axis=1)).reshape(res, res)
        extent = (cells.lower[0], cells.upper[0], cells.lower[1], cells.upper[1])
        im = ax.imshow(dens, origin="lower", extent=extent, cmap="viridis", aspect="auto")
        fig.colorbar(im, ax=ax, label="operational density (KDE)")
        ax.scatter(prof.points[:, 0], prof.points[:, 1], s=2, c="white", alpha=0.4, linewidths=0)
        fail = np.nonzero(lam > 0)[0]
        if fail.size:
            lo, hi = cells.boxes(result.cell_ids[fail])
            rects = [Rectangle((a[0], a[1]), b[0] - a[0], b[1] - a[1]) for a, b in zip(lo, hi)]
            alpha = 0.35 + 0.65 * np.clip(lam[fail], 0, 1)
            colours = [(1.0, 0.1, 0.1, float(a)) for a in alpha]
            ax.add_collection(PatchCollection(rects, facecolors=colours, edgecolors="red", linewidths=0.4))
        ax.set_xlabel("x[0]")
        ax.set_ylabel("x[1]")
        ax.set_xlim(extent[0], extent[1])
        ax.set_ylim(extent[2], extent[3])
    elif isinstance(cells, GridCells) and cells.dim == 1 and prof.encoder is None:
        gx = np.linspace(cells.lower[0], cells.upper[0], res)
        ax.plot(gx, prof.density(gx[:, None]), color="C0", label="operational density (KDE)")
        fail = np.nonzero(lam > 0)[0]
        if fail.size:
            lo, hi = cells.boxes(result.cell_ids[fail])
            for a, b, v in zip(lo[:, 0], hi[:, 0], lam[fail]):
                ax.axvspan(a, b, color="red", alpha=0.2 + 0.6 * float(min(v, 1.0)), linewidth=0)
        ax.set_xlabel("x")
        ax.set_ylabel("density")
        ax.legend(loc="upper right")
    else:
        mass = result.masses()
        colour = {"robust": "tab:green", "falsified": "tab:red", "unknown": "tab:gray"}
        for status, c in colour.items():
            sel = np.array([r.status == status for r in result.records], dtype=bool)
            if sel.any():
                ax.scatter(np.maximum(mass[sel], 1e-300), lam[sel], s=8, c=c, label=status, alpha=0.7)
        ax.set_xscale("log")
        ax.set_yscale("symlog", linthresh=1e-4)
        # λ is a probability: without this the symmetric-log axis mirrors an empty negative half below 0
        ax.set_ylim(0.0, 1.5)
        ax.set_xlabel("cell mass OP (renormalised)")
        ax.set_ylabel("cell unastuteness λ")
        ax.legend(loc="best")
    ax.set_title(head, fontsize=9)
    return _save(fig, path)
