"""alpha-CROWN: CROWN with the free parameters of the activation relaxations optimised by gradient ascent.

Xu, Zhang, Wang, Wang, Jana, Lin, Hsieh, "Fast and Complete: Enabling Complete Neural Network Verification with
Rapid and Massively Parallel Incomplete Verifiers", ICLR 2021.

The lower bound of an unstable ReLU (or LeakyReLU) ``y >= alpha * x`` is valid for every ``alpha`` in ``[0, 1]``
(``[slope, 1]`` for LeakyReLU), so every choice gives a sound CROWN bound and the best can be searched. Sigmoid and
tanh have two free parameters per neuron, the tangent points of their lower and upper lines (both lines can be
improved, unlike ReLU's upper chord). A box inside the convex (concave) part allows the lower (upper) tangent at any
point of the box; a box across the inflection point allows the tangents at the points between the one whose tangent
passes through the opposite end of the box and the near end (the kind of family auto_LiRPA optimises for sigmoid and
tanh). Each parameter is the position ``t in [0, 1]`` of the tangent point in that range (see
:class:`bastion.verify.ops.SigmoidOp`), so every value gives a sound line. The parameters are free per neuron *and
per specification row* (a separate set for each row of ``[C; -C]``), initialised at CROWN's choice and optimised
with Adam on the sum of the final bounds, projected back onto the valid interval after each step. The best bound
seen for each row is kept, so the result is never looser than CROWN.

The loop knows no operator: a nonlinear op takes part when it sets ``has_alpha``; ``alpha_bounds()`` is the valid
interval (the projection), ``backward_bound(..., alpha=...)`` takes the parameters ``(N, rows, *parameter
shape)``, and ``alpha_init(lo, hi)`` gives CROWN's values ``(N, *parameter shape)`` (without it the parameter is a
lower slope with CROWN's adaptive rule: the top of the interval when ``hi > -lo``, else the bottom).

Defaults follow the paper's code: 20 iterations, learning rate 0.1, learning-rate decay 0.98 per step. By default
the pre-activation bounds of intermediate layers are CROWN's (not re-optimised), which keeps the cost at one
backward pass per step. With ``optimize_intermediate=True`` every intermediate layer that CROWN refines by
back-substitution gets its own parameters too (per neuron of the relaxed layer and per row of that layer's
specification, as in the paper); its bounds are recomputed at every step from those parameters, intersected with
CROWN's, and the whole chain is optimised through the final objective. The returned intermediate bounds are the
tightest seen at any step.

With ``beta=True`` and ReLU splits, the split constraints ``s * x >= 0`` enter the final bound through Lagrange
multipliers ``beta >= 0`` (one per split neuron and specification row) optimised jointly with the slopes: beta-CROWN,
Wang, Zhang, Xu, Lin, Jana, Hsieh, Kolter, "Beta-CROWN: Efficient Bound Propagation with Per-neuron Split
Constraints for Neural Network Robustness Verification", NeurIPS 2021. Any ``beta >= 0`` is sound; starting at 0
(plain CROWN with splits) and keeping the best bound per row, the result is never looser than CROWN on the split
domain. The multipliers act on the final bound only (intermediate bounds use the splits as interval constraints).

Limitations. The sigmoid/tanh families are tangents only: where CROWN uses a chord (upper line on the convex side or
when the chord lies above the function, the lower line symmetrically) it stays fixed, and mixed-case tangents are
not searched beyond the box end. The tangent point through the far end is found by bisection again at every step (a
few dozen element-wise passes per sigmoid/tanh layer); with ``optimize_intermediate`` the gradient reaches the
intermediate bounds through the lines, and through that point only as the bisection computes it (not as the root it
approximates). Sigmoid/tanh layers take part in ``optimize_intermediate`` like ReLUs, but all their neurons have
bound-dependent relaxations, so each layer's rows cover all its neurons and the :data:`MAX_INTERMEDIATE_ALPHAS`
budget (which counts parameter entries, two per sigmoid/tanh neuron) is reached sooner; layers beyond it keep
CROWN's bounds. Branch and bound (:mod:`bastion.verify.bab`) optimises only ReLU slopes in its beta-CROWN step.
"""

from __future__ import annotations

import torch
from torch import Tensor

from bastion.verify.crown import _ancestors, final_bounds, intermediate_bounds, onehot_lower, select_rows
from bastion.verify.ibp import apply_constraints
from bastion.verify.ir import Network

__all__ = ["alpha_crown_bounds"]

Bounds = tuple[Tensor, Tensor]


#: Most parameter entries kept for the intermediate layers with ``optimize_intermediate``; layers beyond are left at
#: CROWN's bounds (a layer's cost N x 2 x unstable neurons x parameters of every earlier activation).
MAX_INTERMEDIATE_ALPHAS = 2**22


def _init(net: Network, name: str, pre: dict[str, Bounds]) -> Tensor:
    """CROWN's relaxation parameters of node ``name``, per sample: ``(N, *parameter shape)``.

    An operator with ``alpha_init(lo, hi)`` gives its own (sigmoid/tanh: tangent points); otherwise the parameter
    is a lower slope in ``alpha_bounds()`` with CROWN's adaptive rule (the largest when ``hi > -lo``).
    """
    op = net.nodes[name].op
    lo, hi = pre[name]
    init_fn = getattr(op, "alpha_init", None)
    if init_fn is not None:
        return init_fn(lo, hi)
    a_min, a_max = op.alpha_bounds()  # type: ignore[attr-defined]
    return torch.where(hi > -lo, torch.full_like(lo, a_max), torch.full_like(lo, a_min))


def _adaptive(init: Tensor, rows: int) -> Tensor:
    """The per-sample parameters ``init`` repeated for ``rows`` specification rows (dim 1), a leaf to optimise."""
    return init.unsqueeze(1).expand(init.shape[0], rows, *init.shape[1:]).clone().requires_grad_(True)


def _intermediate_plan(
    net: Network,
    pre: dict[str, Bounds],
    intermediate: dict[str, Bounds] | None,
    reuse_intermediate: bool,
) -> list[tuple[str, str, Tensor, Tensor, dict[str, Tensor]]]:
    """The intermediate layers to re-optimise: ``(node, source, idx, valid, parameters per earlier activation)``.

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
        inits = {k: _init(net, k, pre) for k in with_alpha}
        cost = sum(rows * init.numel() for init in inits.values())
        if rows == 0 or not with_alpha or cost > budget:
            continue
        budget -= cost
        plan.append((name, src, idx, valid, {k: _adaptive(init, rows) for k, init in inits.items()}))
    return plan


def _refined(
    net: Network,
    lower: Tensor,
    upper: Tensor,
    pre: dict[str, Bounds],
    plan: list[tuple[str, str, Tensor, Tensor, dict[str, Tensor]]],
    splits: dict[str, Tensor] | None,
) -> dict[str, Bounds]:
    """Intermediate bounds from the plan parameters, layer by layer, intersected with ``pre`` (differentiable)."""
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
        optimize_intermediate: also optimise the relaxation parameters behind the intermediate-layer bounds (see
            the module docstring).
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
            alphas[name] = _adaptive(_init(net, name, pre), rows)
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
    # One flat list of (parameters, valid range) for the optimiser: the final layer's, then each intermediate
    # layer's.
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
                    # Ascent on the bound, then projection onto the valid parameters.
                    a.add_(step_lr * (m1 / (1 - beta1**step)) / denom).clamp_(*valid_range)
            step_lr *= lr_decay
    with torch.no_grad():
        if plan:
            cur = _refined(net, lower, upper, pre, plan, splits)
            for name, *_ in plan:
                lo_c, hi_c = cur[name]
                best_pre[name] = (torch.maximum(best_pre[name][0], lo_c), torch.minimum(best_pre[name][1], hi_c))
        # The tightest intermediate bounds seen (each valid, so their intersection is) with the final parameters.
        lagrange = {name: -b * signs[name] for name, b in betas.items()} if betas else None
        lo_b, hi_b = final_bounds(
            net, lower, upper, C, best_pre, alphas=alphas, bound_upper=bound_upper, lagrange=lagrange
        )
        best_lo = torch.maximum(best_lo, lo_b)
        if bound_upper:
            best_hi = torch.minimum(best_hi, hi_b)
    best_pre = {k: (lo.detach(), hi.detach()) for k, (lo, hi) in best_pre.items()}
    return best_lo, best_hi, best_pre
