"""Waveform attacks under a decibel budget: PGD and Carlini & Wagner's audio attack.

Both subclass bastion's :class:`~bastion.attacks.base.Attack`, so their results are projected onto the
:class:`~bastion.audio.threat.DecibelBall` and re-verified by a forward pass.

* :class:`WaveformPGD` — projected gradient descent (Madry et al., ICLR 2018) in the l∞ ball whose radius scales
  with each clip's peak: signed-gradient steps of ``rel_stepsize`` times the clip's own radius, projection after
  each step, a uniformly random start, restarts on the samples still unbroken.
* :class:`AudioCW` — Carlini & Wagner, "Audio Adversarial Examples: Targeted Attacks on Speech-to-Text", IEEE S&P
  Workshops 2018, Sec. IV: minimise ``||δ||²₂ + c · f(x + δ)`` subject to ``dB_x(δ) <= τ`` with Adam, ``δ`` clipped
  to ``[-τ', τ']`` after every step; each time the current ``δ`` succeeds, the bound is tightened to
  ``τ' = 0.8 · max|δ|`` (their schedule), so the attack searches for the quietest successful perturbation inside the
  threat's budget. The paper's loss is the CTC loss of a target transcription; for a classifier it is
  Carlini & Wagner's margin ``f = max(Z_y - max_{i != y} Z_i, -κ)`` (S&P 2017), targeted or not. The paper's Adam
  learning rate of 10 on 16-bit samples is ``10 / 32768 ≈ 3e-4`` on the [-1, 1] scale used here.

A psychoacoustic (frequency-masking) variant (Qin, Carlini, Cottrell, Goodfellow & Raffel, ICML 2019) is not
implemented.

Like the point-cloud attacks, these are not entered in the image-attack registry (``bastion.attacks.ATTACKS``); build
them from their classes or run ``bastion audio attack``; results name them ``waveformpgd`` and ``audiocw``.
"""

from __future__ import annotations

import functools
import math

import torch

from bastion.attacks.base import Attack, CountingModel, positive_float, positive_int
from bastion.audio.threat import DecibelBall, check_waveforms
from bastion.errors import InputError
from bastion.results import Criterion, LossName, check_loss_name
from bastion.threat import ThreatModel

__all__ = ["AudioCW", "WaveformPGD"]


def _loss(criterion: Criterion, kind: LossName, logits: torch.Tensor) -> torch.Tensor:
    return criterion.loss(logits, kind)


class _AudioAttack(Attack):
    norms = ()

    def check_inputs(self, x: torch.Tensor) -> None:
        check_waveforms(x)

    def _check_threat(self, threat: ThreatModel) -> None:
        if not isinstance(threat, DecibelBall):
            raise InputError(f"{type(self).__name__} needs a DecibelBall threat model, got {threat!r}")
        if math.isinf(threat.db):
            raise InputError(f"{type(self).__name__} needs a finite decibel budget, got {threat!r}")


class WaveformPGD(_AudioAttack):
    """PGD on waveforms in the decibel l∞ ball (Madry et al., ICLR 2018).

    Args:
        steps: iterations per restart.
        rel_stepsize: step as a fraction of each clip's radius; ``None`` for bastion's rule ``2.5 / steps``.
        restarts: runs; each later one attacks only the clips still unbroken.
        random_start: start from a uniformly random point of the ball.
        loss: ``"ce"``, ``"dlr"`` or ``"cw"``.
    """

    name = ""  # not in the image-attack registry (see the module docstring)
    paper = "Madry et al., Towards Deep Learning Models Resistant to Adversarial Attacks, ICLR 2018"

    def __init__(
        self,
        *,
        steps: int = 100,
        rel_stepsize: float | None = None,
        restarts: int = 1,
        random_start: bool = True,
        loss: LossName = "ce",
    ) -> None:
        self.steps = positive_int("steps", steps)
        self.rel_stepsize = None if rel_stepsize is None else positive_float("rel_stepsize", rel_stepsize)
        self.restarts = positive_int("restarts", restarts)
        self.random_start = bool(random_start)
        self.loss: LossName = check_loss_name(loss)

    def run(
        self,
        model: CountingModel,
        x: torch.Tensor,
        criterion: Criterion,
        threat: ThreatModel,
        generator: torch.Generator | None,
    ) -> torch.Tensor:
        assert isinstance(threat, DecibelBall)
        rel = 2.5 / self.steps if self.rel_stepsize is None else self.rel_stepsize
        best = x.clone()
        found = torch.zeros(x.shape[0], dtype=torch.bool, device=x.device)
        for _ in range(self.restarts):
            idx = (~found).nonzero().squeeze(1)
            if idx.numel() == 0:
                break
            x0, crit = x[idx], criterion.subset(idx)
            alpha = rel * threat.radius(x0)
            x_adv = threat.random_start(x0, generator) if self.random_start else x0.clone()
            for _step in range(self.steps):
                logits, _, grad = model.logits_and_grad(x_adv, functools.partial(_loss, crit, self.loss))
                hit = crit.is_adversarial(logits)
                if bool(hit.any()):
                    best[idx[hit]] = x_adv[hit]
                    found[idx[hit]] = True
                    keep = ~hit
                    idx, x_adv, x0, grad, alpha = idx[keep], x_adv[keep], x0[keep], grad[keep], alpha[keep]
                    crit = crit.subset(keep)
                    if idx.numel() == 0:
                        break
                x_adv = threat.project(threat.step(x_adv, grad, alpha), x0)
            if idx.numel():
                hit = crit.is_adversarial(model(x_adv))
                best[idx] = x_adv  # the last iterate of an unbroken clip (the base re-verifies it)
                found[idx[hit]] = True
        return best


class AudioCW(_AudioAttack):
    """Carlini & Wagner's audio attack (IEEE S&P Workshops 2018) with a classifier's margin loss.

    Args:
        steps: Adam iterations.
        lr: Adam learning rate on the [-1, 1] sample scale (the paper's 10 on 16-bit samples).
        const: the weight ``c`` of the loss term against ``||δ||²₂``.
        kappa: confidence margin of the loss.
        tau_decay: factor applied to ``max|δ|`` to tighten the bound after each success (0.8 in the paper).
    """

    name = ""  # not in the image-attack registry (see the module docstring)
    paper = "Carlini & Wagner, Audio Adversarial Examples: Targeted Attacks on Speech-to-Text, IEEE S&P Workshops 2018"

    def __init__(
        self,
        *,
        steps: int = 1000,
        lr: float = 10 / 32768,
        const: float = 1.0,
        kappa: float = 0.0,
        tau_decay: float = 0.8,
    ) -> None:
        self.steps = positive_int("steps", steps)
        self.lr = positive_float("lr", lr)
        self.const = positive_float("const", const)
        self.kappa = positive_float("kappa", kappa, allow_zero=True)
        self.tau_decay = positive_float("tau_decay", tau_decay)
        if self.tau_decay >= 1:
            raise InputError(f"tau_decay must be in (0, 1), got {tau_decay!r}")

    def run(
        self,
        model: CountingModel,
        x: torch.Tensor,
        criterion: Criterion,
        threat: ThreatModel,
        generator: torch.Generator | None,
    ) -> torch.Tensor:
        assert isinstance(threat, DecibelBall)
        n = x.shape[0]
        shape = (-1,) + (1,) * (x.dim() - 1)
        tau = threat.radius(x)  # the bound starts at the threat's budget and only shrinks
        delta = torch.zeros_like(x, requires_grad=True)
        opt = torch.optim.Adam([delta], lr=self.lr)
        best = x.clone()
        best_size = torch.full((n,), math.inf, device=x.device, dtype=x.dtype)
        lo, hi = threat.domain
        for step in range(self.steps + 1):
            with torch.enable_grad():
                x_adv = (x + delta).clamp(lo, hi)
                logits = model.model(x_adv)
                model.forwards += n
                with torch.no_grad():
                    hit = criterion.is_adversarial(logits)
                    size = (x_adv - x).abs().flatten(1).amax(dim=1)
                    better = hit & (size < best_size)
                    best[better] = x_adv[better]
                    best_size[better] = size[better]
                    tau = torch.where(hit, torch.minimum(tau, self.tau_decay * size), tau)
                if step == self.steps:
                    break
                margin = criterion.loss(logits, "cw")
                loss = delta.square().flatten(1).sum(dim=1) + self.const * (-margin).clamp_min(-self.kappa)
                opt.zero_grad(set_to_none=True)
                loss.sum().backward()
            model.gradients += n
            opt.step()
            with torch.no_grad():
                t = tau.reshape(shape)
                delta.copy_(torch.maximum(torch.minimum(delta, t), -t))
        unbroken = torch.isinf(best_size)
        if bool(unbroken.any()):
            best[unbroken] = (x + delta.detach()).clamp(lo, hi)[unbroken]
        return best
