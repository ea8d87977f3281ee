"""Bound operators: one class per primitive of the verification IR.

Every operator of :class:`bastion.verify.ir.Network` is a :class:`BoundOp` implementing, in one place,

* ``forward(*xs)`` -- batched concrete evaluation;
* ``interval(*bounds)`` -- interval bound propagation (sound; exact for a single affine op via centre/radius);
* for affine operators (:class:`LinearBoundOp`), ``backward(A)`` -- the back-substitution step of CROWN: given the
  coefficients ``A`` of shape ``(N, m, *out_shape)`` of a linear function of this op's output, return the
  coefficients on each input ``(N, m, *in_shape)`` and the constant term ``(N, m)``;
* for nonlinear operators (:class:`NonlinearBoundOp`), ``backward_bound(A, lo, hi)`` -- the same step through a
  sound linear relaxation on the pre-activation box ``[lo, hi]`` that yields a *lower* bound of ``A @ y``;
  element-wise operators get it from ``relax(lo, hi, alpha)`` (linear lower and upper bounds).

This is the operator split of auto_LiRPA (Xu et al., "Automatic Perturbation Analysis for Scalable Certified
Robustness and Beyond", NeurIPS 2020): bound methods (IBP, CROWN, alpha-CROWN, DeepPoly) are loops over the IR that
call these methods and never special-case an operator. Custom operators are added with :func:`register_op`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from bastion.errors import InputError

__all__ = [
    "OP_REGISTRY",
    "AddOp",
    "BoundOp",
    "ChannelAffineOp",
    "Conv2dOp",
    "ElementwiseOp",
    "GenericLinearOp",
    "InputOp",
    "LeakyReLUOp",
    "LinearBoundOp",
    "LinearOp",
    "MaxPool2dOp",
    "NonlinearBoundOp",
    "ReLUOp",
    "ReindexOp",
    "SigmoidOp",
    "SubOp",
    "TanhOp",
    "register_op",
]

Bounds = tuple[Tensor, Tensor]


def _bcast(t: Tensor, like: Tensor) -> Tensor:
    """Insert the spec dimension (dim 1) into a per-sample tensor ``(N, *shape)`` unless it already has it."""
    return t if t.dim() == like.dim() else t.unsqueeze(1)


def _sum_tail(t: Tensor) -> Tensor:
    """Sum a ``(N, m, *shape)`` tensor over ``shape``."""
    return t.flatten(2).sum(-1)


class BoundOp:
    """Base class of every IR operator.

    Subclasses store their constants as tensor attributes (or tuples of tensors) so that :meth:`to` can move them.
    """

    #: True for affine operators (have :meth:`LinearBoundOp.backward`).
    linear: bool = False
    #: True for operators that need a relaxation (have :meth:`NonlinearBoundOp.backward_bound`).
    nonlinear: bool = False

    def forward(self, *xs: Tensor) -> Tensor:
        """Evaluate the operator on batched inputs."""
        raise NotImplementedError

    def interval(self, *bounds: Bounds) -> Bounds:
        """Propagate an interval ``(lo, hi)`` per input; returns a sound ``(lo, hi)`` on the output."""
        raise NotImplementedError

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> BoundOp:
        """Return a copy whose floating-point constants are on ``device`` with ``dtype``."""
        new = object.__new__(type(self))
        for key, value in vars(self).items():
            if isinstance(value, Tensor):
                value = value.to(device=device, dtype=dtype if value.is_floating_point() else None)
            elif isinstance(value, tuple) and value and all(isinstance(v, Tensor) for v in value):
                value = tuple(v.to(device=device, dtype=dtype if v.is_floating_point() else None) for v in value)
            setattr(new, key, value)
        return new

    def __repr__(self) -> str:
        return type(self).__name__


class InputOp(BoundOp):
    """The network input (a leaf of the graph)."""

    def forward(self, *xs: Tensor) -> Tensor:
        return xs[0]

    def interval(self, *bounds: Bounds) -> Bounds:
        return bounds[0]


# ---------------------------------------------------------------------------------------------------------------
# Affine operators
# ---------------------------------------------------------------------------------------------------------------


class LinearBoundOp(BoundOp):
    """An affine operator; :meth:`backward` is the exact back-substitution step."""

    linear = True

    def backward(self, A: Tensor) -> tuple[list[Tensor], Tensor]:
        """Map coefficients ``A`` ``(N, m, *out_shape)`` on the output to coefficients on each input and a constant.

        Args:
            A: coefficients of a linear function of this operator's output.

        Returns:
            ``([A_in for each input], bias)`` with ``A_in`` of shape ``(N, m, *in_shape)`` and ``bias`` ``(N, m)``,
            such that ``A . out = sum_i A_in_i . in_i + bias`` for every input.
        """
        raise NotImplementedError


class LinearOp(LinearBoundOp):
    """``y = x @ W.T + b`` on the last dimension (``nn.Linear``, ``F.linear``, ``x @ W``).

    Args:
        weight: ``(out_features, in_features)``.
        bias: ``(out_features,)`` or None.
    """

    def __init__(self, weight: Tensor, bias: Tensor | None) -> None:
        self.weight = weight
        self.bias = bias if bias is not None else torch.zeros(weight.shape[0], dtype=weight.dtype, device=weight.device)

    def forward(self, *xs: Tensor) -> Tensor:
        return F.linear(xs[0], self.weight, self.bias)

    def interval(self, *bounds: Bounds) -> Bounds:
        lo, hi = bounds[0]
        mid, rad = (hi + lo) / 2, (hi - lo) / 2
        c = F.linear(mid, self.weight, self.bias)
        r = F.linear(rad, self.weight.abs())
        return c - r, c + r

    def backward(self, A: Tensor) -> tuple[list[Tensor], Tensor]:
        # A (N, m, ..., out) -> (N, m, ..., in); the bias is summed over every position the layer is applied to.
        return [A @ self.weight], _sum_tail(A * self.bias)


class Conv2dOp(LinearBoundOp):
    """2-D convolution with zero padding (``nn.Conv2d``, ``F.conv2d``); back-substitution by transposed convolution.

    Args:
        weight: ``(C_out, C_in / groups, kh, kw)``.
        bias: ``(C_out,)`` or None.
        stride, padding, dilation, groups: as in ``F.conv2d`` (padding numeric, symmetric).
        in_shape: ``(C_in, H, W)`` of the input, needed to size the transposed convolution.
    """

    def __init__(
        self,
        weight: Tensor,
        bias: Tensor | None,
        *,
        stride: tuple[int, int],
        padding: tuple[int, int],
        dilation: tuple[int, int],
        groups: int,
        in_shape: tuple[int, ...],
    ) -> None:
        self.weight = weight
        self.bias = bias if bias is not None else torch.zeros(weight.shape[0], dtype=weight.dtype, device=weight.device)
        self.stride, self.padding, self.dilation, self.groups = stride, padding, dilation, groups
        self.in_shape = tuple(in_shape)
        out = self.forward(torch.zeros((1, *self.in_shape), dtype=weight.dtype, device=weight.device))
        self.out_shape = tuple(out.shape[1:])
        # The transposed convolution can produce an output a few pixels short when the stride does not divide the
        # input; output_padding restores the input size (those pixels have zero coefficients).
        kh, kw = weight.shape[2:]
        self.output_padding = tuple(
            self.in_shape[1 + i]
            - ((self.out_shape[1 + i] - 1) * stride[i] - 2 * padding[i] + dilation[i] * ((kh, kw)[i] - 1) + 1)
            for i in range(2)
        )

    def forward(self, *xs: Tensor) -> Tensor:
        return F.conv2d(xs[0], self.weight, self.bias, self.stride, self.padding, self.dilation, self.groups)

    def interval(self, *bounds: Bounds) -> Bounds:
        lo, hi = bounds[0]
        mid, rad = (hi + lo) / 2, (hi - lo) / 2
        c = self.forward(mid)
        r = F.conv2d(rad, self.weight.abs(), None, self.stride, self.padding, self.dilation, self.groups)
        return c - r, c + r

    def backward(self, A: Tensor) -> tuple[list[Tensor], Tensor]:
        n, m = A.shape[:2]
        flat = A.reshape(n * m, *self.out_shape)
        bias = (A.flatten(3).sum(-1) * self.bias).sum(-1)
        kh, kw = self.weight.shape[2:]
        full = tuple(self.dilation[i] * ((kh, kw)[i] - 1) - self.padding[i] for i in range(2))
        if self.stride == (1, 1) and self.groups == 1 and self.output_padding == (0, 0) and min(full) >= 0:
            # With unit stride the transposed convolution is a plain convolution with the flipped, channel-swapped
            # kernel, which PyTorch's CPU kernels run about twice as fast.
            flipped = self.weight.flip(2, 3).transpose(0, 1)
            back = F.conv2d(flat, flipped, None, 1, full, self.dilation)
            return [back.reshape(n, m, *self.in_shape)], bias
        back = F.conv_transpose2d(
            flat,
            self.weight,
            None,
            self.stride,
            self.padding,
            self.output_padding,  # type: ignore[arg-type]
            self.groups,
            self.dilation,
        )
        return [back.reshape(n, m, *self.in_shape)], bias

    def backward_window(self, t: Tensor, y0: int, x0: int) -> tuple[list[tuple[Tensor, int, int]], Tensor] | None:
        """:meth:`backward` for coefficients that are zero outside a window of the output.

        Args:
            t: ``(N, m, C_out, h, w)`` coefficients on output rows ``y0:y0+h`` and columns ``x0:x0+w``.
            y0: first row of the window.
            x0: first column.

        Returns:
            ``([(t_in, y0_in, x0_in)], bias)``: the coefficients on the window of the input that the output window
            reads (clipped to the image; reads of the zero padding are dropped), or None when not applicable.
        """
        if len(self.in_shape) != 3:
            return None
        n, m, c, h, w = t.shape
        flat = t.reshape(n * m, c, h, w)
        if self.stride == (1, 1) and self.groups == 1:
            # As in backward: a unit-stride transposed convolution (here without padding, the full output) is a plain
            # convolution with the flipped kernel, much faster on CPU.
            kh, kw = self.weight.shape[2:]
            full = (self.dilation[0] * (kh - 1), self.dilation[1] * (kw - 1))
            res = F.conv2d(flat, self.weight.flip(2, 3).transpose(0, 1), None, 1, full, self.dilation)
        else:
            res = F.conv_transpose2d(flat, self.weight, None, self.stride, 0, 0, self.groups, self.dilation)
        # res[..., 0, 0] is input pixel (y0 * stride - padding, x0 * stride - padding), possibly in the padding.
        sy, sx = y0 * self.stride[0] - self.padding[0], x0 * self.stride[1] - self.padding[1]
        big_h, big_w = self.in_shape[1:]
        ly, lx = max(0, -sy), max(0, -sx)
        hy, hx = min(res.shape[-2], big_h - sy), min(res.shape[-1], big_w - sx)
        if hy <= ly or hx <= lx:
            return None
        t_in = res[..., ly:hy, lx:hx].reshape(n, m, self.in_shape[0], hy - ly, hx - lx)
        bias = (t.sum((-2, -1)) * self.bias).sum(-1)
        return [(t_in, sy + ly, sx + lx)], bias


class ChannelAffineOp(LinearBoundOp):
    """Element-wise ``y = x * scale + shift`` with constants broadcast to the per-sample shape.

    Used for BatchNorm that cannot be folded, :class:`bastion.models.Normalize`, and add/sub/mul/div/neg by a
    constant.

    Args:
        scale: tensor broadcastable to the per-sample shape (no batch dimension).
        shift: tensor broadcastable to the per-sample shape.
    """

    def __init__(self, scale: Tensor, shift: Tensor) -> None:
        self.scale = scale
        self.shift = shift

    def forward(self, *xs: Tensor) -> Tensor:
        return xs[0] * self.scale + self.shift

    def interval(self, *bounds: Bounds) -> Bounds:
        lo, hi = bounds[0]
        c = (hi + lo) / 2 * self.scale + self.shift
        r = (hi - lo) / 2 * self.scale.abs()
        return c - r, c + r

    def backward(self, A: Tensor) -> tuple[list[Tensor], Tensor]:
        shape = A.shape[2:]
        return [A * self.scale.expand(shape)], _sum_tail(A * self.shift.expand(shape))

    def backward_window(self, t: Tensor, y0: int, x0: int) -> tuple[list[tuple[Tensor, int, int]], Tensor] | None:
        """:meth:`backward` on a window of a ``(C, H, W)`` tensor (see :meth:`Conv2dOp.backward_window`)."""
        h, w = t.shape[-2:]

        def crop(v: Tensor) -> Tensor:
            # Broadcasting aligns the constant's last two dims with (H, W); only extents > 1 need cropping.
            if v.dim() >= 1 and v.shape[-1] > 1:
                v = v[..., x0 : x0 + w]
            if v.dim() >= 2 and v.shape[-2] > 1:
                v = v[..., y0 : y0 + h, :]
            return v

        if self.scale.dim() > 3 or self.shift.dim() > 3:
            return None
        scale, shift = crop(self.scale), crop(self.shift)
        return [(t * scale, y0, x0)], _sum_tail(t * shift.expand(t.shape[2:]))


class ReindexOp(LinearBoundOp):
    """A pure re-indexing of the per-sample tensor (reshape, view, flatten, permute, transpose, squeeze, ...).

    Back-substitution scatters the coefficients back through an index map computed once from ``fn``.

    Args:
        fn: the batched re-indexing, ``x (N, *in_shape) -> (N, *out_shape)``; must not move the batch dimension.
        in_shape: per-sample input shape.
        description: what the op is (for ``repr``).
    """

    def __init__(self, fn: Callable[[Tensor], Tensor], in_shape: tuple[int, ...], description: str = "") -> None:
        self.fn = fn
        self.in_shape = tuple(in_shape)
        numel = 1
        for d in in_shape:
            numel *= d
        self.in_numel = numel
        # index[j] = flat input position read by flat output position j.
        index = fn(torch.arange(numel).reshape(1, *in_shape))
        self.out_shape = tuple(index.shape[1:])
        self.index = index.reshape(-1)
        self.description = description

    def forward(self, *xs: Tensor) -> Tensor:
        return self.fn(xs[0])

    def interval(self, *bounds: Bounds) -> Bounds:
        lo, hi = bounds[0]
        return self.fn(lo), self.fn(hi)

    def backward(self, A: Tensor) -> tuple[list[Tensor], Tensor]:
        n, m = A.shape[:2]
        flat = A.reshape(n, m, -1)
        out = flat.new_zeros(n, m, self.in_numel).index_add(2, self.index, flat)
        return [out.reshape(n, m, *self.in_shape)], flat.new_zeros(n, m)

    def __repr__(self) -> str:
        return f"ReindexOp({self.description})"


class GenericLinearOp(LinearBoundOp):
    """Any affine map given as a function, back-substituted with a vector-Jacobian product.

    ``y = fn(x, *consts)`` must be linear in ``x`` (no offset); ``abs_fn(r, *consts)`` must apply the same map with
    absolute-valued weights (used for the IBP radius). Covers average pooling and matrix products with a constant
    on the left.

    Args:
        fn: the linear map, batched.
        abs_fn: the map with ``|weights|``.
        consts: constant tensors passed to both functions (moved by :meth:`to`).
        in_shape: per-sample input shape.
        description: for ``repr``.
    """

    def __init__(
        self,
        fn: Callable[..., Tensor],
        abs_fn: Callable[..., Tensor],
        consts: tuple[Tensor, ...],
        in_shape: tuple[int, ...],
        description: str = "",
    ) -> None:
        self.fn, self.abs_fn, self.consts = fn, abs_fn, consts
        self.in_shape = tuple(in_shape)
        self.description = description

    def forward(self, *xs: Tensor) -> Tensor:
        return self.fn(xs[0], *self.consts)

    def interval(self, *bounds: Bounds) -> Bounds:
        lo, hi = bounds[0]
        c = self.fn((hi + lo) / 2, *self.consts)
        r = self.abs_fn((hi - lo) / 2, *self.consts)
        return c - r, c + r

    def backward(self, A: Tensor) -> tuple[list[Tensor], Tensor]:
        n, m = A.shape[:2]
        flat = A.reshape(n * m, *A.shape[2:])
        x0 = flat.new_zeros(n * m, *self.in_shape)
        # The map is linear, so its VJP at any point is the adjoint; differentiable in A for alpha-CROWN.
        vjp_fn = torch.func.vjp(lambda x: self.fn(x, *self.consts), x0)[1]
        back = vjp_fn(flat)[0]
        return [back.reshape(n, m, *self.in_shape)], flat.new_zeros(n, m)

    def __repr__(self) -> str:
        return f"GenericLinearOp({self.description})"


class AddOp(LinearBoundOp):
    """Sum of two IR tensors of the same shape (residual connections)."""

    def forward(self, *xs: Tensor) -> Tensor:
        return xs[0] + xs[1]

    def interval(self, *bounds: Bounds) -> Bounds:
        (l1, h1), (l2, h2) = bounds
        return l1 + l2, h1 + h2

    def backward(self, A: Tensor) -> tuple[list[Tensor], Tensor]:
        return [A, A], A.new_zeros(A.shape[:2])

    def backward_window(self, t: Tensor, y0: int, x0: int) -> tuple[list[tuple[Tensor, int, int]], Tensor] | None:
        """:meth:`backward` on a window (see :meth:`Conv2dOp.backward_window`)."""
        return [(t, y0, x0), (t, y0, x0)], t.new_zeros(t.shape[:2])


class SubOp(LinearBoundOp):
    """Difference of two IR tensors of the same shape."""

    def forward(self, *xs: Tensor) -> Tensor:
        return xs[0] - xs[1]

    def interval(self, *bounds: Bounds) -> Bounds:
        (l1, h1), (l2, h2) = bounds
        return l1 - h2, h1 - l2

    def backward(self, A: Tensor) -> tuple[list[Tensor], Tensor]:
        return [A, -A], A.new_zeros(A.shape[:2])

    def backward_window(self, t: Tensor, y0: int, x0: int) -> tuple[list[tuple[Tensor, int, int]], Tensor] | None:
        """:meth:`backward` on a window (see :meth:`Conv2dOp.backward_window`)."""
        return [(t, y0, x0), (-t, y0, x0)], t.new_zeros(t.shape[:2])


# ---------------------------------------------------------------------------------------------------------------
# Nonlinear operators
# ---------------------------------------------------------------------------------------------------------------


class NonlinearBoundOp(BoundOp):
    """An operator bounded through a linear relaxation on its (single) input's box."""

    nonlinear = True
    #: True when the relaxation has free parameters that alpha-CROWN may optimise (ReLU's lower slope, the tangent
    #: points of sigmoid/tanh), valid in ``alpha_bounds()``; ``alpha_init(lo, hi)``, when defined, gives CROWN's.
    has_alpha: bool = False

    def bound_mask(self, lo: Tensor, hi: Tensor) -> Tensor:
        """Which input neurons ``(N, P)`` (flattened) have a relaxation that depends on their bounds.

        Bound methods refine intermediate bounds only there; by default every neuron. Args are ``(N, P)``.
        """
        return torch.ones_like(lo, dtype=torch.bool)

    def backward_bound(
        self, A: Tensor, lo: Tensor, hi: Tensor, *, alpha: Tensor | None = None, mode: str = "crown"
    ) -> tuple[Tensor, Tensor]:
        """Back-substitute ``A`` through a relaxation valid on ``[lo, hi]``, for a *lower* bound of ``A . y``.

        Args:
            A: ``(N, m, *out_shape)`` coefficients on the output.
            lo: ``(N, *in_shape)`` lower bounds of the input.
            hi: ``(N, *in_shape)`` upper bounds of the input.
            alpha: free relaxation parameters ``(N, m, *parameter shape)`` (alpha-CROWN), or None for CROWN's.
            mode: ``"crown"`` or ``"deeppoly"`` relaxation rules.

        Returns:
            ``(A_in, bias)`` with ``A . y >= A_in . x + bias`` for every ``x`` in the box.
        """
        raise NotImplementedError


class ElementwiseOp(NonlinearBoundOp):
    """An element-wise activation with linear lower/upper bounds from :meth:`relax`."""

    def fn(self, x: Tensor) -> Tensor:
        raise NotImplementedError

    def forward(self, *xs: Tensor) -> Tensor:
        return self.fn(xs[0])

    def interval(self, *bounds: Bounds) -> Bounds:
        # Monotone activations; overridden where not monotone.
        lo, hi = bounds[0]
        return self.fn(lo), self.fn(hi)

    def relax(
        self, lo: Tensor, hi: Tensor, alpha: Tensor | None = None, *, mode: str = "crown"
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Linear bounds ``lw * x + lb <= f(x) <= uw * x + ub`` valid for ``x`` in ``[lo, hi]``.

        Args:
            lo: lower bounds ``(N, *shape)``.
            hi: upper bounds ``(N, *shape)``.
            alpha: free relaxation parameters (only used by operators with ``has_alpha``), ``(N, m, *parameter
                shape)``; the
                returned ``lw``/``lb`` then carry the ``m`` dimension.
            mode: ``"crown"`` (Zhang et al. 2018) or ``"deeppoly"`` (Singh et al. 2019).

        Returns:
            ``(lw, lb, uw, ub)``.
        """
        raise NotImplementedError

    def backward_bound(
        self, A: Tensor, lo: Tensor, hi: Tensor, *, alpha: Tensor | None = None, mode: str = "crown"
    ) -> tuple[Tensor, Tensor]:
        lw, lb, uw, ub = self.relax(lo, hi, alpha, mode=mode)
        pos, neg = A.clamp(min=0), A.clamp(max=0)
        lw, lb, uw, ub = (_bcast(t, A) for t in (lw, lb, uw, ub))
        return pos * lw + neg * uw, _sum_tail(pos * lb + neg * ub)

    def backward_bound_window(
        self, t: Tensor, y0: int, x0: int, lo: Tensor, hi: Tensor, *, mode: str = "crown"
    ) -> tuple[Tensor, int, int, Tensor] | None:
        """:meth:`backward_bound` for coefficients ``t`` ``(N, m, C, h, w)`` on a window of a ``(C, H, W)`` tensor.

        Args:
            t: the coefficients on rows ``y0:y0+h``, columns ``x0:x0+w`` of the output (zero elsewhere).
            y0: first row.
            x0: first column.
            lo: ``(N, C, H, W)`` input lower bounds (whole tensor).
            hi: input upper bounds.
            mode: relaxation rules.

        Returns:
            ``(t_in, y0_in, x0_in, bias)``, or None when not applicable.
        """
        if lo.dim() != 4:
            return None
        h, w = t.shape[-2:]
        a_in, bias = self.backward_bound(
            t, lo[..., y0 : y0 + h, x0 : x0 + w], hi[..., y0 : y0 + h, x0 : x0 + w], mode=mode
        )
        return a_in, y0, x0, bias


class LeakyReLUOp(ElementwiseOp):
    """``max(x, 0) + slope * min(x, 0)`` for ``slope <= 1`` (convex); ReLU is ``slope = 0``.

    Relaxation (Zhang et al., "Efficient Neural Network Robustness Certification with General Activation
    Functions", NeurIPS 2018): on an unstable neuron ``lo < 0 < hi`` the upper bound is the chord and the lower bound a
    line through the origin with slope in ``[slope, 1]``: the adaptive choice ``1 if hi > -lo else slope`` (CROWN-Ada,
    identical to DeepPoly's area rule), or ``alpha`` when optimised (alpha-CROWN).

    Args:
        slope: the negative slope (``negative_slope`` of ``nn.LeakyReLU``).
    """

    has_alpha = True

    def __init__(self, slope: float = 0.01) -> None:
        if not slope <= 1.0:
            raise InputError(f"LeakyReLU: negative_slope must be <= 1 (a convex activation), got {slope}")
        self.slope = float(slope)

    def fn(self, x: Tensor) -> Tensor:
        return F.leaky_relu(x, self.slope) if self.slope != 0.0 else torch.relu(x)

    def interval(self, *bounds: Bounds) -> Bounds:
        lo, hi = bounds[0]
        flo, fhi = self.fn(lo), self.fn(hi)
        if self.slope >= 0:
            return flo, fhi
        # Convex but not monotone: the minimum is at the clamp of 0 into the box, the maximum at an end.
        return self.fn(torch.minimum(torch.maximum(lo, torch.zeros_like(lo)), hi)), torch.maximum(flo, fhi)

    def relax(
        self, lo: Tensor, hi: Tensor, alpha: Tensor | None = None, *, mode: str = "crown"
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        a = self.slope
        active, inactive = lo >= 0, hi <= 0
        unstable = ~(active | inactive)
        one, slope = torch.ones_like(lo), torch.full_like(lo, a)
        width = (hi - lo).clamp(min=1e-12)
        stable_w = torch.where(active, one, slope)
        uw = torch.where(unstable, (hi - a * lo) / width, stable_w)
        ub = torch.where(unstable, hi - uw * hi, torch.zeros_like(lo))
        if alpha is None:
            lw = torch.where(unstable, torch.where(hi > -lo, one, slope), stable_w)
        else:
            lw = torch.where(unstable.unsqueeze(1), alpha.clamp(min=min(a, 1.0), max=1.0), stable_w.unsqueeze(1))
        lb = torch.zeros_like(lo)
        return lw, lb, uw, ub

    def backward_bound(
        self, A: Tensor, lo: Tensor, hi: Tensor, *, alpha: Tensor | None = None, mode: str = "crown"
    ) -> tuple[Tensor, Tensor]:
        # Same result as ElementwiseOp.backward_bound with fewer passes over A (the costliest tensor of CROWN on
        # conv layers): the lower line has no offset, and the upper-line offsets are summed by a batched product.
        lw, _, uw, ub = self.relax(lo, hi, alpha, mode=mode)
        n, m = A.shape[:2]
        a_in = torch.where(A >= 0, _bcast(lw, A), _bcast(uw, A)) * A
        bias = torch.bmm(A.clamp(max=0).reshape(n, m, -1), ub.reshape(n, -1, 1)).squeeze(-1)
        return a_in, bias

    def bound_mask(self, lo: Tensor, hi: Tensor) -> Tensor:
        # A stable neuron is relaxed exactly (identity or the negative slope) whatever its bounds.
        return (lo < 0) & (hi > 0)

    def alpha_bounds(self) -> tuple[float, float]:
        """The interval of valid lower slopes on unstable neurons."""
        return self.slope, 1.0

    def __repr__(self) -> str:
        return f"LeakyReLUOp(slope={self.slope})"


class ReLUOp(LeakyReLUOp):
    """``max(x, 0)``; see :class:`LeakyReLUOp` for the relaxation (slope 0)."""

    def __init__(self) -> None:
        super().__init__(0.0)

    def __repr__(self) -> str:
        return "ReLUOp"


def _tangent_points(
    f_df: Callable[[Tensor], tuple[Tensor, Tensor]], lo: Tensor, cap: Tensor, iters: int = 30
) -> Tensor:
    """For an S-shaped ``f`` (concave on x>=0), a point ``d in [0, cap]`` whose tangent lies above ``(lo, f(lo))``.

    ``h(d) = T_d(lo) - f(lo)`` grows with ``d >= 0`` when ``lo <= d``, so bisection finds the root; the end kept is
    the one where ``h >= 0`` was checked (``cap`` itself when no point of ``[0, cap]`` qualifies). ``f_df(x)``
    returns ``(f(x), f'(x))``; adding a constant to ``f`` changes nothing.
    """
    flo = f_df(lo)[0]
    d_lo = torch.zeros_like(lo)
    d_hi = cap
    for _ in range(iters):
        d = (d_lo + d_hi) / 2
        fd, dfd = f_df(d)
        ok = fd + dfd * (lo - d) >= flo
        d_hi = torch.where(ok, d, d_hi)
        d_lo = torch.where(ok, d_lo, d)
    return d_hi


def _s_upper(
    f: Callable[[Tensor], Tensor],
    df: Callable[[Tensor], Tensor],
    lo: Tensor,
    hi: Tensor,
    d0: Tensor,
    t: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Upper line ``(w, b)`` of an S-shaped ``f`` (convex on x<=0, concave on x>=0) over ``[lo, hi]``.

    CROWN's rule: chord when the box is in the convex part or when the chord is above ``f`` (``f'(hi) >= chord
    slope``); tangent at the midpoint in the concave part; otherwise the tangent at ``d0 in [0, hi]`` that passes
    through ``(lo, f(lo))`` (:func:`_tangent_points` with ``cap = max(hi, 0)``).

    With ``t`` (``(N, m, *shape)``, values in ``[0, 1]``) the tangent point is free, as in alpha-CROWN's sigmoid and
    tanh relaxations: ``d = lo + t (hi - lo)`` in the concave part (every tangent there lies above the concave
    ``f``), and ``d = d0 + t (hi - d0)`` in the mixed case. There every such tangent is valid: on ``[0, hi]`` by
    concavity; on ``[lo, 0]`` the gap ``T_d - f`` is concave (a line minus a convex function), so it is smallest at
    ``lo`` or ``0``, and ``T_d(lo) - f(lo)`` grows with ``d`` from ``d0``, where it is ``>= 0``. ``t = 1/2``
    (concave) and ``t = 0`` (mixed) reproduce CROWN's lines; the chord cases have no parameter. The returned line
    then has the ``m`` dimension.
    """
    width = hi - lo
    degenerate = width <= 1e-12
    flo, fhi = f(lo), f(hi)
    k = torch.where(degenerate, df(lo), (fhi - flo) / torch.where(degenerate, torch.ones_like(width), width))
    chord_b = flo - k * lo
    use_chord = (hi <= 0) | degenerate | ((lo < 0) & (df(hi) >= k))
    use_tangent = (lo >= 0) & ~degenerate
    if t is None:
        mid = (lo + hi) / 2
        tan_w, thr_w = df(mid), df(d0)
        tan_b, thr_b = f(mid) - tan_w * mid, f(d0) - thr_w * d0
        w = torch.where(use_chord, k, torch.where(use_tangent, tan_w, thr_w))
        b = torch.where(use_chord, chord_b, torch.where(use_tangent, tan_b, thr_b))
        return w, b
    start = torch.where(use_tangent, lo, d0).unsqueeze(1)
    d = start + t.clamp(0.0, 1.0) * (hi.unsqueeze(1) - start)
    tan_w = df(d)
    tan_b = f(d) - tan_w * d
    chord = use_chord.unsqueeze(1)
    return torch.where(chord, k.unsqueeze(1), tan_w), torch.where(chord, chord_b.unsqueeze(1), tan_b)


def _s_init(lo: Tensor, hi: Tensor) -> Tensor:
    """The tangent parameter ``t`` of :func:`_s_upper` that gives CROWN's upper line on ``[lo, hi]``."""
    return torch.where(lo >= 0, torch.full_like(lo, 0.5), torch.zeros_like(lo))


class _SShapedOp(ElementwiseOp):
    """Sigmoid-like activation: odd-symmetric up to a shift, convex on x<=0, concave on x>=0.

    Optimisable by alpha-CROWN (``has_alpha``): ``alpha`` ``(N, m, 2, *shape)`` holds, per specification row and
    neuron, the tangent parameters ``t in [0, 1]`` (:meth:`alpha_bounds`) of the lower line (index 0) and of the
    upper line (index 1), see :func:`_s_upper`. Every value in the range gives a sound relaxation, and
    :meth:`alpha_init` gives CROWN's. The DeepPoly rule has no parameter.
    """

    has_alpha = True

    def df(self, x: Tensor) -> Tensor:
        raise NotImplementedError

    def f_df(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """``(f(x), f'(x))`` (subclasses share the work where they can)."""
        return self.fn(x), self.df(x)

    def reflected(self, y: Tensor) -> Tensor:
        """``-f(-y)``, the function whose upper line gives ``f``'s lower line."""
        raise NotImplementedError

    def relax(
        self, lo: Tensor, hi: Tensor, alpha: Tensor | None = None, *, mode: str = "crown"
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        if mode == "deeppoly":
            return self._relax_deeppoly(lo, hi)
        # The tangent points of both lines in one bisection: -f(-y) is f(y) up to a constant, which the tangent test
        # ignores, and the lower line of f on [lo, hi] is the upper line of -f(-y) on [-hi, -lo].
        d0 = _tangent_points(self.f_df, torch.stack([lo, -hi]), torch.stack([hi, -lo]).clamp(min=0))
        t_lo, t_up = (None, None) if alpha is None else (alpha[:, :, 0], alpha[:, :, 1])
        uw, ub = _s_upper(self.fn, self.df, lo, hi, d0[0], t_up)
        # f(x) >= -(w * (-x) + b) = w * x - b when w * y + b is an upper line of -f(-y) on [-hi, -lo].
        w, b = _s_upper(self.reflected, self.df, -hi, -lo, d0[1], t_lo)
        return w, -b, uw, ub

    def alpha_init(self, lo: Tensor, hi: Tensor) -> Tensor:
        """CROWN's tangent parameters ``(N, 2, *shape)`` (lower, upper) on the input box ``[lo, hi]``."""
        return torch.stack([_s_init(-hi, -lo), _s_init(lo, hi)], 1)

    def alpha_bounds(self) -> tuple[float, float]:
        """The range of the tangent parameters (every value gives a sound line)."""
        return 0.0, 1.0

    def _relax_deeppoly(self, lo: Tensor, hi: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        # Singh et al. 2019, Sec. 4 (sigmoid/tanh transformer): chord slope on the convex/concave side, otherwise
        # min(f'(lo), f'(hi)), the smallest derivative over the box (f' is unimodal), through (lo, f(lo)) for the
        # lower line and through (hi, f(hi)) for the upper line.
        width = hi - lo
        degenerate = width <= 1e-12
        flo, fhi = self.fn(lo), self.fn(hi)
        lam = (fhi - flo) / torch.where(degenerate, torch.ones_like(width), width)
        lam_min = torch.minimum(self.df(lo), self.df(hi))
        zero = torch.zeros_like(lo)
        lw = torch.where(degenerate, zero, torch.where(lo > 0, lam, lam_min))
        uw = torch.where(degenerate, zero, torch.where(hi <= 0, lam, lam_min))
        return lw, flo - lw * lo, uw, fhi - uw * hi


class SigmoidOp(_SShapedOp):
    """Logistic sigmoid with the CROWN (Zhang et al. 2018) or DeepPoly (Singh et al. 2019) relaxation.

    The CROWN lines have free tangent points that alpha-CROWN optimises (:class:`_SShapedOp`, :func:`_s_upper`).
    """

    def fn(self, x: Tensor) -> Tensor:
        return torch.sigmoid(x)

    def df(self, x: Tensor) -> Tensor:
        s = torch.sigmoid(x)
        return s * (1 - s)

    def f_df(self, x: Tensor) -> tuple[Tensor, Tensor]:
        s = torch.sigmoid(x)
        return s, s * (1 - s)

    def reflected(self, y: Tensor) -> Tensor:
        return torch.sigmoid(y) - 1


class TanhOp(_SShapedOp):
    """Hyperbolic tangent with the CROWN (Zhang et al. 2018) or DeepPoly (Singh et al. 2019) relaxation.

    The CROWN lines have free tangent points that alpha-CROWN optimises (:class:`_SShapedOp`, :func:`_s_upper`).
    """

    def fn(self, x: Tensor) -> Tensor:
        return torch.tanh(x)

    def df(self, x: Tensor) -> Tensor:
        return 1 - torch.tanh(x) ** 2

    def f_df(self, x: Tensor) -> tuple[Tensor, Tensor]:
        t = torch.tanh(x)
        return t, 1 - t**2

    def reflected(self, y: Tensor) -> Tensor:
        return torch.tanh(y)


class MaxPool2dOp(NonlinearBoundOp):
    """2-D max pooling (padding with -inf, no ceil mode) with the DeepPoly max transformer.

    Lower bound ``y >= x_j`` for the window element ``j`` with the largest lower bound (always valid); upper bound
    ``y <= x_j`` when that element dominates the window (its lower bound >= every other upper bound), otherwise the
    constant ``max_i hi_i`` (Singh et al., POPL 2019, Sec. 4).

    Args:
        kernel_size, stride, padding, dilation: as in ``F.max_pool2d``.
        in_shape: per-sample ``(C, H, W)``.
    """

    def __init__(
        self,
        *,
        kernel_size: tuple[int, int],
        stride: tuple[int, int],
        padding: tuple[int, int],
        dilation: tuple[int, int],
        in_shape: tuple[int, ...],
    ) -> None:
        self.kernel_size, self.stride, self.padding, self.dilation = kernel_size, stride, padding, dilation
        self.in_shape = tuple(in_shape)
        c, h, w = self.in_shape
        # windows[o, k] = flat input index of element k of the window of flat output o, or -1 for padding.
        idx = torch.arange(c * h * w, dtype=torch.float64).reshape(1, c, h, w) + 1
        cols = F.unfold(idx, kernel_size, dilation=dilation, padding=padding, stride=stride)  # (1, c*kh*kw, L)
        kk = kernel_size[0] * kernel_size[1]
        out_h = (h + 2 * padding[0] - dilation[0] * (kernel_size[0] - 1) - 1) // stride[0] + 1
        out_w = (w + 2 * padding[1] - dilation[1] * (kernel_size[1] - 1) - 1) // stride[1] + 1
        self.out_shape = (c, out_h, out_w)
        windows = cols.reshape(c, kk, out_h * out_w).permute(0, 2, 1).reshape(c * out_h * out_w, kk)
        self.windows = windows.round().long() - 1
        self.valid = self.windows >= 0
        self.safe = self.windows.clamp(min=0)

    def forward(self, *xs: Tensor) -> Tensor:
        return F.max_pool2d(xs[0], self.kernel_size, self.stride, self.padding, self.dilation)

    def interval(self, *bounds: Bounds) -> Bounds:
        lo, hi = bounds[0]
        return self.forward(lo), self.forward(hi)

    def _gather(self, t: Tensor, fill: float) -> Tensor:
        """``(N, *in_shape)`` -> ``(N, out_numel, k)`` window values, ``fill`` on padding."""
        g = t.reshape(t.shape[0], -1)[:, self.safe]
        return g.masked_fill(~self.valid, fill)

    def backward_bound(
        self, A: Tensor, lo: Tensor, hi: Tensor, *, alpha: Tensor | None = None, mode: str = "crown"
    ) -> tuple[Tensor, Tensor]:
        n, m = A.shape[:2]
        wl = self._gather(lo, float("-inf"))
        wh = self._gather(hi, float("-inf"))
        best = wl.argmax(-1)  # (N, O)
        best_lo = wl.gather(-1, best.unsqueeze(-1)).squeeze(-1)
        others_hi = wh.scatter(-1, best.unsqueeze(-1), float("-inf")).amax(-1)
        dominated = best_lo >= others_hi
        src = self.safe.unsqueeze(0).expand(n, -1, -1).gather(-1, best.unsqueeze(-1)).squeeze(-1)  # (N, O)
        max_hi = wh.amax(-1)
        a = A.reshape(n, m, -1)
        pos, neg = a.clamp(min=0), a.clamp(max=0)
        # Lower relaxation y >= x_src for positive coefficients; upper relaxation for negative ones.
        coef = pos + neg * dominated.unsqueeze(1).to(a.dtype)
        out = a.new_zeros(n, m, lo[0].numel())
        out = out.scatter_add(2, src.unsqueeze(1).expand(n, m, -1), coef)
        bias = (neg * torch.where(dominated, torch.zeros_like(max_hi), max_hi).unsqueeze(1)).sum(-1)
        return out.reshape(n, m, *self.in_shape), bias

    def backward_bound_window(
        self, t: Tensor, y0: int, x0: int, lo: Tensor, hi: Tensor, *, mode: str = "crown"
    ) -> tuple[Tensor, int, int, Tensor] | None:
        """:meth:`backward_bound` on a window of the output (see :meth:`ElementwiseOp.backward_bound_window`)."""
        n, m, c, h, w = t.shape
        big_c, big_h, big_w = self.in_shape
        _, out_h, out_w = self.out_shape
        dev = self.windows.device
        chans = torch.arange(c, device=dev).view(c, 1, 1)
        rows = torch.arange(y0, y0 + h, device=dev).view(1, h, 1)
        cols = torch.arange(x0, x0 + w, device=dev).view(1, 1, w)
        outs = ((chans * out_h + rows) * out_w + cols).reshape(-1)
        safe, valid = self.safe[outs], self.valid[outs]
        wl = lo.reshape(n, -1)[:, safe].masked_fill(~valid, float("-inf"))
        wh = hi.reshape(n, -1)[:, safe].masked_fill(~valid, float("-inf"))
        best = wl.argmax(-1)
        best_lo = wl.gather(-1, best.unsqueeze(-1)).squeeze(-1)
        others_hi = wh.scatter(-1, best.unsqueeze(-1), float("-inf")).amax(-1)
        dominated = best_lo >= others_hi
        src = safe.unsqueeze(0).expand(n, -1, -1).gather(-1, best.unsqueeze(-1)).squeeze(-1)
        max_hi = wh.amax(-1)
        # The input window read by the output window, clipped to the image.
        (kh, kw), (sh, sw), (ph, pw), (dh, dw) = self.kernel_size, self.stride, self.padding, self.dilation
        iy0, ix0 = max(0, y0 * sh - ph), max(0, x0 * sw - pw)
        iy1 = min(big_h, (y0 + h - 1) * sh - ph + dh * (kh - 1) + 1)
        ix1 = min(big_w, (x0 + w - 1) * sw - pw + dw * (kw - 1) + 1)
        wh_in, ww_in = iy1 - iy0, ix1 - ix0
        ch, yy, xx = src // (big_h * big_w), (src // big_w) % big_h, src % big_w
        local = (ch * wh_in + (yy - iy0)) * ww_in + (xx - ix0)
        a = t.reshape(n, m, -1)
        pos, neg = a.clamp(min=0), a.clamp(max=0)
        coef = pos + neg * dominated.unsqueeze(1).to(a.dtype)
        out = a.new_zeros(n, m, big_c * wh_in * ww_in).scatter_add(2, local.unsqueeze(1).expand(n, m, -1), coef)
        bias = (neg * torch.where(dominated, torch.zeros_like(max_hi), max_hi).unsqueeze(1)).sum(-1)
        return out.reshape(n, m, big_c, wh_in, ww_in), iy0, ix0, bias


# ---------------------------------------------------------------------------------------------------------------
# Registry of custom operators
# ---------------------------------------------------------------------------------------------------------------

#: Maps a module class or a function to a factory ``(target, args, kwargs, in_shapes) -> BoundOp`` consulted by
#: :meth:`bastion.verify.ir.Network.from_module` before the built-in rules. For modules, ``target`` is the module
#: instance and ``args`` are the call arguments (IR inputs appear as the string names of their nodes).
OP_REGISTRY: dict[Any, Callable[..., BoundOp]] = {}


def register_op(torch_thing: Any, factory: Callable[..., BoundOp]) -> None:
    """Register a bound operator for a module class or a function.

    Args:
        torch_thing: an ``nn.Module`` subclass (matched on ``call_module``; the module is then treated as a leaf
            when tracing) or a function (matched on ``call_function``).
        factory: called as ``factory(target, in_shapes)`` where ``target`` is the module instance or the function
            and ``in_shapes`` the per-sample shapes of the IR inputs (the node's tensor arguments, in order); returns
            the :class:`BoundOp`. The op receives those tensor arguments in the same order.

    Raises:
        InputError: if ``factory`` is not callable.
    """
    if not callable(factory):
        raise InputError(f"register_op: factory must be callable, got {factory!r}")
    OP_REGISTRY[torch_thing] = factory
