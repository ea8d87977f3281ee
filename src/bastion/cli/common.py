"""Shared pieces of the command groups: argument types, model and data loading, attack lists, printing."""

from __future__ import annotations

import argparse
import ast
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bastion.errors import BastionError


def parse_eps(text: str) -> list[float]:
    values = []
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        try:
            if "/" in part:
                num, den = part.split("/", 1)
                values.append(float(num) / float(den))
            else:
                values.append(float(part))
        except (ValueError, ZeroDivisionError):
            raise argparse.ArgumentTypeError(f"bad eps value {part!r}: give numbers like 0.1 or 8/255") from None
    if not values:
        raise argparse.ArgumentTypeError("give at least one eps value")
    return values


def parse_one_eps(text: str) -> float:
    """One radius (``0.1`` or ``8/255``), for the commands that take a single eps."""
    values = parse_eps(text)
    if len(values) != 1:
        raise argparse.ArgumentTypeError(f"expected one eps value, got {len(values)} ({text!r})")
    return values[0]


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def check_device(name: str) -> str:
    import torch

    try:
        device = torch.device(name)
    except RuntimeError:
        raise BastionError(f"--device {name!r} is not a torch device; use cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise BastionError(f"--device {name!r}: this torch build or machine has no CUDA device; use --device cpu")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise BastionError(f"--device {name!r}: only {torch.cuda.device_count()} CUDA device(s) are visible")
    return name


def model_and_data(args: argparse.Namespace) -> tuple[Any, Any]:
    """The ``--model`` (checked against the data, moved to ``--device``) and the ``--data`` cut to ``--limit``."""
    from bastion.data import load_data
    from bastion.models import load_model

    device = check_device(args.device) if args.device else None
    data = load_data(args.data)
    if args.limit is not None:
        data = data.subset(slice(0, args.limit))
    model = load_model(args.model, input_shape=data.feature_shape, num_classes=data.num_classes)
    if device is not None:
        model = model.to(device)
    return model, data


def check_plot_path(path: str) -> Path:
    """Fail before any work if the figure could not be written (missing folder, unknown format)."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure

    out = Path(path)
    if not out.parent.is_dir():
        raise BastionError(f"--plot {path!r}: the folder {str(out.parent)!r} does not exist")
    formats = Figure().canvas.get_supported_filetypes()
    if out.suffix.lstrip(".").lower() not in formats:
        raise BastionError(f"--plot {path!r}: unknown figure format; use one of .{', .'.join(sorted(formats))}")
    return out


def parse_opts(items: Sequence[str], flag: str = "--attack-opt") -> list[tuple[str | None, str, Any]]:
    """``key=value`` or ``name.key=value`` strings -> (name or None, key, Python value); ``flag`` names the option."""
    out = []
    for item in items:
        if "=" not in item:
            raise BastionError(f"{flag} {item!r}: expected key=value (e.g. steps=100 or pgd.steps=100)")
        key, raw = item.split("=", 1)
        target, _, name = key.strip().rpartition(".")
        try:
            value: Any = ast.literal_eval(raw.strip())
        except (ValueError, SyntaxError):
            value = raw.strip()
        out.append((target or None, name, value))
    return out


def build_attacks(names: str, opts: Sequence[tuple[str | None, str, Any]], norm: str) -> list[Any]:
    """Attack objects for a comma-separated list of attack and preset names, with ``--attack-opt`` applied."""
    import inspect

    from bastion.attacks import ATTACKS, make_attack
    from bastion.attacks.presets import PRESETS
    from bastion.threat import canonical_norm

    norm = "flow" if str(norm).strip().lower() == "flow" else canonical_norm(norm)
    plan: list[tuple[str, dict[str, Any]]] = []  # (attack name, options) in cascade order
    for token in (n.strip().lower() for n in names.split(",") if n.strip()):
        if token in PRESETS:
            plan += [(n, dict(o)) for n, o in PRESETS[token] if n in ATTACKS and norm in ATTACKS[n].norms]
        else:
            plan.append((token, {}))
    attack_names = [n for n, _ in plan]
    for target, key, value in opts:
        if target is not None:
            if target not in attack_names:
                raise BastionError(f"--attack-opt {target}.{key}: {target!r} is not among the attacks {attack_names}")
            for n, o in plan:
                if n == target:
                    o[key] = value
            continue
        takers = [n for n in attack_names if n in ATTACKS and key in inspect.signature(ATTACKS[n].__init__).parameters]
        if not takers:
            raise BastionError(f"--attack-opt {key}: none of the attacks {attack_names} accepts option {key!r}")
        for n, o in plan:
            if n in takers:
                o[key] = value
    return [make_attack(n, **o) for n, o in plan]


def print_result(result: Any, as_json: bool) -> None:
    if as_json:
        print(json.dumps(result.to_dict(), indent=2))
    else:
        print(result.table())


def add_ray_flags(p: argparse.ArgumentParser, unit: str) -> None:
    """``--ray ADDRESS`` and ``--shards N`` for a command that :mod:`bastion.scale` can shard (``unit``: what one
    shard holds by default, for the help text)."""
    p.add_argument(
        "--ray",
        default=None,
        metavar="ADDRESS",
        help="shard over a Ray cluster: auto (the running one), local (start one here) or HOST:PORT",
    )
    p.add_argument(
        "--shards", type=positive_int, default=None, help=f"with --ray: number of shards (default: one {unit} each)"
    )


def ray_options(args: argparse.Namespace) -> dict[str, Any]:
    """The Ray keyword arguments of ``bastion.scale`` from --ray, --shards and --device."""
    if args.shards is not None and not args.ray:
        raise BastionError("--shards needs --ray ADDRESS")
    device = getattr(args, "device", None)
    gpus = 1 if device and device.startswith("cuda") else 0
    return {"address": args.ray, "shards": args.shards, "device": device, "gpus_per_worker": gpus}
