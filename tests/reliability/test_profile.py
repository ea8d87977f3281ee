"""The operational profile: exact KDE densities and box masses, bandwidth by cross-validation, the encoder path,
and the bootstrap (its variance shrinks with more data)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.stats import norm

from bastion.errors import InputError
from bastion.reliability.cells import BallCells, GridCells
from bastion.reliability.profile import OperationalProfile


def mixture(n: int, seed: int) -> np.ndarray:
    """Points of a two-component Gaussian mixture in 2-D."""
    rng = np.random.default_rng(seed)
    centres = np.array([[-1.0, 0.0], [1.0, 0.5]])
    pick = rng.integers(0, 2, n)
    return centres[pick] + rng.normal(0.0, 0.4, (n, 2))


def exact_box_mass(points: np.ndarray, h: float, lo: np.ndarray, hi: np.ndarray) -> float:
    """The KDE's mass of a box, term by term with scipy's normal CDF."""
    per = norm.cdf((hi - points) / h) - norm.cdf((lo - points) / h)
    return float(np.prod(per, axis=1).mean())


def test_log_density_matches_the_mixture_formula_and_sklearn() -> None:
    pts = mixture(50, 0)
    prof = OperationalProfile(pts, 0.3)
    z = np.random.default_rng(1).normal(size=(7, 2))
    d2 = ((z[:, None, :] - pts[None]) ** 2).sum(-1)
    by_hand = np.log(np.exp(-d2 / (2 * 0.09)).mean(1) / (2 * math.pi * 0.09))
    assert np.allclose(prof.log_density(z), by_hand, rtol=1e-12, atol=1e-12)
    assert np.allclose(prof.log_density(z), prof.kde().score_samples(z), rtol=1e-9, atol=1e-9)


def test_grid_masses_equal_the_exact_integral_and_sum_to_one_over_the_support() -> None:
    pts = mixture(300, 2)
    h = 0.25
    prof = OperationalProfile(pts, h)
    grid = GridCells([-5.0, -5.0], [5.0, 5.5], (20, 23))  # covers the support: > 10 bandwidths of margin
    mass = prof.cell_mass(grid)
    assert mass.method == "box-integral"
    assert mass.raw.sum() == pytest.approx(1.0, abs=1e-9)
    assert mass.normalised.sum() == pytest.approx(1.0, abs=1e-12)
    lo, hi = grid.boxes()
    for cell in [0, 17, 200, 231, 459]:
        assert mass.raw[cell] == pytest.approx(exact_box_mass(pts, h, lo[cell], hi[cell]), rel=1e-9, abs=1e-15)
    # a subset gives the same raw masses (both code paths: full grid and gathered cells)
    sub = prof.cell_mass(grid, [231, 17, 3])
    assert np.allclose(sub.raw, mass.raw[[231, 17, 3]], rtol=1e-12, atol=1e-18)
    assert sub.normalised.sum() == pytest.approx(1.0)
    assert sub.covered == pytest.approx(mass.raw[[231, 17, 3]].sum())
    # a grid on part of the support covers part of the mass only
    half = prof.cell_mass(GridCells([-5.0, -5.0], [0.0, 5.5], (10, 10)))
    assert half.covered == pytest.approx(exact_box_mass(pts, h, np.array([-5.0, -5.0]), np.array([0.0, 5.5])))
    # and the box integral agrees with numerical integration of the density
    cell = 231
    u = np.random.default_rng(0).random((40_000, 2))
    inner = lo[cell] + u * (hi[cell] - lo[cell])
    mc = prof.density(inner).mean() * np.prod(hi[cell] - lo[cell])
    assert mc == pytest.approx(mass.raw[cell], rel=0.02)


def test_one_and_three_dimensional_grids() -> None:
    rng = np.random.default_rng(3)
    pts1 = rng.normal(size=(80, 1))
    prof1 = OperationalProfile(pts1, 0.5)
    m1 = prof1.cell_mass(GridCells(-3.0, 3.0, 12))
    assert m1.raw[5] == pytest.approx(exact_box_mass(pts1, 0.5, np.array([-0.5]), np.array([0.0])), rel=1e-10)
    pts3 = rng.normal(size=(60, 3))
    prof3 = OperationalProfile(pts3, 0.6)
    grid3 = GridCells(-8.0, 8.0, (4, 5, 6))
    m3 = prof3.cell_mass(grid3)
    assert m3.raw.sum() == pytest.approx(1.0, abs=1e-9)
    lo, hi = grid3.boxes([37])
    assert m3.raw[37] == pytest.approx(exact_box_mass(pts3, 0.6, lo[0], hi[0]), rel=1e-10, abs=1e-16)


def test_ball_cells_without_encoder_integrate_their_boxes_in_log_space() -> None:
    rng = np.random.default_rng(4)
    pts = rng.random((30, 2))
    prof = OperationalProfile(pts, 0.1)
    cells = BallCells(pts[:5], 0.05)
    mass = prof.cell_mass(cells)
    lo, hi = cells.boxes()
    for i in range(5):
        assert mass.raw[i] == pytest.approx(exact_box_mass(pts, 0.1, lo[i], hi[i]), rel=1e-9)
    # in 400 dimensions the product of interval probabilities underflows in linear space; the log-space sum does not
    big = rng.random((10, 400))
    prof_big = OperationalProfile(big, 0.3)
    balls = BallCells(big[:3], 0.01)
    m_big = prof_big.cell_mass(balls)
    assert (m_big.raw == 0).all() and np.isfinite(m_big.log_raw).all()
    lo, hi = balls.boxes()
    per = np.log(norm.cdf((hi[:, None, :] - big[None]) / 0.3) - norm.cdf((lo[:, None, :] - big[None]) / 0.3))
    terms = per.sum(axis=2)
    top = terms.max(axis=1, keepdims=True)
    exact_log = (top + np.log(np.exp(terms - top).sum(axis=1, keepdims=True)))[:, 0] - np.log(10)
    assert np.allclose(m_big.log_raw, exact_log, rtol=1e-9)
    w = np.exp(exact_log - exact_log.max())
    assert np.allclose(m_big.normalised, w / w.sum(), rtol=1e-9)


def test_encoder_profile_uses_codes_and_batches_the_encoder() -> None:
    rng = np.random.default_rng(5)
    x = torch.as_tensor(rng.random((50, 1, 3, 3)), dtype=torch.float32)
    weight = torch.as_tensor(rng.normal(size=(9, 2)), dtype=torch.float32)
    seen: list[int] = []

    def encoder(batch: torch.Tensor) -> torch.Tensor:
        seen.append(batch.shape[0])
        return batch.reshape(batch.shape[0], -1) @ weight

    prof = OperationalProfile.fit(x, bandwidth=0.2, encoder=encoder, encode_batch=16)
    assert seen == [16, 16, 16, 2] and prof.dim == 2 and prof.input_shape == (1, 3, 3)
    codes = (x.reshape(50, -1) @ weight).double().numpy()
    assert np.allclose(prof.points, codes, atol=1e-6)
    cells = BallCells(x[:10], 0.05)
    mass = prof.cell_mass(cells)
    assert mass.method == "density-at-centre"
    dens = prof.density(prof.encode(x[:10]))
    assert np.allclose(mass.normalised, dens / dens.sum())
    # raw masses are relative to the whole cell set
    assert mass.raw.sum() == pytest.approx(1.0)
    sub = prof.cell_mass(cells, [2, 7])
    assert np.allclose(sub.raw, mass.raw[[2, 7]])
    with pytest.raises(InputError, match="latent"):
        prof.cell_mass(GridCells(0.0, 1.0, (3, 3)))


def test_an_nn_encoder_tuple_output_is_its_mean() -> None:
    class Enc(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = torch.nn.Linear(4, 2)

        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            z = self.lin(x)
            return z, torch.zeros_like(z)

    torch.manual_seed(0)
    enc = Enc().train()
    x = torch.rand(20, 4)
    prof = OperationalProfile.fit(x, bandwidth=0.5, encoder=enc)
    assert np.allclose(prof.points, enc.lin(x).detach().double().numpy(), atol=1e-6)
    assert enc.training  # restored


def test_bandwidth_by_cross_validation_is_the_best_held_out_likelihood() -> None:
    from sklearn.model_selection import KFold
    from sklearn.neighbors import KernelDensity

    pts = mixture(120, 6)
    grid = [0.05, 0.1, 0.2, 0.4, 0.8, 1.6]
    prof = OperationalProfile.fit(pts, bandwidths=grid, cv=3, seed=7)
    scores = []
    for h in grid:
        folds = KFold(3, shuffle=True, random_state=7).split(pts)
        scores.append(np.mean([KernelDensity(bandwidth=h).fit(pts[a]).score(pts[b]) for a, b in folds]))
    assert prof.bandwidth == grid[int(np.argmax(scores))]
    assert np.allclose(prof.cv_scores, scores)
    default = OperationalProfile.fit(pts, cv=3)
    assert 0.01 < default.bandwidth < 5 and len(default.cv_bandwidths) == 31


def test_bootstrap_variance_shrinks_with_more_data() -> None:
    grid = GridCells([-3.0, -2.0], [3.0, 2.5], (6, 5))
    variances = []
    for n in (100, 1600):
        prof = OperationalProfile(mixture(n, 8), 0.3)
        boot = prof.bootstrap(grid, n_boot=40, seed=1)
        full = prof.cell_mass(grid)
        # the bootstrap mean sits near the full-data masses, and the replicates' masses are renormalised
        assert np.abs(boot.mean - full.normalised).max() < 0.03
        assert boot.mean.sum() == pytest.approx(1.0)
        variances.append(boot.var.sum())
    # variance of a KDE's mass falls like 1/n: 16 times the data, far less than half the variance
    assert variances[1] < 0.25 * variances[0]


def test_bootstrap_of_an_encoder_profile_and_reproducibility() -> None:
    rng = np.random.default_rng(9)
    x = rng.random((60, 3))

    def encoder(batch: torch.Tensor) -> torch.Tensor:
        return batch[:, :2] * 2

    prof = OperationalProfile.fit(x, bandwidth=0.3, encoder=encoder)
    cells = BallCells(x, 0.05)
    a = prof.bootstrap(cells, [0, 1, 2], n_boot=5, seed=3)
    b = prof.bootstrap(cells, [0, 1, 2], n_boot=5, seed=3)
    assert np.array_equal(a.var, b.var) and a.mean.sum() == pytest.approx(1.0)
    assert (a.var > 0).all()


def test_bad_input() -> None:
    pts = mixture(20, 0)
    with pytest.raises(InputError, match="NaN"):
        OperationalProfile.fit(np.array([[0.0, np.nan]]), bandwidth=0.1)
    with pytest.raises(InputError, match="bandwidth"):
        OperationalProfile.fit(pts, bandwidth=0.0)
    with pytest.raises(InputError, match="bandwidth"):
        OperationalProfile.fit(pts, bandwidth=-1.0)
    with pytest.raises(InputError, match="cv"):
        OperationalProfile.fit(pts, cv=1)
    with pytest.raises(InputError, match="bandwidths"):
        OperationalProfile.fit(pts, bandwidths=[0.1, -0.2])
    with pytest.raises(InputError, match="codes of shape"):
        OperationalProfile.fit(pts, bandwidth=0.1, encoder=lambda b: b.reshape(-1))
    with pytest.raises(InputError, match="encoder"):
        OperationalProfile.fit(pts, bandwidth=0.1, encoder="vae")  # type: ignore[arg-type]
    prof = OperationalProfile(pts, 0.2)
    with pytest.raises(InputError, match="coordinates"):
        prof.log_density(np.zeros((3, 5)))
    with pytest.raises(InputError, match="axes"):
        prof.cell_mass(GridCells(0.0, 1.0, (2, 2, 2)))
    with pytest.raises(InputError, match="fraction"):
        prof.bootstrap(GridCells(0.0, 1.0, (2, 2)), fraction=1.5)
    with pytest.raises(InputError, match="n_boot"):
        prof.bootstrap(GridCells(0.0, 1.0, (2, 2)), n_boot=1)
    with pytest.raises(InputError, match="upper >= lower"):
        prof.box_mass(np.ones((1, 2)), np.zeros((1, 2)))
