"""Coverage of recurrent layers: testRNN's boundary, step-wise and temporal coverage of an LSTM (or GRU).

Huang, Sun, Zhao, Sharp, Ruan, Meng & Huang, "Coverage-Guided Testing for Recurrent Neural Networks", IEEE
Transactions on Reliability 2021 (arXiv 1911.01952), and its tool paper "testRNN: Coverage-guided Testing on
Recurrent Neural Networks" (arXiv 1906.08557, 2019); reference code github.com/TrustAI/testRNN.

**Internals.** ``torch.nn.LSTM`` returns only the hidden states of its last stacked layer and the final states. The
criteria here need every step of the cell state ``c_t``, the hidden state ``h_t`` and the gates, so :func:`unroll`
recomputes them from the module's own weights (``weight_ih_l{k}``, ``weight_hh_l{k}``, the biases, ``weight_hr_l{k}``
with projections; both directions of a bidirectional layer), batched over the inputs, from the input the module
received (probed as ``"<name>:input"``, see :data:`~bastion.testing.coverage.base.INPUT_SUFFIX`). The unrolled top
layer is checked against the module's real output on every batch, so a model that calls its LSTM with a non-zero
initial state, with dropout active or with a packed sequence is an error rather than a silently wrong coverage.

**Information abstraction** (testRNN). Per input and step ``t`` a layer's vector ``v_t`` (``state``: ``"h"`` hidden
state, ``"c"`` cell state, ``"g"`` cell candidate; gates ``"f"``, ``"i"``, ``"o"``; for a GRU ``"h"``, ``"r"``,
``"z"``, ``"n"``) is summarised by one number:

* signed vectors (h, c, g, n): ``xi_t = |xi_t^+ + xi_t^-|`` with ``xi_t^+`` the sum of the positive and ``xi_t^-``
  of the negative components (testRNN's ``get_activations``: ``abs(sum(h>0) + sum(h<0))``);
* gates in (0, 1) (f, i, o, r, z): their mean ``xi_t^{avg}`` (testRNN's ``xi_t^{f,avg}``, the mean forget gate, of
  its gate coverage).

**Criteria.** All three take the steps ``[t1, t2]`` (``steps``, inclusive; testRNN's ``--seq``, default every
step) and need a profiling set (the training data), as testRNN computes ``aggregate_inf`` on ``X_train``:

* :class:`BoundaryCoverage` (``"lstm-boundary"``, BC): one item per step ``t``, covered when ``xi_t``, min-max
  scaled by its range over the profile (over inputs and steps), is ``>= threshold`` (default 0.8, testRNN's
  ``--threshold_BC``).
* :class:`StepwiseCoverage` (``"lstm-step"``, SC): one item per step, covered when the change between consecutive
  steps ``dxi_t`` (with the zero initial state before step 0), min-max scaled by its profiled range, is
  ``>= threshold`` (default 0.6, ``--threshold_SC``). ``change="net"`` is testRNN's current code,
  ``|(xi_t^+ + xi_t^-) - (xi_{t-1}^+ + xi_{t-1}^-)|``; ``"split"`` its earlier cell coverage,
  ``|xi_t^+ - xi_{t-1}^+| + |xi_t^- - xi_{t-1}^-|``.
* :class:`TemporalCoverage` (``"lstm-temporal"``, TC): the series ``xi_t1 .. xi_t2`` is z-normalised with the
  profile's mean and standard deviation, reduced to ``length`` segments by piecewise aggregate approximation
  (PAA, also for lengths that do not divide: saxpy's fractional rule) and each segment mapped to one of
  ``symbols`` letters by the equiprobable breakpoints of the standard normal (SAX). Items: the
  ``symbols ** length`` words (defaults 3 and 5: 243 words; testRNN's ``--symbols_TC 3`` and ``seq_len = 5``).

The thresholds compare values scaled to [0, 1] by the profile, as testRNN's code does; its earlier tool (2019)
compared raw values (cell coverage thresholds 3..9, gate coverage on the raw mean forget gate). A gate's "change"
at step 0 is measured from 0, as testRNN pads every aggregated series.

Each criterion is a :class:`~bastion.testing.coverage.base.CoverageMetric`: batched, streaming, mergeable and
resumable (the profile is part of the saved state). Items are keyed by the recurrent module's name.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import replace
from statistics import NormalDist
from typing import Any

import torch
from torch import Tensor, nn

from bastion.errors import InputError, ModelError
from bastion.testing.coverage.base import INPUT_SUFFIX, CoverageMetric, CoverageReport

__all__ = [
    "GATES",
    "RECURRENT",
    "BoundaryCoverage",
    "RecurrentCoverage",
    "StepwiseCoverage",
    "TemporalCoverage",
    "paa",
    "recurrent_layers",
    "sax_cuts",
    "unroll",
]

PAPER = (
    "Huang et al., Coverage-Guided Testing for Recurrent Neural Networks, IEEE Transactions on Reliability 2021 "
    "(testRNN)"
)
#: Recurrent module types whose steps :func:`unroll` recomputes.
RECURRENT: tuple[type[nn.RNNBase], ...] = (nn.LSTM, nn.GRU)
#: The per-step quantities of each module type.
STATES: dict[type[nn.Module], tuple[str, ...]] = {nn.LSTM: ("h", "c", "i", "f", "g", "o"), nn.GRU: ("h", "r", "z", "n")}
#: Sigmoid gates: summarised by their mean (the other quantities by the absolute value of their sum).
GATES = frozenset("ifozr")
#: Unrolled top layer vs the module's output: loose enough for TF32 cuDNN kernels, far below a wrong initial state.
_CHECK_ATOL = 1e-2
_MAX_WORDS = 1 << 24


# ----------------------------------------------------------------------------------------------------- unrolling


def recurrent_layers(model: nn.Module) -> list[str]:
    """Names of the ``nn.LSTM`` and ``nn.GRU`` modules of ``model`` (``named_modules`` order)."""
    return [n for n, m in model.named_modules() if n and isinstance(m, RECURRENT)]


def _weights(module: nn.Module, layer: int, reverse: bool) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None]:
    sfx = f"_l{layer}" + ("_reverse" if reverse else "")
    w_ih, w_hh = getattr(module, "weight_ih" + sfx), getattr(module, "weight_hh" + sfx)
    b_ih = getattr(module, "bias_ih" + sfx) if module.bias else None
    b_hh = getattr(module, "bias_hh" + sfx) if module.bias else None
    return w_ih, w_hh, b_ih, b_hh


def _lstm_direction(module: nn.Module, x: Tensor, layer: int, reverse: bool) -> dict[str, Tensor]:
    w_ih, w_hh, b_ih, b_hh = _weights(module, layer, reverse)
    w_hr = getattr(module, f"weight_hr_l{layer}" + ("_reverse" if reverse else "")) if module.proj_size else None
    pre = x @ w_ih.T  # the input's part of every gate, all steps at once: (N, T, 4H)
    if b_ih is not None and b_hh is not None:
        pre = pre + (b_ih + b_hh)
    n, steps = x.shape[0], x.shape[1]
    h = x.new_zeros(n, w_hh.shape[1])
    c = x.new_zeros(n, w_ih.shape[0] // 4)
    seq: dict[str, list[Tensor]] = {k: [] for k in ("h", "c", "i", "f", "g", "o")}
    for t in range(steps - 1, -1, -1) if reverse else range(steps):
        i, f, g, o = (pre[:, t] + h @ w_hh.T).chunk(4, dim=1)
        i, f, g, o = torch.sigmoid(i), torch.sigmoid(f), torch.tanh(g), torch.sigmoid(o)
        c = f * c + i * g
        h = o * torch.tanh(c)
        if w_hr is not None:
            h = h @ w_hr.T
        for k, v in (("h", h), ("c", c), ("i", i), ("f", f), ("g", g), ("o", o)):
            seq[k].append(v)
    return {k: torch.stack(v[::-1] if reverse else v, dim=1) for k, v in seq.items()}


def _gru_direction(module: nn.Module, x: Tensor, layer: int, reverse: bool) -> dict[str, Tensor]:
    w_ih, w_hh, b_ih, b_hh = _weights(module, layer, reverse)
    pre = x @ w_ih.T if b_ih is None else x @ w_ih.T + b_ih
    n, steps = x.shape[0], x.shape[1]
    h = x.new_zeros(n, w_hh.shape[1])
    seq: dict[str, list[Tensor]] = {k: [] for k in ("h", "r", "z", "n")}
    for t in range(steps - 1, -1, -1) if reverse else range(steps):
        rec = h @ w_hh.T if b_hh is None else h @ w_hh.T + b_hh
        xr, xz, xn = pre[:, t].chunk(3, dim=1)
        hr, hz, hn = rec.chunk(3, dim=1)
        r, z = torch.sigmoid(xr + hr), torch.sigmoid(xz + hz)
        cand = torch.tanh(xn + r * hn)
        h = (1 - z) * cand + z * h
        for k, v in (("h", h), ("r", r), ("z", z), ("n", cand)):
            seq[k].append(v)
    return {k: torch.stack(v[::-1] if reverse else v, dim=1) for k, v in seq.items()}


def unroll(module: nn.Module, x: Tensor) -> list[dict[str, Tensor]]:
    """Every step of every stacked layer of an ``nn.LSTM`` or ``nn.GRU``, recomputed from its weights (batched).

    The initial states are zero (the modules' default); dropout between layers is not applied (eval mode).

    Args:
        module: the recurrent module.
        x: the input it receives, ``(N, T, F)`` if ``batch_first`` else ``(T, N, F)``.

    Returns:
        One dict per stacked layer: ``{quantity: (N, T, D * units)}`` batch-first, in the input's time order (the
        reverse direction of a bidirectional layer after the forward one along the units). LSTM: ``h`` (hidden
        state, projected when ``proj_size``), ``c`` (cell state), gates ``i``, ``f``, ``o`` and cell candidate ``g``;
        GRU: ``h``, gates ``r``, ``z`` and candidate ``n``.

    Raises:
        ModelError: not an LSTM/GRU, or an unbatched or packed input.
    """
    if not isinstance(module, RECURRENT):
        raise ModelError(f"unroll takes an nn.LSTM or nn.GRU, got {type(module).__name__}")
    if not isinstance(x, Tensor) or x.dim() != 3:
        shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
        raise ModelError(
            f"the {type(module).__name__} received input {shape}; the recurrent criteria need a batched input "
            "(N, T, F) (or (T, N, F) without batch_first), not an unbatched or packed sequence"
        )
    seqs = x if module.batch_first else x.transpose(0, 1)
    direction = _lstm_direction if isinstance(module, nn.LSTM) else _gru_direction
    out: list[dict[str, Tensor]] = []
    for layer in range(module.num_layers):
        parts = [direction(module, seqs, layer, rev) for rev in ((False, True) if module.bidirectional else (False,))]
        merged = {k: torch.cat([p[k] for p in parts], dim=2) for k in parts[0]}
        out.append(merged)
        seqs = merged["h"]
    return out


# ---------------------------------------------------------------------------------------------------- PAA and SAX


def paa(series: Tensor, segments: int) -> Tensor:
    """Piecewise aggregate approximation of ``series (N, W)`` into ``(N, segments)`` means (batched).

    When ``segments`` does not divide ``W`` each point counts fractionally in the segments it straddles, as in
    saxpy's ``paa`` (every point repeated ``segments`` times, then ``W`` consecutive copies averaged).
    """
    w = series.shape[-1]
    if w == segments:
        return series.clone()
    # weights[s, t] = share of point t in segment s: copies i of the repeated series with i // W == s, i // S == t
    i = torch.arange(w * segments, device=series.device)
    weights = torch.zeros(segments, w, dtype=series.dtype, device=series.device)
    weights.index_put_((i // w, i // segments), torch.ones_like(i, dtype=series.dtype), accumulate=True)
    return series @ (weights / w).T


def sax_cuts(symbols: int) -> list[float]:
    """The ``symbols - 1`` breakpoints that cut the standard normal into equiprobable intervals (SAX)."""
    return [NormalDist().inv_cdf(k / symbols) for k in range(1, symbols)]


# ------------------------------------------------------------------------------------------------------ criteria


def _check_threshold(threshold: Any) -> float:
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not 0.0 <= threshold <= 1.0:
        raise InputError(f"threshold must be a number in [0, 1] (values are min-max scaled), got {threshold!r}")
    return float(threshold)


def _check_int(value: Any, name: str, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise InputError(f"{name} must be an integer >= {low}, got {value!r}")
    return int(value)


class RecurrentCoverage(CoverageMetric):
    """Shared part of the testRNN criteria: binding to recurrent modules, unrolling, the step window, the profile.

    A subclass implements :meth:`series` (the per-step values its items test, ``(N, W)``), :meth:`profile_batch`,
    :meth:`satisfied` (or :meth:`update`) and :meth:`distance`.

    Args:
        state: the quantity under test (module docstring): ``"h"`` (default, testRNN's), ``"c"``, ``"f"``, ``"i"``,
            ``"o"``, ``"g"``; for a GRU ``"h"``, ``"r"``, ``"z"``, ``"n"``.
        steps: ``(t1, t2)``, the steps under test, both included (testRNN's ``--seq``); None: every step.
        stacked_layer: which stacked layer of a multi-layer module (default -1: the top one).
        layers: names of the recurrent modules (default: every ``nn.LSTM``/``nn.GRU`` of the model).
    """

    paper = PAPER
    needs_profile = True

    def __init__(
        self,
        *,
        state: str = "h",
        steps: Sequence[int] | None = None,
        stacked_layer: int = -1,
        layers: Sequence[str] | str | None = None,
    ) -> None:
        known = sorted({s for v in STATES.values() for s in v})
        if state not in known:
            raise InputError(
                f"state must be one of {', '.join(known)} (LSTM: h c i f g o; GRU: h r z n), got {state!r}"
            )
        if steps is not None:
            if isinstance(steps, (str, bytes)) or not isinstance(steps, Sequence) or len(steps) != 2:
                raise InputError(f"steps must be a pair (t1, t2) of time steps, both included, or None; got {steps!r}")
            t1, t2 = (_check_int(t, "steps", 0) for t in steps)
            if t1 > t2:
                raise InputError(f"steps (t1, t2) needs t1 <= t2, got {steps!r}")
            steps = (t1, t2)
        if isinstance(stacked_layer, bool) or not isinstance(stacked_layer, int):
            raise InputError(f"stacked_layer must be an integer, got {stacked_layer!r}")
        super().__init__(layers=layers, granularity="element")
        self.state = state
        self.steps: tuple[int, int] | None = steps  # type: ignore[assignment]
        self.stacked_layer = stacked_layer
        self._modules: dict[str, nn.RNNBase] = {}
        self._stats: dict[str, dict[str, float]] = {}

    def params(self) -> dict[str, Any]:
        return {"state": self.state, "steps": self.steps, "stacked_layer": self.stacked_layer, **super().params()}

    # -- binding -----------------------------------------------------------------------------------------------
    def bind(self, model: nn.Module) -> list[str]:
        """Resolve the recurrent modules; the probed layers are ``"<name>:input"`` and ``"<name>"`` for each."""
        named = dict(model.named_modules())
        found = recurrent_layers(model)
        if self.layers is not None:
            names = self.rnn_names()
        elif self._layers_given is None:
            if not found:
                kinds = sorted({type(m).__name__ for n, m in named.items() if n})
                raise ModelError(
                    f"{type(model).__name__} has no nn.LSTM or nn.GRU layer: the {self.name} criterion (testRNN) "
                    f"measures the cell, hidden state and gates of a recurrent layer; the model has only "
                    f"{', '.join(kinds) or 'no submodules'}. Use a criterion such as 'nc' for feed-forward models"
                )
            names = found
        else:
            given = self._layers_given
            given = [s.strip() for s in given.split(",")] if isinstance(given, str) else list(given)
            names = list(dict.fromkeys(n.removesuffix(INPUT_SUFFIX) for n in given if n))
            if not names:
                raise InputError("layers is empty: name a recurrent layer, or pass None for every LSTM/GRU")
        for n in names:
            if n not in named or not n:
                raise InputError(f"unknown layer name {n!r}; the model's recurrent layers are: "
                                 f"{', '.join(found) or 'none'}")  # fmt: skip
            module = named[n]
            if not isinstance(module, RECURRENT):
                raise InputError(
                    f"layer {n!r} is a {type(module).__name__}, not an nn.LSTM or nn.GRU: the {self.name} criterion "
                    f"measures recurrent layers; the model's recurrent layers are: {', '.join(found) or 'none'}"
                )
            allowed = STATES[type(module)]
            if self.state not in allowed:
                raise InputError(f"the {type(module).__name__} {n!r} has no quantity {self.state!r}; choose one of "
                                 f"{', '.join(allowed)}")  # fmt: skip
            if not -module.num_layers <= self.stacked_layer < module.num_layers:
                raise InputError(f"stacked_layer {self.stacked_layer} is outside the {module.num_layers} stacked "
                                 f"layer(s) of {n!r}")  # fmt: skip
            self._modules[n] = module
        if self.layers is None:
            self.layers = [key for n in names for key in (n + INPUT_SUFFIX, n)]
        return self.layers

    def rnn_names(self) -> list[str]:
        """The names of the recurrent modules under test (bound)."""
        return [n for n in self.layers or [] if not n.endswith(INPUT_SUFFIX)]

    # -- values ------------------------------------------------------------------------------------------------
    def internals(self, acts: dict[str, Tensor]) -> dict[str, Tensor]:
        """The quantity ``state`` of each recurrent module under test, every step: ``{name: (N, T, units)}``."""
        out: dict[str, Tensor] = {}
        for name in self.rnn_names():
            module = self._modules.get(name)
            if module is None:
                raise InputError(f"the {self.name} criterion is not bound to a model: call bind(model) first")
            if name + INPUT_SUFFIX not in acts:
                raise InputError(f"the {self.name} criterion needs the probed input {name + INPUT_SUFFIX!r} of the "
                                 "recurrent layer (probe the layers metric.bind(model) returns)")  # fmt: skip
            x = acts[name + INPUT_SUFFIX]
            layers = unroll(module, x.to(next(module.parameters()).dtype))
            real = acts.get(name)
            if real is not None:
                real = real if module.batch_first else real.transpose(0, 1)
                top = layers[-1]["h"]
                if real.shape != top.shape or not torch.allclose(top, real.to(top.dtype), atol=_CHECK_ATOL, rtol=0.0):
                    gap = float((top - real).abs().max()) if real.shape == top.shape else math.inf
                    raise ModelError(
                        f"the steps of {type(module).__name__} {name!r} recomputed from its weights and input do not "
                        f"reproduce its output (largest difference {gap:.3g}): the model calls it with a non-zero "
                        "initial state, with dropout in training mode, or modifies it; the testRNN criteria need "
                        "the default zero initial state"
                    )
            out[name] = layers[self.stacked_layer][self.state]
        return out

    def parts(self, q: Tensor) -> tuple[Tensor, Tensor]:
        """``(xi^+, xi^-)`` per input and step ``(N, T)``: sums of the positive and negative parts; a gate's mean."""
        if self.state in GATES:
            avg = q.mean(dim=-1)
            return avg, torch.zeros_like(avg)
        return q.clamp(min=0).sum(dim=-1), q.clamp(max=0).sum(dim=-1)

    def window(self, steps: int, layer: str) -> slice:
        """The steps under test of a sequence of ``steps`` steps."""
        if self.steps is None:
            return slice(0, steps)
        t1, t2 = self.steps
        if t2 >= steps:
            raise InputError(f"steps {self.steps} reach beyond the {steps} time steps of layer {layer!r} (0 to "
                             f"{steps - 1})")  # fmt: skip
        return slice(t1, t2 + 1)

    def series(self, q: Tensor, layer: str) -> Tensor:
        """The per-step values ``(N, W)`` the items test, from the quantity ``q (N, T, units)``."""
        raise NotImplementedError

    def values(self, acts: dict[str, Tensor]) -> dict[str, Tensor]:
        """``{recurrent module: (N, W)}``: the series of :meth:`series` over the steps under test."""
        return {name: self.series(q, name) for name, q in self.internals(acts).items()}

    def distance(self, values: dict[str, Tensor], layer: str, item: int) -> Tensor:
        """How far each input is from covering ``item`` of ``layer`` ``(N,)``, <= 0 when it covers it.

        testRNN's fitness (``fitness`` of its test objectives), minimised by its genetic algorithm.
        """
        raise NotImplementedError

    # -- streaming state -----------------------------------------------------------------------------------------
    def update(self, acts: dict[str, Tensor], index: Tensor | None = None) -> Tensor:
        if not self.profiled:
            raise InputError(
                f"the {self.name} criterion needs a profiling set (the range of the LSTM's values, testRNN's "
                "aggregate_inf): call profile(model, x) first, e.g. with the training data (profile=... in coverage())"
            )
        vals = self.values(acts)
        n = next(iter(vals.values())).shape[0]
        if index is None:
            index = torch.arange(self.inputs, self.inputs + n)
        index = index.to(torch.long).cpu()
        new = torch.zeros(n, dtype=torch.long)
        for layer, v in vals.items():
            new += self._fold_layer(layer, v, index)
        self.inputs += n
        return new

    def _fold_layer(self, layer: str, values: Tensor, index: Tensor) -> Tensor:
        return self._fold(layer, self.satisfied(layer, values).cpu(), index)

    def profile_state(self) -> Any:
        if not self.profiled:
            return None
        return {k: dict(v) for k, v in self._stats.items()}

    def load_profile_state(self, state: Any) -> None:
        if state is None:
            return
        self._stats = {k: dict(v) for k, v in state.items()}
        self.profiled = True

    def _stat(self, layer: str) -> dict[str, float]:
        if layer not in self._stats:
            raise InputError(f"the {self.name} profile has no values of layer {layer!r}: profile it on this model")
        return self._stats[layer]

    def item_labels(self, layer: str, items: int) -> tuple[str, ...] | None:
        """Names of a layer's items (the steps, or the words); None when too many to list."""
        start = 0 if self.steps is None else self.steps[0]
        return tuple(f"t={start + j}" for j in range(items))

    def report(self) -> CoverageReport:
        rep = super().report()
        labels = {layer: self.item_labels(layer, int(first.numel())) for layer, first in self.first.items()}
        distinct = set(labels.values())
        return replace(rep, item_names=distinct.pop() if len(distinct) == 1 else None)


class _ScaledThreshold(RecurrentCoverage):
    """BC and SC: one item per step, covered when the min-max scaled series reaches ``threshold``."""

    def __init__(
        self,
        *,
        threshold: float,
        state: str = "h",
        steps: Sequence[int] | None = None,
        stacked_layer: int = -1,
        layers: Sequence[str] | str | None = None,
    ) -> None:
        super().__init__(state=state, steps=steps, stacked_layer=stacked_layer, layers=layers)
        self.threshold = _check_threshold(threshold)

    def params(self) -> dict[str, Any]:
        return {"threshold": self.threshold, **super().params()}

    def profile_batch(self, values: dict[str, Tensor]) -> None:
        for layer, v in values.items():
            old = self._stats.get(layer, {"min": math.inf, "max": -math.inf})
            self._stats[layer] = {"min": min(old["min"], float(v.min())), "max": max(old["max"], float(v.max()))}

    def scaled(self, layer: str, values: Tensor) -> Tensor:
        """The series min-max scaled by the profile's range (a constant profile scales by 1)."""
        stat = self._stat(layer)
        span = stat["max"] - stat["min"]
        return (values - stat["min"]) / (span if span > 0 else 1.0)

    def satisfied(self, layer: str, values: Tensor) -> Tensor:
        return self.scaled(layer, values) >= self.threshold

    def distance(self, values: dict[str, Tensor], layer: str, item: int) -> Tensor:
        return self.threshold - self.scaled(layer, values[layer])[:, item]


class BoundaryCoverage(_ScaledThreshold):
    """testRNN's boundary coverage (BC): the abstracted value ``xi_t`` reaches ``threshold`` of its range at step t.

    Args:
        threshold: on the value min-max scaled by the profile (default 0.8, testRNN's ``--threshold_BC``).
        state, steps, stacked_layer, layers: see :class:`RecurrentCoverage`; ``state="f"`` tests the mean forget
            gate (testRNN's gate coverage).
    """

    name = "lstm-boundary"

    def __init__(
        self,
        *,
        threshold: float = 0.8,
        state: str = "h",
        steps: Sequence[int] | None = None,
        stacked_layer: int = -1,
        layers: Sequence[str] | str | None = None,
    ) -> None:
        super().__init__(threshold=threshold, state=state, steps=steps, stacked_layer=stacked_layer, layers=layers)

    def series(self, q: Tensor, layer: str) -> Tensor:
        pos, neg = self.parts(q)
        return (pos + neg).abs()[:, self.window(q.shape[1], layer)]


CHANGES = ("net", "split")


class StepwiseCoverage(_ScaledThreshold):
    """testRNN's step-wise coverage (SC): the change of ``xi`` from step t-1 to t reaches ``threshold`` of its range.

    Args:
        threshold: on the change min-max scaled by the profile (default 0.6, testRNN's ``--threshold_SC``).
        change: ``"net"`` (testRNN's code: change of ``xi^+ + xi^-``) or ``"split"`` (its earlier cell coverage:
            ``|dxi^+| + |dxi^-|``).
        state, steps, stacked_layer, layers: see :class:`RecurrentCoverage`.
    """

    name = "lstm-step"

    def __init__(
        self,
        *,
        threshold: float = 0.6,
        change: str = "net",
        state: str = "h",
        steps: Sequence[int] | None = None,
        stacked_layer: int = -1,
        layers: Sequence[str] | str | None = None,
    ) -> None:
        if change not in CHANGES:
            raise InputError(f"change must be one of {', '.join(CHANGES)}, got {change!r}")
        super().__init__(threshold=threshold, state=state, steps=steps, stacked_layer=stacked_layer, layers=layers)
        self.change = change

    def params(self) -> dict[str, Any]:
        return {"change": self.change, **super().params()}

    def series(self, q: Tensor, layer: str) -> Tensor:
        pos, neg = self.parts(q)
        # the state before step 0 is zero (testRNN pads the aggregated series with 0)
        dpos = pos - torch.nn.functional.pad(pos, (1, 0))[:, :-1]
        dneg = neg - torch.nn.functional.pad(neg, (1, 0))[:, :-1]
        delta = (dpos + dneg).abs() if self.change == "net" else dpos.abs() + dneg.abs()
        return delta[:, self.window(q.shape[1], layer)]


class TemporalCoverage(RecurrentCoverage):
    """testRNN's temporal coverage (TC): which symbolic patterns (SAX words) the series ``xi_t1 .. xi_t2`` takes.

    Args:
        symbols: letters of the alphabet (default 3, testRNN's ``--symbols_TC``).
        length: PAA segments, the letters of a word (default 5, testRNN's ``seq_len``).
        state, steps, stacked_layer, layers: see :class:`RecurrentCoverage`.
    """

    name = "lstm-temporal"

    def __init__(
        self,
        *,
        symbols: int = 3,
        length: int = 5,
        state: str = "h",
        steps: Sequence[int] | None = None,
        stacked_layer: int = -1,
        layers: Sequence[str] | str | None = None,
    ) -> None:
        self.symbols = _check_int(symbols, "symbols", 2)
        self.length = _check_int(length, "length", 1)
        if self.symbols**self.length > _MAX_WORDS:
            raise InputError(f"symbols ** length = {self.symbols}**{self.length} words is too many items (at most "
                             f"{_MAX_WORDS}); use fewer symbols or a shorter length")  # fmt: skip
        super().__init__(state=state, steps=steps, stacked_layer=stacked_layer, layers=layers)
        self.cuts = sax_cuts(self.symbols)

    def params(self) -> dict[str, Any]:
        return {"symbols": self.symbols, "length": self.length, **super().params()}

    def series(self, q: Tensor, layer: str) -> Tensor:
        pos, neg = self.parts(q)
        return (pos + neg).abs()[:, self.window(q.shape[1], layer)]

    def profile_batch(self, values: dict[str, Tensor]) -> None:
        for layer, v in values.items():
            old = self._stats.get(layer, {"n": 0.0, "sum": 0.0, "sumsq": 0.0})
            v64 = v.detach().double()
            self._stats[layer] = {"n": old["n"] + v64.numel(), "sum": old["sum"] + float(v64.sum()),
                                  "sumsq": old["sumsq"] + float((v64 * v64).sum())}  # fmt: skip

    def normal(self, layer: str) -> tuple[float, float]:
        """The profile's mean and (population) standard deviation of the series (a constant one: std 1)."""
        stat = self._stat(layer)
        mean = stat["sum"] / stat["n"]
        std = math.sqrt(max(stat["sumsq"] / stat["n"] - mean * mean, 0.0))
        return mean, (std if std > 0 else 1.0)

    def segments(self, layer: str, values: Tensor) -> Tensor:
        """The z-normalised series reduced to ``length`` PAA segments ``(N, length)``."""
        mean, std = self.normal(layer)
        return paa((values - mean) / std, self.length)

    def words(self, layer: str, values: Tensor) -> Tensor:
        """The word of each input, as its item index ``(N,)`` (letters base ``symbols``, first letter highest)."""
        cuts = torch.tensor(self.cuts, dtype=values.dtype, device=values.device)
        letters = torch.bucketize(self.segments(layer, values).contiguous(), cuts)
        weights = self.symbols ** torch.arange(self.length - 1, -1, -1, device=values.device)
        return (letters * weights).sum(dim=1)

    def satisfied(self, layer: str, values: Tensor) -> Tensor:
        hit = torch.zeros(values.shape[0], self.symbols**self.length, dtype=torch.bool, device=values.device)
        return hit.scatter_(1, self.words(layer, values)[:, None], True)

    def _fold_layer(self, layer: str, values: Tensor, index: Tensor) -> Tensor:
        # one item per input: fold the word indices directly, without an (inputs x words) matrix
        words = self.words(layer, values).cpu()
        items = self.symbols**self.length
        first = self.first.setdefault(layer, torch.full((items,), -1, dtype=torch.long))
        big = torch.iinfo(torch.long).max
        cand = torch.full((items,), big, dtype=torch.long).scatter_reduce(0, words, index, reduce="amin")
        fresh = (first < 0) & (cand < big)
        better = fresh | ((first >= 0) & (cand < first))
        first[better] = cand[better]
        credit = torch.zeros(index.shape[0], dtype=torch.long)
        winners = cand[fresh]
        if winners.numel():
            order = index.argsort()
            credit.index_add_(0, order[torch.searchsorted(index[order], winners)], torch.ones_like(winners))
        return credit

    def letters_of(self, item: int) -> list[int]:
        """The letters (0-based) of the word with index ``item``."""
        return [(item // self.symbols**p) % self.symbols for p in range(self.length - 1, -1, -1)]

    def distance(self, values: dict[str, Tensor], layer: str, item: int) -> Tensor:
        seg = self.segments(layer, values[layer])
        edges = [-math.inf, *self.cuts, math.inf]
        letters = self.letters_of(int(item))
        lo = seg.new_tensor([edges[s] for s in letters])
        hi = seg.new_tensor([edges[s + 1] for s in letters])
        return ((lo - seg).clamp(min=0) + (seg - hi).clamp(min=0)).sum(dim=1)

    def item_labels(self, layer: str, items: int) -> tuple[str, ...] | None:
        if items > 4096:
            return None
        return tuple("".join(chr(97 + s) for s in self.letters_of(i)) for i in range(items))
