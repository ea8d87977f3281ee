"""DeepGauge's coverage criteria (Ma, Juefei-Xu, Zhang, Sun, Xue, Li, Chen, Su, Li, Liu, Zhao & Wang,
"DeepGauge: Multi-Granularity Testing Criteria for Deep Learning Systems", ASE 2018).

Neuron-level criteria, which need each neuron's range ``[low_n, high_n]`` on a *profiling set* (the training data;
:meth:`~bastion.testing.coverage.base.CoverageMetric.profile` streams it once, keeping the running minimum and
maximum per neuron):

* ``kmnc`` -- k-multisection neuron coverage: ``[low_n, high_n]`` is cut into ``k`` sections of equal width and each
  section of each neuron is an item, covered when some input's value falls into it (the last section includes
  ``high_n``). Values outside ``[low_n, high_n]`` cover no section (they belong to NBC). A neuron whose profiled range
  is a single value (``low_n == high_n``: e.g. a ReLU that is never active on the training data) has sections of
  width 0 that no value covers; they stay in the total, as in the authors' code.
* ``nbc`` -- neuron boundary coverage: two items per neuron, the lower corner (a value ``< low_n``) and the upper
  corner (a value ``> high_n``).
* ``snac`` -- strong neuron activation coverage: one item per neuron, a value ``> high_n``.

Layer-level criteria, no profile:

* ``tknc`` -- top-k neuron coverage: per input and per layer, the ``k`` neurons with the largest values are covered.
* ``tknp`` -- top-k neuron patterns: the number of distinct patterns, a pattern being the tuple over the layers of the
  sets of top-k neurons of one input (see :class:`TopKNeuronPatterns` for what covered/total mean).

Ties in the top-k are broken towards the lower neuron index (a stable sort), so that results do not depend on the
device; with ReLU layers this matters when fewer than ``k`` neurons are active.

Neuron values follow the criterion's ``granularity``: ``"element"`` (default) makes every element of a convolution
map a neuron; ``"channel"`` makes a channel one neuron whose value is the spatial mean of its map. The latter is what
the code of DeepGauge's group does for convolution layers (``np.mean(layer_output[..., neuron_idx])`` in the
``coverage.py`` of DeepHunter, Xie, Ma et al., ISSTA 2019, which implements "KMNC, BKNC, TKNC, NBC, SNAC from
DeepGauge2.0"), as does the
PyTorch code of NeuraL-Coverage (Yuan et al., ICSE 2023); the paper itself speaks of neurons without saying.

Defaults: ``k = 1000`` sections for KMNC (the paper's setting, also DeepHunter's default); ``k = 1`` for TKNC and
TKNP (the paper evaluates k = 1, 2, 3; with 1 each input covers the fewest neurons).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from bastion.errors import InputError, ModelError
from bastion.testing.coverage.base import CoverageMetric, CoverageReport, NeuronTarget

__all__ = [
    "KMultisectionCoverage",
    "NeuronBoundaryCoverage",
    "StrongNeuronActivationCoverage",
    "TopKNeuronCoverage",
    "TopKNeuronPatterns",
    "fold_items",
]

PAPER = "Ma et al., DeepGauge: Multi-Granularity Testing Criteria for Deep Learning Systems, ASE 2018"
_BIG = torch.iinfo(torch.long).max


# -- shared helpers ---------------------------------------------------------------------------------------------
def fold_items(first: Tensor, item: Tensor, who: Tensor, index: Tensor) -> Tensor:
    """Fold sparse coverage events into a ``first`` state, in place; returns the credit of each batch input.

    The sparse counterpart of the base class's dense fold, for criteria with many items per neuron (KMNC's k
    sections) or items covered by pairs of inputs (MC/DC).

    Args:
        first: the state ``(items,)`` of one layer: the index of the first covering input, -1 where none.
        item: ``(E,)`` item numbers, one per event "input ``who[e]`` covers item ``item[e]``" (repeats allowed).
        who: ``(E,)`` the covering inputs' global indices.
        index: ``(N,)`` the global indices of the batch, to credit: each input gets the number of items that were
            uncovered before and that it covers first; an event whose input is not in ``index`` credits no one.
    """
    if not item.numel():
        return torch.zeros(index.shape[0], dtype=torch.long)
    if 8 * item.numel() >= first.numel():  # many events: one dense scatter over the items, no sort
        cand = torch.full_like(first, _BIG)
        cand.scatter_reduce_(0, item, who, reduce="amin")
        fresh = (first < 0) & (cand < _BIG)
        upd = fresh | (cand < first)  # or an earlier input (resumed or merged out of order)
        first[upd] = cand[upd]
        return _credit(cand[fresh], index)
    # few events: work on the touched items only, O(E log E) and not O(items) (KMNC has P * k items)
    touched, inv = torch.unique(item, return_inverse=True)
    cand = torch.full((touched.shape[0],), _BIG, dtype=torch.long)
    cand.scatter_reduce_(0, inv, who, reduce="amin")
    old = first[touched]
    fresh = old < 0
    upd = fresh | (cand < old)
    first[touched[upd]] = cand[upd]
    return _credit(cand[fresh], index)


def _credit(winners: Tensor, index: Tensor) -> Tensor:
    """How many of ``winners`` (global indices) each input of ``index`` is; winners not in ``index`` are ignored."""
    n = index.shape[0]
    if not winners.numel() or not n:
        return torch.zeros(n, dtype=torch.long)
    if bool((index[1:] - index[:-1] == 1).all()):  # the usual consecutive indices: positions by subtraction
        pos = winners - index[0]
        return torch.bincount(pos[(pos >= 0) & (pos < n)], minlength=n)
    order = index.argsort()
    ordered = index[order]
    pos = torch.searchsorted(ordered, winners).clamp_max(n - 1)
    ok = ordered[pos] == winners
    return torch.bincount(order[pos[ok]], minlength=n)


def _first_for(metric: CoverageMetric, layer: str, items: int) -> Tensor:
    """The layer's ``first`` state, created uncovered on first use; its size must not change."""
    if layer not in metric.first:
        metric.first[layer] = torch.full((items,), -1, dtype=torch.long)
    first = metric.first[layer]
    if first.shape[0] != items:
        raise ModelError(f"layer {layer!r} changed its number of items from {first.shape[0]} to {items}")
    return first


def _begin(metric: CoverageMetric, acts: dict[str, Tensor], index: Tensor | None) -> tuple[Tensor, dict[str, Tensor]]:
    """What the base ``update`` checks and prepares: profile present, layers bound, global indices, values."""
    if metric.needs_profile and not metric.profiled:
        raise InputError(
            f"the {metric.name} criterion needs a profiling set (the neurons' ranges): call profile(model, x) "
            "first, e.g. with the training data (profile=... in coverage())"
        )
    if metric.layers is None:
        raise InputError(f"bind the {metric.name} criterion to a model first (metric.bind(model))")
    missing = [n for n in metric.layers if n not in acts]
    if missing:
        raise InputError(f"the outputs of layer(s) {', '.join(map(repr, missing))} are missing from acts")
    n = acts[metric.layers[0]].shape[0]
    if index is None:
        index = torch.arange(metric.inputs, metric.inputs + n)
    index = index.to(torch.long).cpu()
    if index.shape != (n,):
        raise InputError(f"index must hold one global index per input, shape ({n},), got {tuple(index.shape)}")
    return index, metric.values({k: acts[k] for k in metric.layers})


def _check_k(k: Any, name: str = "k") -> int:
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise InputError(f"{name} must be an integer >= 1, got {k!r}")
    return k


def _top_k(values: Tensor, k: int) -> Tensor:
    """Indices ``(N, min(k, P))`` of the k largest values per row, ties towards the lower index."""
    return torch.sort(values, dim=1, descending=True, stable=True).indices[:, : min(k, values.shape[1])]


# -- criteria with a profile ------------------------------------------------------------------------------------
class _RangeCoverage(CoverageMetric):
    """A criterion that needs each neuron's range ``[low, high]`` on a profiling set (streaming min / max)."""

    paper = PAPER
    needs_profile = True

    def __init__(self, *, layers: Sequence[str] | str | None = None, granularity: str = "element") -> None:
        super().__init__(layers=layers, granularity=granularity)
        self._low: dict[str, Tensor] = {}
        self._high: dict[str, Tensor] = {}
        self._profile_inputs = 0

    def profile_batch(self, values: dict[str, Tensor]) -> None:
        low, high = dict(self._low), dict(self._high)  # rebound, never mutated: copies of the state stay apart
        for layer, v in values.items():
            if v.shape[0] == 0:
                continue
            lo, hi = v.amin(dim=0).detach().cpu(), v.amax(dim=0).detach().cpu()
            if layer in low:
                if low[layer].shape != lo.shape:
                    raise ModelError(
                        f"layer {layer!r} gave {lo.numel()} neuron values while profiling, earlier {low[layer].numel()}"
                    )
                lo, hi = torch.minimum(low[layer], lo), torch.maximum(high[layer], hi)
            low[layer], high[layer] = lo, hi
        self._low, self._high = low, high
        self._profile_inputs += next((v.shape[0] for v in values.values()), 0)

    def neuron_range(self, layer: str) -> tuple[Tensor, Tensor]:
        """The profiled ``(low, high)`` of the layer's neurons, each ``(P,)``."""
        if not self.profiled:
            raise InputError(f"the {self.name} criterion has not been profiled: call profile(model, x) first")
        if layer not in self._low:
            raise InputError(
                f"layer {layer!r} has no profiled range (the profiling set was empty, or the layer was not probed "
                "while profiling): profile on at least one input with the same layers"
            )
        return self._low[layer], self._high[layer]

    def _bounds(self, layer: str, values: Tensor) -> tuple[Tensor, Tensor]:
        low, high = self.neuron_range(layer)
        if low.shape[0] != values.shape[1]:
            raise ModelError(
                f"layer {layer!r} has {values.shape[1]} neurons but was profiled with {low.shape[0]} (another "
                "model, input size or granularity?)"
            )
        return low.to(values)[None], high.to(values)[None]

    def profile_state(self) -> Any:
        if not self.profiled:
            return None
        return {
            "low": {k: v.clone() for k, v in self._low.items()},
            "high": {k: v.clone() for k, v in self._high.items()},
            "inputs": self._profile_inputs,
        }

    def load_profile_state(self, state: Any) -> None:
        if state is None:
            self._low, self._high, self._profile_inputs, self.profiled = {}, {}, 0, False
            return
        if not isinstance(state, dict) or not {"low", "high"} <= set(state):
            raise InputError(f"a {self.name} profile must be a dict with 'low' and 'high' ranges per layer")
        self._low = {k: v.clone() for k, v in state["low"].items()}
        self._high = {k: v.clone() for k, v in state["high"].items()}
        self._profile_inputs = int(state.get("inputs", 0))
        self.profiled = True

    def _check_item(self, layer: str, item: int, per_neuron: int) -> tuple[int, int, Tensor, Tensor]:
        low, high = self.neuron_range(layer)
        total = low.shape[0] * per_neuron
        if isinstance(item, bool) or not isinstance(item, int) or not 0 <= item < total:
            raise InputError(f"item must be an integer in [0, {total}) for layer {layer!r}, got {item!r}")
        neuron, j = divmod(item, per_neuron)
        return neuron, j, low, high


class KMultisectionCoverage(_RangeCoverage):
    """k-multisection neuron coverage (KMNC): ``k`` equal sections of each neuron's profiled range (module doc).

    Items are neuron-major (``neuron * k + section``). :meth:`update` folds the section of each (input, neuron)
    sparsely (memory ``O(N P)`` per batch, not ``O(N P k)``); :meth:`satisfied` gives the same as a dense matrix.

    Args:
        k: the number of sections per neuron (default 1000, the paper's).
        layers: layers under test (``None``: every activation module).
        granularity: ``"element"`` or ``"channel"`` (module doc).
    """

    name = "kmnc"

    def __init__(
        self, *, k: int = 1000, layers: Sequence[str] | str | None = None, granularity: str = "element"
    ) -> None:
        self.k = _check_k(k)
        super().__init__(layers=layers, granularity=granularity)
        self.item_names = tuple(f"section {i}" for i in range(self.k))

    def params(self) -> dict[str, Any]:
        return {"k": self.k, **super().params()}

    def sections(self, layer: str, values: Tensor) -> Tensor:
        """The section ``(N, P)`` of each value of ``layer``, -1 outside ``[low, high]`` or for an empty range."""
        low, high = self._bounds(layer, values)
        span = high - low
        inside = (span > 0) & (values >= low) & (values <= high)
        sec = ((values - low) / span.where(span > 0, torch.ones_like(span)) * self.k).floor()
        sec = sec.clamp(0, self.k - 1).to(torch.long)  # the upper bound belongs to the last section
        return torch.where(inside, sec, torch.full_like(sec, -1))

    def satisfied(self, layer: str, values: Tensor) -> Tensor:
        sec = self.sections(layer, values)
        hit = torch.zeros(*sec.shape, self.k, dtype=torch.bool, device=sec.device)
        hit.scatter_(2, sec.clamp_min(0)[..., None], (sec >= 0)[..., None])
        return hit.flatten(1)

    def update(self, acts: dict[str, Tensor], index: Tensor | None = None) -> Tensor:
        index, vals = _begin(self, acts, index)
        new = torch.zeros(index.shape[0], dtype=torch.long)
        for layer in self.layers or []:
            sec = self.sections(layer, vals[layer])
            rows, cols = (sec >= 0).nonzero(as_tuple=True)
            item = (cols * self.k + sec[rows, cols]).cpu()
            first = _first_for(self, layer, sec.shape[1] * self.k)
            new += fold_items(first, item, index[rows.cpu()], index)
        self.inputs += index.shape[0]
        return new

    def target(self, layer: str, item: int) -> NeuronTarget:
        """Section ``item % k`` of neuron ``item // k``: ``low + s w <= value < low + (s + 1) w``, ``w`` the width."""
        neuron, s, low, high = self._check_item(layer, item, self.k)
        lo, hi = float(low[neuron]), float(high[neuron])
        width = (hi - lo) / self.k
        return NeuronTarget(layer, neuron, lo + s * width, lo + (s + 1) * width)


class NeuronBoundaryCoverage(_RangeCoverage):
    """Neuron boundary coverage (NBC): each neuron's lower corner (value < low) and upper corner (value > high).

    Items are neuron-major, ``neuron * 2 + j`` with ``j = 0`` the lower and ``j = 1`` the upper corner.

    Args:
        layers: layers under test (``None``: every activation module).
        granularity: ``"element"`` or ``"channel"`` (module doc).
    """

    name = "nbc"
    item_names = ("lower", "upper")

    def satisfied(self, layer: str, values: Tensor) -> Tensor:
        low, high = self._bounds(layer, values)
        return torch.stack([values < low, values > high], dim=2).flatten(1)

    def target(self, layer: str, item: int) -> NeuronTarget:
        """The lower corner ``value < low`` or the upper corner ``value > high`` of the item's neuron."""
        neuron, j, low, high = self._check_item(layer, item, 2)
        if j == 0:
            return NeuronTarget(layer, neuron, -math.inf, float(low[neuron]))
        return NeuronTarget(layer, neuron, float(high[neuron]), math.inf)


class StrongNeuronActivationCoverage(_RangeCoverage):
    """Strong neuron activation coverage (SNAC): neurons some input drives above their profiled maximum.

    Args:
        layers: layers under test (``None``: every activation module).
        granularity: ``"element"`` or ``"channel"`` (module doc).
    """

    name = "snac"

    def satisfied(self, layer: str, values: Tensor) -> Tensor:
        _, high = self._bounds(layer, values)
        return values > high

    def target(self, layer: str, item: int) -> NeuronTarget:
        """Neuron ``item`` above its profiled maximum."""
        neuron, _, _, high = self._check_item(layer, item, 1)
        return NeuronTarget(layer, neuron, float(high[neuron]), math.inf)


# -- layer-level criteria ---------------------------------------------------------------------------------------
class TopKNeuronCoverage(CoverageMetric):
    """Top-k neuron coverage (TKNC): neurons that are among the ``k`` most active of their layer for some input.

    Args:
        k: neurons covered per input and layer (default 1; the paper evaluates 1, 2 and 3).
        layers: layers under test (``None``: every activation module).
        granularity: ``"element"`` or ``"channel"`` (module doc).
    """

    name = "tknc"
    paper = PAPER

    def __init__(self, *, k: int = 1, layers: Sequence[str] | str | None = None, granularity: str = "element") -> None:
        self.k = _check_k(k)
        super().__init__(layers=layers, granularity=granularity)

    def params(self) -> dict[str, Any]:
        return {"k": self.k, **super().params()}

    def satisfied(self, layer: str, values: Tensor) -> Tensor:
        hit = torch.zeros(values.shape, dtype=torch.bool, device=values.device)
        return hit.scatter_(1, _top_k(values, self.k), True)


class TopKNeuronPatterns(CoverageMetric):
    """Top-k neuron patterns (TKNP): the distinct patterns of top-k neurons the inputs show.

    The pattern of an input is the tuple, over the layers under test, of the *sets* of its top-k neurons. TKNP is a
    count, not a covered/total ratio; here the items are the patterns discovered so far:

    * ``covered`` is the number of distinct patterns (the paper's TKNP value), ``first_covered_by["patterns"]`` the
      first input showing each, in the lexicographic order of the patterns (:attr:`patterns`);
    * ``total`` is the number of inputs seen, the most patterns they could show, so that ``ratio`` is the fraction
      of inputs that showed a pattern no earlier input did. It is no coverage ratio: it can fall when inputs are
      added, while ``covered`` never does.

    Args:
        k: neurons per layer in a pattern (default 1; the paper evaluates 1, 2 and 3).
        layers: layers under test (``None``: every activation module).
        granularity: ``"element"`` or ``"channel"`` (module doc).
    """

    name = "tknp"
    paper = PAPER

    def __init__(self, *, k: int = 1, layers: Sequence[str] | str | None = None, granularity: str = "element") -> None:
        self.k = _check_k(k)
        super().__init__(layers=layers, granularity=granularity)
        self.patterns = torch.zeros(0, 0, dtype=torch.long)

    def params(self) -> dict[str, Any]:
        return {"k": self.k, **super().params()}

    def pattern(self, values: dict[str, Tensor]) -> Tensor:
        """The patterns ``(N, W)`` of a batch of neuron values: each layer's top-k indices, sorted, side by side."""
        return torch.cat([_top_k(values[k], self.k).sort(dim=1).values for k in self.layers or []], dim=1).cpu()

    def satisfied(self, layer: str, values: Tensor) -> Tensor:
        raise InputError("top-k patterns span all the layers under test: use update(), not satisfied()")

    def update(self, acts: dict[str, Tensor], index: Tensor | None = None) -> Tensor:
        index, vals = _begin(self, acts, index)
        pats = self.pattern(vals)
        new = self._add(pats, index, index)
        self.inputs += index.shape[0]
        return new

    def _add(self, pats: Tensor, who: Tensor, index: Tensor) -> Tensor:
        """Union of the known patterns with ``pats`` (shown first by ``who``); the credit of ``index``."""
        old = self.patterns
        first = self.first.get("patterns", torch.zeros(0, dtype=torch.long))
        if first.shape[0] != old.shape[0]:
            raise InputError(
                f"the {self.name} coverage has {first.shape[0]} first inputs for {old.shape[0]} patterns: a copy of "
                "it took `first` without its patterns; copy a criterion whole (copy.deepcopy, or state_dict() / "
                "load_state_dict())"
            )
        if old.numel() and old.shape[1] != pats.shape[1]:
            raise ModelError(f"patterns changed width from {old.shape[1]} to {pats.shape[1]} (another model?)")
        allp = torch.cat([old.reshape(-1, pats.shape[1]), pats])
        uniq, inv = torch.unique(allp, dim=0, return_inverse=True)
        merged = torch.full((uniq.shape[0],), _BIG, dtype=torch.long)
        merged.scatter_reduce_(0, inv, torch.cat([first, who]), reduce="amin")
        known = torch.zeros(uniq.shape[0], dtype=torch.bool)
        known[inv[: old.shape[0]]] = True
        self.patterns = uniq  # rebound: a shallow copy of this metric keeps its own patterns
        self.first = {"patterns": merged}
        return _credit(merged[~known], index)

    def report(self) -> CoverageReport:
        first = self.first.get("patterns", torch.zeros(0, dtype=torch.long))
        count = int(first.numel())
        return CoverageReport(
            metric=self.name,
            params=self.params(),
            covered=count,
            total=self.inputs,
            per_layer={"patterns": (count, self.inputs)},
            inputs=self.inputs,
            first_covered_by={"patterns": first.clone()},
        )

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "patterns": self.patterns.clone()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.patterns = state["patterns"].clone()

    def merge(self, other: CoverageMetric) -> CoverageMetric:
        if (
            not isinstance(other, TopKNeuronPatterns)
            or type(other) is not type(self)
            or other.params() != self.params()
        ):
            raise InputError(f"cannot merge {other!r} into {self!r}: different criteria or parameters")
        merged = type(self).__new__(type(self))
        merged.__dict__.update(self.__dict__)
        pats = other.patterns
        who = other.first.get("patterns", torch.zeros(0, dtype=torch.long))
        if pats.numel():
            merged._add(pats, who, torch.zeros(0, dtype=torch.long))
        merged.first = {k: v.clone() for k, v in merged.first.items()}
        merged.inputs = self.inputs + other.inputs
        return merged
