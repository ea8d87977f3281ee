"""Auto-PGD (APGD): projected gradient ascent with momentum and a budget-aware step-size schedule.

* APGD, APGD-DLR and APGD-T: Croce & Hein, "Reliable evaluation of adversarial robustness with an ensemble of
  diverse parameter-free attacks", ICML 2020.
* l1 variant: Croce & Hein, "Mind the box: l1-APGD for sparse adversarial attacks on image classifiers", ICML 2021
  (partially: see :class:`APGD` for what differs).

APGD maximises a loss ``f`` (cross-entropy or the Difference of Logits Ratio) over the threat set ``S`` (an l_p ball
intersected with the input domain) with the update

    z^(k+1) = P_S(x^(k) + η^(k) s(∇f(x^(k))))
    x^(k+1) = P_S(x^(k) + α (z^(k+1) - x^(k)) + (1 - α) (x^(k) - x^(k-1)))

where ``s`` is the normalised steepest-ascent direction of the norm (``threat.step``) and ``P_S`` the Euclidean
projection (``threat.project``); the first step has no momentum term. The step size starts at ``2·eps`` and is halved
at checkpoints ``w_j = ceil(p_j · steps)``, ``p_0 = 0``, ``p_1 = 0.22``, ``p_(j+1) = p_j + max(p_j - p_(j-1) - 0.03,
0.06)``, for each sample whose ascent stalled since the previous checkpoint; a halving restarts that sample from the
best point it has found. The norm-specific geometry is the threat model's (``bastion.threat``); the losses and their
targeted forms are :class:`~bastion.results.Criterion`'s.
"""

from __future__ import annotations

import dataclasses
import math
from fractions import Fraction
from typing import Literal

import torch

from bastion.attacks.base import Attack, CountingModel, positive_int
from bastion.errors import InputError
from bastion.results import Criterion
from bastion.threat import LpBall, ThreatModel

APGDLoss = Literal["ce", "dlr"]
APGD_LOSSES: tuple[str, ...] = ("ce", "dlr")


def apgd_checkpoints(steps: int) -> list[int]:
    """The iterations at which APGD may halve its step size (Croce & Hein, ICML 2020, Section 3.1).

    ``w_j = ceil(p_j · steps)`` with ``p_0 = 0``, ``p_1 = 0.22`` and ``p_(j+1) = p_j + max(p_j - p_(j-1) - 0.03,
    0.06)``, for every ``p_j <= 1``. The fractions are computed exactly (``0.22 · 100`` is 22, not 22.000000000000004,
    whose ceiling would be 23). Repeated values (possible for small ``steps``) appear once.

    Args:
        steps: the iteration budget (a positive integer).

    Returns:
        The checkpoints in increasing order; ``[0, 22, 41, 57, 70, 80, 87, 93, 99]`` for 100 steps.
    """
    steps = positive_int("steps", steps)
    prev, cur = Fraction(0), Fraction(22, 100)
    points = [0]
    while cur <= 1:
        w = math.ceil(cur * steps)
        if w != points[-1]:
            points.append(w)
        prev, cur = cur, cur + max(cur - prev - Fraction(3, 100), Fraction(6, 100))
    return points


@dataclasses.dataclass
class _State:
    """Per-sample state of one APGD run on the samples still being attacked (every field has N rows)."""

    pos: torch.Tensor  # position of each row in the run's batch
    x0: torch.Tensor  # clean input
    x: torch.Tensor  # current iterate x^(k)
    x_prev: torch.Tensor  # previous iterate x^(k-1)
    loss_prev: torch.Tensor  # f(x^(k-1))
    eta: torch.Tensor  # step size
    best_x: torch.Tensor  # x_max: the highest-loss iterate so far
    best_grad: torch.Tensor  # the gradient at x_max (a restart from x_max reuses it)
    best_loss: torch.Tensor  # f_max
    increases: torch.Tensor  # number of iterations since the last checkpoint that increased the loss
    reduced_last: torch.Tensor  # the step size was halved at the last checkpoint
    best_last: torch.Tensor  # f_max at the last checkpoint

    def keep(self, mask: torch.Tensor) -> _State:
        return _State(**{f.name: getattr(self, f.name)[mask] for f in dataclasses.fields(self)})


def _rows_like(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return v.reshape((-1,) + (1,) * (like.dim() - 1))


class APGD(Attack):
    """Auto-PGD (Croce & Hein, ICML 2020) for the l∞, l2 and l1 balls: APGD-CE, or APGD-DLR with ``loss="dlr"``.

    Objective: maximise ``f(x')`` over ``x'`` in the l_p ball of radius eps around ``x`` intersected with the input
    domain, where ``f`` is the cross-entropy of the true label (``"ce"``) or the Difference of Logits Ratio
    ``-(z_y - max_{i≠y} z_i) / (z_π1 - z_π3)`` (``"dlr"``, shift- and scale-invariant). With explicit ``targets`` the
    targeted forms are used (``-CE`` of the target, targeted DLR) and success means reaching the target.

    Update (momentum ``α``, step size ``η``; ``s`` the normalised steepest-ascent direction, ``P`` the projection onto
    ball ∩ domain)::

        z^(k+1) = P(x^(k) + η s(∇f(x^(k))))
        x^(k+1) = P(x^(k) + α (z^(k+1) - x^(k)) + (1 - α) (x^(k) - x^(k-1)))     (x^(1) = z^(1): no momentum)

    Step-size schedule, per sample: ``η = 2·eps`` at first; at each checkpoint ``w_j`` (:func:`apgd_checkpoints`) the
    step size is halved when (1) fewer than ``rho · (w_j - w_(j-1))`` of the iterations since ``w_(j-1)`` increased the
    loss, or (2) the step size was not halved at ``w_(j-1)`` and the best loss has not increased since then. A halving
    moves the sample back to the best point it has found (``x_max``), with momentum ``x_max - x^(w_j)`` as in the
    paper. Each run starts from a uniformly random point of the ball. The attack returns, per sample, the first
    adversarial iterate it meets (the sample then leaves the batch: early stop) or else the highest-loss point.
    ``steps`` gradient evaluations per run, plus one forward pass on the last iterate.

    Restarts run only on the samples not yet broken, from a fresh random start, so more restarts can never make the
    attack weaker; the highest-loss point over all runs is kept for the samples that survive.

    l1 ("Mind the box", Croce & Hein, ICML 2021): the step is the threat's box-aware sparse direction (coordinates
    that cannot move further in the direction of their gradient sign are excluded; the top ``threat.l1_sparsity``
    fraction of the others move) and the step size starts at ``eps``, as in that paper, with the exact projection onto
    the l1 ball ∩ box. What differs from that paper: the sparsity of the step stays ``threat.l1_sparsity`` instead of
    adapting at each checkpoint to the sparsity of the best point, and the step size follows the halving rule above
    instead of the paper's rule tied to that adaptation (back to eps when the best point got sparser, else divided
    by 1.5, never below eps/10).

    Args:
        steps: iterations (gradient evaluations) per run; 100 in the paper.
        restarts: number of runs; each later run attacks only the samples still unbroken. 1 in the paper.
        loss: ``"ce"`` (APGD-CE) or ``"dlr"`` (APGD-DLR).
        rho: threshold of condition 1 (fraction of loss-increasing iterations), in (0, 1); 0.75 in the paper.
        alpha: weight of the new gradient step against the previous update, in (0, 1]; 0.75 in the paper (1 means
            no momentum).
    """

    name = "apgd"
    paper = (
        "Croce & Hein, Reliable evaluation of adversarial robustness with an ensemble of diverse parameter-free "
        "attacks, ICML 2020; l1: Croce & Hein, Mind the box: l1-APGD for sparse adversarial attacks on image "
        "classifiers, ICML 2021"
    )

    def __init__(
        self,
        *,
        steps: int = 100,
        restarts: int = 1,
        loss: APGDLoss = "ce",
        rho: float = 0.75,
        alpha: float = 0.75,
    ) -> None:
        self.steps = positive_int("steps", steps)
        self.restarts = positive_int("restarts", restarts)
        if loss not in APGD_LOSSES:
            raise InputError(f"loss must be one of {', '.join(map(repr, APGD_LOSSES))}, got {loss!r}")
        self.loss: APGDLoss = loss
        if isinstance(rho, bool) or not isinstance(rho, (int, float)) or not 0.0 < rho < 1.0:
            raise InputError(f"rho must be a number in (0, 1), got {rho!r}")
        self.rho = float(rho)
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0.0 < alpha <= 1.0:
            raise InputError(f"alpha must be a number in (0, 1], got {alpha!r}")
        self.alpha = float(alpha)

    # ----------------------------------------------------------------------------------------------- entry point
    def run(
        self,
        model: CountingModel,
        x: torch.Tensor,
        criterion: Criterion,
        threat: ThreatModel,
        generator: torch.Generator | None,
    ) -> torch.Tensor:
        ball = self._ball(threat)
        out, _ = self._attack(model, x, criterion, criterion, ball, generator)
        return out

    def _ball(self, threat: ThreatModel) -> LpBall:
        if not isinstance(threat, LpBall):
            raise InputError(f"{type(self).__name__} needs an LpBall threat model, got {threat!r}")
        if math.isinf(threat.eps):
            raise InputError(f"eps is infinite: {type(self).__name__} sets its step size from eps and needs it finite")
        return threat

    def initial_step(self, threat: LpBall) -> float:
        """The initial step size: ``2·eps`` for l∞ and l2 (ICML 2020), ``eps`` for l1 ("Mind the box")."""
        return threat.eps if threat.norm == "l1" else 2.0 * threat.eps

    # ----------------------------------------------------------------------------------------------- restarts
    def _attack(
        self,
        model: CountingModel,
        x: torch.Tensor,
        stop: Criterion,
        objective: Criterion,
        threat: LpBall,
        generator: torch.Generator | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """All runs on ``x``: maximise ``objective``'s loss, stop a sample once it meets ``stop``.

        Returns the points found (adversarial for ``stop`` where the second tensor is ``True``, else the highest-loss
        point) and that mask.
        """
        best = x.clone()
        best_loss = torch.full((x.shape[0],), -math.inf, device=x.device, dtype=x.dtype)
        found = torch.zeros(x.shape[0], dtype=torch.bool, device=x.device)
        for _ in range(self.restarts):
            idx = (~found).nonzero().squeeze(1)
            if idx.numel() == 0:
                break
            start = threat.random_start(x[idx], generator)
            x_run, hit, loss = self._one_run(model, x[idx], stop.subset(idx), objective.subset(idx), threat, start)
            take = hit | (loss > best_loss[idx])
            best[idx[take]] = x_run[take]
            best_loss[idx[take]] = loss[take]
            found[idx[hit]] = True
        return best, found

    # ----------------------------------------------------------------------------------------------- one run
    def _one_run(
        self,
        model: CountingModel,
        x0: torch.Tensor,
        stop: Criterion,
        objective: Criterion,
        threat: LpBall,
        start: torch.Tensor,
        group: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One APGD run from ``start``. Returns, per row, the point, whether it meets ``stop``, and its loss.

        With ``group`` (N,), rows sharing a group id are runs of one sample (e.g. towards different targets): when
        one of them meets ``stop`` the whole group leaves the batch, since the sample is broken. The iterates of every
        row up to that moment are exactly those it would have had alone (rows never interact), so a sample is
        broken here if and only if one of its rows would have broken it in a run of its own.
        """
        n = x0.shape[0]
        out_x = x0.clone()
        out_hit = torch.zeros(n, dtype=torch.bool, device=x0.device)
        out_loss = torch.full((n,), -math.inf, device=x0.device, dtype=x0.dtype)
        ninf = torch.full((n,), -math.inf, device=x0.device, dtype=x0.dtype)
        s = _State(
            pos=torch.arange(n, device=x0.device),
            x0=x0,
            x=start,
            x_prev=start,
            loss_prev=ninf,
            eta=torch.full((n,), self.initial_step(threat), device=x0.device, dtype=x0.dtype),
            best_x=start,
            best_grad=torch.zeros_like(x0),
            best_loss=ninf,
            increases=torch.zeros(n, device=x0.device, dtype=x0.dtype),
            reduced_last=torch.zeros(n, dtype=torch.bool, device=x0.device),
            best_last=ninf,
        )
        checkpoints = set(apgd_checkpoints(self.steps)[1:])
        last_checkpoint = 0

        def loss_fn(logits: torch.Tensor) -> torch.Tensor:
            return objective.loss(logits, self.loss)

        for k in range(self.steps):
            logits, loss, grad = model.logits_and_grad(s.x, loss_fn)
            hit = stop.is_adversarial(logits)
            if bool(hit.any()):
                out_x[s.pos[hit]] = s.x[hit]
                out_hit[s.pos[hit]] = True
                out_loss[s.pos[hit]] = loss[hit]
                if group is None:
                    keep = ~hit
                else:  # the sample is broken: its runs towards the other targets stop too
                    keep = ~torch.isin(group, group[hit])
                    group = group[keep]
                s, loss, grad = s.keep(keep), loss[keep], grad[keep]
                stop, objective = stop.subset(keep), objective.subset(keep)
                if s.pos.numel() == 0:
                    return out_x, out_hit, out_loss
            if k > 0:
                s.increases += (loss > s.loss_prev).to(s.increases.dtype)
            better = loss > s.best_loss
            rows = _rows_like(better, s.x)
            s.best_x = torch.where(rows, s.x, s.best_x)
            s.best_grad = torch.where(rows, grad, s.best_grad)
            s.best_loss = torch.where(better, loss, s.best_loss)
            s.loss_prev = loss
            if k == 0:
                s.best_last = s.best_loss  # f_max at the checkpoint w_0 = 0
            if k in checkpoints:
                stalled = s.increases < self.rho * (k - last_checkpoint)
                stuck = ~s.reduced_last & (s.best_loss <= s.best_last)
                halve = stalled | stuck
                s.eta = torch.where(halve, s.eta / 2, s.eta)
                rows = _rows_like(halve, s.x)
                # restart from x_max; the momentum of the next step is x_max - x^(w_j), and f(x_max) is the loss
                # the next iterate is compared with
                s.x_prev = torch.where(rows, s.x, s.x_prev)
                s.x = torch.where(rows, s.best_x, s.x)
                grad = torch.where(rows, s.best_grad, grad)
                s.loss_prev = torch.where(halve, s.best_loss, s.loss_prev)
                s.reduced_last = halve
                s.best_last = s.best_loss
                s.increases = torch.zeros_like(s.increases)
                last_checkpoint = k
            z = threat.project(threat.step(s.x, grad, s.eta), s.x0)
            if k == 0:
                x_next = z
            else:
                x_next = threat.project(s.x + self.alpha * (z - s.x) + (1.0 - self.alpha) * (s.x - s.x_prev), s.x0)
            s.x_prev, s.x = s.x, x_next

        # the last iterate: one forward pass (no gradient needed)
        logits = model(s.x)
        loss = objective.loss(logits, self.loss)
        hit = stop.is_adversarial(logits)
        better = hit | (loss > s.best_loss)
        rows = _rows_like(better, s.x)
        final = torch.where(rows, s.x, s.best_x)
        out_x[s.pos] = final
        out_hit[s.pos] = hit
        out_loss[s.pos] = torch.where(better, loss, s.best_loss)
        return out_x, out_hit, out_loss


class APGDT(APGD):
    """Targeted APGD (APGD-T; Croce & Hein, ICML 2020), the targeted-DLR member of AutoAttack.

    Without explicit targets the attack is untargeted in effect: for each of the ``n_target_classes`` classes with
    the highest clean logits other than the true one it runs APGD maximising the targeted DLR loss
    ``-(z_y - z_t) / (z_π1 - (z_π3 + z_π4) / 2)`` towards that class, and a sample counts as broken (and stops) as
    soon as it is misclassified, whatever the class. As in AutoAttack's standard version, each target gets
    ``steps=100`` iterations and ``restarts=1`` run. With explicit ``targets=`` given to the call, only those targets
    are attacked and success means reaching them. Needs at least 4 classes (targeted DLR) and the same update and
    schedule as :class:`APGD` (checkpoints included).

    **Batched targets** (``batch_targets=True``, the default). AutoAttack runs the targets one after another, each on
    the points every earlier target failed on. Here the runs towards all targets of a sample are rows of one batch
    of ``n_target_classes × N`` points (in chunks of at most ``max_rows`` rows, whole samples per chunk), so each
    step is one forward and one backward pass for every target, and a sample leaves the batch, all its rows at once,
    the moment any of them misclassifies it. Rows never interact and the random starts of every (restart, target,
    sample) are drawn up front in the same order in both modes, so the set of broken samples is the same as in
    the sequential order (``batch_targets=False``, kept as the reference); only which adversarial point is
    returned for a broken sample can differ. The work differs: a sample broken by its first target after ``k``
    steps costs ``n_target_classes · k`` gradient evaluations batched instead of ``k``, while a sample that resists
    every target costs ``n_target_classes · steps`` either way (that is where the time of a robust model goes).

    Args:
        steps: iterations per run and target class.
        restarts: runs per target class, each on the samples still unbroken.
        n_target_classes: number of target classes tried (at most the number of classes minus one); 9 in AutoAttack.
        loss: ``"dlr"`` (targeted DLR, the paper's) or ``"ce"`` (cross-entropy towards the target).
        rho: threshold of condition 1 of the step-size schedule, in (0, 1).
        alpha: momentum weight, in (0, 1].
        batch_targets: run all targets as one batch (default) or one after another (AutoAttack's order).
        max_rows: most rows (sample × target pairs) in one batch; bounds the memory of the batched mode.
    """

    name = "apgd-t"

    def __init__(
        self,
        *,
        steps: int = 100,
        restarts: int = 1,
        n_target_classes: int = 9,
        loss: APGDLoss = "dlr",
        rho: float = 0.75,
        alpha: float = 0.75,
        batch_targets: bool = True,
        max_rows: int = 4096,
    ) -> None:
        super().__init__(steps=steps, restarts=restarts, loss=loss, rho=rho, alpha=alpha)
        self.n_target_classes = positive_int("n_target_classes", n_target_classes)
        if not isinstance(batch_targets, bool):
            raise InputError(f"batch_targets must be True or False, got {batch_targets!r}")
        self.batch_targets = batch_targets
        self.max_rows = positive_int("max_rows", max_rows)

    def run(
        self,
        model: CountingModel,
        x: torch.Tensor,
        criterion: Criterion,
        threat: ThreatModel,
        generator: torch.Generator | None,
    ) -> torch.Tensor:
        ball = self._ball(threat)
        if criterion.targeted:
            out, _ = self._attack(model, x, criterion, criterion, ball, generator)
            return out
        # the base has just computed the clean logits of exactly these samples: no second forward pass for them
        logits = model.clean_scores if model.clean_scores is not None else model(x)
        if logits.shape[1] < 4 and self.loss == "dlr":
            raise InputError(f"APGD-T's targeted DLR loss needs at least 4 classes, the model has {logits.shape[1]}")
        n_targets = min(self.n_target_classes, logits.shape[1] - 1)
        others = logits.scatter(1, criterion.labels[:, None], -math.inf)
        targets = others.topk(n_targets, dim=1).indices  # (N, n_targets), highest logit first
        # every (restart, target, sample) start, drawn once in this order whichever mode runs them
        starts = [
            threat.random_start(x.repeat((n_targets,) + (1,) * (x.dim() - 1)), generator).reshape((n_targets, *x.shape))
            for _ in range(self.restarts)
        ]
        if self.batch_targets:
            return self._batched(model, x, criterion.labels, targets, ball, starts)
        return self._sequential(model, x, criterion.labels, targets, ball, starts)

    def _sequential(
        self,
        model: CountingModel,
        x: torch.Tensor,
        labels: torch.Tensor,
        targets: torch.Tensor,
        threat: LpBall,
        starts: list[torch.Tensor],
    ) -> torch.Tensor:
        """AutoAttack's order: target ``j`` on the samples every earlier target failed on."""
        out = x.clone()
        found = torch.zeros(x.shape[0], dtype=torch.bool, device=x.device)
        for j in range(targets.shape[1]):
            for r in range(self.restarts):
                idx = (~found).nonzero().squeeze(1)
                if idx.numel() == 0:
                    return out
                lab = labels[idx]
                x_run, hit, _ = self._one_run(
                    model, x[idx], Criterion(lab), Criterion(lab, targets[idx, j]), threat, starts[r][j, idx]
                )
                out[idx] = x_run
                found[idx[hit]] = True
        return out

    def _batched(
        self,
        model: CountingModel,
        x: torch.Tensor,
        labels: torch.Tensor,
        targets: torch.Tensor,
        threat: LpBall,
        starts: list[torch.Tensor],
    ) -> torch.Tensor:
        """All targets of a sample as rows of one batch, in chunks of whole samples of at most ``max_rows`` rows."""
        n, n_targets = targets.shape
        out = x.clone()
        found = torch.zeros(n, dtype=torch.bool, device=x.device)
        per_chunk = max(self.max_rows // n_targets, 1)
        for r in range(self.restarts):
            todo = (~found).nonzero().squeeze(1)
            for c in range(0, todo.numel(), per_chunk):
                idx = todo[c : c + per_chunk]
                m = idx.numel()
                # rows target-major: row j·m + i is sample idx[i] towards its j-th target
                group = idx.repeat(n_targets)
                lab = labels[group]
                tgt = targets[idx].T.reshape(-1)
                x0 = x[group]
                start = starts[r][:, idx].reshape(x0.shape)
                x_run, hit, _ = self._one_run(
                    model, x0, Criterion(lab), Criterion(lab, tgt), threat, start, group=group
                )
                hit_rows = hit.nonzero().squeeze(1)
                # an unbroken sample keeps its run towards the last target (as in the sequential order); a broken
                # one keeps an adversarial row (the last written wins; any is adversarial)
                out[idx] = x_run[(n_targets - 1) * m :]
                out[group[hit_rows]] = x_run[hit_rows]
                found[group[hit_rows]] = True
        return out
