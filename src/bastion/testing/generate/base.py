"""The loop every test generator shares: budgets, coverage bookkeeping, records, checkpoints and resume.

A generator (:class:`TestGenerator`) proposes candidate tests, one *iteration* at a time, from the seed inputs and
the tests kept so far; the loop of :func:`run_generator`

1. asks the generator for candidates (``propose``), each derived from an *origin* seed;
2. runs the model on them once (through a :class:`QueryCounter` that counts every input the model sees, probes
   included) and folds their activations into the coverage criterion;
3. keeps the candidates the generator accepts (by default: those that raised coverage), re-predicts them, marks
   as *adversarial* those whose prediction differs from their seed's label while they lie inside the threat set,
   writes one :class:`~bastion.results.SampleRecord` per kept test to the store and, every iteration, a checkpoint
   (tests, coverage state, generator state, random state) from which a killed run resumes without repeating or
   losing a test;
4. stops at the first budget reached: iterations, model queries or seconds. The queries are those of the
   generation (the generator's own and the loop's re-executions); the one pass that measures the seeds' coverage
   is not part of the budget.

Records: ``index`` is the test's number in the suite, ``label`` its seed's label, ``clean_pred`` the model's
prediction on the test, ``status`` ``"falsified"`` for an adversarial test (``adv_distance`` its distance to the
seed in the threat's norm) and ``"unknown"`` otherwise, ``attack`` the generator's name.
"""

from __future__ import annotations

import copy
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from bastion.errors import InputError
from bastion.models.checks import eval_mode, model_device, model_fingerprint
from bastion.results import SampleRecord
from bastion.testing.coverage.base import CoverageMetric, CoverageReport, LayerProbe
from bastion.threat import ThreatModel

__all__ = ["Budget", "GenerationContext", "QueryCounter", "TestGenerator", "TestSuiteResult", "run_generator"]


class QueryCounter(nn.Module):
    """Wraps a model and counts the inputs it is queried on (``queries``), forward passes of every kind."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.queries = 0

    def forward(self, x: Tensor) -> Tensor:
        self.queries += int(x.shape[0])
        return self.model(x)


@dataclass(frozen=True)
class Budget:
    """When a generation run stops: after ``iterations``, ``queries`` model inputs or ``seconds`` (None: no limit)."""

    iterations: int | None = 100
    queries: int | None = None
    seconds: float | None = None

    def __post_init__(self) -> None:
        for name in ("iterations", "queries"):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
                raise InputError(f"budget {name} must be an integer >= 1 or None, got {v!r}")
        if self.seconds is not None and not (isinstance(self.seconds, (int, float)) and self.seconds > 0):
            raise InputError(f"budget seconds must be a number > 0 or None, got {self.seconds!r}")
        if self.iterations is None and self.queries is None and self.seconds is None:
            raise InputError("a generation budget needs at least one limit: iterations, queries or seconds")


@dataclass
class GenerationContext:
    """What a generator sees: the model, the criterion and its state, the seeds, the tests kept so far.

    Attributes:
        model: the model under test, wrapped in a :class:`QueryCounter` (query it only through this).
        metric: the coverage criterion, updated with the seeds and every kept test.
        layers: the layers under test (``metric.layers``).
        seeds: seed inputs ``(S, ...)`` on the model's device; ``seed_labels`` their labels ``(S,)``.
        tests: tests kept so far ``(M, ...)``; ``origins`` their seeds' indices ``(M,)``.
        threat: the threat set the tests must stay in around their seed (None: only the input domain).
        domain: the input domain ``(lo, hi)``.
        generator: the run's random generator (checkpointed).
        iteration: the current iteration (0-based).
        queries_left: model inputs left in the budget (None: no limit); a generator must not propose more.
    """

    model: QueryCounter
    metric: CoverageMetric
    layers: list[str]
    seeds: Tensor
    seed_labels: Tensor
    tests: Tensor
    origins: Tensor
    threat: ThreatModel | None
    domain: tuple[float, float]
    generator: torch.Generator
    iteration: int = 0
    queries_left: int | None = None

    def probe(self, x: Tensor, *, keep_graph: bool = False) -> tuple[Tensor, dict[str, Tensor]]:
        """Logits and layer outputs of ``x`` (counted queries)."""
        with LayerProbe(self.model, self.layers, keep_graph=keep_graph, root=self.model.model) as p:
            return p.run(x)

    def project(self, x: Tensor, origin: Tensor) -> Tensor:
        """``x`` moved into the threat set around its seeds (or clipped to the domain without a threat)."""
        if self.threat is None:
            return x.clamp(*self.domain)
        return self.threat.project(x, self.seeds[origin])


class TestGenerator:
    """Base class of the test generators (concolic, gradient-guided, fuzzing).

    Subclasses set ``name`` and ``paper`` and implement :meth:`propose`. :meth:`accept` decides which candidates are
    kept (default: those that covered a new item). ``state_dict``/``load_state_dict`` checkpoint any state of the
    generator's own (its random stream is the context's, checkpointed by the loop).
    """

    name: ClassVar[str] = ""
    paper: ClassVar[str] = ""

    def propose(self, ctx: GenerationContext) -> tuple[Tensor, Tensor] | None:
        """Candidate tests ``(B, ...)`` and their origin seeds ``(B,)`` for this iteration; None when done."""
        raise NotImplementedError

    def accept(self, ctx: GenerationContext, candidates: Tensor, gain: Tensor, logits: Tensor) -> Tensor:
        """Which candidates to keep ``(B,)``: by default those that covered at least one new item."""
        return gain > 0

    def options(self) -> dict[str, Any]:
        """The constructor's settings (reprs and run keys)."""
        return {k: v for k, v in vars(self).items() if not k.startswith("_")}

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        return None

    def __repr__(self) -> str:
        return f"{type(self).__name__}({', '.join(f'{k}={v!r}' for k, v in self.options().items())})"


@dataclass
class TestSuiteResult:
    """The generated test suite.

    Attributes:
        method: the generator's name; ``criterion`` the coverage criterion's.
        tests: the kept tests ``(M, ...)``; ``origins`` their seeds' indices; ``labels`` their seeds' labels;
            ``predictions`` the model's predictions on them; ``adversarial`` which are adversarial examples inside
            the threat set; ``distances`` their distances to the seeds (threat's norm, or l∞ without a threat).
        seed_coverage: coverage of the seeds alone; ``coverage`` of the seeds plus the tests.
        history: ``(iteration, queries, coverage ratio)`` after each iteration (for the coverage plot).
        iterations, queries, seconds: what the run spent (a resumed run counts its earlier part too).
        run_id: the store's run id (None without a store).
    """

    method: str
    criterion: str
    tests: Tensor
    origins: Tensor
    labels: Tensor
    predictions: Tensor
    adversarial: Tensor
    distances: Tensor
    seed_coverage: CoverageReport
    coverage: CoverageReport
    history: list[tuple[int, int, float]] = field(default_factory=list)
    iterations: int = 0
    queries: int = 0
    seconds: float = 0.0
    run_id: int | None = None

    @property
    def n_tests(self) -> int:
        return int(self.tests.shape[0])

    @property
    def adversarial_fraction(self) -> float:
        return float(self.adversarial.float().mean()) if self.n_tests else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "criterion": self.criterion,
            "tests": self.n_tests,
            "adversarial": int(self.adversarial.sum()),
            "adversarial_fraction": self.adversarial_fraction,
            "seed_coverage": self.seed_coverage.ratio,
            "coverage": self.coverage.ratio,
            "covered": self.coverage.covered,
            "total": self.coverage.total,
            "iterations": self.iterations,
            "queries": self.queries,
            "seconds": self.seconds,
            "seconds_per_test": self.seconds / self.n_tests if self.n_tests else None,
            "run_id": self.run_id,
            "history": [list(h) for h in self.history],
        }

    def table(self) -> str:
        lines = [
            f"method     {self.method} ({self.criterion})",
            f"coverage   {100 * self.seed_coverage.ratio:.2f} % of seeds -> {100 * self.coverage.ratio:.2f} % "
            f"({self.coverage.covered} of {self.coverage.total} items)",
            f"tests      {self.n_tests} kept, {int(self.adversarial.sum())} adversarial "
            f"({100 * self.adversarial_fraction:.1f} %)",
            f"spent      {self.iterations} iterations, {self.queries} queries, {self.seconds:.1f} s",
        ]
        return "\n".join(lines)

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write the suite as ``.npz`` (arrays x, origin, label, prediction, adversarial, distance)."""
        out = Path(path)
        np.savez_compressed(
            out,
            x=self.tests.cpu().numpy(),
            origin=self.origins.cpu().numpy(),
            label=self.labels.cpu().numpy(),
            prediction=self.predictions.cpu().numpy(),
            adversarial=self.adversarial.cpu().numpy(),
            distance=self.distances.cpu().numpy(),
        )
        return out if out.suffix == ".npz" else out.with_name(out.name + ".npz")


def _atomic_save(obj: Any, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def run_generator(
    model: nn.Module,
    seeds: Tensor,
    seed_labels: Tensor,
    metric: CoverageMetric,
    generator: TestGenerator,
    *,
    threat: ThreatModel | None = None,
    domain: tuple[float, float] = (0.0, 1.0),
    budget: Budget | None = None,
    seed: int = 0,
    store: Any = None,
    checkpoint: str | os.PathLike[str] | None = None,
    batch_size: int = 256,
    progress: bool = True,
    on_iteration: Callable[[GenerationContext], None] | None = None,
) -> TestSuiteResult:
    """Run ``generator`` from ``seeds`` until the budget is spent (module docstring); resumes from ``checkpoint``.

    ``metric`` must be profiled already if it needs a profile. A checkpoint belongs to one configuration (the
    generator's repr, the criterion's, the threat, the seed, and the model's and seeds' fingerprints): a checkpoint
    of another configuration is an error, not silently reused.
    """
    from bastion.store import resumable_run

    budget = budget or Budget()
    device = model_device(model)
    seeds, seed_labels = seeds.to(device), seed_labels.to(device=device, dtype=torch.long)
    counted = QueryCounter(model)
    layers = metric.bind(model)
    gen = torch.Generator(device="cpu").manual_seed(int(seed))
    config = {
        "method": generator.name,
        "generator": repr(generator),
        "criterion": repr(metric),
        "layers": layers,
        "threat": None if threat is None else threat.key,
        "seed": int(seed),
    }  # the budget is not part of the run's identity: a resumed run may be given a larger one
    fingerprint = (model_fingerprint(model), _tensor_fingerprint(seeds))
    ckpt_path = None if checkpoint is None else Path(checkpoint)
    empty = seeds.new_zeros((0, *seeds.shape[1:]))
    state: dict[str, Any] = {
        "tests": empty.cpu(),
        "origins": torch.zeros(0, dtype=torch.long),
        "predictions": torch.zeros(0, dtype=torch.long),  # the model's predictions on the kept tests, as run
        "history": [],
        "iteration": 0,
        "queries": 0,
        "seconds": 0.0,
    }
    started = time.perf_counter()
    with eval_mode(model):
        seed_report = _seed_coverage(counted, metric, seeds, layers, batch_size)
        if ckpt_path is not None and ckpt_path.exists():
            saved = torch.load(ckpt_path, weights_only=False)
            if saved.get("config") != config or tuple(saved.get("fingerprint", ())) != fingerprint:
                raise InputError(
                    f"the checkpoint {str(ckpt_path)!r} belongs to another generation run (different model, seeds "
                    "or settings); remove it or choose another --checkpoint"
                )
            state = saved["state"]
            metric.load_state_dict(saved["metric"])
            generator.load_state_dict(saved["generator"])
            gen.set_state(saved["rng"])
        counted.queries = int(state["queries"])
        ctx = GenerationContext(
            model=counted, metric=metric, layers=layers, seeds=seeds, seed_labels=seed_labels,
            tests=state["tests"].to(device), origins=state["origins"].to(device), threat=threat, domain=domain,
            generator=gen, iteration=int(state["iteration"]),
        )  # fmt: skip
        payload = {"config": config}
        with resumable_run(
            store, kind="test-generation", payload=payload, fingerprints=lambda: fingerprint,
            n_samples=0, threats=["test"], config={"budget": [budget.iterations, budget.queries, budget.seconds]},
        ) as run:  # fmt: skip
            bar = tqdm(total=budget.iterations, initial=ctx.iteration, desc=f"generate ({generator.name})",
                       unit="it", disable=not progress, leave=False)  # fmt: skip
            while True:
                elapsed = float(state["seconds"]) + time.perf_counter() - started
                if budget.iterations is not None and ctx.iteration >= budget.iterations:
                    break
                if budget.seconds is not None and elapsed >= budget.seconds:
                    break
                left = None if budget.queries is None else budget.queries - counted.queries
                if left is not None and left <= 0:
                    break
                ctx.queries_left = left
                t0 = time.perf_counter()
                proposal = generator.propose(ctx)
                if proposal is None:
                    break
                cand, origin = proposal
                if cand.shape[0] > 0:  # an empty proposal still counts as an iteration (and is checkpointed)
                    left = None if budget.queries is None else budget.queries - counted.queries
                    if left is not None and cand.shape[0] > left:
                        cand, origin = cand[:left], origin[:left]
                    cand = ctx.project(cand.detach().to(device), origin.to(device))
                    origin = origin.to(device)
                    with torch.no_grad():
                        logits, acts = ctx.probe(cand)
                    index = torch.arange(
                        seeds.shape[0] + ctx.tests.shape[0], seeds.shape[0] + ctx.tests.shape[0] + cand.shape[0]
                    )
                    trial = copy.copy(metric)  # the gain of the candidates, without committing them
                    trial.first = {k: v.clone() for k, v in metric.first.items()}
                    gain = trial.update(acts, index)
                    keep = generator.accept(ctx, cand, gain.to(device), logits).to(device)
                    if bool(keep.any()):
                        kept, kept_origin, kept_logits = cand[keep], origin[keep], logits[keep]
                        metric.update({k: v[keep] for k, v in acts.items()}, index[: int(keep.sum())])
                        first_new = seeds.shape[0] + ctx.tests.shape[0]
                        ctx.tests = torch.cat([ctx.tests, kept])
                        ctx.origins = torch.cat([ctx.origins, kept_origin])
                        state["predictions"] = torch.cat([state["predictions"], kept_logits.argmax(dim=1).cpu()])
                        records = _records(
                            kept, kept_origin, kept_logits, ctx, first_new - seeds.shape[0], generator.name
                        )
                        run.write(records, seconds=time.perf_counter() - t0)
                ctx.iteration += 1
                state.update(
                    tests=ctx.tests.cpu(), origins=ctx.origins.cpu(), iteration=ctx.iteration,
                    queries=counted.queries, seconds=float(state["seconds"]) + time.perf_counter() - started,
                )  # fmt: skip
                started = time.perf_counter()
                state["history"].append((ctx.iteration, counted.queries, metric.report().ratio))
                if ckpt_path is not None:
                    _atomic_save({"config": config, "fingerprint": fingerprint, "state": state,
                                  "metric": metric.state_dict(), "generator": generator.state_dict(),
                                  "rng": gen.get_state()}, ckpt_path)  # fmt: skip
                if on_iteration is not None:
                    on_iteration(ctx)
                bar.update(1)
                bar.set_postfix_str(f"{metric.name} {100 * metric.report().ratio:.1f}% tests {ctx.tests.shape[0]}")
            bar.close()
            state["seconds"] = float(state["seconds"]) + time.perf_counter() - started
            result = _result(ctx, generator, metric, seed_report, state, counted.queries, run.run_id)
            if run.store is not None and run.run_id is not None:
                run.store.finish_run(run.run_id, result.to_dict())
            return result


def _tensor_fingerprint(x: Tensor) -> str:
    import hashlib

    return hashlib.sha256(x.detach().cpu().contiguous().numpy().tobytes()).hexdigest()[:16]


def _seed_coverage(
    model: nn.Module, metric: CoverageMetric, seeds: Tensor, layers: list[str], batch_size: int
) -> CoverageReport:
    """Fold the seeds into ``metric`` (indices 0..S-1) and report their coverage (a resumed run then loads its state).

    The metric must not have seen inputs yet: its whole state (pair histories and pattern tables included) is
    the seeds' from here on.
    """
    if metric.inputs:
        raise InputError(f"the criterion {metric!r} has already seen {metric.inputs} inputs: give a fresh one")
    root = model.model if isinstance(model, QueryCounter) else model
    with torch.no_grad(), LayerProbe(model, layers, root=root) as probe:
        for s in range(0, seeds.shape[0], batch_size):
            _, acts = probe.run(seeds[s : s + batch_size])
            metric.update(acts, torch.arange(s, s + acts[layers[0]].shape[0]))
    return metric.report()


def _records(
    tests: Tensor, origin: Tensor, logits: Tensor, ctx: GenerationContext, first: int, name: str
) -> list[SampleRecord]:
    labels = ctx.seed_labels[origin]
    pred = logits.argmax(dim=1)
    dist, inside = _distance(tests, origin, ctx)
    adv = (pred != labels) & inside
    return [
        SampleRecord(
            index=first + i,
            threat="test",
            label=int(labels[i]),
            clean_pred=int(pred[i]),
            status="falsified" if bool(adv[i]) else "unknown",
            adv_distance=float(dist[i]) if bool(adv[i]) else None,
            attack=name,
        )
        for i in range(tests.shape[0])
    ]


def _distance(tests: Tensor, origin: Tensor, ctx: GenerationContext) -> tuple[Tensor, Tensor]:
    x0 = ctx.seeds[origin]
    if ctx.threat is None or not tests.numel():  # an empty suite has no rows to measure
        d = (tests - x0).flatten(1).abs().amax(dim=1) if tests.numel() else tests.new_zeros(tests.shape[0])
        return d, torch.ones_like(d, dtype=torch.bool)
    return ctx.threat.distance(tests, x0), ctx.threat.contains(tests, x0)


def _result(
    ctx: GenerationContext,
    generator: TestGenerator,
    metric: CoverageMetric,
    seed_report: CoverageReport,
    state: dict[str, Any],
    queries: int,
    run_id: int | None,
) -> TestSuiteResult:
    pred = state["predictions"].to(ctx.tests.device)  # from the loop's own forward passes: no extra query
    labels = ctx.seed_labels[ctx.origins]
    dist, inside = _distance(ctx.tests, ctx.origins, ctx)
    return TestSuiteResult(
        method=generator.name,
        criterion=metric.name,
        tests=ctx.tests.detach(),
        origins=ctx.origins,
        labels=labels,
        predictions=pred,
        adversarial=(pred != labels) & inside,
        distances=dist,
        seed_coverage=seed_report,
        coverage=metric.report(),
        history=[tuple(h) for h in state["history"]],  # type: ignore[misc]
        iterations=ctx.iteration,
        queries=queries,
        seconds=float(state["seconds"]),
        run_id=run_id,
    )
