"""Activation clustering: within a poisoned class, the poison's activations form a cluster of their own.

Chen, Carvalho, Baracaldo, Ludwig, Edwards, Lee, Molloy & Srivastava, "Detecting Backdoor Attacks on Deep Neural
Networks by Activation Clustering", AAAI workshop on Artificial Intelligence Safety (SafeAI) 2019.

For each class (by its label in the training set), the activations of the last hidden layer of a network trained
on the data are flattened, reduced to 10 dimensions by independent component analysis (the paper's FastICA; PCA is
offered as well) and split into two clusters by k-means. A poisoned class splits into its clean samples and the
poison (which the network recognises by the trigger, not by the class's features); a clean class splits
arbitrarily. Which cluster is poison is decided by one of the paper's rules:

* ``"relative-size"`` (default): the smaller cluster is poison when it holds at most ``size_threshold`` = 35 % of
  the class (the paper's observation that poison stays a minority; ART's default threshold);
* ``"silhouette"``: the smaller cluster is poison when the silhouette score of the 2-means split exceeds
  ``silhouette_threshold`` (0.10, ART's default): a high score means that two clusters really fit the class. ART's
  silhouette analysis also requires the size rule; here the two rules are separate, as in the paper, and
  ``"both"`` requires both.

Optional *exclusionary reclassification* (paper, Section "Exclusionary Reclassification"): a new model is trained
without the suspected clusters (``retrain=``, a function that trains a fresh model on a data set) and classifies
each suspected cluster; with ``l`` the number of its samples put in their own label and ``p`` the largest number put
in one other class ``C``, the cluster is legitimate when ``p == 0`` or ``l / p > T`` (``T`` =
``reclassify_threshold``, 1 by default: the paper leaves ``T`` to the user) and stays poison otherwise, with ``C``
its suspected source class, as ART's ``exclusionary_reclassification`` decides.

Per-sample score: ``1 - |own cluster| / |class|`` (higher for the smaller cluster), so that the suspected samples
score highest.

Numerical notes: FastICA runs with ``whiten="unit-variance"`` and its convergence warnings are silenced (on a clean
class the components need not be independent at all); k-means uses ``n_init=10``; both are seeded by ``seed``. The
number of components is ``min(n_components, n_y - 1, d)`` for small classes; classes of fewer than
``min_class_size`` samples are not clustered.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

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
    check_seed,
    finish_scan,
    predictions,
    representations,
)
from bastion.store import Store

__all__ = ["REDUCTIONS", "RULES", "activation_clustering", "cluster_class"]

REDUCTIONS: tuple[str, ...] = ("ica", "pca")
RULES: tuple[str, ...] = ("relative-size", "silhouette", "both")


def cluster_class(
    activations: np.ndarray,
    *,
    reduce: str = "ica",
    n_components: int = 10,
    seed: int = 0,
    silhouette_sample: int = 5000,
) -> tuple[np.ndarray, float]:
    """Reduce one class's activations and split them in two by k-means.

    Args:
        activations: ``(n, d)`` activations of the class's samples.
        reduce: ``"ica"`` (FastICA, the paper) or ``"pca"``.
        n_components: dimensions after reduction (10 in the paper).
        seed: seeds the reduction and k-means.
        silhouette_sample: the silhouette score is computed on at most this many samples (its cost is quadratic).

    Returns:
        ``(assignment, silhouette)``: the cluster (0 or 1) of every sample and the silhouette score of the split
        (0 when k-means found a single cluster).
    """
    from sklearn.cluster import KMeans
    from sklearn.decomposition import PCA, FastICA
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.metrics import silhouette_score
    from threadpoolctl import threadpool_limits

    if not isinstance(activations, np.ndarray) or activations.ndim != 2 or activations.shape[0] < 3:
        got = getattr(activations, "shape", type(activations).__name__)
        raise InputError(f"cluster_class: activations must be a NumPy array (n, d) with n >= 3, got {got}")
    if reduce not in REDUCTIONS:
        raise InputError(f"cluster_class: reduce must be one of {', '.join(REDUCTIONS)}, got {reduce!r}")
    n, d = activations.shape
    k = max(1, min(n_components, n - 1, d))
    # Constant columns (dead ReLUs) carry nothing and make ICA's whitening singular.
    live = activations[:, activations.std(axis=0) > 1e-12]
    if live.shape[1] == 0:
        return np.zeros(n, dtype=np.int64), 0.0
    k = min(k, live.shape[1])
    # One BLAS/OpenMP thread: these matrices are small, and on a busy machine the thread pools of NumPy and
    # scikit-learn only wait on each other (10x slower on two shared cores).
    with warnings.catch_warnings(), threadpool_limits(limits=1):
        warnings.simplefilter("ignore", ConvergenceWarning)
        warnings.simplefilter("ignore", RuntimeWarning)
        if reduce == "ica":
            reducer: Any = FastICA(n_components=k, whiten="unit-variance", random_state=seed, max_iter=1000, tol=0.005)
        else:
            reducer = PCA(n_components=k, random_state=seed)
        reduced = np.asarray(reducer.fit_transform(live.astype(np.float64)), dtype=np.float64)
        reduced = np.nan_to_num(reduced, nan=0.0, posinf=0.0, neginf=0.0)
        assign = KMeans(n_clusters=2, n_init=10, random_state=seed).fit_predict(reduced).astype(np.int64)
    if len(np.unique(assign)) < 2:
        return assign, 0.0
    sample = min(n, silhouette_sample)
    with threadpool_limits(limits=1):
        sil = float(silhouette_score(reduced, assign, sample_size=sample if sample < n else None, random_state=seed))
    return assign, sil


def activation_clustering(
    model: nn.Module,
    data: Dataset,
    *,
    reduce: str = "ica",
    n_components: int = 10,
    rule: str = "relative-size",
    size_threshold: float = 0.35,
    silhouette_threshold: float = 0.10,
    retrain: Callable[[Dataset], nn.Module] | None = None,
    reclassify_threshold: float = 1.0,
    classes: Sequence[int] | None = None,
    layer: str | None = None,
    min_class_size: int = 10,
    batch_size: int = 256,
    seed: int = 0,
    poison_indices: Any = None,
    store: Store | str | Path | None = None,
    config: dict[str, Any] | None = None,
) -> DetectionResult:
    """Flag the poison cluster of each class by activation clustering (Chen et al., SafeAI 2019).

    Args:
        model: a network trained on ``data`` (possibly backdoored).
        data: the training set to scan.
        reduce: ``"ica"`` (FastICA, the paper) or ``"pca"``.
        n_components: dimensions after the reduction (10 in the paper).
        rule: ``"relative-size"`` (default), ``"silhouette"`` or ``"both"``; see the module docstring.
        size_threshold: largest fraction of its class a poison cluster may hold (0.35).
        silhouette_threshold: smallest silhouette score of a poisoned class's split (0.10).
        retrain: optional ``data -> trained model`` for exclusionary reclassification; None skips it.
        reclassify_threshold: the exclusionary reclassification's ``T`` (a cluster is legitimate when ``l / p > T``).
        classes: classes to analyse (all by default).
        layer: a module name whose output is the activation; the input of the last ``nn.Linear`` by default.
        min_class_size: classes with fewer samples are not clustered.
        batch_size: inputs per forward pass.
        seed: seeds FastICA/PCA and k-means.
        poison_indices: the true poison positions (or a boolean mask), to compute precision/recall/F1.
        store: a result store: one record per sample, run kind ``"backdoor-scan"``.
        config: extra information stored with the run.

    Returns:
        A :class:`~bastion.poisoning.defenses.DetectionResult`; ``per_class`` holds the cluster sizes, the
        silhouette score, the decision and (with ``retrain``) the reclassification's counts and source class.

    Raises:
        InputError: unknown reduction or rule, thresholds out of range, bad classes, layer or poison positions.
    """
    where = "activation_clustering"
    started = time.perf_counter()
    check_model(model, where)
    ds = check_data(data, where)
    if reduce not in REDUCTIONS:
        raise InputError(f"{where}: reduce must be one of {', '.join(REDUCTIONS)}, got {reduce!r}")
    if rule not in RULES:
        raise InputError(f"{where}: rule must be one of {', '.join(RULES)}, got {rule!r}")
    k = check_positive_int(n_components, "n_components", where)
    size_t = check_fraction(size_threshold, "size_threshold", where, high=0.5)
    if isinstance(silhouette_threshold, bool) or not isinstance(silhouette_threshold, (int, float)):
        raise InputError(f"{where}: silhouette_threshold must be a number in [-1, 1], got {silhouette_threshold!r}")
    if not -1.0 <= float(silhouette_threshold) <= 1.0:
        raise InputError(f"{where}: silhouette_threshold must lie in [-1, 1], got {silhouette_threshold!r}")
    if retrain is not None and not callable(retrain):
        raise InputError(f"{where}: retrain must be a function data -> trained model, got {type(retrain).__name__}")
    reclass_t = check_fraction(reclassify_threshold, "reclassify_threshold", where, low_open=False, high=float("inf"))
    wanted = check_classes(classes, ds.num_classes, where)
    min_size = check_positive_int(min_class_size, "min_class_size", where)
    bs = check_positive_int(batch_size, "batch_size", where)
    rng_seed = check_seed(seed, where)
    poison = None if poison_indices is None else check_poison_indices(poison_indices, len(ds))

    feats, preds = representations(model, ds, layer=layer, batch_size=bs)
    acts = feats.cpu().numpy()
    labels = ds.y.cpu().numpy()
    scores = np.zeros(len(ds), dtype=np.float64)
    flagged = np.zeros(len(ds), dtype=bool)
    per_class: list[dict[str, Any]] = []
    clusters: dict[int, np.ndarray] = {}  # class -> positions of its suspected cluster
    for c in wanted:
        members = np.nonzero(labels == c)[0]
        if members.size < max(min_size, 3):
            if members.size:
                per_class.append({"class": c, "n": int(members.size), "skipped": True, "poisoned": False})
            continue
        assign, sil = cluster_class(acts[members], reduce=reduce, n_components=k, seed=rng_seed)
        sizes = np.bincount(assign, minlength=2)
        small = int(np.argmin(sizes))
        frac = float(sizes[small] / members.size)
        by_size = frac <= size_t
        by_sil = sil > float(silhouette_threshold)
        poisoned = {"relative-size": by_size, "silhouette": by_sil, "both": by_size and by_sil}[rule]
        scores[members] = 1.0 - sizes[assign] / members.size
        row: dict[str, Any] = {
            "class": c, "n": int(members.size), "cluster_sizes": sizes.tolist(), "smaller_fraction": frac,
            "silhouette": sil, "poisoned": bool(poisoned),
        }  # fmt: skip
        if poisoned:
            clusters[c] = members[assign == small]
            flagged[clusters[c]] = True
        per_class.append(row)

    if retrain is not None and clusters:
        keep = np.nonzero(~flagged)[0]
        if keep.size == 0:
            raise InputError(
                f"{where}: every sample is suspected; exclusionary reclassification has nothing to train on"
            )
        fresh = retrain(ds.subset(keep, name=f"{ds.name} (without suspected clusters)"))
        if not isinstance(fresh, nn.Module):
            raise InputError(f"{where}: retrain must return a torch.nn.Module, got {type(fresh).__name__}")
        for row in per_class:
            c = int(row["class"])
            if c not in clusters:
                continue
            pos = clusters[c]
            counts = torch.bincount(predictions(fresh, ds.x[torch.from_numpy(pos)]).cpu(), minlength=ds.num_classes)
            own = int(counts[c])
            counts[c] = -1
            other = int(counts.argmax())
            p = int(counts[other])
            legit = p == 0 or own / p > reclass_t
            row.update({"reclassified_own": own, "reclassified_other": p, "source_class": None if legit else other})
            if legit:
                row["poisoned"] = False
                flagged[pos] = False
                scores[pos] = 0.0

    cfg = {
        "reduce": reduce, "n_components": k, "rule": rule, "size_threshold": size_t,
        "silhouette_threshold": float(silhouette_threshold), "reclassify": retrain is not None,
        "reclassify_threshold": reclass_t, "classes": wanted, "layer": layer, "min_class_size": min_size,
        "seed": rng_seed,
    }  # fmt: skip
    result = DetectionResult(
        method="activation-clustering", n=len(ds), suspected=torch.from_numpy(np.nonzero(flagged)[0]),
        scores=torch.from_numpy(scores), labels=ds.y, poison_indices=poison, per_class=per_class, config=cfg,
        details={"poisoned_classes": [int(r["class"]) for r in per_class if r.get("poisoned")]},
    )  # fmt: skip
    return finish_scan(
        result, model=model, data=ds, predictions_=preds, store=store, payload=cfg, config=config, started=started
    )
