"""Input-aware dynamic backdoor (Nguyen & Tran, "Input-Aware Dynamic Backdoor Attack", NeurIPS 2020).

Unlike BadNets, Blended and WaNet, whose trigger is one fixed transformation stamped on every input, the
input-aware attack gives **every input its own trigger**: a pattern generator ``G`` (an encoder-decoder network)
and a mask generator ``M`` map an input ``x`` to a pattern ``p = G(x)`` and a mask ``m = M(x)``, and the
triggered input is ``B(x) = (1 - m) ⊙ x + m ⊙ p``. The classifier ``f`` and ``G`` are trained **jointly** by the
attacker (a training-time attack that controls the training loop, not a poisoned data set), so the attack
returns the trained backdoored classifier and the generators, not a data set.

Training, per mini-batch of the paper (Algorithm 1 and Section 3):

* a fraction ``rate`` = ρ_b = 0.1 of the batch is triggered with its own trigger and relabelled to the target
  (all-to-one) or to ``(y + 1) mod K`` (all-to-all): the **backdoor** cross-entropy;
* a further fraction ``cross_rate`` = ρ_c = 0.1 receives the trigger generated from *another* input of a second,
  independently shuffled batch and **keeps its true label**: the **cross-trigger** cross-entropy, which forces the
  classifier to accept only the trigger made for the input at hand (a trigger is not reusable: the
  "nonreusability" of the paper);
* the rest of the batch is clean: the **clean** cross-entropy (the three are one cross-entropy over the batch);
* the **diversity loss** ``λ_div · mean(‖x - x'‖ / ‖G(x) - G(x')‖)`` (λ_div = 1) over pairs of distinct inputs
  keeps ``G`` from collapsing to one fixed pattern (distances are root-mean-square over the pixels, as in the
  reference code);
* the mask generator is **pre-trained** alone (25 epochs in the paper) with the same diversity loss on masks and
  the density regulariser ``λ_norm · mean(max(0, m - γ))`` (λ_norm = 100, target density γ = 0.032), then
  frozen. The regulariser is the per-pixel hinge of the reference code (the paper writes it on the mask's mean,
  ``max(0, ‖m‖₁ / (HW) − γ)``; the per-pixel hinge is the stronger one and keeps every mask sparse).

Both generators are the paper's encoder-decoder: blocks of ``Conv 3×3 → BatchNorm → ReLU`` (two per level,
``steps`` = 2 max-pooling levels with 16 then 32 channels for MNIST-size images, the paper's MNIST network), a
middle block, bilinear upsampling back; the pattern goes through ``tanh(·) / 2 + 1/2`` into [0, 1] (then mapped
to the data domain), the mask through the steep threshold ``tanh(20 · z - 10) / 2 + 1/2``.
Images whose side is not a multiple of ``2^steps`` are padded (edge replication) before and cropped after.

Paper defaults and deviations (documented here, exposed as arguments):

* ρ_b = ρ_c = 0.1, λ_div = 1, λ_norm = 100, γ = 0.032, 25 mask epochs, generator Adam(lr 0.01, betas (0.5, 0.9)),
  mask Adam(lr 0.01, betas (0.5, 0.9)) with the learning rate divided by 10 after 10 and 20 epochs; all as in the
  reference ``config.py``.
* The paper trains the classifier with SGD (lr 0.01, momentum 0.9, weight decay 5e-4, ÷10 at epochs 100, 200,
  300, 400) for 600 epochs with random crop and rotation. Here the classifier is trained with Adam (``lr`` = 2e-3
  by default, constant) for ``epochs`` (600 by default, the paper's) without augmentation; ``optimizer="sgd"``
  gives the paper's optimiser (without its schedule). On the 8×8 digits (zoo cnn 16/32/64, 1,437 images, paper
  defaults otherwise) the 600 epochs reach clean accuracy 99.2 % (a clean model: 98.3 %), ASR 92.0 % and
  cross-trigger accuracy 77.2 % (300 epochs: 99.4 %, 85.2 %, 74.7 %); the backdoor alone (``cross_rate=0``) is
  learnt in 15 epochs (ASR 99 %) but its triggers are then reusable (cross-trigger accuracy 12 %): making them
  input-specific is the slow part of the training.
* The mask pre-training runs a fixed number of *epochs* (25); on a small data set that is few steps, and the mask
  density stays above ``γ`` (on the digits: about 0.15 instead of 0.032 at batch 128).
* The reference pairs the diversity loss's inputs as ``inputs1[:n_b]`` with ``inputs2[n_b:2 n_b]``, which only
  works while ρ_b = ρ_c; here the pairs are the backdoor rows of the batch and the same rows of the second batch,
  for any ρ_b, ρ_c.
* The backdoor patterns and the cross patterns of a step come from one call of the generator, so they share the
  BatchNorm batch statistics (the reference makes two calls of 12 inputs each, whose statistics differ).
* The root-mean-square distances of the diversity loss get ``ε² = 1e-14`` under the square root: identical masks
  (common on 8×8 images early in the mask pre-training) otherwise give an infinite gradient and NaN weights.
* The inputs go to the generators as they are (in the data domain); the reference normalises them first, which
  the generators' first BatchNorm makes immaterial.

Metrics: :func:`~bastion.poisoning.base.attack_success_rate` with ``result.trigger`` (a :class:`InputAwareTrigger`,
itself a :class:`~bastion.poisoning.base.Trigger`) measures the ASR; :func:`cross_trigger_accuracy` the accuracy
on inputs carrying another input's trigger (high when the triggers are input-specific). For the data-level
defences, :meth:`InputAwareResult.poisoned_data` draws a poisoned training set as the classifier saw it
(a fraction ``rate`` triggered and relabelled, ``cross_rate`` cross-triggered with their true labels) as an
ordinary :class:`~bastion.poisoning.base.PoisonedData` whose trigger holds the generators' weights, so
``PoisonedData.save`` / ``load`` (and ``bastion backdoor-scan --poisoned``) carry the generator without pickling.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from bastion.data import Dataset
from bastion.errors import InputError
from bastion.models.checks import check_logits, eval_mode, model_device
from bastion.poisoning.base import (
    PoisonAttack,
    PoisonedData,
    Trigger,
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

__all__ = [
    "InputAware",
    "InputAwareResult",
    "InputAwareTrigger",
    "TriggerGenerator",
    "cross_trigger_accuracy",
]

_EPS = 1e-7


# -------------------------------------------------------------------------------------------------- networks
def _block(c_in: int, c_out: int, *, relu: bool = True) -> list[nn.Module]:
    layers: list[nn.Module] = [nn.Conv2d(c_in, c_out, 3, padding=1), nn.BatchNorm2d(c_out, momentum=0.05)]
    if relu:
        layers.append(nn.ReLU())
    return layers


class TriggerGenerator(nn.Module):
    """The encoder-decoder generator of Nguyen & Tran (NeurIPS 2020), for patterns or masks.

    ``steps`` levels of two ``Conv 3×3 → BatchNorm → ReLU`` blocks and a 2×2 max-pool (``width``, ``2·width``, ...
    channels), a middle block, then ``steps`` levels of bilinear ×2 upsampling and two blocks halving the channels,
    the last one without ReLU and with ``out_channels`` channels. ``forward`` returns values in [0, 1]
    (``tanh(z) / (2 + ε) + 1/2``); :meth:`threshold` is the mask generator's steep squashing of the raw output.

    Args:
        in_channels: channels of the input images.
        out_channels: channels of the output (the image's for patterns, 1 for masks).
        width: channels of the first level (16: the paper's MNIST generator; 32 for CIFAR-10).
        steps: pooling levels (2 for MNIST, 3 for CIFAR-10 in the paper).
    """

    def __init__(self, in_channels: int, out_channels: int, *, width: int = 16, steps: int = 2) -> None:
        super().__init__()
        for name, v in (("in_channels", in_channels), ("out_channels", out_channels), ("width", width)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise InputError(f"TriggerGenerator: {name} must be a positive int, got {v!r}")
        if isinstance(steps, bool) or not isinstance(steps, int) or not 1 <= steps <= 4:
            raise InputError(f"TriggerGenerator: steps must be an int in [1, 4], got {steps!r}")
        self.in_channels, self.out_channels, self.width, self.steps = in_channels, out_channels, width, steps
        layers: list[nn.Module] = []
        c, nxt = in_channels, width
        for level in range(steps):
            layers += _block(c, nxt) + _block(nxt, nxt) + [nn.MaxPool2d(2)]
            c = nxt
            if level < steps - 1:
                nxt *= 2
        layers += _block(c, c)
        for level in range(steps):
            out = out_channels if level == steps - 1 else c // 2
            layers += [nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False)]
            layers += _block(c, c) + _block(c, out, relu=level < steps - 1)
            c = out
        self.net = nn.Sequential(*layers)

    def raw(self, x: Tensor) -> Tensor:
        """The network's output before squashing, cropped back to the input's height and width."""
        h, w = x.shape[-2:]
        m = 2**self.steps
        ph, pw = (-h) % m, (-w) % m
        if ph or pw:
            x = F.pad(x, (0, pw, 0, ph), mode="replicate")
        return self.net(x)[..., :h, :w]

    def forward(self, x: Tensor) -> Tensor:
        return torch.tanh(self.raw(x)) / (2 + _EPS) + 0.5

    def threshold(self, x: Tensor) -> Tensor:
        """The mask generator's output: ``tanh(20 z - 10) / (2 + ε) + 1/2`` of the raw output ``z`` (nearly binary)."""
        return torch.tanh(self.raw(x) * 20 - 10) / (2 + _EPS) + 0.5

    def config(self) -> dict[str, int]:
        return {"in_channels": self.in_channels, "out_channels": self.out_channels, "width": self.width,
                "steps": self.steps}  # fmt: skip


def _stamp(x: Tensor, pattern: Tensor, mask: Tensor) -> Tensor:
    return x + (pattern - x) * mask


class InputAwareTrigger(Trigger):
    """The input-aware trigger: ``B(x) = x + (p(x) - x) ⊙ m(x)`` with the trained pattern and mask generators.

    Deterministic (both generators in eval mode, BatchNorm on its running statistics) and inside the data domain
    (the pattern is mapped into ``domain``, the mask lies in [0, 1], so ``B(x)`` is a convex combination).
    :meth:`cross` stamps on ``x`` the trigger generated from other inputs ``source``.

    Args:
        pattern: the pattern generator (its ``forward`` in [0, 1]).
        mask: the mask generator (its :meth:`TriggerGenerator.threshold` is the mask).
        domain: the input domain ``(low, high)`` the pattern is mapped to.
        feature_shape: ``(C, H, W)`` of the inputs.
    """

    kind = "input-aware"

    def __init__(
        self, pattern: TriggerGenerator, mask: TriggerGenerator, domain: tuple[float, float],
        feature_shape: tuple[int, int, int],
    ) -> None:  # fmt: skip
        if not isinstance(pattern, TriggerGenerator) or not isinstance(mask, TriggerGenerator):
            raise InputError("InputAwareTrigger: pattern and mask must be TriggerGenerator networks")
        c = int(feature_shape[0])
        if pattern.in_channels != c or pattern.out_channels != c or mask.in_channels != c or mask.out_channels != 1:
            raise InputError(
                f"InputAwareTrigger: generators for {c}-channel images need pattern {c}->{c} and mask {c}->1 channels"
            )
        low, high = float(domain[0]), float(domain[1])
        if not (math.isfinite(low) and math.isfinite(high) and low < high):
            raise InputError(f"InputAwareTrigger: domain must be a finite (low, high) with low < high, got {domain!r}")
        self.generator = copy.deepcopy(pattern).eval().requires_grad_(False)
        self.mask_generator = copy.deepcopy(mask).eval().requires_grad_(False)
        self.domain = (low, high)
        self.feature_shape = tuple(int(d) for d in feature_shape)

    def _nets(self, x: Tensor) -> tuple[TriggerGenerator, TriggerGenerator]:
        return self.generator.to(x.device, x.dtype), self.mask_generator.to(x.device, x.dtype)

    def pattern_and_mask(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """The pattern (in the domain) and the mask (in [0, 1], one channel) generated from the inputs ``x``."""
        from bastion.poisoning.base import _check_batch

        _check_batch(x, self.feature_shape, "InputAwareTrigger")
        g, m = self._nets(x)
        low, high = self.domain
        with torch.no_grad():
            return low + (high - low) * g(x), m.threshold(x)

    def _apply(self, x: Tensor) -> Tensor:
        p, m = self.pattern_and_mask(x)
        return _stamp(x, p, m)

    def cross(self, x: Tensor, source: Tensor) -> Tensor:
        """``x`` carrying the triggers generated from ``source`` (same batch size): the cross-trigger inputs."""
        from bastion.poisoning.base import _check_batch

        _check_batch(x, self.feature_shape, "InputAwareTrigger.cross")
        if not isinstance(source, Tensor) or source.shape != x.shape:
            raise InputError(f"InputAwareTrigger.cross: source must be a tensor of x's shape {tuple(x.shape)}")
        p, m = self.pattern_and_mask(source.to(device=x.device, dtype=x.dtype))
        return _stamp(x, p, m)

    def state(self) -> tuple[dict[str, Any], dict[str, Tensor]]:
        tensors = {f"G.{k}": v.detach().cpu() for k, v in self.generator.state_dict().items()}
        tensors.update({f"M.{k}": v.detach().cpu() for k, v in self.mask_generator.state_dict().items()})
        params = {
            "generator": self.generator.config(),
            "mask": self.mask_generator.config(),
            "domain": list(self.domain),
            "feature_shape": list(self.feature_shape),
        }
        return params, tensors

    @classmethod
    def from_state(cls, params: Mapping[str, Any], tensors: Mapping[str, Tensor]) -> InputAwareTrigger:
        try:
            g = TriggerGenerator(**params["generator"])
            m = TriggerGenerator(**params["mask"])
            g.load_state_dict({k[2:]: v for k, v in tensors.items() if k.startswith("G.")})
            m.load_state_dict({k[2:]: v for k, v in tensors.items() if k.startswith("M.")})
            shape = tuple(int(d) for d in params["feature_shape"])
            domain = (float(params["domain"][0]), float(params["domain"][1]))
        except (KeyError, TypeError, ValueError, RuntimeError) as exc:
            raise InputError(f"InputAwareTrigger: the saved generator does not rebuild ({exc})") from None
        if len(shape) != 3:
            raise InputError(f"InputAwareTrigger: saved feature shape {shape} is not (C, H, W)")
        return cls(g, m, domain, (shape[0], shape[1], shape[2]))

    def __repr__(self) -> str:
        g = self.generator.config()
        return f"InputAwareTrigger(shape={self.feature_shape}, width={g['width']}, steps={g['steps']})"


# ----------------------------------------------------------------------------------------------- metrics
def cross_trigger_accuracy(
    model: nn.Module, test: Dataset, trigger: InputAwareTrigger, *, seed: int = 0, batch_size: int = 512
) -> float:
    """Accuracy on test inputs carrying the trigger generated from *another* test input (the paper's "cross").

    Each input ``x_i`` gets the trigger of ``x_π(i)`` for a seeded random pairing ``π`` without fixed points (the
    inputs in a random order, each taking the trigger of the next) and is scored against its own label ``y_i``.
    A high value means the triggers are input-specific: a trigger made for one input does not open the backdoor
    on another.

    Args:
        model: the backdoored classifier.
        test: clean labelled test data.
        trigger: the attack's :class:`InputAwareTrigger`.
        seed: seeds the pairing.
        batch_size: inputs per forward pass.

    Returns:
        The fraction of cross-triggered inputs classified as their true label.
    """
    if not isinstance(model, nn.Module):
        raise InputError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    test = check_dataset(test, "test")
    if not isinstance(trigger, InputAwareTrigger):
        raise InputError(f"trigger must be an InputAwareTrigger, got {type(trigger).__name__}")
    if len(test) < 2:
        raise InputError("cross_trigger_accuracy needs at least two test inputs")
    gen = torch.Generator().manual_seed(check_seed(seed))
    n = len(test)
    # a random cyclic pairing: sigma[j] takes the trigger of sigma[j + 1], so no input gets its own trigger
    sigma = torch.randperm(n, generator=gen)
    perm = torch.empty(n, dtype=torch.int64)
    perm[sigma] = torch.roll(sigma, -1)
    device = model_device(model)
    hits = 0
    with torch.no_grad(), eval_mode(model):
        for start in range(0, n, batch_size):
            rows = torch.arange(start, min(n, start + batch_size))
            xb = test.x[rows.to(test.x.device)].to(device)
            src = test.x[perm[rows].to(test.x.device)].to(device)
            logits = model(trigger.cross(xb, src))
            hits += int((logits.argmax(1).cpu() == test.y[rows.to(test.y.device)].cpu()).sum())
    return hits / n


# ------------------------------------------------------------------------------------------------ result
@dataclass(frozen=True, eq=False)
class InputAwareResult:
    """What :class:`InputAware` returns: the backdoored classifier, the trigger (generators) and the training log.

    Attributes:
        model: the trained backdoored classifier (eval mode, on the device it was trained on).
        trigger: the :class:`InputAwareTrigger` (pattern and mask generators, on the CPU).
        target: the target class (all-to-one), or None (all-to-all).
        mode: ``"all-to-one"`` or ``"all-to-all"``.
        config: the attack's hyperparameters.
        history: one dictionary per epoch of the joint training (``loss``, ``ce``, ``div``, and the training-batch
            accuracies ``clean``, ``backdoor``, ``cross``), after ``mask_history`` (``norm``, ``div`` per mask epoch).
        mask_history: the mask pre-training log.
        seconds: wall time of the attack.
    """

    model: nn.Module
    trigger: InputAwareTrigger
    target: int | None
    mode: str
    config: dict[str, Any]
    history: list[dict[str, float]] = field(default_factory=list)
    mask_history: list[dict[str, float]] = field(default_factory=list)
    seconds: float = 0.0

    def poisoned_data(self, data: Dataset, *, rate: float | None = None, cross_rate: float | None = None,
                      seed: int | None = None) -> PoisonedData:  # fmt: skip
        """A poisoned training set as the classifier saw it: one seeded draw of the training-time poisoning.

        A fraction ``rate`` (default: the attack's ρ_b) of ``data`` is triggered with its own trigger and
        relabelled (poisons drawn outside the target class for all-to-one), a fraction ``cross_rate`` (ρ_c) of the
        rest carries another sample's trigger and keeps its label (``cross_indices``). The result's trigger is
        :attr:`trigger`, so it saves and loads with the generators' weights (:meth:`PoisonedData.save`).

        Args:
            data: the training set the attack was trained on (or any data of the same shape).
            rate: fraction of ``data`` triggered and relabelled.
            cross_rate: fraction of ``data`` cross-triggered.
            seed: seeds the draw; the attack's seed by default.

        Returns:
            A :class:`PoisonedData` with ``attack="input-aware"``.
        """
        data = check_dataset(data)
        if data.feature_shape != self.trigger.feature_shape:
            raise InputError(
                f"the trigger applies to inputs {self.trigger.feature_shape}, data holds {data.feature_shape}"
            )
        r = check_rate(self.config["rate"] if rate is None else rate)
        rc = float(self.config["cross_rate"] if cross_rate is None else cross_rate)
        if not (math.isfinite(rc) and 0.0 <= rc < 1.0):
            raise InputError(f"cross_rate must lie in [0, 1), got {cross_rate!r}")
        gen = torch.Generator().manual_seed(check_seed(self.config["seed"] if seed is None else seed))
        y = data.y.cpu()
        k = data.num_classes
        if self.mode == "all-to-one":
            cand = torch.nonzero(y != int(self.target or 0)).reshape(-1)
        else:
            cand = torch.arange(len(y))
        if cand.numel() == 0:
            raise InputError(f"every sample is of the target class {self.target}; nothing to poison")
        idx = choose(cand, min(n_from_rate(r, len(data)), cand.numel()), gen)
        x_new = self.trigger.apply(data.x[idx.to(data.x.device)])
        y_new = torch.full((idx.numel(),), int(self.target or 0)) if self.mode == "all-to-one" else (y[idx] + 1) % k
        poisoned = replace_rows(data, idx, x_new, y_new, name=f"{data.name} [input-aware {r:g}]")
        cross = None
        n_cross = round(rc * len(data))
        if n_cross:
            rest = torch.ones(len(data), dtype=torch.bool)
            rest[idx] = False
            others = torch.nonzero(rest).reshape(-1)
            cross = choose(others, min(n_cross, others.numel()), gen)
            src = torch.randint(0, len(data), (cross.numel(),), generator=gen)
            same = src == cross
            src[same] = (src[same] + 1) % len(data)
            xc = self.trigger.cross(data.x[cross.to(data.x.device)], data.x[src.to(data.x.device)])
            poisoned = replace_rows(poisoned, cross, xc, None, name=poisoned.name)
        return PoisonedData(
            data=poisoned, poison_indices=idx, attack="input-aware", target=self.target, mode=self.mode,
            trigger=self.trigger, config={**self.config, "rate": r, "cross_rate": rc}, cross_indices=cross,
        )  # fmt: skip

    def to_dict(self) -> dict[str, Any]:
        last = self.history[-1] if self.history else {}
        return {"attack": "input-aware", "target": self.target, "mode": self.mode, "config": self.config,
                "final_epoch": last, "epochs": len(self.history), "seconds": self.seconds}  # fmt: skip


# ------------------------------------------------------------------------------------------------ attack
def _rms(a: Tensor, b: Tensor) -> Tensor:
    return (((a - b) ** 2).flatten(1).mean(1) + _EPS**2).sqrt()


def _number(value: Any, what: str, *, low: float = 0.0, allow_low: bool = True, high: float = math.inf) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InputError(f"{what} must be a number, got {value!r}")
    v = float(value)
    if not math.isfinite(v) or v < low or (v == low and not allow_low) or v > high:
        bound = ">=" if allow_low else ">"
        raise InputError(f"{what} must be {bound} {low:g}" + (f" and <= {high:g}" if high < math.inf else "")
                         + f", got {value!r}")  # fmt: skip
    return v


def _int(value: Any, what: str, *, low: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise InputError(f"{what} must be an int >= {low}, got {value!r}")
    return int(value)


class InputAware(PoisonAttack):
    """The input-aware dynamic backdoor of Nguyen & Tran (NeurIPS 2020); see the module docstring.

    ``InputAware(...)(model, data)`` trains a copy of ``model`` jointly with a pattern generator (after
    pre-training a mask generator) and returns an :class:`InputAwareResult` (the backdoored model, the
    :class:`InputAwareTrigger`, the training log). The ASR is :func:`~bastion.poisoning.base.attack_success_rate`
    with ``result.trigger``.

    Args:
        target: the target class, default 0.
        mode: ``"all-to-one"`` (default) or ``"all-to-all"`` (``y -> (y + 1) mod K``).
        rate: ρ_b, the fraction of each batch triggered and relabelled, default 0.1.
        cross_rate: ρ_c, the fraction of each batch cross-triggered with its label kept, default 0.1.
        lambda_div: weight of the diversity loss, default 1.
        lambda_norm: weight of the mask density regulariser, default 100.
        mask_density: the mask's target density γ, default 0.032.
        mask_epochs: epochs of mask pre-training, default 25.
        epochs: epochs of joint training, default 600 (the paper's ``n_iters``).
        batch_size: samples per step, default 128.
        lr: the classifier's learning rate, default 2e-3 (Adam), or the paper's 0.01 with ``optimizer="sgd"``.
        optimizer: ``"adam"`` (default) or ``"sgd"`` (momentum 0.9, weight decay 5e-4, the paper's).
        lr_generator: the pattern generator's Adam learning rate, default 0.01.
        lr_mask: the mask generator's Adam learning rate, default 0.01 (÷10 after epochs 10 and 20).
        width: channels of the generators' first level, default 16 (the paper's MNIST generator).
        steps: pooling levels of the generators, default 2.
        seed: seeds the generators' initial weights, the batches and the pairings (the classifier keeps the
            weights it is given).
        progress: show progress bars.
    """

    name = "input-aware"

    def __init__(
        self,
        *,
        target: int = 0,
        mode: str = "all-to-one",
        rate: float = 0.1,
        cross_rate: float = 0.1,
        lambda_div: float = 1.0,
        lambda_norm: float = 100.0,
        mask_density: float = 0.032,
        mask_epochs: int = 25,
        epochs: int = 600,
        batch_size: int = 128,
        lr: float | None = None,
        optimizer: str = "adam",
        lr_generator: float = 0.01,
        lr_mask: float = 0.01,
        width: int = 16,
        steps: int = 2,
        seed: int = 0,
        progress: bool = False,
    ) -> None:
        super().__init__()
        if isinstance(target, bool) or not isinstance(target, int) or target < 0:
            raise InputError(f"target must be a class index (a non-negative int), got {target!r}")
        self.target = target
        self.mode = check_mode(mode)
        self.rate = check_rate(rate, "rate")
        self.cross_rate = _number(cross_rate, "cross_rate", high=1.0)
        if self.rate + self.cross_rate >= 1.0:
            raise InputError(
                f"rate + cross_rate must be < 1 (some of each batch stays clean), got {rate}, {cross_rate}"
            )
        self.lambda_div = _number(lambda_div, "lambda_div")
        self.lambda_norm = _number(lambda_norm, "lambda_norm")
        self.mask_density = _number(mask_density, "mask_density", high=1.0)
        self.mask_epochs = _int(mask_epochs, "mask_epochs", low=0)
        self.epochs = _int(epochs, "epochs")
        self.batch_size = _int(batch_size, "batch_size", low=2)
        if optimizer not in ("adam", "sgd"):
            raise InputError(f"optimizer must be 'adam' or 'sgd', got {optimizer!r}")
        self.optimizer = optimizer
        self.lr = _number(lr if lr is not None else (2e-3 if optimizer == "adam" else 0.01), "lr", allow_low=False)
        self.lr_generator = _number(lr_generator, "lr_generator", allow_low=False)
        self.lr_mask = _number(lr_mask, "lr_mask", allow_low=False)
        self.width = _int(width, "width")
        self.steps = _int(steps, "steps")
        if self.steps > 4:
            raise InputError(f"steps must be in [1, 4], got {steps!r}")
        self.seed = check_seed(seed)
        self.progress = bool(progress)
        self._params = {
            "target": self.target, "mode": self.mode, "rate": self.rate, "cross_rate": self.cross_rate,
            "lambda_div": self.lambda_div, "lambda_norm": self.lambda_norm, "mask_density": self.mask_density,
            "mask_epochs": self.mask_epochs, "epochs": self.epochs, "batch_size": self.batch_size, "lr": self.lr,
            "optimizer": self.optimizer, "lr_generator": self.lr_generator, "lr_mask": self.lr_mask,
            "width": self.width, "steps": self.steps, "seed": self.seed,
        }  # fmt: skip

    # ------------------------------------------------------------------------------------------ helpers
    def _labels(self, y: Tensor, k: int) -> Tensor:
        return torch.full_like(y, self.target) if self.mode == "all-to-one" else (y + 1) % k

    def _pretrain_mask(
        self, mask: TriggerGenerator, x: Tensor, gen: torch.Generator, bar: Any
    ) -> list[dict[str, float]]:
        opt = torch.optim.Adam(mask.parameters(), lr=self.lr_mask, betas=(0.5, 0.9))
        sched = torch.optim.lr_scheduler.MultiStepLR(opt, [10, 20], 0.1)
        log: list[dict[str, float]] = []
        n = x.shape[0]
        mask.train()
        for _ in range(self.mask_epochs):
            o1 = torch.randperm(n, generator=gen).to(x.device)
            o2 = torch.randperm(n, generator=gen).to(x.device)
            tot_norm = tot_div = 0.0
            batches = 0
            for start in range(0, n, self.batch_size):
                x1, x2 = x[o1[start : start + self.batch_size]], x[o2[start : start + self.batch_size]]
                if x1.shape[0] < 2:
                    continue
                m1, m2 = mask.threshold(x1), mask.threshold(x2)
                div = (_rms(x1, x2) / (_rms(m1, m2) + _EPS)).mean()
                norm = F.relu(m1 - self.mask_density).mean()
                loss = self.lambda_norm * norm + self.lambda_div * div
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                tot_norm += float(norm.detach())
                tot_div += float(div.detach())
                batches += 1
            sched.step()
            log.append({"norm": tot_norm / max(1, batches), "div": tot_div / max(1, batches)})
            bar.update(1)
        mask.eval().requires_grad_(False)
        return log

    # -------------------------------------------------------------------------------------------- call
    def __call__(self, model: nn.Module, data: Dataset) -> InputAwareResult:
        """Train a backdoored copy of ``model`` on ``data`` with the input-aware trigger.

        Args:
            model: the classifier to backdoor (usually freshly initialised; left unchanged, a copy is trained on
                its device).
            data: the clean training set (images ``(C, H, W)``).

        Returns:
            The :class:`InputAwareResult`.

        Raises:
            InputError: not a model, non-image or empty data, a target outside the classes, a model with fewer
                logits than classes.
        """
        started = time.perf_counter()
        if not isinstance(model, nn.Module):
            raise InputError(f"model must be a torch.nn.Module returning logits, got {type(model).__name__}")
        data = check_dataset(data)
        c, h, w = check_image_data(data, "InputAware")
        k = data.num_classes
        if self.mode == "all-to-one":
            check_class(self.target, k, "target")
        if len(data) < 2:
            raise InputError("InputAware needs at least two training samples")
        net = copy.deepcopy(model)
        device = model_device(net)
        x_all = data.x.to(device=device, dtype=torch.float32)
        y_all = data.y.to(device)
        with torch.no_grad(), eval_mode(net):
            kk = check_logits(net(x_all[:2]), 2)
        if kk < k:
            raise InputError(f"the model returns {kk} logits but the data has {k} classes")
        low, high = data.domain
        gen = torch.Generator().manual_seed(self.seed)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            g = TriggerGenerator(c, c, width=self.width, steps=self.steps).to(device)
            m = TriggerGenerator(c, 1, width=self.width, steps=self.steps).to(device)
        total = self.mask_epochs + self.epochs
        with tqdm(total=total, desc="input-aware", unit="epoch", disable=not self.progress, leave=False) as bar:
            mask_log = self._pretrain_mask(m, x_all, gen, bar)
            history = self._train(net, g, m, x_all, y_all, k, (low, high), gen, bar)
        net.eval()
        trigger = InputAwareTrigger(g.cpu(), m.cpu(), (low, high), (c, h, w))
        return InputAwareResult(
            model=net, trigger=trigger, target=self.target if self.mode == "all-to-one" else None, mode=self.mode,
            config=self.config(), history=history, mask_history=mask_log, seconds=time.perf_counter() - started,
        )  # fmt: skip

    def _train(
        self, net: nn.Module, g: TriggerGenerator, m: TriggerGenerator, x_all: Tensor, y_all: Tensor, k: int,
        domain: tuple[float, float], gen: torch.Generator, bar: Any,
    ) -> list[dict[str, float]]:  # fmt: skip
        low, high = domain
        if self.optimizer == "sgd":
            opt_c: torch.optim.Optimizer = torch.optim.SGD(net.parameters(), lr=self.lr, momentum=0.9,
                                                           weight_decay=5e-4)  # fmt: skip
        else:
            opt_c = torch.optim.Adam(net.parameters(), lr=self.lr)
        opt_g = torch.optim.Adam(g.parameters(), lr=self.lr_generator, betas=(0.5, 0.9))
        n = x_all.shape[0]
        history: list[dict[str, float]] = []
        net.train()
        g.train()
        for _ in range(self.epochs):
            o1 = torch.randperm(n, generator=gen).to(x_all.device)
            o2 = torch.randperm(n, generator=gen).to(x_all.device)
            sums = {"loss": 0.0, "ce": 0.0, "div": 0.0}
            hits = {"clean": [0, 0], "backdoor": [0, 0], "cross": [0, 0]}
            batches = 0
            for start in range(0, n, self.batch_size):
                i1, i2 = o1[start : start + self.batch_size], o2[start : start + self.batch_size]
                x1, y1, x2 = x_all[i1], y_all[i1], x_all[i2]
                bs = x1.shape[0]
                nb, nc = int(self.rate * bs), int(self.cross_rate * bs)
                if bs < 2:
                    continue
                # one generator call, so the backdoor and the cross patterns share the BatchNorm batch statistics
                pats = low + (high - low) * g(torch.cat((x1[:nb], x2[: nb + nc])))
                p1, p2 = pats[:nb], pats[nb:]
                with torch.no_grad():
                    m1 = m.threshold(x1[:nb]) if nb else x1[:0, :1]
                    m2 = m.threshold(x2[nb : nb + nc])
                x_bd = _stamp(x1[:nb], p1, m1)
                x_cross = _stamp(x1[nb : nb + nc], p2[nb : nb + nc], m2)
                inputs = torch.cat((x_bd, x_cross, x1[nb + nc :]))
                targets = torch.cat((self._labels(y1[:nb], k), y1[nb:]))
                logits = net(inputs)
                ce = F.cross_entropy(logits, targets)
                if nb:
                    # pairs of distinct inputs: backdoor rows of batch 1 against the same rows of batch 2
                    distinct = i1[:nb] != i2[:nb]
                    ratio = _rms(x1[:nb], x2[:nb]) / (_rms(p1, p2[:nb]) + _EPS)
                    div = ratio[distinct].mean() if bool(distinct.any()) else ratio.sum() * 0
                else:
                    div = ce * 0
                loss = ce + self.lambda_div * div
                opt_c.zero_grad(set_to_none=True)
                opt_g.zero_grad(set_to_none=True)
                loss.backward()
                opt_c.step()
                opt_g.step()
                pred = logits.detach().argmax(1)
                ok = pred == targets
                parts = (("backdoor", slice(0, nb)), ("cross", slice(nb, nb + nc)), ("clean", slice(nb + nc, bs)))
                for key, sl in parts:
                    hits[key][0] += int(ok[sl].sum())
                    hits[key][1] += int(ok[sl].numel())
                sums["loss"] += float(loss.detach())
                sums["ce"] += float(ce.detach())
                sums["div"] += float(div.detach())
                batches += 1
            row = {key: v / max(1, batches) for key, v in sums.items()}
            row.update({key: a / b if b else float("nan") for key, (a, b) in hits.items()})
            history.append(row)
            bar.update(1)
            bar.set_postfix(clean=f"{row['clean']:.3f}", bd=f"{row['backdoor']:.3f}", cross=f"{row['cross']:.3f}")
        g.eval()
        return history
