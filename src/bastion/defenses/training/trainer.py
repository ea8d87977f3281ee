"""The training loops shared by every training objective.

An objective maps a model and a batch to a scalar loss; the loop owns batching, shuffling, the optimiser, the
learning-rate schedule, seeding, progress, validation, checkpoints, the result store and data parallelism.
Standard training is the objective :class:`StandardObjective` (cross-entropy on clean inputs).

Two entry points:

* :func:`train` — the small loop (Adam, no checkpoints) used by demos and tests to get a model quickly.
* :class:`AdversarialTrainer` — the full loop for adversarial training (Madry et al., ICLR 2018) and its variants:
  SGD or Adam, piecewise/cosine/cyclic learning rates, replayed minibatches (Free-AT), an unlabelled stream
  (semi-supervised objectives), per-epoch validation under PGD with the robust-overfitting guard of Rice, Wong &
  Kolter ("Overfitting in adversarially robust deep learning", ICML 2020: keep the checkpoint of best PGD
  validation accuracy), checkpoints every epoch with bit-identical resume after a kill, per-epoch metrics in the
  result store, and multi-process data-parallel training (``torchrun`` / DDP).

The objective protocol
----------------------
``objective(model, x, y) -> scalar loss``, called with the model in train mode (the model may be wrapped in
``DistributedDataParallel``; :func:`unwrap` gives the module). Optional attributes the trainer honours:

* ``uses_unlabelled: bool`` (default False): the trainer passes ``unlabelled=<tensor batch or None>`` as a keyword.
* ``replays: int`` (default 1): each minibatch is trained on ``replays`` times in a row (Free-AT). The trainer makes
  ``ceil(epochs / replays)`` passes over the data, so that the number of optimiser steps matches ``epochs`` ordinary
  epochs, as Shafahi et al. (NeurIPS 2019) do.
* ``state_dict()`` / ``load_state_dict(state)``: objective state (a carried perturbation, a discriminator) saved in
  checkpoints with the model.
* ``epoch_start(epoch: int, epochs: int)``: called before each pass (ramps of eps or of a weight).
* ``step_start(step: int, total_steps: int)``: called before each optimiser step with the global step counter
  (0-based; every replay of a Free-AT minibatch is a step) and the run's planned number of steps,
  ``passes · ceil(n / batch_size) · replays``. The counter is checkpointed, so a resumed run sees exactly the steps
  an uninterrupted one would, and every DDP rank sees the same step. Per-step ramps (certified training) use it.
* ``step_end(model)``: called after each optimiser step with the (unwrapped) model, for updates of the weights that
  are not gradient steps (the Parseval retraction of :class:`~bastion.defenses.regularizers.Regularized`).
* ``extra_parameters()``: parameters the objective optimises itself; the trainer's optimiser leaves them alone.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from bastion.data import Dataset
from bastion.defenses.training.inner import pgd_perturb
from bastion.errors import InputError
from bastion.models.checks import check_logits, eval_mode, model_device, model_fingerprint
from bastion.threat import LpBall, pgd_step_size

__all__ = [
    "OPTIMIZERS",
    "SCHEDULES",
    "AdversarialTrainer",
    "EpochMetrics",
    "Objective",
    "StandardObjective",
    "TrainingResult",
    "accuracy",
    "lr_factor",
    "train",
]

OPTIMIZERS: tuple[str, ...] = ("sgd", "adam")
SCHEDULES: tuple[str, ...] = ("constant", "multistep", "cosine", "cyclic")

_CHECKPOINT_FORMAT = "bastion-train-checkpoint"
_CHECKPOINT_VERSION = 1


class Objective(Protocol):
    """A training loss: ``objective(model, x, y) -> scalar tensor`` (model in training mode).

    See the module docstring for the optional attributes (``uses_unlabelled``, ``replays``, ``state_dict``,
    ``load_state_dict``, ``epoch_start``, ``step_start``, ``extra_parameters``) that :class:`AdversarialTrainer`
    honours: ``epoch_start(epoch, epochs)`` before each pass, ``step_start(step, total_steps)`` before each
    optimiser step.
    """

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

    The quick loop for demos and tests; :class:`AdversarialTrainer` is the full one.

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


# ----------------------------------------------------------------------------------------------- schedules
def lr_factor(
    schedule: str,
    step: int,
    total_steps: int,
    epoch: int,
    epochs: int,
    *,
    milestones: Sequence[float] = (0.5, 0.75),
    gamma: float = 0.1,
    cycle_peak: float = 0.4,
) -> float:
    """Multiplier of the base learning rate at optimiser step ``step`` (0-based) of ``total_steps``.

    * ``constant``: 1.
    * ``multistep``: ``gamma`` to the number of milestones passed, milestones given as fractions of the epochs and
      applied at epoch boundaries (the piecewise decay of Madry et al. and Rice et al.: x0.1 at 50 % and 75 %).
    * ``cosine``: ``(1 + cos(pi·t)) / 2`` with ``t = step / total_steps`` (annealed per step).
    * ``cyclic``: the one-cycle triangle of Wong, Rice & Kolter (ICLR 2020): linear from 0 up to 1 at ``cycle_peak``
      of training, then linearly down to 0 at the end (per step). The first step uses the value after one step,
      so no step is wasted at learning rate 0.
    """
    t = step / max(1, total_steps)
    if schedule == "constant":
        return 1.0
    if schedule == "multistep":
        passed = sum(1 for m in milestones if epoch >= m * epochs)
        return float(gamma**passed)
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * t))
    if schedule == "cyclic":
        t = (step + 1) / max(1, total_steps)
        return t / cycle_peak if t <= cycle_peak else max(0.0, (1.0 - t) / (1.0 - cycle_peak))
    raise InputError(f"schedule must be one of {', '.join(SCHEDULES)}, got {schedule!r}")


# ----------------------------------------------------------------------------------------------- results
@dataclass
class EpochMetrics:
    """What one pass over the training data measured.

    Attributes:
        epoch: pass number (0-based).
        loss: mean objective value over the pass (over every replay, for replayed objectives).
        train_acc: clean accuracy on the training batches, measured in eval mode just before each step.
        lr: learning rate at the last step of the pass.
        seconds: wall time of the pass (validation included).
        val_clean_acc: clean accuracy on the validation data, or ``None`` without validation.
        val_robust_acc: accuracy under the trainer's PGD on the validation data, or ``None``.
    """

    epoch: int
    loss: float
    train_acc: float
    lr: float
    seconds: float
    val_clean_acc: float | None = None
    val_robust_acc: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class TrainingResult:
    """The outcome of :meth:`AdversarialTrainer.fit`.

    Attributes:
        history: one :class:`EpochMetrics` per pass, the passes before a resume included.
        passes: number of passes over the data (``ceil(epochs / replays)``).
        best_epoch: pass with the best validation robust accuracy (``None`` without validation).
        best_robust_acc: that accuracy.
        restored_best: the model's weights were reset to the best pass at the end.
        resumed_from: number of passes read from the checkpoint (0 for a fresh run).
        run_id: id of the training run in the store, or ``None``.
        world_size: number of data-parallel processes.
    """

    history: list[EpochMetrics] = field(default_factory=list)
    passes: int = 0
    best_epoch: int | None = None
    best_robust_acc: float | None = None
    restored_best: bool = False
    resumed_from: int = 0
    run_id: int | None = None
    world_size: int = 1

    @property
    def losses(self) -> list[float]:
        return [m.loss for m in self.history]


# ----------------------------------------------------------------------------------------------- distribution
def _env_world_size() -> int:
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        return 1


@contextmanager
def _distributed(device: torch.device, mode: str) -> Iterator[tuple[int, int]]:
    """``(rank, world_size)`` of the data-parallel group, initialising it from torchrun's variables if needed.

    A group initialised here is destroyed on exit; one initialised by the caller (e.g. ``mp.spawn``) is left.
    """
    if mode == "off":
        yield 0, 1
        return
    created = False
    if not (dist.is_available() and dist.is_initialized()):
        if _env_world_size() <= 1 or "RANK" not in os.environ:
            if mode == "on":
                raise InputError(
                    "distributed='on' but no process group exists and the torchrun variables (RANK, WORLD_SIZE) "
                    "are not set; launch with torchrun --nproc-per-node N or initialise torch.distributed first"
                )
            yield 0, 1
            return
        if device.type == "cuda":
            torch.cuda.set_device(device)  # NCCL collectives run on the current device: make it the model's
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
        created = True
    try:
        yield dist.get_rank(), dist.get_world_size()
    finally:
        if created:
            dist.destroy_process_group()


def _all_sum(values: list[float], world: int, device: torch.device) -> list[float]:
    if world == 1:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return [float(v) for v in t.tolist()]


# ----------------------------------------------------------------------------------------------- the trainer
class AdversarialTrainer:
    """Train a model against an objective, with validation under PGD, checkpoints, resume, store and DDP.

    Args:
        objective: the training loss (an object following :class:`Objective`), e.g. ``PGDAT(LpBall("linf", 0.3))``;
            standard training by default.
        threat: threat model of the validation PGD (the robust-overfitting guard); by default the objective's
            ``threat`` attribute if it has one.
        epochs: training budget in epochs. Objectives with ``replays = m`` get ``ceil(epochs / m)`` passes.
        batch_size: global batch size (split among the processes under DDP).
        optimizer: ``"sgd"`` (momentum, optional Nesterov) or ``"adam"``.
        lr: base (peak, for ``cyclic``) learning rate.
        momentum: SGD momentum.
        nesterov: Nesterov momentum for SGD.
        weight_decay: L2 weight decay of the optimiser.
        schedule: ``"constant"``, ``"multistep"``, ``"cosine"`` or ``"cyclic"`` (see :func:`lr_factor`).
        milestones: fractions of the passes where ``multistep`` multiplies the rate by ``gamma``.
        gamma: the ``multistep`` factor.
        cycle_peak: fraction of training where the ``cyclic`` rate peaks.
        seed: seeds the shuffling and (inside the run only; the caller's generator state is restored afterwards)
            PyTorch's global generator that objectives draw their random starts from. With the same initial
            weights and seed, two runs give identical models.
        validation: data to validate on after each pass (clean and PGD accuracy), or ``None``.
        val_steps: PGD steps of the validation attack (random start, the step of :func:`bastion.threat.pgd_step_size`).
        restore_best: at the end, reset the weights to the pass of best validation robust accuracy (Rice et al.).
        checkpoint: file to write after every pass (atomically); ``None`` for none.
        resume: continue from ``checkpoint`` if it exists (the configuration must match).
        store: a :class:`~bastion.store.Store` or a path; the run and its per-epoch metrics are written there.
        unlabelled: extra unlabelled inputs (a Dataset, whose labels are ignored, or a tensor) for objectives with
            ``uses_unlabelled``; drawn in their own shuffled stream, ``unlabelled_batch_size`` per step.
        unlabelled_batch_size: unlabelled samples per step (default ``batch_size``).
        distributed: ``"auto"`` (data-parallel when launched by torchrun or inside an initialised process group),
            ``"on"`` (require it) or ``"off"``.
        progress: show a tqdm progress bar (rank 0 only).
        on_epoch_end: called with each pass's :class:`EpochMetrics` after its checkpoint is written.
        metadata: JSON-compatible facts stored with the run's configuration (e.g. the architecture and data spec
            of a command-line run); they do not enter the run key or the resume check.
    """

    def __init__(
        self,
        objective: Objective | None = None,
        *,
        threat: LpBall | None = None,
        epochs: int = 10,
        batch_size: int = 128,
        optimizer: str = "sgd",
        lr: float = 0.1,
        momentum: float = 0.9,
        nesterov: bool = False,
        weight_decay: float = 0.0,
        schedule: str = "constant",
        milestones: Sequence[float] = (0.5, 0.75),
        gamma: float = 0.1,
        cycle_peak: float = 0.4,
        seed: int = 0,
        validation: Dataset | None = None,
        val_steps: int = 10,
        restore_best: bool = False,
        checkpoint: str | os.PathLike[str] | None = None,
        resume: bool = False,
        store: Any = None,
        unlabelled: Dataset | torch.Tensor | None = None,
        unlabelled_batch_size: int | None = None,
        distributed: str = "auto",
        progress: bool = True,
        on_epoch_end: Callable[[EpochMetrics], None] | None = None,
        metadata: dict[str, Any] | None = None,
    ) -> None:
        self.objective: Objective = objective if objective is not None else StandardObjective()
        if not callable(self.objective):
            raise InputError(f"objective must be callable as objective(model, x, y), got {objective!r}")
        if threat is None and isinstance(getattr(self.objective, "threat", None), LpBall):
            threat = self.objective.threat  # type: ignore[attr-defined]
        if threat is not None and not isinstance(threat, LpBall):
            raise InputError(f"threat must be an LpBall, got {threat!r}")
        self.threat = threat
        self.epochs = _positive_int("epochs", epochs)
        self.batch_size = _positive_int("batch_size", batch_size)
        if optimizer not in OPTIMIZERS:
            raise InputError(f"optimizer must be one of {', '.join(OPTIMIZERS)}, got {optimizer!r}")
        self.optimizer = optimizer
        self.lr = _positive_float("lr", lr)
        self.momentum = _nonneg_float("momentum", momentum)
        self.nesterov = bool(nesterov)
        if self.nesterov and (optimizer != "sgd" or self.momentum == 0):
            raise InputError("nesterov needs optimizer='sgd' with momentum > 0")
        self.weight_decay = _nonneg_float("weight_decay", weight_decay)
        if schedule not in SCHEDULES:
            raise InputError(f"schedule must be one of {', '.join(SCHEDULES)}, got {schedule!r}")
        self.schedule = schedule
        self.milestones = tuple(float(m) for m in milestones)
        if any(not 0 < m < 1 for m in self.milestones):
            raise InputError(f"milestones are fractions of training in (0, 1), got {tuple(milestones)!r}")
        self.gamma = _positive_float("gamma", gamma)
        if not 0 < cycle_peak < 1:
            raise InputError(f"cycle_peak must be in (0, 1), got {cycle_peak!r}")
        self.cycle_peak = float(cycle_peak)
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise InputError(f"seed must be an integer, got {seed!r}")
        self.seed = seed
        if validation is not None and not isinstance(validation, Dataset):
            raise InputError(f"validation must be a bastion Dataset, got {type(validation).__name__}")
        self.validation = validation
        self.val_steps = _positive_int("val_steps", val_steps)
        if validation is not None and self.threat is None:
            raise InputError("validation under PGD needs a threat model: pass threat=LpBall(...)")
        self.restore_best = bool(restore_best)
        if self.restore_best and validation is None:
            raise InputError("restore_best needs validation data (the best pass is the best validation robust one)")
        self.checkpoint = None if checkpoint is None else Path(checkpoint).expanduser()
        if self.checkpoint is not None and not self.checkpoint.resolve().parent.is_dir():
            raise InputError(f"the checkpoint directory {self.checkpoint.resolve().parent} does not exist")
        self.resume = bool(resume)
        if self.resume and self.checkpoint is None:
            raise InputError("resume=True needs a checkpoint path")
        self.store = store
        self.unlabelled = _unlabelled_tensor(unlabelled)
        self.unlabelled_batch_size = (
            self.batch_size
            if unlabelled_batch_size is None
            else _positive_int("unlabelled_batch_size", unlabelled_batch_size)
        )
        if distributed not in ("auto", "on", "off"):
            raise InputError(f"distributed must be 'auto', 'on' or 'off', got {distributed!r}")
        self.distributed = distributed
        self.progress = bool(progress)
        self.on_epoch_end = on_epoch_end
        if metadata is not None and not isinstance(metadata, dict):
            raise InputError(f"metadata must be a dict, got {type(metadata).__name__}")
        self.metadata = dict(metadata or {})
        self.replays = _positive_int("objective.replays", getattr(self.objective, "replays", 1))
        self.passes = math.ceil(self.epochs / self.replays)

    # -- configuration ------------------------------------------------------------------------------------------
    def config(self) -> dict[str, Any]:
        """The settings that define the run (JSON-compatible): checked on resume and stored with the run."""
        return {
            "objective": repr(self.objective),
            "threat": None if self.threat is None else self.threat.key,
            "epochs": self.epochs,
            "passes": self.passes,
            "replays": self.replays,
            "batch_size": self.batch_size,
            "optimizer": self.optimizer,
            "lr": self.lr,
            "momentum": self.momentum,
            "nesterov": self.nesterov,
            "weight_decay": self.weight_decay,
            "schedule": self.schedule,
            "milestones": list(self.milestones),
            "gamma": self.gamma,
            "cycle_peak": self.cycle_peak,
            "seed": self.seed,
            "val_steps": self.val_steps if self.validation is not None else None,
            "validation": None if self.validation is None else self.validation.fingerprint(),
            "unlabelled": None if self.unlabelled is None else int(self.unlabelled.shape[0]),
            "unlabelled_batch_size": self.unlabelled_batch_size if self.unlabelled is not None else None,
        }

    def __repr__(self) -> str:
        return f"AdversarialTrainer(objective={self.objective!r}, epochs={self.epochs}, batch_size={self.batch_size})"

    # -- the loop -----------------------------------------------------------------------------------------------
    def fit(self, model: nn.Module, data: Dataset) -> TrainingResult:
        """Train ``model`` in place on ``data`` and return the history (the model is left in eval mode).

        Raises:
            InputError: bad data, a model whose outputs do not match the data, or a checkpoint from another run.
        """
        if not isinstance(model, nn.Module):
            raise InputError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if not isinstance(data, Dataset):
            raise InputError(f"data must be a bastion Dataset, got {type(data).__name__}")
        if len(data) == 0:
            raise InputError("the training data set is empty")
        for who, threat in (("trainer", self.threat), ("objective", getattr(self.objective, "threat", None))):
            domain = getattr(threat, "domain", None)
            if domain is not None and tuple(domain) != tuple(data.domain):
                raise InputError(
                    f"the {who}'s threat model {threat!r} has the input domain {tuple(domain)} but the data's domain "
                    f"is {data.domain}; build it with LpBall(norm, eps, domain=data.domain)"
                )
        device = model_device(model)
        with torch.no_grad(), eval_mode(model):
            k = check_logits(model(data.x[:2].to(device)), min(2, len(data)))
        if k < data.num_classes:
            raise InputError(f"the model returns {k} logits but the data has {data.num_classes} classes")
        fork_devices = [device.index or 0] if device.type == "cuda" else []
        with _distributed(device, self.distributed) as (rank, world), torch.random.fork_rng(devices=fork_devices):
            if self.batch_size < world:
                raise InputError(f"batch_size {self.batch_size} is smaller than the {world} processes")
            try:
                return self._fit(model, data, device, rank, world)
            finally:
                if self._own_store is not None:
                    self._own_store.close()  # a store opened from a path is closed even when training fails
                    self._own_store = None

    def _fit(self, model: nn.Module, data: Dataset, device: torch.device, rank: int, world: int) -> TrainingResult:
        objective = self.objective
        extra = {id(p) for p in _call_or_empty(objective, "extra_parameters")}
        params = [p for p in model.parameters() if p.requires_grad and id(p) not in extra]
        if not params:
            raise InputError("the model has no trainable parameters")
        opt: torch.optim.Optimizer
        if self.optimizer == "sgd":
            opt = torch.optim.SGD(
                params, lr=self.lr, momentum=self.momentum, nesterov=self.nesterov, weight_decay=self.weight_decay
            )
        else:
            opt = torch.optim.Adam(params, lr=self.lr, weight_decay=self.weight_decay)
        # Different ranks draw different random starts; the shuffling generator is shared so that every rank
        # sees the same global batches.
        torch.manual_seed(self.seed + 7919 * rank)
        shuffle = torch.Generator().manual_seed(self.seed)
        unl_gen = torch.Generator().manual_seed(self.seed + 1)
        initial_fp = model_fingerprint(model)
        state: dict[str, Any] = {
            "pass": 0,
            "step": 0,
            "history": [],
            "best_epoch": None,
            "best_robust_acc": None,
            "best_state": None,
            "unl_order": None,
            "unl_pos": 0,
            "initial_fp": initial_fp,
        }
        resumed_from = 0
        if self.resume and self.checkpoint is not None and self.checkpoint.exists():
            state = self._load_checkpoint(model, opt, objective, shuffle, unl_gen, rank, world, device)
            resumed_from = int(state["pass"])
        history = [EpochMetrics(**h) for h in state["history"]]
        store, run_id = self._open_store(state["initial_fp"], data, rank, world)

        net: nn.Module = model
        if world > 1:
            from torch.nn.parallel import DistributedDataParallel

            net = DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)

        n = len(data)
        batches_per_pass = math.ceil(n / self.batch_size)
        total_steps = self.passes * batches_per_pass * self.replays
        uses_unlabelled = bool(getattr(objective, "uses_unlabelled", False))
        step_hook = getattr(objective, "step_start", None)
        step_hook = step_hook if callable(step_hook) else None
        end_hook = getattr(objective, "step_end", None)
        end_hook = end_hook if callable(end_hook) else None
        bar = tqdm(
            total=self.passes,
            initial=resumed_from,
            desc="train",
            unit="epoch",
            disable=not self.progress or rank != 0,
            leave=False,
        )
        try:
            for epoch in range(resumed_from, self.passes):
                started = time.perf_counter()
                hook = getattr(objective, "epoch_start", None)
                if callable(hook):
                    hook(epoch, self.passes)
                order = torch.randperm(n, generator=shuffle)
                sums = [0.0, 0.0, 0.0, 0.0]  # loss·count, correct, count (train acc), loss count
                model.train()
                lr = self.lr
                for start in range(0, n, self.batch_size):
                    if n - start < world:
                        break  # too few samples left to give every process one: drop them, as drop_last would
                    idx = order[start : start + self.batch_size][rank::world]
                    xb = data.x[idx].to(device, non_blocking=True)
                    yb = data.y[idx].to(device, non_blocking=True)
                    kwargs: dict[str, Any] = {}
                    if uses_unlabelled:
                        kwargs["unlabelled"] = self._unlabelled_batch(state, unl_gen, rank, world, device)
                    with torch.no_grad(), eval_mode(model):
                        sums[1] += float((model(xb).argmax(dim=1) == yb).sum())
                        sums[2] += yb.numel()
                    for _ in range(self.replays):
                        lr = self.lr * lr_factor(
                            self.schedule,
                            state["step"],
                            total_steps,
                            epoch,
                            self.passes,
                            milestones=self.milestones,
                            gamma=self.gamma,
                            cycle_peak=self.cycle_peak,
                        )
                        for group in opt.param_groups:
                            group["lr"] = lr
                        if step_hook is not None:
                            step_hook(state["step"], total_steps)
                        loss = objective(net, xb, yb, **kwargs)
                        if not isinstance(loss, torch.Tensor) or loss.dim() != 0:
                            raise InputError(f"the objective {objective!r} must return a scalar tensor loss")
                        if not bool(torch.isfinite(loss.detach())):
                            raise InputError(
                                f"the training loss became {float(loss.detach())} at pass {epoch}, "
                                f"step {state['step']}; lower the learning rate"
                            )
                        opt.zero_grad(set_to_none=True)
                        loss.backward()
                        opt.step()
                        if end_hook is not None:
                            end_hook(model)
                        state["step"] += 1
                        sums[0] += float(loss.detach()) * yb.numel()
                        sums[3] += yb.numel()
                loss_sum, correct, count, loss_count = _all_sum(sums, world, device)
                metrics = EpochMetrics(
                    epoch=epoch,
                    loss=loss_sum / max(1.0, loss_count),
                    train_acc=correct / max(1.0, count),
                    lr=lr,
                    seconds=0.0,
                )
                model.eval()
                if self.validation is not None:
                    # Every rank validates the same weights on the same data with the same random starts, so
                    # every rank takes the same best-epoch decision without communicating.
                    metrics.val_clean_acc, metrics.val_robust_acc = self._validate(model, device)
                    best = state["best_robust_acc"]
                    if best is None or metrics.val_robust_acc > best:
                        state["best_robust_acc"] = metrics.val_robust_acc
                        state["best_epoch"] = epoch
                        state["best_state"] = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
                metrics.seconds = time.perf_counter() - started
                history.append(metrics)
                state["pass"] = epoch + 1
                state["history"] = [h.to_dict() for h in history]
                # every rank's RNG and objective state (a Free-AT perturbation differs per rank), gathered so that
                # a resumed run continues each rank's streams exactly
                per_rank = (
                    _gather({"rng": _rng_states(), "objective": _call_or_none(objective, "state_dict")}, world)
                    if self.checkpoint is not None
                    else []
                )
                if rank == 0:
                    if self.checkpoint is not None:
                        self._save_checkpoint(model, opt, per_rank, shuffle, unl_gen, state, world)
                    if store is not None and run_id is not None:
                        store.write_epoch(run_id, epoch, metrics.to_dict(), seconds=metrics.seconds)
                if world > 1:
                    dist.barrier()  # no rank runs ahead of a checkpoint it might be killed before
                bar.update(1)
                bar.set_postfix(loss=f"{metrics.loss:.4f}", acc=f"{metrics.train_acc:.3f}")
                if self.on_epoch_end is not None:
                    self.on_epoch_end(metrics)
        finally:
            bar.close()
            model.eval()
        restored = False
        if self.restore_best and state["best_state"] is not None:
            model.load_state_dict(state["best_state"])
            restored = True
        result = TrainingResult(
            history=history,
            passes=self.passes,
            best_epoch=state["best_epoch"],
            best_robust_acc=state["best_robust_acc"],
            restored_best=restored,
            resumed_from=resumed_from,
            run_id=run_id,
            world_size=world,
        )
        if store is not None and run_id is not None:
            last = history[-1]
            store.finish_run(
                run_id,
                {
                    "passes": self.passes,
                    "loss": last.loss,
                    "train_acc": last.train_acc,
                    "val_clean_acc": last.val_clean_acc,
                    "val_robust_acc": last.val_robust_acc,
                    "best_epoch": result.best_epoch,
                    "best_robust_acc": result.best_robust_acc,
                    "restored_best": restored,
                    "final_model_fp": model_fingerprint(model),
                    "world_size": world,
                },
            )
        return result

    # -- pieces -------------------------------------------------------------------------------------------------
    def _unlabelled_batch(
        self, state: dict[str, Any], gen: torch.Generator, rank: int, world: int, device: torch.device
    ) -> torch.Tensor | None:
        """The next unlabelled batch of this rank, from a stream reshuffled whenever it runs out."""
        if self.unlabelled is None:
            return None
        m = int(self.unlabelled.shape[0])
        take = min(self.unlabelled_batch_size, m)
        if state["unl_order"] is None or state["unl_pos"] + take > m:
            state["unl_order"] = torch.randperm(m, generator=gen)
            state["unl_pos"] = 0
        idx = state["unl_order"][state["unl_pos"] : state["unl_pos"] + take][rank::world]
        state["unl_pos"] += take
        return self.unlabelled[idx].to(device, non_blocking=True)

    @torch.no_grad()
    def _validate(self, model: nn.Module, device: torch.device) -> tuple[float, float]:
        """Clean and PGD accuracy on the validation data (``val_steps`` steps of the library's PGD step)."""
        assert self.validation is not None and self.threat is not None
        gen = torch.Generator(device=device).manual_seed(self.seed + 104729)
        clean = robust = 0
        step = pgd_step_size(self.threat.eps, self.val_steps) if math.isfinite(self.threat.eps) else 0.1
        for _, xb, yb in self.validation.batches(max(self.batch_size, 256)):
            xb, yb = xb.to(device), yb.to(device)
            with eval_mode(model):
                ok = model(xb).argmax(dim=1) == yb
                x_adv = pgd_perturb(model, xb, yb, self.threat, steps=self.val_steps, step_size=step, generator=gen)
                ok_adv = ok & (model(x_adv).argmax(dim=1) == yb)
            clean += int(ok.sum())
            robust += int(ok_adv.sum())
        n = max(1, len(self.validation))
        return clean / n, robust / n

    _own_store: Any = None

    def _open_store(self, initial_fp: str, data: Dataset, rank: int, world: int) -> tuple[Any, int | None]:
        if self.store is None or rank != 0:
            return None, None
        from bastion.store import Store, run_key

        store = self.store
        if not isinstance(store, Store):
            store = Store(store)
            self._own_store = store
        config = {**self.config(), "world_size": world, "metadata": self.metadata}
        key = run_key({"kind": "train", "config": self.config(), "model_fp": initial_fp, "data_fp": data.fingerprint()})
        run, _ = store.open_run(
            kind="train", key=key, config=config, model_fp=initial_fp, data_fp=data.fingerprint(), n_samples=len(data)
        )
        return store, run.id

    def _save_checkpoint(
        self,
        model: nn.Module,
        opt: torch.optim.Optimizer,
        per_rank: list[dict[str, Any]],
        shuffle: torch.Generator,
        unl_gen: torch.Generator,
        state: dict[str, Any],
        world: int,
    ) -> None:
        assert self.checkpoint is not None
        payload = {
            "format": _CHECKPOINT_FORMAT,
            "version": _CHECKPOINT_VERSION,
            "config": {**self.config(), "world_size": world},
            "model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
            "optimizer": opt.state_dict(),
            "per_rank": per_rank,
            "shuffle_rng": shuffle.get_state(),
            "unlabelled_rng": unl_gen.get_state(),
            **{k: v for k, v in state.items()},
        }
        tmp = self.checkpoint.with_name(self.checkpoint.name + ".tmp")
        torch.save(payload, tmp)
        # os.replace is atomic: a kill leaves either the previous checkpoint or this one, never half a file.
        os.replace(tmp, self.checkpoint)

    def _load_checkpoint(
        self,
        model: nn.Module,
        opt: torch.optim.Optimizer,
        objective: Objective,
        shuffle: torch.Generator,
        unl_gen: torch.Generator,
        rank: int,
        world: int,
        device: torch.device,
    ) -> dict[str, Any]:
        assert self.checkpoint is not None
        try:
            payload = torch.load(self.checkpoint, map_location="cpu", weights_only=True)
        except Exception as exc:  # any unreadable file gets the same explanation
            raise InputError(f"cannot read the training checkpoint {self.checkpoint}: {exc}") from exc
        if not isinstance(payload, dict) or payload.get("format") != _CHECKPOINT_FORMAT:
            raise InputError(f"{self.checkpoint} is not a bastion training checkpoint")
        want = {**self.config(), "world_size": world}
        got = payload.get("config", {})
        diffs = [f"{k}: {got.get(k)!r} (checkpoint) vs {v!r} (now)" for k, v in want.items() if got.get(k) != v]
        if diffs:
            raise InputError(
                f"the checkpoint {self.checkpoint} belongs to another training run ({'; '.join(diffs)}); "
                "use another checkpoint path or the same settings"
            )
        model.load_state_dict(payload["model"])
        opt.load_state_dict(payload["optimizer"])
        mine = payload["per_rank"][rank]
        if mine.get("objective") is not None:
            loader = getattr(objective, "load_state_dict", None)
            if not callable(loader):
                raise InputError(f"the checkpoint holds objective state but {objective!r} has no load_state_dict")
            loader(mine["objective"])
        rng = mine["rng"]
        torch.set_rng_state(rng["cpu"])
        if device.type == "cuda" and rng.get("cuda") is not None:
            torch.cuda.set_rng_state(rng["cuda"], device)
        shuffle.set_state(payload["shuffle_rng"])
        unl_gen.set_state(payload["unlabelled_rng"])
        keys = ("pass", "step", "history", "best_epoch", "best_robust_acc", "best_state", "unl_order", "unl_pos")
        return {**{k: payload[k] for k in keys}, "initial_fp": payload["initial_fp"]}


# ----------------------------------------------------------------------------------------------- helpers
def _rng_states() -> dict[str, Any]:
    return {
        "cpu": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() and torch.cuda.is_initialized() else None,
    }


def _gather(obj: dict[str, Any], world: int) -> list[dict[str, Any]]:
    """``obj`` from every rank, in rank order (a list of one without distribution)."""
    if world == 1:
        return [obj]
    out: list[Any] = [None] * world
    dist.all_gather_object(out, obj)
    return out


def _call_or_none(obj: object, name: str) -> Any:
    fn = getattr(obj, name, None)
    return fn() if callable(fn) else None


def _call_or_empty(obj: object, name: str) -> Iterable[torch.Tensor]:
    fn = getattr(obj, name, None)
    return list(fn()) if callable(fn) else []


def _unlabelled_tensor(unlabelled: Dataset | torch.Tensor | None) -> torch.Tensor | None:
    if unlabelled is None:
        return None
    if isinstance(unlabelled, Dataset):
        return unlabelled.x
    if isinstance(unlabelled, torch.Tensor) and unlabelled.dtype.is_floating_point and unlabelled.dim() >= 2:
        if unlabelled.shape[0] == 0:
            raise InputError("the unlabelled data is empty")
        if not bool(torch.isfinite(unlabelled).all()):
            raise InputError("the unlabelled data contains NaN or Inf")
        return unlabelled
    raise InputError(
        f"unlabelled must be a Dataset or a floating-point tensor (N, ...), got {type(unlabelled).__name__}"
    )


def _positive_int(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise InputError(f"{name} must be an integer >= 1, got {value!r}")
    return value


def _positive_float(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (math.isfinite(value) and value > 0):
        raise InputError(f"{name} must be a finite number > 0, got {value!r}")
    return float(value)


def _nonneg_float(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (math.isfinite(value) and value >= 0):
        raise InputError(f"{name} must be a finite number >= 0, got {value!r}")
    return float(value)
