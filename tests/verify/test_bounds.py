"""Soundness and known answers for IBP, CROWN, alpha-CROWN and DeepPoly on the verification IR."""

from __future__ import annotations

import itertools

import pytest
import torch
from torch import Tensor, nn

from bastion.errors import InputError
from bastion.models import zoo
from bastion.models.normalize import Normalize
from bastion.verify.bounds import BoundOptions, BoundResult, compute_bounds, robustness_spec
from bastion.verify.ir import Network
from bastion.verify.ops import LeakyReLUOp, ReLUOp, SigmoidOp, TanhOp

METHODS = ["ibp", "crown", "deeppoly", "alpha-crown"]
FAST = BoundOptions(alpha_steps=5)
TOL = 1e-7


def _act(kind: str, g: torch.Generator) -> nn.Module:
    if kind == "relu":
        return nn.ReLU()
    if kind == "leaky":
        return nn.LeakyReLU(float(torch.rand(1, generator=g)) * 1.5 - 0.5)  # slopes in [-0.5, 1]
    if kind == "sigmoid":
        return nn.Sigmoid()
    return nn.Tanh()


def _randomise(model: nn.Module, g: torch.Generator) -> nn.Module:
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


class _Residual(nn.Module):
    def __init__(self, width: int, act: nn.Module) -> None:
        super().__init__()
        self.inner = nn.Sequential(nn.Linear(width, width), act, nn.Linear(width, width))

    def forward(self, x: Tensor) -> Tensor:
        return self.inner(x) + x


def _random_fc(seed: int, kind: str) -> tuple[nn.Module, tuple[int, ...]]:
    g = torch.Generator().manual_seed(seed)
    d = int(torch.randint(2, 6, (1,), generator=g))
    layers: list[nn.Module] = []
    width = d
    for i in range(int(torch.randint(1, 4, (1,), generator=g))):
        w = int(torch.randint(3, 9, (1,), generator=g))
        layers.append(nn.Linear(width, w))
        if seed % 3 == 0 and i == 0:
            layers.append(nn.BatchNorm1d(w))
        layers.append(_act(kind, g))
        width = w
    if seed % 2 == 0:
        layers.append(_Residual(width, _act(kind, g)))
        layers.append(_act(kind, g))
    layers.append(nn.Linear(width, 3))
    return _randomise(nn.Sequential(*layers), g), (d,)


def _random_conv(seed: int, kind: str) -> tuple[nn.Module, tuple[int, ...]]:
    g = torch.Generator().manual_seed(seed)
    c = int(torch.randint(1, 3, (1,), generator=g))
    hw = int(torch.randint(4, 7, (1,), generator=g))
    stride = 1 + seed % 2
    layers: list[nn.Module] = [
        Normalize([0.5] * c, [0.5 + 0.1 * i for i in range(c)]),
        nn.Conv2d(c, 3, 3, stride=stride, padding=seed % 2),
    ]
    if seed % 3 == 0:
        layers += [_act(kind, g), nn.BatchNorm2d(3)]  # not foldable: after the activation
    else:
        layers += [nn.BatchNorm2d(3)]
    layers.append(_act(kind, g))
    pool = seed % 3
    if pool == 1:
        layers.append(nn.MaxPool2d(2, stride=1 + seed % 2, padding=seed % 2 if seed % 4 == 1 else 0))
    elif pool == 2:
        layers.append(nn.AvgPool2d(2, stride=1))
    layers.append(nn.Flatten())
    model = nn.Sequential(*layers)
    with torch.no_grad():
        flat = model.double().eval()(torch.zeros(1, c, hw, hw, dtype=torch.float64)).shape[1]
    model.append(nn.Linear(flat, 4))
    return _randomise(model, g), (c, hw, hw)


def _box(shape: tuple[int, ...], n: int, g: torch.Generator) -> tuple[Tensor, Tensor]:
    centre = torch.randn(n, *shape, generator=g, dtype=torch.float64)
    radius = torch.rand(n, *shape, generator=g, dtype=torch.float64) * float(torch.rand(1, generator=g)) * 1.5
    radius[0] = 0.0  # a degenerate (zero-width) box
    radius = radius * (torch.rand(n, *shape, generator=g, dtype=torch.float64) > 0.2)  # some zero-width dims
    return centre - radius, centre + radius


def _samples(lo: Tensor, hi: Tensor, count: int, g: torch.Generator) -> Tensor:
    """(N, S, *shape) points of each box: uniform, random vertices, and every vertex for small inputs."""
    n, shape = lo.shape[0], lo.shape[1:]
    d = lo[0].numel()
    u = torch.rand(n, count, *shape, generator=g, dtype=lo.dtype)
    v = (torch.rand(n, count, *shape, generator=g, dtype=lo.dtype) > 0.5).to(lo.dtype)
    pts = [u, v]
    if d <= 8:
        corners = torch.tensor(list(itertools.product([0.0, 1.0], repeat=d)), dtype=lo.dtype)
        pts.append(corners.reshape(1, -1, *shape).expand(n, -1, *shape))
    t = torch.cat(pts, 1)
    return lo.unsqueeze(1) + t * (hi - lo).unsqueeze(1)


def _outputs(net: Network, x: Tensor, C: Tensor) -> Tensor:
    n, s = x.shape[:2]
    y = net(x.reshape(n * s, *x.shape[2:])).reshape(n, s, -1)
    return torch.einsum("nmk,nsk->nsm", C, y)


def _assert_sound(res: BoundResult, vals: Tensor, what: str) -> None:
    lo, hi = res.lower.unsqueeze(1), res.upper.unsqueeze(1)
    scale = 1 + vals.abs()
    assert bool((vals >= lo - TOL * scale).all()), f"{what}: lower bound above a sampled output"
    assert bool((vals <= hi + TOL * scale).all()), f"{what}: upper bound below a sampled output"


def _soundness(builder, kind: str, seeds: range) -> None:
    for seed in seeds:
        model, shape = builder(seed, kind)
        net = Network.from_module(model, shape)
        g = torch.Generator().manual_seed(1000 + seed)
        lo, hi = _box(shape, 3, g)
        k = net.output_shape[0]
        C = torch.randn(3, 2, k, generator=g, dtype=torch.float64)
        vals = _outputs(net, _samples(lo, hi, 600, g), C)
        results = {m: compute_bounds(net, lo, hi, C=C, method=m, options=FAST) for m in METHODS}
        for m, res in results.items():
            _assert_sound(res, vals, f"{m} on {kind} net seed {seed}\n{net}")
            # The zero-width box: every method is exact up to rounding.
            torch.testing.assert_close(res.lower[0], res.upper[0], atol=1e-8, rtol=1e-8)
        a, c = results["alpha-crown"], results["crown"]
        assert bool((a.lower >= c.lower - 1e-10).all()) and bool((a.upper <= c.upper + 1e-10).all())


@pytest.mark.parametrize("kind", ["relu", "leaky", "sigmoid", "tanh"])
def test_soundness_random_fc(kind: str) -> None:
    _soundness(_random_fc, kind, range(30))


@pytest.mark.parametrize("kind", ["relu", "leaky", "sigmoid", "tanh"])
def test_soundness_random_conv(kind: str) -> None:
    _soundness(_random_conv, kind, range(12))


@pytest.mark.parametrize("mode", ["crown", "deeppoly"])
@pytest.mark.parametrize("op", [ReLUOp(), LeakyReLUOp(0.3), LeakyReLUOp(-0.4), LeakyReLUOp(1.0), SigmoidOp(), TanhOp()])
def test_relaxations_pointwise(op, mode: str) -> None:
    g = torch.Generator().manual_seed(0)
    n = 4000
    centre = torch.randn(n, generator=g, dtype=torch.float64) * 4
    radius = torch.rand(n, generator=g, dtype=torch.float64) ** 3 * 6
    radius[:50] = 0.0
    radius[50:100] = 1e-9
    lo, hi = centre - radius, centre + radius
    lo[100:200], hi[100:200] = -torch.rand(100, generator=g, dtype=torch.float64), torch.rand(100, generator=g).double()
    lo[200:210], hi[200:210] = -30.0, 40.0
    alpha = torch.rand(n, 1, generator=g, dtype=torch.float64) if op.has_alpha else None
    for a in [None, alpha]:
        lw, lb, uw, ub = op.relax(lo, hi, a, mode=mode)
        lw, lb = lw.reshape(n), lb.reshape(n)
        t = torch.rand(n, 64, generator=g, dtype=torch.float64)
        t[:, 0], t[:, 1] = 0.0, 1.0
        x = lo.unsqueeze(1) + t * (hi - lo).unsqueeze(1)
        fx = op.fn(x)
        assert bool((lw.unsqueeze(1) * x + lb.unsqueeze(1) <= fx + 1e-10).all()), f"{op!r} lower relaxation"
        assert bool((uw.unsqueeze(1) * x + ub.unsqueeze(1) >= fx - 1e-10).all()), f"{op!r} upper relaxation"


def test_linear_model_crown_exact() -> None:
    g = torch.Generator().manual_seed(3)
    model = nn.Sequential(Normalize(0.2, 0.5), nn.Linear(4, 6), nn.Linear(6, 3)).double()
    _randomise(model, g)
    net = Network.from_module(model, (4,))
    lo = torch.randn(5, 4, generator=g, dtype=torch.float64)
    hi = lo + torch.rand(5, 4, generator=g, dtype=torch.float64)
    # Closed form: the network is x -> W (x - 0.2) / 0.5 + b with W = W2 W1.
    w = model[2].weight @ model[1].weight / 0.5
    b = model[2].weight @ model[1].bias + model[2].bias - (w * 0.2).sum(1)
    c, r = (hi + lo) / 2, (hi - lo) / 2
    exact_lo, exact_hi = c @ w.T + b - r @ w.abs().T, c @ w.T + b + r @ w.abs().T
    for m in ["crown", "deeppoly", "alpha-crown"]:
        res = compute_bounds(net, lo, hi, method=m)
        torch.testing.assert_close(res.lower, exact_lo)
        torch.testing.assert_close(res.upper, exact_hi)
    ibp = compute_bounds(net, lo, hi, method="ibp")
    assert bool((ibp.lower <= exact_lo + 1e-12).all()) and bool((ibp.upper >= exact_hi - 1e-12).all())
    assert bool((ibp.upper - ibp.lower > exact_hi - exact_lo + 1e-6).any()), "IBP is loose on a product of layers"


def test_one_relu_by_hand() -> None:
    # y = 2 * relu(x) - 1 on x in [-1, 2]. IBP: [-1, 3]. CROWN: chord upper 2/3 (x + 1) -> 3 at x = 2; adaptive lower
    # slope 1 (u = 2 > -l = 1) -> 2x - 1 >= -3. alpha-CROWN drives the slope to 0: lower bound -1 (exact).
    model = nn.Sequential(nn.Linear(1, 1), nn.ReLU(), nn.Linear(1, 1)).double()
    with torch.no_grad():
        model[0].weight.fill_(1.0)
        model[0].bias.zero_()
        model[2].weight.fill_(2.0)
        model[2].bias.fill_(-1.0)
    net = Network.from_module(model, (1,))
    lo, hi = torch.tensor([[-1.0]], dtype=torch.float64), torch.tensor([[2.0]], dtype=torch.float64)
    ibp = compute_bounds(net, lo, hi, method="ibp")
    crown = compute_bounds(net, lo, hi, method="crown")
    alpha = compute_bounds(net, lo, hi, method="alpha-crown")
    assert ibp.lower.item() == pytest.approx(-1.0) and ibp.upper.item() == pytest.approx(3.0)
    assert crown.lower.item() == pytest.approx(-3.0) and crown.upper.item() == pytest.approx(3.0)
    assert alpha.lower.item() == pytest.approx(-1.0, abs=1e-6) and alpha.upper.item() == pytest.approx(3.0)
    relu = net.relu_nodes()[0]
    for res in (ibp, crown, alpha):
        torch.testing.assert_close(res.intermediate[relu][0], lo)
        torch.testing.assert_close(res.intermediate[relu][1], hi)
    # With a specification: -y has bounds [-3, 1] under alpha-CROWN.
    neg = compute_bounds(net, lo, hi, C=-torch.ones(1, 1, dtype=torch.float64), method="alpha-crown")
    assert neg.lower.item() == pytest.approx(-3.0) and neg.upper.item() == pytest.approx(1.0, abs=1e-6)


def test_deeppoly_equals_crown_on_relu_and_alpha_improves() -> None:
    model = _randomise(zoo.mlp([6], 4, hidden=[12, 12]), torch.Generator().manual_seed(5))
    net = Network.from_module(model, (6,))
    g = torch.Generator().manual_seed(6)
    lo = torch.randn(4, 6, generator=g, dtype=torch.float64)
    hi = lo + 0.5
    crown = compute_bounds(net, lo, hi)
    dp = compute_bounds(net, lo, hi, method="deeppoly")
    alpha = compute_bounds(net, lo, hi, method="alpha-crown")
    ibp = compute_bounds(net, lo, hi, method="ibp")
    torch.testing.assert_close(crown.lower, dp.lower)
    torch.testing.assert_close(crown.upper, dp.upper)
    assert float((alpha.lower - crown.lower).max()) > 1e-4, "alpha-CROWN should improve some bound"
    # The first pre-activation layer is affine in the input: all methods get it exactly.
    first = net.relu_nodes()[0]
    torch.testing.assert_close(crown.intermediate[first][0], ibp.intermediate[first][0])
    # Typical (not a theorem): CROWN is much tighter than IBP on a deeper net.
    assert float((crown.upper - crown.lower).mean()) < float((ibp.upper - ibp.lower).mean())


@pytest.mark.parametrize("method", METHODS)
def test_batched_equals_per_sample(method: str) -> None:
    model, shape = _random_conv(4, "relu")
    net = Network.from_module(model, shape)
    g = torch.Generator().manual_seed(8)
    lo, hi = _box(shape, 4, g)
    C = torch.randn(4, 3, 4, generator=g, dtype=torch.float64)
    batch = compute_bounds(net, lo, hi, C=C, method=method, options=FAST)
    for i in range(4):
        one = compute_bounds(net, lo[i : i + 1], hi[i : i + 1], C=C[i : i + 1], method=method, options=FAST)
        torch.testing.assert_close(batch.lower[i : i + 1], one.lower, atol=1e-9, rtol=1e-9)
        torch.testing.assert_close(batch.upper[i : i + 1], one.upper, atol=1e-9, rtol=1e-9)
        for name, (l_b, h_b) in batch.intermediate.items():
            torch.testing.assert_close(l_b[i : i + 1], one.intermediate[name][0], atol=1e-9, rtol=1e-9)
            torch.testing.assert_close(h_b[i : i + 1], one.intermediate[name][1], atol=1e-9, rtol=1e-9)


@pytest.mark.parametrize("method", METHODS)
def test_splits_sound_and_no_looser(method: str) -> None:
    checked = 0
    for seed in range(8):
        model = _randomise(zoo.mlp([4], 3, hidden=[8, 8]), torch.Generator().manual_seed(seed))
        net = Network.from_module(model, (4,))
        g = torch.Generator().manual_seed(50 + seed)
        lo = torch.randn(2, 4, generator=g, dtype=torch.float64)
        hi = lo + 1.5
        base = compute_bounds(net, lo, hi, method=method, options=FAST)
        splits = {}
        for name in net.relu_nodes():
            pl, ph = base.intermediate[name]
            unstable = (pl < 0) & (ph > 0)
            choice = torch.where(torch.rand(pl.shape, generator=g) > 0.5, 1, -1).to(torch.int8)
            pick = unstable & (torch.rand(pl.shape, generator=g) > 0.6)
            splits[name] = torch.where(pick, choice, torch.zeros_like(choice))
        res = compute_bounds(net, lo, hi, method=method, options=FAST, splits=splits)
        x = _samples(lo, hi, 3000, g)
        values = net.forward_all(x.reshape(-1, 4))
        ok = torch.ones(x.shape[0] * x.shape[1], dtype=torch.bool)
        for name, s in splits.items():
            pre = values[net.nodes[name].inputs[0]]
            s_rep = s.repeat_interleave(x.shape[1], 0)
            ok &= ((s_rep > 0) <= (pre >= 0)).all(1) & ((s_rep < 0) <= (pre <= 0)).all(1)
        y = values[net.output_name].reshape(x.shape[0], x.shape[1], -1)
        keep = ok.reshape(x.shape[0], x.shape[1])
        for i in range(x.shape[0]):
            yi = y[i][keep[i]]
            checked += yi.shape[0]
            assert bool((yi >= res.lower[i] - 1e-9).all()), f"{method} split lower bound unsound (seed {seed})"
            assert bool((yi <= res.upper[i] + 1e-9).all()), f"{method} split upper bound unsound (seed {seed})"
        assert bool((res.lower >= base.lower - 1e-9).all()) and bool((res.upper <= base.upper + 1e-9).all())
        for name, s in splits.items():
            pl, ph = res.intermediate[name]
            assert bool((pl[s > 0] >= 0).all()) and bool((ph[s < 0] <= 0).all())
    assert checked > 1000, "too few samples inside the split domains to mean anything"


def test_intermediate_reuse_is_sound_and_inside_given() -> None:
    model = _randomise(zoo.mlp([5], 3, hidden=[10, 10]), torch.Generator().manual_seed(2))
    net = Network.from_module(model, (5,))
    g = torch.Generator().manual_seed(9)
    lo = torch.randn(3, 5, generator=g, dtype=torch.float64)
    hi = lo + 1.0
    parent = compute_bounds(net, lo, hi)
    sub_lo, sub_hi = lo, lo + 0.5  # a child domain: the parent's bounds remain valid
    for reuse in (False, True):
        opts = BoundOptions(reuse_intermediate=reuse)
        child = compute_bounds(net, sub_lo, sub_hi, options=opts, intermediate=parent.intermediate)
        for name, (pl, ph) in parent.intermediate.items():
            cl, ch = child.intermediate[name]
            assert bool((cl >= pl - 1e-12).all()) and bool((ch <= ph + 1e-12).all())
        vals = _outputs(net, _samples(sub_lo, sub_hi, 500, g), torch.eye(3, dtype=torch.float64).expand(3, 3, 3))
        _assert_sound(child, vals, f"reuse={reuse}")


def test_zoo_float32_sound() -> None:
    torch.manual_seed(0)
    for model, shape in [
        (zoo.cnn([1, 8, 8], 5, channels=(3, 4), hidden=8, mean=0.5, std=0.3), (1, 8, 8)),
        (zoo.resnet([3, 6, 6], 4, width=2), (3, 6, 6)),
    ]:
        model.eval()
        net = Network.from_module(model, shape)
        x = torch.rand(2, *shape)
        lo, hi = (x - 0.02).clamp(0, 1), (x + 0.02).clamp(0, 1)
        labels = model(x).argmax(1)
        C = robustness_spec(labels, 5 if shape[0] == 1 else 4)
        g = torch.Generator().manual_seed(0)
        vals = _outputs(net, _samples(lo, hi, 300, g), C)
        for m in METHODS:
            res = compute_bounds(net, lo, hi, C=C, method=m, options=FAST)
            assert bool((vals >= res.lower.unsqueeze(1) - 1e-4).all()) and bool(
                (vals <= res.upper.unsqueeze(1) + 1e-4).all()
            )
            assert res.lower.dtype == torch.float32


def test_bound_upper_off_and_options() -> None:
    model = _randomise(zoo.mlp([3], 2, hidden=[5]), torch.Generator().manual_seed(0))
    net = Network.from_module(model, (3,))
    lo = torch.zeros(2, 3, dtype=torch.float64)
    hi = lo + 1
    full = compute_bounds(net, lo, hi, method="crown")
    for m in METHODS:
        res = compute_bounds(net, lo, hi, options=BoundOptions(method=m, bound_upper=False, alpha_steps=3))
        assert bool(torch.isinf(res.upper).all())
        if m in ("crown", "deeppoly"):
            torch.testing.assert_close(res.lower, full.lower)


def test_robustness_spec() -> None:
    C = robustness_spec(torch.tensor([0, 2]), 3)
    expected = torch.tensor(
        [[[1.0, -1.0, 0.0], [1.0, 0.0, -1.0]], [[-1.0, 0.0, 1.0], [0.0, -1.0, 1.0]]], dtype=torch.float32
    )
    torch.testing.assert_close(C, expected)
    with pytest.raises(InputError, match="labels"):
        robustness_spec(torch.tensor([3]), 3)
    with pytest.raises(InputError, match="num_classes"):
        robustness_spec(torch.tensor([0]), 1)
    with pytest.raises(InputError, match="integer"):
        robustness_spec(torch.tensor([0.0]), 3)


def test_bad_inputs_named() -> None:
    net = Network.from_module(nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2)), (3,))
    lo, hi = torch.zeros(2, 3), torch.ones(2, 3)
    with pytest.raises(InputError, match="shape"):
        compute_bounds(net, torch.zeros(2, 4), torch.ones(2, 4))
    with pytest.raises(InputError, match="lower > upper"):
        compute_bounds(net, hi, lo)
    with pytest.raises(InputError, match="NaN"):
        compute_bounds(net, lo, hi.clone().fill_(float("nan")))
    with pytest.raises(InputError, match="unknown method"):
        compute_bounds(net, lo, hi, method="magic")
    with pytest.raises(InputError, match="C must have shape"):
        compute_bounds(net, lo, hi, C=torch.ones(3, 5))
    relu = net.relu_nodes()[0]
    with pytest.raises(InputError, match="not a nonlinear node"):
        compute_bounds(net, lo, hi, splits={"nope": torch.zeros(2, 4, dtype=torch.int8)})
    with pytest.raises(InputError, match="must have shape"):
        compute_bounds(net, lo, hi, splits={relu: torch.zeros(2, 5, dtype=torch.int8)})
    with pytest.raises(InputError, match="-1/0/"):
        compute_bounds(net, lo, hi, splits={relu: torch.full((2, 4), 2, dtype=torch.int8)})
    with pytest.raises(InputError, match="-1/0/"):
        compute_bounds(net, lo, hi, splits={relu: torch.ones(2, 4, dtype=torch.bool)})
    with pytest.raises(InputError, match="intermediate"):
        compute_bounds(net, lo, hi, intermediate={relu: (torch.zeros(2, 3), torch.ones(2, 3))})
    with pytest.raises(InputError, match="Network"):
        compute_bounds(nn.Linear(3, 2), lo, hi)  # type: ignore[arg-type]


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu() -> None:
    torch.manual_seed(0)
    model = zoo.cnn([1, 8, 8], 5, channels=(3, 4), hidden=8, mean=0.5, std=0.3).eval()
    x = torch.rand(3, 1, 8, 8)
    lo, hi = (x - 0.02).clamp(0, 1), (x + 0.02).clamp(0, 1)
    C = robustness_spec(model(x).argmax(1), 5)
    net_cpu = Network.from_module(model, (1, 8, 8))
    net_gpu = Network.from_module(model.cuda(), (1, 8, 8))
    for m in METHODS:
        ref = compute_bounds(net_cpu, lo, hi, C=C, method=m, options=FAST)
        got = compute_bounds(net_gpu, lo.cuda(), hi.cuda(), C=C.cuda(), method=m, options=FAST)
        torch.testing.assert_close(got.lower.cpu(), ref.lower, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(got.upper.cpu(), ref.upper, atol=1e-4, rtol=1e-4)
