"""Carlini & Wagner's attacks: minimal-distortion adversarial examples by penalised optimisation (l2, l∞, l0).

Carlini & Wagner, "Towards Evaluating the Robustness of Neural Networks", IEEE Symposium on Security and Privacy
(S&P) 2017.

* :class:`CarliniWagnerL2` solves ``min ||x' - x||_2² + c · f(x')`` over the input domain, where ``f`` is the margin
  loss f_6 of the paper (``f <= 0`` exactly when ``x'`` is adversarial with confidence κ), with a tanh change of
  variables that keeps ``x'`` in the domain and Adam as the optimiser; a per-sample binary search over ``c`` finds
  the smallest penalty that still succeeds, and the smallest successful perturbation seen is kept.
* :class:`CarliniWagnerLinf` replaces the l∞ term by the hinge ``Σ_i max(|δ_i| - τ, 0)`` and shrinks ``τ`` while the
  attack still succeeds.
* :class:`CarliniWagnerL0` repeatedly runs the l2 solver restricted to a set of allowed features and removes from
  that set the features that contribute least, until the restricted l2 attack fails.

The pieces they share live here once: the tanh change of variables (:func:`_to_w`, :func:`_from_w`), the Adam loop
with per-sample freezing (:func:`_adam_loop`), the penalised C&W loss ``c · f`` (:func:`_cw_penalty`), the success
test with margin κ (:func:`_hit`) and one restricted l2 solve (:func:`_l2_round`).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from bastion.attacks.base import Attack, CountingModel, positive_float, positive_int
from bastion.errors import InputError
from bastion.results import Criterion
from bastion.threat import LpBall, ThreatModel

#: A closure of :func:`_adam_loop`: given the variable and the iteration, the gradient and the rows to freeze
#: (``None``: none), or ``None`` to stop.
_Closure = Callable[[torch.Tensor, int], "tuple[torch.Tensor, torch.Tensor | None] | None"]


def _fraction(name: str, value: object) -> float:
    """``value`` as a float in (0, 1), or an InputError naming the hyperparameter."""
    v = positive_float(name, value)
    if v >= 1.0:
        raise InputError(f"{name} must be in (0, 1), got {value!r}")
    return v


def _lp_threat(attack: Attack, threat: ThreatModel) -> LpBall:
    if not isinstance(threat, LpBall):
        raise InputError(f"{type(attack).__name__} needs an LpBall threat model, got {threat!r}")
    return threat


# ------------------------------------------------------------------------------------------- shared pieces
def _to_w(x: torch.Tensor, lo: float, half: float) -> torch.Tensor:
    """The preimage of ``x`` under :func:`_from_w` (shrunk a little so that inputs at the bounds stay finite)."""
    return torch.atanh(((x - lo) / half - 1.0) * (1.0 - 1e-6))


def _from_w(w: torch.Tensor, lo: float, half: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``x'(w) = lo + half · (tanh(w) + 1)``, always in the domain, and ``tanh(w)`` (for the chain rule)."""
    tanh_w = torch.tanh(w)
    return lo + half * (tanh_w + 1.0), tanh_w


def _cw_penalty(criterion: Criterion, c: torch.Tensor, kappa: float) -> Callable[[torch.Tensor], torch.Tensor]:
    """The loss ``c · f(x')`` as a function of the logits, with f_6 = ``-Criterion.loss(Z, "cw", kappa=κ)``."""

    def penalty(logits: torch.Tensor) -> torch.Tensor:
        return -c * criterion.loss(logits, "cw", kappa=kappa)

    return penalty


def _hit(criterion: Criterion, logits: torch.Tensor, kappa: float) -> torch.Tensor:
    """Successful iterates: adversarial, by a margin of at least κ."""
    return criterion.is_adversarial(logits) & (criterion.loss(logits, "cw") >= kappa)


def _adam_loop(
    w: torch.Tensor,
    *,
    lr: float,
    steps: int,
    closure: _Closure,
    project: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """Minimise over ``w`` (N, ...) with Adam for at most ``steps`` iterations; return the last ``w``.

    ``closure(w, it)`` evaluates the objective at ``w`` (recording whatever it needs) and returns its gradient and
    the rows to freeze (left where they are by this step), or ``None`` to stop before stepping. ``project``, if
    given, maps ``w`` back onto its feasible set after every step (projected Adam).
    """
    w = w.detach().clone().requires_grad_(True)
    optimizer = torch.optim.Adam([w], lr=lr)
    for it in range(steps):
        out = closure(w.detach(), it)
        if out is None:
            break
        grad, frozen = out
        w.grad = grad
        if frozen is None:
            optimizer.step()
        else:
            keep = w.detach()[frozen]
            optimizer.step()
            with torch.no_grad():
                w[frozen] = keep
        if project is not None:
            with torch.no_grad():
                w.copy_(project(w))
    return w.detach()


def _l2_round(
    model: CountingModel,
    x: torch.Tensor,
    w_init: torch.Tensor,
    const: torch.Tensor,
    criterion: Criterion,
    domain: tuple[float, float],
    best: torch.Tensor,
    best_l2: torch.Tensor,
    *,
    kappa: float,
    steps: int,
    lr: float,
    abort_early: bool,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """One Adam solve of ``min ||δ||_2² + c · f(x + δ)``, ``δ = m ⊙ (x'(w) - x)`` (``m = mask``, all ones if ``None``).

    Updates ``best``/``best_l2`` in place with the successful iterate of smallest l2 distance of each sample, and
    returns which samples had a successful iterate. Early abort (authors' code): every ``steps // 10`` iterations a
    sample whose loss has not decreased by 0.01 % counts as stalled; the solve stops once every sample has stalled.
    """
    lo, hi = domain
    half = (hi - lo) / 2.0
    penalty = _cw_penalty(criterion, const, kappa)
    found = torch.zeros(x.shape[0], dtype=torch.bool, device=x.device)
    state = {"prev": torch.full_like(const, math.inf), "stalled": torch.zeros_like(found)}
    check_every = max(1, steps // 10)

    def closure(w: torch.Tensor, it: int) -> tuple[torch.Tensor, None] | None:
        x_w, tanh_w = _from_w(w, lo, half)
        x_new = x_w if mask is None else x + mask * (x_w - x)
        logits, cf, grad_x = model.logits_and_grad(x_new, penalty)
        diff = x_new - x
        l2sq = diff.flatten(1).pow(2).sum(dim=1)
        loss = l2sq + cf
        hit = _hit(criterion, logits, kappa)
        improved = hit & (l2sq < best_l2)
        best_l2.copy_(torch.where(improved, l2sq, best_l2))
        best[improved] = x_new[improved]
        found.logical_or_(hit)
        # chain rule through the mask and the change of variables: dx'/dw = m · (hi - lo) / 2 · (1 - tanh²(w))
        grad = (2.0 * diff + grad_x) * (half * (1.0 - tanh_w * tanh_w))
        if mask is not None:
            grad = grad * mask
        if abort_early and it % check_every == 0:
            state["stalled"] |= loss > state["prev"] - 1e-4 * state["prev"].abs()
            if bool(state["stalled"].all()):
                return None
            state["prev"] = loss
        return grad, None

    _adam_loop(w_init, lr=lr, steps=steps, closure=closure)
    return found


#: "no successful constant yet" in the search over c (the reference implementation's convention)
NO_UPPER = 1e10


def update_consts(
    const: torch.Tensor, lower: torch.Tensor, upper: torch.Tensor, success: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One step of Carlini & Wagner's per-sample search over the constant ``c`` of the loss term.

    A sample that succeeded at ``c`` lowers its upper bound to ``c``; one that failed raises its lower bound. The
    next ``c`` is the midpoint of the bounds, or ``10·c`` while no success has set an upper bound.

    Returns:
        The new ``(const, lower, upper)``.
    """
    upper = torch.where(success, torch.minimum(upper, const), upper)
    lower = torch.where(success, lower, torch.maximum(lower, const))
    const = torch.where(upper < NO_UPPER * 0.1, (lower + upper) / 2, const * 10)
    return const, lower, upper


class CarliniWagnerL2(Attack):
    """Carlini & Wagner's l2 attack (IEEE S&P 2017), targeted and untargeted.

    Objective, per sample: ``min_w ||x'(w) - x||_2² + c · f(x'(w))`` with the change of variables
    ``x'(w) = lo + (hi - lo) · (tanh(w) + 1) / 2`` (``(lo, hi)`` the threat's input domain, so every iterate is in
    the domain) and the paper's loss f_6:

    * untargeted: ``f(x') = max(Z_y - max_{i != y} Z_i, -κ)``;
    * targeted:   ``f(x') = max(max_{i != t} Z_i - Z_t, -κ)``;

    with ``Z`` the logits (``f = -Criterion.loss(Z, "cw", kappa=κ)``). Each of ``binary_search_steps`` rounds starts
    from ``w`` at the clean input and runs ``steps`` Adam iterations. Between rounds the constant ``c`` of each
    sample is bisected between the largest constant that failed and the smallest that succeeded, or multiplied by 10
    while no constant has succeeded. Over all iterations the successful iterate (adversarial with a margin of at
    least κ) of smallest l2 distance is kept; samples never broken are returned unchanged.

    Early abort, as in the authors' implementation: every ``steps // 10`` iterations the round stops if the loss
    has not decreased by 0.01 %. Here the test is per sample (``loss > prev - 1e-4 · |prev|``, sign-safe for the
    negative losses κ > 0 allows): the round stops once every sample of the batch has stalled at some check
    (stalled samples keep optimising until then, which can only improve their result), so that no sample is cut
    short by the progress of the others. As in the authors' code, when
    ``binary_search_steps >= 10`` the last round uses the smallest successful constant. The distance is measured to
    the clean input itself (not to its tanh reconstruction).

    Args:
        binary_search_steps: rounds of the binary search over ``c`` (paper: 9).
        steps: Adam iterations per round (paper: at most 10000; fewer is usually enough on small models).
        lr: Adam learning rate, in ``w`` space (paper: 1e-2).
        initial_const: the constant ``c`` of the first round (paper: 1e-3).
        confidence: κ >= 0, the margin by which the adversarial class must win (paper: 0).
        abort_early: stop a round once the loss stalls (paper's implementation: on).
    """

    name = "cw-l2"
    norms = ("l2",)
    minimal = True
    paper = "Carlini & Wagner, Towards Evaluating the Robustness of Neural Networks, IEEE S&P 2017"

    def __init__(
        self,
        *,
        binary_search_steps: int = 9,
        steps: int = 10000,
        lr: float = 1e-2,
        initial_const: float = 1e-3,
        confidence: float = 0.0,
        abort_early: bool = True,
    ) -> None:
        self.binary_search_steps = positive_int("binary_search_steps", binary_search_steps)
        self.steps = positive_int("steps", steps)
        self.lr = positive_float("lr", lr)
        self.initial_const = positive_float("initial_const", initial_const)
        self.confidence = positive_float("confidence", confidence, allow_zero=True)
        if not isinstance(abort_early, bool):
            raise InputError(f"abort_early must be True or False, got {abort_early!r}")
        self.abort_early = abort_early

    def run(
        self,
        model: CountingModel,
        x: torch.Tensor,
        criterion: Criterion,
        threat: ThreatModel,
        generator: torch.Generator | None,
    ) -> torch.Tensor:
        threat = _lp_threat(self, threat)
        n = x.shape[0]
        w0 = _to_w(x, threat.domain[0], (threat.domain[1] - threat.domain[0]) / 2.0)
        const = torch.full((n,), self.initial_const, dtype=x.dtype, device=x.device)
        lower = torch.zeros_like(const)
        upper = torch.full_like(const, NO_UPPER)  # smallest successful constant so far
        best_l2 = torch.full_like(const, math.inf)
        best = x.clone()
        for round_ in range(self.binary_search_steps):
            if self.binary_search_steps >= 10 and round_ == self.binary_search_steps - 1:
                const = torch.where(upper < NO_UPPER * 0.1, upper, const)
            c = const.clone()
            found = _l2_round(
                model,
                x,
                w0,
                c,
                criterion,
                threat.domain,
                best,
                best_l2,
                kappa=self.confidence,
                steps=self.steps,
                lr=self.lr,
                abort_early=self.abort_early,
            )
            # binary search on c: bisect once bracketed, else grow by 10 until some c succeeds
            const, lower, upper = update_consts(c, lower, upper, found)
        return best


class CarliniWagnerLinf(Attack):
    """Carlini & Wagner's l∞ attack (IEEE S&P 2017, section VI-C), targeted and untargeted.

    The l∞ norm is a poor objective for gradient descent (only the largest coordinate gets a gradient), so the
    paper replaces it by a hinge that penalises every coordinate above a threshold τ, and shrinks τ:

    1. with ``τ`` and ``c`` fixed, solve ``min_δ c · f(x + δ) + Σ_i max(|δ_i| - τ, 0)`` (``f`` the paper's f_6,
       ``f = -Criterion.loss(Z, "cw", kappa=κ)``) with Adam, starting from the previous solution (warm start); the
       solve succeeds as soon as an iterate, clipped to the τ-box ``|δ_i| <= τ``, is adversarial by a margin of at
       least κ (the paper waits for every ``|δ_i| < τ``; Adam makes the coordinates held at the hinge oscillate
       around τ, so an iterate rarely has all of them inside at once; testing the clipped iterate costs one more
       forward pass per step and accepts only points that satisfy the constraint exactly);
    2. on success, keep that point and set ``τ ← decrease_factor · min(τ, ||δ||_∞)``; on failure after ``steps``
       iterations, double ``c`` (keeping the current iterate) and solve again;
    3. a sample stops when ``c`` would exceed ``largest_const`` (τ cannot be reduced further without losing success)
       or when ``τ`` falls below ``min_tau``; its last successful point is returned (the clean input if none).

    Batched: ``τ`` and ``c`` are per-sample tensors and all unfinished samples iterate together, each solve stopping
    for a sample (frozen) once it succeeds and for the batch once every sample has succeeded or used its ``steps``.

    Deviation from the authors' code, which uses the tanh change of variables: the iterate lives in input space and
    is clipped to the domain after every Adam step (the paper allows either). Inputs at the domain bounds (most
    pixels of digit images) sit on the flat end of tanh, where Adam barely moves them, whereas the l∞ optimum moves
    every coordinate. The step size is therefore in input units, ``lr`` times the domain width. The granularity of
    the result is the decay: the last success is within a factor ``1 / decrease_factor`` of the next failing τ.

    Args:
        steps: Adam iterations per solve, i.e. per (τ, c) pair (authors' code: 1000).
        lr: Adam learning rate, as a fraction of the domain width (paper: 5e-3).
        initial_const: the constant ``c`` of the first solve (paper: "small"; authors' code: 1e-5). It is carried
            from one τ to the next and only grows.
        largest_const: the largest constant tried before a sample stops (authors' code: 20); ``c`` doubles.
        initial_tau: the first τ, as a fraction of the domain width (paper: 1, i.e. no constraint).
        decrease_factor: factor by which τ shrinks after each success (paper: 0.9).
        min_tau: τ below which a sample stops, as a fraction of the domain width (authors' code: 1/256).
        confidence: κ >= 0, the margin by which the adversarial class must win (paper: 0).
    """

    name = "cw-linf"
    norms = ("linf",)
    minimal = True
    paper = "Carlini & Wagner, Towards Evaluating the Robustness of Neural Networks, IEEE S&P 2017"

    def __init__(
        self,
        *,
        steps: int = 1000,
        lr: float = 5e-3,
        initial_const: float = 1e-5,
        largest_const: float = 20.0,
        initial_tau: float = 1.0,
        decrease_factor: float = 0.9,
        min_tau: float = 1.0 / 256,
        confidence: float = 0.0,
    ) -> None:
        self.steps = positive_int("steps", steps)
        self.lr = positive_float("lr", lr)
        self.initial_const = positive_float("initial_const", initial_const)
        self.largest_const = positive_float("largest_const", largest_const)
        if self.largest_const < self.initial_const:
            raise InputError(f"largest_const must be >= initial_const ({self.initial_const}), got {largest_const!r}")
        self.initial_tau = positive_float("initial_tau", initial_tau)
        self.decrease_factor = _fraction("decrease_factor", decrease_factor)
        self.min_tau = positive_float("min_tau", min_tau)
        self.confidence = positive_float("confidence", confidence, allow_zero=True)

    def run(
        self,
        model: CountingModel,
        x: torch.Tensor,
        criterion: Criterion,
        threat: ThreatModel,
        generator: torch.Generator | None,
    ) -> torch.Tensor:
        threat = _lp_threat(self, threat)
        lo, hi = threat.domain
        width = hi - lo
        kappa = self.confidence
        n = x.shape[0]
        tau = torch.full((n,), self.initial_tau * width, dtype=x.dtype, device=x.device)
        const = torch.full_like(tau, self.initial_const)
        best = x.clone()
        current = x.clone()  # the warm start of each solve
        done = torch.zeros(n, dtype=torch.bool, device=x.device)
        shape = (-1,) + (1,) * (x.dim() - 1)

        while not bool(done.all()):
            idx = (~done).nonzero().squeeze(1)
            xi, crit, t = x[idx], criterion.subset(idx), tau[idx]
            penalty = _cw_penalty(crit, const[idx], kappa)
            solved = torch.zeros(idx.shape[0], dtype=torch.bool, device=x.device)
            t_view = t.view(shape)

            sol = xi.clone()

            def closure(
                v: torch.Tensor,
                it: int,
                xi: torch.Tensor = xi,
                crit: Criterion = crit,
                t_view: torch.Tensor = t_view,
                solved: torch.Tensor = solved,
                sol: torch.Tensor = sol,
                penalty: Callable[[torch.Tensor], torch.Tensor] = penalty,
            ) -> tuple[torch.Tensor, torch.Tensor] | None:
                # the iterate's projection onto the τ-box: the iterate itself once every |δ_i| <= τ
                boxed = torch.minimum(torch.maximum(v, xi - t_view), xi + t_view)
                ok = _hit(crit, model(boxed), kappa) & ~solved
                sol[ok] = boxed[ok]
                solved.logical_or_(ok)
                if bool(solved.all()):
                    return None
                _, _, grad_x = model.logits_and_grad(v, penalty)
                d = v - xi
                # gradient of the hinge Σ max(|δ_i| - τ, 0): sign(δ_i) where |δ_i| > τ
                grad = grad_x + torch.sign(d) * (d.abs() > t_view).to(d.dtype)
                return grad, solved  # a solved sample stays where it is

            current[idx] = _adam_loop(
                current[idx], lr=self.lr * width, steps=self.steps, closure=closure, project=threat.clip
            )
            win, lose = idx[solved], idx[~solved]
            best[win] = sol[solved]
            current[win] = sol[solved]  # the next solve starts from the solution
            reached = (current[win] - x[win]).flatten(1).abs().amax(dim=1)
            tau[win] = self.decrease_factor * torch.minimum(tau[win], reached)
            done[win] = tau[win] < self.min_tau * width
            const[lose] = const[lose] * 2.0
            done[lose] = const[lose] > self.largest_const
        return best


def _remove_features(
    mask: torch.Tensor, grad: torch.Tensor, delta: torch.Tensor, *, threshold: float, changed_tol: float
) -> torch.Tensor:
    """The allowed set ``mask`` (0/1, like the input) without its lowest-contribution features.

    The contribution of feature ``i`` is ``|g_i · δ_i|`` (``g = ∇f`` at the solution ``x + δ``). Per sample, the
    allowed features are taken in increasing order of contribution: the first is always removed, and removal goes
    on while the feature just removed contributed at most ``threshold``, up to ``ceil(0.3 · sqrt(k))`` features,
    ``k`` the number of allowed features that changed by more than ``changed_tol`` (the rule of the authors' code).
    """
    n = mask.shape[0]
    allowed = mask.reshape(n, -1) > 0
    contrib = (grad * delta).abs().reshape(n, -1).masked_fill(~allowed, math.inf)
    changed = (allowed & (delta.reshape(n, -1).abs() > changed_tol)).sum(dim=1)
    cap = torch.ceil(0.3 * changed.to(contrib.dtype).sqrt()).clamp(min=1)
    values, order = contrib.sort(dim=1)
    rank = torch.arange(values.shape[1], device=values.device)
    before = torch.cat([torch.full_like(values[:, :1], -math.inf), values[:, :-1]], dim=1)
    drop_sorted = (rank < cap[:, None]) & (before <= threshold) & torch.isfinite(values)
    drop = torch.zeros_like(allowed).scatter(1, order, drop_sorted)
    return (allowed & ~drop).to(mask.dtype).reshape(mask.shape)


class CarliniWagnerL0(Attack):
    """Carlini & Wagner's l0 attack (IEEE S&P 2017, section VI-B), targeted and untargeted.

    The l0 norm is not differentiable, so the paper shrinks, step by step, the set of features the attack may
    change, using the l2 attack as a subroutine:

    1. run the l2 attack (the solver of :class:`CarliniWagnerL2`: tanh variables, Adam, the loss
       ``||δ||_2² + c · f(x + δ)``) restricted to the allowed features (``δ = m ⊙ (x'(w) - x)``), warm-started from
       the previous solution, with the constant ``c`` carried from the previous success and doubled after each
       failure until ``largest_const``;
    2. on success (an iterate adversarial by a margin of at least κ; the one of smallest l2 distance is the
       solution), compute ``g = ∇f`` at the solution and remove from the allowed set the features of lowest
       contribution ``|g_i · δ_i|``: the paper removes one feature, or for speed several with a small contribution;
       here (as in the authors' code) the lowest one always, then the next ones while the one just removed
       contributed at most ``threshold``, at most ``ceil(0.3 · sqrt(k))`` per step (``k`` the number of changed
       allowed features);
    3. stop when the restricted l2 attack fails for every ``c <= largest_const`` (or nothing is left to remove) and
       return the last successful point, the one of smallest support found (the clean input if none).

    Batched: allowed sets and constants are per sample; all unfinished samples run each restricted l2 solve together.
    The paper counts pixels (all channels of a pixel together); bastion's l0 distance counts input features
    (elements), so the allowed set and the removal here are per feature. ``|g_i · δ_i|`` follows the authors' code
    (the paper writes ``g_i · δ_i``, the reduction of f the feature brings).

    Args:
        steps: Adam iterations per restricted l2 solve (authors' code: 1000).
        lr: Adam learning rate, in ``w`` space (authors' code: 1e-2).
        initial_const: the constant ``c`` of the first solve (authors' code: 1e-3).
        largest_const: the largest constant tried before a sample stops (authors' code: 2e6); ``c`` doubles.
        threshold: contribution up to which several features are removed at once (authors' code: 0.01).
        confidence: κ >= 0, the margin by which the adversarial class must win (paper: 0).
        abort_early: stop a solve once the loss stalls (as in :class:`CarliniWagnerL2`; authors' code: on).
    """

    name = "cw-l0"
    norms = ("l0",)
    minimal = True
    paper = "Carlini & Wagner, Towards Evaluating the Robustness of Neural Networks, IEEE S&P 2017"

    def __init__(
        self,
        *,
        steps: int = 1000,
        lr: float = 1e-2,
        initial_const: float = 1e-3,
        largest_const: float = 2e6,
        threshold: float = 0.01,
        confidence: float = 0.0,
        abort_early: bool = True,
    ) -> None:
        self.steps = positive_int("steps", steps)
        self.lr = positive_float("lr", lr)
        self.initial_const = positive_float("initial_const", initial_const)
        self.largest_const = positive_float("largest_const", largest_const)
        if self.largest_const < self.initial_const:
            raise InputError(f"largest_const must be >= initial_const ({self.initial_const}), got {largest_const!r}")
        self.threshold = positive_float("threshold", threshold, allow_zero=True)
        self.confidence = positive_float("confidence", confidence, allow_zero=True)
        if not isinstance(abort_early, bool):
            raise InputError(f"abort_early must be True or False, got {abort_early!r}")
        self.abort_early = abort_early

    def run(
        self,
        model: CountingModel,
        x: torch.Tensor,
        criterion: Criterion,
        threat: ThreatModel,
        generator: torch.Generator | None,
    ) -> torch.Tensor:
        threat = _lp_threat(self, threat)
        lo, hi = threat.domain
        half = (hi - lo) / 2.0
        n = x.shape[0]
        mask = torch.ones_like(x)
        const = torch.full((n,), self.initial_const, dtype=x.dtype, device=x.device)
        best = x.clone()  # the last success, also the warm start of the next solve
        done = torch.zeros(n, dtype=torch.bool, device=x.device)

        while not bool(done.all()):
            idx = (~done).nonzero().squeeze(1)
            xi, crit = x[idx], criterion.subset(idx)
            sol = xi.clone()
            found = _l2_round(
                model,
                xi,
                _to_w(best[idx], lo, half),
                const[idx],
                crit,
                threat.domain,
                sol,
                torch.full((idx.shape[0],), math.inf, dtype=x.dtype, device=x.device),
                kappa=self.confidence,
                steps=self.steps,
                lr=self.lr,
                abort_early=self.abort_early,
                mask=mask[idx],
            )
            win, lose = idx[found], idx[~found]
            if win.numel():
                best[win] = sol[found]
                # g = ∇f at the solution, f without the cap at κ (which would flatten it where the margin exceeds κ)
                _, _, g = model.logits_and_grad(
                    best[win], _cw_penalty(crit.subset(found), torch.ones_like(const[win]), math.inf)
                )
                mask[win] = _remove_features(
                    mask[win], g, best[win] - x[win], threshold=self.threshold, changed_tol=1e-4 * (hi - lo)
                )
                done[win] = mask[win].reshape(win.shape[0], -1).sum(dim=1) == 0
            const[lose] = const[lose] * 2.0
            done[lose] = const[lose] > self.largest_const
        return best
