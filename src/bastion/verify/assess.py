"""``assess``: the attack -> certify -> complete-search pipeline, and the bracket ``[certified, found]`` per sample.

Attacks give upper bounds on the minimal adversarial distance of a sample, verifiers lower bounds; neither alone
says how robust a model is. :func:`assess` runs them in the order of their cost, each on what the cheaper ones
left undecided at the threat's radius ``eps``:

1. clean misclassifications are ``falsified`` (distance 0);
2. a cheap fixed-eps attack cascade (by default AutoAttack's ``rapid`` preset, APGD-CE then APGD-T, Croce & Hein,
   ICML 2020), run as :func:`bastion.evaluate` runs it: each attack on the points every earlier one failed on;
   a success (re-verified by the attack base class: inside the ball and the domain, re-predicted) is ``falsified``;
3. a minimal-distortion attack (FAB by default, Croce & Hein, ICML 2020) on every correctly classified sample: the
   closest adversarial example found is the upper end of the bracket (and falsifies the sample if it lies inside
   the ball);
4. incomplete verifiers on the survivors, cheapest first: IBP -> CROWN -> alpha-CROWN (any of
   :data:`~bastion.verify.certify.METHODS`); a proof is ``robust``;
5. complete search on what is left, within ``budget`` seconds per sample (l-inf only: the complete methods take
   box specifications): branch and bound (``"bab"``, the default: :func:`bastion.verify.bab.verify`, which itself
   solves small sub-problems with the MILP of :mod:`bastion.verify.milp`) or DeepGO's nested Lipschitz optimisation
   with a sound Lipschitz constant (``"deepgo"``: :func:`bastion.verify.globalopt.deepgo.deepgo_robustness`, whose
   bounds converge to the exact minimum margin); a network outside what the method handles leaves its samples
   ``unknown``; a counterexample is re-executed on the model before it falsifies a sample;
6. the certified radius of every correctly classified sample by bisection on eps
   (:func:`~bastion.verify.certify.certified_radius`), the lower end of the bracket;
7. optional statistical estimates as extra columns of each correctly classified sample's record (``estimates``):
   its CLEVER score (:func:`bastion.statistical.clever.clever`, an estimate of the minimal distance, never a
   proof) and the log-probability that a uniform input of the ball is misclassified, by multilevel splitting
   (:func:`bastion.statistical.splitting.multilevel_splitting`); a violation splitting evaluates is a real
   adversarial example (re-executed, inside the ball) and falsifies the sample. They go to the record's ``extra``
   (``clever``, ``log_p``, ``log_p_std``) and their model calls to its ``queries``.

An l0 threat (``LpBall("l0", k)``: at most ``k`` changed input elements) has no incomplete verifier; its complete
stage (``"l0"``, the default for l0) is L0-TRE (:func:`bastion.verify.globalopt.l0.l0_robustness`, Ruan et al.,
IJCAI 2019) on every correctly classified sample: its proven lower bound ``L`` on the minimal number of changed
elements gives the certified radius ``L - 1`` and its upper-bound search the closest adversarial example found
(its options, e.g. ``max_subset``, come through ``complete_options``).

Each sample ends ``robust``, ``falsified`` or ``unknown`` with ``certified <= found``; a ``robust`` sample's certified
radius is at least ``eps``. Records go to the store batch by batch (kind ``"assess"``); a re-run resumes.
"""

from __future__ import annotations

import math
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from bastion.attacks.base import Attack
from bastion.attacks.presets import preset
from bastion.data import Dataset, as_dataset
from bastion.errors import InputError
from bastion.evaluate import attack_names
from bastion.models.checks import check_logits, eval_mode, model_device, model_fingerprint
from bastion.results import STATUSES, SampleRecord
from bastion.store import Store, resumable_run
from bastion.threat import LpBall
from bastion.verify.bab import verify as bab_verify
from bastion.verify.bounds import BoundOptions
from bastion.verify.certify import (
    CLEAN,
    _check_threat,
    certified_radius,
    check_method,
    margin_bounds,
)
from bastion.verify.ir import Network, as_network
from bastion.verify.result import Verdict
from bastion.verify.spec import Spec

__all__ = ["COMPLETE", "AssessResult", "assess", "summarize_assess"]

#: The ``attack`` field of samples decided by the complete search.
COMPLETE = "complete"


@dataclass
class AssessResult:
    """Outcome of :func:`assess`, derived from its per-sample records.

    Attributes:
        n: number of samples.
        threat: the threat key.
        clean_accuracy: fraction classified correctly.
        fractions: fraction of samples ``robust``, ``falsified`` and ``unknown`` (they add up to 1).
        decided_by: number of samples decided by each stage (``clean``, attack names, bound methods,
            ``complete``).
        records: per-sample records: ``certified`` is the certified radius (lower end of the bracket),
            ``adv_distance`` the distance of the closest adversarial example found (upper end), ``attack`` the
            stage that decided the status.
        counterexamples: adversarial inputs found in this call for the samples it falsified, by sample index
            (not kept in the store; a resumed run only has those of its own batches).
        run_id: id of the run in the store, if any.
        seconds: wall time of this call.
        notes: remarks on stages that could not run (e.g. no complete search for l2).
        estimates: medians of the statistical extra columns over the correctly classified samples that have them
            (``clever``: the CLEVER score; ``log10_p``: log10 of the splitting probability of violation) —
            estimates, never proofs.
    """

    n: int
    threat: str
    clean_accuracy: float
    fractions: dict[str, float]
    decided_by: dict[str, int]
    records: list[SampleRecord] = field(repr=False, default_factory=list)
    counterexamples: dict[int, Tensor] = field(repr=False, default_factory=dict)
    run_id: int | None = None
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)
    estimates: dict[str, float] = field(default_factory=dict)

    def brackets(self) -> list[tuple[int, float | None, float | None]]:
        """``(index, certified radius, best adversarial distance)`` per sample, in index order."""
        return [(r.index, r.certified, r.adv_distance) for r in sorted(self.records, key=lambda r: r.index)]

    def to_dict(self) -> dict[str, Any]:
        """JSON-able summary (without the records)."""
        return {
            "n": self.n,
            "threat": self.threat,
            "clean_accuracy": self.clean_accuracy,
            "fractions": self.fractions,
            "decided_by": self.decided_by,
            "run_id": self.run_id,
            "seconds": self.seconds,
            "notes": self.notes,
            "estimates": self.estimates,
        }

    def table(self) -> str:
        """A plain-text summary: fractions, the stage that decided each sample, and the median bracket."""
        lines = [f"threat {self.threat}, n = {self.n}, clean accuracy {100 * self.clean_accuracy:.2f}%"]
        for s in STATUSES:
            lines.append(f"  {s:<10} {100 * self.fractions.get(s, 0.0):6.2f}%")
        lines.append("decided by: " + ", ".join(f"{k} {v}" for k, v in self.decided_by.items()))
        cert = sorted(r.certified for r in self.records if r.certified is not None and r.clean_pred == r.label)
        found = sorted(r.adv_distance for r in self.records if r.adv_distance is not None and r.clean_pred == r.label)
        if cert:
            lines.append(f"median certified radius {cert[len(cert) // 2]:.6g} (over {len(cert)} samples)")
        if found:
            lines.append(f"median adversarial distance found {found[len(found) // 2]:.6g} (over {len(found)} samples)")
        if "clever" in self.estimates:
            lines.append(f"median CLEVER score {self.estimates['clever']:.6g} (an estimate, not a certificate)")
        if "log10_p" in self.estimates:
            lines.append(f"median log10 P(violation) {self.estimates['log10_p']:.4g} (multilevel splitting)")
        lines.extend(f"note: {m}" for m in self.notes)
        return "\n".join(lines)


def summarize_assess(records: Sequence[SampleRecord], n: int, threat: str) -> AssessResult:
    """Fractions and per-stage counts from the records (the only place they are computed)."""
    mine = [r for r in records if r.threat == threat]
    frac = {s: (sum(r.status == s for r in mine) / n if n else 0.0) for s in STATUSES}
    decided: dict[str, int] = {}
    for r in mine:
        if r.status != "unknown":
            key = r.attack or "?"
            decided[key] = decided.get(key, 0) + 1
    clean = sum(r.clean_pred == r.label for r in mine) / n if n else 0.0
    est: dict[str, float] = {}
    for key, name, scale in (("clever", "clever", 1.0), ("log_p", "log10_p", 1 / math.log(10.0))):
        vals = sorted(float(r.extra[key]) * scale for r in mine if key in r.extra)
        if vals:
            est[name] = vals[(len(vals) - 1) // 2]
    return AssessResult(n, threat, clean, frac, decided, list(mine), estimates=est)


#: The complete methods of step 5, with the norms they take.
COMPLETE_METHODS: dict[str, tuple[str, ...]] = {"bab": ("linf",), "deepgo": ("linf",), "l0": ("l0",)}
#: The statistical estimates that can be added as extra columns, with the norms they take.
ESTIMATES: dict[str, tuple[str, ...]] = {"clever": ("linf", "l2", "l1"), "splitting": ("linf", "l2")}

# verify(model, net, x (1, ...), y (1,), threat, k, seconds) -> Verdict
_Verifier = Callable[[nn.Module, Network, Tensor, Tensor, LpBall, int, float], Verdict]


def _bab(model: nn.Module, net: Network, x: Tensor, y: Tensor, threat: LpBall, k: int, seconds: float) -> Verdict:
    return bab_verify(net, Spec.robustness(x[0], int(y[0]), threat, k), timeout=seconds)


def _complete_method(complete: bool | str, norm: str, options: dict[str, Any]) -> tuple[str | None, _Verifier | None]:
    """The name and verify function of the complete stage (``None`` for none, or for l0, which runs its own stage)."""
    if complete is False:
        return None, None
    name = {"linf": "bab", "l0": "l0"}.get(norm) if complete is True else complete
    if name is None:
        return None, None
    if name not in COMPLETE_METHODS:
        raise InputError(f"complete must be True, False or one of {', '.join(COMPLETE_METHODS)}, got {complete!r}")
    if norm not in COMPLETE_METHODS[name]:
        raise InputError(f"the complete method {name!r} takes the norms {COMPLETE_METHODS[name]}, not {norm!r}")
    if name == "bab":
        if options:
            raise InputError(f"complete_options are not taken by branch and bound, got {sorted(options)}")
        return name, _bab
    if name == "deepgo":
        from bastion.verify.globalopt.deepgo import deepgo_reach, deepgo_robustness

        _check_keywords("complete_options", options, deepgo_reach, fixed={"time_limit", "x0", "reduce", "threshold"})
        opts = {"lipschitz": "interval", **options}
        if opts["lipschitz"] == "estimate":
            raise InputError("the complete stage needs a sound Lipschitz constant: lipschitz 'interval' or 'norms'")

        def _deepgo(
            model: nn.Module, net: Network, x: Tensor, y: Tensor, threat: LpBall, k: int, seconds: float
        ) -> Verdict:
            return deepgo_robustness(net, x, y, threat, time_limit=seconds, **opts)[0]

        return name, _deepgo
    from bastion.verify.globalopt.l0 import l0_robustness

    _check_keywords("complete_options", options, l0_robustness, fixed={"domain", "feature"})
    return name, None  # l0: a stage of its own (bounds for every correct sample)


def _check_keywords(where: str, options: dict[str, Any], fn: Callable[..., Any], fixed: set[str]) -> None:
    """InputError unless every key of ``options`` is a keyword-only option of ``fn`` that assess leaves free."""
    import inspect

    free = {k for k, p in inspect.signature(fn).parameters.items() if p.kind is p.KEYWORD_ONLY and k not in fixed}
    bad = sorted(set(options) - free)
    if bad:
        raise InputError(f"{where}: {fn.__name__} has no option {bad} that assess leaves free; options: {sorted(free)}")


def assess(
    model: nn.Module,
    data: Dataset | tuple[Tensor, Tensor],
    threat: LpBall,
    *,
    budget: float = 10.0,
    attack: str | Attack | Sequence[Attack] = "rapid",
    minimal_attack: str | Attack | None = "auto",
    methods: Sequence[str] = ("ibp", "crown", "alpha-crown"),
    complete: bool | str = True,
    complete_options: dict[str, Any] | None = None,
    estimates: Sequence[str] = (),
    estimate_options: dict[str, dict[str, Any]] | None = None,
    radius: bool = True,
    radius_method: str = "crown",
    tolerance: float = 1e-3,
    batch_size: int = 64,
    store: Store | str | Path | None = None,
    seed: int = 0,
    progress: bool = True,
    options: BoundOptions | None = None,
    config: dict[str, Any] | None = None,
) -> AssessResult:
    """Decide each sample ``robust`` / ``falsified`` / ``unknown`` at ``threat`` and bracket its minimal distance.

    Args:
        model: classifier returning logits ``(N, K)``; traceable into the verification IR.
        data: a :class:`~bastion.data.Dataset` or a pair ``(x, y)``.
        threat: an l-inf, l2, l1 or l0 :class:`~bastion.threat.LpBall` with the data's domain.
        budget: seconds per sample for the complete search (0 skips it).
        attack: the fixed-eps attack cascade: a preset name (``"rapid"``, ``"standard"``), an attack or a list.
            For l0 a preset name gives no cascade (no preset attack takes l0; the L0-TRE stage attacks).
        minimal_attack: a minimal-distortion attack (name or object) giving the found distance; None skips it
            (then only the fixed-eps attacks' distances are known); ``"auto"``: FAB, none for l0 (whose L0-TRE
            stage searches the closest adversarial example itself).
        methods: incomplete verifiers in the order they run, from :data:`~bastion.verify.certify.METHODS`.
        complete: the complete search on what the verifiers leave: ``True`` (the norm's default: ``"bab"`` for
            l-inf, ``"l0"`` for l0, none for l2 / l1), ``False``, or a name from :data:`COMPLETE_METHODS`.
        complete_options: keyword options of the complete method (DeepGO: ``lipschitz``, ``tolerance``,
            ``max_iterations``; L0-TRE: ``max_subset``, ``budget``, ...).
        estimates: statistical extra columns, from :data:`ESTIMATES` (``"clever"``, ``"splitting"``).
        estimate_options: per estimate, keyword options of :func:`~bastion.statistical.clever.clever` or
            :func:`~bastion.statistical.splitting.multilevel_splitting` (e.g. ``{"clever": {"n_batches": 50}}``).
        radius: compute the certified radius of every correctly classified sample (the default, as in
            :func:`~bastion.verify.certify.certify`); it costs about 4-60 bound computations' time per sample.
        radius_method: bound method of the radius bisection.
        tolerance: relative tolerance of the radius bisection.
        batch_size: samples per batch and per store transaction.
        store: a :class:`~bastion.store.Store` or a path; a re-run of the same assessment resumes.
        seed: seed of the attacks' random numbers (per batch: derived from it and the batch's first index).
        progress: show a progress bar.
        options: bound-method hyperparameters.
        config: extra JSON-able information stored with the run.

    Returns:
        An :class:`AssessResult`.

    Raises:
        InputError: on bad arguments.
    """
    t_start = time.perf_counter()
    if not isinstance(model, nn.Module):
        raise InputError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    from bastion.models.oracle import BlackBox

    if isinstance(model, BlackBox):
        raise InputError(
            "assess certifies, which needs the network itself; a BlackBox oracle can only be attacked: use "
            "bastion.evaluate with score- or decision-based attacks"
        )
    data = as_dataset(data)
    l0 = isinstance(threat, LpBall) and threat.norm == "l0"
    threat = threat if l0 else _check_threat(threat)
    if not math.isfinite(threat.eps):
        raise InputError(f"assess needs a finite eps, got {threat.eps}")
    if threat.domain != data.domain:
        raise InputError(f"threat {threat!r} has domain {threat.domain} but the data's domain is {data.domain}")
    if isinstance(budget, bool) or not isinstance(budget, (int, float)) or not budget >= 0 or math.isinf(budget):
        raise InputError(f"budget must be a finite number of seconds >= 0, got {budget!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise InputError(f"batch_size must be a positive integer, got {batch_size!r}")
    if isinstance(attack, str):
        attacks = [] if l0 else preset(attack, [threat.norm])
    elif isinstance(attack, Attack):
        attacks = [attack]
    else:
        attacks = list(attack)
    for a in attacks:
        if not isinstance(a, Attack):
            raise InputError(f"attack must be a preset name, an Attack or a list of Attacks, got {a!r}")
        a._check_threat(threat)
    minimal: Attack | None
    if minimal_attack == "auto":
        minimal_attack = None if l0 else "fab"
    if isinstance(minimal_attack, str):
        from bastion.attacks import make_attack

        minimal = make_attack(minimal_attack)
    else:
        minimal = minimal_attack
    if minimal is not None:
        if not isinstance(minimal, Attack) or not minimal.minimal:
            raise InputError(f"minimal_attack must be a minimal-distortion attack (e.g. 'fab'), got {minimal_attack!r}")
        minimal._check_threat(threat)
    notes: list[str] = []
    method_list = [check_method(m) for m in methods]
    if l0 and method_list:
        notes.append("no incomplete verifier for l0 (bound methods take boxes and balls): L0-TRE proves instead")
        method_list = []
    radius_name = check_method(radius_method)
    opts = options if options is not None else BoundOptions()
    names = attack_names([*attacks, *([minimal] if minimal is not None else [])])
    c_opts = dict(complete_options or {})
    if not isinstance(complete, (bool, str)):
        raise InputError(f"complete must be True, False or a method name, got {complete!r}")
    if complete is True and threat.norm in ("l2", "l1") and budget > 0:
        notes.append(f"no complete search for the {threat.norm} norm (complete methods take boxes)")
    complete_name, verifier = _complete_method(complete, threat.norm, c_opts) if budget > 0 or l0 else (None, None)
    if l0 and complete_name is None:
        notes.append("no L0-TRE stage (complete=False): l0 samples get no certified radius")
    estimate_list = _check_estimates(estimates, threat.norm)
    e_opts = _check_estimate_options(estimate_options, estimate_list)
    n = len(data)
    net = as_network(model, data.feature_shape)
    device = model_device(model)
    payload = {
        "threat": threat.key, "attacks": [repr(a) for a in attacks], "minimal": repr(minimal), "methods": method_list,
        "complete": complete_name, "complete_options": c_opts, "estimates": estimate_list, "estimate_options": e_opts,
        "budget": float(budget), "radius": bool(radius),
        "radius_method": radius_name, "tolerance": tolerance, "seed": seed, "options": vars(opts),
    }  # fmt: skip
    counterexamples: dict[int, Tensor] = {}
    with resumable_run(
        store, kind="assess", payload=payload, fingerprints=lambda: (model_fingerprint(model), data.fingerprint()),
        n_samples=n, threats=[threat.key], config={"batch_size": batch_size, **(config or {})},
    ) as run:  # fmt: skip
        counts: Counter[str] = Counter(r.status for r in run.records(threat.key))  # shown on the progress bar
        with eval_mode(model):
            for idx, xb, yb in run.batches(data, batch_size, desc="assess", progress=progress):
                batch, cex = _assess_batch(
                    model, net, xb.to(device), yb.to(device), idx, threat,
                    attacks=attacks, minimal=minimal, names=names, methods=method_list, verifier=verifier,
                    complete_name=complete_name, complete_options=c_opts, estimates=estimate_list,
                    estimate_options=e_opts, budget=float(budget), radius=radius, radius_method=radius_name,
                    tolerance=tolerance, options=opts, seed=seed * 1_000_003 + int(idx[0]),
                )  # fmt: skip
                counterexamples.update(cex)
                run.write(batch)
                counts.update(r.status for r in batch)
                run.show(**{k: counts[k] for k in STATUSES})
        result = summarize_assess(run.records(threat.key), n, threat.key)
        result.counterexamples = counterexamples
        result.notes = notes
        return run.finish(result, started=t_start)


def _assess_batch(
    model: nn.Module,
    net: Network,
    x: Tensor,
    y: Tensor,
    idx: Tensor,
    threat: LpBall,
    *,
    attacks: list[Attack],
    minimal: Attack | None,
    names: list[str],
    methods: list[str],
    verifier: _Verifier | None,
    complete_name: str | None,
    complete_options: dict[str, Any],
    estimates: list[str],
    estimate_options: dict[str, dict[str, Any]],
    budget: float,
    radius: bool,
    radius_method: str,
    tolerance: float,
    options: BoundOptions,
    seed: int,
) -> tuple[list[SampleRecord], dict[int, Tensor]]:
    t0 = time.perf_counter()
    n = x.shape[0]
    with torch.no_grad():
        logits = model(x)
    k = check_logits(logits, n)
    pred = logits.argmax(1)
    correct = pred == y
    # decided[j]: the stage that settled sample j ('' while open); status follows from it.
    decided = ["" if bool(c) else CLEAN for c in correct.tolist()]
    status = ["unknown" if bool(c) else "falsified" for c in correct.tolist()]
    found = torch.where(correct, math.inf, 0.0).to(device=x.device, dtype=torch.float64)
    adv: dict[int, Tensor] = {}
    extra: list[dict[str, Any]] = [{} for _ in range(n)]
    queries = [0] * n  # model calls of the stages that count them per sample (L0-TRE, the estimates)
    cert = torch.zeros(n, dtype=torch.float64, device=x.device)

    def open_idx() -> Tensor:
        return torch.tensor([j for j in range(n) if not decided[j]], dtype=torch.long, device=x.device)

    def record_adv(rows: Tensor, res_x: Tensor, dist: Tensor, stage: str, *, inside: Tensor) -> None:
        for r, xa, d, ins in zip(rows.tolist(), res_x, dist.tolist(), inside.tolist()):
            if d < found[r]:
                found[r] = d
                adv[r] = xa.detach().clone()
            if ins and not decided[r]:
                decided[r], status[r] = stage, "falsified"

    # 2. fixed-eps attack cascade on the open points
    for attack, name in zip(attacks, names):
        run = open_idx()
        if run.numel() == 0:
            break
        res = attack(model, x[run], y[run], threat=threat, seed=seed)
        hit = res.success & threat.contains(res.x_adv, x[run])
        record_adv(run[hit], res.x_adv[hit], res.distance[hit], name, inside=hit[hit])
    # 3. minimal attack on every correctly classified point: the upper end of the bracket
    if minimal is not None:
        run = correct.nonzero().squeeze(1)
        if run.numel():
            res = minimal(model, x[run], y[run], threat=threat, seed=seed)
            ok = res.success
            # as in bastion.evaluate: a minimal attack settles the radius eps when its distance is within it
            inside = res.distance[ok] <= threat.eps
            record_adv(run[ok], res.x_adv[ok], res.distance[ok], names[-1], inside=inside)
    # 4. incomplete verifiers, cheapest first, on what is still open
    for method in methods:
        run = open_idx()
        if run.numel() == 0:
            break
        with torch.no_grad():
            lb = margin_bounds(net, x[run], y[run], threat, method=method, options=options)
        for j in run[(lb > 0).all(1)].tolist():
            decided[j], status[j] = method, "robust"
    # 5. complete search within the per-sample budget
    if verifier is not None:
        for j in open_idx().tolist():
            try:
                verdict = verifier(model, net, x[j : j + 1], y[j : j + 1], threat, k, budget)
            except InputError:
                break  # the network is outside what the complete method handles (e.g. sigmoid for MILP)
            if verdict.status == "verified":
                decided[j], status[j] = COMPLETE, "robust"
            elif verdict.status == "falsified" and verdict.counterexample is not None:
                cex = verdict.counterexample.to(x).reshape(1, *x.shape[1:])
                # re-executed on the model itself (not the IR) and checked against the threat set
                with torch.no_grad():
                    broken = bool(model(cex).argmax(1)[0] != y[j])
                if broken and bool(threat.contains(cex, x[j : j + 1])[0]):
                    dist = threat.distance(cex, x[j : j + 1])
                    record_adv(torch.tensor([j]), cex, dist, COMPLETE, inside=torch.tensor([True]))
    sel = correct.nonzero().squeeze(1)
    # 5-6 for l0: L0-TRE's bounds on every correctly classified sample (its upper-bound search is the attack)
    if complete_name == "l0" and sel.numel():
        from bastion.verify.globalopt.l0 import l0_robustness

        b = l0_robustness(model, x[sel], y[sel], domain=threat.domain, feature="element", **complete_options)
        hit = b.success.to(sel.device)
        dist = b.upper.to(found)
        record_adv(sel[hit], b.x_adv.to(x)[hit], dist[hit], COMPLETE, inside=dist[hit] <= threat.eps)
        cert[sel] = b.certified_radius.to(cert)
        for r, q, lo, up in zip(sel.tolist(), b.evaluations.tolist(), b.lower.tolist(), b.upper.tolist()):
            queries[r] += int(q)
            extra[r].update(l0_lower=int(lo), l0_upper=float(up))
            if not decided[r] and float(cert[r]) >= threat.eps:
                decided[r], status[r] = COMPLETE, "robust"
    # 6. certified radius (the lower end of the bracket)
    if radius and threat.norm != "l0" and sel.numel():
        r = certified_radius(net, x[sel], y[sel], threat, method=radius_method, tolerance=tolerance, options=options)
        cert[sel] = r.to(cert.dtype)
        for j in sel.tolist():
            # the bisection probes eps first: a sample it certifies there is proven even if no earlier stage was
            if not decided[j] and float(cert[j]) >= threat.eps:
                decided[j], status[j] = radius_method, "robust"
    # 7. statistical estimates, extra columns of the correctly classified samples
    if sel.numel():
        _estimate(model, x, y, sel, threat, estimates, estimate_options, seed, extra, queries, record_adv)
    share = (time.perf_counter() - t0) / max(n, 1)
    out = []
    for j in range(n):
        c: float | None
        if not bool(correct[j]):
            c = 0.0
        elif status[j] == "robust":
            c = max(float(cert[j]), threat.eps)  # proven at eps by the stage that decided it
        else:
            c = float(cert[j]) if radius or complete_name == "l0" else None
        d = float(found[j])
        out.append(
            SampleRecord(
                index=int(idx[j]), threat=threat.key, label=int(y[j]), clean_pred=int(pred[j]), status=status[j],  # type: ignore[arg-type]
                adv_distance=d if math.isfinite(d) else None, certified=c, attack=decided[j] or None, seconds=share,
                queries=queries[j] or None, extra=extra[j],
            )
        )  # fmt: skip
    cex_out = {int(idx[j]): v for j, v in adv.items() if status[j] == "falsified"}
    return out, cex_out


def _check_estimates(estimates: object, norm: str) -> list[str]:
    if isinstance(estimates, str):
        estimates = [e.strip() for e in estimates.split(",") if e.strip()]
    if not isinstance(estimates, (list, tuple)):
        raise InputError(f"estimates must be a list of names from {', '.join(ESTIMATES)}, got {estimates!r}")
    out: list[str] = []
    for e in estimates:
        if e not in ESTIMATES:
            raise InputError(f"unknown estimate {e!r}; available: {', '.join(ESTIMATES)}")
        if norm not in ESTIMATES[e]:
            raise InputError(f"the estimate {e!r} takes the norms {ESTIMATES[e]}, not {norm!r}")
        if e not in out:
            out.append(e)
    return out


def _check_estimate_options(options: object, estimates: list[str]) -> dict[str, dict[str, Any]]:
    if options is None:
        return {}
    if not isinstance(options, dict) or not all(isinstance(v, dict) for v in options.values()):
        raise InputError(f"estimate_options must map estimate names to option dicts, got {options!r}")
    unknown = sorted(set(options) - set(estimates))
    if unknown:
        raise InputError(f"estimate_options given for {unknown}, which are not among the estimates {estimates}")
    from bastion.statistical.clever import clever
    from bastion.statistical.splitting import multilevel_splitting

    fixed = {"norm", "domain", "seed"}
    for name, opts in options.items():
        bad = sorted(set(opts) & fixed)
        if bad:
            raise InputError(f"estimate_options[{name!r}] sets {bad}, which assess fixes itself")
        fn = clever if name == "clever" else multilevel_splitting
        _check_keywords(f"estimate_options[{name!r}]", opts, fn, fixed)
    return {k: dict(v) for k, v in options.items()}


def _estimate(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    sel: Tensor,
    threat: LpBall,
    estimates: list[str],
    options: dict[str, dict[str, Any]],
    seed: int,
    extra: list[dict[str, Any]],
    queries: list[int],
    record_adv: Callable[..., None],
) -> None:
    """CLEVER scores and splitting log-probabilities of the samples ``sel`` into their ``extra`` and ``queries``."""
    if "clever" in estimates:
        from bastion.statistical.clever import clever

        opts = options.get("clever", {})
        res = clever(model, x[sel], y[sel], norm=threat.norm, seed=seed, domain=threat.domain, **opts)
        per = 1 + res.n_batches * res.batch_size
        for r, score in zip(sel.tolist(), res.scores.tolist()):
            extra[r]["clever"] = float(score)
            queries[r] += per
    if "splitting" in estimates:
        from bastion.statistical.splitting import multilevel_splitting

        opts = options.get("splitting", {})
        for r in sel.tolist():
            sp = multilevel_splitting(model, x[r], int(y[r]), threat, seed=seed + r, **opts)
            extra[r].update(log_p=sp.log_p, log_p_std=sp.log_p_std)
            queries[r] += sp.model_calls
            if sp.x_adv is not None and sp.adv_distance is not None:
                # re-executed by splitting and inside ball ∩ domain: a real adversarial example
                xa = sp.x_adv.to(x).unsqueeze(0)
                dist = torch.tensor([float(sp.adv_distance)], dtype=torch.float64, device=x.device)
                record_adv(torch.tensor([r]), xa, dist, "splitting", inside=torch.tensor([True]))
