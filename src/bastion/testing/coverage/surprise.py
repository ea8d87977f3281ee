"""Surprise adequacy and surprise coverage (Kim, Feldt & Yoo, "Guiding Deep Learning System Testing using Surprise
Adequacy", ICSE 2019; reference code: github.com/coinse/sadl).

The *activation trace* (AT) of an input is the vector of neuron values of the layers under test; the *surprise
adequacy* (SA) of a test input says how far its AT lies from the ATs of the training data (the profiling set), both
taken class by class, the class being the model's prediction (as the reference code does for training and test
inputs alike):

* LSA, likelihood-based: ``-log f_c(AT(x))``, ``f_c`` a Gaussian kernel density estimate of the training ATs of
  the input's predicted class ``c`` (Scott's bandwidth, as ``scipy.stats.gaussian_kde``, which the reference code
  uses; computed here in torch, batched). Neurons whose variance in some class is below ``var_threshold``
  (``1e-5``, the reference code's) are left out of every class's density, as in the reference code.
* DSA, distance-based: ``dist_a / dist_b`` with ``x_a`` the training input of class ``c`` whose AT is nearest to
  ``AT(x)``, ``dist_a`` that distance, and ``dist_b`` the distance from ``AT(x_a)`` to the nearest training AT of
  another class (Euclidean).

*Surprise coverage* (LSC, DSC) cuts ``(lower, upper]`` into ``buckets`` equal segments (the paper's ``(0, U]``
into ``n``); a segment is covered when some test input's SA falls into it. SA values outside ``(lower, upper]``,
infinite ones (a class the profiling set never predicted, LSA) and NaN cover nothing. Defaults: 1000 buckets
and ``U = 2000`` for LSA (the reference code's ``--n_bucket`` and ``--upper_bound``); ``U = 2`` for DSA (our
choice: DSA is about 1 for an input as close to another class as to its own; the reference code has one
upper-bound default, 2000, fitting LSA only). The reference code takes the minimum SA of the test set as the lower
end; ``lower = 0`` here, as in the paper, so that coverage streams.

Layers: one deep layer by default, the last activation module (the reference code picks one, e.g. the last hidden
activation of its MNIST model); ``granularity="channel"`` by default, a convolution channel being one neuron valued
by its spatial mean, as the reference code's ``_aggr_output`` does. The predicted class comes from the ``output``
module (default: the last module of ``model.named_modules()`` without children, the logits of a ``Sequential``);
it is probed along with the layers under test.

LSA needs, per class, more training inputs than neurons kept (else the kernel covariance is singular and
``gaussian_kde`` fails too): a clear error names the class and the sizes.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from bastion.errors import InputError, ModelError
from bastion.testing.coverage.base import CoverageMetric, default_layers, resolve_layers
from bastion.testing.coverage.deepgauge import _begin, _first_for, fold_items

__all__ = ["DistanceSurpriseCoverage", "LikelihoodSurpriseCoverage", "SurpriseCoverage"]

PAPER = "Kim, Feldt & Yoo, Guiding Deep Learning System Testing using Surprise Adequacy, ICSE 2019"
_KEY = "surprise"
_ROWS = 1 << 22  # elements per distance matrix chunk


def _number(value: Any, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(float(value)):
        raise InputError(f"{name} must be a finite number, got {value!r}")
    return float(value)


class SurpriseCoverage(CoverageMetric):
    """Base class of LSC and DSC (module docstring): buckets of the surprise adequacy of the test inputs.

    Items: ``buckets`` segments of ``(lower, upper]``, under the single key ``"surprise"``; :meth:`adequacy` gives
    the SA values themselves.

    Args:
        upper: the upper end ``U`` of the bucketed range.
        buckets: number of segments (default 1000, the reference code's).
        lower: the lower end (default 0, the paper's).
        layers: the layers whose values form the activation trace (``None``: the last activation module).
        output: the module whose output (N, K) gives the predicted class (``None``: the model's last leaf module).
        granularity: ``"channel"`` (default, the reference code's) or ``"element"``.
    """

    paper = PAPER
    needs_profile = True

    def __init__(
        self,
        *,
        upper: float,
        buckets: int = 1000,
        lower: float = 0.0,
        layers: Sequence[str] | str | None = None,
        output: str | None = None,
        granularity: str = "channel",
    ) -> None:
        if isinstance(buckets, bool) or not isinstance(buckets, int) or buckets < 1:
            raise InputError(f"buckets must be an integer >= 1, got {buckets!r}")
        self.upper, self.lower = _number(upper, "upper"), _number(lower, "lower")
        if not self.lower < self.upper:
            raise InputError(f"lower must be below upper, got lower={lower!r}, upper={upper!r}")
        if output is not None and not isinstance(output, str):
            raise InputError(f"output must be a module name or None, got {output!r}")
        super().__init__(layers=layers, granularity=granularity)
        self.buckets = buckets
        self._output_given = output
        self.output = output
        self.trace_layers: list[str] | None = None
        self._ats = torch.zeros(0, 0)
        self._pred = torch.zeros(0, dtype=torch.long)
        self._fitted: Any = None

    def params(self) -> dict[str, Any]:
        return {
            "upper": self.upper,
            "buckets": self.buckets,
            "lower": self.lower,
            "output": self._output_given,
            **super().params(),
            "layers": self.trace_layers or self._layers_given,
        }

    def bind(self, model: nn.Module) -> list[str]:
        if self.layers is not None:
            return self.layers
        names = dict(model.named_modules())
        if self._layers_given is None:
            acts = default_layers(model)
            if not acts:
                raise ModelError(f"{type(model).__name__} has no activation module: name the layers with layers=[...]")
            trace = acts[-1:]
        else:
            trace = resolve_layers(model, self._layers_given)
        if self.output is None:
            leaves = [n for n, m in names.items() if n and not list(m.children())]
            if not leaves:
                raise ModelError("the model has no submodule whose output gives the class: pass output=...")
            self.output = leaves[-1]
        elif self.output not in names:
            raise InputError(f"unknown output module {self.output!r}; the model's modules are: {', '.join(names)}")
        self.trace_layers = trace
        self.layers = list(dict.fromkeys([*trace, self.output]))
        return self.layers

    # -- activation traces -----------------------------------------------------------------------------------------
    def _trace(self, values: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        """The ATs ``(N, P)`` (float64) and predicted classes ``(N,)`` of a batch of neuron values."""
        out = values[str(self.output)]
        if out.dim() != 2 or out.shape[1] < 2:
            raise ModelError(
                f"the output module {self.output!r} gave shape {tuple(out.shape)}, not logits (N, K >= 2): pass "
                "output= the name of the module returning the class scores"
            )
        ats = torch.cat([values[k].flatten(1) for k in self.trace_layers or []], dim=1).to(torch.float64)
        return ats, out.argmax(dim=1)

    def profile_batch(self, values: dict[str, Tensor]) -> None:
        ats, pred = self._trace(values)
        old = self._ats if self._pred.numel() else torch.zeros(0, ats.shape[1], dtype=torch.float64)
        if old.shape[1] != ats.shape[1]:
            raise ModelError(f"activation traces changed width from {old.shape[1]} to {ats.shape[1]}")
        self._ats = torch.cat([old, ats.detach().cpu()])  # rebound, never mutated
        self._pred = torch.cat([self._pred, pred.cpu()])
        self._fitted = None

    def profile_state(self) -> Any:
        if not self.profiled:
            return None
        return {"ats": self._ats.clone(), "pred": self._pred.clone()}

    def load_profile_state(self, state: Any) -> None:
        if state is None:
            self._ats, self._pred, self.profiled = torch.zeros(0, 0), torch.zeros(0, dtype=torch.long), False
        elif isinstance(state, dict) and {"ats", "pred"} <= set(state):
            self._ats, self._pred, self.profiled = state["ats"].clone(), state["pred"].clone(), True
        else:
            raise InputError(f"a {self.name} profile must be a dict with the training 'ats' and their 'pred'")
        self._fitted = None

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "output": self.output}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        layers = state["params"]["layers"]
        self.trace_layers = list(layers) if layers is not None else None
        self.output = state.get("output", self._output_given)
        self.layers = None
        if self.trace_layers is not None and self.output is not None:
            self.layers = list(dict.fromkeys([*self.trace_layers, self.output]))

    # -- adequacy and coverage -------------------------------------------------------------------------------------
    def adequacy(self, values: dict[str, Tensor]) -> Tensor:
        """The surprise adequacy ``(N,)`` (float64, CPU) of a batch of neuron values ``{layer: (N, P)}``."""
        if not self.profiled or not self._pred.numel():
            raise InputError(f"the {self.name} criterion needs a profiling set with at least one input")
        ats, pred = self._trace(values)
        if ats.shape[1] != self._ats.shape[1]:
            raise ModelError(
                f"the activation traces have {ats.shape[1]} neurons, the profiled ones {self._ats.shape[1]}"
            )
        return self._adequacy(ats.cpu(), pred.cpu())

    def _adequacy(self, ats: Tensor, pred: Tensor) -> Tensor:
        raise NotImplementedError

    def satisfied(self, layer: str, values: Tensor) -> Tensor:
        raise InputError("surprise adequacy spans the activation trace and the prediction: use update()")

    def update(self, acts: dict[str, Tensor], index: Tensor | None = None) -> Tensor:
        index, vals = _begin(self, acts, index)
        sa = self.adequacy(vals)
        width = (self.upper - self.lower) / self.buckets
        valid = (sa > self.lower) & (sa <= self.upper)  # NaN and inf fail both tests
        bucket = (torch.ceil((sa - self.lower) / width) - 1).clamp(0, self.buckets - 1)
        first = _first_for(self, _KEY, self.buckets)
        new = fold_items(first, bucket[valid].to(torch.long), index[valid], index)
        self.inputs += index.shape[0]
        return new


class LikelihoodSurpriseCoverage(SurpriseCoverage):
    """Likelihood-based surprise coverage (LSC): buckets of LSA (module docstring).

    Args:
        upper: the upper end of the bucketed LSA range (default 2000, the reference code's).
        buckets: number of segments (default 1000).
        lower: the lower end (default 0).
        var_threshold: neurons with a smaller variance in some class are left out (default 1e-5).
        layers: the activation trace's layers (``None``: the last activation module).
        output: the module giving the predicted class (``None``: the last leaf module).
        granularity: ``"channel"`` (default) or ``"element"``.
    """

    name = "lsc"

    def __init__(
        self,
        *,
        upper: float = 2000.0,
        buckets: int = 1000,
        lower: float = 0.0,
        var_threshold: float = 1e-5,
        layers: Sequence[str] | str | None = None,
        output: str | None = None,
        granularity: str = "channel",
    ) -> None:
        threshold = _number(var_threshold, "var_threshold")
        if threshold < 0:
            raise InputError(f"var_threshold must be >= 0, got {var_threshold!r}")
        super().__init__(
            upper=upper, buckets=buckets, lower=lower, layers=layers, output=output, granularity=granularity
        )
        self.var_threshold = threshold

    def params(self) -> dict[str, Any]:
        return {"var_threshold": self.var_threshold, **super().params()}

    def _fit(self) -> tuple[Tensor, dict[int, tuple[Tensor, Tensor, float]]]:
        """Kept neurons and, per class, (whitening factor L, whitened ATs, log-density constant)."""
        if self._fitted is not None:
            return self._fitted  # type: ignore[no-any-return]
        ats, pred = self._ats, self._pred
        classes = pred.unique().tolist()
        keep = torch.ones(ats.shape[1], dtype=torch.bool)
        for c in classes:
            keep &= ats[pred == c].var(dim=0, correction=0) >= self.var_threshold  # np.var, as the reference
        if not bool(keep.any()):
            raise ModelError(f"every neuron has a variance below var_threshold={self.var_threshold} in some class")
        kdes: dict[int, tuple[Tensor, Tensor, float]] = {}
        d = int(keep.sum())
        for c in classes:
            x = ats[pred == c][:, keep]
            n = x.shape[0]
            factor = n ** (-1.0 / (d + 4))  # Scott's rule, as gaussian_kde
            cov = (torch.cov(x.T) if n > 1 else torch.full((d, d), math.nan, dtype=x.dtype)) * factor**2
            chol, info = torch.linalg.cholesky_ex(cov.reshape(d, d))
            if n <= d or int(info) != 0:
                raise ModelError(
                    f"class {c} has {n} profiling inputs for {d} neurons: its kernel covariance is singular (as "
                    "gaussian_kde's would be); profile on more data, or choose a layer with fewer neurons (or "
                    "granularity='channel')"
                )
            white = torch.linalg.solve_triangular(chol, x.T, upper=False).T
            const = -math.log(n) - float(torch.log(torch.diagonal(chol)).sum()) - 0.5 * d * math.log(2 * math.pi)
            kdes[int(c)] = (chol, white, const)
        self._fitted = (keep, kdes)
        return self._fitted

    def _adequacy(self, ats: Tensor, pred: Tensor) -> Tensor:
        keep, kdes = self._fit()
        x = ats[:, keep]
        out = torch.full((x.shape[0],), math.inf, dtype=torch.float64)  # a class never predicted: no density
        for c, (chol, white, const) in kdes.items():
            rows = (pred == c).nonzero().flatten()
            if not rows.numel():
                continue
            z = torch.linalg.solve_triangular(chol, x[rows].T, upper=False).T
            step = max(1, _ROWS // white.shape[0])
            for s in range(0, rows.shape[0], step):
                d2 = torch.cdist(z[s : s + step], white).square()
                out[rows[s : s + step]] = -(torch.logsumexp(-0.5 * d2, dim=1) + const)
        return out


class DistanceSurpriseCoverage(SurpriseCoverage):
    """Distance-based surprise coverage (DSC): buckets of DSA (module docstring).

    Args:
        upper: the upper end of the bucketed DSA range (default 2.0, module docstring).
        buckets: number of segments (default 1000).
        lower: the lower end (default 0).
        layers: the activation trace's layers (``None``: the last activation module).
        output: the module giving the predicted class (``None``: the last leaf module).
        granularity: ``"channel"`` (default) or ``"element"``.
    """

    name = "dsc"

    def __init__(
        self,
        *,
        upper: float = 2.0,
        buckets: int = 1000,
        lower: float = 0.0,
        layers: Sequence[str] | str | None = None,
        output: str | None = None,
        granularity: str = "channel",
    ) -> None:
        super().__init__(
            upper=upper, buckets=buckets, lower=lower, layers=layers, output=output, granularity=granularity
        )

    def _adequacy(self, ats: Tensor, pred: Tensor) -> Tensor:
        train, tpred = self._ats, self._pred
        out = torch.empty(ats.shape[0], dtype=torch.float64)
        step = max(1, _ROWS // max(1, train.shape[0]))
        for s in range(0, ats.shape[0], step):
            x, c = ats[s : s + step], pred[s : s + step]
            same = c[:, None] == tpred[None, :]
            dist = torch.cdist(x, train)
            dist_a, a = dist.masked_fill(~same, math.inf).min(dim=1)
            # the nearest training AT of another class than c, from x_a
            other = torch.cdist(train[a], train).masked_fill(same, math.inf)
            dist_b = other.min(dim=1).values
            # a class without training inputs gives inf, no other class 0: neither covers a bucket
            out[s : s + step] = dist_a / dist_b
        return out
