"""EOT and BPDA: exact forward values, and attacks that get through the defences they were made for."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from bastion.attacks import BPDA, EOT, PGD
from bastion.errors import InputError
from bastion.threat import LpBall


@pytest.fixture(scope="module")
def digits_model(
    digits_mlp64: tuple[nn.Module, torch.Tensor, torch.Tensor],
) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """The shared digits MLP (tests/conftest.py) and its first 128 held-out test images."""
    model, x, y = digits_mlp64
    return model, x[:128], y[:128]


def quantize(x: torch.Tensor) -> torch.Tensor:
    """Bit-depth reduction to 2 bits: piecewise constant, so its gradient is zero almost everywhere."""
    return torch.round(x * 3) / 3


class Quantized(nn.Module):
    """A 'defence' that masks gradients: the classifier sees quantised inputs."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(quantize(x))


def test_bpda_forward_is_exact_and_gradient_is_straight_through(digits_model) -> None:
    model, x, _ = digits_model
    wrapped = BPDA(model, quantize)
    torch.testing.assert_close(wrapped(x), model(quantize(x)))
    xg = x[:4].clone().requires_grad_(True)
    (g_bpda,) = torch.autograd.grad(wrapped(xg).sum(), xg)
    z = quantize(x[:4]).requires_grad_(True)
    (g_at_z,) = torch.autograd.grad(model(z).sum(), z)
    torch.testing.assert_close(g_bpda, g_at_z)  # the model's gradient at g(x), passed straight through


def test_bpda_breaks_a_gradient_masking_defence(digits_model) -> None:
    model, x, y = digits_model
    threat = LpBall("linf", 0.2)
    defended = Quantized(model)
    masked = PGD(steps=20, random_start=False)(defended, x, y, threat=threat)
    through = PGD(steps=20, random_start=False)(BPDA(model, quantize), x, y, threat=threat)
    # BPDA's adversarial examples are real ones for the defended model (same forward function)
    with torch.no_grad():
        assert bool((defended(through.x_adv).argmax(1) != y)[through.success].all())
    assert through.robust_accuracy(y) < masked.robust_accuracy(y) - 0.3


def test_bpda_pulls_the_gradient_back_through_the_approximation(digits_model) -> None:
    model, x, _ = digits_model
    doubled = BPDA(model, quantize, approx=lambda t: 2 * t)  # h'(x) = 2: the gradient must double
    torch.testing.assert_close(doubled(x), model(quantize(x)))  # the value stays exact
    xg = x[:4].clone().requires_grad_(True)
    (g,) = torch.autograd.grad(doubled(xg).sum(), xg)
    z = quantize(x[:4]).requires_grad_(True)
    (g_at_z,) = torch.autograd.grad(model(z).sum(), z)
    torch.testing.assert_close(g, 2 * g_at_z)


class NoisyModel(nn.Module):
    """A randomised defence: Gaussian noise added to the input at every forward pass."""

    def __init__(self, model: nn.Module, sigma: float) -> None:
        super().__init__()
        self.model, self.sigma = model, sigma

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x + self.sigma * torch.randn_like(x))


def _grad(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    xg = x.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(nn.functional.cross_entropy(model(xg), y, reduction="sum"), xg)
    return g.flatten(1)


def test_eot_gradient_estimates_the_expected_gradient_better_than_one_draw(digits_model) -> None:
    model, x, y = digits_model
    torch.manual_seed(0)
    noisy = NoisyModel(model, sigma=0.3)
    x, y = x[:32], y[:32]
    reference = _grad(EOT(noisy, samples=2000), x, y)  # near the gradient of the expected output
    one = _grad(noisy, x, y)
    eot = _grad(EOT(noisy, samples=50), x, y)
    cos_one = nn.functional.cosine_similarity(one, reference).mean()
    cos_eot = nn.functional.cosine_similarity(eot, reference).mean()
    assert cos_eot > 0.9 and cos_eot > cos_one + 0.1


def test_eot_is_the_identity_on_a_deterministic_model(digits_model) -> None:
    model, x, _ = digits_model
    torch.testing.assert_close(EOT(model, samples=3)(x), model(x))
    torch.testing.assert_close(EOT(model, samples=3, average="probs")(x), model(x).log_softmax(-1))


def test_eot_attack_runs_and_reverifies(digits_model) -> None:
    model, x, y = digits_model
    torch.manual_seed(0)
    attack = PGD(steps=20, rel_stepsize=0.1)
    res = attack(EOT(NoisyModel(model, 0.1), samples=8), x[:32], y[:32], threat=LpBall("linf", 0.2))
    assert bool(LpBall("linf", 0.2).contains(res.x_adv, x[:32]).all())
    assert res.success_rate > 0.5


def test_wrapper_arguments_are_checked(digits_model) -> None:
    model, _, _ = digits_model
    with pytest.raises(InputError, match="samples"):
        EOT(model, samples=0)
    with pytest.raises(InputError, match="average"):
        EOT(model, average="median")
    with pytest.raises(InputError, match="Module"):
        BPDA(lambda t: t, quantize)  # type: ignore[arg-type]
    with pytest.raises(InputError, match="shape"):
        BPDA(model, lambda t: t.flatten(1))(torch.rand(2, 1, 8, 8))
