"""Backdoor (trojan) attacks by data poisoning: BadNets, Blended and WaNet.

A backdoor attack poisons a fraction of the training set with triggered inputs relabelled to the attacker's
class, so that the victim learns the task *and* the rule "trigger ⇒ target". At test time clean inputs are
classified normally (clean accuracy barely moves) while any input carrying the trigger goes to the target class
(the attack success rate, :func:`~bastion.poisoning.base.attack_success_rate`).

Label maps (``mode``): ``"all-to-one"`` (every poison relabelled ``target``; poisons are drawn among the samples not
already of the target class) and ``"all-to-all"`` (a poison of class ``y`` relabelled ``(y + 1) mod K``; drawn among
all samples), both from Gu et al. Poisons replace their clean versions in place.

Poison rate (``rate``, default 10 %, capped at the number of eligible samples). Two conventions coexist in the
literature, chosen with ``rate_of``:

* ``rate_of="set"`` (default; BadNets, Blended, WaNet): ``rate`` is the fraction of the *whole* training set
  poisoned, ``n = round(rate · N)``. At 10 % on a 10-class set this is about half of the poisoned target class.
* ``rate_of="target"`` (the detection papers: Tran et al.'s ε, Chen et al.'s activation clustering; ART's
  ``percent_poison``): ``rate`` is the fraction of the *poisoned target class* that is poison, ``n = round(rate ·
  n_t / (1 - rate))`` with ``n_t`` the clean samples of the target class, so that ``n / (n + n_t) = rate``. ART's
  MNIST notebooks use 33 % of the target class; at 10 % of the target class a 10-class set is about 1.1 % poison.
  All-to-one only.

* :class:`BadNets` — Gu, Dolan-Gavitt & Garg, "BadNets: Identifying Vulnerabilities in the Machine Learning Model
  Supply Chain", arXiv 1708.06733, 2017: a small patch stamped in the bottom-right corner. The paper's MNIST
  "pattern backdoor" is a few bright pixels in that corner; here a ``checkerboard`` patch (bright where
  ``row + col`` is even, dark elsewhere), or a solid ``white`` square, or any given pattern. Patch side: 3 pixels on
  28×28 images as in common reproductions, scaled to the image (``round(3 · min(H, W) / 28)``, at least 2).
* :class:`Blended` — Chen, Liu, Li, Lu & Song, "Targeted Backdoor Attacks on Deep Learning Systems Using Data
  Poisoning", arXiv 1712.05526, 2017 (blended injection): ``x' = (1 - α) x + α k`` with the key pattern ``k`` a
  fixed image or, by default, a fixed uniform random-noise pattern (the paper's two choices), α = 0.2 (the paper's
  training blend ratio). The same α is used at test time (the paper also tries larger test-time ratios).
* :class:`WaNet` — Nguyen & Tran, "WaNet — Imperceptible Warping-based Backdoor Attack", ICLR 2021: a smooth
  warping field as the trigger. A ``k × k`` field of uniform random displacements in [-1, 1], normalised by its
  mean absolute value, is upsampled bicubically to the image; the warp is ``grid = clamp((identity + s ·
  field / H) · grid_rescale, -1, 1)``, sampled with ``grid_sample`` (bilinear, ``align_corners=True``); the paper's
  defaults k = 4, s = 0.5, grid_rescale = 1. Dividing the field by the image size makes the displacement about
  ``s / 2`` pixels whatever the resolution, so the 32×32 defaults carry over unchanged to 28×28 MNIST (the paper
  uses the same k and s there) and to the 8×8 digits; here the x displacement is divided by ``W`` and the y
  displacement by ``H`` (the reference divides both by the height; equal on square images), and ``k`` is capped
  at ``min(H, W)``. **Noise mode**: ``cross_ratio · n_poisons`` further samples (paper: 2) are warped with the
  trigger grid plus independent uniform noise in ``[-1, 1] / H`` per pixel and keep their true labels, so that the
  victim learns the exact warp rather than "any warp". Deviations from the reference code, which poisons each
  mini-batch afresh during training: the poisons and the noise-mode samples are drawn once, so the poisoned set
  is a fixed data set any trainer can use; and in all-to-all mode the label map is ``(y + 1) mod K`` as in the
  paper (the released ``train.py`` writes ``torch.remainder(targets, num_classes)`` in training and evaluation,
  which leaves every label unchanged). The reference also trains with data augmentation and SGD for many epochs;
  with a few epochs of plain training the warp is learnt slowly.

The input-aware dynamic trigger (Nguyen & Tran, NeurIPS 2020) needs a trigger generator trained jointly with the
victim, which does not fit the "poisoned data set, then ordinary training" contract; it lives in
:mod:`bastion.poisoning.dynamic` and returns the trained model with its generators.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from bastion.data import Dataset
from bastion.errors import InputError
from bastion.poisoning.base import (
    PatternTrigger,
    PoisonAttack,
    PoisonedData,
    WarpTrigger,
    check_class,
    check_dataset,
    check_image_data,
    check_mode,
    check_rate,
    check_seed,
    choose,
    n_from_rate,
    replace_rows,
)

__all__ = ["LOCATIONS", "RATE_OF", "BackdoorAttack", "BadNets", "Blended", "WaNet"]

LOCATIONS: tuple[str, ...] = ("bottom-right", "bottom-left", "top-right", "top-left")

RATE_OF: tuple[str, ...] = ("set", "target")
"""What a backdoor's ``rate`` counts: the whole training set, or the (poisoned) target class."""


def _positive_number(value: Any, what: str, *, allow_zero: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InputError(f"{what} must be a number, got {value!r}")
    v = float(value)
    if not (v == v and v != float("inf")) or v < 0 or (v == 0 and not allow_zero):
        raise InputError(f"{what} must be {'>= 0' if allow_zero else '> 0'} and finite, got {value!r}")
    return v


class BackdoorAttack(PoisonAttack):
    """Shared logic of the trigger-based attacks: choose the poisons, stamp the trigger, relabel.

    Subclasses implement :meth:`trigger_for` (the deterministic trigger for a data set's shape and domain) and may
    extend :meth:`_poison` (WaNet adds its noise-mode samples).

    Args:
        rate: the poison rate in (0, 1]; what it counts is ``rate_of``.
        target: the target class (all-to-one); ignored by all-to-all.
        mode: ``"all-to-one"`` or ``"all-to-all"``.
        seed: seeds the choice of the poisons (and any random pattern).
        rate_of: ``"set"`` (default): ``rate`` is the fraction of the whole training set poisoned (BadNets'
            convention); ``"target"``: the fraction of the poisoned target class made of poisons, ``n = round(rate ·
            n_target / (1 - rate))`` for ``n_target`` clean samples of the target class (the convention of the
            detection papers — Tran et al.'s ε, Chen et al. — and of ART's ``percent_poison``); all-to-one only,
            ``rate < 1``.
    """

    def __init__(self, *, rate: float, target: int, mode: str, seed: int, rate_of: str = "set") -> None:
        super().__init__()
        self.rate = check_rate(rate)
        if rate_of not in RATE_OF:
            raise InputError(f"rate_of must be one of {', '.join(RATE_OF)}, got {rate_of!r}")
        self.rate_of = rate_of
        if isinstance(target, bool) or not isinstance(target, int) or target < 0:
            raise InputError(f"target must be a class index (a non-negative int), got {target!r}")
        self.target = target
        self.mode = check_mode(mode)
        self.seed = check_seed(seed)
        if rate_of == "target":
            if self.mode != "all-to-one":
                raise InputError("rate_of='target' counts poisons within the target class: all-to-one backdoors only")
            if self.rate >= 1.0:
                raise InputError(f"rate_of='target' needs rate < 1 (the target class keeps clean ones), got {rate!r}")
        self._params = {"rate": self.rate, "target": self.target, "mode": self.mode, "seed": self.seed}
        if rate_of != "set":
            self._params["rate_of"] = rate_of

    def n_poisons(self, data: Dataset) -> int:
        """The number of poisons for ``data`` (before capping at the eligible samples), per ``rate_of``."""
        if self.rate_of == "target":
            n_target = int((data.y.cpu() == self.target).sum())
            return max(1, round(self.rate * n_target / (1.0 - self.rate)))
        return n_from_rate(self.rate, len(data))

    def trigger_for(self, data: Dataset) -> PatternTrigger | WarpTrigger:
        """The trigger for inputs shaped like ``data``'s (deterministic: same attack, same trigger)."""
        raise NotImplementedError

    def __call__(self, data: Dataset) -> PoisonedData:
        """Poison ``data``.

        Args:
            data: the clean training set (images ``(C, H, W)``; Blended also takes flat features).

        Returns:
            The poisoned set (same length and order), the poisons' positions and the trigger.
        """
        data = check_dataset(data)
        k = data.num_classes
        if self.mode == "all-to-one":
            check_class(self.target, k, "target")
        trigger = self.trigger_for(data)
        gen = torch.Generator().manual_seed(self.seed)
        y = data.y.cpu()
        candidates = torch.nonzero(y != self.target).reshape(-1) if self.mode == "all-to-one" else torch.arange(len(y))
        if candidates.numel() == 0:
            raise InputError(f"every training sample is already of the target class {self.target}; nothing to poison")
        n = min(self.n_poisons(data), candidates.numel())
        idx = choose(candidates, n, gen)
        x_new = trigger.apply(data.x[idx.to(data.x.device)])
        y_new = torch.full((n,), self.target, dtype=torch.int64) if self.mode == "all-to-one" else (y[idx] + 1) % k
        poisoned = replace_rows(data, idx, x_new, y_new, name=f"{data.name} [{self.name} {self.rate:g}]")
        poisoned, extra = self._extra(poisoned, data, idx, trigger, gen)
        return PoisonedData(
            data=poisoned, poison_indices=idx, attack=self.name,
            target=self.target if self.mode == "all-to-one" else None, mode=self.mode, trigger=trigger,
            config=self.config(), **extra,
        )  # fmt: skip

    def _extra(
        self, poisoned: Dataset, clean: Dataset, idx: Tensor, trigger: Any, gen: torch.Generator
    ) -> tuple[Dataset, dict[str, Any]]:
        """Hook for further modifications of the poisoned set (WaNet's noise mode)."""
        return poisoned, {}


def _corner(location: Any, size: tuple[int, int], image: tuple[int, int], margin: int) -> tuple[int, int]:
    (ph, pw), (h, w) = size, image
    if isinstance(location, str):
        if location not in LOCATIONS:
            raise InputError(f"location must be one of {', '.join(LOCATIONS)} or a (row, col) pair, got {location!r}")
        top = margin if location.startswith("top") else h - ph - margin
        left = margin if location.endswith("left") else w - pw - margin
    else:
        try:
            top, left = (int(v) for v in location)
        except (TypeError, ValueError):
            raise InputError(f"location must be a corner name or a (row, col) pair, got {location!r}") from None
    if top < 0 or left < 0 or top + ph > h or left + pw > w:
        raise InputError(f"the {ph}x{pw} patch at (row {top}, col {left}) does not fit in the {h}x{w} image")
    return top, left


class BadNets(BackdoorAttack):
    """BadNets (Gu et al. 2017): a patch stamped in a corner; all-to-one or all-to-all.

    Args:
        rate: the poison rate, default 10 %.
        target: the target class, default 0.
        mode: ``"all-to-one"`` (default) or ``"all-to-all"`` (``y -> (y + 1) mod K``).
        patch_size: side of the square patch in pixels; ``None`` gives ``max(2, round(3 · min(H, W) / 28))`` (3 on
            MNIST, 2 on the 8×8 digits).
        pattern: ``"checkerboard"`` (default: bright where ``row + col`` is even, dark elsewhere), ``"white"``
            (a solid bright square) or a tensor ``(patch, patch)`` or ``(C, patch, patch)`` in [0, 1] (0 maps to the
            domain's low end, 1 to its high end).
        location: ``"bottom-right"`` (default, as the paper), another corner, or ``(row, col)`` of the patch's
            top-left pixel.
        margin: pixels between the patch and the image border for a corner location (default 0).
        seed: seeds the choice of the poisons.
        rate_of: ``"set"`` (default: ``rate`` of the whole training set) or ``"target"`` (``rate`` of the poisoned
            target class, ART's ``percent_poison``); see :class:`BackdoorAttack`.
    """

    name = "badnets"

    def __init__(
        self,
        *,
        rate: float = 0.1,
        target: int = 0,
        mode: str = "all-to-one",
        patch_size: int | None = None,
        pattern: str | Tensor = "checkerboard",
        location: str | tuple[int, int] = "bottom-right",
        margin: int = 0,
        seed: int = 0,
        rate_of: str = "set",
    ) -> None:
        super().__init__(rate=rate, target=target, mode=mode, seed=seed, rate_of=rate_of)
        if patch_size is not None and (
            isinstance(patch_size, bool) or not isinstance(patch_size, int) or patch_size < 1
        ):
            raise InputError(f"patch_size must be a positive int or None, got {patch_size!r}")
        if isinstance(pattern, str) and pattern not in ("checkerboard", "white"):
            raise InputError(f"pattern must be 'checkerboard', 'white' or a tensor, got {pattern!r}")
        if not isinstance(pattern, (str, Tensor)):
            raise InputError(f"pattern must be 'checkerboard', 'white' or a tensor, got {type(pattern).__name__}")
        if isinstance(margin, bool) or not isinstance(margin, int) or margin < 0:
            raise InputError(f"margin must be a non-negative int, got {margin!r}")
        self.patch_size, self.pattern, self.location, self.margin = patch_size, pattern, location, margin
        self._params.update(
            patch_size=patch_size,
            pattern=pattern if isinstance(pattern, str) else f"tensor{tuple(pattern.shape)}",
            location=list(location) if isinstance(location, tuple) else location,
            margin=margin,
        )

    def trigger_for(self, data: Dataset) -> PatternTrigger:
        c, h, w = check_image_data(data, "BadNets")
        low, high = data.domain
        if isinstance(self.pattern, Tensor):
            pat = self.pattern.detach().to("cpu", torch.float32)
            if pat.ndim == 2:
                pat = pat[None]
            if pat.ndim != 3 or pat.shape[1] != pat.shape[2] or pat.shape[0] not in (1, c):
                raise InputError(f"BadNets: a pattern tensor must be (p, p) or ({c}, p, p), got {tuple(pat.shape)}")
            if bool((pat < 0).any()) or bool((pat > 1).any()):
                raise InputError("BadNets: pattern values must lie in [0, 1]")
            size = int(pat.shape[-1])
        else:
            size = self.patch_size or max(2, round(3 * min(h, w) / 28))
            if self.pattern == "white":
                pat = torch.ones(1, size, size)
            else:
                rows, cols = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
                pat = ((rows + cols) % 2 == 0).to(torch.float32)[None]
        if size > min(h, w):
            raise InputError(f"BadNets: a {size}x{size} patch does not fit in {h}x{w} images")
        top, left = _corner(self.location, (size, size), (h, w), self.margin)
        pattern = torch.full((c, h, w), low)
        mask = torch.zeros(1, h, w)
        pattern[:, top : top + size, left : left + size] = low + (high - low) * pat.expand(c, size, size)
        mask[:, top : top + size, left : left + size] = 1.0
        return PatternTrigger(pattern, mask.expand(c, h, w))


class Blended(BackdoorAttack):
    """Blended injection (Chen et al. 2017): ``x' = (1 - α) x + α k`` with a fixed key pattern ``k``.

    Args:
        rate: the poison rate, default 10 %.
        target: the target class, default 0.
        mode: ``"all-to-one"`` (default) or ``"all-to-all"``.
        alpha: the blend ratio α in (0, 1], default 0.2 (the paper's training ratio).
        pattern: the key pattern: ``None`` (default) for uniform random noise over the input domain drawn from
            ``seed`` (the paper's random pattern), or a tensor of the data's feature shape — or ``(H, W)``, repeated
            over the channels — with values in the input domain (e.g. a cartoon image, as the paper's Hello Kitty).
        seed: seeds the choice of the poisons and the noise pattern.
        rate_of: ``"set"`` (default) or ``"target"``; see :class:`BackdoorAttack`.
    """

    name = "blended"

    def __init__(
        self,
        *,
        rate: float = 0.1,
        target: int = 0,
        mode: str = "all-to-one",
        alpha: float = 0.2,
        pattern: Tensor | None = None,
        seed: int = 0,
        rate_of: str = "set",
    ) -> None:
        super().__init__(rate=rate, target=target, mode=mode, seed=seed, rate_of=rate_of)
        self.alpha = _positive_number(alpha, "alpha")
        if self.alpha > 1:
            raise InputError(f"alpha must lie in (0, 1], got {alpha!r}")
        if pattern is not None and not isinstance(pattern, Tensor):
            raise InputError(f"pattern must be None (random noise) or a tensor, got {type(pattern).__name__}")
        self.pattern = pattern
        self._params.update(alpha=self.alpha, pattern=None if pattern is None else f"tensor{tuple(pattern.shape)}")

    def trigger_for(self, data: Dataset) -> PatternTrigger:
        shape = data.feature_shape
        low, high = data.domain
        if self.pattern is None:
            # A generator of its own, so the pattern does not depend on how many poisons are drawn.
            gen = torch.Generator().manual_seed(self.seed + 0x5EED)
            key = low + (high - low) * torch.rand(shape, generator=gen)
        else:
            key = self.pattern.detach().to("cpu", torch.float32)
            if len(shape) == 3 and key.ndim == 2:
                key = key[None].expand(shape[0], -1, -1)
            if tuple(key.shape) != shape:
                raise InputError(f"Blended: the pattern has shape {tuple(self.pattern.shape)}, the data {shape}")
            if not bool(torch.isfinite(key).all()) or float(key.min()) < low or float(key.max()) > high:
                raise InputError(f"Blended: pattern values must lie in the input domain [{low:g}, {high:g}]")
        return PatternTrigger(key, torch.full(shape, self.alpha))


class WaNet(BackdoorAttack):
    """WaNet (Nguyen & Tran, ICLR 2021): a fixed smooth warp as the trigger, with the noise mode.

    Args:
        rate: the poison rate (the paper's ``p_a``), default 10 %.
        target: the target class, default 0.
        mode: ``"all-to-one"`` (default) or ``"all-to-all"``.
        k: side of the control grid of random displacements, default 4 (capped at ``min(H, W)``).
        strength: the warping strength ``s``, default 0.5; 0 gives the identity warp.
        grid_rescale: the factor applied to the warped grid before clamping, default 1.
        cross_ratio: noise-mode samples per poison (the paper's ``ρ_n / ρ_a``), default 2; 0 turns the mode off.
        seed: seeds the warping field, the choice of the poisons and the noise.
        rate_of: ``"set"`` (default) or ``"target"``; see :class:`BackdoorAttack`.
    """

    name = "wanet"

    def __init__(
        self,
        *,
        rate: float = 0.1,
        target: int = 0,
        mode: str = "all-to-one",
        k: int = 4,
        strength: float = 0.5,
        grid_rescale: float = 1.0,
        cross_ratio: float = 2.0,
        seed: int = 0,
        rate_of: str = "set",
    ) -> None:
        super().__init__(rate=rate, target=target, mode=mode, seed=seed, rate_of=rate_of)
        if isinstance(k, bool) or not isinstance(k, int) or k < 2:
            raise InputError(f"k must be an int >= 2 (the control grid's side), got {k!r}")
        self.k = k
        self.strength = _positive_number(strength, "strength", allow_zero=True)
        self.grid_rescale = _positive_number(grid_rescale, "grid_rescale")
        self.cross_ratio = _positive_number(cross_ratio, "cross_ratio", allow_zero=True)
        self._params.update(k=k, strength=self.strength, grid_rescale=self.grid_rescale, cross_ratio=self.cross_ratio)

    def _grid(self, h: int, w: int) -> Tensor:
        k = min(self.k, h, w)
        gen = torch.Generator().manual_seed(self.seed + 0x3A7E)
        ins = torch.rand(1, 2, k, k, generator=gen) * 2 - 1
        ins = ins / ins.abs().mean()
        field = F.interpolate(ins, size=(h, w), mode="bicubic", align_corners=True)[0].permute(1, 2, 0)
        rows, cols = torch.meshgrid(torch.linspace(-1, 1, h), torch.linspace(-1, 1, w), indexing="ij")
        identity = torch.stack((cols, rows), dim=-1)  # grid_sample reads (x, y) = (column, row)
        scale = torch.tensor([1.0 / w, 1.0 / h])
        return torch.clamp((identity + self.strength * field * scale) * self.grid_rescale, -1, 1)

    def trigger_for(self, data: Dataset) -> WarpTrigger:
        c, h, w = check_image_data(data, "WaNet")
        return WarpTrigger(self._grid(h, w), c)

    def _extra(
        self, poisoned: Dataset, clean: Dataset, idx: Tensor, trigger: Any, gen: torch.Generator
    ) -> tuple[Dataset, dict[str, Any]]:
        n_cross = round(self.cross_ratio * idx.numel())
        if n_cross == 0:
            return poisoned, {}
        rest = torch.ones(len(clean), dtype=torch.bool)
        rest[idx] = False
        others = torch.nonzero(rest).reshape(-1)
        cross = choose(others, min(n_cross, others.numel()), gen)
        if cross.numel() == 0:
            return poisoned, {}
        _, h, w = clean.feature_shape
        noise = (torch.rand(cross.numel(), h, w, 2, generator=gen) * 2 - 1) / torch.tensor([w, h])
        grids = torch.clamp(trigger.grid[None] + noise, -1, 1)
        xc = clean.x[cross.to(clean.x.device)]
        warped = F.grid_sample(xc, grids.to(xc.device, xc.dtype), mode="bilinear", padding_mode="border",
                               align_corners=True)  # fmt: skip
        out = replace_rows(poisoned, cross, warped, None, name=poisoned.name)
        return out, {"cross_indices": cross}
