"""DeepGame: brackets against brute force over the game's lattice, exact MILP and sampling, on small seeded networks."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from torch import nn

from bastion.errors import InputError
from bastion.threat import LpBall
from bastion.verify.globalopt.deepgame import (
    black_box_features,
    deepgame,
    deepgame_verify,
    grey_box_features,
    grid_features,
)
from bastion.verify.ir import Network
from bastion.verify.milp import milp_minimum

FEATS_2x2 = torch.tensor([[0, 0], [1, 1]])
TAU = 0.5


def tiny_mlp(seed: int, d: int = 4, k: int = 3, hidden: int = 6) -> nn.Module:
    """A seeded random ReLU MLP on a (1, 2, 2)-shaped input (flattened), float64."""
    g = torch.Generator().manual_seed(seed)
    model = nn.Sequential(nn.Flatten(), nn.Linear(d, hidden), nn.ReLU(), nn.Linear(hidden, k)).double()
    for p in model.parameters():
        p.data = torch.randn(p.shape, generator=g, dtype=torch.float64)
    return model.eval()


def sample_point(seed: int) -> torch.Tensor:
    return torch.rand(1, 1, 2, 2, generator=torch.Generator().manual_seed(1000 + seed), dtype=torch.float64)


def lattice(x: torch.Tensor, tau: float, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Every point ``clip(x + tau k)`` of the game's lattice (coordinates outside ``mask`` fixed), flat (P, D)."""
    levels = []
    for i, xi in enumerate(x.reshape(-1).tolist()):
        if mask is not None and not bool(mask.reshape(-1)[i]):
            levels.append([xi])
            continue
        up, down = math.ceil((1 - xi) / tau - 1e-9), math.ceil(xi / tau - 1e-9)
        levels.append([min(max(xi + k * tau, 0.0), 1.0) for k in range(-down, up + 1)])
    return torch.tensor(list(itertools.product(*levels)), dtype=x.dtype)


def brute_force(model: nn.Module, x: torch.Tensor, y: int, norm: str, eps: float, mask=None) -> float:
    """The exact minimum of the game: the closest adversarial lattice point within eps (inf if none)."""
    pts = lattice(x, TAU, mask)
    with torch.no_grad():
        adv = model(pts.reshape(-1, *x.shape[1:])).argmax(1) != y
    d = LpBall(norm, math.inf).distance(pts, x.reshape(1, -1).expand_as(pts))
    d = torch.where(adv & (d <= eps + 1e-12), d, torch.full_like(d, math.inf))
    return float(d.min())


def check_example(model: nn.Module, r, x: torch.Tensor, y: int, norm: str) -> None:
    """The upper bound is the distance of a real adversarial example inside the domain."""
    if not math.isfinite(r.upper):
        return
    assert r.x_adv is not None and r.x_adv.shape == x.shape
    assert bool(((r.x_adv >= 0) & (r.x_adv <= 1)).all())
    with torch.no_grad():
        assert int(model(r.x_adv).argmax()) != y
    assert float(LpBall(norm, math.inf).distance(r.x_adv, x)[0]) == pytest.approx(r.upper, abs=1e-9)


def _cooperative_sweep(norm: str, seeds: range) -> None:
    found = 0
    for seed in seeds:
        model, x = tiny_mlp(seed), sample_point(seed)
        y = int(model(x).argmax())
        r = deepgame(model, x, y, norm=norm, features=FEATS_2x2, tau=TAU, mcts_iterations=6, astar_budget=200)
        exact = brute_force(model, x, y, norm, r.eps)
        assert r.lower <= exact + 1e-9, f"seed {seed}: lower {r.lower} above the game minimum {exact}"
        assert r.upper >= exact - 1e-9
        check_example(model, r, x, y, norm)
        # A* with the admissible bound ran to the end on this 81-point lattice: it returns the exact minimum
        if math.isfinite(exact):
            found += 1
            assert r.game_value == pytest.approx(exact, abs=1e-9), f"seed {seed}"
            assert r.upper == pytest.approx(exact, abs=1e-9)
        assert r.lower <= r.upper
    assert found >= 2  # the seeds include breakable networks


@pytest.mark.parametrize("norm", ["l2", "l1", "linf", "l0"])
def test_cooperative_brackets_the_brute_force_game_value(norm: str) -> None:
    _cooperative_sweep(norm, range(0, 8, 2))


@pytest.mark.slow
@pytest.mark.parametrize("norm", ["l2", "l1", "linf", "l0"])
def test_cooperative_brackets_many_networks(norm: str) -> None:
    _cooperative_sweep(norm, range(40))


def test_astar_alone_finds_the_exact_minimum() -> None:
    """Without MCTS, A*'s first adversarial lattice point is the game's minimum."""
    for seed in (7,):
        model, x = tiny_mlp(seed), sample_point(seed)
        y = int(model(x).argmax())
        r = deepgame(model, x, y, norm="l1", features=FEATS_2x2, tau=TAU, mcts_iterations=0, astar_budget=500)
        exact = brute_force(model, x, y, "l1", r.eps)
        assert r.mcts_iterations == 0
        if math.isfinite(exact):
            assert r.game_value == pytest.approx(exact, abs=1e-9)
        else:
            assert r.game_value is None and math.isinf(r.upper)


def _milp_linf_radius(model: nn.Module, x: torch.Tensor, y: int, k: int = 3) -> float:
    """The exact continuous minimal l∞ adversarial distance, by bisection on exact MILP minima of the margins."""
    net = Network.from_module(model, tuple(x.shape[1:]))
    lo, hi = 0.0, 1.0
    for _ in range(18):
        r = (lo + hi) / 2
        box_lo, box_hi = (x - r).clamp(0, 1), (x + r).clamp(0, 1)
        broken = False
        for j in range(k):
            if j != y:
                c = torch.zeros(k, dtype=torch.float64)
                c[y], c[j] = 1.0, -1.0
                if milp_minimum(net, box_lo, box_hi, c)[0] <= 0:
                    broken = True
                    break
        lo, hi = (lo, r) if broken else (r, hi)
    return hi


def test_lower_bound_below_the_exact_continuous_minimum() -> None:
    """The lower bound holds for every input, not only lattice points: below the MILP minimal l∞ distance."""
    for seed in (0, 6):
        model, x = tiny_mlp(seed), sample_point(seed)
        y = int(model(x).argmax())
        r = deepgame(model, x, y, norm="linf", features=FEATS_2x2, tau=TAU, mcts_iterations=4, astar_budget=40)
        exact = _milp_linf_radius(model, x, y)
        assert r.lower <= exact + 1e-6, f"seed {seed}: lower {r.lower} > exact continuous radius {exact}"


@pytest.mark.parametrize("norm", ["l2", "l1"])
def test_lower_bound_below_sampled_adversarial_inputs(norm: str) -> None:
    g = torch.Generator().manual_seed(5)
    for seed in (2, 3):
        model, x = tiny_mlp(seed), sample_point(seed)
        y = int(model(x).argmax())
        r = deepgame(model, x, y, norm=norm, features=FEATS_2x2, tau=TAU, mcts_iterations=4, astar_budget=30)
        scale = torch.rand(20000, 1, generator=g, dtype=torch.float64)
        z = (x.reshape(1, -1) + scale * (2 * torch.rand(20000, 4, generator=g, dtype=torch.float64) - 1)).clamp(0, 1)
        with torch.no_grad():
            adv = model(z.reshape(-1, 1, 2, 2)).argmax(1) != y
        if bool(adv.any()):
            d = LpBall(norm, math.inf).distance(z[adv], x.reshape(1, -1).expand(int(adv.sum()), -1))
            assert float(d.min()) >= r.lower - 1e-9


def test_linear_model_lower_bound_is_exact_and_proves_robustness() -> None:
    """On a linear model the Lipschitz constant is exact: the l2 lower bound meets the distance to the hyperplane."""
    layer = nn.Linear(4, 2).double()
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[1.0, -0.5, 0.3, 0.2], [-1.0, 0.5, -0.3, -0.2]], dtype=torch.float64))
        layer.bias.zero_()
    model = nn.Sequential(nn.Flatten(), layer).eval()
    x = torch.tensor([[[[0.7, 0.4], [0.5, 0.5]]]], dtype=torch.float64)
    w = (layer.weight[0] - layer.weight[1]).detach()
    with torch.no_grad():
        margin = float(model(x)[0, 0] - model(x)[0, 1])
    exact = margin / float(w.norm())  # the box does not cut the closest point here
    r = deepgame(model, x, 0, norm="l2", eps=0.9 * exact, features=FEATS_2x2, tau=0.1, mcts_iterations=2)
    assert r.robust and r.lower == pytest.approx(0.9 * exact) and math.isinf(r.upper)
    r = deepgame(model, x, 0, norm="l2", features=FEATS_2x2, tau=0.1, mcts_iterations=0, astar_budget=1)
    assert r.lower == pytest.approx(exact, rel=1e-9)  # the root's bound: margin / ||w||


def test_mcts_upper_bound_never_increases() -> None:
    model, x = tiny_mlp(0), sample_point(0)
    y = int(model(x).argmax())
    short = deepgame(model, x, y, features=FEATS_2x2, tau=0.1, mcts_iterations=2, astar_budget=0, seed=3)
    long = deepgame(model, x, y, features=FEATS_2x2, tau=0.1, mcts_iterations=12, astar_budget=0, seed=3)
    ups = [u for phase, _, _, u in long.history if phase == "mcts"]
    assert len(ups) == 12 and all(b <= a for a, b in itertools.pairwise(ups))
    assert long.upper <= short.upper
    assert math.isfinite(long.upper)
    check_example(model, long, x, y, "l2")


def test_deterministic_with_a_seed() -> None:
    model, x = tiny_mlp(0), sample_point(0)
    y = int(model(x).argmax())
    kw = dict(features=FEATS_2x2, tau=0.25, mcts_iterations=15, astar_budget=30, seed=7)
    a, b = deepgame(model, x, y, **kw), deepgame(model, x, y, **kw)  # type: ignore[arg-type]
    assert a.history == b.history and a.evaluations == b.evaluations
    assert (a.lower, a.upper, a.game_value) == (b.lower, b.upper, b.game_value)


def test_competitive_brackets_the_feature_robustness_value() -> None:
    for seed in (0, 1, 6, 7):
        model, x = tiny_mlp(seed), sample_point(seed)
        y = int(model(x).argmax())
        r = deepgame(
            model, x, y, game="competitive", norm="l2", features=FEATS_2x2, tau=TAU, mcts_iterations=20,
            astar_budget=100,
        )  # fmt: skip
        per = [brute_force(model, x, y, "l2", r.eps, FEATS_2x2.reshape(1, 2, 2) == f) for f in (0, 1)]
        value = max(per)
        assert r.lower <= value + 1e-9
        assert r.upper >= value - 1e-9
        for (lb, ub), exact in zip(r.feature_bounds, per):
            assert lb <= exact + 1e-9 and ub >= exact - 1e-9
        if math.isfinite(r.upper):
            check_example(model, r, x, y, "l2")


def test_features() -> None:
    model = tiny_mlp(0, d=64, k=3)
    x = torch.rand(1, 1, 8, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    grey = grey_box_features(model, x, 0)
    assert grey.shape == (1, 8, 8) and grey.unique().numel() == 10
    # the most salient feature holds the pixels whose change lowers the score most
    assert torch.bincount(grey.reshape(-1)).tolist() == [6] * 9 + [10]
    grid = grid_features((3, 6, 6), 4)
    assert grid.shape == (3, 6, 6) and grid.unique().numel() == 4 and bool((grid[0] == grid[2]).all())
    assert grid_features((1, 2, 2), 10).unique().numel() == 4
    # two bright blobs give DoG keypoints; each pixel joins one of them
    yy, xx = torch.meshgrid(torch.arange(24.0), torch.arange(24.0), indexing="ij")
    img = torch.exp(-((yy - 6) ** 2 + (xx - 6) ** 2) / 8) + torch.exp(-((yy - 17) ** 2 + (xx - 16) ** 2) / 8)
    black = black_box_features(img[None, None])
    assert black.shape == (1, 24, 24) and black.unique().numel() >= 2
    assert black[0, 6, 6] != black[0, 17, 16]
    assert black_box_features(torch.zeros(1, 1, 2, 2), num_features=3).unique().numel() == 3  # grid fallback


def test_features_tensor_and_black_box_run() -> None:
    model, x = tiny_mlp(1), sample_point(1)
    y = int(model(x).argmax())
    r = deepgame(model, x, y, features=torch.tensor([0, 0, 5, 5]).reshape(1, 2, 2), tau=TAU, mcts_iterations=3,
                 astar_budget=5)  # fmt: skip
    assert r.features is not None and r.features.unique().tolist() == [0, 1]
    r = deepgame(model, x, y, features="black", tau=TAU, mcts_iterations=3, astar_budget=5)
    assert r.features is not None and r.features.shape == (1, 2, 2)


def test_misclassified_input() -> None:
    model, x = tiny_mlp(0), sample_point(0)
    wrong = (int(model(x).argmax()) + 1) % 3
    r = deepgame(model, x, wrong, features=FEATS_2x2, tau=TAU, mcts_iterations=3)
    assert r.lower == 0.0 and r.upper == 0.0


def test_deepgame_verify_writes_records_and_resumes(tmp_path) -> None:
    model = tiny_mlp(3)
    x = torch.cat([sample_point(3), sample_point(4), sample_point(5)]).float()
    model = model.float()
    y = model(x).argmax(1)
    y[2] = (y[2] + 1) % 3  # a clean error
    path = tmp_path / "dg.sqlite"
    kw = dict(norm="l2", features=FEATS_2x2, tau=TAU, mcts_iterations=4, astar_budget=40, progress=False)
    first = deepgame_verify(model, (x, y), store=path, **kw)  # type: ignore[arg-type]
    assert first.n == 3 and len(first.records) == 3
    recs = sorted(first.records, key=lambda r: r.index)
    assert recs[0].threat == LpBall("l2", 2.0).key
    assert recs[2].status == "falsified" and recs[2].adv_distance == 0.0 and recs[2].certified == 0.0
    for r in recs[:2]:
        assert r.certified is not None and r.certified >= 0
        if r.adv_distance is not None:
            assert r.certified <= r.adv_distance + 1e-6 and r.status == "falsified"
    again = deepgame_verify(model, (x, y), store=path, **kw)  # type: ignore[arg-type]
    assert [(r.index, r.certified, r.adv_distance) for r in sorted(again.records, key=lambda r: r.index)] == [
        (r.index, r.certified, r.adv_distance) for r in recs
    ]


BAD = [
    (dict(game="zero-sum"), "game"),
    (dict(norm="l3"), "norm"),
    (dict(tau=0.0), "tau"),
    (dict(tau=float("nan")), "tau"),
    (dict(eps=-1.0), "eps"),
    (dict(features="white"), "features"),
    (dict(features=torch.zeros(3, 3, dtype=torch.long)), "features"),
    (dict(features=torch.zeros(2, 2)), "integer"),
    (dict(mcts_iterations=-1), "mcts_iterations"),
    (dict(astar_budget=1.5), "astar_budget"),
    (dict(samples_per_node=0), "samples_per_node"),
    (dict(lipschitz="exact"), "lipschitz"),
    (dict(c_uct=-1.0), "c_uct"),
]


@pytest.mark.parametrize("kwargs,word", BAD, ids=[w + str(i) for i, (_, w) in enumerate(BAD)])
def test_bad_arguments(kwargs, word) -> None:
    model, x = tiny_mlp(0), sample_point(0)
    with pytest.raises(InputError, match=word):
        deepgame(model, x, 0, **{"mcts_iterations": 1, "astar_budget": 1, "features": FEATS_2x2, **kwargs})


def test_bad_inputs() -> None:
    model, x = tiny_mlp(0), sample_point(0)
    with pytest.raises(InputError, match="out of range"):
        deepgame(model, x, 3, features=FEATS_2x2)
    with pytest.raises(InputError, match="NaN"):
        deepgame(model, torch.full_like(x, float("nan")), 0, features=FEATS_2x2)
    with pytest.raises(InputError, match="batch dimension"):
        deepgame(model, torch.cat([x, x]), 0, features=FEATS_2x2)
    with pytest.raises(InputError, match="domain"):
        deepgame(model, x + 2, 0, features=FEATS_2x2)
    with pytest.raises(InputError, match="model"):
        deepgame(lambda t: t, x, 0)  # type: ignore[arg-type]
    with pytest.raises(InputError, match="label"):
        deepgame(model, x, 0.5, features=FEATS_2x2)  # type: ignore[arg-type]


def test_model_mode_is_restored() -> None:
    model, x = tiny_mlp(0), sample_point(0)
    model.train()
    deepgame(model, x, int(model.eval()(x).argmax()), features=FEATS_2x2, tau=TAU, mcts_iterations=2,
             astar_budget=2)  # fmt: skip
    model.train()
    deepgame(model, x, 0, features=FEATS_2x2, tau=TAU, mcts_iterations=2, astar_budget=2)
    assert model.training


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_runs_on_cuda() -> None:
    model, x = tiny_mlp(1), sample_point(1)
    y = int(model(x).argmax())
    cpu = deepgame(model, x, y, features=FEATS_2x2, tau=TAU, mcts_iterations=5, astar_budget=50)
    gpu = deepgame(model.cuda(), x.cuda(), y, features=FEATS_2x2, tau=TAU, mcts_iterations=5, astar_budget=50)
    assert gpu.lower == pytest.approx(cpu.lower, abs=1e-9) and gpu.upper == pytest.approx(cpu.upper, abs=1e-9)
    assert gpu.x_adv is None or gpu.x_adv.is_cuda
