"""Building a registered criterion or generator by name, with its options checked against the constructor."""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import Any, TypeVar

from bastion.errors import InputError

T = TypeVar("T")


def build(
    registry: Mapping[str, type[T]], name: str | T, base: type[T], what: str, noun: str = "option", **options: Any
) -> T:
    """``registry[name](**options)``; an instance of ``base`` is returned as it is.

    Args:
        registry: name -> class.
        name: a registered name, or an object already built.
        base: the registry's base class.
        what: what the registry holds, for messages (``"coverage metric"``, ``"test generation method"``).
        noun: what the constructor's arguments are called in messages (``"parameter"``, ``"option"``).
        **options: the constructor's keyword arguments.

    Raises:
        InputError: unknown name (the valid ones are listed), an option the class does not take (its options are
            listed), or options given with an object already built.
    """
    if isinstance(name, base):
        if options:
            raise InputError(f"give {noun}s either to the {what} object or as keywords, not both")
        return name
    key = str(name).strip().lower()
    if key not in registry:
        raise InputError(f"unknown {what} {name!r}; choose one of {', '.join(registry)}")
    cls = registry[key]
    accepted = [p for p in inspect.signature(cls.__init__).parameters if p not in ("self", "args", "kwargs")]
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise InputError(f"{what.split()[-1]} {key!r} has no {noun} {', '.join(map(repr, unknown))}; its {noun}s are "
                         f"{', '.join(accepted) or 'none'}")  # fmt: skip
    return cls(**options)
