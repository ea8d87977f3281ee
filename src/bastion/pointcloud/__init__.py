"""3-D point clouds: synthetic shapes, a PointNet classifier, threat models, attacks and the SOR defence.

* data: :func:`make_shapes` (synthetic shapes sampled as point sets, generated on the fly);
* model: :class:`PointNet` (Qi et al., CVPR 2017), also ``build_model("pointnet", (P, 3), K)`` / ``zoo:pointnet``;
* threat models: :class:`PointPerturbation` (l2, l∞, Chamfer, Hausdorff), :class:`PointAdding`,
  :class:`PointDropping`;
* attacks: :class:`PointCW` and :class:`PointAdd` (Xiang, Qi & Li, CVPR 2019), :class:`SaliencyDrop` (Zheng et al.,
  ICCV 2019);
* defence: :class:`SOR`, statistical outlier removal (DUP-Net, Zhou et al., ICCV 2019), and its adaptive attack
  (``sor_penalty`` of the optimisation attacks).
"""

from bastion.pointcloud.attacks import PointAdd, PointCW, SaliencyDrop, knn_mean_distance
from bastion.pointcloud.data import SHAPES, make_shapes, sample_shape
from bastion.pointcloud.defense import SOR, sor_outliers
from bastion.pointcloud.model import PointNet
from bastion.pointcloud.threat import (
    METRICS,
    POINT_DOMAIN,
    PointAdding,
    PointDropping,
    PointPerturbation,
    PointThreat,
    add_points,
    chamfer,
    check_points,
    drop,
    hausdorff,
    nearest,
)

__all__ = [
    "METRICS",
    "POINT_DOMAIN",
    "SHAPES",
    "SOR",
    "PointAdd",
    "PointAdding",
    "PointCW",
    "PointDropping",
    "PointNet",
    "PointPerturbation",
    "PointThreat",
    "SaliencyDrop",
    "add_points",
    "chamfer",
    "check_points",
    "drop",
    "hausdorff",
    "knn_mean_distance",
    "make_shapes",
    "nearest",
    "sample_shape",
    "sor_outliers",
]
