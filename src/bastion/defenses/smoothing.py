"""Randomized smoothing: a classifier whose l2 robustness is certified by Monte Carlo sampling.

Cohen, Rosenfeld & Kolter, "Certified Adversarial Robustness via Randomized Smoothing", ICML 2019.

Given a base classifier ``f`` (any model returning logits), the smoothed classifier is

    g(x) = argmax_c  P_{delta ~ N(0, sigma^2 I)} [ f(x + delta) = c ].

If the top class ``c_A`` has probability at least ``p_A >= 1/2`` under the noise, then ``g(x + d) = c_A`` for every
``||d||_2 < sigma * Phi^{-1}(p_A)`` (the paper's Theorem 1 with ``p_B = 1 - p_A``). ``g`` cannot be evaluated
exactly, so :meth:`Smooth.predict` and :meth:`Smooth.certify` implement the paper's PREDICT and CERTIFY procedures,
which either answer or abstain, and are wrong with probability at most ``alpha``:

- PREDICT draws ``n`` noisy copies, counts the base classifier's votes, takes the two most voted classes (counts
  ``n_A >= n_B``) and returns ``c_A`` only if the two-sided binomial test of ``n_A`` out of ``n_A + n_B`` against
  ``1/2`` has p-value ``<= alpha``; otherwise it abstains.
- CERTIFY guesses ``c_A`` from ``n0`` noisy copies (selection), then counts ``n_A`` votes for it among ``n`` fresh
  copies (estimation), takes the one-sided ``1 - alpha`` Clopper-Pearson lower bound ``p_A`` of the vote
  probability (the ``alpha`` quantile of ``Beta(n_A, n - n_A + 1)``), abstains if ``p_A < 1/2``, and otherwise
  returns ``c_A`` with the certified radius ``sigma * Phi^{-1}(p_A)``.

As in the paper, the Gaussian noise is added in the model's input domain (inputs in ``[0, 1]``; the model holds its
own normalisation, see :class:`bastion.models.Normalize`) and is *not* clipped to the domain: the certificate is a
statement about the Gaussian measure, which clipping would change. Noise is drawn on the model's device, in chunks
of ``batch_size`` noisy inputs; a chunk may hold copies of several inputs when ``n`` is small, so that small sample
counts still fill the device.

An abstention is reported as the class :data:`ABSTAIN` (``-1``), as in the paper's code.
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch
from scipy import stats
from torch import nn
from tqdm.auto import tqdm

from bastion.errors import BastionWarning, InputError, ModelError
from bastion.models.checks import check_logits, eval_mode, model_device, model_fingerprint
from bastion.results import SampleRecord, Status

__all__ = [
    "ABSTAIN",
    "DEFAULT_RADII",
    "CertifyResult",
    "PredictResult",
    "Smooth",
    "SmoothingEvaluation",
    "certified_accuracy",
    "clopper_pearson_lower",
    "evaluate_smoothed",
    "smooth_threat_key",
    "summarize_smoothing",
    "to_records",
    "two_sided_binomial_pvalue",
]

#: The class returned where the smoothed classifier abstains.
ABSTAIN: int = -1

Mode = Literal["certify", "predict"]


# ------------------------------------------------------------------------------------------------ statistics
def clopper_pearson_lower(successes: np.ndarray | torch.Tensor, trials: int, alpha: float) -> np.ndarray:
    """One-sided ``1 - alpha`` Clopper-Pearson lower confidence bound on a binomial proportion.

    The bound is the ``alpha`` quantile of ``Beta(k, n - k + 1)``, and 0 when ``k = 0``; it equals the lower end of
    the two-sided exact interval at level ``1 - 2 alpha`` (what the paper's code computes).

    Args:
        successes: counts ``k`` (any shape), each in ``[0, trials]``.
        trials: number of trials ``n >= 1``.
        alpha: error probability in ``(0, 1)``.

    Returns:
        The bounds, float64, with the shape of ``successes``.
    """
    k = np.asarray(successes.cpu() if isinstance(successes, torch.Tensor) else successes, dtype=np.float64)
    safe = np.maximum(k, 1.0)  # Beta(0, .) is undefined; k = 0 is handled below
    bound = stats.beta.ppf(alpha, safe, trials - safe + 1.0)
    return np.where(k > 0, bound, 0.0).astype(np.float64)


def two_sided_binomial_pvalue(n_a: np.ndarray | torch.Tensor, n_b: np.ndarray | torch.Tensor) -> np.ndarray:
    """P-value of the exact two-sided binomial test of ``n_a`` successes in ``n_a + n_b`` trials against ``p = 1/2``.

    The null distribution is symmetric, so the outcomes at most as likely as ``n_a`` are the two tails beyond
    ``min(n_a, n_b)``: the p-value is ``min(1, 2 * P[Bin(n_a + n_b, 1/2) <= min(n_a, n_b)])``, which is what
    ``scipy.stats.binomtest(n_a, n_a + n_b, 0.5).pvalue`` returns, computed for whole arrays at once.

    Args:
        n_a: counts of the first class (any shape).
        n_b: counts of the second class (same shape).

    Returns:
        The p-values, float64; 1 where ``n_a + n_b = 0``.
    """
    a = np.asarray(n_a.cpu() if isinstance(n_a, torch.Tensor) else n_a, dtype=np.float64)
    b = np.asarray(n_b.cpu() if isinstance(n_b, torch.Tensor) else n_b, dtype=np.float64)
    total = a + b
    p = np.minimum(1.0, 2.0 * stats.binom.cdf(np.minimum(a, b), total, 0.5))
    return np.where(total > 0, p, 1.0).astype(np.float64)


# ------------------------------------------------------------------------------------------------ results
@dataclass
class PredictResult:
    """The outcome of :meth:`Smooth.predict` on a batch (CPU tensors).

    Attributes:
        prediction: smoothed class per input, int64 (N,), :data:`ABSTAIN` where the test was not significant.
        pvalue: p-value of the two-sided binomial test of the top two counts, float64 (N,).
        counts: votes of the base classifier per class, int64 (N, K), from ``n`` noisy copies.
        n: noisy copies per input.
        alpha: significance level.
        sigma: noise level.
    """

    prediction: torch.Tensor
    pvalue: torch.Tensor
    counts: torch.Tensor
    n: int
    alpha: float
    sigma: float

    @property
    def abstained(self) -> torch.Tensor:
        """Boolean (N,): where the smoothed classifier abstained."""
        return self.prediction == ABSTAIN


@dataclass
class CertifyResult:
    """The outcome of :meth:`Smooth.certify` on a batch (CPU tensors).

    Attributes:
        prediction: certified class per input, int64 (N,), :data:`ABSTAIN` where ``p_lower < 1/2``.
        radius: certified l2 radius ``sigma * Phi^{-1}(p_lower)``, float64 (N,); 0 where abstained.
        p_lower: one-sided Clopper-Pearson lower bound on the top class's probability, float64 (N,).
        selected: the class chosen from the selection samples, int64 (N,) (also where abstained).
        counts_selection: votes per class from the ``n0`` selection copies, int64 (N, K).
        counts: votes per class from the ``n`` estimation copies, int64 (N, K).
        n0: selection copies per input.
        n: estimation copies per input.
        alpha: error probability.
        sigma: noise level.
    """

    prediction: torch.Tensor
    radius: torch.Tensor
    p_lower: torch.Tensor
    selected: torch.Tensor
    counts_selection: torch.Tensor
    counts: torch.Tensor
    n0: int
    n: int
    alpha: float
    sigma: float

    @property
    def abstained(self) -> torch.Tensor:
        """Boolean (N,): where the smoothed classifier abstained."""
        return self.prediction == ABSTAIN


# ------------------------------------------------------------------------------------------------ validation
def _positive_int(value: object, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or int(value) < 1:
        raise InputError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def _check_alpha(alpha: object) -> float:
    try:
        a = float(alpha)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise InputError(f"alpha must be a number in (0, 1), got {alpha!r}") from None
    if not 0.0 < a < 1.0:
        raise InputError(f"alpha must lie strictly between 0 and 1, got {alpha!r}")
    return a


def _check_sigma(sigma: object) -> float:
    try:
        s = float(sigma)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise InputError(f"sigma must be a positive number, got {sigma!r}") from None
    if not (math.isfinite(s) and s > 0):
        raise InputError(f"sigma must be a finite number > 0, got {sigma!r}")
    return s


# ------------------------------------------------------------------------------------------------ smoothing
class Smooth:
    """The Gaussian-smoothed version of a classifier (Cohen, Rosenfeld & Kolter, ICML 2019).

    Args:
        model: base classifier mapping inputs in ``domain`` to logits (N, K); its normalisation must be inside it,
            because the noise is added to the raw inputs. It is put in eval mode while sampling and restored.
        num_classes: number of classes K the model returns logits for.
        sigma: standard deviation of the isotropic Gaussian noise (the paper uses 0.12, 0.25, 0.5 and 1.0 on
            inputs in [0, 1]).
        domain: ``(lo, hi)`` range the clean inputs must lie in (checked); the noisy copies are not clipped.

    Example:
        >>> smoothed = Smooth(model, num_classes=10, sigma=0.25)  # doctest: +SKIP
        >>> cert = smoothed.certify(x, n0=100, n=100_000, alpha=0.001, seed=0)  # doctest: +SKIP
        >>> cert.prediction, cert.radius  # doctest: +SKIP
    """

    def __init__(
        self, model: nn.Module, num_classes: int, sigma: float, *, domain: tuple[float, float] = (0.0, 1.0)
    ) -> None:
        if not isinstance(model, nn.Module):
            raise InputError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if isinstance(num_classes, bool) or not isinstance(num_classes, (int, np.integer)) or num_classes < 2:
            raise InputError(f"num_classes must be an integer >= 2, got {num_classes!r}")
        try:
            lo, hi = (float(v) for v in domain)
        except (TypeError, ValueError):
            raise InputError(f"domain must be a pair (lo, hi) of numbers, got {domain!r}") from None
        if not (math.isfinite(lo) and math.isfinite(hi) and lo < hi):
            raise InputError(f"domain must satisfy lo < hi with finite bounds, got {domain!r}")
        self.model = model
        self.num_classes = int(num_classes)
        self.sigma = _check_sigma(sigma)
        self.domain = (lo, hi)

    def __repr__(self) -> str:
        return f"Smooth(model={type(self.model).__name__}, num_classes={self.num_classes}, sigma={self.sigma!r})"

    # ------------------------------------------------------------------------------------------- internals
    def _prepare(self, x: object) -> torch.Tensor:
        """``x`` validated and moved to the model's device and floating dtype."""
        if not isinstance(x, torch.Tensor):
            raise InputError(f"x must be a torch.Tensor of inputs (N, ...), got {type(x).__name__}")
        if x.dim() < 2:
            raise InputError(
                f"x must be a batch of inputs with shape (N, ...), got shape {tuple(x.shape)}; "
                "add a batch dimension with x[None] for one input"
            )
        if not x.dtype.is_floating_point:
            raise InputError(f"x must hold floating-point inputs, got dtype {x.dtype}; divide uint8 images by 255")
        if x.numel() and not bool(torch.isfinite(x).all()):
            raise InputError("x contains NaN or Inf values")
        lo, hi = self.domain
        if x.numel() and (float(x.min()) < lo or float(x.max()) > hi):
            raise InputError(
                f"x has values in [{float(x.min()):.4g}, {float(x.max()):.4g}], outside the input domain "
                f"[{lo}, {hi}]; the noise is added to inputs in the domain (normalisation belongs in the model)"
            )
        device = model_device(self.model)
        dtype = next((p.dtype for p in self.model.parameters() if p.dtype.is_floating_point), x.dtype)
        return x.detach().to(device=device, dtype=dtype)

    @staticmethod
    def _generator(seed: int | None, device: torch.device) -> torch.Generator | None:
        if seed is None:
            return None
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
            raise InputError(f"seed must be an integer or None, got {seed!r}")
        return torch.Generator(device=device).manual_seed(int(seed) % (2**63))

    @torch.no_grad()
    def sample_counts(
        self,
        x: torch.Tensor,
        num: int,
        *,
        batch_size: int = 1_000,
        generator: torch.Generator | None = None,
        bar: Any = None,
    ) -> torch.Tensor:
        """Votes of the base classifier on ``num`` noisy copies of each input.

        The ``N * num`` copies form one stream cut into chunks of ``batch_size``: a chunk holds several inputs when
        ``num`` is small and part of one input's copies when it is large, so every forward pass is full.

        Args:
            x: inputs (N, ...) already on the model's device (see :meth:`certify` for the checks).
            num: noisy copies per input.
            batch_size: noisy copies per forward pass.
            generator: random generator on the model's device, or ``None`` for torch's global one.
            bar: a tqdm bar advanced by the inputs whose copies are all counted, or ``None``.

        Returns:
            Counts, int64 (N, K) on the model's device; each row sums to ``num``.
        """
        n_inputs, k = x.shape[0], self.num_classes
        device = x.device
        counts = torch.zeros(n_inputs * k, dtype=torch.long, device=device)
        total = n_inputs * num
        finished = 0
        with eval_mode(self.model):
            for start in range(0, total, batch_size):
                stop = min(start + batch_size, total)
                owner = torch.arange(start, stop, device=device) // num
                clean = x[owner]
                noise = torch.randn(clean.shape, generator=generator, device=device, dtype=clean.dtype)
                logits = self.model(clean + self.sigma * noise)
                if start == 0:
                    with warnings.catch_warnings():
                        # only the argmax is used, so softmax outputs are harmless here (unlike for attacks)
                        warnings.simplefilter("ignore", BastionWarning)
                        got = check_logits(logits, stop - start, where="base classifier output")
                    if got != k:
                        raise ModelError(f"the base classifier returns {got} logits but num_classes is {k}")
                votes = logits.argmax(dim=1)
                counts += torch.bincount(owner * k + votes, minlength=n_inputs * k)
                if bar is not None:
                    done = stop // num
                    bar.update(done - finished)
                    finished = done
        return counts.view(n_inputs, k)

    # ------------------------------------------------------------------------------------------- PREDICT
    def predict(
        self,
        x: torch.Tensor,
        *,
        n: int = 100,
        alpha: float = 0.001,
        batch_size: int = 1_000,
        seed: int | None = None,
        progress: bool = False,
    ) -> PredictResult:
        """The paper's PREDICT: the smoothed class of each input, or an abstention.

        A returned class differs from the true smoothed class ``g(x)`` with probability at most ``alpha``
        (the paper's Proposition 1).

        Args:
            x: inputs (N, ...) in the domain.
            n: noisy copies per input.
            alpha: significance level of the two-sided binomial test.
            batch_size: noisy copies per forward pass.
            seed: seed of the noise (a generator on the model's device), or ``None`` for torch's global RNG.
            progress: show a tqdm bar over the inputs.

        Returns:
            A :class:`PredictResult`.
        """
        n = _positive_int(n, "n")
        alpha = _check_alpha(alpha)
        batch_size = _positive_int(batch_size, "batch_size")
        xs = self._prepare(x)
        gen = self._generator(seed, xs.device)
        with tqdm(total=xs.shape[0], desc="smooth predict", unit="input", disable=not progress, leave=False) as bar:
            counts = self.sample_counts(xs, n, batch_size=batch_size, generator=gen, bar=bar).cpu()
        return self._predict_from_counts(counts, n=n, alpha=alpha)

    def _predict_from_counts(self, counts: torch.Tensor, *, n: int, alpha: float) -> PredictResult:
        top = counts.topk(2, dim=1)
        pvalue = torch.from_numpy(two_sided_binomial_pvalue(top.values[:, 0], top.values[:, 1]))
        prediction = torch.where(pvalue <= alpha, top.indices[:, 0], torch.full_like(top.indices[:, 0], ABSTAIN))
        return PredictResult(prediction, pvalue, counts, n, alpha, self.sigma)

    # ------------------------------------------------------------------------------------------- CERTIFY
    def certify(
        self,
        x: torch.Tensor,
        *,
        n0: int = 100,
        n: int = 100_000,
        alpha: float = 0.001,
        batch_size: int = 1_000,
        seed: int | None = None,
        progress: bool = False,
    ) -> CertifyResult:
        """The paper's CERTIFY: a class and a certified l2 radius per input, or an abstention.

        With probability at least ``1 - alpha`` (over the noise), a returned class is the smoothed classifier's
        prediction at every point within the returned radius (the paper's Proposition 2).

        Args:
            x: inputs (N, ...) in the domain.
            n0: noisy copies per input used to select the top class.
            n: noisy copies per input used to bound its probability.
            alpha: error probability of the certificate.
            batch_size: noisy copies per forward pass.
            seed: seed of the noise (a generator on the model's device), or ``None`` for torch's global RNG.
            progress: show a tqdm bar over the inputs (advanced during the estimation pass).

        Returns:
            A :class:`CertifyResult`.
        """
        n0 = _positive_int(n0, "n0")
        n = _positive_int(n, "n")
        alpha = _check_alpha(alpha)
        batch_size = _positive_int(batch_size, "batch_size")
        xs = self._prepare(x)
        gen = self._generator(seed, xs.device)
        counts0 = self.sample_counts(xs, n0, batch_size=batch_size, generator=gen).cpu()
        with tqdm(total=xs.shape[0], desc="smooth certify", unit="input", disable=not progress, leave=False) as bar:
            counts = self.sample_counts(xs, n, batch_size=batch_size, generator=gen, bar=bar).cpu()
        return self._certify_from_counts(counts0, counts, n0=n0, n=n, alpha=alpha)

    def _certify_from_counts(
        self, counts0: torch.Tensor, counts: torch.Tensor, *, n0: int, n: int, alpha: float
    ) -> CertifyResult:
        selected = counts0.argmax(dim=1)
        n_a = counts.gather(1, selected[:, None]).squeeze(1)
        p_lower = clopper_pearson_lower(n_a, n, alpha)
        certified = p_lower >= 0.5
        # Phi^{-1}(p) for p < 1/2 is negative: those inputs abstain and get radius 0, as in the paper's code
        radius = np.where(certified, self.sigma * stats.norm.ppf(np.maximum(p_lower, 0.5)), 0.0)
        prediction = torch.where(
            torch.from_numpy(certified), selected, torch.full_like(selected, ABSTAIN)
        )  # fmt: skip
        return CertifyResult(
            prediction=prediction,
            radius=torch.from_numpy(radius.astype(np.float64)),
            p_lower=torch.from_numpy(p_lower),
            selected=selected,
            counts_selection=counts0,
            counts=counts,
            n0=n0,
            n=n,
            alpha=alpha,
            sigma=self.sigma,
        )


# ------------------------------------------------------------------------------------------------ records
def smooth_threat_key(sigma: float, eps: float = 0.0) -> str:
    """The threat key of smoothing records: ``"l2:smooth:sigma=S"``, with ``":eps=E"`` when a radius is asked."""
    base = f"l2:smooth:sigma={float(sigma)!r}"
    return base if float(eps) == 0.0 else f"{base}:eps={float(eps)!r}"


def to_records(
    result: CertifyResult | PredictResult,
    labels: torch.Tensor | Sequence[int],
    indices: torch.Tensor | Sequence[int] | None = None,
    *,
    eps: float = 0.0,
    seconds: float = 0.0,
) -> list[SampleRecord]:
    """Per-sample :class:`~bastion.results.SampleRecord` s of a smoothing result.

    The mapping (the smoothed classifier ``g`` is the model judged; every statement holds with probability at
    least ``1 - alpha``):

    - ``clean_pred``: the smoothed prediction, :data:`ABSTAIN` (``-1``) where it abstained.
    - ``certified``: the certified l2 radius for a :class:`CertifyResult` where it did not abstain, else ``None``.
    - ``status``: ``"falsified"`` (with ``adv_distance = 0``) where ``g`` answers a wrong class, as for a clean
      misclassification; ``"robust"`` where a certificate names the true class with radius ``>= eps``;
      ``"unknown"`` otherwise (an abstention, a predict result, or a radius below ``eps``).
    - ``threat``: :func:`smooth_threat_key` of ``sigma`` and ``eps``; ``attack``: ``"smooth-certify"`` or
      ``"smooth-predict"``.

    With ``eps = 0`` the fraction of ``"robust"`` records is the certified accuracy at radius 0, and
    :func:`certified_accuracy` of the stored ``certified`` radii gives the whole curve.

    Args:
        result: what :meth:`Smooth.certify` or :meth:`Smooth.predict` returned.
        labels: true labels (N,).
        indices: positions of the samples in their data set; ``0..N-1`` by default.
        eps: l2 radius at which a certificate counts as ``"robust"``.
        seconds: wall time of the batch, shared equally among its records.

    Returns:
        One record per input.
    """
    pred = result.prediction.tolist()
    n_items = len(pred)
    lab = [int(v) for v in (labels.tolist() if isinstance(labels, torch.Tensor) else labels)]
    idx = list(range(n_items)) if indices is None else [int(v) for v in (
        indices.tolist() if isinstance(indices, torch.Tensor) else indices)]  # fmt: skip
    if len(lab) != n_items or len(idx) != n_items:
        raise InputError(f"labels ({len(lab)}) and indices ({len(idx)}) must have one entry per input ({n_items})")
    eps = float(eps)
    if not (math.isfinite(eps) and eps >= 0):
        raise InputError(f"eps must be a finite number >= 0, got {eps!r}")
    is_cert = isinstance(result, CertifyResult)
    radii = result.radius.tolist() if isinstance(result, CertifyResult) else [0.0] * n_items
    key = smooth_threat_key(result.sigma, eps)
    share = float(seconds) / n_items if n_items else 0.0
    records = []
    for i in range(n_items):
        p, y = int(pred[i]), lab[i]
        certified = float(radii[i]) if is_cert and p != ABSTAIN else None
        status: Status = "unknown"
        adv: float | None = None
        if p != ABSTAIN and p != y:
            status, adv = "falsified", 0.0
        elif certified is not None and certified >= eps:
            status = "robust"
        records.append(
            SampleRecord(
                index=idx[i],
                threat=key,
                label=y,
                clean_pred=p,
                status=status,
                adv_distance=adv,
                certified=certified,
                attack="smooth-certify" if is_cert else "smooth-predict",
                seconds=share,
            )
        )
    return records


def certified_accuracy(
    radii: Sequence[float] | np.ndarray | torch.Tensor,
    labels: Sequence[int] | np.ndarray | torch.Tensor,
    predictions: Sequence[int] | np.ndarray | torch.Tensor,
    radii_certified: Sequence[float] | np.ndarray | torch.Tensor,
) -> np.ndarray:
    """The certified-accuracy-vs-radius curve (the paper's Figure / Table 1 measure).

    Certified accuracy at radius ``r`` is the fraction of inputs whose certified prediction is the true label with a
    certified radius ``>= r``; abstentions (:data:`ABSTAIN`) never count.

    Args:
        radii: radii at which to evaluate the curve.
        labels: true labels (N,).
        predictions: certified predictions (N,), :data:`ABSTAIN` where abstained.
        radii_certified: certified radii (N,).

    Returns:
        float64 array of the certified accuracy at each radius.
    """

    def arr(v: Any, what: str) -> np.ndarray:
        a = np.asarray(v.detach().cpu() if isinstance(v, torch.Tensor) else v, dtype=np.float64).reshape(-1)
        if not np.isfinite(a).all() and what != "radii_certified":
            raise InputError(f"{what} contains NaN or Inf")
        return a

    r = arr(radii, "radii")
    y, p, rc = arr(labels, "labels"), arr(predictions, "predictions"), arr(radii_certified, "radii_certified")
    if not (len(y) == len(p) == len(rc)):
        raise InputError(
            f"labels ({len(y)}), predictions ({len(p)}) and radii_certified ({len(rc)}) must have the same length"
        )
    if len(y) == 0:
        return np.zeros(len(r), dtype=np.float64)
    correct = (p == y) & (p != ABSTAIN)
    return ((correct[None, :] & (rc[None, :] >= r[:, None])).mean(axis=1)).astype(np.float64)


# ------------------------------------------------------------------------------------------------ data sets
@dataclass
class SmoothingEvaluation:
    """Summary of :func:`evaluate_smoothed` over a data set, derived from its per-sample records.

    Attributes:
        mode: ``"certify"`` or ``"predict"``.
        n: number of samples.
        sigma: noise level.
        threat: threat key of the records.
        accuracy: fraction where the smoothed classifier answered the true label.
        abstain_rate: fraction of abstentions.
        radii: radii of the certified-accuracy curve (certify only).
        certified_accuracy: certified accuracy at each radius (certify only).
        records: the per-sample records.
        run_id: id of the run in the store, if any.
        seconds: wall time of this call.
    """

    mode: str
    n: int
    sigma: float
    threat: str
    accuracy: float
    abstain_rate: float
    radii: list[float] = field(default_factory=list)
    certified_accuracy: list[float] = field(default_factory=list)
    records: list[SampleRecord] = field(repr=False, default_factory=list)
    run_id: int | None = None
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        """JSON-able summary (without the per-sample records)."""
        return {
            "mode": self.mode,
            "n": self.n,
            "sigma": self.sigma,
            "threat": self.threat,
            "accuracy": self.accuracy,
            "abstain_rate": self.abstain_rate,
            "radii": self.radii,
            "certified_accuracy": self.certified_accuracy,
            "run_id": self.run_id,
            "seconds": self.seconds,
        }

    def table(self) -> str:
        """A plain-text summary; for certify, one row per radius."""
        lines = [
            f"randomized smoothing ({self.mode}), sigma = {self.sigma:g}, n = {self.n} samples",
            f"smoothed accuracy {100 * self.accuracy:.2f}%   abstained {100 * self.abstain_rate:.2f}%",
        ]
        if self.mode == "certify":
            lines.append(f"{'l2 radius':>10}  certified accuracy")
            lines += [f"{r:>10g}  {100 * a:.2f}%" for r, a in zip(self.radii, self.certified_accuracy)]
        return "\n".join(lines)


def summarize_smoothing(
    records: Sequence[SampleRecord], *, mode: str, sigma: float, n: int, radii: Sequence[float]
) -> SmoothingEvaluation:
    """The summary of smoothing records (the only place it is computed)."""
    key = smooth_threat_key(sigma)
    recs = [r for r in records if r.threat == key]
    correct = sum(r.clean_pred == r.label for r in recs)
    abstained = sum(r.clean_pred == ABSTAIN for r in recs)
    curve: list[float] = []
    if mode == "certify":
        rc = [r.certified if r.certified is not None else -math.inf for r in recs]
        curve = certified_accuracy(radii, [r.label for r in recs], [r.clean_pred for r in recs], rc).tolist()
        curve = [c * len(recs) / n if n else 0.0 for c in curve]  # fractions of the whole data set
    return SmoothingEvaluation(
        mode=mode, n=n, sigma=sigma, threat=key, accuracy=correct / n if n else 0.0,
        abstain_rate=abstained / n if n else 0.0, radii=[float(r) for r in radii] if mode == "certify" else [],
        certified_accuracy=curve, records=list(recs),
    )  # fmt: skip


DEFAULT_RADII: tuple[float, ...] = (0.0, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 1.75, 2.0)


def evaluate_smoothed(
    smoothed: Smooth,
    data: Any,
    *,
    mode: Mode = "certify",
    n: int | None = None,
    n0: int = 100,
    alpha: float = 0.001,
    batch_size: int = 1_000,
    radii: Sequence[float] = DEFAULT_RADII,
    store: Any = None,
    seed: int = 0,
    progress: bool = True,
    config: dict[str, Any] | None = None,
) -> SmoothingEvaluation:
    """Run :meth:`Smooth.certify` (or :meth:`Smooth.predict`) over a data set, resumably through a store.

    Inputs are processed a few at a time (as many as fill ``batch_size`` noisy copies, at least one); each group's
    records are written to the store in one transaction as soon as it finishes, and re-running the same job
    (same model, data, sigma, mode, sample counts, alpha and seed) skips the samples already stored. Groups sit at
    fixed positions of the data set and the noise of each is seeded from ``seed`` and its first position, so a job
    killed and resumed with the same ``batch_size`` gives exactly the records of an uninterrupted run.

    Args:
        smoothed: the smoothed classifier.
        data: a :class:`~bastion.data.Dataset` (its domain must be the smoothed classifier's).
        mode: ``"certify"`` or ``"predict"``.
        n: noisy copies per input (estimation copies for certify); default 100 000 for certify, 100 for predict.
        n0: selection copies per input (certify only).
        alpha: error probability.
        batch_size: noisy copies per forward pass.
        radii: radii of the certified-accuracy curve (certify only).
        store: a :class:`~bastion.store.Store` or a path to one, or ``None``.
        seed: seed of the noise.
        progress: show a tqdm bar over the inputs.
        config: extra JSON-able information stored with the run (e.g. the CLI's model and data specs).

    Returns:
        A :class:`SmoothingEvaluation` computed from all the records of the job (resumed ones included).
    """
    from bastion.data import Dataset
    from bastion.store import resumable_run

    t_start = time.perf_counter()
    if not isinstance(smoothed, Smooth):
        raise InputError(f"smoothed must be a Smooth classifier, got {type(smoothed).__name__}")
    if not isinstance(data, Dataset):
        raise InputError(f"data must be a bastion Dataset, got {type(data).__name__}")
    if mode not in ("certify", "predict"):
        raise InputError(f"mode must be 'certify' or 'predict', got {mode!r}")
    if data.domain != smoothed.domain:
        raise InputError(f"the data's domain {data.domain} differs from the smoothed classifier's {smoothed.domain}")
    if data.num_classes > smoothed.num_classes:
        raise InputError(f"the data has {data.num_classes} classes but the classifier {smoothed.num_classes}")
    n = _positive_int(n if n is not None else (100_000 if mode == "certify" else 100), "n")
    n0 = _positive_int(n0, "n0")
    alpha = _check_alpha(alpha)
    batch_size = _positive_int(batch_size, "batch_size")
    radius_list = [float(r) for r in radii]
    if any(not math.isfinite(r) or r < 0 for r in radius_list):
        raise InputError(f"radii must be finite numbers >= 0, got {radius_list}")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise InputError(f"seed must be an integer, got {seed!r}")
    key = smooth_threat_key(smoothed.sigma)
    per_group = max(1, batch_size // (n + (n0 if mode == "certify" else 0)))
    total = len(data)

    kind = f"smooth-{mode}"
    payload = {
        "sigma": smoothed.sigma,
        "n": n,
        "n0": n0 if mode == "certify" else None,
        "alpha": alpha,
        "seed": int(seed),
    }
    with resumable_run(
        store, kind=kind, payload=payload, fingerprints=lambda: (model_fingerprint(smoothed.model), data.fingerprint()),
        n_samples=total, threats=[key], config={"batch_size": batch_size, **(config or {})},
    ) as run:  # fmt: skip
        bar = tqdm(total=total, initial=len(run.done), desc=f"smooth {mode}", unit="sample",
                   disable=not progress, leave=False)  # fmt: skip
        for first in range(0, total, per_group):
            # Groups sit at fixed positions and are written in one transaction each, so after a kill the resumed
            # groups are the very groups of an uninterrupted run, with the same seeds and thus the same results.
            todo = run.todo(range(first, min(first + per_group, total)))
            if not todo:
                continue
            idx, xb, yb = next(data.batches(len(todo), indices=todo))
            t0 = time.perf_counter()
            group_seed = int(seed) * 1_000_003 + first
            result: CertifyResult | PredictResult
            if mode == "certify":
                result = smoothed.certify(xb, n0=n0, n=n, alpha=alpha, batch_size=batch_size, seed=group_seed)
            else:
                result = smoothed.predict(xb, n=n, alpha=alpha, batch_size=batch_size, seed=group_seed)
            seconds = time.perf_counter() - t0
            run.write(to_records(result, yb, idx, seconds=seconds), seconds=seconds)
            bar.update(len(idx))
        bar.close()
        summary = summarize_smoothing(run.records(key), mode=mode, sigma=smoothed.sigma, n=total, radii=radius_list)
        return run.finish(summary, started=t_start)
