"""testRNN's LSTM coverage (boundary, step-wise, temporal) and mutation generator: unrolling, known answers on a
hand-set one-unit LSTM, streaming/merge/resume, a trained digits LSTM, bad input."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest
import torch
from torch import Tensor, nn

from bastion.data import Dataset, load_digits_sequences
from bastion.errors import InputError, ModelError
from bastion.models import build_model, save_model
from bastion.models.zoo import LastStep
from bastion.testing import Budget, coverage, generate_tests, make_metric, measure
from bastion.testing.coverage import METRICS, LayerProbe
from bastion.testing.coverage.rnn import StepwiseCoverage, TemporalCoverage, paa, sax_cuts, unroll
from bastion.testing.generate import GENERATORS
from bastion.threat import LpBall

CRITERIA = ("lstm-boundary", "lstm-step", "lstm-temporal")

# ------------------------------------------------------------------------------------------------------- unrolling


@pytest.mark.filterwarnings("ignore:LSTM with projections is not supported with oneDNN")
@pytest.mark.parametrize(
    "module",
    [
        nn.LSTM(3, 5, batch_first=True),
        nn.LSTM(3, 5, num_layers=2, bidirectional=True),  # time-major
        nn.LSTM(3, 6, num_layers=2, proj_size=2, batch_first=True),
        nn.GRU(3, 5, num_layers=2, bidirectional=True, batch_first=True),
        nn.GRU(3, 4, bias=False),
    ],
    ids=repr,
)
def test_unrolled_steps_equal_torch(module: nn.RNNBase) -> None:
    torch.manual_seed(0)
    x = torch.randn(6, 7, 3) if module.batch_first else torch.randn(7, 6, 3)
    with torch.no_grad():
        out, state = module(x)
        layers = unroll(module, x)
    out = out if module.batch_first else out.transpose(0, 1)
    torch.testing.assert_close(layers[-1]["h"], out, atol=1e-5, rtol=0)  # h_t for every t
    d = 2 if module.bidirectional else 1
    h_n = state[0] if isinstance(module, nn.LSTM) else state
    for k, layer in enumerate(layers):  # final hidden (and cell) state of every layer and direction
        for j in range(d):
            t = -1 if j == 0 else 0  # the reverse direction ends at the first step
            units = layer["h"].shape[2] // d
            torch.testing.assert_close(layer["h"][:, t, j * units : (j + 1) * units], h_n[k * d + j], atol=1e-5, rtol=0)
            if isinstance(module, nn.LSTM):
                cells = layer["c"].shape[2] // d
                c = layer["c"][:, t, j * cells : (j + 1) * cells]
                torch.testing.assert_close(c, state[1][k * d + j], atol=1e-5, rtol=0)


# ------------------------------------------------------------------------------------------------- known answers


def _one_unit(forget: bool) -> nn.Sequential:
    """A 1-unit LSTM with zero recurrent weights, so that every gate is a function of the current input alone.

    ``forget=True``: f_t = sigmoid(x_t) (the other gates arbitrary). ``False``: f_t = 0, i_t = o_t = 1 and
    g_t = tanh(x_t), hence c_t = tanh(x_t) and h_t = tanh(tanh(x_t)).
    """
    lstm = nn.LSTM(1, 1, batch_first=True)
    with torch.no_grad():
        lstm.weight_hh_l0.zero_()
        lstm.bias_hh_l0.zero_()
        # gate order i, f, g, o
        lstm.weight_ih_l0.copy_(torch.tensor([[0.0], [1.0], [1.0], [0.0]] if forget else [[0.0], [0.0], [1.0], [0.0]]))
        lstm.bias_ih_l0.copy_(torch.tensor([0.0, 0.0, 0.0, 0.0] if forget else [100.0, -100.0, 0.0, 100.0]))
    return nn.Sequential(lstm, LastStep(), nn.Linear(1, 2)).eval()


def _seq(*rows: list[float]) -> Tensor:
    return torch.tensor(rows, dtype=torch.float32)[..., None]  # (N, T, 1)


U = math.tanh(math.tanh(1.0))  # h_t for x_t = 1


def test_boundary_known_answers() -> None:
    # forget gate: profile range [sigmoid(0), sigmoid(4)]; x = 2 scales to (0.8808 - 0.5) / 0.4820 = 0.79
    net = _one_unit(forget=True)
    profile = _seq([0, 0, 0, 0], [4, 4, 4, 4])
    r = coverage(net, _seq([0, 4, 0, 4], [0, 0, 2, 0]), "lstm-boundary", state="f", profile=profile, progress=False)
    assert r.first_covered_by["0"].tolist() == [-1, 0, -1, 0] and r.item_names == ("t=0", "t=1", "t=2", "t=3")
    r = coverage(net, _seq([0, 4, 0, 4], [0, 0, 2, 0]), "lstm-boundary", state="f", threshold=0.75,
                 profile=profile, progress=False)  # fmt: skip
    assert r.first_covered_by["0"].tolist() == [-1, 0, 1, 0]
    assert r.uncovered() == [("0", 0, "t=0")]
    # hidden state |h_t| = tanh(tanh(x_t)): x = 0.5 scales to 0.4318 / 0.6420 = 0.67; steps 1..3 only
    net = _one_unit(forget=False)
    r = coverage(net, _seq([0, 1, 0.5, 1]), "lstm-boundary", steps=(1, 3), profile=_seq([0, 0, 0, 0], [1, 1, 1, 1]),
                 progress=False)  # fmt: skip
    assert r.first_covered_by["0"].tolist() == [0, -1, 0] and r.item_names == ("t=1", "t=2", "t=3")


def test_stepwise_known_answers() -> None:
    net = _one_unit(forget=False)
    # profile changes: [0, 0, 0, 0] and [U, 0, 0, 0] (from the zero state): range [0, U]
    profile = _seq([0, 0, 0, 0], [1, 1, 1, 1])
    r = coverage(net, _seq([0, 1, 1, 0]), "lstm-step", profile=profile, progress=False)  # h = [0, U, U, 0]
    assert r.first_covered_by["0"].tolist() == [-1, 0, -1, 0]
    r = coverage(net, _seq([0, 0.5, 1, 0]), "lstm-step", profile=profile, progress=False)  # changes 0.67, 0.33, 1
    assert r.first_covered_by["0"].tolist() == [-1, 0, -1, 0]
    r = coverage(net, _seq([0, 0.5, 1, 0]), "lstm-step", threshold=0.3, profile=profile, progress=False)
    assert r.first_covered_by["0"].tolist() == [-1, 0, 0, 0]
    # the two conventions of the change, on two units: xi+ = [1, 2], xi- = [-1, -3]
    q = torch.tensor([[[1.0, -1.0], [2.0, -3.0]]])
    torch.testing.assert_close(StepwiseCoverage().series(q, "x"), torch.tensor([[0.0, 1.0]]))
    torch.testing.assert_close(StepwiseCoverage(change="split").series(q, "x"), torch.tensor([[2.0, 3.0]]))


def _saxpy_paa(series: list[float], segments: int) -> list[float]:
    """saxpy's paa, transcribed: the reference for the fractional segments."""
    n = len(series)
    if n % segments == 0:
        inc = n // segments
        return [sum(series[s * inc : (s + 1) * inc]) / inc for s in range(segments)]
    res = [0.0] * segments
    for i in range(segments * n):
        res[i // n] += series[i // segments]
    return [v / n for v in res]


def test_temporal_known_answers_paa_and_sax() -> None:
    series = [0.3, -1.0, 2.0, 0.5, 0.0, 1.5, -0.5, 1.0]
    for segments in (5, 4, 3, 8):
        torch.testing.assert_close(paa(torch.tensor([series]), segments)[0], torch.tensor(_saxpy_paa(series, segments)))
    assert sax_cuts(3) == pytest.approx([-0.430727, 0.430727], abs=1e-6)
    assert sax_cuts(4) == pytest.approx([-0.674490, 0.0, 0.674490], abs=1e-6)
    # profile xi in {0, U} equally often: mean U / 2, std U / 2; so 0 -> z = -1 (a), U -> +1 (c), x = 0.5 -> 0.35 (b)
    net = _one_unit(forget=False)
    profile = _seq([0] * 5, [1] * 5)
    r = coverage(net, _seq([0, 1, 0, 1, 1], [0.5, 0, 1, 0.5, 1], [0, 1, 0, 1, 1]), "lstm-temporal",
                 profile=profile, progress=False)  # fmt: skip
    assert (r.covered, r.total) == (2, 3**5)
    names = r.item_names or ()
    covered = {names[i]: int(r.first_covered_by["0"][i]) for i in (r.first_covered_by["0"] >= 0).nonzero().flatten()}
    assert covered == {"acacc": 0, "bacbc": 1}
    # the distance to a word is 0 exactly for the inputs that take it
    metric = TemporalCoverage()
    metric.bind(net)
    metric.profile(net, profile)
    with torch.no_grad(), LayerProbe(net, metric.layers or []) as probe:
        values = metric.values(probe.run(_seq([0, 1, 0, 1, 1], [0.5, 0, 1, 0.5, 1]))[1])
    d = metric.distance(values, "0", names.index("acacc"))
    assert float(d[0]) == 0.0 and float(d[1]) > 0


# ------------------------------------------------------------------------------------------ streaming, merge, resume


@pytest.fixture(scope="module")
def digits() -> Dataset:
    return load_digits_sequences()


@pytest.mark.parametrize("name", CRITERIA)
def test_monotone_merge_resume(name: str, digits: Dataset) -> None:
    torch.manual_seed(0)
    net = build_model("lstm", (8, 8), 10, hidden=8).eval()
    x, profile = digits.x[:64], digits.x[200:400]
    ratios = [coverage(net, x[:n], name, profile=profile, progress=False).ratio for n in (1, 8, 64)]
    assert ratios == sorted(ratios) and ratios[0] < ratios[-1]
    whole = coverage(net, x, name, profile=profile, progress=False)
    a, b = make_metric(name), make_metric(name)
    for m, part, start in ((a, x[:40], 0), (b, x[40:], 40)):
        m.bind(net)
        m.profile(net, profile)
        with torch.no_grad(), LayerProbe(net, m.layers or []) as probe:
            m.update(probe.run(part)[1], torch.arange(start, start + part.shape[0]))
    merged = b.merge(a)
    assert torch.equal(merged.report().first_covered_by["2"], whole.first_covered_by["2"])
    assert merged.report().inputs == 64
    resumed = make_metric(name)
    resumed.load_state_dict(a.state_dict())
    assert resumed.profiled
    measure(net, x[40:], [resumed], progress=False)  # no profile needed: it is part of the saved state
    assert torch.equal(resumed.report().first_covered_by["2"], whole.first_covered_by["2"])
    other = make_metric(name)
    other.bind(net)
    other.profile(net, profile[:50])
    with pytest.raises(InputError, match="profiled on different data"):
        a.merge(other)


def test_batched_temporal_coverage_agrees_with_a_per_sample_loop(digits: Dataset) -> None:
    torch.manual_seed(0)
    net = build_model("lstm", (8, 8), 10, hidden=8).eval()
    x = digits.x[:100]
    batched = coverage(net, x, "lstm-temporal", profile=digits.x[200:400], batch_size=32, progress=False)
    loop = make_metric("lstm-temporal")
    loop.bind(net)
    loop.profile(net, digits.x[200:400])
    with torch.no_grad(), LayerProbe(net, loop.layers or []) as probe:
        for i in range(x.shape[0]):
            loop.update(probe.run(x[i : i + 1])[1])
    assert torch.equal(loop.report().first_covered_by["2"], batched.first_covered_by["2"])
    assert sum(batched.covered_by().values()) == batched.covered


# ---------------------------------------------------------------------------------------- a trained digits LSTM


@pytest.fixture(scope="module")
def trained(digits: Dataset) -> tuple[nn.Module, Dataset, Dataset]:
    from bastion.defenses.training import train

    train_set, test_set = digits.train_test_split(0.2, seed=0)
    threads = torch.get_num_threads()  # module fixtures run before the one-thread fixture of conftest
    torch.set_num_threads(1)
    try:
        with torch.random.fork_rng():
            torch.manual_seed(0)
            model = build_model("lstm", digits.feature_shape, 10)  # hidden 64
            train(model, train_set, epochs=3, batch_size=32, lr=1e-2, progress=False)
    finally:
        torch.set_num_threads(threads)
    return model.eval(), train_set, test_set


def test_trained_lstm_is_accurate_and_rnn_mutation_raises_coverage(trained: tuple[nn.Module, Dataset, Dataset]) -> None:
    from bastion.defenses.training import accuracy

    model, train_set, test_set = trained
    assert accuracy(model, test_set) > 0.8
    seeds = test_set.subset(slice(0, 20))
    suite = generate_tests(model, seeds, "lstm-boundary", "rnn-mutation", budget=Budget(iterations=4),
                           profile=train_set, progress=False)  # fmt: skip
    assert suite.coverage.covered > suite.seed_coverage.covered and suite.n_tests > 0
    assert suite.queries == 4 * 1000 and bool(((suite.tests >= 0) & (suite.tests <= 1)).all())
    # inside a threat set, mutating 3 random rows (time steps) per test
    threat = LpBall("linf", 0.1)
    suite = generate_tests(model, seeds, "lstm-temporal", "rnn-mutation", threat=threat, budget=Budget(iterations=5),
                           profile=train_set, progress=False, batch=100, time_steps=3)  # fmt: skip
    assert suite.coverage.covered > suite.seed_coverage.covered and suite.queries == 500
    assert bool(threat.contains(suite.tests, seeds.x[suite.origins]).all())
    changed = (suite.tests != seeds.x[suite.origins]).any(dim=2).sum(dim=1)  # (a row of zeros may clip back)
    assert 1 <= int(changed.min()) and int(changed.max()) <= 3
    # the genetic boost, within a query budget that its searches count against
    suite = generate_tests(model, seeds, "lstm-step", "rnn-mutation", threat=threat,
                           budget=Budget(iterations=5, queries=3000), profile=train_set, progress=False,
                           batch=100, time_steps=3, mode="genetic", offspring=50)  # fmt: skip
    assert suite.coverage.covered > suite.seed_coverage.covered and suite.queries <= 3000
    assert bool(threat.contains(suite.tests, seeds.x[suite.origins]).all())


def test_cli_coverage_on_the_sequence_digits(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, trained: tuple[nn.Module, Dataset, Dataset]
) -> None:
    from bastion.cli import main

    model, _, _ = trained
    path = tmp_path / "lstm.pt"
    save_model(model, path)
    capsys.readouterr()
    rc = main(["test", "coverage", "--model", f"zoo:lstm@{os.fspath(path)}", "--data", "digits-seq", "--limit",
               "50", "--metric", "lstm-boundary,lstm-temporal", "--param", "lstm-boundary.state=f", "--profile",
               "digits-seq", "--json"])  # fmt: skip
    out = json.loads(capsys.readouterr().out)
    assert rc == 0 and out["lstm-boundary"]["params"]["state"] == "f" and out["lstm-temporal"]["total"] == 243


# ------------------------------------------------------------------------------------------------------ bad input


class _WithState(nn.Module):
    """Calls its LSTM with a non-zero initial state: its steps cannot be recomputed from the input alone."""

    def __init__(self) -> None:
        super().__init__()
        self.rnn = nn.LSTM(8, 4, batch_first=True)
        self.head = nn.Linear(4, 3)

    def forward(self, x: Tensor) -> Tensor:
        h0 = torch.ones(1, x.shape[0], 4)
        return self.head(self.rnn(x, (h0, h0))[0][:, -1])


def test_bad_input(digits: Dataset) -> None:
    assert {"lstm-boundary", "lstm-step", "lstm-temporal"} <= set(METRICS) and "rnn-mutation" in GENERATORS
    x = digits.x[:8]
    mlp = build_model("mlp", (8, 8), 10, hidden=(4,))
    with pytest.raises(ModelError, match=r"Sequential has no nn.LSTM or nn.GRU layer.*lstm-step"):
        coverage(mlp, x, "lstm-step", profile=x, progress=False)
    net = build_model("lstm", (8, 8), 10, hidden=4)
    with pytest.raises(InputError, match=r"layer '4' is a Linear, not an nn.LSTM.*recurrent layers are: 2"):
        coverage(net, x, "lstm-boundary", layers=["4"], profile=x, progress=False)
    with pytest.raises(InputError, match="unknown layer name 'rnn'"):
        coverage(net, x, "lstm-boundary", layers="rnn", profile=x, progress=False)
    with pytest.raises(InputError, match="need a profiling set"):
        coverage(net, x, "lstm-temporal", progress=False)
    with pytest.raises(InputError, match=r"reach beyond the 8 time steps"):
        coverage(net, x, "lstm-boundary", steps=(4, 24), profile=x, progress=False)
    gru = build_model("lstm", (8, 8), 10, hidden=4, cell="gru")
    with pytest.raises(InputError, match=r"GRU '2' has no quantity 'c'"):
        coverage(gru, x, "lstm-boundary", state="c", profile=x, progress=False)
    assert coverage(gru, x, "lstm-boundary", state="z", profile=x, progress=False).total == 8
    with pytest.raises(ModelError, match="non-zero initial state"):
        coverage(_WithState(), x, "lstm-step", profile=x, progress=False)
    bad = [(dict(threshold=1.5), r"\[0, 1\]"), (dict(steps=(3, 1)), "t1 <= t2"),
           (dict(state="q"), "state must be one of"), (dict(stacked_layer=2), "stacked_layer")]  # fmt: skip
    for kwargs, needle in bad:
        with pytest.raises(InputError, match=needle):
            coverage(net, x, "lstm-boundary", profile=x, progress=False, **kwargs)
    with pytest.raises(InputError, match="change must be"):
        make_metric("lstm-step", change="signed")
    with pytest.raises(InputError, match="symbols"):
        make_metric("lstm-temporal", symbols=1)
    seeds = Dataset(x, digits.y[:8], num_classes=10, name="s")
    with pytest.raises(InputError, match="mode='genetic' needs a criterion whose items state a distance"):
        generate_tests(net, seeds, "nc", "rnn-mutation", mode="genetic", budget=1, progress=False,
                       criterion_options={"layers": ["2"]})  # fmt: skip
    with pytest.raises(InputError, match="variance"):
        generate_tests(net, seeds, "lstm-step", "rnn-mutation", variance=(0.1,), profile=x, progress=False)
    with pytest.raises(InputError, match="time_axis"):
        generate_tests(net, seeds, "lstm-step", "rnn-mutation", time_axis=5, time_steps=2, budget=1, profile=x,
                       progress=False)  # fmt: skip
