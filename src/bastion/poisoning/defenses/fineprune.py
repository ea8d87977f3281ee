"""Fine-pruning: prune the channels clean inputs leave dormant, then fine-tune on clean data.

Liu, Dolan-Gavitt & Garg, "Fine-Pruning: Defending Against Backdooring Attacks on Deep Neural Networks", RAID 2018
(Sections 4-5).

A backdoor tends to live in neurons that clean inputs barely activate. The defender, who holds a small clean
validation set, ranks the channels of the network's *last convolutional layer* by their mean activation on clean
inputs and prunes them in increasing order, recording the clean accuracy after each; pruning stops before the
accuracy has dropped by more than ``max_drop`` (4 percentage points here, the paper's operating point for its
face-recognition network). The pruned network is then fine-tuned on the clean data, which recovers the accuracy
the pruning cost and further weakens a backdoor that pruning alone left (the paper's "pruning-aware" attacker).

Implementation: a channel's activation is the mean over clean inputs and positions of the ReLU of the layer's
output (of the following ``BatchNorm2d``'s output when one directly follows the convolution). A pruned channel has
its convolution filter and bias set to zero (and the following batch norm's weight and bias, so that its output is
exactly 0); during fine-tuning their gradients are masked, so the pruned channels stay at zero. The result holds
an ordinary ``nn.Module`` (no hooks, no pruning re-parametrisation), so it saves and exports as any model.
The model passed in is left unchanged.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from bastion.data import Dataset
from bastion.errors import InputError
from bastion.models.checks import eval_mode, model_device, model_fingerprint
from bastion.poisoning.base import attack_success_rate
from bastion.poisoning.defenses import (
    SCAN_KIND,
    TriggerLike,
    check_data,
    check_fraction,
    check_model,
    check_positive_int,
    check_seed,
    predictions,
)
from bastion.results import SampleRecord
from bastion.store import Store, resumable_run

__all__ = ["FinePruneResult", "fine_prune", "last_conv"]

_THREAT = "backdoor:fine-prune"


@dataclass
class FinePruneResult:
    """What fine-pruning did to a model.

    Attributes:
        model: the pruned and fine-tuned copy (in eval mode).
        layer: name of the pruned convolution.
        n_channels: its number of output channels.
        pruned: the pruned channels, in pruning order (increasing mean activation).
        mean_activation: mean clean activation of every channel (before pruning).
        accuracy_curve: validation accuracy after pruning 0, 1, 2, ... channels, up to the stopping point.
        clean_acc_before: test accuracy of the original model.
        clean_acc_pruned: after pruning, before fine-tuning.
        clean_acc_after: after fine-tuning.
        asr_before: attack success rate of the given trigger on the original model (None without a trigger).
        asr_pruned: after pruning.
        asr_after: after fine-tuning.
        config: the hyperparameters.
        run_id: id of the run in the store, or None.
        seconds: wall time.
    """

    model: nn.Module
    layer: str
    n_channels: int
    pruned: list[int]
    mean_activation: list[float]
    accuracy_curve: list[float]
    clean_acc_before: float
    clean_acc_pruned: float
    clean_acc_after: float
    asr_before: float | None = None
    asr_pruned: float | None = None
    asr_after: float | None = None
    config: dict[str, Any] = field(default_factory=dict)
    run_id: int | None = None
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        """JSON-able summary (the model itself is left out)."""
        return {
            "method": "fine-prune", "layer": self.layer, "n_channels": self.n_channels, "n_pruned": len(self.pruned),
            "pruned": self.pruned, "mean_activation": self.mean_activation, "accuracy_curve": self.accuracy_curve,
            "clean_acc_before": self.clean_acc_before, "clean_acc_pruned": self.clean_acc_pruned,
            "clean_acc_after": self.clean_acc_after, "asr_before": self.asr_before, "asr_pruned": self.asr_pruned,
            "asr_after": self.asr_after, "config": self.config, "run_id": self.run_id, "seconds": self.seconds,
        }  # fmt: skip

    def table(self) -> str:
        """Before / pruned / fine-tuned accuracy and attack success."""

        def pct(v: float | None) -> str:
            return "-" if v is None else f"{100 * v:.2f}%"

        return "\n".join(
            [
                "Fine-pruning (Liu, Dolan-Gavitt & Garg, RAID 2018)",
                f"layer              {self.layer} ({self.n_channels} channels)",
                f"pruned             {len(self.pruned)} channels",
                "                   before     pruned     fine-tuned",
                f"clean accuracy     {pct(self.clean_acc_before):>8}   {pct(self.clean_acc_pruned):>8}   "
                f"{pct(self.clean_acc_after):>8}",
                f"attack success     {pct(self.asr_before):>8}   {pct(self.asr_pruned):>8}   {pct(self.asr_after):>8}",
            ]
        )


def last_conv(model: nn.Module) -> str:
    """Name of the model's last ``nn.Conv2d`` (in module order).

    Raises:
        InputError: the model has no 2-D convolution.
    """
    name = None
    for n, m in model.named_modules():
        if isinstance(m, nn.Conv2d):
            name = n
    if name is None:
        raise InputError("fine_prune: the model has no nn.Conv2d layer to prune; fine-pruning needs a convolution")
    return name


def _follower_bn(model: nn.Module, conv_name: str, channels: int) -> nn.BatchNorm2d | None:
    """The BatchNorm2d that comes right after the convolution in module order, if it normalises its channels."""
    names = [n for n, _ in model.named_modules()]
    modules = dict(model.named_modules())
    i = names.index(conv_name)
    if i + 1 < len(names):
        nxt = modules[names[i + 1]]
        if isinstance(nxt, nn.BatchNorm2d) and nxt.num_features == channels:
            return nxt
    return None


@torch.no_grad()
def _accuracy(model: nn.Module, data: Dataset, bs: int) -> float:
    return float((predictions(model, data.x, batch_size=bs).cpu() == data.y.cpu()).double().mean())


def fine_prune(
    model: nn.Module,
    clean: Dataset,
    *,
    validation: Dataset | None = None,
    test: Dataset | None = None,
    trigger: TriggerLike | None = None,
    target: int | None = None,
    layer: str | None = None,
    max_drop: float = 0.04,
    fine_tune_epochs: int = 10,
    lr: float = 1e-3,
    batch_size: int = 64,
    seed: int = 0,
    store: Store | str | Path | None = None,
    progress: bool = True,
    config: dict[str, Any] | None = None,
) -> FinePruneResult:
    """Prune the last convolution's dormant channels until clean accuracy drops by ``max_drop``, then fine-tune.

    Args:
        model: the possibly backdoored network (left unchanged; the result holds the repaired copy).
        clean: the defender's clean labelled data: channel activations and fine-tuning.
        validation: the data whose accuracy decides when to stop pruning; ``clean`` by default.
        test: the data on which accuracy (and, with a trigger, the attack success) is reported; ``validation`` by
            default.
        trigger: the backdoor's trigger (a callable or an object with ``apply``), to report its success rate.
        target: the backdoor's target class (with ``trigger``).
        layer: name of the ``nn.Conv2d`` to prune; the last one by default.
        max_drop: largest tolerated drop of validation accuracy, as a fraction (0.04 = 4 points).
        fine_tune_epochs: epochs of fine-tuning on ``clean`` (0 skips it).
        lr: Adam learning rate of the fine-tuning.
        batch_size: samples per forward pass and per fine-tuning step.
        seed: seeds the fine-tuning's shuffling.
        store: a result store: one record per channel of the layer (status ``"falsified"`` for a pruned one).
        progress: show a progress bar while fine-tuning.
        config: extra information stored with the run.

    Returns:
        A :class:`FinePruneResult`.

    Raises:
        InputError: no convolution (or ``layer`` is not one), a trigger without a target, bad arguments.
    """
    from bastion.defenses.training import train

    where = "fine_prune"
    started = time.perf_counter()
    check_model(model, where)
    ds = check_data(clean, where, "clean")
    val = ds if validation is None else check_data(validation, where, "validation")
    tst = val if test is None else check_data(test, where, "test")
    for name, other in (("validation", val), ("test", tst)):
        if other.feature_shape != ds.feature_shape:
            raise InputError(f"{where}: {name} has samples of shape {other.feature_shape}, clean {ds.feature_shape}")
    if (trigger is None) != (target is None):
        raise InputError(f"{where}: give both trigger= and target= to measure the attack success, or neither")
    drop = check_fraction(max_drop, "max_drop", where, low_open=False, high=1.0)
    if isinstance(fine_tune_epochs, bool) or not isinstance(fine_tune_epochs, int) or fine_tune_epochs < 0:
        raise InputError(f"{where}: fine_tune_epochs must be an integer >= 0, got {fine_tune_epochs!r}")
    step_lr = check_fraction(lr, "lr", where, high=float("inf"))
    bs = check_positive_int(batch_size, "batch_size", where)
    s = check_seed(seed, where)
    modules = dict(model.named_modules())
    name = last_conv(model) if layer is None else layer
    if name not in modules or not isinstance(modules[name], nn.Conv2d):
        convs = [n for n, m in modules.items() if isinstance(m, nn.Conv2d)]
        raise InputError(f"{where}: layer {layer!r} is not an nn.Conv2d of the model; convolutions: {convs}")

    def asr(m: nn.Module) -> float | None:
        return None if trigger is None else attack_success_rate(m, tst, trigger, int(target), batch_size=bs)  # type: ignore[arg-type]

    acc_before, asr_before = _accuracy(model, tst, bs), asr(model)
    repaired = copy.deepcopy(model)
    conv = dict(repaired.named_modules())[name]
    assert isinstance(conv, nn.Conv2d)
    n_ch = conv.out_channels
    bn = _follower_bn(repaired, name, n_ch)
    watched: nn.Module = bn if bn is not None else conv
    device = model_device(repaired)

    # Mean clean activation per channel (ReLU of the layer's, or its batch norm's, output).
    sums = torch.zeros(n_ch, dtype=torch.float64, device=device)
    count = 0

    def record(module: nn.Module, inputs: Any, output: Tensor) -> None:
        nonlocal count
        sums.add_(output.detach().clamp(min=0).double().sum(dim=(0, 2, 3)))
        count += output.shape[0] * output.shape[2] * output.shape[3]

    handle = watched.register_forward_hook(record)
    try:
        predictions(repaired, ds.x, batch_size=bs)
    finally:
        handle.remove()
    mean_act = (sums / max(count, 1)).cpu()
    order = torch.argsort(mean_act, stable=True).tolist()

    # Prune one more channel at a time (a channel mask on the layer's output) and watch the validation accuracy.
    keep = torch.ones(n_ch, device=device)

    def mask_output(module: nn.Module, inputs: Any, output: Tensor) -> Tensor:
        return output * keep.to(output.dtype)[None, :, None, None]

    base = _accuracy(repaired, val, bs)
    curve = [base]
    n_pruned = 0
    handle = watched.register_forward_hook(mask_output)
    try:
        with eval_mode(repaired):
            for c in order[:-1]:  # never every channel: the layer would carry nothing at all
                keep[c] = 0.0
                acc = _accuracy(repaired, val, bs)
                if acc < base - drop:
                    keep[c] = 1.0
                    break
                curve.append(acc)
                n_pruned += 1
    finally:
        handle.remove()
    pruned = order[:n_pruned]

    # Bake the pruning into the weights, and keep it there while fine-tuning by masking the gradients.
    params = [p for p in (conv.weight, conv.bias) if p is not None]
    if bn is not None:
        params += [p for p in (bn.weight, bn.bias) if p is not None]
    alive = torch.ones(n_ch, device=device)
    alive[pruned] = 0.0

    def zero_pruned() -> None:
        with torch.no_grad():
            for p in params:
                p.mul_(alive.reshape(-1, *([1] * (p.ndim - 1))).to(p.dtype))

    zero_pruned()
    acc_pruned, asr_pruned = _accuracy(repaired, tst, bs), asr(repaired)
    if fine_tune_epochs > 0:
        hooks = [
            p.register_hook(lambda g, p=p: g * alive.reshape(-1, *([1] * (p.ndim - 1))).to(g.dtype)) for p in params
        ]
        try:
            train(repaired, ds, epochs=fine_tune_epochs, batch_size=bs, lr=step_lr, seed=s, progress=progress)
        finally:
            for h in hooks:
                h.remove()
        zero_pruned()  # Adam with zero gradients leaves zeros at zero; this guards against any weight decay
    repaired.eval()
    acc_after, asr_after = _accuracy(repaired, tst, bs), asr(repaired)

    cfg = {
        "layer": name, "max_drop": drop, "fine_tune_epochs": fine_tune_epochs, "lr": step_lr, "batch_size": bs,
        "seed": s, "target": None if target is None else int(target),
    }  # fmt: skip
    result = FinePruneResult(
        model=repaired, layer=name, n_channels=n_ch, pruned=pruned, mean_activation=mean_act.tolist(),
        accuracy_curve=curve, clean_acc_before=acc_before, clean_acc_pruned=acc_pruned, clean_acc_after=acc_after,
        asr_before=asr_before, asr_pruned=asr_pruned, asr_after=asr_after, config=cfg,
    )  # fmt: skip

    def fingerprints() -> tuple[str, str]:
        return model_fingerprint(model), ds.fingerprint()

    with resumable_run(
        store, kind=SCAN_KIND, payload={"method": "fine-prune", **cfg}, fingerprints=fingerprints, n_samples=n_ch,
        threats=[_THREAT], config=config,
    ) as run:  # fmt: skip
        rank = {c: r for r, c in enumerate(order)}
        is_pruned = set(pruned)
        rows = [
            SampleRecord(
                index=c, threat=_THREAT, label=-1, clean_pred=-1, status="falsified" if c in is_pruned else "unknown",
                attack="fine-prune",
                extra={"score": -float(mean_act[c]), "mean_activation": float(mean_act[c]), "rank": rank[c],
                       "pruned": c in is_pruned},
            )
            for c in run.todo(n_ch)
        ]  # fmt: skip
        if rows:
            run.write(rows, seconds=time.perf_counter() - started)
        return run.finish(result, started=started)
