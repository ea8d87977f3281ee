"""The bound façade: :func:`compute_bounds` runs IBP, CROWN, CROWN-IBP, alpha-CROWN or DeepPoly on a :class:`Network`.

Every method returns sound lower and upper bounds on ``C @ f(x)`` for all ``x`` in an input box, batched over
samples or branch-and-bound sub-domains, together with the pre-activation bounds of every nonlinear node (reusable by
BaB and MILP).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from bastion.errors import InputError
from bastion.verify.alpha_crown import alpha_crown_bounds
from bastion.verify.crown import crown_bounds, crown_ibp_bounds
from bastion.verify.deeppoly import deeppoly_bounds
from bastion.verify.ibp import ibp_bounds
from bastion.verify.ir import Network

__all__ = ["METHODS", "BoundOptions", "BoundResult", "compute_bounds", "robustness_spec"]

Bounds = tuple[Tensor, Tensor]

#: Names accepted by ``method``.
METHODS = ("ibp", "crown", "alpha-crown", "deeppoly", "crown-ibp")


@dataclass
class BoundOptions:
    """Options of :func:`compute_bounds`.

    Attributes:
        method: ``"ibp"``, ``"crown"``, ``"alpha-crown"``, ``"deeppoly"`` or ``"crown-ibp"`` (interval intermediate
            bounds and a CROWN final pass, Zhang et al. ICLR 2020).
        alpha_steps: alpha-CROWN optimisation steps (Xu et al. 2021 use 20-100).
        alpha_lr: alpha-CROWN Adam learning rate.
        alpha_lr_decay: alpha-CROWN learning-rate decay per step.
        bound_upper: compute upper bounds too; with False the upper bounds are ``+inf`` and CROWN-type methods do
            half the work in the final pass (BaB only needs lower bounds).
        reuse_intermediate: when ``intermediate`` bounds are given, use them as they are for the nodes they cover
            instead of recomputing and intersecting (faster; BaB children of a parent domain).
        monotone_splits: with ``splits`` and a CROWN-type method, also bound the domain without the splits and keep
            the tighter of the two. Clamping a split neuron changes its relaxation, and the back-substituted bound is
            minimised over the whole input box, so without this a split can make CROWN's bound looser (beta-CROWN's
            multipliers address the same effect). Costs a second pass; a BaB that already keeps the parent's bound
            (and passes its ``intermediate``) can turn it off.
        alpha_intermediate: alpha-CROWN also optimises the lower slopes used for the intermediate-layer bounds
            (one set per intermediate layer, Xu et al. 2021), through their effect on the final bound. Tighter,
            costlier in time and memory (the slopes of each layer's back-substitution are kept); the returned
            intermediate bounds are the tightest seen, never looser than CROWN's.
        beta: with ``splits`` and ``"alpha-crown"``, optimise beta-CROWN multipliers of the split constraints jointly
            with the slopes (Wang et al., NeurIPS 2021); this replaces the second pass of ``monotone_splits``.
    """

    method: str = "crown"
    alpha_steps: int = 20
    alpha_lr: float = 0.1
    alpha_lr_decay: float = 0.98
    bound_upper: bool = True
    reuse_intermediate: bool = False
    monotone_splits: bool = True
    alpha_intermediate: bool = False
    beta: bool = False


@dataclass
class BoundResult:
    """Bounds computed by :func:`compute_bounds`.

    Attributes:
        lower: ``(N, m)`` lower bounds on ``C @ f(x)`` over the box (``m = K`` when ``C`` is None).
        upper: ``(N, m)`` upper bounds.
        intermediate: pre-activation (input) bounds of every nonlinear node keyed by its name, each
            ``(N, *shape)``.
    """

    lower: Tensor
    upper: Tensor
    intermediate: dict[str, Bounds] = field(default_factory=dict)


def robustness_spec(labels: Tensor, num_classes: int) -> Tensor:
    """Specification rows ``e_y - e_j`` for every ``j != y``: all margins ``>= 0`` means the prediction is robust.

    Args:
        labels: ``(N,)`` integer labels.
        num_classes: ``K``.

    Returns:
        ``C`` of shape ``(N, K - 1, K)`` (rows ordered by increasing ``j``), float32 on the labels' device.
    """
    if not isinstance(labels, Tensor) or labels.dim() != 1 or labels.is_floating_point():
        raise InputError(f"robustness_spec: labels must be a 1-D integer tensor, got {labels!r}")
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
        raise InputError(f"robustness_spec: num_classes must be an int >= 2, got {num_classes!r}")
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        raise InputError(f"robustness_spec: labels must be in [0, {num_classes - 1}], got {labels.tolist()}")
    n, k = labels.shape[0], num_classes
    eye = torch.eye(k, device=labels.device)
    full = eye[labels].unsqueeze(1) - eye.unsqueeze(0)  # (N, K, K): row j is e_y - e_j
    keep = torch.ones(n, k, dtype=torch.bool, device=labels.device)
    keep[torch.arange(n, device=labels.device), labels] = False
    return full[keep].reshape(n, k - 1, k)


def _net_dtype_device(net: Network) -> tuple[torch.dtype, torch.device] | None:
    for node in net.nodes.values():
        for value in vars(node.op).values():
            if isinstance(value, Tensor) and value.is_floating_point():
                return value.dtype, value.device
    return None


def _check_box(net: Network, lower: Tensor, upper: Tensor) -> None:
    for nm, t in (("lower", lower), ("upper", upper)):
        if not isinstance(t, Tensor) or not t.is_floating_point():
            raise InputError(f"compute_bounds: {nm} must be a floating-point tensor, got {type(t).__name__}")
    if lower.shape != upper.shape:
        raise InputError(f"compute_bounds: lower {tuple(lower.shape)} and upper {tuple(upper.shape)} differ in shape")
    if lower.dim() < 1 or tuple(lower.shape[1:]) != net.input_shape:
        raise InputError(
            f"compute_bounds: the box must have shape (N, {', '.join(map(str, net.input_shape))}), "
            f"got {tuple(lower.shape)}"
        )
    if not bool(torch.isfinite(lower).all()) or not bool(torch.isfinite(upper).all()):
        raise InputError("compute_bounds: lower/upper contain NaN or Inf")
    if bool((lower > upper).any()):
        raise InputError("compute_bounds: lower > upper somewhere in the input box")


def _check_spec(C: Tensor | None, n: int, k: int, like: Tensor) -> Tensor:
    if C is None:
        return torch.eye(k, dtype=like.dtype, device=like.device).unsqueeze(0).expand(n, k, k)
    if not isinstance(C, Tensor) or not C.is_floating_point():
        raise InputError(f"compute_bounds: C must be a floating-point tensor, got {C!r}")
    if C.dim() == 2:
        C = C.unsqueeze(0).expand(n, *C.shape)
    if C.dim() != 3 or C.shape[0] != n or C.shape[2] != k:
        raise InputError(f"compute_bounds: C must have shape (m, {k}) or ({n}, m, {k}), got {tuple(C.shape)}")
    if not bool(torch.isfinite(C).all()):
        raise InputError("compute_bounds: C contains NaN or Inf")
    return C.to(dtype=like.dtype, device=like.device)


def _check_per_node(net: Network, what: str, values: dict[str, Tensor] | dict[str, Bounds] | None, n: int) -> None:
    if values is None:
        return
    if not isinstance(values, dict):
        raise InputError(f"compute_bounds: {what} must be a dict keyed by node name, got {type(values).__name__}")
    for name, v in values.items():
        if name not in net.nodes or not net.nodes[name].op.nonlinear:
            raise InputError(f"compute_bounds: {what} names {name!r}, which is not a nonlinear node of the network")
        in_shape = net.nodes[net.nodes[name].inputs[0]].shape
        tensors = v if isinstance(v, tuple) else (v,)
        for t in tensors:
            if not isinstance(t, Tensor) or tuple(t.shape) != (n, *in_shape):
                got = tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__
                raise InputError(f"compute_bounds: {what}[{name!r}] must have shape {(n, *in_shape)}, got {got}")
        if what == "splits":
            assert isinstance(v, Tensor)
            if v.is_floating_point() or v.dtype == torch.bool or bool((v.abs() > 1).any()):
                raise InputError(f"compute_bounds: splits[{name!r}] must be an integer tensor of -1/0/+1")


def compute_bounds(
    net: Network,
    lower: Tensor,
    upper: Tensor,
    *,
    C: Tensor | None = None,
    method: str | None = None,
    options: BoundOptions | None = None,
    splits: dict[str, Tensor] | None = None,
    intermediate: dict[str, Bounds] | None = None,
) -> BoundResult:
    """Sound bounds on ``C @ f(x)`` for every ``x`` with ``lower <= x <= upper``.

    Args:
        net: the network.
        lower: ``(N, *input_shape)`` lower ends of the input boxes (samples or sub-domains).
        upper: ``(N, *input_shape)`` upper ends.
        C: ``(m, K)`` or ``(N, m, K)`` specification matrix over the ``K`` flattened outputs; None bounds the outputs.
        method: ``"ibp"``, ``"crown"``, ``"alpha-crown"``, ``"deeppoly"`` or ``"crown-ibp"``; None takes
            ``options.method`` (``"crown"`` by default).
        options: hyperparameters (:class:`BoundOptions`).
        splits: per ReLU node an integer tensor ``(N, *shape)``: +1 forces the pre-activation ``>= 0``, -1 forces
            it ``<= 0``, 0 leaves it free; the bounds are then sound on that restricted domain.
        intermediate: known pre-activation bounds per nonlinear node (e.g. from a parent BaB domain), intersected
            with the freshly computed ones.

    Returns:
        A :class:`BoundResult`.

    Raises:
        InputError: on a malformed box, specification, split or method name.
    """
    if not isinstance(net, Network):
        raise InputError(f"compute_bounds: net must be a bastion.verify.ir.Network, got {type(net).__name__}")
    opts = options if options is not None else BoundOptions()
    if not isinstance(opts, BoundOptions):
        raise InputError(f"compute_bounds: options must be a BoundOptions, got {type(opts).__name__}")
    name = (method if method is not None else opts.method).lower().replace("_", "-")
    if name == "alpha_crown" or name == "alphacrown":
        name = "alpha-crown"
    if name == "crownibp":
        name = "crown-ibp"
    if name not in METHODS:
        raise InputError(f"compute_bounds: unknown method {method or opts.method!r}; choose one of {METHODS}")
    if opts.alpha_steps < 0 or opts.alpha_lr <= 0:
        raise InputError("compute_bounds: alpha_steps must be >= 0 and alpha_lr > 0")
    _check_box(net, lower, upper)
    n = lower.shape[0]
    k = 1
    for d in net.output_shape:
        k *= d
    spec = _check_spec(C, n, k, lower)
    _check_per_node(net, "splits", splits, n)
    _check_per_node(net, "intermediate", intermediate, n)
    found = _net_dtype_device(net)
    if found is not None and found != (lower.dtype, lower.device):
        net = net.to(lower.device, lower.dtype)
    if intermediate is not None:
        intermediate = {nm: (lo.to(lower), hi.to(lower)) for nm, (lo, hi) in intermediate.items()}
    has_splits = splits is not None and any(bool((s != 0).any()) for s in splits.values())
    if has_splits and name != "ibp" and opts.monotone_splits and not (opts.beta and name == "alpha-crown"):
        # Bounds without the splits hold on the restricted domain too: they tighten its intermediate bounds and the
        # final bound is the better of the two.
        free = compute_bounds(
            net,
            lower,
            upper,
            C=spec,
            method=name,
            options=BoundOptions(**{**vars(opts), "monotone_splits": False}),
            intermediate=intermediate,
        )
        split = compute_bounds(
            net,
            lower,
            upper,
            C=spec,
            method=name,
            options=BoundOptions(**{**vars(opts), "monotone_splits": False, "reuse_intermediate": False}),
            splits=splits,
            intermediate=free.intermediate,
        )
        return BoundResult(
            lower=torch.maximum(free.lower, split.lower),
            upper=torch.minimum(free.upper, split.upper),
            intermediate=split.intermediate,
        )
    common = {"splits": splits, "intermediate": intermediate, "reuse_intermediate": opts.reuse_intermediate}
    if name == "ibp":
        lo, hi, pre = ibp_bounds(net, lower, upper, spec, **common)  # type: ignore[arg-type]
    elif name == "crown":
        lo, hi, pre = crown_bounds(net, lower, upper, spec, bound_upper=opts.bound_upper, **common)  # type: ignore[arg-type]
    elif name == "crown-ibp":
        lo, hi, pre = crown_ibp_bounds(net, lower, upper, spec, bound_upper=opts.bound_upper, **common)  # type: ignore[arg-type]
    elif name == "deeppoly":
        lo, hi, pre = deeppoly_bounds(net, lower, upper, spec, bound_upper=opts.bound_upper, **common)  # type: ignore[arg-type]
    else:
        lo, hi, pre = alpha_crown_bounds(
            net,
            lower,
            upper,
            spec,
            steps=opts.alpha_steps,
            lr=opts.alpha_lr,
            lr_decay=opts.alpha_lr_decay,
            optimize_intermediate=opts.alpha_intermediate,
            beta=opts.beta,
            bound_upper=opts.bound_upper,
            **common,  # type: ignore[arg-type]
        )
    if name == "ibp" and not opts.bound_upper:
        hi = torch.full_like(hi, float("inf"))
    return BoundResult(lower=lo, upper=hi, intermediate=pre)
