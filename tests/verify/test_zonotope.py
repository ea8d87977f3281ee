"""DeepZ zonotopes: soundness on random networks, exactness on affine ones, the DeepZ transformers by hand."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

from bastion.errors import InputError
from bastion.verify.bounds import compute_bounds
from bastion.verify.ir import Network
from bastion.verify.symbolic import InputSet
from bastion.verify.zonotope import zonotope_bounds

from .nets import (
    affine_case,
    assert_contains,
    check_sound_on_random_network,
    count_tighter_than_ibp,
    random_conv,
    random_fc,
    randomise,
    spec_values,
)


@pytest.mark.parametrize("kind", ["relu", "leaky", "sigmoid", "tanh"])
@pytest.mark.parametrize("builder", [random_fc, random_conv], ids=["fc", "conv"])
def test_sound_on_random_networks(builder, kind: str) -> None:
    for seed in range(30 if builder is random_fc else 12):
        model, shape = builder(seed, kind)
        g = torch.Generator().manual_seed(200 + seed)
        check_sound_on_random_network(zonotope_bounds, model, shape, g, f"deepz, {kind} seed {seed}")


@pytest.mark.parametrize("norm", ["l2", "l1"])
def test_sound_on_lp_balls(norm: str) -> None:
    for seed in range(15):
        model, shape = random_fc(seed, "relu" if seed % 2 else "tanh")
        net = Network.from_module(model, shape)
        g = torch.Generator().manual_seed(seed)
        n, d = 3, shape[0]
        x = torch.rand(n, d, generator=g, dtype=torch.float64)
        eps = torch.rand(n, generator=g, dtype=torch.float64) * 0.8
        lo, hi = (x - eps[:, None]).clamp(0, 1), (x + eps[:, None]).clamp(0, 1)
        # points on / inside the ball, clipped to the box (clipping moves towards x: they stay in the ball)
        if norm == "l2":
            dirs = torch.randn(n, 3000, d, generator=g, dtype=torch.float64)
            dirs = dirs / dirs.norm(dim=-1, keepdim=True)
        else:
            vertex = torch.nn.functional.one_hot(torch.randint(0, d, (n, 3000), generator=g), d).to(torch.float64)
            dirs = vertex * (torch.randint(0, 2, (n, 3000, 1), generator=g) * 2 - 1)
        r = torch.rand(n, 3000, 1, generator=g, dtype=torch.float64)
        r[:, :1500] = 1.0
        pts = torch.minimum(torch.maximum(x.unsqueeze(1) + dirs * r * eps.reshape(n, 1, 1), lo[:, None]), hi[:, None])
        C = torch.randn(n, 3, 3, generator=g, dtype=torch.float64)
        region = InputSet(lo, hi, center=x, eps=eps, norm=norm)
        zlo, zhi, _ = zonotope_bounds(net, lo, hi, C, region=region)
        assert_contains(zlo, zhi, spec_values(net, pts, C), f"deepz {norm} seed {seed}")


def test_exact_on_affine_networks() -> None:
    g = torch.Generator().manual_seed(1)
    for _ in range(10):
        net, lo, hi, C, exact_lo, exact_hi = affine_case(g)
        zlo, zhi, _ = zonotope_bounds(net, lo, hi, C)
        torch.testing.assert_close(zlo, exact_lo, atol=1e-10, rtol=1e-10)
        torch.testing.assert_close(zhi, exact_hi, atol=1e-10, rtol=1e-10)


class _ReluMinusLinear(nn.Module):
    """``relu(z) - 0.75 z`` with ``z = x``: DeepZ's parallelogram is exact here, intervals are not."""

    def __init__(self, activation: nn.Module, slope: float) -> None:
        super().__init__()
        self.fc = nn.Linear(1, 1)
        self.act = activation
        self.slope = slope

    def forward(self, x: Tensor) -> Tensor:
        z = self.fc(x)
        return self.act(z) - self.slope * z


def _one_dim(model: nn.Module, lo: float, hi: float) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    with torch.no_grad():
        model.fc.weight.fill_(1.0)
        model.fc.bias.zero_()
    model = model.double().eval()
    net = Network.from_module(model, (1,))
    lo_t = torch.tensor([[lo]], dtype=torch.float64)
    hi_t = torch.tensor([[hi]], dtype=torch.float64)
    C = torch.eye(1, dtype=torch.float64).unsqueeze(0)
    zlo, zhi, _ = zonotope_bounds(net, lo_t, hi_t, C)
    ibp = compute_bounds(net, lo_t, hi_t, C=C, method="ibp")
    return zlo, zhi, ibp.lower, ibp.upper


def test_deepz_relu_transformer_by_hand() -> None:
    # z in [-1, 3]: lambda = 3/4, mu = beta = 3/8, so relu(z) - 0.75 z = 3/8 + 3/8 nu in [0, 0.75], the exact range.
    zlo, zhi, ilo, ihi = _one_dim(_ReluMinusLinear(nn.ReLU(), 0.75), -1.0, 3.0)
    torch.testing.assert_close(zlo, torch.tensor([[0.0]], dtype=torch.float64))
    torch.testing.assert_close(zhi, torch.tensor([[0.75]], dtype=torch.float64))
    torch.testing.assert_close(ilo, torch.tensor([[-2.25]], dtype=torch.float64))
    torch.testing.assert_close(ihi, torch.tensor([[3.75]], dtype=torch.float64))


def test_deepz_sigmoid_transformer_by_hand() -> None:
    # z in [0, 2]: lambda = min(s'(0), s'(2)) = s'(2); sigmoid(z) - lambda z is non-decreasing, so its range is
    # [s(0), s(2) - 2 lambda], which DeepZ reproduces exactly.
    s2 = torch.sigmoid(torch.tensor(2.0, dtype=torch.float64))
    lam = float(s2 * (1 - s2))
    zlo, zhi, _, _ = _one_dim(_ReluMinusLinear(nn.Sigmoid(), lam), 0.0, 2.0)
    torch.testing.assert_close(zlo, torch.tensor([[0.5]], dtype=torch.float64))
    torch.testing.assert_close(zhi, (s2 - 2 * lam).reshape(1, 1))


class _SelfDifference(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(3, 4)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.relu(self.fc(x))
        return h - h


def test_shared_error_symbols_cancel() -> None:
    g = torch.Generator().manual_seed(0)
    model = randomise(_SelfDifference(), g)
    net = Network.from_module(model, (3,))
    lo, hi = -torch.ones(2, 3, dtype=torch.float64), torch.ones(2, 3, dtype=torch.float64)
    C = torch.eye(4, dtype=torch.float64).expand(2, 4, 4)
    zlo, zhi, _ = zonotope_bounds(net, lo, hi, C)
    torch.testing.assert_close(zlo, torch.zeros(2, 4, dtype=torch.float64))
    torch.testing.assert_close(zhi, torch.zeros(2, 4, dtype=torch.float64))


def test_tighter_than_ibp_on_relu_fc() -> None:
    strictly = count_tighter_than_ibp(zonotope_bounds, random_fc, range(30))
    assert strictly >= 25, f"DeepZ was strictly tighter than IBP on only {strictly} of 30 networks"


def test_bad_inputs() -> None:
    net = Network.from_module(nn.Sequential(nn.Linear(3, 2)).double().eval(), (3,))
    lo = torch.zeros(2, 3, dtype=torch.float64)
    with pytest.raises(InputError, match="box"):
        zonotope_bounds(net, torch.zeros(2, 4, dtype=torch.float64), torch.zeros(2, 4, dtype=torch.float64), None)  # type: ignore[arg-type]
    with pytest.raises(InputError, match="C must be"):
        zonotope_bounds(net, lo, lo, torch.zeros(2, 2, dtype=torch.float64))
