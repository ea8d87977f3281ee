"""Adversarial patch: one image region that makes a classifier predict a chosen class wherever it is placed.

Brown, Mané, Roy, Abadi & Gilmer, "Adversarial Patch", 2017 (arXiv:1712.09665). The patch ``p`` is trained to
maximise ``E_{x ~ X, t ~ T, l ~ L} [log Pr(target | A(p, x, l, t))]``: the expected log-probability of the target
class over images ``x``, transformations ``t`` (rotation, scale) and locations ``l``, where ``A`` pastes the
transformed patch onto the image. Sampling a fresh transformation for every image at every step is Expectation over
Transformation (Athalye et al., ICML 2018), so the patch works under placements it was never tested on.

Unlike the per-sample attacks, a patch is *universal*: :meth:`AdversarialPatch.fit` learns one patch from a data
set, and :meth:`AdversarialPatch.success_rate` measures, on held-out images and fresh random placements, how often
the target class is predicted.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from bastion.attacks.base import positive_int
from bastion.data import Dataset
from bastion.errors import InputError
from bastion.models.checks import eval_mode, model_device


@dataclass
class PatchResult:
    """A trained patch and how well it works.

    Attributes:
        patch: the patch (C, P, P), values in the input domain.
        target: the target class.
        train_success: fraction of training images (correctly classified and not of the target class) sent to
            the target class with random placements, at the end of training.
        losses: mean training loss per epoch.
    """

    patch: torch.Tensor
    target: int
    train_success: float
    losses: list[float]


class AdversarialPatch:
    """Targeted universal patch with Expectation over Transformation (Brown et al. 2017).

    Args:
        size: side of the (square) patch in pixels before scaling.
        scale: range of the patch's scale factor (side of the pasted patch / ``size``), sampled uniformly.
        max_rotation: rotations are sampled uniformly in ±``max_rotation`` degrees.
        epochs: passes over the training data.
        lr: Adam learning rate on the patch values.
        batch_size: images per step.
    """

    def __init__(
        self,
        *,
        size: int = 8,
        scale: tuple[float, float] = (0.7, 1.2),
        max_rotation: float = 22.5,
        epochs: int = 5,
        lr: float = 0.05,
        batch_size: int = 128,
    ) -> None:
        self.size = positive_int("size", size)
        lo, hi = (float(v) for v in scale)
        if not 0 < lo <= hi:
            raise InputError(f"scale must be a range (lo, hi) with 0 < lo <= hi, got {scale!r}")
        if not 0 <= max_rotation <= 180:
            raise InputError(f"max_rotation must be in [0, 180] degrees, got {max_rotation!r}")
        if not lr > 0:
            raise InputError(f"lr must be > 0, got {lr!r}")
        self.scale = (lo, hi)
        self.max_rotation = float(max_rotation)
        self.epochs = positive_int("epochs", epochs)
        self.lr = float(lr)
        self.batch_size = positive_int("batch_size", batch_size)

    # ----------------------------------------------------------------------------------------------- placement
    def apply(
        self,
        x: torch.Tensor,
        patch: torch.Tensor,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Paste ``patch`` on every image of ``x`` at a random location, scale and rotation (differentiable)."""
        n, c, h, w = x.shape
        if patch.shape[0] != c or patch.shape[1] > h or patch.shape[2] > w:
            raise InputError(f"patch of shape {tuple(patch.shape)} does not fit images of shape {(c, h, w)}")
        dev, dt = x.device, x.dtype
        # the patch centred on an image-sized canvas, with a mask of where it is
        canvas = torch.zeros(1, c + 1, h, w, device=dev, dtype=dt)
        top, left = (h - patch.shape[1]) // 2, (w - patch.shape[2]) // 2
        canvas[0, :c, top : top + patch.shape[1], left : left + patch.shape[2]] = patch
        canvas[0, c, top : top + patch.shape[1], left : left + patch.shape[2]] = 1.0
        u = torch.rand(n, 4, generator=generator, device=dev, dtype=dt)
        s = self.scale[0] + (self.scale[1] - self.scale[0]) * u[:, 0]
        angle = math.radians(self.max_rotation) * (2 * u[:, 1] - 1)
        # the pasted patch's half-extent in normalised coordinates bounds how far its centre may move
        extent_x = (s * patch.shape[2] / w).clamp(max=1.0)
        extent_y = (s * patch.shape[1] / h).clamp(max=1.0)
        tx = (1 - extent_x) * (2 * u[:, 2] - 1)
        ty = (1 - extent_y) * (2 * u[:, 3] - 1)
        # affine_grid maps output coordinates to input ones, so it takes the inverse transformation
        cos, sin = torch.cos(angle) / s, torch.sin(angle) / s
        theta = torch.stack(
            [torch.stack([cos, sin, -(cos * tx + sin * ty)], 1), torch.stack([-sin, cos, -(-sin * tx + cos * ty)], 1)],
            1,
        )
        grid = F.affine_grid(theta, [n, c + 1, h, w], align_corners=False)
        placed = F.grid_sample(canvas.expand(n, -1, -1, -1), grid, align_corners=False, padding_mode="zeros")
        mask = placed[:, c : c + 1]
        return (1 - mask) * x + mask * placed[:, :c]

    # ----------------------------------------------------------------------------------------------- training
    def fit(
        self,
        model: nn.Module,
        data: Dataset,
        target: int,
        *,
        seed: int = 0,
        progress: bool = True,
    ) -> PatchResult:
        """Train a patch that sends ``data``'s images to class ``target``.

        Args:
            model: the classifier (kept in eval mode; its weights are not changed).
            data: training images (N, C, H, W).
            target: the target class.
            seed: seeds the initial patch and every random placement.
            progress: show a progress bar over the epochs.
        """
        if len(data.feature_shape) != 3:
            raise InputError(f"the adversarial patch needs images (C, H, W), the data has shape {data.feature_shape}")
        if not 0 <= int(target) < data.num_classes:
            raise InputError(f"target must be a class in [0, {data.num_classes}), got {target!r}")
        c, h, w = data.feature_shape
        if self.size > min(h, w):
            raise InputError(f"patch size {self.size} is larger than the images ({h}x{w})")
        device = model_device(model)
        lo, hi = data.domain
        gen = torch.Generator(device=device).manual_seed(seed)
        patch = (lo + (hi - lo) * torch.rand(c, self.size, self.size, generator=gen, device=device)).requires_grad_()
        opt = torch.optim.Adam([patch], lr=self.lr)
        losses: list[float] = []
        target_t = torch.tensor(int(target), device=device)
        with eval_mode(model):
            for _ in tqdm(range(self.epochs), desc="patch", unit="epoch", disable=not progress, leave=False):
                total, count = 0.0, 0
                order = torch.randperm(len(data), generator=torch.Generator().manual_seed(seed + len(losses)))
                for _idx, xb, _yb in data.batches(self.batch_size, indices=order):
                    xb = xb.to(device)
                    logits = model(self.apply(xb, patch, gen))
                    loss = F.cross_entropy(logits, target_t.expand(xb.shape[0]))
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                    with torch.no_grad():
                        patch.clamp_(lo, hi)
                    total += float(loss.detach()) * xb.shape[0]
                    count += xb.shape[0]
                losses.append(total / count)
        final = patch.detach()
        return PatchResult(final, int(target), self.success_rate(model, data, final, int(target), seed=seed), losses)

    @torch.no_grad()
    def success_rate(
        self, model: nn.Module, data: Dataset, patch: torch.Tensor, target: int, *, seed: int = 0
    ) -> float:
        """Fraction of the images that the model classifies correctly, not as ``target``, and that the patch (at
        fresh random placements) sends to ``target``."""
        device = model_device(model)
        gen = torch.Generator(device=device).manual_seed(seed + 1_000_003)
        hits, eligible = 0, 0
        with eval_mode(model):
            for _, xb, yb in data.batches(self.batch_size):
                xb, yb = xb.to(device), yb.to(device)
                ok = (model(xb).argmax(1) == yb) & (yb != target)
                pred = model(self.apply(xb, patch.to(device), gen)).argmax(1)
                hits += int((ok & (pred == target)).sum())
                eligible += int(ok.sum())
        return hits / max(1, eligible)
