"""ONNX import: every supported operator against onnxruntime, the batch convention, fx forms, errors."""

from __future__ import annotations

import operator
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from onnx import TensorProto, helper, numpy_helper
from torch import fx, nn

from bastion.errors import InputError, ModelError
from bastion.models import OnnxRuntimeModel, load_model, load_onnx, onnx_input_shape

RNG = np.random.default_rng(0)

#: the fx forms the verification IR reads (brief V2); nothing else may appear in a converted module
ALLOWED_MODULES = (
    nn.Linear, nn.Conv2d, nn.BatchNorm2d, nn.ReLU, nn.LeakyReLU, nn.Sigmoid, nn.Tanh, nn.Flatten, nn.AvgPool2d,
    nn.MaxPool2d, nn.Identity,
)  # fmt: skip
ALLOWED_FUNCTIONS = {
    torch.relu, F.leaky_relu, torch.sigmoid, torch.tanh, torch.flatten, operator.add, operator.sub, operator.mul,
    operator.truediv, operator.neg, torch.matmul, F.linear, F.conv2d, torch.reshape, torch.permute, torch.transpose,
    torch.squeeze, torch.unsqueeze, F.avg_pool2d, F.max_pool2d,
}  # fmt: skip


def w(*shape: int, scale: float = 0.5) -> np.ndarray:
    return (RNG.standard_normal(shape) * scale).astype(np.float32)


def save(
    path: Path,
    nodes: list,
    in_shape: Sequence[int | str],
    out_shape: Sequence[int | str] | None,
    inits: dict[str, np.ndarray],
    *,
    opset: int = 13,
    inits_as_inputs: bool = False,
) -> Path:
    """Write a one-input one-output ONNX model (input ``x``, output ``y``)."""
    tensors = [numpy_helper.from_array(v, name=k) for k, v in inits.items()]
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(in_shape))]
    if inits_as_inputs:  # as older exporters (and many control networks) do
        inputs += [
            helper.make_tensor_value_info(k, helper.np_dtype_to_tensor_dtype(v.dtype), list(v.shape))
            for k, v in inits.items()
        ]
    out = helper.make_tensor_value_info("y", TensorProto.FLOAT, None if out_shape is None else list(out_shape))
    graph = helper.make_graph(nodes, "g", inputs, [out], initializer=tensors)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 7 if opset >= 13 else 6 if opset >= 12 else 5 if opset >= 10 else 4
    path.write_bytes(model.SerializeToString())
    return path


def assert_matches_ort(path: Path, n: int = 5, scale: float = 1.0) -> fx.GraphModule:
    """load_onnx(path) agrees with onnxruntime on a batch, and only uses the allowed fx forms."""
    gm = load_onnx(path)  # check=True compares too; this test compares on its own inputs
    shape = onnx_input_shape(path)
    x = torch.randn(n, *shape, generator=torch.Generator().manual_seed(3)) * scale
    got = gm(x)
    ref = OnnxRuntimeModel(path)(x)
    assert got.shape == ref.shape and got.dim() == 2 and got.shape[0] == n
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-5)
    assert_allowed_forms(gm)
    return gm


def assert_allowed_forms(gm: nn.Module) -> None:
    traced = fx.symbolic_trace(gm)
    mods = dict(traced.named_modules())
    for node in traced.graph.nodes:
        if node.op == "call_module":
            assert isinstance(mods[node.target], ALLOWED_MODULES), node.format_node()
        elif node.op == "call_function":
            assert node.target in ALLOWED_FUNCTIONS, node.format_node()
        else:
            assert node.op in ("placeholder", "get_attr", "output"), node.format_node()


# ---------------------------------------------------------------------------------------------------- operators


@pytest.mark.parametrize("opset", [8, 11, 13, 17])
@pytest.mark.parametrize("inits_as_inputs", [False, True])
def test_gemm_mlp_control_network(tmp_path: Path, opset: int, inits_as_inputs: bool) -> None:
    # an ACAS-Xu-like 5-input network: Gemm with alpha/beta/transB, initializers also listed as inputs
    nodes = [
        helper.make_node("Gemm", ["x", "W1", "b1"], ["h1"], transB=1, alpha=0.7, beta=1.3, name="fc1"),
        helper.make_node("Relu", ["h1"], ["r1"]),
        helper.make_node("Gemm", ["r1", "W2", "b2"], ["h2"], transB=0, name="fc2"),
        helper.make_node("Relu", ["h2"], ["r2"]),
        helper.make_node("Gemm", ["r2", "W3", "b3"], ["y"], transB=1),
    ]
    inits = {"W1": w(16, 5), "b1": w(16), "W2": w(16, 12), "b2": w(1, 12), "W3": w(5, 12), "b3": w(5)}
    p = save(tmp_path / "mlp.onnx", nodes, [1, 5], [1, 5], inits, opset=opset, inits_as_inputs=inits_as_inputs)
    assert onnx_input_shape(p) == (5,)
    gm = assert_matches_ort(p)
    assert sum(isinstance(m, nn.Linear) for m in gm.modules()) == 3


@pytest.mark.parametrize("opset", [9, 13])
def test_matmul_add_becomes_linear_on_4d_input(tmp_path: Path, opset: int) -> None:
    # input [1, 1, 1, 5] as in VNN-COMP ACAS Xu files, Flatten then MatMul + Add
    nodes = [
        helper.make_node("Flatten", ["x"], ["f"], axis=1),
        helper.make_node("MatMul", ["f", "W1"], ["m1"]),
        helper.make_node("Add", ["m1", "b1"], ["a1"]),
        helper.make_node("Relu", ["a1"], ["r1"]),
        helper.make_node("MatMul", ["r1", "W2"], ["m2"]),
        helper.make_node("Add", ["b2", "m2"], ["y"]),
    ]
    inits = {"W1": w(5, 10), "b1": w(10), "W2": w(10, 4), "b2": w(1, 4)}
    p = save(tmp_path / "ml.onnx", nodes, [1, 1, 1, 5], [1, 4], inits, opset=opset)
    assert onnx_input_shape(p) == (1, 1, 5)
    gm = assert_matches_ort(p)
    # both Adds folded into the Linear biases: the graph is Linear, ReLU, Linear only
    targets = [n.op for n in gm.graph.nodes]
    assert targets.count("call_module") == 2 and targets.count("call_function") == 2  # flatten + relu


def test_column_vector_input_with_constant_left_matmul(tmp_path: Path) -> None:
    # input [1, 12, 1] (MNIST-like [1, 784, 1]): W @ x + b with the constant on the left, output [1, K, 1]
    nodes = [
        helper.make_node("MatMul", ["W1", "x"], ["m1"]),
        helper.make_node("Add", ["m1", "b1"], ["a1"]),
        helper.make_node("Relu", ["a1"], ["r1"]),
        helper.make_node("MatMul", ["W2", "r1"], ["m2"]),
        helper.make_node("Add", ["m2", "b2"], ["y"]),
    ]
    inits = {"W1": w(8, 12), "b1": w(8, 1), "W2": w(3, 8), "b2": w(3, 1)}
    p = save(tmp_path / "col.onnx", nodes, [1, 12, 1], [1, 3, 1], inits)
    assert onnx_input_shape(p) == (12, 1)
    gm = assert_matches_ort(p)
    assert gm(torch.rand(4, 12, 1)).shape == (4, 3)


@pytest.mark.parametrize("opset", [10, 13, 17])
def test_cnn_conv_bn_pools(tmp_path: Path, opset: int) -> None:
    nodes = [
        helper.make_node("Conv", ["x", "cw", "cb"], ["c1"], pads=[1, 1, 1, 1], strides=[1, 1], kernel_shape=[3, 3]),
        helper.make_node("BatchNormalization", ["c1", "g", "beta", "mu", "var"], ["bn"], epsilon=1e-3),
        helper.make_node("Relu", ["bn"], ["r1"]),
        helper.make_node("MaxPool", ["r1"], ["p1"], kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node(
            "Conv", ["p1", "cw2"], ["c2"], strides=[2, 2], dilations=[1, 1], group=2, auto_pad="SAME_UPPER"
        ),
        helper.make_node("LeakyRelu", ["c2"], ["r2"], alpha=0.1),
        helper.make_node("AveragePool", ["r2"], ["p2"], kernel_shape=[3, 3], pads=[1, 1, 1, 1], strides=[1, 1]),
        helper.make_node("Flatten", ["p2"], ["f"]),
        helper.make_node("Gemm", ["f", "fw", "fb"], ["y"], transB=1),
    ]
    inits = {
        "cw": w(4, 3, 3, 3), "cb": w(4), "g": w(4) + 1, "beta": w(4), "mu": w(4),
        "var": np.abs(w(4)) + 0.5, "cw2": w(6, 2, 1, 1), "fw": w(7, 6 * 2 * 2), "fb": w(7),
    }  # fmt: skip
    p = save(tmp_path / "cnn.onnx", nodes, [1, 3, 8, 8], [1, 7], inits, opset=opset)
    assert onnx_input_shape(p) == (3, 8, 8)
    gm = assert_matches_ort(p)
    kinds = {type(m) for m in gm.modules()}
    assert {nn.Conv2d, nn.BatchNorm2d, nn.MaxPool2d, nn.AvgPool2d, nn.Linear} <= kinds
    # ONNX AveragePool excludes padding from the mean by default, unlike torch
    assert not next(m for m in gm.modules() if isinstance(m, nn.AvgPool2d)).count_include_pad


def test_keras_like_nhwc_transpose(tmp_path: Path) -> None:
    # Keras/tf2onnx: NHWC input, Transpose to NCHW for the conv, back to NHWC, flatten with Reshape [-1, D]
    nodes = [
        helper.make_node("Transpose", ["x"], ["t1"], perm=[0, 3, 1, 2]),
        helper.make_node("Conv", ["t1", "cw", "cb"], ["c1"], kernel_shape=[3, 3]),
        helper.make_node("Relu", ["c1"], ["r1"]),
        helper.make_node("Transpose", ["r1"], ["t2"], perm=[0, 2, 3, 1]),
        helper.make_node("Reshape", ["t2", "shape"], ["f"]),
        helper.make_node("MatMul", ["f", "fw"], ["m"]),
        helper.make_node("Add", ["m", "fb"], ["logits"]),
        helper.make_node("Sigmoid", ["logits"], ["y"]),
    ]
    inits = {"cw": w(5, 3, 3, 3), "cb": w(5), "shape": np.array([-1, 4 * 4 * 5], np.int64), "fw": w(80, 6), "fb": w(6)}
    p = save(tmp_path / "keras.onnx", nodes, ["unk__1", 6, 6, 3], ["unk__2", 6], inits, opset=13)
    assert onnx_input_shape(p) == (6, 6, 3)
    gm = assert_matches_ort(p)
    assert any(n.target is torch.permute for n in gm.graph.nodes)


def test_matlab_like_normalisation(tmp_path: Path) -> None:
    # MATLAB: Sub mean / Div std on the image, Flatten, MatMul + Add, Tanh; a Neg and a constant-minus-input Sub
    nodes = [
        helper.make_node("Sub", ["x", "mean"], ["s"]),
        helper.make_node("Div", ["s", "std"], ["d"]),
        helper.make_node("Flatten", ["d"], ["f"]),
        helper.make_node("MatMul", ["f", "W1"], ["m1"]),
        helper.make_node("Add", ["m1", "b1"], ["a1"]),
        helper.make_node("Tanh", ["a1"], ["t1"]),
        helper.make_node("Mul", ["scale", "t1"], ["s1"]),
        helper.make_node("Sub", ["one", "s1"], ["s2"]),
        helper.make_node("Neg", ["s2"], ["n1"]),
        helper.make_node("Gemm", ["n1", "W2"], ["y"]),
    ]
    inits = {
        "mean": np.array([0.3], np.float32).reshape(1, 1, 1, 1), "std": np.float32(0.2).reshape(()),
        "W1": w(16, 9), "b1": w(9), "scale": w(9), "one": np.ones((1, 9), np.float32), "W2": w(9, 3),
    }  # fmt: skip
    p = save(tmp_path / "matlab.onnx", nodes, [1, 1, 4, 4], [1, 3], inits, opset=11)
    assert_matches_ort(p)


@pytest.mark.parametrize("opset", [11, 13])
def test_pytorch_shape_chain_is_folded(tmp_path: Path, opset: int) -> None:
    # x.view(x.size(0), -1) as torch.onnx exports it: Shape -> Gather -> Unsqueeze -> Concat -> Reshape
    unsq = (
        helper.make_node("Unsqueeze", ["n"], ["n1"], axes=[0])
        if opset < 13
        else helper.make_node("Unsqueeze", ["n", "ax0"], ["n1"])
    )
    nodes = [
        helper.make_node("Conv", ["x", "cw"], ["c"], kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("Shape", ["c"], ["shp"]),
        helper.make_node("Constant", [], ["zero"], value=numpy_helper.from_array(np.array(0, np.int64))),
        helper.make_node("Gather", ["shp", "zero"], ["n"], axis=0),
        unsq,
        helper.make_node("Concat", ["n1", "minus1"], ["target"], axis=0),
        helper.make_node("Cast", ["target"], ["target64"], to=TensorProto.INT64),
        helper.make_node("Reshape", ["c", "target64"], ["f"]),
        helper.make_node("Identity", ["f"], ["f2"]),
        helper.make_node("Dropout", ["f2"], ["f3"]),
        helper.make_node("Gemm", ["f3", "fw", "fb"], ["y"], transB=1),
    ]
    inits = {"cw": w(3, 2, 2, 2), "minus1": np.array([-1], np.int64), "fw": w(4, 3 * 3 * 3), "fb": w(4)}
    if opset >= 13:
        inits["ax0"] = np.array([0], np.int64)
    p = save(tmp_path / "chain.onnx", nodes, [1, 2, 6, 6], [1, 4], inits, opset=opset)
    gm = assert_matches_ort(p)
    assert not any(n.target in (torch.permute,) for n in gm.graph.nodes)


def test_constant_of_shape_and_constant_folding(tmp_path: Path) -> None:
    # a bias built at run time from ConstantOfShape and Mul of constants
    nodes = [
        helper.make_node("Constant", [], ["shape"], value=numpy_helper.from_array(np.array([1, 4], np.int64))),
        helper.make_node(
            "ConstantOfShape", ["shape"], ["ones"], value=numpy_helper.from_array(np.array([1.5], np.float32))
        ),
        helper.make_node("Mul", ["ones", "k"], ["bias"]),
        helper.make_node("MatMul", ["x", "W"], ["m"]),
        helper.make_node("Add", ["m", "bias"], ["y"]),
    ]
    p = save(tmp_path / "cos.onnx", nodes, [1, 6], [1, 4], {"W": w(6, 4), "k": w(4)}, opset=12)
    assert_matches_ort(p)


@pytest.mark.parametrize("opset", [11, 13])
def test_squeeze_unsqueeze_residual_add(tmp_path: Path, opset: int) -> None:
    def axes_node(op: str, src: str, dst: str, axes: list[int], const: str) -> list:
        if opset < 13:
            return [helper.make_node(op, [src], [dst], axes=axes)]
        return [helper.make_node(op, [src, const], [dst])]

    nodes = [
        *axes_node("Unsqueeze", "x", "u", [2], "ax2"),  # [1, 5, 1]
        helper.make_node("MatMul", ["W", "u"], ["m"]),  # [1, 5, 1]: constant on the left
        *axes_node("Squeeze", "m", "s", [-1], "axm1"),  # [1, 5]
        helper.make_node("Relu", ["s"], ["r"]),
        helper.make_node("Add", ["r", "x"], ["res"]),  # residual: input-dependent + input-dependent
        helper.make_node("Sub", ["res", "s"], ["d"]),
        *axes_node("Squeeze", "d", "d0", [0], "ax0"),  # [5]: the batch of 1 squeezed away
        helper.make_node("MatMul", ["d0", "W2"], ["m2"]),  # [3]
        *axes_node("Unsqueeze", "m2", "y", [0], "ax0"),  # [1, 3]
    ]
    inits = {"W": w(5, 5), "W2": w(5, 3)}
    if opset >= 13:
        inits |= {k: np.array([v], np.int64) for k, v in (("ax2", 2), ("axm1", -1), ("ax0", 0))}
    p = save(tmp_path / "sq.onnx", nodes, [1, 5], [1, 3], inits, opset=opset)
    assert_matches_ort(p)


def test_two_d_batchnorm_sigmoid_and_global_pool(tmp_path: Path) -> None:
    nodes = [
        helper.make_node("Conv", ["x", "cw"], ["c"], kernel_shape=[1, 1]),
        helper.make_node("GlobalAveragePool", ["c"], ["g"]),
        helper.make_node("Flatten", ["g"], ["f"]),
        helper.make_node("BatchNormalization", ["f", "s", "b", "m", "v"], ["bn"]),
        helper.make_node("Sigmoid", ["bn"], ["y"]),
    ]
    inits = {"cw": w(4, 2, 1, 1), "s": w(4) + 1, "b": w(4), "m": w(4), "v": np.abs(w(4)) + 0.3}
    p = save(tmp_path / "bn1d.onnx", nodes, [1, 2, 5, 5], [1, 4], inits, opset=9)
    assert_matches_ort(p)


def test_symbolic_batch_and_batches_of_any_size(tmp_path: Path) -> None:
    nodes = [helper.make_node("Gemm", ["x", "W", "b"], ["h"]), helper.make_node("Relu", ["h"], ["y"])]
    p = save(tmp_path / "dyn.onnx", nodes, ["batch", 3], ["batch", 2], {"W": w(3, 2), "b": w(2)})
    gm = assert_matches_ort(p, n=7)
    assert gm(torch.rand(1, 3)).shape == (1, 2) and gm(torch.rand(0, 3)).shape == (0, 2)


def test_gradients_flow_for_attacks(tmp_path: Path) -> None:
    nodes = [helper.make_node("Gemm", ["x", "W"], ["h"]), helper.make_node("Tanh", ["h"], ["y"])]
    p = save(tmp_path / "g.onnx", nodes, [1, 3], [1, 2], {"W": w(3, 2)})
    gm = load_onnx(p)
    x = torch.rand(4, 3, requires_grad=True)
    gm(x).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_load_model_hook(tmp_path: Path) -> None:
    nodes = [helper.make_node("Gemm", ["x", "W"], ["y"])]
    p = save(tmp_path / "hook.onnx", nodes, [1, 3], [1, 2], {"W": w(3, 2)})
    model = load_model(str(p), num_classes=2)
    assert not model.training
    x = torch.rand(3, 3)
    torch.testing.assert_close(model(x), OnnxRuntimeModel(p)(x), rtol=1e-5, atol=1e-6)
    with pytest.raises(ModelError, match="returns 2 logits"):
        load_model(str(p), num_classes=5)


# ---------------------------------------------------------------------------------------------------- errors


def test_unsupported_operator_is_named(tmp_path: Path) -> None:
    nodes = [helper.make_node("Gemm", ["x", "W"], ["h"]), helper.make_node("Sin", ["h"], ["y"], name="weird_sin")]
    p = save(tmp_path / "sin.onnx", nodes, [1, 3], [1, 2], {"W": w(3, 2)}, opset=12)
    with pytest.raises(InputError, match=r"'weird_sin' \(Sin, opset 12\).*unsupported operator 'Sin'"):
        load_onnx(p)


@pytest.mark.parametrize(
    "pad_attrs",
    [
        {"pads": [0, 0, 1, 1]},
        {"pads": [2, 0, 0, 1]},
        {"auto_pad": "SAME_UPPER"},  # TensorFlow/Keras "same" with stride 2 on an even size: one pixel at the end
        {"auto_pad": "SAME_LOWER"},
    ],
)
def test_asymmetric_conv_padding_is_exact(tmp_path: Path, pad_attrs: dict) -> None:
    nodes = [
        helper.make_node("Conv", ["x", "cw", "cb"], ["c"], strides=[2, 2], kernel_shape=[3, 3], **pad_attrs),
        helper.make_node("Relu", ["c"], ["r"]),
        helper.make_node("Flatten", ["r"], ["f"]),
        helper.make_node("MatMul", ["f", "fw"], ["y"]),
    ]
    size = 4 * 4  # 3 channels of 4 x 4 in every case
    p = save(
        tmp_path / "apad.onnx", nodes, [1, 2, 8, 8], [1, 3], {"cw": w(3, 2, 3, 3), "cb": w(3), "fw": w(3 * size, 3)}
    )
    assert_matches_ort(p)


def test_asymmetric_pool_padding_refused(tmp_path: Path) -> None:
    nodes = [helper.make_node("MaxPool", ["x"], ["y"], kernel_shape=[2, 2], pads=[0, 0, 1, 1], name="pool")]
    p = save(tmp_path / "pad.onnx", nodes, [1, 1, 4, 4], None, {})
    with pytest.raises(InputError, match=r"'pool' \(MaxPool, opset 13\).*asymmetric padding"):
        load_onnx(p)


def test_product_of_two_inputs_refused(tmp_path: Path) -> None:
    nodes = [helper.make_node("Mul", ["x", "x"], ["y"], name="sq")]
    p = save(tmp_path / "mul.onnx", nodes, [1, 3], [1, 3], {})
    with pytest.raises(InputError, match=r"'sq' \(Mul.*two input-dependent"):
        load_onnx(p)


def test_missing_and_garbage_files(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="not found"):
        load_onnx(tmp_path / "nope.onnx")
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not a protobuf at all")
    with pytest.raises(ModelError, match="cannot read"):
        load_onnx(bad)


def test_check_catches_a_wrong_conversion(tmp_path: Path) -> None:
    from bastion.models.onnx import _check_against_ort, _input_layout, _read_model

    nodes = [helper.make_node("Gemm", ["x", "W"], ["y"])]
    p = save(tmp_path / "chk.onnx", nodes, [1, 3], [1, 2], {"W": w(3, 2)})
    gm = load_onnx(p, check=False)
    lin = next(m for m in gm.modules() if isinstance(m, nn.Linear))
    with torch.no_grad():
        lin.weight[0, 0] += 0.01
    with pytest.raises(ModelError, match="disagrees with onnxruntime"):
        _check_against_ort(gm, p, _input_layout(_read_model(p), "m"))


@pytest.mark.parametrize("arch", ["mlp", "cnn", "resnet"])
def test_pytorch_exported_zoo_models(tmp_path: Path, arch: str) -> None:
    from bastion.models import build_model

    torch.manual_seed(0)
    model = build_model(arch, (1, 8, 8), 10, mean=0.2, std=0.3).eval()
    for m in model.modules():  # non-trivial batch-norm statistics
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 1.5)
    path = tmp_path / f"{arch}.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model, (torch.rand(1, 1, 8, 8),), str(path), dynamo=False, opset_version=13,
            input_names=["x"], output_names=["y"], dynamic_axes={"x": {0: "n"}, "y": {0: "n"}},
        )  # fmt: skip
    gm = assert_matches_ort(path, n=6)
    x = torch.rand(6, 1, 8, 8)
    torch.testing.assert_close(gm(x), model(x), rtol=1e-4, atol=1e-5)


def test_transpose_moving_the_batch_axis_of_one(tmp_path: Path) -> None:
    # MATLAB-style: a row [1, 6] transposed into a column [6, 1] for W @ x, and back
    nodes = [
        helper.make_node("Transpose", ["x"], ["col"], perm=[1, 0]),
        helper.make_node("MatMul", ["W", "col"], ["h"]),  # [4, 1]
        helper.make_node("Relu", ["h"], ["r"]),
        helper.make_node("Transpose", ["r"], ["y"]),  # default perm: reversed, [1, 4]
    ]
    p = save(tmp_path / "tr.onnx", nodes, [1, 6], [1, 4], {"W": w(4, 6)})
    assert_matches_ort(p)


def test_single_output_bias_and_double_precision_model(tmp_path: Path) -> None:
    # a float64 model with one output unit: MatMul + scalar Add (not folded as a vector bias), then Sigmoid
    nodes = [
        helper.make_node("MatMul", ["x", "W"], ["m"]),
        helper.make_node("Add", ["m", "b"], ["a"]),
        helper.make_node("Sigmoid", ["a"], ["y"]),
    ]
    tensors = [numpy_helper.from_array(w(4, 1).astype(np.float64), "W"), numpy_helper.from_array(np.float64(0.3), "b")]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.DOUBLE, [1, 4])],
        [helper.make_tensor_value_info("y", TensorProto.DOUBLE, [1, 1])], initializer=tensors,
    )  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 7
    p = tmp_path / "f64.onnx"
    p.write_bytes(model.SerializeToString())
    gm = assert_matches_ort(p)
    assert gm(torch.rand(3, 4)).dtype == torch.float32
