"""Shared pieces of the benchmarks: the MNIST split, the cached model, timing, and the peer libraries.

The MNIST *test* set (the only MNIST file on these machines) is split in two: the first 8,000 images train the
zoo ``cnn``, the last 2,000 evaluate it. Every figure in ``RESULTS.md`` uses the 2,000-image evaluation split.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import os
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from bastion.data import Dataset, load_mnist
from bastion.defenses.training import train
from bastion.models import build_model, load_model, save_model

BENCH_DIR = Path(__file__).resolve().parent
CACHE_DIR = BENCH_DIR / ".cache"
N_TRAIN = 8_000
N_EVAL = 2_000
INPUT_SHAPE = (1, 28, 28)
NUM_CLASSES = 10

# Training recipe of the benchmark model; any change here changes the cache key, so the model is retrained.
TRAIN_CONFIG: dict[str, Any] = {
    "arch": "cnn",
    "seed": 0,
    "epochs": 5,
    "batch_size": 64,
    "lr": 1e-3,
    "n_train": N_TRAIN,
}

PEERS = ("torchattacks", "foolbox", "art")
_PEER_MODULES = {"torchattacks": "torchattacks", "foolbox": "foolbox", "art": "art"}
_PEER_DISTRIBUTIONS = {
    "torchattacks": "torchattacks",
    "foolbox": "foolbox",
    "art": "adversarial-robustness-toolbox",
}


# ---------------------------------------------------------------------------------------------------- data
def mnist_dir() -> Path:
    """Where the MNIST IDX files are: ``$BASTION_MNIST_DIR``, else ``shared/data/mnist`` beside the repository."""
    env = os.environ.get("BASTION_MNIST_DIR")
    return Path(env) if env else Path(__file__).resolve().parents[2] / "shared/data/mnist"


@dataclass
class Split:
    """The training and evaluation parts of the MNIST test set (x float32 (N, 1, 28, 28) in [0, 1], y int64)."""

    train: Dataset
    eval: Dataset

    @property
    def x_eval(self) -> torch.Tensor:
        return self.eval.x

    @property
    def y_eval(self) -> torch.Tensor:
        return self.eval.y


def load_split(directory: Path | None = None) -> Split:
    """First 8,000 MNIST test images for training, last 2,000 for evaluation."""
    directory = directory or mnist_dir()
    if not directory.is_dir():
        raise SystemExit(
            f"MNIST not found at {directory}; put t10k-images-idx3-ubyte.gz and t10k-labels-idx1-ubyte.gz there "
            "or set BASTION_MNIST_DIR"
        )
    data = load_mnist(directory, split="test")
    if len(data) != N_TRAIN + N_EVAL:
        raise SystemExit(f"expected the 10,000-image MNIST test set in {directory}, found {len(data)} images")
    train, evaluation = data.split(N_TRAIN)
    return Split(train, evaluation)


# ---------------------------------------------------------------------------------------------------- model
def _cache_path() -> Path:
    digest = hashlib.sha256(json.dumps(TRAIN_CONFIG, sort_keys=True).encode()).hexdigest()[:10]
    return CACHE_DIR / f"mnist_{TRAIN_CONFIG['arch']}_{digest}.pt"


def train_model(split: Split, *, log: Callable[[str], None] = print) -> nn.Module:
    """Train the zoo ``cnn`` on the 8,000 training images with bastion's trainer (Adam, seeded)."""
    cfg = TRAIN_CONFIG
    torch.manual_seed(cfg["seed"])  # the initial weights; the trainer seeds the shuffling itself
    model = build_model(cfg["arch"], INPUT_SHAPE, NUM_CLASSES)
    history = train(
        model,
        split.train,
        epochs=cfg["epochs"],
        batch_size=cfg["batch_size"],
        lr=cfg["lr"],
        seed=cfg["seed"],
        progress=False,
    )
    log("  training loss per epoch: " + ", ".join(f"{v:.4f}" for v in history))
    return model.eval()


def get_model(split: Split, *, retrain: bool = False, log: Callable[[str], None] = print) -> nn.Module:
    """The benchmark model: loaded from ``benchmarks/.cache/`` when cached, trained (and cached) otherwise."""
    path = _cache_path()
    if path.exists() and not retrain:
        try:
            model = load_model(path)
            log(f"model: loaded {path.relative_to(BENCH_DIR.parent)}")
            return model.eval()
        except Exception as exc:  # a stale cache from an older bastion: retrain rather than fail
            log(f"model: could not load {path.name} ({type(exc).__name__}: {exc}); retraining")
    log(f"model: training the zoo {TRAIN_CONFIG['arch']!r} on {N_TRAIN} MNIST images ({json.dumps(TRAIN_CONFIG)})")
    t0 = time.perf_counter()
    model = train_model(split, log=log)
    log(
        f"model: trained in {time.perf_counter() - t0:.1f} s; clean accuracy on the {N_EVAL} evaluation images "
        f"{accuracy(model, split.x_eval, split.y_eval):.4f}"
    )
    CACHE_DIR.mkdir(parents=True, exist_ok=True)
    save_model(model, path)
    log(f"model: cached at {path.relative_to(BENCH_DIR.parent)}")
    return model


@torch.no_grad()
def predict(model: nn.Module, x: torch.Tensor, batch_size: int = 1000) -> torch.Tensor:
    """Predicted classes, in eval mode, batch by batch."""
    was_training = model.training
    model.eval()
    preds = [model(x[i : i + batch_size]).argmax(dim=1) for i in range(0, x.shape[0], batch_size)]
    model.train(was_training)
    return torch.cat(preds)


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    return float((predict(model, x) == y).float().mean())


# ---------------------------------------------------------------------------------------------------- timing
@dataclass
class Timing:
    """Wall-clock seconds of one competitor over the measured (post-warm-up) runs."""

    name: str
    seconds: list[float] = field(default_factory=list)
    cpu_seconds: list[float] = field(default_factory=list)  # process CPU time (all threads) of the same runs
    output: Any = None
    error: str | None = None

    @property
    def median(self) -> float:
        return statistics.median(self.seconds) if self.seconds else float("nan")

    @property
    def cpu_median(self) -> float:
        """Median CPU time: less sensitive than wall time to other processes taking turns on the cores."""
        return statistics.median(self.cpu_seconds) if self.cpu_seconds else float("nan")

    @property
    def fastest(self) -> float:
        return min(self.seconds) if self.seconds else float("nan")

    @property
    def slowest(self) -> float:
        return max(self.seconds) if self.seconds else float("nan")


def time_alternating(
    competitors: dict[str, Callable[[], Any]],
    *,
    repeats: int,
    warmup: int = 1,
    warmup_with: dict[str, Callable[[], Any]] | None = None,
    log: Callable[[str], None] | None = print,
) -> dict[str, Timing]:
    """Time each callable with ``time.perf_counter`` (and ``time.process_time``), interleaving them run by run
    (A B C, A B C, ...).

    Interleaving spreads slow drifts of the machine (frequency scaling, a noisy neighbour) over every competitor
    instead of charging them to whoever ran last. The first ``warmup`` rounds are run but not recorded; they call
    ``warmup_with[name]`` when given (a cheaper call of the same code, e.g. a small batch and two steps: enough to
    load lazy modules and warm the allocator and thread pool), else the competitor itself. A competitor that
    raises is reported with its error and dropped from later rounds; the others go on. The output of the last
    measured run of each is kept in ``Timing.output``.
    """
    timings = {name: Timing(name) for name in competitors}
    for rnd in range(warmup + repeats):
        measured = rnd >= warmup
        for name, timed_fn in competitors.items():
            t = timings[name]
            if t.error is not None:
                continue
            fn = timed_fn if measured or not warmup_with else warmup_with.get(name, timed_fn)
            start, cpu_start = time.perf_counter(), time.process_time()
            try:
                out = fn()
            except Exception as exc:
                t.error = f"{type(exc).__name__}: {exc}"
                if log:
                    log(f"  {name}: failed ({t.error})")
                continue
            elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu_start
            if measured:
                t.seconds.append(elapsed)
                t.cpu_seconds.append(cpu)
                t.output = out
            if log:
                tag = f"run {rnd - warmup + 1}/{repeats}" if measured else "warm-up"
                log(f"  {tag:>9}  {name:<44} {elapsed:8.3f} s  (CPU {cpu:8.3f} s)")
    return timings


# ---------------------------------------------------------------------------------------------------- peers
@dataclass
class Peer:
    """A peer library as found in this environment."""

    name: str
    module: Any | None
    version: str | None
    reason: str | None  # why it is unavailable, when it is

    @property
    def available(self) -> bool:
        return self.module is not None


def load_peer(name: str) -> Peer:
    """Import a peer library, or say why it cannot be used (not installed, or broken on this Python/NumPy)."""
    from importlib import metadata

    try:
        version = metadata.version(_PEER_DISTRIBUTIONS[name])
    except metadata.PackageNotFoundError:
        version = None
    # foolbox imports GitPython (for its model zoo), which refuses to import without a git executable unless told
    # to stay quiet; the attacks do not need git.
    os.environ.setdefault("GIT_PYTHON_REFRESH", "quiet")
    try:
        module = importlib.import_module(_PEER_MODULES[name])
    except Exception as exc:  # ImportError, but also AttributeError etc. from a peer built for an older NumPy
        reason = (
            "not installed (make bench installs it)"
            if version is None
            else f"installed ({version}) but import failed: {type(exc).__name__}: {exc}"
        )
        return Peer(name, None, version, reason)
    return Peer(name, module, version or getattr(module, "__version__", "?"), None)


# ---------------------------------------------------------------------------------------------------- machine
def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_summary() -> str:
    import numpy

    return (
        f"CPU: {cpu_model()} ({os.cpu_count()} logical cores visible), torch {torch.__version__} "
        f"with torch.get_num_threads() = {torch.get_num_threads()}, numpy {numpy.__version__}, "
        f"Python {platform.python_version()}"
    )


def load_average() -> str:
    """The 1/5/15-minute load averages: other processes on the machine slow every competitor down."""
    try:
        return "load average {:.2f} / {:.2f} / {:.2f}".format(*os.getloadavg())
    except OSError:
        return "load average unknown"


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A GitHub-flavoured Markdown table, numbers right-aligned, columns padded for reading in a terminal."""
    cells = [list(header), *[list(r) for r in rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]

    def numeric(text: str) -> bool:
        return bool(text) and (text[0].isdigit() or text[0] in "-+.×") and text != "-"

    right = [all(numeric(r[i]) for r in cells[1:] if r[i] not in ("", "-", "n/a")) for i in range(len(header))]

    def fmt(row: list[str]) -> str:
        return "| " + " | ".join(c.rjust(w) if r else c.ljust(w) for c, w, r in zip(row, widths, right)) + " |"

    sep = "|" + "|".join(("-" * (w + 1) + ":") if r else ("-" * (w + 2)) for w, r in zip(widths, right)) + "|"
    return "\n".join([fmt(cells[0]), sep, *(fmt(r) for r in cells[1:])])
