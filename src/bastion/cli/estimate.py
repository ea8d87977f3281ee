"""``bastion estimate clever|splitting``: statistical robustness estimates over a data set (never certificates)."""

from __future__ import annotations

import argparse
from typing import Any

from bastion.cli.common import model_and_data, positive_int, print_result


def cmd_estimate(args: argparse.Namespace) -> int:
    """CLEVER scores (Weng et al., ICLR 2018) or multilevel-splitting violation probabilities (Webb et al., ICLR
    2019) of every sample: one call of :func:`~bastion.statistical.clever.clever_scores` or
    :func:`~bastion.statistical.splitting.estimate_violation`."""
    from bastion.errors import InputError
    from bastion.threat import LpBall

    model, data = model_and_data(args)
    config = {"model_spec": args.model, "data_spec": args.data}
    result: Any
    if args.method == "clever":
        from bastion.statistical.clever import clever_scores

        target: Any = args.target
        if isinstance(target, str) and target.lstrip("-").isdigit():
            target = int(target)
        result = clever_scores(
            model, data, norm=args.norm, radius=args.radius, n_batches=args.n_batches, batch_size=args.batch_size,
            target=target, seed=args.seed, store=args.store, progress=not args.json, config=config,
        )  # fmt: skip
    else:
        from bastion.statistical.splitting import estimate_violation

        if args.eps is None:
            raise InputError("multilevel splitting needs the radius of the ball: --eps")
        result = estimate_violation(
            model, data, LpBall(args.norm, args.eps, domain=data.domain), n_particles=args.particles, rho=args.rho,
            mh_steps=args.mh_steps, n_runs=args.runs, seed=args.seed, store=args.store, progress=not args.json,
            config=config,
        )  # fmt: skip
    print_result(result, args.json)
    return 0


def add_parsers(sub: Any, fmt: Any) -> None:
    """Register this module's commands on the ``bastion`` sub-parser ``sub``."""
    p = sub.add_parser(
        "estimate",
        help="statistical robustness estimates (CLEVER scores, multilevel splitting): estimates, not proofs",
        epilog="clever: Weng et al., ICLR 2018 (extreme-value estimate of the minimal distortion; defaults "
        "N_b = 500 batches of N_s = 1024 samples). splitting: Webb et al., ICLR 2019 (log-probability that a "
        "uniform input of the ball is misclassified; N = 1000 particles, rho = 0.1, M = 100 MH steps).\n"
        "examples:\n"
        "  bastion estimate clever --model zoo:cnn@digits-cnn.pt --data digits --norm l2 --limit 20 --store runs.db\n"
        "  bastion estimate clever --model model.pt --data digits --norm linf --target top2 --n-batches 50 --json\n"
        "  bastion estimate splitting --model model.pt --data digits --norm linf --eps 0.2 --limit 10 --json",
        formatter_class=fmt,
    )
    p.add_argument("method", choices=["clever", "splitting"], help="the estimator")
    p.add_argument("--model", required=True, help="model spec (as for `bastion evaluate`)")
    p.add_argument("--data", required=True, help="data spec (as for `bastion evaluate`)")
    p.add_argument("--norm", default="l2", help="l2, linf or l1 (splitting: l2 or linf); default l2")
    p.add_argument("--eps", type=float, default=None, help="splitting: radius of the ball")
    p.add_argument("--radius", type=float, default=None,
                   help="clever: sampling radius R (default per norm: l2 5, linf 0.1, l1 30)")  # fmt: skip
    p.add_argument("--target", default=None,
                   help="clever: top2, random, least_likely or a class index (default: untargeted)")  # fmt: skip
    p.add_argument("--n-batches", type=positive_int, default=500, help="clever: batches N_b (default 500)")
    p.add_argument("--batch-size", type=positive_int, default=1024, help="clever: samples per batch N_s (1024)")
    p.add_argument("--particles", type=positive_int, default=1000, help="splitting: particles N (default 1000)")
    p.add_argument("--rho", type=float, default=0.1, help="splitting: level quantile (default 0.1)")
    p.add_argument("--mh-steps", type=positive_int, default=100, help="splitting: MH steps per level (default 100)")
    p.add_argument("--runs", type=positive_int, default=1,
                   help="splitting: independent runs (>= 2 gives an empirical spread)")  # fmt: skip
    p.add_argument("--store", default=None, help="SQLite store: records are written as samples finish; re-run resumes")
    p.add_argument("--limit", type=positive_int, default=None, help="use only the first N samples")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None, help="torch device for the model, e.g. cuda")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.set_defaults(func=cmd_estimate)
