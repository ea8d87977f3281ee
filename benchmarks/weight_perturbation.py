"""Weight-perturbation robustness of a small digits MLP: certified and attacked fractions against eps, the brackets.

For each of the first ``--n`` images of the 20 % digits test split (scikit-learn's bundled 8x8 digits, split with
seed 0) :func:`bastion.reliability.weights.weight_robustness` computes the bracket ``[certified, found]`` on the
relative weight perturbation size ``eps`` (every weight of every Linear layer may move by ``eps·|w|``, or by
``eps·max|W|`` with ``--relative layer``): the certified radius by bisection on the interval or CROWN bound, the
smallest flipping size found by bisection with the weight PGD attack. The script prints, per bound method:

* for each eps of ``--eps``: the fraction certified (radius >= eps) and the fraction attacked (a flip of size <= eps,
  clean errors included), from the same brackets;
* the median certified radius, the median size found, the median of found / certified (1 means the bracket is
  closed) and the seconds per sample;
* a soundness check: samples whose certified radius exceeds the size of a flip found by an independent attack run
  (no certified lower end given to the search); must be 0.

The model is the zoo ``mlp`` (``--hidden``, default two hidden layers of 64) trained with bastion's trainer (Adam,
20 epochs, seed 0) on the 80 % split and cached in ``benchmarks/.cache``. With a single hidden layer the interval
bound is exact (a fixed input makes every hidden unit move independently), so that bracket measures the attack.

Run from the repository root::

    .venv/bin/python benchmarks/weight_perturbation.py                      # 200 images, both bounds
    .venv/bin/python benchmarks/weight_perturbation.py --hidden 64 --n 360  # one hidden layer, the whole split
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common
from bastion.data import Dataset, load_digits
from bastion.defenses.training import accuracy, train
from bastion.models import build_model, load_model, save_model
from bastion.reliability.weights import minimal_weight_perturbation, weight_robustness


def get_model(train_set: Dataset, hidden: tuple[int, ...], log=print) -> nn.Module:
    """The zoo MLP, loaded from the cache or trained (Adam, 20 epochs, seeded) and cached."""
    recipe: dict[str, Any] = {
        "data": "digits",
        "arch": "mlp",
        "hidden": list(hidden),
        "epochs": 20,
        "lr": 3e-3,
        "seed": 0,
    }
    digest = hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:10]
    path = common.CACHE_DIR / f"weights_digits_mlp{'x'.join(map(str, hidden))}_{digest}.pt"
    if path.exists():
        log(f"model: loaded {path.name}")
        return load_model(path).eval()
    torch.manual_seed(recipe["seed"])
    model = build_model("mlp", train_set.feature_shape, train_set.num_classes, hidden=hidden)
    t0 = time.perf_counter()
    train(model, train_set, epochs=recipe["epochs"], lr=recipe["lr"], seed=recipe["seed"], progress=False)
    log(f"model: trained {recipe} in {time.perf_counter() - t0:.1f} s")
    common.CACHE_DIR.mkdir(parents=True, exist_ok=True)
    save_model(model, path)
    return model.eval()


def _fmt(v: float | None) -> str:
    return "-" if v is None else f"{v:.4g}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=200, help="test images (the first n of the 20%% split)")
    ap.add_argument("--hidden", type=int, nargs="+", default=[64, 64], help="hidden widths of the MLP")
    ap.add_argument("--methods", nargs="+", default=["interval", "crown"], choices=["interval", "crown"])
    ap.add_argument("--relative", default="elementwise", choices=["elementwise", "layer"])
    ap.add_argument("--biases", action="store_true", help="perturb the biases too")
    ap.add_argument("--eps", type=float, nargs="+", default=[0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1])
    ap.add_argument("--attack-steps", type=int, default=50)
    ap.add_argument("--targets", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    log = print
    log(f"torch {torch.__version__}, {platform.processor() or platform.machine()}, {args.threads} thread(s), "
        f"load average {os.getloadavg()[0]:.2f}")  # fmt: skip
    train_set, test_set = load_digits().train_test_split(test_fraction=0.2, seed=0)
    model = get_model(train_set, tuple(args.hidden), log)
    data = test_set.subset(slice(0, args.n))
    log(f"data: {len(data)} digits test images; clean accuracy {100 * accuracy(model, data):.2f}%")
    log(f"threat: relative={args.relative}, biases={args.biases}, every Linear layer")
    common_kw = {"relative": args.relative, "biases": args.biases}

    # an independent attack search (no certified lower end) for the soundness check
    t0 = time.perf_counter()
    free, _ = minimal_weight_perturbation(
        model, data.x, data.y, steps=args.attack_steps, targets=args.targets, **common_kw
    )
    log(f"independent attack search: {(time.perf_counter() - t0) / len(data) * 1000:.1f} ms/sample")

    rows = []
    for method in args.methods:
        res = weight_robustness(
            model, data, method=method, attack_steps=args.attack_steps, targets=args.targets, progress=False,
            **common_kw,
        )  # fmt: skip
        recs = sorted(res.records, key=lambda r: r.index)
        correct = [r for r in recs if r.clean_pred == r.label]
        cert = [r.certified or 0.0 for r in correct]
        found = [r.adv_distance for r in correct if r.adv_distance is not None]
        ratios = [r.adv_distance / r.certified for r in correct if r.adv_distance is not None and r.certified]
        unsound = sum(
            1 for r in correct if r.certified is not None and r.certified > float(free[r.index]) * (1 + 1e-12)
        )
        inner = sum(1 for r in correct if r.adv_distance is not None and (r.certified or 0.0) > r.adv_distance)
        fracs = []
        for e in args.eps:
            c = sum(r.clean_pred == r.label and (r.certified or 0.0) >= e for r in recs) / len(recs)
            a = sum(r.adv_distance is not None and r.adv_distance <= e for r in recs) / len(recs)
            fracs.append((e, c, a))
        rows.append((method, res, fracs))
        log(f"\n== {method} ({res.threat.split(':')[0]}) ==")
        log(f"{'eps':>8} {'certified':>10} {'attacked':>10} {'unknown':>9}")
        for e, c, a in fracs:
            log(f"{e:>8g} {100 * c:>9.1f}% {100 * a:>9.1f}% {100 * max(0.0, 1 - c - a):>8.1f}%")
        log(f"median certified radius {_fmt(statistics.median(cert) if cert else None)}, "
            f"median size found {_fmt(statistics.median(found) if found else None)}, "
            f"median found/certified {_fmt(statistics.median(ratios) if ratios else None)}, "
            f"max {_fmt(max(ratios) if ratios else None)}")  # fmt: skip
        log(f"time {res.seconds / len(data) * 1000:.1f} ms/sample (bound bisection + attack bisection), "
            f"certified > independent attack: {unsound}, certified > own attack: {inner}")  # fmt: skip


if __name__ == "__main__":
    main()
