"""Bound tightness and time of bastion's incomplete verifiers on small MNIST models (issue 4).

Four models are trained on the first 8,000 MNIST test images (``common.load_split``) and cached in
``benchmarks/.cache/``: a fully connected ReLU net (784-100-100-10) and a small conv net (two stride-2 convolutions
and two linear layers), each normally trained (Adam, 5 epochs) and adversarially trained at l∞ ε = 0.1 with
``bastion.defenses.training.fast_at.FastAT`` (FGSM from a random start, step 1.25 ε: Wong, Rice, Kolter, "Fast is
better than free", ICLR 2020; Adam, 3 epochs), cheap enough for a shared 2-core machine.

For every model and ε of its grid, on the first ``--n`` images of the 2,000-image evaluation split, the script
bounds the robustness margins ``f_y(x') - f_j(x')`` over the l∞ box ``[x - ε, x + ε] ∩ [0, 1]`` with IBP, CROWN,
alpha-CROWN and DeepPoly (``bastion.verify.bounds.compute_bounds``) and reports

* the mean lower bound of the worst margin (``min_j``) over the clean-correct images: higher is tighter;
* certified accuracy: clean-correct images whose every margin lower bound is > 0;
* the time of each method on the whole batch (interleaved runs, ``common.time_alternating``);
* PGD robust accuracy (40 steps, 2 restarts) beside it: the gap between the two is what only a complete method
  (or a tighter bound) could close;
* a soundness check computed here: no certified image may be broken by PGD, and every lower bound must be below the
  margin actually attained at the clean image and at PGD's point.

When auto_LiRPA imports (a benchmark-only peer, see ``requirements.txt``), its IBP / CROWN / alpha-CROWN run on the
same model and batch in the same process and the ratios are printed; otherwise the reason is printed.

    .venv/bin/python benchmarks/verify_bounds.py            # all four models, N = 100
    .venv/bin/python benchmarks/verify_bounds.py --n 20 --models fc --repeats 1
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common
from bastion.attacks import PGD
from bastion.defenses.training import train
from bastion.defenses.training.fast_at import FastAT
from bastion.threat import LpBall
from bastion.verify.bounds import BoundOptions, compute_bounds, robustness_spec
from bastion.verify.ir import Network

METHODS = ("ibp", "crown", "alpha-crown", "deeppoly")
AT_EPS = 0.1

# Training recipes; any change changes the cache key, so the model is retrained.
RECIPES: dict[str, dict[str, Any]] = {
    "fc": {"arch": "fc-784-100-100-10", "seed": 0, "epochs": 5, "batch_size": 64, "lr": 1e-3, "at": None},
    "fc-at": {"arch": "fc-784-100-100-10", "seed": 0, "epochs": 3, "batch_size": 64, "lr": 1e-3, "at": AT_EPS},
    "conv": {"arch": "conv-8-16-100", "seed": 0, "epochs": 5, "batch_size": 64, "lr": 1e-3, "at": None},
    "conv-at": {"arch": "conv-8-16-100", "seed": 0, "epochs": 3, "batch_size": 64, "lr": 1e-3, "at": AT_EPS},
    # the VNN-COMP 2021 ``mnistfc`` shapes (784-256xK-10, normally trained), for vnncomp_selfmade.py --suite mnistfc
    "fc-256x2": {"arch": "fc-784-256x2-10", "seed": 0, "epochs": 5, "batch_size": 64, "lr": 1e-3, "at": None},
    "fc-256x4": {"arch": "fc-784-256x4-10", "seed": 0, "epochs": 5, "batch_size": 64, "lr": 1e-3, "at": None},
    "fc-256x6": {"arch": "fc-784-256x6-10", "seed": 0, "epochs": 5, "batch_size": 64, "lr": 1e-3, "at": None},
}
EPS_GRID = {
    "fc": (0.005, 0.01, 0.02, 0.05),
    "conv": (0.005, 0.01, 0.02, 0.05),
    "fc-at": (0.01, 0.02, 0.05, 0.1),
    "conv-at": (0.01, 0.02, 0.05, 0.1),
}


def build(arch: str) -> nn.Module:
    """The two architectures: small enough for CROWN-type bounds on a batch of 100 on a busy 2-core CPU."""
    if arch == "fc-784-100-100-10":
        return nn.Sequential(
            nn.Flatten(), nn.Linear(784, 100), nn.ReLU(), nn.Linear(100, 100), nn.ReLU(), nn.Linear(100, 10)
        )
    if arch.startswith("fc-784-256x"):
        depth = int(arch.removeprefix("fc-784-256x").removesuffix("-10"))
        layers: list[nn.Module] = [nn.Flatten()]
        for i in range(depth):
            layers += [nn.Linear(784 if i == 0 else 256, 256), nn.ReLU()]
        return nn.Sequential(*layers, nn.Linear(256, 10))
    if arch == "conv-8-16-100":
        return nn.Sequential(
            nn.Conv2d(1, 8, 4, stride=2, padding=1),  # 8 x 14 x 14
            nn.ReLU(),
            nn.Conv2d(8, 16, 4, stride=2, padding=1),  # 16 x 7 x 7
            nn.ReLU(),
            nn.Flatten(),
            nn.Linear(784, 100),
            nn.ReLU(),
            nn.Linear(100, 10),
        )
    raise ValueError(f"unknown architecture {arch!r}")


def cache_path(name: str) -> Path:
    digest = hashlib.sha256(json.dumps(RECIPES[name], sort_keys=True).encode()).hexdigest()[:10]
    return common.CACHE_DIR / f"verify_{name}_{digest}.pt"


def get_model(
    name: str, split: common.Split, *, retrain: bool = False, log: Callable[[str], None] = print
) -> nn.Module:
    """A benchmark model: loaded from ``benchmarks/.cache/`` when cached, trained (and cached) otherwise."""
    cfg = RECIPES[name]
    path = cache_path(name)
    torch.manual_seed(cfg["seed"])
    model = build(cfg["arch"])
    if path.exists() and not retrain:
        model.load_state_dict(torch.load(path, weights_only=True))
        log(f"{name}: loaded {path.relative_to(common.BENCH_DIR.parent)}")
        return model.eval()
    # FGSM from a random start (Wong et al.'s "fast" AT): one extra gradient per batch, so adversarial training
    # costs about twice normal training on the shared CPU instead of PGD-10's eleven times.
    objective = None if cfg["at"] is None else FastAT(LpBall("linf", cfg["at"]))
    t0 = time.perf_counter()
    history = train(
        model,
        split.train,
        epochs=cfg["epochs"],
        batch_size=cfg["batch_size"],
        lr=cfg["lr"],
        objective=objective,
        seed=cfg["seed"],
        progress=False,
    )
    model.eval()
    log(
        f"{name}: trained in {time.perf_counter() - t0:.1f} s ({objective or 'cross-entropy'}; loss per epoch "
        + ", ".join(f"{v:.3f}" for v in history)
        + f"); clean accuracy on the {common.N_EVAL} evaluation images "
        f"{common.accuracy(model, split.x_eval, split.y_eval):.4f}"
    )
    common.CACHE_DIR.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), path)
    return model


# ---------------------------------------------------------------------------------------------------- auto_LiRPA
def load_lirpa() -> tuple[Any | None, str]:
    """auto_LiRPA's module and version, or None and the reason it cannot be used here."""
    from importlib import metadata

    try:
        version = metadata.version("auto_LiRPA")
    except metadata.PackageNotFoundError:
        return None, "not installed (pip install --no-deps auto_LiRPA; see requirements.txt)"
    try:
        import auto_LiRPA
    except Exception as exc:  # an old wheel against a newer torch/numpy fails in many ways
        return None, f"installed ({version}) but import failed: {type(exc).__name__}: {exc}"
    return auto_LiRPA, version


def lirpa_runner(lirpa: Any, model: nn.Module, x: Tensor, eps: float, C: Tensor, method: str) -> Callable[[], Tensor]:
    """A call of auto_LiRPA's ``compute_bounds`` on the same box and specification (lower bounds of ``C f``)."""
    bounded = lirpa.BoundedModule(model, torch.zeros(1, *x.shape[1:]))
    lo, hi = (x - eps).clamp(0, 1), (x + eps).clamp(0, 1)
    ptb = lirpa.PerturbationLpNorm(norm=math.inf, eps=eps, x_L=lo, x_U=hi)
    bx = lirpa.BoundedTensor(x, ptb)
    name = {"ibp": "IBP", "crown": "CROWN", "alpha-crown": "alpha-CROWN"}[method]

    def run() -> Tensor:
        lb, _ = bounded.compute_bounds(x=(bx,), C=C, method=name, bound_upper=False)
        return lb.detach()

    return run


# ---------------------------------------------------------------------------------------------------- benchmark
def pgd_points(model: nn.Module, x: Tensor, y: Tensor, eps: float) -> Tensor:
    attack = PGD(steps=40, restarts=2, random_start=True, early_stop=False)
    return attack(model, x, y, threat=LpBall("linf", eps), seed=0).x_adv


@torch.no_grad()
def worst_margin(model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    """``min_{j != y} f_y(x) - f_j(x)`` per image (> 0: correctly classified)."""
    logits = model(x)
    true = logits.gather(1, y[:, None])
    others = logits.scatter(1, y[:, None], float("-inf"))
    return true[:, 0] - others.max(dim=1).values


def run_model(
    name: str, model: nn.Module, x: Tensor, y: Tensor, *, repeats: int, lirpa: Any | None, log: Callable[[str], None]
) -> list[dict[str, Any]]:
    net = Network.from_module(model, tuple(x.shape[1:]))
    C = robustness_spec(y, common.NUM_CLASSES)
    correct = worst_margin(model, x, y) > 0
    clean_margin = worst_margin(model, x, y)
    rows = []
    opts = BoundOptions(bound_upper=False)  # only lower bounds of the margins matter
    for eps in EPS_GRID[name]:
        lo, hi = (x - eps).clamp(0, 1), (x + eps).clamp(0, 1)
        comp: dict[str, Callable[[], Any]] = {}
        warm: dict[str, Callable[[], Any]] = {}
        for m in METHODS:
            comp[f"bastion {m}"] = lambda m=m, lo=lo, hi=hi: (
                compute_bounds(net, lo, hi, C=C, method=m, options=opts).lower
            )
            warm[f"bastion {m}"] = lambda m=m, lo=lo[:2], hi=hi[:2]: compute_bounds(net, lo, hi, C=C[:2], method=m)
        if lirpa is not None:
            for m in ("ibp", "crown", "alpha-crown"):
                try:
                    comp[f"auto_LiRPA {m}"] = lirpa_runner(lirpa, model, x, eps, C, m)
                except Exception as exc:
                    log(f"  auto_LiRPA {m}: could not be set up ({type(exc).__name__}: {exc})")
        log(f"{name}, eps = {eps}: {len(comp)} bound computations on {x.shape[0]} images")
        timings = common.time_alternating(comp, repeats=repeats, warmup=1, warmup_with=warm, log=log)
        x_adv = pgd_points(model, x, y, eps)
        adv_margin = worst_margin(model, x_adv, y)
        pgd_robust = (adv_margin > 0) & correct
        row: dict[str, Any] = {
            "model": name,
            "eps": eps,
            "n": int(x.shape[0]),
            "clean": float(correct.float().mean()),
            "pgd": float(pgd_robust.float().mean()),
            "methods": {},
        }
        for label, t in timings.items():
            if t.error is not None or t.output is None:
                row["methods"][label] = {"error": t.error}
                continue
            lb = t.output.reshape(x.shape[0], -1).double()
            lb_min = lb.min(dim=1).values
            certified = correct & (lb_min > 0)
            # Soundness, judged here: a bound above the margin some point attains is wrong.
            unsound = int(((lb_min > clean_margin.double() + 1e-5) | (lb_min > adv_margin.double() + 1e-5)).sum())
            broken = int((certified & ~pgd_robust).sum())
            row["methods"][label] = {
                "seconds": t.median,
                "cpu": t.cpu_median,
                "mean_lb": float(lb_min[correct].mean()) if bool(correct.any()) else float("nan"),
                "certified": float(certified.float().mean()),
                "unsound": unsound,
                "certified_but_broken": broken,
            }
        rows.append(row)
    return rows


def fmt(v: float, digits: int = 3) -> str:
    return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.{digits}f}"


def tables(rows: list[dict[str, Any]]) -> str:
    out = []
    header = ["model", "ε", "method", "mean worst-margin LB", "certified acc", "time s", "CPU s", "× CROWN time"]
    body = []
    for r in rows:
        crown_t = r["methods"].get("bastion crown", {}).get("seconds", float("nan"))
        for label, m in r["methods"].items():
            if "error" in m:
                body.append([r["model"], f"{r['eps']:g}", label, "error", "-", "-", "-", "-"])
                continue
            body.append(
                [
                    r["model"],
                    f"{r['eps']:g}",
                    label,
                    fmt(m["mean_lb"], 2),
                    fmt(m["certified"], 2),
                    fmt(m["seconds"], 3),
                    fmt(m["cpu"], 3),
                    fmt(m["seconds"] / crown_t, 2),
                ]
            )
    out.append(common.markdown_table(header, body))
    header2 = ["model", "ε", "clean acc", *(f"cert. {m}" for m in METHODS), "PGD robust acc", "gap PGD − best cert."]
    body2 = []
    for r in rows:
        certs = [r["methods"].get(f"bastion {m}", {}).get("certified", float("nan")) for m in METHODS]
        best = max((c for c in certs if not math.isnan(c)), default=float("nan"))
        body2.append(
            [
                r["model"],
                f"{r['eps']:g}",
                fmt(r["clean"], 2),
                *(fmt(c, 2) for c in certs),
                fmt(r["pgd"], 2),
                fmt(r["pgd"] - best, 2),
            ]
        )
    out.append(common.markdown_table(header2, body2))
    bad = [
        f"{r['model']} ε={r['eps']:g} {label}: {m['unsound']} bounds above an attained margin, "
        f"{m['certified_but_broken']} certified images broken by PGD"
        for r in rows
        for label, m in r["methods"].items()
        if "error" not in m and (m["unsound"] or m["certified_but_broken"])
    ]
    out.append("soundness check: " + ("OK (no bound above an attained margin, no certified image broken by PGD)"
                                      if not bad else "FAILED:\n" + "\n".join(bad)))  # fmt: skip
    return "\n\n".join(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=100, help="evaluation images (the first N of the 2,000)")
    parser.add_argument("--repeats", type=int, default=1, help="measured runs per method (after one warm-up)")
    parser.add_argument("--models", nargs="+", default=list(EPS_GRID), choices=list(EPS_GRID))
    parser.add_argument("--retrain", action="store_true", help="ignore the cached models")
    parser.add_argument("--json", type=Path, default=None, help="also write the rows as JSON here")
    args = parser.parse_args(argv)

    print(common.machine_summary())
    print(common.load_average())
    split = common.load_split()
    x, y = split.x_eval[: args.n], split.y_eval[: args.n]
    lirpa, info = load_lirpa()
    print(f"auto_LiRPA: {info if lirpa is None else 'version ' + info}")
    rows: list[dict[str, Any]] = []
    t0 = time.perf_counter()
    for name in args.models:
        model = get_model(name, split, retrain=args.retrain)
        rows.extend(run_model(name, model, x, y, repeats=args.repeats, lirpa=lirpa, log=print))
    print()
    print(tables(rows))
    print(f"\ntotal {time.perf_counter() - t0:.0f} s; {common.load_average()}")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
