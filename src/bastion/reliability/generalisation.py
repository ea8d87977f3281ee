"""Generalisation measures of a trained network, and how well they rank generalisation gaps.

The measures compared by Jin, Yi, Zhang, Zhang, Schewe & Huang, "How does Weight Correlation Affect the
Generalisation Ability of Deep Neural Networks", NeurIPS 2020 (reference code: the authors' notebook
``Complexity_Measure/complexity_measure_cifar10.ipynb`` in ``Alexkael/NeurIPS2020_Weight_Correlation``), which
themselves come from Neyshabur, Bhojanapalli, McAllester & Srebro, "Exploring Generalization in Deep Learning",
NeurIPS 2017, and Jiang, Neyshabur, Mobahi, Krishnan & Bengio, "Fantastic Generalization Measures and Where to
Find Them", ICLR 2020. Every measure is computed on the Linear and Conv layers of any ``torch.nn.Module``, each
weight ``W_l`` read as the matrix (out, fan_in) of :func:`bastion.defenses.regularizers.weight_matrices` (a conv
kernel (out, in, kh, kw) becomes (out, in·kh·kw)):

* ``prod_frobenius`` — ``prod_l ||W_l||_F``;
* ``prod_spectral`` — ``prod_l ||W_l||_2``, the *exact* largest singular value of each matrix
  (``torch.linalg.matrix_norm(ord=2)``). For a convolution this is the norm of the reshaped kernel matrix, as the
  papers use it, **not** the operator norm of the convolution itself (which also depends on the input size);
* ``num_params`` — the number of scalars in ``model.parameters()`` (weights, biases, batch-norm affine terms);
* ``sum_spectral_distance`` — ``sum_l ||W_l - W_l^0||_2`` to the initial weights;
* ``weight_correlation`` — Jin et al.'s average weight correlation ``(1/L) sum_l rho(W_l)``. For a fully
  connected layer ``rho`` is the mean ``|cos|`` between the weight vectors (rows) of distinct neurons,
  ``1/(n(n-1)) sum_{i != j} |<w_i, w_j>| / (||w_i|| ||w_j||)``. For a convolution, the paper compares *filter
  matrices*: for each input channel ``c`` the kh×kw slices ``W[i, c]`` of the ``n`` output filters give a
  correlation as above, and ``rho`` is their mean over the input channels (the authors' code does the same).
  Layers with one neuron, and convolutions with 1×1 kernels (whose slices are scalars, so ``|cos| = 1`` always;
  the authors' code skips them too), are left out;
* ``pac_bayes`` — the PAC-Bayes KL term ``||theta - theta_0||² / (2 sigma²)`` over every parameter, with
  ``sigma`` the largest standard deviation of isotropic Gaussian weight noise under which the training accuracy
  drops by at most ``sigma_threshold`` (default 0.1), found by bisection as in Jiang et al. (:func:`find_sigma`).
  This is the KL divergence between the posterior ``N(theta, sigma² I)`` and the prior ``N(theta_0, sigma² I)``;
  Jiang et al.'s "pacbayes.init" measure is the bound-shaped ``||theta - theta_0||² / (4 sigma²) + log(m / sigma)
  + 10`` built from the same two quantities;
* ``correlation_term`` and ``pbc`` — Jin et al.'s "PAC-Bayes & correlation" measure. Their posterior is a
  Gaussian whose neurons are equicorrelated with the layer's weight correlation: for each of the ``fan_in`` input
  coordinates of layer ``l``, the ``n_l`` weights into the neurons have the correlation matrix
  ``C_l = (1 - rho_l) I + rho_l 11ᵀ``, so ``det C_l = (1 - rho_l)^(n_l - 1) (1 + (n_l - 1) rho_l)``. Against the
  prior ``N(theta_0, sigma² I)`` the KL divergence is the PAC-Bayes term plus
  ``correlation_term = 1/2 sum_l fan_in_l · [-(n_l - 1) log(1 - rho_l) - log(1 + (n_l - 1) rho_l)]``, which is
  0 for uncorrelated neurons and grows with ``rho``; ``pbc = pac_bayes + correlation_term``.

Deviations from the authors' notebook, on purpose: (1) their weight correlation averages ``|cos|`` over *all* pairs
including ``i = j`` (always 1) and, for dense layers, uses only the first 9 input coordinates; here the paper's
definition (distinct pairs, whole weight vectors) is used, computed by the training penalty's
:meth:`~bastion.defenses.regularizers.WeightCorrelation.module_correlation` (one definition for both). (2) They
average per input channel as if each were a layer; here each conv layer counts once (the paper's ``1/L`` average). (3)
Their PAC-Bayes term uses ``sigma = 1`` and their correlation term is the per-layer *mean* of ``-log det C_l`` (no
factor 1/2) with ``in_channels`` instead of ``in·kh·kw`` columns for convolutions; here both are the exact KL
divergence above with Jiang et al.'s ``sigma``, so ``pbc`` is the KL divergence of one posterior against one prior
(the notebook's ``gw`` term, ``-log det C_l`` per layer, is where the form of the correlation term is read from). (4)
Their spectral norm is the upper bound ``sqrt(max row sum of |W Wᵀ|)``; here it is exact.

:func:`generalisation_gap` measures what the measures should predict (train − test accuracy and test − train
loss), and :func:`kendall_tau` how well a measure ranks a set of networks by it (Jiang et al.'s criterion).
"""

from __future__ import annotations

import copy
import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call
from tqdm.auto import tqdm

from bastion.attacks.base import positive_float, positive_int
from bastion.data import Dataset, as_dataset
from bastion.defenses.regularizers import WeightCorrelation, weight_matrices
from bastion.errors import BastionWarning, InputError
from bastion.models.checks import check_logits, eval_mode, model_device

__all__ = [
    "GeneralisationGap",
    "Measures",
    "SigmaSearch",
    "find_sigma",
    "generalisation_gap",
    "kendall_tau",
    "layer_correlations",
    "measure",
    "weight_correlation",
]

# Doublings of the upper end of the sigma bracket allowed when even sigma_max barely perturbs the accuracy.
_MAX_GROWTH = 12


# ------------------------------------------------------------------------------------------------- validation
def _check_model(model: object) -> list[tuple[nn.Module, Tensor]]:
    if not isinstance(model, nn.Module):
        raise InputError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    mats = weight_matrices(model)
    if not mats:
        raise InputError(
            f"the model ({type(model).__name__}) has no Linear or Conv layer: generalisation measures are "
            "computed on the weights of those layers"
        )
    return mats


def _check_data(data: object, what: str) -> Dataset:
    try:
        return as_dataset(data)  # type: ignore[arg-type]
    except InputError as exc:
        raise InputError(f"{what}: {exc}") from None


def _check_seed(seed: object) -> int:
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise InputError(f"seed must be an integer, got {seed!r}")
    return seed


def _init_parameters(model: nn.Module, init: nn.Module | Mapping[str, Any]) -> dict[str, Tensor]:
    """The initial value of every parameter of ``model``, by name, checked against the architecture."""
    if isinstance(init, nn.Module):
        state: Mapping[str, Any] = init.state_dict()
    elif isinstance(init, Mapping):
        state = init
    else:
        raise InputError(f"init must be a model of the same architecture or its state dict, got {type(init).__name__}")
    own = model.state_dict()
    extra = [k for k in state if k not in own]
    if extra:
        raise InputError(
            f"init is not the same architecture as the model: it has {len(extra)} entries the model lacks "
            f"(first: {extra[0]!r}); give the initial weights of this very model"
        )
    out: dict[str, Tensor] = {}
    for name, p in model.named_parameters():
        if name not in state:
            raise InputError(f"init is not the same architecture as the model: it has no parameter {name!r}")
        value = state[name]
        if not isinstance(value, Tensor):
            raise InputError(f"init[{name!r}] must be a tensor, got {type(value).__name__}")
        if tuple(value.shape) != tuple(p.shape):
            raise InputError(
                f"init is not the same architecture as the model: parameter {name!r} has shape "
                f"{tuple(value.shape)} in init but {tuple(p.shape)} in the model"
            )
        if not torch.isfinite(value).all():
            raise InputError(f"init[{name!r}] holds NaN or infinite values")
        out[name] = value.detach().to(device=p.device, dtype=p.dtype)
    return out


# ------------------------------------------------------------------------------------------------- correlation
def _correlations(mats: Sequence[tuple[nn.Module, Tensor]]) -> list[tuple[int, int, float]]:
    """``(neurons, fan_in, rho)`` of every layer where the correlation is defined."""
    out = []
    with torch.no_grad():
        for layer, w in mats:
            rho = WeightCorrelation.module_correlation(layer)
            if rho is not None:
                out.append((int(w.shape[0]), int(w.shape[1]), float(rho)))
    return out


def layer_correlations(model: nn.Module) -> list[float]:
    """Jin et al.'s weight correlation ``rho(W_l)`` of each layer where it is defined (see the module docstring).

    Args:
        model: any module with Linear/Conv layers.

    Returns:
        One value in [0, 1] per Linear/Conv layer with at least two neurons (1×1 convolutions left out), in the
        order of ``model.modules()``.
    """
    return [rho for _, _, rho in _correlations(_check_model(model))]


def weight_correlation(model: nn.Module) -> float:
    """Jin et al.'s average weight correlation ``(1/L) sum_l rho(W_l)`` (NeurIPS 2020): 0 orthogonal, 1 parallel.

    Args:
        model: any module with Linear/Conv layers.

    Raises:
        InputError: no Linear/Conv layer, or none with at least two neurons.
    """
    rhos = layer_correlations(model)
    if not rhos:
        raise InputError("weight correlation needs a Linear or Conv layer with at least two neurons (outputs)")
    return sum(rhos) / len(rhos)


def _correlation_term(corr: Sequence[tuple[int, int, float]]) -> float:
    """``-1/2 log det`` of the equicorrelated posterior covariance (see the module docstring)."""
    total = 0.0
    for n, fan_in, rho in corr:
        if rho >= 1.0:
            return math.inf
        total += 0.5 * fan_in * (-(n - 1) * math.log1p(-rho) - math.log1p((n - 1) * rho))
    return total


# ------------------------------------------------------------------------------------------------- sigma search
@dataclass(frozen=True)
class SigmaSearch:
    """What :func:`find_sigma` found.

    Attributes:
        sigma: the standard deviation of the weight noise.
        train_accuracy: accuracy of the unperturbed model on the data.
        perturbed_accuracy: mean accuracy of the ``mc_samples`` perturbed models at ``sigma``.
        evaluations: number of noise levels tried.
    """

    sigma: float
    train_accuracy: float
    perturbed_accuracy: float
    evaluations: int


class _Perturber:
    """Accuracy of ``model`` under Gaussian weight noise, with common random numbers across noise levels.

    Noise draw ``j`` is ``sigma · z_j`` with ``z_j ~ N(0, I)`` regenerated from the same seed at every ``sigma``,
    so the perturbed accuracy is a deterministic function of ``sigma`` and bisection compares like with like.
    The model is never modified: the noisy weights go through ``torch.func.functional_call``.
    """

    def __init__(self, model: nn.Module, data: Dataset, *, mc_samples: int, seed: int, batch_size: int) -> None:
        self.model = model
        self.data = data
        self.mc_samples = mc_samples
        self.seed = seed
        self.batch_size = batch_size
        self.device = model_device(model)
        self.params = {n: p.detach() for n, p in model.named_parameters()}
        self.buffers = {n: b for n, b in model.named_buffers()}

    def _accuracy(self, params: Mapping[str, Tensor]) -> Tensor:
        correct = torch.zeros((), dtype=torch.int64, device=self.device)
        for _, xb, yb in self.data.batches(self.batch_size):
            out = functional_call(self.model, {**params, **self.buffers}, (xb.to(self.device),))
            correct += (out.argmax(dim=1) == yb.to(self.device)).sum()
        return correct.double() / len(self.data)

    def clean(self) -> float:
        with torch.no_grad(), eval_mode(self.model):
            return float(self._accuracy(self.params))

    def __call__(self, sigma: float) -> float:
        total = torch.zeros((), dtype=torch.float64, device=self.device)
        with torch.no_grad(), eval_mode(self.model):
            for j in range(self.mc_samples):
                gen = torch.Generator(device=self.device).manual_seed((self.seed * 1_000_003 + j) % 2**63)
                noisy = {
                    n: p + sigma * torch.randn(p.shape, generator=gen, device=p.device, dtype=p.dtype)
                    for n, p in self.params.items()
                }
                total += self._accuracy(noisy)
        return float(total) / self.mc_samples


def find_sigma(
    model: nn.Module,
    data: Dataset | tuple[Tensor, Tensor],
    *,
    threshold: float = 0.1,
    mc_samples: int = 10,
    search_depth: int = 15,
    sigma_max: float = 2.0,
    tolerance: float = 1e-2,
    batch_size: int = 1024,
    seed: int = 0,
    progress: bool = False,
) -> SigmaSearch:
    """The largest ``sigma`` such that Gaussian weight noise ``N(0, sigma² I)`` costs at most ``threshold`` accuracy.

    Jiang et al. (ICLR 2020), the sigma search of their PAC-Bayes measures, with the settings of the code released
    for those measures (as adapted by Dziugaite, Drouin et al., "In Search of Robust Measures of Generalization",
    NeurIPS 2020): bisection on ``[0, sigma_max = 2]`` for ``search_depth = 15`` steps, the accuracy under noise
    averaged over ``mc_samples = 10`` draws, stopping once the accuracy drop is within ``tolerance = 0.01`` of
    ``threshold = 0.1``. Every parameter is perturbed (weights, biases, batch-norm affine terms), with the model in
    eval mode.

    Deviations: the stopping rule is one-sided (the returned ``sigma`` always has a measured drop ``<=
    threshold``, so it is the largest such ``sigma`` found, as the definition asks, where that code accepts a drop
    within ``±tolerance``); the same noise directions are reused at every ``sigma`` (common random numbers, which
    make the drop a deterministic, in practice monotone, function of ``sigma``); and when the drop at
    ``sigma_max`` is still below the threshold the bracket is doubled (at most 12 times, then a warning) instead of
    returning ``sigma_max``. That code passes ``sigma²`` as the standard deviation of the noise; here the standard
    deviation is ``sigma``, as in Jiang et al.'s definition ``u ~ N(0, sigma² I)``.

    Args:
        model: the trained model.
        data: the training data (the drop is measured on it).
        threshold: allowed drop of the training accuracy, in (0, 1).
        mc_samples: noise draws per ``sigma``.
        search_depth: bisection steps.
        sigma_max: upper end of the initial bracket.
        tolerance: stop once ``threshold - tolerance <= drop <= threshold``.
        batch_size: samples per forward pass.
        seed: seeds the noise (nothing global is touched).
        progress: show a tqdm bar over the bisection steps.

    Returns:
        A :class:`SigmaSearch`. ``sigma`` is 0 when even the smallest noise tried costs more than ``threshold``.
    """
    _check_model(model)
    data = _check_data(data, "data")
    if len(data) == 0:
        raise InputError("data is empty: the sigma search measures the training accuracy under weight noise")
    threshold = positive_float("sigma_threshold", threshold)
    if threshold >= 1:
        raise InputError(f"sigma_threshold is an accuracy drop and must lie in (0, 1), got {threshold!r}")
    mc_samples = positive_int("mc_samples", mc_samples)
    search_depth = positive_int("search_depth", search_depth)
    sigma_max = positive_float("sigma_max", sigma_max)
    tolerance = positive_float("tolerance", tolerance, allow_zero=True)
    batch_size = positive_int("batch_size", batch_size)
    seed = _check_seed(seed)
    _check_outputs(model, data)

    noisy_accuracy = _Perturber(model, data, mc_samples=mc_samples, seed=seed, batch_size=batch_size)
    acc0 = noisy_accuracy.clean()
    lo, hi = 0.0, sigma_max
    acc_hi = noisy_accuracy(hi)
    evaluations = 1
    acc_lo = acc0
    growth = 0
    while acc0 - acc_hi <= threshold and growth < _MAX_GROWTH:
        lo, acc_lo = hi, acc_hi
        hi *= 2.0
        acc_hi = noisy_accuracy(hi)
        evaluations += 1
        growth += 1
    if acc0 - acc_hi <= threshold:
        warnings.warn(
            f"find_sigma: weight noise of standard deviation {hi:g} costs only {acc0 - acc_hi:.3f} training "
            f"accuracy (threshold {threshold}); returning sigma = {hi:g}. The accuracy may already be near chance.",
            BastionWarning,
            stacklevel=2,
        )
        return SigmaSearch(hi, acc0, acc_hi, evaluations)
    for _ in tqdm(range(search_depth), desc="sigma search", unit="step", disable=not progress, leave=False):
        mid = 0.5 * (lo + hi)
        acc_mid = noisy_accuracy(mid)
        evaluations += 1
        if acc0 - acc_mid > threshold:
            hi = mid
        else:
            lo, acc_lo = mid, acc_mid
            if threshold - (acc0 - acc_mid) <= tolerance:
                break
    return SigmaSearch(lo, acc0, acc_lo, evaluations)


def _check_outputs(model: nn.Module, data: Dataset) -> None:
    device = model_device(model)
    with torch.no_grad(), eval_mode(model):
        x = data.x[: min(2, len(data))].to(device)
        k = check_logits(model(x), x.shape[0])
    if k < data.num_classes:
        raise InputError(f"the model returns {k} logits but the data has {data.num_classes} classes")


# ------------------------------------------------------------------------------------------------- measures
@dataclass(frozen=True)
class Measures:
    """Generalisation measures of one network (see the module docstring for each definition).

    Attributes:
        num_layers: Linear/Conv layers measured.
        num_params: scalars in ``model.parameters()``.
        prod_frobenius: ``prod_l ||W_l||_F``.
        prod_spectral: ``prod_l ||W_l||_2`` (exact, reshaped kernel matrices for convolutions).
        weight_correlation: Jin et al.'s average weight correlation.
        layer_correlations: ``rho(W_l)`` of each layer where it is defined.
        correlation_term: ``-1/2 log det`` of the equicorrelated posterior covariance (no init or data needed).
        sum_spectral_distance: ``sum_l ||W_l - W_l^0||_2`` (None without ``init``).
        distance_to_init: ``||theta - theta_0||_2`` over every parameter (None without ``init``).
        sigma: the noise level of :func:`find_sigma` (None without ``data``).
        train_accuracy: accuracy on ``data`` (None without ``data``).
        pac_bayes: ``||theta - theta_0||² / (2 sigma²)`` (None without ``init`` or ``data``).
        pbc: ``pac_bayes + correlation_term`` (None without ``init`` or ``data``).
        sigma_threshold: the accuracy drop that defined ``sigma``.
    """

    num_layers: int
    num_params: int
    prod_frobenius: float
    prod_spectral: float
    weight_correlation: float
    layer_correlations: list[float]
    correlation_term: float
    sum_spectral_distance: float | None = None
    distance_to_init: float | None = None
    sigma: float | None = None
    train_accuracy: float | None = None
    pac_bayes: float | None = None
    pbc: float | None = None
    sigma_threshold: float = 0.1

    def to_dict(self) -> dict[str, Any]:
        """Every field, JSON-able (lists and floats; ``inf`` stays a float)."""
        return asdict(self)

    def table(self) -> str:
        """A two-column text table of the scalar measures."""
        rows = [(k, v) for k, v in self.to_dict().items() if k != "layer_correlations"]
        width = max(len(k) for k, _ in rows)
        lines = []
        for k, v in rows:
            text = "n/a" if v is None else (f"{v:.6g}" if isinstance(v, float) else str(v))
            lines.append(f"{k:<{width}}  {text}")
        layers = ", ".join(f"{r:.4f}" for r in self.layer_correlations)
        lines.append(f"{'layer_correlations':<{width}}  [{layers}]")
        return "\n".join(lines)


def measure(
    model: nn.Module,
    *,
    init: nn.Module | Mapping[str, Any] | None = None,
    data: Dataset | tuple[Tensor, Tensor] | None = None,
    sigma_threshold: float = 0.1,
    mc_samples: int = 10,
    search_depth: int = 15,
    batch_size: int = 1024,
    seed: int = 0,
    progress: bool = True,
) -> Measures:
    """Every generalisation measure of ``model`` (Jin et al., NeurIPS 2020; Jiang et al., ICLR 2020).

    Args:
        model: the trained model (any module with Linear/Conv layers); it is not modified.
        init: its initial weights: a model of the same architecture, or a state dict. Needed for the distances
            to initialisation, ``pac_bayes`` and ``pbc``.
        data: the training data. Needed for ``sigma`` (and so ``pac_bayes`` and ``pbc``).
        sigma_threshold: allowed training-accuracy drop that defines ``sigma`` (Jiang et al.: 0.1).
        mc_samples: noise draws per noise level in the sigma search (10, as in :func:`find_sigma`).
        search_depth: bisection steps of the sigma search (15).
        batch_size: samples per forward pass.
        seed: seeds the weight noise of the sigma search.
        progress: show a progress bar during the sigma search.

    Returns:
        The :class:`Measures`.

    Raises:
        InputError: not a module, no Linear/Conv layer (or none with two neurons), ``init`` of another
            architecture, bad data or hyperparameters.
    """
    mats = _check_model(model)
    sigma_threshold = positive_float("sigma_threshold", sigma_threshold)
    if sigma_threshold >= 1:
        raise InputError(f"sigma_threshold is an accuracy drop and must lie in (0, 1), got {sigma_threshold!r}")
    seed = _check_seed(seed)
    theta0 = _init_parameters(model, init) if init is not None else None
    dataset = _check_data(data, "data") if data is not None else None

    corr = _correlations(mats)
    if not corr:
        raise InputError("weight correlation needs a Linear or Conv layer with at least two neurons (outputs)")
    with torch.no_grad():
        ws = [w.detach().double() for _, w in mats]
        log_fro = sum(float(torch.linalg.matrix_norm(w, ord="fro").log()) for w in ws)
        log_spec = sum(float(torch.linalg.matrix_norm(w, ord=2).log()) for w in ws)
    values: dict[str, Any] = {
        "num_layers": len(mats),
        "num_params": sum(p.numel() for p in model.parameters()),
        "prod_frobenius": math.exp(log_fro),
        "prod_spectral": math.exp(log_spec),
        "weight_correlation": sum(r for _, _, r in corr) / len(corr),
        "layer_correlations": [r for _, _, r in corr],
        "correlation_term": _correlation_term(corr),
        "sigma_threshold": sigma_threshold,
    }
    sq_dist = None
    if theta0 is not None:
        with torch.no_grad():
            start = copy.deepcopy(model)
            for name, p in start.named_parameters():
                p.copy_(theta0[name])
            ws0 = [w.detach().double() for _, w in weight_matrices(start)]
            values["sum_spectral_distance"] = sum(
                float(torch.linalg.matrix_norm(w - w0, ord=2)) for w, w0 in zip(ws, ws0)
            )
            sq_dist = sum(
                float((p.detach().double() - theta0[n].double()).pow(2).sum()) for n, p in model.named_parameters()
            )
            values["distance_to_init"] = math.sqrt(sq_dist)
    if dataset is not None:
        found = find_sigma(
            model, dataset, threshold=sigma_threshold, mc_samples=mc_samples, search_depth=search_depth,
            batch_size=batch_size, seed=seed, progress=progress,
        )  # fmt: skip
        values["sigma"] = found.sigma
        values["train_accuracy"] = found.train_accuracy
        if sq_dist is not None:
            if sq_dist == 0.0:
                pb = 0.0
            elif found.sigma == 0.0:
                pb = math.inf
            else:
                pb = sq_dist / (2.0 * found.sigma**2)
            values["pac_bayes"] = pb
            values["pbc"] = pb + values["correlation_term"]
    return Measures(**values)


# ------------------------------------------------------------------------------------------------- gap, ranking
@dataclass(frozen=True)
class GeneralisationGap:
    """Train and test accuracy and cross-entropy of one model, and their gaps.

    Attributes:
        train_accuracy: accuracy on the training data.
        test_accuracy: accuracy on the test data.
        train_loss: mean cross-entropy on the training data.
        test_loss: mean cross-entropy on the test data.
        accuracy_gap: ``train_accuracy - test_accuracy``.
        loss_gap: ``test_loss - train_loss`` (what Jin et al.'s notebook ranks).
    """

    train_accuracy: float
    test_accuracy: float
    train_loss: float
    test_loss: float
    accuracy_gap: float
    loss_gap: float

    def to_dict(self) -> dict[str, float]:
        return asdict(self)


def _accuracy_and_loss(model: nn.Module, data: Dataset, batch_size: int) -> tuple[float, float]:
    device = model_device(model)
    correct = torch.zeros((), dtype=torch.int64, device=device)
    loss = torch.zeros((), dtype=torch.float64, device=device)
    with torch.no_grad(), eval_mode(model):
        for _, xb, yb in data.batches(batch_size):
            out = model(xb.to(device))
            yb = yb.to(device)
            correct += (out.argmax(dim=1) == yb).sum()
            loss += F.cross_entropy(out.double(), yb, reduction="sum")
    n = len(data)
    return float(correct) / n, float(loss) / n


def generalisation_gap(
    model: nn.Module,
    train: Dataset | tuple[Tensor, Tensor],
    test: Dataset | tuple[Tensor, Tensor],
    *,
    batch_size: int = 1024,
) -> GeneralisationGap:
    """Generalisation gap of ``model``: train − test accuracy, and test − train cross-entropy.

    Args:
        model: the classifier (put in eval mode for the computation, then restored).
        train: the training data.
        test: the held-out data.
        batch_size: samples per forward pass.

    Raises:
        InputError: not a module, empty data, or a model with fewer logits than the data has classes.
    """
    if not isinstance(model, nn.Module):
        raise InputError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    batch_size = positive_int("batch_size", batch_size)
    parts = []
    for what, d in (("train", train), ("test", test)):
        ds = _check_data(d, what)
        if len(ds) == 0:
            raise InputError(f"{what} data is empty")
        _check_outputs(model, ds)
        parts.append(_accuracy_and_loss(model, ds, batch_size))
    (tr_acc, tr_loss), (te_acc, te_loss) = parts
    return GeneralisationGap(tr_acc, te_acc, tr_loss, te_loss, tr_acc - te_acc, te_loss - tr_loss)


def kendall_tau(measures: Sequence[float], gaps: Sequence[float]) -> tuple[float, float]:
    """Kendall's rank correlation between a measure and the generalisation gaps of the same networks.

    Jiang et al.'s (and Jin et al.'s) criterion for a generalisation measure: +1 when the measure orders the
    networks exactly as their gaps, -1 when it reverses the order. SciPy's tau-b (ties handled; Jin et al.'s
    notebook counts tied pairs as discordant instead).

    Args:
        measures: the measure of each network (``inf`` allowed, ``NaN`` not).
        gaps: the gap of each network, same order.

    Returns:
        ``(tau, p_value)`` (the p-value of the test of independence); both NaN when a sequence is constant.
    """
    from scipy.stats import kendalltau

    vals = []
    for name, seq in (("measures", measures), ("gaps", gaps)):
        if isinstance(seq, (str, bytes)) or not hasattr(seq, "__iter__"):
            raise InputError(f"{name} must be a sequence of numbers, got {type(seq).__name__}")
        try:
            arr = [float(v) for v in seq]
        except (TypeError, ValueError):
            raise InputError(f"{name} must hold numbers only") from None
        if any(math.isnan(v) for v in arr):
            raise InputError(f"{name} holds NaN; drop the networks whose value is undefined")
        vals.append(arr)
    m, g = vals
    if len(m) != len(g):
        raise InputError(f"measures and gaps must have the same length, got {len(m)} and {len(g)}")
    if len(m) < 2:
        raise InputError(f"Kendall's tau needs at least two networks, got {len(m)}")
    with warnings.catch_warnings():
        # a constant input makes SciPy warn and return NaN, which is the documented answer
        warnings.simplefilter("ignore")
        res = kendalltau(m, g)
    return float(res[0]), float(res[1])
