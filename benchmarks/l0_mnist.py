"""L0-TRE on MNIST: proven lower and real upper bounds on the minimal number of changed pixels, against the
distances that bastion's l0 attacks find (JSMA, Carlini & Wagner l0, and L0-TRE's own search as an attack).

Models (trained on the first 8,000 MNIST test images, ``common.load_split``, cached in ``benchmarks/.cache/``):

* ``small``: two stride-2 convolutions (8 and 16 channels, 4x4 kernels) and two linear layers (100, 10); Adam, 3
  epochs. CROWN stays cheap on it.
* ``cnn``: the zoo ``cnn`` of ``common.get_model`` (32/64 channels, the model of the other MNIST benchmarks); its
  boxes are bounded with IBP and CROWN-IBP only (CROWN's intermediate bounds on its 25,088 first-layer neurons,
  for hundreds of boxes per image, do not fit this machine).

For the first ``--n`` images of the 2,000-image evaluation split, ``l0_robustness`` (``feature="pixel"``, the
paper's grid ``{0, 1}``, ``--max-subset`` levels, ``--budget`` subsets per level: level 1 is exhaustive, level 2
(``C(784, 2) = 306,936`` subsets) is not, so the proven lower bound is at most 2) gives the bracket ``[L, U]`` per
image. The attacks run without an l0 budget (``LpBall("l0", inf)``: minimal-distortion use) and their distances are
set beside ``U``. The soundness check is computed here: no attack may find an example with fewer than ``L`` changed
pixels, and every ``U`` is re-executed.

    .venv/bin/python benchmarks/l0_mnist.py                      # small model, N = 20
    .venv/bin/python benchmarks/l0_mnist.py --n 10 --model cnn --cw-steps 100
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common
from bastion.attacks import JSMA, CarliniWagnerL0
from bastion.defenses.training import train
from bastion.models.checks import model_device
from bastion.threat import LpBall
from bastion.verify.globalopt.l0 import L0TRE, global_robustness, l0_robustness

SMALL = {"arch": "conv-8-16-100", "seed": 0, "epochs": 3, "batch_size": 64, "lr": 1e-3}


def small_cnn() -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(1, 8, 4, stride=2, padding=1), nn.ReLU(), nn.Conv2d(8, 16, 4, stride=2, padding=1), nn.ReLU(),
        nn.Flatten(), nn.Linear(16 * 7 * 7, 100), nn.ReLU(), nn.Linear(100, 10),
    )  # fmt: skip


def get_small(split: common.Split) -> nn.Module:
    digest = hashlib.sha256(json.dumps(SMALL, sort_keys=True).encode()).hexdigest()[:10]
    path = common.CACHE_DIR / f"l0_small_{digest}.pt"
    if path.exists():
        print(f"model: loaded {path.name}")
        model = small_cnn()
        model.load_state_dict(torch.load(path, weights_only=True))
        return model.eval()
    torch.manual_seed(SMALL["seed"])
    model = small_cnn()
    t0 = time.perf_counter()
    train(model, split.train, epochs=SMALL["epochs"], batch_size=SMALL["batch_size"], lr=SMALL["lr"],
          seed=SMALL["seed"], progress=False)  # fmt: skip
    print(f"model: trained {SMALL} in {time.perf_counter() - t0:.1f} s")
    common.CACHE_DIR.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), path)
    return model.eval()


def pixels_changed(x_adv: Tensor, x: Tensor) -> Tensor:
    return (x_adv != x).reshape(x.shape[0], -1).sum(dim=1).double()


def fmt(v: float) -> str:
    return "inf" if math.isinf(v) else f"{v:g}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=20, help="evaluation images (the first N of the 2,000)")
    parser.add_argument("--model", choices=("small", "cnn"), default="small")
    parser.add_argument("--max-subset", type=int, default=2)
    parser.add_argument("--budget", type=int, default=20_000, help="subsets per level (level 2 uses the top-m pixels)")
    parser.add_argument("--splits", type=int, default=4)
    parser.add_argument("--cw-steps", type=int, default=200, help="Adam steps per C&W-l0 solve (paper's 1000)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", type=Path, default=None, help="also write the per-image rows as JSON here")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    split = common.load_split()
    model = get_small(split) if args.model == "small" else common.get_model(split)
    methods = ("ibp", "crown") if args.model == "small" else ("ibp", "crown-ibp")
    x, y = split.x_eval[: args.n], split.y_eval[: args.n]
    device = model_device(model)
    x, y = x.to(device), y.to(device)

    t0 = time.perf_counter()
    res = l0_robustness(
        model, x, y, max_subset=args.max_subset, budget=args.budget, feature="pixel", methods=methods,
        splits=args.splits,
    )  # fmt: skip
    t_tre = time.perf_counter() - t0
    threat = LpBall("l0", math.inf)
    attacks: dict[str, Any] = {
        "l0-tre attack": L0TRE(),
        "jsma": JSMA(gamma=1.0),
        f"cw-l0 ({args.cw_steps} steps)": CarliniWagnerL0(steps=args.cw_steps),
    }
    found: dict[str, Tensor] = {}
    times: dict[str, float] = {}
    for name, attack in attacks.items():
        t0 = time.perf_counter()
        out = attack(model, x, y, threat=threat)
        times[name] = time.perf_counter() - t0
        with torch.no_grad():
            ok = model(out.x_adv).argmax(1) != y
        found[name] = torch.where(ok, pixels_changed(out.x_adv, x), math.inf).cpu()

    lower, upper = res.lower.cpu(), res.upper.cpu()
    with torch.no_grad():
        re_ok = model(res.x_adv).argmax(1).cpu() != y.cpu()
    finite = torch.isfinite(upper)
    sound_upper = bool((re_ok[finite]).all()) and torch.equal(pixels_changed(res.x_adv, x).cpu()[finite], upper[finite])
    violations = {k: int((v < lower.double()).sum()) for k, v in found.items()}
    g = global_robustness(lower, upper, lower_range=args.max_subset + 1, upper_range=res.n_features)

    print(f"\nL0-TRE on {args.n} MNIST evaluation images, model {args.model}, methods {methods}, "
          f"max_subset {args.max_subset}, budget {args.budget}, splits {args.splits}")  # fmt: skip
    names = list(found)
    print("\n| image | label | L | U | " + " | ".join(names) + " |")
    print("|---|---|---|---|" + "---|" * len(names))
    rows = []
    for i in range(args.n):
        cells = [fmt(float(found[k][i])) for k in names]
        print(f"| {i} | {int(y[i])} | {int(lower[i])} | {fmt(float(upper[i]))} | " + " | ".join(cells) + " |")
        rows.append({"image": i, "L": int(lower[i]), "U": float(upper[i]), **{k: float(found[k][i]) for k in names}})

    def mean_finite(v: Tensor) -> str:
        f = v[torch.isfinite(v)]
        return f"{float(f.mean()):.2f} ({int(f.numel())}/{v.numel()} found)" if f.numel() else "-"

    print("\n| method | mean distance (found) | median | time (s) |")
    print("|---|---|---|---|")
    med = statistics.median(float(v) for v in upper)
    print(f"| L0-TRE upper bound U | {mean_finite(upper)} | {fmt(med)} | {t_tre:.1f} |")
    for k in names:
        med = statistics.median(float(v) for v in found[k])
        print(f"| {k} | {mean_finite(found[k])} | {fmt(med)} | {times[k]:.1f} |")
    print(f"\nproven lower bound L: mean {float(lower.double().mean()):.2f}, converged (L = U) "
          f"{int(res.converged.sum())}/{args.n}")  # fmt: skip
    print(f"global robustness bracket [mean L, mean U] = [{g.lower_mean:.3f}, {g.upper_mean:.3f}]; "
          f"95% Hoeffding interval for the expectation [{g.lower_ci:.3f}, {g.upper_ci:.3f}]")  # fmt: skip
    for k in names:
        better = int((upper < found[k]).sum())
        worse = int((upper > found[k]).sum())
        print(f"U vs {k}: U smaller on {better}, larger on {worse}, equal on {args.n - better - worse}")
    print(f"evaluations per image (mean): {float(res.evaluations.double().mean()):.0f} forwards, "
          f"{float(res.boxes.double().mean()):.0f} bound boxes")  # fmt: skip
    print(f"soundness: every U re-executed and counted: {sound_upper}; attack examples below L: {violations}")
    if args.json is not None:
        args.json.write_text(json.dumps(rows, indent=1))
    return 0 if sound_upper and not any(violations.values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
