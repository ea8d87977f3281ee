"""CROWN: backward linear relaxation bound propagation.

Zhang, Weng, Chen, Hsieh, Daniel, "Efficient Neural Network Robustness Certification with General Activation
Functions", NeurIPS 2018.

For a linear function ``A . y`` of some node ``y``, CROWN walks the graph backwards from ``y`` to the input: through
an affine operator the coefficients are mapped exactly (:meth:`LinearBoundOp.backward`); through an activation they
are mapped through a linear lower or upper bound of the activation, chosen per neuron by the sign of the coefficient
(:meth:`NonlinearBoundOp.backward_bound`). At the input the remaining linear function is minimised in closed form
over the box. The relaxations need the pre-activation bounds of every activation, which CROWN computes layer by layer
with the same backward pass (the identity specification on each pre-activation node). Lower and upper bounds are
obtained in one pass by stacking ``[C; -C]``. ReLU lower slopes use the adaptive rule (1 if ``u > -l`` else 0).

The same machinery serves DeepPoly (``mode="deeppoly"``, see :mod:`bastion.verify.deeppoly`) and alpha-CROWN (which
passes optimisable lower slopes ``alphas``, see :mod:`bastion.verify.alpha_crown`).
"""

from __future__ import annotations

import torch
from torch import Tensor

from bastion.errors import InputError
from bastion.verify.ibp import apply_constraints
from bastion.verify.ir import Network

__all__ = ["backsubstitute", "crown_bounds", "final_bounds", "intermediate_bounds"]

Bounds = tuple[Tensor, Tensor]


def backsubstitute(
    net: Network,
    start: str,
    A: Tensor,
    lower: Tensor,
    upper: Tensor,
    pre: dict[str, Bounds],
    *,
    alphas: dict[str, Tensor] | None = None,
    mode: str = "crown",
) -> Tensor:
    """A sound lower bound of ``A . node(start)`` over the input box.

    Args:
        net: the network.
        start: the node whose output ``A`` multiplies.
        A: ``(N, m, *shape of start)``.
        lower: input box lower end ``(N, *input_shape)``.
        upper: input box upper end.
        pre: pre-activation bounds of every nonlinear ancestor of ``start``.
        alphas: optional lower slopes per nonlinear node, ``(N, m, *in_shape)``.
        mode: relaxation rules, ``"crown"`` or ``"deeppoly"``.

    Returns:
        ``(N, m)`` lower bounds.
    """
    order = list(net.nodes)
    acc: dict[str, Tensor] = {start: A}
    bias = A.new_zeros(A.shape[:2])
    for name in reversed(order[: order.index(start) + 1]):
        a = acc.pop(name, None)
        if a is None:
            continue
        node = net.nodes[name]
        if name == net.input_name:
            lo, hi = lower.unsqueeze(1), upper.unsqueeze(1)
            bias = bias + (a.clamp(min=0) * lo + a.clamp(max=0) * hi).flatten(2).sum(-1)
            continue
        if node.op.linear:
            back, b = node.op.backward(a)  # type: ignore[attr-defined]
        elif node.op.nonlinear:
            lo_n, hi_n = pre[name]
            alpha = alphas.get(name) if alphas is not None else None
            a_in, b = node.op.backward_bound(a, lo_n, hi_n, alpha=alpha, mode=mode)  # type: ignore[attr-defined]
            back = [a_in]
        else:
            raise InputError(f"compute_bounds: operator {node.op!r} of node {name!r} has no linear relaxation")
        bias = bias + b
        for inp, ai in zip(node.inputs, back):
            acc[inp] = acc[inp] + ai if inp in acc else ai
    return bias


#: Most coefficient entries (N x rows x neurons) in one back-substitution pass for intermediate bounds; larger
#: identity specifications are processed in chunks of rows to bound memory.
MAX_ENTRIES = 2**24


def _node_bounds(
    net: Network, name: str, lower: Tensor, upper: Tensor, pre: dict[str, Bounds], mode: str, rows: Tensor | None
) -> Bounds:
    """Bounds ``(N, len(rows))`` of the flattened neurons ``rows`` of ``name`` (all when None) by back-substitution."""
    shape = net.nodes[name].shape
    n = lower.shape[0]
    p = 1
    for d in shape:
        p *= d
    idx = torch.arange(p, device=lower.device) if rows is None else rows
    per = max(1, MAX_ENTRIES // max(1, 2 * n * p))
    los, his = [], []
    for chunk in idx.split(per):
        k = chunk.numel()
        eye = lower.new_zeros(k, p)
        eye[torch.arange(k, device=lower.device), chunk] = 1.0
        A = eye.reshape(1, k, *shape).expand(n, k, *shape)
        lb = backsubstitute(net, name, torch.cat([A, -A], 1), lower, upper, pre, mode=mode)
        los.append(lb[:, :k])
        his.append(-lb[:, k:])
    return torch.cat(los, 1), torch.cat(his, 1)


def _ancestors(net: Network, name: str) -> list[str]:
    """``name`` and every node it depends on, in topological order."""
    keep = {name}
    for other in reversed(list(net.nodes)):
        if other in keep:
            keep.update(net.nodes[other].inputs)
    return [k for k in net.nodes if k in keep]


def _affine_bounds(net: Network, name: str, nodes: list[str], lower: Tensor, upper: Tensor) -> Bounds:
    """Exact bounds of a node that is an affine function of the input (``nodes``: its ancestors, all affine).

    The map ``x -> L x + c`` is recovered in forward mode by evaluating it on the input basis vectors (in chunks),
    which costs one batched forward pass per input dimension instead of one backward pass per neuron.
    """
    n = lower.shape[0]
    d = lower[0].numel()
    mid, rad = ((upper + lower) / 2).reshape(n, -1), ((upper - lower) / 2).reshape(n, -1)
    shape = net.nodes[name].shape

    def run(x: Tensor) -> Tensor:
        values = {net.input_name: x}
        for k in nodes[1:]:
            node = net.nodes[k]
            values[k] = node.op.forward(*[values[i] for i in node.inputs])
        return values[name].reshape(x.shape[0], -1)

    c = run(lower.new_zeros(1, *net.input_shape))
    p = c.shape[1]
    centre, radius = c.expand(n, p).clone(), lower.new_zeros(n, p)
    per = max(1, MAX_ENTRIES // max(1, 4 * p))
    for start in range(0, d, per):
        stop = min(d, start + per)
        basis = lower.new_zeros(stop - start, d)
        basis[torch.arange(stop - start, device=lower.device), torch.arange(start, stop, device=lower.device)] = 1.0
        cols = run(basis.reshape(-1, *net.input_shape)) - c  # (chunk, P): rows of L^T
        centre = centre + mid[:, start:stop] @ cols
        radius = radius + rad[:, start:stop] @ cols.abs()
    return (centre - radius).reshape(n, *shape), (centre + radius).reshape(n, *shape)


def intermediate_bounds(
    net: Network,
    lower: Tensor,
    upper: Tensor,
    *,
    mode: str = "crown",
    splits: dict[str, Tensor] | None = None,
    intermediate: dict[str, Bounds] | None = None,
    reuse_intermediate: bool = False,
) -> dict[str, Bounds]:
    """Pre-activation bounds of every nonlinear node, computed layer by layer by back-substitution.

    Interval bounds are propagated alongside (through the tightened pre-activation bounds) and intersected with
    the back-substituted ones. A node fed by the input or by another nonlinear node keeps its interval bounds (the
    interval image of an activation is already exact given that activation's input bounds); a node that is an affine
    function of the input gets exact bounds in forward mode. Only the neurons whose relaxation depends on their bounds
    (:meth:`NonlinearBoundOp.bound_mask`, e.g. ReLUs left unstable by the interval bounds) are back-substituted: a
    stable ReLU is relaxed exactly whatever its bounds, so this changes no final bound and saves most of the cost on
    large layers (stable neurons keep their interval bounds).

    Args:
        net: the network.
        lower: input box lower end ``(N, *input_shape)``.
        upper: input box upper end.
        mode: ``"crown"`` or ``"deeppoly"``.
        splits: ReLU split decisions applied to the bounds (sound on the restricted domain).
        intermediate: known bounds intersected with the computed ones.
        reuse_intermediate: use the given bounds as they are for the nodes they cover.

    Returns:
        The bounds keyed by nonlinear node name, each ``(N, *in_shape)``.
    """
    boxes: dict[str, Bounds] = {net.input_name: (lower, upper)}
    pre: dict[str, Bounds] = {}
    n = lower.shape[0]
    for name, node in net.nodes.items():
        if name == net.input_name:
            continue
        ins = [boxes[i] for i in node.inputs]
        if node.op.nonlinear:
            src = node.inputs[0]
            if reuse_intermediate and intermediate is not None and name in intermediate:
                pre[name] = apply_constraints(name, None, given=intermediate, splits=splits)
            else:
                lo, hi = apply_constraints(name, ins[0], given=intermediate, splits=splits)
                # Back-substitution only pays off through an affine producer; the interval image of an activation
                # output (e.g. ReLU -> MaxPool) is already the exact range given that activation's input bounds.
                if net.nodes[src].op.linear:
                    shape = lo.shape[1:]
                    lo_f, hi_f = lo.reshape(n, -1), hi.reshape(n, -1)
                    need = node.op.bound_mask(lo_f, hi_f)  # type: ignore[attr-defined]
                    rows: Tensor | None = None if bool(need.all()) else need.any(0).nonzero().flatten()
                    chain = _ancestors(net, src)
                    if all(net.nodes[k].op.linear for k in chain[1:]):
                        # No relaxation between the input and this node: exact bounds, cheaply in forward mode.
                        al, ah = _affine_bounds(net, src, chain, lower, upper)
                        lo_f, hi_f = torch.maximum(lo_f, al.reshape(n, -1)), torch.minimum(hi_f, ah.reshape(n, -1))
                    elif rows is None or rows.numel() > 0:
                        cl, ch = _node_bounds(net, src, lower, upper, pre, mode, rows)
                        sel = slice(None) if rows is None else rows
                        mask = need[:, sel]
                        lo_f, hi_f = lo_f.clone(), hi_f.clone()
                        lo_f[:, sel] = torch.where(mask, torch.maximum(lo_f[:, sel], cl), lo_f[:, sel])
                        hi_f[:, sel] = torch.where(mask, torch.minimum(hi_f[:, sel], ch), hi_f[:, sel])
                    lo, hi = lo_f.reshape(n, *shape), hi_f.reshape(n, *shape)
                pre[name] = apply_constraints(name, (lo, hi), given=None, splits=splits)
            ins = [pre[name]]
        boxes[name] = node.op.interval(*ins)
    return pre


def crown_bounds(
    net: Network,
    lower: Tensor,
    upper: Tensor,
    C: Tensor,
    *,
    mode: str = "crown",
    splits: dict[str, Tensor] | None = None,
    intermediate: dict[str, Bounds] | None = None,
    reuse_intermediate: bool = False,
    bound_upper: bool = True,
) -> tuple[Tensor, Tensor, dict[str, Bounds]]:
    """CROWN (or DeepPoly, with ``mode="deeppoly"``) bounds of ``C @ net(x)`` over the box.

    Args:
        net: the network.
        lower: ``(N, *input_shape)``.
        upper: ``(N, *input_shape)``.
        C: ``(N, m, K)``.
        mode: relaxation rules.
        splits: ReLU split decisions.
        intermediate: known pre-activation bounds (intersected).
        reuse_intermediate: take the known bounds as they are.
        bound_upper: also compute the upper bounds (else they are ``+inf``), halving the final pass.

    Returns:
        ``(lower (N, m), upper (N, m), pre-activation bounds)``.
    """
    pre = intermediate_bounds(
        net, lower, upper, mode=mode, splits=splits, intermediate=intermediate, reuse_intermediate=reuse_intermediate
    )
    lo, hi = final_bounds(net, lower, upper, C, pre, mode=mode, bound_upper=bound_upper)
    return lo, hi, pre


def final_bounds(
    net: Network,
    lower: Tensor,
    upper: Tensor,
    C: Tensor,
    pre: dict[str, Bounds],
    *,
    mode: str = "crown",
    alphas: dict[str, Tensor] | None = None,
    bound_upper: bool = True,
) -> Bounds:
    """Back-substitute the specification ``C`` ``(N, m, K)`` given the pre-activation bounds ``pre``."""
    n, m = C.shape[:2]
    out_shape = net.output_shape
    A = C.reshape(n, m, *out_shape)
    if bound_upper:
        A = torch.cat([A, -A], 1)
    lb = backsubstitute(net, net.output_name, A, lower, upper, pre, alphas=alphas, mode=mode)
    if bound_upper:
        return lb[:, :m], -lb[:, m:]
    return lb, torch.full_like(lb, float("inf"))
