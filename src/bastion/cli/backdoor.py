"""``bastion backdoor-scan``: find the poison in a training set, or examine and repair a backdoored model.

One call of :mod:`bastion.poisoning.defenses` per method: spectral signatures (``ss``), activation clustering
(``ac``), STRIP (``strip``), sphere/slab sanitisation (``sanitize``), Neural Cleanse (``neural-cleanse``) and
fine-pruning (``fine-prune``).

With ``--poisoned FILE.npz`` (a file of ``bastion poison``, read with :meth:`PoisonedData.load`), the poisoned
training set, its poison indices, the trigger, the target and the label map come from the file: detections get
precision/recall, and the attack success rate (ASR) of the file's trigger is measured on clean test data before and
after the mitigation (fine-pruning; Neural Cleanse's unlearning of the flagged classes; retraining a fresh copy of
the model on the sanitised set with ``--retrain EPOCHS`` for the data-level scans).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from bastion.cli.common import check_device, model_and_data, positive_int, print_result
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


_DATA_LEVEL = ("ss", "ac", "sanitize", "strip")


def read_poisoned(path: str) -> Any:
    """The :class:`~bastion.poisoning.PoisonedData` of ``--poisoned``, which must carry a backdoor trigger."""
    from bastion.errors import DataError
    from bastion.poisoning import PoisonedData

    try:
        poisoned = PoisonedData.load(path)
    except DataError as exc:
        raise BastionError(f"--poisoned {path!r}: {exc}") from None
    if poisoned.trigger is None:
        raise BastionError(
            f"--poisoned {path!r}: the file holds no backdoor trigger (attack {poisoned.attack!r}); --poisoned takes "
            "a backdoor's file (badnets, blended, wanet, input-aware). For detection precision/recall alone use "
            "--data FILE --poison-indices FILE"
        )
    return poisoned


def _fresh_copy(model: Any, seed: int) -> Any:
    """A copy of ``model`` with every layer's parameters re-initialised (seeded), for retraining from scratch."""
    import copy

    import torch

    fresh = copy.deepcopy(model)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for module in fresh.modules():
            reset = getattr(module, "reset_parameters", None)
            if callable(reset):
                reset()
    return fresh


def _scan_data(args: argparse.Namespace) -> tuple[Any, Any, Any, Any]:
    """(model, scanned or defender's data, poison positions or None, PoisonedData or None) from the flags."""
    from bastion.data import load_data
    from bastion.models import load_model

    if args.poisoned is None:
        if args.data is None:
            raise BastionError("--data is required (or give --poisoned FILE.npz, a file of `bastion poison`)")
        model, data = model_and_data(args)
        poison = (
            read_poison_indices(args.poison_indices, len(data), limited=args.limit is not None)
            if args.poison_indices
            else None
        )
        return model, data, poison, None
    if args.poison_indices:
        raise BastionError("--poisoned already holds the poison indices; drop --poison-indices")
    poisoned = read_poisoned(args.poisoned)
    device = check_device(args.device) if args.device else None
    if args.method in _DATA_LEVEL and args.data is not None:
        raise BastionError(
            f"--method {args.method} scans the poisoned set of --poisoned; drop --data (clean test data for the "
            "ASR goes in --test)"
        )
    if args.method in _DATA_LEVEL:
        data = poisoned.data
        poison = poisoned.poison_indices
        if args.limit is not None:
            data = data.subset(slice(0, args.limit))
            poison = poison[poison < len(data)]
    else:
        data = load_data(args.data) if args.data is not None else _clean_part(poisoned)
        if args.limit is not None:
            data = data.subset(slice(0, args.limit))
        poison = None
    if data.feature_shape != poisoned.data.feature_shape:
        raise BastionError(
            f"--data holds inputs of shape {data.feature_shape}, --poisoned {poisoned.data.feature_shape}"
        )
    model = load_model(args.model, input_shape=data.feature_shape, num_classes=data.num_classes)
    if device is not None:
        model = model.to(device)
    return model, data, poison, poisoned


def _clean_part(poisoned: Any) -> Any:
    """The poisoned set without its poisons and noise-mode samples: the clean samples the attacker left alone."""
    import torch

    keep = ~poisoned.poison_mask()
    if poisoned.cross_indices is not None:
        keep[poisoned.cross_indices] = False
    return poisoned.data.subset(torch.nonzero(keep).reshape(-1), name=f"{poisoned.data.name} (clean part)")


def _asr(model: Any, test: Any, poisoned: Any) -> float:
    from bastion.poisoning import attack_success_rate

    return attack_success_rate(model, test, poisoned.trigger, poisoned.target, mode=poisoned.mode or "all-to-one")


def _mitigation(
    args: argparse.Namespace, model: Any, data: Any, clean: Any, test: Any, poisoned: Any, result: Any
) -> dict[str, Any]:
    """ASR and clean accuracy of the file's trigger before and after the method's mitigation.

    ``data`` is the scanned set (data-level methods) or the defender's data, ``clean`` the held-out clean data
    when there is one (Neural Cleanse unlearns on it).
    """
    from bastion.defenses.training import train
    from bastion.poisoning import clean_accuracy
    from bastion.poisoning import defenses as d

    out: dict[str, Any] = {
        "poisoned_file": args.poisoned, "attack": poisoned.attack, "target": poisoned.target, "mode": poisoned.mode,
        "n_poisons": poisoned.n_poisons, "test": args.test or "the clean part of the poisoned set",
        "clean_acc_before": clean_accuracy(model, test), "asr_before": _asr(model, test, poisoned),
        "mitigation": None, "clean_acc_after": None, "asr_after": None,
    }  # fmt: skip
    repaired = None
    if args.method == "fine-prune":
        out["mitigation"] = "fine-pruning"
        repaired = result.model
    elif args.method == "neural-cleanse":
        out["target_flagged"] = None if poisoned.target is None else poisoned.target in result.flagged
        if result.flagged:
            out["mitigation"] = f"unlearning the reversed triggers of {result.flagged}"
            repaired = d.unlearn(model, data if clean is None else clean, result, seed=args.seed)
        else:
            out["mitigation"] = "none (no class flagged)"
    elif args.retrain is not None:
        kept = result.sanitized(data)
        out["mitigation"] = f"retraining a fresh copy for {args.retrain} epochs on the {len(kept)} kept samples"
        repaired = _fresh_copy(model, args.seed)
        train(repaired, kept, epochs=args.retrain, lr=1e-3, seed=args.seed, progress=not args.json)
    if repaired is not None:
        out["clean_acc_after"] = clean_accuracy(repaired, test)
        out["asr_after"] = _asr(repaired, test, poisoned)
    return out


def _mitigation_table(m: dict[str, Any]) -> str:
    def pct(v: float | None) -> str:
        return "-" if v is None else f"{100 * v:.2f}%"

    head = f"poisoned file      {m['poisoned_file']} ({m['attack']}, {m['n_poisons']} poisons, " + (
        f"target {m['target']})" if m["target"] is not None else f"{m['mode']})"
    )
    lines = [head, f"test data          {m['test']}", f"mitigation         {m['mitigation'] or 'none'}"]
    if "target_flagged" in m:
        lines.append(f"true target flagged {'yes' if m['target_flagged'] else 'no'}")
    lines += [
        "                   before     after",
        f"clean accuracy     {pct(m['clean_acc_before']):>8}   {pct(m['clean_acc_after']):>8}",
        f"attack success     {pct(m['asr_before']):>8}   {pct(m['asr_after']):>8}",
    ]
    return "\n".join(lines)


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
    if args.poisoned is None and (args.test is not None or args.retrain is not None):
        raise BastionError("--test and --retrain measure the trigger of --poisoned FILE.npz; give --poisoned")
    if args.retrain is not None and args.method not in _DATA_LEVEL:
        raise BastionError(f"--retrain applies to the data-level scans ({', '.join(_DATA_LEVEL)}), not {args.method}")
    model, data, poison, poisoned = _scan_data(args)
    config = {"model_spec": args.model, "data_spec": args.data, "clean_spec": args.clean, "poisoned": args.poisoned}
    clean = None
    if args.clean:
        clean = load_data(args.clean)
    elif poison is not None:
        keep = torch.ones(len(data), dtype=torch.bool)
        keep[poison] = False
        clean = data.subset(keep, name=f"{data.name} (without the known poison)")
    test = None
    if poisoned is not None:
        test = load_data(args.test) if args.test else (clean if clean is not None else data)
        if args.test is None and args.method in _DATA_LEVEL:
            test = _clean_part(poisoned)
        if test.feature_shape != data.feature_shape:
            raise BastionError(f"--test holds inputs of shape {test.feature_shape}, the data {data.feature_shape}")
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
        one = poisoned is not None and poisoned.mode == "all-to-one"
        result = d.fine_prune(
            model, data if clean is None else clean, fine_tune_epochs=10 if args.epochs is None else args.epochs,
            test=test, trigger=poisoned.trigger if one else None, target=poisoned.target if one else None,
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
    if poisoned is None:
        print_result(result, args.json)
        return 0
    mitigation = _mitigation(args, model, data, clean, test, poisoned, result)
    if args.json:
        print(json.dumps({**result.to_dict(), "poisoned": mitigation}, indent=2))
    else:
        print(result.table())
        print(_mitigation_table(mitigation))
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
        "--poisoned FILE.npz (a backdoor's file from `bastion poison`) supplies the poisoned training set (scanned by\n"
        "ss/ac/sanitize/strip; --data is then not given), the poison indices (precision/recall), the trigger, target\n"
        "and label map: the scan also reports clean accuracy and ASR on --test (default: the clean part of the\n"
        "poisoned set, or --data for neural-cleanse/fine-prune) before and after the mitigation: fine-pruning,\n"
        "Neural Cleanse's unlearning of the flagged classes, or with --retrain N a fresh copy of the model trained\n"
        "N epochs on the samples the scan kept. A file without a trigger (labelflip, collision, matching) is refused.\n"
        "examples:\n"
        "  bastion backdoor-scan --model zoo:cnn@bd.pt --poisoned poisoned.npz --method ac --retrain 20 --test t.npz\n"
        "  bastion backdoor-scan --model zoo:cnn@bd.pt --poisoned poisoned.npz --method fine-prune --data clean.npz\n"
        "  bastion backdoor-scan --model zoo:cnn@bd.pt --data poisoned.npz --method ss --poison-indices poisoned.npz\n"
        "  bastion backdoor-scan --model zoo:cnn@bd.pt --data digits --method neural-cleanse --figure nc.png --json\n"
        "  bastion backdoor-scan --model zoo:cnn@bd.pt --data test.npz --method strip --clean digits --store runs.db",
        formatter_class=fmt,
    )
    p.add_argument("--model", required=True, help="model spec (as for `bastion evaluate`)")
    p.add_argument("--data", default=None, help="data spec (as for `bastion evaluate`); required without --poisoned")
    p.add_argument("--method", required=True, choices=METHODS, help="the defence")
    p.add_argument("--poison-indices", default=None, metavar="FILE.npz",
                   help="an .npz with a 'poison_indices' array (as `bastion poison --out` writes): gives "
                   "precision/recall")  # fmt: skip
    p.add_argument("--poisoned", default=None, metavar="FILE.npz",
                   help="a backdoor's poisoned set from `bastion poison`: data, poison indices, trigger and target "
                   "from the file; reports ASR before/after mitigation")  # fmt: skip
    p.add_argument("--test", default=None, metavar="SPEC",
                   help="with --poisoned: clean test data for accuracy and ASR (default: see above)")  # fmt: skip
    p.add_argument("--retrain", type=positive_int, default=None, metavar="EPOCHS",
                   help="with --poisoned, ss/ac/sanitize/strip: retrain a fresh copy of the model on the kept "
                   "samples and report its ASR")  # fmt: skip
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
