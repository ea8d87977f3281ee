"""Robustness evaluation: attacks run as a cascade on the still-robust points, for several threat models at once.

The scheme is AutoAttack's (Croce & Hein, ICML 2020): attack ``i`` of the cascade only sees the samples that every
earlier attack failed on; the robust accuracy after each attack and the worst case over all of them are reported.

Several radii of one norm share work: radii are processed in increasing order, and an adversarial example found at
a smaller radius lies inside every larger ball, so at the larger radius that sample is settled by the same attack
without running it again. Earlier attacks of the cascade still run on it, so each column still credits the first
attack that breaks a sample at that radius. Robust accuracy is therefore non-increasing in the radius, and never
higher than that of a separate run at each radius (an attack that fails at a larger radius after succeeding at a
smaller one, as FGSM can, no longer hides the known adversarial example). Clean misclassifications are settled
once for every radius.

With a store, every batch's per-sample records are written in one transaction as soon as the batch finishes;
re-running the same evaluation (same model, data, threats, attacks and seed) resumes with the samples not yet
done, and the summary is always recomputed from the stored records, so nothing is lost or counted twice.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from bastion.attacks.base import Attack
from bastion.attacks.presets import preset
from bastion.data import Dataset
from bastion.errors import InputError
from bastion.masking import Finding, posthoc, preflight, unbounded_check
from bastion.models.checks import channels_last as channels_last_layout
from bastion.models.checks import check_logits, eval_mode, model_device, model_fingerprint
from bastion.models.oracle import BlackBox
from bastion.results import SampleRecord
from bastion.store import Store, resumable_run
from bastion.threat import FlowThreat, LpBall, ThreatModel

CLEAN = "clean"  # the 'attack' name of samples the model already gets wrong


@dataclass
class EvaluationResult:
    """Summary of an evaluation, derived from its per-sample records.

    Attributes:
        n: number of samples evaluated.
        clean_accuracy: fraction classified correctly without attack.
        threats: keys of the threat models, in the order given.
        attacks: names of the attacks of the cascade, in order.
        robust_accuracy: ``robust_accuracy[threat][attack]`` is the fraction still robust after the cascade up to
            and including that attack.
        worst_case: fraction robust against every attack, per threat.
        records: the per-sample records (one per sample and threat).
        run_id: id of the run in the store, if any.
        seconds: wall time of this call (not of earlier, resumed sessions).
        warnings: (code, message) of each gradient-masking finding.
        queries: per threat, the median and mean queries per broken sample, where the attacks count them.
        passes: forward-equivalent passes the cascade spent on the model, over every session of the run (a forward
            pass of one input counts 1, a backward pass 1 more): the clean forward of each sample and every pass
            of every attack, as counted by the attack frame (:class:`~bastion.attacks.base.CountingModel`). The
            gradient-masking checks (``checks=True``) are not included. Compare with
            :func:`bastion.attacks.presets.preset_cost`, the most a sample can cost.
    """

    n: int
    clean_accuracy: float
    threats: list[str]
    attacks: list[str]
    robust_accuracy: dict[str, dict[str, float]]
    worst_case: dict[str, float]
    records: list[SampleRecord] = field(repr=False, default_factory=list)
    run_id: int | None = None
    seconds: float = 0.0
    warnings: list[tuple[str, str]] = field(default_factory=list)
    queries: dict[str, dict[str, float]] = field(default_factory=dict)
    passes: float = 0.0

    @property
    def passes_per_sample(self) -> float:
        """:attr:`passes` divided by the number of samples."""
        return self.passes / self.n if self.n else 0.0

    def to_dict(self) -> dict[str, Any]:
        """JSON-able summary (without the per-sample records)."""
        return {
            "n": self.n,
            "clean_accuracy": self.clean_accuracy,
            "threats": self.threats,
            "attacks": self.attacks,
            "robust_accuracy": self.robust_accuracy,
            "worst_case": self.worst_case,
            "run_id": self.run_id,
            "seconds": self.seconds,
            "warnings": [{"code": c, "message": m} for c, m in self.warnings],
            "queries": self.queries,
            "passes": round(self.passes),
            "passes_per_sample": self.passes_per_sample,
        }

    def table(self) -> str:
        """A plain-text table: one row per threat, one column per attack of the cascade, then the worst case."""
        head = ["threat", "clean", *self.attacks, "worst case"]
        rows = [head]
        for key in self.threats:
            accs = [self.robust_accuracy[key][a] for a in self.attacks]
            rows.append([key, _pct(self.clean_accuracy), *map(_pct, accs), _pct(self.worst_case[key])])
        widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
        lines = ["  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in rows]
        lines.insert(1, "  ".join("-" * w for w in widths))
        lines.append(f"(n = {self.n}; robust accuracy after each attack of the cascade)")
        if self.passes:
            lines.append(
                f"work: {round(self.passes):,} forward-equivalent passes, {self.passes_per_sample:,.1f} per sample "
                "(a forward pass of one input = 1, a backward pass = 1 more)"
            )
        for key, q in self.queries.items():
            lines.append(
                f"queries per broken sample at {key}: median {q['median']:g}, mean {q['mean']:.1f} "
                f"(over {int(q['broken'])} samples)"
            )
        lines.extend(f"warning [{code}]: {message}" for code, message in self.warnings)
        return "\n".join(lines)


def _pct(v: float) -> str:
    return f"{100 * v:.2f}%"


def summarize(
    records: Sequence[SampleRecord], threats: Sequence[str], attacks: Sequence[str], n: int
) -> EvaluationResult:
    """Robust accuracies computed from per-sample records (the only place they are computed)."""
    order = {name: i for i, name in enumerate(attacks)}
    by_threat: dict[str, list[SampleRecord]] = {t: [] for t in threats}
    for r in records:
        if r.threat in by_threat:
            by_threat[r.threat].append(r)
    first = by_threat[threats[0]] if threats else []
    clean = sum(r.clean_pred == r.label for r in first) / n if n else 0.0
    robust: dict[str, dict[str, float]] = {}
    worst: dict[str, float] = {}
    for t in threats:
        recs = by_threat[t]
        correct = [r for r in recs if r.clean_pred == r.label]
        broken_at = [order.get(r.attack or "", -1) if r.status == "falsified" else len(attacks) for r in correct]
        robust[t] = {a: sum(b > i for b in broken_at) / n if n else 0.0 for i, a in enumerate(attacks)}
        worst[t] = sum(r.status != "falsified" for r in correct) / n if n else 0.0
    # queries per broken sample, where the attacks count them (black-box oracles, score-based attacks)
    queries: dict[str, dict[str, float]] = {}
    for t in threats:
        spent = sorted(
            r.queries for r in by_threat[t] if r.status == "falsified" and r.clean_pred == r.label and r.queries
        )
        if spent:
            mid = len(spent) // 2
            median = spent[mid] if len(spent) % 2 else (spent[mid - 1] + spent[mid]) / 2
            queries[t] = {"median": float(median), "mean": sum(spent) / len(spent), "broken": float(len(spent))}
    passes = sum(float(r.extra.get("passes", 0.0)) for r in records)
    return EvaluationResult(
        n, clean, list(threats), list(attacks), robust, worst, list(records), queries=queries, passes=passes
    )


def attack_names(attacks: Sequence[Attack]) -> list[str]:
    """Unique display names for the attacks of a cascade (``pgd``, ``pgd#2`` when one appears twice)."""
    names: list[str] = []
    for a in attacks:
        base = a.name or type(a).__name__.lower()
        name, k = base, 2
        while name in names:
            name, k = f"{base}#{k}", k + 1
        names.append(name)
    return names


def _as_list(value: Any, kind: type, what: str) -> list[Any]:
    items = list(value) if isinstance(value, (list, tuple)) else [value]
    if not items:
        raise InputError(f"{what}: give at least one")
    for item in items:
        if not isinstance(item, kind):
            raise InputError(f"{what} must be {kind.__name__} objects, got {item!r}")
    return items


def _families(threats: Sequence[ThreatModel]) -> list[list[ThreatModel]]:
    """Group threat models whose sets are nested (same norm and domain), each group by increasing radius."""
    groups: dict[Any, list[ThreatModel]] = {}
    for t in threats:
        fam = (t.norm, t.domain, t.l1_sparsity) if isinstance(t, LpBall) else ("single", t.key)
        groups.setdefault(fam, []).append(t)
    return [sorted(g, key=lambda t: t.eps if isinstance(t, LpBall) else 0.0) for g in groups.values()]


def evaluate(
    model: nn.Module,
    data: Dataset | tuple[torch.Tensor, torch.Tensor],
    threats: ThreatModel | Sequence[ThreatModel],
    attacks: Attack | Sequence[Attack] | str,
    *,
    batch_size: int = 256,
    store: Store | str | Path | None = None,
    seed: int = 0,
    progress: bool = True,
    config: dict[str, Any] | None = None,
    checks: bool = True,
    channels_last: bool | None = None,
) -> EvaluationResult:
    """Evaluate ``model`` on ``data`` under each threat model with a cascade of attacks.

    Args:
        model: classifier returning logits (N, K); put in eval mode during the evaluation and restored after.
        data: a :class:`~bastion.data.Dataset` or a pair ``(x, y)`` of tensors.
        threats: one threat model or several (e.g. ``[LpBall("linf", e) for e in (0.1, 0.2, 0.3)]``).
        attacks: one attack or a cascade, run in order on the samples every earlier attack failed on, or the
            name of a preset of :mod:`bastion.attacks.presets` (``"standard"``: AutoAttack's APGD-CE → APGD-T →
            FAB-T → Square at the paper's budget; ``"fast"``: the same at torchattacks' default budget;
            ``"rapid"``: APGD-CE → APGD-T). The result's ``passes`` is the work spent.
        batch_size: samples per batch (and per store transaction).
        store: a :class:`~bastion.store.Store` or a path to one; records are written batch by batch and an
            interrupted evaluation resumes where it stopped.
        seed: seed of the attacks' random numbers; each batch derives its own from it and its first sample index.
        progress: show a tqdm progress bar.
        config: extra JSON-able information stored with the run (e.g. the CLI's model and data specs).
        checks: run the gradient-masking checks of :mod:`bastion.masking` before (randomness, softmax outputs,
            zero gradients, on up to 64 samples) and after (robust accuracy flat in eps, black-box beating
            white-box, an unbounded radius not reaching 0 % on up to 32 samples); findings are warned, stored
            with the run and listed in the result.

    Returns:
        An :class:`EvaluationResult` with clean accuracy, robust accuracy per threat and attack, the worst case
        and the per-sample records.

    Example:
        >>> from bastion import LpBall, evaluate
        >>> from bastion.attacks import FGSM, PGD
        >>> res = evaluate(model, data, [LpBall("linf", e) for e in (0.1, 0.2)], [FGSM(), PGD()])  # doctest: +SKIP
        >>> print(res.table())  # doctest: +SKIP
    """
    t_start = time.perf_counter()
    if not isinstance(model, nn.Module):
        raise InputError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if isinstance(data, tuple):
        data = Dataset(*data, num_classes=int(torch.as_tensor(data[1]).max()) + 1, name="tensors")  # validates
    if not isinstance(data, Dataset):
        raise InputError(f"data must be a bastion Dataset or a pair (x, y), got {type(data).__name__}")
    threat_list: list[ThreatModel] = _as_list(threats, ThreatModel, "threats")
    if isinstance(attacks, str):
        attacks = preset(attacks, sorted({t.norm for t in threat_list if isinstance(t, LpBall)}))
    attack_list: list[Attack] = _as_list(attacks, Attack, "attacks")
    if int(batch_size) < 1:
        raise InputError(f"batch_size must be >= 1, got {batch_size!r}")
    if channels_last not in (None, True, False):
        raise InputError(f"channels_last must be None, True or False, got {channels_last!r}")
    if isinstance(model, BlackBox):
        for a in attack_list:
            a._check_oracle(model)  # before any query or progress bar: one line naming what to use instead
    for t in threat_list:
        if t.domain != data.domain:
            raise InputError(f"threat {t!r} has domain {t.domain} but the data's domain is {data.domain}")
        for a in attack_list:
            a._check_threat(t)
    keys = [t.key for t in threat_list]
    if len(set(keys)) != len(keys):
        raise InputError(f"threats contain duplicates: {keys}")
    names = attack_names(attack_list)
    n = len(data)

    payload = {"threats": keys, "attacks": [repr(a) for a in attack_list], "seed": seed}
    with resumable_run(
        store, kind="evaluate", payload=payload, fingerprints=lambda: (model_fingerprint(model), data.fingerprint()),
        n_samples=n, threats=keys, config={"attack_names": names, "batch_size": batch_size, **(config or {})},
    ) as run:  # fmt: skip
        device = model_device(model)
        findings: list[Finding] = []
        # the pre-flight and unbounded checks read gradients and run white-box attacks: not on a black box
        white_box = checks and not isinstance(model, BlackBox)
        if white_box:
            probe = data.subset(slice(0, 64))
            findings += preflight(model, probe.x.to(device), probe.y.to(device))
        with eval_mode(model), channels_last_layout(model, channels_last):
            for idx, xb, yb in run.batches(data, batch_size, desc="evaluate", progress=progress, leave=False):
                run.write(
                    _evaluate_batch(
                        model, xb.to(device), yb.to(device), idx, threat_list, attack_list, names,
                        seed=seed * 1_000_003 + int(idx[0]),
                    )
                )  # fmt: skip
        result = summarize(run.records(), keys, names, n)
        if checks:
            findings += posthoc(result, attack_list, threat_list)
            probe = data.subset(slice(0, 32))
            # an unbounded ball of any norm is the whole domain: one check per domain covers every norm
            balls = {t.domain: t for t in threat_list if isinstance(t, LpBall)} if white_box else {}
            for ball in balls.values():
                findings += unbounded_check(model, probe.x.to(device), probe.y.to(device), ball)
        for finding in findings:
            finding.warn()
            run.warn(finding.code, finding.message)
        result.warnings = [(f.code, f.message) for f in findings]
        return run.finish(result, started=t_start)


def _evaluate_batch(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    idx: torch.Tensor,
    threats: list[ThreatModel],
    attacks: list[Attack],
    names: list[str],
    *,
    seed: int,
) -> list[SampleRecord]:
    """All records of one batch: every threat, the whole cascade."""
    t0 = time.perf_counter()
    oracle = isinstance(model, BlackBox)
    if isinstance(model, BlackBox) and model.returns == "labels":
        clean_pred = model.labels(x)  # a labels-only oracle answers nothing else
    else:
        with torch.no_grad():
            logits = model(x)
        check_logits(logits, x.shape[0])
        clean_pred = logits.argmax(dim=1)
    correct = clean_pred == y
    n = x.shape[0]
    passes = n  # forward-equivalent passes of the whole batch: the clean forward, then every attack's
    # queries per threat and sample, counted where the attacks count them (the clean query above included)
    spent = {t.key: torch.full((n,), 1 if oracle else 0, dtype=torch.long, device=x.device) for t in threats}
    counted = oracle
    status: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}  # threat key -> (attack index or -1, distance)
    for family in _families(threats):
        # minimal-distortion attacks are run once per family; their distances decide every radius
        minimal_cache: dict[int, torch.Tensor] = {}
        carried_attack = torch.full((n,), len(attacks), dtype=torch.long, device=x.device)
        carried_dist = torch.full((n,), math.inf, device=x.device)
        for threat in family:
            broken_by = torch.where(correct, len(attacks), -1)  # -1: clean misclassification
            dist = torch.where(correct, math.inf, 0.0).to(x.device)
            for i, attack in enumerate(attacks):
                open_ = broken_by == len(attacks)
                # settled by this same attack at a smaller radius: no need to run it again
                settled = open_ & (carried_attack == i)
                broken_by[settled] = i
                dist[settled] = carried_dist[settled]
                run = (open_ & ~settled).nonzero().squeeze(1)
                if run.numel() == 0:
                    continue
                if attack.minimal:
                    if i not in minimal_cache:
                        # first reached at the family's smallest radius: the points open there include every point
                        # open at the larger radii (a point broken at a smaller radius stays broken), so one run
                        # gives the distances for the whole family
                        res = attack(model, x[run], y[run], threat=threat, seed=seed)
                        passes += res.model_calls + res.grad_calls
                        d = torch.full((n,), math.inf, device=x.device)
                        d[run] = res.distance.to(d.dtype)
                        minimal_cache[i] = d
                        if res.queries is not None:  # spent once, on the family's first radius
                            counted = True
                            spent[threat.key][run] += res.queries.to(x.device)
                    d_run = minimal_cache[i][run]
                    eps = threat.eps if isinstance(threat, (LpBall, FlowThreat)) else math.inf
                    hit = d_run <= eps
                    broken_by[run[hit]] = i
                    dist[run[hit]] = d_run[hit]
                    continue
                res = attack(model, x[run], y[run], threat=threat, seed=seed)
                passes += res.model_calls + res.grad_calls
                if res.queries is not None:
                    counted = True
                    spent[threat.key][run] += res.queries.to(x.device)
                hit = res.success
                broken_by[run[hit]] = i
                dist[run[hit]] = res.distance[hit].to(dist.dtype)
            status[threat.key] = (broken_by, dist)
            # the earliest attack of the cascade known to succeed inside this ball also succeeds in larger ones
            earlier = (broken_by >= 0) & (broken_by < carried_attack)
            carried_attack = torch.where(earlier, broken_by, carried_attack)
            carried_dist = torch.where(earlier, dist, carried_dist)
    share = (time.perf_counter() - t0) / n
    # the batch's passes, shared evenly, ride on the records of the first threat (the summary adds them up)
    first_key, pass_share = threats[0].key, passes / n
    records = []
    ys, preds = y.tolist(), clean_pred.tolist()
    for key in (t.key for t in threats):
        broken_by, dist = status[key]
        q = spent[key].tolist()
        for j, (b, d) in enumerate(zip(broken_by.tolist(), dist.tolist())):
            falsified = b < len(attacks)
            records.append(
                SampleRecord(
                    index=int(idx[j]), threat=key, label=ys[j], clean_pred=preds[j],
                    status="falsified" if falsified else "unknown",
                    adv_distance=d if falsified else None,
                    attack=(CLEAN if b < 0 else names[b]) if falsified else None,
                    seconds=share, queries=q[j] if counted else None,
                    extra={"passes": pass_share} if key == first_key else {},
                )
            )  # fmt: skip
    return records
