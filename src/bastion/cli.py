"""The ``bastion`` command line: a thin layer over the Python API.

Every command parses its arguments, makes one call of the API, shows progress and prints a table (or JSON with
``--json``). Errors caused by bad input are printed as one line, without a traceback, with exit status 2.
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import sys
import time
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bastion.errors import BastionError

EPILOG_EVALUATE = """\
examples:
  bastion evaluate --model zoo:cnn@digits-cnn.pt --data digits --eps 0.1,0.2,0.3 --attack fgsm,pgd
  bastion evaluate --model model.pt2 --data mnist:~/data/mnist --norm l2 --eps 1,2 --attack pgd \\
      --attack-opt steps=100 --attack-opt restarts=5 --store runs.db
  bastion evaluate --model mypkg.models:robust_net --data test.npz --eps 8/255 --attack standard --json
  bastion evaluate --model model.pt2 --data cifar10:~/data --eps 8/255 --attack rapid --attack-opt apgd.steps=50

model specs: FILE.pt2 (torch.export program), zoo:NAME@WEIGHTS.pt (zoo architecture + state dict, loaded with
  weights_only=True), WEIGHTS.pt (a file written by bastion's save_model), package.module:factory or
  path/to/file.py:factory (a function returning the nn.Module).
data specs: digits (built in), mnist:DIR[:train], cifar10:DIR[:train], FILE.npz (arrays x, y), FILE.csv,
  X.npy,Y.npy.
"""

EPILOG_DEMO = """\
Trains the zoo CNN on scikit-learn's bundled 8x8 digits (cached after the first run), evaluates FGSM and PGD at
several l-inf radii on the held-out 20 %, prints the table and writes OUT/runs.db and OUT/robust_accuracy.png.

example:
  bastion demo --out bastion-demo --eps 0.05,0.1,0.2,0.3
"""

EPILOG_RUNS = """\
examples:
  bastion runs --store runs.db              # list runs
  bastion runs --store runs.db show 3       # one run: configuration, summary, warnings
  bastion runs --store runs.db show 3 --json
"""


def _parse_eps(text: str) -> list[float]:
    values = []
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        try:
            if "/" in part:
                num, den = part.split("/", 1)
                values.append(float(num) / float(den))
            else:
                values.append(float(part))
        except (ValueError, ZeroDivisionError):
            raise argparse.ArgumentTypeError(f"bad eps value {part!r}: give numbers like 0.1 or 8/255") from None
    if not values:
        raise argparse.ArgumentTypeError("give at least one eps value")
    return values


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _check_device(name: str) -> str:
    import torch

    try:
        device = torch.device(name)
    except RuntimeError:
        raise BastionError(f"--device {name!r} is not a torch device; use cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise BastionError(f"--device {name!r}: this torch build or machine has no CUDA device; use --device cpu")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise BastionError(f"--device {name!r}: only {torch.cuda.device_count()} CUDA device(s) are visible")
    return name


def _model_and_data(args: argparse.Namespace) -> tuple[Any, Any]:
    """The ``--model`` (checked against the data, moved to ``--device``) and the ``--data`` cut to ``--limit``."""
    from bastion.data import load_data
    from bastion.models import load_model

    device = _check_device(args.device) if args.device else None
    data = load_data(args.data)
    if args.limit is not None:
        data = data.subset(slice(0, args.limit))
    model = load_model(args.model, input_shape=data.feature_shape, num_classes=data.num_classes)
    if device is not None:
        model = model.to(device)
    return model, data


def _check_plot_path(path: str) -> Path:
    """Fail before any work if the figure could not be written (missing folder, unknown format)."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure

    out = Path(path)
    if not out.parent.is_dir():
        raise BastionError(f"--plot {path!r}: the folder {str(out.parent)!r} does not exist")
    formats = Figure().canvas.get_supported_filetypes()
    if out.suffix.lstrip(".").lower() not in formats:
        raise BastionError(f"--plot {path!r}: unknown figure format; use one of .{', .'.join(sorted(formats))}")
    return out


def _parse_opts(items: Sequence[str]) -> list[tuple[str | None, str, Any]]:
    """``key=value`` or ``attack.key=value`` strings -> (attack or None, key, Python value)."""
    out = []
    for item in items:
        if "=" not in item:
            raise BastionError(f"--attack-opt {item!r}: expected key=value (e.g. steps=100 or pgd.steps=100)")
        key, raw = item.split("=", 1)
        target, _, name = key.strip().rpartition(".")
        try:
            value: Any = ast.literal_eval(raw.strip())
        except (ValueError, SyntaxError):
            value = raw.strip()
        out.append((target or None, name, value))
    return out


def _build_attacks(names: str, opts: Sequence[tuple[str | None, str, Any]], norm: str) -> list[Any]:
    """Attack objects for a comma-separated list of attack and preset names, with ``--attack-opt`` applied."""
    import inspect

    from bastion.attacks import ATTACKS, make_attack
    from bastion.attacks.presets import PRESETS
    from bastion.threat import canonical_norm

    norm = canonical_norm(norm)
    plan: list[tuple[str, dict[str, Any]]] = []  # (attack name, options) in cascade order
    for token in (n.strip().lower() for n in names.split(",") if n.strip()):
        if token in PRESETS:
            plan += [(n, dict(o)) for n, o in PRESETS[token] if n in ATTACKS and norm in ATTACKS[n].norms]
        else:
            plan.append((token, {}))
    attack_names = [n for n, _ in plan]
    for target, key, value in opts:
        if target is not None:
            if target not in attack_names:
                raise BastionError(f"--attack-opt {target}.{key}: {target!r} is not among the attacks {attack_names}")
            for n, o in plan:
                if n == target:
                    o[key] = value
            continue
        takers = [n for n in attack_names if n in ATTACKS and key in inspect.signature(ATTACKS[n].__init__).parameters]
        if not takers:
            raise BastionError(f"--attack-opt {key}: none of the attacks {attack_names} accepts option {key!r}")
        for n, o in plan:
            if n in takers:
                o[key] = value
    return [make_attack(n, **o) for n, o in plan]


def _print_result(result: Any, as_json: bool) -> None:
    if as_json:
        print(json.dumps(result.to_dict(), indent=2))
    else:
        print(result.table())


# --------------------------------------------------------------------------------------------------- commands
def cmd_evaluate(args: argparse.Namespace) -> int:
    from bastion.evaluate import evaluate
    from bastion.threat import LpBall

    plot = _check_plot_path(args.plot) if args.plot else None
    model, data = _model_and_data(args)
    threats = [LpBall(args.norm, e) for e in args.eps]
    attacks = _build_attacks(args.attack, _parse_opts(args.attack_opt), args.norm)
    result = evaluate(
        model, data, threats, attacks, batch_size=args.batch_size, store=args.store, seed=args.seed,
        progress=not args.json, config={"model_spec": args.model, "data_spec": args.data},
    )  # fmt: skip
    _print_result(result, args.json)
    if plot is not None:
        from bastion.report import plot_robust_accuracy

        plot_robust_accuracy(result, plot, title=f"{args.model} on {data.name}")
    return 0


def _cache_dir() -> Path:
    root = os.environ.get("BASTION_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(Path.home(), ".cache"), "bastion"
    )
    return Path(root)


def demo_model(*, retrain: bool = False, progress: bool = True, quiet: bool = False) -> tuple[Any, Any, Any]:
    """The demo's (model, train split, test split): the zoo CNN trained on digits, cached after the first call."""
    import torch

    from bastion.data import load_digits
    from bastion.defenses.training import accuracy, train
    from bastion.models import build_model, load_model, save_model

    train_set, test_set = load_digits().train_test_split(test_fraction=0.2, seed=0)
    path = _cache_dir() / "digits-cnn.pt"
    if path.exists() and not retrain:
        model = load_model(str(path))
        if not quiet:
            print(f"loaded the cached digits CNN from {path}", file=sys.stderr)
    else:
        torch.manual_seed(0)
        model = build_model("cnn", train_set.feature_shape, train_set.num_classes)
        t0 = time.perf_counter()
        train(model, train_set, epochs=15, batch_size=64, lr=2e-3, seed=0, progress=progress)
        path.parent.mkdir(parents=True, exist_ok=True)
        save_model(model, path, arch="cnn", config={"input_shape": list(train_set.feature_shape), "num_classes": 10})
        if not quiet:
            print(
                f"trained the zoo CNN on digits in {time.perf_counter() - t0:.1f} s "
                f"(test accuracy {100 * accuracy(model, test_set):.1f} %), cached at {path}",
                file=sys.stderr,
            )
    return model, train_set, test_set


def cmd_demo(args: argparse.Namespace) -> int:
    from bastion.attacks import FGSM, PGD
    from bastion.evaluate import evaluate
    from bastion.report import plot_robust_accuracy
    from bastion.threat import LpBall

    model, _, test_set = demo_model(retrain=args.retrain, progress=not args.json, quiet=args.json)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    threats = [LpBall("linf", e) for e in args.eps]
    result = evaluate(
        model, test_set, threats, [FGSM(), PGD()], store=out / "runs.db", progress=not args.json,
        config={"model_spec": "demo: zoo cnn on digits", "data_spec": "digits (test 20 %)"},
    )  # fmt: skip
    plot = plot_robust_accuracy(result, out / "robust_accuracy.png", title="bastion demo: CNN on 8x8 digits")
    _print_result(result, args.json)
    if not args.json:
        print(f"\nstore: {out / 'runs.db'} (run {result.run_id})   plot: {plot}")
    return 0


def cmd_runs(args: argparse.Namespace) -> int:
    from bastion.store import Store

    if not Path(args.store).exists():
        raise BastionError(f"no store at {args.store!r}; give the path used with --store (demo: bastion-demo/runs.db)")
    with Store(args.store) as store:
        if args.action == "show":
            if args.run is None:
                raise BastionError("bastion runs show: give a run id or key (see `bastion runs`)")
            run = store.run(int(args.run) if args.run.isdigit() else args.run)
            info = {
                "id": run.id, "key": run.key, "kind": run.kind, "status": run.status, "n_samples": run.n_samples,
                "n_records": run.n_records, "seconds": run.seconds, "config": run.config, "versions": run.versions,
                "summary": run.summary, "warnings": [{"code": c, "message": m} for c, m in store.warnings(run.id)],
            }  # fmt: skip
            if args.json:
                print(json.dumps(info, indent=2))
            else:
                for k, v in info.items():
                    print(f"{k:>10}: {json.dumps(v) if isinstance(v, (dict, list)) else v}")
            return 0
        runs = store.runs()
        if args.json:
            print(json.dumps([{"id": r.id, "kind": r.kind, "status": r.status, "n_samples": r.n_samples,
                               "n_records": r.n_records, "created": r.created, "summary": r.summary} for r in runs],
                             indent=2))  # fmt: skip
            return 0
        if not runs:
            print(f"no runs in {args.store}")
            return 0
        print(f"{'id':>4}  {'kind':<9} {'status':<9} {'samples':>8} {'records':>8}  created              worst case")
        for r in runs:
            created = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(r.created))
            worst = ""
            if r.summary and "worst_case" in r.summary:
                worst = ", ".join(f"{k} {100 * v:.1f}%" for k, v in r.summary["worst_case"].items())
            print(f"{r.id:>4}  {r.kind:<9} {r.status:<9} {r.n_samples:>8} {r.n_records:>8}  {created}  {worst}")
    return 0


def cmd_attacks(args: argparse.Namespace) -> int:
    from bastion.attacks import ATTACKS

    rows = [
        {"name": name, "class": cls.__name__, "norms": "/".join(cls.norms), "access": cls.access,
         "minimal": cls.minimal, "paper": cls.paper}
        for name, cls in sorted(ATTACKS.items())
    ]  # fmt: skip
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    for r in rows:
        kind = "minimal-distortion" if r["minimal"] else "fixed-eps"
        print(f"{r['name']:<8} {r['norms']:<16} {r['access']:<10} {kind:<18} {r['paper']}")
    return 0


def cmd_smooth(args: argparse.Namespace) -> int:
    """``bastion smooth certify|predict``: randomized smoothing (Cohen et al., ICML 2019) over a data set."""
    from bastion.defenses.smoothing import Smooth, evaluate_smoothed

    plot = _check_plot_path(args.plot) if args.plot else None
    model, data = _model_and_data(args)
    smoothed = Smooth(model, data.num_classes, args.sigma, domain=data.domain)
    result = evaluate_smoothed(
        smoothed, data, mode=args.action, n=args.n, n0=args.n0, alpha=args.alpha, batch_size=args.batch_size,
        radii=args.radii, store=args.store, seed=args.seed, progress=not args.json,
        config={"model_spec": args.model, "data_spec": args.data},
    )  # fmt: skip
    _print_result(result, args.json)
    if plot is not None and args.action == "certify":
        from bastion.report.plots import plot_certified_accuracy

        plot_certified_accuracy(result.radii, {f"sigma = {args.sigma:g}": result.certified_accuracy}, plot,
                                title=f"{args.model} on {data.name}")  # fmt: skip
    return 0


EPILOG_TRAIN = """\
examples:
  bastion train --objective pgd-at --eps 0.3 --norm linf --data mnist:~/data/mnist:train --arch cnn --epochs 20 \\
      --out mnist-pgd.pt --store runs.db
  bastion train --objective trades --eps 0.1 --data digits --arch mlp --epochs 10 --out digits-trades.pt \\
      --objective-opt beta=1.0 --validation-fraction 0.1 --restore-best
  bastion train --objective fast-at --eps 0.3 --data mnist:~/data/mnist:train --epochs 10 --out fast.pt --resume
  torchrun --nproc-per-node 2 -m bastion.cli train --objective pgd-at --eps 0.3 --data digits --out m.pt

objectives: standard, fgsm-at, pgd-at, free-at, fast-at, n-fgsm, trades, mart, vat, wrm, feature-scattering,
  at-scr, latent-manifold, gaussian-noise, ibp, crown-ibp (options with --objective-opt KEY=VALUE, e.g. steps=10,
  step_size=0.01, beta=6, lam=6, replays=8, alpha=0.5, sigma=0.25, kappa_end=0.5, warmup=0.1, ramp=0.4; ibp and
  crown-ibp are certified training, l-inf only; vat, wrm and gaussian-noise set their own perturbation size and ignore
  --eps/--norm, which then only define the validation attack). A checkpoint is written after every epoch
  (OUT.ckpt unless --checkpoint); --resume continues from it with the same result as an uninterrupted run.
"""


def cmd_train(args: argparse.Namespace) -> int:
    """``bastion train``: adversarial training of a zoo architecture (one AdversarialTrainer.fit call)."""
    import torch

    from bastion.data import load_data
    from bastion.defenses.training import AdversarialTrainer, make_objective
    from bastion.models import build_model, save_model
    from bastion.threat import LpBall

    device = _check_device(args.device) if args.device else None
    out = Path(args.out).expanduser()
    if not out.resolve().parent.is_dir():
        raise BastionError(f"--out {args.out!r}: the folder {out.resolve().parent} does not exist")
    data = load_data(args.data)
    if args.limit is not None:
        data = data.subset(slice(0, args.limit))
    validation = None
    if args.validation_fraction:
        if not 0 < args.validation_fraction < 1:
            raise BastionError(f"--validation-fraction must be in (0, 1), got {args.validation_fraction}")
        data, validation = data.train_test_split(test_fraction=args.validation_fraction, seed=args.seed)
    if len(args.eps) != 1:
        raise BastionError("--eps takes one radius for training")
    threat = LpBall(args.norm, args.eps[0], domain=data.domain)
    options = {name: value for target, name, value in _parse_opts(args.objective_opt) if target is None}
    objective = make_objective(args.objective, threat, **options)
    torch.manual_seed(args.seed)  # the initial weights, so that --resume rebuilds the same starting model
    model = build_model(args.arch, data.feature_shape, data.num_classes)
    if device == "cuda" and "LOCAL_RANK" in os.environ:
        device = f"cuda:{os.environ['LOCAL_RANK']}"  # under torchrun: one GPU per process
    if device is not None:
        model = model.to(device)
    schedule = args.schedule or ("cyclic" if args.objective.lower() == "fast-at" else "constant")
    trainer = AdversarialTrainer(
        objective, threat=threat, epochs=args.epochs, batch_size=args.batch_size, optimizer=args.optimizer,
        lr=args.lr, weight_decay=args.weight_decay, schedule=schedule, seed=args.seed, validation=validation,
        val_steps=args.val_steps, restore_best=args.restore_best,
        checkpoint=args.checkpoint or str(out) + ".ckpt", resume=args.resume, store=args.store,
        progress=not args.json,
        metadata={"arch": args.arch, "data_spec": args.data, "limit": args.limit, "out": str(out)},
    )  # fmt: skip
    result = trainer.fit(model, data)
    if int(os.environ.get("RANK", "0")) != 0:
        return 0  # under torchrun only rank 0 writes the model and reports
    model_config = {"input_shape": list(data.feature_shape), "num_classes": data.num_classes}
    save_model(model.cpu(), out, arch=args.arch, config=model_config)
    rows = [m.to_dict() for m in result.history]
    summary = {
        "model": str(out), "objective": repr(objective), "passes": result.passes, "resumed_from": result.resumed_from,
        "best_epoch": result.best_epoch, "best_robust_acc": result.best_robust_acc,
        "restored_best": result.restored_best, "run_id": result.run_id, "world_size": result.world_size,
        "history": rows,
    }  # fmt: skip
    if args.json:
        print(json.dumps(summary, indent=2))
        return 0
    print(f"{'epoch':>5} {'loss':>9} {'train acc':>9} {'lr':>9} {'val clean':>9} {'val robust':>10} {'seconds':>8}")
    for r in rows:
        vc = "-" if r["val_clean_acc"] is None else f"{r['val_clean_acc']:.4f}"
        vr = "-" if r["val_robust_acc"] is None else f"{r['val_robust_acc']:.4f}"
        print(f"{r['epoch']:>5} {r['loss']:>9.4f} {r['train_acc']:>9.4f} {r['lr']:>9.2e} {vc:>9} {vr:>10} "
              f"{r['seconds']:>8.2f}")  # fmt: skip
    note = f" (best epoch {result.best_epoch} restored)" if result.restored_best else ""
    print(f"\nmodel: {out}{note}" + (f"   store: {args.store} (run {result.run_id})" if args.store else ""))
    return 0


# --------------------------------------------------------------------------------------------------- certify/assess
#: One default for the certified radius, as in the Python API (certify and assess both take radius=True).
RADIUS_NOTE = """\
Each sample's certified radius is found by bisection on eps (on by default, as in the Python API): it costs about
4-60x the time of the one bound at eps (digits: IBP about 4x, CROWN 17x on the MLP and 60x on the CNN); --no-radius
skips it, and the certified lower bound is then eps for the certified samples.
"""

EPILOG_CERTIFY = f"""\
examples:
  bastion certify --model zoo:mlp@digits-mlp.pt --data digits --norm linf --eps 0.05 --method crown
  bastion certify --model model.pt --data test.npz --norm l2 --eps 0.5 --method deepz --no-radius --store runs.db

methods: ibp, crown, alpha-crown, deeppoly, deepz (zonotopes), symbolic (ReluVal symbolic intervals). Norms: linf
  (all methods), l2 and l1 (crown/deeppoly/alpha-crown/deepz/symbolic bound the ball with the dual norm; ibp its
  enclosing box).

{RADIUS_NOTE}"""

EPILOG_ASSESS = f"""\
examples:
  bastion assess --model zoo:mlp@digits-mlp.pt --data digits --norm linf --eps 0.05 --budget 10 --store runs.db
  bastion assess --model model.pt --data test.npz --eps 8/255 --attack pgd --methods ibp,crown --budget 0 --json

Runs a cheap attack cascade, a minimal attack (FAB), then incomplete verifiers (IBP -> CROWN -> alpha-CROWN) on
what survives and complete search (branch and bound / MILP, l-inf only) within --budget seconds per sample, and
reports robust / falsified / unknown with the bracket [certified radius, closest adversarial example] per sample.

{RADIUS_NOTE}"""


def _add_radius_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--radius",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="find each sample's certified radius by bisection (default: on; see below for its cost)",
    )


def _certify_inputs(args: argparse.Namespace) -> tuple[Any, Any, Any]:
    """Model, data and threat of ``bastion certify`` / ``bastion assess``."""
    from bastion.threat import LpBall

    if len(args.eps) != 1:
        raise BastionError(f"--eps takes one radius for {args.command}, got {len(args.eps)}")
    model, data = _model_and_data(args)
    return model, data, LpBall(args.norm, args.eps[0], domain=data.domain)


def _print_with_records(result: Any, as_json: bool) -> None:
    if as_json:
        out = result.to_dict()
        out["records"] = [r.to_dict() for r in sorted(result.records, key=lambda r: r.index)]
        print(json.dumps(out, indent=2))
    else:
        print(result.table())


def cmd_certify(args: argparse.Namespace) -> int:
    """``bastion certify``: certified status (and radius) of every sample with one bound method."""
    from bastion.verify.bounds import BoundOptions
    from bastion.verify.certify import certify

    model, data, threat = _certify_inputs(args)
    result = certify(
        model, data, threat, method=args.method, radius=args.radius, batch_size=args.batch_size, store=args.store,
        progress=not args.json, options=BoundOptions(alpha_steps=args.alpha_steps),
        config={"model_spec": args.model, "data_spec": args.data},
    )  # fmt: skip
    _print_with_records(result, args.json)
    return 0


def cmd_assess(args: argparse.Namespace) -> int:
    """``bastion assess``: attack -> certify -> complete search, with the bracket per sample."""
    from bastion.verify.assess import assess
    from bastion.verify.bounds import BoundOptions

    model, data, threat = _certify_inputs(args)
    attacks = _build_attacks(args.attack, _parse_opts(args.attack_opt), args.norm)
    minimal = None if args.minimal_attack.lower() == "none" else args.minimal_attack
    result = assess(
        model, data, threat, budget=args.budget, attack=attacks, minimal_attack=minimal,
        methods=[m.strip() for m in args.methods.split(",") if m.strip()], complete=not args.no_complete,
        radius=args.radius, batch_size=args.batch_size, store=args.store, seed=args.seed,
        progress=not args.json, options=BoundOptions(alpha_steps=args.alpha_steps),
        config={"model_spec": args.model, "data_spec": args.data},
    )  # fmt: skip
    _print_with_records(result, args.json)
    return 0


# --------------------------------------------------------------------------------------------------- vnncomp
EPILOG_VNNCOMP = """\
examples:
  bastion vnncomp net.onnx prop.vnnlib --timeout 60 --out result.txt
  bastion vnncomp --instances benchmarks/acasxu/instances.csv --out results.csv
  bastion vnncomp --instances instances.csv --dir BENCH/ --out results.csv --timeout-scale 0.5

One instance: writes RESULT.txt as the VNN-COMP scripts expect: `sat` followed by the counterexample
((X_0 v) ... (Y_0 v) ...) (re-executed on onnxruntime before it is written), `unsat`, `timeout` or `unknown`.
A benchmark: instances.csv has rows `onnx,vnnlib,timeout` (paths relative to --dir, default the csv's folder;
.gz files accepted); results.csv gets one row `onnx,vnnlib,result,seconds` per instance, written as each one
finishes. Re-running the same command skips the instances already in results.csv, so a killed run resumes with
nothing lost.
"""


def _vnncomp_load(onnx_path: Path, tmp: Path) -> Any:
    """The ONNX module of a (possibly gzip-compressed) file; a .gz file is unpacked into ``tmp`` first."""
    import gzip
    import shutil

    from bastion.models.onnx import load_onnx

    if not onnx_path.is_file():
        raise BastionError(f"ONNX file {os.fspath(onnx_path)!r} not found")
    if onnx_path.suffix == ".gz":
        target = tmp / onnx_path.name[: -len(".gz")]
        with gzip.open(onnx_path, "rb") as src, open(target, "wb") as dst:
            shutil.copyfileobj(src, dst)
        onnx_path = target
    return load_onnx(onnx_path)


def _vnncomp_instance(model: Any, vnnlib_path: Path, timeout: float, method: str, seed: int) -> tuple[str, str]:
    """Decide one instance; returns the VNN-COMP result word and the result file's text."""
    import math

    import torch

    from bastion.verify.bab import verify
    from bastion.verify.vnnlib import format_counterexample, parse_vnnlib

    with torch.no_grad():
        k = int(model(torch.zeros(1, *model.input_shape)).reshape(1, -1).shape[1])
    spec = parse_vnnlib(vnnlib_path, num_inputs=math.prod(model.input_shape), num_outputs=k)
    verdict = verify(model, spec, timeout=timeout, method=method, seed=seed)
    word = verdict.vnncomp()
    if word == "sat":
        assert verdict.counterexample is not None and verdict.output is not None
        return word, "sat\n" + format_counterexample(verdict.counterexample, verdict.output) + "\n"
    return word, word + "\n"


def _vnncomp_one(args: argparse.Namespace) -> int:
    import tempfile

    start = time.perf_counter()
    if args.net is None or args.spec is None:
        raise BastionError("give NET.onnx and SPEC.vnnlib, or --instances instances.csv")
    if args.timeout is None or not args.timeout > 0:
        raise BastionError("--timeout S (seconds, > 0) is required for a single instance")
    out = Path(args.out) if args.out else None
    with tempfile.TemporaryDirectory() as tmp:
        model = _vnncomp_load(Path(args.net), Path(tmp))
        left = args.timeout - (time.perf_counter() - start)
        if left <= 0:
            word, text = "timeout", "timeout\n"
        else:
            word, text = _vnncomp_instance(model, Path(args.spec), left, args.method, args.seed)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text)
    print(text if args.verbose else word, end="" if args.verbose else "\n")
    return 0


def _vnncomp_benchmark(args: argparse.Namespace) -> int:
    import csv
    import tempfile

    inst = Path(args.instances)
    if not inst.is_file():
        raise BastionError(f"instances file {os.fspath(inst)!r} not found")
    base = Path(args.dir) if args.dir else inst.parent
    out = Path(args.out) if args.out else inst.with_name("results.csv")
    rows: list[tuple[str, str, float]] = []
    with open(inst, newline="") as fh:
        for n, row in enumerate(csv.reader(fh), 1):
            if not row or not "".join(row).strip() or row[0].lstrip().startswith("#"):
                continue
            if len(row) < 3:
                raise BastionError(f"{os.fspath(inst)}:{n}: expected 'onnx,vnnlib,timeout', got {','.join(row)!r}")
            try:
                limit = float(row[2]) * args.timeout_scale
            except ValueError:
                raise BastionError(f"{os.fspath(inst)}:{n}: timeout {row[2]!r} is not a number") from None
            rows.append((row[0].strip(), row[1].strip(), limit))
    done: set[tuple[str, str]] = set()
    if out.is_file():
        with open(out, newline="") as fh:
            for row in csv.reader(fh):
                if len(row) >= 4 and row[0] != "onnx":
                    done.add((row[0], row[1]))
    fresh = not out.is_file() or out.stat().st_size == 0
    out.parent.mkdir(parents=True, exist_ok=True)
    counts: dict[str, int] = {}
    with open(out, "a", newline="") as fh, tempfile.TemporaryDirectory() as tmp:
        writer = csv.writer(fh)
        if fresh:
            writer.writerow(["onnx", "vnnlib", "result", "seconds"])
            fh.flush()
        cache: dict[str, Any] = {}
        for onnx_rel, vnnlib_rel, limit in rows:
            if (onnx_rel, vnnlib_rel) in done:
                continue
            start = time.perf_counter()
            try:
                if onnx_rel not in cache:
                    cache.clear()  # one network in memory at a time: benchmarks list instances network by network
                    cache[onnx_rel] = _vnncomp_load(base / onnx_rel, Path(tmp))
                left = limit - (time.perf_counter() - start)
                word = (
                    "timeout"
                    if left <= 0
                    else _vnncomp_instance(cache[onnx_rel], base / vnnlib_rel, left, args.method, args.seed)[0]
                )
            except BastionError as exc:
                print(f"bastion vnncomp: {onnx_rel} {vnnlib_rel}: error: {exc}", file=sys.stderr)
                word = "error"
            seconds = time.perf_counter() - start
            writer.writerow([onnx_rel, vnnlib_rel, word, f"{seconds:.3f}"])
            fh.flush()
            os.fsync(fh.fileno())
            counts[word] = counts.get(word, 0) + 1
            print(f"{word:<8} {seconds:8.2f}s  {onnx_rel}  {vnnlib_rel}")
    summary = ", ".join(f"{k}: {v}" for k, v in sorted(counts.items())) or "nothing left to run"
    print(f"{out}: {summary} ({len(done)} instances were already done)")
    return 0


def cmd_vnncomp(args: argparse.Namespace) -> int:
    """``bastion vnncomp``: one VNN-COMP instance, or a whole benchmark from its instances.csv (resumable)."""
    if args.timeout_scale <= 0:
        raise BastionError("--timeout-scale must be > 0")
    if args.instances:
        if args.net or args.spec:
            raise BastionError("give either NET.onnx SPEC.vnnlib or --instances, not both")
        return _vnncomp_benchmark(args)
    return _vnncomp_one(args)


def _add_vnncomp_parser(sub: Any, fmt: Any) -> None:
    p = sub.add_parser("vnncomp", help="run a VNN-COMP instance (ONNX + VNN-LIB) or a whole benchmark",
                       epilog=EPILOG_VNNCOMP, formatter_class=fmt)  # fmt: skip
    p.add_argument("net", nargs="?", default=None, help="the network, NET.onnx (or .onnx.gz)")
    p.add_argument("spec", nargs="?", default=None, help="the property, SPEC.vnnlib (or .vnnlib.gz)")
    p.add_argument("--timeout", type=float, default=None, help="seconds for one instance (loading included)")
    p.add_argument("--out", default=None, help="RESULT.txt for one instance; results.csv for --instances")
    p.add_argument("--instances", default=None, help="a benchmark's instances.csv (rows onnx,vnnlib,timeout)")
    p.add_argument("--dir", default=None, help="folder the instances.csv paths are relative to")
    p.add_argument("--timeout-scale", type=float, default=1.0, help="multiply every instances.csv timeout")
    p.add_argument("--method", default="auto", help="auto, input, relu, milp or bounds (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--verbose", action="store_true", help="print the whole result (with the counterexample)")
    p.set_defaults(func=cmd_vnncomp)


# --------------------------------------------------------------------------------------------------- parser
class _Parser(argparse.ArgumentParser):
    """An argument parser whose errors are one line (like every other bastion error), exit status 2."""

    def error(self, message: str) -> typing.NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


def build_parser() -> argparse.ArgumentParser:
    from bastion import __version__

    parser = _Parser(
        prog="bastion",
        description="Adversarial robustness of deep learning models: attack, evaluate, store and resume.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="run `bastion COMMAND --help` for the options and examples of each command",
    )
    parser.add_argument("--version", action="version", version=f"bastion {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    fmt = argparse.RawDescriptionHelpFormatter

    p = sub.add_parser("demo", help="train the zoo CNN on digits and evaluate FGSM and PGD", epilog=EPILOG_DEMO,
                       formatter_class=fmt)  # fmt: skip
    p.add_argument(
        "--out", default="bastion-demo", help="output folder for runs.db and the plot (default: %(default)s)"
    )
    p.add_argument("--eps", type=_parse_eps, default=[0.05, 0.1, 0.2, 0.3], help="l-inf radii, comma-separated")
    p.add_argument("--retrain", action="store_true", help="train again instead of using the cached model")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("evaluate", help="robust accuracy of a model under a cascade of attacks",
                       epilog=EPILOG_EVALUATE, formatter_class=fmt)  # fmt: skip
    p.add_argument("--model", required=True, help="model spec (see below)")
    p.add_argument("--data", required=True, help="data spec (see below)")
    p.add_argument("--norm", default="linf",
                   help="linf, l2, l1 or l0 (for l0, eps counts the input features that may change; default: "
                   "%(default)s)")  # fmt: skip
    p.add_argument("--eps", type=_parse_eps, required=True, help="radii, comma-separated, e.g. 0.1,0.2 or 8/255")
    p.add_argument(
        "--attack",
        default="pgd",
        help="attack or cascade, comma-separated (see `bastion attacks`); presets: standard (APGD-CE, APGD-T, "
        "FAB-T, Square), rapid (APGD-CE, APGD-T)",
    )
    p.add_argument("--attack-opt", action="append", default=[], metavar="KEY=VALUE",
                   help="attack hyperparameter, repeatable; ATTACK.KEY=VALUE for one attack only")  # fmt: skip
    p.add_argument("--store", default=None, help="SQLite store: results are written per batch and the run resumes")
    p.add_argument("--batch-size", type=_positive_int, default=256)
    p.add_argument("--limit", type=_positive_int, default=None, help="evaluate only the first N samples")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None, help="torch device for the model, e.g. cuda")
    p.add_argument("--plot", default=None, help="write a robust-accuracy-vs-eps figure here (e.g. plot.png)")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("runs", help="list the runs of a store, or show one", epilog=EPILOG_RUNS, formatter_class=fmt)
    p.add_argument("action", nargs="?", choices=["list", "show"], default="list")
    p.add_argument("run", nargs="?", default=None, help="run id or key (for show)")
    p.add_argument("--store", default="bastion-demo/runs.db", help="store path (default: %(default)s)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_runs)

    p = sub.add_parser(
        "attacks",
        help="list the attacks with their threat models, access and paper",
        epilog="examples:\n  bastion attacks\n  bastion attacks --json   # for scripts",
        formatter_class=fmt,
    )
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_attacks)

    p = sub.add_parser(
        "smooth",
        help="randomized smoothing: certified l2 radii (certify) or predictions that may abstain (predict)",
        epilog="Cohen, Rosenfeld & Kolter, ICML 2019. The Gaussian noise is added to inputs in [0, 1] (the model "
        "holds its normalisation).\nexamples:\n"
        "  bastion smooth certify --model zoo:cnn@digits-cnn.pt --data digits --sigma 0.25 --n 100000 --n0 100 "
        "--alpha 0.001 --store runs.db\n"
        "  bastion smooth predict --model model.pt --data test.npz --sigma 0.5 --n 1000 --json\n"
        "  bastion smooth certify --model model.pt --data digits --sigma 0.5 --n 10000 --radii 0,0.5,1,1.5 "
        "--plot cert.png",
        formatter_class=fmt,
    )
    p.add_argument("action", choices=["certify", "predict"], help="certify: class and radius; predict: class")
    p.add_argument("--model", required=True, help="model spec (as for `bastion evaluate`)")
    p.add_argument("--data", required=True, help="data spec (as for `bastion evaluate`)")
    p.add_argument("--sigma", type=float, required=True, help="standard deviation of the Gaussian noise")
    p.add_argument("--n", type=_positive_int, default=None,
                   help="noisy copies per input (certify: estimation copies; default 100000 for certify, 100 for "
                   "predict)")  # fmt: skip
    p.add_argument("--n0", type=_positive_int, default=100, help="selection copies per input (certify; default 100)")
    p.add_argument("--alpha", type=float, default=0.001, help="error probability (default: %(default)s)")
    p.add_argument("--radii", type=_parse_eps, default=[0.0, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 1.75, 2.0],
                   help="l2 radii of the certified-accuracy table, comma-separated")  # fmt: skip
    p.add_argument("--store", default=None, help="SQLite store: records are written as inputs finish; re-run resumes")
    p.add_argument("--batch-size", type=_positive_int, default=1000, help="noisy copies per forward pass")
    p.add_argument("--limit", type=_positive_int, default=None, help="use only the first N samples")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None, help="torch device for the model, e.g. cuda")
    p.add_argument("--plot", default=None, help="write the certified-accuracy-vs-radius figure here (certify)")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.set_defaults(func=cmd_smooth)

    p = sub.add_parser("train", help="adversarial training of a zoo architecture (checkpointed, resumable)",
                       epilog=EPILOG_TRAIN, formatter_class=fmt)  # fmt: skip
    p.add_argument("--objective", default="pgd-at", help="training objective (default: %(default)s; see below)")
    p.add_argument("--objective-opt", action="append", default=[], metavar="KEY=VALUE",
                   help="objective hyperparameter, repeatable (e.g. steps=10, beta=1.0)")  # fmt: skip
    p.add_argument("--eps", type=_parse_eps, default=[0.3], help="radius of the threat model (default: 0.3)")
    p.add_argument("--norm", default="linf", help="linf, l2 or l1 (default: %(default)s)")
    p.add_argument("--data", required=True, help="training data spec (as for `bastion evaluate`)")
    p.add_argument("--arch", default="cnn", choices=["mlp", "cnn", "resnet"], help="zoo architecture")
    p.add_argument("--epochs", type=_positive_int, default=10)
    p.add_argument("--batch-size", type=_positive_int, default=128)
    p.add_argument("--optimizer", default="adam", choices=["adam", "sgd"])
    p.add_argument("--lr", type=float, default=1e-3, help="(peak) learning rate (default: %(default)s)")
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--schedule", default=None, choices=["constant", "multistep", "cosine", "cyclic"],
                   help="learning-rate schedule (default: cyclic for fast-at, constant otherwise)")  # fmt: skip
    p.add_argument("--validation-fraction", type=float, default=0.0,
                   help="hold out this fraction for per-epoch clean and PGD validation")  # fmt: skip
    p.add_argument("--val-steps", type=_positive_int, default=10, help="PGD steps of the validation attack")
    p.add_argument("--restore-best", action="store_true",
                   help="end with the weights of the epoch of best validation robust accuracy (Rice et al. 2020)",
                   )  # fmt: skip
    p.add_argument("--out", required=True, help="where to save the trained model (save_model format)")
    p.add_argument("--checkpoint", default=None, help="checkpoint file (default: OUT.ckpt)")
    p.add_argument("--resume", action="store_true", help="continue from the checkpoint if it exists")
    p.add_argument("--store", default=None, help="SQLite store for the run and its per-epoch metrics")
    p.add_argument("--limit", type=_positive_int, default=None, help="train on the first N samples only")
    p.add_argument("--seed", type=int, default=0, help="seeds the initial weights, shuffling and random starts")
    p.add_argument("--device", default=None, help="torch device, e.g. cuda")
    p.add_argument("--json", action="store_true", help="print the summary and history as JSON")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("certify", help="certified robustness (and radius) of every sample with a bound method",
                       epilog=EPILOG_CERTIFY, formatter_class=fmt)  # fmt: skip
    p.add_argument("--model", required=True, help="model spec (as for `bastion evaluate`)")
    p.add_argument("--data", required=True, help="data spec (as for `bastion evaluate`)")
    p.add_argument("--norm", default="linf", help="linf, l2 or l1 (default: %(default)s)")
    p.add_argument("--eps", type=_parse_eps, required=True, help="radius, e.g. 0.1 or 8/255")
    p.add_argument("--method", default="crown",
                   help="ibp, crown, alpha-crown, deeppoly, deepz or symbolic (default: %(default)s)")  # fmt: skip
    _add_radius_flag(p)
    p.add_argument("--alpha-steps", type=_positive_int, default=20, help="alpha-CROWN optimisation steps")
    p.add_argument("--store", default=None, help="SQLite store: results are written per batch and the run resumes")
    p.add_argument("--batch-size", type=_positive_int, default=64)
    p.add_argument("--limit", type=_positive_int, default=None, help="certify only the first N samples")
    p.add_argument("--device", default=None, help="torch device for the model, e.g. cuda")
    p.add_argument("--json", action="store_true", help="print the summary and per-sample records as JSON")
    p.set_defaults(func=cmd_certify)

    p = sub.add_parser("assess", help="attack -> certify -> complete search: robust/falsified/unknown and brackets",
                       epilog=EPILOG_ASSESS, formatter_class=fmt)  # fmt: skip
    p.add_argument("--model", required=True, help="model spec (as for `bastion evaluate`)")
    p.add_argument("--data", required=True, help="data spec (as for `bastion evaluate`)")
    p.add_argument("--norm", default="linf", help="linf, l2 or l1 (default: %(default)s)")
    p.add_argument("--eps", type=_parse_eps, required=True, help="radius, e.g. 0.1 or 8/255")
    p.add_argument("--budget", type=float, default=10.0, help="seconds per sample for complete search (default 10)")
    p.add_argument("--attack", default="rapid", help="fixed-eps attack cascade or preset (default: %(default)s)")
    p.add_argument("--attack-opt", action="append", default=[], metavar="KEY=VALUE",
                   help="attack hyperparameter, repeatable; ATTACK.KEY=VALUE for one attack only")  # fmt: skip
    p.add_argument("--minimal-attack", default="fab", help="minimal-distortion attack for the found distance, or none")
    p.add_argument("--methods", default="ibp,crown,alpha-crown", help="incomplete verifiers in order (comma-separated)")
    p.add_argument("--alpha-steps", type=_positive_int, default=20, help="alpha-CROWN optimisation steps")
    p.add_argument("--no-complete", action="store_true", help="skip the complete search")
    _add_radius_flag(p)
    p.add_argument("--store", default=None, help="SQLite store: results are written per batch and the run resumes")
    p.add_argument("--batch-size", type=_positive_int, default=64)
    p.add_argument("--limit", type=_positive_int, default=None, help="assess only the first N samples")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None, help="torch device for the model, e.g. cuda")
    p.add_argument("--json", action="store_true", help="print the summary and per-sample records as JSON")
    p.set_defaults(func=cmd_assess)
    _add_vnncomp_parser(sub, fmt)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args))
    except BastionError as exc:
        print(f"bastion {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(
            f"bastion {args.command}: interrupted; re-run the same command to resume (with --store)",
            file=sys.stderr,
        )
        return 130


if __name__ == "__main__":
    sys.exit(main())
