"""Fingerprinting and ownership verification with adversarial examples.

A *fingerprint* of a source model is a set of inputs with the labels the source gives them, chosen so that copies
of the model (and models derived from it) give the same labels while independently trained models do not. A
suspect's *match rate* is the fraction of the fingerprint it labels as the source does; it is declared a copy when
the rate exceeds a decision threshold. Two generators:

* :class:`IPGuard` (Cao, Jia & Gong, "IPGuard: Protecting Intellectual Property of Deep Neural Networks via
  Fingerprinting the Classification Boundary", ACM AsiaCCS 2021): data points *near the source's classification
  boundary*. From a seed input of class ``j`` and a random other class ``i``, minimise over the input domain::

      ReLU(z_j(x) - z_i(x) + k) + ReLU(max_{t ∉ {i, j}} z_t(x) - z_j(x))

  with Adam: zero exactly when ``i`` beats ``j`` by the margin ``k`` and ``j`` is the runner-up, so the point sits
  between the regions of classes ``i`` and ``j`` at a distance to the boundary governed by ``k``. Each sample stops
  once its loss is zero. The paper tunes ``k`` per data set and optimises logits; the defaults here (k = 0.5,
  1000 steps of Adam at lr 0.01, seeds drawn from the given data) are for the small digits models. The search is
  an :class:`~bastion.attacks.base.Attack` (targeted at ``i``, no distance budget), so the shared base validates,
  clips to the domain and re-verifies every point: a fingerprint point is one the source labels ``i``.
* :class:`Conferrable` (Lukas, Zhang & Kerschbaum, "Deep Neural Network Fingerprinting by Conferrable Adversarial
  Examples", ICLR 2021): adversarial examples that transfer to *surrogates* (models derived from the source,
  e.g. by distillation) but not to *references* (models trained independently). With ``S̄`` the mean softmax of
  the surrogates, ``R`` the references' softmax outputs and ``t = argmax M(x')`` the source's label of ``x'``, the
  *conferrability score* is (the paper's eq. 2)::

      σ(x') = S̄(x')_t · (1 - max_{R} R(x')_t)

  and the generation maximises inside an l∞ ball of radius ``eps`` around a seed ``x0`` (the paper's CEM loss,
  eq. 4, with λ1 = λ2 = λ3 = 1)::

      λ1 · log σ(x') + λ2 · CE(M(x'), M(x0)) - λ3 · CE(M(x'), S̄(x'))

  (be conferrable, be adversarial for the source, keep the surrogates agreeing with the source). One deviation:
  in the loss, ``σ`` is taken at the most conferrable class other than the seed's, ``max_{c != M(x0)} S̄_c (1 -
  max_R R_c)``, rather than at ``t = argmax M(x')``: at the start ``t`` is still the seed's class, and ``σ`` there
  pulls the point back to it (on the digits models the literal form found examples no more conferrable than plain
  PGD's; this form raises their mean σ by about 0.1). The score reported and ranked is the paper's σ. The paper
  optimises with Adam; here the steps are PGD's normalised l∞ steps through the threat model's geometry
  (``LpBall('linf', eps).step/project``), so the point stays inside the ball by construction, with the shared
  attack base re-verifying that the source's label changed. Seeds whose example reached the source's new label
  are ranked by σ and the ``n`` most conferrable are kept.

Verification: :func:`match_rate`, :func:`verify` (per-suspect rates, a threshold, ROC AUC over suspects whose role
is known) and :func:`roc_auc`. :func:`suspect_models` builds the usual suspects of an evaluation from a source
model: an exact copy, a fine-tuned copy, a pruned copy and a distilled copy (positives), and models trained
independently with the same and with another architecture (negatives).
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bastion.attacks.base import Attack, CountingModel, positive_float, positive_int
from bastion.data import Dataset
from bastion.errors import InputError
from bastion.models.checks import check_logits, eval_mode, model_device, model_fingerprint
from bastion.models.oracle import BlackBox
from bastion.results import Criterion, SampleRecord
from bastion.store import Store, resumable_run
from bastion.threat import LpBall, ThreatModel

__all__ = [
    "Conferrable",
    "Fingerprint",
    "IPGuard",
    "SuspectReport",
    "VerificationResult",
    "conferrability",
    "match_rate",
    "roc_auc",
    "suspect_models",
    "verify",
]


# ----------------------------------------------------------------------------------------------- fingerprint
@dataclass
class Fingerprint:
    """Fingerprint inputs and the source's labels of them.

    Attributes:
        x: the inputs (n, ...).
        labels: the source model's labels of ``x`` (n,).
        method: ``"ipguard"`` or ``"conferrable"``.
        seeds: index in the seed data of the input each point started from.
        scores: per-point score of the generator (IPGuard: the source's margin ``z_i - z_j``; conferrable: σ).
        seconds: generation time.
        options: the generator's options.
    """

    x: Tensor
    labels: Tensor
    method: str
    seeds: Tensor
    scores: Tensor
    seconds: float = 0.0
    options: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return int(self.x.shape[0])

    def summary(self) -> dict[str, Any]:
        return {
            "method": self.method, "n": len(self), "mean_score": float(self.scores.mean()) if len(self) else None,
            "seconds": self.seconds, "options": self.options,
        }  # fmt: skip


def _seed_indices(data: Dataset, n: int, gen: torch.Generator) -> Tensor:
    return torch.randperm(len(data), generator=gen)[: min(n, len(data))]


def _check_model(model: object, what: str) -> nn.Module:
    if isinstance(model, BlackBox):
        raise InputError(f"{what} must be a white-box torch model to generate a fingerprint (it follows gradients)")
    if not isinstance(model, nn.Module):
        raise InputError(f"{what} must be a torch.nn.Module, got {type(model).__name__}")
    return model


@torch.no_grad()
def _predict(model: nn.Module, x: Tensor, batch: int = 1024) -> Tensor:
    device = model_device(model)
    with eval_mode(model):
        out = [model(xb.to(device)).argmax(dim=1).cpu() for xb in x.split(batch)]
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.long)


# ----------------------------------------------------------------------------------------------- IPGuard
class _BoundarySearch(Attack):
    """IPGuard's boundary search as an attack: targeted at ``i``, ``j`` = the seed's class; no distance budget.

    Not registered (no ``name``): it is a fingerprint generator, not a robustness attack.
    """

    minimal = True  # no eps: the base only clips to the domain and re-verifies
    norms = ("linf", "l2", "l1")

    def __init__(self, *, k: float, steps: int, lr: float) -> None:
        self.k, self.steps, self.lr = k, steps, lr

    def run(
        self,
        model: CountingModel,
        x: Tensor,
        criterion: Criterion,
        threat: ThreatModel,
        generator: torch.Generator | None,
    ) -> Tensor:
        assert criterion.targets is not None
        i_all, j_all = criterion.targets, criterion.labels
        lo, hi = threat.domain
        var = x.clone()
        # Adam written out per row, so that a finished sample stays exactly where its loss reached zero
        m1, m2 = torch.zeros_like(x), torch.zeros_like(x)
        b1, b2, tiny = 0.9, 0.999, 1e-8
        active = torch.ones(x.shape[0], dtype=torch.bool, device=x.device)
        for step in range(1, self.steps + 1):
            idx = active.nonzero().squeeze(1)
            if idx.numel() == 0:
                break
            i, j = i_all[idx], j_all[idx]

            def loss_fn(z: Tensor, i: Tensor = i, j: Tensor = j) -> Tensor:
                return _boundary_loss(z, i, j, self.k)

            _, loss, grad = model.logits_and_grad(var[idx], loss_fn)
            done = loss <= 0
            live = idx[~done]
            g = grad[~done]
            m1[live] = b1 * m1[live] + (1 - b1) * g
            m2[live] = b2 * m2[live] + (1 - b2) * g.square()
            m_hat = m1[live] / (1 - b1**step)
            v_hat = m2[live] / (1 - b2**step)
            var[live] = (var[live] - self.lr * m_hat / (v_hat.sqrt() + tiny)).clamp(lo, hi)
            active[idx[done]] = False
        return var

    def __repr__(self) -> str:
        return f"IPGuardSearch(k={self.k!r}, steps={self.steps!r}, lr={self.lr!r})"


def _boundary_loss(logits: Tensor, i: Tensor, j: Tensor, k: float) -> Tensor:
    """IPGuard's loss per sample: ``ReLU(z_j - z_i + k) + ReLU(max_{t ∉ {i, j}} z_t - z_j)``."""
    zi = logits.gather(1, i[:, None]).squeeze(1)
    zj = logits.gather(1, j[:, None]).squeeze(1)
    others = logits.scatter(1, i[:, None], -math.inf).scatter(1, j[:, None], -math.inf).amax(dim=1)
    return F.relu(zj - zi + k) + F.relu(others - zj)


def _margin_ij(logits: Tensor, i: Tensor, j: Tensor) -> Tensor:
    return logits.gather(1, i[:, None]).squeeze(1) - logits.gather(1, j[:, None]).squeeze(1)


class IPGuard:
    """IPGuard fingerprints (Cao, Jia & Gong, AsiaCCS 2021): points near the source's classification boundary.

    Args:
        n: fingerprint points to generate (one per seed input; seeds whose search failed are dropped).
        k: the margin ``k`` by which the point's class ``i`` beats the runner-up ``j`` (0.5).
        steps: Adam iterations at most (1000).
        lr: Adam learning rate (0.01).
        seed: seeds the choice of the seed inputs and of the classes ``i``.
    """

    method = "ipguard"

    def __init__(self, *, n: int = 100, k: float = 0.5, steps: int = 1000, lr: float = 0.01, seed: int = 0) -> None:
        self.n = positive_int("n", n)
        self.k = positive_float("k", k, allow_zero=True)
        self.steps = positive_int("steps", steps)
        self.lr = positive_float("lr", lr)
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise InputError(f"seed must be an int, got {seed!r}")
        self.seed = seed

    def options(self) -> dict[str, Any]:
        return {"n": self.n, "k": self.k, "steps": self.steps, "lr": self.lr, "seed": self.seed}

    def __repr__(self) -> str:
        return f"IPGuard({', '.join(f'{k}={v!r}' for k, v in self.options().items())})"

    def generate(self, model: nn.Module, data: Dataset) -> Fingerprint:
        """Fingerprint ``model`` from seed inputs drawn from ``data`` (their labels are not used)."""
        started = time.perf_counter()
        model = _check_model(model, "model")
        if not isinstance(data, Dataset):
            raise InputError(f"data must be a bastion Dataset of seed inputs, got {type(data).__name__}")
        gen = torch.Generator().manual_seed(self.seed)
        idx = _seed_indices(data, self.n, gen)
        x0 = data.x[idx]
        device = model_device(model)
        with torch.no_grad(), eval_mode(model):
            k = check_logits(model(x0[:2].to(device)), min(2, len(x0)))
        j = _predict(model, x0)
        i = (j + torch.randint(1, k, j.shape, generator=gen)) % k  # a uniformly random class other than j
        threat = LpBall("linf", 1.0, domain=data.domain)
        res = _BoundarySearch(k=self.k, steps=self.steps, lr=self.lr)(
            model, x0.to(device), j.to(device), threat=threat, targets=i.to(device)
        )
        ok = res.success.cpu()
        x = res.x_adv.detach().cpu()[ok]
        with torch.no_grad(), eval_mode(model):
            logits = model(x.to(device)).cpu() if len(x) else torch.zeros(0, k)
        labels = logits.argmax(dim=1) if len(x) else torch.zeros(0, dtype=torch.long)
        scores = _margin_ij(logits, i[ok], j[ok]) if len(x) else torch.zeros(0)
        return Fingerprint(x=x, labels=labels, method=self.method, seeds=idx[ok], scores=scores,
                           seconds=time.perf_counter() - started, options=self.options())  # fmt: skip


# ----------------------------------------------------------------------------------------------- conferrable
def _mean_softmax(models: Sequence[nn.Module], x: Tensor) -> Tensor:
    return torch.stack([m(x).softmax(dim=1) for m in models]).mean(dim=0)


def conferrability(
    x: Tensor, source: nn.Module, surrogates: Sequence[nn.Module], references: Sequence[nn.Module]
) -> Tensor:
    """The conferrability score ``σ(x) = S̄(x)_t · (1 - max_R R(x)_t)``, ``t = argmax M(x)`` (Lukas et al., eq. 2)."""
    if not surrogates or not references:
        raise InputError("conferrability needs at least one surrogate and one reference model")
    device = model_device(source)
    with torch.no_grad():
        xd = x.to(device)
        t = source(xd).argmax(dim=1)
        s = _mean_softmax(surrogates, xd).gather(1, t[:, None]).squeeze(1)
        r = torch.stack([m(xd).softmax(dim=1).gather(1, t[:, None]).squeeze(1) for m in references]).amax(dim=0)
    return (s * (1 - r)).cpu()


class _ConferrableSearch(Attack):
    """Lukas et al.'s CEM loss maximised inside an l∞ ball with PGD steps; untargeted on the source. Unregistered."""

    norms = ("linf",)

    def __init__(
        self, *, steps: int, rel_stepsize: float, lambdas: tuple[float, float, float],
        surrogates: Sequence[nn.Module], references: Sequence[nn.Module],
    ) -> None:  # fmt: skip
        self.steps, self.rel_stepsize, self.lambdas = steps, rel_stepsize, lambdas
        self.surrogates, self.references = list(surrogates), list(references)

    def run(
        self,
        model: CountingModel,
        x: Tensor,
        criterion: Criterion,
        threat: ThreatModel,
        generator: torch.Generator | None,
    ) -> Tensor:
        assert isinstance(threat, LpBall)
        source = model.model
        l1, l2, l3 = self.lambdas
        y0 = criterion.labels
        step = self.rel_stepsize * threat.eps
        x_adv = x.clone()
        best, best_score = x.clone(), torch.full((x.shape[0],), -math.inf, device=x.device)
        for _ in range(self.steps):
            var = x_adv.detach().requires_grad_(True)
            with torch.enable_grad():
                logits = source(var)
                p_m = logits.softmax(dim=1)
                t = logits.argmax(dim=1)
                s_bar = _mean_softmax(self.surrogates, var)
                r_max = torch.stack([m(var).softmax(dim=1) for m in self.references]).amax(dim=0)
                per_class = s_bar * (1 - r_max)  # the conferrability of every class (N, K)
                sigma = per_class.gather(1, t[:, None]).squeeze(1)
                # the loss's conferrability term takes the best class other than the seed's: at the start t is
                # still y0, and σ at y0 would pull the point back to its own class
                best_other = per_class.scatter(1, y0[:, None], 0.0).amax(dim=1)
                objective = (
                    l1 * best_other.clamp_min(1e-12).log()
                    + l2 * F.cross_entropy(logits, y0, reduction="none")
                    - l3 * -(p_m * s_bar.clamp_min(1e-12).log()).sum(dim=1)
                )
                (grad,) = torch.autograd.grad(objective.sum(), var)
            # the source's forward and gradient, counted as the base counts them (the ensembles are extra models)
            model.forwards += x.shape[0]
            model.gradients += x.shape[0]
            with torch.no_grad():
                score = torch.where(t != y0, sigma, torch.full_like(sigma, -math.inf))
                better = score > best_score
                best_score = torch.where(better, score, best_score)
                best[better] = var.detach()[better]
                x_adv = threat.project(threat.step(x_adv, grad, step), x)
        # the final iterate too
        with torch.no_grad():
            final = conferrability(x_adv, source, self.surrogates, self.references).to(x.device)
            t = source(x_adv).argmax(dim=1)
            model.forwards += x.shape[0]
            score = torch.where(t != y0, final, torch.full_like(final, -math.inf))
            better = score > best_score
            best[better] = x_adv[better]
        return best

    def __repr__(self) -> str:
        return f"ConferrableSearch(steps={self.steps!r}, rel_stepsize={self.rel_stepsize!r}, lambdas={self.lambdas!r})"


class Conferrable:
    """Conferrable adversarial examples (Lukas, Zhang & Kerschbaum, ICLR 2021) as a fingerprint.

    Args:
        n: fingerprint size: the ``n`` most conferrable successful examples are kept.
        candidates: seed inputs tried (default ``4 n``).
        eps: l∞ radius of the search around each seed (0.25 for the digits inputs in [0, 1]; the paper's CIFAR-10
            value is 0.025 on a much larger input).
        steps: PGD iterations (100).
        rel_stepsize: PGD step as a fraction of eps (0.05).
        lambdas: (λ1, λ2, λ3) of the loss (1, 1, 1).
        n_surrogates: surrogates to train when none are given (distilled from the source), 3.
        n_references: references to train when none are given (independent, ground truth labels), 3.
        epochs: training epochs of those ensembles.
        seed: seeds the seeds' choice and the ensembles' training.
    """

    method = "conferrable"

    def __init__(
        self, *, n: int = 100, candidates: int | None = None, eps: float = 0.25, steps: int = 100,
        rel_stepsize: float = 0.05, lambdas: Sequence[float] = (1.0, 1.0, 1.0), n_surrogates: int = 3,
        n_references: int = 3, epochs: int = 10, seed: int = 0,
    ) -> None:  # fmt: skip
        self.n = positive_int("n", n)
        self.candidates = 4 * self.n if candidates is None else positive_int("candidates", candidates)
        self.eps = positive_float("eps", eps)
        self.steps = positive_int("steps", steps)
        self.rel_stepsize = positive_float("rel_stepsize", rel_stepsize)
        lam = tuple(positive_float("lambda", v, allow_zero=True) for v in lambdas)
        if len(lam) != 3:
            raise InputError(f"lambdas must be three weights (λ1, λ2, λ3), got {lambdas!r}")
        self.lambdas: tuple[float, float, float] = (lam[0], lam[1], lam[2])
        self.n_surrogates = positive_int("n_surrogates", n_surrogates)
        self.n_references = positive_int("n_references", n_references)
        self.epochs = positive_int("epochs", epochs)
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise InputError(f"seed must be an int, got {seed!r}")
        self.seed = seed

    def options(self) -> dict[str, Any]:
        return {
            "n": self.n, "candidates": self.candidates, "eps": self.eps, "steps": self.steps,
            "rel_stepsize": self.rel_stepsize, "lambdas": list(self.lambdas), "n_surrogates": self.n_surrogates,
            "n_references": self.n_references, "epochs": self.epochs, "seed": self.seed,
        }  # fmt: skip

    def __repr__(self) -> str:
        return f"Conferrable({', '.join(f'{k}={v!r}' for k, v in self.options().items())})"

    def ensembles(self, model: nn.Module, train: Dataset) -> tuple[list[nn.Module], list[nn.Module]]:
        """Surrogates (distilled from ``model`` on ``train``'s inputs) and references (trained on its labels)."""
        arch, kwargs = _arch_of(model)
        surrogates = [_distilled(model, train, arch, kwargs, seed=self.seed + 100 + s, epochs=self.epochs)
                      for s in range(self.n_surrogates)]  # fmt: skip
        references = [_independent(train, arch, kwargs, seed=self.seed + 200 + r, epochs=self.epochs)
                      for r in range(self.n_references)]  # fmt: skip
        return surrogates, references

    def generate(
        self,
        model: nn.Module,
        data: Dataset,
        *,
        train: Dataset | None = None,
        surrogates: Sequence[nn.Module] | None = None,
        references: Sequence[nn.Module] | None = None,
    ) -> Fingerprint:
        """Fingerprint ``model`` from seeds of ``data``, with the given ensembles or ones trained on ``train``."""
        started = time.perf_counter()
        model = _check_model(model, "model")
        if not isinstance(data, Dataset):
            raise InputError(f"data must be a bastion Dataset of seed inputs, got {type(data).__name__}")
        if surrogates is None or references is None:
            if train is None:
                raise InputError("give surrogates= and references=, or train= to train them on")
            s_new, r_new = self.ensembles(model, train)
            surrogates = s_new if surrogates is None else surrogates
            references = r_new if references is None else references
        surrogates = [_check_model(m, "a surrogate") for m in surrogates]
        references = [_check_model(m, "a reference") for m in references]
        if not surrogates or not references:
            raise InputError("conferrable examples need at least one surrogate and one reference model")
        device = model_device(model)
        for m in [*surrogates, *references]:
            m.to(device).eval()
        gen = torch.Generator().manual_seed(self.seed)
        idx = _seed_indices(data, self.candidates, gen)
        x0 = data.x[idx]
        y0 = _predict(model, x0)
        search = _ConferrableSearch(steps=self.steps, rel_stepsize=self.rel_stepsize, lambdas=self.lambdas,
                                    surrogates=surrogates, references=references)  # fmt: skip
        res = search(model, x0.to(device), y0.to(device), threat=LpBall("linf", self.eps, domain=data.domain))
        ok = res.success.cpu()
        x = res.x_adv.detach().cpu()[ok]
        scores = conferrability(x, model, surrogates, references) if len(x) else torch.zeros(0)
        order = scores.argsort(descending=True)[: self.n]
        x, scores = x[order], scores[order]
        labels = _predict(model, x) if len(x) else torch.zeros(0, dtype=torch.long)
        return Fingerprint(x=x, labels=labels, method=self.method, seeds=idx[ok][order], scores=scores,
                           seconds=time.perf_counter() - started, options=self.options())  # fmt: skip


# ----------------------------------------------------------------------------------------------- verification
def match_rate(fingerprint: Fingerprint, suspect: nn.Module) -> float:
    """Fraction of the fingerprint's points that ``suspect`` labels as the source does (a BlackBox works too)."""
    if not isinstance(fingerprint, Fingerprint):
        raise InputError(f"fingerprint must be a Fingerprint, got {type(fingerprint).__name__}")
    if not isinstance(suspect, nn.Module):
        raise InputError(f"a suspect must be a torch.nn.Module or a BlackBox, got {type(suspect).__name__}")
    if len(fingerprint) == 0:
        raise InputError("the fingerprint is empty (every search failed): generate it with more seeds or steps")
    device = model_device(suspect)
    with torch.no_grad(), eval_mode(suspect):
        if isinstance(suspect, BlackBox):
            pred = suspect.labels(fingerprint.x.to(device)).cpu()
        else:
            out = suspect(fingerprint.x[:2].to(device))
            check_logits(out, min(2, len(fingerprint)))
            pred = _predict(suspect, fingerprint.x)
    return float((pred == fingerprint.labels).float().mean())


def roc_auc(positives: Sequence[float], negatives: Sequence[float]) -> float:
    """ROC AUC of the score separating positives from negatives (Mann-Whitney; ties count one half)."""
    if not positives or not negatives:
        raise InputError("the ROC AUC needs at least one positive and one negative suspect")
    wins = sum((p > q) + 0.5 * (p == q) for p in positives for q in negatives)
    return float(wins / (len(positives) * len(negatives)))


@dataclass
class SuspectReport:
    """One suspect's verdict: match rate, decision and (when known) its true role."""

    name: str
    match_rate: float
    copy: bool
    derived: bool | None = None


@dataclass
class VerificationResult:
    """Match rates of the suspects against one fingerprint, the threshold and the ROC AUC.

    Attributes:
        method: the fingerprint's generator.
        n_points: fingerprint size.
        threshold: a suspect with a match rate above it is declared a copy.
        threshold_from: how the threshold was set (``"given"``, ``"references"`` or ``"default"``).
        suspects: per-suspect reports.
        auc: ROC AUC over the suspects whose role is known (derived vs independent), or ``None``.
        reference_rates: match rates of the calibration references, when given.
        seconds: wall time (the fingerprint's generation included when :func:`verify` made it).
        run_id: the store's run id.
    """

    method: str
    n_points: int
    threshold: float
    threshold_from: str
    suspects: list[SuspectReport] = field(default_factory=list)
    auc: float | None = None
    reference_rates: list[float] = field(default_factory=list)
    seconds: float = 0.0
    run_id: int | None = None

    @property
    def rates(self) -> dict[str, float]:
        return {s.name: s.match_rate for s in self.suspects}

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def table(self) -> str:
        lines = [
            f"fingerprint ({self.method}, {self.n_points} points): threshold {self.threshold:.3f} "
            f"({self.threshold_from})" + ("" if self.auc is None else f", ROC AUC {self.auc:.3f}"),
            f"  {'suspect':<28} {'match rate':>10}  verdict      role",
        ]
        for s in self.suspects:
            role = "" if s.derived is None else ("derived" if s.derived else "independent")
            lines.append(f"  {s.name:<28} {100 * s.match_rate:9.1f} %  {'COPY' if s.copy else 'not a copy':<12} {role}")
        return "\n".join(lines)


def verify(
    fingerprint: Fingerprint,
    suspects: Mapping[str, nn.Module],
    *,
    roles: Mapping[str, bool] | None = None,
    references: Sequence[nn.Module] = (),
    threshold: float | None = None,
    store: Store | str | None = None,
    source: nn.Module | None = None,
    progress: bool = True,
    config: dict[str, Any] | None = None,
) -> VerificationResult:
    """Match rate of every suspect, the verdict under a threshold, and the ROC AUC where roles are known.

    The threshold is ``threshold`` if given; else the largest match rate among ``references`` (models known to be
    independent of the source, kept out of the suspects), so that no known-independent model would be flagged;
    else 0.5. A suspect is a copy when its match rate is strictly above the threshold.

    Args:
        fingerprint: the source's fingerprint.
        suspects: the models to verify, by name.
        roles: for evaluation, ``True`` for suspects derived from the source and ``False`` for independent ones;
            the ROC AUC is computed over these.
        references: independent models that calibrate the threshold.
        threshold: a fixed threshold in [0, 1].
        store: a result store (or path): one record per suspect (the match rate in ``extra``); a re-run skips the
            suspects already verified.
        source: the source model (its fingerprint identifies the run in the store; default: the fingerprint's
            points).
        progress: show a progress bar over the suspects.
        config: extra information stored with the run.
    """
    from tqdm.auto import tqdm

    started = time.perf_counter()
    if not isinstance(fingerprint, Fingerprint):
        raise InputError(f"fingerprint must be a Fingerprint, got {type(fingerprint).__name__}")
    if not isinstance(suspects, Mapping) or not suspects:
        raise InputError("suspects must be a non-empty mapping of name -> model")
    roles = dict(roles or {})
    unknown = sorted(set(roles) - set(suspects))
    if unknown:
        raise InputError(f"roles name suspects that were not given: {', '.join(unknown)}")
    if threshold is not None:
        t = positive_float("threshold", threshold, allow_zero=True)
        if t > 1:
            raise InputError(f"threshold must lie in [0, 1], got {threshold!r}")
    ref_rates = [match_rate(fingerprint, m) for m in references]
    if threshold is not None:
        thr, how = float(threshold), "given"
    elif ref_rates:
        thr, how = max(ref_rates), "references"
    else:
        thr, how = 0.5, "default"
    names = list(suspects)
    key = f"fingerprint:{fingerprint.method}"
    fp_bytes = Dataset(fingerprint.x, fingerprint.labels, num_classes=int(fingerprint.labels.max()) + 1,
                       name="fingerprint", domain=(float(fingerprint.x.min()), float(fingerprint.x.max()) + 1e-6)
                       ) if len(fingerprint) else None  # fmt: skip
    data_fp = fp_bytes.fingerprint() if fp_bytes is not None else "empty"
    payload = {"method": fingerprint.method, "options": fingerprint.options, "suspects": names}
    with resumable_run(
        store, kind="fingerprint", payload=payload,
        fingerprints=lambda: (model_fingerprint(source) if source is not None else data_fp, data_fp),
        n_samples=len(names), threats=[key], config=config,
    ) as run:  # fmt: skip
        todo = run.todo(len(names))
        for pos in tqdm(todo, desc="verify suspects", unit="suspect", disable=not progress, leave=False):
            t0 = time.perf_counter()
            rate = match_rate(fingerprint, suspects[names[pos]])
            derived = roles.get(names[pos])
            rec = SampleRecord(
                index=pos, threat=key, label=-1 if derived is None else int(derived), clean_pred=int(rate > thr),
                status="unknown", seconds=time.perf_counter() - t0, queries=len(fingerprint),
                extra={"suspect": names[pos], "match_rate": rate},
            )  # fmt: skip
            run.write([rec], seconds=rec.seconds)
        rates = {int(r.index): float(r.extra["match_rate"]) for r in run.records(key)}
        reports = [SuspectReport(name=n, match_rate=rates[i], copy=rates[i] > thr, derived=roles.get(n))
                   for i, n in enumerate(names)]  # fmt: skip
        pos_r = [r.match_rate for r in reports if r.derived is True]
        neg_r = [r.match_rate for r in reports if r.derived is False]
        auc = roc_auc(pos_r, neg_r) if pos_r and neg_r else None
        result = VerificationResult(
            method=fingerprint.method, n_points=len(fingerprint), threshold=thr, threshold_from=how,
            suspects=reports, auc=auc, reference_rates=ref_rates,
        )  # fmt: skip
        return run.finish(result, started=started)


# ----------------------------------------------------------------------------------------------- suspects
def _arch_of(model: nn.Module) -> tuple[str, dict[str, Any]]:
    spec = getattr(model, "bastion_spec", None)
    if not isinstance(spec, dict) or "arch" not in spec:
        raise InputError(
            "cannot tell the source model's architecture (a zoo model records it); give the surrogates and the "
            "references yourself"
        )
    cfg = {k: v for k, v in spec.get("config", {}).items() if k not in ("input_shape", "num_classes")}
    return str(spec["arch"]), cfg


def _build(arch: str, data: Dataset, kwargs: Mapping[str, Any], seed: int) -> nn.Module:
    from bastion.models import build_model

    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return build_model(arch, data.feature_shape, data.num_classes, **dict(kwargs))


def _independent(data: Dataset, arch: str, kwargs: Mapping[str, Any], *, seed: int, epochs: int) -> nn.Module:
    from bastion.defenses.training import train

    model = _build(arch, data, kwargs, seed)
    train(model, data, epochs=epochs, lr=3e-3, seed=seed, progress=False)
    return model


def _distilled(
    source: nn.Module, data: Dataset, arch: str, kwargs: Mapping[str, Any], *, seed: int, epochs: int
) -> nn.Module:
    """A fresh model trained on the source's labels of ``data``'s inputs (distillation on hard labels)."""
    from bastion.defenses.training import train

    labels = _predict(source, data.x)
    relabelled = Dataset(data.x, labels, num_classes=data.num_classes, name=f"{data.name} (source labels)",
                         domain=data.domain)  # fmt: skip
    model = _build(arch, data, kwargs, seed)
    train(model, relabelled, epochs=epochs, lr=3e-3, seed=seed, progress=False)
    return model


def _pruned(source: nn.Module, fraction: float) -> nn.Module:
    """A copy with the smallest ``fraction`` of the weights of every Linear and Conv layer set to zero."""
    model = copy.deepcopy(source)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.Linear, nn.Conv2d)):
                w = m.weight
                kth = int(fraction * w.numel())
                if kth >= 1:
                    cut = w.abs().flatten().kthvalue(kth).values
                    w[w.abs() <= cut] = 0.0
    return model.eval()


def suspect_models(
    source: nn.Module,
    train: Dataset,
    *,
    other_arch: str | None = "cnn",
    other_kwargs: Mapping[str, Any] | None = None,
    n_independent: int = 2,
    finetune_epochs: int = 3,
    prune_fraction: float = 0.5,
    epochs: int = 10,
    seed: int = 0,
) -> tuple[dict[str, nn.Module], dict[str, bool]]:
    """The usual suspects for evaluating a fingerprint of ``source`` (a zoo model trained on ``train``).

    Positives (derived from the source): ``copy`` (the same weights), ``fine-tuned`` (``finetune_epochs`` more
    epochs on ``train`` at a tenth of the learning rate), ``pruned`` (the smallest ``prune_fraction`` of every
    layer's weights zeroed) and ``distilled`` (a fresh model of the same architecture trained on the source's labels
    of ``train``). Negatives: models trained on ``train``'s labels from other seeds, ``independent-ARCH-s`` with the
    source's architecture and ``independent-other-OTHER-s`` with ``other_arch`` (and ``other_kwargs``).

    Returns:
        ``(suspects, roles)``: the models by name, and ``True`` for derived / ``False`` for independent.
    """
    from bastion.defenses.training import train as train_model

    source = _check_model(source, "source")
    if not isinstance(train, Dataset):
        raise InputError(f"train must be a bastion Dataset, got {type(train).__name__}")
    frac = positive_float("prune_fraction", prune_fraction, allow_zero=True)
    if frac >= 1:
        raise InputError(f"prune_fraction must lie in [0, 1), got {prune_fraction!r}")
    arch, kwargs = _arch_of(source)
    suspects: dict[str, nn.Module] = {"copy": copy.deepcopy(source).eval()}
    tuned = copy.deepcopy(source)
    train_model(tuned, train, epochs=positive_int("finetune_epochs", finetune_epochs), lr=3e-4, seed=seed + 1,
                progress=False)  # fmt: skip
    suspects["fine-tuned"] = tuned
    suspects["pruned"] = _pruned(source, frac)
    suspects["distilled"] = _distilled(source, train, arch, kwargs, seed=seed + 7, epochs=epochs)
    roles = dict.fromkeys(suspects, True)
    for s in range(positive_int("n_independent", n_independent)):
        name = f"independent-{arch}-{s}"
        suspects[name] = _independent(train, arch, kwargs, seed=seed + 11 + s, epochs=epochs)
        roles[name] = False
        if other_arch is not None:
            other = f"independent-other-{other_arch}-{s}"
            suspects[other] = _independent(train, other_arch, dict(other_kwargs or {}), seed=seed + 31 + s,
                                           epochs=epochs)  # fmt: skip
            roles[other] = False
    return suspects, roles
