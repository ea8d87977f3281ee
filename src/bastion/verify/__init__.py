"""Verification: a network IR, sound bound propagation, complete search, VNN-LIB specifications."""

from __future__ import annotations

from bastion.verify.bounds import BoundOptions, BoundResult, compute_bounds, robustness_spec
from bastion.verify.ir import Network, Node
from bastion.verify.ops import register_op
from bastion.verify.spec import Region, Spec
from bastion.verify.vnnlib import format_counterexample, format_vnnlib, parse_vnnlib

__all__ = [
    "BoundOptions",
    "BoundResult",
    "Network",
    "Node",
    "Region",
    "Spec",
    "compute_bounds",
    "format_counterexample",
    "format_vnnlib",
    "parse_vnnlib",
    "register_op",
    "robustness_spec",
]
