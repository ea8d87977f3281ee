"""Certification of a data set: certified status at a radius and the certified radius of every sample.

For each correctly classified sample, a bound method proves that every point of the threat ball (∩ the input
domain) keeps the label, by a positive lower bound on every margin ``f_y(x) - f_j(x)`` (the rows of
:func:`~bastion.verify.bounds.robustness_spec`). The *certified radius* is the largest radius the method still
proves, found by bisection on eps: all samples of a batch bisect together, one bound computation per step on every
sample not yet converged (each with its own eps). The radius returned is always one at which the proof succeeded
(the lower end of the final bracket), so it is sound even where a method is not monotone in eps; the bisection stops
once ``hi - lo <= tolerance * hi`` or after ``max_steps`` steps, so the method's own radius lies in
``[r, r / (1 - tolerance)]`` (for methods monotone in eps such as IBP).

Methods (``method=``):

========================  =========================================================================================
``ibp``                   interval bound propagation (Gowal et al. 2018)
``crown``                 CROWN (Zhang et al., NeurIPS 2018)
``alpha-crown``           alpha-CROWN (Xu et al., ICLR 2021)
``deeppoly``              DeepPoly (Singh et al., POPL 2019)
``deepz``                 DeepZ zonotopes (Singh et al., NeurIPS 2018), :mod:`bastion.verify.zonotope`
``symbolic``              ReluVal symbolic intervals (Wang et al., USENIX Security 2018), :mod:`bastion.verify.symbolic`
========================  =========================================================================================

Norms: ``linf`` for every method (the ball ∩ domain is a box). ``l2`` and ``l1``: ``ibp`` bounds the enclosing
box ``[x - eps, x + eps] ∩ domain`` (sound, loose); ``crown`` and ``deeppoly`` back-substitute to a linear function
of the input and bound it over the ball with the dual norm (``A.x0 - eps ||A||_q``, Zhang et al. 2018), at every
intermediate layer too, keeping the better of that and the enclosing-box bound; ``alpha-crown`` takes the better
of alpha-CROWN on the enclosing box and CROWN on the ball; ``deepz`` and ``symbolic`` bound their input
coefficients over box ∩ ball the same way. ``l0`` is refused.

A clean misclassification is ``falsified`` with distance 0 (and certified radius 0).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from bastion.data import Dataset, as_dataset
from bastion.errors import InputError
from bastion.models.checks import check_logits, eval_mode, model_device, model_fingerprint
from bastion.results import SampleRecord
from bastion.store import Store, resumable_run
from bastion.threat import LpBall
from bastion.verify.bounds import BoundOptions, compute_bounds, robustness_spec
from bastion.verify.crown import intermediate_bounds
from bastion.verify.ir import Network, as_network
from bastion.verify.symbolic import InputSet, symbolic_bounds
from bastion.verify.zonotope import zonotope_bounds

__all__ = [
    "CLEAN",
    "METHODS",
    "CertifyResult",
    "certified_radius",
    "certify",
    "check_method",
    "margin_bounds",
    "summarize_certify",
]

#: Bound methods accepted by :func:`certify`.
METHODS = ("ibp", "crown", "crown-ibp", "alpha-crown", "deeppoly", "deepz", "symbolic")
#: The ``attack`` field of records of samples the model already gets wrong.
CLEAN = "clean"
_NORMS = ("linf", "l2", "l1")
Bounds = tuple[Tensor, Tensor]


def check_method(method: object) -> str:
    """The canonical name of a bound method (``alpha_crown`` -> ``alpha-crown``), or an InputError listing them."""
    if not isinstance(method, str):
        raise InputError(f"method must be one of {METHODS}, got {method!r}")
    name = method.strip().lower().replace("_", "-")
    name = {"alphacrown": "alpha-crown", "zonotope": "deepz", "reluval": "symbolic", "deepsymbol": "symbolic"}.get(
        name, name
    )
    if name not in METHODS:
        raise InputError(f"unknown bound method {method!r}; choose one of {', '.join(METHODS)}")
    return name


def _check_threat(threat: object) -> LpBall:
    if not isinstance(threat, LpBall):
        raise InputError(f"threat must be an LpBall, got {threat!r}")
    if threat.norm not in _NORMS:
        raise InputError(f"certification supports the norms {', '.join(_NORMS)}, not {threat.norm!r}")
    if not math.isfinite(threat.eps):
        raise InputError(f"certification needs a finite eps, got {threat.eps}")
    return threat


def _max_radius(threat: LpBall, numel: int) -> float:
    """The radius beyond which the ball ∩ domain no longer grows (it is then the whole domain)."""
    width = threat.domain[1] - threat.domain[0]
    return {"linf": width, "l2": width * math.sqrt(numel), "l1": width * numel}[threat.norm]


def _on(net: Network, x: Tensor) -> Network:
    """``net`` with its constants on ``x``'s device and dtype (a copy only when they differ)."""
    for node in net.nodes.values():
        for value in vars(node.op).values():
            if isinstance(value, Tensor) and value.is_floating_point():
                return net if (value.dtype, value.device) == (x.dtype, x.device) else net.to(x.device, x.dtype)
    return net


def _region(x: Tensor, eps: Tensor, threat: LpBall) -> InputSet:
    lo_d, hi_d = threat.domain
    e = eps.reshape(-1, *([1] * (x.dim() - 1)))
    lower, upper = (x - e).clamp(lo_d, hi_d), (x + e).clamp(lo_d, hi_d)
    if threat.norm == "linf":
        return InputSet(lower, upper)
    return InputSet(lower, upper, center=x, eps=eps, norm=threat.norm)


def _backsubstitute_to_input(
    net: Network, start: str, A: Tensor, pre: dict[str, Bounds], mode: str
) -> tuple[Tensor, Tensor]:
    """CROWN's backward pass from ``start`` to the input, returning the input coefficients and the constant.

    Same walk as :func:`bastion.verify.crown.backsubstitute`, which concretises on a box at the input; here the
    linear function of the input is returned so that it can be bounded over a ball.
    """
    order = list(net.nodes)
    acc: dict[str, Tensor] = {start: A}
    n, m = A.shape[:2]
    bias = A.new_zeros(n, m)
    a_in = A.new_zeros(n, m, *net.input_shape)
    for name in reversed(order[: order.index(start) + 1]):
        a = acc.pop(name, None)
        if a is None:
            continue
        node = net.nodes[name]
        if name == net.input_name:
            a_in = a
            continue
        if node.op.linear:
            back, b = node.op.backward(a)  # type: ignore[attr-defined]
        elif node.op.nonlinear:
            a_n, b = node.op.backward_bound(a, *pre[name], alpha=None, mode=mode)  # type: ignore[attr-defined]
            back = [a_n]
        else:
            raise InputError(f"operator {node.op!r} of node {name!r} has no linear relaxation")
        bias = bias + b
        for inp, ai in zip(node.inputs, back):
            acc[inp] = acc[inp] + ai if inp in acc else ai
    return a_in, bias


def _crown_region(net: Network, region: InputSet, C: Tensor, mode: str) -> Tensor:
    """CROWN/DeepPoly lower bounds of ``C @ f(x)`` over box ∩ ball (dual-norm concretisation at every layer)."""
    box_pre = intermediate_bounds(net, region.lower, region.upper, mode=mode)
    pre: dict[str, Bounds] = {}
    cache: dict[str, Bounds] = {}
    n = region.lower.shape[0]
    for name in net.nonlinear_nodes():
        src = net.nodes[name].inputs[0]
        if src not in cache:
            if src == net.input_name:
                cache[src] = (region.lower, region.upper)
            else:
                shape = net.nodes[src].shape
                p = math.prod(shape)
                eye = torch.eye(p, dtype=C.dtype, device=C.device).reshape(1, p, *shape).expand(n, p, *shape)
                a_in, bias = _backsubstitute_to_input(net, src, torch.cat([eye, -eye], 1), pre, mode)
                lb = region.min_linear(a_in) + bias
                cache[src] = (lb[:, :p].reshape(n, *shape), (-lb[:, p:]).reshape(n, *shape))
        lo, hi = cache[src]
        blo, bhi = box_pre[name]
        lo, hi = torch.maximum(lo, blo), torch.minimum(hi, bhi)
        pre[name] = (lo, torch.maximum(lo, hi))
    A = C.reshape(n, C.shape[1], *net.output_shape)
    a_in, bias = _backsubstitute_to_input(net, net.output_name, A, pre, mode)
    return region.min_linear(a_in) + bias


def margin_bounds(
    net: Network,
    x: Tensor,
    labels: Tensor,
    threat: LpBall,
    *,
    eps: Tensor | float | None = None,
    method: str = "crown",
    options: BoundOptions | None = None,
) -> Tensor:
    """Sound lower bounds of the margins ``f_y(x') - f_j(x')`` (``j != y``) over the threat ball around each ``x``.

    Args:
        net: the network.
        x: ``(N, *input_shape)`` centres, inside the threat's domain.
        labels: ``(N,)`` the classes to keep.
        threat: the l-inf, l2 or l1 ball (its domain is intersected).
        eps: radius per sample ``(N,)`` or one for all; ``threat.eps`` by default.
        method: one of :data:`METHODS`.
        options: hyperparameters of the bound methods (alpha-CROWN steps, ...).

    Returns:
        ``(N, K - 1)`` lower bounds; all positive means certified.
    """
    threat = _check_threat(threat)
    name = check_method(method)
    n = x.shape[0]
    e = torch.as_tensor(threat.eps if eps is None else eps, dtype=x.dtype, device=x.device)
    e = e.expand(n) if e.dim() == 0 else e
    if e.shape != (n,) or bool((e < 0).any()) or not bool(torch.isfinite(e).all()):
        raise InputError(f"eps must be a finite number >= 0 or a (N,) tensor of them, got shape {tuple(e.shape)}")
    k = math.prod(net.output_shape)
    C = robustness_spec(labels, k).to(x.dtype)
    net = _on(net, x)
    region = _region(x, e, threat)
    if name == "deepz":
        return zonotope_bounds(net, region.lower, region.upper, C, region=region)[0]
    if name == "symbolic":
        return symbolic_bounds(net, region.lower, region.upper, C, region=region)[0]
    opts = replace(options if options is not None else BoundOptions(), bound_upper=False)
    lower = compute_bounds(net, region.lower, region.upper, C=C, method=name, options=opts).lower
    if region.center is not None and name != "ibp":
        # On an l2/l1 ball the dual-norm bound of CROWN's linear function is usually far tighter than the box.
        mode = "deeppoly" if name == "deeppoly" else "crown"
        lower = torch.maximum(lower, _crown_region(net, region, C, mode))
    return lower


def certified_radius(
    net: Network,
    x: Tensor,
    labels: Tensor,
    threat: LpBall,
    *,
    method: str = "crown",
    tolerance: float = 1e-3,
    max_steps: int = 40,
    options: BoundOptions | None = None,
    known: Tensor | None = None,
) -> Tensor:
    """The largest radius at which ``method`` certifies each sample, by batched bisection on eps.

    Args:
        net: the network.
        x: ``(N, *input_shape)`` inputs.
        labels: ``(N,)`` classes to keep (a sample the network misclassifies gets radius 0).
        threat: the ball; its ``eps`` is the first probe (a radius known to be certified or not halves the work).
        method: one of :data:`METHODS`.
        tolerance: relative width of the final bracket, ``hi - lo <= tolerance * hi``.
        max_steps: at most this many bisection steps (bound computations).
        options: bound-method hyperparameters.
        known: optional ``(N,)`` booleans: certification at ``threat.eps`` already computed (skips that probe).

    Returns:
        ``(N,)`` radii, each certified by the method (0 where nothing is).
    """
    threat = _check_threat(threat)
    if not 0 < tolerance < 1:
        raise InputError(f"tolerance must be in (0, 1), got {tolerance}")
    if isinstance(max_steps, bool) or not isinstance(max_steps, int) or max_steps < 1:
        raise InputError(f"max_steps must be a positive integer, got {max_steps!r}")
    n = x.shape[0]
    net = _on(net, x)
    with torch.no_grad():
        correct = net(x).reshape(n, -1).argmax(1) == labels
    lo = torch.zeros(n, dtype=x.dtype, device=x.device)
    hi = torch.full_like(lo, _max_radius(threat, x[0].numel()))

    def ok(idx: Tensor, eps: Tensor) -> Tensor:
        with torch.no_grad():
            return (margin_bounds(net, x[idx], labels[idx], threat, eps=eps, method=method, options=options) > 0).all(1)

    eps0 = threat.eps
    if 0 < eps0 < float(hi[0]):
        todo = correct.nonzero().squeeze(1)
        if todo.numel():
            first = known[todo].to(torch.bool) if known is not None else ok(todo, torch.full_like(lo[todo], eps0))
            lo[todo[first]] = eps0
            hi[todo[~first]] = eps0
    for _ in range(max_steps):
        active = (correct & (hi - lo > tolerance * hi)).nonzero().squeeze(1)
        if active.numel() == 0:
            break
        mid = (lo[active] + hi[active]) / 2
        good = ok(active, mid)
        lo[active[good]] = mid[good]
        hi[active[~good]] = mid[~good]
    return torch.where(correct, lo, torch.zeros_like(lo))


@dataclass
class CertifyResult:
    """Summary of a certification run, derived from its per-sample records.

    Attributes:
        n: samples certified.
        threat: the threat key (``LpBall.key``).
        method: the bound method.
        clean_accuracy: fraction classified correctly.
        certified_accuracy: fraction certified robust at ``threat.eps``.
        mean_radius: mean certified radius over all samples (0 for misclassified ones), None without radii.
        records: per-sample records (``certified`` holds the radius, or eps when radii were not computed).
        run_id: id of the run in the store, if any.
        seconds: wall time of this call.
    """

    n: int
    threat: str
    method: str
    clean_accuracy: float
    certified_accuracy: float
    mean_radius: float | None
    records: list[SampleRecord] = field(repr=False, default_factory=list)
    run_id: int | None = None
    seconds: float = 0.0

    def radii(self) -> list[float]:
        """Certified radius per sample, in index order (0 where nothing is certified)."""
        return [r.certified or 0.0 for r in sorted(self.records, key=lambda r: r.index)]

    def certified_accuracy_at(self, eps: float) -> float:
        """Fraction of samples whose certified radius is at least ``eps`` (needs radii)."""
        return sum((r.certified or 0.0) >= eps and r.clean_pred == r.label for r in self.records) / max(self.n, 1)

    def to_dict(self) -> dict[str, Any]:
        """JSON-able summary (without the records)."""
        return {
            "n": self.n,
            "threat": self.threat,
            "method": self.method,
            "clean_accuracy": self.clean_accuracy,
            "certified_accuracy": self.certified_accuracy,
            "mean_radius": self.mean_radius,
            "run_id": self.run_id,
            "seconds": self.seconds,
        }

    def table(self) -> str:
        """A short plain-text summary."""
        lines = [
            f"threat              {self.threat}",
            f"method              {self.method}",
            f"samples             {self.n}",
            f"clean accuracy      {100 * self.clean_accuracy:.2f}%",
            f"certified accuracy  {100 * self.certified_accuracy:.2f}%",
        ]
        if self.mean_radius is not None:
            lines.append(f"mean radius         {self.mean_radius:.6g}")
        return "\n".join(lines)


def summarize_certify(
    records: list[SampleRecord], n: int, threat: str, method: str, with_radius: bool
) -> CertifyResult:
    """Summary statistics from the per-sample records (the only place they are computed)."""
    mine = [r for r in records if r.threat == threat]
    clean = sum(r.clean_pred == r.label for r in mine) / n if n else 0.0
    cert = sum(r.status == "robust" for r in mine) / n if n else 0.0
    mean = sum(r.certified or 0.0 for r in mine) / n if n and with_radius else None
    return CertifyResult(n, threat, method, clean, cert, mean, mine)


def certify(
    model: nn.Module,
    data: Dataset | tuple[Tensor, Tensor],
    threat: LpBall,
    *,
    method: str = "crown",
    radius: bool = True,
    batch_size: int = 64,
    store: Store | str | Path | None = None,
    progress: bool = True,
    tolerance: float = 1e-3,
    max_steps: int = 40,
    options: BoundOptions | None = None,
    config: dict[str, Any] | None = None,
) -> CertifyResult:
    """Certify every sample of ``data`` at ``threat.eps`` and, optionally, compute its certified radius.

    Args:
        model: classifier returning logits ``(N, K)``; must be traceable into the verification IR.
        data: a :class:`~bastion.data.Dataset` or a pair ``(x, y)``.
        threat: an ``LpBall`` (``linf``, ``l2`` or ``l1``) whose domain matches the data's.
        method: one of :data:`METHODS` (see the module docstring for norm support).
        radius: also compute the certified radius by bisection (stored as the record's ``certified``); without
            it ``certified`` is ``threat.eps`` for certified samples and None for the others. On by default here,
            in :func:`~bastion.verify.assess.assess` and on the command line (``--no-radius`` to skip); the
            bisection costs about 4-60 bound computations' time (IBP at the low end, CROWN on a CNN at the high).
        batch_size: samples per bound computation and per store transaction.
        store: a :class:`~bastion.store.Store` or a path; records are written batch by batch and an interrupted
            run resumes with the samples not yet done.
        progress: show a progress bar.
        tolerance: relative tolerance of the radius bisection.
        max_steps: cap on bisection steps.
        options: bound-method hyperparameters (:class:`~bastion.verify.bounds.BoundOptions`).
        config: extra JSON-able information stored with the run.

    Returns:
        A :class:`CertifyResult`. Status per sample: ``robust`` when certified at ``threat.eps``, ``falsified``
        (distance 0) for a clean misclassification, ``unknown`` otherwise.

    Raises:
        InputError: on bad arguments, a domain mismatch or an operator the IR does not support.
    """
    t_start = time.perf_counter()
    if not isinstance(model, nn.Module):
        raise InputError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    data = as_dataset(data)
    threat = _check_threat(threat)
    name = check_method(method)
    if threat.domain != data.domain:
        raise InputError(f"threat {threat!r} has domain {threat.domain} but the data's domain is {data.domain}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise InputError(f"batch_size must be a positive integer, got {batch_size!r}")
    if not 0 < tolerance < 1:
        raise InputError(f"tolerance must be in (0, 1), got {tolerance}")
    opts = options if options is not None else BoundOptions()
    n = len(data)
    net = as_network(model, data.feature_shape)
    device = model_device(model)
    payload = {
        "threat": threat.key, "method": name, "radius": bool(radius), "tolerance": tolerance, "max_steps": max_steps,
        "options": vars(opts),
    }  # fmt: skip
    with resumable_run(
        store, kind="certify", payload=payload, fingerprints=lambda: (model_fingerprint(model), data.fingerprint()),
        n_samples=n, threats=[threat.key], config={"batch_size": batch_size, **(config or {})},
    ) as run:  # fmt: skip
        with eval_mode(model):
            for idx, xb, yb in run.batches(data, batch_size, desc=f"certify ({name})", progress=progress):
                run.write(
                    _certify_batch(
                        model, net, xb.to(device), yb.to(device), idx, threat, name, radius, tolerance, max_steps, opts
                    )
                )
        return run.finish(summarize_certify(run.records(threat.key), n, threat.key, name, radius), started=t_start)


def _certify_batch(
    model: nn.Module,
    net: Network,
    x: Tensor,
    y: Tensor,
    idx: Tensor,
    threat: LpBall,
    method: str,
    radius: bool,
    tolerance: float,
    max_steps: int,
    options: BoundOptions,
) -> list[SampleRecord]:
    t0 = time.perf_counter()
    with torch.no_grad():
        logits = model(x)
    check_logits(logits, x.shape[0])
    pred = logits.argmax(1)
    correct = pred == y
    n = x.shape[0]
    cert = torch.zeros(n, dtype=torch.bool, device=x.device)
    sel = correct.nonzero().squeeze(1)
    if sel.numel():
        with torch.no_grad():
            lb = margin_bounds(net, x[sel], y[sel], threat, method=method, options=options)
        cert[sel] = (lb > 0).all(1)
    radii: list[float] | None = None
    if radius:
        r = torch.zeros(n, dtype=x.dtype, device=x.device)
        if sel.numel():
            r[sel] = certified_radius(
                net, x[sel], y[sel], threat, method=method, tolerance=tolerance, max_steps=max_steps,
                options=options, known=cert[sel],
            )  # fmt: skip
        radii = r.tolist()
    share = (time.perf_counter() - t0) / max(n, 1)
    out = []
    for j in range(n):
        ok, c = bool(correct[j]), bool(cert[j])
        certified: float | None
        if not ok:
            certified = 0.0
        elif radii is not None:
            # the radius probe at eps equals the status computation, so a certified sample has radius >= eps
            certified = max(radii[j], threat.eps) if c else radii[j]
        else:
            certified = threat.eps if c else None
        out.append(
            SampleRecord(
                index=int(idx[j]), threat=threat.key, label=int(y[j]), clean_pred=int(pred[j]),
                status="robust" if c else ("falsified" if not ok else "unknown"),
                adv_distance=0.0 if not ok else None, certified=certified,
                attack=method if c else (CLEAN if not ok else None), seconds=share,
            )
        )  # fmt: skip
    return out
