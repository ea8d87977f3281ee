"""The inner maximisation of adversarial training: projected gradient ascent on a per-sample loss.

Every PGD-based training objective (PGD-AT, TRADES, MART, and the objectives built on them) solves
``max_{x' in S(x)} loss(f(x'))`` approximately with :func:`pgd_perturb`. The geometry (random start, normalised
steepest-ascent step, projection onto ball ∩ domain) is the threat model's (:mod:`bastion.threat`); this module only
runs the loop.

Madry, Makelov, Schmidt, Tsipras & Vladu, "Towards Deep Learning Models Resistant to Adversarial Attacks",
ICLR 2018, section 2 (the saddle-point problem) and section 4 (PGD as the inner maximiser).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bastion.errors import InputError
from bastion.models.checks import eval_mode
from bastion.threat import PGD_TRAVEL, LpBall, ThreatModel, pgd_step_size

__all__ = ["check_batch", "check_objective_threat", "default_step_size", "kl_div_logits", "pgd_perturb", "unwrap"]


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside a ``DistributedDataParallel`` (or ``DataParallel``) wrapper; other models unchanged.

    Forward passes whose parameter gradients are never needed (attack iterations, metrics) should run on the
    unwrapped module: through the wrapper every call would broadcast buffers and prepare a gradient all-reduce.
    """
    inner = getattr(model, "module", None)
    if isinstance(inner, nn.Module) and isinstance(
        model, (nn.parallel.DistributedDataParallel, nn.parallel.DataParallel)
    ):
        return inner
    return model


def check_batch(x: object, y: object) -> tuple[Tensor, Tensor]:
    """Validate a training batch: ``x`` a floating tensor (N, ...), ``y`` int64 labels (N,); InputError otherwise."""
    if not isinstance(x, Tensor) or not x.dtype.is_floating_point or x.dim() < 2:
        raise InputError(
            f"x must be a floating-point tensor of shape (N, ...), got "
            f"{type(x).__name__ if not isinstance(x, Tensor) else f'{x.dtype} of shape {tuple(x.shape)}'}"
        )
    if not isinstance(y, Tensor) or y.dim() != 1 or y.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8):
        raise InputError(
            "y must be an integer label tensor of shape (N,), got "
            f"{type(y).__name__ if not isinstance(y, Tensor) else f'{y.dtype} of shape {tuple(y.shape)}'}"
        )
    if y.shape[0] != x.shape[0]:
        raise InputError(f"x has {x.shape[0]} samples but y has {y.shape[0]} labels")
    return x, y.long()


def pgd_perturb(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    threat: ThreatModel,
    *,
    steps: int,
    step_size: float,
    random_start: bool = True,
    loss: Callable[[Tensor], Tensor] | None = None,
    generator: torch.Generator | None = None,
    start: Tensor | None = None,
) -> Tensor:
    """Approximately maximise a per-sample loss over the threat set around ``x`` by projected gradient ascent.

    Each of the ``steps`` iterations computes the gradient of ``loss(model(x_adv))`` (summed over the batch: the
    samples do not interact, see below) with respect to the input only, moves by ``step_size`` along the threat's
    normalised steepest-ascent direction (``threat.step``: the gradient sign for l∞) and projects back onto the
    ball ∩ input domain (``threat.project``).

    **Model mode.** The loop runs with the model in *eval* mode and restores every submodule's previous
    ``training`` flag afterwards. Reasons: in train mode BatchNorm would normalise each attack iterate with the
    statistics of the perturbed batch and update its running averages ``steps`` times per training step with
    inputs that are never trained on, and it would couple the samples of the batch (the gradient for one sample
    would depend on the others); dropout would make the ascent direction random. In eval mode the attack targets
    the same deterministic function that is evaluated at test time, which is what TRADES' and MART's reference
    implementations do. Objectives then compute their training loss on the returned points in train mode.

    No gradient reaches the model's parameters (only ``x_adv`` is differentiated), so an optimiser's ``.grad``
    buffers are untouched. A ``DistributedDataParallel`` wrapper is looked through (:func:`unwrap`): the attack is
    local to each process.

    Args:
        model: the classifier (returns logits (N, K)).
        x: clean inputs (N, ...), inside the threat's domain.
        y: labels (N,), used by the default loss.
        threat: the threat model (an :class:`~bastion.threat.LpBall`, or any ThreatModel with ``step``).
        steps: number of ascent steps (0 returns the starting point).
        step_size: length of each step in the threat's norm (e.g. 0.01 for l∞ at eps 0.3, Madry et al.'s MNIST).
        random_start: start from ``threat.random_start(x)`` (uniform in the ball) instead of ``x``.
        loss: maps logits (N, K) to the per-sample loss (N,) to maximise; default cross-entropy w.r.t. ``y``.
        generator: random generator for the random start (reproducible training); the global one if ``None``.
        start: an explicit starting point (N, ...) instead of the random start or ``x`` (e.g. TRADES' start
            ``x + 0.001·N(0, I)``); it is projected onto the threat set first.

    Returns:
        The adversarial inputs, detached, inside the threat set and the domain, with ``x``'s shape and dtype.

    Raises:
        InputError: malformed ``x``/``y``, ``steps < 0``, ``step_size <= 0`` or a ``start`` of the wrong shape.
    """
    x, y = check_batch(x, y)
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise InputError(f"steps must be an integer >= 0, got {steps!r}")
    step_size = float(step_size)
    if not (step_size > 0 and math.isfinite(step_size)):
        raise InputError(f"step_size must be a finite number > 0, got {step_size!r}")
    if not isinstance(threat, ThreatModel):
        raise InputError(f"threat must be a bastion ThreatModel such as LpBall('linf', 0.3), got {threat!r}")
    model = unwrap(model)
    x = x.detach()
    y = y.to(x.device)
    if loss is None:

        def loss(logits: Tensor) -> Tensor:
            return F.cross_entropy(logits, y, reduction="none")

    if start is not None:
        if not isinstance(start, Tensor) or start.shape != x.shape:
            got = tuple(start.shape) if isinstance(start, Tensor) else type(start).__name__
            raise InputError(f"start must be a tensor of x's shape {tuple(x.shape)}, got {got}")
        x_adv = threat.project(start.detach().to(dtype=x.dtype, device=x.device), x)
    elif random_start:
        x_adv = threat.random_start(x, generator)
    else:
        x_adv = x.clone()
    with eval_mode(model), torch.enable_grad():
        for _ in range(steps):
            x_adv.requires_grad_(True)
            value = loss(model(x_adv))
            if value.dim() != 1 or value.shape[0] != x.shape[0]:
                raise InputError(
                    f"the inner loss must return one value per sample, shape ({x.shape[0]},); got {tuple(value.shape)}"
                )
            (grad,) = torch.autograd.grad(value.sum(), x_adv)
            with torch.no_grad():
                x_adv = threat.project(threat.step(x_adv.detach(), grad, step_size), x)
    return x_adv.detach()


def kl_div_logits(p_logits: Tensor, q_logits: Tensor) -> Tensor:
    """Per-sample ``KL(p || q)`` between the softmax distributions of two logit batches (N, K) -> (N,).

    Computed from log-softmax values, so it stays finite when a probability underflows to 0.
    """
    log_p = F.log_softmax(p_logits, dim=1)
    return (log_p.exp() * (log_p - F.log_softmax(q_logits, dim=1))).sum(dim=1)


def default_step_size(threat: ThreatModel, steps: int, travel: float = PGD_TRAVEL, per: float = 1.0) -> float:
    """The library's PGD step (:func:`bastion.threat.pgd_step_size`) for a training threat: ``travel/per·eps/steps``.

    ``travel`` defaults to the one rule of every PGD loop, 2.5 radii in all. ``per`` lets a paper's ratio be given
    exactly in floating point (TRADES' 0.007 at eps 0.031 and 10 steps is ``travel=0.07, per=0.031``).

    Raises:
        InputError: the threat has no finite radius to scale the step by.
    """
    eps = float(getattr(threat, "eps", math.nan))
    if not (math.isfinite(eps) and eps > 0):
        raise InputError(f"the threat {threat!r} has no finite eps > 0 to derive a step size from; pass step_size")
    return pgd_step_size(eps, max(1, steps), travel) / per


def check_objective_threat(threat: object, who: str) -> LpBall:
    """``threat`` if it is an LpBall with a finite eps > 0 (training needs a radius), else an InputError."""
    if not isinstance(threat, LpBall):
        raise InputError(f"{who} needs an LpBall threat model such as LpBall('linf', 0.3), got {threat!r}")
    if not (math.isfinite(threat.eps) and threat.eps > 0):
        raise InputError(f"{who} needs a finite eps > 0, got eps={threat.eps!r}")
    if threat.norm == "l0":
        raise InputError(f"{who} supports the linf, l2 and l1 balls, not l0")
    return threat
