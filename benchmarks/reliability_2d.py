"""The reliability assessment model on the paper's 2-D running example: a random forest on two-class data in [0, 1]².

Zhao et al., "Assessing the Reliability of Deep Learning Classifiers Through Robustness Evaluation and Operational
Profiles", AISafety workshop at IJCAI 2021, Section 5 / Table 1 (reference: ReAsDL ``running_example/main.py``).

The setting, as in the reference script:

* data: 1,000 points of scikit-learn's two interleaved moons (``make_moons(1000, noise=0.1, random_state=0)``),
  rescaled affinely to ``[0.05, 0.95]²`` (the paper's own three synthetic sets, ``trainingdata_{a,b,c}.xls``, are
  spreadsheets of 2-D points in the unit square whose generator is not published; moons give a curved boundary
  with little class overlap, as theirs);
* model: ``RandomForestClassifier(n_estimators=10, random_state=5)`` trained on 80 % of the points
  (``train_test_split(test_size=0.2, random_state=1)``), as the reference;
* operational profile: a Gaussian KDE of bandwidth 0.2 (the paper's) fitted to all 1,000 points, bootstrapped 100
  times on half-size resamples (the reference's B = 100);
* cells: 250×250 and 500×500 grids over ``[0, 1]²`` (``--cells all`` or ``top:K``), 10,000 uniform samples per cell,
  the pfd's upper bound at 97.5 %.

``--torch`` replaces the forest by a small torch MLP (2-32-32-2, ReLU) trained on the same split, so that CROWN
certifies cells and PGD falsifies some (the table then says how many cells each method decided).

Run from the repository root::

    python benchmarks/reliability_2d.py --grids 250 --cells all
    python benchmarks/reliability_2d.py --grids 500 --cells top:62500
    python benchmarks/reliability_2d.py --grids 250,500 --cells all --torch
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from torch import nn


def moons_data() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import make_moons

    x, y = make_moons(1000, noise=0.1, random_state=0)
    x = (x - x.min(axis=0)) / (x.max(axis=0) - x.min(axis=0)) * 0.9 + 0.05
    return x.astype(np.float32), y.astype(np.int64)


def train_forest(x: np.ndarray, y: np.ndarray, log) -> object:
    from sklearn.ensemble import RandomForestClassifier
    from sklearn.model_selection import train_test_split

    xtr, xte, ytr, yte = train_test_split(x, y, test_size=0.2, random_state=1)
    rf = RandomForestClassifier(n_estimators=10, random_state=5).fit(xtr, ytr)
    log(f"random forest: train accuracy {rf.score(xtr, ytr):.4f}, test accuracy {rf.score(xte, yte):.4f}")
    return rf


def train_mlp(x: np.ndarray, y: np.ndarray, log) -> nn.Module:
    from sklearn.model_selection import train_test_split

    xtr, xte, ytr, yte = train_test_split(x, y, test_size=0.2, random_state=1)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(2, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 2))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    xt, yt = torch.from_numpy(xtr), torch.from_numpy(ytr)
    for _ in range(1500):
        opt.zero_grad()
        nn.functional.cross_entropy(model(xt), yt).backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        acc_tr = (model(xt).argmax(1) == yt).float().mean().item()
        acc_te = (model(torch.from_numpy(xte)).argmax(1) == torch.from_numpy(yte)).float().mean().item()
    log(f"torch MLP 2-32-32-2: train accuracy {acc_tr:.4f}, test accuracy {acc_te:.4f}")
    return model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--grids", default="250,500", help="cells per axis, comma-separated (default 250,500)")
    parser.add_argument("--cells", default="all", help="'all' or 'top:K' (default all)")
    parser.add_argument("--samples", type=int, default=10_000, help="uniform samples per cell (default 10,000)")
    parser.add_argument("--n-boot", type=int, default=100, help="bootstrap replicates of the profile (default 100)")
    parser.add_argument("--bandwidth", type=float, default=0.2, help="KDE bandwidth (default 0.2, the paper's)")
    parser.add_argument("--torch", action="store_true", help="assess a small torch MLP instead of the forest")
    parser.add_argument("--mode", default="probability", choices=["probability", "worst-case"])
    parser.add_argument("--store", default=None, help="result store (resumes an interrupted run)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--figure", default=None, help="write the profile figure of the last grid here (.png)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from bastion.reliability import assess_reliability, plot_profile, r_separation

    def log(msg: str) -> None:
        print(msg, flush=True)

    x, y = moons_data()
    log(f"data: 1000 moons points in [0.05, 0.95]², l∞ r-separation {r_separation(x, y):.5f}")
    model = train_mlp(x, y, log) if args.torch else train_forest(x, y, log).predict  # type: ignore[attr-defined]
    rows = []
    result = None
    for size in (int(s) for s in args.grids.split(",")):
        t0 = time.perf_counter()
        result = assess_reliability(
            model, (x, y), cells=args.cells, grid=f"{size}x{size}", bandwidth=args.bandwidth, n_boot=args.n_boot,
            samples_per_cell=args.samples, mode=args.mode, store=args.store, progress=True, seed=0,
            config={"benchmark": "reliability_2d"},
        )  # fmt: skip
        wall = time.perf_counter() - t0
        decided = ", ".join(f"{k} {v}" for k, v in result.decided.items() if v)
        rows.append(
            f"| {size}×{size} | {result.n_cells} | {result.pfd:.5f} | {result.variance:.3g} | {result.upper:.5f} | "
            f"{result.acu:.5f} | {result.mass_covered:.4f} | {result.n_certified} / {result.n_falsified} / "
            f"{result.n_unknown} | {decided} | {result.seconds_per_cell:.4f} | {wall:.0f} |"
        )
        log(rows[-1])
    name = "torch MLP" if args.torch else "random forest (10 trees)"
    print(f"\n{name}, bandwidth {args.bandwidth}, {args.samples} samples per cell, {args.n_boot} bootstrap fits\n")
    print(
        "| grid | cells | pfd | variance | upper (97.5 %) | ACU | mass covered | certified / falsified / unknown "
        "| decided by | s per cell | wall s |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        print(row)
    if args.figure and result is not None:
        print(f"figure: {plot_profile(result, args.figure)}")


if __name__ == "__main__":
    main()
