"""L0-TRE: proven lower bounds and real upper bounds around the exact minimal L0 distance (MILP), convergence,
the attack inside ``LpBall("l0", k)``, the data-set run with its store and resume, and bad input.

Ground truths, all independent of the code under test:

* ``min_l0_milp``: the exact minimal number of changed inputs of a ``Linear-ReLU-Linear`` network over the whole
  domain, as one MILP with an indicator per input (SciPy/HiGHS, written out here), so ``d(x)`` itself;
* ``corner_brute_force``: every subset of at most 3 features with every feature at ``{lo, hi}`` (an upper bound on
  ``d(x)`` whenever it finds something);
* ``subset_milp_min``: every subset of at most 2 pixels, each box (the subset over the whole domain, the rest clean)
  decided exactly by ``bastion.verify.milp.milp_minimum`` after a hand-written interval pre-screen, so ``d(x)``
  exactly when it is at most 2.
"""

from __future__ import annotations

import copy
import itertools
import math
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import pytest
import scipy.sparse as sp
import torch
import torch.nn.functional as F
from scipy.optimize import Bounds, LinearConstraint, milp
from torch import Tensor, nn

import bastion.verify.globalopt.l0 as l0_mod
from bastion.data import load_digits
from bastion.errors import InputError
from bastion.store import Store
from bastion.threat import LpBall
from bastion.verify.globalopt.l0 import L0TRE, feature_map, global_robustness, l0_robustness, l0_verify
from bastion.verify.ir import Network
from bastion.verify.milp import milp_minimum

#: a lower bound contradicted by an example would be lowered with a warning: here it fails the test
pytestmark = pytest.mark.filterwarnings("error::bastion.errors.BastionWarning")


# --------------------------------------------------------------------------------------------------- models
def tiny_digits_mlp(seed: int, hidden: int = 8) -> nn.Sequential:
    """A 64-h-10 ReLU MLP trained (seeded) on the digits training split, with random pixels set to 0 or 1 during
    training so that the L0 distances are not all 1; float64, eval mode."""
    train, _ = load_digits().train_test_split(test_fraction=0.2, seed=0)
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, hidden), nn.ReLU(), nn.Linear(hidden, 10))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    x, y = train.x.reshape(len(train), -1), train.y
    for _ in range(8):
        perm = torch.randperm(len(y), generator=g)
        for i in range(0, len(y), 128):
            b = perm[i : i + 128]
            xb = x[b]
            flip = torch.rand(xb.shape, generator=g) < 0.05
            xb = torch.where(flip, torch.randint(0, 2, xb.shape, generator=g).to(xb.dtype), xb)
            loss = F.cross_entropy(model(xb), y[b])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return model.double().eval()


@pytest.fixture(scope="module")
def digits_test() -> tuple[Tensor, Tensor]:
    _, test = load_digits().train_test_split(test_fraction=0.2, seed=0)
    return test.x.double(), test.y


@contextmanager
def one_thread() -> Iterator[None]:
    """Module fixtures run before the per-test one-thread fixture of conftest: tiny models train far faster on one."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@pytest.fixture(scope="module")
def nets() -> dict[int, nn.Sequential]:
    with torch.random.fork_rng(), one_thread():
        return {seed: tiny_digits_mlp(seed) for seed in (0, 1)}


def conv_net(seed: int) -> nn.Sequential:
    """A random 2-channel 4x4 convolutional ReLU network with 3 classes (float64)."""
    g = torch.Generator().manual_seed(seed)
    model = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(64, 3))
    for p in model.parameters():
        p.data.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.5)
    return model.double().eval()


# --------------------------------------------------------------------------------------------------- ground truth
def min_l0_milp(model: nn.Sequential, x: Tensor, y: int) -> int:
    """Exact ``min ||x' - x||_0`` over ``x'`` in [0, 1]^D with ``f_j(x') >= f_y(x')`` for some ``j != y``.

    Variables: inputs ``x'``, change indicators ``z`` (``|x'_i - x_i| <= z_i``), pre-activations ``p``, ReLU
    outputs ``a`` with one binary ``s`` per neuron (big-M from interval bounds over the whole domain), and a binary
    ``c_j`` per other class selecting the class that must win. Ties count as adversarial, so this is a lower bound on
    the distance of any input the network misclassifies: a sound lower bound must not exceed it.
    """
    w1, b1 = model[1].weight.detach().double().numpy(), model[1].bias.detach().double().numpy()
    w2, b2 = model[3].weight.detach().double().numpy(), model[3].bias.detach().double().numpy()
    x0 = x.reshape(-1).double().numpy()
    d, h, k = x0.size, b1.size, b2.size
    lo_p = b1 + np.minimum(w1, 0).sum(1)
    hi_p = b1 + np.maximum(w1, 0).sum(1)
    hi_a = np.maximum(hi_p, 0)
    others = [j for j in range(k) if j != y]
    ix, iz, ip, ia, i_s, ic = 0, d, 2 * d, 2 * d + h, 2 * d + 2 * h, 2 * d + 3 * h
    nv = ic + len(others)
    rows: list[np.ndarray] = []
    rlo: list[float] = []
    rhi: list[float] = []

    def row(coefs: list[tuple[int, float]], lo: float, hi: float) -> None:
        r = np.zeros(nv)
        for i, v in coefs:
            r[i] += v
        rows.append(r)
        rlo.append(lo)
        rhi.append(hi)

    for i in range(d):
        row([(ix + i, 1.0), (iz + i, -(1.0 - x0[i]))], -np.inf, x0[i])
        row([(ix + i, -1.0), (iz + i, -x0[i])], -np.inf, -x0[i])
    for n in range(h):
        row([(ip + n, 1.0)] + [(ix + i, -w1[n, i]) for i in range(d)], b1[n], b1[n])
        row([(ia + n, 1.0), (ip + n, -1.0)], 0.0, np.inf)
        row([(ia + n, 1.0), (ip + n, -1.0), (i_s + n, -lo_p[n])], -np.inf, -lo_p[n])
        row([(ia + n, 1.0), (i_s + n, -hi_a[n])], -np.inf, 0.0)
    for t, j in enumerate(others):
        w, cst = w2[j] - w2[y], b2[j] - b2[y]
        big = -(cst + np.minimum(w * hi_a, 0).sum()) + 1.0
        row([(ia + n, w[n]) for n in range(h)] + [(ic + t, -big)], -cst - big, np.inf)
    row([(ic + t, 1.0) for t in range(len(others))], 1.0, 1.0)
    lb = np.concatenate([np.zeros(d), np.zeros(d), lo_p, np.zeros(2 * h), np.zeros(len(others))])
    ub = np.concatenate([np.ones(d), np.ones(d), hi_p, hi_a, np.ones(h), np.ones(len(others))])
    integ = np.concatenate([np.zeros(d), np.ones(d), np.zeros(2 * h), np.ones(h), np.ones(len(others))])
    obj = np.zeros(nv)
    obj[iz : iz + d] = 1.0
    res = milp(
        obj, integrality=integ, bounds=Bounds(lb, ub), constraints=[LinearConstraint(sp.csr_matrix(np.array(rows)),
        np.array(rlo), np.array(rhi))], options={"mip_rel_gap": 0.0},
    )  # fmt: skip
    assert res.status == 0, res.message
    return round(res.fun)


def corner_brute_force(model: nn.Module, x: Tensor, y: int, kmax: int) -> int | None:
    """The smallest ``k <= kmax`` for which some ``k`` features set to 0/1 are misclassified, else None."""
    flat = x.reshape(-1)
    d = flat.numel()
    for k in range(1, kmax + 1):
        subsets = torch.tensor(list(itertools.combinations(range(d), k)))
        corners = torch.tensor(list(itertools.product([0.0, 1.0], repeat=k)), dtype=flat.dtype)
        for chunk in subsets.split(4096):
            imgs = flat.repeat(chunk.shape[0], corners.shape[0], 1)
            for j in range(k):
                imgs[
                    torch.arange(chunk.shape[0])[:, None], torch.arange(corners.shape[0])[None, :], chunk[:, j, None]
                ] = corners[None, :, j]
            with torch.no_grad():
                pred = model(imgs.reshape(-1, *x.shape)).argmax(1)
            if bool((pred != y).any()):
                return k
    return None


def _interval(model: nn.Sequential, lo: Tensor, hi: Tensor) -> tuple[Tensor, Tensor]:
    """Hand-written interval arithmetic through Conv2d / Linear / ReLU / Flatten (a sound pre-screen)."""
    for layer in model:
        mid, rad = (lo + hi) / 2, (hi - lo) / 2
        if isinstance(layer, nn.Conv2d):
            c = F.conv2d(mid, layer.weight, layer.bias, padding=layer.padding)
            r = F.conv2d(rad, layer.weight.abs(), None, padding=layer.padding)
            lo, hi = c - r, c + r
        elif isinstance(layer, nn.Linear):
            c, r = F.linear(mid, layer.weight, layer.bias), F.linear(rad, layer.weight.abs())
            lo, hi = c - r, c + r
        elif isinstance(layer, nn.ReLU):
            lo, hi = lo.clamp(min=0), hi.clamp(min=0)
        else:
            lo, hi = layer(lo), layer(hi)
    return lo, hi


def subset_milp_min(model: nn.Sequential, x: Tensor, y: int, kmax: int) -> int | None:
    """Exact ``d(x)`` in pixels (all channels of a pixel free together) when it is at most ``kmax``, else None.

    For ``k = 1 .. kmax`` and every ``k``-subset of pixels, the box "subset over [0, 1], the rest clean" holds a
    misclassified input iff ``min (f_y - f_j) <= 0`` over it for some ``j``: decided exactly by the MILP of
    ``bastion.verify.milp`` wherever the interval pre-screen cannot show ``f_y - f_j > 0``.
    """
    net = Network.from_module(model, tuple(x.shape))
    _, h, w = x.shape
    k_out = model(x[None]).shape[1]
    for k in range(1, kmax + 1):
        for subset in itertools.combinations(range(h * w), k):
            lo, hi = x.clone(), x.clone()
            for p in subset:
                lo[:, p // w, p % w], hi[:, p // w, p % w] = 0.0, 1.0
            with torch.no_grad():
                out_lo, out_hi = _interval(model, lo[None], hi[None])
            for j in range(k_out):
                if j == y or float(out_lo[0, y] - out_hi[0, j]) > 0:  # proven safe for class j
                    continue
                coef = torch.zeros(k_out, dtype=torch.float64)
                coef[y], coef[j] = 1.0, -1.0
                value, _ = milp_minimum(net, lo, hi, coef)
                if value <= 0:
                    return k
    return None


def changed_features(x_adv: Tensor, x: Tensor, feature: str) -> Tensor:
    feat_of, n_f = feature_map(tuple(x.shape[1:]), feature)
    diff = (x_adv != x).reshape(x.shape[0], -1).double()
    return (torch.zeros(x.shape[0], n_f, dtype=torch.float64).index_add_(1, feat_of, diff) > 0).sum(1)


def assert_real_examples(model: nn.Module, x: Tensor, y: Tensor, res: l0_mod.L0Bounds) -> None:
    """Every finite upper bound is the changed-feature count of a re-executed misclassified input in the domain."""
    with torch.no_grad():
        pred = model(res.x_adv).argmax(1)
    finite = torch.isfinite(res.upper)
    assert bool((res.success == finite).all())
    assert bool((pred[finite] != y[finite]).all()), "an upper bound without a misclassified example"
    assert bool(((res.x_adv >= 0) & (res.x_adv <= 1)).all())
    counts = changed_features(res.x_adv, x, res.feature).double()
    assert torch.equal(counts[finite], res.upper[finite])
    assert bool((res.lower.double() <= res.upper).all())


# --------------------------------------------------------------------------------------------------- tests
#: Test images whose distances on the seed-1 network cover d = 1, 2, 3 and a bracket that does not meet at t = 2.
SAMPLES = [1, 2, 3, 11, 15]


def test_bracket_the_exact_minimum(nets, digits_test) -> None:
    """lower <= d(x) (MILP) <= upper on a digits MLP; exact where d <= 3; the corner brute force agrees."""
    model = nets[1]
    x, y = digits_test[0][SAMPLES], digits_test[1][SAMPLES]
    res = l0_robustness(model, x, y, max_subset=2)
    assert_real_examples(model, x, y, res)
    exact = 0
    for i in range(len(SAMPLES)):
        if int(res.clean_pred[i]) != int(y[i]):
            assert int(res.lower[i]) == 0 and float(res.upper[i]) == 0.0
            exact += 1
            continue
        d = min_l0_milp(model, x[i], int(y[i]))
        lo, up = int(res.lower[i]), float(res.upper[i])
        assert lo <= d <= up, f"sample {SAMPLES[i]}: [{lo}, {up}] misses d = {d}"
        corner = corner_brute_force(model, x[i], int(y[i]), 2)
        if corner is not None:
            assert d <= corner
            assert up <= corner, "the corners of level <= 2 are all searched"
        exact += lo == d or d > 3  # t = 2 proves at most L = 3
    assert exact >= 0.8 * len(SAMPLES), "the lower bound should be exact on most of these samples"
    assert float(res.converged.double().mean()) >= 0.6, "the bounds should meet on most of these samples"


def test_upper_bounds_are_real_on_a_float32_model(digits_test) -> None:
    torch.manual_seed(0)
    model = tiny_digits_mlp(3, hidden=16).float()
    x, y = digits_test[0][:24].float(), digits_test[1][:24]
    res = l0_robustness(model, x, y, max_subset=1)
    assert res.x_adv.dtype == torch.float32 and res.x_adv.shape == x.shape
    assert_real_examples(model, x, y, res)
    assert bool(torch.isfinite(res.upper).all()), "full-range pixel changes break every sample of a digits MLP"
    correct = res.clean_pred == y
    assert bool((res.evaluations[correct] > 128).all()) and bool((res.seconds > 0).all())


def test_bounds_tighten_with_max_subset(nets, digits_test) -> None:
    model = nets[0]
    x, y = digits_test[0][:16], digits_test[1][:16]
    runs = [l0_robustness(model, x, y, max_subset=t) for t in (1, 2, 3)]
    for res in runs:
        assert_real_examples(model, x, y, res)
        assert bool((res.lower_history.diff(dim=1) >= 0).all()), "lower bounds never decrease with t"
        assert bool((res.upper_history.diff(dim=1) <= 0).all()), "upper bounds never increase with t"
        assert torch.equal(res.lower_history[:, -1], res.lower) and torch.equal(res.upper_history[:, -1], res.upper)
    for a, b in itertools.pairwise(runs):
        assert bool((b.lower >= a.lower).all()) and bool((b.upper <= a.upper).all())
        # the first levels are the same computation
        t = a.lower_history.shape[1]
        assert torch.equal(b.lower_history[:, :t], a.lower_history)
    gaps = [float((r.upper - r.lower.double()).sum()) for r in runs]
    assert gaps[2] < gaps[0], f"the brackets did not tighten: total gaps {gaps}"
    assert int(runs[2].lower.max()) >= 3
    assert float(runs[2].converged.double().mean()) > float(runs[0].converged.double().mean())


def test_budget_caps_the_proof_not_the_soundness(nets, digits_test) -> None:
    model = nets[1]
    x, y = digits_test[0][:12], digits_test[1][:12]
    full = l0_robustness(model, x, y, max_subset=2)
    capped = l0_robustness(model, x, y, max_subset=2, budget=100)  # C(64, 2) = 2016 > 100 >= 64
    assert int(capped.lower.max()) <= 2 and bool((capped.lower <= full.lower).all())
    assert_real_examples(model, x, y, capped)
    nothing = l0_robustness(model, x, y, max_subset=2, budget=10)  # not even level 1 is exhaustive
    assert int(nothing.lower.max()) <= 1 and bool((nothing.boxes == 0).all())
    upper_only = l0_robustness(model, x, y, max_subset=2, certify=False)
    assert torch.equal(upper_only.lower, (upper_only.clean_pred == y).long())
    assert bool((upper_only.upper >= full.lower.double()).all())


def bump_net() -> nn.Sequential:
    """Class 1 wins only for ``x_0`` in (0.45, 0.55) (``f_1 = 1 - 10 |x_0 - 0.5|`` against ``f_0 = 0.5``); the other
    three inputs are ignored. At ``x = 0`` the class is 0 and ``d = 1``, but no input at 0 or 1 is adversarial."""
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 2), nn.ReLU(), nn.Linear(2, 2)).double()
    with torch.no_grad():
        model[1].weight.copy_(torch.tensor([[1.0, 0, 0, 0], [-1.0, 0, 0, 0]]))
        model[1].bias.copy_(torch.tensor([-0.5, 0.5]))
        model[3].weight.copy_(torch.tensor([[0.0, 0.0], [-10.0, -10.0]]))
        model[3].bias.copy_(torch.tensor([0.5, 1.0]))
    return model.eval()


def test_interior_adversarial_examples_known_answer() -> None:
    """Corners never break the bump network: the proof must not claim level 1; splitting or a finer grid finds d = 1."""
    model = bump_net()
    x, y = torch.zeros(1, 1, 2, 2, dtype=torch.float64), torch.tensor([0])
    corners_only = l0_robustness(model, x, y, max_subset=2, splits=0)
    assert int(corners_only.lower[0]) == 1, "level 1 is not safe: x_0 = 0.5 is adversarial"
    assert not bool(torch.isfinite(corners_only.upper).any()), "no corner of any subset is adversarial"
    split = l0_robustness(model, x, y, max_subset=1, splits=4)  # child centres reach x_0 = 0.46875 in round 4
    assert int(split.lower[0]) == 1 and float(split.upper[0]) == 1.0
    assert 0.45 < float(split.x_adv[0].reshape(-1)[0]) < 0.55
    grid = l0_robustness(model, x, y, max_subset=1, values=3, splits=0)  # the grid {0, 0.5, 1}
    assert float(grid.upper[0]) == 1.0 and float(grid.x_adv[0].reshape(-1)[0]) == 0.5
    assert_real_examples(model, x, y, split)
    assert_real_examples(model, x, y, grid)


@pytest.mark.parametrize("seed", [0, 3, pytest.param(4, marks=pytest.mark.slow)])
def test_pixel_features_against_per_subset_milp(seed: int) -> None:
    """On (2, 4, 4) inputs a feature is a pixel (both channels): lower <= d <= upper with d from exact MILPs."""
    model = conv_net(seed)
    g = torch.Generator().manual_seed(100 + seed)
    x = torch.rand(3, 2, 4, 4, generator=g, dtype=torch.float64)
    y = model(x).argmax(1)
    res = l0_robustness(model, x, y, max_subset=2, feature="pixel")
    assert res.n_features == 16 and res.feature == "pixel"
    assert_real_examples(model, x, y, res)
    for i in range(3):
        d = subset_milp_min(model, x[i], int(y[i]), 2)
        lo, up = int(res.lower[i]), float(res.upper[i])
        if d is None:
            assert lo <= 3 and up >= 3
        else:
            assert lo <= d <= up, f"seed {seed}, sample {i}: [{lo}, {up}] misses d = {d}"
    elements = l0_robustness(model, x, y, max_subset=1, feature="element")
    assert elements.n_features == 32
    assert_real_examples(model, x, y, elements)


def test_attack_stays_in_the_l0_ball_and_beats_random_pixels(nets, digits_test) -> None:
    model = nets[0]
    x, y = digits_test[0][:60], digits_test[1][:60]
    g = torch.Generator().manual_seed(0)
    for k in (1, 2):
        threat = LpBall("l0", k)
        res = L0TRE()(model, x, y, threat=threat)
        assert bool(threat.contains(res.x_adv, x).all())
        with torch.no_grad():
            assert torch.equal(model(res.x_adv).argmax(1) != y, res.success)
        assert bool((res.distance[res.success] <= k).all())
        # baseline: 20 random draws of k pixels set to 0 or 1, success if any draw is misclassified
        hit = torch.zeros(len(y), dtype=torch.bool)
        flat = x.reshape(len(y), -1)
        for _ in range(20):
            feats = torch.rand(flat.shape, generator=g).argsort(dim=1)[:, :k]
            vals = torch.randint(0, 2, feats.shape, generator=g).to(flat.dtype)
            with torch.no_grad():
                hit |= model(flat.scatter(1, feats, vals).reshape(x.shape)).argmax(1) != y
        if k == 1:  # level 1 tries every feature at 0 and 1: whatever a random pixel breaks, the attack breaks
            assert bool((res.success | ~hit).all())
        assert res.success_rate > float(hit.double().mean()) + 0.05 * k, f"k={k}: not better than random pixels"
    # the verifier's upper bounds are reached by the attack with the same settings (same search)
    bounds = l0_robustness(model, x[:10], y[:10], max_subset=1, feature="element", certify=False)
    res = L0TRE()(model, x[:10], y[:10], threat=LpBall("l0", math.inf))
    assert torch.equal(res.distance, torch.where(bounds.success, bounds.upper, math.inf).to(res.distance.dtype))
    targeted = L0TRE()(model, x[:10], y[:10], threat=LpBall("l0", 8), targets=(y[:10] + 1) % 10)
    with torch.no_grad():
        assert torch.equal(model(targeted.x_adv).argmax(1) == (y[:10] + 1) % 10, targeted.success)
    assert targeted.success_rate > 0.5


def test_misclassified_inputs_have_distance_zero(nets, digits_test) -> None:
    model = nets[0]
    x, y = digits_test[0][:30], digits_test[1][:30]
    with torch.no_grad():
        pred = model(x).argmax(1)
    wrong = pred != y
    assert bool(wrong.any())
    res = l0_robustness(model, x, y, max_subset=1)
    assert bool((res.lower[wrong] == 0).all()) and bool((res.upper[wrong] == 0).all())
    assert bool(res.success[wrong].all()) and torch.equal(res.x_adv[wrong], x[wrong])
    assert bool((res.lower[~wrong] >= 1).all())


def test_global_robustness_hoeffding() -> None:
    g = global_robustness([1, 2, 3, 2], [2, 2, 4, 3], lower_range=3, upper_range=64, confidence=0.9)
    r = math.sqrt(math.log(2 / 0.1) / (2 * 4))
    assert g.lower_mean == 2.0 and g.upper_mean == 2.75
    assert g.lower_ci == pytest.approx(max(0.0, 2.0 - 3 * r)) and g.upper_ci == pytest.approx(2.75 + 64 * r)
    g = global_robustness([1, 2], [1, math.inf], lower_range=3, upper_range=64)
    assert math.isinf(g.upper_mean) and math.isinf(g.upper_ci) and g.confidence == 0.95
    # the interval holds the expectation: exact means of a known distribution, sampled many times
    gen = torch.Generator().manual_seed(0)
    misses = 0
    for _ in range(200):
        d = torch.randint(1, 4, (50,), generator=gen).double()  # E[d] = 2
        gg = global_robustness(d, d, lower_range=3, upper_range=3, confidence=0.9)
        misses += not gg.lower_ci <= 2.0 <= gg.upper_ci
    assert misses <= 20
    with pytest.raises(InputError, match="confidence"):
        global_robustness([1], [1], lower_range=1, upper_range=1, confidence=1.0)
    with pytest.raises(InputError, match="lower <= upper"):
        global_robustness([2], [1], lower_range=1, upper_range=1)


def test_l0_verify_records_store_and_resume(nets, digits_test, tmp_path, monkeypatch) -> None:
    model = nets[0]
    data = (digits_test[0][:12].float(), digits_test[1][:12])  # the model is float64: inputs are cast to it
    threat = LpBall("l0", 1)
    reference = l0_verify(model, data, threat=threat, max_subset=2, batch_size=4, progress=False)
    direct = l0_robustness(model, data[0], data[1], max_subset=2)
    assert [r.index for r in reference.records] == list(range(12))
    for r, lo, up, pred in zip(reference.records, direct.lower, direct.upper, direct.clean_pred):
        assert r.threat == threat.key == "l0:1.0"
        assert r.certified == float(max(int(lo) - 1, 0))
        assert r.adv_distance == (float(up) if math.isfinite(float(up)) else None)
        want = "falsified" if int(pred) != r.label or float(up) <= 1 else ("robust" if int(lo) > 1 else "unknown")
        assert r.status == want
    g = reference.global_bounds
    assert g.lower_mean == pytest.approx(float(direct.lower.double().mean()))
    assert g.upper_mean == pytest.approx(float(direct.upper.mean()))
    assert g.lower_ci <= g.lower_mean <= g.upper_mean <= g.upper_ci
    assert "global robustness" in reference.table() and reference.to_dict()["global"]["method"] == "hoeffding"

    real = l0_mod.l0_robustness
    calls: list[int] = []
    interrupted: list[bool] = []

    def flaky(*args, **kwargs):
        calls.append(len(calls))
        if len(calls) == 2 and not interrupted:
            interrupted.append(True)
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(l0_mod, "l0_robustness", flaky)
    path = tmp_path / "runs.db"
    with pytest.raises(KeyboardInterrupt):
        l0_verify(model, data, threat=threat, max_subset=2, batch_size=4, store=path, progress=False)
    with Store(path) as store:
        (run,) = store.runs()
        assert run.status == "running" and run.n_records == 4
    calls.clear()
    resumed = l0_verify(model, data, threat=threat, max_subset=2, batch_size=4, store=path, progress=False)
    assert len(calls) == 2, "only the two batches not yet stored run again"
    got = [(r.index, r.status, r.certified, r.adv_distance) for r in resumed.records]
    assert got == [(r.index, r.status, r.certified, r.adv_distance) for r in reference.records]
    assert resumed.global_bounds == reference.global_bounds
    with Store(path) as store:
        (run,) = store.runs()
        assert run.status == "complete" and run.summary is not None
        assert run.summary["global"]["lower_mean"] == pytest.approx(g.lower_mean)


def test_bad_input(nets, digits_test) -> None:
    model = nets[0]
    x, y = digits_test[0][:2], digits_test[1][:2]
    cases = [
        (dict(max_subset=0), "max_subset"),
        (dict(max_subset=1.5), "max_subset"),
        (dict(budget=0), "budget"),
        (dict(feature="voxel"), "feature"),
        (dict(values=1), "values"),
        (dict(methods=("magic",)), "unknown bound method"),
        (dict(methods=()), "methods"),
        (dict(splits=-1), "splits"),
        (dict(max_features=0), "max_features"),
        (dict(domain=(1.0, 0.0)), "domain"),
        (dict(batch_size=0), "batch_size"),
        (dict(refine="yes"), "refine"),
    ]
    for kwargs, match in cases:
        with pytest.raises(InputError, match=match):
            l0_robustness(model, x, y, **kwargs)  # type: ignore[arg-type]
    with pytest.raises(InputError, match="labels go up to"):
        l0_robustness(model, x, torch.tensor([3, 10]))
    with pytest.raises(InputError):
        l0_robustness(model, x, torch.tensor([3, -1]))
    with pytest.raises(InputError, match="NaN"):
        l0_robustness(model, torch.full_like(x, math.nan), y)
    with pytest.raises(InputError):
        l0_robustness(model, x + 2.0, y)  # outside the domain
    with pytest.raises(InputError):
        l0_robustness(model, x, y[:1])  # shapes disagree
    with pytest.raises(InputError, match="model"):
        l0_robustness("not a model", x, y)  # type: ignore[arg-type]
    with pytest.raises(InputError, match="norms"):
        L0TRE()(model, x, y, threat=LpBall("linf", 0.1))
    for kwargs in (dict(subset_size=0), dict(values=1), dict(feature="x"), dict(budget=0), dict(max_features=-1)):
        with pytest.raises(InputError):
            L0TRE(**kwargs)  # type: ignore[arg-type]
    with pytest.raises(InputError, match="eps must be"):
        LpBall("l0", -1)
    data = (x.float(), y)
    with pytest.raises(InputError, match="LpBall"):
        l0_verify(model, data, threat=LpBall("l2", 1.0), progress=False)
    with pytest.raises(InputError, match="finite"):
        l0_verify(model, data, threat=LpBall("l0", math.inf), progress=False)
    with pytest.raises(InputError, match="domain"):
        l0_verify(model, data, threat=LpBall("l0", 1, domain=(-1.0, 1.0)), progress=False)
    with pytest.raises(InputError, match="confidence"):
        l0_verify(model, data, confidence=0.0, progress=False)
    with pytest.raises(InputError, match="data"):
        l0_verify(model, [x, y], progress=False)  # type: ignore[arg-type]


def test_model_mode_is_restored(nets, digits_test) -> None:
    model = nets[0]
    model.train()
    try:
        l0_robustness(model, digits_test[0][:2], digits_test[1][:2], max_subset=1)
        assert model.training
    finally:
        model.eval()


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu(nets, digits_test) -> None:
    model = nets[0]
    x, y = digits_test[0][:8], digits_test[1][:8]
    cpu = l0_robustness(model, x, y, max_subset=2)
    gpu_model = copy.deepcopy(model).cuda()
    gpu = l0_robustness(gpu_model, x.cuda(), y.cuda(), max_subset=2)
    assert gpu.lower.device.type == "cuda" and gpu.x_adv.device.type == "cuda"
    assert torch.equal(gpu.lower.cpu(), cpu.lower) and torch.equal(gpu.upper.cpu(), cpu.upper)
    res = L0TRE()(gpu_model, x.cuda(), y.cuda(), threat=LpBall("l0", 2))
    assert bool(LpBall("l0", 2).contains(res.x_adv, x.cuda()).all())


@pytest.mark.slow
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_bracket_the_exact_minimum_many(digits_test, seed: int) -> None:
    """The same as the default test on 30 samples per network, up to t = 3, with the per-subset MILP at level 1."""
    model = tiny_digits_mlp(seed)
    x, y = digits_test[0][:30], digits_test[1][:30]
    res = l0_robustness(model, x, y, max_subset=3)
    assert_real_examples(model, x, y, res)
    for i in range(30):
        if int(res.clean_pred[i]) != int(y[i]):
            continue
        d = min_l0_milp(model, x[i], int(y[i]))
        assert int(res.lower[i]) <= d <= float(res.upper[i])
        exact1 = subset_milp_min(model, x[i], int(y[i]), 1)
        assert (exact1 == 1) == (d == 1)
    assert float(res.converged.double().mean()) >= 0.7
