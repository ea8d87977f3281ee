"""`bastion vnncomp` on ONNX networks and VNN-LIB properties written by the tests (sat, unsat, a benchmark, resume)."""

from __future__ import annotations

import csv
import gzip
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from bastion.cli import main

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from bastion.models.onnx import OnnxRuntimeModel, load_onnx  # noqa: E402
from bastion.verify.ir import Network  # noqa: E402
from bastion.verify.milp import milp_minimum  # noqa: E402

N_IN, HIDDEN, N_OUT = 5, 8, 3
LOWER, UPPER = np.zeros(N_IN), np.full(N_IN, 0.5)


def _write_net(path: Path, seed: int = 0) -> Path:
    """A 5-8-3 ReLU network (Gemm, Relu, Gemm) with input [1, 5], as exported for VNN-COMP."""
    rng = np.random.default_rng(seed)
    w1 = rng.normal(size=(HIDDEN, N_IN)).astype(np.float32)
    b1 = rng.normal(size=HIDDEN).astype(np.float32) * 0.3
    w2 = rng.normal(size=(N_OUT, HIDDEN)).astype(np.float32)
    b2 = rng.normal(size=N_OUT).astype(np.float32) * 0.3
    inits = [numpy_helper.from_array(a, n) for a, n in ((w1, "W1"), (b1, "B1"), (w2, "W2"), (b2, "B2"))]
    nodes = [
        helper.make_node("Gemm", ["X", "W1", "B1"], ["H"], transB=1),
        helper.make_node("Relu", ["H"], ["R"]),
        helper.make_node("Gemm", ["R", "W2", "B2"], ["Y"], transB=1),
    ]
    graph = helper.make_graph(
        nodes,
        "net",
        [helper.make_tensor_value_info("X", TensorProto.FLOAT, [1, N_IN])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [1, N_OUT])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8  # readable by every onnxruntime that supports opset 13
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def _box_text() -> str:
    lines = [f"(declare-const X_{i} Real)" for i in range(N_IN)]
    lines += [f"(declare-const Y_{j} Real)" for j in range(N_OUT)]
    for i in range(N_IN):
        lines += [f"(assert (>= X_{i} {float(LOWER[i])!r}))", f"(assert (<= X_{i} {float(UPPER[i])!r}))"]
    return "\n".join(lines) + "\n"


def _properties(net_path: Path) -> tuple[str, str, float]:
    """A violated property (Y_0 <= its minimum + 0.1) and a provable one (Y_0 <= its minimum - 0.1)."""
    model = load_onnx(net_path)
    net = Network.from_module(model, model.input_shape)
    c = torch.zeros(N_OUT)
    c[0] = 1.0
    low, _ = milp_minimum(net, torch.tensor(LOWER), torch.tensor(UPPER), c)
    sat = _box_text() + f"(assert (<= Y_0 {low + 0.1!r}))\n"
    unsat = _box_text() + f"(assert (<= Y_0 {low - 0.1!r}))\n"
    return sat, unsat, low


_PAIR = re.compile(r"\(([XY])_(\d+)\s+([^\s()]+)\)")


def _parse_counterexample(text: str) -> tuple[np.ndarray, np.ndarray]:
    xs: dict[int, float] = {}
    ys: dict[int, float] = {}
    for kind, idx, val in _PAIR.findall(text):
        (xs if kind == "X" else ys)[int(idx)] = float(val)
    return np.array([xs[i] for i in range(len(xs))]), np.array([ys[j] for j in range(len(ys))])


@pytest.fixture(scope="module")
def bench(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, float]:
    root = tmp_path_factory.mktemp("bench")
    (root / "onnx").mkdir()
    (root / "vnnlib").mkdir()
    net = _write_net(root / "onnx" / "net.onnx")
    sat, unsat, low = _properties(net)
    (root / "vnnlib" / "sat.vnnlib").write_text(sat)
    (root / "vnnlib" / "unsat.vnnlib").write_text(unsat)
    (root / "vnnlib" / "unsat.vnnlib.gz").write_bytes(gzip.compress(unsat.encode()))
    (root / "onnx" / "net.onnx.gz").write_bytes(gzip.compress(net.read_bytes()))
    return root, low


def test_sat_writes_a_counterexample_that_reexecutes(bench: tuple[Path, float], tmp_path: Path) -> None:
    root, low = bench
    out = tmp_path / "res" / "result.txt"
    code = main(["vnncomp", str(root / "onnx/net.onnx"), str(root / "vnnlib/sat.vnnlib"), "--timeout", "30",
                 "--out", str(out)])  # fmt: skip
    assert code == 0
    text = out.read_text()
    assert text.splitlines()[0] == "sat"
    x, y = _parse_counterexample(text)
    assert x.shape == (N_IN,) and y.shape == (N_OUT,)
    assert np.all(x >= LOWER) and np.all(x <= UPPER)
    ref = OnnxRuntimeModel(root / "onnx/net.onnx")(torch.tensor(x, dtype=torch.float32).reshape(1, N_IN))
    ref_y = ref.double().numpy().reshape(-1)
    np.testing.assert_allclose(y, ref_y, rtol=1e-6, atol=1e-6)
    assert ref_y[0] <= low + 0.1  # the unsafe condition holds on onnxruntime's own output


def test_unsat_on_a_provable_property(bench: tuple[Path, float], tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    root, _ = bench
    out = tmp_path / "result.txt"
    code = main(["vnncomp", str(root / "onnx/net.onnx.gz"), str(root / "vnnlib/unsat.vnnlib.gz"), "--timeout",
                 "30", "--out", str(out)])  # fmt: skip
    assert code == 0
    assert out.read_text() == "unsat\n"
    assert capsys.readouterr().out.strip() == "unsat"


def test_benchmark_runner_writes_rows_and_resumes(bench: tuple[Path, float], tmp_path: Path) -> None:
    root, _ = bench
    inst = root / "instances.csv"
    inst.write_text(
        "onnx/net.onnx,vnnlib/sat.vnnlib,30\nonnx/net.onnx,vnnlib/unsat.vnnlib,30\n"
        "onnx/net.onnx.gz,vnnlib/unsat.vnnlib.gz,30\n"
    )
    results = tmp_path / "results.csv"
    assert main(["vnncomp", "--instances", str(inst), "--out", str(results)]) == 0
    rows = list(csv.reader(results.open()))
    assert rows[0] == ["onnx", "vnnlib", "result", "seconds"]
    assert [r[2] for r in rows[1:]] == ["sat", "unsat", "unsat"]
    assert all(float(r[3]) >= 0 for r in rows[1:])
    # A run killed after the first instance: only the rows not yet written are run again.
    results.write_text("\n".join(",".join(r) for r in rows[:2]) + "\n")
    marker = rows[1][3]
    assert main(["vnncomp", "--instances", str(inst), "--dir", str(root), "--out", str(results)]) == 0
    again = list(csv.reader(results.open()))
    assert len(again) == 4 and again[1][3] == marker
    assert [r[2] for r in again[1:]] == ["sat", "unsat", "unsat"]
    # Nothing left: a third run adds nothing.
    assert main(["vnncomp", "--instances", str(inst), "--out", str(results)]) == 0
    assert len(list(csv.reader(results.open()))) == 4


def test_bad_input_is_one_line_error(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["vnncomp", str(tmp_path / "missing.onnx"), str(tmp_path / "p.vnnlib"), "--timeout", "5"]) == 2
    err = capsys.readouterr().err
    assert "not found" in err and "Traceback" not in err
    assert main(["vnncomp", "--timeout", "5"]) == 2
    (tmp_path / "i.csv").write_text("a.onnx,b.vnnlib\n")
    assert main(["vnncomp", "--instances", str(tmp_path / "i.csv")]) == 2
    assert "expected 'onnx,vnnlib,timeout'" in capsys.readouterr().err
