"""Tests of ``bastion smooth certify|predict``, run in-process through ``bastion.cli.main``.

The model is the session's tiny digits MLP (``digits_mlp_path`` in conftest.py); sample counts are small so that
each command takes well under a second.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from bastion.cli import main
from bastion.data import load_digits
from bastion.defenses.smoothing import ABSTAIN, Smooth, evaluate_smoothed, smooth_threat_key
from bastion.models import load_model
from bastion.store import Store

N_SAMPLES = 12


def run_cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    """``bastion ARGV`` in-process: (exit status, stdout, stderr)."""
    capsys.readouterr()
    try:
        rc = main(list(argv))
    except SystemExit as exc:  # --help and argparse usage errors
        rc = exc.code if isinstance(exc.code, int) else 1
    out, err = capsys.readouterr()
    return rc, out, err


def certify_args(model: Path, *extra: str) -> list[str]:
    return [
        "smooth", "certify", "--model", os.fspath(model), "--data", "digits", "--limit", str(N_SAMPLES),
        "--sigma", "0.25", "--n", "300", "--n0", "20", "--alpha", "0.001", "--batch-size", "1000",
        "--radii", "0,0.25,0.5", *extra,
    ]  # fmt: skip


def stored_rows(path: Path) -> list[tuple[object, ...]]:
    with Store(path) as store:
        (run,) = store.runs()
        return [(r.index, r.label, r.clean_pred, r.status, r.certified) for r in store.records(run.id)]


def test_certify_round_trip_matches_the_api(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, digits_mlp_path: Path
) -> None:
    db = tmp_path / "runs.db"
    rc, out, err = run_cli(capsys, *certify_args(digits_mlp_path, "--store", str(db), "--json"))
    assert rc == 0, err
    summary = json.loads(out)
    assert summary["mode"] == "certify" and summary["n"] == N_SAMPLES and summary["sigma"] == 0.25
    assert summary["radii"] == [0.0, 0.25, 0.5]
    curve = summary["certified_accuracy"]
    assert curve == sorted(curve, reverse=True)
    assert summary["accuracy"] >= curve[0] > 0.5  # the digits MLP is accurate and sigma = 0.25 is mild on digits
    with Store(db) as store:
        (run,) = store.runs()
        assert run.kind == "smooth-certify" and run.status == "complete" and run.n_records == N_SAMPLES
        assert run.config["model_spec"] == os.fspath(digits_mlp_path) and run.config["n"] == 300
        recs = store.records(run.id)
    assert {r.threat for r in recs} == {smooth_threat_key(0.25)}
    for r in recs:
        assert (r.certified is None) == (r.clean_pred == ABSTAIN)
        assert r.status == ("falsified" if r.clean_pred not in (ABSTAIN, r.label) else
                            "robust" if r.clean_pred == r.label else "unknown")  # fmt: skip
        if r.certified is not None:
            # the largest radius sigma * Phi^-1(alpha^(1/n)) that n votes can certify
            assert 0.0 <= r.certified <= 0.25 * 2.29

    # the CLI is one call of the Python API: the same job through the API gives the same records
    data = load_digits().subset(slice(0, N_SAMPLES))
    model = load_model(str(digits_mlp_path))
    api = evaluate_smoothed(
        Smooth(model, 10, 0.25), data, n=300, n0=20, alpha=0.001, batch_size=1000, radii=[0, 0.25, 0.5],
        store=tmp_path / "api.db", progress=False,
    )  # fmt: skip
    assert api.certified_accuracy == curve
    assert stored_rows(tmp_path / "api.db") == stored_rows(db)

    rc, out, _ = run_cli(capsys, *certify_args(digits_mlp_path, "--store", str(db)))
    assert rc == 0 and "certified accuracy" in out and "l2 radius" in out


def test_certify_resumes_after_an_interrupt(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, digits_mlp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    rc, _, err = run_cli(capsys, *certify_args(digits_mlp_path, "--store", str(tmp_path / "full.db"), "--json"))
    assert rc == 0, err

    real_write = Store.write_records
    writes: list[int] = []

    def dying_write(self: Store, *args: object, **kw: object) -> None:
        if len(writes) == 2:
            raise KeyboardInterrupt  # as Ctrl-C or a kill in the middle of the job
        writes.append(1)
        real_write(self, *args, **kw)  # type: ignore[arg-type]

    db = tmp_path / "runs.db"
    monkeypatch.setattr(Store, "write_records", dying_write)
    rc, _, err = run_cli(capsys, *certify_args(digits_mlp_path, "--store", str(db)))
    assert rc == 130 and "re-run the same command to resume" in err
    monkeypatch.setattr(Store, "write_records", real_write)
    with Store(db) as store:
        (run,) = store.runs()
        # 1000 // (300 + 20) = 3 inputs per group, 2 groups committed before the interrupt
        assert run.status == "running" and run.n_records == 6
        done_before = run.n_records

    calls: list[int] = []
    real_certify = Smooth.certify

    def counting_certify(self: Smooth, x: torch.Tensor, **kw: object) -> object:
        calls.append(int(x.shape[0]))
        return real_certify(self, x, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(Smooth, "certify", counting_certify)
    rc, out, err = run_cli(capsys, *certify_args(digits_mlp_path, "--store", str(db), "--json"))
    assert rc == 0, err
    assert sum(calls) == N_SAMPLES - done_before  # only the samples not stored were certified
    assert stored_rows(db) == stored_rows(tmp_path / "full.db")  # identical to an uninterrupted run
    calls.clear()
    rc, out2, _ = run_cli(capsys, *certify_args(digits_mlp_path, "--store", str(db), "--json"))
    assert rc == 0 and calls == []  # everything done: nothing is recomputed
    assert json.loads(out2)["certified_accuracy"] == json.loads(out)["certified_accuracy"]


def test_predict_and_plot(capsys: pytest.CaptureFixture[str], tmp_path: Path, digits_mlp_path: Path) -> None:
    rc, out, err = run_cli(
        capsys, "smooth", "predict", "--model", os.fspath(digits_mlp_path), "--data", "digits", "--limit", "20",
        "--sigma", "0.25", "--n", "200", "--json",
    )  # fmt: skip
    assert rc == 0, err
    summary = json.loads(out)
    assert summary["mode"] == "predict" and summary["n"] == 20 and summary["radii"] == []
    assert summary["accuracy"] > 0.6 and summary["accuracy"] + summary["abstain_rate"] <= 1.0
    plot = tmp_path / "cert.png"
    rc, _, err = run_cli(capsys, *certify_args(digits_mlp_path, "--plot", str(plot)))
    assert rc == 0, err
    assert plot.read_bytes().startswith(b"\x89PNG\r\n\x1a\n")


@pytest.mark.parametrize(
    ("extra", "needle"),
    [
        (["--sigma", "0"], "sigma"),
        (["--alpha", "1.5"], "alpha"),
        (["--plot", "/no/such/folder/x.png"], "--plot"),
    ],
)
def test_bad_input_is_one_line(
    capsys: pytest.CaptureFixture[str], digits_mlp_path: Path, extra: list[str], needle: str
) -> None:
    rc, _, err = run_cli(capsys, *certify_args(digits_mlp_path, *extra))
    assert rc == 2 and "Traceback" not in err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("bastion smooth: error: ") and needle in lines[0], err


def test_help_lists_smooth(capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, _ = run_cli(capsys, "smooth", "--help")
    assert rc == 0 and "certify" in out and "--sigma" in out and "Cohen" in out
