"""Matplotlib figures of evaluation results (rendered off-screen with the Agg backend)."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from bastion.errors import InputError
from bastion.evaluate import EvaluationResult


def _save(fig: Any, path: str | Path) -> Path:
    """Write ``fig`` to ``path`` (format from the suffix) and close it; an unwritable path is an InputError."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    out = Path(path)
    try:
        fig.savefig(out, dpi=120)
    except (OSError, ValueError) as exc:
        raise InputError(f"cannot write the figure to {str(out)!r}: {exc}") from None
    finally:
        plt.close(fig)
    return out


def _norm_and_eps(key: str) -> tuple[str, float] | None:
    norm, _, rest = key.partition(":")
    try:
        return norm, float(rest.split("@")[0])
    except ValueError:
        return None


def plot_robust_accuracy(result: EvaluationResult, path: str | Path, *, title: str | None = None) -> Path:
    """Plot robust accuracy against eps (one panel per norm; a line per attack of the cascade and the worst case).

    Args:
        result: an evaluation result with at least one l_p threat model.
        path: where to write the figure (the format follows the suffix, e.g. ``.png``).
        title: figure title.

    Returns:
        The path written.
    """
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    by_norm: dict[str, list[tuple[float, str]]] = defaultdict(list)
    for key in result.threats:
        parsed = _norm_and_eps(key)
        if parsed is not None:
            by_norm[parsed[0]].append((parsed[1], key))
    norms = sorted(by_norm)
    fig, axes = plt.subplots(1, max(1, len(norms)), figsize=(5 * max(1, len(norms)), 4), squeeze=False)
    for ax, norm in zip(axes[0], norms):
        points = sorted(by_norm[norm])
        eps = [0.0] + [e for e, _ in points]
        # after the last attack of the cascade the curve is the worst case, drawn once in black
        for attack in result.attacks[:-1]:
            acc = [result.clean_accuracy] + [result.robust_accuracy[k][attack] for _, k in points]
            ax.plot(eps, [100 * a for a in acc], marker="o", label=f"after {attack}")
        worst = [result.clean_accuracy] + [result.worst_case[k] for _, k in points]
        cascade = " → ".join(result.attacks)
        ax.plot(eps, [100 * a for a in worst], marker="s", color="black", linewidth=2, label=f"worst case ({cascade})")
        ax.set_xlabel(f"eps ({norm})")
        ax.set_ylabel("robust accuracy (%)")
        ax.set_ylim(-2, 102)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title or f"Robust accuracy (n = {result.n})")
    return _save(fig, path)


def plot_success_vs_queries(result: EvaluationResult, path: str | Path, *, title: str | None = None) -> Path:
    """Plot the attack success rate against the queries spent (one line per threat model).

    The success rate at ``q`` queries is the fraction of correctly classified samples broken with at most ``q``
    queries (the records' ``queries``: every query the oracle answered for the sample over the cascade).

    Args:
        result: an evaluation whose records count queries (a black-box oracle or score-based attacks).
        path: where to write the figure (the format follows the suffix).
        title: figure title.

    Raises:
        InputError: no record of the result counts queries.
    """
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    if not any(r.queries for r in result.records):
        raise InputError("the evaluation's records count no queries (run it on a BlackBox or with score attacks)")
    fig, ax = plt.subplots(figsize=(6, 4))
    for key in result.threats:
        correct = [r for r in result.records if r.threat == key and r.clean_pred == r.label]
        spent = sorted(r.queries for r in correct if r.status == "falsified" and r.queries)
        if not correct or not spent:
            continue
        rate = [100 * (i + 1) / len(correct) for i in range(len(spent))]
        ax.step([0, *spent], [0.0, *rate], where="post", label=key)
    ax.set_xscale("symlog", linthresh=10)
    ax.set_xlabel("queries per sample")
    ax.set_ylabel("success rate (% of correctly classified)")
    ax.set_ylim(-2, 102)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.suptitle(title or f"Attack success vs queries (n = {result.n}; {' → '.join(result.attacks)})")
    return _save(fig, path)


def plot_certified_accuracy(
    radii: Sequence[float],
    curves: Mapping[str, Sequence[float]],
    path: str | Path,
    *,
    title: str | None = None,
) -> Path:
    """Plot certified accuracy against the l2 radius (randomized smoothing; Cohen et al., ICML 2019, Figure 6).

    Args:
        radii: the radii at which every curve was evaluated (see
            :func:`bastion.defenses.smoothing.certified_accuracy`).
        curves: one curve per label (e.g. ``{"sigma = 0.25": [...], "sigma = 0.5": [...]}``), fractions in [0, 1],
            one value per radius.
        path: where to write the figure (the format follows the suffix, e.g. ``.png``).
        title: figure title.

    Returns:
        The path written.
    """
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    xs = [float(r) for r in radii]
    if not xs:
        raise InputError("radii: give at least one radius")
    if not curves:
        raise InputError("curves: give at least one curve")
    for label, acc in curves.items():
        if len(acc) != len(xs):
            raise InputError(f"curve {label!r} has {len(acc)} values but there are {len(xs)} radii")
    fig, ax = plt.subplots(figsize=(5, 4))
    for label, acc in curves.items():
        # certified accuracy is a step function of the radius: constant until the next certified radius
        ax.step(xs, [100 * float(a) for a in acc], where="post", marker="o", markersize=3, label=label)
    ax.set_xlabel("l2 radius")
    ax.set_ylabel("certified accuracy (%)")
    ax.set_ylim(-2, 102)
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title(title or "Certified accuracy (randomized smoothing)")
    return _save(fig, path)


def plot_coverage_history(
    history: Sequence[Sequence[float]], path: str | Path, *, label: str = "coverage", title: str | None = None
) -> Path:
    """Plot coverage against generation iterations (``history`` rows: ``(iteration, queries, ratio)``).

    Args:
        history: a :class:`~bastion.testing.generate.TestSuiteResult`'s ``history``.
        path: where to write the figure (the format follows the suffix).
        label: the curve's legend (e.g. the criterion's name).
        title: figure title.

    Returns:
        The path written.
    """
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    if not history:
        raise InputError("the coverage history is empty: the generation ran no iteration")
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot([h[0] for h in history], [100 * h[2] for h in history], marker=".", label=label)
    ax.set_xlabel("iteration")
    ax.set_ylabel("coverage (%)")
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title(title or "Coverage during test generation")
    return _save(fig, path)


def plot_bounds_history(
    lower: Sequence[float], upper: Sequence[float], path: str | Path, *, ylabel: str = "bound",
    title: str | None = None,
) -> Path:  # fmt: skip
    """Plot converging lower and upper bounds against iterations (DeepGO's ``history_lower``/``history_upper`` for
    one sample, DeepGame's ``history``, L0-TRE's per-level bounds); the gap between them is shaded.

    Args:
        lower: the lower bound after each iteration.
        upper: the upper bound after each iteration (``inf`` where none is known yet: not drawn).
        path: where to write the figure (the format follows the suffix).
        ylabel: what is bounded (e.g. "minimal l2 distance", "logit minimum").
        title: figure title.

    Returns:
        The path written.
    """
    import math

    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    lo, hi = [float(v) for v in lower], [float(v) for v in upper]
    if not lo or len(lo) != len(hi):
        raise InputError(f"lower and upper must be non-empty and of one length, got {len(lo)} and {len(hi)}")
    steps = list(range(1, len(lo) + 1))
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(steps, lo, label="lower bound", color="tab:blue")
    finite = [(s, h) for s, h in zip(steps, hi) if math.isfinite(h)]
    if finite:
        ax.plot([s for s, _ in finite], [h for _, h in finite], label="upper bound", color="tab:red")
        gap = [(s, lo[s - 1], h) for s, h in finite]
        ax.fill_between([g[0] for g in gap], [g[1] for g in gap], [g[2] for g in gap], color="tab:grey", alpha=0.2)
    ax.set_xlabel("iteration")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title(title or "Converging bounds")
    return _save(fig, path)
