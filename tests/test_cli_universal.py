"""Tests of ``bastion universal`` and ``bastion patch``, in-process on the bundled digits and the session's MLP."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from bastion.cli import main
from bastion.store import Store


def run_cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    capsys.readouterr()
    try:
        rc = main(list(argv))
    except SystemExit as exc:  # argparse usage errors
        rc = exc.code if isinstance(exc.code, int) else 1
    out, err = capsys.readouterr()
    return rc, out, err


def test_universal_writes_a_perturbation_inside_its_budget_that_fools_held_out_points(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, digits_mlp_path: Path
) -> None:
    out, db = tmp_path / "uap.npz", tmp_path / "runs.db"
    argv = [
        "universal", "--model", f"zoo:mlp@{digits_mlp_path}", "--data", "digits", "--limit", "400", "--xi", "0.3",
        "--opt", "max_passes=2", "--out", str(out), "--store", str(db), "--json",
    ]  # fmt: skip
    rc, stdout, err = run_cli(capsys, *argv)
    assert rc == 0, err
    summary = json.loads(stdout)
    v = np.load(out)["perturbation"]
    assert v.shape == (1, 8, 8) and np.abs(v).max() <= 0.3 + 1e-6
    assert summary["n_train"] + summary["n_test"] == 400
    assert summary["test_fooling_rate"] > 0.1  # a 0.3 l-inf universal perturbation moves many digits
    with Store(db) as store:
        (run,) = store.runs()
        assert run.kind == "universal" and run.summary["test_fooling_rate"] == summary["test_fooling_rate"]


def test_patch_reports_its_held_out_success(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, digits_mlp_path: Path
) -> None:
    out = tmp_path / "patch.npz"
    argv = [
        "patch", "--model", f"zoo:mlp@{digits_mlp_path}", "--data", "digits", "--limit", "400", "--target", "3",
        "--opt", "size=4", "--opt", "epochs=3", "--out", str(out), "--json",
    ]  # fmt: skip
    rc, stdout, err = run_cli(capsys, *argv)
    assert rc == 0, err
    summary = json.loads(stdout)
    patch = np.load(out)["patch"]
    assert patch.shape == (1, 4, 4) and patch.min() >= 0 and patch.max() <= 1
    assert 0 <= summary["test_success"] <= 1 and summary["config"]["target"] == 3


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["universal", "--xi", "0.1", "--opt", "bogus=1"], "has no option 'bogus'"),
        (["universal"], "--xi is required"),
        (["universal", "--xi", "0.1", "--test-fraction", "1.5"], "--test-fraction must be in (0, 1)"),
        (["patch", "--target", "12"], "--target must be a class in [0, 10)"),
        (["patch", "--target", "1", "--out", "/no/such/dir/p.npz"], "does not exist"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(
    capsys: pytest.CaptureFixture[str], digits_mlp_path: Path, argv: list[str], message: str
) -> None:
    rc, _, err = run_cli(capsys, *argv, "--model", f"zoo:mlp@{digits_mlp_path}", "--data", "digits")
    assert rc == 2 and message in err and len(err.strip().splitlines()) == 1
