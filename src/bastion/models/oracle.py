"""Black-box oracles: a model, or any callable, seen only through its answers, with every query counted.

A deployed model is reached through an API: it answers a batch of inputs with scores (logits or probabilities) or
with labels only, nothing else — no gradients, no weights — and every answer costs. :class:`BlackBox` is that view of
anything callable: a ``torch.nn.Module``, a NumPy function, a scikit-learn estimator, an onnxruntime session or a
function that calls a remote endpoint. It

* **answers in batches**: the callable is invoked on chunks of at most ``batch_size`` inputs, never one at a time;
* **counts every query**: ``queries`` is the number of inputs answered (one input = one query), ``calls`` the
  number of invocations of the callable;
* **enforces a total budget** (``budget``): a request that the remaining budget cannot pay for is refused whole with
  :class:`QueryBudgetExhausted` before anything is sent, so the budget is never exceeded; ``sample_budget`` caps what
  one attack may spend on one sample (read by the attack machinery, which knows which query belongs to which sample);
* **refuses gradients**: the callable runs under ``torch.no_grad()``; differentiating through the oracle raises an
  :class:`~bastion.errors.InputError`, and the shared attack base refuses white-box attacks on it up front;
* **keeps labels-only oracles honest**: with ``returns="labels"`` any attempt to read scores (``forward``,
  ``scores``) raises, so a decision-based attack provably never sees a score.

``BlackBox`` is an ``nn.Module`` whose ``forward`` returns scores as a float tensor (N, K) on the input's device, so
everything that takes a model (the attacks, ``evaluate``, the result store's fingerprints) takes an oracle too. The
scores are *logit-like*: their softmax is the oracle's class distribution. Logits pass through unchanged;
probabilities are returned as their logarithm (clamped at the dtype's smallest positive number, so never ``-inf``),
which keeps the argmax and makes every margin a log-probability margin, the form score-based attacks such as ZOO
use.

Per-sample accounting is :class:`QueryLedger`: an attack charges each query to the sample it was made for, asks
what each sample can still afford (its own cap and the oracle's total), and the attack base checks that the queries an
attack reports are exactly the ones it made.

Adapters: :func:`from_numpy`, :func:`from_sklearn` (``predict_proba``, ``decision_function`` or ``predict``) and
:func:`from_onnx` (a file or an ``onnxruntime.InferenceSession``).
"""

from __future__ import annotations

import hashlib
import math
import os
import pickle
import uuid
from collections.abc import Callable
from typing import Any, ClassVar, Literal

import numpy as np
import torch
from torch import Tensor, nn

from bastion.errors import BastionError, InputError, ModelError

__all__ = [
    "RETURNS",
    "BlackBox",
    "QueryBudgetExhausted",
    "QueryLedger",
    "from_numpy",
    "from_onnx",
    "from_sklearn",
]

Returns = Literal["logits", "probabilities", "log_probabilities", "labels"]
#: What an oracle's callable may return.
RETURNS: tuple[str, ...] = ("logits", "probabilities", "log_probabilities", "labels")

#: A per-sample allowance that stands for "unlimited" in integer arithmetic.
UNLIMITED = 1 << 62


class QueryBudgetExhausted(BastionError):
    """The oracle's total query budget cannot pay for the queries asked; none of them was sent.

    Attributes:
        asked: queries requested.
        left: queries the budget still allowed.
    """

    def __init__(self, message: str, *, asked: int, left: int) -> None:
        super().__init__(message)
        self.asked = asked
        self.left = left


def _positive_or_none(name: str, value: object) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or int(value) < 1:
        raise InputError(f"{name} must be a positive integer or None, got {value!r}")
    return int(value)


class _NoGradient(torch.autograd.Function):
    """Identity on the oracle's scores whose backward pass refuses: a clear error instead of a silent zero."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, scores: Tensor) -> Tensor:
        return scores.clone()

    @staticmethod
    def backward(ctx: Any, *grads: Tensor) -> Any:
        raise InputError(
            "a BlackBox oracle gives no gradients: attack it with a score-based or decision-based attack "
            "(Attack.access 'score' or 'label'), or attack the underlying torch model directly"
        )


class BlackBox(nn.Module):
    """A black-box oracle: any callable answering batches of inputs with scores or labels, every query counted.

    Args:
        fn: the callable. It receives a detached tensor batch (n, ...) on the oracle's device (adapters convert it
            to what they wrap) and returns, for ``n`` inputs, scores of shape (n, K) or labels of shape (n,) as a
            tensor, NumPy array or nested sequence. A ``torch.nn.Module`` is registered as a submodule, so
            ``.to(device)``, eval mode and the model fingerprint reach it.
        returns: what ``fn`` returns: ``"logits"``, ``"probabilities"``, ``"log_probabilities"`` or ``"labels"``.
        num_classes: number of classes K; required for ``"labels"`` (labels alone do not tell it), checked
            against the scores otherwise.
        batch_size: most inputs sent to ``fn`` in one call.
        budget: total queries this oracle answers over its life (until :meth:`reset`), or ``None``.
        sample_budget: most queries one attack call may spend on one sample, the clean query and the final
            re-verification included, or ``None``. Enforced by the attack machinery through
            :class:`QueryLedger` (the oracle itself cannot tell samples apart).
        fingerprint: a string identifying the model behind the oracle, for the result store's resume logic.
            Adapters derive it from what they wrap (file bytes, the estimator's pickle, module weights); for other
            callables give one (e.g. an API name and model version): without it every BlackBox gets a fresh random
            fingerprint, so a store never resumes its runs (a guessed one could resume another model's run).
        device: the device attacks should put their tensors on (default: the module's device, else CPU).

    Attributes:
        queries: inputs answered so far.
        calls: invocations of ``fn`` so far.

    Example:
        >>> oracle = BlackBox(model, returns="logits", budget=100_000)  # doctest: +SKIP
        >>> res = NES(queries=2000)(oracle, x, y, threat=LpBall("linf", 0.05))  # doctest: +SKIP
        >>> oracle.queries, res.queries  # doctest: +SKIP
    """

    def __init__(
        self,
        fn: Callable[[Tensor], Any],
        *,
        returns: Returns = "logits",
        num_classes: int | None = None,
        batch_size: int = 1024,
        budget: int | None = None,
        sample_budget: int | None = None,
        fingerprint: str | None = None,
        device: str | torch.device | None = None,
    ) -> None:
        super().__init__()
        if isinstance(fn, BlackBox):
            raise InputError("fn is already a BlackBox; wrap the underlying callable once")
        if not callable(fn):
            raise InputError(f"fn must be callable (a model, a function, an API client), got {type(fn).__name__}")
        if returns not in RETURNS:
            raise InputError(f"returns must be one of {', '.join(map(repr, RETURNS))}, got {returns!r}")
        k = _positive_or_none("num_classes", num_classes)
        if k is not None and k < 2:
            raise InputError(f"num_classes must be at least 2, got {num_classes!r}")
        if returns == "labels" and k is None:
            raise InputError(
                "a labels-only BlackBox needs num_classes (labels alone do not tell how many classes exist)"
            )
        bs = _positive_or_none("batch_size", batch_size)
        if bs is None:
            raise InputError("batch_size must be a positive integer, got None")
        if fingerprint is not None and not isinstance(fingerprint, str):
            raise InputError(f"fingerprint must be a string or None, got {type(fingerprint).__name__}")
        if isinstance(fn, nn.Module):
            self.module = fn  # registered once: weights, device and eval mode follow the oracle
            default_fp = f"module:{type(fn).__module__}.{type(fn).__qualname__}"
        else:
            default_fp = f"random:{uuid.uuid4().hex}"
        # a plain attribute (not a second registration of a module): what the queries call
        self._fn: Callable[[Tensor], Any]
        object.__setattr__(self, "_fn", fn)
        self.returns: str = returns
        self._given_classes = k
        self.num_classes: int | None = k
        self.batch_size: int = bs
        self.budget = _positive_or_none("budget", budget)
        self.sample_budget = _positive_or_none("sample_budget", sample_budget)
        self.fingerprint: str = fingerprint if fingerprint is not None else default_fp
        try:
            anchor = torch.zeros(0, device=device) if device is not None else torch.zeros(0)
        except (RuntimeError, TypeError) as exc:
            raise InputError(f"device {device!r} is not a valid torch device ({exc})") from None
        # an empty buffer: model_device() reads the oracle's device from it, .to() moves it
        self.register_buffer("_anchor", anchor, persistent=False)
        self.queries = 0
        self.calls = 0

    # ----------------------------------------------------------------------------------------------- budget
    @property
    def remaining(self) -> int | None:
        """Queries the total budget still allows (``None``: no budget)."""
        return None if self.budget is None else max(self.budget - self.queries, 0)

    def reset(self) -> None:
        """Forget the queries answered so far (the budget starts again)."""
        self.queries = 0
        self.calls = 0

    def _charge(self, n: int) -> None:
        left = self.remaining
        if left is not None and n > left:
            raise QueryBudgetExhausted(
                f"the oracle's query budget ({self.budget}) has {left} queries left, {n} were asked; nothing was "
                "queried (raise budget, or reset() the oracle)",
                asked=n,
                left=left,
            )

    # ----------------------------------------------------------------------------------------------- queries
    def forward(self, x: Tensor) -> Tensor:
        """Scores (N, K) for the batch ``x``: logit-like, float, on ``x``'s device; N queries.

        Raises:
            InputError: on a labels-only oracle (its scores cannot be read), or for a malformed input.
            QueryBudgetExhausted: the total budget cannot pay for N queries (none is made).
        """
        if self.returns == "labels":
            raise InputError(
                "this BlackBox answers with labels only (returns='labels'): its scores cannot be read; use a "
                "decision-based attack (Attack.access == 'label') or call labels(x)"
            )
        scores = self._query(x)
        if torch.is_grad_enabled() and x.requires_grad:
            return _NoGradient.apply(x, scores)
        return scores

    def scores(self, x: Tensor) -> Tensor:
        """The same as calling the oracle: scores (N, K); N queries."""
        return self(x)

    def labels(self, x: Tensor) -> Tensor:
        """Predicted labels (N,) as int64 on ``x``'s device; N queries (the argmax of the scores for score oracles)."""
        out = self._query(x)
        return out if self.returns == "labels" else out.argmax(dim=1)

    def _query(self, x: Tensor) -> Tensor:
        if not torch.is_tensor(x) or not x.is_floating_point() or x.dim() == 0:
            what = f"{x.dtype} tensor of shape {tuple(x.shape)}" if torch.is_tensor(x) else type(x).__name__
            raise InputError(f"a BlackBox is queried with a floating-point batch (N, ...), got {what}")
        n = int(x.shape[0])
        self._charge(n)
        chunks = []
        with torch.no_grad():
            xd = x.detach()
            for start in range(0, n, self.batch_size):
                part = xd[start : start + self.batch_size]
                # counted before the call: a query that was sent is spent even if the callable then fails
                self.queries += part.shape[0]
                self.calls += 1
                chunks.append(self._convert(self._fn(part), part.shape[0], x))
        if not chunks:
            if self.returns == "labels":
                return torch.zeros(0, dtype=torch.long, device=x.device)
            return x.new_zeros((0, self.num_classes or 0))
        return torch.cat(chunks)

    def _convert(self, out: Any, n: int, like: Tensor) -> Tensor:
        """The callable's answer for ``n`` inputs as a checked tensor on ``like``'s device."""
        try:
            t = out.detach() if torch.is_tensor(out) else torch.as_tensor(np.asarray(out))
        except (TypeError, ValueError, RuntimeError) as exc:
            raise ModelError(
                f"BlackBox: the callable returned a {type(out).__name__} that is not an array ({exc})"
            ) from None
        if self.returns == "labels":
            return self._labels(t, n, like)
        if t.dim() != 2 or t.shape[0] != n or t.shape[1] < 2:
            hint = "; a binary scorer's single score s per input must be turned into two scores, e.g. [0, s]"
            raise ModelError(
                f"BlackBox: expected scores of shape ({n}, K) with K >= 2 for {n} inputs, got shape "
                f"{tuple(t.shape)}{hint if t.dim() == 1 else ''}"
            )
        if t.dtype == torch.bool or t.is_complex():
            raise ModelError(f"BlackBox: scores must be real numbers, got dtype {t.dtype}")
        dtype = like.dtype if like.dtype in (torch.float32, torch.float64) else torch.float32
        t = t.to(device=like.device, dtype=dtype)
        k = int(t.shape[1])
        if self.num_classes is None:
            self.num_classes = k
        elif k != self.num_classes:
            raise ModelError(f"BlackBox: the callable returned {k} scores per input, expected {self.num_classes}")
        if bool(torch.isnan(t).any()):
            raise ModelError("BlackBox: the callable returned NaN scores; check the model and that inputs are valid")
        if self.returns == "logits":
            if not bool(torch.isfinite(t).all()):
                raise ModelError("BlackBox: the callable returned infinite logits")
            return t
        tiny = torch.finfo(dtype).tiny
        if self.returns == "probabilities":
            if bool((t < 0).any()) or bool((t > 1 + 1e-4).any()):
                raise ModelError(
                    "BlackBox: returns='probabilities' but the callable returned values outside [0, 1]; "
                    "use returns='logits' for raw scores"
                )
            return t.clamp_min(tiny).log()
        if bool((t == math.inf).any()):
            raise ModelError("BlackBox: returns='log_probabilities' but the callable returned +inf")
        return t.clamp_min(math.log(tiny))

    def _labels(self, t: Tensor, n: int, like: Tensor) -> Tensor:
        if t.dim() == 2 and t.shape[1] == 1:
            t = t[:, 0]
        if t.dim() != 1 or t.shape[0] != n:
            raise ModelError(f"BlackBox: expected {n} labels of shape ({n},), got shape {tuple(t.shape)}")
        if t.dtype == torch.bool or t.is_complex():
            raise ModelError(f"BlackBox: labels must be integers, got dtype {t.dtype}")
        if t.is_floating_point():
            if not bool(torch.isfinite(t).all()) or not bool((t == t.round()).all()):
                raise ModelError("BlackBox: labels must be whole numbers (class indices)")
        labels = t.to(device=like.device, dtype=torch.long)
        k = self.num_classes or 0
        if n and (int(labels.min()) < 0 or int(labels.max()) >= k):
            bad = int(labels.min()) if int(labels.min()) < 0 else int(labels.max())
            raise ModelError(f"BlackBox: the callable returned label {bad}, outside the {k} classes [0, {k})")
        return labels

    # ----------------------------------------------------------------------------------------------- identity
    def get_extra_state(self) -> dict[str, Any]:
        # what identifies the oracle for model_fingerprint(); counters are deliberately left out
        return {"fingerprint": self.fingerprint, "returns": self.returns, "num_classes": self._given_classes}

    def set_extra_state(self, state: Any) -> None:
        if isinstance(state, dict) and "fingerprint" in state:
            self.fingerprint = str(state["fingerprint"])

    def extra_repr(self) -> str:
        parts = [f"returns={self.returns!r}", f"num_classes={self.num_classes}", f"queries={self.queries}"]
        if self.budget is not None:
            parts.append(f"budget={self.budget}")
        if self.sample_budget is not None:
            parts.append(f"sample_budget={self.sample_budget}")
        return ", ".join(parts)


# --------------------------------------------------------------------------------------------------- accounting
class QueryLedger:
    """Per-sample query accounting of one attack run: every query is charged to the sample it was made for.

    Built by :meth:`bastion.attacks.base.CountingModel.ledger` for the samples an attack's ``run`` receives (index
    ``i`` is ``x[i]`` of ``run``). An attack asks :meth:`afford` which samples can still pay for their next step, then
    queries through :meth:`scores` or :meth:`labels` with one sample index per queried row; :attr:`used` is what it
    returns as its per-sample query count. A request beyond a sample's cap is an attack bug (``RuntimeError``); a
    request beyond the oracle's total budget raises :class:`QueryBudgetExhausted` (``afford`` never lets that happen).

    Args:
        n: number of samples.
        limit: most queries per sample, or ``None``.
        device: device of the counters.
        scores: the counted scores function (rows to (rows, K)).
        labels: the counted labels function (rows to (rows,)).
        total_left: queries the oracle's total budget still allows this run, or ``None`` (no budget).
    """

    def __init__(
        self,
        n: int,
        *,
        limit: int | None,
        device: torch.device,
        scores: Callable[[Tensor], Tensor],
        labels: Callable[[Tensor], Tensor],
        total_left: Callable[[], int | None],
    ) -> None:
        self.n = int(n)
        self.limit = None if limit is None else max(int(limit), 0)
        self.used = torch.zeros(self.n, dtype=torch.long, device=device)
        self._scores = scores
        self._labels = labels
        self._total_left = total_left

    def left(self) -> Tensor:
        """Queries each sample may still spend (n,), int64 (a huge number when unlimited)."""
        if self.limit is None:
            return torch.full_like(self.used, UNLIMITED)
        return (self.limit - self.used).clamp_min(0)

    def total_left(self) -> int | None:
        """Queries the oracle's total budget still allows this run (``None``: no total budget)."""
        return self._total_left()

    def afford(self, rows: Tensor, cost: int | Tensor = 1) -> Tensor:
        """The samples among ``rows`` that can pay ``cost`` more queries each, in their order.

        A sample qualifies when its own allowance covers its cost; then, with a total budget, the qualifying samples
        are kept in order while their summed cost fits in what is left.

        Args:
            rows: distinct sample indices (k,).
            cost: queries each sample's next step needs, one number or one per row (k,).
        """
        rows = rows.reshape(-1)
        c = torch.as_tensor(cost, device=rows.device, dtype=torch.long).expand(rows.shape[0])
        ok = self.left()[rows] >= c
        rows, c = rows[ok], c[ok]
        total = self._total_left()
        if total is not None and rows.numel():
            rows = rows[c.cumsum(0) <= total]
        return rows

    def _charge(self, x: Tensor, rows: Tensor) -> Tensor:
        rows = torch.as_tensor(rows, device=self.used.device).reshape(-1).long()
        if rows.shape[0] != x.shape[0]:
            raise RuntimeError(f"QueryLedger: {x.shape[0]} inputs but {rows.shape[0]} sample indices")
        counts = torch.bincount(rows, minlength=self.n)
        if counts.shape[0] > self.n:
            raise RuntimeError(f"QueryLedger: sample index {int(rows.max())} out of range for {self.n} samples")
        if self.limit is not None and bool(((self.used + counts) > self.limit).any()):
            raise RuntimeError(
                "QueryLedger: the attack asked for queries beyond a sample's budget; it must check afford() first"
            )
        total = self._total_left()
        if total is not None and rows.shape[0] > total:
            raise QueryBudgetExhausted(
                f"the oracle's budget has {total} queries left for this run, {rows.shape[0]} were asked",
                asked=int(rows.shape[0]),
                left=total,
            )
        return counts

    def scores(self, x: Tensor, rows: Tensor) -> Tensor:
        """Scores (k, K) for the inputs ``x`` (k, ...), query ``j`` charged to sample ``rows[j]``."""
        counts = self._charge(x, rows)
        out = self._scores(x)
        self.used += counts
        return out

    def labels(self, x: Tensor, rows: Tensor) -> Tensor:
        """Labels (k,) for the inputs ``x`` (k, ...), query ``j`` charged to sample ``rows[j]``."""
        counts = self._charge(x, rows)
        out = self._labels(x)
        self.used += counts
        return out


# --------------------------------------------------------------------------------------------------- adapters
def _numpy_dtype(dtype: Any) -> np.dtype[Any]:
    try:
        dt = np.dtype(dtype)
    except TypeError:
        raise InputError(f"dtype must be a NumPy floating dtype such as 'float32', got {dtype!r}") from None
    if dt.kind != "f":
        raise InputError(f"dtype must be a NumPy floating dtype such as 'float32', got {dtype!r}")
    return dt


def _check_shape(input_shape: Any) -> tuple[int, ...] | None:
    if input_shape is None:
        return None
    try:
        shape = tuple(int(d) for d in input_shape)
    except (TypeError, ValueError):
        raise InputError(f"input_shape must be a tuple of positive integers, got {input_shape!r}") from None
    if not shape or any(d < 1 for d in shape):
        raise InputError(f"input_shape must be a tuple of positive integers, got {input_shape!r}")
    return shape


def _to_numpy(x: Tensor, dtype: np.dtype[Any], shape: tuple[int, ...] | None, where: str) -> np.ndarray:
    arr = x.detach().cpu().numpy().astype(dtype, copy=False)
    if shape is None:
        return arr
    if arr.shape[0] and math.prod(shape) != arr[0].size:
        raise InputError(f"{where}: inputs of shape {tuple(x.shape[1:])} cannot be reshaped to input_shape {shape}")
    return arr.reshape(arr.shape[0], *shape)


def from_numpy(
    fn: Callable[[np.ndarray], Any],
    *,
    returns: Returns = "logits",
    num_classes: int | None = None,
    input_shape: tuple[int, ...] | None = None,
    dtype: Any = "float32",
    **oracle: Any,
) -> BlackBox:
    """A :class:`BlackBox` around a NumPy function ``fn(batch) -> scores or labels``.

    Args:
        fn: takes a NumPy array (n, *input_shape) and returns (n, K) scores or (n,) labels.
        returns: what ``fn`` returns (see :class:`BlackBox`).
        num_classes: number of classes (required for labels).
        input_shape: per-sample shape ``fn`` expects (inputs are reshaped to it, e.g. ``(64,)`` for flat features),
            or ``None`` to pass the batch's own shape.
        dtype: NumPy floating dtype of the arrays given to ``fn``.
        **oracle: further :class:`BlackBox` options (``batch_size``, ``budget``, ``sample_budget``, ``fingerprint``,
            ``device``).
    """
    if not callable(fn):
        raise InputError(f"from_numpy needs a callable, got {type(fn).__name__}")
    dt, shape = _numpy_dtype(dtype), _check_shape(input_shape)
    name = getattr(fn, "__qualname__", type(fn).__name__)

    def call(x: Tensor) -> Any:
        return fn(_to_numpy(x, dt, shape, f"from_numpy({name})"))

    return BlackBox(call, returns=returns, num_classes=num_classes, **oracle)


_SKLEARN_METHODS = ("predict_proba", "decision_function", "predict")
_SKLEARN_RETURNS: dict[str, Returns] = {
    "predict_proba": "probabilities",
    "decision_function": "logits",
    "predict": "labels",
}


def from_sklearn(
    estimator: Any,
    *,
    method: Literal["predict_proba", "decision_function", "predict"] = "predict_proba",
    flatten: bool = True,
    dtype: Any = "float64",
    **oracle: Any,
) -> BlackBox:
    """A :class:`BlackBox` around a fitted scikit-learn classifier.

    ``predict_proba`` gives a probability oracle, ``decision_function`` a logit oracle (a binary classifier's single
    score ``s`` becomes the two logits ``[0, s]``, whose softmax is the logistic probability), ``predict`` a
    labels-only oracle. The estimator's ``classes_`` must be ``0 .. K-1`` (bastion's labels are class indices).

    Args:
        estimator: a fitted classifier (``classes_`` set).
        method: the estimator method the oracle answers with.
        flatten: give the estimator flat features (n, D) (scikit-learn's convention) whatever the input shape.
        dtype: NumPy dtype of the features given to the estimator.
        **oracle: further :class:`BlackBox` options; the fingerprint defaults to a hash of the pickled estimator.
    """
    if method not in _SKLEARN_METHODS:
        raise InputError(f"method must be one of {', '.join(map(repr, _SKLEARN_METHODS))}, got {method!r}")
    if not callable(getattr(estimator, method, None)):
        raise InputError(f"{type(estimator).__name__} has no method {method}(); choose another method")
    classes = getattr(estimator, "classes_", None)
    if classes is None:
        raise InputError(f"{type(estimator).__name__} is not fitted (no classes_); fit it before wrapping it")
    classes = np.asarray(classes)
    if classes.ndim != 1 or classes.size < 2 or not np.array_equal(classes, np.arange(classes.size)):
        raise InputError(
            f"the estimator's classes_ must be 0 .. K-1 (class indices), got {classes.tolist()[:10]}; "
            "encode the labels as indices before fitting"
        )
    dt = _numpy_dtype(dtype)
    k = int(classes.size)
    bound = getattr(estimator, method)

    def call(x: Tensor) -> Any:
        arr = x.detach().cpu().numpy().astype(dt, copy=False)
        out = np.asarray(bound(arr.reshape(arr.shape[0], -1) if flatten else arr))
        if method == "decision_function" and out.ndim == 1:
            out = np.stack([np.zeros_like(out), out], axis=1)
        return out

    returns = _SKLEARN_RETURNS[method]
    if "fingerprint" not in oracle:
        try:
            oracle["fingerprint"] = "sklearn:" + hashlib.sha256(pickle.dumps(estimator)).hexdigest()
        except Exception:  # an estimator that cannot be pickled gets the random default
            pass
    return BlackBox(call, returns=returns, num_classes=k, **oracle)


class _SessionRunner:
    """Runs one-input onnxruntime sessions on torch batches (batched when the batch axis allows it)."""

    _TYPES: ClassVar[dict[str, Any]] = {
        "tensor(float)": np.float32,
        "tensor(double)": np.float64,
        "tensor(float16)": np.float16,
    }

    def __init__(self, session: Any, output: str | None) -> None:
        inputs = session.get_inputs()
        if len(inputs) != 1:
            raise InputError(f"from_onnx: a classifier session takes one input, this one has {len(inputs)}")
        inp = inputs[0]
        if inp.type not in self._TYPES:
            raise InputError(
                f"from_onnx: the session's input {inp.name!r} has type {inp.type}; a float input is needed"
            )
        names = [o.name for o in session.get_outputs()]
        if output is not None and output not in names:
            raise InputError(f"from_onnx: the session has no output {output!r}; its outputs are {names}")
        self.session = session
        self.name = inp.name
        self.output = output or names[0]
        self.np_dtype = self._TYPES[inp.type]
        dims = list(inp.shape)
        lead = dims[0] if dims else None
        # the leading dimension is the batch when symbolic (a string / None) or fixed at 1
        self.batched = bool(dims) and (not isinstance(lead, int) or lead == 1)
        self.dynamic = self.batched and not isinstance(lead, int)
        per = dims[1:] if self.batched else dims
        if not all(isinstance(d, int) and d > 0 for d in per):
            raise InputError(f"from_onnx: the session's input shape {dims} has symbolic non-batch dimensions")
        self.sample_shape = tuple(int(d) for d in per)

    def __call__(self, x: Tensor) -> np.ndarray:
        size = math.prod(self.sample_shape)
        if x[0].numel() != size:
            raise InputError(
                f"from_onnx: the model takes inputs of shape {self.sample_shape}, got {tuple(x.shape[1:])}"
            )
        arr = x.detach().cpu().numpy().astype(self.np_dtype).reshape(x.shape[0], *self.sample_shape)
        if self.dynamic:
            return np.asarray(self.session.run([self.output], {self.name: arr})[0]).reshape(x.shape[0], -1)
        rows = []
        for i in range(arr.shape[0]):  # a fixed batch of one: the session cannot take more
            one = arr[i : i + 1] if self.batched else arr[i]
            rows.append(np.asarray(self.session.run([self.output], {self.name: one})[0]).reshape(-1))
        return np.stack(rows)


def from_onnx(
    path_or_session: str | os.PathLike[str] | Any,
    *,
    returns: Returns = "logits",
    num_classes: int | None = None,
    output: str | None = None,
    **oracle: Any,
) -> BlackBox:
    """A :class:`BlackBox` around an ONNX classifier run by onnxruntime (a ``.onnx`` file or an open session).

    The session's single input must be a float tensor; its leading dimension is read as the batch when it is symbolic
    or 1 (a model with a fixed batch of 1 is run one input at a time, others in batches of ``batch_size``). Inputs are
    reshaped to the model's per-sample shape, so flat features and images of the same size both work.

    Args:
        path_or_session: path of the ``.onnx`` file, or an ``onnxruntime.InferenceSession``.
        returns: what the model's output is (see :class:`BlackBox`).
        num_classes: number of classes (required for labels).
        output: name of the output to read (default: the first).
        **oracle: further :class:`BlackBox` options; the fingerprint defaults to a hash of the model file (of the
            session's model path when it has one).
    """
    try:
        import onnxruntime as ort
    except ImportError as exc:  # pragma: no cover - a declared dependency
        raise ModelError("from_onnx needs the 'onnxruntime' package: pip install onnxruntime") from exc
    digest = None
    if isinstance(path_or_session, (str, os.PathLike)):
        path = os.fspath(path_or_session)
        if not os.path.isfile(path):
            raise ModelError(f"ONNX file {path!r} not found")
        with open(path, "rb") as fh:
            data = fh.read()
        digest = hashlib.sha256(data).hexdigest()
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = 1
        opts.inter_op_num_threads = 1
        opts.log_severity_level = 3
        try:
            session = ort.InferenceSession(data, opts, providers=["CPUExecutionProvider"])
        except Exception as exc:
            raise ModelError(f"onnxruntime cannot load {path!r} ({type(exc).__name__}: {exc})") from None
    elif callable(getattr(path_or_session, "run", None)) and callable(getattr(path_or_session, "get_inputs", None)):
        session = path_or_session
        model_path = getattr(session, "_model_path", None)
        if isinstance(model_path, str) and os.path.isfile(model_path):
            with open(model_path, "rb") as fh:
                digest = hashlib.sha256(fh.read()).hexdigest()
    else:
        raise InputError(
            f"from_onnx needs a path to a .onnx file or an onnxruntime.InferenceSession, got "
            f"{type(path_or_session).__name__}"
        )
    runner = _SessionRunner(session, output)
    if digest is not None:
        oracle.setdefault("fingerprint", f"onnx:{digest}")
    return BlackBox(runner, returns=returns, num_classes=num_classes, **oracle)
