"""Training objectives by name, for the command line and configuration files.

``make_objective("trades", LpBall("linf", 0.3), beta=1.0)`` builds an objective from its registered name, checking
the option names against the constructor so that a typo is an error rather than a silently ignored setting.
Objectives without a threat model (``standard``, and those that define their own perturbation) ignore ``threat``.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

from bastion.defenses.training.at_scr import ATSCR
from bastion.defenses.training.certified import CROWNIBP, IBPTraining
from bastion.defenses.training.fast_at import FastAT
from bastion.defenses.training.feature_scattering import FeatureScattering
from bastion.defenses.training.fgsm_at import FGSMAT
from bastion.defenses.training.free_at import FreeAT
from bastion.defenses.training.latent_manifold import LatentManifoldAT
from bastion.defenses.training.mart import MART
from bastion.defenses.training.n_fgsm import NFGSM
from bastion.defenses.training.noise import GaussianNoise
from bastion.defenses.training.pgd_at import PGDAT
from bastion.defenses.training.trades import TRADES
from bastion.defenses.training.trainer import StandardObjective
from bastion.defenses.training.vat import VAT
from bastion.defenses.training.wrm import WRM
from bastion.errors import InputError
from bastion.threat import LpBall

__all__ = ["OBJECTIVES", "make_objective"]


#: Registered objectives: name -> (constructor, whether its first argument is the threat model). Objectives that
#: define their own perturbation (VAT's radius, WRM's penalty, noise) take no threat; the rest take it first.
OBJECTIVES: dict[str, tuple[Callable[..., Any], bool]] = {
    "standard": (StandardObjective, False),
    "fgsm-at": (FGSMAT, True),
    "pgd-at": (PGDAT, True),
    "free-at": (FreeAT, True),
    "fast-at": (FastAT, True),
    "n-fgsm": (NFGSM, True),
    "trades": (TRADES, True),
    "mart": (MART, True),
    "vat": (VAT, False),
    "wrm": (WRM, False),
    "feature-scattering": (FeatureScattering, True),
    "at-scr": (ATSCR, True),
    "latent-manifold": (LatentManifoldAT, True),
    "gaussian-noise": (GaussianNoise, False),
    "ibp": (IBPTraining, True),
    "crown-ibp": (CROWNIBP, True),
}


def make_objective(name: str, threat: LpBall | None, **options: Any) -> Any:
    """The objective registered as ``name``, built for ``threat`` with ``options``.

    Raises:
        InputError: unknown name, an option the objective does not take, or an invalid value.
    """
    key = str(name).strip().lower().replace("_", "-")
    if key not in OBJECTIVES:
        raise InputError(f"unknown objective {name!r}; choose one of {', '.join(OBJECTIVES)}")
    factory, takes_threat = OBJECTIVES[key]
    params = list(inspect.signature(factory).parameters.values())[1 if takes_threat else 0 :]
    named = (inspect.Parameter.KEYWORD_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    accepted = [p.name for p in params if p.kind in named]
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise InputError(
            f"objective {key!r} has no option {', '.join(map(repr, unknown))}; its options are "
            f"{', '.join(accepted) or 'none'}"
        )
    if takes_threat and threat is None:
        raise InputError(f"objective {key!r} needs a threat model (eps and norm)")
    try:
        return factory(threat, **options) if takes_threat else factory(**options)
    except TypeError as exc:
        raise InputError(f"objective {key!r}: {exc}") from None
