"""kill -9 in the middle of ``bastion evaluate --store``, then resume: nothing lost, nothing counted twice.

The evaluation runs in a real ``bastion`` process; the test watches the store with a read-only SQLite connection,
sends SIGKILL once at least two batches are committed, re-runs the same command to completion and compares the
result with an uninterrupted run of the same command into a fresh store. Evaluation is seeded per batch, so the
two must agree exactly.
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bastion.cli import main
from bastion.results import SampleRecord
from bastion.store import Store

pytestmark = [
    pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs POSIX SIGKILL"),
]  # tests run on one torch thread (conftest), as does the killed process (OMP_NUM_THREADS=1 below)

N = 320
BATCH = 16
THREATS = ["linf:0.05", "linf:0.1"]
# PGD steps per batch: enough that the run lasts a few seconds (about 0.2 s a batch on one busy core), so that
# it can be caught between batches. If the process ever finishes before it is killed, raise this.
PGD_STEPS = 100
START_TIMEOUT_S = 120.0


def evaluate_argv(model: Path, store: Path) -> list[str]:
    return [
        "evaluate", "--model", str(model), "--data", "digits", "--limit", str(N), "--batch-size", str(BATCH),
        "--eps", ",".join(t.split(":")[1] for t in THREATS), "--attack", "fgsm,pgd",
        "--attack-opt", f"pgd.steps={PGD_STEPS}", "--store", str(store), "--json",
    ]  # fmt: skip


def bastion_command() -> list[str]:
    """The installed console script, or the module when the script is not next to this Python."""
    script = Path(sys.executable).with_name("bastion")
    return [str(script)] if script.is_file() else [sys.executable, "-m", "bastion.cli"]


def stored_counts(db: Path) -> dict[str, int]:
    """Records per threat, read without writing; {} while the store or its tables do not exist yet."""
    if not db.exists():
        return {}
    try:
        conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=1.0)
        try:
            rows = conn.execute("SELECT threat, COUNT(*) FROM samples GROUP BY threat").fetchall()
        finally:
            conn.close()
    except sqlite3.OperationalError:  # database is locked, no such table, unable to open (while it starts)
        return {}
    return {str(t): int(c) for t, c in rows}


def run_in_process(capsys: pytest.CaptureFixture[str], argv: list[str]) -> dict:
    capsys.readouterr()
    rc = main(argv)
    out, err = capsys.readouterr()
    assert rc == 0, err
    return json.loads(out)


def _key(r: SampleRecord) -> tuple[str, int]:
    return (r.threat, r.index)


def _outcome(r: SampleRecord) -> tuple[object, ...]:
    """Everything a record says about the sample (not the time it took)."""
    return (r.threat, r.index, r.label, r.clean_pred, r.status, r.adv_distance, r.certified, r.attack)


def test_kill_9_then_resume_matches_an_uninterrupted_run(
    capsys: pytest.CaptureFixture[str], digits_mlp_path: Path, tmp_path: Path
) -> None:
    store = tmp_path / "runs.db"
    argv = evaluate_argv(digits_mlp_path, store)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "BASTION_CACHE": str(tmp_path / "cache")}
    log = tmp_path / "killed.stderr"

    # 1. start the evaluation in its own process and kill -9 it once >= 2 batches are stored, before the end
    with log.open("w") as err_file:
        proc = subprocess.Popen(
            [*bastion_command(), *argv], stdout=subprocess.DEVNULL, stderr=err_file, cwd=tmp_path, env=env
        )
        try:
            deadline = time.monotonic() + START_TIMEOUT_S
            counts: dict[str, int] = {}
            while time.monotonic() < deadline:
                counts = stored_counts(store)
                if counts and min(counts.values()) >= 2 * BATCH:
                    break
                if proc.poll() is not None:
                    break
                time.sleep(0.01)
            finished = proc.poll() is not None
            if not finished:
                os.kill(proc.pid, signal.SIGKILL)
        finally:
            if proc.poll() is None:  # killed above, or the test failed while waiting
                proc.kill()
            proc.wait(timeout=60)
    assert not finished, (
        f"the evaluation ended (exit status {proc.returncode}) before it could be killed; stored {counts}. "
        f"Raise PGD_STEPS in {Path(__file__).name}. stderr:\n{log.read_text()[-2000:]}"
    )
    assert proc.returncode == -signal.SIGKILL
    assert counts and min(counts.values()) >= 2 * BATCH, f"no progress within {START_TIMEOUT_S} s: {counts}"

    # 2. what the killed process left: whole batches only, every threat of a batch together, not finished
    counts = stored_counts(store)
    assert set(counts) == set(THREATS), counts
    done = counts[THREATS[0]]
    assert all(c == done for c in counts.values()), f"threats of one batch written apart: {counts}"
    assert done % BATCH == 0, f"{done} records per threat is not a whole number of batches of {BATCH}"
    assert 2 * BATCH <= done < N, counts
    with Store(store) as db:
        (run,) = db.runs()
        assert run.status == "running" and run.summary is None
        assert run.n_samples == N and run.n_records == done * len(THREATS)
        before = db.records(run.id)
    assert {r.index for r in before} == set(range(done)), "the stored batches are not the first ones"

    # 3. the same command again, to completion: it resumes the run
    resumed = run_in_process(capsys, argv)
    assert resumed["run_id"] == run.id
    with Store(store) as db:
        runs = db.runs()
        assert [r.id for r in runs] == [run.id], "the re-run started a new run instead of resuming"
        final = db.run(run.id)
        records = db.records(run.id)
    assert final.status == "complete"
    assert final.n_records == N * len(THREATS)
    assert len(records) == N * len(THREATS)
    keys = [_key(r) for r in records]
    assert len(set(keys)) == len(keys), "duplicate (threat, idx) records"
    assert set(keys) == {(t, i) for t in THREATS for i in range(N)}
    for t in THREATS:
        assert sum(r.threat == t for r in records) == N
    # the batches stored before the kill were kept as they were, not computed again (seconds are wall times)
    kept = {_key(r): r for r in records}
    assert [kept[_key(r)] for r in before] == before
    assert final.summary is not None
    for field in ("n", "clean_accuracy", "threats", "attacks", "robust_accuracy", "worst_case"):
        assert final.summary[field] == resumed[field], field

    # 4. an uninterrupted run of the same command into a fresh store gives exactly the same results
    clean = run_in_process(capsys, evaluate_argv(digits_mlp_path, tmp_path / "fresh.db"))
    for field in ("n", "clean_accuracy", "threats", "attacks", "robust_accuracy", "worst_case"):
        assert resumed[field] == clean[field], f"{field}: resumed {resumed[field]} vs uninterrupted {clean[field]}"
    with Store(tmp_path / "fresh.db") as db:
        (fresh_run,) = db.runs()
        assert fresh_run.key == final.key  # the same job
        fresh = db.records(fresh_run.id)
    assert [_outcome(r) for r in records] == [_outcome(r) for r in fresh]
    # the test must exercise the attacks: some samples broken by each, some left standing
    assert {"fgsm", "pgd"} <= {r.attack for r in records if r.status == "falsified"}
    assert 0 < clean["worst_case"][THREATS[0]] < clean["clean_accuracy"]
