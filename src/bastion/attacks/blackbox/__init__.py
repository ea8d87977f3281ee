"""Black-box attacks: score-based, decision-based and transfer attacks, query-counted through the oracle.

Every attack here reaches the model only through :class:`~bastion.attacks.base.CountingModel` (scores or labels, no
gradients), so it runs unchanged on a torch model or on a :class:`~bastion.models.oracle.BlackBox` oracle, and
spends its queries through the per-sample ledger (``Attack.budgeted``), so an oracle's budgets hold.
"""

from __future__ import annotations

from bastion.attacks.blackbox.bandits import BanditsTD
from bastion.attacks.blackbox.boundary import BoundaryAttack
from bastion.attacks.blackbox.hsj import HopSkipJump
from bastion.attacks.blackbox.nes import NES
from bastion.attacks.blackbox.rays import RayS
from bastion.attacks.blackbox.signopt import OPT, SignOPT
from bastion.attacks.blackbox.simba import SimBA, SimBADCT
from bastion.attacks.blackbox.zoo import ZOO, AutoZOOM

__all__ = [
    "NES",
    "OPT",
    "ZOO",
    "AutoZOOM",
    "BanditsTD",
    "BoundaryAttack",
    "HopSkipJump",
    "RayS",
    "SignOPT",
    "SimBA",
    "SimBADCT",
]
