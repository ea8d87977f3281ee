"""Exceptions and warnings raised by bastion.

Every error a user can trigger with bad input is an :class:`InputError` (a ``ValueError``) whose message names the
argument, the offending value and what to do about it.
"""

from __future__ import annotations


class BastionError(Exception):
    """Base class of every error bastion raises on purpose."""


class InputError(BastionError, ValueError):
    """An argument given to a public entry point is invalid (shape, dtype, range, unknown name, ...)."""


class DataError(InputError):
    """A data file or data set is missing or malformed."""


class ModelError(InputError):
    """A model cannot be loaded, or does not behave like a classifier returning (N, K) logits."""


class StoreError(BastionError):
    """A result store is unreadable, from an incompatible version, or inconsistent with the run asked for."""


class BastionWarning(UserWarning):
    """A result may be misleading (softmax outputs, signs of gradient masking, ...)."""
