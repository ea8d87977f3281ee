"""alpha-CROWN: CROWN with the lower relaxation slopes optimised by gradient ascent.

Xu, Zhang, Wang, Wang, Jana, Lin, Hsieh, "Fast and Complete: Enabling Complete Neural Network Verification with
Rapid and Massively Parallel Incomplete Verifiers", ICLR 2021.

The lower bound of an unstable ReLU (or LeakyReLU) ``y >= alpha * x`` is valid for every ``alpha`` in ``[0, 1]``
(``[slope, 1]`` for LeakyReLU), so every choice gives a sound CROWN bound and the best can be searched. The slopes
are free per neuron *and per specification row* (a separate alpha for each row of ``[C; -C]``), initialised at
CROWN's adaptive choice and optimised with Adam on the sum of the final bounds, projected back onto the valid
interval after each step. The best bound seen for each row is kept, so the result is never looser than CROWN.

Defaults follow the paper's code: 20 iterations, learning rate 0.1, learning-rate decay 0.98 per step. By default the
pre-activation bounds of intermediate layers are CROWN's (not re-optimised), which keeps the cost at one backward pass
per step. With ``optimize_intermediate=True`` every intermediate layer that CROWN refines by back-substitution gets
its own slopes too (per neuron of the relaxed layer and per row of that layer's specification, as in the paper); its
bounds are recomputed at every step from those slopes, intersected with CROWN's, and the whole chain is optimised
through the final objective. The returned intermediate bounds are the tightest seen at any step.

With ``beta=True`` and ReLU splits, the split constraints ``s * x >= 0`` enter the final bound through Lagrange
multipliers ``beta >= 0`` (one per split neuron and specification row) optimised jointly with the slopes: beta-CROWN,
Wang, Zhang, Xu, Lin, Jana, Hsieh, Kolter, "Beta-CROWN: Efficient Bound Propagation with Per-neuron Split
Constraints for Neural Network Robustness Verification", NeurIPS 2021. Any ``beta >= 0`` is sound; starting at 0
(plain CROWN with splits) and keeping the best bound per row, the result is never looser than CROWN on the split
domain. The multipliers act on the final bound only (intermediate bounds use the splits as interval constraints).
"""

from __future__ import annotations

import torch
from torch import Tensor

from bastion.verify.crown import _ancestors, final_bounds, intermediate_bounds, onehot_lower, select_rows
from bastion.verify.ibp import apply_constraints
from bastion.verify.ir import Network

__all__ = ["alpha_crown_bounds"]

Bounds = tuple[Tensor, Tensor]


#: Most slope entries kept for the intermediate layers with ``optimize_intermediate``; layers beyond are left at
#: CROWN's bounds (the slopes of a layer cost N x 2 x unstable neurons x size of every earlier activation).
MAX_INTERMEDIATE_ALPHAS = 2**22


def _adaptive(net: Network, name: str, pre: dict[str, Bounds], rows: int) -> Tensor:
    """CROWN's adaptive lower slopes of node ``name`` repeated for ``rows`` specification rows (a leaf to optimise)."""
    op = net.nodes[name].op
    lo, hi = pre[name]
    a_min, a_max = op.alpha_bounds()  # type: ignore[attr-defined]
    init = torch.where(hi > -lo, torch.full_like(lo, a_max), torch.full_like(lo, a_min))
    return init.unsqueeze(1).expand(init.shape[0], rows, *init.shape[1:]).clone().requires_grad_(True)


def _intermediate_plan(
    net: Network,
    pre: dict[str, Bounds],
    intermediate: dict[str, Bounds] | None,
    reuse_intermediate: bool,
) -> list[tuple[str, str, Tensor, Tensor, dict[str, Tensor]]]:
    """The intermediate layers to re-optimise: ``(node, source, idx, valid, slopes per earlier activation)``.

    Exactly the layers CROWN back-substitutes (an affine producer with a relaxation below it), restricted to the
    neurons CROWN's bounds leave unstable.
    """
    plan = []
    budget = MAX_INTERMEDIATE_ALPHAS
    for name in net.nonlinear_nodes():
        src = net.nodes[name].inputs[0]
        if reuse_intermediate and intermediate is not None and name in intermediate:
            continue
        if not net.nodes[src].op.linear:
            continue
        chain = _ancestors(net, src)
        relaxed = [k for k in chain if net.nodes[k].op.nonlinear]
        if not relaxed:
            continue
        lo, hi = pre[name]
        n = lo.shape[0]
        need = net.nodes[name].op.bound_mask(lo.reshape(n, -1), hi.reshape(n, -1))  # type: ignore[attr-defined]
        idx, valid = select_rows(need)
        rows = 2 * idx.shape[1]
        with_alpha = [k for k in relaxed if getattr(net.nodes[k].op, "has_alpha", False)]
        cost = sum(n * rows * pre[k][0][0].numel() for k in with_alpha)
        if rows == 0 or not with_alpha or cost > budget:
            continue
        budget -= cost
        plan.append((name, src, idx, valid, {k: _adaptive(net, k, pre, rows) for k in with_alpha}))
    return plan


def _refined(
    net: Network,
    lower: Tensor,
    upper: Tensor,
    pre: dict[str, Bounds],
    plan: list[tuple[str, str, Tensor, Tensor, dict[str, Tensor]]],
    splits: dict[str, Tensor] | None,
) -> dict[str, Bounds]:
    """Intermediate bounds recomputed from the plan slopes layer by layer, intersected with ``pre`` (differentiable)."""
    cur = dict(pre)
    for name, src, idx, valid, alphas in plan:
        n, k = idx.shape
        lb = onehot_lower(net, src, idx, valid, lower, upper, cur, alphas=alphas)
        lo_f, hi_f = cur[name][0].reshape(n, -1), cur[name][1].reshape(n, -1)
        g_lo, g_hi = lo_f.gather(1, idx), hi_f.gather(1, idx)
        new_lo = torch.where(valid, torch.maximum(g_lo, lb[:, :k]), g_lo)
        new_hi = torch.where(valid, torch.minimum(g_hi, -lb[:, k:]), g_hi)
        shape = cur[name][0].shape
        lo, hi = lo_f.scatter(1, idx, new_lo).reshape(shape), hi_f.scatter(1, idx, new_hi).reshape(shape)
        cur[name] = apply_constraints(name, (lo, hi), given=None, splits=splits)
    return cur


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
    optimize_intermediate: bool = False,
    beta: bool = False,
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
        optimize_intermediate: also optimise the slopes behind the intermediate-layer bounds (see the module
            docstring).
        beta: with ``splits``, also optimise beta-CROWN multipliers of the split constraints (module docstring).

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
    for name in net.nonlinear_nodes():
        if getattr(net.nodes[name].op, "has_alpha", False):
            alphas[name] = _adaptive(net, name, pre, rows)
    # beta-CROWN: a multiplier beta >= 0 per split neuron and specification row; the term -beta * s * x is <= 0 on
    # the split domain (s * x >= 0), so adding it keeps the bound sound for every beta >= 0.
    betas: dict[str, Tensor] = {}
    signs: dict[str, Tensor] = {}
    if beta and splits is not None:
        for name, s in splits.items():
            if bool((s != 0).any()):
                sign = s.to(lower.dtype).unsqueeze(1)
                signs[name] = sign
                betas[name] = torch.zeros(s.shape[0], rows, *s.shape[1:], dtype=lower.dtype, device=lower.device)
                betas[name].requires_grad_(True)
    if (not alphas and not betas) or steps <= 0:
        return best_lo, best_hi, pre
    plan = _intermediate_plan(net, pre, intermediate, reuse_intermediate) if optimize_intermediate else []
    best_pre = dict(pre)
    # One flat list of (slopes, valid range) for the optimiser: the final layer's, then each intermediate layer's.
    params = [(a, net.nodes[name].op.alpha_bounds()) for name, a in alphas.items()]  # type: ignore[attr-defined]
    params += [(a, net.nodes[k].op.alpha_bounds()) for *_, layer in plan for k, a in layer.items()]  # type: ignore[attr-defined]
    params += [(b, (0.0, float("inf"))) for b in betas.values()]
    leaves = [p for p, _ in params]
    # Adam (Kingma & Ba, ICLR 2015) written out: the first import of torch.optim costs seconds (it loads
    # torch.distributed), more than the whole optimisation on a small network.
    beta1, beta2, eps = 0.9, 0.999, 1e-8
    moments = [(torch.zeros_like(a), torch.zeros_like(a)) for a in leaves]
    step_lr = lr
    with torch.enable_grad():
        for step in range(1, steps + 1):
            cur = _refined(net, lower, upper, pre, plan, splits) if plan else pre
            lagrange = {name: -b * signs[name] for name, b in betas.items()} if betas else None
            lo_b, hi_b = final_bounds(
                net, lower, upper, C, cur, alphas=alphas, bound_upper=bound_upper, lagrange=lagrange
            )
            with torch.no_grad():
                best_lo = torch.maximum(best_lo, lo_b)
                if bound_upper:
                    best_hi = torch.minimum(best_hi, hi_b)
                for name, *_ in plan:
                    lo_c, hi_c = cur[name]
                    best_pre[name] = (torch.maximum(best_pre[name][0], lo_c), torch.minimum(best_pre[name][1], hi_c))
            # Every row's bound depends only on its own alphas, so one summed objective optimises all rows at once.
            objective = lo_b.sum() - (hi_b.sum() if bound_upper else 0.0)
            grads = torch.autograd.grad(objective, leaves, allow_unused=True)
            with torch.no_grad():
                for (a, valid_range), (m1, m2), g in zip(params, moments, grads):
                    if g is None:
                        continue
                    m1.mul_(beta1).add_(g, alpha=1 - beta1)
                    m2.mul_(beta2).addcmul_(g, g, value=1 - beta2)
                    denom = (m2 / (1 - beta2**step)).sqrt_().add_(eps)
                    # Ascent on the bound, then projection onto the valid slopes.
                    a.add_(step_lr * (m1 / (1 - beta1**step)) / denom).clamp_(*valid_range)
            step_lr *= lr_decay
    with torch.no_grad():
        if plan:
            cur = _refined(net, lower, upper, pre, plan, splits)
            for name, *_ in plan:
                lo_c, hi_c = cur[name]
                best_pre[name] = (torch.maximum(best_pre[name][0], lo_c), torch.minimum(best_pre[name][1], hi_c))
        # The tightest intermediate bounds seen (each valid, so their intersection is) with the final slopes.
        lagrange = {name: -b * signs[name] for name, b in betas.items()} if betas else None
        lo_b, hi_b = final_bounds(
            net, lower, upper, C, best_pre, alphas=alphas, bound_upper=bound_upper, lagrange=lagrange
        )
        best_lo = torch.maximum(best_lo, lo_b)
        if bound_upper:
            best_hi = torch.minimum(best_hi, hi_b)
    best_pre = {k: (lo.detach(), hi.detach()) for k, (lo, hi) in best_pre.items()}
    return best_lo, best_hi, best_pre
