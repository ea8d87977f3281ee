"""Tests of the SQLite result store: schema checks, runs, records, warnings, concurrency and crash safety."""

from __future__ import annotations

import math
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path

import pytest

from bastion.errors import InputError, StoreError
from bastion.results import SampleRecord
from bastion.store import SCHEMA_VERSION, RunInfo, RunSession, Store, resumable_run, run_key

SRC = Path(__file__).resolve().parents[1] / "src"


def _rec(index: int, threat: str = "linf:0.1", status: str = "unknown", **kw: object) -> SampleRecord:
    return SampleRecord(index=index, threat=threat, label=index % 10, clean_pred=index % 10, status=status, **kw)  # type: ignore[arg-type]


def _open(store: Store, key: str = "k1", n: int = 20, **kw: object) -> tuple[RunInfo, bool]:
    args: dict = {"kind": "evaluate", "key": key, "config": {"eps": 0.1}, "model_fp": "m", "data_fp": "d"}
    args.update(kw)
    return store.open_run(n_samples=n, **args)


@pytest.fixture
def db(tmp_path: Path) -> Path:
    return tmp_path / "results.db"


# -- opening -------------------------------------------------------------------------------------------------


def test_create_and_reopen(db: Path) -> None:
    with Store(db) as store:
        assert store.path == db
        run, resumed = _open(store)
        assert not resumed
        store.write_records(run.id, [_rec(0), _rec(1)])
    assert db.exists()
    with Store(db) as store:
        assert [r.key for r in store.runs()] == ["k1"]
        assert store.run("k1").n_records == 2
    conn = sqlite3.connect(db)
    try:
        meta = dict(conn.execute("SELECT key, value FROM meta"))
        assert meta["schema_version"] == str(SCHEMA_VERSION)
        assert "bastion_version" in meta
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    finally:
        conn.close()


def test_other_schema_version_is_refused(db: Path) -> None:
    conn = sqlite3.connect(db)
    conn.execute("CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT)")
    conn.executemany("INSERT INTO meta VALUES (?, ?)", [("schema_version", "7"), ("bastion_version", "9.9")])
    conn.commit()
    conn.close()
    with pytest.raises(StoreError) as info:
        Store(db)
    msg = str(info.value)
    assert str(db) in msg and "7" in msg and str(SCHEMA_VERSION) in msg
    assert "--store" in msg and "9.9" in msg


def test_non_sqlite_file_is_refused(db: Path) -> None:
    payload = os.urandom(4096)
    db.write_bytes(payload)
    with pytest.raises(StoreError, match="not a bastion result store") as info:
        Store(db)
    assert str(db) in str(info.value)
    assert db.read_bytes() == payload  # left untouched


def test_foreign_sqlite_database_is_refused_and_left_alone(db: Path) -> None:
    conn = sqlite3.connect(db)
    conn.execute("CREATE TABLE people (name TEXT)")
    conn.commit()
    conn.close()
    with pytest.raises(StoreError, match="not a bastion result store"):
        Store(db)
    conn = sqlite3.connect(db)
    try:
        # Opening must not have switched somebody else's database to WAL.
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "delete"
    finally:
        conn.close()


def test_missing_directory_and_closed_store(tmp_path: Path) -> None:
    with pytest.raises(StoreError, match="does not exist"):
        Store(tmp_path / "nope" / "results.db")
    with pytest.raises(StoreError, match="directory"):
        Store(tmp_path)
    store = Store(tmp_path / "a.db")
    store.close()
    store.close()
    with pytest.raises(StoreError, match="closed"):
        store.runs()


def test_empty_existing_file_becomes_a_store(db: Path) -> None:
    db.touch()
    with Store(db) as store:
        assert store.runs() == []


# -- runs ----------------------------------------------------------------------------------------------------


def test_open_run_new_then_resume(db: Path) -> None:
    config = {
        "eps": 0.1,
        "steps": 10,
        "threats": ["linf:0.1", "l2:0.5"],
        "attack": {"name": "pgd", "rel": 0.25},
    }
    with Store(db) as store:
        run, resumed = _open(store, config=config, n=50)
        assert not resumed
        assert run.status == "running" and run.n_samples == 50 and run.n_records == 0 and run.summary is None
        assert run.config == config
        assert set(run.versions) == {"python", "torch", "numpy", "bastion", "platform"}
        store.write_records(run.id, [_rec(i) for i in range(5)], seconds=1.5)
    with Store(db) as store:
        again, resumed = _open(store, config=config, n=50)
        assert resumed
        assert again.id == run.id and again.created == run.created and again.n_records == 5
        assert again.seconds == pytest.approx(1.5)
        assert len(store.runs()) == 1


@pytest.mark.parametrize(
    "change", [{"model_fp": "other"}, {"data_fp": "other"}, {"n": 21}, {"kind": "assess"}], ids=repr
)
def test_same_key_other_job_is_refused(db: Path, change: dict) -> None:
    with Store(db) as store:
        _open(store)
        with pytest.raises(StoreError, match="same key must mean the same job"):
            _open(store, **change)
        assert len(store.runs()) == 1


def test_config_must_be_json(db: Path) -> None:
    with Store(db) as store:
        with pytest.raises(StoreError, match=r"config\['attack'\]\['fn'\]"):
            _open(store, config={"attack": {"fn": object()}})
        with pytest.raises(StoreError, match="keys must be strings"):
            _open(store, config={1: "a"})
        assert store.runs() == []
        np = pytest.importorskip("numpy")
        run, _ = _open(store, config={"eps": np.float32(0.5), "n": np.int64(3), "t": (1, 2), "x": math.inf})
        assert run.config == {"eps": 0.5, "n": 3, "t": [1, 2], "x": math.inf}


def test_run_lookup_and_delete(db: Path) -> None:
    with Store(db) as store:
        run, _ = _open(store)
        store.write_records(run.id, [_rec(0)])
        store.add_warning(run.id, "w", "m")
        assert store.run(run.id).key == "k1"
        assert store.run("k1").id == run.id
        assert store.run(str(run.id)).id == run.id
        with pytest.raises(StoreError, match="bastion runs"):
            store.run("missing")
        with pytest.raises(StoreError):
            store.run(999)
        store.delete_run(run.id)
        with pytest.raises(StoreError):
            store.run(run.id)
        with pytest.raises(StoreError):
            store.delete_run(run.id)
        # Cascades removed the records and warnings too.
        assert store.records(run.id) == [] and store.warnings(run.id) == []


def test_runs_newest_first(db: Path) -> None:
    with Store(db) as store:
        for key in ("a", "b", "c"):
            _open(store, key=key)
        assert [r.key for r in store.runs()] == ["c", "b", "a"]


def test_finish_run(db: Path) -> None:
    with Store(db) as store:
        run, _ = _open(store)
        store.finish_run(run.id, {"robust_accuracy": 0.5, "counts": {"robust": 1}})
        done = store.run(run.id)
        assert done.status == "complete"
        assert done.summary == {"robust_accuracy": 0.5, "counts": {"robust": 1}}
        assert done.updated >= run.updated
        resumed_run, resumed = _open(store)
        assert resumed and resumed_run.status == "complete"
        with pytest.raises(StoreError):
            store.finish_run(999, {})


def test_run_key_is_canonical() -> None:
    a = run_key({"model": "m", "data": "d", "threats": ["linf:0.1"], "attack": {"steps": 10, "rel": 0.1}, "seed": 0})
    b = run_key({"seed": 0, "attack": {"rel": 0.1, "steps": 10}, "threats": ["linf:0.1"], "data": "d", "model": "m"})
    assert a == b and len(a) == 16 and int(a, 16) >= 0
    assert run_key({"eps": 0.1}) != run_key({"eps": 0.1 + 1e-17 * 10})
    assert run_key({"eps": 1}) != run_key({"eps": 2})
    with pytest.raises(StoreError, match=r"payload\['x'\]"):
        run_key({"x": {1, 2}})


# -- records -------------------------------------------------------------------------------------------------


def test_upsert_does_not_double_count(db: Path) -> None:
    with Store(db) as store:
        run, _ = _open(store)
        store.write_records(run.id, [_rec(i) for i in range(5)])
        store.write_records(run.id, [_rec(i, status="falsified", adv_distance=0.05, attack="pgd") for i in range(3, 8)])
        recs = store.records(run.id)
        assert [r.index for r in recs] == list(range(8))
        assert store.run(run.id).n_records == 8
        assert [r.status for r in recs] == ["unknown"] * 3 + ["falsified"] * 5
        assert recs[4].attack == "pgd" and recs[4].adv_distance == pytest.approx(0.05)


def test_records_round_trip_inf_and_none(db: Path) -> None:
    original = [
        _rec(0, status="robust", adv_distance=math.inf, certified=0.25, attack="crown", seconds=0.125),
        _rec(1, status="unknown", adv_distance=None, certified=None, attack=None),
        _rec(2, status="falsified", adv_distance=0.0, certified=-math.inf, attack="clean"),
        _rec(3, threat="l2:0.5", status="falsified", adv_distance=0.1 + 0.2),
    ]
    with Store(db) as store:
        run, _ = _open(store)
        store.write_records(run.id, original)
    with Store(db) as store:
        back = store.records(run.id)
        # Ordered by threat then index: "l2:0.5" sorts before "linf:0.1".
        assert back == [original[3], *original[:3]]
        assert back[1].adv_distance == math.inf and back[1].certified == 0.25
        assert back[2].adv_distance is None and back[2].certified is None and back[2].attack is None
        assert back[0].adv_distance == 0.1 + 0.2  # exact, not approximately
        assert store.records(run.id, threat="l2:0.5") == [original[3]]
        assert store.records(run.id, threat="nothing") == []


def test_records_keep_queries_and_extra(db: Path) -> None:
    original = [
        _rec(0, status="unknown", queries=51_200, extra={"clever": 0.125, "fit": {"shape": 2.5, "ks_p": 0.5}}),
        _rec(1, status="falsified", extra={"log_p": -math.inf, "levels": [1, 2]}),
        _rec(2, status="robust"),
    ]
    with Store(db) as store:
        run, _ = _open(store)
        store.write_records(run.id, original)
        back = store.records(run.id)
    assert back == original
    assert back[0].queries == 51_200 and back[0].extra["fit"]["shape"] == 2.5
    assert back[1].extra["log_p"] == -math.inf and back[2].queries is None and back[2].extra == {}
    with Store(db) as store, pytest.raises(StoreError, match=r"records\[0\]\.extra\['v'\]"):
        store.write_records(run.id, [_rec(5, extra={"v": object()})])


def test_schema_2_store_is_upgraded_in_place(db: Path) -> None:
    """A store written before per-sample queries / extra existed keeps its rows and gains the two columns."""
    conn = sqlite3.connect(db)
    conn.executescript(
        """
        CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT);
        CREATE TABLE runs (id INTEGER PRIMARY KEY, key TEXT UNIQUE NOT NULL, kind TEXT NOT NULL, status TEXT NOT NULL,
            created REAL, updated REAL, seconds REAL, n_samples INTEGER, model_fp TEXT, data_fp TEXT, config TEXT,
            versions TEXT, summary TEXT);
        CREATE TABLE samples (run_id INTEGER REFERENCES runs(id) ON DELETE CASCADE, threat TEXT, idx INTEGER,
            label INTEGER, clean_pred INTEGER, status TEXT, adv_distance REAL, certified REAL, attack TEXT,
            seconds REAL, PRIMARY KEY (run_id, threat, idx));
        CREATE TABLE warnings (id INTEGER PRIMARY KEY, run_id INTEGER REFERENCES runs(id) ON DELETE CASCADE,
            code TEXT, message TEXT, created REAL, UNIQUE (run_id, code, message));
        CREATE TABLE training_epochs (run_id INTEGER REFERENCES runs(id) ON DELETE CASCADE, epoch INTEGER,
            metrics TEXT, seconds REAL, created REAL, PRIMARY KEY (run_id, epoch));
        INSERT INTO meta VALUES ('schema_version', '2'), ('bastion_version', '0.1');
        INSERT INTO runs VALUES (1, 'k', 'evaluate', 'running', 0, 0, 0, 2, 'm', 'd', '{}', '{}', NULL);
        INSERT INTO samples VALUES (1, 'linf:0.1', 0, 3, 3, 'robust', NULL, 0.2, 'crown', 0.5);
        """
    )
    conn.commit()
    conn.close()
    with Store(db) as store:
        (old,) = store.records(1)
        assert old == SampleRecord(0, "linf:0.1", 3, 3, "robust", certified=0.2, attack="crown", seconds=0.5)
        assert old.queries is None and old.extra == {}
        store.write_records(1, [_rec(1, queries=7, extra={"score": 1.5})])
        assert store.records(1)[1].extra == {"score": 1.5}
    conn = sqlite3.connect(db)
    assert conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()[0] == str(SCHEMA_VERSION)
    conn.close()


def test_write_records_checks_its_input(db: Path) -> None:
    with Store(db) as store:
        run, _ = _open(store)
        with pytest.raises(StoreError, match="SampleRecord"):
            store.write_records(run.id, [_rec(0), {"index": 1}])  # type: ignore[list-item]
        with pytest.raises(StoreError, match="no run"):
            store.write_records(run.id + 1, [_rec(0)])
        assert store.run(run.id).n_records == 0


def test_done_indices_across_threats(db: Path) -> None:
    threats = ["linf:0.1", "linf:0.3", "l2:0.5"]
    with Store(db) as store:
        run, _ = _open(store)
        store.write_records(run.id, [_rec(i, threat=threats[0]) for i in range(10)])
        store.write_records(run.id, [_rec(i, threat=threats[1]) for i in range(2, 8)])
        store.write_records(run.id, [_rec(i, threat=threats[2]) for i in (0, 3, 4, 9)])
        store.write_records(run.id, [_rec(i, threat="other") for i in range(10)])
        assert store.done_indices(run.id, threats) == {3, 4}
        assert store.done_indices(run.id, threats[:2]) == set(range(2, 8))
        assert store.done_indices(run.id, [threats[0], threats[0]]) == set(range(10))
        assert store.done_indices(run.id, threats[2]) == {0, 3, 4, 9}
        assert store.done_indices(run.id, []) == set()
        other, _ = _open(store, key="k2")
        assert store.done_indices(other.id, threats) == set()


def test_seconds_accumulate(db: Path) -> None:
    with Store(db) as store:
        run, _ = _open(store)
        store.write_records(run.id, [_rec(0)], seconds=1.25)
        store.write_records(run.id, [], seconds=0.5)
    with Store(db) as store:
        run, _ = _open(store)
        store.write_records(run.id, [_rec(1)], seconds=2.0)
        info = store.run(run.id)
        assert info.seconds == pytest.approx(3.75)
        assert info.updated >= info.created
        with pytest.raises(StoreError, match="seconds"):
            store.write_records(run.id, [_rec(2)], seconds=-1.0)


# -- warnings ------------------------------------------------------------------------------------------------


def test_warnings_are_idempotent(db: Path) -> None:
    with Store(db) as store:
        run, _ = _open(store)
        other, _ = _open(store, key="k2")
        for _ in range(3):
            store.add_warning(run.id, "gradient-masking", "zero gradients on 40% of the samples")
        store.add_warning(run.id, "softmax", "outputs sum to one")
        store.add_warning(other.id, "softmax", "outputs sum to one")
        assert store.warnings(run.id) == [
            ("gradient-masking", "zero gradients on 40% of the samples"),
            ("softmax", "outputs sum to one"),
        ]
        assert store.warnings(other.id) == [("softmax", "outputs sum to one")]
        with pytest.raises(StoreError):
            store.add_warning(999, "x", "y")


# -- concurrency ---------------------------------------------------------------------------------------------


def test_two_stores_on_one_file(db: Path) -> None:
    with Store(db) as writer, Store(db) as reader:
        run, _ = _open(writer)
        assert _open(reader)[1]  # the reader sees the writer's run at once
        errors: list[BaseException] = []
        counts: list[int] = []

        def write() -> None:
            try:
                with Store(db) as own:
                    for b in range(40):
                        own.write_records(run.id, [_rec(b * 5 + j) for j in range(5)], seconds=0.01)
            except BaseException as exc:  # pragma: no cover - reported below
                errors.append(exc)

        thread = threading.Thread(target=write)
        thread.start()
        while thread.is_alive():
            counts.append(reader.run(run.id).n_records)
        thread.join()
        assert not errors
        # A reader never sees part of a batch.
        assert all(c % 5 == 0 for c in counts)
        assert reader.run(run.id).n_records == 200
        assert len(reader.records(run.id)) == 200


def test_reader_not_blocked_by_open_write_and_writer_waits(db: Path) -> None:
    with Store(db) as store:
        run, _ = _open(store)
        store.write_records(run.id, [_rec(0)])
        # The commit comes from a timer thread while the main thread is blocked in write_records.
        raw = sqlite3.connect(db, isolation_level=None, check_same_thread=False)
        raw.execute("BEGIN IMMEDIATE")
        raw.execute(
            "INSERT INTO samples(run_id, threat, idx, label, clean_pred, status) "
            "VALUES (?, 'linf:0.1', 99, 0, 0, 'unknown')",
            (run.id,),
        )
        # WAL: the uncommitted row is invisible and reading does not wait for the lock.
        start = time.perf_counter()
        assert [r.index for r in store.records(run.id)] == [0]
        assert time.perf_counter() - start < 1.0
        # A second writer waits on the busy timeout instead of failing.
        timer = threading.Timer(0.3, lambda: raw.execute("COMMIT"))
        timer.start()
        try:
            store.write_records(run.id, [_rec(1)])
        finally:
            timer.join()
            raw.close()
        assert [r.index for r in store.records(run.id)] == [0, 1, 99]


# -- crash safety --------------------------------------------------------------------------------------------

_WRITER = textwrap.dedent(
    """
    import sys, time
    sys.path.insert(0, {src!r})
    from bastion.results import SampleRecord
    from bastion.store import Store

    store = Store({db!r})
    run, resumed = store.open_run(
        kind="evaluate", key="crash", config={{}}, model_fp="m", data_fp="d", n_samples={n}
    )
    assert resumed
    batch = 0
    while True:
        # 5 samples x 2 threats = 10 rows per batch, batch b covering indices 5b .. 5b+4.
        records = [
            SampleRecord(index=(5 * batch + j) % {n}, threat=t, label=0, clean_pred=0, status="unknown")
            for t in ("linf:0.1", "l2:0.5")
            for j in range(5)
        ]
        store.write_records(run.id, records, seconds=1.0)
        batch += 1
        time.sleep(0.002)
    """
)


def test_kill_during_writes_then_resume(db: Path) -> None:
    n = 100_000  # far more than are written before the kill
    threats = ("linf:0.1", "l2:0.5")
    with Store(db) as store:
        run, _ = _open(store, key="crash", config={}, n=n)
    script = _WRITER.format(src=str(SRC), db=str(db), n=n)
    err_path = db.with_suffix(".stderr")
    with open(err_path, "wb") as err:
        proc = subprocess.Popen([sys.executable, "-c", script], stderr=err)
    try:
        with Store(db) as watcher:
            deadline = time.monotonic() + 120
            while watcher.run(run.id).n_records < 50:
                assert proc.poll() is None, f"writer exited early: {err_path.read_text()}"
                assert time.monotonic() < deadline, "writer wrote nothing in time"
                time.sleep(0.01)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    assert proc.returncode == -signal.SIGKILL

    with Store(db) as store:
        conn = sqlite3.connect(db)
        try:
            assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        finally:
            conn.close()
        info = store.run(run.id)
        assert info.n_records >= 50 and info.n_records % 10 == 0
        batches = info.n_records // 10
        # The batches committed are exactly the first ones, each whole, and their seconds went in with them.
        assert info.seconds == pytest.approx(batches)
        assert store.done_indices(run.id, threats) == set(range(5 * batches))
        for threat in threats:
            assert [r.index for r in store.records(run.id, threat)] == list(range(5 * batches))

        # Resume: finish a job of `total` samples from where the killed writer stopped.
        total = 5 * batches + 37
        resumed, was_resumed = _open(store, key="crash", config={}, n=n)
        assert was_resumed
        todo = [i for i in range(total) if i not in store.done_indices(resumed.id, threats)]
        assert todo == list(range(5 * batches, total))
        for start in range(0, len(todo), 8):
            chunk = todo[start : start + 8]
            store.write_records(resumed.id, [_rec(i, threat=t) for t in threats for i in chunk], seconds=0.5)
        rows = {(r.threat, r.index) for r in store.records(resumed.id)}
        assert rows == {(t, i) for t in threats for i in range(total)}
        assert store.run(resumed.id).n_records == 2 * total


# -- resumable_run -------------------------------------------------------------------------------------------


@dataclass
class _Result:
    run_id: int | None = None
    seconds: float = 0.0

    def to_dict(self) -> dict:
        return {"ok": True, "run_id": self.run_id}


def _session(
    store: object, payload: dict | None = None, calls: list | None = None, **kw: object
) -> AbstractContextManager[RunSession]:
    def fingerprints() -> tuple[str, str]:
        if calls is not None:
            calls.append(1)
        return "m", "d"

    args: dict = {"kind": "evaluate", "payload": payload or {"eps": 0.1}, "n_samples": 6, "threats": ["a", "b"]}
    args.update(kw)
    return resumable_run(store, fingerprints=fingerprints, **args)  # type: ignore[arg-type]


def test_resumable_run_key_config_and_resume(db: Path) -> None:
    with _session(db, config={"batch_size": 2, "odd": {1, 2}}) as run:
        assert not run.resumed and run.done == set() and run.todo(4) == [0, 1, 2, 3]
        # a sample is done only once it has a record for every threat of the job
        run.write([_rec(0, "a"), _rec(0, "b"), _rec(1, "a")], seconds=1.5)
        run.warn("w", "careful")
        run.warn("w", "careful")
    with Store(db) as store:
        (info,) = store.runs()
        # the key is run_key of kind, fingerprints and payload: what any session of the same job derives
        assert info.key == run_key({"kind": "evaluate", "model": "m", "data": "d", "eps": 0.1})
        assert info.status == "running" and info.seconds == pytest.approx(1.5)
        assert info.config == {
            "kind": "evaluate",
            "model": "m",
            "data": "d",
            "eps": 0.1,
            "batch_size": 2,
            "odd": "{1, 2}",
        }
        assert store.warnings(info.id) == [("w", "careful")]
    with _session(db) as run:
        assert run.resumed and run.run_id == info.id
        assert run.done == {0} and run.todo(range(3, -1, -1)) == [3, 2, 1]
        run.write([_rec(1, "b")], seconds=0.5)
        assert [r.index for r in run.records("a")] == [0, 1] and len(run.records()) == 4
        result = _Result()
        assert run.finish(result, started=time.perf_counter() - 3.0) is result
        assert result.run_id == info.id and 3.0 <= result.seconds < 60
    with Store(db) as store:
        (info,) = store.runs()
        assert info.status == "complete" and info.seconds == pytest.approx(2.0)
        assert info.summary == {"ok": True, "run_id": info.id}
    with _session(db, payload={"eps": 0.2}) as run:  # another job: another run
        assert not run.resumed and run.done == set()


def test_resumable_run_without_store_keeps_records_in_memory() -> None:
    calls: list = []
    with _session(None, calls=calls) as run:
        assert run.run_id is None and run.done == set() and run.todo(2) == [0, 1]
        run.write([_rec(1, "b"), _rec(0, "a")], seconds=1.0)
        run.warn("w", "ignored")
        result = run.finish(_Result(), started=time.perf_counter())
        assert result.run_id is None and result.seconds >= 0
        assert [(r.index, r.threat) for r in run.records()] == [(1, "b"), (0, "a")]
        assert [r.index for r in run.records("a")] == [0]
    assert calls == []  # fingerprints are not computed without a store


def test_resumable_run_borrows_a_store_and_closes_an_opened_one(db: Path) -> None:
    with Store(db) as store:
        with _session(store) as run:
            assert run.store is store
        assert store.runs()[0].n_records == 0  # still open after the block
    with pytest.raises(RuntimeError):
        with _session(db) as run:
            opened = run.store
            raise RuntimeError("crash inside the block")
    assert opened is not None
    with pytest.raises(StoreError, match="closed"):
        opened.runs()


def test_resumable_run_refuses_bad_stores(db: Path) -> None:
    with pytest.raises(InputError, match="store must be a Store, a path or None, got float"):
        with _session(3.5):
            pass
    with _session(db):
        pass
    # the same key for another job (here another sample count) is refused, and the opened store is closed again
    with pytest.raises(StoreError, match="belongs to another job"):
        with _session(db, n_samples=7):
            pass


def test_resumable_run_batches_skip_done_samples_and_time_each_batch(db: Path) -> None:
    import torch

    from bastion.data import Dataset

    data = Dataset(torch.rand(7, 2), torch.arange(7) % 2, num_classes=2, name="t")
    with _session(db, n_samples=7, threats=["a"]) as run:
        run.write([_rec(i, "a") for i in (1, 4)], seconds=0.0)
    with _session(db, n_samples=7, threats=["a"]) as run:
        assert run.done == {1, 4}
        seen = []
        for idx, x, y in run.batches(data, 2, desc="test", progress=False):
            assert torch.equal(x, data.x[idx]) and torch.equal(y, data.y[idx])
            seen.append(idx.tolist())
            time.sleep(0.01)
            run.write([_rec(i, "a") for i in idx.tolist()])  # seconds: since the batch was handed out
        assert seen == [[0, 2], [3, 5], [6]]
        assert run.done == {1, 4}  # the done set of the session's start
        with pytest.raises(InputError, match="seconds"):
            run.write([_rec(0, "a")])  # outside the loop the time must be given
        info = run.store.run(run.run_id)  # type: ignore[union-attr,arg-type]
        assert info.n_records == 7 and 0.03 <= info.seconds < 5
