"""``bastion test coverage`` and ``bastion test generate``: coverage criteria and coverage-guided test generation."""

from __future__ import annotations

import argparse
import inspect
import json
from collections.abc import Sequence
from typing import Any

from bastion.cli.common import check_plot_path, model_and_data, parse_eps, parse_opts, positive_int
from bastion.errors import BastionError

EPILOG_COVERAGE = """\
examples:
  bastion test coverage --model zoo:cnn@digits-cnn.pt --data digits --metric nc
  bastion test coverage --model model.pt --data mnist:~/data/mnist --metric nc,kmnc,nbc,snac,tknc \\
      --profile mnist:~/data/mnist:train --param kmnc.k=100 --json
  bastion test coverage --model model.pt --data test.npz --metric nc --param convention=scaled --param threshold=0.25

metrics: nc (neuron coverage; convention=raw (DeepConcolic) or scaled (DeepXplore), threshold=T), and the others
  listed by `bastion test coverage --list`. Criteria that need neuron ranges (DeepGauge's kmnc, nbc, snac) take
  them from --profile (e.g. the training data). --layers names the layers under test (as in model.named_modules();
  default: every activation module).
"""

EPILOG_GENERATE = """\
examples:
  bastion test generate --model zoo:cnn@digits-cnn.pt --data digits --limit 100 --method concolic --criterion nc \\
      --norm linf --eps 0.3 --budget 200 --out tests.npz --store runs.db
  bastion test generate --model model.pt --data test.npz --method fuzz --criterion nc --queries 10000 \\
      --seconds 600 --out fuzz.npz --plot coverage.png --json

The seeds are the --data inputs. Tests stay within --norm/--eps of their seed (without --eps: anywhere in the input
domain); a test whose prediction differs from its seed's label is reported as adversarial. The run writes one
record per kept test to --store and its state to --checkpoint (default OUT.ckpt) after every iteration: run the
same command again to resume. --option sets the generator's options, --param the criterion's.
"""


def _list_metrics() -> int:
    from bastion.testing.coverage import METRICS
    from bastion.testing.generate import GENERATORS

    for name, cls in METRICS.items():
        print(f"metric     {name:<14} {cls.paper}")
    for name, gen in GENERATORS.items():
        print(f"generator  {name:<14} {gen.paper}")
    return 0


def _metrics(names: str, params: Sequence[tuple[str | None, str, Any]], layers: str | None) -> list[Any]:
    """Criterion objects for a comma-separated list of names, ``--param`` applied (``METRIC.KEY`` for one only)."""
    from bastion.testing.coverage import METRICS, make_metric

    chosen = [n.strip().lower() for n in names.split(",") if n.strip()]
    if not chosen:
        raise BastionError("--metric names no criterion")
    unknown = [n for n in chosen if n not in METRICS]
    if unknown:
        raise BastionError(f"unknown metric(s) {', '.join(unknown)}; choose from {', '.join(METRICS)}")
    opts: dict[str, dict[str, Any]] = {n: {} for n in chosen}
    for target, key, value in params:
        if target is not None:
            if target not in opts:
                raise BastionError(f"--param {target}.{key}: {target!r} is not among the metrics {chosen}")
            opts[target][key] = value
            continue
        takers = [n for n in chosen if key in inspect.signature(METRICS[n].__init__).parameters]
        if not takers:
            raise BastionError(f"--param {key}: none of the metrics {chosen} takes {key!r}")
        for n in takers:
            opts[n][key] = value
    chosen_layers = [s.strip() for s in layers.split(",") if s.strip()] if layers else None
    return [make_metric(n, layers=chosen_layers, **opts[n]) for n in chosen]


def _profile(args: argparse.Namespace) -> Any:
    if args.profile is None:
        return None
    from bastion.data import load_data

    return load_data(args.profile)


def cmd_coverage(args: argparse.Namespace) -> int:
    """``bastion test coverage``: one pass over the data for every criterion named."""
    from bastion.testing.coverage import measure

    if args.list:
        return _list_metrics()
    if args.model is None or args.data is None:
        raise BastionError("give --model and --data (or --list)")
    metrics = _metrics(args.metric, parse_opts(args.param), args.layers)
    model, data = model_and_data(args)
    reports = measure(model, data, metrics, profile=_profile(args), batch_size=args.batch_size,
                      progress=not args.json)  # fmt: skip
    if args.json:
        print(json.dumps({r.metric: r.to_dict() for r in reports}, indent=2))
    else:
        for r in reports:
            print(r.line())
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    """``bastion test generate``: coverage-guided test generation, resumable (one generate_tests call)."""
    from pathlib import Path

    from bastion.testing import Budget, generate_tests
    from bastion.threat import LpBall

    plot = check_plot_path(args.plot) if args.plot else None
    out = Path(args.out).expanduser()
    if not out.resolve().parent.is_dir():
        raise BastionError(f"--out {args.out!r}: the folder {out.resolve().parent} does not exist")
    if "," in args.criterion:
        raise BastionError(f"--criterion takes one criterion for test generation, got {args.criterion!r}")
    (metric,) = _metrics(args.criterion, parse_opts(args.param), args.layers)
    options = {}
    for target, key, value in parse_opts(args.option):
        if target is not None and target != args.method:
            raise BastionError(f"--option {target}.{key}: the method is {args.method!r}")
        options[key] = value
    model, data = model_and_data(args)
    threat = None
    if args.eps is not None:
        if len(args.eps) != 1:
            raise BastionError(f"--eps takes one radius for test generation, got {len(args.eps)}")
        threat = LpBall(args.norm, args.eps[0], domain=data.domain)
    budget = Budget(iterations=args.budget, queries=args.queries, seconds=args.seconds)
    suite = generate_tests(
        model, data, metric, args.method, threat=threat, budget=budget, profile=_profile(args), store=args.store,
        checkpoint=args.checkpoint or str(out) + ".ckpt", seed=args.seed, batch_size=args.batch_size,
        progress=not args.json, **options,
    )  # fmt: skip
    written = suite.save(out)
    if plot is not None:
        from bastion.report import plot_coverage_history

        plot_coverage_history(suite.history, plot, label=metric.name, title=f"{args.method} on {data.name}")
    if args.json:
        print(json.dumps({**suite.to_dict(), "out": str(written)}, indent=2))
    else:
        print(suite.table())
        print(f"\ntests: {written}" + (f"   store: {args.store} (run {suite.run_id})" if args.store else ""))
    return 0


def add_parsers(sub: Any, fmt: Any) -> None:
    """Register ``bastion test coverage|generate``."""
    test = sub.add_parser("test", help="coverage criteria and coverage-guided test generation",
                          description="coverage-guided testing: `bastion test coverage` and `bastion test generate`",
                          formatter_class=fmt)  # fmt: skip
    tsub = test.add_subparsers(dest="test_command", required=True, metavar="ACTION")

    p = tsub.add_parser("coverage", help="coverage of a data set under one or more criteria", epilog=EPILOG_COVERAGE,
                        formatter_class=fmt)  # fmt: skip
    p.add_argument("--model", default=None, help="model spec (as for `bastion evaluate`)")
    p.add_argument("--data", default=None, help="the test inputs: a data spec (as for `bastion evaluate`)")
    p.add_argument("--metric", default="nc", help="criteria, comma-separated (default: %(default)s)")
    p.add_argument("--param", action="append", default=[], metavar="KEY=VALUE",
                   help="criterion parameter, repeatable; METRIC.KEY=VALUE for one criterion only")  # fmt: skip
    p.add_argument("--layers", default=None, help="layers under test, comma-separated (default: activations)")
    p.add_argument("--profile", default=None, help="profiling data spec for kmnc/nbc/snac (e.g. the training data)")
    p.add_argument("--list", action="store_true", help="list the criteria and generators")
    p.add_argument("--batch-size", type=positive_int, default=256)
    p.add_argument("--limit", type=positive_int, default=None, help="use only the first N inputs")
    p.add_argument("--device", default=None, help="torch device for the model, e.g. cuda")
    p.add_argument("--json", action="store_true", help="print the reports as JSON")
    p.set_defaults(func=cmd_coverage)

    p = tsub.add_parser("generate", help="generate tests that raise coverage (concolic, deepxplore, fuzz, ...)",
                        epilog=EPILOG_GENERATE, formatter_class=fmt)  # fmt: skip
    p.add_argument("--model", required=True, help="model spec (as for `bastion evaluate`)")
    p.add_argument("--data", required=True, help="the seeds: a data spec (as for `bastion evaluate`)")
    p.add_argument("--method", default="concolic", help="generator (default: %(default)s; see --list of coverage)")
    p.add_argument("--criterion", default="nc", help="coverage criterion to raise (default: %(default)s)")
    p.add_argument("--param", action="append", default=[], metavar="KEY=VALUE", help="criterion parameter")
    p.add_argument("--option", action="append", default=[], metavar="KEY=VALUE", help="generator option")
    p.add_argument("--layers", default=None, help="layers under test, comma-separated (default: activations)")
    p.add_argument("--profile", default=None, help="profiling data spec for criteria that need neuron ranges")
    p.add_argument("--norm", default="linf", help="linf, l2, l1 or l0: the norm of --eps (default: %(default)s)")
    p.add_argument("--eps", type=parse_eps, default=None, help="radius the tests stay within around their seed")
    p.add_argument("--budget", type=positive_int, default=100, help="iterations (default: %(default)s)")
    p.add_argument("--queries", type=positive_int, default=None, help="model queries at most")
    p.add_argument("--seconds", type=float, default=None, help="seconds at most")
    p.add_argument("--out", required=True, help="where to write the tests (.npz)")
    p.add_argument("--checkpoint", default=None, help="resume file (default: OUT.ckpt)")
    p.add_argument("--store", default=None, help="SQLite store: one record per kept test")
    p.add_argument("--plot", default=None, help="write the coverage-over-iterations figure here (e.g. cov.png)")
    p.add_argument("--batch-size", type=positive_int, default=256)
    p.add_argument("--limit", type=positive_int, default=None, help="use only the first N seeds")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None, help="torch device for the model, e.g. cuda")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.set_defaults(func=cmd_generate)
