"""``bastion certify`` and ``bastion assess``: round trips against the Python API, resume through the store, errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bastion.cli import main
from bastion.data import load_data
from bastion.models import load_model
from bastion.threat import LpBall
from bastion.verify.certify import certify


def _run(capsys: pytest.CaptureFixture[str], argv: list[str]) -> tuple[int, str, str]:
    code = main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def test_certify_round_trip_and_resume(digits_mlp_path: Path, tmp_path: Path, capsys) -> None:
    db = tmp_path / "runs.db"
    argv = ["certify", "--model", str(digits_mlp_path), "--data", "digits", "--limit", "24", "--norm", "linf",
            "--eps", "0.02", "--method", "crown", "--radius", "--store", str(db), "--json"]  # fmt: skip
    code, out, _ = _run(capsys, argv)
    assert code == 0
    got = json.loads(out)
    assert got["n"] == 24 and got["method"] == "crown" and len(got["records"]) == 24
    data = load_data("digits").subset(slice(0, 24))
    model = load_model(str(digits_mlp_path), input_shape=data.feature_shape, num_classes=10)
    api = certify(model, data, LpBall("linf", 0.02), method="crown", progress=False)
    assert got["certified_accuracy"] == pytest.approx(api.certified_accuracy)
    for rec, ref in zip(got["records"], sorted(api.records, key=lambda r: r.index), strict=True):
        assert rec["index"] == ref.index and rec["status"] == ref.status
        assert rec["certified"] == pytest.approx(ref.certified, rel=1e-6)
    # the same command again: the stored run is found and nothing is recomputed
    code, out2, _ = _run(capsys, argv)
    again = json.loads(out2)
    assert code == 0 and again["run_id"] == got["run_id"] and again["records"] == got["records"]
    code, out3, _ = _run(capsys, ["runs", "--store", str(db), "--json"])
    assert [r["kind"] for r in json.loads(out3)] == ["certify"]
    # the text table
    code, text, _ = _run(capsys, argv[:-1])
    assert code == 0 and "certified accuracy" in text and "mean radius" in text


def test_assess_round_trip(digits_mlp_path: Path, tmp_path: Path, capsys) -> None:
    argv = ["assess", "--model", str(digits_mlp_path), "--data", "digits", "--limit", "10", "--eps", "0.05",
            "--budget", "0", "--attack", "pgd", "--attack-opt", "steps=10", "--minimal-attack", "fab",
            "--methods", "ibp,crown", "--store", str(tmp_path / "a.db"), "--json"]  # fmt: skip
    code, out, _ = _run(capsys, argv)
    assert code == 0
    got = json.loads(out)
    assert got["n"] == 10 and sum(got["fractions"].values()) == pytest.approx(1.0)
    for rec in got["records"]:
        if rec["certified"] is not None and rec["adv_distance"] is not None:
            assert rec["certified"] <= rec["adv_distance"] * (1 + 1e-5)
        if rec["status"] == "robust":
            assert rec["certified"] >= 0.05 and rec["attack"] in ("ibp", "crown")
    code, text, _ = _run(capsys, argv[:-1])
    assert code == 0 and "robust" in text and "decided by" in text


def test_radius_default_is_the_same_everywhere(digits_mlp_path: Path, capsys) -> None:
    """certify() and assess() compute radii by default, and so do both commands; --no-radius turns it off."""
    import inspect

    from bastion.verify.assess import assess

    assert inspect.signature(certify).parameters["radius"].default is True
    assert inspect.signature(assess).parameters["radius"].default is True
    common = ["--model", str(digits_mlp_path), "--data", "digits", "--limit", "6", "--eps", "0.02", "--json"]
    assess_opts = ["--budget", "0", "--attack", "fgsm", "--minimal-attack", "none", "--methods", "ibp"]
    for command, extra in (("certify", ["--method", "ibp"]), ("assess", assess_opts)):
        with_radius = json.loads(_run(capsys, [command, *common, *extra])[1])
        without = json.loads(_run(capsys, [command, *common, *extra, "--no-radius"])[1])
        radii = [r["certified"] for r in with_radius["records"] if r["certified"] is not None]
        plain = [r["certified"] for r in without["records"] if r["status"] == "robust"]
        assert radii and any(r > 0.02 * 1.01 for r in radii), command  # bisected beyond eps
        assert plain and all(r == pytest.approx(0.02) for r in plain), command  # eps, no bisection


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--eps", "0.1,0.2"], "one radius"),
        (["--eps", "2", "--norm", "l0"], "norms"),
        (["--eps", "0.1", "--method", "magic"], "unknown bound method"),
    ],
)
def test_certify_errors_are_one_line(digits_mlp_path: Path, capsys, extra: list[str], message: str) -> None:
    code, _, err = _run(
        capsys, ["certify", "--model", str(digits_mlp_path), "--data", "digits", "--limit", "4", *extra]
    )
    assert code == 2 and message in err and "Traceback" not in err


def test_assess_bad_budget(digits_mlp_path: Path, capsys) -> None:
    argv = ["assess", "--model", str(digits_mlp_path), "--data", "digits", "--limit", "4", "--eps", "0.1",
            "--budget", "-1"]  # fmt: skip
    code, _, err = _run(capsys, argv)
    assert code == 2 and "budget" in err


def test_assess_estimates_and_l0_from_the_command_line(digits_mlp_path: Path, capsys) -> None:
    base = ["assess", "--model", str(digits_mlp_path), "--data", "digits", "--limit", "3", "--json"]
    argv = [*base, "--eps", "0.05", "--budget", "0", "--attack", "fgsm", "--minimal-attack", "none",
            "--methods", "ibp", "--no-radius", "--estimates", "clever",
            "--estimate-opt", "clever.n_batches=10", "--estimate-opt", "clever.batch_size=32"]  # fmt: skip
    code, out, _ = _run(capsys, argv)
    assert code == 0
    got = json.loads(out)
    assert "clever" in got["estimates"]
    assert all(r["queries"] == 1 + 10 * 32 for r in got["records"] if r["clean_pred"] == r["label"])
    code, out, _ = _run(capsys, [*base, "--norm", "l0", "--eps", "1", "--complete-opt", "max_subset=1"])
    assert code == 0
    got = json.loads(out)
    assert got["threat"] == "l0:1.0" and all(
        "l0_lower" in r["extra"] for r in got["records"] if r["clean_pred"] == r["label"]
    )
    for bad, word in ((["--estimate-opt", "n_batches=3", "--estimates", "clever"], "name the estimate"),
                      (["--complete", "deepgo", "--norm", "l2"], "norms"),
                      (["--complete-opt", "nope=1", "--norm", "l0"], "nope")):  # fmt: skip
        code, _, err = _run(capsys, [*base, "--eps", "1", *bad])
        assert code == 2 and word in err and "Traceback" not in err, err
