"""ZOO and AutoZOOM: zeroth-order optimisation of the Carlini-Wagner objective (score-based, minimal l2).

* Chen, Zhang, Sharma, Yi & Hsieh, "ZOO: Zeroth Order Optimization Based Black-box Attacks to Deep Neural Networks
  without Training Substitute Models", AISec 2017.
* Tu, Ting, Chen, Liu, Zhang, Yi, Hsieh & Cheng, "AutoZOOM: Autoencoder-based Zeroth Order Optimization Method for
  Attacking Black-box Neural Networks", AAAI 2019.

Both minimise the C&W objective over a perturbation ``δ`` of an *attack space* (the image, or a smaller image that
is upsampled bilinearly onto it: the dimension reduction of both papers)::

    ||x' - x||²₂ + c · f(x'),   f(x') = max(log p_y(x') - max_{i≠y} log p_i(x'), -κ)   (untargeted)
                                f(x') = max(max_{i≠t} log p_i(x') - log p_t(x'), -κ)    (targeted)

with ``x' = clip(x + U(δ))`` (box constraint, the default) or ``x' = lo + (hi - lo) (tanh(w + U(δ)) + 1) / 2``
(the tanh change of variables, ``tanh=True``). ``f`` is the papers' black-box loss on log-probabilities; a margin of
log-probabilities is a margin of logits, so it is computed on the oracle's logit-like scores directly. Both are
**minimal-distortion** attacks (``minimal = True``): they take no radius, return the adversarial example of smallest
l2 distortion they queried, and success at any radius is read from the distances (the base clips to the domain only).
Their own objective controls the distortion, so a fixed-eps flavour would only discard what they are built to do.
Spending queries after the first success is the point of a minimal-distortion attack; with ``fine_tune=False`` each
sample stops at its first adversarial example instead (cheaper, e.g. early in a cascade).

**ZOO** (ZOO-ADAM, the paper's best solver) estimates ``B`` coordinates of the gradient per iteration with symmetric
differences ``(F(δ + h e_i) - F(δ - h e_i)) / 2h``, ``h = 1e-4`` (``2B + 1`` queries: the ``2B`` probes and the
current point), and takes one ADAM step on each of them (lr 0.01, β₁ = 0.9, β₂ = 0.999, per-coordinate ADAM states
and step counts). ``c`` is set by binary search over ``binary_steps`` rounds of at most ``iterations`` iterations,
each restarting from ``δ = 0``, with the reference's rule (halve towards the lower bound after a success, multiply by
10 while no success is known); a round aborts early once the objective stops improving by 0.01 % over a tenth of the
iterations. For large images the attack space starts at ``attack_size`` and doubles at the iterations listed in
``hierarchy`` (the hierarchical attack), and after each enlargement the coordinates are drawn by **importance
sampling**: with probability proportional to the largest ``|δ|`` in each of 8 × 8 regions of the previous attack
space. Defaults are the paper's and its code's: ``B = 128``, 9 binary-search rounds from ``c = 0.01``, 1000
iterations (the reference's CIFAR-10 setting; MNIST used 3000), ``attack_size = 32`` doubling at iterations 2000 and
10 000. Deviations: the reference refreshes the importance probabilities only when the attack space grows (its
per-iteration refresh compares the batch dimension with the size and never runs); the same is done here, and the
probabilities are mixed half-and-half with the uniform distribution so that no coordinate becomes impossible to draw
(the reference's can reach zero). The box constraint is the default because it leaves the distance exact; the
reference also uses it on MNIST, where tanh "causes gradient to vanish".

**AutoZOOM** (AutoZOOM-BiLIN) estimates the whole gradient from random unit directions ``u_j`` (``β = 1 / d'``,
``d'`` the attack-space dimension): ``g = b / q · Σ_j (F(δ + β u_j) - F(δ)) / β · u_j`` with ``b = q`` as in the
reference code (ADAM normalises the scale away), one ADAM step on all of ``δ`` per iteration (``q + 1`` queries). Its
**adaptive query allocation** uses ``q = 1`` until the first adversarial example is found, then ``q = directions``
to fine-tune the distortion, resetting ADAM and the lower bound of ``c`` at that moment. ``c`` starts at 10 and is
updated every ``switch_every`` iterations by the same rule as ZOO's. Defaults from the paper and its code: lr 0.01,
1000 iterations (MNIST and CIFAR-10), ``directions = 4`` after the first success and ``switch_every = 100`` (the
reference's examples), ``attack_size = 32`` (the paper's 32 × 32 BiLIN space for ImageNet; smaller images are not
reduced). The autoencoder variant (AutoZOOM-AE) needs a trained decoder and is not included.

Query accounting (exact, per sample): ZOO spends ``2B + 1`` queries per iteration, AutoZOOM ``q + 1``; a sample that
cannot afford a whole iteration stops. Every queried point takes part in the search for the best adversarial example
(the references only consider the current point). The queried points are always inside the input domain.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from bastion.attacks.base import Attack, CountingModel, positive_float, positive_int
from bastion.errors import InputError
from bastion.models.oracle import QueryLedger
from bastion.results import Criterion
from bastion.threat import LpBall, ThreatModel

#: Most elements of probe images built at once; larger batches of probes are split into chunks.
_CHUNK = 1 << 24
#: Finite-difference step of ZOO (both papers' ``h``).
_H = 1e-4


@dataclass
class _Space:
    """The attack space: a perturbation of shape ``shape`` per sample, upsampled onto the input's ``full`` shape."""

    shape: tuple[int, ...]
    full: tuple[int, ...]

    @property
    def reduced(self) -> bool:
        return self.shape != self.full

    @property
    def dim(self) -> int:
        return math.prod(self.shape)

    def decode(self, delta: torch.Tensor) -> torch.Tensor:
        """Perturbations (k, *shape) as input-space perturbations (k, *full), bilinearly upsampled if reduced."""
        if not self.reduced:
            return delta
        return F.interpolate(delta, size=self.full[1:], mode="bilinear", align_corners=False)


def _initial_space(x: torch.Tensor, attack_size: int | None) -> _Space:
    full = tuple(x.shape[1:])
    if attack_size is None or x.dim() != 4 or max(full[1:]) <= attack_size:
        return _Space(full, full)
    return _Space((full[0], min(full[1], attack_size), min(full[2], attack_size)), full)


class _Objective:
    """The C&W objective of both attacks on a batch, the images it is evaluated at, and their queries."""

    def __init__(self, x: torch.Tensor, threat: LpBall, criterion: Criterion, kappa: float, tanh: bool) -> None:
        self.x, self.criterion, self.kappa, self.tanh = x, criterion, kappa, tanh
        self.lo, self.hi = threat.domain
        if tanh:
            unit = (x - self.lo) / (self.hi - self.lo) * 2 - 1
            self.w = torch.atanh(unit * 0.999999)  # the reference's margin keeps atanh finite at the domain's faces

    def images(self, rows: torch.Tensor, perturbation: torch.Tensor) -> torch.Tensor:
        """The inputs ``x'`` for input-space perturbations (k, ...) of the samples ``rows`` (k,)."""
        if self.tanh:
            return self.lo + (self.hi - self.lo) * (torch.tanh(self.w[rows] + perturbation) + 1) / 2
        return (self.x[rows] + perturbation).clamp(self.lo, self.hi)

    def probe(
        self, ledger: QueryLedger, space: _Space, act: torch.Tensor, delta: torch.Tensor, c: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Query the attack-space points ``delta`` (a, P, d) of the samples ``act`` (a,).

        Returns the objective (a, P), and per sample the smallest distortion among the adversarial points (inf if
        none), that point, and whether any point was adversarial.
        """
        a, p = delta.shape[:2]
        per_row = p * math.prod(space.full)
        chunk = max(1, _CHUNK // max(per_row, 1))
        total = delta.new_empty((a, p))
        best_d = delta.new_full((a,), math.inf)
        best_x = self.x[act].clone()
        for s in range(0, a, chunk):
            part = slice(s, min(s + chunk, a))
            k = part.stop - part.start
            rows = act[part].repeat_interleave(p)
            pert = space.decode(delta[part].reshape(k * p, *space.shape))
            imgs = self.images(rows, pert)
            crit = self.criterion.subset(rows)
            scores = ledger.scores(imgs, rows)
            f = -crit.loss(scores, "cw", kappa=self.kappa)
            dist = (imgs - self.x[rows]).flatten(1).pow(2).sum(dim=1)
            total[part] = (dist + c[rows] * f).reshape(k, p)
            adv = crit.is_adversarial(scores).reshape(k, p)
            d = torch.where(adv, dist.reshape(k, p), torch.full_like(dist.reshape(k, p), math.inf))
            d_min, j = d.min(dim=1)
            best_d[part] = d_min
            best_x[part] = imgs.reshape(k, p, *space.full)[torch.arange(k, device=imgs.device), j]
        return total, best_d, best_x, torch.isfinite(best_d)


def _binary_search(c: torch.Tensor, lower: torch.Tensor, upper: torch.Tensor, success: torch.Tensor) -> None:
    """The reference codes' update of ``c`` (in place): halve towards the bounds, or times 10 while none is known."""
    upper.copy_(torch.where(success, torch.minimum(upper, c), upper))
    lower.copy_(torch.where(success, lower, torch.maximum(lower, c)))
    known = upper < 1e9
    c.copy_(torch.where(known, (lower + upper) / 2, torch.where(success, c, (c * 10).clamp(max=1e10))))


def _check_common(kappa: float, lr: float, beta1: float, beta2: float) -> tuple[float, float, float, float]:
    k = positive_float("kappa", kappa, allow_zero=True)
    rate = positive_float("lr", lr)
    for name, value in (("beta1", beta1), ("beta2", beta2)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
            raise InputError(f"{name} must be in [0, 1), got {value!r}")
    return k, rate, float(beta1), float(beta2)


def _optional_int(name: str, value: object) -> int | None:
    return None if value is None else positive_int(name, value)


class ZOO(Attack):
    """ZOO-ADAM (Chen, Zhang, Sharma, Yi & Hsieh, AISec 2017): coordinate-wise zeroth-order C&W, minimal l2.

    Score-based, untargeted and targeted; see the module docstring for the objective and the algorithm. Returns the
    adversarial example of smallest l2 distortion among all queried points (the clean input where none was found).

    Args:
        queries: query budget per sample, or ``None`` to let the iterations decide (``binary_steps · iterations ·
            (2 · coordinates + 1)`` at most).
        binary_steps: rounds of the binary search on ``c`` (9 as in the paper).
        iterations: ADAM iterations per round (1000, the reference's CIFAR-10 setting).
        initial_const: first ``c`` (0.01 with binary search, as in the reference).
        kappa: confidence ``κ`` of the loss (0).
        lr: ADAM step size (0.01).
        coordinates: coordinates ``B`` estimated and updated per iteration (128; at most the attack-space size).
        beta1: ADAM's first-moment decay (0.9).
        beta2: ADAM's second-moment decay (0.999).
        tanh: use the tanh change of variables instead of the box constraint.
        attack_size: initial side of the attack space for images larger than it (32), ``None`` for full resolution.
        hierarchy: iterations at which the attack space doubles, up to the image (2000 and 10 000).
        importance: draw coordinates by importance sampling after each enlargement of the attack space.
        abort_early: end a round when the objective stops improving.
        reset_adam: reset ADAM when the first adversarial example of a round is found (the reference's option).
        fine_tune: keep reducing the distortion after the first adversarial example (the paper's minimal-distortion
            attack); ``False`` stops each sample at its first one, saving the rest of its queries.
    """

    name = "zoo"
    norms = ("l2",)
    minimal = True
    access = "score"
    budgeted = True
    paper = (
        "Chen, Zhang, Sharma, Yi & Hsieh, ZOO: Zeroth Order Optimization Based Black-box Attacks to Deep Neural "
        "Networks without Training Substitute Models, AISec 2017"
    )

    def __init__(
        self,
        *,
        queries: int | None = None,
        binary_steps: int = 9,
        iterations: int = 1000,
        initial_const: float = 0.01,
        kappa: float = 0.0,
        lr: float = 0.01,
        coordinates: int = 128,
        beta1: float = 0.9,
        beta2: float = 0.999,
        tanh: bool = False,
        attack_size: int | None = 32,
        hierarchy: tuple[int, ...] = (2000, 10000),
        importance: bool = True,
        abort_early: bool = True,
        reset_adam: bool = False,
        fine_tune: bool = True,
    ) -> None:
        self.queries = _optional_int("queries", queries)
        self.binary_steps = positive_int("binary_steps", binary_steps)
        self.iterations = positive_int("iterations", iterations)
        self.initial_const = positive_float("initial_const", initial_const)
        self.kappa, self.lr, self.beta1, self.beta2 = _check_common(kappa, lr, beta1, beta2)
        self.coordinates = positive_int("coordinates", coordinates)
        self.tanh = bool(tanh)
        self.attack_size = _optional_int("attack_size", attack_size)
        try:
            self.hierarchy = tuple(sorted(positive_int("hierarchy", it) for it in hierarchy))
        except TypeError:
            raise InputError(f"hierarchy must be a sequence of iteration numbers, got {hierarchy!r}") from None
        self.importance = bool(importance)
        self.abort_early = bool(abort_early)
        self.reset_adam = bool(reset_adam)
        self.fine_tune = bool(fine_tune)

    def run(
        self,
        model: CountingModel,
        x: torch.Tensor,
        criterion: Criterion,
        threat: ThreatModel,
        generator: torch.Generator | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if not isinstance(threat, LpBall) or threat.norm != "l2":
            raise InputError(f"ZOO is an l2 attack; got threat {threat!r}")
        ledger = model.ledger(self.queries)
        n = x.shape[0]
        objective = _Objective(x, threat, criterion, self.kappa, self.tanh)
        best = x.clone()
        best_d = x.new_full((n,), math.inf)
        c = x.new_full((n,), self.initial_const)
        lower, upper = x.new_zeros(n), x.new_full((n,), 1e10)
        every = max(self.iterations // 10, 1)
        finished = torch.zeros(n, dtype=torch.bool, device=x.device)  # stopped at a first success (no fine-tuning)
        for _ in range(self.binary_steps):
            space = _initial_space(x, self.attack_size)
            delta = x.new_zeros((n, space.dim))
            m, v = torch.zeros_like(delta), torch.zeros_like(delta)
            steps = torch.ones_like(delta)  # per-coordinate ADAM step counts
            prob: torch.Tensor | None = None  # uniform until the attack space grows
            found = torch.zeros(n, dtype=torch.bool, device=x.device)
            active = torch.ones(n, dtype=torch.bool, device=x.device)
            prev = x.new_full((n,), 1e6)
            ran = False
            for it in range(self.iterations):
                if it in self.hierarchy and space.reduced:
                    space, delta, prob = self._grow(space, delta)
                    m, v, steps = torch.zeros_like(delta), torch.zeros_like(delta), torch.ones_like(delta)
                b = min(self.coordinates, space.dim)
                act = ledger.afford((active & ~finished).nonzero().squeeze(1), 2 * b + 1)
                if act.numel() == 0:
                    break
                ran = True
                a = act.numel()
                if prob is None:
                    keys = torch.rand((a, space.dim), generator=generator, device=x.device)
                    idx = keys.topk(b, dim=1).indices  # b distinct coordinates, uniformly
                else:
                    idx = torch.multinomial(prob[act], b, replacement=False, generator=generator)
                one_hot = torch.zeros((a, b, space.dim), device=x.device, dtype=x.dtype).scatter_(2, idx[..., None], 1)
                points = delta[act][:, None].repeat(1, 2 * b + 1, 1)
                points[:, 1::2] += _H * one_hot
                points[:, 2::2] -= _H * one_hot
                total, d_min, x_min, hit = objective.probe(ledger, space, act, points, c)
                better = d_min < best_d[act]
                best[act[better]], best_d[act[better]] = x_min[better], d_min[better]
                newly = hit & ~found[act]
                found[act[hit]] = True
                if not self.fine_tune:
                    finished[act[hit]] = True
                if self.reset_adam and bool(newly.any()):
                    r = act[newly]
                    m[r], v[r], steps[r] = 0.0, 0.0, 1.0
                grad = (total[:, 1::2] - total[:, 2::2]) / (2 * _H)
                self._adam(act, idx, grad, delta, m, v, steps, x if not (space.reduced or self.tanh) else None, threat)
                if self.abort_early and it % every == 0:
                    stalled = total[:, 0] > prev[act] * 0.9999
                    active[act[stalled]] = False
                    prev[act] = total[:, 0]
            if not ran:
                break
            _binary_search(c, lower, upper, found)
        return torch.where(torch.isfinite(best_d).reshape((-1,) + (1,) * (x.dim() - 1)), best, x), ledger.used

    def _adam(
        self,
        act: torch.Tensor,
        idx: torch.Tensor,
        grad: torch.Tensor,
        delta: torch.Tensor,
        m: torch.Tensor,
        v: torch.Tensor,
        steps: torch.Tensor,
        x_box: torch.Tensor | None,
        threat: LpBall,
    ) -> None:
        """One coordinate-wise ADAM step on the coordinates ``idx`` (a, B) of the samples ``act`` (in place)."""
        m_a = m[act].gather(1, idx) * self.beta1 + (1 - self.beta1) * grad
        v_a = v[act].gather(1, idx) * self.beta2 + (1 - self.beta2) * grad * grad
        t = steps[act].gather(1, idx)
        corr = (1 - self.beta2**t).sqrt() / (1 - self.beta1**t)
        new = delta[act].gather(1, idx) - self.lr * corr * m_a / (v_a.sqrt() + 1e-8)
        if x_box is not None:
            # box constraint in the full-resolution space: keep each coordinate's x + δ inside the domain
            lo, hi = threat.domain
            x_i = x_box[act].flatten(1).gather(1, idx)
            new = torch.maximum(torch.minimum(new, hi - x_i), lo - x_i)
        for state, value in ((m, m_a), (v, v_a), (delta, new), (steps, t + 1)):
            rows = state[act]
            rows.scatter_(1, idx, value)
            state[act] = rows

    def _grow(self, space: _Space, delta: torch.Tensor) -> tuple[_Space, torch.Tensor, torch.Tensor | None]:
        """Double the attack space (capped at the image), resize ``δ`` onto it and derive importance probabilities."""
        c, h, w = space.shape
        new = _Space((c, min(2 * h, space.full[1]), min(2 * w, space.full[2])), space.full)
        old = delta.reshape(-1, *space.shape)
        grown = F.interpolate(old, size=new.shape[1:], mode="bilinear", align_corners=False)
        prob = None
        if self.importance:
            # the largest |δ| of each of 8 × 8 regions of the old space, spread over the new space
            kh, kw = max(h // 8, 1), max(w // 8, 1)
            pooled = F.max_pool2d(old.abs(), (kh, kw), stride=(kh, kw), ceil_mode=True)
            pooled = F.interpolate(pooled, size=new.shape[1:], mode="nearest").flatten(1)
            mass = pooled.sum(dim=1, keepdim=True)
            uniform = torch.full_like(pooled, 1.0 / new.dim)
            weighted = torch.where(mass > 0, pooled / mass.clamp_min(1e-30), uniform)
            prob = 0.5 * weighted + 0.5 * uniform
        return new, grown.flatten(1), prob


class AutoZOOM(Attack):
    """AutoZOOM-BiLIN (Tu et al., AAAI 2019): random-direction zeroth-order C&W with adaptive queries, minimal l2.

    Score-based, untargeted and targeted; see the module docstring. One random direction per iteration until the
    first adversarial example, then ``directions`` per iteration to reduce its distortion. Returns the adversarial
    example of smallest l2 distortion among all queried points (the clean input where none was found).

    Args:
        queries: query budget per sample, or ``None`` to let the iterations decide.
        iterations: ADAM iterations (1000, the reference's MNIST and CIFAR-10 setting).
        initial_const: first ``c`` (10, the reference's examples).
        switch_every: iterations between updates of ``c`` (100).
        kappa: confidence ``κ`` of the loss (0).
        lr: ADAM step size (0.01).
        directions: random directions per iteration after the first success (4).
        beta1: ADAM's first-moment decay (0.9).
        beta2: ADAM's second-moment decay (0.999).
        tanh: use the tanh change of variables instead of the box constraint.
        attack_size: side of the bilinear attack space for images larger than it (32), ``None`` for full size.
        fine_tune: keep reducing the distortion after the first adversarial example (the paper's second stage);
            ``False`` stops each sample at its first one, saving the rest of its queries.
    """

    name = "autozoom"
    norms = ("l2",)
    minimal = True
    access = "score"
    budgeted = True
    paper = (
        "Tu, Ting, Chen, Liu, Zhang, Yi, Hsieh & Cheng, AutoZOOM: Autoencoder-based Zeroth Order Optimization "
        "Method for Attacking Black-box Neural Networks, AAAI 2019"
    )

    def __init__(
        self,
        *,
        queries: int | None = None,
        iterations: int = 1000,
        initial_const: float = 10.0,
        switch_every: int = 100,
        kappa: float = 0.0,
        lr: float = 0.01,
        directions: int = 4,
        beta1: float = 0.9,
        beta2: float = 0.999,
        tanh: bool = False,
        attack_size: int | None = 32,
        fine_tune: bool = True,
    ) -> None:
        self.queries = _optional_int("queries", queries)
        self.iterations = positive_int("iterations", iterations)
        self.initial_const = positive_float("initial_const", initial_const)
        self.switch_every = positive_int("switch_every", switch_every)
        self.kappa, self.lr, self.beta1, self.beta2 = _check_common(kappa, lr, beta1, beta2)
        self.directions = positive_int("directions", directions)
        self.tanh = bool(tanh)
        self.attack_size = _optional_int("attack_size", attack_size)
        self.fine_tune = bool(fine_tune)

    def run(
        self,
        model: CountingModel,
        x: torch.Tensor,
        criterion: Criterion,
        threat: ThreatModel,
        generator: torch.Generator | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if not isinstance(threat, LpBall) or threat.norm != "l2":
            raise InputError(f"AutoZOOM is an l2 attack; got threat {threat!r}")
        ledger = model.ledger(self.queries)
        n = x.shape[0]
        objective = _Objective(x, threat, criterion, self.kappa, self.tanh)
        space = _initial_space(x, self.attack_size)
        beta = 1.0 / space.dim
        box = x if not (space.reduced or self.tanh) else None
        delta = x.new_zeros((n, space.dim))
        m, v = torch.zeros_like(delta), torch.zeros_like(delta)
        steps = x.new_ones(n)
        best = x.clone()
        best_d = x.new_full((n,), math.inf)
        c = x.new_full((n,), self.initial_const)
        lower, upper = x.new_zeros(n), x.new_full((n,), 1e10)
        tuning = torch.zeros(n, dtype=torch.bool, device=x.device)  # past the first success
        found = torch.zeros(n, dtype=torch.bool, device=x.device)  # success since the last update of c
        for it in range(self.iterations):
            if it % self.switch_every == 0 and it:
                _binary_search(c, lower, upper, found)
                found[:] = False
                m[tuning], v[tuning], steps[tuning] = 0.0, 0.0, 1.0
            q = torch.where(tuning, self.directions, 1)
            todo = torch.arange(n, device=x.device) if self.fine_tune else (~tuning).nonzero().squeeze(1)
            act = ledger.afford(todo, q[todo] + 1)
            if act.numel() == 0:
                break
            for group in (act[~tuning[act]], act[tuning[act]]):
                if group.numel():
                    self._step(ledger, objective, space, group, delta, m, v, steps, best, best_d, c, lower, tuning,
                               found, beta, box, threat, generator)  # fmt: skip
        return torch.where(torch.isfinite(best_d).reshape((-1,) + (1,) * (x.dim() - 1)), best, x), ledger.used

    def _step(
        self,
        ledger: QueryLedger,
        objective: _Objective,
        space: _Space,
        act: torch.Tensor,
        delta: torch.Tensor,
        m: torch.Tensor,
        v: torch.Tensor,
        steps: torch.Tensor,
        best: torch.Tensor,
        best_d: torch.Tensor,
        c: torch.Tensor,
        lower: torch.Tensor,
        tuning: torch.Tensor,
        found: torch.Tensor,
        beta: float,
        box: torch.Tensor | None,
        threat: LpBall,
        generator: torch.Generator | None,
    ) -> None:
        """One iteration for the samples ``act``, which all use the same number of directions (in place)."""
        a = act.numel()
        q = self.directions if bool(tuning[act[0]]) else 1
        u = torch.randn((a, q, space.dim), generator=generator, device=delta.device, dtype=delta.dtype)
        u = u / u.norm(dim=2, keepdim=True).clamp_min(1e-12)
        points = torch.cat([delta[act][:, None], delta[act][:, None] + beta * u], dim=1)
        total, d_min, x_min, hit = objective.probe(ledger, space, act, points, c)
        better = d_min < best_d[act]
        best[act[better]], best_d[act[better]] = x_min[better], d_min[better]
        found[act[hit]] = True
        grad = ((total[:, 1:] - total[:, :1]) / beta)[:, :, None].mul(u).sum(dim=1)
        m_a = m[act] * self.beta1 + (1 - self.beta1) * grad
        v_a = v[act] * self.beta2 + (1 - self.beta2) * grad * grad
        t = steps[act][:, None]
        corr = (1 - self.beta2**t).sqrt() / (1 - self.beta1**t)
        new = delta[act] - self.lr * corr * m_a / (v_a.sqrt() + 1e-8)
        if box is not None:
            lo, hi = threat.domain
            x_flat = box[act].flatten(1)
            new = torch.maximum(torch.minimum(new, hi - x_flat), lo - x_flat)
        delta[act], m[act], v[act], steps[act] = new, m_a, v_a, steps[act] + 1
        # adaptive query allocation: the first success switches to more directions, a fresh ADAM and lower bound
        first = hit & ~tuning[act]
        if bool(first.any()):
            r = act[first]
            tuning[r] = True
            lower[r] = 0.0
            m[r], v[r], steps[r] = 0.0, 0.0, 1.0
