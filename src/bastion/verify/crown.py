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

Cost of the intermediate bounds, which dominate on conv nets, is kept down without changing any bound:

* only the neurons whose relaxation depends on their bounds (unstable ReLUs) are back-substituted, *per sample*
  (each sample's rows are its own unstable neurons, padded to the largest count, see :func:`select_rows`);
* the first step through the affine producer of those identity rows is taken in closed form (a convolution row is
  its kernel placed at its window, a linear row a weight row) instead of a transposed convolution of one-hot rows,
  and is shared by the lower and upper rows;
* rows of a convolution output are processed one spatial tile at a time on *windows*: the coefficients live on the
  part of each earlier feature map the tile can read (:class:`_Win`), which is a small fraction of the map; ops
  without a windowed rule fall back to dense coefficients. This is a simple form of auto_LiRPA's "patches" (Xu et
  al., "Automatic Perturbation Analysis for Scalable Certified Robustness and Beyond", NeurIPS 2020).

:func:`crown_ibp_bounds` is CROWN-IBP (Zhang et al., ICLR 2020): interval intermediate bounds and one CROWN pass
for the specification.

The same machinery serves DeepPoly (``mode="deeppoly"``, see :mod:`bastion.verify.deeppoly`) and alpha-CROWN (which
passes optimisable relaxation parameters ``alphas``, see :mod:`bastion.verify.alpha_crown`) and beta-CROWN (split
multipliers through ``lagrange``).
"""

from __future__ import annotations

import weakref

import torch
import torch.nn.functional as F
from torch import Tensor

from bastion.errors import InputError
from bastion.verify.ibp import apply_constraints, ibp_bounds
from bastion.verify.ir import Network
from bastion.verify.ops import Conv2dOp, LinearOp, MaxPool2dOp

__all__ = [
    "backsubstitute",
    "crown_bounds",
    "crown_ibp_bounds",
    "final_bounds",
    "intermediate_bounds",
    "onehot_lower",
    "select_rows",
]

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
    lagrange: dict[str, Tensor] | None = None,
) -> Tensor:
    """A sound lower bound of ``A . node(start)`` over the input box.

    Args:
        net: the network.
        start: the node whose output ``A`` multiplies.
        A: ``(N, m, *shape of start)``.
        lower: input box lower end ``(N, *input_shape)``.
        upper: input box upper end.
        pre: pre-activation bounds of every nonlinear ancestor of ``start``.
        alphas: optional relaxation parameters per nonlinear node, ``(N, m, *parameter shape)``.
        mode: relaxation rules, ``"crown"`` or ``"deeppoly"``.
        lagrange: per nonlinear node, coefficients ``(N, m, *in_shape)`` added to the linear function of its input
            when the pass reaches it: the Lagrangian terms of constraints on that input which hold on the domain
            (beta-CROWN's ``-beta * s * x`` for a split ``s * x >= 0``); the bound stays sound when every added
            term is ``<= 0`` on the domain.

    Returns:
        ``(N, m)`` lower bounds.
    """
    acc: dict[str, Tensor | _Win] = {start: A}
    zero = A.new_zeros(A.shape[:2])
    return _propagate(net, start, acc, zero, lower, upper, pre, alphas=alphas, mode=mode, lagrange=lagrange)


class _Win:
    """Coefficients ``t`` ``(N, m, C, h, w)`` on the window ``[y0, y0+h) x [x0, x0+w)`` of a ``(C, H, W)`` node.

    Zero outside the window. Intermediate-bound rows of a convolution read only a small neighbourhood of each earlier
    feature map, so back-substituting them on that window instead of the whole map saves most of the work (the
    same observation as auto_LiRPA's "patches" mode, Xu et al. NeurIPS 2020, in a simpler form: one window per
    batch of rows taken from one spatial tile).
    """

    __slots__ = ("t", "x0", "y0")

    def __init__(self, t: Tensor, y0: int, x0: int) -> None:
        self.t, self.y0, self.x0 = t, y0, x0

    def dense(self, shape: tuple[int, ...]) -> Tensor:
        """The coefficients on the whole ``(C, H, W)`` node."""
        h, w = self.t.shape[-2:]
        return F.pad(self.t, (self.x0, shape[-1] - self.x0 - w, self.y0, shape[-2] - self.y0 - h))

    def crop(self, full: Tensor) -> Tensor:
        """The window of a ``(..., H, W)`` tensor."""
        h, w = self.t.shape[-2:]
        return full[..., self.y0 : self.y0 + h, self.x0 : self.x0 + w]

    def embed(self, y0: int, x0: int, y1: int, x1: int) -> Tensor:
        """The coefficients on the larger window ``[y0, y1) x [x0, x1)``."""
        h, w = self.t.shape[-2:]
        return F.pad(self.t, (self.x0 - x0, x1 - self.x0 - w, self.y0 - y0, y1 - self.y0 - h))


def _accumulate(acc: dict[str, Tensor | _Win], name: str, value: Tensor | _Win, shape: tuple[int, ...]) -> None:
    """Add ``value`` to the coefficients accumulated for ``name`` (windows merge into their bounding window)."""
    old = acc.get(name)
    if old is None:
        acc[name] = value
    elif isinstance(old, _Win) and isinstance(value, _Win):
        oh, ow = old.t.shape[-2:]
        vh, vw = value.t.shape[-2:]
        y0, x0 = min(old.y0, value.y0), min(old.x0, value.x0)
        y1, x1 = max(old.y0 + oh, value.y0 + vh), max(old.x0 + ow, value.x0 + vw)
        acc[name] = _Win(old.embed(y0, x0, y1, x1) + value.embed(y0, x0, y1, x1), y0, x0)
    else:
        a = old.dense(shape) if isinstance(old, _Win) else old
        b = value.dense(shape) if isinstance(value, _Win) else value
        acc[name] = a + b


def _window_step(
    net: Network, name: str, a: _Win, lower: Tensor, upper: Tensor, pre: dict[str, Bounds], mode: str
) -> tuple[list[_Win], Tensor] | None:
    """One backward step of windowed coefficients; None when the node cannot take windows (the caller densifies)."""
    node = net.nodes[name]
    if name == net.input_name:
        if lower.dim() != 4:
            return None
        n = lower.shape[0]
        a_f = a.t.flatten(2)
        lo_w, hi_w = a.crop(lower).reshape(n, -1, 1), a.crop(upper).reshape(n, -1, 1)
        return [], torch.bmm(a_f.clamp(min=0), lo_w).squeeze(-1) + torch.bmm(a_f.clamp(max=0), hi_w).squeeze(-1)
    if node.op.linear:
        fn = getattr(node.op, "backward_window", None)
        res = fn(a.t, a.y0, a.x0) if fn is not None else None
        if res is None:
            return None
        wins, b = res
        return [_Win(t, y0, x0) for t, y0, x0 in wins], b
    fn = getattr(node.op, "backward_bound_window", None)
    if fn is None:
        return None
    lo_n, hi_n = pre[name]
    got = fn(a.t, a.y0, a.x0, lo_n, hi_n, mode=mode)
    if got is None:
        return None
    t_in, y0, x0, b = got
    return [_Win(t_in, y0, x0)], b


def _propagate(
    net: Network,
    start: str,
    acc: dict[str, Tensor | _Win],
    bias: Tensor,
    lower: Tensor,
    upper: Tensor,
    pre: dict[str, Bounds],
    *,
    alphas: dict[str, Tensor] | None = None,
    mode: str = "crown",
    skip: str | None = None,
    lagrange: dict[str, Tensor] | None = None,
) -> Tensor:
    """The backward pass of :func:`backsubstitute` from accumulated coefficients ``acc`` (node -> ``(N, m, *shape)``).

    ``skip`` names a node whose step was already taken (its contribution is in ``acc`` and ``bias``).
    """
    order = list(net.nodes)
    for name in reversed(order[: order.index(start) + 1]):
        a = acc.pop(name, None)
        if a is None or name == skip:
            continue
        node = net.nodes[name]
        if isinstance(a, _Win):
            stepped = _window_step(net, name, a, lower, upper, pre, mode)
            if stepped is not None:
                wins, b = stepped
                bias = bias + b
                for inp, win in zip(node.inputs, wins):
                    _accumulate(acc, inp, win, net.nodes[inp].shape)
                continue
            a = a.dense(node.shape)
        if name == net.input_name:
            # min over the box of a . x, as one batched product per bound instead of a full-size temporary.
            a_f = a.flatten(2)
            pos = torch.bmm(a_f.clamp(min=0), lower.reshape(lower.shape[0], -1, 1)).squeeze(-1)
            neg = torch.bmm(a_f.clamp(max=0), upper.reshape(upper.shape[0], -1, 1)).squeeze(-1)
            bias = bias + pos + neg
            continue
        if node.op.linear:
            back, b = node.op.backward(a)  # type: ignore[attr-defined]
        elif node.op.nonlinear:
            lo_n, hi_n = pre[name]
            alpha = alphas.get(name) if alphas is not None else None
            a_in, b = node.op.backward_bound(a, lo_n, hi_n, alpha=alpha, mode=mode)  # type: ignore[attr-defined]
            if lagrange is not None and name in lagrange:
                a_in = a_in + lagrange[name]
            back = [a_in]
        else:
            raise InputError(f"compute_bounds: operator {node.op!r} of node {name!r} has no linear relaxation")
        bias = bias + b
        for inp, ai in zip(node.inputs, back):
            _accumulate(acc, inp, ai, net.nodes[inp].shape)
    return bias


#: Most coefficient entries (N x rows x neurons of the widest node on the way back) in one back-substitution pass
#: for intermediate bounds; larger specifications are processed in chunks of rows to bound memory.
MAX_ENTRIES = 2**24


def _widest(net: Network, name: str) -> int:
    """The largest per-sample size of ``name`` and its ancestors (the widest coefficient tensor of a backward pass)."""
    widest = 1
    for k in _ancestors(net, name):
        p = 1
        for d in net.nodes[k].shape:
            p *= d
        widest = max(widest, p)
    return widest


def _onehot_step(
    net: Network, name: str, idx: Tensor, valid: Tensor, window: tuple[int, int, int, int] | None = None
) -> tuple[list[Tensor], Tensor] | None:
    """The first backward step of the identity rows ``e_idx`` of the affine node ``name``, without dense rows.

    Args:
        net: the network.
        name: an affine node.
        idx: ``(N, k)`` flat neuron indices of ``name``.
        valid: ``(N, k)`` rows in use (the others are padding and get zero coefficients).
        window: for a convolution, ``(y0, x0, h, w)``: return the coefficients on that window of the input only.

    Returns:
        ``([A_in], bias)`` as :meth:`LinearBoundOp.backward` would return for the one-hot ``A``, or None when the
        operator has no shortcut (the caller then builds the one-hot rows).
    """
    op = net.nodes[name].op
    n, k = idx.shape
    vf = valid.to(_net_dtype(op, idx))
    if isinstance(op, Conv2dOp) and len(op.in_shape) == 3:
        # Row (c, i, j) of a convolution reads the kernel W[c] placed at the window of output pixel (i, j); scatter the
        # kernel there (positions in the zero padding are dropped) instead of a transposed convolution of a one-hot.
        c_out, oh, ow = op.out_shape
        c_in, h, w = op.in_shape
        cg, kh, kw = op.weight.shape[1:]
        c = idx // (oh * ow)
        i = (idx // ow) % oh
        j = idx % ow
        grp = c // (c_out // op.groups)
        dev = idx.device
        ci = torch.arange(cg, device=dev).view(cg, 1, 1)
        ki = torch.arange(kh, device=dev).view(1, kh, 1)
        kj = torch.arange(kw, device=dev).view(1, 1, kw)
        rows_in = (i * op.stride[0] - op.padding[0]).view(n, k, 1, 1, 1) + ki * op.dilation[0]
        cols_in = (j * op.stride[1] - op.padding[1]).view(n, k, 1, 1, 1) + kj * op.dilation[1]
        chan = (grp * cg).view(n, k, 1, 1, 1) + ci
        # With a window, coefficients are laid out on that sub-rectangle of the input (it must hold every kernel
        # position of the rows that falls inside the image).
        y0, x0, wh, ww = window if window is not None else (0, 0, h, w)
        rows_in, cols_in = rows_in - y0, cols_in - x0
        inside = (rows_in >= 0) & (rows_in < wh) & (cols_in >= 0) & (cols_in < ww)
        pos = (chan * wh + rows_in.clamp(0, wh - 1)) * ww + cols_in.clamp(0, ww - 1)
        dump = c_in * wh * ww
        pos = torch.where(inside, pos.expand(n, k, cg, kh, kw), torch.full_like(pos, dump).expand(n, k, cg, kh, kw))
        vals = op.weight[c] * vf.view(n, k, 1, 1, 1)
        out = vals.new_zeros(n, k, dump + 1).scatter_add_(2, pos.reshape(n, k, -1), vals.reshape(n, k, -1))
        return [out[:, :, :dump].reshape(n, k, c_in, wh, ww)], op.bias[c] * vf
    if isinstance(op, LinearOp):
        # y[..., o] = W[o] . x[..., :] + b[o]: row (prefix, o) is W[o] placed at that prefix.
        shape = net.nodes[name].shape
        out_f, in_f = op.weight.shape
        prefix, o = idx // out_f, idx % out_f
        vals = op.weight[o] * vf.unsqueeze(-1)  # (N, k, in)
        if len(shape) == 1:
            return [vals], op.bias[o] * vf
        p_in = net.nodes[net.nodes[name].inputs[0]].shape
        numel_in = 1
        for d in p_in:
            numel_in *= d
        pos = (prefix * in_f).unsqueeze(-1) + torch.arange(in_f, device=idx.device)
        out = vals.new_zeros(n, k, numel_in).scatter_(2, pos, vals)
        return [out.reshape(n, k, *p_in)], op.bias[o] * vf
    return None


def _net_dtype(op: object, like: Tensor) -> torch.dtype:
    """The floating-point dtype of an operator's constants (the default dtype when it has none)."""
    for value in vars(op).values():
        if isinstance(value, Tensor) and value.is_floating_point():
            return value.dtype
    return torch.get_default_dtype()


def select_rows(need: Tensor) -> tuple[Tensor, Tensor]:
    """Per-sample row selection: ``(idx, valid)`` of shape ``(N, kmax)`` listing each sample's ``need`` neurons first.

    ``kmax`` is the largest count over the samples; ``valid`` marks the real rows (the others are padding).
    """
    counts = need.sum(1)
    kmax = int(counts.max()) if need.shape[0] else 0
    # Stable sort puts each sample's selected neurons first, in increasing order.
    order = torch.sort((~need).to(torch.uint8), dim=1, stable=True).indices[:, :kmax]
    used = torch.arange(kmax, device=need.device).unsqueeze(0) < counts.unsqueeze(1)
    return order, used


def onehot_lower(
    net: Network,
    name: str,
    idx: Tensor,
    valid: Tensor,
    lower: Tensor,
    upper: Tensor,
    pre: dict[str, Bounds],
    *,
    mode: str = "crown",
    alphas: dict[str, Tensor] | None = None,
) -> Tensor:
    """Lower bounds of ``+x_idx`` and ``-x_idx`` for the neurons ``idx`` ``(N, k)`` of ``name``: ``(N, 2k)``.

    The first ``k`` columns bound the neurons from below, the last ``k`` are minus their upper bounds; rows where
    ``valid`` is False are padding (zero coefficients). ``alphas`` are relaxation parameters shaped
    ``(N, 2k, *parameter shape)``.
    """
    n, k = idx.shape
    node = net.nodes[name]
    step = _onehot_step(net, name, idx, valid) if node.op.linear else None
    if step is None:
        p = 1
        for d in node.shape:
            p *= d
        eye = lower.new_zeros(n, k, p).scatter_(2, idx.unsqueeze(-1), valid.unsqueeze(-1).to(lower.dtype))
        A = eye.reshape(n, k, *node.shape)
        return backsubstitute(net, name, torch.cat([A, -A], 1), lower, upper, pre, mode=mode, alphas=alphas)
    back, b = step
    acc: dict[str, Tensor | _Win] = {}
    for inp, ai in zip(node.inputs, back):
        ai = ai.to(lower.dtype)
        _accumulate(acc, inp, torch.cat([ai, -ai], 1), net.nodes[inp].shape)
    b = b.to(lower.dtype)
    return _propagate(net, name, acc, torch.cat([b, -b], 1), lower, upper, pre, alphas=alphas, mode=mode, skip=name)


#: Back-substitute the intermediate rows of convolutions on windows (:func:`_tiled_bounds`); off only to test that
#: it gives the same bounds as the dense rows.
_WINDOWS = True

#: Tiles per spatial dimension for windowed rows; None chooses by a cost estimate (:func:`_choose_tiles`).
_TILES: int | None = None


#: Fixed cost of one operator step, in coefficient entries (PyTorch call overhead), for choosing the tiling.
_STEP_COST = 60_000


def _read_window(op: object, y0: int, x0: int, y1: int, x1: int) -> tuple[int, int, int, int] | None:
    """The input window ``[y0, y1) x [x0, x1)`` an operator reads for an output window; None when not windowed."""
    if isinstance(op, (Conv2dOp, MaxPool2dOp)):
        if isinstance(op, Conv2dOp):
            if len(op.in_shape) != 3:
                return None
            (kh, kw), in_h, in_w = op.weight.shape[2:], op.in_shape[1], op.in_shape[2]
        else:
            (kh, kw), in_h, in_w = op.kernel_size, op.in_shape[1], op.in_shape[2]
        (sh, sw), (ph, pw), (dh, dw) = op.stride, op.padding, op.dilation
        ny0, nx0 = max(0, y0 * sh - ph), max(0, x0 * sw - pw)
        ny1 = min(in_h, (y1 - 1) * sh - ph + dh * (kh - 1) + 1)
        nx1 = min(in_w, (x1 - 1) * sw - pw + dw * (kw - 1) + 1)
        return (ny0, nx0, max(ny1, ny0 + 1), max(nx1, nx0 + 1))
    if hasattr(op, "backward_window") or hasattr(op, "backward_bound_window"):
        return (y0, x0, y1, x1)
    return None


def _window_cost(net: Network, name: str, tile: tuple[int, int, int, int]) -> int:
    """Coefficient entries per row of a backward pass from the rows of ``name`` in ``tile`` (windows where possible)."""
    order = list(net.nodes)
    wins: dict[str, tuple[int, int, int, int] | None] = {name: tile}
    total = 0
    for k in reversed(order[: order.index(name) + 1]):
        if k not in wins:
            continue
        win = wins.pop(k)
        shape = net.nodes[k].shape
        if win is None or len(shape) != 3:
            numel = 1
            for d in shape:
                numel *= d
            total += numel
            win = None
        else:
            total += shape[0] * (win[2] - win[0]) * (win[3] - win[1])
        if k == net.input_name:
            continue
        node = net.nodes[k]
        read = _read_window(node.op, *win) if win is not None else None
        for inp in node.inputs:
            if inp in wins:
                old = wins[inp]
                if old is None or read is None:
                    wins[inp] = None
                else:
                    wins[inp] = (min(old[0], read[0]), min(old[1], read[1]), max(old[2], read[2]), max(old[3], read[3]))
            else:
                wins[inp] = read
    return total


#: Per network, the per-row window cost of every tile of each tiling of a node (static geometry, computed once).
_TILE_COSTS: weakref.WeakKeyDictionary[Network, dict[tuple[str, int], Tensor]] = weakref.WeakKeyDictionary()


def _choose_tiles(net: Network, name: str, need: Tensor) -> int:
    """Tiles per spatial dimension minimising the estimated cost (1: no tiling, the dense rows are used)."""
    c, h, w = net.nodes[name].shape
    n = need.shape[0]
    per_pixel = need.reshape(n, c, h, w).sum(1, dtype=torch.int32)  # (N, H, W) rows per pixel
    n_nodes = len(_ancestors(net, name))
    costs = _TILE_COSTS.setdefault(net, {})
    best, best_cost = 1, None
    for tiles in (1, 2, 3, 4, 6, 8):
        if tiles > max(h, w):
            break
        th, tw = -(-h // tiles), -(-w // tiles)
        nty, ntx = -(-h // th), -(-w // tw)
        if (name, tiles) not in costs:
            per_row = [
                [_window_cost(net, name, (ty, tx, min(h, ty + th), min(w, tx + tw))) for tx in range(0, w, tw)]
                for ty in range(0, h, th)
            ]
            costs[(name, tiles)] = torch.tensor(per_row, dtype=torch.float64)
        # Rows per tile: the largest count over the samples (rows are padded to it).
        padded = F.pad(per_pixel, (0, ntx * tw - w, 0, nty * th - h))
        rows = padded.reshape(n, nty, th, ntx, tw).sum((2, 4)).amax(0).to("cpu", torch.float64)
        cost = float((2 * n * rows * costs[(name, tiles)]).sum() + _STEP_COST * n_nodes * int((rows > 0).sum()))
        if best_cost is None or cost < best_cost:
            best, best_cost = tiles, cost
    return best


def _tiled_bounds(
    net: Network,
    name: str,
    lower: Tensor,
    upper: Tensor,
    pre: dict[str, Bounds],
    mode: str,
    need: Tensor,
    lo_out: Tensor,
    hi_out: Tensor,
    tiles: int,
) -> None:
    """:func:`_node_bounds` for a ``(C, H, W)`` node, one spatial tile of rows at a time on windows (:class:`_Win`).

    A convolution's rows start on the window of its input in closed form (:func:`_onehot_step`); other affine
    producers with a windowed rule (per-channel affine, sums of branches) start from one-hot rows on the tile itself.
    Writes the bounds of the ``need`` neurons into ``lo_out`` / ``hi_out`` ``(N, P)``.
    """
    n = need.shape[0]
    op = net.nodes[name].op
    c_out, out_h, out_w = net.nodes[name].shape
    th, tw = -(-out_h // tiles), -(-out_w // tiles)
    grid = need.reshape(n, c_out, out_h, out_w)
    for ty in range(0, out_h, th):
        for tx in range(0, out_w, tw):
            tile = torch.zeros_like(grid)
            tile[:, :, ty : ty + th, tx : tx + tw] = grid[:, :, ty : ty + th, tx : tx + tw]
            tile_need = tile.reshape(n, -1)
            if not bool(tile_need.any()):
                continue
            idx, valid = select_rows(tile_need)
            k = idx.shape[1]
            y1, x1 = min(out_h, ty + th), min(out_w, tx + tw)
            if isinstance(op, Conv2dOp):
                _, in_h, in_w = op.in_shape
                kh, kw = op.weight.shape[2:]
                iy0 = max(0, ty * op.stride[0] - op.padding[0])
                ix0 = max(0, tx * op.stride[1] - op.padding[1])
                iy1 = min(in_h, (y1 - 1) * op.stride[0] - op.padding[0] + op.dilation[0] * (kh - 1) + 1)
                ix1 = min(in_w, (x1 - 1) * op.stride[1] - op.padding[1] + op.dilation[1] * (kw - 1) + 1)
                if iy1 <= iy0 or ix1 <= ix0:
                    # The tile reads only zero padding: its neurons are the constant bias.
                    b = op.bias[idx // (out_h * out_w)].to(lower.dtype)
                    lb = torch.cat([b, -b], 1)
                else:
                    step = _onehot_step(net, name, idx, valid, (iy0, ix0, iy1 - iy0, ix1 - ix0))
                    assert step is not None
                    (t,), b = step
                    t, b = t.to(lower.dtype), b.to(lower.dtype)
                    acc: dict[str, Tensor | _Win] = {net.nodes[name].inputs[0]: _Win(torch.cat([t, -t], 1), iy0, ix0)}
                    lb = _propagate(net, name, acc, torch.cat([b, -b], 1), lower, upper, pre, mode=mode, skip=name)
            else:
                # One-hot rows on the tile: row r of sample s is neuron idx[s, r] = (c, i, j), at (c, i - ty, j - tx).
                wh, ww = y1 - ty, x1 - tx
                c, i, j = idx // (out_h * out_w), (idx // out_w) % out_h, idx % out_w
                # Padding rows may name neurons outside the tile; they carry a zero anyway.
                local = torch.where(valid, (c * wh + (i - ty)) * ww + (j - tx), torch.zeros_like(idx))
                t = lower.new_zeros(n, k, c_out * wh * ww)
                t.scatter_(2, local.unsqueeze(-1), valid.unsqueeze(-1).to(lower.dtype))
                t = t.reshape(n, k, c_out, wh, ww)
                acc = {name: _Win(torch.cat([t, -t], 1), ty, tx)}
                lb = _propagate(net, name, acc, lower.new_zeros(n, 2 * k), lower, upper, pre, mode=mode)
            rows = idx.masked_select(valid)
            who = torch.arange(n, device=need.device).unsqueeze(1).expand(n, k).masked_select(valid)
            lo_out[who, rows] = lb[:, :k].masked_select(valid)
            hi_out[who, rows] = -lb[:, k:].masked_select(valid)


def _node_bounds(
    net: Network, name: str, lower: Tensor, upper: Tensor, pre: dict[str, Bounds], mode: str, need: Tensor
) -> Bounds:
    """Bounds of the flattened neurons of ``name`` selected per sample by ``need`` ``(N, P)``, by back-substitution.

    Each sample back-substitutes only its own selected neurons: the rows of sample ``s`` are the one-hot vectors of
    its selected neurons (padded to the largest count with zero rows), and the first backward step through the
    affine producer is taken without materialising the one-hot rows when the operator allows it
    (:func:`_onehot_step`). Lower and upper bounds share that first step (the upper rows are its negation).

    Returns:
        ``(lo, hi)`` of shape ``(N, P)``; entries outside ``need`` are ``-inf`` / ``+inf``.
    """
    n, p = need.shape
    order, used = select_rows(need)
    kmax = order.shape[1]
    lo_out = lower.new_full((n, p), float("-inf"))
    hi_out = lower.new_full((n, p), float("inf"))
    if kmax == 0:
        return lo_out, hi_out
    op = net.nodes[name].op
    windowed = len(op.in_shape) == 3 if isinstance(op, Conv2dOp) else hasattr(op, "backward_window")
    if _WINDOWS and windowed and len(net.nodes[name].shape) == 3:
        tiles = _TILES if _TILES is not None else _choose_tiles(net, name, need)
        if tiles > 1:
            _tiled_bounds(net, name, lower, upper, pre, mode, need, lo_out, hi_out, tiles)
            return lo_out, hi_out
    per = max(1, MAX_ENTRIES // max(1, 2 * n * _widest(net, name)))
    for s0 in range(0, kmax, per):
        idx, valid = order[:, s0 : s0 + per], used[:, s0 : s0 + per]
        k = idx.shape[1]
        lb = onehot_lower(net, name, idx, valid, lower, upper, pre, mode=mode)
        rows = idx.masked_select(valid)
        who = torch.arange(n, device=need.device).unsqueeze(1).expand(n, k).masked_select(valid)
        lo_out[who, rows] = lb[:, :k].masked_select(valid)
        hi_out[who, rows] = -lb[:, k:].masked_select(valid)
    return lo_out, hi_out


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
                    chain = _ancestors(net, src)
                    if all(net.nodes[k].op.linear for k in chain[1:]):
                        # No relaxation between the input and this node: exact bounds, cheaply in forward mode.
                        al, ah = _affine_bounds(net, src, chain, lower, upper)
                        lo_f, hi_f = torch.maximum(lo_f, al.reshape(n, -1)), torch.minimum(hi_f, ah.reshape(n, -1))
                    elif bool(need.any()):
                        cl, ch = _node_bounds(net, src, lower, upper, pre, mode, need)
                        lo_f, hi_f = torch.maximum(lo_f, cl), torch.minimum(hi_f, ch)
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


def crown_ibp_bounds(
    net: Network,
    lower: Tensor,
    upper: Tensor,
    C: Tensor,
    *,
    splits: dict[str, Tensor] | None = None,
    intermediate: dict[str, Bounds] | None = None,
    reuse_intermediate: bool = False,
    bound_upper: bool = True,
) -> tuple[Tensor, Tensor, dict[str, Bounds]]:
    """CROWN-IBP: interval pre-activation bounds, then one CROWN backward pass for the specification.

    Zhang, Chen, Xiao, Gowal, Stanforth, Li, Boning, Hsieh, "Towards Stable and Efficient Training of Verifiably
    Robust Neural Networks", ICLR 2020. The intermediate bounds cost one forward interval pass; only the final
    specification is back-substituted, so the cost is about that of IBP plus one backward pass (used for certified
    training and fast certification). Sound, usually between IBP and CROWN in tightness; the final bound is
    intersected with the IBP bound of the specification, so it is never looser than IBP.

    Args:
        net: the network.
        lower: ``(N, *input_shape)``.
        upper: ``(N, *input_shape)``.
        C: ``(N, m, K)``.
        splits: ReLU split decisions.
        intermediate: known pre-activation bounds (intersected).
        reuse_intermediate: take the known bounds as they are.
        bound_upper: also compute the upper bounds (else they are ``+inf``).

    Returns:
        ``(lower (N, m), upper (N, m), pre-activation bounds)``.
    """
    ilo, ihi, pre = ibp_bounds(
        net, lower, upper, C, splits=splits, intermediate=intermediate, reuse_intermediate=reuse_intermediate
    )
    lo, hi = final_bounds(net, lower, upper, C, pre, bound_upper=bound_upper)
    lo = torch.maximum(lo, ilo)
    if bound_upper:
        hi = torch.minimum(hi, ihi)
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
    lagrange: dict[str, Tensor] | None = None,
) -> Bounds:
    """Back-substitute the specification ``C`` ``(N, m, K)`` given the pre-activation bounds ``pre``.

    ``lagrange`` adds split-constraint terms, see :func:`backsubstitute` (rows ``[C; -C]`` when ``bound_upper``).
    """
    n, m = C.shape[:2]
    out_shape = net.output_shape
    A = C.reshape(n, m, *out_shape)
    if bound_upper:
        A = torch.cat([A, -A], 1)
    lb = backsubstitute(net, net.output_name, A, lower, upper, pre, alphas=alphas, mode=mode, lagrange=lagrange)
    if bound_upper:
        return lb[:, :m], -lb[:, m:]
    return lb, torch.full_like(lb, float("inf"))
