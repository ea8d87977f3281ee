"""Tests of the ``bastion`` command line, run in-process through ``bastion.cli.main`` (plus one real process).

The model is the session's tiny digits MLP (``digits_mlp_path`` in conftest.py), so that each evaluation takes
well under a second.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from bastion.cli import main
from bastion.data import load_digits
from bastion.store import Store

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
EPS_KEYS = ["linf:0.05", "linf:0.2"]


def run_cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    """``bastion ARGV`` in-process: (exit status, stdout, stderr)."""
    capsys.readouterr()  # drop anything printed before
    try:
        rc = main(list(argv))
    except SystemExit as exc:  # --help and argparse usage errors
        rc = exc.code if isinstance(exc.code, int) else 1
    out, err = capsys.readouterr()
    return rc, out, err


def evaluate_args(model: str | os.PathLike[str], *extra: str, data: str = "digits") -> list[str]:
    """The evaluate command of these tests: 64 samples, two radii, the FGSM -> PGD cascade."""
    return [
        "evaluate", "--model", os.fspath(model), "--data", data, "--limit", "64", "--eps", "0.05,0.2",
        "--attack", "fgsm,pgd", "--attack-opt", "pgd.steps=5", *extra,
    ]  # fmt: skip


def assert_one_line_error(rc: int, err: str, command: str, *needles: str) -> str:
    """Exit status 2 and exactly one line on stderr, naming the problem, without a traceback."""
    assert rc == 2, f"expected exit status 2, got {rc}; stderr:\n{err}"
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, f"expected a one-line error, got:\n{err}"
    line = lines[0]
    assert line.startswith(f"bastion {command}: error: "), line
    for needle in needles:
        assert needle in line, f"{needle!r} not in the error line {line!r}"
    return line


def check_summary(summary: dict, n: int = 64) -> None:
    """The evaluate summary of ``evaluate_args``: keys, ranges and the orders the cascade guarantees."""
    assert summary["n"] == n
    assert summary["threats"] == EPS_KEYS
    assert summary["attacks"] == ["fgsm", "pgd"]
    assert set(summary["robust_accuracy"]) == set(EPS_KEYS)
    clean = summary["clean_accuracy"]
    assert 0.9 <= clean <= 1.0
    for key in EPS_KEYS:
        row = summary["robust_accuracy"][key]
        assert set(row) == {"fgsm", "pgd"}
        # cumulative cascade: PGD only runs on what FGSM left, so its column can only be lower
        assert 0.0 <= row["pgd"] <= row["fgsm"] <= clean
        assert summary["worst_case"][key] == row["pgd"]
        # each accuracy is a count of samples out of n
        assert all(abs(v * n - round(v * n)) < 1e-9 for v in row.values())
    for attack in ("fgsm", "pgd"):
        assert summary["robust_accuracy"]["linf:0.2"][attack] <= summary["robust_accuracy"]["linf:0.05"][attack]
    # the tiny MLP is not robust at eps = 0.2: an evaluation that breaks nothing is not evaluating
    assert summary["worst_case"]["linf:0.2"] < summary["worst_case"]["linf:0.05"]


# ------------------------------------------------------------------------------------------------ help, attacks


@pytest.mark.parametrize("command", [[], ["evaluate"], ["runs"], ["demo"]], ids=["bastion", "evaluate", "runs", "demo"])
def test_help_mentions_examples(capsys: pytest.CaptureFixture[str], command: list[str]) -> None:
    rc, out, _ = run_cli(capsys, *command, "--help")
    assert rc == 0
    assert "example" in out.lower()
    assert "usage: bastion" in out


def test_evaluate_help_documents_the_spec_forms(capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, _ = run_cli(capsys, "evaluate", "--help")
    assert rc == 0
    for text in ("bastion evaluate --model", "zoo:NAME@", ".npz", "--attack-opt", "--store", "--plot"):
        assert text in out


def test_evaluate_l0_with_jsma_finishes(capsys: pytest.CaptureFixture[str], digits_mlp_path: Path) -> None:
    """The documented l0 path: ``--norm l0 --attack jsma`` runs to the end (the masking checks included)."""
    rc, out, err = run_cli(capsys, "evaluate", "--model", os.fspath(digits_mlp_path), "--data", "digits",
                           "--limit", "16", "--norm", "l0", "--eps", "2,6", "--attack", "jsma", "--json")  # fmt: skip
    assert rc == 0, err
    summary = json.loads(out)
    assert summary["threats"] == ["l0:2.0", "l0:6.0"]
    assert summary["worst_case"]["l0:6.0"] <= summary["worst_case"]["l0:2.0"] < summary["clean_accuracy"]
    rc, out, _ = run_cli(capsys, "evaluate", "--help")
    assert "l0" in out.split("--norm NORM", 2)[2].split("--eps", 1)[0]


def test_attacks_lists_fgsm_bim_pgd(capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, err = run_cli(capsys, "attacks")
    assert rc == 0, err
    names = [line.split()[0] for line in out.splitlines() if line.strip()]
    assert {"fgsm", "bim", "pgd"} <= set(names)
    rc, out, err = run_cli(capsys, "attacks", "--json")
    assert rc == 0, err
    rows = {row["name"]: row for row in json.loads(out)}
    assert {"fgsm", "bim", "pgd"} <= set(rows)
    assert "linf" in rows["pgd"]["norms"] and "Madry" in rows["pgd"]["paper"]


# ------------------------------------------------------------------------------------------------------ evaluate


def test_evaluate_json(capsys: pytest.CaptureFixture[str], digits_mlp_path: Path) -> None:
    rc, out, err = run_cli(capsys, *evaluate_args(digits_mlp_path, "--json"))
    assert rc == 0, err
    summary = json.loads(out)  # nothing but JSON on stdout
    check_summary(summary)
    assert summary["run_id"] is None  # no store


def test_evaluate_table(capsys: pytest.CaptureFixture[str], digits_mlp_path: Path) -> None:
    rc, out, err = run_cli(capsys, *evaluate_args(digits_mlp_path))
    assert rc == 0, err
    lines = out.splitlines()
    assert lines[0].split() == ["threat", "clean", "fgsm", "pgd", "worst", "case"]
    assert [line.split()[0] for line in lines[2:4]] == EPS_KEYS
    assert "n = 64" in out


def test_zoo_spec_store_runs_and_resume(
    capsys: pytest.CaptureFixture[str], digits_mlp_path: Path, tmp_path: Path
) -> None:
    store = tmp_path / "runs.db"
    args = evaluate_args(f"zoo:mlp@{digits_mlp_path}", "--store", str(store), "--batch-size", "16", "--json")
    rc, out, err = run_cli(capsys, *args)
    assert rc == 0, err
    first = json.loads(out)
    check_summary(first)
    assert first["run_id"] == 1

    # `runs` lists it, `runs show` gives its summary
    rc, out, err = run_cli(capsys, "runs", "--store", str(store))
    assert rc == 0, err
    rows = [line.split() for line in out.splitlines()[1:] if line.strip()]
    assert len(rows) == 1
    assert rows[0][:5] == ["1", "evaluate", "complete", "64", "128"]
    rc, out, err = run_cli(capsys, "runs", "--store", str(store), "show", "1", "--json")
    assert rc == 0, err
    shown = json.loads(out)
    assert shown["id"] == 1 and shown["status"] == "complete" and shown["kind"] == "evaluate"
    assert shown["n_samples"] == 64 and shown["n_records"] == 128
    assert shown["config"]["model_spec"] == f"zoo:mlp@{digits_mlp_path}"
    assert shown["config"]["data_spec"] == "digits"
    assert shown["summary"] == first
    rc, out, err = run_cli(capsys, "runs", "--store", str(store), "show", "1")
    assert rc == 0, err
    assert "complete" in out and "linf:0.05" in out
    rc, out, err = run_cli(capsys, "runs", "--store", str(store), "show", shown["key"], "--json")
    assert rc == 0, err
    assert json.loads(out)["id"] == 1
    rc, out, err = run_cli(capsys, "runs", "--store", str(store), "--json")
    assert rc == 0, err
    (listed,) = json.loads(out)
    assert listed["id"] == 1 and listed["status"] == "complete" and listed["n_records"] == 128

    with Store(store) as db:
        before = db.records(1)

    # the same command again resumes the finished run: same run, same numbers, nothing recomputed or duplicated
    rc, out, err = run_cli(capsys, *args)
    assert rc == 0, err
    second = json.loads(out)
    for key in ("n", "clean_accuracy", "threats", "attacks", "robust_accuracy", "worst_case", "run_id"):
        assert second[key] == first[key], key
    with Store(store) as db:
        runs = db.runs()
        assert [r.id for r in runs] == [1]
        assert runs[0].status == "complete"
        after = db.records(1)
    assert len(after) == 64 * len(EPS_KEYS)
    assert len({(r.threat, r.index) for r in after}) == len(after)
    assert {(r.threat, r.index) for r in after} == {(t, i) for t in EPS_KEYS for i in range(64)}
    # per-sample seconds are measured wall times: equal records mean no batch was run again
    assert after == before


def test_saved_file_and_zoo_spec_agree(capsys: pytest.CaptureFixture[str], digits_mlp_path: Path) -> None:
    rc, out, err = run_cli(capsys, *evaluate_args(digits_mlp_path, "--json"))
    assert rc == 0, err
    plain = json.loads(out)
    rc, out, err = run_cli(capsys, *evaluate_args(f"zoo:mlp@{digits_mlp_path}", "--json"))
    assert rc == 0, err
    zoo = json.loads(out)
    assert zoo["robust_accuracy"] == plain["robust_accuracy"]
    assert zoo["clean_accuracy"] == plain["clean_accuracy"]


def test_plot_writes_png(capsys: pytest.CaptureFixture[str], digits_mlp_path: Path, tmp_path: Path) -> None:
    plot = tmp_path / "out.png"
    rc, out, err = run_cli(capsys, *evaluate_args(digits_mlp_path, "--plot", str(plot), "--json"))
    assert rc == 0, err
    json.loads(out)
    assert plot.read_bytes()[:8] == PNG_MAGIC
    assert plot.stat().st_size > 1000


@pytest.mark.parametrize("dtype", ["uint8", "float32"])
def test_npz_data(capsys: pytest.CaptureFixture[str], digits_mlp_path: Path, tmp_path: Path, dtype: str) -> None:
    digits = load_digits()
    x = digits.x[:64].numpy()
    y = digits.y[:64].numpy()
    if dtype == "uint8":
        x = np.round(x * 255).astype(np.uint8)[:, 0]  # (N, H, W) grey images, 0..255
    path = tmp_path / f"digits-{dtype}.npz"
    np.savez(path, x=x, y=y)
    rc, out, err = run_cli(capsys, *evaluate_args(digits_mlp_path, "--json", data=str(path)))
    assert rc == 0, err
    summary = json.loads(out)
    check_summary(summary)
    if dtype == "float32":
        # the very same tensors as `--data digits --limit 64`: the same (seeded) evaluation, the same numbers
        rc, out, err = run_cli(capsys, *evaluate_args(digits_mlp_path, "--json"))
        assert rc == 0, err
        reference = json.loads(out)
        for key in ("clean_accuracy", "robust_accuracy", "worst_case"):
            assert summary[key] == reference[key], key


# ---------------------------------------------------------------------------------------------------- bad input


def _bad_input_cases(tmp: Path, model: Path) -> dict[str, tuple[list[str], list[str]]]:
    """name -> (argv, strings the error line must contain)."""
    bad = tmp / "pixels255.npz"
    rng = np.random.default_rng(0)
    np.savez(bad, x=(rng.random((16, 1, 8, 8)) * 255).astype(np.float32), y=np.arange(16) % 10)
    base = ["evaluate", "--model", str(model), "--data", "digits", "--limit", "16"]
    return {
        "missing-model": (
            ["evaluate", "--model", str(tmp / "missing.pt"), "--data", "digits", "--eps", "0.1"],
            ["missing.pt", "not found"],
        ),
        "wrong-zoo-arch": ([*base, "--eps", "0.1", "--model", f"zoo:cnn@{model}"], ["'mlp'", "zoo:mlp@"]),
        "unknown-attack": ([*base, "--eps", "0.1", "--attack", "fgsm,nosuchattack"], ["nosuchattack", "pgd"]),
        "unknown-norm": ([*base, "--eps", "0.1", "--norm", "l7"], ["unknown norm", "'l7'", "linf"]),
        "negative-eps": ([*base, "--eps=0.1,-0.2"], ["eps", "-0.2", ">= 0"]),
        "option-no-attack-takes": (
            [*base, "--eps", "0.1", "--attack", "fgsm", "--attack-opt", "steps=5"],
            ["steps", "fgsm"],
        ),
        "unknown-option-of-one-attack": (
            [*base, "--eps", "0.1", "--attack", "pgd", "--attack-opt", "pgd.nosuchoption=1"],
            ["nosuchoption", "steps"],
        ),
        "option-for-absent-attack": (
            [*base, "--eps", "0.1", "--attack", "fgsm", "--attack-opt", "pgd.steps=5"],
            ["pgd.steps", "fgsm"],
        ),
        "data-outside-domain": (
            ["evaluate", "--model", str(model), "--data", str(bad), "--eps", "0.1"],
            ["pixels255.npz", "[0, 1]", "255"],
        ),
        "missing-data-file": (
            ["evaluate", "--model", str(model), "--data", str(tmp / "nodata.npz"), "--eps", "0.1"],
            ["nodata.npz", "no such file"],
        ),
        "missing-store": (["runs", "--store", str(tmp / "nostore.db")], ["nostore.db", "--store"]),
        "missing-run": (["runs", "--store", str(tmp / "nostore.db"), "show", "1"], ["nostore.db"]),
    }


BAD_INPUT = [
    "missing-model",
    "wrong-zoo-arch",
    "unknown-attack",
    "unknown-norm",
    "negative-eps",
    "option-no-attack-takes",
    "unknown-option-of-one-attack",
    "option-for-absent-attack",
    "data-outside-domain",
    "missing-data-file",
    "missing-store",
    "missing-run",
]


@pytest.mark.parametrize("case", BAD_INPUT)
def test_bad_input_exits_2_with_one_line(
    capsys: pytest.CaptureFixture[str], digits_mlp_path: Path, tmp_path: Path, case: str
) -> None:
    argv, needles = _bad_input_cases(tmp_path, digits_mlp_path)[case]
    rc, out, err = run_cli(capsys, *argv)
    assert_one_line_error(rc, err, argv[0], *needles)
    assert out == ""


def test_show_unknown_run_in_existing_store(
    capsys: pytest.CaptureFixture[str], digits_mlp_path: Path, tmp_path: Path
) -> None:
    store = tmp_path / "runs.db"
    rc, _, err = run_cli(capsys, *evaluate_args(digits_mlp_path, "--store", str(store), "--json"))
    assert rc == 0, err
    rc, _, err = run_cli(capsys, "runs", "--store", str(store), "show", "7")
    assert_one_line_error(rc, err, "runs", "7", str(store))


# ---------------------------------------------------------------------------- regressions of bugs found in review


def _evaluate_no_traceback(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    try:
        return run_cli(capsys, *argv)
    except Exception as exc:  # the user would see a traceback
        pytest.fail(f"bastion {argv[0]} raised {type(exc).__name__}: {exc}")


@pytest.mark.parametrize(
    "limit",
    [
        "-1790",
        "0",
    ],
)
def test_limit_must_be_positive(capsys: pytest.CaptureFixture[str], digits_mlp_path: Path, limit: str) -> None:
    argv = ["evaluate", "--model", str(digits_mlp_path), "--data", "digits", "--eps", "0.1", f"--limit={limit}"]
    rc, _, err = _evaluate_no_traceback(capsys, *argv)
    assert_one_line_error(rc, err, "evaluate", "limit")


def test_unknown_device_is_a_one_line_error(capsys: pytest.CaptureFixture[str], digits_mlp_path: Path) -> None:
    argv = ["evaluate", "--model", str(digits_mlp_path), "--data", "digits", "--limit", "8", "--eps", "0.1"]
    rc, _, err = _evaluate_no_traceback(capsys, *argv, "--device", "nosuchdevice")
    assert_one_line_error(rc, err, "evaluate", "nosuchdevice")


@pytest.mark.parametrize(
    "name",
    [
        "no/such/folder/p.png",
        "plot.nosuchformat",
    ],
)
def test_bad_plot_path(capsys: pytest.CaptureFixture[str], digits_mlp_path: Path, tmp_path: Path, name: str) -> None:
    plot = tmp_path / name
    argv = ["evaluate", "--model", str(digits_mlp_path), "--data", "digits", "--limit", "8", "--eps", "0.1"]
    rc, _, err = _evaluate_no_traceback(capsys, *argv, "--attack", "fgsm", "--plot", str(plot))
    if rc == 0:  # creating the missing folder is a fix too
        assert plot.read_bytes()[:8] == PNG_MAGIC
    else:
        assert_one_line_error(rc, err, "evaluate", name.split("/")[-1])


def test_npz_with_fewer_classes_than_the_model(
    capsys: pytest.CaptureFixture[str], digits_mlp_path: Path, tmp_path: Path
) -> None:
    digits = load_digits()
    keep = (digits.y < 5).numpy()
    path = tmp_path / "digits-0-4.npz"
    np.savez(path, x=digits.x.numpy()[keep][:64], y=digits.y.numpy()[keep][:64])
    rc, out, err = run_cli(capsys, *evaluate_args(digits_mlp_path, "--json", data=str(path)))
    assert rc == 0, err
    assert json.loads(out)["clean_accuracy"] >= 0.9


def test_boolean_attack_option_false(capsys: pytest.CaptureFixture[str], digits_mlp_path: Path, tmp_path: Path) -> None:
    store = tmp_path / "runs.db"
    argv = ["evaluate", "--model", str(digits_mlp_path), "--data", "digits", "--limit", "8", "--eps", "0.1"]
    rc, _, err = run_cli(capsys, *argv, "--attack", "pgd", "--attack-opt", "random_start=false", "--store", str(store))
    if rc == 2:  # refusing the value is a fix too
        assert_one_line_error(rc, err, "evaluate", "random_start")
        return
    assert rc == 0, err
    with Store(store) as db:
        (run,) = db.runs()
    assert "random_start=False" in run.config["attacks"][0]


def test_console_script_reports_errors_in_one_line(tmp_path: Path) -> None:
    """The installed ``bastion`` entry point in a fresh process: exit status 2 and one clean line on stderr."""
    script = Path(sys.executable).with_name("bastion")
    cmd = [str(script)] if script.is_file() else [sys.executable, "-m", "bastion.cli"]
    missing = tmp_path / "missing.pt"
    proc = subprocess.run(
        [*cmd, "evaluate", "--model", str(missing), "--data", "digits", "--eps", "0.1"],
        capture_output=True, text=True, timeout=120, cwd=tmp_path,
        env={**os.environ, "BASTION_CACHE": str(tmp_path / "cache")},
    )  # fmt: skip
    assert proc.stdout == ""
    assert_one_line_error(proc.returncode, proc.stderr, "evaluate", str(missing), "not found")


# ---------------------------------------------------------------------------------------------------------- demo


def check_demo(out_dir: Path, stdout: str) -> dict:
    summary = json.loads(stdout)
    assert summary["clean_accuracy"] >= 0.9
    assert summary["n"] == 360  # the held-out 20 % of 1797
    assert summary["threats"] == ["linf:0.1"] and summary["attacks"] == ["fgsm", "pgd"]
    row = summary["robust_accuracy"]["linf:0.1"]
    assert row["pgd"] <= row["fgsm"] <= summary["clean_accuracy"]
    assert (out_dir / "robust_accuracy.png").read_bytes()[:8] == PNG_MAGIC
    with Store(out_dir / "runs.db") as db:
        (run,) = db.runs()
        assert run.status == "complete" and run.n_records == 360
        assert run.summary is not None and run.summary["robust_accuracy"] == summary["robust_accuracy"]
    return summary


def test_demo_uses_the_cached_model(
    capsys: pytest.CaptureFixture[str], digits_mlp_path: Path, bastion_cache: Path, tmp_path: Path
) -> None:
    """With a model in the cache the demo loads it instead of training (fast); it still writes the store and plot."""
    bastion_cache.mkdir()
    (bastion_cache / "digits-cnn.pt").write_bytes(digits_mlp_path.read_bytes())
    out_dir = tmp_path / "demo"
    rc, out, err = run_cli(capsys, "demo", "--out", str(out_dir), "--eps", "0.1", "--json")
    assert rc == 0, err
    check_demo(out_dir, out)
    assert sorted(p.name for p in bastion_cache.iterdir()) == ["digits-cnn.pt"]


def test_demo_trains_caches_and_evaluates(
    capsys: pytest.CaptureFixture[str], bastion_cache: Path, tmp_path: Path
) -> None:
    """The whole demo from an empty cache: trains the zoo CNN (about 10 s on one thread), caches it, evaluates."""
    out_dir = tmp_path / "demo"
    rc, out, err = run_cli(capsys, "demo", "--out", str(out_dir), "--eps", "0.1", "--json")
    assert rc == 0, err
    check_demo(out_dir, out)
    assert (bastion_cache / "digits-cnn.pt").is_file()


def test_preset_cascade_with_per_attack_options(capsys: pytest.CaptureFixture[str], digits_mlp_path: Path) -> None:
    argv = ["evaluate", "--model", str(digits_mlp_path), "--data", "digits", "--limit", "16", "--eps", "0.1"]
    opts = ["--attack-opt", "apgd.steps=5", "--attack-opt", "apgd-t.steps=5", "--attack-opt", "n_target_classes=2"]
    rc, out, err = run_cli(capsys, *argv, "--attack", "rapid", *opts, "--json")
    assert rc == 0, err
    assert json.loads(out)["attacks"] == ["apgd", "apgd-t"]


# ------------------------------------------------------------------------------------------------ black box
def test_evaluate_through_a_black_box_counts_queries_and_plots_them(
    capsys: pytest.CaptureFixture[str], digits_mlp_path: Path, tmp_path: Path
) -> None:
    fig = tmp_path / "queries.png"
    base = ["evaluate", "--model", os.fspath(digits_mlp_path), "--data", "digits", "--limit", "24", "--eps", "0.3"]
    rc, out, err = run_cli(capsys, *base, "--black-box", "scores", "--query-budget", "200", "--attack", "simba",
                           "--plot-queries", os.fspath(fig), "--json")  # fmt: skip
    assert rc == 0, err
    got = json.loads(out)
    q = got["queries"]["linf:0.3"]
    assert 1 < q["median"] <= 1 + 200 and q["broken"] >= 1 and fig.stat().st_size > 0
    # labels only: the gradient attack is crafted on the surrogate and judged on the model's labels
    rc, out, err = run_cli(capsys, *base, "--black-box", "labels", "--surrogate", os.fspath(digits_mlp_path),
                           "--attack", "mi-fgsm", "--json")  # fmt: skip
    assert rc == 0, err
    assert json.loads(out)["worst_case"]["linf:0.3"] < 1.0
    rc, _, err = run_cli(capsys, *base, "--black-box", "labels", "--attack", "pgd")
    assert_one_line_error(rc, err, "evaluate", "white-box")
    rc, _, err = run_cli(capsys, *base, "--query-budget", "10", "--attack", "simba")
    assert_one_line_error(rc, err, "evaluate", "--black-box")


def test_attacks_lists_the_data_level_attacks_wrappers_and_other_modalities(
    capsys: pytest.CaptureFixture[str],
) -> None:
    rc, out, _ = run_cli(capsys, "attacks", "--json")
    assert rc == 0
    rows = {r["name"]: r for r in json.loads(out)}
    for name, command in [("uap", "bastion universal"), ("patch", "bastion patch"), ("eot", "--eot"),
                          ("bpda", "--bpda"), ("textfooler", "bastion text attack"),
                          ("pointadd", "bastion pointcloud attack"), ("audiocw", "bastion audio attack")]:  # fmt: skip
        assert command in rows[name]["run"], name
    assert rows["pgd"]["run"] == "bastion evaluate --attack pgd"


def test_evaluate_reaches_the_flow_threat_and_the_wrappers(
    capsys: pytest.CaptureFixture[str], digits_mlp_path: Path, tmp_path: Path
) -> None:
    base = ["evaluate", "--model", os.fspath(digits_mlp_path), "--data", "digits", "--limit", "24", "--json"]
    rc, out, err = run_cli(capsys, *base, "--threat", "flow:0.5", "--attack", "stadv", "--attack-opt", "steps=20")
    assert rc == 0, err
    assert json.loads(out)["threats"] == ["flow:0.5"]
    prep = tmp_path / "prep.py"
    prep.write_text(
        "import torch\n\ndef calls(x):\n    calls.n = getattr(calls, 'n', 0) + 1\n    return torch.round(x * 4) / 4\n"
    )
    rc, out, err = run_cli(capsys, *base, "--eps", "0.2", "--attack", "fgsm", "--bpda", f"{prep}:calls", "--eot", "2")
    assert rc == 0, err
    # the evaluated model is the MLP behind the quantisation: its clean accuracy is that of model(round(4x) / 4)
    import torch

    from bastion.data import load_digits
    from bastion.models import load_model

    data = load_digits().subset(slice(0, 24))
    model = load_model(os.fspath(digits_mlp_path), input_shape=data.feature_shape, num_classes=10)
    with torch.no_grad():
        expected = float((model(torch.round(data.x * 4) / 4).argmax(1) == data.y).float().mean())
    summary = json.loads(out)
    assert summary["clean_accuracy"] == pytest.approx(expected)
    assert summary["worst_case"]["linf:0.2"] <= summary["clean_accuracy"]


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ([], "give the radii with --eps"),
        (["--threat", "flow"], "expected NORM:EPS"),
        (["--threat", "flow:0.5", "--eps", "0.1"], "not both"),
        (["--eps", "0.1", "--bpda", "nosuchmodule:f"], "nosuchmodule"),
        (["--eps", "0.1", "--eot", "0"], "expected a positive integer"),
    ],
)
def test_evaluate_threat_and_wrapper_errors(
    capsys: pytest.CaptureFixture[str], digits_mlp_path: Path, extra: list[str], message: str
) -> None:
    rc, _, err = run_cli(capsys, "evaluate", "--model", os.fspath(digits_mlp_path), "--data", "digits", *extra)
    assert rc == 2 and message in err and len(err.strip().splitlines()) == 1
