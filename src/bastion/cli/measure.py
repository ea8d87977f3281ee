"""``bastion measure``: generalisation measures of a trained model (weight correlation, PAC-Bayes, norms)."""

from __future__ import annotations

import argparse
import json
from typing import Any

from bastion.cli.common import check_device, model_and_data, positive_int


def cmd_measure(args: argparse.Namespace) -> int:
    """Every measure of :func:`~bastion.reliability.generalisation.measure` on ``--model`` (with ``--init`` its
    initial weights and ``--data`` its training data), and with ``--test`` the generalisation gap."""
    from bastion.data import load_data
    from bastion.models import load_model
    from bastion.reliability.generalisation import generalisation_gap, measure

    model, data = model_and_data(args)
    init = None
    if args.init is not None:
        init = load_model(args.init, input_shape=data.feature_shape, num_classes=data.num_classes)
        if args.device:
            init = init.to(check_device(args.device))
    result = measure(
        model, init=init, data=data, sigma_threshold=args.sigma_threshold, mc_samples=args.mc_samples,
        search_depth=args.search_depth, batch_size=args.batch_size, seed=args.seed, progress=not args.json,
    )  # fmt: skip
    gap = None
    if args.test is not None:
        test = load_data(args.test)
        gap = generalisation_gap(model, data, test, batch_size=args.batch_size)
    if args.json:
        out: dict[str, Any] = {"model_spec": args.model, "init_spec": args.init, "data_spec": args.data,
                               "measures": result.to_dict()}  # fmt: skip
        if gap is not None:
            out["test_spec"] = args.test
            out["gap"] = gap.to_dict()
        print(json.dumps(out, indent=2))
    else:
        print(f"generalisation measures of {args.model} on {data.name}" + ("" if init is not None else " (no --init)"))
        print(result.table())
        if gap is not None:
            print()
            print("\n".join(f"{k:<21}  {v:.6g}" for k, v in gap.to_dict().items()))
    return 0


def add_parsers(sub: Any, fmt: Any) -> None:
    """Register this module's commands on the ``bastion`` sub-parser ``sub``."""
    p = sub.add_parser(
        "measure",
        help="generalisation measures of a trained model: norms, weight correlation, PAC-Bayes (& correlation)",
        epilog="Jin, Yi, Zhang, Zhang, Schewe & Huang, NeurIPS 2020 (weight correlation, PAC-Bayes & correlation); "
        "Jiang et al., ICLR 2020 (sigma: the largest Gaussian weight noise costing at most --sigma-threshold "
        "training accuracy). Without --init the distances to initialisation and the PAC-Bayes measures are "
        "n/a.\nexamples:\n"
        "  bastion measure --model zoo:mlp@trained.pt --init zoo:mlp@init.pt --data digits\n"
        "  bastion measure --model trained.pt --init init.pt --data train.npz --test test.npz --json",
        formatter_class=fmt,
    )
    p.add_argument("--model", required=True, help="the trained model (spec as for `bastion evaluate`)")
    p.add_argument("--init", default=None, help="the same model at initialisation (same spec forms)")
    p.add_argument("--data", required=True, help="its training data (spec as for `bastion evaluate`)")
    p.add_argument("--test", default=None, help="held-out data: also print the generalisation gap")
    p.add_argument("--sigma-threshold", type=float, default=0.1,
                   help="training-accuracy drop that defines sigma (default 0.1, as Jiang et al.)")  # fmt: skip
    p.add_argument("--mc-samples", type=positive_int, default=10, help="noise draws per sigma (default 10)")
    p.add_argument("--search-depth", type=positive_int, default=15, help="bisection steps of the sigma search (15)")
    p.add_argument("--batch-size", type=positive_int, default=1024, help="samples per forward pass")
    p.add_argument("--limit", type=positive_int, default=None, help="use only the first N training samples")
    p.add_argument("--seed", type=int, default=0, help="seed of the weight noise")
    p.add_argument("--device", default=None, help="torch device for the models, e.g. cuda")
    p.add_argument("--json", action="store_true", help="print the measures as JSON")
    p.set_defaults(func=cmd_measure)
