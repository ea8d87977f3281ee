"""The verification IR: a network as a topologically ordered graph of bound operators.

:meth:`Network.from_module` traces a ``torch.nn.Module`` with ``torch.fx`` and translates each fx node into a
:class:`~bastion.verify.ops.BoundOp` (constants read from the module; BatchNorm in eval mode folded into the preceding
Linear/Conv2d when that layer feeds nothing else, kept as a per-channel affine op otherwise). The ONNX importer emits
the same fx forms, so both routes share this translation. Every shape stored here is per sample (no batch dim).

By default the network is a *snapshot*: every weight is copied, so later changes to the model do not affect it.
``Network.from_module(model, shape, live=True)`` builds a *live* network instead, whose Linear and Conv2d operators
hold the model's ``nn.Parameter`` objects themselves: bounds computed on it are differentiable in the parameters and
follow every in-place optimiser step, so certified training builds it once per run (see
:mod:`bastion.defenses.training.certified`).
"""

from __future__ import annotations

import builtins
import math
import operator
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import Tensor, nn

from bastion.errors import InputError
from bastion.models.normalize import Normalize, normalize
from bastion.verify.ops import (
    OP_REGISTRY,
    AddOp,
    BoundOp,
    ChannelAffineOp,
    Conv2dOp,
    GenericLinearOp,
    InputOp,
    LeakyReLUOp,
    LinearOp,
    MaxPool2dOp,
    ReindexOp,
    ReLUOp,
    SigmoidOp,
    SubOp,
    TanhOp,
)

__all__ = ["Network", "Node"]


@dataclass
class Node:
    """One operator of the IR.

    Attributes:
        name: unique name (the fx node name).
        op: the bound operator.
        inputs: names of the IR nodes feeding this one, in the order ``op`` takes them (constants excluded).
        shape: per-sample output shape (no batch dimension).
    """

    name: str
    op: BoundOp
    inputs: tuple[str, ...]
    shape: tuple[int, ...]


class _Batch:
    """The symbolic batch size (from ``x.size(0)`` / ``x.shape[0]``)."""

    def __repr__(self) -> str:
        return "<batch>"


BATCH = _Batch()


class _Shape(tuple):
    """A traced ``x.shape``: the batch size then the concrete per-sample dims."""


class _Ref(str):
    """The name of an IR node used as an fx value (distinguishes IR tensors from constants)."""


def _pair(v: Any) -> tuple[int, int]:
    if isinstance(v, (tuple, list)):
        return (int(v[0]), int(v[1])) if len(v) == 2 else (int(v[0]), int(v[0]))
    return int(v), int(v)


def _bind(name: str, args: tuple[Any, ...], kwargs: dict[str, Any], params: Sequence[tuple[str, Any]]) -> dict:
    """Bind positional and keyword arguments to ``params`` (name, default) pairs; ``...`` marks required."""
    out: dict[str, Any] = {}
    names = [p for p, _ in params]
    if len(args) > len(params):
        raise InputError(f"{name}: too many arguments")
    for (p, _), a in zip(params, args):
        out[p] = a
    for k, v in kwargs.items():
        if k not in names:
            raise InputError(f"{name}: unsupported keyword argument {k!r}")
        out[k] = v
    for p, d in params:
        if p not in out:
            if d is ...:
                raise InputError(f"{name}: missing argument {p!r}")
            out[p] = d
    return out


def _target_name(target: Any) -> str:
    if isinstance(target, str):
        return target
    mod = getattr(target, "__module__", None) or ""
    return f"{mod}.{getattr(target, '__name__', repr(target))}".lstrip(".")


class _Tracer(fx.Tracer):
    """fx tracer that keeps :class:`Normalize` and registered custom modules as leaves."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if isinstance(m, Normalize) or type(m) in OP_REGISTRY:
            return True
        return super().is_leaf_module(m, module_qualified_name)


_RELU_FNS = {torch.relu, F.relu, torch.nn.functional.relu}
_SIGMOID_FNS = {torch.sigmoid, F.sigmoid}
_TANH_FNS = {torch.tanh, F.tanh}
_ADD = {operator.add, torch.add, operator.iadd}
_SUB = {operator.sub, torch.sub, operator.isub}
_MUL = {operator.mul, torch.mul, operator.imul}
_DIV = {operator.truediv, torch.div, operator.itruediv}
_MATMUL = {operator.matmul, torch.matmul}
_RESHAPE_METHODS = {"view", "reshape", "flatten", "permute", "transpose", "squeeze", "unsqueeze", "contiguous"}


class _Builder:
    """Translates an fx graph into IR nodes."""

    def __init__(
        self,
        root: nn.Module,
        input_shape: tuple[int, ...],
        device: torch.device,
        dtype: torch.dtype,
        live: bool = False,
    ):
        self.root = root
        self.live = live
        self.device, self.dtype = device, dtype
        self.nodes: dict[str, Node] = {}
        self.env: dict[str, Any] = {}
        self.input_shape = input_shape
        self.users: dict[str, int] = {}
        self.where = ""

    # -- helpers ----------------------------------------------------------------------------------------------
    def fail(self, what: str) -> InputError:
        return InputError(f"Network.from_module: {what} at {self.where}")

    def add(self, name: str, op: BoundOp, inputs: Sequence[str]) -> _Ref:
        in_shapes = [self.nodes[i].shape for i in inputs]
        # Index maps are built on the CPU; every constant lives on the model's device.
        op = op.to(self.device)
        try:
            with torch.no_grad():
                probe = op.forward(*[torch.zeros((1, *s), device=self.device, dtype=self.dtype) for s in in_shapes])
        except Exception as exc:  # a shape clash from user weights, reported where it happens
            raise self.fail(f"{op!r} cannot be applied to inputs of shape {in_shapes}: {exc}") from exc
        if probe.dim() < 1 or probe.shape[0] != 1:
            raise self.fail(f"{op!r} moves the batch dimension")
        self.nodes[name] = Node(name, op, tuple(inputs), tuple(probe.shape[1:]))
        return _Ref(name)

    def const(self, value: Any) -> Tensor:
        if isinstance(value, (_Batch, _Shape)):
            raise self.fail("arithmetic with the batch size is not supported")
        if self.live and isinstance(value, Tensor) and value.requires_grad:
            # A copy would silently freeze this parameter in a network that promises to follow the model.
            raise self.fail(
                "live mode: a trainable parameter is used by an operation that can only hold a copy of it (only "
                "the weight and bias of Linear/Conv2d layers and F.linear/F.conv2d stay live); build a snapshot "
                "network (live=False) or freeze that parameter"
            )
        return torch.as_tensor(value, dtype=self.dtype, device=self.device).detach().clone()

    def param(self, value: Tensor) -> Tensor:
        """A weight or bias of Linear/Conv2d: the tensor itself in live mode (when trainable), else a copy."""
        if self.live and value.requires_grad:
            if value.device != self.device or value.dtype != self.dtype:
                raise self.fail(
                    f"live mode: parameter on {value.device} / {value.dtype} differs from the model's "
                    f"{self.device} / {self.dtype}; keep every parameter on one device and dtype"
                )
            return value
        return self.const(value)

    def value(self, a: Any) -> Any:
        if isinstance(a, fx.Node):
            return self.env[a.name]
        if isinstance(a, (tuple, list)):
            return type(a)(self.value(x) for x in a)
        if isinstance(a, dict):
            return {k: self.value(v) for k, v in a.items()}
        return a

    def no_live_folding(self, what: str, values: list[Any]) -> None:
        """In live mode, refuse to fold a computation on a trainable parameter into a constant (a frozen copy)."""
        if self.live and any(isinstance(v, Tensor) and v.requires_grad for v in values):
            raise self.fail(
                f"live mode: {what} on a trainable parameter would be folded into a frozen copy; compute it inside "
                "an nn.Linear/nn.Conv2d or build a snapshot network (live=False)"
            )

    def per_sample_const(self, c: Tensor, shape: tuple[int, ...], what: str) -> Tensor:
        """Check that a constant broadcast against ``(N, *shape)`` keeps the per-sample shape; drop a batch dim."""
        if c.dim() > len(shape):
            if c.dim() == len(shape) + 1 and c.shape[0] == 1:
                c = c[0]
            else:
                raise self.fail(f"{what}: constant of shape {tuple(c.shape)} does not broadcast to {shape}")
        try:
            if torch.broadcast_shapes(tuple(c.shape), shape) != torch.Size(shape):
                raise RuntimeError
        except RuntimeError:
            raise self.fail(f"{what}: constant of shape {tuple(c.shape)} does not broadcast to {shape}") from None
        return c

    def affine(self, name: str, x: _Ref, scale: Any, shift: Any, what: str) -> _Ref:
        shape = self.nodes[x].shape
        s = self.per_sample_const(self.const(scale), shape, what)
        t = self.per_sample_const(self.const(shift), shape, what)
        return self.add(name, ChannelAffineOp(s, t), [x])

    def leaky(self, slope: float) -> LeakyReLUOp:
        try:
            return LeakyReLUOp(slope)
        except InputError as exc:
            raise self.fail(str(exc)) from None

    def reindex(self, name: str, x: _Ref, fn: Callable[[Tensor], Tensor], what: str) -> _Ref:
        shape = self.nodes[x].shape
        try:
            op = ReindexOp(fn, shape, what)
        except InputError:
            raise
        except Exception as exc:
            raise self.fail(f"{what} cannot be applied to shape {shape}: {exc}") from exc
        return self.add(name, op, [x])

    def dim(self, d: Any, ndim: int, what: str, *, allow_end: bool = False) -> int:
        """Normalise a dim of the batched tensor (rank ``ndim``) and refuse the batch dimension."""
        if not isinstance(d, int):
            raise self.fail(f"{what}: dimension must be an int, got {d!r}")
        size = ndim + 1 if allow_end else ndim
        dd = d + size if d < 0 else d
        if dd == 0:
            raise self.fail(f"{what} on the batch dimension is not supported")
        if not 0 < dd < size:
            raise self.fail(f"{what}: dimension {d} out of range")
        return dd

    # -- node kinds ---------------------------------------------------------------------------------------------
    def reshape_to(self, name: str, x: _Ref, target: Sequence[Any], what: str) -> _Ref:
        shape = self.nodes[x].shape
        numel = math.prod(shape)
        target = list(target[0]) if len(target) == 1 and isinstance(target[0], (tuple, list)) else list(target)
        if not target:
            raise self.fail(f"{what}: empty target shape")
        first, rest = target[0], target[1:]
        if any(r is BATCH for r in rest) or not all(isinstance(r, int) for r in rest):
            raise self.fail(f"{what}: target shape {target} must keep the batch dimension first")
        if first is BATCH or first == -1:
            if first == -1 and rest.count(-1) > 0:
                raise self.fail(f"{what}: target shape {target} is ambiguous about the batch dimension")
        else:
            raise self.fail(f"{what}: target shape {target} must start with the batch size (x.size(0) or -1)")
        if rest.count(-1) > 1:
            raise self.fail(f"{what}: target shape {target} has more than one -1")
        known = math.prod(r for r in rest if r != -1)
        if -1 in rest:
            if known == 0 or numel % known:
                raise self.fail(f"{what}: cannot reshape per-sample shape {shape} to {target}")
            rest = [numel // known if r == -1 else r for r in rest]
        if math.prod(rest) != numel:
            raise self.fail(f"{what}: reshaping per-sample shape {shape} to {target} would mix the batch dimension")
        out = tuple(rest)
        return self.reindex(name, x, lambda t: t.reshape(t.shape[0], *out), f"reshape{out}")

    def flatten(self, name: str, x: _Ref, start: Any, end: Any, what: str) -> _Ref:
        ndim = len(self.nodes[x].shape) + 1
        s = self.dim(start, ndim, what)
        e = end + ndim if end < 0 else end
        if e < s:
            raise self.fail(f"{what}: end_dim before start_dim")
        return self.reindex(name, x, lambda t: torch.flatten(t, s, e), f"flatten({s},{e})")

    def permute(self, name: str, x: _Ref, dims: Sequence[Any], what: str) -> _Ref:
        ndim = len(self.nodes[x].shape) + 1
        if len(dims) == 1 and isinstance(dims[0], (tuple, list)):
            dims = dims[0]
        norm = [d + ndim if isinstance(d, int) and d < 0 else d for d in dims]
        if len(norm) != ndim or norm[0] != 0:
            raise self.fail(f"{what}: permutation {list(dims)} must keep the batch dimension first")
        perm = tuple(int(d) for d in norm)
        return self.reindex(name, x, lambda t: t.permute(perm), f"permute{perm}")

    def transpose(self, name: str, x: _Ref, d0: Any, d1: Any, what: str) -> _Ref:
        ndim = len(self.nodes[x].shape) + 1
        a, b = self.dim(d0, ndim, what), self.dim(d1, ndim, what)
        return self.reindex(name, x, lambda t: t.transpose(a, b), f"transpose({a},{b})")

    def squeeze(self, name: str, x: _Ref, dims: Sequence[Any], what: str) -> _Ref:
        shape = self.nodes[x].shape
        ndim = len(shape) + 1
        if not dims or dims[0] is None:
            sel = tuple(i + 1 for i, s in enumerate(shape) if s == 1)
        else:
            raw = dims[0] if isinstance(dims[0], (tuple, list)) else dims
            sel = tuple(self.dim(d, ndim, what) for d in raw)
        return self.reindex(name, x, lambda t: t.squeeze(sel) if sel else t, f"squeeze{sel}")

    def unsqueeze(self, name: str, x: _Ref, d: Any, what: str) -> _Ref:
        ndim = len(self.nodes[x].shape) + 1
        dd = self.dim(d, ndim, what, allow_end=True)
        return self.reindex(name, x, lambda t: t.unsqueeze(dd), f"unsqueeze({dd})")

    def linear(self, name: str, x: _Ref, w: Any, b: Any) -> _Ref:
        if not isinstance(w, Tensor) or (b is not None and not isinstance(b, Tensor)):
            raise self.fail("linear: weight and bias must be constants")
        return self.add(name, LinearOp(self.param(w), None if b is None else self.param(b)), [x])

    def conv2d(self, name: str, x: _Ref, w: Any, b: Any, stride: Any, padding: Any, dilation: Any, groups: int) -> _Ref:
        if not isinstance(w, Tensor) or (b is not None and not isinstance(b, Tensor)):
            raise self.fail("conv2d: weight and bias must be constants")
        if len(self.nodes[x].shape) != 3 or w.dim() != 4:
            raise self.fail(f"conv2d: needs (C, H, W) inputs and 4-D weights, got {self.nodes[x].shape}")
        dil = _pair(dilation)
        if isinstance(padding, str):
            if padding == "valid":
                pad = (0, 0)
            elif padding == "same":
                totals = [dil[i] * (w.shape[2 + i] - 1) for i in range(2)]
                if any(t % 2 for t in totals):
                    raise self.fail("conv2d: asymmetric 'same' padding (even kernel) is not supported")
                pad = (totals[0] // 2, totals[1] // 2)
            else:
                raise self.fail(f"conv2d: unknown padding {padding!r}")
        else:
            pad = _pair(padding)
        op = Conv2dOp(
            self.param(w),
            None if b is None else self.param(b),
            stride=_pair(stride),
            padding=pad,
            dilation=dil,
            groups=int(groups),
            in_shape=self.nodes[x].shape,
        )
        return self.add(name, op, [x])

    def avg_pool(self, name: str, x: _Ref, kw: dict[str, Any]) -> _Ref:
        k = kw["kernel_size"]
        s = kw["stride"] if kw["stride"] not in (None, []) else k
        p, ceil, inc, div = kw["padding"], kw["ceil_mode"], kw["count_include_pad"], kw["divisor_override"]

        def fn(t: Tensor) -> Tensor:
            return F.avg_pool2d(t, k, s, p, ceil, inc, div)

        op = GenericLinearOp(lambda t: fn(t), lambda t: fn(t), (), self.nodes[x].shape, f"avg_pool2d({k})")
        return self.add(name, op, [x])

    def max_pool(self, name: str, x: _Ref, kw: dict[str, Any]) -> _Ref:
        if kw.get("ceil_mode") or kw.get("return_indices"):
            raise self.fail("max_pool2d with ceil_mode=True or return_indices=True is not supported")
        if len(self.nodes[x].shape) != 3:
            raise self.fail(f"max_pool2d needs (C, H, W) inputs, got {self.nodes[x].shape}")
        k = _pair(kw["kernel_size"])
        s = _pair(kw["stride"]) if kw["stride"] not in (None, []) else k
        op = MaxPool2dOp(
            kernel_size=k,
            stride=s,
            padding=_pair(kw["padding"]),
            dilation=_pair(kw["dilation"]),
            in_shape=self.nodes[x].shape,
        )
        return self.add(name, op, [x])

    def batchnorm(self, name: str, x: _Ref, m: nn.modules.batchnorm._BatchNorm, fx_input: fx.Node) -> _Ref:
        if self.live:
            # Folded or not, the eval-mode affine map would be computed once from the current statistics and
            # parameters, a snapshot inside a network that promises to follow the model (and in training mode
            # BatchNorm uses batch statistics, which no fixed operator represents).
            raise self.fail(
                "BatchNorm is not supported in live mode (certified training); remove it or build a snapshot "
                "network (live=False)"
            )
        if m.running_mean is None or m.running_var is None:
            raise self.fail("BatchNorm without running statistics (track_running_stats=False) is not supported")
        var = m.running_var.detach().to(self.dtype)
        scale = 1.0 / torch.sqrt(var + m.eps)
        if m.weight is not None:
            scale = scale * m.weight.detach().to(self.dtype)
        shift = -m.running_mean.detach().to(self.dtype) * scale
        if m.bias is not None:
            shift = shift + m.bias.detach().to(self.dtype)
        scale, shift = scale.to(self.device), shift.to(self.device)
        prev = self.nodes[x]
        # Fold into the producing Linear/Conv2d when BN is its only consumer (the IR then has one op fewer).
        if self.users.get(fx_input.name, 0) == 1 and x == fx_input.name:
            if isinstance(prev.op, Conv2dOp):
                prev.op.weight = prev.op.weight * scale.reshape(-1, 1, 1, 1)
                prev.op.bias = prev.op.bias * scale + shift
                return x
            if isinstance(prev.op, LinearOp) and len(prev.shape) == 1:
                prev.op.weight = prev.op.weight * scale.reshape(-1, 1)
                prev.op.bias = prev.op.bias * scale + shift
                return x
        shape = prev.shape
        if not shape or shape[0] != scale.numel():
            raise self.fail(f"BatchNorm with {scale.numel()} channels applied to shape {shape}")
        view = (-1,) + (1,) * (len(shape) - 1)
        return self.add(name, ChannelAffineOp(scale.reshape(view), shift.reshape(view)), [x])

    # -- dispatch -----------------------------------------------------------------------------------------------
    def module(self, n: fx.Node) -> Any:
        m = self.root.get_submodule(str(n.target))
        args = self.value(n.args)
        kwargs = self.value(n.kwargs)
        if type(m) in OP_REGISTRY:
            refs = [a for a in list(args) + list(kwargs.values()) if isinstance(a, _Ref)]
            op = OP_REGISTRY[type(m)](m, [self.nodes[r].shape for r in refs])
            return self.add(n.name, op, refs)
        if len(args) != 1 or kwargs or not isinstance(args[0], _Ref):
            raise self.fail(f"module {type(m).__name__} must be called on one IR tensor")
        x = args[0]
        name = n.name
        if isinstance(m, (nn.Identity, nn.Dropout)):
            return x
        if isinstance(m, nn.Linear):
            return self.linear(name, x, self.weight(m.weight), None if m.bias is None else self.weight(m.bias))
        if isinstance(m, nn.Conv2d):
            if m.padding_mode != "zeros":
                raise self.fail(f"Conv2d with padding_mode={m.padding_mode!r} is not supported")
            b = None if m.bias is None else self.weight(m.bias)
            return self.conv2d(name, x, self.weight(m.weight), b, m.stride, m.padding, m.dilation, m.groups)
        if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
            return self.batchnorm(name, x, m, n.args[0])  # type: ignore[arg-type]
        if isinstance(m, nn.ReLU):
            return self.add(name, ReLUOp(), [x])
        if isinstance(m, nn.LeakyReLU):
            return self.add(name, self.leaky(m.negative_slope), [x])
        if isinstance(m, nn.Sigmoid):
            return self.add(name, SigmoidOp(), [x])
        if isinstance(m, nn.Tanh):
            return self.add(name, TanhOp(), [x])
        if isinstance(m, nn.Flatten):
            return self.flatten(name, x, m.start_dim, m.end_dim, "Flatten")
        if isinstance(m, nn.AvgPool2d):
            kw = {
                "kernel_size": m.kernel_size,
                "stride": m.stride,
                "padding": m.padding,
                "ceil_mode": m.ceil_mode,
                "count_include_pad": m.count_include_pad,
                "divisor_override": m.divisor_override,
            }
            return self.avg_pool(name, x, kw)
        if isinstance(m, nn.AdaptiveAvgPool2d):
            size = m.output_size
            op = GenericLinearOp(
                lambda t: F.adaptive_avg_pool2d(t, size),
                lambda t: F.adaptive_avg_pool2d(t, size),
                (),
                self.nodes[x].shape,
                f"adaptive_avg_pool2d({size})",
            )
            return self.add(name, op, [x])
        if isinstance(m, nn.MaxPool2d):
            kw = {
                "kernel_size": m.kernel_size,
                "stride": m.stride,
                "padding": m.padding,
                "dilation": m.dilation,
                "ceil_mode": m.ceil_mode,
                "return_indices": m.return_indices,
            }
            return self.max_pool(name, x, kw)
        if isinstance(m, Normalize):
            return self.normalize(name, x, m.mean.detach(), m.std.detach())
        raise self.fail(f"unsupported module {type(m).__name__}")

    def weight(self, t: Tensor) -> Tensor:
        """A module's parameter as read from the model: itself in live mode, detached otherwise."""
        return t if self.live else t.detach()

    def normalize(self, name: str, x: _Ref, mean: Tensor, std: Tensor) -> _Ref:
        shape = self.nodes[x].shape
        c = max(mean.numel(), std.numel())
        if not shape or (c > 1 and shape[0] != c):
            raise self.fail(f"Normalize with {c} channels applied to shape {shape}")
        view = (-1,) + (1,) * (len(shape) - 1)
        mean_t, std_t = self.const(mean).reshape(view), self.const(std).reshape(view)
        return self.affine(name, x, 1.0 / std_t, -mean_t / std_t, "Normalize")

    def arith(self, name: str, kind: str, a: Any, b: Any) -> Any:
        ra, rb = isinstance(a, _Ref), isinstance(b, _Ref)
        if kind == "add":
            if ra and rb:
                return self.add(name, AddOp(), [a, b])
            x, c = (a, b) if ra else (b, a)
            return self.affine(name, x, 1.0, c, "add")
        if kind == "sub":
            if ra and rb:
                return self.add(name, SubOp(), [a, b])
            if ra:
                return self.affine(name, a, 1.0, -self.const(b), "sub")
            return self.affine(name, b, -1.0, a, "sub")
        if kind == "mul":
            if ra and rb:
                raise self.fail("multiplication of two network tensors (not linear) is not supported")
            x, c = (a, b) if ra else (b, a)
            return self.affine(name, x, c, 0.0, "mul")
        if kind == "div":
            if rb:
                raise self.fail("division by a network tensor (not linear) is not supported")
            return self.affine(name, a, 1.0 / self.const(b), 0.0, "div")
        raise self.fail(f"unsupported arithmetic {kind}")

    def matmul(self, name: str, a: Any, b: Any) -> _Ref:
        if isinstance(a, _Ref) and isinstance(b, _Ref):
            raise self.fail("matmul of two network tensors (not linear) is not supported")
        if isinstance(a, _Ref):
            w = self.const(b)
            if w.dim() == 2:
                return self.add(name, LinearOp(w.t().contiguous(), None), [a])
            op = GenericLinearOp(
                lambda t, c: torch.matmul(t, c), lambda t, c: torch.matmul(t, c.abs()), (w,), self.nodes[a].shape
            )
            return self.add(name, op, [a])
        w = self.const(a)
        op = GenericLinearOp(
            lambda t, c: torch.matmul(c, t), lambda t, c: torch.matmul(c.abs(), t), (w,), self.nodes[b].shape, "c@x"
        )
        return self.add(name, op, [b])

    def activation(self, name: str, kind: str, x: Any, slope: float = 0.01) -> _Ref:
        if not isinstance(x, _Ref):
            raise self.fail(f"{kind} of a constant")
        op: BoundOp
        if kind == "relu":
            op = ReLUOp()
        elif kind == "leaky_relu":
            op = self.leaky(float(slope))
        elif kind == "sigmoid":
            op = SigmoidOp()
        else:
            op = TanhOp()
        return self.add(name, op, [x])

    def function(self, n: fx.Node) -> Any:
        f = n.target
        args = self.value(n.args)
        kwargs = self.value(n.kwargs)
        refs = [a for a in list(args) + list(kwargs.values()) if isinstance(a, _Ref)]
        name = n.name
        if f in OP_REGISTRY:
            op = OP_REGISTRY[f](f, [self.nodes[r].shape for r in refs])
            return self.add(name, op, refs)
        if f is builtins.getattr:
            obj, attr = args
            if attr == "shape" and isinstance(obj, _Ref):
                return _Shape((BATCH, *self.nodes[obj].shape))
            if not isinstance(obj, _Ref):
                return getattr(obj, attr)
            raise self.fail(f"attribute {attr!r} of a network tensor")
        if f is operator.getitem:
            obj, idx = args
            if isinstance(obj, _Shape):
                return obj[idx]
            if isinstance(obj, _Ref):
                raise self.fail("indexing a network tensor (operator.getitem) is not supported")
            return obj[idx]
        if not refs:
            # Constant folding: nothing here depends on the network input.
            if any(isinstance(a, (_Shape, _Batch)) for a in list(args) + list(kwargs.values())):
                raise self.fail(f"{_target_name(f)} on the batch size")
            self.no_live_folding(_target_name(f), list(args) + list(kwargs.values()))
            try:
                with torch.no_grad():
                    return f(*args, **kwargs)  # type: ignore[operator]
            except Exception as exc:
                raise self.fail(f"{_target_name(f)} on constants failed: {exc}") from exc
        if f is normalize:
            return self.normalize(name, args[0], args[1], args[2])
        if f in _RELU_FNS:
            return self.activation(name, "relu", args[0])
        if f is F.leaky_relu:
            kw = _bind("leaky_relu", args, kwargs, [("input", ...), ("negative_slope", 0.01), ("inplace", False)])
            return self.activation(name, "leaky_relu", kw["input"], kw["negative_slope"])
        if f in _SIGMOID_FNS:
            return self.activation(name, "sigmoid", args[0])
        if f in _TANH_FNS:
            return self.activation(name, "tanh", args[0])
        if f in _ADD | _SUB | _MUL | _DIV:
            if kwargs.get("alpha", 1) != 1 or (f is torch.div and kwargs.get("rounding_mode") is not None):
                raise self.fail(f"{_target_name(f)} with alpha/rounding_mode")
            kind = "add" if f in _ADD else "sub" if f in _SUB else "mul" if f in _MUL else "div"
            a = args[0] if args else kwargs.get("input")
            b = args[1] if len(args) > 1 else kwargs.get("other")
            return self.arith(name, kind, a, b)
        if f is operator.neg:
            return self.affine(name, args[0], -1.0, 0.0, "neg")
        if f in _MATMUL:
            return self.matmul(name, args[0], args[1])
        if f is F.linear:
            kw = _bind("linear", args, kwargs, [("input", ...), ("weight", ...), ("bias", None)])
            return self.linear(name, kw["input"], kw["weight"], kw["bias"])
        if f is F.conv2d:
            kw = _bind(
                "conv2d",
                args,
                kwargs,
                [
                    ("input", ...),
                    ("weight", ...),
                    ("bias", None),
                    ("stride", 1),
                    ("padding", 0),
                    ("dilation", 1),
                    ("groups", 1),
                ],
            )
            return self.conv2d(
                name, kw["input"], kw["weight"], kw["bias"], kw["stride"], kw["padding"], kw["dilation"], kw["groups"]
            )
        if f is torch.flatten:
            kw = _bind("flatten", args, kwargs, [("input", ...), ("start_dim", 0), ("end_dim", -1)])
            return self.flatten(name, kw["input"], kw["start_dim"], kw["end_dim"], "torch.flatten")
        if f is torch.reshape:
            return self.reshape_to(name, args[0], args[1:] if len(args) > 1 else [kwargs["shape"]], "reshape")
        if f is torch.permute:
            return self.permute(name, args[0], args[1:] if len(args) > 1 else [kwargs["dims"]], "permute")
        if f is torch.transpose:
            return self.transpose(name, args[0], args[1], args[2], "transpose")
        if f is torch.squeeze:
            return self.squeeze(
                name, args[0], list(args[1:]) or ([kwargs["dim"]] if "dim" in kwargs else []), "squeeze"
            )
        if f is torch.unsqueeze:
            return self.unsqueeze(name, args[0], args[1] if len(args) > 1 else kwargs["dim"], "unsqueeze")
        if f is F.avg_pool2d:
            params = [("input", ...), ("kernel_size", ...), ("stride", None), ("padding", 0), ("ceil_mode", False)]
            params += [("count_include_pad", True), ("divisor_override", None)]
            kw = _bind("avg_pool2d", args, kwargs, params)
            return self.avg_pool(name, kw.pop("input"), kw)
        if f is F.max_pool2d or f is torch.max_pool2d:
            params = [("input", ...), ("kernel_size", ...), ("stride", None), ("padding", 0), ("dilation", 1)]
            params += [("ceil_mode", False), ("return_indices", False)]
            kw = _bind("max_pool2d", args, kwargs, params)
            return self.max_pool(name, kw.pop("input"), kw)
        raise self.fail(f"unsupported operator {_target_name(f)}")

    def method(self, n: fx.Node) -> Any:
        meth = str(n.target)
        args = self.value(n.args)
        kwargs = self.value(n.kwargs)
        self_arg = args[0]
        rest = list(args[1:])
        name = n.name
        if not isinstance(self_arg, _Ref):
            if any(isinstance(a, _Ref) for a in rest):
                raise self.fail(f"method {meth} of a constant applied to a network tensor")
            self.no_live_folding(f"Tensor.{meth}", [self_arg, *rest, *kwargs.values()])
            try:
                with torch.no_grad():
                    return getattr(self_arg, meth)(*rest, **kwargs)
            except Exception as exc:
                raise self.fail(f"method {meth} on constants failed: {exc}") from exc
        x = self_arg
        if meth == "size":
            shape = _Shape((BATCH, *self.nodes[x].shape))
            d = rest[0] if rest else kwargs.get("dim")
            return shape if d is None else shape[d]
        if meth in ("view", "reshape"):
            return self.reshape_to(name, x, rest, meth)
        if meth == "flatten":
            kw = _bind("flatten", tuple(rest), kwargs, [("start_dim", 0), ("end_dim", -1)])
            return self.flatten(name, x, kw["start_dim"], kw["end_dim"], "flatten")
        if meth == "permute":
            return self.permute(name, x, rest or [kwargs["dims"]], "permute")
        if meth == "transpose":
            return self.transpose(name, x, rest[0], rest[1], "transpose")
        if meth == "squeeze":
            return self.squeeze(name, x, rest or ([kwargs["dim"]] if "dim" in kwargs else []), "squeeze")
        if meth == "unsqueeze":
            return self.unsqueeze(name, x, rest[0] if rest else kwargs["dim"], "unsqueeze")
        if meth == "contiguous":
            return x
        if meth in ("relu", "sigmoid", "tanh"):
            return self.activation(name, meth, x)
        if meth in ("add", "sub", "mul", "div"):
            if kwargs.get("alpha", 1) != 1:
                raise self.fail(f"Tensor.{meth} with alpha")
            other = rest[0] if rest else kwargs.get("other")
            return self.arith(name, meth, x, other)
        raise self.fail(f"unsupported tensor method {meth}")

    def build(self, graph: fx.Graph) -> tuple[str, str]:
        for n in graph.nodes:
            for a in n.all_input_nodes:
                self.users[a.name] = self.users.get(a.name, 0) + 1
        input_name: str | None = None
        output_name: str | None = None
        for n in graph.nodes:
            stack = n.meta.get("nn_module_stack")
            self.where = f"fx node {n.name!r}"
            if n.op == "call_module":
                self.where += f" (module {n.target})"
            elif isinstance(stack, dict) and stack:
                self.where += f" (inside module {list(stack)[-1]})"
            if n.op == "placeholder":
                if input_name is not None:
                    raise self.fail("the model takes more than one input; only one is supported")
                self.nodes[n.name] = Node(n.name, InputOp(), (), self.input_shape)
                self.env[n.name] = _Ref(n.name)
                input_name = n.name
            elif n.op == "get_attr":
                obj: Any = self.root
                for part in str(n.target).split("."):
                    obj = getattr(obj, part)
                if isinstance(obj, Tensor):
                    # live mode keeps trainable tensors themselves (they may only feed F.linear / F.conv2d)
                    obj = obj if self.live and obj.requires_grad else obj.detach().to(self.device)
                self.env[n.name] = obj
            elif n.op == "call_module":
                self.env[n.name] = self.module(n)
            elif n.op == "call_function":
                self.env[n.name] = self.function(n)
            elif n.op == "call_method":
                self.env[n.name] = self.method(n)
            elif n.op == "output":
                out = self.value(n.args[0])
                if not isinstance(out, _Ref):
                    raise self.fail("the model output must be a single tensor computed from the input")
                output_name = out
            else:  # pragma: no cover - fx has no other opcodes
                raise self.fail(f"unsupported fx opcode {n.op}")
        if input_name is None or output_name is None:
            raise InputError("Network.from_module: the traced graph has no input or no output")
        return input_name, output_name


class Network:
    """A feed-forward network as a DAG of bound operators, with one input and one output.

    Attributes:
        input_name: name of the input node.
        output_name: name of the output node.
        input_shape: per-sample input shape.
        nodes: the nodes in topological order (dict order).
    """

    def __init__(self, nodes: dict[str, Node], input_name: str, output_name: str, *, live: bool = False) -> None:
        if input_name not in nodes or output_name not in nodes:
            raise InputError("Network: input_name and output_name must be nodes of the graph")
        # Keep only the ancestors of the output (dead branches would only cost time).
        needed = {output_name}
        for name in reversed(list(nodes)):
            if name in needed:
                needed.update(nodes[name].inputs)
        self.nodes = {k: v for k, v in nodes.items() if k in needed}
        self.nodes.setdefault(input_name, nodes[input_name])
        if next(iter(self.nodes)) != input_name:
            self.nodes = {input_name: nodes[input_name], **{k: v for k, v in self.nodes.items() if k != input_name}}
        self.input_name = input_name
        self.output_name = output_name
        self.input_shape = tuple(nodes[input_name].shape)
        #: True when the operators hold the model's parameters themselves (see :meth:`from_module`).
        self.live = bool(live)

    @property
    def output_shape(self) -> tuple[int, ...]:
        """Per-sample output shape."""
        return self.nodes[self.output_name].shape

    @classmethod
    def from_module(cls, model: nn.Module, input_shape: Sequence[int], *, live: bool = False) -> Network:
        """Build the IR of a PyTorch model by ``torch.fx`` symbolic tracing.

        The model is read in eval-mode semantics (BatchNorm running statistics, Dropout off). By default its
        parameters are copied, so later changes to the model do not affect the network.

        With ``live=True`` the weights and biases of ``nn.Linear`` / ``nn.Conv2d`` (and of ``F.linear`` /
        ``F.conv2d`` on module attributes) are the model's parameter tensors themselves, not copies: bounds from
        :func:`~bastion.verify.bounds.compute_bounds` are then differentiable in the parameters and reflect their
        current values after every in-place update (an optimiser step), so the network is built once per training
        run. Live mode refuses (InputError) anything that would freeze a trainable tensor into a copy: BatchNorm
        (its eval-mode affine map is a function of statistics and parameters computed once; certified-training
        networks use none), a trainable parameter used in other arithmetic, or folded into a constant. Frozen
        tensors (``requires_grad=False``, buffers such as :class:`~bastion.models.Normalize`'s mean and std) are
        copied as usual. A live network must be bounded on the parameters' device and dtype (:meth:`to` refuses to
        convert it).

        Args:
            model: the model; one tensor input, one tensor output.
            input_shape: per-sample input shape, without the batch dimension.
            live: hold the model's parameters instead of copies (differentiable bounds for certified training).

        Returns:
            The network.

        Raises:
            InputError: if the model cannot be traced or uses an operator outside the supported set (the message
                names the operator and the fx node / module path).
        """
        if not isinstance(model, nn.Module):
            raise InputError(f"Network.from_module: model must be a torch.nn.Module, got {type(model).__name__}")
        try:
            shape = tuple(int(d) for d in input_shape)
        except (TypeError, ValueError):
            raise InputError(
                f"Network.from_module: input_shape must be a sequence of ints, got {input_shape!r}"
            ) from None
        if not shape or any(d <= 0 for d in shape):
            raise InputError(f"Network.from_module: input_shape must be non-empty positive ints, got {shape}")
        first: Tensor | None = next(iter(model.parameters()), None)
        if first is None:
            first = next(iter(model.buffers()), None)
        device = first.device if first is not None else torch.device("cpu")
        dtype = first.dtype if first is not None and first.is_floating_point() else torch.float32
        try:
            graph = _Tracer().trace(model)
        except Exception as exc:
            raise InputError(
                f"Network.from_module: torch.fx cannot trace {type(model).__name__} ({type(exc).__name__}: {exc}); "
                "remove data-dependent control flow or export the model to ONNX"
            ) from exc
        builder = _Builder(model, shape, device, dtype, live=bool(live))
        input_name, output_name = builder.build(graph)
        return cls(builder.nodes, input_name, output_name, live=bool(live))

    def forward(self, x: Tensor) -> Tensor:
        """Evaluate the network on a batch ``(N, *input_shape)``."""
        if tuple(x.shape[1:]) != self.input_shape:
            raise InputError(
                f"Network.forward: expected inputs of shape (N, {', '.join(map(str, self.input_shape))}), "
                f"got {tuple(x.shape)}"
            )
        return self.forward_all(x)[self.output_name]

    __call__ = forward

    def forward_all(self, x: Tensor) -> dict[str, Tensor]:
        """Evaluate the network and return the value of every node (batched), keyed by node name."""
        if tuple(x.shape[1:]) != self.input_shape:
            raise InputError(
                f"Network.forward_all: expected inputs of shape (N, {', '.join(map(str, self.input_shape))}), "
                f"got {tuple(x.shape)}"
            )
        values: dict[str, Tensor] = {}
        for name, node in self.nodes.items():
            values[name] = x if name == self.input_name else node.op.forward(*[values[i] for i in node.inputs])
        return values

    def relu_nodes(self) -> list[str]:
        """Names of the ReLU nodes, in topological order."""
        return [n for n, node in self.nodes.items() if isinstance(node.op, ReLUOp)]

    def nonlinear_nodes(self) -> list[str]:
        """Names of every node that needs a relaxation (activations, max pooling), in topological order."""
        return [n for n, node in self.nodes.items() if node.op.nonlinear]

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> Network:
        """A copy with every constant moved to ``device`` / cast to ``dtype``.

        Raises:
            InputError: for a live network when a parameter would change device or dtype (the copy would no longer
                follow the model).
        """
        if self.live:
            for node in self.nodes.values():
                for value in vars(node.op).values():
                    if isinstance(value, Tensor) and value.requires_grad:
                        want = None if device is None else torch.device(device)
                        same_dev = want is None or (
                            value.device.type == want.type and want.index in (None, value.device.index)
                        )
                        same_dtype = dtype is None or value.dtype == dtype
                        if not (same_dev and same_dtype):
                            raise InputError(
                                f"Network.to: a live network holds the model's parameters ({value.device}, "
                                f"{value.dtype}); bound it with inputs of that device and dtype, or move the model "
                                "and rebuild the network"
                            )
        nodes = {k: Node(v.name, v.op.to(device, dtype), v.inputs, v.shape) for k, v in self.nodes.items()}
        return Network(nodes, self.input_name, self.output_name, live=self.live)

    def __repr__(self) -> str:
        lines = [f"Network(input={self.input_name} {self.input_shape}, output={self.output_name})"]
        for node in self.nodes.values():
            lines.append(f"  {node.name}: {node.op!r}({', '.join(node.inputs)}) -> {node.shape}")
        return "\n".join(lines)


def as_network(model: nn.Module | Network, input_shape: Sequence[int] | None = None) -> Network:
    """The verification IR of ``model``; a :class:`Network` is returned as it is.

    Args:
        model: a ``Network`` or a ``torch.nn.Module`` (traced by :meth:`Network.from_module`).
        input_shape: per-sample input shape; defaults to ``model.input_shape`` (set on modules loaded by
            :func:`bastion.models.onnx.load_onnx`). For a ``Network`` it is checked against the network's.

    Raises:
        InputError: the shape is unknown or does not match, or the model cannot be traced.
    """
    shape = None if input_shape is None else tuple(int(d) for d in input_shape)
    if isinstance(model, Network):
        if shape is not None and tuple(model.input_shape) != shape:
            raise InputError(f"the network takes inputs of shape {tuple(model.input_shape)}, not {shape}")
        return model
    if not isinstance(model, nn.Module):
        raise InputError(f"expected a torch.nn.Module or a bastion Network, got {type(model).__name__}")
    if shape is None:
        given = getattr(model, "input_shape", None)
        if given is None:
            raise InputError("the model's input shape is unknown: pass input_shape (per sample, without the batch)")
        shape = tuple(int(d) for d in given)
    return Network.from_module(model, shape)
