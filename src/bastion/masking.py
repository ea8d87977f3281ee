"""Checks for gradient masking: signs that an evaluation over-estimates robustness.

Gradient-based attacks only measure robustness when the model's gradients are informative. Athalye, Carlini & Wagner
(ICML 2018) and Croce & Hein (ICML 2020, the checks of AutoAttack's ``check_randomized``, ``check_dynamic``,
``check_zero_gradients`` and ``check_square_sr``) list the symptoms of the opposite. bastion runs these checks
before and after an evaluation; each failed check is a :class:`MaskingWarning` with a stable ``code``, stored with
the run and explained in ``docs/gradient-masking.md``:

``random-outputs``
    Two forward passes on the same inputs differ: the model is randomised, so a single gradient is a noisy sample.
    Attack through :class:`bastion.attacks.EOT`. A model that is already wrapped in ``EOT`` is expected to differ
    between passes (its average is over fresh draws); for it the check fails only when the averaged *decisions*
    still change between two passes, which means the average is over too few draws: raise ``samples``.
``softmax-outputs``
    The outputs are probabilities, not logits: saturated softmax outputs have vanishing gradients.
``zero-gradients`` / ``nonfinite-gradients``
    For some correctly classified inputs the loss gradient is exactly zero or not finite: the model shatters or
    masks gradients (non-differentiable preprocessing, quantisation, ...). Attack through
    :class:`bastion.attacks.BPDA`, or use black-box attacks.
``flat-in-eps``
    Robust accuracy does not decrease from the smallest to the largest radius although it is above zero.
``black-box-beats-white-box``
    A score- or label-based attack broke points on which every earlier white-box attack of the cascade failed.
``unbounded-not-zero``
    With an unbounded radius (any input of the domain allowed) an attack still leaves points unbroken, which can
    only happen when the attack, not the model, is failing. An unbounded ball of any norm (l0, l1, l2 or l∞) is
    the whole input domain, the same set for every norm, so the check runs once per domain, as PGD in the domain
    box (the l∞ geometry of that set).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from bastion.errors import BastionWarning
from bastion.models.checks import eval_mode, looks_like_probabilities

if TYPE_CHECKING:
    from bastion.attacks.base import Attack
    from bastion.evaluate import EvaluationResult
    from bastion.threat import ThreatModel


class MaskingWarning(BastionWarning):
    """A sign of gradient masking; ``code`` names the check (see the module docstring)."""


@dataclass(frozen=True)
class Finding:
    """One failed check: a stable code and an explanation with what to do."""

    code: str
    message: str

    def warn(self) -> None:
        warnings.warn(f"[{self.code}] {self.message}", MaskingWarning, stacklevel=3)


def _randomness_finding(model: nn.Module, x: torch.Tensor) -> Finding | None:
    """The ``random-outputs`` check: two passes on the same inputs, judged by whether the model averages (EOT)."""
    from bastion.attacks.wrappers import EOT

    with torch.no_grad():
        a, b = model(x), model(x)
    if torch.allclose(a, b, rtol=1e-4, atol=1e-5):
        return None
    eot = [m for m in model.modules() if isinstance(m, EOT)]
    if not eot:
        return Finding(
            "random-outputs",
            "two forward passes on the same inputs give different outputs: the model is randomised, so "
            "gradients are noisy samples and single-draw attacks over-estimate robustness; attack "
            "EOT(model, samples=...) from bastion.attacks",
        )
    flipped = int((a.argmax(dim=1) != b.argmax(dim=1)).sum())
    if flipped == 0:
        return None  # an EOT average varies from call to call, but its decisions are stable
    samples = ", ".join(str(m.samples) for m in eot)
    return Finding(
        "random-outputs",
        f"the model is wrapped in EOT (samples={samples}), yet its averaged prediction changes between two passes "
        f"for {flipped} of {x.shape[0]} inputs: the average is over too few draws, so its gradients are still "
        "noisy; raise EOT's samples",
    )


def preflight(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> list[Finding]:
    """Checks run before attacking, on a small batch: randomness, softmax outputs, zero or non-finite gradients.

    Args:
        model: the classifier (checked in eval mode, restored afterwards).
        x: a batch of inputs (a few dozen suffice), on the model's device.
        y: their labels.

    Returns:
        The failed checks (empty when nothing looks wrong).
    """
    found: list[Finding] = []
    with eval_mode(model):
        randomness = _randomness_finding(model, x)
        if randomness is not None:
            found.append(randomness)
        with torch.no_grad():
            logits = model(x)
        if looks_like_probabilities(logits):
            found.append(
                Finding(
                    "softmax-outputs",
                    "the model returns probabilities: saturated softmax outputs give vanishing gradients; remove "
                    "the final softmax so that the model returns logits",
                )
            )
        correct = logits.argmax(1) == y
        if bool(correct.any()):
            xc = x[correct].detach().requires_grad_(True)
            with torch.enable_grad():
                loss = F.cross_entropy(model(xc), y[correct], reduction="sum")
                (grad,) = torch.autograd.grad(loss, xc)
            flat = grad.flatten(1)
            nonfinite = ~torch.isfinite(flat).all(dim=1)
            zero = (flat == 0).all(dim=1) & ~nonfinite
            n = int(correct.sum())
            if bool(nonfinite.any()):
                found.append(
                    Finding(
                        "nonfinite-gradients",
                        f"the loss gradient is NaN or infinite for {int(nonfinite.sum())} of {n} correctly "
                        "classified inputs: gradient attacks cannot work there; check the model for "
                        "non-differentiable or unstable operations, or use BPDA / black-box attacks",
                    )
                )
            if bool(zero.any()):
                found.append(
                    Finding(
                        "zero-gradients",
                        f"the loss gradient is exactly zero for {int(zero.sum())} of {n} correctly classified "
                        "inputs: the model masks or shatters gradients (quantisation, non-differentiable "
                        "preprocessing, saturated outputs); attack through BPDA or with black-box attacks",
                    )
                )
    return found


def posthoc(result: EvaluationResult, attacks: Sequence[Attack], threats: Sequence[ThreatModel]) -> list[Finding]:
    """Checks on a finished evaluation: flat robust accuracy in eps, black-box attacks beating white-box ones.

    Args:
        result: the evaluation's summary.
        attacks: the cascade, in order (to know each attack's access level).
        threats: the threat models evaluated.
    """
    from bastion.threat import LpBall

    found: list[Finding] = []
    families: dict[tuple[str, tuple[float, float]], list[LpBall]] = {}
    for t in threats:
        if isinstance(t, LpBall):
            families.setdefault((t.norm, t.domain), []).append(t)
    for (norm, _), fam in families.items():
        if len(fam) < 2:
            continue
        fam = sorted(fam, key=lambda t: t.eps)
        small, large = result.worst_case[fam[0].key], result.worst_case[fam[-1].key]
        if large > 0 and large >= small:
            found.append(
                Finding(
                    "flat-in-eps",
                    f"{norm} robust accuracy does not decrease from eps = {fam[0].eps:g} ({100 * small:.1f} %) to "
                    f"eps = {fam[-1].eps:g} ({100 * large:.1f} %): larger perturbation sets should break more "
                    "points unless the attacks are failing",
                )
            )
    names = result.attacks
    for i, attack in enumerate(attacks):
        # transfer attacks read gradients (of the model they run on): they are white-box here
        if attack.access not in ("score", "label") or not any(
            a.access in ("white-box", "transfer") for a in attacks[:i]
        ):
            continue
        for key in result.threats:
            before = result.robust_accuracy[key][names[i - 1]]
            after = result.robust_accuracy[key][names[i]]
            if after < before:
                found.append(
                    Finding(
                        "black-box-beats-white-box",
                        f"at {key} the {attack.access}-based attack {names[i]} broke {100 * (before - after):.1f} % "
                        "of the points on which every earlier white-box attack failed: the gradients are "
                        "misleading the white-box attacks",
                    )
                )
    return found


def unbounded_check(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, threat: ThreatModel, *, steps: int = 100
) -> list[Finding]:
    """With an unbounded radius every point can be moved anywhere in the domain: an attack must reach 0 %.

    An Lp ball of infinite radius is the input domain itself whatever ``p`` (for l0: every feature may change),
    so only ``threat``'s domain matters: PGD runs in the domain box, from the clean input, with sign steps of a
    tenth of the domain's width. Threat models other than Lp balls (flows, patches) have no unbounded version
    that reaches the whole domain and are not checked.
    """
    from bastion.attacks.pgd import PGD
    from bastion.threat import LpBall

    if not isinstance(threat, LpBall):
        return []
    lo, hi = threat.domain
    whole = LpBall("linf", math.inf, domain=threat.domain)
    res = PGD(steps=steps, abs_stepsize=(hi - lo) / 10, random_start=False)(model, x, y, threat=whole)
    left = int(((res.clean_pred == y) & ~res.success).sum())
    if left == 0:
        return []
    return [
        Finding(
            "unbounded-not-zero",
            f"with an unbounded radius (any input of the domain [{lo:g}, {hi:g}]) PGD still leaves {left} of "
            f"{x.shape[0]} points unbroken: the attack is failing (masked or uninformative gradients), so "
            "bounded-radius results over-estimate robustness",
        )
    ]
