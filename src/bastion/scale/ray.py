"""Evaluation, certification, assessment and VNN-COMP benchmarks sharded over a Ray cluster.

Ray (Moritz et al., "Ray: A Distributed Framework for Emerging AI Applications", OSDI 2018) does the scheduling,
the data shipping and the fault tolerance; nothing here schedules work itself. Ray is an optional extra
(``pip install 'bastion[ray]'``): it is imported only inside the functions that need it.

How a sample-level job runs (:func:`ray_evaluate`, :func:`ray_certify`, :func:`ray_assess`):

1. The driver validates the job and learns its store key by calling the ordinary single-process function
   (:func:`bastion.evaluate.evaluate`, :func:`bastion.verify.certify.certify`, :func:`bastion.verify.assess.assess`)
   on an empty :class:`~bastion.scale.shards.IndexedShard` with a probe store that records the run it is asked to
   open and stops. The sharded run therefore has exactly the key and configuration of the single-process run: the
   two share one run in the store, and either resumes the other.
2. The samples not yet in the store are cut into shards of whole batches (:func:`~bastion.scale.shards.plan_shards`),
   and each shard becomes one Ray task (``max_retries``: a task whose worker dies, killed or out of memory, is run
   again on another worker). A task loads the model once per worker process (a model spec string, a picklable
   factory, or a CPU module shipped once through Ray's object store; never a live CUDA model) and runs the
   ordinary single-process function on its shard, which keeps the original indices and batches.
3. The driver writes each shard's records to the store in one transaction as soon as the shard finishes, only for
   samples not stored before; a killed driver loses only the shards in flight, and the same call resumes. The
   summary is computed from the stored records by the single-process code's own summary function, so it equals
   the single-process result.

Determinism: a sample's result depends on its batch (seeds are per batch, random starts are drawn per batch), so
shards hold whole batches of the single-process run and each batch is computed whole, even when only part of it is
left to do after an interrupted run. The per-sample records are then those of the single-process run (on the same
hardware and library versions), whatever the number of shards or workers. An exception is a time budget: with
``assess(budget > 0)`` the complete search stops on wall time, which a busy worker reaches earlier.

Cluster and files: ``address="auto"`` joins the running cluster (``ray start --head`` on the head node),
``"local"`` starts a Ray instance on this machine, any other string is passed to :func:`ray.init` (``HOST:PORT``,
``ray://HOST:10001``); if Ray is already initialised in this process it is used as it is. Every node needs bastion
installed (same version) and, for a model spec string, the model file at the same path (a shared file system); the
data travel with the tasks.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
import os
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from bastion.data import Dataset, as_dataset
from bastion.errors import BastionError, InputError
from bastion.results import SampleRecord
from bastion.scale.shards import IndexedShard, Shard, plan_shards, split_evenly
from bastion.store import RunSession, Store

__all__ = ["RAY_HINT", "ray_assess", "ray_certify", "ray_evaluate", "ray_vnncomp"]

#: What to do when Ray is missing.
RAY_HINT = "install the optional extra: pip install 'bastion[ray]'"

#: A model as the Ray runners take it: a spec string (loaded on every worker), a zero-argument factory, or a module.
ModelSource = str | os.PathLike[str] | Callable[[], nn.Module] | nn.Module


def _import_ray() -> Any:
    try:
        import ray
    except ImportError:
        raise BastionError(f"Ray is not installed in this environment; {RAY_HINT}") from None
    return ray


# --------------------------------------------------------------------------------------------------- the model


@dataclass(frozen=True)
class _ModelBox:
    """How a worker gets the model: ``kind`` is ``spec``, ``factory`` or ``module`` (``payload`` then holds a
    one-element list with the ObjectRef, so that Ray hands the reference, not the value, to the task)."""

    token: str
    kind: str
    payload: Any
    input_shape: tuple[int, ...]
    num_classes: int


# model per (token, device) of this worker process: a task of the same job reuses the model of the previous one
_WORKER_MODELS: dict[tuple[str, str], nn.Module] = {}


def _driver_model(model: ModelSource, data: Dataset) -> tuple[nn.Module, str, Any]:
    """The model on the driver (for validation, fingerprints and checks) and what to ship: (module, kind, payload)."""
    from bastion.models import load_model

    if isinstance(model, (str, os.PathLike)):
        spec = os.fspath(model)
        return load_model(spec, input_shape=data.feature_shape, num_classes=data.num_classes), "spec", spec
    if isinstance(model, nn.Module):
        from bastion.models.oracle import BlackBox

        if isinstance(model, BlackBox) and model.budget is not None:
            raise InputError(
                "a BlackBox with a total query budget cannot be shared by Ray workers (each would spend it "
                "anew); give a per-sample budget (sample_budget) or run bastion.evaluate in one process"
            )
        return model, "module", None
    if callable(model):
        built = model()
        if not isinstance(built, nn.Module):
            raise InputError(f"the model factory must return a torch.nn.Module, it returned {type(built).__name__}")
        return built, "factory", model
    raise InputError(
        f"model must be a model spec string, a zero-argument factory returning an nn.Module, or an nn.Module; got "
        f"{type(model).__name__}"
    )


def _box(ray: Any, kind: str, payload: Any, driver: nn.Module, data: Dataset) -> _ModelBox:
    if kind == "module":
        # a CPU copy goes to the object store once; workers move it to their own device
        cpu = copy.deepcopy(driver).cpu()
        try:
            payload = [ray.put(cpu)]
        except Exception as exc:
            raise InputError(
                f"the model cannot be shipped to Ray workers ({type(exc).__name__}: {exc}); pass a model spec "
                "string or a picklable factory instead"
            ) from None
    return _ModelBox(uuid.uuid4().hex, kind, payload, data.feature_shape, data.num_classes)


def _worker_model(box: _ModelBox, device: str | None) -> nn.Module:
    """The job's model in this worker process, built once and kept for the job's later tasks."""
    dev = device or "cpu"
    key = (box.token, dev)
    if key not in _WORKER_MODELS:
        if box.kind == "spec":
            from bastion.models import load_model

            model = load_model(box.payload, input_shape=box.input_shape, num_classes=box.num_classes)
        elif box.kind == "factory":
            model = box.payload()
        else:
            import ray

            model = ray.get(box.payload[0])
        _WORKER_MODELS.clear()  # one job's model at a time
        _WORKER_MODELS[key] = model.to(dev).eval()
    return _WORKER_MODELS[key]


# --------------------------------------------------------------------------------------------------- Ray session


@contextlib.contextmanager
def _ray_session(address: str | None) -> Iterator[Any]:
    """Ray, initialised: the running session if there is one (left running), else one started here and shut down."""
    ray = _import_ray()
    if ray.is_initialized():
        yield ray
        return
    opts: dict[str, Any] = {"include_dashboard": False, "logging_level": logging.WARNING}
    try:
        if address in (None, "local"):
            ray.init(**opts)
        else:
            ray.init(address=address, **opts)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise BastionError(
            f"cannot connect to the Ray cluster at {address!r}: {first}; start one with `ray start --head`, or "
            "give --ray local to start Ray on this machine"
        ) from None
    try:
        yield ray
    finally:
        ray.shutdown()


def _concurrency(ray: Any, workers: int | None, cpus: float, gpus: float) -> int:
    """Tasks in flight at once: ``workers``, or as many as the cluster's CPUs (and GPUs) hold."""
    if workers is not None:
        return workers
    res = ray.cluster_resources()
    n = int(res.get("CPU", 1) // cpus) if cpus > 0 else int(res.get("CPU", 1))
    if gpus > 0:
        n = min(n, int(res.get("GPU", 0) // gpus))
        if n < 1:
            raise BastionError(f"the Ray cluster has {res.get('GPU', 0)} GPUs, fewer than gpus_per_worker={gpus}")
    return max(n, 1)


def _ray_map(
    ray: Any,
    task: Any,
    shards: Sequence[Shard],
    call: Callable[[Shard], tuple[Any, ...]],
    done: Callable[[Shard, Any], None],
    *,
    window: int,
    retries: int,
) -> None:
    """Submit one Ray task per shard (at most ``window`` in flight) and hand each result to ``done`` as it comes.

    Ray schedules, ships and retries; this loop only bounds the shards in flight (so the object store holds at most
    ``window`` shards' inputs) and consumes results in completion order. When a shard fails for good (its retries
    spent, or an error in the job itself), no more shards are submitted, the ones in flight are still collected
    (their results kept), and then the first failure is raised.
    """
    pending: dict[Any, Shard] = {}
    nxt = 0
    failure: BaseException | None = None
    try:
        while (nxt < len(shards) and failure is None) or pending:
            while failure is None and nxt < len(shards) and len(pending) < window:
                pending[task.remote(*call(shards[nxt]))] = shards[nxt]
                nxt += 1
            ready, _ = ray.wait(list(pending), num_returns=1)
            shard = pending.pop(ready[0])
            try:
                value = ray.get(ready[0])
            except ray.exceptions.RayTaskError as exc:
                cause = getattr(exc, "cause", None)
                if isinstance(cause, BastionError):
                    failure = failure or cause
                else:
                    failure = failure or BastionError(f"{shard.describe()} failed on a Ray worker: {_last_line(exc)}")
                continue
            except ray.exceptions.RayError as exc:
                failure = failure or BastionError(
                    f"{shard.describe()} failed on the Ray cluster after {retries} retries ({type(exc).__name__}: "
                    f"{_last_line(exc)}); the shards finished are stored: run the same job again to resume"
                )
                continue
            done(shard, value)
    finally:
        for ref in pending:  # only on an interruption of the driver (Ctrl-C) or an error in ``done``
            with contextlib.suppress(Exception):
                ray.cancel(ref, force=True)
    if failure is not None:
        raise failure


def _last_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[-1] if text else type(exc).__name__


def _check_ray_options(
    shards: int | None, workers: int | None, cpus: float, gpus: float, retries: int
) -> tuple[int | None, int | None]:
    for name, value in (("shards", shards), ("workers", workers)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise InputError(f"{name} must be a positive integer or None, got {value!r}")
    for name, num in (("cpus_per_worker", cpus), ("gpus_per_worker", gpus)):
        if isinstance(num, bool) or not isinstance(num, (int, float)) or not math.isfinite(num) or num < 0:
            raise InputError(f"{name} must be a number >= 0, got {num!r}")
    if isinstance(retries, bool) or not isinstance(retries, int) or retries < 0:
        raise InputError(f"max_retries must be an integer >= 0, got {retries!r}")
    return shards, workers


# --------------------------------------------------------------------------------------------------- sample jobs


@dataclass(frozen=True)
class _RunKey:
    """What the single-process function asked its store for: the run's kind, key and configuration."""

    kind: str
    key: str
    config: dict[str, Any]
    model_fp: str
    data_fp: str


class _Probed(Exception):
    def __init__(self, info: _RunKey) -> None:
        super().__init__(info.key)
        self.info = info


class _KeyProbe(Store):
    """A store that opens nothing: it records the run a job asks for, then stops the job (before any work)."""

    def __init__(self) -> None:
        self.path = Path("<probe>")
        self._conn = None

    def open_run(
        self, *, kind: str, key: str, config: dict[str, Any], model_fp: str, data_fp: str, n_samples: int
    ) -> Any:
        raise _Probed(_RunKey(kind, key, config, model_fp, data_fp))

    def close(self) -> None:
        pass


def _probe(
    fn: Callable[..., Any], model: nn.Module, empty: IndexedShard, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> _RunKey:
    """Validate the job and learn its run key by running ``fn`` on no samples against a :class:`_KeyProbe`."""
    try:
        fn(model, empty, *args, store=_KeyProbe(), progress=False, **kwargs)
    except _Probed as probed:
        return probed.info
    except TypeError as exc:
        if "keyword" in str(exc) or "argument" in str(exc):
            raise InputError(f"{fn.__name__}: {exc}") from None
        raise
    raise BastionError(f"{fn.__name__} did not open a run; it cannot be sharded")  # pragma: no cover


@contextlib.contextmanager
def _session(
    store: Store | str | os.PathLike[str] | None, info: _RunKey, n: int, threats: list[str], extra: dict[str, Any]
) -> Iterator[RunSession]:
    """The run of ``info`` in ``store`` (found or created, as :func:`bastion.store.resumable_run` would)."""
    if store is None:
        yield RunSession(None, None, threats, False)
        return
    if not isinstance(store, (Store, str, os.PathLike)):
        raise InputError(f"store must be a Store, a path or None, got {type(store).__name__}")
    db = store if isinstance(store, Store) else Store(store)
    try:
        run, resumed = db.open_run(
            kind=info.kind, key=info.key, config={**info.config, **extra}, model_fp=info.model_fp,
            data_fp=info.data_fp, n_samples=n,
        )  # fmt: skip
        yield RunSession(db, run, threats, resumed)
    finally:
        if db is not store:
            db.close()


def _sample_task(
    box: _ModelBox,
    fn: Callable[..., Any],
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    shard: tuple[torch.Tensor, torch.Tensor, torch.Tensor, int, str, tuple[float, float], str],
    threads: int,
    device: str | None,
) -> tuple[Any, float]:
    """One shard on a Ray worker: the ordinary single-process ``fn`` on an :class:`IndexedShard` (no store)."""
    if threads >= 1:
        torch.set_num_threads(threads)
    if device is None:
        device = "cuda" if torch.cuda.is_available() and _has_gpu() else "cpu"
    model = _worker_model(box, device)
    x, y, origin, k, name, domain, fp = shard
    view = IndexedShard.from_arrays(x, y, origin, num_classes=k, name=name, domain=domain, fingerprint=fp)
    start = time.perf_counter()
    result = fn(model, view, *args, store=None, progress=False, **kwargs)
    return result, time.perf_counter() - start


def _has_gpu() -> bool:
    try:
        import ray

        return bool(ray.get_gpu_ids())
    except Exception:  # not in a Ray worker
        return False


@dataclass
class _SampleJob:
    fn: Callable[..., Any]
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    threats: Callable[[dict[str, Any]], list[str]]
    # (records, n, config, results of this session's shards, session, driver model) -> the job's result
    summarise: Callable[[list[SampleRecord], int, dict[str, Any], list[Any], RunSession, nn.Module], Any]


def _run_samples(
    job: _SampleJob,
    model: ModelSource,
    data: Dataset | tuple[torch.Tensor, torch.Tensor],
    *,
    store: Store | str | os.PathLike[str] | None,
    progress: bool,
    address: str | None,
    shards: int | None,
    workers: int | None,
    cpus_per_worker: float,
    gpus_per_worker: float,
    max_retries: int,
    device: str | None,
) -> Any:
    """The one place where a sample-level job is sharded over Ray and merged into the store (see the module doc)."""
    started = time.perf_counter()
    shards, workers = _check_ray_options(shards, workers, cpus_per_worker, gpus_per_worker, max_retries)
    _import_ray()  # before any work: a clear message if the extra is missing
    data = as_dataset(data)
    driver, kind, payload = _driver_model(model, data)
    data_fp = data.fingerprint()
    info = _probe(job.fn, driver, IndexedShard.of(data, [], fingerprint=data_fp), job.args, job.kwargs)
    threats = job.threats(info.config)
    batch_size = int(info.config["batch_size"])
    n = len(data)
    extra = {"ray": {"address": address or "local", "shards": shards, "workers": workers}}
    from tqdm.auto import tqdm

    with _session(store, info, n, threats, extra) as run:
        plan = plan_shards(n, batch_size, done=run.done, shards=shards)
        results: list[Any] = []
        if plan:
            with _ray_session(address) as ray:
                box = _box(ray, kind, payload, driver, data)
                task = ray.remote(_sample_task).options(
                    num_cpus=cpus_per_worker, num_gpus=gpus_per_worker, max_retries=max_retries,
                    retry_exceptions=False,
                )  # fmt: skip
                threads = max(1, int(cpus_per_worker))
                left = sum(len(s.todo) for s in plan)

                def call(shard: Shard) -> tuple[Any, ...]:
                    pos = torch.tensor(shard.positions, dtype=torch.int64)
                    arrays = (data.x[pos], data.y[pos], pos, data.num_classes, data.name, data.domain, data_fp)
                    return box, job.fn, job.args, job.kwargs, arrays, threads, device

                with tqdm(
                    total=n, initial=n - left, desc=f"{info.kind} (ray)", unit="sample", disable=not progress
                ) as bar:

                    def done(shard: Shard, value: tuple[Any, float]) -> None:
                        result, seconds = value
                        run.write(_shard_records(shard, result.records, threats), seconds=seconds)
                        results.append(result)
                        bar.update(len(shard.todo))

                    window = _concurrency(ray, workers, cpus_per_worker, gpus_per_worker)
                    _ray_map(ray, task, plan, call, done, window=window, retries=max_retries)
        result = job.summarise(run.records(), n, info.config, results, run, driver)
        return run.finish(result, started=started)


def _shard_records(shard: Shard, records: Sequence[SampleRecord], threats: Sequence[str]) -> list[SampleRecord]:
    """The records of ``shard.todo``: exactly one per sample and threat, or a BastionError (nothing is written)."""
    todo = set(shard.todo)
    keep = [r for r in records if r.index in todo and r.threat in threats]
    keys = {(r.threat, r.index) for r in keep}
    want = len(todo) * len(threats)
    if len(keep) != want or len(keys) != want:
        raise BastionError(
            f"{shard.describe()} returned {len(keys)} distinct records of the {want} expected "
            f"({len(keep)} in all); nothing of it was stored"
        )
    return keep


# --------------------------------------------------------------------------------------------------- evaluate


def ray_evaluate(
    model: ModelSource,
    data: Dataset | tuple[torch.Tensor, torch.Tensor],
    threats: Any,
    attacks: Any,
    *,
    address: str | None = "auto",
    shards: int | None = None,
    workers: int | None = None,
    cpus_per_worker: float = 1,
    gpus_per_worker: float = 0,
    max_retries: int = 3,
    device: str | None = None,
    store: Store | str | os.PathLike[str] | None = None,
    progress: bool = True,
    checks: bool = True,
    **kwargs: Any,
) -> Any:
    """:func:`bastion.evaluate.evaluate` with its batches sharded over a Ray cluster.

    The result (records, robust accuracies, warnings) and the run in the store are those of
    ``evaluate(model, data, threats, attacks, **kwargs)`` in one process; see the module docstring for how.

    Args:
        model: a model spec string (as for ``bastion evaluate --model``; loaded by every worker), a picklable
            zero-argument factory returning the model, or a module (a CPU copy is shipped once).
        data: a :class:`~bastion.data.Dataset` or a pair ``(x, y)``; shards are sent with their tasks.
        threats: as for :func:`~bastion.evaluate.evaluate`.
        attacks: as for :func:`~bastion.evaluate.evaluate` (attack objects must be picklable).
        address: the Ray cluster: ``"auto"`` (the running one), ``"local"`` (start one here), ``HOST:PORT`` or
            ``ray://HOST:PORT``; ignored when Ray is already initialised in this process.
        shards: number of shards; ``None`` for one per batch (``batch_size`` samples).
        workers: shards in flight at once; ``None`` for the cluster's CPUs / ``cpus_per_worker``.
        cpus_per_worker: CPUs per task (also its torch threads).
        gpus_per_worker: GPUs per task (the model then runs on ``cuda`` unless ``device`` says otherwise).
        max_retries: how often a shard whose worker died is run again.
        device: torch device on the workers; ``None`` for cuda when a task holds a GPU, else cpu.
        store: a Store or path: shards' records are written as they finish; the same call resumes.
        progress: show a progress bar (per shard).
        checks: the gradient-masking checks of :func:`~bastion.evaluate.evaluate`, run on the driver.
        **kwargs: the other keyword arguments of :func:`~bastion.evaluate.evaluate` (``batch_size``, ``seed``,
            ``config``).

    Returns:
        The :class:`~bastion.evaluate.EvaluationResult`.

    Raises:
        InputError: as :func:`~bastion.evaluate.evaluate`, or on bad Ray options.
        BastionError: Ray is missing, the cluster cannot be reached, or a shard failed after its retries.
    """
    from bastion.evaluate import evaluate, summarize

    def summarise(
        records: list[SampleRecord], n: int, config: dict[str, Any], _: list[Any], run: RunSession, net: nn.Module
    ) -> Any:
        result = summarize(records, config["threats"], config["attack_names"], n)
        if checks:
            findings = _evaluate_checks(net, as_dataset(data), threats, attacks, result)
            for finding in findings:
                finding.warn()
                run.warn(finding.code, finding.message)
            result.warnings = [(f.code, f.message) for f in findings]
        return result

    job = _SampleJob(evaluate, (threats, attacks), {**kwargs, "checks": False}, lambda c: list(c["threats"]), summarise)
    return _run_samples(
        job, model, data, store=store, progress=progress, address=address, shards=shards, workers=workers,
        cpus_per_worker=cpus_per_worker, gpus_per_worker=gpus_per_worker, max_retries=max_retries, device=device,
    )  # fmt: skip


def _evaluate_checks(model: nn.Module, data: Dataset, threats: Any, attacks: Any, result: Any) -> list[Any]:
    """The gradient-masking checks of :func:`bastion.evaluate.evaluate`, in its order, on the driver's model."""
    from bastion.attacks.presets import preset
    from bastion.masking import posthoc, preflight, unbounded_check
    from bastion.models.checks import model_device
    from bastion.models.oracle import BlackBox
    from bastion.threat import LpBall

    threat_list = list(threats) if isinstance(threats, (list, tuple)) else [threats]
    if isinstance(attacks, str):
        attack_list = preset(attacks, sorted({t.norm for t in threat_list if isinstance(t, LpBall)}))
    else:
        attack_list = list(attacks) if isinstance(attacks, (list, tuple)) else [attacks]
    device = model_device(model)
    white_box = not isinstance(model, BlackBox)
    findings: list[Any] = []
    if white_box:
        probe = data.subset(slice(0, 64))
        findings += preflight(model, probe.x.to(device), probe.y.to(device))
    findings += posthoc(result, attack_list, threat_list)
    probe = data.subset(slice(0, 32))
    balls = {t.domain: t for t in threat_list if isinstance(t, LpBall)} if white_box else {}
    for ball in balls.values():
        findings += unbounded_check(model, probe.x.to(device), probe.y.to(device), ball)
    return findings


# --------------------------------------------------------------------------------------------------- certify, assess


def ray_certify(
    model: ModelSource,
    data: Dataset | tuple[torch.Tensor, torch.Tensor],
    threat: Any,
    *,
    address: str | None = "auto",
    shards: int | None = None,
    workers: int | None = None,
    cpus_per_worker: float = 1,
    gpus_per_worker: float = 0,
    max_retries: int = 3,
    device: str | None = None,
    store: Store | str | os.PathLike[str] | None = None,
    progress: bool = True,
    **kwargs: Any,
) -> Any:
    """:func:`bastion.verify.certify.certify` with its batches sharded over a Ray cluster.

    Same result and store run as ``certify(model, data, threat, **kwargs)`` in one process. The Ray options are
    those of :func:`ray_evaluate`; ``kwargs`` are certify's (``method``, ``radius``, ``batch_size``, ``tolerance``,
    ``max_steps``, ``options``, ``config``).

    Returns:
        The :class:`~bastion.verify.certify.CertifyResult`.
    """
    from bastion.verify.certify import certify, summarize_certify

    def summarise(
        records: list[SampleRecord], n: int, config: dict[str, Any], _: list[Any], run: RunSession, net: nn.Module
    ) -> Any:
        return summarize_certify(records, n, config["threat"], config["method"], bool(config["radius"]))

    job = _SampleJob(certify, (threat,), kwargs, lambda c: [c["threat"]], summarise)
    return _run_samples(
        job, model, data, store=store, progress=progress, address=address, shards=shards, workers=workers,
        cpus_per_worker=cpus_per_worker, gpus_per_worker=gpus_per_worker, max_retries=max_retries, device=device,
    )  # fmt: skip


def ray_assess(
    model: ModelSource,
    data: Dataset | tuple[torch.Tensor, torch.Tensor],
    threat: Any,
    *,
    address: str | None = "auto",
    shards: int | None = None,
    workers: int | None = None,
    cpus_per_worker: float = 1,
    gpus_per_worker: float = 0,
    max_retries: int = 3,
    device: str | None = None,
    store: Store | str | os.PathLike[str] | None = None,
    progress: bool = True,
    **kwargs: Any,
) -> Any:
    """:func:`bastion.verify.assess.assess` with its batches sharded over a Ray cluster.

    Same records and store run as ``assess(model, data, threat, **kwargs)`` in one process, except where the
    complete search runs out of its wall-time ``budget`` (a loaded worker reaches it sooner). ``counterexamples``
    holds those found by this call's shards. The Ray options are those of :func:`ray_evaluate`.

    Returns:
        The :class:`~bastion.verify.assess.AssessResult`.
    """
    from bastion.verify.assess import assess, summarize_assess

    def summarise(
        records: list[SampleRecord], n: int, config: dict[str, Any], results: list[Any], run: RunSession,
        net: nn.Module,
    ) -> Any:  # fmt: skip
        result = summarize_assess(records, n, config["threat"])
        template = results[0] if results else assess(net, _empty(data), threat, store=None, progress=False, **kwargs)
        result.notes = list(template.notes)
        for r in results:
            result.counterexamples.update(r.counterexamples)
        return result

    job = _SampleJob(assess, (threat,), kwargs, lambda c: [c["threat"]], summarise)
    return _run_samples(
        job, model, data, store=store, progress=progress, address=address, shards=shards, workers=workers,
        cpus_per_worker=cpus_per_worker, gpus_per_worker=gpus_per_worker, max_retries=max_retries, device=device,
    )  # fmt: skip


def _empty(data: Dataset | tuple[torch.Tensor, torch.Tensor]) -> IndexedShard:
    d = as_dataset(data)
    return IndexedShard.of(d, [], fingerprint="")


# --------------------------------------------------------------------------------------------------- vnncomp

# networks of the VNN-COMP instances this worker process has loaded (one at a time, as the single-process runner)
_VNN_CACHE: dict[str, Any] = {}
_VNN_TMP: list[str] = []


def _vnncomp_task(base: str, items: list[tuple[str, str, float]], method: str, seed: int, threads: int) -> list[Any]:
    """A shard of VNN-COMP instances on a Ray worker: each decided as ``bastion vnncomp --instances`` does."""
    import tempfile

    from bastion.verify.vnncomp import decide_row

    if threads >= 1:
        torch.set_num_threads(threads)
    if not _VNN_TMP:
        _VNN_TMP.append(tempfile.mkdtemp(prefix="bastion-vnncomp-"))
    return [
        (onnx_rel, vnnlib_rel, *decide_row(_VNN_CACHE, Path(base), onnx_rel, vnnlib_rel, limit, method, seed,
                                                Path(_VNN_TMP[0])))
        for onnx_rel, vnnlib_rel, limit in items
    ]  # fmt: skip


def ray_vnncomp(
    instances: str | os.PathLike[str],
    *,
    out: str | os.PathLike[str] | None = None,
    base_dir: str | os.PathLike[str] | None = None,
    timeout_scale: float = 1.0,
    method: str = "auto",
    seed: int = 0,
    address: str | None = "auto",
    shards: int | None = None,
    workers: int | None = None,
    cpus_per_worker: float = 1,
    max_retries: int = 3,
    log: Callable[[str], None] | None = print,
    progress: bool = False,
) -> dict[str, int]:
    """A VNN-COMP benchmark (``instances.csv``) with its instances sharded over a Ray cluster.

    The same as ``bastion vnncomp --instances``: rows ``onnx,vnnlib,result,seconds`` appended to ``out`` (default
    ``results.csv`` beside the csv) as each shard finishes, instances already in ``out`` skipped, so a killed run
    resumes; rows come in completion order. Each instance keeps its own time limit (``timeout × timeout_scale``),
    counted on the worker. The onnx and vnnlib files must be readable at the same paths on every node.

    Args:
        instances: the benchmark's instances.csv (rows ``onnx,vnnlib,timeout``).
        out: the results csv.
        base_dir: folder the csv's paths are relative to (default: the csv's folder).
        timeout_scale: multiplies every timeout.
        method: the verifier's method (``auto``, ``input``, ``relu``, ``milp``, ``bounds``).
        seed: the verifier's seed.
        address, workers, cpus_per_worker, max_retries: as for :func:`ray_evaluate`.
        shards: number of shards of consecutive instances; ``None`` for one instance per shard.
        log: called with one line per instance (``None``: silent).
        progress: show a progress bar.

    Returns:
        Counts of the results of this call (``sat``, ``unsat``, ``timeout``, ``unknown``, ``error``) and
        ``"already done"``: the instances skipped.
    """
    import csv

    from tqdm.auto import tqdm

    from bastion.verify.vnncomp import done_instances, read_instances

    shards, workers = _check_ray_options(shards, workers, cpus_per_worker, 0, max_retries)
    if isinstance(timeout_scale, bool) or not isinstance(timeout_scale, (int, float)) or not timeout_scale > 0:
        raise InputError(f"timeout_scale must be > 0, got {timeout_scale!r}")
    _import_ray()
    inst = Path(instances)
    base = Path(base_dir) if base_dir is not None else inst.parent
    out_path = Path(out) if out is not None else inst.with_name("results.csv")
    rows = read_instances(inst, float(timeout_scale))
    done = done_instances(out_path)
    todo = [r for r in rows if (r[0], r[1]) not in done]
    pieces = split_evenly(len(todo), len(todo) if shards is None else shards)
    plan = [Shard(k, tuple(p), tuple(p)) for k, p in enumerate(pieces)]
    counts: dict[str, int] = {}
    fresh = not out_path.is_file() or out_path.stat().st_size == 0
    out_path.parent.mkdir(parents=True, exist_ok=True)
    with open(out_path, "a", newline="") as fh:
        writer = csv.writer(fh)
        if fresh:
            writer.writerow(["onnx", "vnnlib", "result", "seconds"])
            fh.flush()
        if plan:
            with _ray_session(address) as ray, tqdm(total=len(todo), desc="vnncomp (ray)", disable=not progress) as bar:
                task = ray.remote(_vnncomp_task).options(
                    num_cpus=cpus_per_worker, max_retries=max_retries, retry_exceptions=False
                )
                threads = max(1, int(cpus_per_worker))

                def call(shard: Shard) -> tuple[Any, ...]:
                    return str(base), [todo[i] for i in shard.positions], method, seed, threads

                def finished(shard: Shard, results: list[Any]) -> None:
                    for onnx_rel, vnnlib_rel, word, seconds, error in results:
                        if error is not None and log is not None:
                            log(f"bastion vnncomp: {onnx_rel} {vnnlib_rel}: error: {error}")
                        writer.writerow([onnx_rel, vnnlib_rel, word, f"{seconds:.3f}"])
                        counts[word] = counts.get(word, 0) + 1
                        if log is not None:
                            log(f"{word:<8} {seconds:8.2f}s  {onnx_rel}  {vnnlib_rel}")
                    fh.flush()
                    os.fsync(fh.fileno())
                    bar.update(len(results))

                window = _concurrency(ray, workers, cpus_per_worker, 0)
                _ray_map(ray, task, plan, call, finished, window=window, retries=max_retries)
    counts["already done"] = len(rows) - len(todo)
    return counts
