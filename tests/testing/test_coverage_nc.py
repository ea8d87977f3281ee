"""Neuron coverage and the coverage framework: known answers, streaming, merge, resume, bad input."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from bastion.errors import InputError, ModelError
from bastion.testing import coverage, make_metric, measure
from bastion.testing.coverage import LayerProbe, NeuronCoverage, default_layers, neuron_values


def _net() -> nn.Sequential:
    """2 inputs -> 3 ReLUs -> 2 outputs, weights chosen so that the activations are easy to compute by hand."""
    net = nn.Sequential(nn.Linear(2, 3), nn.ReLU(), nn.Linear(3, 2))
    with torch.no_grad():
        net[0].weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, -1.0]]))
        net[0].bias.copy_(torch.tensor([0.0, -0.5, 0.2]))
        net[2].weight.copy_(torch.ones(2, 3))
        net[2].bias.zero_()
    return net


# inputs and their hidden activations relu(W x + b): [x0, x1 - 0.5, 0.2 - x0 - x1]
X = torch.tensor([[0.5, 0.0], [0.0, 1.0], [0.0, 0.0], [1.0, 1.0]])
# x0: [0.5, 0, 0]   x1: [0, 0.5, 0]   x2: [0, 0, 0.2]   x3: [1, 0.5, 0]


def test_raw_known_answer_and_first_inputs() -> None:
    r = coverage(_net(), X, "nc", progress=False)
    assert (r.covered, r.total, r.inputs) == (3, 3, 4)
    assert r.first_covered_by["1"].tolist() == [0, 1, 2]
    assert r.covered_by() == {0: 1, 1: 1, 2: 1}
    r = coverage(_net(), X, "nc", threshold=0.3, progress=False)
    assert r.first_covered_by["1"].tolist() == [0, 1, -1]  # 0.2 does not exceed 0.3
    assert r.uncovered() == [("1", 2, None)]
    assert r.to_dict()["ratio"] == pytest.approx(2 / 3)


def test_scaled_convention_known_answer() -> None:
    # per input, min-max scaled: x0 -> [1, 0, 0], x1 -> [0, 1, 0], x2 -> [0, 0, 1], x3 -> [1, 0.5, 0]
    r = coverage(_net(), X[[0, 3]], "nc", convention="scaled", threshold=0.4, progress=False)
    assert r.first_covered_by["1"].tolist() == [0, 1, -1]
    r = coverage(_net(), X[[0, 3]], "nc", convention="scaled", threshold=0.6, progress=False)
    assert r.first_covered_by["1"].tolist() == [0, -1, -1]


def test_conv_neurons_per_convention() -> None:
    net = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(2 * 16, 3))
    x = torch.rand(5, 1, 4, 4)
    raw = coverage(net, x, "nc", progress=False)
    scaled = coverage(net, x, "nc", convention="scaled", progress=False)
    assert raw.total == 2 * 16 and scaled.total == 2  # elements vs channels (DeepXplore)
    out = net[:2](x)
    assert neuron_values(out, "channel").shape == (5, 2)
    torch.testing.assert_close(neuron_values(out, "channel"), out.mean(dim=(2, 3)))
    expected = int((out.flatten(1) > 0).any(dim=0).sum())
    assert raw.covered == expected


def test_monotone_merge_resume() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 20), nn.ReLU(), nn.Linear(20, 20), nn.ReLU(), nn.Linear(20, 3))
    x = torch.randn(64, 6)
    ratios = [coverage(net, x[:n], "nc", threshold=0.5, progress=False).ratio for n in (1, 4, 16, 64)]
    assert ratios == sorted(ratios) and ratios[0] < ratios[-1]
    whole = coverage(net, x, "nc", threshold=0.5, progress=False)
    a, b = NeuronCoverage(threshold=0.5), NeuronCoverage(threshold=0.5)
    for m, part, start in ((a, x[:40], 0), (b, x[40:], 40)):
        m.bind(net)
        with torch.no_grad(), LayerProbe(net, m.layers) as probe:  # type: ignore[arg-type]
            m.update(probe.run(part)[1], torch.arange(start, start + part.shape[0]))
    merged = b.merge(a)  # order does not matter: the lower index wins
    for layer, first in whole.first_covered_by.items():
        assert torch.equal(merged.report().first_covered_by[layer], first)
    # save after 40 inputs, resume, add the rest: the same state as one pass
    resumed = NeuronCoverage(threshold=0.5)
    resumed.load_state_dict(a.state_dict())
    measure(net, x[40:], [resumed], progress=False)
    assert all(torch.equal(resumed.report().first_covered_by[k], v) for k, v in whole.first_covered_by.items())
    with pytest.raises(InputError, match="parameters"):
        NeuronCoverage(threshold=0.1).load_state_dict(a.state_dict())
    with pytest.raises(InputError, match="merge"):
        a.merge(NeuronCoverage(threshold=0.1))


def test_default_layers_and_bad_input() -> None:
    net = _net()
    assert default_layers(net) == ["1"]
    assert default_layers(nn.Sequential(nn.Linear(2, 3), nn.Linear(3, 2))) == ["0"]  # no activation modules
    with pytest.raises(InputError, match=r"unknown coverage metric 'nx'.*nc"):
        coverage(net, X, "nx", progress=False)
    with pytest.raises(InputError, match=r"unknown layer name\(s\) 'fc'.*0, 1, 2"):
        coverage(net, X, "nc", layers=["fc"], progress=False)
    with pytest.raises(InputError, match="no parameter 'k'"):
        make_metric("nc", k=3)
    with pytest.raises(InputError, match="convention"):
        NeuronCoverage(convention="minmax")
    with pytest.raises(InputError, match=r"\[0, 1\)"):
        NeuronCoverage(convention="scaled", threshold=1.5)
    with pytest.raises(ModelError, match="no activation"):
        coverage(nn.Sequential(nn.Flatten()), X, "nc", progress=False)
    with pytest.raises(InputError, match="Dataset"):
        coverage(net, [1, 2], "nc", progress=False)  # type: ignore[arg-type]


def test_batched_coverage_agrees_with_a_per_sample_loop() -> None:
    from bastion.data import load_digits
    from bastion.models import build_model

    torch.manual_seed(0)
    model = build_model("cnn", (1, 8, 8), 10).eval()
    x = load_digits().x[:200]
    batched = coverage(model, x, "nc", progress=False)
    loop = NeuronCoverage()
    loop.bind(model)
    with torch.no_grad(), LayerProbe(model, loop.layers) as probe:  # type: ignore[arg-type]
        for i in range(x.shape[0]):
            loop.update(probe.run(x[i : i + 1])[1], torch.tensor([i]))
    for layer, first in batched.first_covered_by.items():
        assert torch.equal(loop.report().first_covered_by[layer], first)
