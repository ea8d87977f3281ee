"""Complete verification by branch and bound (BaB) over ReLU splits or input splits, with early falsification.

A property "no ``x`` in the box has ``A f(x) <= b``" (one unsafe conjunction) is decided by splitting the problem
into sub-domains until every sub-domain is proven safe by a sound bound or a concrete counterexample is found:

* **bounding** -- each sub-domain gets a lower bound of every row's margin ``A_i f(x) - b_i`` from CROWN (Zhang et
  al., NeurIPS 2018) or alpha-CROWN (Xu et al., ICLR 2021) through :func:`~bastion.verify.bounds.compute_bounds`,
  hundreds of sub-domains per call; a sub-domain is safe when some row's lower bound is above 0 (that row of the
  conjunction cannot hold there). A child keeps the better of its own bound and its parent's.
* **ReLU splitting** (Bunel, Lu, Turkaslan, Torr, Kohli, Kumar, "Branch and Bound for Piecewise Linear Neural
  Network Verification", JMLR 2020): a sub-domain is a set of split decisions (``z >= 0`` or ``z <= 0`` for some
  pre-activations), bounded with ``compute_bounds(..., splits=..., intermediate=parent's bounds)``. The neuron to
  split is chosen by a BaBSR-style score: the back-substituted coefficient ``a`` of the neuron's output in the
  bound being improved, times the intercept of its upper relaxation, ``max(-a, 0) * (1 - s) * (-l u) / (u - l)``
  (the amount the relaxation costs the bound; ``s`` the LeakyReLU slope), with ``|a| * min(u, -l)`` as the backup
  score where every intercept term is 0. By default (``branching="fsb"``) that choice is refined by filtered smart
  branching (De Palma, Bunel, Desmaison, Dvijotham, Kohli, Torr, Kumar, "Improved Branch and Bound for Neural
  Network Verification via Lagrangian Decomposition", 2021): the ``FSB_CANDIDATES`` best neurons of that score and
  of Bunel et al.'s full BaBSR estimate (with the pre-activation bias term) are each bounded cheaply -- both
  children by one back-substitution with the parent's slopes, multipliers and intermediate bounds, the candidate's
  bounds clamped by the split, all candidates of all domains in one batch -- and the neuron whose children leave
  the least violation, ``min(l+, 0) + min(l-, 0)``, is split. The paper (and alpha-beta-CROWN) keep the neuron
  whose worse child is best; the sum also credits a split that proves one child outright (that child leaves the
  search at once) and counts the violation of both children. The BaBSR choice is always a candidate and wins
  ties, so FSB never picks a neuron its own evaluation rates below BaBSR's (``branching="babsr"`` keeps the score
  alone). A sub-domain in which no neuron is unstable any more is a linear program, solved exactly by
  :func:`~bastion.verify.milp.milp_verify` (the split constraints are then enforced exactly, which bound
  propagation alone does not do), so the search is complete.
  As in beta-CROWN (Wang et al., NeurIPS 2021) a child takes its parent's intermediate bounds (clamped by the new
  split) rather than recomputing them, the split constraints enter its final bound through beta multipliers, and
  its slopes and multipliers are warm-started from the parent's optimised values (a few Adam steps per child
  instead of a cold start). (On the mnistfc 256x2 network the warm start and the inherited bounds split more than
  ten times as many sub-domains per second: recomputing the children's intermediate bounds had taken half of the
  time.) Since every sub-domain inherits the root's intermediate bounds, the root's alpha-CROWN optimises the
  slopes behind them too (``optimize_intermediate=True``, as alpha-beta-CROWN does): :func:`verify` does that once
  per input region for the rows of all its disjuncts together, and every disjunct starts from those bounds (on the
  mnistfc 256x4 network at l-inf 0.05 it left 9 % fewer unstable ReLUs and raised the root bounds by 1.3 to 1.8,
  proving two of the nine labels outright, for 1.2 s).
* **Input splitting** for low-dimensional inputs (ReluVal/Neurify style, Wang et al., USENIX Security 2018 and
  NeurIPS 2018): a sub-domain is a sub-box, halved along the input dimension with the largest *smear* ``|df/dx_j|
  * width_j`` (the gradient of the row being proven, at the box centre), so dimensions that matter most are split
  first.
* **search order** -- best first: each iteration takes the ``batch_size`` sub-domains with the lowest bound (the
  hardest, and the likeliest to hold a counterexample), splits them and bounds all children in one batch.
* **falsification** -- PGD (Madry et al., ICLR 2018) adapted to boxes (signed steps scaled by each coordinate's
  width, random restarts) minimising the violation margin ``max_i (A_i f(x) - b_i)``, on the root and, during input
  splitting, on the most promising sub-boxes; the centres of all new sub-boxes are checked too.

Every counterexample is re-executed before it is reported: in float64 on the verification IR, then on the original
model (in its own dtype, the point rounded to that dtype and kept inside the box) and on onnxruntime when an ONNX
file is known. A point that fails any of these checks is not reported. ``verified`` is only returned when every
sub-domain has a sound bound above 0; the search stops with ``timeout`` (time budget) or ``unknown`` (domain cap).
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from bastion.errors import InputError
from bastion.verify.bounds import BoundOptions, compute_bounds
from bastion.verify.ibp import apply_constraints
from bastion.verify.ir import Network, as_network
from bastion.verify.milp import milp_verify
from bastion.verify.ops import LeakyReLUOp, MaxPool2dOp
from bastion.verify.result import Verdict
from bastion.verify.spec import Spec

__all__ = ["BRANCHINGS", "METHODS", "verify", "verify_box"]

#: Values of ``method``.
METHODS = ("auto", "input", "relu", "milp", "bounds")
#: Values of ``branching`` (how ReLU splitting picks the neuron to split).
BRANCHINGS = ("fsb", "babsr")

Checker = Callable[[Tensor], Tensor]
BoundsT = tuple[Tensor, Tensor]
_Root = tuple[Tensor, Tensor, dict[str, BoundsT]]

#: ReLU splitting hands a sub-domain to the exact MILP once at most this many of its ReLUs are unstable.
_LEAF_RELUS = 4


@dataclass
class _Settings:
    batch_size: int
    max_domains: int
    bound_method: str
    root_method: str
    input_split_threshold: int
    milp_threshold: int
    attack_restarts: int
    attack_steps: int
    alpha_steps: int
    beta_steps: int
    seed: int
    branching: str = "fsb"
    optimize_intermediate: bool = True


@dataclass
class _Conj:
    """One unsafe conjunction ``A f(x) <= b`` over one input box, with everything needed to decide it."""

    net: Network  # in the working dtype/device
    lower: Tensor  # (1, *input_shape)
    upper: Tensor
    A: Tensor  # (k, K)
    b: Tensor  # (k,)
    checkers: list[tuple[str, Checker, torch.dtype]] = field(default_factory=list)
    # pre-activation bounds already known sound on the box (shared by every conjunction of a region), or None
    pre: dict[str, BoundsT] | None = None

    def margin(self, y: Tensor) -> Tensor:
        """``max_i (A_i y - b_i)`` per row of ``y`` (N, K): <= 0 means ``y`` is unsafe."""
        return (y.reshape(y.shape[0], -1) @ self.A.T - self.b).amax(dim=1)


class _Clock:
    def __init__(self, timeout: float) -> None:
        self.start = time.perf_counter()
        self.deadline = self.start + timeout

    def left(self) -> float:
        return self.deadline - time.perf_counter()

    def out(self, step: float = 0.0) -> bool:
        """Whether the budget is spent, or would be by one more step of ``step`` seconds (stop before overrunning)."""
        return time.perf_counter() + step >= self.deadline

    def elapsed(self) -> float:
        return time.perf_counter() - self.start


# ------------------------------------------------------------------------------------------------ re-execution


def _round_into_box(x: Tensor, lower: Tensor, upper: Tensor, dtype: torch.dtype) -> Tensor:
    """``x`` in ``dtype``, nudged by one ulp where rounding took it outside the (float64) box."""
    xr = x.to(dtype)
    lo, hi = lower.to(torch.float64), upper.to(torch.float64)
    for _ in range(2):
        below = xr.double() < lo
        above = xr.double() > hi
        if not bool(below.any() or above.any()):
            break
        xr = torch.where(below, torch.nextafter(xr, torch.full_like(xr, math.inf)), xr)
        xr = torch.where(above, torch.nextafter(xr, torch.full_like(xr, -math.inf)), xr)
    return xr


def _confirm(conj: _Conj, xs: Tensor, margins: Tensor) -> tuple[Tensor, Tensor] | None:
    """The first candidate (best margin first) that re-executes to a violation everywhere, with its output."""
    order = margins.argsort()
    lo64, hi64 = conj.lower[0].double(), conj.upper[0].double()
    a64, b64 = conj.A.double(), conj.b.double()
    for i in order[:8].tolist():
        if float(margins[i]) > 0:
            break
        x = xs[i].detach()
        out: Tensor | None = None
        ok = True
        for _name, fn, dtype in conj.checkers:
            xc = _round_into_box(x, lo64, hi64, dtype)
            if not bool(((xc.double() >= lo64) & (xc.double() <= hi64)).all()):
                ok = False
                break
            with torch.no_grad():
                y = fn(xc.unsqueeze(0)).reshape(1, -1).double()
            if not bool(torch.isfinite(y).all()) or not bool((y[0].to(a64.device) @ a64.T <= b64).all()):
                ok = False
                break
            x, out = xc, y[0]
        if ok and out is not None:
            return x, out
    return None


def _make_checkers(
    model: nn.Module | Network, net64: Network, onnx_path: str | os.PathLike[str] | None
) -> list[tuple[str, Checker, torch.dtype]]:
    """Re-execution targets: the IR in float64, then the original model, then onnxruntime."""
    checks: list[tuple[str, Checker, torch.dtype]] = [("ir-float64", net64.forward, torch.float64)]
    if isinstance(model, nn.Module):
        param = next(iter(model.parameters()), None)
        dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32
        device = param.device if param is not None else torch.device("cpu")

        def run_model(x: Tensor) -> Tensor:
            was = model.training
            model.eval()
            try:
                return model(x.to(device))
            finally:
                model.train(was)

        checks.append(("model", run_model, dtype))
    elif isinstance(model, Network) and model is not net64:
        found = _dtype_of(model)
        checks.append(("network", model.forward, found))
    path = onnx_path if onnx_path is not None else getattr(model, "onnx_path", None)
    if path is not None:
        from bastion.models.onnx import OnnxRuntimeModel

        ort = OnnxRuntimeModel(path)
        checks.append(("onnxruntime", ort, torch.float32))
    return checks


def _dtype_of(net: Network) -> torch.dtype:
    for node in net.nodes.values():
        for v in vars(node.op).values():
            if isinstance(v, Tensor) and v.is_floating_point():
                return v.dtype
    return torch.float32


def _device_of(net: Network) -> torch.device:
    for node in net.nodes.values():
        for v in vars(node.op).values():
            if isinstance(v, Tensor):
                return v.device
    return torch.device("cpu")


# ------------------------------------------------------------------------------------------------ falsification


def _pgd(
    conj: _Conj, lo: Tensor, hi: Tensor, *, restarts: int, steps: int, gen: torch.Generator
) -> tuple[Tensor, Tensor]:
    """Box PGD minimising the violation margin in each box ``(D, *shape)``; returns the best point and margin."""
    d = lo.shape[0]
    shape = lo.shape[1:]
    lo_r = lo.unsqueeze(0).expand(restarts, *lo.shape).reshape(restarts * d, *shape)
    hi_r = hi.unsqueeze(0).expand(restarts, *hi.shape).reshape(restarts * d, *shape)
    width = hi_r - lo_r
    u = torch.rand(lo_r.shape, generator=gen, dtype=torch.float64).to(lo_r)
    x = lo_r + width * u
    x[:d] = (lo + hi) / 2  # the first "restart" starts at the centre
    best_x, best_m = x.detach().clone(), torch.full((x.shape[0],), math.inf, dtype=lo.dtype, device=lo.device)
    for t in range(steps + 1):
        x = x.detach().requires_grad_(True)
        with torch.enable_grad():
            m = conj.margin(conj.net.forward(x))
            grad = torch.autograd.grad(m.sum(), x)[0] if t < steps else None
        with torch.no_grad():
            better = m < best_m
            best_m = torch.where(better, m.detach(), best_m)
            best_x[better] = x.detach()[better]
            if grad is None:
                break
            # Step length decays linearly from a quarter of the box width (large moves first, then refinement).
            step = 0.25 * (1 - t / steps) + 0.01
            x = torch.minimum(torch.maximum(x - step * width * grad.sign(), lo_r), hi_r)
    best_m = best_m.reshape(restarts, d)
    idx = best_m.argmin(0)
    bx = best_x.reshape(restarts, d, *shape)[idx, torch.arange(d)]
    return bx, best_m[idx, torch.arange(d)]


def _attack(
    conj: _Conj, lo: Tensor, hi: Tensor, settings: _Settings, gen: torch.Generator, restarts: int | None = None
) -> tuple[Tensor, Tensor] | None:
    if settings.attack_steps <= 0 or settings.attack_restarts <= 0:
        return None
    xs, ms = _pgd(conj, lo, hi, restarts=restarts or settings.attack_restarts, steps=settings.attack_steps, gen=gen)
    if bool((ms <= 0).any()):
        return _confirm(conj, xs, ms)
    return None


# ------------------------------------------------------------------------------------------------ bounding


def _bound(
    conj: _Conj,
    lo: Tensor,
    hi: Tensor,
    method: str,
    settings: _Settings,
    *,
    splits: dict[str, Tensor] | None = None,
    intermediate: dict[str, BoundsT] | None = None,
    reuse: bool = False,
    optimize_intermediate: bool = False,
) -> tuple[Tensor, Tensor, dict[str, BoundsT]]:
    """Per domain: the margin lower bound ``max_i (lb_i - b_i)``, the best row, and the pre-activation bounds.

    ``reuse`` takes ``intermediate`` as it is (with the splits applied) instead of recomputing and intersecting.
    """
    opts = BoundOptions(
        method=method,
        alpha_steps=settings.alpha_steps,
        bound_upper=False,
        monotone_splits=False,
        reuse_intermediate=reuse,
        alpha_intermediate=optimize_intermediate,
    )
    res = compute_bounds(conj.net, lo, hi, C=conj.A, options=opts, splits=splits, intermediate=intermediate)
    per_row = res.lower - conj.b
    best, row = per_row.max(dim=1)
    return best, row, res.intermediate


# ------------------------------------------------------------------------------------------------ input splitting


def _smear_dims(conj: _Conj, lo: Tensor, hi: Tensor, rows: Tensor) -> Tensor:
    """Per box, the input dimension with the largest ``|d(A_row f)/dx_j| * width_j`` at the centre."""
    centre = ((lo + hi) / 2).detach().requires_grad_(True)
    with torch.enable_grad():
        y = conj.net.forward(centre).reshape(centre.shape[0], -1)
        obj = (y * conj.A[rows]).sum()
        grad = torch.autograd.grad(obj, centre)[0]
    width = (hi - lo).reshape(lo.shape[0], -1)
    # The small width term breaks ties (zero gradients, e.g. dead neurons at the centre) towards the widest side.
    score = grad.reshape(lo.shape[0], -1).abs() * width + 1e-6 * width / width.amax(1, keepdim=True).clamp(min=1e-30)
    return score.argmax(1)


def _halve(flo: Tensor, fhi: Tensor, dim: Tensor) -> tuple[Tensor, Tensor]:
    """Flat boxes ``(D, n)`` halved along ``dim`` ``(D,)``: lower halves first, then upper halves."""
    ar = torch.arange(flo.shape[0], device=flo.device)
    mid = (flo[ar, dim] + fhi[ar, dim]) / 2
    left_hi, right_lo = fhi.clone(), flo.clone()
    left_hi[ar, dim] = mid
    right_lo[ar, dim] = mid
    return torch.cat([flo, right_lo]), torch.cat([left_hi, fhi])


def _bab_input(conj: _Conj, settings: _Settings, clock: _Clock, gen: torch.Generator, root: _Root) -> Verdict:
    lb, row, _ = root
    if float(lb[0]) > 0:
        return Verdict("verified", None, None, float(lb[0]), clock.elapsed(), settings.root_method, 1)
    pool_lo, pool_hi, pool_lb, pool_row = conj.lower, conj.upper, lb, row
    proven = math.inf  # lowest bound among sub-boxes proven safe
    domains, iteration = 1, 0
    n_in = conj.lower[0].numel()
    last_round, round_start = 0.0, time.perf_counter()
    while True:
        last_round = time.perf_counter() - round_start
        if pool_lb.numel() == 0:
            return Verdict("verified", None, None, proven, clock.elapsed(), "bab-input", domains)
        worst = min(proven, float(pool_lb.min()))
        # the next round takes about as long as the last one: stop now rather than overrun the budget
        if clock.out(step=last_round):
            return Verdict("timeout", None, None, worst, clock.elapsed(), "bab-input", domains)
        round_start = time.perf_counter()
        if pool_lb.numel() > settings.max_domains:
            return Verdict("unknown", None, None, worst, clock.elapsed(), "bab-input", domains)
        iteration += 1
        take = min(settings.batch_size, pool_lb.numel())
        order = pool_lb.argsort()
        sel, rest = order[:take], order[take:]
        lo, hi, plb, prow = pool_lo[sel], pool_hi[sel], pool_lb[sel], pool_row[sel]
        pool_lo, pool_hi, pool_lb, pool_row = pool_lo[rest], pool_hi[rest], pool_lb[rest], pool_row[rest]
        flo, fhi = lo.reshape(take, n_in), hi.reshape(take, n_in)
        # (A strong-branching rule, trying every dimension and keeping the split whose worse half bounds best,
        # needed more sub-boxes and 3-14x more time than the smear on the test networks, so the smear it is.)
        clo, chi = _halve(flo, fhi, _smear_dims(conj, lo, hi, prow))
        clo, chi = clo.reshape(2 * take, *lo.shape[1:]), chi.reshape(2 * take, *lo.shape[1:])
        clb, crow, _ = _bound(conj, clo, chi, settings.bound_method, settings)
        # The centres of the new boxes are free candidate counterexamples.
        with torch.no_grad():
            centres = (clo + chi) / 2
            cm = conj.margin(conj.net.forward(centres))
        if bool((cm <= 0).any()):
            found = _confirm(conj, centres, cm)
            if found is not None:
                return Verdict("falsified", found[0], found[1], None, clock.elapsed(), "bab-input", domains)
        clb = torch.maximum(clb, plb.repeat(2))
        domains += 2 * take
        safe = clb > 0
        if bool(safe.any()):
            proven = min(proven, float(clb[safe].min()))
        keep = ~safe
        if iteration % 4 == 0 and bool(keep.any()):
            # PGD on the most promising sub-boxes (lowest bounds).
            k = min(16, int(keep.sum()))
            cand = clb.masked_fill(~keep, math.inf).argsort()[:k]
            found = _attack(conj, clo[cand], chi[cand], settings, gen, restarts=4)
            if found is not None:
                return Verdict("falsified", found[0], found[1], None, clock.elapsed(), "bab-input", domains)
        pool_lo = torch.cat([pool_lo, clo[keep]])
        pool_hi = torch.cat([pool_hi, chi[keep]])
        pool_lb = torch.cat([pool_lb, clb[keep]])
        pool_row = torch.cat([pool_row, crow[keep]])


# ------------------------------------------------------------------------------------------------ ReLU splitting


def _relu_coefficients(net: Network, A: Tensor, lower: Tensor, upper: Tensor, pre: dict[str, BoundsT]) -> dict:
    """Back-substitute ``A`` ``(N, 1, K)`` with CROWN's relaxations; return the coefficient on every ReLU output."""
    order = list(net.nodes)
    acc: dict[str, Tensor] = {net.output_name: A.reshape(A.shape[0], A.shape[1], *net.output_shape)}
    coeffs: dict[str, Tensor] = {}
    for name in reversed(order):
        a = acc.pop(name, None)
        if a is None or name == net.input_name:
            continue
        node = net.nodes[name]
        if isinstance(node.op, LeakyReLUOp):
            coeffs[name] = a[:, 0]
        if node.op.linear:
            back, _ = node.op.backward(a)  # type: ignore[attr-defined]
        else:
            a_in, _ = node.op.backward_bound(a, *pre[name])  # type: ignore[attr-defined]
            back = [a_in]
        for inp, ai in zip(node.inputs, back):
            acc[inp] = acc[inp] + ai if inp in acc else ai
    return coeffs


def _pre_bias(net: Network, name: str) -> Tensor | None:
    """The constant term of the affine node feeding ReLU ``name`` (its output at input 0), or None."""
    node = net.nodes[net.nodes[name].inputs[0]]
    if not node.op.linear or len(node.inputs) != 1:
        return None
    zero = torch.zeros(1, *net.nodes[node.inputs[0]].shape, dtype=_dtype_of(net), device=_device_of(net))
    return node.op.forward(zero).reshape(-1)


def _branch_scores(
    conj: _Conj, relus: list[str], pre: dict[str, BoundsT], rows: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """Per domain and neuron (flat over the ReLU layers, -1 on stable neurons): the intercept score (the backup
    score in domains where every intercept score is 0), the full BaBSR score with the bias term, and the
    has-candidate mask."""
    n = rows.shape[0]
    lo = conj.lower.expand(n, *conj.lower.shape[1:])
    hi = conj.upper.expand(n, *conj.upper.shape[1:])
    with torch.no_grad():
        coeffs = _relu_coefficients(conj.net, conj.A[rows].unsqueeze(1), lo, hi, pre)
    scores, backups, full = [], [], []
    for name in relus:
        l, u = (t.reshape(n, -1) for t in pre[name])
        a = coeffs[name].reshape(n, -1)
        slope = float(conj.net.nodes[name].op.slope)  # type: ignore[attr-defined]
        unstable = (l < 0) & (u > 0)
        width = (u - l).clamp(min=1e-30)
        intercept = (1 - slope) * (-l * u) / width
        s = torch.where(unstable, a.clamp(max=0).neg() * intercept, torch.full_like(a, -1.0))
        bk = torch.where(unstable, a.abs() * torch.minimum(u, -l) + 1e-12 * width, torch.full_like(a, -1.0))
        # Bunel et al.'s BaBSR estimate (as alpha-beta-CROWN computes it): the change of the bound's constant term
        # when the chord (slope r) is replaced by either side of the split, for the bias c of the pre-activation.
        bias = _pre_bias(conj.net, name)
        r = (u - slope * l) / width
        ab = a * bias if bias is not None else torch.zeros_like(a)
        est = (torch.minimum(ab * (r - 1), ab * r) - s).abs()
        scores.append(s)
        backups.append(bk)
        full.append(torch.where(unstable, est, torch.full_like(a, -1.0)))
    s_all, b_all = torch.cat(scores, 1), torch.cat(backups, 1)
    primary = torch.where((s_all.amax(1) > 0).unsqueeze(1), s_all, b_all)
    return primary, torch.cat(full, 1), b_all.amax(1) >= 0


def _locate(pre: dict[str, BoundsT], relus: list[str], flat: Tensor) -> tuple[Tensor, Tensor]:
    """Flat neuron indices over the ReLU layers -> (layer index, index within the layer)."""
    sizes = torch.tensor([pre[r][0][0].numel() for r in relus], device=flat.device)
    ends = sizes.cumsum(0)
    layer = torch.searchsorted(ends, flat, right=True)
    offset = flat - (ends - sizes)[layer.clamp(max=len(relus) - 1)]
    return layer, offset


def _branch(conj: _Conj, relus: list[str], pre: dict[str, BoundsT], rows: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """BaBSR-style choice per domain: (layer index, flat neuron index, has-candidate mask)."""
    primary, _, has = _branch_scores(conj, relus, pre, rows)
    layer, offset = _locate(pre, relus, primary.argmax(1))
    return layer, offset, has


def _beta_backsub(
    conj: _Conj,
    n: int,
    pre: dict[str, BoundsT],
    splits: dict[str, Tensor],
    alphas: dict[str, Tensor],
    betas: dict[str, Tensor],
) -> Tensor:
    """Lower bounds ``(n, k)`` of ``A f(x)`` on each split domain: CROWN plus the split constraints' Lagrangian.

    On a domain where split neuron ``j`` has ``s_j z_j >= 0`` (``s = +1`` active, ``-1`` inactive), ``-beta_j s_j
    z_j <= 0`` for every ``beta_j >= 0``, so adding it to a lower bound keeps it a lower bound there; back-substituted
    like any other coefficient, it lets the bound use the split constraints on the layers below (Wang, Zhang, Xu,
    Lin, Jana, Hsieh, Kolter, "Beta-CROWN", NeurIPS 2021).
    """
    net = conj.net
    A = conj.A.unsqueeze(0).expand(n, *conj.A.shape).reshape(n, conj.A.shape[0], *net.output_shape)
    lo_in = conj.lower.expand(n, *conj.lower.shape[1:]).unsqueeze(1)
    hi_in = conj.upper.expand(n, *conj.upper.shape[1:]).unsqueeze(1)
    acc: dict[str, Tensor] = {net.output_name: A}
    bias = A.new_zeros(A.shape[:2])
    for name in reversed(list(net.nodes)):
        a = acc.pop(name, None)
        if a is None:
            continue
        node = net.nodes[name]
        if name == net.input_name:
            bias = bias + (a.clamp(min=0) * lo_in + a.clamp(max=0) * hi_in).flatten(2).sum(-1)
            continue
        if node.op.linear:
            back, b = node.op.backward(a)  # type: ignore[attr-defined]
        else:
            lo_n, hi_n = pre[name]
            a_in, b = node.op.backward_bound(a, lo_n, hi_n, alpha=alphas.get(name))  # type: ignore[attr-defined]
            if name in betas:
                a_in = a_in - splits[name].unsqueeze(1).to(a_in) * betas[name]
            back = [a_in]
        bias = bias + b
        for inp, ai in zip(node.inputs, back):
            acc[inp] = acc[inp] + ai if inp in acc else ai
    return bias


Params = dict[str, Tensor]


def _crown_alphas(conj: _Conj, pre: dict[str, BoundsT]) -> Params:
    """CROWN's adaptive lower slopes per ReLU ``(n, k, *shape)``: the top of the range when ``u > -l``."""
    k = conj.b.numel()
    out: Params = {}
    for name, node in conj.net.nodes.items():
        if isinstance(node.op, LeakyReLUOp):
            lo, hi = pre[name]
            a_min, a_max = node.op.alpha_bounds()
            init = torch.where(hi > -lo, torch.full_like(lo, a_max), torch.full_like(lo, a_min))
            out[name] = init.unsqueeze(1).expand(init.shape[0], k, *init.shape[1:])
    return out


def _beta_crown(
    conj: _Conj,
    pre: dict[str, BoundsT],
    splits: dict[str, Tensor],
    steps: int,
    init: tuple[Params, Params] | None = None,
) -> tuple[Tensor, Tensor, Params, Params]:
    """Margin lower bounds ``max_i (lb_i - b_i)`` and best rows on split domains, optimising slopes and multipliers.

    Joint projected Adam ascent (Kingma & Ba, ICLR 2015) on the alpha slopes (Xu et al., ICLR 2021) and the beta
    multipliers (Wang et al., NeurIPS 2021), learning rates 0.1 and 0.3. ``init`` warm-starts both from given values
    ``(alphas, betas)``, per ReLU ``(n, k, *shape)`` (a child starts from its parent's optimised values, as in
    beta-CROWN; the multiplier of the neuron just split is 0 there); without it the slopes start at CROWN's choice
    and the multipliers at 0. Any slope in its range and any multiplier >= 0 gives a sound bound, so the warm start
    (projected onto the ranges first) changes how fast the ascent gets somewhere, never soundness. (beta-CROWN uses
    learning rate 0.05 for beta with its warm start; 0.3 reached the same bounds in fewer steps on the test
    networks.) The best bound seen per row is kept, so the result is never looser than the bound at the starting
    point; the ascent stops early once every domain is proven safe. Returns the bounds, the rows and the final
    slopes and multipliers (detached) for the children to start from. (Adam is written out: the first import of
    ``torch.optim`` costs seconds, as in :mod:`bastion.verify.alpha_crown`.)
    """
    n, k = next(iter(splits.values())).shape[0], conj.b.numel()
    dtype = conj.b.dtype
    start_alpha = init[0] if init is not None else _crown_alphas(conj, pre)
    alphas: Params = {}
    betas: Params = {}
    ranges: dict[str, tuple[float, float]] = {}
    for name, node in conj.net.nodes.items():
        if not isinstance(node.op, LeakyReLUOp):
            continue
        a_min, a_max = node.op.alpha_bounds()
        ranges[name] = (a_min, a_max)
        alphas[name] = start_alpha[name].to(dtype).clamp(a_min, a_max).clone().requires_grad_(True)
        if init is not None and name in init[1]:
            bt = init[1][name].to(dtype).clamp(min=0) * (splits[name] != 0).unsqueeze(1)
        else:
            bt = pre[name][0].new_zeros(n, k, *pre[name][0].shape[1:])
        betas[name] = bt.clone().requires_grad_(True)
    split_any = any(bool((splits[nm] != 0).any()) for nm in betas)
    best = torch.full((n, k), -math.inf, dtype=dtype, device=conj.b.device)
    params = [(a, ranges[nm], 0.1) for nm, a in alphas.items()] + [(b, (0.0, math.inf), 0.3) for b in betas.values()]
    moments = [(torch.zeros_like(p), torch.zeros_like(p)) for p, _, _ in params]
    beta1, beta2, eps = 0.9, 0.999, 1e-8
    with torch.enable_grad():
        for t in range(steps + 1):
            lb = _beta_backsub(conj, n, pre, splits, alphas, betas)
            with torch.no_grad():
                best = torch.maximum(best, lb)
            if t == steps or not split_any or bool(((best - conj.b).amax(1) > 0).all()):
                break
            grads = torch.autograd.grad(lb.sum(), [p for p, _, _ in params], allow_unused=True)
            with torch.no_grad():
                for (p, rng, lr), (m1, m2), g in zip(params, moments, grads):
                    if g is None:
                        continue
                    m1.mul_(beta1).add_(g, alpha=1 - beta1)
                    m2.mul_(beta2).addcmul_(g, g, value=1 - beta2)
                    denom = (m2 / (1 - beta2 ** (t + 1))).sqrt_().add_(eps)
                    p.add_(lr * (m1 / (1 - beta1 ** (t + 1))) / denom).clamp_(*rng)
    lbest, row = (best.detach() - conj.b).max(dim=1)
    return lbest, row, {k_: v.detach() for k_, v in alphas.items()}, {k_: v.detach() for k_, v in betas.items()}


def _set_split(splits: dict[str, Tensor], relus: list[str], layer: Tensor, offset: Tensor, sign: Tensor) -> None:
    """In place: domain ``i``'s neuron ``offset[i]`` of ReLU layer ``layer[i]`` gets the split decision ``sign[i]``
    (+1 active, -1 inactive)."""
    n = layer.numel()
    ar = torch.arange(n, device=layer.device)
    for li, name in enumerate(relus):
        hit = layer == li
        if bool(hit.any()):
            flat = splits[name].reshape(n, -1)
            flat[ar[hit], offset[hit]] = sign[hit].to(flat.dtype)


def _fsb_evaluate(
    conj: _Conj,
    relus: list[str],
    pre: dict[str, BoundsT],
    splits: dict[str, Tensor],
    alphas: Params,
    betas: Params,
    dom: Tensor,
    flat: Tensor,
) -> tuple[Tensor, Tensor]:
    """The cheap bound of FSB: per (domain ``dom[p]``, candidate neuron ``flat[p]``) pair, the margin bounds of its
    active and its inactive child, each one :func:`_beta_backsub` with the parent's slopes and multipliers and the
    parent's intermediate bounds, the candidate's clamped by the split (no optimisation step). All pairs in one
    batched call, chunked at ``_FSB_CHUNK`` children."""
    act: list[Tensor] = []
    ina: list[Tensor] = []
    dtype = conj.b.dtype
    for start in range(0, dom.numel(), _FSB_CHUNK // 2):
        d, f = dom[start : start + _FSB_CHUNK // 2], flat[start : start + _FSB_CHUNK // 2]
        m = d.numel()
        dd = torch.cat([d, d])
        layer, offset = _locate(pre, relus, f)
        sign = torch.cat([torch.ones(m), -torch.ones(m)]).to(conj.lower.device)
        new = {k: torch.zeros_like(v[dd]) for k, v in splits.items()}
        _set_split(new, relus, layer.repeat(2), offset.repeat(2), sign)
        given = {k: (lo[dd], hi[dd]) for k, (lo, hi) in pre.items()}
        c_pre = {k: apply_constraints(k, None, given=given, splits=new) for k in pre}
        c_alpha = {k: v[dd].to(dtype) for k, v in alphas.items()}
        c_beta = {k: v[dd].to(dtype).clamp(min=0) for k, v in betas.items()}
        c_split = {k: v[dd] for k, v in splits.items()}
        lb = (_beta_backsub(conj, 2 * m, c_pre, c_split, c_alpha, c_beta) - conj.b).amax(1)
        act.append(lb[:m])
        ina.append(lb[m:])
    return torch.cat(act), torch.cat(ina)


def _fsb_score(active: Tensor, inactive: Tensor) -> Tensor:
    """What FSB maximises: minus the violation left in the two children, ``min(l+, 0) + min(l-, 0)`` (a child
    bounded above 0 leaves none). Not the worse child alone, see the module docstring."""
    return active.clamp(max=0) + inactive.clamp(max=0)


def _branch_fsb(
    conj: _Conj,
    relus: list[str],
    pre: dict[str, BoundsT],
    rows: Tensor,
    splits: dict[str, Tensor],
    alphas: Params,
    betas: Params,
    k: int,
) -> tuple[Tensor, Tensor, Tensor]:
    """Filtered smart branching per domain: (layer index, flat neuron index, has-candidate mask).

    Candidates: the top ``k`` neurons of the intercept score (the first of them the BaBSR-style choice of
    :func:`_branch`) and the top ``k`` of the full BaBSR score; each is bounded by :func:`_fsb_evaluate` and the one
    with the highest :func:`_fsb_score` is split (ties: the earlier candidate, so the BaBSR choice wins a tie, and
    by construction the choice never scores below BaBSR's)."""
    primary, full, has = _branch_scores(conj, relus, pre, rows)
    n, total = primary.shape
    kk = min(k, total)
    top1 = primary.topk(kk, dim=1).indices
    top1[:, 0] = primary.argmax(1)
    cand = torch.cat([top1, full.topk(kk, dim=1).indices], 1)
    valid = torch.cat([primary.gather(1, top1), full.gather(1, cand[:, kk:])], 1) >= 0
    # A neuron that is already a candidate of the domain is bounded once.
    for j in range(1, cand.shape[1]):
        valid[:, j] &= ~(cand[:, j : j + 1] == cand[:, :j]).any(1)
    valid[:, 0] = True  # the BaBSR choice always stands (if stable, ``has`` is False and the domain is a leaf)
    dom, col = valid.nonzero(as_tuple=True)
    score = torch.full(cand.shape, -math.inf, dtype=conj.b.dtype, device=cand.device)
    score[dom, col] = _fsb_score(*_fsb_evaluate(conj, relus, pre, splits, alphas, betas, dom, cand[dom, col]))
    best = score.argmax(1)  # the first maximum
    layer, offset = _locate(pre, relus, cand[torch.arange(n, device=cand.device), best])
    return layer, offset, has


def _leaf(conj: _Conj, splits: dict[str, Tensor], pre: dict[str, BoundsT], i: int, clock: _Clock) -> Verdict:
    """Decide a domain exactly by its MILP (an LP when no ReLU is unstable and there is no max pooling)."""
    return milp_verify(
        conj.net,
        (conj.lower[0], conj.upper[0]),
        conj.A,
        conj.b,
        time_limit=max(clock.left(), 0.05),
        splits={k: v[i] for k, v in splits.items()},
        intermediate={k: (lo[i], hi[i]) for k, (lo, hi) in pre.items()},
        bound_method=None,
    )


def _take(
    pre: dict[str, BoundsT], split: dict[str, Tensor], lb: Tensor, row: Tensor, idx: Tensor
) -> tuple[dict[str, BoundsT], dict[str, Tensor], Tensor, Tensor]:
    """The domains ``idx`` of a batched pool."""
    return (
        {k: (lo[idx], hi[idx]) for k, (lo, hi) in pre.items()},
        {k: v[idx] for k, v in split.items()},
        lb[idx],
        row[idx],
    )


#: Children warm-start beta-CROWN from their parent's slopes and multipliers (False: from CROWN's slopes and 0).
WARM_START = True
#: Children take their parent's intermediate bounds as they are, clamped by the new split (beta-CROWN's choice: the
#: split constraints reach the final bound through the multipliers instead). False: children split in the last ReLU
#: layer do (lossless, see :func:`_bound_children`), the others recompute and intersect them with CROWN.
REUSE_ALL = True
#: Filtered smart branching bounds this many candidates of each of its two scores per domain (alpha-beta-CROWN's
#: ``branching_candidates``).
FSB_CANDIDATES = 3
#: At most this many FSB children are bounded in one batched call.
_FSB_CHUNK = 4096
_PARAM_DTYPE = torch.float32


def _rows(d: dict[str, Tensor], idx: Tensor) -> dict[str, Tensor]:
    return {k: v[idx] for k, v in d.items()}


def _twice(t: Tensor) -> Tensor:
    return t.repeat(2, *([1] * (t.dim() - 1)))


def _bound_children(
    conj: _Conj,
    settings: _Settings,
    relus: list[str],
    splits: dict[str, Tensor],
    parent_pre: dict[str, BoundsT],
    layer: Tensor,
) -> tuple[Tensor, Tensor, dict[str, BoundsT]]:
    """``_bound`` of the children (new split in ReLU layer ``layer`` per child) with their parents' bounds.

    A split in layer ``j`` changes no relaxation below it, so the bounds of layers ``<= j`` recomputed for the
    child equal the parent's (then clamped by the split); only later layers can tighten. A child split in the last
    ReLU layer therefore gains nothing from recomputing its intermediate bounds: those children take the parent's as
    they are (clamped by the split, exactly what recomputing and intersecting would give) and cost one
    back-substitution of the final rows only. The others are recomputed and intersected as before.
    """
    last = layer == len(relus) - 1
    if REUSE_ALL:
        last = torch.ones_like(last)
    groups = [(last.nonzero().reshape(-1), True), ((~last).nonzero().reshape(-1), False)]
    n = layer.numel()
    lb = torch.empty(n, dtype=conj.b.dtype, device=conj.b.device)
    row = torch.empty(n, dtype=torch.int64, device=conj.b.device)
    pre: dict[str, BoundsT] = {k: (lo.clone(), hi.clone()) for k, (lo, hi) in parent_pre.items()}
    for idx, reuse in groups:
        if idx.numel() == 0:
            continue
        g_lo = conj.lower.expand(idx.numel(), *conj.lower.shape[1:])
        g_hi = conj.upper.expand(idx.numel(), *conj.upper.shape[1:])
        g_lb, g_row, g_pre = _bound(
            conj,
            g_lo,
            g_hi,
            settings.bound_method,
            settings,
            splits=_rows(splits, idx),
            intermediate={k: (lo[idx], hi[idx]) for k, (lo, hi) in parent_pre.items()},
            reuse=reuse,
        )
        lb[idx], row[idx] = g_lb, g_row
        for k, (lo, hi) in g_pre.items():
            pre[k][0][idx], pre[k][1][idx] = lo, hi
    return lb, row, pre


def _bab_relu(conj: _Conj, settings: _Settings, clock: _Clock, gen: torch.Generator, root: _Root) -> Verdict:
    relus = [n for n, node in conj.net.nodes.items() if isinstance(node.op, LeakyReLUOp)]
    lb, row, pre = root
    if float(lb[0]) > 0:
        return Verdict("verified", None, None, float(lb[0]), clock.elapsed(), settings.root_method, 1)
    pool_pre = pre
    pool_split = {r: torch.zeros_like(pre[r][0], dtype=torch.int8) for r in relus}
    pool_lb, pool_row = lb, row
    # Each open domain's optimised beta-CROWN slopes and multipliers, the warm start of its children (kept in
    # float32: any value projected onto the valid ranges gives a sound bound, so rounding them costs nothing).
    pool_alpha = {r: v.to(_PARAM_DTYPE) for r, v in _crown_alphas(conj, pre).items()}
    pool_beta = {r: torch.zeros_like(v) for r, v in pool_alpha.items()}
    proven = math.inf
    domains, iteration, unknown_leaves = 1, 0, 0
    last_round, round_start = 0.0, time.perf_counter()
    while True:
        last_round = time.perf_counter() - round_start
        if pool_lb.numel() == 0:
            status = "unknown" if unknown_leaves else "verified"
            return Verdict(status, None, None, proven, clock.elapsed(), "bab-relu", domains)  # type: ignore[arg-type]
        worst = min(proven, float(pool_lb.min()))
        # the next round takes about as long as the last one: stop now rather than overrun the budget
        if clock.out(step=last_round):
            return Verdict("timeout", None, None, worst, clock.elapsed(), "bab-relu", domains)
        round_start = time.perf_counter()
        if pool_lb.numel() > settings.max_domains:
            return Verdict("unknown", None, None, worst, clock.elapsed(), "bab-relu", domains)
        iteration += 1
        take = min(settings.batch_size, pool_lb.numel())
        order = pool_lb.argsort()
        sel, rest = order[:take], order[take:]

        pre_s, split_s, plb, prow = _take(pool_pre, pool_split, pool_lb, pool_row, sel)
        pool_pre, pool_split, pool_lb, pool_row = _take(pool_pre, pool_split, pool_lb, pool_row, rest)
        alpha_s, beta_s = _rows(pool_alpha, sel), _rows(pool_beta, sel)
        pool_alpha, pool_beta = _rows(pool_alpha, rest), _rows(pool_beta, rest)
        if settings.branching == "fsb":
            layer, offset, has = _branch_fsb(conj, relus, pre_s, prow, split_s, alpha_s, beta_s, FSB_CANDIDATES)
        else:
            layer, offset, has = _branch(conj, relus, pre_s, prow)
        # A domain with only a few unstable ReLUs left (none: an LP) is decided exactly by HiGHS rather than split
        # further (its max-pool binaries, which ReLU splitting cannot remove, stay in that MILP).
        has = has & (_binaries(conj.net, pre_s, relu_only=True).to(has.device) > _LEAF_RELUS)
        # Domains with nothing left to split are linear programs: decide them exactly.
        for i in (~has).nonzero().reshape(-1).tolist():
            v = _leaf(conj, split_s, pre_s, i, clock)
            domains += 1
            if v.status == "falsified":
                assert v.counterexample is not None
                found = _confirm(conj, v.counterexample.unsqueeze(0).to(conj.lower), torch.full((1,), -1.0))
                if found is not None:
                    return Verdict("falsified", found[0], found[1], None, clock.elapsed(), "bab-relu+lp", domains)
                unknown_leaves += 1
            elif v.status == "verified":
                proven = min(proven, v.lower_bound if v.lower_bound is not None else math.inf)
            else:
                unknown_leaves += 1
            if clock.out():
                return Verdict("timeout", None, None, worst, clock.elapsed(), "bab-relu", domains)
        go = has.nonzero().reshape(-1)
        m = go.numel()
        if m == 0:
            continue
        pre_g = {k: (lo[go], hi[go]) for k, (lo, hi) in pre_s.items()}
        split_g = {k: v[go] for k, v in split_s.items()}
        layer_g, offset_g, plb_g = layer[go], offset[go], plb[go]
        child_alpha = {k: _twice(v[go]) for k, v in alpha_s.items()}
        child_beta = {k: _twice(v[go]) for k, v in beta_s.items()}
        # Children: first copy active (+1), second inactive (-1).
        child_split = {k: v.repeat(2, *([1] * (v.dim() - 1))) for k, v in split_g.items()}
        child_pre = {k: (lo.repeat(2, *([1] * (lo.dim() - 1))), hi.repeat(2, *([1] * (hi.dim() - 1))))
                     for k, (lo, hi) in pre_g.items()}  # fmt: skip
        sign = torch.cat([torch.ones(m), -torch.ones(m)]).to(torch.int8).to(conj.lower.device)
        _set_split(child_split, relus, layer_g.repeat(2), offset_g.repeat(2), sign)
        clb, crow, cpre = _bound_children(conj, settings, relus, child_split, child_pre, layer_g.repeat(2))
        clb = torch.maximum(clb, plb_g.repeat(2))
        open_ = (clb <= 0).nonzero().reshape(-1)
        if settings.beta_steps > 0 and open_.numel():
            # CROWN alone ignores what a split says about the layers below it; beta-CROWN's multipliers add it.
            # Only children CROWN could not close need it.
            sub_pre = {k: (lo[open_], hi[open_]) for k, (lo, hi) in cpre.items()}
            sub_split = {k: v[open_] for k, v in child_split.items()}
            warm = (_rows(child_alpha, open_), _rows(child_beta, open_)) if WARM_START else None
            blb, brow, b_alpha, b_beta = _beta_crown(conj, sub_pre, sub_split, settings.beta_steps, init=warm)
            better = blb > clb[open_]
            clb[open_] = torch.where(better, blb, clb[open_])
            crow[open_] = torch.where(better, brow, crow[open_])
            for k, t in b_alpha.items():
                child_alpha[k][open_] = t.to(_PARAM_DTYPE)
            for k, t in b_beta.items():
                child_beta[k][open_] = t.to(_PARAM_DTYPE)
        domains += 2 * m
        safe = clb > 0
        if bool(safe.any()):
            proven = min(proven, float(clb[safe].min()))
        keep = (~safe).nonzero().reshape(-1)
        pool_pre = {k: (torch.cat([pool_pre[k][0], lo[keep]]), torch.cat([pool_pre[k][1], hi[keep]]))
                    for k, (lo, hi) in cpre.items()}  # fmt: skip
        pool_split = {k: torch.cat([pool_split[k], v[keep]]) for k, v in child_split.items()}
        pool_lb = torch.cat([pool_lb, clb[keep]])
        pool_row = torch.cat([pool_row, crow[keep]])
        pool_alpha = {k: torch.cat([pool_alpha[k], v[keep]]) for k, v in child_alpha.items()}
        pool_beta = {k: torch.cat([pool_beta[k], v[keep]]) for k, v in child_beta.items()}
        if iteration % 8 == 0:
            found = _attack(conj, conj.lower, conj.upper, settings, gen)
            if found is not None:
                return Verdict("falsified", found[0], found[1], None, clock.elapsed(), "bab-relu", domains)


# ------------------------------------------------------------------------------------------------ entry points


def _piecewise_linear(net: Network) -> bool:
    return all(isinstance(n.op, (LeakyReLUOp, MaxPool2dOp)) for n in net.nodes.values() if n.op.nonlinear)


def _decide(conj: _Conj, method: str, settings: _Settings, clock: _Clock, gen: torch.Generator) -> Verdict:
    """Attack, then root bounds, then the complete method, for one conjunction."""
    if method in ("relu", "milp") and not _piecewise_linear(conj.net):
        raise InputError(f"verify: method={method!r} needs a ReLU/LeakyReLU/MaxPool network; use method='input'")
    if conj.A.shape[0] == 0:
        # No row: every output is unsafe, so any point of the box is a counterexample.
        x = conj.lower
        with torch.no_grad():
            m = conj.margin(conj.net.forward(x))
        found = _confirm(conj, x, torch.minimum(m, torch.zeros_like(m)))
        if found is not None:
            return Verdict("falsified", found[0], found[1], None, clock.elapsed(), "attack", 0)
        return Verdict("unknown", None, None, None, clock.elapsed(), "attack", 0)
    found = _attack(conj, conj.lower, conj.upper, settings, gen)
    if found is not None:
        return Verdict("falsified", found[0], found[1], None, clock.elapsed(), "attack", 0)
    if clock.out():
        return Verdict("timeout", None, None, None, clock.elapsed(), "attack", 0)
    n_in = conj.lower[0].numel()
    if method == "milp":
        return _milp(conj, clock)
    root = _bound(
        conj,
        conj.lower,
        conj.upper,
        settings.root_method,
        settings,
        intermediate=conj.pre,
        reuse=conj.pre is not None,
        optimize_intermediate=settings.optimize_intermediate and conj.pre is None,
    )
    lb = float(root[0][0])
    if lb > 0:
        return Verdict("verified", None, None, lb, clock.elapsed(), settings.root_method, 1)
    if method == "bounds":
        return Verdict("unknown", None, None, lb, clock.elapsed(), settings.root_method, 1)
    chosen = method
    if method == "auto":
        if not _piecewise_linear(conj.net):
            chosen = "input"
        elif int(_binaries(conj.net, root[2])[0]) <= settings.milp_threshold:
            # A MILP this small is solved faster by HiGHS than by either splitting (measured: a 5-input 3x8 ReLU
            # net, margin 0.02: MILP 1.4 s, ReLU splitting 13 s, input splitting 45 s).
            chosen = "milp"
        elif n_in <= settings.input_split_threshold:
            chosen = "input"
        else:
            chosen = "relu"
    if chosen == "milp":
        return _milp(conj, clock)
    if chosen == "relu":
        return _bab_relu(conj, settings, clock, gen, root)
    return _bab_input(conj, settings, clock, gen, root)


def _binaries(net: Network, pre: dict[str, BoundsT], *, relu_only: bool = False) -> Tensor:
    """Per domain, the binary variables its MILP needs: unstable ReLUs plus (unless ``relu_only``) max-pool
    window candidates."""
    n = next(iter(pre.values()))[0].shape[0] if pre else 1
    count = torch.zeros(n, dtype=torch.int64)
    for name, (lo, hi) in pre.items():
        op = net.nodes[name].op
        if isinstance(op, LeakyReLUOp):
            count += ((lo < 0) & (hi > 0)).reshape(n, -1).sum(1).cpu()
        elif isinstance(op, MaxPool2dOp) and not relu_only:
            wl, wh = op._gather(lo, -math.inf), op._gather(hi, -math.inf)
            cand = (wh >= wl.amax(-1, keepdim=True)).sum(-1)
            count += torch.where(cand > 1, cand, torch.zeros_like(cand)).sum(1).cpu()
    return count


def _milp(conj: _Conj, clock: _Clock) -> Verdict:
    v = milp_verify(conj.net, (conj.lower[0], conj.upper[0]), conj.A, conj.b, time_limit=max(clock.left(), 0.05))
    if v.status == "falsified":
        assert v.counterexample is not None
        found = _confirm(conj, v.counterexample.unsqueeze(0).to(conj.lower), torch.full((1,), -1.0))
        if found is None:
            return Verdict("unknown", None, None, v.lower_bound, clock.elapsed(), "milp", v.domains)
        return Verdict("falsified", found[0], found[1], v.lower_bound, clock.elapsed(), "milp", v.domains)
    v.seconds = clock.elapsed()
    return v


def _settings(
    *,
    batch_size: int,
    max_domains: int,
    bound_method: str,
    root_method: str,
    input_split_threshold: int,
    milp_threshold: int,
    attack_restarts: int,
    attack_steps: int,
    alpha_steps: int,
    beta_steps: int,
    seed: int,
    branching: str = "fsb",
    optimize_intermediate: bool = True,
) -> _Settings:
    for nm, v in (("batch_size", batch_size), ("max_domains", max_domains)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise InputError(f"verify: {nm} must be a positive int, got {v!r}")
    for nm, v in (
        ("attack_restarts", attack_restarts),
        ("attack_steps", attack_steps),
        ("alpha_steps", alpha_steps),
        ("beta_steps", beta_steps),
    ):
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise InputError(f"verify: {nm} must be an int >= 0, got {v!r}")
    for nm, m in (("bound_method", bound_method), ("root_method", root_method)):
        if m not in ("ibp", "crown", "alpha-crown", "deeppoly"):
            raise InputError(f"verify: {nm} must be 'ibp', 'crown', 'alpha-crown' or 'deeppoly', got {m!r}")
    if branching not in BRANCHINGS:
        raise InputError(f"verify: unknown branching {branching!r}; choose one of {BRANCHINGS}")
    if not isinstance(optimize_intermediate, bool):
        raise InputError(f"verify: optimize_intermediate must be True or False, got {optimize_intermediate!r}")
    return _Settings(
        batch_size, max_domains, bound_method, root_method, int(input_split_threshold), int(milp_threshold),
        attack_restarts,
        attack_steps, alpha_steps, beta_steps, int(seed), branching, optimize_intermediate,
    )  # fmt: skip


def _check_method(method: str) -> str:
    m = str(method).lower().replace("_", "-")
    m = {"bab-input": "input", "bab-relu": "relu", "complete": "auto"}.get(m, m)
    if m not in METHODS:
        raise InputError(f"verify: unknown method {method!r}; choose one of {METHODS}")
    return m


def _check_timeout(timeout: float) -> float:
    try:
        t = float(timeout)
    except (TypeError, ValueError):
        raise InputError(f"verify: timeout must be a number of seconds, got {timeout!r}") from None
    if not t > 0 or math.isnan(t):
        raise InputError(f"verify: timeout must be > 0 seconds, got {timeout!r}")
    return t


def verify_box(
    net: Network | nn.Module,
    lower: Tensor,
    upper: Tensor,
    A: Tensor,
    b: Tensor,
    *,
    timeout: float,
    method: str = "auto",
    input_shape: Sequence[int] | None = None,
    onnx_path: str | os.PathLike[str] | None = None,
    batch_size: int = 256,
    max_domains: int = 200_000,
    bound_method: str = "crown",
    root_method: str = "alpha-crown",
    input_split_threshold: int = 10,
    milp_threshold: int = 32,
    attack_restarts: int = 32,
    attack_steps: int = 40,
    alpha_steps: int = 20,
    beta_steps: int = 5,
    branching: str = "fsb",
    optimize_intermediate: bool = True,
    dtype: torch.dtype = torch.float64,
    seed: int = 0,
) -> Verdict:
    """Decide whether some ``x`` with ``lower <= x <= upper`` has ``A f(x) <= b`` (one unsafe conjunction).

    Args:
        net: the network (a :class:`Network` or a module, traced with ``input_shape``).
        lower: lower end of the box (``prod(input_shape)`` values, any shape).
        upper: upper end.
        A: ``(k, K)`` rows over the flattened outputs.
        b: ``(k,)``.
        timeout: seconds.
        method: ``"auto"`` (input splitting for networks that are not piecewise linear; else the MILP when it is
            small, see ``milp_threshold``; else input splitting when the input has at most
            ``input_split_threshold`` values, ReLU splitting otherwise), ``"input"``, ``"relu"``, ``"milp"`` or
            ``"bounds"`` (attack and ``root_method`` bounds only: ``verified`` or ``unknown``).
        input_shape: per-sample input shape when ``net`` is a module without ``input_shape``.
        onnx_path: an ONNX file of the same network; counterexamples are re-executed on onnxruntime too.
        batch_size: sub-domains split per iteration (children are bounded ``2 * batch_size`` at a time).
        max_domains: cap on open sub-domains; beyond it the answer is ``unknown``.
        bound_method: bound for sub-domains (``"crown"`` or ``"alpha-crown"``, ...).
        root_method: bound for the whole box.
        input_split_threshold: input size up to which ``"auto"`` splits inputs.
        milp_threshold: with ``"auto"``, solve the MILP directly when it needs at most this many binary variables
            (unstable ReLUs after the root bounds, max-pool candidates); 0 never does.
        attack_restarts: PGD restarts on the root box.
        attack_steps: PGD steps (0 disables the attack).
        alpha_steps: alpha-CROWN iterations.
        beta_steps: beta-CROWN iterations on ReLU-split sub-domains (0: plain ``bound_method`` bounds).
        branching: how ReLU splitting picks the neuron to split: ``"fsb"`` (filtered smart branching: the
            ``FSB_CANDIDATES`` best neurons of two BaBSR scores, each bounded cheaply, the best kept) or
            ``"babsr"`` (the BaBSR-style score alone).
        optimize_intermediate: the root's alpha-CROWN also optimises the slopes behind the intermediate-layer
            bounds (Xu et al. 2021), which every sub-domain then inherits (see the module docstring).
        dtype: working precision of the bounds (float64 keeps rounding far below any margin that matters).
        seed: seeds the attack's random starts.

    Returns:
        A :class:`Verdict`; ``falsified`` carries a counterexample re-executed on the network, the model and
        onnxruntime (when known), in the model's dtype.

    Raises:
        InputError: malformed arguments.
    """
    clock = _Clock(_check_timeout(timeout))
    meth = _check_method(method)
    settings = _settings(
        batch_size=batch_size, max_domains=max_domains, bound_method=bound_method, root_method=root_method,
        input_split_threshold=input_split_threshold, milp_threshold=milp_threshold, attack_restarts=attack_restarts,
        attack_steps=attack_steps,
        alpha_steps=alpha_steps, beta_steps=beta_steps, seed=seed, branching=branching,
        optimize_intermediate=optimize_intermediate,
    )  # fmt: skip
    base = as_network(net, input_shape)
    work = base.to(_device_of(base), dtype)
    conj = _make_conj(work, lower, upper, A, b, "verify_box")
    conj.checkers = _make_checkers(net, work, onnx_path)
    gen = torch.Generator().manual_seed(settings.seed)
    with torch.no_grad():
        v = _decide(conj, meth, settings, clock, gen)
    v.seconds = clock.elapsed()
    return v


def _make_conj(net: Network, lower: Tensor, upper: Tensor, A: Tensor, b: Tensor, where: str) -> _Conj:
    dtype, device = _dtype_of(net), _device_of(net)
    n = math.prod(net.input_shape)
    k_out = math.prod(net.output_shape)
    box = []
    for nm, t in (("lower", lower), ("upper", upper)):
        t = torch.as_tensor(t)
        if t.numel() != n:
            raise InputError(f"{where}: {nm} has {t.numel()} values, the network takes {n} {net.input_shape}")
        if not bool(torch.isfinite(t).all()):
            raise InputError(f"{where}: {nm} contains NaN or Inf")
        box.append(t.detach().to(device=device, dtype=dtype).reshape(1, *net.input_shape))
    if bool((box[0] > box[1]).any()):
        raise InputError(f"{where}: lower > upper somewhere in the box")
    a = torch.as_tensor(A).detach()
    bb = torch.as_tensor(b).detach().reshape(-1)
    if a.dim() == 1:
        a = a.reshape(1, -1)
    if a.dim() != 2 or a.shape[1] != k_out or a.shape[0] != bb.numel():
        raise InputError(f"{where}: A must be (k, {k_out}) and b (k,), got A {tuple(a.shape)} and b {tuple(bb.shape)}")
    if not (bool(torch.isfinite(a).all()) and bool(torch.isfinite(bb).all())):
        raise InputError(f"{where}: A or b contains NaN or Inf")
    return _Conj(net, box[0], box[1], a.to(device=device, dtype=dtype), bb.to(device=device, dtype=dtype))


def verify(
    model_or_net: nn.Module | Network,
    spec: Spec,
    *,
    timeout: float,
    method: str = "auto",
    input_shape: Sequence[int] | None = None,
    onnx_path: str | os.PathLike[str] | None = None,
    batch_size: int = 256,
    max_domains: int = 200_000,
    bound_method: str = "crown",
    root_method: str = "alpha-crown",
    input_split_threshold: int = 10,
    milp_threshold: int = 32,
    attack_restarts: int = 32,
    attack_steps: int = 40,
    alpha_steps: int = 20,
    beta_steps: int = 5,
    branching: str = "fsb",
    optimize_intermediate: bool = True,
    dtype: torch.dtype = torch.float64,
    seed: int = 0,
) -> Verdict:
    """Verify a :class:`Spec` (every region, every unsafe disjunct) within a time budget.

    First one CROWN bound per region over the rows of all its disjuncts (pairs it proves are done), then a PGD
    attack on every open (region, disjunct) pair (a confirmed counterexample ends the run: ``falsified``), then one
    ``root_method`` bound per region, then each pair still open in turn is decided by :func:`verify_box`'s pipeline
    (root bounds, then branch and bound or MILP) with the time left. The spec is ``verified`` when every pair is;
    ``falsified`` as soon as one pair is; otherwise ``timeout`` when the budget ran out, else ``unknown``.

    Args:
        model_or_net: a module (an ONNX module from :func:`bastion.models.onnx.load_onnx` carries its
            ``input_shape`` and ``onnx_path``) or a :class:`Network`.
        spec: the property (:func:`bastion.verify.vnnlib.parse_vnnlib` reads one from a VNN-LIB file).
        timeout: seconds for the whole spec.
        method: see :func:`verify_box`.
        input_shape: per-sample input shape (default: the model's ``input_shape``, else the spec's).
        onnx_path: ONNX file for re-executing counterexamples (default: the model's ``onnx_path``).
        batch_size, max_domains, bound_method, root_method, input_split_threshold, milp_threshold,
            attack_restarts, attack_steps, alpha_steps, beta_steps, branching, optimize_intermediate, dtype,
            seed: see :func:`verify_box`. With ``optimize_intermediate`` the intermediate slopes are optimised
            once per region, for the rows of all its open disjuncts together, and every disjunct of the region
            starts from those bounds.

    Returns:
        A :class:`Verdict`. ``lower_bound`` is the smallest proven margin over the pairs (when all are proven);
        ``domains`` sums the sub-domains of every pair.

    Raises:
        InputError: malformed arguments, or a spec whose sizes do not match the network.
    """
    clock = _Clock(_check_timeout(timeout))
    meth = _check_method(method)
    settings = _settings(
        batch_size=batch_size, max_domains=max_domains, bound_method=bound_method, root_method=root_method,
        input_split_threshold=input_split_threshold, milp_threshold=milp_threshold, attack_restarts=attack_restarts,
        attack_steps=attack_steps,
        alpha_steps=alpha_steps, beta_steps=beta_steps, seed=seed, branching=branching,
        optimize_intermediate=optimize_intermediate,
    )  # fmt: skip
    if not isinstance(spec, Spec):
        raise InputError(f"verify: spec must be a bastion.verify.spec.Spec, got {type(spec).__name__}")
    shape = input_shape
    if shape is None and not isinstance(model_or_net, Network):
        shape = getattr(model_or_net, "input_shape", None) or spec.input_shape
    base = as_network(model_or_net, shape)
    if math.prod(base.input_shape) != spec.num_inputs:
        raise InputError(f"verify: the spec has {spec.num_inputs} inputs, the network {base.input_shape}")
    if math.prod(base.output_shape) != spec.num_outputs:
        raise InputError(f"verify: the spec has {spec.num_outputs} outputs, the network {base.output_shape}")
    work = base.to(_device_of(base), dtype)
    checkers = _make_checkers(model_or_net, work, onnx_path)
    conjs = []
    groups: list[list[_Conj]] = []
    for region in spec.regions:
        group = []
        for a, b in region.unsafe:
            conj = _make_conj(work, region.lower, region.upper, a, b, "verify")
            conj.checkers = checkers
            group.append(conj)
        conjs.extend(group)
        groups.append(group)
    gen = torch.Generator().manual_seed(settings.seed)
    domains = 0
    proven: dict[int, float] = {}

    def prove_stacked(method: str) -> None:
        # One bound per region for the rows of all its open disjuncts together (one call instead of one per
        # disjunct); a disjunct with a row proven positive needs nothing more. The alpha-CROWN pass also
        # optimises the intermediate slopes, once for the whole region: every disjunct of the region inherits
        # those bounds (on mnistfc 256x4 this costs 1.2 s where each disjunct doing it alone costs 9 times that).
        shared = settings.optimize_intermediate and method == "alpha-crown"
        for group in groups:
            live = [c for c in group if c.A.shape[0] and id(c) not in proven]
            if not live or clock.out():
                continue
            a, b = torch.cat([c.A for c in live]), torch.cat([c.b for c in live])
            opts = BoundOptions(
                method=method, alpha_steps=settings.alpha_steps, bound_upper=False, alpha_intermediate=shared
            )
            res = compute_bounds(work, live[0].lower, live[0].upper, C=a, options=opts)
            rows = res.lower[0] - b
            if shared:
                for c in live:
                    c.pre = res.intermediate
            start = 0
            for c in live:
                k = c.A.shape[0]
                best = float(rows[start : start + k].max())
                start += k
                if best > 0:
                    proven[id(c)] = best

    with torch.no_grad():
        if meth != "milp":
            # CROWN first: it costs less than one PGD restart and settles most provable properties at once.
            prove_stacked("crown")
            if conjs and len(proven) == len(conjs):
                low = min(proven.values())
                return Verdict("verified", None, None, low, clock.elapsed(), "crown", len(conjs))
        # Falsification next over every open pair, so an easy counterexample is never hidden behind a hard proof.
        for conj in conjs:
            if clock.out():
                break
            if id(conj) in proven:
                continue
            found = _attack(conj, conj.lower, conj.upper, settings, gen) if conj.A.shape[0] else None
            if found is not None:
                return Verdict("falsified", found[0], found[1], None, clock.elapsed(), "attack", 0)
        quiet = _Settings(**{**vars(settings), "attack_restarts": max(1, settings.attack_restarts // 4)})
        worst: float | None = math.inf
        status = "verified"
        if meth != "milp" and settings.root_method != "crown" and not clock.out():
            prove_stacked(settings.root_method)
        for conj in conjs:
            if id(conj) in proven:
                worst = None if worst is None else min(worst, proven[id(conj)])
                domains += 1
                continue
            if clock.out():
                status = "timeout"
                worst = None
                break
            v = _decide(conj, meth, quiet, clock, gen)
            domains += v.domains
            if v.status == "falsified":
                v.seconds, v.domains = clock.elapsed(), domains
                return v
            if v.status != "verified":
                status = "timeout" if v.status == "timeout" or status == "timeout" else "unknown"
            worst = None if worst is None or v.lower_bound is None else min(worst, v.lower_bound)
            if status == "timeout":
                break
    method_name = {"auto": "bab", "input": "bab-input", "relu": "bab-relu"}.get(meth, meth)
    return Verdict(status, None, None, worst, clock.elapsed(), method_name, domains)  # type: ignore[arg-type]
