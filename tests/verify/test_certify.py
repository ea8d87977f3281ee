"""certify: sound margins on l-inf/l2/l1 balls, certified radii no attack can beat, batched bisection, store resume."""

from __future__ import annotations

import copy
import importlib
import math

import pytest
import torch
from torch import Tensor, nn

from bastion.errors import InputError
from bastion.results import Criterion
from bastion.store import Store
from bastion.threat import LpBall
from bastion.verify.bounds import BoundOptions
from bastion.verify.certify import METHODS, certified_radius, certify, check_method, margin_bounds
from bastion.verify.ir import Network, as_network

# bastion.verify re-exports the function certify under the module's name, which `import ... as` would pick up
certify_mod = importlib.import_module("bastion.verify.certify")

FAST = BoundOptions(alpha_steps=5)


def _random_net(seed: int, act: type[nn.Module]) -> tuple[nn.Module, int]:
    g = torch.Generator().manual_seed(seed)
    d = 2 + seed % 4
    model = nn.Sequential(nn.Linear(d, 8), act(), nn.Linear(8, 6), act(), nn.Linear(6, 3))
    for m in model.modules():
        if isinstance(m, nn.Linear):
            m.weight.data.copy_(torch.randn(m.weight.shape, generator=g))
            m.bias.data.copy_(torch.randn(m.bias.shape, generator=g) * 0.3)
    return model.double().eval(), d


def _ball_points(x: Tensor, eps: float, norm: str, count: int, g: torch.Generator) -> Tensor:
    """Points of the ball ∩ [0, 1]^d, many on its boundary (clipping to the box moves towards x)."""
    n, d = x.shape
    if norm == "linf":
        u = torch.rand(n, count, d, generator=g, dtype=x.dtype) * 2 - 1
        u[:, : count // 2] = u[:, : count // 2].sign()
        delta = u * eps
    elif norm == "l2":
        dirs = torch.randn(n, count, d, generator=g, dtype=x.dtype)
        dirs = dirs / dirs.norm(dim=-1, keepdim=True)
        r = torch.rand(n, count, 1, generator=g, dtype=x.dtype)
        r[:, : count // 2] = 1.0
        delta = dirs * r * eps
    else:
        vertex = torch.nn.functional.one_hot(torch.randint(0, d, (n, count), generator=g), d).to(x.dtype)
        sign = torch.randint(0, 2, (n, count, 1), generator=g).to(x.dtype) * 2 - 1
        delta = vertex * sign * eps * torch.rand(n, count, 1, generator=g, dtype=x.dtype).sqrt()
    return (x.unsqueeze(1) + delta).clamp(0, 1)


@pytest.mark.parametrize("norm", ["linf", "l2", "l1"])
def test_margin_bounds_sound_every_method(norm: str) -> None:
    for seed in range(12):
        model, d = _random_net(seed, nn.ReLU if seed % 3 else nn.Tanh)
        net = Network.from_module(model, (d,))
        g = torch.Generator().manual_seed(seed)
        x = torch.rand(4, d, generator=g, dtype=torch.float64)
        y = model(x).argmax(1)
        eps = 0.3 if norm != "linf" else 0.15
        pts = _ball_points(x, eps, norm, 2000, g)
        logits = model(pts.reshape(-1, d)).reshape(4, -1, 3)
        margins = logits.gather(2, y.reshape(4, 1, 1).expand(-1, logits.shape[1], 1)) - logits  # (4, S, 3)
        keep = torch.ones(4, 3, dtype=torch.bool)
        keep[torch.arange(4), y] = False
        true_min = margins.amin(1)[keep].reshape(4, 2)
        for method in METHODS:
            lb = margin_bounds(net, x, y, LpBall(norm, eps), method=method, options=FAST)
            assert bool((lb <= true_min + 1e-9).all()), f"{method} {norm} seed {seed}: bound above a sampled margin"


def test_l2_dual_norm_beats_the_enclosing_box(digits_mlp64) -> None:
    model, x, y = digits_mlp64
    net = as_network(model, (1, 8, 8))
    x, y = x[:16], y[:16]
    threat = LpBall("l2", 0.3)
    box = margin_bounds(net, x, y, threat, method="ibp")
    for method in ("crown", "deepz", "symbolic"):
        ball = margin_bounds(net, x, y, threat, method=method)
        assert float(ball.mean()) > float(box.mean()) + 0.1, method


def _pgd_finds(model: nn.Module, x: Tensor, y: Tensor, norm: str, eps: Tensor) -> Tensor:
    """PGD with per-sample radii (Madry et al. 2018; margin loss, 5 random restarts x 100 steps), batched through
    the threat model's geometry; True where an adversarial example inside the ball is found."""
    threat = LpBall(norm, 1.0)
    g = torch.Generator().manual_seed(0)
    found = torch.zeros(x.shape[0], dtype=torch.bool)
    crit = Criterion(y)
    for _ in range(5):
        x_adv = threat.random_start(x, g, eps=eps)
        for _ in range(100):
            x_adv.requires_grad_(True)
            logits = model(x_adv)
            (grad,) = torch.autograd.grad(crit.loss(logits, "cw").sum(), x_adv)
            hit = crit.is_adversarial(logits.detach()) & threat.contains(x_adv.detach(), x, eps=eps)
            found |= hit
            x_adv = threat.project(threat.step(x_adv.detach(), grad, eps * 0.05), x, eps=eps)
        found |= crit.is_adversarial(model(x_adv).detach()) & threat.contains(x_adv, x, eps=eps)
    return found & (eps > 0)


@pytest.mark.parametrize(("norm", "method"), [("linf", "crown"), ("linf", "deepz"), ("l2", "crown")])
def test_no_attack_inside_the_certified_radius(digits_mlp64, norm: str, method: str) -> None:
    model, x, y = digits_mlp64
    x, y = x[:12], y[:12]
    net = as_network(model, (1, 8, 8))
    threat = LpBall(norm, 0.05 if norm == "linf" else 0.3)
    r = certified_radius(net, x, y, threat, method=method)
    correct = model(x).argmax(1) == y
    assert bool((r[~correct] == 0).all()) and bool((r[correct] > 0).all())
    assert not bool(_pgd_finds(model, x, y, norm, r * (1 - 1e-3)).any()), "an attack beat a certified radius"
    # the same attack does break the samples a few radii further out: the check above has teeth
    assert int(_pgd_finds(model, x, y, norm, r * 4).sum()) >= 6


def test_bisection_brackets_and_batching(digits_mlp64) -> None:
    model, x, y = digits_mlp64
    x, y = x[:10].double(), y[:10]
    net = as_network(copy.deepcopy(model).double(), (1, 8, 8))
    threat = LpBall("linf", 0.02)
    tol = 1e-3
    r = certified_radius(net, x, y, threat, method="ibp", tolerance=tol)
    for i in range(10):
        single = certified_radius(net, x[i : i + 1], y[i : i + 1], threat, method="ibp", tolerance=tol)
        torch.testing.assert_close(single, r[i : i + 1], rtol=0, atol=0)
    ok = r > 0
    # IBP is monotone in eps: certified everywhere below the radius, refused just past the final bracket
    for frac in (0.25, 0.5, 0.999, 1.0):
        lb = margin_bounds(net, x[ok], y[ok], threat, eps=r[ok] * frac, method="ibp")
        assert bool((lb > 0).all(1).all()), frac
    lb = margin_bounds(net, x[ok], y[ok], threat, eps=r[ok] * (1 + 2 * tol), method="ibp")
    assert not bool((lb > 0).all(1).any())
    # starting from a different first probe (the threat's eps) lands in the same tolerance bracket
    r2 = certified_radius(net, x, y, LpBall("linf", 0.3), method="ibp", tolerance=tol)
    torch.testing.assert_close(r2, r, rtol=2 * tol, atol=0)


def test_certify_records_and_statuses(digits_mlp64) -> None:
    model, x, y = digits_mlp64
    # a few misclassified samples among correct ones
    wrong = (model(x).argmax(1) != y).nonzero().squeeze(1)[:3]
    sel = torch.cat([wrong, torch.arange(20)])
    data = (x[sel], y[sel])
    threat = LpBall("linf", 0.03)
    res = certify(model, data, threat, method="crown", progress=False)
    assert res.n == len(sel) and len(res.records) == len(sel)
    for rec in res.records:
        if rec.clean_pred != rec.label:
            assert rec.status == "falsified" and rec.adv_distance == 0.0 and rec.certified == 0.0
        elif rec.status == "robust":
            assert rec.certified is not None and rec.certified >= threat.eps and rec.attack == "crown"
        else:
            assert rec.status == "unknown" and rec.certified is not None and rec.certified < threat.eps
    assert res.certified_accuracy == pytest.approx(sum(r.status == "robust" for r in res.records) / len(sel))
    assert res.certified_accuracy_at(threat.eps) == pytest.approx(res.certified_accuracy)
    assert res.certified_accuracy > 0.3
    no_radius = certify(model, data, threat, method="crown", radius=False, progress=False)
    assert [r.status for r in no_radius.records] == [r.status for r in res.records]
    assert all(r.certified in (None, threat.eps, 0.0) for r in no_radius.records)
    ibp = certify(model, data, threat, method="ibp", radius=False, progress=False)
    assert ibp.certified_accuracy <= res.certified_accuracy
    assert "certified accuracy" in res.table() and res.to_dict()["method"] == "crown"


def test_certify_resumes_after_interruption(digits_mlp64, tmp_path, monkeypatch) -> None:
    model, x, y = digits_mlp64
    data = (x[:20], y[:20])
    threat = LpBall("linf", 0.03)
    reference = certify(model, data, threat, method="deepz", batch_size=5, progress=False)
    real = certify_mod._certify_batch
    calls: list[int] = []

    def flaky(*args, **kwargs):
        calls.append(int(args[4][0]))
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(certify_mod, "_certify_batch", flaky)
    path = tmp_path / "runs.db"
    with pytest.raises(KeyboardInterrupt):
        certify(model, data, threat, method="deepz", batch_size=5, store=path, progress=False)
    with Store(path) as store:
        (run,) = store.runs()
        assert run.status == "running" and run.n_records == 10
    calls.clear()
    resumed = certify(model, data, threat, method="deepz", batch_size=5, store=path, progress=False)
    assert calls == [10, 15], "only the batches not yet stored are certified again"
    got = sorted(resumed.records, key=lambda r: r.index)
    want = sorted(reference.records, key=lambda r: r.index)
    assert [r.index for r in got] == list(range(20))
    for a, b in zip(got, want):
        assert a.status == b.status and a.certified == pytest.approx(b.certified, rel=1e-6)
    with Store(path) as store:
        (run,) = store.runs()
        assert run.status == "complete" and run.summary is not None
        assert run.summary["certified_accuracy"] == pytest.approx(reference.certified_accuracy)


def test_bad_inputs(digits_mlp64) -> None:
    model, x, y = digits_mlp64
    data = (x[:4], y[:4])
    with pytest.raises(InputError, match="norms"):
        certify(model, data, LpBall("l0", 2), progress=False)
    with pytest.raises(InputError, match="unknown bound method"):
        certify(model, data, LpBall("linf", 0.1), method="magic", progress=False)
    with pytest.raises(InputError, match="domain"):
        certify(model, data, LpBall("linf", 0.1, domain=(-1.0, 1.0)), progress=False)
    with pytest.raises(InputError, match="tolerance"):
        certify(model, data, LpBall("linf", 0.1), tolerance=0.0, progress=False)
    with pytest.raises(InputError, match="finite eps"):
        certify(model, data, LpBall("linf", math.inf), progress=False)
    with pytest.raises(InputError, match="batch_size"):
        certify(model, data, LpBall("linf", 0.1), batch_size=0, progress=False)
    with pytest.raises(InputError, match="eps must be"):
        margin_bounds(as_network(model, (1, 8, 8)), x[:2], y[:2], LpBall("linf", 0.1), eps=torch.tensor([-1.0, 0.1]))
    assert check_method("alpha_crown") == "alpha-crown" and check_method("Zonotope") == "deepz"
