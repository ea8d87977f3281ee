"""Robust accuracy of the benchmark MNIST cnn under l∞ attacks, measured with ``bastion.evaluate``.

The model is the zoo ``cnn`` trained by ``common.py`` on the first 8,000 MNIST test images (standard training, no
defence); it is evaluated on the last 2,000. Three evaluations with the same seed:

* FGSM alone (Goodfellow et al. 2015, one step of eps);
* PGD alone with bastion's defaults (40 steps of 2.5·eps/40, random start, 1 restart, early stop);
* the cascade FGSM → PGD (PGD only on the samples FGSM did not break): the worst case of the two.

Run from the repository root::

    python benchmarks/mnist_robustness.py
    python benchmarks/mnist_robustness.py --eps 0.1 0.2 0.3 --n 2000
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common
from bastion.attacks import FGSM, PGD, Attack
from bastion.data import Dataset
from bastion.evaluate import EvaluationResult, evaluate
from bastion.threat import LpBall


def run(
    name: str, model: torch.nn.Module, data: Dataset, threats: list[LpBall], attacks: list[Attack], progress: bool
) -> tuple[EvaluationResult, float]:
    print(f"\n{name}: {', '.join(map(repr, attacks))}", flush=True)
    start = time.perf_counter()
    res = evaluate(model, data, threats, attacks, seed=0, progress=progress)
    seconds = time.perf_counter() - start
    print(res.table())
    print(f"({seconds:.1f} s)")
    return res, seconds


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--eps", type=float, nargs="+", default=[0.1, 0.2, 0.3], help="l∞ radii")
    ap.add_argument("--n", type=int, default=common.N_EVAL, help="evaluation images (the first n of the 2,000)")
    ap.add_argument("--progress", action="store_true", help="show bastion's progress bars")
    ap.add_argument("--output", type=Path, help="also write the Markdown table to this file")
    args = ap.parse_args(argv)

    print(f"# MNIST robustness\n\n{common.machine_summary()}")
    split = common.load_split()
    model = common.get_model(split)
    data = split.eval.subset(slice(0, args.n)) if args.n < len(split.eval) else split.eval
    threats = [LpBall("linf", e) for e in args.eps]

    fgsm, fgsm_s = run("FGSM alone", model, data, threats, [FGSM()], args.progress)
    pgd, pgd_s = run("PGD alone", model, data, threats, [PGD()], args.progress)
    both, both_s = run("cascade", model, data, threats, [FGSM(), PGD()], args.progress)

    header = ["l∞ ε", "clean", "FGSM", "PGD-40 (random start)", "worst case FGSM → PGD"]
    rows = []
    for t in threats:
        rows.append(
            [
                f"{t.eps:g}",
                f"{100 * pgd.clean_accuracy:.2f} %",
                f"{100 * fgsm.worst_case[t.key]:.2f} %",
                f"{100 * pgd.worst_case[t.key]:.2f} %",
                f"{100 * both.worst_case[t.key]:.2f} %",
            ]
        )
    lines = [
        f"### Robust accuracy, MNIST cnn, evaluation split (last {len(data)} of the MNIST test set)",
        "",
        common.markdown_table(header, rows),
        "",
        f"- attacks: `{FGSM()!r}`, `{PGD()!r}`; `evaluate(..., seed=0)`",
        f"- wall time of each `evaluate` call over all radii: FGSM {fgsm_s:.1f} s, PGD {pgd_s:.1f} s, "
        f"cascade {both_s:.1f} s ({torch.get_num_threads()} torch threads, {common.load_average()})",
    ]
    text = "\n".join(lines)
    print("\n" + text)
    if args.output:
        args.output.write_text(common.machine_summary() + "\n\n" + text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
