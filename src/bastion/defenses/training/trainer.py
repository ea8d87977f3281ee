"""The training loop shared by every training objective.

An objective maps a model and a batch to a scalar loss; the loop owns batching, shuffling, the optimiser,
seeding and progress. Standard training is the objective ``StandardObjective`` (cross-entropy on clean inputs).
"""

from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from bastion.data import Dataset
from bastion.errors import InputError
from bastion.models.checks import check_logits, eval_mode, model_device


class Objective(Protocol):
    """A training loss: ``objective(model, x, y) -> scalar tensor`` (model in training mode)."""

    def __call__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor: ...


class StandardObjective:
    """Empirical risk minimisation: mean cross-entropy on the clean batch."""

    def __call__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(model(x), y)

    def __repr__(self) -> str:
        return "StandardObjective()"


def train(
    model: nn.Module,
    data: Dataset,
    *,
    epochs: int = 10,
    batch_size: int = 64,
    lr: float = 1e-3,
    weight_decay: float = 0.0,
    objective: Objective | None = None,
    seed: int = 0,
    progress: bool = True,
) -> list[float]:
    """Train ``model`` in place with Adam on ``data`` and return the mean training loss of each epoch.

    Args:
        model: the model to train (left in eval mode afterwards).
        data: training data.
        epochs: passes over the data.
        batch_size: samples per step.
        lr: Adam learning rate.
        weight_decay: Adam weight decay.
        objective: the loss; standard cross-entropy by default.
        seed: seeds the shuffling (and nothing global), so two runs with the same seed give the same model when
            the initial weights are the same.
        progress: show a tqdm progress bar over the epochs.
    """
    if int(epochs) < 1 or int(batch_size) < 1:
        raise InputError(f"epochs and batch_size must be >= 1, got epochs={epochs!r}, batch_size={batch_size!r}")
    if not lr > 0:
        raise InputError(f"lr must be > 0, got {lr!r}")
    objective = objective or StandardObjective()
    device = model_device(model)
    x_all, y_all = data.x.to(device), data.y.to(device)
    with torch.no_grad(), eval_mode(model):
        k = check_logits(model(x_all[:2]), min(2, len(data)))
    if k < data.num_classes:
        raise InputError(f"the model returns {k} logits but the data has {data.num_classes} classes")
    opt = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay)
    gen = torch.Generator().manual_seed(seed)
    history: list[float] = []
    model.train()
    for _ in tqdm(range(int(epochs)), desc="train", unit="epoch", disable=not progress, leave=False):
        order = torch.randperm(len(data), generator=gen).to(device)
        total, count = 0.0, 0
        for start in range(0, len(data), int(batch_size)):
            idx = order[start : start + int(batch_size)]
            loss = objective(model, x_all[idx], y_all[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += float(loss.detach()) * idx.numel()
            count += idx.numel()
        history.append(total / count)
    model.eval()
    return history


@torch.no_grad()
def accuracy(model: nn.Module, data: Dataset, *, batch_size: int = 1024) -> float:
    """Clean accuracy of ``model`` on ``data`` (model in eval mode during the computation)."""
    device = model_device(model)
    correct = 0
    with eval_mode(model):
        for _, xb, yb in data.batches(batch_size):
            correct += int((model(xb.to(device)).argmax(dim=1) == yb.to(device)).sum())
    return correct / max(1, len(data))
