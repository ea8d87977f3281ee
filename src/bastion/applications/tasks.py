"""Small new tasks made on the fly, for repurposing a trained classifier (no download).

:func:`shapes_task` draws binary images of simple strokes (a horizontal bar, a vertical bar, the diagonal, the
anti-diagonal, a hollow square, a plus) at a random position of a small canvas, with a little salt noise: a task
with its own classes and its own input size, unrelated to the digits a source model was trained on, in the spirit
of the "counting squares" task of Elsayed, Goodfellow & Sohl-Dickstein (ICLR 2019).
"""

from __future__ import annotations

import torch

from bastion.attacks.base import positive_int
from bastion.data import Dataset
from bastion.errors import InputError

__all__ = ["SHAPES", "shapes_task"]

#: The stroke classes of :func:`shapes_task`, in label order.
SHAPES: tuple[str, ...] = ("hbar", "vbar", "diagonal", "antidiagonal", "square", "plus")


def _stroke(kind: str, s: int) -> torch.Tensor:
    """A binary ``s`` x ``s`` pattern of one stroke class."""
    p = torch.zeros(s, s)
    mid = s // 2
    if kind == "hbar":
        p[mid, :] = 1
    elif kind == "vbar":
        p[:, mid] = 1
    elif kind == "diagonal":
        p[torch.arange(s), torch.arange(s)] = 1
    elif kind == "antidiagonal":
        p[torch.arange(s), torch.arange(s - 1, -1, -1)] = 1
    elif kind == "square":
        p[0, :] = p[-1, :] = p[:, 0] = p[:, -1] = 1
    else:  # plus
        p[mid, :] = 1
        p[:, mid] = 1
    return p


def shapes_task(
    n: int = 1200,
    *,
    size: int = 4,
    stroke: int | None = None,
    classes: int = 4,
    noise: float = 0.05,
    seed: int = 0,
) -> Dataset:
    """A synthetic stroke-classification task: ``n`` images (n, 1, size, size) in [0, 1], ``classes`` classes.

    Each image holds one stroke of side ``stroke`` (default: ``size``, a fixed position) at a uniformly
    random offset inside the canvas; every pixel is then flipped to 1 with probability ``noise``. Labels are
    balanced (``i mod classes`` before shuffling) and follow :data:`SHAPES`.

    Args:
        n: number of images.
        size: side of the square canvas (>= 3).
        stroke: side of the stroke pattern, at most ``size``.
        classes: number of stroke classes, 2 to 6 (the first ``classes`` of :data:`SHAPES`).
        noise: probability that a background pixel turns on, in [0, 0.5).
        seed: seeds everything (a torch generator; nothing global).

    Returns:
        A :class:`~bastion.data.Dataset` named ``"shapes-{size}x{size}"``.
    """
    n = positive_int("n", n)
    size = positive_int("size", size)
    if size < 3:
        raise InputError(f"size must be >= 3 (strokes need room), got {size}")
    s = size if stroke is None else positive_int("stroke", stroke)
    if s > size or s < 2:
        raise InputError(f"stroke must lie in [2, size={size}], got {s}")
    k = positive_int("classes", classes)
    if not 2 <= k <= len(SHAPES):
        raise InputError(f"classes must lie in [2, {len(SHAPES)}], got {k}")
    if isinstance(noise, bool) or not isinstance(noise, (int, float)) or not 0.0 <= noise < 0.5:
        raise InputError(f"noise must be a probability in [0, 0.5), got {noise!r}")
    gen = torch.Generator().manual_seed(int(seed))
    patterns = torch.stack([_stroke(SHAPES[c], s) for c in range(k)])
    y = torch.arange(n) % k
    y = y[torch.randperm(n, generator=gen)]
    off = torch.randint(0, size - s + 1, (n, 2), generator=gen)
    x = torch.zeros(n, 1, size, size)
    for i in range(n):  # n small images built once; not a hot path
        r, c = int(off[i, 0]), int(off[i, 1])
        x[i, 0, r : r + s, c : c + s] = patterns[int(y[i])]
    x = torch.maximum(x, (torch.rand(x.shape, generator=gen) < noise).float())
    return Dataset(x, y, num_classes=k, name=f"shapes-{size}x{size}")
