"""DeepZ: zonotope abstract interpretation (AI²'s zonotope domain with DeepZ's activation transformers).

Gehr, Mirman, Drachsler-Cohen, Tsankov, Chaudhuri, Vechev, "AI²: Safety and Robustness Certification of Neural
Networks with Abstract Interpretation", IEEE S&P 2018; Singh, Gehr, Mirman, Püschel, Vechev, "Fast and Effective
Robustness Certification", NeurIPS 2018 (DeepZ).

Every neuron is an affine form over noise symbols,

    ``z = c + A . (x - m) + E . nu``,   ``x`` in the input set, ``nu`` in ``[-1, 1]^k``,

where ``m`` is the centre of the input box: the input part ``A`` keeps the coefficients on the input itself so
that the input set may be a box (the usual zonotope, generators ``diag(radius)``) or a box ∩ l2/l1 ball (bounded
with the dual norm, see :class:`~bastion.verify.symbolic.InputSet`); ``E`` holds the error symbols created by the
activations, one per neuron that needed one. Transformers:

* affine operators are exact: ``c' = op(c)``, and the linear part of ``op`` (its constant removed, see
  :func:`~bastion.verify.symbolic.linear_part`) applied to every generator, batched;
* ReLU and LeakyReLU (DeepZ's minimal-area parallelogram): on an unstable neuron ``[l, u]`` the slope is the chord
  ``lambda = (f(u) - f(l)) / (u - l)`` (``u / (u - l)`` for ReLU) and ``f(z) - lambda z`` ranges over
  ``[g_min, g_max]`` (its values at ``l``, ``0``, ``u``), so ``f(z) = lambda z + (g_min + g_max)/2 +
  (g_max - g_min)/2 nu_new`` with a fresh symbol; stable neurons are mapped exactly;
* sigmoid and tanh (DeepZ): ``lambda = min(f'(l), f'(u))``, the smallest slope on ``[l, u]``, so ``f(z) - lambda z``
  is non-decreasing and lies in ``[f(l) - lambda l, f(u) - lambda u]``;
* max pooling: a window whose input with the largest lower bound dominates it (that lower bound is at least every
  other upper bound) copies that input's affine form exactly; other windows fall back to their interval box with a
  fresh symbol (as do custom nonlinear operators).

The concrete bounds ``[l, u]`` used by the activations are the zonotope's own range intersected with the IBP box
of the neuron (both are sound, so their intersection is). The final bound on ``C @ f(x)`` is the range of the
affine form ``C z``, also intersected with IBP's.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from bastion.verify.ir import Network, Node
from bastion.verify.ops import BoundOp, LeakyReLUOp, MaxPool2dOp, SigmoidOp, TanhOp
from bastion.verify.symbolic import (
    InputSet,
    gather_windows,
    linear_part,
    max_pool_choice,
    propagate,
    start_input,
    with_ibp,
)

__all__ = ["zonotope_bounds"]

Bounds = tuple[Tensor, Tensor]


@dataclass
class _Zono:
    """Affine form of one node: centre ``c`` (N, *s), input part ``A`` (N, D, *s), error part ``E`` (N, k, *s)."""

    c: Tensor
    A: Tensor
    E: Tensor
    lo: Tensor
    hi: Tensor


def _apply_batched(fn: BoundOp, parts: list[Tensor]) -> Tensor:
    """Apply the linear map ``fn`` to generator tensors ``(N, G, *s)`` (one per input), as one big batch."""
    n, g = parts[0].shape[:2]
    flat = [p.reshape(n * g, *p.shape[2:]) for p in parts]
    out = fn.forward(*flat)
    return out.reshape(n, g, *out.shape[1:])


def _pad(E: Tensor, k: int) -> Tensor:
    if E.shape[1] == k:
        return E
    return torch.cat([E, E.new_zeros(E.shape[0], k - E.shape[1], *E.shape[2:])], 1)


def _range(z: _Zono, region: InputSet, mid: Tensor) -> Bounds:
    """Concrete bounds of the affine form over the input set and the error symbols."""
    n, d = z.A.shape[:2]
    rows = z.A.reshape(n, d, -1).transpose(1, 2)  # (N, P, D)
    shift = (rows * mid.reshape(n, 1, d)).sum(-1)  # A . m
    rows_in = rows.reshape(n, rows.shape[1], *region.lower.shape[1:])
    err = z.E.abs().sum(1).reshape(n, -1)
    c = z.c.reshape(n, -1) - shift
    lo = c + region.min_linear(rows_in) - err
    hi = c + region.max_linear(rows_in) + err
    return lo.reshape(z.c.shape), hi.reshape(z.c.shape)


def _fallback(lo: Tensor, hi: Tensor, d: int, k: int) -> _Zono:
    """The box ``[lo, hi]`` as a zonotope with one fresh symbol per neuron (after the ``k`` existing ones)."""
    n = lo.shape[0]
    mid, rad = (hi + lo) / 2, (hi - lo) / 2
    p = mid[0].numel()
    eye = torch.eye(p, dtype=lo.dtype, device=lo.device).reshape(1, p, *lo.shape[1:])
    E = torch.cat([lo.new_zeros(n, k, *lo.shape[1:]), eye * rad.unsqueeze(1)], 1)
    return _Zono(mid, lo.new_zeros(n, d, *lo.shape[1:]), E, lo, hi)


def _parallelogram(z: _Zono, lam: Tensor, mu: Tensor, beta: Tensor, lo: Tensor, hi: Tensor) -> _Zono:
    """``f(z) = lam z + mu + beta nu_new`` per neuron; new symbols only for neurons with ``beta > 0`` somewhere."""
    n = lam.shape[0]
    c = lam * z.c + mu
    A = lam.unsqueeze(1) * z.A
    E = lam.unsqueeze(1) * z.E
    flat = beta.reshape(n, -1)
    cols = (flat > 0).any(0).nonzero().squeeze(1)
    if cols.numel():
        new = flat.new_zeros(n, cols.numel(), flat.shape[1])
        new.scatter_(2, cols.reshape(1, -1, 1).expand(n, -1, 1), flat[:, cols].unsqueeze(-1))
        E = torch.cat([E, new.reshape(n, cols.numel(), *lam.shape[1:])], 1)
    return _Zono(c, A, E, lo, hi)


def _activation(op: BoundOp, z: _Zono, d: int) -> _Zono:
    l, u = z.lo, z.hi
    out_lo, out_hi = op.interval((l, u))
    if isinstance(op, LeakyReLUOp):
        a = op.slope
        f_l, f_u = op.fn(l), op.fn(u)
        width = u - l
        unstable = (l < 0) & (u > 0)
        stable_slope = torch.where(l >= 0, torch.ones_like(l), torch.full_like(l, a))
        lam = torch.where(unstable, (f_u - f_l) / torch.where(unstable, width, torch.ones_like(width)), stable_slope)
        # f(z) - lam z is piecewise linear with its kink at 0: extremes among l, 0, u (0 is inside when unstable).
        g_l, g_u = f_l - lam * l, f_u - lam * u
        zero = torch.zeros_like(l)
        g_min = torch.where(unstable, torch.minimum(torch.minimum(g_l, g_u), zero), zero)
        g_max = torch.where(unstable, torch.maximum(torch.maximum(g_l, g_u), zero), zero)
        return _parallelogram(z, lam, (g_min + g_max) / 2, (g_max - g_min) / 2, out_lo, out_hi)
    if isinstance(op, (SigmoidOp, TanhOp)):
        lam = torch.minimum(op.df(l), op.df(u))
        g_l, g_u = op.fn(l) - lam * l, op.fn(u) - lam * u
        g_max = torch.maximum(g_l, g_u)  # equal to g_u up to rounding (f - lam z is non-decreasing)
        g_min = torch.minimum(g_l, g_u)
        return _parallelogram(z, lam, (g_min + g_max) / 2, (g_max - g_min) / 2, out_lo, out_hi)
    if isinstance(op, MaxPool2dOp):
        return _max_pool(op, z, out_lo, out_hi, d)
    # Any other operator (custom or element-wise ops without a DeepZ transformer): its box, with one fresh symbol
    # per output neuron.
    return _fallback(out_lo, out_hi, d, z.E.shape[1])


def _max_pool(op: MaxPool2dOp, z: _Zono, out_lo: Tensor, out_hi: Tensor, d: int) -> _Zono:
    """Windows with a dominating input (its lower bound above every other upper bound) copy that input's affine
    form exactly; the others become their box with a fresh symbol."""
    n = out_lo.shape[0]
    src, dominated = max_pool_choice(op, z.lo, z.hi)
    shape = out_lo.shape[1:]

    def pick(t: Tensor) -> Tensor:  # (N, G, *in) -> (N, G, *out) at the chosen inputs
        return gather_windows(t, src, shape)

    box = _fallback(out_lo, out_hi, d, z.E.shape[1])
    dom = dominated.reshape(n, 1, *shape)
    c = torch.where(dom[:, 0], pick(z.c.unsqueeze(1))[:, 0], box.c)
    A = torch.where(dom, pick(z.A), box.A)
    old = torch.where(dom, pick(z.E), box.E[:, : z.E.shape[1]])
    fresh = box.E[:, z.E.shape[1] :] * (~dom).to(box.E.dtype)
    keep = fresh.reshape(n, fresh.shape[1], -1).ne(0).any(-1).any(0)  # drop symbols no window uses
    return _Zono(c, A, torch.cat([old, fresh[:, keep]], 1), out_lo, out_hi)


def zonotope_bounds(
    net: Network,
    lower: Tensor,
    upper: Tensor,
    C: Tensor,
    *,
    region: InputSet | None = None,
) -> tuple[Tensor, Tensor, dict[str, Bounds]]:
    """DeepZ bounds of ``C @ net(x)`` over the input set.

    Args:
        net: the network.
        lower: ``(N, *input_shape)`` lower ends of the input box.
        upper: ``(N, *input_shape)`` upper ends.
        C: ``(N, m, K)`` specification over the flattened outputs.
        region: the input set (defaults to the box ``[lower, upper]``); an :class:`InputSet` with a ball bounds
            over box ∩ l2/l1 ball.

    Returns:
        ``(lower (N, m), upper (N, m), pre-activation bounds of every nonlinear node)``.

    Raises:
        InputError: on inconsistent shapes.
    """
    region, eye = start_input("zonotope_bounds", net, lower, upper, C, region)
    n, d = eye.shape[:2]
    mid = (lower + upper) / 2
    pre: dict[str, Bounds] = {}

    def transfer(node: Node, ins: list[_Zono]) -> _Zono:
        op = node.op
        lin = linear_part(op) if op.linear else None
        if lin is None and op.nonlinear:
            pre[node.name] = (ins[0].lo, ins[0].hi)
            return _activation(op, ins[0], d)
        box = op.interval(*[(z.lo, z.hi) for z in ins])
        if lin is None:
            return _fallback(box[0], box[1], d, max(z.E.shape[1] for z in ins))
        k = max(z.E.shape[1] for z in ins)
        z = _Zono(
            op.forward(*[z.c for z in ins]),
            _apply_batched(lin, [z.A for z in ins]),
            _apply_batched(lin, [_pad(z.E, k) for z in ins]) if k else ins[0].E.new_zeros(n, 0, *node.shape),
            box[0],
            box[1],
        )
        lo, hi = _range(z, region, mid)
        z.lo = torch.maximum(z.lo, lo)
        z.hi = torch.maximum(z.lo, torch.minimum(z.hi, hi))
        return z

    out = propagate(net, _Zono(mid, eye, lower.new_zeros(n, 0, *net.input_shape), lower, upper), transfer)
    k = C.shape[2]
    flat = _Zono(
        (C @ out.c.reshape(n, k, 1)).squeeze(-1),
        (C @ out.A.reshape(n, d, k).transpose(1, 2)).transpose(1, 2),
        (C @ out.E.reshape(n, out.E.shape[1], k).transpose(1, 2)).transpose(1, 2),
        out.lo,
        out.hi,
    )
    lo, hi = _range(flat, region, mid)
    return (*with_ibp(lo, hi, C, out.lo, out.hi), pre)
