"""Defences on MNIST (issue 5): every training objective of bastion on one CNN, measured the same way.

For standard training and each objective of :mod:`bastion.defenses.training` (``make_objective`` names), the zoo
``cnn`` (Normalize → Conv c1 → pool → Conv c2 → pool → Linear h → Linear 10; ``--channels c1 c2 --hidden h``, the
zoo's 32 64 128 by default) is trained with :class:`~bastion.defenses.training.AdversarialTrainer` on the first 8,000
MNIST test images (``common.py``), from random weights or from the standard model (``--init``), and evaluated on the
last 2,000 (or their first ``--n-eval``):

* clean accuracy, and robust accuracy under ``bastion.evaluate`` with the ``standard`` cascade (APGD-CE → APGD-T →
  FAB-T → Square, AutoAttack's) or its ``rapid`` prefix (APGD-CE → APGD-T) at l∞ ε = 0.1 and 0.3;
* wall time and process CPU time of every training pass (the machine's cores are shared, so CPU time is the steadier
  of the two);
* for the Gaussian-noise models, the certified accuracy of the smoothed classifier (Cohen et al., ICML 2019) at l2
  radii 0.5 / 1.0 / 1.5, with the ``n0`` / ``n`` / ``alpha`` given;
* for certified-training objectives (``ibp``, ``crown-ibp``, when registered), verified accuracy with
  ``bastion.verify.certify`` (IBP and CROWN) at the evaluation radii.

The comparisons the issue asks for are printed after the tables: PGD-AT and TRADES at ε = 0.3 against the 80 %
target, and Fast-AT against PGD-AT (robust-accuracy ratio ≥ 0.9 at ≤ 1/3 of the training time).

Every model is cached in ``benchmarks/.cache/`` under a hash of its full recipe (objective, options, epochs, optimiser,
data, initial weights), and every evaluation under a hash of the model's and the evaluation's settings, so a run can
be stopped and continued, and each table is printed with the exact command that made it.

Run from the repository root::

    python benchmarks/defenses_mnist.py                                   # every objective, defaults
    python benchmarks/defenses_mnist.py --objectives standard pgd-at trades fast-at --epochs 2 --n-eval 300
    python benchmarks/defenses_mnist.py --objectives gaussian-noise --sigmas 0.25 0.5 --smooth-n 1000
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import shlex
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common
from bastion.attacks.presets import preset
from bastion.data import Dataset
from bastion.defenses.smoothing import Smooth, evaluate_smoothed
from bastion.defenses.training import OBJECTIVES, AdversarialTrainer, EpochMetrics, make_objective
from bastion.evaluate import evaluate
from bastion.models import build_model, load_model, save_model
from bastion.threat import LpBall

CERTIFIED_OBJECTIVES = ("ibp", "crown-ibp")
# the objectives of the targets (and N-FGSM, Fast-AT's successor): evaluated on --n-eval images with --attacks
MAIN_OBJECTIVES = ("standard", "pgd-at", "trades", "fast-at", "n-fgsm")
ZOO_CHANNELS = (32, 64)
ZOO_HIDDEN = 128
DEFAULT_OBJECTIVES = [name for name in OBJECTIVES if name != "gaussian-noise"] + ["gaussian-noise"]
SMOOTH_RADII = (0.0, 0.5, 1.0, 1.5)


# ---------------------------------------------------------------------------------------------------- recipes
@dataclass
class Recipe:
    """How one model is trained: the objective by name, its options and the trainer's settings."""

    label: str
    objective: str
    options: dict[str, Any] = field(default_factory=dict)
    trainer: dict[str, Any] = field(default_factory=dict)
    needs_threat: bool = True

    eps_train: float | None = None

    def config(self, args: argparse.Namespace, init: str | None) -> dict[str, Any]:
        """Everything that decides the trained weights (the cache key)."""
        cfg = {
            "arch": "cnn",
            "objective": self.objective,
            "options": self.options,
            "trainer": self.trainer,
            "eps_train": self.train_eps(args),
            "n_train": args.n_train,
            "init": init,
            "seed": args.seed,
        }
        arch = arch_options(args)
        if arch:  # the zoo defaults leave the key (and so the cache of earlier runs) unchanged
            cfg["arch_options"] = arch
        return cfg

    def train_eps(self, args: argparse.Namespace) -> float | None:
        """The l∞ radius the model is trained at (``None`` for objectives without a threat model)."""
        if not self.needs_threat:
            return None
        return args.eps_train if self.eps_train is None else self.eps_train


def recipes(args: argparse.Namespace) -> list[Recipe]:
    """The recipes the command line asks for, in its order.

    Every objective keeps its paper defaults except where a cost forces a change, which is stated here and through
    the options (printed with every table): the inner-maximisation steps of PGD-AT, TRADES and MART
    (``--inner-steps``; the MNIST papers use 40), the trainer's budget (``--epochs``, ``--epochs-of``) and any
    ``--options`` given.
    """
    base = base_trainer(args)
    epochs_of = parse_assignments(args.epochs_of, "--epochs-of")
    extra = parse_overrides(args.options, "--options")
    out: list[Recipe] = []
    for name in args.objectives:
        key = name.strip().lower().replace("_", "-")
        if key not in OBJECTIVES:
            raise SystemExit(f"unknown objective {name!r}; registered: {', '.join(OBJECTIVES)}")
        takes_threat = OBJECTIVES[key][1]
        trainer = dict(base)
        options: dict[str, Any] = {}
        if key == "standard":
            out.append(standard_recipe(args))
            continue
        if key in ("pgd-at", "trades", "mart") and args.inner_steps is not None:
            options["steps"] = args.inner_steps
        options.update(extra.get(key, {}))
        if key == "fast-at":
            # Wong, Rice & Kolter (ICLR 2020) pair FGSM with random start with a one-cycle learning rate
            trainer.update(schedule="cyclic", lr=args.fast_lr)
            trainer.pop("milestones", None)
            if args.fast_validate:
                # and recommend early stopping on PGD accuracy of a training subset against catastrophic overfitting
                trainer["validation_n"] = args.fast_validate
        if key in CERTIFIED_OBJECTIVES and args.certified_epochs:
            trainer["epochs"] = args.certified_epochs
        if key in epochs_of:
            trainer["epochs"] = int(epochs_of[key])
        if key == "gaussian-noise":
            for sigma in args.sigmas:
                out.append(Recipe(f"gaussian-noise σ={sigma:g}", key, {**options, "sigma": sigma}, trainer, False))
            continue
        if key in CERTIFIED_OBJECTIVES and args.certified_eps:
            # Gowal et al. train at a radius a little above the one they verify (0.2 for 0.1, 0.4 for 0.3 on MNIST)
            for eps in args.certified_eps:
                out.append(Recipe(f"{key} (train ε={eps:g})", key, options, trainer, True, eps))
            continue
        out.append(Recipe(key, key, options, trainer, takes_threat))
    return out


def arch_options(args: argparse.Namespace) -> dict[str, Any]:
    """``build_model("cnn", ...)`` keyword arguments that differ from the zoo's defaults."""
    out: dict[str, Any] = {}
    if tuple(args.channels) != ZOO_CHANNELS:
        out["channels"] = list(args.channels)
    if args.hidden != ZOO_HIDDEN:
        out["hidden"] = args.hidden
    return out


def parse_assignments(items: list[str], flag: str) -> dict[str, str]:
    """``name=value`` strings into a dict (names normalised like objective names)."""
    out: dict[str, str] = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not name or not value:
            raise SystemExit(f"{flag} expects name=value, got {item!r}")
        out[name.strip().lower().replace("_", "-")] = value
    return out


def base_trainer(args: argparse.Namespace) -> dict[str, Any]:
    """Trainer settings shared by every recipe: Adam, ``--epochs`` epochs, ``--schedule``."""
    out: dict[str, Any] = {
        "epochs": args.epochs,
        "batch_size": args.batch_size,
        "optimizer": "adam",
        "lr": args.lr,
        "schedule": args.schedule,
    }
    if args.schedule == "multistep":
        out["milestones"] = list(args.milestones)
    return out


def standard_recipe(args: argparse.Namespace) -> Recipe:
    """Standard training (cross-entropy), ``--standard-epochs`` epochs from random weights."""
    return Recipe("standard", "standard", {}, {**base_trainer(args), "epochs": args.standard_epochs}, False)


# ---------------------------------------------------------------------------------------------------- helpers
def digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:10]


def log(msg: str) -> None:
    print(msg, flush=True)


def pct(v: float | None) -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{100 * v:.1f} %"


def sec(v: float | None) -> str:
    return "-" if v is None else f"{v:.0f}"


def read_json(path: Path) -> dict[str, Any] | None:
    try:
        return dict(json.loads(path.read_text()))
    except (OSError, ValueError):
        return None


def write_json(path: Path, payload: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(payload, indent=1, default=str))
    tmp.replace(path)


# ---------------------------------------------------------------------------------------------------- training
def train_recipe(
    recipe: Recipe, split: common.Split, args: argparse.Namespace, init_model: nn.Module | None, init_key: str | None
) -> tuple[nn.Module, dict[str, Any]]:
    """Train (or load from the cache) the model of ``recipe``; returns it and its training record."""
    cfg = recipe.config(args, init_key)
    key = digest(cfg)
    path = common.CACHE_DIR / f"defenses_{recipe.objective}_{key}.pt"
    meta_path = path.with_suffix(".json")
    meta = read_json(meta_path)
    if path.exists() and meta is not None and not args.retrain:
        log(f"[{recipe.label}] loaded {path.relative_to(common.BENCH_DIR.parent)}")
        return load_model(path).eval(), meta

    data = split.train if args.n_train >= len(split.train) else split.train.subset(slice(0, args.n_train))
    eps = recipe.train_eps(args)
    threat = None if eps is None else LpBall("linf", eps)
    objective = make_objective(recipe.objective, threat, **recipe.options)
    torch.manual_seed(args.seed)
    model = build_model("cnn", common.INPUT_SHAPE, common.NUM_CLASSES, **arch_options(args))
    if init_model is not None:
        model.load_state_dict(init_model.state_dict())
    epochs: list[dict[str, Any]] = []
    clock = {"cpu": time.process_time()}

    def on_epoch_end(m: EpochMetrics) -> None:
        cpu = time.process_time() - clock["cpu"]
        clock["cpu"] = time.process_time()
        epochs.append(
            {
                "wall_s": m.seconds,
                "cpu_s": cpu,
                "loss": m.loss,
                "train_acc": m.train_acc,
                "lr": m.lr,
                "val_robust_acc": m.val_robust_acc,
            }
        )
        log(
            f"[{recipe.label}] pass {m.epoch + 1}: {m.seconds:.1f} s wall, {cpu:.1f} s CPU, loss {m.loss:.4f}, "
            f"train acc {m.train_acc:.3f}"
            + ("" if m.val_robust_acc is None else f", validation PGD acc {m.val_robust_acc:.3f}")
            + f" ({common.load_average()})"
        )

    settings = dict(recipe.trainer)
    n_val = settings.pop("validation_n", 0)
    if n_val:  # a subset of the *training* images, so that the evaluation split stays unseen
        settings.update(validation=data.subset(slice(0, n_val)), restore_best=True)
    trainer = AdversarialTrainer(
        objective, threat=threat, seed=args.seed, progress=False, on_epoch_end=on_epoch_end, **settings
    )
    log(f"[{recipe.label}] training {objective!r} with {trainer!r}, {len(data)} images, init {init_key or 'random'}")
    t0 = time.perf_counter()
    result = trainer.fit(model, data)
    meta = {
        "label": recipe.label,
        "config": cfg,
        "objective_repr": repr(objective),
        "passes": result.passes,
        "epochs": epochs,
        "train_wall_s": time.perf_counter() - t0,
        "train_cpu_s": sum(e["cpu_s"] for e in epochs),
        "load_average_after": common.load_average(),
        "finished": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    common.CACHE_DIR.mkdir(parents=True, exist_ok=True)
    save_model(model, path, arch="cnn")
    write_json(meta_path, meta)
    log(f"[{recipe.label}] cached at {path.relative_to(common.BENCH_DIR.parent)}")
    return model.eval(), meta


# ---------------------------------------------------------------------------------------------------- evaluation
def parse_overrides(items: list[str], flag: str = "--override") -> dict[str, dict[str, Any]]:
    """``name.option=value`` strings (value parsed as JSON when it can be) into ``{name: {option: value}}``."""
    out: dict[str, dict[str, Any]] = {}
    for item in items:
        try:
            lhs, value = item.split("=", 1)
            attack, option = lhs.rsplit(".", 1)
        except ValueError:
            raise SystemExit(f"{flag} expects name.option=value, got {item!r}") from None
        try:
            parsed: Any = json.loads(value)
        except ValueError:
            parsed = value
        out.setdefault(attack, {})[option] = parsed
    return out


def robust_eval(
    model: nn.Module, model_key: str, data: Dataset, args: argparse.Namespace, n: int, cascade: str
) -> dict[str, Any] | None:
    """Clean and robust accuracy under the ``cascade`` preset at every ``--eval-eps``.

    Each radius is evaluated and cached on its own (by model, images, radius and attack settings), so that two
    processes can share the radii of one model and a stopped run keeps every radius it finished.
    """
    if n <= 0 or not args.eval_eps:
        return None
    caps = {float(k): int(v) for k, v in parse_assignments(args.n_eval_at, "--n-eval-at").items()}
    overrides = parse_overrides(args.override)
    attacks = preset(cascade, ["linf"], overrides)
    out: dict[str, Any] = {"n": {}, "cascade": cascade, "robust": {}, "per_attack": {}, "wall_s": 0.0, "cpu_s": 0.0}
    for eps in args.eval_eps:
        n_eps = min(n, caps.get(float(eps), n))
        cfg = {"model": model_key, "n": n_eps, "eps": eps, "attacks": [repr(a) for a in attacks], "seed": 0}
        path = common.CACHE_DIR / f"defenses_eval_{digest(cfg)}.json"
        one = read_json(path)
        if one is None or args.retrain:
            threat = LpBall("linf", eps)
            t0, c0 = time.perf_counter(), time.process_time()
            res = evaluate(model, data.subset(slice(0, n_eps)), [threat], attacks, seed=0, progress=False, checks=False)
            one = {
                "config": cfg,
                "n": res.n,
                "clean": res.clean_accuracy,
                "robust": res.worst_case[threat.key],
                "per_attack": res.robust_accuracy[threat.key],
                "wall_s": time.perf_counter() - t0,
                "cpu_s": time.process_time() - c0,
                "load_average_after": common.load_average(),
            }
            write_json(path, one)
            log(f"  ε={eps}: robust {pct(one['robust'])} on {res.n} images ({one['wall_s']:.0f} s)")
        if one["n"] >= max(out["n"].values(), default=0):  # clean accuracy of the largest subset
            out["clean"] = one["clean"]
        out["n"][str(eps)] = one["n"]
        out["robust"][str(eps)] = one["robust"]
        out["per_attack"][str(eps)] = one["per_attack"]
        out["wall_s"] += one["wall_s"]
        out["cpu_s"] += one["cpu_s"]
        out["load_average_after"] = one["load_average_after"]
    return out


def smoothing_eval(
    model: nn.Module, model_key: str, sigma: float, data: Dataset, args: argparse.Namespace
) -> dict[str, Any] | None:
    """Certified accuracy of the Gaussian-smoothed model at :data:`SMOOTH_RADII` (Cohen et al.'s CERTIFY)."""
    if args.smooth_n_eval <= 0:
        return None
    data = data.subset(slice(0, args.smooth_n_eval))
    cfg = {
        "model": model_key,
        "sigma": sigma,
        "n_eval": args.smooth_n_eval,
        "n": args.smooth_n,
        "n0": args.smooth_n0,
        "alpha": args.smooth_alpha,
        "radii": SMOOTH_RADII,
    }
    path = common.CACHE_DIR / f"defenses_smooth_{digest(cfg)}.json"
    cached = read_json(path)
    if cached is not None and not args.retrain:
        return cached
    smoothed = Smooth(model, common.NUM_CLASSES, sigma)
    t0 = time.perf_counter()
    res = evaluate_smoothed(
        smoothed,
        data,
        mode="certify",
        n=args.smooth_n,
        n0=args.smooth_n0,
        alpha=args.smooth_alpha,
        radii=SMOOTH_RADII,
        batch_size=args.smooth_batch,
        seed=0,
        progress=False,
    )
    out = {
        "config": cfg,
        "n_eval": res.n,
        "accuracy": res.accuracy,
        "abstain": res.abstain_rate,
        "certified": dict(zip([str(r) for r in res.radii], res.certified_accuracy)),
        "wall_s": time.perf_counter() - t0,
        "load_average_after": common.load_average(),
    }
    write_json(path, out)
    return out


def verified_eval(model: nn.Module, model_key: str, data: Dataset, args: argparse.Namespace) -> dict[str, Any] | None:
    """Verified accuracy at every ``--eval-eps``: ``bastion.verify.certify`` with each ``--verify-methods``, and IBP
    with the specification merged into the last layer (Gowal et al.'s verified accuracy, the training bound)."""
    from bastion.defenses.training import IBPTraining
    from bastion.verify.certify import certify

    data = data.subset(slice(0, args.verify_n))
    cfg = {"model": model_key, "n": args.verify_n, "eps": args.eval_eps, "methods": args.verify_methods}
    path = common.CACHE_DIR / f"defenses_verify_{digest(cfg)}.json"
    out = read_json(path)
    if out is None or args.retrain:
        out = {"config": cfg, "verified": {}}
        t0 = time.perf_counter()
        for method in args.verify_methods:
            for eps in args.eval_eps:
                res = certify(model, data, LpBall("linf", eps), method=method, radius=False, progress=False)
                out["verified"][f"{method}@{eps}"] = res.certified_accuracy
        out["wall_s"] = time.perf_counter() - t0
        write_json(path, out)
    if not any(k.startswith("ibp-elided@") for k in out["verified"]):
        with torch.no_grad():
            correct = model(data.x).argmax(1) == data.y
            for eps in args.eval_eps:
                margins = IBPTraining(LpBall("linf", eps)).margin_lower_bounds(model, data.x, data.y, eps=eps)
                certified = correct & (margins > 0).all(1)
                out["verified"][f"ibp-elided@{eps}"] = float(certified.float().mean())
        write_json(path, out)
    return out


# ---------------------------------------------------------------------------------------------------- tables
def ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or b == 0:
        return None
    return a / b


def report(rows: list[dict[str, Any]], args: argparse.Namespace, command: str) -> str:
    """All tables as Markdown, each with the command that produced it."""
    eps_cols = [str(e) for e in args.eval_eps]
    lines = [f"Command: `{command}`", "", common.machine_summary(), ""]
    header = ["model", "passes", "wall s / pass", "CPU s / pass", "CPU s total", "clean"]
    header += [f"robust ε={e}" for e in eps_cols] + ["cascade", "eval n", "eval s"]
    body = []
    for r in rows:
        meta, ev = r["meta"], r.get("eval")
        walls = [e["wall_s"] for e in meta["epochs"]]
        cpus = [e["cpu_s"] for e in meta["epochs"]]
        body.append(
            [
                r["label"],
                str(meta["passes"]),
                f"{statistics.median(walls):.1f}",
                f"{statistics.median(cpus):.1f}",
                f"{sum(cpus):.0f}",
                pct(ev["clean"]) if ev else "-",
                *[pct(ev["robust"].get(e)) if ev else "-" for e in eps_cols],
                ev.get("cascade", args.attacks) if ev else "-",
                (" / ".join(str(v) for v in ev["n"].values()) if isinstance(ev["n"], dict) else str(ev["n"]))
                if ev
                else "-",
                sec(ev["wall_s"]) if ev else "-",
            ]
        )
    lines += [
        f"### Clean and robust accuracy (l∞), MNIST cnn {json.dumps(arch_options(args) or 'zoo defaults')}, "
        f"{args.n_train} training images, first n of the 2,000 evaluation images (per pass: medians)",
        "",
        common.markdown_table(header, body),
        "",
    ]
    for r in rows:
        lines.append(
            f"- {r['label']}: `{r['meta']['objective_repr']}`, trainer {json.dumps(r['meta']['config']['trainer'])}"
        )
    overrides = parse_overrides(args.override)
    for cascade in dict.fromkeys(r["eval"]["cascade"] for r in rows if r.get("eval") and "cascade" in r["eval"]):
        lines.append(f"- `{cascade}` cascade: `{[repr(a) for a in preset(cascade, ['linf'], overrides)]}`")
    lines.append("")

    smooth_rows = [r for r in rows if r.get("smooth")]
    if smooth_rows:
        radii = [str(float(x)) for x in SMOOTH_RADII]
        s_header = ["model", "σ", "n0", "n", "α", "images"] + [f"cert. acc r={x}" for x in radii] + ["abstain", "s"]
        s_body = []
        for r in smooth_rows:
            s, c = r["smooth"], r["smooth"]["config"]
            s_body.append(
                [
                    r["label"],
                    f"{c['sigma']:g}",
                    str(c["n0"]),
                    str(c["n"]),
                    f"{c['alpha']:g}",
                    str(s["n_eval"]),
                    *[pct(s["certified"].get(x)) for x in radii],
                    pct(s["abstain"]),
                    sec(s["wall_s"]),
                ]
            )
        lines += ["### Randomized smoothing: certified l2 accuracy (Cohen et al. CERTIFY)", ""]
        lines += [common.markdown_table(s_header, s_body), ""]

    ver_rows = [r for r in rows if r.get("verified")]
    if ver_rows:
        keys = list(ver_rows[0]["verified"]["verified"])
        v_body = [[r["label"], *[pct(r["verified"]["verified"].get(k)) for k in keys]] for r in ver_rows]
        lines += ["### Verified accuracy (l∞)", "", common.markdown_table(["model", *keys], v_body), ""]

    targets: list[str] = []
    by = {r["label"]: r for r in rows}
    top = str(max(args.eval_eps))
    for name in ("pgd-at", "trades"):
        ev = by.get(name, {}).get("eval")
        if ev:
            v = ev["robust"].get(top)
            verdict = "met" if v is not None and v >= 0.8 else "MISSED"
            targets.append(f"- {name}: robust accuracy at ε = {top} {pct(v)} (target ≥ 80 %) → {verdict}")
    pgd = by.get("pgd-at")
    for name in ("fast-at", "n-fgsm"):
        fast = by.get(name)
        if not (fast and pgd and fast.get("eval") and pgd.get("eval")):
            continue
        acc = ratio(fast["eval"]["robust"].get(top), pgd["eval"]["robust"].get(top))
        wall = ratio(fast["meta"]["train_wall_s"], pgd["meta"]["train_wall_s"])
        cpu = ratio(fast["meta"]["train_cpu_s"], pgd["meta"]["train_cpu_s"])
        ok = acc is not None and acc >= 0.9 and cpu is not None and cpu <= 1 / 3
        targets.append(
            f"- {name} vs pgd-at: robust accuracy ratio at ε = {top} "
            f"{'-' if acc is None else f'{acc:.2f}'} (target ≥ 0.90), training time ratio "
            f"{'-' if wall is None else f'{wall:.2f}'} wall / {'-' if cpu is None else f'{cpu:.2f}'} CPU "
            f"(target ≤ 0.33) → {'met' if ok else 'MISSED'}"
        )
    if targets:
        lines += ["### Targets of issue 5", "", *targets]
    lines += ["", f"- {common.load_average()} at the end"]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--objectives", nargs="+", default=DEFAULT_OBJECTIVES, help="registered objective names")
    ap.add_argument("--epochs", type=int, default=2, help="epochs of every objective except standard")
    ap.add_argument("--standard-epochs", type=int, default=5, help="epochs of standard training")
    ap.add_argument("--certified-epochs", type=int, default=None, help="epochs of ibp / crown-ibp (default --epochs)")
    ap.add_argument("--epochs-of", nargs="*", default=[], help="per-objective epochs, e.g. vat=5 crown-ibp=20")
    ap.add_argument("--options", nargs="*", default=[], help="objective options, e.g. trades.step_size=0.01")
    ap.add_argument(
        "--certified-eps", type=float, nargs="*", default=[], help="training radii of ibp / crown-ibp (one model each)"
    )
    ap.add_argument("--channels", type=int, nargs=2, default=list(ZOO_CHANNELS), help="cnn convolution channels")
    ap.add_argument("--hidden", type=int, default=ZOO_HIDDEN, help="cnn hidden linear width")
    ap.add_argument("--n-train", type=int, default=common.N_TRAIN, help="training images (first n of the 8,000)")
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate")
    ap.add_argument(
        "--schedule", choices=("constant", "multistep"), default="constant", help="learning-rate schedule (not Fast-AT)"
    )
    ap.add_argument(
        "--milestones", type=float, nargs="+", default=[0.5, 0.75], help="multistep: fractions of training (×0.1 each)"
    )
    ap.add_argument("--fast-lr", type=float, default=5e-3, help="peak of Fast-AT's cyclic Adam learning rate")
    ap.add_argument(
        "--fast-validate",
        type=int,
        default=0,
        help="Fast-AT: keep the pass of best PGD accuracy on this many training images (Wong et al.'s early stop)",
    )
    ap.add_argument("--eps-train", type=float, default=0.3, help="l∞ radius of the training threat model")
    ap.add_argument("--inner-steps", type=int, default=None, help="PGD steps inside PGD-AT/TRADES/MART")
    ap.add_argument(
        "--init",
        choices=("scratch", "standard"),
        default="standard",
        help="initial weights of the defended models: random, or the standard model of this run (warm start)",
    )
    ap.add_argument("--sigmas", type=float, nargs="+", default=[0.25, 0.5], help="Gaussian-noise training σ")
    ap.add_argument("--eval-eps", type=float, nargs="*", default=[0.1, 0.3], help="l∞ radii of the evaluation")
    ap.add_argument("--attacks", choices=("standard", "rapid"), default="standard", help="evaluate() preset")
    ap.add_argument(
        "--attacks-other",
        choices=("standard", "rapid"),
        default=None,
        help="preset for objectives outside MAIN_OBJECTIVES (default --attacks)",
    )
    ap.add_argument("--override", nargs="*", default=[], help="preset options, e.g. apgd-t.n_target_classes=3")
    ap.add_argument("--n-eval", type=int, default=common.N_EVAL, help="images of the robust evaluation")
    ap.add_argument("--n-eval-at", nargs="*", default=[], help="fewer images at some radii, e.g. 0.1=200")
    ap.add_argument(
        "--n-eval-other",
        type=int,
        default=None,
        help="evaluation images for objectives outside MAIN_OBJECTIVES (default --n-eval)",
    )
    ap.add_argument("--smooth-n-eval", type=int, default=500, help="images certified per smoothed model")
    ap.add_argument("--smooth-n", type=int, default=10_000, help="Monte Carlo estimation samples (CERTIFY n)")
    ap.add_argument("--smooth-n0", type=int, default=100, help="Monte Carlo selection samples (CERTIFY n0)")
    ap.add_argument("--smooth-alpha", type=float, default=0.001)
    ap.add_argument("--smooth-batch", type=int, default=1_000, help="noisy copies per forward pass")
    ap.add_argument("--verify-n", type=int, default=200, help="images verified per certified-training model")
    ap.add_argument("--verify-methods", nargs="+", default=["ibp", "crown"])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--retrain", action="store_true", help="ignore the cache (models and evaluations)")
    ap.add_argument("--output", type=Path, help="also write the Markdown report to this file")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    given = sys.argv[1:] if argv is None else argv
    command = " ".join(["python benchmarks/defenses_mnist.py", *(shlex.quote(a) for a in given)])

    log(f"# Defences on MNIST\n\n{common.machine_summary()}\n{common.load_average()}")
    split = common.load_split()
    todo = recipes(args)

    # the standard model comes first: it is the warm start of the others under --init standard
    std_recipe = standard_recipe(args)
    init_model: nn.Module | None = None
    init_key: str | None = None
    if args.init == "standard":
        init_model, std_meta = train_recipe(std_recipe, split, args, None, None)
        init_key = "standard:" + digest(std_meta["config"])

    rows: list[dict[str, Any]] = []
    for recipe in todo:
        if recipe.objective == "standard":
            model, meta = train_recipe(recipe, split, args, None, None)
        else:
            model, meta = train_recipe(recipe, split, args, init_model, init_key)
        model_key = digest(meta["config"])
        main = recipe.objective in MAIN_OBJECTIVES
        n = args.n_eval if main or args.n_eval_other is None else args.n_eval_other
        cascade = args.attacks if main or args.attacks_other is None else args.attacks_other
        row: dict[str, Any] = {"label": recipe.label, "meta": meta}
        row["eval"] = robust_eval(model, model_key, split.eval, args, n, cascade)
        if row["eval"]:
            ev = row["eval"]
            log(
                f"[{recipe.label}] clean {pct(ev['clean'])}, robust "
                + ", ".join(f"ε={e}: {pct(v)}" for e, v in ev["robust"].items())
                + f" on {ev['n']} images ({ev['wall_s']:.0f} s, {ev['load_average_after']})"
            )
        if recipe.objective == "gaussian-noise":
            row["smooth"] = smoothing_eval(model, model_key, float(recipe.options["sigma"]), split.eval, args)
            if row["smooth"]:
                log(f"[{recipe.label}] smoothing: {json.dumps(row['smooth']['certified'])}")
        if recipe.objective in CERTIFIED_OBJECTIVES:
            row["verified"] = verified_eval(model, model_key, split.eval, args)
        rows.append(row)

    text = report(rows, args, command)
    print("\n" + text)
    if args.output:
        args.output.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
