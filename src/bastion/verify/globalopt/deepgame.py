"""DeepGame: converging upper and lower bounds of adversarial distances from a two-player game over input features.

Wu, Wicker, Ruan, Huang & Kwiatkowska, "A Game-Based Approximate Verification of Deep Neural Networks with Provable
Guarantees", Theoretical Computer Science 807, 2020 (reference code: github.com/TrustAI/DeepGame).

**The game.** The input ``x`` (``D`` coordinates, domain ``[lo, hi]``) is partitioned into *features* (sets of
coordinates). Player I picks a feature, player II changes one coordinate of it by ``+tau`` or ``-tau``; the
reachable inputs form the lattice ``v(k) = clip(x + tau k, lo, hi)``, ``k`` integer, with each ``k_i`` limited to
the levels that still move inside the domain (the last one lands on the bound). Distances are measured with
:class:`bastion.threat.LpBall` (``l0``, ``l1``, ``l2``, ``linf``) between ``v(k)`` and ``x``, and ``eps`` (the
paper's ``eta``) is the distance budget: the quantities below are capped at ``eps``.

* **Cooperative** (the maximum safe radius, MSR): both players minimise the distance to an adversarial example;
  the game value is ``min { ||v(k) - x|| : argmax f(v(k)) != y }`` over the lattice, and the continuous MSR
  ``min { ||z - x|| : argmax f(z) != y }`` lies below it.
* **Competitive** (feature robustness): player I commits to the feature that is hardest to break and player II
  then minimises within it: the value is ``max_λ FR(λ)``, ``FR(λ)`` the smallest distance of an adversarial example
  that changes only the coordinates of ``λ`` (as the reference ``CompetitiveAlphaBeta`` computes it, one feature at
  a time).

**Upper bounds: Monte Carlo tree search** (UCT, Kocsis & Szepesvári 2006, exploration constant ``sqrt(2)``). The
tree alternates player I nodes (children: the features) and player II nodes (children: the atomic ``±tau`` moves
of their feature). Each expansion creates all children and runs ``samples_per_node = 3`` random playouts from each
(the reference's ``MCTS_multi_samples``), all batched in one tensor; a playout picks random features and moves
until the input is adversarial (its value is then its distance after the reference's ``scrutinizePath`` greedy
undoing of moves that are not needed), leaves the budget ``eps`` or reaches ``max_depth`` moves (value ``eps``).
The child's value is the best of its playouts and is back-propagated. Every adversarial example found is
re-executed, inside the domain, and the best one gives ``upper``; it can only decrease with iterations. In the
competitive game the root (player I) maximises and player II minimises, and ``upper = max_λ best(λ)`` (``inf``
while some feature has no adversarial example). The paper's budgets: 300 seconds of MCTS (``mcts_seconds``).

**Lower bounds: admissible A\\*** (cooperative) over the lattice, moving every coordinate *outwards* only (``|k_i|``
grows; every lattice point is reached that way, so nothing is lost). A node ``k`` stands for the region
``R(k)`` of all inputs ``z`` (continuous, not only lattice points) that lie beyond ``v(k)`` in every coordinate it
changed: ``z_i >= v_i`` where ``k_i > 0``, ``z_i <= v_i`` where ``k_i < 0``, anything where ``k_i = 0`` (within
``x ± eps`` and the domain). Rounding every input towards ``x`` onto the lattice maps ``R(k)`` exactly onto the
outward descendants of ``k``, so expanding ``k`` splits ``R(k)`` into its children's regions and its own *cell*
(the inputs that round to ``k``): the regions of the open nodes and the cells of the expanded ones always cover the
whole ball. The heuristic: with ``K_j`` the Lipschitz constant of the margin ``f_y - f_j`` over ``R(k)`` w.r.t. the
norm (:func:`~bastion.verify.globalopt.lipschitz.lipschitz_constant`), an adversarial ``z`` in ``R(k)`` has some
``f_y(z) - f_j(z) <= 0``, hence ``||z - v(k)|| >= h(k) = min_j m_j(v(k)) / K_j``. Because ``z`` lies beyond
``v(k)`` coordinate-wise, ``|z_i - x_i| = |v_i - x_i| + |z_i - v_i|``, so with ``g = ||v(k) - x||``:

* l1: ``||z - x||_1 >= g + h``;  l2: ``||z - x||_2^2 >= g^2 + h^2`` (the cross terms are ``>= 0``);
  l∞: ``||z - x||_∞ >= max(g, h)``;
* l0 (no Lipschitz constant of its own): with ``K_j`` w.r.t. l1 and ``w_i`` the room of coordinate ``i`` in
  ``R(k)``, the change must satisfy ``Σ_{i changed} w_i >= min_j m_j / K_j``; coordinates ``k`` already changed count
  for free, so at least ``s`` more must change, the fewest whose largest rooms close the gap: ``||z - x||_0 >= g + s``.

That bound ``b(k)`` is admissible (it never exceeds the distance of any adversarial input, lattice point or not, in
``R(k)``), so A* pops nodes in the order of ``b`` and the first adversarial lattice point popped is the exact
minimum of the game (``game_value``). When a node is expanded its cell gets the same bound with the Lipschitz
constant of the (small) cell only, or ``inf`` when ``h`` exceeds the cell's radius (the whole cell is safe). At any
time ``min(b over open nodes, cell bounds of expanded nodes, upper, eps)`` is a proven lower bound of
``min(MSR, eps)``; ``lower`` is the best of these, so it never exceeds the true (continuous) minimal adversarial
distance, let alone the game value. When every node is closed or beyond ``eps`` the sample is proven robust at
``eps``.

**Competitive lower bound: alpha-beta.** Player I's max over features of player II's min within them: features are
searched most robust first (by their MCTS upper bounds) with the A* above restricted to the feature's coordinates
(each giving a proven lower bound of ``FR(λ)``), ``alpha = max_λ lower(λ)`` is the lower bound, and a feature whose
known adversarial distance is ``<= alpha`` is cut off (it cannot raise ``alpha``: the beta cut-off).

**Features.** ``features="grey"`` (the reference's grey-box extraction): the perturbation saliency map sets each
pixel (all its channels) to each of ``saliency_levels = 2`` values ``linspace(lo, hi, 2)`` and records the lowest
resulting score of the predicted class (the reference uses the softmax); pixels sorted by that score, most
influential first, are cut into ``num_features = 10`` equal features (the last takes the remainder).
``features="black"`` (the black-box extraction; the reference calls OpenCV's SIFT): a difference-of-Gaussians
scale space written here in torch (``sigma = 1.6``, ``3`` intervals per octave, octaves until the image is under
8 pixels, extrema over 3x3x3 neighbourhoods with ``|D| > 0.5 * 0.04 / 3`` and the edge test with ratio ``10``,
Lowe's and OpenCV's defaults), keeping up to ``max_keypoints = 200`` (the reference's cap), strongest first; each
pixel joins the keypoint of the largest Gaussian density ``N(dist; 0, size)`` (``size = 2 sigma``), as in the
reference's ``get_partitions``. Fewer than two keypoints (e.g. tiny or flat images, or 1-D inputs) fall back to a
grid of ``num_features`` blocks. A tensor of integer feature ids (the input's shape, or its spatial shape for all
channels) defines features directly.

**Deviations from the reference code, and why.**

* Atomic moves act on one coordinate (one channel of one pixel) as in the reference's A*, not on all channels at
  once as in its MCTS, so the two searches share one game. Stepping back from a clipped level returns to the
  lattice (``x + (k-1) tau``) instead of ``bound - tau``, which keeps the state space a finite lattice.
* UCT selects the child of largest ``reward + sqrt(2) sqrt(ln N / n)`` with rewards normalised to ``[0, 1]``
  (``1 - d / eps`` when minimising, ``d / eps`` when maximising), as in the paper; the reference samples the next
  child with probabilities proportional to un-normalised values (cooperative) and uses ``n / cost * eta``.
* The reference A* heuristic ``(p_max - p_2nd) * 2 tau`` is not admissible, so its "lower bound" is not a bound;
  here the heuristic is the Lipschitz bound derived above, which makes ``lower`` a proof. The reference's
  "useful action" filter (retry up to 10 moves until the confidence changes) is replaced by only drawing moves
  that change the input. Playouts are capped at ``max_depth`` moves (default ``2 ceil(eps / tau)``, the
  reference's competitive cap ``eta / tau`` doubled) so that batched playouts always end.
* Budgets are iterations/expansions and seconds (``mcts_iterations``, ``mcts_seconds = 300``, ``astar_budget``,
  ``astar_seconds``); the reference only has the 300 s of MCTS and runs A* until ``eta``.
"""

from __future__ import annotations

import heapq
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bastion.data import Dataset, as_dataset
from bastion.errors import InputError
from bastion.models.checks import check_logits, eval_mode, model_device, model_fingerprint
from bastion.results import SampleRecord, Status
from bastion.store import Store, resumable_run
from bastion.threat import LpBall, canonical_norm, check_domain
from bastion.verify.globalopt.lipschitz import lipschitz_constant
from bastion.verify.ir import Network, as_network

__all__ = [
    "GAMES",
    "DeepGameResult",
    "DeepGameSummary",
    "black_box_features",
    "deepgame",
    "deepgame_verify",
    "grey_box_features",
    "grid_features",
]

#: The two games.
GAMES = ("cooperative", "competitive")
#: UCT exploration constant (the reference's ``explorationRate``).
UCT_C = math.sqrt(2.0)
_CHUNK = 4096  # inputs per forward pass
_INF = math.inf


# ---------------------------------------------------------------------------------------------------------------
# Features
# ---------------------------------------------------------------------------------------------------------------


def _spatial(shape: tuple[int, ...]) -> tuple[int, int, int] | None:
    """``(C, H, W)`` for image-like inputs ``(C, H, W)`` or ``(H, W)``, else None."""
    if len(shape) == 3:
        return shape[0], shape[1], shape[2]
    if len(shape) == 2:
        return 1, shape[0], shape[1]
    return None


def _broadcast_ids(pixel_ids: Tensor, shape: tuple[int, ...]) -> Tensor:
    """Feature ids per input coordinate from ids per pixel (``(H, W)``), shared by every channel."""
    sp = _spatial(shape)
    if sp is None:
        return pixel_ids.reshape(shape)
    c, h, w = sp
    return pixel_ids.reshape(1, h, w).expand(c, h, w).reshape(shape).clone()


def grid_features(shape: tuple[int, ...], num_features: int = 10) -> Tensor:
    """A grid partition: ``num_features`` rectangular blocks of the image (contiguous chunks for 1-D inputs).

    Args:
        shape: the per-sample input shape.
        num_features: how many blocks (at most the number of pixels).

    Returns:
        int64 feature ids of the input's shape, every channel of a pixel in the same feature.
    """
    _positive_int(num_features, "num_features")
    sp = _spatial(tuple(shape))
    if sp is None:
        d = math.prod(shape)
        k = min(num_features, d)
        return (torch.arange(d) * k // d).reshape(shape)
    _, h, w = sp
    k = min(num_features, h * w)
    rows = max(1, min(h, round(math.sqrt(k * h / w))))
    cols = max(1, min(w, math.ceil(k / rows)))
    r = torch.arange(h) * rows // h
    c = torch.arange(w) * cols // w
    ids = (r[:, None] * cols + c[None, :]).clamp(max=k - 1)  # blocks past the k-th merge into the last one
    return _broadcast_ids(_relabel(ids), tuple(shape))


def _relabel(ids: Tensor) -> Tensor:
    """Feature ids renumbered ``0..F-1`` in the order of their values."""
    return torch.unique(ids, return_inverse=True)[1].reshape(ids.shape)


@torch.no_grad()
def grey_box_features(
    model: nn.Module,
    x: Tensor,
    label: int,
    *,
    num_features: int = 10,
    saliency_levels: int = 2,
    domain: tuple[float, float] = (0.0, 1.0),
) -> Tensor:
    """The reference's grey-box features: pixels sorted by a perturbation saliency map, cut into equal features.

    Every pixel (all its channels) is set in turn to each of ``saliency_levels`` values ``linspace(lo, hi, n)``
    (one batch of ``pixels * n`` inputs); its saliency is the lowest softmax score of ``label`` it reaches. The
    pixels, most influential (lowest score) first, are cut into ``num_features`` features of equal size, the last
    taking the remainder.

    Args:
        model: the classifier (in eval mode).
        x: one input ``(1, *input_shape)``.
        label: the class whose score is watched (the prediction).
        num_features: number of features (the reference's ``NUM_PARTITION = 10``).
        saliency_levels: values tried per pixel (the reference's ``NUM_OF_PIXEL_MANIPULATION = 2``).
        domain: input domain ``(lo, hi)``.

    Returns:
        int64 feature ids of the input's shape.
    """
    _positive_int(num_features, "num_features")
    if isinstance(saliency_levels, bool) or not isinstance(saliency_levels, int) or saliency_levels < 2:
        raise InputError(f"saliency_levels must be an integer >= 2, got {saliency_levels!r}")
    shape = tuple(x.shape[1:])
    sp = _spatial(shape)
    if sp is None:
        c, npix = 1, math.prod(shape)
    else:
        c, h, w = sp
        npix = h * w
    flat = x.reshape(1, c, npix)
    levels = torch.linspace(domain[0], domain[1], saliency_levels, dtype=x.dtype, device=x.device)
    scores = torch.empty(npix, saliency_levels, dtype=x.dtype, device=x.device)
    per = max(1, _CHUNK // saliency_levels)
    for start in range(0, npix, per):
        pix = torch.arange(start, min(npix, start + per), device=x.device)
        batch = flat.expand(pix.numel() * saliency_levels, c, npix).clone()
        rows = torch.arange(batch.shape[0], device=x.device)
        batch[rows, :, pix.repeat_interleave(saliency_levels)] = levels.repeat(pix.numel())[:, None]
        prob = F.softmax(model(batch.reshape(-1, *shape)), dim=1)[:, label]
        scores[pix] = prob.reshape(pix.numel(), saliency_levels)
    order = scores.amin(dim=1).argsort(stable=True)
    k = min(num_features, npix)
    size = npix // k
    ids = torch.empty(npix, dtype=torch.long, device=x.device)
    ids[order] = (torch.arange(npix, device=x.device) // size).clamp(max=k - 1)
    return _broadcast_ids(ids.cpu(), shape)


def _gaussian_blur(img: Tensor, sigma: float) -> Tensor:
    """Separable Gaussian blur of ``(1, 1, H, W)`` with reflect padding (radius ``ceil(3 sigma)``)."""
    radius = max(1, math.ceil(3 * sigma))
    t = torch.arange(-radius, radius + 1, dtype=img.dtype, device=img.device)
    k = torch.exp(-(t**2) / (2 * sigma**2))
    h, w = img.shape[-2:]
    out = img
    pad_w, pad_h = min(radius, w - 1), min(radius, h - 1)
    # a kernel wider than the image is truncated to what reflect padding allows, and renormalised
    if pad_w > 0:
        kw = k[radius - pad_w : radius + pad_w + 1]
        out = F.pad(out, (pad_w, pad_w, 0, 0), mode="reflect")
        out = F.conv2d(out, (kw / kw.sum()).reshape(1, 1, 1, -1))
    if pad_h > 0:
        kh = k[radius - pad_h : radius + pad_h + 1]
        out = F.pad(out, (0, 0, pad_h, pad_h), mode="reflect")
        out = F.conv2d(out, (kh / kh.sum()).reshape(1, 1, -1, 1))
    return out


def _dog_keypoints(
    img: Tensor, sigma: float, intervals: int, contrast: float, edge: float
) -> list[tuple[float, float, float, float]]:
    """Difference-of-Gaussians extrema ``(row, col, size, |response|)`` of a grey image ``(H, W)``, in pixels."""
    points: list[tuple[float, float, float, float]] = []
    base = img[None, None]
    scale = 1.0
    k = 2.0 ** (1.0 / intervals)
    threshold = 0.5 * contrast / intervals
    while min(base.shape[-2:]) >= 8:
        sigmas = [sigma * k**i for i in range(intervals + 3)]
        gauss = torch.cat([_gaussian_blur(base, s) for s in sigmas], dim=1)  # (1, S, H, W)
        dog = gauss[:, 1:] - gauss[:, :-1]  # (1, S-1, H, W)
        d = dog[0]
        # 3x3x3 extrema: compare with the max/min over the neighbourhood (scale, row, col)
        mx = F.max_pool3d(d[None, None], 3, stride=1, padding=1)[0, 0]
        mn = -F.max_pool3d(-d[None, None], 3, stride=1, padding=1)[0, 0]
        cand = ((d >= mx) | (d <= mn)) & (d.abs() > threshold)
        cand[0] = False
        cand[-1] = False
        cand[:, [0, -1], :] = False
        cand[:, :, [0, -1]] = False
        s_idx, r_idx, c_idx = cand.nonzero(as_tuple=True)
        if s_idx.numel():
            dxx = d[s_idx, r_idx, c_idx + 1] + d[s_idx, r_idx, c_idx - 1] - 2 * d[s_idx, r_idx, c_idx]
            dyy = d[s_idx, r_idx + 1, c_idx] + d[s_idx, r_idx - 1, c_idx] - 2 * d[s_idx, r_idx, c_idx]
            dxy = (
                d[s_idx, r_idx + 1, c_idx + 1] - d[s_idx, r_idx + 1, c_idx - 1]
                - d[s_idx, r_idx - 1, c_idx + 1] + d[s_idx, r_idx - 1, c_idx - 1]
            ) / 4  # fmt: skip
            tr, det = dxx + dyy, dxx * dyy - dxy**2
            keep = (det > 0) & (tr**2 * edge < (edge + 1) ** 2 * det)
            for s, r, c, v in zip(
                s_idx[keep].tolist(), r_idx[keep].tolist(), c_idx[keep].tolist(),
                d[s_idx, r_idx, c_idx][keep].abs().tolist(),
            ):  # fmt: skip
                points.append((r * scale, c * scale, 2 * sigmas[s] * scale, v))
        base = F.interpolate(gauss[:, intervals : intervals + 1], scale_factor=0.5, mode="nearest")
        scale *= 2
    return points


@torch.no_grad()
def black_box_features(
    x: Tensor,
    *,
    num_features: int = 10,
    sigma: float = 1.6,
    intervals: int = 3,
    contrast_threshold: float = 0.04,
    edge_threshold: float = 10.0,
    max_keypoints: int = 200,
) -> Tensor:
    """Black-box features: SIFT-like difference-of-Gaussians keypoints, each pixel joining its nearest keypoint.

    The image (channels averaged) is searched for scale-space extrema of the difference of Gaussians (Lowe, IJCV
    2004) with an edge-response test; the strongest ``max_keypoints`` are kept, and every pixel joins the keypoint
    of the largest density ``N(dist; 0, size)`` (the reference's rule). With fewer than two keypoints (tiny or flat
    images, non-image inputs) the features are :func:`grid_features` with ``num_features`` blocks.

    Args:
        x: one input ``(1, *input_shape)``.
        num_features: blocks of the grid fallback.
        sigma: base scale of the Gaussian pyramid (SIFT's 1.6).
        intervals: scales per octave (SIFT's 3).
        contrast_threshold: SIFT's contrast threshold (0.04; the extrema must exceed ``0.5 * it / intervals``).
        edge_threshold: largest ratio of principal curvatures (10).
        max_keypoints: keypoints kept, strongest first (the reference's 200).

    Returns:
        int64 feature ids of the input's shape.
    """
    shape = tuple(x.shape[1:])
    _positive_int(max_keypoints, "max_keypoints")
    for name, v in (("sigma", sigma), ("contrast_threshold", contrast_threshold), ("edge_threshold", edge_threshold)):
        if not (isinstance(v, (int, float)) and math.isfinite(v) and v > 0):
            raise InputError(f"{name} must be a finite number > 0, got {v!r}")
    _positive_int(intervals, "intervals")
    sp = _spatial(shape)
    if sp is None:
        return grid_features(shape, num_features)
    c, h, w = sp
    grey = x.reshape(c, h, w).mean(dim=0).to(torch.float64)
    span = float(grey.max() - grey.min())
    points: list[tuple[float, float, float, float]] = []
    if span > 0:
        points = _dog_keypoints((grey - grey.min()) / span, sigma, intervals, contrast_threshold, edge_threshold)
    points.sort(key=lambda p: -p[3])
    points = points[:max_keypoints]
    if len(points) < 2:
        return grid_features(shape, num_features)
    kp = torch.tensor(points, dtype=torch.float64, device=x.device)
    rr, cc = torch.meshgrid(
        torch.arange(h, dtype=torch.float64, device=x.device),
        torch.arange(w, dtype=torch.float64, device=x.device),
        indexing="ij",
    )
    dist = ((rr.reshape(-1, 1) - kp[:, 0]) ** 2 + (cc.reshape(-1, 1) - kp[:, 1]) ** 2).sqrt()
    size = kp[:, 2]
    log_density = -(dist**2) / (2 * size**2) - size.log()
    ids = log_density.argmax(dim=1).reshape(h, w)
    return _broadcast_ids(_relabel(ids).cpu(), shape)


def _check_feature_tensor(features: Tensor, shape: tuple[int, ...]) -> Tensor:
    if features.dtype.is_floating_point or features.dtype == torch.bool or features.is_complex():
        raise InputError(f"a features tensor must hold integer feature ids, got dtype {features.dtype}")
    f = features.detach().cpu().long()
    sp = _spatial(shape)
    if tuple(f.shape) != shape:
        if sp is not None and tuple(f.shape) == (sp[1], sp[2]):
            f = _broadcast_ids(f, shape)
        else:
            want = f"{shape}" + (f" or {(sp[1], sp[2])}" if sp is not None else "")
            raise InputError(f"a features tensor must have the input's shape {want}, got {tuple(features.shape)}")
    if bool((f < 0).any()):
        raise InputError("feature ids must be >= 0")
    return _relabel(f)


# ---------------------------------------------------------------------------------------------------------------
# The game's discrete space and its evaluation
# ---------------------------------------------------------------------------------------------------------------


class _Game:
    """The lattice around one input, the model evaluations on it and the bookkeeping of the best example."""

    def __init__(
        self, model: nn.Module, x: Tensor, y: int, features: Tensor, norm: str, eps: float, tau: float,
        domain: tuple[float, float], net: Network | None, lipschitz: str,
    ) -> None:  # fmt: skip
        self.model, self.y, self.norm, self.eps, self.tau, self.domain = model, y, norm, eps, tau, domain
        self.shape = tuple(x.shape[1:])
        self.x = x.reshape(-1)
        self.dev, self.dtype = x.device, x.dtype
        lo, hi = domain
        self.D = self.x.numel()
        big = torch.iinfo(torch.int32).max
        up = torch.ceil((hi - self.x) / tau - 1e-9).clamp(0, big)
        down = torch.ceil((self.x - lo) / tau - 1e-9).clamp(0, big)
        self.kmax, self.kmin = up.to(torch.int32), -down.to(torch.int32)
        self.threat = LpBall(norm, _INF, domain)
        self.fid = features.reshape(-1).to(self.dev)
        self.num_features = int(self.fid.max()) + 1
        sizes = torch.bincount(self.fid, minlength=self.num_features)
        self.sizes = sizes
        order = self.fid.argsort(stable=True)
        width = int(sizes.max())
        pad = torch.zeros(self.num_features, width, dtype=torch.long, device=self.dev)
        starts = torch.cumsum(sizes, 0) - sizes
        pos = torch.arange(self.D, device=self.dev) - starts[self.fid[order]]
        pad[self.fid[order], pos] = order
        self.members = pad
        self.evaluations = 0
        self.best_d = _INF
        self.best_x: Tensor | None = None
        self.net = net
        self.lip_method = lipschitz
        self._lip_const: Tensor | None = None
        self.c: Tensor | None = None

    # -- evaluation ---------------------------------------------------------------------------------------------
    def values(self, k: Tensor) -> Tensor:
        """Inputs ``clip(x + tau k)`` (B, D) for lattice points ``k`` (B, D)."""
        lo, hi = self.domain
        return (self.x + self.tau * k.to(self.dtype)).clamp(lo, hi)

    def logits(self, v: Tensor) -> Tensor:
        out = []
        with torch.no_grad():
            for s in range(0, v.shape[0], _CHUNK):
                out.append(self.model(v[s : s + _CHUNK].reshape(-1, *self.shape)))
        self.evaluations += v.shape[0]
        z = torch.cat(out) if out else v.new_zeros(0, 2)
        if self.c is None:
            k = z.shape[1]
            eye = torch.eye(k, dtype=self.dtype, device=self.dev)
            others = [j for j in range(k) if j != self.y]
            self.c = eye[self.y][None, :] - eye[others]  # (K-1, K): rows e_y - e_j
        return z

    def margins(self, z: Tensor) -> Tensor:
        """``f_y - f_j`` for ``j != y`` (B, K-1)."""
        assert self.c is not None
        return z @ self.c.T

    def is_adv(self, z: Tensor) -> Tensor:
        return z.argmax(dim=1) != self.y

    def dist(self, v: Tensor) -> Tensor:
        if v.shape[0] == 0:
            return v.new_zeros(0)
        return self.threat.distance(v, self.x.expand_as(v))

    def record(self, v: Tensor, d: Tensor, adv: Tensor) -> None:
        """Keep the closest adversarial input among rows ``v`` (already evaluated, ``adv`` marks them)."""
        if not bool(adv.any()):
            return
        dd = torch.where(adv, d, torch.full_like(d, _INF))
        j = int(dd.argmin())
        if float(dd[j]) < self.best_d:
            cand = v[j : j + 1].clamp(*self.domain)
            z = self.logits(cand)  # re-execute the example before it becomes the bound
            if bool(self.is_adv(z)[0]) and bool(self.threat.in_domain(cand)[0]):
                self.best_d = float(self.dist(cand)[0])
                self.best_x = cand.reshape(1, *self.shape).clone()

    # -- Lipschitz bounds ---------------------------------------------------------------------------------------
    def lipschitz(self, lower: Tensor, upper: Tensor) -> Tensor:
        """(B, K-1) Lipschitz constants of the margins over the boxes, w.r.t. the norm (l1 for l0)."""
        assert self.c is not None and self.net is not None
        p = "l1" if self.norm == "l0" else self.norm
        if self.lip_method == "norms":
            if self._lip_const is None:
                self._lip_const = lipschitz_constant(
                    self.net, lower[:1].reshape(1, *self.shape), upper[:1].reshape(1, *self.shape), self.c,
                    norm=p, method="norms",
                )[0]  # fmt: skip
            return self._lip_const.expand(lower.shape[0], -1)
        out = []
        for s in range(0, lower.shape[0], 256):
            lo_b = lower[s : s + 256].reshape(-1, *self.shape)
            hi_b = upper[s : s + 256].reshape(-1, *self.shape)
            out.append(lipschitz_constant(self.net, lo_b, hi_b, self.c, norm=p, method="interval"))
        return torch.cat(out)


# ---------------------------------------------------------------------------------------------------------------
# Monte Carlo tree search (upper bounds)
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class _Node:
    parent: int
    state: Tensor  # (D,) int32 lattice point
    player: int  # 1: player I picks a feature; 2: player II moves within ``feature``
    feature: int
    visits: int = 0
    total: float = 0.0
    children: list[int] = field(default_factory=list)
    expanded: bool = False
    terminal: float | None = None  # the value of an adversarial / out-of-budget node


class _MCTS:
    """UCT over the game tree; ``competitive`` makes the root maximise and commits each branch to one feature."""

    def __init__(
        self, game: _Game, *, competitive: bool, samples: int, max_depth: int, c_uct: float,
        gen: torch.Generator,
    ) -> None:  # fmt: skip
        self.g, self.competitive, self.samples, self.max_depth, self.c_uct, self.gen = (
            game, competitive, samples, max_depth, c_uct, gen,
        )  # fmt: skip
        zero = torch.zeros(game.D, dtype=torch.int32, device=game.dev)
        self.nodes = [_Node(-1, zero, 1, -1)]
        self.iterations = 0
        self.deadline = math.inf  # playouts stop at this perf_counter time (the MCTS time budget)
        self.feature_best = [_INF] * game.num_features  # competitive: best adversarial distance per feature
        self.feature_x: list[Tensor | None] = [None] * game.num_features

    # values are distances; each chooser turns them into rewards in [0, 1]
    def _select(self, i: int) -> int:
        node = self.nodes[i]
        maximise = self.competitive and node.player == 1
        ln = math.log(max(node.visits, 1))
        best, best_j = -_INF, node.children[0]
        for j in node.children:
            ch = self.nodes[j]
            if ch.visits == 0:
                return j
            q = ch.total / ch.visits / self.g.eps
            reward = q if maximise else 1.0 - q
            u = reward + self.c_uct * math.sqrt(ln / ch.visits)
            if u > best:
                best, best_j = u, j
        return best_j

    def _rand(self, n: int) -> Tensor:
        return torch.rand(n, generator=self.gen, dtype=torch.float64).to(self.g.dev)

    def _step(self, k: Tensor, feat: Tensor) -> Tensor:
        """One random atomic move per row of ``k`` within feature ``feat`` (rows whose feature is -1 draw one)."""
        g = self.g
        n = k.shape[0]
        free = feat < 0
        if bool(free.any()):
            drawn = (self._rand(n) * g.num_features).long().clamp(max=g.num_features - 1)
            feat = torch.where(free, drawn, feat)
        pos = (self._rand(n) * g.sizes[feat]).long().clamp(max=g.members.shape[1] - 1)
        pos = torch.minimum(pos, g.sizes[feat] - 1)
        coord = g.members[feat, pos]
        sign = torch.where(self._rand(n) < 0.5, -1, 1).to(torch.int32)
        cur = k.gather(1, coord[:, None]).squeeze(1)
        ok = (cur + sign >= g.kmin[coord]) & (cur + sign <= g.kmax[coord])
        sign = torch.where(ok, sign, -sign)
        ok = (cur + sign >= g.kmin[coord]) & (cur + sign <= g.kmax[coord])
        k = k.clone()
        k[torch.arange(n, device=g.dev), coord] = cur + torch.where(ok, sign, torch.zeros_like(sign))
        return k

    def playouts(self, k0: Tensor, first: Tensor, fixed: bool) -> Tensor:
        """Random playouts from the lattice points ``k0`` (W, D); returns their values (W,) (distances or eps).

        ``first`` (W,) is the feature of the first move (-1: random); with ``fixed`` every move stays in it.
        """
        g = self.g
        w = k0.shape[0]
        value = torch.full((w,), g.eps, dtype=torch.float64, device=g.dev)
        k = k0.clone()
        alive = torch.ones(w, dtype=torch.bool, device=g.dev)
        feat = first.clone()
        for depth in range(self.max_depth + 1):
            idx = alive.nonzero().squeeze(1)
            if idx.numel() == 0 or time.perf_counter() > self.deadline:
                break  # out of time: unfinished playouts keep the value eps (no example, no claim)
            v = g.values(k[idx])
            z = g.logits(v)
            d = g.dist(v)
            adv = g.is_adv(z)
            if bool(adv.any()):
                a = idx[adv]
                reduced, rd = self._scrutinize(k[a])
                k[a] = reduced
                value[a] = rd.to(torch.float64).clamp(max=g.eps)
                self._note(reduced, rd, feat[a] if fixed else None)
            over = ~adv & (d > g.eps)
            alive[idx[adv | over]] = False
            if depth == self.max_depth:
                break
            idx = alive.nonzero().squeeze(1)
            if idx.numel() == 0:
                break
            k[idx] = self._step(k[idx], feat[idx])
            if not fixed:
                feat[idx] = -1
        return value

    def _note(self, k: Tensor, d: Tensor, feat: Tensor | None) -> None:
        g = self.g
        v = g.values(k)
        g.record(v, d, torch.ones(k.shape[0], dtype=torch.bool, device=g.dev))
        if feat is not None:
            for f, dist, row in zip(feat.tolist(), d.tolist(), v):
                if dist < self.feature_best[f]:
                    self.feature_best[f] = dist
                    self.feature_x[f] = row.reshape(1, *g.shape).clone()

    def _scrutinize(self, k: Tensor) -> tuple[Tensor, Tensor]:
        """The reference's ``scrutinizePath``, batched: undo single changed coordinates while still adversarial.

        Rows are processed in groups so that the candidates (rows x changed coordinates x D) stay small.
        """
        g = self.g
        m = int((k != 0).sum(1).max()) if k.numel() else 0
        per = max(1, 2_000_000 // max(1, m * g.D))
        if k.shape[0] > per:
            parts = [self._scrutinize(k[s : s + per]) for s in range(0, k.shape[0], per)]
            return torch.cat([a for a, _ in parts]), torch.cat([b for _, b in parts])
        k = k.clone()
        active = torch.ones(k.shape[0], dtype=torch.bool, device=g.dev)
        while bool(active.any()):
            rows = active.nonzero().squeeze(1)
            sub = k[rows]
            nz = sub != 0
            m = int(nz.sum(1).max()) if sub.numel() else 0
            if m <= 1:
                break
            # candidate j of row r undoes the j-th changed coordinate of r (padding repeats the row unchanged)
            order = nz.to(torch.int8).argsort(dim=1, descending=True, stable=True)[:, :m]
            valid = torch.gather(nz, 1, order)
            cand = sub[:, None, :].expand(-1, m, -1).clone()
            r_i = torch.arange(rows.numel(), device=g.dev)[:, None].expand(-1, m)
            j_i = torch.arange(m, device=g.dev)[None, :].expand(rows.numel(), -1)
            cand[r_i, j_i, order] = torch.where(valid, torch.zeros_like(order, dtype=cand.dtype), cand[r_i, j_i, order])
            flat = cand.reshape(-1, g.D)
            v = g.values(flat)
            z = g.logits(v)
            ok = (g.is_adv(z) & valid.reshape(-1)).reshape(rows.numel(), m)
            d = torch.where(ok, g.dist(v).reshape(rows.numel(), m), torch.full((rows.numel(), m), _INF, device=g.dev))
            best = d.argmin(dim=1)
            improved = ok.any(dim=1)
            k[rows[improved]] = cand[improved, best[improved]]
            active[rows[~improved]] = False
        v = g.values(k)
        return k, g.dist(v)

    def _children(self, i: int) -> list[int]:
        g = self.g
        node = self.nodes[i]
        new: list[int] = []
        if node.player == 1:
            for f in range(g.num_features):
                self.nodes.append(_Node(i, node.state, 2, f))
                new.append(len(self.nodes) - 1)
        else:
            coords = g.members[node.feature, : int(g.sizes[node.feature])]
            cur = node.state[coords]
            player = 2 if self.competitive else 1
            feat = node.feature if self.competitive else -1
            for s in (1, -1):
                ok = ((cur + s) >= g.kmin[coords]) & ((cur + s) <= g.kmax[coords])
                for cidx in coords[ok].tolist():
                    st = node.state.clone()
                    st[cidx] += s
                    self.nodes.append(_Node(i, st, player, feat))
                    new.append(len(self.nodes) - 1)
        node.children = new
        node.expanded = True
        return new

    def _backprop(self, i: int, value: float) -> None:
        while i >= 0:
            n = self.nodes[i]
            n.visits += 1
            n.total += value
            i = n.parent

    def iterate(self) -> None:
        """One selection, expansion, batched simulation of every new child, and back-propagation."""
        g = self.g
        i = 0
        while self.nodes[i].expanded and self.nodes[i].children:
            i = self._select(i)
        node = self.nodes[i]
        self.iterations += 1
        if node.terminal is not None or node.expanded:
            self._backprop(i, node.terminal if node.terminal is not None else g.eps)
            return
        new = self._children(i)
        if not new:
            node.terminal = g.eps
            self._backprop(i, g.eps)
            return
        states = torch.stack([self.nodes[j].state for j in new])
        # a child of player II is a state to evaluate; a child of player I (the same state) starts in its feature
        first = torch.tensor(
            [self.nodes[j].feature if self.nodes[j].player == 2 else -1 for j in new], device=g.dev
        )  # fmt: skip
        s = self.samples
        vals = self.playouts(states.repeat_interleave(s, 0), first.repeat_interleave(s), self.competitive)
        vals = vals.reshape(len(new), s).amin(dim=1)
        # children whose own state is already adversarial or out of budget are terminal
        v = g.values(states)
        z = g.logits(v)
        d = g.dist(v)
        term = g.is_adv(z) | (d > g.eps)
        for j, val, t in zip(new, vals.tolist(), term.tolist()):
            if t:
                self.nodes[j].terminal = val
            self._backprop(j, val)

    def upper(self) -> float:
        if self.competitive:
            return max(self.feature_best)
        return self.g.best_d


# ---------------------------------------------------------------------------------------------------------------
# Admissible A* (lower bounds)
# ---------------------------------------------------------------------------------------------------------------


def _combine(norm: str, g: Tensor, h: Tensor) -> Tensor:
    """Lower bound of ``||z - x||`` from ``g = ||v - x||`` and ``h <= ||z - v||`` for ``z`` beyond ``v``."""
    if norm == "l1":
        return g + h
    if norm == "l2":
        return torch.sqrt(g * g + h * h)
    return torch.maximum(g, h)


def _heuristic(m: Tensor, lip: Tensor) -> Tensor:
    """``min_j max(m_j, 0) / K_j`` (B,): ``inf`` for a positive margin with a zero constant."""
    flat = torch.where(m > 0, torch.full_like(m, _INF), torch.zeros_like(m))
    ratio = torch.where(lip > 0, m.clamp_min(0) / lip.clamp_min(1e-300), flat)
    return ratio.amin(dim=1)


class _AStar:
    """Best-first search over outward lattice moves with the admissible Lipschitz bound (module docstring)."""

    def __init__(self, game: _Game, coords: Tensor | None, upper: float) -> None:
        self.g = game
        d = game.D
        self.allowed = torch.ones(d, dtype=torch.bool, device=game.dev)
        if coords is not None:
            self.allowed = torch.zeros(d, dtype=torch.bool, device=game.dev)
            self.allowed[coords] = True
        self.upper = upper
        self.goal: Tensor | None = None
        self.goal_d = _INF
        self.closed_floor = _INF
        self.heap: list[tuple[float, float, int, tuple[tuple[int, int], ...]]] = []
        self.seen: set[tuple[tuple[int, int], ...]] = set()
        self.counter = 0
        self.expansions = 0
        self.best_lower = 0.0
        root: tuple[tuple[int, int], ...] = ()
        self.seen.add(root)
        k0 = torch.zeros(1, d, dtype=torch.int32, device=game.dev)
        b = self._bounds(k0)
        if float(b[0]) <= game.eps:
            self._push(float(b[0]), 0.0, root)
        self.update()

    def _push(self, b: float, gdist: float, key: tuple[tuple[int, int], ...]) -> None:
        self.counter += 1
        heapq.heappush(self.heap, (b, -gdist, self.counter, key))

    def _dense(self, key: tuple[tuple[int, int], ...]) -> Tensor:
        k = torch.zeros(self.g.D, dtype=torch.int32, device=self.g.dev)
        if key:
            idx = torch.tensor([a for a, _ in key], device=self.g.dev)
            k[idx] = torch.tensor([b for _, b in key], dtype=torch.int32, device=self.g.dev)
        return k

    def _level(self, k: Tensor) -> Tensor:
        return self.g.values(k)

    def _region(self, k: Tensor) -> tuple[Tensor, Tensor]:
        """Boxes of the regions R(k) (B, D) (see the module docstring)."""
        g = self.g
        lo, hi = g.domain
        v = g.values(k)
        lower = torch.where(k > 0, v, torch.full_like(v, lo))
        upper = torch.where(k < 0, v, torch.full_like(v, hi))
        if g.norm != "l0" and math.isfinite(g.eps):
            lower = torch.maximum(lower, g.x - g.eps)
            upper = torch.minimum(upper, g.x + g.eps)
        fixed = ~self.allowed
        lower = torch.where(fixed, g.x.expand_as(lower), lower)
        upper = torch.where(fixed, g.x.expand_as(upper), upper)
        return torch.minimum(lower, v), torch.maximum(upper, v)

    def _cell(self, k: Tensor) -> tuple[Tensor, Tensor]:
        """Boxes (B, D) of the cells: the inputs that round towards ``x`` onto ``k``."""
        g = self.g
        lo, hi = g.domain
        v = g.values(k)
        nxt = g.values(k + torch.sign(k).to(torch.int32) + (k == 0).to(torch.int32))  # one step further out (+ at 0)
        neg = g.values(k - (k == 0).to(torch.int32))  # at k = 0 also one step down
        at_top = k >= g.kmax
        at_bottom = k <= g.kmin
        upper = torch.where(k > 0, torch.where(at_top, torch.full_like(v, hi), nxt), v)
        lower = torch.where(k < 0, torch.where(at_bottom, torch.full_like(v, lo), nxt), v)
        zero = k == 0
        upper = torch.where(zero, torch.where(at_top, torch.full_like(v, hi), nxt), upper)
        lower = torch.where(zero, torch.where(at_bottom, torch.full_like(v, lo), neg), lower)
        fixed = ~self.allowed
        lower = torch.where(fixed, g.x.expand_as(lower), lower)
        upper = torch.where(fixed, g.x.expand_as(upper), upper)
        return torch.minimum(lower, v), torch.maximum(upper, v)

    def _bounds(self, k: Tensor, *, cell: Tensor | None = None, z: Tensor | None = None) -> Tensor:
        """The admissible bound ``b`` (B,) of each region, or of each cell where ``cell`` (B,) is set (``inf``
        where the whole cell is safe); one Lipschitz computation for all rows."""
        g = self.g
        v = g.values(k)
        if z is None:
            z = g.logits(v)
        if cell is None:
            cell = torch.zeros(k.shape[0], dtype=torch.bool, device=g.dev)
        m = g.margins(z)
        gd = g.dist(v)
        r_lo, r_hi = self._region(k)
        c_lo, c_hi = self._cell(k)
        lower = torch.where(cell[:, None], c_lo, r_lo)
        upper = torch.where(cell[:, None], c_hi, r_hi)
        lip = g.lipschitz(lower, upper)
        room = torch.maximum(upper - v, v - lower)
        if g.norm == "l0":
            need = _heuristic(m, lip)  # l1 change needed
            changed = k != 0
            free = torch.where(changed, room, torch.zeros_like(room)).sum(1)
            extra = torch.where(changed, torch.zeros_like(room), room).sort(dim=1, descending=True).values
            reach = free[:, None] + extra.cumsum(1)
            gap = need - free
            s = (reach < need[:, None]).sum(1).to(v.dtype) + 1
            s = torch.where(gap <= 0, torch.zeros_like(s), s)
            possible = reach[:, -1] >= need if reach.shape[1] else free >= need
            s = torch.where(possible | (gap <= 0), s, torch.full_like(s, _INF))
            return gd + s  # inf where even every room together cannot close the margin: the region is safe
        h = _heuristic(m, lip)
        b = _combine(g.norm, gd, h)
        radius = self.g.threat.distance(room, torch.zeros_like(room))
        return torch.where(cell & (h > radius), torch.full_like(b, _INF), b)

    def lower(self) -> float:
        heap_min = self.heap[0][0] if self.heap else _INF
        return min(heap_min, self.closed_floor, self.upper, self.g.eps)

    def update(self) -> None:
        self.best_lower = max(self.best_lower, self.lower())

    @property
    def exhausted(self) -> bool:
        """No open region can hold an adversarial input closer than ``upper`` (or within ``eps``)."""
        return self.goal is not None or not self.heap or self.heap[0][0] >= self.upper

    def expand(self) -> None:
        """Pop the open node of smallest bound; a goal ends the search, otherwise its children are bounded."""
        g = self.g
        _, _, _, key = heapq.heappop(self.heap)
        self.expansions += 1
        k = self._dense(key)[None]
        # outward moves on allowed coordinates: both signs where k_i = 0, away from x elsewhere
        kk = k[0]
        cur_dir = torch.sign(kk)
        cand_c: list[Tensor] = []
        cand_s: list[Tensor] = []
        for s in (1, -1):
            ok = self.allowed & ((cur_dir == s) | (cur_dir == 0)) & ((kk + s) >= g.kmin) & ((kk + s) <= g.kmax)
            c = ok.nonzero().squeeze(1)
            cand_c.append(c)
            cand_s.append(torch.full_like(c, s))
        coords, signs = torch.cat(cand_c), torch.cat(cand_s)
        items = dict(key)
        keys: list[tuple[tuple[int, int], ...]] = []
        rows: list[int] = []
        for r, (ci, si) in enumerate(zip(coords.tolist(), signs.tolist())):
            new = dict(items)
            new[ci] = new.get(ci, 0) + si
            nk = tuple(sorted(new.items()))
            if nk in self.seen:
                continue
            self.seen.add(nk)
            keys.append(nk)
            rows.append(r)
        sel = torch.tensor(rows, dtype=torch.long, device=g.dev)
        children = kk.expand(len(rows), -1).clone()
        if rows:
            children[torch.arange(len(rows), device=g.dev), coords[sel]] += signs[sel].to(torch.int32)
        # row 0: the node itself (its cell); then the children within the budget (their regions)
        cv = g.values(children)
        cd = g.dist(cv)
        idx = (cd <= g.eps).nonzero().squeeze(1)
        allk = torch.cat([k, children[idx]])
        v = g.values(allk)
        z = g.logits(v)
        if bool(g.is_adv(z[:1])[0]):
            # with an admissible bound, the first adversarial lattice point popped is the game's minimum
            d0 = g.dist(v[:1])
            self.goal, self.goal_d = v[:1].clone(), float(d0[0])
            g.record(v[:1], d0, torch.ones(1, dtype=torch.bool, device=g.dev))
            self.upper = min(self.upper, self.goal_d)
            self.update()
            return
        g.record(v[1:], cd[idx], g.is_adv(z[1:]))
        self.upper = min(self.upper, g.best_d)
        cell = torch.zeros(allk.shape[0], dtype=torch.bool, device=g.dev)
        cell[0] = True
        b = self._bounds(allk, cell=cell, z=z).tolist()
        self.closed_floor = min(self.closed_floor, b[0])
        for j, bj, dj in zip(idx.tolist(), b[1:], cd[idx].tolist()):
            if bj <= g.eps and bj < self.upper:
                self._push(bj, dj, keys[j])
        self.update()


# ---------------------------------------------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class DeepGameResult:
    """The bounds DeepGame proves and finds for one input.

    Attributes:
        lower: proven lower bound. Cooperative: of ``min(MSR, eps)``, the minimal adversarial distance (continuous,
            not only over the lattice). Competitive: of the feature-robustness value ``max_λ min(FR(λ), eps)``.
        upper: distance of ``x_adv`` (cooperative), or ``max_λ`` of the best adversarial distance per feature
            (competitive); ``inf`` when no adversarial example (for some feature) was found.
        x_adv: the adversarial example behind ``upper`` ``(1, *input_shape)``, re-executed and in the domain, or None.
        game: ``"cooperative"`` or ``"competitive"``.
        norm: the distance.
        eps: the distance budget the bounds are capped at.
        tau: the manipulation step.
        label: the true label.
        clean_pred: the model's prediction on ``x``.
        game_value: the exact minimum of the cooperative game on the lattice when A* proved it, else None.
        robust: ``True`` when the search proved that nothing within ``eps`` is adversarial (``lower == eps``).
        features: feature id per input coordinate (the input's shape).
        feature_bounds: competitive game: ``(lower, upper)`` of ``FR(λ)`` per feature (cut-off features keep the
            lower bound they had).
        history: ``(phase, step, lower, upper)`` after every MCTS iteration (phase ``"mcts"``) and A* expansion
            (``"astar"``), for convergence plots.
        evaluations: model evaluations, in inputs.
        mcts_iterations: MCTS iterations run.
        astar_expansions: A* expansions run (over all features in the competitive game).
        seconds: wall time.
    """

    lower: float
    upper: float
    x_adv: Tensor | None
    game: str
    norm: str
    eps: float
    tau: float
    label: int
    clean_pred: int
    game_value: float | None = None
    robust: bool = False
    features: Tensor | None = field(default=None, repr=False)
    feature_bounds: list[tuple[float, float]] = field(default_factory=list, repr=False)
    history: list[tuple[str, int, float, float]] = field(default_factory=list, repr=False)
    evaluations: int = 0
    mcts_iterations: int = 0
    astar_expansions: int = 0
    seconds: float = 0.0


def _positive_int(v: object, name: str, *, zero: bool = False) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < (0 if zero else 1):
        raise InputError(f"{name} must be an integer >= {0 if zero else 1}, got {v!r}")
    return v


def _positive_float(v: object, name: str, *, allow_none: bool = False) -> float | None:
    if v is None and allow_none:
        return None
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
        raise InputError(f"{name} must be a finite number > 0{' or None' if allow_none else ''}, got {v!r}")
    return float(v)


def _max_distance(norm: str, d: int, domain: tuple[float, float]) -> float:
    width = domain[1] - domain[0]
    return {"linf": width, "l2": width * math.sqrt(d), "l1": width * d, "l0": float(d)}[norm]


def _check_inputs(model: object, x: object, y: object, domain: tuple[float, float]) -> tuple[Tensor, int]:
    if not isinstance(model, nn.Module):
        raise InputError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(x, Tensor) or not x.is_floating_point():
        raise InputError(f"x must be a floating-point tensor (1, *input_shape), got {type(x).__name__}")
    if x.dim() < 2 or x.shape[0] != 1:
        raise InputError(f"x must be one input with a batch dimension of 1, (1, *input_shape), got {tuple(x.shape)}")
    if not bool(torch.isfinite(x).all()):
        raise InputError("x contains NaN or Inf")
    if bool((x < domain[0]).any()) or bool((x > domain[1]).any()):
        raise InputError(f"x has values outside the input domain {domain}")
    if isinstance(y, Tensor):
        if y.numel() != 1 or y.is_floating_point():
            raise InputError(f"y must be one integer label, got a tensor of shape {tuple(y.shape)} ({y.dtype})")
        y = int(y.reshape(-1)[0])
    if isinstance(y, bool) or not isinstance(y, int):
        raise InputError(f"y must be an integer label, got {y!r}")
    return x, y


def deepgame(
    model: nn.Module,
    x: Tensor,
    y: int | Tensor,
    *,
    game: Literal["cooperative", "competitive"] = "cooperative",
    norm: str = "l2",
    eps: float | None = None,
    features: str | Tensor = "grey",
    num_features: int = 10,
    tau: float = 1.0,
    mcts_iterations: int | None = None,
    mcts_seconds: float | None = 300.0,
    samples_per_node: int = 3,
    max_depth: int | None = None,
    c_uct: float = UCT_C,
    astar_budget: int = 1000,
    astar_seconds: float | None = None,
    lipschitz: Literal["interval", "norms"] = "interval",
    domain: tuple[float, float] = (0.0, 1.0),
    seed: int = 0,
) -> DeepGameResult:
    """DeepGame on one input: MCTS for the upper bound, admissible A* / alpha-beta for the lower bound.

    Args:
        model: classifier returning logits ``(N, K)``; for the lower bound it must be traceable into the
            verification IR (ReLU, LeakyReLU, Sigmoid, Tanh, MaxPool; see
            :func:`~bastion.verify.globalopt.lipschitz.lipschitz_constant`).
        x: the input, ``(1, *input_shape)``, inside ``domain``.
        y: its true label.
        game: ``"cooperative"`` (maximum safe radius) or ``"competitive"`` (feature robustness).
        norm: ``"l0"``, ``"l1"``, ``"l2"`` or ``"linf"``.
        eps: the distance budget (the paper's ``eta``); None: the whole domain (the largest possible distance).
        features: ``"grey"`` (saliency partition), ``"black"`` (DoG keypoints, grid fallback) or a tensor of
            integer feature ids (the input's shape or its spatial shape).
        num_features: features of the grey-box partition and of the grid fallback (the reference's 10).
        tau: the manipulation step (the reference's default run uses 1).
        mcts_iterations: cap on MCTS iterations (None: no cap); 0 skips MCTS.
        mcts_seconds: cap on the MCTS time (the paper's 300 s; None: no cap).
        samples_per_node: random playouts per new node (the reference's 3).
        max_depth: cap on moves per playout (None: ``2 ceil(eps / tau)``, ``2 eps`` for l0).
        c_uct: UCT exploration constant (``sqrt(2)``).
        astar_budget: A* expansions (per feature in the competitive game); 0 skips the lower bound.
        astar_seconds: cap on the A* time (per feature in the competitive game; None: no cap).
        lipschitz: ``"interval"`` (box-local constants, tighter, one bound computation per expansion) or
            ``"norms"`` (one global constant, computed once: for large models).
        domain: the input domain ``(lo, hi)``.
        seed: seed of the playouts (the result is deterministic given it).

    Returns:
        A :class:`DeepGameResult`.

    Raises:
        InputError: on bad arguments (shapes, NaN, values outside the domain, label out of range, unknown game or
            norm, non-positive tau or eps, ...).
    """
    t0 = time.perf_counter()
    domain = check_domain(domain)
    x, y = _check_inputs(model, x, y, domain)
    if game not in GAMES:
        raise InputError(f"game must be one of {GAMES}, got {game!r}")
    norm = canonical_norm(norm)
    tau_f = _positive_float(tau, "tau")
    assert tau_f is not None
    d = x[0].numel()
    if eps is None:
        eps_f = _max_distance(norm, d, domain)
    else:
        if isinstance(eps, bool) or not isinstance(eps, (int, float)) or math.isnan(eps) or eps < 0:
            raise InputError(f"eps must be a number >= 0 (or None for the whole domain), got {eps!r}")
        eps_f = min(float(eps), _max_distance(norm, d, domain))
    if mcts_iterations is not None:
        _positive_int(mcts_iterations, "mcts_iterations", zero=True)
    _positive_float(mcts_seconds, "mcts_seconds", allow_none=True)
    _positive_float(astar_seconds, "astar_seconds", allow_none=True)
    _positive_int(samples_per_node, "samples_per_node")
    _positive_int(astar_budget, "astar_budget", zero=True)
    _positive_int(num_features, "num_features")
    if max_depth is not None:
        _positive_int(max_depth, "max_depth")
    _positive_float(c_uct, "c_uct")
    if lipschitz not in ("interval", "norms"):
        raise InputError(f"lipschitz must be 'interval' or 'norms', got {lipschitz!r}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise InputError(f"seed must be an integer, got {seed!r}")
    fid: Tensor | None = None
    if isinstance(features, str):
        if features not in ("grey", "black"):
            raise InputError(f"features must be 'grey', 'black' or a tensor of feature ids, got {features!r}")
    elif isinstance(features, Tensor):
        fid = _check_feature_tensor(features, tuple(x.shape[1:]))
    else:
        raise InputError(f"features must be 'grey', 'black' or a tensor of feature ids, got {type(features).__name__}")
    dev = model_device(model)
    x = x.detach().to(dev)
    with eval_mode(model):
        with torch.no_grad():
            logits = model(x)
        k = check_logits(logits, 1)
        if not 0 <= y < k:
            raise InputError(f"label y = {y} is out of range for a model with {k} classes")
        pred = int(logits.argmax(1)[0])
        evaluations = 1
        if fid is None:
            if features == "grey":
                fid = grey_box_features(model, x, pred, num_features=num_features, domain=domain)
                sp = _spatial(tuple(x.shape[1:]))
                evaluations += 2 * (d if sp is None else sp[1] * sp[2])
            else:
                fid = black_box_features(x, num_features=num_features)
        if pred != y:
            return DeepGameResult(
                0.0, 0.0, x.clone(), game, norm, eps_f, tau_f, y, pred, game_value=0.0, features=fid,
                evaluations=evaluations, seconds=time.perf_counter() - t0,
            )  # fmt: skip
        if eps_f == 0:  # only x itself is within the budget, and it is classified correctly
            return DeepGameResult(
                0.0, _INF, None, game, norm, 0.0, tau_f, y, pred, robust=True, features=fid,
                evaluations=evaluations, seconds=time.perf_counter() - t0,
            )  # fmt: skip
        net = as_network(model, tuple(x.shape[1:])) if astar_budget > 0 else None
        g = _Game(model, x, y, fid, norm, eps_f, tau_f, domain, net, lipschitz)
        g.evaluations = evaluations
        g.logits(x.reshape(1, -1))
        depth = max_depth if max_depth is not None else max(1, 2 * math.ceil(eps_f / (1.0 if norm == "l0" else tau_f)))
        gen = torch.Generator().manual_seed(seed)
        if game == "cooperative":
            res = _cooperative(g, eps_f, depth, samples_per_node, c_uct, gen, mcts_iterations, mcts_seconds,
                               astar_budget, astar_seconds)  # fmt: skip
        else:
            res = _competitive(g, eps_f, depth, samples_per_node, c_uct, gen, mcts_iterations, mcts_seconds,
                               astar_budget, astar_seconds)  # fmt: skip
    res.features = fid
    res.label, res.clean_pred, res.tau = y, pred, tau_f
    res.evaluations = g.evaluations
    res.seconds = time.perf_counter() - t0
    return res


def _run_mcts(
    tree: _MCTS, iterations: int | None, seconds: float | None, history: list[tuple[str, int, float, float]],
    lower: float,
) -> None:  # fmt: skip
    if iterations == 0:
        return
    start = time.perf_counter()
    if seconds is not None:
        tree.deadline = start + seconds
    while iterations is None or tree.iterations < iterations:
        tree.iterate()
        history.append(("mcts", tree.iterations, lower, tree.upper()))
        if seconds is not None and time.perf_counter() - start > seconds:
            break
        if tree.g.best_d == 0.0:
            break
        if iterations is None and seconds is None and tree.iterations >= 10_000_000:  # pragma: no cover
            break


def _run_astar(
    search: _AStar, budget: int, seconds: float | None, history: list[tuple[str, int, float, float]],
    upper: Any, offset: int = 0,
) -> None:  # fmt: skip
    start = time.perf_counter()
    history.append(("astar", offset, search.best_lower, upper()))
    while search.expansions < budget and not search.exhausted:
        search.expand()
        history.append(("astar", offset + search.expansions, search.best_lower, upper()))
        if seconds is not None and time.perf_counter() - start > seconds:
            break


def _cooperative(
    g: _Game, eps: float, depth: int, samples: int, c_uct: float, gen: torch.Generator, iters: int | None,
    mcts_s: float | None, budget: int, astar_s: float | None,
) -> DeepGameResult:  # fmt: skip
    history: list[tuple[str, int, float, float]] = []
    tree = _MCTS(g, competitive=False, samples=samples, max_depth=depth, c_uct=c_uct, gen=gen)
    _run_mcts(tree, iters, mcts_s, history, 0.0)
    lower, value, expansions, robust = 0.0, None, 0, False
    if budget > 0:
        search = _AStar(g, None, g.best_d)
        _run_astar(search, budget, astar_s, history, lambda: g.best_d)
        lower, expansions = min(search.best_lower, g.best_d), search.expansions
        if search.exhausted and g.best_d <= eps:
            # every lattice point closer than the best example (itself a lattice point) was ruled out
            value = g.best_d
        robust = not search.heap and g.best_d > eps and lower >= eps
    return DeepGameResult(
        lower, g.best_d, g.best_x, "cooperative", g.norm, eps, g.tau, 0, 0, game_value=value, robust=robust,
        history=history, mcts_iterations=tree.iterations, astar_expansions=expansions,
    )  # fmt: skip


def _competitive(
    g: _Game, eps: float, depth: int, samples: int, c_uct: float, gen: torch.Generator, iters: int | None,
    mcts_s: float | None, budget: int, astar_s: float | None,
) -> DeepGameResult:  # fmt: skip
    history: list[tuple[str, int, float, float]] = []
    tree = _MCTS(g, competitive=True, samples=samples, max_depth=depth, c_uct=c_uct, gen=gen)
    _run_mcts(tree, iters, mcts_s, history, 0.0)
    nf = g.num_features
    ub = list(tree.feature_best)
    xs = list(tree.feature_x)
    lb = [0.0] * nf
    alpha, expansions = 0.0, 0
    if budget > 0:
        # alpha-beta: most robust features first, so that alpha grows early and later features get cut off
        for f in sorted(range(nf), key=lambda i: (-ub[i], i)):
            if ub[f] <= alpha or alpha >= eps:
                continue  # beta cut-off: this feature cannot raise player I's value
            coords = g.members[f, : int(g.sizes[f])]
            g.best_d, g.best_x = ub[f], xs[f]
            search = _AStar(g, coords, ub[f])

            def upper_now() -> float:
                return max(max(ub), g.best_d)

            _run_astar(search, budget, astar_s, history, upper_now, offset=expansions)
            expansions += search.expansions
            lb[f] = min(search.best_lower, g.best_d)
            if g.best_d < ub[f]:
                ub[f], xs[f] = g.best_d, g.best_x
            alpha = max(alpha, lb[f])
    upper = max(ub)
    best_f = max(range(nf), key=lambda i: (ub[i], -i))
    x_adv = xs[best_f] if math.isfinite(upper) else None
    return DeepGameResult(
        alpha, upper, x_adv, "competitive", g.norm, eps, g.tau, 0, 0, robust=alpha >= eps > 0,
        feature_bounds=list(zip(lb, ub)), history=history, mcts_iterations=tree.iterations,
        astar_expansions=expansions,
    )  # fmt: skip


# ---------------------------------------------------------------------------------------------------------------
# Data-set level
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class DeepGameSummary:
    """Summary of :func:`deepgame_verify` over a data set, from its per-sample records.

    Attributes:
        n: samples.
        threat: the threat key (``LpBall(norm, eps).key``).
        clean_accuracy: fraction classified correctly.
        robust: fraction proven robust at ``eps`` (lower bound reached the budget).
        falsified: fraction with a known adversarial example (clean errors included).
        mean_lower: mean proven lower bound (0 for misclassified samples).
        mean_upper: mean upper bound over the samples that have one, or None.
        records: per-sample records (``certified`` = lower bound, ``adv_distance`` = upper bound).
        run_id: id of the run in the store, if any.
        seconds: wall time of this call.
    """

    n: int
    threat: str
    clean_accuracy: float
    robust: float
    falsified: float
    mean_lower: float
    mean_upper: float | None
    records: list[SampleRecord] = field(repr=False, default_factory=list)
    run_id: int | None = None
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        """JSON-able summary (without the records)."""
        return {
            "n": self.n, "threat": self.threat, "clean_accuracy": self.clean_accuracy, "robust": self.robust,
            "falsified": self.falsified, "mean_lower": self.mean_lower, "mean_upper": self.mean_upper,
            "run_id": self.run_id, "seconds": self.seconds,
        }  # fmt: skip


def _summarize(records: list[SampleRecord], n: int, threat: str) -> DeepGameSummary:
    mine = [r for r in records if r.threat == threat]
    ups = [r.adv_distance for r in mine if r.adv_distance is not None]
    return DeepGameSummary(
        n=n, threat=threat,
        clean_accuracy=sum(r.clean_pred == r.label for r in mine) / n if n else 0.0,
        robust=sum(r.status == "robust" for r in mine) / n if n else 0.0,
        falsified=sum(r.status == "falsified" for r in mine) / n if n else 0.0,
        mean_lower=sum(r.certified or 0.0 for r in mine) / n if n else 0.0,
        mean_upper=sum(ups) / len(ups) if ups else None, records=mine,
    )  # fmt: skip


def deepgame_verify(
    model: nn.Module,
    data: Dataset | tuple[Tensor, Tensor],
    *,
    norm: str = "l2",
    eps: float | None = None,
    features: str | Tensor = "grey",
    num_features: int = 10,
    tau: float = 1.0,
    mcts_iterations: int | None = None,
    mcts_seconds: float | None = 300.0,
    astar_budget: int = 1000,
    astar_seconds: float | None = None,
    lipschitz: Literal["interval", "norms"] = "interval",
    seed: int = 0,
    store: Store | str | Path | None = None,
    progress: bool = True,
    config: dict[str, Any] | None = None,
) -> DeepGameSummary:
    """The cooperative DeepGame bounds of every sample of a data set, written to the store as they are found.

    Each sample's :class:`~bastion.results.SampleRecord` has the threat key of ``LpBall(norm, eps)`` (``eps`` the
    budget actually used: the whole domain when None), ``certified`` = the proven lower bound of the minimal
    adversarial distance (capped at ``eps``), ``adv_distance`` = the distance of the best adversarial example found
    (None when none), and status ``falsified`` (an adversarial example within ``eps``, or a clean error with
    distance 0), ``robust`` (the search proved nothing within ``eps`` is adversarial) or ``unknown``. Only the
    cooperative game is stored: the competitive value bounds feature robustness, not the minimal adversarial
    distance a record holds. A run interrupted is resumed with the samples not yet done (same arguments, same
    store).

    Args:
        model: classifier returning logits.
        data: a :class:`~bastion.data.Dataset` or a pair ``(x, y)``; its domain is the game's.
        norm, eps, features, num_features, tau, mcts_iterations, mcts_seconds, astar_budget, astar_seconds,
        lipschitz, seed: as in :func:`deepgame` (``seed`` is offset by the sample's index).
        store: a :class:`~bastion.store.Store` or a path, or None (in memory).
        progress: show a progress bar.
        config: extra JSON-able information stored with the run.

    Returns:
        A :class:`DeepGameSummary`.
    """
    t_start = time.perf_counter()
    if not isinstance(model, nn.Module):
        raise InputError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    data = as_dataset(data)
    norm = canonical_norm(norm)
    d = math.prod(data.feature_shape)
    eps_used = _max_distance(norm, d, data.domain) if eps is None else eps
    if isinstance(eps_used, bool) or not isinstance(eps_used, (int, float)) or not eps_used >= 0:
        raise InputError(f"eps must be a number >= 0 or None, got {eps!r}")
    threat = LpBall(norm, float(eps_used), data.domain)
    if isinstance(features, Tensor):
        _check_feature_tensor(features, tuple(data.feature_shape))
    feat_key = features if isinstance(features, str) else f"tensor:{features.tolist()}"
    payload = {
        "threat": threat.key, "game": "cooperative", "features": feat_key, "num_features": num_features,
        "tau": tau, "mcts_iterations": mcts_iterations, "mcts_seconds": mcts_seconds, "astar_budget": astar_budget,
        "astar_seconds": astar_seconds, "lipschitz": lipschitz, "seed": seed,
    }  # fmt: skip
    device = model_device(model)
    with resumable_run(
        store, kind="deepgame", payload=payload, fingerprints=lambda: (model_fingerprint(model), data.fingerprint()),
        n_samples=len(data), threats=[threat.key], config=config,
    ) as run:  # fmt: skip
        for idx, xb, yb in run.batches(data, 1, desc="deepgame", progress=progress):
            i = int(idx[0])
            r = deepgame(
                model, xb.to(device), int(yb[0]), game="cooperative", norm=norm, eps=threat.eps, features=features,
                num_features=num_features, tau=tau, mcts_iterations=mcts_iterations, mcts_seconds=mcts_seconds,
                astar_budget=astar_budget, astar_seconds=astar_seconds, lipschitz=lipschitz, domain=data.domain,
                seed=seed + i,
            )  # fmt: skip
            status: Status
            attack: str | None
            if r.clean_pred != r.label:
                status, attack = "falsified", "clean"
            elif math.isfinite(r.upper) and r.upper <= threat.eps:
                status, attack = "falsified", "deepgame"
            elif r.robust:
                status, attack = "robust", "deepgame"
            else:
                status, attack = "unknown", None
            run.write(
                [
                    SampleRecord(
                        index=i, threat=threat.key, label=r.label, clean_pred=r.clean_pred, status=status,
                        adv_distance=r.upper if math.isfinite(r.upper) else None, certified=r.lower, attack=attack,
                        seconds=r.seconds,
                    )
                ]
            )  # fmt: skip
            run.show(lower=float(r.lower), upper=float(r.upper))
        return run.finish(_summarize(run.records(threat.key), len(data), threat.key), started=t_start)
