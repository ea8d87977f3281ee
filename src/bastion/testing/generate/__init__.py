"""Test generation guided by coverage: the shared loop (:mod:`.base`) and the generators (:data:`GENERATORS`)."""

from __future__ import annotations

from bastion.testing.generate.base import (
    Budget,
    GenerationContext,
    QueryCounter,
    TestGenerator,
    TestSuiteResult,
    run_generator,
)

__all__ = [
    "GENERATORS",
    "Budget",
    "GenerationContext",
    "QueryCounter",
    "TestGenerator",
    "TestSuiteResult",
    "run_generator",
]

#: Registered generators: name -> class (filled by the generator modules).
GENERATORS: dict[str, type[TestGenerator]] = {}
