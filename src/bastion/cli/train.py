"""``bastion train``: adversarial and certified training of a zoo architecture."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any

from bastion.cli.common import check_device, parse_eps, parse_opts, positive_int
from bastion.errors import BastionError

EPILOG_TRAIN = """\
examples:
  bastion train --objective pgd-at --eps 0.3 --norm linf --data mnist:~/data/mnist:train --arch cnn --epochs 20 \\
      --out mnist-pgd.pt --store runs.db
  bastion train --objective trades --eps 0.1 --data digits --arch mlp --epochs 10 --out digits-trades.pt \\
      --objective-opt beta=1.0 --validation-fraction 0.1 --restore-best
  bastion train --objective fast-at --eps 0.3 --data mnist:~/data/mnist:train --epochs 10 --out fast.pt --resume
  torchrun --nproc-per-node 2 -m bastion.cli train --objective pgd-at --eps 0.3 --data digits --out m.pt
  bastion train --objective standard --data digits --arch mlp --regularizer parseval --regularizer \
      weight-correlation=0.1 --out parseval.pt

objectives: standard, fgsm-at, pgd-at, free-at, fast-at, n-fgsm, trades, mart, vat, wrm, feature-scattering,
  at-scr, latent-manifold, gaussian-noise, ibp, crown-ibp (options with --objective-opt KEY=VALUE, e.g. steps=10,
  step_size=0.01, beta=6, lam=6, replays=8, alpha=0.5, sigma=0.25, kappa_end=0.5, warmup=0.1, ramp=0.4; ibp and
  crown-ibp are certified training, l-inf only; vat, wrm and gaussian-noise set their own perturbation size and ignore
  --eps/--norm, which then only define the validation attack). A checkpoint is written after every epoch
  (OUT.ckpt unless --checkpoint); --resume continues from it with the same result as an uninterrupted run.

regularizers (--regularizer NAME[=WEIGHT], repeatable, added to any objective): parseval (Cisse et al. 2017:
  retraction after every step, WEIGHT = beta, default 0.0003), parseval-penalty (WEIGHT · ||W Wᵀ - I||²/2, 1.0),
  spectral-norm (Miyato et al. 2018: every layer reparametrised as W / sigma(W); the saved model has the
  normalised weights baked in), lipschitz (WEIGHT · log of the global Lipschitz bound, 0.01), weight-correlation
  (Jin et al. 2020: WEIGHT · mean |cos| between neurons, 0.1).
"""


def _regularizers(items: list[str]) -> list[tuple[str, float | None]]:
    """``--regularizer NAME[=WEIGHT]`` values as (name, weight or None)."""
    out: list[tuple[str, float | None]] = []
    for item in items:
        name, sep, raw = item.partition("=")
        if not name.strip():
            raise BastionError(f"--regularizer {item!r}: expected NAME or NAME=WEIGHT (e.g. parseval=0.0003)")
        try:
            weight = float(raw) if sep else None
        except ValueError:
            raise BastionError(f"--regularizer {item!r}: the weight {raw!r} is not a number") from None
        out.append((name.strip(), weight))
    return out


def cmd_train(args: argparse.Namespace) -> int:
    """``bastion train``: adversarial training of a zoo architecture (one AdversarialTrainer.fit call)."""
    import torch

    from bastion.data import load_data
    from bastion.defenses.regularizers import regularize, remove_spectral_normalization
    from bastion.defenses.training import AdversarialTrainer, make_objective
    from bastion.models import build_model, save_model
    from bastion.threat import LpBall

    device = check_device(args.device) if args.device else None
    out = Path(args.out).expanduser()
    if not out.resolve().parent.is_dir():
        raise BastionError(f"--out {args.out!r}: the folder {out.resolve().parent} does not exist")
    data = load_data(args.data)
    if args.limit is not None:
        data = data.subset(slice(0, args.limit))
    validation = None
    if args.validation_fraction:
        if not 0 < args.validation_fraction < 1:
            raise BastionError(f"--validation-fraction must be in (0, 1), got {args.validation_fraction}")
        data, validation = data.train_test_split(test_fraction=args.validation_fraction, seed=args.seed)
    if len(args.eps) != 1:
        raise BastionError("--eps takes one radius for training")
    threat = LpBall(args.norm, args.eps[0], domain=data.domain)
    options = {name: value for target, name, value in parse_opts(args.objective_opt) if target is None}
    objective = make_objective(args.objective, threat, **options)
    torch.manual_seed(args.seed)  # the initial weights, so that --resume rebuilds the same starting model
    model = build_model(args.arch, data.feature_shape, data.num_classes)
    objective = regularize(objective, model, _regularizers(args.regularizer))
    if device == "cuda" and "LOCAL_RANK" in os.environ:
        device = f"cuda:{os.environ['LOCAL_RANK']}"  # under torchrun: one GPU per process
    if device is not None:
        model = model.to(device)
    schedule = args.schedule or ("cyclic" if args.objective.lower() == "fast-at" else "constant")
    trainer = AdversarialTrainer(
        objective, threat=threat, epochs=args.epochs, batch_size=args.batch_size, optimizer=args.optimizer,
        lr=args.lr, weight_decay=args.weight_decay, schedule=schedule, seed=args.seed, validation=validation,
        val_steps=args.val_steps, restore_best=args.restore_best,
        checkpoint=args.checkpoint or str(out) + ".ckpt", resume=args.resume, store=args.store,
        progress=not args.json,
        metadata={"arch": args.arch, "data_spec": args.data, "limit": args.limit, "out": str(out)},
    )  # fmt: skip
    result = trainer.fit(model, data)
    if int(os.environ.get("RANK", "0")) != 0:
        return 0  # under torchrun only rank 0 writes the model and reports
    remove_spectral_normalization(model)  # a plain model of its architecture, loadable as one
    model_config = {"input_shape": list(data.feature_shape), "num_classes": data.num_classes}
    save_model(model.cpu(), out, arch=args.arch, config=model_config)
    rows = [m.to_dict() for m in result.history]
    summary = {
        "model": str(out), "objective": repr(objective), "passes": result.passes, "resumed_from": result.resumed_from,
        "best_epoch": result.best_epoch, "best_robust_acc": result.best_robust_acc,
        "restored_best": result.restored_best, "run_id": result.run_id, "world_size": result.world_size,
        "history": rows,
    }  # fmt: skip
    if args.json:
        print(json.dumps(summary, indent=2))
        return 0
    print(f"{'epoch':>5} {'loss':>9} {'train acc':>9} {'lr':>9} {'val clean':>9} {'val robust':>10} {'seconds':>8}")
    for r in rows:
        vc = "-" if r["val_clean_acc"] is None else f"{r['val_clean_acc']:.4f}"
        vr = "-" if r["val_robust_acc"] is None else f"{r['val_robust_acc']:.4f}"
        print(f"{r['epoch']:>5} {r['loss']:>9.4f} {r['train_acc']:>9.4f} {r['lr']:>9.2e} {vc:>9} {vr:>10} "
              f"{r['seconds']:>8.2f}")  # fmt: skip
    note = f" (best epoch {result.best_epoch} restored)" if result.restored_best else ""
    print(f"\nmodel: {out}{note}" + (f"   store: {args.store} (run {result.run_id})" if args.store else ""))
    return 0


def add_parsers(sub: Any, fmt: Any) -> None:
    """Register this module's commands on the ``bastion`` sub-parser ``sub``."""
    p = sub.add_parser("train", help="adversarial training of a zoo architecture (checkpointed, resumable)",
                       epilog=EPILOG_TRAIN, formatter_class=fmt)  # fmt: skip
    p.add_argument("--objective", default="pgd-at", help="training objective (default: %(default)s; see below)")
    p.add_argument("--objective-opt", action="append", default=[], metavar="KEY=VALUE",
                   help="objective hyperparameter, repeatable (e.g. steps=10, beta=1.0)")  # fmt: skip
    p.add_argument("--eps", type=parse_eps, default=[0.3], help="radius of the threat model (default: 0.3)")
    p.add_argument("--norm", default="linf", help="linf, l2 or l1 (default: %(default)s)")
    p.add_argument("--data", required=True, help="training data spec (as for `bastion evaluate`)")
    p.add_argument("--arch", default="cnn", choices=["mlp", "cnn", "resnet", "lstm"], help="zoo architecture")
    p.add_argument("--epochs", type=positive_int, default=10)
    p.add_argument("--batch-size", type=positive_int, default=128)
    p.add_argument("--optimizer", default="adam", choices=["adam", "sgd"])
    p.add_argument("--lr", type=float, default=1e-3, help="(peak) learning rate (default: %(default)s)")
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--schedule", default=None, choices=["constant", "multistep", "cosine", "cyclic"],
                   help="learning-rate schedule (default: cyclic for fast-at, constant otherwise)")  # fmt: skip
    p.add_argument("--validation-fraction", type=float, default=0.0,
                   help="hold out this fraction for per-epoch clean and PGD validation")  # fmt: skip
    p.add_argument("--val-steps", type=positive_int, default=10, help="PGD steps of the validation attack")
    p.add_argument("--restore-best", action="store_true",
                   help="end with the weights of the epoch of best validation robust accuracy (Rice et al. 2020)",
                   )  # fmt: skip
    p.add_argument(
        "--regularizer",
        action="append",
        default=[],
        metavar="NAME[=WEIGHT]",
        help="add a regulariser to the objective (repeatable; see below)",
    )
    p.add_argument("--out", required=True, help="where to save the trained model (save_model format)")
    p.add_argument("--checkpoint", default=None, help="checkpoint file (default: OUT.ckpt)")
    p.add_argument("--resume", action="store_true", help="continue from the checkpoint if it exists")
    p.add_argument("--store", default=None, help="SQLite store for the run and its per-epoch metrics")
    p.add_argument("--limit", type=positive_int, default=None, help="train on the first N samples only")
    p.add_argument("--seed", type=int, default=0, help="seeds the initial weights, shuffling and random starts")
    p.add_argument("--device", default=None, help="torch device, e.g. cuda")
    p.add_argument("--json", action="store_true", help="print the summary and history as JSON")
    p.set_defaults(func=cmd_train)
