"""``bastion poison``: write a poisoned copy of a training set (label flipping, backdoors, clean-label attacks)."""

from __future__ import annotations

import argparse
import inspect
import json
from pathlib import Path
from typing import Any

from bastion.cli.common import check_device, parse_opts, positive_int
from bastion.errors import BastionError

EPILOG_POISON = """\
examples:
  bastion poison --attack badnets --rate 0.1 --target 0 --data digits --out poisoned.npz
  bastion train --objective standard --data poisoned.npz --arch cnn --epochs 20 --out backdoored.pt
  bastion poison --attack badnets --mode all-to-all --data mnist:~/data/mnist:train --out a2a.npz
  bastion poison --attack blended --attack-opt alpha=0.2 --data digits --out blended.npz
  bastion poison --attack wanet --attack-opt strength=0.5 --attack-opt cross_ratio=2 --data digits --out wanet.npz
  bastion poison --attack labelflip --rate 0.4 --data digits --out noisy.npz                 # random flips
  bastion poison --attack labelflip --rate 0.4 --source 1 --target 7 --data digits --out flip.npz   # 1 -> 7
  bastion poison --attack collision --model zoo:cnn@clean.pt --target 0 --target-data digits --target-index 5 \\
      --data digits --out frogs.npz
  bastion poison --attack matching --model zoo:cnn@clean.pt --target 0 --target-data test.npz --target-index 3 \\
      --rate 0.01 --attack-opt eps=0.0627 --attack-opt restarts=8 --data train.npz --out brew.npz
  bastion poison --attack badnets --rate 0.33 --rate-of target --data digits --out art33.npz   # ART's setting
  bastion poison --attack input-aware --arch cnn --epochs 300 --data train.npz --test test.npz \\
      --model-out dynamic.pt --out dynamic.npz
  bastion backdoor-scan --model zoo:cnn@dynamic.pt --poisoned dynamic.npz --method fine-prune --data test.npz

attacks (hyperparameters with --attack-opt KEY=VALUE; defaults are the papers'):
  labelflip  random label noise, or --source S relabelled --target (rate: fraction of the data / of class S)
  badnets    Gu et al. 2017: corner patch (patch_size, pattern=checkerboard|white, location, margin)
  blended    Chen et al. 2017: x' = (1-alpha) x + alpha k, alpha = 0.2, k fixed random noise or --pattern FILE.npy
  wanet      Nguyen & Tran, ICLR 2021: warping trigger (k=4, strength=0.5, grid_rescale=1, cross_ratio=2)
  collision  Shafahi et al., NeurIPS 2018 (Poison Frogs): clean-label feature collision against --model's
             penultimate features (n_poisons=1 unless --rate, beta0=0.25, max_iters=1500, watermark=0..0.3)
  matching   Geiping et al., ICLR 2021 (Witches' Brew): eps-bounded gradient matching against --model
             (rate=0.01, eps=16/255, steps=250, restarts: 8 on CUDA / 2 on CPU, augment=False)
  input-aware  Nguyen & Tran, NeurIPS 2020: input-aware dynamic backdoor. A training-time attack: it trains the
             victim (--arch, or the network given by --model) jointly with a pattern generator, after pre-training
             a mask generator (rate = rho_b = 0.1 backdoor and cross_rate = rho_c = 0.1 cross-trigger fraction of
             each batch, lambda_div=1, lambda_norm=100, mask_density=0.032, mask_epochs=25, --epochs joint epochs
             (default 600, the paper's), batch_size=128, lr=2e-3 Adam or optimizer=sgd, lr_generator=0.01,
             width=16, steps=2).
             Writes two files: --model-out FILE.pt, the backdoored classifier (save_model format: load it as
             zoo:ARCH@FILE.pt), and --out FILE.npz, a poisoned training set as the victim saw it (one seeded draw:
             rate of --data triggered and relabelled, cross_rate cross-triggered, with poison_indices) whose
             trigger holds the two generators' weights (plain arrays, nothing pickled). Evaluate the trigger with
             --test SPEC (clean accuracy, ASR, cross-trigger accuracy); scan it with
             `bastion backdoor-scan --poisoned FILE.npz`.
--rate is the poison rate (default: the attack's own, 10 % for labelflip and the backdoors). For badnets, blended
and wanet, --rate-of says what it counts: `set` (default, BadNets' convention): the fraction of the whole training
set poisoned; `target` (the detection papers' and ART's percent_poison): the fraction of the poisoned target class
that is poison, n = round(rate * n_target / (1 - rate)); ART's MNIST notebooks use --rate 0.33 --rate-of target.
The output is an .npz with x, y, poison_indices, the trigger and a JSON config; `bastion train --data` reads it as
an ordinary data set.
"""

_BACKDOORS = ("badnets", "blended", "wanet")
_TARGETED = ("collision", "matching")
_TRAINING = ("input-aware",)


def _attack_kwargs(args: argparse.Namespace, cls: Any) -> dict[str, Any]:
    accepted = [p.name for p in inspect.signature(cls.__init__).parameters.values() if p.kind is p.KEYWORD_ONLY]
    kwargs: dict[str, Any] = {}
    if args.rate is not None:
        kwargs["rate"] = args.rate
    if args.attack == "labelflip":
        if args.source is not None:
            kwargs["pairs"] = [(args.source, args.target)]
    else:
        kwargs["target"] = args.target
    if args.attack in _BACKDOORS + _TRAINING:
        kwargs["mode"] = args.mode
    elif args.mode != "all-to-one":
        raise BastionError(
            f"--mode applies to the backdoors ({', '.join(_BACKDOORS + _TRAINING)}), not to {args.attack}"
        )
    if args.rate_of is not None:
        if args.attack not in _BACKDOORS:
            raise BastionError(f"--rate-of applies to {', '.join(_BACKDOORS)}, not to {args.attack}")
        kwargs["rate_of"] = args.rate_of
    if args.attack in _TRAINING:
        if args.epochs is not None:
            kwargs["epochs"] = args.epochs
    else:
        for flag, value in (("--epochs", args.epochs), ("--model-out", args.model_out), ("--test", args.test)):
            if value is not None:
                raise BastionError(f"{flag} applies to --attack {', '.join(_TRAINING)} only")
    if args.source is not None and args.attack != "labelflip":
        raise BastionError("--source applies to --attack labelflip only (targeted class-pair flipping)")
    if "seed" in accepted:
        kwargs["seed"] = args.seed
    if "progress" in accepted:
        kwargs["progress"] = not args.json
    for target, key, value in parse_opts(args.attack_opt):
        if target is not None:
            raise BastionError(f"--attack-opt {target}.{key}: write KEY=VALUE (there is a single attack)")
        if key not in accepted or key in ("progress",):
            raise BastionError(f"--attack-opt {key}: {cls.__name__} has no option {key!r}; options: {accepted}")
        kwargs[key] = value
    if args.pattern is not None:
        if "pattern" not in accepted:
            raise BastionError(f"--pattern applies to badnets and blended, not to {args.attack}")
        kwargs["pattern"] = _load_pattern(args.pattern)
    return kwargs


def _load_pattern(path: str) -> Any:
    import numpy as np
    import torch

    p = Path(path).expanduser()
    if not p.is_file() or p.suffix.lower() != ".npy":
        raise BastionError(f"--pattern {path!r}: give an existing .npy file holding the pattern (values in [0, 1])")
    try:
        arr = np.load(p, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise BastionError(f"--pattern {path!r}: cannot read it as a .npy array ({exc})") from None
    if arr.dtype == np.uint8:
        arr = arr.astype(np.float32) / 255
    if arr.dtype.kind not in "fiu":
        raise BastionError(f"--pattern {path!r}: expected a numeric array, got dtype {arr.dtype}")
    return torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float32))


def _targets(args: argparse.Namespace, data: Any) -> tuple[Any, Any]:
    """The target images (and their labels) of a targeted clean-label attack, from --target-data/--target-index."""
    import torch

    from bastion.data import load_data

    if args.target_data is None:
        raise BastionError(f"--attack {args.attack} needs the target image(s): --target-data SPEC [--target-index I]")
    tdata = load_data(args.target_data)
    if tdata.feature_shape != data.feature_shape:
        raise BastionError(
            f"--target-data holds inputs of shape {tdata.feature_shape}, the training data {data.feature_shape}"
        )
    if args.target_index is None:
        others = torch.nonzero(tdata.y != args.target).reshape(-1)
        if others.numel() == 0:
            raise BastionError(f"--target-data holds no sample outside the target class {args.target}")
        idx = [int(others[0])]
    else:
        try:
            idx = [int(v) for v in args.target_index.split(",") if v.strip()]
        except ValueError:
            raise BastionError(f"--target-index {args.target_index!r}: give indices like 5 or 3,8,12") from None
        bad = [i for i in idx if not 0 <= i < len(tdata)]
        if not idx or bad:
            raise BastionError(f"--target-index {args.target_index!r}: indices must lie in [0, {len(tdata)})")
    sub = tdata.subset(idx)
    return sub.x, sub.y


def cmd_poison(args: argparse.Namespace) -> int:
    """``bastion poison``: one call of a :mod:`bastion.poisoning` attack, the result written with ``save``."""
    from bastion.data import load_data
    from bastion.models import load_model
    from bastion.poisoning import ATTACKS

    out = Path(args.out).expanduser()
    if out.suffix.lower() != ".npz":
        raise BastionError(f"--out {args.out!r}: the poisoned data set is written as .npz; end the name in .npz")
    if not out.resolve().parent.is_dir():
        raise BastionError(f"--out {args.out!r}: the folder {out.resolve().parent} does not exist")
    cls = ATTACKS[args.attack]
    kwargs = _attack_kwargs(args, cls)
    device = check_device(args.device) if args.device else None
    if args.attack in _TRAINING:
        return _training_attack(args, cls, kwargs, out, device)
    if args.arch is not None:
        raise BastionError(f"--arch applies to --attack {', '.join(_TRAINING)} only")
    data = load_data(args.data)
    if args.limit is not None:
        data = data.subset(slice(0, args.limit))
    if args.attack in _TARGETED:
        if args.model is None:
            raise BastionError(f"--attack {args.attack} attacks a trained network: give it with --model SPEC")
        model = load_model(args.model, input_shape=data.feature_shape, num_classes=data.num_classes)
        if device is not None:
            model = model.to(device)
        tx, ty = _targets(args, data)
        attack: Any = cls(**kwargs)
        poisoned = attack(data, model, tx, target_y=ty)
    else:
        if args.model is not None or args.target_data is not None:
            raise BastionError(f"--attack {args.attack} needs neither --model nor --target-data")
        attack = cls(**kwargs)
        poisoned = attack(data)
    path = poisoned.save(out)
    summary = {
        "attack": repr(attack),
        "out": str(path),
        "n": len(poisoned.data),
        "n_poisons": poisoned.n_poisons,
        "rate": poisoned.rate,
        "target": poisoned.target,
        "mode": poisoned.mode,
        "trigger": None if poisoned.trigger is None else repr(poisoned.trigger),
        "n_cross": None if poisoned.cross_indices is None else int(poisoned.cross_indices.numel()),
        "data_spec": args.data,
        "config": poisoned.config,
    }
    if args.json:
        print(json.dumps(summary, indent=2))
        return 0
    print(f"attack:   {summary['attack']}")
    print(f"poisoned: {poisoned.n_poisons} of {len(poisoned.data)} samples ({poisoned.rate:.2%})"
          + (f", target class {poisoned.target}" if poisoned.target is not None else "")
          + (f", {poisoned.mode}" if poisoned.mode else ""))  # fmt: skip
    if poisoned.trigger is not None:
        print(f"trigger:  {poisoned.trigger!r}")
    if poisoned.cross_indices is not None:
        print(f"noise mode: {int(poisoned.cross_indices.numel())} warped samples keep their labels")
    print(f"written:  {path}   (train on it with: bastion train --data {path} ...)")
    return 0


def _training_attack(args: argparse.Namespace, cls: Any, kwargs: dict[str, Any], out: Path, device: Any) -> int:
    """``--attack input-aware``: train the backdoored model, save it (--model-out) and a poisoned draw (--out)."""
    import torch

    from bastion.data import load_data
    from bastion.models import build_model, load_model, save_model
    from bastion.poisoning import attack_success_rate, clean_accuracy, cross_trigger_accuracy

    if args.model_out is None:
        raise BastionError(f"--attack {args.attack} trains the backdoored model: give --model-out FILE.pt to save it")
    model_out = Path(args.model_out).expanduser()
    if model_out.suffix.lower() != ".pt":
        raise BastionError(f"--model-out {args.model_out!r}: the model is saved with save_model; end the name in .pt")
    if not model_out.resolve().parent.is_dir():
        raise BastionError(f"--model-out {args.model_out!r}: the folder {model_out.resolve().parent} does not exist")
    if args.target_data is not None or args.target_index is not None or args.pattern is not None:
        raise BastionError(f"--attack {args.attack} takes no --target-data, --target-index or --pattern")
    if args.model is not None and args.arch is not None:
        raise BastionError("give the network to backdoor with --arch (fresh) or --model (its weights), not both")
    data = load_data(args.data)
    if args.limit is not None:
        data = data.subset(slice(0, args.limit))
    test = load_data(args.test) if args.test is not None else None
    if test is not None and test.feature_shape != data.feature_shape:
        raise BastionError(f"--test holds inputs of shape {test.feature_shape}, --data {data.feature_shape}")
    if args.model is not None:
        model = load_model(args.model, input_shape=data.feature_shape, num_classes=data.num_classes)
    else:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(args.seed)
            model = build_model(args.arch or "cnn", data.feature_shape, data.num_classes)
    if device is not None:
        model = model.to(device)
    attack = cls(**kwargs)
    result = attack(model, data)
    save_model(result.model.cpu(), model_out)
    poisoned = result.poisoned_data(data)
    path = poisoned.save(out)
    summary: dict[str, Any] = {
        "attack": repr(attack),
        "model_out": str(model_out),
        "out": str(path),
        "n": len(poisoned.data),
        "n_poisons": poisoned.n_poisons,
        "rate": poisoned.rate,
        "target": poisoned.target,
        "mode": poisoned.mode,
        "trigger": repr(poisoned.trigger),
        "n_cross": None if poisoned.cross_indices is None else int(poisoned.cross_indices.numel()),
        "data_spec": args.data,
        "seconds": result.seconds,
        "final_epoch": result.history[-1] if result.history else None,
        "config": poisoned.config,
    }
    if test is not None:
        trig = result.trigger
        summary["test_spec"] = args.test
        summary["clean_accuracy"] = clean_accuracy(result.model, test)
        summary["attack_success_rate"] = attack_success_rate(
            result.model, test, trig, poisoned.target, mode=poisoned.mode or "all-to-one"
        )
        summary["cross_trigger_accuracy"] = cross_trigger_accuracy(result.model, test, trig, seed=args.seed)
    if args.json:
        print(json.dumps(summary, indent=2))
        return 0
    print(f"attack:   {summary['attack']}")
    print(f"trained:  {len(result.history)} joint epochs after {len(result.mask_history)} mask epochs "
          f"in {result.seconds:.1f} s")  # fmt: skip
    if test is not None:
        print(f"test:     clean accuracy {summary['clean_accuracy']:.2%}, ASR {summary['attack_success_rate']:.2%}, "
              f"cross-trigger accuracy {summary['cross_trigger_accuracy']:.2%}")  # fmt: skip
    print(f"model:    {model_out}   (load it as zoo:{getattr(result.model, 'bastion_spec', {}).get('arch', 'ARCH')}"
          f"@{model_out})")  # fmt: skip
    print(f"poisoned: {path}   ({poisoned.n_poisons} triggered of {len(poisoned.data)}, trigger {poisoned.trigger!r})")
    return 0


def add_parsers(sub: Any, fmt: Any) -> None:
    """Register this module's commands on the ``bastion`` sub-parser ``sub``."""
    from bastion.poisoning import ATTACKS, MODES

    p = sub.add_parser("poison", help="write a poisoned training set (label flipping, backdoors, clean-label attacks)",
                       epilog=EPILOG_POISON, formatter_class=fmt)  # fmt: skip
    p.add_argument("--attack", required=True, choices=sorted(ATTACKS), help="the poisoning attack")
    p.add_argument("--data", required=True, help="the clean training data spec (as for `bastion train`)")
    p.add_argument("--out", required=True, help="the poisoned data set to write (.npz)")
    p.add_argument("--rate", type=float, default=None,
                   help="poison rate in (0, 1], the fraction of the training set poisoned (default: the attack's)",
                   )  # fmt: skip
    p.add_argument("--target", type=int, default=0,
                   help="target class: the backdoor's, the adversarial class of collision/matching, or the "
                   "destination of --source (default: %(default)s)")  # fmt: skip
    p.add_argument(
        "--mode", default="all-to-one", choices=list(MODES), help="backdoor label map (default: %(default)s)"
    )
    p.add_argument("--source", type=int, default=None, help="labelflip: flip this class to --target (targeted)")
    p.add_argument("--model", default=None,
                   help="collision/matching: the trained network to attack; input-aware: the network to backdoor "
                   "(model spec)")  # fmt: skip
    p.add_argument("--target-data", default=None, help="collision/matching: data spec holding the target image(s)")
    p.add_argument("--target-index", default=None,
                   help="collision/matching: index (or comma-separated indices) of the target(s) in --target-data "
                   "(default: the first sample not of class --target)")  # fmt: skip
    p.add_argument("--pattern", default=None, help="badnets/blended: the trigger pattern as a .npy file")
    p.add_argument("--rate-of", default=None, choices=["set", "target"],
                   help="badnets/blended/wanet: --rate counts the whole training set (set, default) or the poisoned "
                   "target class (target, ART's percent_poison)")  # fmt: skip
    p.add_argument("--arch", default=None, choices=["mlp", "cnn", "resnet"],
                   help="input-aware: zoo architecture of the victim trained from scratch (default cnn)")  # fmt: skip
    p.add_argument("--epochs", type=positive_int, default=None, help="input-aware: joint training epochs (600)")
    p.add_argument("--model-out", default=None, metavar="FILE.pt",
                   help="input-aware: where to save the backdoored classifier (required)")  # fmt: skip
    p.add_argument("--test", default=None, metavar="SPEC",
                   help="input-aware: clean test data: report clean accuracy, ASR, cross-trigger accuracy")  # fmt: skip
    p.add_argument("--attack-opt", action="append", default=[], metavar="KEY=VALUE",
                   help="attack hyperparameter, repeatable (e.g. alpha=0.2, eps=0.0627, restarts=8)")  # fmt: skip
    p.add_argument("--limit", type=positive_int, default=None, help="poison only the first N samples of --data")
    p.add_argument("--seed", type=int, default=0, help="seeds the choice of the poisons and any random pattern")
    p.add_argument("--device", default=None, help="torch device for --model, e.g. cuda")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.set_defaults(func=cmd_poison)
