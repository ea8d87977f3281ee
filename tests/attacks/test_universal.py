"""Universal adversarial perturbations: inside the ball, sequential updates, far better than random on held-out data."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
from torch import nn

from bastion.attacks.deepfool import DeepFool
from bastion.attacks.universal import UniversalPerturbation, UniversalResult
from bastion.data import Dataset, load_digits
from bastion.defenses.training import train
from bastion.errors import InputError
from bastion.models import build_model
from bastion.threat import LpBall, lp_norm

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
    deepfool = DeepFool(steps=10, overshoot=0.02)
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
