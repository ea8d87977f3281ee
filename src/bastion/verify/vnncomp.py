"""Running VNN-COMP benchmarks: networks, instances.csv rows, results.csv resumption and one instance's decision.

The single-process ``bastion vnncomp`` command and the Ray runner (:func:`bastion.scale.ray_vnncomp`) share these, so
an instance is decided, timed and recorded the same way whichever runs it.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from bastion.errors import BastionError

__all__ = ["decide_instance", "decide_row", "done_instances", "load_network", "read_instances"]


def load_network(onnx_path: Path, tmp: Path) -> Any:
    """The ONNX module of a (possibly gzip-compressed) file; a .gz file is unpacked into ``tmp`` first."""
    import gzip
    import shutil

    from bastion.models.onnx import load_onnx

    if not onnx_path.is_file():
        raise BastionError(f"ONNX file {os.fspath(onnx_path)!r} not found")
    if onnx_path.suffix == ".gz":
        target = tmp / onnx_path.name[: -len(".gz")]
        with gzip.open(onnx_path, "rb") as src, open(target, "wb") as dst:
            shutil.copyfileobj(src, dst)
        onnx_path = target
    return load_onnx(onnx_path)


def decide_instance(model: Any, vnnlib_path: Path, timeout: float, method: str, seed: int) -> tuple[str, str]:
    """Decide one instance; returns the VNN-COMP result word and the result file's text."""
    import math

    import torch

    from bastion.verify.bab import verify
    from bastion.verify.vnnlib import format_counterexample, parse_vnnlib

    with torch.no_grad():
        k = int(model(torch.zeros(1, *model.input_shape)).reshape(1, -1).shape[1])
    spec = parse_vnnlib(vnnlib_path, num_inputs=math.prod(model.input_shape), num_outputs=k)
    verdict = verify(model, spec, timeout=timeout, method=method, seed=seed)
    word = verdict.vnncomp()
    if word == "sat":
        assert verdict.counterexample is not None and verdict.output is not None
        return word, "sat\n" + format_counterexample(verdict.counterexample, verdict.output) + "\n"
    return word, word + "\n"


def read_instances(inst: Path, timeout_scale: float) -> list[tuple[str, str, float]]:
    """The instances of a benchmark's instances.csv as ``(onnx, vnnlib, time limit)``, limits scaled."""
    import csv

    if not inst.is_file():
        raise BastionError(f"instances file {os.fspath(inst)!r} not found")
    rows: list[tuple[str, str, float]] = []
    with open(inst, newline="") as fh:
        for n, row in enumerate(csv.reader(fh), 1):
            if not row or not "".join(row).strip() or row[0].lstrip().startswith("#"):
                continue
            if len(row) < 3:
                raise BastionError(f"{os.fspath(inst)}:{n}: expected 'onnx,vnnlib,timeout', got {','.join(row)!r}")
            try:
                limit = float(row[2]) * timeout_scale
            except ValueError:
                raise BastionError(f"{os.fspath(inst)}:{n}: timeout {row[2]!r} is not a number") from None
            rows.append((row[0].strip(), row[1].strip(), limit))
    return rows


def done_instances(out: Path) -> set[tuple[str, str]]:
    """The ``(onnx, vnnlib)`` instances already in a results.csv (none if it does not exist)."""
    import csv

    done: set[tuple[str, str]] = set()
    if out.is_file():
        with open(out, newline="") as fh:
            for row in csv.reader(fh):
                if len(row) >= 4 and row[0] != "onnx":
                    done.add((row[0], row[1]))
    return done


def decide_row(
    cache: dict[str, Any], base: Path, onnx_rel: str, vnnlib_rel: str, limit: float, method: str, seed: int, tmp: Path
) -> tuple[str, float, str | None]:
    """One instance of a benchmark: ``(result word, seconds, error message or None)``; loading counts in its time.

    ``cache`` holds the last network loaded (benchmarks list their instances network by network).
    """
    start = time.perf_counter()
    error = None
    try:
        if onnx_rel not in cache:
            cache.clear()  # one network in memory at a time
            cache[onnx_rel] = load_network(base / onnx_rel, tmp)
        left = limit - (time.perf_counter() - start)
        word = "timeout" if left <= 0 else decide_instance(cache[onnx_rel], base / vnnlib_rel, left, method, seed)[0]
    except BastionError as exc:
        word, error = "error", str(exc)
    return word, time.perf_counter() - start, error
