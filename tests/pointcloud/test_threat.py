"""Point-cloud threat models: distances, projections, the adding/dropping representations, bad input."""

from __future__ import annotations

import math

import pytest
import torch

from bastion.errors import InputError
from bastion.pointcloud import (
    PointAdding,
    PointDropping,
    PointPerturbation,
    add_points,
    chamfer,
    check_points,
    drop,
    hausdorff,
    make_shapes,
)


def _clouds(n: int = 4, p: int = 32, seed: int = 0) -> torch.Tensor:
    return make_shapes(n, points=p, seed=seed).x


def test_set_distances_closed_form() -> None:
    x = torch.tensor([[[0.0, 0, 0], [1, 0, 0]]])
    y = torch.tensor([[[0.0, 0, 0], [1, 0.5, 0]]])  # one point moved by 0.5: squared distance 0.25 to its origin
    assert chamfer(y, x).item() == pytest.approx(0.125)
    assert hausdorff(y, x).item() == pytest.approx(0.25)
    assert chamfer(x, x).item() == 0.0


@pytest.mark.parametrize("metric,eps", [("l2", 0.3), ("linf", 0.02), ("chamfer", 1e-3), ("hausdorff", 4e-3)])
def test_projection_lands_in_the_set_and_is_idempotent(metric: str, eps: float) -> None:
    x = _clouds()
    threat = PointPerturbation(metric, eps)
    g = torch.Generator().manual_seed(1)
    far = x + 0.3 * torch.randn(x.shape, generator=g)
    p = threat.project(far, x)
    assert bool(threat.contains(p, x).all())
    assert not bool(threat.contains(far, x).any())
    assert torch.allclose(threat.project(p, x), p, atol=1e-6)
    start = threat.random_start(x, g)
    assert bool(threat.contains(start, x).all()) and not torch.equal(start, x)


def test_hausdorff_projection_is_the_nearest_point_of_the_union_of_balls() -> None:
    x = _clouds(1, 16)
    eps = 0.01
    y = x + torch.tensor([0.3, 0.0, 0.0])
    p = PointPerturbation("hausdorff", eps).project(y, x)
    # brute force over a fine sphere around every clean point: nothing in the set is nearer to y than p
    dirs = torch.randn(4000, 3)
    dirs = dirs / dirs.norm(dim=1, keepdim=True) * math.sqrt(eps)
    cand = (x[0][:, None, :] + dirs[None]).reshape(-1, 3)  # boundary points of every ball
    for i in range(0, 16, 5):
        best = (cand - y[0, i]).norm(dim=1).min()
        assert (p[0, i] - y[0, i]).norm() <= best + 1e-4


def test_adding_copies_leave_pointnet_unchanged_and_project_keeps_originals(pointnet) -> None:
    model, test = pointnet
    x = test.x[:8]
    xa = add_points(x, 10, torch.Generator().manual_seed(0))
    assert xa.shape == (8, x.shape[1] + 10, 3)
    with torch.no_grad():
        assert torch.allclose(model(xa), model(x), atol=1e-5)
    threat = PointAdding(10, "hausdorff", 0.01)
    moved = xa + 0.5 * torch.randn(xa.shape)
    p = threat.project(moved, xa)
    assert torch.equal(p[:, :-10], x) and bool(threat.contains(p, xa).all())
    assert not bool(threat.contains(moved, xa).any())


def test_dropping_by_copy_is_removal_for_pointnet(pointnet) -> None:
    model, test = pointnet
    x = test.x[:1]
    mask = torch.zeros(x.shape[:2], dtype=torch.bool)
    mask[0, ::3] = True
    with torch.no_grad():
        assert torch.allclose(model(drop(x, mask)), model(x[:, ~mask[0]]), atol=1e-5)
    threat = PointDropping(int(mask.sum()))
    assert bool(threat.contains(drop(x, mask), x).all())
    assert not bool(PointDropping(int(mask.sum()) - 1).contains(drop(x, mask), x).any())


def test_dropping_projection_snaps_and_counts() -> None:
    x = _clouds(3, 24)
    threat = PointDropping(5)
    p = threat.project(x + 0.2 * torch.randn(x.shape), x)
    assert bool(threat.contains(p, x).all())
    assert bool((threat.distance(p, x) <= 5).all())
    assert not bool(threat.contains(x + 0.01, x).any())  # moved points are not clean points


def test_bad_shapes_and_options_raise_input_errors(pointnet) -> None:
    x = _clouds()
    with pytest.raises(InputError, match=r"\(N, 3, P\)"):
        check_points(x.transpose(1, 2))
    with pytest.raises(InputError, match="image"):
        check_points(torch.rand(2, 1, 8, 8))
    with pytest.raises(InputError, match="metric"):
        PointPerturbation("l7", 0.1)
    with pytest.raises(InputError, match="eps"):
        PointPerturbation("chamfer", -1)
    with pytest.raises(InputError, match="chamfer"):
        PointAdding(4, "l2")
    with pytest.raises(InputError, match="P \\+ k"):
        PointAdding(40).project(x, x)
    with pytest.raises(InputError, match="positive integer"):
        PointDropping(0)
    model, _ = pointnet
    with pytest.raises(InputError, match=r"\(N, P, 3\)"):
        model(torch.rand(2, 1, 8, 8))
