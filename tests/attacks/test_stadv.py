"""stAdv and the flow threat through the attack base: inside the budget, re-verified through the flow, beats random."""

from __future__ import annotations

import math
from typing import ClassVar

import pytest
import torch
from torch import nn

from bastion.attacks import PGD, StAdv, make_attack
from bastion.attacks.base import Attack, CountingModel
from bastion.attacks.stadv import flow_loss
from bastion.data import Dataset
from bastion.errors import InputError
from bastion.evaluate import evaluate
from bastion.results import Criterion
from bastion.threat import FlowThreat, LpBall, ThreatModel


@pytest.fixture(scope="module")
def digits(digits_mlp64: tuple[nn.Module, torch.Tensor, torch.Tensor]) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    model, x, y = digits_mlp64
    return model, x[:128], y[:128]


@pytest.fixture(scope="module")
def half_pixel(digits) -> tuple[FlowThreat, object]:
    """stAdv with the paper's defaults inside a budget of half a pixel (shared by several tests)."""
    model, x, y = digits
    threat = FlowThreat(0.5)
    return threat, StAdv()(model, x, y, threat=threat)


def test_flow_loss_closed_forms() -> None:
    flow = torch.zeros(1, 2, 5, 5, dtype=torch.float64)
    flow[:, 0], flow[:, 1] = 0.7, -1.3
    assert float(flow_loss(flow)[0]) == pytest.approx(0.0, abs=1e-12)  # a rigid shift is perfectly smooth
    flow[0, :, 2, 2] += torch.tensor([3.0, 4.0], dtype=torch.float64)
    # one interior pixel displaced by (3, 4) from its 4 neighbours: 4 pairs of length 5, each counted twice
    assert float(flow_loss(flow)[0]) == pytest.approx(40.0, rel=1e-5)
    corner = torch.zeros(1, 2, 5, 5, dtype=torch.float64)
    corner[0, 0, 0, 0] = 1.0  # a corner pixel has 2 neighbours
    assert float(flow_loss(corner)[0]) == pytest.approx(4.0, rel=1e-5)


def test_stadv_fools_most_samples_inside_a_half_pixel_budget(digits, half_pixel) -> None:
    model, x, y = digits
    threat, res = half_pixel
    flow = res.perturbation
    assert flow is not None and flow.shape == (128, 2, 8, 8)
    # the flow is inside the budget and re-applying it reproduces x_adv exactly
    assert bool(threat.contains_flow(flow).all())
    torch.testing.assert_close(threat.apply(x, flow), res.x_adv, rtol=0, atol=0)
    # success re-verified by prediction; the distance is the flow size where successful, inf elsewhere
    with torch.no_grad():
        clean, pred = model(x).argmax(1), model(res.x_adv).argmax(1)
    torch.testing.assert_close(res.success, pred != y)
    torch.testing.assert_close(res.distance[res.success], threat.flow_size(flow)[res.success])
    assert bool(torch.isinf(res.distance[~res.success]).all())
    assert bool((res.distance[res.success] <= 0.5 + 1e-6).all())
    assert bool((res.distance[clean != y] == 0).all())
    assert res.success_rate >= 0.8
    assert res.grad_calls > 0 and res.model_calls > res.grad_calls


def test_stadv_beats_random_flows_of_the_same_budget(digits, half_pixel) -> None:
    model, x, y = digits
    threat, res = half_pixel
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        random_rates = [
            float((model(threat.apply(x, threat.random_flow(x, gen))).argmax(1) != y).float().mean()) for _ in range(5)
        ]
    assert res.success_rate > max(random_rates) + 0.5


def test_the_flow_penalty_makes_flows_smoother(digits) -> None:
    # the point of tau: among adversarial flows, prefer smooth ones (the paper's perceptual argument)
    model, x, y = digits
    x, y = x[:48], y[:48]
    threat = FlowThreat(1.0)
    plain = StAdv(tau=0.0)(model, x, y, threat=threat)
    smooth = StAdv()(model, x, y, threat=threat)
    both = plain.success & smooth.success
    assert float(both.float().mean()) >= 0.9
    assert plain.perturbation is not None and smooth.perturbation is not None
    assert float(flow_loss(smooth.perturbation[both]).mean()) < 0.5 * float(flow_loss(plain.perturbation[both]).mean())


def test_targeted_and_unbounded(digits) -> None:
    model, x, y = digits
    x, y = x[:64], y[:64]
    targets = (y + 1) % 10
    res = StAdv(steps=100)(model, x, y, threat=FlowThreat(math.inf), targets=targets)
    with torch.no_grad():
        pred = model(res.x_adv).argmax(1)
    torch.testing.assert_close(res.success, pred == targets)
    assert res.success_rate >= 0.9
    # a targeted attack inside a small budget succeeds less often than an untargeted one
    small, quick = FlowThreat(0.3), StAdv(steps=50)
    assert (
        quick(model, x, y, threat=small, targets=targets).success_rate < quick(model, x, y, threat=small).success_rate
    )


class _OversizedFlow(Attack):
    """A cheating flow attack (not registered: no name) that returns flows far outside any small budget."""

    norms: ClassVar[tuple[str, ...]] = ("flow",)

    def run(
        self,
        model: CountingModel,
        x: torch.Tensor,
        criterion: Criterion,
        threat: ThreatModel,
        generator: torch.Generator | None,
    ) -> torch.Tensor:
        flow = torch.zeros(x.shape[0], 2, x.shape[-2], x.shape[-1], dtype=x.dtype)
        flow[:, 0] = 3.0  # a shift of three pixels: fools many points, but it is outside FlowThreat(0.25)
        return flow


def test_the_base_projects_the_flow_and_warps_x_itself(digits) -> None:
    model, x, y = digits
    threat = FlowThreat(0.25)
    res = _OversizedFlow()(model, x, y, threat=threat)
    assert res.perturbation is not None
    assert bool(threat.contains_flow(res.perturbation).all())
    shifted = torch.zeros(128, 2, 8, 8)
    shifted[:, 0] = 0.25
    with torch.no_grad():
        clean_wrong = model(x).argmax(1) != y
    expected = torch.where(clean_wrong[:, None, None, None], torch.zeros_like(shifted), shifted)
    torch.testing.assert_close(res.perturbation, expected)
    torch.testing.assert_close(res.x_adv, threat.apply(x, expected))
    with torch.no_grad():
        torch.testing.assert_close(res.success, model(res.x_adv).argmax(1) != y)
    # the three-pixel shift itself fools more points than the projected flow that is reported
    far = _OversizedFlow()(model, x, y, threat=FlowThreat(math.inf))
    assert far.success_rate > res.success_rate


def test_evaluate_runs_stadv_on_flow_threats(digits) -> None:
    model, x, y = digits
    data = Dataset(x[:48], y[:48], 10, "digits-test")
    threats = [FlowThreat(0.2), FlowThreat(0.6)]
    res = evaluate(model, data, threats, [StAdv(steps=60)], progress=False, checks=False)
    small, large = (res.robust_accuracy[t.key]["stadv"] for t in threats)
    assert large <= small < res.clean_accuracy
    assert large < 0.2
    by_key = {t.key: t for t in threats}
    for r in res.records:
        if r.status == "falsified" and r.attack == "stadv":
            assert r.adv_distance is not None and 0 < r.adv_distance <= by_key[r.threat].eps + 1e-6


def test_threat_types_are_checked(digits) -> None:
    model, x, y = digits
    with pytest.raises(InputError, match="supports the norms flow"):
        StAdv()(model, x, y, threat=LpBall("linf", 0.1))
    with pytest.raises(InputError, match="flow threat"):
        PGD()(model, x, y, threat=FlowThreat(0.5))
    with pytest.raises(InputError, match="images"):
        StAdv()(model, x.reshape(128, 64), y, threat=FlowThreat(0.5))
    flat = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
    with pytest.raises(InputError, match="flow threat"):
        evaluate(flat, (x[:4], y[:4]), [FlowThreat(0.5)], [PGD()], progress=False)


def test_bad_hyperparameters_are_named() -> None:
    for kwargs, match in [
        ({"tau": -0.1}, "tau"),
        ({"kappa": math.nan}, "kappa"),
        ({"steps": 0}, "steps"),
        ({"lr": 0.0}, "lr"),
    ]:
        with pytest.raises(InputError, match=match):
            StAdv(**kwargs)
    attack = make_attack("stadv", steps=50, tau="1/20")
    assert isinstance(attack, StAdv) and attack.tau == pytest.approx(0.05) and attack.steps == 50
    assert repr(StAdv()) == "StAdv(tau=0.05, kappa=0.0, steps=200, lr=0.01)"


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_stadv_runs_on_cuda(digits) -> None:
    model, x, y = digits
    gpu = model.to("cuda")
    try:
        res = StAdv(steps=50)(gpu, x, y, threat=FlowThreat(0.5))
        assert res.x_adv.device.type == "cuda" and res.perturbation is not None
        assert bool(FlowThreat(0.5).contains_flow(res.perturbation).all())
        torch.testing.assert_close(FlowThreat(0.5).apply(x.cuda(), res.perturbation), res.x_adv)
    finally:
        model.to("cpu")
