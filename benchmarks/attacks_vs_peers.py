"""Attacks against the peer libraries: strength and wall time of APGD, C&W, DeepFool, FAB, Square and the ensemble.

Each bastion attack runs beside the same attack of torchattacks, Foolbox and ART (where they have it) on the same model,
the same batch and settings matched as closely as the APIs allow (every competitor's exact arguments are printed).
Competitors are interleaved run by run after a warm-up round on 8 images; the median of ``--repeats`` runs is reported
with its CPU time. Every output is judged by this file's code, never by the library that made it: distance from
``x`` in the attack's norm, inside [0, 1] (and the ε-ball for bounded attacks), and success re-predicted with the model.

Models: the standard MNIST ``cnn`` of ``common.py`` (minimal attacks: C&W l2, DeepFool l2, FAB l∞) and a PGD
adversarially trained copy of it (Madry et al., l∞ ε = 0.3, PGD-10; APGD-CE, Square and the AutoAttack-style
ensemble), trained with ``bastion.defenses.training.train`` and cached in ``benchmarks/.cache/`` under a hash of
its recipe (``AT_CONFIG``).

Run from the repository root::

    python benchmarks/attacks_vs_peers.py                               # every attack, small defaults
    python benchmarks/attacks_vs_peers.py --attacks apgd square --n 200 --repeats 5
    python benchmarks/attacks_vs_peers.py --attacks ensemble --ensemble-n 100
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common
from bastion.attacks import PGD
from bastion.defenses.training import train
from bastion.models import load_model, save_model
from bastion.threat import LpBall

EPS_LINF = 0.3

# PGD adversarial training (Madry et al., ICLR 2018) of the zoo cnn, warm-started from the standard benchmark model
# of common.py (training from scratch at ε = 0.3 takes far more epochs than a benchmark can afford on 2 cores).
# Any change here changes the cache key, so the model is retrained.
AT_CONFIG: dict[str, Any] = {
    "base": common.TRAIN_CONFIG,
    "objective": "pgd-at",
    "eps": EPS_LINF,
    "pgd_steps": 10,
    "pgd_rel_stepsize": 0.25,
    "epochs": 1,
    "batch_size": 128,
    "lr": 1e-3,
    "seed": 0,
}


class PGDATObjective:
    """Madry et al.'s objective: cross-entropy on the PGD adversarial batch (l∞ ball, no early stop)."""

    def __init__(self, eps: float, steps: int, rel_stepsize: float) -> None:
        self.threat = LpBall("linf", eps)
        self.attack = PGD(steps=steps, rel_stepsize=rel_stepsize, early_stop=False)
        self.calls = 0

    def __call__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        # PGD's base __call__ puts the model in eval mode for the attack and restores training mode afterwards
        x_adv = self.attack(model, x, y, threat=self.threat, seed=self.calls).x_adv
        self.calls += 1
        return F.cross_entropy(model(x_adv), y)

    def __repr__(self) -> str:
        return f"PGDATObjective(threat={self.threat!r}, attack={self.attack!r})"


def _at_cache_path() -> Path:
    digest = hashlib.sha256(json.dumps(AT_CONFIG, sort_keys=True).encode()).hexdigest()[:10]
    return common.CACHE_DIR / f"mnist_{common.TRAIN_CONFIG['arch']}_pgdat_{digest}.pt"


def get_adv_model(split: common.Split, *, retrain: bool = False, log: Callable[[str], None] = print) -> nn.Module:
    """The PGD-trained cnn: loaded from ``benchmarks/.cache/`` when cached, trained (and cached) otherwise."""
    path = _at_cache_path()
    if path.exists() and not retrain:
        try:
            model = load_model(path)
            log(f"adv model: loaded {path.relative_to(common.BENCH_DIR.parent)}")
            return model.eval()
        except Exception as exc:
            log(f"adv model: could not load {path.name} ({type(exc).__name__}: {exc}); retraining")
    cfg = AT_CONFIG
    model = common.get_model(split, log=log)
    log(f"adv model: PGD adversarial training ({json.dumps({k: v for k, v in cfg.items() if k != 'base'})})")
    objective = PGDATObjective(cfg["eps"], cfg["pgd_steps"], cfg["pgd_rel_stepsize"])
    t0 = time.perf_counter()
    history = train(
        model,
        split.train,
        epochs=cfg["epochs"],
        batch_size=cfg["batch_size"],
        lr=cfg["lr"],
        objective=objective,
        seed=cfg["seed"],
        progress=False,
    )
    seconds = time.perf_counter() - t0
    model.eval()
    x, y = split.x_eval[:500], split.y_eval[:500]
    adv = PGD(steps=40, rel_stepsize=0.01 / 0.3 * 2.5, random_start=True)(model, x, y, threat=LpBall("linf", EPS_LINF))
    log(
        f"adv model: trained in {seconds:.1f} s (adversarial loss per epoch: "
        + ", ".join(f"{v:.4f}" for v in history)
        + f"); clean accuracy on the {common.N_EVAL} evaluation images "
        f"{common.accuracy(model, split.x_eval, split.y_eval):.4f}, "
        f"PGD-40 robust accuracy at l∞ ε = {EPS_LINF} on the first 500 {common.accuracy(model, adv.x_adv, y):.4f}"
    )
    common.CACHE_DIR.mkdir(parents=True, exist_ok=True)
    save_model(model, path)
    log(f"adv model: cached at {path.relative_to(common.BENCH_DIR.parent)}")
    return model


# ---------------------------------------------------------------------------------------------------- checks
@dataclass
class Outcome:
    """One competitor's output judged by this benchmark's code (never by the library that produced it)."""

    n_correct: int  # clean-correct samples of the batch (the only ones an attack can fool)
    success: torch.Tensor  # bool (N,): clean-correct, misclassified on x_adv (re-predicted here), inside the ball
    dist: torch.Tensor  # (N,) distance of x_adv from x in the attack's norm
    in_box: bool
    in_ball: bool  # every x_adv within eps (bounded attacks); True for minimal attacks

    @property
    def success_rate(self) -> float:
        return float(self.success.sum()) / max(self.n_correct, 1)

    @property
    def robust_accuracy(self) -> float:
        return (self.n_correct - int(self.success.sum())) / self.success.numel()

    def dist_stats(self) -> tuple[float, float, float]:
        """Mean and median distance of the successes, and the median over clean-correct samples (failure = ∞)."""
        d = self.dist[self.success]
        if d.numel() == 0:
            return math.nan, math.nan, math.inf
        all_d = torch.full((self.n_correct,), math.inf)
        all_d[: d.numel()] = d.sort().values
        return float(d.mean()), float(d.median()), float(all_d.sort().values[(self.n_correct - 1) // 2])


def distance(x: torch.Tensor, x_adv: torch.Tensor, norm: str) -> torch.Tensor:
    delta = (x_adv - x).flatten(1)
    return delta.abs().amax(dim=1) if norm == "linf" else delta.norm(dim=1)


def judge(model: nn.Module, x: torch.Tensor, y: torch.Tensor, x_adv: Any, norm: str, eps: float) -> Outcome:
    """Re-predict ``x_adv`` with the model; count a success only inside [0, 1] and (when bounded) the ε-ball."""
    if not isinstance(x_adv, torch.Tensor):
        x_adv = torch.as_tensor(x_adv)
    x_adv = x_adv.detach().cpu().to(x.dtype).reshape(x.shape)
    correct = common.predict(model, x) == y
    dist = distance(x, x_adv, norm)
    in_box_each = ((x_adv >= 0) & (x_adv <= 1)).flatten(1).all(dim=1)
    in_ball_each = dist <= eps * (1 + 1e-5) + 1e-6 if math.isfinite(eps) else torch.ones_like(in_box_each)
    success = correct & (common.predict(model, x_adv) != y) & in_box_each & in_ball_each
    return Outcome(
        n_correct=int(correct.sum()),
        success=success,
        dist=dist,
        in_box=bool(in_box_each.all()),
        in_ball=bool(in_ball_each.all()),
    )


# ---------------------------------------------------------------------------------------------------- peers
def art_classifier(model: nn.Module) -> Any:
    from art.estimators.classification import PyTorchClassifier

    return PyTorchClassifier(
        model=model,
        loss=nn.CrossEntropyLoss(),
        input_shape=common.INPUT_SHAPE,
        nb_classes=common.NUM_CLASSES,
        clip_values=(0.0, 1.0),
        device_type="cpu",
    )


def art_run(atk: Any) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    return lambda x, y: torch.from_numpy(atk.generate(x=x.numpy(), y=y.numpy()))


def foolbox_run(peer: common.Peer, model: nn.Module, atk: Any, eps: float | None) -> Callable[..., torch.Tensor]:
    fmodel = peer.module.PyTorchModel(model, bounds=(0.0, 1.0), device="cpu")

    def run(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        _, clipped, _ = atk(fmodel, x, y, epsilons=eps)
        return clipped

    return run


# A competitor: (settings it ran with, a factory ``(x, y) -> callable returning x_adv``); the factory is called on
# the measured batch and on an 8-image warm-up batch.
Runner = Callable[[torch.Tensor, torch.Tensor], Any]


@dataclass
class Experiment:
    key: str
    title: str
    model: str  # "standard" or "adv"
    norm: str
    eps: float  # math.inf for minimal attacks
    report_eps: float  # success rate reported at this radius for minimal attacks
    competitors: dict[str, tuple[str, Runner]]


def build_experiments(
    models: dict[str, nn.Module], peers: dict[str, common.Peer], args: argparse.Namespace
) -> list[Experiment]:
    from bastion.attacks import APGD, FAB, CarliniWagnerL2, DeepFool, Square

    ta = peers["torchattacks"].module if "torchattacks" in peers and peers["torchattacks"].available else None
    fb = peers["foolbox"].module if "foolbox" in peers and peers["foolbox"].available else None
    has_art = "art" in peers and peers["art"].available
    exps: list[Experiment] = []
    eps = args.eps

    def add(exp_key: str, name: str, settings: str, make: Callable[[nn.Module], Runner]) -> None:
        exp = next(e for e in exps if e.key == exp_key)
        exp.competitors[name] = (settings, make(models[exp.model]))  # type: ignore[arg-type]

    def tv(p: str) -> str:
        return peers[p].version or ""

    # ---- APGD-CE, l∞ ε = 0.3, adversarially trained model
    if "apgd" in args.attacks:
        s = args.apgd_steps
        exps.append(Experiment("apgd", f"APGD-CE, l∞ ε = {eps}, {s} steps, 1 restart", "adv", "linf", eps, eps, {}))
        atk = APGD(loss="ce", steps=s, restarts=1)
        add(
            "apgd",
            "bastion APGD",
            f"APGD(loss='ce', steps={s}, restarts=1)",
            lambda m, atk=atk: lambda x, y: atk(m, x, y, threat=LpBall("linf", eps)).x_adv,
        )
        if ta:
            add(
                "apgd",
                f"torchattacks APGD {tv('torchattacks')}",
                f"APGD(norm='Linf', eps={eps}, steps={s}, n_restarts=1, loss='ce', seed=0)",
                lambda m: ta.APGD(m, norm="Linf", eps=eps, steps=s, n_restarts=1, loss="ce", seed=0),
            )
        if has_art:
            from art.attacks.evasion import AutoProjectedGradientDescent

            add(
                "apgd",
                f"ART AutoProjectedGradientDescent {tv('art')}",
                f"AutoProjectedGradientDescent(norm=inf, eps={eps}, eps_step=2*eps, max_iter={s}, nb_random_init=1, "
                "loss_type='cross_entropy', batch_size=n)",
                lambda m: art_run(
                    AutoProjectedGradientDescent(
                        art_classifier(m),
                        norm=math.inf,
                        eps=eps,
                        eps_step=2 * eps,
                        max_iter=s,
                        nb_random_init=1,
                        loss_type="cross_entropy",
                        batch_size=args.n,
                        verbose=False,
                    )
                ),
            )

    # ---- C&W l2 (minimal), standard model
    if "cw" in args.attacks:
        b, s, c0 = args.cw_binary_steps, args.cw_steps, 1e-3
        exps.append(
            Experiment(
                "cw",
                f"C&W l2 (minimal), {b} binary-search steps × {s} steps, lr 0.01",
                "standard",
                "l2",
                math.inf,
                args.report_l2,
                {},
            )
        )
        atk = CarliniWagnerL2(binary_search_steps=b, steps=s, lr=1e-2, initial_const=c0, abort_early=True)
        add(
            "cw",
            "bastion CarliniWagnerL2",
            f"CarliniWagnerL2(binary_search_steps={b}, steps={s}, lr=0.01, initial_const={c0}, abort_early=True)",
            lambda m, atk=atk: lambda x, y: atk(m, x, y, threat=LpBall("l2", math.inf)).x_adv,
        )
        # torchattacks has no search over c: the same schedule (one constant, all steps) for an equal-work comparison
        one = CarliniWagnerL2(binary_search_steps=1, steps=b * s, lr=1e-2, initial_const=1.0, abort_early=False)
        add(
            "cw",
            "bastion CarliniWagnerL2, c = 1",
            f"CarliniWagnerL2(binary_search_steps=1, steps={b * s}, lr=0.01, initial_const=1, abort_early=False)",
            lambda m, atk=one: lambda x, y: atk(m, x, y, threat=LpBall("l2", math.inf)).x_adv,
        )
        if ta:
            add(
                "cw",
                f"torchattacks CW {tv('torchattacks')}",
                f"CW(c=1, kappa=0, steps={b * s}, lr=0.01) — no binary search in torchattacks: one constant, "
                f"steps = {b}×{s}",
                lambda m: ta.CW(m, c=1, kappa=0, steps=b * s, lr=0.01),
            )
        if fb:
            add(
                "cw",
                f"foolbox L2CarliniWagnerAttack {tv('foolbox')}",
                f"L2CarliniWagnerAttack(binary_search_steps={b}, steps={s}, stepsize=0.01, initial_const={c0}, "
                "confidence=0, abort_early=True)",
                lambda m: foolbox_run(
                    peers["foolbox"],
                    m,
                    fb.attacks.L2CarliniWagnerAttack(
                        binary_search_steps=b, steps=s, stepsize=0.01, initial_const=c0, confidence=0, abort_early=True
                    ),
                    None,
                ),
            )
        if has_art and args.include_slow:
            from art.attacks.evasion import CarliniL2Method

            add(
                "cw",
                f"ART CarliniL2Method {tv('art')}",
                f"CarliniL2Method(binary_search_steps={b}, max_iter={s}, learning_rate=0.01, initial_const={c0}, "
                "confidence=0, batch_size=n)",
                lambda m: art_run(
                    CarliniL2Method(
                        art_classifier(m),
                        binary_search_steps=b,
                        max_iter=s,
                        learning_rate=0.01,
                        initial_const=c0,
                        batch_size=args.n,
                        verbose=False,
                    )
                ),
            )

    # ---- DeepFool l2 (minimal), standard model
    if "deepfool" in args.attacks:
        s, ov, cand = 50, 0.02, 10
        exps.append(
            Experiment(
                "deepfool",
                f"DeepFool l2 (minimal), {s} steps, overshoot {ov}, {cand} candidates",
                "standard",
                "l2",
                math.inf,
                args.report_l2,
                {},
            )
        )
        atk = DeepFool(steps=s, overshoot=ov, candidates=cand)
        add(
            "deepfool",
            "bastion DeepFool",
            f"DeepFool(steps={s}, overshoot={ov}, candidates={cand})",
            lambda m, atk=atk: lambda x, y: atk(m, x, y, threat=LpBall("l2", math.inf)).x_adv,
        )
        if ta:
            add(
                "deepfool",
                f"torchattacks DeepFool {tv('torchattacks')}",
                f"DeepFool(steps={s}, overshoot={ov}) (all 10 classes)",
                lambda m: ta.DeepFool(m, steps=s, overshoot=ov),
            )
        if fb:
            add(
                "deepfool",
                f"foolbox L2DeepFoolAttack {tv('foolbox')}",
                f"L2DeepFoolAttack(steps={s}, candidates={cand}, overshoot={ov}, loss='logits')",
                lambda m: foolbox_run(
                    peers["foolbox"], m, fb.attacks.L2DeepFoolAttack(steps=s, candidates=cand, overshoot=ov), None
                ),
            )
        if has_art:
            from art.attacks.evasion import DeepFool as ArtDeepFool

            add(
                "deepfool",
                f"ART DeepFool {tv('art')}",
                f"DeepFool(max_iter={s}, epsilon={ov} (overshoot), nb_grads={cand}, batch_size=n)",
                lambda m: art_run(
                    ArtDeepFool(
                        art_classifier(m), max_iter=s, epsilon=ov, nb_grads=cand, batch_size=args.n, verbose=False
                    )
                ),
            )

    # ---- FAB l∞ (minimal), standard model
    if "fab" in args.attacks:
        s = args.fab_steps
        exps.append(
            Experiment(
                "fab", f"FAB l∞ (minimal, untargeted), {s} steps, 1 restart", "standard", "linf", math.inf, 0.15, {}
            )
        )
        atk = FAB(steps=s, restarts=1)
        add(
            "fab",
            "bastion FAB",
            f"FAB(steps={s}, restarts=1, alpha_max=0.1, eta=1.05, beta=0.9)",
            lambda m, atk=atk: lambda x, y: atk(m, x, y, threat=LpBall("linf", math.inf)).x_adv,
        )
        if ta:
            add(
                "fab",
                f"torchattacks FAB {tv('torchattacks')}",
                f"FAB(norm='Linf', eps={eps}, steps={s}, n_restarts=1, alpha_max=0.1, eta=1.05, beta=0.9, "
                f"multi_targeted=False) — torchattacks keeps only points found within eps = {eps}",
                lambda m: ta.FAB(m, norm="Linf", eps=eps, steps=s, n_restarts=1, multi_targeted=False, seed=0),
            )

    # ---- Square l∞ ε = 0.3, adversarially trained model
    if "square" in args.attacks:
        q = args.square_queries
        exps.append(Experiment("square", f"Square l∞, ε = {eps}, {q} queries, p_init 0.8", "adv", "linf", eps, eps, {}))
        atk = Square(queries=q, p_init=0.8, loss="margin", restarts=1)
        add(
            "square",
            "bastion Square",
            f"Square(queries={q}, p_init=0.8, loss='margin', restarts=1)",
            lambda m, atk=atk: lambda x, y: atk(m, x, y, threat=LpBall("linf", eps)).x_adv,
        )
        if ta:
            add(
                "square",
                f"torchattacks Square {tv('torchattacks')}",
                f"Square(norm='Linf', eps={eps}, n_queries={q}, n_restarts=1, p_init=0.8, loss='margin', seed=0)",
                lambda m: ta.Square(m, norm="Linf", eps=eps, n_queries=q, n_restarts=1, p_init=0.8, seed=0),
            )
        if has_art:
            from art.attacks.evasion import SquareAttack

            add(
                "square",
                f"ART SquareAttack {tv('art')}",
                f"SquareAttack(norm=inf, eps={eps}, max_iter={q}, p_init=0.8, nb_restarts=1, batch_size=n) "
                "(margin loss by default)",
                lambda m: art_run(
                    SquareAttack(
                        art_classifier(m),
                        norm=math.inf,
                        eps=eps,
                        max_iter=q,
                        p_init=0.8,
                        nb_restarts=1,
                        batch_size=args.n,
                        verbose=False,
                    )
                ),
            )
    return exps


# ---------------------------------------------------------------------------------------------------- runs
def fmt(v: float, digits: int = 3) -> str:
    return "∞" if v == math.inf else ("n/a" if v != v else f"{v:.{digits}f}")


def run_experiment(
    exp: Experiment, model: nn.Module, x: torch.Tensor, y: torch.Tensor, args: argparse.Namespace
) -> str:
    print(f"\n## {exp.title}; {exp.model} model, batch of {x.shape[0]} ({common.load_average()})")
    for name, (settings, _) in exp.competitors.items():
        print(f"  {name}: {settings}")
    comps = {name: (lambda r=r: r(x, y)) for name, (_, r) in exp.competitors.items()}
    warm = {name: (lambda r=r: r(x[:8], y[:8])) for name, (_, r) in exp.competitors.items()}
    timings = common.time_alternating(comps, repeats=args.repeats, warmup=args.warmup, warmup_with=warm)
    bounded = math.isfinite(exp.eps)
    outcomes = {n: judge(model, x, y, t.output, exp.norm, exp.eps) for n, t in timings.items() if t.seconds}
    b_name = next(iter(exp.competitors))
    b_t = timings[b_name].median if b_name in outcomes else math.nan
    sym = "l∞" if exp.norm == "linf" else "l2"
    rows = []
    for name, t in timings.items():
        if name not in outcomes:
            continue
        o = outcomes[name]
        ratio = f"{b_t / t.median:.2f}" if name != b_name else "1.00"
        row = [name, f"{t.median:.2f}", f"{t.fastest:.2f}–{t.slowest:.2f}", f"{t.cpu_median:.2f}", ratio]
        if bounded:
            row += [f"{o.robust_accuracy:.3f}", f"{o.success_rate:.3f}", f"{float(o.dist.max()):.4f}"]
            row.append("yes" if o.in_ball and o.in_box else f"NO (ball {o.in_ball}, box {o.in_box})")
        else:
            mean_d, med_d, med_all = o.dist_stats()
            within = float((o.success & (o.dist <= exp.report_eps)).sum()) / max(o.n_correct, 1)
            row += [f"{o.success_rate:.3f}", f"{within:.3f}", fmt(mean_d), fmt(med_d), fmt(med_all)]
            row.append("yes" if o.in_box else "NO")
        rows.append(row)
    header = ["implementation", "median s", "range s", "CPU s", "bastion time ÷ this"]
    if bounded:
        header += ["robust acc", "success rate", f"max {sym} dist", "in ball & [0,1]"]
    else:
        header += [
            "success rate",
            f"success at {sym} ≤ {exp.report_eps:g}",
            f"mean {sym} (successes)",
            f"median {sym} (successes)",
            f"median {sym} (failure = ∞)",
            "in [0,1]",
        ]
    lines = [
        f"### {exp.title}; {exp.model} model, batch {x.shape[0]}, median of {args.repeats} runs",
        "",
        common.markdown_table(header, rows),
        "",
    ]
    lines += [f"- {name}: `{settings}`" for name, (settings, _) in exp.competitors.items()]
    lines.append(f"- {torch.get_num_threads()} torch threads; {common.load_average()} at the end")
    lines += [f"- not measured: {n}: {t.error}" for n, t in timings.items() if t.error]
    lines += [verdict(exp, timings, outcomes, n) for n in exp.competitors if n.startswith("bastion") and n in outcomes]
    text = "\n".join(lines)
    print("\n" + text)
    return text


def strength(exp: Experiment, o: Outcome) -> tuple[float, float]:
    """Lower is stronger: robust accuracy (bounded); for minimal attacks the fraction *not* fooled within the
    reported radius, then the median distance (failure = ∞). The radius matters: Foolbox's C&W returns a black image
    (l2 ≈ 9–11) where it finds nothing, a "success" no one would count."""
    if math.isfinite(exp.eps):
        return (o.robust_accuracy, 0.0)
    within = float((o.success & (o.dist <= exp.report_eps)).sum()) / max(o.n_correct, 1)
    return (1.0 - within, o.dist_stats()[2])


def verdict(exp: Experiment, timings: dict[str, common.Timing], outcomes: dict[str, Outcome], b_name: str) -> str:
    """The issue's target: at least as strong as the strongest peer, in at most 0.9× its time."""
    peers = [n for n in outcomes if not n.startswith("bastion")]
    if b_name not in outcomes or not peers:
        return "- target: not assessable (bastion or every peer missing)"
    best = min(peers, key=lambda n: (strength(exp, outcomes[n]), timings[n].median))
    sb, sp = strength(exp, outcomes[b_name]), strength(exp, outcomes[best])
    ratio = timings[b_name].median / timings[best].median
    as_strong = sb[0] <= sp[0] + 1e-9 and (sb[0] < sp[0] - 1e-9 or sb[1] <= sp[1] * 1.01)  # distances within 1 %: a tie
    what = "robust accuracy" if math.isfinite(exp.eps) else f"(not fooled within {exp.report_eps:g}, median distance)"
    return (
        f"- target for {b_name} (≥ strongest peer's strength at ≤ 0.9× its time): strongest peer {best}; {what} "
        f"{tuple(round(v, 4) for v in sb)} vs {tuple(round(v, 4) for v in sp)} → "
        f"{'as strong' if as_strong else 'WEAKER'}; time bastion / that peer = {ratio:.2f} → "
        f"{'met' if as_strong and ratio <= 0.9 else 'MISSED'}"
    )


def run_ensemble(model: nn.Module, x: torch.Tensor, y: torch.Tensor, peers: dict[str, common.Peer], args) -> str:
    import bastion
    from bastion.attacks.presets import PRESETS, preset

    eps = args.eps
    threat = LpBall("linf", eps)
    print(f"\n## Standard ensemble, l∞ ε = {eps}; adv model, batch of {x.shape[0]} ({common.load_average()})")
    settings: dict[str, str] = {}
    comps: dict[str, Callable[[], Any]] = {}
    extra: dict[str, Any] = {}

    def run_bastion() -> Any:
        res = bastion.evaluate(model, (x, y), threat, preset("standard", ["linf"]), checks=False, progress=False)
        extra["bastion"] = res
        return res

    settings["bastion evaluate(standard)"] = (
        f"evaluate(model, (x, y), LpBall('linf', {eps}), preset('standard', ['linf']), checks=False) = "
        f"{PRESETS['standard']}"
    )
    comps["bastion evaluate(standard)"] = run_bastion
    # torchattacks' AutoAttack builds APGD, APGD-T and FAB-T with their class defaults, 10 steps (AutoAttack: 100),
    # so the same cascade with 10 steps is timed too, to compare equal work.
    ten = {"apgd": {"steps": 10}, "apgd-t": {"steps": 10}, "fab-t": {"steps": 10}}

    def run_bastion10() -> Any:
        res = bastion.evaluate(model, (x, y), threat, preset("standard", ["linf"], ten), checks=False, progress=False)
        extra["bastion10"] = res
        return res

    settings["bastion evaluate(standard, 10 steps)"] = (
        f"the same with preset('standard', ['linf'], overrides={ten}), i.e. torchattacks' step counts"
    )
    comps["bastion evaluate(standard, 10 steps)"] = run_bastion10
    if peers.get("torchattacks") and peers["torchattacks"].available:
        ta = peers["torchattacks"].module
        name = f"torchattacks AutoAttack {peers['torchattacks'].version}"
        atk = ta.AutoAttack(model, norm="Linf", eps=eps, version="standard", n_classes=10, seed=0)
        settings[name] = (
            f"AutoAttack(norm='Linf', eps={eps}, version='standard', n_classes=10, seed=0): APGD-CE, APGD-T "
            "(9 targets), FAB-T (9 targets), each with torchattacks' default 10 steps, and Square 5000"
        )
        comps[name] = lambda: atk(x, y)
        # the same cascade with the paper's 100 iterations for APGD, APGD-T and FAB-T (AutoAttack's standard version)
        atk100 = ta.AutoAttack(model, norm="Linf", eps=eps, version="standard", n_classes=10, seed=0)
        for sub_attack in atk100._autoattack.attacks:
            if hasattr(sub_attack, "steps"):
                sub_attack.steps = 100
        name100 = f"torchattacks AutoAttack {peers['torchattacks'].version}, 100 steps"
        settings[name100] = "the same with `steps = 100` set on its APGD, APGD-T and FAB-T (AutoAttack's budget)"
        comps[name100] = lambda: atk100(x, y)
    if peers.get("art") and peers["art"].available:
        from art.attacks.evasion import AutoAttack, AutoProjectedGradientDescent, SquareAttack

        clf = art_classifier(model)
        n = x.shape[0]
        sub = [
            AutoProjectedGradientDescent(
                clf,
                norm=math.inf,
                eps=eps,
                eps_step=2 * eps,
                max_iter=100,
                nb_random_init=1,
                batch_size=n,
                loss_type="cross_entropy",
                verbose=False,
            ),
            AutoProjectedGradientDescent(
                clf,
                norm=math.inf,
                eps=eps,
                eps_step=2 * eps,
                max_iter=100,
                nb_random_init=1,
                batch_size=n,
                loss_type="difference_logits_ratio",
                verbose=False,
            ),
            SquareAttack(
                clf, norm=math.inf, eps=eps, max_iter=5000, p_init=0.8, nb_restarts=1, batch_size=n, verbose=False
            ),
        ]
        art_aa = AutoAttack(clf, norm=math.inf, eps=eps, eps_step=2 * eps, attacks=sub, batch_size=n, targeted=False)
        name = f"ART AutoAttack {peers['art'].version}"
        settings[name] = (
            f"AutoAttack(norm=inf, eps={eps}, targeted=False, attacks=[APGD-CE 100 it, APGD-DLR 100 it "
            "(untargeted), Square 5000 queries], 1 random init / restart each) — ART has no FAB, and its default "
            "list (PGD, APGD-CE and -DLR with 5 random inits, DeepFool, Square with 5 restarts) is several times slower"
        )
        comps[name] = lambda: art_run(art_aa)(x, y)
    for name, s in settings.items():
        print(f"  {name}: {s}")
    timings = common.time_alternating(comps, repeats=args.ensemble_repeats, warmup=0)
    rows = []
    b_name = "bastion evaluate(standard)"
    b_t = timings[b_name].median if timings[b_name].seconds else math.nan
    accs: dict[str, float] = {}
    for name, t in timings.items():
        if not t.seconds:
            continue
        if name.startswith("bastion"):
            res = extra["bastion" if name == b_name else "bastion10"]
            acc = res.worst_case[threat.key]
            check = "bastion's own re-prediction (evaluate returns records, not x_adv)"
            per = ", ".join(f"{a}: {v:.3f}" for a, v in res.robust_accuracy[threat.key].items())
            check += f"; after each attack {per}"
        else:
            o = judge(model, x, y, t.output, "linf", eps)
            acc = o.robust_accuracy
            check = "re-predicted here; in ball & [0,1]: " + ("yes" if o.in_ball and o.in_box else "NO")
        accs[name] = acc
        ratio = f"{b_t / t.median:.2f}" if name != b_name else "1.00"
        rows.append([name, f"{t.median:.1f}", f"{t.cpu_median:.1f}", ratio, f"{acc:.3f}", check])
    header = ["implementation", "wall s", "CPU s", "bastion time ÷ this", "robust acc", "checked by"]
    lines = [
        f"### Standard ensemble, l∞ ε = {eps}; adv model, batch {x.shape[0]}, median of {args.ensemble_repeats} run(s)",
        "",
        common.markdown_table(header, rows),
        "",
    ]
    lines += [f"- {name}: `{s}`" for name, s in settings.items()]
    lines.append(
        f"- clean accuracy on the batch {common.accuracy(model, x, y):.3f}; {common.load_average()} at the end"
    )
    lines += [f"- not measured: {n}: {t.error}" for n, t in timings.items() if t.error]
    if b_name in accs and len(accs) > 1:
        worst_peer = min(a for n, a in accs.items() if not n.startswith("bastion"))
        ok_acc = accs[b_name] <= worst_peer + 1e-9
        line = (
            f"- target: robust accuracy bastion {accs[b_name]:.3f} vs lowest peer {worst_peer:.3f} → "
            f"{'met' if ok_acc else 'MISSED'}"
        )
        ta_name = next((n for n in accs if n.startswith("torchattacks") and not n.endswith("100 steps")), None)
        if ta_name:
            r = b_t / timings[ta_name].median
            line += (
                f"; time bastion / torchattacks AutoAttack = {r:.2f} (target ≤ 0.5) → {'met' if r <= 0.5 else 'MISSED'}"
            )
            ta100 = timings.get(f"{ta_name}, 100 steps")
            if ta100 is not None and ta100.seconds:
                line += f"; against torchattacks with AutoAttack's 100 steps: {b_t / ta100.median:.2f}"
            b10 = timings.get("bastion evaluate(standard, 10 steps)")
            if b10 is not None and b10.seconds:
                line += f"; with torchattacks' 10 steps: {b10.median / timings[ta_name].median:.2f}"
        lines.append(line)
    text = "\n".join(lines)
    print("\n" + text)
    return text


ATTACK_KEYS = ("apgd", "cw", "deepfool", "fab", "square", "ensemble")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=100, help="images per batch (from the evaluation split)")
    ap.add_argument("--repeats", type=int, default=3, help="measured runs per competitor (median reported)")
    ap.add_argument("--warmup", type=int, default=1, help="unrecorded warm-up rounds (on 8 images)")
    ap.add_argument("--attacks", nargs="+", choices=ATTACK_KEYS, default=list(ATTACK_KEYS))
    ap.add_argument("--peers", nargs="*", choices=common.PEERS, default=list(common.PEERS))
    ap.add_argument(
        "--eps", type=float, default=EPS_LINF, help="l∞ radius of APGD, Square and the ensemble (adv model)"
    )
    ap.add_argument("--apgd-steps", type=int, default=100)
    ap.add_argument("--cw-binary-steps", type=int, default=5)
    ap.add_argument("--cw-steps", type=int, default=100)
    ap.add_argument(
        "--report-l2", type=float, default=2.0, help="l2 radius at which minimal l2 attacks' success is shown"
    )
    ap.add_argument("--fab-steps", type=int, default=100)
    ap.add_argument("--n-minimal", type=int, default=16, help="images for C&W, DeepFool and FAB (slow peers)")
    ap.add_argument(
        "--include-slow",
        action="store_true",
        help="also run ART CarliniL2Method (numpy line search: about a minute for 8 images and 2×10 steps)",
    )
    ap.add_argument("--square-queries", type=int, default=1000)
    ap.add_argument("--ensemble-n", type=int, default=50, help="images for the ensemble comparison")
    ap.add_argument("--ensemble-repeats", type=int, default=1)
    ap.add_argument("--output", type=Path, help="also write the Markdown tables to this file")
    args = ap.parse_args(argv)

    print(f"# Attacks vs peers\n\n{common.machine_summary()}\n{common.load_average()}")
    peers = {name: common.load_peer(name) for name in args.peers}
    for p in peers.values():
        print(f"peer {p.name}: {p.version}" if p.available else f"peer {p.name}: unavailable — {p.reason}")
    split = common.load_split()
    models = {"standard": common.get_model(split), "adv": get_adv_model(split)}
    x, y = split.x_eval[: args.n], split.y_eval[: args.n]
    for k, m in models.items():
        print(f"{k} model: clean accuracy on the batch {common.accuracy(m, x, y):.3f}")
    sections = []
    for e in build_experiments(models, peers, args):
        n = args.n if math.isfinite(e.eps) else args.n_minimal
        sections.append(run_experiment(e, models[e.model], split.x_eval[:n], split.y_eval[:n], args))
    if "ensemble" in args.attacks:
        xe, ye = split.x_eval[: args.ensemble_n], split.y_eval[: args.ensemble_n]
        sections.append(run_ensemble(models["adv"], xe, ye, peers, args))
    if args.output:
        args.output.write_text(common.machine_summary() + "\n\n" + "\n\n".join(sections) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
