"""``bastion reliability`` and ``bastion weight-robustness``: operational reliability and robustness to weights."""

from __future__ import annotations

import argparse
from typing import Any

from bastion.cli.common import check_plot_path, model_and_data, parse_one_eps, positive_int, print_result
from bastion.errors import BastionError

EPILOG_RELIABILITY = """\
examples:
  bastion reliability --model zoo:mlp@m.pt --op-data digits --encoder vae --cells top:200 --eps 0.05 --store runs.db
  bastion reliability --model model.pt --op-data op.npz --encoder none --cells all --grid 250x250 --json
  bastion reliability --model model.pt --op-data digits --encoder vae.pt --cells top:100 --figure profile.png

The reliability assessment model of Zhao et al. (AISafety 2021): an operational profile (a Gaussian KDE of the
operational data, in input space or in the latent space of an encoder), cells of radius eps around it (grid boxes for
inputs of at most 3 features, else l-inf balls around the operational points; eps defaults to half the data's
r-separation), each cell's failure probability (CROWN-certified cells 0, then PGD, then uniform sampling), and the
probability of failure per demand pfd = sum OP(cell) * lambda(cell) with its variance, its upper bound at
--confidence and the IEC 61508 SIL it meets. --encoder vae trains a small VAE on the operational inputs; a path loads
one saved by bastion.reliability.vae.VAE.save. Cells are written to the store as they finish; a re-run resumes.
"""

EPILOG_WEIGHTS = """\
examples:
  bastion weight-robustness --model zoo:mlp@m.pt --data digits --eps 0.01 --method crown --limit 100
  bastion weight-robustness --model zoo:mlp@m.pt --data digits --relative layer --store runs.db --json

Robustness of each prediction to perturbations of the weights (|delta w| <= eps * |w| elementwise, or eps * max|W|
per layer with --relative layer): a sound lower bound (interval or CROWN-style, fully connected ReLU networks) and
PGD on the weights, each sample with the bracket [certified eps, smallest flipping eps found]. Without --eps the
status is decided at --max-eps.
"""


def _encoder(spec: str, data: Any, args: argparse.Namespace) -> Any:
    """``None``, a VAE trained on the operational inputs, or a VAE read from a file."""
    from pathlib import Path

    if spec.lower() == "none":
        return None
    if spec.lower() == "vae":
        from bastion.reliability.vae import train_vae

        return train_vae(
            data.x, latent_dim=args.latent_dim, epochs=args.vae_epochs, seed=args.seed, progress=not args.json
        )
    if not Path(spec).is_file():
        raise BastionError(f"--encoder {spec!r}: expected vae, none or the path of a saved VAE (file not found)")
    from bastion.reliability.vae import VAE

    return VAE.load(spec)


def cmd_reliability(args: argparse.Namespace) -> int:
    """One call of :func:`~bastion.reliability.ram.assess_reliability` (after training the VAE, if asked)."""
    from bastion.reliability.ram import assess_reliability, plot_profile

    figure = check_plot_path(args.figure) if args.figure else None
    model, data = model_and_data(args)  # --op-data is the data
    encoder = _encoder(args.encoder, data, args)
    result = assess_reliability(
        model, data, cells=args.cells, partition=args.partition, grid=args.grid, eps=args.eps, encoder=encoder,
        bandwidth=args.bandwidth, n_boot=args.n_boot, samples_per_cell=args.samples_per_cell,
        confidence=args.confidence, mode=args.mode, certify=None if args.certify == "none" else args.certify,
        attack=None if args.attack == "none" else args.attack, splitting=args.splitting,
        cells_per_batch=args.cells_per_batch, store=args.store, progress=not args.json, seed=args.seed,
        config={"model_spec": args.model, "op_data_spec": args.data, "encoder": args.encoder},
    )  # fmt: skip
    if figure is not None:
        plot_profile(result, figure)
    print_result(result, args.json)
    return 0


def cmd_weight_robustness(args: argparse.Namespace) -> int:
    """One call of :func:`~bastion.reliability.weights.weight_robustness`."""
    from bastion.reliability.weights import weight_robustness

    model, data = model_and_data(args)
    layers = [t.strip() for t in args.layers.split(",") if t.strip()] if args.layers else None
    result = weight_robustness(
        model, data, eps=args.eps, layers=layers, relative=args.relative, biases=args.biases,
        method=None if args.method == "none" else args.method, attack_steps=args.attack_steps,
        max_eps=args.max_eps, batch_size=args.batch_size, store=args.store, progress=not args.json, seed=args.seed,
        config={"model_spec": args.model, "data_spec": args.data},
    )  # fmt: skip
    print_result(result, args.json)
    return 0


def _probability(text: str) -> float:
    value = float(text)
    if not 0.0 < value < 1.0:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1), got {text!r}")
    return value


def add_parsers(sub: Any, fmt: Any) -> None:
    """Register this module's commands on the ``bastion`` sub-parser ``sub``."""
    p = sub.add_parser("reliability", help="probability of failure per demand under an operational profile (RAM)",
                       epilog=EPILOG_RELIABILITY, formatter_class=fmt)  # fmt: skip
    p.add_argument("--model", required=True, help="model spec (as for `bastion evaluate`)")
    p.add_argument("--op-data", dest="data", required=True,
                   help="operational data spec (labelled), e.g. digits or op.npz")  # fmt: skip
    p.add_argument("--encoder", default="none", help="vae (trained here), none, or the path of a saved VAE")
    p.add_argument("--latent-dim", type=positive_int, default=8, help="latent dimension of --encoder vae (8)")
    p.add_argument("--vae-epochs", type=positive_int, default=30, help="training epochs of --encoder vae (30)")
    p.add_argument("--cells", default="top:1000", help="all, top:K (the K cells of largest mass) or K")
    p.add_argument("--partition", default="auto", choices=["auto", "grid", "balls"], help="how the space is cut")
    p.add_argument("--grid", default=None, help="grid cells per axis, e.g. 250x250 (grid partition)")
    p.add_argument("--eps", type=parse_one_eps, default=None, help="cell radius (default: half the r-separation)")
    p.add_argument("--bandwidth", type=float, default=None, help="KDE bandwidth (default: 5-fold cross-validation)")
    p.add_argument("--n-boot", type=int, default=100, help="bootstrap fits of the profile (100; 0 for none)")
    p.add_argument("--samples-per-cell", type=positive_int, default=10_000, help="uniform samples per cell (10000)")
    p.add_argument("--confidence", type=_probability, default=0.975, help="confidence of the upper bound (0.975)")
    p.add_argument("--mode", default="probability", choices=["probability", "worst-case"],
                   help="a cell's lambda: its sampled failure rate, or 1 once an attack breaks it")  # fmt: skip
    p.add_argument("--certify", default="crown", help="bound method that proves cells safe, or none")
    p.add_argument("--attack", default="pgd", help="l-inf attack that falsifies cells, or none")
    p.add_argument("--splitting", action="store_true", help="multilevel splitting for cells whose samples never fail")
    p.add_argument("--cells-per-batch", type=positive_int, default=64, help="cells per batch and store transaction")
    p.add_argument("--figure", default=None, help="write the profile with the failing cells to this image file")
    p.add_argument("--store", default=None, help="SQLite store: cells are written as they finish; re-run resumes")
    p.add_argument("--limit", type=positive_int, default=None, help="use only the first N operational samples")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None, help="torch device for the model, e.g. cuda")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.set_defaults(func=cmd_reliability)

    p = sub.add_parser("weight-robustness", help="robustness of each prediction to bounded weight perturbations",
                       epilog=EPILOG_WEIGHTS, formatter_class=fmt)  # fmt: skip
    p.add_argument("--model", required=True, help="model spec (as for `bastion evaluate`)")
    p.add_argument("--data", required=True, help="data spec (as for `bastion evaluate`)")
    p.add_argument("--eps", type=parse_one_eps, default=None,
                   help="relative perturbation size (default: decide at --max-eps)")  # fmt: skip
    p.add_argument("--max-eps", type=float, default=None, help="the largest eps searched (default 1.0)")
    p.add_argument("--relative", default="elementwise", choices=["elementwise", "layer"],
                   help="|dw| <= eps|w| (elementwise) or eps * max|W| per layer")  # fmt: skip
    p.add_argument("--layers", default=None, help="comma-separated layer names to perturb (default: every Linear)")
    p.add_argument("--biases", action="store_true", help="perturb the biases too")
    p.add_argument("--method", default="interval", choices=["interval", "crown", "none"], help="the sound bound")
    p.add_argument("--attack-steps", type=positive_int, default=50, help="PGD steps on the weights (50)")
    p.add_argument("--batch-size", type=positive_int, default=64)
    p.add_argument("--store", default=None, help="SQLite store: records are written per batch; re-run resumes")
    p.add_argument("--limit", type=positive_int, default=None, help="use only the first N samples")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None, help="torch device for the model, e.g. cuda")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.set_defaults(func=cmd_weight_robustness)
