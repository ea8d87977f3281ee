"""The HTML report: built from a store filled by real commands on the digits data, read back and compared with it.

The store is made once per module by ``bastion train``, ``evaluate``, ``certify`` and ``assess`` (in-process, on a
few samples); every number the page shows is checked against the store, and a headless Chromium (the Debian
package; skipped where it is absent) loads the page and measures every figure.
"""

from __future__ import annotations

import math
import statistics
from collections import Counter
from pathlib import Path

import pytest
from tests.report.page import CHROMIUM, parse_page, render

from bastion.cli import main
from bastion.errors import InputError
from bastion.report.html import masking_explanations, write_report
from bastion.results import SampleRecord
from bastion.store import RunInfo, Store

EVAL_EPS = (0.05, 0.1)
CERT_EPS = 0.02


def _cli(*argv: str) -> None:
    assert main(list(argv)) == 0, argv


@pytest.fixture(scope="module")
def store_path(digits_mlp_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A store holding a training run and, for the session MLP on the first 16 digits: evaluate, certify, assess."""
    folder = tmp_path_factory.mktemp("report-store")
    db = folder / "runs.db"
    model = str(digits_mlp_path)
    common = ["--data", "digits", "--store", str(db), "--json"]
    _cli("train", "--objective", "pgd-at", "--objective-opt", "steps=1", "--eps", "0.1", "--data", "digits",
         "--limit", "120", "--arch", "mlp", "--epochs", "2", "--batch-size", "40", "--validation-fraction", "0.25",
         "--out", str(folder / "trained.pt"), "--store", str(db), "--json")  # fmt: skip
    _cli("evaluate", "--model", model, "--limit", "16", "--eps", ",".join(map(str, EVAL_EPS)), "--attack",
         "fgsm,pgd", "--attack-opt", "pgd.steps=5", *common)  # fmt: skip
    _cli("certify", "--model", model, "--limit", "16", "--eps", str(CERT_EPS), "--method", "crown", *common)
    _cli("assess", "--model", model, "--limit", "8", "--eps", "0.05", "--budget", "0", "--attack", "pgd",
         "--attack-opt", "steps=5", "--minimal-attack", "fab", "--methods", "ibp,crown", *common)  # fmt: skip
    return db


@pytest.fixture(scope="module")
def report(store_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    result = write_report(store_path, tmp_path_factory.mktemp("report") / "out")
    assert result.paths == [result.index] and result.index.name == "index.html"
    assert len(result.runs) == 4 and result.figures >= 8
    return result.index


def _runs(store_path: Path) -> dict[str, RunInfo]:
    with Store(store_path) as store:
        return {r.kind: r for r in store.runs()}


def test_every_run_and_its_fingerprints_are_shown(store_path: Path, report: Path) -> None:
    page = parse_page(report)
    with Store(store_path) as store:
        runs = store.runs()
        assert [int(a["data-run-id"]) for a, _ in page.tables["runs"].rows if "data-run-id" in a] == [
            r.id for r in runs
        ]
        for run in runs:
            info = page.tables[f"run-{run.id}-info"].kv()
            assert info["model_fp"].text == run.model_fp and info["data_fp"].text == run.data_fp
            assert info["key"].text == run.key and info["kind"].text == run.kind
            assert info["n_samples"].number() == run.n_samples and info["n_records"].number() == run.n_records
            assert info["seconds"].number() == run.seconds
            config = page.tables[f"run-{run.id}-config"].kv()
            assert config  # the configuration is listed, key by key
            if "model_spec" in run.config:
                assert config["model_spec"].text == run.config["model_spec"]
            if run.summary:
                shown = page.tables[f"run-{run.id}-summary"].kv()
                for key, value in run.summary.items():
                    if isinstance(value, float):
                        assert shown[key].number() == value, (run.kind, key)
        trained = next(r for r in runs if r.kind == "train")
        # lineage: the runs of the model the training produced are not linked (another model), fingerprints differ
        assert trained.summary is not None and "final_model_fp" in trained.summary


def test_cascade_table_equals_the_stored_summary(store_path: Path, report: Path) -> None:
    run = _runs(store_path)["evaluate"]
    page = parse_page(report)
    table = page.tables[f"run-{run.id}-cascade"].by("data-threat")
    summary = run.summary
    assert list(table) == summary["threats"] == [f"linf:{e!r}" for e in EVAL_EPS]
    for threat, cells in table.items():
        assert cells["clean"].number() == summary["clean_accuracy"]
        for attack in summary["attacks"]:
            value = summary["robust_accuracy"][threat][attack]
            assert cells[attack].number() == value and cells[attack].text == f"{100 * value:.2f} %"
        assert cells["worst"].number() == summary["worst_case"][threat]
    assert f"run-{run.id}-cascade-fig" in page.ids


def test_outcomes_samples_and_brackets_equal_the_records(store_path: Path, report: Path) -> None:
    page = parse_page(report)
    with Store(store_path) as store:
        for run in store.runs():
            records = store.records(run.id)
            if not records:
                assert f"run-{run.id}-outcomes" not in page.tables
                continue
            outcomes = page.tables[f"run-{run.id}-outcomes"].by("data-threat")
            for threat in {r.threat for r in records}:
                mine = [r for r in records if r.threat == threat]
                counts = Counter(r.status for r in mine)
                for status in ("robust", "falsified", "unknown"):
                    assert outcomes[threat][status].number() == counts[status]
                assert outcomes[threat]["total"].number() == len(mine)
                assert outcomes[threat]["max_seconds"].number() == max(r.seconds for r in mine)
            shown = page.tables[f"run-{run.id}-samples"].records()
            assert len(shown) == len(records)
            for row, rec in zip(shown, records, strict=True):
                assert row["index"].number() == rec.index and row["threat"].text == rec.threat
                assert row["status"].text == rec.status and row["label"].number() == rec.label
                assert row["certified"].number() == rec.certified
                assert row["adv_distance"].number() == rec.adv_distance
            bracket = page.tables[f"run-{run.id}-bracket"].by("data-family")
            correct = [r for r in records if r.clean_pred == r.label]
            cert = [max(r.certified for r in correct if r.index == i and r.certified is not None)
                    for i in sorted({r.index for r in correct if r.certified is not None})]  # fmt: skip
            found = [min(r.adv_distance for r in correct if r.index == i and r.adv_distance is not None)
                     for i in sorted({r.index for r in correct if r.adv_distance is not None})]  # fmt: skip
            row = bracket["linf"]
            assert row["correct"].number() == len({r.index for r in correct})
            assert row["n_certified"].number() == len(cert) and row["n_found"].number() == len(found)
            assert row["median_certified"].number() == (statistics.median(cert) if cert else None)
            assert row["median_found"].number() == (statistics.median(found) if found else None)
            assert row["contradictions"].number() == 0


def test_assess_bracket_holds_and_the_run_pair_is_merged(store_path: Path, report: Path) -> None:
    """Certified radii never exceed distances found, in assess and across the evaluate + certify pair."""
    runs = _runs(store_path)
    page = parse_page(report)
    with Store(store_path) as store:
        rec = store.records(runs["assess"].id)
        assert any(r.certified is not None and r.adv_distance is not None for r in rec)
        for r in rec:
            if r.certified is not None and r.adv_distance is not None:
                assert r.certified <= r.adv_distance * (1 + 1e-5)
    # evaluate and certify share the model and the data: one combined bracket with both ends from different runs
    combined = [i for i in page.ids if i.startswith("combined-") and i.endswith("-bracket")]
    assert combined, "the evaluate and certify runs of one model should be merged into one bracket"
    ids = {int(x) for x in page.ids[combined[0].removesuffix("-bracket")]["data-runs"].split(", ")}
    assert {runs["evaluate"].id, runs["certify"].id} <= ids
    row = page.tables[combined[0]].by("data-family")["linf"]
    assert row["n_both"].number() > 0 and row["contradictions"].number() == 0


def test_training_curves_equal_the_stored_epochs(store_path: Path, report: Path) -> None:
    run = _runs(store_path)["train"]
    page = parse_page(report)
    with Store(store_path) as store:
        epochs = store.epochs(run.id)
    rows = page.tables[f"run-{run.id}-epochs"].records()
    assert len(rows) == len(epochs) == 2
    for row, epoch in zip(rows, epochs, strict=True):
        for key in ("epoch", "loss", "train_acc", "val_clean_acc", "val_robust_acc", "lr", "seconds"):
            assert row[key].number() == epoch[key], key
    assert f"run-{run.id}-epochs-fig" in page.ids


def test_gallery_shows_the_closest_adversarial_examples(store_path: Path, report: Path) -> None:
    run = _runs(store_path)["evaluate"]
    page = parse_page(report)
    gallery = page.tables[f"run-{run.id}-gallery"]
    rows = gallery.records()
    with Store(store_path) as store:
        hits = sorted(
            (r for r in store.records(run.id) if r.clean_pred == r.label and (r.adv_distance or 0) > 0),
            key=lambda r: (r.adv_distance, r.index),
        )
    assert rows and rows[0]["adv_distance"].number() == hits[0].adv_distance
    distances = [r["adv_distance"].number() for r in rows]
    assert distances == sorted(distances)
    # the original inputs are shown (the digits data is loaded again and matches the stored fingerprint) ...
    assert gallery.images == len(rows)
    # ... and the page says that the adversarial inputs themselves are not in the store
    assert "not the adversarial input itself" in "".join(page.all_text)


def test_regenerated_adversarial_examples_lie_in_the_ball(store_path: Path, tmp_path: Path) -> None:
    """Regenerated examples: inside the ball for the fixed-eps attacks, at the stored distance for assess's FAB."""
    runs = _runs(store_path)
    evaluate, assess = runs["evaluate"], runs["assess"]
    result = write_report(store_path, tmp_path, runs=[evaluate.id, assess.id], gallery=3, regenerate=True)
    page = parse_page(result.index)
    with Store(store_path) as store:
        broken = {r.index for r in store.records(evaluate.id) if r.clean_pred == r.label and (r.adv_distance or 0) > 0}
    rows = page.tables[f"run-{evaluate.id}-gallery"].records()
    assert len(rows) == min(3, len(broken)) > 0
    assert page.tables[f"run-{evaluate.id}-gallery"].images == 3 * len(rows)  # original, adversarial, difference
    for row in rows:
        eps = float(row["threat"].text.split(":")[1])
        assert 0 < row["regenerated_distance"].number() <= eps * (1 + 1e-5)
    rows = page.tables[f"run-{assess.id}-gallery"].records()
    assert len(rows) == 3
    for row in rows:
        assert row["regenerated_distance"].number() == pytest.approx(row["adv_distance"].number(), rel=1e-3)


def test_warnings_are_explained_in_plain_words(tmp_path: Path) -> None:
    explain = masking_explanations()
    for code in ("random-outputs", "softmax-outputs", "zero-gradients", "nonfinite-gradients", "flat-in-eps",
                 "black-box-beats-white-box", "unbounded-not-zero"):  # fmt: skip
        assert len(explain[code]) > 40 and "``" not in explain[code], code
    db = tmp_path / "w.db"
    with Store(db) as store:
        run, _ = store.open_run(kind="evaluate", key="k1", config={"note": "<script>alert(1)</script>"},
                                model_fp="m", data_fp="d", n_samples=1)  # fmt: skip
        store.add_warning(run.id, "zero-gradients", "gradients are zero for 3 of 8 inputs & more")
        store.write_records(run.id, [SampleRecord(0, "linf:0.1", 1, 1, "unknown")], seconds=0.1)
    out = write_report(db, tmp_path / "r").index
    text = out.read_text()
    assert "<script>" not in text and "&lt;script&gt;alert(1)&lt;/script&gt;" in text
    page = parse_page(out)
    words = page.text_by_id[f"run-{run.id}-warnings"]
    assert "gradients are zero for 3 of 8 inputs & more" in words
    assert "BPDA" in words  # the explanation of the zero-gradients check, from bastion.masking
    assert "not complete" in "".join(page.all_text)  # the run was never finished


def test_a_contradicting_bracket_is_flagged(tmp_path: Path) -> None:
    """A certified radius above a distance found (one method unsound) is shown as an error, not averaged away."""
    db = tmp_path / "c.db"
    with Store(db) as store:
        a, _ = store.open_run(kind="evaluate", key="a", config={}, model_fp="m", data_fp="d", n_samples=2)
        b, _ = store.open_run(kind="certify", key="b", config={}, model_fp="m", data_fp="d", n_samples=2)
        found = SampleRecord(0, "linf:0.1", 1, 1, "falsified", adv_distance=0.05, attack="pgd")
        store.write_records(a.id, [found, SampleRecord(1, "linf:0.1", 2, 2, "unknown")])
        proved = [SampleRecord(i, "linf:0.02", i + 1, i + 1, "robust", certified=c, attack="crown")
                  for i, c in enumerate((0.08, 0.03))]  # fmt: skip
        store.write_records(b.id, proved)
        t, _ = store.open_run(kind="train", key="t", config={}, model_fp="init", data_fp="train", n_samples=9)
        store.finish_run(t.id, {"final_model_fp": "m", "train_acc": 0.5})
    page = parse_page(write_report(db, tmp_path / "r", gallery=0).index)
    # lineage: both runs used the weights the training run produced
    assert page.tables[f"run-{a.id}-info"].kv()["trained_by_run"].text == str(t.id)
    assert "trained_by_run" not in page.tables[f"run-{t.id}-info"].kv()
    row = page.tables["combined-0-bracket"].by("data-family")["linf"]
    assert row["contradictions"].number() == 1 and row["n_both"].number() == 1
    assert row["median_certified"].number() == statistics.median([0.08, 0.03])
    assert any("unsound" in t for t in page.all_text)


def test_bad_input_is_one_clear_error(store_path: Path, tmp_path: Path) -> None:
    missing = tmp_path / "none.db"
    with pytest.raises(InputError, match="no result store"):
        write_report(missing, tmp_path / "r")
    assert not missing.exists()  # never created by the report
    empty = tmp_path / "empty.db"
    Store(empty).close()
    with pytest.raises(InputError, match="holds no runs"):
        write_report(empty, tmp_path / "r")
    with pytest.raises(InputError, match="no run 999"):
        write_report(store_path, tmp_path / "r", runs=[999])
    (tmp_path / "file").write_text("x")
    with pytest.raises(InputError, match="is a file"):
        write_report(store_path, tmp_path / "file")
    with pytest.raises(InputError, match="gallery"):
        write_report(store_path, tmp_path / "r", gallery=-1)


# ----------------------------------------------------------------------------------------------------- browser
def _need_chromium() -> None:
    if not Path(CHROMIUM).exists():
        pytest.skip(f"headless Chromium is not installed at {CHROMIUM} (Debian: apt-get install -y chromium)")


def test_the_page_renders_in_a_browser(report: Path) -> None:
    _need_chromium()
    page = render(report)
    assert page.errors == []
    assert page.requests == []  # self-contained: nothing is fetched from anywhere
    assert len(page.figures) >= 8
    for fig in page.figures:
        assert fig["complete"] and fig["natural"] and fig["natural"] > 0, fig
        assert fig["width"] > 0 and fig["height"] > 0, fig


def test_the_browser_check_sees_broken_pages(tmp_path: Path) -> None:
    """The same check fails on a page with a console error, a broken image and an outside request."""
    _need_chromium()
    bad = tmp_path / "bad.html"
    bad.write_text(
        '<!DOCTYPE html><html><body><img alt="broken" src="data:image/png;base64,AAAA">'
        '<script>console.error("boom")</script><img alt="far" src="http://127.0.0.1:9/x.png"></body></html>'
    )
    page = render(bad)
    assert any("boom" in e for e in page.errors)
    assert page.requests == ["http://127.0.0.1:9/x.png"]
    broken = next(f for f in page.figures if f["alt"] == "broken")
    assert not broken["natural"]
    assert math.isfinite(broken["width"])
