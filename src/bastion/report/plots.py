"""Matplotlib figures of evaluation results (rendered off-screen with the Agg backend)."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

from bastion.errors import InputError
from bastion.evaluate import EvaluationResult


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
    fig.tight_layout()
    out = Path(path)
    try:
        fig.savefig(out, dpi=120)
    except (OSError, ValueError) as exc:
        raise InputError(f"cannot write the figure to {str(out)!r}: {exc}") from None
    finally:
        plt.close(fig)
    return out
