"""Adversarial reprogramming: repurpose a trained classifier for a new task with a learned input program.

White-box: Elsayed, Goodfellow & Sohl-Dickstein, "Adversarial Reprogramming of Neural Networks", ICLR 2019.
Black-box: Tsai, Chen & Ho, "Transfer Learning without Knowing: Reprogramming Black-box Machine Learning Models
with Scarce Data and Limited Resources" (BAR), ICML 2020.

The model ``f`` stays frozen. A new-task input ``x̃`` (smaller than ``f``'s input) is placed on a canvas of ``f``'s
input shape (at the centre by default) and the *program* fills the rest of the canvas (Elsayed et al., eq. 1)::

    X_adv = (1 - M) ⊙ X̃ + M ⊙ (lo + (hi - lo) · (tanh(W) + 1) / 2)

with ``W`` the program's parameters (the shape of ``f``'s input), ``M`` the mask (1 where the program is written, 0
over the new input) and ``[lo, hi]`` the input domain. This is the paper's ``X̃ + tanh(W ⊙ M)`` written for a
domain ``[lo, hi]`` instead of ``[-1, 1]``: ``X̃`` is zero wherever ``M`` is one, so the two agree up to that affine
change of range, and ``X_adv`` is always inside the domain (no clipping).

Output label mapping (many-to-one, as in BAR): new class ``t`` owns a group ``G_t`` of ``m`` source classes, and
its score is the mean source probability of its group, ``P(t | x̃) ∝ mean_{s ∈ G_t} softmax(f(X_adv))_s``;
Elsayed et al.'s one-to-one mapping is ``m = 1``. :class:`ReprogrammedModel` returns ``log P`` (normalised over
the new classes), so it is a classifier of the new task that every bastion tool accepts.

Training.

* :class:`WhiteBoxReprogramming` minimises ``CE(P(· | x̃), ỹ) + λ ||W||²`` with Adam (the paper's optimiser and
  its weight penalty λ on ``W``), the learning rate decayed by 0.96 every 2 epochs (defaults: lr 0.05, λ = 0.01;
  the paper tunes both per task, these are its ImageNet values as we read them).
* :class:`BAR` sees the model only through a :class:`~bastion.models.oracle.BlackBox` (scores, every query counted,
  budget enforced). It estimates the gradient of the same loss with respect to the ``d`` programmed entries of ``W``
  by the one-sided averaged random-direction estimator of BAR (eq. 4)::

      g = (b / q) Σ_{j=1..q} [(F(W + β U_j) - F(W)) / β] · U_j

  with ``U_j`` drawn uniformly from the unit sphere of R^d, smoothing ``β`` (default 0.01), ``q`` directions
  (default 25 here; the paper studies several values) and scaling ``b = d``. Each step costs ``(q + 1)`` queries per
  sample of the minibatch. BAR's paper optimises with an exponentially decayed step; this module feeds the
  estimate to Adam (the update direction the paper's default loss, focal or CE, does not depend on): a deviation,
  chosen because Adam's per-coordinate scaling makes the result insensitive to the estimator's ``b``. The loss
  is cross-entropy on the mapped probabilities (BAR's focal loss is not implemented).

Both report the new task's accuracy next to chance (the largest class share of the test set) and, through
:func:`scratch_baseline`, next to a model of the source's own architecture trained from scratch on the embedded
new-task inputs.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from bastion.attacks.base import positive_float, positive_int
from bastion.data import Dataset
from bastion.errors import InputError
from bastion.models.checks import check_logits, eval_mode, model_device, model_fingerprint
from bastion.models.oracle import BlackBox
from bastion.results import SampleRecord
from bastion.store import Store, resumable_run

__all__ = [
    "BAR",
    "Program",
    "ReprogramResult",
    "ReprogrammedModel",
    "WhiteBoxReprogramming",
    "chance_accuracy",
    "frequency_mapping",
    "label_mapping",
    "scratch_baseline",
]


# ----------------------------------------------------------------------------------------------- label mapping
def label_mapping(num_source: int, num_target: int, *, per_class: int | None = None, mapping: Any = None) -> Tensor:
    """The many-to-one output mapping as an int64 tensor (num_target, m): row ``t`` lists the source classes of ``t``.

    Args:
        num_source: number of classes of the source model.
        num_target: number of classes of the new task.
        per_class: ``m``, source classes per new class (default: ``num_source // num_target``, BAR's largest
            disjoint mapping); ignored when ``mapping`` is given.
        mapping: an explicit mapping, a (num_target, m) integer array or list of lists; rows must be disjoint.

    Raises:
        InputError: source classes out of ``[0, num_source)``, repeated, or a mapping of the wrong shape.
    """
    ks, kt = positive_int("num_source", num_source), positive_int("num_target", num_target)
    if kt < 2:
        raise InputError(f"the new task needs at least 2 classes, got {kt}")
    if mapping is None:
        m = ks // kt if per_class is None else positive_int("per_class", per_class)
        if m < 1 or m * kt > ks:
            raise InputError(
                f"cannot map {kt} new classes to {m if m else 0} distinct source classes each: the source model has "
                f"only {ks} classes; lower per_class or the number of new classes"
            )
        return torch.arange(kt * m).reshape(kt, m)
    try:
        t = torch.as_tensor(mapping)
    except (TypeError, ValueError, RuntimeError):
        raise InputError(f"mapping must be a (num_target, m) integer array, got {mapping!r}") from None
    if t.dtype.is_floating_point or t.dtype == torch.bool or t.dim() != 2 or t.shape[0] != kt or t.shape[1] < 1:
        raise InputError(
            f"mapping must be an integer array of shape ({kt}, m) (one row of source classes per new class), "
            f"got {t.dtype} of shape {tuple(t.shape)}"
        )
    t = t.long()
    if int(t.min()) < 0 or int(t.max()) >= ks:
        bad = int(t.min()) if int(t.min()) < 0 else int(t.max())
        raise InputError(f"mapping holds source class {bad}, outside the source model's {ks} classes [0, {ks})")
    if t.unique().numel() != t.numel():
        raise InputError("mapping must not use a source class twice (the groups of the new classes are disjoint)")
    return t


def frequency_mapping(
    scores: Any, data: Dataset, num_source: int, *, per_class: int | None = None, batch_size: int = 256
) -> Tensor:
    """A many-to-one mapping chosen from the source model's answers on the embedded training inputs.

    ``A[t, s]`` is the mean source probability of class ``s`` over the training inputs of new class ``t`` (with
    the initial program); pairs are taken greedily by decreasing ``A[t, s]``, each source class at most once,
    until every new class has ``m`` source classes. A deterministic, data-driven alternative to BAR's random
    assignment (the frequency-based mapping of later reprogramming work); it costs one pass over the training
    data (queries on an oracle).

    Args:
        scores: maps a batch of new-task inputs to the source model's scores (N, num_source).
        data: the new task's training data.
        num_source: classes of the source model.
        per_class: ``m`` (default ``num_source // num_classes``).
        batch_size: inputs per call of ``scores``.
    """
    kt = data.num_classes
    m = num_source // kt if per_class is None else positive_int("per_class", per_class)
    if m < 1 or m * kt > num_source:
        raise InputError(f"cannot map {kt} new classes to {m} distinct source classes each out of {num_source}")
    total = torch.zeros(kt, num_source, dtype=torch.float64)
    for _, xb, yb in data.batches(batch_size):
        probs = scores(xb).softmax(dim=1).double().cpu()
        total.index_add_(0, yb.cpu(), probs)
    share = total / data.class_counts().clamp_min(1).double()[:, None]
    rows: list[list[int]] = [[] for _ in range(kt)]
    used: set[int] = set()
    for flat in share.flatten().argsort(descending=True).tolist():
        t, s = divmod(flat, num_source)
        if s in used or len(rows[t]) >= m:
            continue
        rows[t].append(s)
        used.add(s)
        if len(used) == m * kt:
            break
    return torch.tensor(rows, dtype=torch.long)


def _mapped_log_probs(logits: Tensor, mapping: Tensor) -> Tensor:
    """``log P(t)`` over the new classes: mean source probability of each group, normalised (N, num_target)."""
    probs = logits.softmax(dim=1)
    group = probs[:, mapping.reshape(-1)].reshape(logits.shape[0], *mapping.shape).mean(dim=2)
    group = group.clamp_min(torch.finfo(group.dtype).tiny)
    return group.log() - group.sum(dim=1, keepdim=True).log()


# ----------------------------------------------------------------------------------------------- the program
class Program(nn.Module):
    """The adversarial program: a learned frame ``W`` written through a mask around an embedded new input.

    Args:
        source_shape: the source model's input shape (C, H, W) (or any shape; the new input is placed in its last
            two dimensions).
        task_shape: the new task's input shape (c, h, w), with ``h <= H``, ``w <= W`` and ``c`` equal to 1 or C
            (a one-channel input is repeated over the channels).
        offset: (top, left) of the new input on the canvas; default: centred.
        mask: where the program is written, a tensor of ``source_shape`` (or (H, W)) with values in [0, 1];
            default: 1 everywhere except over the new input (Elsayed et al.'s frame).
        domain: the source model's input domain.
        init: initial parameters ``W`` (default: zeros, the mid-grey program).

    Raises:
        InputError: the new input does not fit the model input, the mask has the wrong shape or range.
    """

    mask: Tensor

    def __init__(
        self,
        source_shape: Sequence[int],
        task_shape: Sequence[int],
        *,
        offset: tuple[int, int] | None = None,
        mask: Tensor | None = None,
        domain: tuple[float, float] = (0.0, 1.0),
        init: Tensor | None = None,
    ) -> None:
        super().__init__()
        src = _shape("source_shape", source_shape)
        task = _shape("task_shape", task_shape)
        if len(src) != 3 or len(task) != 3:
            raise InputError(
                f"reprogramming needs image shapes (C, H, W): got source {src} and task {task}; give the new "
                "task's inputs with a channel axis, e.g. (1, 4, 4)"
            )
        (c_s, h_s, w_s), (c_t, h_t, w_t) = src, task
        if h_t > h_s or w_t > w_s:
            raise InputError(
                f"the new task's inputs {task} do not fit the model input {src}: the program embeds them in the "
                f"model's {h_s}x{w_s} canvas, so they can be at most that large"
            )
        if c_t not in (1, c_s):
            raise InputError(f"the new task's inputs have {c_t} channels; the model takes {c_s} (give 1 or {c_s})")
        if offset is None:
            top, left = (h_s - h_t) // 2, (w_s - w_t) // 2
        else:
            try:
                top, left = (int(v) for v in offset)
            except (TypeError, ValueError):
                raise InputError(f"offset must be a pair (top, left) of ints, got {offset!r}") from None
        if not (0 <= top <= h_s - h_t and 0 <= left <= w_s - w_t):
            raise InputError(
                f"offset {(top, left)} puts the {h_t}x{w_t} new input outside the {h_s}x{w_s} canvas; "
                f"top must lie in [0, {h_s - h_t}] and left in [0, {w_s - w_t}]"
            )
        lo, hi = float(domain[0]), float(domain[1])
        if not (math.isfinite(lo) and math.isfinite(hi) and lo < hi):
            raise InputError(f"domain must be a pair (lo, hi) with lo < hi, got {domain!r}")
        if mask is None:
            m = torch.ones(src)
            m[:, top : top + h_t, left : left + w_t] = 0.0
        else:
            m = torch.as_tensor(mask, dtype=torch.float32)
            if tuple(m.shape) == (h_s, w_s):
                m = m.expand(src).clone()
            if tuple(m.shape) != src:
                raise InputError(
                    f"mask must have the model input's shape {src} or ({h_s}, {w_s}), got {tuple(m.shape)}"
                )
            if not bool(torch.isfinite(m).all()) or float(m.min()) < 0 or float(m.max()) > 1:
                raise InputError("mask values must lie in [0, 1]")
        if init is None:
            w0 = torch.zeros(src)
        else:
            w0 = torch.as_tensor(init, dtype=torch.float32).detach().clone()
            if tuple(w0.shape) != src:
                raise InputError(f"a program of shape {tuple(w0.shape)} does not fit the model input {src}")
        self.source_shape, self.task_shape = src, task
        self.offset = (top, left)
        self.domain = (lo, hi)
        self.weight = nn.Parameter(w0)
        self.register_buffer("mask", m)

    def canvas(self, x: Tensor) -> Tensor:
        """The new inputs ``x`` (N, c, h, w) placed on a canvas of the source input shape, ``lo`` elsewhere."""
        if x.dim() != 4 or tuple(x.shape[1:]) != self.task_shape:
            raise InputError(
                f"the program takes new-task inputs of shape (N, *{self.task_shape}), got {tuple(x.shape)}"
            )
        c, h, w = self.source_shape
        top, left = self.offset
        out = x.new_full((x.shape[0], c, h, w), self.domain[0])
        out[:, :, top : top + self.task_shape[1], left : left + self.task_shape[2]] = x
        return out

    def pattern(self, weight: Tensor | None = None) -> Tensor:
        """The program's pixels ``lo + (hi - lo)(tanh(W) + 1)/2`` (for a batch of ``weight`` too: (B, *shape))."""
        lo, hi = self.domain
        w = self.weight if weight is None else weight
        return lo + (hi - lo) * (torch.tanh(w) + 1.0) / 2.0

    def forward(self, x: Tensor, weight: Tensor | None = None) -> Tensor:
        """``X_adv`` for the new inputs ``x``; with ``weight`` (B, *shape), the B programs on each input (B·N, ...)."""
        base = self.canvas(x)
        if weight is None:
            return (1.0 - self.mask) * base + self.mask * self.pattern()
        progs = self.mask * self.pattern(weight)  # (B, C, H, W)
        out = (1.0 - self.mask) * base[None] + progs[:, None]
        return out.reshape(-1, *self.source_shape)


class ReprogrammedModel(nn.Module):
    """The frozen source model behind a program and a label mapping: a classifier of the new task.

    ``forward(x̃)`` returns ``log P(t | x̃)`` (N, num_target), the mapped, normalised log-probabilities.
    """

    mapping: Tensor

    def __init__(self, model: nn.Module, program: Program, mapping: Tensor) -> None:
        super().__init__()
        self.model = model
        self.program = program
        self.register_buffer("mapping", mapping.long())

    def forward(self, x: Tensor) -> Tensor:
        return _mapped_log_probs(self.model(self.program(x)), self.mapping)


# ----------------------------------------------------------------------------------------------- results
@dataclass
class ReprogramResult:
    """The outcome of a reprogramming run.

    Attributes:
        method: ``"white-box"`` (Elsayed et al.) or ``"bar"`` (Tsai et al.).
        accuracy: new-task accuracy on the test set.
        train_accuracy: new-task accuracy on the training set.
        chance: the largest class share of the test set (what a constant guess reaches).
        num_classes: classes of the new task.
        mapping: the label mapping, one list of source classes per new class.
        history: mean training loss of each epoch.
        queries: queries spent on the oracle to learn the program (BAR: the shape probe, the frequency mapping's
            pass and every training step; the accuracies are measured on the module behind the oracle when there
            is one, and not counted), else ``None``.
        steps: optimiser steps taken.
        stopped: why training stopped early (e.g. the query budget), or ``None``.
        seconds: wall time.
        run_id: id of the run in the store, when one was given.
        model: the reprogrammed classifier (not part of :meth:`to_dict`).
    """

    method: str
    accuracy: float
    train_accuracy: float
    chance: float
    num_classes: int
    mapping: list[list[int]]
    history: list[float] = field(default_factory=list)
    queries: int | None = None
    steps: int = 0
    stopped: str | None = None
    seconds: float = 0.0
    run_id: int | None = None
    model: ReprogrammedModel | None = field(default=None, repr=False, compare=False)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out.pop("model")
        return out

    def table(self) -> str:
        lines = [
            f"reprogramming ({self.method}): new task with {self.num_classes} classes, mapping {self.mapping}",
            f"  test accuracy   {100 * self.accuracy:6.2f} %   (chance {100 * self.chance:.2f} %)",
            f"  train accuracy  {100 * self.train_accuracy:6.2f} %",
            f"  steps {self.steps}" + (f", queries {self.queries}" if self.queries is not None else "")
            + f", {self.seconds:.1f} s" + (f"  (stopped: {self.stopped})" if self.stopped else ""),
        ]  # fmt: skip
        return "\n".join(lines)


def chance_accuracy(data: Dataset) -> float:
    """The largest class share of ``data``: the accuracy of always answering its most common class."""
    counts = data.class_counts()
    return float(counts.max()) / max(len(data), 1)


def _shape(name: str, value: object) -> tuple[int, ...]:
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence) or not value:
        raise InputError(f"{name} must be a tuple of positive ints, got {value!r}")
    return tuple(positive_int(f"{name} entry", d) for d in value)


@torch.no_grad()
def _accuracy(model: nn.Module, data: Dataset, batch: int = 1024) -> tuple[float, Tensor]:
    device = model_device(model)
    preds = []
    with eval_mode(model):
        for _, xb, _ in data.batches(batch):
            preds.append(model(xb.to(device)).argmax(dim=1).cpu())
    pred = torch.cat(preds) if preds else torch.zeros(0, dtype=torch.long)
    return float((pred == data.y.cpu()).float().mean()) if len(data) else 0.0, pred


# ----------------------------------------------------------------------------------------------- training
class _Reprogramming:
    """What both reprogramming methods share: checks, the program, the epoch loop, evaluation and the store."""

    method = ""

    def __init__(
        self, *, epochs: int, batch_size: int, lr: float, weight_penalty: float, decay: float, seed: int,
        progress: bool,
    ) -> None:  # fmt: skip
        self.epochs = positive_int("epochs", epochs)
        self.batch_size = positive_int("batch_size", batch_size)
        self.lr = positive_float("lr", lr)
        self.weight_penalty = positive_float("weight_penalty", weight_penalty, allow_zero=True)
        self.decay = positive_float("decay", decay)
        if self.decay > 1:
            raise InputError(f"decay must lie in (0, 1], got {decay!r}")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise InputError(f"seed must be an int, got {seed!r}")
        self.seed = seed
        self.progress = bool(progress)

    def options(self) -> dict[str, Any]:
        return {k: v for k, v in vars(self).items() if k != "progress"}

    def __repr__(self) -> str:
        return f"{type(self).__name__}({', '.join(f'{k}={v!r}' for k, v in self.options().items())})"

    def fit(
        self,
        model: nn.Module,
        train: Dataset,
        test: Dataset | None = None,
        *,
        mapping: Any = "frequency",
        per_class: int | None = None,
        program: Program | None = None,
        store: Store | str | None = None,
        config: dict[str, Any] | None = None,
    ) -> ReprogramResult:
        """Learn a program that makes ``model`` solve the task of ``train``; evaluate it on ``test``.

        Args:
            model: the frozen source classifier (a torch module; for :class:`BAR` also a BlackBox oracle).
            train: the new task's training data (N, c, h, w), inputs inside the model's domain.
            test: the new task's test data (default: ``train``).
            mapping: ``"frequency"`` (default: :func:`frequency_mapping`), ``None`` (the block mapping of
                :func:`label_mapping`: new class ``t`` gets source classes ``t·m .. t·m + m - 1``) or an explicit
                (num_target, m) mapping.
            per_class: source classes per new class (see :func:`label_mapping`).
            program: a :class:`Program` to start from (default: a centred frame, zero-initialised).
            store: a result store (or its path): the test predictions are written there, one record each.
            config: extra information stored with the run.

        Returns:
            A :class:`ReprogramResult`; ``result.model`` is the reprogrammed classifier.
        """
        started = time.perf_counter()
        if not isinstance(model, nn.Module):
            raise InputError(f"model must be a torch.nn.Module or a BlackBox, got {type(model).__name__}")
        if not isinstance(train, Dataset) or (test is not None and not isinstance(test, Dataset)):
            raise InputError("train and test must be bastion Datasets (e.g. bastion.applications.shapes_task())")
        test = train if test is None else test
        if test.feature_shape != train.feature_shape:
            raise InputError(f"test inputs {test.feature_shape} differ from train inputs {train.feature_shape}")
        if test.num_classes > train.num_classes:
            raise InputError(f"the test data has {test.num_classes} classes, the training data {train.num_classes}")
        source, device = self._source(model)
        if program is None:
            program = Program(source, train.feature_shape, domain=train.domain)
        elif not isinstance(program, Program):
            raise InputError(f"program must be a Program, got {type(program).__name__}")
        elif program.task_shape != train.feature_shape:
            raise InputError(f"the program takes inputs {program.task_shape}, the data has {train.feature_shape}")
        elif program.source_shape != source:
            raise InputError(f"a program of shape {program.source_shape} does not fit the model input {source}")
        lo, hi = train.domain
        if lo < program.domain[0] or hi > program.domain[1]:
            raise InputError(f"the new task's domain {train.domain} exceeds the model's {program.domain}")
        program = program.to(device)
        queries_before = model.queries if isinstance(model, BlackBox) else None
        with torch.no_grad(), eval_mode(model):
            k_source = check_logits(self._scores(model, program(train.x[:1].to(device))), 1)
        if isinstance(mapping, str):
            if mapping != "frequency":
                raise InputError(f"mapping must be 'frequency', an integer array or None, got {mapping!r}")
            with torch.no_grad(), eval_mode(model):
                mapping = frequency_mapping(
                    lambda xb: self._scores(model, program(xb.to(device))),
                    train,
                    k_source,
                    per_class=per_class,
                    batch_size=max(self.batch_size, 256),
                )
        mapping_t = label_mapping(k_source, train.num_classes, per_class=per_class, mapping=mapping).to(device)
        with eval_mode(model):
            history, steps, queries, stopped = self._train(model, program, mapping_t, train, device)
        if isinstance(model, BlackBox) and queries_before is not None:
            queries = model.queries - queries_before  # the probe, the mapping's pass and the training steps
        classifier = ReprogrammedModel(self._plain(model), program, mapping_t).eval()
        acc, pred = _accuracy(classifier, test)
        train_acc, _ = _accuracy(classifier, train)
        result = ReprogramResult(
            method=self.method, accuracy=acc, train_accuracy=train_acc, chance=chance_accuracy(test),
            num_classes=train.num_classes, mapping=mapping_t.cpu().tolist(), history=history, queries=queries,
            steps=steps, stopped=stopped, model=classifier,
        )  # fmt: skip
        key = f"reprogram:{self.method}"
        payload = {"method": self.method, "options": self.options(), "mapping": result.mapping,
                   "train": train.fingerprint(), "offset": list(program.offset)}  # fmt: skip
        with resumable_run(
            store, kind="reprogram", payload=payload,
            fingerprints=lambda: (model_fingerprint(self._plain(model)), test.fingerprint()),
            n_samples=len(test), threats=[key], config=config,
        ) as run:  # fmt: skip
            share = (time.perf_counter() - started) / max(len(test), 1)
            records = [
                SampleRecord(
                    index=i, threat=key, label=int(test.y[i]), clean_pred=int(pred[i]), status="unknown",
                    seconds=share, extra={"correct": bool(pred[i] == test.y[i].cpu())},
                )
                for i in run.todo(len(test))
            ]  # fmt: skip
            run.write(records, seconds=share * len(records))
            return run.finish(result, started=started)

    # -- hooks
    def _source(self, model: nn.Module) -> tuple[tuple[int, ...], torch.device]:
        raise NotImplementedError

    def _plain(self, model: nn.Module) -> nn.Module:
        return model

    def _scores(self, model: nn.Module, x: Tensor) -> Tensor:
        return model(x)

    def _train(
        self, model: nn.Module, program: Program, mapping: Tensor, train: Dataset, device: torch.device
    ) -> tuple[list[float], int, int | None, str | None]:
        raise NotImplementedError

    def _loss(self, logits: Tensor, mapping: Tensor, y: Tensor) -> Tensor:
        return F.nll_loss(_mapped_log_probs(logits, mapping), y)

    def _epochs(self, opt: torch.optim.Optimizer) -> Any:
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=self.decay)
        bar = tqdm(range(self.epochs), desc=f"reprogram ({self.method})", unit="epoch", disable=not self.progress,
                   leave=False)  # fmt: skip
        for epoch in bar:
            yield epoch, bar
            sched.step()


def _source_shape(model: nn.Module, given: Sequence[int] | None) -> tuple[int, ...]:
    if given is not None:
        return _shape("input_shape", given)
    spec = getattr(model, "bastion_spec", None)
    if spec is None and isinstance(model, BlackBox) and isinstance(getattr(model, "module", None), nn.Module):
        spec = getattr(model.module, "bastion_spec", None)
    if isinstance(spec, dict) and "input_shape" in spec.get("config", {}):
        return tuple(int(d) for d in spec["config"]["input_shape"])
    raise InputError("cannot tell the model's input shape: pass input_shape=(C, H, W) to the reprogramming method")


class WhiteBoxReprogramming(_Reprogramming):
    """Adversarial reprogramming with gradients (Elsayed, Goodfellow & Sohl-Dickstein, ICLR 2019).

    Minimises ``CE(P(· | x̃), ỹ) + λ ||W||²`` over the program ``W`` with Adam; the model is frozen (its
    parameters get no gradient and are never changed).

    Args:
        epochs: passes over the new task's training data.
        batch_size: samples per step.
        lr: Adam learning rate (0.05, the paper's).
        weight_penalty: λ, the weight of ``||W||²`` (0.01).
        decay: learning-rate factor applied every 2 epochs (0.96, the paper's schedule).
        input_shape: the model's input shape, if the model does not record it (zoo models do).
        seed: seeds the shuffling.
        progress: show a progress bar over the epochs.
    """

    method = "white-box"

    def __init__(
        self, *, epochs: int = 30, batch_size: int = 50, lr: float = 0.05, weight_penalty: float = 0.01,
        decay: float = 0.96, input_shape: Sequence[int] | None = None, seed: int = 0, progress: bool = True,
    ) -> None:  # fmt: skip
        super().__init__(epochs=epochs, batch_size=batch_size, lr=lr, weight_penalty=weight_penalty, decay=decay,
                         seed=seed, progress=progress)  # fmt: skip
        self.input_shape = None if input_shape is None else list(_shape("input_shape", input_shape))

    def _source(self, model: nn.Module) -> tuple[tuple[int, ...], torch.device]:
        if isinstance(model, BlackBox):
            raise InputError("WhiteBoxReprogramming needs gradients; on a BlackBox oracle use BAR")
        return _source_shape(model, self.input_shape), model_device(model)

    def _train(
        self, model: nn.Module, program: Program, mapping: Tensor, train: Dataset, device: torch.device
    ) -> tuple[list[float], int, int | None, str | None]:
        frozen = [(p, p.requires_grad) for p in model.parameters()]
        for p, _ in frozen:
            p.requires_grad_(False)
        opt = torch.optim.Adam([program.weight], lr=self.lr)
        gen = torch.Generator().manual_seed(self.seed)
        x_all, y_all = train.x.to(device), train.y.to(device)
        history, steps = [], 0
        try:
            for _, bar in self._epochs(opt):
                order = torch.randperm(len(train), generator=gen).to(device)
                total = 0.0
                for start in range(0, len(train), self.batch_size):
                    idx = order[start : start + self.batch_size]
                    loss = self._loss(model(program(x_all[idx])), mapping, y_all[idx])
                    obj = loss + self.weight_penalty * program.weight.pow(2).sum()
                    opt.zero_grad(set_to_none=True)
                    obj.backward()
                    opt.step()
                    steps += 1
                    total += float(loss.detach()) * idx.numel()
                history.append(total / len(train))
                bar.set_postfix(loss=f"{history[-1]:.3f}", refresh=False)
        finally:
            for p, flag in frozen:
                p.requires_grad_(flag)
        return history, steps, None, None


class BAR(_Reprogramming):
    """Black-box adversarial reprogramming (Tsai, Chen & Ho, ICML 2020): zeroth-order, every query counted.

    The model is reached through a :class:`~bastion.models.oracle.BlackBox` oracle reading scores (a torch module
    is wrapped in one); each step estimates the gradient of the mapped cross-entropy over a minibatch with ``q``
    random unit directions and smoothing ``β`` (module docstring), costing ``(q + 1) · batch`` queries. Training
    stops early, keeping the program learnt so far, when the oracle's budget (or ``max_queries``) cannot pay for
    another step; the result says so in ``stopped``.

    Args:
        q: random directions per gradient estimate (25).
        beta: smoothing parameter β of the estimate (0.01).
        epochs: passes over the new task's training data.
        batch_size: samples per step.
        lr: Adam learning rate on the estimated gradient (0.05).
        weight_penalty: λ of ``||W||²`` (0.01; its gradient is exact, it costs no query).
        decay: learning-rate factor every 2 epochs (0.96).
        max_queries: stop once this many queries were spent (``None``: the oracle's budget only).
        input_shape: the model's input shape, if neither the model nor the oracle records it.
        seed: seeds the shuffling and the random directions.
        progress: show a progress bar.
    """

    method = "bar"

    def __init__(
        self, *, q: int = 25, beta: float = 0.01, epochs: int = 30, batch_size: int = 50, lr: float = 0.05,
        weight_penalty: float = 0.01, decay: float = 0.96, max_queries: int | None = None,
        input_shape: Sequence[int] | None = None, seed: int = 0, progress: bool = True,
    ) -> None:  # fmt: skip
        super().__init__(epochs=epochs, batch_size=batch_size, lr=lr, weight_penalty=weight_penalty, decay=decay,
                         seed=seed, progress=progress)  # fmt: skip
        self.q = positive_int("q", q)
        self.beta = positive_float("beta", beta)
        self.max_queries = None if max_queries is None else positive_int("max_queries", max_queries)
        self.input_shape = None if input_shape is None else list(_shape("input_shape", input_shape))
        self._oracle: BlackBox | None = None

    def options(self) -> dict[str, Any]:
        return {k: v for k, v in super().options().items() if k != "_oracle"}

    def _wrap(self, model: nn.Module) -> BlackBox:
        if isinstance(model, BlackBox):
            if model.returns == "labels":
                raise InputError("BAR reads scores, but this BlackBox answers with labels only (returns='labels')")
            return model
        return BlackBox(model, returns="logits")

    def fit(self, model: nn.Module, train: Dataset, test: Dataset | None = None, **kwargs: Any) -> ReprogramResult:
        self._oracle = self._wrap(model) if isinstance(model, nn.Module) else None
        try:
            return super().fit(self._oracle if self._oracle is not None else model, train, test, **kwargs)
        finally:
            self._oracle = None

    fit.__doc__ = _Reprogramming.fit.__doc__

    def _source(self, model: nn.Module) -> tuple[tuple[int, ...], torch.device]:
        return _source_shape(model, self.input_shape), model_device(model)

    def _plain(self, model: nn.Module) -> nn.Module:
        # Measuring the accuracy is the experimenter's business, not the attacker's: when the oracle wraps a
        # torch module the reprogrammed classifier uses that module, so the evaluation spends none of the budget
        # (and is not counted in ``queries``); an oracle over any other callable is queried (and charged).
        inner = getattr(model, "module", None)
        return inner if isinstance(model, BlackBox) and isinstance(inner, nn.Module) else model

    def _train(
        self, model: nn.Module, program: Program, mapping: Tensor, train: Dataset, device: torch.device
    ) -> tuple[list[float], int, int | None, str | None]:
        assert isinstance(model, BlackBox)
        oracle = model
        start_queries = oracle.queries
        mask = program.mask.bool()
        d = int(mask.sum())
        if d == 0:
            raise InputError("the program's mask is empty: there is nothing to learn")
        opt = torch.optim.Adam([program.weight], lr=self.lr)
        gen = torch.Generator().manual_seed(self.seed)
        dgen = torch.Generator(device=device).manual_seed(self.seed + 1)
        x_all, y_all = train.x.to(device), train.y.to(device)
        history, steps, stopped = [], 0, None
        for _, bar in self._epochs(opt):
            order = torch.randperm(len(train), generator=gen).to(device)
            total, seen = 0.0, 0
            for start in range(0, len(train), self.batch_size):
                idx = order[start : start + self.batch_size]
                cost = (self.q + 1) * idx.numel()
                spent = oracle.queries - start_queries
                left = oracle.remaining
                if (left is not None and cost > left) or (
                    self.max_queries is not None and spent + cost > self.max_queries
                ):
                    stopped = f"query budget: {spent} queries spent, a step costs {cost}"
                    break
                xb, yb = x_all[idx], y_all[idx]
                with torch.no_grad():
                    u = torch.randn((self.q, d), generator=dgen, device=device)
                    u = u / u.norm(dim=1, keepdim=True)
                    w = program.weight.detach()
                    cand = w.expand(self.q + 1, *w.shape).clone()
                    cand[1:][:, mask] += self.beta * u
                    logits = oracle(program(xb, cand))  # (q + 1) · n queries, one batch
                    n = idx.numel()
                    losses = torch.stack([
                        self._loss(logits[j * n : (j + 1) * n], mapping, yb) for j in range(self.q + 1)
                    ])  # fmt: skip
                    coeff = (losses[1:] - losses[0]) / self.beta  # (q,)
                    g = (d / self.q) * (coeff[:, None] * u).sum(dim=0)
                grad = torch.zeros_like(program.weight)
                grad[mask] = g
                grad += 2.0 * self.weight_penalty * program.weight.detach()
                opt.zero_grad(set_to_none=True)
                program.weight.grad = grad
                opt.step()
                steps += 1
                total += float(losses[0]) * n
                seen += n
            if seen:
                history.append(total / seen)
                bar.set_postfix(loss=f"{history[-1]:.3f}", queries=oracle.queries - start_queries, refresh=False)
            if stopped:
                break
        return history, steps, oracle.queries - start_queries, stopped


# ----------------------------------------------------------------------------------------------- baseline
def scratch_baseline(
    arch: str,
    program: Program,
    train: Dataset,
    test: Dataset,
    *,
    num_classes: int | None = None,
    epochs: int = 30,
    lr: float = 1e-3,
    seed: int = 0,
    progress: bool = False,
    **arch_kwargs: Any,
) -> float:
    """Test accuracy of a zoo model of architecture ``arch`` trained from scratch on the embedded new task.

    The new inputs are placed on the source canvas exactly as the program places them (with the frame at the
    domain's low value), so the baseline sees the same pixels and has the source model's size; it is trained with
    :func:`bastion.defenses.training.train`.
    """
    from bastion.defenses.training import accuracy
    from bastion.defenses.training import train as train_model
    from bastion.models import build_model

    with torch.no_grad():
        canvas_train = Dataset(program.canvas(train.x.to(program.mask.device)).cpu(), train.y, train.num_classes,
                               name=f"{train.name} (canvas)")  # fmt: skip
        canvas_test = Dataset(program.canvas(test.x.to(program.mask.device)).cpu(), test.y, train.num_classes,
                              name=f"{test.name} (canvas)")  # fmt: skip
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        net = build_model(arch, program.source_shape, num_classes or train.num_classes, **arch_kwargs)
    train_model(net, canvas_train, epochs=epochs, lr=lr, seed=seed, progress=progress)
    return accuracy(net, canvas_test)
