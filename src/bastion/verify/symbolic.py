"""Symbolic interval propagation (ReluVal's symbolic intervals).

Wang, Pei, Whitehouse, Yang, Jana, "Formal Security Analysis of Neural Networks using Symbolic Intervals", USENIX
Security 2018 (ReluVal); the same forward propagation is the "DeepSymbol" analysis of Li, Liu, Yang, Zhao, Sun,
Zhang, "Analyzing Deep Neural Networks with Symbolic Propagation", SAS 2019.

Every neuron ``z`` carries two linear functions of the input, a lower equation ``L(x)`` and an upper equation
``U(x)`` with ``L(x) <= z(x) <= U(x)`` for every ``x`` of the input set. They are propagated *forward*:

* through an affine map ``W``: ``L' = W+ L + W- U`` and ``U' = W+ U + W- L`` (``W+``/``W-`` the positive and
  negative parts). Written as centre/radius this is ``W mid -+ |W| rad`` of the equations, which is exactly what
  each affine operator's ``interval`` computes, so the IR's operators are reused unchanged (applied to the
  coefficient tensors with their constant term removed).
* through a ReLU, ReluVal's concretisation rule: with ``[l, u]`` the concrete bounds of ``z``, an inactive neuron
  (``u <= 0``) becomes ``0``, an active one (``l >= 0``) keeps both equations; on an unstable one the lower
  equation becomes the constant 0 and the upper equation is kept if it is non-negative on the whole input set
  (its own minimum ``>= 0``) and concretised to the constant ``u`` otherwise.
* through another monotone element-wise activation (sigmoid, tanh, LeakyReLU with a slope ``>= 0``): its CROWN
  linear bounds ``lw z + lb <= f(z) <= uw z + ub`` on ``[l, u]`` have non-negative slopes, so
  ``lw L + lb`` and ``uw U + ub`` are valid (Neurify-style composition); a negative slope falls back to constants.
* through max pooling, DeepPoly's max transformer on equations: the lower equation of the window input with the
  largest lower bound, and its upper equation when that input dominates the window (a constant otherwise);
* through any other nonlinear operator (custom ops): constant equations from its interval transformer.

Concrete bounds of an equation are its minimum/maximum over the input set, which is a box, optionally intersected
with an l2 or l1 ball (:class:`InputSet`; the ball part is bounded with the dual norm, Zhang et al. 2018). Each
node also keeps its interval-arithmetic (IBP) box and the two are intersected, so every concrete bound here is at
least as tight as IBP's (for ReLU networks this also holds without the intersection: by induction the
concretised equations never leave the IBP box). The cost is ``O(input size)`` times a forward pass per layer.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TypeVar

import torch
from torch import Tensor

from bastion.errors import InputError
from bastion.verify.ibp import spec_interval
from bastion.verify.ir import Network, Node
from bastion.verify.ops import (
    AddOp,
    BoundOp,
    ChannelAffineOp,
    Conv2dOp,
    ElementwiseOp,
    GenericLinearOp,
    LinearOp,
    MaxPool2dOp,
    ReindexOp,
    ReLUOp,
    SubOp,
)

__all__ = ["InputSet", "linear_part", "max_pool_choice", "symbolic_bounds"]

Bounds = tuple[Tensor, Tensor]
State = TypeVar("State")


@dataclass
class InputSet:
    """The input set of a bound computation: a box, optionally intersected with an l_p ball.

    Args:
        lower: ``(N, *input_shape)`` lower ends of the box.
        upper: ``(N, *input_shape)`` upper ends.
        center: ``(N, *input_shape)`` centre of the ball, or None for a box alone.
        eps: ``(N,)`` radius of the ball.
        norm: ``"l2"`` or ``"l1"`` (an l-inf ball is a box; pass it as ``lower``/``upper``).
    """

    lower: Tensor
    upper: Tensor
    center: Tensor | None = None
    eps: Tensor | None = None
    norm: str = "linf"

    def __post_init__(self) -> None:
        if self.center is not None:
            if self.norm not in ("l2", "l1"):
                raise InputError(f"InputSet: the ball norm must be 'l2' or 'l1', got {self.norm!r}")
            if self.eps is None or self.eps.shape != (self.lower.shape[0],):
                raise InputError("InputSet: a ball needs eps of shape (N,)")
            if self.center.shape != self.lower.shape:
                raise InputError(
                    f"InputSet: center {tuple(self.center.shape)} and box {tuple(self.lower.shape)} differ in shape"
                )

    def min_linear(self, A: Tensor) -> Tensor:
        """A lower bound of ``min_x A . x`` over the set: ``A`` ``(N, m, *input_shape)`` -> ``(N, m)``.

        Exact on a box; on box ∩ ball the larger of the box minimum and the ball minimum
        ``A . center - eps ||A||_q`` (``q`` the dual norm), both of which bound the minimum over the intersection.
        """
        lo, hi = self.lower.unsqueeze(1), self.upper.unsqueeze(1)
        box = (A.clamp(min=0) * lo + A.clamp(max=0) * hi).flatten(2).sum(-1)
        if self.center is None or self.eps is None:
            return box
        flat = A.flatten(2)
        dual = flat.norm(dim=-1) if self.norm == "l2" else flat.abs().amax(dim=-1)
        ball = (flat * self.center.flatten(1).unsqueeze(1)).sum(-1) - self.eps.unsqueeze(1) * dual
        return torch.maximum(box, ball)

    def max_linear(self, A: Tensor) -> Tensor:
        """An upper bound of ``max_x A . x`` over the set (see :meth:`min_linear`)."""
        return -self.min_linear(-A)


_BIAS_ATTRS: dict[type, str] = {LinearOp: "bias", Conv2dOp: "bias", ChannelAffineOp: "shift"}
_PURE_LINEAR: tuple[type, ...] = (ReindexOp, GenericLinearOp, AddOp, SubOp)


def linear_part(op: BoundOp) -> BoundOp | None:
    """A copy of an affine operator with its constant term removed (the linear map alone), or None if unknown.

    Known affine operators are the IR's Linear, Conv2d, ChannelAffine (bias/shift zeroed) and the bias-free
    Reindex, GenericLinear, Add and Sub; for them ``interval`` is the centre/radius form, linear in the bounds.
    Unknown (custom) affine operators return None and callers fall back to a sound concretisation.
    """
    kind = type(op)
    if kind in _PURE_LINEAR:
        return op
    attr = _BIAS_ATTRS.get(kind)
    if attr is None:
        return None
    copy = op.to()
    setattr(copy, attr, torch.zeros_like(getattr(op, attr)))
    return copy


def _to_rows(W: Tensor) -> Tensor:
    """``(N, D, *shape)`` equation coefficients -> ``(N, P, D)`` rows, one per neuron."""
    n, d = W.shape[:2]
    return W.reshape(n, d, -1).transpose(1, 2)


def _concretize(region: InputSet, W: Tensor, b: Tensor, *, upper: bool) -> Tensor:
    """Min (or max) of the equations ``W . x + b`` over the input set: ``(N, D, *shape)``, ``(N, *shape)``."""
    rows = _to_rows(W).reshape(W.shape[0], -1, *region.lower.shape[1:])
    val = region.max_linear(rows) if upper else region.min_linear(rows)
    return val.reshape(b.shape) + b


def start_input(
    where: str, net: Network, lower: Tensor, upper: Tensor, C: Tensor, region: InputSet | None
) -> tuple[InputSet, Tensor]:
    """Checks of a forward bound computation's arguments, and its starting point.

    Returns:
        The input set (the box ``[lower, upper]`` unless ``region`` is given) and the coefficients of the input
        on itself, the identity ``(N, D, *input_shape)`` with ``D`` the input size.

    Raises:
        InputError: the box does not have the network's input shape, or ``C`` is not ``(N, m, K)``.
    """
    n = lower.shape[0]
    if tuple(lower.shape[1:]) != net.input_shape or lower.shape != upper.shape:
        raise InputError(f"{where}: the box must have shape (N, *{net.input_shape}), got {tuple(lower.shape)}")
    if C.dim() != 3 or C.shape[0] != n:
        raise InputError(f"{where}: C must be (N, m, K), got {tuple(C.shape)}")
    d = lower[0].numel()
    eye = torch.eye(d, dtype=lower.dtype, device=lower.device).reshape(1, d, *net.input_shape)
    return (region if region is not None else InputSet(lower, upper)), eye.expand(n, *eye.shape[1:])


def propagate(net: Network, start: State, transfer: Callable[[Node, list[State]], State]) -> State:
    """Forward abstract interpretation over the IR: ``transfer(node, input states)`` in topological order.

    Each state is dropped as soon as no later node reads it, since the per-neuron coefficients are the memory
    cost of forward methods. Returns the state of the output node.
    """
    state: dict[str, State] = {net.input_name: start}
    last_use = {i: name for name, node in net.nodes.items() for i in node.inputs}
    for name, node in net.nodes.items():
        if name == net.input_name:
            continue
        state[name] = transfer(node, [state[i] for i in node.inputs])
        for i in node.inputs:
            if last_use.get(i) == name and i != net.output_name:
                state.pop(i, None)
    return state[net.output_name]


def with_ibp(lo: Tensor, hi: Tensor, C: Tensor, out_lo: Tensor, out_hi: Tensor) -> Bounds:
    """Spec bounds ``(lo, hi)`` intersected with interval arithmetic on the output box (both are sound).

    ``hi`` is kept at least ``lo`` so that rounding never gives an empty interval.
    """
    n = out_lo.shape[0]
    ibp_lo, ibp_hi = spec_interval(C, out_lo.reshape(n, -1), out_hi.reshape(n, -1))
    lo, hi = torch.maximum(lo, ibp_lo), torch.minimum(hi, ibp_hi)
    return lo, torch.maximum(lo, hi)


def gather_windows(W: Tensor, src: Tensor, out_shape: Sequence[int]) -> Tensor:
    """Coefficients ``(N, G, *in_shape)`` taken at the flat input positions ``src`` ``(N, O)``: ``(N, G, *out_shape)``.

    Used by max pooling to copy the coefficients of the input chosen in each window.
    """
    n, g = W.shape[:2]
    flat = W.reshape(n, g, -1).gather(2, src.unsqueeze(1).expand(n, g, -1))
    return flat.reshape(n, g, *out_shape)


@dataclass
class _Sym:
    """Symbolic interval of one node: equations on the flattened input and the node's concrete box."""

    Lw: Tensor  # (N, D, *shape)
    Lb: Tensor  # (N, *shape)
    Uw: Tensor
    Ub: Tensor
    lo: Tensor  # (N, *shape)
    hi: Tensor


def _constant(lo: Tensor, hi: Tensor, d: int) -> _Sym:
    zeros = lo.new_zeros(lo.shape[0], d, *lo.shape[1:])
    return _Sym(zeros, lo, zeros, hi, lo, hi)


def _affine(op: BoundOp, ins: list[_Sym], region: InputSet, d: int) -> _Sym:
    n = ins[0].lo.shape[0]
    box = op.interval(*[(s.lo, s.hi) for s in ins])
    lin = linear_part(op)
    if lin is None:
        return _constant(box[0], box[1], d)
    coef = [(s.Lw.reshape(n * d, *s.Lw.shape[2:]), s.Uw.reshape(n * d, *s.Uw.shape[2:])) for s in ins]
    Lw, Uw = lin.interval(*coef)
    Lb, Ub = op.interval(*[(s.Lb, s.Ub) for s in ins])
    Lw, Uw = Lw.reshape(n, d, *Lw.shape[1:]), Uw.reshape(n, d, *Uw.shape[1:])
    lo = torch.maximum(box[0], _concretize(region, Lw, Lb, upper=False))
    hi = torch.minimum(box[1], _concretize(region, Uw, Ub, upper=True))
    return _Sym(Lw, Lb, Uw, Ub, lo, torch.maximum(lo, hi))


def _relu(s: _Sym, region: InputSet) -> _Sym:
    lo, hi = s.lo, s.hi
    zero = torch.zeros_like(lo)
    active, inactive = lo >= 0, hi <= 0
    # Lower equation: kept on active neurons, 0 elsewhere (z >= L and relu(z) >= 0 are both valid lower bounds).
    keep_lo = active.unsqueeze(1)
    Lw = torch.where(keep_lo, s.Lw, torch.zeros_like(s.Lw))
    Lb = torch.where(active, s.Lb, zero)
    # Upper equation: kept where it is non-negative on the whole input set (then relu(z) <= relu(U) = U) or the
    # neuron is active; concretised to its maximum u otherwise; 0 on inactive neurons.
    u_min = _concretize(region, s.Uw, s.Ub, upper=False)
    keep_up = (active | (u_min >= 0)) & ~inactive
    Uw = torch.where(keep_up.unsqueeze(1), s.Uw, torch.zeros_like(s.Uw))
    Ub = torch.where(keep_up, s.Ub, torch.where(inactive, zero, hi.clamp(min=0)))
    return _Sym(Lw, Lb, Uw, Ub, lo.clamp(min=0), hi.clamp(min=0))


def _elementwise(op: ElementwiseOp, s: _Sym, d: int) -> _Sym:
    out_lo, out_hi = op.interval((s.lo, s.hi))
    try:
        lw, lb, uw, ub = op.relax(s.lo, s.hi, None, mode="crown")
    except NotImplementedError:
        return _constant(out_lo, out_hi, d)
    ok_l, ok_u = lw >= 0, uw >= 0
    Lw = torch.where(ok_l.unsqueeze(1), lw.unsqueeze(1) * s.Lw, torch.zeros_like(s.Lw))
    Lb = torch.where(ok_l, lw * s.Lb + lb, out_lo)
    Uw = torch.where(ok_u.unsqueeze(1), uw.unsqueeze(1) * s.Uw, torch.zeros_like(s.Uw))
    Ub = torch.where(ok_u, uw * s.Ub + ub, out_hi)
    return _Sym(Lw, Lb, Uw, Ub, out_lo, out_hi)


def max_pool_choice(op: MaxPool2dOp, lo: Tensor, hi: Tensor) -> tuple[Tensor, Tensor]:
    """Per pooling window, the input with the largest lower bound and whether it dominates its window.

    Args:
        op: the max-pooling operator.
        lo: ``(N, *in_shape)`` lower bounds of its input.
        hi: ``(N, *in_shape)`` upper bounds.

    Returns:
        ``(src, dominated)``, both ``(N, out_numel)``: the flat input index chosen in each window, and True where its
        lower bound is at least every other upper bound of the window (the max then *is* that input).
    """
    n = lo.shape[0]
    safe, valid = op.safe.to(lo.device), op.valid.to(lo.device)
    wl = lo.reshape(n, -1)[:, safe].masked_fill(~valid, float("-inf"))
    wh = hi.reshape(n, -1)[:, safe].masked_fill(~valid, float("-inf"))
    best = wl.argmax(-1, keepdim=True)
    others = wh.scatter(-1, best, float("-inf")).amax(-1)
    dominated = wl.gather(-1, best).squeeze(-1) >= others
    src = safe.unsqueeze(0).expand(n, -1, -1).gather(-1, best).squeeze(-1)
    return src, dominated


def _max_pool(op: MaxPool2dOp, s: _Sym) -> _Sym:
    # y >= x_j >= L_j for the window element j with the largest lower bound; y = x_j <= U_j when j dominates the
    # window, else y <= max upper bound (DeepPoly's max transformer, Singh et al. 2019, on equations).
    out_lo, out_hi = op.interval((s.lo, s.hi))
    src, dominated = max_pool_choice(op, s.lo, s.hi)
    shape = tuple(out_lo.shape[1:])
    n = out_lo.shape[0]
    Lw = gather_windows(s.Lw, src, shape)
    Lb = s.Lb.reshape(n, -1).gather(1, src).reshape(out_lo.shape)
    dom = dominated.reshape(out_lo.shape)
    Uw = torch.where(dom.unsqueeze(1), gather_windows(s.Uw, src, shape), torch.zeros_like(Lw))
    Ub = torch.where(dom, s.Ub.reshape(n, -1).gather(1, src).reshape(out_lo.shape), out_hi)
    return _Sym(Lw, Lb, Uw, Ub, out_lo, out_hi)


def symbolic_bounds(
    net: Network,
    lower: Tensor,
    upper: Tensor,
    C: Tensor,
    *,
    region: InputSet | None = None,
) -> tuple[Tensor, Tensor, dict[str, Bounds]]:
    """Bounds of ``C @ net(x)`` by symbolic interval propagation (ReluVal).

    Args:
        net: the network.
        lower: ``(N, *input_shape)`` lower ends of the input box.
        upper: ``(N, *input_shape)`` upper ends.
        C: ``(N, m, K)`` specification over the flattened outputs.
        region: the input set (defaults to the box ``[lower, upper]``); give an :class:`InputSet` with a ball to
            bound over box ∩ l2/l1 ball.

    Returns:
        ``(lower (N, m), upper (N, m), pre-activation bounds of every nonlinear node)``.

    Raises:
        InputError: on inconsistent shapes.
    """
    region, eye = start_input("symbolic_bounds", net, lower, upper, C, region)
    n, d = eye.shape[:2]
    zero = torch.zeros_like(lower)
    pre: dict[str, Bounds] = {}

    def transfer(node: Node, ins: list[_Sym]) -> _Sym:
        op = node.op
        if op.linear:
            return _affine(op, ins, region, d)
        if not op.nonlinear:
            return _constant(*op.interval(*[(s.lo, s.hi) for s in ins]), d)
        s = ins[0]
        pre[node.name] = (s.lo, s.hi)
        if isinstance(op, ReLUOp):
            return _relu(s, region)
        if isinstance(op, ElementwiseOp):
            return _elementwise(op, s, d)
        if isinstance(op, MaxPool2dOp):
            return _max_pool(op, s)
        return _constant(*op.interval((s.lo, s.hi)), d)

    out = propagate(net, _Sym(eye, zero, eye, zero, lower, upper), transfer)
    k = C.shape[2]
    Cp, Cn = C.clamp(min=0), C.clamp(max=0)
    Lrows, Urows = _to_rows(out.Lw), _to_rows(out.Uw)  # (N, K, D)
    Lb, Ub = out.Lb.reshape(n, k, 1), out.Ub.reshape(n, k, 1)
    spec_Lw = Cp @ Lrows + Cn @ Urows
    spec_Uw = Cp @ Urows + Cn @ Lrows
    spec_Lb = (Cp @ Lb + Cn @ Ub).squeeze(-1)
    spec_Ub = (Cp @ Ub + Cn @ Lb).squeeze(-1)
    shape_in = (n, C.shape[1], *net.input_shape)
    lo = region.min_linear(spec_Lw.reshape(shape_in)) + spec_Lb
    hi = region.max_linear(spec_Uw.reshape(shape_in)) + spec_Ub
    return (*with_ibp(lo, hi, C, out.lo, out.hi), pre)
