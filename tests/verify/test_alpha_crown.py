"""alpha-CROWN on sigmoid and tanh networks: sound tangent-point relaxations, optimised, and never looser than CROWN."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

from bastion.verify.bounds import BoundOptions, BoundResult, compute_bounds
from bastion.verify.ir import Network
from bastion.verify.ops import SigmoidOp, TanhOp

from .nets import assert_contains, box_samples, randomise, spec_values

STEPS = BoundOptions(alpha_steps=20)
JOINT = BoundOptions(alpha_steps=10, alpha_intermediate=True)


def _act(kind: str, i: int) -> nn.Module:
    if kind == "mixed":  # ReLU and sigmoid layers alternate
        return nn.ReLU() if i % 2 == 0 else nn.Sigmoid()
    return nn.Sigmoid() if kind == "sigmoid" else nn.Tanh()


def _mlp(seed: int, kind: str) -> tuple[nn.Module, tuple[int, ...]]:
    """2 or 3 hidden layers of 8 to 20 units on 4 inputs, 3 outputs."""
    g = torch.Generator().manual_seed(seed)
    layers: list[nn.Module] = []
    width = 4
    for i in range(2 + seed % 2):
        w = int(torch.randint(8, 21, (1,), generator=g))
        layers += [nn.Linear(width, w), _act(kind, i)]
        width = w
    layers.append(nn.Linear(width, 3))
    return randomise(nn.Sequential(*layers), g), (4,)


def _conv(seed: int, kind: str) -> tuple[nn.Module, tuple[int, ...]]:
    """Two convolutions with activations and a linear layer on a 1 x 6 x 6 input."""
    g = torch.Generator().manual_seed(seed)
    model = nn.Sequential(
        nn.Conv2d(1, 3, 3),
        _act(kind, 0),
        nn.Conv2d(3, 4, 3, stride=2, padding=1),
        _act(kind, 1),
        nn.Flatten(),
        nn.Linear(4 * 2 * 2, 3),
    )
    return randomise(model, g), (1, 6, 6)


def _case(builder, seed: int, kind: str, radius: float) -> tuple[Network, nn.Module, Tensor, Tensor, Tensor]:
    model, shape = builder(seed, kind)
    net = Network.from_module(model, shape)
    g = torch.Generator().manual_seed(500 + seed)
    centre = torch.randn(3, *shape, generator=g, dtype=torch.float64)
    rad = radius * torch.rand(3, *shape, generator=g, dtype=torch.float64)
    C = torch.randn(3, 2, 3, generator=g, dtype=torch.float64)
    return net, model, centre - rad, centre + rad, C


def _pgd_extremes(net: Network, lo: Tensor, hi: Tensor, C: Tensor, steps: int = 25) -> Tensor:
    """Values ``C @ net(x)`` ``(N, 2m, m)`` at projected sign-gradient maximisers and minimisers of each spec row."""
    n, m = C.shape[:2]
    shape = lo.shape[1:]
    g = torch.Generator().manual_seed(1)
    lo_r, hi_r = lo.unsqueeze(1), hi.unsqueeze(1)
    x = lo_r + torch.rand(n, 2 * m, *shape, generator=g, dtype=lo.dtype) * (hi_r - lo_r)
    # Row r < m maximises spec row r, row m + r minimises it.
    sign = torch.cat([torch.eye(m), -torch.eye(m)]).to(lo.dtype)  # (2m, m)
    step = (hi_r - lo_r) / 4
    for _ in range(steps):
        x = x.detach().requires_grad_(True)
        vals = spec_values(net, x, C)  # (N, 2m, m)
        (grad,) = torch.autograd.grad((vals * sign).sum(), x)
        x = torch.minimum(torch.maximum(x + step * grad.sign(), lo_r), hi_r)
        step = step * 0.85
    with torch.no_grad():
        return spec_values(net, x, C)


def _assert_sound(res: BoundResult, net: Network, lo: Tensor, hi: Tensor, C: Tensor, what: str) -> None:
    g = torch.Generator().manual_seed(2)
    vals = torch.cat([spec_values(net, box_samples(lo, hi, 300, g), C), _pgd_extremes(net, lo, hi, C)], 1)
    assert_contains(res.lower, res.upper, vals, what, tol=1e-9)


@pytest.mark.parametrize("op", [SigmoidOp(), TanhOp()], ids=repr)
def test_tangent_relaxation_sound_for_every_parameter(op) -> None:
    g = torch.Generator().manual_seed(0)
    n = 3000
    centre = torch.randn(n, generator=g, dtype=torch.float64) * 4
    radius = torch.rand(n, generator=g, dtype=torch.float64) ** 2 * 6
    radius[:20] = 0.0
    radius[20:40] = 1e-9
    lo, hi = centre - radius, centre + radius
    lo[40:400], hi[40:400] = -3 * torch.rand(360, generator=g).double(), 3 * torch.rand(360, generator=g).double()
    lo[400:410], hi[400:410] = -30.0, 40.0
    lo[410:420], hi[410:420] = 0.0, 5.0  # touching the inflection point
    lo[420:430], hi[420:430] = -5.0, 0.0
    init = op.alpha_init(lo, hi)
    assert init.shape == (n, 2)
    # Random parameters in the valid range plus both extremes, as four specification rows.
    a_min, a_max = op.alpha_bounds()
    t = a_min + (a_max - a_min) * torch.rand(n, 4, 2, generator=g, dtype=torch.float64)
    t[:, 0], t[:, 1] = a_min, a_max
    t[:, 2, 0], t[:, 2, 1] = a_min, a_max
    lw, lb, uw, ub = op.relax(lo, hi, t)
    assert lw.shape == uw.shape == (n, 4)
    s = torch.linspace(0, 1, 401, dtype=torch.float64)
    x = lo.view(n, 1, 1) + s.view(1, 1, -1) * (hi - lo).view(n, 1, 1)  # (n, 1, 401)
    fx = op.fn(x)
    scale = 1e-12 * (1 + x.abs())
    assert bool((lw.unsqueeze(-1) * x + lb.unsqueeze(-1) <= fx + scale).all()), f"{op!r} lower line above f"
    assert bool((uw.unsqueeze(-1) * x + ub.unsqueeze(-1) >= fx - scale).all()), f"{op!r} upper line below f"
    # CROWN's parameters give CROWN's lines; DeepPoly ignores them.
    lw0, lb0, uw0, ub0 = op.relax(lo, hi)
    lw1, lb1, uw1, ub1 = op.relax(lo, hi, init.unsqueeze(1))
    for got, want in zip((lw1, lb1, uw1, ub1), (lw0, lb0, uw0, ub0)):
        torch.testing.assert_close(got[:, 0], want, atol=1e-12, rtol=1e-10)
    for got, want in zip(op.relax(lo, hi, t, mode="deeppoly"), op.relax(lo, hi, mode="deeppoly")):
        assert torch.equal(got, want)


@pytest.mark.parametrize("kind", ["sigmoid", "tanh"])
def test_alpha_crown_tightens_sshaped_networks(kind: str) -> None:
    gains, widths = [], []
    for builder, seed in [(_mlp, 0), (_mlp, 1), (_mlp, 2), (_conv, 3)]:
        net, _, lo, hi, C = _case(builder, seed, kind, 0.4)
        crown = compute_bounds(net, lo, hi, C=C, method="crown")
        alpha = compute_bounds(net, lo, hi, C=C, method="alpha-crown", options=STEPS)
        assert bool((alpha.lower >= crown.lower - 1e-10).all()) and bool((alpha.upper <= crown.upper + 1e-10).all())
        gains.append(float((alpha.lower - crown.lower).mean() + (crown.upper - alpha.upper).mean()) / 2)
        widths.append(float((crown.upper - crown.lower).mean()))
    # Today's CROWN relaxation is the starting point: a real optimisation tightens every network by a margin.
    assert min(g / w for g, w in zip(gains, widths)) > 0.01, (gains, widths)


@pytest.mark.parametrize("kind", ["sigmoid", "tanh", "mixed"])
def test_alpha_crown_sound_on_sshaped_networks(kind: str) -> None:
    for builder, seed in [(_mlp, 10), (_mlp, 11), (_mlp, 12), (_conv, 13)]:
        net, _, lo, hi, C = _case(builder, seed, kind, 0.6)
        crown = compute_bounds(net, lo, hi, C=C, method="crown")
        for opts in (STEPS, JOINT):
            res = compute_bounds(net, lo, hi, C=C, method="alpha-crown", options=opts)
            what = f"alpha-crown {opts.alpha_intermediate=} on {kind} seed {seed}"
            _assert_sound(res, net, lo, hi, C, what)
            assert bool((res.lower >= crown.lower - 1e-10).all()) and bool((res.upper <= crown.upper + 1e-10).all())
            # The intermediate bounds (optimised with JOINT) still contain every sampled pre-activation.
            x = box_samples(lo, hi, 200, torch.Generator().manual_seed(3))
            values = net.forward_all(x.reshape(-1, *lo.shape[1:]))
            for name, (plo, phi) in res.intermediate.items():
                v = values[net.nodes[name].inputs[0]].reshape(3, x.shape[1], -1)
                assert_contains(plo.flatten(1), phi.flatten(1), v, f"pre-activation {name}, {what}")
                clo, chi = crown.intermediate[name]
                assert bool((plo >= clo - 1e-10).all()) and bool((phi <= chi + 1e-10).all())


def test_alpha_intermediate_tightens_sshaped_networks() -> None:
    gain = 0.0
    for kind, seed in [("tanh", 20), ("sigmoid", 21), ("tanh", 23)]:
        net, _, lo, hi, C = _case(_mlp, seed, kind, 0.5)
        plain = compute_bounds(net, lo, hi, C=C, method="alpha-crown", options=BoundOptions(alpha_steps=10))
        joint = compute_bounds(net, lo, hi, C=C, method="alpha-crown", options=JOINT)
        gain += float((plain.upper - plain.lower).sum() - (joint.upper - joint.lower).sum())
    assert gain > 0, "optimising the tangent points behind the intermediate bounds should tighten overall"
