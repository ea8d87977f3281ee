"""Score-based black-box attacks (ZOO, AutoZOOM, NES, Bandits-TD, SimBA, SimBA-DCT) through the oracle.

Every attack: inside the threat set (the domain for the minimal-distortion ones), success re-verified by prediction,
never more queries than its budget by an independent count, most of PGD's successes found, far more than random
search with the same queries, targeted mode, and one query for an already misclassified sample.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from bastion.attacks import (
    ATTACKS,
    NES,
    PGD,
    ZOO,
    Attack,
    AutoZOOM,
    BanditsTD,
    SimBA,
    SimBADCT,
    make_attack,
)
from bastion.attacks.blackbox.simba import dct_matrix, strided_rank
from bastion.errors import InputError
from bastion.models.oracle import BlackBox
from bastion.threat import LpBall

LINF, L2 = LpBall("linf", 0.15), LpBall("l2", 1.0)
UNBOUNDED = LpBall("l2", math.inf)

#: (attack, threat it runs in, radius its success is read at, per-sample query budget)
CASES: list[tuple[Attack, LpBall, float, int]] = [
    (NES(queries=600), LINF, 0.15, 600),
    (NES(queries=600, samples=20), L2, 1.0, 600),
    (BanditsTD(queries=600), LINF, 0.15, 600),
    (BanditsTD(queries=600, prior_size=4), L2, 1.0, 600),
    (SimBA(queries=400), L2, 1.0, 400),
    (SimBA(queries=400), LINF, 0.15, 400),
    (SimBADCT(queries=400), L2, 1.0, 400),
    (ZOO(queries=6000, binary_steps=2, iterations=90, coordinates=16, initial_const=1.0, attack_size=4,
         hierarchy=(30,)), UNBOUNDED, 1.0, 6000),
    (AutoZOOM(queries=1500, iterations=400, switch_every=50), UNBOUNDED, 1.0, 1500),
]  # fmt: skip
IDS = [f"{type(a).__name__}-{t.norm}" for a, t, _, _ in CASES]


class Counter(nn.Module):
    """An independent count of the inputs that reach the model, below the oracle."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model, self.rows = model, 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        assert not torch.is_grad_enabled() and not x.requires_grad  # no attack here ever builds a graph
        self.rows += x.shape[0]
        return self.model(x)


@pytest.fixture(scope="module")
def digits_model(
    digits_mlp64: tuple[nn.Module, torch.Tensor, torch.Tensor],
) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """The shared digits MLP (tests/conftest.py) in eval mode and 48 held-out test images."""
    model, x, y = digits_mlp64
    return model.eval(), x[:48], y[:48]


@pytest.fixture(scope="module")
def runs(digits_model) -> dict[str, tuple]:
    """Each case run once on an oracle over an independent counter, shared by the tests below."""
    model, x, y = digits_model
    out = {}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # module fixtures run before the autouse one-thread fixture; tiny ops want one thread
    try:
        for (attack, threat, _, _), key in zip(CASES, IDS):
            counter = Counter(model)
            oracle = BlackBox(counter)
            out[key] = (attack(oracle, x, y, threat=threat, seed=0), counter, oracle)
    finally:
        torch.set_num_threads(threads)
    return out


def random_search(model: nn.Module, x: torch.Tensor, y: torch.Tensor, threat: LpBall, tries: int) -> torch.Tensor:
    """Baseline: ``tries`` uniform random points of the ball per sample; success where any is misclassified."""
    g = torch.Generator().manual_seed(0)
    hit = torch.zeros(x.shape[0], dtype=torch.bool)
    with torch.no_grad():
        for start in range(0, tries, 100):
            k = min(100, tries - start)
            points = threat.random_start(x.repeat(k, 1, 1, 1), g)
            hit |= (model(points).argmax(dim=1) != y.repeat(k)).reshape(k, -1).any(dim=0)
    return hit


@pytest.mark.parametrize("case", range(len(CASES)), ids=IDS)
def test_contract_inside_the_threat_set_verified_and_within_budget(digits_model, runs, case: int) -> None:
    model, x, y = digits_model
    attack, threat, _, budget = CASES[case]
    res, counter, oracle = runs[IDS[case]]
    assert res.x_adv.shape == x.shape and bool(torch.isfinite(res.x_adv).all())
    assert bool(threat.contains(res.x_adv, x).all())  # the ball ∩ domain; the domain for minimal attacks
    with torch.no_grad():
        pred, clean = model(res.x_adv).argmax(dim=1), model(x).argmax(dim=1)
    torch.testing.assert_close(res.success, pred != y)
    torch.testing.assert_close(res.distance[res.success], threat.distance(res.x_adv, x)[res.success])
    assert res.grad_calls == 0 and res.queries is not None
    # the independent count agrees with the per-sample report; nobody spent more than the budget
    assert counter.rows == oracle.queries == int(res.queries.sum()) == res.model_calls
    assert bool((res.queries <= budget + 2).all()), int(res.queries.max())  # + the clean query and the re-check
    assert bool((res.queries[clean != y] == 1).all())
    if not attack.minimal:
        # samples stop at their first success: broken ones used a part of the budget only
        broken = res.success & (clean == y)
        assert float(res.queries[broken].float().median()) < 0.75 * budget
        assert int(res.queries[broken].min()) < budget / 10


@pytest.mark.parametrize("case", range(len(CASES)), ids=IDS)
def test_finds_most_of_pgds_successes_and_beats_random_search(digits_model, runs, case: int) -> None:
    model, x, y = digits_model
    attack, threat, eps, budget = CASES[case]
    res = runs[IDS[case]][0]
    ball = LpBall(threat.norm, eps)
    broken = res.distance <= eps * (1 + 1e-5) + 1e-6 if attack.minimal else res.success
    pgd = PGD(steps=50)(model, x, y, threat=ball).success
    assert int(pgd.sum()) >= 0.6 * x.shape[0]
    assert int((broken & pgd).sum()) >= 0.6 * int(pgd.sum()), (int((broken & pgd).sum()), int(pgd.sum()))
    noise = random_search(model, x, y, ball, budget)
    assert float(broken.float().mean()) >= float(noise.float().mean()) + 0.25, (broken.float().mean(), noise.mean())


@pytest.mark.parametrize(
    "attack,threat",
    [
        (NES(queries=800), LpBall("linf", 0.3)),
        (BanditsTD(queries=800, prior_size=4), LpBall("l2", 2.0)),
        (SimBA(queries=800), LpBall("l2", 2.0)),
        (SimBADCT(queries=800), LpBall("l2", 2.0)),
        (AutoZOOM(queries=1500, iterations=400, switch_every=50), UNBOUNDED),
        (ZOO(queries=6000, binary_steps=2, iterations=90, coordinates=16, initial_const=1.0, attack_size=4), UNBOUNDED),
    ],
    ids=lambda v: type(v).__name__ if isinstance(v, Attack) else v.key,
)
def test_targeted_mode_reaches_the_targets(digits_model, attack: Attack, threat: LpBall) -> None:
    model, x, y = digits_model
    x, y = x[:24], y[:24]
    targets = (y + 1) % 10
    res = attack(BlackBox(model), x, y, threat=threat, targets=targets)
    with torch.no_grad():
        pred = model(res.x_adv).argmax(dim=1)
    torch.testing.assert_close(res.success, pred == targets)
    assert bool(threat.contains(res.x_adv, x).all())
    assert res.success_rate >= 0.7, res.success_rate


@pytest.mark.parametrize("case", range(len(CASES)), ids=IDS)
def test_an_already_misclassified_sample_costs_one_query_and_returns_the_input(digits_model, case: int) -> None:
    model, x, _ = digits_model
    attack, threat, _, _ = CASES[case]
    x = x[:6]
    with torch.no_grad():
        wrong = (model(x).argmax(dim=1) + 1) % 10  # labels the model gets wrong for every sample
    counter = Counter(model)
    res = attack(BlackBox(counter), x, wrong, threat=threat)
    assert counter.rows == x.shape[0] and res.queries is not None and bool((res.queries == 1).all())
    torch.testing.assert_close(res.x_adv, x, rtol=0, atol=0)
    assert bool(res.success.all()) and bool((res.distance == 0).all())


@pytest.mark.parametrize("case", [0, 2, 4, 6, 7, 8], ids=[IDS[i] for i in (0, 2, 4, 6, 7, 8)])
def test_oracle_budgets_cap_every_attack(digits_model, case: int) -> None:
    model, x, y = digits_model
    attack, threat, _, _ = CASES[case]
    x, y = x[:16], y[:16]
    counter = Counter(model)
    oracle = BlackBox(counter, sample_budget=40, budget=16 * 30)
    res = attack(oracle, x, y, threat=threat)
    assert res.queries is not None and bool((res.queries <= 40).all())
    assert counter.rows == oracle.queries == int(res.queries.sum()) <= 16 * 30
    with torch.no_grad():
        torch.testing.assert_close(res.success, model(res.x_adv).argmax(dim=1) != y)


def test_minimal_attacks_fine_tune_or_stop_at_the_first_success(digits_model) -> None:
    model, x, y = digits_model
    x, y = x[:24], y[:24]
    for build in (
        lambda tune: AutoZOOM(queries=1500, iterations=400, switch_every=50, fine_tune=tune),
        lambda tune: ZOO(queries=6000, binary_steps=2, iterations=90, coordinates=16, initial_const=1.0,
                         attack_size=4, fine_tune=tune),
    ):  # fmt: skip
        tuned, first = build(True)(model, x, y, threat=UNBOUNDED), build(False)(model, x, y, threat=UNBOUNDED)
        assert tuned.queries is not None and first.queries is not None
        both = tuned.success & first.success
        assert int(both.sum()) >= 18
        # stopping at the first success saves queries; fine-tuning buys a smaller distortion with them
        assert int(first.queries.sum()) < 0.7 * int(tuned.queries.sum())
        assert float(tuned.distance[both].mean()) < float(first.distance[both].mean())
        assert float((tuned.distance[both] <= first.distance[both]).float().mean()) >= 0.6


def test_hopeless_models_end_in_time_without_nan(digits_model) -> None:
    _, x, y = digits_model
    x, y = x[:8], torch.zeros(8, dtype=torch.long)
    constant = BlackBox(lambda t: torch.zeros(t.shape[0], 10))  # argmax 0 everywhere: class 0 cannot be left
    huge = BlackBox(lambda t: torch.cat([1e30 * torch.ones(t.shape[0], 1), torch.zeros(t.shape[0], 9)], dim=1))
    for oracle in (constant, huge):
        for attack, threat in (
            (NES(queries=200, samples=10), LINF),
            (BanditsTD(queries=200, prior_size=4), L2),
            (SimBA(queries=200), L2),
            (SimBADCT(queries=200), LINF),
            (ZOO(queries=400, binary_steps=2, iterations=20, coordinates=8), UNBOUNDED),
            (AutoZOOM(queries=200, iterations=100), UNBOUNDED),
        ):
            res = attack(oracle, x, y, threat=threat)
            assert bool(torch.isfinite(res.x_adv).all()) and not bool(res.success.any())
            cap = 400 if isinstance(attack, ZOO) else 200
            assert res.queries is not None and bool((res.queries <= cap + 2).all())
    # SimBA stops after a pass over the basis without improvement instead of spending all of its budget
    res = SimBA(queries=10_000)(constant, x, y, threat=L2)
    assert res.queries is not None and bool((res.queries <= 2 * 64 + 2).all())


def test_deterministic_with_a_seed(digits_model) -> None:
    model, x, y = digits_model
    for attack, threat in (
        (NES(queries=200), LINF),
        (BanditsTD(queries=200, prior_size=4), L2),
        (SimBADCT(queries=100), L2),
    ):
        a = attack(model, x, y, threat=threat, seed=3)
        b = attack(model, x, y, threat=threat, seed=3)
        c = attack(model, x, y, threat=threat, seed=4)
        torch.testing.assert_close(a.x_adv, b.x_adv, rtol=0, atol=0)
        assert a.queries is not None and b.queries is not None
        torch.testing.assert_close(a.queries, b.queries)
        assert not torch.equal(a.x_adv, c.x_adv)


def test_dct_basis_and_strided_order() -> None:
    from scipy.fft import dct

    d = dct_matrix(8, dtype=torch.float64)
    torch.testing.assert_close(d @ d.T, torch.eye(8, dtype=torch.float64))
    e = torch.eye(8, dtype=torch.float64)
    torch.testing.assert_close(d @ e, torch.as_tensor(dct(e.numpy(), axis=0, norm="ortho")))
    # the reference's example of the block order (initial_size 2, stride 1) on a 3 × 3 grid, as stages
    torch.testing.assert_close(strided_rank(3, 3, 2, 1), torch.tensor([[0, 0, 1], [0, 0, 1], [1, 1, 1]]))
    # SimBA-DCT tries the low-frequency block first, every channel's, then the rings outwards
    x = torch.rand(5, 3, 16, 16)
    order = SimBADCT(freq_dims=4, stride=2)._order(x, torch.Generator().manual_seed(0))
    rank = strided_rank(16, 16, 4, 2).reshape(-1).repeat(3)
    stages = rank[order]
    assert bool((stages[:, : 3 * 16] == 0).all()) and bool((stages.diff(dim=1) >= 0).all())
    # its directions are unit vectors, orthogonal to each other
    basis = SimBADCT()._direction(x[:1].expand(6, -1, -1, -1), order[0, :6]).flatten(1)
    torch.testing.assert_close(basis @ basis.T, torch.eye(6), atol=1e-5, rtol=0)


def test_zoo_grows_its_attack_space_with_importance_sampling() -> None:
    zoo = ZOO(attack_size=4, hierarchy=(5,))
    from bastion.attacks.blackbox.zoo import _initial_space

    space = _initial_space(torch.zeros(2, 3, 16, 16), 4)
    assert space.shape == (3, 4, 4) and space.reduced
    delta = torch.zeros(2, 48)
    delta[0, 0] = 1.0  # one large coordinate in the first region of channel 0
    grown, new_delta, prob = zoo._grow(space, delta)
    assert grown.shape == (3, 8, 8) and new_delta.shape == (2, 192) and prob is not None
    torch.testing.assert_close(prob.sum(dim=1), torch.ones(2))
    assert bool((prob > 0).all())  # mixed with the uniform distribution: every coordinate can be drawn
    assert float(prob[0].max()) > 10 * float(prob[0].min()) and torch.allclose(prob[1], prob[1][0].expand(192))
    assert _initial_space(torch.zeros(2, 1, 8, 8), 32).shape == (1, 8, 8)  # small images are not reduced


def test_bad_options_and_inputs_are_rejected(digits_model) -> None:
    model, x, y = digits_model
    for build, message in (
        (lambda: NES(samples=5), "even"),
        (lambda: NES(queries=0), "queries"),
        (lambda: NES(momentum=1.0), "momentum"),
        (lambda: NES(loss="dlr"), "loss"),  # type: ignore[arg-type]
        (lambda: BanditsTD(prior_size=0), "prior_size"),
        (lambda: BanditsTD(exploration=-1.0), "exploration"),
        (lambda: SimBA(step_size=0.0), "step_size"),
        (lambda: SimBADCT(freq_dims=0), "freq_dims"),
        (lambda: ZOO(coordinates=0), "coordinates"),
        (lambda: ZOO(beta1=1.0), "beta1"),
        (lambda: ZOO(hierarchy=5), "hierarchy"),  # type: ignore[arg-type]
        (lambda: AutoZOOM(directions=0), "directions"),
        (lambda: AutoZOOM(kappa=-1.0), "kappa"),
    ):
        with pytest.raises(InputError, match=message):
            build()
    with pytest.raises(InputError, match="supports the norms"):
        NES(queries=10)(model, x, y, threat=LpBall("l1", 1.0))
    with pytest.raises(InputError, match="supports the norms"):
        ZOO()(model, x, y, threat=LINF)
    flat = nn.Sequential(nn.Flatten(), model)
    with pytest.raises(InputError, match=r"\(N, C, H, W\)"):
        SimBADCT(queries=10)(flat, x.flatten(1), y, threat=L2)
    res = BanditsTD(queries=30, prior_size=4)(flat, x.flatten(1), y, threat=L2)  # flat inputs: no data prior
    assert res.queries is not None and bool((res.queries <= 31).all())


def test_registered_with_the_papers_defaults() -> None:
    for name, cls in (("nes", NES), ("bandits-td", BanditsTD), ("simba", SimBA), ("simba-dct", SimBADCT),
                      ("zoo", ZOO), ("autozoom", AutoZOOM)):  # fmt: skip
        assert ATTACKS[name] is cls and cls.access == "score" and cls.budgeted
    assert ZOO.minimal and AutoZOOM.minimal and not NES.minimal
    assert NES().options() == {
        "queries": 10000, "samples": 50, "sigma": 1e-3, "lr": None, "momentum": 0.9, "plateau_length": 5,
        "plateau_drop": 2.0, "min_lr_ratio": 200.0, "loss": "ce",
    }  # fmt: skip
    assert NES().step_size(LpBall("linf", 0.05)) == pytest.approx(0.01)  # the paper's step at its radius
    assert BanditsTD().settings(LpBall("linf", 0.05)) == pytest.approx((1.0, 0.1, 100.0, 0.01))
    assert BanditsTD().settings(LpBall("l2", 5.0)) == pytest.approx((0.01, 0.01, 0.1, 0.5))
    assert SimBA().step_size == 0.2
    zoo = ZOO()
    assert (zoo.binary_steps, zoo.coordinates, zoo.lr, zoo.initial_const) == (9, 128, 0.01, 0.01)
    auto = AutoZOOM()
    assert (auto.initial_const, auto.directions, auto.lr) == (10.0, 4, 0.01)
    built = make_attack("simba-dct", queries=50.0, freq_dims=4)
    assert repr(built) == "SimBADCT(queries=50, step_size=0.2, freq_dims=4, stride=None)"
    assert repr(make_attack("zoo", queries="none")).startswith("ZOO(queries=None")


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_score_attacks_run_on_cuda(digits_model) -> None:
    model, x, y = digits_model
    gpu = BlackBox(model.to("cuda"))
    try:
        for attack, threat in (
            (NES(queries=200), LINF),
            (BanditsTD(queries=200, prior_size=4), L2),
            (SimBA(queries=200), L2),
            (SimBADCT(queries=200), L2),
            (ZOO(queries=600, binary_steps=2, iterations=20, coordinates=16), UNBOUNDED),
            (AutoZOOM(queries=400, iterations=100), UNBOUNDED),
        ):
            res = attack(gpu, x, y, threat=threat)
            assert res.x_adv.device.type == "cuda" and res.queries is not None and res.queries.device.type == "cuda"
            assert bool(threat.contains(res.x_adv, x.cuda()).all()) and res.success_rate > 0.3
    finally:
        model.to("cpu")
