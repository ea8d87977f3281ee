"""Random networks, boxes and sampled outputs shared by the soundness tests of the bound methods.

Soundness is checked by sampling: every output of the network at points of the input box (uniform points, random
vertices, and every vertex of small boxes) must lie within the computed bounds. The builders are seeded, so each
test sees the same networks in every run.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable

import torch
from torch import Tensor, nn

from bastion.verify.bounds import compute_bounds
from bastion.verify.ir import Network

#: ``bounds(net, lower, upper, C) -> (lower (N, m), upper (N, m), pre-activation bounds per nonlinear node)``.
ForwardBounds = Callable[[Network, Tensor, Tensor, Tensor], tuple[Tensor, Tensor, dict[str, tuple[Tensor, Tensor]]]]


def act(kind: str, g: torch.Generator) -> nn.Module:
    """An activation: ``relu``, ``leaky`` (a random slope in [-0.5, 1], so non-monotone too), ``sigmoid``, ``tanh``."""
    if kind == "relu":
        return nn.ReLU()
    if kind == "leaky":
        return nn.LeakyReLU(float(torch.rand(1, generator=g)) * 1.5 - 0.5)
    return nn.Sigmoid() if kind == "sigmoid" else nn.Tanh()


def randomise(model: nn.Module, g: torch.Generator) -> nn.Module:
    """Random weights, biases and batch-norm statistics; the model in float64 and eval mode."""
    for m in model.modules():
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            m.weight.data.copy_(torch.randn(m.weight.shape, generator=g) * 0.8)
            if m.bias is not None:
                m.bias.data.copy_(torch.randn(m.bias.shape, generator=g) * 0.5)
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            assert m.running_mean is not None and m.running_var is not None
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.3)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
    return model.double().eval()


class Residual(nn.Module):
    """``inner(x) + x``, or with ``damped`` ``inner(x) - x / 2`` (a Sub and a scalar Mul node in the IR)."""

    def __init__(self, width: int, activation: nn.Module, *, damped: bool = False) -> None:
        super().__init__()
        self.inner = nn.Sequential(nn.Linear(width, width), activation, nn.Linear(width, width))
        self.damped = damped

    def forward(self, x: Tensor) -> Tensor:
        return self.inner(x) - 0.5 * x if self.damped else self.inner(x) + x


def random_fc(
    seed: int, kind: str, *, foldable_bn: bool = False, damped_residual: bool = False
) -> tuple[nn.Module, tuple[int, ...]]:
    """A random fully connected network of 1 to 3 hidden layers with 3 outputs, and its input shape.

    Every third seed has a batch norm in the first layer: right after the linear layer with ``foldable_bn`` (the
    IR folds it away), else after an activation (kept as its own node). Every second seed ends with a residual
    block.
    """
    g = torch.Generator().manual_seed(seed)
    d = int(torch.randint(2, 6, (1,), generator=g))
    layers: list[nn.Module] = []
    width = d
    for i in range(int(torch.randint(1, 4, (1,), generator=g))):
        w = int(torch.randint(3, 9, (1,), generator=g))
        layers.append(nn.Linear(width, w))
        if seed % 3 == 0 and i == 0:
            layers += [nn.BatchNorm1d(w)] if foldable_bn else [act(kind, g), nn.BatchNorm1d(w)]
        layers.append(act(kind, g))
        width = w
    if seed % 2 == 0:
        layers += [Residual(width, act(kind, g), damped=damped_residual), act(kind, g)]
    layers.append(nn.Linear(width, 3))
    return randomise(nn.Sequential(*layers), g), (d,)


def random_conv(seed: int, kind: str) -> tuple[nn.Module, tuple[int, ...]]:
    """A random convolution, activation, optional max or average pooling and a linear layer of 4 outputs."""
    g = torch.Generator().manual_seed(seed)
    c, hw = 1 + seed % 2, 4 + seed % 3
    layers: list[nn.Module] = [nn.Conv2d(c, 3, 3, stride=1 + seed % 2, padding=seed % 2), act(kind, g)]
    if seed % 3 == 1:
        layers.append(nn.MaxPool2d(2, stride=1))
    elif seed % 3 == 2:
        layers.append(nn.AvgPool2d(2, stride=1))
    layers.append(nn.Flatten())
    model = nn.Sequential(*layers)
    with torch.no_grad():
        flat = model.double()(torch.zeros(1, c, hw, hw, dtype=torch.float64)).shape[1]
    model.append(nn.Linear(flat, 4))
    return randomise(model, g), (c, hw, hw)


def random_box(
    shape: tuple[int, ...], n: int, g: torch.Generator, *, zero_width_dims: bool = False
) -> tuple[Tensor, Tensor]:
    """``n`` random boxes; the first has zero width (bounds must be exact there), and with ``zero_width_dims``
    about a fifth of the other dimensions too."""
    centre = torch.randn(n, *shape, generator=g, dtype=torch.float64)
    radius = torch.rand(n, *shape, generator=g, dtype=torch.float64) * float(torch.rand(1, generator=g)) * 1.5
    radius[0] = 0.0
    if zero_width_dims:
        radius = radius * (torch.rand(n, *shape, generator=g, dtype=torch.float64) > 0.2)
    return centre - radius, centre + radius


def box_samples(lo: Tensor, hi: Tensor, count: int, g: torch.Generator) -> Tensor:
    """(N, S, *shape): uniform points, random vertices, and every vertex for inputs of up to 8 features."""
    n, shape = lo.shape[0], lo.shape[1:]
    pts = [
        torch.rand(n, count, *shape, generator=g, dtype=lo.dtype),
        (torch.rand(n, count, *shape, generator=g, dtype=lo.dtype) > 0.5).to(lo.dtype),
    ]
    if lo[0].numel() <= 8:
        corners = torch.tensor(list(itertools.product([0.0, 1.0], repeat=lo[0].numel())), dtype=lo.dtype)
        pts.append(corners.reshape(1, -1, *shape).expand(n, -1, *shape))
    return lo.unsqueeze(1) + torch.cat(pts, 1) * (hi - lo).unsqueeze(1)


def spec_values(net: Network, x: Tensor, C: Tensor) -> Tensor:
    """``C @ net(x)`` at the points ``x`` (N, S, *shape): (N, S, m)."""
    n, s = x.shape[:2]
    y = net(x.reshape(n * s, *x.shape[2:])).reshape(n, s, -1)
    return torch.einsum("nmk,nsk->nsm", C, y)


def assert_contains(lo: Tensor, hi: Tensor, vals: Tensor, what: str, *, tol: float = 1e-9) -> None:
    """Every sampled value ``vals`` (N, S, m) lies in ``[lo, hi]`` (N, m), up to a relative rounding ``tol``."""
    scale = 1 + vals.abs()
    assert bool((vals >= lo.unsqueeze(1) - tol * scale).all()), f"{what}: a lower bound is above a sampled output"
    assert bool((vals <= hi.unsqueeze(1) + tol * scale).all()), f"{what}: an upper bound is below a sampled output"


def check_sound_on_random_network(
    bounds: ForwardBounds, model: nn.Module, shape: tuple[int, ...], g: torch.Generator, what: str
) -> None:
    """Bounds of ``C @ f`` and every pre-activation bound contain the sampled values; exact on the zero-width box."""
    net = Network.from_module(model, shape)
    lo, hi = random_box(shape, 3, g)
    C = torch.randn(3, 2, net.output_shape[0], generator=g, dtype=torch.float64)
    blo, bhi, pre = bounds(net, lo, hi, C)
    xs = box_samples(lo, hi, 500, g)
    assert_contains(blo, bhi, spec_values(net, xs, C), f"{what}\n{net}")
    torch.testing.assert_close(blo[0], bhi[0], atol=1e-8, rtol=1e-8)  # the zero-width box
    values = net.forward_all(xs.reshape(-1, *shape))
    for name, (plo, phi) in pre.items():
        v = values[net.nodes[name].inputs[0]].reshape(3, -1, *plo.shape[1:])
        assert_contains(plo.flatten(1), phi.flatten(1), v.flatten(2), f"pre-activation {name}, {what}")


def affine_case(g: torch.Generator) -> tuple[Network, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Three stacked random linear layers, boxes and a spec, with the exact bounds of ``C @ f`` over the boxes.

    Returns:
        ``(net, lo, hi, C, exact lower, exact upper)``: the composed map ``W x + b`` has the range
        ``C W mid + C b -+ |C W| rad`` on a box of centre ``mid`` and radius ``rad``.
    """
    model = randomise(nn.Sequential(nn.Linear(4, 7), nn.Linear(7, 5), nn.Linear(5, 3)), g)
    W = model[2].weight @ model[1].weight @ model[0].weight
    b = model[2].weight @ (model[1].weight @ model[0].bias + model[1].bias) + model[2].bias
    net = Network.from_module(model, (4,))
    lo, hi = random_box((4,), 5, g)
    C = torch.randn(5, 2, 3, generator=g, dtype=torch.float64)
    CW = C @ W
    mid, rad = (lo + hi) / 2, (hi - lo) / 2
    centre = (CW @ mid.unsqueeze(-1)).squeeze(-1) + C @ b
    spread = (CW.abs() @ rad.unsqueeze(-1)).squeeze(-1)
    return net, lo, hi, C, (centre - spread).detach(), (centre + spread).detach()


def count_tighter_than_ibp(
    bounds: ForwardBounds, builder: Callable[[int, str], tuple[nn.Module, tuple[int, ...]]], seeds: range
) -> int:
    """On ReLU networks of ``builder``: asserts the bounds never leave IBP's, and counts the networks where some
    bound is strictly tighter (by more than 1e-6)."""
    strictly = 0
    for seed in seeds:
        model, shape = builder(seed, "relu")
        net = Network.from_module(model, shape)
        g = torch.Generator().manual_seed(seed)
        lo, hi = random_box(shape, 4, g)
        C = torch.randn(4, 3, 3, generator=g, dtype=torch.float64)
        blo, bhi, _ = bounds(net, lo, hi, C)
        ibp = compute_bounds(net, lo, hi, C=C, method="ibp")
        assert bool((blo >= ibp.lower - 1e-9).all()) and bool((bhi <= ibp.upper + 1e-9).all()), f"seed {seed}"
        strictly += int(bool((bhi - blo < ibp.upper - ibp.lower - 1e-6).any()))
    return strictly
