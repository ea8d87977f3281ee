"""``bastion estimate clever|splitting``: the commands run the API, store and resume; bad input is one line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from tests.test_cli import assert_one_line_error

from bastion.cli import main
from bastion.store import Store


def _run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    capsys.readouterr()
    rc = main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


def test_clever_scores_go_to_the_store_and_the_json(
    capsys: pytest.CaptureFixture[str], digits_mlp_path: Path, tmp_path: Path
) -> None:
    store = tmp_path / "runs.db"
    argv = ["estimate", "clever", "--model", str(digits_mlp_path), "--data", "digits", "--limit", "3", "--norm", "l2",
            "--n-batches", "8", "--batch-size", "64", "--store", str(store), "--json"]  # fmt: skip
    rc, out, _ = _run(capsys, *argv)
    assert rc == 0
    summary = json.loads(out)
    assert summary["estimate"] is True and summary["certified"] is False and summary["n"] == 3
    assert all(row["score"] >= 0 for row in summary["per_sample"])
    with Store(store) as s:
        (run,) = s.runs()
        assert len(s.records(run.id)) == 3
        assert all(r.certified is None for r in s.records(run.id))
    rc, out2, _ = _run(capsys, *argv)  # a re-run finds the finished run
    assert rc == 0 and json.loads(out2)["per_sample"] == summary["per_sample"]


def test_splitting_estimates_a_log_probability(capsys: pytest.CaptureFixture[str], digits_mlp_path: Path) -> None:
    argv = ["estimate", "splitting", "--model", str(digits_mlp_path), "--data", "digits", "--limit", "2",
            "--norm", "linf", "--eps", "0.3", "--particles", "50", "--mh-steps", "5", "--json"]  # fmt: skip
    rc, out, _ = _run(capsys, *argv)
    assert rc == 0
    summary = json.loads(out)
    assert summary["n"] == 2 and set(summary["log_p"]) == {"0", "1"}
    assert all(v <= 0 for v in summary["log_p"].values())


@pytest.mark.parametrize(
    "extra, needle",
    [
        (["clever", "--norm", "l7"], "l7"),
        (["clever", "--radius", "-1"], "radius"),
        (["clever", "--target", "nonsense"], "nonsense"),
        (["splitting", "--norm", "linf"], "--eps"),
        (["splitting", "--eps", "0.1", "--rho", "1.5"], "rho"),
    ],
)
def test_bad_input_is_one_line(
    capsys: pytest.CaptureFixture[str], digits_mlp_path: Path, extra: list[str], needle: str
) -> None:
    method, *rest = extra
    rc, _, err = _run(capsys, "estimate", method, "--model", str(digits_mlp_path), "--data", "digits", "--limit",
                      "2", "--n-batches", "2", "--batch-size", "8", *rest)  # fmt: skip
    assert_one_line_error(rc, err, "estimate", needle)
