"""Free adversarial training (Shafahi et al., NeurIPS 2019).

Shafahi, Najibi, Ghiasi, Xu, Dickerson, Studer, Davis, Taylor & Goldstein, "Adversarial Training for Free!",
NeurIPS 2019, algorithm 1. Each minibatch is replayed ``m`` times in a row. One forward/backward pass per replay
gives both the weight gradient (the trainer's optimiser step on ``CE(f(x + δ), y)``) and the input gradient, with
which the perturbation is updated by a gradient-sign step of size eps and projected: ``δ <- clip(δ + eps·sign(∇_δ),
-eps, eps)``. ``δ`` is carried over between replays *and* between minibatches (never reset), so the adversary gets
stronger across the replays at no extra cost. To keep the number of weight updates of ``E`` ordinary epochs, the
trainer makes ``E / m`` passes over the data (``replays`` attribute).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from bastion.defenses.training.inner import check_batch, check_objective_threat
from bastion.errors import InputError
from bastion.threat import LpBall

__all__ = ["FreeAT"]


class FreeAT:
    """Loss ``CE(f(x + δ), y)`` with a perturbation ``δ`` carried across replays and minibatches.

    The update of ``δ`` uses the input gradient left by the trainer's ``loss.backward()`` of the previous call, so
    it costs nothing: it is applied at the start of the next call (and before :meth:`state_dict`).

    Args:
        threat: the ball; the sign step has length eps (for l2/l1: the threat's normalised step of length eps).
        replays: ``m``, how many times in a row each minibatch is trained on (the paper's CIFAR-10 choice, 8).
    """

    paper = "Shafahi et al., Adversarial Training for Free!, NeurIPS 2019"

    def __init__(self, threat: LpBall, *, replays: int = 8) -> None:
        self.threat = check_objective_threat(threat, "FreeAT")
        if isinstance(replays, bool) or not isinstance(replays, int) or replays < 1:
            raise InputError(f"replays must be an integer >= 1, got {replays!r}")
        self.replays = replays
        self.delta: torch.Tensor | None = None
        self._pending: tuple[torch.Tensor, torch.Tensor] | None = None  # (x, x + δ as a grad leaf) of the last call

    def _flush(self) -> None:
        """Apply the sign step with the input gradient of the last call's backward pass, if there was one."""
        if self._pending is None:
            return
        x, leaf = self._pending
        self._pending = None
        if leaf.grad is None or self.delta is None:
            return
        with torch.no_grad():
            moved = self.threat.project(self.threat.step(leaf.detach(), leaf.grad, self.threat.eps), x)
            self.delta[: x.shape[0]] = moved - x

    def __call__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        x, y = check_batch(x, y)
        self._flush()
        n = x.shape[0]
        if self.delta is None:
            self.delta = torch.zeros_like(x)
        elif self.delta.shape[1:] != x.shape[1:]:
            raise InputError(
                f"FreeAT carries a perturbation of sample shape {tuple(self.delta.shape[1:])} but got inputs of "
                f"shape {tuple(x.shape[1:])}; use one FreeAT object per data set"
            )
        elif self.delta.shape[0] < n:
            # a larger batch than any before: the new rows start unperturbed
            pad = torch.zeros((n - self.delta.shape[0], *x.shape[1:]), dtype=x.dtype, device=x.device)
            self.delta = torch.cat([self.delta.to(x.device), pad])
        self.delta = self.delta.to(device=x.device, dtype=x.dtype)
        x = x.detach()
        # the carried δ belongs to other images: clip it to this batch's ball ∩ domain before use
        leaf = self.threat.project(x + self.delta[:n], x).requires_grad_(True)
        self._pending = (x, leaf)
        return F.cross_entropy(model(leaf), y)

    def state_dict(self) -> dict[str, Any]:
        """The carried perturbation (with the pending update applied)."""
        self._flush()
        return {"delta": None if self.delta is None else self.delta.detach().cpu().clone()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        delta = state.get("delta")
        if delta is not None and not isinstance(delta, torch.Tensor):
            raise InputError(f"FreeAT state 'delta' must be a tensor or None, got {type(delta).__name__}")
        self._pending = None
        self.delta = None if delta is None else delta.clone()

    def __repr__(self) -> str:
        return f"FreeAT({self.threat!r}, replays={self.replays})"
