"""Tests of ``bastion train``, run in-process through ``bastion.cli.main`` on a slice of the bundled digits."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from bastion.cli import main
from bastion.data import load_digits
from bastion.models import load_model
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


def train_args(out: Path, *extra: str) -> list[str]:
    return [
        "train", "--objective", "pgd-at", "--objective-opt", "steps=2", "--eps", "0.1", "--norm", "linf",
        "--data", "digits", "--limit", "300", "--arch", "mlp", "--epochs", "2", "--batch-size", "50",
        "--out", str(out), *extra,
    ]  # fmt: skip


def test_train_writes_a_model_checkpoint_and_store(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    out, db = tmp_path / "model.pt", tmp_path / "runs.db"
    rc, stdout, err = run_cli(
        capsys, *train_args(out, "--store", str(db), "--validation-fraction", "0.2", "--restore-best", "--json")
    )
    assert rc == 0, err
    summary = json.loads(stdout)
    assert summary["passes"] == 2 and len(summary["history"]) == 2
    assert summary["objective"].startswith("PGDAT(LpBall('linf', 0.1), steps=2")
    assert summary["restored_best"] and summary["best_epoch"] in (0, 1)
    assert all(0 <= h["val_robust_acc"] <= h["val_clean_acc"] <= 1 for h in summary["history"])
    assert Path(str(out) + ".ckpt").exists()
    model = load_model(str(out))
    data = load_digits().subset(slice(0, 300))
    with torch.no_grad():
        acc = float((model(data.x).argmax(1) == data.y).float().mean())
    assert acc > 0.3  # two short epochs on 240 images: far above chance (0.1)
    with Store(db) as store:
        (run,) = store.runs()
        assert run.kind == "train" and run.status == "complete"
        assert run.config["objective"] == summary["objective"]
        assert run.config["metadata"] == {"arch": "mlp", "data_spec": "digits", "limit": 300, "out": str(out)}
        assert [e["epoch"] for e in store.epochs(run.id)] == [0, 1]


def test_train_resume_continues_from_the_checkpoint(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    out = tmp_path / "m.pt"
    rc, stdout, err = run_cli(capsys, *train_args(out, "--json"))
    assert rc == 0, err
    first = load_model(str(out)).state_dict()
    rc, stdout, err = run_cli(capsys, *train_args(out, "--json", "--resume"))
    assert rc == 0, err
    assert json.loads(stdout)["resumed_from"] == 2
    again = load_model(str(out)).state_dict()
    assert all(torch.equal(first[k], again[k]) for k in first)
    # the table output names the columns and the model path
    rc, stdout, err = run_cli(capsys, *train_args(out, "--resume"))
    assert rc == 0 and "val robust" in stdout and str(out) in stdout


def test_train_bad_input_is_one_line_with_status_2(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    out = tmp_path / "m.pt"
    bad = [
        ([*train_args(out)[:2], "free-lunch", *train_args(out)[3:]], "unknown objective"),
        (train_args(out, "--objective-opt", "beta=3"), "no option 'beta'"),
        (train_args(out, "--norm", "l7"), "unknown norm"),
        (train_args(tmp_path / "missing" / "m.pt"), "does not exist"),
        (train_args(out, "--eps", "0.1,0.2"), "one radius"),
    ]
    for argv, message in bad:
        rc, _, err = run_cli(capsys, *argv)
        assert rc == 2, (argv, err)
        assert message in err and len(err.strip().splitlines()) == 1, err
    # a checkpoint from other settings is refused, not silently resumed
    assert run_cli(capsys, *train_args(out, "--epochs", "1"))[0] == 0
    rc, _, err = run_cli(capsys, *train_args(out, "--epochs", "1", "--lr", "0.01", "--resume"))
    assert rc == 2 and "another training run" in err


def test_train_help_lists_every_registered_objective(capsys: pytest.CaptureFixture[str]) -> None:
    from bastion.defenses.training.registry import OBJECTIVES

    rc, out, _ = run_cli(capsys, "train", "--help")
    assert rc == 0
    listed = out.split("objectives:", 1)[1].split("(options", 1)[0].replace(",", " ").split()
    assert sorted(listed) == sorted(OBJECTIVES)


def test_train_regularizers_reach_the_objective_and_the_saved_model(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    out = tmp_path / "sn.pt"
    argv = [
        "train", "--objective", "standard", "--data", "digits", "--limit", "300", "--arch", "mlp", "--epochs", "2",
        "--regularizer", "spectral-norm", "--regularizer", "weight-correlation=0.5", "--out", str(out), "--json",
    ]  # fmt: skip
    rc, stdout, err = run_cli(capsys, *argv)
    assert rc == 0, err
    assert "WeightCorrelation" in json.loads(stdout)["objective"]
    model = load_model(f"zoo:mlp@{out}", input_shape=(1, 8, 8), num_classes=10)
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    # the normalised weights are baked in: a plain model whose every layer has spectral norm about 1 (the power
    # iteration's estimate of sigma, one step per training batch, is a lower bound, so a little above 1); the
    # same training without the regulariser leaves norms of several units
    norms = [float(torch.linalg.matrix_norm(m.weight.detach(), 2)) for m in linears]
    assert len(norms) == 3 and all(0.9 <= v <= 1.2 for v in norms)


@pytest.mark.parametrize(
    ("spec", "message"),
    [("foo=1", "unknown regularizer 'foo'"), ("parseval=abc", "is not a number"), ("lipschitz=-1", "weight")],
)
def test_train_rejects_bad_regularizers(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, spec: str, message: str
) -> None:
    argv = ["train", "--objective", "standard", "--data", "digits", "--regularizer", spec]
    rc, _, err = run_cli(capsys, *argv, "--out", str(tmp_path / "m.pt"))
    assert rc == 2 and message in err and len(err.strip().splitlines()) == 1
