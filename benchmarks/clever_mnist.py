"""CLEVER scores against the bracket [CROWN certified radius, FAB found distance] on a small MNIST (or digits) MLP.

For each of ``--n`` evaluation images the script prints:

* the CROWN certified radius (:func:`bastion.verify.certify.certified_radius`): a sound lower bound on the minimal
  adversarial distance;
* the untargeted CLEVER score (:func:`bastion.statistical.clever.clever`, Weng et al., ICLR 2018): an *estimate*
  of that distance (of a lower bound on it), not a proof;
* the distance of the adversarial example FAB found (Croce & Hein, ICML 2020): an upper bound;

and counts the scores outside ``[certified, found]``. A score below the certified radius is merely conservative;
a score above the found distance overestimates robustness (an adversarial example exists closer than the score
says), which is what CLEVER can do and a certificate cannot.

The model is the zoo ``mlp`` with one hidden layer (``--hidden``, 100 units by default) trained on the first 8,000
MNIST test images (see ``common.py``) and cached in ``benchmarks/.cache``; the images are the first ``--n`` of the
2,000-image evaluation split. ``--data digits`` uses the bundled 8x8 digits instead (no MNIST files needed).

Run from the repository root::

    python benchmarks/clever_mnist.py                                   # 20 images, l2, N_b = 50, N_s = 1024
    python benchmarks/clever_mnist.py --n 100 --norm linf --n-batches 500   # the paper's N_b
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import sys
import time
from collections import Counter
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common
from bastion.attacks.fab import FAB
from bastion.data import Dataset, load_digits
from bastion.defenses.training import train
from bastion.models import build_model, load_model, save_model
from bastion.statistical.clever import DEFAULT_RADIUS, clever
from bastion.threat import LpBall
from bastion.verify.certify import certified_radius
from bastion.verify.ir import as_network

#: First radius probed by the certified-radius bisection (any value works; a good guess saves steps).
FIRST_PROBE = {"l2": 0.5, "linf": 0.02, "l1": 5.0}


def get_data(name: str) -> tuple[Dataset, Dataset]:
    """``(train, eval)``: MNIST's 8,000 / 2,000 split of ``common.py``, or an 80/20 split of the digits."""
    if name == "mnist":
        split = common.load_split()
        return split.train, split.eval
    return load_digits().train_test_split(test_fraction=0.2, seed=0)


def get_model(data_name: str, train_set: Dataset, hidden: int, log=print) -> nn.Module:
    """The one-hidden-layer MLP, loaded from the cache or trained (Adam, 8 epochs, seeded) and cached."""
    recipe = {"data": data_name, "arch": "mlp", "hidden": hidden, "epochs": 8, "lr": 1e-3, "seed": 0}
    digest = hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:10]
    path = common.CACHE_DIR / f"clever_{data_name}_mlp{hidden}_{digest}.pt"
    if path.exists():
        log(f"model: loaded {path.name}")
        return load_model(path).eval()
    torch.manual_seed(recipe["seed"])
    model = build_model("mlp", train_set.feature_shape, train_set.num_classes, hidden=(hidden,))
    t0 = time.perf_counter()
    train(model, train_set, epochs=recipe["epochs"], lr=recipe["lr"], seed=recipe["seed"], progress=False)
    log(f"model: trained {recipe} in {time.perf_counter() - t0:.1f} s")
    common.CACHE_DIR.mkdir(parents=True, exist_ok=True)
    save_model(model, path)
    return model.eval()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=20, help="evaluation images")
    ap.add_argument("--norm", choices=("l2", "linf", "l1"), default="l2")
    ap.add_argument("--radius", type=float, default=None, help="CLEVER's R (default: the module's per-norm default)")
    ap.add_argument("--n-batches", type=int, default=50, help="CLEVER's N_b (500 in the paper)")
    ap.add_argument("--batch-size", type=int, default=1024, help="CLEVER's N_s (1024 in the paper)")
    ap.add_argument("--target", choices=("untargeted", "top2", "random", "least_likely"), default="untargeted")
    ap.add_argument("--data", choices=("mnist", "digits"), default="mnist")
    ap.add_argument("--hidden", type=int, default=100, help="hidden units of the MLP")
    ap.add_argument("--fab-steps", type=int, default=100)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    train_set, eval_set = get_data(args.data)
    model = get_model(args.data, train_set, args.hidden)
    x, y = eval_set.x[: args.n], eval_set.y[: args.n]
    domain = eval_set.domain
    radius = DEFAULT_RADIUS[args.norm] if args.radius is None else args.radius
    target = None if args.target == "untargeted" else args.target
    print(
        f"{args.data}: {len(x)} images, norm {args.norm}, CLEVER {args.target} with R = {radius:g}, "
        f"N_b = {args.n_batches}, N_s = {args.batch_size}, seed {args.seed}; FAB {args.fab_steps} steps"
    )

    t0 = time.perf_counter()
    net = as_network(model, eval_set.feature_shape)
    cert = certified_radius(net, x, y, LpBall(args.norm, FIRST_PROBE[args.norm], domain), method="crown")
    t_cert = time.perf_counter() - t0

    res = clever(
        model, x, y, norm=args.norm, radius=radius, n_batches=args.n_batches, batch_size=args.batch_size,
        target=target, seed=args.seed, domain=domain,
    )  # fmt: skip

    t0 = time.perf_counter()
    found = FAB(steps=args.fab_steps)(model, x, y, threat=LpBall(args.norm, math.inf, domain))
    t_fab = time.perf_counter() - t0
    dist = torch.where(found.success, found.distance, torch.full_like(found.distance, math.inf)).cpu()
    if target is not None:
        print("note: FAB is untargeted; a targeted score is compared with the untargeted bracket")

    header = f"{'idx':>4} {'label':>5} {'pred':>4} {'CROWN':>10} {'CLEVER':>10} {'FAB':>10}  {'p-value':>8} {'where'}"
    print(header)
    below = above = inside = wrong = 0
    for i in range(len(x)):
        pred = int(res.clean_pred[i])
        if pred != int(y[i]):
            wrong += 1
            print(f"{i:>4} {int(y[i]):>5} {pred:>4} {'':>10} {'':>10} {'':>10}  {'':>8} misclassified")
            continue
        c, s, f = float(cert[i]), float(res.scores[i]), float(dist[i])
        if s < c:
            where, below = "below certified", below + 1
        elif s > f:
            where, above = "ABOVE found", above + 1
        else:
            where, inside = "inside", inside + 1
        pval = "fallback" if bool(res.fallback[i]) else f"{float(res.ks_pvalue[i]):.3f}"
        print(f"{i:>4} {int(y[i]):>5} {pred:>4} {c:>10.4f} {s:>10.4f} {f:>10.4f}  {pval:>8} {where}")
    scored = len(x) - wrong
    print(
        f"\nscores inside [certified, found]: {inside}/{scored}; below the certified radius: {below}; above the "
        f"found distance: {above}; misclassified (not scored): {wrong}; fallbacks to the sample maximum: "
        f"{int(res.fallback[res.clean_pred == y.cpu()].sum())}"
    )
    ok = res.clean_pred == y.cpu()
    kinds = ("best Kolmogorov-Smirnov p-value < min_pvalue" if "p-value" in r else r for r in res.reasons)
    reasons = Counter(r for r, keep in zip(kinds, ok.tolist()) if keep and r)
    if reasons:
        print("fallback reasons: " + "; ".join(f"{r} ({k})" for r, k in reasons.most_common()))
    if scored:
        print(
            f"mean CROWN {float(cert.cpu()[ok].mean()):.4f}, mean CLEVER {float(res.scores[ok].mean()):.4f}, "
            f"mean FAB {float(dist[ok].mean()):.4f}"
        )
    print(
        f"seconds: CROWN radius {t_cert:.1f}, CLEVER {res.seconds:.1f} ({res.model_calls} forward and "
        f"{res.grad_calls} gradient evaluations), FAB {t_fab:.1f}"
    )


if __name__ == "__main__":
    main()
