"""A small 1-D convolutional waveform classifier.

In the spirit of the raw-waveform networks of Dai, Dai, Qu, Li & Das ("Very Deep Convolutional Neural Networks for
Raw Waveforms", ICASSP 2017: a wide strided first convolution acting as a learned filter bank, then narrow
convolutions with pooling, global pooling and a linear layer), scaled down for 8 kHz clips of about half a second
and for CPUs: a first convolution of 32 taps and stride 4, then ``len(channels) - 1`` blocks of kernel-9
convolutions with batch norm, ReLU and max pooling by 4, global average pooling and one linear layer.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from bastion.errors import InputError

__all__ = ["AudioCNN", "Waveform"]


class Waveform(nn.Module):
    """Checks that the input is a batch of mono waveforms (N, 1, T) or (N, T) and hands it on as (N, 1, T)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 2:
            x = x[:, None]
        if x.dim() != 3 or x.shape[1] != 1:
            raise InputError(f"an audio model needs mono waveforms of shape (N, 1, T) or (N, T), got {tuple(x.shape)}")
        return x


class AudioCNN(nn.Module):
    """Strided filter-bank convolution, conv/pool blocks, global average pooling, linear layer.

    Args:
        num_classes: number of output logits.
        channels: output channels of the first convolution and of each later block.
    """

    def __init__(self, num_classes: int, *, channels: Sequence[int] = (16, 32, 64)) -> None:
        super().__init__()
        c0 = channels[0]
        layers: list[nn.Module] = [
            Waveform(), nn.Conv1d(1, c0, 32, stride=4, padding=14), nn.BatchNorm1d(c0), nn.ReLU(), nn.MaxPool1d(4),
        ]  # fmt: skip
        c = c0
        for w in channels[1:]:
            layers += [nn.Conv1d(c, w, 9, padding=4), nn.BatchNorm1d(w), nn.ReLU(), nn.MaxPool1d(4)]
            c = w
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(c, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).mean(dim=2))
