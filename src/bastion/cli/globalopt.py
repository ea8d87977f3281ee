"""``bastion verify-global``: global optimisation with converging bounds (DeepGO, DeepGame, L0-TRE) over a data set."""

from __future__ import annotations

import argparse
from typing import Any

from bastion.cli.common import model_and_data, positive_int, print_result


def _features(text: str | None) -> list[int] | None:
    from bastion.errors import InputError

    if text is None:
        return None
    try:
        return [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise InputError(f"--features must be comma-separated feature indices, got {text!r}") from None


def cmd_verify_global(args: argparse.Namespace) -> int:
    """One call of :func:`~bastion.verify.globalopt.deepgo.deepgo_verify`,
    :func:`~bastion.verify.globalopt.deepgame.deepgame_verify` or :func:`~bastion.verify.globalopt.l0.l0_verify`."""
    from bastion.errors import InputError
    from bastion.threat import LpBall

    model, data = model_and_data(args)
    config = {"model_spec": args.model, "data_spec": args.data}
    common = {"store": args.store, "progress": not args.json, "config": config}
    result: Any
    if args.method == "deepgo":
        from bastion.verify.globalopt.deepgo import deepgo_verify

        if args.eps is None:
            raise InputError("DeepGO verifies an l∞ ball: give its radius with --eps")
        result = deepgo_verify(
            model, data, LpBall("linf", args.eps, domain=data.domain), features=_features(args.features),
            tolerance=args.tolerance, max_iterations=args.max_iterations, time_limit=args.time_limit,
            lipschitz=args.lipschitz, **common,
        )  # fmt: skip
    elif args.method == "l0":
        from bastion.verify.globalopt.l0 import l0_verify

        threat = None if args.eps is None else LpBall("l0", args.eps, domain=data.domain)
        result = l0_verify(model, data, threat=threat, max_subset=args.max_subset, budget=args.budget, **common)
    else:
        from bastion.verify.globalopt.deepgame import deepgame_verify

        seconds = 300.0 if args.time_limit is None else args.time_limit
        result = deepgame_verify(model, data, norm=args.norm, eps=args.eps, mcts_seconds=seconds, **common)
    print_result(result, args.json)
    return 0


def add_parsers(sub: Any, fmt: Any) -> None:
    """Register this module's commands on the ``bastion`` sub-parser ``sub``."""
    p = sub.add_parser(
        "verify-global",
        help="converging lower/upper bounds by global optimisation: DeepGO, DeepGame, L0-TRE",
        epilog="deepgo: Ruan, Huang & Kwiatkowska, IJCAI 2018 (nested Lipschitz optimisation over the l∞ ball or "
        "a feature subset; sound Lipschitz constants by default). deepgame: Wu et al., TCS 2020 (feature game: MCTS "
        "upper bound, admissible A* lower bound). l0: Ruan et al., IJCAI 2019 (bounds on the minimal number of "
        "changed pixels).\nexamples:\n"
        "  bastion verify-global --method deepgo --model model.pt --data digits --eps 0.05 --features 27,36 --limit 5\n"
        "  bastion verify-global --method l0 --model model.pt --data digits --max-subset 2 --limit 10 --json\n"
        "  bastion verify-global --method deepgame --model model.pt --data digits --norm l2 --limit 3 --store runs.db",
        formatter_class=fmt,
    )
    p.add_argument("--method", required=True, choices=["deepgo", "deepgame", "l0"], help="the search")
    p.add_argument("--model", required=True, help="model spec (as for `bastion evaluate`)")
    p.add_argument("--data", required=True, help="data spec (as for `bastion evaluate`)")
    p.add_argument("--eps", type=float, default=None,
                   help="deepgo: l∞ radius (required); l0: changed features the records speak of; "
                   "deepgame: distance budget")  # fmt: skip
    p.add_argument("--features", default=None, help="deepgo: comma-separated input features that move (<= 8)")
    p.add_argument("--tolerance", type=float, default=0.01, help="deepgo: stop when upper - lower <= this")
    p.add_argument("--max-iterations", type=positive_int, default=1000, help="deepgo: iterations per level")
    p.add_argument("--lipschitz", default="interval",
                   help="deepgo: interval | norms (sound) | estimate (sampled, NOT sound)")  # fmt: skip
    p.add_argument("--time-limit", type=float, default=None,
                   help="deepgo: seconds per sample; deepgame: seconds of tree search per sample "
                   "(default 300)")  # fmt: skip
    p.add_argument("--max-subset", type=positive_int, default=2, help="l0: largest subset size proven exhaustively")
    p.add_argument("--budget", type=positive_int, default=50_000, help="l0: bound computations per sample")
    p.add_argument("--norm", default="l2", help="deepgame: distance l0, l1, l2 or linf")
    p.add_argument("--store", default=None, help="SQLite store: records are written as samples finish; re-run resumes")
    p.add_argument("--limit", type=positive_int, default=None, help="use only the first N samples")
    p.add_argument("--device", default=None, help="torch device for the model, e.g. cuda")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.set_defaults(func=cmd_verify_global)
