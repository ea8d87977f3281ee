"""Robust regularisers: spectral normalisation, Parseval, weight correlation, Lipschitz bound, composition."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from bastion.defenses.regularizers import (
    LipschitzMargin,
    LipschitzPenalty,
    ParsevalPenalty,
    Regularized,
    WeightCorrelation,
    lipschitz_upper_bound,
    parseval_retraction,
    spectral_normalize,
    weight_matrices,
)
from bastion.errors import InputError, ModelError
from bastion.models import build_model


def _f(t: torch.Tensor) -> float:
    return float(t.detach())


def _jacobian_norms(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Exact l2 operator norm of the input-output Jacobian at each row of ``x``."""
    norms = []
    for xi in x:
        jac = torch.autograd.functional.jacobian(lambda v: model(v[None])[0], xi)
        norms.append(torch.linalg.matrix_norm(jac.reshape(jac.shape[0], -1), ord=2))
    return torch.stack(norms)


# --------------------------------------------------------------------------------------------- spectral norm
def test_spectral_normalize_makes_every_layer_spectral_norm_one() -> None:
    torch.manual_seed(0)
    model = build_model("cnn", (1, 8, 8), 10, channels=(4, 8), hidden=16)
    spectral_normalize(model)
    model.train()
    x = torch.rand(8, 1, 8, 8)
    with torch.no_grad():
        for _ in range(
            400
        ):  # one power-iteration step per training forward pass; close singular values converge slowly
            model(x)
    layers = [m for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    assert len(layers) == 4
    for m in layers:
        sigma = torch.linalg.matrix_norm(m.weight.detach().flatten(1), ord=2)
        assert sigma == pytest.approx(1.0, abs=1e-3), m
    # applying twice leaves the layers alone (no double normalisation)
    assert spectral_normalize(model) is model


def test_spectral_normalize_rejects_model_without_layers() -> None:
    with pytest.raises(ModelError):
        spectral_normalize(nn.Sequential(nn.ReLU()))
    with pytest.raises(InputError):
        spectral_normalize("not a model")  # type: ignore[arg-type]


# --------------------------------------------------------------------------------------------- Parseval
def test_parseval_penalty_is_zero_for_orthogonal_weights_and_matches_closed_form() -> None:
    torch.manual_seed(0)
    layer = nn.Linear(6, 4)
    nn.init.orthogonal_(layer.weight)  # rows orthonormal: W Wᵀ = I
    assert _f(ParsevalPenalty(beta=1.0)(layer)) == pytest.approx(0.0, abs=1e-10)
    tall = nn.Linear(3, 5)  # more outputs than inputs: columns orthonormal
    nn.init.orthogonal_(tall.weight)
    assert _f(ParsevalPenalty(beta=1.0)(tall)) == pytest.approx(0.0, abs=1e-10)
    with torch.no_grad():
        layer.weight.copy_(2 * torch.eye(4, 6))
    # W Wᵀ - I = 3 I (4x4): squared Frobenius norm 36; beta/2 · 36 with beta = 0.5
    assert _f(ParsevalPenalty(beta=0.5)(layer)) == pytest.approx(9.0)


def test_parseval_retraction_moves_weights_towards_a_tight_frame() -> None:
    torch.manual_seed(0)
    layer = nn.Linear(8, 4)
    nn.init.orthogonal_(layer.weight)
    with torch.no_grad():
        layer.weight.mul_(1.2)
    before = _f(ParsevalPenalty(beta=1.0)(layer))
    for _ in range(20):
        parseval_retraction(layer, beta=0.05)
    after = _f(ParsevalPenalty(beta=1.0)(layer))
    assert after < 0.05 * before


# --------------------------------------------------------------------------------------------- weight correlation
def test_weight_correlation_closed_forms() -> None:
    layer = nn.Linear(3, 3, bias=False)
    reg = WeightCorrelation()
    with torch.no_grad():
        layer.weight.copy_(torch.eye(3))
    assert _f(reg(layer)) == pytest.approx(0.0, abs=1e-7)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[1.0, 2.0, 3.0]] * 3))
    assert _f(reg(layer)) == pytest.approx(1.0, abs=1e-6)
    two = nn.Linear(2, 2, bias=False)
    with torch.no_grad():  # 60° apart, and a sign flip counts the same (absolute cosine)
        two.weight.copy_(torch.tensor([[1.0, 0.0], [-0.5, -math.sqrt(3) / 2]]))
    assert _f(reg(two)) == pytest.approx(0.5, abs=1e-6)


def test_weight_correlation_flattens_conv_filters_and_averages_layers() -> None:
    conv = nn.Conv2d(1, 2, 2, bias=False)
    lin = nn.Linear(2, 2, bias=False)
    with torch.no_grad():
        conv.weight.copy_(torch.ones(2, 1, 2, 2))  # identical filters: 1
        lin.weight.copy_(torch.eye(2))  # orthogonal: 0
    model = nn.Sequential(conv, nn.Flatten(), nn.Linear(2, 2), lin)
    with torch.no_grad():
        model[2].weight.copy_(torch.eye(2))
    assert _f(WeightCorrelation()(model)) == pytest.approx(1.0 / 3.0, abs=1e-6)
    assert _f(WeightCorrelation(include_last=False)(model)) == pytest.approx(0.5, abs=1e-6)


# --------------------------------------------------------------------------------------------- Lipschitz
def test_lipschitz_bound_of_one_linear_layer_is_its_spectral_norm() -> None:
    torch.manual_seed(0)
    layer = nn.Linear(5, 3)
    assert _f(lipschitz_upper_bound(nn.Sequential(layer))) == pytest.approx(
        _f(torch.linalg.matrix_norm(layer.weight, ord=2)), rel=1e-6
    )


@pytest.mark.parametrize(
    "arch,kwargs",
    [
        ("mlp", {"hidden": (16, 16), "std": 0.5}),
        ("cnn", {"channels": (4, 8), "hidden": 16, "std": 0.3}),
        ("resnet", {"width": 4, "blocks": (1, 1, 1)}),
    ],
)
def test_lipschitz_bound_upper_bounds_sampled_jacobian_norms(arch: str, kwargs: dict[str, object]) -> None:
    torch.manual_seed(0)
    model = build_model(arch, (1, 8, 8), 10, **kwargs).eval()
    if arch == "resnet":  # non-trivial batch-norm statistics
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_var.uniform_(0.5, 2.0)
                m.weight.data.uniform_(0.5, 1.5)
    bound = _f(lipschitz_upper_bound(model))
    x = torch.rand(6, 1, 8, 8)
    sampled = _jacobian_norms(model, x)
    assert bool((sampled <= bound * (1 + 1e-5)).all()), (sampled.max(), bound)
    # and difference quotients between random pairs respect it too
    x2 = x + 0.05 * torch.randn_like(x)
    with torch.no_grad():
        ratio = (model(x2) - model(x)).norm(dim=1) / (x2 - x).flatten(1).norm(dim=1)
    assert bool((ratio <= bound).all())


def test_lipschitz_bound_names_unsupported_layers() -> None:
    with pytest.raises(ModelError, match="GELU"):
        lipschitz_upper_bound(nn.Sequential(nn.Linear(2, 2), nn.GELU()))


def test_lipschitz_penalty_is_differentiable_and_training_on_it_shrinks_the_bound() -> None:
    torch.manual_seed(0)
    model = build_model("mlp", (4,), 3, hidden=(8,))
    reg = LipschitzPenalty()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    before = _f(lipschitz_upper_bound(model))
    for _ in range(20):
        opt.zero_grad()
        reg(model).backward()
        opt.step()
    assert _f(lipschitz_upper_bound(model)) < 0.8 * before


def test_lipschitz_margin_objective() -> None:
    torch.manual_seed(0)
    model = build_model("mlp", (4,), 3, hidden=(8,))
    x, y = torch.rand(10, 4), torch.randint(0, 3, (10,))
    ce = _f(F.cross_entropy(model(x), y))
    assert _f(LipschitzMargin(eps=0.0)(model, x, y)) == pytest.approx(ce, rel=1e-6)
    assert _f(LipschitzMargin(eps=0.5)(model, x, y)) > ce
    with pytest.raises(InputError):
        LipschitzMargin(eps=-1.0)


# --------------------------------------------------------------------------------------------- composition
class _Stateful:
    uses_unlabelled = True

    def __init__(self) -> None:
        self.seen: dict[str, object] = {}

    def __call__(
        self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, unlabelled: object = None
    ) -> torch.Tensor:
        self.seen["unlabelled"] = unlabelled
        return F.cross_entropy(model(x), y)

    def state_dict(self) -> dict[str, int]:
        return {"k": 1}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.seen["loaded"] = state

    def extra_parameters(self) -> list[nn.Parameter]:
        return [nn.Parameter(torch.zeros(1))]


def test_regularized_adds_weighted_penalties_and_passes_hooks_through() -> None:
    torch.manual_seed(0)
    model = build_model("mlp", (4,), 3, hidden=(8,))
    x, y = torch.rand(10, 4), torch.randint(0, 3, (10,))

    def input_penalty(m: nn.Module, batch: torch.Tensor) -> torch.Tensor:
        return m(batch).pow(2).mean()

    inner = _Stateful()
    obj = Regularized(inner, [(WeightCorrelation(), 0.5), (input_penalty, 2.0)])
    expected = F.cross_entropy(model(x), y) + 0.5 * WeightCorrelation()(model) + 2.0 * input_penalty(model, x)
    u = torch.rand(3, 4)
    assert _f(obj(model, x, y, unlabelled=u)) == pytest.approx(_f(expected), rel=1e-6)
    assert inner.seen["unlabelled"] is u
    assert obj.uses_unlabelled and obj.state_dict() == {"k": 1} and len(obj.extra_parameters()) == 1
    obj.load_state_dict({"k": 2})
    assert inner.seen["loaded"] == {"k": 2}
    assert len(obj.last) == 2
    obj(model, x, y)  # gradients reach the model through both penalties
    with pytest.raises(InputError):
        Regularized(inner, [(WeightCorrelation(), -1.0)])
    with pytest.raises(InputError):
        Regularized(inner, [WeightCorrelation()])  # type: ignore[list-item]
    with pytest.raises(InputError, match="scalar tensor"):
        Regularized(inner, [(lambda m: 1.0, 1.0)])(model, x, y)


def test_regularized_passes_the_schedule_hooks_through() -> None:
    """Wrapping a certified objective keeps its per-step ramp (the trainer calls step_start on the wrapper)."""
    from bastion.defenses.training import IBPTraining
    from bastion.threat import LpBall

    inner = IBPTraining(LpBall("linf", 0.3))
    wrapped = Regularized(inner, [(WeightCorrelation(), 0.1)])
    wrapped.step_start(0, 300)
    assert inner.eps == 0.0  # the warm-up
    wrapped.step_start(299, 300)
    assert inner.eps == pytest.approx(0.3)


def test_the_trainer_applies_the_parseval_retraction_after_every_step() -> None:
    from bastion.data import load_digits
    from bastion.defenses.regularizers import regularize
    from bastion.defenses.training import AdversarialTrainer
    from bastion.defenses.training.trainer import StandardObjective

    def frame_residual(model: nn.Module) -> float:
        return sum(float(_gram(w.detach())) for _, w in weight_matrices(model))

    def _gram(w: torch.Tensor) -> torch.Tensor:
        g = w @ w.T if w.shape[0] <= w.shape[1] else w.T @ w
        return (g - torch.eye(g.shape[0])).pow(2).sum()

    data = load_digits().subset(slice(0, 200))
    residuals = []
    for specs in ([], [("parseval", 0.05)]):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
        objective = regularize(StandardObjective(), model, specs)
        AdversarialTrainer(objective, epochs=3, batch_size=20, lr=1e-3, progress=False).fit(model, data)
        residuals.append(frame_residual(model))
    assert residuals[1] < 0.5 * residuals[0]
