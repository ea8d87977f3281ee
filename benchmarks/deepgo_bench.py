"""DeepGO reachability benchmark: the reference's Experiment 1 (2-input networks, box [0, 10]^2, tolerance 0.01)
and a digits feature-subset case.

What is built (the reference's six trained "FunctionNNs" ship as MATLAB network objects that cannot be read
outside MATLAB, so this script trains its own): N-0 .. N-5 are ReLU MLPs of increasing size

    N-0 [8], N-1 [16], N-2 [16, 16], N-3 [32, 32], N-4 [32, 32, 32], N-5 [64, 64, 64]

each trained for 600 Adam steps (seed 0, float64) to regress the 2-D test function
``sin(x) cos(y) + 0.1 x`` on 4096 uniform points of [0, 10]^2. For each network the minimum and the maximum of its
output over [0, 10]^2 are bracketed to tolerance 0.01 with the sound interval constant and its defaults (CROWN
interval bounds on 32 pieces, one point per iteration as the paper), the same with ``points_per_iteration=8``
(batched), and, for comparison, with the reference's dynamic slope estimate (``lipschitz="estimate"``, not sound,
without interval bounds: the reference's method). ``--pure`` adds the paper's pure Lipschitz bound
(``interval_bounds=None``; minutes on N-4 and N-5). The dense grid (step 0.01, 1001^2 points) is the check: a sound
result must have ``lower <= grid min`` (resp. ``upper >= grid max``).

The digits case trains a 64-32-10 MLP (300 Adam steps) on scikit-learn's 8x8 digits and bounds the range of the
true-class logit of a test image when 2 and 3 chosen pixels move over [0, 1] (the others fixed), as the paper does
on MNIST with a few pixels.

DeepGO's published times (MATLAB, its own N-0 .. N-5) are 0.4-15.1 s.

Run: ``.venv/bin/python benchmarks/deepgo_bench.py [--quick] [--pure] [--time-limit S]`` (``--quick``: N-0 .. N-2
only; ``--time-limit``: seconds per min or max search, default 120).
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from torch import nn

from bastion.data import load_digits
from bastion.verify.globalopt.deepgo import deepgo_range

ARCHS = {"N-0": [8], "N-1": [16], "N-2": [16, 16], "N-3": [32, 32], "N-4": [32, 32, 32], "N-5": [64, 64, 64]}


def _mlp(d: int, hidden: list[int], out: int) -> nn.Sequential:
    layers: list[nn.Module] = []
    w = d
    for h in hidden:
        layers += [nn.Linear(w, h), nn.ReLU()]
        w = h
    layers.append(nn.Linear(w, out))
    return nn.Sequential(*layers)


def train_function_net(hidden: list[int], seed: int = 0, steps: int = 600) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = _mlp(2, hidden, 1).double()
    x = torch.rand(4096, 2, generator=g, dtype=torch.float64) * 10
    y = (torch.sin(x[:, 0]) * torch.cos(x[:, 1]) + 0.1 * x[:, 0]).unsqueeze(1)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(steps):
        opt.zero_grad()
        loss = ((model(x) - y) ** 2).mean()
        loss.backward()
        opt.step()
    return model.eval()


def grid_range(model: nn.Module, lo: float, hi: float, steps: int = 1001) -> tuple[float, float]:
    t = torch.linspace(lo, hi, steps, dtype=torch.float64)
    with torch.no_grad():
        v = model(torch.cartesian_prod(t, t))
    return float(v.min()), float(v.max())


#: (label, options of deepgo_range) of each row of experiment 1; PURE is added with --pure.
CONFIGS: list[tuple[str, dict[str, object]]] = [
    ("interval", {}),
    ("interval-ppi8", {"points_per_iteration": 8}),
    ("estimate", {"lipschitz": "estimate", "interval_bounds": None}),
]
PURE = ("interval-pure", {"interval_bounds": None})


def experiment1(names: list[str], time_limit: float, pure: bool = False) -> list[dict[str, object]]:
    rows = []
    lo, hi = torch.zeros(1, 2, dtype=torch.float64), torch.full((1, 2), 10.0, dtype=torch.float64)
    c = torch.ones(1, dtype=torch.float64)
    configs = [*CONFIGS, PURE] if pure else CONFIGS
    for name in names:
        model = train_function_net(ARCHS[name])
        gmin, gmax = grid_range(model, 0.0, 10.0)
        for label, options in configs:
            t0 = time.perf_counter()
            mn, mx = deepgo_range(model, lo, hi, c, tolerance=0.01, time_limit=time_limit, **options)  # type: ignore[arg-type]
            secs = time.perf_counter() - t0
            row = {
                "net": name, "hidden": ARCHS[name], "config": label, "options": options, "sound": mn.sound,
                "min": [round(float(mn.lower), 5), round(float(mn.upper), 5)], "grid_min": round(gmin, 5),
                "max": [round(float(mx.lower), 5), round(float(mx.upper), 5)], "grid_max": round(gmax, 5),
                "converged": bool(mn.converged.all()) and bool(mx.converged.all()),
                "brackets_grid": float(mn.lower) <= gmin + 1e-12 and float(mx.upper) >= gmax - 1e-12,
                "iterations": [mn.iterations, mx.iterations], "evaluations": [mn.evaluations, mx.evaluations],
                "seconds": round(secs, 2), "seconds_min_max": [round(mn.seconds, 2), round(mx.seconds, 2)],
                "K_outer": [round(float(mn.lipschitz[0]), 4), round(float(mx.lipschitz[0]), 4)],
            }  # fmt: skip
            rows.append(row)
            print(json.dumps(row), flush=True)
    return rows


def digits_case(time_limit: float) -> list[dict[str, object]]:
    data = load_digits()
    x, y = data.x.to(torch.float64), data.y
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), _mlp(64, [32], 10)).double()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(300):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x[:1500]), y[:1500]).backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        acc = float((model(x[1500:]).argmax(1) == y[1500:]).double().mean())
    rows = []
    img, label = x[1500:1501], int(y[1500])
    c = torch.zeros(10, dtype=torch.float64)
    c[label] = 1.0
    lo, hi = torch.zeros_like(img), torch.ones_like(img)
    for feats in ([27, 36], [27, 36, 44]):
        t0 = time.perf_counter()
        mn, mx = deepgo_range(model, lo, hi, c, features=feats, x0=img, tolerance=0.01, time_limit=time_limit)
        secs = time.perf_counter() - t0
        t = torch.linspace(0, 1, 101 if len(feats) == 2 else 41, dtype=torch.float64)
        grid = torch.cartesian_prod(*([t] * len(feats)))
        pts = img.reshape(1, -1).repeat(grid.shape[0], 1)
        pts[:, feats] = grid
        with torch.no_grad():
            v = model(pts.reshape(-1, 1, 8, 8))[:, label]
            at_x0 = float(model(img)[0, label])
        row = {
            "case": f"digits test image 0 (label {label}), pixels {feats}", "test_accuracy": round(acc, 4),
            "logit_at_x0": round(at_x0, 5),
            "min": [round(float(mn.lower), 5), round(float(mn.upper), 5)], "grid_min": round(float(v.min()), 5),
            "max": [round(float(mx.lower), 5), round(float(mx.upper), 5)], "grid_max": round(float(v.max()), 5),
            "converged": bool(mn.converged.all()) and bool(mx.converged.all()),
            "iterations": [mn.iterations, mx.iterations], "evaluations": mn.evaluations + mx.evaluations,
            "seconds": round(secs, 2),
        }  # fmt: skip
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="N-0 .. N-2 only")
    parser.add_argument("--pure", action="store_true", help="also the pure Lipschitz bound (interval_bounds=None)")
    parser.add_argument("--time-limit", type=float, default=120.0, help="seconds per min or max search")
    args = parser.parse_args()
    torch.set_num_threads(1)
    names = list(ARCHS)[:3] if args.quick else list(ARCHS)
    experiment1(names, args.time_limit, pure=args.pure)
    digits_case(args.time_limit)


if __name__ == "__main__":
    main()
