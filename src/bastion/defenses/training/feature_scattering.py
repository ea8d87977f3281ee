"""Feature-scattering adversarial training.

Zhang & Wang, "Defense Against Adversarial Attacks Using Feature Scattering-based Adversarial Training",
NeurIPS 2019.

The perturbation is found without labels and for the batch as a whole: it maximises the optimal-transport distance
between the empirical distribution of the clean batch's features and that of the perturbed batch,

    x' = argmax_{x' in S(x)} OT(mu, nu') ,   mu = (1/n) sum_i delta_{f(x_i)},  nu' = (1/n) sum_j delta_{f(x'_j)},

with the cosine transport cost ``C_ij = 1 - cos(f(x_i), f(x'_j))`` on the logits ``f`` and the entropic
(Sinkhorn) approximation of the transport plan. Moving the perturbed features away from the clean ones *as a
distribution* scatters them, taking the inter-sample structure into account and avoiding label leaking. The
model is then trained with cross-entropy against label-smoothed targets on the perturbed batch:

    L = CE_soft( f(x'), (1 - ls)·onehot(y) + ls/(K - 1)·(1 - onehot(y)) ).

Defaults are the paper's training settings: one ascent step (sign of the gradient for l∞) of size eps from a
uniform random start, eps = 8/255 (CIFAR-10; use 0.3 for MNIST), Sinkhorn regularisation 0.01 with at most 100
iterations, label smoothing 0.5. The gradient of the transport cost with respect to the perturbed features is
taken with the transport plan held fixed (envelope theorem), rather than back-propagated through the Sinkhorn
iterations.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bastion.attacks.base import positive_float, positive_int
from bastion.defenses.training.features import ObjectiveRandomness
from bastion.defenses.training.inner import check_batch, check_objective_threat, pgd_perturb
from bastion.errors import InputError
from bastion.models.checks import eval_mode
from bastion.threat import LpBall

__all__ = ["FeatureScattering", "cosine_cost", "sinkhorn_plan", "smoothed_labels", "soft_cross_entropy"]


def cosine_cost(a: Tensor, b: Tensor) -> Tensor:
    """Transport cost matrix ``C_ij = max(0, 1 - cos(a_i, b_j))`` between two sets of feature vectors (n, m)."""
    an = F.normalize(a.flatten(1), dim=1, eps=1e-6)
    bn = F.normalize(b.flatten(1), dim=1, eps=1e-6)
    return (1.0 - an @ bn.T).clamp_min(0.0)


@torch.no_grad()
def sinkhorn_plan(cost: Tensor, reg: float, iterations: int, tol: float = 1e-3) -> Tensor:
    """Entropic optimal-transport plan between uniform marginals (Cuturi, NeurIPS 2013), log-domain iterations.

    Args:
        cost: cost matrix (n, m).
        reg: entropic regularisation (smaller is closer to exact OT; the log domain keeps small values stable).
        iterations: maximum number of Sinkhorn iterations (each updates both dual potentials).
        tol: stop when the l1 error of the row marginals (total mass 1) falls below this; checked every 5
            iterations (the authors stop on a loose threshold too).

    Returns:
        The plan (n, m), non-negative, rows summing to 1/n and columns to 1/m (up to ``tol``).
    """
    n, m = cost.shape
    log_a = torch.full((n,), -math.log(n), dtype=cost.dtype, device=cost.device)
    log_b = torch.full((m,), -math.log(m), dtype=cost.dtype, device=cost.device)
    f = torch.zeros(n, dtype=cost.dtype, device=cost.device)
    g = torch.zeros(m, dtype=cost.dtype, device=cost.device)
    scaled = -cost / reg
    for i in range(iterations):
        f = reg * (log_a - torch.logsumexp(scaled + g[None, :] / reg, dim=1))
        g = reg * (log_b - torch.logsumexp(scaled + f[:, None] / reg, dim=0))
        # after a g-update the columns are exact; test the rows now and then (a host sync costs on a GPU)
        if (i + 1) % 5 == 0:
            rows = (scaled + (f[:, None] + g[None, :]) / reg).exp().sum(dim=1)
            if float((rows - 1.0 / n).abs().sum()) < tol:
                break
    return (scaled + (f[:, None] + g[None, :]) / reg).exp()


def smoothed_labels(y: Tensor, num_classes: int, smoothing: float) -> Tensor:
    """Targets with ``1 - smoothing`` on the true class and ``smoothing / (K - 1)`` on every other class (N, K).

    Raises:
        InputError: the true class would not get more mass than every other class (e.g. smoothing 0.5 with two
            classes gives uniform targets, from which nothing can be learned).
    """
    if not 1.0 - smoothing > smoothing / (num_classes - 1):
        raise InputError(
            f"label smoothing {smoothing} with {num_classes} classes leaves the true class no more mass than the "
            f"others ({1.0 - smoothing:g} vs {smoothing / (num_classes - 1):g}); use a smoothing below "
            f"{(num_classes - 1) / num_classes:g}"
        )
    one_hot = F.one_hot(y, num_classes).to(torch.get_default_dtype())
    return one_hot * (1.0 - smoothing) + (1.0 - one_hot) * (smoothing / (num_classes - 1))


def soft_cross_entropy(logits: Tensor, targets: Tensor) -> Tensor:
    """Mean cross-entropy of ``logits`` against soft target distributions (N, K)."""
    return -(targets.to(logits.dtype) * F.log_softmax(logits, dim=1)).sum(dim=1).mean()


class FeatureScattering:
    """Feature-scattering adversarial training (Zhang & Wang, NeurIPS 2019).

    Args:
        threat: the threat set of the perturbation (paper: ``LpBall("linf", 8/255)`` on CIFAR-10).
        steps: ascent steps on the transport distance (paper: 1).
        step_size: step length in the threat's norm (paper: eps); ``None`` means eps.
        label_smoothing: smoothing of the training targets (paper: 0.5).
        sinkhorn_reg: entropic regularisation of the transport plan (paper: 0.01).
        sinkhorn_iterations: maximum Sinkhorn iterations (paper: 100).
        random_start: start from a uniform random point of the ball (paper: yes).
        seed: seeds the random starts (reproducible, checkpointed); ``None`` uses the global generator.
    """

    paper = (
        "Zhang & Wang, Defense Against Adversarial Attacks Using Feature Scattering-based Adversarial Training, "
        "NeurIPS 2019"
    )

    def __init__(
        self,
        threat: LpBall,
        *,
        steps: int = 1,
        step_size: float | None = None,
        label_smoothing: float = 0.5,
        sinkhorn_reg: float = 0.01,
        sinkhorn_iterations: int = 100,
        random_start: bool = True,
        seed: int | None = None,
    ) -> None:
        self.threat = check_objective_threat(threat, "FeatureScattering")
        self.steps = positive_int("steps", steps)
        self.step_size = self.threat.eps if step_size is None else positive_float("step_size", step_size)
        if not 0.0 <= float(label_smoothing) < 1.0:
            raise InputError(f"label_smoothing must be in [0, 1), got {label_smoothing!r}")
        self.label_smoothing = float(label_smoothing)
        self.sinkhorn_reg = positive_float("sinkhorn_reg", sinkhorn_reg)
        self.sinkhorn_iterations = positive_int("sinkhorn_iterations", sinkhorn_iterations)
        self.random_start = bool(random_start)
        self._rng = ObjectiveRandomness(seed)

    def transport_cost(self, clean_logits: Tensor, logits: Tensor) -> Tensor:
        """The (entropic) optimal-transport cost between the clean and the perturbed logit distributions (scalar)."""
        cost = cosine_cost(clean_logits, logits)
        plan = sinkhorn_plan(cost.detach(), self.sinkhorn_reg, self.sinkhorn_iterations)
        return (plan * cost).sum()

    def perturb(self, model: nn.Module, x: Tensor) -> Tensor:
        """The feature-scattering perturbation of the batch ``x`` (uses no labels), inside the threat set."""
        with torch.no_grad(), eval_mode(model):
            clean = model(x)
        n = x.shape[0]

        def scattering(logits: Tensor) -> Tensor:
            # The transport cost couples the whole batch; pgd_perturb wants one value per sample, and spreading the
            # scalar evenly keeps its sum (hence the gradient) unchanged.
            return self.transport_cost(clean, logits).expand(n) / n

        dummy = torch.zeros(n, dtype=torch.long, device=x.device)  # pgd_perturb's labels; the loss ignores them
        return pgd_perturb(
            model,
            x,
            dummy,
            self.threat,
            steps=self.steps,
            step_size=self.step_size,
            random_start=self.random_start,
            loss=scattering,
            generator=self._rng.generator(x.device),
        )

    def __call__(self, model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
        x, y = check_batch(x, y)
        y = y.to(x.device)
        x_adv = self.perturb(model, x)
        logits = model(x_adv)
        return soft_cross_entropy(logits, smoothed_labels(y, logits.shape[1], self.label_smoothing))

    def state_dict(self) -> dict[str, Any]:
        return self._rng.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._rng.load_state_dict(state)

    def __repr__(self) -> str:
        return (
            f"FeatureScattering({self.threat!r}, steps={self.steps}, step_size={self.step_size}, "
            f"label_smoothing={self.label_smoothing}, sinkhorn_reg={self.sinkhorn_reg})"
        )
