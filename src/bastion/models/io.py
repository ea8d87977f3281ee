"""Saving and loading models safely.

A model is named by a *spec* string, the same on the command line and in the Python API:

``PATH.pt2``
    a program saved with :func:`torch.export.save`.
``zoo:NAME@PATH``
    a zoo architecture whose weights are in ``PATH``: a file written by :func:`save_model` (architecture and
    configuration inside) or a bare state dict (then ``input_shape`` and ``num_classes`` must be given).
``PATH.pt`` / ``PATH.pth``
    a file written by :func:`save_model`.
``PATH.onnx``
    an ONNX classifier, converted by :func:`bastion.models.onnx.load_onnx` (checked against onnxruntime).
``package.module:factory`` or ``path/to/file.py:factory``
    a function called with no arguments that returns an ``nn.Module``.

Weight files are read with ``torch.load(weights_only=True)``: bastion never unpickles arbitrary objects, which
could run code. Every failure becomes a :class:`~bastion.errors.ModelError` that names the spec and what to do.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import json
import logging
import os
import re
import sys
import zipfile
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, TypeGuard

import torch
from torch import Tensor, nn

from bastion.errors import ModelError
from bastion.models.checks import check_logits, eval_mode, model_device
from bastion.models.zoo import ZOO, build_model

__all__ = ["FORMAT", "VERSION", "ExportedModule", "load_callable", "load_model", "save_model"]

FORMAT = "bastion-model"
VERSION = 1

_SPEC_FORMS = (
    "PATH.pt2 (torch.export program), PATH.onnx (ONNX classifier), zoo:NAME@PATH (zoo architecture + weights), "
    "PATH.pt / PATH.pth (file written by bastion.models.save_model), package.module:factory or "
    "path/to/file.py:factory (function returning an nn.Module)"
)
_MAX_DETAIL = 1200


def _detail(exc: BaseException) -> str:
    """One readable line (or a few) from an exception, without its traceback."""
    text = str(exc).strip() or type(exc).__name__
    if len(text) > _MAX_DETAIL:
        text = text[:_MAX_DETAIL] + " ..."
    return f"{type(exc).__name__}: {text}"


# ---------------------------------------------------------------------------------------------------- saving


def _clean_config(config: Any, where: str) -> dict[str, Any]:
    if not isinstance(config, Mapping):
        raise ModelError(f"{where}: config must be a dict, got {type(config).__name__}")
    try:
        # The JSON round trip turns tuples into lists and guarantees that weights_only=True can read it back.
        clean = json.loads(json.dumps(dict(config)))
    except (TypeError, ValueError) as exc:
        raise ModelError(f"{where}: config must be JSON-serialisable (numbers, strings, lists, dicts): {exc}") from exc
    for key in ("input_shape", "num_classes"):
        if key not in clean:
            raise ModelError(f"{where}: config lacks {key!r}; it needs input_shape, num_classes and the arch kwargs")
    return clean


def _build_from_config(arch: str, config: Mapping[str, Any], where: str) -> nn.Module:
    if arch not in ZOO:
        raise ModelError(f"{where}: unknown architecture {arch!r}; available: {', '.join(sorted(ZOO))}")
    kwargs = dict(config)
    shape = kwargs.pop("input_shape", None)
    num_classes = kwargs.pop("num_classes", None)
    if not isinstance(shape, Sequence) or isinstance(shape, str):
        raise ModelError(f"{where}: config input_shape must be a list of ints, got {shape!r}")
    try:
        return build_model(arch, tuple(shape), num_classes, **kwargs)  # type: ignore[arg-type]
    except ModelError as exc:
        raise ModelError(f"{where}: cannot build {arch!r} from config {dict(config)}: {exc}") from exc


def _load_weights(model: nn.Module, state: Mapping[str, Any], where: str, advice: str) -> None:
    try:
        model.load_state_dict(state, strict=True)
    except (RuntimeError, KeyError, ValueError, TypeError) as exc:
        raise ModelError(f"{where}: the weights do not fit the architecture ({_detail(exc)}); {advice}") from exc


def save_model(
    model: nn.Module,
    path: str | os.PathLike[str],
    *,
    arch: str | None = None,
    config: dict[str, Any] | None = None,
) -> None:
    """Save a zoo model's weights with its architecture name and configuration.

    The file holds ``{"format": "bastion-model", "version": 1, "arch": arch, "config": config, "state_dict":
    ...}`` with every tensor moved to the CPU, and can be read with ``torch.load(path, weights_only=True)``.
    The model is rebuilt from ``config`` and loaded with the weights before writing, so a file that could not
    be loaded back is refused here.

    Args:
        model: the model, built from the zoo.
        path: destination file (``.pt`` by convention); parent folders are created.
        arch: a :data:`~bastion.models.zoo.ZOO` name; defaults to the one recorded by the factory on the model.
        config: JSON-able dict with ``input_shape`` (list), ``num_classes``, ``mean``, ``std`` and the
            architecture keyword arguments; defaults to the one recorded by the factory on the model.

    Raises:
        ModelError: unknown architecture, a config that is not JSON-able or does not rebuild this model.
    """
    where = f"save_model({os.fspath(path)!r})"
    if not isinstance(model, nn.Module):
        raise ModelError(f"{where}: expected a torch.nn.Module, got {type(model).__name__}")
    if Path(path).suffix == ".pt2":
        raise ModelError(f"{where}: .pt2 is for torch.export programs (torch.export.save); use a .pt file")
    recorded = getattr(model, "bastion_spec", None)
    if arch is None:
        if not isinstance(recorded, Mapping):
            raise ModelError(f"{where}: give arch= and config=; this model was not built by the bastion zoo")
        arch = str(recorded["arch"])
    if config is None:
        if not isinstance(recorded, Mapping) or recorded.get("arch") != arch:
            raise ModelError(f"{where}: give config= (input_shape, num_classes, mean, std and the arch kwargs)")
        config = recorded["config"]
    clean = _clean_config(config, where)
    state = OrderedDict((k, v.detach().cpu()) for k, v in model.state_dict().items() if isinstance(v, Tensor))
    probe = _build_from_config(arch, clean, where)
    _load_weights(probe, state, where, f"check that arch={arch!r} and config describe this model")
    payload = {"format": FORMAT, "version": VERSION, "arch": arch, "config": clean, "state_dict": state}
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    torch.save(payload, target)


# --------------------------------------------------------------------------------------------------- loading


def _read_weights_file(spec: str, path: Path) -> Any:
    if not path.is_file():
        raise ModelError(f"model spec {spec!r}: file {os.fspath(path)!r} not found")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        text = str(exc)
        if "weights_only" in text or "Weights only" in text:
            found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", text)
            what = f" ({found.group(1)})" if found else ""
            raise ModelError(
                f"model spec {spec!r}: {os.fspath(path)!r} contains Python objects{what} other than tensors and "
                "plain containers, and bastion never unpickles arbitrary objects "
                "(torch.load(weights_only=True)). Re-save only the weights, with "
                "bastion.models.save_model(model, path) or torch.save(model.state_dict(), path)"
            ) from exc
        raise ModelError(
            f"model spec {spec!r}: cannot read {os.fspath(path)!r} as a PyTorch weights file ({_detail(exc)})"
        ) from exc


def _is_state_dict(obj: Any) -> TypeGuard[Mapping[str, Any]]:
    return isinstance(obj, Mapping) and bool(obj) and all(isinstance(k, str) for k in obj)


def _check_matches(spec: str, config: Mapping[str, Any], input_shape: Any, num_classes: Any) -> None:
    if input_shape is not None and tuple(input_shape) != tuple(config["input_shape"]):
        raise ModelError(
            f"model spec {spec!r}: the file is for input_shape {tuple(config['input_shape'])} but "
            f"input_shape {tuple(input_shape)} was asked for"
        )
    if num_classes is not None and num_classes > config["num_classes"]:
        raise ModelError(
            f"model spec {spec!r}: the file's model has {config['num_classes']} outputs but the data has labels "
            f"up to {num_classes - 1}; use a model trained for at least {num_classes} classes"
        )


def _load_zoo(spec: str, name: str | None, path: Path, input_shape: Any, num_classes: Any) -> nn.Module:
    obj = _read_weights_file(spec, path)
    if isinstance(obj, Mapping) and obj.get("format") == FORMAT:
        version = obj.get("version")
        if version != VERSION:
            raise ModelError(
                f"model spec {spec!r}: bastion-model file version {version!r}; this bastion reads version {VERSION}"
            )
        arch = obj.get("arch")
        config = obj.get("config")
        state = obj.get("state_dict")
        if not isinstance(arch, str) or not isinstance(config, Mapping) or not _is_state_dict(state):
            raise ModelError(f"model spec {spec!r}: malformed bastion-model file (arch, config or state_dict)")
        if name is not None and name != arch:
            raise ModelError(
                f"model spec {spec!r}: the file holds a {arch!r} model, not {name!r}; use zoo:{arch}@{path}"
            )
        clean = _clean_config(config, f"model spec {spec!r}")
        _check_matches(spec, clean, input_shape, num_classes)
        model = _build_from_config(arch, clean, f"model spec {spec!r}")
        _load_weights(model, state, f"model spec {spec!r}", "the file may be corrupt or from another version")
        return model
    if _is_state_dict(obj) and all(isinstance(v, Tensor) for v in obj.values()):
        if name is None:
            raise ModelError(
                f"model spec {spec!r}: the file is a bare state dict without its architecture; load it as "
                f"zoo:NAME@{path} with input_shape and num_classes, or re-save it with "
                "bastion.models.save_model"
            )
        if input_shape is None or num_classes is None:
            raise ModelError(
                f"model spec {spec!r}: the file is a bare state dict, so input_shape and num_classes must be "
                "given (e.g. load_model(spec, input_shape=(1, 28, 28), num_classes=10), or --input-shape and "
                "--num-classes on the command line)"
            )
        # the data may not use every class the model knows: build as many outputs as the state dict holds
        last_weight = [v for v in obj.values() if v.dim() == 2][-1:]
        outputs = max(num_classes, int(last_weight[0].shape[0])) if last_weight else num_classes
        try:
            model = build_model(name, tuple(input_shape), outputs)
        except ModelError as exc:
            raise ModelError(f"model spec {spec!r}: {exc}") from exc
        _load_weights(
            model,
            obj,
            f"model spec {spec!r}",
            "check the architecture name, input_shape and num_classes; non-default architecture arguments "
            "are only known to files written by bastion.models.save_model",
        )
        return model
    found = type(obj).__name__
    if isinstance(obj, Mapping):
        found += f" with keys {sorted(map(str, obj))[:8]}"
    raise ModelError(
        f"model spec {spec!r}: expected a bastion-model file or a state dict of tensors, found a {found}; "
        "for a training checkpoint, save model.state_dict() alone"
    )


class ExportedModule(nn.Module):
    """A ``torch.export`` program made usable as a classifier on batches of any size.

    A program exported without a dynamic batch dimension only accepts its example's batch size; the wrapper
    then runs the batch in chunks of that size, padding the last one with zeros, so attacks and evaluations
    can use their own batch sizes (gradients flow through the chunks). ``train()`` and ``eval()`` only set
    this wrapper's flag: the exported graph is fixed in the mode it was exported in.

    Args:
        program: ``torch.export.load(path).module()``.
        batch_size: the static batch size of the program, or ``None`` when the batch dimension is dynamic.
        input_shape: shape of one input as recorded in the program, when it is static.
    """

    def __init__(
        self, program: nn.Module, batch_size: int | None = None, input_shape: tuple[int, ...] | None = None
    ) -> None:
        super().__init__()
        self.program = program
        self.batch_size = batch_size
        self.input_shape = input_shape

    def train(self, mode: bool = True) -> ExportedModule:
        """Set this wrapper's ``training`` flag only (the exported graph refuses train()/eval())."""
        self.training = mode
        return self

    def forward(self, x: Tensor) -> Any:
        """Run the program.

        Args:
            x: a batch ``(N, *input_shape)``.

        Returns:
            The program's output for the batch.
        """
        b = self.batch_size
        n = x.shape[0]
        if b is None or n == b:
            return self.program(x)
        outs = []
        for start in range(0, max(n, 1), b):
            chunk = x[start : start + b]
            m = chunk.shape[0]
            if m < b:
                chunk = torch.cat([chunk, chunk.new_zeros((b - m, *chunk.shape[1:]))])
            outs.append(self.program(chunk)[:m])
        return torch.cat(outs)


def _load_exported(spec: str, path: Path) -> ExportedModule:
    if not path.is_file():
        raise ModelError(f"model spec {spec!r}: file {os.fspath(path)!r} not found")
    if not zipfile.is_zipfile(path):
        raise ModelError(
            f"model spec {spec!r}: {os.fspath(path)!r} is not a torch.export archive (not a zip file); "
            "write it with torch.export.save(torch.export.export(model, (example,)), path)"
        )
    # torch.export.load logs a full traceback before raising on a damaged archive; the ModelError below carries
    # the cause already, so keep the user's terminal free of it.
    export_log = logging.getLogger("torch.export")
    level = export_log.level
    export_log.setLevel(logging.CRITICAL)
    try:
        program = torch.export.load(path)
    except Exception as exc:
        raise ModelError(
            f"model spec {spec!r}: cannot load {os.fspath(path)!r} as a torch.export program "
            f"({_detail(exc)}); write it with torch.export.save(torch.export.export(model, (example,)), path)"
        ) from exc
    finally:
        export_log.setLevel(level)
    user_inputs = list(program.graph_signature.user_inputs)
    if len(user_inputs) != 1:
        raise ModelError(
            f"model spec {spec!r}: the program takes {len(user_inputs)} inputs, a classifier takes one batch tensor"
        )
    batch_size: int | None = None
    sample_shape: tuple[int, ...] | None = None
    for node in program.graph.nodes:
        if node.op == "placeholder" and node.name == user_inputs[0]:
            val = node.meta.get("val")
            shape = tuple(getattr(val, "shape", ()))
            if shape:
                batch_size = shape[0] if isinstance(shape[0], int) else None
                if all(isinstance(d, int) for d in shape[1:]):
                    sample_shape = tuple(int(d) for d in shape[1:])
    try:
        module = program.module()
    except Exception as exc:
        raise ModelError(
            f"model spec {spec!r}: cannot turn the exported program into a module ({_detail(exc)})"
        ) from exc
    return ExportedModule(module, batch_size=batch_size, input_shape=sample_shape)


def _import_target(spec: str, target: str) -> Any:
    if target.endswith(".py") or "/" in target or os.sep in target:
        file = Path(target)
        if not file.is_file():
            raise ModelError(f"model spec {spec!r}: file {target!r} not found")
        # Name the module after the resolved path: two different files called model.py must not share (and
        # silently reuse) one sys.modules entry.
        name = "bastion_user_model_" + hashlib.sha1(os.fspath(file.resolve()).encode()).hexdigest()[:12]
        module_spec = importlib.util.spec_from_file_location(name, file)
        if module_spec is None or module_spec.loader is None:
            raise ModelError(f"model spec {spec!r}: cannot import {target!r} as a Python file")
        module = importlib.util.module_from_spec(module_spec)
        sys.modules[name] = module
        try:
            module_spec.loader.exec_module(module)
        except Exception as exc:
            sys.modules.pop(name, None)
            raise ModelError(f"model spec {spec!r}: importing {target!r} failed ({_detail(exc)})") from exc
        return module
    try:
        return importlib.import_module(target)
    except ModuleNotFoundError as exc:
        raise ModelError(
            f"model spec {spec!r}: module {target!r} not found ({_detail(exc)}); install it, add its folder "
            "to PYTHONPATH, or give the file path instead (path/to/file.py:factory)"
        ) from exc
    except Exception as exc:
        raise ModelError(f"model spec {spec!r}: importing {target!r} failed ({_detail(exc)})") from exc


def _attribute(spec: str, target: str, attr: str) -> Any:
    module = _import_target(spec, target)
    obj: Any = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ModelError(f"model spec {spec!r}: {target!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise ModelError(f"model spec {spec!r}: {attr!r} is a {type(obj).__name__}, not a callable factory")
    return obj


def load_callable(spec: str) -> Any:
    """The callable named by ``package.module:name`` or ``path/to/file.py:name`` (imported, not called).

    For code the command line takes by name besides models, e.g. the preprocessing function of a defence that
    ``bastion evaluate --bpda`` attacks through.
    """
    target, sep, attr = str(spec).rpartition(":")
    if not sep or not target or not _is_identifier_path(attr):
        raise ModelError(f"{spec!r}: expected package.module:function or path/to/file.py:function")
    return _attribute(spec, target, attr)


def _load_entry_point(spec: str, target: str, attr: str) -> nn.Module:
    obj = _attribute(spec, target, attr)
    try:
        model = obj()
    except Exception as exc:
        raise ModelError(
            f"model spec {spec!r}: calling {attr}() failed ({_detail(exc)}); the factory must take no arguments"
        ) from exc
    if not isinstance(model, nn.Module):
        raise ModelError(f"model spec {spec!r}: {attr}() returned a {type(model).__name__}, not a torch.nn.Module")
    return model


def _dry_run(spec: str, model: nn.Module, input_shape: Sequence[int], num_classes: int | None) -> None:
    x = torch.zeros((2, *input_shape), device=model_device(model))
    with eval_mode(model), torch.no_grad():
        try:
            out = model(x)
        except Exception as exc:
            raise ModelError(
                f"model spec {spec!r}: the model fails on a batch of shape {tuple(x.shape)} "
                f"({_detail(exc)}); check input_shape"
            ) from exc
    k = check_logits(out, 2, where=f"model spec {spec!r}: output")
    if num_classes is not None and k < num_classes:
        raise ModelError(
            f"model spec {spec!r}: the model returns {k} logits but the data has labels up to {num_classes - 1}"
        )


def _is_identifier_path(text: str) -> bool:
    return bool(text) and all(part.isidentifier() for part in text.split("."))


def load_model(
    spec: str | os.PathLike[str],
    *,
    input_shape: Sequence[int] | None = None,
    num_classes: int | None = None,
    map_location: str | torch.device = "cpu",
) -> nn.Module:
    """Load a model from a spec string (see the module docstring for the forms).

    ``input_shape`` and ``num_classes`` are required for a bare state dict and checked against the file
    otherwise; for ``.pt2`` programs and factories, giving ``input_shape`` runs the model once on a small
    batch and checks that it returns ``(N, K)`` logits with ``K >= num_classes``.

    Args:
        spec: the model spec, or a path.
        input_shape: shape of one input without the batch dimension.
        num_classes: number of classes the data needs; the model must have at least this many outputs (a data
            file need not contain every class the model knows).
        map_location: device to move the model to.

    Returns:
        The model, in eval mode, on ``map_location``.

    Raises:
        ModelError: the spec cannot be parsed, the file is missing or unsafe, or the weights do not fit.
    """
    if isinstance(spec, os.PathLike):
        spec = os.fspath(spec)
    if not isinstance(spec, str) or not spec.strip():
        raise ModelError(f"model spec must be a non-empty string, got {spec!r}; forms: {_SPEC_FORMS}")
    if input_shape is not None:
        if isinstance(input_shape, (str, bytes)) or not isinstance(input_shape, Sequence):
            raise ModelError(f"input_shape must be a tuple of ints, got {input_shape!r}")
        input_shape = tuple(input_shape)
    model: nn.Module
    suffix = Path(spec).suffix.lower()
    if spec.startswith("zoo:"):
        name, sep, file = spec[len("zoo:") :].partition("@")
        if not sep or not name or not file:
            raise ModelError(f"model spec {spec!r}: expected zoo:NAME@PATH, e.g. zoo:cnn@weights.pt")
        if name not in ZOO:
            raise ModelError(f"model spec {spec!r}: unknown architecture {name!r}; available: {', '.join(sorted(ZOO))}")
        model = _load_zoo(spec, name, Path(file), input_shape, num_classes)
    elif suffix == ".pt2":
        exported = _load_exported(spec, Path(spec))
        model = exported
        shape = input_shape if input_shape is not None else exported.input_shape
        if shape is not None and (input_shape is not None or num_classes is not None):
            _dry_run(spec, model, shape, num_classes)
    elif suffix in (".pt", ".pth"):
        model = _load_zoo(spec, None, Path(spec), input_shape, num_classes)
    elif suffix == ".onnx":
        from bastion.models.onnx import load_onnx, onnx_input_shape

        model = load_onnx(spec)
        if input_shape is not None or num_classes is not None:
            _dry_run(spec, model, input_shape if input_shape is not None else onnx_input_shape(spec), num_classes)
    elif ":" in spec and _is_identifier_path(spec.rpartition(":")[2]) and spec.rpartition(":")[0]:
        target, _, attr = spec.rpartition(":")
        model = _load_entry_point(spec, target, attr)
        if input_shape is not None:
            _dry_run(spec, model, input_shape, num_classes)
    else:
        raise ModelError(f"cannot interpret model spec {spec!r}; expected one of: {_SPEC_FORMS}")
    try:
        model = model.to(map_location)
    except Exception as exc:
        raise ModelError(f"model spec {spec!r}: cannot move the model to {map_location!r} ({_detail(exc)})") from exc
    try:
        model.eval()
    except NotImplementedError:
        # A raw torch.export module returned by a factory refuses eval(); its graph is fixed anyway.
        for m in model.modules():
            m.training = False
    return model
