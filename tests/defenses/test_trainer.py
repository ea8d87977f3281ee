"""Tests of the adversarial trainer: schedules, seeding, checkpoints and resume (in process and after ``kill -9``),
the result store, validation with the robust-overfitting guard, the objective protocol's optional hooks, and
data-parallel training with two processes (torchrun, gloo) against one process on the same global batch.
"""

from __future__ import annotations

import itertools
import os
import runpy
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from bastion.data import Dataset, load_digits
from bastion.defenses.training import (
    CROWNIBP,
    PGDAT,
    AdversarialTrainer,
    EpochMetrics,
    FreeAT,
    StandardObjective,
    lr_factor,
)
from bastion.errors import InputError
from bastion.models import build_model
from bastion.store import Store
from bastion.threat import LpBall

THREAT = LpBall("linf", 0.1)


@pytest.fixture(scope="module")
def small() -> tuple[Dataset, Dataset]:
    train_set, test_set = load_digits().train_test_split(test_fraction=0.25, seed=0)
    return train_set.subset(slice(0, 200)), test_set.subset(slice(0, 100))


def _model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return build_model("mlp", (1, 8, 8), 10, hidden=(32,))


def _same_weights(a: nn.Module | dict[str, torch.Tensor], b: nn.Module | dict[str, torch.Tensor]) -> bool:
    sa = a.state_dict() if isinstance(a, nn.Module) else a
    sb = b.state_dict() if isinstance(b, nn.Module) else b
    return sa.keys() == sb.keys() and all(torch.equal(sa[k].cpu(), sb[k].cpu()) for k in sa)


# ----------------------------------------------------------------------------------------------- schedules
def test_lr_schedules() -> None:
    total = 100
    assert lr_factor("constant", 50, total, 5, 10) == 1.0
    # multistep: x0.1 at 50 % and 75 % of the epochs, applied at epoch boundaries
    assert [lr_factor("multistep", 0, total, e, 8) for e in (0, 3, 4, 5, 6, 7)] == pytest.approx(
        [1.0, 1.0, 0.1, 0.1, 0.01, 0.01]
    )
    assert lr_factor("cosine", 0, total, 0, 10) == 1.0
    assert lr_factor("cosine", 50, total, 5, 10) == pytest.approx(0.5)
    # cyclic (Wong et al.): rises linearly to 1 at 40 % of the steps and falls back to 0 at the end
    cyc = [lr_factor("cyclic", s, total, 0, 1) for s in range(total)]
    assert cyc[39] == pytest.approx(1.0) and max(cyc) == pytest.approx(1.0)
    assert cyc[0] == pytest.approx(1 / 40) and cyc[-1] == pytest.approx(0.0)
    assert all(a < b for a, b in itertools.pairwise(cyc[:40]))
    assert all(a > b for a, b in itertools.pairwise(cyc[39:]))
    with pytest.raises(InputError, match="schedule"):
        lr_factor("step", 0, 1, 0, 1)


def test_trainer_applies_the_schedule_to_the_optimiser(small: tuple[Dataset, Dataset]) -> None:
    seen: list[float] = []

    class Spy:
        def __call__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            return F.cross_entropy(model(x), y)

    trainer = AdversarialTrainer(Spy(), epochs=2, batch_size=50, lr=0.2, schedule="cyclic", progress=False)
    orig = torch.optim.SGD.step

    def spy_step(self: torch.optim.SGD, *args: Any, **kwargs: Any) -> Any:
        seen.append(self.param_groups[0]["lr"])
        return orig(self, *args, **kwargs)

    torch.optim.SGD.step = spy_step  # type: ignore[method-assign]
    try:
        trainer.fit(_model(), small[0])
    finally:
        torch.optim.SGD.step = orig  # type: ignore[method-assign]
    want = [0.2 * lr_factor("cyclic", s, 8, 0, 2) for s in range(8)]
    assert seen == pytest.approx(want)


# ----------------------------------------------------------------------------------------------- seeding
def test_same_seed_same_model_and_caller_rng_untouched(small: tuple[Dataset, Dataset]) -> None:
    def run(seed: int) -> nn.Module:
        model = _model()
        torch.manual_seed(42)
        before = torch.get_rng_state()
        AdversarialTrainer(PGDAT(THREAT, steps=2), epochs=2, batch_size=50, seed=seed, progress=False).fit(
            model, small[0]
        )
        # the random starts drew from the global generator inside the run only
        assert torch.equal(torch.get_rng_state(), before)
        return model

    a, b, c = run(1), run(1), run(2)
    assert _same_weights(a, b)
    assert not _same_weights(a, c)


# ----------------------------------------------------------------------------------------------- checkpoints
class _Crash(Exception):
    pass


def _crash_at(epoch: int) -> Any:
    def hook(m: EpochMetrics) -> None:
        if m.epoch == epoch:
            raise _Crash

    return hook


@pytest.mark.parametrize("which", ["pgd-at", "free-at", "crown-ibp"])
def test_resume_after_a_crash_gives_the_uninterrupted_result(
    which: str, small: tuple[Dataset, Dataset], tmp_path: Path
) -> None:
    train_set, val_set = small

    def trainer(**kw: Any) -> AdversarialTrainer:
        objective: Any = {
            "pgd-at": lambda: PGDAT(THREAT, steps=2),
            "free-at": lambda: FreeAT(THREAT, replays=2),
            # the per-step eps / kappa / beta ramp crosses the crash point (pass 2 of 4 is inside it)
            "crown-ibp": lambda: CROWNIBP(THREAT, warmup=0.1, ramp=0.6),
        }[which]()
        return AdversarialTrainer(
            objective, epochs=8 if which == "free-at" else 4, batch_size=32, lr=0.05, nesterov=True,
            weight_decay=5e-4, schedule="cosine", validation=val_set, val_steps=3, progress=False, **kw,
        )  # fmt: skip

    full = _model()
    full_result = trainer().fit(full, train_set)
    ckpt = tmp_path / "run.ckpt"
    with pytest.raises(_Crash):
        trainer(checkpoint=ckpt, on_epoch_end=_crash_at(1)).fit(_model(), train_set)
    assert ckpt.exists()
    resumed = _model()
    result = trainer(checkpoint=ckpt, resume=True).fit(resumed, train_set)
    assert result.resumed_from == 2
    assert _same_weights(full, resumed)
    assert [m.loss for m in result.history] == [m.loss for m in full_result.history]
    assert [m.val_robust_acc for m in result.history] == [m.val_robust_acc for m in full_result.history]


def test_checkpoint_of_another_run_is_refused(small: tuple[Dataset, Dataset], tmp_path: Path) -> None:
    ckpt = tmp_path / "a.ckpt"
    AdversarialTrainer(epochs=1, batch_size=50, checkpoint=ckpt, progress=False).fit(_model(), small[0])
    with pytest.raises(InputError, match=r"another training run.*batch_size"):
        AdversarialTrainer(epochs=1, batch_size=40, checkpoint=ckpt, resume=True, progress=False).fit(
            _model(), small[0]
        )
    (tmp_path / "junk.ckpt").write_bytes(b"not a checkpoint")
    with pytest.raises(InputError, match="cannot read"):
        AdversarialTrainer(epochs=1, checkpoint=tmp_path / "junk.ckpt", resume=True, progress=False).fit(
            _model(), small[0]
        )


_KILL_JOB = """
import sys, time
from pathlib import Path
import torch
torch.set_num_threads(1)
from bastion.data import load_digits
from bastion.defenses.training import PGDAT, AdversarialTrainer
from bastion.models import build_model
from bastion.threat import LpBall


def job(checkpoint, store, hook=None):
    train_set, val_set = load_digits().train_test_split(test_fraction=0.25, seed=0)
    trainer = AdversarialTrainer(
        PGDAT(LpBall("linf", 0.1), steps=2), epochs=5, batch_size=40, lr=0.05, schedule="multistep",
        validation=val_set.subset(slice(0, 60)), val_steps=2, restore_best=True, checkpoint=checkpoint,
        resume=checkpoint is not None, store=store, progress=False, on_epoch_end=hook,
    )
    torch.manual_seed(0)
    model = build_model("mlp", (1, 8, 8), 10, hidden=(32,))
    result = trainer.fit(model, train_set.subset(slice(0, 240)))
    return model, result


if __name__ == "__main__":
    ckpt, store, out, marker, stop = sys.argv[1:6]

    def hook(m):
        if m.epoch == int(stop):
            Path(marker).write_text("checkpoint written")
            time.sleep(600)

    model, result = job(ckpt, store, hook)
    torch.save(model.state_dict(), out)
    print("resumed_from", result.resumed_from)
"""


@pytest.mark.slow  # two fresh Python processes: ~5 s of CPU, 25-40 s of wall time on a busy machine
def test_resume_after_kill_9_is_bit_identical(tmp_path: Path) -> None:
    script = tmp_path / "job.py"
    script.write_text(_KILL_JOB)
    ckpt, db, out, marker = tmp_path / "job.ckpt", tmp_path / "runs.db", tmp_path / "out.pt", tmp_path / "marker"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    args = [sys.executable, str(script), str(ckpt), str(db), str(out), str(marker)]
    proc = subprocess.Popen([*args, "2"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 180
        while not marker.exists():
            assert proc.poll() is None, proc.stderr.read().decode() if proc.stderr else ""
            assert time.monotonic() < deadline, "the training job never reached epoch 2"
            time.sleep(0.2)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == -signal.SIGKILL and not out.exists()
    done = subprocess.run([*args, "-1"], env=env, capture_output=True, text=True, timeout=300, check=True)
    assert "resumed_from 3" in done.stdout
    job = runpy.run_path(str(script))["job"]
    uninterrupted, result = job(None, None)
    assert _same_weights(torch.load(out, weights_only=True), uninterrupted)
    assert result.restored_best and result.best_epoch is not None
    # the store holds one training run with one row per epoch, the epochs before the kill included
    with Store(db) as store:
        (run,) = store.runs()
        assert run.kind == "train" and run.status == "complete"
        epochs = store.epochs(run.id)
        assert [e["epoch"] for e in epochs] == [0, 1, 2, 3, 4]
        assert [e["loss"] for e in epochs] == pytest.approx([m.loss for m in result.history])
        assert run.summary is not None and run.summary["best_epoch"] == result.best_epoch


# ----------------------------------------------------------------------------------------------- validation
def test_robust_overfitting_guard_restores_the_best_epoch(small: tuple[Dataset, Dataset]) -> None:
    train_set, val_set = small
    snapshots: list[dict[str, torch.Tensor]] = []
    model = _model()

    def keep(_: EpochMetrics) -> None:
        snapshots.append({k: v.clone() for k, v in model.state_dict().items()})

    trainer = AdversarialTrainer(
        PGDAT(THREAT, steps=2), epochs=4, batch_size=50, lr=0.05, validation=val_set, val_steps=3,
        restore_best=True, progress=False, on_epoch_end=keep,
    )  # fmt: skip
    result = trainer.fit(model, train_set)
    robust = [m.val_robust_acc for m in result.history]
    assert all(r is not None and 0 <= r <= 1 for r in robust)
    assert all(m.val_clean_acc is not None and m.val_clean_acc >= m.val_robust_acc for m in result.history)  # type: ignore[operator]
    assert result.best_epoch == robust.index(max(robust))  # type: ignore[type-var]
    assert result.restored_best and _same_weights(model, snapshots[result.best_epoch])
    with pytest.raises(InputError, match="restore_best needs validation"):
        AdversarialTrainer(PGDAT(THREAT), restore_best=True)


# ----------------------------------------------------------------------------------------------- objective hooks
class _Probe:
    """An objective using every optional hook of the protocol, recording what the trainer passes."""

    uses_unlabelled = True

    def __init__(self) -> None:
        self.unlabelled: list[torch.Tensor | None] = []
        self.epochs: list[tuple[int, int]] = []
        self.aux = nn.Parameter(torch.tensor(1.0))

    def epoch_start(self, epoch: int, epochs: int) -> None:
        self.epochs.append((epoch, epochs))

    def extra_parameters(self) -> list[nn.Parameter]:
        return [self.aux]

    def __call__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, unlabelled: Any) -> torch.Tensor:
        self.unlabelled.append(unlabelled)
        return F.cross_entropy(model(x), y) * self.aux


def test_unlabelled_stream_epoch_hook_and_extra_parameters(small: tuple[Dataset, Dataset]) -> None:
    train_set, other = small
    probe = _Probe()
    model = _model()
    model.aux = probe.aux  # even when registered on the model, the objective's own parameter is left alone
    AdversarialTrainer(probe, epochs=3, batch_size=50, unlabelled=other, unlabelled_batch_size=30, progress=False).fit(
        model, train_set
    )
    assert probe.epochs == [(0, 3), (1, 3), (2, 3)]
    assert len(probe.unlabelled) == 3 * 4
    pool = other.x.reshape(len(other), -1)
    for batch in probe.unlabelled:
        assert batch is not None and batch.shape == (30, 1, 8, 8)
        # every unlabelled row comes from the unlabelled set
        assert bool((torch.cdist(batch.reshape(30, -1), pool).min(dim=1).values == 0).all())
    # the stream visits the unlabelled set without repeats before reshuffling: 3 batches of 30 out of 100
    first = torch.cat([b.reshape(30, -1) for b in probe.unlabelled[:3]])  # type: ignore[union-attr]
    assert torch.unique(first, dim=0).shape[0] == 90
    assert float(probe.aux.detach()) == 1.0 and probe.aux.grad is not None  # it got a gradient but no optimiser step
    none_probe = _Probe()
    AdversarialTrainer(none_probe, epochs=1, batch_size=100, progress=False).fit(_model(), train_set)
    assert none_probe.unlabelled == [None, None]


class _StepProbe:
    """A replayed objective recording the trainer's per-step hook."""

    replays = 2

    def __init__(self) -> None:
        self.steps: list[tuple[int, int]] = []

    def step_start(self, step: int, total_steps: int) -> None:
        self.steps.append((step, total_steps))

    def __call__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(model(x), y)

    def __repr__(self) -> str:
        return "_StepProbe()"


def test_step_hook_sees_every_global_step_and_resumes(small: tuple[Dataset, Dataset], tmp_path: Path) -> None:
    train_set, _ = small  # 200 samples, batch 50: 4 minibatches; 4 epochs of 2 replays: 2 passes, 16 steps
    probe = _StepProbe()
    AdversarialTrainer(probe, epochs=4, batch_size=50, progress=False).fit(_model(), train_set)
    assert probe.steps == [(s, 16) for s in range(16)]  # each replay is a step
    ckpt = tmp_path / "steps.ckpt"
    crashed = _StepProbe()
    with pytest.raises(_Crash):
        AdversarialTrainer(crashed, epochs=4, batch_size=50, checkpoint=ckpt, on_epoch_end=_crash_at(0),
                           progress=False).fit(_model(), train_set)  # fmt: skip
    resumed = _StepProbe()
    AdversarialTrainer(resumed, epochs=4, batch_size=50, checkpoint=ckpt, resume=True, progress=False).fit(
        _model(), train_set
    )
    assert crashed.steps + resumed.steps == probe.steps  # the step counter is checkpointed


def test_bad_trainer_input_is_reported(small: tuple[Dataset, Dataset], tmp_path: Path) -> None:
    train_set, _ = small
    with pytest.raises(InputError, match="optimizer"):
        AdversarialTrainer(optimizer="rmsprop")
    with pytest.raises(InputError, match="epochs"):
        AdversarialTrainer(epochs=0)
    with pytest.raises(InputError, match="resume=True needs a checkpoint"):
        AdversarialTrainer(resume=True)
    with pytest.raises(InputError, match="does not exist"):
        AdversarialTrainer(checkpoint=tmp_path / "missing" / "c.ckpt")
    with pytest.raises(InputError, match="needs a threat model"):
        AdversarialTrainer(StandardObjective(), validation=train_set)
    with pytest.raises(InputError, match="logits"):
        AdversarialTrainer(epochs=1, progress=False).fit(build_model("mlp", (1, 8, 8), 3), train_set)
    with pytest.raises(InputError, match="Dataset"):
        AdversarialTrainer(epochs=1, progress=False).fit(_model(), (train_set.x, train_set.y))  # type: ignore[arg-type]

    wide = Dataset(train_set.x * 2 - 1, train_set.y, num_classes=10, name="wide", domain=(-1.0, 1.0))
    with pytest.raises(InputError, match="domain"):
        AdversarialTrainer(PGDAT(THREAT), epochs=1, progress=False).fit(_model(), wide)

    def nan_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return model(x).sum() * float("nan")

    with pytest.raises(InputError, match="became nan"):
        AdversarialTrainer(nan_loss, epochs=1, progress=False).fit(_model(), train_set)


# ----------------------------------------------------------------------------------------------- DDP
_DDP_JOB = """
import sys
import torch
torch.set_num_threads(1)
from bastion.data import Dataset
from bastion.defenses.training import PGDAT, TRADES, AdversarialTrainer
from bastion.models import build_model
from bastion.threat import LpBall


def job(distributed, objective="pgd", checkpoint=None, crash_at=-1, epochs=3):
    g = torch.Generator().manual_seed(0)
    data = Dataset(torch.rand(80, 1, 8, 8, generator=g), torch.randint(0, 10, (80,), generator=g), 10, "rand")
    torch.manual_seed(0)
    model = build_model("mlp", (1, 8, 8), 10, hidden=(32,))
    threat = LpBall("linf", 0.1)
    # PGD from the clean point is deterministic; TRADES draws random starts (a different stream on each rank)
    obj = PGDAT(threat, steps=2, random_start=False) if objective == "pgd" else TRADES(threat, steps=2)

    def crash(m):
        if m.epoch == crash_at:
            raise SystemExit(3)

    result = AdversarialTrainer(
        obj, epochs=epochs, batch_size=20, lr=0.1, distributed=distributed, progress=False,
        checkpoint=checkpoint, resume=checkpoint is not None, on_epoch_end=crash,
    ).fit(model, data)
    return model, result


if __name__ == "__main__":
    import os

    out, objective, checkpoint, crash_at, epochs = sys.argv[1:6]
    model, result = job("on", objective, None if checkpoint == "-" else checkpoint, int(crash_at), int(epochs))
    if os.environ["RANK"] == "0":
        torch.save({"state": model.state_dict(), "world": result.world_size, "resumed_from": result.resumed_from,
                    "losses": [m.loss for m in result.history]}, out)
"""


def _torchrun(script: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    return subprocess.run([*run, str(script), *args], env=env, capture_output=True, text=True, timeout=300)


# Not slow: CI's only multi-process run (torchrun, two gloo workers, one epoch of 4 steps; ~10 s of wall time).
def test_ddp_two_processes_match_one_process(tmp_path: Path) -> None:
    script = tmp_path / "ddp_job.py"
    script.write_text(_DDP_JOB)
    out = tmp_path / "ddp.pt"
    done = _torchrun(script, str(out), "pgd", "-", "-1", "1")
    assert done.returncode == 0, done.stderr[-3000:]
    got = torch.load(out, weights_only=True)
    assert got["world"] == 2
    single, result = runpy.run_path(str(script))["job"]("off", epochs=1)
    assert result.world_size == 1
    # the same global batches, gradients averaged over two shards of 10 instead of one batch of 20: equal up to
    # float summation order
    for name, value in single.state_dict().items():
        assert torch.allclose(got["state"][name], value, atol=1e-5, rtol=1e-4), name
    assert got["losses"] == pytest.approx([m.loss for m in result.history], rel=1e-5)


@pytest.mark.slow  # three torchrun launches
def test_ddp_resume_after_a_crash_is_bit_identical(tmp_path: Path) -> None:
    script = tmp_path / "ddp_job.py"
    script.write_text(_DDP_JOB)
    full, resumed, ckpt = tmp_path / "full.pt", tmp_path / "resumed.pt", tmp_path / "ddp.ckpt"
    done = _torchrun(script, str(full), "trades", "-", "-1", "3")
    assert done.returncode == 0, done.stderr[-3000:]
    crashed = _torchrun(script, str(resumed), "trades", str(ckpt), "0", "3")
    assert crashed.returncode != 0 and ckpt.exists() and not resumed.exists()
    done = _torchrun(script, str(resumed), "trades", str(ckpt), "-1", "3")
    assert done.returncode == 0, done.stderr[-3000:]
    a, b = torch.load(full, weights_only=True), torch.load(resumed, weights_only=True)
    assert b["resumed_from"] == 1 and b["world"] == 2
    # every rank's random stream was checkpointed, so the TRADES starts after the resume are the same draws
    assert _same_weights(a["state"], b["state"])
    assert a["losses"] == b["losses"]


def test_distributed_on_without_a_group_is_an_error(small: tuple[Dataset, Dataset], monkeypatch: Any) -> None:
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.delenv("RANK", raising=False)
    with pytest.raises(InputError, match="torchrun"):
        AdversarialTrainer(epochs=1, distributed="on", progress=False).fit(_model(), small[0])


# ----------------------------------------------------------------------------------------------- store schema
def test_store_schema_1_is_upgraded_in_place(tmp_path: Path) -> None:
    import sqlite3

    from bastion.store import SCHEMA_VERSION

    db = tmp_path / "old.db"
    with Store(db) as store:
        run, _ = store.open_run(kind="evaluate", key="k", config={}, model_fp="m", data_fp="d", n_samples=3)
    # turn it into a version-1 file: no training_epochs table, no per-sample queries / extra columns
    conn = sqlite3.connect(db)
    conn.execute("DROP TABLE training_epochs")
    conn.execute("ALTER TABLE samples DROP COLUMN queries")
    conn.execute("ALTER TABLE samples DROP COLUMN extra")
    conn.execute("UPDATE meta SET value = '1' WHERE key = 'schema_version'")
    conn.commit()
    conn.close()
    with Store(db) as store:
        assert [r.key for r in store.runs()] == ["k"]  # the old run is kept
        store.write_epoch(run.id, 0, {"loss": 1.5}, seconds=2.0)
        store.write_epoch(run.id, 0, {"loss": 1.25}, seconds=1.0)  # a resumed epoch replaces its row
        assert store.epochs(run.id) == [{"loss": 1.25, "epoch": 0, "seconds": 1.0}]
        assert store.run(run.id).seconds == pytest.approx(3.0)
    conn = sqlite3.connect(db)
    assert conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()[0] == str(SCHEMA_VERSION)
    conn.close()
    assert SCHEMA_VERSION == 3
