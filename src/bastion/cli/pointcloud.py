"""``bastion pointcloud attack``: attack a point-cloud classifier (perturbation, adding, dropping), optionally behind
the SOR defence, on synthetic shapes.

One call of :func:`bastion.evaluate.evaluate` with the point-cloud threat models and attacks of
:mod:`bastion.pointcloud`; with ``--store`` every batch's per-sample records are written as they finish and a
re-run of the same command resumes.
"""

from __future__ import annotations

import argparse
import inspect
import json
import math
import time
from typing import Any

from bastion.cli.common import check_device, parse_opts, positive_int
from bastion.errors import BastionError

EPILOG = """\
examples:
  bastion pointcloud attack                                       # C&W perturbation, Chamfer, built-in PointNet
  bastion pointcloud attack --attack cw --metric l2 --eps inf --json
  bastion pointcloud attack --attack cw --metric hausdorff --eps 0.01
  bastion pointcloud attack --attack add --k 32 --metric chamfer --defense sor --sor-attack transfer
  bastion pointcloud attack --attack add --k 32 --defense sor --sor-attack adaptive --store runs.db
  bastion pointcloud attack --attack drop --k 200 --points 1024
  bastion pointcloud attack --model zoo:pointnet@pointnet.pt --points 1024 --n 64 --steps 500 --binary-steps 10

attacks:
  cw    Xiang, Qi & Li, CVPR 2019: C&W perturbation, D(x', x) + c f(x'), --metric l2|linf|chamfer|hausdorff, --eps
        (squared units for chamfer/hausdorff; inf = minimal distortion)
  add   Xiang, Qi & Li, CVPR 2019: --k added independent points, --metric chamfer|hausdorff from them to the cloud
  drop  Zheng, Chen, Cai & Cai, ICCV 2019: saliency-map dropping of up to --k points (5 per iteration, alpha=1)
defence (--defense sor): statistical outlier removal (DUP-Net, Zhou et al., ICCV 2019; k=2, alpha=1.1).
  --sor-attack transfer   craft on the undefended model, judge on SOR(model) (the naive attack)
               through    attack SOR(model) itself (gradients through the points SOR keeps)
               adaptive   through, plus the inlier penalty that keeps the moved points out of SOR's reach (default)
The built-in model (no --model) is a small PointNet trained on the fly on synthetic shapes (--train-n clouds,
--epochs); --save-model keeps it for `--model PATH` later. The CLI defaults (--steps 100, --binary-steps 5) are
sized for a CPU; the papers' are --steps 500 --binary-steps 10. Hyperparameters: --attack-opt KEY=VALUE.
"""

#: Weight of the inlier penalty of ``--sor-attack adaptive``.
ADAPTIVE_PENALTY = 100.0


def _attack(args: argparse.Namespace) -> Any:
    from bastion.pointcloud import PointAdd, PointCW, SaliencyDrop

    cls: Any = {"cw": PointCW, "add": PointAdd, "drop": SaliencyDrop}[args.attack]
    accepted = [p.name for p in inspect.signature(cls.__init__).parameters.values() if p.kind is p.KEYWORD_ONLY]
    if cls is PointAdd:
        accepted += [p for p in inspect.signature(PointCW.__init__).parameters if p not in ("self", "kwargs")]
    kwargs: dict[str, Any] = {}
    if args.attack != "drop":
        kwargs.update(steps=args.steps, binary_steps=args.binary_steps)
        if args.lr is not None:
            kwargs["lr"] = args.lr
        if args.defense == "sor" and args.sor_attack == "adaptive":
            kwargs["sor_penalty"] = ADAPTIVE_PENALTY
    for target, key, value in parse_opts(args.attack_opt):
        if target is not None or key not in accepted:
            raise BastionError(f"--attack-opt {key}: {cls.__name__} has no option {key!r}; options: {sorted(accepted)}")
        kwargs[key] = value
    return cls(**kwargs)


def _threat(args: argparse.Namespace, points: int) -> Any:
    from bastion.pointcloud import PointAdding, PointDropping, PointPerturbation

    if args.attack == "drop":
        if args.metric is not None or args.eps is not None:
            raise BastionError("--metric and --eps apply to --attack cw and add; --attack drop takes --k")
        return PointDropping(args.k if args.k is not None else max(points // 5, 1))
    eps = math.inf if args.eps is None else args.eps
    if args.attack == "add":
        k = args.k if args.k is not None else max(points // 32, 1)
        return PointAdding(k, args.metric or "chamfer", eps)
    if args.k is not None:
        raise BastionError("--k applies to --attack add and drop, not to cw")
    return PointPerturbation(args.metric or "chamfer", eps)


def cmd_attack(args: argparse.Namespace) -> int:
    """``bastion pointcloud attack``: :func:`bastion.evaluate.evaluate` with one point-cloud attack."""
    import torch

    from bastion.attacks.transfer import Transferred
    from bastion.data import Dataset
    from bastion.evaluate import evaluate
    from bastion.models import load_model, save_model
    from bastion.pointcloud import SOR, PointAdding, add_points, make_shapes
    from bastion.pointcloud.demo import demo_pointnet
    from bastion.pointcloud.threat import POINT_DOMAIN

    if args.defense != "sor" and args.sor_attack is not None:
        raise BastionError("--sor-attack applies with --defense sor")
    if args.attack == "drop" and args.defense == "sor" and args.sor_attack == "adaptive":
        raise BastionError("--sor-attack adaptive applies to --attack cw and add; use transfer or through for drop")
    started = time.perf_counter()
    device = check_device(args.device) if args.device else None
    threat = _threat(args, args.points)
    attack = _attack(args)
    if args.model is None:
        model, data = demo_pointnet(points=args.points, train_n=args.train_n, test_n=args.n, epochs=args.epochs,
                                    seed=args.seed, progress=not args.json)  # fmt: skip
        if args.save_model:
            save_model(model, args.save_model)
    else:
        if args.save_model:
            raise BastionError("--save-model keeps the built-in model; it does not apply with --model")
        data = make_shapes(args.n, points=args.points, seed=args.seed + 1)
        model = load_model(args.model, input_shape=data.feature_shape, num_classes=data.num_classes)
    if device is not None:
        model = model.to(device)
    if isinstance(threat, PointAdding):
        gen = torch.Generator().manual_seed(args.seed)
        data = Dataset(add_points(data.x, threat.k, gen), data.y, num_classes=data.num_classes,
                       name=f"{data.name} + {threat.k} copied points", domain=POINT_DOMAIN)  # fmt: skip
    target = model
    if args.defense == "sor":
        target = SOR(model, k=args.sor_k, alpha=args.sor_alpha)
        if (args.sor_attack or "adaptive") == "transfer":
            attack = Transferred(attack, model)
    result = evaluate(
        target, data, threat, [attack], batch_size=args.batch_size, store=args.store, seed=args.seed,
        progress=not args.json, checks=False,
        config={"model_spec": args.model or "built-in", "defense": args.defense, "sor_attack": args.sor_attack},
    )  # fmt: skip
    summary = summarize_attack(result, threat.key, repr(attack), time.perf_counter() - started)
    summary.update(defense=args.defense, sor_attack=(args.sor_attack or "adaptive") if args.defense == "sor" else None)
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        print(format_summary(summary))
    return 0


def summarize_attack(result: Any, key: str, attack: str, seconds: float, unit: str = "") -> dict[str, Any]:
    """The figures of one attack from an evaluation's per-sample records (shared with ``bastion audio attack``)."""
    records = [r for r in result.records if r.threat == key]
    correct = [r for r in records if r.clean_pred == r.label]
    broken = [r for r in correct if r.status == "falsified"]
    dists = sorted(float(r.adv_distance) for r in broken if r.adv_distance is not None)
    return {
        "attack": attack,
        "threat": key,
        "n": result.n,
        "clean_accuracy": result.clean_accuracy,
        "success_rate": len(broken) / len(correct) if correct else 0.0,
        "robust_accuracy": result.worst_case[key],
        "median_distance": dists[len(dists) // 2] if dists else None,
        "mean_distance": sum(dists) / len(dists) if dists else None,
        "distance_unit": unit,
        "seconds": seconds,
        "run_id": result.run_id,
    }


def format_summary(s: dict[str, Any]) -> str:
    def num(v: Any) -> str:
        return "-" if v is None else f"{v:.4g}"

    defence = f"   (defence: {s['defense']}, {s['sor_attack']})" if s.get("sor_attack") else ""
    run = f"   store run {s['run_id']}" if s.get("run_id") is not None else ""
    dist = f"median {num(s['median_distance'])}, mean {num(s['mean_distance'])} {s['distance_unit']}".rstrip()
    lines = [
        f"attack:          {s['attack']}",
        f"threat:          {s['threat']}{defence}",
        f"samples:         {s['n']}   clean accuracy {100 * s['clean_accuracy']:.2f}%",
        f"attack success:  {100 * s['success_rate']:.2f}% of the correctly classified",
        f"robust accuracy: {100 * s['robust_accuracy']:.2f}%",
        f"distance:        {dist}",
        f"time:            {s['seconds']:.1f} s{run}",
    ]
    return "\n".join(lines)


def _eps(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number or inf, got {text!r}") from None
    if math.isnan(value) or value < 0:
        raise argparse.ArgumentTypeError(f"eps must be >= 0 (or inf), got {text!r}")
    return value


def add_parsers(sub: Any, fmt: Any) -> None:
    """Register ``bastion pointcloud attack`` on the ``bastion`` sub-parser ``sub``."""
    group = sub.add_parser("pointcloud", help="point-cloud attacks and the SOR defence (synthetic shapes, PointNet)")
    commands = group.add_subparsers(dest="pointcloud_command", required=True, metavar="COMMAND")
    p = commands.add_parser("attack", help="attack a point-cloud classifier", epilog=EPILOG, formatter_class=fmt)
    p.add_argument("--attack", default="cw", choices=("cw", "add", "drop"), help="the attack (default: %(default)s)")
    p.add_argument("--metric", default=None, choices=("l2", "linf", "chamfer", "hausdorff"),
                   help="cw: perturbation metric; add: chamfer or hausdorff (default: chamfer)")  # fmt: skip
    p.add_argument("--eps", type=_eps, default=None, help="budget in the metric (default: inf, minimal distortion)")
    p.add_argument("--k", type=positive_int, default=None,
                   help="add: points added (default P/32); drop: most points dropped (default P/5)")  # fmt: skip
    p.add_argument("--model", default=None, help="a point-cloud model spec (default: the built-in PointNet)")
    p.add_argument("--save-model", default=None, help="write the built-in model here (a .pt file)")
    p.add_argument("--points", type=positive_int, default=256, help="points per cloud (default: %(default)s)")
    p.add_argument("--n", type=positive_int, default=32, help="test clouds attacked (default: %(default)s)")
    p.add_argument("--train-n", type=positive_int, default=400, help="built-in model: training clouds")
    p.add_argument("--epochs", type=positive_int, default=10, help="built-in model: training epochs")
    p.add_argument("--steps", type=positive_int, default=100, help="cw/add: Adam steps per constant (default 100)")
    p.add_argument("--binary-steps", type=positive_int, default=5, help="cw/add: binary-search steps (default 5)")
    p.add_argument("--lr", type=float, default=None, help="cw/add: Adam learning rate (default 0.01)")
    p.add_argument("--defense", default="none", choices=("none", "sor"), help="defence in front of the model")
    p.add_argument("--sor-attack", default=None, choices=("transfer", "through", "adaptive"),
                   help="how the attack meets SOR (default: adaptive)")  # fmt: skip
    p.add_argument("--sor-k", type=positive_int, default=2, help="SOR neighbours (default: %(default)s)")
    p.add_argument("--sor-alpha", type=float, default=1.1, help="SOR threshold factor (default: %(default)s)")
    p.add_argument("--attack-opt", action="append", default=[], metavar="KEY=VALUE", help="attack hyperparameter")
    p.add_argument("--batch-size", type=positive_int, default=32, help="clouds per batch (and per store write)")
    p.add_argument("--seed", type=int, default=0, help="seeds the data, the built-in model and the attack")
    p.add_argument("--device", default=None, help="torch device, e.g. cuda")
    p.add_argument("--store", default=None, help="SQLite result store: records written as they go, runs resume")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.set_defaults(func=cmd_attack)
