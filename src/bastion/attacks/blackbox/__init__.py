"""Black-box attacks: score-based, decision-based and transfer attacks, query-counted through the oracle.

Every attack here reaches the model only through :class:`~bastion.attacks.base.CountingModel` (scores or labels, no
gradients), so it runs unchanged on a torch model or on a :class:`~bastion.models.oracle.BlackBox` oracle, and
spends its queries through the per-sample ledger (``Attack.budgeted``), so an oracle's budgets hold.
"""

from __future__ import annotations

from bastion.attacks.blackbox.bandits import BanditsTD
from bastion.attacks.blackbox.nes import NES
from bastion.attacks.blackbox.simba import SimBA, SimBADCT
from bastion.attacks.blackbox.zoo import ZOO, AutoZOOM

__all__ = [
    "NES",
    "ZOO",
    "AutoZOOM",
    "BanditsTD",
    "SimBA",
    "SimBADCT",
]
