"""Adversarial training with latent distribution (ATLD): latent-manifold adversarial examples.

Qian, Zhang, Huang, Wang, Zhang & Yi, "Improving Model Robustness with Latent Distribution Locally and Globally",
arXiv:2107.04401, 2021 (code: github.com/LitterQ/ATLD-pytorch).

ATLD sets up a game between the classifier ``f`` and a small discriminator ``D`` on the classifier's latent
features (its logits, as in the authors' code). ``D`` has two outputs: a natural-vs-perturbed score ``D_s`` and
``K`` class logits ``D_c``.

* **Discriminator** (its own optimiser, ``d_steps`` updates per batch): learns to tell the latent features of
  natural inputs from those of perturbed inputs and to classify both,

      L_D = BCE(D_s(f(x)), 1) + BCE(D_s(f(x')), 0) + CE_ls(D_c(f(x)), y) + CE_ls(D_c(f(x'))), y).

* **Latent manifold adversarial examples (LMAEs)** are crafted without labels: from a uniform random start,
  ``steps`` signed-gradient steps of size ``step_size`` that *decrease* the discriminator's natural-vs-perturbed
  loss ``BCE(D_s(f(x)), 1) + BCE(D_s(f(x')), 0)`` in ``x'``, i.e. that increase the divergence between the natural
  and the perturbed latent distributions as the discriminator estimates it (the optimal discriminator's loss is
  ``2 log 2 - 2 JS``). The perturbation thus uses the global information of the latent manifold that the
  discriminator has learned, not only the local loss surface of each sample.
* **Classifier**: classifies the LMAEs with label-smoothed cross-entropy and pulls their latent features back to
  the natural ones, which closes the divergence the discriminator exposed:

      L_f = CE_ls(f(x'), y) + (s / 2) · MSE(f(x'), f(x)),   s = max|grad_x' CE_ls| / max|grad_x' MSE|,

  where the natural features ``f(x)`` are a constant target and ``s`` (no gradient) balances the two terms by
  their input-gradient magnitudes, as in the authors' code.

What this implementation takes from the authors' released code (the paper's text leaves these open): logits as
the latent features, the MSE invariance term with the adaptive scale ``s``, the ascent direction (descending the
discriminator loss), two discriminator updates per batch with SGD (lr 1e-3, momentum 0.9, weight decay 2e-4), one
perturbation step of size eps from a random start, label smoothing 0.5. Departures: the discriminator is a small
MLP on the logits (theirs is a wide residual network on the logits reshaped to ``(K, 1, 1)``, sized for
CIFAR-10), it scores with logits and ``BCEWithLogits`` (theirs applies a sigmoid then ``BCE``: the same loss,
more stable), and their gradient clipping of the classifier's final layer is left out.

The discriminator is built on the first call (it needs the number of classes ``K``) on the model's device, is
not a parameter of the model, and is exposed through :meth:`extra_parameters` (the trainer's optimiser must not
own it) and checkpointed with its optimiser through :meth:`state_dict`.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bastion.attacks.base import positive_float, positive_int
from bastion.defenses.training.feature_scattering import smoothed_labels, soft_cross_entropy
from bastion.defenses.training.features import ObjectiveRandomness
from bastion.defenses.training.inner import check_batch, check_objective_threat, pgd_perturb
from bastion.errors import InputError
from bastion.models.checks import eval_mode
from bastion.threat import LpBall

__all__ = ["LatentDiscriminator", "LatentManifoldAT"]


class LatentDiscriminator(nn.Module):
    """MLP on latent features with a natural-vs-perturbed score and ``K`` class logits.

    Batch normalisation after each hidden linear layer (the authors' discriminator is a batch-normalised residual
    network) keeps the SGD updates stable whatever the scale of the logits it reads. In training mode it must see
    natural and perturbed features in *one* batch, so that both are normalised with the same statistics.

    Args:
        num_features: dimension of the latent features (the number of classes when they are logits).
        num_classes: number of class logits.
        hidden: width of the two hidden layers.
    """

    def __init__(self, num_features: int, num_classes: int, hidden: int = 128) -> None:
        super().__init__()
        self.trunk = nn.Sequential(
            nn.Linear(num_features, hidden),
            nn.BatchNorm1d(hidden),
            nn.LeakyReLU(0.2),
            nn.Linear(hidden, hidden),
            nn.BatchNorm1d(hidden),
            nn.LeakyReLU(0.2),
        )
        self.score = nn.Linear(hidden, 1)
        self.classes = nn.Linear(hidden, num_classes)

    def forward(self, z: Tensor) -> tuple[Tensor, Tensor]:
        """``(score logit (N,), class logits (N, K))`` of the latent features ``z`` (N, num_features)."""
        h = self.trunk(z)
        return self.score(h).squeeze(1), self.classes(h)


class LatentManifoldAT:
    """Adversarial training with latent distribution, ATLD (Qian et al., 2021); see the module docstring.

    Args:
        threat: the threat set of the LMAEs (paper: ``LpBall("linf", 8/255)`` on CIFAR-10).
        steps: perturbation steps (paper: 1).
        step_size: step length in the threat's norm; ``None`` means eps (paper).
        label_smoothing: smoothing of the classifier's and discriminator's targets (paper: 0.5).
        d_steps: discriminator updates per batch (paper: 2).
        d_lr: discriminator SGD learning rate (paper: 1e-3).
        d_momentum: discriminator SGD momentum (paper: 0.9).
        d_weight_decay: discriminator weight decay (paper: 2e-4).
        d_hidden: width of the discriminator's hidden layers.
        invariance_scale: weight of the MSE invariance term; ``None`` (default) is the paper's adaptive
            ``s / 2`` from the input-gradient magnitudes, a number fixes it.
        seed: seeds the random starts and the discriminator's initialisation; ``None`` uses the global generator.
    """

    paper = (
        "Qian et al., Improving Model Robustness with Latent Distribution Locally and Globally, arXiv:2107.04401, 2021"
    )

    def __init__(
        self,
        threat: LpBall,
        *,
        steps: int = 1,
        step_size: float | None = None,
        label_smoothing: float = 0.5,
        d_steps: int = 2,
        d_lr: float = 1e-3,
        d_momentum: float = 0.9,
        d_weight_decay: float = 2e-4,
        d_hidden: int = 128,
        invariance_scale: float | None = None,
        seed: int | None = None,
    ) -> None:
        self.threat = check_objective_threat(threat, "LatentManifoldAT")
        self.steps = positive_int("steps", steps)
        self.step_size = self.threat.eps if step_size is None else positive_float("step_size", step_size)
        if not 0.0 <= float(label_smoothing) < 1.0:
            raise InputError(f"label_smoothing must be in [0, 1), got {label_smoothing!r}")
        self.label_smoothing = float(label_smoothing)
        self.d_steps = positive_int("d_steps", d_steps)
        self.d_lr = positive_float("d_lr", d_lr)
        self.d_momentum = positive_float("d_momentum", d_momentum, allow_zero=True)
        self.d_weight_decay = positive_float("d_weight_decay", d_weight_decay, allow_zero=True)
        self.d_hidden = positive_int("d_hidden", d_hidden)
        self.invariance_scale = (
            None if invariance_scale is None else positive_float("invariance_scale", invariance_scale, allow_zero=True)
        )
        self._rng = ObjectiveRandomness(seed)
        self.discriminator: LatentDiscriminator | None = None
        self.d_optimizer: torch.optim.Optimizer | None = None
        self._pending: dict[str, Any] | None = None
        #: the last batch's discriminator loss and classifier terms (detached tensors: no host sync), for logging
        self.last: dict[str, Tensor] = {}

    # ------------------------------------------------------------------------------------------ discriminator
    def _build(self, num_classes: int, device: torch.device, dtype: torch.dtype) -> LatentDiscriminator:
        if self.discriminator is None:
            seed = self._rng.seed
            with torch.random.fork_rng(devices=[]):
                if seed is not None:
                    torch.manual_seed(seed)
                disc = LatentDiscriminator(num_classes, num_classes, self.d_hidden)
            self.discriminator = disc.to(device=device, dtype=dtype)
            self.d_optimizer = torch.optim.SGD(
                self.discriminator.parameters(),
                lr=self.d_lr,
                momentum=self.d_momentum,
                weight_decay=self.d_weight_decay,
            )
            if self._pending is not None:
                self._load_discriminator(self._pending)
                self._pending = None
        elif next(self.discriminator.parameters()).device != device:
            self.discriminator.to(device)
        return self.discriminator

    def extra_parameters(self) -> list[nn.Parameter]:
        """The discriminator's parameters (trained by this objective's own optimiser, never the trainer's)."""
        return [] if self.discriminator is None else list(self.discriminator.parameters())

    @staticmethod
    def _separation(disc: LatentDiscriminator, natural: Tensor, perturbed: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Per-sample ``BCE(D_s(natural), 1) + BCE(D_s(perturbed), 0)`` (N,) and the class logits of both.

        One discriminator pass over the two batches together (shared batch-norm statistics in training mode).
        """
        n = natural.shape[0]
        scores, classes = disc(torch.cat([natural, perturbed]))
        s_nat, s_adv = scores[:n], scores[n:]
        separation = F.binary_cross_entropy_with_logits(
            s_nat, torch.ones_like(s_nat), reduction="none"
        ) + F.binary_cross_entropy_with_logits(s_adv, torch.zeros_like(s_adv), reduction="none")
        return separation, classes[:n], classes[n:]

    def _train_discriminator(
        self, disc: LatentDiscriminator, natural: Tensor, perturbed: Tensor, targets: Tensor
    ) -> Tensor:
        assert self.d_optimizer is not None
        natural, perturbed = natural.detach(), perturbed.detach()
        value = natural.new_zeros(())
        with torch.enable_grad():
            for _ in range(self.d_steps):
                separation, c_nat, c_adv = self._separation(disc, natural, perturbed)
                loss = separation.mean() + soft_cross_entropy(c_nat, targets) + soft_cross_entropy(c_adv, targets)
                self.d_optimizer.zero_grad(set_to_none=True)
                loss.backward()
                self.d_optimizer.step()
                value = loss.detach()
        return value

    # ------------------------------------------------------------------------------------------ objective
    def perturb(self, model: nn.Module, x: Tensor, natural_logits: Tensor | None = None) -> Tensor:
        """Latent manifold adversarial examples for the batch ``x`` (uses no labels), inside the threat set."""
        if natural_logits is None:
            with torch.no_grad(), eval_mode(model):
                natural_logits = model(x)
        disc = self._build(natural_logits.shape[1], x.device, natural_logits.dtype)
        natural = natural_logits.detach()

        def divergence(logits: Tensor) -> Tensor:
            # ascending minus the discriminator's loss = descending it (the sign in the authors' code)
            return -self._separation(disc, natural, logits)[0]

        dummy = torch.zeros(x.shape[0], dtype=torch.long, device=x.device)  # pgd_perturb's labels, unused here
        with eval_mode(disc):
            return pgd_perturb(
                model,
                x,
                dummy,
                self.threat,
                steps=self.steps,
                step_size=self.step_size,
                random_start=True,
                loss=divergence,
                generator=self._rng.generator(x.device),
            )

    def __call__(self, model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
        x, y = check_batch(x, y)
        y = y.to(x.device)
        with torch.no_grad(), eval_mode(model):
            natural = model(x)
        disc = self._build(natural.shape[1], x.device, natural.dtype)
        targets = smoothed_labels(y, natural.shape[1], self.label_smoothing).to(natural.dtype)
        x_adv = self.perturb(model, x, natural).requires_grad_(True)
        logits = model(x_adv)
        d_loss = self._train_discriminator(disc, natural, logits, targets)
        classification = soft_cross_entropy(logits, targets)
        invariance = F.mse_loss(logits, natural)
        if self.invariance_scale is None:
            (g_ce,) = torch.autograd.grad(classification, x_adv, retain_graph=True)
            (g_mse,) = torch.autograd.grad(invariance, x_adv, retain_graph=True)
            # the authors' balance: ratio of the largest input-gradient entries; guarded against a vanishing MSE term
            scale = (g_ce.abs().max() / g_mse.abs().max().clamp_min(1e-12)).detach().clamp(max=1e6) / 2
        else:
            scale = torch.as_tensor(self.invariance_scale, dtype=logits.dtype, device=logits.device)
        self.last = {"d_loss": d_loss, "ce": classification.detach(), "mse": invariance.detach()}
        return classification + scale * invariance

    # ------------------------------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {"rng": self._rng.state_dict()}
        if self.discriminator is not None and self.d_optimizer is not None:
            state["num_classes"] = self.discriminator.classes.out_features
            state["discriminator"] = self.discriminator.state_dict()
            state["d_optimizer"] = self.d_optimizer.state_dict()
        elif self._pending is not None:
            state.update({k: v for k, v in self._pending.items() if k != "rng"})
        return state

    def _load_discriminator(self, state: dict[str, Any]) -> None:
        assert self.discriminator is not None and self.d_optimizer is not None
        self.discriminator.load_state_dict(state["discriminator"])
        self.d_optimizer.load_state_dict(state["d_optimizer"])

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._rng.load_state_dict(state.get("rng", {}))
        if "discriminator" not in state:
            return
        if self.discriminator is None:
            self._pending = dict(state)  # built on the next call, once the device is known
        else:
            self._load_discriminator(state)

    def __repr__(self) -> str:
        return (
            f"LatentManifoldAT({self.threat!r}, steps={self.steps}, step_size={self.step_size}, "
            f"label_smoothing={self.label_smoothing}, d_steps={self.d_steps}, d_lr={self.d_lr})"
        )
