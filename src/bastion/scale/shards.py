"""Sharding of a sample-level job: which samples each shard computes and writes, and the views workers run on.

Pure Python and PyTorch, no Ray: the planning and the exactly-once bookkeeping are tested without a cluster.

Why shards are made of whole batches. The single-process jobs (:func:`bastion.evaluate.evaluate`,
:func:`bastion.verify.certify.certify`, :func:`bastion.verify.assess.assess`) work batch by batch, and the
attacks' random starts are seeded per batch (``seed * 1_000_003 + first index of the batch``) and drawn for the
whole batch at once, so a sample's result depends on which batch it sits in. A shard therefore holds whole batches
of the single-process run, ``[k * batch_size, (k + 1) * batch_size)`` in the original indices, and a worker runs the
ordinary API on an :class:`IndexedShard` that yields exactly those batches with their original indices: every
sample gets the seed, the batch companions and hence the result it gets in a single process.

Resuming. A batch with any sample left to do is computed whole (so its samples keep their batch companions), but
only the samples not yet in the store are written: a record already stored is never replaced. No sample is padded
or duplicated (the last batch is short, as in the single-process run), and the shards' ``todo`` lists partition the
samples left to do.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from bastion.data import Dataset
from bastion.errors import InputError

__all__ = ["IndexedShard", "Shard", "plan_shards", "split_evenly"]


@dataclass(frozen=True)
class Shard:
    """One unit of work of a sharded job.

    Attributes:
        number: position of the shard in the plan (0-based).
        positions: original indices the worker computes: whole batches of the single-process run, in order.
        todo: the subset of ``positions`` whose records are written (those not yet in the store).
    """

    number: int
    positions: tuple[int, ...]
    todo: tuple[int, ...]

    def describe(self) -> str:
        """``"shard 3 (samples 96-127)"``: for messages."""
        return f"shard {self.number} (samples {self.positions[0]}-{self.positions[-1]})"


def split_evenly(n_items: int, parts: int) -> list[range]:
    """``range(n_items)`` cut into ``min(parts, n_items)`` consecutive, non-empty pieces whose sizes differ by <= 1."""
    parts = max(1, min(int(parts), n_items))
    if n_items == 0:
        return []
    base, extra = divmod(n_items, parts)
    out, start = [], 0
    for k in range(parts):
        size = base + (k < extra)
        out.append(range(start, start + size))
        start += size
    return out


def _check_count(value: object, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise InputError(f"{what} must be a positive integer, got {value!r}")
    return int(value)


def plan_shards(
    n: int, batch_size: int, *, done: set[int] | frozenset[int] = frozenset(), shards: int | None = None
) -> list[Shard]:
    """The shards of a job over ``n`` samples processed ``batch_size`` at a time, skipping what is ``done``.

    Args:
        n: number of samples of the job.
        batch_size: the job's batch size (the single-process run's batches are ``[k*b, (k+1)*b)``).
        done: indices already stored (e.g. :attr:`RunSession.done <bastion.store.RunSession.done>`).
        shards: number of shards; ``None`` for one per batch left to do (the finest split, and the store's own
            granularity). Capped at the number of batches left to do.

    Returns:
        The shards, in index order. Their ``todo`` lists are disjoint and together hold every index of
        ``range(n)`` not in ``done``, each once; their ``positions`` are whole batches, none past ``n``.

    Raises:
        InputError: ``n`` is negative, or ``batch_size`` / ``shards`` is not a positive integer.
    """
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 0:
        raise InputError(f"n must be an integer >= 0, got {n!r}")
    b = _check_count(batch_size, "batch_size")
    if shards is not None:
        shards = _check_count(shards, "shards")
    blocks = []
    for k in range(math.ceil(int(n) / b)):
        block = range(k * b, min((k + 1) * b, int(n)))
        if any(i not in done for i in block):
            blocks.append(block)
    groups = split_evenly(len(blocks), len(blocks) if shards is None else shards)
    plan = []
    for number, group in enumerate(groups):
        positions = tuple(i for g in group for i in blocks[g])
        plan.append(Shard(number, positions, tuple(i for i in positions if i not in done)))
    return plan


class IndexedShard(Dataset):
    """Some samples of a data set that keep their original indices and their original batches.

    :meth:`batches` yields the original indices as ``idx`` and groups the samples by ``index // batch_size``, the
    batches of the single-process run over the whole data set, so the ordinary single-process API run on this view
    writes records with the original indices and seeds its batches as it would on the whole data.
    :meth:`fingerprint` is that of the whole data set the shard comes from. Everything else (``x``, ``y``,
    ``len``, :meth:`subset`) is that of the shard's own samples.
    """

    origin: torch.Tensor
    parent_fingerprint: str

    @classmethod
    def of(
        cls, data: Dataset, positions: Sequence[int] | torch.Tensor, *, fingerprint: str | None = None
    ) -> IndexedShard:
        """The samples of ``data`` at ``positions`` (increasing original indices).

        Args:
            data: the whole data set.
            positions: original indices, increasing.
            fingerprint: ``data.fingerprint()`` if already known (it costs a pass over the data).
        """
        pos = torch.as_tensor(
            list(positions) if not isinstance(positions, torch.Tensor) else positions, dtype=torch.int64
        )
        if pos.numel() > 1 and not bool((pos[1:] > pos[:-1]).all()):
            raise InputError("IndexedShard positions must be strictly increasing")
        sub = data.subset(pos)
        return cls.from_arrays(
            sub.x, sub.y, pos, num_classes=data.num_classes, name=data.name, domain=data.domain,
            fingerprint=data.fingerprint() if fingerprint is None else fingerprint,
        )  # fmt: skip

    @classmethod
    def from_arrays(
        cls,
        x: torch.Tensor,
        y: torch.Tensor,
        origin: torch.Tensor,
        *,
        num_classes: int,
        name: str,
        domain: tuple[float, float],
        fingerprint: str,
    ) -> IndexedShard:
        """A shard from tensors already validated by a :class:`Dataset` (as shipped to a worker)."""
        obj = cls._trusted(x, y, num_classes, name, domain)
        object.__setattr__(obj, "origin", torch.as_tensor(origin, dtype=torch.int64).cpu())
        object.__setattr__(obj, "parent_fingerprint", fingerprint)
        return obj  # type: ignore[return-value]

    def batches(
        self, batch_size: int, indices: Sequence[int] | np.ndarray | torch.Tensor | None = None
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """The samples (all, or the local ``indices``) grouped into the whole data set's batches.

        Yields:
            ``(idx, x, y)`` with ``idx`` the original indices (a CPU LongTensor).
        """
        b = _check_count(batch_size, "batch_size")
        local = torch.arange(len(self)) if indices is None else torch.as_tensor(list(indices), dtype=torch.int64)
        if local.numel() == 0:
            return
        block = self.origin[local] // b
        cuts = [0, *((block[1:] != block[:-1]).nonzero().reshape(-1) + 1).tolist(), local.numel()]
        dev = self.x.device
        for start, stop in itertools.pairwise(cuts):
            sel = local[start:stop]
            on_dev = sel.to(dev)
            yield self.origin[sel], self.x[on_dev], self.y[on_dev]

    def fingerprint(self) -> str:
        """The fingerprint of the whole data set this shard belongs to."""
        return self.parent_fingerprint

    def __repr__(self) -> str:
        return f"IndexedShard(name={self.name!r}, n={len(self)}, of data {self.parent_fingerprint[:12]})"
