"""Universal adversarial perturbations: one small perturbation that fools a classifier on most inputs.

Moosavi-Dezfooli, Fawzi, Fawzi & Frossard, "Universal adversarial perturbations", CVPR 2017. The goal is a single
vector ``v`` with ``||v||_p <= xi`` such that ``k(x + v) != k(x)`` for "most" ``x`` drawn from the data
distribution, ``k`` being the classifier's predicted label (not the true label). The paper's Algorithm 1 builds
``v`` by passes over a training set: every point that ``v`` does not fool yet contributes the minimal perturbation
(found by DeepFool) that sends ``x + v`` across the decision boundary, and ``v`` is projected back onto the
``xi``-ball after each such update. The passes stop when the fooling rate on the training set reaches ``1 - delta``.

Like the adversarial patch, the attack is *universal*: :meth:`UniversalPerturbation.fit` learns ``v`` from a data
set, and :meth:`UniversalPerturbation.fooling_rate` measures it on held-out data.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from bastion.attacks.base import positive_int
from bastion.attacks.deepfool import DeepFool
from bastion.data import Dataset
from bastion.errors import InputError
from bastion.models.checks import eval_mode, model_device
from bastion.threat import LpBall, canonical_norm


@dataclass
class UniversalResult:
    """A universal perturbation and how well it fools the training data.

    Attributes:
        perturbation: the perturbation ``v`` (the data's feature shape), ``||v||_p <= xi``. Apply it as
            ``clip(x + v)`` to the data's domain.
        fooling_rate: fraction of the training points whose prediction on ``clip(x + v)`` differs from the one on
            ``x``, at the end.
        passes: number of passes over the training data that were run.
        history: training fooling rate after each pass.
    """

    perturbation: torch.Tensor
    fooling_rate: float
    passes: int
    history: list[float]


class UniversalPerturbation:
    """Universal adversarial perturbation (Moosavi-Dezfooli, Fawzi, Fawzi & Frossard, CVPR 2017), Algorithm 1.

    Starting from ``v = 0``, each pass visits the training points in a fresh random order. For every point ``x_i``
    whose prediction on ``clip(x_i + v)`` still equals its clean prediction ``k(x_i)``, DeepFool (started from
    ``clip(x_i + v)``, with ``k(x_i)`` as the label) finds the minimal perturbation ``Δv_i`` sending it across the
    decision boundary, and

        ``v ← P_{p,xi}(v + Δv_i)``

    with ``P_{p,xi}`` the projection onto the centred l_p ball of radius ``xi``. The updates are sequential: the
    next point is tested and attacked with the ``v`` that already includes every earlier update. Passes stop as
    soon as the fooling rate on the training set (the fraction of points with ``k(clip(x + v)) != k(x)``) reaches
    ``1 - delta``, or after ``max_passes``.

    As in the paper (and the authors' code), ``Δv_i`` is DeepFool's minimal *l2* perturbation for both norms; the
    norm only decides the projection. As in the authors' code, a point on which DeepFool does not cross the
    boundary within ``deepfool_steps`` iterations leaves ``v`` unchanged. Unlike the paper, which has no input
    domain, the perturbed input is always clipped to the data's domain, and ``v`` is also kept within
    ``±(hi - lo)`` per feature (larger values have no effect after clipping). The result is the ``v`` of the last
    pass, as in the paper, not the best one seen: the training fooling rate need not grow from pass to pass (later
    updates can undo earlier ones), which ``history`` shows.

    Args:
        norm: ``"linf"`` (default) or ``"l2"``: the norm of the budget ``xi``.
        xi: the perturbation budget, the radius of the ball ``v`` lives in (required, > 0).
        delta: stop once the training fooling rate reaches ``1 - delta`` (the paper's 0.2; in [0, 1)).
        max_passes: maximum number of passes over the training data (10).
        overshoot: DeepFool's overshoot (the paper's 0.02; >= 0).
        deepfool_steps: maximum DeepFool iterations per point (10, as in the authors' code).
        batch_size: points per batch when evaluating predictions and fooling rates (64).
    """

    def __init__(
        self,
        *,
        norm: str = "linf",
        xi: float,
        delta: float = 0.2,
        max_passes: int = 10,
        overshoot: float = 0.02,
        deepfool_steps: int = 10,
        batch_size: int = 64,
    ) -> None:
        self.norm = canonical_norm(norm)
        if self.norm not in ("linf", "l2"):
            raise InputError(f"the universal perturbation supports the norms linf and l2, got {norm!r}")
        if isinstance(xi, bool) or not isinstance(xi, (int, float)) or not (xi > 0 and math.isfinite(xi)):
            raise InputError(f"xi must be a finite number > 0, got {xi!r}")
        self.xi = float(xi)
        if isinstance(delta, bool) or not isinstance(delta, (int, float)) or not 0 <= delta < 1:
            raise InputError(f"delta must be a number in [0, 1) (target fooling rate 1 - delta), got {delta!r}")
        self.delta = float(delta)
        self.max_passes = positive_int("max_passes", max_passes)
        self.deepfool_steps = positive_int("deepfool_steps", deepfool_steps)
        self.batch_size = positive_int("batch_size", batch_size)
        self._deepfool = DeepFool(steps=self.deepfool_steps, overshoot=overshoot)  # validates overshoot
        self.overshoot = self._deepfool.overshoot

    def __repr__(self) -> str:
        return (
            f"UniversalPerturbation(norm={self.norm!r}, xi={self.xi!r}, delta={self.delta!r}, "
            f"max_passes={self.max_passes!r}, overshoot={self.overshoot!r}, "
            f"deepfool_steps={self.deepfool_steps!r}, batch_size={self.batch_size!r})"
        )

    def _ball(self, data: Dataset) -> LpBall:
        """The centred ball of radius ``xi``; its box ``±(hi - lo)`` holds every perturbation that matters."""
        lo, hi = data.domain
        return LpBall(self.norm, self.xi, domain=(-(hi - lo), hi - lo))

    # ----------------------------------------------------------------------------------------------- training
    def fit(self, model: nn.Module, data: Dataset, *, seed: int = 0, progress: bool = True) -> UniversalResult:
        """Learn a universal perturbation on ``data`` (the paper's Algorithm 1).

        Args:
            model: the classifier (kept in eval mode; its weights are not changed).
            data: the training points ``X``; the fooling rate is measured against the model's predictions on them.
            seed: seeds the order in which each pass visits the points.
            progress: show a progress bar over the passes.

        Returns:
            A :class:`UniversalResult` with the perturbation, the final training fooling rate, the number of
            passes run and the fooling rate after each pass.
        """
        _check_model_and_data(model, data)
        device = model_device(model)
        lo, hi = data.domain
        ball = self._ball(data)
        threat = LpBall("l2", math.inf, domain=data.domain)  # DeepFool is minimal-distortion: it takes no eps
        v = torch.zeros(data.feature_shape, device=device, dtype=data.x.dtype)
        history: list[float] = []
        with eval_mode(model):
            clean = self._predictions(model, data, None)
            rate = self._rate(model, data, v, clean)
            bar = tqdm(total=self.max_passes, desc="universal", unit="pass", disable=not progress, leave=False)
            while rate < 1 - self.delta and len(history) < self.max_passes:
                order = torch.randperm(len(data), generator=torch.Generator().manual_seed(seed + len(history)))
                for idx, xb, _yb in data.batches(self.batch_size, indices=order):
                    xb, kb = xb.to(device), clean[idx.to(device)]
                    with torch.no_grad():
                        unfooled = (model((xb + v).clamp(lo, hi)).argmax(1) == kb).nonzero().squeeze(1)
                    # Algorithm 1 is sequential: each point is attacked with the v that includes every earlier
                    # update, so DeepFool runs on one point at a time here; batching the points against one v would
                    # be a different algorithm. DeepFool re-checks the point (it skips those v now fools already).
                    for i in unfooled.tolist():
                        start = (xb[i : i + 1] + v).clamp(lo, hi)
                        res = self._deepfool(model, start, kb[i : i + 1], threat=threat)
                        if bool(res.success[0]):  # the authors' code skips points DeepFool did not fool
                            v = ball.project((v + (res.x_adv[0] - start[0]))[None], torch.zeros_like(v)[None])[0]
                rate = self._rate(model, data, v, clean)
                history.append(rate)
                bar.update(1)
                bar.set_postfix(fooling_rate=f"{rate:.3f}")
            bar.close()
        return UniversalResult(v.detach(), rate, len(history), history)

    # ----------------------------------------------------------------------------------------------- evaluation
    @torch.no_grad()
    def fooling_rate(self, model: nn.Module, data: Dataset, v: torch.Tensor) -> float:
        """Fraction of ``data``'s points whose prediction on ``clip(x + v)`` differs from the one on ``x``.

        Args:
            model: the classifier.
            data: held-out points (the labels are not used: the paper's fooling rate compares predictions).
            v: a perturbation of the data's feature shape, e.g. :attr:`UniversalResult.perturbation`.
        """
        _check_model_and_data(model, data)
        if not torch.is_tensor(v) or not v.is_floating_point() or tuple(v.shape) != data.feature_shape:
            raise InputError(
                f"v must be a floating-point tensor of the data's feature shape {data.feature_shape}, "
                f"got {getattr(v, 'dtype', type(v).__name__)} {tuple(getattr(v, 'shape', ()))}"
            )
        if not bool(torch.isfinite(v).all()):
            raise InputError("v contains NaN or Inf values")
        device = model_device(model)
        with eval_mode(model):
            clean = self._predictions(model, data, None)
            return self._rate(model, data, v.to(device=device, dtype=data.x.dtype), clean)

    @torch.no_grad()
    def _predictions(self, model: nn.Module, data: Dataset, v: torch.Tensor | None) -> torch.Tensor:
        """Predicted labels (N,) of ``data`` (at ``clip(x + v)`` unless ``v`` is None), on the model's device."""
        device = model_device(model)
        lo, hi = data.domain
        preds = []
        for _, xb, _ in data.batches(self.batch_size):
            xb = xb.to(device)
            preds.append(model(xb if v is None else (xb + v).clamp(lo, hi)).argmax(1))
        return torch.cat(preds) if preds else torch.zeros(0, dtype=torch.long, device=device)

    def _rate(self, model: nn.Module, data: Dataset, v: torch.Tensor, clean: torch.Tensor) -> float:
        return float((self._predictions(model, data, v) != clean).sum()) / max(1, len(data))


def _check_model_and_data(model: nn.Module, data: Dataset) -> None:
    if not isinstance(model, nn.Module):
        raise InputError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(data, Dataset):
        raise InputError(f"data must be a bastion Dataset, got {type(data).__name__}")
