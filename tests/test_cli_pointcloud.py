"""Tests of ``bastion pointcloud attack``, in-process, on a tiny built-in model (so that they run in seconds)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bastion.cli import main
from bastion.store import Store

SMALL = ["--points", "64", "--n", "12", "--train-n", "240", "--epochs", "8", "--steps", "30", "--binary-steps", "2"]


def run_cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    capsys.readouterr()
    try:
        rc = main(list(argv))
    except SystemExit as exc:
        rc = exc.code if isinstance(exc.code, int) else 1
    out, err = capsys.readouterr()
    return rc, out, err


def test_cw_json_store_and_resume(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    db, saved = tmp_path / "runs.db", tmp_path / "pointnet.pt"
    argv = ["pointcloud", "attack", "--attack", "cw", "--metric", "l2", *SMALL, "--json", "--store", str(db)]
    rc, out, err = run_cli(capsys, *argv, "--save-model", str(saved))
    assert rc == 0, err
    s = json.loads(out)
    assert s["threat"] == "points-l2:inf" and s["attack"].startswith("PointCW(steps=30, binary_steps=2")
    assert s["clean_accuracy"] >= 0.5 and s["success_rate"] >= 0.8 and s["median_distance"] > 0
    with Store(db) as store:
        (run,) = store.runs()
        assert run.status == "complete" and len(store.records(run.id)) == 12
    # the same job with the saved model (same weights, same clouds) finds its run: nothing left to do
    rc, out2, err = run_cli(capsys, *argv, "--model", str(saved))
    assert rc == 0, err
    assert json.loads(out2)["run_id"] == s["run_id"]
    with Store(db) as store:
        assert len(store.runs()) == 1


def test_add_and_drop_with_sor_table(capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, err = run_cli(capsys, "pointcloud", "attack", "--attack", "add", "--k", "4", "--defense", "sor",
                           "--sor-attack", "transfer", *SMALL)  # fmt: skip
    assert rc == 0, err
    assert "add4-chamfer:inf" in out and "sor, transfer" in out and "attack success" in out
    rc, out, err = run_cli(capsys, "pointcloud", "attack", "--attack", "drop", "--k", "10", *SMALL[:8], "--json")
    assert rc == 0, err
    s = json.loads(out)
    assert s["threat"] == "drop:10" and (s["median_distance"] is None or s["median_distance"] <= 10)


def test_bad_options_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    rc, _, err = run_cli(capsys, "pointcloud", "attack", "--attack", "drop", "--metric", "l2", *SMALL)
    assert rc == 2 and "--attack drop takes --k" in err
    rc, _, err = run_cli(capsys, "pointcloud", "attack", "--sor-attack", "adaptive", *SMALL)
    assert rc == 2 and "--defense sor" in err
    rc, _, err = run_cli(capsys, "pointcloud", "attack", "--attack-opt", "nonsense=1", *SMALL)
    assert rc == 2 and "no option 'nonsense'" in err
    rc, _, err = run_cli(capsys, "pointcloud", "attack", "--eps", "-1")
    assert rc == 2 and "eps must be >= 0" in err
