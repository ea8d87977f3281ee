"""``bastion universal`` and ``bastion patch``: data-level attacks that learn one perturbation for a whole data set.

Both learn on a training part of ``--data`` and report the fooling (or patch success) rate on the held-out rest, the
figure the papers report. The perturbation is written to ``--out`` (an ``.npz`` with the arrays and a JSON config),
and with ``--store`` the run and its rates are kept in the store under the kind ``universal`` / ``patch``.
"""

from __future__ import annotations

import argparse
import inspect
import json
import time
from pathlib import Path
from typing import Any

from bastion.cli.common import model_and_data, parse_opts, positive_int
from bastion.errors import BastionError

EPILOG_UNIVERSAL = """\
examples:
  bastion universal --model zoo:cnn@digits-cnn.pt --data digits --xi 0.2 --out uap.npz
  bastion universal --model zoo:cnn@digits-cnn.pt --data digits --norm l2 --xi 2.0 --opt max_passes=5 --json
  bastion universal --method guap --model zoo:cnn@digits-cnn.pt --data digits --eps 0.03 --tau 0.1 --out guap.npz

methods:
  uap   Moosavi-Dezfooli et al., CVPR 2017: DeepFool-driven universal perturbation, ||v||_p <= --xi (linf or l2);
        options (--opt KEY=VALUE): delta=0.2, max_passes=10, overshoot=0.02, deepfool_steps=10, batch_size=64
  guap  Zhang et al., ICDM 2020: one universal flow (||f||_T <= --tau) and additive perturbation (linf <= --eps);
        options: epochs=20, lr=0.01, beta1=0.5, batch_size=100
The fooling rate is the fraction of held-out points (--test-fraction of --data) whose prediction changes.
"""

EPILOG_PATCH = """\
examples:
  bastion patch --model zoo:cnn@digits-cnn.pt --data digits --target 0 --out patch.npz
  bastion patch --model zoo:cnn@digits-cnn.pt --data digits --target 3 --opt size=4 --opt epochs=10 --json

Brown et al. 2017 (adversarial patch with expectation over transformation). Options (--opt KEY=VALUE): size=8,
scale=(0.7,1.2), max_rotation=22.5, epochs=5, lr=0.05, batch_size=128. The success rate is the fraction of held-out
images, correctly classified and not of the target class, that the patch at fresh random placements sends to --target.
"""


def _options(cls: type, items: list[str], fixed: dict[str, Any]) -> dict[str, Any]:
    """``--opt KEY=VALUE`` pairs checked against ``cls``'s constructor (unknown keys refused in one line)."""
    accepted = set(inspect.signature(cls).parameters) - set(fixed)
    options = dict(fixed)
    for target, key, value in parse_opts(items, "--opt"):
        if target is not None or key not in accepted:
            raise BastionError(f"--opt {key}: {cls.__name__} has no option {key!r}; it takes {sorted(accepted)}")
        options[key] = value
    return options


def _split(data: Any, fraction: float, seed: int) -> tuple[Any, Any]:
    if not 0 < fraction < 1:
        raise BastionError(f"--test-fraction must be in (0, 1), got {fraction}")
    return data.train_test_split(test_fraction=fraction, seed=seed)


def _out_path(out: str | None) -> Path | None:
    if out is None:
        return None
    path = Path(out).expanduser()
    if not path.resolve().parent.is_dir():
        raise BastionError(f"--out {out!r}: the folder {path.resolve().parent} does not exist")
    return path


def _record(args: argparse.Namespace, kind: str, model: Any, data: Any, summary: dict[str, Any]) -> int | None:
    """Keep the run and its summary in ``--store``; the run's id (None without a store)."""
    if args.store is None:
        return None
    from bastion.models.checks import model_fingerprint
    from bastion.store import Store, run_key

    payload = {k: v for k, v in summary.items() if k in ("method", "config", "seed", "test_fraction")}
    model_fp, data_fp = model_fingerprint(model), data.fingerprint()
    with Store(args.store) as db:
        run, _ = db.open_run(
            kind=kind, key=run_key({"kind": kind, "model": model_fp, "data": data_fp, **payload}),
            config={**payload, "model_spec": args.model, "data_spec": args.data}, model_fp=model_fp,
            data_fp=data_fp, n_samples=len(data),
        )  # fmt: skip
        db.finish_run(run.id, summary)
    return run.id


def _report(args: argparse.Namespace, summary: dict[str, Any], rows: list[tuple[str, str]]) -> None:
    if args.json:
        print(json.dumps(summary, indent=2))
        return
    width = max(len(name) for name, _ in rows)
    for name, value in rows:
        print(f"{name:<{width}}  {value}")


def cmd_universal(args: argparse.Namespace) -> int:
    """``bastion universal``: one UAP or GUAP fit on the training part, its fooling rate on the held-out part."""
    import numpy as np

    from bastion.attacks.universal import GeneralizedUniversalPerturbation, UniversalPerturbation

    out = _out_path(args.out)
    model, data = model_and_data(args)
    train, test = _split(data, args.test_fraction, args.seed)
    started = time.perf_counter()
    arrays: dict[str, Any]
    extra: dict[str, Any]
    if args.method == "uap":
        if args.xi is None:
            raise BastionError("--xi is required for --method uap (the budget of ||v||_p)")
        options = _options(UniversalPerturbation, args.opt, {"norm": args.norm, "xi": args.xi})
        uap = UniversalPerturbation(**options)
        result = uap.fit(model, train, seed=args.seed, progress=not args.json)
        held_out = uap.fooling_rate(model, test, result.perturbation)
        arrays = {"perturbation": result.perturbation.cpu().numpy()}
        extra = {"passes": result.passes}
    else:
        options = _options(GeneralizedUniversalPerturbation, args.opt, {"eps": args.eps, "tau": args.tau})
        guap = GeneralizedUniversalPerturbation(**options)
        gresult = guap.fit(model, train, seed=args.seed, progress=not args.json)
        held_out = guap.fooling_rate(model, test, gresult.flow, gresult.perturbation)
        arrays = {"perturbation": gresult.perturbation.cpu().numpy(), "flow": gresult.flow.cpu().numpy()}
        extra = {"epochs": gresult.epochs, "max_displacement": gresult.max_displacement}
        result = gresult  # type: ignore[assignment]
    seconds = time.perf_counter() - started
    summary: dict[str, Any] = {
        "method": args.method, "config": json.loads(json.dumps(options, default=str)), "seed": args.seed,
        "test_fraction": args.test_fraction, "n_train": len(train), "n_test": len(test),
        "train_fooling_rate": result.fooling_rate, "test_fooling_rate": held_out, "history": result.history,
        "seconds": seconds, **extra,
    }  # fmt: skip
    if out is not None:
        np.savez(out, **arrays, config=json.dumps(summary))
        summary["out"] = str(out)
    summary["run_id"] = _record(args, "universal", model, data, summary)
    rows = [
        ("method", f"{args.method} {summary['config']}"),
        ("train fooling rate", f"{result.fooling_rate:.4f} ({len(train)} points)"),
        ("held-out fooling rate", f"{held_out:.4f} ({len(test)} points)"),
        ("seconds", f"{seconds:.1f}"),
    ]
    if out is not None:
        rows.append(("perturbation", str(out)))
    _report(args, summary, rows)
    return 0


def cmd_patch(args: argparse.Namespace) -> int:
    """``bastion patch``: a targeted adversarial patch trained on the training part, its held-out success rate."""
    import numpy as np

    from bastion.attacks.patch import AdversarialPatch

    out = _out_path(args.out)
    model, data = model_and_data(args)
    if not 0 <= args.target < data.num_classes:
        raise BastionError(f"--target must be a class in [0, {data.num_classes}), got {args.target}")
    train, test = _split(data, args.test_fraction, args.seed)
    options = _options(AdversarialPatch, args.opt, {})
    attack = AdversarialPatch(**options)
    started = time.perf_counter()
    result = attack.fit(model, train, args.target, seed=args.seed, progress=not args.json)
    held_out = attack.success_rate(model, test, result.patch, args.target, seed=args.seed)
    seconds = time.perf_counter() - started
    summary: dict[str, Any] = {
        "method": "patch", "config": json.loads(json.dumps({**options, "target": args.target}, default=str)),
        "seed": args.seed, "test_fraction": args.test_fraction, "n_train": len(train), "n_test": len(test),
        "train_success": result.train_success, "test_success": held_out, "losses": result.losses,
        "seconds": seconds,
    }  # fmt: skip
    if out is not None:
        np.savez(out, patch=result.patch.cpu().numpy(), config=json.dumps(summary))
        summary["out"] = str(out)
    summary["run_id"] = _record(args, "patch", model, data, summary)
    rows = [
        ("target", str(args.target)),
        ("train success", f"{result.train_success:.4f}"),
        ("held-out success", f"{held_out:.4f} ({len(test)} images)"),
        ("seconds", f"{seconds:.1f}"),
    ]
    if out is not None:
        rows.append(("patch", str(out)))
    _report(args, summary, rows)
    return 0


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="model spec (as for `bastion evaluate`)")
    p.add_argument("--data", required=True, help="data spec; split into a training and a held-out part")
    p.add_argument("--test-fraction", type=float, default=0.2, help="held-out fraction (default: %(default)s)")
    p.add_argument("--opt", action="append", default=[], metavar="KEY=VALUE", help="attack hyperparameter")
    p.add_argument("--out", default=None, help="write the perturbation as .npz")
    p.add_argument("--store", default=None, help="SQLite store for the run and its rates")
    p.add_argument("--limit", type=positive_int, default=None, help="use the first N samples of --data only")
    p.add_argument("--seed", type=int, default=0, help="seeds the split and the attack (default: 0)")
    p.add_argument("--device", default=None, help="torch device, e.g. cuda")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")


def add_parsers(sub: Any, fmt: Any) -> None:
    p = sub.add_parser(
        "universal", help="learn a universal adversarial perturbation (UAP, GUAP) and its fooling rate",
        epilog=EPILOG_UNIVERSAL, formatter_class=fmt,
    )  # fmt: skip
    p.add_argument("--method", default="uap", choices=["uap", "guap"], help="(default: %(default)s)")
    p.add_argument("--norm", default="linf", help="uap: linf or l2 (default: %(default)s)")
    p.add_argument("--xi", type=float, default=None, help="uap: the budget of ||v||_p (required for uap)")
    p.add_argument("--eps", type=float, default=0.03, help="guap: linf budget of the additive part (0.03)")
    p.add_argument("--tau", type=float, default=0.1, help="guap: budget of the flow (0.1)")
    _common(p)
    p.set_defaults(func=cmd_universal)

    p = sub.add_parser(
        "patch", help="train a targeted adversarial patch (Brown et al. 2017) and its success rate",
        epilog=EPILOG_PATCH, formatter_class=fmt,
    )  # fmt: skip
    p.add_argument("--target", type=int, required=True, help="the class the patch sends images to")
    _common(p)
    p.set_defaults(func=cmd_patch)
