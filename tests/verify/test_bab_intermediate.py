"""Branch and bound with the root's intermediate slopes optimised once per region and shared by its disjuncts."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

import bastion.verify.bab as bab
from bastion.errors import InputError
from bastion.verify.bab import verify
from bastion.verify.bounds import BoundOptions, compute_bounds
from bastion.verify.ir import Network
from bastion.verify.milp import milp_minimum
from bastion.verify.spec import Region, Spec

from .test_bab_warm import _wide


def _deep(seed: int) -> tuple[nn.Module, Network, Tensor, Tensor]:
    """A 3-hidden-layer ReLU net (two layers whose bounds alpha-CROWN can tighten) and a box around a point."""
    return _wide(seed, width=16, depth=3, k=4, radius=0.3)


def _robustness(net: Network, lo: Tensor, hi: Tensor, shift: float, break_one: bool) -> tuple[list, list[float]]:
    """Unsafe disjuncts ``y_label - y_j <= c_j`` (one per other class) with ``c_j`` the exact minimum minus
    ``shift`` (unreachable), or plus ``shift`` for the first of them when ``break_one`` (reachable)."""
    with torch.no_grad():
        label = int(net.forward(((lo + hi) / 2).reshape(1, -1)).argmax())
    unsafe, exact = [], []
    for j in range(4):
        if j == label:
            continue
        a = torch.zeros(1, 4, dtype=torch.float64)
        a[0, label], a[0, j] = 1.0, -1.0
        m = milp_minimum(net, lo, hi, a[0])[0]
        c = m + shift if (break_one and not unsafe) else m - shift
        unsafe.append((a, torch.tensor([c], dtype=torch.float64)))
        exact.append(m - c)
    return unsafe, exact


@pytest.mark.parametrize("shared", [True, False])
@pytest.mark.parametrize("seed", range(6))
def test_verify_agrees_with_milp_with_and_without_shared_bounds(shared: bool, seed: int) -> None:
    """Robustness-style specs on 3-hidden-layer nets: the verdict is the exact MILP's (0 wrong answers)."""
    model, net, lo, hi = _deep(seed)
    unsafe, exact = _robustness(net, lo, hi, 0.05, break_one=seed % 2 == 1)
    spec = Spec([Region(lo, hi, unsafe)], num_outputs=4)
    v = verify(model, spec, timeout=60, input_shape=(6,), method="relu", alpha_steps=5, batch_size=16,
               optimize_intermediate=shared)  # fmt: skip
    want = "falsified" if min(exact) < 0 else "verified"
    assert v.status == want, f"exact margins {exact}, verify said {v.status}"
    if want == "verified":
        assert v.lower_bound is not None and 0 < v.lower_bound <= min(exact) + 1e-6
    else:
        assert v.counterexample is not None
        x = v.counterexample.reshape(-1).to(torch.float64)
        assert bool((x >= lo - 1e-9).all()) and bool((x <= hi + 1e-9).all())
        with torch.no_grad():
            y = model(x.reshape(1, -1))[0]
        assert any(float(a[0] @ y) <= float(b[0]) + 1e-9 for a, b in unsafe)


@pytest.mark.parametrize("seed", range(4))
def test_region_bounds_are_shared_sound_and_tighter(seed: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every open disjunct of a region starts from the same intermediate bounds; they hold for sampled inputs and
    lie inside CROWN's."""
    model, net, lo, hi = _deep(seed)
    unsafe, _ = _robustness(net, lo, hi, -0.5, break_one=False)  # c_j = exact + 0.5: hard to prove, kept open
    seen: list[bab._Conj] = []

    def record(conj: bab._Conj, *args: object) -> bab.Verdict:
        seen.append(conj)
        return bab.Verdict("unknown", None, None, None, 0.0, "test", 0)

    monkeypatch.setattr(bab, "_decide", record)
    monkeypatch.setattr(bab, "_attack", lambda *args: None)  # keep every disjunct open
    verify(model, Spec([Region(lo, hi, unsafe)], num_outputs=4), timeout=30, input_shape=(6,))
    assert len(seen) == len(unsafe)
    pre = seen[0].pre
    assert pre is not None and all(c.pre is pre for c in seen)
    crown = compute_bounds(seen[0].net, lo.reshape(1, -1), hi.reshape(1, -1), options=BoundOptions(method="crown"))
    g = torch.Generator().manual_seed(seed)
    xs = lo + (hi - lo) * torch.rand(4000, 6, generator=g, dtype=torch.float64)
    with torch.no_grad():
        values = seen[0].net.forward_all(xs)
    narrower = 0.0
    for name, (l, u) in pre.items():
        z = values[seen[0].net.nodes[name].inputs[0]]
        assert bool((z >= l - 1e-9).all()) and bool((z <= u + 1e-9).all()), name
        cl, cu = crown.intermediate[name]
        assert bool((l >= cl - 1e-9).all()) and bool((u <= cu + 1e-9).all()), name
        narrower += float(((cu - cl) - (u - l)).sum())
    assert narrower > 0


def test_bad_optimize_intermediate_is_an_input_error() -> None:
    model, _, lo, hi = _deep(0)
    spec = Spec([Region(lo, hi, [(torch.eye(4)[:1], torch.zeros(1))])], num_outputs=4)
    with pytest.raises(InputError, match="optimize_intermediate"):
        verify(model, spec, timeout=5, input_shape=(6,), optimize_intermediate="yes")  # type: ignore[arg-type]
