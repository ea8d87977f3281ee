"""Decision-based black-box attacks (Boundary, HopSkipJump, OPT, Sign-OPT, RayS) through a labels-only oracle.

Every attack: inside the domain, success re-verified by prediction, never a score read, never more queries than its
budget by an independent count (in total and per sample), far more successes than random search with the same
queries, the exact distance to the boundary of a linear model approached (and never undercut), targeted mode,
one query for an already misclassified sample, budgets that stop it cleanly, and no start found reported as failure.
"""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
from torch import nn

from bastion.attacks import ATTACKS, OPT, Attack, BoundaryAttack, HopSkipJump, RayS, SignOPT, make_attack
from bastion.attacks.blackbox._decision import FINAL_PUSH, DecisionAttack, LabelSearch
from bastion.attacks.blackbox.signopt import ray_search
from bastion.data import load_digits
from bastion.errors import InputError
from bastion.models.oracle import BlackBox
from bastion.threat import LpBall

L2, LINF = LpBall("l2", math.inf), LpBall("linf", math.inf)

#: (attack, threat it runs in, radius its success is compared with random search at, per-sample query budget)
CASES: list[tuple[Attack, LpBall, float, int]] = [
    (BoundaryAttack(queries=1500), L2, 1.0, 1500),
    (HopSkipJump(queries=600), L2, 1.0, 600),
    (HopSkipJump(queries=800), LINF, 0.15, 800),
    (OPT(queries=1200), L2, 1.0, 1200),
    (SignOPT(queries=600), L2, 1.0, 600),
    (RayS(queries=600), LINF, 0.15, 600),
]
IDS = [f"{type(a).__name__}-{t.norm}" for a, t, _, _ in CASES]


class Labels(nn.Module):
    """The model behind a labels-only wall, with an independent count of every input that reaches it."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model, self.rows, self.calls = model, 0, 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        assert not torch.is_grad_enabled() and not x.requires_grad
        self.rows += x.shape[0]
        self.calls += 1
        return self.model(x).argmax(dim=1)


def with_budget(attack: Attack, queries: int) -> Attack:
    """The same attack class with its defaults and another query budget."""
    return type(attack)(queries=queries)  # type: ignore[call-arg]


def labels_oracle(model: nn.Module, **budgets: Any) -> tuple[BlackBox, Labels]:
    counter = Labels(model)
    return BlackBox(counter, returns="labels", num_classes=10, **budgets), counter


@pytest.fixture(scope="module")
def digits_model(
    digits_mlp64: tuple[nn.Module, torch.Tensor, torch.Tensor],
) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """The shared digits MLP (tests/conftest.py) in eval mode and 16 held-out test images."""
    model, x, y = digits_mlp64
    return model.eval(), x[:16], y[:16]


@pytest.fixture(scope="module")
def pool() -> torch.Tensor:
    """Candidate starting images for targeted attacks: 200 images of the digits training split."""
    return load_digits().train_test_split(test_fraction=0.2, seed=0)[0].x[:200]


@pytest.fixture(scope="module")
def runs(digits_model) -> dict[str, tuple]:
    """Each case run once on a labels-only oracle over an independent counter, shared by the tests below."""
    model, x, y = digits_model
    out = {}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # module fixtures run before the autouse one-thread fixture
    try:
        for (attack, threat, _, _), key in zip(CASES, IDS):
            oracle, counter = labels_oracle(model)
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


# ------------------------------------------------------------------------------------------------- contract
@pytest.mark.parametrize("case", range(len(CASES)), ids=IDS)
def test_contract_in_the_domain_verified_and_within_budget(digits_model, runs, case: int) -> None:
    model, x, y = digits_model
    attack, threat, _, budget = CASES[case]
    res, counter, oracle = runs[IDS[case]]
    assert attack.minimal and attack.access == "label" and attack.budgeted
    assert res.x_adv.shape == x.shape and bool(torch.isfinite(res.x_adv).all())
    assert bool(threat.contains(res.x_adv, x).all())  # minimal attacks: inside the domain
    with torch.no_grad():
        pred, clean = model(res.x_adv).argmax(dim=1), model(x).argmax(dim=1)
    torch.testing.assert_close(res.success, pred != y)
    assert float(res.success[clean == y].float().mean()) == 1.0  # every point found a boundary on this model
    torch.testing.assert_close(res.distance[res.success], threat.distance(res.x_adv, x)[res.success])
    assert res.grad_calls == 0 and res.queries is not None
    # the independent count below the wall agrees with the oracle, the result and the base's forward count
    assert counter.rows == oracle.queries == int(res.queries.sum()) == res.model_calls
    assert bool((res.queries <= budget + 2).all()), int(res.queries.max())  # + the clean query and the re-check
    assert int(res.queries[clean == y].min()) >= budget // 2  # minimal attacks spend their budget on the distance


@pytest.mark.parametrize("case", range(len(CASES)), ids=IDS)
def test_each_sample_is_charged_exactly_its_own_queries(digits_model, case: int) -> None:
    model, x, y = digits_model
    attack, threat = with_budget(CASES[case][0], 120), CASES[case][1]
    for i in range(3):  # one sample per run: every query the wall sees is that sample's
        oracle, counter = labels_oracle(model)
        one = attack(oracle, x[i : i + 1], y[i : i + 1], threat=threat)
        assert one.queries is not None and counter.rows == int(one.queries[0]) == oracle.queries <= 122
        assert counter.calls == oracle.calls


def test_decision_attacks_never_read_a_score(digits_model, monkeypatch: pytest.MonkeyPatch) -> None:
    model, x, y = digits_model
    reads: list[int] = []
    original = BlackBox.forward

    def spy(self: BlackBox, t: torch.Tensor) -> torch.Tensor:
        reads.append(t.shape[0])
        return original(self, t)

    monkeypatch.setattr(BlackBox, "forward", spy)
    for attack, threat, _, _ in CASES:
        small = with_budget(attack, 60)
        oracle, _ = labels_oracle(model)
        res = small(oracle, x[:6], y[:6], threat=threat)
        assert res.queries is not None and int(res.queries.sum()) == oracle.queries and reads == []
        # on a score oracle only the base's clean query reads scores; the attack itself asks for labels
        small(BlackBox(model), x[:6], y[:6], threat=threat)
        assert reads == [6]
        reads.clear()
    with pytest.raises(InputError, match="labels only"):
        labels_oracle(model)[0](x[:2])


@pytest.mark.parametrize("case", range(len(CASES)), ids=IDS)
def test_beats_random_search_with_the_same_queries(digits_model, runs, case: int) -> None:
    model, x, y = digits_model
    _, threat, eps, budget = CASES[case]
    res = runs[IDS[case]][0]
    broken = res.distance <= eps
    noise = random_search(model, x, y, LpBall(threat.norm, eps), budget)
    rates = float(broken.float().mean()), float(noise.float().mean())
    assert rates[0] >= rates[1] + 0.2, rates


# ------------------------------------------------------------------------------------------------- linear model
@pytest.fixture(scope="module")
def linear() -> tuple[nn.Module, torch.Tensor, torch.Tensor, nn.Linear]:
    """A random linear classifier of 8 × 8 inputs, 10 classes, and 8 inputs 0.3 to 1 from its boundary (l2)."""
    g = torch.Generator().manual_seed(0)
    lin = nn.Linear(64, 10)
    with torch.no_grad():
        lin.weight.copy_(0.5 * torch.randn(10, 64, generator=g))
        lin.bias.zero_()
    model = nn.Sequential(nn.Flatten(), lin).eval()
    x = torch.rand(400, 1, 8, 8, generator=g)
    with torch.no_grad():
        y = model(x).argmax(dim=1)
    d2, _ = halfspace_distances(lin, x, y)
    near = d2.min(dim=1).values
    keep = ((near > 0.3) & (near < 1.0)).nonzero().squeeze(1)[:8]
    return model, x[keep], y[keep], lin


def halfspace_distances(lin: nn.Linear, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact l2 and l∞ distances (N, K) from x to each halfspace {f_j >= f_y}: margin / ||w_y - w_j||_(2, 1)."""
    with torch.no_grad():
        z = lin(x.flatten(1))
        v = lin.weight[y][:, None, :] - lin.weight[None]
        margin = z.gather(1, y[:, None]) - z
        own = torch.arange(z.shape[1])[None] == y[:, None]
        d2 = torch.where(own, math.inf, margin / v.norm(dim=2).clamp_min(1e-12))
        d1 = torch.where(own, math.inf, margin / v.abs().sum(dim=2).clamp_min(1e-12))
    return d2, d1


@pytest.mark.parametrize(
    "attack,norm",
    [
        (HopSkipJump(queries=3000), "l2"),
        (BoundaryAttack(queries=3000), "l2"),
        (SignOPT(queries=3000), "l2"),
        (HopSkipJump(queries=3000), "linf"),
        (RayS(queries=800), "linf"),
    ],
    ids=["HopSkipJump-l2", "Boundary-l2", "SignOPT-l2", "HopSkipJump-linf", "RayS-linf"],
)
def test_approaches_the_exact_distance_to_a_linear_boundary(linear, attack: Attack, norm: str) -> None:
    model, x, y, lin = linear
    threat = LpBall(norm, math.inf, domain=(-1.0, 2.0))  # a wide box: the closest points are not clipped
    res = attack(model, x, y, threat=threat)
    assert bool(res.success.all())
    d2, d1 = halfspace_distances(lin, x, y)
    exact = d2 if norm == "l2" else d1
    # sound: nothing adversarial lies closer than the nearest halfspace
    assert bool((res.distance >= exact.min(dim=1).values * (1 - 1e-4)).all())
    # close: within 10 % of the exact distance to the halfspace (class) the attack ended in
    own = exact.gather(1, res.adv_pred[:, None]).squeeze(1)
    ratio = res.distance / own
    assert bool((ratio >= 1 - 1e-4).all())
    assert float(ratio.max()) <= 1.1 + 0.15 * (norm == "linf" and isinstance(attack, HopSkipJump)), ratio
    assert float(ratio.median()) <= 1.1, ratio
    # the final points sit off the boundary by far more than float noise (a tie of the top two logits would make
    # the re-verification depend on the batch the model sees them in): the final push of LabelSearch.finish
    # (on a linear model the push by FINAL_PUSH of the perturbation adds FINAL_PUSH times the clean margin)
    with torch.no_grad():
        z, z0 = model(res.x_adv), model(x)
        j = res.adv_pred[:, None]
        margin = (z.gather(1, j) - z.gather(1, y[:, None])).squeeze(1)
        clean = (z0.gather(1, y[:, None]) - z0.gather(1, j)).squeeze(1)
    assert bool((margin >= 0.5 * FINAL_PUSH * clean).all()), (margin, clean)


class RayProbe(DecisionAttack):
    """Runs OPT's search of g along given directions and keeps what it found (for the test below)."""

    name = ""
    norms = ("l2",)

    def __init__(self, theta: torch.Tensor, start: torch.Tensor) -> None:
        self.theta, self.start, self.queries = theta, start, 10_000
        self.found: tuple[torch.Tensor, torch.Tensor] | None = None

    def run(self, model, x, criterion, threat, generator):
        search = LabelSearch(model, self.queries, criterion, threat, x.shape[0], x.device)
        rows = torch.arange(x.shape[0])
        tol = torch.full_like(self.start, 1e-5)
        self.found = ray_search(search, x.flatten(1), rows, self.theta, (1, 8, 8), hi=self.start, tol=tol, cap=100.0)
        return x, search.used


def test_ray_search_finds_g_along_a_direction_of_a_linear_model(linear) -> None:
    model, x, y, lin = linear
    threat = LpBall("l2", math.inf, domain=(-1.0, 2.0))
    # directions between the way to the nearest halfspace and random ones
    d2, _ = halfspace_distances(lin, x, y)
    j = d2.argmin(dim=1)
    towards = lin.weight[j] - lin.weight[y]
    theta = towards / towards.norm(dim=1, keepdim=True)
    theta = theta + 0.1 * torch.randn(x.shape[0], 64, generator=torch.Generator().manual_seed(1))
    theta = (theta / theta.norm(dim=1, keepdim=True)).detach()
    # the exact g(θ): the smallest λ > 0 at which some f_j - f_y = λ θ·(w_j - w_y) - margin_j reaches 0
    with torch.no_grad():
        z = lin(x.flatten(1))
        slope = theta @ lin.weight.T - (theta * lin.weight[y]).sum(dim=1, keepdim=True)
        margin = z.gather(1, y[:, None]) - z
        lam = torch.where(slope > 0, margin / slope.clamp_min(1e-12), torch.full_like(slope, math.inf))
        lam[torch.arange(x.shape[0]), y] = math.inf
        exact = lam.min(dim=1).values
    near = exact < 3  # no clipping by the box on the way there
    assert int(near.sum()) >= 4
    for factor in (0.5, 2.0):  # from inside (outward 1 % steps) and from outside (inward steps)
        probe = RayProbe(theta[near], exact[near] * factor)
        res = probe(model, x[near], y[near], threat=threat)
        assert probe.found is not None and res.queries is not None
        g, points = probe.found
        torch.testing.assert_close(g, exact[near], atol=2e-5, rtol=0)
        assert bool((g >= exact[near] - 1e-6).all())  # the adversarial end of the bracket
        with torch.no_grad():
            assert bool((model(points.reshape(-1, 1, 8, 8)).argmax(dim=1) != y[near]).all())
        # 70 steps of 1 % cover the factor 2, then a binary search over the last 1 % (about 10 halvings)
        assert int(res.queries.max()) <= 1 + 71 + 14 + 1


# ------------------------------------------------------------------------------------------------- modes
@pytest.mark.parametrize(
    "build,threat",
    [
        (lambda pool: BoundaryAttack(queries=600, starts=pool), L2),
        (lambda pool: HopSkipJump(queries=600, starts=pool), L2),
        (lambda pool: HopSkipJump(queries=600, starts=pool), LINF),
        (lambda pool: OPT(queries=600, starts=pool), L2),
        (lambda pool: SignOPT(queries=600, starts=pool), L2),
    ],
    ids=["Boundary", "HopSkipJump-l2", "HopSkipJump-linf", "OPT", "SignOPT"],
)
def test_targeted_mode_starts_from_the_target_class_and_moves_towards_x(digits_model, pool, build, threat) -> None:
    model, x, y = digits_model
    x, y = x[:8], y[:8]
    targets = (y + 1) % 10
    oracle, counter = labels_oracle(model)
    res = build(pool)(oracle, x, y, threat=threat, targets=targets)
    with torch.no_grad():
        pred = model(res.x_adv).argmax(dim=1)
        pool_pred = model(pool).argmax(dim=1)
    torch.testing.assert_close(res.success, pred == targets)
    assert res.success_rate >= 0.9
    # much closer than the nearest candidate start of the target class
    nearest = torch.stack(
        [threat.distance(pool[pool_pred == t], x[i : i + 1].expand(int((pool_pred == t).sum()), -1, -1, -1)).min()
         for i, t in enumerate(targets.tolist())]
    )  # fmt: skip
    ok = res.success
    assert float((res.distance[ok] / nearest[ok]).median()) < 0.75
    assert res.queries is not None and counter.rows == int(res.queries.sum()) and bool((res.queries <= 602).all())


def test_targeted_rays_and_targeted_search_from_noise(digits_model) -> None:
    model, x, y = digits_model
    x, y = x[:8], y[:8]
    targets = (y + 1) % 10
    res = RayS(queries=400)(model, x, y, threat=LINF, targets=targets)
    with torch.no_grad():
        torch.testing.assert_close(res.success, model(res.x_adv).argmax(dim=1) == targets)
    assert res.success_rate >= 0.6
    # without candidate starts the targeted class must be hit by noise: whatever is found is verified
    res = SignOPT(queries=150)(model, x, y, threat=L2, targets=targets)
    with torch.no_grad():
        torch.testing.assert_close(res.success, model(res.x_adv).argmax(dim=1) == targets)


def test_rays_stops_at_the_radius_or_keeps_shrinking(digits_model) -> None:
    model, x, y = digits_model
    x, y = x[:12], y[:12]
    ball = LpBall("linf", 0.2)
    early = RayS(queries=500)(model, x, y, threat=ball)
    full = RayS(queries=500, stop_at_eps=False)(model, x, y, threat=ball)
    assert early.queries is not None and full.queries is not None
    reached = early.distance <= 0.2
    assert float(reached.float().mean()) >= 0.8
    # stopped as soon as within the radius: far fewer queries than the budget
    assert float(early.queries[reached].float().median()) < 0.5 * 500
    assert bool((full.queries >= 450).all())  # the minimal mode spends its budget
    both = reached & full.success
    assert bool((full.distance[both] <= early.distance[both] + 1e-6).all())
    assert float(full.distance[both].mean()) < float(early.distance[both].mean())


@pytest.mark.parametrize("case", range(len(CASES)), ids=IDS)
def test_an_already_misclassified_sample_costs_one_query_and_returns_the_input(digits_model, case: int) -> None:
    model, x, _ = digits_model
    attack, threat, _, _ = CASES[case]
    x = x[:6]
    with torch.no_grad():
        wrong = (model(x).argmax(dim=1) + 1) % 10
    oracle, counter = labels_oracle(model)
    res = attack(oracle, x, wrong, threat=threat)
    assert counter.rows == x.shape[0] and res.queries is not None and bool((res.queries == 1).all())
    torch.testing.assert_close(res.x_adv, x, rtol=0, atol=0)
    assert bool(res.success.all()) and bool((res.distance == 0).all())


@pytest.mark.parametrize("case", range(len(CASES)), ids=IDS)
def test_oracle_budgets_cap_every_attack_and_it_stops_cleanly(digits_model, case: int) -> None:
    model, x, y = digits_model
    attack, threat, _, _ = CASES[case]
    x, y = x[:12], y[:12]
    oracle, counter = labels_oracle(model, sample_budget=60, budget=12 * 45)
    res = attack(oracle, x, y, threat=threat)
    assert res.queries is not None and bool((res.queries <= 60).all())
    assert counter.rows == oracle.queries == int(res.queries.sum()) <= 12 * 45
    with torch.no_grad():
        torch.testing.assert_close(res.success, model(res.x_adv).argmax(dim=1) != y)
    assert bool(torch.isfinite(res.x_adv).all())


def test_no_adversarial_start_within_the_budget_is_a_failure(digits_model) -> None:
    _, x, y = digits_model
    x, y = x[:6], torch.zeros(6, dtype=torch.long)
    constant = BlackBox(lambda t: torch.zeros(t.shape[0], dtype=torch.long), returns="labels", num_classes=10)
    for attack, threat, _, _ in CASES:
        small = with_budget(attack, 150)
        res = small(constant, x, y, threat=threat)
        assert not bool(res.success.any()) and bool(torch.isfinite(res.x_adv).all())
        torch.testing.assert_close(res.x_adv, x, rtol=0, atol=0)  # nothing found: nothing claimed, nothing moved
        assert res.queries is not None and bool((res.queries <= 152).all())
    # the start's attempts bound the search even with budget left
    res = HopSkipJump(queries=10_000, init_attempts=20)(constant, x, y, threat=L2)
    assert res.queries is not None and bool((res.queries == 21).all())


def test_deterministic_with_a_seed(digits_model) -> None:
    model, x, y = digits_model
    x, y = x[:4], y[:4]
    for attack, threat in (
        (BoundaryAttack(queries=100), L2),
        (HopSkipJump(queries=150), LINF),
        (SignOPT(queries=150), L2),
    ):
        a = attack(model, x, y, threat=threat, seed=3)
        b = attack(model, x, y, threat=threat, seed=3)
        c = attack(model, x, y, threat=threat, seed=4)
        torch.testing.assert_close(a.x_adv, b.x_adv, rtol=0, atol=0)
        assert a.queries is not None and b.queries is not None
        torch.testing.assert_close(a.queries, b.queries)
        assert not torch.equal(a.x_adv, c.x_adv)


# ------------------------------------------------------------------------------------------------- inputs
def test_bad_options_and_inputs_are_rejected_before_any_query(digits_model, pool) -> None:
    model, x, y = digits_model
    for build, message in (
        (lambda: BoundaryAttack(queries=0), "queries"),
        (lambda: BoundaryAttack(step_adaptation=1.0), "step_adaptation"),
        (lambda: BoundaryAttack(spherical_step=-1.0), "spherical_step"),
        (lambda: HopSkipJump(gamma=0.0), "gamma"),
        (lambda: HopSkipJump(init_evals=2.5), "init_evals"),  # type: ignore[arg-type]
        (lambda: SignOPT(k=0), "k"),
        (lambda: OPT(beta=math.nan), "beta"),
        (lambda: RayS(tolerance=0.0), "tolerance"),
        (lambda: RayS(stop_at_eps="yes"), "stop_at_eps"),  # type: ignore[arg-type]
        (lambda: HopSkipJump(starts=torch.zeros(4, dtype=torch.long)), "starts"),  # type: ignore[arg-type]
        (lambda: BoundaryAttack(starts=torch.full((2, 1, 8, 8), math.nan)), "NaN"),
    ):
        with pytest.raises(InputError, match=message):
            build()
    for attack, threat, message in (
        (BoundaryAttack(), LpBall("linf", 0.3), "supports the norms"),
        (SignOPT(), LpBall("l1", 1.0), "supports the norms"),
        (RayS(), LpBall("l2", 1.0), "supports the norms"),
        (HopSkipJump(starts=pool[:, :, :4]), L2, "shape"),
        (BoundaryAttack(starts=pool * 2), L2, "outside the input domain"),
    ):
        oracle, counter = labels_oracle(model)
        with pytest.raises(InputError, match=message):
            attack(oracle, x, y, threat=threat)
        assert counter.rows == 0


def test_registered_with_the_papers_defaults(pool) -> None:
    for name, cls in (("boundary", BoundaryAttack), ("hopskipjump", HopSkipJump), ("opt", OPT),
                      ("sign-opt", SignOPT), ("rays", RayS)):  # fmt: skip
        assert ATTACKS[name] is cls and cls.access == "label" and cls.budgeted and cls.minimal
    assert BoundaryAttack.windows == (100, 30) and BoundaryAttack.thresholds == (0.2, 0.5)
    assert BoundaryAttack().options() == {
        "queries": 25_000, "spherical_step": 0.01, "source_step": 0.01, "step_adaptation": 1.5,
        "convergence": 1e-7, "init_attempts": 100, "starts": None, "significance": 0.05,
    }  # fmt: skip
    hsj = HopSkipJump()
    assert (hsj.iterations, hsj.init_evals, hsj.max_evals, hsj.gamma) == (40, 100, 10_000, 1.0)
    assert hsj._theta(784, "l2") == pytest.approx(784**-1.5) and hsj._theta(784, "linf") == pytest.approx(784**-2)
    sign = SignOPT()
    assert (sign.k, sign.alpha, sign.beta, sign.queries, sign.init_directions) == (200, 0.2, 0.001, 20_000, 100)
    opt = OPT()
    assert (opt.directions, opt.alpha, opt.beta, opt.iterations) == (10, 0.2, 0.001, 1500)
    assert RayS().queries == 10_000 and RayS().tolerance == 1e-3
    # a tensor option is shown by its shape and digest, not its values
    text = repr(HopSkipJump(starts=pool))
    assert "200 inputs of shape (1, 8, 8), sha256" in text and "tensor(" not in text
    assert repr(make_attack("rays", queries=50.0)) == "RayS(queries=50, tolerance=0.001, stop_at_eps=True)"


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_decision_attacks_run_on_cuda(digits_model) -> None:
    model, x, y = digits_model
    gpu = BlackBox(Labels(model.to("cuda")), returns="labels", num_classes=10)
    try:
        for attack, threat, _, _ in CASES:
            res = with_budget(attack, 300)(gpu, x, y, threat=threat)
            assert res.x_adv.device.type == "cuda" and res.queries is not None and res.queries.device.type == "cuda"
            assert bool(threat.contains(res.x_adv, x.cuda()).all()) and res.success_rate > 0.5
    finally:
        model.to("cpu")


# ------------------------------------------------------------------------------------- Boundary's step-size decisions
def test_boundary_binomial_thresholds_are_the_exact_binomial_tails() -> None:
    from bastion.attacks.blackbox.boundary import binomial_thresholds

    def tail_up(k: int, s: int, p: float) -> float:  # P(S >= s)
        return sum(math.comb(k, j) * p**j * (1 - p) ** (k - j) for j in range(s, k + 1))

    def tail_down(k: int, s: int, p: float) -> float:  # P(S <= s)
        return sum(math.comb(k, j) * p**j * (1 - p) ** (k - j) for j in range(0, s + 1))

    most, least = binomial_thresholds(30, 0.2, 0.5, 0.05)
    for k in range(1, 31):
        m, lo = int(most[k]), int(least[k])
        if m <= k:  # the fewest successes significant above 0.5
            assert tail_up(k, m, 0.5) <= 0.05 and (m == 0 or tail_up(k, m - 1, 0.5) > 0.05)
        else:
            assert tail_up(k, k, 0.5) > 0.05
        if lo >= 0:  # the most successes significant below 0.2
            assert tail_down(k, lo, 0.2) <= 0.05 and (lo == k or tail_down(k, lo + 1, 0.2) > 0.05)
        else:
            assert tail_down(k, 0, 0.2) > 0.05
    # 0.8^13 > 0.05 >= 0.8^14: fourteen failures in a row are the first significant evidence of a rate below 0.2
    assert int(least[13]) == -1 and int(least[14]) == 0
    assert int(most[4]) == 31 and int(most[5]) == 5  # 0.5^5 <= 0.05 < 0.5^4 (31: no count of 4 is enough)


def test_boundary_decides_early_only_on_significant_evidence() -> None:
    nan = math.nan
    fails14 = torch.tensor([[0.0] * 14 + [nan] * 16])
    fails10 = torch.tensor([[0.0] * 10 + [nan] * 20])
    wins15 = torch.tensor([[1.0] * 12 + [0.0] * 3 + [nan] * 15])
    inside = torch.tensor([[1.0] * 12 + [0.0] * 18])  # full window, rate 0.4: inside the band
    above = torch.tensor([[1.0] * 16 + [0.0] * 14])  # full window, rate 0.53: the reference's rule grows
    early, reference = BoundaryAttack(), BoundaryAttack(significance=None)
    hist = torch.cat([fails14, fails10, wins15, inside, above])
    up, down = early._decide(hist)
    assert up.tolist() == [False, False, True, False, True]
    assert down.tolist() == [True, False, False, False, False]
    up, down = reference._decide(hist)  # full windows only
    assert up.tolist() == [False, False, False, False, True] and not down.any()
    for bad in (0.0, 0.5, -1, True, "0.05"):
        with pytest.raises(InputError, match="significance"):
            BoundaryAttack(significance=bad)  # type: ignore[arg-type]


def test_boundary_early_decisions_get_closer_than_full_windows_at_a_small_budget(digits_model) -> None:
    """The cause of the 1,000-query miss: with windows that must fill, a short run barely adapts its steps."""
    model, x, y = digits_model
    dist = {}
    for significance in (0.05, None):
        oracle, counter = labels_oracle(model)
        res = BoundaryAttack(queries=300, significance=significance)(oracle, x, y, threat=L2, seed=0)
        assert bool(res.success.all()) and int(res.queries.max()) <= 300 + 2  # with the clean query and the check
        assert counter.rows == int(res.queries.sum())  # the independent count agrees
        dist[significance] = res.distance
    assert float(dist[0.05].mean()) < 0.9 * float(dist[None].mean())
    assert float((dist[0.05] < dist[None]).float().mean()) >= 0.75
