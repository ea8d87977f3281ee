"""``bastion test coverage`` and ``bastion test generate`` run in-process on the session's digits MLP."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from bastion.cli import main
from bastion.data import load_digits
from bastion.models import load_model
from bastion.testing import coverage


def _run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    capsys.readouterr()
    try:
        rc = main(list(argv))
    except SystemExit as exc:
        rc = exc.code if isinstance(exc.code, int) else 1
    out, err = capsys.readouterr()
    return rc, out, err


def test_coverage_json_matches_the_api(capsys: pytest.CaptureFixture[str], digits_mlp_path: Path) -> None:
    rc, out, err = _run(capsys, "test", "coverage", "--model", os.fspath(digits_mlp_path), "--data", "digits",
                        "--limit", "50", "--metric", "nc", "--param", "threshold=0.5", "--json")  # fmt: skip
    assert rc == 0, err
    got = json.loads(out)["nc"]
    data = load_digits().subset(slice(0, 50))
    model = load_model(os.fspath(digits_mlp_path), input_shape=data.feature_shape, num_classes=10)
    api = coverage(model, data, "nc", threshold=0.5, progress=False)
    assert (got["covered"], got["total"], got["inputs"]) == (api.covered, api.total, 50)
    rc, out, _ = _run(capsys, "test", "coverage", "--model", os.fspath(digits_mlp_path), "--data", "digits",
                      "--limit", "50")  # fmt: skip
    assert rc == 0 and out.startswith("nc ")


@pytest.mark.parametrize(
    ("extra", "needle"),
    [
        (["--metric", "nx"], "unknown metric(s) nx"),
        (["--param", "k=3"], "takes 'k'"),
        (["--layers", "conv9"], "unknown layer name(s) 'conv9'"),
        (["--param", "nc.convention=minmax"], "convention"),
    ],
)
def test_coverage_bad_input_is_one_line(
    capsys: pytest.CaptureFixture[str], digits_mlp_path: Path, extra: list[str], needle: str
) -> None:
    rc, _, err = _run(capsys, "test", "coverage", "--model", os.fspath(digits_mlp_path), "--data", "digits",
                      "--limit", "8", *extra)  # fmt: skip
    lines = [line for line in err.splitlines() if line.strip()]
    assert rc == 2 and len(lines) == 1 and needle in lines[0] and "Traceback" not in err, err


def test_generate_writes_tests_store_plot_and_resumes(
    capsys: pytest.CaptureFixture[str], digits_mlp_path: Path, tmp_path: Path
) -> None:
    import numpy as np

    from bastion.store import Store

    out, db, png = tmp_path / "tests.npz", tmp_path / "runs.db", tmp_path / "cov.png"
    argv = ["test", "generate", "--model", os.fspath(digits_mlp_path), "--data", "digits", "--limit", "20",
            "--method", "fuzz", "--criterion", "kmnc", "--param", "k=10", "--profile", "digits", "--eps", "0.2",
            "--budget", "4", "--out", os.fspath(out), "--store", os.fspath(db), "--plot", os.fspath(png),
            "--json"]  # fmt: skip
    rc, text, err = _run(capsys, *argv)
    assert rc == 0, err
    got = json.loads(text)
    assert got["iterations"] == 4 and got["coverage"] > got["seed_coverage"] and png.stat().st_size > 0
    arrays = np.load(out)
    assert (
        arrays["x"].shape[0] == got["tests"]
        and np.abs(arrays["x"] - load_digits().x[:20].numpy()[arrays["origin"]]).max() <= 0.2 + 1e-6
    )
    with Store(db) as store:
        (run,) = store.runs()
        assert len(store.records(run.id)) == got["tests"]
    # the same command again: the checkpoint says the budget is spent, nothing new is generated
    rc, again, _ = _run(capsys, *argv)
    assert rc == 0 and json.loads(again)["tests"] == got["tests"] and json.loads(again)["run_id"] == got["run_id"]
    bad = [a if a != "fuzz" else "magic" for a in argv]
    rc, _, err = _run(capsys, *bad)
    assert rc == 2 and "unknown test generation method 'magic'" in err and "Traceback" not in err
