"""Sharding over a local Ray instance with 2 workers: same records as one process, killed workers, resumed runs."""

from __future__ import annotations

import csv
import json
import logging
import os
import sqlite3
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

ray = pytest.importorskip("ray")

from bastion.attacks import FGSM, PGD  # noqa: E402
from bastion.cli import main  # noqa: E402
from bastion.data import load_digits  # noqa: E402
from bastion.errors import BastionError  # noqa: E402
from bastion.evaluate import evaluate  # noqa: E402
from bastion.models import load_model  # noqa: E402
from bastion.results import SampleRecord  # noqa: E402
from bastion.scale import ray_assess, ray_certify, ray_evaluate, ray_vnncomp  # noqa: E402
from bastion.store import Store  # noqa: E402
from bastion.threat import LpBall  # noqa: E402
from bastion.verify.assess import assess  # noqa: E402
from bastion.verify.certify import certify  # noqa: E402

N, BATCH = 80, 16  # 5 batches
THREATS = [LpBall("linf", 0.1), LpBall("l2", 1.0)]


@pytest.fixture(scope="module")
def local_ray() -> Any:
    """A Ray instance of 2 CPUs (2 workers), small object store, no dashboard; shut down after the module."""
    if ray.is_initialized():  # pragma: no cover - a session left by someone else
        ray.shutdown()
    ray.init(
        num_cpus=2, include_dashboard=False, object_store_memory=100 * 2**20, logging_level=logging.WARNING,
        log_to_driver=False,
    )  # fmt: skip
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def data() -> Any:
    return load_digits().subset(slice(0, N))


def _key(records: list[SampleRecord]) -> list[tuple[Any, ...]]:
    """Everything of the records but the time they took, sorted by (threat, index)."""
    return sorted(
        (r.threat, r.index, r.label, r.clean_pred, r.status, r.adv_distance, r.certified, r.attack, r.queries)
        for r in records
    )


def _attacks() -> list[Any]:
    return [FGSM(), PGD(steps=5)]


def test_evaluate_equals_single_process_and_shares_its_run(
    local_ray: Any, data: Any, digits_mlp_path: Path, tmp_path: Path
) -> None:
    spec = str(digits_mlp_path)
    db = tmp_path / "runs.db"
    sharded = ray_evaluate(spec, data, THREATS, _attacks(), batch_size=BATCH, shards=3, seed=1, store=db,
                           progress=False)  # fmt: skip
    model = load_model(spec)
    single = evaluate(model, data, THREATS, _attacks(), batch_size=BATCH, seed=1, progress=False)
    assert _key(sharded.records) == _key(single.records)
    assert len(sharded.records) == N * len(THREATS)
    assert sharded.robust_accuracy == single.robust_accuracy and sharded.worst_case == single.worst_case
    assert sharded.clean_accuracy == single.clean_accuracy and sharded.warnings == single.warnings
    # the same job in one process finds the sharded run complete (same key): nothing is recomputed
    again = evaluate(model, data, THREATS, _attacks(), batch_size=BATCH, seed=1, store=db, progress=False)
    assert again.run_id == sharded.run_id
    with Store(db) as store:
        (run,) = store.runs()
        assert run.status == "complete" and run.n_records == N * len(THREATS)
        assert run.summary is not None and run.summary["robust_accuracy"] == single.robust_accuracy
        assert run.config["ray"]["shards"] == 3


def test_resume_keeps_finished_shards_and_recomputes_whole_batches(
    local_ray: Any, data: Any, digits_mlp_path: Path, tmp_path: Path
) -> None:
    spec = str(digits_mlp_path)
    db = tmp_path / "runs.db"
    first = ray_evaluate(spec, data, THREATS, _attacks(), batch_size=BATCH, store=db, progress=False)
    # a driver killed mid-run: samples 24..47 lost (batch 16..31 half done, batch 32..47 not at all)
    with sqlite3.connect(db) as conn:
        conn.execute("DELETE FROM samples WHERE idx >= 24 AND idx < 48")
        kept = conn.execute("SELECT threat, idx, seconds FROM samples ORDER BY threat, idx").fetchall()
        conn.execute("UPDATE runs SET status = 'running'")
    resumed = ray_evaluate(spec, data, THREATS, _attacks(), batch_size=BATCH, store=db, progress=False)
    assert resumed.run_id == first.run_id
    assert _key(resumed.records) == _key(first.records)  # the half-done batch was recomputed whole
    with sqlite3.connect(db) as conn:
        now = conn.execute("SELECT threat, idx, seconds FROM samples ORDER BY threat, idx").fetchall()
    assert len(now) == N * len(THREATS)
    assert [r for r in now if not 24 <= r[1] < 48] == kept  # finished records untouched (same seconds)


def test_failed_shard_keeps_the_others_and_the_run_resumes(
    local_ray: Any, data: Any, digits_mlp_path: Path, tmp_path: Path
) -> None:
    spec = str(digits_mlp_path)
    broken = tmp_path / "broken"
    broken.touch()
    driver = os.getpid()
    first_of_batch_2 = data.x[32].clone()

    class FailsOnBatch2(nn.Module):
        """The model; on a worker it raises on the batch of samples 32..47 while the file ``broken`` exists."""

        def __init__(self) -> None:
            super().__init__()
            self.net = load_model(spec)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if os.getpid() != driver and broken.exists() and torch.equal(x[0], first_of_batch_2):
                raise RuntimeError("a broken node")
            return self.net(x)

    db = tmp_path / "runs.db"
    args = (FailsOnBatch2, data, THREATS, _attacks())
    with pytest.raises(BastionError, match=r"shard 2 \(samples 32-47\) failed on a Ray worker: .*a broken node"):
        ray_evaluate(*args, batch_size=BATCH, store=db, progress=False, workers=1, checks=False)
    with Store(db) as store:
        (run,) = store.runs()
        assert store.done_indices(run.id, [t.key for t in THREATS]) == set(range(32))  # shards 0 and 1 kept
    broken.unlink()
    resumed = ray_evaluate(*args, batch_size=BATCH, store=db, progress=False, checks=False)
    single = evaluate(FailsOnBatch2(), data, THREATS, _attacks(), batch_size=BATCH, progress=False, checks=False)
    assert resumed.run_id == run.id and _key(resumed.records) == _key(single.records)


def test_certify_and_assess_equal_single_process(local_ray: Any, data: Any, digits_mlp_path: Path) -> None:
    spec = str(digits_mlp_path)
    model = load_model(spec)
    small = data.subset(slice(0, 40))
    threat = LpBall("linf", 0.05)
    sharded = ray_certify(spec, small, threat, method="crown", batch_size=BATCH, progress=False)
    single = certify(model, small, threat, method="crown", batch_size=BATCH, progress=False)
    assert _key(sharded.records) == _key(single.records)
    assert sharded.to_dict() | {"seconds": 0} == single.to_dict() | {"seconds": 0}
    opts: dict[str, Any] = dict(budget=0.0, attack=[PGD(steps=5)], minimal_attack=None, methods=["ibp", "crown"],
                                radius=False, batch_size=BATCH, seed=2, progress=False)  # fmt: skip
    sharded_a = ray_assess(spec, small, threat, shards=2, **opts)
    single_a = assess(model, small, threat, **opts)
    assert _key(sharded_a.records) == _key(single_a.records)
    assert sharded_a.fractions == single_a.fractions and sharded_a.notes == single_a.notes
    assert set(sharded_a.counterexamples) == set(single_a.counterexamples)


def test_cli_certify_with_ray(local_ray: Any, digits_mlp_path: Path, capsys: pytest.CaptureFixture) -> None:
    base = ["certify", "--model", str(digits_mlp_path), "--data", "digits", "--eps", "0.05", "--method", "ibp",
            "--limit", "40", "--batch-size", "16", "--no-radius", "--json"]  # fmt: skip
    assert main([*base, "--ray", "auto", "--shards", "2"]) == 0
    sharded = json.loads(capsys.readouterr().out)
    assert main(base) == 0
    single = json.loads(capsys.readouterr().out)
    strip = lambda rs: [{k: v for k, v in r.items() if k != "seconds"} for r in rs]  # noqa: E731
    assert strip(sharded["records"]) == strip(single["records"])
    assert sharded["certified_accuracy"] == single["certified_accuracy"]
    assert main(["certify", "--model", str(digits_mlp_path), "--data", "digits", "--eps", "0.05", "--shards", "2"]) == 2
    assert "--shards needs --ray" in capsys.readouterr().err


def test_vnncomp_benchmark_with_ray(local_ray: Any, tmp_path: Path) -> None:
    pytest.importorskip("onnxruntime")
    from test_cli_vnncomp import _properties, _write_net

    (tmp_path / "onnx").mkdir()
    net = _write_net(tmp_path / "onnx" / "net.onnx")
    sat, unsat, _ = _properties(net)
    (tmp_path / "sat.vnnlib").write_text(sat)
    (tmp_path / "unsat.vnnlib").write_text(unsat)
    inst = tmp_path / "instances.csv"
    inst.write_text("onnx/net.onnx,sat.vnnlib,30\nonnx/net.onnx,unsat.vnnlib,30\n")
    out = tmp_path / "results.csv"
    assert ray_vnncomp(inst, out=out, log=None) == {"sat": 1, "unsat": 1, "already done": 0}
    rows = list(csv.reader(out.open()))
    assert rows[0] == ["onnx", "vnnlib", "result", "seconds"]
    assert sorted(r[:3] for r in rows[1:]) == [["onnx/net.onnx", "sat.vnnlib", "sat"],
                                               ["onnx/net.onnx", "unsat.vnnlib", "unsat"]]  # fmt: skip
    # a killed run left only the first instance done: only the other one runs again
    out.write_text("onnx,vnnlib,result,seconds\nonnx/net.onnx,sat.vnnlib,sat,0.5\n")
    assert main(["vnncomp", "--instances", str(inst), "--out", str(out), "--ray", "auto", "--shards", "1"]) == 0
    rows = list(csv.reader(out.open()))
    assert [r[:3] for r in rows[1:]] == [["onnx/net.onnx", "sat.vnnlib", "sat"],
                                         ["onnx/net.onnx", "unsat.vnnlib", "unsat"]]  # fmt: skip


def test_killed_worker_is_retried_and_nothing_is_lost(
    local_ray: Any, data: Any, digits_mlp_path: Path, tmp_path: Path
) -> None:
    # last in the module: the worker Ray starts in place of the killed one is not waited for by other tests
    marker = tmp_path / "killed"
    driver = os.getpid()
    spec = str(digits_mlp_path)

    class DiesOnce(nn.Module):
        """The model; its worker process exits hard at the 3rd forward pass, the first time only."""

        def __init__(self) -> None:
            super().__init__()
            self.net = load_model(spec)
            self.calls = 0

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            self.calls += 1
            if os.getpid() != driver and self.calls == 3 and not marker.exists():
                marker.touch()
                os._exit(1)  # like kill -9: no exception, no cleanup
            return self.net(x)

    db = tmp_path / "runs.db"
    sharded = ray_evaluate(DiesOnce, data, THREATS, _attacks(), batch_size=BATCH, store=db, progress=False,
                           max_retries=2)  # fmt: skip
    assert marker.exists(), "no worker was killed"
    single = evaluate(DiesOnce(), data, THREATS, _attacks(), batch_size=BATCH, progress=False)
    assert _key(sharded.records) == _key(single.records)
    with sqlite3.connect(db) as conn:
        rows = conn.execute("SELECT threat, idx, COUNT(*) FROM samples GROUP BY threat, idx").fetchall()
    assert sorted((t, i) for t, i, _ in rows) == sorted((t.key, i) for t in THREATS for i in range(N))
    assert all(c == 1 for _, _, c in rows)
