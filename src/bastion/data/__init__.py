"""Data sets: the :class:`Dataset` container, its validation, and loaders for common formats.

Built in: scikit-learn's 8x8 digits (:func:`load_digits`), also as sequences of 8 rows
(:func:`load_digits_sequences`, spec ``"digits-seq"``). From the user's files: MNIST IDX
(:func:`load_mnist`), CIFAR-10 binary batches (:func:`load_cifar10`), ``.npz`` / ``.npy`` arrays and numeric
CSV. :func:`load_data` picks the loader from a short spec such as ``"mnist:~/data/mnist:train"``. Nothing is
ever downloaded.
"""

from __future__ import annotations

from bastion.data.dataset import Dataset, as_dataset
from bastion.data.loaders import (
    load_cifar10,
    load_csv,
    load_data,
    load_digits,
    load_digits_sequences,
    load_mnist,
    load_npy,
    load_npz,
)
from bastion.data.validation import validate_arrays

__all__ = [
    "Dataset",
    "as_dataset",
    "load_cifar10",
    "load_csv",
    "load_data",
    "load_digits",
    "load_digits_sequences",
    "load_mnist",
    "load_npy",
    "load_npz",
    "validate_arrays",
]
