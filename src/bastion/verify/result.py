"""The outcome of a verification query.

A :class:`Verdict` is what every complete or incomplete verifier in :mod:`bastion.verify` returns: the
status, the evidence for it (a re-executed counterexample for ``falsified``, a proven lower bound of the
violation margin for ``verified``), how long it took and which method decided it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, get_args

from torch import Tensor

from bastion.errors import InputError

__all__ = ["Status", "Verdict"]

Status = Literal["verified", "falsified", "unknown", "timeout"]

_STATUSES: tuple[str, ...] = get_args(Status)


@dataclass
class Verdict:
    """Result of a verification query.

    Attributes:
        status: ``"verified"`` (the unsafe set is empty, proven), ``"falsified"`` (a concrete input inside
            the region reaches the unsafe set, re-executed on the network), ``"unknown"`` (neither could be
            established, e.g. the domain cap was hit or a solver answer failed re-execution) or
            ``"timeout"`` (the time budget ran out first).
        counterexample: For ``falsified``: an input inside the region (the network's input shape, no batch
            dimension) whose re-executed output lies in the unsafe set.
        output: The network's output on ``counterexample`` (re-executed), without batch dimension.
        lower_bound: A proven lower bound of the violation margin ``min_x max_i (A_i f(x) - b_i)`` over the
            region (or of the objective being bounded); ``> 0`` means verified. ``None`` when not available.
        seconds: Wall-clock time spent.
        method: The method that decided the verdict (e.g. ``"milp"``, ``"bab-relu"``, ``"bab-input"``,
            ``"attack"``, ``"crown"``).
        domains: Number of sub-domains (or MILP nodes) bounded.
    """

    status: Status
    counterexample: Tensor | None = None
    output: Tensor | None = None
    lower_bound: float | None = None
    seconds: float = 0.0
    method: str = ""
    domains: int = 0
    details: dict[str, object] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.status not in _STATUSES:
            raise InputError(f"Verdict.status must be one of {_STATUSES}, got {self.status!r}")
        if self.status == "falsified" and self.counterexample is None:
            raise InputError("a 'falsified' Verdict needs its counterexample")

    @property
    def verified(self) -> bool:
        """``True`` when the property was proven."""
        return self.status == "verified"

    @property
    def falsified(self) -> bool:
        """``True`` when a concrete counterexample was found."""
        return self.status == "falsified"

    def vnncomp(self) -> str:
        """The VNN-COMP result word: ``unsat`` (verified), ``sat`` (falsified), ``timeout`` or ``unknown``."""
        return {"verified": "unsat", "falsified": "sat", "timeout": "timeout", "unknown": "unknown"}[self.status]
