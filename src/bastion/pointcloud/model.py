"""A small PointNet classifier (Qi, Su, Mo & Guibas, "PointNet: Deep Learning on Point Sets for 3D Classification
and Segmentation", CVPR 2017).

The vanilla PointNet of the paper's ablation (Sec. 5.1 / Table 5 "no transformation"): a shared per-point MLP
(1x1 convolutions with batch norm and ReLU), a max pool over the points — the symmetric function that makes the
network invariant to the order of the points — and a fully connected head. The input and feature transformation
networks (T-Nets) are left out: they cost most of the compute and the synthetic data needs no alignment. The widths
default to a slim (64, 128, 256) shared MLP and a (128,) head instead of the paper's (64, 64, 64, 128, 1024) and
(512, 256), so that training and attacks run on a CPU.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from bastion.errors import InputError

__all__ = ["PointNet", "PointSet"]


class PointSet(nn.Module):
    """Checks that the input is a batch of point clouds (N, P, 3) and hands it on as channels (N, 3, P)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 3 or x.shape[-1] != 3:
            hint = "; it looks like (N, 3, P): pass x.transpose(1, 2)" if x.dim() == 3 and x.shape[1] == 3 else ""
            raise InputError(f"a point-cloud model needs inputs of shape (N, P, 3), got {tuple(x.shape)}{hint}")
        return x.transpose(1, 2)


class PointNet(nn.Module):
    """Shared MLP over the points, max pool, fully connected head.

    Args:
        num_classes: number of output logits.
        widths: output widths of the shared per-point layers.
        head: widths of the hidden layers of the head.
        dropout: dropout before the last layer of the head (the paper's keep ratio 0.7 is a dropout of 0.3).
    """

    def __init__(
        self,
        num_classes: int,
        *,
        widths: Sequence[int] = (64, 128, 256),
        head: Sequence[int] = (128,),
        dropout: float = 0.3,
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = [PointSet()]
        c = 3
        for w in widths:
            layers += [nn.Conv1d(c, w, 1), nn.BatchNorm1d(w), nn.ReLU()]
            c = w
        self.features = nn.Sequential(*layers)
        mlp: list[nn.Module] = []
        for w in head:
            mlp += [nn.Linear(c, w), nn.BatchNorm1d(w), nn.ReLU()]
            c = w
        if dropout > 0:
            mlp.append(nn.Dropout(dropout))
        mlp.append(nn.Linear(c, num_classes))
        self.head = nn.Sequential(*mlp)

    def point_features(self, x: torch.Tensor) -> torch.Tensor:
        """Per-point features (N, C, P) before the max pool."""
        return self.features(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.point_features(x).amax(dim=2))
