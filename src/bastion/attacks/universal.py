"""Universal adversarial perturbations: one small perturbation that fools a classifier on most inputs.

Moosavi-Dezfooli, Fawzi, Fawzi & Frossard, "Universal adversarial perturbations", CVPR 2017. The goal is a single
vector ``v`` with ``||v||_p <= xi`` such that ``k(x + v) != k(x)`` for "most" ``x`` drawn from the data
distribution, ``k`` being the classifier's predicted label (not the true label). The paper's Algorithm 1 builds
``v`` by passes over a training set: every point that ``v`` does not fool yet contributes the minimal perturbation
(found by DeepFool) that sends ``x + v`` across the decision boundary, and ``v`` is projected back onto the
``xi``-ball after each such update. The passes stop when the fooling rate on the training set reaches ``1 - delta``.

Like the adversarial patch, the attack is *universal*: :meth:`UniversalPerturbation.fit` learns ``v`` from a data
set, and :meth:`UniversalPerturbation.fooling_rate` measures it on held-out data.

:class:`GeneralizedUniversalPerturbation` (GUAP; Zhang, Ruan, Wang & Huang, "Generalizing Universal Adversarial
Attacks Beyond Additive Perturbations", ICDM 2020) learns a universal *spatial flow* ``f`` together with a universal
additive ``v``: ``x_adv = clip(warp(x, f) + v)``, by gradient steps on a fooling loss over the data set.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from bastion.attacks.base import positive_float, positive_int
from bastion.attacks.deepfool import DeepFool
from bastion.data import Dataset
from bastion.errors import InputError
from bastion.models.checks import eval_mode, model_device
from bastion.results import ce_loss
from bastion.threat import FlowThreat, LpBall, canonical_norm, warp


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

    As in the paper (and the authors' code), ``Δv_i`` is an *l2* DeepFool perturbation for both norms; the norm only
    decides the projection. As in the authors' code, a point on which DeepFool does not cross the boundary within
    ``deepfool_steps`` iterations leaves ``v`` unchanged. Unlike the paper, which has no input domain, the
    perturbed input is always clipped to the data's domain, and ``Δv_i`` comes from the *box-aware* DeepFool
    (``DeepFool(box="mask")``: the linearisation leaves out features already at a bound of the domain whose gradient
    points further out), not the paper's unconstrained linearisation, whose steps the clipping would partly undo;
    ``v`` is also kept within
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
        self._deepfool = DeepFool(steps=self.deepfool_steps, overshoot=overshoot, box="mask")  # validates overshoot
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

    def _predictions(self, model: nn.Module, data: Dataset, v: torch.Tensor | None) -> torch.Tensor:
        """Predicted labels (N,) of ``data`` (at ``clip(x + v)`` unless ``v`` is None), on the model's device."""
        lo, hi = data.domain
        return _predict(model, data, self.batch_size, None if v is None else lambda xb: (xb + v).clamp(lo, hi))

    def _rate(self, model: nn.Module, data: Dataset, v: torch.Tensor, clean: torch.Tensor) -> float:
        return float((self._predictions(model, data, v) != clean).sum()) / max(1, len(data))


@torch.no_grad()
def _predict(
    model: nn.Module, data: Dataset, batch_size: int, perturb: Callable[[torch.Tensor], torch.Tensor] | None
) -> torch.Tensor:
    """Predicted labels (N,) of ``data``, each batch transformed by ``perturb`` first, on the model's device."""
    device = model_device(model)
    preds = []
    for _, xb, _ in data.batches(batch_size):
        xb = xb.to(device)
        preds.append(model(xb if perturb is None else perturb(xb)).argmax(1))
    return torch.cat(preds) if preds else torch.zeros(0, dtype=torch.long, device=device)


def _check_model_and_data(model: nn.Module, data: Dataset) -> None:
    if not isinstance(model, nn.Module):
        raise InputError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(data, Dataset):
        raise InputError(f"data must be a bastion Dataset, got {type(data).__name__}")


# --------------------------------------------------------------------------------------------------- GUAP
def flow_norm(flow: torch.Tensor) -> torch.Tensor:
    """GUAP's size of a flow field ``||f||_T`` (Zhang, Ruan, Wang & Huang, ICDM 2020), per field (N,).

    For each of the four neighbour directions (up, down, left, right), the root mean square over the pixels of the
    difference between a pixel's displacement vector and its neighbour's, with zero displacement outside the image;
    ``||f||_T`` is the largest of the four. It measures how much the flow *distorts* the image: a smooth flow is
    cheap, a jagged one costly, and (through the zero border) so is a large rigid shift.

    Args:
        flow: flow fields (N, 2, H, W), in pixels.
    """
    h, w = flow.shape[-2:]
    padded = torch.nn.functional.pad(flow, (1, 1, 1, 1))
    neighbours = (
        padded[:, :, 2:, 1:-1],  # below
        padded[:, :, :-2, 1:-1],  # above
        padded[:, :, 1:-1, 2:],  # right
        padded[:, :, 1:-1, :-2],  # left
    )
    sq = torch.stack([(flow - nb).square().flatten(1).sum(dim=1) for nb in neighbours], dim=1)
    return (sq / (h * w)).sqrt().amax(dim=1)


@dataclass
class GeneralizedUniversalResult:
    """A universal flow and additive perturbation learnt by :class:`GeneralizedUniversalPerturbation`.

    Apply them as ``clip(warp(x, flow) + perturbation)`` (:meth:`GeneralizedUniversalPerturbation.apply`).

    Attributes:
        flow: the universal flow field (2, H, W), in pixels, with ``flow_norm(flow) <= tau``.
        perturbation: the universal additive perturbation (the data's feature shape), ``||v||_inf <= eps``.
        fooling_rate: fraction of the training points whose prediction changes under the pair returned.
        epochs: number of passes over the training data that were run.
        history: training fooling rate after each epoch (the pair returned is the best of these).
        max_displacement: the largest per-pixel displacement of ``flow``, in pixels (its size under
            :class:`~bastion.threat.FlowThreat`).
    """

    flow: torch.Tensor
    perturbation: torch.Tensor
    fooling_rate: float
    epochs: int
    history: list[float]
    max_displacement: float


class GeneralizedUniversalPerturbation:
    """Generalised universal adversarial perturbation, GUAP (Zhang, Ruan, Wang & Huang, ICDM 2020).

    One spatial flow ``f`` and one additive perturbation ``v`` for a whole data set:

        ``x_adv = clip(warp(x, f) + v)``

    with ``warp`` the bilinear flow resampling of stAdv (:func:`bastion.threat.warp`), ``||v||_inf <= eps`` and
    ``||f||_T <= tau`` (:func:`flow_norm`). As in the paper, both are produced from free variables by fixed maps
    that meet the budgets by construction: ``v = eps · tanh(w)`` and ``f = tau · g / ||g||_T`` (the flow always uses
    its whole budget), and the variables are trained with Adam (the paper's lr 0.01, ``beta1`` 0.5, batches of
    100) to maximise the paper's fooling loss, the batch mean of ``log(1 + CE(model(x_adv), k(x)))`` with ``k(x)``
    the model's clean prediction (the log damps points already fooled, so the update favours the others).
    After each epoch the fooling rate on the training data is measured, and the best pair is returned, as in the
    authors' code.

    Difference from the paper: the paper produces ``(f, v)`` with a convolutional generator network fed with a fixed
    noise image, sized for 28x28 / 32x32 / 224x224 inputs. A fixed input makes the generator a
    reparametrisation of one pair ``(f, v)``; here the pair is optimised directly (through the same ``tanh`` and
    flow normalisation), which works for any image size and needs no architecture. ``eps = 0`` gives a flow-only
    and ``tau = 0`` an additive-only universal perturbation, the paper's two special cases.

    Args:
        eps: l∞ budget of the additive perturbation (the paper's 0.03 for CIFAR-10; >= 0).
        tau: budget of the flow in ``||.||_T`` (the paper's 0.1 for CIFAR-10; >= 0, not both 0).
        epochs: passes over the training data (the paper's 20).
        lr: Adam's learning rate (0.01).
        beta1: Adam's first-moment decay (0.5).
        batch_size: points per gradient step (100).
    """

    def __init__(
        self,
        *,
        eps: float = 0.03,
        tau: float = 0.1,
        epochs: int = 20,
        lr: float = 0.01,
        beta1: float = 0.5,
        batch_size: int = 100,
    ) -> None:
        self.eps = positive_float("eps", eps, allow_zero=True)
        self.tau = positive_float("tau", tau, allow_zero=True)
        if self.eps == 0 and self.tau == 0:
            raise InputError("eps and tau are both 0: give the additive (eps) or the flow (tau) budget room")
        self.epochs = positive_int("epochs", epochs)
        self.lr = positive_float("lr", lr)
        if isinstance(beta1, bool) or not isinstance(beta1, (int, float)) or not 0 <= beta1 < 1:
            raise InputError(f"beta1 must be a number in [0, 1), got {beta1!r}")
        self.beta1 = float(beta1)
        self.batch_size = positive_int("batch_size", batch_size)

    def __repr__(self) -> str:
        return (
            f"GeneralizedUniversalPerturbation(eps={self.eps!r}, tau={self.tau!r}, epochs={self.epochs!r}, "
            f"lr={self.lr!r}, beta1={self.beta1!r}, batch_size={self.batch_size!r})"
        )

    @staticmethod
    def _threat(data: Dataset) -> FlowThreat:
        threat = FlowThreat(math.inf, domain=data.domain)
        threat.check_images(data.x[:1])
        return threat

    def _flow(self, g: torch.Tensor) -> torch.Tensor:
        if self.tau == 0:
            return torch.zeros_like(g)
        return g * (self.tau / flow_norm(g[None]).clamp_min(1e-12))

    def apply(self, x: torch.Tensor, flow: torch.Tensor, perturbation: torch.Tensor) -> torch.Tensor:
        """``clip(warp(x, flow) + perturbation)`` for images ``x`` (N, C, H, W) or (N, H, W) in [0, 1]-like domains.

        Only the shapes are checked here; :meth:`fooling_rate` checks the values and budgets.
        """
        images = x if x.dim() == 4 else x.unsqueeze(1)
        return warp(images, flow[None]).reshape(x.shape) + perturbation

    # ----------------------------------------------------------------------------------------------- training
    def fit(
        self, model: nn.Module, data: Dataset, *, seed: int = 0, progress: bool = True
    ) -> GeneralizedUniversalResult:
        """Learn a universal flow and additive perturbation on ``data``.

        Args:
            model: the classifier (kept in eval mode; its weights are not changed).
            data: the training images (N, C, H, W) or (N, H, W); the model's predictions on them are the labels the
                attack moves away from.
            seed: seeds the flow's initial direction and the order of the points.
            progress: show a progress bar over the epochs.

        Returns:
            A :class:`GeneralizedUniversalResult` with the best pair found and the fooling rate per epoch.
        """
        _check_model_and_data(model, data)
        threat = self._threat(data)
        device = model_device(model)
        lo, hi = data.domain
        shape = data.feature_shape
        h, w = shape[-2:]
        gen = torch.Generator().manual_seed(seed)
        g = torch.randn((2, h, w), generator=gen, dtype=data.x.dtype).to(device).requires_grad_(True)
        wv = torch.zeros(shape, dtype=data.x.dtype, device=device, requires_grad=True)
        optimiser = torch.optim.Adam([g, wv], lr=self.lr, betas=(self.beta1, 0.999))
        history: list[float] = []
        best: tuple[float, torch.Tensor, torch.Tensor] = (-1.0, torch.zeros(0), torch.zeros(0))
        with eval_mode(model):
            clean = _predict(model, data, self.batch_size, None)
            bar = tqdm(total=self.epochs, desc="guap", unit="epoch", disable=not progress, leave=False)
            for epoch in range(self.epochs):
                order = torch.randperm(len(data), generator=torch.Generator().manual_seed(seed + 1 + epoch))
                for idx, xb, _ in data.batches(self.batch_size, indices=order):
                    xb, kb = xb.to(device), clean[idx.to(device)]
                    with torch.enable_grad():
                        x_adv = self.apply(xb, self._flow(g), self.eps * torch.tanh(wv)).clamp(lo, hi)
                        fooling = torch.log1p(ce_loss(model(x_adv), kb)).mean()
                        optimiser.zero_grad()
                        (-fooling).backward()  # Adam minimises; the paper maximises the fooling loss
                    optimiser.step()
                with torch.no_grad():
                    f, v = self._flow(g), self.eps * torch.tanh(wv)
                rate = self._rate(model, data, threat, f, v, clean)
                history.append(rate)
                if rate > best[0]:
                    best = (rate, f.detach().clone(), v.detach().clone())
                bar.update(1)
                bar.set_postfix(fooling_rate=f"{rate:.3f}")
            bar.close()
        rate, f, v = best
        size = float(threat.flow_size(f[None])[0])
        return GeneralizedUniversalResult(f, v, rate, len(history), history, size)

    # ----------------------------------------------------------------------------------------------- evaluation
    def fooling_rate(self, model: nn.Module, data: Dataset, flow: torch.Tensor, perturbation: torch.Tensor) -> float:
        """Fraction of ``data``'s points whose prediction on ``clip(warp(x, flow) + perturbation)`` changes.

        Args:
            model: the classifier.
            data: held-out images (labels unused: the fooling rate compares predictions, as in the paper).
            flow: a flow field (2, H, W), e.g. :attr:`GeneralizedUniversalResult.flow`.
            perturbation: an additive perturbation of the data's feature shape.

        Raises:
            InputError: wrong shapes, NaN/Inf values, or a pair outside this attack's budgets.
        """
        _check_model_and_data(model, data)
        threat = self._threat(data)
        h, w = data.feature_shape[-2:]
        for name, t, want in (("flow", flow, (2, h, w)), ("perturbation", perturbation, data.feature_shape)):
            if not torch.is_tensor(t) or not t.is_floating_point() or tuple(t.shape) != want:
                raise InputError(
                    f"{name} must be a floating-point tensor of shape {want}, "
                    f"got {getattr(t, 'dtype', type(t).__name__)} {tuple(getattr(t, 'shape', ()))}"
                )
            if not bool(torch.isfinite(t).all()):
                raise InputError(f"{name} contains NaN or Inf values")
        if float(flow_norm(flow[None])[0]) > self.tau * (1 + 1e-4) + 1e-6:
            raise InputError(f"flow has ||f||_T = {float(flow_norm(flow[None])[0]):.4g} > tau = {self.tau:g}")
        if float(perturbation.abs().max()) > self.eps * (1 + 1e-5) + 1e-7:
            raise InputError(f"perturbation has l-inf norm {float(perturbation.abs().max()):.4g} > eps = {self.eps:g}")
        device = model_device(model)
        f = flow.to(device=device, dtype=data.x.dtype)
        v = perturbation.to(device=device, dtype=data.x.dtype)
        with eval_mode(model):
            clean = _predict(model, data, self.batch_size, None)
            return self._rate(model, data, threat, f, v, clean)

    def _rate(
        self, model: nn.Module, data: Dataset, threat: FlowThreat, f: torch.Tensor, v: torch.Tensor, clean: torch.Tensor
    ) -> float:
        lo, hi = data.domain
        preds = _predict(model, data, self.batch_size, lambda xb: (threat.apply(xb, f[None]) + v).clamp(lo, hi))
        return float((preds != clean).sum()) / max(1, len(data))
