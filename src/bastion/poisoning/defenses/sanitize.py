"""Data sanitisation by outlier removal: the sphere (centroid) and slab defences.

Steinhardt, Koh & Liang, "Certified Defenses for Data Poisoning Attacks", NeurIPS 2017 (Section 3, the
"oracle" and data-dependent defenders); the multiclass form follows Koh, Steinhardt & Liang, "Stronger Data
Poisoning Attacks Break Data Sanitization Defenses" (Machine Learning, 2022).

For each class ``y`` with centroid ``μ_y`` (the mean of the class's points, in input space or in a model's feature
space):

* **sphere** (centroid) defence: remove the points with ``‖x - μ_y‖₂ > r_y``;
* **slab** defence: remove the points with ``|⟨x - μ_y, w_y⟩| > s_y``, where ``w_y = (μ_y - μ_¬y) / ‖μ_y - μ_¬y‖``
  is the unit direction from the centroid of the other classes to ``μ_y`` (the binary paper's ``μ₊ - μ₋``; the
  projection is normalised so that ``s_y`` is a distance);
* ``"both"``: remove what either removes.

The radii ``r_y`` and ``s_y`` are the ``percentile``-th percentile of the class's own distances (the
"data-dependent" defender; 95 by default, so that about 5 % of each class goes). With ``reference=`` (a trusted
clean set), the centroids and radii come from it instead: the paper's "oracle" defender, whose centroids the poison
cannot drag. The per-sample score is the distance divided by the class's radius (the larger of the two ratios with
``"both"``): a sample is removed when its score exceeds 1.

Input space needs no model; feature space reads the penultimate representations of ``model``
(:func:`~bastion.poisoning.defenses.representations`).
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

__all__ = ["DEFENSES", "SPACES", "sanitize"]

SPACES: tuple[str, ...] = ("input", "feature")
DEFENSES: tuple[str, ...] = ("sphere", "slab", "both")


def _features(
    space: str, model: nn.Module | None, ds: Dataset, layer: str | None, bs: int
) -> tuple[Tensor, Tensor | None]:
    if space == "input":
        return ds.x.reshape(len(ds), -1).double(), None
    assert model is not None
    feats, preds = representations(model, ds, layer=layer, batch_size=bs)
    return feats.double(), preds


def _centroids(feats: Tensor, labels: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Per-class centroids ``(k, d)`` and class counts ``(k,)`` in one scatter (no loop over samples)."""
    sums = torch.zeros(k, feats.shape[1], dtype=feats.dtype, device=feats.device).index_add_(0, labels, feats)
    counts = torch.bincount(labels, minlength=k).to(feats.dtype)
    return sums / counts.clamp(min=1)[:, None], counts


def _distances(feats: Tensor, labels: Tensor, mu: Tensor, counts: Tensor, defense: str) -> dict[str, Tensor]:
    out: dict[str, Tensor] = {}
    diff = feats - mu[labels]
    if defense in ("sphere", "both"):
        out["sphere"] = diff.norm(dim=1)
    if defense in ("slab", "both"):
        # Centroid of the other classes: (total - own sum) / (total count - own count).
        sums = mu * counts[:, None]
        total, n_total = sums.sum(dim=0), counts.sum()
        others = (total[None] - sums) / (n_total - counts).clamp(min=1)[:, None]
        w = mu - others
        w = w / w.norm(dim=1, keepdim=True).clamp(min=1e-12)
        out["slab"] = (diff * w[labels]).sum(dim=1).abs()
    return out


def sanitize(
    data: Dataset,
    *,
    model: nn.Module | None = None,
    space: str = "input",
    defense: str = "sphere",
    percentile: float = 95.0,
    reference: Dataset | None = None,
    classes: Sequence[int] | None = None,
    layer: str | None = None,
    batch_size: int = 256,
    poison_indices: Any = None,
    store: Store | str | Path | None = None,
    config: dict[str, Any] | None = None,
) -> DetectionResult:
    """Remove the points far from their class centroid (sphere) or along the centroids' axis (slab).

    Args:
        data: the training set to sanitise.
        model: needed for ``space="feature"`` (its penultimate representations); unused in input space.
        space: ``"input"`` (flattened inputs) or ``"feature"``.
        defense: ``"sphere"`` (default), ``"slab"`` or ``"both"``.
        percentile: the radius of each class is this percentile of its distances (in (0, 100]; 95 removes about
            5 % of each class).
        reference: optional trusted clean data giving the centroids and the radii (the paper's oracle defender);
            it must hold every analysed class.
        classes: classes to sanitise (all by default); the other classes are kept whole.
        layer: a module name whose output is the feature (feature space); the input of the last ``nn.Linear`` by
            default.
        batch_size: inputs per forward pass (feature space).
        poison_indices: the true poison positions (or a boolean mask), to compute precision/recall/F1.
        store: a result store: one record per sample, run kind ``"backdoor-scan"``.
        config: extra information stored with the run.

    Returns:
        A :class:`~bastion.poisoning.defenses.DetectionResult`; ``per_class`` holds each class's radii.

    Raises:
        InputError: unknown space or defence, feature space without a model, a percentile outside (0, 100], a
            reference set of another shape or missing a class.
    """
    where = "sanitize"
    started = time.perf_counter()
    ds = check_data(data, where)
    if space not in SPACES:
        raise InputError(f"{where}: space must be one of {', '.join(SPACES)}, got {space!r}")
    if defense not in DEFENSES:
        raise InputError(f"{where}: defense must be one of {', '.join(DEFENSES)}, got {defense!r}")
    if space == "feature":
        if model is None:
            raise InputError(f"{where}: space='feature' needs the model whose features to use: model=...")
        check_model(model, where)
    pct = check_fraction(percentile, "percentile", where, high=100.0)
    wanted = check_classes(classes, ds.num_classes, where)
    bs = check_positive_int(batch_size, "batch_size", where)
    poison = None if poison_indices is None else check_poison_indices(poison_indices, len(ds))
    ref = None
    if reference is not None:
        ref = check_data(reference, where, "reference")
        if ref.feature_shape != ds.feature_shape:
            raise InputError(
                f"{where}: reference has samples of shape {ref.feature_shape}, the data {ds.feature_shape}"
            )  # fmt: skip
        missing = [c for c in wanted if not bool((ref.y == c).any())]
        if missing:
            raise InputError(f"{where}: the reference set has no sample of class(es) {missing}; it needs every class")

    feats, preds = _features(space, model, ds, layer, bs)
    labels = ds.y.to(feats.device)
    k = ds.num_classes
    if ref is None:
        ref_feats, ref_labels = feats, labels
    else:
        ref_feats = _features(space, model, ref, layer, bs)[0]
        ref_labels = ref.y.to(ref_feats.device)
    mu, counts = _centroids(ref_feats, ref_labels, k)
    ref_dist = _distances(ref_feats, ref_labels, mu, counts, defense)
    dist = _distances(feats, labels, mu, counts, defense)

    q = pct / 100.0
    ratio = torch.zeros(len(ds), dtype=torch.float64, device=feats.device)
    per_class: list[dict[str, Any]] = []
    analysed = torch.zeros(len(ds), dtype=torch.bool, device=feats.device)
    for c in wanted:
        in_ref = ref_labels == c
        in_c = labels == c
        if not bool(in_c.any()):
            continue
        analysed |= in_c
        row: dict[str, Any] = {"class": c, "n": int(in_c.sum())}
        for name, d_ref in ref_dist.items():
            radius = float(torch.quantile(d_ref[in_ref], q))
            row[f"{name}_radius"] = radius
            r = dist[name][in_c] / max(radius, 1e-12)
            ratio[in_c] = torch.maximum(ratio[in_c], r)
        per_class.append(row)
    flagged = analysed & (ratio > 1.0)
    for row in per_class:
        row["removed"] = int((flagged & (labels == row["class"])).sum())

    cfg = {
        "space": space, "defense": defense, "percentile": pct, "oracle": ref is not None, "classes": wanted,
        "layer": layer,
    }  # fmt: skip
    result = DetectionResult(
        method="sanitize", n=len(ds), suspected=torch.nonzero(flagged).reshape(-1), scores=ratio, labels=ds.y,
        poison_indices=poison, per_class=per_class, config=cfg,
    )  # fmt: skip
    return finish_scan(
        result, model=model if space == "feature" else None, data=ds, predictions_=preds, store=store, payload=cfg,
        config=config, started=started,
    )  # fmt: skip
