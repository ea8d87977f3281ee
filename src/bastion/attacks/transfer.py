"""Transfer attacks: adversarial examples crafted on surrogate models to fool another, unseen model.

Three refinements of the iterative FGSM, each meant to make the perturbation less specific to the surrogate it is
computed on, and one configurable attack that combines them (:class:`TransferAttack`):

* **MI-FGSM** (momentum): Dong, Liao, Pang, Su, Zhu, Hu & Li, "Boosting Adversarial Attacks with Momentum",
  CVPR 2018. The gradient, normalised by its l1 norm, is accumulated with decay ``μ`` (``μ = 1``), and each of the
  ``T = 10`` steps of length ``α = ε / T`` follows the accumulated direction:
  ``g ← μ·g + ∇/||∇||_1``, ``x ← proj(x + α·sign(g))`` for l∞ and ``x ← proj(x + α·g/||g||_2)`` for l2.
* **DI** (input diversity): Xie, Zhang, Zhou, Bai, Wang, Ren & Yuille, "Improving Transferability of Adversarial
  Examples with Input Diversity", CVPR 2019. With probability ``p = 0.5`` the gradient of each step is taken at a
  randomly resized and padded copy of the input instead of the input itself.
* **TI** (translation invariance): Dong, Pang, Su & Zhu, "Evading Defenses to Transferable Adversarial Examples by
  Translation-Invariant Attacks", CVPR 2019. The gradient is convolved with a Gaussian kernel (channel by channel)
  before it is normalised, which approximates the gradient over an ensemble of translated images.

Surrogate *ensembles* (Dong et al. 2018, Sec. 3.2: "ensemble in logits") are :class:`Ensemble` modules whose output
is the weighted mean of their members' logits; any attack of bastion can use one as its model.

:func:`transfer_attack` crafts on the surrogate(s) and evaluates on a target model used only through forward calls
(``target(x)`` under ``torch.no_grad`` and ``argmax``), reporting the transfer success rate on the samples the target
classifies correctly, the white-box success on the surrogate, and one :class:`~bastion.results.SampleRecord` per
sample.

The attacks are registered as ``"mi-fgsm"``, ``"di-fgsm"``, ``"ti-fgsm"`` and ``"mi-di-ti-fgsm"``; every one takes
every option, so ``make_attack("mi-fgsm", diversity_prob=0.5)`` is M-DI²-FGSM. As white-box attacks they also run in
:func:`bastion.evaluate.evaluate`'s cascade.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from bastion.attacks.base import Attack, CountingModel, positive_float, positive_int
from bastion.data import validate_arrays
from bastion.errors import InputError
from bastion.models.checks import check_logits, eval_mode, model_device
from bastion.results import Criterion, LossName, SampleRecord, check_loss_name
from bastion.threat import LpBall, ThreatModel

__all__ = [
    "DIFGSM",
    "DIVERSITY_RATIO",
    "MIDITIFGSM",
    "MIFGSM",
    "TIFGSM",
    "Ensemble",
    "TransferAttack",
    "TransferResult",
    "Transferred",
    "default_kernel_size",
    "gaussian_kernel",
    "input_diversity",
    "resize_and_pad",
    "smooth_gradient",
    "transfer_attack",
]

#: Xie et al.'s canvas-to-image ratio: 299-px images resized to [299, 331) px and padded to 331 px.
DIVERSITY_RATIO = 331 / 299
#: Dong et al.'s (CVPR 2019) kernel: 15 pixels on 299-px ImageNet images, spanning ±3 standard deviations.
TI_KERNEL_SIZE = 15
TI_IMAGE_SIZE = 299
TI_NSIG = 3.0


# --------------------------------------------------------------------------------------------------- ensemble
class Ensemble(nn.Module):
    """Several surrogate models seen as one: the output is the weighted mean of their logits.

    Dong et al. (CVPR 2018, Sec. 3.2) compare ensembling in predictions, in losses and in logits and find the logits
    best: ``l(x) = Σ_k w_k l_k(x)`` with ``Σ_k w_k = 1``, and the attack's loss is taken on ``l(x)``. Gradients,
    input diversity and every other attack step see the ensemble as a single model, so a DI transform of an input
    is shared by all members (in Xie et al.'s code each member draws its own).

    Args:
        models: the surrogate models (at least one), all on one device and all returning (N, K) logits with the
            same K.
        weights: non-negative weights, one per model, normalised to sum to 1; ``None`` for the plain mean.
    """

    def __init__(self, models: Sequence[nn.Module], *, weights: Sequence[float] | None = None) -> None:
        super().__init__()
        if isinstance(models, nn.Module) or not isinstance(models, (list, tuple)):
            raise InputError(f"Ensemble takes a list of torch.nn.Module surrogates, got {type(models).__name__}")
        if not models:
            raise InputError("Ensemble needs at least one surrogate model, got an empty list")
        for i, m in enumerate(models):
            if not isinstance(m, nn.Module):
                raise InputError(f"Ensemble member {i} must be a torch.nn.Module, got {type(m).__name__}")
        devices = {str(model_device(m)) for m in models}
        if len(devices) > 1:
            raise InputError(f"Ensemble members are on different devices ({', '.join(sorted(devices))}); move them")
        if weights is None:
            w = [1.0 / len(models)] * len(models)
        else:
            w = [float(v) for v in weights] if isinstance(weights, (list, tuple)) else []
            if len(w) != len(models) or not all(math.isfinite(v) and v >= 0 for v in w) or sum(w) <= 0:
                raise InputError(
                    f"weights must be {len(models)} finite non-negative numbers with a positive sum, got {weights!r}"
                )
            w = [v / sum(w) for v in w]
        self.members = nn.ModuleList(models)
        self.weights = tuple(w)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor | None = None
        for i, (model, w) in enumerate(zip(self.members, self.weights)):
            logits = model(x)
            if out is not None and logits.shape != out.shape:
                raise InputError(
                    f"Ensemble member {i} returns logits of shape {tuple(logits.shape)}, member 0 "
                    f"{tuple(out.shape)}: every surrogate must predict the same classes"
                )
            out = w * logits if out is None else out + w * logits
        assert out is not None
        return out

    def extra_repr(self) -> str:
        return f"weights={self.weights!r}"


# --------------------------------------------------------------------------------------------------- DI
def resize_and_pad(
    x: torch.Tensor, scale: torch.Tensor, top: torch.Tensor, left: torch.Tensor, pad_value: float = 0.0
) -> torch.Tensor:
    """Each image shrunk by its own ``scale`` and placed on a canvas of the original size filled with ``pad_value``.

    The image covers the fraction ``scale`` (in (0, 1]) of the canvas side, starting ``top`` and ``left`` canvas
    sides (fractions in [0, 1 - scale]) from the top-left corner. One bilinear resampling per sample
    (``affine_grid`` and ``grid_sample``, batched, differentiable in ``x``); ``scale = 1`` with zero offsets is the
    identity.

    Args:
        x: images (N, C, H, W).
        scale: per-sample fraction of the canvas side covered by the image (N,).
        top: per-sample offset of the image's top edge, as a fraction of the canvas height (N,).
        left: per-sample offset of the image's left edge, as a fraction of the canvas width (N,).
        pad_value: value of the canvas outside the image.
    """
    if x.dim() != 4:
        raise InputError(f"resize_and_pad needs images (N, C, H, W), got shape {tuple(x.shape)}")
    s = scale.to(x.dtype)
    # normalised output coordinate u in [-1, 1] shows input coordinate v = -1 + (u - a) / s, where a = -1 + 2·offset
    # is where the image's edge lands on the canvas
    ax, ay = -1.0 + 2.0 * left.to(x.dtype), -1.0 + 2.0 * top.to(x.dtype)
    zero = torch.zeros_like(s)
    theta = torch.stack(
        [torch.stack([1 / s, zero, -1 - ax / s], dim=1), torch.stack([zero, 1 / s, -1 - ay / s], dim=1)], dim=1
    )
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    out = F.grid_sample(x - pad_value, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    return out + pad_value


def input_diversity(
    x: torch.Tensor,
    *,
    prob: float,
    resize_ratio: float = DIVERSITY_RATIO,
    generator: torch.Generator | None = None,
    pad_value: float = 0.0,
) -> torch.Tensor:
    """Xie et al.'s (CVPR 2019) random resize-and-pad, one independent draw per sample.

    With probability ``prob`` a sample is transformed, otherwise passed unchanged. A transformed 299-px image is, in
    the paper, resized to ``r`` pixels with ``r`` uniform in [299, 331), then zero-padded at a uniformly random
    position to 331 pixels. Here the image side ``r`` is uniform in ``[H, H·resize_ratio)`` (continuous, so that
    small images still get a range of sizes) and the canvas of side ``H·resize_ratio`` is resampled to the input
    size ``H``, so that models with a fixed input size accept it; the composition is one shrink by
    ``r / (H·resize_ratio)`` placed at a random offset (:func:`resize_and_pad`).

    Deviations from the paper, for fixed-size models: the paper feeds the 331-px canvas to the network (Inception
    accepts any size) and resizes with nearest neighbours; here the canvas is brought back to the input size and the
    single resampling is bilinear. The paper (and its code) draws one transform for the whole batch per step; here
    each sample draws its own, so samples of a batch do not share their randomness.

    Args:
        x: images (N, C, H, W).
        prob: probability of transforming each sample, in [0, 1].
        resize_ratio: canvas side over image side (>= 1; the paper's 331/299).
        generator: random number generator (on ``x``'s device) or ``None`` for PyTorch's global one.
        pad_value: value of the padding (the paper's 0).
    """
    if x.dim() != 4:
        raise InputError(f"input diversity needs images (N, C, H, W), got shape {tuple(x.shape)}")
    if prob <= 0:
        return x
    n = x.shape[0]
    u = torch.rand((n, 4), generator=generator, device=x.device, dtype=x.dtype)
    side = 1.0 + (resize_ratio - 1.0) * u[:, 1]  # image side in units of H, in [1, ratio)
    scale = side / resize_ratio
    diverse = resize_and_pad(x, scale, (1 - scale) * u[:, 2], (1 - scale) * u[:, 3], pad_value)
    chosen = (u[:, 0] < prob).view(-1, 1, 1, 1)
    return torch.where(chosen, diverse, x)


# --------------------------------------------------------------------------------------------------- TI
def default_kernel_size(height: int, width: int) -> int:
    """The TI kernel size scaled to the image: Dong et al.'s 15 px at 299 px, the nearest odd size, at least 3.

    ``15 · min(H, W) / 299`` rounded to the nearest odd integer (11 for 224 px, 15 for 299 px); images under about
    50 px get 3, the smallest kernel that smooths at all (with ±3 standard deviations across 3 pixels its neighbours
    weigh about 1 % of the centre: a light smoothing, as the paper's kernel relative to such small images would be
    lighter still).
    """
    target = TI_KERNEL_SIZE * min(height, width) / TI_IMAGE_SIZE
    odd = 2 * math.floor((target - 1) / 2 + 0.5) + 1
    return max(3, odd)


def gaussian_kernel(size: int, *, nsig: float = TI_NSIG, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The (size, size) Gaussian kernel of Dong et al.'s code: ``size`` points spanning ±``nsig`` deviations, sum 1.

    The paper ties the Gaussian's standard deviation to the kernel's radius; the authors' code, whose kernels
    produced the paper's numbers, samples the density at ``size`` points evenly spaced in ``[-nsig, nsig]`` with
    ``nsig = 3``, i.e. ``σ = (size - 1) / 6`` pixels. The code is followed here.
    """
    if size == 1:
        return torch.ones((1, 1), dtype=dtype)
    t = torch.linspace(-nsig, nsig, size, dtype=torch.float64)
    g = torch.exp(-0.5 * t**2)
    k = torch.outer(g, g)
    return (k / k.sum()).to(dtype)


def smooth_gradient(grad: torch.Tensor, kernel_size: int) -> torch.Tensor:
    """The gradient convolved with the TI Gaussian kernel, each channel separately (depthwise), same-size output.

    Args:
        grad: gradients of images (N, C, H, W).
        kernel_size: odd kernel size; 1 returns ``grad`` unchanged.
    """
    if kernel_size == 1:
        return grad
    if grad.dim() != 4:
        raise InputError(f"translation-invariant smoothing needs images (N, C, H, W), got shape {tuple(grad.shape)}")
    c = grad.shape[1]
    weight = gaussian_kernel(kernel_size, dtype=grad.dtype).to(grad.device).expand(c, 1, kernel_size, kernel_size)
    return F.conv2d(grad, weight, padding=kernel_size // 2, groups=c)


# --------------------------------------------------------------------------------------------------- attacks
def _l1_normalise(grad: torch.Tensor) -> torch.Tensor:
    norm = grad.reshape(grad.shape[0], -1).abs().sum(dim=1).clamp_min(torch.finfo(grad.dtype).tiny)
    return grad / norm.view((-1,) + (1,) * (grad.dim() - 1))


class TransferAttack(Attack):
    """Iterative FGSM with momentum (MI), input diversity (DI) and translation invariance (TI), each optional.

    Each of the ``steps`` iterations computes the gradient of the loss at ``DI(x_t)`` (the input itself when
    ``diversity_prob = 0``), smooths it with the TI kernel (none when ``kernel_size = 1``), and then follows
    Dong et al. (CVPR 2018)::

        g_{t+1} = μ · g_t + W * ∇ / ||W * ∇||_1
        x_{t+1} = proj(x_t + α · direction(g_{t+1}))

    with ``direction`` the threat norm's normalised steepest-ascent step (sign for l∞, unit l2 for l2) and ``proj``
    the projection onto the ball ∩ domain, both the threat model's. ``μ = 0``, ``p = 0``, ``kernel_size = 1`` is the
    basic iterative method with step ``α``. The default step ``α = ε / steps`` travels exactly one radius, as in the
    papers. As in the papers the attack runs all its iterations and returns the last iterate, even where the
    surrogate was fooled earlier: the further steps are what transfer (``early_stop=True`` stops each sample at its
    first iterate adversarial on the surrogate instead, the habit of white-box attacks).

    The defaults are the full combination (TI-DIM in Dong et al. 2019; M-DI²-FGSM with TI): ``μ = 1``, ``p = 0.5``,
    a kernel scaled to the input size (:func:`default_kernel_size`). :class:`MIFGSM`, :class:`DIFGSM`,
    :class:`TIFGSM` and :class:`MIDITIFGSM` are the registered named variants.

    Args:
        steps: iterations ``T`` (10 in the papers).
        momentum: decay factor ``μ`` of the accumulated gradient (>= 0; 1.0 in Dong et al. 2018).
        diversity_prob: probability ``p`` of transforming each sample at each step (in [0, 1]; 0.5 in Xie et al.).
        resize_ratio: DI canvas-to-image ratio (>= 1; the paper's 331/299); see :func:`input_diversity`. The
            padding is 0 (the paper's), or the nearest value of the input domain when 0 lies outside it.
        kernel_size: odd TI kernel size; ``None`` scales the paper's 15 px at 299 px to the input
            (:func:`default_kernel_size`); 1 switches TI off.
        rel_stepsize: step ``α`` as a fraction of eps; ``None`` for ``1 / steps``.
        loss: ``"ce"`` (the papers'), ``"dlr"`` or ``"cw"``.
        early_stop: stop each sample at its first iterate adversarial on the surrogate.
    """

    norms = ("linf", "l2")
    # white-box on the surrogate it is run on; listed as transfer attacks (crafted to be evaluated elsewhere)
    access = "transfer"
    paper = (
        "Dong et al., Boosting Adversarial Attacks with Momentum, CVPR 2018; Xie et al., Improving Transferability "
        "of Adversarial Examples with Input Diversity, CVPR 2019; Dong et al., Evading Defenses to Transferable "
        "Adversarial Examples by Translation-Invariant Attacks, CVPR 2019"
    )

    def __init__(
        self,
        *,
        steps: int = 10,
        momentum: float = 1.0,
        diversity_prob: float = 0.5,
        resize_ratio: float = DIVERSITY_RATIO,
        kernel_size: int | None = None,
        rel_stepsize: float | None = None,
        loss: LossName = "ce",
        early_stop: bool = False,
    ) -> None:
        self.steps = positive_int("steps", steps)
        self.momentum = positive_float("momentum", momentum, allow_zero=True)
        prob = positive_float("diversity_prob", diversity_prob, allow_zero=True)
        if prob > 1:
            raise InputError(f"diversity_prob must be a probability in [0, 1], got {diversity_prob!r}")
        self.diversity_prob = prob
        ratio = positive_float("resize_ratio", resize_ratio)
        if ratio < 1:
            raise InputError(f"resize_ratio (canvas side over image side) must be >= 1, got {resize_ratio!r}")
        self.resize_ratio = ratio
        if kernel_size is not None:
            kernel_size = positive_int("kernel_size", kernel_size)
            if kernel_size % 2 == 0:
                raise InputError(f"kernel_size must be odd (a centred kernel), got {kernel_size}")
        self.kernel_size = kernel_size
        self.rel_stepsize = None if rel_stepsize is None else positive_float("rel_stepsize", rel_stepsize)
        self.loss: LossName = check_loss_name(loss)
        if not isinstance(early_stop, bool):
            raise InputError(f"early_stop must be True or False, got {early_stop!r}")
        self.early_stop = early_stop

    # ----------------------------------------------------------------------------------------------- helpers
    @property
    def uses_images(self) -> bool:
        """Whether DI or TI is on (both need image batches (N, C, H, W))."""
        return self.diversity_prob > 0 or self.kernel_size != 1

    def check_inputs(self, x: torch.Tensor) -> None:
        if self.uses_images and x.dim() != 4:
            raise InputError(
                f"{type(self).__name__}: input diversity and translation-invariant smoothing need image batches "
                f"(N, C, H, W), got shape {tuple(x.shape)}; use diversity_prob=0 and kernel_size=1 for other inputs"
            )

    def kernel_for(self, x: torch.Tensor) -> int:
        """The TI kernel size used on the images ``x`` (the given one, or the default scaled to their size)."""
        if self.kernel_size is not None:
            return self.kernel_size
        return default_kernel_size(x.shape[-2], x.shape[-1])

    def step_size(self, threat: LpBall) -> float:
        """The step ``α`` for this threat model."""
        return (1.0 / self.steps if self.rel_stepsize is None else self.rel_stepsize) * threat.eps

    def _gradient(
        self,
        model: CountingModel,
        x: torch.Tensor,
        crit: Criterion,
        threat: LpBall,
        generator: torch.Generator | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits at the (possibly transformed) input and the loss gradient with respect to ``x``."""

        def loss_fn(logits: torch.Tensor) -> torch.Tensor:
            return crit.loss(logits, self.loss)

        if self.diversity_prob == 0:
            logits, _, grad = model.logits_and_grad(x, loss_fn)
            return logits, grad
        # the transform is part of the differentiated function: the gradient reaches x through it
        pad = min(max(0.0, threat.domain[0]), threat.domain[1])
        x = x.detach().requires_grad_(True)
        with torch.enable_grad():
            z = input_diversity(
                x, prob=self.diversity_prob, resize_ratio=self.resize_ratio, generator=generator, pad_value=pad
            )
            logits = model.model(z)
            (grad,) = torch.autograd.grad(loss_fn(logits).sum(), x)
        model.forwards += x.shape[0]
        model.gradients += x.shape[0]
        return logits.detach(), grad

    # ----------------------------------------------------------------------------------------------- attack
    def run(
        self,
        model: CountingModel,
        x: torch.Tensor,
        criterion: Criterion,
        threat: ThreatModel,
        generator: torch.Generator | None,
    ) -> torch.Tensor:
        if not isinstance(threat, LpBall) or math.isinf(threat.eps):
            raise InputError(f"{type(self).__name__} needs an LpBall threat model with a finite eps, got {threat!r}")
        alpha = self.step_size(threat)
        kernel = self.kernel_for(x) if self.uses_images else 1
        out = x.clone()
        idx = torch.arange(x.shape[0], device=x.device)
        x0, x_adv, crit = x, x.clone(), criterion
        g = torch.zeros_like(x)
        for _ in range(self.steps):
            logits, grad = self._gradient(model, x_adv, crit, threat, generator)
            if self.early_stop:
                # under DI the logits were taken at a transformed input: the check needs the iterate's own
                hit = crit.is_adversarial(model(x_adv) if self.diversity_prob > 0 else logits)
                if bool(hit.any()):
                    out[idx[hit]] = x_adv[hit]
                    keep = ~hit
                    idx, x0, x_adv, g, grad = idx[keep], x0[keep], x_adv[keep], g[keep], grad[keep]
                    crit = crit.subset(keep)
                    if idx.numel() == 0:
                        return out
            g = self.momentum * g + _l1_normalise(smooth_gradient(grad, kernel))
            x_adv = threat.project(threat.step(x_adv, g, alpha), x0)
        out[idx] = x_adv
        return out


class MIFGSM(TransferAttack):
    """MI-FGSM (Dong, Liao, Pang, Su, Zhu, Hu & Li, CVPR 2018): momentum ``μ = 1``, no DI, no TI.

    Args: as :class:`TransferAttack`, with ``diversity_prob = 0`` and ``kernel_size = 1`` by default.
    """

    name = "mi-fgsm"
    paper = "Dong, Liao, Pang, Su, Zhu, Hu & Li, Boosting Adversarial Attacks with Momentum, CVPR 2018"

    def __init__(
        self,
        *,
        steps: int = 10,
        momentum: float = 1.0,
        diversity_prob: float = 0.0,
        resize_ratio: float = DIVERSITY_RATIO,
        kernel_size: int | None = 1,
        rel_stepsize: float | None = None,
        loss: LossName = "ce",
        early_stop: bool = False,
    ) -> None:
        super().__init__(
            steps=steps, momentum=momentum, diversity_prob=diversity_prob, resize_ratio=resize_ratio,
            kernel_size=kernel_size, rel_stepsize=rel_stepsize, loss=loss, early_stop=early_stop,
        )  # fmt: skip


class DIFGSM(TransferAttack):
    """DI²-FGSM (Xie, Zhang, Zhou, Bai, Wang, Ren & Yuille, CVPR 2019): input diversity ``p = 0.5``, no momentum.

    Args: as :class:`TransferAttack`, with ``momentum = 0`` and ``kernel_size = 1`` by default (``momentum=1`` is
    the paper's M-DI²-FGSM).
    """

    name = "di-fgsm"
    paper = (
        "Xie, Zhang, Zhou, Bai, Wang, Ren & Yuille, Improving Transferability of Adversarial Examples with Input "
        "Diversity, CVPR 2019"
    )

    def __init__(
        self,
        *,
        steps: int = 10,
        momentum: float = 0.0,
        diversity_prob: float = 0.5,
        resize_ratio: float = DIVERSITY_RATIO,
        kernel_size: int | None = 1,
        rel_stepsize: float | None = None,
        loss: LossName = "ce",
        early_stop: bool = False,
    ) -> None:
        super().__init__(
            steps=steps, momentum=momentum, diversity_prob=diversity_prob, resize_ratio=resize_ratio,
            kernel_size=kernel_size, rel_stepsize=rel_stepsize, loss=loss, early_stop=early_stop,
        )  # fmt: skip


class TIFGSM(TransferAttack):
    """Translation-invariant iterative FGSM (Dong, Pang, Su & Zhu, CVPR 2019): Gaussian-smoothed gradients.

    The paper's TI-FGSM is the one-step attack (``steps=1``, then ``α = ε``); the default here is its iterative
    version (the paper's TI-BIM), 10 steps, as the other named transfer attacks.

    Args: as :class:`TransferAttack`, with ``momentum = 0`` and ``diversity_prob = 0`` by default and the kernel
    scaled to the input size.
    """

    name = "ti-fgsm"
    paper = (
        "Dong, Pang, Su & Zhu, Evading Defenses to Transferable Adversarial Examples by Translation-Invariant "
        "Attacks, CVPR 2019"
    )

    def __init__(
        self,
        *,
        steps: int = 10,
        momentum: float = 0.0,
        diversity_prob: float = 0.0,
        resize_ratio: float = DIVERSITY_RATIO,
        kernel_size: int | None = None,
        rel_stepsize: float | None = None,
        loss: LossName = "ce",
        early_stop: bool = False,
    ) -> None:
        super().__init__(
            steps=steps, momentum=momentum, diversity_prob=diversity_prob, resize_ratio=resize_ratio,
            kernel_size=kernel_size, rel_stepsize=rel_stepsize, loss=loss, early_stop=early_stop,
        )  # fmt: skip


class MIDITIFGSM(TransferAttack):
    """Momentum, input diversity and translation invariance together (TI-DIM of Dong et al., CVPR 2019).

    Args: as :class:`TransferAttack` (whose defaults these are).
    """

    name = "mi-di-ti-fgsm"


# --------------------------------------------------------------------------------------------------- on a target
class Transferred(Attack):
    """A white-box (or transfer) attack crafted on surrogate models and judged on the target it is called with.

    This is how a transfer attack enters a cascade of :func:`bastion.evaluate` on a model that gives no gradients
    (a :class:`~bastion.models.oracle.BlackBox`): ``run`` never touches the target, the inner attack runs on
    ``surrogate``, and the shared base projects its output onto the threat set and re-verifies it on the target (one
    label query per changed sample, after the clean one). It reads only labels of the target.

    Args:
        attack: a fixed-eps white-box or transfer attack (e.g. :class:`MIFGSM`), or its registry name.
        surrogate: the surrogate model, or a list of them (an :class:`Ensemble` of their logits).
    """

    name = ""  # needs a surrogate object: built in code or by `bastion evaluate --surrogate`, not by name
    norms = ("linf", "l2", "l1")
    access = "label"
    budgeted = True

    def __init__(self, attack: Attack | str, surrogate: nn.Module | Sequence[nn.Module]) -> None:
        if isinstance(attack, str):
            from bastion.attacks import make_attack  # the package imports this module: import at call time

            attack = make_attack(attack)
        if not isinstance(attack, Attack) or attack.minimal or attack.access not in ("white-box", "transfer"):
            raise InputError(f"Transferred takes a fixed-eps white-box or transfer attack, got {attack!r}")
        if isinstance(surrogate, (list, tuple)):
            surrogate = surrogate[0] if len(surrogate) == 1 else Ensemble(list(surrogate))
        if not isinstance(surrogate, nn.Module):
            raise InputError(f"surrogate must be a torch.nn.Module or a list of them, got {type(surrogate).__name__}")
        self.attack = attack
        self.surrogate = surrogate

    def _check_threat(self, threat: ThreatModel) -> None:
        self.attack._check_threat(threat)  # the inner attack's norms are the ones that count

    def options(self) -> dict[str, Any]:
        return {"attack": self.attack, "surrogate": type(self.surrogate).__name__}

    def run(
        self,
        model: CountingModel,
        x: torch.Tensor,
        criterion: Criterion,
        threat: ThreatModel,
        generator: torch.Generator | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        ledger = model.ledger()  # nothing is charged here: the base's re-verification is the only target query
        seed = None if generator is None else int(torch.randint(0, 2**31 - 1, (1,), generator=generator))
        dev = model_device(self.surrogate)
        res = self.attack(
            self.surrogate, x.to(dev), criterion.labels.to(dev), threat=threat,
            targets=None if criterion.targets is None else criterion.targets.to(dev), seed=seed,
        )  # fmt: skip
        return res.x_adv.to(x), ledger.used


# --------------------------------------------------------------------------------------------------- evaluation
@dataclass
class TransferResult:
    """Adversarial examples crafted on surrogate models and their effect on a target model.

    Attributes:
        x_adv: the adversarial inputs (N, ...), inside the threat set (on the surrogate's device).
        labels: true labels (N,).
        targets: target classes (N,) of a targeted attack, or ``None``.
        target_clean_pred: the target's predictions on the clean inputs.
        target_adv_pred: the target's predictions on ``x_adv``.
        surrogate_clean_pred: the surrogate's (ensemble's) predictions on the clean inputs.
        surrogate_adv_pred: the surrogate's predictions on ``x_adv``.
        transfer_success: the target classifies the clean input correctly and ``x_adv`` meets the criterion on it
            (misclassified, or the target class for a targeted attack).
        surrogate_success: ``x_adv`` meets the criterion on the surrogate (white-box success).
        distance: distance of ``x_adv`` from ``x`` in the threat's norm.
        attack: the records' attack name, ``"transfer:<name>"``.
        attack_repr: repr of the attack.
        threat: key of the threat model.
        seconds: wall time.
        records: one :class:`~bastion.results.SampleRecord` per sample, for the target.
    """

    x_adv: torch.Tensor
    labels: torch.Tensor
    targets: torch.Tensor | None
    target_clean_pred: torch.Tensor
    target_adv_pred: torch.Tensor
    surrogate_clean_pred: torch.Tensor
    surrogate_adv_pred: torch.Tensor
    transfer_success: torch.Tensor
    surrogate_success: torch.Tensor
    distance: torch.Tensor
    attack: str
    attack_repr: str
    threat: str
    seconds: float = 0.0
    records: list[SampleRecord] = field(default_factory=list, repr=False)

    @property
    def n(self) -> int:
        return int(self.labels.shape[0])

    @property
    def target_correct(self) -> torch.Tensor:
        """Samples the target classifies correctly without attack: the ones the transfer rate is measured on."""
        return self.target_clean_pred == self.labels

    @property
    def surrogate_correct(self) -> torch.Tensor:
        """Samples the surrogate classifies correctly without attack."""
        return self.surrogate_clean_pred == self.labels

    @property
    def transfer_rate(self) -> float:
        """Fraction of the samples the target classifies correctly that the adversarial examples fool."""
        ok = self.target_correct
        return float(self.transfer_success[ok].float().mean()) if bool(ok.any()) else 0.0

    @property
    def whitebox_rate(self) -> float:
        """Fraction of the samples the surrogate classifies correctly that fool the surrogate (white-box success)."""
        ok = self.surrogate_correct
        return float(self.surrogate_success[ok].float().mean()) if bool(ok.any()) else 0.0

    def to_dict(self) -> dict[str, Any]:
        """JSON-able summary (without tensors or records)."""
        return {
            "n": self.n,
            "attack": self.attack,
            "attack_repr": self.attack_repr,
            "threat": self.threat,
            "targeted": self.targets is not None,
            "target_clean_accuracy": float(self.target_correct.float().mean()) if self.n else 0.0,
            "surrogate_clean_accuracy": float(self.surrogate_correct.float().mean()) if self.n else 0.0,
            "n_target_correct": int(self.target_correct.sum()),
            "n_transferred": int(self.transfer_success.sum()),
            "transfer_rate": self.transfer_rate,
            "whitebox_rate": self.whitebox_rate,
            "seconds": self.seconds,
        }

    def table(self) -> str:
        """A short plain-text summary."""
        d = self.to_dict()
        rows = [
            ("attack", f"{d['attack']} ({'targeted' if d['targeted'] else 'untargeted'})"),
            ("threat", d["threat"]),
            ("samples", str(d["n"])),
            ("surrogate clean accuracy", f"{100 * d['surrogate_clean_accuracy']:.2f}%"),
            ("white-box success (surrogate)", f"{100 * d['whitebox_rate']:.2f}%"),
            ("target clean accuracy", f"{100 * d['target_clean_accuracy']:.2f}%"),
            (
                "transfer success (target)",
                f"{100 * d['transfer_rate']:.2f}% ({d['n_transferred']} of {d['n_target_correct']})",
            ),
        ]
        width = max(len(k) for k, _ in rows)
        return "\n".join(f"{k.ljust(width)}  {v}" for k, v in rows)


def _forward(model: nn.Module, x: torch.Tensor, what: str) -> torch.Tensor:
    """``model(x)`` without gradients, its output checked; a failure inside the model becomes an InputError."""
    try:
        with torch.no_grad():
            out = model(x)
    except (RuntimeError, ValueError, TypeError) as exc:
        if isinstance(exc, InputError):
            raise
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise InputError(f"the {what} failed on inputs of shape {tuple(x.shape)}: {first}") from None
    check_logits(out, x.shape[0], where=f"{what} output")
    return out


def transfer_attack(
    surrogate: nn.Module | Sequence[nn.Module],
    target: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    attack: Attack | str = "mi-fgsm",
    threat: ThreatModel,
    targets: torch.Tensor | None = None,
    batch_size: int = 256,
    seed: int | None = 0,
    progress: bool = False,
) -> TransferResult:
    """Craft adversarial examples on ``surrogate`` and measure how many fool ``target``.

    Every sample is attacked on the surrogate, including those the surrogate (or the target) already misclassifies:
    the transfer attack does not know the target. The target is used only through forward passes (``target(x)``
    under ``torch.no_grad``, then ``argmax``), so it may be any model or a black-box view of one.

    Args:
        surrogate: a surrogate model, or a list of them (attacked as an :class:`Ensemble`, the mean of their
            logits).
        target: the model the examples should fool (any ``nn.Module`` returning (N, K) logits with the surrogate's
            K), put in eval mode for the evaluation.
        x: clean inputs (N, ...), inside ``threat.domain``.
        y: true labels (N,).
        attack: a white-box, fixed-eps :class:`~bastion.attacks.base.Attack` (a :class:`TransferAttack` or any
            other, e.g. PGD) or a registry name with its defaults (``"mi-fgsm"``, ``"mi-di-ti-fgsm"``, ...).
        threat: an :class:`~bastion.threat.LpBall` with a finite eps.
        targets: target classes (N,) for a targeted attack, or ``None``.
        batch_size: samples crafted per batch.
        seed: seed of the attack's random numbers (DI draws); each batch derives its own from it and its first
            index. ``None`` draws from PyTorch's global generator.
        progress: show a tqdm progress bar over the batches.

    Returns:
        A :class:`TransferResult`: transfer success on the samples the target classifies correctly, white-box
        success on the surrogate, and one record per sample (status ``falsified`` where the target is fooled, with
        attack ``"transfer:<name>"``, or misclassifies the clean input, with attack ``"clean"``; ``unknown``
        otherwise; ``queries`` counts the target's two forward passes).

    Raises:
        InputError: no surrogate, a surrogate or target that is not a module, an unknown attack name, an attack
            that is not a white-box fixed-eps attack, a threat that is not a finite l_p ball, inputs or labels of
            the wrong shape or range, models that disagree on the number of classes or fail on the inputs.
    """
    start = time.perf_counter()
    if isinstance(surrogate, (list, tuple)):
        if not surrogate:
            raise InputError("transfer_attack needs at least one surrogate model, got an empty list")
        surrogate = surrogate[0] if len(surrogate) == 1 else Ensemble(list(surrogate))
    if not isinstance(surrogate, nn.Module):
        raise InputError(f"surrogate must be a torch.nn.Module or a list of them, got {type(surrogate).__name__}")
    if not isinstance(target, nn.Module):
        raise InputError(f"target must be a torch.nn.Module, got {type(target).__name__}")
    if isinstance(attack, str):
        from bastion.attacks import make_attack  # the package imports this module: import at call time

        attack = make_attack(attack)
    if not isinstance(attack, Attack):
        raise InputError(f"attack must be an Attack or a registered attack name, got {type(attack).__name__}")
    if attack.minimal or attack.access not in ("white-box", "transfer"):
        raise InputError(
            f"transfer_attack crafts with white-box fixed-eps attacks; {type(attack).__name__} is "
            f"{'minimal-distortion' if attack.minimal else attack.access}"
        )
    if not isinstance(threat, LpBall) or math.isinf(threat.eps):
        raise InputError(f"threat must be an LpBall with a finite eps, e.g. LpBall('linf', 0.1), got {threat!r}")
    attack._check_threat(threat)
    bs = positive_int("batch_size", batch_size)
    x_t, y_t, _ = validate_arrays(x, y, domain=threat.domain, source="x/y given to transfer_attack")
    if torch.is_tensor(x) and x.is_floating_point():
        x_t = x.detach()  # validated; keep the caller's precision
    if x_t.shape[0] == 0:
        raise InputError("transfer_attack got no samples (x has length 0)")
    attack.check_inputs(x_t)
    t_t = None if targets is None else Attack._check_targets(targets, y_t)
    s_dev, t_dev = model_device(surrogate), model_device(target)
    name = f"transfer:{attack.name or type(attack).__name__.lower()}"

    n = x_t.shape[0]
    x_adv = torch.empty_like(x_t, device=s_dev)
    preds = {k: torch.empty(n, dtype=torch.long, device=s_dev) for k in ("tc", "ta", "sc", "sa")}
    num_classes: int | None = None
    batch_seconds: list[tuple[int, int, float]] = []
    with eval_mode(surrogate), eval_mode(target):
        starts = range(0, n, bs)
        for lo in tqdm(starts, desc=name, disable=not progress, leave=False):
            t0 = time.perf_counter()
            hi = min(lo + bs, n)
            xb, yb = x_t[lo:hi].to(s_dev), y_t[lo:hi].to(s_dev)
            tb = None if t_t is None else t_t[lo:hi].to(s_dev)
            s_clean = _forward(surrogate, xb, "surrogate")
            t_clean = _forward(target, xb.to(t_dev), "target")
            if num_classes is None:
                num_classes = s_clean.shape[1]
                if t_clean.shape[1] != num_classes:
                    raise InputError(
                        f"the surrogate returns {num_classes} logits but the target {t_clean.shape[1]}: "
                        "they must predict the same classes"
                    )
                if int(y_t.max()) >= num_classes or (t_t is not None and int(t_t.max()) >= num_classes):
                    raise InputError(f"labels or targets go beyond the {num_classes} classes of the models")
            generator = None
            if seed is not None:
                generator = torch.Generator(device=s_dev)
                generator.manual_seed(int(seed) * 1_000_003 + lo)
            out = attack.run(CountingModel(surrogate), xb, Criterion(yb, tb), threat, generator)
            if isinstance(out, tuple):
                out = out[0]
            adv = threat.project(out.to(xb.dtype), xb)  # never trust the attack's output: project it
            x_adv[lo:hi] = adv
            preds["sc"][lo:hi] = s_clean.argmax(dim=1)
            preds["tc"][lo:hi] = t_clean.argmax(dim=1).to(s_dev)
            preds["sa"][lo:hi] = _forward(surrogate, adv, "surrogate").argmax(dim=1)
            preds["ta"][lo:hi] = _forward(target, adv.to(t_dev), "target").argmax(dim=1).to(s_dev)
            batch_seconds.append((lo, hi, time.perf_counter() - t0))

    labels = y_t.to(s_dev)
    tgt = None if t_t is None else t_t.to(s_dev)

    def fooled(pred: torch.Tensor) -> torch.Tensor:
        return pred == tgt if tgt is not None else pred != labels

    transfer = (preds["tc"] == labels) & fooled(preds["ta"])
    distance = threat.distance(x_adv, x_t.to(s_dev))
    result = TransferResult(
        x_adv=x_adv, labels=labels, targets=tgt, target_clean_pred=preds["tc"], target_adv_pred=preds["ta"],
        surrogate_clean_pred=preds["sc"], surrogate_adv_pred=preds["sa"], transfer_success=transfer,
        surrogate_success=fooled(preds["sa"]), distance=distance, attack=name, attack_repr=repr(attack),
        threat=threat.key,
    )  # fmt: skip
    result.records = _records(result, batch_seconds)
    result.seconds = time.perf_counter() - start
    return result


def _records(res: TransferResult, batch_seconds: list[tuple[int, int, float]]) -> list[SampleRecord]:
    """One record per sample for the target model (its clean prediction, its status under the transferred input)."""
    share = [0.0] * res.n
    for lo, hi, sec in batch_seconds:
        for i in range(lo, hi):
            share[i] = sec / (hi - lo)
    cols = {
        "label": res.labels.tolist(),
        "tc": res.target_clean_pred.tolist(),
        "ta": res.target_adv_pred.tolist(),
        "sc": res.surrogate_clean_pred.tolist(),
        "sa": res.surrogate_adv_pred.tolist(),
        "ok": res.transfer_success.tolist(),
        "sok": res.surrogate_success.tolist(),
        "d": res.distance.tolist(),
    }
    tg = None if res.targets is None else res.targets.tolist()
    records = []
    for i in range(res.n):
        wrong = cols["tc"][i] != cols["label"][i]
        hit = bool(cols["ok"][i])
        extra: dict[str, Any] = {
            "surrogate_clean_pred": cols["sc"][i],
            "surrogate_adv_pred": cols["sa"][i],
            "surrogate_success": bool(cols["sok"][i]),
            "target_adv_pred": cols["ta"][i],
        }
        if tg is not None:
            extra["target"] = tg[i]
        records.append(
            SampleRecord(
                index=i, threat=res.threat, label=cols["label"][i], clean_pred=cols["tc"][i],
                status="falsified" if wrong or hit else "unknown",
                adv_distance=0.0 if wrong else (float(cols["d"][i]) if hit else None),
                attack="clean" if wrong else (res.attack if hit else None),  # "clean": evaluate's convention
                seconds=share[i], queries=2, extra=extra,
            )
        )  # fmt: skip
    return records
