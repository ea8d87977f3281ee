"""A small PointNet trained once per session on synthetic shapes (96 points per cloud)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from bastion.data import Dataset

POINTS = 96


@pytest.fixture(scope="session")
def pointnet() -> tuple[nn.Module, Dataset]:
    from bastion.pointcloud.demo import demo_pointnet

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model, test = demo_pointnet(points=POINTS, train_n=240, test_n=48, epochs=8, seed=0)
    finally:
        torch.set_num_threads(before)
    return model, test


@pytest.fixture(scope="session")
def correct(pointnet: tuple[nn.Module, Dataset]) -> tuple[torch.Tensor, torch.Tensor]:
    """Test clouds the model classifies correctly (the attacks' interesting cases), at most 16."""
    model, test = pointnet
    with torch.no_grad():
        ok = model(test.x).argmax(dim=1) == test.y
    assert int(ok.sum()) >= 24, "the session PointNet is too weak for the attack tests"
    return test.x[ok][:16], test.y[ok][:16]
