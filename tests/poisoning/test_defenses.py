"""Tests of the poisoning and backdoor defences on BadNets-poisoned scikit-learn digits.

Poisoned data is made here (a 2x2 white patch in the bottom-right corner, relabelled to class 0), so these tests do
not depend on the attacks of ``bastion.poisoning``; one test at the end also runs them on that package's
:class:`~bastion.poisoning.BadNets` when it is importable. "10 %" below is the paper's ``ε``: the fraction of the
target class's samples that are poison (ART's ``percent_poison``), not of the whole training set.

Two backdoored zoo ``cnn`` models are trained once per module and shared:

* ``single_source``: 10 % of class 0 is poison taken from class 3 (the source/target-pair protocol of Tran et al.
  and Chen et al.), for the data-level detectors (spectral signatures, activation clustering);
* ``all_to_one``: 33 % of class 0 is poison taken from every other class, a backdoor that fires from any class
  (attack success about 98 %), for the model-level defences (Neural Cleanse, fine-pruning, STRIP).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import Tensor, nn

from bastion.data import Dataset, load_digits
from bastion.defenses.training import accuracy, train
from bastion.errors import InputError
from bastion.models import build_model
from bastion.poisoning.base import attack_success_rate
from bastion.poisoning.defenses import (
    DetectionResult,
    activation_clustering,
    detection_metrics,
    fine_prune,
    neural_cleanse,
    plot_anomaly_indices,
    plot_scores,
    plot_triggers,
    representations,
    sanitize,
    spectral_signatures,
    strip_scan,
    unlearn,
)
from bastion.poisoning.defenses.neural_cleanse import NeuralCleanseResult, anomaly_indices
from bastion.poisoning.defenses.spectral import spectral_scores
from bastion.poisoning.defenses.strip import strip_entropy
from bastion.results import SampleRecord
from bastion.store import Store

TARGET = 0
#: Neural Cleanse settings for the tests: the paper's schedule (init cost 1e-3, patience 5, x1.5, 99 %) on shorter
#: epochs (4 steps of 32 instead of 31) and a shorter early-stop patience, so that a scan takes seconds.
NC_FAST: dict[str, Any] = {"samples_per_epoch": 128, "epochs": 150, "early_stop_patience": 10, "progress": False}


# ------------------------------------------------------------------------------------------------- helpers
def stamp(x: Tensor) -> Tensor:
    """The BadNets trigger of these tests: a 2x2 white patch in the bottom-right corner."""
    out = x.clone()
    out[..., -2:, -2:] = 1.0
    return out


def badnets(
    data: Dataset, *, fraction: float, target: int = TARGET, source: int | None = None, seed: int = 0
) -> tuple[Dataset, Tensor]:
    """Stamp and relabel to ``target`` enough samples that ``fraction`` of the target class ends up poison.

    The samples come from class ``source``, or from every class but the target (``source=None``).
    """
    gen = torch.Generator().manual_seed(seed)
    n_target = int((data.y == target).sum())
    n_poison = round(fraction / (1 - fraction) * n_target)
    pool = torch.nonzero((data.y != target) if source is None else (data.y == source)).reshape(-1)
    pick = pool[torch.randperm(pool.numel(), generator=gen)[:n_poison]]
    x, y = data.x.clone(), data.y.clone()
    x[pick] = stamp(x[pick])
    y[pick] = target
    return Dataset(x, y, num_classes=data.num_classes, name="digits [badnets]"), torch.sort(pick).values


@contextmanager
def one_thread() -> Iterator[None]:
    """One intra-op torch thread (module fixtures run outside conftest's per-test one-thread fixture)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def fit(data: Dataset, *, channels: tuple[int, int], hidden: int, epochs: int = 20, seed: int = 0) -> nn.Module:
    """A fresh zoo cnn trained on ``data`` (init and shuffling seeded; the global RNG is left as it was)."""
    with torch.random.fork_rng(), one_thread():
        torch.manual_seed(seed)
        model = build_model("cnn", data.feature_shape, data.num_classes, channels=channels, hidden=hidden)
        train(model, data, epochs=epochs, lr=3e-3, seed=seed, progress=False)
    return model.eval()


def stored(store: Path, run_id: int | None) -> list[SampleRecord]:
    """The records of run ``run_id`` in the store file."""
    assert run_id is not None, "the job did not write to the store"
    with Store(store) as db:
        return db.records(run_id)


# ------------------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def split() -> tuple[Dataset, Dataset]:
    return load_digits().train_test_split(test_fraction=0.2, seed=0)


@pytest.fixture(scope="module")
def single_source(split: tuple[Dataset, Dataset]) -> tuple[nn.Module, Dataset, Tensor]:
    data, poison = badnets(split[0], fraction=0.10, source=3)
    return fit(data, channels=(16, 32), hidden=128), data, poison


@pytest.fixture(scope="module")
def all_to_one(split: tuple[Dataset, Dataset]) -> tuple[nn.Module, Dataset, Tensor]:
    data, poison = badnets(split[0], fraction=0.33)
    model = fit(data, channels=(8, 16), hidden=64)
    with one_thread():
        asr = attack_success_rate(model, split[1], stamp, TARGET)
    assert asr > 0.9, "the all-to-one backdoor was not learned"
    return model, data, poison


@pytest.fixture(scope="module")
def nc_scan(
    all_to_one: tuple[nn.Module, Dataset, Tensor],
    split: tuple[Dataset, Dataset],
    tmp_path_factory: pytest.TempPathFactory,
) -> tuple[NeuralCleanseResult, Path]:
    store = tmp_path_factory.mktemp("nc") / "runs.db"
    with one_thread():
        return neural_cleanse(all_to_one[0], split[1], store=store, **NC_FAST), store


# ------------------------------------------------------------------------------------- precision and recall
def test_precision_recall_on_a_hand_made_case() -> None:
    precision, recall, f1 = detection_metrics(torch.tensor([0, 1, 2, 5]), torch.tensor([1, 2, 3]), 10)
    assert precision == pytest.approx(2 / 4) and recall == pytest.approx(2 / 3)
    assert f1 == pytest.approx(2 * (1 / 2) * (2 / 3) / (1 / 2 + 2 / 3))
    assert detection_metrics(torch.tensor([], dtype=torch.int64), torch.tensor([1]), 4) == (0.0, 0.0, 0.0)
    assert detection_metrics(torch.tensor([1, 3]), torch.tensor([1, 3]), 4) == (1.0, 1.0, 1.0)
    result = DetectionResult(
        method="hand", n=10, suspected=torch.tensor([5, 0, 2, 1, 2]), scores=torch.zeros(10),
        labels=torch.zeros(10, dtype=torch.int64), poison_indices=torch.tensor([3, 1, 2]),
    )  # fmt: skip
    assert result.suspected.tolist() == [0, 1, 2, 5]  # sorted, repeats dropped
    assert (result.precision, result.recall) == (pytest.approx(0.5), pytest.approx(2 / 3))
    assert result.kept.tolist() == [3, 4, 6, 7, 8, 9]
    assert result.to_dict()["n_suspected"] == 4 and "recall" in result.table()


# ------------------------------------------------------------------------------------- spectral signatures
def test_spectral_scores_are_squared_projections_on_the_top_singular_vector() -> None:
    gen = torch.Generator().manual_seed(0)
    r = torch.randn(50, 6, generator=gen, dtype=torch.float64)
    centred = r.numpy() - r.numpy().mean(axis=0)
    v = np.linalg.svd(centred, full_matrices=False)[2][0]
    assert spectral_scores(r).numpy() == pytest.approx((centred @ v) ** 2, rel=1e-9, abs=1e-12)
    # A shifted minority stands out along the top direction.
    r[:5] += 6.0
    top = torch.topk(spectral_scores(r), 5).indices
    assert sorted(top.tolist()) == [0, 1, 2, 3, 4]


def test_spectral_signatures_recall_at_10_percent(single_source: tuple[nn.Module, Dataset, Tensor]) -> None:
    model, data, poison = single_source
    result = spectral_signatures(model, data, poison_fraction=0.10, poison_indices=poison)
    assert result.recall is not None and result.recall >= 0.8, result.table()
    # 1.5 ε of every class is removed, as the paper.
    for row in result.per_class:
        assert row["removed"] == round(1.5 * 0.10 * row["n"])
        assert int((result.flagged & (data.y == row["class"])).sum()) == row["removed"]


# ------------------------------------------------------------------------------------ activation clustering
@pytest.mark.parametrize("reduce", ["ica", "pca"])
def test_activation_clustering_recall_at_10_percent(
    single_source: tuple[nn.Module, Dataset, Tensor], reduce: str
) -> None:
    model, data, poison = single_source
    result = activation_clustering(model, data, reduce=reduce, poison_indices=poison)
    assert result.recall is not None and result.recall >= 0.8, result.table()
    row = next(r for r in result.per_class if r["class"] == TARGET)
    assert row["poisoned"] and row["smaller_fraction"] <= 0.35
    # The cluster flagged in the target class is the poison, not a part of the clean digits.
    in_target = result.flagged & (data.y == TARGET)
    caught = in_target[poison].sum()
    assert int(caught) / int(in_target.sum()) >= 2 / 3
    # The scores rank the smaller cluster first.
    assert float(result.scores[poison].mean()) > float(result.scores[data.y == TARGET].mean())


def test_exclusionary_reclassification_keeps_the_poison_cluster(
    single_source: tuple[nn.Module, Dataset, Tensor],
) -> None:
    model, data, poison = single_source

    def retrain(subset: Dataset) -> nn.Module:
        return fit(subset, channels=(8, 16), hidden=64, epochs=8)

    result = activation_clustering(model, data, reduce="pca", retrain=retrain, poison_indices=poison)
    row = next(r for r in result.per_class if r["class"] == TARGET)
    # A model trained without the cluster reads the poison as its source digit 3, not as its label 0.
    assert row["poisoned"] and row["source_class"] == 3
    assert row["reclassified_other"] > row["reclassified_own"]
    assert result.recall is not None and result.recall >= 0.8


# ------------------------------------------------------------------------------------------------ sanitize
def test_sanitize_removes_far_outliers(split: tuple[Dataset, Dataset]) -> None:
    clean = split[0]
    gen = torch.Generator().manual_seed(0)
    far = torch.ones(10, *clean.feature_shape)  # all-white images: far from every digit's centroid
    labels = torch.randint(0, 10, (10,), generator=gen)
    data = Dataset(
        torch.cat([clean.x, far]), torch.cat([clean.y, labels]), num_classes=10, name="digits + outliers"
    )  # fmt: skip
    outliers = torch.arange(len(clean), len(data))
    result = sanitize(data, percentile=95, poison_indices=outliers)
    assert result.recall == 1.0
    # Only about 5 % of each class goes (plus the outliers).
    assert len(result.suspected) <= 0.07 * len(data) + 10
    # The radii are percentiles of the distances to the class centroids.
    mu = data.x[data.y == 1].reshape(-1, 64).mean(dim=0)
    dist = (data.x[data.y == 1].reshape(-1, 64) - mu).norm(dim=1).double()
    row = next(r for r in result.per_class if r["class"] == 1)
    assert row["sphere_radius"] == pytest.approx(float(torch.quantile(dist, 0.95)), rel=1e-6)
    # The oracle defender (centroids from trusted clean data) finds them too, and so does the slab.
    assert sanitize(data, reference=clean, poison_indices=outliers).recall == 1.0


def test_slab_defense_removes_points_far_along_the_centroid_axis() -> None:
    gen = torch.Generator().manual_seed(1)
    x = torch.rand(200, 4, generator=gen) * 0.2
    y = torch.arange(200) % 2
    x[y == 1, 0] += 0.6  # class 1 sits to the right of class 0 along feature 0
    x[:4, 0] = 1.0  # four class-0 points pushed far along that axis (their other features stay typical)
    y[:4] = 0
    data = Dataset(x, y, num_classes=2, name="two blobs")
    result = sanitize(data, defense="slab", percentile=95, poison_indices=torch.arange(4))
    assert result.recall == 1.0


# ---------------------------------------------------------------------------------------------------- STRIP
def test_strip_entropy_is_lower_on_triggered_inputs(
    all_to_one: tuple[nn.Module, Dataset, Tensor], split: tuple[Dataset, Dataset]
) -> None:
    model = all_to_one[0]
    held_out = split[1]
    x = held_out.x[held_out.y != TARGET][:100]
    clean_h = strip_entropy(model, x, held_out)
    triggered_h = strip_entropy(model, stamp(x), held_out)
    assert float(triggered_h.mean()) < float(clean_h.mean())
    # With the authors' saturated superimposition the trigger survives intact and the separation is stark.
    add_clean = strip_entropy(model, x, held_out, mode="add")
    add_trig = strip_entropy(model, stamp(x), held_out, mode="add")
    assert float(add_trig.mean()) < 0.5 * float(add_clean.mean())
    # The same entropies per position, whatever the batching (overlays are a function of the position).
    assert strip_entropy(model, x[:10], held_out, batch_size=3) == pytest.approx(clean_h[:10], rel=1e-6)


def test_strip_scan_flags_triggered_inputs_and_resumes(
    all_to_one: tuple[nn.Module, Dataset, Tensor], split: tuple[Dataset, Dataset], tmp_path: Path
) -> None:
    model = all_to_one[0]
    held_out = split[1]
    pool, screen = held_out.split(240)
    x = screen.x[screen.y != TARGET][:60]
    inputs = Dataset(torch.cat([x, stamp(x)]), torch.cat([screen.y[screen.y != TARGET][:60]] * 2), 10, "screen")
    trojaned = torch.arange(60, 120)
    store = tmp_path / "runs.db"
    result = strip_scan(model, inputs, pool, mode="add", poison_indices=trojaned, store=store, progress=False)
    assert result.recall is not None and result.recall >= 0.9
    assert result.details["clean_rejected"] <= 0.05  # the threshold is the clean 1 % quantile of a normal fit
    clean_flagged = int(result.flagged[:60].sum())
    assert clean_flagged <= 6
    again = strip_scan(model, inputs, pool, mode="add", poison_indices=trojaned, store=store, progress=False)
    assert again.run_id == result.run_id and torch.equal(again.suspected, result.suspected)
    records = stored(store, result.run_id)
    assert len(records) == len(inputs)
    assert all(r.status == ("falsified" if bool(result.flagged[r.index]) else "unknown") for r in records)
    assert all(r.extra["poison"] == (r.index >= 60) for r in records)


# -------------------------------------------------------------------------------------------- Neural Cleanse
def test_anomaly_index_on_hand_made_norms() -> None:
    index, median, mad = anomaly_indices(torch.tensor([1.0, 2.0, 3.0, 4.0, 100.0]))
    assert median == 3.0 and mad == pytest.approx(1.4826)
    assert index.tolist() == pytest.approx([2 / 1.4826, 1 / 1.4826, 0.0, 1 / 1.4826, 97 / 1.4826])
    index, _, mad = anomaly_indices(torch.tensor([5.0, 5.0, 5.0, 1.0]))
    assert mad == 0 and index[3] == math.inf and index[0] == 0


def test_neural_cleanse_flags_the_target_class(
    nc_scan: tuple[NeuralCleanseResult, Path], all_to_one: tuple[nn.Module, Dataset, Tensor],
    split: tuple[Dataset, Dataset],
) -> None:  # fmt: skip
    result, store = nc_scan
    assert TARGET in result.flagged, result.table()
    assert float(result.anomaly_index[TARGET]) > 2 and float(result.norms[TARGET]) < result.median
    assert float(result.norms[TARGET]) == min(float(v) for v in result.norms)
    # Masks in [0, 1], patterns in the domain, and the reversed trigger really works on clean inputs.
    assert float(result.masks.min()) >= 0 and float(result.masks.max()) <= 1
    assert float(result.patterns.min()) >= 0 and float(result.patterns.max()) <= 1
    assert float(result.attack_success[TARGET]) >= 0.99
    assert attack_success_rate(all_to_one[0], split[1], result.trigger(TARGET), TARGET) >= 0.9
    # One record per class in the store, the flagged classes falsified, the mask norm in extra.
    records = stored(store, result.run_id)
    assert [r.index for r in records] == list(range(10))
    for r in records:
        assert r.status == ("falsified" if r.index in result.flagged else "unknown")
        assert r.extra["mask_l1"] == pytest.approx(float(result.norms[r.index]))
        assert len(r.extra["mask"]) == 64
    assert "flagged classes" in result.table() and result.to_dict()["flagged"] == result.flagged


def test_neural_cleanse_resumes_from_the_store(
    nc_scan: tuple[NeuralCleanseResult, Path], all_to_one: tuple[nn.Module, Dataset, Tensor],
    split: tuple[Dataset, Dataset],
) -> None:  # fmt: skip
    result, store = nc_scan
    again = neural_cleanse(all_to_one[0], split[1], store=store, **NC_FAST)  # every class done: nothing to optimise
    assert again.run_id == result.run_id and again.flagged == result.flagged
    assert torch.allclose(again.masks, result.masks) and torch.allclose(again.norms, result.norms)


def test_neural_cleanse_does_not_flag_a_clean_model(split: tuple[Dataset, Dataset]) -> None:
    model = fit(split[0], channels=(16, 32), hidden=128, seed=0)
    result = neural_cleanse(model, split[1], seed=0, **NC_FAST)
    assert result.flagged == [], result.table()


@pytest.mark.slow
def test_neural_cleanse_false_alarms_on_clean_models_over_seeds(split: tuple[Dataset, Dataset]) -> None:
    flagged = []
    for seed in range(6):
        model = fit(split[0], channels=(16, 32), hidden=128, seed=seed)
        flagged.append(neural_cleanse(model, split[1], seed=seed, **NC_FAST).flagged)
    clean_runs = sum(1 for f in flagged if not f)
    print(f"Neural Cleanse on clean digits models: {clean_runs} of {len(flagged)} seeds flag nothing ({flagged})")
    assert clean_runs >= len(flagged) // 2 + 1


def test_unlearning_the_reversed_trigger_lowers_the_attack_success(
    nc_scan: tuple[NeuralCleanseResult, Path], all_to_one: tuple[nn.Module, Dataset, Tensor],
    split: tuple[Dataset, Dataset],
) -> None:  # fmt: skip
    model = all_to_one[0]
    defender, test = split[1].split(180)
    before = attack_success_rate(model, test, stamp, TARGET)
    repaired = unlearn(model, defender, nc_scan[0], epochs=10)
    assert attack_success_rate(repaired, test, stamp, TARGET) < before - 0.3
    assert accuracy(repaired, test) >= accuracy(model, test) - 0.05
    assert attack_success_rate(model, test, stamp, TARGET) == before  # the original is untouched


def test_figures_are_written(nc_scan: tuple[NeuralCleanseResult, Path], tmp_path: Path) -> None:
    result = nc_scan[0]
    for fn, name in ((plot_triggers, "triggers.png"), (plot_anomaly_indices, "anomaly.png")):
        out = fn(result, tmp_path / name)
        assert out.is_file() and out.stat().st_size > 1000
    scan = DetectionResult(
        method="hand", n=4, suspected=torch.tensor([1]), scores=torch.tensor([0.0, 3.0, 1.0, 0.5]),
        labels=torch.zeros(4, dtype=torch.int64), poison_indices=torch.tensor([1]),
    )  # fmt: skip
    assert plot_scores(scan, tmp_path / "scores.png").stat().st_size > 1000
    with pytest.raises(InputError, match="cannot write"):
        plot_triggers(result, tmp_path / "missing" / "t.png")


# ---------------------------------------------------------------------------------------------- fine-pruning
def test_fine_pruning_lowers_the_attack_success(
    all_to_one: tuple[nn.Module, Dataset, Tensor], split: tuple[Dataset, Dataset], tmp_path: Path
) -> None:
    model = all_to_one[0]
    defender, test = split[1].split(180)
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    result = fine_prune(
        model, defender, test=test, trigger=stamp, target=TARGET, fine_tune_epochs=10, store=tmp_path / "r.db",
        progress=False,
    )  # fmt: skip
    assert result.asr_before is not None and result.asr_after is not None
    assert result.asr_after < result.asr_before - 0.1, result.table()
    assert result.clean_acc_after >= result.clean_acc_before - 0.05
    # Pruned in increasing order of mean activation, until the accuracy fell by more than 4 points.
    acts = result.mean_activation
    assert all(acts[a] <= acts[b] for a, b in zip(result.pruned, result.pruned[1:]))
    assert min(result.accuracy_curve) >= result.accuracy_curve[0] - 0.04
    conv = dict(result.model.named_modules())[result.layer]
    assert isinstance(conv, nn.Conv2d)
    assert all(
        float(conv.weight[c].detach().abs().sum()) == 0.0 for c in result.pruned
    )  # still pruned after fine-tuning
    assert all(torch.equal(v, weights[k]) for k, v in model.state_dict().items())  # the original is untouched
    records = stored(tmp_path / "r.db", result.run_id)
    assert len(records) == result.n_channels
    assert {r.index for r in records if r.status == "falsified"} == set(result.pruned)


# ------------------------------------------------------------------------------------------------ the store
def test_scan_records_one_sample_each_and_resumes(
    single_source: tuple[nn.Module, Dataset, Tensor], tmp_path: Path
) -> None:
    model, data, poison = single_source
    store = tmp_path / "runs.db"
    first = spectral_signatures(model, data, poison_indices=poison, store=store)
    again = spectral_signatures(model, data, poison_indices=poison, store=store)
    assert again.run_id == first.run_id and torch.equal(again.suspected, first.suspected)
    assert first.run_id is not None
    with Store(store) as db:
        run = db.run(first.run_id)
        records = db.records(first.run_id)
    assert run.kind == "backdoor-scan" and run.status == "complete" and len(records) == len(data)
    is_poison = torch.zeros(len(data), dtype=torch.bool)
    is_poison[poison] = True
    for r in records[::97]:
        assert r.status == ("falsified" if bool(first.flagged[r.index]) else "unknown")
        assert r.extra["score"] == pytest.approx(float(first.scores[r.index]))
        assert r.extra["poison"] == bool(is_poison[r.index])
        assert r.label == int(data.y[r.index])


# --------------------------------------------------------------------------------------------- bad inputs
def test_bad_inputs_raise_input_error(
    single_source: tuple[nn.Module, Dataset, Tensor], split: tuple[Dataset, Dataset]
) -> None:
    model, data, _ = single_source
    held_out = split[1]
    cases = [
        (lambda: spectral_signatures(model, data, poison_fraction=0.0), "poison_fraction"),
        (lambda: spectral_signatures(model, data, poison_fraction=1.5), "poison_fraction"),
        (lambda: spectral_signatures("model", data), "torch.nn.Module"),  # type: ignore[arg-type]
        (lambda: spectral_signatures(model, [1, 2]), "Dataset"),  # type: ignore[arg-type]
        (lambda: spectral_signatures(model, data, poison_indices=[len(data)]), "outside"),
        (lambda: spectral_signatures(model, data, poison_indices=[0.5]), "integer"),
        (lambda: spectral_signatures(model, data, classes=[10]), "classes"),
        (lambda: spectral_signatures(model, data, layer="nope"), "not a module"),
        (lambda: activation_clustering(model, data, reduce="tsne"), "reduce"),
        (lambda: activation_clustering(model, data, rule="biggest"), "rule"),
        (lambda: activation_clustering(model, data, size_threshold=0.9), "size_threshold"),
        (lambda: sanitize(data, space="feature"), "model"),
        (lambda: sanitize(data, percentile=0), "percentile"),
        (lambda: sanitize(data, defense="cube"), "defense"),
        (lambda: strip_scan(model, data, held_out.subset(slice(0, 50))), "more than n_overlays"),
        (lambda: strip_scan(model, data, held_out, frr=0.0), "frr"),
        (lambda: strip_scan(model, data, held_out, mode="mix"), "mode"),
        (lambda: neural_cleanse(model, held_out, classes=[0, 1]), "at least 3 classes"),
        (lambda: neural_cleanse(model, held_out, cost_multiplier=1.0), "cost_multiplier"),
        (lambda: neural_cleanse(model, held_out, attack_threshold=2.0), "attack_threshold"),
        (lambda: fine_prune(model, held_out, trigger=stamp), "trigger= and target="),
        (lambda: fine_prune(model, held_out, layer="8"), "not an nn.Conv2d"),
        (lambda: fine_prune(build_model("mlp", (1, 8, 8), 10), held_out), "no nn.Conv2d"),
        (lambda: representations(build_model("cnn", (1, 8, 8), 10), torch.zeros(2, 3, 5, 5)), "cannot run"),
        (lambda: attack_success_rate(model, held_out, stamp, 12), "target"),
        (lambda: attack_success_rate(model, held_out, 3, TARGET), "trigger"),  # type: ignore[arg-type]
    ]
    for call, match in cases:
        with pytest.raises(InputError, match=match):
            call()


def test_unlearn_without_a_flagged_class_is_an_input_error(
    nc_scan: tuple[NeuralCleanseResult, Path], single_source: tuple[nn.Module, Dataset, Tensor],
    split: tuple[Dataset, Dataset],
) -> None:  # fmt: skip
    result = nc_scan[0]
    nothing = NeuralCleanseResult(
        classes=result.classes, masks=result.masks, patterns=result.patterns, norms=result.norms,
        attack_success=result.attack_success, anomaly_index=result.anomaly_index, flagged=[], median=result.median,
        mad=result.mad, epochs=result.epochs, costs=result.costs,
    )  # fmt: skip
    with pytest.raises(InputError, match="nothing to unlearn"):
        unlearn(single_source[0], split[1], nothing)
    with pytest.raises(InputError, match="fraction"):
        unlearn(single_source[0], split[1], result, fraction=0)


# ----------------------------------------------------------------------------- with the package's attacks
def test_defences_on_the_packages_badnets(split: tuple[Dataset, Dataset]) -> None:
    import bastion.poisoning as poisoning

    train_set, test_set = split
    defender, test = test_set.split(180)
    # All-to-one BadNets poisoning 5 % of the training set: about a third of class 0 is poison, as `all_to_one`.
    poisoned = poisoning.BadNets(rate=0.05, target=TARGET, pattern="white", seed=0)(train_set)
    assert isinstance(poisoned, poisoning.PoisonedData) and poisoned.trigger is not None
    model = fit(poisoned.data, channels=(8, 16), hidden=64)
    # Their Trigger works wherever a trigger is taken, and the success rates agree.
    theirs = poisoning.attack_success_rate(model, test, poisoned.trigger, TARGET)
    assert attack_success_rate(model, test, poisoned.trigger, TARGET) == pytest.approx(theirs)
    assert theirs > 0.9
    result = fine_prune(
        model, defender, test=test, trigger=poisoned.trigger, target=TARGET, fine_tune_epochs=10, progress=False
    )  # fmt: skip
    assert result.asr_after is not None and result.asr_after < theirs - 0.1, result.table()
    x = test.x[test.y != TARGET][:40]
    screened = Dataset(torch.cat([x, poisoned.trigger.apply(x)]), torch.zeros(80, dtype=torch.int64), 10, "screen")
    scan = strip_scan(model, screened, defender, mode="add", poison_indices=torch.arange(40, 80), progress=False)
    assert scan.recall is not None and scan.recall >= 0.9
