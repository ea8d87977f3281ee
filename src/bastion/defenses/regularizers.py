"""Robust regularisers, composable with any training objective.

A regulariser is a callable ``reg(model) -> penalty`` (a scalar tensor), or ``reg(model, x) -> penalty`` when it
needs the batch (then it declares ``uses_data = True``). :class:`Regularized` adds weighted regularisers to any
objective: ``Regularized(PGDAT(...), [(ParsevalPenalty(), 1.0), (WeightCorrelation(), 0.1)])``.

* **Spectral normalisation** (Miyato, Kataoka, Koyama & Yoshida, "Spectral Normalization for Generative
  Adversarial Networks", ICLR 2018) is a model transform rather than a penalty: :func:`spectral_normalize`
  re-parametrises every Linear/Conv weight as ``W / sigma(W)`` through
  ``torch.nn.utils.parametrizations.spectral_norm`` (one power iteration per training forward pass).
* **Parseval tight-frame regularisation** (Cisse, Bojanowski, Grave, Dauphin & Usunier, "Parseval Networks:
  Improving Robustness to Adversarial Examples", ICML 2017): ``beta/2 · ||W Wᵀ - I||_F²`` per layer
  (:class:`ParsevalPenalty`), and the paper's retraction step ``W <- (1 + beta) W - beta W Wᵀ W`` applied after each
  optimiser step (:func:`parseval_retraction`).
* **Global Lipschitz bound** (as in Tsuzuku, Sato & Sugiyama, "Lipschitz-Margin Training", NeurIPS 2018): the
  product of per-layer l2 operator-norm bounds, :func:`lipschitz_upper_bound`, an upper bound on the network's
  l2 Lipschitz constant; :class:`LipschitzPenalty` penalises its logarithm, and :class:`LipschitzMargin` is the
  paper's training objective (cross-entropy with the non-true logits raised by ``sqrt(2) · L · eps``).
* **Weight correlation** (Jin, Yi, Zhang, Zhang, Schewe & Huang, "How does Weight Correlation Affect the Generalisation
  Ability of Deep Neural Networks", NeurIPS 2020): the mean absolute cosine similarity between the weight vectors
  of the neurons of each layer (conv filters flattened), averaged over layers (:class:`WeightCorrelation`).
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils import parametrize
from torch.nn.utils.parametrizations import spectral_norm

from bastion.attacks.base import positive_float, positive_int
from bastion.errors import InputError, ModelError
from bastion.models.normalize import Normalize

__all__ = [
    "REGULARIZERS",
    "LipschitzMargin",
    "LipschitzPenalty",
    "ParsevalPenalty",
    "Regularized",
    "WeightCorrelation",
    "lipschitz_upper_bound",
    "parseval_retraction",
    "regularize",
    "remove_spectral_normalization",
    "spectral_normalize",
    "weight_matrices",
]

_WEIGHTED = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


def _weight(module: nn.Module) -> Tensor:
    # a spectrally normalised layer exposes the normalised weight as `weight`; the raw one stays internal
    w = module.weight
    assert isinstance(w, Tensor)
    return w


def weight_matrices(model: nn.Module) -> list[tuple[nn.Module, Tensor]]:
    """``(layer, W)`` for every Linear/Conv layer, ``W`` of shape (out, fan_in) (conv filters flattened)."""
    if not isinstance(model, nn.Module):
        raise InputError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    return [(m, _weight(m).flatten(1)) for m in model.modules() if isinstance(m, _WEIGHTED)]


# ---------------------------------------------------------------------------------------------- spectral norm
def spectral_normalize(model: nn.Module, *, n_power_iterations: int = 1, eps: float = 1e-12) -> nn.Module:
    """Spectral normalisation (Miyato et al., ICLR 2018) of every Linear/Conv layer of ``model``, in place.

    Each weight is re-parametrised as ``W / sigma(W)`` with ``sigma`` estimated by power iteration on the weight
    reshaped to (out, fan_in) (for convolutions this is the paper's normalisation of the reshaped kernel, not the
    exact operator norm of the convolution). The estimate is refined by ``n_power_iterations`` steps at every
    forward pass in training mode and frozen in eval mode (PyTorch's ``spectral_norm`` parametrisation).

    Args:
        model: the model (modified in place and returned). Layers already normalised are left alone.
        n_power_iterations: power-iteration steps per training forward pass (paper: 1).
        eps: numerical floor of the norm computations.

    Returns:
        ``model``.
    """
    n_power_iterations = positive_int("n_power_iterations", n_power_iterations)
    layers = [m for m in model.modules() if isinstance(m, _WEIGHTED)] if isinstance(model, nn.Module) else None
    if layers is None:
        raise InputError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not layers:
        raise ModelError("spectral_normalize: the model has no Linear or Conv layer to normalise")
    for m in layers:
        if parametrize.is_parametrized(m, "weight"):
            continue
        spectral_norm(m, n_power_iterations=n_power_iterations, eps=eps)
    return model


def remove_spectral_normalization(model: nn.Module) -> nn.Module:
    """Bake every spectrally normalised weight into a plain parameter (``W / sigma(W)`` at its current value).

    The model then has the layout of an ordinary model of its architecture, so it saves and loads like one, and
    computes exactly what it computed before (in eval mode). ``sigma`` is the power iteration's running estimate,
    a lower bound of the true spectral norm, so a baked layer's norm can be slightly above 1.
    """
    for m in model.modules():
        if isinstance(m, _WEIGHTED) and parametrize.is_parametrized(m, "weight"):
            parametrize.remove_parametrizations(m, "weight", leave_parametrized=True)
    return model


# ---------------------------------------------------------------------------------------------- Parseval
def _gram_residual(w: Tensor) -> Tensor:
    """``W Wᵀ - I`` on the smaller side (rows orthonormal when out <= fan_in, else columns)."""
    gram = w @ w.T if w.shape[0] <= w.shape[1] else w.T @ w
    return gram - torch.eye(gram.shape[0], dtype=w.dtype, device=w.device)


class ParsevalPenalty:
    """Parseval tight-frame penalty (Cisse et al., ICML 2017): ``sum_layers beta/2 · ||W Wᵀ - I||_F²``.

    ``W`` is each Linear/Conv weight reshaped to (out, fan_in); when a layer has more outputs than inputs (no
    tight frame of rows exists) the columns are orthonormalised instead (``Wᵀ W``).

    Args:
        beta: penalty strength (the paper's retraction uses 0.0003; as a penalty weight it can be larger).
    """

    uses_data = False

    def __init__(self, *, beta: float = 0.0003) -> None:
        self.beta = positive_float("beta", beta)

    def __call__(self, model: nn.Module) -> Tensor:
        mats = weight_matrices(model)
        if not mats:
            raise ModelError("ParsevalPenalty: the model has no Linear or Conv layer")
        return sum((self.beta / 2 * _gram_residual(w).pow(2).sum() for _, w in mats), start=mats[0][1].new_zeros(()))

    def __repr__(self) -> str:
        return f"ParsevalPenalty(beta={self.beta})"


@torch.no_grad()
def parseval_retraction(model: nn.Module, *, beta: float = 0.0003, layers: Iterable[nn.Module] | None = None) -> None:
    """Cisse et al.'s retraction towards the Parseval (tight-frame) manifold, in place, after an optimiser step.

    ``W <- (1 + beta) W - beta W Wᵀ W`` for each Linear/Conv weight reshaped to (out, fan_in): one gradient step on
    ``||Wᵀ W - I||²/4`` that keeps ``W`` close to the manifold of tight frames (paper: beta = 0.0003, applied after
    every update). Spectrally normalised layers are skipped (their weight is derived, not a parameter).

    Args:
        model: the model.
        beta: retraction step.
        layers: restrict the retraction to these layers (default: every Linear/Conv layer).
    """
    beta = positive_float("beta", beta)
    chosen = list(layers) if layers is not None else [m for m in model.modules() if isinstance(m, _WEIGHTED)]
    for m in chosen:
        if not isinstance(m, _WEIGHTED) or parametrize.is_parametrized(m, "weight"):
            continue
        w = m.weight.flatten(1)
        if w.shape[0] <= w.shape[1]:
            updated = (1 + beta) * w - beta * (w @ w.T) @ w
        else:
            updated = (1 + beta) * w - beta * w @ (w.T @ w)
        m.weight.copy_(updated.reshape(m.weight.shape))


# ---------------------------------------------------------------------------------------------- weight correlation
class WeightCorrelation:
    """Weight correlation (Jin et al., NeurIPS 2020): mean over layers of the mean ``|cos|`` between neurons' weights.

    For a dense layer with weight vectors ``w_1..w_n`` (the rows of its (out, in) weight), the correlation is
    ``rho = 1/(n(n-1)) sum_{i != j} |<w_i, w_j>| / (||w_i|| ||w_j||)``: 0 for orthogonal neurons, 1 for parallel
    ones. For a conv layer it is computed per input channel, between the n filters' (kh, kw) slices of that channel,
    and averaged over the channels (the authors' definition); 1×1 convolutions and layers with a single neuron are
    skipped. Penalising it decorrelates the neurons, which the paper links to better generalisation. The
    generalisation measure :func:`bastion.reliability.generalisation.weight_correlation` uses the same
    :meth:`module_correlation`.

    Args:
        include_last: also count the final (classification) layer.
    """

    uses_data = False

    def __init__(self, *, include_last: bool = True) -> None:
        self.include_last = bool(include_last)

    @staticmethod
    def layer_correlation(w: Tensor) -> Tensor:
        """Mean absolute cosine similarity between distinct rows of ``w`` (..., n, d), n >= 2, per leading index."""
        unit = F.normalize(w, dim=-1, eps=1e-12)
        cos = (unit @ unit.mT).abs()
        n = cos.shape[-1]
        off = cos.sum((-2, -1)) - cos.diagonal(dim1=-2, dim2=-1).sum(-1)
        return off / (n * (n - 1))

    @staticmethod
    def module_correlation(layer: nn.Module) -> Tensor | None:
        """``rho`` of one Linear/Conv layer (per input channel for conv), or None where it is undefined."""
        weight = _weight(layer)
        n = weight.shape[0]
        if n < 2:
            return None
        if weight.dim() == 2:
            return WeightCorrelation.layer_correlation(weight)
        kernel = weight.flatten(2)  # (n, C, kh*kw)
        if kernel.shape[-1] == 1:
            return None
        return WeightCorrelation.layer_correlation(kernel.transpose(0, 1)).mean()

    def __call__(self, model: nn.Module) -> Tensor:
        layers = [m for m, _ in weight_matrices(model)]
        if not self.include_last and layers:
            layers = layers[:-1]
        rhos = [r for r in (self.module_correlation(m) for m in layers) if r is not None]
        if not rhos:
            raise ModelError("WeightCorrelation: the model has no Linear or Conv layer with at least two neurons")
        return torch.stack(rhos).mean()

    def __repr__(self) -> str:
        return f"WeightCorrelation(include_last={self.include_last})"


# ---------------------------------------------------------------------------------------------- Lipschitz bound
def _overlap(kernel: Sequence[int], stride: Sequence[int], dilation: Sequence[int] | None = None) -> int:
    """Largest number of windows any one input coordinate falls in."""
    out = 1
    for i, (k, s) in enumerate(zip(kernel, stride)):
        d = 1 if dilation is None else dilation[i]
        span = d * (k - 1) + 1
        # windows of one tap position are `s` apart; a coordinate is hit by at most ceil(k / (s / gcd)) of them
        out *= min(k, math.ceil(span / s)) if d == 1 else k
    return out


def _tuple(v: int | Sequence[int], n: int) -> tuple[int, ...]:
    return tuple(v) if isinstance(v, Sequence) else (int(v),) * n


def _layer_bound(m: nn.Module) -> Tensor | float:
    """An upper bound on the l2 operator norm (Lipschitz constant) of one layer."""
    if isinstance(m, nn.Linear):
        return torch.linalg.matrix_norm(_weight(m), ord=2)
    if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        n = m.weight.dim() - 2
        # conv(x) = W_mat · patches(x) and ||patches(x)||² <= overlap · ||x||² (each input in <= overlap patches)
        k = _tuple(m.kernel_size, n)
        s = _tuple(m.stride, n)
        dil = _tuple(m.dilation, n)
        if m.groups != 1 or m.padding_mode != "zeros":
            # grouped kernels need a block-diagonal norm; non-zero padding repeats inputs (more overlap)
            raise ModelError(f"lipschitz_upper_bound: grouped or non-zero-padded convolutions are not supported ({m})")
        return torch.linalg.matrix_norm(_weight(m).flatten(1), ord=2) * math.sqrt(_overlap(k, s, dil))
    if isinstance(m, Normalize):
        return float((1.0 / m.std).max())
    if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)):
        if m.running_var is None:
            raise ModelError(f"lipschitz_upper_bound: batch norm without running statistics is not supported ({m})")
        scale = 1.0 / torch.sqrt(m.running_var + m.eps)
        if m.weight is not None:
            scale = scale * m.weight.abs()
        return scale.max()
    if isinstance(m, (nn.ReLU, nn.LeakyReLU, nn.ELU, nn.Tanh, nn.Identity, nn.Flatten, nn.Dropout, nn.Hardtanh)):
        if isinstance(m, nn.LeakyReLU) and abs(m.negative_slope) > 1:
            return abs(m.negative_slope)
        return 1.0
    if isinstance(m, nn.Sigmoid):
        return 0.25
    if isinstance(m, (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d)):
        n = {nn.MaxPool1d: 1, nn.MaxPool2d: 2, nn.MaxPool3d: 3}[type(m)]
        k = _tuple(m.kernel_size, n)
        s = _tuple(m.stride if m.stride is not None else m.kernel_size, n)
        dil = _tuple(m.dilation, n)
        return math.sqrt(_overlap(k, s, dil))
    if isinstance(m, (nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d)):
        n = {nn.AvgPool1d: 1, nn.AvgPool2d: 2, nn.AvgPool3d: 3}[type(m)]
        k = _tuple(m.kernel_size, n)
        s = _tuple(m.stride if m.stride is not None else m.kernel_size, n)
        if m.ceil_mode or (m.padding != 0 and not m.count_include_pad):
            # partial windows are averaged over fewer inputs: only |mean|² <= sum of squares holds
            return math.sqrt(_overlap(k, s))
        # each output is the mean of prod(k) inputs: |mean|² <= (sum of squares) / prod(k) (zero padding only helps)
        return math.sqrt(_overlap(k, s) / math.prod(k))
    if isinstance(m, (nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d)):
        return 1.0  # a mean over non-overlapping windows contracts
    if isinstance(m, nn.Sequential):
        return _sequential_bound(m)
    from bastion.models.zoo import BasicBlock

    if isinstance(m, BasicBlock):
        branch = _sequential_bound(nn.Sequential(m.conv1, m.bn1, m.relu1, m.conv2, m.bn2))
        return _as_tensor(branch) + _as_tensor(_layer_bound(m.shortcut))
    raise ModelError(
        f"lipschitz_upper_bound: no Lipschitz bound for layer {type(m).__name__}; supported: Linear, Conv, "
        "Normalize, BatchNorm (eval statistics), ReLU-like activations, pooling, Flatten, Sequential, BasicBlock"
    )


def _as_tensor(v: Tensor | float) -> Tensor:
    return v if isinstance(v, Tensor) else torch.tensor(float(v))


def _sequential_bound(seq: nn.Sequential) -> Tensor | float:
    total: Tensor | float = 1.0
    for m in seq:
        total = total * _layer_bound(m)
    return total


def lipschitz_upper_bound(model: nn.Module) -> Tensor:
    """An upper bound on the l2 Lipschitz constant of ``model`` (logits w.r.t. inputs), differentiable in the weights.

    The product over the layers of a sequential model of per-layer operator-norm bounds: exact spectral norms of
    Linear weights (singular values, not power iteration, so the bound is guaranteed), ``sqrt(overlap) · ||W||_2``
    for a convolution whose reshaped kernel is ``W`` and whose windows overlap at most ``overlap`` times,
    ``1/min std`` for :class:`~bastion.models.normalize.Normalize`, the largest ``|gamma| / sqrt(var + eps)`` for
    batch norm (running statistics, i.e. the eval-mode network), 1 for ReLU, Flatten and non-overlapping max pooling,
    and ``L(branch) + L(shortcut)`` for a residual :class:`~bastion.models.zoo.BasicBlock`.

    Args:
        model: an ``nn.Sequential`` of supported layers (every zoo model).

    Returns:
        The bound, a scalar tensor (gradients flow to the weights).

    Raises:
        ModelError: a layer has no known bound (named in the message).
    """
    if not isinstance(model, nn.Module):
        raise InputError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(model, nn.Sequential):
        return _as_tensor(_layer_bound(model))
    bound = _as_tensor(_sequential_bound(model))
    for p in model.parameters():
        return bound.to(p.device)
    return bound


class LipschitzPenalty:
    """Penalise the global Lipschitz bound: ``log lipschitz_upper_bound(model)`` (or the bound itself).

    The logarithm turns the product of layer norms into a sum, so every layer gets a gradient of comparable size
    whatever the depth.

    Args:
        log: penalise the logarithm of the bound (default) instead of the bound.
    """

    uses_data = False

    def __init__(self, *, log: bool = True) -> None:
        self.log = bool(log)

    def __call__(self, model: nn.Module) -> Tensor:
        bound = lipschitz_upper_bound(model)
        return bound.clamp_min(1e-12).log() if self.log else bound

    def __repr__(self) -> str:
        return f"LipschitzPenalty(log={self.log})"


class LipschitzMargin:
    """Lipschitz-margin training (Tsuzuku, Sato & Sugiyama, NeurIPS 2018), a training objective.

    With ``L`` the global l2 Lipschitz bound, a prediction is certified at l2 radius ``eps`` when its logit margin
    exceeds ``sqrt(2) · L · eps``. The objective is the cross-entropy of the logits with every non-true logit
    raised by that amount, which trains for certifiable margins:

        L = CE( f(x) + sqrt(2) · c · L · eps · (1 - onehot(y)), y ),   c = 1.

    Gradients flow through ``L`` (the paper back-propagates through its bound). The bound is
    :func:`lipschitz_upper_bound` (exact singular values for Linear layers rather than the paper's power-iteration
    estimate), so the margin is never underestimated.

    Args:
        eps: the l2 radius to train for.
        c: multiplier of the margin (1 in the paper's certificate).
    """

    def __init__(self, *, eps: float, c: float = 1.0) -> None:
        self.eps = positive_float("eps", eps, allow_zero=True)
        self.c = positive_float("c", c)

    def __call__(self, model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
        logits = model(x)
        y = y.to(logits.device)
        margin = math.sqrt(2.0) * self.c * self.eps * lipschitz_upper_bound(model).to(logits.dtype)
        raised = logits + margin * (1.0 - F.one_hot(y, logits.shape[1]).to(logits.dtype))
        return F.cross_entropy(raised, y)

    def __repr__(self) -> str:
        return f"LipschitzMargin(eps={self.eps}, c={self.c})"


# ---------------------------------------------------------------------------------------------- composition
Regularizer = Callable[..., Tensor]


def _uses_data(reg: Regularizer) -> bool:
    flag = getattr(reg, "uses_data", None)
    if flag is not None:
        return bool(flag)
    try:
        params = [
            p
            for p in inspect.signature(reg).parameters.values()
            if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) and p.default is p.empty
        ]
    except (TypeError, ValueError):
        return False
    return len(params) >= 2


class Regularized:
    """An objective plus weighted regularisers: ``objective(model, x, y) + sum_k weight_k · reg_k(model[, x])``.

    Every optional hook of the wrapped objective (``uses_unlabelled``, ``state_dict``/``load_state_dict``,
    ``epoch_start``, ``step_start``, ``extra_parameters``) is passed through, so wrapping never changes how the
    trainer treats it.

    Args:
        objective: the training objective (``objective(model, x, y) -> scalar``).
        regularizers: ``(reg, weight)`` pairs; ``reg(model)`` or, for regularisers that need the batch (attribute
            ``uses_data = True``, or a function of two required arguments), ``reg(model, x)``.
    """

    def __init__(
        self,
        objective: Callable[..., Tensor],
        regularizers: Sequence[tuple[Regularizer, float]],
        *,
        after_step: Sequence[Callable[[nn.Module], None]] = (),
    ) -> None:
        if not callable(objective):
            raise InputError(f"objective must be callable as objective(model, x, y), got {objective!r}")
        pairs: list[tuple[Regularizer, float, bool]] = []
        for item in regularizers:
            if not (isinstance(item, tuple) and len(item) == 2 and callable(item[0])):
                raise InputError(f"regularizers must be (callable, weight) pairs, got {item!r}")
            reg, weight = item
            pairs.append((reg, positive_float("regularizer weight", weight, allow_zero=True), _uses_data(reg)))
        if not all(callable(f) for f in after_step):
            raise InputError(f"after_step must be callables f(model), got {list(after_step)!r}")
        self.objective = objective
        self.regularizers = pairs
        self.after_step = list(after_step)
        #: the last batch's value of each regulariser (unweighted, detached: no host sync), for logging
        self.last: list[Tensor] = []

    @property
    def uses_unlabelled(self) -> bool:
        return bool(getattr(self.objective, "uses_unlabelled", False))

    def __call__(self, model: nn.Module, x: Tensor, y: Tensor, **kwargs: Any) -> Tensor:
        loss = self.objective(model, x, y, **kwargs)
        values = []
        for reg, weight, uses_data in self.regularizers:
            value = reg(model, x) if uses_data else reg(model)
            if not isinstance(value, Tensor) or value.numel() != 1:
                raise InputError(f"regulariser {reg!r} must return a scalar tensor, got {type(value).__name__}")
            values.append(value.detach())
            if weight:
                loss = loss + weight * value.to(loss.device)
        self.last = values
        return loss

    def state_dict(self) -> dict[str, Any]:
        fn = getattr(self.objective, "state_dict", None)
        return dict(fn()) if callable(fn) else {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        fn = getattr(self.objective, "load_state_dict", None)
        if callable(fn):
            fn(state)

    def epoch_start(self, epoch: int, epochs: int) -> None:
        fn = getattr(self.objective, "epoch_start", None)
        if callable(fn):
            fn(epoch, epochs)

    def step_start(self, step: int, total_steps: int) -> None:
        fn = getattr(self.objective, "step_start", None)
        if callable(fn):
            fn(step, total_steps)

    def step_end(self, model: nn.Module) -> None:
        """After each optimiser step: the weight updates of ``after_step`` (a Parseval retraction), then the
        wrapped objective's own ``step_end``."""
        for fn in self.after_step:
            fn(model)
        hook = getattr(self.objective, "step_end", None)
        if callable(hook):
            hook(model)

    def extra_parameters(self) -> list[nn.Parameter]:
        fn = getattr(self.objective, "extra_parameters", None)
        return list(fn()) if callable(fn) else []

    def __repr__(self) -> str:
        regs = ", ".join(f"({reg!r}, {weight})" for reg, weight, _ in self.regularizers)
        post = f", after_step={self.after_step!r}" if self.after_step else ""
        return f"Regularized({self.objective!r}, [{regs}]{post})"


class _Retraction:
    """``parseval_retraction(model, beta=beta)`` as an after-step update with a readable repr."""

    def __init__(self, beta: float) -> None:
        self.beta = positive_float("beta", beta)

    def __call__(self, model: nn.Module) -> None:
        parseval_retraction(model, beta=self.beta)

    def __repr__(self) -> str:
        return f"parseval_retraction(beta={self.beta})"


#: regulariser name -> (what the weight means, its default). ``regularize`` builds them; ``bastion train
#: --regularizer NAME[=WEIGHT]`` reaches them.
REGULARIZERS: dict[str, tuple[str, float]] = {
    "parseval": ("retraction step beta after every update (Cisse et al.: 0.0003)", 0.0003),
    "parseval-penalty": ("weight of beta/2 ||W W^T - I||_F^2 (beta = 1)", 1.0),
    "spectral-norm": ("ignored (a reparametrisation, Miyato et al.)", 1.0),
    "lipschitz": ("weight of log of the global Lipschitz bound", 0.01),
    "weight-correlation": ("weight of the mean |cos| between neurons (Jin et al.)", 0.1),
}


def regularize(
    objective: Callable[..., Tensor], model: nn.Module, specs: Sequence[tuple[str, float | None]]
) -> Callable[..., Tensor]:
    """``objective`` with the named regularisers of :data:`REGULARIZERS` added (``model`` changed in place for
    ``spectral-norm``).

    Args:
        objective: the training objective.
        model: the model to be trained; ``spectral-norm`` reparametrises its layers now (bake the result with
            :func:`remove_spectral_normalization` before saving).
        specs: ``(name, weight)`` pairs, ``weight=None`` for the default of :data:`REGULARIZERS`.

    Returns:
        ``objective`` itself when no penalty or retraction is asked for, else a :class:`Regularized`.
    """
    penalties: list[tuple[Regularizer, float]] = []
    after: list[Callable[[nn.Module], None]] = []
    for name, weight in specs:
        key = str(name).strip().lower().replace("_", "-")
        if key not in REGULARIZERS:
            raise InputError(f"unknown regularizer {name!r}; available: {', '.join(REGULARIZERS)}")
        w = REGULARIZERS[key][1] if weight is None else positive_float(f"{key} weight", weight, allow_zero=True)
        if key == "parseval":
            after.append(_Retraction(w))
        elif key == "parseval-penalty":
            penalties.append((ParsevalPenalty(beta=1.0), w))
        elif key == "spectral-norm":
            spectral_normalize(model)
        elif key == "lipschitz":
            penalties.append((LipschitzPenalty(), w))
        else:
            penalties.append((WeightCorrelation(), w))
    if not penalties and not after:
        return objective
    return Regularized(objective, penalties, after_step=after)
