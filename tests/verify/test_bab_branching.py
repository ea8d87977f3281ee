"""Filtered smart branching (FSB) in ReLU branch and bound: sound, never a worse pick than BaBSR, validated."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor

import bastion.verify.bab as bab
from bastion.errors import InputError
from bastion.verify.bab import verify, verify_box
from bastion.verify.ir import Network
from bastion.verify.milp import milp_minimum
from bastion.verify.ops import LeakyReLUOp
from bastion.verify.spec import Region, Spec

from .test_bab import FAST, _assert_agrees, _conjunction
from .test_bab_warm import _domains, _wide
from .test_milp import random_box, random_net

SOUND_CASES = [(arch, seed) for arch in ("fc", "leaky", "conv", "residual") for seed in range(100, 106)]


@pytest.mark.parametrize(("arch", "seed"), SOUND_CASES, ids=[f"{a}-{s}" for a, s in SOUND_CASES])
def test_fsb_agrees_with_milp(arch: str, seed: int) -> None:
    """FSB ReLU splitting on small random nets: the exact MILP's answer on every decided property, never a proof
    where MILP or the attack has a counterexample."""
    model, shape = random_net(arch, seed)
    net = Network.from_module(model, shape)
    lo, hi = random_box(shape, seed)
    A, b, margin = _conjunction(net, lo, hi, seed)
    v = verify_box(model, lo, hi, A, b, timeout=30, method="relu", input_shape=shape, branching="fsb", **FAST)
    _assert_agrees(v, margin, model, lo, hi, A, b)


@pytest.mark.parametrize("seed", range(6))
def test_fsb_agrees_with_milp_on_wider_nets(seed: int) -> None:
    """Nets with enough unstable ReLUs that FSB's candidates differ from BaBSR's; margins of +-0.05 either way."""
    model, net, lo, hi = _wide(20 + seed)
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(1, 3, generator=g, dtype=torch.float64)
    exact = milp_minimum(net, lo, hi, A[0])[0]
    b = torch.tensor([exact + (0.05 if seed % 2 else -0.05)], dtype=torch.float64)
    v = verify_box(model, lo, hi, A, b, timeout=30, method="relu", input_shape=(6,), attack_steps=0, alpha_steps=5,
                   batch_size=16, branching="fsb")  # fmt: skip
    want = "falsified" if exact < float(b[0]) else "verified"
    assert v.status == want, f"exact margin {exact - float(b[0])}, FSB BaB said {v.status}"
    if want == "verified":
        assert v.lower_bound is not None and 0 < v.lower_bound <= exact - float(b[0]) + 1e-6


def _parents(seed: int, n: int) -> tuple[bab._Conj, list[str], dict, dict, dict, dict, Tensor]:
    _, net, lo, hi = _wide(seed)
    conj, splits, pre = _domains(net, lo, hi, n, seed)
    _, _, alphas, betas = bab._beta_crown(conj, pre, splits, 3)
    relus = [m for m, node in net.nodes.items() if isinstance(node.op, LeakyReLUOp)]
    return conj, relus, splits, pre, alphas, betas, torch.zeros(n, dtype=torch.int64)


def _flat(pre: dict, relus: list[str], layer: Tensor, offset: Tensor) -> Tensor:
    sizes = torch.tensor([pre[r][0][0].numel() for r in relus])
    return (sizes.cumsum(0) - sizes)[layer] + offset


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_fsb_choice_never_scores_below_babsr(seed: int) -> None:
    """Under the same cheap evaluation, FSB's split scores at least as high as BaBSR's and is the best of its
    candidates; on some domains it is a different, strictly better neuron (else FSB would be BaBSR)."""
    n = 12
    conj, relus, splits, pre, alphas, betas, rows = _parents(seed, n)
    lf, of, has = bab._branch_fsb(conj, relus, pre, rows, splits, alphas, betas, 3)
    lb_, ob, has_b = bab._branch(conj, relus, pre, rows)
    assert torch.equal(has, has_b) and bool(has.all())
    dom = torch.arange(n)
    score_fsb = bab._fsb_score(
        *bab._fsb_evaluate(conj, relus, pre, splits, alphas, betas, dom, _flat(pre, relus, lf, of))
    )
    score_babsr = bab._fsb_score(
        *bab._fsb_evaluate(conj, relus, pre, splits, alphas, betas, dom, _flat(pre, relus, lb_, ob))
    )
    assert bool((score_fsb >= score_babsr - 1e-12).all())
    # The chosen neuron is unstable (a stable one would be a wasted split).
    for i in range(n):
        l, u = (t[i].reshape(-1) for t in pre[relus[int(lf[i])]])
        assert float(l[of[i]]) < 0 < float(u[of[i]])
    if seed in (0, 1):
        assert bool((score_fsb > score_babsr + 1e-9).any())


def test_fsb_children_bounds_are_sound() -> None:
    """The cheap child bounds are bounds of the child domains (checked against the exact MILP of each child); a
    sign error in the clamp would show here."""
    conj, relus, splits, pre, alphas, betas, rows = _parents(4, 4)
    lf, of, _ = bab._branch_fsb(conj, relus, pre, rows, splits, alphas, betas, 3)
    act, ina = bab._fsb_evaluate(conj, relus, pre, splits, alphas, betas, torch.arange(4), _flat(pre, relus, lf, of))
    for i in range(4):
        for sign, cheap in ((1, act), (-1, ina)):
            child = {k: v[i].clone() for k, v in splits.items()}
            child[relus[int(lf[i])]].reshape(-1)[of[i]] = sign
            cpre = {k: (lo[i].clone(), hi[i].clone()) for k, (lo, hi) in pre.items()}
            exact = bab.milp_verify(conj.net, (conj.lower[0], conj.upper[0]), conj.A, conj.b, splits=child,
                                    intermediate=cpre, bound_method=None).lower_bound  # fmt: skip
            assert exact is not None and float(cheap[i]) <= exact + 1e-7


#: The hard case: of the 16 nets ``_wide(seed, width=w)``, w in (20, 24), seed 0-7, with margin 0.02, FSB needed fewer
#: sub-domains than BaBSR on all 16; on this one 402 against 754.
HARD_SEED, HARD_WIDTH = 6, 24


def test_fsb_needs_fewer_domains_than_babsr_on_a_hard_case() -> None:
    """A fixed hard property (exact margin +0.02) where FSB's better splits prove it with fewer sub-domains."""
    model, net, lo, hi = _wide(HARD_SEED, width=HARD_WIDTH)
    A = torch.tensor([[1.0, -1.0, 0.0]], dtype=torch.float64)
    exact = milp_minimum(net, lo, hi, A[0])[0]
    b = torch.tensor([exact - 0.02], dtype=torch.float64)
    counts = {}
    for branching in ("babsr", "fsb"):
        v = verify_box(model, lo, hi, A, b, timeout=60, method="relu", input_shape=(6,), attack_steps=0,
                       alpha_steps=5, batch_size=8, branching=branching)  # fmt: skip
        assert v.status == "verified"
        counts[branching] = v.domains
    assert counts["fsb"] < counts["babsr"], counts


def test_bad_branching_is_an_input_error() -> None:
    model, _, lo, hi = _wide(0)
    A, b = torch.tensor([[1.0, -1.0, 0.0]], dtype=torch.float64), torch.zeros(1, dtype=torch.float64)
    with pytest.raises(InputError, match="branching"):
        verify_box(model, lo, hi, A, b, timeout=1, method="relu", input_shape=(6,), branching="random")
    with pytest.raises(InputError, match="branching"):
        verify_box(model, lo, hi, A, b, timeout=1, input_shape=(6,), branching="FSB ")
    spec = Spec([Region(lo, hi, [(A, b)])], num_outputs=3)
    with pytest.raises(InputError, match="branching"):
        verify(model, spec, timeout=1, input_shape=(6,), branching=None)  # type: ignore[arg-type]
