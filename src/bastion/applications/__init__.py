"""Novel applications of adversarial machinery: reprogramming, contrastive explanations, fingerprinting.

* :mod:`.reprogram`: adversarial reprogramming of a frozen classifier for a new task, white-box
  (:class:`WhiteBoxReprogramming`, Elsayed et al., ICLR 2019) and black-box through a query-counted oracle
  (:class:`BAR`, Tsai et al., ICML 2020), with a many-to-one label mapping; :func:`shapes_task` is a small new task
  made on the fly.
* :mod:`.cem`: contrastive explanations, pertinent negatives and positives (:class:`CEM`, Dhurandhar et al.,
  NeurIPS 2018).
* :mod:`.fingerprint`: ownership verification with adversarial fingerprints (:class:`IPGuard`, Cao et al.,
  AsiaCCS 2021; :class:`Conferrable`, Lukas et al., ICLR 2021), :func:`verify` with match rates, a threshold and
  the ROC AUC, and :func:`suspect_models` (copies, fine-tuned, pruned, distilled and independent models).
"""

from __future__ import annotations

from bastion.applications.cem import CEM, CEMResult, autoencoder_from_vae
from bastion.applications.fingerprint import (
    Conferrable,
    Fingerprint,
    IPGuard,
    SuspectReport,
    VerificationResult,
    conferrability,
    match_rate,
    roc_auc,
    suspect_models,
    verify,
)
from bastion.applications.reprogram import (
    BAR,
    Program,
    ReprogrammedModel,
    ReprogramResult,
    WhiteBoxReprogramming,
    chance_accuracy,
    frequency_mapping,
    label_mapping,
    scratch_baseline,
)
from bastion.applications.tasks import SHAPES, shapes_task

__all__ = [
    "BAR",
    "CEM",
    "SHAPES",
    "CEMResult",
    "Conferrable",
    "Fingerprint",
    "IPGuard",
    "Program",
    "ReprogramResult",
    "ReprogrammedModel",
    "SuspectReport",
    "VerificationResult",
    "WhiteBoxReprogramming",
    "autoencoder_from_vae",
    "chance_accuracy",
    "conferrability",
    "frequency_mapping",
    "label_mapping",
    "match_rate",
    "roc_auc",
    "scratch_baseline",
    "shapes_task",
    "suspect_models",
    "verify",
]
