"""Soundness and known answers for IBP, CROWN, alpha-CROWN and DeepPoly on the verification IR."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

from bastion.errors import InputError
from bastion.models import zoo
from bastion.models.normalize import Normalize
from bastion.verify.bounds import BoundOptions, BoundResult, compute_bounds, robustness_spec
from bastion.verify.crown import _onehot_step, select_rows
from bastion.verify.ir import Network
from bastion.verify.ops import Conv2dOp, LeakyReLUOp, ReLUOp, SigmoidOp, TanhOp

from .nets import act, assert_contains, box_samples, random_box, random_fc, randomise, spec_values

METHODS = ["ibp", "crown", "deeppoly", "alpha-crown", "crown-ibp"]
FAST = BoundOptions(alpha_steps=5)
TOL = 1e-7


def _random_fc(seed: int, kind: str) -> tuple[nn.Module, tuple[int, ...]]:
    """Random fully connected networks whose batch norm follows a linear layer (folded by the IR)."""
    return random_fc(seed, kind, foldable_bn=True)


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
        layers += [act(kind, g), nn.BatchNorm2d(3)]  # not foldable: after the activation
    else:
        layers += [nn.BatchNorm2d(3)]
    layers.append(act(kind, g))
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
    return randomise(model, g), (c, hw, hw)


def _box(shape: tuple[int, ...], n: int, g: torch.Generator) -> tuple[Tensor, Tensor]:
    """Random boxes, the first of zero width and some zero-width dimensions in the others."""
    return random_box(shape, n, g, zero_width_dims=True)


def _assert_sound(res: BoundResult, vals: Tensor, what: str) -> None:
    assert_contains(res.lower, res.upper, vals, what, tol=TOL)


def _soundness(builder, kind: str, seeds: range) -> None:
    for seed in seeds:
        model, shape = builder(seed, kind)
        net = Network.from_module(model, shape)
        g = torch.Generator().manual_seed(1000 + seed)
        lo, hi = _box(shape, 3, g)
        k = net.output_shape[0]
        C = torch.randn(3, 2, k, generator=g, dtype=torch.float64)
        vals = spec_values(net, box_samples(lo, hi, 600, g), C)
        results = {m: compute_bounds(net, lo, hi, C=C, method=m, options=FAST) for m in METHODS}
        for m, res in results.items():
            _assert_sound(res, vals, f"{m} on {kind} net seed {seed}\n{net}")
            # The zero-width box: every method is exact up to rounding.
            torch.testing.assert_close(res.lower[0], res.upper[0], atol=1e-8, rtol=1e-8)
        a, c = results["alpha-crown"], results["crown"]
        assert bool((a.lower >= c.lower - 1e-10).all()) and bool((a.upper <= c.upper + 1e-10).all())
        ci, ib = results["crown-ibp"], results["ibp"]
        assert bool((ci.lower >= ib.lower - 1e-10).all()) and bool((ci.upper <= ib.upper + 1e-10).all())


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
    alpha = None
    if op.has_alpha:
        # One specification row of parameters, shaped like the op's own (ReLU: a slope; S-shapes: two tangents).
        shape = op.alpha_init(lo, hi).shape if hasattr(op, "alpha_init") else lo.shape
        a_min, a_max = op.alpha_bounds()
        alpha = a_min + (a_max - a_min) * torch.rand(shape, generator=g, dtype=torch.float64).unsqueeze(1)
    for a in [None, alpha]:
        lw, lb, uw, ub = op.relax(lo, hi, a, mode=mode)
        lw, lb, uw, ub = (v.reshape(n) for v in (lw, lb, uw, ub))
        t = torch.rand(n, 64, generator=g, dtype=torch.float64)
        t[:, 0], t[:, 1] = 0.0, 1.0
        x = lo.unsqueeze(1) + t * (hi - lo).unsqueeze(1)
        fx = op.fn(x)
        assert bool((lw.unsqueeze(1) * x + lb.unsqueeze(1) <= fx + 1e-10).all()), f"{op!r} lower relaxation"
        assert bool((uw.unsqueeze(1) * x + ub.unsqueeze(1) >= fx - 1e-10).all()), f"{op!r} upper relaxation"


def test_linear_model_crown_exact() -> None:
    g = torch.Generator().manual_seed(3)
    model = nn.Sequential(Normalize(0.2, 0.5), nn.Linear(4, 6), nn.Linear(6, 3)).double()
    randomise(model, g)
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
    model = randomise(zoo.mlp([6], 4, hidden=[12, 12]), torch.Generator().manual_seed(5))
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


@pytest.mark.parametrize("method", [*METHODS, "beta-crown"])
def test_splits_sound_and_no_looser(method: str) -> None:
    options = FAST
    if method == "beta-crown":
        method, options = "alpha-crown", BoundOptions(alpha_steps=10, beta=True)
    checked = 0
    gain = 0.0
    for seed in range(8):
        model = randomise(zoo.mlp([4], 3, hidden=[8, 8]), torch.Generator().manual_seed(seed))
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
        res = compute_bounds(net, lo, hi, method=method, options=options, splits=splits)
        if options.beta:
            # Multipliers start at 0 (CROWN with the splits) and the best bound is kept.
            crown_split = compute_bounds(
                net, lo, hi, method="crown", options=BoundOptions(monotone_splits=False), splits=splits
            )
            assert bool((res.lower >= crown_split.lower - 1e-9).all())
            assert bool((res.upper <= crown_split.upper + 1e-9).all())
            plain = compute_bounds(
                net, lo, hi, method=method, options=BoundOptions(alpha_steps=10, monotone_splits=False), splits=splits
            )
            gain += float((plain.upper - plain.lower).sum() - (res.upper - res.lower).sum())
        x = box_samples(lo, hi, 3000, g)
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
        if not options.beta:
            assert bool((res.lower >= base.lower - 1e-9).all()) and bool((res.upper <= base.upper + 1e-9).all())
        for name, s in splits.items():
            pl, ph = res.intermediate[name]
            assert bool((pl[s > 0] >= 0).all()) and bool((ph[s < 0] <= 0).all())
    assert checked > 1000, "too few samples inside the split domains to mean anything"
    if options.beta:
        assert gain > 0, "beta-CROWN multipliers should tighten split bounds overall"


def test_intermediate_reuse_is_sound_and_inside_given() -> None:
    model = randomise(zoo.mlp([5], 3, hidden=[10, 10]), torch.Generator().manual_seed(2))
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
        vals = spec_values(net, box_samples(sub_lo, sub_hi, 500, g), torch.eye(3, dtype=torch.float64).expand(3, 3, 3))
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
        vals = spec_values(net, box_samples(lo, hi, 300, g), C)
        for m in METHODS:
            res = compute_bounds(net, lo, hi, C=C, method=m, options=FAST)
            assert bool((vals >= res.lower.unsqueeze(1) - 1e-4).all()) and bool(
                (vals <= res.upper.unsqueeze(1) + 1e-4).all()
            )
            assert res.lower.dtype == torch.float32


def test_bound_upper_off_and_options() -> None:
    model = randomise(zoo.mlp([3], 2, hidden=[5]), torch.Generator().manual_seed(0))
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


# CROWN bounds of two conv nets computed by the implementation before the per-sample / one-hot-step rewrite (dense
# identity specifications over the union of unstable neurons, transposed convolutions throughout). The rewrite must
# give the same bounds: it changes how much is computed, not what.
_REFERENCE = [
    (
        [
            [-77.6925056546, -126.8432328105, -199.9460552716, -122.7945033383, -92.8670620371],
            [-62.6863074701, -122.1004042048, -190.0240165808, -152.6664047399, -60.6992158308],
            [-59.0766116668, -121.0093312718, -195.2406613614, -171.3999484419, -76.1380900406],
        ],
        [
            [223.5102321336, 217.4828410759, 59.2424214282, 136.3178057075, 169.9027386068],
            [186.1727276424, 196.2522275901, 45.7747049118, 128.0500843174, 150.6332255498],
            [215.7308470076, 217.7240302854, 69.1583162151, 138.0606578212, 167.3382266861],
        ],
    ),
    (
        [
            [-19.5703562643, -13.9030414477, -28.5519499963, -17.3529730797, -18.6466527542],
            [-19.7232633928, -8.3511371633, -16.6793086062, -9.7384571612, -8.9865057346],
            [-26.6282254641, -12.2713250885, -22.1358032372, -14.435064565, -8.7397189214],
        ],
        [
            [13.8112765356, 22.2262516876, 13.095293567, 13.8071568709, 29.094034136],
            [10.6291972991, 16.6300481192, 6.8987638631, 9.3866434792, 22.2369656616],
            [7.8436736223, 18.9812233436, 9.7678173489, 12.3488175706, 28.1523483382],
        ],
    ),
]


def _reference_nets() -> list[tuple[Network, Tensor, Tensor]]:
    g = torch.Generator().manual_seed(7)
    models = [
        zoo.cnn([2, 10, 10], 5, channels=(4, 6), hidden=12, mean=0.4, std=0.3),
        nn.Sequential(
            nn.Conv2d(2, 5, 4, stride=2, padding=1),
            nn.ReLU(),
            nn.Conv2d(5, 6, 3, stride=1, padding=1),
            nn.ReLU(),
            nn.Conv2d(6, 6, 3, stride=2, padding=2, dilation=2, groups=2),
            nn.ReLU(),
            nn.Flatten(),
            nn.Linear(6 * 3 * 3, 7),
            nn.ReLU(),
            nn.Linear(7, 5),
        ),
    ]
    out = []
    for m in models:
        for p in m.parameters():
            p.data.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64).float() * 0.5)
        m.double().eval()
        net = Network.from_module(m, (2, 10, 10))
        x = torch.rand(3, 2, 10, 10, generator=g, dtype=torch.float64)
        out.append((net, (x - 0.05).clamp(0, 1), (x + 0.05).clamp(0, 1)))
    return out


@pytest.mark.parametrize("tiles", [None, 2])
def test_crown_matches_previous_implementation(tiles: int | None, monkeypatch: pytest.MonkeyPatch) -> None:
    from bastion.verify import crown as crown_module

    monkeypatch.setattr(crown_module, "_TILES", tiles)
    for (net, lo, hi), (ref_lo, ref_hi) in zip(_reference_nets(), _REFERENCE):
        for method in ("crown", "deeppoly"):
            res = compute_bounds(net, lo, hi, method=method)
            expected_lo = torch.tensor(ref_lo, dtype=torch.float64)
            expected_hi = torch.tensor(ref_hi, dtype=torch.float64)
            torch.testing.assert_close(res.lower, expected_lo, atol=2e-9, rtol=1e-10)
            torch.testing.assert_close(res.upper, expected_hi, atol=2e-9, rtol=1e-10)


@pytest.mark.parametrize(
    "stride,padding,dilation,groups", [(1, 1, 1, 1), (2, 1, 1, 1), (1, 0, 2, 1), (2, 2, 1, 3), (3, 1, 2, 3)]
)
def test_conv_backward_and_onehot_step_are_the_adjoint(stride: int, padding: int, dilation: int, groups: int) -> None:
    g = torch.Generator().manual_seed(stride * 7 + padding * 3 + dilation + groups)
    conv = nn.Conv2d(3, 6, 3, stride=stride, padding=padding, dilation=dilation, groups=groups).double()
    randomise(conv, g)
    net = Network.from_module(conv, (3, 9, 8))
    name = net.output_name
    op = net.nodes[name].op
    assert isinstance(op, Conv2dOp)
    # The adjoint by autograd: A . conv(x) = (conv^T A) . x + A . bias.
    x = torch.randn(2, 3, 9, 8, dtype=torch.float64, requires_grad=True)
    A = torch.randn(2, 4, *op.out_shape, generator=g, dtype=torch.float64)
    back, bias = op.backward(A)
    for r in range(4):
        (grad,) = torch.autograd.grad((conv(x) * A[:, r]).sum(), x)
        torch.testing.assert_close(back[0][:, r], grad)
    torch.testing.assert_close(bias, (A * conv.bias.view(1, 1, -1, 1, 1)).flatten(2).sum(-1))
    # The one-hot shortcut equals the backward of the one-hot rows, padding rows included.
    p = A[0, 0].numel()
    need = torch.rand(2, p, generator=g) > 0.6
    idx, valid = select_rows(need)
    step = _onehot_step(net, name, idx, valid)
    assert step is not None
    eye = torch.zeros(2, idx.shape[1], p, dtype=torch.float64).scatter_(
        2, idx.unsqueeze(-1), valid.unsqueeze(-1).double()
    )
    dense, dense_bias = op.backward(eye.reshape(2, idx.shape[1], *op.out_shape))
    torch.testing.assert_close(step[0][0], dense[0])
    torch.testing.assert_close(step[1], dense_bias)


class _TwoBranch(nn.Module):
    """conv -> act -> (conv | conv) summed and subtracted, with spatially varying constants: every window rule."""

    def __init__(self, act: nn.Module, pool: nn.Module, size: int) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(2, 3, 3, padding=1)
        self.act = act
        self.pool = pool
        self.c2 = nn.Conv2d(3, 4, 3, padding=1)
        self.c3 = nn.Conv2d(3, 4, 1)
        self.c4 = nn.Conv2d(4, 3, 3, stride=2, padding=1)
        self.c5 = nn.Conv2d(3, 2, 2, stride=1, padding=1, dilation=2)
        side = (size - 1) // 2 + 1  # after c4 (stride 2); c5 keeps the size
        self.head = nn.Linear(2 * side * side, 3)
        self.register_buffer("grid", torch.linspace(0.5, 1.5, size * size).reshape(1, size, size))

    def forward(self, x: Tensor) -> Tensor:
        h = self.pool(self.act(self.c1(x)))
        h = self.act(self.c2(h) + self.c3(h) * 0.5 - self.c3(h) * self.grid)
        h = self.act(self.c4(h) + 0.1)
        return self.head(self.act(self.c5(h)).flatten(1))


@pytest.mark.parametrize("kind", ["relu", "leaky", "tanh"])  # sigmoid shares tanh's code path
def test_windowed_conv_rows_equal_dense_and_sound(kind: str, monkeypatch: pytest.MonkeyPatch) -> None:
    from bastion.verify import crown as crown_module

    pools = [(nn.MaxPool2d(2, stride=1, padding=1), 7), (nn.Identity(), 6), (nn.AvgPool2d(2, stride=1), 5)]
    for seed, (pool, size) in enumerate(pools):
        g = torch.Generator().manual_seed(40 + seed)
        model = _TwoBranch(act(kind, g), pool, size)
        randomise(model, g)
        net = Network.from_module(model, (2, 6, 6))
        lo, hi = _box((2, 6, 6), 3, g)
        C = torch.randn(3, 2, 3, generator=g, dtype=torch.float64)
        method = "crown" if seed % 2 == 0 else "deeppoly"
        # Force tiling (the automatic choice may keep such small maps dense).
        monkeypatch.setattr(crown_module, "_TILES", 2 + seed % 2)
        windowed = compute_bounds(net, lo, hi, C=C, method=method)
        monkeypatch.setattr(crown_module, "_TILES", None)
        monkeypatch.setattr(crown_module, "_WINDOWS", False)
        dense = compute_bounds(net, lo, hi, C=C, method=method)
        monkeypatch.setattr(crown_module, "_WINDOWS", True)
        torch.testing.assert_close(windowed.lower, dense.lower, atol=1e-9, rtol=1e-9)
        torch.testing.assert_close(windowed.upper, dense.upper, atol=1e-9, rtol=1e-9)
        for name, (dl, dh) in dense.intermediate.items():
            torch.testing.assert_close(windowed.intermediate[name][0], dl, atol=1e-9, rtol=1e-9)
            torch.testing.assert_close(windowed.intermediate[name][1], dh, atol=1e-9, rtol=1e-9)
        _assert_sound(
            windowed, spec_values(net, box_samples(lo, hi, 400, g), C), f"windowed {method}, {kind}, seed {seed}"
        )


def test_select_rows_per_sample() -> None:
    need = torch.tensor([[False, True, True, False], [True, False, False, False], [False, False, False, False]])
    idx, valid = select_rows(need)
    assert idx.shape == (3, 2)
    assert idx[0].tolist() == [1, 2] and idx[1, 0].item() == 0
    assert valid.tolist() == [[True, True], [True, False], [False, False]]


def test_crown_ibp_between_ibp_and_crown_final_pass() -> None:
    model = randomise(zoo.mlp([5], 3, hidden=[16, 16, 16]), torch.Generator().manual_seed(11))
    net = Network.from_module(model, (5,))
    g = torch.Generator().manual_seed(12)
    lo = torch.randn(6, 5, generator=g, dtype=torch.float64)
    hi = lo + 0.4
    ibp = compute_bounds(net, lo, hi, method="ibp")
    cibp = compute_bounds(net, lo, hi, method="crown-ibp")
    crown = compute_bounds(net, lo, hi, method="crown")
    vals = spec_values(net, box_samples(lo, hi, 2000, g), torch.eye(3, dtype=torch.float64).expand(6, 3, 3))
    _assert_sound(cibp, vals, "crown-ibp")
    # Its intermediate bounds are IBP's, and its final pass strictly helps somewhere.
    for name, (l_i, h_i) in ibp.intermediate.items():
        torch.testing.assert_close(cibp.intermediate[name][0], l_i)
        torch.testing.assert_close(cibp.intermediate[name][1], h_i)
    assert float((cibp.upper - cibp.lower).mean()) < float((ibp.upper - ibp.lower).mean())
    assert float((crown.upper - crown.lower).mean()) <= float((cibp.upper - cibp.lower).mean()) + 1e-12
    assert compute_bounds(net, lo, hi, method="CROWN_IBP").lower.shape == (6, 3)


def test_alpha_intermediate_sound_and_tighter() -> None:
    gain = 0.0
    for seed in range(6):
        kind = "relu" if seed % 2 == 0 else "leaky"
        model, shape = _random_fc(seed, kind) if seed < 4 else _random_conv(seed, kind)
        net = Network.from_module(model, shape)
        g = torch.Generator().manual_seed(300 + seed)
        lo, hi = _box(shape, 3, g)
        C = torch.randn(3, 2, net.output_shape[0], generator=g, dtype=torch.float64)
        crown = compute_bounds(net, lo, hi, C=C, method="crown")
        plain = compute_bounds(net, lo, hi, C=C, method="alpha-crown", options=BoundOptions(alpha_steps=10))
        opts = BoundOptions(alpha_steps=10, alpha_intermediate=True)
        joint = compute_bounds(net, lo, hi, C=C, method="alpha-crown", options=opts)
        vals = spec_values(net, box_samples(lo, hi, 600, g), C)
        _assert_sound(joint, vals, f"alpha-crown with intermediate slopes, seed {seed}")
        assert bool((joint.lower >= crown.lower - 1e-10).all()) and bool((joint.upper <= crown.upper + 1e-10).all())
        for name, (cl, ch) in crown.intermediate.items():
            jl, jh = joint.intermediate[name]
            assert bool((jl >= cl - 1e-10).all()) and bool((jh <= ch + 1e-10).all())
        # Intermediate bounds must contain every sampled pre-activation too.
        x = box_samples(lo, hi, 300, g)
        values = net.forward_all(x.reshape(-1, *shape))
        for name, (jl, jh) in joint.intermediate.items():
            pre = values[net.nodes[name].inputs[0]].reshape(3, x.shape[1], -1)
            assert bool((pre >= jl.reshape(3, 1, -1) - 1e-9).all()) and bool((pre <= jh.reshape(3, 1, -1) + 1e-9).all())
        gain += float((plain.upper - plain.lower).sum() - (joint.upper - joint.lower).sum())
    assert gain > 0, "optimising the intermediate slopes should tighten the bounds overall"


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
