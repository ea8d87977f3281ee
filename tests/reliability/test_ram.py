"""The reliability assessment model: the pfd against exact integrals, certified/falsified cells, empty and mixed
cells, ball cells with an encoder, splitting, resume through the store, SIL bands, figures and bad input."""

from __future__ import annotations

import json
import math
from typing import Any

import numpy as np
import pytest
import torch
from scipy.stats import norm
from torch import nn

from bastion.errors import InputError
from bastion.reliability import (
    CallableModel,
    GridCells,
    OperationalProfile,
    assess_reliability,
    plot_profile,
    sil_level,
)
from bastion.store import Store

FAIL_LO = np.array([0.31, 0.22])
FAIL_HI = np.array([0.58, 0.77])


def fails_in_box(x: np.ndarray) -> np.ndarray:
    """Predicts class 1 inside the failure box, 0 elsewhere (all data are labelled 0)."""
    flat = x.reshape(len(x), -1)
    return np.asarray(((flat >= FAIL_LO) & (flat <= FAIL_HI)).all(axis=1), dtype=np.int64)


def uniform_data(n: int, seed: int, label: int = 0) -> tuple[np.ndarray, np.ndarray]:
    x = np.random.default_rng(seed).random((n, 2)).astype(np.float32)
    return x, np.full(n, label)


def kde_box(points: np.ndarray, h: float, lo: np.ndarray, hi: np.ndarray) -> float:
    per = norm.cdf((hi - points) / h) - norm.cdf((lo - points) / h)
    return float(np.prod(per, axis=1).mean())


def expected_pfd(points: np.ndarray, h: float, shape: tuple[int, int]) -> float:
    """Σ_i m_i · |cell_i ∩ F| / |cell_i| over the grid of [0, 1]² (the estimator's exact expectation)."""
    grid = GridCells(0.0, 1.0, shape)
    lo, hi = grid.boxes()
    masses = np.array([kde_box(points, h, a, b) for a, b in zip(lo, hi)])
    inter = np.clip(np.minimum(hi, FAIL_HI) - np.maximum(lo, FAIL_LO), 0, None).prod(axis=1)
    frac = inter / (hi - lo).prod(axis=1)
    return float((masses / masses.sum() * frac).sum())


def test_pfd_is_within_its_confidence_of_the_exact_integral() -> None:
    x, y = uniform_data(1500, 0)
    pts = x.astype(np.float64)
    exact = expected_pfd(pts, 0.15, (10, 10))
    res = assess_reliability(
        fails_in_box, (x, y), cells="all", grid="10x10", bandwidth=0.15, n_boot=0, samples_per_cell=4000,
        progress=False,
    )  # fmt: skip
    assert res.n_cells == 100 and res.mode == "probability" and res.mass_method == "box-integral"
    assert abs(res.pfd - exact) <= 3 * res.std
    assert res.upper >= exact
    assert res.upper == pytest.approx(min(1.0, res.pfd + norm.ppf(0.975) * res.std))
    # ACU: the unweighted mean of the cells' λ
    assert res.acu == pytest.approx(res.lambdas().mean())
    # its variance is the sampling variance: Σ m² rate (1 - rate) / (n - 1)
    lam, m = res.lambdas(), res.masses()
    assert res.variance == pytest.approx(float((m * m * lam * (1 - lam) / 3999).sum()), rel=1e-9)
    # callables are only sampled: no cell is robust
    assert res.n_certified == 0 and res.decided["crown"] == 0 and res.decided["pgd"] == 0


def test_upper_bound_covers_the_exact_value_across_seeds() -> None:
    x, y = uniform_data(800, 1)
    exact = expected_pfd(x.astype(np.float64), 0.2, (6, 6))
    covered = 0
    for seed in range(20):
        res = assess_reliability(
            fails_in_box, (x, y), cells="all", grid=6, bandwidth=0.2, n_boot=0, samples_per_cell=150, seed=seed,
            progress=False,
        )  # fmt: skip
        covered += res.upper >= exact
    assert covered >= 18  # nominal 97.5 %


def test_pfd_converges_to_the_profile_probability_of_the_failure_region() -> None:
    # enough data that no cell of the finer grid is empty (an empty cell would take the model's majority label)
    x, y = uniform_data(30_000, 2)
    pts = x.astype(np.float64)
    truth = kde_box(pts, 0.15, FAIL_LO, FAIL_HI) / kde_box(pts, 0.15, np.zeros(2), np.ones(2))
    errors = []
    for shape, n in (((5, 5), 2000), ((40, 40), 2000)):
        res = assess_reliability(
            fails_in_box, (x, y), cells="all", grid=shape, bandwidth=0.15, n_boot=0, samples_per_cell=n,
            progress=False,
        )  # fmt: skip
        errors.append(abs(res.pfd - truth))
    assert errors[1] < errors[0] and errors[1] < 0.004


def linear_model(threshold: float = 0.55, slope: float = 50.0) -> nn.Module:
    """Class 1 exactly where x0 > threshold."""
    model = nn.Linear(2, 2)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[0.0, 0.0], [slope, 0.0]]))
        model.bias.copy_(torch.tensor([0.0, -slope * threshold]))
    return model


def truth_data(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.rand(n, 2, generator=torch.Generator().manual_seed(seed))
    return x, (x[:, 0] >= 0.6).long()


def test_certified_cells_contribute_zero_and_falsified_cells_one() -> None:
    x, y = truth_data(2000, 3)
    kw: dict[str, Any] = {
        "cells": "all",
        "grid": "10x10",
        "bandwidth": 0.2,
        "n_boot": 0,
        "samples_per_cell": 2000,
        "progress": False,
    }
    worst = assess_reliability(linear_model(), (x, y), mode="worst-case", **kw)
    cols = np.array([int(r.extra["cell"]) // 10 for r in worst.records])  # x0 is the first axis
    column5 = cols == 5
    status = np.array([r.status for r in worst.records])
    # every cell off the model's boundary column is certified by CROWN and contributes 0, unsampled
    assert (status[~column5] == "robust").all() and (status[column5] == "falsified").all()
    assert worst.decided["crown"] == 90 and worst.decided["pgd"] == 10
    for r in worst.records:
        if r.status == "robust":
            assert r.extra["lambda"] == 0 and r.extra["n"] == 0 and r.certified == pytest.approx(0.05)
            assert r.attack == "crown" and r.queries == 1
        else:
            assert r.extra["lambda"] == 1 and r.extra["falsified"] and r.adv_distance is not None
            assert abs(r.extra["rate"] - 0.5) <= 4 * math.sqrt(0.25 / 2000)  # half the cell fails, as sampled
            assert r.adv_distance <= 0.05 + 1e-6
    masses = worst.masses()
    assert worst.pfd == pytest.approx(float(masses[column5].sum()), rel=1e-12)
    assert worst.variance == 0.0 and worst.upper == pytest.approx(worst.pfd)
    prob = assess_reliability(linear_model(), (x, y), mode="probability", **kw)
    expected = 0.5 * float(prob.masses()[column5].sum())
    assert abs(prob.pfd - expected) <= 4 * prob.std
    assert prob.n_certified == 90 and prob.n_falsified == 10


def test_non_square_cells_are_checked_in_rescaled_coordinates() -> None:
    x, y = truth_data(1500, 4)
    res = assess_reliability(
        linear_model(), (x, y), cells="all", grid=(10, 5), bandwidth=0.2, n_boot=0, samples_per_cell=500,
        mode="worst-case", progress=False,
    )  # fmt: skip
    assert res.cells_key.startswith("grid:10x5@")
    column5 = np.array([int(r.extra["cell"]) // 5 == 5 for r in res.records])
    status = np.array([r.status for r in res.records])
    assert (status[~column5] == "robust").all() and (status[column5] == "falsified").all()
    # the falsifying points lie inside their cells (x0 half-width 0.05)
    assert all(r.adv_distance is not None and r.adv_distance <= 0.1 + 1e-6 for r in res.records if column5[r.index])
    assert res.pfd == pytest.approx(float(res.masses()[column5].sum()), rel=1e-12)


def test_empty_cells_take_the_majority_prediction() -> None:
    x = np.random.default_rng(5).random((400, 2)).astype(np.float32) * np.array([0.5, 1.0], dtype=np.float32)
    y = np.zeros(400, dtype=np.int64)

    def model(z: np.ndarray) -> np.ndarray:
        # right half: class 1 above x1 = 0.3 -- 40 % of the lower right cell, all of the upper right one
        return ((z[:, 0] >= 0.5) & (z[:, 1] > 0.3)).astype(np.int64)

    res = assess_reliability(
        model, (x, y), cells="all", grid=2, bandwidth=0.2, n_boot=0, samples_per_cell=5000, progress=False
    )
    by_cell = {int(r.extra["cell"]): r for r in res.records}
    low_right, up_right = by_cell[2], by_cell[3]
    assert low_right.extra["label_source"] == "empty" and low_right.label == 0
    assert abs(low_right.extra["lambda"] - 0.4) <= 4 * math.sqrt(low_right.extra["var"])
    assert up_right.label == 1 and up_right.extra["lambda"] == 0 and up_right.status == "unknown"
    assert by_cell[0].extra["label_source"] == "data" and res.n_empty == 2


def test_mixed_cells_majority_or_fail() -> None:
    x = np.array([[0.1, 0.1], [0.2, 0.2], [0.3, 0.3], [0.8, 0.8]], dtype=np.float32)
    y = np.array([1, 1, 0, 0])

    def model(z: np.ndarray) -> np.ndarray:
        return np.ones(len(z), dtype=np.int64)

    kw: dict[str, Any] = {
        "cells": "all",
        "grid": 2,
        "bandwidth": 0.3,
        "n_boot": 0,
        "samples_per_cell": 100,
        "progress": False,
    }
    majority = assess_reliability(model, (x, y), **kw)
    first = next(r for r in majority.records if r.extra["cell"] == 0)
    assert first.label == 1 and first.extra["label_source"] == "mixed" and first.extra["lambda"] == 0
    fail = assess_reliability(model, (x, y), mixed="fail", **kw)
    first = next(r for r in fail.records if r.extra["cell"] == 0)
    assert first.extra["lambda"] == 1 and first.attack == "mixed-labels" and first.status == "unknown"


class Budget:
    """A black-box model that raises after a number of calls (a killed run)."""

    def __init__(self, limit: int | None) -> None:
        self.limit = limit
        self.calls = 0

    def __call__(self, z: np.ndarray) -> np.ndarray:
        self.calls += 1
        if self.limit is not None and self.calls > self.limit:
            raise RuntimeError("interrupted")
        return fails_in_box(z)


def test_an_interrupted_run_resumes_to_the_uninterrupted_result(tmp_path) -> None:
    x, y = uniform_data(600, 6)
    kw: dict[str, Any] = {
        "cells": "top:30", "grid": 8, "bandwidth": 0.2, "n_boot": 10, "samples_per_cell": 300, "cells_per_batch": 4,
        "chunk_points": 600, "progress": False,
    }  # fmt: skip
    fresh = assess_reliability(CallableModel(Budget(None), fingerprint="box"), (x, y), **kw)
    path = tmp_path / "ram.db"
    killed = Budget(7)
    with pytest.raises(RuntimeError, match="interrupted"):
        assess_reliability(CallableModel(killed, fingerprint="box"), (x, y), store=path, **kw)
    with Store(path) as store:
        run = store.runs()[0]
        assert run.kind == "reliability" and run.status == "running" and 0 < run.n_records < 30
        done = run.n_records
    again = Budget(None)
    resumed = assess_reliability(CallableModel(again, fingerprint="box"), (x, y), store=path, **kw)
    assert resumed.pfd == fresh.pfd and resumed.variance == fresh.variance and resumed.acu == fresh.acu
    assert [r.extra for r in resumed.records] == [r.extra for r in fresh.records]
    # the resumed session did not redo the stored cells: a centre call plus ceil(samples / chunk) per group
    assert again.calls < killed.calls + 3 * (30 - done)
    with Store(path) as store:
        run = store.runs()[0]
        assert run.status == "complete" and run.summary is not None and run.summary["pfd"] == fresh.pfd
    # a complete run is read back without calling the model
    idle = Budget(0)
    back = assess_reliability(CallableModel(idle, fingerprint="box"), (x, y), store=path, **kw)
    assert back.pfd == fresh.pfd and idle.calls == 0


def test_a_torch_run_resumes_identically_across_batches(tmp_path) -> None:
    x, y = truth_data(800, 7)
    kw: dict[str, Any] = {
        "cells": "all", "grid": 6, "bandwidth": 0.2, "n_boot": 0, "samples_per_cell": 200, "cells_per_batch": 5,
        "progress": False,
    }  # fmt: skip
    whole = assess_reliability(linear_model(), (x, y), **kw)
    path = tmp_path / "t.db"

    class Stop(nn.Module):
        def __init__(self, inner: nn.Module, limit: int) -> None:
            super().__init__()
            self.inner, self.limit, self.calls = inner, limit, 0

        def forward(self, z: torch.Tensor) -> torch.Tensor:
            self.calls += 1
            if self.calls > self.limit:
                raise RuntimeError("interrupted")
            return self.inner(z)

    with pytest.raises(RuntimeError):
        assess_reliability(Stop(linear_model(), 12), (x, y), store=path, certify=None, **kw)
    part = assess_reliability(linear_model(), (x, y), store=path, certify=None, **kw)
    ref = assess_reliability(linear_model(), (x, y), certify=None, **kw)
    assert part.pfd == ref.pfd and [r.extra for r in part.records] == [r.extra for r in ref.records]
    assert [r.adv_distance for r in part.records] == [r.adv_distance for r in ref.records]
    assert whole.n_certified > 0 and ref.n_certified == 0


def test_sklearn_random_forest_through_the_store(tmp_path) -> None:
    from sklearn.ensemble import RandomForestClassifier

    x, _ = uniform_data(300, 8)
    y = (x[:, 0] + x[:, 1] > 1).astype(np.int64)
    rf = RandomForestClassifier(n_estimators=5, random_state=0).fit(x, y)
    kw: dict[str, Any] = {"cells": "top:20", "grid": "20x20", "bandwidth": 0.2, "n_boot": 5, "samples_per_cell": 200}
    res = assess_reliability(rf.predict, (x, y), store=tmp_path / "rf.db", progress=False, **kw)
    assert res.n_cells == 20 and res.n_certified == 0
    assert res.model_calls == 20 * 201
    assert all(r.queries == 201 for r in res.records)
    again = assess_reliability(rf.predict, (x, y), store=tmp_path / "rf.db", progress=False, **kw)
    assert again.run_id == res.run_id and again.pfd == res.pfd
    # masses: the 20 heaviest cells, renormalised; raw covered mass below 1; bootstrap variances stored
    assert res.masses().sum() == pytest.approx(1.0) and 0 < res.mass_covered < 1
    assert all(r.extra["mass_var"] > 0 for r in res.records)
    assert res.pfd <= res.pfd_conservative <= 1
    # the stored mass variances are the profile's half-size bootstrap over the enumerated cells
    ids = [int(r.extra["cell"]) for r in res.records]
    boot = OperationalProfile(x.astype(np.float64), 0.2).bootstrap(GridCells(0.0, 1.0, (20, 20)), ids, n_boot=5)
    assert np.allclose([r.extra["mass_var"] for r in res.records], boot.var, rtol=1e-9)


def test_variance_combines_profile_and_sampling_variances() -> None:
    from bastion.reliability import reliability_summary
    from bastion.results import SampleRecord

    m, u = np.array([0.5, 0.3, 0.2]), np.array([1e-4, 4e-4, 9e-4])
    lam, v = np.array([0.0, 0.1, 0.5]), np.array([0.0, 1e-5, 2e-5])
    records = [
        SampleRecord(index=i, threat="t", label=0, clean_pred=0, status="unknown",
                     extra={"mass": m[i], "mass_var": u[i], "lambda": lam[i], "var": v[i]})
        for i in range(3)
    ]  # fmt: skip
    pfd, var, upper, acu = reliability_summary(records, confidence=0.9)
    assert pfd == pytest.approx(0.03 + 0.1)
    # Var(XY) of independent X, Y summed over cells: m² v + λ² u + v u (Zhao et al. 2021; ReAsDL main.py)
    assert var == pytest.approx(float((m * m * v + lam * lam * u + v * u).sum()))
    assert upper == pytest.approx(pfd + norm.ppf(0.9) * math.sqrt(var))
    assert acu == pytest.approx(0.2)


def test_ball_cells_with_an_encoder_and_a_torch_model() -> None:
    g = torch.Generator().manual_seed(9)
    x = torch.rand(60, 1, 4, 4, generator=g)
    y = (x.reshape(60, -1).mean(dim=1) > 0.5).long()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 2))
    weight = torch.randn(16, 3, generator=g)

    def encoder(batch: torch.Tensor) -> torch.Tensor:
        return batch.reshape(batch.shape[0], -1) @ weight

    res = assess_reliability(
        model, (x, y), cells="top:12", eps=0.02, encoder=encoder, bandwidth=0.5, n_boot=4, samples_per_cell=300,
        progress=False,
    )  # fmt: skip
    assert res.partition == "balls" and res.mass_method == "density-at-centre" and res.n_cells == 12
    assert res.masses().sum() == pytest.approx(1.0) and res.cells_key == "linf:0.02"
    with torch.no_grad():
        preds = model(x).argmax(1)
    for r in res.records:
        cell = int(r.extra["cell"])
        assert r.clean_pred == int(preds[cell])  # the ball's centre is its operational point
        assert r.label == int(y[cell])
        if r.status == "robust":
            assert r.extra["n"] == 0 and r.extra["lambda"] == 0
        assert r.status != "falsified" or r.extra["falsified"]
    # the masses are the profile's densities at the encoded centres, renormalised
    prof = OperationalProfile.fit(x, bandwidth=0.5, encoder=encoder)
    cells = [int(r.extra["cell"]) for r in res.records]
    dens = prof.density(prof.encode(x[cells]))
    assert np.allclose(res.masses(), dens / dens.sum(), rtol=1e-9)


def test_splitting_estimates_a_tiny_failure_probability_in_natural_log() -> None:
    x, y = uniform_data(300, 10)

    class Corner(nn.Module):
        """Class 1 only in the corner x0 + x1 > 1.96 of the unit square (a triangle of area 8e-4)."""

        def forward(self, z: torch.Tensor) -> torch.Tensor:
            s = 100.0 * (z[:, 0] + z[:, 1] - 1.96)
            return torch.stack([torch.zeros_like(s), s], dim=1)

    res = assess_reliability(
        Corner(), (x, y), cells="all", grid=2, bandwidth=0.3, n_boot=0, samples_per_cell=50, certify=None,
        splitting={"n_particles": 300, "mh_steps": 20}, progress=False, seed=1,
    )  # fmt: skip
    corner = next(r for r in res.records if r.extra["cell"] == 3)
    exact = 8e-4 / 0.25  # the triangle's share of the upper right cell
    assert corner.extra["failures"] == 0 and "splitting_p" in corner.extra
    assert exact / 3 <= corner.extra["lambda"] <= exact * 3
    assert corner.status == "falsified"  # the attack (or splitting) found the corner
    others = [r for r in res.records if r.extra["cell"] != 3]
    assert all(r.extra["lambda"] == 0 for r in others)


def test_sil_levels() -> None:
    assert sil_level(5e-5) == 4 and sil_level(1e-7) == 4
    assert sil_level(1e-4) == 3 and sil_level(5e-4) == 3
    assert sil_level(5e-3) == 2 and sil_level(0.05) == 1 and sil_level(0.1) == 0 and sil_level(0.5) == 0
    # high demand: 2e-6 per demand at 10 demands an hour is 2e-5 failures per hour: out of SIL 1
    assert sil_level(2e-6, demand="high", demands_per_hour=10) == 0
    assert sil_level(1e-6, demand="high", demands_per_hour=1) == 1
    assert sil_level(5e-10, demand="high", demands_per_hour=1) == 4
    with pytest.raises(InputError, match="demands_per_hour"):
        sil_level(1e-3, demand="high")
    with pytest.raises(InputError, match="demand"):
        sil_level(1e-3, demand="medium")
    with pytest.raises(InputError, match="probability"):
        sil_level(2.0)


def test_result_summary_table_and_figures(tmp_path) -> None:
    x, y = truth_data(500, 11)
    res = assess_reliability(
        linear_model(), (x, y), cells="top:40", grid=10, bandwidth=0.2, n_boot=3, samples_per_cell=200,
        progress=False,
    )  # fmt: skip
    summary = res.to_dict()
    assert json.loads(json.dumps(summary))["pfd"] == res.pfd and summary["sil_low_demand"] == res.sil()
    assert "| pfd" in res.table() and "ACU" in res.table()
    assert plot_profile(res, tmp_path / "grid.png", resolution=40).stat().st_size > 1000
    x1 = torch.rand(200, 1, generator=torch.Generator().manual_seed(0))
    lin1 = nn.Linear(1, 2)
    one = assess_reliability(lin1, (x1, (x1[:, 0] > 0.5).long()), cells="all", grid=20, bandwidth=0.1, n_boot=0,
                             samples_per_cell=100, progress=False)  # fmt: skip
    assert plot_profile(one, tmp_path / "one.png", resolution=40).stat().st_size > 1000
    xb = torch.rand(30, 5, generator=torch.Generator().manual_seed(1))
    balls = assess_reliability(
        nn.Linear(5, 2), (xb, (xb[:, 0] > 0.5).long()), cells="all", eps=0.01, bandwidth=0.3, n_boot=0,
        samples_per_cell=50, progress=False,
    )  # fmt: skip
    assert balls.partition == "balls" and plot_profile(balls, tmp_path / "balls.png").stat().st_size > 1000


def test_bad_input() -> None:
    x, y = uniform_data(50, 12)
    base: dict[str, Any] = {"grid": 4, "bandwidth": 0.2, "n_boot": 0, "samples_per_cell": 10, "progress": False}
    cases: list[tuple[dict[str, Any], str]] = [
        ({"cells": "top:abc"}, "cells"),
        ({"cells": 0}, "cells"),
        ({"mode": "average"}, "mode"),
        ({"mixed": "ignore"}, "mixed"),
        ({"partition": "voronoi"}, "partition"),
        ({"samples_per_cell": 1}, "samples_per_cell"),
        ({"confidence": 1.0}, "confidence"),
        ({"n_boot": 1}, "n_boot"),
        ({"boot_fraction": 0.0}, "boot_fraction"),
        ({"eps": -0.1, "grid": None}, "eps"),
        ({"eps": 0.1}, "either grid"),
        ({"grid": "4x4x4"}, "grid"),
        ({"grid": "big"}, "grid"),
        ({"encoder": lambda b: b}, "grid"),
        ({"encoder": lambda b: b, "partition": "grid"}, "encoder"),
        ({"attack": "nonsense"}, "attack"),
        ({"splitting": {"particles": 3}}, "splitting"),
        ({"certify": "magic"}, "bound method"),
        ({"bandwidth": 0.0}, "bandwidth"),
        ({"seed": 1.5}, "seed"),
        ({"cells_per_batch": 0}, "cells_per_batch"),
    ]
    for extra, match in cases:
        with pytest.raises(InputError, match=match):
            assess_reliability(fails_in_box, (x, y), **{**base, **extra})
    with pytest.raises(InputError, match="model"):
        assess_reliability(42, (x, y), **base)  # type: ignore[arg-type]
    with pytest.raises(InputError, match="op_data"):
        assess_reliability(fails_in_box, x, **base)  # type: ignore[arg-type]
    with pytest.raises(InputError):
        assess_reliability(fails_in_box, (x + 3, y), **base)  # outside the (0, 1) domain
    with pytest.raises(InputError, match="returned shape"):
        assess_reliability(lambda z: np.zeros((len(z), 2, 2)), (x, y), **base)
    with pytest.raises(InputError, match="single label"):
        assess_reliability(fails_in_box, (x, y), **{**base, "grid": None})  # eps from r-separation: one class
    with pytest.raises(InputError, match="fingerprint"):
        assess_reliability(lambda z: fails_in_box(z), (x, y), store=":memory:", **base)
