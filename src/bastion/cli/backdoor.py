"""``bastion backdoor-scan``: find the poison in a training set, or examine and repair a backdoored model.

One call of :mod:`bastion.poisoning.defenses` per method: spectral signatures (``ss``), activation clustering
(``ac``), STRIP (``strip``), sphere/slab sanitisation (``sanitize``), Neural Cleanse (``neural-cleanse``) and
fine-pruning (``fine-prune``).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from bastion.cli.common import model_and_data, positive_int, print_result
from bastion.errors import BastionError

METHODS: tuple[str, ...] = ("neural-cleanse", "strip", "ss", "ac", "sanitize", "fine-prune")


def _figure_path(path: str) -> Path:
    """Fail before any work if the figure could not be written (missing folder, unknown format)."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure

    out = Path(path)
    if not out.parent.is_dir():
        raise BastionError(f"--figure {path!r}: the folder {str(out.parent)!r} does not exist")
    formats = Figure().canvas.get_supported_filetypes()
    if out.suffix.lstrip(".").lower() not in formats:
        raise BastionError(f"--figure {path!r}: unknown figure format; use one of .{', .'.join(sorted(formats))}")
    return out


def read_poison_indices(path: str, n: int, *, limited: bool = False) -> Any:
    """The ``poison_indices`` array of an ``.npz`` file (as ``bastion poison --out`` writes), checked against ``n``.

    With ``limited`` (the data was cut to its first ``n`` samples by ``--limit``), positions at or beyond ``n`` are
    dropped; otherwise they are an error.
    """
    import zipfile

    import numpy as np

    from bastion.poisoning.defenses import check_poison_indices

    p = Path(path)
    if not p.is_file():
        raise BastionError(f"--poison-indices {path!r}: no such file")
    try:
        archive: Any = np.load(p, allow_pickle=False)
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
        raise BastionError(f"--poison-indices {path!r}: cannot read it as a .npz archive ({exc})") from None
    if not hasattr(archive, "files"):
        raise BastionError(f"--poison-indices {path!r}: a single array, not an .npz archive with 'poison_indices'")
    with archive:
        if "poison_indices" not in archive.files:
            raise BastionError(
                f"--poison-indices {path!r}: no array named 'poison_indices' (the archive holds {list(archive.files)})"
            )
        raw = np.asarray(archive["poison_indices"])
    if limited and raw.dtype.kind in "iu" and raw.ndim == 1:
        raw = raw[raw < n]
    return check_poison_indices(raw, n, where=f"--poison-indices {path!r}")


def cmd_backdoor_scan(args: argparse.Namespace) -> int:
    """Run one defence of :mod:`bastion.poisoning.defenses` and print its result."""
    import torch

    from bastion.data import load_data
    from bastion.poisoning import defenses as d

    figure = _figure_path(args.figure) if args.figure else None
    if figure is not None and args.method == "fine-prune":
        raise BastionError("--figure: fine-prune draws no figure; drop --figure")
    if args.out and args.method != "fine-prune":
        raise BastionError("--out saves the repaired model of fine-prune only")
    model, data = model_and_data(args)
    poison = (
        read_poison_indices(args.poison_indices, len(data), limited=args.limit is not None)
        if args.poison_indices
        else None
    )
    config = {"model_spec": args.model, "data_spec": args.data, "clean_spec": args.clean}
    clean = None
    if args.clean:
        clean = load_data(args.clean)
    elif poison is not None:
        keep = torch.ones(len(data), dtype=torch.bool)
        keep[poison] = False
        clean = data.subset(keep, name=f"{data.name} (without the known poison)")
    progress = not args.json
    result: Any
    if args.method == "ss":
        result = d.spectral_signatures(
            model, data, poison_fraction=args.poison_fraction, poison_indices=poison, store=args.store, config=config
        )
    elif args.method == "ac":
        result = d.activation_clustering(
            model, data, reduce=args.reduce, seed=args.seed, poison_indices=poison, store=args.store, config=config
        )
    elif args.method == "sanitize":
        result = d.sanitize(
            data, model=model, space=args.space, percentile=args.percentile, poison_indices=poison, store=args.store,
            config=config,
        )  # fmt: skip
    elif args.method == "strip":
        if clean is None:
            raise BastionError(
                "strip needs held-out clean inputs: --clean SPEC (or --poison-indices, to use the rest of --data)"
            )  # fmt: skip
        result = d.strip_scan(
            model, data, clean, seed=args.seed, poison_indices=poison, store=args.store, progress=progress,
            config=config,
        )  # fmt: skip
    elif args.method == "neural-cleanse":
        result = d.neural_cleanse(
            model, data if clean is None else clean, epochs=args.epochs or 1000, seed=args.seed, store=args.store,
            progress=progress, config=config,
        )  # fmt: skip
    else:
        result = d.fine_prune(
            model, data if clean is None else clean, fine_tune_epochs=10 if args.epochs is None else args.epochs,
            seed=args.seed, store=args.store, progress=progress, config=config,
        )  # fmt: skip
    if figure is not None:
        if args.method == "neural-cleanse":
            d.plot_triggers(result, figure)
            d.plot_anomaly_indices(result, figure.with_name(f"{figure.stem}-anomaly{figure.suffix}"))
        else:
            d.plot_scores(result, figure)
    if args.out:
        from bastion.models import save_model

        save_model(result.model, args.out)
    print_result(result, args.json)
    return 0


def add_parsers(sub: Any, fmt: Any) -> None:
    """Register this module's commands on the ``bastion`` sub-parser ``sub``."""
    p = sub.add_parser(
        "backdoor-scan",
        help="find poisoned training samples or a backdoor (spectral signatures, activation clustering, STRIP, "
        "sanitisation, Neural Cleanse, fine-pruning)",
        epilog="methods:\n"
        "  ss              spectral signatures (Tran, Li & Madry, NeurIPS 2018)\n"
        "  ac              activation clustering (Chen et al., AAAI SafeAI 2019)\n"
        "  strip           STRIP (Gao et al., ACSAC 2019)\n"
        "  sanitize        sphere defence (Steinhardt, Koh & Liang, NeurIPS 2017)\n"
        "  neural-cleanse  Neural Cleanse (Wang et al., IEEE S&P 2019)\n"
        "  fine-prune      fine-pruning (Liu, Dolan-Gavitt & Garg, RAID 2018)\n"
        "--data is the training set for ss/ac/sanitize, the inputs to screen for strip, and the defender's clean\n"
        "data for neural-cleanse/fine-prune (without the --poison-indices samples when given).\n"
        "examples:\n"
        "  bastion backdoor-scan --model zoo:cnn@bd.pt --data poisoned.npz --method ss --poison-indices poisoned.npz\n"
        "  bastion backdoor-scan --model zoo:cnn@bd.pt --data digits --method neural-cleanse --figure nc.png --json\n"
        "  bastion backdoor-scan --model zoo:cnn@bd.pt --data test.npz --method strip --clean digits --store runs.db",
        formatter_class=fmt,
    )
    p.add_argument("--model", required=True, help="model spec (as for `bastion evaluate`)")
    p.add_argument("--data", required=True, help="data spec (as for `bastion evaluate`)")
    p.add_argument("--method", required=True, choices=METHODS, help="the defence")
    p.add_argument("--poison-indices", default=None, metavar="FILE.npz",
                   help="an .npz with a 'poison_indices' array (as `bastion poison --out` writes): gives "
                   "precision/recall")  # fmt: skip
    p.add_argument("--clean", default=None, metavar="SPEC",
                   help="held-out clean data (strip: the superimposed images; neural-cleanse/fine-prune: used "
                   "instead of --data)")  # fmt: skip
    p.add_argument("--poison-fraction", type=float, default=0.1,
                   help="ss: expected poison fraction within a class, the paper's epsilon (default 0.1)")  # fmt: skip
    p.add_argument("--reduce", choices=["ica", "pca"], default="ica", help="ac: dimension reduction (default ica)")
    p.add_argument("--space", choices=["input", "feature"], default="input", help="sanitize: where (default input)")
    p.add_argument("--percentile", type=float, default=95.0, help="sanitize: radius percentile (default 95)")
    p.add_argument("--epochs", type=positive_int, default=None,
                   help="neural-cleanse: most epochs per class (1000); fine-prune: fine-tuning epochs "
                   "(10)")  # fmt: skip
    p.add_argument("--figure", default=None, metavar="PATH",
                   help="neural-cleanse: reversed triggers (and PATH-anomaly: anomaly indices); others: "
                   "score histogram")  # fmt: skip
    p.add_argument("--out", default=None, metavar="MODEL.pt", help="fine-prune: save the repaired model here")
    p.add_argument("--store", default=None, help="SQLite store: per-sample (per-class) records; re-run resumes")
    p.add_argument("--limit", type=positive_int, default=None, help="use only the first N samples of --data")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None, help="torch device for the model, e.g. cuda")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(func=cmd_backdoor_scan)
