"""The shared attack machinery: one ``__call__`` for every attack.

``Attack.__call__`` (written once) validates the inputs, puts the model in eval mode and restores it afterwards,
skips samples that already meet the criterion, runs the attack's :meth:`Attack.run` on the rest, then **projects the
result onto the threat set and re-predicts** to decide success, so that no attack can over-report. It also counts
model and gradient evaluations and times the attack.

The model may be a :class:`~bastion.models.oracle.BlackBox` oracle. Then white-box attacks are refused, score-based
attacks are refused on a labels-only oracle, the clean predictions and the re-verification go through the oracle's
labels, and every query is counted per sample in the result's ``queries``: the clean query, the attack's own queries
(charged through :meth:`CountingModel.ledger`) and, for a sample whose point the attack changed, the one
re-verification query. Samples the attack did not run on, or left unchanged, are not queried again. The oracle's
total budget and per-sample budget are never exceeded: queries for the re-verification are held back while the attack
runs.

Hyperparameters are keyword-only constructor arguments carrying the papers' defaults; the data, the threat model
and the targets come at call time::

    result = PGD(steps=100)(model, x, y, threat=LpBall("linf", 0.3))
"""

from __future__ import annotations

import inspect
import math
import time
import warnings
from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import Any, ClassVar

import torch
from torch import nn

from bastion.data import validate_arrays
from bastion.errors import BastionWarning, InputError
from bastion.models.checks import check_logits, eval_mode, model_device
from bastion.models.oracle import BlackBox, QueryBudgetExhausted, QueryLedger
from bastion.results import AttackResult, Criterion
from bastion.threat import FlowThreat, LpBall, ThreatModel

LossFn = Callable[[torch.Tensor], torch.Tensor]

#: Every concrete attack class, by its registry name (filled by ``Attack.__init_subclass__``).
ATTACKS: dict[str, type[Attack]] = {}


def adversarial_labels(criterion: Criterion, pred: torch.Tensor) -> torch.Tensor:
    """Per-sample success from predicted labels (N,): ``pred == targets`` (targeted) or ``pred != labels``.

    The label form of :meth:`Criterion.is_adversarial`, for decision-based attacks and labels-only oracles.
    """
    return pred == criterion.targets if criterion.targets is not None else pred != criterion.labels


class CountingModel:
    """The model as an attack sees it: forward and gradient evaluations, each counted in samples.

    On a :class:`~bastion.models.oracle.BlackBox` oracle it is also the attack's window on the oracle: calling it
    reads scores (refused by a labels-only oracle), :meth:`labels` reads labels, :meth:`logits_and_grad` is refused,
    and :meth:`ledger` charges queries per sample against the attack's and the oracle's budgets. During ``run`` the
    clean outputs of the run's samples, already paid for by the base, are in :attr:`clean_scores` (``None`` on a
    labels-only oracle) and :attr:`clean_labels`.
    """

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.oracle: BlackBox | None = model if isinstance(model, BlackBox) else None
        self.forwards = 0
        self.gradients = 0
        self.clean_scores: torch.Tensor | None = None
        self.clean_labels: torch.Tensor | None = None
        self._reserve = 0  # queries of the total budget held back for the base's re-verification
        self._run: tuple[int, torch.device, int | None] | None = None  # (samples, device, per-sample cap)
        self._ledger: QueryLedger | None = None

    @property
    def access(self) -> str:
        """What the model gives: ``"white-box"`` (a torch model), ``"score"`` or ``"label"`` (an oracle)."""
        if self.oracle is None:
            return "white-box"
        return "label" if self.oracle.returns == "labels" else "score"

    @torch.no_grad()
    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        self._check_total(x.shape[0])
        out = self.model(x)
        self.forwards += x.shape[0]
        return out

    @torch.no_grad()
    def labels(self, x: torch.Tensor) -> torch.Tensor:
        """Predicted labels (N,); the only read a labels-only oracle allows."""
        self._check_total(x.shape[0])
        out = self.oracle.labels(x) if self.oracle is not None else self.model(x).argmax(dim=1)
        self.forwards += x.shape[0]
        return out

    def logits_and_grad(self, x: torch.Tensor, loss_fn: LossFn) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Logits at ``x``, the per-sample loss ``loss_fn(logits)`` and its gradient with respect to ``x``.

        Samples are independent in eval mode, so the gradient of the summed loss is the per-sample gradient.
        """
        if self.oracle is not None:
            raise InputError("a BlackBox oracle gives no gradients; this attack needs a white-box torch model")
        x = x.detach().requires_grad_(True)
        with torch.enable_grad():
            logits = self.model(x)
            loss = loss_fn(logits)
            (grad,) = torch.autograd.grad(loss.sum(), x)
        self.forwards += x.shape[0]
        self.gradients += x.shape[0]
        return logits.detach(), loss.detach(), grad

    # ----------------------------------------------------------------------------------------------- budgets
    def total_left(self) -> int | None:
        """Queries the oracle's total budget still allows the attack (``None``: no total budget)."""
        if self.oracle is None or self.oracle.remaining is None:
            return None
        return max(self.oracle.remaining - self._reserve, 0)

    def _check_total(self, n: int) -> None:
        left = self.total_left()
        if left is not None and n > left:
            raise QueryBudgetExhausted(
                f"the oracle's query budget has {left} queries left for the attack, {n} were asked; "
                "nothing was queried",
                asked=n,
                left=left,
            )

    def ledger(self, limit: int | None = None) -> QueryLedger:
        """The per-sample query ledger of the current ``run`` (one per run; the first call fixes ``limit``).

        Args:
            limit: the attack's own per-sample query budget for this run, or ``None``. An oracle's
                ``sample_budget`` lowers it further (it also pays for the clean query and the re-verification).
        """
        if self._run is None:
            raise RuntimeError("CountingModel.ledger() is only available inside Attack.run")
        if self._ledger is None:
            n, device, cap = self._run
            lim = limit if cap is None else cap if limit is None else min(limit, cap)
            self._ledger = QueryLedger(
                n, limit=lim, device=device, scores=self.__call__, labels=self.labels, total_left=self.total_left
            )
        return self._ledger

    def _begin_run(
        self,
        n: int,
        device: torch.device,
        clean_scores: torch.Tensor | None,
        clean_labels: torch.Tensor,
    ) -> None:
        cap = None
        if self.oracle is not None:
            # the ledger's budget is what the attack may search with: the base pays the clean query (already
            # spent) and holds one query per sample back for the re-verification
            if self.oracle.sample_budget is not None:
                cap = max(self.oracle.sample_budget - 2, 0)
            if self.oracle.remaining is not None:
                self._reserve = min(n, self.oracle.remaining)
        self._run = (n, device, cap)
        self._ledger = None
        self.clean_scores, self.clean_labels = clean_scores, clean_labels

    def _end_run(self) -> QueryLedger | None:
        ledger = self._ledger
        self._run, self._ledger, self._reserve = None, None, 0
        self.clean_scores = self.clean_labels = None
        return ledger


def positive_int(name: str, value: object) -> int:
    """``value`` as an int >= 1, or an InputError naming the hyperparameter (no silent truncation of 2.7 to 2)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or int(value) != value or value < 1:
        raise InputError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def positive_float(name: str, value: object, *, allow_zero: bool = False) -> float:
    """``value`` as a finite float > 0 (or >= 0), or an InputError naming the hyperparameter."""
    bound = ">= 0" if allow_zero else "> 0"
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise InputError(f"{name} must be a finite number {bound}, got {value!r}")
    if value < 0 or (value == 0 and not allow_zero):
        raise InputError(f"{name} must be a finite number {bound}, got {value!r}")
    return float(value)


class Attack(ABC):
    """Base class of every attack.

    Class attributes describe the attack for listings and checks: ``name`` (registry key), ``norms`` (threat
    models it supports), ``minimal`` (a minimal-distortion attack that takes no eps and reports distances),
    ``access`` (``"white-box"``, ``"score"`` or ``"label"``), ``budgeted`` (the attack spends every query through
    :meth:`CountingModel.ledger`, so a :class:`~bastion.models.oracle.BlackBox`'s budgets can be enforced for it;
    others are refused on an oracle with a budget) and ``paper``.
    """

    name: ClassVar[str] = ""
    norms: ClassVar[tuple[str, ...]] = ("linf", "l2", "l1")
    minimal: ClassVar[bool] = False
    access: ClassVar[str] = "white-box"
    budgeted: ClassVar[bool] = False
    paper: ClassVar[str] = ""

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if cls.name and not inspect.isabstract(cls):
            ATTACKS[cls.name] = cls

    # ----------------------------------------------------------------------------------------------- public
    def __call__(
        self,
        model: nn.Module,
        x: torch.Tensor,
        y: torch.Tensor,
        *,
        threat: ThreatModel,
        targets: torch.Tensor | None = None,
        seed: int | None = 0,
    ) -> AttackResult:
        """Attack ``model`` on the batch ``(x, y)`` inside ``threat``.

        Args:
            model: a ``torch.nn.Module`` mapping a batch of inputs to logits (N, K), or a
                :class:`~bastion.models.oracle.BlackBox` oracle (for score- and decision-based attacks).
            x: clean inputs (N, ...), inside ``threat.domain``. Moved to the model's device.
            y: true labels (N,), integers in [0, K).
            threat: the threat model, e.g. ``LpBall("linf", 0.3)``.
            targets: target classes (N,) for a targeted attack, or ``None`` (untargeted).
            seed: seed of the attack's random numbers (random starts), for reproducible results; ``None`` draws
                from PyTorch's global generator.

        Returns:
            An :class:`~bastion.results.AttackResult` whose success mask was re-verified by a forward pass on the
            projected adversarial inputs.
        """
        self._check_threat(threat)
        if not isinstance(model, nn.Module):
            raise InputError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        oracle = model if isinstance(model, BlackBox) else None
        if oracle is not None:
            self._check_oracle(oracle)
        device = model_device(model)
        x_t, y_t, _ = validate_arrays(x, y, domain=threat.domain, source="x/y given to the attack")
        self.check_inputs(x_t)
        if isinstance(threat, FlowThreat):
            threat.check_images(x_t)
        if torch.is_tensor(x) and x.is_floating_point():
            x_t = x.detach()  # validated; keep the caller's precision (float64 stays float64)
        x_t, y_t = x_t.to(device), y_t.to(device)
        t_t = None if targets is None else self._check_targets(targets, y_t)

        start = time.perf_counter()
        generator = None
        if seed is not None:
            generator = torch.Generator(device=device)
            generator.manual_seed(seed)
        with eval_mode(model):
            counted = CountingModel(model)
            clean_logits: torch.Tensor | None = None
            if oracle is not None and oracle.returns == "labels":
                clean_pred = counted.labels(x_t)  # a labels-only oracle: never a score read, not even here
                num_classes = int(oracle.num_classes or 0)
            else:
                clean_logits = counted(x_t)
                num_classes = check_logits(clean_logits, x_t.shape[0])
                clean_pred = clean_logits.argmax(dim=1)
            if int(y_t.max()) >= num_classes:
                raise InputError(f"labels go up to {int(y_t.max())} but the model returns {num_classes} logits")
            if t_t is not None and int(t_t.max()) >= num_classes:
                raise InputError(f"targets go up to {int(t_t.max())} but the model returns {num_classes} logits")
            criterion = Criterion(y_t, t_t)
            todo = ~adversarial_labels(criterion, clean_pred)  # already-adversarial samples need no attack
            x_adv = x_t.clone()
            # on a flow threat the attack's output is a flow field: the image is rebuilt from it below
            flow = x_t.new_zeros(threat.flow_shape(x_t)) if isinstance(threat, FlowThreat) else None
            # on an oracle every sample's queries are reported; the clean query is the first
            queries = torch.ones(x_t.shape[0], dtype=torch.long, device=device) if oracle is not None else None
            if bool(todo.any()):
                idx = todo.nonzero().squeeze(1)
                counted._begin_run(
                    idx.numel(), device, None if clean_logits is None else clean_logits[idx], clean_pred[idx]
                )
                before = counted.forwards
                try:
                    out = self.run(counted, x_t[idx], criterion.subset(idx), threat, generator)
                finally:
                    ledger = counted._end_run()
                if isinstance(out, tuple):  # query-counted attacks also report queries per sample
                    out, q = out
                    q = self._checked_queries(q, idx.numel(), counted.forwards - before, ledger, device)
                    if queries is None:
                        queries = torch.ones(x_t.shape[0], dtype=torch.long, device=device)  # the clean query
                    queries[idx] += q
                elif oracle is not None:
                    raise RuntimeError(f"{type(self).__name__}.run must return (x_adv, queries) on a BlackBox oracle")
                if flow is not None:
                    if tuple(out.shape) != (idx.numel(), *flow.shape[1:]):
                        raise RuntimeError(f"{type(self).__name__}.run returned shape {tuple(out.shape)}, not a flow")
                    flow[idx] = self._finite_or(out, flow[idx]).to(x_t.dtype)
                else:
                    x_adv[idx] = self._finite_or(out, x_t[idx]).to(x_t.dtype)
            if isinstance(threat, FlowThreat) and flow is not None:
                # never trust an image from the attack: project its flow onto the budget and warp x again
                flow = threat.project_flow(flow)
                x_adv = threat.apply(x_t, flow)
                size = threat.flow_size(flow)
            else:
                x_adv = threat.clip(x_adv) if self.minimal else threat.project(x_adv, x_t)
                size = threat.distance(x_adv, x_t)
            if oracle is None:
                adv_pred = counted(x_adv).argmax(dim=1)
            else:
                # only the points the attack changed need the oracle again; the others keep their clean answer
                adv_pred = clean_pred.clone()
                changed = (x_adv != x_t).flatten(1).any(dim=1)
                room = changed.clone()
                if oracle.sample_budget is not None and queries is not None:
                    room &= queries < oracle.sample_budget  # the sample's budget still pays for the re-verification
                drop, moved = (changed & ~room).nonzero().squeeze(1), room.nonzero().squeeze(1)
                left = counted.total_left()
                if left is not None and moved.numel() > left:
                    drop, moved = torch.cat([drop, moved[left:]]), moved[:left]
                if drop.numel():
                    # held-back queries cover every sample the attack could query; a point changed beyond what
                    # the budgets can verify (only possible without a query for it) is dropped: not broken
                    x_adv[drop] = x_t[drop]
                    size[drop] = 0.0
                    if flow is not None:
                        flow[drop] = 0.0
                if moved.numel() and queries is not None:
                    adv_pred[moved] = counted.labels(x_adv[moved])
                    queries[moved] += 1
        success = adversarial_labels(criterion, adv_pred)
        distance = torch.where(success, size, torch.full_like(success, float("inf"), dtype=x_t.dtype))
        return AttackResult(
            x_adv=x_adv,
            success=success,
            distance=distance,
            clean_pred=clean_pred,
            adv_pred=adv_pred,
            model_calls=counted.forwards,
            grad_calls=counted.gradients,
            queries=queries,
            seconds=time.perf_counter() - start,
            attack=repr(self),
            perturbation=flow,
        )

    @abstractmethod
    def run(
        self,
        model: CountingModel,
        x: torch.Tensor,
        criterion: Criterion,
        threat: ThreatModel,
        generator: torch.Generator | None,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Return candidate adversarial inputs for ``x`` (none of which meets ``criterion`` yet).

        Only samples that need attacking are passed. The base class projects the output onto the threat set (or,
        for minimal-distortion attacks, clips it to the domain) and re-verifies success, so ``run`` may return
        points that fail. On a :class:`~bastion.threat.FlowThreat` (attacks whose ``norms`` include ``"flow"``),
        ``run`` returns flow fields (n, 2, H, W) instead: the base projects them onto the flow budget, warps ``x``
        with them itself, re-predicts, and reports the flow size as the distance. Query-counted (black-box) attacks
        return ``(x_adv, queries)`` with the number of model queries spent on each sample (N,); the result's
        ``queries`` then adds the clean query of each sample. The base checks the report: it must add up to the
        forward evaluations the attack made, and for a ``budgeted`` attack equal its ledger's ``used``.

        Query-counted attacks should spend through ``model.ledger(limit)`` (see :class:`CountingModel`): it keeps
        them inside their own per-sample budget and the oracle's, and ``model.clean_scores`` /
        ``model.clean_labels`` hold the clean outputs of these samples, already paid for.
        """

    # ----------------------------------------------------------------------------------------------- helpers
    def check_inputs(self, x: torch.Tensor) -> None:
        """Attack-specific checks of the (already validated) inputs, before any work; raise InputError to refuse."""
        return None  # most attacks accept any input shape

    def _check_oracle(self, oracle: BlackBox) -> None:
        """Refuse what cannot run on this oracle, before any query: one line naming the attack and what to use."""
        name = type(self).__name__

        def names(access: str, *, budgeted: bool = False) -> str:
            found = sorted(k for k, c in ATTACKS.items() if c.access == access and (c.budgeted or not budgeted))
            return ", ".join(found) or "none registered"

        if self.access == "white-box":
            raise InputError(
                f"{name} is a white-box attack (it needs gradients) and cannot run on a BlackBox oracle; use a "
                f"score-based attack ({names('score')}) or a decision-based one ({names('label')})"
            )
        if self.access == "transfer":
            raise InputError(
                f"{name} is a transfer attack: it reads the gradients of the model it runs on, which a BlackBox "
                f"oracle has not; craft it on a surrogate with Transferred({name}(), surrogate) "
                "(bastion evaluate --surrogate MODEL)"
            )
        if self.access == "score" and oracle.returns == "labels":
            raise InputError(
                f"{name} reads scores but this BlackBox answers with labels only (returns='labels'); use a "
                f"decision-based attack ({names('label')})"
            )
        if (oracle.budget is not None or oracle.sample_budget is not None) and not self.budgeted:
            raise InputError(
                f"{name} does not spend its queries through the per-sample ledger, so the oracle's budget and "
                f"sample_budget cannot be enforced for it; remove them from the BlackBox or use "
                f"{names('score', budgeted=True)} (scores) or {names('label', budgeted=True)} (labels)"
            )

    def _checked_queries(
        self, q: object, n: int, spent: int, ledger: QueryLedger | None, device: torch.device
    ) -> torch.Tensor:
        """The per-sample queries an attack reported, after checking them against what it really spent."""
        name = type(self).__name__
        if not torch.is_tensor(q) or q.dtype.is_floating_point or q.dtype == torch.bool or tuple(q.shape) != (n,):
            raise RuntimeError(f"{name}.run must report queries as an integer tensor of shape ({n},)")
        q = q.to(device=device, dtype=torch.long)
        if bool((q < 0).any()):
            raise RuntimeError(f"{name}.run reported negative query counts")
        if ledger is not None and not torch.equal(q, ledger.used):
            raise RuntimeError(f"{name}.run reported queries that differ from its ledger's per-sample accounting")
        if int(q.sum()) != spent:
            raise RuntimeError(f"{name}.run reported {int(q.sum())} queries but evaluated the model on {spent} inputs")
        return q

    def _finite_or(self, out: torch.Tensor, fallback: torch.Tensor) -> torch.Tensor:
        """``out`` with every sample that holds NaN or Inf replaced by ``fallback`` (counted as not broken)."""
        bad = ~torch.isfinite(out).flatten(1).all(dim=1)
        if not bool(bad.any()):
            return out
        warnings.warn(
            f"{type(self).__name__} returned NaN or Inf for {int(bad.sum())} samples; they count as not broken",
            BastionWarning,
            stacklevel=3,
        )
        return torch.where(bad.reshape((-1,) + (1,) * (out.dim() - 1)), fallback.to(out.dtype), out)

    def _check_threat(self, threat: ThreatModel) -> None:
        if not isinstance(threat, ThreatModel):
            raise InputError(f"threat must be a ThreatModel such as LpBall('linf', 0.3), got {threat!r}")
        if isinstance(threat, LpBall) and threat.norm not in self.norms:
            raise InputError(f"{type(self).__name__} supports the norms {', '.join(self.norms)}; got threat {threat!r}")
        if isinstance(threat, FlowThreat) and "flow" not in self.norms:
            raise InputError(
                f"{type(self).__name__} supports the norms {', '.join(self.norms)}, not the flow threat {threat!r}; "
                "use a flow attack such as StAdv"
            )

    @staticmethod
    def _check_targets(targets: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        t = torch.as_tensor(targets)
        if t.dtype.is_floating_point or t.dtype == torch.bool or t.shape != y.shape:
            raise InputError(
                f"targets must be integer class indices of shape {tuple(y.shape)}, got {t.dtype} {tuple(t.shape)}"
            )
        if int(t.min()) < 0:
            raise InputError(f"targets must be >= 0, got {int(t.min())}")
        return t.to(device=y.device, dtype=torch.long)

    def options(self) -> dict[str, Any]:
        """The constructor's keyword arguments as set on this instance (for reprs, run keys and the store)."""
        params = inspect.signature(type(self).__init__).parameters
        return {k: getattr(self, k) for k in params if k != "self" and hasattr(self, k)}

    def __repr__(self) -> str:
        opts = ", ".join(f"{k}={v!r}" for k, v in self.options().items())
        return f"{type(self).__name__}({opts})"
