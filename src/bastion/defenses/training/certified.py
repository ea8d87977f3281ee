"""Certified (verified) training: interval bound propagation (IBP) and CROWN-IBP.

Both objectives train on an upper bound of the worst-case loss over the l∞ ball, computed by the verification
module's bound code on a *live* network (:meth:`bastion.verify.ir.Network.from_module` with ``live=True``: its
operators hold the model's parameters, so the bounds are differentiable and follow every optimiser step; it is built
once per model and reused). For the robustness specification ``c_j = e_y - e_j`` (:func:`robustness_spec`) a sound
lower bound ``m_j`` of every margin ``z_y - z_j`` over the ball gives the *worst-case logits* ``ẑ_y = 0``,
``ẑ_j = -m_j`` (Gowal et al., eq. 6 with the bound of ``c_j . z``), and ``CE(ẑ, y)`` upper-bounds the cross-entropy
of every point of the ball (Wong & Kolter 2018). The training loss mixes it with the clean cross-entropy:

    ``L = κ · CE(f(x), y) + (1 - κ) · CE(ẑ, y)``.

* :class:`IBPTraining` — Gowal, Dvijotham, Stanforth, Bunel, Qin, Uesato, Arandjelović, Mann & Kohli, "On the
  Effectiveness of Interval Bound Propagation for Training Verifiably Robust Models", arXiv:1810.12715, 2018
  (ICCV 2019 as "Scalable Verified Training for Provably Robust Image Classification"). ``m`` from IBP with the
  specification merged into the last linear layer ("elision", Sec. 3), κ from 1 to 0.5 and ε from 0 to its target
  linearly during a ramp that follows a warm-up of clean training (their MNIST schedule: 2k warm-up steps, 10k ramp
  steps of 60k, i.e. fractions 1/30 and 1/6 of training; the flags of deepmind/interval-bound-propagation's
  ``examples/train.py``).
* :class:`CROWNIBP` — Zhang, Chen, Xiao, Gowal, Stanforth, Li, Boning & Hsieh, "Towards Stable and Efficient Training
  of Verifiably Robust Neural Networks", ICLR 2020. ``m = (1 - β) · m_IBP + β · m_CROWN-IBP``: CROWN-IBP keeps the
  IBP pre-activation bounds of every layer and bounds the specification by CROWN's backward linear relaxation (one
  backward pass from the ``K - 1`` specification rows, so roughly the cost of one more forward pass per row). β goes
  from 1 to 0 and κ from 1 to 0.5 during the ε ramp. These are the authors' MNIST defaults for the large model of
  their main results (huanzhang12/CROWN-IBP, ``config/mnist_dm-large_0.4.json`` on top of ``defaults.json``:
  200 epochs, ε ramped over epochs 10-60, i.e. fractions 0.05 and 0.25, ``final-kappa`` 0.5, ``final-beta`` 0).
  Their code sets κ and β from the current ε, ``κ = 1 - (ε / ε_target)(1 - κ_end)``, which is the same linear ramp.

Schedules are per optimiser step, as in both papers' code: the trainer calls ``step_start(step, total_steps)`` before
every step (:mod:`~bastion.defenses.training.trainer`; the step counter is checkpointed, so a resumed run follows the
same schedule), and :func:`ramp_position` gives ``r = clip((step / total_steps - warmup) / ramp, 0, 1)``; then
``ε = r · ε_target``, ``κ = κ_start + r (κ_end - κ_start)``, ``β = β_start + r (β_end - β_start)``. Used outside a
trainer that calls the hook (e.g. :func:`~bastion.defenses.training.train`), an objective trains at the end of its
schedule (full ε, ``κ_end``, ``β_end``).

Known collapse. With ``κ_end = 0`` the loss at the end of the ramp is the certified loss alone. When the bounds are
loose (ε grows faster than the network can tighten them) its minimiser is the constant classifier: all margins 0,
loss ``ln K``, nothing left to pull the model back (bastion's MNIST run at ε = 0.4 with a 236-step ramp, applied per
epoch, ended that way). Both papers ramp over about 10k steps or more after a warm-up (Gowal et al. 10k; Zhang et
al. 50 epochs of 60k images, ≈ 11.7k steps at batch 256; their small-model configuration ``config/mnist_crown.json``
trains on the certified loss alone, κ = 0 throughout, but ramps over 60 epochs, ≈ 14k steps). So when the trainer
first passes ``total_steps``, an objective with
``κ_end = 0`` and fewer than :data:`MIN_PURE_ROBUST_RAMP_STEPS` ramp steps, or no warm-up, raises a
:class:`CertifiedScheduleWarning` (once per objective and total; bastion's rule, a tenth of the papers' ramps).

Scope: the l∞ ball only (the ball ∩ input domain is then a box; inputs are clipped to the domain); networks the
verification IR accepts in live mode (no BatchNorm; Dropout is ignored by the bounds). Under DDP the clean forward
pass goes through the wrapper (so gradients are all-reduced) and the bounds through the wrapped module's parameters.
"""

from __future__ import annotations

import math
import warnings

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bastion.data import Dataset
from bastion.defenses.training.inner import check_batch, check_objective_threat, unwrap
from bastion.errors import BastionWarning, InputError
from bastion.threat import LpBall
from bastion.verify.bounds import BoundOptions, compute_bounds, robustness_spec
from bastion.verify.certify import certify
from bastion.verify.ibp import ibp_bounds, spec_interval
from bastion.verify.ir import Network
from bastion.verify.ops import LinearOp, ReindexOp

__all__ = [
    "CROWNIBP",
    "MIN_PURE_ROBUST_RAMP_STEPS",
    "CertifiedScheduleWarning",
    "IBPTraining",
    "ramp_position",
    "verified_accuracy",
    "worst_case_logits",
]

Bounds = tuple[Tensor, Tensor]


#: fewer ramp steps than this with ``κ_end = 0`` raise a :class:`CertifiedScheduleWarning` (module docstring)
MIN_PURE_ROBUST_RAMP_STEPS = 1000


class CertifiedScheduleWarning(BastionWarning):
    """A certified-training schedule known to collapse to a constant classifier (see the certified module)."""


def ramp_position(step: int, total_steps: int, warmup: float, ramp: float) -> float:
    """Position ``r`` in ``[0, 1]`` of the ε ramp before optimiser step ``step`` (0-based) of ``total_steps``.

    ``r = clip((step / total_steps - warmup) / ramp, 0, 1)``: 0 during the warm-up (``warmup`` of training), linear
    over the next ``ramp`` of training, then 1 (Gowal et al. 2018 and Zhang et al. 2020 ramp per step). With
    ``ramp == 0`` the ramp is a step at ``warmup``.
    """
    if isinstance(step, bool) or isinstance(total_steps, bool) or total_steps < 1 or not 0 <= step < total_steps:
        raise InputError(
            f"step must lie in [0, total_steps) with total_steps >= 1, got step={step!r}, total_steps={total_steps!r}"
        )
    t, warmup, ramp = step / total_steps, _fraction("warmup", warmup), _fraction("ramp", ramp)
    if ramp <= 0:
        return 1.0 if t >= warmup else 0.0
    return min(1.0, max(0.0, (t - warmup) / ramp))


def worst_case_logits(margin_lower: Tensor, labels: Tensor) -> Tensor:
    """Gowal et al.'s worst-case logits ``ẑ`` from lower bounds of the margins ``z_y - z_j``.

    Args:
        margin_lower: ``(N, K - 1)`` lower bounds, rows of :func:`~bastion.verify.bounds.robustness_spec` order
            (``j`` increasing, ``y`` skipped).
        labels: ``(N,)`` labels ``y``.

    Returns:
        ``(N, K)`` with ``ẑ_y = 0`` and ``ẑ_j = -m_j``: ``CE(ẑ, y)`` bounds the cross-entropy over the ball from above.
    """
    n, k = margin_lower.shape[0], margin_lower.shape[1] + 1
    keep = torch.ones(n, k, dtype=torch.bool, device=margin_lower.device)
    keep[torch.arange(n, device=margin_lower.device), labels] = False
    # masked_scatter fills the True positions in row-major order: exactly the spec rows (j increasing, y skipped)
    return margin_lower.new_zeros(n, k).masked_scatter(keep, -margin_lower)


def _fraction(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= float(value) <= 1.0:
        raise InputError(f"{name} must be a number in [0, 1], got {value!r}")
    return float(value)


class _CertifiedObjective:
    """Shared machinery: schedule, live network cache, input box, worst-case loss."""

    def __init__(
        self,
        threat: LpBall,
        *,
        warmup: float,
        ramp: float,
        kappa_start: float,
        kappa_end: float,
        elide_last_layer: bool,
    ) -> None:
        who = type(self).__name__
        self.threat = check_objective_threat(threat, who)
        if self.threat.norm != "linf":
            raise InputError(f"{who} supports the linf ball only (interval bounds of a box), got {threat.norm!r}")
        self.warmup = _fraction("warmup", warmup)
        self.ramp = _fraction("ramp", ramp)
        if self.warmup + self.ramp > 1.0 + 1e-12:
            raise InputError(f"warmup + ramp must be <= 1 (fractions of training), got {self.warmup} + {self.ramp}")
        self.kappa_start = _fraction("kappa_start", kappa_start)
        self.kappa_end = _fraction("kappa_end", kappa_end)
        self.elide_last_layer = bool(elide_last_layer)
        self._net: Network | None = None
        self._net_key: tuple[int, ...] | None = None
        self.position = 1.0  # end of schedule until a trainer calls a schedule hook
        self._checked_total: int | None = None  # total_steps the collapse check last ran for
        self._apply(self.position)

    # -- schedule ---------------------------------------------------------------------------------------------
    def _apply(self, r: float) -> None:
        self.position = r
        self.eps = r * self.threat.eps
        self.kappa = self.kappa_start + r * (self.kappa_end - self.kappa_start)

    def step_start(self, step: int, total_steps: int) -> None:
        """Set ε, κ (and β) for the coming optimiser step (the trainer's per-step hook); see the module docstring."""
        step, total_steps = int(step), int(total_steps)
        if total_steps != self._checked_total:
            self._checked_total = total_steps
            self._check_schedule(total_steps)
        self._apply(ramp_position(step, total_steps, self.warmup, self.ramp))

    def _check_schedule(self, total_steps: int) -> None:
        """Warn about a schedule known to collapse to a constant classifier (module docstring)."""
        if self.kappa_end > 0.0 or self.threat.eps <= 0.0:
            return
        ramp_steps, warmup_steps = self.ramp * total_steps, self.warmup * total_steps
        if ramp_steps >= MIN_PURE_ROBUST_RAMP_STEPS and warmup_steps >= 1.0:
            return
        warnings.warn(
            f"{type(self).__name__} with kappa_end=0 (no clean loss once the ramp ends), a ramp of "
            f"{ramp_steps:.0f} optimiser steps (ramp={self.ramp:g} of {total_steps}) and {warmup_steps:.0f} warm-up "
            f"steps is known to collapse to a constant classifier; use kappa_end=0.5 (the default), a ramp of at "
            f"least {MIN_PURE_ROBUST_RAMP_STEPS} steps after a warm-up, or more epochs",
            CertifiedScheduleWarning,
            stacklevel=3,
        )

    # -- bounds -----------------------------------------------------------------------------------------------
    def network(self, model: nn.Module, input_shape: tuple[int, ...]) -> Network:
        """The live verification network of ``model`` (built on first use, then reused while the model is the same)."""
        module = unwrap(model)
        key = (id(module), *(id(p) for p in module.parameters()), *input_shape)
        if self._net is None or self._net_key != key:
            self._net = Network.from_module(module, input_shape, live=True)
            self._net_key = key
        return self._net

    def box(self, x: Tensor, eps: float | None = None) -> Bounds:
        """The l∞ ball of radius ``eps`` (current ε by default) around ``x``, clipped to the threat's domain."""
        e = self.eps if eps is None else float(eps)
        if not (math.isfinite(e) and e >= 0.0):
            raise InputError(f"eps must be a finite number >= 0, got {eps!r}")
        lo_d, hi_d = self.threat.domain
        return (x - e).clamp(lo_d, hi_d), (x + e).clamp(lo_d, hi_d)

    def _ibp(self, net: Network, lower: Tensor, upper: Tensor, C: Tensor) -> tuple[Tensor, dict[str, Bounds]]:
        """IBP lower bounds of ``C @ f`` (last layer elided when possible) and the pre-activation boxes."""
        lb, _, pre = ibp_bounds(net, lower, upper, C)
        if self.elide_last_layer:
            elided = _elided_lower(net, pre, C)
            if elided is not None:
                lb = elided
        return lb, pre

    def margin_lower_bounds(self, model: nn.Module, x: Tensor, y: Tensor, eps: float | None = None) -> Tensor:
        """Sound lower bounds ``(N, K - 1)`` of the margins ``f_y - f_j`` over the box, as used in the loss.

        Args:
            model: the classifier (its live network is built on first use).
            x: ``(N, *input_shape)`` inputs on the model's device and dtype.
            y: ``(N,)`` labels.
            eps: radius of the box; the schedule's current ε by default.
        """
        x, y = check_batch(x, y)
        first = next(iter(unwrap(model).parameters()), None)
        if first is not None and (first.dtype != x.dtype or first.device != x.device):
            raise InputError(
                f"{type(self).__name__}: inputs are {x.dtype} on {x.device} but the model's parameters are "
                f"{first.dtype} on {first.device}; move the batch to the model"
            )
        net = self.network(model, tuple(x.shape[1:]))
        k = math.prod(net.output_shape)
        C = robustness_spec(y.to(x.device), k).to(x.dtype)
        lower, upper = self.box(x, eps)
        return self._margins(net, lower, upper, C)

    def _margins(self, net: Network, lower: Tensor, upper: Tensor, C: Tensor) -> Tensor:
        raise NotImplementedError

    def __call__(self, model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
        x, y = check_batch(x, y)
        # The clean pass goes through the (possibly DDP-wrapped) model so that gradients are synchronised.
        clean = F.cross_entropy(model(x), y)
        if self.eps <= 0.0 or self.kappa >= 1.0:
            # With ε = 0 the worst-case logits equal the margins of the clean logits, so CE(ẑ) = CE(f(x)).
            return clean
        lb = self.margin_lower_bounds(model, x, y)
        robust = F.cross_entropy(worst_case_logits(lb, y), y)
        return self.kappa * clean + (1.0 - self.kappa) * robust


def _elided_lower(net: Network, pre: dict[str, Bounds], C: Tensor) -> Tensor | None:
    """IBP bound of ``C @ f`` with ``C`` merged into the last linear layer (Gowal et al. 2018, Sec. 3).

    Applies when the output is a :class:`LinearOp` fed by a nonlinear node through re-indexing only (the usual
    ``... ReLU -> [Flatten] -> Linear`` head); returns None otherwise.
    """
    out = net.nodes[net.output_name]
    if not isinstance(out.op, LinearOp) or len(out.shape) != 1:
        return None
    chain: list[str] = []
    name = out.inputs[0]
    while not net.nodes[name].op.nonlinear:
        if not isinstance(net.nodes[name].op, ReindexOp):
            return None
        chain.append(name)
        name = net.nodes[name].inputs[0]
    box = net.nodes[name].op.interval(pre[name])
    for step in reversed(chain):
        box = net.nodes[step].op.interval(box)
    lo, hi = box
    n = lo.shape[0]
    w, b = out.op.weight, out.op.bias
    cw = C @ w  # (N, m, P): the specification composed with the last layer
    lb, _ = spec_interval(cw, lo.reshape(n, -1), hi.reshape(n, -1))
    return lb + C @ b


class IBPTraining(_CertifiedObjective):
    """IBP certified training (Gowal et al. 2018): ``κ · CE(f(x), y) + (1 - κ) · CE(ẑ_IBP, y)``.

    See the module docstring for the loss and the schedule. Defaults are the paper's MNIST schedule as fractions of
    training (2k warm-up and 10k ramp steps of 60k) and κ from 1 to 0.5. Gowal et al. train at a slightly larger ε
    than they test (0.4 for 0.3 on MNIST): pass that ε in ``threat``.

    Args:
        threat: an l∞ ``LpBall``; its ``eps`` is the target training radius.
        kappa_start: weight of the clean loss at the start of the ramp.
        kappa_end: weight of the clean loss at the end of the ramp.
        warmup: fraction of training with ε = 0 before the ramp.
        ramp: fraction of training over which ε rises linearly from 0 to ``threat.eps``.
        elide_last_layer: merge the specification into the last linear layer (tighter, Gowal et al. Sec. 3).
    """

    paper = (
        "Gowal et al., On the Effectiveness of Interval Bound Propagation for Training Verifiably Robust Models, 2018"
    )

    def __init__(
        self,
        threat: LpBall,
        *,
        kappa_start: float = 1.0,
        kappa_end: float = 0.5,
        warmup: float = 1 / 30,
        ramp: float = 1 / 6,
        elide_last_layer: bool = True,
    ) -> None:
        super().__init__(
            threat,
            warmup=warmup,
            ramp=ramp,
            kappa_start=kappa_start,
            kappa_end=kappa_end,
            elide_last_layer=elide_last_layer,
        )

    def _margins(self, net: Network, lower: Tensor, upper: Tensor, C: Tensor) -> Tensor:
        return self._ibp(net, lower, upper, C)[0]

    def __repr__(self) -> str:
        return (
            f"IBPTraining({self.threat!r}, kappa_start={self.kappa_start}, kappa_end={self.kappa_end}, "
            f"warmup={self.warmup!r}, ramp={self.ramp!r}, elide_last_layer={self.elide_last_layer})"
        )


class CROWNIBP(_CertifiedObjective):
    """CROWN-IBP certified training (Zhang et al., ICLR 2020).

    Loss ``κ · CE(f(x), y) + (1 - κ) · CE(ẑ, y)`` with the worst-case logits of the margin bound
    ``(1 - β) · m_IBP + β · m_CROWN-IBP`` (module docstring). Defaults are the authors' MNIST configuration (ε ramped
    per step over epochs 10-60 of 200, β from 1 to 0 and κ from 1 to 0.5 during the ramp: ``final-kappa`` 0.5 of
    their reference code); once β reaches 0 the backward pass is skipped and training costs as much as IBP.
    ``kappa_end=0`` (no clean loss at the end) needs a long ramp: see the module docstring's collapse warning.

    Args:
        threat: an l∞ ``LpBall``; its ``eps`` is the target training radius.
        kappa_start: weight of the clean loss at the start of the ramp.
        kappa_end: weight of the clean loss at the end of the ramp.
        beta_start: weight of the CROWN-IBP bound at the start of the ramp.
        beta_end: weight of the CROWN-IBP bound at the end of the ramp.
        warmup: fraction of training with ε = 0 before the ramp.
        ramp: fraction of training over which ε rises linearly from 0 to ``threat.eps``.
        elide_last_layer: merge the specification into the last layer in the IBP part.
    """

    paper = "Zhang et al., Towards Stable and Efficient Training of Verifiably Robust Neural Networks, ICLR 2020"

    def __init__(
        self,
        threat: LpBall,
        *,
        kappa_start: float = 1.0,
        kappa_end: float = 0.5,
        beta_start: float = 1.0,
        beta_end: float = 0.0,
        warmup: float = 0.05,
        ramp: float = 0.25,
        elide_last_layer: bool = True,
    ) -> None:
        self.beta_start = _fraction("beta_start", beta_start)
        self.beta_end = _fraction("beta_end", beta_end)
        super().__init__(
            threat,
            warmup=warmup,
            ramp=ramp,
            kappa_start=kappa_start,
            kappa_end=kappa_end,
            elide_last_layer=elide_last_layer,
        )

    def _apply(self, r: float) -> None:
        super()._apply(r)
        self.beta = self.beta_start + r * (self.beta_end - self.beta_start)

    def _margins(self, net: Network, lower: Tensor, upper: Tensor, C: Tensor) -> Tensor:
        lb_ibp, pre = self._ibp(net, lower, upper, C)
        if self.beta <= 0.0 or torch.equal(lower, upper):
            # a zero-width box (eps = 0, the warm-up): every interval is a point and IBP is the exact margin
            return lb_ibp
        # CROWN's backward pass from the specification on top of the IBP pre-activation bounds (reused as given).
        opts = BoundOptions(method="crown", bound_upper=False, reuse_intermediate=True)
        lb_crown = compute_bounds(net, lower, upper, C=C, method="crown", options=opts, intermediate=pre).lower
        if self.beta >= 1.0:
            return lb_crown
        return (1.0 - self.beta) * lb_ibp + self.beta * lb_crown

    def __repr__(self) -> str:
        return (
            f"CROWNIBP({self.threat!r}, kappa_start={self.kappa_start}, kappa_end={self.kappa_end}, "
            f"beta_start={self.beta_start}, beta_end={self.beta_end}, warmup={self.warmup!r}, ramp={self.ramp!r}, "
            f"elide_last_layer={self.elide_last_layer})"
        )


def verified_accuracy(
    model: nn.Module,
    data: Dataset | tuple[Tensor, Tensor],
    threat: LpBall,
    *,
    method: str = "ibp",
    batch_size: int = 256,
) -> float:
    """Fraction of ``data`` that ``model`` classifies correctly and a bound method certifies at ``threat.eps``.

    A thin wrapper over :func:`bastion.verify.certify.certify` (``radius=False``), so that training code and the
    verification module share one certification path.

    Args:
        model: the classifier.
        data: a Dataset or a pair ``(x, y)``.
        threat: the ball (``linf`` for ``ibp``; see :func:`~bastion.verify.certify.certify` for the others).
        method: a bound method of :func:`~bastion.verify.certify.certify` (``"ibp"``, ``"crown"``, ...).
        batch_size: samples per bound computation.

    Returns:
        The verified accuracy in ``[0, 1]``.
    """
    result = certify(model, data, threat, method=method, radius=False, batch_size=batch_size, progress=False)
    return result.certified_accuracy
