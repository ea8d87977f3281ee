"""MC/DC-style coverage of neuron pairs (Sun, Huang, Kroening, Sharp, Hill & Ashmore, "Structural Test Coverage
Criteria for Deep Neural Networks", ACM TECS 18(5s), EMSOFT 2019; first as "Testing Deep Neural Networks",
arXiv:1803.04792, and implemented in DeepConcolic).

As modified condition/decision coverage asks of a program that each condition be shown to independently affect
its decision, these criteria ask of a network that each *condition* neuron ``c`` of layer ``k`` be shown to
independently affect each *decision* neuron ``d`` of layer ``k + 1``. An item is a pair ``(c, d)``; it is covered
by a *pair of test inputs* ``(x1, x2)``:

* ``ss`` sign-sign: ``c`` changes sign between ``x1`` and ``x2``, every other condition neuron of layer ``k``
  keeps its sign, and ``d`` changes sign;
* ``sv`` sign-value: as SS, but ``d`` keeps its sign and changes its value;
* ``vs`` value-sign: ``c`` keeps its sign and changes its value, every condition neuron of layer ``k`` keeps its
  sign, and ``d`` changes sign;
* ``vv`` value-value: as VS, but ``d`` keeps its sign and changes its value.

Definitions, with ``u(n, x)`` the neuron's value (the probed layer's output, under the criterion's granularity):

* the sign of a neuron is ``u > 0`` (for a ReLU output: whether the neuron is active);
* *sign change* ``sc(n, x1, x2)``: the signs differ;
* *value change* ``vc(n, x1, x2)``: no sign change and ``|u(n, x2) - u(n, x1)| > value_change * |u(n, x1)|``. The
  paper leaves the value function ``g`` as a parameter; here it is a relative change of more than ``value_change``
  (default 1: the value more than doubles), ``x1`` being the earlier of the two inputs (the lower global index: the
  seed a concolic step starts from). For positive values and ``value_change >= 1`` only a rise can qualify (a fall
  of more than ``|u(n, x1)|`` changes the sign): the ratio test ``u(n, x2) / u(n, x1) > 1 + value_change``.

Condition ratio (``cond_ratio``): requiring every other neuron of layer ``k`` to keep its sign is hard to meet in a
wide layer. DeepConcolic relaxes it (``--mcdc-cond-ratio``, in (0, 1], default 0.01 there): a pair of inputs is
accepted when the number ``m`` of condition neurons that change sign satisfies ``m == 1`` or
``m <= cond_ratio * |layer k|``. Here ``cond_ratio=None`` (default) is the paper's strict definition; a number in
(0, 1] allows ``max(1, floor(cond_ratio * |layer k|))`` sign changes in layer ``k``, each changed neuron counting as
the condition of SS/SV (so several pairs ``(c, d)`` are covered at once), and one fewer for VS/VV, whose condition
keeps its sign.

Which pairs. The layers under test are taken in order (``layers``, by default every activation module) and each
layer is paired with the next: every neuron of layer ``k`` with every neuron of layer ``k + 1``, the paper's
definition for fully connected layers. For a convolutional decision layer DeepConcolic restricts the conditions of
a decision neuron to its receptive field (the kernel window over all input channels); this implementation does
not infer receptive fields from arbitrary module graphs. Use ``granularity="channel"`` for convolution layers (a
channel is one neuron, its value the spatial mean of its map; after a ReLU, its sign says whether any element is
active): a convolution feeds every input channel into every output channel, so all channel pairs *are* the
connected pairs. With ``"element"`` every element pair counts, and "every other condition keeps its sign" runs over
the whole feature map. The number of pairs is capped by ``max_pairs`` (a clear error names the count).

Memory and time. Items are the pairs of each adjacent layer pair (8 bytes each, capped by ``max_pairs``). Since
items need pairs of inputs, the criterion keeps every input's neuron signs (SS) or values (the others) of the layers
under test, up to ``max_history`` inputs (a clear error beyond), so that a new batch is paired with every input
seen before and within itself, and two partial states merge into exactly the coverage of the union. Per batch of
``B`` inputs against ``H`` earlier ones, the sign-change counts of layer ``k`` for all ``B (H + B)`` input pairs are
one matrix product (``O(B (H + B) |layer k|)``); only the input pairs that pass the condition count are expanded,
into their covered ``(c, d)`` pairs, sparsely and in bounded chunks.

``first_covered_by`` credits the later input (higher index) of the covering pair. Items are decision-major: item
``d * |layer k| + c`` of decision layer ``k + 1`` (:meth:`MCDCCoverage.pair` decodes it).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from bastion.errors import InputError
from bastion.testing.coverage.base import CoverageMetric
from bastion.testing.coverage.deepgauge import _begin, _first_for, fold_items

__all__ = ["MCDCCoverage", "SignSignCoverage", "SignValueCoverage", "ValueSignCoverage", "ValueValueCoverage"]

PAPER = (
    "Sun, Huang, Kroening, Sharp, Hill & Ashmore, Structural Test Coverage Criteria for Deep Neural Networks, "
    "ACM TECS 18(5s) (EMSOFT), 2019"
)
#: elements per intermediate tensor (Hamming matrices, expanded pair events): bounds the working memory
_CHUNK = 1 << 22


def _check_ratio(value: Any, name: str) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 < float(value) <= 1.0:
        raise InputError(f"{name} must lie in (0, 1] (or be None for the paper's strict definition), got {value!r}")
    return float(value)


def _check_positive(value: Any, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (0.0 < float(value) < math.inf):
        raise InputError(f"{name} must be a finite number > 0, got {value!r}")
    return float(value)


def _check_count(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise InputError(f"{name} must be an integer >= 1, got {value!r}")
    return value


class MCDCCoverage(CoverageMetric):
    """Base class of the four MC/DC criteria (module docstring); ``condition`` / ``decision`` say which change.

    Args:
        cond_ratio: None (the paper's strict "every other condition keeps its sign") or a ratio in (0, 1] of
            layer ``k`` allowed to change sign (DeepConcolic's relaxation; module docstring).
        value_change: a value change is a relative change above this (default 1.0: more than doubles); SV, VS
            and VV only.
        layers: layers under test, at least two; adjacent ones are paired (``None``: every activation module).
        granularity: ``"element"`` or ``"channel"`` (module docstring on convolution layers).
        max_pairs: the most neuron pairs (items) over all layer pairs (default 2**22, 32 MiB of state).
        max_history: the most inputs whose signs or values are kept for pairing (default 10000).
    """

    paper = PAPER
    condition: ClassVar[str] = "sign"
    decision: ClassVar[str] = "sign"

    def __init__(
        self,
        *,
        cond_ratio: float | None = None,
        value_change: float = 1.0,
        layers: Sequence[str] | str | None = None,
        granularity: str = "element",
        max_pairs: int = 1 << 22,
        max_history: int = 10_000,
    ) -> None:
        self.cond_ratio = _check_ratio(cond_ratio, "cond_ratio")
        self.value_change = _check_positive(value_change, "value_change")
        self.max_pairs = _check_count(max_pairs, "max_pairs")
        self.max_history = _check_count(max_history, "max_history")
        super().__init__(layers=layers, granularity=granularity)
        self.history: dict[str, Tensor] = {}
        self.history_index = torch.zeros(0, dtype=torch.long)

    @property
    def uses_values(self) -> bool:
        return "value" in (self.condition, self.decision)

    def params(self) -> dict[str, Any]:
        out: dict[str, Any] = {"cond_ratio": self.cond_ratio}
        if self.uses_values:
            out["value_change"] = self.value_change
        return {**out, **super().params()}

    def bind(self, model: nn.Module) -> list[str]:
        layers = super().bind(model)
        if len(layers) < 2:
            raise InputError(
                f"the {self.name} criterion pairs neurons of adjacent layers: give at least two layers, got {layers}"
            )
        return layers

    def layer_pairs(self) -> list[tuple[str, str]]:
        """The (condition layer, decision layer) pairs: each layer under test with the next."""
        layers = self.layers or []
        return list(itertools.pairwise(layers))

    def pair(self, layer: str, item: int) -> tuple[str, int, int]:
        """Item ``item`` of decision layer ``layer`` as ``(condition layer, condition neuron, decision neuron)``."""
        cond = dict((d, c) for c, d in self.layer_pairs()).get(layer)
        if cond is None or cond not in self.history:
            raise InputError(f"{layer!r} is not a decision layer of this {self.name} coverage (or none seen yet)")
        width = self.history[cond].shape[1]
        total = self.first[layer].numel()
        if isinstance(item, bool) or not isinstance(item, int) or not 0 <= item < total:
            raise InputError(f"item must be an integer in [0, {total}) for layer {layer!r}, got {item!r}")
        return cond, item % width, item // width

    def max_changes(self, width: int) -> int:
        """How many condition neurons of a layer of ``width`` may change sign in an SS/SV pair (module doc)."""
        if self.cond_ratio is None:
            return 1
        return max(1, math.floor(self.cond_ratio * width + 1e-9))

    def satisfied(self, layer: str, values: Tensor) -> Tensor:
        raise InputError(f"the {self.name} criterion is covered by pairs of inputs: use update(), not satisfied()")

    # -- the pairing -----------------------------------------------------------------------------------------------
    def _encode(self, vals: dict[str, Tensor]) -> dict[str, Tensor]:
        """What is kept of each input: the signs (SS) or the values as float32 (the others)."""
        if self.uses_values:
            return {k: v.detach().to(torch.float32) for k, v in vals.items()}
        return {k: v.detach() > 0 for k, v in vals.items()}

    def _change(self, u1: Tensor, u2: Tensor, kind: str) -> Tensor:
        """Sign change, or value change (no sign change and a relative change above ``value_change``)."""
        if u1.dtype == torch.bool:
            return u1 != u2
        s1, s2 = u1 > 0, u2 > 0
        if kind == "sign":
            return s1 != s2
        return (s1 == s2) & ((u2 - u1).abs() > self.value_change * u1.abs())

    def update(self, acts: dict[str, Tensor], index: Tensor | None = None) -> Tensor:
        index, vals = _begin(self, acts, index)
        _check_consistent(self, self.history_index.shape[0], "the neuron values of")
        n = index.shape[0]
        enc = self._encode(vals)
        if self.history_index.shape[0] + n > self.max_history:
            raise InputError(
                f"the {self.name} criterion keeps every input to pair it with later ones and would hold "
                f"{self.history_index.shape[0] + n} inputs, more than max_history={self.max_history}: raise "
                "max_history (memory grows linearly, time quadratically) or measure fewer inputs"
            )
        self._check_items(enc)
        device = next(iter(enc.values())).device
        hist = {k: v.to(device) for k, v in self.history.items()}
        new = torch.zeros(n, dtype=torch.long)
        for cond, dec in self.layer_pairs():
            x = (hist[cond], hist[dec], self.history_index) if cond in hist else None
            new += self._fold_pairs(dec, x, (enc[cond], enc[dec], index), within=True)
        # rebound, never mutated in place: a shallow copy of this metric (a trial update) keeps its own history
        self.history = {k: torch.cat([hist[k], v]) if k in hist else v for k, v in enc.items()}
        self.history_index = torch.cat([self.history_index, index])
        self.inputs += n
        return new

    def _check_items(self, enc: dict[str, Tensor]) -> None:
        sizes = {dec: enc[cond].shape[1] * enc[dec].shape[1] for cond, dec in self.layer_pairs()}
        total = sum(sizes.values())
        if total > self.max_pairs:
            detail = ", ".join(f"{c} x {d}: {sizes[d]}" for c, d in self.layer_pairs())
            raise InputError(
                f"the {self.name} criterion would track {total} neuron pairs ({detail}), more than "
                f"max_pairs={self.max_pairs}: use granularity='channel' for convolution layers, fewer layers "
                "(layers=[...]) or raise max_pairs (8 bytes per pair)"
            )
        for dec, items in sizes.items():
            _first_for(self, dec, items)

    def _fold_pairs(
        self,
        dec_layer: str,
        x: tuple[Tensor, Tensor, Tensor] | None,
        y: tuple[Tensor, Tensor, Tensor],
        *,
        within: bool,
    ) -> Tensor:
        """Fold the pairs (earlier inputs ``x``) x (inputs ``y``), and the pairs within ``y`` if ``within``.

        ``x`` and ``y`` are ``(condition values, decision values, global indices)``. Returns the credit of ``y``.
        """
        yc, yd, yi = y
        credit = torch.zeros(yi.shape[0], dtype=torch.long)
        if x is None and not within:
            return credit
        nx = 0 if x is None else x[0].shape[0]
        if not within:
            ac, ad, ai = x  # type: ignore[misc]
        elif x is None:
            ac, ad, ai = yc, yd, yi
        else:
            ac, ad, ai = torch.cat([x[0], yc]), torch.cat([x[1], yd]), torch.cat([x[2], yi])
        h = ac.shape[0]
        if h == 0 or yc.shape[0] == 0:
            return credit
        first = self.first[dec_layer]
        width = yc.shape[1]
        device = yc.device
        ai_dev, yi_dev = ai.to(device), yi.to(device)
        most = self.max_changes(width)
        low, high = (1, most) if self.condition == "sign" else (0, most - 1)
        sa = (ac if ac.dtype == torch.bool else ac > 0).to(torch.float32)
        sa_count = sa.sum(dim=1)
        rows = max(1, _CHUNK // h)
        for r0 in range(0, yc.shape[0], rows):
            r1 = min(r0 + rows, yc.shape[0])
            sy = (yc[r0:r1] if yc.dtype == torch.bool else yc[r0:r1] > 0).to(torch.float32)
            # sign changes in layer k for every input pair: the Hamming distance |a| + |b| - 2 a.b, one product
            changes = sy.sum(dim=1)[:, None] + sa_count[None, :] - 2 * (sy @ sa.T)
            ok = (changes > low - 0.5) & (changes < high + 0.5)
            if within:  # a pair within y once: the partner comes earlier in y (history columns always pass)
                col = torch.arange(h, device=device)[None, :] - nx
                ok &= col < torch.arange(r0, r1, device=device)[:, None]
            py, pa = ok.nonzero(as_tuple=True)
            py = py + r0
            step = max(1, _CHUNK // (yc.shape[1] + yd.shape[1]))
            for s in range(0, py.shape[0], step):
                credit += self._fold_candidates(
                    first, width, (yc, yd, yi_dev), (ac, ad, ai_dev), py[s : s + step], pa[s : s + step], yi
                )
        return credit

    def _fold_candidates(
        self,
        first: Tensor,
        width: int,
        y: tuple[Tensor, Tensor, Tensor],
        a: tuple[Tensor, Tensor, Tensor],
        py: Tensor,
        pa: Tensor,
        credit_index: Tensor,
    ) -> Tensor:
        """Expand candidate input pairs (rows ``py`` of ``y``, ``pa`` of ``a``) into covered (c, d) pairs; fold them."""
        iy, ia = y[2][py], a[2][pa]
        y_first = (iy < ia)[:, None]
        c1 = torch.where(y_first, y[0][py], a[0][pa])
        c2 = torch.where(y_first, a[0][pa], y[0][py])
        d1 = torch.where(y_first, y[1][py], a[1][pa])
        d2 = torch.where(y_first, a[1][pa], y[1][py])
        cm = self._change(c1, c2, self.condition)
        dm = self._change(d1, d2, self.decision)
        who = torch.maximum(iy, ia)
        per = cm.sum(dim=1) * dm.sum(dim=1)
        keep = per > 0
        if not bool(keep.any()):
            return torch.zeros(credit_index.shape[0], dtype=torch.long)
        cm, dm, who, per = cm[keep], dm[keep], who[keep], per[keep]
        credit = torch.zeros(credit_index.shape[0], dtype=torch.long)
        cum = per.cumsum(0)
        start = 0
        while start < cm.shape[0]:  # sub-chunks of at most _CHUNK events (one candidate may exceed it alone)
            base = int(cum[start - 1]) if start else 0
            end = max(start + 1, int(torch.searchsorted(cum, base + _CHUNK, right=True)))
            item, by = _expand(cm[start:end], dm[start:end], who[start:end], width)
            credit += fold_items(first, item.cpu(), by.cpu(), credit_index)
            start = end
        return credit

    # -- state -----------------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            **super().state_dict(),
            "history": {k: v.cpu().clone() for k, v in self.history.items()},
            "history_index": self.history_index.clone(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.history = {k: v.clone() for k, v in state["history"].items()}
        self.history_index = state["history_index"].clone()

    def merge(self, other: CoverageMetric) -> CoverageMetric:
        """The coverage of the union, pairs across the two parts included (module docstring)."""
        merged = super().merge(other)
        assert isinstance(merged, MCDCCoverage) and isinstance(other, MCDCCoverage)
        size = self.history_index.shape[0] + other.history_index.shape[0]
        if size > self.max_history:
            raise InputError(
                f"the merged {self.name} coverage would keep {size} inputs, more than max_history={self.max_history}"
            )
        if self.history and other.history:
            device = next(iter(self.history.values())).device
            mine = {k: v.to(device) for k, v in self.history.items()}
            theirs = {k: v.to(device) for k, v in other.history.items()}
            for cond, dec in merged.layer_pairs():
                merged._fold_pairs(
                    dec,
                    (mine[cond], mine[dec], self.history_index),
                    (theirs[cond], theirs[dec], other.history_index),
                    within=False,
                )
            merged.history = {k: torch.cat([mine[k], theirs[k]]) for k in mine}
        else:
            merged.history = dict(self.history or other.history)
        merged.history_index = torch.cat([self.history_index, other.history_index])
        return merged


def _check_consistent(metric: CoverageMetric, kept: int, what: str) -> None:
    """Refuse a state whose extra part was lost, e.g. by a copy that took ``first`` and ``inputs`` only."""
    if kept != metric.inputs:
        raise InputError(
            f"the {metric.name} coverage counts {metric.inputs} inputs but keeps {what} {kept}: a copy of it took "
            "`first` and `inputs` without the rest of its state; copy a criterion whole (copy.deepcopy, or "
            "state_dict() / load_state_dict())"
        )


def _expand(cm: Tensor, dm: Tensor, who: Tensor, width: int) -> tuple[Tensor, Tensor]:
    """The (c, d) pairs of each candidate: every condition ``c`` with ``cm`` times every decision ``d`` with ``dm``.

    Returns the items ``d * width + c`` and the credited input of each, without a loop over candidates.
    """
    cm_row, cm_col = cm.nonzero(as_tuple=True)
    dm_col = dm.nonzero(as_tuple=True)[1]
    n_dec = dm.sum(dim=1)
    dec_start = n_dec.cumsum(0) - n_dec
    reps = n_dec[cm_row]
    total = int(reps.sum())
    rows = cm_row.repeat_interleave(reps)
    conds = cm_col.repeat_interleave(reps)
    offset = (reps.cumsum(0) - reps).repeat_interleave(reps)
    decs = dm_col[dec_start[rows] + torch.arange(total, device=cm.device) - offset]
    return decs * width + conds, who[rows]


class SignSignCoverage(MCDCCoverage):
    """Sign-sign coverage (SS): condition changes sign alone, decision changes sign (module docstring).

    Args:
        cond_ratio: None (strict) or a ratio in (0, 1] of layer ``k`` allowed to change sign (DeepConcolic).
        layers: layers under test, at least two (``None``: every activation module).
        granularity: ``"element"`` or ``"channel"``.
        max_pairs: the most neuron pairs (default 2**22).
        max_history: the most inputs kept for pairing (default 10000).
    """

    name = "ss"

    def __init__(
        self,
        *,
        cond_ratio: float | None = None,
        layers: Sequence[str] | str | None = None,
        granularity: str = "element",
        max_pairs: int = 1 << 22,
        max_history: int = 10_000,
    ) -> None:
        super().__init__(
            cond_ratio=cond_ratio, layers=layers, granularity=granularity, max_pairs=max_pairs, max_history=max_history
        )


class SignValueCoverage(MCDCCoverage):
    """Sign-value coverage (SV): condition changes sign alone, decision keeps its sign and changes its value."""

    name = "sv"
    decision = "value"


class ValueSignCoverage(MCDCCoverage):
    """Value-sign coverage (VS): condition changes value, no condition changes sign, decision changes sign."""

    name = "vs"
    condition = "value"


class ValueValueCoverage(MCDCCoverage):
    """Value-value coverage (VV): condition changes value, no condition changes sign, decision changes value."""

    name = "vv"
    condition = "value"
    decision = "value"
