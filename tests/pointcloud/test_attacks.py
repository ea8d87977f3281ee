"""Point-cloud attacks and the SOR defence: inside the threat set, re-verified, better than random, adaptive."""

from __future__ import annotations

import math

import pytest
import torch

from bastion.attacks import PGD
from bastion.attacks.transfer import Transferred
from bastion.errors import InputError
from bastion.pointcloud import (
    SOR,
    PointAdd,
    PointAdding,
    PointCW,
    PointDropping,
    PointPerturbation,
    SaliencyDrop,
    add_points,
    sor_outliers,
)
from bastion.threat import LpBall

FAST = {"steps": 30, "binary_steps": 2}
FAST_ADD = {"steps": 30, "binary_steps": 2, "lr": 0.03}  # fewer steps than the paper: larger steps


def _verified(model, res, threat, x, y) -> None:
    assert bool(threat.contains(res.x_adv, x).all()), "an attack left its threat set"
    with torch.no_grad():
        pred = model(res.x_adv).argmax(dim=1)
    assert torch.equal(res.success, pred != y)


def _random_success(model, threat, x, y, tries: int = 3) -> float:
    g = torch.Generator().manual_seed(0)
    hit = torch.zeros(len(y), dtype=torch.bool)
    with torch.no_grad():
        for _ in range(tries):
            hit |= model(threat.random_start(x, g)).argmax(dim=1) != y
    return float(hit.float().mean())


@pytest.mark.parametrize("metric,eps", [("l2", 1.0), ("chamfer", 2e-3), ("hausdorff", 0.02)])
def test_point_cw_in_budget_and_beats_random(pointnet, correct, metric: str, eps: float) -> None:
    model, _ = pointnet
    x, y = correct
    threat = PointPerturbation(metric, eps)
    res = PointCW(**FAST)(model, x, y, threat=threat)
    _verified(model, res, threat, x, y)
    assert res.success_rate >= 0.6
    assert res.success_rate > _random_success(model, threat, x, y) + 0.3


def test_point_cw_minimal_distortion_is_smaller_with_more_search(pointnet, correct) -> None:
    model, _ = pointnet
    x, y = correct
    threat = PointPerturbation("l2", math.inf)
    res = PointCW(steps=30, binary_steps=3)(model, x, y, threat=threat)
    _verified(model, res, threat, x, y)
    assert res.success_rate == 1.0  # unbounded: every cloud breaks
    assert float(res.distance.median()) < 1.0


def test_point_add_keeps_originals_and_beats_random(pointnet, correct) -> None:
    model, _ = pointnet
    x, y = correct
    threat = PointAdding(12, "hausdorff", 0.1)
    xa = add_points(x, 12, torch.Generator().manual_seed(0))
    res = PointAdd(steps=30, binary_steps=2, lr=0.02)(model, xa, y, threat=threat)
    _verified(model, res, threat, xa, y)
    assert torch.equal(res.x_adv[:, :-12], x)
    assert res.success_rate >= 0.5
    assert res.success_rate > _random_success(model, threat, xa, y) + 0.3


def test_saliency_drop_beats_random_dropping(pointnet, correct) -> None:
    model, _ = pointnet
    x, y = correct
    threat = PointDropping(30)
    res = SaliencyDrop()(model, x, y, threat=threat)
    _verified(model, res, threat, x, y)
    assert bool((res.distance[res.success] <= 30).all())
    assert res.success_rate > _random_success(model, threat, x, y) + 0.2


def test_generic_pgd_runs_on_a_point_threat_too(pointnet, correct) -> None:
    # the threat models implement the whole ThreatModel contract; bastion's PGD needs an LpBall and says so
    model, _ = pointnet
    x, y = correct
    with pytest.raises(InputError, match="LpBall"):
        PGD(steps=2)(model, x, y, threat=PointPerturbation("chamfer", 1e-3))


def test_sor_stops_the_naive_attack_and_the_adaptive_one_gets_through(pointnet, correct) -> None:
    model, _ = pointnet
    x, y = correct
    defended = SOR(model)
    with torch.no_grad():
        assert float((defended(x).argmax(dim=1) == y).float().mean()) >= 0.9  # SOR keeps clean accuracy
    threat = PointAdding(8, "chamfer", math.inf)
    xa = add_points(x, 8, torch.Generator().manual_seed(0))
    naive = PointAdd(**FAST_ADD)(model, xa, y, threat=threat)
    assert naive.success_rate >= 0.8
    transfer = Transferred(PointAdd(**FAST_ADD), model)(defended, xa, y, threat=threat)
    adaptive = PointAdd(**FAST_ADD, sor_penalty=100.0)(defended, xa, y, threat=threat)
    _verified(defended, adaptive, threat, xa, y)
    assert transfer.success_rate <= naive.success_rate - 0.4, "SOR should remove the naive attack's outliers"
    assert adaptive.success_rate >= transfer.success_rate + 0.3, "the adaptive attack should restore success"
    kept = ~sor_outliers(adaptive.x_adv)[:, -8:]
    assert float(kept.float().mean()) >= 0.7  # the adaptive attack's points stay inliers


def test_attacks_refuse_wrong_threats_and_shapes(pointnet, correct) -> None:
    model, _ = pointnet
    x, y = correct
    with pytest.raises(InputError, match="PointPerturbation"):
        PointCW(**FAST)(model, x, y, threat=LpBall("l2", 1.0, domain=(-1, 1)))
    with pytest.raises(InputError, match="PointDropping"):
        SaliencyDrop()(model, x, y, threat=PointPerturbation("l2", 1.0))
    with pytest.raises(InputError, match=r"\(N, 3, P\)"):
        PointCW(**FAST)(model, x.transpose(1, 2).contiguous()[:, :3], y, threat=PointPerturbation("l2", 1.0))
    with pytest.raises(InputError):
        PointCW(steps=0)
