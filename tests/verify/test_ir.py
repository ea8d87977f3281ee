"""The verification IR: Network.forward must reproduce the model for every accepted fx form; refusals name the op."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bastion.errors import InputError
from bastion.models import zoo
from bastion.models.normalize import Normalize
from bastion.verify.ir import Network
from bastion.verify.ops import BoundOp, ChannelAffineOp, Conv2dOp, LinearOp, ReLUOp, register_op


def _randomise_bn(model: nn.Module) -> nn.Module:
    """Give BatchNorm layers non-trivial running statistics and affine parameters (eval mode)."""
    g = torch.Generator().manual_seed(0)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            assert m.running_mean is not None and m.running_var is not None
            m.running_mean.copy_(torch.rand(m.num_features, generator=g) * 2 - 1)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            if m.weight is not None:
                m.weight.data.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.bias.data.copy_(torch.rand(m.num_features, generator=g) - 0.5)
    return model.eval()


def _check_same(model: nn.Module, shape: tuple[int, ...], n: int = 7) -> Network:
    torch.manual_seed(1)
    model = _randomise_bn(model)
    net = Network.from_module(model, shape)
    x = torch.randn(n, *shape)
    with torch.no_grad():
        expected = model(x)
    got = net.forward(x)
    assert got.shape == expected.shape
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    return net


@pytest.mark.parametrize(
    ("factory", "shape"),
    [
        (lambda: zoo.mlp([1, 8, 8], 10, hidden=[16, 8], mean=0.5, std=0.25), (1, 8, 8)),
        (
            lambda: zoo.cnn([3, 8, 8], 10, channels=(4, 6), hidden=12, mean=[0.4, 0.5, 0.6], std=[0.2, 0.3, 0.4]),
            (3, 8, 8),
        ),
        (lambda: zoo.resnet([3, 8, 8], 5, width=4), (3, 8, 8)),
        (lambda: zoo.resnet([1, 8, 8], 5, width=2, blocks=(2, 1, 1)), (1, 8, 8)),
    ],
    ids=["mlp", "cnn", "resnet", "resnet-2-blocks"],
)
def test_zoo_models_round_trip(factory, shape) -> None:
    net = _check_same(factory(), shape)
    assert net.relu_nodes(), "zoo models have ReLUs"
    assert all(isinstance(net.nodes[r].op, ReLUOp) for r in net.relu_nodes())


def test_batchnorm_folded_into_conv_and_linear() -> None:
    model = nn.Sequential(
        nn.Conv2d(2, 3, 3), nn.BatchNorm2d(3), nn.ReLU(), nn.Flatten(), nn.Linear(27, 4), nn.BatchNorm1d(4)
    )
    net = _check_same(model, (2, 5, 5))
    kinds = [type(n.op) for n in net.nodes.values()]
    assert ChannelAffineOp not in kinds  # both BNs folded
    assert kinds.count(Conv2dOp) == 1 and kinds.count(LinearOp) == 1


def test_batchnorm_kept_when_not_foldable() -> None:
    # BN after a ReLU (and BN whose producer has another consumer) cannot be folded: kept as a channel affine op.
    class Branchy(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(2, 2, 3, padding=1)
            self.bn = nn.BatchNorm2d(2)
            self.bn2 = nn.BatchNorm2d(2)

        def forward(self, x: Tensor) -> Tensor:
            y = self.conv(x)
            return self.bn(y) + y + self.bn2(torch.relu(y))

    net = _check_same(Branchy(), (2, 4, 4))
    assert sum(isinstance(n.op, ChannelAffineOp) for n in net.nodes.values()) == 2


class _Forms(nn.Module):
    """Uses every accepted call_function / call_method form once."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.w = nn.Parameter(torch.randn(4, 12))
        self.b = nn.Parameter(torch.randn(4))
        self.cw = nn.Parameter(torch.randn(3, 2, 3, 3))
        self.m = nn.Parameter(torch.randn(4, 5))
        self.left = nn.Parameter(torch.randn(3, 2))
        self.register_buffer("shift", torch.randn(2, 1, 1))
        self.norm = Normalize([0.1, 0.2], [0.5, 0.7])
        self.inner = nn.Sequential(nn.Sequential(nn.Identity(), nn.Dropout(0.5)), nn.LeakyReLU(0.2))


def test_function_and_method_forms() -> None:
    class Forms(_Forms):
        def forward(self, x: Tensor) -> Tensor:
            bs = x.size(0)
            x = self.norm(x)
            x = x + self.shift
            x = torch.add(x, 0.5)
            x = 2.0 - x
            x = torch.sub(x, self.shift)
            x = x * 1.5
            x = torch.mul(x, 0.9)
            x = x / 2.0
            x = torch.div(x, 0.8)
            x = -x
            x = self.inner(x)
            y = F.conv2d(x, self.cw, None, 1, 1)
            y = F.relu(y) + torch.relu(y).mul(0.5)
            y = F.leaky_relu(y, 0.1).add(y.sub(1.0)).div(2.0)
            y = F.avg_pool2d(y, 2)
            z = F.max_pool2d(x, 2)
            z = z.relu().sigmoid().tanh()
            z = torch.sigmoid(z) + torch.tanh(z)
            zz = z.reshape(x.shape[0], -1)
            yy = torch.flatten(y, 1)
            h = F.linear(yy, self.w, self.b)
            h = h @ self.m
            h = torch.matmul(h, self.m.t())
            h = h - F.relu(h) + torch.sub(h, torch.tanh(h)) * x.size()[1]
            t = y.view(bs, 3, 4).permute(0, 2, 1)
            t = torch.permute(t, (0, 2, 1)).transpose(1, 2)
            t = torch.transpose(t, 1, 2)
            t = t.unsqueeze(1).squeeze(1)
            t = torch.unsqueeze(t, -1)
            t = torch.squeeze(t, -1).flatten(1)
            u = torch.matmul(self.left, y.reshape(-1, 2, 6)).flatten(1)
            v = torch.reshape(zz, (bs, 2, 4)).view(-1, 8)
            w = t @ torch.ones(12, 4) + u @ torch.ones(18, 4) * 0.1
            return h + v @ torch.ones(8, 4) + w

    net = _check_same(Forms(), (2, 4, 4))
    assert len(net.nonlinear_nodes()) >= 8


def test_constant_matmul_left_and_generic_shapes() -> None:
    class M(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Parameter(torch.randn(5, 3))

        def forward(self, x: Tensor) -> Tensor:
            return torch.relu(self.a @ x).flatten(1)

    _check_same(M(), (3, 4))


def test_identity_model_and_sequential_nesting() -> None:
    net = _check_same(nn.Sequential(nn.Sequential(nn.Identity()), nn.Flatten()), (2, 3))
    assert net.output_shape == (6,)


@pytest.mark.parametrize(
    ("model", "shape", "needle"),
    [
        (nn.Sequential(nn.Linear(3, 3), nn.Softmax(dim=1)), (3,), "Softmax"),
        (nn.Sequential(nn.Linear(3, 3), nn.GELU()), (3,), "GELU"),
        (nn.Sequential(nn.Linear(3, 3), nn.MaxPool1d(1)), (3,), "MaxPool1d"),
    ],
    ids=["softmax", "gelu", "maxpool1d"],
)
def test_unsupported_module_named(model, shape, needle) -> None:
    with pytest.raises(InputError, match=needle) as info:
        Network.from_module(model, shape)
    assert "fx node" in str(info.value)


def test_unsupported_functions_named() -> None:
    class Square(nn.Module):
        def forward(self, x: Tensor) -> Tensor:
            return x * x

    class Exp(nn.Module):
        def forward(self, x: Tensor) -> Tensor:
            return torch.exp(x)

    class Index(nn.Module):
        def forward(self, x: Tensor) -> Tensor:
            return x[:, :2]

    class BatchMix(nn.Module):
        def forward(self, x: Tensor) -> Tensor:
            return x.reshape(-1)

    class PermBatch(nn.Module):
        def forward(self, x: Tensor) -> Tensor:
            return x.permute(1, 0)

    with pytest.raises(InputError, match="multiplication of two network tensors"):
        Network.from_module(Square(), (3,))
    with pytest.raises(InputError, match="exp"):
        Network.from_module(Exp(), (3,))
    with pytest.raises(InputError, match="getitem"):
        Network.from_module(Index(), (3,))
    with pytest.raises(InputError, match="batch"):
        Network.from_module(BatchMix(), (3,))
    with pytest.raises(InputError, match="batch"):
        Network.from_module(PermBatch(), (3,))

    class ScaleByBatch(nn.Module):
        def forward(self, x: Tensor) -> Tensor:
            return x * x.size(0)

    with pytest.raises(InputError, match="batch size"):
        Network.from_module(ScaleByBatch(), (3,))


def test_untraceable_model_and_bad_arguments() -> None:
    class Branch(nn.Module):
        def forward(self, x: Tensor) -> Tensor:
            if x.sum() > 0:
                return x
            return -x

    with pytest.raises(InputError, match="cannot trace"):
        Network.from_module(Branch(), (3,))
    with pytest.raises(InputError, match="input_shape"):
        Network.from_module(nn.Linear(3, 2), (0,))
    with pytest.raises(InputError, match=r"nn\.Module"):
        Network.from_module(lambda x: x, (3,))  # type: ignore[arg-type]
    net = Network.from_module(nn.Linear(3, 2), (3,))
    with pytest.raises(InputError, match="shape"):
        net.forward(torch.zeros(2, 4))
    with pytest.raises(InputError, match="Linear"):
        Network.from_module(nn.Linear(3, 2), (4,))
    with pytest.raises(InputError, match="negative_slope"):
        Network.from_module(nn.Sequential(nn.Linear(3, 2), nn.LeakyReLU(1.5)), (3,))


def test_network_is_a_snapshot_and_moves_dtype() -> None:
    model = nn.Sequential(nn.Linear(3, 2), nn.ReLU())
    net = Network.from_module(model, (3,))
    x = torch.randn(4, 3)
    before = net(x)
    with torch.no_grad():
        model[0].weight.add_(1.0)
    torch.testing.assert_close(net(x), before)
    net64 = net.to(dtype=torch.float64)
    torch.testing.assert_close(net64(x.double()), before.double())


def test_register_custom_op() -> None:
    class Scale(nn.Module):
        def forward(self, x: Tensor) -> Tensor:
            return 3.0 * torch.exp(torch.zeros_like(x)) * x  # not traceable into supported ops

    register_op(Scale, lambda module, in_shapes: ChannelAffineOp(torch.tensor(3.0), torch.tensor(0.0)))
    model = nn.Sequential(nn.Linear(3, 3), Scale(), nn.ReLU())
    net = _check_same(model, (3,))
    assert any(isinstance(n.op, ChannelAffineOp) for n in net.nodes.values())
    with pytest.raises(InputError, match="callable"):
        register_op(Scale, "nope")  # type: ignore[arg-type]
    assert issubclass(ChannelAffineOp, BoundOp)


# -- live mode (differentiable bounds for certified training) ------------------------------------------------------
def _live_models() -> list[tuple[str, nn.Module, tuple[int, ...]]]:
    torch.manual_seed(3)
    return [
        ("mlp", zoo.mlp([1, 8, 8], 10, hidden=[16, 8], mean=0.5, std=0.25), (1, 8, 8)),
        ("cnn", zoo.cnn([1, 8, 8], 10, channels=(3, 4), hidden=8, mean=0.5, std=0.3), (1, 8, 8)),
    ]


def _box(shape: tuple[int, ...], n: int = 5, eps: float = 0.05) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(4)
    x = torch.rand(n, *shape, generator=g)
    return (x - eps).clamp(0, 1), (x + eps).clamp(0, 1)


@pytest.mark.parametrize("method", ["ibp", "crown"])
@pytest.mark.parametrize("case", range(2), ids=["mlp", "cnn"])
def test_live_bounds_equal_snapshot_and_reach_every_parameter(case: int, method: str) -> None:
    from bastion.verify.bounds import compute_bounds, robustness_spec

    _, model, shape = _live_models()[case]
    live = Network.from_module(model, shape, live=True)
    snap = Network.from_module(model, shape)
    assert live.live and not snap.live
    lo, hi = _box(shape)
    C = robustness_spec(torch.tensor([0, 1, 2, 3, 4]), 10)
    got = compute_bounds(live, lo, hi, C=C, method=method)
    ref = compute_bounds(snap, lo, hi, C=C, method=method)
    torch.testing.assert_close(got.lower, ref.lower, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got.upper, ref.upper, rtol=1e-5, atol=1e-5)
    assert not ref.lower.requires_grad, "the snapshot network must not be differentiable in the model"
    model.zero_grad(set_to_none=True)
    (got.lower.sum() + 0.1 * got.upper.sum()).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and bool(p.grad.abs().sum() > 0), f"no gradient reached {name}"


def test_live_bounds_follow_in_place_updates() -> None:
    from bastion.verify.bounds import compute_bounds

    _, model, shape = _live_models()[0]
    live = Network.from_module(model, shape, live=True)
    lo, hi = _box(shape)
    before = {m: compute_bounds(live, lo, hi, method=m).lower.detach() for m in ("ibp", "crown")}
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    compute_bounds(live, lo, hi, method="ibp").lower.sum().backward()
    opt.step()  # an in-place update of every parameter
    fresh = Network.from_module(model, shape)  # a snapshot of the updated weights
    for m in ("ibp", "crown"):
        now = compute_bounds(live, lo, hi, method=m).lower.detach()
        assert not torch.allclose(now, before[m]), f"{m} bounds of the live network ignored the optimiser step"
        torch.testing.assert_close(now, compute_bounds(fresh, lo, hi, method=m).lower, rtol=1e-5, atol=1e-5)
    x = (lo + hi) / 2
    with torch.no_grad():
        torch.testing.assert_close(live(x), model(x), rtol=1e-5, atol=1e-5)


def test_live_mode_keeps_functional_weights_live() -> None:
    class Functional(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = nn.Parameter(torch.randn(4, 3))
            self.b = nn.Parameter(torch.randn(4))

        def forward(self, x: Tensor) -> Tensor:
            return F.linear(torch.relu(x), self.w, self.b)

    model = Functional()
    net = Network.from_module(model, (3,), live=True)
    ops = [n.op for n in net.nodes.values() if isinstance(n.op, LinearOp)]
    assert len(ops) == 1 and ops[0].weight is model.w and ops[0].bias is model.b


def test_live_mode_refuses_what_it_cannot_keep_live() -> None:
    bn = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.ReLU(), nn.Linear(4, 2)).eval()
    with pytest.raises(InputError, match="BatchNorm is not supported in live mode"):
        Network.from_module(bn, (3,), live=True)
    Network.from_module(bn, (3,))  # the snapshot still folds it

    class Scaled(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(3, 2)
            self.scale = nn.Parameter(torch.tensor(2.0))

        def forward(self, x: Tensor) -> Tensor:
            return self.lin(x) * self.scale

    with pytest.raises(InputError, match="live mode"):
        Network.from_module(Scaled(), (3,), live=True)

    class Transposed(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = nn.Parameter(torch.randn(3, 2))

        def forward(self, x: Tensor) -> Tensor:
            return F.linear(x, self.w.t())  # folded into a constant: would freeze the parameter

    with pytest.raises(InputError, match="live mode"):
        Network.from_module(Transposed(), (3,), live=True)
    # a frozen parameter is an ordinary constant, also in live mode
    frozen = Scaled()
    frozen.scale.requires_grad_(False)
    Network.from_module(frozen, (3,), live=True)
    net = Network.from_module(nn.Sequential(nn.Linear(3, 2)), (3,), live=True)
    with pytest.raises(InputError, match="live network"):
        net.to(dtype=torch.float64)
    assert net.to("cpu").live
