"""alpha-CROWN: CROWN with the lower relaxation slopes optimised by gradient ascent.

Xu, Zhang, Wang, Wang, Jana, Lin, Hsieh, "Fast and Complete: Enabling Complete Neural Network Verification with
Rapid and Massively Parallel Incomplete Verifiers", ICLR 2021.

The lower bound of an unstable ReLU (or LeakyReLU) ``y >= alpha * x`` is valid for every ``alpha`` in ``[0, 1]``
(``[slope, 1]`` for LeakyReLU), so every choice gives a sound CROWN bound and the best can be searched. The slopes
are free per neuron *and per specification row* (a separate alpha for each row of ``[C; -C]``), initialised at
CROWN's adaptive choice and optimised with Adam on the sum of the final bounds, projected back onto the valid
interval after each step. The best bound seen for each row is kept, so the result is never looser than CROWN.

Defaults follow the paper's code: 20 iterations, learning rate 0.1, learning-rate decay 0.98 per step. Pre-activation
bounds of intermediate layers are CROWN's (not re-optimised), which keeps the cost at one backward pass per step.
"""

from __future__ import annotations

import torch
from torch import Tensor

from bastion.verify.crown import final_bounds, intermediate_bounds
from bastion.verify.ir import Network

__all__ = ["alpha_crown_bounds"]

Bounds = tuple[Tensor, Tensor]


def alpha_crown_bounds(
    net: Network,
    lower: Tensor,
    upper: Tensor,
    C: Tensor,
    *,
    steps: int = 20,
    lr: float = 0.1,
    lr_decay: float = 0.98,
    splits: dict[str, Tensor] | None = None,
    intermediate: dict[str, Bounds] | None = None,
    reuse_intermediate: bool = False,
    bound_upper: bool = True,
) -> tuple[Tensor, Tensor, dict[str, Bounds]]:
    """alpha-CROWN bounds of ``C @ net(x)`` over the box ``[lower, upper]``.

    Args:
        net: the network.
        lower: ``(N, *input_shape)``.
        upper: ``(N, *input_shape)``.
        C: ``(N, m, K)`` specification.
        steps: optimisation steps.
        lr: Adam learning rate.
        lr_decay: multiplicative learning-rate decay per step.
        splits: ReLU split decisions.
        intermediate: known pre-activation bounds (intersected).
        reuse_intermediate: take the known bounds as they are.
        bound_upper: also compute (and optimise) upper bounds.

    Returns:
        ``(lower (N, m), upper (N, m), pre-activation bounds)``; the bounds are detached from the autograd graph.
    """
    lower, upper, C = lower.detach(), upper.detach(), C.detach()
    with torch.no_grad():
        pre = intermediate_bounds(
            net, lower, upper, splits=splits, intermediate=intermediate, reuse_intermediate=reuse_intermediate
        )
        best_lo, best_hi = final_bounds(net, lower, upper, C, pre, bound_upper=bound_upper)
    rows = C.shape[1] * (2 if bound_upper else 1)
    alphas: dict[str, Tensor] = {}
    ranges: dict[str, tuple[float, float]] = {}
    for name in net.nonlinear_nodes():
        op = net.nodes[name].op
        if not getattr(op, "has_alpha", False):
            continue
        lo, hi = pre[name]
        a_min, a_max = op.alpha_bounds()  # type: ignore[attr-defined]
        init = torch.where(hi > -lo, torch.full_like(lo, a_max), torch.full_like(lo, a_min))
        alphas[name] = init.unsqueeze(1).expand(init.shape[0], rows, *init.shape[1:]).clone().requires_grad_(True)
        ranges[name] = (a_min, a_max)
    if not alphas or steps <= 0:
        return best_lo, best_hi, pre
    # Adam (Kingma & Ba, ICLR 2015) written out: the first import of torch.optim costs seconds (it loads
    # torch.distributed), more than the whole optimisation on a small network.
    beta1, beta2, eps = 0.9, 0.999, 1e-8
    moments = {name: (torch.zeros_like(a), torch.zeros_like(a)) for name, a in alphas.items()}
    step_lr = lr
    with torch.enable_grad():
        for step in range(1, steps + 1):
            lo_b, hi_b = final_bounds(net, lower, upper, C, pre, alphas=alphas, bound_upper=bound_upper)
            with torch.no_grad():
                best_lo = torch.maximum(best_lo, lo_b)
                if bound_upper:
                    best_hi = torch.minimum(best_hi, hi_b)
            # Every row's bound depends only on its own alphas, so one summed objective optimises all rows at once.
            objective = lo_b.sum() - (hi_b.sum() if bound_upper else 0.0)
            grads = torch.autograd.grad(objective, list(alphas.values()), allow_unused=True)
            with torch.no_grad():
                for (name, a), g in zip(alphas.items(), grads):
                    if g is None:
                        continue
                    m1, m2 = moments[name]
                    m1.mul_(beta1).add_(g, alpha=1 - beta1)
                    m2.mul_(beta2).addcmul_(g, g, value=1 - beta2)
                    denom = (m2 / (1 - beta2**step)).sqrt_().add_(eps)
                    # Ascent on the bound, then projection onto the valid slopes.
                    a.add_(step_lr * (m1 / (1 - beta1**step)) / denom).clamp_(*ranges[name])
            step_lr *= lr_decay
    with torch.no_grad():
        lo_b, hi_b = final_bounds(net, lower, upper, C, pre, alphas=alphas, bound_upper=bound_upper)
        best_lo = torch.maximum(best_lo, lo_b)
        if bound_upper:
            best_hi = torch.minimum(best_hi, hi_b)
    return best_lo, best_hi, pre
