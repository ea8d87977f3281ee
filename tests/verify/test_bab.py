"""Branch and bound against the exact MILP: same answer on every property, real counterexamples, honest timeouts."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
from torch import Tensor, nn

from bastion.errors import InputError
from bastion.threat import LpBall
from bastion.verify.bab import verify, verify_box
from bastion.verify.bounds import compute_bounds
from bastion.verify.ir import Network
from bastion.verify.milp import milp_minimum, milp_verify
from bastion.verify.spec import Region, Spec

from .test_milp import random_box, random_net

#: Small budgets so that each property takes a fraction of a second on one core.
FAST: dict[str, Any] = {"attack_restarts": 8, "attack_steps": 20, "alpha_steps": 5, "beta_steps": 20, "batch_size": 64}
MARGIN = 1e-3  # properties whose exact margin is closer to 0 than this may be answered either way (or not at all)


def _conjunction(net: Network, lo: Tensor, hi: Tensor, seed: int) -> tuple[Tensor, Tensor, float]:
    """A random 1- or 2-row unsafe conjunction with its exact margin ``min_x max_i (A_i f(x) - b_i)`` by MILP."""
    g = torch.Generator().manual_seed(50_000 + seed)
    k = net.output_shape[0]
    rows = 1 + seed % 2
    A = torch.randn(rows, k, generator=g, dtype=torch.float64)
    # Thresholds near the range of each row make both outcomes common.
    mins = torch.tensor([milp_minimum(net, lo, hi, a)[0] for a in A], dtype=torch.float64)
    b = mins + (torch.rand(rows, generator=g, dtype=torch.float64) - 0.5) * 0.6
    truth = milp_verify(net, (lo, hi), A, b)
    assert truth.lower_bound is not None
    return A, b, truth.lower_bound


def _assert_agrees(v: Any, margin: float, model: nn.Module, lo: Tensor, hi: Tensor, A: Tensor, b: Tensor) -> None:
    if v.status == "falsified":
        x = v.counterexample
        assert x is not None and bool((x >= lo).all()) and bool((x <= hi).all())
        with torch.no_grad():
            y = model(x.unsqueeze(0).to(torch.float64))[0]
        assert bool((A @ y <= b).all()), "the reported counterexample does not violate the property"
        assert margin <= MARGIN, f"falsified, but MILP proves a margin of {margin}"
    if v.status == "verified":
        assert margin > -MARGIN, f"verified, but MILP finds a counterexample with margin {margin}"
        assert v.lower_bound is not None and v.lower_bound > 0 and v.lower_bound <= margin + 1e-6
    if margin > MARGIN:
        assert v.status == "verified", f"MILP margin {margin} > 0 but BaB said {v.status}"
    if margin < -MARGIN:
        assert v.status == "falsified", f"MILP margin {margin} < 0 but BaB said {v.status}"


CASES = [(arch, seed) for arch in ("fc", "leaky", "conv", "residual", "maxpool") for seed in range(5)]
SLOW_CASES = [(arch, seed) for arch in ("fc", "leaky", "conv", "residual", "maxpool") for seed in range(5, 65)]


def _check_agreement(arch: str, seed: int) -> None:
    model, shape = random_net(arch, seed)
    net = Network.from_module(model, shape)
    lo, hi = random_box(shape, seed)
    A, b, margin = _conjunction(net, lo, hi, seed)
    # Input splitting where the input is small (fc, leaky, residual), "auto" elsewhere (it solves these small MILPs
    # directly), and ReLU splitting on every net.
    first = "input" if lo.numel() <= 10 else "auto"
    for method in (first, "relu"):
        v = verify_box(model, lo, hi, A, b, timeout=30, method=method, input_shape=shape, **FAST)
        _assert_agrees(v, margin, model, lo, hi, A, b)


@pytest.mark.parametrize(("arch", "seed"), CASES, ids=[f"{a}-{s}" for a, s in CASES])
def test_bab_agrees_with_milp(arch: str, seed: int) -> None:
    _check_agreement(arch, seed)


@pytest.mark.slow
@pytest.mark.parametrize(("arch", "seed"), SLOW_CASES, ids=[f"{a}-{s}" for a, s in SLOW_CASES])
def test_bab_agrees_with_milp_many(arch: str, seed: int) -> None:
    _check_agreement(arch, seed)


def _acas_like(seed: int) -> nn.Module:
    """A 5-input, 3x8 ReLU, 5-output network in the shape of the ACAS-Xu control networks (scaled down)."""
    g = torch.Generator().manual_seed(seed)
    layers: list[nn.Module] = []
    width = 5
    for _ in range(3):
        lin = nn.Linear(width, 8)
        lin.weight.data = torch.randn(8, width, generator=g) / math.sqrt(width)
        lin.bias.data = torch.randn(8, generator=g) * 0.1
        layers += [lin, nn.ReLU()]
        width = 8
    out = nn.Linear(8, 5)
    out.weight.data = torch.randn(5, 8, generator=g) / math.sqrt(8)
    out.bias.data = torch.randn(5, generator=g) * 0.1
    layers.append(out)
    return nn.Sequential(*layers).eval()


def test_input_splitting_on_a_five_input_net() -> None:
    model = _acas_like(0)
    net = Network.from_module(model, (5,))
    lo, hi = -torch.ones(5) * 0.5, torch.ones(5) * 0.5
    c = torch.tensor([1.0, -1.0, 0.0, 0.0, 0.0])
    low, _ = milp_minimum(net, lo, hi, c)
    root = float(
        compute_bounds(net, lo.reshape(1, 5), hi.reshape(1, 5), C=c.reshape(1, -1), method="alpha-crown").lower
    )
    assert root < low - 0.05
    # The unsafe set {y0 - y1 <= t} with t halfway between the root bound and the minimum is empty, but the root
    # bounds cannot show it: splitting inputs must.
    t = (root + low) / 2
    A = c.reshape(1, -1)
    v = verify_box(model, lo, hi, A, torch.tensor([t]), timeout=60, method="input", input_shape=(5,), **FAST)
    assert v.status == "verified" and v.method == "bab-input" and v.domains > 1
    assert v.lower_bound is not None and 0 < v.lower_bound <= low - t + 1e-6
    # {y0 - y1 <= low + 0.02} holds near the minimiser: falsified with a point that re-executes.
    v = verify_box(model, lo, hi, A, torch.tensor([low + 0.02]), timeout=60, input_shape=(5,), **FAST)
    assert v.status == "falsified" and v.counterexample is not None and v.counterexample.dtype == torch.float32
    with torch.no_grad():
        y = model(v.counterexample.unsqueeze(0))[0]
    assert float(y @ c) <= low + 0.02


def test_relu_splitting_needs_and_uses_split_constraints() -> None:
    model = _acas_like(0)
    net = Network.from_module(model, (5,))
    lo, hi = -torch.ones(5) * 0.5, torch.ones(5) * 0.5
    c = torch.tensor([1.0, -1.0, 0.0, 0.0, 0.0])
    low, _ = milp_minimum(net, lo, hi, c)
    A, b = c.reshape(1, -1), torch.tensor([low - 0.05])
    v = verify_box(model, lo, hi, A, b, timeout=60, method="relu", input_shape=(5,), **FAST)
    assert v.status == "verified" and v.method == "bab-relu" and v.domains > 1
    # "auto" solves a MILP this small directly.
    v = verify_box(model, lo, hi, A, b, timeout=60, input_shape=(5,), **FAST)
    assert v.status == "verified" and v.method == "milp"


def test_timeout_never_gives_a_wrong_answer() -> None:
    model = _acas_like(1)
    net = Network.from_module(model, (5,))
    lo, hi = -torch.ones(5), torch.ones(5)
    c = torch.tensor([0.0, 1.0, 0.0, -1.0, 0.0])
    low, _ = milp_minimum(net, lo, hi, c)
    for off, wrong in ((-1e-4, "falsified"), (1e-4, "verified")):
        for method in ("input", "relu"):
            v = verify_box(model, lo, hi, c.reshape(1, -1), torch.tensor([low + off]), timeout=0.3, method=method,
                           input_shape=(5,), **{**FAST, "attack_steps": 0})  # fmt: skip
            assert v.status != wrong
            assert v.status in ("timeout", "unknown", "verified", "falsified")
            if v.status == "timeout":
                # the proven margin of A·y >= low + off can never exceed its true minimum, -off (the old check,
                # lower_bound <= off, failed whenever the search came close to a proof before the timeout)
                assert v.lower_bound is None or v.lower_bound <= -off + 1e-6


def test_domain_cap_gives_unknown() -> None:
    model = _acas_like(2)
    net = Network.from_module(model, (5,))
    lo, hi = -torch.ones(5), torch.ones(5)
    c = torch.tensor([1.0, 0.0, -1.0, 0.0, 0.0])
    low, _ = milp_minimum(net, lo, hi, c)
    v = verify_box(model, lo, hi, c.reshape(1, -1), torch.tensor([low - 1e-3]), timeout=60, method="input",
                   input_shape=(5,), max_domains=3, batch_size=2, attack_steps=0)  # fmt: skip
    assert v.status in ("unknown", "verified")


def test_spec_with_regions_and_disjuncts() -> None:
    model = _acas_like(3)
    net = Network.from_module(model, (5,))
    lo, hi = -torch.ones(5) * 0.3, torch.ones(5) * 0.3
    e = torch.eye(5)
    mins = [milp_minimum(net, lo, hi, e[j])[0] for j in range(3)]
    safe = [(e[j].reshape(1, -1), torch.tensor([mins[j] - 0.05])) for j in range(3)]
    spec = Spec([Region(lo, hi, safe[:2]), Region(lo * 0.5, hi * 0.5, safe[2:])], num_outputs=5)
    v = verify(model, spec, timeout=60, input_shape=(5,), **FAST)
    assert v.status == "verified" and v.lower_bound is not None and v.lower_bound > 0
    # One violable disjunct in the second region makes the whole spec falsified; the witness satisfies the spec.
    bad = (e[0].reshape(1, -1), torch.tensor([mins[0] + 0.05]))
    spec2 = Spec([Region(lo, hi, safe[:2]), Region(lo, hi, [*safe[2:], bad])], num_outputs=5)
    v = verify(model, spec2, timeout=60, input_shape=(5,), **FAST)
    assert v.status == "falsified" and v.counterexample is not None and v.output is not None
    with torch.no_grad():
        y = model(v.counterexample.reshape(1, 5))
    assert bool(spec2.violated(v.counterexample.reshape(1, -1), y)[0])
    # An empty spec holds.
    assert verify(model, Spec([], num_outputs=5, input_shape=(5,)), timeout=5, input_shape=(5,)).status == "verified"


def test_local_robustness_spec_on_an_image_net() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 3, 3, stride=2), nn.ReLU(), nn.Flatten(), nn.Linear(12, 8), nn.ReLU(),
                          nn.Linear(8, 3)).eval()  # fmt: skip
    x = torch.rand(1, 5, 5)
    label = int(model(x.unsqueeze(0)).argmax())
    # Tiny radius: robust; large radius: some class overtakes the label somewhere in the ball.
    small = Spec.robustness(x, label, LpBall("linf", 1e-4), 3)
    assert verify(model, small, timeout=30, **FAST).status == "verified"
    big = Spec.robustness(x, label, LpBall("linf", 1.0), 3)
    v = verify(model, big, timeout=30, **FAST)
    assert v.status == "falsified" and v.counterexample is not None
    with torch.no_grad():
        y = model(v.counterexample.unsqueeze(0))
    assert bool(big.violated(v.counterexample.unsqueeze(0), y)[0])


def test_sigmoid_net_by_input_splitting() -> None:
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(2, 6), nn.Sigmoid(), nn.Linear(6, 1)).eval()
    lo, hi = -torch.ones(2), torch.ones(2)
    grid = torch.stack(torch.meshgrid(torch.linspace(-1, 1, 201), torch.linspace(-1, 1, 201), indexing="ij"), -1)
    with torch.no_grad():
        ys = model(grid.reshape(-1, 2))
    low = float(ys.min())
    A = torch.ones(1, 1)
    v = verify_box(model, lo, hi, A, torch.tensor([low - 0.05]), timeout=30, input_shape=(2,), **FAST)
    assert v.status == "verified" and v.method in ("bab-input", "alpha-crown")
    v = verify_box(model, lo, hi, A, torch.tensor([low + 0.01]), timeout=30, input_shape=(2,), **FAST)
    assert v.status == "falsified"
    with pytest.raises(InputError, match="ReLU"):
        verify_box(model, lo, hi, A, torch.tensor([0.0]), timeout=5, method="relu", input_shape=(2,))


def test_counterexample_must_reexecute_on_onnxruntime(tmp_path: Any) -> None:
    onnx = pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    from onnx import TensorProto, helper, numpy_helper

    torch.manual_seed(2)
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2)).eval()
    # The ONNX file computes the negated outputs: a counterexample of the module is none for onnxruntime.
    w1, b1 = model[0].weight.detach().numpy(), model[0].bias.detach().numpy()
    w2, b2 = -model[2].weight.detach().numpy(), -model[2].bias.detach().numpy()
    inits = [numpy_helper.from_array(a, n) for a, n in ((w1, "W1"), (b1, "B1"), (w2, "W2"), (b2, "B2"))]
    graph = helper.make_graph(
        [helper.make_node("Gemm", ["X", "W1", "B1"], ["H"], transB=1), helper.make_node("Relu", ["H"], ["R"]),
         helper.make_node("Gemm", ["R", "W2", "B2"], ["Y"], transB=1)],
        "neg", [helper.make_tensor_value_info("X", TensorProto.FLOAT, [1, 3])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [1, 2])], inits,
    )  # fmt: skip
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    m.ir_version = 8
    path = tmp_path / "neg.onnx"
    onnx.save(m, str(path))
    lo, hi = -torch.ones(3), torch.ones(3)
    with torch.no_grad():
        y0 = model(torch.zeros(1, 3))[0]
    A, b = torch.tensor([[1.0, 0.0]]), y0[:1] + 1e-3  # the centre itself violates on the module
    plain = verify_box(model, lo, hi, A, b, timeout=5, input_shape=(3,), **FAST)
    assert plain.status == "falsified"
    checked = verify_box(model, lo, hi, A, b, timeout=1.5, input_shape=(3,), onnx_path=path, **FAST)
    assert checked.status not in ("falsified", "verified")


def test_bad_arguments() -> None:
    model = nn.Sequential(nn.Linear(2, 2), nn.ReLU(), nn.Linear(2, 2))
    lo, hi, A, b = torch.zeros(2), torch.ones(2), torch.eye(2), torch.zeros(2)
    with pytest.raises(InputError, match="timeout"):
        verify_box(model, lo, hi, A, b, timeout=0, input_shape=(2,))
    with pytest.raises(InputError, match="unknown method"):
        verify_box(model, lo, hi, A, b, timeout=1, method="magic", input_shape=(2,))
    with pytest.raises(InputError, match="A must be"):
        verify_box(model, lo, hi, torch.eye(3), torch.zeros(3), timeout=1, input_shape=(2,))
    with pytest.raises(InputError, match="lower > upper"):
        verify_box(model, hi, lo - 1, A, b, timeout=1, input_shape=(2,))
    with pytest.raises(InputError, match="batch_size"):
        verify_box(model, lo, hi, A, b, timeout=1, input_shape=(2,), batch_size=0)
    spec = Spec([Region(torch.zeros(3), torch.ones(3), [(torch.eye(2), torch.zeros(2))])], num_outputs=2)
    with pytest.raises(InputError, match="inputs"):
        verify(model, spec, timeout=1, input_shape=(2,))
    with pytest.raises(InputError, match="Spec"):
        verify(model, "not a spec", timeout=1, input_shape=(2,))  # type: ignore[arg-type]
