"""The exact MILP encoding: attained minima, soundness of every bound against it, exact verdicts, closed forms."""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor, nn

from bastion.errors import InputError
from bastion.verify.bounds import BoundOptions, compute_bounds
from bastion.verify.ir import Network, as_network
from bastion.verify.milp import MilpEncoding, milp_minimum, milp_verify
from bastion.verify.spec import Region

ARCHS = ("fc", "leaky", "conv", "residual", "maxpool")
TOL = 1e-6


class _Residual(nn.Module):
    def __init__(self, d: int, width: int) -> None:
        super().__init__()
        self.inp = nn.Linear(d, width)
        self.inner = nn.Sequential(nn.ReLU(), nn.Linear(width, width), nn.ReLU(), nn.Linear(width, width))
        self.out = nn.Sequential(nn.ReLU(), nn.Linear(width, 3))

    def forward(self, x: Tensor) -> Tensor:
        h = self.inp(x)
        return self.out(self.inner(h) + h)


def random_net(arch: str, seed: int) -> tuple[nn.Module, tuple[int, ...]]:
    """A small random piecewise-linear network (float64, eval mode) and its per-sample input shape."""
    g = torch.Generator().manual_seed(seed)

    def r(lo: int, hi: int) -> int:
        return int(torch.randint(lo, hi + 1, (1,), generator=g))

    model: nn.Module
    if arch in ("fc", "leaky"):
        d, shape = r(2, 5), None
        layers: list[nn.Module] = []
        width = d
        for _ in range(r(1, 2)):
            w = r(3, 6)
            act: nn.Module = nn.ReLU() if arch == "fc" else nn.LeakyReLU(float(torch.rand(1, generator=g)) * 0.5)
            layers += [nn.Linear(width, w), act]
            width = w
        layers.append(nn.Linear(width, r(2, 3)))
        model, shape = nn.Sequential(*layers), (d,)
    elif arch == "conv":
        model = nn.Sequential(
            nn.Conv2d(1, 2, 3, stride=2, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(2 * 2 * 2, 4), nn.ReLU(),
            nn.Linear(4, 3),
        )  # fmt: skip
        shape = (1, 4, 4)
    elif arch == "residual":
        model, shape = _Residual(3, 4), (3,)
    else:
        # 1x4x4 -> conv 1x3x3 -> overlapping 2x2 max pooling (stride 1) 1x2x2 -> 3 outputs.
        model = nn.Sequential(nn.Conv2d(1, 1, 2), nn.ReLU(), nn.MaxPool2d(2, stride=1), nn.Flatten(), nn.Linear(4, 3))
        shape = (1, 4, 4)
    for m in model.modules():
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            m.weight.data.copy_(torch.randn(m.weight.shape, generator=g))
            m.bias.data.copy_(torch.randn(m.bias.shape, generator=g) * 0.5)
    return model.double().eval(), shape


def random_box(shape: tuple[int, ...], seed: int) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(10_000 + seed)
    centre = torch.rand(shape, generator=g, dtype=torch.float64) * 2 - 1
    radius = 0.05 + 0.5 * torch.rand(shape, generator=g, dtype=torch.float64)
    return centre - radius, centre + radius


def _sample(lo: Tensor, hi: Tensor, n: int, seed: int) -> Tensor:
    g = torch.Generator().manual_seed(20_000 + seed)
    u = torch.rand((n, *lo.shape), generator=g, dtype=torch.float64)
    corners = (torch.rand((n // 4, *lo.shape), generator=g) < 0.5).double()
    return torch.cat([lo + (hi - lo) * u, lo + (hi - lo) * corners])


# 20 networks of each of the five architectures: 100 in the default suite.
CASES = [(arch, seed) for arch in ARCHS for seed in range(20)]
SLOW_CASES = [(arch, seed) for arch in ARCHS for seed in range(20, 120)]


def _check_minimum_and_bounds(arch: str, seed: int) -> None:
    model, shape = random_net(arch, seed)
    net = Network.from_module(model, shape)
    lo, hi = random_box(shape, seed)
    k = net.output_shape[0]
    c = torch.randn(k, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    value, x = milp_minimum(net, lo, hi, c)
    # The argmin lies in the box and attains the value when re-executed on the original model.
    assert x.shape == shape
    assert bool((x >= lo).all()) and bool((x <= hi).all())
    with torch.no_grad():
        attained = float(model(x.unsqueeze(0))[0] @ c)
        sampled = (model(_sample(lo, hi, 2000, seed)) @ c).min().item()
    assert attained == pytest.approx(value, abs=1e-9)
    # No sampled input does better than the minimum (up to the solver's 1e-9 gaps and feasibility tolerance).
    assert value <= sampled + TOL
    # Every bound method is sound against the exact minimum; alpha-CROWN is never looser than CROWN.
    box = (lo.unsqueeze(0), hi.unsqueeze(0))
    got = {
        m: float(compute_bounds(net, *box, C=c.reshape(1, -1), method=m, options=BoundOptions(alpha_steps=10)).lower)
        for m in ("ibp", "crown", "alpha-crown", "deeppoly")
    }
    for m, lb in got.items():
        assert lb <= value + TOL, f"{m} lower bound {lb} above the exact minimum {value}"
    assert got["alpha-crown"] >= got["crown"] - 1e-9


@pytest.mark.parametrize(("arch", "seed"), CASES, ids=[f"{a}-{s}" for a, s in CASES])
def test_minimum_is_attained_and_bounds_are_below_it(arch: str, seed: int) -> None:
    _check_minimum_and_bounds(arch, seed)


@pytest.mark.slow
@pytest.mark.parametrize(("arch", "seed"), SLOW_CASES, ids=[f"{a}-{s}" for a, s in SLOW_CASES])
def test_minimum_is_attained_and_bounds_are_below_it_many(arch: str, seed: int) -> None:
    _check_minimum_and_bounds(arch, seed)


@pytest.mark.parametrize("arch", ARCHS)
def test_verify_decides_both_sides_of_the_minimum(arch: str) -> None:
    model, shape = random_net(arch, 7)
    net = Network.from_module(model, shape)
    lo, hi = random_box(shape, 7)
    k = net.output_shape[0]
    c = torch.randn(k, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    value, _ = milp_minimum(net, lo, hi, c)
    # Unsafe set {c.y <= value - 0.01}: empty.
    v = milp_verify(net, (lo, hi), c.reshape(1, -1), torch.tensor([value - 0.01]))
    assert v.status == "verified" and v.lower_bound is not None and v.lower_bound > 0
    assert v.lower_bound == pytest.approx(0.01, abs=1e-6)
    # Unsafe set {c.y <= value + 0.01}: the minimiser is in it; the counterexample re-executes.
    v = milp_verify(net, (lo, hi), c.reshape(1, -1), torch.tensor([value + 0.01]))
    assert v.status == "falsified" and v.counterexample is not None
    with torch.no_grad():
        y = model(v.counterexample.unsqueeze(0))[0]
    assert float(y @ c) <= value + 0.01
    assert bool((v.counterexample >= lo).all()) and bool((v.counterexample <= hi).all())


def test_verify_conjunction_and_region_disjuncts() -> None:
    model, shape = random_net("fc", 3)
    net = Network.from_module(model, shape)
    lo, hi = random_box(shape, 3)
    k = net.output_shape[0]
    e0 = torch.zeros(k, dtype=torch.float64)
    e0[0] = 1
    m0, _ = milp_minimum(net, lo, hi, e0)
    n0, _ = milp_minimum(net, lo, hi, -e0)
    # y_0 <= m0 - 0.1 is impossible; the conjunction with any other row stays impossible.
    a = torch.stack([e0, -e0])
    assert milp_verify(net, (lo, hi), a, torch.tensor([m0 - 0.1, 10.0])).status == "verified"
    # y_0 <= m0 + 0.01 and y_0 >= (max y_0) - 0.01: both rows individually possible, jointly only if the range is
    # narrower than 0.02.
    joint = milp_verify(net, (lo, hi), a, torch.tensor([m0 + 0.01, n0 - 0.01]))
    expected = "falsified" if (-n0) - m0 <= 0.02 else "verified"
    assert joint.status == expected
    # A Region with two disjuncts: verified only when both are.
    region = Region(lo.reshape(-1), hi.reshape(-1), [(e0.reshape(1, -1), torch.tensor([m0 - 0.1]))])
    assert milp_verify(net, region).status == "verified"
    region.unsafe.append((e0.reshape(1, -1), torch.tensor([m0 + 0.1])))
    assert milp_verify(net, region).status == "falsified"


def test_closed_forms() -> None:
    # One affine layer: min of c.(Wx + b) over a box is c.b + sum_j min((c W)_j lo_j, (c W)_j hi_j).
    lin = nn.Linear(4, 2).double()
    net = Network.from_module(lin, (4,))
    lo, hi = -torch.ones(4, dtype=torch.float64), 2 * torch.ones(4, dtype=torch.float64)
    c = torch.tensor([1.0, -2.0], dtype=torch.float64)
    w = c @ lin.weight.detach()
    expected = float(c @ lin.bias.detach() + torch.minimum(w * lo, w * hi).sum())
    assert milp_minimum(net, lo, hi, c)[0] == pytest.approx(expected, abs=1e-9)
    # |x| = relu(x) + relu(-x) on [-1, 2]: maximum 2 (minimise -|x|), minimum 0.
    absnet = nn.Sequential(nn.Linear(1, 2), nn.ReLU(), nn.Linear(2, 1)).double()
    absnet[0].weight.data = torch.tensor([[1.0], [-1.0]], dtype=torch.float64)
    absnet[0].bias.data.zero_()
    absnet[2].weight.data = torch.ones(1, 2, dtype=torch.float64)
    absnet[2].bias.data.zero_()
    n = Network.from_module(absnet, (1,))
    box = (torch.tensor([-1.0]), torch.tensor([2.0]))
    assert milp_minimum(n, *box, torch.tensor([-1.0]))[0] == pytest.approx(-2.0, abs=1e-7)
    assert milp_minimum(n, *box, torch.tensor([1.0]))[0] == pytest.approx(0.0, abs=1e-7)
    # Max pooling of the input itself: min over the box of a window's max is the largest lower end of the window.
    pool = nn.Sequential(nn.MaxPool2d(2), nn.Flatten())
    pnet = Network.from_module(pool, (1, 2, 2))
    plo = torch.tensor([0.0, -1.0, 0.5, -3.0], dtype=torch.float64)
    phi = plo + torch.tensor([1.0, 4.0, 0.2, 1.0], dtype=torch.float64)
    assert milp_minimum(pnet, plo, phi, torch.tensor([1.0]))[0] == pytest.approx(0.5, abs=1e-7)
    assert milp_minimum(pnet, plo, phi, torch.tensor([-1.0]))[0] == pytest.approx(-3.0, abs=1e-7)


def test_lp_refinement_keeps_the_minimum_and_tightens_big_m() -> None:
    for seed in range(3):
        model, shape = random_net("fc", 40 + seed)
        net = Network.from_module(model, shape)
        lo, hi = random_box(shape, 40 + seed)
        c = torch.ones(net.output_shape[0], dtype=torch.float64)
        plain = MilpEncoding(net, lo, hi)
        refined = MilpEncoding(net, lo, hi, lp_refine=True)
        for name, (l0, h0) in plain.pre.items():
            l1, h1 = refined.pre[name]
            assert bool((l1 >= l0 - 1e-9).all()) and bool((h1 <= h0 + 1e-9).all())
        assert refined.num_binaries <= plain.num_binaries
        a = milp_minimum(net, lo, hi, c)[0]
        b = milp_minimum(net, lo, hi, c, lp_refine=True)[0]
        assert a == pytest.approx(b, abs=1e-7)


def test_splits_restrict_the_domain() -> None:
    model, shape = random_net("fc", 5)
    net = Network.from_module(model, shape)
    lo, hi = random_box(shape, 5)
    relu = net.relu_nodes()[0]
    width = net.nodes[net.nodes[relu].inputs[0]].shape[0]
    c = torch.ones(net.output_shape[0], dtype=torch.float64)
    value, _ = milp_minimum(net, lo, hi, c)
    # The minimum over the box is the smaller of the minima over the two halves of any neuron's split.
    for j in range(width):
        halves = []
        for s in (1, -1):
            split = torch.zeros(width, dtype=torch.int64)
            split[j] = s
            v = milp_verify(net, (lo, hi), c.reshape(1, -1), torch.tensor([value + 1e-3]), splits={relu: split})
            halves.append(v.status)
        assert "falsified" in halves
        assert all(h in ("falsified", "verified") for h in halves)


def test_refuses_non_piecewise_linear_and_bad_input() -> None:
    sig = Network.from_module(nn.Sequential(nn.Linear(2, 2), nn.Sigmoid(), nn.Linear(2, 1)), (2,))
    with pytest.raises(InputError, match="not piecewise linear"):
        milp_minimum(sig, torch.zeros(2), torch.ones(2), torch.ones(1))
    net = Network.from_module(nn.Sequential(nn.Linear(2, 2), nn.ReLU()), (2,))
    with pytest.raises(InputError, match="values"):
        milp_minimum(net, torch.zeros(3), torch.ones(3), torch.ones(2))
    with pytest.raises(InputError, match="lower > upper"):
        milp_minimum(net, torch.ones(2), torch.zeros(2), torch.ones(2))
    with pytest.raises(InputError, match="NaN"):
        milp_minimum(net, torch.tensor([0.0, math.nan]), torch.ones(2), torch.ones(2))
    with pytest.raises(InputError, match="c must have"):
        milp_minimum(net, torch.zeros(2), torch.ones(2), torch.ones(5))
    with pytest.raises(InputError, match="A must be"):
        milp_verify(net, (torch.zeros(2), torch.ones(2)), torch.ones(1, 3), torch.zeros(1))
    with pytest.raises(InputError, match="input shape is unknown"):
        as_network(nn.Linear(2, 2))
