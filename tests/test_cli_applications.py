"""``bastion reprogram``, ``bastion explain`` and ``bastion fingerprint``, in-process on the session digits MLP."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bastion.cli import main
from bastion.store import Store


def run_cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    """``bastion ARGV`` in-process: (exit status, stdout, stderr)."""
    capsys.readouterr()
    try:
        rc = main(list(argv))
    except SystemExit as exc:  # argparse usage errors
        rc = exc.code if isinstance(exc.code, int) else 1
    out, err = capsys.readouterr()
    return rc, out, err


def test_reprogram_json_beats_chance(capsys: pytest.CaptureFixture[str], digits_mlp_path: Path,
                                     tmp_path: Path) -> None:  # fmt: skip
    store = tmp_path / "runs.db"
    rc, out, err = run_cli(
        capsys, "reprogram", "--model", f"zoo:mlp@{digits_mlp_path}", "--n", "400", "--epochs", "8", "--q", "5",
        "--store", str(store), "--json",
    )  # fmt: skip
    assert rc == 0, err
    res = json.loads(out)
    for method in ("white-box", "bar"):
        assert res[method]["accuracy"] >= res[method]["chance"] + 0.3, res[method]
    assert res["bar"]["queries"] > 0 and res["white-box"]["queries"] is None
    with Store(store) as db:
        runs = db.runs()
    assert {r.kind for r in runs} == {"reprogram"} and all(r.n_records == 100 for r in runs)


def test_explain_table_and_json(capsys: pytest.CaptureFixture[str], digits_mlp_path: Path) -> None:
    rc, out, err = run_cli(
        capsys, "explain", "--model", f"zoo:mlp@{digits_mlp_path}", "--limit", "3", "--steps", "40", "--c-steps",
        "2", "--json",
    )  # fmt: skip
    assert rc == 0, err
    res = json.loads(out)
    assert res["n"] == 3 and res["pn_success"] >= 2 / 3 and res["pp_success"] >= 2 / 3
    assert len(res["per_sample"]) == 3
    rc, out, err = run_cli(
        capsys, "explain", "--model", f"zoo:mlp@{digits_mlp_path}", "--limit", "2", "--steps", "20", "--c-steps",
        "1", "--mode", "PN",
    )  # fmt: skip
    assert rc == 0, err
    assert "pertinent negatives" in out and "pertinent positives" not in out


def test_fingerprint_with_the_built_in_suspects(capsys: pytest.CaptureFixture[str], digits_mlp_path: Path) -> None:
    rc, out, err = run_cli(
        capsys, "fingerprint", "--model", f"zoo:mlp@{digits_mlp_path}", "--n", "30", "--steps", "200", "--epochs",
        "3", "--independent", "1", "--json",
    )  # fmt: skip
    assert rc == 0, err
    res = json.loads(out)
    rates = {s["name"]: s["match_rate"] for s in res["suspects"]}
    assert rates["copy"] == 1.0 and res["auc"] is not None
    assert rates["copy"] > max(v for k, v in rates.items() if k.startswith("independent"))


def test_fingerprint_with_given_suspects(capsys: pytest.CaptureFixture[str], digits_mlp_path: Path) -> None:
    spec = f"zoo:mlp@{digits_mlp_path}"
    rc, out, err = run_cli(
        capsys, "fingerprint", "--model", spec, "--suspect", f"mine={spec}", "--threshold", "0.9", "--n", "10",
        "--steps", "100",
    )  # fmt: skip
    assert rc == 0, err
    assert "mine" in out and "COPY" in out and "threshold 0.900 (given)" in out


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["reprogram", "--task-size", "10", "--epochs", "1"], "do not fit the model input"),
        (["reprogram", "--classes", "9", "--epochs", "1"], "classes must lie in"),
        (["explain", "--kappa", "-1", "--limit", "1"], "kappa"),
        (["fingerprint", "--suspect", "x=", "--n", "2"], "NAME=MODEL_SPEC"),
        (["fingerprint", "--threshold", "2", "--suspect", "a=MODEL", "--n", "2", "--steps", "5"], "threshold"),
    ],
)
def test_bad_input_exits_with_status_2(
    capsys: pytest.CaptureFixture[str], digits_mlp_path: Path, argv: list[str], message: str
) -> None:
    argv = [a.replace("MODEL", f"zoo:mlp@{digits_mlp_path}") for a in argv]
    rc, _, err = run_cli(capsys, argv[0], "--model", f"zoo:mlp@{digits_mlp_path}", *argv[1:])
    assert rc == 2
    assert message in err and "Traceback" not in err
