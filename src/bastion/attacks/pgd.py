"""Iterative gradient attacks: projected gradient descent (PGD) and the basic iterative method (BIM).

* PGD: Madry, Makelov, Schmidt, Tsipras & Vladu, "Towards Deep Learning Models Resistant to Adversarial Attacks",
  ICLR 2018. Maximise a loss over the threat set by normalised steepest-ascent steps, each followed by a Euclidean
  projection onto the ball ∩ input domain, from a uniformly random start; several random restarts.
* BIM: Kurakin, Goodfellow & Bengio, "Adversarial examples in the physical world", ICLR 2017 (workshop). The same
  iteration from the clean input, with step 1/255 and ``min(255·eps + 4, 1.25·255·eps)`` steps.

The norm-specific parts (step direction, projection, random start) are the threat model's (``bastion.threat``).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from bastion.attacks.base import Attack, CountingModel, positive_int
from bastion.errors import InputError
from bastion.results import Criterion, LossName, check_loss_name
from bastion.threat import LpBall, ThreatModel, pgd_step_size

#: Step-size schedules: multiplier of the base step at progress ``t = i / steps`` in [0, 1).
SCHEDULES: dict[str, Callable[[float], float]] = {
    "constant": lambda t: 1.0,
    "linear": lambda t: 1.0 - t,
    "cosine": lambda t: 0.5 * (1.0 + math.cos(math.pi * t)),
}


class PGD(Attack):
    """Projected gradient descent (Madry et al., ICLR 2018), for the l∞, l2 and l1 balls.

    Each iteration takes the normalised steepest-ascent step of the threat's norm (sign of the gradient for l∞,
    unit-l2 gradient for l2, SLIDE's sparse step for l1) on the chosen loss and projects back onto the ball ∩
    domain. Samples that become adversarial are kept as found and, with ``early_stop``, leave the batch, so a
    success is never lost and no work is spent on it. Restarts run only on samples not yet broken, so more restarts
    can never make the attack weaker.

    The default step is the library's one PGD rule, :func:`bastion.threat.pgd_step_size`: ``2.5·eps / steps``, so
    that the steps together travel 2.5 radii whatever their number (40 steps of 0.01875 at eps = 0.3). Madry et
    al.'s own MNIST setting, 40 steps of 0.01, is ``rel_stepsize=0.01 / 0.3``; their CIFAR-10 training setting, 7
    steps of 2/255 at eps = 8/255, is ``steps=7, rel_stepsize=0.25``. (Until version 0.1 the default was a fixed
    ``rel_stepsize`` of 1/30, which let a run of fewer than 30 steps travel less than one radius.)

    Args:
        steps: iterations per restart.
        rel_stepsize: step length as a fraction of eps; ``None`` for ``2.5 / steps`` (ignored when
            ``abs_stepsize`` is given).
        abs_stepsize: step length in the threat's norm.
        random_start: start each restart from a uniformly random point of the ball instead of the clean input.
        restarts: number of runs; each later one attacks only the samples still unbroken.
        loss: ``"ce"`` (cross-entropy), ``"dlr"`` (Croce & Hein 2020) or ``"cw"`` (Carlini & Wagner margin).
        schedule: step-size schedule over the iterations: ``"constant"``, ``"linear"`` or ``"cosine"``.
        early_stop: drop samples from the batch as soon as they are adversarial.
    """

    name = "pgd"
    paper = "Madry et al., Towards Deep Learning Models Resistant to Adversarial Attacks, ICLR 2018"

    def __init__(
        self,
        *,
        steps: int = 40,
        rel_stepsize: float | None = None,
        abs_stepsize: float | None = None,
        random_start: bool = True,
        restarts: int = 1,
        loss: LossName = "ce",
        schedule: str = "constant",
        early_stop: bool = True,
    ) -> None:
        if rel_stepsize is not None and not rel_stepsize > 0:
            raise InputError(f"rel_stepsize must be > 0 (or None for 2.5 / steps), got {rel_stepsize!r}")
        if abs_stepsize is not None and not abs_stepsize > 0:
            raise InputError(f"abs_stepsize must be > 0, got {abs_stepsize!r}")
        if schedule not in SCHEDULES:
            raise InputError(f"schedule must be one of {', '.join(SCHEDULES)}, got {schedule!r}")
        self.steps = positive_int("steps", steps)
        self.rel_stepsize = None if rel_stepsize is None else float(rel_stepsize)
        self.abs_stepsize = None if abs_stepsize is None else float(abs_stepsize)
        self.random_start = bool(random_start)
        self.restarts = positive_int("restarts", restarts)
        self.loss: LossName = check_loss_name(loss)
        self.schedule = schedule
        self.early_stop = bool(early_stop)

    def options(self) -> dict[str, object]:
        opts = super().options()
        if self.abs_stepsize is not None:
            del opts["rel_stepsize"]  # unused when an absolute step is given
        return opts

    def iterations(self, threat: LpBall) -> tuple[int, float]:
        """Number of iterations and base step length for this threat model."""
        if math.isinf(threat.eps) and self.abs_stepsize is None:
            raise InputError(f"eps is infinite: give {type(self).__name__} an abs_stepsize")
        if self.abs_stepsize is not None:
            return self.steps, self.abs_stepsize
        if self.rel_stepsize is not None:
            return self.steps, self.rel_stepsize * threat.eps
        return self.steps, pgd_step_size(threat.eps, self.steps)

    def run(
        self,
        model: CountingModel,
        x: torch.Tensor,
        criterion: Criterion,
        threat: ThreatModel,
        generator: torch.Generator | None,
    ) -> torch.Tensor:
        if not isinstance(threat, LpBall):
            raise InputError(f"{type(self).__name__} needs an LpBall threat model, got {threat!r}")
        steps, alpha = self.iterations(threat)
        multipliers = [SCHEDULES[self.schedule](i / steps) for i in range(steps)]
        best = x.clone()
        best_loss = torch.full((x.shape[0],), -math.inf, device=x.device, dtype=x.dtype)
        found = torch.zeros(x.shape[0], dtype=torch.bool, device=x.device)
        for _ in range(self.restarts):
            idx = (~found).nonzero().squeeze(1)
            if idx.numel() == 0:
                break
            self._one_run(model, x, criterion, threat, generator, idx, alpha, multipliers, best, best_loss, found)
        return best

    def _one_run(
        self,
        model: CountingModel,
        x: torch.Tensor,
        criterion: Criterion,
        threat: LpBall,
        generator: torch.Generator | None,
        idx: torch.Tensor,
        alpha: float,
        multipliers: list[float],
        best: torch.Tensor,
        best_loss: torch.Tensor,
        found: torch.Tensor,
    ) -> None:
        """One restart on the samples ``idx``; updates ``best``, ``best_loss`` and ``found`` in place."""
        x0 = x[idx]
        crit = criterion.subset(idx)
        x_adv = threat.random_start(x0, generator) if self.random_start else x0.clone()
        # first adversarial iterate of each sample (only needed when samples stay in the batch after success)
        first_hit = None if self.early_stop else torch.zeros(idx.shape[0], dtype=torch.bool, device=x.device)
        kept = x0.clone() if first_hit is not None else None

        def loss_fn(logits: torch.Tensor) -> torch.Tensor:
            return crit.loss(logits, self.loss)

        for m in multipliers:
            logits, _, grad = model.logits_and_grad(x_adv, loss_fn)
            hit = crit.is_adversarial(logits)
            if first_hit is None:
                if bool(hit.any()):
                    best[idx[hit]] = x_adv[hit]
                    found[idx[hit]] = True
                    keep = ~hit
                    idx, x_adv, x0, grad = idx[keep], x_adv[keep], x0[keep], grad[keep]
                    crit = crit.subset(keep)
                    if idx.numel() == 0:
                        return
            else:
                assert kept is not None
                new = hit & ~first_hit
                kept = torch.where(new.view((-1,) + (1,) * (x0.dim() - 1)), x_adv, kept)
                first_hit = first_hit | hit
            x_adv = threat.project(threat.step(x_adv, grad, alpha * m), x0)

        if self.restarts == 1 and first_hit is None:
            # nothing left to compare with: the base class re-verifies the last iterate (saves a forward pass)
            best[idx] = x_adv
            return
        logits = model(x_adv)
        hit = crit.is_adversarial(logits)
        if first_hit is not None and kept is not None:
            # a sample that was adversarial at some iterate keeps that iterate, even if later steps left the region
            x_adv = torch.where((first_hit & ~hit).view((-1,) + (1,) * (x0.dim() - 1)), kept, x_adv)
            hit = hit | first_hit
        loss = crit.loss(logits, self.loss)
        better = hit | (loss > best_loss[idx])
        best[idx[better]] = x_adv[better]
        best_loss[idx[better]] = loss[better]
        found[idx[hit]] = True


class BIM(PGD):
    """Basic iterative method (Kurakin, Goodfellow & Bengio, ICLR 2017 workshop).

    PGD from the clean input (no random start). For l∞ the paper's defaults apply: step 1/255 of the domain's width
    and ``min(255·eps + 4, 1.25·255·eps)`` iterations (eps measured on the [0, 1] scale), enough to reach the
    boundary of the ball. For l2 and l1, for which the paper gives no rule, 10 steps of 1.25·eps/10.

    Args:
        steps: iterations; ``None`` for the paper's rule.
        abs_stepsize: step length in the threat's norm; ``None`` for the paper's rule.
        loss: ``"ce"`` (the paper's), ``"dlr"`` or ``"cw"``.
        early_stop: drop samples from the batch as soon as they are adversarial.
    """

    name = "bim"
    paper = "Kurakin, Goodfellow & Bengio, Adversarial examples in the physical world, ICLR 2017 workshop"

    def __init__(
        self,
        *,
        steps: int | None = None,
        abs_stepsize: float | None = None,
        loss: LossName = "ce",
        early_stop: bool = True,
    ) -> None:
        super().__init__(
            steps=1 if steps is None else steps,
            abs_stepsize=abs_stepsize,
            random_start=False,
            loss=loss,
            early_stop=early_stop,
        )
        self.steps_given = steps
        self.abs_given = abs_stepsize

    def iterations(self, threat: LpBall) -> tuple[int, float]:
        if math.isinf(threat.eps) and self.abs_given is None:
            raise InputError("eps is infinite: give BIM steps and an abs_stepsize")
        width = threat.domain[1] - threat.domain[0]
        if threat.norm == "linf":
            e255 = threat.eps / width * 255.0
            steps = self.steps_given or max(1, math.ceil(min(e255 + 4.0, 1.25 * e255)))
            return steps, self.abs_given or width / 255.0
        steps = self.steps_given or 10
        return steps, self.abs_given or 1.25 * threat.eps / steps

    def options(self) -> dict[str, object]:
        return {
            "steps": self.steps_given,
            "abs_stepsize": self.abs_given,
            "loss": self.loss,
            "early_stop": self.early_stop,
        }
