"""MC/DC criteria (ss, sv, vs, vv): known answers on a hand-built network, a brute-force reference, pairs across
batches and across merged parts, resume, bad input and the digits CNN."""

from __future__ import annotations

import itertools

import pytest
import torch
from torch import Tensor, nn

from bastion.errors import InputError
from bastion.testing.coverage import (
    METRICS,
    LayerProbe,
    MCDCCoverage,
    SignSignCoverage,
    SignValueCoverage,
    ValueSignCoverage,
    ValueValueCoverage,
    coverage,
    make_metric,
    measure,
)

from .nets import tiny

LAYERS = ["1", "3"]
CLASSES = [SignSignCoverage, SignValueCoverage, ValueSignCoverage, ValueValueCoverage]


# condition values a (1, 0), b (0, 1), c (1, 1), e (4, 1); decision values (1, 1), (1, 0), (2, 0), (5, 3)
X = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [4.0, 1.0]])


def first_of(metric: MCDCCoverage, x: Tensor = X, batch_size: int = 256) -> list[int]:
    return measure(tiny(), x, [metric], batch_size=batch_size, progress=False)[0].first_covered_by["3"].tolist()


# -- known answers (item = decision * 2 + condition) ------------------------------------------------------------
def test_known_answers() -> None:
    # SS: (a, c) flips c1 alone and d1 -> (c1, d1) = item 3 by input 2; (b, e) flips c0 alone and d1 -> item 2 by 3
    assert first_of(SignSignCoverage(layers=LAYERS)) == [-1, -1, 3, 2]
    # SV: (a, e) flips c1 alone, d0 1 -> 5 and d1 1 -> 3 more than double -> items 1, 3; (b, e): d0 -> item 0;
    # (a, c): d0 1 -> 2 is not more than double
    assert first_of(SignValueCoverage(layers=LAYERS)) == [3, 3, -1, 3]
    # VS / VV: only (c, e) keeps every condition sign; c0 goes 1 -> 4; d1 flips (VS), d0 goes 2 -> 5 (VV)
    assert first_of(ValueSignCoverage(layers=LAYERS)) == [-1, -1, 3, -1]
    assert first_of(ValueValueCoverage(layers=LAYERS)) == [3, -1, -1, -1]
    m = SignSignCoverage(layers=LAYERS)
    first_of(m)
    r = m.report()
    assert (r.covered, r.total, r.per_layer, r.covered_by()) == (2, 4, {"3": (2, 4)}, {2: 1, 3: 1})
    assert m.pair("3", 2) == ("1", 0, 1) and m.pair("3", 1) == ("1", 1, 0)


def test_value_change_threshold() -> None:
    # a threshold of 0.5: d0 1 -> 2 now counts for SV, in (b, c) (c0 flips alone) and (a, c) (c1): input 2
    assert first_of(SignValueCoverage(layers=LAYERS, value_change=0.5)) == [2, 2, -1, 3]
    # a threshold of 4: nothing but 1 -> 5 (d0 of (a, e) and (b, e)) is a value change
    assert first_of(SignValueCoverage(layers=LAYERS, value_change=3.5)) == [3, 3, -1, -1]
    assert first_of(ValueValueCoverage(layers=LAYERS, value_change=3.5)) == [-1, -1, -1, -1]


def test_cond_ratio_relaxes_the_other_conditions() -> None:
    # ratio 1 on two condition neurons: up to 2 may change sign; (a, b) flips both and d1 -> items 2, 3 by input 1
    assert first_of(SignSignCoverage(layers=LAYERS, cond_ratio=1.0)) == [-1, -1, 1, 1]
    assert first_of(SignSignCoverage(layers=LAYERS, cond_ratio=0.5)) == [-1, -1, 3, 2]  # floor(0.5 * 2) = 1: strict
    assert SignSignCoverage(cond_ratio=0.01).max_changes(1000) == 10  # DeepConcolic's default ratio
    assert SignSignCoverage(cond_ratio=0.01).max_changes(150) == 1  # floor(1.5)
    assert SignSignCoverage(cond_ratio=0.29).max_changes(100) == 29  # 0.29 * 100 is 28.999... in floats
    assert SignSignCoverage().max_changes(1000) == 1


def test_batch_order_and_pairs_across_batches() -> None:
    for cls in CLASSES:
        want = first_of(cls(layers=LAYERS))
        assert first_of(cls(layers=LAYERS), batch_size=1) == want  # every pair straddles two batches
        assert first_of(cls(layers=LAYERS), batch_size=3) == want


# -- a brute-force reference on small random networks -----------------------------------------------------------
def reference(vc: Tensor, vd: Tensor, cond: str, dec: str, sigma: float, most: int) -> list[int]:
    """The definitions, pair by pair and neuron by neuron (inputs in index order)."""
    n, pc = vc.shape
    pd = vd.shape[1]
    first = [-1] * (pc * pd)

    def changes(u1: Tensor, u2: Tensor, kind: str) -> list[bool]:
        out = []
        for a, b in zip(u1.tolist(), u2.tolist()):
            flip = (a > 0) != (b > 0)
            out.append(flip if kind == "sign" else (not flip and abs(b - a) > sigma * abs(a)))
        return out

    for j in range(n):
        for i in range(j):
            flips = sum(changes(vc[i], vc[j], "sign"))
            if (cond == "sign" and not 1 <= flips <= most) or (cond == "value" and flips > most - 1):
                continue
            cs, ds = changes(vc[i], vc[j], cond), changes(vd[i], vd[j], dec)
            for c, d in itertools.product(range(pc), range(pd)):
                if cs[c] and ds[d] and first[d * pc + c] < 0:
                    first[d * pc + c] = j
    return first


def random_net(seed: int) -> tuple[nn.Sequential, Tensor]:
    g = torch.Generator().manual_seed(seed)
    net = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=g))
    base = torch.randn(5, 3, generator=g)  # small perturbations of a few points: few neurons flip per pair
    x = (base[torch.arange(20) % 5] + 0.3 * torch.randn(20, 3, generator=g)).contiguous()
    x[7] = x[2]  # a duplicate: no change at all
    return net.eval(), x


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("ratio", [None, 0.5])
def test_matches_brute_force(seed: int, ratio: float | None) -> None:
    net, x = random_net(seed)
    layers = ["1", "3", "4"]  # the logits too, so that there are two layer pairs (4 x 3 and 3 x 2)
    with LayerProbe(net, layers) as probe:
        _, acts = probe.run(x)
    hit = 0
    for cls in CLASSES:
        m = cls(layers=layers, cond_ratio=ratio)
        measure(net, x, [m], batch_size=6, progress=False)
        for cond, dec in (("1", "3"), ("3", "4")):
            want = reference(
                acts[cond], acts[dec], cls.condition, cls.decision, 1.0, m.max_changes(acts[cond].shape[1])
            )
            assert m.report().first_covered_by[dec].tolist() == want, (cls.name, dec)
            hit += sum(w >= 0 for w in want)
    assert hit > 0  # the reference is not trivially empty


# -- merge and resume -------------------------------------------------------------------------------------------
def _acts(net: nn.Module, x: Tensor, layers: list[str]) -> dict[str, Tensor]:
    with LayerProbe(net, layers) as probe:
        return probe.run(x)[1]


def test_merge_pairs_across_parts() -> None:
    # inputs {a, b} and {c, e}: every SS pair straddles the two parts
    a, b = SignSignCoverage(layers=LAYERS), SignSignCoverage(layers=LAYERS)
    for m in (a, b):
        m.bind(tiny())
    a.update(_acts(tiny(), X[:2], LAYERS), torch.tensor([0, 1]))
    b.update(_acts(tiny(), X[2:], LAYERS), torch.tensor([2, 3]))
    assert a.report().covered == 0 and b.report().covered == 0
    for merged in (a.merge(b), b.merge(a)):
        assert merged.report().first_covered_by["3"].tolist() == [-1, -1, 3, 2]
        assert merged.inputs == 4 and merged.history_index.shape[0] == 4
    assert a.report().covered == 0 and a.history_index.tolist() == [0, 1]  # the parts are untouched


@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.name)
def test_merge_resume_and_monotone_on_random_net(cls) -> None:
    net, x = random_net(6)  # a seed where all four criteria cover several pairs
    layers = ["1", "3"]
    whole = cls(layers=layers)
    measure(net, x, [whole], batch_size=5, progress=False)
    want = whole.report().first_covered_by["3"].tolist()
    assert any(w >= 0 for w in want)
    # interleaved parts with global indices
    odd, even = torch.arange(1, 20, 2), torch.arange(0, 20, 2)
    p, q = cls(layers=layers), cls(layers=layers)
    for m, idx in ((p, odd), (q, even)):
        m.bind(net)
        m.update(_acts(net, x[idx], layers), idx)
    assert p.merge(q).report().first_covered_by["3"].tolist() == want
    assert q.merge(p).report().first_covered_by["3"].tolist() == want
    # resume: save after 8 inputs, load into a fresh criterion, add the rest
    half = cls(layers=layers)
    half.bind(net)
    half.update(_acts(net, x[:8], layers))
    resumed = cls(layers=layers)
    resumed.load_state_dict(half.state_dict())
    covered = [resumed.report().covered]
    for s in range(8, 20, 4):
        resumed.update(_acts(net, x[s : s + 4], layers))
        covered.append(resumed.report().covered)
    assert resumed.report().first_covered_by["3"].tolist() == want
    assert covered == sorted(covered)


def test_update_credits_the_later_input() -> None:
    m = SignSignCoverage(layers=LAYERS)
    m.bind(tiny())
    assert m.update(_acts(tiny(), X[:2], LAYERS)).tolist() == [0, 0]
    assert m.update(_acts(tiny(), X[2:], LAYERS)).tolist() == [1, 1]  # c pairs with a, e with b
    # a trial update on a shallow copy (as the generation loop does) leaves the original's history alone
    trial = type(m).__new__(type(m))
    trial.__dict__.update(m.__dict__)
    trial.first = {k: v.clone() for k, v in m.first.items()}
    trial.update(_acts(tiny(), X[:1], LAYERS))
    assert m.history_index.tolist() == [0, 1, 2, 3] and trial.history_index.tolist() == [0, 1, 2, 3, 4]


def test_state_copied_without_history_is_refused() -> None:
    """A copy that takes ``first`` and ``inputs`` only (the generation loop's seed pass) loses the pairing history."""
    m = SignSignCoverage(layers=LAYERS)
    m.bind(tiny())
    fresh = type(m).__new__(type(m))
    fresh.__dict__.update(m.__dict__)
    fresh.update(_acts(tiny(), X[:2], LAYERS))
    m.first, m.inputs = fresh.first, fresh.inputs  # the history stays behind in ``fresh``
    with pytest.raises(InputError, match="counts 2 inputs but keeps the neuron values of 0"):
        m.update(_acts(tiny(), X[2:], LAYERS))
    import copy

    whole = copy.deepcopy(fresh)
    whole.update(_acts(tiny(), X[2:], LAYERS))
    assert whole.report().first_covered_by["3"].tolist() == [-1, -1, 3, 2]
    assert fresh.inputs == 2


# -- bad input --------------------------------------------------------------------------------------------------
def test_registry() -> None:
    for name, cls in zip(("ss", "sv", "vs", "vv"), CLASSES):
        assert METRICS[name] is cls
    with pytest.raises(InputError, match=r"unknown coverage metric 'sss'; choose one of .*ss, sv, vs, vv"):
        make_metric("sss")
    with pytest.raises(InputError, match="has no parameter 'value_change'"):
        make_metric("ss", value_change=2.0)


@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.name)
@pytest.mark.parametrize("ratio", [0, 0.0, -0.2, 1.01, 2, float("nan"), True, "0.5"])
def test_bad_cond_ratio(cls, ratio) -> None:
    with pytest.raises(InputError, match="cond_ratio must lie in \\(0, 1\\]"):
        cls(cond_ratio=ratio)


@pytest.mark.parametrize("value", [0, -1.0, float("inf"), None])
def test_bad_value_change(value) -> None:
    with pytest.raises(InputError, match="value_change must be a finite number > 0"):
        SignValueCoverage(value_change=value)


def test_limits_and_misuse() -> None:
    with pytest.raises(InputError, match="at least two layers"):
        coverage(tiny(), X, "ss", layers=["1"], progress=False)
    with pytest.raises(InputError, match="max_history must be an integer >= 1"):
        SignSignCoverage(max_history=0)
    with pytest.raises(InputError, match="more than max_history=3"):
        coverage(tiny(), X, "ss", layers=LAYERS, max_history=3, progress=False)
    with pytest.raises(InputError, match=r"would track 4 neuron pairs .*more than max_pairs=3.*granularity='channel'"):
        coverage(tiny(), X, "vv", layers=LAYERS, max_pairs=3, progress=False)
    m = SignSignCoverage(layers=LAYERS)
    with pytest.raises(InputError, match="pairs of inputs: use update"):
        m.satisfied("1", X)
    with pytest.raises(InputError, match="no per-neuron requirements"):
        m.target("3", 0)
    first_of(m)
    with pytest.raises(InputError, match="not a decision layer"):
        m.pair("1", 0)
    with pytest.raises(InputError, match="item must be an integer in \\[0, 4\\)"):
        m.pair("3", 4)


# -- the digits CNN ---------------------------------------------------------------------------------------------
def test_digits_cnn() -> None:
    from bastion.data import load_digits
    from bastion.models import build_model

    torch.manual_seed(0)
    model = build_model("cnn", (1, 8, 8), 10)
    x = load_digits().x[:200]
    r = coverage(model, x, "ss", granularity="channel", progress=False)
    assert r.per_layer["5"][1] == 32 * 64 and r.per_layer["9"][1] == 64 * 128 and r.covered > 0
    # the same activations in batches of 33 (one forward pass: another batch size moves values by ~1e-7)
    m = SignSignCoverage(granularity="channel")
    m.bind(model)
    with torch.no_grad(), LayerProbe(model, m.layers or []) as probe:
        _, acts = probe.run(x)
    for s in range(0, 200, 33):
        m.update({k: v[s : s + 33] for k, v in acts.items()})
    assert all(torch.equal(m.first[k], v) for k, v in r.first_covered_by.items())
    e = coverage(model, x, "vv", progress=False)  # element granularity: 2048 x 1024 + 1024 x 128 pairs
    assert e.total == 2048 * 1024 + 1024 * 128
