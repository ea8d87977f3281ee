"""``bastion reprogram``, ``bastion explain``, ``bastion fingerprint``: the novel applications of adversarial machinery.

Each command is one call of :mod:`bastion.applications`; without ``--model`` they use the demo's digits CNN (trained
once and cached, as ``bastion demo`` does), so they run with no argument at all.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from bastion.cli.common import check_device, positive_int
from bastion.errors import BastionError

EPILOG_REPROGRAM = """\
Elsayed, Goodfellow & Sohl-Dickstein, ICLR 2019 (white-box: Adam on the program, lr 0.05, l2 penalty 0.01, decay
0.96 every 2 epochs); Tsai, Chen & Ho, ICML 2020 (BAR: zeroth-order gradient with q random directions, smoothing
beta, every query counted). The new task is a synthetic stroke task (bars, diagonals, squares, pluses) of
--task-size pixels embedded at the centre of the model's input; labels are mapped many-to-one.
examples:
  bastion reprogram                                   # the demo digits CNN, both methods, 4 stroke classes
  bastion reprogram --model zoo:mlp@digits-mlp.pt --method bar --q 10 --budget 200000 --json
  bastion reprogram --classes 3 --mapping block --baseline --store runs.db
"""

EPILOG_EXPLAIN = """\
Dhurandhar et al., NeurIPS 2018 (CEM): pertinent negatives (features to add that change the class) and pertinent
positives (a sparse part of the input that keeps it), by FISTA on an elastic-net objective; defaults kappa 0.1,
beta 0.1, gamma 100 (with --autoencoder), c 10 with 9 binary-search steps, 1000 iterations.
examples:
  bastion explain                                    # the demo digits CNN, the first 10 test digits
  bastion explain --model zoo:mlp@digits-mlp.pt --data digits --limit 5 --mode PN --steps 200 --json
  bastion explain --autoencoder --store runs.db
"""

EPILOG_FINGERPRINT = """\
IPGuard (Cao, Jia & Gong, AsiaCCS 2021): points near the source's decision boundary; conferrable adversarial examples
(Lukas, Zhang & Kerschbaum, ICLR 2021): examples that transfer to surrogates but not to references. A suspect whose
match rate is above the threshold is called a copy. Without --suspect, the usual suspects are built from the source
(copy, fine-tuned, pruned, distilled; independent models of the same and another architecture) and the ROC AUC of
the match rate over them is reported.
examples:
  bastion fingerprint                                 # the demo digits CNN, IPGuard, the built-in suspects
  bastion fingerprint --method conferrable --n 50 --json
  bastion fingerprint --model zoo:cnn@mine.pt --data digits --suspect theirs=zoo:cnn@theirs.pt \\
      --reference zoo:cnn@independent.pt
"""


def _source(args: argparse.Namespace) -> tuple[Any, Any, Any]:
    """The ``--model`` (or the demo CNN) and the digits train/test split (or ``--data`` split 80/20)."""
    from bastion.data import load_data
    from bastion.models import load_model

    device = check_device(args.device) if args.device else None
    if args.model is None and getattr(args, "data", None) in (None, "digits"):
        from bastion.cli.evaluate import demo_model

        model, train, test = demo_model(progress=not args.json, quiet=args.json)
    else:
        data = load_data(getattr(args, "data", None) or "digits")
        train, test = data.train_test_split(test_fraction=0.2, seed=0)
        if args.model is None:
            raise BastionError("--data other than digits needs --model (the demo model is trained on digits)")
        model = load_model(args.model, input_shape=data.feature_shape, num_classes=data.num_classes)
    if device is not None:
        model = model.to(device)
    return model, train, test


def _emit(result: Any, as_json: bool, extra: dict[str, Any] | None = None) -> None:
    if as_json:
        out = result.to_dict() if hasattr(result, "to_dict") else dict(result)
        out.update(extra or {})
        print(json.dumps(out, indent=2, default=str))
    else:
        print(result.table())
        for k, v in (extra or {}).items():
            print(f"{k}: {v}")


# --------------------------------------------------------------------------------------------------- reprogram
def cmd_reprogram(args: argparse.Namespace) -> int:
    """Reprogram the model for the stroke task, white-box and/or BAR: one ``fit`` call per method."""
    from bastion.applications import BAR, Program, WhiteBoxReprogramming, scratch_baseline, shapes_task
    from bastion.models import BlackBox

    model, _, _ = _source(args)
    spec = getattr(model, "bastion_spec", {}) or {}
    shape = tuple(spec.get("config", {}).get("input_shape", ())) or None
    if shape is None:
        if args.input_shape is None:
            raise BastionError("the model does not record its input shape; give --input-shape C,H,W")
        shape = tuple(args.input_shape)
    task = shapes_task(args.n, size=args.task_size, classes=args.classes, noise=args.noise, seed=args.seed)
    train, test = task.train_test_split(test_fraction=0.25, seed=args.seed)
    mapping: Any = "frequency" if args.mapping == "frequency" else None
    results: dict[str, Any] = {}
    common = {"epochs": args.epochs, "batch_size": args.batch_size, "lr": args.lr, "seed": args.seed,
              "progress": not args.json, "input_shape": shape}  # fmt: skip
    config = {"model_spec": args.model or "demo", "task": task.name}
    if args.method in ("white-box", "both"):
        wb = WhiteBoxReprogramming(**common)
        results["white-box"] = wb.fit(model, train, test, mapping=mapping, per_class=args.per_class,
                                      store=args.store, config=config)  # fmt: skip
    if args.method in ("bar", "both"):
        oracle = BlackBox(model, returns="logits", budget=args.budget)
        bar = BAR(q=args.q, beta=args.beta, **common)
        results["bar"] = bar.fit(oracle, train, test, mapping=mapping, per_class=args.per_class, store=args.store,
                                 config=config)  # fmt: skip
    baseline = None
    if args.baseline:
        arch = str(spec.get("arch", "cnn"))
        kwargs = {k: v for k, v in spec.get("config", {}).items() if k not in ("input_shape", "num_classes")}
        baseline = scratch_baseline(arch, Program(shape, task.feature_shape), train, test, epochs=args.epochs,
                                    seed=args.seed, **kwargs)  # fmt: skip
    if args.json:
        out = {k: r.to_dict() for k, r in results.items()}
        out["scratch_baseline_accuracy"] = baseline
        out["task"] = {"name": task.name, "classes": task.num_classes, "train": len(train), "test": len(test)}
        print(json.dumps(out, indent=2))
        return 0
    print(f"new task: {task.name}, {task.num_classes} classes, {len(train)} training / {len(test)} test images")
    for r in results.values():
        print(r.table())
    if baseline is not None:
        print(f"trained-from-scratch baseline (same architecture, same pixels): {100 * baseline:.2f} %")
    return 0


# --------------------------------------------------------------------------------------------------- explain
def cmd_explain(args: argparse.Namespace) -> int:
    """Contrastive explanations of the first ``--limit`` test inputs: one ``CEM.explain`` call."""
    from bastion.applications import CEM, autoencoder_from_vae

    model, train, test = _source(args)
    data = test.subset(slice(0, args.limit))
    ae = None
    if args.autoencoder:
        from bastion.reliability.vae import train_vae

        ae = autoencoder_from_vae(train_vae(train, epochs=args.ae_epochs, seed=args.seed, progress=not args.json))
    cem = CEM(mode=args.mode, kappa=args.kappa, beta=args.beta, gamma=args.gamma, c_init=args.c_init,
              c_steps=args.c_steps, steps=args.steps, lr=args.lr, autoencoder=ae)  # fmt: skip
    result = cem.explain(model, data, batch_size=args.batch_size, store=args.store, progress=not args.json,
                         config={"model_spec": args.model or "demo", "data_spec": args.data or "digits"})  # fmt: skip
    _emit(result, args.json)
    return 0


# --------------------------------------------------------------------------------------------------- fingerprint
def _named_specs(items: list[str], flag: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for i, item in enumerate(items):
        name, sep, spec = item.partition("=")
        if not sep:
            name, spec = f"suspect-{i}", item
        if not name or not spec:
            raise BastionError(f"{flag} {item!r}: expected NAME=MODEL_SPEC or MODEL_SPEC")
        if name in out:
            raise BastionError(f"{flag}: the name {name!r} is given twice")
        out[name] = spec
    return out


def cmd_fingerprint(args: argparse.Namespace) -> int:
    """Generate a fingerprint of the model and verify the suspects against it."""
    from bastion.applications import Conferrable, IPGuard, suspect_models, verify
    from bastion.models import load_model

    model, train, test = _source(args)
    shape, k = train.feature_shape, train.num_classes
    roles: dict[str, bool] | None = None
    if args.suspect:
        suspects = {n: load_model(s, input_shape=shape, num_classes=k) for n, s in
                    _named_specs(args.suspect, "--suspect").items()}  # fmt: skip
    else:
        suspects, roles = suspect_models(model, train, other_arch=args.other_arch, n_independent=args.independent,
                                         epochs=args.epochs, seed=args.seed)  # fmt: skip
    references = [load_model(s, input_shape=shape, num_classes=k) for s in args.reference]
    gen: Any
    if args.method == "ipguard":
        gen = IPGuard(n=args.n, k=args.k, steps=args.steps, lr=args.lr, seed=args.seed)
        fp = gen.generate(model, test)
    else:
        gen = Conferrable(n=args.n, eps=args.eps, steps=args.steps if args.steps_given else 100, epochs=args.epochs,
                          seed=args.seed)  # fmt: skip
        fp = gen.generate(model, test, train=train)
    result = verify(fp, suspects, roles=roles, references=references, threshold=args.threshold, store=args.store,
                    source=model, progress=not args.json,
                    config={"model_spec": args.model or "demo", "generator": repr(gen)})  # fmt: skip
    _emit(result, args.json, {"generator": repr(gen), "generation_seconds": round(fp.seconds, 3)})
    return 0


# --------------------------------------------------------------------------------------------------- parsers
def _shape_arg(text: str) -> tuple[int, ...]:
    try:
        dims = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected C,H,W such as 1,28,28, got {text!r}") from None
    if len(dims) != 3 or min(dims) < 1:
        raise argparse.ArgumentTypeError(f"expected three positive ints C,H,W, got {text!r}")
    return dims


class _StepsGiven(argparse.Action):
    def __call__(self, parser: Any, namespace: Any, values: Any, option_string: Any = None) -> None:
        setattr(namespace, self.dest, values)
        namespace.steps_given = True


def _common(p: argparse.ArgumentParser, *, data: bool = True) -> None:
    p.add_argument("--model", default=None, help="the source model spec (default: the demo digits CNN)")
    if data:
        p.add_argument("--data", default=None, help="data spec of the model's task (default: digits)")
    p.add_argument("--seed", type=int, default=0, help="seed of every random choice (default: %(default)s)")
    p.add_argument("--device", default=None, help="torch device, e.g. cuda")
    p.add_argument("--store", default=None, help="SQLite result store; records are written as they finish")
    p.add_argument("--json", action="store_true", help="print the result as JSON")


def add_parsers(sub: Any, fmt: Any) -> None:
    """Register ``reprogram``, ``explain`` and ``fingerprint`` on the ``bastion`` sub-parser ``sub``."""
    p = sub.add_parser("reprogram", help="repurpose a trained classifier for a new task (white-box and BAR)",
                       epilog=EPILOG_REPROGRAM, formatter_class=fmt)  # fmt: skip
    _common(p, data=False)
    p.add_argument("--method", choices=["white-box", "bar", "both"], default="both", help="(default: %(default)s)")
    p.add_argument("--input-shape", type=_shape_arg, default=None, help="model input C,H,W if the model lacks it")
    p.add_argument("--task-size", type=positive_int, default=4, help="side of the new task's images (default: 4)")
    p.add_argument("--classes", type=positive_int, default=4, help="classes of the new task, 2..6 (default: 4)")
    p.add_argument("--n", type=positive_int, default=1200, help="images of the new task (default: %(default)s)")
    p.add_argument("--noise", type=float, default=0.05, help="salt-noise probability (default: %(default)s)")
    p.add_argument(
        "--mapping",
        choices=["frequency", "block"],
        default="frequency",
        help="label mapping: greedy on the source's answers, or consecutive blocks (default: %(default)s)",
    )
    p.add_argument("--per-class", type=positive_int, default=None, help="source classes per new class")
    p.add_argument("--epochs", type=positive_int, default=30, help="training epochs (default: %(default)s)")
    p.add_argument("--batch-size", type=positive_int, default=50, help="(default: %(default)s)")
    p.add_argument("--lr", type=float, default=0.05, help="Adam learning rate (default: %(default)s)")
    p.add_argument("--q", type=positive_int, default=25, help="BAR: random directions per step (default: 25)")
    p.add_argument("--beta", type=float, default=0.01, help="BAR: smoothing parameter (default: %(default)s)")
    p.add_argument("--budget", type=positive_int, default=None, help="BAR: the oracle's total query budget")
    p.add_argument("--baseline", action="store_true", help="also train the same architecture from scratch")
    p.set_defaults(func=cmd_reprogram)

    p = sub.add_parser("explain", help="contrastive explanations (CEM): pertinent negatives and positives",
                       epilog=EPILOG_EXPLAIN, formatter_class=fmt)  # fmt: skip
    _common(p)
    p.add_argument("--limit", type=positive_int, default=10, help="explain the first N test inputs (default: 10)")
    p.add_argument("--mode", choices=["PN", "PP", "both"], default="both", help="(default: %(default)s)")
    p.add_argument("--kappa", type=float, default=0.1, help="confidence margin (default: %(default)s)")
    p.add_argument("--beta", type=float, default=0.1, help="l1 weight and threshold (default: %(default)s)")
    p.add_argument("--gamma", type=float, default=100.0, help="autoencoder weight (default: %(default)s)")
    p.add_argument("--c-init", type=float, default=10.0, help="initial constant c (default: %(default)s)")
    p.add_argument("--c-steps", type=positive_int, default=9, help="binary-search steps over c (default: 9)")
    p.add_argument("--steps", type=positive_int, default=1000, help="FISTA iterations per c (default: 1000)")
    p.add_argument("--lr", type=float, default=0.01, help="initial FISTA step (default: %(default)s)")
    p.add_argument("--batch-size", type=positive_int, default=128, help="(default: %(default)s)")
    p.add_argument("--autoencoder", action="store_true", help="train a small VAE on the data for the AE term")
    p.add_argument("--ae-epochs", type=positive_int, default=30, help="VAE training epochs (default: 30)")
    p.set_defaults(func=cmd_explain)

    p = sub.add_parser("fingerprint", help="fingerprint a model and verify suspects (IPGuard, conferrable AEs)",
                       epilog=EPILOG_FINGERPRINT, formatter_class=fmt)  # fmt: skip
    _common(p)
    p.add_argument("--method", choices=["ipguard", "conferrable"], default="ipguard", help="(default: %(default)s)")
    p.add_argument(
        "--suspect",
        action="append",
        default=[],
        metavar="NAME=SPEC",
        help="a suspect model, repeatable (default: the built-in suspects derived from the source)",
    )
    p.add_argument(
        "--reference",
        action="append",
        default=[],
        metavar="SPEC",
        help="an independent model that calibrates the threshold, repeatable",
    )
    p.add_argument("--threshold", type=float, default=None, help="fixed decision threshold on the match rate")
    p.add_argument("--n", type=positive_int, default=100, help="fingerprint points (default: %(default)s)")
    p.add_argument("--k", type=float, default=0.5, help="IPGuard: the margin k (default: %(default)s)")
    p.add_argument("--eps", type=float, default=0.25, help="conferrable: l-inf radius (default: %(default)s)")
    p.add_argument(
        "--steps",
        type=positive_int,
        default=1000,
        action=_StepsGiven,
        help="optimisation steps (default: 1000 for IPGuard, 100 for conferrable)",
    )
    p.add_argument("--lr", type=float, default=0.01, help="IPGuard: Adam learning rate (default: %(default)s)")
    p.add_argument(
        "--epochs",
        type=positive_int,
        default=10,
        help="training epochs of the built-in suspects and the conferrable ensembles (default: 10)",
    )
    p.add_argument(
        "--independent",
        type=positive_int,
        default=2,
        help="independent models per architecture among the built-in suspects (default: 2)",
    )
    p.add_argument("--other-arch", default="mlp", help="architecture of the other independent suspects (mlp)")
    p.set_defaults(func=cmd_fingerprint, steps_given=False)
