"""``bastion smooth``: randomized smoothing over a data set."""

from __future__ import annotations

import argparse
from typing import Any

from bastion.cli.common import check_plot_path, model_and_data, parse_eps, positive_int, print_result


def cmd_smooth(args: argparse.Namespace) -> int:
    """``bastion smooth certify|predict``: randomized smoothing (Cohen et al., ICML 2019) over a data set."""
    from bastion.defenses.smoothing import Smooth, evaluate_smoothed

    plot = check_plot_path(args.plot) if args.plot else None
    model, data = model_and_data(args)
    smoothed = Smooth(model, data.num_classes, args.sigma, domain=data.domain)
    result = evaluate_smoothed(
        smoothed, data, mode=args.action, n=args.n, n0=args.n0, alpha=args.alpha, batch_size=args.batch_size,
        radii=args.radii, store=args.store, seed=args.seed, progress=not args.json,
        config={"model_spec": args.model, "data_spec": args.data},
    )  # fmt: skip
    print_result(result, args.json)
    if plot is not None and args.action == "certify":
        from bastion.report.plots import plot_certified_accuracy

        plot_certified_accuracy(result.radii, {f"sigma = {args.sigma:g}": result.certified_accuracy}, plot,
                                title=f"{args.model} on {data.name}")  # fmt: skip
    return 0


def add_parsers(sub: Any, fmt: Any) -> None:
    """Register this module's commands on the ``bastion`` sub-parser ``sub``."""
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
    p.add_argument("--n", type=positive_int, default=None,
                   help="noisy copies per input (certify: estimation copies; default 100000 for certify, 100 for "
                   "predict)")  # fmt: skip
    p.add_argument("--n0", type=positive_int, default=100, help="selection copies per input (certify; default 100)")
    p.add_argument("--alpha", type=float, default=0.001, help="error probability (default: %(default)s)")
    p.add_argument("--radii", type=parse_eps, default=[0.0, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 1.75, 2.0],
                   help="l2 radii of the certified-accuracy table, comma-separated")  # fmt: skip
    p.add_argument("--store", default=None, help="SQLite store: records are written as inputs finish; re-run resumes")
    p.add_argument("--batch-size", type=positive_int, default=1000, help="noisy copies per forward pass")
    p.add_argument("--limit", type=positive_int, default=None, help="use only the first N samples")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None, help="torch device for the model, e.g. cuda")
    p.add_argument("--plot", default=None, help="write the certified-accuracy-vs-radius figure here (certify)")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.set_defaults(func=cmd_smooth)
