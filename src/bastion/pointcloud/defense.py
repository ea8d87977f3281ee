"""Statistical outlier removal (SOR), the point-cloud denoiser of DUP-Net (Zhou, Chen, Zhang, Zhang, Zhou & Yu,
"DUP-Net: Denoiser and Upsampler Network for 3D Adversarial Point Clouds Defense", ICCV 2019, Sec. 3.1).

For every point ``i`` SOR computes ``d_i``, the mean Euclidean distance to its ``k`` nearest neighbours, and removes
the points with ``d_i > μ + α·σ`` (``μ``, ``σ``: mean and standard deviation of the ``d_i`` of the cloud); DUP-Net
uses ``k = 2`` and ``α = 1.1``. Adversarial points that stray from the surface (Xiang et al.'s added points, the
outliers of an l2 perturbation) are removed; about a tenth of the clean points go too, which a PointNet hardly
notices. (DUP-Net's upsampler network is not part of this module.)

:class:`SOR` is a model wrapper: ``SOR(model)(x)`` classifies the cleaned clouds. A batch must keep one shape, so a
removed point is replaced by a copy of its nearest kept point, which is exactly a removal for a max-pooling network
such as PointNet. The replacement is a gather, so gradients flow to the kept points: an attack on ``SOR(model)``
attacks the defence itself; the adaptive attack adds the inlier penalty of :mod:`bastion.pointcloud.attacks`
(``sor_penalty``) so that the points it moves are not removed.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from bastion.attacks.base import positive_float, positive_int
from bastion.errors import InputError
from bastion.pointcloud.threat import check_points, pairwise

__all__ = ["SOR", "sor_outliers"]


def sor_outliers(x: torch.Tensor, k: int = 2, alpha: float = 1.1) -> torch.Tensor:
    """Boolean mask (N, P): the points SOR removes from the clouds ``x`` (N, P, 3)."""
    check_points(x)
    if x.shape[1] <= k:
        raise InputError(f"SOR with k={k} neighbours needs clouds of more than {k} points, got {x.shape[1]}")
    d = pairwise(x, x)
    d = d.masked_fill(torch.eye(x.shape[1], dtype=torch.bool, device=x.device), math.inf)
    mean_d = d.topk(k, dim=2, largest=False).values.mean(dim=2)
    thr = mean_d.mean(dim=1, keepdim=True) + alpha * mean_d.std(dim=1, keepdim=True)
    return mean_d > thr


class SOR(nn.Module):
    """``model`` behind statistical outlier removal (DUP-Net, ICCV 2019).

    Args:
        model: the point-cloud classifier (inputs (N, P, 3)).
        k: neighbours of the mean distance (2 in DUP-Net).
        alpha: threshold factor: points with mean distance above ``mean + alpha · std`` are removed (1.1).
    """

    def __init__(self, model: nn.Module, *, k: int = 2, alpha: float = 1.1) -> None:
        super().__init__()
        if not isinstance(model, nn.Module):
            raise InputError(f"SOR wraps a torch.nn.Module, got {type(model).__name__}")
        self.model = model
        self.k = positive_int("k", k)
        self.alpha = positive_float("alpha", alpha, allow_zero=True)

    def clean(self, x: torch.Tensor) -> torch.Tensor:
        """The clouds with every removed point replaced by its nearest kept point (same shape)."""
        with torch.no_grad():
            out = sor_outliers(x.detach(), self.k, self.alpha)
            d = pairwise(x.detach(), x.detach()).masked_fill(out[:, None, :], math.inf)
            src = torch.where(out, d.argmin(dim=2), torch.arange(x.shape[1], device=x.device)[None])
        return x.gather(1, src[..., None].expand(-1, -1, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(self.clean(x))

    def extra_repr(self) -> str:
        return f"k={self.k}, alpha={self.alpha}"
