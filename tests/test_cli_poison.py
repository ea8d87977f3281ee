"""Tests of ``bastion poison``, run in-process on a slice of the bundled digits."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from bastion.cli import main
from bastion.data import load_digits, load_npz
from bastion.poisoning import PoisonedData


def run_cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    """``bastion ARGV`` in-process: (exit status, stdout, stderr)."""
    capsys.readouterr()
    try:
        rc = main(list(argv))
    except SystemExit as exc:  # argparse usage errors
        rc = exc.code if isinstance(exc.code, int) else 1
    out, err = capsys.readouterr()
    return rc, out, err


def test_poison_badnets_writes_an_npz_that_train_reads(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    out = tmp_path / "poisoned.npz"
    rc, stdout, err = run_cli(
        capsys, "poison", "--attack", "badnets", "--rate", "0.1", "--target", "0", "--data", "digits",
        "--limit", "400", "--out", str(out), "--json",
    )  # fmt: skip
    assert rc == 0, err
    summary = json.loads(stdout)
    assert summary["n_poisons"] == 40 and summary["target"] == 0 and summary["mode"] == "all-to-one"
    assert summary["attack"].startswith("BadNets(rate=0.1, target=0")
    poisoned = PoisonedData.load(out)
    clean = load_digits().subset(slice(0, 400))
    assert poisoned.trigger is not None and poisoned.n_poisons == 40
    idx = poisoned.poison_indices
    assert torch.equal(poisoned.data.x[idx], poisoned.trigger.apply(clean.x[idx]))
    assert bool((poisoned.data.y[idx] == 0).all())
    plain = load_npz(out)
    assert torch.equal(plain.x, poisoned.data.x) and torch.equal(plain.y, poisoned.data.y)
    # the table output, and training on the file through the existing `bastion train`
    rc, stdout, err = run_cli(capsys, "poison", "--attack", "wanet", "--data", "digits", "--limit", "300",
                              "--out", str(tmp_path / "w.npz"))  # fmt: skip
    assert rc == 0 and "noise mode: 60 warped samples" in stdout and "30 of 300" in stdout, err
    model = tmp_path / "m.pt"
    rc, stdout, err = run_cli(capsys, "train", "--objective", "standard", "--data", str(out), "--arch", "mlp",
                              "--epochs", "1", "--out", str(model), "--json")  # fmt: skip
    assert rc == 0 and model.exists(), err


def test_poison_labelflip_and_clean_label_attacks(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, digits_mlp_path: Path
) -> None:
    out = tmp_path / "flip.npz"
    rc, _, err = run_cli(capsys, "poison", "--attack", "labelflip", "--rate", "0.5", "--source", "1",
                              "--target", "7", "--data", "digits", "--out", str(out), "--json")  # fmt: skip
    assert rc == 0, err
    poisoned = PoisonedData.load(out)
    clean = load_digits()
    assert set(clean.y[poisoned.poison_indices].tolist()) == {1} and poisoned.target == 7
    assert poisoned.n_poisons == round(0.5 * int((clean.y == 1).sum()))
    for attack, opts in (("matching", ["steps=2", "restarts=1"]), ("collision", ["max_iters=3"])):
        out = tmp_path / f"{attack}.npz"
        args = [
            "poison",
            "--attack",
            attack,
            "--model",
            str(digits_mlp_path),
            "--target",
            "2",
            "--target-data",
            "digits",
            "--target-index",
            "0,1",
            "--data",
            "digits",
            "--limit",
            "300",
            "--out",
            str(out),
            "--json",
        ]
        for o in opts:
            args += ["--attack-opt", o]
        rc, _, err = run_cli(capsys, *args)
        assert rc == 0, err
        back = PoisonedData.load(out)
        assert back.attack == attack and back.target == 2 and back.target_x is not None
        assert back.target_x.shape == (2, 1, 8, 8) and back.target_y is not None
        assert torch.equal(back.target_y, clean.y[:2])
        assert bool((back.data.y[back.poison_indices] == 2).all())  # clean-label: poisons keep class 2


@pytest.mark.parametrize(
    ("extra", "needle"),
    [
        (["--attack", "badnets", "--rate", "0"], "rate"),
        (["--attack", "badnets", "--rate", "1.5"], "rate"),
        (["--attack", "badnets", "--target", "12"], "target"),
        (["--attack", "labelflip", "--mode", "all-to-all"], "--mode"),
        (["--attack", "badnets", "--source", "3"], "--source"),
        (["--attack", "blended", "--attack-opt", "gamma=3"], "no option 'gamma'"),
        (["--attack", "collision"], "--model"),
        (["--attack", "badnets", "--model", "m.pt"], "neither"),
        (["--attack", "badnets", "--pattern", "nope.npy"], "--pattern"),
        (["--attack", "frogs"], "invalid choice"),
        (["--attack", "labelflip", "--rate-of", "target"], "--rate-of"),
        (["--attack", "badnets", "--rate-of", "target", "--mode", "all-to-all"], "all-to-one"),
        (["--attack", "badnets", "--epochs", "3"], "--epochs"),
        (["--attack", "badnets", "--model-out", "m.pt"], "--model-out"),
        (["--attack", "badnets", "--arch", "cnn"], "--arch"),
        (["--attack", "input-aware"], "--model-out"),
        (["--attack", "input-aware", "--model-out", "m.npz"], ".pt"),
    ],
)
def test_poison_bad_input_is_one_line_with_status_2(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, extra: list[str], needle: str
) -> None:
    rc, stdout, err = run_cli(capsys, "poison", "--data", "digits", "--limit", "100",
                              "--out", str(tmp_path / "p.npz"), *extra)  # fmt: skip
    assert rc == 2, (stdout, err)
    assert needle in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "p.npz").exists()


def test_poison_output_name_and_folder_are_checked(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    for out, needle in ((tmp_path / "p.pt", ".npz"), (tmp_path / "missing" / "p.npz", "does not exist")):
        rc, _, err = run_cli(capsys, "poison", "--attack", "badnets", "--data", "digits", "--out", str(out))
        assert rc == 2 and needle in err and len(err.strip().splitlines()) == 1, err


def test_poison_rate_of_target(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    out = tmp_path / "art.npz"
    rc, stdout, err = run_cli(capsys, "poison", "--attack", "badnets", "--rate", "0.33", "--rate-of", "target",
                              "--data", "digits", "--out", str(out), "--json")  # fmt: skip
    assert rc == 0, err
    poisoned = PoisonedData.load(out)
    n_target = int((load_digits().y == 0).sum())
    assert poisoned.n_poisons == round(0.33 * n_target / 0.67)
    assert json.loads(stdout)["config"]["rate_of"] == "target"


def test_poison_input_aware_writes_the_model_and_the_generator(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    from bastion.models import load_model
    from bastion.poisoning import InputAwareTrigger

    model_out, out = tmp_path / "dyn.pt", tmp_path / "dyn.npz"
    rc, stdout, err = run_cli(
        capsys, "poison", "--attack", "input-aware", "--data", "digits", "--limit", "200", "--epochs", "1",
        "--attack-opt", "mask_epochs=1", "--attack-opt", "width=4", "--test", "digits", "--model-out",
        str(model_out), "--out", str(out), "--json",
    )  # fmt: skip
    assert rc == 0, err
    summary = json.loads(stdout)
    assert summary["n_poisons"] == 20 and summary["n_cross"] == 20 and summary["target"] == 0
    assert 0.0 <= summary["attack_success_rate"] <= 1.0 and 0.0 <= summary["cross_trigger_accuracy"] <= 1.0
    model = load_model(f"zoo:cnn@{model_out}")
    back = PoisonedData.load(out)
    assert isinstance(back.trigger, InputAwareTrigger) and back.attack == "input-aware"
    x = load_digits().x[:8]
    with torch.no_grad():
        assert model(back.trigger.apply(x)).shape == (8, 10)
