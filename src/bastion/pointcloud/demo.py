"""A trained PointNet on the synthetic shapes, for the CLI's built-in default, the tests and the benchmark."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from bastion.data import Dataset
from bastion.pointcloud.data import make_shapes

__all__ = ["demo_pointnet"]


def demo_pointnet(
    *,
    points: int = 1024,
    train_n: int = 400,
    test_n: int = 64,
    epochs: int = 10,
    widths: Sequence[int] = (32, 64, 128),
    head: Sequence[int] = (64,),
    seed: int = 0,
    progress: bool = False,
) -> tuple[nn.Module, Dataset]:
    """Train a zoo ``pointnet`` on :func:`~bastion.pointcloud.data.make_shapes` clouds; return it and a test set.

    The training set uses ``seed``, the test set ``seed + 1`` (other clouds of the same classes). Adam, learning
    rate 3e-3, batches of 32. Deterministic for a given seed on one machine.
    """
    from bastion.defenses.training import train
    from bastion.models import build_model

    train_set = make_shapes(train_n, points=points, seed=seed)
    test_set = make_shapes(test_n, points=points, seed=seed + 1)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = build_model("pointnet", train_set.feature_shape, train_set.num_classes, widths=widths, head=head)
        train(model, train_set, epochs=epochs, batch_size=32, lr=3e-3, seed=seed, progress=progress)
    return model.eval(), test_set
