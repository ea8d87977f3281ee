"""FAB: the Fast Adaptive Boundary attack, a minimal-distortion attack for the l∞, l2 and l1 norms.

Croce & Hein, "Minimally distorted Adversarial Examples with a Fast Adaptive Boundary Attack", ICML 2020.

FAB looks for the smallest perturbation (in the threat's norm) that changes the decision, inside the input domain.
Like DeepFool it linearises the decision boundary at the current iterate, but it projects onto the linearised
boundary *intersected with the input box*, and it biases every step towards the original input so that the iterates
stay close to it; once a point is adversarial it moves back towards the original and keeps searching, keeping the
closest adversarial point found.

The key subproblem, the projection of a point onto ``{z : w·z = c} ∩ [lo, hi]`` in the l∞, l2 or l1 norm, is
:func:`project_hyperplane_box` (exact, batched, by sorting breakpoints, after the paper's appendix).
"""

from __future__ import annotations

import math

import torch

from bastion.attacks.base import Attack, CountingModel, positive_int
from bastion.errors import InputError
from bastion.results import Criterion
from bastion.threat import LpBall, ThreatModel, lp_norm

#: The dual norm of each supported threat norm: the norm that divides the margin in the distance to a hyperplane.
_DUAL = {"linf": "l1", "l2": "l2", "l1": "linf"}
_TINY = 1e-30


def project_hyperplane_box(
    x: torch.Tensor,
    w: torch.Tensor,
    c: torch.Tensor,
    norm: str,
    lo: float | torch.Tensor,
    hi: float | torch.Tensor,
) -> torch.Tensor:
    """The minimal-norm step ``d`` from each row of ``x`` onto the hyperplane ``{z : w·z = c}`` inside the box.

    Solves, for every row independently (``x``, ``w``: (N, D); ``c``: (N,); ``x`` inside ``[lo, hi]``),

        ``min ||d||_p  s.t.  w·(x + d) = c,  lo <= x + d <= hi``      for ``p`` in ``linf``, ``l2``, ``l1``.

    With ``r = c - w·x`` (flipping the sign of ``w`` so that ``r >= 0``), the step moves each coordinate in the
    direction of ``sign(w_i)`` by ``t_i`` in ``[0, room_i]`` (``room_i`` its distance to the box that way), and
    ``Σ |w_i| t_i = r``. The KKT conditions give the solutions in closed form up to one scalar:

    * l2: ``t_i = min(λ |w_i|, room_i)``; l∞: ``t_i = min(λ, room_i)`` (for ``w_i != 0``). ``Σ |w_i| t_i`` is
      piecewise linear and non-decreasing in ``λ`` with breakpoints ``room_i / |w_i|`` (l2) or ``room_i`` (l∞):
      sorting them locates the segment where it equals ``r``, and ``λ`` follows exactly.
    * l1 (a linear programme): fill the coordinates in decreasing order of ``|w_i|`` up to their room until ``r``
      is reached (a cumulative sum over the sorted coordinates).

    Where the hyperplane does not meet the box, the step goes to the box corner that gets closest to it
    (``t_i = room_i``), as in the paper.

    Args:
        x: points (N, D), inside ``[lo, hi]``.
        w: normals (N, D).
        c: offsets (N,).
        norm: ``"linf"``, ``"l2"`` or ``"l1"``.
        lo: lower bound of the box (scalar or broadcastable to (N, D)).
        hi: upper bound of the box.

    Returns:
        The steps ``d`` (N, D); ``x + d`` lies on the hyperplane (where feasible) and inside the box.
    """
    if norm not in _DUAL:
        raise InputError(f"norm must be one of linf, l2, l1, got {norm!r}")
    r = c - (w * x).sum(dim=1)
    sign = torch.where(r < 0, -torch.ones_like(r), torch.ones_like(r))
    wf = w * sign[:, None]  # the flipped problem: wf·d = |r| >= 0
    r = r.abs()
    a = wf.abs()
    moves = a > 0
    zero = torch.zeros((), dtype=x.dtype, device=x.device)
    room = torch.where(wf > 0, hi - x, x - lo).clamp_min(0.0)
    room = torch.where(moves, room, zero)
    gain = a * room  # the most that coordinate i can contribute to wf·d
    infeasible = r >= gain.sum(dim=1)

    if norm == "l1":
        order = a.argsort(dim=1, descending=True)
        a_s, gain_s, room_s = a.gather(1, order), gain.gather(1, order), room.gather(1, order)
        before = gain_s.cumsum(dim=1) - gain_s  # what the larger coordinates contribute when full
        t_s = torch.minimum(((r[:, None] - before) / a_s.clamp_min(_TINY)).clamp_min(0.0), room_s)
        t = torch.empty_like(t_s).scatter_(1, order, t_s)
    else:
        rate = a if norm == "l2" else moves.to(x.dtype)  # d t_i / d λ while coordinate i is free
        inf = torch.full((), math.inf, dtype=x.dtype, device=x.device)
        brk = torch.where(moves, room / rate.clamp_min(_TINY), inf)  # λ at which coordinate i reaches the box
        brk_s, order = brk.sort(dim=1)
        gain_s = gain.gather(1, order)
        slope_s = (a * rate).gather(1, order)
        clipped = gain_s.cumsum(dim=1) - gain_s  # contribution of the coordinates already at the box
        free = slope_s.flip(1).cumsum(dim=1).flip(1)  # slope of the contribution of the free ones
        at_brk = torch.where(torch.isinf(brk_s), inf, clipped + brk_s * free)
        k = (at_brk < r[:, None]).sum(dim=1, keepdim=True).clamp(max=x.shape[1] - 1)
        lam = ((r[:, None] - clipped.gather(1, k)) / free.gather(1, k).clamp_min(_TINY)).clamp_min(0.0)
        t = torch.where(moves, torch.minimum(lam * rate, room), zero)
    t = torch.where(infeasible[:, None], room, t)
    return wf.sign() * t


class FAB(Attack):
    """Fast Adaptive Boundary attack (Croce & Hein, ICML 2020), untargeted, for the l∞, l2 and l1 norms.

    Objective: the smallest ``||δ||_p`` with ``argmax f(x + δ) != y`` and ``x + δ`` in the input domain.
    One step at the iterate ``x_i`` (the paper's Algorithm 1): linearise ``f_k - f_y`` at ``x_i`` for every class
    ``k != y`` (one backward pass per class on the whole batch), pick the class whose linearised boundary is closest,
    ``s = argmin_k |f_k - f_y| / ||∇f_k - ∇f_y||_q`` (``q`` the dual norm), and project both ``x_i`` and the
    original ``x`` onto that hyperplane intersected with the box (:func:`project_hyperplane_box`), giving steps
    ``δ_i`` and ``δ_orig``. Then, with ``α = min(||δ_i|| / (||δ_i|| + ||δ_orig||), α_max)``,

        ``x_{i+1} = clip((1 - α)(x_i + η δ_i) + α (x + η δ_orig))``

    (the bias towards the original point grows when the iterate is far from the boundary; ``η > 1`` overshoots the
    linearised boundary). When ``x_{i+1}`` is adversarial it is recorded if it is the closest so far and the
    iterate moves back towards the original, ``x_{i+1} ← x + β (x_{i+1} - x)``.

    The first run starts at ``x``; each further restart starts at a random point at distance
    ``rel_init · min(best distance so far, eps)`` from ``x`` (``eps`` of the threat, when finite), clipped to the
    domain. A sample with neither (no adversarial point yet and an infinite eps) is not restarted, since its run from
    ``x`` would repeat. The eps of the threat only sets that radius: the attack returns the closest adversarial
    point it finds at any distance, and the base class reports its distance.

    Given ``targets``, the attack is targeted: it linearises only ``f_t - f_j``, with ``j`` the strongest class other
    than the target at the current point (the label, until another class overtakes it), and succeeds when ``t`` is
    predicted.

    Args:
        steps: iterations per run (the paper's 100).
        restarts: runs per sample; the first from ``x``, the others from random points (AutoAttack's standard
            FAB uses 1; more can only shorten the distances).
        alpha_max: the largest weight of the step from the original point (the paper's 0.1).
        eta: overshoot factor of the projection steps (the paper's 1.05); >= 1.
        beta: backward step towards the original once adversarial (the paper's 0.9); in (0, 1].
        rel_init: radius of the random starts relative to the current best distance (or eps); AutoAttack's 0.5.
    """

    name = "fab"
    norms = ("linf", "l2", "l1")
    minimal = True
    paper = "Croce & Hein, Minimally distorted Adversarial Examples with a Fast Adaptive Boundary Attack, ICML 2020"

    def __init__(
        self,
        *,
        steps: int = 100,
        restarts: int = 1,
        alpha_max: float = 0.1,
        eta: float = 1.05,
        beta: float = 0.9,
        rel_init: float = 0.5,
    ) -> None:
        self.steps = positive_int("steps", steps)
        self.restarts = positive_int("restarts", restarts)
        self.alpha_max = _number("alpha_max", alpha_max, 0.0, 1.0)
        self.eta = _number("eta", eta, 1.0, math.inf)
        self.beta = _number("beta", beta, 0.0, 1.0)
        if self.beta == 0.0:
            raise InputError("beta must be in (0, 1], got 0")
        self.rel_init = _number("rel_init", rel_init, 0.0, math.inf)

    # ----------------------------------------------------------------------------------------------- entry
    def run(
        self,
        model: CountingModel,
        x: torch.Tensor,
        criterion: Criterion,
        threat: ThreatModel,
        generator: torch.Generator | None,
    ) -> torch.Tensor:
        threat = _lp_ball(self, threat)
        best = x.clone()
        best_dist = torch.full((x.shape[0],), math.inf, dtype=x.dtype, device=x.device)
        every = torch.arange(x.shape[0], device=x.device)
        self._search(model, x, criterion, criterion.targets, threat, generator, every, best, best_dist)
        return best

    # ----------------------------------------------------------------------------------------------- search
    def _search(
        self,
        model: CountingModel,
        x: torch.Tensor,
        criterion: Criterion,
        towards: torch.Tensor | None,
        threat: LpBall,
        generator: torch.Generator | None,
        idx: torch.Tensor,
        best: torch.Tensor,
        best_dist: torch.Tensor,
    ) -> None:
        """All restarts on the samples ``idx``, linearising towards ``towards`` (targets, or ``None`` for every
        class); success is ``criterion``'s. Updates ``best`` and ``best_dist`` in place."""
        for restart in range(self.restarts):
            if restart == 0:
                sel = idx
            else:
                radius = best_dist[idx].clamp(max=threat.eps)
                sel = idx[torch.isfinite(radius)]
                if sel.numel() == 0:
                    break
            x0 = x[sel]
            if restart == 0:
                start = x0.clone()
            else:
                radius = self.rel_init * best_dist[sel].clamp(max=threat.eps)
                start = threat.clip(x0 + _random_direction(x0, threat.norm, generator) * _bcast(radius, x0))
            self._one_run(
                model,
                x0,
                criterion.subset(sel),
                None if towards is None else towards[sel],
                threat,
                start,
                sel,
                best,
                best_dist,
            )

    def _one_run(
        self,
        model: CountingModel,
        x0: torch.Tensor,
        criterion: Criterion,
        towards: torch.Tensor | None,
        threat: LpBall,
        start: torch.Tensor,
        idx: torch.Tensor,
        best: torch.Tensor,
        best_dist: torch.Tensor,
    ) -> None:
        local_x, local_best = self._run_rows(
            model, x0, criterion, towards, threat, start, best[idx].clone(), best_dist[idx].clone()
        )
        best[idx] = local_x
        best_dist[idx] = local_best

    def _run_rows(
        self,
        model: CountingModel,
        x0: torch.Tensor,
        criterion: Criterion,
        towards: torch.Tensor | None,
        threat: LpBall,
        start: torch.Tensor,
        best_x: torch.Tensor,
        best_dist: torch.Tensor,
        group: torch.Tensor | None = None,
        stop_at: float | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One FAB run of every row from ``start``; returns each row's closest adversarial point and its distance
        (``best_x`` / ``best_dist`` where it found none closer).

        With ``stop_at`` (a radius), a row leaves the batch once it holds an adversarial point within that radius,
        and so do all the rows of its ``group`` (runs of the same sample towards other targets). Up to then each row's
        iterates are exactly those of a run of its own: rows never interact.
        """
        n = x0.shape[0]
        shape = x0.shape[1:]
        lo, hi = threat.domain
        dual = _DUAL[threat.norm]
        out_x = best_x.reshape(n, -1).clone()
        out_d = best_dist.clone()
        pos = torch.arange(n, device=x0.device)
        x0f = x0.reshape(n, -1)
        x1 = start.reshape(n, -1).clone()
        local_best = out_d.clone()
        local_x = out_x.clone()
        labels = criterion.labels
        for _ in range(self.steps):
            m = x1.shape[0]
            rows = torch.arange(m, device=x0.device)
            df, dg = _linearise(model, x1.reshape((m, *shape)), labels, towards)
            dist = df.abs() / (lp_norm(dg.reshape(-1, dg.shape[2]), dual).reshape(df.shape) + 1e-12)
            if towards is None:  # the label's own "boundary" is no boundary
                dist = dist.scatter(1, labels[:, None], math.inf)
            s = dist.argmin(dim=1)
            w, f = dg[rows, s], df[rows, s]
            c = (w * x1).sum(dim=1) - f  # the linearised boundary f + w·(z - x1) = 0 as w·z = c
            d = project_hyperplane_box(torch.cat([x1, x0f]), torch.cat([w, w]), torch.cat([c, c]), threat.norm, lo, hi)
            norms = lp_norm(d, threat.norm).clamp_min(1e-8)
            a_cur, a_orig = norms[:m], norms[m:]
            alpha = (a_cur / (a_cur + a_orig)).clamp(0.0, self.alpha_max)[:, None]
            x1 = ((1 - alpha) * (x1 + self.eta * d[:m]) + alpha * (x0f + self.eta * d[m:])).clamp(lo, hi)
            hit = criterion.is_adversarial(model(x1.reshape((m, *shape))))
            if bool(hit.any()):
                gap = lp_norm(x1 - x0f, threat.norm)
                better = hit & (gap < local_best)
                local_best = torch.where(better, gap, local_best)
                local_x = torch.where(better[:, None], x1, local_x)
                x1 = torch.where(hit[:, None], x0f + self.beta * (x1 - x0f), x1)
                if stop_at is not None:
                    done = better & (local_best <= stop_at)
                    if bool(done.any()):
                        if group is not None:
                            done = torch.isin(group, group[done])
                        out_x[pos[done]] = local_x[done]
                        out_d[pos[done]] = local_best[done]
                        keep = ~done
                        pos, x0f, x1, local_x, local_best = (
                            pos[keep],
                            x0f[keep],
                            x1[keep],
                            local_x[keep],
                            local_best[keep],
                        )
                        criterion = criterion.subset(keep)
                        labels = criterion.labels
                        towards = None if towards is None else towards[keep]
                        group = None if group is None else group[keep]
                        if pos.numel() == 0:
                            break
        out_x[pos] = local_x
        out_d[pos] = local_best
        return out_x.reshape(best_x.shape), out_d


class FABT(FAB):
    """Targeted FAB as AutoAttack's FAB-T uses it (Croce & Hein, ICML 2020), for the l∞, l2 and l1 norms.

    Without ``targets``, FAB is run targeted (linearising only ``f_t - f_y``, as long as the iterate is not
    adversarial) towards each of the ``n_target_classes`` classes with the largest clean logits after the label, and
    any misclassification counts as success; each sample keeps its closest adversarial point over all targets. With
    explicit ``targets``, only those targets are attacked and success means predicting them. Each step needs one
    backward pass (instead of one per class), which makes it cheaper than FAB on many classes.

    **Batched targets** (``batch_targets=True``, the default, with ``restarts=1``): the runs towards all targets of a
    sample are rows of one batch of ``n_target_classes × N`` points (chunks of at most ``max_rows`` rows, whole
    samples per chunk): one forward and one backward pass per step for all targets. AutoAttack's order
    (``batch_targets=False``, and always with ``restarts > 1``, whose random radii depend on the best distance over
    the earlier targets) runs target ``j`` only on the samples no earlier target broke within a finite eps. Rows never
    interact and the first run starts at ``x`` itself, so both modes break the same samples within eps; the batched
    mode may report shorter distances for samples the first target broke (the later targets ran on them too).

    ``early_stop=True`` (used by the ``standard`` and ``fast`` presets, where only "broken within eps or not"
    counts) ends a sample's runs, all targets at once, as soon as it holds an adversarial point within the threat's
    finite eps, instead of refining that point for the remaining steps: the set of samples broken within eps is the
    same, the distances reported for them are no longer minimal.

    Args:
        n_target_classes: number of target classes tried (AutoAttack's 9), capped at the number of classes - 1.
        steps, restarts, alpha_max, eta, beta, rel_init: as for :class:`FAB`.
        batch_targets: run all targets as one batch (default) or one after another (AutoAttack's order).
        max_rows: most rows (sample × target pairs) in one batch.
        early_stop: stop a sample once it is broken within the threat's (finite) eps.
    """

    name = "fab-t"

    def __init__(
        self,
        *,
        steps: int = 100,
        restarts: int = 1,
        alpha_max: float = 0.1,
        eta: float = 1.05,
        beta: float = 0.9,
        rel_init: float = 0.5,
        n_target_classes: int = 9,
        batch_targets: bool = True,
        max_rows: int = 4096,
        early_stop: bool = False,
    ) -> None:
        super().__init__(steps=steps, restarts=restarts, alpha_max=alpha_max, eta=eta, beta=beta, rel_init=rel_init)
        self.n_target_classes = positive_int("n_target_classes", n_target_classes)
        for key, value in (("batch_targets", batch_targets), ("early_stop", early_stop)):
            if not isinstance(value, bool):
                raise InputError(f"{key} must be True or False, got {value!r}")
        self.batch_targets = batch_targets
        self.max_rows = positive_int("max_rows", max_rows)
        self.early_stop = early_stop

    def run(
        self,
        model: CountingModel,
        x: torch.Tensor,
        criterion: Criterion,
        threat: ThreatModel,
        generator: torch.Generator | None,
    ) -> torch.Tensor:
        threat = _lp_ball(self, threat)
        if criterion.targeted:
            return super().run(model, x, criterion, threat, generator)
        best = x.clone()
        best_dist = torch.full((x.shape[0],), math.inf, dtype=x.dtype, device=x.device)
        # the base has just computed the clean logits of exactly these samples: no second forward pass for them
        logits = model.clean_scores if model.clean_scores is not None else model(x)
        k = min(self.n_target_classes, logits.shape[1] - 1)
        ranked = logits.scatter(1, criterion.labels[:, None], -math.inf).topk(k, dim=1).indices
        stop_at = threat.eps if self.early_stop and math.isfinite(threat.eps) else None
        if self.batch_targets and self.restarts == 1:
            per_chunk = max(self.max_rows // k, 1)
            for c in range(0, x.shape[0], per_chunk):
                idx = torch.arange(c, min(c + per_chunk, x.shape[0]), device=x.device)
                m = idx.numel()
                group = idx.repeat(k)  # rows target-major: row j·m + i is sample idx[i] towards its j-th target
                x0 = x[group]
                row_x, row_d = self._run_rows(
                    model, x0, criterion.subset(group), ranked[idx].T.reshape(-1), threat, x0.clone(), x0.clone(),
                    torch.full((group.numel(),), math.inf, dtype=x.dtype, device=x.device), group, stop_at,
                )  # fmt: skip
                # each sample keeps its closest adversarial point over its rows
                d = row_d.reshape(k, m)
                closest = d.argmin(dim=0)
                best_dist[idx] = d.gather(0, closest[None]).squeeze(0)
                best[idx] = row_x.reshape((k, m, *x.shape[1:]))[closest, torch.arange(m, device=x.device)]
            return best
        every = torch.arange(x.shape[0], device=x.device)
        for j in range(k):
            idx = every if math.isinf(threat.eps) else every[best_dist > threat.eps]
            if idx.numel() == 0:
                break
            if stop_at is None:
                self._search(model, x, criterion, ranked[:, j], threat, generator, idx, best, best_dist)
            else:
                self._search_stop(model, x, criterion, ranked[:, j], threat, generator, idx, best, best_dist, stop_at)
        return best

    def _search_stop(
        self,
        model: CountingModel,
        x: torch.Tensor,
        criterion: Criterion,
        towards: torch.Tensor,
        threat: LpBall,
        generator: torch.Generator | None,
        idx: torch.Tensor,
        best: torch.Tensor,
        best_dist: torch.Tensor,
        stop_at: float,
    ) -> None:
        """:meth:`FAB._search` whose runs stop per sample once within ``stop_at`` (``early_stop``)."""
        for restart in range(self.restarts):
            sel = idx[best_dist[idx] > stop_at]
            if restart:
                sel = sel[torch.isfinite(best_dist[sel].clamp(max=threat.eps))]
            if sel.numel() == 0:
                break
            x0 = x[sel]
            if restart == 0:
                start = x0.clone()
            else:
                radius = self.rel_init * best_dist[sel].clamp(max=threat.eps)
                start = threat.clip(x0 + _random_direction(x0, threat.norm, generator) * _bcast(radius, x0))
            bx, bd = self._run_rows(
                model, x0, criterion.subset(sel), towards[sel], threat, start, best[sel].clone(),
                best_dist[sel].clone(), None, stop_at,
            )  # fmt: skip
            best[sel] = bx
            best_dist[sel] = bd


# --------------------------------------------------------------------------------------------------- helpers
def _linearise(
    model: CountingModel, x: torch.Tensor, labels: torch.Tensor, towards: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Values (N, C) and gradients (N, C, D) of ``f_k - f_y`` at ``x`` for every class k (``towards`` is None;
    C = K), or of ``f_t - max_{j != t} f_j`` for the target t (C = 1). One backward pass per class on the batch."""
    n = x.shape[0]
    xr = x.detach().requires_grad_(True)
    with torch.enable_grad():
        logits = model.model(xr)
        if towards is None:
            num = logits.shape[1]
            grads = [
                torch.autograd.grad(logits[:, k].sum(), xr, retain_graph=k < num - 1)[0].reshape(n, -1)
                for k in range(num)
            ]
            g = torch.stack(grads, dim=1)
            df = logits.detach() - logits.detach().gather(1, labels[:, None])
            dg = g - g[torch.arange(n, device=x.device), labels][:, None, :]
        else:
            num = 1
            # the strongest class other than the target: the label until another class overtakes it, which a
            # targeted success must then beat as well
            rival = logits.detach().scatter(1, towards[:, None], -math.inf).argmax(dim=1)
            diff = logits.gather(1, towards[:, None]) - logits.gather(1, rival[:, None])
            (grad,) = torch.autograd.grad(diff.sum(), xr)
            df, dg = diff.detach(), grad.reshape(n, 1, -1)
    model.forwards += n
    model.gradients += n * num
    return df, dg


def _random_direction(x: torch.Tensor, norm: str, generator: torch.Generator | None) -> torch.Tensor:
    """A random direction of unit ``norm`` for each sample, shaped like ``x``."""
    n = x.shape[0]
    if norm == "linf":
        t = 2 * torch.rand((n, x[0].numel()), generator=generator, device=x.device, dtype=x.dtype) - 1
    else:
        t = torch.randn((n, x[0].numel()), generator=generator, device=x.device, dtype=x.dtype)
    return (t / lp_norm(t, norm).clamp_min(1e-12)[:, None]).reshape(x.shape)


def _bcast(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return v.reshape((-1,) + (1,) * (like.dim() - 1))


def _lp_ball(attack: Attack, threat: ThreatModel) -> LpBall:
    if not isinstance(threat, LpBall) or threat.norm not in attack.norms:
        raise InputError(f"{type(attack).__name__} needs an LpBall threat model in l∞, l2 or l1, got {threat!r}")
    return threat


def _number(name: str, value: object, low: float, high: float) -> float:
    if (
        isinstance(value, (int, float))
        and not isinstance(value, bool)
        and math.isfinite(value)
        and low <= value <= high
    ):
        return float(value)
    raise InputError(f"{name} must be a finite number in [{low}, {high}], got {value!r}")
