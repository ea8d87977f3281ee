"""Synthetic 3-D shapes sampled as point clouds, generated on the fly (nothing to download).

Each class is a solid's surface — sphere, cube, cylinder, cone, torus, square pyramid, ellipsoid, octahedron —
sampled uniformly by area (the polyhedra and the cylinder/cone exactly; the torus by rejection; the ellipsoid as a
scaled sphere, so its density is only approximately uniform). Every cloud gets Gaussian jitter, a random rotation
(about the vertical axis by default, as ModelNet40 augmentation does, or uniform over SO(3)) and a random scale, and
is centred and fitted into a sphere of radius ``scale`` <= 1, so every coordinate lies in
:data:`~bastion.pointcloud.threat.POINT_DOMAIN` = [-1, 1]. Same seed, same clouds.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from bastion.data import Dataset
from bastion.errors import InputError
from bastion.pointcloud.threat import POINT_DOMAIN

__all__ = ["SHAPES", "make_shapes", "sample_shape"]

#: The classes, in label order.
SHAPES: tuple[str, ...] = ("sphere", "cube", "cylinder", "cone", "torus", "pyramid", "ellipsoid", "octahedron")

_CUBE_V = np.array([[x, y, z] for x in (-1, 1) for y in (-1, 1) for z in (-1, 1)], dtype=np.float64)
_CUBE_F = np.array(
    [[0, 1, 3], [0, 3, 2], [4, 6, 7], [4, 7, 5], [0, 4, 5], [0, 5, 1],
     [2, 3, 7], [2, 7, 6], [0, 2, 6], [0, 6, 4], [1, 5, 7], [1, 7, 3]]
)  # fmt: skip
_PYR_V = np.array([[-1, -1, -0.5], [1, -1, -0.5], [1, 1, -0.5], [-1, 1, -0.5], [0, 0, 1.0]], dtype=np.float64)
_PYR_F = np.array([[0, 1, 2], [0, 2, 3], [0, 1, 4], [1, 2, 4], [2, 3, 4], [3, 0, 4]])
_OCT_V = np.array([[1, 0, 0], [-1, 0, 0], [0, 1, 0], [0, -1, 0], [0, 0, 1], [0, 0, -1]], dtype=np.float64)
_OCT_F = np.array([[a, b, c] for a in (0, 1) for b in (2, 3) for c in (4, 5)])


def _mesh(rng: np.random.Generator, v: np.ndarray, f: np.ndarray, n: int) -> np.ndarray:
    tri = v[f]  # (F, 3, 3)
    area = 0.5 * np.linalg.norm(np.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0]), axis=1)
    pick = rng.choice(len(f), size=n, p=area / area.sum())
    r1, r2 = np.sqrt(rng.random(n))[:, None], rng.random(n)[:, None]
    a, b, c = tri[pick, 0], tri[pick, 1], tri[pick, 2]
    return (1 - r1) * a + r1 * (1 - r2) * b + r1 * r2 * c  # uniform on each triangle


def _sphere(rng: np.random.Generator, n: int) -> np.ndarray:
    g = rng.normal(size=(n, 3))
    return g / np.linalg.norm(g, axis=1, keepdims=True)


def _disk(rng: np.random.Generator, n: int, z: float) -> np.ndarray:
    r, t = np.sqrt(rng.random(n)), rng.random(n) * 2 * math.pi
    return np.stack([r * np.cos(t), r * np.sin(t), np.full(n, z)], axis=1)


def _cylinder(rng: np.random.Generator, n: int) -> np.ndarray:
    side, cap = 2 * math.pi * 2.0, math.pi  # radius 1, height 2
    kind = rng.choice(3, size=n, p=np.array([side, cap, cap]) / (side + 2 * cap))
    t, z = rng.random(n) * 2 * math.pi, rng.random(n) * 2 - 1
    out = np.stack([np.cos(t), np.sin(t), z], axis=1)
    for j, zc in ((1, 1.0), (2, -1.0)):
        m = kind == j
        out[m] = _disk(rng, int(m.sum()), zc)
    return out


def _cone(rng: np.random.Generator, n: int) -> np.ndarray:
    lateral, base = math.pi * math.sqrt(1 + 4.0), math.pi  # radius 1, height 2
    on_side = rng.random(n) < lateral / (lateral + base)
    s, t = np.sqrt(rng.random(n)), rng.random(n) * 2 * math.pi  # area grows linearly from the apex
    out = np.stack([s * np.cos(t), s * np.sin(t), 1 - 2 * s], axis=1)
    out[~on_side] = _disk(rng, int((~on_side).sum()), -1.0)
    return out


def _torus(rng: np.random.Generator, n: int, big: float = 1.0, small: float = 0.4) -> np.ndarray:
    out = np.empty((0, 3))
    while len(out) < n:
        u, v = rng.random(2 * n) * 2 * math.pi, rng.random(2 * n) * 2 * math.pi
        keep = rng.random(2 * n) < (big + small * np.cos(v)) / (big + small)  # area element ∝ R + r cos v
        u, v = u[keep], v[keep]
        ring = big + small * np.cos(v)
        out = np.concatenate([out, np.stack([ring * np.cos(u), ring * np.sin(u), small * np.sin(v)], axis=1)])
    return out[:n]


def sample_shape(name: str, n: int, rng: np.random.Generator) -> np.ndarray:
    """``n`` points (n, 3) sampled on the surface of the canonical shape ``name`` (before any augmentation)."""
    if name == "sphere":
        return _sphere(rng, n)
    if name == "cube":
        return _mesh(rng, _CUBE_V, _CUBE_F, n)
    if name == "cylinder":
        return _cylinder(rng, n)
    if name == "cone":
        return _cone(rng, n)
    if name == "torus":
        return _torus(rng, n)
    if name == "pyramid":
        return _mesh(rng, _PYR_V, _PYR_F, n)
    if name == "ellipsoid":
        return _sphere(rng, n) * np.array([1.0, 0.6, 0.35])
    if name == "octahedron":
        return _mesh(rng, _OCT_V, _OCT_F, n)
    raise InputError(f"unknown shape {name!r}; choose one of {', '.join(SHAPES)}")


def _rotation(rng: np.random.Generator, mode: str) -> np.ndarray:
    if mode == "z":
        t = rng.random() * 2 * math.pi
        c, s = math.cos(t), math.sin(t)
        return np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]])
    q, r = np.linalg.qr(rng.normal(size=(3, 3)))
    q = q * np.sign(np.diag(r))  # uniform over O(3) (Mezzadri 2007), then a proper rotation
    return q if np.linalg.det(q) > 0 else -q


def make_shapes(
    n: int = 800,
    *,
    points: int = 1024,
    classes: tuple[str, ...] = SHAPES,
    noise: float = 0.01,
    rotation: str = "z",
    scale: tuple[float, float] = (0.7, 1.0),
    seed: int = 0,
) -> Dataset:
    """A balanced data set of ``n`` synthetic point clouds (n, points, 3), labels in class order.

    Args:
        n: number of clouds (classes take turns, so every class has ``n // len(classes)`` or one more).
        points: points per cloud (1024 as in Qi et al.'s ModelNet40 setting).
        classes: the shapes, a subset of :data:`SHAPES` (at least two).
        noise: standard deviation of the Gaussian jitter of every point, before fitting into the sphere.
        rotation: ``"z"`` (random rotation about the vertical axis), ``"so3"`` (uniformly random) or ``"none"``.
        scale: range of the random radius of the enclosing sphere (within (0, 1]).
        seed: seed of everything random.

    Returns:
        A :class:`~bastion.data.Dataset` with domain :data:`~bastion.pointcloud.threat.POINT_DOMAIN`.
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise InputError(f"n must be a positive integer, got {n!r}")
    if isinstance(points, bool) or not isinstance(points, int) or points < 8:
        raise InputError(f"points must be an integer >= 8, got {points!r}")
    classes = tuple(classes)
    unknown = [c for c in classes if c not in SHAPES]
    if unknown or len(classes) < 2 or len(set(classes)) != len(classes):
        raise InputError(f"classes must be at least two distinct names of {', '.join(SHAPES)}, got {classes!r}")
    if rotation not in ("z", "so3", "none"):
        raise InputError(f"rotation must be 'z', 'so3' or 'none', got {rotation!r}")
    lo, hi = (float(s) for s in scale)
    if not 0 < lo <= hi <= 1:
        raise InputError(f"scale must be a range (lo, hi) with 0 < lo <= hi <= 1, got {scale!r}")
    if not (math.isfinite(noise) and noise >= 0):
        raise InputError(f"noise must be a finite number >= 0, got {noise!r}")
    rng = np.random.default_rng(seed)
    xs = np.empty((n, points, 3), dtype=np.float32)
    ys = np.arange(n) % len(classes)
    for i, c in enumerate(ys):
        pts = sample_shape(classes[c], points, rng) + rng.normal(scale=noise, size=(points, 3))
        if rotation != "none":
            pts = pts @ _rotation(rng, rotation).T
        pts -= pts.mean(axis=0)
        pts *= rng.uniform(lo, hi) / np.linalg.norm(pts, axis=1).max()
        xs[i] = pts
    x = torch.from_numpy(np.clip(xs, *POINT_DOMAIN))
    name = f"shapes(n={n}, points={points}, seed={seed})"
    return Dataset(x, torch.from_numpy(ys), num_classes=len(classes), name=name, domain=POINT_DOMAIN)
