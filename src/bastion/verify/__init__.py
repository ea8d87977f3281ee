"""Verification: a network IR, sound bound propagation, complete search, VNN-LIB specifications.

``certify`` and ``assess`` are imported from the top-level package (``from bastion import assess, certify``): their
modules here carry the same names.
"""

from __future__ import annotations

from bastion.verify.assess import AssessResult
from bastion.verify.bab import verify, verify_box
from bastion.verify.bounds import BoundOptions, BoundResult, compute_bounds, robustness_spec
from bastion.verify.certify import CertifyResult, certified_radius, margin_bounds
from bastion.verify.ir import Network, Node, as_network
from bastion.verify.milp import MilpEncoding, milp_minimum, milp_verify
from bastion.verify.ops import register_op
from bastion.verify.result import Verdict
from bastion.verify.spec import Region, Spec
from bastion.verify.symbolic import InputSet, symbolic_bounds
from bastion.verify.vnnlib import format_counterexample, format_vnnlib, parse_vnnlib
from bastion.verify.zonotope import zonotope_bounds

__all__ = [
    "AssessResult",
    "BoundOptions",
    "BoundResult",
    "CertifyResult",
    "InputSet",
    "MilpEncoding",
    "Network",
    "Node",
    "Region",
    "Spec",
    "Verdict",
    "as_network",
    "certified_radius",
    "compute_bounds",
    "format_counterexample",
    "format_vnnlib",
    "margin_bounds",
    "milp_minimum",
    "milp_verify",
    "parse_vnnlib",
    "register_op",
    "robustness_spec",
    "symbolic_bounds",
    "verify",
    "verify_box",
    "zonotope_bounds",
]
