"""Defences against data poisoning and backdoors: find the poison in a training set, or repair a backdoored model.

Two kinds of defence, two kinds of result.

*Data-level detectors* look at a (possibly poisoned) training set, usually through the representations a model
trained on it has learned, and return a :class:`DetectionResult`: the positions of the suspected samples
(``suspected``), a per-sample suspicion score (``scores``, higher is more suspicious), and precision, recall and F1
against the true poison when it is known.

* :func:`~bastion.poisoning.defenses.spectral.spectral_signatures` (Tran, Li & Madry, NeurIPS 2018);
* :func:`~bastion.poisoning.defenses.clustering.activation_clustering` (Chen et al., AAAI SafeAI workshop 2019);
* :func:`~bastion.poisoning.defenses.strip.strip_scan` (Gao et al., ACSAC 2019; a run-time input filter, here
  also usable on a training set);
* :func:`~bastion.poisoning.defenses.sanitize.sanitize` (sphere and slab defences of Steinhardt, Koh & Liang,
  NeurIPS 2017).

*Model-level defences* examine or repair the model itself:

* :func:`~bastion.poisoning.defenses.neural_cleanse.neural_cleanse` (Wang et al., IEEE S&P 2019): reverse-engineers
  a trigger for each class and flags the classes whose trigger is abnormally small; :func:`unlearn
  <bastion.poisoning.defenses.neural_cleanse.unlearn>` removes the backdoor it found;
* :func:`~bastion.poisoning.defenses.fineprune.fine_prune` (Liu, Dolan-Gavitt & Garg, RAID 2018).

Every entry point validates its arguments (bad input raises :class:`~bastion.errors.InputError`), runs on the
model's device, and writes to the result store when given one (``store=``): a data-level scan writes one
:class:`~bastion.results.SampleRecord` per sample (run kind ``"backdoor-scan"``, status ``"falsified"`` for a
suspected sample and ``"unknown"`` otherwise, ``extra = {"score": ..., "poison": true/false}`` where the poison is
known); Neural Cleanse writes one record per class, fine-pruning one per channel of the pruned layer.

This module holds what the defences share: the detection result, precision/recall, the extraction of a model's
penultimate representations, the attack-success rate of a trigger and the store writer.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from torch import Tensor, nn

from bastion.data import Dataset
from bastion.data.dataset import as_dataset
from bastion.errors import InputError, ModelError
from bastion.models.checks import check_logits, eval_mode, model_device, model_fingerprint
from bastion.results import SampleRecord
from bastion.store import Store, resumable_run

__all__ = [
    "SCAN_KIND",
    "DetectionResult",
    "TriggerLike",
    "activation_clustering",
    "apply_trigger",
    "check_poison_indices",
    "detection_metrics",
    "fine_prune",
    "neural_cleanse",
    "plot_anomaly_indices",
    "plot_scores",
    "plot_triggers",
    "representations",
    "sanitize",
    "spectral_signatures",
    "strip_scan",
    "unlearn",
]

#: Run kind of every data-level scan in the result store.
SCAN_KIND = "backdoor-scan"

StoreLike = Store | str | Path | None


class _HasApply(Protocol):
    def apply(self, x: Tensor) -> Tensor: ...


#: A trigger: a callable ``x -> x_triggered`` or an object with an ``apply(x)`` method (the attacks' ``Trigger``).
TriggerLike = Callable[[Tensor], Tensor] | _HasApply


# ----------------------------------------------------------------------------------------------- validation
def check_model(model: object, where: str) -> nn.Module:
    """``model`` if it is a torch module, else an InputError naming ``where``."""
    if not isinstance(model, nn.Module):
        raise InputError(f"{where}: model must be a torch.nn.Module, got {type(model).__name__}")
    return model


def check_data(data: object, where: str, name: str = "data", *, min_size: int = 1) -> Dataset:
    """``data`` as a :class:`Dataset` holding at least ``min_size`` samples, else an InputError."""
    if not isinstance(data, (Dataset, tuple)):
        raise InputError(f"{where}: {name} must be a bastion Dataset or a pair (x, y), got {type(data).__name__}")
    ds = as_dataset(data)  # type: ignore[arg-type]
    if len(ds) < min_size:
        raise InputError(f"{where}: {name} holds {len(ds)} sample(s); at least {min_size} are needed")
    return ds


def check_fraction(value: object, name: str, where: str, *, low_open: bool = True, high: float = 1.0) -> float:
    """A float in ``(0, high]`` (or ``[0, high]`` with ``low_open=False``), else an InputError."""
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise InputError(f"{where}: {name} must be a number, got {value!r}")
    v = float(value)
    ok = math.isfinite(v) and (v > 0 if low_open else v >= 0) and v <= high
    if not ok:
        bracket = "(0" if low_open else "[0"
        raise InputError(f"{where}: {name} must lie in {bracket}, {high:g}], got {value!r}")
    return v


def check_positive_int(value: object, name: str, where: str) -> int:
    """A positive int, else an InputError."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or int(value) < 1:
        raise InputError(f"{where}: {name} must be a positive integer, got {value!r}")
    return int(value)


def check_seed(value: object, where: str) -> int:
    """An int seed, else an InputError."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise InputError(f"{where}: seed must be an integer, got {value!r}")
    return int(value)


def check_poison_indices(poison: object, n: int, where: str = "poison_indices") -> Tensor:
    """The true poison as sorted, distinct int64 positions in ``[0, n)``.

    Args:
        poison: positions (a list, an array or a tensor of ints) or a boolean mask of length ``n``.
        n: size of the data set.
        where: how to name the argument in messages.

    Raises:
        InputError: not integers, out of range, or a mask of the wrong length.
    """
    if isinstance(poison, Tensor):
        t = poison.detach().cpu()
    else:
        try:
            arr = np.asarray(poison)
        except (TypeError, ValueError) as exc:
            raise InputError(f"{where} cannot be read as positions: {exc}") from None
        if arr.size == 0:
            return torch.zeros(0, dtype=torch.int64)
        if arr.dtype.kind not in "iub":
            raise InputError(f"{where} must hold integer positions or booleans, got dtype {arr.dtype}")
        t = torch.from_numpy(np.ascontiguousarray(arr))
    if t.ndim != 1:
        raise InputError(f"{where} must be one-dimensional, got shape {tuple(t.shape)}")
    if t.dtype == torch.bool:
        if t.numel() != n:
            raise InputError(f"{where} is a boolean mask of length {t.numel()}, but the data set holds {n} samples")
        return torch.nonzero(t).reshape(-1)
    if t.is_floating_point() or t.is_complex():
        raise InputError(f"{where} must hold integer positions, got dtype {t.dtype}")
    t = t.to(torch.int64)
    if t.numel() and (int(t.min()) < 0 or int(t.max()) >= n):
        bad = int(t[(t < 0) | (t >= n)][0])
        raise InputError(f"{where} holds position {bad}, outside the {n} samples of the data set")
    return torch.unique(t)


def check_classes(classes: object, num_classes: int, where: str) -> list[int]:
    """``classes`` (None for all) as a sorted list of distinct class indices in ``[0, num_classes)``."""
    if classes is None:
        return list(range(num_classes))
    if isinstance(classes, (bool, str)) or not isinstance(classes, (Sequence, np.ndarray, Tensor, range)):
        raise InputError(f"{where}: classes must be a sequence of class indices or None, got {classes!r}")
    out = []
    for c in list(classes):
        if isinstance(c, Tensor):
            c = c.item()
        if isinstance(c, bool) or not isinstance(c, (int, np.integer)) or not 0 <= int(c) < num_classes:
            raise InputError(f"{where}: classes must be indices in [0, {num_classes}), got {c!r}")
        out.append(int(c))
    if not out:
        raise InputError(f"{where}: classes is empty; give at least one class or None for all")
    return sorted(set(out))


def apply_trigger(trigger: object, x: Tensor) -> Tensor:
    """``trigger`` applied to the batch ``x``: ``trigger.apply(x)`` or ``trigger(x)``.

    Raises:
        InputError: ``trigger`` is neither callable nor has an ``apply`` method, or it changes the batch's shape.
    """
    fn = getattr(trigger, "apply", None)
    if fn is None:
        if not callable(trigger):
            raise InputError(
                f"trigger must be callable or have an apply(x) method, got {type(trigger).__name__}"
            )  # fmt: skip
        fn = trigger
    out = fn(x)
    if not isinstance(out, Tensor) or out.shape != x.shape:
        got = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
        raise InputError(f"trigger must map a batch of shape {tuple(x.shape)} to the same shape, got {got}")
    return out


# ------------------------------------------------------------------------------------------ representations
def _last_linear(model: nn.Module) -> nn.Module:
    last = None
    for module in model.modules():
        if isinstance(module, nn.Linear):
            last = module
    if last is None:
        raise InputError(
            "the model has no nn.Linear layer whose input could serve as the penultimate representation; "
            "name the layer to read with layer='...' (a name from model.named_modules())"
        )
    return last


def _named_layer(model: nn.Module, layer: str) -> nn.Module:
    modules = dict(model.named_modules())
    if not isinstance(layer, str) or layer not in modules or layer == "":
        names = [n for n in modules if n]
        shown = ", ".join(names[:12]) + (", ..." if len(names) > 12 else "")
        raise InputError(f"layer {layer!r} is not a module of the model; available: {shown}")
    return modules[layer]


@torch.no_grad()
def representations(
    model: nn.Module,
    data: Dataset | Tensor,
    *,
    layer: str | None = None,
    batch_size: int = 256,
) -> tuple[Tensor, Tensor]:
    """The model's representations of ``data`` at one layer, and its predictions, in one pass.

    By default the penultimate representation: the input of the model's last ``nn.Linear`` (for the zoo's
    ``cnn`` and ``mlp``, the output of the last hidden ReLU), which is what spectral signatures (Tran et al.)
    and activation clustering (Chen et al., "the last hidden layer") analyse.

    Args:
        model: the classifier (run in eval mode on its own device).
        data: a :class:`Dataset` or a tensor of inputs.
        layer: a name from ``model.named_modules()`` whose *output* is read instead; None for the penultimate.
        batch_size: inputs per forward pass.

    Returns:
        ``(features, predictions)``: float32 ``(N, D)`` (flattened) and int64 ``(N,)``, on the model's device.

    Raises:
        InputError: unknown layer, no linear layer for the default, or a model that cannot run on the data.
    """
    check_model(model, "representations")
    bs = check_positive_int(batch_size, "batch_size", "representations")
    x_all = data.x if isinstance(data, Dataset) else data
    if not isinstance(x_all, Tensor):
        raise InputError(f"representations: data must be a Dataset or a tensor, got {type(data).__name__}")
    device = model_device(model)
    target = _last_linear(model) if layer is None else _named_layer(model, layer)
    captured: list[Tensor] = []

    def hook(module: nn.Module, inputs: tuple[Any, ...], output: Any) -> None:
        value = inputs[0] if layer is None else output
        if not isinstance(value, Tensor):
            raise InputError(f"layer {layer!r} does not output a tensor; choose another layer")
        captured.append(value.detach().reshape(value.shape[0], -1).float())

    feats: list[Tensor] = []
    preds: list[Tensor] = []
    handle = target.register_forward_hook(hook)
    try:
        with eval_mode(model):
            for start in range(0, x_all.shape[0], bs):
                xb = x_all[start : start + bs].to(device)
                captured.clear()
                try:
                    logits = model(xb)
                except RuntimeError as exc:
                    raise ModelError(
                        f"the model cannot run on inputs of shape {tuple(xb.shape[1:])}: {str(exc).splitlines()[0]}"
                    ) from None
                if start == 0:
                    check_logits(logits, xb.shape[0])
                if not captured:
                    raise InputError(f"layer {layer or 'last nn.Linear'} was not called by the model's forward pass")
                feats.append(captured[-1])
                preds.append(logits.argmax(dim=1))
    finally:
        handle.remove()
    if not feats:
        return torch.zeros(0, 0, device=device), torch.zeros(0, dtype=torch.int64, device=device)
    return torch.cat(feats), torch.cat(preds)


@torch.no_grad()
def predictions(model: nn.Module, x: Tensor, *, batch_size: int = 512) -> Tensor:
    """Predicted classes of ``x`` (on the model's device), in eval mode, a batch at a time."""
    device = model_device(model)
    out = []
    with eval_mode(model):
        for start in range(0, x.shape[0], batch_size):
            out.append(model(x[start : start + batch_size].to(device)).argmax(dim=1))
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.int64, device=device)


# --------------------------------------------------------------------------------------------- the result
def detection_metrics(suspected: Tensor, poison: Tensor, n: int) -> tuple[float, float, float]:
    """Precision, recall and F1 of a set of suspected positions against the true poison positions.

    ``precision = |S ∩ P| / |S|``, ``recall = |S ∩ P| / |P|``, ``F1 = 2 p r / (p + r)``; an empty denominator gives
    0 (scikit-learn's ``zero_division=0``), and F1 is 0 when both are 0.

    Args:
        suspected: suspected positions (int64).
        poison: true poison positions (int64).
        n: size of the data set (positions lie in ``[0, n)``).

    Returns:
        ``(precision, recall, f1)``.

    Raises:
        InputError: positions that are not integers in ``[0, n)``.
    """
    size = check_positive_int(n, "n", "detection_metrics")
    s = torch.zeros(size, dtype=torch.bool)
    p = torch.zeros(size, dtype=torch.bool)
    s[check_poison_indices(suspected, size, "suspected")] = True
    p[check_poison_indices(poison, size, "poison")] = True
    tp = int((s & p).sum())
    n_s, n_p = int(s.sum()), int(p.sum())
    precision = tp / n_s if n_s else 0.0
    recall = tp / n_p if n_p else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall > 0 else 0.0
    return precision, recall, f1


@dataclass
class DetectionResult:
    """What a data-level poison detector found.

    Attributes:
        method: the detector (``"spectral"``, ``"activation-clustering"``, ``"strip"``, ``"sanitize"``).
        n: number of samples scanned.
        suspected: positions (in the scanned data set) of the samples flagged as poison, sorted, int64 on the CPU.
        scores: per-sample suspicion score, float64 ``(n,)`` on the CPU, higher is more suspicious (the meaning is
            the method's: a squared projection, one minus the relative cluster size, minus the entropy, ...).
        labels: the labels of the scanned samples (int64 ``(n,)``).
        poison_indices: the true poison positions, when given.
        precision: of ``suspected`` against ``poison_indices`` (None when the poison is unknown).
        recall: as ``precision``.
        f1: as ``precision``.
        per_class: one dict per analysed class (class, samples, flagged, and the method's own values).
        config: the method's hyperparameters.
        details: other JSON-able method-specific values (thresholds, ...).
        run_id: id of the run in the result store, or None.
        seconds: wall time.
    """

    method: str
    n: int
    suspected: Tensor
    scores: Tensor
    labels: Tensor
    poison_indices: Tensor | None = None
    precision: float | None = None
    recall: float | None = None
    f1: float | None = None
    per_class: list[dict[str, Any]] = field(default_factory=list)
    config: dict[str, Any] = field(default_factory=dict)
    details: dict[str, Any] = field(default_factory=dict)
    run_id: int | None = None
    seconds: float = 0.0

    def __post_init__(self) -> None:
        self.suspected = torch.unique(self.suspected.detach().cpu().long())
        self.scores = self.scores.detach().cpu().double()
        self.labels = self.labels.detach().cpu().long()
        if self.poison_indices is not None:
            self.poison_indices = torch.unique(self.poison_indices.detach().cpu().long())
            self.precision, self.recall, self.f1 = detection_metrics(self.suspected, self.poison_indices, self.n)

    @property
    def flagged(self) -> Tensor:
        """Boolean mask ``(n,)``: True for the suspected samples."""
        mask = torch.zeros(self.n, dtype=torch.bool)
        mask[self.suspected] = True
        return mask

    @property
    def kept(self) -> Tensor:
        """Positions of the samples not suspected (what a retraining on the sanitised data would use)."""
        return torch.nonzero(~self.flagged).reshape(-1)

    def sanitized(self, data: Dataset) -> Dataset:
        """``data`` without the suspected samples (``data`` must be the scanned data set)."""
        if len(data) != self.n:
            raise InputError(f"sanitized: the data holds {len(data)} samples, the scan covered {self.n}")
        return data.subset(self.kept, name=f"{data.name} (without {len(self.suspected)} suspected)")

    def to_dict(self) -> dict[str, Any]:
        """JSON-able summary (the run summary in the store); the suspected positions are listed."""
        out: dict[str, Any] = {
            "method": self.method,
            "n": self.n,
            "n_suspected": int(self.suspected.numel()),
            "suspected": self.suspected.tolist(),
            "n_poison": None if self.poison_indices is None else int(self.poison_indices.numel()),
            "precision": self.precision,
            "recall": self.recall,
            "f1": self.f1,
            "per_class": self.per_class,
            "config": self.config,
            "details": self.details,
            "run_id": self.run_id,
            "seconds": self.seconds,
        }
        return out

    def table(self) -> str:
        """A plain-text summary: totals, detection quality when known, one line per class."""
        lines = [
            f"backdoor scan: {self.method}",
            f"samples            {self.n}",
            f"suspected          {int(self.suspected.numel())} ({100 * self.suspected.numel() / max(self.n, 1):.1f}%)",
        ]
        if self.poison_indices is not None:
            lines += [
                f"true poison        {int(self.poison_indices.numel())}",
                f"precision          {self.precision:.3f}",
                f"recall             {self.recall:.3f}",
                f"F1                 {self.f1:.3f}",
            ]
        for key, value in self.details.items():
            if isinstance(value, (int, float, str, list)) and not isinstance(value, bool):
                shown = f"{value:.4g}" if isinstance(value, float) else str(value)
                lines.append(f"{key:<18} {shown}")
        if self.per_class:
            poison = self.flagged.clone().zero_()
            if self.poison_indices is not None:
                poison[self.poison_indices] = True
            flagged = self.flagged
            lines.append("class   samples  flagged" + ("  poison  caught" if self.poison_indices is not None else ""))
            for row in self.per_class:
                c = int(row["class"])
                in_c = self.labels == c
                line = f"{c:>5}   {int(in_c.sum()):>7}  {int((flagged & in_c).sum()):>7}"
                if self.poison_indices is not None:
                    line += f"  {int((poison & in_c).sum()):>6}  {int((poison & flagged & in_c).sum()):>6}"
                lines.append(line)
        return "\n".join(lines)


def finish_scan(
    result: DetectionResult,
    *,
    model: nn.Module | None,
    data: Dataset,
    predictions_: Tensor | None,
    store: StoreLike,
    payload: dict[str, Any],
    config: dict[str, Any] | None,
    started: float,
    batch: int = 4096,
) -> DetectionResult:
    """Write one record per scanned sample through :func:`~bastion.store.resumable_run` and stamp the result.

    Used by the detectors that score the whole data set at once (spectral signatures, activation clustering,
    sanitisation): with a store, the samples of an earlier session of the same job are not written again.
    """
    n = result.n
    threat = f"backdoor:{result.method}"
    poison = torch.zeros(n, dtype=torch.bool)
    if result.poison_indices is not None:
        poison[result.poison_indices] = True
    known = result.poison_indices is not None
    flagged = result.flagged
    preds = None if predictions_ is None else predictions_.detach().cpu().long()

    def fingerprints() -> tuple[str, str]:
        return ("none" if model is None else model_fingerprint(model)), data.fingerprint()

    with resumable_run(
        store, kind=SCAN_KIND, payload={"method": result.method, **payload}, fingerprints=fingerprints,
        n_samples=n, threats=[threat], config=config,
    ) as run:  # fmt: skip
        todo = run.todo(n)
        share = (time.perf_counter() - started) / max(n, 1)
        for start in range(0, len(todo), batch):
            rows = []
            for i in todo[start : start + batch]:
                extra: dict[str, Any] = {"score": float(result.scores[i])}
                if known:
                    extra["poison"] = bool(poison[i])
                rows.append(
                    SampleRecord(
                        index=i, threat=threat, label=int(result.labels[i]),
                        clean_pred=-1 if preds is None else int(preds[i]),
                        status="falsified" if bool(flagged[i]) else "unknown", attack=result.method,
                        seconds=share, extra=extra,
                    )
                )  # fmt: skip
            run.write(rows, seconds=share * len(rows))
        return run.finish(result, started=started)


# ----------------------------------------------------------------------------------------------- figures
def plot_scores(result: DetectionResult, path: str | Path, *, bins: int = 50) -> Path:
    """Histogram of a scan's suspicion scores, the true poison apart from the rest when it is known.

    Args:
        result: a :class:`DetectionResult`.
        path: the figure file (format from the suffix).
        bins: histogram bins.

    Returns:
        The path written.
    """
    if not isinstance(result, DetectionResult):
        raise InputError(f"plot_scores needs a DetectionResult, got {type(result).__name__}")
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    from bastion.report.plots import _save

    scores = result.scores.numpy()
    fig, ax = plt.subplots(figsize=(6, 3.5))
    finite = np.isfinite(scores)
    if result.poison_indices is not None and result.poison_indices.numel():
        is_p = np.zeros(result.n, dtype=bool)
        is_p[result.poison_indices.numpy()] = True
        ax.hist(scores[finite & ~is_p], bins=bins, alpha=0.6, label="clean", color="tab:blue")
        ax.hist(scores[finite & is_p], bins=bins, alpha=0.6, label="poison", color="tab:red")
        ax.legend()
    else:
        ax.hist(scores[finite], bins=bins, color="tab:blue")
    ax.set_xlabel("suspicion score")
    ax.set_ylabel("samples")
    ax.set_title(f"{result.method}: {int(result.suspected.numel())} of {result.n} flagged")
    return _save(fig, path)


# Imported last: the submodules use the helpers above.
from bastion.poisoning.defenses.clustering import activation_clustering  # noqa: E402
from bastion.poisoning.defenses.fineprune import fine_prune  # noqa: E402
from bastion.poisoning.defenses.neural_cleanse import (  # noqa: E402
    neural_cleanse,
    plot_anomaly_indices,
    plot_triggers,
    unlearn,
)
from bastion.poisoning.defenses.sanitize import sanitize  # noqa: E402
from bastion.poisoning.defenses.spectral import spectral_signatures  # noqa: E402
from bastion.poisoning.defenses.strip import strip_scan  # noqa: E402
