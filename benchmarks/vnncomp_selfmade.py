"""A self-made VNN-COMP-style benchmark, run through ``bastion vnncomp`` and checked against ground truth.

``generate`` writes a benchmark folder the way VNN-COMP ships one (``onnx/``, ``vnnlib/``, ``instances.csv`` with
rows ``onnx,vnnlib,timeout``):

* ``control_6x50.onnx``: a 5-input, 6x50 ReLU, 5-output network with an ACAS-Xu-like ``[1, 1, 1, 5]`` input,
  trained to imitate a smooth 5 -> 5 "advisory score" function on the normalised box ``[-0.5, 0.5]^5``, with box
  properties ("output k is not minimal" on a sub-box; "output k stays below t") and disjunctive ones (an ``or`` of
  two input boxes; an output disjunction "neither a nor b is minimal"). Thresholds and classes are picked from
  10,000 samples of each box so that the set holds both easy and hard, true and false properties.
* ``mnist_fc.onnx`` (784-100-100-10, input ``[1, 784]``) and ``mnist_conv_at.onnx`` (the adversarially trained
  conv net, input ``[1, 1, 28, 28]``) from ``verify_bounds.py``'s cache, with l∞ robustness properties of the first
  evaluation images at several ε, written in the ``mnistfc`` style (``(or (and (>= Y_j Y_label)) ...)``).

The VNN-LIB and ONNX files are written by this script's own code (``torch.onnx.export`` with the TorchScript
exporter and hand-written VNN-LIB text), not by bastion's ``format_vnnlib``, so the benchmark tests bastion's
reader on independent files.

``run`` then calls ``bastion vnncomp --instances instances.csv --out results.csv`` (one process, as the competition
scripts do) and judges every answer with code of its own:

* ``sat``: the instance is re-run alone (``bastion vnncomp NET SPEC --out RESULT``) for its counterexample, which is
  parsed here, checked to lie in one of the input boxes and re-executed on **onnxruntime**; its output must satisfy
  one of the unsafe conjunctions;
* ``unsat``: checked against exact MILP (``milp_verify``, each box x conjunction, where HiGHS finishes) and a heavy
  PGD attack (many restarts, re-executed on onnxruntime) that must find nothing;
* ``timeout``/``unknown``: the MILP answer is recorded as what the instance really was.

    .venv/bin/python benchmarks/vnncomp_selfmade.py            # generate, run, check (30 min on a busy 2-core CPU)
    .venv/bin/python benchmarks/vnncomp_selfmade.py --skip-run # re-check an existing results.csv

``--suite mnistfc`` re-makes VNN-COMP 2021's ``mnistfc`` benchmark instead: 784-256xK-10 ReLU nets (K = 2, 4, 6)
trained here, l∞ 0.03 and 0.05 robustness properties of the first ``--images`` evaluation images, the
competition's 120 s / 300 s timeouts (``--timeout-scale`` to shorten them), judged the same way.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import re
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common
import verify_bounds
from bastion.models.onnx import OnnxRuntimeModel, load_onnx
from bastion.verify.ir import as_network
from bastion.verify.milp import milp_verify

BENCH = common.CACHE_DIR / "vnncomp_selfmade"
MNISTFC = common.CACHE_DIR / "vnncomp_mnistfc"
REPO = common.BENCH_DIR.parent
BASTION = REPO / ".venv" / "bin" / "bastion"


# ---------------------------------------------------------------------------------------------------- properties
@dataclass
class Instance:
    """One property as this script knows it (independently of any parser): the unsafe set is
    ``{x in some box : A y <= b for some (A, b)}``."""

    onnx: str
    name: str
    boxes: list[tuple[np.ndarray, np.ndarray]]
    conjs: list[tuple[np.ndarray, np.ndarray]]  # rows A (k, m), b (k,) meaning A y <= b
    timeout: float
    kind: str
    note: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


def _num(v: float) -> str:
    return np.format_float_positional(float(v), unique=True, trim="0")


def vnnlib_text(inst: Instance, n_in: int, n_out: int) -> str:
    """The property in the VNN-COMP dialect: declarations, the input box(es), the unsafe output set."""
    lines = [f"; {inst.name}: {inst.note}"]
    lines += [f"(declare-const X_{i} Real)" for i in range(n_in)]
    lines += [f"(declare-const Y_{j} Real)" for j in range(n_out)]

    def box_terms(lo: np.ndarray, hi: np.ndarray) -> list[str]:
        return [t for i in range(n_in) for t in (f"(>= X_{i} {_num(lo[i])})", f"(<= X_{i} {_num(hi[i])})")]

    def row(a: np.ndarray, b: float) -> str:
        # a . y <= b, written as a comparison of two outputs or of one output and a constant where it is one
        nz = np.flatnonzero(a)
        if len(nz) == 2 and a[nz[0]] == -a[nz[1]] and abs(a[nz[0]]) == 1 and b == 0:
            i, j = (nz[0], nz[1]) if a[nz[0]] > 0 else (nz[1], nz[0])
            return f"(<= Y_{i} Y_{j})"
        if len(nz) == 1 and abs(a[nz[0]]) == 1:
            return f"(<= Y_{nz[0]} {_num(b)})" if a[nz[0]] > 0 else f"(>= Y_{nz[0]} {_num(-b)})"
        terms = " ".join(f"(* {_num(a[j])} Y_{j})" for j in nz)
        return f"(<= (+ {terms}) {_num(b)})"

    if len(inst.boxes) == 1:
        lines += [f"(assert {t})" for t in box_terms(*inst.boxes[0])]
    else:
        lines.append("(assert (or")
        lines += ["    (and " + " ".join(box_terms(lo, hi)) + ")" for lo, hi in inst.boxes]
        lines.append("))")
    if len(inst.conjs) == 1:
        a, b = inst.conjs[0]
        lines += [f"(assert {row(a[r], b[r])})" for r in range(len(b))]
    else:
        conj_text = ["(and " + " ".join(row(a[r], b[r]) for r in range(len(b))) + ")" for a, b in inst.conjs]
        lines.append("(assert (or")
        lines += ["    " + t for t in conj_text]
        lines.append("))")
    return "\n".join(lines) + "\n"


def violates(y: np.ndarray, conjs: list[tuple[np.ndarray, np.ndarray]], tol: float = 0.0) -> bool:
    return any(bool((a @ y <= b + tol).all()) for a, b in conjs)


# ---------------------------------------------------------------------------------------------------- control net
def control_target(x: Tensor) -> Tensor:
    """A smooth 5 -> 5 'advisory score' function on [-0.5, 0.5]^5 (lower = preferred), ACAS-Xu-like in spirit:
    distance, bearing, heading and two speeds in; scores of clear-of-conflict, weak/strong left/right out."""
    rho, theta, psi, v_own, v_int = (x[:, i] for i in range(5))
    th, ps = 2 * math.pi * theta, 2 * math.pi * psi
    closing = 0.6 * v_own + 0.6 * v_int - 1.2 * rho
    coc = 0.4 - 1.2 * rho + 0.4 * torch.cos(th) + 0.3 * closing
    wl = 0.2 + 0.5 * torch.sin(th) - 0.2 * torch.cos(ps) + 0.2 * closing * torch.sin(th + ps)
    wr = 0.2 - 0.5 * torch.sin(th) - 0.2 * torch.cos(ps) - 0.2 * closing * torch.sin(th + ps)
    sl = 0.5 + 0.7 * torch.sin(th) + 0.4 * rho - 0.3 * v_own * torch.cos(ps)
    sr = 0.5 - 0.7 * torch.sin(th) + 0.4 * rho + 0.3 * v_own * torch.cos(ps)
    return torch.stack([coc, wl, wr, sl, sr], dim=1)


class ControlNet(nn.Module):
    """6x50 ReLU MLP taking ACAS-Xu's ``[N, 1, 1, 5]`` input layout."""

    def __init__(self) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        width = 5
        for _ in range(6):
            layers += [nn.Linear(width, 50), nn.ReLU()]
            width = 50
        layers.append(nn.Linear(50, 5))
        self.body = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        return self.body(x.reshape(x.shape[0], 5))


def train_control(*, steps: int = 1500, seed: int = 0) -> nn.Module:
    path = common.CACHE_DIR / f"vnncomp_control_6x50_s{steps}_seed{seed}.pt"
    torch.manual_seed(seed)
    model = ControlNet()
    if path.exists():
        model.load_state_dict(torch.load(path, weights_only=True))
        return model.eval()
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    for _ in range(steps):
        x = torch.rand(256, 5, generator=gen) - 0.5
        loss = nn.functional.mse_loss(model(x.reshape(-1, 1, 1, 5)), control_target(x))
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    model.eval()
    with torch.no_grad():
        x = torch.rand(10_000, 5, generator=gen) - 0.5
        err = (model(x.reshape(-1, 1, 1, 5)) - control_target(x)).abs().mean()
    print(f"control net: trained {steps} Adam steps, mean |error| {float(err):.4f} on 10,000 fresh points")
    common.CACHE_DIR.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), path)
    return model


def export_onnx(model: nn.Module, example: Tensor, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.onnx.export(
        model, (example,), str(path), input_names=["input"], output_names=["output"], opset_version=13, dynamo=False
    )


def control_instances(model: nn.Module, gen: np.random.Generator, timeout: float) -> list[Instance]:
    """Box and disjunctive properties whose parameters come from sampling each box (10,000 points)."""
    eye = np.eye(5)

    def minimal_rows(k: int) -> tuple[np.ndarray, np.ndarray]:
        # output k minimal: y_k - y_j <= 0 for every j != k
        return np.stack([eye[k] - eye[j] for j in range(5) if j != k]), np.zeros(4)

    def sample(lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
        pts = lo + (hi - lo) * gen.random((10_000, 5))
        with torch.no_grad():
            return model(torch.as_tensor(pts, dtype=torch.float32).reshape(-1, 1, 1, 5)).double().numpy()

    def random_box(width: float) -> tuple[np.ndarray, np.ndarray]:
        c = gen.uniform(-0.5 + width, 0.5 - width, 5)
        w = width * gen.uniform(0.3, 1.0, 5)
        return c - w, c + w

    out: list[Instance] = []
    # "output k is not minimal" on a sub-box: k is the class minimal on the fewest samples but still second-best
    # somewhere (hard, mostly true), or one that is minimal on some samples (false).
    for t in range(4):
        lo, hi = random_box(0.08 + 0.03 * t)
        y = sample(lo, hi)
        counts = np.bincount(y.argmin(1), minlength=5)
        second = np.argsort(y, axis=1)[:, 1]
        if t % 2 == 0:
            cand = [k for k in range(5) if counts[k] == 0 and (second == k).any()] or [int(counts.argmin())]
            k, note = cand[0], "output k never minimal on 10,000 samples"
        else:
            k, note = int(np.argsort(counts)[-2] if (counts > 0).sum() > 1 else counts.argmax()), "k minimal on samples"
        out.append(Instance("control_6x50.onnx", f"control_notmin_{t}", [(lo, hi)], [minimal_rows(k)], timeout,
                            "box", f"output {k} is not minimal ({note})"))  # fmt: skip
    # "output k stays below t" (unsafe: y_k >= t), t a little above or below the sampled maximum
    for t in range(4):
        lo, hi = random_box(0.1 + 0.02 * t)
        y = sample(lo, hi)
        k = int(gen.integers(5))
        spread = float(y[:, k].max() - y[:, k].min())
        delta = (0.05 if t % 2 == 0 else -0.02) * max(spread, 0.05)
        thr = float(y[:, k].max() + delta)
        a = -eye[k].reshape(1, 5)
        out.append(Instance("control_6x50.onnx", f"control_upper_{t}", [(lo, hi)], [(a, np.array([-thr]))], timeout,
                            "box", f"output {k} <= {thr:.4f} (sampled max {y[:, k].max():.4f})"))  # fmt: skip
    # disjunction of two input boxes, "output k is not minimal" on both
    for t in range(2):
        boxes = [random_box(0.07), random_box(0.07)]
        ys = np.concatenate([sample(*b) for b in boxes])
        counts = np.bincount(ys.argmin(1), minlength=5)
        k = int(np.argmin(np.where(counts == 0, -1, counts))) if t == 0 else int(counts.argmax())
        out.append(Instance("control_6x50.onnx", f"control_orbox_{t}", boxes, [minimal_rows(k)], timeout,
                            "input disjunction", f"output {k} not minimal on either box"))  # fmt: skip
    # output disjunction: neither a nor b is minimal
    for t in range(2):
        lo, hi = random_box(0.1)
        y = sample(lo, hi)
        counts = np.bincount(y.argmin(1), minlength=5)
        order = np.argsort(counts)
        a_, b_ = (int(order[0]), int(order[1])) if t == 0 else (int(order[-1]), int(order[0]))
        out.append(Instance("control_6x50.onnx", f"control_ormin_{t}", [(lo, hi)], [minimal_rows(a_), minimal_rows(b_)],
                            timeout, "output disjunction", f"neither output {a_} nor {b_} is minimal"))  # fmt: skip
    return out


# ---------------------------------------------------------------------------------------------------- MNIST nets
def mnist_instances(model: nn.Module, onnx_name: str, x: Tensor, y: Tensor, eps_list: list[float],
                    timeout: float) -> list[Instance]:  # fmt: skip
    out = []
    with torch.no_grad():
        pred = model(x.reshape(x.shape[0], 1, 28, 28)).argmax(1)
    eye = np.eye(10)
    for i in range(x.shape[0]):
        if int(pred[i]) != int(y[i]):
            continue  # a misclassified image needs no search; VNN-COMP benchmarks skip them as well
        label = int(y[i])
        flat = x[i].reshape(-1).double().numpy()
        for eps in eps_list:
            lo, hi = np.clip(flat - eps, 0, 1), np.clip(flat + eps, 0, 1)
            conjs = [((eye[j] - eye[label]).reshape(1, 10) * -1, np.zeros(1)) for j in range(10) if j != label]
            # each conj: -(y_j - y_label) <= 0, i.e. y_j >= y_label
            out.append(Instance(onnx_name, f"{onnx_name[:-5]}_img{i}_eps{eps:g}", [(lo, hi)], conjs, timeout,
                                "robustness", f"image {i} (label {label}), l-inf eps {eps:g}"))  # fmt: skip
    return out


def write_suite(folder: Path, insts: list[Instance], sizes: dict[str, tuple[int, int]]) -> None:
    """``instances.csv`` and the VNN-LIB files of ``insts`` in ``folder`` (the ONNX files are already there)."""
    with open(folder / "instances.csv", "w", newline="") as fh:
        writer = csv.writer(fh)
        for inst in insts:
            rel = f"vnnlib/{inst.name}.vnnlib"
            (folder / rel).write_text(vnnlib_text(inst, *sizes[inst.onnx]))
            writer.writerow([f"onnx/{inst.onnx}", rel, f"{inst.timeout:g}"])


def generate_mnistfc(*, n_images: int, eps_list: list[float], timeout_scale: float) -> list[Instance]:
    """The ``mnistfc`` suite of VNN-COMP 2021 re-made: 784-256xK-10 ReLU nets (K = 2, 4, 6, normally trained on the
    8,000 training images here, not the competition's weights), l∞ robustness of the first evaluation images at
    eps 0.03 and 0.05, the competition's timeouts (120 s for 256x2, 300 s for 256x4 and 256x6) times
    ``timeout_scale``."""
    for sub in ("onnx", "vnnlib"):
        (MNISTFC / sub).mkdir(parents=True, exist_ok=True)
    split = common.load_split()
    x, y = split.x_eval[:n_images], split.y_eval[:n_images]
    insts: list[Instance] = []
    for depth, timeout in ((2, 120.0), (4, 300.0), (6, 300.0)):
        model = verify_bounds.get_model(f"fc-256x{depth}", split)
        name = f"mnist-net_256x{depth}.onnx"
        export_onnx(model, torch.zeros(1, 784), MNISTFC / "onnx" / name)
        insts += mnist_instances(model, name, x, y, eps_list, timeout * timeout_scale)
    write_suite(MNISTFC, insts, {i.onnx: (784, 10) for i in insts})
    return insts


def generate(*, control_timeout: float, mnist_timeout: float, n_images: int) -> list[Instance]:
    """Write the benchmark folder and return the instances."""
    (BENCH / "onnx").mkdir(parents=True, exist_ok=True)
    (BENCH / "vnnlib").mkdir(parents=True, exist_ok=True)
    gen = np.random.default_rng(0)
    control = train_control()
    export_onnx(control, torch.zeros(1, 1, 1, 5), BENCH / "onnx" / "control_6x50.onnx")
    insts = control_instances(control, gen, control_timeout)

    split = common.load_split()
    fc = verify_bounds.get_model("fc", split)
    conv = verify_bounds.get_model("conv-at", split)
    export_onnx(fc, torch.zeros(1, 784), BENCH / "onnx" / "mnist_fc.onnx")
    export_onnx(conv, torch.zeros(1, 1, 28, 28), BENCH / "onnx" / "mnist_conv_at.onnx")
    x, y = split.x_eval[:n_images], split.y_eval[:n_images]
    insts += mnist_instances(fc, "mnist_fc.onnx", x, y, [0.01, 0.03], mnist_timeout)
    insts += mnist_instances(conv, "mnist_conv_at.onnx", x, y, [0.05, 0.1], mnist_timeout)

    sizes = {"control_6x50.onnx": (5, 5), "mnist_fc.onnx": (784, 10), "mnist_conv_at.onnx": (784, 10)}
    write_suite(BENCH, insts, sizes)
    return insts


# ---------------------------------------------------------------------------------------------------- checking
def parse_cex(text: str) -> tuple[np.ndarray, np.ndarray]:
    xs = {int(i): float(v) for i, v in re.findall(r"\(X_(\d+)\s+([^\s()]+)\)", text)}
    ys = {int(i): float(v) for i, v in re.findall(r"\(Y_(\d+)\s+([^\s()]+)\)", text)}
    return np.array([xs[i] for i in range(len(xs))]), np.array([ys[j] for j in range(len(ys))])


def check_sat(inst: Instance, timeout: float) -> tuple[bool, str]:
    """Re-run the instance alone for its counterexample and re-execute that on onnxruntime."""
    out = BENCH / "cex" / f"{inst.name}.txt"
    out.parent.mkdir(exist_ok=True)
    onnx = BENCH / "onnx" / inst.onnx
    cmd = [str(BASTION), "vnncomp", str(onnx), str(BENCH / "vnnlib" / f"{inst.name}.vnnlib"), "--timeout",
           f"{timeout:g}", "--out", str(out)]  # fmt: skip
    subprocess.run(cmd, check=False, capture_output=True, text=True)
    text = out.read_text() if out.exists() else ""
    if not text.startswith("sat"):
        return False, f"re-run answered {text.split()[0] if text else 'nothing'} (no counterexample to check)"
    x, y_file = parse_cex(text)
    inside = any(bool(((x >= lo - 1e-9) & (x <= hi + 1e-9)).all()) for lo, hi in inst.boxes)
    ort = OnnxRuntimeModel(onnx)
    y = ort(torch.as_tensor(x, dtype=torch.float32).reshape(1, -1))[0].double().numpy()
    viol = violates(y, inst.conjs)
    agree = bool(np.abs(y - y_file).max() <= 1e-4 * (1 + np.abs(y).max()))
    ok = inside and viol
    return ok, f"in box {inside}, violates on onnxruntime {viol}, Y in file matches ort {agree}"


def heavy_pgd(model: nn.Module, inst: Instance, *, restarts: int = 64, steps: int = 200, seed: int = 0) -> bool:
    """Minimise each conjunction's violation margin ``max_i (A_i f(x) - b_i)`` over each box by signed-gradient
    descent with a cosine step schedule and many random starts; True when a point re-executed on onnxruntime
    violates the property."""
    gen = torch.Generator().manual_seed(seed)
    shape = tuple(model.input_shape)
    ort = OnnxRuntimeModel(BENCH / "onnx" / inst.onnx)
    for lo_np, hi_np in inst.boxes:
        lo = torch.as_tensor(lo_np, dtype=torch.float32)
        hi = torch.as_tensor(hi_np, dtype=torch.float32)
        for a_np, b_np in inst.conjs:
            a = torch.as_tensor(a_np, dtype=torch.float32)
            b = torch.as_tensor(b_np, dtype=torch.float32)
            x = lo + (hi - lo) * torch.rand(restarts, lo.numel(), generator=gen)
            for t in range(steps):
                x.requires_grad_(True)
                margin = (model(x.reshape(-1, *shape)).reshape(restarts, -1) @ a.T - b).amax(dim=1)
                (grad,) = torch.autograd.grad(margin.sum(), x)
                size = 0.05 * 0.5 * (1 + math.cos(math.pi * t / steps)) + 1e-4
                x = torch.minimum(torch.maximum(x.detach() - size * (hi - lo) * grad.sign(), lo), hi)
            with torch.no_grad():
                margin = (model(x.reshape(-1, *shape)).reshape(restarts, -1) @ a.T - b).amax(dim=1)
            best = x[margin.argsort()[:8]]
            ys = ort(best).double().numpy()
            if any(violates(yy, inst.conjs) for yy in ys):
                return True
    return False


def milp_truth(inst: Instance, net: Any, time_limit: float) -> str:
    """'sat' / 'unsat' by exact MILP over every box x conjunction, or 'open' when HiGHS did not finish."""
    start = time.perf_counter()
    status = "unsat"
    for lo, hi in inst.boxes:
        for a, b in inst.conjs:
            left = time_limit - (time.perf_counter() - start)
            if left <= 0:
                return "open"
            v = milp_verify(net, (torch.as_tensor(lo), torch.as_tensor(hi)), torch.as_tensor(a), torch.as_tensor(b),
                            time_limit=left)  # fmt: skip
            if v.status == "falsified":
                return "sat"
            if v.status != "verified":
                status = "open"
    return status


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--control-timeout", type=float, default=20.0)
    parser.add_argument("--mnist-timeout", type=float, default=30.0)
    parser.add_argument("--images", type=int, default=4, help="first N evaluation images per MNIST net")
    parser.add_argument("--milp-limit", type=float, default=60.0, help="seconds of MILP per instance for the check")
    parser.add_argument("--skip-run", action="store_true", help="check the existing results.csv, do not re-run")
    parser.add_argument(
        "--suite",
        default="mixed",
        choices=["mixed", "mnistfc"],
        help="mixed: control + small MNIST nets (default); mnistfc: VNN-COMP 2021 mnistfc shapes",
    )
    parser.add_argument(
        "--timeout-scale",
        type=float,
        default=1.0,
        help="mnistfc: multiply the competition's 120/300 s timeouts (default 1)",
    )
    parser.add_argument("--eps", type=float, nargs="+", default=[0.03, 0.05], help="mnistfc radii")
    args = parser.parse_args(argv)

    print(common.machine_summary())
    print(common.load_average())
    global BENCH
    if args.suite == "mnistfc":
        BENCH = MNISTFC
        insts = generate_mnistfc(n_images=args.images, eps_list=args.eps, timeout_scale=args.timeout_scale)
    else:
        insts = generate(control_timeout=args.control_timeout, mnist_timeout=args.mnist_timeout,
                         n_images=args.images)  # fmt: skip
    by_key = {(f"onnx/{i.onnx}", f"vnnlib/{i.name}.vnnlib"): i for i in insts}
    timeouts = sorted({i.timeout for i in insts})
    print(f"benchmark: {len(insts)} instances in {BENCH.relative_to(REPO)} (timeouts {timeouts} s; worst case "
          f"{sum(i.timeout for i in insts):.0f} s)")  # fmt: skip
    results = BENCH / "results.csv"
    wall = float("nan")
    if not args.skip_run:
        results.unlink(missing_ok=True)
        cmd = [str(BASTION), "vnncomp", "--instances", str(BENCH / "instances.csv"), "--out", str(results)]
        print("$ " + " ".join(str(Path(c).relative_to(REPO)) if c.startswith(str(REPO)) else c for c in cmd))
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, check=False, text=True, capture_output=True)
        wall = time.perf_counter() - t0
        print(proc.stdout + proc.stderr)
    with open(results, newline="") as fh:
        rows = [r for r in csv.DictReader(fh)]

    nets: dict[str, Any] = {}
    torch_models: dict[str, nn.Module] = {}
    table, wrong = [], []
    for r in rows:
        inst = by_key[(r["onnx"], r["vnnlib"])]
        if inst.onnx not in nets:
            torch_models[inst.onnx] = load_onnx(BENCH / "onnx" / inst.onnx)
            nets[inst.onnx] = as_network(torch_models[inst.onnx])
        word, secs = r["result"], float(r["seconds"])
        t0 = time.perf_counter()
        if word == "sat":
            ok, how = check_sat(inst, inst.timeout)
            verdict = "correct" if ok else "WRONG?"
            truth = "sat" if ok else milp_truth(inst, nets[inst.onnx], args.milp_limit)
            if not ok and truth == "unsat":
                verdict = "WRONG"
            elif not ok:
                verdict = f"unchecked ({how})"
        else:
            truth = milp_truth(inst, nets[inst.onnx], args.milp_limit)
            how = f"MILP: {truth}"
            if word == "unsat":
                attacked = heavy_pgd(torch_models[inst.onnx], inst)
                how += f"; heavy PGD found {'a violation' if attacked else 'nothing'}"
                verdict = "WRONG" if truth == "sat" or attacked else ("correct" if truth == "unsat" else "not refuted")
            else:
                verdict = "-"
        if verdict.startswith("WRONG"):
            wrong.append(f"{inst.name}: answered {word}, {how}")
        table.append([inst.name, inst.kind, f"{inst.timeout:g}", word, f"{secs:.1f}", truth, verdict,
                      f"{time.perf_counter() - t0:.1f}"])  # fmt: skip
        print(f"  {inst.name:<34} {word:<8} {secs:6.1f}s  truth {truth:<5} {verdict}   ({how})", flush=True)
    print()
    print(common.markdown_table(
        ["instance", "kind", "timeout s", "bastion", "s", "MILP truth", "judged", "check s"], table))  # fmt: skip
    summary = []
    for group in [*dict.fromkeys(r["onnx"].removeprefix("onnx/") for r in rows), None]:
        rs = [r for r in rows if group is None or r["onnx"] == f"onnx/{group}"]
        words = [r["result"] for r in rs]
        summary.append([group or "all", str(len(rs)), str(words.count("sat")), str(words.count("unsat")),
                        str(len(rs) - words.count("sat") - words.count("unsat")),
                        f"{sum(float(r['seconds']) for r in rs):.0f}"])  # fmt: skip
    print()
    print(common.markdown_table(["network", "instances", "sat", "unsat", "timeout/unknown", "total s"], summary))
    print(f"\nwall time of `bastion vnncomp --instances`: {wall:.0f} s; wrong answers: {len(wrong)}")
    print(common.load_average())
    for w in wrong:
        print("!!! WRONG: " + w)
    (BENCH / "check.json").write_text(json.dumps({"rows": table, "wrong": wrong, "wall": wall}, indent=1))
    return 1 if wrong else 0


if __name__ == "__main__":
    raise SystemExit(main())
