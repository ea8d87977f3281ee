"""Surprise adequacy coverage (lsc, dsc): known DSA answers, LSA against scipy's gaussian_kde, streaming, merge,
resume and bad input."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import Tensor, nn

from bastion.errors import InputError, ModelError
from bastion.testing.coverage import (
    METRICS,
    DistanceSurpriseCoverage,
    LayerProbe,
    LikelihoodSurpriseCoverage,
    coverage,
    measure,
)


def tiny(width: int = 2) -> nn.Sequential:
    """AT layer "1" = relu(x); logits "2" = the AT itself, so the predicted class is the larger coordinate."""
    net = nn.Sequential(nn.Linear(width, width), nn.ReLU(), nn.Linear(width, width))
    with torch.no_grad():
        for lin in (net[0], net[2]):
            lin.weight.copy_(torch.eye(width))
            lin.bias.zero_()
    return net.eval()


# class 0: (2, 0), (3, 1); class 1: (0, 2), (1, 3)
PROFILE = torch.tensor([[2.0, 0.0], [3.0, 1.0], [0.0, 2.0], [1.0, 3.0]])
TEST = torch.tensor([[2.5, 0.2], [0.5, 0.6], [5.0, 0.0]])


def test_dsa_known_answers() -> None:
    m = DistanceSurpriseCoverage(upper=2.0, buckets=10)
    r = measure(tiny(), TEST, [m], profile=PROFILE, progress=False)[0]
    assert m.layers == ["1", "2"] and m.output == "2"
    with LayerProbe(tiny(), m.layers) as probe:
        _, acts = probe.run(TEST)
    sa = m.adequacy(m.values(acts)).tolist()
    # x_a = (2, 0), (0, 2), (3, 1); dist_b = sqrt(8) each (from (3, 1), (1, 3) is the nearest of class 1)
    want = [math.hypot(0.5, 0.2) / math.sqrt(8), math.hypot(0.5, 1.4) / math.sqrt(8), math.sqrt(5) / math.sqrt(8)]
    assert sa == pytest.approx(want, rel=1e-6)  # the model computes in float32
    # buckets of width 0.2: 0.19 -> 0, 0.53 -> 2, 0.79 -> 3
    assert r.first_covered_by["surprise"].tolist() == [0, -1, 1, 2, -1, -1, -1, -1, -1, -1]
    assert (r.covered, r.total) == (3, 10)
    # a training input itself has DSA 0, outside (0, U]: it covers nothing
    alone = measure(
        tiny(), PROFILE[:1], [DistanceSurpriseCoverage(upper=2.0, buckets=10)], profile=PROFILE, progress=False
    )
    assert alone[0].covered == 0


def test_lsa_matches_gaussian_kde() -> None:
    from scipy.stats import gaussian_kde

    g = torch.Generator().manual_seed(0)
    profile = torch.rand(80, 3, generator=g) * 3
    test = torch.rand(10, 3, generator=g) * 3
    m = LikelihoodSurpriseCoverage(upper=10.0, buckets=5, lower=-10.0)
    r = measure(tiny(3), test, [m], profile=profile, progress=False)[0]
    with LayerProbe(tiny(3), m.layers) as probe:
        _, acts = probe.run(test)
    ours = m.adequacy(m.values(acts))
    at, pred = torch.relu(test).double(), test.argmax(1)
    ptr, ppred = torch.relu(profile).double(), profile.argmax(1)
    for i in range(10):
        kde = gaussian_kde(ptr[ppred == pred[i]].numpy().T)
        assert float(ours[i]) == pytest.approx(-kde.logpdf(at[i].numpy()[:, None])[0], rel=1e-9, abs=1e-9)
    buckets = np.ceil((ours.numpy() + 10) / 4) - 1
    assert sorted({int(b) for b in buckets}) == (r.first_covered_by["surprise"] >= 0).nonzero().flatten().tolist()


def test_lsa_low_variance_neurons_and_unseen_class() -> None:
    g = torch.Generator().manual_seed(1)
    profile = torch.rand(60, 3, generator=g)
    profile[:, 2] = -1.0  # neuron 2 is always 0 after the ReLU and never the predicted class
    m = LikelihoodSurpriseCoverage(upper=50.0, buckets=5, lower=-50.0)
    measure(tiny(3), profile[:5], [m], profile=profile, progress=False)
    keep, _ = m._fit()
    assert keep.tolist() == [True, True, False]
    with LayerProbe(tiny(3), m.layers) as probe:
        _, acts = probe.run(torch.tensor([[0.0, 0.0, 1.0]]))  # predicted class 2: no density
    assert m.adequacy(m.values(acts)).tolist() == [math.inf]
    few = LikelihoodSurpriseCoverage()
    with pytest.raises(ModelError, match="class 0 has 2 profiling inputs for 2 neurons"):
        measure(tiny(), TEST, [few], profile=PROFILE, progress=False)


@pytest.mark.parametrize("cls", [LikelihoodSurpriseCoverage, DistanceSurpriseCoverage], ids=["lsc", "dsc"])
def test_streaming_merge_resume(cls) -> None:
    g = torch.Generator().manual_seed(2)
    profile, x = torch.rand(60, 2, generator=g) * 2, torch.rand(30, 2, generator=g) * 2
    opts = {"upper": 2.0, "buckets": 40, "lower": -2.0}

    def fresh():
        m = cls(**opts)
        m.bind(tiny())
        m.profile(tiny(), profile)
        return m

    def acts(rows: Tensor) -> dict[str, Tensor]:
        with LayerProbe(tiny(), ["1", "2"]) as probe:
            return probe.run(rows)[1]

    whole = fresh()
    whole.update(acts(x))
    want = whole.report().first_covered_by["surprise"].tolist()
    assert sum(w >= 0 for w in want) > 3
    streamed, covered = fresh(), []
    for s in range(0, 30, 7):
        streamed.update(acts(x[s : s + 7]))
        covered.append(streamed.report().covered)
    assert covered == sorted(covered) and streamed.report().first_covered_by["surprise"].tolist() == want
    odd, even = torch.arange(1, 30, 2), torch.arange(0, 30, 2)
    a, b = fresh(), fresh()
    a.update(acts(x[odd]), odd)
    b.update(acts(x[even]), even)
    assert a.merge(b).report().first_covered_by["surprise"].tolist() == want
    half = fresh()
    half.update(acts(x[:10]))
    resumed = cls(**opts)
    resumed.load_state_dict(half.state_dict())
    resumed.update(acts(x[10:]))
    assert resumed.report().first_covered_by["surprise"].tolist() == want


def test_bad_input() -> None:
    assert METRICS["lsc"] is LikelihoodSurpriseCoverage and METRICS["dsc"] is DistanceSurpriseCoverage
    with pytest.raises(InputError, match="buckets must be an integer >= 1"):
        DistanceSurpriseCoverage(buckets=0)
    with pytest.raises(InputError, match="lower must be below upper"):
        DistanceSurpriseCoverage(upper=1.0, lower=1.0)
    with pytest.raises(InputError, match="upper must be a finite number"):
        LikelihoodSurpriseCoverage(upper=math.inf)
    with pytest.raises(InputError, match="var_threshold must be >= 0"):
        LikelihoodSurpriseCoverage(var_threshold=-1.0)
    with pytest.raises(InputError, match="need a profiling set"):
        coverage(tiny(), TEST, "dsc", progress=False)
    with pytest.raises(InputError, match="unknown output module 'logits'"):
        coverage(tiny(), TEST, "dsc", output="logits", profile=PROFILE, progress=False)
    one_score = nn.Sequential(nn.Linear(2, 2), nn.ReLU(), nn.Linear(2, 1))
    with pytest.raises(ModelError, match=r"gave shape \(4, 1\), not logits"):
        coverage(one_score, TEST, "dsc", profile=PROFILE, progress=False)


def test_digits_dsc() -> None:
    from bastion.data import load_digits
    from bastion.models import build_model

    torch.manual_seed(0)
    x = load_digits().x
    model = build_model("cnn", (1, 8, 8), 10)
    r = coverage(model, x[1200:1500], "dsc", profile=x[:1200], progress=False)
    assert r.total == 1000 and 0 < r.covered < 300
