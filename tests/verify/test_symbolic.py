"""ReluVal symbolic interval propagation: soundness on random networks, exactness on affine ones, tighter than IBP."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

from bastion.errors import InputError
from bastion.verify.bounds import compute_bounds
from bastion.verify.ir import Network
from bastion.verify.symbolic import InputSet, linear_part, symbolic_bounds

from .nets import (
    affine_case,
    assert_contains,
    check_sound_on_random_network,
    count_tighter_than_ibp,
    random_conv,
    random_fc,
    spec_values,
)


def damped_fc(seed: int, kind: str) -> tuple[nn.Module, tuple[int, ...]]:
    """Random fully connected networks whose residual blocks subtract (a Sub node in the IR)."""
    return random_fc(seed, kind, damped_residual=True)


@pytest.mark.parametrize("kind", ["relu", "leaky", "sigmoid", "tanh"])
@pytest.mark.parametrize("builder", [damped_fc, random_conv], ids=["fc", "conv"])
def test_sound_on_random_networks(builder, kind: str) -> None:
    for seed in range(30 if builder is damped_fc else 12):
        model, shape = builder(seed, kind)
        g = torch.Generator().manual_seed(100 + seed)
        check_sound_on_random_network(symbolic_bounds, model, shape, g, f"symbolic, {kind} seed {seed}")


def _ball_samples(x: Tensor, eps: Tensor, lo: Tensor, hi: Tensor, count: int, g: torch.Generator) -> Tensor:
    """Points of the l2 ball ∩ box: directions scaled to the sphere and inside, clipped to the box."""
    n, d = x.shape
    dirs = torch.randn(n, count, d, generator=g, dtype=x.dtype)
    dirs = dirs / dirs.norm(dim=-1, keepdim=True)
    r = torch.rand(n, count, 1, generator=g, dtype=x.dtype).sqrt()
    r[:, : count // 2] = 1.0  # half on the sphere
    pts = x.unsqueeze(1) + dirs * r * eps.reshape(n, 1, 1)
    return torch.minimum(torch.maximum(pts, lo.unsqueeze(1)), hi.unsqueeze(1))  # moves towards x: stays in the ball


def test_sound_on_l2_ball() -> None:
    narrower = 0
    for seed in range(20):
        model, shape = damped_fc(seed, "relu")
        net = Network.from_module(model, shape)
        g = torch.Generator().manual_seed(seed)
        x = torch.rand(4, *shape, generator=g, dtype=torch.float64)
        eps = torch.rand(4, generator=g, dtype=torch.float64) * 0.8
        lo, hi = (x - eps[:, None]).clamp(0, 1), (x + eps[:, None]).clamp(0, 1)
        region = InputSet(lo, hi, center=x, eps=eps, norm="l2")
        C = torch.randn(4, 3, 3, generator=g, dtype=torch.float64)
        blo, bhi, _ = symbolic_bounds(net, lo, hi, C)
        slo, shi, _ = symbolic_bounds(net, lo, hi, C, region=region)
        assert_contains(slo, shi, spec_values(net, _ball_samples(x, eps, lo, hi, 2000, g), C), f"l2 seed {seed}")
        # not a per-bound theorem (the ReLU rule may keep an equation the box alone would concretise), but the
        # ball cuts most of the box's volume in higher dimensions, so the bounds are narrower on the whole
        narrower += int(float((shi - slo).sum()) < float((bhi - blo).sum()))
    assert narrower >= 15, f"box ∩ l2 ball gave narrower bounds than the box on only {narrower} of 20 networks"


def test_exact_on_affine_networks() -> None:
    g = torch.Generator().manual_seed(0)
    for _ in range(10):
        net, lo, hi, C, exact_lo, exact_hi = affine_case(g)
        slo, shi, _ = symbolic_bounds(net, lo, hi, C)
        torch.testing.assert_close(slo, exact_lo, atol=1e-10, rtol=1e-10)
        torch.testing.assert_close(shi, exact_hi, atol=1e-10, rtol=1e-10)
        ibp = compute_bounds(net, lo, hi, C=C, method="ibp")
        assert bool((ibp.upper - ibp.lower > shi - slo + 1e-6).any()), "IBP should be loose on 3 stacked layers"


class _Cancel(nn.Module):
    """``x - x`` through a linear layer: symbolic equations cancel exactly, intervals do not."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(2, 2)

    def forward(self, x: Tensor) -> Tensor:
        h = self.fc(x)
        return h - h


def test_dependency_tracking_cancels() -> None:
    model = _Cancel().double().eval()
    net = Network.from_module(model, (2,))
    lo = torch.tensor([[-1.0, -2.0]], dtype=torch.float64)
    hi = torch.tensor([[1.0, 3.0]], dtype=torch.float64)
    C = torch.eye(2, dtype=torch.float64).unsqueeze(0)
    slo, shi, _ = symbolic_bounds(net, lo, hi, C)
    torch.testing.assert_close(slo, torch.zeros(1, 2, dtype=torch.float64))
    torch.testing.assert_close(shi, torch.zeros(1, 2, dtype=torch.float64))
    ibp = compute_bounds(net, lo, hi, C=C, method="ibp")
    assert bool((ibp.upper - ibp.lower > 0.1).all())


def test_relu_rule_by_hand() -> None:
    # out = 0.5 - relu(x1 + x2) on [-1, 1]^2: z = x1 + x2 in [-2, 2] is unstable.
    model = nn.Sequential(nn.Linear(2, 1), nn.ReLU(), nn.Linear(1, 1)).double().eval()
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([[1.0, 1.0]]))
        model[0].bias.zero_()
        model[2].weight.copy_(torch.tensor([[-1.0]]))
        model[2].bias.copy_(torch.tensor([0.5]))
    net = Network.from_module(model, (2,))
    lo = torch.tensor([[-1.0, -1.0]], dtype=torch.float64)
    hi = torch.tensor([[1.0, 1.0]], dtype=torch.float64)
    C = torch.eye(1, dtype=torch.float64).unsqueeze(0)
    slo, shi, pre = symbolic_bounds(net, lo, hi, C)
    # relu(z) with z in [-2, 2]: lower eq 0, upper eq concretised to 2 -> out = 0.5 - relu(z) in [-1.5, 0.5].
    torch.testing.assert_close(slo, torch.tensor([[-1.5]], dtype=torch.float64))
    torch.testing.assert_close(shi, torch.tensor([[0.5]], dtype=torch.float64))
    (plo, phi) = next(iter(pre.values()))
    torch.testing.assert_close(plo, torch.tensor([[-2.0]], dtype=torch.float64))
    torch.testing.assert_close(phi, torch.tensor([[2.0]], dtype=torch.float64))


def test_at_least_as_tight_as_ibp_on_relu_fc() -> None:
    # ReluVal's theorem: by induction every concretised equation stays inside the IBP interval (affine: the
    # min of a sum is >= the sum of mins; ReLU: the rule only replaces equations by 0 or by the upper bound).
    strictly = count_tighter_than_ibp(symbolic_bounds, damped_fc, range(40))
    assert strictly >= 30, f"symbolic intervals were strictly tighter than IBP on only {strictly} of 40 networks"


def test_linear_part_and_bad_inputs() -> None:
    model = nn.Sequential(nn.Linear(3, 2)).double().eval()
    net = Network.from_module(model, (3,))
    op = next(n.op for n in net.nodes.values() if n.op.linear)
    lin = linear_part(op)
    assert lin is not None and lin is not op
    x = torch.randn(4, 3, dtype=torch.float64)
    torch.testing.assert_close(lin.forward(x), x @ model[0].weight.T)
    torch.testing.assert_close(op.forward(x), model(x))  # the original keeps its bias
    lo = torch.zeros(2, 3, dtype=torch.float64)
    with pytest.raises(InputError, match="box"):
        symbolic_bounds(net, torch.zeros(2, 4, dtype=torch.float64), torch.zeros(2, 4, dtype=torch.float64), None)  # type: ignore[arg-type]
    with pytest.raises(InputError, match="C must be"):
        symbolic_bounds(net, lo, lo, torch.zeros(3, 2, dtype=torch.float64))
    with pytest.raises(InputError, match="norm"):
        InputSet(lo, lo, center=lo, eps=torch.ones(2, dtype=torch.float64), norm="linf")
