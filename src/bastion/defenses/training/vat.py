"""Virtual adversarial training (VAT).

Miyato, Maeda, Koyama & Ishii, "Virtual Adversarial Training: A Regularization Method for Supervised and
Semi-Supervised Learning", IEEE TPAMI 41(8), 2018.

VAT smooths the model's output distribution around every input, labelled or not. The *local distributional
smoothness* (LDS) of an input is

    LDS(x) = KL( p(·|x) || p(·|x + r_adv) ),    r_adv = argmax_{||r||_2 <= eps} KL( p(·|x) || p(·|x + r) ),

with ``p(·|x)`` the model's softmax held fixed (no gradient flows through the clean prediction). The virtual
adversarial direction is the dominant eigenvector of the Hessian ``H`` of the KL at ``r = 0``, approximated by
power iteration (section 3.3): draw ``d ~ N(0, I)``, set ``d <- H d`` and ``r_adv = eps · d / ||d||_2``; the paper
uses one iteration. The paper computes ``H d`` by the finite difference ``grad_r KL(p(x) || p(x + xi·d)) ≈ xi·H d``
with ``xi = 1e-6``. In float32 that difference is dominated by rounding for inputs on the [0, 1] scale (``x + 1e-7``
rounds back to ``x``): on a digits MLP its direction had a mean cosine of 0.50 with the exact ``H d`` (some
negative), against 0.9999 at ``xi = 1e-3``. By default this implementation therefore computes ``H d`` exactly by
double back-propagation, which is the ``xi -> 0`` limit the finite difference approximates; ``exact_hvp=False``
gives the literal finite difference with the given ``xi``. No label enters the regulariser, so it is computed on
the labelled batch and on an unlabelled batch alike (semi-supervised learning).

The training loss is

    L = CE(f(x_labelled), y) + alpha · mean_{x in labelled ∪ unlabelled} LDS(x).

Defaults: ``alpha = 1`` (fixed throughout the paper's experiments) and ``eps = 2.0`` (l2, inputs in [0, 1]). The
paper tunes ``eps`` per data set on validation data; 2.0 is of the order it reports for MNIST, and the right value
scales with the input dimension and range, so set it for your data.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bastion.attacks.base import positive_float, positive_int
from bastion.defenses.training.features import ObjectiveRandomness
from bastion.defenses.training.inner import check_batch, kl_div_logits
from bastion.errors import InputError
from bastion.models.checks import eval_mode

__all__ = ["VAT"]


def _unit_l2(d: Tensor) -> Tensor:
    flat = d.flatten(1)
    # scale by the max first: with xi = 1e-6 the raw gradients can underflow float32 when squared
    flat = flat / flat.abs().amax(dim=1, keepdim=True).clamp_min(1e-30)
    flat = flat / flat.norm(dim=1, keepdim=True).clamp_min(1e-30)
    return flat.reshape(d.shape)


class VAT:
    """Virtual adversarial training (Miyato et al., TPAMI 2018): cross-entropy plus the label-free LDS penalty.

    Args:
        eps: l2 radius of the virtual adversarial perturbation (tuned per data set in the paper; see above).
        xi: finite-difference step of the power iteration (paper: 1e-6), used when ``exact_hvp=False``.
        power_iterations: number of power iterations (paper: 1).
        exact_hvp: compute the Hessian-vector product of the power iteration exactly (double back-propagation)
            instead of by the paper's finite difference at ``xi`` (see the module docstring).
        alpha: weight of the LDS term (paper: 1).
        seed: seeds the random initial directions (reproducible, checkpointed); ``None`` uses the global generator.

    The objective is called as ``vat(model, x, y, unlabelled=u)``; ``unlabelled`` (a batch of inputs without labels,
    or ``None``) only enters the LDS term. ``uses_unlabelled = True`` tells the trainer to pass it.
    """

    uses_unlabelled = True
    paper = "Miyato, Maeda, Koyama & Ishii, Virtual Adversarial Training, IEEE TPAMI 2018"

    def __init__(
        self,
        *,
        eps: float = 2.0,
        xi: float = 1e-6,
        power_iterations: int = 1,
        alpha: float = 1.0,
        exact_hvp: bool = True,
        seed: int | None = None,
    ) -> None:
        self.eps = positive_float("eps", eps)
        self.xi = positive_float("xi", xi)
        self.power_iterations = positive_int("power_iterations", power_iterations)
        self.exact_hvp = bool(exact_hvp)
        self.alpha = positive_float("alpha", alpha, allow_zero=True)
        self._rng = ObjectiveRandomness(seed)

    # ------------------------------------------------------------------------------------------ regulariser
    def virtual_adversarial_perturbation(self, model: nn.Module, x: Tensor, clean_logits: Tensor) -> Tensor:
        """``r_adv`` (shape of ``x``, l2 norm ``eps`` per sample) by power iteration; uses no label.

        Runs in eval mode (batch-norm statistics are neither used from the batch nor updated by the probing
        passes, as the official implementation's ``update_batch_stats=False``); no gradient reaches the model.
        """
        gen = self._rng.generator(x.device)
        d = torch.randn(x.shape, generator=gen, device=x.device, dtype=x.dtype)
        target = clean_logits.detach()
        with eval_mode(model), torch.enable_grad():
            for _ in range(self.power_iterations):
                if self.exact_hvp:
                    # H d = d/dr <grad_r KL(r), d> at r = 0 (the KL's gradient vanishes there, its Hessian does not)
                    r = torch.zeros_like(x, requires_grad=True)
                    (g,) = torch.autograd.grad(kl_div_logits(target, model(x + r)).sum(), r, create_graph=True)
                    (d,) = torch.autograd.grad((g * _unit_l2(d)).sum(), r)
                else:
                    probe = (self.xi * _unit_l2(d)).requires_grad_(True)
                    (d,) = torch.autograd.grad(kl_div_logits(target, model(x + probe)).sum(), probe)
        return self.eps * _unit_l2(d.detach())

    def lds(self, model: nn.Module, x: Tensor) -> Tensor:
        """Mean local distributional smoothness ``KL(p(x) || p(x + r_adv))`` over the batch (a scalar); no labels.

        The gradient flows through ``p(x + r_adv)`` only; the clean prediction is a constant target. The passes at
        ``x`` and ``x + r_adv`` run in the model's current (training) mode, so batch-norm layers normalise and
        record these batches too; the official code freezes the running statistics for the perturbed pass, which
        PyTorch offers no per-call switch for.
        """
        if not isinstance(x, Tensor) or not x.dtype.is_floating_point or x.dim() < 2 or x.shape[0] == 0:
            raise InputError(f"VAT needs a non-empty floating batch of shape (N, ...), got {_describe(x)}")
        with torch.no_grad():
            clean = model(x)
        r_adv = self.virtual_adversarial_perturbation(model, x, clean)
        return kl_div_logits(clean, model(x + r_adv)).mean()

    # ------------------------------------------------------------------------------------------ objective
    def __call__(self, model: nn.Module, x: Tensor, y: Tensor, *, unlabelled: Tensor | None = None) -> Tensor:
        x, y = check_batch(x, y)
        supervised = F.cross_entropy(model(x), y.to(x.device))
        if self.alpha == 0:
            return supervised
        pool = x
        if unlabelled is not None:
            if (
                not isinstance(unlabelled, Tensor)
                or not unlabelled.dtype.is_floating_point
                or unlabelled.shape[1:] != x.shape[1:]
            ):
                raise InputError(
                    "unlabelled must be a floating batch shaped like the labelled inputs "
                    f"(M, {', '.join(map(str, x.shape[1:]))}), "
                    f"got {_describe(unlabelled)}"
                )
            pool = torch.cat([x, unlabelled.to(device=x.device, dtype=x.dtype)])
        return supervised + self.alpha * self.lds(model, pool)

    # ------------------------------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        return self._rng.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._rng.load_state_dict(state)

    def __repr__(self) -> str:
        return (
            f"VAT(eps={self.eps}, xi={self.xi}, power_iterations={self.power_iterations}, alpha={self.alpha}, "
            f"exact_hvp={self.exact_hvp}, seed={self._rng.seed})"
        )


def _describe(t: object) -> str:
    if isinstance(t, Tensor):
        return f"{t.dtype} of shape {tuple(t.shape)}"
    return type(t).__name__
