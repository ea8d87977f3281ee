"""Neuron coverage (Pei, Cao, Yang & Jana, "DeepXplore: Automated Whitebox Testing of Deep Learning Systems",
SOSP 2017).

A neuron is *covered* when some test input activates it above a threshold ``t``. Two conventions are in use and both
are offered (``convention``):

* ``"raw"`` (DeepConcolic, Sun et al. ASE 2018): the neuron's own value is compared with ``t`` (default 0: a ReLU
  neuron is covered when it is active); every element of a convolution map is a neuron.
* ``"scaled"`` (DeepXplore's code): per input and per layer, the neuron values are min-max scaled to [0, 1] and
  compared with ``t``; a convolution channel is one neuron, its value the spatial mean of its map. (A layer whose
  values are all equal for an input scales to 0 there.)

The raw convention is not invariant to the scale of a layer; the scaled one is, but a neuron counts as covered
relative to the other neurons of its layer on the same input, not in absolute terms.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from torch import Tensor

from bastion.errors import InputError
from bastion.testing.coverage.base import CoverageMetric, NeuronTarget

__all__ = ["NeuronCoverage"]

CONVENTIONS = ("raw", "scaled")


class NeuronCoverage(CoverageMetric):
    """Neuron coverage: fraction of neurons some input drives above ``threshold`` (module docstring).

    Args:
        threshold: the activation threshold ``t`` (0 by default, both conventions' usual choice).
        convention: ``"raw"`` (DeepConcolic) or ``"scaled"`` (DeepXplore).
        layers: layers under test (``None``: every activation module).
        granularity: ``"element"`` or ``"channel"``; by default that of the convention (``raw``: element,
            ``scaled``: channel).
    """

    name = "nc"
    paper = "Pei et al., DeepXplore: Automated Whitebox Testing of Deep Learning Systems, SOSP 2017"

    def __init__(
        self,
        *,
        threshold: float = 0.0,
        convention: str = "raw",
        layers: Sequence[str] | str | None = None,
        granularity: str | None = None,
    ) -> None:
        if convention not in CONVENTIONS:
            raise InputError(f"convention must be one of {', '.join(CONVENTIONS)}, got {convention!r}")
        if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or threshold != threshold:
            raise InputError(f"threshold must be a number, got {threshold!r}")
        if convention == "scaled" and not 0.0 <= threshold < 1.0:
            raise InputError(f"with the scaled convention the threshold must lie in [0, 1), got {threshold!r}")
        super().__init__(layers=layers, granularity=granularity or ("element" if convention == "raw" else "channel"))
        self.threshold = float(threshold)
        self.convention = convention

    def params(self) -> dict[str, object]:
        return {"threshold": self.threshold, "convention": self.convention, **super().params()}

    def scaled(self, values: Tensor) -> Tensor:
        """Per-input min-max scaling of a layer's neuron values ``(N, P)`` to [0, 1] (DeepXplore)."""
        lo = values.amin(dim=1, keepdim=True)
        span = values.amax(dim=1, keepdim=True) - lo
        return (values - lo) / span.where(span > 0, span.new_ones(()))

    def activation(self, values: Tensor) -> Tensor:
        """The value compared with the threshold, per input and neuron ``(N, P)``."""
        return self.scaled(values) if self.convention == "scaled" else values

    def satisfied(self, layer: str, values: Tensor) -> Tensor:
        return self.activation(values) > self.threshold

    def target(self, layer: str, item: int) -> NeuronTarget:
        """Neuron ``item`` above the threshold (raw convention only: the scaled value depends on the whole layer)."""
        if self.convention != "raw":
            raise InputError("concolic targets need the raw convention of neuron coverage (convention='raw')")
        return NeuronTarget(layer, int(item), self.threshold, math.inf)
