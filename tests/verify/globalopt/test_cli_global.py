"""``bastion verify-global``: each method runs through the CLI, stores its records; bad input is one line."""

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


@pytest.mark.parametrize(
    "method, extra",
    [
        ("deepgo", ["--eps", "0.05", "--features", "27,36"]),
        ("l0", ["--max-subset", "1", "--eps", "1"]),
        ("deepgame", ["--norm", "l2", "--time-limit", "1"]),
    ],
)
def test_each_method_writes_one_record_per_sample(
    capsys: pytest.CaptureFixture[str], digits_mlp_path: Path, tmp_path: Path, method: str, extra: list[str]
) -> None:
    store = tmp_path / "runs.db"
    argv = ["verify-global", "--method", method, "--model", str(digits_mlp_path), "--data", "digits", "--limit", "2",
            "--store", str(store), "--json", *extra]  # fmt: skip
    rc, out, _ = _run(capsys, *argv)
    assert rc == 0
    assert isinstance(json.loads(out), dict)
    with Store(store) as s:
        (run,) = s.runs()
        records = s.records(run.id)
    assert sorted(r.index for r in records) == [0, 1]
    for r in records:
        if r.certified is not None and r.adv_distance is not None:
            assert r.certified <= r.adv_distance + 1e-9  # the bracket [certified, found]


@pytest.mark.parametrize(
    "extra, needle",
    [
        (["--method", "deepgo"], "--eps"),
        (["--method", "deepgo", "--eps", "0.1", "--features", "a,b"], "--features"),
        (["--method", "deepgo", "--eps", "0.1", "--features", "1", "--tolerance", "-1"], "tolerance"),
        (["--method", "deepgame", "--norm", "l7"], "l7"),
    ],
)
def test_bad_input_is_one_line(
    capsys: pytest.CaptureFixture[str], digits_mlp_path: Path, extra: list[str], needle: str
) -> None:
    rc, _, err = _run(capsys, "verify-global", "--model", str(digits_mlp_path), "--data", "digits", "--limit", "2",
                      *extra)  # fmt: skip
    assert_one_line_error(rc, err, "verify-global", needle)
