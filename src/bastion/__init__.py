"""bastion: adversarial robustness of deep learning models on one threat model and one result store.

The main entry points::

    from bastion import LpBall, evaluate, load_data
    from bastion.attacks import FGSM, PGD
    from bastion.models import build_model, load_model
"""

from __future__ import annotations

__version__ = "0.1.0"

from bastion.data import Dataset, load_data  # noqa: E402
from bastion.errors import BastionError, BastionWarning, InputError  # noqa: E402
from bastion.evaluate import EvaluationResult, evaluate  # noqa: E402
from bastion.results import AttackResult, Criterion, SampleRecord  # noqa: E402
from bastion.store import Store  # noqa: E402
from bastion.threat import LpBall, ThreatModel  # noqa: E402

__all__ = [
    "AttackResult",
    "BastionError",
    "BastionWarning",
    "Criterion",
    "Dataset",
    "EvaluationResult",
    "InputError",
    "LpBall",
    "SampleRecord",
    "Store",
    "ThreatModel",
    "__version__",
    "evaluate",
    "load_data",
]
