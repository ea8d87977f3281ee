"""The machinery every coverage criterion shares: layer probes, the streaming coverage state, the report.

A *coverage criterion* splits the behaviour of a network into *items* (a neuron being active, a neuron's value
falling into one of k sections of its profiled range, a pair of neurons changing sign together, ...) and counts
how many of them a test set exercises. Every criterion here is computed the same way:

1. a :class:`LayerProbe` records the outputs of the layers under test with forward hooks during one batched
   forward pass (no per-sample loop);
2. the criterion turns each layer's output into a boolean matrix ``(inputs, items)`` (:meth:`CoverageMetric.satisfied`)
   and the base class folds it into its state: which items are covered, and by which input first;
3. the state is *streaming*: updated batch by batch, saved (:meth:`CoverageMetric.state_dict`), merged with another
   partial state of the same criterion (:meth:`CoverageMetric.merge`, the union of the inputs) and resumed.

Layers are named as in ``model.named_modules()``. By default they are every activation module (ReLU and its
relatives, sigmoid, tanh) and, when the model has none (activations called as functions), every linear and
convolution output but the last (the logits are not neurons under test). A name ending in ``":input"``
(:data:`INPUT_SUFFIX`) probes the *input* of that module instead of its output (the recurrent criteria recompute
an LSTM's steps from it).

Neurons of a convolution layer: with ``granularity="element"`` every element of the feature map is a neuron (as
DeepConcolic and DeepGauge's element-wise variant count them); with ``"channel"`` a channel is one neuron whose value
is the spatial mean of its map (DeepXplore's convention). Fully connected layers are the same under both.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from bastion.errors import InputError, ModelError

__all__ = [
    "ACTIVATIONS",
    "INPUT_SUFFIX",
    "CoverageMetric",
    "CoverageReport",
    "LayerProbe",
    "NeuronTarget",
    "default_layers",
    "neuron_values",
    "resolve_layers",
]

#: Module types whose outputs are "activations" (the default layers under test).
ACTIVATIONS: tuple[type[nn.Module], ...] = (
    nn.ReLU,
    nn.ReLU6,
    nn.LeakyReLU,
    nn.PReLU,
    nn.ELU,
    nn.SELU,
    nn.CELU,
    nn.GELU,
    nn.SiLU,
    nn.Mish,
    nn.Softplus,
    nn.Hardtanh,
    nn.Sigmoid,
    nn.Tanh,
)
_AFFINE: tuple[type[nn.Module], ...] = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
GRANULARITIES = ("element", "channel")
#: A layer name ending in this suffix probes the module's (first positional) input instead of its output.
INPUT_SUFFIX = ":input"


def _module_name(layer: str) -> str:
    return layer[: -len(INPUT_SUFFIX)] if layer.endswith(INPUT_SUFFIX) else layer


def default_layers(model: nn.Module) -> list[str]:
    """Every activation module of ``model``; without any, every linear/conv layer but the last (see module doc)."""
    named = [(n, m) for n, m in model.named_modules() if n]
    acts = [n for n, m in named if isinstance(m, ACTIVATIONS)]
    if acts:
        return acts
    affine = [n for n, m in named if isinstance(m, _AFFINE)]
    return affine[:-1]


def resolve_layers(model: nn.Module, layers: Sequence[str] | str | None) -> list[str]:
    """The layer names to probe: ``layers`` checked against the model, or :func:`default_layers`.

    Raises:
        InputError: an unknown name (the valid names are listed), or a model with no hookable layer.
    """
    names = {n: m for n, m in model.named_modules() if n}
    if layers is None:
        chosen = default_layers(model)
        if not chosen:
            raise ModelError(
                f"{type(model).__name__} has no activation, linear or convolution module to measure coverage on; "
                "name the layers to probe with layers=[...] (names as in model.named_modules())"
            )
        return chosen
    if isinstance(layers, str):
        layers = [s.strip() for s in layers.split(",") if s.strip()]
    chosen = list(dict.fromkeys(layers))
    unknown = [n for n in chosen if _module_name(n) not in names]
    if unknown:
        raise InputError(
            f"unknown layer name(s) {', '.join(map(repr, unknown))}; the model's layers are: {', '.join(names)}"
        )
    if not chosen:
        raise InputError("layers is empty: name at least one layer, or pass None for the default layers")
    return chosen


def neuron_values(out: Tensor, granularity: str) -> Tensor:
    """A layer output ``(N, ...)`` as neuron values ``(N, P)`` (see the module docstring for ``granularity``)."""
    if out.dim() >= 3 and granularity == "channel":
        return out.flatten(2).mean(dim=2)
    return out.flatten(1)


class LayerProbe:
    """Records the outputs of named layers during forward passes (forward hooks, removed on exit).

    Usage::

        with LayerProbe(model, ["1", "4"]) as probe:
            logits = model(x)
            acts = probe.outputs          # {"1": Tensor (N, ...), "4": ...}

    Outputs are detached unless ``keep_graph`` (gradient-guided generators differentiate through them). A layer
    that returns a tuple (an LSTM) is recorded as its first element. ``root`` is the module the layer names refer
    to when ``model`` wraps it (a query counter); by default ``model`` itself.
    """

    def __init__(
        self, model: nn.Module, layers: Sequence[str], *, keep_graph: bool = False, root: nn.Module | None = None
    ) -> None:
        modules = dict((root or model).named_modules())
        self.model = model
        self.layers = list(layers)
        self._modules = [modules[_module_name(n)] for n in self.layers]
        self.keep_graph = keep_graph
        self.outputs: dict[str, Tensor] = {}
        self._handles: list[Any] = []

    def _hook(self, name: str) -> Any:
        def hook(_module: nn.Module, inputs: Any, output: Any) -> None:
            if name.endswith(INPUT_SUFFIX):
                out, what = (inputs[0] if inputs else None), "received"
            else:
                out, what = (output[0] if isinstance(output, (tuple, list)) else output), "returned"
            if not isinstance(out, Tensor):
                raise ModelError(f"layer {name!r} {what} {type(out).__name__}, not a tensor: it cannot be probed")
            self.outputs[name] = out if self.keep_graph else out.detach()

        return hook

    def __enter__(self) -> LayerProbe:
        self._handles = [m.register_forward_hook(self._hook(n)) for n, m in zip(self.layers, self._modules)]
        return self

    def __exit__(self, *exc: object) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def run(self, x: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """One forward pass: ``(logits, {layer: output})``; every probed layer must have produced an output."""
        self.outputs = {}
        logits = self.model(x)
        missing = [n for n in self.layers if n not in self.outputs]
        if missing:
            raise ModelError(
                f"layer(s) {', '.join(map(repr, missing))} produced no output during the forward pass (unused "
                "modules): choose layers that the model calls"
            )
        return logits, dict(self.outputs)


@dataclass
class CoverageReport:
    """What a criterion covered.

    Attributes:
        metric: the criterion's registry name.
        params: its parameters.
        covered: number of items covered.
        total: number of items.
        per_layer: ``{layer: (covered, total)}``.
        inputs: number of test inputs folded in.
        first_covered_by: ``{layer: LongTensor (items,)}``, the index of the first input covering each item, -1
            where none did.
        item_names: ``{layer: names}`` of the items per neuron (e.g. the k sections), or None for one item per neuron.
    """

    metric: str
    params: dict[str, Any]
    covered: int
    total: int
    per_layer: dict[str, tuple[int, int]]
    inputs: int
    first_covered_by: dict[str, Tensor] = field(repr=False)
    item_names: tuple[str, ...] | None = None

    @property
    def ratio(self) -> float:
        """``covered / total`` (0 when there are no items)."""
        return self.covered / self.total if self.total else 0.0

    def uncovered(self, limit: int | None = None) -> list[tuple[str, int, str | None]]:
        """The uncovered items as ``(layer, neuron, item)``, in layer and neuron order (at most ``limit``)."""
        out: list[tuple[str, int, str | None]] = []
        m = len(self.item_names) if self.item_names else 1
        for layer, first in self.first_covered_by.items():
            for flat in (first < 0).nonzero().flatten().tolist():
                out.append((layer, flat // m, self.item_names[flat % m] if self.item_names else None))
                if limit is not None and len(out) >= limit:
                    return out
        return out

    def covered_by(self) -> dict[int, int]:
        """``{input index: number of items it covered first}``: which test inputs covered what."""
        counts: dict[int, int] = {}
        for first in self.first_covered_by.values():
            idx, n = torch.unique(first[first >= 0], return_counts=True)
            for i, c in zip(idx.tolist(), n.tolist()):
                counts[i] = counts.get(i, 0) + c
        return dict(sorted(counts.items()))

    def to_dict(self, *, uncovered_limit: int = 100) -> dict[str, Any]:
        return {
            "metric": self.metric,
            "params": self.params,
            "covered": self.covered,
            "total": self.total,
            "ratio": self.ratio,
            "inputs": self.inputs,
            "per_layer": {k: {"covered": c, "total": t} for k, (c, t) in self.per_layer.items()},
            "uncovered": [list(u) for u in self.uncovered(uncovered_limit)],
            "covered_by": {str(k): v for k, v in self.covered_by().items()},
        }

    def line(self) -> str:
        return (
            f"{self.metric:<6} {100 * self.ratio:6.2f} %  ({self.covered} of {self.total} items, {self.inputs} inputs)"
        )


@dataclass(frozen=True)
class NeuronTarget:
    """A requirement on one neuron's value, ``lower < value <= upper`` (or ``<`` / ``>=`` as ``strict`` says).

    What a concolic generator solves for: the criteria whose items are conditions on single neurons (NC, KMNC,
    NBC, SNAC) state each uncovered item this way (:meth:`CoverageMetric.target`).

    Attributes:
        layer: the layer's name; ``neuron`` the neuron's flat index in :func:`neuron_values` order.
        lower, upper: the bounds (``-inf`` / ``inf`` for none).
    """

    layer: str
    neuron: int
    lower: float
    upper: float


class CoverageMetric:
    """Base class of the coverage criteria: streaming state, merge, save/resume and the report.

    A subclass sets ``name`` and ``paper``, validates its parameters in ``__init__`` (calling ``super().__init__``
    with the layers and granularity) and implements :meth:`satisfied`. Criteria whose items need the range of each
    neuron on a profiling set (``needs_profile = True``) also implement :meth:`profile_batch` and read the profile
    in :meth:`satisfied`; :meth:`profile` drives it. Criteria whose items are not a per-input test (pairs of
    inputs, patterns) override :meth:`update` and :meth:`_layer_items`.

    Args:
        layers: layer names to probe (``None``: :func:`default_layers`), resolved when the model is first seen.
        granularity: ``"element"`` or ``"channel"`` (module docstring).
    """

    name: ClassVar[str] = ""
    paper: ClassVar[str] = ""
    needs_profile: ClassVar[bool] = False
    #: names of the items of one neuron (e.g. the k sections); None for one item per neuron
    item_names: tuple[str, ...] | None = None

    def __init__(self, *, layers: Sequence[str] | str | None = None, granularity: str = "element") -> None:
        if granularity not in GRANULARITIES:
            raise InputError(f"granularity must be one of {', '.join(GRANULARITIES)}, got {granularity!r}")
        self.granularity = granularity
        self._layers_given = layers
        self.layers: list[str] | None = None
        self.first: dict[str, Tensor] = {}
        self.inputs = 0
        self.profiled = False

    # -- configuration -----------------------------------------------------------------------------------------
    def params(self) -> dict[str, Any]:
        """The criterion's parameters (reprs, run keys, reports); subclasses add theirs."""
        return {"granularity": self.granularity, "layers": self.layers or self._layers_given}

    def __repr__(self) -> str:
        opts = ", ".join(f"{k}={v!r}" for k, v in self.params().items() if k != "layers")
        return f"{type(self).__name__}({opts})"

    def bind(self, model: nn.Module) -> list[str]:
        """Resolve the layers on ``model`` (once); returns them."""
        if self.layers is None:
            self.layers = resolve_layers(model, self._layers_given)
        return self.layers

    # -- profiling (criteria with needs_profile) ---------------------------------------------------------------
    def profile_batch(self, values: dict[str, Tensor]) -> None:
        """Fold one batch of neuron values ``{layer: (N, P)}`` of the profiling set into the profile."""
        raise NotImplementedError

    def profile(self, model: nn.Module, x: Tensor, *, batch_size: int = 256) -> CoverageMetric:
        """Profile the neurons on the inputs ``x`` (typically the training set); returns ``self``."""
        if not self.needs_profile:
            return self
        layers = self.bind(model)
        device = next(iter(model.parameters()), torch.empty(0)).device
        with torch.no_grad(), LayerProbe(model, layers) as probe:
            for s in range(0, x.shape[0], batch_size):
                _, acts = probe.run(x[s : s + batch_size].to(device))
                self.profile_batch(self.values(acts))
        self.profiled = True
        return self

    # -- the per-batch test --------------------------------------------------------------------------------------
    def values(self, acts: dict[str, Tensor]) -> dict[str, Tensor]:
        """Layer outputs as neuron values ``{layer: (N, P)}`` under this criterion's granularity."""
        return {k: neuron_values(v, self.granularity) for k, v in acts.items()}

    def satisfied(self, layer: str, values: Tensor) -> Tensor:
        """``(N, items of the layer)`` booleans: which inputs of the batch satisfy which item of ``layer``.

        ``values`` are the layer's neuron values ``(N, P)``; items are neuron-major (``neuron * m + item``).
        """
        raise NotImplementedError

    def update(self, acts: dict[str, Tensor], index: Tensor | None = None) -> Tensor:
        """Fold a batch of layer outputs into the coverage; returns how many items each input covered first (N,).

        Args:
            acts: ``{layer: output (N, ...)}`` from a :class:`LayerProbe`.
            index: global indices of the inputs (N,), for ``first_covered_by``; by default they continue the count
                of inputs seen so far.
        """
        if self.needs_profile and not self.profiled:
            raise InputError(
                f"the {self.name} criterion needs a profiling set (the neurons' ranges): call profile(model, x) "
                "first, e.g. with the training data (profile=... in coverage())"
            )
        assert self.layers is not None, "bind(model) first"
        n = next(iter(acts.values())).shape[0]
        if index is None:
            index = torch.arange(self.inputs, self.inputs + n)
        index = index.to(torch.long).cpu()
        new = torch.zeros(n, dtype=torch.long)
        vals = self.values(acts)
        for layer in self.layers:
            hit = self.satisfied(layer, vals[layer]).cpu()
            new += self._fold(layer, hit, index)
        self.inputs += n
        return new

    def _fold(self, layer: str, hit: Tensor, index: Tensor) -> Tensor:
        """OR ``hit`` (N, items) into the layer's state; the first input (lowest index) is credited."""
        items = hit.shape[1]
        if layer not in self.first:
            self.first[layer] = torch.full((items,), -1, dtype=torch.long)
        first = self.first[layer]
        if first.shape[0] != items:
            raise ModelError(f"layer {layer!r} changed its number of items from {first.shape[0]} to {items}")
        # rows in increasing index order, so that the first True of a column is its lowest-index input
        if index.numel() > 1 and bool((index[1:] < index[:-1]).any()):
            order = index.argsort()
            hit, index = hit[order], index[order]
        else:
            order = None
        any_hit = hit.any(dim=0)
        row = hit.to(torch.uint8).argmax(dim=0)  # argmax returns the first maximal entry
        cand = index[row]
        fresh = (first < 0) & any_hit
        improved = (first >= 0) & any_hit & (cand < first)  # an earlier input (resumed or merged out of order)
        first[fresh | improved] = cand[fresh | improved]
        # credit per input: items it covers first in this batch
        credit = torch.bincount(row[fresh], minlength=hit.shape[0])
        if order is not None:
            credit = torch.zeros_like(credit).index_add_(0, order, credit)
        return credit

    def target(self, layer: str, item: int) -> NeuronTarget:
        """The requirement of an item as a condition on one neuron's value (for concolic testing).

        Raises:
            InputError: the criterion's items are not conditions on single neurons (pairs, patterns).
        """
        raise InputError(f"the {self.name} criterion has no per-neuron requirements to solve for")

    # -- state ---------------------------------------------------------------------------------------------------
    def report(self) -> CoverageReport:
        per_layer = {k: (int((v >= 0).sum()), int(v.numel())) for k, v in self.first.items()}
        return CoverageReport(
            metric=self.name,
            params=self.params(),
            covered=sum(c for c, _ in per_layer.values()),
            total=sum(t for _, t in per_layer.values()),
            per_layer=per_layer,
            inputs=self.inputs,
            first_covered_by={k: v.clone() for k, v in self.first.items()},
            item_names=self.item_names,
        )

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume or merge: parameters, profile, covered items and their first inputs."""
        return {
            "metric": self.name,
            "params": self.params(),
            "first": {k: v.clone() for k, v in self.first.items()},
            "inputs": self.inputs,
            "profile": self.profile_state(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("metric") != self.name:
            raise InputError(f"a saved {state.get('metric')!r} coverage cannot be loaded into {self.name!r}")
        mine = {k: v for k, v in self.params().items() if k != "layers"}
        theirs = {k: v for k, v in state["params"].items() if k != "layers"}
        if mine != theirs:
            raise InputError(f"the saved coverage has parameters {theirs}, this one {mine}")
        self.layers = list(state["params"]["layers"]) if state["params"]["layers"] is not None else None
        self.first = {k: v.clone() for k, v in state["first"].items()}
        self.inputs = int(state["inputs"])
        self.load_profile_state(state.get("profile"))

    def profile_state(self) -> Any:
        """The profile (criteria with ``needs_profile``); None otherwise."""
        return None

    def load_profile_state(self, state: Any) -> None:
        if state is not None:
            raise InputError(f"{self.name} takes no profile")

    def merge(self, other: CoverageMetric) -> CoverageMetric:
        """A new coverage state covering the union of the inputs of ``self`` and ``other``.

        Input indices must be global (the same index for the same input in both); the first covering input of an
        item is the lower of the two. Both must be the same criterion with the same parameters and profile.
        """
        if type(other) is not type(self) or other.params() != self.params():
            raise InputError(f"cannot merge {other!r} into {self!r}: different criteria or parameters")
        a, b = self.profile_state(), other.profile_state()
        if not _same(a, b):
            raise InputError(f"cannot merge two {self.name} coverages profiled on different data")
        merged = type(self).__new__(type(self))
        merged.__dict__.update({k: v for k, v in self.__dict__.items()})
        merged.first = {}
        for layer in dict.fromkeys([*self.first, *other.first]):
            fa, fb = self.first.get(layer), other.first.get(layer)
            if fa is None or fb is None:
                merged.first[layer] = (fa if fb is None else fb).clone()  # type: ignore[union-attr]
                continue
            both = (fa >= 0) & (fb >= 0)
            merged.first[layer] = torch.where(both, torch.minimum(fa, fb), torch.maximum(fa, fb))
        merged.inputs = self.inputs + other.inputs
        return merged


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, Tensor) and isinstance(b, Tensor):
        return a.shape == b.shape and bool(torch.equal(a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return bool(a == b) if not (isinstance(a, float) and math.isnan(a)) else isinstance(b, float) and math.isnan(b)
