"""Weight-perturbation robustness: sound bounds against sampled perturbed networks, exactness where it must hold
(linear models, one hidden layer, eps = 0), the attack's flips re-executed on real copies inside the weight box,
certified radius <= attack radius, the store run, and bad input."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import Tensor, nn

from bastion.errors import InputError
from bastion.models import Normalize
from bastion.reliability import weights as W
from bastion.reliability.weights import (
    certified_weight_radius,
    minimal_weight_perturbation,
    perturbable_layers,
    perturbed_copy,
    threat_key,
    weight_attack,
    weight_margin_bounds,
    weight_robustness,
    weight_scales,
)
from bastion.store import Store

METHODS = ("interval", "crown")


# ------------------------------------------------------------------------------------------------ helpers
def _randomise(model: nn.Sequential, g: torch.Generator) -> nn.Sequential:
    for m in model.modules():
        if isinstance(m, nn.Linear):
            m.weight.data.copy_(torch.randn(m.weight.shape, generator=g) * 0.8)
            m.bias.data.copy_(torch.randn(m.bias.shape, generator=g) * 0.4)
    return model.double().eval()


def _random_net(seed: int) -> tuple[nn.Sequential, int]:
    """A small random fully connected net (1-3 hidden layers), some with a Normalize first, one with two Linear
    layers in a row (their activation box straddles 0, which exercises the chord of |h|)."""
    g = torch.Generator().manual_seed(seed)
    d = 3 + seed % 4
    widths = [int(torch.randint(3, 8, (1,), generator=g)) for _ in range(1 + seed % 3)]
    layers: list[nn.Module] = []
    if seed % 2:
        layers.append(Normalize(0.3, 0.7))
    fan = d
    for i, w in enumerate(widths):
        layers.append(nn.Linear(fan, w))
        if not (seed % 5 == 0 and i == 0):  # seeds 0, 5, 10: Linear -> Linear
            layers.append(nn.ReLU())
        fan = w
    layers.append(nn.Linear(fan, 3 + seed % 2))
    return _randomise(nn.Sequential(*layers), g), d


def _sample_perturbations(
    scales: dict[str, Tensor], eps: float, count: int, g: torch.Generator
) -> dict[str, Tensor]:  # fmt: skip
    """``count`` perturbations per parameter: half random corners of the box, half uniform interior points."""
    out = {}
    for name, s in scales.items():
        u = torch.rand((count, *s.shape), generator=g, dtype=s.dtype) * 2 - 1
        corners = torch.where(u[: count // 2] > 0, 1.0, -1.0).to(s)
        out[name] = torch.cat([corners, u[count // 2 :]]) * eps * s
    return out


def _perturbed_logits(model: nn.Sequential, x: Tensor, deltas: dict[str, Tensor]) -> Tensor:
    """``(S, N, K)`` logits of every input under each of S perturbations, by a plain loop over the layers (written
    independently of the module under test)."""
    count = next(iter(deltas.values())).shape[0]
    model = model.requires_grad_(False)
    h = x.unsqueeze(0).expand(count, *x.shape)
    for name, m in model.named_children():
        if isinstance(m, nn.Linear):
            w = m.weight + deltas.get(f"{name}.weight", torch.zeros(count, *m.weight.shape, dtype=x.dtype))
            b = m.bias + deltas.get(f"{name}.bias", torch.zeros(count, *m.bias.shape, dtype=x.dtype))
            h = torch.einsum("sni,soi->sno", h, w) + b[:, None, :]
        elif isinstance(m, Normalize):
            h = (h - m.mean.to(h)) / m.std.to(h)
        else:
            h = m(h)
    return h


def _linear(net: nn.Sequential, i: int) -> nn.Linear:
    layer = net[i]
    assert isinstance(layer, nn.Linear)
    return layer


def _margins(logits: Tensor, y: Tensor) -> Tensor:
    """``f_y - f_j`` for ``j != y`` in increasing order, on the last two dimensions ``(..., N, K)``."""
    k = logits.shape[-1]
    others = torch.stack([torch.tensor([j for j in range(k) if j != int(c)]) for c in y])
    fy = logits.gather(-1, y.expand(*logits.shape[:-1]).unsqueeze(-1))
    fj = logits.gather(-1, others.expand(*logits.shape[:-2], *others.shape))
    return fy - fj


def _linear_classifier(seed: int, d: int = 5, k: int = 4) -> nn.Sequential:
    g = torch.Generator().manual_seed(seed)
    return _randomise(nn.Sequential(nn.Linear(d, k)), g)


# ------------------------------------------------------------------------------------------------ soundness
CONFIGS = [
    {"relative": "elementwise", "biases": False, "partial": False},
    {"relative": "elementwise", "biases": True, "partial": False},
    {"relative": "layer", "biases": True, "partial": False},
    {"relative": "layer", "biases": False, "partial": True},
]


@pytest.mark.parametrize(
    "config", CONFIGS, ids=lambda c: f"{c['relative']}-bias{int(c['biases'])}-p{int(c['partial'])}"
)
@pytest.mark.parametrize("method", METHODS)
def test_bounds_contain_sampled_perturbed_networks(method: str, config: dict[str, object]) -> None:
    g = torch.Generator().manual_seed(1)
    checked = 0
    for seed in range(12):
        net, d = _random_net(seed)
        names = perturbable_layers(net)
        layers = names[1:] if config["partial"] and len(names) > 1 else None
        kw: dict[str, Any] = {"layers": layers, "relative": config["relative"], "biases": config["biases"]}
        x = torch.rand(6, d, generator=g, dtype=torch.float64)
        y = torch.randint(0, net(x).shape[1], (6,), generator=g)
        eps = float(torch.rand(1, generator=g)) * 0.4 + 0.02
        lower = weight_margin_bounds(net, x, y, eps, method=method, **kw)
        deltas = _sample_perturbations(weight_scales(net, **kw), eps, 400, g)
        sampled = _margins(_perturbed_logits(net, x, deltas), y)  # (S, N, K-1)
        assert lower.shape == sampled.shape[1:]
        gap = sampled - lower.unsqueeze(0)
        assert float(gap.min()) >= -1e-9, f"net {seed}: a sampled perturbation beats the {method} bound by {-gap.min()}"
        checked += sampled.numel()
    assert checked > 50_000


@pytest.mark.parametrize("seed", range(8))
def test_crown_is_never_looser_than_interval_and_tighter_on_deep_nets(seed: int) -> None:
    g = torch.Generator().manual_seed(100 + seed)
    net = _randomise(
        nn.Sequential(
            nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4)
        ),
        g,
    )
    x = torch.rand(16, 6, generator=g, dtype=torch.float64)
    y = net(x).argmax(1)
    interval = weight_margin_bounds(net, x, y, 0.05, method="interval")
    crown = weight_margin_bounds(net, x, y, 0.05, method="crown")
    assert bool((crown >= interval - 1e-12).all())
    assert float((crown - interval).mean()) > 1e-4  # the linear relaxation does something on three hidden layers


@pytest.mark.parametrize("method", METHODS)
def test_eps_zero_gives_the_clean_margins(method: str) -> None:
    for seed in range(6):
        net, d = _random_net(seed)
        x = torch.rand(5, d, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
        logits = net(x)
        y = logits.argmax(1)
        lower = weight_margin_bounds(net, x, y, 0.0, method=method, biases=True)
        torch.testing.assert_close(lower, _margins(logits, y), rtol=0, atol=1e-10)


@pytest.mark.parametrize("method", METHODS)
def test_per_sample_eps_equals_one_call_per_sample(method: str) -> None:
    net, d = _random_net(4)
    x = torch.rand(5, d, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    y = net(x).argmax(1)
    eps = torch.tensor([0.0, 0.01, 0.05, 0.2, 0.4], dtype=torch.float64)
    together = weight_margin_bounds(net, x, y, eps, method=method)
    for i in range(5):
        alone = weight_margin_bounds(net, x[i : i + 1], y[i : i + 1], float(eps[i]), method=method)
        torch.testing.assert_close(together[i : i + 1], alone, rtol=0, atol=1e-12)
    if method == "interval":  # exact interval arithmetic is inclusion-monotone: larger boxes, smaller bounds
        same = weight_margin_bounds(net, x[:1].expand(5, -1), y[:1].expand(5), eps, method=method)
        assert bool((same[1:] <= same[:-1] + 1e-12).all())


@pytest.mark.parametrize("biases", [False, True])
def test_one_hidden_layer_interval_bound_is_attained(biases: bool) -> None:
    """With a fixed input and one hidden layer every hidden unit moves independently, so the interval bound is the
    exact minimum: build the minimising perturbation by hand and run it on a real copy."""
    g = torch.Generator().manual_seed(7)
    net = _randomise(nn.Sequential(nn.Linear(5, 6), nn.ReLU(), nn.Linear(6, 3)), g)
    x = torch.rand(4, 5, generator=g, dtype=torch.float64) * 2 - 0.5
    y = net(x).argmax(1)
    eps = 0.15
    lower = weight_margin_bounds(net, x, y, eps, method="interval", biases=biases)
    first, last = _linear(net, 0), _linear(net, 2)
    w1, b1, w2, b2 = first.weight, first.bias, last.weight, last.bias
    with torch.no_grad():
        for n in range(4):
            others = [j for j in range(3) if j != int(y[n])]
            for col, j in enumerate(others):
                c, yy = int(y[n]), j
                coef = w2[c] - w2[yy] - eps * (w2[c].abs() + w2[yy].abs())
                go_low = coef >= 0  # a non-negative coefficient wants the smallest activation
                sign = torch.where(go_low, -1.0, 1.0).to(x)[:, None]
                d1w = sign * eps * w1.abs() * torch.sign(x[n])[None, :]
                d2w = torch.zeros_like(w2)
                d2w[c] = -eps * w2[c].abs()
                d2w[yy] = eps * w2[yy].abs()
                pert = {"0.weight": d1w, "2.weight": d2w}
                if biases:
                    d2b = torch.zeros_like(b2)
                    d2b[c], d2b[yy] = -eps * b2[c].abs(), eps * b2[yy].abs()
                    pert |= {"0.bias": sign[:, 0] * eps * b1.abs(), "2.bias": d2b}
                out = perturbed_copy(net, pert)(x[n : n + 1])[0]
                assert float(out[c] - out[yy]) == pytest.approx(float(lower[n, col]), abs=1e-9)


def test_linear_classifier_bracket_meets_the_closed_form() -> None:
    net = _linear_classifier(3)
    g = torch.Generator().manual_seed(3)
    x = torch.rand(8, 5, generator=g, dtype=torch.float64)
    y = net(x).argmax(1)
    w, b = _linear(net, 0).weight, _linear(net, 0).bias
    with torch.no_grad():
        m0 = _margins(net(x), y)
        others = torch.stack([torch.tensor([j for j in range(4) if j != int(c)]) for c in y])
        slope = (w[y].abs().unsqueeze(1) + w[others].abs()) @ x.abs().unsqueeze(-1)
        slope = slope.squeeze(-1) + b[y].abs().unsqueeze(1) + b[others].abs()
        exact = (m0 / slope).amin(1)  # margins are linear in eps: the first one to reach zero flips
    tol = 1e-3
    for method in METHODS:
        cert = certified_weight_radius(net, x, y, biases=True, method=method, tolerance=tol)
        assert bool((cert <= exact).all()) and bool((cert >= exact * (1 - 2 * tol)).all())
    found, res = minimal_weight_perturbation(net, x, y, biases=True, tolerance=tol, steps=20, targets=3)
    assert bool(res.success.all()) and res.reverify_failed == 0
    assert bool((found >= exact * (1 - 1e-9)).all()) and bool((found <= exact * (1 + 3 * tol)).all())


# ------------------------------------------------------------------------------------------------ the attack
def _params(model: nn.Module) -> dict[str, Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("relative", ["elementwise", "layer"])
def test_attack_flips_reexecute_on_real_copies_inside_the_box(
    digits_mlp64: tuple[nn.Module, Tensor, Tensor], relative: str
) -> None:
    model, x_all, y_all = digits_mlp64
    x, y = x_all[:24], y_all[:24]
    before = _params(model)
    eps = 0.15 if relative == "elementwise" else 0.05
    res = weight_attack(model, x, y, eps, relative=relative, biases=True, steps=30)
    assert 0 < int(res.success.sum()) <= 24
    scales = weight_scales(model, relative=relative, biases=True)
    for name, delta in res.perturbation.items():
        assert bool((delta.abs() <= eps * scales[name] * (1 + 1e-6) + 1e-12).all()), name
    for i in res.success.nonzero().squeeze(1).tolist():
        pred = perturbed_copy(model, res.perturbation, i)(x[i : i + 1]).argmax(1)
        assert int(pred) != int(y[i]) and int(pred) == int(res.adv_pred[i])
    for k, v in _params(model).items():
        assert torch.equal(v, before[k]), f"the attack changed the model's {k}"


def test_attack_runs_on_conv_nets_and_falls_back_when_vmap_cannot_batch() -> None:
    torch.manual_seed(0)
    conv = nn.Sequential(nn.Conv2d(1, 3, 3), nn.ReLU(), nn.Flatten(), nn.Linear(3 * 6 * 6, 3)).double().eval()
    x = torch.rand(6, 1, 8, 8, dtype=torch.float64)
    y = conv(x).argmax(1)
    res = weight_attack(conv, x, y, 0.8, steps=20)
    assert bool(res.success.any())
    for i in res.success.nonzero().squeeze(1).tolist():
        assert int(perturbed_copy(conv, res.perturbation, i)(x[i : i + 1]).argmax(1)) != int(y[i])

    class ItemScaled(nn.Module):  # .item() in forward: functorch's vmap refuses it
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(4, 3)

        def forward(self, x: Tensor) -> Tensor:
            return self.lin(x) / (1.0 + float(x.abs().max().item()))

    odd = ItemScaled().double().eval()
    fwd = W._BatchedForward(odd, ["lin.weight"])
    xs = torch.rand(5, 4, dtype=torch.float64)
    deltas = {"lin.weight": torch.randn(5, 3, 4, dtype=torch.float64) * 0.1}
    out = fwd(deltas, xs)
    assert not fwd.vmapped
    for i in range(5):
        torch.testing.assert_close(out[i], perturbed_copy(odd, deltas, i)(xs[i : i + 1])[0])


def test_certified_radius_never_exceeds_the_attack_radius() -> None:
    g = torch.Generator().manual_seed(11)
    net = _randomise(nn.Sequential(nn.Linear(6, 10), nn.ReLU(), nn.Linear(10, 10), nn.ReLU(), nn.Linear(10, 4)), g)
    x = torch.rand(12, 6, generator=g, dtype=torch.float64)
    y = net(x).argmax(1)
    found, _ = minimal_weight_perturbation(net, x, y, steps=20)  # no lower end given: an independent search
    assert bool(torch.isfinite(found).all())
    for method in METHODS:
        cert = certified_weight_radius(net, x, y, method=method)
        assert bool((cert > 0).all())
        assert bool((cert <= found).all()), (method, float((cert - found).max()))


# ------------------------------------------------------------------------------------------------ the data set run
def test_weight_robustness_records_store_and_resume(
    digits_mlp64: tuple[nn.Module, Tensor, Tensor], tmp_path: object, monkeypatch: pytest.MonkeyPatch
) -> None:
    model, x_all, y_all = digits_mlp64
    x, y = x_all[:12], y_all[:12]
    path = f"{tmp_path}/w.db"
    eps = 0.05
    res = weight_robustness(
        model, (x, y), eps=eps, method="crown", attack_steps=10, batch_size=6, store=path, progress=False
    )
    assert res.threat == threat_key(eps) == "weights-linf-rel:0.05"
    assert len(res.records) == 12 and res.n == 12
    assert res.certified_fraction + res.falsified_fraction <= 1.0
    assert 0 < res.certified_fraction
    for r in res.records:
        if r.clean_pred != r.label:
            assert r.status == "falsified" and r.adv_distance == 0.0 and r.attack == "clean"
            continue
        assert r.certified is not None and "lower_margin" in r.extra
        if r.adv_distance is not None:
            assert r.certified <= r.adv_distance
            assert r.extra["adv_class"] != r.label and r.extra["adv_margin"] > 0
        if r.status == "robust":
            assert r.certified >= eps and r.extra["lower_margin"] > 0 and r.extra["certified_at_eps"]
        elif r.status == "falsified":
            assert r.adv_distance is not None and r.adv_distance <= eps
        else:
            assert r.certified < eps and (r.adv_distance is None or r.adv_distance > eps)
    summary = res.to_dict()
    assert len(summary["brackets"]) == 12 and summary["run_id"] == res.run_id
    assert "certified at eps" in res.table()

    def boom(*args: object, **kwargs: object) -> None:
        raise AssertionError("a completed run must not recompute anything")

    monkeypatch.setattr(W, "_robustness_batch", boom)
    again = weight_robustness(
        model, (x, y), eps=eps, method="crown", attack_steps=10, batch_size=6, store=path, progress=False
    )
    assert again.run_id == res.run_id and [r.to_dict() for r in again.records] == [r.to_dict() for r in res.records]
    with Store(path) as store:
        (run,) = store.runs()
        assert run.kind == "weight-robustness"
        assert store.records(run.id)[0].extra.keys() >= {"lower_margin", "certified_at_eps"}


def test_threat_keys_scales_and_layers() -> None:
    net = nn.Sequential(nn.Flatten(), nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    assert perturbable_layers(net) == ["1", "3"]
    assert perturbable_layers(net, [net[3]]) == ["3"]
    s = weight_scales(net, relative="layer", biases=True)
    assert set(s) == {"1.weight", "1.bias", "3.weight", "3.bias"}
    w1 = _linear(net, 1).weight.detach()
    assert torch.equal(s["1.weight"], torch.full_like(w1, float(w1.abs().max())))
    assert torch.equal(weight_scales(net)["3.weight"], _linear(net, 3).weight.detach().abs())
    assert threat_key(0.01, relative="layer", biases=True, layers=["3"]) == "weights-linf-layer+bias:0.01[3]"
    res = weight_robustness(
        net.double(), (torch.rand(4, 4), torch.zeros(4, dtype=torch.int64)), eps=0.01, layers=["3"],
        attack_steps=5, progress=False,
    )  # fmt: skip
    assert res.threat == "weights-linf-rel:0.01[3]"
    whole = weight_robustness(
        net, (torch.rand(3, 4), torch.zeros(3, dtype=torch.int64)), attack_steps=5, progress=False
    )
    assert whole.threat == "weights-linf-rel:1.0" and whole.eps == 1.0  # eps=None decides the status at max_eps


# ------------------------------------------------------------------------------------------------ bad input
def test_unsupported_layers_raise_naming_the_layer() -> None:
    conv = nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.Flatten(), nn.Linear(2 * 6 * 6, 3))
    x = torch.rand(2, 1, 8, 8)
    y = torch.zeros(2, dtype=torch.int64)
    for method in METHODS:
        with pytest.raises(InputError, match=r"'0' \(Conv2d\)"):
            weight_margin_bounds(conv, x, y, 0.1, method=method)
    with pytest.raises(InputError, match=r"'0' \(Conv2d\)"):
        weight_robustness(conv, (x, y), eps=0.1, method="crown", progress=False)
    res = weight_robustness(conv, (x, y), eps=0.1, method=None, attack_steps=3, progress=False)
    assert all(r.certified is None or r.clean_pred != r.label for r in res.records)
    leaky = nn.Sequential(nn.Linear(3, 3), nn.LeakyReLU(), nn.Linear(3, 2))
    with pytest.raises(InputError, match=r"'1' \(LeakyReLU\)"):
        weight_margin_bounds(leaky, torch.rand(2, 3), torch.zeros(2, dtype=torch.int64), 0.1)
    late_norm = nn.Sequential(nn.Linear(3, 3), Normalize(0.0, 2.0), nn.Linear(3, 2))
    with pytest.raises(InputError, match=r"'1'.*after the first Linear"):
        weight_margin_bounds(late_norm, torch.rand(2, 3), torch.zeros(2, dtype=torch.int64), 0.1)


BAD: list[tuple[str, Callable[[nn.Module, Tensor, Tensor], object]]] = [
    ("eps", lambda m, x, y: weight_margin_bounds(m, x, y, -0.1)),
    ("eps", lambda m, x, y: weight_margin_bounds(m, x, y, math.nan)),
    ("eps", lambda m, x, y: weight_margin_bounds(m, x, y, math.inf)),
    ("eps", lambda m, x, y: weight_margin_bounds(m, x, y, "0.1")),  # type: ignore[arg-type]
    ("eps", lambda m, x, y: weight_margin_bounds(m, x, y, True)),
    ("eps", lambda m, x, y: weight_margin_bounds(m, x, y, torch.full((3,), 0.1))),
    ("eps", lambda m, x, y: weight_attack(m, x, y, -1.0)),
    ("eps", lambda m, x, y: weight_robustness(m, (x, y), eps=-0.5, progress=False)),
    ("max_eps", lambda m, x, y: weight_robustness(m, (x, y), eps=0.5, max_eps=0.1, progress=False)),
    ("relative", lambda m, x, y: weight_margin_bounds(m, x, y, 0.1, relative="absolute")),
    ("method", lambda m, x, y: weight_margin_bounds(m, x, y, 0.1, method="deeppoly")),
    ("method", lambda m, x, y: weight_robustness(m, (x, y), method="milp", progress=False)),
    ("no module named 'nope'", lambda m, x, y: weight_attack(m, x, y, 0.1, layers=["nope"])),
    ("'1' is a ReLU", lambda m, x, y: weight_attack(m, x, y, 0.1, layers=["1"])),
    ("layers is empty", lambda m, x, y: weight_attack(m, x, y, 0.1, layers=[])),
    ("steps", lambda m, x, y: weight_attack(m, x, y, 0.1, steps=0)),
    ("tolerance", lambda m, x, y: certified_weight_radius(m, x, y, tolerance=1.5)),
    ("labels", lambda m, x, y: weight_margin_bounds(m, x, y + 5, 0.1)),
    ("y must be", lambda m, x, y: weight_margin_bounds(m, x, y[:2], 0.1)),
    ("model must be", lambda m, x, y: weight_attack("net", x, y, 0.1)),  # type: ignore[arg-type]
]


@pytest.mark.parametrize(("match", "call"), BAD, ids=[f"{i}-{m}" for i, (m, _) in enumerate(BAD)])
def test_bad_input_raises_input_error(match: str, call: Callable[[nn.Module, Tensor, Tensor], object]) -> None:
    net = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    x = torch.rand(4, 3)
    y = torch.zeros(4, dtype=torch.int64)
    with pytest.raises(InputError, match=match):
        call(net, x, y)
