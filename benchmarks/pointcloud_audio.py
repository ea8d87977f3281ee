"""Point-cloud and audio attacks: success rate, perturbation size, model calls and time, beside random baselines.

Point clouds: a zoo ``pointnet`` trained on the synthetic shapes of :func:`bastion.pointcloud.make_shapes`
(``--train-n`` clouds of ``--points`` points, 8 classes), attacked on ``--n`` held-out clouds with Xiang et al.'s
C&W perturbation (l2 unbounded, Chamfer and Hausdorff budgets), independent point adding, and Zheng et al.'s
saliency dropping; the SOR defence (DUP-Net) against point adding crafted on the bare model (transfer), run through
SOR, and the adaptive attack. Each bounded attack is compared with a random point of the same threat set (three
draws) — the baseline it must beat. Point adding adds ``points / 8`` points (32 of 256); the SOR rows use the clouds
that both the bare and the defended model classify correctly.

Audio: a zoo ``audiocnn`` trained on the synthetic vowels of :func:`bastion.audio.make_vowels` (8 kHz, 0.5 s), attacked
with waveform PGD and Carlini & Wagner's audio attack under l∞ budgets in dB relative to each clip, beside uniform
noise at the budget.

Success rates are over the correctly classified samples; distances are medians over the successful ones (squared
units for Chamfer/Hausdorff, points for dropping, dB for audio). One torch thread. Run from the repository root::

    python benchmarks/pointcloud_audio.py                       # CPU-sized defaults: --points 256 --n 32
    python benchmarks/pointcloud_audio.py --points 1024 --n 64 --steps 500 --binary-steps 10 --device cuda
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common
from bastion.attacks.transfer import Transferred
from bastion.audio import AudioCW, DecibelBall, WaveformPGD, to_db
from bastion.audio.demo import demo_audiocnn
from bastion.pointcloud import (
    SOR,
    PointAdd,
    PointAdding,
    PointCW,
    PointDropping,
    PointPerturbation,
    SaliencyDrop,
    add_points,
)
from bastion.pointcloud.demo import demo_pointnet


def _correct(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, float]:
    with torch.no_grad():
        ok = model(x).argmax(dim=1) == y
    return x[ok], y[ok], float(ok.float().mean())


def _random(model: torch.nn.Module, threat: Any, x: torch.Tensor, y: torch.Tensor, draws: int = 3) -> float:
    g = torch.Generator(device=x.device).manual_seed(0)
    hit = torch.zeros(len(y), dtype=torch.bool, device=x.device)
    with torch.no_grad():
        for _ in range(draws):
            hit |= model(threat.random_start(x, g)).argmax(dim=1) != y
    return float(hit.float().mean())


def _row(name: str, threat: Any, res: Any, baseline: float | None, *, db: bool = False) -> list[str]:
    ok = res.success
    d = res.distance[ok]
    if d.numel() == 0:
        med = "-"
    elif db:
        med = f"{float(to_db(d.median())):.1f} dB"
    else:
        med = f"{float(d.median()):.4g}"
    n = max(len(ok), 1)
    return [
        name,
        threat.key,
        f"{100 * res.success_rate:.1f}%",
        "-" if baseline is None else f"{100 * baseline:.1f}%",
        med,
        f"{res.model_calls / n:.0f}",
        f"{res.seconds:.1f}",
    ]


def point_rows(args: argparse.Namespace, device: torch.device) -> tuple[list[list[str]], str]:
    started = time.perf_counter()
    model, test = demo_pointnet(points=args.points, train_n=args.train_n, test_n=args.n, epochs=args.epochs)
    model = model.to(device)
    x, y, acc = _correct(model, test.x.to(device), test.y.to(device))
    note = f"PointNet, {args.points} points, clean accuracy {100 * acc:.1f}% ({time.perf_counter() - started:.0f} s)"
    opt = {"steps": args.steps, "binary_steps": args.binary_steps}
    add_opt = {**opt, "lr": 0.02}
    rows = []
    for metric, eps in (("l2", math.inf), ("chamfer", args.chamfer), ("hausdorff", args.hausdorff)):
        threat = PointPerturbation(metric, eps)
        res = PointCW(**opt)(model, x, y, threat=threat)
        base = None if math.isinf(eps) else _random(model, threat, x, y)
        rows.append(_row("PointCW (Xiang et al.)", threat, res, base))
    k = max(args.points // 8, 1)
    xa = add_points(x, k, torch.Generator().manual_seed(0))
    bounded = PointAdding(k, "hausdorff", args.hausdorff * 5)
    rows.append(_row("PointAdd (Xiang et al.)", bounded, PointAdd(**add_opt)(model, xa, y, threat=bounded),
                     _random(model, bounded, xa, y)))  # fmt: skip
    free = PointAdding(k, "chamfer", math.inf)
    naive = PointAdd(**add_opt)(model, xa, y, threat=free)
    rows.append(_row("PointAdd, no defence", free, naive, None))
    drop = PointDropping(max(args.points // 5, 1))
    rows.append(_row("SaliencyDrop (Zheng et al.)", drop, SaliencyDrop()(model, x, y, threat=drop),
                     _random(model, drop, x, y)))  # fmt: skip
    defended = SOR(model)
    with torch.no_grad():  # the defence's rows: clouds both the bare and the defended model classify correctly
        both = defended(x).argmax(dim=1) == y
    x, y, xa = x[both], y[both], xa[both]
    transfer = Transferred(PointAdd(**add_opt), model)(defended, xa, y, threat=free)
    rows.append(_row("PointAdd -> SOR, transfer", free, transfer, None))
    rows.append(_row("PointAdd through SOR", free, PointAdd(**add_opt)(defended, xa, y, threat=free), None))
    rows.append(_row("PointAdd through SOR, adaptive", free,
                     PointAdd(**add_opt, sor_penalty=100.0)(defended, xa, y, threat=free), None))  # fmt: skip
    with torch.no_grad():
        sor_acc = float((defended(test.x.to(device)).argmax(dim=1) == test.y.to(device)).float().mean())
    return rows, note + f"; behind SOR {100 * sor_acc:.1f}%"


def audio_rows(args: argparse.Namespace, device: torch.device) -> tuple[list[list[str]], str]:
    started = time.perf_counter()
    model, test = demo_audiocnn(train_n=args.audio_train_n, test_n=args.n, epochs=args.epochs)
    model = model.to(device)
    x, y, acc = _correct(model, test.x.to(device), test.y.to(device))
    note = f"AudioCNN, 8 kHz 0.5 s vowels, clean accuracy {100 * acc:.1f}% ({time.perf_counter() - started:.0f} s)"
    rows = []
    for db in (-40.0, -32.0, -26.0):
        threat = DecibelBall(db)
        base = _random(model, threat, x, y)
        rows.append(_row("WaveformPGD", threat, WaveformPGD(steps=args.pgd_steps)(model, x, y, threat=threat), base,
                         db=True))  # fmt: skip
    threat = DecibelBall(-32.0)
    res = AudioCW(steps=args.cw_steps, lr=args.cw_lr, const=10.0)(model, x, y, threat=threat)
    rows.append(_row("AudioCW (Carlini & Wagner)", threat, res, None, db=True))
    return rows, note


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--points", type=int, default=256)
    parser.add_argument("--n", type=int, default=32, help="held-out samples per modality")
    parser.add_argument("--train-n", type=int, default=400, help="training clouds")
    parser.add_argument("--audio-train-n", type=int, default=600, help="training clips")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--steps", type=int, default=50, help="PointCW/PointAdd Adam steps per constant")
    parser.add_argument("--binary-steps", type=int, default=4)
    parser.add_argument("--chamfer", type=float, default=1e-3, help="Chamfer budget (squared units)")
    parser.add_argument("--hausdorff", type=float, default=1e-2, help="Hausdorff budget (squared units)")
    parser.add_argument("--pgd-steps", type=int, default=100)
    parser.add_argument("--cw-steps", type=int, default=300)
    parser.add_argument("--cw-lr", type=float, default=1e-3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--only", choices=("pointcloud", "audio"), default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)
    device = torch.device(args.device)
    header = ["attack", "threat", "success", "random", "median distance", "calls/sample", "seconds"]
    print(common.machine_summary())
    print(common.load_average(), "\n")
    if args.only in (None, "pointcloud"):
        rows, note = point_rows(args, device)
        print(note)
        print(common.markdown_table(header, rows), "\n", flush=True)
    if args.only in (None, "audio"):
        rows, note = audio_rows(args, device)
        print(note)
        print(common.markdown_table(header, rows))


if __name__ == "__main__":
    main()
