"""Adversarial training with shift-consistency regularisation (AT-SCR).

Zhang, Qian, Huang, Wang, Zhang & Yi, "Towards Better Robust Generalization with Shift Consistency
Regularization", ICML 2021.

The paper bounds the robust generalisation gap by the standard gap plus a term measuring how *inconsistently*
adversarial perturbations shift the latent features of same-class examples: when perturbations push the features
of one class in many directions, training and test adversarial features disperse and robustness generalises
poorly. Shift-consistency regularisation steers the shifts of each class towards a common direction. For latent
features ``g`` (here the penultimate features, the input of the final linear layer; see
:func:`~bastion.defenses.training.features.split_model`), the shift of sample ``i`` is
``s_i = g(x'_i) - g(x_i)``, and

    SCR = (1/N) sum_i || s_i - mean_{j : y_j = y_i} s_j ||_2^2,

the within-class dispersion of the shifts in the batch (classes with a single sample in the batch contribute 0).
The training loss is the PGD-AT loss (Madry et al., ICLR 2018) plus the weighted regulariser:

    L = CE(f(x'), y) + lam · SCR,   x' = PGD_{S(x)}(CE).

**Model mode.** The adversarial forward pass (cross-entropy and adversarial features) runs in the mode the trainer
set, train mode, exactly as in PGD-AT, the objective AT-SCR extends: BatchNorm normalises and updates its running
statistics with the adversarial batch alone. The clean features, which only enter the regulariser, are computed in
eval mode (running statistics, no dropout), with gradients: one concatenated train-mode pass over clean and
adversarial inputs, as an earlier version did, would normalise both with statistics of the mixed batch and move the
running averages towards clean inputs that PGD-AT never trains on. On models without BatchNorm or dropout both
choices give the same loss.

Hyperparameters: the inner maximisation is Madry et al.'s CIFAR-10 PGD (random start, 7 steps of eps/4).
The default weight ``lam = 1.0`` is this implementation's choice, not read from the paper (tune it: the SCR term
scales with the squared feature magnitude).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bastion.attacks.base import positive_float, positive_int
from bastion.defenses.training.features import ObjectiveRandomness, features_and_logits, split_model
from bastion.defenses.training.inner import check_batch, check_objective_threat, pgd_perturb
from bastion.models.checks import eval_mode
from bastion.threat import LpBall

__all__ = ["ATSCR", "shift_consistency"]


def shift_consistency(
    clean_features: Tensor, adv_features: Tensor, y: Tensor, num_classes: int | None = None
) -> Tensor:
    """Mean squared deviation of each sample's feature shift from its class's mean shift in the batch (scalar).

    Args:
        clean_features: features of the clean inputs (N, D).
        adv_features: features of the perturbed inputs (N, D).
        y: labels (N,), int64.
        num_classes: number of classes K (labels in [0, K)); read from ``y`` when ``None`` (a host sync on a GPU).

    Returns:
        ``(1/N) sum_i ||s_i - mean_{j: y_j = y_i} s_j||²`` with ``s = adv_features - clean_features``.
    """
    shift = (adv_features - clean_features).flatten(1)
    if num_classes is None:
        num_classes = int(y.max()) + 1 if y.numel() else 1
    # class means of the shifts by a scatter-add: batched, no loop over classes
    sums = shift.new_zeros(num_classes, shift.shape[1]).index_add_(0, y, shift)
    counts = torch.bincount(y, minlength=num_classes).to(shift.dtype).clamp_min(1.0)
    means = sums / counts[:, None]
    return (shift - means[y]).pow(2).sum(dim=1).mean()


class ATSCR:
    """PGD adversarial training plus shift-consistency regularisation (Zhang et al., ICML 2021).

    Args:
        threat: the threat set (e.g. ``LpBall("linf", 8/255)``).
        steps: PGD steps of the inner maximisation (default 7, Madry et al.'s CIFAR-10 training setting; the SCR
            paper's experiments are on CIFAR-10/100 and SVHN).
        step_size: PGD step length; ``None`` means ``eps / 4`` (2/255 at eps = 8/255, Madry et al.'s CIFAR-10 step).
        weight: weight ``lam`` of the SCR term (default 1.0, this implementation's choice).
        head: the model's final ``nn.Linear`` when the model is neither an ``nn.Sequential`` ending in one nor has
            ``features``/``head`` attributes (see :func:`~bastion.defenses.training.features.split_model`).
        seed: seeds the PGD random starts (reproducible, checkpointed); ``None`` uses the global generator.
    """

    paper = "Zhang et al., Towards Better Robust Generalization with Shift Consistency Regularization, ICML 2021"

    def __init__(
        self,
        threat: LpBall,
        *,
        steps: int = 7,
        step_size: float | None = None,
        weight: float = 1.0,
        head: nn.Linear | None = None,
        seed: int | None = None,
    ) -> None:
        self.threat = check_objective_threat(threat, "ATSCR")
        self.steps = positive_int("steps", steps)
        self.step_size = self.threat.eps / 4 if step_size is None else positive_float("step_size", step_size)
        self.weight = positive_float("weight", weight, allow_zero=True)
        self._head = head
        self._split: tuple[nn.Module, nn.Module, nn.Linear] | None = None
        self._rng = ObjectiveRandomness(seed)

    def _body_head(self, model: nn.Module) -> tuple[nn.Module, nn.Linear]:
        if self._split is None or self._split[0] is not model:
            body, head = split_model(model, head=self._head)
            self._split = (model, body, head)
        return self._split[1], self._split[2]

    def __call__(self, model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
        x, y = check_batch(x, y)
        y = y.to(x.device)
        body, head = self._body_head(model)
        x_adv = pgd_perturb(
            model,
            x,
            y,
            self.threat,
            steps=self.steps,
            step_size=self.step_size,
            generator=self._rng.generator(x.device),
        )
        # PGD-AT's pass: adversarial inputs only, in the trainer's (train) mode
        adv_feats, logits = features_and_logits(body, head, x_adv)
        loss = F.cross_entropy(logits, y)
        if self.weight:
            # clean features with the running statistics (module docstring); gradients flow through them too
            with eval_mode(body):
                clean_feats = body(x).flatten(1)
            loss = loss + self.weight * shift_consistency(clean_feats, adv_feats, y, logits.shape[1])
        return loss

    def state_dict(self) -> dict[str, Any]:
        return self._rng.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._rng.load_state_dict(state)

    def __repr__(self) -> str:
        return f"ATSCR({self.threat!r}, steps={self.steps}, step_size={self.step_size}, weight={self.weight})"
