"""Test generation guided by coverage: the shared loop (:mod:`.base`) and the generators (:data:`GENERATORS`)."""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import Tensor, nn

from bastion.data import Dataset
from bastion.errors import InputError
from bastion.models.checks import eval_mode, model_device
from bastion.testing.coverage.base import CoverageMetric
from bastion.testing.generate.base import (
    Budget,
    GenerationContext,
    QueryCounter,
    TestGenerator,
    TestSuiteResult,
    run_generator,
)
from bastion.testing.generate.concolic import Concolic
from bastion.testing.generate.deepxplore import DeepXplore
from bastion.testing.generate.fuzz import Fuzzer
from bastion.testing.generate.rnn import RNNMutation
from bastion.testing.registry import build
from bastion.threat import ThreatModel

__all__ = [
    "GENERATORS",
    "Budget",
    "Concolic",
    "DeepXplore",
    "Fuzzer",
    "GenerationContext",
    "QueryCounter",
    "RNNMutation",
    "TestGenerator",
    "TestSuiteResult",
    "generate_tests",
    "make_generator",
    "run_generator",
]

#: Registered generators: name -> class.
GENERATORS: dict[str, type[TestGenerator]] = {g.name: g for g in (Concolic, DeepXplore, Fuzzer, RNNMutation)}


def make_generator(method: str | TestGenerator, **options: Any) -> TestGenerator:
    """The generator registered as ``method`` with ``options`` (a TestGenerator is returned as it is).

    Raises:
        InputError: unknown method (the valid ones are listed) or an option the generator does not take.
    """
    return build(GENERATORS, method, TestGenerator, "test generation method", **options)


def generate_tests(
    model: nn.Module,
    data: Dataset | tuple[Tensor, Tensor],
    criterion: str | CoverageMetric = "nc",
    method: str | TestGenerator = "concolic",
    *,
    threat: ThreatModel | None = None,
    budget: int | Budget = 100,
    profile: Dataset | tuple[Tensor, Tensor] | Tensor | None = None,
    store: Any = None,
    checkpoint: str | os.PathLike[str] | None = None,
    seed: int = 0,
    batch_size: int = 256,
    progress: bool = True,
    criterion_options: dict[str, Any] | None = None,
    **options: Any,
) -> TestSuiteResult:
    """Generate tests from the seeds ``data`` that raise ``criterion``'s coverage of ``model``.

    Args:
        model: the model under test.
        data: the seeds: a Dataset or a pair ``(x, y)`` (labels decide which tests are adversarial).
        criterion: a coverage metric name (:data:`bastion.testing.coverage.METRICS`) or object.
        method: a generator name (:data:`GENERATORS`) or object.
        threat: the set the tests must stay in around their seed (e.g. ``LpBall("linf", 0.3)``); a test that
            changes the label inside it is an adversarial example. ``None``: anywhere in the input domain.
        budget: iterations (an int) or a :class:`Budget` of iterations, model queries and seconds.
        profile: the profiling set of criteria that need neuron ranges (e.g. the training data).
        store: a Store or a path: one record per kept test, written as the run goes.
        checkpoint: a file the run saves its state to every iteration; an existing one is resumed.
        seed: seed of the generator's random numbers.
        batch_size: inputs per forward pass when measuring the seeds.
        progress: show a progress bar with the current coverage.
        criterion_options: parameters of the criterion (e.g. ``{"threshold": 0.5}``).
        **options: the generator's options.

    Example:
        >>> suite = generate_tests(model, test_set.subset(range(100)), "nc", "concolic",
        ...                        threat=LpBall("linf", 0.3), budget=200)  # doctest: +SKIP
        >>> print(suite.table())  # doctest: +SKIP
    """
    from bastion.testing.coverage import make_metric

    if isinstance(data, tuple):
        data = Dataset(*data, num_classes=int(torch.as_tensor(data[1]).max()) + 1, name="tensors")
    if not isinstance(data, Dataset):
        raise InputError(f"data must be a bastion Dataset or a pair (x, y), got {type(data).__name__}")
    if threat is not None:
        if not isinstance(threat, ThreatModel):
            raise InputError(f"threat must be a ThreatModel such as LpBall('linf', 0.3), got {threat!r}")
        if threat.domain != data.domain:
            raise InputError(f"threat {threat!r} has domain {threat.domain} but the data's domain is {data.domain}")
    metric = make_metric(criterion, **(criterion_options or {}))
    generator = make_generator(method, **options)
    if isinstance(budget, bool) or not isinstance(budget, (int, Budget)):
        raise InputError(f"budget must be a number of iterations or a Budget, got {budget!r}")
    budget = Budget(iterations=budget) if isinstance(budget, int) else budget
    if metric.needs_profile and not metric.profiled:
        if profile is None:
            raise InputError(f"the {metric.name} criterion needs a profiling set: pass profile=... (e.g. the training "
                             "data)")  # fmt: skip
        from bastion.testing.coverage import _inputs

        metric.bind(model)
        with eval_mode(model):
            metric.profile(model, _inputs(profile, "profile").to(model_device(model)), batch_size=batch_size)
    return run_generator(
        model, data.x, data.y, metric, generator, threat=threat, domain=data.domain, budget=budget, seed=seed,
        store=store, checkpoint=checkpoint, batch_size=batch_size, progress=progress,
    )  # fmt: skip
