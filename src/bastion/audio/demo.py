"""A trained AudioCNN on the synthetic vowels, for the CLI's built-in default, the tests and the benchmark."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from bastion.audio.data import make_vowels
from bastion.data import Dataset

__all__ = ["demo_audiocnn"]


def demo_audiocnn(
    *,
    seconds: float = 0.5,
    train_n: int = 600,
    test_n: int = 100,
    epochs: int = 10,
    channels: Sequence[int] = (16, 32, 64),
    seed: int = 0,
    progress: bool = False,
) -> tuple[nn.Module, Dataset]:
    """Train a zoo ``audiocnn`` on :func:`~bastion.audio.data.make_vowels` clips; return it and a test set.

    The training set uses ``seed``, the test set ``seed + 1``. Adam, learning rate 3e-3, batches of 32.
    """
    from bastion.defenses.training import train
    from bastion.models import build_model

    train_set = make_vowels(train_n, seconds=seconds, seed=seed)
    test_set = make_vowels(test_n, seconds=seconds, seed=seed + 1)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = build_model("audiocnn", train_set.feature_shape, train_set.num_classes, channels=channels)
        train(model, train_set, epochs=epochs, batch_size=32, lr=3e-3, seed=seed, progress=progress)
    return model.eval(), test_set
