"""The converging-bounds figure from a real DeepGO run: bounds bracket each other, the file is written."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from torch import nn

from bastion.errors import InputError
from bastion.report.plots import plot_bounds_history
from bastion.verify.globalopt.deepgo import deepgo_reach


def test_deepgo_history_is_plotted(tmp_path: Path) -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(2, 8), nn.ReLU(), nn.Linear(8, 1)).double().eval()
    lo, hi = torch.zeros(1, 2, dtype=torch.float64), torch.full((1, 2), 10.0, dtype=torch.float64)
    res = deepgo_reach(net, lo, hi, torch.ones(1, 1, dtype=torch.float64), tolerance=0.05)
    lower, upper = res.history_lower[:, 0].tolist(), res.history_upper[:, 0].tolist()
    assert all(a <= b + 1e-9 for a, b in zip(lower, upper))
    out = plot_bounds_history(lower, upper, tmp_path / "bounds.png", ylabel="output minimum")
    assert out.exists() and out.stat().st_size > 1000
    out = plot_bounds_history([0.0, 0.1], [math.inf, 1.0], tmp_path / "b.svg")  # an unknown upper bound is skipped
    assert out.exists()
    with pytest.raises(InputError, match="one length"):
        plot_bounds_history([0.0], [1.0, 2.0], tmp_path / "c.png")
