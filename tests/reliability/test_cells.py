"""Cells of the RAM: r-separation against brute force, grid indexing and boxes, ball cells, top-k, cell labels."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

from bastion.errors import InputError
from bastion.reliability.cells import (
    BallCells,
    GridCells,
    cell_labels,
    default_eps,
    r_separation,
    top_k,
)


def brute_r(x: np.ndarray, y: np.ndarray, p: float) -> float:
    best = math.inf
    for i, j in itertools.combinations(range(len(x)), 2):
        if y[i] != y[j]:
            d = np.abs(x[i] - x[j])
            dist = d.max() if math.isinf(p) else (d**p).sum() ** (1 / p)
            best = min(best, float(dist))
    return best


@pytest.mark.parametrize("norm,p", [("linf", math.inf), ("l2", 2.0), ("l1", 1.0)])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_r_separation_equals_brute_force(norm: str, p: float, seed: int) -> None:
    rng = np.random.default_rng(seed)
    x = rng.random((37, 3))
    y = rng.integers(0, 3, 37)
    expected = brute_r(x, y, p)
    assert r_separation(x, y, norm) == pytest.approx(expected, rel=1e-12, abs=0)
    # chunking does not change the answer
    assert r_separation(x, y, norm, chunk_size=5) == pytest.approx(expected, rel=1e-12, abs=0)


def test_r_separation_images_and_tensors() -> None:
    g = torch.Generator().manual_seed(3)
    x = torch.rand(20, 1, 2, 2, generator=g)
    y = torch.randint(0, 2, (20,), generator=g)
    expected = brute_r(x.reshape(20, -1).double().numpy(), y.numpy(), math.inf)
    assert r_separation(x, y) == pytest.approx(expected, rel=1e-7)


def test_r_separation_one_class_is_infinite_and_default_eps() -> None:
    x = np.random.default_rng(0).random((5, 2))
    assert r_separation(x, np.zeros(5, dtype=int)) == math.inf
    assert default_eps(0.4) == 0.2
    with pytest.raises(InputError, match="single label"):
        default_eps(math.inf)
    with pytest.raises(InputError, match="coincide"):
        default_eps(0.0)


def test_r_separation_bad_input() -> None:
    x = np.zeros((4, 2))
    with pytest.raises(InputError, match="norm"):
        r_separation(x, np.array([0, 1, 0, 1]), "l0")
    with pytest.raises(InputError, match="norm"):
        r_separation(x, np.array([0, 1, 0, 1]), "l7")
    with pytest.raises(InputError, match="4 labels"):
        r_separation(x, np.array([0, 1]))
    with pytest.raises(InputError, match="NaN"):
        r_separation(np.array([[0.0, np.nan], [1.0, 1.0]]), np.array([0, 1]))
    with pytest.raises(InputError, match="whole"):
        r_separation(x, np.array([0.5, 1, 0, 1]))


def test_grid_index_box_roundtrip_and_locate() -> None:
    grid = GridCells([0.0, -1.0], [1.0, 1.0], (4, 5))
    assert grid.n_cells == 20 and grid.dim == 2 and not grid.is_cubic
    idx = np.arange(20)
    assert (grid.ravel(grid.unravel(idx)) == idx).all()
    lo, hi = grid.boxes()
    # the boxes tile the domain: volumes add up, every centre is located in its own cell
    assert np.prod(hi - lo, axis=1).sum() == pytest.approx(2.0)
    assert (grid.locate(grid.centres()) == idx).all()
    # C order: the last axis varies fastest
    assert grid.unravel([1]).tolist() == [[0, 1]]
    assert lo[1].tolist() == [0.0, -0.6]
    # borders: the upper corner belongs to the last cell, outside points to none
    assert grid.locate(np.array([[1.0, 1.0], [0.0, -1.0], [1.5, 0.0]])).tolist() == [19, 0, -1]
    rng = np.random.default_rng(0)
    pts = rng.random((200, 2)) * [1, 2] + [0, -1]
    cell = grid.locate(pts)
    blo, bhi = grid.boxes(cell)
    assert ((pts >= blo) & (pts <= bhi)).all()


def test_grid_cubic_key_and_half_width() -> None:
    grid = GridCells(0.0, 1.0, (250, 250))
    assert grid.is_cubic and grid.half_width == pytest.approx(0.002)
    assert grid.key == "linf:0.002"
    assert GridCells(0.0, [1.0, 2.0], (10, 10)).key.startswith("grid:10x10@")


def test_grid_bad_input() -> None:
    with pytest.raises(InputError, match="upper must exceed"):
        GridCells(0.0, 0.0, 3)
    with pytest.raises(InputError, match="grid size"):
        GridCells(0.0, 1.0, (3, 0))
    with pytest.raises(InputError, match="entries"):
        GridCells([0.0, 0.0, 0.0], 1.0, (3, 3))
    grid = GridCells(0.0, 1.0, (3, 3))
    with pytest.raises(InputError, match="indices"):
        grid.boxes([9])
    with pytest.raises(InputError, match="shape"):
        grid.locate(np.zeros((2, 3)))


def test_ball_cells_boxes_clip_to_domain_and_separate_labels() -> None:
    rng = np.random.default_rng(1)
    x = rng.random((40, 2))
    y = (x[:, 0] > 0.5).astype(int)
    r = r_separation(x, y)
    cells = BallCells(x, default_eps(r))
    lo, hi = cells.boxes()
    assert (lo >= 0).all() and (hi <= 1).all()
    assert ((lo <= x) & (x <= hi)).all()
    # differently labelled balls have disjoint interiors: their centres are at least 2 eps apart
    for i, j in itertools.combinations(range(40), 2):
        if y[i] != y[j]:
            assert np.abs(x[i] - x[j]).max() >= 2 * cells.eps - 1e-12
    assert cells.key == f"linf:{cells.eps!r}"
    with pytest.raises(InputError, match="eps"):
        BallCells(x, 0.0)
    with pytest.raises(InputError, match="inside the domain"):
        BallCells(x + 2, 0.1)


def test_top_k_orders_by_mass_with_stable_ties() -> None:
    grid = GridCells(0.0, 1.0, 6)
    masses = np.array([0.1, 0.3, 0.3, 0.0, 0.2, 0.1])
    assert top_k(grid, masses, 4).tolist() == [1, 2, 4, 0]
    assert top_k(grid, masses, None).tolist() == [1, 2, 4, 0, 5, 3]
    assert top_k(grid, masses, 100).shape == (6,)
    with pytest.raises(InputError, match="one value per cell"):
        top_k(grid, masses[:3], 2)
    with pytest.raises(InputError, match="k must"):
        top_k(grid, masses, 0)


def test_cell_labels_majority_empty_and_mixed() -> None:
    grid = GridCells(0.0, 1.0, (2, 2))
    x = np.array([[0.1, 0.1], [0.2, 0.2], [0.3, 0.1], [0.9, 0.9], [0.8, 0.2]])
    y = np.array([1, 1, 0, 2, 0])
    lab = cell_labels(grid, x, y)
    # cells: 0 = [0, .5]², 1 = x0 < .5, x1 >= .5 (empty), 2 = x0 >= .5, x1 < .5, 3 = upper right
    assert lab.label.tolist() == [1, -1, 0, 2]
    assert lab.count.tolist() == [3, 0, 1, 1]
    assert lab.mixed.tolist() == [True, False, False, False]
    assert lab.purity[0] == pytest.approx(2 / 3) and math.isnan(lab.purity[1])
    sub = cell_labels(grid, x, y, [3, 0])
    assert sub.label.tolist() == [2, 1]
    balls = BallCells(x, 0.15)
    lb = cell_labels(balls, x, y)
    # ball 0 holds points 0 and 1 (label 1), ball 2 holds points 1, 2 (0.1 away): tie 1/0 goes to the smaller
    assert lb.label.tolist()[:3] == [1, 1, 0] and lb.mixed.tolist()[:3] == [False, True, True]
