"""DeepGame on MNIST: the bracket [lower, upper] of the minimal adversarial distance of a few images, against FAB.

A small CNN (one 3x3 convolution of 8 channels with stride 2, ReLU, a dense layer of 32, ReLU, 10 outputs) is trained
here on the first 8,000 MNIST test images (bastion's trainer, Adam, 3 epochs, seed 0) and cached in
``benchmarks/.cache``. For each of ``--n`` evaluation images it runs the cooperative DeepGame game (grey-box features,
the reference's ``tau = 1`` so that each move sets a pixel to 0 or 1, the given norm) and reports the proven lower
bound, the MCTS/A* upper bound (a re-executed adversarial example), the time, and the distance FAB (Croce & Hein,
ICML 2020; minimal-distortion, 100 steps) finds for the same image. DeepGame's upper bound lives on the tau-lattice,
so it is expected to lie above a continuous attack's distance; its lower bound is a proof, FAB gives none.

The lower bound uses the global Lipschitz constant (``lipschitz="norms"``, the product of layer norms, computed
once): the box-local interval constants cost one CROWN pass over ~1,500 boxes per A* expansion, too slow for a
benchmark on 2 CPU cores.

Run from the repository root::

    python benchmarks/deepgame_mnist.py --n 3 --mcts-iterations 30 --astar-budget 20
    python benchmarks/deepgame_mnist.py --norm l0 --eps 40 --n 2 --features black
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common
from bastion.attacks.fab import FAB
from bastion.defenses.training import train
from bastion.threat import LpBall
from bastion.verify.globalopt.deepgame import deepgame

TRAIN = {"epochs": 3, "batch_size": 64, "lr": 1e-3, "seed": 0}


def small_cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, stride=2), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 13 * 13, 32), nn.ReLU(),
        nn.Linear(32, 10),
    )  # fmt: skip


def get_model(split: common.Split) -> nn.Module:
    digest = hashlib.sha256(json.dumps({"model": "deepgame_small", **TRAIN}, sort_keys=True).encode()).hexdigest()
    path = common.CACHE_DIR / f"deepgame_small_{digest[:10]}.pt"
    model = small_cnn()
    if path.exists():
        model.load_state_dict(torch.load(path, weights_only=True))
        return model.eval()
    torch.manual_seed(TRAIN["seed"])
    t0 = time.perf_counter()
    train(model, split.train, epochs=TRAIN["epochs"], batch_size=TRAIN["batch_size"], lr=TRAIN["lr"],
          seed=TRAIN["seed"], progress=False)  # fmt: skip
    print(f"model: trained in {time.perf_counter() - t0:.0f} s, clean accuracy "
          f"{common.accuracy(model, split.x_eval, split.y_eval):.4f}")  # fmt: skip
    common.CACHE_DIR.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), path)
    return model.eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=3, help="evaluation images")
    parser.add_argument("--norm", default="l2", choices=["l0", "l1", "l2", "linf"])
    parser.add_argument("--tau", type=float, default=1.0)
    parser.add_argument("--eps", type=float, default=None, help="distance budget (default: the whole domain)")
    parser.add_argument("--mcts-iterations", type=int, default=30)
    parser.add_argument("--mcts-seconds", type=float, default=60.0)
    parser.add_argument("--astar-budget", type=int, default=20)
    parser.add_argument("--features", default="grey", choices=["grey", "black"])
    args = parser.parse_args()
    torch.set_num_threads(1)
    split = common.load_split()
    model = get_model(split)
    x, y = split.x_eval[: args.n], split.y_eval[: args.n]
    fab_norm = "l1" if args.norm == "l0" else args.norm
    t0 = time.perf_counter()
    fab = FAB(steps=100)(model, x, y, threat=LpBall(fab_norm, math.inf))
    fab_s = (time.perf_counter() - t0) / max(args.n, 1)
    rows = []
    for i in range(args.n):
        r = deepgame(
            model, x[i : i + 1], int(y[i]), norm=args.norm, eps=args.eps, features=args.features, tau=args.tau,
            mcts_iterations=args.mcts_iterations, mcts_seconds=args.mcts_seconds, astar_budget=args.astar_budget,
            lipschitz="norms", seed=0,
        )  # fmt: skip
        fab_d = float(LpBall(args.norm, math.inf).distance(fab.x_adv[i : i + 1], x[i : i + 1])[0])
        rows.append([
            str(i), str(int(y[i])), f"{r.lower:.4f}", f"{r.upper:.4f}", str(r.mcts_iterations),
            str(r.astar_expansions), str(r.evaluations), f"{r.seconds:.1f}",
            f"{fab_d:.4f}" if bool(fab.success[i]) else "failed", f"{fab_s:.2f}",
        ])  # fmt: skip
        print(" | ".join(rows[-1]), flush=True)
    header = ["image", "label", "lower (proof)", "upper (DeepGame)", "MCTS it.", "A* exp.", "evaluations", "s",
              f"FAB {args.norm}", "FAB s/image"]  # fmt: skip
    print(f"\nDeepGame cooperative, {args.norm}, tau={args.tau}, features={args.features}\n")
    print(common.markdown_table(header, rows))


if __name__ == "__main__":
    main()
