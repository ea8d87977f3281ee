"""Poisoning attacks on MNIST (issue 14): clean accuracy, attack success and wall time of every attack.

The first 8,000 MNIST test images are the clean training set, the last 2,000 the test set (``common.py``). For each
attack of :mod:`bastion.poisoning` the training set is poisoned with the attack's defaults (poison rate 10 %, target
class 0), a fresh zoo ``cnn`` is trained on it with bastion's trainer (Adam, lr 1e-3, batch 64, seed 0, ``--epochs``
epochs: the same recipe as the clean reference model trained alongside), and measured:

* **clean accuracy** on the 2,000 test images, and its loss against the clean model of the same recipe;
* **ASR** (backdoors): the fraction of triggered test images of the other classes classified as the target
  (all-to-all: as ``(y + 1) mod 10``), :func:`bastion.poisoning.attack_success_rate`;
* **poisoning success** (clean-label targeted attacks): the fraction of target images classified as the adversarial
  class, with the mean probability of that class on the targets (and the clean model's, for comparison);
* wall time of poisoning and of training.

Attacks (``--attacks``): ``labelflip`` (random flips at 10 %), ``labelflip-pair`` (40 % of the 1s relabelled 7),
``badnets`` and ``badnets-a2a`` (Gu et al. 2017), ``blended`` (Chen et al. 2017, α = 0.2, random-noise key),
``wanet`` (Nguyen & Tran, ICLR 2021; k = 4, s = 0.5, noise mode ×2), ``collision`` (Poison Frogs, Shafahi et al.,
NeurIPS 2018; transfer learning: one poison per target, then the 30 %-watermark variant with 10 poisons per target,
the last layer of the clean model retrained on its frozen features) and ``matching`` (Witches' Brew, Geiping et al.,
ICLR 2021: 1 % budget, ε = 16/255, M = 250 steps, ``--restarts`` restarts, the clean model as surrogate, the victim
retrained from scratch from another initialisation). Targets of the clean-label attacks: the first ``--targets``
test images not of the adversarial class, which is class 0 for collision and each target's runner-up class under
the surrogate for matching.

Reference figure: BadNets on MNIST at a 10 % poison rate reaches a clean accuracy of 98.2 % and an ASR of 99.95 % in
a public PyTorch reproduction (verazuo/badnets-pytorch: 60,000 training images, 5×5 white trigger, 100 epochs).

Every attack's row is cached in ``benchmarks/.cache/`` under a hash of its settings, so an interrupted run continues
where it stopped (``--fresh`` recomputes). A full run takes about 10 minutes on 2 CPU cores; ``--quick`` (2,000
training images, 2 epochs, fewer targets and steps) about 2.

Run from the repository root::

    python benchmarks/poisoning_mnist.py                       # every attack, defaults
    python benchmarks/poisoning_mnist.py --quick
    python benchmarks/poisoning_mnist.py --attacks badnets wanet --epochs 10
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shlex
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common
from bastion.data import Dataset
from bastion.defenses.training import train
from bastion.models import build_model
from bastion.poisoning import (
    BadNets,
    Blended,
    FeatureCollision,
    GradientMatching,
    LabelFlip,
    PoisonedData,
    WaNet,
    attack_success_rate,
    clean_accuracy,
    retrain_last_layer,
)

ATTACKS = ("labelflip", "labelflip-pair", "badnets", "badnets-a2a", "blended", "wanet", "collision", "matching")
REFERENCE = {"badnets": (0.982, 0.9995)}  # verazuo/badnets-pytorch README: clean accuracy, ASR


def log(msg: str) -> None:
    print(msg, flush=True)


def fit(data: Dataset, args: argparse.Namespace, seed: int | None = None) -> nn.Module:
    """The victim recipe: a fresh zoo cnn (seeded init), Adam, ``args.epochs`` epochs, seeded shuffling."""
    seed = args.seed if seed is None else seed
    torch.manual_seed(seed)
    model = build_model("cnn", data.feature_shape, data.num_classes).to(args.device)
    train(model, data, epochs=args.epochs, batch_size=64, lr=1e-3, seed=seed, progress=False)
    return model.eval()


@torch.no_grad()
def predict_one(model: nn.Module, x: torch.Tensor) -> int:
    device = next(model.parameters()).device
    return int(model(x[None].to(device)).argmax(1))


def _key(name: str, settings: dict[str, Any]) -> Path:
    digest = hashlib.sha256(json.dumps({"name": name, **settings}, sort_keys=True).encode()).hexdigest()[:10]
    return common.CACHE_DIR / f"poisoning_{name}_{digest}.json"


def cached(name: str, settings: dict[str, Any], fresh: bool, compute: Any) -> dict[str, Any]:
    path = _key(name, settings)
    if path.exists() and not fresh:
        row = json.loads(path.read_text())
        log(f"{name}: cached ({path.name})")
        return row
    row = compute()
    common.CACHE_DIR.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(row, indent=2))
    return row


def target_images(test: Dataset, n: int, avoid: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    keep = torch.nonzero(test.y != avoid).reshape(-1) if avoid is not None else torch.arange(len(test))
    idx = keep[:n]
    return test.x[idx], test.y[idx]


@torch.no_grad()
def class_prob(model: nn.Module, x: torch.Tensor, classes: torch.Tensor) -> list[float]:
    device = next(model.parameters()).device
    p = F.softmax(model(x.to(device)), dim=1).cpu()
    return p[torch.arange(x.shape[0]), classes].tolist()


def run_trigger_attack(attack: Any, train_set: Dataset, test: Dataset, args: argparse.Namespace) -> dict[str, Any]:
    t0 = time.perf_counter()
    poisoned: PoisonedData = attack(train_set)
    t_poison = time.perf_counter() - t0
    t0 = time.perf_counter()
    victim = fit(poisoned.data, args)
    t_train = time.perf_counter() - t0
    row: dict[str, Any] = {
        "attack": repr(attack), "n_poisons": poisoned.n_poisons, "clean_accuracy": clean_accuracy(victim, test),
        "poison_seconds": t_poison, "train_seconds": t_train,
    }  # fmt: skip
    if poisoned.trigger is not None:
        row["asr"] = attack_success_rate(victim, test, poisoned.trigger, poisoned.target, mode=poisoned.mode or "")
    elif poisoned.target is not None and poisoned.config.get("pairs"):
        # targeted label flipping: how many of the source class the victim now sends to the destination
        s, d = poisoned.config["pairs"][0]
        xs = test.x[test.y == s]
        with torch.no_grad():
            pred = victim(xs.to(args.device)).argmax(1).cpu()
        row["source_to_destination"] = float((pred == d).float().mean())
    return row


def run_collision(
    train_set: Dataset, test: Dataset, surrogate: nn.Module, args: argparse.Namespace
) -> list[dict[str, Any]]:
    rows = []
    tx, ty = target_images(test, args.targets, avoid=args.target)
    variants: list[tuple[str, dict[str, Any]]] = [
        ("collision (1 poison, transfer)", {}),
        ("collision (10 poisons, watermark 0.3)", {"n_poisons": 10, "watermark": 0.3}),
    ]
    for label, kw in variants:
        hits, probs, seconds, fdist = 0, [], 0.0, []
        for i in range(tx.shape[0]):
            attack = FeatureCollision(target=args.target, seed=args.seed + i, max_iters=args.collision_iters, **kw)
            t0 = time.perf_counter()
            poisoned = attack(train_set, surrogate, tx[i], target_y=ty[i : i + 1])
            seconds += time.perf_counter() - t0
            st = attack.last_stats
            fdist.append(sum(st["feature_distance_end"]) / max(1e-12, sum(st["feature_distance_start"])))
            victim = retrain_last_layer(surrogate, poisoned.data, epochs=args.head_epochs, seed=args.seed)
            hits += int(predict_one(victim, tx[i]) == args.target)
            probs += class_prob(victim, tx[i : i + 1], torch.tensor([args.target]))
        clean_probs = class_prob(surrogate, tx, torch.full((tx.shape[0],), args.target))
        rows.append({
            "attack": label, "n_poisons": kw.get("n_poisons", 1), "targets": int(tx.shape[0]),
            "poisoning_success": hits / tx.shape[0], "adv_prob": sum(probs) / len(probs),
            "adv_prob_clean": sum(clean_probs) / len(clean_probs), "feature_distance_ratio": sum(fdist) / len(fdist),
            "poison_seconds": seconds,
        })  # fmt: skip
        log(f"  {label}: success {hits}/{tx.shape[0]}, feature distance ratio {rows[-1]['feature_distance_ratio']:.3f}")
    return rows


def run_matching(train_set: Dataset, test: Dataset, surrogate: nn.Module, args: argparse.Namespace) -> dict[str, Any]:
    # The victims start from another initialisation than the surrogate (as the paper's victims); their clean twin
    # (same recipe and seed, clean data) is the baseline for the adversarial class's probability.
    victim_seed = args.seed + 1
    clean_victim = fit(train_set, args, seed=victim_seed)
    tx, ty = target_images(test, args.targets_matching, avoid=None)
    with torch.no_grad():
        adv = surrogate(tx.to(args.device)).argsort(dim=1)[:, -2].cpu()  # runner-up class of each target
    hits, probs, clean_probs, t_poison, t_train, losses = 0, [], [], 0.0, 0.0, []
    for i in range(tx.shape[0]):
        attack = GradientMatching(target=int(adv[i]), steps=args.steps, restarts=args.restarts, seed=args.seed + i)
        t0 = time.perf_counter()
        poisoned = attack(train_set, surrogate, tx[i], target_y=ty[i : i + 1])
        t_poison += time.perf_counter() - t0
        losses.append(attack.last_stats["best_loss"])
        t0 = time.perf_counter()
        victim = fit(poisoned.data, args, seed=victim_seed)
        t_train += time.perf_counter() - t0
        pred = predict_one(victim, tx[i])
        hits += int(pred == int(adv[i]))
        probs += class_prob(victim, tx[i : i + 1], adv[i : i + 1])
        clean_probs += class_prob(clean_victim, tx[i : i + 1], adv[i : i + 1])
        log(f"  target {i}: class {int(ty[i])} -> {int(adv[i])}: predicted {pred}, p_adv {probs[-1]:.4f} "
            f"(clean victim {clean_probs[-1]:.4f}), matching loss {losses[-1]:.3f}")  # fmt: skip
    return {
        "attack": repr(attack), "n_poisons": poisoned.n_poisons, "targets": int(tx.shape[0]),
        "poisoning_success": hits / tx.shape[0], "adv_prob": sum(probs) / len(probs),
        "adv_prob_clean": sum(clean_probs) / len(clean_probs), "matching_loss": sum(losses) / len(losses),
        "poison_seconds": t_poison, "train_seconds": t_train,
    }  # fmt: skip


def report(rows: list[dict[str, Any]], clean_acc: float, args: argparse.Namespace, command: str) -> str:
    lines = [
        f"`{command}` — MNIST, victims: zoo cnn, {args.epochs} epochs, {args.n_train} training images; "
        f"clean model of the same recipe: accuracy {clean_acc:.4f}",
        "",
        "| attack | poisons | clean acc | Δ clean | ASR / success | p(adv) poisoned / clean | poison s | train s |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        acc = r.get("clean_accuracy")
        success = r.get("asr", r.get("poisoning_success", r.get("source_to_destination")))
        padv = f"{r['adv_prob']:.3f} / {r['adv_prob_clean']:.3f}" if "adv_prob" in r else "-"
        lines.append(
            f"| {r['name']} | {r['n_poisons']}{' ×' + str(r['targets']) if 'targets' in r else ''} | "
            f"{'-' if acc is None else f'{acc:.4f}'} | {'-' if acc is None else f'{acc - clean_acc:+.4f}'} | "
            f"{'-' if success is None else f'{success:.4f}'} | {padv} | {r.get('poison_seconds', 0):.1f} | "
            f"{r.get('train_seconds', 0):.1f} |"
        )
    lines.append("")
    lines.append(
        "ASR: backdoors (all-to-one: triggered test images of classes ≠ 0 classified 0; all-to-all: classified y+1); "
        "labelflip-pair: test 1s classified 7; collision/matching: fraction of targets classified as the adversarial "
        "class. Reference: BadNets at 10 % on MNIST, clean 0.982 / ASR 0.9995 (verazuo/badnets-pytorch, 60k images, "
        "100 epochs)."
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--attacks", nargs="+", default=list(ATTACKS), choices=ATTACKS)
    ap.add_argument("--epochs", type=int, default=3, help="training epochs of every victim (and the clean reference)")
    ap.add_argument("--n-train", type=int, default=common.N_TRAIN, help="training images (first n of the 8,000)")
    ap.add_argument("--target", type=int, default=0, help="target class of the backdoors and of collision")
    ap.add_argument("--targets", type=int, default=5, help="collision: number of target images")
    ap.add_argument("--targets-matching", type=int, default=2, help="matching: number of target images")
    ap.add_argument("--steps", type=int, default=250, help="matching: optimisation steps (paper 250)")
    ap.add_argument("--restarts", type=int, default=1, help="matching: restarts (paper 8; 1 keeps the run short)")
    ap.add_argument("--collision-iters", type=int, default=1500, help="collision: forward-backward iterations")
    ap.add_argument("--head-epochs", type=int, default=10, help="collision: epochs of last-layer retraining")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch intra-op threads (default 1: the tensors are small, and on shared cores more threads "
                    "mostly wait on each other; 0 keeps torch's default)")  # fmt: skip
    ap.add_argument("--quick", action="store_true", help="2,000 training images, 2 epochs, fewer targets and steps")
    ap.add_argument("--fresh", action="store_true", help="ignore cached rows")
    args = ap.parse_args(argv)
    if args.quick:
        args.n_train, args.epochs, args.targets, args.targets_matching = min(args.n_train, 2000), 2, 3, 1
        args.steps, args.collision_iters = min(args.steps, 50), min(args.collision_iters, 300)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    command = "python benchmarks/poisoning_mnist.py " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
    log(f"torch {torch.__version__}, {torch.get_num_threads()} threads, device {args.device}, "
        f"load average {os.getloadavg()[0]:.2f}")  # fmt: skip
    split = common.load_split()
    train_set = split.train.subset(slice(0, args.n_train), name="mnist-train")
    test = split.eval
    base = {"n_train": args.n_train, "epochs": args.epochs, "seed": args.seed}
    t0 = time.perf_counter()
    clean_victim = fit(train_set, args)
    clean_acc = clean_accuracy(clean_victim, test)
    log(f"clean victim: accuracy {clean_acc:.4f} ({time.perf_counter() - t0:.1f} s)")
    surrogate = clean_victim  # the pretrained network of collision and the surrogate of matching
    trigger_attacks = {
        "labelflip": lambda: LabelFlip(rate=0.1, seed=args.seed),
        "labelflip-pair": lambda: LabelFlip(rate=0.4, pairs=[(1, 7)], seed=args.seed),
        "badnets": lambda: BadNets(target=args.target, seed=args.seed),
        "badnets-a2a": lambda: BadNets(mode="all-to-all", seed=args.seed),
        "blended": lambda: Blended(target=args.target, seed=args.seed),
        "wanet": lambda: WaNet(target=args.target, seed=args.seed),
    }
    rows: list[dict[str, Any]] = []
    for name in args.attacks:
        log(f"{name}:")
        if name in trigger_attacks:
            settings = {**base, "target": args.target}
            row = cached(name, settings, args.fresh,
                         lambda n=name: run_trigger_attack(trigger_attacks[n](), train_set, test, args))  # fmt: skip
            rows.append({"name": name, **row})
        elif name == "collision":
            settings = {**base, "target": args.target, "targets": args.targets, "iters": args.collision_iters,
                        "head_epochs": args.head_epochs}  # fmt: skip
            got = cached(name, settings, args.fresh,
                         lambda: {"rows": run_collision(train_set, test, surrogate, args)})  # fmt: skip
            rows += [{"name": r["attack"], **r} for r in got["rows"]]
        else:
            settings = {**base, "targets": args.targets_matching, "steps": args.steps, "restarts": args.restarts}
            row = cached(name, settings, args.fresh,
                         lambda: run_matching(train_set, test, surrogate, args))  # fmt: skip
            rows.append({"name": name, **row})
        r = rows[-1]
        log("  " + ", ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in r.items()
                             if k not in ("name", "attack")))  # fmt: skip
    print()
    print(report(rows, clean_acc, args, command))
    return 0


if __name__ == "__main__":
    sys.exit(main())
