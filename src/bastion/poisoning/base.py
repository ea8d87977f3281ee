"""The shared contract of the training-phase attacks: poisoned data, triggers and the metrics that judge them.

Every attack of :mod:`bastion.poisoning` returns a :class:`PoisonedData`: the poisoned training set, the positions
of the poisons in it, the attack's name and configuration, and (for backdoors) the :class:`Trigger` that activates
the backdoor at test time, or (for targeted clean-label attacks) the target images the attack wants misclassified.
The victim is then trained on ``poisoned.data`` with bastion's trainer (:func:`bastion.defenses.training.train`,
or ``bastion train --data poisoned.npz``), and judged with the metrics here:

* :func:`clean_accuracy` — accuracy on the clean test set (a stealthy attack keeps it);
* :func:`attack_success_rate` (ASR) — the fraction of triggered test inputs classified as the attacker wants;
* :func:`poisoning_success` — the fraction of target images classified as the adversarial class (clean-label
  targeted attacks: feature collision, gradient matching);
* :func:`evaluate_poisoning` — all of those that apply, as one dictionary (:class:`PoisonReport`).

Layout of the poisoned set. Every attack in this package modifies the training set *in place*: ``poisoned.data``
has the length and the order of the clean set, and ``poison_indices`` are the positions whose input or label the
attack changed. (An attack that appends poisons instead would put them after the clean samples and list those
positions; the contract allows it, none here does.)

File format (:meth:`PoisonedData.save` / :meth:`PoisonedData.load`): an ``.npz`` archive written with
``np.savez_compressed`` holding ``x`` (float32) and ``y`` (int64) — so :func:`bastion.data.load_npz` and
``bastion train --data poisoned.npz`` read it as an ordinary data set — plus ``poison_indices`` (int64), a JSON
string ``config`` (attack, target, mode, hyperparameters, the trigger's kind and parameters, the data set's name,
classes and domain), the trigger's tensors as ``trigger.<name>`` and, when present, ``target_x``, ``target_y`` and
``cross_indices``. Nothing is pickled.
"""

from __future__ import annotations

import json
import math
import zipfile
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bastion.data import Dataset
from bastion.errors import DataError, InputError
from bastion.models.checks import check_logits, eval_mode, model_device

__all__ = [
    "MODES",
    "TRIGGERS",
    "PatternTrigger",
    "PoisonReport",
    "PoisonedData",
    "Trigger",
    "WarpTrigger",
    "attack_success_rate",
    "check_class",
    "check_rate",
    "check_seed",
    "clean_accuracy",
    "evaluate_poisoning",
    "poison_report",
    "poisoning_success",
    "predict",
]

MODES: tuple[str, ...] = ("all-to-one", "all-to-all")
"""Backdoor label maps: every triggered input to the target class, or class ``y`` to ``(y + 1) mod K``."""

_FORMAT = "bastion-poisoned-data"
_VERSION = 1


# ------------------------------------------------------------------------------------------------ validation
def check_rate(rate: Any, what: str = "rate") -> float:
    """``rate`` as a float in (0, 1], or an :class:`InputError` naming it."""
    if isinstance(rate, bool) or not isinstance(rate, (int, float, np.integer, np.floating)):
        raise InputError(f"{what} must be a number in (0, 1] (the fraction of the training set poisoned), got {rate!r}")
    value = float(rate)
    if not (math.isfinite(value) and 0.0 < value <= 1.0):
        raise InputError(f"{what} must lie in (0, 1] (the fraction of the training set poisoned), got {rate!r}")
    return value


def check_class(value: Any, num_classes: int, what: str = "target") -> int:
    """``value`` as a class index in ``[0, num_classes)``, or an :class:`InputError` naming it."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise InputError(f"{what} must be a class index (an int in [0, {num_classes})), got {value!r}")
    if not 0 <= int(value) < num_classes:
        raise InputError(f"{what} = {int(value)} is outside the {num_classes} classes [0, {num_classes}) of the data")
    return int(value)


def check_seed(seed: Any) -> int:
    """``seed`` as an int, or an :class:`InputError`."""
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise InputError(f"seed must be an integer, got {seed!r}")
    return int(seed)


def check_mode(mode: Any) -> str:
    """``mode`` as one of :data:`MODES` (``"all-to-one"`` or ``"all-to-all"``), or an :class:`InputError`."""
    if not isinstance(mode, str) or mode.lower().replace("_", "-") not in MODES:
        raise InputError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
    return mode.lower().replace("_", "-")


def _check_image_shape(shape: Any, what: str) -> tuple[int, int, int]:
    if (
        not isinstance(shape, (tuple, list))
        or len(shape) != 3
        or any(isinstance(d, bool) or not isinstance(d, (int, np.integer)) or d < 1 for d in shape)
    ):
        raise InputError(f"{what} needs images of shape (C, H, W), got feature shape {shape!r}")
    return int(shape[0]), int(shape[1]), int(shape[2])


def _check_batch(x: Any, feature_shape: tuple[int, ...], what: str) -> Tensor:
    if not isinstance(x, Tensor):
        raise InputError(f"{what}: x must be a torch tensor of shape (N, {', '.join(map(str, feature_shape))})")
    if not x.is_floating_point():
        raise InputError(f"{what}: x must be a floating-point tensor, got dtype {x.dtype}")
    if tuple(x.shape[1:]) != tuple(feature_shape) or x.ndim != len(feature_shape) + 1:
        raise InputError(
            f"{what}: x has shape {tuple(x.shape)}, expected a batch (N, {', '.join(map(str, feature_shape))}) "
            "(add the batch axis with x[None] for a single input)"
        )
    return x


# -------------------------------------------------------------------------------------------------- triggers
TRIGGERS: dict[str, type[Trigger]] = {}
"""Trigger classes by their ``kind``, used to rebuild a trigger from a saved file."""


class Trigger(ABC):
    """A backdoor trigger: a fixed, deterministic transformation that stamps the trigger on clean inputs.

    ``trigger.apply(x)`` takes a batch ``x`` of shape ``(N, *feature_shape)`` on any device and returns a new
    tensor of the same shape, dtype and device with the trigger on every input; ``x`` is not modified. The result
    is a function of ``x`` only (no randomness: applying it twice gives the same tensor), computed in one batched
    operation, and stays inside the input domain whenever ``x`` does (every trigger here is a convex combination
    of input values and of a pattern inside the domain). Subclasses register themselves in :data:`TRIGGERS` by
    their ``kind`` so :meth:`PoisonedData.load` can rebuild them.

    Attributes:
        kind: the registry name (``"pattern"``, ``"warp"``).
        feature_shape: the shape of one input the trigger applies to.
    """

    kind: ClassVar[str] = ""
    feature_shape: tuple[int, ...]

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if cls.kind:
            TRIGGERS[cls.kind] = cls

    def apply(self, x: Tensor) -> Tensor:
        """The inputs ``x`` with the trigger stamped on them.

        Args:
            x: a batch ``(N, *feature_shape)`` of floating-point inputs, on any device.

        Returns:
            A new tensor of the same shape, dtype and device.

        Raises:
            InputError: ``x`` is not a floating tensor of shape ``(N, *feature_shape)``.
        """
        _check_batch(x, self.feature_shape, f"{type(self).__name__}.apply")
        return self._apply(x)

    __call__ = apply

    @abstractmethod
    def _apply(self, x: Tensor) -> Tensor:
        """Stamp the trigger on a checked batch."""

    @abstractmethod
    def state(self) -> tuple[dict[str, Any], dict[str, Tensor]]:
        """``(params, tensors)``: JSON-able parameters and named CPU tensors that rebuild the trigger."""

    @classmethod
    @abstractmethod
    def from_state(cls, params: Mapping[str, Any], tensors: Mapping[str, Tensor]) -> Trigger:
        """Rebuild a trigger from :meth:`state`."""


class PatternTrigger(Trigger):
    """A masked pattern: ``x' = (1 - m) ⊙ x + m ⊙ p`` with a fixed pattern ``p`` and mask ``m`` in [0, 1].

    One class covers the stamped patch of BadNets (``m`` = 1 on the patch, 0 elsewhere; Gu, Dolan-Gavitt & Garg,
    "BadNets: Identifying Vulnerabilities in the Machine Learning Model Supply Chain", arXiv 2017) and the blended
    image of Chen et al. (``m`` = α everywhere; "Targeted Backdoor Attacks on Deep Learning Systems Using Data
    Poisoning", arXiv 2017).

    Args:
        pattern: the pattern ``p``, shape ``feature_shape`` (or broadcastable to it), values in the input domain.
        mask: the mask ``m``, broadcastable to ``feature_shape``, values in [0, 1].
    """

    kind = "pattern"

    def __init__(self, pattern: Tensor, mask: Tensor) -> None:
        if not isinstance(pattern, Tensor) or not isinstance(mask, Tensor):
            raise InputError("PatternTrigger: pattern and mask must be torch tensors")
        if not pattern.is_floating_point() or not mask.is_floating_point():
            raise InputError("PatternTrigger: pattern and mask must be floating-point tensors")
        if not (bool(torch.isfinite(pattern).all()) and bool(torch.isfinite(mask).all())):
            raise InputError("PatternTrigger: pattern and mask must be finite")
        if bool((mask < 0).any()) or bool((mask > 1).any()):
            raise InputError("PatternTrigger: mask values must lie in [0, 1]")
        try:
            shape = torch.broadcast_shapes(pattern.shape, mask.shape)
        except RuntimeError:
            raise InputError(
                f"PatternTrigger: pattern {tuple(pattern.shape)} and mask {tuple(mask.shape)} do not broadcast"
            ) from None
        self.feature_shape = tuple(int(d) for d in shape)
        self.pattern = pattern.detach().to("cpu", torch.float32).expand(shape).contiguous()
        self.mask = mask.detach().to("cpu", torch.float32).expand(shape).contiguous()

    def _apply(self, x: Tensor) -> Tensor:
        m = self.mask.to(device=x.device, dtype=x.dtype)
        p = self.pattern.to(device=x.device, dtype=x.dtype)
        return x * (1 - m) + p * m

    def state(self) -> tuple[dict[str, Any], dict[str, Tensor]]:
        return {}, {"pattern": self.pattern, "mask": self.mask}

    @classmethod
    def from_state(cls, params: Mapping[str, Any], tensors: Mapping[str, Tensor]) -> PatternTrigger:
        return cls(tensors["pattern"], tensors["mask"])

    def __repr__(self) -> str:
        support = int((self.mask > 0).sum())
        return (
            f"PatternTrigger(shape={self.feature_shape}, mask_support={support}, max_mask={float(self.mask.max()):g})"
        )


class WarpTrigger(Trigger):
    """An image warp: ``x' = grid_sample(x, grid)`` with a fixed sampling grid (bilinear, ``align_corners=True``).

    The trigger of WaNet (Nguyen & Tran, "WaNet — Imperceptible Warping-based Backdoor Attack", ICLR 2021); the
    grid is built by :class:`bastion.poisoning.backdoor.WaNet`. The grid holds normalised ``(x, y)`` sampling
    coordinates in [-1, 1] for every output pixel; the identity grid reproduces the input exactly (up to rounding).

    Args:
        grid: the sampling grid, shape ``(H, W, 2)``, values in [-1, 1].
        channels: the number of channels ``C`` of the images it applies to.
    """

    kind = "warp"

    def __init__(self, grid: Tensor, channels: int) -> None:
        if not isinstance(grid, Tensor) or grid.ndim != 3 or grid.shape[-1] != 2 or not grid.is_floating_point():
            raise InputError("WarpTrigger: grid must be a floating tensor of shape (H, W, 2)")
        if not bool(torch.isfinite(grid).all()) or float(grid.abs().max()) > 1.0 + 1e-6:
            raise InputError("WarpTrigger: grid values must be finite and lie in [-1, 1]")
        if isinstance(channels, bool) or not isinstance(channels, (int, np.integer)) or channels < 1:
            raise InputError(f"WarpTrigger: channels must be a positive int, got {channels!r}")
        self.grid = grid.detach().to("cpu", torch.float32).contiguous()
        self.feature_shape = (int(channels), int(grid.shape[0]), int(grid.shape[1]))

    def _apply(self, x: Tensor) -> Tensor:
        grid = self.grid.to(device=x.device, dtype=x.dtype).expand(x.shape[0], -1, -1, -1)
        return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=True)

    def state(self) -> tuple[dict[str, Any], dict[str, Tensor]]:
        return {"channels": self.feature_shape[0]}, {"grid": self.grid}

    @classmethod
    def from_state(cls, params: Mapping[str, Any], tensors: Mapping[str, Tensor]) -> WarpTrigger:
        return cls(tensors["grid"], int(params["channels"]))

    def __repr__(self) -> str:
        return f"WarpTrigger(shape={self.feature_shape})"


# ---------------------------------------------------------------------------------------------- poisoned data
def _index_tensor(idx: Any, n: int, what: str) -> Tensor:
    t = torch.as_tensor(idx).detach().cpu() if not isinstance(idx, Tensor) else idx.detach().cpu()
    if t.ndim != 1 or (t.numel() and (t.is_floating_point() or t.dtype == torch.bool)):
        raise InputError(f"{what} must be a one-dimensional tensor of integer positions")
    t = t.to(torch.int64)
    if t.numel() and (int(t.min()) < 0 or int(t.max()) >= n):
        raise InputError(f"{what} holds positions outside the {n} samples of the poisoned data set")
    if torch.unique(t).numel() != t.numel():
        raise InputError(f"{what} holds repeated positions")
    return t


@dataclass(frozen=True, eq=False)
class PoisonedData:
    """A poisoned training set and what is needed to judge the attack that made it.

    Every attack in :mod:`bastion.poisoning` modifies the clean training set in place: ``data`` has the clean set's
    length and order, and ``poison_indices`` lists the positions whose input and/or label the attack changed
    (for label flipping: relabelled samples; for backdoors: triggered and relabelled samples; for clean-label
    attacks: perturbed samples that keep their labels). All other positions hold the clean samples unchanged,
    except ``cross_indices`` (WaNet's noise mode: inputs warped with a random grid that keep their true labels).

    Attributes:
        data: the poisoned training set.
        poison_indices: int64 CPU tensor of the poisons' positions in ``data``, sorted, without repeats.
        attack: the attack's name (``"labelflip"``, ``"badnets"``, ``"blended"``, ``"wanet"``, ``"collision"``,
            ``"matching"``).
        target: the class the attack steers to — the backdoor's target class (all-to-one), the adversarial class
            of a targeted clean-label attack, or the destination of a single flipped class pair; ``None`` when
            there is none (random label flipping, all-to-all backdoors).
        mode: the backdoor label map, ``"all-to-one"`` or ``"all-to-all"`` (:data:`MODES`); ``None`` for attacks
            without a trigger.
        trigger: the backdoor trigger, to stamp on test inputs (:func:`attack_success_rate`); ``None`` otherwise.
        config: the attack's hyperparameters and anything else worth keeping (JSON values only).
        target_x: the target images of a targeted attack (``(T, *feature_shape)``, CPU), which should be
            classified as ``target`` after training on ``data`` (:func:`poisoning_success`); ``None`` otherwise.
        target_y: their true labels (int64, ``(T,)``), when known.
        cross_indices: positions of WaNet's noise-mode samples (modified inputs, true labels); ``None`` otherwise.
    """

    data: Dataset
    poison_indices: Tensor
    attack: str
    target: int | None = None
    mode: str | None = None
    trigger: Trigger | None = None
    config: dict[str, Any] = field(default_factory=dict)
    target_x: Tensor | None = None
    target_y: Tensor | None = None
    cross_indices: Tensor | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.data, Dataset):
            raise InputError(f"PoisonedData.data must be a bastion Dataset, got {type(self.data).__name__}")
        n = len(self.data)
        idx = torch.sort(_index_tensor(self.poison_indices, n, "poison_indices")).values
        object.__setattr__(self, "poison_indices", idx)
        if self.cross_indices is not None:
            cross = torch.sort(_index_tensor(self.cross_indices, n, "cross_indices")).values
            object.__setattr__(self, "cross_indices", cross)
        if not isinstance(self.attack, str) or not self.attack:
            raise InputError("PoisonedData.attack must be the attack's name")
        if self.target is not None:
            object.__setattr__(self, "target", check_class(self.target, self.data.num_classes, "target"))
        if self.mode is not None:
            object.__setattr__(self, "mode", check_mode(self.mode))
        if self.trigger is not None:
            if not isinstance(self.trigger, Trigger):
                raise InputError(f"PoisonedData.trigger must be a Trigger, got {type(self.trigger).__name__}")
            if tuple(self.trigger.feature_shape) != self.data.feature_shape:
                raise InputError(
                    f"the trigger applies to inputs of shape {self.trigger.feature_shape}, the data holds "
                    f"{self.data.feature_shape}"
                )
            if self.mode is None:
                object.__setattr__(self, "mode", "all-to-one")
            if self.mode == "all-to-one" and self.target is None:
                raise InputError("an all-to-one backdoor needs its target class")
        if self.target_x is not None:
            tx = _check_batch(self.target_x, self.data.feature_shape, "PoisonedData.target_x").detach().cpu()
            object.__setattr__(self, "target_x", tx)
            if self.target is None:
                raise InputError("target images need the adversarial class they should be classified as: target")
            if self.target_y is not None:
                ty = torch.as_tensor(self.target_y).detach().cpu().to(torch.int64).reshape(-1)
                if ty.shape[0] != tx.shape[0]:
                    raise InputError(f"target_y holds {ty.shape[0]} labels for {tx.shape[0]} target images")
                object.__setattr__(self, "target_y", ty)
        elif self.target_y is not None:
            raise InputError("target_y was given without target_x")
        try:
            json.dumps(self.config)
        except (TypeError, ValueError):
            raise InputError("PoisonedData.config must hold JSON values only") from None

    # ------------------------------------------------------------------------------------------- views
    @property
    def n_poisons(self) -> int:
        """Number of poisoned samples."""
        return int(self.poison_indices.numel())

    @property
    def rate(self) -> float:
        """Fraction of the training set that is poisoned."""
        return self.n_poisons / max(1, len(self.data))

    def poison_mask(self) -> Tensor:
        """Boolean CPU tensor of length ``len(data)``: True at the poisons."""
        mask = torch.zeros(len(self.data), dtype=torch.bool)
        mask[self.poison_indices] = True
        return mask

    def __repr__(self) -> str:
        extra = f", trigger={self.trigger!r}" if self.trigger is not None else ""
        return (
            f"PoisonedData(attack={self.attack!r}, n={len(self.data)}, n_poisons={self.n_poisons}, "
            f"target={self.target}, mode={self.mode}{extra})"
        )

    # ------------------------------------------------------------------------------------------- files
    def save(self, path: str | Path) -> Path:
        """Write the poisoned set to an ``.npz`` archive that :func:`bastion.data.load_npz` also reads.

        Args:
            path: the file; must end in ``.npz``, its folder must exist. An existing file is replaced.

        Returns:
            The path written.

        Raises:
            InputError: the name does not end in ``.npz`` or the folder does not exist.
        """
        p = Path(path).expanduser()
        if p.suffix.lower() != ".npz":
            raise InputError(f"{path}: a poisoned data set is saved as .npz; give a file name ending in .npz")
        if not p.resolve().parent.is_dir():
            raise InputError(f"{path}: the folder {p.resolve().parent} does not exist")
        arrays: dict[str, np.ndarray] = {
            "x": self.data.x.detach().cpu().numpy().astype(np.float32, copy=False),
            "y": self.data.y.detach().cpu().numpy().astype(np.int64, copy=False),
            "poison_indices": self.poison_indices.numpy(),
        }
        trigger_meta = None
        if self.trigger is not None:
            params, tensors = self.trigger.state()
            trigger_meta = {"kind": self.trigger.kind, "params": params, "tensors": sorted(tensors)}
            for name, t in tensors.items():
                arrays[f"trigger.{name}"] = t.detach().cpu().numpy()
        if self.target_x is not None:
            arrays["target_x"] = self.target_x.numpy().astype(np.float32, copy=False)
        if self.target_y is not None:
            arrays["target_y"] = self.target_y.numpy()
        if self.cross_indices is not None:
            arrays["cross_indices"] = self.cross_indices.numpy()
        meta = {
            "format": _FORMAT,
            "version": _VERSION,
            "attack": self.attack,
            "target": self.target,
            "mode": self.mode,
            "config": self.config,
            "trigger": trigger_meta,
            "name": self.data.name,
            "num_classes": self.data.num_classes,
            "domain": list(self.data.domain),
        }
        arrays["config"] = np.array(json.dumps(meta))
        # np.savez appends ".npz" to names without it; write through a handle so the name is exactly ``p``.
        with open(p, "wb") as handle:
            np.savez_compressed(handle, **arrays)  # type: ignore[arg-type]
        return p

    @classmethod
    def load(cls, path: str | Path) -> PoisonedData:
        """Read a file written by :meth:`save`.

        Args:
            path: the ``.npz`` archive.

        Returns:
            The poisoned data, with its trigger and targets rebuilt.

        Raises:
            DataError: the file is missing, not an archive, or not a bastion poisoned data set.
        """
        p = Path(path).expanduser()
        if not p.is_file():
            raise DataError(f"{path}: no such file")
        try:
            archive: Any = np.load(p, allow_pickle=False)
        except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
            raise DataError(f"{path}: cannot read it as a .npz archive ({exc})") from None
        if not hasattr(archive, "files"):
            raise DataError(f"{path}: holds a single array, not a poisoned data set archive")
        with archive:
            keys = set(archive.files)
            missing = {"x", "y", "poison_indices", "config"} - keys
            if missing:
                raise DataError(
                    f"{path}: not a bastion poisoned data set (missing {', '.join(sorted(missing))}); write it with "
                    "PoisonedData.save or `bastion poison`"
                )
            try:
                meta = json.loads(str(archive["config"]))
            except (ValueError, TypeError):
                raise DataError(f"{path}: the config entry is not valid JSON") from None
            if not isinstance(meta, dict) or meta.get("format") != _FORMAT:
                raise DataError(f"{path}: not a bastion poisoned data set (unknown format)")
            if int(meta.get("version", 0)) > _VERSION:
                raise DataError(f"{path}: written by a newer bastion (format version {meta['version']}); upgrade")
            arrays = {k: archive[k] for k in keys if k != "config"}
        data = Dataset(
            arrays["x"],
            arrays["y"],
            num_classes=int(meta["num_classes"]),
            name=str(meta.get("name", p.name)),
            domain=tuple(meta.get("domain", (0.0, 1.0))),  # type: ignore[arg-type]
        )
        trigger = None
        tmeta = meta.get("trigger")
        if tmeta is not None:
            kind = tmeta.get("kind")
            if kind not in TRIGGERS:
                raise DataError(f"{path}: unknown trigger kind {kind!r}; known: {', '.join(sorted(TRIGGERS))}")
            tensors = {}
            for name in tmeta.get("tensors", []):
                if f"trigger.{name}" not in arrays:
                    raise DataError(f"{path}: the trigger's tensor {name!r} is missing")
                tensors[name] = torch.from_numpy(np.ascontiguousarray(arrays[f"trigger.{name}"]))
            trigger = TRIGGERS[kind].from_state(tmeta.get("params", {}), tensors)

        def optional(key: str) -> Tensor | None:
            return torch.from_numpy(np.ascontiguousarray(arrays[key])) if key in arrays else None

        return cls(
            data=data,
            poison_indices=torch.from_numpy(np.ascontiguousarray(arrays["poison_indices"]).astype(np.int64)),
            attack=str(meta["attack"]),
            target=meta.get("target"),
            mode=meta.get("mode"),
            trigger=trigger,
            config=dict(meta.get("config") or {}),
            target_x=optional("target_x"),
            target_y=optional("target_y"),
            cross_indices=optional("cross_indices"),
        )


# --------------------------------------------------------------------------------------------------- metrics
def _check_model(model: Any) -> nn.Module:
    if not isinstance(model, nn.Module):
        raise InputError(f"model must be a torch.nn.Module returning logits, got {type(model).__name__}")
    return model


@torch.no_grad()
def predict(model: nn.Module, x: Tensor, *, batch_size: int = 512) -> Tensor:
    """Predicted labels of ``model`` on ``x``, batched, in eval mode, on the model's device; returned on the CPU.

    Args:
        model: a classifier returning logits ``(N, K)``.
        x: inputs ``(N, ...)``.
        batch_size: inputs per forward pass.

    Returns:
        int64 CPU tensor ``(N,)``.
    """
    _check_model(model)
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise InputError(f"batch_size must be a positive int, got {batch_size!r}")
    device = model_device(model)
    out = []
    with eval_mode(model):
        for start in range(0, x.shape[0], batch_size):
            xb = x[start : start + batch_size].to(device)
            logits = model(xb)
            if start == 0:
                check_logits(logits, xb.shape[0])
            out.append(logits.argmax(dim=1).cpu())
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.int64)


def clean_accuracy(model: nn.Module, test: Dataset, *, batch_size: int = 512) -> float:
    """Accuracy of ``model`` on the clean test set (a stealthy poisoning attack leaves it nearly unchanged).

    Args:
        model: the (possibly poisoned) classifier.
        test: clean test data.
        batch_size: inputs per forward pass.

    Returns:
        The fraction of ``test`` classified correctly.
    """
    _check_model(model)
    if not isinstance(test, Dataset):
        raise InputError(f"test must be a bastion Dataset, got {type(test).__name__}")
    if len(test) == 0:
        raise InputError("test holds no samples")
    pred = predict(model, test.x, batch_size=batch_size)
    return float((pred == test.y.cpu()).float().mean())


def attack_success_rate(
    model: nn.Module,
    test: Dataset,
    trigger: Trigger | Callable[[Tensor], Tensor],
    target: int | None = None,
    *,
    mode: str = "all-to-one",
    batch_size: int = 512,
) -> float:
    """Attack success rate (ASR) of a backdoor: how often a triggered test input gets the attacker's label.

    * ``mode="all-to-one"``: over the test inputs whose true label is **not** ``target`` (inputs of the target
      class would count as successes without any backdoor), the fraction whose triggered version
      ``trigger.apply(x)`` is classified as ``target``.
    * ``mode="all-to-all"``: over all test inputs, the fraction whose triggered version is classified as
      ``(y + 1) mod K``, ``y`` the true label and ``K = test.num_classes``; ``target`` is ignored.

    The inputs are triggered in batches on the model's device; the model is put in eval mode and restored.

    Args:
        model: the (possibly backdoored) classifier.
        test: clean test data (the trigger is applied here).
        trigger: the backdoor trigger (a :class:`Trigger`, e.g. ``poisoned.trigger``), or any function
            ``x -> x_triggered`` on a batch.
        target: the target class; required for ``all-to-one``.
        mode: ``"all-to-one"`` or ``"all-to-all"``.
        batch_size: inputs per forward pass.

    Returns:
        The ASR in [0, 1].

    Raises:
        InputError: bad model, data, trigger, target or mode, or no test input outside the target class.
    """
    _check_model(model)
    if not isinstance(test, Dataset):
        raise InputError(f"test must be a bastion Dataset, got {type(test).__name__}")
    stamp: Callable[[Tensor], Tensor]
    if isinstance(trigger, Trigger):
        if tuple(trigger.feature_shape) != test.feature_shape:
            raise InputError(
                f"the trigger applies to inputs {trigger.feature_shape}, the test data holds {test.feature_shape}"
            )
        stamp = trigger.apply
    elif callable(trigger):
        stamp = trigger  # e.g. a reverse-engineered trigger, or a test's own stamp function
    else:
        raise InputError(f"trigger must be a bastion Trigger or a function x -> x', got {type(trigger).__name__}")
    mode = check_mode(mode)
    y = test.y.cpu()
    if mode == "all-to-one":
        if target is None:
            raise InputError("an all-to-one ASR needs the target class: target=")
        tgt = check_class(target, test.num_classes, "target")
        keep = torch.nonzero(y != tgt).reshape(-1)
        if keep.numel() == 0:
            raise InputError(f"every test input is of the target class {tgt}; the ASR needs inputs of other classes")
        wanted = torch.full((keep.numel(),), tgt, dtype=torch.int64)
    else:
        keep = torch.arange(len(test))
        wanted = (y + 1) % test.num_classes
    device = model_device(model)
    hits = 0
    with torch.no_grad(), eval_mode(model):
        for start in range(0, keep.numel(), batch_size):
            idx = keep[start : start + batch_size]
            xb = stamp(test.x[idx.to(test.x.device)].to(device))
            logits = model(xb)
            if start == 0:
                check_logits(logits, xb.shape[0])
            hits += int((logits.argmax(dim=1).cpu() == wanted[start : start + batch_size]).sum())
    return hits / keep.numel()


def poisoning_success(model: nn.Module, target_x: Tensor, target: int, *, batch_size: int = 512) -> float:
    """Success of a targeted clean-label attack: the fraction of target images classified as ``target``.

    Args:
        model: the victim, trained on the poisoned data.
        target_x: the target images ``(T, *feature_shape)``.
        target: the adversarial class they should be classified as.
        batch_size: inputs per forward pass.

    Returns:
        The fraction in [0, 1].
    """
    _check_model(model)
    if not isinstance(target_x, Tensor) or target_x.ndim < 2 or target_x.shape[0] == 0:
        raise InputError("target_x must be a non-empty batch of target images (T, *feature_shape)")
    pred = predict(model, target_x, batch_size=batch_size)
    return float((pred == int(target)).float().mean())


@dataclass(frozen=True)
class PoisonReport:
    """What a poisoning attack achieved on a victim trained on its data.

    Attributes:
        attack: the attack's name.
        clean_accuracy: accuracy on the clean test set.
        attack_success_rate: the backdoor's ASR (:func:`attack_success_rate`); None without a trigger.
        poisoning_success: fraction of target images classified as ``target`` (:func:`poisoning_success`); None
            without target images.
        n_poisons: number of poisoned training samples.
        rate: fraction of the training set poisoned.
        target: the target / adversarial class, if any.
        mode: the backdoor label map, if any.
    """

    attack: str
    clean_accuracy: float
    attack_success_rate: float | None
    poisoning_success: float | None
    n_poisons: int
    rate: float
    target: int | None
    mode: str | None

    def to_dict(self) -> dict[str, Any]:
        """The report as a JSON-able dictionary."""
        return {
            "attack": self.attack,
            "clean_accuracy": self.clean_accuracy,
            "attack_success_rate": self.attack_success_rate,
            "poisoning_success": self.poisoning_success,
            "n_poisons": self.n_poisons,
            "rate": self.rate,
            "target": self.target,
            "mode": self.mode,
        }


def poison_report(
    model: nn.Module, clean_test: Dataset, poisoned: PoisonedData, *, batch_size: int = 512
) -> PoisonReport:
    """Clean accuracy, and the ASR and/or poisoning success that apply, of a victim trained on ``poisoned.data``.

    Args:
        model: the victim.
        clean_test: clean test data.
        poisoned: the attack's output.
        batch_size: inputs per forward pass.

    Returns:
        A :class:`PoisonReport`.
    """
    if not isinstance(poisoned, PoisonedData):
        raise InputError(f"poisoned must be a PoisonedData, got {type(poisoned).__name__}")
    acc = clean_accuracy(model, clean_test, batch_size=batch_size)
    asr = None
    if poisoned.trigger is not None:
        asr = attack_success_rate(
            model, clean_test, poisoned.trigger, poisoned.target, mode=poisoned.mode or "all-to-one",
            batch_size=batch_size,
        )  # fmt: skip
    success = None
    if poisoned.target_x is not None and poisoned.target is not None:
        success = poisoning_success(model, poisoned.target_x, poisoned.target, batch_size=batch_size)
    return PoisonReport(
        attack=poisoned.attack, clean_accuracy=acc, attack_success_rate=asr, poisoning_success=success,
        n_poisons=poisoned.n_poisons, rate=poisoned.rate, target=poisoned.target, mode=poisoned.mode,
    )  # fmt: skip


def evaluate_poisoning(
    model: nn.Module, clean_test: Dataset, poisoned: PoisonedData, *, batch_size: int = 512
) -> dict[str, Any]:
    """:func:`poison_report` as a dictionary (``clean_accuracy``, ``attack_success_rate``, ``poisoning_success``,
    ``n_poisons``, ``rate``, ``target``, ``mode``, ``attack``).

    Args:
        model: the victim, trained on ``poisoned.data``.
        clean_test: clean test data.
        poisoned: the attack's output.
        batch_size: inputs per forward pass.
    """
    return poison_report(model, clean_test, poisoned, batch_size=batch_size).to_dict()


# ------------------------------------------------------------------------------------------ shared helpers
class PoisonAttack:
    """Shared pieces of the attacks: hyperparameter bookkeeping, seeded choice of positions, ``repr``.

    Subclasses set ``name`` and record their hyperparameters in ``self._params`` (shown by ``repr`` and stored in
    ``PoisonedData.config``).
    """

    name: ClassVar[str] = ""

    def __init__(self) -> None:
        self._params: dict[str, Any] = {}

    def config(self) -> dict[str, Any]:
        """The attack's hyperparameters (JSON values)."""
        return json.loads(json.dumps(self._params, default=str))

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self._params.items())
        return f"{type(self).__name__}({args})"


def n_from_rate(rate: float, n: int) -> int:
    """Number of poisons for a poison rate on ``n`` samples: ``round(rate * n)``, at least 1."""
    return max(1, min(n, round(rate * n)))


def choose(candidates: Tensor, k: int, generator: torch.Generator) -> Tensor:
    """``k`` positions drawn without replacement from ``candidates`` (a CPU LongTensor), sorted."""
    if k > candidates.numel():
        raise InputError(f"cannot choose {k} samples among {candidates.numel()} candidates")
    perm = torch.randperm(candidates.numel(), generator=generator)[:k]
    return torch.sort(candidates[perm]).values


def replace_rows(data: Dataset, idx: Tensor, x_new: Tensor | None, y_new: Tensor | None, *, name: str) -> Dataset:
    """A copy of ``data`` with rows ``idx`` of x and/or y replaced (validated again by the Dataset)."""
    x = data.x.clone()
    y = data.y.clone()
    if x_new is not None:
        x[idx.to(x.device)] = x_new.to(device=x.device, dtype=x.dtype)
    if y_new is not None:
        y[idx.to(y.device)] = y_new.to(device=y.device, dtype=y.dtype)
    return Dataset(x, y, num_classes=data.num_classes, name=name, domain=data.domain)


def check_dataset(data: Any, what: str = "data") -> Dataset:
    """``data`` if it is a non-empty :class:`Dataset`, else an :class:`InputError`."""
    if not isinstance(data, Dataset):
        raise InputError(f"{what} must be a bastion Dataset, got {type(data).__name__}")
    if len(data) == 0:
        raise InputError(f"{what} holds no samples")
    return data


def check_image_data(data: Dataset, what: str) -> tuple[int, int, int]:
    """The ``(C, H, W)`` of an image data set, or an :class:`InputError` for non-image features."""
    return _check_image_shape(list(data.feature_shape), what)


def check_target_images(target_x: Any, data: Dataset, what: str) -> Tensor:
    """Target images as a CPU float batch ``(T, *feature_shape)``: a single image gets the batch axis."""
    if not isinstance(target_x, Tensor):
        raise InputError(f"{what}: target_x must be a tensor of target images (T, *feature_shape)")
    t = target_x.detach()
    if tuple(t.shape) == data.feature_shape:
        t = t[None]
    _check_batch(t, data.feature_shape, what)
    if t.shape[0] == 0:
        raise InputError(f"{what}: target_x holds no image")
    low, high = data.domain
    if not bool(torch.isfinite(t).all()) or float(t.min()) < low - 1e-6 or float(t.max()) > high + 1e-6:
        raise InputError(f"{what}: target images must be finite and inside the data domain [{low:g}, {high:g}]")
    return t.cpu().to(torch.float32)
