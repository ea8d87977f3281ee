"""Warm-started beta-CROWN, inherited intermediate bounds and the optimised root in ReLU branch and bound."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

import bastion.verify.bab as bab
from bastion.verify.bab import _beta_crown, _bound, _bound_children, _Conj, _crown_alphas, verify_box
from bastion.verify.ir import Network
from bastion.verify.milp import milp_minimum, milp_verify
from bastion.verify.ops import LeakyReLUOp


def _wide(
    seed: int, d: int = 6, width: int = 20, *, depth: int = 2, k: int = 3, radius: float = 0.4
) -> tuple[nn.Module, Network, Tensor, Tensor]:
    """A ``depth``-hidden-layer ReLU net with enough unstable neurons on its box that ReLU splitting has work to do."""
    g = torch.Generator().manual_seed(seed)
    layers: list[nn.Module] = [nn.Linear(d, width), nn.ReLU()]
    for _ in range(depth - 1):
        layers += [nn.Linear(width, width), nn.ReLU()]
    model = nn.Sequential(*layers, nn.Linear(width, k))
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) / p.shape[-1] ** 0.5)
    model = model.double().eval()
    centre = torch.rand(d, generator=g, dtype=torch.float64) * 2 - 1
    lo, hi = centre - radius, centre + radius
    return model, Network.from_module(model, (d,)), lo, hi


def _settings() -> bab._Settings:
    return bab._settings(
        batch_size=64, max_domains=10_000, bound_method="crown", root_method="crown", input_split_threshold=0,
        milp_threshold=0, attack_restarts=4, attack_steps=10, alpha_steps=5, beta_steps=5, seed=0,
    )  # fmt: skip


def _domains(net: Network, lo: Tensor, hi: Tensor, n: int, seed: int) -> tuple[_Conj, dict, dict]:
    """``n`` sub-domains, each with a few random splits of root-unstable neurons, and their CROWN bounds."""
    A = torch.tensor([[1.0, -1.0, 0.0]], dtype=torch.float64)
    conj = _Conj(net, lo.reshape(1, -1), hi.reshape(1, -1), A, torch.zeros(1, dtype=torch.float64))
    _, _, pre = _bound(conj, conj.lower, conj.upper, "crown", _settings())
    g = torch.Generator().manual_seed(seed)
    splits = {}
    for name, node in net.nodes.items():
        if isinstance(node.op, LeakyReLUOp):
            l, u = pre[name]
            unstable = ((l < 0) & (u > 0)).expand(n, -1)
            pick = torch.rand(unstable.shape, generator=g) < 0.3
            sign = torch.where(torch.rand(unstable.shape, generator=g) < 0.5, 1, -1)
            splits[name] = torch.where(unstable & pick, sign, 0).to(torch.int8)
    box_lo, box_hi = conj.lower.expand(n, -1), conj.upper.expand(n, -1)
    full = {k: (a.expand(n, -1), b.expand(n, -1)) for k, (a, b) in pre.items()}
    _, _, cpre = _bound(conj, box_lo, box_hi, "crown", _settings(), splits=splits, intermediate=full)
    return conj, splits, cpre


def _exact(conj: _Conj, splits: dict, pre: dict, i: int) -> float:
    v = milp_verify(
        conj.net,
        (conj.lower[0], conj.upper[0]),
        conj.A,
        conj.b,
        splits={k: s[i] for k, s in splits.items()},
        intermediate={k: (lo[i], hi[i]) for k, (lo, hi) in pre.items()},
        bound_method=None,
    )
    assert v.lower_bound is not None
    return v.lower_bound


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_warm_start_is_sound_and_never_below_its_starting_point(seed: int) -> None:
    _, net, lo, hi = _wide(seed)
    conj, splits, pre = _domains(net, lo, hi, 6, seed)
    cold, _, alphas, betas = _beta_crown(conj, pre, splits, 10)
    at_start, _, _, _ = _beta_crown(conj, pre, splits, 0, init=(alphas, betas))
    warm, _, _, _ = _beta_crown(conj, pre, splits, 10, init=(alphas, betas))
    assert bool((warm >= at_start - 1e-12).all())
    # The warm start keeps what the first run found: 10 + 10 steps end no lower than the last point of 10.
    assert bool((warm >= cold - 1e-6).any())
    # Float32-rounded warm starts (how the pool stores them) and off-range values are projected: still sound.
    rough = ({k: (v.float() * 3 - 1) for k, v in alphas.items()}, {k: v.float() - 0.5 for k, v in betas.items()})
    odd, _, _, _ = _beta_crown(conj, pre, splits, 3, init=rough)
    for i in range(6):
        exact = _exact(conj, splits, pre, i)
        for bound in (cold, warm, odd):
            assert float(bound[i]) <= exact + 1e-7, f"domain {i}: bound {float(bound[i])} above the exact {exact}"


def test_warm_start_beats_cold_start_at_equal_steps() -> None:
    """Two rounds of 3 steps from a warm start reach at least as high as a fresh 3-step run, on most domains."""
    _, net, lo, hi = _wide(3)
    conj, splits, pre = _domains(net, lo, hi, 16, 3)
    first, _, alphas, betas = _beta_crown(conj, pre, splits, 3)
    warm, _, _, _ = _beta_crown(conj, pre, splits, 3, init=(alphas, betas))
    cold, _, _, _ = _beta_crown(conj, pre, splits, 3)
    assert torch.equal(cold, first)
    assert float((warm - cold).sum()) > 0 and bool((warm >= cold - 1e-9).float().mean() >= 0.75)


@pytest.mark.parametrize("seed", [0, 1])
def test_last_layer_children_reuse_is_lossless(seed: int) -> None:
    """A child split in the last ReLU layer gets the same bounds from its parent's as from recomputing them."""
    _, net, lo, hi = _wide(seed)
    conj, splits, pre = _domains(net, lo, hi, 4, seed)
    relus = [n for n, node in net.nodes.items() if isinstance(node.op, LeakyReLUOp)]
    last = relus[-1]
    child = {k: v.clone() for k, v in splits.items()}
    free = (pre[last][0] < 0) & (pre[last][1] > 0) & (child[last] == 0)
    for i in range(4):
        j = int(free[i].nonzero()[0])
        child[last][i, j] = 1 if i % 2 else -1
    layer = torch.full((4,), len(relus) - 1)
    old = bab.REUSE_ALL
    try:
        bab.REUSE_ALL = False
        lb_reuse, _, pre_reuse = _bound_children(conj, _settings(), relus, child, pre, layer)
    finally:
        bab.REUSE_ALL = old
    lb_full, _, pre_full = _bound(conj, conj.lower.expand(4, -1), conj.upper.expand(4, -1), "crown", _settings(),
                                  splits=child, intermediate=pre)  # fmt: skip
    assert torch.allclose(lb_reuse, lb_full, atol=1e-10)
    for k in pre_full:
        assert torch.allclose(pre_reuse[k][0], pre_full[k][0], atol=1e-10)
        assert torch.allclose(pre_reuse[k][1], pre_full[k][1], atol=1e-10)


def test_crown_alphas_are_crowns_choice() -> None:
    _, net, lo, hi = _wide(0)
    conj, _, pre = _domains(net, lo, hi, 2, 0)
    for name, a in _crown_alphas(conj, pre).items():
        l, u = pre[name]
        assert a.shape == (2, 1, *l.shape[1:])
        assert torch.equal(a[:, 0], (u > -l).to(a.dtype))


@pytest.mark.parametrize(("warm", "reuse_all", "root_opt"), [(True, True, True), (False, False, False)])
@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_relu_bab_agrees_with_milp_on_wider_nets(warm: bool, reuse_all: bool, root_opt: bool, seed: int) -> None:
    """ReLU splitting with every combination of the mechanisms against the exact MILP margin (0 wrong answers)."""
    model, net, lo, hi = _wide(10 + seed)
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(1, 3, generator=g, dtype=torch.float64)
    exact = milp_minimum(net, lo, hi, A[0])[0]
    b = torch.tensor([exact + (0.05 if seed % 2 else -0.05)], dtype=torch.float64)
    old = (bab.WARM_START, bab.REUSE_ALL)
    try:
        bab.WARM_START, bab.REUSE_ALL = warm, reuse_all
        v = verify_box(model, lo, hi, A, b, timeout=30, method="relu", input_shape=(6,), attack_steps=0,
                       alpha_steps=5, batch_size=16, optimize_intermediate=root_opt)  # fmt: skip
    finally:
        bab.WARM_START, bab.REUSE_ALL = old
    want = "falsified" if exact < float(b[0]) else "verified"
    assert v.status == want, f"exact margin {exact - float(b[0])}, BaB said {v.status}"
    if want == "verified":
        assert v.lower_bound is not None and 0 < v.lower_bound <= exact - float(b[0]) + 1e-6
