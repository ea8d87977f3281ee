"""Input normalisation as the first layer of a model.

bastion keeps every user-facing input in the input domain ``[0, 1]``; threat models, clipping and certified
radii are all expressed there. Normalisation therefore belongs inside the model, where attacks differentiate
through it and verifiers propagate bounds through it like any other affine layer.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from bastion.errors import ModelError

__all__ = ["Normalize", "normalize"]


def _as_vector(value: float | Sequence[float] | Tensor, name: str) -> Tensor:
    """Turn a float, a sequence or a tensor into a non-empty 1-D float tensor of finite values."""
    if isinstance(value, Tensor):
        vec = value.detach().to(torch.float32).reshape(-1).clone()
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        vec = torch.tensor([float(value)], dtype=torch.float32)
    elif isinstance(value, Sequence) and not isinstance(value, (str, bytes)):
        try:
            vec = torch.tensor([float(v) for v in value], dtype=torch.float32)
        except (TypeError, ValueError) as exc:
            raise ModelError(f"Normalize: {name} must be a float or a sequence of floats, got {value!r}") from exc
    else:
        raise ModelError(f"Normalize: {name} must be a float or a sequence of floats, got {value!r}")
    if vec.numel() == 0:
        raise ModelError(f"Normalize: {name} is empty; give one value, or one value per channel")
    if not bool(torch.isfinite(vec).all()):
        raise ModelError(f"Normalize: {name} must be finite, got {vec.tolist()}")
    return vec


def normalize(x: Tensor, mean: Tensor, std: Tensor) -> Tensor:
    """Compute ``(x - mean) / std`` with 1-D ``mean``/``std`` broadcast over dimension 1 of ``x``.

    Args:
        x: a batch ``(N, C, ...)`` or ``(N, D)``.
        mean: ``C`` values, or one.
        std: ``C`` values, or one.

    Returns:
        The normalised batch, shaped like ``x``.
    """
    c = max(mean.numel(), std.numel())
    if x.dim() < 2:
        raise ModelError(f"Normalize: expected a batch of shape (N, C, ...), got shape {tuple(x.shape)}")
    if c > 1 and x.shape[1] != c:
        raise ModelError(
            f"Normalize: input has {x.shape[1]} channels (shape {tuple(x.shape)}) but mean/std have {c} values"
        )
    # Per-channel values go on dimension 1 whatever the rank: (1, C) for vectors, (1, C, 1, 1) for images.
    shape = (1, -1) + (1,) * (x.dim() - 2)
    return (x - mean.reshape(shape)) / std.reshape(shape)


# torch.fx symbolic tracing cannot branch on the rank of a proxy; keeping this call as one opaque node makes the
# zoo models traceable with torch.fx as well as torch.export.
torch.fx.wrap("normalize")


class Normalize(nn.Module):
    """Computes ``(x - mean) / std`` per channel (images) or per feature (flat inputs).

    ``mean`` and ``std`` are stored as 1-D buffers of length ``C`` (or length 1 for a single value shared by
    every channel) and are broadcast over dimension 1 of the input at call time, so the same layer serves
    ``(N, C, H, W)`` images and ``(N, D)`` vectors. Verifiers read the two buffers directly: the layer is the
    affine map ``x -> x / std - mean / std`` applied channel-wise.

    Args:
        mean: one value, or one value per channel (per feature for flat inputs).
        std: one value, or one value per channel; every value must be > 0.
    """

    mean: Tensor
    std: Tensor

    def __init__(
        self, mean: float | Sequence[float] | Tensor = 0.0, std: float | Sequence[float] | Tensor = 1.0
    ) -> None:
        super().__init__()
        mean_vec = _as_vector(mean, "mean")
        std_vec = _as_vector(std, "std")
        if not bool((std_vec > 0).all()):
            raise ModelError(f"Normalize: std must be > 0 everywhere, got {std_vec.tolist()}")
        if mean_vec.numel() != std_vec.numel() and min(mean_vec.numel(), std_vec.numel()) != 1:
            raise ModelError(
                f"Normalize: mean has {mean_vec.numel()} values but std has {std_vec.numel()}; "
                "give one value per channel for both, or a single value"
            )
        self.register_buffer("mean", mean_vec)
        self.register_buffer("std", std_vec)

    @property
    def channels(self) -> int:
        """Number of channels the layer is specific to (1 when one value is shared by all channels)."""
        return max(self.mean.numel(), self.std.numel())

    def forward(self, x: Tensor) -> Tensor:
        """Normalise a batch.

        Args:
            x: a batch of shape ``(N, C, ...)`` or ``(N, D)``.

        Returns:
            ``(x - mean) / std`` with the same shape as ``x``.
        """
        return normalize(x, self.mean, self.std)

    def _load_from_state_dict(
        self,
        state_dict: dict[str, Any],
        prefix: str,
        local_metadata: dict[str, Any],
        strict: bool,
        missing_keys: list[str],
        unexpected_keys: list[str],
        error_msgs: list[str],
    ) -> None:
        # A model rebuilt from a bare state dict starts with the default scalar mean/std; accept per-channel
        # values from the file by resizing the buffers before the default copy, which would otherwise report a
        # shape clash.
        for name in ("mean", "std"):
            incoming = state_dict.get(prefix + name)
            current = getattr(self, name)
            if isinstance(incoming, Tensor) and incoming.dim() == 1 and incoming.shape != current.shape:
                setattr(self, name, torch.empty_like(incoming, dtype=current.dtype, device=current.device))
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )
        if prefix + "std" in state_dict and not bool((self.std > 0).all()):
            error_msgs.append(f"{prefix}std must be > 0 everywhere, got {self.std.tolist()}")

    def extra_repr(self) -> str:
        def fmt(t: Tensor) -> str:
            vals = [round(v, 4) for v in t.tolist()]
            return str(vals[0]) if len(vals) == 1 else str(vals)

        return f"mean={fmt(self.mean)}, std={fmt(self.std)}"
