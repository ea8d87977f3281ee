"""Robustness of a classifier's prediction to bounded perturbations of its *weights*: an attack and sound bounds.

The question. The input ``x`` is fixed; the adversary moves the parameters of chosen layers. Does the prediction on
``x`` survive every allowed change of the weights? As for input robustness, each sample gets the bracket
``[certified, adv_distance]`` of a :class:`~bastion.results.SampleRecord`: ``certified`` is the largest
perturbation size proven safe, ``adv_distance`` the smallest size at which a perturbation that flips the prediction
was found (and re-executed).

Threat model (relative l∞ per layer). For every weight tensor ``W`` of the chosen layers (default: the weights of
every ``nn.Linear`` and ``nn.Conv2d``; biases with ``biases=True``) the perturbed weights are ``W + Δ`` with

* ``relative="elementwise"`` (the default): ``|Δ_ij| <= eps · |W_ij|``;
* ``relative="layer"``: ``|Δ_ij| <= eps · max|W|`` (one radius per tensor).

The elementwise variant is the default because it is the model of relative (floating-point) rounding and of
multiplicative weight noise, it keeps zero (pruned) weights at zero, and it is invariant to the rescaling symmetry
of ReLU networks (scaling a layer by ``c`` and the next by ``1/c`` changes neither the function nor the threat set),
so radii of differently scaled but equivalent networks agree. The layer variant is the model of fixed-point
quantisation with one step per tensor (error ``<= step / 2`` with ``step ∝ max|W|``), the setting of Weng et al.
(2020), where the perturbation of a layer is an l∞ ball of one radius. A bias is scaled by its own tensor (``|b|``,
or ``max|b|``). :func:`weight_scales` returns the radius per unit of ``eps`` of every perturbed parameter.

Attack (:func:`weight_attack`). Projected gradient ascent on the weights (the PGD of Madry et al., ICLR 2018, moved
from the input to the parameters): a margin is maximised by signed gradient steps
``Δ <- clip(Δ + α · r ⊙ sign(∇_Δ), -r, r)`` with ``r = eps · scale``, i.e. normalised steepest ascent in the
weighted l∞ box, step ``α = 2.5 / steps`` of the box (the library's PGD rule, :func:`bastion.threat.pgd_step_size`).
The runs, each on the samples not yet flipped (a flipped sample leaves the batch with its perturbation kept): one
untargeted run on the Carlini-Wagner margin ``max_{j != y} f_j - f_y`` from zero (or a warm start); ``targets``
targeted runs on ``f_t - f_y``, from zero, one per runner-up class ``t`` in order of the clean logits (the
MultiTargeted scheme of Gowal, Uesato, Qin, Huang, Mann & Kohli, "An Alternative Surrogate Loss for PGD-based
Adversarial Testing", arXiv 2019: the untargeted margin's gradient follows whichever rival is currently ahead, which
need not be the rival the smallest perturbation reaches; on a linear classifier, targeting every rival finds the
exact minimal size); then ``restarts - 1`` untargeted runs from uniform random points of the box. On the digits MLP
of the tests, random restarts gained nothing over these runs, so the default is ``restarts=1, targets=2``.

Batching. Each input has its own perturbation: the model is called through :func:`torch.func.functional_call` under
:func:`torch.func.vmap` over per-sample copies of the perturbed tensors, so one batched forward/backward serves
every sample of a batch (the per-sample copies cost ``batch × perturbed parameters`` memory, fine for small nets). A
model whose forward cannot be vmapped (``.item()``, data-dependent Python control flow) falls back to a loop over
the inputs, with the same result. A reported flip is re-executed on a real deep copy of the model with the
perturbation added to its parameters (:func:`perturbed_copy`) and only kept if that forward pass flips the
prediction.

Minimal size (:func:`minimal_weight_perturbation`): bisection on ``eps``. Probe at the status ``eps`` and at the
search cap ``max_eps``, then halve the bracket between the best failed probe (at least the certified radius, below
which no probe is spent) and the smallest successful one, each probe warm-started from the last flip scaled into the
smaller box (the box scales linearly with ``eps``, so the scaled flip is feasible); stop when
``hi - lo <= tolerance · hi``.

Sound bounds (:func:`weight_margin_bounds`) for fully connected ReLU networks: an ``nn.Sequential`` (nested ones are
flattened) of ``Linear``, ``ReLU``, ``Flatten``, ``Identity`` and ``Dropout`` (eval mode), optionally preceded by a
bastion ``Normalize``; everything before the first ``Linear`` is a fixed function of ``x`` and is evaluated
exactly. Every bound runs in float64. Outputs are lower bounds on the margins ``f_y - f_j`` (``j != y``, in
increasing ``j``) over every allowed weight perturbation; all positive means certified.

``method="interval"`` - interval bound propagation with interval weights. Layer by layer, an interval of
activations ``[l, u]`` and the interval weights ``[W - r, W + r]`` give the exact interval hull of ``W' h + b'``
over both boxes: each product ``w_ij h_j`` of two independent intervals is bounded by the min and max of its four
corner products (this is exact, unlike the midpoint-radius product, which over-approximates), and the products of
one row are sums of terms in disjoint variables, so their sum's range is the sum of the ranges. The first layer
sees the fixed point ``x`` and is therefore exact. The last layer is folded into the margin: the row of
``f_y - f_j`` has weights ``w_y - w_j`` with radius ``r_y + r_j`` (two independent rows), which is exact for the
margin given the activation box and much tighter than ``l_y - u_j``.

``method="crown"`` - a CROWN-style backward linear relaxation (Zhang et al., "Efficient Neural Network Robustness
Certification with General Activation Functions", NeurIPS 2018) in which the weight perturbation is eliminated
exactly at every layer. Suppose ``g >= λᵀ z_l + c`` holds for every execution of the network, ``z_l = W'_l h + b'_l``
the (perturbed) pre-activation of layer ``l``. With ``δ = λᵀ Δ_l``, ``|δ_j| <= a_j := Σ_i |λ_i| r_ij``::

    λᵀ z_l = (λᵀ W_l + δ)ᵀ h + λᵀ b'_l >= (λᵀ W_l)ᵀ h - aᵀ |h| + λᵀ b_l - |λ|ᵀ r_b

and ``|h| <= s ⊙ h + t`` on the activation box (the chord of ``|·|``: ``s = 1, t = 0`` for ``h >= 0``, which is every
ReLU output, where the step is *exact* in ``Δ``: ``min_Δ λᵀ Δ h = -aᵀ h``; ``s = -1`` for ``h <= 0``; the secant
otherwise). So ``g >= (λᵀ W_l - a ⊙ s)ᵀ h + c'``, again linear in the layer's input: the perturbation enters the
coefficients and the constant ("bias") terms of the relaxation, and back-substitution continues through the ReLU
relaxations (upper: the chord; lower: CROWN's adaptive slope, 1 when ``u >= -l`` else 0) down to the fixed input,
where the last step is exact. Every step holds for every allowed ``Δ`` of every layer simultaneously, so the bound
is sound for perturbations of all chosen layers at once. Pre-activation bounds of every hidden layer are computed
the same way (rows of the identity, lower and upper) and intersected with the interval bounds; the returned margin
bound is the larger of the CROWN bound and the interval bound computed from those tightened boxes, so ``crown`` is
never looser than ``interval`` - by construction.

Relation to the papers. Weng, Zhao, Liu, Chen, Lin & Daniel, "Towards Certificated Model Robustness Against Weight
Perturbations", AAAI 2020, certify weight perturbations with CROWN-style linear bounds, one perturbed layer at a
time (with ``layers=[name]`` this module answers that single-layer question). Tsai, Hsu, Yu & Chen, "Formalizing
Generalization and Robustness of Neural Networks to Weight Perturbations", NeurIPS 2021, treat perturbations of
all layers at once (their "non-singular" setting) with norm-based (Lipschitz-type) margin bounds. The derivation
above is this module's own: it handles all chosen layers jointly like Tsai et al. but with linear relaxations like
Weng et al.; for non-negative activations it eliminates the weight-activation product exactly instead of bounding
it by a McCormick-type relaxation. Neither paper's reference code was used.

Certified radius (:func:`certified_weight_radius`): batched bisection on ``eps`` in ``[0, max_eps]``; the radius
returned is always a size at which the bound proved the margins positive (the interval bound is monotone in eps,
the CROWN bound need not be, so only proved sizes are ever returned).

Entry point (:func:`weight_robustness`): one record per sample through :func:`bastion.store.resumable_run`
(kind ``"weight-robustness"``), threat key ``weights-linf-rel:<eps>`` (elementwise) or ``weights-linf-layer:<eps>``
(per layer), with ``+bias`` when biases are perturbed and ``[layer,...]`` when only some layers are. Status:
``robust`` when the bound proves the prediction at ``eps``, ``falsified`` for a clean misclassification or a flip
found at a size ``<= eps``, else ``unknown``. ``extra`` holds ``lower_margin`` (the smallest margin lower bound at
``eps``), ``certified_at_eps``, ``method``, and ``adv_margin`` and ``adv_class`` (of the flip found).
"""

from __future__ import annotations

import copy
import math
import statistics
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.func import functional_call, vmap

from bastion.data import Dataset, as_dataset
from bastion.errors import InputError
from bastion.models.checks import check_logits, eval_mode, model_device, model_fingerprint
from bastion.models.normalize import Normalize
from bastion.results import SampleRecord, Status, cw_margin
from bastion.store import Store, resumable_run
from bastion.threat import PGD_TRAVEL

__all__ = [
    "ATTACK",
    "KIND",
    "METHODS",
    "RELATIVE",
    "WeightAttackResult",
    "WeightRobustnessResult",
    "certified_weight_radius",
    "minimal_weight_perturbation",
    "perturbable_layers",
    "perturbed_copy",
    "threat_key",
    "weight_attack",
    "weight_margin_bounds",
    "weight_robustness",
    "weight_scales",
]

#: Ways to scale the per-weight radius: ``eps·|w|`` or ``eps·max|W|``.
RELATIVE: tuple[str, ...] = ("elementwise", "layer")
#: Bound methods (``None`` in :func:`weight_robustness` runs the attack only).
METHODS: tuple[str, ...] = ("interval", "crown")
#: Name of the attack in the records.
ATTACK = "weight-pgd"
#: Kind of the runs in the store.
KIND = "weight-robustness"
_CLEAN = "clean"
# Largest number of elements of one materialised (samples, out, in) interval-weight tensor (memory knob only).
_CHUNK_ELEMENTS = 1 << 21
_MIX = 0x9E3779B97F4A7C15

Perturbation = dict[str, Tensor]


# ------------------------------------------------------------------------------------------------ validation
def _check_eps(eps: object, name: str = "eps") -> float:
    if isinstance(eps, bool) or not isinstance(eps, (int, float, np.integer, np.floating)):
        raise InputError(f"{name} must be a finite number >= 0, got {eps!r}")
    value = float(eps)
    if not math.isfinite(value) or value < 0:
        raise InputError(f"{name} must be a finite number >= 0, got {eps!r}")
    return value


def _eps_vector(eps: object, n: int, device: torch.device) -> Tensor:
    """``eps`` (a number or an ``(n,)`` tensor of them) as a float64 ``(n,)`` tensor on ``device``."""
    if isinstance(eps, Tensor):
        if eps.dim() == 0:
            eps = float(eps)
        else:
            e = eps.detach().to(device=device, dtype=torch.float64).reshape(-1)
            if e.shape != (n,) or not bool(torch.isfinite(e).all()) or bool((e < 0).any()):
                raise InputError(
                    f"eps must be a finite number >= 0 or an ({n},) tensor of them, got shape {tuple(eps.shape)}"
                )
            return e
    return torch.full((n,), _check_eps(eps), dtype=torch.float64, device=device)


def _check_relative(relative: object) -> str:
    if relative not in RELATIVE:
        raise InputError(f"relative must be one of {', '.join(map(repr, RELATIVE))}, got {relative!r}")
    return str(relative)


def _check_method(method: object, *, allow_none: bool = False) -> str | None:
    if method is None and allow_none:
        return None
    if method not in METHODS:
        extra = " or None (attack only)" if allow_none else ""
        raise InputError(f"method must be one of {', '.join(map(repr, METHODS))}{extra}, got {method!r}")
    return str(method)


def _positive_int(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or int(value) < 1:
        raise InputError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def _check_tolerance(tolerance: object) -> float:
    if isinstance(tolerance, bool) or not isinstance(tolerance, (int, float)) or not 0 < float(tolerance) < 1:
        raise InputError(f"tolerance must be a number in (0, 1), got {tolerance!r}")
    return float(tolerance)


def _check_model(model: object) -> nn.Module:
    if not isinstance(model, nn.Module):
        raise InputError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not any(True for _ in model.parameters()):
        raise InputError("model has no parameters, so there are no weights to perturb")
    return model


def _model_dtype(model: nn.Module) -> torch.dtype:
    for p in model.parameters():
        if p.is_floating_point():
            return p.dtype
    return torch.float32


def _check_xy(model: nn.Module, x: object, y: object) -> tuple[Tensor, Tensor]:
    """``x`` in the model's dtype and ``y`` int64, both on the model's device, with matching lengths."""
    if not isinstance(x, Tensor) or not x.is_floating_point() or x.dim() < 2:
        raise InputError(f"x must be a floating-point tensor (N, ...) of inputs, got {type(x).__name__}")
    if not bool(torch.isfinite(x).all()):
        raise InputError("x contains NaN or Inf; give finite inputs")
    if not isinstance(y, Tensor) or y.dim() != 1 or y.is_floating_point() or y.shape[0] != x.shape[0]:
        raise InputError(f"y must be an integer tensor of {x.shape[0]} labels, one per input")
    dev = model_device(model)
    return x.detach().to(device=dev, dtype=_model_dtype(model)), y.detach().to(device=dev, dtype=torch.int64)


# ------------------------------------------------------------------------------------------------ threat model
def perturbable_layers(model: nn.Module, layers: Iterable[str | nn.Module] | None = None) -> list[str]:
    """Names (as in ``model.named_modules()``) of the layers whose weights the threat perturbs.

    Args:
        model: the classifier.
        layers: ``None`` for every ``nn.Linear`` and ``nn.Conv2d`` of the model, else module names or the module
            objects themselves; each must be a ``Linear`` or ``Conv2d`` of ``model``.

    Returns:
        The names, in the model's module order.

    Raises:
        InputError: a name that is not a module of the model, a module of another type, or no layer at all.
    """
    _check_model(model)
    kinds = (nn.Linear, nn.Conv2d)
    named = dict(model.named_modules())
    eligible = [name for name, m in named.items() if isinstance(m, kinds)]
    if layers is None:
        if not eligible:
            raise InputError("model has no nn.Linear or nn.Conv2d layer whose weights could be perturbed")
        return eligible
    if isinstance(layers, (str, nn.Module)):
        layers = [layers]
    by_id = {id(m): name for name, m in named.items()}
    chosen: set[str] = set()
    for item in layers:
        if isinstance(item, nn.Module):
            if id(item) not in by_id:
                raise InputError(f"layers: module {type(item).__name__} is not part of the model")
            name = by_id[id(item)]
        elif isinstance(item, str):
            name = item
        else:
            raise InputError(f"layers must hold module names or modules, got {item!r}")
        if name not in named:
            raise InputError(f"layers: the model has no module named {name!r}; its Linear/Conv2d layers: {eligible}")
        if not isinstance(named[name], kinds):
            raise InputError(
                f"layers: {name!r} is a {type(named[name]).__name__}; only nn.Linear and nn.Conv2d weights are "
                f"perturbed (choose among {eligible})"
            )
        chosen.add(name)
    if not chosen:
        raise InputError(f"layers is empty; name at least one of {eligible}, or give None for all")
    return [name for name in eligible if name in chosen]


def weight_scales(
    model: nn.Module,
    *,
    layers: Iterable[str | nn.Module] | None = None,
    relative: str = "elementwise",
    biases: bool = False,
) -> dict[str, Tensor]:
    """Radius per unit of ``eps`` of every perturbed parameter: ``|w|`` (elementwise) or ``max|W|`` (per layer).

    Args:
        model: the classifier.
        layers: the perturbed layers (see :func:`perturbable_layers`).
        relative: ``"elementwise"`` (``|Δ| <= eps·|w|``) or ``"layer"`` (``|Δ| <= eps·max|W|``).
        biases: perturb the biases of those layers too (each scaled by its own tensor).

    Returns:
        ``{parameter name: scale}``, each scale shaped, typed and placed like its parameter (detached); the
        allowed perturbation is ``|Δ| <= eps · scale``.
    """
    rel = _check_relative(relative)
    names = perturbable_layers(model, layers)
    modules = dict(model.named_modules())
    out: dict[str, Tensor] = {}
    for name in names:
        m = modules[name]
        tensors = [("weight", m.weight)]
        if biases and getattr(m, "bias", None) is not None:
            tensors.append(("bias", m.bias))
        for kind, p in tensors:
            t = p.detach()
            out[f"{name}.{kind}" if name else kind] = (
                t.abs() if rel == "elementwise" else torch.full_like(t, float(t.abs().max()) if t.numel() else 0.0)
            )
    return out


def threat_key(
    eps: float, *, relative: str = "elementwise", biases: bool = False, layers: Sequence[str] | None = None
) -> str:
    """Canonical store key of the weight threat, e.g. ``"weights-linf-rel:0.01"``.

    Args:
        eps: perturbation size.
        relative: ``"elementwise"`` (``rel``) or ``"layer"``.
        biases: biases perturbed too (``+bias``).
        layers: the perturbed layers when not all of them (appended as ``[a,b]``), else ``None``.
    """
    rel = _check_relative(relative)
    e = _check_eps(eps)
    key = f"weights-linf-{'rel' if rel == 'elementwise' else 'layer'}{'+bias' if biases else ''}:{e!r}"
    return key if layers is None else f"{key}[{','.join(layers)}]"


def _radius(scales: dict[str, Tensor], eps: Tensor) -> Perturbation:
    """Per-sample radii ``eps_n · scale``: ``{name: (N, *shape)}`` in the scales' dtype."""
    out = {}
    for name, s in scales.items():
        e = eps.to(device=s.device, dtype=s.dtype).reshape(-1, *([1] * s.dim()))
        out[name] = e * s.unsqueeze(0)
    return out


def perturbed_copy(model: nn.Module, perturbation: dict[str, Tensor], index: int | None = None) -> nn.Module:
    """A deep copy of ``model`` with ``perturbation`` added to its parameters (the model itself is not touched).

    Args:
        model: the classifier.
        perturbation: ``{parameter name: Δ}``; with ``index``, each ``Δ`` has a leading sample dimension and row
            ``index`` is used.
        index: the sample whose perturbation to apply, or ``None`` when ``Δ`` has the parameter's own shape.

    Returns:
        The perturbed copy, in the model's training/eval mode.
    """
    clone = copy.deepcopy(model)
    params = dict(clone.named_parameters())
    with torch.no_grad():
        for name, delta in perturbation.items():
            if name not in params:
                raise InputError(f"perturbation names {name!r}, which is not a parameter of the model")
            d = delta if index is None else delta[index]
            if d.shape != params[name].shape:
                raise InputError(
                    f"perturbation of {name!r} has shape {tuple(d.shape)}, the parameter {tuple(params[name].shape)}"
                )
            params[name].add_(d.to(params[name]))
    return clone


# ------------------------------------------------------------------------------------------------ the bounds
@dataclass
class _Affine:
    """``z = W h + b`` with ``|ΔW| <= eps · w_scale`` and ``|Δb| <= eps · b_scale`` (float64)."""

    name: str
    weight: Tensor
    bias: Tensor
    w_scale: Tensor
    b_scale: Tensor


@dataclass
class _ReLU:
    name: str


@dataclass
class _FCNet:
    """A fully connected ReLU network: a fixed prefix (evaluated on ``x``) then affine and ReLU steps."""

    prefix: list[tuple[str, nn.Module]]
    ops: list[_Affine | _ReLU]

    def inputs(self, x: Tensor) -> Tensor:
        """The prefix applied to ``x``, flattened: the fixed input of the first affine step, float64."""
        h = x.to(torch.float64)
        for _, m in self.prefix:
            if isinstance(m, Normalize):
                h = (h - _channel(m.mean.to(h), h)) / _channel(m.std.to(h), h)
            else:
                h = m(h)
        h = h.reshape(h.shape[0], -1)
        first = self.ops[0]
        assert isinstance(first, _Affine)
        if h.shape[1] != first.weight.shape[1]:
            raise InputError(
                f"layer {first.name!r} expects {first.weight.shape[1]} input features, the inputs give {h.shape[1]}"
            )
        return h


def _channel(v: Tensor, like: Tensor) -> Tensor:
    return v.reshape((1, -1) + (1,) * (like.dim() - 2)) if like.dim() >= 2 else v


def _flat_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    out: list[tuple[str, nn.Module]] = []

    def walk(seq: nn.Module, prefix: str) -> None:
        for name, m in seq.named_children():
            q = f"{prefix}{name}"
            if isinstance(m, nn.Sequential):
                walk(m, q + ".")
            else:
                out.append((q, m))

    walk(model, "")
    return out


def _parse(model: nn.Module, scales: dict[str, Tensor], method: str) -> _FCNet:
    """The network as :class:`_FCNet`, or an InputError naming the first layer the bounds cannot handle."""
    supported = "nn.Sequential of Linear, ReLU and Flatten (optionally a bastion Normalize first)"
    if not isinstance(model, nn.Sequential):
        raise InputError(
            f"the {method!r} weight bound needs an {supported}, got a {type(model).__name__}; "
            "use method=None to run the attack only"
        )
    prefix: list[tuple[str, nn.Module]] = []
    ops: list[_Affine | _ReLU] = []
    for name, m in _flat_modules(model):
        passive = isinstance(m, (nn.Identity, nn.Dropout))
        if isinstance(m, nn.Linear):
            w = m.weight.detach().to(torch.float64)
            b = m.bias.detach().to(torch.float64) if m.bias is not None else w.new_zeros(w.shape[0])
            ws = scales.get(f"{name}.weight")
            bs = scales.get(f"{name}.bias")
            ops.append(
                _Affine(
                    name, w, b, torch.zeros_like(w) if ws is None else ws.detach().to(w),
                    torch.zeros_like(b) if bs is None else bs.detach().to(b),
                )
            )  # fmt: skip
        elif isinstance(m, nn.ReLU):
            if ops:
                ops.append(_ReLU(name))
            else:
                prefix.append((name, m))
        elif isinstance(m, nn.Flatten) or passive:
            if not ops:
                prefix.append((name, m))
            elif isinstance(m, nn.Flatten) and m.start_dim not in (1, -1):
                raise InputError(f"layer {name!r} (Flatten(start_dim={m.start_dim})) is not supported by the bound")
        elif isinstance(m, Normalize) and not ops:
            prefix.append((name, m))
        else:
            where = "after the first Linear layer " if isinstance(m, Normalize) else ""
            raise InputError(
                f"layer {name!r} ({type(m).__name__}) {where}is not supported by the {method!r} weight bound, which "
                f"handles an {supported}; use method=None to run the attack only"
            )
    if not any(isinstance(op, _Affine) for op in ops):
        raise InputError("the model has no nn.Linear layer; the weight bound needs a fully connected network")
    return _FCNet(prefix, ops)


def _interval_matvec(
    w: Tensor, r: Tensor, eps: Tensor, lo: Tensor, hi: Tensor
) -> tuple[Tensor, Tensor]:  # fmt: skip
    """Exact range of ``Σ_j w'_ij h_j`` over ``w' ∈ [w - eps·r, w + eps·r]`` and ``h ∈ [lo, hi]``.

    Args:
        w: ``(out, in)`` or per-sample ``(N, out, in)`` centre weights.
        r: radii per unit eps, shaped like ``w``.
        eps: ``(N,)``.
        lo: ``(N, in)``.
        hi: ``(N, in)``.

    Returns:
        ``(lower, upper)``, each ``(N, out)``: the min and max of the four corner products of every term, summed.
    """
    n, k_in = lo.shape
    k_out = w.shape[-2]
    per = max(1, _CHUNK_ELEMENTS // max(k_out * k_in, 1))
    lows, highs = [], []
    for s in range(0, n, per):
        sl = slice(s, s + per)
        wc = w[sl] if w.dim() == 3 else w.unsqueeze(0)
        rad = (r[sl] if r.dim() == 3 else r.unsqueeze(0)) * eps[sl].reshape(-1, 1, 1)
        w_lo, w_hi = wc - rad, wc + rad
        a, b = lo[sl].unsqueeze(1), hi[sl].unsqueeze(1)
        corners = torch.stack((w_lo * a, w_lo * b, w_hi * a, w_hi * b))
        lows.append(corners.amin(0).sum(-1))
        highs.append(corners.amax(0).sum(-1))
    return torch.cat(lows), torch.cat(highs)


def _others(y: Tensor, k: int) -> Tensor:
    """``(N, K - 1)`` the classes other than ``y``, in increasing order."""
    idx = torch.arange(k, device=y.device).expand(y.shape[0], k)
    return idx[idx != y[:, None]].reshape(y.shape[0], k - 1)


def _affine_step(op: _Affine, eps: Tensor, lo: Tensor, hi: Tensor) -> tuple[Tensor, Tensor]:
    zl, zu = _interval_matvec(op.weight, op.w_scale, eps, lo, hi)
    rb = eps[:, None] * op.b_scale
    return zl + op.bias - rb, zu + op.bias + rb


def _margin_interval(op: _Affine, y: Tensor, others: Tensor, eps: Tensor, lo: Tensor, hi: Tensor) -> Tensor:
    """Exact lower bound of ``z_y - z_j`` of the last affine step over its weight box and the activation box."""
    w = op.weight[y].unsqueeze(1) - op.weight[others]  # (N, K-1, in)
    r = op.w_scale[y].unsqueeze(1) + op.w_scale[others]
    low, _ = _interval_matvec(w, r, eps, lo, hi)
    b = op.bias[y].unsqueeze(1) - op.bias[others]
    rb = op.b_scale[y].unsqueeze(1) + op.b_scale[others]
    return low + b - eps[:, None] * rb


def _abs_chord(lo: Tensor, hi: Tensor) -> tuple[Tensor, Tensor]:
    """``(s, t)`` with ``|h| <= s·h + t`` on ``[lo, hi]`` (exact where the box does not straddle 0)."""
    s = torch.ones_like(lo)
    t = torch.zeros_like(lo)
    neg = hi <= 0
    s = torch.where(neg & (lo < 0), -torch.ones_like(s), s)
    cross = (lo < 0) & (hi > 0)
    width = torch.where(cross, hi - lo, torch.ones_like(lo))
    s = torch.where(cross, (hi + lo) / width, s)
    t = torch.where(cross, -2 * hi * lo / width, t)
    return s, t


def _relu_relaxation(lo: Tensor, hi: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """CROWN's ReLU relaxation on ``[lo, hi]``: lower slope ``α``, upper slope and intercept ``(su, tu)``."""
    active = lo >= 0
    unstable = (lo < 0) & (hi > 0)
    width = torch.where(unstable, hi - lo, torch.ones_like(lo))
    su = torch.where(active, torch.ones_like(lo), torch.where(unstable, hi / width, torch.zeros_like(lo)))
    tu = torch.where(unstable, -hi * lo / width, torch.zeros_like(lo))
    alpha = torch.where(active, torch.ones_like(lo), torch.where(unstable & (hi >= -lo), 1.0, 0.0).to(lo))
    return alpha, su, tu


def _backward(
    net: _FCNet, bounds: list[tuple[Tensor, Tensor]], h0: Tensor, eps: Tensor, lam: Tensor, k: int
) -> Tensor:  # fmt: skip
    """Lower bound of ``lam · (output of step k)`` over every allowed weight perturbation (module docstring).

    ``bounds[i]`` bounds the output of step ``i`` (needed for ``i < k``); ``lam`` is ``(N, m, width of step k)``.
    """
    const = lam.new_zeros(lam.shape[:2])
    for i in range(k, -1, -1):
        op = net.ops[i]
        lo, hi = (h0, h0) if i == 0 else bounds[i - 1]
        if isinstance(op, _Affine):
            mag = lam.abs()
            const = const + lam @ op.bias - eps[:, None] * (mag @ op.b_scale)
            a = eps[:, None, None] * (mag @ op.w_scale)  # bound on |λᵀΔ|, per input unit
            s, t = _abs_chord(lo, hi)
            lam = lam @ op.weight - a * s.unsqueeze(1)
            const = const - (a * t.unsqueeze(1)).sum(-1)
        else:
            alpha, su, tu = _relu_relaxation(lo, hi)
            pos, neg = lam.clamp(min=0), lam.clamp(max=0)
            const = const + (neg * tu.unsqueeze(1)).sum(-1)
            lam = pos * alpha.unsqueeze(1) + neg * su.unsqueeze(1)
    # what is left is a linear function of the fixed input
    return const + (lam * h0.unsqueeze(1)).sum(-1)


def _bounds(net: _FCNet, h0: Tensor, y: Tensor, eps: Tensor, method: str, k: int) -> Tensor:
    """``(N, K - 1)`` lower bounds of the margins ``f_y - f_j`` for the parsed network."""
    n = h0.shape[0]
    bounds: list[tuple[Tensor, Tensor]] = []
    last = len(net.ops) - 1
    lo, hi = h0, h0
    for i, op in enumerate(net.ops[:-1]):
        if isinstance(op, _ReLU):
            lo, hi = lo.clamp(min=0), hi.clamp(min=0)
        else:
            lo, hi = _affine_step(op, eps, lo, hi)
            if method == "crown":
                eye = torch.eye(lo.shape[1], dtype=lo.dtype, device=lo.device).expand(n, -1, -1)
                lo = torch.maximum(lo, _backward(net, bounds, h0, eps, eye, i))
                hi = torch.minimum(hi, -_backward(net, bounds, h0, eps, -eye, i))
        bounds.append((lo, hi))
    others = _others(y, k)
    out_op = net.ops[last]
    if isinstance(out_op, _Affine):
        interval = _margin_interval(out_op, y, others, eps, lo, hi)
    else:
        lo, hi = lo.clamp(min=0), hi.clamp(min=0)
        interval = lo.gather(1, y[:, None]) - hi.gather(1, others)
    if method == "interval":
        return interval
    eye = torch.eye(k, dtype=h0.dtype, device=h0.device)
    spec = eye[y].unsqueeze(1) - eye[others]  # (N, K-1, K): rows e_y - e_j
    return torch.maximum(interval, _backward(net, bounds, h0, eps, spec, last))


def _output_width(net: _FCNet) -> int:
    for op in reversed(net.ops):
        if isinstance(op, _Affine):
            return int(op.weight.shape[0])
    raise AssertionError("a parsed network has an affine step")


def weight_margin_bounds(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    eps: float | Tensor,
    *,
    layers: Iterable[str | nn.Module] | None = None,
    relative: str = "elementwise",
    biases: bool = False,
    method: str = "interval",
) -> Tensor:
    """Sound lower bounds of the margins ``f_y(x) - f_j(x)`` over every allowed perturbation of the weights.

    Args:
        model: a fully connected ReLU ``nn.Sequential`` (see the module docstring).
        x: ``(N, ...)`` inputs (fixed).
        y: ``(N,)`` the classes whose margins are bounded (usually the clean predictions or the labels).
        eps: perturbation size, one for all or an ``(N,)`` tensor (one per sample).
        layers: the perturbed layers (default: every Linear).
        relative: ``"elementwise"`` or ``"layer"`` (see :func:`weight_scales`).
        biases: perturb the biases too.
        method: ``"interval"`` (interval weights, exact interval products) or ``"crown"`` (backward linear
            relaxation, never looser than ``"interval"``).

    Returns:
        ``(N, K - 1)`` float64 lower bounds of ``f_y - f_j`` for ``j != y`` in increasing order; all ``> 0`` means
        no allowed perturbation changes the prediction away from ``y``.

    Raises:
        InputError: an unsupported layer (named), bad eps, labels out of range, or bad arguments.
    """
    model = _check_model(model)
    name = _check_method(method)
    assert name is not None
    x_t, y_t = _check_xy(model, x, y)
    scales = weight_scales(model, layers=layers, relative=relative, biases=biases)
    net = _parse(model, scales, name)
    k = _output_width(net)
    if y_t.numel() and (int(y_t.min()) < 0 or int(y_t.max()) >= k):
        raise InputError(f"labels must lie in [0, {k - 1}], got values from {int(y_t.min())} to {int(y_t.max())}")
    e = _eps_vector(eps, x_t.shape[0], x_t.device)
    with torch.no_grad(), eval_mode(model):
        return _bounds(net, net.inputs(x_t), y_t, e, name, k)


def _bisect_certified(
    ok: Any, n: int, device: torch.device, *, max_eps: float, tolerance: float, max_steps: int,
    first: float | None = None, known: Tensor | None = None,
) -> Tensor:  # fmt: skip
    """Batched bisection: ``ok(idx, eps) -> bool (len(idx),)``; returns the largest proved eps per sample."""
    lo = torch.zeros(n, dtype=torch.float64, device=device)
    hi = torch.full_like(lo, max_eps)
    everyone = torch.arange(n, device=device)
    if n == 0 or max_eps == 0:
        return lo
    if first is not None and 0 < first < max_eps:
        good = known.to(torch.bool) if known is not None else ok(everyone, torch.full_like(lo, first))
        lo[good] = first
        hi[~good] = first
    top = (hi == max_eps).nonzero().squeeze(1)
    if top.numel():
        good = ok(top, hi[top])
        lo[top[good]] = max_eps
    for _ in range(max_steps):
        active = (hi - lo > tolerance * hi).nonzero().squeeze(1)
        if active.numel() == 0:
            break
        mid = (lo[active] + hi[active]) / 2
        good = ok(active, mid)
        lo[active[good]] = mid[good]
        hi[active[~good]] = mid[~good]
    return lo


def certified_weight_radius(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    *,
    layers: Iterable[str | nn.Module] | None = None,
    relative: str = "elementwise",
    biases: bool = False,
    method: str = "interval",
    max_eps: float = 1.0,
    tolerance: float = 1e-3,
    max_steps: int = 40,
) -> Tensor:
    """The largest perturbation size at which the bound proves each prediction, by batched bisection on eps.

    The margins bounded are those of the label ``y``; a sample the model misclassifies gets radius 0.

    Args:
        model: a fully connected ReLU ``nn.Sequential``.
        x: ``(N, ...)`` inputs.
        y: ``(N,)`` labels.
        layers: the perturbed layers.
        relative: ``"elementwise"`` or ``"layer"``.
        biases: perturb the biases too.
        method: ``"interval"`` or ``"crown"``.
        max_eps: search cap (a radius equal to it means "certified over the whole range").
        tolerance: relative width of the final bracket, ``hi - lo <= tolerance · hi``.
        max_steps: at most this many bisection steps.

    Returns:
        ``(N,)`` float64 radii on the model's device, each one a size the bound proved.
    """
    model = _check_model(model)
    name = _check_method(method)
    assert name is not None
    cap = _check_eps(max_eps, "max_eps")
    tol = _check_tolerance(tolerance)
    steps = _positive_int("max_steps", max_steps)
    x_t, y_t = _check_xy(model, x, y)
    scales = weight_scales(model, layers=layers, relative=relative, biases=biases)
    net = _parse(model, scales, name)
    k = _output_width(net)
    with torch.no_grad(), eval_mode(model):
        correct = model(x_t).argmax(1) == y_t
        h0 = net.inputs(x_t)
        sel = correct.nonzero().squeeze(1)
        radii = torch.zeros(x_t.shape[0], dtype=torch.float64, device=x_t.device)

        def ok(idx: Tensor, e: Tensor) -> Tensor:
            return (_bounds(net, h0[sel[idx]], y_t[sel[idx]], e, name, k) > 0).all(1)

        radii[sel] = _bisect_certified(ok, sel.numel(), x_t.device, max_eps=cap, tolerance=tol, max_steps=steps)
    return radii


# ------------------------------------------------------------------------------------------------ the attack
class _BatchedForward:
    """Logits of each input under its own perturbation of the parameters.

    ``torch.func.vmap`` over ``functional_call`` with per-sample copies of the perturbed tensors; if the model's
    forward cannot be vmapped, a loop over the inputs (same result, slower) is used from then on.
    """

    def __init__(self, model: nn.Module, names: Sequence[str]) -> None:
        self.model = model
        self.names = list(names)
        self.params = {n: p.detach() for n, p in model.named_parameters()}
        self.buffers = {n: b.detach() for n, b in model.named_buffers()}
        self.vmapped = True

    def _one(self, deltas: dict[str, Tensor], x: Tensor) -> Tensor:
        params = dict(self.params)
        for n in self.names:
            params[n] = self.params[n] + deltas[n]
        return functional_call(self.model, (params, self.buffers), (x.unsqueeze(0),)).squeeze(0)

    def __call__(self, deltas: dict[str, Tensor], x: Tensor) -> Tensor:
        if self.vmapped:
            try:
                return vmap(self._one)(deltas, x)
            except (RuntimeError, NotImplementedError, ValueError, TypeError):
                # functorch cannot batch this forward (e.g. .item() or data-dependent control flow): loop instead
                self.vmapped = False
        return torch.stack([self._one({n: d[i] for n, d in deltas.items()}, x[i]) for i in range(x.shape[0])])


@dataclass
class WeightAttackResult:
    """The outcome of :func:`weight_attack` on a batch.

    Attributes:
        success: ``(N,)`` the prediction was flipped, re-verified on a real perturbed copy of the model.
        perturbation: ``{parameter name: (N, *shape)}`` the perturbation found per sample (zeros where none).
        eps: ``(N,)`` the perturbation size attacked.
        clean_pred: ``(N,)`` predictions of the unperturbed model.
        adv_pred: ``(N,)`` predictions under the returned perturbation.
        margin: ``(N,)`` ``max_{j != y} f_j - f_y`` under the returned perturbation (> 0 where flipped).
        grad_calls: gradient evaluations, counted in samples.
        seconds: wall time.
        reverify_failed: flips of the batched forward that the real perturbed copy did not reproduce (dropped).
    """

    success: Tensor
    perturbation: Perturbation
    eps: Tensor
    clean_pred: Tensor
    adv_pred: Tensor
    margin: Tensor
    grad_calls: int = 0
    seconds: float = 0.0
    reverify_failed: int = 0


def _generator(device: torch.device, seed: int, salt: int = 0) -> torch.Generator:
    g = torch.Generator(device=device)
    g.manual_seed((int(seed) * _MIX + int(salt)) % (2**63 - 1))
    return g


def _runner_ups(logits: Tensor, y: Tensor, count: int) -> Tensor:
    """``(N, count)`` the classes other than ``y`` with the largest logits, best first."""
    others = logits.scatter(1, y[:, None], -math.inf)
    return others.topk(min(count, logits.shape[1] - 1), dim=1).indices


def _pgd(
    fwd: _BatchedForward, x: Tensor, y: Tensor, radius: Perturbation, *, steps: int, restarts: int, targets: int,
    step: float, init: Perturbation | None, generator: torch.Generator,
) -> tuple[Tensor, Perturbation, int]:  # fmt: skip
    """Signed-gradient ascent of margins in the per-sample weight boxes; ``(success, Δ, grad_calls)``.

    Runs, each on the samples not yet flipped: untargeted (C&W margin ``max_{j != y} f_j - f_y``) from ``init``
    (or zero); one targeted run (``f_t - f_y``) from zero per runner-up class ``t``, the ``targets`` classes with the
    largest clean logits after ``y`` (the MultiTargeted attack of Gowal et al., 2019: the untargeted margin's
    gradient only ever follows the current best rival, which need not be the one the smallest perturbation
    reaches); then ``restarts - 1`` untargeted runs from uniform random points of the box. Success is untargeted.
    """
    n = x.shape[0]
    success = torch.zeros(n, dtype=torch.bool, device=x.device)
    best = {k: torch.zeros_like(r) for k, r in radius.items()}
    grad_calls = 0
    rivals: Tensor | None = None
    if targets > 0:
        with torch.no_grad():
            rivals = _runner_ups(fwd.model(x), y, targets)
    plan: list[tuple[str, int]] = [("init", -1)]
    plan += [("zero", t) for t in range(0 if rivals is None else rivals.shape[1])]
    plan += [("random", -1)] * (restarts - 1)
    for start, rank in plan:
        act = (~success).nonzero().squeeze(1)
        if act.numel() == 0:
            break
        rad = {k: r[act] for k, r in radius.items()}
        if start == "random":
            delta = {
                k: (torch.rand(r.shape, generator=generator, device=r.device, dtype=r.dtype) * 2 - 1) * r
                for k, r in rad.items()
            }
        elif start == "init" and init is not None:
            delta = {k: torch.maximum(torch.minimum(init[k][act], r), -r) for k, r in rad.items()}
        else:
            delta = {k: torch.zeros_like(r) for k, r in rad.items()}
        xa, ya = x[act], y[act]
        ta = None if rank < 0 or rivals is None else rivals[act, rank]
        for t in range(steps + 1):
            leaves = {k: d.detach().requires_grad_(t < steps) for k, d in delta.items()}
            with torch.enable_grad():
                logits = fwd(leaves, xa)
                flipped = logits.argmax(1) != ya
                grads: tuple[Tensor, ...] = ()
                if t < steps and not bool(flipped.all()):
                    if ta is None:
                        loss = cw_margin(logits, ya)
                    else:
                        loss = logits.gather(1, ta[:, None]).squeeze(1) - logits.gather(1, ya[:, None]).squeeze(1)
                    grads = torch.autograd.grad(loss.sum(), list(leaves.values()))
                    grad_calls += int(xa.shape[0])
            if bool(flipped.any()):
                hit = act[flipped]
                success[hit] = True
                for k in best:
                    best[k][hit] = leaves[k].detach()[flipped]
            keep = ~flipped
            if t == steps or not bool(keep.any()):
                break
            act, xa, ya = act[keep], xa[keep], ya[keep]
            ta = None if ta is None else ta[keep]
            delta = {}
            for (k, leaf), g in zip(leaves.items(), grads):
                r = rad[k][keep]
                moved = leaf.detach()[keep] + step * r * g[keep].sign()
                delta[k] = torch.maximum(torch.minimum(moved, r), -r)
                rad[k] = r
    return success, best, grad_calls


def _reverify(model: nn.Module, x: Tensor, y: Tensor, pert: Perturbation, idx: Iterable[int]) -> dict[int, Tensor]:
    """Logits of sample ``i`` on a real deep copy of the model carrying its perturbation, for each ``i`` in idx."""
    out = {}
    with torch.no_grad():
        for i in idx:
            clone = perturbed_copy(model, pert, i)
            out[i] = clone(x[i : i + 1])[0]
    return out


def _attack_settings(
    steps: object, restarts: object, targets: object, rel_stepsize: object
) -> tuple[int, int, int, float]:
    n_steps = _positive_int("steps", steps)
    n_restarts = _positive_int("restarts", restarts)
    if isinstance(targets, bool) or not isinstance(targets, (int, np.integer)) or int(targets) < 0:
        raise InputError(f"targets must be an integer >= 0 (runner-up classes attacked one by one), got {targets!r}")
    if rel_stepsize is None:
        step = PGD_TRAVEL / n_steps
    else:
        if isinstance(rel_stepsize, bool) or not isinstance(rel_stepsize, (int, float)) or not rel_stepsize > 0:
            raise InputError(f"rel_stepsize must be a number > 0 (or None for 2.5 / steps), got {rel_stepsize!r}")
        step = float(rel_stepsize)
    return n_steps, n_restarts, int(targets), step


def weight_attack(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    eps: float | Tensor,
    *,
    layers: Iterable[str | nn.Module] | None = None,
    relative: str = "elementwise",
    biases: bool = False,
    steps: int = 50,
    restarts: int = 1,
    targets: int = 2,
    rel_stepsize: float | None = None,
    seed: int = 0,
) -> WeightAttackResult:
    """PGD on the weights: a perturbation per input, inside the weight box of size ``eps``, that flips its prediction.

    See the module docstring for the iteration. Any model works (the bounds need a fully connected network, the
    attack does not). The model's own parameters are never modified.

    Args:
        model: the classifier (logits ``(N, K)``).
        x: ``(N, ...)`` inputs.
        y: ``(N,)`` labels; success means the prediction differs from ``y``.
        eps: perturbation size, one for all or ``(N,)``.
        layers: the perturbed layers (default: every Linear and Conv2d).
        relative: ``"elementwise"`` or ``"layer"``.
        biases: perturb the biases too.
        steps: gradient steps per run.
        restarts: untargeted runs; the first from zero, the others from uniform random points of the box, each on
            the samples not yet flipped.
        targets: targeted runs from zero after the first, one per runner-up class (the classes with the largest
            clean logits after ``y``, best first).
        rel_stepsize: step as a fraction of the box radius; ``None`` for ``2.5 / steps``.
        seed: seed of the random restarts.

    Returns:
        A :class:`WeightAttackResult`; ``success`` is re-verified on real perturbed copies.
    """
    t0 = time.perf_counter()
    model = _check_model(model)
    n_steps, n_restarts, n_targets, step = _attack_settings(steps, restarts, targets, rel_stepsize)
    x_t, y_t = _check_xy(model, x, y)
    scales = weight_scales(model, layers=layers, relative=relative, biases=biases)
    e = _eps_vector(eps, x_t.shape[0], x_t.device)
    with eval_mode(model):
        with torch.no_grad():
            clean = model(x_t)
        k = check_logits(clean, x_t.shape[0])
        if y_t.numel() and (int(y_t.min()) < 0 or int(y_t.max()) >= k):
            raise InputError(f"labels must lie in [0, {k - 1}]")
        fwd = _BatchedForward(model, list(scales))
        gen = _generator(x_t.device, seed)
        ok, pert, calls = _pgd(
            fwd,
            x_t,
            y_t,
            _radius(scales, e),
            steps=n_steps,
            restarts=n_restarts,
            targets=n_targets,
            step=step,
            init=None,
            generator=gen,
        )
        with torch.no_grad():
            logits = fwd({kk: v.detach() for kk, v in pert.items()}, x_t)
        failed = 0
        for i, row in _reverify(model, x_t, y_t, pert, ok.nonzero().squeeze(1).tolist()).items():
            logits[i] = row
            if bool(row.argmax() == y_t[i]):
                ok[i] = False
                failed += 1
    return WeightAttackResult(
        success=ok, perturbation=pert, eps=e, clean_pred=clean.argmax(1), adv_pred=logits.argmax(1),
        margin=cw_margin(logits, y_t).detach(), grad_calls=calls, seconds=time.perf_counter() - t0,
        reverify_failed=failed,
    )  # fmt: skip


def minimal_weight_perturbation(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    *,
    layers: Iterable[str | nn.Module] | None = None,
    relative: str = "elementwise",
    biases: bool = False,
    lower: Tensor | None = None,
    eps: float | None = None,
    max_eps: float = 1.0,
    tolerance: float = 1e-3,
    max_steps: int = 40,
    steps: int = 50,
    restarts: int = 1,
    targets: int = 2,
    rel_stepsize: float | None = None,
    seed: int = 0,
) -> tuple[Tensor, WeightAttackResult]:
    """The smallest perturbation size at which the attack flips each prediction, by bisection on eps.

    Probes at ``eps`` (if given) and at ``max_eps``, then bisects between the largest failed probe (never below
    ``lower``, a certified radius) and the smallest successful one; each probe starts from the last flip scaled into
    the smaller box. The flip kept for a sample is re-executed on a real perturbed copy of the model.

    Args:
        model: the classifier.
        x: ``(N, ...)`` inputs.
        y: ``(N,)`` labels (a sample already misclassified gets size 0).
        layers: the perturbed layers.
        relative: ``"elementwise"`` or ``"layer"``.
        biases: perturb the biases too.
        lower: ``(N,)`` sizes known to be safe (certified radii): no probe is spent below them.
        eps: a size to probe first (the status size of :func:`weight_robustness`), or ``None``.
        max_eps: search cap; samples the attack cannot flip at ``max_eps`` get ``inf``.
        tolerance: stop when ``hi - lo <= tolerance · hi``.
        max_steps: at most this many bisection probes after the first ones.
        steps: attack steps per run.
        restarts: untargeted attack runs per probe (the first from the warm start or zero, the others random).
        targets: targeted attack runs per probe, one per runner-up class.
        rel_stepsize: attack step as a fraction of the box radius.
        seed: seed of the random restarts.

    Returns:
        ``(sizes, result)``: ``(N,)`` float64 sizes (``inf`` where nothing was found) and the
        :class:`WeightAttackResult` of the flips kept (``eps`` = the sizes, 0 where nothing was found).
    """
    t0 = time.perf_counter()
    model = _check_model(model)
    n_steps, n_restarts, n_targets, step = _attack_settings(steps, restarts, targets, rel_stepsize)
    cap = _check_eps(max_eps, "max_eps")
    first = None if eps is None else _check_eps(eps)
    tol = _check_tolerance(tolerance)
    n_probes = _positive_int("max_steps", max_steps)
    x_t, y_t = _check_xy(model, x, y)
    n = x_t.shape[0]
    dev = x_t.device
    low = torch.zeros(n, dtype=torch.float64, device=dev) if lower is None else _eps_vector(lower, n, dev).clone()
    scales = weight_scales(model, layers=layers, relative=relative, biases=biases)
    found = torch.full((n,), math.inf, dtype=torch.float64, device=dev)
    best = {k: torch.zeros((n, *s.shape), dtype=s.dtype, device=s.device) for k, s in scales.items()}
    calls = 0
    with eval_mode(model):
        with torch.no_grad():
            clean = model(x_t)
        k = check_logits(clean, n)
        if n and (int(y_t.min()) < 0 or int(y_t.max()) >= k):
            raise InputError(f"labels must lie in [0, {k - 1}]")
        wrong = clean.argmax(1) != y_t
        found[wrong] = 0.0
        fwd = _BatchedForward(model, list(scales))
        gen = _generator(dev, seed)

        def probe(idx: Tensor, size: Tensor, warm: bool) -> Tensor:
            nonlocal calls
            init = None
            if warm:
                ratio = (size / found[idx]).reshape(-1, 1)
                init = {kk: b[idx] * ratio.to(b).reshape(-1, *([1] * (b.dim() - 1))) for kk, b in best.items()}
            hit, pert, c = _pgd(
                fwd,
                x_t[idx],
                y_t[idx],
                _radius(scales, size),
                steps=n_steps,
                restarts=n_restarts,
                targets=n_targets,
                step=step,
                init=init,
                generator=gen,
            )
            calls += c
            won = idx[hit]
            found[won] = size[hit]
            for kk in best:
                best[kk][won] = pert[kk][hit]
            return hit

        todo = ~wrong
        for size in ([first] if first is not None and first < cap else []) + [cap]:
            idx = (todo & torch.isinf(found) & (low < size)).nonzero().squeeze(1)
            if idx.numel() and size > 0:
                hit = probe(idx, torch.full((idx.numel(),), size, dtype=torch.float64, device=dev), False)
                low[idx[~hit]] = torch.maximum(low[idx[~hit]], torch.full_like(low[idx[~hit]], size))
        for _ in range(n_probes):
            active = (todo & torch.isfinite(found) & (found - low > tol * found)).nonzero().squeeze(1)
            if active.numel() == 0:
                break
            mid = (low[active] + found[active]) / 2
            hit = probe(active, mid, True)
            low[active[~hit]] = mid[~hit]
        with torch.no_grad():
            logits = fwd(best, x_t)
        flips = (todo & torch.isfinite(found)).nonzero().squeeze(1).tolist()
        failed = 0
        for i, row in _reverify(model, x_t, y_t, best, flips).items():
            logits[i] = row
            if bool(row.argmax() == y_t[i]):  # the batched forward and the real copy disagree: keep nothing
                found[i] = math.inf
                failed += 1
                for kk in best:
                    best[kk][i] = 0
        logits[wrong] = clean[wrong]
    success = torch.isfinite(found)
    return found, WeightAttackResult(
        success=success, perturbation=best, eps=torch.where(success, found, torch.zeros_like(found)),
        clean_pred=clean.argmax(1), adv_pred=logits.argmax(1), margin=cw_margin(logits, y_t).detach(),
        grad_calls=calls, seconds=time.perf_counter() - t0, reverify_failed=failed,
    )  # fmt: skip


# ------------------------------------------------------------------------------------------------ the data set run
@dataclass
class WeightRobustnessResult:
    """Summary of a :func:`weight_robustness` run, derived from its per-sample records.

    Attributes:
        n: samples.
        threat: the threat key.
        eps: the size at which the status was decided.
        method: the bound method (``None``: attack only).
        relative: ``"elementwise"`` or ``"layer"``.
        clean_accuracy: fraction classified correctly.
        certified_fraction: fraction proved robust at ``eps``.
        falsified_fraction: fraction with a flip at a size ``<= eps`` (or misclassified).
        median_certified: median certified radius over the correctly classified samples (``None`` without bounds).
        median_found: median size of the flips found, over the correctly classified samples with one.
        records: the per-sample records.
        run_id: id of the run in the store, if any.
        seconds: wall time of this call.
    """

    n: int
    threat: str
    eps: float
    method: str | None
    relative: str
    clean_accuracy: float
    certified_fraction: float
    falsified_fraction: float
    median_certified: float | None
    median_found: float | None
    records: list[SampleRecord] = field(repr=False, default_factory=list)
    run_id: int | None = None
    seconds: float = 0.0

    def brackets(self) -> list[tuple[float | None, float | None]]:
        """``(certified, adv_distance)`` per sample in index order (``None``: no bound ran / no flip found)."""
        return [(r.certified, r.adv_distance) for r in sorted(self.records, key=lambda r: r.index)]

    def to_dict(self) -> dict[str, Any]:
        """JSON-able summary, with the bracket of every sample (``[certified, found]``, ``None`` where absent)."""
        return {
            "n": self.n,
            "threat": self.threat,
            "eps": self.eps,
            "method": self.method,
            "relative": self.relative,
            "clean_accuracy": self.clean_accuracy,
            "certified_fraction": self.certified_fraction,
            "falsified_fraction": self.falsified_fraction,
            "median_certified": self.median_certified,
            "median_found": self.median_found,
            "brackets": [list(b) for b in self.brackets()],
            "run_id": self.run_id,
            "seconds": self.seconds,
        }

    def table(self) -> str:
        """A short plain-text summary."""

        def fmt(v: float | None) -> str:
            return "-" if v is None else f"{v:.6g}"

        return "\n".join(
            [
                f"threat              {self.threat}",
                f"method              {self.method or 'attack only'}",
                f"samples             {self.n}",
                f"clean accuracy      {100 * self.clean_accuracy:.2f}%",
                f"certified at eps    {100 * self.certified_fraction:.2f}%",
                f"falsified at eps    {100 * self.falsified_fraction:.2f}%",
                f"median certified    {fmt(self.median_certified)}",
                f"median found        {fmt(self.median_found)}",
            ]
        )


def _summarize(
    records: list[SampleRecord], n: int, threat: str, eps: float, method: str | None, relative: str
) -> WeightRobustnessResult:
    mine = sorted((r for r in records if r.threat == threat), key=lambda r: r.index)
    correct = [r for r in mine if r.clean_pred == r.label]
    cert = [r.certified for r in correct if r.certified is not None]
    found = [r.adv_distance for r in correct if r.adv_distance is not None]
    return WeightRobustnessResult(
        n=n, threat=threat, eps=eps, method=method, relative=relative,
        clean_accuracy=len(correct) / n if n else 0.0,
        certified_fraction=sum(r.status == "robust" for r in mine) / n if n else 0.0,
        falsified_fraction=sum(r.status == "falsified" for r in mine) / n if n else 0.0,
        median_certified=float(statistics.median(cert)) if cert and method is not None else None,
        median_found=float(statistics.median(found)) if found else None, records=mine,
    )  # fmt: skip


def weight_robustness(
    model: nn.Module,
    data: Dataset | tuple[Tensor, Tensor],
    *,
    eps: float | None = None,
    layers: Iterable[str | nn.Module] | None = None,
    relative: str = "elementwise",
    biases: bool = False,
    method: str | None = "interval",
    attack_steps: int = 50,
    restarts: int = 1,
    targets: int = 2,
    rel_stepsize: float | None = None,
    max_eps: float | None = None,
    tolerance: float = 1e-3,
    max_steps: int = 40,
    batch_size: int = 64,
    store: Store | str | Path | None = None,
    progress: bool = True,
    seed: int = 0,
    config: dict[str, Any] | None = None,
) -> WeightRobustnessResult:
    """Weight-perturbation robustness of every sample: status at ``eps`` and the bracket ``[certified, found]``.

    For each batch: the clean predictions; with a bound method, the margin bound at ``eps`` (status ``robust``
    when all margins are proved positive) and the certified radius by bisection; then the minimal flipping size by
    the attack's bisection, starting above the certified radius. One :class:`~bastion.results.SampleRecord` per
    sample goes to the store as each batch finishes, so an interrupted run resumes where it stopped.

    Args:
        model: the classifier; the bounds need a fully connected ReLU ``nn.Sequential`` (optionally a Normalize
            first), the attack any model.
        data: a :class:`~bastion.data.Dataset` or ``(x, y)``.
        eps: the size at which the status is decided; ``None`` for ``max_eps`` (then ``robust`` means proved
            over the whole search range).
        layers: the perturbed layers (default: every Linear and Conv2d).
        relative: ``"elementwise"`` (default, ``|Δ| <= eps·|w|``) or ``"layer"`` (``|Δ| <= eps·max|W|``).
        biases: perturb the biases of those layers too.
        method: ``"interval"``, ``"crown"`` or ``None`` (attack only: ``certified`` stays ``None``).
        attack_steps: PGD steps per attack run.
        restarts: untargeted attack runs per probe (the first from zero or a warm start, the others random).
        targets: targeted attack runs per probe, one per runner-up class (see :func:`weight_attack`).
        rel_stepsize: attack step as a fraction of the box radius; ``None`` for ``2.5 / attack_steps``.
        max_eps: cap of both bisections; ``None`` for ``max(1, eps)``.
        tolerance: relative width at which both bisections stop.
        max_steps: most bisection steps of each search.
        batch_size: samples per batch and per store transaction.
        store: a :class:`~bastion.store.Store`, a path to one, or ``None`` (in memory).
        progress: show a progress bar.
        seed: seed of the attack's random restarts (each batch's stream is derived from it and its first index).
        config: extra JSON-able information stored with the run.

    Returns:
        A :class:`WeightRobustnessResult`.

    Raises:
        InputError: bad arguments (eps < 0, unknown method or relative, a layer the bound cannot handle, ...).
    """
    t_start = time.perf_counter()
    model = _check_model(model)
    data = as_dataset(data)
    status_eps = None if eps is None else _check_eps(eps)
    cap = _check_eps(max_eps, "max_eps") if max_eps is not None else max(1.0, status_eps or 0.0)
    if status_eps is None:
        status_eps = cap
    if status_eps > cap:
        raise InputError(f"eps = {status_eps!r} is above max_eps = {cap!r}; raise max_eps or leave it None")
    rel = _check_relative(relative)
    name = _check_method(method, allow_none=True)
    _attack_settings(attack_steps, restarts, targets, rel_stepsize)
    tol = _check_tolerance(tolerance)
    n_probes = _positive_int("max_steps", max_steps)
    bs = _positive_int("batch_size", batch_size)
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise InputError(f"seed must be an integer, got {seed!r}")
    chosen = perturbable_layers(model, layers)
    all_layers = perturbable_layers(model, None)
    scales = weight_scales(model, layers=chosen, relative=rel, biases=bool(biases))
    net = _parse(model, scales, name) if name is not None else None
    key = threat_key(status_eps, relative=rel, biases=bool(biases), layers=None if chosen == all_layers else chosen)
    device = model_device(model)
    dtype = _model_dtype(model)
    n = len(data)
    payload = {
        "threat": key, "eps": status_eps, "max_eps": cap, "relative": rel, "biases": bool(biases), "layers": chosen,
        "method": name, "attack_steps": int(attack_steps), "restarts": int(restarts),
        "targets": int(targets), "rel_stepsize": rel_stepsize,
        "tolerance": tol, "max_steps": n_probes, "seed": int(seed),
    }  # fmt: skip
    with resumable_run(
        store, kind=KIND, payload=payload, fingerprints=lambda: (model_fingerprint(model), data.fingerprint()),
        n_samples=n, threats=[key], config={"batch_size": bs, **(config or {})},
    ) as run:  # fmt: skip
        with eval_mode(model):
            for idx, xb, yb in run.batches(data, bs, desc=f"weights ({name or 'attack'})", progress=progress):
                run.write(
                    _robustness_batch(
                        model, net, xb.to(device=device, dtype=dtype), yb.to(device), idx, key=key, eps=status_eps,
                        cap=cap, layers=chosen, relative=rel, biases=bool(biases), method=name, steps=attack_steps,
                        restarts=restarts, targets=targets, rel_stepsize=rel_stepsize, tolerance=tol,
                        max_steps=n_probes, seed=int(seed),
                    )
                )  # fmt: skip
        result = _summarize(run.records(key), n, key, status_eps, name, rel)
        return run.finish(result, started=t_start)


def _robustness_batch(
    model: nn.Module, net: _FCNet | None, x: Tensor, y: Tensor, idx: Tensor, *, key: str, eps: float, cap: float,
    layers: list[str], relative: str, biases: bool, method: str | None, steps: int, restarts: int, targets: int,
    rel_stepsize: float | None, tolerance: float, max_steps: int, seed: int,
) -> list[SampleRecord]:  # fmt: skip
    t0 = time.perf_counter()
    n = x.shape[0]
    with torch.no_grad():
        logits = model(x)
    k = check_logits(logits, n)
    pred = logits.argmax(1)
    correct = pred == y
    sel = correct.nonzero().squeeze(1)
    radius = torch.zeros(n, dtype=torch.float64, device=x.device)
    lower_margin = torch.full((n,), math.nan, dtype=torch.float64, device=x.device)
    cert = torch.zeros(n, dtype=torch.bool, device=x.device)
    if net is not None and method is not None and sel.numel():
        with torch.no_grad():
            h0 = net.inputs(x[sel])
            ys = y[sel]
            at_eps = _bounds(net, h0, ys, torch.full((sel.numel(),), eps, dtype=torch.float64, device=x.device),
                             method, k)  # fmt: skip
            lower_margin[sel] = at_eps.amin(1)
            cert[sel] = (at_eps > 0).all(1)

            def ok(i: Tensor, e: Tensor) -> Tensor:
                return (_bounds(net, h0[i], ys[i], e, method, k) > 0).all(1)

            radius[sel] = _bisect_certified(
                ok, sel.numel(), x.device, max_eps=cap, tolerance=tolerance, max_steps=max_steps, first=eps,
                known=cert[sel],
            )  # fmt: skip
    found, attack = minimal_weight_perturbation(
        model, x, y, layers=layers, relative=relative, biases=biases, lower=radius, eps=eps, max_eps=cap,
        tolerance=tolerance, max_steps=max_steps, steps=steps, restarts=restarts, targets=targets,
        rel_stepsize=rel_stepsize,
        seed=(seed * _MIX + int(idx[0])) % (2**31) if idx.numel() else seed,
    )  # fmt: skip
    share = (time.perf_counter() - t0) / max(n, 1)
    out = []
    for j in range(n):
        ok_j, c = bool(correct[j]), bool(cert[j])
        f = float(found[j])
        flipped = math.isfinite(f)
        # the attack never probes at or below the certified radius, so a proof at eps and a flip <= eps cannot meet
        status: Status = "falsified" if (not ok_j or (flipped and f <= eps)) else ("robust" if c else "unknown")
        certified: float | None = None
        if not ok_j:
            certified = 0.0
        elif method is not None:
            certified = max(float(radius[j]), eps) if c else float(radius[j])
        lm = float(lower_margin[j])
        out.append(
            SampleRecord(
                index=int(idx[j]), threat=key, label=int(y[j]), clean_pred=int(pred[j]), status=status,
                adv_distance=f if flipped else None, certified=certified,
                attack=_CLEAN if not ok_j else (ATTACK if status == "falsified" else (method if c else None)),
                seconds=share, queries=None,
                extra={
                    "lower_margin": lm if math.isfinite(lm) else None, "certified_at_eps": c, "method": method,
                    "adv_margin": float(attack.margin[j]) if flipped and ok_j else None,
                    "adv_class": int(attack.adv_pred[j]) if flipped and ok_j else None,
                },
            )
        )  # fmt: skip
    return out
