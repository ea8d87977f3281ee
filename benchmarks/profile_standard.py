"""Where the time of ``evaluate(..., "standard")`` goes: per attack of the cascade and per phase.

Phases: model forward passes, backward passes (``torch.autograd.grad``), projections (the threat's ``project`` and
FAB's hyperplane ∩ box projection), store writes, and the rest of each attack (Python and tensor bookkeeping:
"overhead"). The phases are measured by wrapping those functions with timers in this process only (nothing in
bastion is changed), so the figures include the timers' own small cost. Models: the MNIST ``cnn`` of ``common.py``
and the CIFAR-shaped ResNet-8 of ``standard_vs_autoattack.py`` (3×32×32, trained on padded digits); one batch of
each ``--batch`` size.

Run from the repository root::

    python benchmarks/profile_standard.py                              # standard, batches 50 and 200
    python benchmarks/profile_standard.py --preset fast --batch 50 200 500 --models cnn
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common
import standard_vs_autoattack as sva
from bastion import store as store_mod
from bastion.attacks import base as base_mod
from bastion.attacks import fab as fab_mod
from bastion.evaluate import evaluate
from bastion.threat import LpBall

PHASES = ("forward", "backward", "projection", "store", "overhead")


class Profile:
    """Seconds per (attack, phase), filled by the timers below."""

    def __init__(self) -> None:
        self.seconds: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
        self.current = "evaluate"  # the attack running now ("evaluate": outside any attack)
        self.depth = 0  # nested timed phases are charged once, to the outermost

    def timed(self, phase: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            if self.depth:
                return fn(*args, **kwargs)
            self.depth += 1
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.seconds[self.current][phase] += time.perf_counter() - t0
                self.depth -= 1

        return wrapper


class TimedModel(nn.Module):
    def __init__(self, model: nn.Module, prof: Profile) -> None:
        super().__init__()
        self.model = model
        self.prof = prof

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.prof.timed("forward", self.model)(x)


def install(prof: Profile) -> None:
    """Wrap the measured functions with timers (this process only)."""
    grad = torch.autograd.grad
    torch.autograd.grad = prof.timed("backward", grad)  # type: ignore[assignment]
    for cls in (LpBall,):
        cls.project = prof.timed("projection", cls.project)  # type: ignore[method-assign]
    fab_mod.project_hyperplane_box = prof.timed("projection", fab_mod.project_hyperplane_box)
    store_mod.RunSession.write = prof.timed("store", store_mod.RunSession.write)  # type: ignore[method-assign]
    call = base_mod.Attack.__call__

    def attack_call(self: base_mod.Attack, *args: Any, **kwargs: Any) -> Any:
        outer, prof.current = prof.current, self.name or type(self).__name__
        t0 = time.perf_counter()
        try:
            return call(self, *args, **kwargs)
        finally:
            prof.seconds[prof.current]["total"] += time.perf_counter() - t0
            prof.current = outer

    base_mod.Attack.__call__ = attack_call  # type: ignore[method-assign]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="standard", choices=["standard", "fast", "rapid"])
    ap.add_argument("--batch", type=int, nargs="+", default=[50, 200])
    ap.add_argument("--models", nargs="+", default=["cnn", "resnet-cifar-shaped"], choices=sorted(sva.MODELS))
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--output", type=Path, help="also write the Markdown tables to this file")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    split = common.load_split()
    prof = Profile()
    install(prof)
    lines = [f"# profile of the {args.preset!r} cascade", "", common.machine_summary(), ""]
    for name in args.models:
        model = sva.get_model(name, split)
        for p in model.parameters():
            p.requires_grad_(False)
        _, data = sva.model_data(name, split)
        eps = sva.MODELS[name][1]
        for bs in args.batch:
            prof.seconds.clear()
            timed = TimedModel(model, prof)
            with tempfile.TemporaryDirectory() as tmp:
                t0 = time.perf_counter()
                res = evaluate(
                    timed, data.subset(slice(0, bs)), LpBall("linf", eps), args.preset, batch_size=bs,
                    store=Path(tmp) / "p.db", progress=False, checks=False,
                )  # fmt: skip
                wall = time.perf_counter() - t0
            rows = []
            for attack, ph in prof.seconds.items():
                if attack == "evaluate":
                    continue
                measured = sum(ph[p] for p in PHASES if p != "overhead")
                ph["overhead"] = max(ph["total"] - measured, 0.0)
                acc = res.robust_accuracy[res.threats[0]].get(attack)
                rows.append(
                    [attack, f"{ph['total']:.2f}", *(f"{ph[p]:.2f}" for p in PHASES),
                     "-" if acc is None else f"{100 * acc:.1f}%"]
                )  # fmt: skip
            ev = prof.seconds["evaluate"]
            rest = wall - sum(prof.seconds[a]["total"] for a in prof.seconds if a != "evaluate")
            rows.append(["(evaluate itself)", f"{rest:.2f}", f"{ev['forward']:.2f}", "0.00", "0.00",
                         f"{ev['store']:.2f}", f"{max(rest - ev['forward'] - ev['store'], 0):.2f}", ""])  # fmt: skip
            table = common.markdown_table(["attack", "seconds", *PHASES, "robust after"], rows)
            block = [
                f"## {name}, l∞ ε = {eps:.4g}, batch {bs}: {wall:.1f} s, {res.passes_per_sample:,.0f} passes per "
                f"sample, worst case {100 * res.worst_case[res.threats[0]]:.1f}% ({args.threads} thread(s), "
                f"{common.load_average()})",
                "",
                table,
                "",
            ]
            print("\n".join(block), flush=True)
            lines += block
    if args.output:
        args.output.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
