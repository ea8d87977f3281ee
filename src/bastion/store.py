"""The result store: one SQLite file holding runs, their per-sample records and their warnings.

Every long job (evaluation, assessment, verification) writes its per-sample
:class:`~bastion.results.SampleRecord` rows here as it goes, one transaction per batch, so that a crash or
``kill -9`` at any moment loses at most the batch in flight and the job resumes where it stopped: a run is
identified by a deterministic key (see :func:`run_key`), :meth:`Store.open_run` finds it again, and
:meth:`Store.done_indices` says which samples need no more work.

The file uses SQLite's write-ahead log, so readers (``bastion runs``, a report) never block the writer and the
writer never blocks them; several processes may share one store. Only the standard library's :mod:`sqlite3` is
used.

Schema (version :data:`SCHEMA_VERSION`)::

    meta(key TEXT PRIMARY KEY, value TEXT)             -- schema_version, bastion_version
    runs(id, key UNIQUE, kind, status, created, updated, seconds, n_samples, model_fp, data_fp,
         config JSON, versions JSON, summary JSON)
    samples(run_id -> runs, threat, idx, label, clean_pred, status, adv_distance, certified, attack, seconds,
            PRIMARY KEY (run_id, threat, idx))
    warnings(id, run_id -> runs, code, message, created, UNIQUE (run_id, code, message))
    training_epochs(run_id -> runs, epoch, metrics JSON, seconds, created, PRIMARY KEY (run_id, epoch))

:func:`resumable_run` wraps the usual life of a resumable job (open or borrow a store, find or create the run,
skip what is done, write batch by batch, summarise from the stored records, mark the run complete) in one context
manager; it works the same without a store, keeping the records in memory.

Version history: 1 had no ``training_epochs``; a version-1 file is upgraded in place when opened (the change only
adds a table, so nothing written by version 1 is touched).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import math
import numbers
import os
import platform
import sqlite3
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

from bastion.errors import InputError, StoreError
from bastion.results import SampleRecord

if TYPE_CHECKING:
    import torch

    from bastion.data import Dataset

__all__ = ["SCHEMA_VERSION", "RunInfo", "RunSession", "Store", "resumable_run", "run_key"]

SCHEMA_VERSION: int = 3

#: Older schema versions that :class:`Store` upgrades in place, with the statements that do it.
_MIGRATIONS: dict[int, str] = {}

# Long enough to wait out another process's batch commit (or a checkpoint) on a slow disk, short enough that a
# store held by a hung process is reported rather than waited on forever.
_BUSY_TIMEOUT_MS = 30_000

# Added in schema version 2: created with a new store, and by the migration of a version-1 one.
_EPOCHS_TABLE = """
CREATE TABLE IF NOT EXISTS training_epochs (
    run_id INTEGER REFERENCES runs(id) ON DELETE CASCADE,
    epoch INTEGER,
    metrics TEXT,
    seconds REAL,
    created REAL,
    PRIMARY KEY (run_id, epoch)
);
"""

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (
    key TEXT PRIMARY KEY,
    value TEXT
);
CREATE TABLE IF NOT EXISTS runs (
    id INTEGER PRIMARY KEY,
    key TEXT UNIQUE NOT NULL,
    kind TEXT NOT NULL,
    status TEXT NOT NULL,
    created REAL,
    updated REAL,
    seconds REAL,
    n_samples INTEGER,
    model_fp TEXT,
    data_fp TEXT,
    config TEXT,
    versions TEXT,
    summary TEXT
);
CREATE TABLE IF NOT EXISTS samples (
    run_id INTEGER REFERENCES runs(id) ON DELETE CASCADE,
    threat TEXT,
    idx INTEGER,
    label INTEGER,
    clean_pred INTEGER,
    status TEXT,
    adv_distance REAL,
    certified REAL,
    attack TEXT,
    seconds REAL,
    queries INTEGER,
    extra TEXT,
    PRIMARY KEY (run_id, threat, idx)
);
CREATE TABLE IF NOT EXISTS warnings (
    id INTEGER PRIMARY KEY,
    run_id INTEGER REFERENCES runs(id) ON DELETE CASCADE,
    code TEXT,
    message TEXT,
    created REAL,
    UNIQUE (run_id, code, message)
);
CREATE INDEX IF NOT EXISTS warnings_run ON warnings(run_id);
"""
_SCHEMA += _EPOCHS_TABLE

# version 1 -> 2: per-epoch metrics of training runs (an added table; existing rows are untouched)
_MIGRATIONS[1] = _EPOCHS_TABLE
# version 2 -> 3: per-sample model-call counts and method-specific values (two added columns, NULL in old rows)
_MIGRATIONS[2] = "ALTER TABLE samples ADD COLUMN queries INTEGER; ALTER TABLE samples ADD COLUMN extra TEXT"

_RUN_COLUMNS = (
    "id, key, kind, status, created, updated, seconds, n_samples, model_fp, data_fp, config, versions, "
    "summary, "
    "(SELECT COUNT(*) FROM samples WHERE samples.run_id = runs.id) AS n_records"
)


@dataclass
class RunInfo:
    """One run as stored.

    Attributes:
        id: integer id of the run in this store.
        key: deterministic key of the job (see :func:`run_key`); the same key means the same job.
        kind: what produced the run (``"evaluate"``, ``"assess"``, ``"verify"``, ...).
        status: ``"running"`` until :meth:`Store.finish_run`, then ``"complete"``.
        created: creation time (seconds since the epoch).
        updated: time of the last write.
        seconds: work time accumulated over every session that wrote to the run (resumes included).
        n_samples: number of samples the job covers.
        model_fp: fingerprint of the model.
        data_fp: fingerprint of the data.
        config: the job's configuration, as given to :meth:`Store.open_run`.
        versions: python, torch, numpy, bastion and platform versions of the session that created the run.
        summary: the summary given to :meth:`Store.finish_run`, or ``None`` while running.
        n_records: number of per-sample rows stored for this run.
    """

    id: int
    key: str
    kind: str
    status: str
    created: float
    updated: float
    seconds: float
    n_samples: int
    model_fp: str
    data_fp: str
    config: dict[str, Any]
    versions: dict[str, Any]
    summary: dict[str, Any] | None
    n_records: int


def _jsonable(value: Any, where: str) -> Any:
    """A copy of ``value`` made only of JSON types, or a StoreError naming where the first bad value sits.

    Numbers from NumPy (``np.float32``, ``np.int64``, ...) are turned into Python numbers so that configs
    built from arrays store cleanly; tuples become lists, as they would in JSON anyway.
    """
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        return float(value)
    if isinstance(value, dict):
        out = {}
        for k, v in value.items():
            if not isinstance(k, str):
                raise StoreError(
                    f"{where} has a key {k!r} of type {type(k).__name__}; JSON keys must be strings, "
                    "convert it with str()"
                )
            out[k] = _jsonable(v, f"{where}[{k!r}]")
        return out
    if isinstance(value, (list, tuple)):
        return [_jsonable(v, f"{where}[{i}]") for i, v in enumerate(value)]
    text = repr(value)
    if len(text) > 60:
        text = text[:57] + "..."
    raise StoreError(
        f"{where} is a {type(value).__name__} ({text}), which cannot be stored as JSON; "
        "use numbers, strings, booleans, None, lists or dicts (e.g. a tensor's .tolist(), a threat "
        "model's .key)"
    )


def _dumps(value: Any, where: str) -> str:
    # sort_keys makes equal configs byte-identical, which run_key relies on; json writes floats with repr, so
    # a float survives the round trip exactly, and inf/nan are kept (as Infinity/NaN) rather than refused.
    return json.dumps(_jsonable(value, where), sort_keys=True, separators=(",", ":"), allow_nan=True)


def run_key(payload: dict[str, Any]) -> str:
    """A deterministic key for a job: the first 16 hex digits of the SHA-256 of the payload's canonical JSON.

    The canonical JSON sorts dict keys, has no spaces and writes floats with ``repr`` (exact). Build the
    payload from everything that defines the job (model fingerprint, data fingerprint, threats, attack
    configuration, seed) and the same job will get the same key in every session, which is what lets it
    resume. ``1`` and ``1.0`` are different JSON and give different keys, so build payloads the same way each
    time.

    Args:
        payload: a dict of JSON-compatible values (numbers, strings, booleans, None, lists, dicts).

    Returns:
        A 16-character lowercase hex string.

    Raises:
        StoreError: a value cannot be written as JSON (the message names its key).
    """
    if not isinstance(payload, dict):
        raise StoreError(f"run_key needs a dict payload, got {type(payload).__name__}")
    return hashlib.sha256(_dumps(payload, "payload").encode("utf-8")).hexdigest()[:16]


@functools.lru_cache(maxsize=1)
def _collect_versions() -> dict[str, str]:
    versions = {"python": platform.python_version(), "platform": platform.platform()}
    try:
        import torch

        versions["torch"] = str(torch.__version__)
    except ImportError:  # pragma: no cover - torch is a hard dependency
        versions["torch"] = "0"
    try:
        import numpy

        versions["numpy"] = str(numpy.__version__)
    except ImportError:  # pragma: no cover - numpy is a hard dependency
        versions["numpy"] = "0"
    versions["bastion"] = _bastion_version()
    return versions


def _bastion_version() -> str:
    try:
        from bastion import __version__  # type: ignore[attr-defined]
    except ImportError:
        return "0"
    return str(__version__)


def _float_or_none(value: Any) -> float | None:
    return None if value is None else float(value)


class Store:
    """An SQLite result store of runs, per-sample records and warnings; creates the file if it does not exist.

    Safe to use from several processes at once (each with its own ``Store``): every write is a single
    transaction, readers see only committed batches and never wait for the writer. A ``Store`` object itself
    belongs to the thread that created it.

    Args:
        path: the store file. Its directory must exist; the file is created with an empty schema if absent.

    Raises:
        StoreError: the directory does not exist, the file is not a bastion store, or it was written with
            another schema version.

    Example::

        with Store("results.db") as store:
            run, resumed = store.open_run(kind="evaluate", key=key, config=cfg, model_fp=mfp, data_fp=dfp,
                                          n_samples=len(data))
            todo = [i for i in range(len(data)) if i not in store.done_indices(run.id, threats)]
            ...
            store.write_records(run.id, batch_records, seconds=batch_seconds)
            store.finish_run(run.id, summary)
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path).expanduser()
        self._conn: sqlite3.Connection | None = None
        parent = self.path.resolve().parent
        if not parent.is_dir():
            raise StoreError(
                f"cannot create the result store {self.path}: the directory {parent} does not exist; "
                "create it first or choose another --store path"
            )
        if self.path.is_dir():
            raise StoreError(f"the result store path {self.path} is a directory; give a file path with --store")
        try:
            # isolation_level=None: transactions are begun explicitly (see _write), so that each write takes
            # the write lock up front and nothing is ever left half-open by the module's implicit BEGIN.
            conn = sqlite3.connect(str(self.path), timeout=_BUSY_TIMEOUT_MS / 1000, isolation_level=None)
        except sqlite3.Error as exc:
            raise StoreError(f"cannot open the result store {self.path}: {exc}") from exc
        try:
            self._setup(conn)
        except BaseException:
            conn.close()
            raise
        self._conn = conn

    # -- connection ------------------------------------------------------------------------------------------

    def _setup(self, conn: sqlite3.Connection) -> None:
        try:
            conn.execute(f"PRAGMA busy_timeout = {_BUSY_TIMEOUT_MS}")
            conn.execute("PRAGMA foreign_keys = ON")
            # Check what the file is before changing anything: switching journal mode is persistent, and a
            # store must never alter somebody else's database.
            found = self._schema_version(conn)
            conn.execute("PRAGMA journal_mode = WAL")
            # NORMAL is durable across process crashes in WAL mode (only a power loss can drop the last
            # commits), and spares an fsync per batch.
            conn.execute("PRAGMA synchronous = NORMAL")
            if found is not None and found != SCHEMA_VERSION:
                self._migrate(conn)
            if found is None:
                conn.execute("BEGIN IMMEDIATE")
                try:
                    # Another process may have created the schema between our check and the lock.
                    found = self._schema_version(conn)
                    if found is None:
                        for statement in _SCHEMA.split(";"):
                            if statement.strip():
                                conn.execute(statement)
                        conn.executemany(
                            "INSERT OR IGNORE INTO meta(key, value) VALUES (?, ?)",
                            [
                                ("schema_version", str(SCHEMA_VERSION)),
                                ("bastion_version", _bastion_version()),
                            ],
                        )
                    conn.execute("COMMIT")
                except BaseException:
                    if conn.in_transaction:
                        conn.execute("ROLLBACK")
                    raise
        except sqlite3.OperationalError as exc:
            # Locked, read-only, I/O error...: the file may well be a store, so do not call it foreign.
            raise StoreError(f"cannot open the result store {self.path}: {exc}") from exc
        except sqlite3.DatabaseError as exc:
            raise StoreError(
                f"{self.path} is not a bastion result store (version found: none, expected schema version "
                f"{SCHEMA_VERSION}; SQLite says: {exc}); use another --store path"
            ) from exc

    def _migrate(self, conn: sqlite3.Connection) -> None:
        """Upgrade an older schema in place, one version at a time, each step in its own transaction."""
        conn.execute("BEGIN IMMEDIATE")
        try:
            # re-read under the write lock: another process may have upgraded the file meanwhile
            version = int(dict(conn.execute("SELECT key, value FROM meta").fetchall())["schema_version"])
            while version != SCHEMA_VERSION:
                for statement in _MIGRATIONS[version].split(";"):
                    if statement.strip():
                        conn.execute(statement)
                version += 1
                conn.execute("UPDATE meta SET value = ? WHERE key = 'schema_version'", (str(version),))
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise

    def _schema_version(self, conn: sqlite3.Connection) -> int | None:
        """The schema version of the file, ``None`` for an empty database; StoreError for anything else."""
        tables = {row[0] for row in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        if not tables:
            return None
        if "meta" not in tables:
            raise StoreError(
                f"{self.path} is an SQLite database but not a bastion result store (no 'meta' table; "
                f"version found: none, expected schema version {SCHEMA_VERSION}); use another --store path"
            )
        meta = dict(conn.execute("SELECT key, value FROM meta").fetchall())
        raw = meta.get("schema_version")
        try:
            found = int(raw) if raw is not None else None
        except ValueError:
            found = None
        if found is None:
            raise StoreError(
                f"{self.path} is not a bastion result store (schema_version found: {raw!r}, expected "
                f"{SCHEMA_VERSION}); use another --store path"
            )
        if found != SCHEMA_VERSION and found not in _MIGRATIONS:
            written_by = meta.get("bastion_version", "unknown")
            raise StoreError(
                f"the result store {self.path} has schema version {found} (written by bastion "
                f"{written_by}), but this bastion ({_bastion_version()}) reads schema version "
                f"{SCHEMA_VERSION}; use another --store path, or open this store with the bastion version "
                "that wrote it"
            )
        return found

    @property
    def _db(self) -> sqlite3.Connection:
        if self._conn is None:
            raise StoreError(f"the result store {self.path} is closed; open a new Store to use it")
        return self._conn

    @contextlib.contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """One write transaction: all of its statements are committed together or not at all.

        BEGIN IMMEDIATE takes the write lock at the start. A deferred transaction that reads first and writes
        later can fail at once with "database is locked" when another process committed in between (the busy
        timeout does not help there), which would surface as random errors in concurrent jobs.
        """
        conn = self._db
        try:
            conn.execute("BEGIN IMMEDIATE")
        except sqlite3.Error as exc:
            raise StoreError(f"cannot write to the result store {self.path}: {exc}") from exc
        try:
            yield conn
            conn.execute("COMMIT")
        except BaseException as exc:
            # SQLite rolls back by itself on some errors (disk full, ...); a second ROLLBACK would then fail.
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            if isinstance(exc, sqlite3.Error):
                raise StoreError(f"writing to the result store {self.path} failed: {exc}") from exc
            raise

    def _read(self, sql: str, params: Sequence[Any] = ()) -> list[Any]:
        try:
            return self._db.execute(sql, params).fetchall()
        except sqlite3.Error as exc:
            raise StoreError(f"reading the result store {self.path} failed: {exc}") from exc

    def close(self) -> None:
        """Close the connection (idempotent); the WAL is checkpointed into the main file by SQLite."""
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Store({str(self.path)!r})"

    # -- runs ------------------------------------------------------------------------------------------------

    def _run_info(self, row: Sequence[Any]) -> RunInfo:
        return RunInfo(
            id=int(row[0]),
            key=row[1],
            kind=row[2],
            status=row[3],
            created=float(row[4]),
            updated=float(row[5]),
            seconds=float(row[6] or 0.0),
            n_samples=int(row[7]),
            model_fp=row[8],
            data_fp=row[9],
            config=json.loads(row[10]) if row[10] else {},
            versions=json.loads(row[11]) if row[11] else {},
            summary=json.loads(row[12]) if row[12] is not None else None,
            n_records=int(row[13]),
        )

    def _get_run(self, conn: sqlite3.Connection, column: str, value: int | str) -> RunInfo | None:
        row = conn.execute(f"SELECT {_RUN_COLUMNS} FROM runs WHERE {column} = ?", (value,)).fetchone()
        return None if row is None else self._run_info(row)

    def open_run(
        self, *, kind: str, key: str, config: dict[str, Any], model_fp: str, data_fp: str, n_samples: int
    ) -> tuple[RunInfo, bool]:
        """Find the run with this key, or create it.

        Args:
            kind: what produces the run (``"evaluate"``, ``"assess"``, ``"verify"``, ...).
            key: deterministic key of the job, usually :func:`run_key` of what defines it.
            config: the job's configuration (JSON-compatible values only), kept for reports and reproduction.
            model_fp: fingerprint of the model.
            data_fp: fingerprint of the data.
            n_samples: number of samples the job covers.

        Returns:
            ``(run, resumed)``: the existing run unchanged and ``True``, or the new ``"running"`` run and
            ``False``.

        Raises:
            StoreError: a run with this key exists but for another kind, model, data or sample count (the same
                key must mean the same job), or ``config`` holds a value that is not JSON.
        """
        if not isinstance(key, str) or not key:
            raise StoreError(f"a run key must be a non-empty string, got {key!r}; derive one with run_key(...)")
        if not isinstance(config, dict):
            raise StoreError(f"config must be a dict, got {type(config).__name__}")
        n_samples = int(n_samples)
        config_json = _dumps(config, "config")
        with self._write() as conn:
            existing = self._get_run(conn, "key", key)
            if existing is not None:
                given = {"kind": kind, "model_fp": model_fp, "data_fp": data_fp, "n_samples": n_samples}
                stored = {
                    "kind": existing.kind,
                    "model_fp": existing.model_fp,
                    "data_fp": existing.data_fp,
                    "n_samples": existing.n_samples,
                }
                diffs = [
                    f"{name} {stored[name]!r} (stored) vs {given[name]!r} (now)"
                    for name in given
                    if stored[name] != given[name]
                ]
                if diffs:
                    raise StoreError(
                        f"run {existing.id} with key {key!r} in {self.path} belongs to another job: "
                        f"{'; '.join(diffs)}. The same key must mean the same job; derive the key from the "
                        "model and data fingerprints (run_key), use another --store path, or delete run "
                        f"{existing.id} first"
                    )
                return existing, True
            now = time.time()
            cursor = conn.execute(
                "INSERT INTO runs(key, kind, status, created, updated, seconds, n_samples, model_fp, "
                "data_fp, config, versions, summary) "
                "VALUES (?, ?, 'running', ?, ?, 0.0, ?, ?, ?, ?, ?, NULL)",
                (
                    key,
                    kind,
                    now,
                    now,
                    n_samples,
                    model_fp,
                    data_fp,
                    config_json,
                    json.dumps(_collect_versions(), sort_keys=True),
                ),
            )
            run_id = cursor.lastrowid
            created = self._get_run(conn, "id", run_id) if run_id is not None else None
        assert created is not None
        return created, False

    def _missing(self, what: int | str) -> StoreError:
        return StoreError(
            f"no run {what!r} in the result store {self.path}; list the runs it holds with "
            f"`bastion runs --store {self.path}` (or Store.runs())"
        )

    def run(self, run_id_or_key: int | str) -> RunInfo:
        """The run with this id (an int) or key (a str).

        A string of digits that is no run's key is also tried as an id, so ids typed on a command line work.

        Args:
            run_id_or_key: the run's integer id or its key.

        Raises:
            StoreError: there is no such run.
        """
        conn = self._db
        found: RunInfo | None = None
        try:
            if isinstance(run_id_or_key, bool):
                raise self._missing(run_id_or_key)
            if isinstance(run_id_or_key, numbers.Integral):
                found = self._get_run(conn, "id", int(run_id_or_key))
            elif isinstance(run_id_or_key, str):
                found = self._get_run(conn, "key", run_id_or_key)
                if found is None and run_id_or_key.isdigit():
                    found = self._get_run(conn, "id", int(run_id_or_key))
        except sqlite3.Error as exc:
            raise StoreError(f"reading the result store {self.path} failed: {exc}") from exc
        if found is None:
            raise self._missing(run_id_or_key)
        return found

    def runs(self) -> list[RunInfo]:
        """Every run in the store, newest first."""
        rows = self._read(f"SELECT {_RUN_COLUMNS} FROM runs ORDER BY created DESC, id DESC")
        return [self._run_info(row) for row in rows]

    def finish_run(self, run_id: int, summary: dict[str, Any]) -> None:
        """Mark the run complete and store its summary.

        Args:
            run_id: id of the run.
            summary: JSON-compatible summary of the results (robust accuracy, counts, ...).

        Raises:
            StoreError: there is no such run, or the summary holds a value that is not JSON.
        """
        summary_json = _dumps(summary, "summary")
        with self._write() as conn:
            cursor = conn.execute(
                "UPDATE runs SET status = 'complete', summary = ?, updated = ? WHERE id = ?",
                (summary_json, time.time(), run_id),
            )
            if cursor.rowcount == 0:
                raise self._missing(run_id)

    def delete_run(self, run_id: int) -> None:
        """Delete the run with its records and warnings.

        Raises:
            StoreError: there is no such run.
        """
        with self._write() as conn:
            if conn.execute("DELETE FROM runs WHERE id = ?", (run_id,)).rowcount == 0:
                raise self._missing(run_id)

    # -- samples ---------------------------------------------------------------------------------------------

    def write_records(self, run_id: int, records: Iterable[SampleRecord], *, seconds: float = 0.0) -> None:
        """Store a batch of per-sample records and the time it took, in one transaction.

        A record with the (threat, index) of one already stored replaces it, so re-running a batch after a
        resume never counts a sample twice. Either the whole batch and its seconds are stored, or (after a
        crash) none.

        Args:
            run_id: id of the run.
            records: the batch's records.
            seconds: work time of the batch, added to the run's accumulated seconds.

        Raises:
            StoreError: there is no such run, or an item is not a SampleRecord.
        """
        rows = []
        for i, rec in enumerate(records):
            if not isinstance(rec, SampleRecord):
                raise StoreError(f"records[{i}] is a {type(rec).__name__}, expected a bastion SampleRecord")
            rows.append(
                (
                    run_id,
                    rec.threat,
                    int(rec.index),
                    int(rec.label),
                    int(rec.clean_pred),
                    rec.status,
                    _float_or_none(rec.adv_distance),
                    _float_or_none(rec.certified),
                    rec.attack,
                    float(rec.seconds),
                    None if rec.queries is None else int(rec.queries),
                    _dumps(rec.extra, f"records[{i}].extra") if rec.extra else None,
                )
            )
        seconds = float(seconds)
        if not math.isfinite(seconds) or seconds < 0:
            raise StoreError(f"seconds must be a finite number >= 0, got {seconds}")
        with self._write() as conn:
            cursor = conn.execute(
                "UPDATE runs SET seconds = COALESCE(seconds, 0) + ?, updated = ? WHERE id = ?",
                (seconds, time.time(), run_id),
            )
            if cursor.rowcount == 0:
                raise self._missing(run_id)
            conn.executemany(
                "INSERT OR REPLACE INTO samples(run_id, threat, idx, label, clean_pred, status, "
                "adv_distance, certified, attack, seconds, queries, extra) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                rows,
            )

    def records(self, run_id: int, threat: str | None = None) -> list[SampleRecord]:
        """The run's records ordered by threat then index, optionally for one threat only.

        Args:
            run_id: id of the run.
            threat: a threat key (``ThreatModel.key``) to keep only its records, or ``None`` for all.
        """
        sql = (
            "SELECT idx, threat, label, clean_pred, status, adv_distance, certified, attack, seconds, queries, extra "
            "FROM samples WHERE run_id = ?"
        )
        params: list[Any] = [run_id]
        if threat is not None:
            sql += " AND threat = ?"
            params.append(threat)
        rows = self._read(sql + " ORDER BY threat, idx", params)
        return [
            SampleRecord(
                index=int(r[0]),
                threat=r[1],
                label=int(r[2]),
                clean_pred=int(r[3]),
                status=r[4],
                adv_distance=_float_or_none(r[5]),
                certified=_float_or_none(r[6]),
                attack=r[7],
                seconds=float(r[8] or 0.0),
                queries=None if r[9] is None else int(r[9]),
                extra=json.loads(r[10]) if r[10] else {},
            )
            for r in rows
        ]

    def done_indices(self, run_id: int, threats: Sequence[str]) -> set[int]:
        """Indices of the samples with a record for every one of ``threats``: nothing is left to do for them.

        Args:
            run_id: id of the run.
            threats: threat keys; a single string is taken as one threat. An empty sequence gives an
                empty set.
        """
        wanted = sorted({threats} if isinstance(threats, str) else set(threats))
        if not wanted:
            return set()
        marks = ", ".join("?" * len(wanted))
        rows = self._read(
            f"SELECT idx FROM samples WHERE run_id = ? AND threat IN ({marks}) "
            "GROUP BY idx HAVING COUNT(DISTINCT threat) = ?",
            [run_id, *wanted, len(wanted)],
        )
        return {int(r[0]) for r in rows}

    # -- warnings --------------------------------------------------------------------------------------------

    def add_warning(self, run_id: int, code: str, message: str) -> None:
        """Store a warning with the run, once: adding it again (as a resumed run does) changes nothing.

        Args:
            run_id: id of the run.
            code: short machine-readable code (e.g. ``"gradient-masking"``).
            message: the explanation shown to the user.

        Raises:
            StoreError: there is no such run.
        """
        with self._write() as conn:
            if conn.execute("SELECT 1 FROM runs WHERE id = ?", (run_id,)).fetchone() is None:
                raise self._missing(run_id)
            conn.execute(
                "INSERT OR IGNORE INTO warnings(run_id, code, message, created) VALUES (?, ?, ?, ?)",
                (run_id, code, message, time.time()),
            )

    def warnings(self, run_id: int) -> list[tuple[str, str]]:
        """The run's warnings as ``(code, message)`` in the order they were first added."""
        rows = self._read("SELECT code, message FROM warnings WHERE run_id = ? ORDER BY id", (run_id,))
        return [(r[0], r[1]) for r in rows]

    # -- training epochs -------------------------------------------------------------------------------------

    def write_epoch(self, run_id: int, epoch: int, metrics: dict[str, Any], *, seconds: float = 0.0) -> None:
        """Store the metrics of one training epoch (replacing that epoch's row if a resumed run repeats it).

        Args:
            run_id: id of the training run.
            epoch: the epoch number (0-based).
            metrics: JSON-compatible metrics (loss, accuracy, validation robust accuracy, learning rate, ...).
            seconds: wall time of the epoch, added to the run's accumulated seconds.

        Raises:
            StoreError: there is no such run, or a metric is not JSON.
        """
        metrics_json = _dumps(metrics, "metrics")
        seconds = float(seconds)
        if not math.isfinite(seconds) or seconds < 0:
            raise StoreError(f"seconds must be a finite number >= 0, got {seconds}")
        with self._write() as conn:
            now = time.time()
            cursor = conn.execute(
                "UPDATE runs SET seconds = COALESCE(seconds, 0) + ?, updated = ? WHERE id = ?", (seconds, now, run_id)
            )
            if cursor.rowcount == 0:
                raise self._missing(run_id)
            conn.execute(
                "INSERT OR REPLACE INTO training_epochs(run_id, epoch, metrics, seconds, created) "
                "VALUES (?, ?, ?, ?, ?)",
                (run_id, int(epoch), metrics_json, seconds, now),
            )

    def epochs(self, run_id: int) -> list[dict[str, Any]]:
        """The stored per-epoch metrics of a training run, in epoch order, each with its ``epoch`` and ``seconds``."""
        rows = self._read(
            "SELECT epoch, metrics, seconds FROM training_epochs WHERE run_id = ? ORDER BY epoch", (run_id,)
        )
        return [{**json.loads(r[1]), "epoch": int(r[0]), "seconds": float(r[2] or 0.0)} for r in rows]


# -- resumable jobs ----------------------------------------------------------------------------------------------


class _Summarised(Protocol):
    """What :meth:`RunSession.finish` needs of a job's result (EvaluationResult, CertifyResult, ...)."""

    run_id: int | None
    seconds: float

    def to_dict(self) -> dict[str, Any]: ...


_Result = TypeVar("_Result", bound=_Summarised)


class RunSession:
    """One session of a resumable job, as handed out by :func:`resumable_run`.

    With a store, records go to the store batch by batch and are read back from it (so a resumed job sees the
    records of earlier sessions too); without one, they are kept in memory, :meth:`warn` does nothing and
    :meth:`finish` only stamps the result.

    Attributes:
        store: the open store, or ``None``.
        run_id: id of the run in the store, or ``None`` without a store.
        resumed: the run existed before this session.
        done: indices of the samples with a record for every threat of the job (nothing left to do for them).
    """

    def __init__(self, store: Store | None, run: RunInfo | None, threats: Sequence[str], resumed: bool) -> None:
        self.store = store
        self.run_id = run.id if run is not None else None
        self.resumed = resumed
        self.done: set[int] = set() if store is None or run is None else store.done_indices(run.id, threats)
        self._kept: list[SampleRecord] = []
        self._batch_start: float | None = None
        self._bar: Any = None

    def todo(self, positions: int | Iterable[int]) -> list[int]:
        """The positions still to do, in order: ``range(positions)`` for an int, else the positions given."""
        span = range(positions) if isinstance(positions, int) else positions
        return [i for i in span if i not in self.done]

    def batches(
        self, data: Dataset, batch_size: int, *, desc: str, progress: bool = True, leave: bool = True
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """The samples not done yet, in order, as :meth:`Dataset.batches <bastion.data.Dataset.batches>` yields them.

        A tqdm bar (started at the samples done in earlier sessions) advances after each batch; :meth:`write`
        without ``seconds`` counts the time from the moment its batch was handed out.

        Args:
            data: the job's data set.
            batch_size: samples per batch.
            desc: label of the progress bar.
            progress: show the bar.
            leave: keep the bar on screen once finished.
        """
        from tqdm.auto import tqdm  # here, so that reading a store (``bastion runs``, reports) never loads it

        n = len(data)
        todo = self.todo(n)
        with tqdm(total=n, initial=n - len(todo), desc=desc, unit="sample", disable=not progress, leave=leave) as bar:
            self._bar = bar
            try:
                for idx, x, y in data.batches(batch_size, indices=todo):
                    self._batch_start = time.perf_counter()
                    yield idx, x, y
                    bar.update(len(idx))
            finally:
                self._bar = None
        self._batch_start = None

    def show(self, **values: Any) -> None:
        """Show ``values`` (e.g. the running bounds) after the progress bar of :meth:`batches`; nothing outside it.

        Floats are shown with 4 significant digits.
        """
        if self._bar is not None:
            shown = {k: f"{v:.4g}" if isinstance(v, float) else v for k, v in values.items()}
            self._bar.set_postfix(shown, refresh=False)

    def write(self, records: Sequence[SampleRecord], *, seconds: float | None = None) -> None:
        """Store one batch of records and its work time in one transaction (or keep them, without a store).

        Args:
            records: the batch's records.
            seconds: work time of the batch; by default the time since :meth:`batches` handed the batch out.
        """
        if seconds is None:
            if self._batch_start is None:
                raise InputError("RunSession.write needs seconds= outside a RunSession.batches loop")
            seconds = time.perf_counter() - self._batch_start
        if self.store is not None and self.run_id is not None:
            self.store.write_records(self.run_id, records, seconds=seconds)
        else:
            self._kept.extend(records)

    def records(self, threat: str | None = None) -> list[SampleRecord]:
        """All the job's records (of every session with a store), optionally for one threat only."""
        if self.store is not None and self.run_id is not None:
            return self.store.records(self.run_id, threat)
        return [r for r in self._kept if threat is None or r.threat == threat]

    def warn(self, code: str, message: str) -> None:
        """Store a warning with the run (once); nothing without a store."""
        if self.store is not None and self.run_id is not None:
            self.store.add_warning(self.run_id, code, message)

    def finish(self, result: _Result, *, started: float) -> _Result:
        """Complete the job: stamp ``result`` with the run's id and its time, and store its summary.

        Args:
            result: the job's result (``run_id`` and ``seconds`` are set here; ``to_dict()`` is the run's summary).
            started: :func:`time.perf_counter` at the start of the call; ``result.seconds`` is the time since.

        Returns:
            ``result``. The run is marked complete in the store, if there is one.
        """
        result.run_id = self.run_id
        result.seconds = time.perf_counter() - started
        if self.store is not None and self.run_id is not None:
            self.store.finish_run(self.run_id, result.to_dict())
        return result


@contextlib.contextmanager
def resumable_run(
    store: Store | str | os.PathLike[str] | None,
    *,
    kind: str,
    payload: dict[str, Any],
    fingerprints: Callable[[], tuple[str, str]],
    n_samples: int,
    threats: Sequence[str],
    config: dict[str, Any] | None = None,
) -> Iterator[RunSession]:
    """Open (or borrow) a store, find or create the job's run and hand out a :class:`RunSession` for it.

    The run's key is :func:`run_key` of ``{"kind": kind, "model": model_fp, "data": data_fp, **payload}``, so
    the same job (same model, data and defining payload) finds its run again in any session and resumes it. The
    stored configuration is that key payload followed by ``config``, with values JSON cannot hold written as
    their ``str()``. A store given as a path is opened here and closed on leaving the block; a :class:`Store`
    object is borrowed and left open.

    Args:
        store: a :class:`Store`, a path to one, or ``None`` (records are then kept in memory only).
        kind: what produces the run (``"evaluate"``, ``"certify"``, ...).
        payload: what defines the job besides the kind, model and data (threats, method, seed, ...); JSON values.
        fingerprints: returns ``(model_fp, data_fp)``; called only with a store, as fingerprints cost a pass
            over the model's weights and the data.
        n_samples: number of samples the job covers.
        threats: threat keys each sample gets a record for (a sample is done when it has all of them).
        config: extra information stored with the run, not part of its key (batch size, CLI specs, ...).

    Yields:
        The session: ``done``, ``todo(...)``, ``batches(...)``, ``show(...)``, ``write(...)``, ``records(...)``,
        ``warn(...)``, ``finish(...)``.

    Raises:
        InputError: ``store`` is neither a Store, a path nor ``None``.
        StoreError: the store cannot be opened, or its run with this key belongs to another job.

    Example::

        started = time.perf_counter()
        with resumable_run(path, kind="certify", payload={"threat": key}, fingerprints=fps, n_samples=n,
                           threats=[key]) as run:
            for idx, x, y in run.batches(data, 64, desc="certify"):
                run.write(certify_batch(x, y, idx))  # one transaction; seconds counted from the batch's start
            return run.finish(summarize(run.records(key)), started=started)
    """
    if store is None:
        yield RunSession(None, None, threats, False)
        return
    if not isinstance(store, (Store, str, os.PathLike)):
        raise InputError(f"store must be a Store, a path or None, got {type(store).__name__}")
    db = store if isinstance(store, Store) else Store(store)
    try:
        model_fp, data_fp = fingerprints()
        key_payload = {"kind": kind, "model": model_fp, "data": data_fp, **payload}
        # str() for what JSON cannot hold: the config is for reading, not for the key, so it must never fail a job
        run_config = json.loads(json.dumps({**key_payload, **(config or {})}, default=str))
        run, resumed = db.open_run(
            kind=kind, key=run_key(key_payload), config=run_config, model_fp=model_fp, data_fp=data_fp,
            n_samples=n_samples,
        )  # fmt: skip
        yield RunSession(db, run, threats, resumed)
    finally:
        if db is not store:
            db.close()
