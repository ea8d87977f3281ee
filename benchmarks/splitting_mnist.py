"""Adaptive multilevel splitting against naive Monte Carlo: log P(misclassified) under uniform noise in an l∞ ball.

For a few correctly classified evaluation images and a few radii, the probability that a point drawn uniformly from
the ball ∩ [0, 1] (bastion's ``measure="intersect"``, as in Webb et al., ICLR 2019) is misclassified, estimated

1. by :func:`~bastion.statistical.splitting.multilevel_splitting` (AMLS), with its log-estimate, the reported spread
   (the asymptotic one for a single run), the number of levels, the model calls and the time;
2. by naive Monte Carlo with the *same number of model calls* as AMLS (what the same budget buys without splitting);
3. by naive Monte Carlo with up to ``--mc-budget`` calls, stopping once ``--mc-hits`` violations are seen (the
   reference value where the event is frequent enough to be seen at all).

Two models:

* ``--data mnist`` (default): the zoo ``cnn`` of ``benchmarks/common.py`` (trained on the first 8,000 MNIST test
  images, cached in ``benchmarks/.cache``), on the last 2,000;
* ``--data digits``: the same architecture with 16/32 channels trained here on scikit-learn's bundled 8x8 digits
  (seeded; no download), on a held-out fifth of them. Small enough for the paper's defaults (N = 1000, M = 100) on
  CPU.

Run from the repository root::

    python benchmarks/splitting_mnist.py --data digits --samples 3 --eps 0.3,0.4,0.5
    python benchmarks/splitting_mnist.py --data mnist --samples 2 --eps 0.3,0.4 --particles 200 --steps 20
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common
from bastion.data import Dataset, load_digits
from bastion.defenses.training import train
from bastion.models import build_model
from bastion.statistical.splitting import multilevel_splitting, naive_monte_carlo
from bastion.threat import LpBall

LN10 = math.log(10.0)


def digits_model(log) -> tuple[nn.Module, Dataset]:
    data = load_digits()
    train_set, test_set = data.train_test_split(0.2, seed=0)
    torch.manual_seed(0)
    model = build_model("cnn", data.feature_shape, data.num_classes, channels=(16, 32), hidden=64)
    t0 = time.perf_counter()
    train(model, train_set, epochs=15, batch_size=64, lr=3e-3, seed=0, progress=False)
    acc = common.accuracy(model, test_set.x, test_set.y)
    log(f"digits cnn: trained in {time.perf_counter() - t0:.0f} s, held-out accuracy {acc:.4f}")
    return model.eval(), test_set


def mnist_model(log) -> tuple[nn.Module, Dataset]:
    split = common.load_split()
    return common.get_model(split, log=log).eval(), split.eval


def log10(lp: float) -> str:
    return "-inf" if lp == -math.inf else f"{lp / LN10:.2f}"


def monte_carlo_until(model, x, y, threat, budget: int, hits: int, batch: int, seed: int):
    """Naive MC in rounds of ``batch`` until ``hits`` violations are seen or ``budget`` calls are spent."""
    total_hits, total, seconds = 0, 0, 0.0
    while total < budget and total_hits < hits:
        n = min(batch, budget - total)
        mc = naive_monte_carlo(model, x, y, threat, n=n, batch_size=min(n, 5000), seed=seed + total)
        total_hits, total, seconds = total_hits + mc.hits, total + n, seconds + mc.seconds
    return total_hits, total, seconds


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", choices=("mnist", "digits"), default="mnist")
    parser.add_argument("--samples", type=int, default=3, help="correctly classified evaluation images")
    parser.add_argument("--eps", default="0.3,0.4,0.5", help="comma-separated l∞ radii")
    parser.add_argument("--particles", type=int, default=1000, help="AMLS particles N (paper: 1000)")
    parser.add_argument("--steps", type=int, default=100, help="Metropolis-Hastings steps per level M (paper: 100)")
    parser.add_argument("--runs", type=int, default=1, help="independent AMLS runs (>= 2: empirical spread)")
    parser.add_argument("--mc-budget", type=int, default=200_000, help="most model calls of the reference MC")
    parser.add_argument("--mc-hits", type=int, default=20, help="the reference MC stops after this many hits")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--output", type=Path, default=None, help="also write the Markdown table here")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    model, data = (digits_model if args.data == "digits" else mnist_model)(print)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = model.to(device)
    with torch.no_grad():
        pred = torch.cat([model(data.x[i : i + 500].to(device)).argmax(1).cpu() for i in range(0, len(data), 500)])
    chosen = (pred == data.y).nonzero().squeeze(1)[: args.samples].tolist()
    radii = [float(e) for e in args.eps.split(",")]
    rows = []
    for i in chosen:
        x, y = data.x[i].to(device), int(data.y[i])
        for eps in radii:
            threat = LpBall("linf", eps)
            amls = multilevel_splitting(model, x, y, threat, n_particles=args.particles, mh_steps=args.steps,
                                        n_runs=args.runs, seed=i)  # fmt: skip
            same = naive_monte_carlo(model, x, y, threat, n=amls.model_calls, batch_size=5000, seed=10_000 + i)
            hits, total, mc_s = monte_carlo_until(model, x, y, threat, args.mc_budget, args.mc_hits, 20_000, 20_000)
            ref = "-inf" if hits == 0 else f"{math.log10(hits / total):.2f}"
            spread = "n/a" if math.isnan(amls.log_p_std) else f"{amls.log_p_std / LN10:.2f}"
            rows.append([
                str(i), f"{eps:g}", log10(amls.log_p), spread, str(amls.n_levels), amls.termination,
                str(amls.model_calls), f"{amls.seconds:.1f}", f"{same.hits}", log10(same.log_p),
                f"{same.interval[1]:.1e}", f"{same.seconds:.1f}", f"{ref} ({hits}/{total})", f"{mc_s:.1f}",
            ])  # fmt: skip
            print(" | ".join(rows[-1]), flush=True)
    header = [
        "image", "eps", "AMLS log10 p", "± (1 sd)", "levels", "stop", "AMLS calls", "AMLS s", "MC hits (same calls)",
        "MC log10 p", "MC 95% upper", "MC s", f"MC ref. log10 p (hits/calls, ≤{args.mc_budget})", "ref. s",
    ]  # fmt: skip
    table = common.markdown_table(header, rows)
    settings = (f"{args.data}, N = {args.particles}, M = {args.steps}, rho = 0.1, runs = {args.runs}, "
                f"device {device}, {args.threads} thread(s)")  # fmt: skip
    print(f"\n{settings}\n\n{table}")
    if args.output:
        args.output.write_text(f"{settings}\n\n{table}\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
