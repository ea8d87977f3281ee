"""VNN-LIB parsing into specs (DNF over boxes and output polyhedra), errors with line:col, counterexample text."""

from __future__ import annotations

import gzip
import re
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from bastion.errors import InputError
from bastion.threat import LpBall
from bastion.verify.spec import Region, Spec
from bastion.verify.vnnlib import format_counterexample, format_vnnlib, parse_vnnlib


def declare(n: int, m: int) -> str:
    return "".join(f"(declare-const X_{i} Real)\n" for i in range(n)) + "".join(
        f"(declare-const Y_{j} Real)\n" for j in range(m)
    )


def box(bounds: list[tuple[float, float]]) -> str:
    return "".join(f"(assert (<= X_{i} {hi}))\n(assert (>= X_{i} {lo}))\n" for i, (lo, hi) in enumerate(bounds))


def test_acasxu_style_box_and_output_constraint(tmp_path: Path) -> None:
    text = (
        "; ACAS Xu property 3-like\n" + declare(5, 5) + box([(-0.3, -0.29), (-0.01, 0.01), (0.49, 0.5), (0.3, 0.5),
        (0.3, 0.5)]) + "\n; unsafe if COC is minimal\n(assert (<= Y_0 Y_1))\n(assert (<= Y_0 Y_2))\n"
        "(assert (<= Y_0 Y_3))\n(assert (<= Y_0 Y_4))\n"
    )  # fmt: skip
    path = tmp_path / "prop.vnnlib"
    path.write_text(text)
    for src in (path, str(path), text):
        spec = parse_vnnlib(src, num_inputs=5, num_outputs=5)
        assert len(spec.regions) == 1 and spec.num_outputs == 5 and spec.input_shape == (5,)
        r = spec.regions[0]
        assert r.lower.tolist() == [-0.3, -0.01, 0.49, 0.3, 0.3]
        assert r.upper.tolist() == [-0.29, 0.01, 0.5, 0.5, 0.5]
        assert len(r.unsafe) == 1
        a, b = r.unsafe[0]
        expected = np.zeros((4, 5))
        expected[:, 0] = 1
        expected[np.arange(4), np.arange(1, 5)] = -1
        assert a.numpy().tolist() == expected.tolist() and b.tolist() == [0, 0, 0, 0]
    inside = torch.tensor([[-0.295, 0.0, 0.495, 0.4, 0.4]])
    assert spec.violated(inside, torch.tensor([[0.0, 1.0, 1.0, 1.0, 1.0]])).tolist() == [True]
    assert spec.violated(inside, torch.tensor([[0.0, 1.0, -1.0, 1.0, 1.0]])).tolist() == [False]
    gz = tmp_path / "prop.vnnlib.gz"
    gz.write_bytes(gzip.compress(text.encode()))
    assert parse_vnnlib(gz).regions[0].lower.tolist() == r.lower.tolist()


def test_box_and_or_of_ands_over_outputs() -> None:
    # the MNIST/CIFAR robustness form: a box, then an `or` of `and`s, one per other class
    text = (
        declare(2, 3)
        + box([(0.0, 1.0), (0.2, 0.4)])
        + ("(assert (or\n  (and (>= Y_1 Y_0))\n  (and (>= Y_2 Y_0) (<= Y_2 3.5))\n))\n")
    )
    spec = parse_vnnlib(text)
    assert len(spec.regions) == 1 and len(spec.regions[0].unsafe) == 2
    a1, b1 = spec.regions[0].unsafe[1]
    assert a1.tolist() == [[1.0, 0.0, -1.0], [0.0, 0.0, 1.0]] and b1.tolist() == [0.0, 3.5]
    x = torch.tensor([[0.5, 0.3]] * 4)
    y = torch.tensor([[1.0, 2.0, 0.0], [1.0, 0.0, 2.0], [1.0, 0.0, 4.0], [1.0, 0.0, 0.0]])
    assert spec.violated(x, y).tolist() == [True, True, False, False]


def test_or_of_boxes_with_outputs_nested_and_merged() -> None:
    # an `or` of `(and box... Y...)`, nested `and`/`or`, two disjuncts sharing a box
    text = (
        declare(1, 2)
        + """
    (assert (or
        (and (>= X_0 0) (<= X_0 1) (or (<= Y_0 -1) (and (>= Y_1 2) (<= Y_1 3))))
        (and (and (>= X_0 2) (<= X_0 3)) (<= Y_0 Y_1))
        (and (>= X_0 5) (<= X_0 4) (<= Y_0 0))   ; an empty box: dropped
    ))
    """
    )
    spec = parse_vnnlib(text)
    assert [r.lower.tolist() for r in spec.regions] == [[0.0], [2.0]]
    assert [len(r.unsafe) for r in spec.regions] == [2, 1]
    x = torch.tensor([[0.5], [0.5], [0.5], [2.5], [2.5], [4.5]])
    y = torch.tensor([[-1.0, 0.0], [0.0, 2.5], [0.0, 3.5], [0.0, 1.0], [1.0, 0.0], [-5.0, 0.0]])
    assert spec.violated(x, y).tolist() == [True, True, False, True, False, False]


def test_linear_combinations_and_strict_comparisons() -> None:
    text = (
        declare(2, 3)
        + """
    (assert (>= X_0 -1.5e-1)) (assert (< X_0 (+ 0.25 0.25)))   ; strict read as non-strict
    (assert (<= (* 2 X_1) 1)) (assert (>= (- X_1) -0.25))      ; X_1 <= 0.5 and X_1 <= 0.25
    (assert (>= X_1 (- 0.1)))
    (assert (> (+ (* 2.0 Y_0) (- Y_1 Y_2) 1) (* -1 (* 3 Y_2))))
    """
    )
    spec = parse_vnnlib(text)
    r = spec.regions[0]
    assert r.lower.tolist() == [-0.15, -0.1] and r.upper.tolist() == [0.5, 0.25]
    # 2 y0 + y1 - y2 + 1 >= -3 y2  <=>  -2 y0 - y1 - 2 y2 <= 1
    a, b = r.unsafe[0]
    assert a.tolist() == [[-2.0, -1.0, -2.0]] and b.tolist() == [1.0]


def test_equality_and_constant_comparisons() -> None:
    text = declare(1, 2) + "(assert (= X_0 0.5)) (assert (<= 1 2)) (assert (or (<= 3 2) (= Y_0 Y_1)))"
    spec = parse_vnnlib(text)
    r = spec.regions[0]
    assert r.lower.tolist() == r.upper.tolist() == [0.5]
    a, b = r.unsafe[0]
    assert a.tolist() == [[1.0, -1.0], [-1.0, 1.0]] and b.tolist() == [0.0, 0.0]
    false = parse_vnnlib(declare(1, 1) + box([(0, 1)]) + "(assert (<= 3 2))")
    assert false.regions == [] and not false.violated(torch.zeros(1, 1), torch.zeros(1, 1)).any()


def test_large_file_is_fast_and_needs_no_recursion() -> None:
    n = 3000
    text = (
        declare(n, 10)
        + box([(0.0, 1.0)] * n)
        + "(assert (or\n"
        + "".join(f"  (and (>= Y_{j} Y_0))\n" for j in range(1, 10))
        + "))\n"
    )
    start = time.perf_counter()
    spec = parse_vnnlib(text, num_inputs=n, num_outputs=10)
    assert time.perf_counter() - start < 5.0
    assert spec.num_inputs == n and len(spec.regions[0].unsafe) == 9
    # 20 000 nested `and`s: deeper than Python's recursion limit
    deep = declare(1, 1) + "(assert " + "(and " * 20000 + "(<= X_0 1) (>= X_0 0)" + ")" * 20001
    assert parse_vnnlib(deep).regions[0].upper.tolist() == [1.0]
    # many boxes, each with its own output constraint (nn4sys-like)
    many = (
        declare(2, 1)
        + "(assert (or\n"
        + "".join(f"(and (>= X_0 {i}) (<= X_0 {i + 0.5}) (>= X_1 0) (<= X_1 1) (>= Y_0 {i}))\n" for i in range(2000))
        + "))"
    )
    start = time.perf_counter()
    assert len(parse_vnnlib(many).regions) == 2000
    assert time.perf_counter() - start < 5.0


@pytest.mark.parametrize(
    ("text", "where", "message"),
    [
        ("(declare-const X_0 Real)\n(assert (<= X_0 1)\n", "2:1", "never closed"),
        ("(declare-const X_0 Real))", "1:25", "unexpected '\\)'"),
        ("(declare-const X_0 Int)", "1:20", "only Real"),
        ("(declare-const Z_0 Real)", "1:16", "X_<i>"),
        ("(declare-const X_0 Real)\n(assert (<= X_1 1))", "2:13", "X_1 is used before"),
        ("(declare-const X_0 Real)\n  (assert (<= X_0 foo))", "2:19", "unknown symbol 'foo'"),
        ("(declare-const X_0 Real)\n(declare-const X_1 Real)\n(assert (<= (+ X_0 X_1) 1))", "3:9", "single X_i"),
        ("(declare-const X_0 Real)\n(declare-const Y_0 Real)\n(assert (<= X_0 Y_0))", "3:9", "mixing"),
        ("(declare-const Y_0 Real)\n(assert (<= (* Y_0 Y_0) 1))", "2:13", "not linear"),
        ("(declare-const Y_0 Real)\n(assert (exp Y_0))", "2:10", "unsupported operator"),
        ("(declare-const Y_0 Real)\n(assert (and Y_0))", "2:14", "expected a formula"),
        ("(declare-const X_0 Real)\nX_0", "2:1", "outside"),
        ("(declare-const X_0 Real)\n(declare-const X_0 Real)", "2:16", "declared twice"),
    ],
)
def test_errors_name_line_and_column(text: str, where: str, message: str) -> None:
    with pytest.raises(InputError, match=rf"<vnnlib>:{where}: .*{message}"):
        parse_vnnlib(text)


def test_structural_errors() -> None:
    with pytest.raises(InputError, match="X_0 is not declared"):
        parse_vnnlib("(declare-const X_1 Real)(declare-const Y_0 Real)")
    with pytest.raises(InputError, match=r"declares 1 inputs .* model has 2"):
        parse_vnnlib(declare(1, 1) + box([(0, 1)]), num_inputs=2)
    with pytest.raises(InputError, match="X_1 has no lower bound"):
        parse_vnnlib(declare(2, 1) + box([(0, 1)]) + "(assert (<= X_1 1))")
    with pytest.raises(InputError, match="not found"):
        parse_vnnlib("no/such/file.vnnlib")


def test_counterexample_round_trip() -> None:
    x = torch.tensor([[0.1, -2.5e-7], [3.0, 1 / 3]], dtype=torch.float32)
    y = torch.tensor([1.5, -0.25])
    text = format_counterexample(x, y)
    assert text.startswith("((X_0 ") and text.endswith(")") and "\n (X_1 " in text
    pairs = re.findall(r"\((X|Y)_(\d+) ([^()\s]+)\)", text)
    assert [f"{k}_{i}" for k, i, _ in pairs] == ["X_0", "X_1", "X_2", "X_3", "Y_0", "Y_1"]
    values = torch.tensor([float(v) for _, _, v in pairs], dtype=torch.float32)
    assert torch.equal(values[:4], x.reshape(-1)) and torch.equal(values[4:], y)  # exact after the round trip
    with pytest.raises(InputError, match="NaN"):
        format_counterexample([float("nan")], [0.0])


def test_parsed_spec_is_a_spec() -> None:
    spec = parse_vnnlib(declare(4, 2) + box([(0, 1)] * 4) + "(assert (>= Y_1 Y_0))")
    assert isinstance(spec, Spec)
    shaped = spec.with_input_shape((1, 2, 2))
    assert shaped.violated(torch.full((1, 1, 2, 2), 0.5), torch.tensor([[0.0, 1.0]])).tolist() == [True]


@pytest.mark.parametrize("regions", [1, 3])
def test_format_vnnlib_round_trip(regions: int) -> None:
    g = torch.Generator().manual_seed(regions)
    regs = []
    for _ in range(regions):
        lo = torch.rand(3, generator=g, dtype=torch.float64) - 0.5
        f64 = torch.float64
        unsafe = [(torch.randn(k, 4, generator=g, dtype=f64), torch.randn(k, generator=g, dtype=f64)) for k in (1, 2)]
        regs.append(Region(lo, lo + torch.rand(3, generator=g, dtype=torch.float64), unsafe))
    spec = Spec(regs, 4)
    back = parse_vnnlib(format_vnnlib(spec, comment="generated\nby a test"), num_inputs=3, num_outputs=4)
    assert len(back.regions) == regions
    for r, q in zip(spec.regions, back.regions):
        assert torch.equal(r.lower, q.lower) and torch.equal(r.upper, q.upper)
        for (a, b), (c, d) in zip(r.unsafe, q.unsafe):
            assert torch.equal(a, c) and torch.equal(b, d)
    x = torch.rand(400, 3, dtype=torch.float64) * 2 - 1
    y = torch.randn(400, 4, dtype=torch.float64)
    assert torch.equal(spec.violated(x, y), back.violated(x, y))


def test_robustness_spec_written_and_read_back() -> None:
    x = torch.rand(2, 2)
    spec = Spec.robustness(x, 1, LpBall("linf", 0.05), num_classes=3)
    back = parse_vnnlib(format_vnnlib(spec)).with_input_shape((2, 2))
    xs = (x + (torch.rand(300, 2, 2) - 0.5) * 0.12).clamp(0, 1)
    y = torch.randn(300, 3)
    assert torch.equal(spec.violated(xs, y), back.violated(xs, y))


def test_vnncomp_style_instance_end_to_end(tmp_path: Path) -> None:
    # an ACAS-Xu-shaped instance: [1, 1, 1, 5] input, 6 x 50 ReLU Gemm network, box property; sampled points that
    # violate the property on the converted module also violate it on onnxruntime, and the written counterexample
    # reads back to the same point
    from onnx import TensorProto, helper, numpy_helper

    from bastion.models import OnnxRuntimeModel, load_onnx, onnx_input_shape

    rng = np.random.default_rng(0)
    sizes = [5, 50, 50, 50, 50, 50, 50, 5]
    nodes = [helper.make_node("Flatten", ["x"], ["h0"])]
    inits = []
    for k in range(7):
        weight = rng.standard_normal((sizes[k + 1], sizes[k])) / np.sqrt(sizes[k])
        bias = rng.standard_normal(sizes[k + 1]) * 0.1
        inits += [numpy_helper.from_array(weight.astype(np.float32), f"W{k}")]
        inits += [numpy_helper.from_array(bias.astype(np.float32), f"b{k}")]
        out = "y" if k == 6 else f"g{k}"
        nodes.append(helper.make_node("Gemm", [f"h{k}", f"W{k}", f"b{k}"], [out], transB=1))
        if k < 6:
            nodes.append(helper.make_node("Relu", [out], [f"h{k + 1}"]))
    graph = helper.make_graph(
        nodes, "acas", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1, 1, 5])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 5])], initializer=inits,
    )  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 11)])
    model.ir_version = 6
    onnx_path = tmp_path / "net.onnx"
    onnx_path.write_bytes(model.SerializeToString())
    net = load_onnx(onnx_path)
    with torch.no_grad():
        probe = net(torch.rand(500, 1, 1, 5) - 0.5)
    t0, t3 = (float(v) for v in probe[:, [0, 3]].median(dim=0).values)  # thresholds that split the box
    prop = declare(5, 5) + box([(-0.5, 0.5)] * 5) + f"(assert (or (and (>= Y_0 {t0!r}) (>= Y_1 Y_0)) (>= Y_3 {t3!r})))"
    spec = parse_vnnlib(prop, num_inputs=5, num_outputs=5).with_input_shape(onnx_input_shape(onnx_path))
    r = spec.regions[0]
    x = r.lower + (r.upper - r.lower) * torch.rand(2000, 5, dtype=torch.float64)
    x = x.float().reshape(-1, *spec.input_shape)
    with torch.no_grad():
        hits = spec.violated(x, net(x))
    assert 0 < int(hits.sum()) < 2000  # the property is violated somewhere, not everywhere
    ref = OnnxRuntimeModel(onnx_path)
    cex = x[hits][:3]
    assert spec.violated(cex, ref(cex)).all()
    text = format_counterexample(cex[0], ref(cex[:1])[0])
    values = [float(v) for v in re.findall(r"\((?:X|Y)_\d+ ([^()\s]+)\)", text)]
    assert torch.equal(torch.tensor(values[:5], dtype=torch.float32), cex[0].reshape(-1))
