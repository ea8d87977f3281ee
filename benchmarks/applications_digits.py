"""The novel applications on the bundled digits: reprogramming, contrastive explanations, fingerprinting.

Sections (each prints a Markdown table; ``--json PATH`` also writes every figure):

1. **Reprogramming** (Elsayed et al., ICLR 2019; BAR, Tsai et al., ICML 2020). Source: the zoo ``cnn`` and a zoo
   ``mlp`` (hidden 64) trained on the 80 % digits split. New task: :func:`bastion.applications.shapes_task`
   (4 stroke classes, 4x4 images embedded at the centre of the 8x8 input, 1,200 images, 75/25 split). Rows:
   white-box and BAR (queries counted by the BlackBox oracle) next to chance and a same-architecture model trained
   from scratch on the same embedded pixels. ``--mnist`` adds the MNIST CNN of ``common.py`` reprogrammed for the
   sklearn digits task (8x8 embedded in 28x28).
2. **CEM** (Dhurandhar et al., NeurIPS 2018) on ``--cem-n`` test digits with the paper's defaults (κ 0.1, β 0.1,
   c 10, 9 binary-search steps, 1000 iterations): PN / PP success (re-predicted), support (fraction of the 64 pixels
   used) and l1 size; and the same with the autoencoder term (γ 100, a VAE trained on the training split).
3. **Fingerprinting**: IPGuard (Cao et al., AsiaCCS 2021) and conferrable adversarial examples (Lukas et al., ICLR
   2021) of the digits MLP; match rate of each suspect from :func:`bastion.applications.suspect_models` (copy,
   fine-tuned, 50 % pruned, distilled; two independent MLPs and two independent CNNs), the ROC AUC of derived vs
   independent, and of {copy, fine-tuned} vs independent.

Run from the repository root (one torch thread)::

    python benchmarks/applications_digits.py                # everything, about 5 minutes on one CPU core
    python benchmarks/applications_digits.py --quick        # fewer epochs / steps: a smoke run
    python benchmarks/applications_digits.py --mnist --json apps.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common
from bastion.applications import (
    BAR,
    CEM,
    Conferrable,
    IPGuard,
    Program,
    WhiteBoxReprogramming,
    autoencoder_from_vae,
    chance_accuracy,
    roc_auc,
    scratch_baseline,
    shapes_task,
    suspect_models,
    verify,
)
from bastion.data import Dataset, load_digits
from bastion.defenses.training import accuracy, train
from bastion.models import BlackBox, build_model
from bastion.reliability.vae import train_vae


def _source(arch: str, train_set: Dataset, **kwargs: Any) -> torch.nn.Module:
    torch.manual_seed(0)
    model = build_model(arch, train_set.feature_shape, train_set.num_classes, **kwargs)
    train(model, train_set, epochs=15, lr=2e-3, seed=0, progress=False)
    return model.eval()


def reprogramming(sources: dict[str, tuple[torch.nn.Module, dict[str, Any]]], epochs: int, q: int) -> list[dict]:
    task = shapes_task(1200, size=4, classes=4, seed=1)
    tr, te = task.train_test_split(test_fraction=0.25, seed=0)
    rows = []
    for name, (model, kwargs) in sources.items():
        arch = model.bastion_spec["arch"]  # type: ignore[index]
        t0 = time.perf_counter()
        wb = WhiteBoxReprogramming(epochs=epochs, progress=False).fit(model, tr, te)
        t_wb = time.perf_counter() - t0
        oracle = BlackBox(model, returns="logits")
        t0 = time.perf_counter()
        bar = BAR(q=q, epochs=epochs, progress=False).fit(oracle, tr, te)
        t_bar = time.perf_counter() - t0
        t0 = time.perf_counter()
        base = scratch_baseline(arch, Program((1, 8, 8), (1, 4, 4)), tr, te, epochs=epochs, **kwargs)
        t_base = time.perf_counter() - t0
        rows.append({
            "source": name, "task": task.name, "chance": chance_accuracy(te), "white_box": wb.accuracy,
            "white_box_s": t_wb, "bar": bar.accuracy, "bar_queries": bar.queries, "bar_s": t_bar, "q": q,
            "scratch": base, "scratch_s": t_base, "mapping": wb.mapping,
        })  # fmt: skip
        print(f"  {name}: white-box {wb.accuracy:.3f}, BAR {bar.accuracy:.3f} ({bar.queries} queries), "
              f"scratch {base:.3f}, chance {chance_accuracy(te):.3f}", flush=True)  # fmt: skip
    return rows


def reprogramming_mnist(epochs: int, q: int) -> dict[str, Any]:
    split = common.load_split()
    model = common.get_model(split)
    digits_tr, digits_te = load_digits().train_test_split(test_fraction=0.2, seed=0)
    t0 = time.perf_counter()
    wb = WhiteBoxReprogramming(epochs=epochs, progress=False).fit(model, digits_tr, digits_te)
    t_wb = time.perf_counter() - t0
    t0 = time.perf_counter()
    bar = BAR(q=q, epochs=epochs, progress=False).fit(BlackBox(model), digits_tr, digits_te)
    t_bar = time.perf_counter() - t0
    base = scratch_baseline("cnn", Program((1, 28, 28), (1, 8, 8)), digits_tr, digits_te, epochs=epochs)
    row = {
        "source": "MNIST cnn (common.py)", "task": "sklearn digits 8x8 in 28x28", "chance": chance_accuracy(digits_te),
        "white_box": wb.accuracy, "white_box_s": t_wb, "bar": bar.accuracy, "bar_queries": bar.queries,
        "bar_s": t_bar, "q": q, "scratch": base, "scratch_s": 0.0, "mapping": wb.mapping,
    }  # fmt: skip
    print(f"  MNIST cnn -> digits: white-box {wb.accuracy:.3f}, BAR {bar.accuracy:.3f} ({bar.queries} queries)")
    return row


def explanations(model: torch.nn.Module, train_set: Dataset, test: Dataset, n: int, steps: int, c_steps: int) -> list:
    x = test.x[:n]
    rows = []
    torch.manual_seed(0)
    vae = train_vae(train_set, epochs=30, progress=False)
    for label, ae in (("no AE", None), ("AE (γ = 100)", autoencoder_from_vae(vae))):
        t0 = time.perf_counter()
        res = CEM(steps=steps, c_steps=c_steps, autoencoder=ae).explain(model, x, progress=False)
        s = res.summary()
        s.update(setting=label, seconds=time.perf_counter() - t0, steps=steps, c_steps=c_steps)
        rows.append(s)
        print(f"  CEM {label}: PN {s['pn_success']:.3f} (support {s['pn_support']:.3f}), PP {s['pp_success']:.3f} "
              f"(support {s['pp_support']:.3f} of input {s['input_support']:.3f}), {s['seconds']:.1f} s",
              flush=True)  # fmt: skip
    return rows


def fingerprints(model: torch.nn.Module, train_set: Dataset, test: Dataset, quick: bool) -> list[dict]:
    t0 = time.perf_counter()
    suspects, roles = suspect_models(model, train_set, other_arch="cnn", n_independent=2, epochs=5 if quick else 15)
    t_suspects = time.perf_counter() - t0
    gens = [
        IPGuard(n=100, steps=300 if quick else 1000),
        Conferrable(n=50 if quick else 100, steps=30 if quick else 100, epochs=5 if quick else 15),
    ]
    rows = []
    for gen in gens:
        fp = gen.generate(model, test, train=train_set) if isinstance(gen, Conferrable) else gen.generate(model, test)
        res = verify(fp, suspects, roles=roles, progress=False)
        rates = res.rates
        pos = [rates["copy"], rates["fine-tuned"]]
        neg = [v for k, v in rates.items() if not roles[k]]
        rows.append({
            "method": fp.method, "points": len(fp), "generation_s": fp.seconds, "suspects_s": t_suspects,
            "rates": rates, "auc_derived": res.auc, "auc_copy_finetuned": roc_auc(pos, neg),
            "threshold_max_independent": max(neg),
        })  # fmt: skip
        print(f"  {fp.method}: AUC derived {res.auc:.3f}, AUC copy+fine-tuned {roc_auc(pos, neg):.3f}, "
              f"{len(fp)} points in {fp.seconds:.1f} s", flush=True)  # fmt: skip
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer epochs and steps (a smoke run)")
    parser.add_argument("--mnist", action="store_true", help="also reprogram the MNIST CNN of common.py")
    parser.add_argument("--cem-n", type=int, default=50, help="test digits explained (default: 50)")
    parser.add_argument("--json", default=None, help="write every figure to this JSON file")
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(common.machine_summary())
    print(common.load_average())
    train_set, test = load_digits().train_test_split(test_fraction=0.2, seed=0)
    cnn = _source("cnn", train_set)
    mlp = _source("mlp", train_set, hidden=(64,))
    print(f"sources: cnn {accuracy(cnn, test):.3f}, mlp {accuracy(mlp, test):.3f} digits test accuracy")
    epochs, q = (10, 10) if args.quick else (30, 25)
    out: dict[str, Any] = {}

    print("\n## reprogramming")
    out["reprogramming"] = reprogramming({"digits cnn": (cnn, {}), "digits mlp": (mlp, {"hidden": (64,)})}, epochs, q)
    if args.mnist:
        out["reprogramming"].append(reprogramming_mnist(epochs, q))
    print(common.markdown_table(
        ["source", "new task", "chance", "white-box", "BAR", "BAR queries", "scratch", "time wb / BAR (s)"],
        [[r["source"], r["task"], f"{r['chance']:.3f}", f"{r['white_box']:.3f}", f"{r['bar']:.3f}",
          f"{r['bar_queries']:,}", f"{r['scratch']:.3f}", f"{r['white_box_s']:.1f} / {r['bar_s']:.1f}"]
         for r in out["reprogramming"]],
    ))  # fmt: skip

    print("\n## contrastive explanations (CEM)")
    steps, c_steps = (200, 3) if args.quick else (1000, 9)
    out["cem"] = explanations(mlp, train_set, test, args.cem_n, steps, c_steps)
    print(common.markdown_table(
        ["setting", "n", "PN success", "PN support", "PN l1", "PP success", "PP support", "input support", "time (s)"],
        [[r["setting"], str(r["n"]), f"{r['pn_success']:.3f}", f"{r['pn_support']:.3f}", f"{r['pn_l1']:.2f}",
          f"{r['pp_success']:.3f}", f"{r['pp_support']:.3f}", f"{r['input_support']:.3f}", f"{r['seconds']:.1f}"]
         for r in out["cem"]],
    ))  # fmt: skip

    print("\n## fingerprinting (source: digits mlp)")
    out["fingerprint"] = fingerprints(mlp, train_set, test, args.quick)
    names = list(out["fingerprint"][0]["rates"])
    print(common.markdown_table(
        ["method", "points", *names, "AUC derived", "AUC copy+ft", "gen (s)"],
        [[r["method"], str(r["points"]), *(f"{r['rates'][n]:.2f}" for n in names), f"{r['auc_derived']:.3f}",
          f"{r['auc_copy_finetuned']:.3f}", f"{r['generation_s']:.1f}"] for r in out["fingerprint"]],
    ))  # fmt: skip
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2, default=str))
        print(f"\nwritten {args.json}")


if __name__ == "__main__":
    main()
