"""Universal adversarial perturbations: inside the ball, sequential updates, far better than random on held-out data."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
from torch import nn

from bastion.attacks.deepfool import DeepFool
from bastion.attacks.universal import (
    GeneralizedUniversalPerturbation,
    GeneralizedUniversalResult,
    UniversalPerturbation,
    UniversalResult,
    flow_norm,
)
from bastion.data import Dataset, load_digits
from bastion.defenses.training import train
from bastion.errors import InputError
from bastion.models import build_model
from bastion.threat import FlowThreat, LpBall, lp_norm

#: (norm, small xi, large xi) on the 8x8 digits in [0, 1] (64 features).
BUDGETS = [("linf", 0.1, 0.3), ("l2", 0.5, 1.5)]


@pytest.fixture(scope="module")
def setup() -> tuple[nn.Module, Dataset, Dataset]:
    train_set, test_set = load_digits().train_test_split(test_fraction=0.2, seed=0)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = build_model("mlp", train_set.feature_shape, 10, hidden=(32,))
        train(model, train_set, epochs=8, lr=3e-3, seed=0, progress=False)
    # the algorithm runs DeepFool point by point: a small training set keeps the tests fast
    return model, train_set.subset(torch.arange(100)), test_set


@pytest.fixture(scope="module")
def fits(setup) -> dict[tuple[str, float], tuple[UniversalPerturbation, UniversalResult]]:
    model, train_set, _ = setup
    out = {}
    for norm, *xis in BUDGETS:
        for xi in xis:
            attack = UniversalPerturbation(norm=norm, xi=xi, delta=0.0, max_passes=3)
            out[norm, xi] = attack, attack.fit(model, train_set, progress=False)
    return out


def _random_perturbation(norm: str, xi: float, shape: tuple[int, ...], gen: torch.Generator) -> torch.Tensor:
    """Random signs times xi (linf) or a uniformly random direction of length xi (l2)."""
    if norm == "linf":
        return xi * (torch.randint(0, 2, shape, generator=gen) * 2 - 1).float()
    d = torch.randn(shape, generator=gen)
    return xi * d / d.norm()


@pytest.mark.parametrize("norm,small,large", BUDGETS, ids=[b[0] for b in BUDGETS])
def test_perturbation_is_inside_the_ball_and_the_result_is_consistent(setup, fits, norm, small, large) -> None:
    model, train_set, _ = setup
    for xi in (small, large):
        attack, res = fits[norm, xi]
        v = res.perturbation
        assert v.shape == train_set.feature_shape
        assert float(lp_norm(v.reshape(1, -1), norm)[0]) <= xi * (1 + 1e-5)
        assert float(v.abs().max()) > 0
        assert res.passes == len(res.history) == 3  # delta=0: the target rate 1 is not reached, all passes run
        assert res.fooling_rate == res.history[-1] == attack.fooling_rate(model, train_set, v)


@pytest.mark.parametrize("norm,small,large", BUDGETS, ids=[b[0] for b in BUDGETS])
def test_beats_random_perturbations_on_held_out_data_and_grows_with_xi(setup, fits, norm, small, large) -> None:
    model, _, test_set = setup
    gen = torch.Generator().manual_seed(1)
    rates = {}
    for xi in (small, large):
        attack, res = fits[norm, xi]
        rates[xi] = attack.fooling_rate(model, test_set, res.perturbation)
        baseline = max(
            attack.fooling_rate(model, test_set, _random_perturbation(norm, xi, test_set.feature_shape, gen))
            for _ in range(5)
        )
        assert rates[xi] >= baseline  # even at the small budget it is at least as good as the best of 5 random ones
    assert rates[large] > baseline + 0.15  # far above random at the same norm
    assert rates[large] > rates[small] + 0.2


def test_stops_early_when_the_target_rate_is_reached(setup) -> None:
    model, train_set, _ = setup
    attack = UniversalPerturbation(norm="l2", xi=1.5, delta=0.9, max_passes=5)
    res = attack.fit(model, train_set, progress=False)
    assert res.passes == 1 and len(res.history) == 1
    assert res.fooling_rate >= 0.1


def test_updates_are_sequential_deepfool_steps_projected_onto_the_ball(setup) -> None:
    """Two points in one batch: v is DeepFool's step on the first, projected, then on the second from x + v."""
    model, train_set, _ = setup
    xi = 0.5
    pair = train_set.subset([0, 1])
    attack = UniversalPerturbation(norm="l2", xi=xi, delta=0.0, max_passes=1, batch_size=2)
    res = attack.fit(model, pair, progress=False)
    ball = LpBall("l2", xi, domain=(-1.0, 1.0))
    threat = LpBall("l2", math.inf)
    deepfool = DeepFool(steps=10, overshoot=0.02, box="mask")
    with torch.no_grad():
        clean = model(pair.x).argmax(1)

    def expected(first: int, second: int) -> torch.Tensor:
        v = torch.zeros(pair.feature_shape)
        for i in (first, second):
            start = (pair.x[i : i + 1] + v).clamp(0, 1)
            with torch.no_grad():
                if int(model(start).argmax(1)) != int(clean[i]):
                    continue
            out = deepfool(model, start, clean[i : i + 1], threat=threat)
            assert bool(out.success[0])
            v = ball.project((v + out.x_adv[0] - start[0])[None], torch.zeros(1, *v.shape))[0]
        return v

    one, other = expected(0, 1), expected(1, 0)
    assert not torch.allclose(one, other, atol=1e-4)  # the order matters: the updates are not aggregated
    assert torch.allclose(res.perturbation, one, atol=1e-5) or torch.allclose(res.perturbation, other, atol=1e-5)
    assert float(res.perturbation.norm()) == pytest.approx(xi, rel=1e-5)


def test_bad_arguments(setup) -> None:
    model, train_set, _ = setup
    bad: list[tuple[dict[str, Any], str]] = [
        ({"norm": "l1", "xi": 1.0}, "norm"),
        ({"norm": "l7", "xi": 1.0}, "norm"),
        ({"xi": 0.0}, "xi"),
        ({"xi": -0.1}, "xi"),
        ({"xi": math.inf}, "xi"),
        ({"xi": 0.1, "delta": 1.0}, "delta"),
        ({"xi": 0.1, "delta": -0.1}, "delta"),
        ({"xi": 0.1, "max_passes": 0}, "max_passes"),
        ({"xi": 0.1, "deepfool_steps": 2.5}, "deepfool_steps"),
        ({"xi": 0.1, "overshoot": -1.0}, "overshoot"),
        ({"xi": 0.1, "batch_size": 0}, "batch_size"),
    ]
    for kwargs, match in bad:
        with pytest.raises(InputError, match=match):
            UniversalPerturbation(**kwargs)
    with pytest.raises(TypeError):
        UniversalPerturbation()  # type: ignore[call-arg]  # xi is required
    attack = UniversalPerturbation(xi=0.1)
    with pytest.raises(InputError, match="Dataset"):
        attack.fit(model, train_set.x, progress=False)  # type: ignore[arg-type]
    with pytest.raises(InputError, match="Module"):
        attack.fit(lambda x: x, train_set, progress=False)  # type: ignore[arg-type]
    with pytest.raises(InputError, match="feature shape"):
        attack.fooling_rate(model, train_set, torch.zeros(64))
    with pytest.raises(InputError, match="NaN"):
        attack.fooling_rate(model, train_set, torch.full(train_set.feature_shape, math.nan))


# ------------------------------------------------------------------------------------------------- GUAP
#: GUAP budgets on the 8x8 digits: l-inf 0.1 on the additive part, ||f||_T 0.3 on the flow (about a pixel at most).
GUAP_EPS, GUAP_TAU = 0.1, 0.3


@pytest.fixture(scope="module")
def guap_fits(setup) -> dict[str, tuple[GeneralizedUniversalPerturbation, GeneralizedUniversalResult, Dataset]]:
    """GUAP with both parts, additive only (tau=0) and flow only (eps=0), trained on 500 training images."""
    model, _, _ = setup
    train_set, _ = load_digits().train_test_split(test_fraction=0.2, seed=0)  # the split the model was trained on
    points = train_set.subset(torch.arange(500))
    out = {}
    for kind, eps, tau in (("both", GUAP_EPS, GUAP_TAU), ("additive", GUAP_EPS, 0.0), ("flow", 0.0, GUAP_TAU)):
        # small batches: more Adam steps on a small data set (the paper's batch of 100 assumes 50 000 images)
        attack = GeneralizedUniversalPerturbation(eps=eps, tau=tau, epochs=10, batch_size=20)
        out[kind] = attack, attack.fit(model, points, progress=False), points
    return out


def test_guap_flow_norm_closed_form() -> None:
    flow = torch.zeros(1, 2, 4, 6, dtype=torch.float64)
    flow[:, 0], flow[:, 1] = 0.3, 0.4  # a rigid shift of length 0.5: only the zero border counts
    # rows of W pixels differ from the border above/below: sqrt(W · 0.25 / (H W)) = 0.5 / sqrt(H) (the larger one)
    assert float(flow_norm(flow)[0]) == pytest.approx(0.5 / math.sqrt(4), rel=1e-9)
    bump = torch.zeros(1, 2, 5, 5, dtype=torch.float64)
    bump[0, 0, 2, 2] = 1.0  # one interior pixel: in every direction it differs from its neighbour, and one
    assert float(flow_norm(bump)[0]) == pytest.approx(math.sqrt(2 / 25), rel=1e-9)  # neighbour differs from it


def test_guap_respects_both_budgets_and_reports_consistently(setup, guap_fits) -> None:
    model, _, _ = setup
    for kind, (attack, res, points) in guap_fits.items():
        assert res.flow.shape == (2, 8, 8) and res.perturbation.shape == points.feature_shape
        assert float(res.perturbation.abs().max()) <= attack.eps * (1 + 1e-6)
        assert float(flow_norm(res.flow[None])[0]) <= attack.tau * (1 + 1e-5) + 1e-9
        assert res.epochs == len(res.history) == 10
        assert res.fooling_rate == max(res.history)  # the best epoch is returned
        assert res.fooling_rate == pytest.approx(attack.fooling_rate(model, points, res.flow, res.perturbation))
        assert res.max_displacement == pytest.approx(float(FlowThreat(math.inf).flow_size(res.flow[None])[0]))
        if kind == "additive":
            assert float(res.flow.abs().max()) == 0.0
        elif kind == "flow":
            assert float(res.perturbation.abs().max()) == 0.0
        if kind != "additive":
            assert float(flow_norm(res.flow[None])[0]) == pytest.approx(attack.tau, rel=1e-5)  # the paper's scaling
    # the pair is applied as clip(warp(x, f) + v), exactly what fooling_rate measures
    attack, res, points = guap_fits["both"]
    x = points.x[:16]
    warped = FlowThreat(math.inf).apply(x, res.flow[None].expand(16, 2, 8, 8))
    torch.testing.assert_close(attack.apply(x, res.flow, res.perturbation), warped + res.perturbation)


def test_guap_beats_random_pairs_and_either_part_alone_on_held_out_data(setup, fits, guap_fits) -> None:
    model, _, test_set = setup
    rates = {kind: a.fooling_rate(model, test_set, r.flow, r.perturbation) for kind, (a, r, _) in guap_fits.items()}
    attack = guap_fits["both"][0]
    gen = torch.Generator().manual_seed(1)
    random_rates = []
    for _ in range(5):
        f = torch.randn(2, 8, 8, generator=gen)
        f = f * GUAP_TAU / flow_norm(f[None])[0]
        v = GUAP_EPS * (torch.randint(0, 2, test_set.feature_shape, generator=gen) * 2 - 1).float()
        random_rates.append(attack.fooling_rate(model, test_set, f, v))
    uap_attack, uap = fits["linf", GUAP_EPS]  # the additive UAP at the same l-inf budget
    uap_rate = uap_attack.fooling_rate(model, test_set, uap.perturbation)
    assert rates["both"] > max(random_rates) + 0.4
    assert rates["both"] > rates["additive"] + 0.3 and rates["both"] > uap_rate + 0.3
    assert rates["both"] > rates["flow"] + 0.1


def test_guap_bad_arguments(setup) -> None:
    model, train_set, _ = setup
    bad: list[tuple[dict[str, Any], str]] = [
        ({"eps": -0.1}, "eps"),
        ({"tau": math.inf}, "tau"),
        ({"eps": 0.0, "tau": 0.0}, "both 0"),
        ({"epochs": 0}, "epochs"),
        ({"lr": 0.0}, "lr"),
        ({"beta1": 1.0}, "beta1"),
        ({"batch_size": 2.5}, "batch_size"),
    ]
    for kwargs, match in bad:
        with pytest.raises(InputError, match=match):
            GeneralizedUniversalPerturbation(**kwargs)
    attack = GeneralizedUniversalPerturbation(eps=0.1, tau=0.3)
    zero_f, zero_v = torch.zeros(2, 8, 8), torch.zeros(train_set.feature_shape)
    assert attack.fooling_rate(model, train_set, zero_f, zero_v) == 0.0
    with pytest.raises(InputError, match="Dataset"):
        attack.fit(model, train_set.x, progress=False)  # type: ignore[arg-type]
    flat = Dataset(train_set.x.reshape(-1, 64), train_set.y, 10, "flat")
    with pytest.raises(InputError, match="images"):
        attack.fit(model, flat, progress=False)
    with pytest.raises(InputError, match="shape"):
        attack.fooling_rate(model, train_set, torch.zeros(2, 4, 4), zero_v)
    with pytest.raises(InputError, match="NaN"):
        attack.fooling_rate(model, train_set, zero_f, torch.full(train_set.feature_shape, math.nan))
    with pytest.raises(InputError, match="eps"):
        attack.fooling_rate(model, train_set, zero_f, torch.full(train_set.feature_shape, 0.5))
    with pytest.raises(InputError, match="tau"):
        attack.fooling_rate(model, train_set, torch.randn(2, 8, 8), zero_v)
