"""``bastion reliability`` and ``bastion weight-robustness``: the commands run the API, store and resume, and bad
input is one line with exit status 2."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bastion.cli import main
from bastion.store import Store


def _run(capsys: pytest.CaptureFixture[str], argv: list[str]) -> tuple[int, str, str]:
    code = main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def test_reliability_with_a_vae_profile_stores_cells_and_resumes(digits_mlp_path: Path, tmp_path: Path, capsys) -> None:
    db, fig = tmp_path / "runs.db", tmp_path / "profile.png"
    argv = ["reliability", "--model", str(digits_mlp_path), "--op-data", "digits", "--limit", "120",
            "--encoder", "vae", "--latent-dim", "2", "--vae-epochs", "2", "--cells", "top:6", "--eps", "0.05",
            "--samples-per-cell", "200", "--n-boot", "5", "--store", str(db), "--figure", str(fig),
            "--json"]  # fmt: skip
    code, out, err = _run(capsys, argv)
    assert code == 0, err
    got = json.loads(out)
    assert got["n_cells"] == 6 and got["partition"] == "balls"
    assert 0.0 <= got["pfd"] <= got["upper"] <= 1.0
    assert fig.is_file() and fig.stat().st_size > 0
    with Store(db) as store:
        (run,) = store.runs()
        records = store.records(run.id)
    assert run.kind == "reliability" and len(records) == 6
    assert all("lambda" in r.extra and "mass" in r.extra for r in records)
    # the same command again finds the finished run: the same figures
    code, out2, _ = _run(capsys, argv)
    assert code == 0 and json.loads(out2)["pfd"] == got["pfd"]


def test_weight_robustness_brackets(digits_mlp_path: Path, capsys) -> None:
    argv = ["weight-robustness", "--model", str(digits_mlp_path), "--data", "digits", "--limit", "6",
            "--eps", "0.01", "--method", "crown", "--attack-steps", "10", "--json"]  # fmt: skip
    code, out, err = _run(capsys, argv)
    assert code == 0, err
    got = json.loads(out)
    assert got["n"] == 6


@pytest.mark.parametrize(
    ("extra", "word"),
    [
        (["--encoder", "missing.pt"], "missing.pt"),
        (["--confidence", "1.5"], "confidence"),
        (["--cells", "top:x"], "cells"),
        (["--eps", "0.1,0.2"], "one eps"),
    ],
)
def test_reliability_bad_input_is_one_line(digits_mlp_path: Path, capsys, extra: list[str], word: str) -> None:
    argv = ["reliability", "--model", str(digits_mlp_path), "--op-data", "digits", "--limit", "50", *extra]
    try:
        code, _, err = _run(capsys, argv)
    except SystemExit as exc:  # argparse usage errors
        code, err = int(exc.code or 0), capsys.readouterr().err
    assert code == 2 and word in err and "Traceback" not in err, err
