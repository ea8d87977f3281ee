"""Spectral signatures: poison leaves a trace along the top singular direction of a class's representations.

Tran, Li & Madry, "Spectral Signatures in Backdoor Attacks", NeurIPS 2018 (Algorithm 1).

For each class ``y`` (by its label in the possibly poisoned training set), let ``R`` be the ``n_y × d`` matrix of
the learned representations of the class's samples (the penultimate layer of a network trained on the data),
``R̂ = R - mean(R)`` its centred version and ``v`` the top right singular vector of ``R̂``. The outlier score of
sample ``i`` is its squared projection ``τ_i = ((R_i - mean(R)) · v)²``. When a fraction ``ε`` of the class is
poison, the poison's mean differs from the clean mean along ``v`` and its scores are the largest: the paper
removes the ``1.5 ε n_y`` samples of highest score from every class (the target class is unknown to the defender)
and retrains on the rest.

Following the paper, and the reference implementation in ART (``SpectralSignatureDefense``), the SVD is taken of
the centred representations, not of their covariance, and every class is analysed. ``poison_fraction`` is the
paper's ``ε``: an upper bound on the fraction of poison *within a class* (the fraction of the target class's
samples that are poison), not of the whole training set. The number removed per class is
``round(1.5 ε n_y)``, capped at ``n_y``.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from bastion.data import Dataset
from bastion.errors import InputError
from bastion.poisoning.defenses import (
    DetectionResult,
    check_classes,
    check_data,
    check_fraction,
    check_model,
    check_poison_indices,
    check_positive_int,
    finish_scan,
    representations,
)
from bastion.store import Store

__all__ = ["spectral_scores", "spectral_signatures"]


def spectral_scores(features: Tensor) -> Tensor:
    """Outlier scores of one class: squared projections of the centred rows on their top right singular vector.

    Args:
        features: ``(n, d)`` representations of the samples of one class.

    Returns:
        float64 ``(n,)`` scores, on the features' device. A class of fewer than two samples scores 0.
    """
    if features.ndim != 2:
        raise InputError(f"spectral_scores: features must be (n, d), got shape {tuple(features.shape)}")
    r = features.double()
    if r.shape[0] < 2:
        return torch.zeros(r.shape[0], dtype=torch.float64, device=r.device)
    centred = r - r.mean(dim=0, keepdim=True)
    # full_matrices=False: only the top right singular vector is needed, never the n × n left factor.
    _, _, vh = torch.linalg.svd(centred, full_matrices=False)
    return (centred @ vh[0]) ** 2


def spectral_signatures(
    model: nn.Module,
    data: Dataset,
    *,
    poison_fraction: float = 0.1,
    eps_multiplier: float = 1.5,
    classes: Sequence[int] | None = None,
    layer: str | None = None,
    batch_size: int = 256,
    poison_indices: Any = None,
    store: Store | str | Path | None = None,
    config: dict[str, Any] | None = None,
) -> DetectionResult:
    """Flag the samples of highest spectral-signature score in every class (Tran et al., NeurIPS 2018).

    Args:
        model: a network trained on ``data`` (possibly backdoored); its penultimate representations are analysed.
        data: the training set to scan.
        poison_fraction: the paper's ``ε``, an upper bound on the fraction of poison within a class (the paper's
            experiments use 5 % and 10 %).
        eps_multiplier: the paper removes ``1.5 ε`` of each class.
        classes: classes to analyse (all by default, as the paper: the target class is unknown).
        layer: a module name whose output is the representation; the input of the last ``nn.Linear`` by default.
        batch_size: inputs per forward pass.
        poison_indices: the true poison positions (or a boolean mask), to compute precision/recall/F1.
        store: a result store (path or :class:`~bastion.store.Store`): one record per sample, run kind
            ``"backdoor-scan"``.
        config: extra information stored with the run.

    Returns:
        A :class:`~bastion.poisoning.defenses.DetectionResult`; ``per_class`` holds each class's sample count,
        number removed and score cut-off.

    Raises:
        InputError: bad arguments (fraction outside (0, 1), unknown class or layer, poison positions out of range).
    """
    where = "spectral_signatures"
    started = time.perf_counter()
    check_model(model, where)
    ds = check_data(data, where)
    eps = check_fraction(poison_fraction, "poison_fraction", where, high=1.0)
    mult = check_fraction(eps_multiplier, "eps_multiplier", where, high=float("inf"))
    wanted = check_classes(classes, ds.num_classes, where)
    bs = check_positive_int(batch_size, "batch_size", where)
    poison = None if poison_indices is None else check_poison_indices(poison_indices, len(ds))

    feats, preds = representations(model, ds, layer=layer, batch_size=bs)
    labels = ds.y.to(feats.device)
    scores = torch.zeros(len(ds), dtype=torch.float64, device=feats.device)
    flagged = torch.zeros(len(ds), dtype=torch.bool, device=feats.device)
    per_class: list[dict[str, Any]] = []
    for c in wanted:
        members = torch.nonzero(labels == c).reshape(-1)
        n_c = int(members.numel())
        if n_c == 0:
            continue
        s = spectral_scores(feats[members])
        scores[members] = s
        n_remove = min(n_c, round(mult * eps * n_c))
        cutoff = None
        if n_remove > 0:
            top = torch.topk(s, n_remove).indices
            flagged[members[top]] = True
            cutoff = float(s[top].min())
        per_class.append({"class": c, "n": n_c, "removed": n_remove, "cutoff": cutoff})
    cfg = {"poison_fraction": eps, "eps_multiplier": mult, "classes": wanted, "layer": layer}
    result = DetectionResult(
        method="spectral", n=len(ds), suspected=torch.nonzero(flagged).reshape(-1), scores=scores,
        labels=ds.y, poison_indices=poison, per_class=per_class, config=cfg,
    )  # fmt: skip
    return finish_scan(
        result, model=model, data=ds, predictions_=preds, store=store, payload=cfg, config=config, started=started
    )
