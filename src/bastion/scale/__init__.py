"""Scale-out: evaluation, certification, assessment and VNN-COMP benchmarks sharded over a Ray cluster.

Ray is an optional extra (``pip install 'bastion[ray]'``); importing this package does not import it. See
:mod:`bastion.scale.ray` for how jobs are sharded, retried and merged into the store, and
:mod:`bastion.scale.shards` for the shard plan (whole batches, every sample exactly once).
"""

from bastion.scale.ray import RAY_HINT, ray_assess, ray_certify, ray_evaluate, ray_vnncomp
from bastion.scale.shards import IndexedShard, Shard, plan_shards, split_evenly

__all__ = [
    "RAY_HINT",
    "IndexedShard",
    "Shard",
    "plan_shards",
    "ray_assess",
    "ray_certify",
    "ray_evaluate",
    "ray_vnncomp",
    "split_evenly",
]
