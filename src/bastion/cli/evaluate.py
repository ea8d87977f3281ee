"""``bastion demo``, ``evaluate``, ``runs`` and ``attacks``: the attack side and the store."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from bastion.cli.common import (
    add_ray_flags,
    build_attacks,
    check_plot_path,
    model_and_data,
    parse_eps,
    parse_opts,
    positive_int,
    print_result,
    ray_options,
)
from bastion.errors import BastionError

EPILOG_EVALUATE = """\
examples:
  bastion evaluate --model zoo:cnn@digits-cnn.pt --data digits --eps 0.1,0.2,0.3 --attack fgsm,pgd
  bastion evaluate --model model.pt2 --data mnist:~/data/mnist --norm l2 --eps 1,2 --attack pgd \\
      --attack-opt steps=100 --attack-opt restarts=5 --store runs.db
  bastion evaluate --model mypkg.models:robust_net --data test.npz --eps 8/255 --attack standard --json
  bastion evaluate --model model.pt2 --data mnist:~/data/mnist --eps 0.1 --attack fast
  bastion evaluate --model model.pt2 --data cifar10:~/data --eps 8/255 --attack rapid --attack-opt apgd.steps=50
  bastion evaluate --model net.onnx --data digits --eps 0.2 --black-box scores --query-budget 1000 --attack simba,square
  bastion evaluate --model target.pt --data digits --eps 0.2 --black-box labels --surrogate copy.pt --attack mi-fgsm
  bastion evaluate --model zoo:cnn@mnist-cnn.pt --data mnist:~/data/mnist --eps 0.1,0.3 --attack pgd --ray auto \\
      --store runs.db   # shards of whole batches over a Ray cluster (pip install 'bastion[ray]'); resumable

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


def cmd_evaluate(args: argparse.Namespace) -> int:
    from bastion.evaluate import evaluate
    from bastion.threat import FlowThreat, LpBall

    plot = check_plot_path(args.plot) if args.plot else None
    plot_queries = check_plot_path(args.plot_queries) if args.plot_queries else None
    norm, radii = _threat_spec(args)
    ray_opts: dict[str, Any] | None = None
    model: Any
    if args.ray or args.shards is not None:
        from bastion.data import load_data

        ray_opts = ray_options(args)
        if args.black_box is not None or args.surrogate or args.eot or args.bpda:
            raise BastionError("--black-box, --surrogate, --eot and --bpda run in one process: leave out --ray")
        model = args.model  # a spec: every Ray worker loads it
        data = load_data(args.data)
        if args.limit is not None:
            data = data.subset(slice(0, args.limit))
    else:
        model, data = model_and_data(args)
    threats = [FlowThreat(e) if norm == "flow" else LpBall(norm, e) for e in radii]
    attacks = build_attacks(args.attack, parse_opts(args.attack_opt), norm)
    model = _wrapped(model, args)
    if args.surrogate:
        from bastion.attacks import Transferred
        from bastion.models import load_model, model_device

        surrogates = [
            load_model(spec, input_shape=data.feature_shape, num_classes=data.num_classes).to(model_device(model))
            for spec in args.surrogate
        ]
        # gradient attacks are crafted on the surrogates and judged on the model; the others query the model
        attacks = [
            Transferred(a, surrogates) if a.access in ("white-box", "transfer") and not a.minimal else a
            for a in attacks
        ]
    if args.black_box is not None:
        model = _black_box(model, data.num_classes, args)
    elif args.query_budget is not None or args.total_query_budget is not None:
        raise BastionError("--query-budget and --total-query-budget need --black-box scores|labels")
    kwargs: dict[str, Any] = dict(
        batch_size=args.batch_size, store=args.store, seed=args.seed, progress=not args.json,
        config={"model_spec": args.model, "data_spec": args.data},
    )  # fmt: skip
    if ray_opts is not None:
        from bastion.scale import ray_evaluate

        result = ray_evaluate(model, data, threats, attacks, **ray_opts, **kwargs)
    else:
        result = evaluate(model, data, threats, attacks, **kwargs)
    print_result(result, args.json)
    if plot is not None:
        from bastion.report import plot_robust_accuracy

        plot_robust_accuracy(result, plot, title=f"{args.model} on {data.name}")
    if plot_queries is not None:
        from bastion.report import plot_success_vs_queries

        plot_success_vs_queries(result, plot_queries, title=f"{args.model} on {data.name}")
    return 0


def _threat_spec(args: argparse.Namespace) -> tuple[str, list[float]]:
    """The norm and radii of the threat models: ``--threat NORM:EPS[,EPS...]`` or ``--norm`` with ``--eps``."""
    if args.threat is not None:
        if args.eps is not None:
            raise BastionError("give --threat NORM:EPS or --norm/--eps, not both")
        norm, sep, radii = args.threat.partition(":")
        if not sep or not radii:
            raise BastionError(f"--threat {args.threat!r}: expected NORM:EPS[,EPS...], e.g. flow:0.5 or linf:0.1,0.3")
        return norm.strip().lower(), parse_eps(radii)
    if args.eps is None:
        raise BastionError("give the radii with --eps (and --norm), or --threat NORM:EPS (e.g. flow:0.5)")
    return args.norm.strip().lower(), args.eps


def _wrapped(model: Any, args: argparse.Namespace) -> Any:
    """``--bpda`` and ``--eot``: the model seen through BPDA of a preprocessing function and/or EOT's average."""
    if not (args.eot or args.bpda) or isinstance(model, str):
        return model
    from bastion.attacks import BPDA, EOT
    from bastion.models import load_callable

    if args.bpda:
        model = BPDA(model, load_callable(args.bpda))
    if args.eot:
        model = EOT(model, samples=args.eot)
    return model


def _black_box(model: Any, num_classes: int, args: argparse.Namespace) -> Any:
    """The model seen through a :class:`~bastion.models.oracle.BlackBox`: scores or labels, with the budgets."""
    import torch

    from bastion.models import BlackBox, model_fingerprint

    budgets = {"budget": args.total_query_budget, "sample_budget": args.query_budget}
    if args.black_box == "scores":
        return BlackBox(model, returns="logits", num_classes=num_classes, **budgets)

    def labels(x: Any) -> Any:
        with torch.no_grad():
            return model(x).argmax(dim=1)

    return BlackBox(labels, returns="labels", num_classes=num_classes, fingerprint=model_fingerprint(model), **budgets)


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
    print_result(result, args.json)
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
         "minimal": cls.minimal, "paper": cls.paper, "run": "bastion evaluate --attack " + name}
        for name, cls in sorted(ATTACKS.items())
    ]  # fmt: skip
    rows += [dict(zip(("name", "class", "norms", "access", "minimal", "paper", "run"), r)) for r in OTHER_ATTACKS]
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    width = max((len(str(r["name"])) for r in rows), default=8)
    for r in rows:
        kind = "minimal-distortion" if r["minimal"] else "fixed-eps"
        print(f"{r['name']:<{width}} {r['norms']:<16} {r['access']:<10} {kind:<18} {r['paper']}")
        if not str(r["run"]).startswith("bastion evaluate --attack"):
            print(f"{'':<{width}}   run: {r['run']}")
    return 0


#: What ``bastion attacks`` lists besides the per-sample attacks of the registry: the data-level attacks, the model
#: wrappers and the other modalities' attacks, as (name, class, norms, access, minimal, paper, how to run it).
OTHER_ATTACKS: list[tuple[str, str, str, str, bool, str, str]] = [
    ("uap", "UniversalPerturbation", "linf/l2", "data-level", False,
     "Moosavi-Dezfooli et al., CVPR 2017", "bastion universal --method uap --xi XI"),
    ("guap", "GeneralizedUniversalPerturbation", "flow+linf", "data-level", False,
     "Zhang et al., ICDM 2020", "bastion universal --method guap --eps E --tau T"),
    ("patch", "AdversarialPatch", "patch", "data-level", False,
     "Brown et al. 2017", "bastion patch --target CLASS"),
    ("eot", "EOT", "any", "wrapper", False,
     "Athalye et al., ICML 2018 (expectation over transformation)", "bastion evaluate --eot N --attack ..."),
    ("bpda", "BPDA", "any", "wrapper", False,
     "Athalye et al., ICML 2018 (backward-pass differentiable approximation)",
     "bastion evaluate --bpda MODULE:FUNCTION --attack ..."),
    ("textfooler", "TextFooler", "words", "score", False, "Jin et al., AAAI 2020",
     "bastion text attack --attack textfooler"),
    ("hotflip", "HotFlip", "words", "white-box", False, "Ebrahimi et al., ACL 2018",
     "bastion text attack --attack hotflip"),
    ("deepwordbug", "DeepWordBug", "chars", "score", False, "Gao et al., 2018",
     "bastion text attack --attack deepwordbug"),
    ("textbugger", "TextBugger", "words/chars", "white-box", False, "Li et al., NDSS 2019",
     "bastion text attack --attack textbugger"),
    ("pointcw", "PointCW", "l2/chamfer/hausdorff", "white-box", True, "Xiang, Qi & Li, CVPR 2019",
     "bastion pointcloud attack --attack cw"),
    ("pointadd", "PointAdd", "points added", "white-box", True, "Xiang, Qi & Li, CVPR 2019",
     "bastion pointcloud attack --attack add"),
    ("saliencydrop", "SaliencyDrop", "points dropped", "white-box", False, "Zheng et al., ICCV 2019",
     "bastion pointcloud attack --attack drop"),
    ("waveformpgd", "WaveformPGD", "dB linf", "white-box", False, "Madry et al., ICLR 2018 on waveforms",
     "bastion audio attack --attack pgd"),
    ("audiocw", "AudioCW", "dB linf", "white-box", True, "Carlini & Wagner, 2018 (audio)",
     "bastion audio attack --attack cw"),
]  # fmt: skip


def add_parsers(sub: Any, fmt: Any) -> None:
    """Register this module's commands on the ``bastion`` sub-parser ``sub``."""
    p = sub.add_parser("demo", help="train the zoo CNN on digits and evaluate FGSM and PGD", epilog=EPILOG_DEMO,
                       formatter_class=fmt)  # fmt: skip
    p.add_argument(
        "--out", default="bastion-demo", help="output folder for runs.db and the plot (default: %(default)s)"
    )
    p.add_argument("--eps", type=parse_eps, default=[0.05, 0.1, 0.2, 0.3], help="l-inf radii, comma-separated")
    p.add_argument("--retrain", action="store_true", help="train again instead of using the cached model")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.set_defaults(func=cmd_demo)
    p = sub.add_parser("evaluate", help="robust accuracy of a model under a cascade of attacks",
                       epilog=EPILOG_EVALUATE, formatter_class=fmt)  # fmt: skip
    p.add_argument("--model", required=True, help="model spec (see below)")
    p.add_argument("--data", required=True, help="data spec (see below)")
    p.add_argument("--norm", default="linf",
                   help="linf, l2, l1, l0 (eps counts the input features that may change) or flow (the spatial "
                   "threat: eps is the most pixels any pixel moves); default: %(default)s")  # fmt: skip
    p.add_argument("--eps", type=parse_eps, default=None, help="radii, comma-separated, e.g. 0.1,0.2 or 8/255")
    p.add_argument(
        "--threat",
        default=None,
        metavar="NORM:EPS",
        help="norm and radii in one, e.g. flow:0.5 or linf:0.1,0.3 (instead of --norm/--eps)",
    )
    p.add_argument(
        "--eot",
        type=positive_int,
        default=None,
        metavar="N",
        help="attack the average of N forward passes of a randomised model (EOT, Athalye et al. 2018)",
    )
    p.add_argument("--bpda", default=None, metavar="MODULE:FUNCTION",
                   help="the model's input goes through FUNCTION (a non-differentiable preprocessing); attack "
                   "it with BPDA's straight-through gradient (Athalye et al. 2018)")  # fmt: skip
    p.add_argument(
        "--attack",
        default="pgd",
        help="attack or cascade, comma-separated (see `bastion attacks`); presets: standard (APGD-CE, APGD-T, "
        "FAB-T, Square at AutoAttack's paper budget, at most 9,719 forward-equivalent passes per sample on 10 "
        "classes), fast (the same at torchattacks' default budget: 10 iterations, Square 5000; at most 5,489), "
        "rapid (APGD-CE, APGD-T; at most 2,015). The summary prints the passes spent",
    )
    p.add_argument("--attack-opt", action="append", default=[], metavar="KEY=VALUE",
                   help="attack hyperparameter, repeatable; ATTACK.KEY=VALUE for one attack only")  # fmt: skip
    p.add_argument("--store", default=None, help="SQLite store: results are written per batch and the run resumes")
    p.add_argument("--batch-size", type=positive_int, default=256)
    p.add_argument("--limit", type=positive_int, default=None, help="evaluate only the first N samples")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None, help="torch device for the model, e.g. cuda")
    p.add_argument("--plot", default=None, help="write a robust-accuracy-vs-eps figure here (e.g. plot.png)")
    p.add_argument(
        "--black-box",
        default=None,
        choices=["scores", "labels"],
        help="see the model only through its scores or its labels (score / decision-based attacks)",
    )
    p.add_argument(
        "--query-budget",
        type=positive_int,
        default=None,
        help="with --black-box: the most queries one attack may spend on one sample",
    )
    p.add_argument(
        "--total-query-budget",
        type=positive_int,
        default=None,
        help="with --black-box: the most queries of the whole evaluation",
    )
    p.add_argument(
        "--surrogate",
        action="append",
        default=[],
        metavar="MODEL",
        help="craft the gradient attacks on this model (repeat for an ensemble) and judge them on --model",
    )
    p.add_argument("--plot-queries", default=None, help="write a success-rate-vs-queries figure here")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    add_ray_flags(p, "batch")
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
