"""Tests of ``bastion audio attack``, in-process, on a tiny built-in model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bastion.cli import main
from bastion.store import Store

SMALL = ["--n", "12", "--seconds", "0.25", "--train-n", "200", "--epochs", "6"]


def run_cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    capsys.readouterr()
    try:
        rc = main(list(argv))
    except SystemExit as exc:
        rc = exc.code if isinstance(exc.code, int) else 1
    out, err = capsys.readouterr()
    return rc, out, err


def test_pgd_json_and_store(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    db = tmp_path / "runs.db"
    rc, out, err = run_cli(capsys, "audio", "attack", "--db", "-20", "--steps", "20", *SMALL, "--json",
                           "--store", str(db))  # fmt: skip
    assert rc == 0, err
    s = json.loads(out)
    assert s["threat"] == "db:-20.0" and s["distance_unit"] == "dB" and s["db_budget"] == -20.0
    assert s["success_rate"] > 0 and s["median_distance"] <= -20.0 + 1e-3
    with Store(db) as store:
        (run,) = store.runs()
        assert run.status == "complete" and len(store.records(run.id)) == 12


def test_cw_table(capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, err = run_cli(capsys, "audio", "attack", "--attack", "cw", "--db", "-20", "--steps", "30",
                           "--attack-opt", "lr=0.002", *SMALL)  # fmt: skip
    assert rc == 0, err
    assert "AudioCW(steps=30, lr=0.002" in out and "db:-20.0" in out and "dB" in out


def test_bad_options_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    rc, _, err = run_cli(capsys, "audio", "attack", "--db", "loud")
    assert rc == 2 and "decibels" in err
    rc, _, err = run_cli(capsys, "audio", "attack", "--attack-opt", "tau_decay=1.5", *SMALL)
    assert rc == 2 and "tau_decay" in err
