"""Evaluation: the cascade on still-robust points, several radii sharing work, records, the store and resume."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from bastion.attacks import BIM, FGSM, PGD
from bastion.data import Dataset, load_digits
from bastion.defenses.training import train
from bastion.errors import InputError
from bastion.evaluate import CLEAN, attack_names, evaluate, summarize
from bastion.models import build_model
from bastion.store import Store
from bastion.threat import LpBall


@pytest.fixture(scope="module")
def setup() -> tuple[nn.Module, Dataset]:
    train_set, test_set = load_digits().train_test_split(test_fraction=0.2, seed=1)
    torch.manual_seed(1)
    model = build_model("mlp", train_set.feature_shape, 10, hidden=(48,))
    train(model, train_set, epochs=10, lr=3e-3, seed=0, progress=False)
    return model, test_set.subset(slice(0, 150))


EPS = (0.03, 0.08, 0.15)


def test_cascade_summary_is_consistent_with_records(setup) -> None:
    model, data = setup
    threats = [LpBall("linf", e) for e in EPS]
    res = evaluate(model, data, threats, [FGSM(), PGD(steps=15)], batch_size=64, progress=False)
    assert res.n == len(data) and len(res.records) == len(data) * len(EPS)
    with torch.no_grad():
        clean = (model(data.x).argmax(1) == data.y).float().mean().item()
    assert res.clean_accuracy == pytest.approx(clean)
    prev_worst = 1.0
    for t in threats:
        accs = [res.robust_accuracy[t.key][a] for a in res.attacks]
        assert accs == sorted(accs, reverse=True)  # the cascade only ever removes points
        assert res.worst_case[t.key] == accs[-1] <= res.clean_accuracy
        assert res.worst_case[t.key] <= prev_worst  # non-increasing in eps (carried adversarial examples)
        prev_worst = res.worst_case[t.key]
        recs = [r for r in res.records if r.threat == t.key]
        for r in recs:
            if r.clean_pred != r.label:
                assert r.status == "falsified" and r.attack == CLEAN and r.adv_distance == 0.0
            elif r.status == "falsified":
                assert r.attack in res.attacks and 0.0 < r.adv_distance <= t.eps * (1 + 1e-5) + 1e-6
            else:
                assert r.status == "unknown" and r.adv_distance is None and r.attack is None
    assert res.worst_case[threats[-1].key] < res.clean_accuracy - 0.2  # the attacks actually work here
    assert "worst case" in res.table()


def test_shared_radii_are_never_weaker_than_separate_runs(setup) -> None:
    # FGSM and BIM are deterministic, so per sample: whatever a separate run at one radius breaks, the shared run
    # breaks too (and possibly more, through adversarial examples carried over from smaller radii).
    model, data = setup
    attacks = [FGSM(), BIM(steps=10)]
    threats = [LpBall("linf", e) for e in EPS]
    shared = evaluate(model, data, threats, attacks, progress=False)
    for t in threats:
        alone = evaluate(model, data, [t], attacks, progress=False)
        broken_shared = {r.index for r in shared.records if r.threat == t.key and r.status == "falsified"}
        broken_alone = {r.index for r in alone.records if r.status == "falsified"}
        assert broken_alone <= broken_shared
        assert shared.worst_case[t.key] <= alone.worst_case[t.key]


def test_shared_radii_save_attack_work(setup, monkeypatch) -> None:
    model, data = setup
    calls: list[int] = []
    original = PGD.__call__

    def counting(self, model, x, y, **kw):  # type: ignore[no-untyped-def]
        calls.append(int(x.shape[0]))
        return original(self, model, x, y, **kw)

    monkeypatch.setattr(PGD, "__call__", counting)
    evaluate(model, data, [LpBall("linf", e) for e in (0.1, 0.2)], [PGD(steps=5)], progress=False)
    # at 0.2 only the samples PGD did not break at 0.1 are attacked again
    res01 = evaluate(model, data, [LpBall("linf", 0.1)], [PGD(steps=5)], progress=False)
    broken_at_01 = sum(r.status == "falsified" and r.attack == "pgd" for r in res01.records)
    correct = sum(r.clean_pred == r.label for r in res01.records)
    assert calls[0] == correct and calls[1] == correct - broken_at_01


def test_store_resume_skips_done_samples_and_counts_once(setup, tmp_path) -> None:
    model, data = setup
    threats = [LpBall("linf", e) for e in (0.05, 0.1)]
    attacks = [FGSM(), PGD(steps=5)]
    db = tmp_path / "runs.db"
    first = evaluate(model, data, threats, attacks, batch_size=32, store=db, progress=False)
    # simulate a crash after two batches: drop the records of every later sample
    with Store(db) as store:
        store._conn.execute("DELETE FROM samples WHERE idx >= 64")
        store._conn.commit()
    attacked: list[int] = []
    original = FGSM.__call__

    def spy(self, model, x, y, **kw):  # type: ignore[no-untyped-def]
        attacked.append(int(x.shape[0]))
        return original(self, model, x, y, **kw)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(FGSM, "__call__", spy)
        again = evaluate(model, data, threats, attacks, batch_size=32, store=db, progress=False)
    assert again.run_id == first.run_id
    assert sum(attacked) <= (len(data) - 64) * len(threats)  # only the missing samples were attacked
    assert again.robust_accuracy == first.robust_accuracy and again.worst_case == first.worst_case
    with Store(db) as store:
        run = store.run(first.run_id)
        assert run.n_records == len(data) * len(threats) and run.status == "complete"
        assert run.summary is not None and run.summary["worst_case"] == first.worst_case


def test_different_configuration_is_a_different_run(setup, tmp_path) -> None:
    model, data = setup
    db = tmp_path / "runs.db"
    a = evaluate(model, data.subset(slice(0, 20)), LpBall("linf", 0.1), FGSM(), store=db, progress=False)
    b = evaluate(model, data.subset(slice(0, 20)), LpBall("linf", 0.1), PGD(steps=3), store=db, progress=False)
    assert a.run_id != b.run_id


def test_evaluate_accepts_tensors_and_single_objects(setup) -> None:
    model, data = setup
    res = evaluate(model, (data.x[:10], data.y[:10]), LpBall("l2", 0.5), PGD(steps=3), progress=False)
    assert res.n == 10 and res.threats == ["l2:0.5"] and res.attacks == ["pgd"]


def test_duplicate_attack_names_are_made_unique() -> None:
    assert attack_names([PGD(), PGD(steps=3), FGSM()]) == ["pgd", "pgd#2", "fgsm"]


def test_summarize_counts_from_records_only() -> None:
    from bastion.results import SampleRecord

    recs = [
        SampleRecord(0, "linf:0.1", 1, 1, "falsified", 0.05, attack="fgsm"),
        SampleRecord(1, "linf:0.1", 2, 2, "falsified", 0.09, attack="pgd"),
        SampleRecord(2, "linf:0.1", 3, 3, "unknown"),
        SampleRecord(3, "linf:0.1", 4, 0, "falsified", 0.0, attack=CLEAN),
    ]
    res = summarize(recs, ["linf:0.1"], ["fgsm", "pgd"], 4)
    assert res.clean_accuracy == 0.75
    assert res.robust_accuracy["linf:0.1"] == {"fgsm": 0.5, "pgd": 0.25}
    assert res.worst_case["linf:0.1"] == 0.25


def test_bad_arguments_are_named(setup) -> None:
    model, data = setup
    with pytest.raises(InputError, match="threats"):
        evaluate(model, data, [], [FGSM()], progress=False)
    with pytest.raises(InputError, match="attacks must be Attack"):
        evaluate(model, data, LpBall("linf", 0.1), ["pgd"], progress=False)  # type: ignore[list-item]
    with pytest.raises(InputError, match="duplicates"):
        evaluate(model, data, [LpBall("linf", 0.1), LpBall("inf", 0.1)], FGSM(), progress=False)
    with pytest.raises(InputError, match="domain"):
        evaluate(model, data, LpBall("linf", 0.1, domain=(-1, 1)), FGSM(), progress=False)
    with pytest.raises(InputError, match="supports the norms"):
        evaluate(model, data, LpBall("l0", 3), FGSM(), progress=False)
    with pytest.raises(InputError, match="batch_size"):
        evaluate(model, data, LpBall("linf", 0.1), FGSM(), batch_size=0, progress=False)
    with pytest.raises(InputError, match="channels_last"):
        evaluate(model, data, LpBall("linf", 0.1), FGSM(), channels_last="yes", progress=False)  # type: ignore[arg-type]


def test_channels_last_layout_gives_the_same_verdicts_and_restores_the_weights() -> None:
    train_set, test_set = load_digits().train_test_split(test_fraction=0.2, seed=1)
    torch.manual_seed(2)
    model = build_model("cnn", (1, 8, 8), 10, channels=(4, 8), hidden=32)
    train(model, train_set, epochs=2, lr=3e-3, seed=0, progress=False)
    data = test_set.subset(slice(0, 60))
    strides = [p.stride() for p in model.parameters()]
    threat = LpBall("linf", 0.05)
    results = [
        evaluate(model, data, threat, [FGSM(), BIM(steps=5)], channels_last=flag, progress=False)
        for flag in (False, True)
    ]
    assert [p.stride() for p in model.parameters()] == strides
    # FGSM and BIM are deterministic; the layout changes float32 rounding only, which may move a sample whose
    # margin is within ~1e-6 of 0, so allow one sample of difference
    (a, b) = ({r.index: r.status for r in res.records} for res in results)
    assert sum(a[i] != b[i] for i in a) <= 1
    assert 0.0 < results[0].worst_case[threat.key] < results[0].clean_accuracy


def test_presets_build_autoattacks_cascade(setup) -> None:
    from bastion.attacks.presets import preset

    names = [a.name for a in preset("standard", ["linf"])]
    assert names == ["apgd", "apgd-t", "fab-t", "square"]
    assert [a.name for a in preset("standard", ["l1"])] == ["apgd", "apgd-t", "fab-t"]  # Square has no l1 version
    assert [a.name for a in preset("rapid", ["l2"])] == ["apgd", "apgd-t"]
    with pytest.raises(InputError, match="unknown attack preset"):
        preset("strongest", ["linf"])
    with pytest.raises(InputError, match="not in the"):
        preset("rapid", ["linf"], overrides={"square": {"queries": 10}})


def test_standard_cascade_runs_and_is_at_least_as_strong_as_rapid(setup) -> None:
    from bastion.attacks.presets import preset

    model, data = setup
    small = data.subset(slice(0, 40))
    threats = [LpBall("linf", e) for e in (0.05, 0.1)]
    quick = {"apgd": {"steps": 20}, "apgd-t": {"steps": 20, "n_target_classes": 3}}
    rapid = evaluate(model, small, threats, preset("rapid", ["linf"], quick), progress=False, checks=False)
    standard = evaluate(
        model, small, threats,
        preset("standard", ["linf"], {**quick, "fab-t": {"steps": 20, "n_target_classes": 3},
                                      "square": {"queries": 200}}),
        progress=False, checks=False,
    )  # fmt: skip
    assert standard.attacks == ["apgd", "apgd-t", "fab-t", "square"]
    for t in threats:
        # the first two attacks are the same objects with the same seeds: identical columns, then more attacks
        assert standard.robust_accuracy[t.key]["apgd-t"] == rapid.worst_case[t.key]
        assert standard.worst_case[t.key] <= rapid.worst_case[t.key]


def test_black_box_evaluation_counts_every_query_in_the_records_and_the_store(setup, tmp_path) -> None:
    from bastion.attacks import SimBA, Square
    from bastion.models import BlackBox

    model, data = setup
    data = data.subset(slice(0, 24))
    oracle = BlackBox(model, budget=50_000)
    threats = [LpBall("linf", 0.1), LpBall("linf", 0.3)]
    res = evaluate(oracle, data, threats, [SimBA(queries=100), Square(queries=100)], store=tmp_path / "r.db",
                   progress=False)  # fmt: skip
    # every query the oracle answered is in exactly one record: evaluate's clean query counts once per threat
    per_threat = {t.key: sum(r.queries or 0 for r in res.records if r.threat == t.key) for t in threats}
    assert oracle.queries == sum(per_threat.values()) - len(data) * (len(threats) - 1)
    assert all(r.queries is not None and r.queries >= 1 for r in res.records)
    assert set(res.queries) <= {t.key for t in threats} and res.queries
    with Store(tmp_path / "r.db") as store:
        (run,) = store.runs()
        assert [r.queries for r in store.records(run.id)] == [
            r.queries for r in sorted(res.records, key=lambda r: (r.threat, r.index))
        ]
