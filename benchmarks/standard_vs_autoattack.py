"""bastion's ``standard`` and ``fast`` evaluations against the original AutoAttack and torchattacks' AutoAttack.

Side by side in one process, on the same model, images and ε (l∞), each tool's robust accuracy and wall time:

* ``standard`` (AutoAttack's paper budget) against the original AutoAttack (``pyautoattack``, ``version="standard"``)
  and torchattacks' ``AutoAttack`` with its four members at AutoAttack's 100 iterations (built from torchattacks'
  classes, as its own ``AutoAttack`` hard-codes their 10-iteration defaults);
* ``fast`` (torchattacks' default budget) against torchattacks' default ``AutoAttack(version="standard")``.

Three models, trained here and cached in ``benchmarks/.cache/`` (first 8,000 MNIST test images, as in ``common.py``):
the standard MNIST ``cnn`` of ``common.py``; a PGD-AT ``cnn`` (ε = 0.3); a CIFAR-10-shaped ResNet-8 (3×32×32 input)
trained on the MNIST digits padded to 32×32 and repeated over three channels. Evaluation: ``--n`` images of the
2,000-image evaluation split. Each tool runs ``--repeats`` times, interleaved (A B C, A B C); the median is reported.

Run from the repository root (one thread per tool unless ``--threads``)::

    python benchmarks/standard_vs_autoattack.py --n 100
    python benchmarks/standard_vs_autoattack.py --models cnn --n 200 --repeats 1 --output /tmp/sva.md
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common
from bastion.data import Dataset
from bastion.defenses.training import train
from bastion.defenses.training.pgd_at import PGDAT
from bastion.evaluate import evaluate
from bastion.models import build_model, load_model, save_model
from bastion.threat import LpBall

#: model name -> (training recipe, evaluation eps). A change of a recipe changes its cache key.
MODELS: dict[str, tuple[dict[str, Any], float]] = {
    "cnn": (dict(common.TRAIN_CONFIG), 0.1),
    "cnn-pgdat": ({"arch": "cnn", "seed": 0, "epochs": 2, "batch_size": 64, "lr": 1e-3, "pgd_eps": 0.3,
                   "pgd_steps": 5, "n_train": common.N_TRAIN}, 0.3),
    "resnet-cifar-shaped": ({"arch": "resnet", "seed": 0, "epochs": 2, "batch_size": 64, "lr": 1e-3,
                             "input": [3, 32, 32], "n_train": common.N_TRAIN}, 8 / 255),
}  # fmt: skip


def to_cifar_shape(x: torch.Tensor) -> torch.Tensor:
    """MNIST (N, 1, 28, 28) as CIFAR-shaped (N, 3, 32, 32): zero-padded by 2 pixels, repeated over 3 channels."""
    return F.pad(x, (2, 2, 2, 2)).repeat(1, 3, 1, 1)


def model_data(name: str, split: common.Split) -> tuple[Dataset, Dataset]:
    if name != "resnet-cifar-shaped":
        return split.train, split.eval
    tr, ev = split.train, split.eval
    return (
        Dataset(to_cifar_shape(tr.x), tr.y, num_classes=10, name="mnist-as-cifar"),
        Dataset(to_cifar_shape(ev.x), ev.y, num_classes=10, name="mnist-as-cifar"),
    )


def get_model(name: str, split: common.Split, log: Callable[[str], None] = print) -> nn.Module:
    """The model ``name``: from ``benchmarks/.cache/`` when cached, else trained with bastion's trainer and cached."""
    if name == "cnn":
        return common.get_model(split, log=log)
    cfg, _ = MODELS[name]
    digest = hashlib.sha256(json.dumps(cfg, sort_keys=True).encode()).hexdigest()[:10]
    path = common.CACHE_DIR / f"sva_{name}_{digest}.pt"
    if path.exists():
        log(f"model {name}: loaded {path.relative_to(common.BENCH_DIR.parent)}")
        return load_model(path).eval()
    train_data, eval_data = model_data(name, split)
    torch.manual_seed(cfg["seed"])
    shape = tuple(cfg.get("input", common.INPUT_SHAPE))
    model = build_model(cfg["arch"], shape, common.NUM_CLASSES)
    objective = None
    if "pgd_eps" in cfg:
        objective = PGDAT(LpBall("linf", cfg["pgd_eps"]), steps=cfg["pgd_steps"])
    t0 = time.perf_counter()
    history = train(
        model, train_data, epochs=cfg["epochs"], batch_size=cfg["batch_size"], lr=cfg["lr"], seed=cfg["seed"],
        objective=objective, progress=False,
    )  # fmt: skip
    model.eval()
    log(
        f"model {name}: trained in {time.perf_counter() - t0:.1f} s ({json.dumps(cfg)}); losses "
        + ", ".join(f"{v:.3f}" for v in history)
        + f"; clean accuracy {common.accuracy(model, eval_data.x, eval_data.y):.4f}"
    )
    common.CACHE_DIR.mkdir(parents=True, exist_ok=True)
    save_model(model, path)
    return model


# ---------------------------------------------------------------------------------------------------- tools
@torch.no_grad()
def robust_accuracy(model: nn.Module, x_adv: torch.Tensor, x: torch.Tensor, y: torch.Tensor, eps: float) -> float:
    """Fraction of points classified correctly at the returned point, counting a point outside the ball (or the
    box) as the clean point: every tool is judged by the same re-check."""
    inside = ((x_adv - x).flatten(1).abs().amax(dim=1) <= eps + 1e-6) & (x_adv >= 0).flatten(1).all(1)
    inside &= (x_adv <= 1).flatten(1).all(1)
    x_checked = torch.where(inside[:, None, None, None], x_adv, x)
    return float((common.predict(model, x_checked) == y).float().mean())


def tools(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, which: list[str]) -> dict[str, Callable]:
    """Each tool as a callable returning the robust accuracy it reports on ``(x, y)``."""
    out: dict[str, Callable[[], float]] = {}
    data = (x, y)
    threat = LpBall("linf", eps)
    for preset in ("standard", "fast"):
        if f"bastion-{preset}" in which:
            out[f"bastion {preset}"] = lambda p=preset: evaluate(
                model, data, threat, p, batch_size=len(x), progress=False, checks=False
            ).worst_case[threat.key]
    ta = common.load_peer("torchattacks")
    if ta.available:
        tam = ta.module
        if "torchattacks-100" in which:

            def ta100() -> float:
                attack = tam.MultiAttack([
                    tam.APGD(model, eps=eps, norm="Linf", steps=100, n_restarts=1, loss="ce", seed=0),
                    tam.APGDT(model, eps=eps, norm="Linf", steps=100, n_restarts=1, n_classes=10, seed=0),
                    tam.FAB(model, eps=eps, norm="Linf", steps=100, n_restarts=1, multi_targeted=True,
                            n_classes=10, seed=0),
                    tam.Square(model, eps=eps, norm="Linf", n_queries=5000, n_restarts=1, seed=0),
                ])  # fmt: skip
                return robust_accuracy(model, attack(x, y), x, y, eps)

            out["torchattacks AutoAttack, 100 it."] = ta100
        if "torchattacks-default" in which:
            out["torchattacks AutoAttack (default)"] = lambda: robust_accuracy(
                model, tam.AutoAttack(model, norm="Linf", eps=eps, version="standard", n_classes=10, seed=0)(x, y),
                x, y, eps,
            )  # fmt: skip
    if "autoattack" in which:
        try:
            from pyautoattack import AutoAttack
        except ImportError:
            AutoAttack = None
        if AutoAttack is not None:

            def original() -> float:
                aa = AutoAttack(model, norm="Linf", eps=eps, version="standard", seed=0)
                x_adv, _ = aa.run_standard_evaluation(x, y, batch_size=len(x))
                return robust_accuracy(model, x_adv, x, y, eps)

            out["original AutoAttack (pyautoattack)"] = original
    return out


#: the tool each one is compared with
REFERENCE = {
    "bastion standard": "original AutoAttack (pyautoattack)",
    "torchattacks AutoAttack, 100 it.": "original AutoAttack (pyautoattack)",
    "original AutoAttack (pyautoattack)": "original AutoAttack (pyautoattack)",
    "bastion fast": "torchattacks AutoAttack (default)",
    "torchattacks AutoAttack (default)": "torchattacks AutoAttack (default)",
}

ALL_TOOLS = ["bastion-standard", "autoattack", "torchattacks-100", "bastion-fast", "torchattacks-default"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=100, help="evaluation images per model")
    ap.add_argument("--repeats", type=int, default=1, help="timed runs per tool (median reported)")
    ap.add_argument("--models", nargs="+", choices=sorted(MODELS), default=list(MODELS))
    ap.add_argument("--tools", nargs="+", choices=ALL_TOOLS, default=ALL_TOOLS)
    ap.add_argument("--threads", type=int, default=1, help="torch threads for every tool (1: other jobs share)")
    ap.add_argument("--train-only", action="store_true", help="train and cache the models, then stop")
    ap.add_argument("--output", type=Path, help="also write the Markdown table to this file")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    split = common.load_split()
    lines = ["# standard / fast against AutoAttack and torchattacks", "", common.machine_summary(), ""]
    for name in args.models:
        model = get_model(name, split)
        if args.train_only:
            continue
        for p in model.parameters():
            p.requires_grad_(False)
        _, eval_data = model_data(name, split)
        x, y = eval_data.x[: args.n], eval_data.y[: args.n]
        eps = MODELS[name][1]
        print(f"\n## {name}: l∞ ε = {eps:.4g}, {args.n} images, clean accuracy "
              f"{common.accuracy(model, x, y):.4f} ({common.load_average()})")  # fmt: skip
        competitors = tools(model, x, y, eps, args.tools)
        timings = common.time_alternating(competitors, repeats=args.repeats, warmup=0)
        wall = {k: t.median for k, t in timings.items()}
        cpu = {k: t.cpu_median for k, t in timings.items()}
        rows = []
        for key, t in timings.items():
            ref = REFERENCE[key]
            ok = ref in wall and t.error is None and timings[ref].error is None
            acc = f"{100 * t.output:.1f}%" if t.error is None else f"failed: {t.error}"
            rows.append([
                key, acc, f"{t.median:.1f}", f"{t.cpu_median:.1f}",
                ref if ref != key else "-",
                f"{cpu[key] / cpu[ref]:.2f}×" if ok and ref != key else "-",
                f"{wall[key] / wall[ref]:.2f}×" if ok and ref != key else "-",
            ])  # fmt: skip
        table = common.markdown_table(
            ["tool", "robust accuracy", "wall s", "CPU s", "reference", "CPU time / ref.", "wall time / ref."], rows
        )
        block = [f"### {name} (l∞ ε = {eps:.4g}, n = {args.n}, {args.threads} thread(s), {common.load_average()})",
                 "", table, ""]  # fmt: skip
        print("\n".join(block))
        lines += block
    if args.output and not args.train_only:
        args.output.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
