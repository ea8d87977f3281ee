"""Tests of the generalisation measures: hand computations on tiny networks, the sigma search, Kendall's tau."""

from __future__ import annotations

import copy
import itertools
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from bastion.data import Dataset, load_digits
from bastion.defenses.regularizers import WeightCorrelation
from bastion.defenses.training import train
from bastion.errors import BastionWarning, InputError
from bastion.models import build_model
from bastion.reliability.generalisation import (
    find_sigma,
    generalisation_gap,
    kendall_tau,
    layer_correlations,
    measure,
    weight_correlation,
)

SQRT2 = math.sqrt(2.0)


def hand_mlp() -> nn.Sequential:
    """Linear(2, 2) -> ReLU -> Linear(2, 3) with small integer weights (every measure computable by hand)."""
    first, second = nn.Linear(2, 2), nn.Linear(2, 3)
    with torch.no_grad():
        first.weight.copy_(torch.tensor([[1.0, 0.0], [1.0, 1.0]]))
        first.bias.copy_(torch.tensor([0.0, 1.0]))
        second.weight.copy_(torch.tensor([[2.0, 0.0], [0.0, 1.0], [1.0, 1.0]]))
        second.bias.copy_(torch.tensor([0.0, 0.0, 0.0]))
    return nn.Sequential(first, nn.ReLU(), second)


def hand_mlp_init() -> dict[str, torch.Tensor]:
    """Initial weights of :func:`hand_mlp`: differences [[1, 0], [1, 0]], [[1, 0], [0, 0], [0, 0]], bias 2."""
    return {
        "0.weight": torch.tensor([[0.0, 0.0], [0.0, 1.0]]),
        "0.bias": torch.tensor([0.0, 1.0]),
        "2.weight": torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]),
        "2.bias": torch.tensor([0.0, 0.0, -2.0]),
    }


def small_digits(n: int = 300) -> Dataset:
    return load_digits().subset(slice(0, n))


@pytest.fixture(scope="module")
def trained_mlp() -> tuple[nn.Module, nn.Module, Dataset, Dataset]:
    """A digits MLP (hidden 32) trained on 60 % of the data, its initial copy, and the train / test parts."""
    train_set, test_set = load_digits().train_test_split(test_fraction=0.4, seed=0)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = build_model("mlp", train_set.feature_shape, 10, hidden=(32,))
    init = copy.deepcopy(model)
    train(model, train_set, epochs=6, lr=3e-3, seed=0, progress=False)
    return model, init, train_set, test_set


# --------------------------------------------------------------------------------------------- hand computations
def test_every_measure_of_a_hand_set_mlp_matches_the_hand_computation() -> None:
    model = hand_mlp()
    m = measure(model, init=hand_mlp_init(), progress=False)
    assert m.num_layers == 2
    assert m.num_params == 2 * 2 + 2 + 3 * 2 + 3
    assert m.prod_frobenius == pytest.approx(math.sqrt(3.0) * math.sqrt(7.0))
    # W1ᵀW1 = [[2, 1], [1, 1]] (largest eigenvalue (3 + √5)/2), W2ᵀW2 = [[5, 1], [1, 2]] ((7 + √13)/2)
    assert m.prod_spectral == pytest.approx(math.sqrt((3 + math.sqrt(5)) / 2) * math.sqrt((7 + math.sqrt(13)) / 2))
    # rows (1,0),(1,1): |cos| = 1/√2; rows (2,0),(0,1),(1,1): pairs 0, 1/√2, 1/√2
    rho1, rho2 = 1 / SQRT2, SQRT2 / 3
    assert m.layer_correlations == pytest.approx([rho1, rho2])
    assert m.weight_correlation == pytest.approx((rho1 + rho2) / 2)
    # -1/2 log det of the equicorrelated covariance, fan_in = 2 columns per layer
    term1 = math.log(2.0)  # = -log(1 - rho1²) with rho1² = 1/2
    term2 = -(2 * math.log(1 - rho2) + math.log(1 + 2 * rho2))
    assert m.correlation_term == pytest.approx(term1 + term2)
    # differences: [[1, 0], [1, 0]] (spectral √2) and [[1, 0], [0, 0], [0, 0]] (spectral 1), plus a bias of 2
    assert m.sum_spectral_distance == pytest.approx(SQRT2 + 1.0)
    assert m.distance_to_init == pytest.approx(math.sqrt(1 + 1 + 1 + 4))
    # no data: no sigma, hence no PAC-Bayes measures
    assert m.sigma is None and m.pac_bayes is None and m.pbc is None
    d = m.to_dict()
    assert d["layer_correlations"] == m.layer_correlations and d["prod_frobenius"] == m.prod_frobenius


def test_pac_bayes_and_pbc_follow_their_formulas_with_the_searched_sigma() -> None:
    model = hand_mlp()
    x = torch.rand(64, 2, generator=torch.Generator().manual_seed(0))
    data = Dataset(x, model(x).argmax(1).detach(), num_classes=3, name="self-labelled")  # train accuracy 1
    m = measure(model, init=hand_mlp_init(), data=data, progress=False)
    assert m.train_accuracy == 1.0
    assert m.sigma is not None and m.sigma > 0
    assert m.pac_bayes is not None and m.pac_bayes == pytest.approx(7.0 / (2 * m.sigma**2))
    assert m.pbc == pytest.approx(m.pac_bayes + m.correlation_term)


def test_conv_correlation_compares_filter_matrices_per_input_channel() -> None:
    conv = nn.Conv2d(2, 2, kernel_size=2, bias=False)
    with torch.no_grad():
        conv.weight.copy_(
            torch.tensor(
                [
                    [[[1.0, 0.0], [0.0, 0.0]], [[1.0, 1.0], [0.0, 0.0]]],  # filter 0: channel 0, channel 1
                    [[[0.0, 1.0], [0.0, 0.0]], [[1.0, 0.0], [0.0, 0.0]]],  # filter 1
                ]
            )
        )
    fc = nn.Linear(8, 2, bias=False)
    with torch.no_grad():
        fc.weight.copy_(torch.eye(2, 8))  # orthogonal rows
    model = nn.Sequential(conv, nn.ReLU(), nn.Flatten(), fc)
    # channel 0: (1,0,0,0) vs (0,1,0,0) -> 0; channel 1: (1,1,0,0) vs (1,0,0,0) -> 1/√2; mean 1/(2√2)
    rho_conv = 1 / (2 * SQRT2)
    assert layer_correlations(model) == pytest.approx([rho_conv, 0.0])
    assert weight_correlation(model) == pytest.approx(rho_conv / 2)
    # the flattened-filter correlation of the training penalty is a different number (1/√6): not what is used here
    flat = float(WeightCorrelation.layer_correlation(conv.weight.detach().flatten(1)))
    assert flat == pytest.approx(1 / math.sqrt(6)) and abs(flat - rho_conv) > 0.05

    m = measure(model, progress=False)
    kernel = conv.weight.detach().reshape(2, 8)
    assert m.prod_spectral == pytest.approx(float(torch.linalg.matrix_norm(kernel, ord=2)) * 1.0)
    assert m.prod_frobenius == pytest.approx(math.sqrt(5.0) * SQRT2)  # five ones in the kernel, two in the rows
    # conv: n = 2 neurons, fan_in = 2·2·2 = 8 columns; the orthogonal layer adds nothing
    assert m.correlation_term == pytest.approx(0.5 * 8 * -(math.log(1 - rho_conv) + math.log(1 + rho_conv)))


def test_one_by_one_convolutions_and_single_neuron_layers_have_no_correlation() -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.Flatten(), nn.Linear(4 * 2 * 2, 3), nn.Linear(3, 1))
    assert len(layer_correlations(model)) == 1  # only the Linear(16, 3)
    assert measure(model, progress=False).num_layers == 3


@pytest.mark.parametrize("shape", [(5, 7), (16, 3)])
def test_spectral_norm_product_is_the_exact_largest_singular_value(shape: tuple[int, int]) -> None:
    with torch.random.fork_rng():
        torch.manual_seed(1)
        layers = [nn.Linear(shape[1], shape[0]), nn.Linear(shape[0], 4)]
    model = nn.Sequential(layers[0], nn.ReLU(), layers[1])
    expected = 1.0
    for layer in layers:
        w = layer.weight.detach().double()
        expected *= float(torch.linalg.matrix_norm(w, ord=2))
        assert float(torch.linalg.svdvals(w)[0]) == pytest.approx(float(torch.linalg.matrix_norm(w, ord=2)))
    assert measure(model, progress=False).prod_spectral == pytest.approx(expected, rel=1e-12)


# --------------------------------------------------------------------------------------------- weight correlation
def test_weight_correlation_is_zero_for_orthogonal_rows_and_one_for_parallel_rows() -> None:
    q, _ = torch.linalg.qr(torch.randn(6, 6, generator=torch.Generator().manual_seed(0)))
    ortho = nn.Linear(6, 4, bias=False)
    parallel = nn.Linear(6, 4, bias=False)
    v = torch.randn(6, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ortho.weight.copy_(q[:4] * torch.tensor([[1.0], [2.0], [0.5], [3.0]]))  # scale does not matter
        parallel.weight.copy_(torch.stack([v, -2 * v, 0.1 * v, 5 * v]))  # |cos| = 1 whatever the sign
    assert weight_correlation(ortho) == pytest.approx(0.0, abs=1e-6)  # float32 rounding of the QR factor
    assert weight_correlation(parallel) == pytest.approx(1.0)
    assert measure(ortho, progress=False).correlation_term == pytest.approx(0.0, abs=1e-6)
    # rounding leaves rho a hair below 1: the term is huge; with exactly parallel rows it is infinite
    assert measure(parallel, progress=False).correlation_term > 100
    exact = nn.Linear(3, 2, bias=False)
    with torch.no_grad():
        exact.weight.copy_(torch.tensor([[1.0, 0.0, 0.0], [-4.0, 0.0, 0.0]]))
    assert weight_correlation(exact) == 1.0
    assert measure(exact, progress=False).correlation_term == math.inf


def test_correlation_term_grows_with_the_correlation() -> None:
    base = torch.eye(3, 5)
    terms = []
    for mix in (0.0, 0.2, 0.5, 0.9):
        layer = nn.Linear(5, 3, bias=False)
        with torch.no_grad():
            layer.weight.copy_(base + mix * torch.ones(3, 5))
        terms.append(measure(layer, progress=False).correlation_term)
    assert terms[0] == pytest.approx(0.0, abs=1e-9)
    assert all(a < b for a, b in itertools.pairwise(terms))


# --------------------------------------------------------------------------------------------- PAC-Bayes, sigma
def test_pac_bayes_is_zero_at_the_initial_weights(trained_mlp: tuple[nn.Module, nn.Module, Dataset, Dataset]) -> None:
    model, _, train_set, _ = trained_mlp
    m = measure(model, init=copy.deepcopy(model), data=train_set.subset(slice(0, 300)), progress=False)
    assert m.pac_bayes == 0.0
    assert m.sum_spectral_distance == 0.0 and m.distance_to_init == 0.0
    assert m.pbc == pytest.approx(m.correlation_term)


def test_measure_leaves_the_model_untouched(trained_mlp: tuple[nn.Module, nn.Module, Dataset, Dataset]) -> None:
    model, init, train_set, _ = trained_mlp
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.train()
    m = measure(model, init=init, data=train_set.subset(slice(0, 300)), progress=False)
    assert model.training
    model.eval()
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert m.pac_bayes is not None and m.pac_bayes > 0 and m.sum_spectral_distance is not None
    assert m.sum_spectral_distance > 0


def _noisy_drop(model: nn.Module, data: Dataset, sigma: float, draws: int, seed: int) -> float:
    """Mean accuracy drop over ``draws`` fresh Gaussian perturbations, computed independently of the module."""
    acc0 = float((model(data.x).argmax(1) == data.y).float().mean())
    gen = torch.Generator().manual_seed(seed)
    drops = []
    with torch.no_grad():
        for _ in range(draws):
            noisy = copy.deepcopy(model)
            for p in noisy.parameters():
                p.add_(sigma * torch.randn(p.shape, generator=gen))
            drops.append(acc0 - float((noisy(data.x).argmax(1) == data.y).float().mean()))
    return sum(drops) / draws


def test_sigma_search_finds_the_noise_level_of_the_threshold(
    trained_mlp: tuple[nn.Module, nn.Module, Dataset, Dataset],
) -> None:
    model, _, train_set, _ = trained_mlp
    data = train_set.subset(slice(0, 400))
    found = find_sigma(model, data, threshold=0.1, seed=0)
    assert 0 < found.sigma < 2.0
    assert found.train_accuracy - found.perturbed_accuracy <= 0.1
    assert found.train_accuracy - found.perturbed_accuracy >= 0.1 - 0.01 - 1e-9  # stopped within the tolerance
    # fresh noise (other seed, more draws): the drop at sigma is near the threshold, and far beyond it at 3 sigma
    assert _noisy_drop(model, data, found.sigma, draws=20, seed=123) == pytest.approx(0.1, abs=0.04)
    assert _noisy_drop(model, data, 3 * found.sigma, draws=5, seed=7) > 0.25
    assert find_sigma(model, data, threshold=0.1, seed=0) == found  # seeded: reproducible


def test_sigma_grows_with_the_allowed_accuracy_drop(
    trained_mlp: tuple[nn.Module, nn.Module, Dataset, Dataset],
) -> None:
    model, _, train_set, _ = trained_mlp
    data = train_set.subset(slice(0, 300))
    sigmas = [find_sigma(model, data, threshold=t, mc_samples=5, seed=0).sigma for t in (0.05, 0.1, 0.2, 0.4)]
    assert all(a < b for a, b in itertools.pairwise(sigmas)), sigmas
    pbs = [
        measure(model, init=trained_mlp[1], data=data, sigma_threshold=t, mc_samples=5).pac_bayes for t in (0.05, 0.4)
    ]
    assert pbs[0] is not None and pbs[1] is not None and pbs[0] > pbs[1]  # larger sigma, smaller KL


def test_sigma_search_warns_when_noise_cannot_cost_the_threshold() -> None:
    data = small_digits(200)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        untrained = build_model("mlp", data.feature_shape, 10, hidden=(8,))  # near chance: nothing to lose
    with pytest.warns(BastionWarning, match="near chance"):
        found = find_sigma(untrained, data, threshold=0.5, mc_samples=2)
    assert found.sigma > 2.0 and found.train_accuracy - found.perturbed_accuracy <= 0.5


# --------------------------------------------------------------------------------------------- gap and ranking
def test_generalisation_gap_matches_a_direct_computation(
    trained_mlp: tuple[nn.Module, nn.Module, Dataset, Dataset],
) -> None:
    model, _, train_set, test_set = trained_mlp
    gap = generalisation_gap(model, train_set, test_set, batch_size=100)
    with torch.no_grad():
        out_tr, out_te = model(train_set.x), model(test_set.x)
    acc_tr = float((out_tr.argmax(1) == train_set.y).float().mean())
    acc_te = float((out_te.argmax(1) == test_set.y).float().mean())
    assert gap.train_accuracy == pytest.approx(acc_tr) and gap.test_accuracy == pytest.approx(acc_te)
    assert gap.accuracy_gap == pytest.approx(acc_tr - acc_te)
    loss_tr, loss_te = float(F.cross_entropy(out_tr, train_set.y)), float(F.cross_entropy(out_te, test_set.y))
    assert gap.train_loss == pytest.approx(loss_tr, rel=1e-5) and gap.test_loss == pytest.approx(loss_te, rel=1e-5)
    assert gap.loss_gap == pytest.approx(loss_te - loss_tr, rel=1e-4, abs=1e-6)
    assert set(gap.to_dict()) == {"train_accuracy", "test_accuracy", "train_loss", "test_loss", "accuracy_gap",
                                  "loss_gap"}  # fmt: skip


def test_kendall_tau_on_known_orderings() -> None:
    tau, p = kendall_tau([1.0, 2.0, 3.0, 4.0], [0.1, 0.2, 0.3, 0.4])
    assert tau == pytest.approx(1.0) and 0 < p <= 1
    assert kendall_tau([4, 3, 2, 1], [0.1, 0.2, 0.3, 0.4])[0] == pytest.approx(-1.0)
    # one swapped pair among 6: (5 concordant - 1 discordant) / 6
    assert kendall_tau([1, 2, 4, 3], [0.1, 0.2, 0.3, 0.4])[0] == pytest.approx(4 / 6)
    # infinite measures rank last
    assert kendall_tau([1.0, math.inf, 2.0], [0.0, 1.0, 0.5])[0] == pytest.approx(1.0)


# --------------------------------------------------------------------------------------------- bad input
def test_bad_inputs_raise_input_error(trained_mlp: tuple[nn.Module, nn.Module, Dataset, Dataset]) -> None:
    model, _, train_set, test_set = trained_mlp
    with pytest.raises(InputError, match="no Linear or Conv layer"):
        measure(nn.Sequential(nn.Flatten(), nn.ReLU()), progress=False)
    with pytest.raises(InputError, match=r"torch\.nn\.Module"):
        measure("model.pt", progress=False)  # type: ignore[arg-type]
    other = build_model("mlp", train_set.feature_shape, 10, hidden=(16,))
    with pytest.raises(InputError, match="same architecture"):
        measure(model, init=other, progress=False)
    deeper = build_model("mlp", train_set.feature_shape, 10, hidden=(32, 32))
    with pytest.raises(InputError, match="same architecture"):
        measure(model, init=deeper, progress=False)
    with pytest.raises(InputError, match="same architecture"):
        measure(model, init={"3.weight": torch.zeros(10, 32)}, progress=False)
    with pytest.raises(InputError, match="init must be"):
        measure(model, init=[1, 2], progress=False)  # type: ignore[arg-type]
    with pytest.raises(InputError, match="sigma_threshold"):
        measure(model, data=train_set, sigma_threshold=1.5, progress=False)
    with pytest.raises(InputError, match="sigma_threshold"):
        find_sigma(model, train_set, threshold=0.0)
    with pytest.raises(InputError, match="data"):
        measure(model, data="digits", progress=False)  # type: ignore[arg-type]
    with pytest.raises(InputError, match="seed"):
        measure(model, seed=1.5, progress=False)  # type: ignore[arg-type]
    with pytest.raises(InputError, match="logits"):
        generalisation_gap(nn.Sequential(nn.Flatten(), nn.Linear(64, 3)), train_set, test_set)
    with pytest.raises(InputError, match="same length"):
        kendall_tau([1.0, 2.0], [1.0, 2.0, 3.0])
    with pytest.raises(InputError, match="NaN"):
        kendall_tau([1.0, math.nan], [1.0, 2.0])
    with pytest.raises(InputError, match="at least two"):
        kendall_tau([1.0], [1.0])
    with pytest.raises(InputError, match="numbers"):
        kendall_tau(["a", "b"], [1.0, 2.0])  # type: ignore[list-item]
