"""Tests of ``bastion backdoor-scan``, run in-process.

The model is a small zoo ``cnn`` trained once per module on digits poisoned here (BadNets: a 2x2 white patch, 10 %
of class 0 taken from class 3 and relabelled 0); the poisoned set is saved as an ``.npz`` with ``x``, ``y`` and
``poison_indices``, as ``bastion poison --out`` writes it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from bastion.cli import main
from bastion.data import Dataset, load_digits, load_npz
from bastion.defenses.training import train
from bastion.models import build_model, load_model, save_model
from bastion.poisoning.defenses import spectral_signatures
from bastion.store import Store


def run_cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    """``bastion ARGV`` in-process: (exit status, stdout, stderr)."""
    capsys.readouterr()
    try:
        rc = main(list(argv))
    except SystemExit as exc:  # --help and argparse usage errors
        rc = exc.code if isinstance(exc.code, int) else 1
    out, err = capsys.readouterr()
    return rc, out, err


@pytest.fixture(scope="module")
def poisoned(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, np.ndarray]:
    """(model file, poisoned data .npz, poison positions)."""
    digits = load_digits().subset(slice(0, 600))
    gen = torch.Generator().manual_seed(0)
    n_poison = round(0.1 / 0.9 * int((digits.y == 0).sum()))
    pool = torch.nonzero(digits.y == 3).reshape(-1)
    pick = torch.sort(pool[torch.randperm(pool.numel(), generator=gen)[:n_poison]]).values
    x, y = digits.x.clone(), digits.y.clone()
    x[pick, :, -2:, -2:] = 1.0
    y[pick] = 0
    data = Dataset(x, y, num_classes=10, name="poisoned digits")
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.random.fork_rng():
            torch.manual_seed(0)
            model = build_model("cnn", (1, 8, 8), 10, channels=(8, 16), hidden=64)
            train(model, data, epochs=8, lr=3e-3, seed=0, progress=False)
    finally:
        torch.set_num_threads(before)
    folder = tmp_path_factory.mktemp("backdoor")
    save_model(model, folder / "bd.pt")
    np.savez(folder / "poisoned.npz", x=x.numpy(), y=y.numpy(), poison_indices=pick.numpy())
    return folder / "bd.pt", folder / "poisoned.npz", pick.numpy()


def test_spectral_json_is_the_api_result(
    capsys: pytest.CaptureFixture[str], poisoned: tuple[Path, Path, np.ndarray]
) -> None:
    model_path, data_path, pick = poisoned
    rc, out, err = run_cli(
        capsys, "backdoor-scan", "--model", os.fspath(model_path), "--data", os.fspath(data_path), "--method", "ss",
        "--poison-indices", os.fspath(data_path), "--json",
    )  # fmt: skip
    assert rc == 0, err
    got = json.loads(out)
    api = spectral_signatures(load_model(model_path), load_npz(data_path), poison_fraction=0.1, poison_indices=pick)
    assert got["suspected"] == api.suspected.tolist()
    assert got["recall"] == pytest.approx(api.recall) and got["n_poison"] == len(pick)


def test_activation_clustering_table_and_store_resume(
    capsys: pytest.CaptureFixture[str], poisoned: tuple[Path, Path, np.ndarray], tmp_path: Path
) -> None:
    model_path, data_path, _ = poisoned
    argv = [
        "backdoor-scan", "--model", os.fspath(model_path), "--data", os.fspath(data_path), "--method", "ac",
        "--reduce", "pca", "--poison-indices", os.fspath(data_path), "--store", os.fspath(tmp_path / "runs.db"),
        "--figure", os.fspath(tmp_path / "scores.png"),
    ]  # fmt: skip
    rc, out, err = run_cli(capsys, *argv)
    assert rc == 0, err
    assert "backdoor scan: activation-clustering" in out and "recall" in out
    assert (tmp_path / "scores.png").stat().st_size > 1000
    rc, _, err = run_cli(capsys, *argv)
    assert rc == 0, err
    with Store(tmp_path / "runs.db") as db:
        runs = db.runs()
        assert len(runs) == 1 and runs[0].kind == "backdoor-scan" and runs[0].n_records == 600
        flagged = {r.index for r in db.records(runs[0].id) if r.status == "falsified"}
    assert runs[0].summary is not None and len(flagged) == runs[0].summary["n_suspected"]


def test_strip_uses_the_rest_of_the_data_as_clean_set(
    capsys: pytest.CaptureFixture[str], poisoned: tuple[Path, Path, np.ndarray]
) -> None:
    model_path, data_path, pick = poisoned
    rc, out, err = run_cli(
        capsys, "backdoor-scan", "--model", os.fspath(model_path), "--data", os.fspath(data_path), "--method",
        "strip", "--poison-indices", os.fspath(data_path), "--limit", "400", "--json",
    )  # fmt: skip
    assert rc == 0, err
    got = json.loads(out)
    assert got["n"] == 400 and got["n_poison"] == int((pick < 400).sum())
    assert got["details"]["n_clean"] == 400 - got["n_poison"]


def test_neural_cleanse_and_its_figures(
    capsys: pytest.CaptureFixture[str], poisoned: tuple[Path, Path, np.ndarray], tmp_path: Path
) -> None:
    model_path, _, _ = poisoned
    figure = tmp_path / "nc.png"
    rc, out, err = run_cli(
        capsys, "backdoor-scan", "--model", os.fspath(model_path), "--data", "digits", "--limit", "200", "--method",
        "neural-cleanse", "--epochs", "2", "--figure", os.fspath(figure), "--json",
    )  # fmt: skip
    assert rc == 0, err
    got = json.loads(out)
    assert got["method"] == "neural-cleanse" and len(got["norms"]) == 10 and got["epochs"] == [2] * 10
    assert figure.stat().st_size > 1000 and (tmp_path / "nc-anomaly.png").stat().st_size > 1000


def test_fine_prune_saves_the_repaired_model(
    capsys: pytest.CaptureFixture[str], poisoned: tuple[Path, Path, np.ndarray], tmp_path: Path
) -> None:
    model_path, _, _ = poisoned
    out_path = tmp_path / "repaired.pt"
    rc, out, err = run_cli(
        capsys, "backdoor-scan", "--model", os.fspath(model_path), "--data", "digits", "--limit", "300", "--method",
        "fine-prune", "--epochs", "1", "--out", os.fspath(out_path),
    )  # fmt: skip
    assert rc == 0, err
    assert "Fine-pruning" in out and "clean accuracy" in out
    repaired = load_model(out_path)
    assert isinstance(repaired, torch.nn.Module)


def test_errors_are_one_line_with_exit_status_2(
    capsys: pytest.CaptureFixture[str], poisoned: tuple[Path, Path, np.ndarray], tmp_path: Path
) -> None:
    model_path, data_path, _ = poisoned
    base = ["backdoor-scan", "--model", os.fspath(model_path), "--data", os.fspath(data_path)]
    no_key = tmp_path / "no-key.npz"
    np.savez(no_key, x=np.zeros(3))
    out_of_range = tmp_path / "far.npz"
    np.savez(out_of_range, poison_indices=np.array([5, 100_000]))
    cases = [
        (["--method", "ss", "--poison-indices", os.fspath(tmp_path / "missing.npz")], "no such file"),
        (["--method", "ss", "--poison-indices", os.fspath(no_key)], "poison_indices"),
        (["--method", "ss", "--poison-indices", os.fspath(out_of_range)], "outside"),
        (["--method", "ss", "--poison-fraction", "2"], "poison_fraction"),
        (["--method", "strip"], "--clean"),
        (["--method", "ss", "--figure", os.fspath(tmp_path / "nowhere" / "f.png")], "does not exist"),
        (["--method", "ss", "--figure", os.fspath(tmp_path / "f.xyz")], "unknown figure format"),
        (["--method", "ss", "--out", os.fspath(tmp_path / "m.pt")], "fine-prune only"),
        (["--method", "sanitize", "--percentile", "0"], "percentile"),
    ]
    for extra, match in cases:
        rc, out, err = run_cli(capsys, *base, *extra)
        assert rc == 2, (extra, err)
        assert out == "" and len(err.strip().splitlines()) == 1 and match in err, (extra, err)
    rc, _, err = run_cli(capsys, *base, "--method", "magic")
    assert rc == 2 and "invalid choice" in err


# ------------------------------------------------------------------------------- --poisoned (a `bastion poison` file)
@pytest.fixture(scope="module")
def badnets_file(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(model file, BadNets file of `bastion poison`): 1200 digits, 10 % poison, a small cnn trained on them."""
    from bastion.poisoning import BadNets

    digits = load_digits().subset(slice(0, 1200))
    poisoned = BadNets(rate=0.1, seed=0)(digits)
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.random.fork_rng():
            torch.manual_seed(0)
            model = build_model("cnn", (1, 8, 8), 10, channels=(16, 32), hidden=64)
            train(model, poisoned.data, epochs=15, lr=3e-3, seed=0, progress=False)
    finally:
        torch.set_num_threads(before)
    folder = tmp_path_factory.mktemp("poisoned-file")
    save_model(model, folder / "bd.pt")
    return folder / "bd.pt", poisoned.save(folder / "badnets.npz")


def test_poisoned_file_gives_precision_recall_and_asr_after_retraining(
    capsys: pytest.CaptureFixture[str], badnets_file: tuple[Path, Path]
) -> None:
    from bastion.poisoning import PoisonedData

    model_path, file = badnets_file
    rc, out, err = run_cli(
        capsys, "backdoor-scan", "--model", os.fspath(model_path), "--poisoned", os.fspath(file), "--method", "ss",
        "--retrain", "10", "--json",
    )  # fmt: skip
    assert rc == 0, err
    got = json.loads(out)
    back = PoisonedData.load(file)
    api = spectral_signatures(load_model(model_path), back.data, poison_indices=back.poison_indices)
    assert got["n_poison"] == back.n_poisons == 120 and got["recall"] == pytest.approx(api.recall)
    p = got["poisoned"]
    assert p["attack"] == "badnets" and p["target"] == 0 and p["mitigation"].startswith("retraining")
    # the trigger came from the file: the backdoored model obeys it, the retrained one much less when the scan
    # caught most of the poison
    assert p["asr_before"] > 0.8, p
    if api.recall is not None and api.recall > 0.9:
        assert p["asr_after"] < p["asr_before"] - 0.3, p
    # fine-pruning with the file: ASR before and after on the defender's clean data, in the table
    rc, out, err = run_cli(
        capsys, "backdoor-scan", "--model", os.fspath(model_path), "--poisoned", os.fspath(file), "--method",
        "fine-prune", "--epochs", "1", "--data", "digits", "--limit", "300",
    )  # fmt: skip
    assert rc == 0, err
    assert "attack success" in out and "mitigation         fine-pruning" in out and "badnets, 120 poisons" in out


def test_poisoned_file_errors(
    capsys: pytest.CaptureFixture[str], badnets_file: tuple[Path, Path], tmp_path: Path
) -> None:
    from bastion.poisoning import LabelFlip

    model_path, file = badnets_file
    flip = LabelFlip(rate=0.1)(load_digits().subset(slice(0, 100))).save(tmp_path / "flip.npz")
    base = ["backdoor-scan", "--model", os.fspath(model_path), "--method", "ss"]
    cases = [
        (["--poisoned", os.fspath(flip)], "no backdoor trigger"),
        (["--poisoned", os.fspath(tmp_path / "none.npz")], "no such file"),
        (["--poisoned", os.fspath(file), "--data", "digits"], "drop --data"),
        (["--poisoned", os.fspath(file), "--poison-indices", os.fspath(file)], "drop --poison-indices"),
        (["--retrain", "2", "--data", "digits"], "--poisoned"),
        ([], "--data is required"),
    ]
    for extra, match in cases:
        rc, out, err = run_cli(capsys, *base, *extra)
        assert rc == 2, (extra, err)
        assert out == "" and len(err.strip().splitlines()) == 1 and match in err, (extra, err)
