"""DeepGauge criteria (kmnc, nbc, snac, tknc, tknp): known answers on a hand-built network, streaming, merge,
resume, bad input and a batched run on the digits CNN."""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor

from bastion.errors import InputError
from bastion.testing.coverage import (
    METRICS,
    KMultisectionCoverage,
    LayerProbe,
    NeuronBoundaryCoverage,
    StrongNeuronActivationCoverage,
    TopKNeuronCoverage,
    TopKNeuronPatterns,
    coverage,
    make_metric,
    measure,
)
from bastion.testing.coverage.base import CoverageMetric, NeuronTarget

from .nets import tiny

LAYERS = ["1", "3"]


# Test inputs. Layer "1": (0.25, 1.75), (3, 0), (1.0, 0.6); layer "3": (2.0, 0), (3, 3), (1.6, 0.4).
TEST = torch.tensor([[0.25, 1.75], [3.0, -1.0], [1.0, 0.6]])
# Profile A: layer "1" in [0, 2] x [0, 2]; layer "3" in [0, 3] x [0, 1].
PROFILE_A = torch.tensor([[0.0, 0.0], [1.0, 2.0], [2.0, 1.0]])
# Profile B: layer "1" in [1, 2] x [1, 2]; layer "3" in [3, 3] x [0, 1] (neuron 0 of "3" has an empty range).
PROFILE_B = torch.tensor([[1.0, 2.0], [2.0, 1.0]])


def run(metric: CoverageMetric, x: Tensor = TEST, profile: Tensor | None = None, batch_size: int = 256) -> dict:
    report = measure(tiny(), x, [metric], profile=profile, batch_size=batch_size, progress=False)[0]
    return {k: v.tolist() for k, v in report.first_covered_by.items()}


# -- known answers ----------------------------------------------------------------------------------------------
def test_kmnc_known_sections() -> None:
    m = KMultisectionCoverage(k=4, layers=LAYERS)
    first = run(m, profile=PROFILE_A)
    # "1" (sections of width 0.5): n0 in 0 (input 0) and 2 (input 2), 3.0 above; n1 in 3 (0), 0 (1), 1 (2)
    assert first["1"] == [0, -1, 2, -1, 1, 2, -1, 0]
    # "3": n0 (width 0.75) in 2 (inputs 0, 2) and 3 (input 1: the upper bound is in the last section); n1 in 0, 1
    assert first["3"] == [-1, -1, 0, 1, 0, 2, -1, -1]
    r = m.report()
    assert (r.covered, r.total, r.per_layer) == (9, 16, {"1": (5, 8), "3": (4, 8)})
    assert r.uncovered(limit=2) == [("1", 0, "section 1"), ("1", 0, "section 3")]
    assert m.neuron_range("3")[1].tolist() == [3.0, 1.0]


def test_kmnc_outside_and_empty_ranges_cover_nothing() -> None:
    first = run(KMultisectionCoverage(k=2, layers=LAYERS), profile=PROFILE_B)
    assert first["1"] == [2, -1, -1, 0]  # 0.25, 3, 0 and 0.6 lie outside [1, 2]
    assert first["3"] == [-1, -1, 0, -1]  # n0's range is [3, 3]: input 1 reaches 3 exactly, yet covers nothing


def test_kmnc_sparse_update_equals_dense_satisfied() -> None:
    torch.manual_seed(0)
    x = torch.randn(40, 2) * 2
    m = KMultisectionCoverage(k=7, layers=LAYERS)
    sparse = run(m, x, profile=torch.randn(30, 2))
    with LayerProbe(tiny(), LAYERS) as probe:
        _, acts = probe.run(x)
    for layer, v in m.values(acts).items():
        hit = m.satisfied(layer, v)
        dense = torch.where(hit, torch.arange(40)[:, None], torch.full_like(hit, 99, dtype=torch.long)).amin(0)
        assert sparse[layer] == torch.where(dense == 99, -1, dense).tolist()
        assert hit.sum(1).le(v.shape[1]).all()  # at most one section per neuron


def test_nbc_known_corners() -> None:
    m = NeuronBoundaryCoverage(layers=LAYERS)
    first = run(m, profile=PROFILE_B)
    # "1": n0 lower (0.25 < 1, input 0), n0 upper (3 > 2, input 1), n1 lower (0 < 1, input 1), n1 upper never
    assert first["1"] == [0, 1, 1, -1]
    # "3": n0 lower (2.0 < 3, input 0), n0 upper never (3 is not > 3), n1 lower never, n1 upper (3 > 1, input 1)
    assert first["3"] == [0, -1, -1, 1]
    assert (m.report().covered, m.report().total) == (5, 8)
    assert m.report().uncovered() == [("1", 1, "upper"), ("3", 0, "upper"), ("3", 1, "lower")]


def test_snac_known_answers() -> None:
    m = StrongNeuronActivationCoverage(layers=LAYERS)
    assert run(m, profile=PROFILE_B) == {"1": [1, -1], "3": [-1, 1]}
    assert (m.report().covered, m.report().total) == (2, 4)


def test_tknc_known_answers() -> None:
    # "1": top-1 is n1, n0, n0; "3": n0 for all (input 1 ties 3 = 3: the lower index wins)
    assert run(TopKNeuronCoverage(k=1, layers=LAYERS)) == {"1": [1, 0], "3": [0, -1]}
    assert run(TopKNeuronCoverage(k=2, layers=LAYERS)) == {"1": [0, 0], "3": [0, 0]}
    assert run(TopKNeuronCoverage(k=5, layers=LAYERS)) == {"1": [0, 0], "3": [0, 0]}  # k above the width


def test_tknp_known_patterns() -> None:
    m = TopKNeuronPatterns(k=1, layers=LAYERS)
    assert run(m) == {"patterns": [1, 0]}  # patterns (top of "1", top of "3"): (1, 0), (0, 0), (0, 0)
    assert m.patterns.tolist() == [[0, 0], [1, 0]]
    r = m.report()
    assert (r.covered, r.total, r.inputs, r.covered_by()) == (2, 3, 3, {0: 1, 1: 1})
    m2 = TopKNeuronPatterns(k=2, layers=LAYERS)
    assert run(m2) == {"patterns": [0]}  # every input's top-2 sets are all of both layers
    assert m2.patterns.tolist() == [[0, 1, 0, 1]]


def test_tknp_update_credits_new_patterns_only() -> None:
    m = TopKNeuronPatterns(k=1, layers=LAYERS)
    m.bind(tiny())
    with LayerProbe(tiny(), LAYERS) as probe:
        _, acts = probe.run(TEST)
    assert m.update(acts).tolist() == [1, 1, 0]
    assert m.update(acts).tolist() == [0, 0, 0]  # the same patterns again: nothing new
    assert (m.report().covered, m.report().total) == (2, 6)


def test_targets_are_the_items_requirements() -> None:
    kmnc = KMultisectionCoverage(k=4, layers=LAYERS)
    run(kmnc, profile=PROFILE_A)
    assert kmnc.target("1", 5) == NeuronTarget("1", 1, 0.5, 1.0)  # neuron 1, section 1 of [0, 2]
    assert kmnc.target("3", 3) == NeuronTarget("3", 0, 2.25, 3.0)
    # an input meeting the target of an uncovered item covers it
    t = kmnc.target("1", 1)  # neuron 0, section 1: [0.5, 1.0)
    before = kmnc.report().first_covered_by["1"][1]
    probe_x = torch.tensor([[(t.lower + t.upper) / 2, 0.0]])
    kmnc_after = measure(tiny(), probe_x, [kmnc], progress=False)[0]
    assert before == -1 and kmnc_after.first_covered_by["1"][1] == 3
    nbc = NeuronBoundaryCoverage(layers=LAYERS)
    run(nbc, profile=PROFILE_B)
    assert nbc.target("3", 0) == NeuronTarget("3", 0, -math.inf, 3.0)
    assert nbc.target("3", 3) == NeuronTarget("3", 1, 1.0, math.inf)
    snac = StrongNeuronActivationCoverage(layers=LAYERS)
    run(snac, profile=PROFILE_B)
    assert snac.target("1", 1) == NeuronTarget("1", 1, 2.0, math.inf)
    with pytest.raises(InputError, match="item must be an integer in \\[0, 4\\)"):
        nbc.target("1", 4)
    with pytest.raises(InputError, match="no per-neuron requirements"):
        TopKNeuronCoverage().target("1", 0)


# -- streaming, merge, resume -----------------------------------------------------------------------------------
FACTORIES = [
    lambda: KMultisectionCoverage(k=5, layers=LAYERS),
    lambda: NeuronBoundaryCoverage(layers=LAYERS),
    lambda: StrongNeuronActivationCoverage(layers=LAYERS),
    lambda: TopKNeuronCoverage(k=1, layers=LAYERS),
    lambda: TopKNeuronPatterns(k=1, layers=LAYERS),
]
IDS = ["kmnc", "nbc", "snac", "tknc", "tknp"]


def _acts(x: Tensor) -> dict[str, Tensor]:
    with LayerProbe(tiny(), LAYERS) as probe:
        return probe.run(x)[1]


def _fresh(factory, profile: Tensor) -> CoverageMetric:
    m = factory()
    m.bind(tiny())
    m.profile(tiny(), profile)
    return m


@pytest.mark.parametrize("factory", FACTORIES, ids=IDS)
def test_monotone_batch_invariant_merge_and_resume(factory) -> None:
    torch.manual_seed(1)
    x, profile = torch.randn(30, 2) * 1.5, torch.randn(20, 2)
    whole = _fresh(factory, profile)
    whole.update(_acts(x))
    want = {k: v.tolist() for k, v in whole.report().first_covered_by.items()}
    # streaming in batches of 7: the same state, covered never falls
    streamed, covered = _fresh(factory, profile), []
    for s in range(0, 30, 7):
        streamed.update(_acts(x[s : s + 7]))
        covered.append(streamed.report().covered)
    assert covered == sorted(covered) and covered[-1] > 0
    assert {k: v.tolist() for k, v in streamed.report().first_covered_by.items()} == want
    # merge of two interleaved parts (global indices) = the whole
    odd, even = torch.arange(1, 30, 2), torch.arange(0, 30, 2)
    a, b = _fresh(factory, profile), _fresh(factory, profile)
    a.update(_acts(x[odd]), odd)
    b.update(_acts(x[even]), even)
    for merged in (a.merge(b), b.merge(a)):
        assert {k: v.tolist() for k, v in merged.report().first_covered_by.items()} == want
        assert merged.inputs == 30
    # the parts are left as they were
    assert a.inputs == 15 and a.report().covered <= whole.report().covered
    # resume from a saved state: the same as one uninterrupted run
    half = _fresh(factory, profile)
    half.update(_acts(x[:12]))
    saved = half.state_dict()
    resumed = factory()
    resumed.load_state_dict(saved)
    assert resumed.profiled == half.profiled
    resumed.update(_acts(x[12:]))
    assert {k: v.tolist() for k, v in resumed.report().first_covered_by.items()} == want
    assert resumed.report().covered == whole.report().covered


def test_shallow_copy_updates_stay_apart() -> None:
    """The generation loop tries candidates on a shallow copy (``__dict__`` + cloned ``first``)."""
    for factory in FACTORIES:
        m = _fresh(factory, PROFILE_A)
        m.update(_acts(TEST[:1]))
        before = m.state_dict()
        trial = type(m).__new__(type(m))
        trial.__dict__.update(m.__dict__)
        trial.first = {k: v.clone() for k, v in m.first.items()}
        trial.update(_acts(torch.tensor([[5.0, -3.0], [0.1, 0.9]])))
        after = m.state_dict()
        assert {k: v.tolist() for k, v in after["first"].items()} == {k: v.tolist() for k, v in before["first"].items()}
        if isinstance(m, TopKNeuronPatterns):
            assert after["patterns"].tolist() == before["patterns"].tolist()


def test_tknp_state_copied_without_patterns_is_refused() -> None:
    m = _fresh(FACTORIES[4], PROFILE_A)
    fresh = type(m).__new__(type(m))
    fresh.__dict__.update(m.__dict__)
    fresh.update(_acts(TEST))
    m.first, m.inputs = fresh.first, fresh.inputs  # the patterns stay behind in ``fresh``
    with pytest.raises(InputError, match="2 first inputs for 0 patterns"):
        m.update(_acts(TEST))


def test_merge_refuses_other_profile_or_params() -> None:
    a, b = _fresh(FACTORIES[0], PROFILE_A), _fresh(FACTORIES[0], PROFILE_B)
    with pytest.raises(InputError, match="profiled on different data"):
        a.merge(b)
    with pytest.raises(InputError, match="different criteria or parameters"):
        a.merge(_fresh(lambda: KMultisectionCoverage(k=6, layers=LAYERS), PROFILE_A))
    with pytest.raises(InputError, match="different criteria or parameters"):
        TopKNeuronPatterns(k=1).merge(TopKNeuronPatterns(k=2))


# -- bad input --------------------------------------------------------------------------------------------------
def test_registry_and_unknown_name() -> None:
    for name in ("kmnc", "nbc", "snac", "tknc", "tknp"):
        assert name in METRICS and METRICS[name].name == name
    with pytest.raises(InputError, match=r"unknown coverage metric 'kmcn'; choose one of .*kmnc.*tknp"):
        make_metric("kmcn")
    with pytest.raises(InputError, match="has no parameter 'sections'"):
        make_metric("kmnc", sections=3)


@pytest.mark.parametrize("cls", [KMultisectionCoverage, TopKNeuronCoverage, TopKNeuronPatterns])
@pytest.mark.parametrize("k", [0, -1, 2.5, True, "3"])
def test_bad_k(cls, k) -> None:
    with pytest.raises(InputError, match="k must be an integer >= 1"):
        cls(k=k)


def test_profile_needed() -> None:
    with pytest.raises(InputError, match="need a profiling set"):
        coverage(tiny(), TEST, "kmnc", k=3, progress=False)
    for cls in (KMultisectionCoverage, NeuronBoundaryCoverage, StrongNeuronActivationCoverage):
        m = cls(layers=LAYERS)
        m.bind(tiny())
        with pytest.raises(InputError, match=f"the {m.name} criterion needs a profiling set"):
            m.update(_acts(TEST))
        with pytest.raises(InputError, match="has not been profiled"):
            m.target("1", 0)
    m = KMultisectionCoverage(layers=LAYERS)
    m.bind(tiny())
    m.profile(tiny(), PROFILE_A[:0])  # an empty profiling set
    with pytest.raises(InputError, match="no profiled range"):
        m.update(_acts(TEST))


# -- the digits CNN ---------------------------------------------------------------------------------------------
def test_digits_cnn_batched() -> None:
    from bastion.data import load_digits
    from bastion.models import build_model

    torch.manual_seed(0)
    data = load_digits()
    model = build_model("cnn", (1, 8, 8), 10)
    train, test = data.x[:1200], data.x[1200:1500]
    r = coverage(model, test, "kmnc", profile=train, k=10, batch_size=300, progress=False)
    assert r.total == (32 * 64 + 64 * 16 + 128) * 10 and r.inputs == 300
    assert 0 < r.covered < r.total
    # the same activations in batches of 37: the same state (through the model, another batch size may move
    # values by ~1e-7, enough to cross a section border, hence one forward pass)
    m = KMultisectionCoverage(k=10)
    m.bind(model)
    m.profile(model, train, batch_size=300)  # as coverage() profiles: in batches of batch_size
    with torch.no_grad(), LayerProbe(model, m.layers or []) as probe:
        _, acts = probe.run(test)
    for s in range(0, 300, 37):
        m.update({k: v[s : s + 37] for k, v in acts.items()})
    assert all(torch.equal(m.first[k], v) for k, v in r.first_covered_by.items())
    # channel granularity: a channel of a convolution is one neuron (DeepGauge's reference code)
    ch = coverage(model, test, "snac", profile=train, granularity="channel", progress=False)
    assert {k: t for k, (_, t) in ch.per_layer.items()} == {"2": 32, "5": 64, "9": 128}
    # inputs outside the profiled data leave the range: scaled-up digits reach above it
    snac = coverage(model, test * 3, "snac", profile=train, progress=False)
    assert snac.covered > 0
