"""Coverage criteria for neural networks, computed batched through forward hooks.

``coverage(model, data, metric="nc")`` measures one criterion on a data set; ``measure(model, data, [metrics])``
several in one pass over the data. Every criterion is a :class:`~bastion.testing.coverage.base.CoverageMetric`:
streaming (``update`` batch by batch), mergeable (``merge``) and resumable (``state_dict``). The registry
:data:`METRICS` maps the names used on the command line to the classes.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from bastion.data import Dataset
from bastion.errors import InputError
from bastion.models.checks import eval_mode, model_device
from bastion.testing.coverage.base import (
    CoverageMetric,
    CoverageReport,
    LayerProbe,
    default_layers,
    neuron_values,
    resolve_layers,
)
from bastion.testing.coverage.deepgauge import (
    KMultisectionCoverage,
    NeuronBoundaryCoverage,
    StrongNeuronActivationCoverage,
    TopKNeuronCoverage,
    TopKNeuronPatterns,
)
from bastion.testing.coverage.mcdc import (
    MCDCCoverage,
    SignSignCoverage,
    SignValueCoverage,
    ValueSignCoverage,
    ValueValueCoverage,
)
from bastion.testing.coverage.neuron import NeuronCoverage
from bastion.testing.coverage.rnn import BoundaryCoverage, StepwiseCoverage, TemporalCoverage
from bastion.testing.coverage.surprise import DistanceSurpriseCoverage, LikelihoodSurpriseCoverage
from bastion.testing.registry import build

__all__ = [
    "METRICS",
    "BoundaryCoverage",
    "CoverageMetric",
    "CoverageReport",
    "DistanceSurpriseCoverage",
    "KMultisectionCoverage",
    "LayerProbe",
    "LikelihoodSurpriseCoverage",
    "MCDCCoverage",
    "NeuronBoundaryCoverage",
    "NeuronCoverage",
    "SignSignCoverage",
    "SignValueCoverage",
    "StepwiseCoverage",
    "StrongNeuronActivationCoverage",
    "TemporalCoverage",
    "TopKNeuronCoverage",
    "TopKNeuronPatterns",
    "ValueSignCoverage",
    "ValueValueCoverage",
    "coverage",
    "default_layers",
    "make_metric",
    "measure",
    "neuron_values",
    "resolve_layers",
]

#: Registered criteria: command-line name -> class.
METRICS: dict[str, type[CoverageMetric]] = {"nc": NeuronCoverage}
METRICS.update({c.name: c for c in (KMultisectionCoverage, NeuronBoundaryCoverage, StrongNeuronActivationCoverage,
                                     TopKNeuronCoverage, TopKNeuronPatterns)})  # DeepGauge  # fmt: skip
METRICS.update({c.name: c for c in (SignSignCoverage, SignValueCoverage, ValueSignCoverage,
                                     ValueValueCoverage)})  # MC/DC  # fmt: skip
METRICS.update({c.name: c for c in (LikelihoodSurpriseCoverage, DistanceSurpriseCoverage)})  # surprise adequacy
METRICS.update({c.name: c for c in (BoundaryCoverage, StepwiseCoverage, TemporalCoverage)})  # testRNN (LSTM/GRU)


def make_metric(name: str | CoverageMetric, **params: Any) -> CoverageMetric:
    """The criterion registered as ``name`` with ``params`` (a CoverageMetric is returned as it is).

    Raises:
        InputError: unknown name (the valid ones are listed) or a parameter the criterion does not take.
    """
    return build(METRICS, name, CoverageMetric, "coverage metric", "parameter", **params)


def _inputs(data: Dataset | tuple[Tensor, Tensor] | Tensor, what: str) -> Tensor:
    if isinstance(data, Dataset):
        return data.x
    if isinstance(data, tuple) and data and isinstance(data[0], Tensor):
        return data[0]
    if isinstance(data, Tensor) and data.dim() >= 2 and data.is_floating_point():
        return data
    raise InputError(f"{what} must be a bastion Dataset, a pair (x, y) or a float tensor (N, ...), got "
                     f"{type(data).__name__}")  # fmt: skip


def measure(
    model: nn.Module,
    data: Dataset | tuple[Tensor, Tensor] | Tensor,
    metrics: Sequence[CoverageMetric],
    *,
    profile: Dataset | tuple[Tensor, Tensor] | Tensor | None = None,
    batch_size: int = 256,
    progress: bool = True,
) -> list[CoverageReport]:
    """Update every criterion with all of ``data`` (one forward pass per batch for all of them).

    Criteria that need a profiling set are profiled on ``profile`` first (unless already profiled). The criteria
    keep their state, so a later call adds more inputs (with indices continuing the count).
    """
    if int(batch_size) < 1:
        raise InputError(f"batch_size must be >= 1, got {batch_size!r}")
    x = _inputs(data, "data")
    need = [m for m in metrics if m.needs_profile and not m.profiled]
    if need and profile is None:
        raise InputError(
            f"the metric(s) {', '.join(m.name for m in need)} need a profiling set (the neurons' ranges on, e.g., "
            "the training data): pass profile=..."
        )
    device = model_device(model)
    layers: list[str] = []
    for m in metrics:
        layers += [n for n in m.bind(model) if n not in layers]
    with eval_mode(model), torch.no_grad():
        for m in need:
            m.profile(model, _inputs(profile, "profile"), batch_size=batch_size)  # type: ignore[arg-type]
        bar = tqdm(total=x.shape[0], desc="coverage", unit="input", disable=not progress, leave=False)
        with LayerProbe(model, layers) as probe:
            for s in range(0, x.shape[0], int(batch_size)):
                _, acts = probe.run(x[s : s + int(batch_size)].to(device))
                for m in metrics:
                    m.update({k: acts[k] for k in m.layers or []})
                bar.update(min(int(batch_size), x.shape[0] - s))
                if progress:
                    bar.set_postfix_str(" ".join(f"{m.name} {100 * m.report().ratio:.1f}%" for m in metrics))
        bar.close()
    return [m.report() for m in metrics]


def coverage(
    model: nn.Module,
    data: Dataset | tuple[Tensor, Tensor] | Tensor,
    metric: str | CoverageMetric = "nc",
    layers: Sequence[str] | str | None = None,
    *,
    profile: Dataset | tuple[Tensor, Tensor] | Tensor | None = None,
    batch_size: int = 256,
    progress: bool = True,
    **params: Any,
) -> CoverageReport:
    """Coverage of ``data`` under one criterion.

    Args:
        model: any ``torch.nn.Module``.
        data: the test inputs: a Dataset, a pair ``(x, y)`` or a tensor ``(N, ...)``.
        metric: a registered name (:data:`METRICS`) or a criterion object.
        layers: layers under test (names of ``model.named_modules()``); default every activation module.
        profile: the profiling set of criteria that need neuron ranges (DeepGauge's), e.g. the training data.
        batch_size: inputs per forward pass.
        progress: show a progress bar with the current coverage.
        **params: the criterion's parameters (e.g. ``threshold=0.5``, ``k=10``).

    Example:
        >>> report = coverage(model, test_set, "nc", threshold=0.0)  # doctest: +SKIP
        >>> print(report.line())  # doctest: +SKIP
    """
    if layers is not None:
        params["layers"] = layers
    m = make_metric(metric, **params)
    return measure(model, data, [m], profile=profile, batch_size=batch_size, progress=progress)[0]
