"""Concolic testing (Sun et al., ASE 2018): the LP step against brute force, requirements met on re-execution, the
threat set, the digits CNN, the L0 heuristic, resume and bad input."""

from __future__ import annotations

import itertools
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bastion.data import Dataset
from bastion.errors import InputError
from bastion.testing import Budget, generate_tests
from bastion.testing.coverage import NeuronCoverage
from bastion.testing.coverage.base import CoverageMetric, LayerProbe, NeuronTarget
from bastion.testing.generate import GENERATORS, GenerationContext, QueryCounter, run_generator
from bastion.testing.generate.concolic import Attempt, Concolic
from bastion.threat import LpBall


def _net(sizes: list[int], seed: int) -> nn.Sequential:
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(itertools.pairwise(sizes)):
        layers.append(nn.Linear(a, b))
        if i < len(sizes) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers).eval()


def _conv_net(seed: int) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(1, 3, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(36, 8), nn.ReLU(), nn.Linear(8, 3),
    ).eval()  # fmt: skip


def _data(net: nn.Module, x: Tensor) -> Dataset:
    with torch.no_grad():
        y = net(x).argmax(1)
    return Dataset(x, y, num_classes=3, name="toy")


def _read(net: nn.Module, layer: str, x: Tensor, metric: CoverageMetric | None = None) -> Tensor:
    """The layer's neuron values ``(N, P)`` under ``metric``'s granularity (element-wise by default)."""
    with torch.no_grad(), LayerProbe(net, [layer]) as probe:
        _, acts = probe.run(x)
    return acts[layer].flatten(1) if metric is None else metric.values(acts)[layer]


class Logged(Concolic):
    """Concolic recording each attempt with the number of kept tests before it (private: not an option)."""

    def __init__(self, **kw: object) -> None:
        super().__init__(**kw)  # type: ignore[arg-type]
        self._log: list[tuple[Attempt, int]] = []

    def propose(self, ctx: GenerationContext) -> tuple[Tensor, Tensor] | None:
        before = ctx.tests.shape[0]
        out = super().propose(ctx)
        if out is not None and self.last_attempt is not None:
            self._log.append((self.last_attempt, before))
        return out


def _run_logged(net: nn.Module, data: Dataset, metric: CoverageMetric, gen: Logged, **kw):  # type: ignore[no-untyped-def]
    res = run_generator(net, data.x, data.y, metric, gen, progress=False, **kw)
    return res, gen._log


# -- the LP step -----------------------------------------------------------------------------------------------------
def _region_grid(net: nn.Sequential, x0: Tensor, target_neuron: int, lo: Tensor, hi: Tensor, steps: int = 601):
    """Brute force: the l∞ distance from ``x0`` to the nearest grid point of ``x0``'s activation region (first ReLU
    layer's pattern) inside ``[lo, hi]`` whose second-layer pre-activation ``target_neuron`` is > 0; and over the
    whole box, ignoring the region."""
    g0 = torch.linspace(float(lo[0]), float(hi[0]), steps)
    g1 = torch.linspace(float(lo[1]), float(hi[1]), steps)
    pts = torch.cartesian_prod(g0, g1)
    with torch.no_grad():
        pre1 = net[0](pts)
        z = net[2](torch.relu(pre1))[:, target_neuron]
        pattern0 = net[0](x0[None]) > 0
    same = ((pre1 > 0) == pattern0).all(dim=1)
    dist = (pts - x0).abs().amax(dim=1)
    hit = z > 0
    in_region = dist[hit & same].min() if bool((hit & same).any()) else torch.tensor(math.inf)
    anywhere = dist[hit].min() if bool(hit.any()) else torch.tensor(math.inf)
    return float(in_region), float(anywhere), max(float(hi[0] - lo[0]), float(hi[1] - lo[1])) / (steps - 1)


def test_lp_finds_the_closest_input_of_the_linear_region_hand_made() -> None:
    # h = relu(x1 - .3, x2 - .3, .8 - x1 - x2); target z1 = h1 + 2 h2 + 10 h3 - .7 (off at x0 = (.5, .4)).
    # In x0's region (h1, h2 on, h3 off) z1 = x1 + 2 x2 - 1.6 > 0 needs t = 0.1; switching h3 on would need only
    # t = 1.3 / 17 = 0.0765, but that is another linear region, which the paper's LP does not search.
    net = nn.Sequential(nn.Linear(2, 3), nn.ReLU(), nn.Linear(3, 2), nn.ReLU(), nn.Linear(2, 2)).eval()
    with torch.no_grad():
        net[0].weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, -1.0]]))
        net[0].bias.copy_(torch.tensor([-0.3, -0.3, 0.8]))
        net[2].weight.copy_(torch.tensor([[1.0, 2.0, 10.0], [1.0, 1.0, 0.0]]))
        net[2].bias.copy_(torch.tensor([-0.7, 0.0]))
    x0 = torch.tensor([[0.5, 0.4]])
    gen = Concolic()
    res = run_generator(net, x0, torch.tensor([0]), NeuronCoverage(layers=["3"]), gen, budget=Budget(iterations=1),
                        progress=False)  # fmt: skip
    assert gen.last_attempt is not None and gen.last_attempt.target == NeuronTarget("3", 0, 0.0, math.inf)
    assert res.n_tests == 1
    t = float((res.tests[0] - x0[0]).abs().max())
    assert t == pytest.approx(0.1, abs=1e-3)
    region, anywhere, step = _region_grid(net, x0[0], 0, torch.zeros(2), torch.ones(2))
    assert t == pytest.approx(region, abs=step + 1e-3) and anywhere < region - 0.02
    assert bool(_read(net, "3", res.tests)[0, 0] > 0)  # the requirement holds on re-execution
    assert bool(((net[0](res.tests) > 0) == (net[0](x0) > 0)).all())  # in the same linear region


def test_lp_matches_brute_force_over_the_region_on_random_tiny_nets() -> None:
    eps = 0.3
    statuses = []
    for seed in range(6):
        net = nn.Sequential(nn.Linear(2, 4), nn.ReLU(), nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
        torch.manual_seed(seed)
        for p in net.parameters():
            nn.init.uniform_(p, -1.0, 1.0)
        x = torch.rand(3, 2)
        with torch.no_grad():  # second-layer neurons just below 0 on every seed: uncovered, but some reachable
            net[2].bias.zero_()
            pre = net[2](torch.relu(net[0](x)))
            net[2].bias.copy_(-pre.max(dim=0).values - torch.empty(3).uniform_(0.02, 0.2))
        net.eval()
        data = Dataset(x, torch.zeros(3, dtype=torch.long), num_classes=2, name="tiny")
        gen = Logged()
        res, log = _run_logged(net, data, NeuronCoverage(layers=["3"]), gen, threat=LpBall("linf", eps),
                               budget=Budget(iterations=6))  # fmt: skip
        inputs = torch.cat([x, res.tests])
        for a, before in log:
            x0, seed_x = inputs[a.input], x[a.origin]
            lo, hi = (seed_x - eps).clamp(0, 1), (seed_x + eps).clamp(0, 1)
            region, _, step = _region_grid(net, x0, a.target.neuron, lo, hi)
            statuses.append(a.status)
            if a.status == "solved":
                assert a.distance is not None
                t = float((res.tests[before] - x0).abs().max())
                assert t == pytest.approx(a.distance, abs=1e-6)
                # the grid's best is at most one step worse than the true optimum; the LP's adds the small margin
                assert region - step - 1e-6 <= t <= region + 1e-3
            else:
                assert a.status == "infeasible"
                assert math.isinf(region)  # no grid point of the region meets it either
    assert statuses.count("solved") >= 5 and statuses.count("infeasible") >= 5


# -- requirements met, threat set kept -------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "make, shape, metric",
    [
        (lambda: _net([6, 12, 10, 8, 3], 2), (6,), lambda: NeuronCoverage()),
        (lambda: _conv_net(0), (1, 6, 6), lambda: NeuronCoverage()),
        (lambda: _conv_net(0), (1, 6, 6), lambda: NeuronCoverage(threshold=0.2, granularity="channel", layers="1,4")),
        (lambda: _conv_net(2), (1, 6, 6), lambda: NeuronCoverage(threshold=0.1, layers=["2", "6:input"])),
    ],
    ids=["mlp", "conv-maxpool", "conv-channels", "maxpool-output-and-input-of-linear"],
)
def test_concolic_tests_meet_the_requirement_they_target_and_stay_in_the_threat_set(make, shape, metric) -> None:  # type: ignore[no-untyped-def]
    net, metric = make(), metric()
    torch.manual_seed(1)
    x = torch.rand(6, *shape)
    data = _data(net, x)
    threat = LpBall("linf", 0.3)
    gen = Logged()
    res, log = _run_logged(net, data, metric, gen, threat=threat, budget=Budget(iterations=25))
    solved = [(a, before) for a, before in log if a.status == "solved"]
    assert solved  # (most attempts of these random nets are infeasible: their linear regions are small)
    for a, before in solved:
        # a solved LP gives a test that meets its requirement, so it covers something new and is kept
        assert res.tests.shape[0] > before
        test = res.tests[before : before + 1]
        value = _read(net, a.target.layer, test, metric)[0, a.target.neuron]
        assert a.target.lower < float(value) <= a.target.upper
        assert int(res.origins[before]) == a.origin
    assert bool(threat.contains(res.tests, data.x[res.origins]).all())
    assert float(res.tests.min()) >= 0.0 and float(res.tests.max()) <= 1.0
    assert res.coverage.covered > res.seed_coverage.covered


def test_ranking_picks_the_shallowest_layer_and_the_input_closest_to_the_requirement() -> None:
    net = _net([6, 12, 10, 8, 3], 0)
    torch.manual_seed(1)
    data = _data(net, torch.rand(6, 6))
    gen = Logged()
    _, log = _run_logged(net, data, NeuronCoverage(), gen, budget=Budget(iterations=1))
    ((a, _),) = log
    with torch.no_grad():
        pre = net[0](data.x)  # the pre-activations of the first ReLU layer, "1"
    uncovered = ((pre > 0).sum(dim=0) == 0).nonzero().flatten()
    assert uncovered.numel() and a.target.layer == "1"
    best = pre[:, uncovered].max()  # DeepConcolic's ranking: the largest value of an uncovered neuron
    i, q = (pre[:, uncovered] == best).nonzero()[0].tolist()
    assert (a.input, a.target.neuron) == (i, int(uncovered[q]))


def test_deeper_layer_targets_use_the_activation_pattern() -> None:
    net = _conv_net(5)
    torch.manual_seed(2)
    data = _data(net, torch.rand(5, 1, 6, 6))
    gen = Logged()
    res, log = _run_logged(net, data, NeuronCoverage(layers=["7"]), gen, threat=LpBall("linf", 0.3),
                           budget=Budget(iterations=15))  # fmt: skip
    solved = [a for a, _ in log if a.status == "solved"]
    assert solved and all(a.rows > 0 for a, _ in log)  # ReLU and max-pooling rows of layers 1, 2 and 4
    assert res.coverage.covered > res.seed_coverage.covered


def test_the_region_is_exact_maxima_of_the_target_over_it_are_attained() -> None:
    """The affine model of the target on the linear region (ReLU signs, max-pooling argmaxes) is the network."""
    from scipy.optimize import linprog

    net = _conv_net(0)
    torch.manual_seed(2)
    x = torch.rand(3, 1, 6, 6)
    metric = NeuronCoverage(layers=["7"])
    layers = metric.bind(net)
    with torch.no_grad(), LayerProbe(net, layers) as probe:
        metric.update(probe.run(x)[1])
    ctx = GenerationContext(
        model=QueryCounter(net), metric=metric, layers=layers, seeds=x, seed_labels=torch.zeros(3, dtype=torch.long),
        tests=x[:0], origins=torch.zeros(0, dtype=torch.long), threat=None, domain=(0.0, 1.0),
        generator=torch.Generator(),
    )  # fmt: skip
    gen = Concolic()
    checked = 0
    for i in range(3):
        xf = x[i].flatten().double().numpy()
        lo, hi = np.clip(xf - 0.3, 0, 1), np.clip(xf + 0.3, 0, 1)
        for j in range(8):
            rows, g, c0, _ = gen.region(ctx, "7", NeuronTarget("7", j, 0.0, math.inf), i)
            assert rows.shape[1] == xf.size + 1 and rows.shape[0] >= 108  # 108 ReLU rows of layer 1, ...
            assert float((rows[:, :-1] @ xf + rows[:, -1]).min()) >= -1e-6  # x0 is in its own region
            for sign in (1.0, -1.0):
                sol = linprog(-sign * g, A_ub=-rows[:, :-1], b_ub=rows[:, -1], bounds=np.column_stack([lo, hi]),
                              method="highs")  # fmt: skip
                assert sol.status == 0
                pt = torch.tensor(sol.x, dtype=torch.float32).view(1, 1, 6, 6)
                pre = float(_read(net, "6", pt)[0, j])
                assert pre == pytest.approx(float(g @ sol.x + c0), abs=1e-4)
                pattern = [(net[:2](pt) > 0), (net[:5](pt) > 0)]
                same = [(net[:2](x[i : i + 1]) > 0), (net[:5](x[i : i + 1]) > 0)]
                # signs agree but for neurons left exactly at 0 by the optimum
                for p, q, mod in zip(pattern, same, (net[:1], net[:4])):
                    zero = mod(pt).abs() < 1e-5
                    assert bool(((p == q) | zero).all())
                checked += 1
    assert checked == 48


def _ctx(net: nn.Module, layer: str, x: Tensor, threat: LpBall | None = None) -> GenerationContext:
    metric = NeuronCoverage(layers=[layer])
    layers = metric.bind(net)
    with torch.no_grad(), LayerProbe(net, layers) as probe:
        metric.update(probe.run(x)[1])
    return GenerationContext(
        model=QueryCounter(net), metric=metric, layers=layers, seeds=x,
        seed_labels=torch.zeros(len(x), dtype=torch.long), tests=x[:0], origins=torch.zeros(0, dtype=torch.long),
        threat=threat, domain=(0.0, 1.0),
        generator=torch.Generator(),
    )  # fmt: skip


def test_the_cone_is_the_receptive_field_of_the_target() -> None:
    """The cone of a second-layer convolution neuron: the 3x3 window of the first layer (all channels), the 5x5
    window of the input, whatever the input's activation pattern."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.Conv2d(2, 2, 3), nn.ReLU()).eval()
    x = torch.rand(2, 1, 7, 7)
    ctx = _ctx(net, "3", x)
    gen = Concolic()
    gen._bind(ctx)
    gen._update_values(ctx)
    for i, (c, p, q) in itertools.product(range(2), [(0, 0, 0), (1, 2, 1), (0, 2, 2)]):
        cone = gen._cone(ctx, x[i], "3", NeuronTarget("3", c * 9 + p * 3 + q, 0.0, math.inf))
        assert cone is not None and set(cone) == {-1, 1}
        want = torch.zeros(2, 5, 5, dtype=torch.bool)
        want[:, p : p + 3, q : q + 3] = True
        assert torch.equal(cone[1], want.flatten())
        want_x = torch.zeros(1, 7, 7, dtype=torch.bool)
        want_x[:, p : p + 5, q : q + 5] = True
        assert torch.equal(cone[-1], want_x.flatten())


def test_the_cone_lp_meets_the_requirement_and_is_at_least_as_close_as_the_full_one() -> None:
    """The cone's region contains the full one's: every requirement the paper's LP solves the cone's solves, at no
    larger distance, and its solution meets the requirement on re-execution."""
    solved = closer = 0
    for seed in range(6):
        net = _conv_net(seed)
        torch.manual_seed(100 + seed)
        x = torch.rand(2, 1, 6, 6)
        for layer in ("4", "7"):
            ctx = _ctx(net, layer, x, LpBall("linf", 0.3))
            values = _read(net, str(int(layer) - 1), x)
            gens = {mode: Concolic(region=mode) for mode in ("cone", "full")}
            for g in gens.values():
                g._bind(ctx)
                g._update_values(ctx)
            for i, j in itertools.product(range(2), range(values.shape[1])):
                if float(values[i, j]) > 0:
                    continue
                target = NeuronTarget(layer, j, 0.0, math.inf)
                lo, hi = gens["cone"]._box(ctx, i, x[i])
                got = {m: g._solve_lp(ctx, layer, target, i, x[i], lo, hi) for m, g in gens.items()}
                cand, status, dist, _ = got["cone"]
                if got["full"][1] == "solved":
                    assert status == "solved" and dist is not None and dist <= got["full"][2] + 1e-6
                    closer += dist < got["full"][2] - 1e-6
                if status == "solved":
                    assert cand is not None and bool(((cand >= lo - 1e-7) & (cand <= hi + 1e-7)).all())
                    assert float(_read(net, str(int(layer) - 1), cand[None])[0, j]) > 0
                    solved += 1
    assert solved >= 20 and closer >= 1


def test_the_ascent_restart_solves_more_requirements_and_each_solution_meets_its_requirement() -> None:
    """``ascent``: where x0's region cannot meet the requirement, the LP over the region a gradient climb reaches
    solves more requirements; nothing the plain LP solved is lost, every solution stays in the box and meets it."""
    plain_solved = more = 0
    for seed in range(6):
        net = _conv_net(seed)
        torch.manual_seed(200 + seed)
        x = torch.rand(3, 1, 6, 6)
        ctx = _ctx(net, "7", x, LpBall("linf", 0.3))
        values = _read(net, "6", x)
        gens = {k: Concolic(ascent=k) for k in (0, 20)}
        for g in gens.values():
            g._bind(ctx)
            g._update_values(ctx)
        for i, j in itertools.product(range(3), range(values.shape[1])):
            if float(values[i, j]) > 0:
                continue
            target = NeuronTarget("7", j, 0.0, math.inf)
            lo, hi = gens[0]._box(ctx, i, x[i])
            got = {k: g._solve_lp(ctx, "7", target, i, x[i], lo, hi) for k, g in gens.items()}
            if got[0][1] == "solved":
                plain_solved += 1
                assert got[20][1] == "solved" and got[20][2] == pytest.approx(got[0][2])
            elif got[20][1] == "solved":
                more += 1
            cand = got[20][0]
            if cand is not None:
                assert bool(((cand >= lo - 1e-7) & (cand <= hi + 1e-7)).all())
                assert float(_read(net, "6", cand[None])[0, j]) > 0
    assert plain_solved >= 5 and more >= 8  # 7 and 12 of 76 requirements at the time of writing


@pytest.mark.parametrize("queries", [7, 40, 150])
def test_the_ascent_keeps_within_the_query_budget(queries: int) -> None:
    net = _conv_net(1)
    torch.manual_seed(5)
    data = _data(net, torch.rand(4, 1, 6, 6))
    res = run_generator(net, data.x, data.y, NeuronCoverage(layers=["7"]), Concolic(ascent=20),
                        threat=LpBall("linf", 0.3), budget=Budget(iterations=None, queries=queries),
                        progress=False)  # fmt: skip
    assert res.queries <= queries


class Band(CoverageMetric):
    """A hand-made interval criterion: neuron value in (lo, hi]."""

    name = "band-test"

    def __init__(self, lo: float, hi: float, **kw) -> None:  # type: ignore[no-untyped-def]
        super().__init__(**kw)
        self.lo, self.hi = lo, hi

    def params(self) -> dict[str, object]:
        return {"lo": self.lo, "hi": self.hi, **super().params()}

    def satisfied(self, layer: str, values: Tensor) -> Tensor:
        return (values > self.lo) & (values <= self.hi)

    def target(self, layer: str, item: int) -> NeuronTarget:
        return NeuronTarget(layer, int(item), self.lo, self.hi)


@pytest.mark.parametrize("layer, lo, hi", [("1", 0.3, 0.35), ("2", -0.2, -0.1), ("3", -1.0, 0.0)])
def test_interval_requirements_on_relu_and_linear_layers(layer: str, lo: float, hi: float) -> None:
    # layer 1: a ReLU output in (0.3, 0.35]; layer 2: a Linear output; layer 3: a ReLU output in (-1, 0], i.e. off
    net = _net([6, 12, 10, 3], 1)
    torch.manual_seed(4)
    data = _data(net, torch.rand(4, 6))
    gen = Logged()
    res, log = _run_logged(net, data, Band(lo, hi, layers=[layer]), gen, threat=LpBall("linf", 0.5),
                           budget=Budget(iterations=12))  # fmt: skip
    solved = [(a, before) for a, before in log if a.status == "solved"]
    assert solved
    for a, before in solved:
        value = float(_read(net, layer, res.tests[before : before + 1])[0, a.target.neuron])
        assert lo < value <= hi
    assert res.coverage.covered > res.seed_coverage.covered


def test_unreachable_requirements_are_given_up_and_the_run_stops() -> None:
    net = _net([4, 3, 2], 0)
    with torch.no_grad():  # neuron 2 can never switch on in [0, 1]^4
        net[0].weight[2] = torch.tensor([-1.0, -1.0, -1.0, -1.0])
        net[0].bias[2] = -0.5
    data = _data(net, torch.rand(5, 4))
    gen = Concolic(tries=2)
    res = run_generator(net, data.x, data.y, NeuronCoverage(), gen, budget=Budget(iterations=50), progress=False)
    assert ("1", 2) in gen.given_up()
    assert res.iterations < 50  # nothing left to try: propose returned None
    state = gen.state_dict()
    other = Concolic(tries=2)
    other.load_state_dict(state)
    assert other.given_up() == gen.given_up()


# -- the digits CNN --------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def digits_cnn():  # type: ignore[no-untyped-def]
    from bastion.data import load_digits
    from bastion.defenses.training import train
    from bastion.models import build_model

    data = load_digits()
    train_set, test_set = data.split(1500)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = build_model("cnn", (1, 8, 8), 10)
        train(model, train_set, epochs=2, progress=False)
    return model.eval(), test_set


def test_digits_cnn_nc_rises_and_adversarial_tests_are_reported(digits_cnn) -> None:  # type: ignore[no-untyped-def]
    model, test_set = digits_cnn
    seeds = test_set.subset(range(20))
    threat = LpBall("linf", 0.3)
    res = generate_tests(model, seeds, "nc", "concolic", threat=threat, budget=30, progress=False)
    assert res.coverage.covered >= res.seed_coverage.covered + 20
    assert res.n_tests >= 20
    assert bool(threat.contains(res.tests, seeds.x[res.origins]).all())
    assert torch.equal(res.adversarial, res.predictions != seeds.y[res.origins])
    # reported as adversarial: tests whose prediction differs from the seed's label. On this briefly trained model
    # (about 63 % accuracy) these come mostly from misclassified seeds; the LP's minimal steps from a correctly
    # classified seed rarely flip the label within 30 iterations (2 in 300 measured), so only "some" is asserted.
    assert bool(res.adversarial.any())


def test_l0_mode_changes_few_features(digits_cnn) -> None:  # type: ignore[no-untyped-def]
    model, test_set = digits_cnn
    seeds = test_set.subset(range(10))
    threat = LpBall("l0", 4)
    gen = Logged(norm="l0")
    res, log = _run_logged(model, seeds, NeuronCoverage(), gen, threat=threat, budget=Budget(iterations=10))
    solved = [(a, before) for a, before in log if a.status == "solved"]
    assert solved and res.n_tests >= len(solved) // 2
    assert bool(threat.contains(res.tests, seeds.x[res.origins]).all())
    for a, _ in solved:
        assert a.distance is not None and 1 <= a.distance <= 4
    changed = (res.tests != seeds.x[res.origins]).flatten(1).sum(dim=1)
    assert int(changed.max()) <= 4
    assert res.coverage.covered > res.seed_coverage.covered
    # deeper targets need more features, still few of the 64
    gen = Logged(norm="l0")
    res, log = _run_logged(model, seeds, NeuronCoverage(layers=["9"]), gen, budget=Budget(iterations=6))
    counts = [a.distance for a, _ in log if a.status == "solved"]
    assert counts and max(counts) <= 20  # type: ignore[type-var]


# -- checkpoint and resume -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("norm", ["linf", "l0"])
def test_resume_gives_the_uninterrupted_suite(tmp_path: Path, norm: str) -> None:
    net = _conv_net(5)
    torch.manual_seed(6)
    data = _data(net, torch.rand(5, 1, 6, 6))
    threat = LpBall("linf", 0.25)

    def run(n: int, ckpt: Path | None):  # type: ignore[no-untyped-def]
        return generate_tests(net, data, "nc", "concolic", threat=threat, budget=n, checkpoint=ckpt, progress=False,
                              norm=norm)  # fmt: skip

    full = run(12, None)
    ckpt = tmp_path / "concolic.ckpt"
    part = run(6, ckpt)
    assert part.iterations == 6 and part.n_tests < full.n_tests
    resumed = run(12, ckpt)
    assert torch.equal(resumed.tests, full.tests) and torch.equal(resumed.origins, full.origins)
    assert resumed.iterations == full.iterations and resumed.queries == full.queries


# -- bad input -------------------------------------------------------------------------------------------------------
class Pairs(CoverageMetric):
    """A criterion whose items are not conditions on one neuron (no target())."""

    name = "pairs-test"

    def satisfied(self, layer: str, values: Tensor) -> Tensor:
        return values[:, :-1] * values[:, 1:] > 0


def test_a_criterion_without_targets_is_one_clear_error() -> None:
    net = _net([6, 8, 3], 0)
    data = _data(net, torch.rand(4, 6))
    with pytest.raises(InputError, match=r"needs a criterion whose items are conditions on single neurons.*pairs-test"):
        run_generator(net, data.x, data.y, Pairs(), Concolic(), budget=Budget(iterations=3), progress=False)


def test_unsupported_networks_and_options_are_refused() -> None:
    torch.manual_seed(0)
    sig = nn.Sequential(nn.Linear(4, 5), nn.Sigmoid(), nn.Linear(5, 5), nn.ReLU(), nn.Linear(5, 2)).eval()
    data = _data(sig, torch.rand(3, 4))
    with pytest.raises(InputError, match=r"module '1' \(Sigmoid\).*layer under test '3'.*norm='l0'"):
        run_generator(sig, data.x, data.y, NeuronCoverage(layers=["3"]), Concolic(), budget=Budget(iterations=2),
                      progress=False)  # fmt: skip
    # the L0 heuristic only evaluates the model: fine
    run_generator(sig, data.x, data.y, NeuronCoverage(layers=["3"]), Concolic(norm="l0"),
                  budget=Budget(iterations=2), progress=False)  # fmt: skip

    class Functional(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc1, self.fc2, self.fc3 = nn.Linear(4, 6), nn.Linear(6, 6), nn.Linear(6, 2)

        def forward(self, x: Tensor) -> Tensor:
            return self.fc3(F.relu(self.fc2(F.relu(self.fc1(x)))))

    fn = Functional().eval()
    with pytest.raises(InputError, match=r"nonlinear function 'relu'"):
        run_generator(fn, data.x, data.y, NeuronCoverage(), Concolic(), budget=Budget(iterations=2), progress=False)
    inplace = nn.Sequential(nn.Linear(4, 5), nn.ReLU(inplace=True), nn.Linear(5, 2)).eval()
    with pytest.raises(InputError, match=r"in-place ReLU"):
        run_generator(inplace, data.x, data.y, NeuronCoverage(layers=["1"]), Concolic(), budget=Budget(iterations=2),
                      progress=False)  # fmt: skip
    bad_options = ({"norm": "l2"}, {"margin": -1.0}, {"tries": 0}, {"time_limit": 0}, {"l0_values": 1},
                   {"region": "all"}, {"ascent": -1}, {"ascent": 2.5})  # fmt: skip
    for bad in bad_options:
        with pytest.raises(InputError):
            Concolic(**bad)  # type: ignore[arg-type]
    assert GENERATORS["concolic"] is Concolic
    assert repr(Concolic()).startswith("Concolic(norm='linf', margin=0.0001, tries=3")
