"""STRIP: a triggered input stays confidently in the target class however it is perturbed.

Gao, Xu, Wang, Chen, Ranasinghe & Nepal, "STRIP: A Defence Against Trojan Attacks on Deep Neural Networks", ACSAC
2019 (Section 4).

An input ``x`` is superimposed with ``N`` = 100 images drawn from a small held-out clean set; for each perturbed
input the model's softmax output ``p`` has Shannon entropy ``H_n = -Σ_k p_k log₂ p_k``, and the input's score is the
mean ``H = (1/N) Σ_n H_n``. Blending a clean input with random other images scatters its predictions (high
entropy); a triggered input keeps being sent to the target class by its trigger (low entropy). The detection
boundary comes from clean inputs only: the entropies of the held-out inputs (each perturbed by ``N`` *other*
held-out images) are taken to be normally distributed, and the threshold is their ``frr``-quantile under the fitted
normal, ``μ + σ Φ⁻¹(FRR)`` (the paper's choice; ``threshold="quantile"`` takes the empirical quantile instead). An
input is flagged as trojaned when its entropy falls below the threshold; by construction about a fraction ``FRR`` =
1 % of clean inputs is rejected.

Superimposition: the paper describes a linear blend of the two images; the default is
``x_p = α x + (1 - α) x_b`` with ``α = 0.5`` (as in TrojanZoo's STRIP). The authors' code uses OpenCV's
``addWeighted(x, 1, x_b, 1, 0)``, i.e. the saturated sum ``clip(x + x_b)``: ``mode="add"`` reproduces it.

The overlays of each input are drawn from a seeded hash of ``(seed, position)``, so an input's entropy does not
depend on the batch it was computed in, nor on where an interrupted run resumed.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import scipy.stats
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bastion.data import Dataset
from bastion.errors import InputError
from bastion.models.checks import eval_mode, model_device, model_fingerprint
from bastion.poisoning.defenses import (
    SCAN_KIND,
    DetectionResult,
    check_data,
    check_fraction,
    check_model,
    check_poison_indices,
    check_positive_int,
    check_seed,
)
from bastion.results import SampleRecord
from bastion.store import Store, resumable_run

__all__ = ["MODES", "THRESHOLDS", "strip_entropy", "strip_scan"]

MODES: tuple[str, ...] = ("blend", "add")
THRESHOLDS: tuple[str, ...] = ("normal", "quantile")

_MASK64 = np.uint64(0xFFFFFFFFFFFFFFFF)


def _splitmix(z: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):
        z = (z + np.uint64(0x9E3779B97F4A7C15)) & _MASK64
        z = ((z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)) & _MASK64
        z = ((z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)) & _MASK64
        return z ^ (z >> np.uint64(31))


def _overlays(positions: np.ndarray, pool: int, n: int, seed: int, stream: int, exclude_self: bool) -> np.ndarray:
    """For each position, ``n`` distinct indices into the clean pool: the smallest of a seeded hash of
    ``(seed, stream, position, pool index)`` (one vectorised pass over ``len(positions) × pool`` keys)."""
    with np.errstate(over="ignore"):
        base = np.uint64((seed * 0x2545F4914F6CDD1D + stream * 0xD1B54A32D192ED03) & 0xFFFFFFFFFFFFFFFF)
        z = positions.astype(np.uint64)[:, None] * np.uint64(pool) + np.arange(pool, dtype=np.uint64)[None, :]
        keys = _splitmix(_splitmix(z ^ base))
    if exclude_self:
        keys[np.arange(len(positions)), positions] = _MASK64
    return np.argpartition(keys, n - 1, axis=1)[:, :n]


def _superimpose(x: Tensor, backgrounds: Tensor, mode: str, alpha: float, domain: tuple[float, float]) -> Tensor:
    """``x`` (B, ...) with each of its ``N`` backgrounds (B, N, ...): (B * N, ...)."""
    xb = x[:, None]
    out = alpha * xb + (1.0 - alpha) * backgrounds if mode == "blend" else (xb + backgrounds).clamp(*domain)
    return out.reshape(-1, *x.shape[1:])


@torch.no_grad()
def _entropies(
    model: nn.Module,
    x: Tensor,
    positions: np.ndarray,
    pool: Tensor,
    *,
    n: int,
    mode: str,
    alpha: float,
    domain: tuple[float, float],
    seed: int,
    stream: int,
    exclude_self: bool,
) -> Tensor:
    picks = torch.from_numpy(_overlays(positions, pool.shape[0], n, seed, stream, exclude_self)).to(pool.device)
    perturbed = _superimpose(x.to(pool.device), pool[picks], mode, alpha, domain)
    logp = F.log_softmax(model(perturbed).double(), dim=1)
    h = -(logp.exp() * logp).sum(dim=1) / math.log(2.0)
    return h.reshape(x.shape[0], n).mean(dim=1)


def strip_entropy(
    model: nn.Module,
    x: Tensor,
    clean: Dataset,
    *,
    n_overlays: int = 100,
    alpha: float = 0.5,
    mode: str = "blend",
    batch_size: int = 32,
    seed: int = 0,
) -> Tensor:
    """STRIP entropy (bits, averaged over ``n_overlays`` superimpositions) of each input of ``x``.

    Args:
        model: the classifier.
        x: inputs ``(B, ...)`` of the clean set's feature shape.
        clean: held-out clean images to superimpose.
        n_overlays: superimpositions per input (the paper's ``N`` = 100).
        alpha: weight of the input in the blend (``mode="blend"``).
        mode: ``"blend"`` (``α x + (1 - α) x_b``) or ``"add"`` (``clip(x + x_b)``, the authors' code).
        batch_size: inputs per forward pass (each brings ``n_overlays`` perturbed copies).
        seed: seeds the choice of overlays (per input position in ``x``).

    Returns:
        float64 ``(B,)`` entropies on the CPU.
    """
    where = "strip_entropy"
    check_model(model, where)
    pool_ds = check_data(clean, where, "clean", min_size=1)
    n = check_positive_int(n_overlays, "n_overlays", where)
    a, m = _check_blend(alpha, mode, where)
    bs = check_positive_int(batch_size, "batch_size", where)
    s = check_seed(seed, where)
    if not isinstance(x, Tensor) or tuple(x.shape[1:]) != pool_ds.feature_shape:
        got = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
        raise InputError(f"{where}: x must be a tensor of shape (B, {pool_ds.feature_shape}), got {got}")
    if n > len(pool_ds):
        raise InputError(f"{where}: n_overlays = {n} exceeds the {len(pool_ds)} clean images; give more clean data")
    device = model_device(model)
    pool = pool_ds.x.to(device)
    out = []
    with eval_mode(model):
        for start in range(0, x.shape[0], bs):
            xb = x[start : start + bs]
            pos = np.arange(start, start + xb.shape[0])
            out.append(
                _entropies(
                    model, xb, pos, pool, n=n, mode=m, alpha=a, domain=pool_ds.domain, seed=s, stream=1,
                    exclude_self=False,
                ).cpu()
            )  # fmt: skip
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.float64)


def _check_blend(alpha: object, mode: object, where: str) -> tuple[float, str]:
    if mode not in MODES:
        raise InputError(f"{where}: mode must be one of {', '.join(MODES)}, got {mode!r}")
    a = check_fraction(alpha, "alpha", where, low_open=True, high=1.0)
    return a, str(mode)


def strip_scan(
    model: nn.Module,
    data: Dataset,
    clean: Dataset,
    *,
    n_overlays: int = 100,
    frr: float = 0.01,
    alpha: float = 0.5,
    mode: str = "blend",
    threshold: str = "normal",
    batch_size: int = 32,
    seed: int = 0,
    poison_indices: Any = None,
    store: Store | str | Path | None = None,
    progress: bool = True,
    config: dict[str, Any] | None = None,
) -> DetectionResult:
    """Screen every input of ``data`` with STRIP (Gao et al., ACSAC 2019).

    ``data`` may be incoming (test) inputs or a training set: in both cases the flagged positions are the inputs
    whose entropy is below the threshold set on ``clean``.

    Args:
        model: the possibly backdoored classifier.
        data: the inputs to screen.
        clean: a held-out clean set (the defender's): the superimposed images and the clean entropy distribution.
            It needs more than ``n_overlays`` images.
        n_overlays: superimpositions per input (``N`` = 100).
        frr: the false rejection rate that sets the threshold (1 %).
        alpha: weight of the input in the blend.
        mode: ``"blend"`` (default) or ``"add"`` (the authors' saturated sum).
        threshold: ``"normal"`` (fit a normal to the clean entropies, the paper) or ``"quantile"`` (empirical).
        batch_size: inputs per forward pass (each brings ``n_overlays`` perturbed copies).
        seed: seeds the overlays.
        poison_indices: the true trojaned positions in ``data`` (or a boolean mask), for precision/recall/F1.
        store: a result store: one record per input (run kind ``"backdoor-scan"``), written batch by batch; an
            interrupted run resumes.
        progress: show a progress bar.
        config: extra information stored with the run.

    Returns:
        A :class:`~bastion.poisoning.defenses.DetectionResult` whose scores are minus the entropies (higher is
        more suspicious); ``details`` holds the threshold and the clean entropies' mean and deviation.

    Raises:
        InputError: bad arguments, data and clean set of different shapes, a clean set of at most ``n_overlays``
            images.
    """
    where = "strip_scan"
    started = time.perf_counter()
    check_model(model, where)
    ds = check_data(data, where)
    pool_ds = check_data(clean, where, "clean")
    n = check_positive_int(n_overlays, "n_overlays", where)
    rate = check_fraction(frr, "frr", where, high=1.0)
    if rate >= 1.0:
        raise InputError(f"{where}: frr must be below 1, got {frr!r}")
    a, m = _check_blend(alpha, mode, where)
    if threshold not in THRESHOLDS:
        raise InputError(f"{where}: threshold must be one of {', '.join(THRESHOLDS)}, got {threshold!r}")
    bs = check_positive_int(batch_size, "batch_size", where)
    s = check_seed(seed, where)
    if pool_ds.feature_shape != ds.feature_shape:
        raise InputError(f"{where}: clean images have shape {pool_ds.feature_shape}, the data {ds.feature_shape}")
    if len(pool_ds) <= n:
        raise InputError(
            f"{where}: the clean set holds {len(pool_ds)} images; STRIP needs more than n_overlays = {n} "
            "(each clean input is perturbed by n_overlays others); give more clean data or lower n_overlays"
        )
    poison = None if poison_indices is None else check_poison_indices(poison_indices, len(ds))
    device = model_device(model)
    pool = pool_ds.x.to(device)
    kw: dict[str, Any] = {"n": n, "mode": m, "alpha": a, "domain": pool_ds.domain, "seed": s}

    with eval_mode(model):
        clean_h = torch.cat(
            [
                _entropies(model, xb, idx.numpy(), pool, stream=0, exclude_self=True, **kw).cpu()
                for idx, xb, _ in pool_ds.batches(bs)
            ]
        )
    mu, sigma = float(clean_h.mean()), float(clean_h.std()) if clean_h.numel() > 1 else 0.0
    if threshold == "normal":
        cut = float(scipy.stats.norm.ppf(rate, loc=mu, scale=max(sigma, 1e-12)))
    else:
        cut = float(torch.quantile(clean_h, rate))

    cfg = {"n_overlays": n, "frr": rate, "alpha": a, "mode": m, "threshold": threshold, "seed": s}
    key = "backdoor:strip"
    is_poison = torch.zeros(len(ds), dtype=torch.bool)
    if poison is not None:
        is_poison[poison] = True

    def fingerprints() -> tuple[str, str]:
        return model_fingerprint(model), f"{ds.fingerprint()}+{pool_ds.fingerprint()}"

    with resumable_run(
        store, kind=SCAN_KIND, payload={"method": "strip", **cfg}, fingerprints=fingerprints, n_samples=len(ds),
        threats=[key], config=config,
    ) as run:  # fmt: skip
        with eval_mode(model):
            for idx, xb, yb in run.batches(ds, bs, desc="strip", progress=progress):
                h = _entropies(model, xb, idx.numpy(), pool, stream=1, exclude_self=False, **kw).cpu()
                with torch.no_grad():
                    pred = model(xb.to(device)).argmax(dim=1).cpu()
                rows = []
                for j, i in enumerate(idx.tolist()):
                    extra: dict[str, Any] = {"score": -float(h[j]), "entropy": float(h[j])}
                    if poison is not None:
                        extra["poison"] = bool(is_poison[i])
                    rows.append(
                        SampleRecord(
                            index=i, threat=key, label=int(yb[j]), clean_pred=int(pred[j]),
                            status="falsified" if float(h[j]) < cut else "unknown", attack="strip",
                            queries=n + 1, extra=extra,
                        )
                    )  # fmt: skip
                run.write(rows)
        records = run.records(key)
        entropy = torch.full((len(ds),), float("nan"), dtype=torch.float64)
        for r in records:
            entropy[r.index] = float(r.extra["entropy"])
        flagged = entropy < cut
        result = DetectionResult(
            method="strip", n=len(ds), suspected=torch.nonzero(flagged).reshape(-1), scores=-entropy, labels=ds.y,
            poison_indices=poison, config=cfg,
            details={
                "threshold": cut, "clean_entropy_mean": mu, "clean_entropy_std": sigma,
                "clean_rejected": float((clean_h < cut).double().mean()), "n_clean": len(pool_ds),
            },
        )  # fmt: skip
        return run.finish(result, started=started)
