"""bastion: adversarial robustness of deep learning models on one threat model and one result store.

The main entry points::

    from bastion import LpBall, evaluate, load_data
    from bastion.attacks import FGSM, PGD
    from bastion.models import build_model, load_model
"""

from __future__ import annotations

__version__ = "0.1.0"

from bastion.data import Dataset, load_data
from bastion.errors import BastionError, BastionWarning, InputError
from bastion.evaluate import EvaluationResult, evaluate
from bastion.results import AttackResult, Criterion, SampleRecord
from bastion.store import Store
from bastion.threat import FlowThreat, LpBall, ThreatModel
from bastion.verify.assess import AssessResult, assess
from bastion.verify.certify import CertifyResult, certify

__all__ = [
    "AssessResult",
    "AttackResult",
    "BastionError",
    "BastionWarning",
    "CertifyResult",
    "Criterion",
    "Dataset",
    "EvaluationResult",
    "FlowThreat",
    "InputError",
    "LpBall",
    "SampleRecord",
    "Store",
    "ThreatModel",
    "__version__",
    "assess",
    "certify",
    "evaluate",
    "load_data",
]
