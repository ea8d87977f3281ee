"""Helpers shared by everything that runs a model: eval mode, device, output contract, fingerprint."""

from __future__ import annotations

import hashlib
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from itertools import chain
from typing import TypeVar

import torch
from torch import Tensor, nn

from bastion.errors import BastionWarning, ModelError

__all__ = [
    "channels_last",
    "check_logits",
    "eval_mode",
    "looks_like_probabilities",
    "model_device",
    "model_fingerprint",
]

M = TypeVar("M", bound=nn.Module)

_PROB_TOL = 1e-4


@contextmanager
def eval_mode(model: M) -> Iterator[M]:
    """Put ``model`` in eval mode for the duration of a ``with`` block, then restore it exactly.

    The ``training`` flag of every submodule is recorded first and written back afterwards (also when the
    block raises), so a model whose submodules were in mixed modes, e.g. a frozen batch-norm inside a training
    network, comes back as it was. ``model.train(flag)`` would not: it sets one flag on the whole tree.

    Args:
        model: the model.

    Yields:
        The same model, in eval mode.
    """
    flags = [(m, m.training) for m in model.modules()]
    try:
        model.eval()
    except NotImplementedError:
        # Modules returned by torch.export refuse train()/eval(); their graph is fixed anyway, so setting the
        # flags directly is all that can be done and keeps code that reads ``training`` consistent.
        for m, _ in flags:
            m.training = False
    try:
        yield model
    finally:
        for m, flag in flags:
            m.training = flag


@contextmanager
def channels_last(model: M, enabled: bool | None = None) -> Iterator[M]:
    """Store the weights of ``model``'s 2-D convolutions channels-last for a ``with`` block, then restore them.

    The layout of a weight is a storage order only: the convolution computes the same function, and oneDNN, which
    runs convolutions on the CPU, has fast kernels for channels-last weights that it cannot use for PyTorch's
    default (NCHW) order. On the 2-conv MNIST cnn of the benchmarks this made a forward pass 1.8-1.9x and a forward
    and backward pass 1.2-1.3x faster at batch sizes 34-360 (2-core CPU, one thread); on a small ResNet 1.2x and
    1.2-1.45x (``benchmarks/RESULTS.md``, issue 17). The outputs differ from the default layout's by float32
    rounding only (about 1e-6 on those models), the same kind of difference a change of batch size makes.

    Only plain ``nn.Conv2d`` weights on the CPU are converted (a parametrised weight, e.g. spectral
    normalisation's, is left alone, and so is every GPU model: on CUDA the fast layout depends on the precision and
    the card). Each converted weight keeps its identity (``.data`` is swapped), so optimisers and hooks holding it
    are unaffected, and gets its original layout back when the block ends, also when it raises.

    Args:
        model: the model.
        enabled: ``False`` does nothing; ``None`` or ``True`` converts the weights described above.

    Yields:
        The same model.
    """
    if enabled is False:
        yield model
        return
    converted: list[tuple[nn.Parameter, Tensor]] = []
    for m in model.modules():
        if not isinstance(m, nn.Conv2d):
            continue
        w = m._parameters.get("weight")
        if (
            isinstance(w, nn.Parameter)
            and not isinstance(w, nn.parameter.UninitializedParameter)
            and w.device.type == "cpu"
            and w.dim() == 4
        ):
            # NHWC strides, always: ``contiguous(memory_format=...)`` keeps a weight with one input channel as it
            # is (its strides count as both layouts), and then the convolution stays on the slow kernels and hands
            # the next layer NCHW activations
            cl = torch.empty_like(w.data, memory_format=torch.channels_last).copy_(w.data)
            if cl.stride() != w.data.stride():
                converted.append((w, w.data))
                w.data = cl
    try:
        yield model
    finally:
        for w, original in converted:
            # the original storage, with its own strides, gets the (unchanged) values back
            original.copy_(w.data)
            w.data = original


def model_device(model: nn.Module) -> torch.device:
    """Device of the model's first parameter or buffer.

    Args:
        model: the model.

    Returns:
        That device, or ``cpu`` for a model without parameters or buffers.
    """
    for t in chain(model.parameters(), model.buffers()):
        return t.device
    return torch.device("cpu")


def check_logits(logits: object, n: int, *, where: str = "model output") -> int:
    """Check that a model output is a batch of logits, and warn when it looks like probabilities.

    Args:
        logits: what the model returned for a batch of ``n`` inputs.
        n: the batch size.
        where: how to name the checked value in messages.

    Returns:
        The number of classes ``K``.

    Raises:
        ModelError: the output is not a finite floating tensor of shape ``(n, K)`` with ``K >= 2``.
    """
    expected = f"a classifier returning (N, K) logits with K >= 2 (here N = {n})"
    if not isinstance(logits, Tensor):
        raise ModelError(f"{where}: got a {type(logits).__name__}, expected a tensor from {expected}")
    shape = tuple(logits.shape)
    if logits.dim() != 2 or shape[0] != n or shape[1] < 2:
        hint = ""
        if logits.dim() == 1 and shape[0] == n:
            hint = "; a single score per input (binary classifier?) must be turned into two logits, e.g. [-s, s]"
        elif logits.dim() > 2:
            hint = "; flatten or squeeze the output to (N, K)"
        raise ModelError(f"{where}: got shape {shape}, expected {expected}{hint}")
    if not logits.dtype.is_floating_point:
        raise ModelError(f"{where}: got dtype {logits.dtype}, expected floating-point logits from {expected}")
    values = logits.detach()
    if not bool(torch.isfinite(values).all()):
        bad = int((~torch.isfinite(values)).any(dim=1).sum())
        raise ModelError(
            f"{where}: {bad} of {n} rows contain NaN or Inf; expected finite logits from {expected} "
            "(check the model weights and that inputs are in the input domain)"
        )
    if n > 0 and looks_like_probabilities(values):
        warnings.warn(
            f"{where}: every row is non-negative and sums to 1, so the model seems to return "
            "probabilities (a final softmax). Gradient-based attacks are weakened by saturated softmax "
            "outputs and can overestimate robustness; remove the final softmax so that the model returns "
            "logits.",
            BastionWarning,
            stacklevel=2,
        )
    return int(shape[1])


def looks_like_probabilities(logits: Tensor) -> bool:
    """True when every row is non-negative and sums to 1: the model returns probabilities, not logits."""
    values = logits.detach()
    return bool((values >= 0).all()) and bool(((values.to(torch.float64).sum(dim=1) - 1.0).abs() <= _PROB_TOL).all())


def model_fingerprint(model: nn.Module) -> str:
    """SHA-256 of a model's state dict, stable across processes and devices.

    Every entry is hashed in sorted name order with its name, shape, dtype and raw bytes, so a change to any
    weight or buffer (including batch-norm statistics) changes the fingerprint, while the architecture's
    Python code does not enter it.

    Args:
        model: the model.

    Returns:
        The hex digest (64 characters).
    """
    digest = hashlib.sha256()
    state = model.state_dict()
    for name in sorted(state):
        value = state[name]
        digest.update(name.encode("utf-8") + b"\0")
        if not isinstance(value, Tensor):
            # Extra state set by a custom module: hash its repr rather than fail.
            digest.update(b"extra\0" + repr(value).encode("utf-8") + b"\0")
            continue
        t = value.detach()
        digest.update(f"{tuple(t.shape)}|{t.dtype}\0".encode())
        raw = t.to("cpu").contiguous().reshape(-1).view(torch.uint8)
        digest.update(len(raw).to_bytes(8, "little"))
        digest.update(raw.numpy().tobytes())
    return digest.hexdigest()
