"""Spatially transformed adversarial examples (stAdv): fool a classifier by moving pixels, not by changing them.

Xiao, Zhu, Li, He, Liu & Song, "Spatially Transformed Adversarial Examples", ICLR 2018. The adversarial image is
``warp(x, f)``: every output pixel reads the input at its own position displaced by the flow vector ``f_i`` and
interpolates its 4 neighbours bilinearly (eq. 1 of the paper; :func:`bastion.threat.warp`). The flow is found by
minimising

    ``L_adv(x, f) + tau · L_flow(f)``

where ``L_adv`` is the C&W margin loss (the paper's eq. 3, written once in :mod:`bastion.results`) and ``L_flow`` is
the flow's total variation, ``Σ_p Σ_{q ∈ N(p)} sqrt(||Δu_pq||² + ||Δv_pq||²)`` over the 4-neighbourhood ``N(p)`` of
every pixel (eq. 4), which makes the flow smooth and the change hard to see.
"""

from __future__ import annotations

import math

import torch

from bastion.attacks.base import Attack, CountingModel, positive_float, positive_int
from bastion.errors import InputError
from bastion.results import Criterion
from bastion.threat import FlowThreat, ThreatModel, warp

#: Added under the square roots of the flow loss so that its gradient is finite where neighbours move together.
_SMOOTH = 1e-12


def flow_loss(flow: torch.Tensor) -> torch.Tensor:
    """The flow total-variation loss ``L_flow`` of stAdv (Xiao et al., ICLR 2018, eq. 4), per sample (N,).

    ``Σ_p Σ_{q ∈ N(p)} sqrt((u_p - u_q)² + (v_p - v_q)²)`` for the 4 neighbours ``q`` of every pixel ``p`` inside the
    image (each neighbouring pair is counted from both sides, as in the paper's double sum). A tiny constant under the
    square root keeps the gradient finite; it is subtracted again so that a constant flow costs exactly 0.

    Args:
        flow: flow fields (N, 2, H, W).
    """
    dx = flow[:, :, :, 1:] - flow[:, :, :, :-1]
    dy = flow[:, :, 1:, :] - flow[:, :, :-1, :]
    root = math.sqrt(_SMOOTH)
    tv_x = ((dx * dx).sum(dim=1) + _SMOOTH).sqrt() - root
    tv_y = ((dy * dy).sum(dim=1) + _SMOOTH).sqrt() - root
    return 2.0 * (tv_x.flatten(1).sum(dim=1) + tv_y.flatten(1).sum(dim=1))


class StAdv(Attack):
    """stAdv (Xiao, Zhu, Li, He, Liu & Song, ICLR 2018): an adversarial flow field with a smoothness penalty.

    Minimises ``L_adv + tau · L_flow`` over the flow ``f`` (see the module docstring), with
    ``L_adv = -min(m(x_f), kappa)`` where ``m`` is the C&W margin (:meth:`~bastion.results.Criterion.loss` with
    ``"cw"``): for an untargeted attack ``max_{i != y} z_i - z_y``, for a targeted one ``z_t - max_{i != t} z_i``.
    Once the margin reaches ``kappa`` the adversarial term is flat and only the flow penalty acts, which smooths the
    flow while it stays adversarial. Of all iterates that meet the criterion, the one with the smallest ``L_flow``
    is returned (else the last one); the attack's base re-applies it and re-predicts.

    Optimiser: the paper uses L-BFGS; this implementation uses Adam with a projection onto the flow budget after
    every step. Adam treats every coordinate, hence every sample, independently, so a batch is exactly a set of
    independent attacks; PyTorch's L-BFGS sees one scalar objective for the whole batch (a shared line search and
    curvature history couple the samples) and has no constraint handling, and SciPy's L-BFGS-B would copy the flow
    to the host on every iteration. The threat's budget (:class:`~bastion.threat.FlowThreat`, largest per-pixel
    displacement) is enforced by projecting the flow after each Adam step; with ``FlowThreat(math.inf)`` the attack
    is the paper's unconstrained one.

    The result's ``distance`` is the flow size (largest displacement in pixels, the threat's metric), and its
    ``perturbation`` holds the flows; the paper's smoothness ``L_flow`` of a flow is :func:`flow_loss`.

    Args:
        tau: weight of the flow loss (the paper's 0.05).
        kappa: confidence: the margin beyond which the adversarial loss stops pulling (the paper's 0).
        steps: Adam iterations (200).
        lr: Adam step size, in pixels (0.01).
    """

    name = "stadv"
    norms = ("flow",)
    access = "white-box"
    paper = "Xiao, Zhu, Li, He, Liu & Song, Spatially Transformed Adversarial Examples, ICLR 2018"

    def __init__(self, *, tau: float = 0.05, kappa: float = 0.0, steps: int = 200, lr: float = 0.01) -> None:
        self.tau = positive_float("tau", tau, allow_zero=True)
        self.kappa = positive_float("kappa", kappa, allow_zero=True)
        self.steps = positive_int("steps", steps)
        self.lr = positive_float("lr", lr)

    def run(
        self,
        model: CountingModel,
        x: torch.Tensor,
        criterion: Criterion,
        threat: ThreatModel,
        generator: torch.Generator | None,
    ) -> torch.Tensor:
        if not isinstance(threat, FlowThreat):
            raise InputError(f"StAdv needs a FlowThreat threat model, got {threat!r}")
        images = x if x.dim() == 4 else x.unsqueeze(1)
        lo, hi = threat.domain
        flow = images.new_zeros(threat.flow_shape(x)).requires_grad_(True)
        optimiser = torch.optim.Adam([flow], lr=self.lr)
        best = flow.detach().clone()
        best_smooth = torch.full((x.shape[0],), math.inf, dtype=x.dtype, device=x.device)

        def adv_loss(logits: torch.Tensor) -> torch.Tensor:
            return -criterion.loss(logits, "cw", kappa=self.kappa)  # L_adv, to minimise

        for _ in range(self.steps):
            with torch.enable_grad():
                x_adv = warp(images, flow).clamp(lo, hi)
                logits, _, grad_x = model.logits_and_grad(x_adv.detach().reshape(x.shape), adv_loss)
                smooth = flow_loss(flow)
                # chain rule through the warp: d L_adv / d f = (d x_adv / d f)^T grad_x, plus tau · d L_flow / d f
                objective = (x_adv * grad_x.reshape(x_adv.shape)).sum() + self.tau * smooth.sum()
                (grad,) = torch.autograd.grad(objective, flow)
            with torch.no_grad():
                better = criterion.is_adversarial(logits) & (smooth < best_smooth)
                best = torch.where(better[:, None, None, None], flow, best)
                best_smooth = torch.where(better, smooth, best_smooth)
                flow.grad = grad
                optimiser.step()
                flow.copy_(threat.project_flow(flow))
        found = torch.isfinite(best_smooth)[:, None, None, None]
        return torch.where(found, best, flow.detach())
