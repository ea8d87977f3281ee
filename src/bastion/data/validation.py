"""The one validation routine that every loader and every :class:`~bastion.data.Dataset` goes through.

Loaders read bytes and shape them; everything that can be wrong with the resulting arrays (dtype, shape,
NaN/Inf, values outside the input domain, labels out of range, sample counts that disagree) is checked here,
so that each problem is reported the same way whatever the file format.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from bastion.errors import DataError

__all__ = ["check_domain", "validate_arrays"]

# Dtypes that hold numbers but not class labels or pixel intensities in a meaningful way.
_REJECTED_TORCH_DTYPES = (torch.bool, torch.complex64, torch.complex128)


def check_domain(domain: Any, *, source: str = "domain") -> tuple[float, float]:
    """Check an input domain ``(low, high)`` and return it as a pair of floats.

    Args:
        domain: a pair of finite numbers with ``low < high``.
        source: what the domain belongs to, for the error message.

    Returns:
        ``(low, high)`` as Python floats.

    Raises:
        DataError: the domain is not a pair of finite numbers in increasing order.
    """
    try:
        low, high = (float(v) for v in domain)
    except (TypeError, ValueError):
        raise DataError(
            f"{source}: the domain must be a pair (low, high) of numbers, got {domain!r}; pass e.g. (0.0, 1.0)"
        ) from None
    if not (math.isfinite(low) and math.isfinite(high)) or low >= high:
        raise DataError(
            f"{source}: the domain must satisfy low < high with both finite, got ({low:g}, {high:g}); "
            "pass e.g. (0.0, 1.0)"
        )
    return low, high


def _to_tensor(a: Any, role: str, source: str) -> torch.Tensor:
    """Turn a numpy array, a tensor or a nested sequence into a tensor, rejecting non-numeric data."""
    if isinstance(a, torch.Tensor):
        t = a.detach()
        if t.dtype in _REJECTED_TORCH_DTYPES:
            raise DataError(f"{source}: {role} has dtype {t.dtype}; expected real numbers (integer or float)")
        return t
    try:
        arr = np.asarray(a)
    except (TypeError, ValueError) as exc:
        raise DataError(f"{source}: {role} cannot be read as a numeric array ({exc})") from None
    if arr.dtype.kind not in "iuf":
        raise DataError(
            f"{source}: {role} has dtype {arr.dtype} (kind {arr.dtype.kind!r}); expected real numbers "
            "(integer or float). Convert it with a numeric dtype before loading."
        )
    if arr.dtype.kind == "u" and arr.dtype != np.uint8:
        # torch has only partial support for uint16/32/64; int64 holds every value that matters here.
        if arr.size and int(arr.max()) > np.iinfo(np.int64).max:
            raise DataError(f"{source}: {role} holds values too large for int64 (max {int(arr.max())})")
        arr = arr.astype(np.int64)
    if not arr.dtype.isnative:
        arr = arr.astype(arr.dtype.newbyteorder("="))
    arr = np.ascontiguousarray(arr)
    if not arr.flags.writeable:
        # torch.from_numpy warns on read-only buffers (np.frombuffer over bytes, memory maps); copy instead.
        arr = arr.copy()
    return torch.from_numpy(arr)


def _first_index(mask: torch.Tensor) -> int:
    """Sample index (first axis) of the first True entry of ``mask``."""
    flat = int(torch.nonzero(mask.reshape(-1))[0].item())
    per_sample = max(1, mask[0].numel()) if mask.ndim > 1 else 1
    return flat // per_sample


def _validate_x(x: torch.Tensor, domain: tuple[float, float], source: str) -> torch.Tensor:
    if x.ndim < 2:
        raise DataError(
            f"{source}: x has shape {tuple(x.shape)}; expected (N, *feature_shape) with at least 2 axes, "
            "e.g. (N, D) or (N, C, H, W). Reshape a single sample with x[None]."
        )
    if any(d == 0 for d in x.shape[1:]):
        raise DataError(f"{source}: x has shape {tuple(x.shape)}; every feature axis must be non-empty")
    if x.dtype == torch.uint8:
        # 8-bit arrays are images: 0..255 maps onto [0, 1].
        x = x.to(torch.float32) / 255.0
    elif x.is_floating_point():
        finite = torch.isfinite(x)
        if not bool(finite.all()):
            n_nan = int(torch.isnan(x).sum())
            n_inf = int((~finite).sum()) - n_nan
            i = _first_index(~finite)
            raise DataError(
                f"{source}: x contains {n_nan} NaN and {n_inf} infinite value(s) (first in sample {i}); "
                "remove or repair those samples before loading"
            )
        x = x.to(torch.float32)
        if not bool(torch.isfinite(x).all()):
            raise DataError(
                f"{source}: x holds values too large for float32 (max |x| = {float(x.abs().max()):g}); "
                "scale the features into the input domain first"
            )
    else:
        x = x.to(torch.float32)
    low, high = domain
    if x.numel():
        bad = (x < low) | (x > high)
        if bool(bad.any()):
            i = _first_index(bad)
            offending = x[i][bad[i]][0].item()
            raise DataError(
                f"{source}: x values must lie in the input domain [{low:g}, {high:g}], but they range over "
                f"[{float(x.min()):g}, {float(x.max()):g}] (first offending value {offending:g} in sample "
                f"{i}). "
                f"Scale the features into [{low:g}, {high:g}] first (8-bit pixel values: divide by 255), "
                "or declare the domain the data really lives in."
            )
    return x.contiguous()


def _validate_y(y: torch.Tensor, n: int, source: str) -> torch.Tensor:
    if y.ndim == 2 and y.shape[1] == 1:
        y = y[:, 0]
    if y.ndim != 1:
        hint = (
            " It looks one-hot encoded; pass y.argmax(1) instead."
            if y.ndim == 2 and y.shape[0] == n and y.shape[1] > 1
            else ""
        )
        raise DataError(f"{source}: y has shape {tuple(y.shape)}; expected a vector of N={n} class labels.{hint}")
    if y.shape[0] != n:
        raise DataError(
            f"{source}: x holds {n} samples but y holds {y.shape[0]} labels; they must have the same length"
        )
    if y.is_floating_point():
        finite = torch.isfinite(y)
        not_int = ~finite | (y != torch.round(torch.where(finite, y, torch.zeros_like(y))))
        if bool(not_int.any()):
            i = _first_index(not_int)
            raise DataError(
                f"{source}: labels must be whole class numbers, but y[{i}] = {y[i].item():g}; "
                "store the class index (0, 1, 2, ...) of each sample"
            )
    y = y.to(torch.int64)
    if n and int(y.min()) < 0:
        i = _first_index(y < 0)
        raise DataError(
            f"{source}: labels must be class indices >= 0, but y[{i}] = {int(y[i])}; "
            "map the classes onto 0..K-1 before loading"
        )
    return y.contiguous()


def validate_arrays(
    x: Any,
    y: Any,
    *,
    num_classes: int | None = None,
    domain: tuple[float, float] = (0.0, 1.0),
    source: str = "arrays",
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Validate a pair of feature and label arrays and return them in bastion's canonical form.

    ``uint8`` features are 8-bit images and are divided by 255; every other numeric dtype is converted to
    float32 unchanged and must already lie inside ``domain``. Labels may be any integer dtype, or floats
    holding whole numbers; a trailing axis of length 1 is dropped. Tensors keep their device.

    Args:
        x: features, numpy array or tensor of shape (N, *feature_shape).
        y: labels, numpy array or tensor of shape (N,).
        num_classes: number of classes; ``None`` infers ``max(y) + 1``.
        domain: the input domain ``(low, high)`` every feature value must lie in.
        source: what the arrays came from (a file name, a data set name); every error message starts with it.

    Returns:
        ``(x, y, num_classes)``: x as float32, y as int64, and the number of classes.

    Raises:
        DataError: with a message naming ``source``, the problem, the offending value and what to do.
    """
    low, high = check_domain(domain, source=source)
    xt = _to_tensor(x, "x", source)
    yt = _to_tensor(y, "y", source)
    if xt.device != yt.device:
        raise DataError(f"{source}: x is on {xt.device} but y is on {yt.device}; move both to the same device")
    xt = _validate_x(xt, (low, high), source)
    n = int(xt.shape[0])
    yt = _validate_y(yt, n, source)

    if num_classes is None:
        if n == 0:
            raise DataError(f"{source}: there are no samples, so the number of classes cannot be inferred")
        k = int(yt.max()) + 1
    else:
        if isinstance(num_classes, bool) or not isinstance(num_classes, (int, np.integer)) or num_classes < 1:
            raise DataError(f"{source}: num_classes must be a positive integer, got {num_classes!r}")
        k = int(num_classes)
        if n and int(yt.max()) >= k:
            i = _first_index(yt >= k)
            raise DataError(
                f"{source}: label y[{i}] = {int(yt[i])} is outside the {k} classes [0, {k}); "
                "check the label file, or pass the right num_classes"
            )
    return xt, yt, k
