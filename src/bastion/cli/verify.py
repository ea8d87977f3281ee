"""``bastion certify``, ``assess`` and ``vnncomp``: verification from the command line."""

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
    model_and_data,
    parse_eps,
    parse_opts,
    positive_int,
    ray_options,
)
from bastion.errors import BastionError
from bastion.verify.vnncomp import decide_instance, decide_row, done_instances, load_network, read_instances

# --------------------------------------------------------------------------------------------------- certify/assess
#: One default for the certified radius, as in the Python API (certify and assess both take radius=True).
RADIUS_NOTE = """\
Each sample's certified radius is found by bisection on eps (on by default, as in the Python API): it costs about
4-60x the time of the one bound at eps (digits: IBP about 4x, CROWN 17x on the MLP and 60x on the CNN); --no-radius
skips it, and the certified lower bound is then eps for the certified samples.
"""

RAY_NOTE = """\
With --ray ADDRESS (auto: the running cluster, local: start Ray here, or HOST:PORT) the samples are sharded over a
Ray cluster (pip install 'bastion[ray]'), whole batches per shard (--shards N; default one batch per shard): the
records and the store run are those of the single-process run, written as shards finish; a killed worker's shard
is retried, and the same command resumes. Every node needs bastion and the --model file at the same path.
"""

EPILOG_CERTIFY = f"""\
examples:
  bastion certify --model zoo:mlp@digits-mlp.pt --data digits --norm linf --eps 0.05 --method crown
  bastion certify --model model.pt --data test.npz --norm l2 --eps 0.5 --method deepz --no-radius --store runs.db

methods: ibp, crown, alpha-crown, deeppoly, deepz (zonotopes), symbolic (ReluVal symbolic intervals). Norms: linf
  (all methods), l2 and l1 (crown/deeppoly/alpha-crown/deepz/symbolic bound the ball with the dual norm; ibp its
  enclosing box).

{RADIUS_NOTE}
{RAY_NOTE}"""

EPILOG_ASSESS = f"""\
examples:
  bastion assess --model zoo:mlp@digits-mlp.pt --data digits --norm linf --eps 0.05 --budget 10 --store runs.db
  bastion assess --model model.pt --data test.npz --eps 8/255 --attack pgd --methods ibp,crown --budget 0 --json
  bastion assess --model model.pt --data digits --eps 0.05 --complete deepgo --estimates clever,splitting --limit 20
  bastion assess --model model.pt --data digits --norm l0 --eps 2 --complete-opt max_subset=2 --limit 20

Runs a cheap attack cascade, a minimal attack (FAB), then incomplete verifiers (IBP -> CROWN -> alpha-CROWN) on
what survives and complete search (branch and bound / MILP or DeepGO, l-inf only) within --budget seconds per
sample, and reports robust / falsified / unknown with the bracket [certified radius, closest adversarial example]
per sample. l0 threats run L0-TRE's bounds instead of the verifiers. --estimates adds CLEVER scores and multilevel-
splitting log-probabilities to each record (estimates, not proofs).

{RADIUS_NOTE}
{RAY_NOTE}"""


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
    model, data = model_and_data(args)
    return model, data, LpBall(args.norm, args.eps[0], domain=data.domain)


def _ray_inputs(args: argparse.Namespace) -> tuple[Any, Any]:
    """Data (cut to --limit) and threat for a --ray run: the model stays a spec, loaded on every worker."""
    from bastion.data import load_data
    from bastion.threat import LpBall

    if len(args.eps) != 1:
        raise BastionError(f"--eps takes one radius for {args.command}, got {len(args.eps)}")
    data = load_data(args.data)
    if args.limit is not None:
        data = data.subset(slice(0, args.limit))
    return data, LpBall(args.norm, args.eps[0], domain=data.domain)


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

    kwargs: dict[str, Any] = dict(
        method=args.method, radius=args.radius, batch_size=args.batch_size, store=args.store, progress=not args.json,
        options=BoundOptions(alpha_steps=args.alpha_steps), config={"model_spec": args.model, "data_spec": args.data},
    )  # fmt: skip
    if args.ray or args.shards is not None:
        from bastion.scale import ray_certify

        ray_opts = ray_options(args)
        data, threat = _ray_inputs(args)
        result = ray_certify(args.model, data, threat, **ray_opts, **kwargs)
    else:
        model, data, threat = _certify_inputs(args)
        result = certify(model, data, threat, **kwargs)
    _print_with_records(result, args.json)
    return 0


def cmd_assess(args: argparse.Namespace) -> int:
    """``bastion assess``: attack -> certify -> complete search, with the bracket per sample."""
    from bastion.verify.assess import assess
    from bastion.verify.bounds import BoundOptions

    ray_opts = ray_options(args) if args.ray or args.shards is not None else None
    model: Any
    if ray_opts is not None:
        model = args.model  # a spec: every worker loads it
        data, threat = _ray_inputs(args)
    else:
        model, data, threat = _certify_inputs(args)
    attacks = build_attacks(args.attack, parse_opts(args.attack_opt), args.norm)
    minimal = None if args.minimal_attack.lower() == "none" else args.minimal_attack
    complete: bool | str = True if args.complete is None else args.complete
    if args.no_complete or complete == "none":
        complete = False
    estimate_opts: dict[str, dict[str, Any]] = {}
    for target, key, value in parse_opts(args.estimate_opt, flag="--estimate-opt"):
        if target is None:
            raise BastionError(f"--estimate-opt {key}=...: name the estimate, e.g. clever.{key}=...")
        estimate_opts.setdefault(target, {})[key] = value
    complete_opts = {}
    for target, key, value in parse_opts(args.complete_opt, flag="--complete-opt"):
        if target is not None:
            raise BastionError(f"--complete-opt {target}.{key}: expected key=value (e.g. max_subset=2)")
        complete_opts[key] = value
    kwargs: dict[str, Any] = dict(
        budget=args.budget, attack=attacks, minimal_attack=minimal,
        methods=[m.strip() for m in args.methods.split(",") if m.strip()], complete=complete,
        complete_options=complete_opts, estimates=[e.strip() for e in args.estimates.split(",") if e.strip()],
        estimate_options=estimate_opts or None, radius=args.radius, batch_size=args.batch_size, store=args.store,
        seed=args.seed, progress=not args.json, options=BoundOptions(alpha_steps=args.alpha_steps),
        config={"model_spec": args.model, "data_spec": args.data},
    )  # fmt: skip
    if ray_opts is not None:
        from bastion.scale import ray_assess

        result = ray_assess(model, data, threat, **ray_opts, **kwargs)
    else:
        result = assess(model, data, threat, **kwargs)
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
nothing lost. With --ray ADDRESS the instances are shared out over a Ray cluster (pip install 'bastion[ray]'), one
per Ray task (--shards N: N groups of consecutive instances); rows come in completion order, each instance keeps
its own time limit, and the files must be readable at the same paths on every node.
"""


def _vnncomp_one(args: argparse.Namespace) -> int:
    import tempfile

    start = time.perf_counter()
    if args.net is None or args.spec is None:
        raise BastionError("give NET.onnx and SPEC.vnnlib, or --instances instances.csv")
    if args.timeout is None or not args.timeout > 0:
        raise BastionError("--timeout S (seconds, > 0) is required for a single instance")
    out = Path(args.out) if args.out else None
    with tempfile.TemporaryDirectory() as tmp:
        model = load_network(Path(args.net), Path(tmp))
        left = args.timeout - (time.perf_counter() - start)
        if left <= 0:
            word, text = "timeout", "timeout\n"
        else:
            word, text = decide_instance(model, Path(args.spec), left, args.method, args.seed)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text)
    print(text if args.verbose else word, end="" if args.verbose else "\n")
    return 0


def _vnncomp_benchmark(args: argparse.Namespace) -> int:
    import csv
    import tempfile

    inst = Path(args.instances)
    base = Path(args.dir) if args.dir else inst.parent
    out = Path(args.out) if args.out else inst.with_name("results.csv")
    if args.ray:
        from bastion.scale import ray_vnncomp

        counts = ray_vnncomp(
            inst, out=out, base_dir=base, timeout_scale=args.timeout_scale, method=args.method, seed=args.seed,
            address=args.ray, shards=args.shards,
        )  # fmt: skip
        skipped = counts.pop("already done")
        summary = ", ".join(f"{k}: {v}" for k, v in sorted(counts.items())) or "nothing left to run"
        print(f"{out}: {summary} ({skipped} instances were already done)")
        return 0
    rows = read_instances(inst, args.timeout_scale)
    done = done_instances(out)
    fresh = not out.is_file() or out.stat().st_size == 0
    out.parent.mkdir(parents=True, exist_ok=True)
    counts = {}
    with open(out, "a", newline="") as fh, tempfile.TemporaryDirectory() as tmp:
        writer = csv.writer(fh)
        if fresh:
            writer.writerow(["onnx", "vnnlib", "result", "seconds"])
            fh.flush()
        cache: dict[str, Any] = {}
        for onnx_rel, vnnlib_rel, limit in rows:
            if (onnx_rel, vnnlib_rel) in done:
                continue
            word, seconds, error = decide_row(
                cache, base, onnx_rel, vnnlib_rel, limit, args.method, args.seed, Path(tmp)
            )
            if error is not None:
                print(f"bastion vnncomp: {onnx_rel} {vnnlib_rel}: error: {error}", file=sys.stderr)
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
    if args.shards is not None and not args.ray:
        raise BastionError("--shards needs --ray ADDRESS")
    if args.instances:
        if args.net or args.spec:
            raise BastionError("give either NET.onnx SPEC.vnnlib or --instances, not both")
        return _vnncomp_benchmark(args)
    if args.ray:
        raise BastionError("--ray shards the instances of a benchmark: give --instances instances.csv")
    return _vnncomp_one(args)


def add_parsers(sub: Any, fmt: Any) -> None:
    """Register this module's commands on the ``bastion`` sub-parser ``sub``."""
    p = sub.add_parser("certify", help="certified robustness (and radius) of every sample with a bound method",
                       epilog=EPILOG_CERTIFY, formatter_class=fmt)  # fmt: skip
    p.add_argument("--model", required=True, help="model spec (as for `bastion evaluate`)")
    p.add_argument("--data", required=True, help="data spec (as for `bastion evaluate`)")
    p.add_argument("--norm", default="linf", help="linf, l2 or l1 (default: %(default)s)")
    p.add_argument("--eps", type=parse_eps, required=True, help="radius, e.g. 0.1 or 8/255")
    p.add_argument("--method", default="crown",
                   help="ibp, crown, alpha-crown, deeppoly, deepz or symbolic (default: %(default)s)")  # fmt: skip
    _add_radius_flag(p)
    p.add_argument("--alpha-steps", type=positive_int, default=20, help="alpha-CROWN optimisation steps")
    p.add_argument("--store", default=None, help="SQLite store: results are written per batch and the run resumes")
    p.add_argument("--batch-size", type=positive_int, default=64)
    p.add_argument("--limit", type=positive_int, default=None, help="certify only the first N samples")
    p.add_argument("--device", default=None, help="torch device for the model, e.g. cuda")
    p.add_argument("--json", action="store_true", help="print the summary and per-sample records as JSON")
    add_ray_flags(p, "batch")
    p.set_defaults(func=cmd_certify)
    p = sub.add_parser("assess", help="attack -> certify -> complete search: robust/falsified/unknown and brackets",
                       epilog=EPILOG_ASSESS, formatter_class=fmt)  # fmt: skip
    p.add_argument("--model", required=True, help="model spec (as for `bastion evaluate`)")
    p.add_argument("--data", required=True, help="data spec (as for `bastion evaluate`)")
    p.add_argument("--norm", default="linf", help="linf, l2, l1 or l0 (default: %(default)s)")
    p.add_argument("--eps", type=parse_eps, required=True, help="radius, e.g. 0.1 or 8/255 (l0: changed elements)")
    p.add_argument("--budget", type=float, default=10.0, help="seconds per sample for complete search (default 10)")
    p.add_argument("--attack", default="rapid", help="fixed-eps attack cascade or preset (default: %(default)s)")
    p.add_argument("--attack-opt", action="append", default=[], metavar="KEY=VALUE",
                   help="attack hyperparameter, repeatable; ATTACK.KEY=VALUE for one attack only")  # fmt: skip
    p.add_argument(
        "--minimal-attack",
        default="auto",
        help="minimal-distortion attack for the found distance, or none (auto: fab, none for l0)",
    )
    p.add_argument("--methods", default="ibp,crown,alpha-crown", help="incomplete verifiers in order (comma-separated)")
    p.add_argument("--alpha-steps", type=positive_int, default=20, help="alpha-CROWN optimisation steps")
    p.add_argument("--no-complete", action="store_true", help="skip the complete search (as --complete none)")
    p.add_argument("--complete", default=None, choices=["bab", "deepgo", "l0", "none"],
                   help="complete search: bab (branch and bound, l-inf default), deepgo (Lipschitz optimisation, "
                   "l-inf), l0 (L0-TRE, the l0 default) or none")  # fmt: skip
    p.add_argument("--complete-opt", action="append", default=[], metavar="KEY=VALUE",
                   help="option of the complete method, repeatable (e.g. max_subset=2, tolerance=0.001)")  # fmt: skip
    p.add_argument(
        "--estimates",
        default="",
        help="statistical extra columns, comma-separated: clever, splitting (estimates, not proofs)",
    )
    p.add_argument(
        "--estimate-opt",
        action="append",
        default=[],
        metavar="NAME.KEY=VALUE",
        help="option of an estimate, repeatable (e.g. clever.n_batches=50, splitting.n_particles=500)",
    )
    _add_radius_flag(p)
    p.add_argument("--store", default=None, help="SQLite store: results are written per batch and the run resumes")
    p.add_argument("--batch-size", type=positive_int, default=64)
    p.add_argument("--limit", type=positive_int, default=None, help="assess only the first N samples")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None, help="torch device for the model, e.g. cuda")
    p.add_argument("--json", action="store_true", help="print the summary and per-sample records as JSON")
    add_ray_flags(p, "batch")
    p.set_defaults(func=cmd_assess)
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
    add_ray_flags(p, "instance")
    p.set_defaults(func=cmd_vnncomp)
