"""Lipschitz constants of specification functions ``x ↦ c_i · f(x)`` over an input box: sound bounds and estimates.

Global-optimisation verifiers (DeepGO's Piyavskii–Shubert lower bounding functions, DeepGame's cell bounds) need a
constant ``K`` with ``|g(x) - g(y)| <= K ||x - y||_p`` for every ``x, y`` in a box. For a network that is Lipschitz
(piecewise linear or smooth activations) the smallest such ``K`` on a convex box is the largest dual norm
``||∇g(x)||_q`` (``1/p + 1/q = 1``) of the (Clarke) gradient over the box: along the segment from ``x`` to ``y``
``g`` is absolutely continuous and its derivative is ``J(t)·(y - x)`` with ``J(t)`` a gradient the chain rule builds
from activation derivatives on the ranges their pre-activations take over the box (at a kink that a segment follows,
either one-sided derivative gives the same directional derivative). Hence any bound on that set of gradients is a
sound Lipschitz constant.

:func:`lipschitz_constant` gives two such sound bounds:

* ``method="interval"`` (box-local, tighter) — interval arithmetic through the network's Jacobian, the scheme of
  Weng, Zhang, Chen, Song, Hsieh, Boning, Dhillon, Daniel, "Towards Fast Computation of Certified Robustness for
  ReLU Networks" (ICML 2018, Fast-Lip) and of the local Lipschitz bounds of Zhang, Zhang, Hsieh, "RecurJac"
  (AAAI 2019), here for every operator of the verification IR. Pre-activation bounds over the box come from CROWN
  (:func:`~bastion.verify.crown.intermediate_bounds`, intersected with interval bounds); a ReLU/LeakyReLU whose
  pre-activation is stable has the derivative 1 or its negative slope, an unstable one the interval
  ``[min(a, 1), max(a, 1)]``; sigmoid and tanh have ``[min(f'(lo), f'(hi)), f'(0) or max(f'(lo), f'(hi))]``
  (``f'`` falls with ``|z|``); max pooling routes the coefficient to the window element that dominates its window,
  or to every element that can be the maximum with the hull of ``{0, coefficient}``. Starting from the
  specification row ``c_i`` the coefficient intervals are back-propagated node by node (affine maps exactly, in
  centre/radius form; sums over the branches of a DAG), and ``K_i`` is the dual norm of the elementwise
  magnitude ``max(|G_lo|, |G_hi|)`` of the interval gradient.
* ``method="norms"`` (global, valid on the whole input space) — the product of operator norms (Szegedy et al., ICLR
  2014): with the same ``l_p`` norm on every hidden tensor, each affine map contributes its induced ``p → p`` norm
  (max row sum, spectral norm or max column sum, from its dense matrix), each activation the largest absolute
  derivative, max pooling 1 (``linf``) or its window overlap (``l1``; its square root for ``l2``), a pure
  re-indexing the largest multiplicity of an entry (likewise), and a sum of branches the sum of their constants.
  The last affine map is folded into the specification (``||M^T c_i||_q``), which makes it exact on one linear
  layer.

Both are computed in float64 (the network is copied to float64 on the box's device), so rounding does not
undercut the bound; the result comes back in the box's dtype.

:func:`estimate_lipschitz` is what the DeepGO reference code does instead (its dynamic variant takes ``r`` times
the largest slope between evaluated points): the largest sampled gradient dual norm and the largest slope
``|g(x) - g(y)| / ||x - y||_p`` between sampled pairs. It is a *lower* bound on the true constant, hence NOT sound
for a proof: a Piyavskii–Shubert bound built on it can lie above the true minimum.

Supported models: whatever :meth:`bastion.verify.ir.Network.from_module` traces, with the nonlinear operators
ReLU, LeakyReLU, Sigmoid, Tanh and MaxPool2d (others raise :class:`~bastion.errors.InputError`, naming the node).
Norms: ``linf``, ``l2``, ``l1`` (``l0`` is not a norm and has no Lipschitz constant).
"""

from __future__ import annotations

import copy
import math
from contextlib import nullcontext
from typing import Any

import torch
from torch import Tensor, nn

from bastion.errors import InputError
from bastion.models.checks import eval_mode
from bastion.threat import canonical_norm
from bastion.verify.crown import intermediate_bounds
from bastion.verify.ir import Network, as_network
from bastion.verify.ops import (
    AddOp,
    BoundOp,
    ChannelAffineOp,
    Conv2dOp,
    GenericLinearOp,
    InputOp,
    LeakyReLUOp,
    LinearBoundOp,
    LinearOp,
    MaxPool2dOp,
    ReindexOp,
    SigmoidOp,
    SubOp,
    TanhOp,
)

__all__ = ["LIPSCHITZ_METHODS", "LIPSCHITZ_NORMS", "estimate_lipschitz", "gradient_interval", "lipschitz_constant"]

#: Methods accepted by :func:`lipschitz_constant`.
LIPSCHITZ_METHODS = ("interval", "norms")
#: Input norms accepted (l0 has no Lipschitz constant).
LIPSCHITZ_NORMS = ("linf", "l2", "l1")

Interval = tuple[Tensor, Tensor]


# ---------------------------------------------------------------------------------------------------------------
# Validation
# ---------------------------------------------------------------------------------------------------------------


def _norm(norm: Any, where: str) -> str:
    p = canonical_norm(norm)
    if p not in LIPSCHITZ_NORMS:
        raise InputError(f"{where}: norm must be one of {LIPSCHITZ_NORMS} (l0 has no Lipschitz constant), got {norm!r}")
    return p


def _network(model: nn.Module | Network, shape: tuple[int, ...], where: str) -> Network:
    if not isinstance(model, (nn.Module, Network)):
        raise InputError(f"{where}: model must be a torch.nn.Module or a bastion Network, got {type(model).__name__}")
    if isinstance(model, Network):
        return as_network(model, shape)
    with eval_mode(model):
        return Network.from_module(model, shape)


def check_box(lower: Any, upper: Any, where: str) -> tuple[Tensor, Tensor]:
    """``(lower, upper)`` checked as a non-empty batch of finite boxes ``(N, *input_shape)``; else an InputError
    naming ``where``."""
    for nm, t in (("lower", lower), ("upper", upper)):
        if not isinstance(t, Tensor) or not t.is_floating_point():
            raise InputError(f"{where}: {nm} must be a floating-point tensor (N, *input_shape), got {type(t).__name__}")
    if lower.shape != upper.shape:
        raise InputError(f"{where}: lower {tuple(lower.shape)} and upper {tuple(upper.shape)} differ in shape")
    if lower.dim() < 2 or lower.shape[0] == 0:
        raise InputError(f"{where}: the box must have shape (N, *input_shape) with N >= 1, got {tuple(lower.shape)}")
    if not bool(torch.isfinite(lower).all()) or not bool(torch.isfinite(upper).all()):
        raise InputError(f"{where}: lower/upper contain NaN or Inf")
    if bool((lower > upper).any()):
        raise InputError(f"{where}: lower > upper somewhere (an empty box)")
    return lower, upper


def _check_spec(c: Any, n: int, k: int, like: Tensor, where: str) -> Tensor:
    if not isinstance(c, Tensor) or not c.is_floating_point():
        raise InputError(f"{where}: c must be a floating-point tensor (m, {k}) or ({n}, m, {k}), got {c!r}")
    if c.dim() == 2:
        c = c.unsqueeze(0).expand(n, *c.shape)
    if c.dim() != 3 or c.shape[0] != n or c.shape[2] != k or c.shape[1] == 0:
        raise InputError(f"{where}: c must have shape (m, {k}) or ({n}, m, {k}) with m >= 1, got {tuple(c.shape)}")
    if not bool(torch.isfinite(c).all()):
        raise InputError(f"{where}: c contains NaN or Inf")
    return c.to(device=like.device, dtype=like.dtype)


def _prepare(
    model: nn.Module | Network, lower: Any, upper: Any, c: Any, norm: Any, where: str
) -> tuple[Network, Tensor, Tensor, Tensor, str]:
    lower, upper = check_box(lower, upper, where)
    p = _norm(norm, where)
    net = _network(model, tuple(lower.shape[1:]), where)
    k = math.prod(net.output_shape)
    spec = _check_spec(c, lower.shape[0], k, lower, where)
    return net, lower, upper, spec, p


def _dual(mag: Tensor, p: str) -> Tensor:
    """Dual norm (over dims 2+) of a non-negative ``(N, m, ...)`` tensor for the input norm ``p``."""
    flat = mag.flatten(2)
    if p == "linf":
        return flat.sum(-1)
    if p == "l2":
        return flat.pow(2).sum(-1).sqrt()
    return flat.amax(-1)


def _float64(net: Network, device: torch.device) -> Network:
    if net.live:  # a live network holds the model's parameters and cannot be cast; bound it as it is
        return net
    return net.to(device, torch.float64)


# ---------------------------------------------------------------------------------------------------------------
# Interval Jacobian
# ---------------------------------------------------------------------------------------------------------------


def _abs_backward(op: LinearBoundOp, rad: Tensor, name: str) -> list[Tensor]:
    """``|M|^T rad`` for every input of the affine op ``M`` (``rad >= 0``, ``(N, m, *out_shape)``)."""
    if isinstance(op, LinearOp):
        return [rad @ op.weight.abs()]
    if isinstance(op, Conv2dOp):
        absop = copy.copy(op)
        absop.weight = op.weight.abs()
        return absop.backward(rad)[0]
    if isinstance(op, ChannelAffineOp):
        return [rad * op.scale.abs().expand(rad.shape[2:])]
    if isinstance(op, ReindexOp):
        return op.backward(rad)[0]
    if isinstance(op, (AddOp, SubOp)):
        return [rad, rad]
    if isinstance(op, GenericLinearOp):
        n, m = rad.shape[:2]
        flat = rad.reshape(n * m, *rad.shape[2:])
        x0 = flat.new_zeros(n * m, *op.in_shape)
        # abs_fn applies the map with |weights|; its adjoint is the transpose of that non-negative matrix.
        vjp_fn = torch.func.vjp(lambda x: op.abs_fn(x, *op.consts), x0)[1]
        return [vjp_fn(flat)[0].reshape(n, m, *op.in_shape)]
    raise InputError(f"lipschitz_constant: affine operator {op!r} at node {name!r} is not supported")


def _derivative(op: BoundOp, lo: Tensor, hi: Tensor, name: str) -> Interval:
    """Interval ``[d_lo, d_hi]`` of the activation's derivative over the pre-activation box ``[lo, hi]``."""
    if isinstance(op, LeakyReLUOp):
        a = op.slope
        one, slope = torch.ones_like(lo), torch.full_like(lo, a)
        active, inactive = lo >= 0, hi <= 0
        d_lo = torch.where(active, one, torch.where(inactive, slope, torch.full_like(lo, min(a, 1.0))))
        d_hi = torch.where(active, one, torch.where(inactive, slope, torch.full_like(lo, max(a, 1.0))))
        return d_lo, d_hi
    if isinstance(op, (SigmoidOp, TanhOp)):
        f_lo, f_hi = op.df(lo), op.df(hi)
        peak = op.df(torch.zeros_like(lo))
        straddle = (lo <= 0) & (hi >= 0)
        return torch.minimum(f_lo, f_hi), torch.where(straddle, peak, torch.maximum(f_lo, f_hi))
    raise InputError(
        f"lipschitz_constant: nonlinear operator {op!r} at node {name!r} is not supported "
        "(ReLU, LeakyReLU, Sigmoid, Tanh and MaxPool2d are)"
    )


def _interval_mul(a: Interval, d: Interval) -> Interval:
    """``[a] * [d]`` elementwise; ``d`` is per sample ``(N, *shape)`` and broadcast over the spec dim of ``a``."""
    d_lo, d_hi = d[0].unsqueeze(1), d[1].unsqueeze(1)
    prods = torch.stack([a[0] * d_lo, a[0] * d_hi, a[1] * d_lo, a[1] * d_hi])
    return prods.amin(0), prods.amax(0)


def _maxpool_backward(op: MaxPool2dOp, a: Interval, lo: Tensor, hi: Tensor) -> Interval:
    """Coefficient intervals on the max-pool input from those ``a`` on its output, given the input box."""
    n, m = a[0].shape[:2]
    wl = op._gather(lo, float("-inf"))  # (N, O, k)
    wh = op._gather(hi, float("-inf"))
    best = wl.argmax(-1, keepdim=True)
    best_lo = wl.gather(-1, best)
    others_hi = wh.scatter(-1, best, float("-inf")).amax(-1, keepdim=True)
    dominated = best_lo >= others_hi  # (N, O, 1): the best element is the maximum everywhere in the box
    is_best = torch.zeros_like(wl, dtype=torch.bool).scatter(-1, best, True)
    can_be_max = op.valid.unsqueeze(0) & (wh >= best_lo)
    a_lo, a_hi = a[0].reshape(n, m, -1, 1), a[1].reshape(n, m, -1, 1)
    exact = (dominated & is_best).unsqueeze(1)  # (N, 1, O, k)
    loose = (~dominated & can_be_max).unsqueeze(1)
    zero = torch.zeros((), dtype=a_lo.dtype, device=a_lo.device)
    c_lo = torch.where(exact, a_lo, torch.where(loose, a_lo.clamp(max=0), zero))
    c_hi = torch.where(exact, a_hi, torch.where(loose, a_hi.clamp(min=0), zero))
    index = op.safe.reshape(1, 1, -1).expand(n, m, -1)
    size = lo[0].numel()
    g_lo = c_lo.new_zeros(n, m, size).scatter_add(2, index, c_lo.reshape(n, m, -1))
    g_hi = c_hi.new_zeros(n, m, size).scatter_add(2, index, c_hi.reshape(n, m, -1))
    return g_lo.reshape(n, m, *op.in_shape), g_hi.reshape(n, m, *op.in_shape)


def gradient_interval(
    net: Network, lower: Tensor, upper: Tensor, C: Tensor, *, pre: dict[str, Interval] | None = None
) -> Interval:
    """Elementwise bounds ``G_lo <= ∇_x (C_i · f(x)) <= G_hi`` valid for every ``x`` in the box.

    Args:
        net: the network (any dtype; bounds are computed in the dtype of ``lower``).
        lower: ``(N, *input_shape)``.
        upper: ``(N, *input_shape)``.
        C: ``(N, m, K)`` specification rows over the flattened outputs.
        pre: pre-activation bounds of every nonlinear node over this box (e.g. from
            :func:`~bastion.verify.crown.intermediate_bounds`, which a caller that also bounds the outputs
            computes once for both); None: computed here with CROWN. Bounds that do not hold on the box make the
            result unsound.

    Returns:
        ``(G_lo, G_hi)``, each ``(N, m, *input_shape)``.
    """
    n, m = C.shape[:2]
    if pre is None:
        pre = {}
        if net.nonlinear_nodes():
            with torch.no_grad():
                pre = intermediate_bounds(net, lower, upper)
    out = C.reshape(n, m, *net.output_shape)
    coef: dict[str, Interval] = {net.output_name: (out, out)}
    for name in reversed(list(net.nodes)):
        if name not in coef or name == net.input_name:
            continue
        node = net.nodes[name]
        a = coef.pop(name)
        op = node.op
        if isinstance(op, InputOp):
            continue
        if op.linear:
            assert isinstance(op, LinearBoundOp)
            mid, rad = (a[0] + a[1]) / 2, (a[1] - a[0]) / 2
            mids = op.backward(mid)[0]
            rads = _abs_backward(op, rad, name)
            pieces = [(mu - r, mu + r) for mu, r in zip(mids, rads)]
        elif isinstance(op, MaxPool2dOp):
            lo, hi = pre[name]
            pieces = [_maxpool_backward(op, a, lo, hi)]
        elif op.nonlinear:
            lo, hi = pre[name]
            pieces = [_interval_mul(a, _derivative(op, lo, hi, name))]
        else:
            raise InputError(f"lipschitz_constant: operator {op!r} at node {name!r} is not supported")
        for src, (g_lo, g_hi) in zip(node.inputs, pieces):
            if src in coef:
                coef[src] = (coef[src][0] + g_lo, coef[src][1] + g_hi)
            else:
                coef[src] = (g_lo, g_hi)
    if net.input_name not in coef:  # the output does not depend on the input
        z = torch.zeros(n, m, *net.input_shape, dtype=lower.dtype, device=lower.device)
        return z, z
    return coef[net.input_name]


# ---------------------------------------------------------------------------------------------------------------
# Product of operator norms
# ---------------------------------------------------------------------------------------------------------------


def _dense(op: LinearBoundOp, in_shape: tuple[int, ...], like: Tensor) -> Tensor:
    """The matrix ``(out_numel, in_numel)`` of a single-input affine op (without its offset)."""
    d = math.prod(in_shape)
    eye = torch.eye(d, dtype=like.dtype, device=like.device).reshape(d, *in_shape)
    with torch.no_grad():
        cols = op.forward(eye) - op.forward(torch.zeros_like(eye[:1]))
    return cols.reshape(d, -1).T


def _op_norm(mat: Tensor, p: str) -> Tensor:
    """Induced ``p → p`` operator norm of a matrix."""
    if mat.numel() == 0:
        return mat.new_zeros(())
    if p == "linf":
        return mat.abs().sum(1).amax()
    if p == "l1":
        return mat.abs().sum(0).amax()
    return torch.linalg.matrix_norm(mat, ord=2)


def _multiplicity_factor(count: Tensor, p: str, like: Tensor) -> Tensor:
    """Lipschitz factor of a map that copies each input entry ``count`` times (or takes a max over windows)."""
    top = float(count.max()) if count.numel() else 0.0
    if p == "linf":
        top = min(top, 1.0)
    elif p == "l2":
        top = math.sqrt(top)
    return torch.tensor(top, dtype=like.dtype, device=like.device)


def _norm_product(net: Network, C: Tensor, p: str) -> Tensor:
    """``(N, m)``: product-of-norms Lipschitz bound of ``C_i · f`` on the whole input space."""
    like = C
    lip: dict[str, Tensor] = {}
    shapes = {nm: nd.shape for nm, nd in net.nodes.items()}
    out_node = net.nodes[net.output_name]
    fold = isinstance(out_node.op, LinearBoundOp) and len(out_node.inputs) == 1
    for name, node in net.nodes.items():
        op = node.op
        if isinstance(op, InputOp):
            lip[name] = torch.ones((), dtype=like.dtype, device=like.device)
            continue
        if fold and name == net.output_name:
            break
        ins = [lip[i] for i in node.inputs]
        if isinstance(op, (AddOp, SubOp)):
            lip[name] = ins[0] + ins[1]
        elif isinstance(op, ReindexOp):
            count = torch.bincount(op.index.reshape(-1), minlength=op.in_numel)
            lip[name] = ins[0] * _multiplicity_factor(count, p, like)
        elif isinstance(op, LinearOp):
            lip[name] = ins[0] * _op_norm(op.weight, p)
        elif op.linear:
            assert isinstance(op, LinearBoundOp)
            if len(node.inputs) != 1:
                raise InputError(f"lipschitz_constant: affine operator {op!r} at node {name!r} is not supported")
            lip[name] = ins[0] * _op_norm(_dense(op, shapes[node.inputs[0]], like), p)
        elif isinstance(op, MaxPool2dOp):
            count = torch.bincount(op.safe[op.valid].reshape(-1), minlength=math.prod(op.in_shape))
            lip[name] = ins[0] * _multiplicity_factor(count, p, like)
        elif isinstance(op, LeakyReLUOp):
            lip[name] = ins[0] * max(1.0, abs(op.slope))
        elif isinstance(op, SigmoidOp):
            lip[name] = ins[0] * 0.25
        elif isinstance(op, TanhOp):
            lip[name] = ins[0]
        else:
            raise InputError(
                f"lipschitz_constant: operator {op!r} at node {name!r} is not supported "
                "(affine maps, ReLU, LeakyReLU, Sigmoid, Tanh and MaxPool2d are)"
            )
    if fold:
        assert isinstance(out_node.op, LinearBoundOp)
        src = out_node.inputs[0]
        if isinstance(out_node.op, LinearOp) and len(shapes[src]) == 1:
            mat = out_node.op.weight
        else:
            mat = _dense(out_node.op, shapes[src], like)
        rows = C @ mat  # (N, m, in_numel): the gradient of C_i · f with respect to the last hidden tensor
        return _dual(rows.abs(), p) * lip[src]
    return _dual(C.abs(), p) * lip[net.output_name]


# ---------------------------------------------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------------------------------------------


def lipschitz_constant(
    model: nn.Module | Network,
    lower: Tensor,
    upper: Tensor,
    c: Tensor,
    *,
    norm: str = "linf",
    method: str = "interval",
) -> Tensor:
    """A sound upper bound on the Lipschitz constant of each ``x ↦ c_i · f(x)`` over each input box.

    The constant holds with respect to the input norm ``norm``: ``|g(x) - g(y)| <= K ||x - y||_norm`` for all
    ``x, y`` in the box, i.e. ``K`` bounds the dual norm of the gradient over the box.

    Args:
        model: a ``torch.nn.Module`` (traced into the verification IR) or a :class:`~bastion.verify.ir.Network`.
            Pass a ``Network`` when calling repeatedly on the same model, to trace it once.
        lower: ``(N, *input_shape)`` lower ends of the boxes.
        upper: ``(N, *input_shape)`` upper ends.
        c: ``(N, m, K)`` or ``(m, K)`` specification rows over the ``K`` flattened outputs.
        norm: input norm, ``"linf"`` (then ``K`` bounds the l1 norm of the gradient), ``"l2"`` or ``"l1"``.
        method: ``"interval"`` (interval Jacobian over the box, CROWN pre-activation bounds) or ``"norms"``
            (product of layer operator norms, valid on the whole space and independent of the box).

    Returns:
        ``(N, m)`` non-negative constants in the dtype and on the device of ``lower``.

    Raises:
        InputError: malformed box or ``c``, unknown norm or method, or a model outside the supported operators.
    """
    where = "lipschitz_constant"
    if method not in LIPSCHITZ_METHODS:
        raise InputError(f"{where}: unknown method {method!r}; choose one of {LIPSCHITZ_METHODS}")
    net, lower, upper, spec, p = _prepare(model, lower, upper, c, norm, where)
    net64 = _float64(net, lower.device)
    dt = torch.float64 if not net.live else lower.dtype
    lo64, hi64, c64 = lower.to(dt), upper.to(dt), spec.to(dt)
    with torch.no_grad():
        if method == "interval":
            g_lo, g_hi = gradient_interval(net64, lo64, hi64, c64)
            k = _dual(torch.maximum(g_lo.abs(), g_hi.abs()), p)
        else:
            k = _norm_product(net64, c64, p)
    return k.to(lower.dtype)


def estimate_lipschitz(
    model: nn.Module | Network,
    lower: Tensor,
    upper: Tensor,
    c: Tensor,
    *,
    norm: str = "linf",
    n_samples: int = 1024,
    seed: int = 0,
) -> Tensor:
    """A sampled estimate (NOT a sound bound) of the Lipschitz constant of each ``x ↦ c_i · f(x)`` over each box.

    The largest of (a) the dual norms of the gradients at ``n_samples`` uniform points of the box (by autograd) and
    (b) the slopes ``|g(x) - g(y)| / ||x - y||_norm`` between consecutive pairs of those points, as the DeepGO
    reference code estimates its constant from slopes between evaluated points. Every sampled value is at most the
    true constant, so the estimate is a *lower* bound of it: bounds built on it are not proofs.

    Args:
        model: a ``torch.nn.Module`` or a :class:`~bastion.verify.ir.Network`.
        lower: ``(N, *input_shape)`` lower ends of the boxes.
        upper: ``(N, *input_shape)`` upper ends.
        c: ``(N, m, K)`` or ``(m, K)`` specification rows.
        norm: input norm (``"linf"``, ``"l2"``, ``"l1"``).
        n_samples: points sampled per box (``>= 2``).
        seed: seed of the sampling generator (on the CPU, so the points do not depend on the device).

    Returns:
        ``(N, m)`` estimates in the dtype and on the device of ``lower``.

    Raises:
        InputError: malformed arguments.
    """
    where = "estimate_lipschitz"
    if isinstance(n_samples, bool) or not isinstance(n_samples, int) or n_samples < 2:
        raise InputError(f"{where}: n_samples must be an int >= 2, got {n_samples!r}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise InputError(f"{where}: seed must be an int, got {seed!r}")
    net, lower, upper, spec, p = _prepare(model, lower, upper, c, norm, where)
    fn: Any = model if isinstance(model, nn.Module) else net
    first = next(iter(model.parameters()), None) if isinstance(model, nn.Module) else None
    dtype = first.dtype if first is not None and first.is_floating_point() else lower.dtype
    n, m = spec.shape[:2]
    g = torch.Generator().manual_seed(seed)
    u = torch.rand(n, n_samples, *lower.shape[1:], generator=g, dtype=torch.float64).to(lower.device, lower.dtype)
    xs = lower.unsqueeze(1) + u * (upper - lower).unsqueeze(1)
    flat = xs.reshape(n * n_samples, *lower.shape[1:]).to(dtype).detach().requires_grad_(True)
    ctx = eval_mode(model) if isinstance(model, nn.Module) else nullcontext()
    with ctx, torch.enable_grad():
        y = fn(flat).reshape(n, n_samples, -1)
        vals = torch.einsum("nsk,nmk->nsm", y, spec.to(y.dtype))
        grads = []
        for i in range(m):  # one backward pass per specification row (rows are few)
            (gi,) = torch.autograd.grad(vals[:, :, i].sum(), flat, retain_graph=i < m - 1)
            grads.append(gi.reshape(n, n_samples, -1))
    grad = torch.stack(grads, 2).detach().to(lower.dtype)  # (N, S, m, D)
    gnorm = _dual(grad.abs().reshape(n * n_samples, m, -1), p).reshape(n, n_samples, m).amax(1)
    v = vals.detach().to(lower.dtype)
    dx = (xs[:, 1:] - xs[:, :-1]).flatten(2)
    if p == "linf":
        dist = dx.abs().amax(-1)
    elif p == "l2":
        dist = dx.pow(2).sum(-1).sqrt()
    else:
        dist = dx.abs().sum(-1)
    dv = (v[:, 1:] - v[:, :-1]).abs()
    ok = (dist > 0).unsqueeze(-1)
    slopes = torch.where(ok, dv / dist.clamp(min=torch.finfo(dist.dtype).tiny).unsqueeze(-1), torch.zeros_like(dv))
    return torch.maximum(gnorm, slopes.amax(1)).to(lower.dtype)
