"""Tests of ``bastion measure``, run in-process.

The trained model is the session's digits MLP (``digits_mlp_path`` in conftest.py); its "initial" weights are a
freshly built MLP of the same architecture saved here.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from bastion.cli import main
from bastion.data import load_digits
from bastion.models import build_model, load_model, save_model
from bastion.reliability.generalisation import generalisation_gap, measure

LIMIT = 300


def run_cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    """``bastion ARGV`` in-process: (exit status, stdout, stderr)."""
    capsys.readouterr()
    try:
        rc = main(list(argv))
    except SystemExit as exc:  # --help and argparse usage errors
        rc = exc.code if isinstance(exc.code, int) else 1
    out, err = capsys.readouterr()
    return rc, out, err


def save_mlp(path: Path, hidden: tuple[int, ...], seed: int) -> Path:
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = build_model("mlp", (1, 8, 8), 10, hidden=hidden)
    save_model(model, path)
    return path


@pytest.fixture(scope="module")
def init_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_mlp(tmp_path_factory.mktemp("init") / "init.pt", (32,), seed=1)


def test_json_output_is_the_api_result(
    capsys: pytest.CaptureFixture[str], digits_mlp_path: Path, init_path: Path
) -> None:
    rc, out, err = run_cli(
        capsys, "measure", "--model", os.fspath(digits_mlp_path), "--init", os.fspath(init_path), "--data",
        "digits", "--limit", str(LIMIT), "--mc-samples", "4", "--json",
    )  # fmt: skip
    assert rc == 0, err
    got = json.loads(out)
    assert got["model_spec"] == os.fspath(digits_mlp_path) and got["init_spec"] == os.fspath(init_path)
    data = load_digits().subset(slice(0, LIMIT))
    api = measure(load_model(digits_mlp_path), init=load_model(init_path), data=data, mc_samples=4, progress=False)
    expected = api.to_dict()
    assert got["measures"].pop("layer_correlations") == pytest.approx(expected.pop("layer_correlations"))
    assert got["measures"] == pytest.approx(expected)
    assert got["measures"]["pac_bayes"] > 0 and got["measures"]["pbc"] > got["measures"]["pac_bayes"]
    assert "gap" not in got


def test_table_output_lists_every_measure_and_the_gap(
    capsys: pytest.CaptureFixture[str], digits_mlp_path: Path, init_path: Path, tmp_path: Path
) -> None:
    digits = load_digits()
    test_file = tmp_path / "test.npz"
    import numpy as np

    np.savez(test_file, x=digits.x[1500:].numpy(), y=digits.y[1500:].numpy())
    rc, out, err = run_cli(
        capsys, "measure", "--model", os.fspath(digits_mlp_path), "--init", os.fspath(init_path), "--data",
        "digits", "--limit", str(LIMIT), "--mc-samples", "2", "--test", os.fspath(test_file),
    )  # fmt: skip
    assert rc == 0, err
    for name in ("prod_frobenius", "prod_spectral", "num_params", "sum_spectral_distance", "weight_correlation",
                 "sigma", "pac_bayes", "pbc", "accuracy_gap", "loss_gap"):  # fmt: skip
        assert name in out, name
    model = load_model(digits_mlp_path)
    gap = generalisation_gap(model, digits.subset(slice(0, LIMIT)), digits.subset(slice(1500, len(digits))))
    line = next(ln for ln in out.splitlines() if ln.startswith("accuracy_gap"))
    assert float(line.split()[1]) == pytest.approx(gap.accuracy_gap, abs=1e-5)


def test_without_init_the_distance_measures_are_not_available(
    capsys: pytest.CaptureFixture[str], digits_mlp_path: Path
) -> None:
    rc, out, err = run_cli(
        capsys, "measure", "--model", os.fspath(digits_mlp_path), "--data", "digits", "--limit", "100",
        "--mc-samples", "2", "--json",
    )  # fmt: skip
    assert rc == 0, err
    m = json.loads(out)["measures"]
    assert m["pac_bayes"] is None and m["pbc"] is None and m["sum_spectral_distance"] is None
    assert m["sigma"] > 0 and 0 <= m["weight_correlation"] <= 1


def test_an_init_of_another_architecture_is_one_line_error(
    capsys: pytest.CaptureFixture[str], digits_mlp_path: Path, tmp_path: Path
) -> None:
    other = save_mlp(tmp_path / "other.pt", (16,), seed=0)
    rc, out, err = run_cli(
        capsys, "measure", "--model", os.fspath(digits_mlp_path), "--init", os.fspath(other), "--data", "digits",
        "--limit", "50",
    )  # fmt: skip
    assert rc == 2 and out == ""
    assert "same architecture" in err and len(err.strip().splitlines()) == 1


def test_usage_errors(capsys: pytest.CaptureFixture[str], digits_mlp_path: Path) -> None:
    rc, _, err = run_cli(capsys, "measure", "--model", os.fspath(digits_mlp_path))
    assert rc == 2 and "--data" in err
    rc, _, err = run_cli(
        capsys, "measure", "--model", os.fspath(digits_mlp_path), "--data", "digits", "--sigma-threshold", "2"
    )
    assert rc == 2 and "sigma_threshold" in err


def test_help_names_the_papers(capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, _ = run_cli(capsys, "measure", "--help")
    assert rc == 0 and "NeurIPS 2020" in out and "--init" in out
