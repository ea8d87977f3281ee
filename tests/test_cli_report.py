"""``bastion report``: the HTML report from the command line (paths, run selection, errors)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from tests.test_cli import assert_one_line_error

from bastion.cli import main
from bastion.results import SampleRecord
from bastion.store import Store


def _run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    capsys.readouterr()
    try:
        rc = main(list(argv))
    except SystemExit as exc:  # argparse usage errors
        rc = exc.code if isinstance(exc.code, int) else 1
    out, err = capsys.readouterr()
    return rc, out, err


@pytest.fixture
def store(digits_mlp_path: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> Path:
    """A real evaluate run on 8 digits, and a hand-written certify run."""
    db = tmp_path / "runs.db"
    rc, _, err = _run(capsys, "evaluate", "--model", str(digits_mlp_path), "--data", "digits", "--limit", "8",
                      "--eps", "0.1", "--attack", "fgsm", "--store", str(db), "--json")  # fmt: skip
    assert rc == 0, err
    with Store(db) as s:
        run, _ = s.open_run(kind="certify", key="hand", config={}, model_fp="m", data_fp="d", n_samples=1)
        s.write_records(run.id, [SampleRecord(0, "linf:0.1", 3, 3, "robust", certified=0.2, attack="crown")])
        s.finish_run(run.id, {"certified_accuracy": 1.0, "threat": "linf:0.1"})
    return db


def _sections(page: Path) -> list[int]:
    return [int(m) for m in re.findall(r'<section class="run" id="run-(\d+)"', page.read_text())]


def test_report_writes_one_page_and_prints_its_path(store: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "report"
    rc, stdout, err = _run(capsys, "report", "--store", str(store), "--out", str(out), "--json")
    assert rc == 0, err
    got = json.loads(stdout)
    assert got["paths"] == [str(out / "index.html")] == [got["index"]]
    assert sorted(p.name for p in out.iterdir()) == ["index.html"]  # self-contained: nothing else written
    assert got["runs"] == [2, 1] and _sections(out / "index.html") == [2, 1]
    assert got["figures"] >= 2
    rc, stdout, err = _run(capsys, "report", "--store", str(store), "--out", str(out))
    assert rc == 0 and stdout.startswith(f"wrote {out / 'index.html'} (2 run(s)")


def test_report_run_selection_by_id_and_key(store: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "r"
    rc, stdout, err = _run(capsys, "report", "--store", str(store), "--out", str(out), "--run", "1", "--run",
                           "hand", "--gallery", "0", "--json")  # fmt: skip
    assert rc == 0, err
    assert json.loads(stdout)["runs"] == [1, 2] and _sections(out / "index.html") == [1, 2]
    rc, stdout, err = _run(capsys, "report", "--store", str(store), "--out", str(out), "--run", "hand", "--json")
    assert json.loads(stdout)["runs"] == [2] and _sections(out / "index.html") == [2]


def test_report_bad_input_is_one_line_with_status_2(store: Path, tmp_path: Path, capsys) -> None:
    missing = tmp_path / "missing.db"
    rc, _, err = _run(capsys, "report", "--store", str(missing), "--out", str(tmp_path / "o"))
    assert_one_line_error(rc, err, "report", "no result store", "missing.db")
    assert not missing.exists()
    empty = tmp_path / "empty.db"
    Store(empty).close()
    rc, _, err = _run(capsys, "report", "--store", str(empty), "--out", str(tmp_path / "o"))
    assert_one_line_error(rc, err, "report", "holds no runs")
    rc, _, err = _run(capsys, "report", "--store", str(store), "--out", str(tmp_path / "o"), "--run", "nope")
    assert_one_line_error(rc, err, "report", "no run 'nope'", "its runs are 2, 1")
    (tmp_path / "not-a-store.db").write_text("hello")
    rc, _, err = _run(capsys, "report", "--store", str(tmp_path / "not-a-store.db"), "--out", str(tmp_path / "o"))
    assert_one_line_error(rc, err, "report", "not a bastion result store")
    rc, _, err = _run(capsys, "report", "--store", str(store), "--out", str(tmp_path / "o"), "--gallery", "-2")
    assert rc == 2 and "--gallery" in err and "Traceback" not in err
    rc, _, err = _run(capsys, "report", "--store", str(store))
    assert rc == 2 and "--out" in err
