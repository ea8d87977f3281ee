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
    from bastion.data import load_data
    from bastion.evaluate import evaluate
    from bastion.models import load_model
    from bastion.threat import LpBall

    plot = _check_plot_path(args.plot) if args.plot else None
    device = _check_device(args.device) if args.device else None
    data = load_data(args.data)
    if args.limit is not None:
        data = data.subset(slice(0, args.limit))
    model = load_model(args.model, input_shape=data.feature_shape, num_classes=data.num_classes)
    if device is not None:
        model = model.to(device)
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
    p.add_argument("--norm", default="linf", help="linf, l2 or l1 (default: %(default)s)")
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
