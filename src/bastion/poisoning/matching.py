"""Gradient matching ("Witches' Brew"): ε-bounded clean-label poisons for victims trained from scratch.

Geiping, Fowl, Huang, Czaja, Taylor, Moeller & Goldstein, "Witches' Brew: Industrial Scale Data Poisoning via
Gradient Matching", ICLR 2021. The attacker wants target images ``x_t`` classified as an adversarial class
``y_adv``. Training on a sample moves the weights along minus its loss gradient, so poisons whose *training*
gradient points the same way as the gradient of the *adversarial* target loss make ordinary training descend the
attacker's loss. With a surrogate network ``F_θ`` (trained on clean data), the poisons ``x_i + δ_i`` — images of
class ``y_adv`` from the training set, keeping their correct labels — minimise, with
``g_t = ∇_θ L(F(x_t), y_adv)`` and ``g_p = ∇_θ L(F(x_i + δ_i), y_i)`` (summed over the poisons),

    1 - ⟨g_t, g_p⟩ / (||g_t|| · ||g_p||)

(one minus the cosine similarity over all parameters), subject to ``||δ_i||_∞ ≤ ε`` and ``x_i + δ_i`` in the input
domain. ``L`` is the mean cross-entropy over the batch of poisons (over the targets for the target term).

Optimiser, as the reference implementation (``forest/witchcoven``): signed Adam — the gradient with respect to
δ is replaced by its sign before each Adam step — with a step-decay schedule ×0.1 at ``M / 2.667``, ``M / 1.6`` and
``M / 1.142`` of ``M = 250`` steps; δ starts from Gaussian noise of standard deviation ε clipped to the ε-ball,
and is projected onto the ball and the domain after every step; ``R`` restarts, keeping the poisons of the
lowest final matching loss. The network is in eval mode throughout.

Defaults and their choices:

* ``eps = 16/255`` — the paper's CIFAR-10 budget, kept for MNIST and the 8×8 digits (whose grey levels are
  multiples of 1/16 ≈ 4/255, so it allows about four grey levels of change per pixel); it is not scaled, as the
  ℓ∞ budget is a per-pixel visibility bound and both data sets live in [0, 1].
* ``rate = 0.01`` — the paper's budget: 1 % of the training set is poisoned (capped by the size of class
  ``y_adv``; at least one poison).
* step size — the reference's rule for Adam variants is ``τ = 0.1`` in its normalised input space (CIFAR-10
  standard deviation ≈ 0.25 per channel), i.e. about ``0.1 · 0.25 ≈ 0.4 ε`` in [0, 1] pixel units at ε = 16/255;
  here ``lr = 0.4 ε`` by default, so the rule scales with the budget.
* ``restarts`` — the paper uses 8; by default 8 when the surrogate is on a CUDA device and 2 on the CPU (each
  restart costs ``M`` double-backward passes over the poisons).
* ``augment`` — the paper crafts through differentiable data augmentation (random flips and crops); here
  optional and off by default: random translations of up to ``H / 8`` pixels (the usual crop-with-padding of 4
  pixels on 32×32), applied through a differentiable bilinear resampling, and horizontal flips only with
  ``flip=True`` (flipping changes the meaning of digits).
* poisons are chosen at random among the training images of class ``y_adv`` (the reference's default), and
  matched in batches of ``batch_size`` = 512 (the reference's ``pbatch``), the δ-gradients of all batches
  accumulated before each step.

The victim is then trained on ``poisoned.data`` from scratch (with bastion's trainer); success is the fraction of
targets it classifies as ``y_adv`` (:func:`~bastion.poisoning.base.poisoning_success`).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from bastion.data import Dataset
from bastion.errors import InputError
from bastion.models.checks import eval_mode, model_device
from bastion.poisoning.base import (
    PoisonAttack,
    PoisonedData,
    check_class,
    check_dataset,
    check_rate,
    check_seed,
    check_target_images,
    choose,
    n_from_rate,
    replace_rows,
)

__all__ = ["GradientMatching", "matching_loss", "random_translate"]


def random_translate(x: Tensor, max_shift: int, generator: torch.Generator, *, flip: bool = False) -> Tensor:
    """Differentiable augmentation: shift each image by up to ``max_shift`` pixels (and flip it at random).

    The shift is an integer number of pixels per image and axis, applied by bilinear resampling with
    ``grid_sample`` (so gradients flow to ``x``), border pixels repeated.

    Args:
        x: images ``(N, C, H, W)``.
        max_shift: the largest shift in pixels.
        generator: a CPU generator for the random shifts.
        flip: also mirror each image left-right with probability 1/2.

    Returns:
        The augmented batch, same shape, device and dtype.
    """
    n, _, h, w = x.shape
    shifts = torch.randint(-max_shift, max_shift + 1, (n, 2), generator=generator).to(x.device, x.dtype)
    theta = torch.zeros(n, 2, 3, device=x.device, dtype=x.dtype)
    theta[:, 0, 0] = 1.0
    theta[:, 1, 1] = 1.0
    if flip:
        signs = torch.where(torch.rand(n, generator=generator) < 0.5, -1.0, 1.0).to(x.device, x.dtype)
        theta[:, 0, 0] = signs
    theta[:, 0, 2] = 2 * shifts[:, 0] / w
    theta[:, 1, 2] = 2 * shifts[:, 1] / h
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def matching_loss(
    model: nn.Module, x: Tensor, y: Tensor, target_grad: list[Tensor], target_norm: Tensor, params: list[nn.Parameter]
) -> Tensor:
    """``1 - cos(∇_θ CE(model(x), y), target_grad)`` over all ``params``, differentiable with respect to ``x``.

    Args:
        model: the surrogate (in eval mode).
        x: poison inputs (requiring grad through δ).
        y: their labels.
        target_grad: the adversarial target gradient, one tensor per parameter.
        target_norm: its Euclidean norm over all parameters.
        params: the parameters the gradients are taken with respect to.

    Returns:
        A scalar tensor in [0, 2].
    """
    loss = F.cross_entropy(model(x), y)
    grads = torch.autograd.grad(loss, params, create_graph=True)
    dot = torch.stack([(g * t).sum() for g, t in zip(grads, target_grad)]).sum()
    norm = torch.stack([g.pow(2).sum() for g in grads]).sum().sqrt()
    return 1 - dot / (norm * target_norm).clamp_min(1e-20)


class GradientMatching(PoisonAttack):
    """Witches' Brew gradient matching (Geiping et al., ICLR 2021).

    Args:
        target: the adversarial class ``y_adv`` the targets should be classified as (and the poisons' class);
            default 0.
        rate: the budget, the fraction of the training set poisoned; default 0.01 (the paper's 1 %).
        eps: the ℓ∞ bound of the perturbations, default 16/255 (the paper's).
        steps: optimisation steps ``M``, default 250 (the paper's).
        restarts: ``R``; default ``None``: 8 (the paper's) with a CUDA surrogate, 2 on the CPU.
        lr: signed-Adam step size; default ``None``: 0.4 ε (the reference's rule, see the module docstring).
        augment: craft through differentiable random translations (default False).
        flip: with ``augment``, also random horizontal flips (default False).
        batch_size: poisons per matching batch (the reference's 512).
        seed: seeds the choice of the poisons, the initial noise and the augmentations.
        progress: show a progress bar over the steps.
    """

    name = "matching"

    def __init__(
        self,
        *,
        target: int = 0,
        rate: float = 0.01,
        eps: float = 16 / 255,
        steps: int = 250,
        restarts: int | None = None,
        lr: float | None = None,
        augment: bool = False,
        flip: bool = False,
        batch_size: int = 512,
        seed: int = 0,
        progress: bool = False,
    ) -> None:
        super().__init__()
        if isinstance(target, bool) or not isinstance(target, int) or target < 0:
            raise InputError(f"target must be a class index (a non-negative int), got {target!r}")
        self.rate = check_rate(rate)
        if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not (math.isfinite(eps) and eps > 0):
            raise InputError(f"eps must be a positive number (the l-inf budget of the poisons), got {eps!r}")
        for value, what in ((steps, "steps"), (batch_size, "batch_size")):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise InputError(f"{what} must be a positive int, got {value!r}")
        if restarts is not None and (isinstance(restarts, bool) or not isinstance(restarts, int) or restarts < 1):
            raise InputError(f"restarts must be a positive int or None, got {restarts!r}")
        if lr is not None and (isinstance(lr, bool) or not isinstance(lr, (int, float)) or not lr > 0):
            raise InputError(f"lr must be a positive number or None, got {lr!r}")
        self.target, self.eps, self.steps, self.restarts = target, float(eps), steps, restarts
        self.lr = float(lr) if lr is not None else 0.4 * float(eps)
        self.augment, self.flip, self.batch_size = bool(augment), bool(flip), batch_size
        self.seed = check_seed(seed)
        self.progress = bool(progress)
        self._params = {
            "target": target, "rate": self.rate, "eps": self.eps, "steps": steps, "restarts": restarts,
            "lr": self.lr, "augment": self.augment, "flip": self.flip, "batch_size": batch_size, "seed": self.seed,
        }  # fmt: skip
        self.last_stats: dict[str, Any] = {}

    def _restarts_for(self, device: torch.device) -> int:
        if self.restarts is not None:
            return self.restarts
        return 8 if device.type == "cuda" else 2

    def _pass(
        self,
        model: nn.Module,
        x: Tensor,
        delta: Tensor,
        y: Tensor,
        tgrad: list[Tensor],
        tnorm: Tensor,
        params: list[nn.Parameter],
        gen: torch.Generator,
        *,
        backward: bool,
    ) -> float:
        """Matching loss over all poison batches (mean); with ``backward``, accumulates its δ-gradient."""
        total, batches = 0.0, 0
        for start in range(0, x.shape[0], self.batch_size):
            sl = slice(start, start + self.batch_size)
            xb = x[sl] + delta[sl]
            if self.augment:
                xb = random_translate(xb, max(1, round(x.shape[-2] / 8)), gen, flip=self.flip)
            loss = matching_loss(model, xb, y[sl], tgrad, tnorm, params)
            if backward:
                (g,) = torch.autograd.grad(loss, delta)
                delta.grad = g if delta.grad is None else delta.grad + g
            total += float(loss.detach())
            batches += 1
        return total / batches

    def __call__(
        self, data: Dataset, model: nn.Module, target_x: Tensor, *, target_y: Tensor | None = None
    ) -> PoisonedData:
        """Brew poisons against the surrogate ``model`` and put them into ``data``.

        Args:
            data: the clean training set.
            model: the surrogate network (trained on clean data), on any device.
            target_x: the target image(s), ``(*shape)`` or ``(T, *shape)``, in the data domain.
            target_y: their true labels, if known (kept for the report; must differ from ``target``).

        Returns:
            The poisoned set (perturbed images of class ``target`` in place, labels unchanged), with the targets.
        """
        data = check_dataset(data)
        if not isinstance(model, nn.Module):
            raise InputError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        target = check_class(self.target, data.num_classes, "target")
        tx = check_target_images(target_x, data, "GradientMatching")
        ty = None
        if target_y is not None:
            ty = torch.as_tensor(target_y).reshape(-1).to(torch.int64).cpu()
            if ty.numel() != tx.shape[0]:
                raise InputError(f"target_y holds {ty.numel()} labels for {tx.shape[0]} target images")
            if bool((ty == target).any()):
                raise InputError(f"a target image is already of the adversarial class {target}; pick other targets")
        members = torch.nonzero(data.y.cpu() == target).reshape(-1)
        if members.numel() == 0:
            raise InputError(f"the training data holds no sample of the adversarial class {target}")
        n = min(n_from_rate(self.rate, len(data)), members.numel())
        gen = torch.Generator().manual_seed(self.seed)
        idx = choose(members, n, gen)
        device = model_device(model)
        params = [p for p in model.parameters() if p.requires_grad]
        if not params:
            raise InputError("the surrogate model has no trainable parameters to match gradients on")
        low, high = data.domain
        x = data.x[idx.to(data.x.device)].to(device)
        y = torch.full((n,), target, dtype=torch.int64, device=device)
        restarts = self._restarts_for(device)
        best_delta, best_score, scores = None, math.inf, []
        with eval_mode(model):
            loss_t = F.cross_entropy(model(tx.to(device)), torch.full((tx.shape[0],), target, device=device))
            tgrad = [g.detach() for g in torch.autograd.grad(loss_t, params)]
            tnorm = torch.stack([g.pow(2).sum() for g in tgrad]).sum().sqrt()
            milestones = [int(self.steps // 2.667), int(self.steps // 1.6), int(self.steps // 1.142)]
            bar = tqdm(total=restarts * self.steps, desc="matching", disable=not self.progress, leave=False)
            for _ in range(restarts):
                noise = torch.randn(x.shape, generator=gen).to(device, x.dtype) * self.eps
                delta = (x + noise.clamp(-self.eps, self.eps)).clamp(low, high) - x
                delta.requires_grad_(True)
                opt = torch.optim.Adam([delta], lr=self.lr)
                sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=milestones, gamma=0.1)
                for _ in range(self.steps):
                    opt.zero_grad(set_to_none=True)
                    self._pass(model, x, delta, y, tgrad, tnorm, params, gen, backward=True)
                    assert delta.grad is not None
                    delta.grad.sign_()
                    opt.step()
                    sched.step()
                    with torch.no_grad():
                        delta.copy_((x + delta.clamp(-self.eps, self.eps)).clamp(low, high) - x)
                    bar.update(1)
                score = self._pass(model, x, delta.detach(), y, tgrad, tnorm, params, gen, backward=False)
                scores.append(score)
                if score < best_score:
                    best_score, best_delta = score, delta.detach().clone()
            bar.close()
        assert best_delta is not None
        poisons = (x + best_delta).clamp(low, high)
        poisoned = replace_rows(data, idx, poisons.cpu(), None, name=f"{data.name} [matching]")
        self.last_stats = {"restart_losses": scores, "best_loss": best_score, "restarts": restarts}
        config = {**self.config(), "restarts": restarts, "restart_losses": scores}
        return PoisonedData(
            data=poisoned, poison_indices=idx, attack=self.name, target=target, config=config, target_x=tx,
            target_y=ty,
        )  # fmt: skip
