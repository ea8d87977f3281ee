"""Interval bound propagation (IBP).

Gowal et al., "On the Effectiveness of Interval Bound Propagation for Training Verifiably Robust Models", arXiv 2018
/ ICCV 2019. Each operator maps an input box to an output box (:meth:`BoundOp.interval`); affine operators use the
centre/radius form ``W c +- |W| r``, which is exact for one affine layer. The specification ``C`` is applied to the
output box in the same centre/radius form. Cheap (one forward pass for lower and upper together) and
differentiable, hence its use in certified training; usually much looser than CROWN on deep networks.
"""

from __future__ import annotations

import torch
from torch import Tensor

from bastion.verify.ir import Network

__all__ = ["apply_constraints", "ibp_bounds", "spec_interval"]

Bounds = tuple[Tensor, Tensor]


def apply_constraints(
    name: str,
    fresh: Bounds | None,
    *,
    given: dict[str, Bounds] | None,
    splits: dict[str, Tensor] | None,
) -> Bounds:
    """Combine freshly computed pre-activation bounds of a nonlinear node with given bounds and a split.

    Args:
        name: the nonlinear node.
        fresh: bounds just computed (None to use the given ones alone).
        given: pre-activation bounds known to hold (e.g. from the parent BaB domain); intersected.
        splits: per-neuron split decisions: +1 forces ``x >= 0``, -1 forces ``x <= 0``.

    Returns:
        ``(lo, hi)`` valid on the (restricted) domain; ``lo <= hi`` is kept even on an empty domain, where any bound
        is vacuously sound.
    """
    if fresh is None:
        if given is None or name not in given:
            raise KeyError(name)
        lo, hi = given[name]
    else:
        lo, hi = fresh
        if given is not None and name in given:
            glo, ghi = given[name]
            lo, hi = torch.maximum(lo, glo), torch.minimum(hi, ghi)
    if splits is not None and name in splits:
        s = splits[name]
        zero = torch.zeros_like(lo)
        lo = torch.where(s > 0, torch.maximum(lo, zero), lo)
        hi = torch.where(s < 0, torch.minimum(hi, zero), hi)
    return lo, torch.maximum(hi, lo)


def spec_interval(C: Tensor, lo: Tensor, hi: Tensor) -> Bounds:
    """Bounds of ``C @ y`` over the box ``lo <= y <= hi``: ``C`` ``(N, m, K)``, ``lo``/``hi`` ``(N, K)``."""
    mid, rad = ((hi + lo) / 2).unsqueeze(-1), ((hi - lo) / 2).unsqueeze(-1)
    c = (C @ mid).squeeze(-1)
    r = (C.abs() @ rad).squeeze(-1)
    return c - r, c + r


def ibp_bounds(
    net: Network,
    lower: Tensor,
    upper: Tensor,
    C: Tensor,
    *,
    splits: dict[str, Tensor] | None = None,
    intermediate: dict[str, Bounds] | None = None,
    reuse_intermediate: bool = False,
) -> tuple[Tensor, Tensor, dict[str, Bounds]]:
    """Interval bounds of ``C @ net(x)`` over the box ``[lower, upper]``.

    Args:
        net: the network.
        lower: ``(N, *input_shape)``.
        upper: ``(N, *input_shape)``.
        C: ``(N, m, K)`` specification.
        splits: ReLU split decisions (see :func:`apply_constraints`).
        intermediate: known pre-activation bounds, intersected with the computed ones.
        reuse_intermediate: take the given pre-activation bounds as they are instead of recomputing.

    Returns:
        ``(lower (N, m), upper (N, m), pre-activation bounds per nonlinear node)``.
    """
    boxes: dict[str, Bounds] = {net.input_name: (lower, upper)}
    pre: dict[str, Bounds] = {}
    for name, node in net.nodes.items():
        if name == net.input_name:
            continue
        ins = [boxes[i] for i in node.inputs]
        if node.op.nonlinear:
            fresh = None if reuse_intermediate and intermediate is not None and name in intermediate else ins[0]
            pre[name] = apply_constraints(name, fresh, given=intermediate, splits=splits)
            ins = [pre[name]]
        boxes[name] = node.op.interval(*ins)
    lo, hi = boxes[net.output_name]
    n = lower.shape[0]
    lo_s, hi_s = spec_interval(C, lo.reshape(n, -1), hi.reshape(n, -1))
    return lo_s, hi_s, pre
