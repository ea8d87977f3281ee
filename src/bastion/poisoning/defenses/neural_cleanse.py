"""Neural Cleanse: reverse-engineer, for every class, the smallest trigger that sends clean inputs to it.

Wang, Yao, Shan, Li, Viswanath, Zheng & Zhao, "Neural Cleanse: Identifying and Mitigating Backdoor Attacks in
Neural Networks", IEEE S&P 2019 (Sections IV-VI). Reference code: ``bolunwang/backdoor`` (``visualizer.py``,
``mad_outlier_detection.py``).

**Reverse engineering.** A trigger is a mask ``m`` (one value in [0, 1] per pixel, shared by the channels) and a
pattern ``p`` (an image in the input domain), applied as ``A(x) = (1 - m) ⊙ x + m ⊙ p``. For each target class
``t`` the defence minimises, over clean inputs ``x``,

    ``CE(f(A(x)), t) + λ_t · ‖m‖₁``

with Adam (learning rate 0.1, betas (0.5, 0.9)) on the tanh-parametrised ``m`` and ``p`` (``m = tanh(m')/(2 - ε)
+ 1/2``, so they stay in range without clipping), from a random start. ``λ_t`` is adjusted once per epoch, as the
reference code does: it starts at 0 and is set to ``init_cost`` = 1e-3 once the attack succeeds (on ≥ 99 % of the
epoch's inputs) for ``patience`` = 5 epochs in a row; afterwards it is multiplied by 1.5 after ``patience``
successful epochs and divided by ``1.5 ** 1.5`` after ``patience`` failing ones. The trigger kept is the one of
smallest mask norm among the epochs whose attack succeeded (the last one if none did). A class stops early once
its cost went both up and down and its best norm has not improved for ``5 · patience`` epochs (the reference's
example settings: early-stop threshold 1.0, patience ``5 · PATIENCE``).

All classes are optimised together: one forward pass carries a batch of clean inputs stamped with every running
class's trigger, and one Adam step updates them all (Adam is element-wise, so this is exactly the per-class
optimisation of the reference; only the random streams differ). A class that stopped leaves the batch.

**Detection.** With ``L_t`` the L1 norm of class ``t``'s mask, ``median`` their median and
``MAD = 1.4826 · median(|L - median|)`` (the consistency constant of a normal distribution), the anomaly index of
``t`` is ``|L_t - median| / MAD``; a class is flagged as infected when its index exceeds 2 *and* its norm is below
the median (a backdoor makes its target class easy to reach, never hard).

**Mitigation** (:func:`unlearn`, Section VI-C): fine-tune the model on clean data of which 20 % is stamped with the
reversed trigger of a flagged class and keeps its TRUE label, so that the model learns to ignore the trigger. The
paper fine-tunes for one epoch on 10 % of the training data.

Deviations from the reference code: the epoch length is ``samples_per_epoch // batch_size`` steps (the reference's
``NB_SAMPLE // BATCH_SIZE`` with ``NB_SAMPLE`` = 1000); the inputs are taken in the model's input domain directly
(bastion models normalise inside), so no preprocessing is undone; for non-image inputs ``(D,)`` the mask has one
value per feature.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bastion.data import Dataset
from bastion.errors import InputError
from bastion.models.checks import check_logits, eval_mode, model_device, model_fingerprint
from bastion.poisoning.defenses import (
    check_classes,
    check_data,
    check_fraction,
    check_model,
    check_positive_int,
    check_seed,
)
from bastion.results import SampleRecord
from bastion.store import Store, resumable_run

__all__ = [
    "NC_KIND",
    "NeuralCleanseResult",
    "anomaly_indices",
    "neural_cleanse",
    "plot_anomaly_indices",
    "plot_triggers",
    "unlearn",
]

#: Run kind of a Neural Cleanse scan in the result store (one record per class).
NC_KIND = "backdoor-scan"
_THREAT = "backdoor:neural-cleanse"
_CONSISTENCY = 1.4826
_TANH_EPS = 1e-7  # Keras's K.epsilon(), as in the reference: keeps arctanh finite at 0 and 1


def anomaly_indices(norms: Tensor, *, consistency: float = _CONSISTENCY) -> tuple[Tensor, float, float]:
    """MAD anomaly index of every value: ``|L - median| / (consistency · median(|L - median|))``.

    Args:
        norms: the L1 norms of the reversed masks, one per class.
        consistency: 1.4826 makes the MAD estimate the standard deviation of a normal distribution.

    Returns:
        ``(indices, median, mad)``; with a zero MAD, an index is ``inf`` for a value off the median and 0 on it.
    """
    v = norms.double()
    # The lower median, as torch.median; numpy's (and the reference's) average the two middle values.
    median = float(np.median(v.cpu().numpy()))
    mad = consistency * float(np.median((v - median).abs().cpu().numpy()))
    dev = (v - median).abs()
    if mad > 0:
        return dev / mad, median, mad
    return torch.where(dev > 0, torch.full_like(dev, math.inf), torch.zeros_like(dev)), median, mad


@dataclass
class NeuralCleanseResult:
    """Reversed triggers of every class and the outlier analysis of their norms.

    Attributes:
        classes: the analysed classes.
        masks: ``(K, 1, H, W)`` masks in [0, 1] (``(K, *shape)`` for non-image inputs); NaN rows for classes not
            analysed.
        patterns: ``(K, C, H, W)`` patterns in the input domain.
        norms: ``(K,)`` L1 norms of the masks.
        attack_success: ``(K,)`` success rate of each reversed trigger on the clean data (its epoch's average).
        anomaly_index: ``(K,)`` MAD anomaly indices.
        flagged: classes with an anomaly index above ``threshold`` and a norm below the median, smallest norm first.
        median: median of the norms.
        mad: their scaled median absolute deviation.
        epochs: epochs run for each class.
        costs: final ``λ`` of each class.
        threshold: the anomaly threshold (2).
        config: the hyperparameters.
        run_id: id of the run in the store, or None.
        seconds: wall time.
    """

    classes: list[int]
    masks: Tensor
    patterns: Tensor
    norms: Tensor
    attack_success: Tensor
    anomaly_index: Tensor
    flagged: list[int]
    median: float
    mad: float
    epochs: list[int]
    costs: list[float]
    threshold: float = 2.0
    config: dict[str, Any] = field(default_factory=dict)
    run_id: int | None = None
    seconds: float = 0.0

    def trigger(self, cls: int) -> Any:
        """The reversed trigger of class ``cls`` as a function ``x -> (1 - m) x + m p`` (on ``x``'s device)."""
        if cls not in self.classes:
            raise InputError(f"class {cls!r} was not analysed; analysed classes: {self.classes}")
        m, p = self.masks[cls], self.patterns[cls]

        def apply(x: Tensor) -> Tensor:
            mm, pp = m.to(x.device, x.dtype), p.to(x.device, x.dtype)
            return (1 - mm) * x + mm * pp

        return apply

    def to_dict(self) -> dict[str, Any]:
        """JSON-able summary (no masks or patterns: they are in the per-class records)."""

        def clean(values: Tensor) -> list[float | None]:
            return [None if not math.isfinite(float(v)) else float(v) for v in values]

        return {
            "method": "neural-cleanse", "classes": self.classes, "norms": clean(self.norms),
            "attack_success": clean(self.attack_success), "anomaly_index": clean(self.anomaly_index),
            "flagged": self.flagged, "median": self.median, "mad": self.mad, "threshold": self.threshold,
            "epochs": self.epochs, "costs": self.costs, "config": self.config, "run_id": self.run_id,
            "seconds": self.seconds,
        }  # fmt: skip

    def table(self) -> str:
        """One line per class: mask norm, reversed attack's success, anomaly index, flag."""
        lines = [
            "Neural Cleanse (Wang et al., IEEE S&P 2019)",
            f"median L1 {self.median:.4g}   MAD {self.mad:.4g}   threshold {self.threshold:g}",
            "class   mask L1   success   anomaly   flagged",
        ]
        for c in self.classes:
            idx = float(self.anomaly_index[c])
            shown = "inf" if math.isinf(idx) else f"{idx:.2f}"
            lines.append(
                f"{c:>5}  {float(self.norms[c]):>8.3f}  {float(self.attack_success[c]):>8.3f}  {shown:>8}   "
                f"{'YES' if c in self.flagged else ''}"
            )
        lines.append(f"flagged classes: {self.flagged if self.flagged else 'none'}")
        return "\n".join(lines)


def _flag(classes: list[int], norms: Tensor, threshold: float) -> tuple[Tensor, list[int], float, float]:
    k = norms.shape[0]
    sub = norms[classes]
    idx_sub, median, mad = anomaly_indices(sub)
    index = torch.full((k,), math.nan, dtype=torch.float64)
    index[classes] = idx_sub
    flagged = [c for c in classes if float(norms[c]) < median and float(index[c]) > threshold]
    flagged.sort(key=lambda c: float(norms[c]))
    return index, flagged, median, mad


def _to_tanh(v: Tensor) -> Tensor:
    return torch.atanh((v - 0.5) * (2 - _TANH_EPS))


def _from_tanh(t: Tensor) -> Tensor:
    # The clamp only removes float32 rounding (tanh(t) / (2 - eps) + 0.5 can come out at -6e-8).
    return (torch.tanh(t) / (2 - _TANH_EPS) + 0.5).clamp(0.0, 1.0)


def neural_cleanse(
    model: nn.Module,
    clean: Dataset,
    *,
    classes: Sequence[int] | None = None,
    init_cost: float = 1e-3,
    lr: float = 0.1,
    betas: tuple[float, float] = (0.5, 0.9),
    batch_size: int = 32,
    samples_per_epoch: int = 1000,
    epochs: int = 1000,
    attack_threshold: float = 0.99,
    patience: int = 5,
    cost_multiplier: float = 1.5,
    early_stop: bool = True,
    early_stop_threshold: float = 1.0,
    early_stop_patience: int | None = None,
    anomaly_threshold: float = 2.0,
    seed: int = 0,
    store: Store | str | Path | None = None,
    progress: bool = True,
    config: dict[str, Any] | None = None,
) -> NeuralCleanseResult:
    """Reverse-engineer a trigger for every class and flag the abnormally small ones (Wang et al., S&P 2019).

    Args:
        model: the classifier to examine (its weights are not changed).
        clean: clean inputs (their labels are not used).
        classes: classes to analyse (all by default; the MAD needs several).
        init_cost: the first non-zero ``λ`` (1e-3).
        lr: Adam learning rate (0.1).
        betas: Adam betas ((0.5, 0.9), as the reference).
        batch_size: clean inputs per step (32).
        samples_per_epoch: inputs per epoch; an epoch is ``samples_per_epoch // batch_size`` steps (1000 → 31).
        epochs: most epochs per class (the reference's 1000 ``STEPS``; early stopping usually ends far sooner).
        attack_threshold: success rate that counts as a working trigger (0.99).
        patience: epochs before ``λ`` changes (5).
        cost_multiplier: ``λ`` grows by this factor and shrinks by its 1.5th power (1.5).
        early_stop: stop a class once its best norm stalls (after ``λ`` went up and down).
        early_stop_threshold: a best norm that is not below this fraction of the earlier best counts as a stall.
        early_stop_patience: stalled epochs before stopping; ``5 · patience`` by default.
        anomaly_threshold: anomaly index above which a small-norm class is flagged (2).
        seed: seeds the random start and the batches.
        store: a result store: one record per class (run kind ``"backdoor-scan"``) written as the class finishes,
            with its mask, pattern and norm; an interrupted run resumes with the unfinished classes.
        progress: show a progress bar over the epochs.
        config: extra information stored with the run.

    Returns:
        A :class:`NeuralCleanseResult`.

    Raises:
        InputError: bad arguments, fewer than 3 classes to analyse, a model that does not run on the data.
    """
    where = "neural_cleanse"
    started = time.perf_counter()
    check_model(model, where)
    ds = check_data(clean, where, "clean")
    wanted = check_classes(classes, ds.num_classes, where)
    if len(wanted) < 3:
        raise InputError(f"{where}: the MAD outlier test needs at least 3 classes, got {wanted}")
    cost0 = check_fraction(init_cost, "init_cost", where, high=float("inf"))
    step_lr = check_fraction(lr, "lr", where, high=float("inf"))
    if not isinstance(betas, (tuple, list)) or len(betas) != 2 or not all(0 <= float(b) < 1 for b in betas):
        raise InputError(f"{where}: betas must be two numbers in [0, 1), got {betas!r}")
    bs = check_positive_int(batch_size, "batch_size", where)
    spe = check_positive_int(samples_per_epoch, "samples_per_epoch", where)
    n_epochs = check_positive_int(epochs, "epochs", where)
    thr = check_fraction(attack_threshold, "attack_threshold", where, high=1.0)
    pat = check_positive_int(patience, "patience", where)
    mult = check_fraction(cost_multiplier, "cost_multiplier", where, high=float("inf"))
    if mult <= 1.0:
        raise InputError(f"{where}: cost_multiplier must exceed 1, got {cost_multiplier!r}")
    es_thr = check_fraction(early_stop_threshold, "early_stop_threshold", where, high=float("inf"))
    es_pat = (
        5 * pat
        if early_stop_patience is None
        else check_positive_int(early_stop_patience, "early_stop_patience", where)
    )
    a_thr = check_fraction(anomaly_threshold, "anomaly_threshold", where, high=float("inf"))
    s = check_seed(seed, where)

    device = model_device(model)
    shape = ds.feature_shape
    mask_shape = (1, *shape[1:]) if len(shape) == 3 else shape
    k_all = ds.num_classes
    low, high = ds.domain
    with torch.no_grad(), eval_mode(model):
        k_model = check_logits(model(ds.x[:2].to(device)), min(2, len(ds)))
    if k_model < k_all:
        raise InputError(f"{where}: the model returns {k_model} logits but the data has {k_all} classes")

    cfg = {
        "classes": wanted, "init_cost": cost0, "lr": step_lr, "betas": [float(b) for b in betas], "batch_size": bs,
        "samples_per_epoch": spe, "epochs": n_epochs, "attack_threshold": thr, "patience": pat,
        "cost_multiplier": mult, "early_stop": bool(early_stop), "early_stop_threshold": es_thr,
        "early_stop_patience": es_pat, "seed": s,
    }  # fmt: skip
    masks = torch.full((k_all, *mask_shape), math.nan)
    patterns = torch.full((k_all, *shape), math.nan)
    norms = torch.full((k_all,), math.nan, dtype=torch.float64)
    success = torch.full((k_all,), math.nan, dtype=torch.float64)
    epochs_run = [0] * k_all
    costs = [0.0] * k_all

    def fingerprints() -> tuple[str, str]:
        return model_fingerprint(model), ds.fingerprint()

    with resumable_run(
        store, kind=NC_KIND, payload={"method": "neural-cleanse", **cfg}, fingerprints=fingerprints,
        n_samples=k_all, threats=[_THREAT], config=config,
    ) as run:  # fmt: skip
        for r in run.records(_THREAT):
            c = r.index
            masks[c] = torch.tensor(r.extra["mask"]).reshape(mask_shape)
            patterns[c] = torch.tensor(r.extra["pattern"]).reshape(shape)
            norms[c], success[c] = r.extra["mask_l1"], r.extra["attack_success"]
            epochs_run[c], costs[c] = int(r.extra["epochs"]), float(r.extra["cost"])
        todo = [c for c in wanted if c not in run.done]
        if todo:
            _optimise(
                model, ds, todo, run=run, masks=masks, patterns=patterns, norms=norms, success=success,
                epochs_run=epochs_run, costs=costs, mask_shape=mask_shape, domain=(low, high), cost0=cost0,
                lr=step_lr, betas=(float(betas[0]), float(betas[1])), bs=bs, spe=spe, n_epochs=n_epochs, thr=thr,
                pat=pat, mult=mult, early_stop=bool(early_stop), es_thr=es_thr, es_pat=es_pat, seed=s,
                progress=progress,
            )  # fmt: skip
        index, flagged, median, mad = _flag(wanted, norms, a_thr)
        if run.store is not None:
            run.write(
                [
                    _record(c, masks, patterns, norms, success, epochs_run, costs, index=float(index[c]),
                            flagged=c in flagged)
                    for c in wanted
                ],
                seconds=0.0,
            )  # fmt: skip
        result = NeuralCleanseResult(
            classes=wanted, masks=masks, patterns=patterns, norms=norms, attack_success=success,
            anomaly_index=index, flagged=flagged, median=median, mad=mad, epochs=epochs_run, costs=costs,
            threshold=a_thr, config=cfg,
        )  # fmt: skip
        return run.finish(result, started=started)


def _record(
    c: int,
    masks: Tensor,
    patterns: Tensor,
    norms: Tensor,
    success: Tensor,
    epochs_run: list[int],
    costs: list[float],
    *,
    index: float | None = None,
    flagged: bool = False,
    seconds: float = 0.0,
) -> SampleRecord:
    extra: dict[str, Any] = {
        "mask_l1": float(norms[c]), "attack_success": float(success[c]), "epochs": epochs_run[c], "cost": costs[c],
        "mask": masks[c].reshape(-1).tolist(), "pattern": patterns[c].reshape(-1).tolist(),
    }  # fmt: skip
    if index is not None:
        extra["anomaly_index"] = index
        extra["score"] = index
    return SampleRecord(
        index=c, threat=_THREAT, label=c, clean_pred=-1, status="falsified" if flagged else "unknown",
        attack="neural-cleanse", seconds=seconds, extra=extra,
    )  # fmt: skip


def _optimise(
    model: nn.Module,
    ds: Dataset,
    todo: list[int],
    *,
    run: Any,
    masks: Tensor,
    patterns: Tensor,
    norms: Tensor,
    success: Tensor,
    epochs_run: list[int],
    costs: list[float],
    mask_shape: tuple[int, ...],
    domain: tuple[float, float],
    cost0: float,
    lr: float,
    betas: tuple[float, float],
    bs: int,
    spe: int,
    n_epochs: int,
    thr: float,
    pat: int,
    mult: float,
    early_stop: bool,
    es_thr: float,
    es_pat: int,
    seed: int,
    progress: bool,
) -> None:
    """The batched optimisation of the classes in ``todo``; fills the result tensors and writes each finished class."""
    from tqdm.auto import tqdm

    device = model_device(model)
    k_all = ds.num_classes
    low, high = domain
    gen = torch.Generator().manual_seed(seed)
    # Random starts drawn for every class, so that a class's start does not depend on which classes still run.
    mask0 = torch.rand((k_all, *mask_shape), generator=gen)
    pattern0 = torch.rand((k_all, *ds.feature_shape), generator=gen)
    sel = torch.tensor(todo)
    mask_t = _to_tanh(mask0[sel]).to(device).requires_grad_(True)
    pattern_t = _to_tanh(pattern0[sel]).to(device).requires_grad_(True)
    opt = torch.optim.Adam([mask_t, pattern_t], lr=lr, betas=betas)
    targets_all = sel.to(device)
    a = len(todo)
    x_all = ds.x.to(device)
    steps = max(1, spe // bs)

    cost = np.zeros(a)
    cost_set = np.zeros(a, dtype=np.int64)
    up_count = np.zeros(a, dtype=np.int64)
    down_count = np.zeros(a, dtype=np.int64)
    up_flag = np.zeros(a, dtype=bool)
    down_flag = np.zeros(a, dtype=bool)
    es_count = np.zeros(a, dtype=np.int64)
    reg_best = np.full(a, math.inf)
    es_reg_best = np.full(a, math.inf)
    best_acc = np.full(a, math.nan)
    running = np.ones(a, dtype=bool)
    best_mask = torch.full((a, *mask_shape), math.nan)
    best_pattern = torch.full((a, *ds.feature_shape), math.nan)
    order = torch.randperm(len(ds), generator=gen)
    cursor = 0
    t_class = time.perf_counter()

    def finish(j: int, epoch: int, last_acc: float) -> None:
        c = todo[j]
        with torch.no_grad():
            if math.isinf(reg_best[j]):
                # No epoch reached the success threshold: keep the final trigger, as the reference does.
                best_mask[j] = _from_tanh(mask_t[j]).cpu()
                best_pattern[j] = (low + (high - low) * _from_tanh(pattern_t[j])).cpu()
                best_acc[j] = last_acc
        masks[c], patterns[c] = best_mask[j], best_pattern[j]
        norms[c] = float(best_mask[j].abs().sum())
        success[c] = float(best_acc[j])
        epochs_run[c], costs[c] = epoch + 1, float(cost[j])
        if run.store is not None:
            run.write(
                [_record(c, masks, patterns, norms, success, epochs_run, costs, seconds=time.perf_counter() - t_class)],
                seconds=0.0,
            )  # fmt: skip

    grads = [(w, w.requires_grad) for w in model.parameters()]
    for w, _ in grads:
        w.requires_grad_(False)  # the model is only read: no gradient is accumulated in its parameters
    bar = tqdm(range(n_epochs), desc="neural-cleanse", unit="epoch", disable=not progress, leave=False)
    try:
        with eval_mode(model):
            for epoch in bar:
                act = torch.from_numpy(np.nonzero(running)[0]).to(device)
                r = int(act.numel())
                cost_t = torch.as_tensor(cost, dtype=torch.float32, device=device)[act]
                ce_sum = torch.zeros(r, device=device)
                reg_sum = torch.zeros(r, device=device)
                hit_sum = torch.zeros(r, device=device)
                seen = 0
                for _ in range(steps):
                    if cursor + bs > len(order):
                        order, cursor = torch.randperm(len(ds), generator=gen), 0
                    xb = x_all[order[cursor : cursor + bs].to(device)]
                    cursor += bs
                    b = xb.shape[0]
                    m = _from_tanh(mask_t[act])
                    pattern_now = low + (high - low) * _from_tanh(pattern_t[act])
                    stamped = (1 - m)[:, None] * xb[None] + (m * pattern_now)[:, None]
                    tgt = targets_all[act].repeat_interleave(b)
                    logits = model(stamped.reshape(r * b, *xb.shape[1:]))
                    ce = F.cross_entropy(logits, tgt, reduction="none").reshape(r, b)
                    reg = m.abs().reshape(r, -1).sum(dim=1)
                    loss = (ce.mean(dim=1) + cost_t * reg).sum()
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                    with torch.no_grad():
                        ce_sum += ce.sum(dim=1)
                        reg_sum += reg * b
                        hit_sum += (logits.argmax(dim=1) == tgt).reshape(r, b).float().sum(dim=1)
                    seen += b
                act_np = act.cpu().numpy()
                acc = (hit_sum / seen).cpu().numpy().astype(np.float64)
                reg_avg = (reg_sum / seen).cpu().numpy().astype(np.float64)
                with torch.no_grad():
                    cur_mask = _from_tanh(mask_t[act]).cpu()
                    cur_pattern = (low + (high - low) * _from_tanh(pattern_t[act])).cpu()
                for i, j in enumerate(act_np):
                    # best trigger: smallest mask among the successful epochs
                    if acc[i] >= thr and reg_avg[i] < reg_best[j]:
                        best_mask[j], best_pattern[j] = cur_mask[i], cur_pattern[i]
                        reg_best[j], best_acc[j] = reg_avg[i], acc[i]
                    stop = False
                    if early_stop:
                        if reg_best[j] < math.inf:
                            es_count[j] = es_count[j] + 1 if reg_best[j] >= es_thr * es_reg_best[j] else 0
                        es_reg_best[j] = min(reg_best[j], es_reg_best[j])
                        stop = bool(down_flag[j] and up_flag[j] and es_count[j] >= es_pat)
                    if stop or epoch == n_epochs - 1:
                        running[j] = False
                        finish(j, epoch, float(acc[i]))
                        continue
                    success_now = acc[i] >= thr
                    if cost[j] == 0 and success_now:
                        cost_set[j] += 1
                        if cost_set[j] >= pat:
                            cost[j] = cost0
                            up_count[j] = down_count[j] = 0
                            up_flag[j] = down_flag[j] = False
                    else:
                        cost_set[j] = 0
                    if success_now:
                        up_count[j] += 1
                        down_count[j] = 0
                    else:
                        up_count[j] = 0
                        down_count[j] += 1
                    if up_count[j] >= pat:
                        up_count[j] = 0
                        cost[j] *= mult
                        up_flag[j] = True
                    elif down_count[j] >= pat:
                        down_count[j] = 0
                        cost[j] /= mult**1.5
                        down_flag[j] = True
                bar.set_postfix({"running": int(running.sum())}, refresh=False)
                if not running.any():
                    break
    finally:
        bar.close()
        for w, flag in grads:
            w.requires_grad_(flag)


def unlearn(
    model: nn.Module,
    clean: Dataset,
    result: NeuralCleanseResult,
    *,
    classes: Sequence[int] | None = None,
    fraction: float = 0.2,
    epochs: int = 1,
    lr: float = 1e-3,
    batch_size: int = 32,
    seed: int = 0,
    progress: bool = False,
) -> nn.Module:
    """Remove a backdoor by unlearning its reversed trigger (Wang et al., S&P 2019, Section VI-C).

    A copy of ``model`` is fine-tuned (Adam, :func:`~bastion.defenses.training.train`) on ``clean`` in which a
    ``fraction`` (20 %) of the samples, chosen at random, carry the reversed trigger of a flagged class and keep
    their true label; with several flagged classes the stamped samples share them out in turn.

    Args:
        model: the backdoored model (left unchanged).
        clean: clean labelled data (the paper: 10 % of the training data).
        result: the :func:`neural_cleanse` result whose triggers to unlearn.
        classes: the classes whose triggers to unlearn; the flagged ones by default.
        fraction: fraction of ``clean`` stamped with a trigger (0.2).
        epochs: fine-tuning epochs (the paper: 1).
        lr: Adam learning rate.
        batch_size: samples per step.
        seed: seeds the choice of stamped samples and the shuffling.
        progress: show a progress bar.

    Returns:
        The fine-tuned copy, in eval mode.

    Raises:
        InputError: nothing to unlearn (no flagged class and no ``classes``), a class that was not analysed, bad
            arguments.
    """
    from bastion.defenses.training import train

    where = "unlearn"
    check_model(model, where)
    ds = check_data(clean, where, "clean")
    if not isinstance(result, NeuralCleanseResult):
        raise InputError(f"{where}: result must be a NeuralCleanseResult, got {type(result).__name__}")
    chosen = list(result.flagged) if classes is None else check_classes(classes, ds.num_classes, where)
    if not chosen:
        raise InputError(f"{where}: Neural Cleanse flagged no class; nothing to unlearn (pass classes=[...] to force)")
    missing = [c for c in chosen if c not in result.classes]
    if missing:
        raise InputError(f"{where}: class(es) {missing} were not analysed by Neural Cleanse")
    frac = check_fraction(fraction, "fraction", where, high=1.0)
    n_ep = check_positive_int(epochs, "epochs", where)
    step_lr = check_fraction(lr, "lr", where, high=float("inf"))
    bs = check_positive_int(batch_size, "batch_size", where)
    s = check_seed(seed, where)
    gen = torch.Generator().manual_seed(s)
    n_stamp = round(frac * len(ds))
    pick = torch.randperm(len(ds), generator=gen)[:n_stamp]
    x = ds.x.clone()
    for i, c in enumerate(chosen):
        rows = pick[i :: len(chosen)].to(x.device)
        if rows.numel():
            x[rows] = result.trigger(c)(x[rows]).clamp(*ds.domain)
    stamped = Dataset(x, ds.y.clone(), num_classes=ds.num_classes, name=f"{ds.name} (unlearning)", domain=ds.domain)
    repaired = copy.deepcopy(model)
    train(repaired, stamped, epochs=n_ep, batch_size=bs, lr=step_lr, seed=s, progress=progress)
    return repaired


# ----------------------------------------------------------------------------------------------- figures
def _check_result(result: object, where: str) -> NeuralCleanseResult:
    if not isinstance(result, NeuralCleanseResult):
        raise InputError(f"{where} needs a NeuralCleanseResult, got {type(result).__name__}")
    return result


def plot_triggers(result: NeuralCleanseResult, path: str | Path, *, columns: int = 10) -> Path:
    """The reversed trigger ``m ⊙ p`` of every analysed class, flagged classes framed in red.

    Args:
        result: a :func:`neural_cleanse` result.
        path: the figure file (format from the suffix).
        columns: panels per row.

    Returns:
        The path written.
    """
    res = _check_result(result, "plot_triggers")
    cols = check_positive_int(columns, "columns", "plot_triggers")
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    from bastion.report.plots import _save

    classes = res.classes
    cols = min(cols, len(classes))
    rows = math.ceil(len(classes) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(1.6 * cols, 1.9 * rows), squeeze=False)
    for ax in axes.reshape(-1):
        ax.axis("off")
    for ax, c in zip(axes.reshape(-1), classes):
        fused = (res.masks[c] * res.patterns[c]).numpy()
        if fused.ndim == 3 and fused.shape[0] in (1, 3):
            img = fused[0] if fused.shape[0] == 1 else np.transpose(fused, (1, 2, 0))
        else:
            img = fused.reshape(1, -1)
        lo, hi = float(np.nanmin(img)), float(np.nanmax(img))
        ax.imshow(np.clip((img - lo) / max(hi - lo, 1e-12), 0, 1), cmap="gray", interpolation="nearest")
        flag = c in res.flagged
        ax.set_title(f"{c}: L1 {float(res.norms[c]):.1f}", fontsize=8, color="red" if flag else "black")
        if flag:
            ax.axis("on")
            ax.set_xticks([])
            ax.set_yticks([])
            for spine in ax.spines.values():
                spine.set_edgecolor("red")
                spine.set_linewidth(2)
    fig.suptitle("Neural Cleanse: reversed triggers (mask × pattern)", fontsize=9)
    return _save(fig, path)


def plot_anomaly_indices(result: NeuralCleanseResult, path: str | Path) -> Path:
    """Bar chart of the anomaly index of every class (negative below the median norm), with the threshold 2.

    Args:
        result: a :func:`neural_cleanse` result.
        path: the figure file (format from the suffix).

    Returns:
        The path written.
    """
    res = _check_result(result, "plot_anomaly_indices")
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    from bastion.report.plots import _save

    classes = res.classes
    # Signed: the classes that matter (small norms) point up, as the threshold line does.
    values = [
        float(res.anomaly_index[c]) * (1.0 if float(res.norms[c]) < res.median else -1.0) for c in classes
    ]  # fmt: skip
    finite = [v for v in values if math.isfinite(v)]
    cap = max([abs(v) for v in finite] + [res.threshold]) * 1.2
    shown = [max(min(v, cap), -cap) for v in values]
    colours = ["tab:red" if c in res.flagged else "tab:blue" for c in classes]
    fig, ax = plt.subplots(figsize=(max(4.0, 0.5 * len(classes) + 1), 3.2))
    ax.bar([str(c) for c in classes], shown, color=colours)
    ax.axhline(res.threshold, color="red", linestyle="--", linewidth=1, label=f"threshold {res.threshold:g}")
    ax.axhline(0, color="black", linewidth=0.5)
    ax.set_xlabel("class")
    ax.set_ylabel("anomaly index (+ below median norm)")
    ax.set_title("Neural Cleanse: MAD anomaly index of the mask norms")
    ax.legend(fontsize=8)
    return _save(fig, path)
