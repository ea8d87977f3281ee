"""The in-memory labelled data set that every part of bastion consumes."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, TypeAlias

import numpy as np
import torch

from bastion.data.validation import validate_arrays
from bastion.errors import DataError, InputError

__all__ = ["Dataset", "IndexLike", "as_dataset"]

IndexLike: TypeAlias = slice | Sequence[int] | np.ndarray | torch.Tensor


def _as_index(idx: Any, n: int, what: str = "index") -> torch.Tensor:
    """Turn a slice, a sequence, an array or a tensor of positions (or a boolean mask) into a CPU LongTensor.

    Negative positions count from the end, as in numpy; the result holds non-negative positions only.
    """
    if isinstance(idx, slice):
        start, stop, step = idx.indices(n)
        return torch.arange(start, stop, step, dtype=torch.int64)
    if isinstance(idx, (bool, int, np.integer)):
        raise InputError(f"{what} must be a slice or a sequence of positions, got the single value {idx!r}; use [i]")
    if isinstance(idx, torch.Tensor):
        t = idx.detach().cpu()
    else:
        try:
            arr = np.asarray(idx)
        except (TypeError, ValueError) as exc:
            raise InputError(f"{what} cannot be read as positions: {exc}") from None
        if arr.size == 0:
            return torch.zeros(0, dtype=torch.int64)
        if arr.dtype.kind not in "iub":
            raise InputError(f"{what} must hold integer positions or booleans, got dtype {arr.dtype}")
        t = torch.from_numpy(np.ascontiguousarray(arr.astype(np.bool_ if arr.dtype.kind == "b" else np.int64)))
    if t.ndim != 1:
        raise InputError(f"{what} must be one-dimensional, got shape {tuple(t.shape)}")
    if t.numel() == 0:
        return torch.zeros(0, dtype=torch.int64)
    if t.dtype == torch.bool:
        if t.shape[0] != n:
            raise InputError(f"{what} is a boolean mask of length {t.shape[0]}, but the data set holds {n} samples")
        return torch.nonzero(t).reshape(-1)
    if t.is_floating_point() or t.is_complex():
        raise InputError(f"{what} must hold integer positions, got dtype {t.dtype}")
    t = t.to(torch.int64)
    bad = (t < -n) | (t >= n)
    if bool(bad.any()):
        first = int(t[bad][0])
        raise InputError(f"{what} holds position {first}, outside the {n} samples of the data set")
    return torch.where(t < 0, t + n, t)


@dataclass(frozen=True, eq=False)
class Dataset:
    """A labelled data set held in memory as tensors.

    Construction validates everything through :func:`~bastion.data.validate_arrays`: ``x`` ends up float32
    with every value inside ``domain`` (``uint8`` input is divided by 255), ``y`` int64 in
    ``[0, num_classes)``.
    Numpy arrays are accepted and converted. The object is frozen; derived data sets (:meth:`subset`,
    :meth:`split`, ...) are new objects that share no state with this one except possibly storage.

    Attributes:
        x: features, float32 of shape (N, *feature_shape).
        y: labels, int64 of shape (N,).
        num_classes: number of classes K; labels lie in [0, K).
        name: a human-readable description of where the data came from.
        domain: the input domain (low, high) every feature value lies in.
    """

    x: torch.Tensor
    y: torch.Tensor
    num_classes: int
    name: str
    domain: tuple[float, float] = (0.0, 1.0)

    def __post_init__(self) -> None:
        if not isinstance(self.name, str):
            raise DataError(f"the data set name must be a string, got {self.name!r}")
        if self.num_classes is None:
            raise DataError(f"data set {self.name!r}: num_classes is required")
        x, y, k = validate_arrays(
            self.x, self.y, num_classes=self.num_classes, domain=self.domain, source=f"data set {self.name!r}"
        )
        # Frozen dataclass: normalised values are written once, here, and never again.
        object.__setattr__(self, "x", x)
        object.__setattr__(self, "y", y)
        object.__setattr__(self, "num_classes", k)
        object.__setattr__(self, "domain", (float(self.domain[0]), float(self.domain[1])))

    @classmethod
    def _trusted(
        cls, x: torch.Tensor, y: torch.Tensor, num_classes: int, name: str, domain: tuple[float, float]
    ) -> Dataset:
        """Build a data set from parts of one already validated, skipping the checks they already passed."""
        obj = object.__new__(cls)
        for key, value in (
            ("x", x),
            ("y", y),
            ("num_classes", num_classes),
            ("name", name),
            ("domain", domain),
        ):
            object.__setattr__(obj, key, value)
        return obj

    def __len__(self) -> int:
        return int(self.x.shape[0])

    def __repr__(self) -> str:
        return (
            f"Dataset(name={self.name!r}, n={len(self)}, feature_shape={self.feature_shape}, "
            f"num_classes={self.num_classes}, domain={self.domain})"
        )

    @property
    def feature_shape(self) -> tuple[int, ...]:
        """Shape of one sample, ``x.shape[1:]``."""
        return tuple(int(d) for d in self.x.shape[1:])

    def class_counts(self) -> torch.Tensor:
        """Number of samples of each class, an int64 tensor of length ``num_classes``."""
        return torch.bincount(self.y.cpu(), minlength=self.num_classes)

    def subset(self, idx: IndexLike, *, name: str | None = None) -> Dataset:
        """The samples at the given positions, in the order given.

        Args:
            idx: a slice, a list of positions, a numpy array or a LongTensor of positions, or a boolean
                mask of length N. Negative positions count from the end.
            name: name of the new data set; by default this data set's name.

        Returns:
            A new :class:`Dataset` with the same ``num_classes`` and ``domain``.
        """
        positions = _as_index(idx, len(self), "subset index")
        dev = self.x.device
        return Dataset._trusted(
            self.x[positions.to(dev)],
            self.y[positions.to(self.y.device)],
            self.num_classes,
            self.name if name is None else name,
            self.domain,
        )

    def batches(
        self, batch_size: int, indices: Sequence[int] | np.ndarray | torch.Tensor | None = None
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """Iterate over the data in order, a batch at a time.

        Args:
            batch_size: maximum number of samples per batch (the last batch may be smaller).
            indices: positions to visit, in this order; all samples by default.

        Yields:
            ``(idx, x, y)``: ``idx`` a CPU LongTensor of the positions in this data set, ``x`` and ``y`` the
            corresponding samples on the data set's device.
        """
        if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
            raise InputError(f"batch_size must be a positive integer, got {batch_size!r}")
        n = len(self)
        positions = torch.arange(n) if indices is None else _as_index(indices, n, "batches indices")
        dev = self.x.device
        for start in range(0, positions.shape[0], int(batch_size)):
            idx = positions[start : start + int(batch_size)]
            on_dev = idx.to(dev)
            yield idx, self.x[on_dev], self.y[on_dev]

    def split(self, n_first: int) -> tuple[Dataset, Dataset]:
        """Split into the first ``n_first`` samples and the rest, keeping the order.

        Args:
            n_first: number of samples in the first part, ``0 <= n_first <= N``.

        Returns:
            ``(first, rest)``, named ``"<name>[:n_first]"`` and ``"<name>[n_first:]"``.
        """
        n = len(self)
        if isinstance(n_first, bool) or not isinstance(n_first, (int, np.integer)) or not 0 <= n_first <= n:
            raise InputError(f"n_first must be an integer in [0, {n}] for a data set of {n} samples, got {n_first!r}")
        k = int(n_first)
        return (
            self.subset(slice(0, k), name=f"{self.name}[:{k}]"),
            self.subset(slice(k, n), name=f"{self.name}[{k}:]"),
        )

    def train_test_split(self, test_fraction: float = 0.2, seed: int = 0) -> tuple[Dataset, Dataset]:
        """Stratified random split into a training and a test part.

        The test part holds ``ceil(test_fraction * N)`` samples, shared out among the classes in proportion to
        their sizes (largest remainders get the leftover samples). Which samples go where depends only on
        ``seed`` and the labels, through an integer hash that does not depend on numpy or torch versions, so a
        split is reproducible everywhere. Both parts keep the original order of the samples.

        Args:
            test_fraction: fraction of the samples in the test part, strictly between 0 and 1.
            seed: seed of the shuffle.

        Returns:
            ``(train, test)``, named ``"<name> (train)"`` and ``"<name> (test)"``.
        """
        n = len(self)
        try:
            frac = float(test_fraction)
        except (TypeError, ValueError):
            raise InputError(f"test_fraction must be a number in (0, 1), got {test_fraction!r}") from None
        if not 0.0 < frac < 1.0:
            raise InputError(f"test_fraction must lie strictly between 0 and 1, got {test_fraction!r}")
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
            raise InputError(f"seed must be an integer, got {seed!r}")
        if n < 2:
            raise InputError(f"data set {self.name!r} has {n} sample(s); a train/test split needs at least 2")
        n_test = min(max(int(np.ceil(frac * n - 1e-9)), 1), n - 1)

        labels = self.y.cpu().numpy()
        counts = np.bincount(labels, minlength=self.num_classes)
        quota = counts * (n_test / n)
        per_class = np.floor(quota).astype(np.int64)
        leftover = n_test - int(per_class.sum())
        if leftover > 0:
            # Largest remainder first; ties go to the lower class index (stable sort on minus the remainder).
            order = np.argsort(-(quota - per_class), kind="stable")
            per_class[order[:leftover]] += 1

        keys = _hash_positions(n, int(seed))
        is_test = np.zeros(n, dtype=bool)
        for c in np.nonzero(per_class)[0]:
            members = np.nonzero(labels == c)[0]
            chosen = members[np.argsort(keys[members], kind="stable")[: per_class[c]]]
            is_test[chosen] = True
        test_idx = np.nonzero(is_test)[0]
        train_idx = np.nonzero(~is_test)[0]
        return (
            self.subset(train_idx, name=f"{self.name} (train)"),
            self.subset(test_idx, name=f"{self.name} (test)"),
        )

    def fingerprint(self) -> str:
        """SHA-256 hex digest of the shapes, dtypes and raw bytes of ``x`` and ``y``.

        Equal for equal data in any process on any run, different as soon as one value, the shape or the dtype
        differs. ``name``, ``num_classes`` and ``domain`` are not part of it.
        """
        h = hashlib.sha256()
        for key, t in (("x", self.x), ("y", self.y)):
            arr = np.ascontiguousarray(t.detach().cpu().numpy())
            # Little-endian bytes so the digest does not depend on the machine's byte order.
            arr = arr.astype(arr.dtype.newbyteorder("<"), copy=False)
            h.update(f"{key}:{tuple(arr.shape)}:{t.dtype};".encode())
            # A flat byte view hashes without copying the tensor's storage.
            h.update(arr.reshape(-1).view(np.uint8).data)
        return h.hexdigest()


_MASK64 = np.uint64(0xFFFFFFFFFFFFFFFF)


def _hash_positions(n: int, seed: int) -> np.ndarray:
    """SplitMix64 of ``(seed, position)`` for every position: a portable, seeded pseudo-random sort key."""
    with np.errstate(over="ignore"):
        z = np.arange(n, dtype=np.uint64) + np.uint64((seed * 0x9E3779B97F4A7C15) & 0xFFFFFFFFFFFFFFFF)
        z = (z + np.uint64(0x9E3779B97F4A7C15)) & _MASK64
        z = ((z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)) & _MASK64
        z = ((z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)) & _MASK64
        return z ^ (z >> np.uint64(31))


def as_dataset(data: Dataset | tuple[torch.Tensor, torch.Tensor]) -> Dataset:
    """``data`` as a :class:`Dataset`: a Dataset as it is, a pair ``(x, y)`` wrapped (classes: ``max(y) + 1``).

    Raises:
        InputError: anything else.
    """
    if isinstance(data, tuple):
        if len(data) != 2:
            raise InputError("data must be a bastion Dataset or a pair (x, y)")
        y = torch.as_tensor(data[1])
        return Dataset(data[0], y, num_classes=int(y.max()) + 1 if y.numel() else 1, name="tensors")
    if not isinstance(data, Dataset):
        raise InputError(f"data must be a bastion Dataset or a pair (x, y), got {type(data).__name__}")
    return data
