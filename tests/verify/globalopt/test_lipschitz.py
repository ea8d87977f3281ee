"""Sound Lipschitz constants: never below a sampled gradient norm or slope, exact on linear maps, bad input refused."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

from bastion.errors import InputError
from bastion.verify.globalopt.lipschitz import estimate_lipschitz, gradient_interval, lipschitz_constant
from bastion.verify.ir import Network

from ..nets import affine_case, random_box, random_conv, random_fc, randomise

NORMS = ("linf", "l2", "l1")
KINDS = ("relu", "leaky", "sigmoid", "tanh")


def _dual(v: Tensor, norm: str) -> Tensor:
    return {"linf": v.abs().sum(-1), "l2": v.norm(dim=-1), "l1": v.abs().amax(-1)}[norm]


def _primal(v: Tensor, norm: str) -> Tensor:
    return {"linf": v.abs().amax(-1), "l2": v.norm(dim=-1), "l1": v.abs().sum(-1)}[norm]


def _sampled(net: Network, lo: Tensor, hi: Tensor, C: Tensor, g: torch.Generator, s: int = 150) -> dict[str, Tensor]:
    """Per norm, (N, m): the largest sampled gradient dual norm and slope ``|g(x) - g(y)| / ||x - y||`` over random
    pairs of points of the box (uniform, vertices, and near pairs that probe kinks)."""
    n, m = C.shape[:2]
    shape = lo.shape[1:]
    u = torch.rand(n, 2 * s, *shape, generator=g, dtype=lo.dtype)
    u[:, : s // 3] = (u[:, : s // 3] > 0.5).to(lo.dtype)
    u[:, s : s + s // 3] = (u[:, : s // 3] + 1e-3 * torch.randn(n, s // 3, *shape, generator=g)).clamp(0, 1)
    x = (lo.unsqueeze(1) + u * (hi - lo).unsqueeze(1)).reshape(n * 2 * s, *shape).requires_grad_(True)
    vals = torch.einsum("nsk,nmk->nsm", net(x).reshape(n, 2 * s, -1), C)
    grads = torch.stack(
        [torch.autograd.grad(vals[:, :, i].sum(), x, retain_graph=True)[0].reshape(n, 2 * s, -1) for i in range(m)],
        2,
    )  # (N, S, m, D)
    v = vals.detach()
    xa, xb = x.detach().reshape(n, 2 * s, -1)[:, :s], x.detach().reshape(n, 2 * s, -1)[:, s:]
    out = {}
    for norm in NORMS:
        gn = _dual(grads, norm).amax(1)
        dist = _primal(xa - xb, norm).unsqueeze(-1)
        # pairs closer than 1e-6 would let float64 rounding of the values (~1e-15) dominate the slope
        slopes = torch.where(dist > 1e-6, (v[:, :s] - v[:, s:]).abs() / dist.clamp(min=1e-6), 0.0).amax(1)
        out[norm] = torch.maximum(gn, slopes)
    return out


def _networks(count: int) -> list[tuple[str, nn.Module, tuple[int, ...]]]:
    out = []
    for seed in range(count):
        kind = KINDS[seed % 4]
        model, shape = random_conv(seed, kind) if seed % 5 == 4 else random_fc(seed, kind)
        out.append((f"seed{seed}-{kind}", model, shape))
    return out


def _check_sound(count: int) -> None:
    tighter = 0
    for i, (name, model, shape) in enumerate(_networks(count)):
        net = Network.from_module(model, shape)
        g = torch.Generator().manual_seed(1000 + i)
        lo, hi = random_box(shape, 3, g)
        C = torch.randn(3, 2, net.output_shape[0], generator=g, dtype=torch.float64)
        seen = _sampled(net, lo, hi, C, g)
        ok = True
        for norm in NORMS:
            k_int = lipschitz_constant(net, lo, hi, C, norm=norm)
            k_norm = lipschitz_constant(net, lo, hi, C, norm=norm, method="norms")
            assert k_int.shape == (3, 2) and bool((k_int >= 0).all())
            assert bool((seen[norm] <= k_int * (1 + 1e-9) + 1e-8).all()), f"interval below a sample: {name} {norm}"
            assert bool((seen[norm] <= k_norm * (1 + 1e-9) + 1e-8).all()), f"norms below a sample: {name} {norm}"
            ok &= bool((k_int <= k_norm + 1e-12).all())
        tighter += int(ok)
    assert tighter >= 0.85 * count, f"interval tighter than norms on only {tighter}/{count} networks"


def test_sound_against_sampled_gradients_and_slopes() -> None:
    """On 40 random networks (ReLU, LeakyReLU with negative slopes, sigmoid, tanh; FC with batch norm and
    residual blocks; conv with max/avg pooling), for linf/l2/l1, both sound methods bound every sampled gradient
    dual norm and secant slope; interval is at most norms on most networks."""
    _check_sound(40)


@pytest.mark.slow
def test_sound_on_many_networks() -> None:
    """The same on 300 networks."""
    _check_sound(300)


@pytest.mark.parametrize("norm", NORMS)
def test_exact_on_linear_maps(norm: str) -> None:
    """Three stacked linear layers: the interval constant is the dual norm of ``C W`` (exact); the norm product is
    an upper bound of it, and exact on a single linear layer."""
    g = torch.Generator().manual_seed(3)
    net, lo, hi, C, _, _ = affine_case(g)
    lin = [node.op for node in net.nodes.values() if hasattr(node.op, "weight")]
    W = lin[2].weight @ lin[1].weight @ lin[0].weight
    exact = _dual(C @ W, norm)
    torch.testing.assert_close(lipschitz_constant(net, lo, hi, C, norm=norm), exact, rtol=1e-12, atol=1e-12)
    assert bool((lipschitz_constant(net, lo, hi, C, norm=norm, method="norms") >= exact * (1 - 1e-12)).all())
    one = nn.Linear(4, 3)
    randomise(one, g)  # in place (float64, eval mode); keeps the Linear type for the weight below
    W1 = one.weight.detach()
    got = lipschitz_constant(one, lo, hi, C, norm=norm, method="norms")
    torch.testing.assert_close(got, _dual(C @ W1, norm), rtol=1e-12, atol=1e-12)
    # the sampled estimate is exact on a linear map too (every gradient is the same)
    est = estimate_lipschitz(net, lo, hi, C, norm=norm, n_samples=8, seed=1)
    torch.testing.assert_close(est, exact, rtol=1e-9, atol=1e-12)


def test_zero_width_box_gives_the_gradient_norm() -> None:
    """On a point (zero-width box) of a ReLU network with no neuron at its kink the constant is ``||∇g||_q``."""
    for seed in range(12):
        model, shape = random_fc(seed, "relu")
        net = Network.from_module(model, shape)
        g = torch.Generator().manual_seed(seed)
        x = torch.randn(2, *shape, generator=g, dtype=torch.float64)
        C = torch.randn(2, 2, 3, generator=g, dtype=torch.float64)
        xg = x.clone().requires_grad_(True)
        vals = torch.einsum("nk,nmk->nm", net(xg), C)
        grads = torch.stack([torch.autograd.grad(vals[:, i].sum(), xg, retain_graph=True)[0] for i in range(2)], 1)
        g_lo, g_hi = gradient_interval(net, x, x, C)
        torch.testing.assert_close(g_lo, grads, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(g_hi, grads, rtol=1e-10, atol=1e-12)
        for norm in NORMS:
            torch.testing.assert_close(lipschitz_constant(net, x, x, C, norm=norm), _dual(grads, norm))


def test_estimate_is_below_the_sound_bound_and_shrinks_with_the_box() -> None:
    """The sampled estimate never exceeds the sound constant; sub-boxes never get a larger interval constant."""
    for seed in range(10):
        model, shape = random_fc(seed, KINDS[seed % 4])
        g = torch.Generator().manual_seed(seed)
        lo, hi = random_box(shape, 3, g)
        C = torch.randn(2, 3, generator=g, dtype=torch.float64)
        k = lipschitz_constant(model, lo, hi, C)
        est = estimate_lipschitz(model, lo, hi, C, n_samples=64, seed=seed)
        assert bool((est <= k * (1 + 1e-9) + 1e-12).all())
        mid = (lo + hi) / 2
        assert bool((lipschitz_constant(model, lo, mid, C) <= k * (1 + 1e-9) + 1e-12).all())


def test_float32_model_and_dtype() -> None:
    """A float32 model: the result is float32, computed in float64 and still above the float64 samples."""
    model, shape = random_fc(5, "relu")
    model32 = model.float()
    g = torch.Generator().manual_seed(0)
    lo, hi = random_box(shape, 2, g)
    C = torch.randn(2, 3, generator=g)
    k = lipschitz_constant(model32, lo.float(), hi.float(), C)
    assert k.dtype == torch.float32 and k.shape == (2, 2)
    est = estimate_lipschitz(model32, lo.float(), hi.float(), C, n_samples=64)
    assert bool((est <= k * (1 + 1e-5)).all())


def test_bad_input() -> None:
    model, shape = random_fc(1, "relu")
    lo, hi = torch.zeros(2, *shape, dtype=torch.float64), torch.ones(2, *shape, dtype=torch.float64)
    C = torch.ones(1, 3, dtype=torch.float64)
    with pytest.raises(InputError, match="norm"):
        lipschitz_constant(model, lo, hi, C, norm="l0")
    with pytest.raises(InputError, match="unknown norm"):
        lipschitz_constant(model, lo, hi, C, norm="l7")
    with pytest.raises(InputError, match="method"):
        lipschitz_constant(model, lo, hi, C, method="exact")
    with pytest.raises(InputError, match="lower > upper"):
        lipschitz_constant(model, hi, lo, C)
    with pytest.raises(InputError, match="NaN"):
        lipschitz_constant(model, lo * float("nan"), hi, C)
    with pytest.raises(InputError, match="c must have shape"):
        lipschitz_constant(model, lo, hi, torch.ones(1, 4, dtype=torch.float64))
    with pytest.raises(InputError, match="differ in shape"):
        lipschitz_constant(model, lo, hi[:1], C)
    with pytest.raises(InputError, match="model"):
        lipschitz_constant("not a model", lo, hi, C)  # type: ignore[arg-type]
    with pytest.raises(InputError, match="n_samples"):
        estimate_lipschitz(model, lo, hi, C, n_samples=1)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu() -> None:
    model, shape = random_conv(4, "relu")
    g = torch.Generator().manual_seed(0)
    lo, hi = random_box(shape, 2, g)
    C = torch.randn(2, 4, generator=g, dtype=torch.float64)
    cpu = lipschitz_constant(model, lo, hi, C)
    gpu = lipschitz_constant(model.cuda(), lo.cuda(), hi.cuda(), C.cuda())
    assert gpu.device.type == "cuda"
    torch.testing.assert_close(gpu.cpu(), cpu, rtol=1e-9, atol=1e-12)
    est = estimate_lipschitz(model, lo.cuda(), hi.cuda(), C.cuda(), n_samples=32)
    assert est.device.type == "cuda"
