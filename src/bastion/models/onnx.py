"""ONNX import: an ONNX classifier becomes a ``torch.fx.GraphModule`` that attacks and verifiers can use.

The converter walks the ONNX graph once, in topological order, and writes a ``torch.fx.Graph`` directly (no
Python code generation, no tracing of a hand-written module). Every value of the ONNX graph is either

* a **constant**: an initializer, a ``Constant`` node, or the result of a node whose inputs are all constants
  (the ``Shape -> Gather -> Unsqueeze -> Concat -> Reshape`` chains exporters write for ``x.view(x.size(0), -1)``,
  ``Cast``, ``ConstantOfShape``, ...). Such nodes are folded at import by running them in onnxruntime, so their
  semantics is exactly ONNX's at the model's opset; or
* a **dynamic** value: a node of the fx graph, which depends on the input.

Only these fx forms appear in the result, so a verification IR built with ``torch.fx`` can read it:
``placeholder``; ``get_attr`` (constant tensors, registered as buffers); ``call_module`` of ``nn.Linear``,
``nn.Conv2d``, ``nn.BatchNorm2d``, ``nn.AvgPool2d``, ``nn.MaxPool2d``; ``call_function`` of ``torch.relu``,
``F.leaky_relu``, ``torch.sigmoid``, ``torch.tanh``, ``torch.flatten``, ``torch.reshape``, ``torch.permute``,
``torch.matmul`` (one side a constant), ``operator.add`` / ``operator.sub`` (two dynamic values, or a dynamic value
and a constant), ``operator.mul`` / ``operator.truediv`` by a constant and ``operator.neg``.

**The batch dimension.** ONNX models exchanged for verification (VNN-COMP) usually fix the batch to 1: inputs
like ``[1, 1, 1, 5]``, ``[1, 784, 1]``, ``[1, 3, 32, 32]`` or ``[1, 5]``. The leading dimension of the input, when
it is 1 or symbolic, is read as the batch: the module maps ``(N, *shape[1:])`` to ``(N, K)``. An input without such a
dimension (``[5]``) gets one in front. Inside the graph the batch stays the outermost dimension of every tensor;
reshapes, squeezes and transposes are rewritten on the per-sample shape (a target ``[1, -1]`` keeps ``N``; a target
``[784]`` that drops ONNX's batch of 1 keeps ``N`` in front). The output is flattened to ``(N, K)``.

Conversions: ``Gemm`` (``alpha``, ``beta``, ``transB``; the weight must be the constant operand) and ``MatMul``
by a constant matrix become ``nn.Linear``, with a following ``Add`` of a constant vector folded into the bias
(``MatMul`` by a constant vector, or with the constant on the left as in ``W @ x`` on ``[1, 784, 1]`` inputs, stays a
``torch.matmul``); ``Add``/``Sub`` of two dynamic values, and ``Add``/``Sub``/``Mul``/``Div`` with a constant
(normalisation layers), stay elementwise; ``BatchNormalization`` becomes ``nn.BatchNorm2d`` (eval) on 4-D tensors
and a constant scale and shift otherwise; ``Conv`` becomes ``nn.Conv2d`` (2-D only). Padding that differs at the
two ends of an axis (``pads=[0, 0, 1, 1]``, TensorFlow's ``SAME`` with a stride) has no ``nn.Conv2d`` form and the
IR has no pad operation, so the converter pads both ends by the larger amount and adds zero taps to the kernel on
the over-padded side: every window then covers the same pixels with the same weights, exactly. ``AveragePool`` /
``MaxPool`` / ``GlobalAveragePool`` become the torch pools (2-D, symmetric padding only: a pool has no zero tap);
``Relu``, ``LeakyRelu``, ``Sigmoid``, ``Tanh``, ``Neg`` map one to one; ``Flatten``, ``Reshape``, ``Squeeze``,
``Unsqueeze`` become ``torch.flatten`` / ``torch.reshape`` and ``Transpose`` ``torch.permute``; ``Dropout``,
``Identity`` and ``Cast`` to a float type are removed. Products of two input-dependent tensors, ``Softmax``,
``Pad``, ``Concat``/``Slice``/``Gather`` of input-dependent tensors and control flow are not supported.

Opsets 8 to 17 are tested; handlers read attributes and their later input forms alike (``Squeeze`` axes, ``Reshape``
shape), so neighbouring opsets usually work too. The module computes in float32 whatever the file's float type.

Unsupported operators raise :class:`~bastion.errors.InputError` naming the operator, the node and the opset.
With ``check=True`` (the default) the module is compared with onnxruntime on random inputs before it is returned.
"""

from __future__ import annotations

import math
import operator
import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, fx, nn

from bastion.errors import InputError, ModelError

__all__ = ["OnnxRuntimeModel", "load_onnx", "onnx_input_shape"]

#: Opsets the converter is tested on; others are accepted (handlers read attribute and input forms alike).
TESTED_OPSETS = range(8, 18)

_FLOAT_TYPES = {1: "float", 10: "float16", 11: "double", 16: "bfloat16"}  # onnx.TensorProto element types
_MAX_PRODUCT = 1 << 31


def _onnx() -> Any:
    try:
        import onnx
    except ImportError as exc:  # pragma: no cover - a declared dependency
        raise ModelError("ONNX import needs the 'onnx' package: pip install onnx onnxruntime") from exc
    return onnx


def _ort() -> Any:
    try:
        import onnxruntime
    except ImportError as exc:  # pragma: no cover - a declared dependency
        raise ModelError("checking an ONNX model needs the 'onnxruntime' package: pip install onnxruntime") from exc
    return onnxruntime


def _read_model(path: str | os.PathLike[str]) -> Any:
    onnx = _onnx()
    file = Path(path)
    if not file.is_file():
        raise ModelError(f"ONNX file {os.fspath(file)!r} not found")
    try:
        return onnx.load(os.fspath(file))
    except Exception as exc:
        raise ModelError(f"cannot read {os.fspath(file)!r} as an ONNX model ({type(exc).__name__}: {exc})") from exc


def _ort_session(model_or_path: Any) -> Any:
    ort = _ort()
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    data = model_or_path if isinstance(model_or_path, (str, os.PathLike)) else model_or_path.SerializeToString()
    return ort.InferenceSession(
        os.fspath(data) if isinstance(data, os.PathLike) else data, opts, providers=["CPUExecutionProvider"]
    )


def _tensor(arr: Any) -> Tensor:
    """A float32 torch copy of a NumPy constant (ONNX arrays may be read-only views of the file's buffer)."""
    return torch.tensor(np.array(arr, dtype=np.float32))


# ---------------------------------------------------------------------------------------------------- input layout


@dataclass(frozen=True)
class _InputLayout:
    name: str
    onnx_shape: tuple[int | None, ...]  # None for a symbolic dimension
    batched: bool  # the leading ONNX dimension is the batch (1 or symbolic)
    elem_type: int

    @property
    def sample_shape(self) -> tuple[int, ...]:
        dims = self.onnx_shape[1:] if self.batched else self.onnx_shape
        return tuple(int(d) for d in dims)  # type: ignore[arg-type]

    @property
    def dynamic_batch(self) -> bool:
        return self.batched and self.onnx_shape[0] is None


def _input_layout(model: Any, where: str) -> _InputLayout:
    graph = model.graph
    inits = {t.name for t in graph.initializer}
    inputs = [i for i in graph.input if i.name not in inits]
    if len(inputs) != 1:
        names = [i.name for i in inputs]
        raise InputError(f"{where}: a classifier takes one input tensor, the ONNX graph has {len(inputs)}: {names}")
    inp = inputs[0]
    ttype = inp.type.tensor_type
    if ttype.elem_type not in _FLOAT_TYPES:
        raise InputError(f"{where}: input {inp.name!r} has element type {ttype.elem_type}; a float input is needed")
    if not ttype.HasField("shape"):
        raise InputError(f"{where}: input {inp.name!r} has no shape in the ONNX file; bastion needs a static shape")
    dims: list[int | None] = []
    for d in ttype.shape.dim:
        dims.append(int(d.dim_value) if d.HasField("dim_value") and d.dim_value > 0 else None)
    if not dims:
        raise InputError(f"{where}: input {inp.name!r} is a scalar; a classifier input needs at least one dimension")
    batched = dims[0] is None or dims[0] == 1
    rest = dims[1:] if batched else dims
    if any(d is None for d in rest):
        raise InputError(
            f"{where}: input {inp.name!r} has shape {_fmt_dims(dims)}; only the leading (batch) dimension may "
            "be symbolic"
        )
    return _InputLayout(inp.name, tuple(dims), batched, ttype.elem_type)


def _fmt_dims(dims: Sequence[int | None]) -> str:
    return "[" + ", ".join("?" if d is None else str(d) for d in dims) + "]"


def onnx_input_shape(path: str | os.PathLike[str]) -> tuple[int, ...]:
    """The shape of one input of an ONNX classifier, without the batch dimension, as :func:`load_onnx` takes it.

    Args:
        path: the ``.onnx`` file.

    Returns:
        ``(1, 1, 5)`` for an ONNX input ``[1, 1, 1, 5]``, ``(784, 1)`` for ``[1, 784, 1]``, ``(3, 32, 32)`` for
        ``[N, 3, 32, 32]``, ``(5,)`` for ``[5]`` (an input without a batch dimension).
    """
    return _input_layout(_read_model(path), f"ONNX model {os.fspath(path)!r}").sample_shape


# ---------------------------------------------------------------------------------------------------- onnxruntime


class OnnxRuntimeModel:
    """An ONNX file run by onnxruntime, callable on torch batches like the imported module.

    Used to re-execute counterexamples on the original model. Inputs are converted to the file's element type;
    a model with a fixed batch of 1 is run one sample at a time.

    Args:
        path: the ``.onnx`` file.

    Example:
        >>> ref = OnnxRuntimeModel("net.onnx")  # doctest: +SKIP
        >>> logits = ref(torch.rand(8, *ref.input_shape))  # doctest: +SKIP
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = os.fspath(path)
        model = _read_model(path)
        self._layout = _input_layout(model, f"ONNX model {self.path!r}")
        try:
            self._session = _ort_session(model)
        except Exception as exc:
            raise ModelError(f"onnxruntime cannot load {self.path!r} ({type(exc).__name__}: {exc})") from exc
        self._np_dtype = {1: np.float32, 10: np.float16, 11: np.float64}.get(self._layout.elem_type, np.float32)
        self._output = self._session.get_outputs()[0].name

    @property
    def input_shape(self) -> tuple[int, ...]:
        """Shape of one input without the batch dimension."""
        return self._layout.sample_shape

    def __call__(self, x: Tensor) -> Tensor:
        """Run the model on a batch.

        Args:
            x: ``(N, *input_shape)`` (or ``(N, D)`` with ``D`` the number of input features).

        Returns:
            ``(N, K)`` outputs, on ``x``'s device and in its dtype (float32 for non-float inputs).
        """
        shape = self.input_shape
        if x.dim() == 0 or x[0].numel() != math.prod(shape):
            raise InputError(f"OnnxRuntimeModel: expected inputs of shape (N, {shape}), got {tuple(x.shape)}")
        arr = x.detach().cpu().numpy().astype(self._np_dtype).reshape(x.shape[0], *shape)
        lay = self._layout
        if lay.dynamic_batch:
            out = np.asarray(self._session.run([self._output], {lay.name: arr})[0])
            rows = out.reshape(x.shape[0], -1)
        else:
            outs = []
            for i in range(arr.shape[0]):
                one = arr[i : i + 1] if lay.batched else arr[i]
                outs.append(np.asarray(self._session.run([self._output], {lay.name: one})[0]).reshape(-1))
            rows = np.stack(outs) if outs else np.zeros((0, 0), dtype=np.float32)
        dtype = x.dtype if x.dtype.is_floating_point else torch.float32
        return torch.from_numpy(np.ascontiguousarray(rows)).to(device=x.device, dtype=dtype)


# ---------------------------------------------------------------------------------------------------- the converter


@dataclass
class _Dyn:
    """A dynamic value: its fx node, an example (batch of 2) and whether ONNX's leading dim is the batch."""

    node: fx.Node
    ex: Tensor
    batched: bool

    @property
    def onnx_shape(self) -> tuple[int, ...]:
        per = tuple(self.ex.shape[1:])
        return (1, *per) if self.batched else per

    @property
    def rank(self) -> int:
        return len(self.onnx_shape)


class _Converter:
    def __init__(self, model: Any, where: str) -> None:
        onnx = _onnx()
        self.onnx = onnx
        self.model = model
        self.where = where
        graph = model.graph
        self.opset = 1
        for imp in model.opset_import:
            if imp.domain in ("", "ai.onnx"):
                self.opset = int(imp.version)
        self.layout = _input_layout(model, where)
        self.root = nn.Module()
        self.graph = fx.Graph()
        self.env: dict[str, _Dyn | np.ndarray] = {}
        self.consumers: dict[str, int] = {}
        for node in graph.node:
            for name in node.input:
                if name:
                    self.consumers[name] = self.consumers.get(name, 0) + 1
        for out in graph.output:
            self.consumers[out.name] = self.consumers.get(out.name, 0) + 1
        for init in graph.initializer:
            self.env[init.name] = np.asarray(onnx.numpy_helper.to_array(init))
        self.linear_of: dict[fx.Node, tuple[nn.Linear, str]] = {}
        self._const_nodes: dict[int, tuple[fx.Node, Tensor, np.ndarray]] = {}
        self._names: set[str] = set()
        self.inferred = self._infer_shapes()

    # ------------------------------------------------------------------------------------------- helpers
    def _infer_shapes(self) -> dict[str, tuple[int, ...]]:
        """ONNX's own shape inference with the batch fixed to 1: a cross-check of every converted value's shape."""
        try:
            m = self.onnx.ModelProto()
            m.CopyFrom(self.model)
            for inp in m.graph.input:
                if inp.name == self.layout.name and self.layout.batched:
                    d0 = inp.type.tensor_type.shape.dim[0]
                    d0.Clear()
                    d0.dim_value = 1
            inferred = self.onnx.shape_inference.infer_shapes(m)
        except Exception:
            return {}
        shapes: dict[str, tuple[int, ...]] = {}
        for vi in list(inferred.graph.value_info) + list(inferred.graph.output):
            tt = vi.type.tensor_type
            if tt.HasField("shape") and all(d.HasField("dim_value") for d in tt.shape.dim):
                shapes[vi.name] = tuple(int(d.dim_value) for d in tt.shape.dim)
        return shapes

    def fail(self, node: Any, msg: str) -> InputError:
        return InputError(
            f"{self.where}: node {node.name or '(unnamed)'!r} ({node.op_type}, opset {self.opset}): {msg}"
        )

    def unique(self, base: str) -> str:
        base = re.sub(r"\W", "_", base).strip("_").lower() or "m"
        if base[0].isdigit():
            base = "m_" + base
        name, k = base, 1
        while name in self._names:
            k += 1
            name = f"{base}_{k}"
        self._names.add(name)
        return name

    def const_node(self, arr: np.ndarray) -> tuple[fx.Node, Tensor]:
        key = id(arr)
        if key in self._const_nodes:
            node, t, _ = self._const_nodes[key]
            return node, t
        t = _tensor(arr)
        name = self.unique(f"const_{len(self._const_nodes)}")
        self.root.register_buffer(name, t)
        node = self.graph.get_attr(name)
        self._const_nodes[key] = (node, t, arr)  # keep arr alive so that its id stays unique
        return node, t

    def call(self, target: Callable[..., Any], *args: Any, batched: bool) -> _Dyn:
        """Emit ``target(*args)`` and run it on the examples. ``args``: _Dyn, numpy constants or Python values."""
        fx_args: list[Any] = []
        ex_args: list[Any] = []
        for a in args:
            if isinstance(a, _Dyn):
                fx_args.append(a.node)
                ex_args.append(a.ex)
            elif isinstance(a, np.ndarray):
                node, t = self.const_node(a)
                fx_args.append(node)
                ex_args.append(t)
            else:
                fx_args.append(a)
                ex_args.append(a)
        with torch.no_grad():
            ex = target(*ex_args)
        return _Dyn(self.graph.call_function(target, tuple(fx_args)), ex, batched)

    def module(self, mod: nn.Module, base: str, x: _Dyn, *, batched: bool | None = None) -> _Dyn:
        name = self.unique(base)
        mod.eval()
        self.root.add_module(name, mod)
        with torch.no_grad():
            ex = mod(x.ex)
        return _Dyn(self.graph.call_module(name, (x.node,)), ex, x.batched if batched is None else batched)

    def to_onnx_shape(self, x: _Dyn, shape: Sequence[int]) -> _Dyn:
        """Reshape ``x`` (same number of elements per sample) to the ONNX shape ``shape`` (batch of 1).

        A leading 1 is read as the batch; otherwise the batch stays in front of the whole ONNX shape.
        """
        shape = tuple(int(d) for d in shape)
        batched = len(shape) > 0 and shape[0] == 1
        per = shape[1:] if batched else shape
        if math.prod(per) != x.ex[0].numel():
            raise InputError(f"cannot reshape a tensor of shape {list(x.onnx_shape)} to {list(shape)}")
        if tuple(x.ex.shape[1:]) == per:
            return _Dyn(x.node, x.ex, batched)
        return self.call(torch.reshape, x, (-1, *per), batched=batched)

    def const_operand(self, node: Any, x: _Dyn, c: np.ndarray) -> np.ndarray | float:
        """A constant operand of an elementwise op with ``x``, shaped so that torch broadcasting equals ONNX's."""
        c = np.asarray(c)
        if c.dtype.kind not in "fiub":
            raise self.fail(node, f"constant operand of type {c.dtype} is not numeric")
        if c.size == 1:
            return float(c.reshape(()))
        while c.ndim > x.rank and c.shape[0] == 1:
            c = c[0]
        if c.ndim > x.rank:
            raise self.fail(
                node, f"constant of shape {list(c.shape)} would broadcast over the batch of {list(x.onnx_shape)}"
            )
        if x.batched and c.ndim == x.rank:
            if c.shape[0] != 1:
                raise self.fail(
                    node, f"constant of shape {list(c.shape)} would broadcast over the batch of {list(x.onnx_shape)}"
                )
            c = c[0]
        return np.ascontiguousarray(c, dtype=np.float32)

    def attrs(self, node: Any) -> dict[str, Any]:
        return {a.name: self.onnx.helper.get_attribute_value(a) for a in node.attribute}

    def const_input(self, node: Any, i: int, what: str) -> np.ndarray:
        name = node.input[i] if i < len(node.input) else ""
        val = self.env.get(name) if name else None
        if not isinstance(val, np.ndarray):
            raise self.fail(node, f"{what} (input {i}) must be a constant (initializer), it depends on the input")
        return val

    def dyn_input(self, node: Any, i: int) -> _Dyn:
        val = self.env[node.input[i]] if i < len(node.input) and node.input[i] else None
        if not isinstance(val, _Dyn):
            raise self.fail(node, f"input {i} must depend on the network input (constant operands go elsewhere)")
        return val

    def fold(self, node: Any) -> list[np.ndarray]:
        """Evaluate a node whose inputs are all constants with onnxruntime (exact ONNX semantics)."""
        onnx = self.onnx
        helper = onnx.helper
        inputs = []
        feeds: dict[str, np.ndarray] = {}
        for k, name in enumerate(node.input):
            if not name:
                inputs.append("")
                continue
            arr = self.env[name]
            assert isinstance(arr, np.ndarray)
            alias = f"in{k}"
            inputs.append(alias)
            feeds[alias] = arr
        outputs = [f"out{k}" for k in range(len(node.output))]
        one = helper.make_node(node.op_type, inputs, outputs, domain=node.domain)
        one.attribute.extend(node.attribute)
        graph = helper.make_graph(
            [one],
            "fold",
            [
                helper.make_tensor_value_info(n, helper.np_dtype_to_tensor_dtype(a.dtype), a.shape)
                for n, a in feeds.items()
            ],
            [helper.make_empty_tensor_value_info(o) for o in outputs],
        )
        opsets = [helper.make_opsetid(imp.domain, imp.version) for imp in self.model.opset_import]
        m = helper.make_model(graph, opset_imports=opsets)
        m.ir_version = self.model.ir_version
        try:
            sess = _ort_session(m)
            res = sess.run(None, feeds)
        except Exception as exc:
            raise self.fail(node, f"cannot evaluate this constant expression ({type(exc).__name__}: {exc})") from exc
        return [np.asarray(r) for r in res]

    # ------------------------------------------------------------------------------------------- main loop
    def convert(self) -> fx.GraphModule:
        lay = self.layout
        placeholder = self.graph.placeholder("x")
        example = torch.rand(2, *lay.sample_shape, generator=torch.Generator().manual_seed(0))
        self.env[lay.name] = _Dyn(placeholder, example, lay.batched)
        for node in self.model.graph.node:
            if node.domain not in ("", "ai.onnx"):
                raise self.fail(node, f"operator domain {node.domain!r} is not supported (only the standard ONNX ops)")
            present = [n for n in node.input if n]
            missing = [n for n in present if n not in self.env]
            if missing:
                raise self.fail(node, f"input {missing[0]!r} is not produced by any earlier node (graph not sorted?)")
            if node.op_type == "Shape":
                src = self.env[node.input[0]]
                shape = src.onnx_shape if isinstance(src, _Dyn) else src.shape
                a = self.attrs(node)
                dims = np.asarray(shape, dtype=np.int64)
                start, end = a.get("start", 0), a.get("end", None)
                self.env[node.output[0]] = dims[start:end]
                continue
            if node.op_type == "Constant" and len(node.attribute) == 1 and node.attribute[0].name == "value":
                self.env[node.output[0]] = np.asarray(self.onnx.numpy_helper.to_array(node.attribute[0].t))
                continue
            if all(isinstance(self.env[n], np.ndarray) for n in present):
                for name, arr in zip(node.output, self.fold(node)):
                    self.env[name] = arr
                continue
            handler = getattr(self, f"op_{node.op_type}", None)
            if handler is None:
                raise self.fail(node, f"unsupported operator {node.op_type!r} on a tensor that depends on the input")
            try:
                out = handler(node)
            except InputError as exc:
                if str(exc).startswith(self.where):
                    raise
                raise self.fail(node, str(exc)) from None
            except (RuntimeError, ValueError, TypeError, IndexError, KeyError) as exc:
                raise self.fail(node, f"{type(exc).__name__}: {exc}") from None
            self.env[node.output[0]] = out
            for extra in node.output[1:]:
                if extra and self.consumers.get(extra, 0):
                    raise self.fail(node, f"its output {extra!r} is used, bastion only converts the first output")
            want = self.inferred.get(node.output[0])
            if want is not None and isinstance(out, _Dyn) and tuple(out.onnx_shape) != want:
                raise ModelError(
                    f"{self.where}: node {node.name!r} ({node.op_type}) converted to shape {list(out.onnx_shape)} "
                    f"where ONNX infers {list(want)}; please report this model"
                )
        outputs = list(self.model.graph.output)
        if len(outputs) != 1:
            raise InputError(f"{self.where}: a classifier has one output, the ONNX graph has {len(outputs)}")
        result = self.env.get(outputs[0].name)
        if not isinstance(result, _Dyn):
            raise InputError(f"{self.where}: the output {outputs[0].name!r} does not depend on the input")
        if result.ex.dim() > 2:
            result = self.call(torch.flatten, result, 1, batched=True)
        elif result.ex.dim() == 1:
            result = self.call(torch.reshape, result, (-1, 1), batched=True)
        self.graph.output(result.node)
        gm = fx.GraphModule(self.root, self.graph, class_name="OnnxModule")
        gm.eval()
        return gm

    # ------------------------------------------------------------------------------------------- operators
    def op_Identity(self, node: Any) -> _Dyn:
        return self.dyn_input(node, 0)

    def op_Dropout(self, node: Any) -> _Dyn:
        a = self.attrs(node)
        if a.get("is_test", 1) == 0 and self.opset < 7:
            raise self.fail(node, "Dropout in training mode")
        if len(node.input) > 2 and node.input[2]:
            mode = self.env[node.input[2]]
            if not isinstance(mode, np.ndarray) or bool(mode.reshape(-1)[0]):
                raise self.fail(node, "Dropout in training mode (training_mode input is true)")
        return self.dyn_input(node, 0)

    def op_Cast(self, node: Any) -> _Dyn:
        if self.attrs(node).get("to") not in _FLOAT_TYPES:
            raise self.fail(node, "a cast of an input-dependent tensor to a non-float type")
        return self.dyn_input(node, 0)

    def op_Relu(self, node: Any) -> _Dyn:
        x = self.dyn_input(node, 0)
        return self.call(torch.relu, x, batched=x.batched)

    def op_LeakyRelu(self, node: Any) -> _Dyn:
        x = self.dyn_input(node, 0)
        return self.call(F.leaky_relu, x, float(self.attrs(node).get("alpha", 0.01)), batched=x.batched)

    def op_Sigmoid(self, node: Any) -> _Dyn:
        x = self.dyn_input(node, 0)
        return self.call(torch.sigmoid, x, batched=x.batched)

    def op_Tanh(self, node: Any) -> _Dyn:
        x = self.dyn_input(node, 0)
        return self.call(torch.tanh, x, batched=x.batched)

    def op_Neg(self, node: Any) -> _Dyn:
        x = self.dyn_input(node, 0)
        return self.call(operator.neg, x, batched=x.batched)

    def _binary(self, node: Any) -> tuple[Any, Any]:
        return self.env[node.input[0]], self.env[node.input[1]]

    def _same_layout(self, node: Any, a: _Dyn, b: _Dyn) -> None:
        if a.batched != b.batched or a.rank != b.rank:
            raise self.fail(
                node, f"operands of shapes {list(a.onnx_shape)} and {list(b.onnx_shape)} do not line up on the batch"
            )

    def _with_const(self, node: Any, target: Callable[..., Any], x: _Dyn, c: np.ndarray) -> _Dyn:
        """``target(x, c)`` for an elementwise op, with ONNX's output shape (a constant may add leading 1s)."""
        try:
            out_shape = np.broadcast_shapes(x.onnx_shape, np.shape(c))
        except ValueError:
            raise self.fail(node, f"shapes {list(x.onnx_shape)} and {list(np.shape(c))} do not broadcast") from None
        y = self.call(target, x, self.const_operand(node, x, c), batched=x.batched)
        return self.to_onnx_shape(y, out_shape)

    def op_Add(self, node: Any) -> _Dyn:
        a, b = self._binary(node)
        if isinstance(a, _Dyn) and isinstance(b, _Dyn):
            self._same_layout(node, a, b)
            return self.call(operator.add, a, b, batched=a.batched)
        x, c = (a, b) if isinstance(a, _Dyn) else (b, a)
        src = node.input[0] if isinstance(a, _Dyn) else node.input[1]
        fused = self.linear_of.get(x.node)
        if fused is not None and fused[1] == src and self.consumers.get(src, 0) == 1:
            # MatMul + Add: a vector along the last axis becomes the Linear's bias (nothing else reads the MatMul)
            lin = fused[0]
            vec = np.asarray(c, dtype=np.float32)
            if vec.ndim >= 1 and vec.ndim <= x.rank and vec.shape[-1] == lin.out_features == vec.size:
                with torch.no_grad():
                    lin.bias.add_(torch.tensor(vec.reshape(-1)))
                    ex = x.ex + torch.tensor(vec.reshape(-1))
                return _Dyn(x.node, ex, x.batched)
        return self._with_const(node, operator.add, x, c)

    def op_Sub(self, node: Any) -> _Dyn:
        a, b = self._binary(node)
        if isinstance(a, _Dyn) and isinstance(b, _Dyn):
            self._same_layout(node, a, b)
            return self.call(operator.sub, a, b, batched=a.batched)
        if isinstance(a, _Dyn):
            return self._with_const(node, operator.sub, a, b)
        neg = self.call(operator.neg, b, batched=b.batched)
        return self._with_const(node, operator.add, neg, a)

    def op_Mul(self, node: Any) -> _Dyn:
        a, b = self._binary(node)
        if isinstance(a, _Dyn) and isinstance(b, _Dyn):
            raise self.fail(
                node, "a product of two input-dependent tensors is not supported (only scaling by constants)"
            )
        x, c = (a, b) if isinstance(a, _Dyn) else (b, a)
        return self._with_const(node, operator.mul, x, c)

    def op_Div(self, node: Any) -> _Dyn:
        a, b = self._binary(node)
        if not isinstance(a, _Dyn) or isinstance(b, _Dyn):
            raise self.fail(node, "only division of an input-dependent tensor by a constant is supported")
        return self._with_const(node, operator.truediv, a, b)

    def _linear(self, node: Any, x: _Dyn, weight: np.ndarray, bias: np.ndarray | None) -> _Dyn:
        """``x @ weight.T + bias`` over the last axis as an ``nn.Linear`` (weight (out, in))."""
        out_f, in_f = weight.shape
        lin = nn.Linear(in_f, out_f, bias=True)
        with torch.no_grad():
            lin.weight.copy_(_tensor(weight))
            lin.bias.copy_(_tensor(bias) if bias is not None else torch.zeros(out_f))
        y = self.module(lin, f"linear_{node.name or node.output[0]}", x)
        self.linear_of[y.node] = (lin, node.output[0])
        return y

    def op_Gemm(self, node: Any) -> _Dyn:
        a = self.attrs(node)
        alpha, beta = float(a.get("alpha", 1.0)), float(a.get("beta", 1.0))
        if not isinstance(self.env[node.input[0]], _Dyn):
            raise self.fail(node, "Gemm with a constant first operand and an input-dependent second one")
        x = self.dyn_input(node, 0)
        if a.get("transA", 0):
            raise self.fail(node, "Gemm with transA=1 on an input-dependent tensor (it would transpose the batch)")
        if x.rank != 2:
            raise self.fail(node, f"Gemm needs a 2-D first operand, got shape {list(x.onnx_shape)}")
        w = self.const_input(node, 1, "the weight B").astype(np.float64)
        w = w if a.get("transB", 0) else w.T  # (out, in)
        bias = None
        if len(node.input) > 2 and node.input[2]:
            c = self.const_input(node, 2, "the bias C").astype(np.float64)
            if c.size not in (1, w.shape[0]) or (c.ndim == 2 and c.shape[0] != 1):
                raise self.fail(node, f"bias C of shape {list(c.shape)} does not broadcast to one row of outputs")
            bias = beta * np.broadcast_to(c.reshape(-1), (w.shape[0],))
        return self._linear(node, x, alpha * w, bias)

    def op_MatMul(self, node: Any) -> _Dyn:
        a, b = self._binary(node)
        if isinstance(a, _Dyn) and isinstance(b, _Dyn):
            raise self.fail(node, "a product of two input-dependent tensors is not supported")
        if isinstance(a, _Dyn):
            c = np.asarray(b, dtype=np.float32)
            if c.ndim == 2:
                return self._linear(node, a, c.T, None)
            if c.ndim == 1:
                return self.call(torch.matmul, a, np.ascontiguousarray(c), batched=a.batched)
            raise self.fail(node, f"cannot multiply {list(a.onnx_shape)} by a constant of shape {list(c.shape)}")
        c = np.asarray(a, dtype=np.float32)
        x = b
        # torch.matmul(C, x) keeps the batch apart only when x has matrix axes behind the batch
        if x.ex.dim() < 3 or c.ndim > 2 or (x.batched and x.rank < 3):
            raise self.fail(
                node, f"cannot multiply a constant of shape {list(c.shape)} by a tensor of shape {list(x.onnx_shape)}"
            )
        return self.call(torch.matmul, np.ascontiguousarray(c), x, batched=x.batched)

    def _pads(
        self, node: Any, x: _Dyn, kernel: Sequence[int], strides: Sequence[int], dil: Sequence[int]
    ) -> list[tuple[int, int]]:
        """(begin, end) padding of the two spatial axes, from ``pads`` or ``auto_pad``."""
        a = self.attrs(node)
        auto = a.get("auto_pad", b"NOTSET")
        auto = auto.decode() if isinstance(auto, bytes) else str(auto)
        if auto in ("SAME_UPPER", "SAME_LOWER"):
            out = []
            for i in range(2):
                size = x.onnx_shape[2 + i]
                steps = -(-size // strides[i])
                total = max((steps - 1) * strides[i] + (kernel[i] - 1) * dil[i] + 1 - size, 0)
                small, big = total // 2, total - total // 2  # SAME_UPPER puts the odd pixel at the end
                out.append((small, big) if auto == "SAME_UPPER" else (big, small))
            return out
        if auto == "VALID":
            return [(0, 0), (0, 0)]
        pads = [int(p) for p in a.get("pads", [0, 0, 0, 0])]
        if len(pads) != 4 or min(pads) < 0:
            raise self.fail(node, f"pads {pads} for a 2-D operation")
        return [(pads[0], pads[2]), (pads[1], pads[3])]

    def _spatial(
        self, node: Any, x: _Dyn, kernel: Sequence[int], strides: Sequence[int], dil: Sequence[int]
    ) -> tuple[int, int]:
        """Symmetric (top/left == bottom/right) padding, as torch's pooling layers need."""
        pads = self._pads(node, x, kernel, strides, dil)
        if any(b != e for b, e in pads):
            raise self.fail(
                node,
                f"asymmetric padding (begin, end) = {pads} is not supported for {node.op_type}; re-export the model "
                "with symmetric padding",
            )
        return pads[0][0], pads[1][0]

    def _need_4d(self, node: Any, x: _Dyn) -> None:
        if not (x.batched and x.rank == 4):
            raise self.fail(
                node, f"only 2-D operations on (N, C, H, W) tensors are supported, got {list(x.onnx_shape)}"
            )

    def op_Conv(self, node: Any) -> _Dyn:
        x = self.dyn_input(node, 0)
        self._need_4d(node, x)
        w = self.const_input(node, 1, "the convolution weight").astype(np.float32)
        bias = self.const_input(node, 2, "the convolution bias") if len(node.input) > 2 and node.input[2] else None
        if w.ndim != 4:
            raise self.fail(node, f"weight of shape {list(w.shape)}; only 2-D convolutions are supported")
        a = self.attrs(node)
        groups = int(a.get("group", 1))
        kernel = tuple(int(k) for k in a.get("kernel_shape", w.shape[2:]))
        strides = tuple(int(s) for s in a.get("strides", (1, 1)))
        dil = tuple(int(d) for d in a.get("dilations", (1, 1)))
        if tuple(w.shape[2:]) != kernel:
            raise self.fail(node, f"kernel_shape {list(kernel)} differs from the weight's {list(w.shape[2:])}")
        pad = []
        for axis, (begin, end) in enumerate(self._pads(node, x, kernel, strides, dil)):
            # Asymmetric padding without a pad operation: pad both ends by the larger amount and add zero taps to
            # the kernel on the side padded too much, so that every window still covers the same input pixels
            # (exact; the output size is unchanged).
            extra = abs(end - begin)
            if extra % dil[axis]:
                raise self.fail(node, f"asymmetric padding {(begin, end)} with dilation {dil[axis]}")
            taps = extra // dil[axis]
            if taps:
                zeros_shape = list(w.shape)
                zeros_shape[2 + axis] = taps
                zeros = np.zeros(zeros_shape, dtype=np.float32)
                w = np.concatenate([zeros, w] if end > begin else [w, zeros], axis=2 + axis)
            pad.append(max(begin, end))
        kernel = tuple(w.shape[2:])
        conv = nn.Conv2d(
            w.shape[1] * groups,
            w.shape[0],
            kernel,  # type: ignore[arg-type]
            stride=strides,  # type: ignore[arg-type]
            padding=tuple(pad),  # type: ignore[arg-type]
            dilation=dil,  # type: ignore[arg-type]
            groups=groups,
            bias=bias is not None,
        )
        with torch.no_grad():
            conv.weight.copy_(_tensor(w))
            if bias is not None:
                assert conv.bias is not None
                conv.bias.copy_(_tensor(bias.reshape(-1)))
        return self.module(conv, f"conv_{node.name or node.output[0]}", x)

    def op_BatchNormalization(self, node: Any) -> _Dyn:
        x = self.dyn_input(node, 0)
        a = self.attrs(node)
        if a.get("training_mode", 0):
            raise self.fail(node, "BatchNormalization in training mode")
        scale, shift, mean, var = (
            self.const_input(node, i, n).astype(np.float64)
            for i, n in enumerate(("scale", "B", "mean", "var"), start=1)
        )
        eps = float(a.get("epsilon", 1e-5))
        if x.batched and x.rank == 4:
            bn = nn.BatchNorm2d(scale.size, eps=eps)
            with torch.no_grad():
                bn.weight.copy_(_tensor(scale.reshape(-1)))
                bn.bias.copy_(_tensor(shift.reshape(-1)))
                assert bn.running_mean is not None and bn.running_var is not None
                bn.running_mean.copy_(_tensor(mean.reshape(-1)))
                bn.running_var.copy_(_tensor(var.reshape(-1)))
            return self.module(bn, f"bn_{node.name or node.output[0]}", x)
        if x.rank < 2:
            raise self.fail(node, f"BatchNormalization on a tensor of shape {list(x.onnx_shape)}")
        mul = scale / np.sqrt(var + eps)
        add = shift - mean * mul
        bshape = (-1,) + (1,) * (x.rank - 2)  # channels are ONNX axis 1
        y = self._with_const(node, operator.mul, x, mul.reshape(bshape).astype(np.float32))
        return self._with_const(node, operator.add, y, add.reshape(bshape).astype(np.float32))

    def _pool_args(self, node: Any, x: _Dyn) -> tuple[tuple[int, int], tuple[int, int], tuple[int, int], bool]:
        self._need_4d(node, x)
        a = self.attrs(node)
        kernel = tuple(int(k) for k in a["kernel_shape"])
        strides = tuple(int(s) for s in a.get("strides", (1, 1)))
        dil = tuple(int(d) for d in a.get("dilations", (1, 1)))
        if dil != (1, 1) and node.op_type != "MaxPool":
            raise self.fail(node, f"dilations {list(dil)}")
        pad = self._spatial(node, x, kernel, strides, dil)
        if any(2 * p > k for p, k in zip(pad, kernel)):
            raise self.fail(node, f"padding {pad} larger than half the kernel {kernel}")
        return kernel, strides, pad, bool(a.get("ceil_mode", 0))  # type: ignore[return-value]

    def op_AveragePool(self, node: Any) -> _Dyn:
        x = self.dyn_input(node, 0)
        kernel, strides, pad, ceil = self._pool_args(node, x)
        include = bool(self.attrs(node).get("count_include_pad", 0))
        pool = nn.AvgPool2d(kernel, strides, pad, ceil_mode=ceil, count_include_pad=include)
        return self.module(pool, f"avgpool_{node.name or node.output[0]}", x)

    def op_MaxPool(self, node: Any) -> _Dyn:
        x = self.dyn_input(node, 0)
        kernel, strides, pad, ceil = self._pool_args(node, x)
        dil = tuple(int(d) for d in self.attrs(node).get("dilations", (1, 1)))
        pool = nn.MaxPool2d(kernel, strides, pad, dilation=dil, ceil_mode=ceil)  # type: ignore[arg-type]
        return self.module(pool, f"maxpool_{node.name or node.output[0]}", x)

    def op_GlobalAveragePool(self, node: Any) -> _Dyn:
        x = self.dyn_input(node, 0)
        self._need_4d(node, x)
        pool = nn.AvgPool2d((x.onnx_shape[2], x.onnx_shape[3]))
        return self.module(pool, f"gap_{node.name or node.output[0]}", x)

    def op_Flatten(self, node: Any) -> _Dyn:
        x = self.dyn_input(node, 0)
        axis = int(self.attrs(node).get("axis", 1))
        shape = x.onnx_shape
        axis = axis + len(shape) if axis < 0 else axis
        if x.batched and axis == 1:
            if x.ex.dim() == 2:
                return x
            return self.call(torch.flatten, x, 1, batched=True)
        return self.to_onnx_shape(x, (math.prod(shape[:axis]), math.prod(shape[axis:])))

    def op_Reshape(self, node: Any) -> _Dyn:
        x = self.dyn_input(node, 0)
        a = self.attrs(node)
        if len(node.input) > 1:
            target = [int(v) for v in self.const_input(node, 1, "the target shape").reshape(-1)]
        else:  # opset < 5
            target = [int(v) for v in a.get("shape", [])]
        shape = x.onnx_shape
        allowzero = int(a.get("allowzero", 0))
        resolved = [shape[i] if (v == 0 and not allowzero and i < len(shape)) else v for i, v in enumerate(target)]
        if resolved.count(-1) > 1:
            raise self.fail(node, f"target shape {target} has more than one -1")
        if -1 in resolved:
            known = math.prod(v for v in resolved if v != -1)
            total = math.prod(shape)
            if known == 0 or total % known:
                raise self.fail(node, f"cannot reshape {list(shape)} to {target}")
            resolved[resolved.index(-1)] = total // known
        return self.to_onnx_shape(x, resolved)

    def _axes(self, node: Any) -> list[int] | None:
        a = self.attrs(node)
        if "axes" in a:
            return [int(v) for v in a["axes"]]
        if len(node.input) > 1 and node.input[1]:
            return [int(v) for v in self.const_input(node, 1, "axes").reshape(-1)]
        return None

    def op_Squeeze(self, node: Any) -> _Dyn:
        x = self.dyn_input(node, 0)
        shape = x.onnx_shape
        axes = self._axes(node)
        if axes is None:
            axes = [i for i, d in enumerate(shape) if d == 1]
        axes = [v + len(shape) if v < 0 else v for v in axes]
        if any(shape[v] != 1 for v in axes):
            raise self.fail(node, f"cannot squeeze axes {axes} of shape {list(shape)}")
        return self.to_onnx_shape(x, [d for i, d in enumerate(shape) if i not in axes])

    def op_Unsqueeze(self, node: Any) -> _Dyn:
        x = self.dyn_input(node, 0)
        axes = self._axes(node)
        if axes is None:
            raise self.fail(node, "Unsqueeze without axes")
        rank = x.rank + len(axes)
        axes = sorted(v + rank if v < 0 else v for v in axes)
        out = list(x.onnx_shape)
        for v in axes:
            out.insert(v, 1)
        return self.to_onnx_shape(x, out)

    def op_Transpose(self, node: Any) -> _Dyn:
        x = self.dyn_input(node, 0)
        shape = x.onnx_shape
        perm = [int(p) for p in self.attrs(node).get("perm", list(range(len(shape)))[::-1])]
        out_shape = [shape[p] for p in perm]
        if sorted(perm) != list(range(len(shape))):
            raise self.fail(node, f"perm {perm} is not a permutation of the {len(shape)} axes")
        if x.batched:
            # The batch axis has size 1 in ONNX, so moving it only relabels the sample's layout: permute the other
            # axes behind torch's batch and let to_onnx_shape read the result with the size-1 axis where ONNX put it.
            tperm = [0, *[p for p in perm if p != 0]]
        else:
            tperm = [0, *[p + 1 for p in perm]]
        y = x if tperm == list(range(len(tperm))) else self.call(torch.permute, x, tuple(tperm), batched=x.batched)
        return self.to_onnx_shape(y, out_shape)


def load_onnx(path: str | os.PathLike[str], *, check: bool = True) -> fx.GraphModule:
    """Convert an ONNX classifier into a ``torch.fx.GraphModule`` mapping ``(N, *input_shape)`` to ``(N, K)``.

    See the module docstring for the supported operators, the batch convention and the fx forms used.

    Args:
        path: the ``.onnx`` file.
        check: compare the module with onnxruntime on a few random inputs (uniform in [0, 1] and standard normal)
            and raise if they disagree by more than ``1e-4 * (1 + max |output|)``.

    Returns:
        The module, in eval mode, on the CPU. ``module.input_shape`` is the shape of one input (no batch) and
        ``module.onnx_path`` the file it came from.

    Raises:
        ModelError: the file is missing or unreadable, or (``check=True``) the module disagrees with onnxruntime.
        InputError: the graph uses an operator or a form the converter does not support (named with the node and
            the opset).
    """
    where = f"ONNX model {os.fspath(path)!r}"
    model = _read_model(path)
    conv = _Converter(model, where)
    gm = conv.convert()
    gm.input_shape = conv.layout.sample_shape  # type: ignore[assignment]
    gm.onnx_path = os.fspath(path)  # type: ignore[assignment]
    if check:
        _check_against_ort(gm, path, conv.layout)
    return gm


def _check_against_ort(gm: nn.Module, path: str | os.PathLike[str], layout: _InputLayout) -> None:
    gen = torch.Generator().manual_seed(1234)
    shape = layout.sample_shape
    x = torch.cat([torch.rand(2, *shape, generator=gen), torch.randn(2, *shape, generator=gen)])
    ref = OnnxRuntimeModel(path)(x).double()
    with torch.no_grad():
        got = gm(x).double()
    if got.shape != ref.shape:
        raise ModelError(
            f"ONNX model {os.fspath(path)!r}: the converted module returns {tuple(got.shape)}, onnxruntime "
            f"{tuple(ref.shape)}"
        )
    diff = float((got - ref).abs().max()) if ref.numel() else 0.0
    scale = float(ref.abs().max()) if ref.numel() else 0.0
    if not math.isfinite(diff) or diff > 1e-4 * (1.0 + scale):
        raise ModelError(
            f"ONNX model {os.fspath(path)!r}: the converted module disagrees with onnxruntime on random inputs "
            f"(max difference {diff:.3g}, outputs up to {scale:.3g}); please report this model"
        )
