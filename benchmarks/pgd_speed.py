"""PGD wall time: bastion against a bare PyTorch loop and the peer libraries, on the same model, batch and settings.

Every competitor runs the same attack: untargeted PGD on the cross-entropy loss, no random start (so that all of
them compute the same iterates), a fixed number of steps of a fixed absolute size, projection onto the ε-ball and
the [0, 1] box after every step. The model is the MNIST ``cnn`` of ``common.py`` (cached), the batch the first
``--n`` images of the 2,000-image evaluation split. Times are medians over ``--repeats`` runs, the competitors
interleaved run by run after a warm-up round.

Run from the repository root::

    python benchmarks/pgd_speed.py                 # defaults: --n 200 --repeats 3, l∞ and l2
    python benchmarks/pgd_speed.py --repeats 5 --n 500 --norms linf
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common
from bastion.attacks import PGD
from bastion.threat import LpBall


@dataclass(frozen=True)
class Setting:
    norm: str  # "linf" or "l2"
    eps: float
    step: float  # absolute step size
    steps: int

    @property
    def label(self) -> str:
        sym = "l∞" if self.norm == "linf" else "l2"
        return f"{sym}, ε = {self.eps:g}, {self.steps} steps of {self.step:g}, no random start"


SETTINGS = {
    "linf": lambda steps: Setting("linf", 0.3, 0.01, steps),
    "l2": lambda steps: Setting("l2", 2.0, 0.1, steps),
}

Attack = Callable[[], torch.Tensor]


# ---------------------------------------------------------------------------------------------------- reference
def bare_pgd(model: nn.Module, x: torch.Tensor, y: torch.Tensor, s: Setting) -> torch.Tensor:
    """The reference: PGD written directly in PyTorch, nothing else."""
    x_adv = x.clone()
    for _ in range(s.steps):
        x_adv.requires_grad_(True)
        loss = F.cross_entropy(model(x_adv), y)
        (grad,) = torch.autograd.grad(loss, x_adv)
        with torch.no_grad():
            if s.norm == "linf":
                x_adv = x_adv + s.step * grad.sign()
                x_adv = torch.minimum(torch.maximum(x_adv, x - s.eps), x + s.eps)
            else:
                g_norm = grad.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, 1, 1, 1)
                x_adv = x_adv + s.step * grad / g_norm
                delta = x_adv - x
                d_norm = delta.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
                x_adv = x + delta * (s.eps / d_norm.clamp_min(1e-12)).clamp(max=1.0)
            x_adv = x_adv.clamp(0.0, 1.0)
    return x_adv.detach()


# ---------------------------------------------------------------------------------------------------- competitors
def bastion_competitors(model: nn.Module, x: torch.Tensor, y: torch.Tensor, s: Setting) -> dict[str, Attack]:
    threat = LpBall(s.norm, s.eps)
    common_kw = {"steps": s.steps, "abs_stepsize": s.step, "random_start": False, "restarts": 1}
    full = PGD(early_stop=False, **common_kw)
    early = PGD(early_stop=True, **common_kw)
    return {
        "bastion PGD (early_stop=False)": lambda: full(model, x, y, threat=threat).x_adv,
        "bastion PGD (early_stop=True)": lambda: early(model, x, y, threat=threat).x_adv,
    }


def torchattacks_competitor(peer: common.Peer, model: nn.Module, s: Setting) -> Callable[..., torch.Tensor]:
    ta = peer.module
    if s.norm == "linf":
        atk = ta.PGD(model, eps=s.eps, alpha=s.step, steps=s.steps, random_start=False)
    else:
        atk = ta.PGDL2(model, eps=s.eps, alpha=s.step, steps=s.steps, random_start=False)
    return atk


def foolbox_competitor(peer: common.Peer, model: nn.Module, s: Setting) -> Callable[..., torch.Tensor]:
    fb = peer.module
    fmodel = fb.PyTorchModel(model, bounds=(0.0, 1.0), device="cpu")
    cls = fb.attacks.LinfPGD if s.norm == "linf" else fb.attacks.L2PGD
    atk = cls(abs_stepsize=s.step, steps=s.steps, random_start=False)

    def run(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        _, clipped, _ = atk(fmodel, x, y, epsilons=s.eps)
        return clipped

    return run


def art_competitor(peer: common.Peer, model: nn.Module, s: Setting, batch: int) -> Callable[..., torch.Tensor]:
    import numpy as np
    from art.attacks.evasion import ProjectedGradientDescentPyTorch
    from art.estimators.classification import PyTorchClassifier

    clf = PyTorchClassifier(
        model=model,
        loss=nn.CrossEntropyLoss(),
        input_shape=common.INPUT_SHAPE,
        nb_classes=common.NUM_CLASSES,
        clip_values=(0.0, 1.0),
        device_type="cpu",
    )
    atk = ProjectedGradientDescentPyTorch(
        clf,
        norm=np.inf if s.norm == "linf" else 2,
        eps=s.eps,
        eps_step=s.step,
        max_iter=s.steps,
        targeted=False,
        num_random_init=0,
        batch_size=batch,
        verbose=False,
    )

    def run(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(atk.generate(x=x.numpy(), y=y.numpy()))

    return run


def build_competitors(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, s: Setting, peers: list[common.Peer]
) -> tuple[dict[str, Attack], dict[str, str]]:
    """The timed callables, the bare loop first; and the reasons for any competitor left out."""
    comps: dict[str, Attack] = {"bare PyTorch loop": lambda: bare_pgd(model, x, y, s)}
    skipped: dict[str, str] = {}
    try:
        comps.update(bastion_competitors(model, x, y, s))
    except Exception as exc:
        skipped["bastion PGD"] = f"{type(exc).__name__}: {exc}"
    factories = {
        "torchattacks": lambda p: torchattacks_competitor(p, model, s),
        "foolbox": lambda p: foolbox_competitor(p, model, s),
        "art": lambda p: art_competitor(p, model, s, x.shape[0]),
    }
    titles = {
        "torchattacks": "torchattacks {} {}".format("PGD" if s.norm == "linf" else "PGDL2", "{v}"),
        "foolbox": "foolbox {} {}".format("LinfPGD" if s.norm == "linf" else "L2PGD", "{v}"),
        "art": "ART ProjectedGradientDescentPyTorch {v}",
    }
    for peer in peers:
        title = titles[peer.name].format(v=peer.version or "")
        if not peer.available:
            skipped[title] = peer.reason or "unavailable"
            continue
        try:
            atk = factories[peer.name](peer)
        except Exception as exc:
            skipped[title] = f"set-up failed: {type(exc).__name__}: {exc}"
            continue
        comps[title] = lambda atk=atk: atk(x, y)
    return comps, skipped


# ---------------------------------------------------------------------------------------------------- checks
@dataclass
class Check:
    robust_acc: float
    max_dist: float
    in_ball: bool
    in_box: bool
    same_as_bare: float  # fraction of samples whose x_adv matches the bare loop's within 1e-5


def check(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, x_adv: torch.Tensor, ref: torch.Tensor, s: Setting
) -> Check:
    """Everyone's output judged by the same code: accuracy on x_adv, inside the ε-ball and [0, 1], agreement."""
    x_adv = x_adv.detach().to(x.dtype).reshape(x.shape)
    delta = (x_adv - x).flatten(1)
    dist = delta.abs().amax(dim=1) if s.norm == "linf" else delta.norm(dim=1)
    max_dist = float(dist.max())
    same = (x_adv - ref).flatten(1).abs().amax(dim=1) <= 1e-5
    return Check(
        robust_acc=common.accuracy(model, x_adv, y),
        max_dist=max_dist,
        in_ball=max_dist <= s.eps * (1 + 1e-5) + 1e-6,
        in_box=bool((x_adv >= 0).all() and (x_adv <= 1).all()),
        same_as_bare=float(same.float().mean()),
    )


# ---------------------------------------------------------------------------------------------------- main
def run_setting(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, s: Setting, peers: list[common.Peer], args: argparse.Namespace
) -> str:
    print(f"\n## PGD {s.label}; batch of {x.shape[0]} images ({common.load_average()})\n")
    comps, skipped = build_competitors(model, x, y, s, peers)
    # warm-up: every competitor once on a small batch with two steps (same code paths, a fraction of the time)
    warm, _ = build_competitors(model, x[:32], y[:32], replace(s, steps=2), peers)
    timings = common.time_alternating(comps, repeats=args.repeats, warmup=args.warmup, warmup_with=warm)
    for name, t in timings.items():
        if t.error:
            skipped[name] = t.error
    ref = timings["bare PyTorch loop"]
    bare_t = ref.median
    bastion_full = timings.get("bastion PGD (early_stop=False)")
    bastion_t = bastion_full.median if bastion_full and not bastion_full.error else float("nan")

    rows = []
    for name, t in timings.items():
        if t.error or not t.seconds:
            continue
        c = check(model, x, y, t.output, ref.output, s)
        rows.append(
            [
                name,
                f"{t.median:.2f}",
                f"{t.fastest:.2f}–{t.slowest:.2f}",
                f"{t.cpu_median:.2f}",
                f"{t.median / bare_t:.2f}",
                f"{t.median / bastion_t:.2f}" if bastion_t == bastion_t else "n/a",
                f"{c.robust_acc:.4f}",
                f"{c.max_dist:.4f}",
                "yes" if c.in_ball and c.in_box else f"NO (ball {c.in_ball}, box {c.in_box})",
                f"{c.same_as_bare:.3f}",
            ]
        )
    header = [
        "implementation",
        "median s",
        "range s",
        "CPU s",
        "× bare",
        "× bastion (no early stop)",
        "acc on x_adv",
        f"max {'l∞' if s.norm == 'linf' else 'l2'} dist",
        "in ball & [0,1]",
        "same x_adv as bare",
    ]
    table = common.markdown_table(header, rows)
    lines = [
        f"### PGD {s.label}, batch {x.shape[0]}, median of {args.repeats} runs",
        "",
        table,
        "",
        f"- {torch.get_num_threads()} torch threads; {common.load_average()} at the end",
    ]
    peer_times = {
        n: t.median
        for n, t in timings.items()
        if not t.error and t.seconds and n.split()[0] in ("torchattacks", "foolbox", "ART")
    }
    for variant in ("bastion PGD (early_stop=False)", "bastion PGD (early_stop=True)"):
        t = timings.get(variant)
        if t is None or t.error:
            continue
        line = f"- {variant}: bastion / bare = {t.median / bare_t:.2f} (CPU time {t.cpu_median / ref.cpu_median:.2f})"
        if peer_times:
            fastest = min(peer_times, key=peer_times.__getitem__)
            cpu_ratio = t.cpu_median / timings[fastest].cpu_median
            line += (
                f", bastion / fastest peer = {t.median / peer_times[fastest]:.2f} (CPU time {cpu_ratio:.2f}; "
                f"fastest peer by median wall time: {fastest})"
            )
        lines.append(line)
    for name, why in skipped.items():
        lines.append(f"- not measured: {name}: {why}")
    text = "\n".join(lines)
    print("\n" + text)
    return text


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=200, help="images in the batch (from the evaluation split)")
    ap.add_argument("--repeats", type=int, default=3, help="measured runs per competitor (median reported)")
    ap.add_argument("--warmup", type=int, default=1, help="unrecorded warm-up rounds (32 images, 2 steps)")
    ap.add_argument("--steps", type=int, default=40, help="PGD steps")
    ap.add_argument("--norms", nargs="+", choices=sorted(SETTINGS), default=["linf", "l2"])
    ap.add_argument("--peers", nargs="*", choices=common.PEERS, default=list(common.PEERS))
    ap.add_argument("--output", type=Path, help="also write the Markdown tables to this file")
    args = ap.parse_args(argv)

    print(f"# PGD speed\n\n{common.machine_summary()}")
    peers = [common.load_peer(name) for name in args.peers]
    for p in peers:
        print(f"peer {p.name}: {p.version}" if p.available else f"peer {p.name}: unavailable — {p.reason}")
    split = common.load_split()
    model = common.get_model(split)
    x, y = split.x_eval[: args.n], split.y_eval[: args.n]
    print(f"clean accuracy on the batch: {common.accuracy(model, x, y):.4f}")

    sections = [run_setting(model, x, y, SETTINGS[n](args.steps), peers, args) for n in args.norms]
    if args.output:
        args.output.write_text(common.machine_summary() + "\n\n" + "\n\n".join(sections) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
