"""Reliability assessment: the operational profile, cells of the input space, and the RAM pfd.

The reliability assessment model of Zhao, Huang, Banks, Cox, Flynn, Schewe & Huang (AISafety workshop at IJCAI
2021): :mod:`.profile` (the operational profile, a Gaussian KDE, and exact cell masses with bootstrap variances),
:mod:`.cells` (r-separation, grid cells and ball cells) and :mod:`.ram` (per-cell robustness by certification,
attack and sampling; the pfd, its variance, its upper bound, the ACU and the IEC 61508 SIL; resumable).

The package's other modules -- ``vae`` (a variational auto-encoder for a latent-space profile),
``generalisation`` and ``weights`` -- are not imported here: import them directly by path, e.g.
``from bastion.reliability.vae import VAE``.
"""

from bastion.reliability.cells import (
    BallCells,
    CellLabels,
    GridCells,
    cell_labels,
    default_eps,
    r_separation,
    top_k,
)
from bastion.reliability.profile import BootstrapMass, CellMass, OperationalProfile
from bastion.reliability.ram import (
    CallableModel,
    RAMResult,
    assess_reliability,
    plot_profile,
    reliability_summary,
    sil_level,
)

__all__ = [
    "BallCells",
    "BootstrapMass",
    "CallableModel",
    "CellLabels",
    "CellMass",
    "GridCells",
    "OperationalProfile",
    "RAMResult",
    "assess_reliability",
    "cell_labels",
    "default_eps",
    "plot_profile",
    "r_separation",
    "reliability_summary",
    "sil_level",
    "top_k",
]
