"""Clean-label feature collision ("Poison Frogs"), for the transfer-learning setting.

Shafahi, Huang, Najibi, Suciu, Studer, Dumitras & Goldstein, "Poison Frogs! Targeted Clean-Label Poisoning Attacks
on Neural Networks", NeurIPS 2018. The attacker wants one target image ``t`` (of some class) classified as the base
class. A poison starts from a base image ``b`` of the base class and keeps its correct label, yet sits on top of the
target in feature space:

    p = argmin_x ||f(x) - f(t)||² + β ||x - b||²

with ``f`` the penultimate-layer features of the (pretrained, frozen) network. When the victim retrains only the
last layer on the poisoned set, the decision boundary moves to put the poison — hence the target — on the base
side ("one-shot kill": a single poison suffices in the paper's InceptionV3 experiment).

The optimiser is the paper's forward-backward splitting (Algorithm 1): a forward (gradient) step on the feature
term ``x̂ = x - λ ∇_x ||f(x) - f(t)||²`` and a backward (proximal) step on the proximity term
``x = (x̂ + λβ b) / (1 + λβ)``, then a clip to the input domain (as the reference code). The step size ``λ`` of
each poison is halved, and the step rejected, whenever the objective goes up (the reference code's rule, on the
current objective rather than on the mean of the last 40); iterations stop at ``max_iters`` or when the relative
change of every poison falls below ``tol``. All poisons are optimised together in one batch.

Hyperparameters, as the paper: ``β = β0 · (dim_f / dim_b)²`` with ``β0 = 0.25``, ``dim_b`` the input dimension
and ``dim_f`` the feature dimension (the paper writes ``β0 · 2048² / dim_b²``, 2048 being InceptionV3's feature
size, and the reference code computes ``β0 · (2048 / dim_b)²``; with a smaller feature layer the ratio keeps the
two terms balanced the same way). (The brief this module was written from states the ratio inverted,
``(dim_b / 2048)²``; the paper and its code put the feature dimension on top.) ``max_iters = 1500`` as the paper's
experiments (``MaxIter=1500`` in ``main_oneShot.py``). **Watermarking** (Section 4.2, for end-to-end training):
the base is first blended with the target, ``b ← γ t + (1 - γ) b`` with opacity γ = 0.3 — off by default
(``watermark=0``), as in the transfer-learning experiment; the watermarked base is both the starting point and the
anchor of the proximity term.

Poisons replace randomly chosen base-class images of the training set in place (the paper adds them to the
training set; replacing a base by its poison differs only by one clean image). Several target images may be given:
the poisons are shared out among them in turn. Victim: :func:`retrain_last_layer` (transfer learning — only the
final linear layer is trained, from the pretrained weights, with bastion's trainer).
"""

from __future__ import annotations

import copy
import math
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from bastion.data import Dataset
from bastion.defenses.training import train
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

__all__ = ["FeatureCollision", "features", "penultimate", "retrain_last_layer"]


def penultimate(model: nn.Module) -> nn.Module:
    """The feature extractor of a ``Sequential`` classifier: every layer but the final ``nn.Linear``.

    Args:
        model: an ``nn.Sequential`` ending with a linear layer (every zoo architecture).

    Returns:
        ``model[:-1]`` (sharing the model's parameters).

    Raises:
        InputError: the model is not such a Sequential; pass ``features=`` to the attack instead.
    """
    if not isinstance(model, nn.Sequential) or len(model) < 2 or not isinstance(model[-1], nn.Linear):
        raise InputError(
            "the feature extractor is taken as every layer of an nn.Sequential but its final nn.Linear; this model "
            "is not such a Sequential: pass features=<module mapping inputs to penultimate features>"
        )
    return model[:-1]


@torch.no_grad()
def features(extractor: nn.Module, x: Tensor, *, batch_size: int = 512) -> Tensor:
    """Features of ``x`` under ``extractor`` (eval mode, batched, on the extractor's device), flattened, on the CPU."""
    device = model_device(extractor)
    out = []
    with eval_mode(extractor):
        for start in range(0, x.shape[0], batch_size):
            out.append(extractor(x[start : start + batch_size].to(device)).flatten(1).cpu())
    return torch.cat(out)


def retrain_last_layer(
    model: nn.Module,
    data: Dataset,
    *,
    epochs: int = 20,
    batch_size: int = 64,
    lr: float = 1e-2,
    reinit: bool = False,
    seed: int = 0,
    progress: bool = False,
) -> nn.Module:
    """Transfer learning: a copy of ``model`` whose final linear layer is retrained on ``data``, the rest frozen.

    The frozen features of ``data`` are computed once; the last layer (from its pretrained weights, or freshly
    initialised with ``reinit=True``: the paper's "warm" and "cold" start) is trained on them with bastion's
    trainer (:func:`bastion.defenses.training.train`, Adam).

    Args:
        model: an ``nn.Sequential`` classifier ending with ``nn.Linear`` (left unchanged).
        data: the (poisoned) training set.
        epochs: passes over the data.
        batch_size: samples per step.
        lr: Adam learning rate.
        reinit: re-initialise the last layer before training.
        seed: seeds the shuffling (and the re-initialisation).
        progress: show a progress bar.

    Returns:
        The retrained copy, in eval mode, on the model's device.
    """
    extractor = penultimate(model)
    if not isinstance(data, Dataset):
        raise InputError(f"data must be a bastion Dataset, got {type(data).__name__}")
    out = copy.deepcopy(model)
    assert isinstance(out, nn.Sequential)
    head = out[-1]
    assert isinstance(head, nn.Linear)
    if reinit:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            head.reset_parameters()
    feats = features(extractor, data.x)
    low, high = float(feats.min()), float(feats.max())
    if high <= low:
        high = low + 1.0
    # The features are the head's inputs; their range stands in for an input domain.
    feature_set = Dataset(feats.to(model_device(model)), data.y, num_classes=data.num_classes,
                          name=f"{data.name} (features)", domain=(low, high))  # fmt: skip
    train(head, feature_set, epochs=epochs, batch_size=batch_size, lr=lr, seed=seed, progress=progress)
    return out.eval()


class FeatureCollision(PoisonAttack):
    """Poison Frogs feature collision (Shafahi et al., NeurIPS 2018) with optional watermarking.

    Args:
        target: the base class — the class the target images should be classified as; default 0.
        n_poisons: number of poisons (default 1: the paper's one-shot kill), unless ``rate`` is given.
        rate: if given, the number of poisons is ``round(rate · N)`` (at least 1).
        beta0: the paper's β0 = 0.25; β = β0 · (dim_f / dim_b)².
        lr: initial forward step size λ (halved on every rejected step), default 1.
        max_iters: forward-backward iterations, default 1500 (the paper's experiments).
        tol: stop when every poison's relative change ``||x_new - x|| / ||x||`` falls below it (default 1e-5).
        watermark: opacity γ of the target blended into the base first (0.3 in the paper's end-to-end
            experiments); default 0 (off, as its transfer-learning experiment).
        seed: seeds the choice of the bases.
        progress: show a progress bar over the iterations.
    """

    name = "collision"

    def __init__(
        self,
        *,
        target: int = 0,
        n_poisons: int = 1,
        rate: float | None = None,
        beta0: float = 0.25,
        lr: float = 1.0,
        max_iters: int = 1500,
        tol: float = 1e-5,
        watermark: float = 0.0,
        seed: int = 0,
        progress: bool = False,
    ) -> None:
        super().__init__()
        if isinstance(target, bool) or not isinstance(target, int) or target < 0:
            raise InputError(f"target must be a class index (a non-negative int), got {target!r}")
        if isinstance(n_poisons, bool) or not isinstance(n_poisons, int) or n_poisons < 1:
            raise InputError(f"n_poisons must be a positive int, got {n_poisons!r}")
        self.rate = None if rate is None else check_rate(rate)
        for value, what in ((beta0, "beta0"), (lr, "lr"), (tol, "tol")):
            if (
                isinstance(value, bool)
                or not isinstance(value, (int, float))
                or not (math.isfinite(value) and value > 0)
            ):
                raise InputError(f"{what} must be a positive number, got {value!r}")
        if isinstance(max_iters, bool) or not isinstance(max_iters, int) or max_iters < 1:
            raise InputError(f"max_iters must be a positive int, got {max_iters!r}")
        if isinstance(watermark, bool) or not isinstance(watermark, (int, float)) or not 0 <= watermark < 1:
            raise InputError(f"watermark must be an opacity in [0, 1), got {watermark!r}")
        self.target, self.n_poisons = target, n_poisons
        self.beta0, self.lr, self.max_iters, self.tol = float(beta0), float(lr), max_iters, float(tol)
        self.watermark = float(watermark)
        self.seed = check_seed(seed)
        self.progress = bool(progress)
        self._params = {
            "target": target, "n_poisons": n_poisons, "rate": self.rate, "beta0": self.beta0, "lr": self.lr,
            "max_iters": max_iters, "tol": self.tol, "watermark": self.watermark, "seed": self.seed,
        }  # fmt: skip
        self.last_stats: dict[str, Any] = {}

    def craft(self, extractor: nn.Module, bases: Tensor, targets: Tensor, domain: tuple[float, float]) -> Tensor:
        """Forward-backward splitting for a batch of (base, target) pairs.

        Args:
            extractor: the frozen feature extractor ``f``.
            bases: base images ``(P, *shape)``.
            targets: the target image of each poison ``(P, *shape)``.
            domain: the input domain to clip to.

        Returns:
            The poisons ``(P, *shape)`` on the extractor's device. ``self.last_stats`` receives the feature
            distances to the targets before and after, β, the iterations run and the final step sizes.
        """
        device = model_device(extractor)
        b = bases.to(device)
        t = targets.to(device)
        if self.watermark > 0:
            b = self.watermark * t + (1 - self.watermark) * b
        low, high = domain
        with torch.no_grad(), eval_mode(extractor):
            ft = extractor(t).flatten(1)
        dim_b = b[0].numel()
        beta = self.beta0 * (ft.shape[1] / dim_b) ** 2
        p = b.shape[0]
        view = (p,) + (1,) * (b.ndim - 1)
        lam = torch.full((p,), self.lr, device=device)

        def feature_loss(x: Tensor) -> Tensor:
            return (extractor(x).flatten(1) - ft).pow(2).sum(dim=1)

        def objective(x: Tensor, feat: Tensor) -> Tensor:
            return feat + beta * (x - b).flatten(1).pow(2).sum(dim=1)

        x = b.clone()
        iters = 0
        with eval_mode(extractor):
            with torch.no_grad():
                start_dist = feature_loss(x).sqrt()
            x.requires_grad_(True)
            floss = feature_loss(x)
            (grad,) = torch.autograd.grad(floss.sum(), x)
            obj = objective(x.detach(), floss.detach())
            x = x.detach()
            for it in tqdm(range(1, self.max_iters + 1), desc="collision", disable=not self.progress, leave=False):
                lv = lam.view(view)
                x_hat = x - lv * grad
                x_new = ((x_hat + lv * beta * b) / (1 + lv * beta)).clamp(low, high)
                x_new.requires_grad_(True)
                floss_new = feature_loss(x_new)
                (grad_new,) = torch.autograd.grad(floss_new.sum(), x_new)
                x_new = x_new.detach()
                obj_new = objective(x_new, floss_new.detach())
                accept = obj_new <= obj
                rel = (x_new - x).flatten(1).norm(dim=1) / x.flatten(1).norm(dim=1).clamp_min(1e-12)
                a = accept.view(view)
                x = torch.where(a, x_new, x)
                grad = torch.where(a, grad_new, grad)
                obj = torch.where(accept, obj_new, obj)
                lam = torch.where(accept, lam, lam * 0.5)
                iters = it
                if bool((accept & (rel < self.tol)).all()) or bool((lam < 1e-12).all()):
                    break
            with torch.no_grad():
                end_dist = feature_loss(x).sqrt()
        self.last_stats = {
            "beta": beta,
            "iterations": iters,
            "feature_distance_start": start_dist.cpu().tolist(),
            "feature_distance_end": end_dist.cpu().tolist(),
            "input_distance_l2": (x - bases.to(device)).flatten(1).norm(dim=1).cpu().tolist(),
            "step_size_end": lam.cpu().tolist(),
        }
        return x.detach()

    def __call__(
        self,
        data: Dataset,
        model: nn.Module,
        target_x: Tensor,
        *,
        target_y: Tensor | None = None,
        features: nn.Module | None = None,
    ) -> PoisonedData:
        """Craft the poisons against ``model``'s features and put them into ``data``.

        Args:
            data: the clean training set.
            model: the pretrained network the victim fine-tunes (its features are attacked).
            target_x: the target image(s), ``(*shape)`` or ``(T, *shape)``, in the data domain, not of class
                ``target``.
            target_y: their true labels, if known (kept for the report).
            features: the feature extractor; by default :func:`penultimate` of ``model``.

        Returns:
            The poisoned set (poisons in place of base-class images, labels unchanged), with the targets.
        """
        data = check_dataset(data)
        if not isinstance(model, nn.Module):
            raise InputError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        target = check_class(self.target, data.num_classes, "target")
        tx = check_target_images(target_x, data, "FeatureCollision")
        extractor = features if features is not None else penultimate(model)
        if not isinstance(extractor, nn.Module):
            raise InputError(f"features must be a torch.nn.Module, got {type(extractor).__name__}")
        if target_y is None:
            ty = None
        else:
            ty = torch.as_tensor(target_y).reshape(-1).to(torch.int64).cpu()
            if ty.numel() != tx.shape[0]:
                raise InputError(f"target_y holds {ty.numel()} labels for {tx.shape[0]} target images")
            if bool((ty == target).any()):
                raise InputError(f"a target image is already of the base class {target}; pick targets of other classes")
        members = torch.nonzero(data.y.cpu() == target).reshape(-1)
        if members.numel() == 0:
            raise InputError(f"the training data holds no sample of the base class {target}")
        n = n_from_rate(self.rate, len(data)) if self.rate is not None else self.n_poisons
        if n > members.numel():
            raise InputError(f"{n} poisons asked for, but the base class {target} has only {members.numel()} samples")
        gen = torch.Generator().manual_seed(self.seed)
        idx = choose(members, n, gen)
        # Poison j collides with target j mod T: the poisons are shared out among the targets in turn.
        owners = torch.arange(n) % tx.shape[0]
        bases = data.x[idx.to(data.x.device)].cpu()
        poisons = self.craft(extractor, bases, tx[owners], data.domain).cpu()
        poisoned = replace_rows(data, idx, poisons, None, name=f"{data.name} [collision]")
        config = {**self.config(), "beta": self.last_stats["beta"], "iterations": self.last_stats["iterations"],
                  "target_of_poison": owners.tolist()}  # fmt: skip
        return PoisonedData(
            data=poisoned, poison_indices=idx, attack=self.name, target=target, config=config, target_x=tx,
            target_y=ty,
        )  # fmt: skip
