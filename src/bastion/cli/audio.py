"""``bastion audio attack``: attack a waveform classifier under a decibel budget, on synthetic vowels.

One call of :func:`bastion.evaluate.evaluate` with the :class:`~bastion.audio.DecibelBall` threat model and the
waveform attacks of :mod:`bastion.audio`; with ``--store`` the per-sample records are written as they go and a
re-run resumes.
"""

from __future__ import annotations

import argparse
import inspect
import json
import math
import time
from typing import Any

from bastion.cli.common import check_device, parse_opts, positive_int
from bastion.cli.pointcloud import format_summary, summarize_attack
from bastion.errors import BastionError

EPILOG = """\
examples:
  bastion audio attack                                  # PGD at -32 dB on the built-in vowel classifier
  bastion audio attack --attack cw --db -32 --json
  bastion audio attack --attack pgd --db -40 --steps 200 --store runs.db
  bastion audio attack --model zoo:audiocnn@vowels.pt --n 100 --attack-opt restarts=5

attacks:
  pgd  Madry et al., ICLR 2018: signed-gradient steps of 2.5/steps of each clip's radius, random start
  cw   Carlini & Wagner, IEEE S&P Workshops 2018: ||delta||^2 + c f(x + delta), max|delta| <= tau, Adam,
       tau <- 0.8 max|delta| after each success (steps=1000, lr=10/32768, const=1)
The budget --db is Carlini & Wagner's dB_x(delta) = 20 log10(max|delta| / max|x|) (default -32 dB); distances are
reported in dB. The built-in model (no --model) is a small 1-D CNN trained on the fly on synthetic vowels
(Peterson & Barney formants, 8 kHz, 0.5 s); --save-model keeps it. The psychoacoustic (frequency-masking) variant of
Qin et al., ICML 2019 is not implemented.
"""


def _attack(args: argparse.Namespace) -> Any:
    from bastion.audio import AudioCW, WaveformPGD

    cls: Any = {"pgd": WaveformPGD, "cw": AudioCW}[args.attack]
    accepted = [p.name for p in inspect.signature(cls.__init__).parameters.values() if p.kind is p.KEYWORD_ONLY]
    kwargs: dict[str, Any] = {}
    if args.steps is not None:
        kwargs["steps"] = args.steps
    for target, key, value in parse_opts(args.attack_opt):
        if target is not None or key not in accepted:
            raise BastionError(f"--attack-opt {key}: {cls.__name__} has no option {key!r}; options: {sorted(accepted)}")
        kwargs[key] = value
    return cls(**kwargs)


def cmd_attack(args: argparse.Namespace) -> int:
    """``bastion audio attack``: :func:`bastion.evaluate.evaluate` with one waveform attack."""
    from bastion.audio import DecibelBall, make_vowels, to_db
    from bastion.audio.demo import demo_audiocnn
    from bastion.evaluate import evaluate
    from bastion.models import load_model, save_model

    started = time.perf_counter()
    device = check_device(args.device) if args.device else None
    threat = DecibelBall(args.db)
    attack = _attack(args)
    if args.model is None:
        model, data = demo_audiocnn(seconds=args.seconds, train_n=args.train_n, test_n=args.n, epochs=args.epochs,
                                    seed=args.seed, progress=not args.json)  # fmt: skip
        if args.save_model:
            save_model(model, args.save_model)
    else:
        if args.save_model:
            raise BastionError("--save-model keeps the built-in model; it does not apply with --model")
        data = make_vowels(args.n, seconds=args.seconds, seed=args.seed + 1)
        model = load_model(args.model, input_shape=data.feature_shape, num_classes=data.num_classes)
    if device is not None:
        model = model.to(device)
    result = evaluate(
        model, data, threat, [attack], batch_size=args.batch_size, store=args.store, seed=args.seed,
        progress=not args.json, checks=False, config={"model_spec": args.model or "built-in"},
    )  # fmt: skip
    summary = summarize_attack(result, threat.key, repr(attack), time.perf_counter() - started, unit="dB")
    for key in ("median_distance", "mean_distance"):
        if summary[key] is not None:  # the records hold max|delta| / max|x|; the figures are in dB
            summary[key] = float(to_db(summary[key])) if summary[key] > 0 else -math.inf
    summary["db_budget"] = args.db
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        print(format_summary(summary))
    return 0


def _db(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of decibels such as -32, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"the budget must be a finite number of decibels, got {text!r}")
    return value


def add_parsers(sub: Any, fmt: Any) -> None:
    """Register ``bastion audio attack`` on the ``bastion`` sub-parser ``sub``."""
    group = sub.add_parser("audio", help="waveform attacks under a decibel budget (synthetic vowels, 1-D CNN)")
    commands = group.add_subparsers(dest="audio_command", required=True, metavar="COMMAND")
    p = commands.add_parser("attack", help="attack a waveform classifier", epilog=EPILOG, formatter_class=fmt)
    p.add_argument("--attack", default="pgd", choices=("pgd", "cw"), help="the attack (default: %(default)s)")
    p.add_argument("--db", type=_db, default=-32.0, help="budget in dB relative to the clip (default: %(default)s)")
    p.add_argument("--model", default=None, help="a waveform model spec (default: the built-in AudioCNN)")
    p.add_argument("--save-model", default=None, help="write the built-in model here (a .pt file)")
    p.add_argument("--n", type=positive_int, default=32, help="test clips attacked (default: %(default)s)")
    p.add_argument("--seconds", type=float, default=0.5, help="clip length in seconds at 8 kHz (default 0.5)")
    p.add_argument("--train-n", type=positive_int, default=600, help="built-in model: training clips")
    p.add_argument("--epochs", type=positive_int, default=10, help="built-in model: training epochs")
    p.add_argument("--steps", type=positive_int, default=None, help="attack iterations (default: the attack's)")
    p.add_argument("--attack-opt", action="append", default=[], metavar="KEY=VALUE", help="attack hyperparameter")
    p.add_argument("--batch-size", type=positive_int, default=32, help="clips per batch (and per store write)")
    p.add_argument("--seed", type=int, default=0, help="seeds the data, the built-in model and the attack")
    p.add_argument("--device", default=None, help="torch device, e.g. cuda")
    p.add_argument("--store", default=None, help="SQLite result store: records written as they go, runs resume")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.set_defaults(func=cmd_attack)
