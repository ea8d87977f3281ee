"""Exact mixed-integer linear programming (MILP) encoding of piecewise-linear networks, solved by HiGHS.

The network's value on an input box is written as a MILP whose feasible set is exactly the graph of the network
over the box (Tjeng, Xiao, Tedrake, "Evaluating Robustness of Neural Networks with Mixed Integer Programming",
ICLR 2019; Cheng, Nührenberg, Ruess, ATVA 2017):

* every node of the IR gets one continuous variable per neuron, bounded by the tightest interval known for it;
* affine operators (Linear, Conv2d, BatchNorm, reshapes, Add, average pooling, ...) become equality rows, their
  dense maps read from the operators' own back-substitution (``backward`` of an identity);
* ``y = max(z, a z)`` (ReLU ``a = 0``, LeakyReLU ``a <= 1``) on a neuron whose pre-activation bounds ``[l, u]``
  straddle 0 gets one binary ``d`` (1 = active) and the big-M rows ``y >= z``, ``y >= a z``,
  ``y <= z - (1 - a) l (1 - d)``, ``y <= a z + (1 - a) u d``; a stable neuron (``l >= 0`` or ``u <= 0``, or split
  by branch and bound) is the linear piece it is on;
* max pooling ``y = max_j x_j`` gets one binary per window element that can be the maximum, ``sum_j d_j = 1``,
  ``y >= x_j`` and ``y <= x_j + (U - l_j)(1 - d_j)`` with ``U`` the largest upper bound in the window.

The big-M constants are the pre-activation bounds, so tighter bounds make a smaller, faster MILP: they come from
CROWN (Zhang et al., NeurIPS 2018) or alpha-CROWN (Xu et al., ICLR 2021) through
:func:`~bastion.verify.bounds.compute_bounds`, intersected with interval bounds, and can optionally be refined
layer by layer by linear programming over the LP relaxation of the layers before (``lp_refine=True``, as in
Tjeng et al.'s progressive bound tightening). The MILP is solved by HiGHS (Huangfu and Hall, Math. Prog. Comp.
2018) through :func:`scipy.optimize.milp`, with the optimality gaps tightened to 1e-9.

Sigmoid and Tanh networks are not piecewise linear and are refused with an :class:`InputError`.

Solver answers are never trusted blindly: a counterexample is clipped into the box and re-executed on the network in
float64; one that does not violate the property there is not reported (the verdict is ``unknown``), and
``verified`` needs the solver's proven dual bound above a tolerance.
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp
import torch
from scipy.optimize import Bounds as _SciBounds
from scipy.optimize import LinearConstraint, milp
from torch import Tensor

from bastion.errors import BastionError, InputError
from bastion.verify.bounds import compute_bounds
from bastion.verify.ir import Network
from bastion.verify.ops import InputOp, LeakyReLUOp, MaxPool2dOp
from bastion.verify.result import Verdict
from bastion.verify.spec import Region

__all__ = ["MilpEncoding", "milp_minimum", "milp_verify"]

BoundsT = tuple[Tensor, Tensor]

#: HiGHS options: exact optimality gaps (the soundness tests use the MILP as ground truth), one thread.
#: (Tighter feasibility tolerances than HiGHS's 1e-6/1e-7 only slowed it down without changing any optimum in tests;
#: answers are re-executed anyway.)
_HIGHS_OPTIONS = {"mip_rel_gap": 1e-9, "mip_abs_gap": 1e-9, "threads": 1}


def _check_supported(net: Network) -> None:
    for name, node in net.nodes.items():
        if node.op.nonlinear and not isinstance(node.op, (LeakyReLUOp, MaxPool2dOp)):
            raise InputError(
                f"MILP encoding: node {name!r} ({node.op!r}) is not piecewise linear; the exact MILP covers "
                "ReLU, LeakyReLU and MaxPool networks (use bound propagation or input splitting for Sigmoid/Tanh)"
            )
        if not node.op.nonlinear and not node.op.linear and not isinstance(node.op, InputOp):
            raise InputError(f"MILP encoding: node {name!r} ({node.op!r}) has no affine form")


def _box(net: Network, lower: Tensor, upper: Tensor, where: str) -> BoundsT:
    """The box as float64 ``(1, *input_shape)`` tensors, validated."""
    n = math.prod(net.input_shape)
    out = []
    for nm, t in (("lower", lower), ("upper", upper)):
        t = torch.as_tensor(t)
        if not t.is_floating_point():
            t = t.double()
        if t.numel() != n:
            raise InputError(f"{where}: {nm} has {t.numel()} values, the network takes {n} ({net.input_shape})")
        if not bool(torch.isfinite(t).all()):
            raise InputError(f"{where}: {nm} contains NaN or Inf")
        out.append(t.detach().to(torch.float64).reshape(1, *net.input_shape))
    if bool((out[0] > out[1]).any()):
        raise InputError(f"{where}: lower > upper somewhere in the box")
    return out[0], out[1]


def _net64(net: Network, device: torch.device) -> Network:
    return net.to(device, torch.float64)


def _net_device(net: Network) -> torch.device:
    for node in net.nodes.values():
        for v in vars(node.op).values():
            if isinstance(v, Tensor):
                return v.device
    return torch.device("cpu")


@dataclass
class _Solution:
    status: int  # scipy milp status: 0 optimal, 1 limit reached, 2 infeasible, 3 unbounded, 4 other
    x: np.ndarray | None
    fun: float | None
    dual_bound: float | None
    nodes: int


class MilpEncoding:
    """The MILP of a network over an input box (see the module docstring for the encoding).

    Args:
        net: a piecewise-linear network.
        lower: lower end of the input box (any shape with ``prod(input_shape)`` values).
        upper: upper end.
        intermediate: known pre-activation bounds per nonlinear node (``(1, *in_shape)`` or ``(*in_shape)``),
            intersected with the computed ones (e.g. a branch-and-bound domain's).
        splits: per ReLU/LeakyReLU node, ``+1``/``-1``/``0`` per neuron (``(1, *in_shape)`` or ``(*in_shape)``):
            the pre-activation is constrained ``>= 0`` / ``<= 0`` and the neuron linearised.
        bound_method: method of :func:`compute_bounds` for the big-M constants (``"crown"``, ``"alpha-crown"``,
            ``"ibp"``, ``"deeppoly"``), intersected with IBP; None uses ``intermediate`` as it is (it must then
            cover every nonlinear node).
        lp_refine: tighten the pre-activation bounds of unstable neurons by two LPs each over the relaxation of the
            layers before (slower to build, smaller MILP).
        relax: drop integrality (the LP relaxation).

    Attributes:
        pre: the pre-activation bounds used per nonlinear node, float64 ``(*in_shape)`` tensors.
        num_binaries: number of binary variables.
    """

    def __init__(
        self,
        net: Network,
        lower: Tensor,
        upper: Tensor,
        *,
        intermediate: dict[str, BoundsT] | None = None,
        splits: dict[str, Tensor] | None = None,
        bound_method: str | None = "crown",
        lp_refine: bool = False,
        relax: bool = False,
    ) -> None:
        if not isinstance(net, Network):
            raise InputError(f"MILP encoding: net must be a bastion.verify.ir.Network, got {type(net).__name__}")
        _check_supported(net)
        self.device = _net_device(net)
        self.net = _net64(net, self.device)
        lo, hi = _box(self.net, lower, upper, "MILP encoding")
        self.lower, self.upper = lo.to(self.device), hi.to(self.device)
        inter = self._batched(intermediate, "intermediate")
        spl = self._batched(splits, "splits")
        self.splits = {k: v[0].reshape(-1).cpu().numpy() for k, v in (spl or {}).items()}  # type: ignore[union-attr]
        self.pre = self._pre_bounds(bound_method, inter, spl)
        self.relax = relax
        # Variables and constraint rows, accumulated as COO triplets.
        self.lb: list[np.ndarray] = []
        self.ub: list[np.ndarray] = []
        self.integ: list[np.ndarray] = []
        self.nvar = 0
        self.rows: list[np.ndarray] = []
        self.cols: list[np.ndarray] = []
        self.vals: list[np.ndarray] = []
        self.rlo: list[np.ndarray] = []
        self.rhi: list[np.ndarray] = []
        self.nrow = 0
        self.var: dict[str, np.ndarray] = {}  # node name -> variable indices (flattened neurons)
        self.num_binaries = 0
        self._encode(lp_refine)

    # ----------------------------------------------------------------------------------------------- setup
    def _batched(self, d: dict[str, Tensor] | dict[str, BoundsT] | None, what: str) -> dict | None:
        if d is None:
            return None
        out: dict = {}
        for name, v in d.items():
            if name not in self.net.nodes or not self.net.nodes[name].op.nonlinear:
                raise InputError(f"MILP encoding: {what} names {name!r}, not a nonlinear node of the network")
            shape = self.net.nodes[self.net.nodes[name].inputs[0]].shape
            parts = v if isinstance(v, tuple) else (v,)
            fixed = []
            for t in parts:
                if not isinstance(t, Tensor) or t.numel() != math.prod(shape):
                    raise InputError(f"MILP encoding: {what}[{name!r}] must have {math.prod(shape)} values {shape}")
                t = t.detach().to(self.device).reshape(1, *shape)
                fixed.append(t.to(torch.float64) if what == "intermediate" else t.to(torch.int64))
            out[name] = tuple(fixed) if isinstance(v, tuple) else fixed[0]
        return out

    def _pre_bounds(self, method: str | None, inter: dict | None, splits: dict | None) -> dict[str, BoundsT]:
        """Pre-activation bounds: the given method intersected with IBP (neither dominates the other)."""
        names = self.net.nonlinear_nodes()
        if not names:
            return {}
        if method is None:
            # The caller's bounds as they are (a branch-and-bound domain's, already sound on it), with the splits.
            missing = [k for k in names if inter is None or k not in inter]
            if missing:
                raise InputError(f"MILP encoding: bound_method=None needs intermediate bounds for {missing}")
            assert inter is not None
            out: dict[str, BoundsT] = {}
            for k in names:
                lo, hi = inter[k][0][0], inter[k][1][0]
                if splits is not None and k in splits:
                    sk = splits[k][0]
                    lo = torch.where(sk > 0, lo.clamp(min=0), lo)
                    hi = torch.where(sk < 0, hi.clamp(max=0), hi)
                out[k] = (lo, torch.maximum(hi, lo))
            return out
        res = compute_bounds(
            self.net, self.lower, self.upper, method=method, splits=splits, intermediate=inter
        ).intermediate
        if method != "ibp":
            ibp = compute_bounds(self.net, self.lower, self.upper, method="ibp", splits=splits, intermediate=inter)
            res = {
                k: (torch.maximum(lo, ibp.intermediate[k][0]), torch.minimum(hi, ibp.intermediate[k][1]))
                for k, (lo, hi) in res.items()
            }
        return {k: (lo[0], torch.maximum(hi, lo)[0]) for k, (lo, hi) in res.items()}

    # ------------------------------------------------------------------------------------------- builders
    def _new_vars(self, lo: np.ndarray, hi: np.ndarray, integer: bool = False) -> np.ndarray:
        n = lo.size
        idx = np.arange(self.nvar, self.nvar + n)
        self.nvar += n
        self.lb.append(lo.astype(np.float64))
        self.ub.append(hi.astype(np.float64))
        self.integ.append(np.full(n, 0 if (self.relax or not integer) else 1, dtype=np.int64))
        if integer:
            self.num_binaries += n
        return idx

    def _add_rows(self, r: np.ndarray, c: np.ndarray, v: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> None:
        """Rows given with local row numbers ``r`` in ``[0, len(lo))``."""
        self.rows.append(r + self.nrow)
        self.cols.append(c)
        self.vals.append(v.astype(np.float64))
        self.rlo.append(lo.astype(np.float64))
        self.rhi.append(hi.astype(np.float64))
        self.nrow += lo.size

    def _row_pairs(
        self, pairs: Sequence[tuple[np.ndarray, float | np.ndarray]], lo: np.ndarray, hi: np.ndarray
    ) -> None:
        """Element-wise rows ``sum_k coef_k * var_k[i]`` in ``[lo_i, hi_i]`` for ``i`` over the rows."""
        m = lo.size
        r = np.arange(m)
        rs, cs, vs = [], [], []
        for var, coef in pairs:
            rs.append(r)
            cs.append(var)
            vs.append(np.broadcast_to(np.asarray(coef, dtype=np.float64), (m,)))
        self._add_rows(np.concatenate(rs), np.concatenate(cs), np.concatenate(vs), lo, hi)

    def _widen(self, lo: Tensor, hi: Tensor) -> tuple[np.ndarray, np.ndarray]:
        # A hair of slack on variable bounds so that float rounding in the bounds never cuts off the true optimum.
        lo_n = lo.reshape(-1).cpu().numpy().astype(np.float64)
        hi_n = hi.reshape(-1).cpu().numpy().astype(np.float64)
        return lo_n - 1e-9 * (1 + np.abs(lo_n)), hi_n + 1e-9 * (1 + np.abs(hi_n))

    def _encode(self, lp_refine: bool) -> None:
        net = self.net
        boxes: dict[str, BoundsT] = {}
        # Bounds a node's variables must respect: its own interval, intersected with the pre-activation bounds of
        # every nonlinear node it feeds (which also carries branch-and-bound splits).
        feeds: dict[str, list[str]] = {}
        for name, node in net.nodes.items():
            if node.op.nonlinear:
                feeds.setdefault(node.inputs[0], []).append(name)
        for name, node in net.nodes.items():
            if name == net.input_name:
                lo, hi = self.lower[0], self.upper[0]
            else:
                ins = [boxes[i] for i in node.inputs]
                if node.op.nonlinear:
                    ins = [self.pre[name]]
                lo_b, hi_b = node.op.interval(*[(a.unsqueeze(0), b.unsqueeze(0)) for a, b in ins])
                lo, hi = lo_b[0], hi_b[0]
            for user in feeds.get(name, []):
                plo, phi = self.pre[user]
                lo, hi = torch.maximum(lo, plo), torch.minimum(hi, phi)
                hi = torch.maximum(hi, lo)
            if lp_refine and name in feeds and name != net.input_name and node.op.linear:
                # Encode the affine node first, then tighten its unstable neurons by LP before anything uses them.
                self.var[name] = self._new_vars(*self._widen(lo, hi))
                self._affine(name)
                lo, hi = self._refine(name, lo, hi)
                for user in feeds[name]:
                    self.pre[user] = (lo, hi)
                boxes[name] = (lo, hi)
                continue
            boxes[name] = (lo, hi)
            self.var[name] = self._new_vars(*self._widen(lo, hi))
            if name == net.input_name:
                continue
            if node.op.linear:
                self._affine(name)
            elif isinstance(node.op, LeakyReLUOp):
                self._leaky_relu(name)
            else:
                assert isinstance(node.op, MaxPool2dOp)
                self._maxpool(name, boxes[node.inputs[0]])

    def _affine(self, name: str) -> None:
        node = self.net.nodes[name]
        y = self.var[name]
        p = y.size
        rows, cols, vals = [np.arange(p)], [y], [np.ones(p)]
        const = np.zeros(p)
        chunk = 1024
        for start in range(0, p, chunk):
            stop = min(p, start + chunk)
            eye = torch.zeros(1, stop - start, p, dtype=torch.float64, device=self.device)
            eye[0, torch.arange(stop - start), torch.arange(start, stop)] = 1.0
            with torch.no_grad():
                back, bias = node.op.backward(eye.reshape(1, stop - start, *node.shape))  # type: ignore[attr-defined]
            const[start:stop] = bias[0].cpu().numpy()
            for inp, a in zip(node.inputs, back):
                m = a[0].reshape(stop - start, -1).cpu().numpy()
                r, c = np.nonzero(m)
                rows.append(r + start)
                cols.append(self.var[inp][c])
                vals.append(-m[r, c])
        self._add_rows(np.concatenate(rows), np.concatenate(cols), np.concatenate(vals), const, const)

    def _leaky_relu(self, name: str) -> None:
        node = self.net.nodes[name]
        a = float(node.op.slope)  # type: ignore[attr-defined]
        z, y = self.var[node.inputs[0]], self.var[name]
        lo_t, hi_t = self.pre[name]
        lo, hi = lo_t.reshape(-1).cpu().numpy(), hi_t.reshape(-1).cpu().numpy()
        split = self.splits.get(name, np.zeros(lo.size, dtype=np.int64))
        active = (lo >= 0) | (split > 0)
        inactive = ~active & ((hi <= 0) | (split < 0))
        unstable = ~(active | inactive)
        zero = np.zeros(int(active.sum()))
        if active.any():
            self._row_pairs([(y[active], 1.0), (z[active], -1.0)], zero, zero)
        if inactive.any():
            zz = np.zeros(int(inactive.sum()))
            self._row_pairs([(y[inactive], 1.0), (z[inactive], -a)], zz, zz)
        if not unstable.any():
            return
        l, u = lo[unstable], hi[unstable]
        yu, zu = y[unstable], z[unstable]
        d = self._new_vars(np.zeros(l.size), np.ones(l.size), integer=True)
        inf = np.full(l.size, np.inf)
        zeros = np.zeros(l.size)
        # y >= z and y >= a z (y = max(z, a z) for a <= 1).
        self._row_pairs([(yu, 1.0), (zu, -1.0)], zeros, inf)
        self._row_pairs([(yu, 1.0), (zu, -a)], zeros, inf)
        # y <= z - (1 - a) l (1 - d)   <=>   y - z - (1 - a) l d <= -(1 - a) l
        self._row_pairs([(yu, 1.0), (zu, -1.0), (d, -(1 - a) * l)], -inf, -(1 - a) * l)
        # y <= a z + (1 - a) u d   <=>   y - a z - (1 - a) u d <= 0
        self._row_pairs([(yu, 1.0), (zu, -a), (d, -(1 - a) * u)], -inf, zeros)

    def _maxpool(self, name: str, in_box: BoundsT) -> None:
        node = self.net.nodes[name]
        op = node.op
        assert isinstance(op, MaxPool2dOp)
        x, y = self.var[node.inputs[0]], self.var[name]
        lo = in_box[0].reshape(-1).cpu().numpy()
        hi = in_box[1].reshape(-1).cpu().numpy()
        windows = op.windows.cpu().numpy()
        for o in range(windows.shape[0]):
            w = windows[o][windows[o] >= 0]
            best_lo = lo[w].max()
            cand = w[hi[w] >= best_lo]  # an element whose upper bound is below another's lower bound is never the max
            # y >= x_j for every element of the window.
            self._row_pairs([(np.full(w.size, y[o]), 1.0), (x[w], -1.0)], np.zeros(w.size), np.full(w.size, np.inf))
            if cand.size == 1:
                self._row_pairs([(y[o : o + 1], 1.0), (x[cand], -1.0)], np.zeros(1), np.zeros(1))
                continue
            big_u = hi[cand].max()
            d = self._new_vars(np.zeros(cand.size), np.ones(cand.size), integer=True)
            self._add_rows(np.zeros(cand.size, dtype=np.int64), d, np.ones(cand.size), np.ones(1), np.ones(1))
            m = big_u - lo[cand]
            # y <= x_j + M_j (1 - d_j)   <=>   y - x_j + M_j d_j <= M_j
            self._row_pairs([(np.full(cand.size, y[o]), 1.0), (x[cand], -1.0), (d, m)], np.full(cand.size, -np.inf), m)

    # --------------------------------------------------------------------------------------------- solving
    def _matrices(self) -> tuple[sp.csr_matrix, np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        rows = np.concatenate(self.rows) if self.rows else np.zeros(0, dtype=np.int64)
        cols = np.concatenate(self.cols) if self.cols else np.zeros(0, dtype=np.int64)
        vals = np.concatenate(self.vals) if self.vals else np.zeros(0)
        a = sp.csr_matrix((vals, (rows, cols)), shape=(self.nrow, self.nvar))
        rlo = np.concatenate(self.rlo) if self.rlo else np.zeros(0)
        rhi = np.concatenate(self.rhi) if self.rhi else np.zeros(0)
        return a, rlo, rhi, np.concatenate(self.lb), np.concatenate(self.ub), np.concatenate(self.integ)

    def solve(
        self,
        objective: np.ndarray,
        *,
        extra: tuple[sp.spmatrix, np.ndarray, np.ndarray] | None = None,
        extra_vars: tuple[np.ndarray, np.ndarray] | None = None,
        time_limit: float | None = None,
        relax: bool = False,
    ) -> _Solution:
        """Minimise ``objective @ v`` over the encoding (``v`` all variables, then ``extra_vars``).

        Args:
            objective: dense coefficients over all variables (including extra ones).
            extra: additional rows ``(A, lo, hi)`` over all variables.
            extra_vars: bounds ``(lo, hi)`` of continuous variables appended after the encoding's.
            time_limit: seconds for HiGHS.
            relax: solve the LP relaxation.
        """
        a, rlo, rhi, lb, ub, integ = self._matrices()
        if extra_vars is not None:
            lb = np.concatenate([lb, extra_vars[0]])
            ub = np.concatenate([ub, extra_vars[1]])
            integ = np.concatenate([integ, np.zeros(extra_vars[0].size, dtype=np.int64)])
            a = sp.hstack([a, sp.csr_matrix((a.shape[0], extra_vars[0].size))]).tocsr()
        if extra is not None:
            a = sp.vstack([a, extra[0]]).tocsr()
            rlo, rhi = np.concatenate([rlo, extra[1]]), np.concatenate([rhi, extra[2]])
        if relax:
            integ = np.zeros_like(integ)
        options: dict[str, object] = dict(_HIGHS_OPTIONS)
        if time_limit is not None:
            options["time_limit"] = max(float(time_limit), 0.01)
        constraints = [LinearConstraint(a, rlo, rhi)] if a.shape[0] else []
        with warnings.catch_warnings():
            # scipy warns that the extra HiGHS options are passed verbatim; that is what they are for.
            warnings.simplefilter("ignore", RuntimeWarning)
            res = milp(
                objective, integrality=integ, bounds=_SciBounds(lb, ub), constraints=constraints, options=options
            )
        dual = getattr(res, "mip_dual_bound", None)
        if res.status == 0 and (dual is None or not np.isfinite(dual)):
            dual = float(res.fun)
        return _Solution(
            status=int(res.status),
            x=None if res.x is None else np.asarray(res.x),
            fun=None if res.fun is None else float(res.fun),
            dual_bound=None if dual is None or not np.isfinite(dual) else float(dual),
            nodes=int(getattr(res, "mip_node_count", 0) or 0),
        )

    def _refine(self, name: str, lo: Tensor, hi: Tensor) -> BoundsT:
        """Tighten the unstable neurons of ``name`` by minimising and maximising each over the LP relaxation."""
        lo_n, hi_n = lo.reshape(-1).clone(), hi.reshape(-1).clone()
        unstable = ((lo_n < 0) & (hi_n > 0)).nonzero().reshape(-1).tolist()
        idx = self.var[name]
        for j in unstable:
            for sign in (1.0, -1.0):
                obj = np.zeros(self.nvar)
                obj[idx[j]] = sign
                sol = self.solve(obj, relax=True)
                if sol.status != 0 or sol.dual_bound is None:
                    continue
                # The LP optimum is exact up to the solver tolerance; step back by it to stay sound.
                val = sol.dual_bound - 1e-7 * (1 + abs(sol.dual_bound))
                if sign > 0:
                    lo_n[j] = max(float(lo_n[j]), val)
                else:
                    hi_n[j] = min(float(hi_n[j]), -val)
        hi_n = torch.maximum(hi_n, lo_n)
        lo_t, hi_t = lo_n.reshape(lo.shape), hi_n.reshape(hi.shape)
        # Tighten the variable bounds of this node's variables (stored at their creation position).
        pos = self._var_block(idx)
        wl, wh = self._widen(lo_t, hi_t)
        self.lb[pos] = np.maximum(self.lb[pos], wl)
        self.ub[pos] = np.minimum(self.ub[pos], wh)
        return lo_t, hi_t

    def _var_block(self, idx: np.ndarray) -> int:
        start = 0
        for k, block in enumerate(self.lb):
            if start == int(idx[0]):
                return k
            start += block.size
        raise AssertionError("variable block not found")  # pragma: no cover

    def output_vars(self) -> np.ndarray:
        """Variable indices of the network's (flattened) outputs."""
        return self.var[self.net.output_name]

    def input_point(self, v: np.ndarray) -> Tensor:
        """The input part of a solution, clipped into the box, float64 ``(*input_shape)``."""
        x = torch.as_tensor(v[self.var[self.net.input_name]], dtype=torch.float64, device=self.device)
        x = x.reshape(self.net.input_shape)
        return torch.minimum(torch.maximum(x, self.lower[0]), self.upper[0])


def milp_minimum(
    net: Network,
    lower: Tensor,
    upper: Tensor,
    c: Tensor,
    *,
    time_limit: float | None = None,
    bound_method: str = "crown",
    lp_refine: bool = False,
) -> tuple[float, Tensor]:
    """The exact minimum of ``c . f(x)`` over the box ``lower <= x <= upper``.

    Args:
        net: a piecewise-linear network (ReLU, LeakyReLU, MaxPool, affine operators).
        lower: lower end of the input box (``prod(input_shape)`` values, any shape).
        upper: upper end.
        c: coefficients over the flattened outputs ``(K,)``.
        time_limit: seconds for the solver (None: no limit).
        bound_method: bounds used for the big-M constants.
        lp_refine: refine the big-M constants by LP first.

    Returns:
        ``(value, x_argmin)``: the minimum as attained by ``x_argmin`` (float64, ``(*input_shape)``), i.e.
        ``value = c . f(x_argmin)`` re-executed on the network in float64.

    Raises:
        InputError: malformed arguments or a network that is not piecewise linear.
        BastionError: the solver did not prove optimality (time limit, numerical trouble).
    """
    enc = MilpEncoding(net, lower, upper, bound_method=bound_method, lp_refine=lp_refine)
    out = enc.output_vars()
    c64 = torch.as_tensor(c).detach().to(torch.float64).reshape(-1).cpu().numpy()
    if c64.size != out.size or not np.isfinite(c64).all():
        raise InputError(f"milp_minimum: c must have {out.size} finite values (one per output), got {c64.size}")
    obj = np.zeros(enc.nvar)
    obj[out] = c64
    sol = enc.solve(obj, time_limit=time_limit)
    if sol.status != 0 or sol.x is None:
        raise BastionError(f"milp_minimum: HiGHS did not prove optimality (status {sol.status})")
    x = enc.input_point(sol.x)
    with torch.no_grad():
        y = enc.net.forward(x.unsqueeze(0)).reshape(-1)
    value = float(y.cpu().numpy() @ c64)
    return value, x


def _spec_rows(A: Tensor, b: Tensor, k_out: int, where: str) -> tuple[np.ndarray, np.ndarray]:
    a = torch.as_tensor(A).detach().to(torch.float64).cpu()
    bb = torch.as_tensor(b).detach().to(torch.float64).reshape(-1).cpu()
    if a.dim() == 1:
        a = a.reshape(1, -1)
    if a.dim() != 2 or a.shape[1] != k_out or a.shape[0] != bb.numel():
        raise InputError(f"{where}: A must be (k, {k_out}) and b (k,), got A {tuple(a.shape)} and b {tuple(bb.shape)}")
    if not (torch.isfinite(a).all() and torch.isfinite(bb).all()):
        raise InputError(f"{where}: A or b contains NaN or Inf")
    return a.numpy(), bb.numpy()


def milp_verify(
    net: Network,
    box: Region | tuple[Tensor, Tensor],
    A: Tensor | None = None,
    b: Tensor | None = None,
    *,
    time_limit: float | None = None,
    bound_method: str | None = "crown",
    lp_refine: bool = False,
    splits: dict[str, Tensor] | None = None,
    intermediate: dict[str, BoundsT] | None = None,
    tol: float = 1e-6,
) -> Verdict:
    """Decide exactly whether ``{x in box : A f(x) <= b}`` is empty.

    The MILP minimises the violation margin ``t = max_i (A_i f(x) - b_i)``: the property holds iff the minimum is
    positive. ``verified`` needs the solver's proven lower bound above ``tol``; ``falsified`` needs the minimiser,
    re-executed on the network in float64, to satisfy ``A f(x) <= b``; anything else is ``unknown`` (or ``timeout``
    when the time limit stopped the solver).

    Args:
        net: a piecewise-linear network.
        box: a :class:`Region` (its box; with ``A`` None every unsafe disjunct of the region is checked) or a
            ``(lower, upper)`` pair.
        A: ``(k, K)`` rows of the unsafe conjunction over the flattened outputs.
        b: ``(k,)`` right-hand sides.
        time_limit: seconds for the solver (None: no limit).
        bound_method: bounds used for the big-M constants.
        lp_refine: refine the big-M constants by LP first.
        splits: branch-and-bound ReLU splits restricting the domain (see :class:`MilpEncoding`).
        intermediate: known pre-activation bounds of the domain.
        tol: margin the proven lower bound must exceed for ``verified``.

    Returns:
        A :class:`Verdict` with ``method="milp"``, ``lower_bound`` the solver's proven bound on the margin and
        ``domains`` the number of branch-and-bound nodes HiGHS explored.
    """
    start = time.perf_counter()
    if not isinstance(net, Network):
        raise InputError(f"milp_verify: net must be a bastion.verify.ir.Network, got {type(net).__name__}")
    if isinstance(box, Region):
        lower, upper = box.lower, box.upper
        if A is None:
            if b is not None:
                raise InputError("milp_verify: b given without A")
            return _verify_disjuncts(
                net, box, time_limit=time_limit, bound_method=bound_method, lp_refine=lp_refine, tol=tol
            )
    elif isinstance(box, tuple) and len(box) == 2:
        lower, upper = box
    else:
        raise InputError(f"milp_verify: box must be a Region or a (lower, upper) pair, got {type(box).__name__}")
    if A is None or b is None:
        raise InputError("milp_verify: A and b are required with a (lower, upper) box")
    k_out = math.prod(net.output_shape)
    a_np, b_np = _spec_rows(A, b, k_out, "milp_verify")
    enc = MilpEncoding(
        net, lower, upper, intermediate=intermediate, splits=splits, bound_method=bound_method, lp_refine=lp_refine
    )
    if a_np.shape[0] == 0:
        # No row: every output is unsafe, so any point of the box is a counterexample.
        x = enc.lower[0]
        with torch.no_grad():
            y = enc.net.forward(x.unsqueeze(0))[0].reshape(-1)
        return Verdict("falsified", x, y, None, time.perf_counter() - start, "milp", 0)
    out = enc.output_vars()
    k = a_np.shape[0]
    t_idx = enc.nvar
    # t >= A_i y - b_i   <=>   A_i y - t <= b_i
    rows = sp.coo_matrix(a_np)
    extra = sp.csr_matrix(
        (
            np.concatenate([rows.data, -np.ones(k)]),
            (np.concatenate([rows.row, np.arange(k)]), np.concatenate([out[rows.col], np.full(k, t_idx)])),
        ),
        shape=(k, enc.nvar + 1),
    )
    obj = np.zeros(enc.nvar + 1)
    obj[t_idx] = 1.0
    sol = enc.solve(
        obj,
        extra=(extra, np.full(k, -np.inf), b_np),
        extra_vars=(np.array([-np.inf]), np.array([np.inf])),
        time_limit=time_limit,
    )
    seconds = time.perf_counter() - start
    if sol.status == 2:
        # Infeasible: the domain itself is empty (contradictory splits), so nothing in it is unsafe.
        return Verdict("verified", None, None, math.inf, seconds, "milp", sol.nodes)
    lower_bound = sol.dual_bound
    if lower_bound is not None and lower_bound > tol:
        return Verdict("verified", None, None, lower_bound, seconds, "milp", sol.nodes)
    if sol.x is not None and sol.fun is not None and sol.fun <= tol:
        x = enc.input_point(sol.x)
        with torch.no_grad():
            y = enc.net.forward(x.unsqueeze(0))[0].reshape(-1)
        ok = bool((y.cpu().numpy() @ a_np.T <= b_np).all())
        if ok:
            return Verdict("falsified", x, y, lower_bound, seconds, "milp", sol.nodes)
    status = "timeout" if sol.status == 1 else "unknown"
    return Verdict(status, None, None, lower_bound, seconds, "milp", sol.nodes)  # type: ignore[arg-type]


def _verify_disjuncts(
    net: Network, region: Region, *, time_limit: float | None, bound_method: str | None, lp_refine: bool, tol: float
) -> Verdict:
    start = time.perf_counter()
    worst: float | None = math.inf
    nodes = 0
    pending: Verdict | None = None
    for a, b in region.unsafe:
        left = None if time_limit is None else time_limit - (time.perf_counter() - start)
        if left is not None and left <= 0:
            return Verdict("timeout", None, None, None, time.perf_counter() - start, "milp", nodes)
        v = milp_verify(
            net, (region.lower, region.upper), a, b, time_limit=left, bound_method=bound_method, lp_refine=lp_refine,
            tol=tol,
        )  # fmt: skip
        nodes += v.domains
        if v.status == "falsified":
            v.seconds, v.domains = time.perf_counter() - start, nodes
            return v
        if v.status != "verified":
            pending = v
        worst = None if worst is None or v.lower_bound is None else min(worst, v.lower_bound)
    seconds = time.perf_counter() - start
    if pending is not None:
        return Verdict(pending.status, None, None, worst, seconds, "milp", nodes)
    return Verdict("verified", None, None, worst, seconds, "milp", nodes)
