"""The shared attack machinery: one ``__call__`` for every attack.

``Attack.__call__`` (written once) validates the inputs, puts the model in eval mode and restores it afterwards,
skips samples that already meet the criterion, runs the attack's :meth:`Attack.run` on the rest, then **projects the
result onto the threat set and re-predicts** to decide success, so that no attack can over-report. It also counts
model and gradient evaluations and times the attack.

Hyperparameters are keyword-only constructor arguments carrying the papers' defaults; the data, the threat model
and the targets come at call time::

    result = PGD(steps=100)(model, x, y, threat=LpBall("linf", 0.3))
"""

from __future__ import annotations

import inspect
import math
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import Any, ClassVar

import torch
from torch import nn

from bastion.data import validate_arrays
from bastion.errors import InputError
from bastion.models.checks import check_logits, eval_mode, model_device
from bastion.results import AttackResult, Criterion
from bastion.threat import FlowThreat, LpBall, ThreatModel

LossFn = Callable[[torch.Tensor], torch.Tensor]

#: Every concrete attack class, by its registry name (filled by ``Attack.__init_subclass__``).
ATTACKS: dict[str, type[Attack]] = {}


class CountingModel:
    """The model as an attack sees it: forward and gradient evaluations, each counted in samples."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.forwards = 0
        self.gradients = 0

    @torch.no_grad()
    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        self.forwards += x.shape[0]
        return self.model(x)

    def logits_and_grad(self, x: torch.Tensor, loss_fn: LossFn) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Logits at ``x``, the per-sample loss ``loss_fn(logits)`` and its gradient with respect to ``x``.

        Samples are independent in eval mode, so the gradient of the summed loss is the per-sample gradient.
        """
        x = x.detach().requires_grad_(True)
        with torch.enable_grad():
            logits = self.model(x)
            loss = loss_fn(logits)
            (grad,) = torch.autograd.grad(loss.sum(), x)
        self.forwards += x.shape[0]
        self.gradients += x.shape[0]
        return logits.detach(), loss.detach(), grad


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
    ``access`` (``"white-box"``, ``"score"`` or ``"label"``) and ``paper``.
    """

    name: ClassVar[str] = ""
    norms: ClassVar[tuple[str, ...]] = ("linf", "l2", "l1")
    minimal: ClassVar[bool] = False
    access: ClassVar[str] = "white-box"
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
            model: a ``torch.nn.Module`` mapping a batch of inputs to logits (N, K).
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
            clean_logits = counted(x_t)
            num_classes = check_logits(clean_logits, x_t.shape[0])
            if int(y_t.max()) >= num_classes:
                raise InputError(f"labels go up to {int(y_t.max())} but the model returns {num_classes} logits")
            if t_t is not None and int(t_t.max()) >= num_classes:
                raise InputError(f"targets go up to {int(t_t.max())} but the model returns {num_classes} logits")
            criterion = Criterion(y_t, t_t)
            todo = ~criterion.is_adversarial(clean_logits)  # already-adversarial samples need no attack
            x_adv = x_t.clone()
            # on a flow threat the attack's output is a flow field: the image is rebuilt from it below
            flow = x_t.new_zeros(threat.flow_shape(x_t)) if isinstance(threat, FlowThreat) else None
            queries = None
            if bool(todo.any()):
                idx = todo.nonzero().squeeze(1)
                out = self.run(counted, x_t[idx], criterion.subset(idx), threat, generator)
                if isinstance(out, tuple):  # query-counted attacks also report queries per sample
                    out, q = out
                    queries = torch.ones(x_t.shape[0], dtype=torch.long, device=device)  # the clean query
                    queries[idx] += q.to(device=device, dtype=torch.long)
                if flow is not None:
                    if tuple(out.shape) != (idx.numel(), *flow.shape[1:]):
                        raise RuntimeError(f"{type(self).__name__}.run returned shape {tuple(out.shape)}, not a flow")
                    flow[idx] = out.to(x_t.dtype)
                else:
                    x_adv[idx] = out.to(x_t.dtype)
            if isinstance(threat, FlowThreat) and flow is not None:
                # never trust an image from the attack: project its flow onto the budget and warp x again
                flow = threat.project_flow(flow)
                x_adv = threat.apply(x_t, flow)
                size = threat.flow_size(flow)
            else:
                x_adv = threat.clip(x_adv) if self.minimal else threat.project(x_adv, x_t)
                size = threat.distance(x_adv, x_t)
            adv_logits = counted(x_adv)
        success = criterion.is_adversarial(adv_logits)
        distance = torch.where(success, size, torch.full_like(success, float("inf"), dtype=x_t.dtype))
        return AttackResult(
            x_adv=x_adv,
            success=success,
            distance=distance,
            clean_pred=clean_logits.argmax(dim=1),
            adv_pred=adv_logits.argmax(dim=1),
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
        ``queries`` then adds the clean query of each sample.
        """

    # ----------------------------------------------------------------------------------------------- helpers
    def check_inputs(self, x: torch.Tensor) -> None:
        """Attack-specific checks of the (already validated) inputs, before any work; raise InputError to refuse."""
        return None  # most attacks accept any input shape

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
