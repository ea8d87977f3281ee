"""Complete verification: branch and bound (``bastion.verify.bab.verify``) against exact MILP (``milp_verify``).

Two small fully connected ReLU networks (64-20-20-10 "2x20" and 64-50-50-50-10 "3x50") are trained on the first
1,400 of scikit-learn's 8x8 digits (bundled, no download; cached in ``benchmarks/.cache/``). For the first ``--k``
correctly classified held-out digits and every l∞ ε of the grid, the local robustness property (no point of the
box ``[x - ε, x + ε] ∩ [0, 1]`` gives another class a logit >= the true one) is decided twice, each with the same
time budget:

* **BaB**: ``verify(model, spec, method="relu")``: PGD first, alpha-CROWN on the root, then ReLU branch and bound
  with beta-CROWN-style bounds (Bunel et al., JMLR 2020; Wang et al., NeurIPS 2021);
* **MILP**: ``milp_verify(net, region)``: the exact big-M encoding (Tjeng et al., ICLR 2019) of each of the nine
  unsafe disjuncts, solved by HiGHS (through SciPy), no attack.

Both are complete, so wherever both finish they must agree; every disagreement is printed loudly and counted, and
every counterexample is re-executed here (inside the box, wrong class ranking on the PyTorch model).

    .venv/bin/python benchmarks/verify_complete.py                 # 2 nets x 8 digits x 3 eps, 30 s budget each
    .venv/bin/python benchmarks/verify_complete.py --k 4 --timeout 10
"""

from __future__ import annotations

import argparse
import hashlib
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common
from bastion.data import load_digits
from bastion.defenses.training import train
from bastion.threat import LpBall
from bastion.verify.bab import verify
from bastion.verify.ir import Network
from bastion.verify.milp import milp_verify
from bastion.verify.result import Verdict
from bastion.verify.spec import Spec

N_TRAIN_DIGITS = 1400
ARCHS = {"2x20": (20, 20), "3x50": (50, 50, 50)}
RECIPE = {"epochs": 40, "batch_size": 32, "lr": 2e-3, "seed": 0}
EPS_GRID = (0.02, 0.05, 0.1)


def build(hidden: tuple[int, ...]) -> nn.Module:
    layers: list[nn.Module] = [nn.Flatten()]
    width = 64
    for h in hidden:
        layers += [nn.Linear(width, h), nn.ReLU()]
        width = h
    layers.append(nn.Linear(width, 10))
    return nn.Sequential(*layers)


def get_model(name: str, data: Any) -> nn.Module:
    """A digits model, cached in ``benchmarks/.cache/`` under a hash of its recipe."""
    key = json.dumps({"arch": ARCHS[name], **RECIPE, "n": N_TRAIN_DIGITS}, sort_keys=True)
    path = common.CACHE_DIR / f"complete_{name}_{hashlib.sha256(key.encode()).hexdigest()[:10]}.pt"
    torch.manual_seed(RECIPE["seed"])
    model = build(ARCHS[name])
    if path.exists():
        model.load_state_dict(torch.load(path, weights_only=True))
        return model.eval()
    train_part, _ = data.split(N_TRAIN_DIGITS)
    train(
        model,
        train_part,
        epochs=RECIPE["epochs"],
        batch_size=RECIPE["batch_size"],
        lr=RECIPE["lr"],
        seed=RECIPE["seed"],
        progress=False,
    )
    common.CACHE_DIR.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), path)
    return model.eval()


def check_counterexample(model: nn.Module, v: Verdict, x: Tensor, y: int, eps: float) -> bool:
    """Re-executed here: the point lies in the box and some other class scores >= the true class."""
    assert v.counterexample is not None
    cx = v.counterexample.reshape(1, *x.shape).to(torch.float32)
    lo, hi = (x - eps).clamp(0, 1), (x + eps).clamp(0, 1)
    inside = bool(((cx[0] >= lo - 1e-6) & (cx[0] <= hi + 1e-6)).all())
    with torch.no_grad():
        logits = model(cx.clamp(lo, hi))[0]
    others = torch.cat([logits[:y], logits[y + 1 :]])
    return inside and bool((others >= logits[y]).any())


def decided(v: Verdict) -> bool:
    return v.status in ("verified", "falsified")


def summary(records: list[dict[str, Any]]) -> str:
    """The per (net, ε) table of the instances' records."""
    header = [
        "net", "ε", "n", "BaB verified / falsified / open", "MILP verified / falsified / open", "agree",
        "BaB median s", "MILP median s", "BaB total s", "MILP total s", "MILP / BaB", "BaB: attack / bounds / split",
    ]  # fmt: skip
    rows = []
    for name in dict.fromkeys(r["net"] for r in records):
        for eps in dict.fromkeys(r["eps"] for r in records if r["net"] == name):
            rs = [r for r in records if r["net"] == name and r["eps"] == eps]

            def counts(key: str, rs: list[dict[str, Any]] = rs) -> str:
                v = sum(r[key] == "verified" for r in rs)
                f = sum(r[key] == "falsified" for r in rs)
                return f"{v} / {f} / {len(rs) - v - f}"

            both = [r for r in rs if r["bab"] in ("verified", "falsified") and r["milp"] in ("verified", "falsified")]
            agree = sum(r["bab"] == r["milp"] for r in both)
            tb, tm = sum(r["bab_s"] for r in rs), sum(r["milp_s"] for r in rs)
            # how BaB decided: its PGD attack, the root bounds (one domain per unsafe disjunct, nine here), or splitting
            by_attack = sum(r["bab_method"] == "attack" for r in rs)
            split = sum(r["bab_method"] != "attack" and r["bab_domains"] > 9 for r in rs)
            rows.append(
                [
                    name, f"{eps:g}", str(len(rs)), counts("bab"), counts("milp"), f"{agree}/{len(both)}",
                    f"{statistics.median(r['bab_s'] for r in rs):.2f}",
                    f"{statistics.median(r['milp_s'] for r in rs):.2f}",
                    f"{tb:.1f}", f"{tm:.1f}", f"{tm / tb:.2f}" if tb > 0 else "n/a",
                    f"{by_attack} / {len(rs) - by_attack - split} / {split}",
                ]
            )  # fmt: skip
    return common.markdown_table(header, rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--k", type=int, default=8, help="correctly classified held-out digits per network")
    parser.add_argument("--timeout", type=float, default=30.0, help="seconds per property, for each method")
    parser.add_argument("--nets", nargs="+", default=list(ARCHS), choices=list(ARCHS))
    parser.add_argument("--eps", nargs="+", type=float, default=list(EPS_GRID))
    parser.add_argument("--json", type=Path, default=None, help="also write every instance as JSON here")
    parser.add_argument("--table", type=Path, nargs="+", default=None, help="only print the table of saved JSON runs")
    args = parser.parse_args(argv)
    if args.table:
        print(summary([r for p in args.table for r in json.loads(p.read_text())]))
        return 0

    print(common.machine_summary())
    print(common.load_average())
    data = load_digits()
    _, test = data.split(N_TRAIN_DIGITS)
    records: list[dict[str, Any]] = []
    disagreements: list[str] = []
    bad_cex: list[str] = []
    t_start = time.perf_counter()
    for name in args.nets:
        model = get_model(name, data)
        with torch.no_grad():
            pred = model(test.x).argmax(1)
        print(f"{name}: clean accuracy on the {len(test)} held-out digits {float((pred == test.y).float().mean()):.4f}")
        idx = (pred == test.y).nonzero().flatten()[: args.k]
        net = Network.from_module(model, (1, 8, 8))
        for eps in args.eps:
            for i in idx.tolist():
                x, y = test.x[i], int(test.y[i])
                spec = Spec.robustness(x, y, LpBall("linf", eps), 10)
                bab = verify(model, spec, timeout=args.timeout, method="relu", input_shape=(1, 8, 8))
                milp = milp_verify(net, spec.regions[0], time_limit=args.timeout)
                for tag, v in (("BaB", bab), ("MILP", milp)):
                    if v.falsified and not check_counterexample(model, v, x, y, eps):
                        bad_cex.append(f"{name} digit {i} eps {eps}: {tag} counterexample does not re-execute")
                if decided(bab) and decided(milp) and bab.status != milp.status:
                    msg = f"{name} digit {i} eps {eps}: BaB says {bab.status}, MILP says {milp.status}"
                    disagreements.append(msg)
                    print("!!! DISAGREEMENT: " + msg)
                rec = {
                    "net": name,
                    "digit": i,
                    "eps": eps,
                    "bab": bab.status,
                    "bab_method": bab.method,
                    "bab_s": bab.seconds,
                    "bab_domains": bab.domains,
                    "milp": milp.status,
                    "milp_s": milp.seconds,
                    "milp_nodes": milp.domains,
                }
                records.append(rec)
                print(
                    f"  {name} eps={eps:<5g} digit {i:4d}: BaB {bab.status:<9} {bab.seconds:7.2f}s "
                    f"({bab.method}, {bab.domains} domains)   MILP {milp.status:<9} {milp.seconds:7.2f}s "
                    f"({milp.domains} nodes)",
                    flush=True,
                )
    print()
    print(summary(records))
    print(
        f"\n{len(records)} properties, each method capped at {args.timeout:g} s; "
        f"disagreements: {len(disagreements)}; counterexamples that failed re-execution: {len(bad_cex)}"
    )
    for msg in disagreements + bad_cex:
        print("!!! " + msg)
    print(f"total {time.perf_counter() - t_start:.0f} s; {common.load_average()}")
    if args.json:
        args.json.write_text(json.dumps(records, indent=1))
    return 1 if disagreements or bad_cex else 0


if __name__ == "__main__":
    raise SystemExit(main())
