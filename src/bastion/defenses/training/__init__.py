"""Model training: one loop, with the loss supplied by an objective (standard, and adversarial objectives).

:class:`AdversarialTrainer` runs any objective with checkpoints, resume, validation under PGD, the result store and
data parallelism; :func:`train` is the small loop for quick models. Objectives, one file each: FGSM-AT
(:class:`FGSMAT`), PGD-AT (:class:`PGDAT`), Free-AT (:class:`FreeAT`), Fast-AT (:class:`FastAT`), N-FGSM
(:class:`NFGSM`), TRADES (:class:`TRADES`), MART (:class:`MART`), VAT (:class:`VAT`), WRM (:class:`WRM`),
feature scattering (:class:`FeatureScattering`), AT with shift consistency (:class:`ATSCR`), latent-manifold AT
(:class:`LatentManifoldAT`), Gaussian-noise training for randomized smoothing (:class:`GaussianNoise`) and certified
training with IBP (:class:`IBPTraining`) and CROWN-IBP (:class:`CROWNIBP`), measured by :func:`verified_accuracy`.
The shared inner maximisation is :func:`pgd_perturb`; :func:`make_objective` builds any of them by name.
"""

from __future__ import annotations

from bastion.defenses.training.at_scr import ATSCR
from bastion.defenses.training.certified import CROWNIBP, IBPTraining, verified_accuracy
from bastion.defenses.training.fast_at import FastAT
from bastion.defenses.training.feature_scattering import FeatureScattering
from bastion.defenses.training.fgsm_at import FGSMAT
from bastion.defenses.training.free_at import FreeAT
from bastion.defenses.training.inner import kl_div_logits, pgd_perturb, unwrap
from bastion.defenses.training.latent_manifold import LatentDiscriminator, LatentManifoldAT
from bastion.defenses.training.mart import MART
from bastion.defenses.training.n_fgsm import NFGSM
from bastion.defenses.training.noise import GaussianNoise
from bastion.defenses.training.pgd_at import PGDAT
from bastion.defenses.training.registry import OBJECTIVES, make_objective
from bastion.defenses.training.trades import TRADES
from bastion.defenses.training.trainer import (
    AdversarialTrainer,
    EpochMetrics,
    Objective,
    StandardObjective,
    TrainingResult,
    accuracy,
    lr_factor,
    train,
)
from bastion.defenses.training.vat import VAT
from bastion.defenses.training.wrm import WRM

__all__ = [
    "ATSCR",
    "CROWNIBP",
    "FGSMAT",
    "MART",
    "NFGSM",
    "OBJECTIVES",
    "PGDAT",
    "TRADES",
    "VAT",
    "WRM",
    "AdversarialTrainer",
    "EpochMetrics",
    "FastAT",
    "FeatureScattering",
    "FreeAT",
    "GaussianNoise",
    "IBPTraining",
    "LatentDiscriminator",
    "LatentManifoldAT",
    "Objective",
    "StandardObjective",
    "TrainingResult",
    "accuracy",
    "kl_div_logits",
    "lr_factor",
    "make_objective",
    "pgd_perturb",
    "train",
    "unwrap",
    "verified_accuracy",
]
