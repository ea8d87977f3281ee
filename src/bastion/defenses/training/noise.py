"""Gaussian data augmentation: the training objective of randomized smoothing.

Cohen, Rosenfeld & Kolter, "Certified Adversarial Robustness via Randomized Smoothing", ICML 2019, Section 3.5:
the smoothed classifier is only as good as the base classifier is under noise, so the base classifier is trained
with Gaussian data augmentation at the noise level ``sigma`` it will be smoothed with. The loss of a batch is

    L = mean_i CE( f(x_i + sigma * eps_i), y_i ),   eps_i ~ N(0, I),

with one fresh noise draw per sample and step. As in the paper (and its released code), the noise is added to the
raw inputs in ``[0, 1]``, before the model's own normalisation layer, and is *not* clipped to the input domain: the
certificate is about the unclipped Gaussian, so training on clipped noise would train on a different distribution
from the one the model is certified under.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from bastion.errors import InputError

__all__ = ["GaussianNoise"]


class GaussianNoise:
    """Cross-entropy on Gaussian-perturbed inputs (Cohen, Rosenfeld & Kolter, ICML 2019).

    Args:
        sigma: standard deviation of the isotropic noise added to every input feature (the paper trains at the
            sigma it certifies with: 0.12, 0.25, 0.5 or 1.0). ``0`` gives standard training.
        generator: random generator for the noise (on the inputs' device), or ``None`` for torch's global RNG.

    Example:
        >>> from bastion.defenses.training import train
        >>> train(model, data, objective=GaussianNoise(sigma=0.25))  # doctest: +SKIP
    """

    paper = "Cohen, Rosenfeld & Kolter, Certified Adversarial Robustness via Randomized Smoothing, ICML 2019"

    def __init__(self, sigma: float = 0.25, *, generator: torch.Generator | None = None) -> None:
        try:
            s = float(sigma)
        except (TypeError, ValueError):
            raise InputError(f"sigma must be a number >= 0, got {sigma!r}") from None
        if not (math.isfinite(s) and s >= 0):
            raise InputError(f"sigma must be a finite number >= 0, got {sigma!r}")
        if generator is not None and not isinstance(generator, torch.Generator):
            raise InputError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
        self.sigma = s
        self.generator = generator

    def perturb(self, x: torch.Tensor) -> torch.Tensor:
        """``x + sigma * N(0, I)``, unclipped, drawn on ``x``'s device."""
        noise = torch.randn(x.shape, generator=self.generator, device=x.device, dtype=x.dtype)
        return x + self.sigma * noise

    def __call__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Mean cross-entropy of ``model`` on one noisy copy of each input of the batch."""
        return F.cross_entropy(model(self.perturb(x)), y)

    def state_dict(self) -> dict[str, Any]:
        """The generator's state (empty without one), so that a resumed training draws the same noise."""
        return {} if self.generator is None else {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""
        if "generator" in state:
            if self.generator is None:
                raise InputError("the saved GaussianNoise state holds a generator state but this objective has none")
            self.generator.set_state(state["generator"])

    def __repr__(self) -> str:
        return f"GaussianNoise(sigma={self.sigma!r})"
