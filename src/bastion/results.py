"""Per-sample results, attack results, success criteria and the attack losses.

The per-sample :class:`SampleRecord` is the spine of bastion: an attack fills the *upper* bound on the minimal
adversarial distance (``adv_distance``, the best adversarial example found), a verifier fills the *lower* bound
(``certified``, the certified radius). Status is ``falsified`` when an adversarial example (or a clean
misclassification) is known, ``robust`` when robustness is proved, and ``unknown`` otherwise (a sample that survived
every attack is ``unknown``: no attack can prove robustness).

The losses that attacks maximise (cross-entropy, DLR, C&W margin) and the targeted/untargeted sign are written here
once.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import torch
import torch.nn.functional as F

from bastion.errors import InputError

Status = Literal["robust", "falsified", "unknown"]
STATUSES: tuple[str, ...] = ("robust", "falsified", "unknown")
LossName = Literal["ce", "dlr", "cw"]
LOSSES: tuple[str, ...] = ("ce", "dlr", "cw")


def check_loss_name(loss: object) -> LossName:
    """``loss`` if it names one of the attack losses, else an InputError listing them."""
    if loss not in LOSSES:
        raise InputError(f"loss must be one of {', '.join(map(repr, LOSSES))}, got {loss!r}")
    return loss  # type: ignore[return-value]


@dataclass
class SampleRecord:
    """What the store keeps for one sample under one threat model.

    Attributes:
        index: position of the sample in the evaluated data set.
        threat: canonical key of the threat model (``ThreatModel.key``, e.g. ``"linf:0.1"``).
        label: true label.
        clean_pred: the model's prediction on the clean input.
        status: ``"falsified"``, ``"robust"`` or ``"unknown"``.
        adv_distance: distance of the best adversarial example found (0 for a clean misclassification), or ``None``.
        certified: certified lower bound on the minimal adversarial distance, or ``None`` until a verifier ran.
        attack: name of the attack (or method) that decided the status, or ``None``.
        seconds: wall time spent on this sample (its share of the batch time).
        queries: model calls (forward passes of one input) spent on this sample, where the method counts them.
        extra: method-specific per-sample values (JSON-able), e.g. a CLEVER score, a log-probability of
            violation, the bounds of a converging search; the store keeps them with the record.
    """

    index: int
    threat: str
    label: int
    clean_pred: int
    status: Status
    adv_distance: float | None = None
    certified: float | None = None
    attack: str | None = None
    seconds: float = 0.0
    queries: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.status not in STATUSES:
            raise InputError(f"status must be one of {STATUSES}, got {self.status!r}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class AttackResult:
    """The outcome of one attack on a batch.

    Attributes:
        x_adv: best input found for each sample, inside the threat set and the input domain (the clean input where
            the attack failed).
        success: ``True`` where ``x_adv`` meets the criterion, re-verified by a forward pass after projection.
        distance: distance of ``x_adv`` from ``x`` in the threat model's norm (``inf`` where ``success`` is ``False``).
        clean_pred: predictions on the clean inputs.
        adv_pred: predictions on ``x_adv``.
        model_calls: forward evaluations, counted in samples (one batch of 128 = 128 calls).
        grad_calls: gradient evaluations, counted in samples.
        queries: per-sample forward evaluations for query-counted (black-box) attacks, else ``None``.
        seconds: wall time of the attack.
        attack: repr of the attack that produced it.
        perturbation: for a parametrised threat model, the parameters behind ``x_adv`` (on a
            :class:`~bastion.threat.FlowThreat`: the projected flow fields (N, 2, H, W), zero where the attack did
            not run, with ``x_adv == threat.apply(x, perturbation)``); ``None`` for l_p balls.
    """

    x_adv: torch.Tensor
    success: torch.Tensor
    distance: torch.Tensor
    clean_pred: torch.Tensor
    adv_pred: torch.Tensor
    model_calls: int = 0
    grad_calls: int = 0
    queries: torch.Tensor | None = None
    seconds: float = 0.0
    attack: str = ""
    extra: dict[str, Any] = field(default_factory=dict)
    perturbation: torch.Tensor | None = None

    @property
    def success_rate(self) -> float:
        return float(self.success.float().mean()) if self.success.numel() else 0.0

    def robust_accuracy(self, labels: torch.Tensor) -> float:
        """Fraction of samples classified correctly and not broken by this attack (untargeted reading)."""
        ok = (self.clean_pred == labels.to(self.clean_pred.device)) & ~self.success
        return float(ok.float().mean()) if ok.numel() else 0.0


def _other_max(logits: torch.Tensor, cls: torch.Tensor) -> torch.Tensor:
    """Largest logit among the classes other than ``cls`` (per row)."""
    masked = logits.scatter(1, cls[:, None], -math.inf)
    return masked.amax(dim=1)


def ce_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-sample cross-entropy of ``logits`` against ``labels``."""
    return F.cross_entropy(logits, labels, reduction="none")


def cw_margin(logits: torch.Tensor, cls: torch.Tensor, kappa: float = math.inf) -> torch.Tensor:
    """Carlini & Wagner's margin ``min(max_{i != c} z_i - z_c, kappa)`` (positive once class ``c`` is beaten).

    Carlini & Wagner, "Towards Evaluating the Robustness of Neural Networks", IEEE S&P 2017, objective f_6.
    """
    margin = _other_max(logits, cls) - logits.gather(1, cls[:, None]).squeeze(1)
    return margin.clamp(max=kappa) if math.isfinite(kappa) else margin


def dlr_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Untargeted Difference of Logits Ratio, to maximise (Croce & Hein, ICML 2020, eq. 6).

    ``-(z_y - max_{i != y} z_i) / (z_pi1 - z_pi3)``, with ``pi`` the logits sorted in decreasing order. Invariant to
    shifts and positive rescaling of the logits. Needs at least three classes.
    """
    if logits.shape[1] < 3:
        raise InputError(f"the DLR loss needs at least 3 classes, the model has {logits.shape[1]}; use 'ce' or 'cw'")
    top = logits.topk(3, dim=1).values
    z_y = logits.gather(1, labels[:, None]).squeeze(1)
    return -(z_y - _other_max(logits, labels)) / (top[:, 0] - top[:, 2] + 1e-12)


def dlr_targeted_loss(logits: torch.Tensor, labels: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Targeted DLR, to maximise (Croce & Hein, ICML 2020, eq. 7): ``-(z_y - z_t) / (z_pi1 - (z_pi3 + z_pi4) / 2)``."""
    if logits.shape[1] < 4:
        raise InputError(f"the targeted DLR loss needs at least 4 classes, the model has {logits.shape[1]}")
    top = logits.topk(4, dim=1).values
    z_y = logits.gather(1, labels[:, None]).squeeze(1)
    z_t = logits.gather(1, targets[:, None]).squeeze(1)
    return -(z_y - z_t) / (top[:, 0] - 0.5 * (top[:, 2] + top[:, 3]) + 1e-12)


class Criterion:
    """What counts as adversarial, and the sign of every loss.

    Untargeted (``targets is None``): adversarial when the predicted class differs from ``labels``.
    Targeted: adversarial when the predicted class equals ``targets``. The losses returned by :meth:`loss` are always
    to be *maximised* by an attack.

    Args:
        labels: true labels, int64 of shape (N,).
        targets: target classes, int64 of shape (N,), or ``None`` for an untargeted attack.
    """

    def __init__(self, labels: torch.Tensor, targets: torch.Tensor | None = None) -> None:
        self.labels = labels
        self.targets = targets
        if targets is not None and targets.shape != labels.shape:
            raise InputError(
                f"targets must have the shape of the labels {tuple(labels.shape)}, got {tuple(targets.shape)}"
            )

    @property
    def targeted(self) -> bool:
        return self.targets is not None

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def subset(self, idx: torch.Tensor) -> Criterion:
        """The criterion restricted to the samples selected by ``idx`` (an index or boolean mask)."""
        return Criterion(self.labels[idx], None if self.targets is None else self.targets[idx])

    def is_adversarial(self, logits: torch.Tensor) -> torch.Tensor:
        pred = logits.argmax(dim=1)
        return pred == self.targets if self.targets is not None else pred != self.labels

    def loss(self, logits: torch.Tensor, kind: LossName = "ce", *, kappa: float = math.inf) -> torch.Tensor:
        """Per-sample loss to maximise: ``"ce"`` (cross-entropy), ``"dlr"`` or ``"cw"`` (C&W margin capped at kappa)."""
        if kind == "ce":
            return ce_loss(logits, self.labels) if self.targets is None else -ce_loss(logits, self.targets)
        if kind == "cw":
            margin = cw_margin(logits, self.labels) if self.targets is None else -cw_margin(logits, self.targets)
            return margin.clamp(max=kappa) if math.isfinite(kappa) else margin
        if kind == "dlr":
            if self.targets is None:
                return dlr_loss(logits, self.labels)
            return dlr_targeted_loss(logits, self.labels, self.targets)
        raise InputError(f"loss must be one of {', '.join(map(repr, LOSSES))}, got {kind!r}")
