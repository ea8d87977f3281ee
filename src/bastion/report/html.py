"""The HTML robustness report: one self-contained page for the runs of a result store.

:func:`write_report` reads a :class:`~bastion.store.Store` and writes ``OUT/index.html``: a single file with every
figure embedded as a base64 PNG (drawn off-screen with matplotlib's Agg backend), a small inline style sheet and no
script, so it opens from disk in any browser, needs no server and can be mailed or archived as it is. The page is
built from string templates; every value read from the store passes through :func:`html.escape`.

For each run it shows what the store holds about it:

* the run itself: kind, status, key, model and data fingerprints, sample and record counts, accumulated seconds,
  the library versions that produced it, its configuration and its summary (flattened to dotted keys);
* an evaluation (the cascade of :func:`bastion.evaluate`): robust accuracy after each attack and the worst case,
  per threat, as a table and as the robust-accuracy-vs-eps figure of :func:`~bastion.report.plot_robust_accuracy`;
* the bracket ``[certified, found]`` of each correctly classified sample, per threat family (one norm and input
  domain; the radii of one family nest, so the largest certified radius and the smallest distance found over the
  family's threats bracket the minimal adversarial distance): a sorted bracket plot, a histogram of certified radii
  against distances found, a summary table and the per-sample table;
* the closest adversarial examples found: the table of their distances and, where the run's data spec can be
  loaded again and matches the stored data fingerprint, the original inputs. The store keeps the distance of each
  adversarial example, not the adversarial input, so the adversarial and difference images are only shown when
  the report is asked to regenerate them (``regenerate=True``): the run's model spec is loaded again (only when
  its fingerprint matches the stored one) and the attack that decided the sample is re-run on it; the distance of
  the regenerated example is shown next to the stored one, as a fresh run of an attack may land elsewhere;
* verification outcomes: verified (``robust``) / falsified / unknown per threat, with the time spent per instance;
* training runs: the per-epoch metrics as a table and as loss and accuracy curves;
* coverage-guided test generation: coverage against iterations (:func:`~bastion.report.plot_coverage_history`);
  reliability and every other kind: the summary table;
* the run's warnings (gradient masking and others), each with the plain-words explanation of its check taken from
  :mod:`bastion.masking`.

Across runs, runs of the same model and data whose threats share a family are merged into one bracket, so an
``evaluate`` run (upper bounds) and a ``certify`` run (lower bounds) of one model together give the bracket that
neither gives alone. A certified radius above a distance found is flagged as a contradiction (one of the two
methods is unsound).

Every number shown in a table carries its exact stored value in a ``data-value`` attribute (``repr`` of the float),
so scripts (and the tests) can read the page back without parsing formatted text.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
import os
import re
import statistics
import tempfile
import time
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bastion.errors import BastionError, InputError, StoreError
from bastion.results import SampleRecord
from bastion.store import RunInfo, Store

__all__ = ["ReportResult", "masking_explanations", "write_report"]

#: Per-sample rows shown in a run's sample table before it is cut (the figures always use every sample).
MAX_SAMPLE_ROWS = 1000

_STATUS_LABELS = {"robust": "verified", "falsified": "falsified", "unknown": "unknown"}
_STATUS_COLOURS = {"robust": "tab:green", "falsified": "tab:red", "unknown": "tab:grey"}

_STYLE = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 2em auto; max-width: 1200px;
       padding: 0 1em; color: #222; line-height: 1.4; }
h1 { font-size: 1.6em; } h2 { font-size: 1.3em; border-bottom: 2px solid #ccc; padding-bottom: .2em; margin-top: 2em; }
h3 { font-size: 1.1em; margin-top: 1.4em; }
table { border-collapse: collapse; margin: .6em 0; font-size: .9em; }
th, td { border: 1px solid #ccc; padding: .2em .5em; vertical-align: top; }
th { background: #f3f3f3; text-align: left; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
td.json, code { font-family: ui-monospace, monospace; font-size: .85em; word-break: break-all; }
figure { margin: .8em 0; } figure img { max-width: 100%; height: auto; border: 1px solid #eee; }
figcaption { font-size: .85em; color: #555; }
.note { color: #555; font-size: .9em; }
.warning { background: #fff4e5; border-left: 4px solid #f0a020; padding: .4em .8em; margin: .5em 0; }
.error { background: #fdecea; border-left: 4px solid #d33; padding: .4em .8em; margin: .5em 0; }
.gallery img { image-rendering: pixelated; width: 72px; height: 72px; border: 1px solid #ddd; }
.gallery td { text-align: center; }
details summary { cursor: pointer; color: #1a5fb4; }
"""


@dataclass
class ReportResult:
    """What :func:`write_report` wrote.

    Attributes:
        index: path of the HTML page.
        runs: ids of the runs in the report, in the order shown.
        figures: number of figures embedded.
        seconds: wall time of the call.
        notes: things the report could not show, in plain words (also written on the page).
    """

    index: Path
    runs: list[int]
    figures: int
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)

    @property
    def paths(self) -> list[Path]:
        """The files written (the page is self-contained: only ``index.html``)."""
        return [self.index]

    def to_dict(self) -> dict[str, Any]:
        return {
            "index": str(self.index),
            "paths": [str(p) for p in self.paths],
            "runs": self.runs,
            "figures": self.figures,
            "seconds": self.seconds,
            "notes": self.notes,
        }


# ----------------------------------------------------------------------------------------------- helpers
def _e(value: object) -> str:
    """HTML-escaped text of ``value`` (quotes too, so it is safe inside attributes)."""
    return html.escape(str(value), quote=True)


def _fmt(value: object, *, pct: bool = False) -> str:
    """A number for reading (6 significant digits, or a percentage); anything else as its text."""
    if value is None:
        return "—"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return str(value)
    if isinstance(value, float) and not math.isfinite(value):
        return "∞" if value > 0 else ("−∞" if value < 0 else "NaN")
    if pct:
        return f"{100 * value:.2f} %"
    if isinstance(value, int):
        return str(value)
    return f"{value:.6g}"


def _num(value: float | int | None, *, pct: bool = False, attrs: str = "") -> str:
    """A numeric table cell with the exact value in ``data-value`` (empty for None)."""
    raw = "" if value is None else repr(value) if isinstance(value, (int, float)) else str(value)
    extra = f" {attrs}" if attrs else ""
    return f'<td class="num" data-value="{_e(raw)}"{extra}>{_e(_fmt(value, pct=pct))}</td>'


def _text(value: object, *, attrs: str = "") -> str:
    extra = f" {attrs}" if attrs else ""
    return f"<td{extra}>{_e('—' if value is None else value)}</td>"


def _flatten(value: Any, prefix: str = "", depth: int = 0) -> list[tuple[str, Any]]:
    """``(dotted key, value)`` pairs of a JSON value: dicts are opened up to three levels, the rest kept whole."""
    if isinstance(value, dict) and depth < 3 and value:
        out: list[tuple[str, Any]] = []
        for k, v in value.items():
            out += _flatten(v, f"{prefix}.{k}" if prefix else str(k), depth + 1)
        return out
    return [(prefix, value)]


def _kv_table(table_id: str, pairs: Iterable[tuple[str, Any]], *, pct_keys: Sequence[str] = ()) -> str:
    """A two-column table of keys and values; numbers get ``data-value``, the rest compact JSON."""
    rows = []
    for key, value in pairs:
        cell_attrs = f'data-key="{_e(key)}"'
        if isinstance(value, bool) or value is None or isinstance(value, str):
            cell = _text(value if not isinstance(value, bool) else str(value).lower(), attrs=cell_attrs)
        elif isinstance(value, (int, float)):
            pct = any(key == p or key.endswith("." + p) or key.startswith(p + ".") for p in pct_keys)
            cell = _num(value, pct=pct and isinstance(value, float), attrs=cell_attrs)
        else:
            text = json.dumps(value, sort_keys=True)
            if len(text) > 400:
                text = text[:397] + "..."
            cell = f'<td class="json" {cell_attrs}>{_e(text)}</td>'
        rows.append(f"<tr><th>{_e(key)}</th>{cell}</tr>")
    return f'<table class="kv" id="{_e(table_id)}">' + "".join(rows) + "</table>"


def _parse_threat(key: str) -> tuple[str, float | None, str]:
    """``(norm, eps, domain suffix)`` of a threat key such as ``linf:0.1`` or ``l2:0.5@[-1.0,1.0]``."""
    base, at, domain = key.partition("@")
    norm, colon, rest = base.partition(":")
    try:
        eps = float(rest) if colon else None
    except ValueError:
        eps = None
    return norm, eps, at + domain


def _family(key: str) -> str:
    """The threat family of a key: its norm and domain without the radius (nested balls share a family)."""
    norm, eps, domain = _parse_threat(key)
    return norm + domain if eps is not None else key


def _median(values: Sequence[float]) -> float | None:
    return float(statistics.median(values)) if values else None


# ----------------------------------------------------------------------------------------------- masking words
def masking_explanations() -> dict[str, str]:
    """The plain-words explanation of each gradient-masking check, read from :mod:`bastion.masking`'s docstring.

    Returns:
        ``{code: explanation}`` for every check the module documents (``random-outputs``, ``zero-gradients``, ...).
    """
    from bastion import masking

    out: dict[str, str] = {}
    codes: list[str] = []
    text: list[str] = []
    for line in (masking.__doc__ or "").splitlines():
        head = re.fullmatch(r"``([\w-]+)``(?:\s*/\s*``([\w-]+)``)*\s*", line)
        if head and not line.startswith(" "):
            for c in codes:
                out[c] = " ".join(text)
            codes, text = re.findall(r"``([\w-]+)``", line), []
        elif codes and line.startswith("    "):
            text.append(line.strip())
        elif codes and line.strip() and not line.startswith(" "):
            for c in codes:
                out[c] = " ".join(text)
            codes, text = [], []
    for c in codes:
        out[c] = " ".join(text)
    # the RST markup reads badly in a page: ``x`` -> x, :class:`a.b.C` -> C
    role = re.compile(r":\w+:`~?([\w.]+)`")
    return {k: role.sub(lambda m: m.group(1).split(".")[-1], v).replace("``", "") for k, v in out.items()}


# ----------------------------------------------------------------------------------------------- figures
class _Figures:
    """Draws matplotlib figures to embedded PNG ``<img>`` tags and counts them."""

    def __init__(self) -> None:
        import matplotlib

        matplotlib.use("Agg", force=False)
        self.count = 0

    def embed_png(self, data: bytes, alt: str, caption: str, fig_id: str) -> str:
        self.count += 1
        src = "data:image/png;base64," + base64.b64encode(data).decode("ascii")
        return (
            f'<figure id="{_e(fig_id)}"><img src="{src}" alt="{_e(alt)}">'
            f"<figcaption>{_e(caption)}</figcaption></figure>"
        )

    def from_figure(self, fig: Any, alt: str, caption: str, fig_id: str) -> str:
        import matplotlib.pyplot as plt

        buf = io.BytesIO()
        try:
            fig.savefig(buf, format="png", dpi=100)
        finally:
            plt.close(fig)
        return self.embed_png(buf.getvalue(), alt, caption, fig_id)

    def from_plot(self, plot: Any, args: tuple[Any, ...], alt: str, caption: str, fig_id: str, **kw: Any) -> str:
        """Run one of :mod:`bastion.report.plots`' functions (which write a file) and embed what it wrote."""
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "figure.png"
            plot(*args, path, **kw)
            return self.embed_png(path.read_bytes(), alt, caption, fig_id)


def _image_png(array: Any, *, diff: bool = False) -> bytes | None:
    """A PNG of one input (C, H, W) / (H, W) with C in 1, 3; ``diff`` draws a signed difference. None otherwise."""
    import matplotlib.image
    import numpy as np

    a = np.asarray(array, dtype=np.float64)
    if a.ndim == 3 and a.shape[0] in (1, 3):
        a = a[0] if a.shape[0] == 1 else np.transpose(a, (1, 2, 0))
    if a.ndim == 3 and a.shape[-1] == 3 and not diff:
        lo, hi = float(a.min()), float(a.max())
        a = (a - lo) / (hi - lo) if hi > lo else np.zeros_like(a)
    elif a.ndim == 3:
        a = a.mean(axis=-1)
    if a.ndim != 2 or min(a.shape) < 2:
        return None
    buf = io.BytesIO()
    if diff:
        m = float(np.abs(a).max()) or 1.0
        matplotlib.image.imsave(buf, a, cmap="RdBu_r", vmin=-m, vmax=m, format="png")
    else:
        matplotlib.image.imsave(buf, a, cmap="gray", format="png")
    return buf.getvalue()


# ----------------------------------------------------------------------------------------------- brackets
@dataclass
class _Bracket:
    """The bracket of one sample over a threat family."""

    index: int
    label: int
    clean_pred: int
    certified: float | None
    found: float | None
    status: str
    attack: str | None


def _brackets(records: Iterable[SampleRecord]) -> dict[str, list[_Bracket]]:
    """Per threat family, the bracket of each correctly classified sample (largest certified, smallest found).

    A ``robust`` status at any radius of the family wins over ``unknown``; ``falsified`` wins over both (an
    adversarial example inside a smaller ball lies inside the larger ones too).
    """
    rank = {"unknown": 0, "robust": 1, "falsified": 2}
    merged: dict[str, dict[int, _Bracket]] = defaultdict(dict)
    for r in records:
        if r.clean_pred != r.label:
            continue
        fam = merged[_family(r.threat)]
        b = fam.get(r.index)
        if b is None:
            fam[r.index] = _Bracket(r.index, r.label, r.clean_pred, r.certified, r.adv_distance, r.status, r.attack)
            continue
        if r.certified is not None and (b.certified is None or r.certified > b.certified):
            b.certified = r.certified
        if r.adv_distance is not None and (b.found is None or r.adv_distance < b.found):
            b.found, b.attack = r.adv_distance, r.attack
        if rank[r.status] > rank[b.status]:
            b.status = r.status
    return {f: sorted(v.values(), key=lambda b: b.index) for f, v in merged.items()}


def _bracket_figure(figs: _Figures, brackets: list[_Bracket], family: str, fig_id: str, title: str) -> str:
    import matplotlib.pyplot as plt
    import numpy as np

    cert = np.array([b.certified if b.certified is not None else np.nan for b in brackets], dtype=float)
    found = np.array([b.found if b.found is not None else np.nan for b in brackets], dtype=float)
    finite_found = found[np.isfinite(found)]
    finite_cert = cert[np.isfinite(cert)]
    top = max([*finite_found.tolist(), *finite_cert.tolist(), 1e-12]) * 1.1
    # sort by the certified radius, then by the distance found: a staircase of lower ends with the gaps above it
    order = np.lexsort((np.where(np.isfinite(found), found, np.inf), np.where(np.isfinite(cert), cert, 0.0)))
    fig, (ax, hx) = plt.subplots(1, 2, figsize=(11, 4))
    # fixed margins: a layout engine (tight or constrained) draws the figure once more only to measure it
    fig.subplots_adjust(left=0.07, right=0.98, bottom=0.13, top=0.86, wspace=0.22)
    xs = np.arange(len(brackets))
    lo = np.where(np.isfinite(cert[order]), cert[order], 0.0)
    hi = np.where(np.isfinite(found[order]), found[order], top)
    ax.vlines(xs, lo, hi, color="tab:grey", alpha=0.5, linewidth=1.5, label="bracket (open top: nothing found)")
    if finite_cert.size:
        ax.plot(xs, np.where(np.isfinite(cert[order]), cert[order], np.nan), "^", color="tab:blue", markersize=3,
                label="certified radius")  # fmt: skip
    if finite_found.size:
        ax.plot(xs, np.where(np.isfinite(found[order]), found[order], np.nan), "v", color="tab:red", markersize=3,
                label="distance found")  # fmt: skip
    ax.set_xlabel("sample (sorted by certified radius)")
    ax.set_ylabel(f"minimal adversarial distance ({family})")
    ax.set_ylim(0, top)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title("bracket [certified, found] per sample", fontsize=10)
    values = [*finite_cert.tolist(), *finite_found.tolist()]
    bins = np.linspace(0, max(values) if values and max(values) > 0 else 1.0, 21)
    if finite_cert.size:
        hx.hist(finite_cert, bins=bins, alpha=0.6, color="tab:blue", label=f"certified radii (n = {finite_cert.size})")
    if finite_found.size:
        hx.hist(finite_found, bins=bins, alpha=0.6, color="tab:red", label=f"distances found (n = {finite_found.size})")
    hx.set_xlabel(f"distance ({family})")
    hx.set_ylabel("samples")
    hx.grid(alpha=0.3)
    hx.legend(fontsize=8)
    hx.set_title("certified radii vs distances found", fontsize=10)
    fig.suptitle(title, fontsize=11)
    return figs.from_figure(
        fig, f"bracket plot and histogram for {family}",
        f"{title}: left, each correctly classified sample's bracket (blue: certified lower bound, red: closest "
        "adversarial example found); right, the distribution of both ends.", fig_id,
    )  # fmt: skip


def _bracket_section(figs: _Figures, prefix: str, brackets: dict[str, list[_Bracket]], title: str) -> str:
    """Stats table, figure and per-sample table of the brackets of each family."""
    parts = []
    stats_rows = []
    for fam, items in brackets.items():
        cert = [b.certified for b in items if b.certified is not None]
        found = [b.found for b in items if b.found is not None and math.isfinite(b.found)]
        both = [(b.certified, b.found) for b in items if b.certified is not None and b.found is not None]
        gaps = [f - c for c, f in both]
        bad = sum(c > f * (1 + 1e-6) + 1e-12 for c, f in both)
        cells = [
            ("correct", len(items)), ("n_certified", len(cert)), ("n_found", len(found)),
            ("median_certified", _median(cert)), ("median_found", _median(found)), ("n_both", len(both)),
            ("median_gap", _median(gaps)), ("contradictions", bad),
        ]  # fmt: skip
        stats_rows.append(
            f'<tr data-family="{_e(fam)}"><th>{_e(fam)}</th>'
            + "".join(_num(v, attrs=f'data-col="{c}"') for c, v in cells)
            + "</tr>"
        )
        if bad:
            parts.append(
                f'<p class="error">{bad} sample(s) of {_e(fam)} have a certified radius above a distance at which '
                "an adversarial example was found: one of the methods is unsound (or the runs are not of the same "
                "model and data).</p>"
            )
    head = (
        "<tr><th>family</th><th>correctly classified</th><th>with certified radius</th><th>with distance found</th>"
        "<th>median certified</th><th>median found</th><th>with both</th><th>median gap</th>"
        "<th>contradictions</th></tr>"
    )
    parts.insert(0, f'<table id="{_e(prefix)}-bracket">{head}{"".join(stats_rows)}</table>')
    for k, (fam, items) in enumerate(brackets.items()):
        if not any(b.certified is not None or b.found is not None for b in items):
            continue
        parts.append(_bracket_figure(figs, items, fam, f"{prefix}-bracket-fig-{k}", f"{title} — {fam}"))
    return "".join(parts)


# ----------------------------------------------------------------------------------------------- the page
class _Builder:
    def __init__(self, store: Store, *, gallery: int, regenerate: bool) -> None:
        self.store = store
        self.all_runs = store.runs()
        self.figs = _Figures()
        self.gallery = gallery
        self.regenerate = regenerate
        self.notes: list[str] = []
        self.explain = masking_explanations()
        self._data: dict[str, Any] = {}  # data spec -> the data set loaded again (or why it could not be)

    # -- per run ------------------------------------------------------------------------------------------------
    def run_section(self, run: RunInfo) -> str:
        rid = f"run-{run.id}"
        records = self.store.records(run.id)
        parts = [
            f'<section class="run" id="{rid}" data-run-id="{run.id}" data-kind="{_e(run.kind)}">',
            f"<h2>Run {run.id}: {_e(run.kind)} <small>({_e(run.status)})</small></h2>",
        ]
        if run.status != "complete":
            parts.append(
                '<p class="warning">This run is not complete (it was interrupted or is still running): the numbers '
                "below cover only the samples stored so far; re-run the same command to resume it.</p>"
            )
        parts.append(self.info_table(run, rid))
        parts.append(self.warnings_block(run, rid))
        if run.kind == "evaluate":
            parts.append(self.cascade_block(run, records, rid))
        if run.kind == "train" or self.store.epochs(run.id):
            parts.append(self.training_block(run, rid))
        history = (run.summary or {}).get("history")
        if isinstance(history, list) and history and all(isinstance(h, list) and len(h) == 3 for h in history):
            parts.append(self.coverage_block(run, history, rid))
        if records:
            parts.append(self.outcomes_block(run, records, rid))
            brackets = _brackets(records)
            if any(b.certified is not None or b.found is not None for items in brackets.values() for b in items):
                parts.append("<h3>Certified vs attacked: the bracket per sample</h3>")
                parts.append(
                    '<p class="note">For each correctly classified sample the minimal adversarial distance lies in '
                    "[certified, found]: a verifier proves the lower end, an attack shows the upper end. Threats of "
                    "one norm and domain form a family (their balls nest), merged here.</p>"
                )
                parts.append(_bracket_section(self.figs, rid, brackets, f"run {run.id} ({run.kind})"))
            parts.append(self.gallery_block(run, records, rid))
            parts.append(self.samples_block(run, records, rid))
        if run.summary:
            parts.append("<h3>Summary</h3>")
            pairs = [(k, v) for k, v in _flatten(run.summary) if k not in ("history", "warnings")]
            parts.append(_kv_table(f"{rid}-summary", pairs))
        parts.append("</section>")
        return "".join(parts)

    def info_table(self, run: RunInfo, rid: str) -> str:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(run.created))
        last = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(run.updated))
        info = [
            ("id", run.id), ("key", run.key), ("kind", run.kind), ("status", run.status), ("created", when),
            ("updated", last), ("seconds", run.seconds), ("n_samples", run.n_samples), ("n_records", run.n_records),
            ("model_fp", run.model_fp), ("data_fp", run.data_fp),
        ]  # fmt: skip
        # lineage: the training runs of this store whose final weights are the model this run used
        trainers = [
            other.id for other in self.all_runs
            if other.id != run.id and (other.summary or {}).get("final_model_fp") == run.model_fp
        ]  # fmt: skip
        if trainers:
            info.append(("trained_by_run", ", ".join(map(str, trainers))))
        out = "<h3>Run and fingerprints</h3>" + _kv_table(f"{rid}-info", info)
        out += "<details><summary>configuration</summary>" + _kv_table(f"{rid}-config", _flatten(run.config))
        out += "</details><details><summary>versions</summary>" + _kv_table(f"{rid}-versions", run.versions.items())
        return out + "</details>"

    def warnings_block(self, run: RunInfo, rid: str) -> str:
        found = self.store.warnings(run.id)
        if not found:
            return f'<p class="note" id="{rid}-warnings" data-count="0">No warnings were stored with this run.</p>'
        rows = []
        for code, message in found:
            meaning = self.explain.get(code, "")
            rows.append(
                f'<div class="warning" data-code="{_e(code)}"><strong>{_e(code)}</strong>: {_e(message)}'
                + (f'<br><span class="note">What this check means: {_e(meaning)}</span>' if meaning else "")
                + "</div>"
            )
        title = "<h3>Warnings</h3>"
        if any(code in self.explain for code, _ in found):
            title += (
                '<p class="note">Signs of gradient masking mean the attacks may have failed for reasons other than '
                "robustness: the robust accuracy shown may be too high.</p>"
            )
        return title + f'<div id="{rid}-warnings" data-count="{len(found)}">' + "".join(rows) + "</div>"

    def cascade_block(self, run: RunInfo, records: list[SampleRecord], rid: str) -> str:
        from bastion.evaluate import EvaluationResult, summarize

        summary = run.summary
        if not summary or "robust_accuracy" not in summary:
            names = run.config.get("attack_names") or sorted({r.attack for r in records if r.attack} - {"clean"})
            threats = run.config.get("threats") or sorted({r.threat for r in records})
            if not records or not names:
                return '<p class="note">No evaluation records yet.</p>'
            res = summarize(records, list(threats), list(names), run.n_samples)
            summary = res.to_dict()
        attacks: list[str] = list(summary["attacks"])
        threats_: list[str] = list(summary["threats"])
        head = "<tr><th>threat</th><th>clean</th>" + "".join(f"<th>after {_e(a)}</th>" for a in attacks)
        head += "<th>worst case</th></tr>"
        rows = []
        for t in threats_:
            cells = _num(summary["clean_accuracy"], pct=True, attrs='data-col="clean"')
            cells += "".join(
                _num(summary["robust_accuracy"][t][a], pct=True, attrs=f'data-col="{_e(a)}"') for a in attacks
            )
            cells += _num(summary["worst_case"][t], pct=True, attrs='data-col="worst"')
            rows.append(f'<tr data-threat="{_e(t)}"><th>{_e(t)}</th>{cells}</tr>')
        out = "<h3>Clean and robust accuracy per attack (the cascade)</h3>"
        out += (
            f'<p class="note">n = {_e(summary["n"])}; attacks run in the order {_e(" → ".join(attacks))}, each on '
            "the points every earlier one failed on; each column is the accuracy still standing after it.</p>"
        )
        out += f'<table id="{rid}-cascade">{head}{"".join(rows)}</table>'
        result = EvaluationResult(
            int(summary["n"]), float(summary["clean_accuracy"]), threats_, attacks,
            {t: dict(v) for t, v in summary["robust_accuracy"].items()}, dict(summary["worst_case"]),
        )  # fmt: skip
        if any(_parse_threat(t)[1] is not None for t in threats_):
            from bastion.report.plots import plot_robust_accuracy

            out += self.figs.from_plot(
                plot_robust_accuracy, (result,), "robust accuracy against eps",
                "Robust accuracy against the radius, after each attack of the cascade and in the worst case.",
                f"{rid}-cascade-fig", title=f"run {run.id}: robust accuracy (n = {result.n})",
            )  # fmt: skip
        return out

    def outcomes_block(self, run: RunInfo, records: list[SampleRecord], rid: str) -> str:
        by_threat: dict[str, list[SampleRecord]] = defaultdict(list)
        for r in records:
            by_threat[r.threat].append(r)
        rows = []
        for t, recs in by_threat.items():
            counts: Counter[str] = Counter(r.status for r in recs)
            secs = [r.seconds for r in recs]
            rows.append(
                f'<tr data-threat="{_e(t)}"><th>{_e(t)}</th>'
                + "".join(_num(counts.get(s, 0), attrs=f'data-col="{s}"') for s in _STATUS_LABELS)
                + _num(len(recs), attrs='data-col="total"')
                + _num(statistics.fmean(secs), attrs='data-col="mean_seconds"')
                + _num(_median(secs), attrs='data-col="median_seconds"')
                + _num(max(secs), attrs='data-col="max_seconds"')
                + "</tr>"
            )
        out = "<h3>Outcomes per sample</h3>"
        out += (
            '<p class="note">verified: proved robust at the threat; falsified: an adversarial example (or a clean '
            "misclassification) is known; unknown: neither (surviving every attack is not a proof). Seconds are "
            "each sample's share of its batch's wall time.</p>"
        )
        out += (
            f'<table id="{rid}-outcomes"><tr><th>threat</th><th>verified</th><th>falsified</th><th>unknown</th>'
            "<th>samples</th><th>mean s</th><th>median s</th><th>max s</th></tr>" + "".join(rows) + "</table>"
        )
        verifying = any(r.status == "robust" or r.certified is not None for r in records)
        if verifying:
            out += self.time_figure(run, by_threat, rid)
        return out

    def time_figure(self, run: RunInfo, by_threat: dict[str, list[SampleRecord]], rid: str) -> str:
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 4))
        fig.subplots_adjust(left=0.13, right=0.97, bottom=0.13, top=0.9)
        for t, recs in by_threat.items():
            for status, label in _STATUS_LABELS.items():
                secs = sorted(r.seconds for r in recs if r.status == status)
                if secs:
                    tag = f"{label} ({t})" if len(by_threat) > 1 else label
                    ax.plot(range(1, len(secs) + 1), secs, marker=".", color=_STATUS_COLOURS[status], label=tag)
        ax.set_xlabel("instances (sorted by time)")
        ax.set_ylabel("seconds per instance")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        ax.set_title(f"run {run.id}: time per instance by outcome", fontsize=10)
        return self.figs.from_figure(
            fig, "time per instance", "Seconds per instance, sorted, for each outcome (a cactus plot).",
            f"{rid}-time-fig",
        )  # fmt: skip

    def training_block(self, run: RunInfo, rid: str) -> str:
        import matplotlib.pyplot as plt

        epochs = self.store.epochs(run.id)
        if not epochs:
            return '<p class="note">No training epochs stored for this run.</p>'
        cols = []
        for e in epochs:
            cols += [k for k in e if k not in cols]
        cols = ["epoch", *[c for c in cols if c != "epoch"]]
        rows = [
            "<tr>"
            + "".join(
                _num(e.get(c), pct=False, attrs=f'data-col="{_e(c)}"')
                if isinstance(e.get(c), (int, float)) or e.get(c) is None
                else _text(e.get(c), attrs=f'data-col="{_e(c)}"')
                for c in cols
            )
            + "</tr>"
            for e in epochs
        ]
        out = "<h3>Training curves</h3>"
        out += f'<table id="{rid}-epochs"><tr>' + "".join(f"<th>{_e(c)}</th>" for c in cols) + "</tr>"
        out += "".join(rows) + "</table>"
        xs = [e["epoch"] for e in epochs]
        fig, (lx, ax) = plt.subplots(1, 2, figsize=(10, 3.8))
        fig.subplots_adjust(left=0.08, right=0.98, bottom=0.14, top=0.88, wspace=0.25)
        if all(isinstance(e.get("loss"), (int, float)) for e in epochs):
            lx.plot(xs, [e["loss"] for e in epochs], marker="o")
        lx.set_xlabel("epoch")
        lx.set_ylabel("training loss")
        lx.grid(alpha=0.3)
        for key, label in (("train_acc", "train"), ("val_clean_acc", "validation clean"),
                           ("val_robust_acc", "validation robust")):  # fmt: skip
            ys = [e.get(key) for e in epochs]
            if any(isinstance(y, (int, float)) for y in ys):
                pts = [(x, 100 * y) for x, y in zip(xs, ys) if isinstance(y, (int, float))]
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=label)
        ax.set_xlabel("epoch")
        ax.set_ylabel("accuracy (%)")
        ax.set_ylim(-2, 102)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.suptitle(f"run {run.id}: training", fontsize=11)
        return out + self.figs.from_figure(
            fig, "training curves", "Training loss (left) and accuracies (right) after each epoch.", f"{rid}-epochs-fig"
        )

    def coverage_block(self, run: RunInfo, history: list[list[float]], rid: str) -> str:
        from bastion.report.plots import plot_coverage_history

        label = str((run.summary or {}).get("criterion") or "coverage")
        return "<h3>Coverage</h3>" + self.figs.from_plot(
            plot_coverage_history, (history,), "coverage during test generation",
            "Coverage after each iteration of the test generation.", f"{rid}-coverage-fig", label=label,
            title=f"run {run.id}: coverage",
        )  # fmt: skip

    def samples_block(self, run: RunInfo, records: list[SampleRecord], rid: str) -> str:
        extra_keys: list[str] = []
        for r in records:
            extra_keys += [k for k in r.extra if k not in extra_keys]
        head = "<tr><th>index</th><th>threat</th><th>label</th><th>prediction</th><th>status</th><th>certified</th>"
        head += "<th>found</th><th>decided by</th><th>seconds</th><th>queries</th>"
        head += "".join(f"<th>{_e(k)}</th>" for k in extra_keys) + "</tr>"
        rows = []
        for r in records[:MAX_SAMPLE_ROWS]:
            cells = (
                _num(r.index, attrs='data-col="index"') + _text(r.threat, attrs='data-col="threat"')
                + _num(r.label, attrs='data-col="label"') + _num(r.clean_pred, attrs='data-col="clean_pred"')
                + _text(r.status, attrs='data-col="status"') + _num(r.certified, attrs='data-col="certified"')
                + _num(r.adv_distance, attrs='data-col="adv_distance"') + _text(r.attack, attrs='data-col="attack"')
                + _num(r.seconds, attrs='data-col="seconds"') + _num(r.queries, attrs='data-col="queries"')
            )  # fmt: skip
            for k in extra_keys:
                v = r.extra.get(k)
                cells += (
                    _num(v, attrs=f'data-col="extra.{_e(k)}"')
                    if v is None or (isinstance(v, (int, float)) and not isinstance(v, bool))
                    else _text(json.dumps(v), attrs=f'data-col="extra.{_e(k)}"')
                )
            rows.append(f"<tr>{cells}</tr>")
        cut = (
            f" (the first {MAX_SAMPLE_ROWS} of {len(records)}; every record is in the store)"
            if len(records) > MAX_SAMPLE_ROWS
            else ""
        )
        return (
            f"<details><summary>per-sample records: {len(records)}{_e(cut)}</summary>"
            f'<table id="{rid}-samples" data-total="{len(records)}">{head}{"".join(rows)}</table></details>'
        )

    # -- the gallery ---------------------------------------------------------------------------------------------
    def gallery_block(self, run: RunInfo, records: list[SampleRecord], rid: str) -> str:
        if self.gallery <= 0:
            return ""
        hits = sorted(
            (r for r in records if r.clean_pred == r.label and r.adv_distance is not None and r.adv_distance > 0),
            key=lambda r: (r.adv_distance, r.index, r.threat),
        )
        chosen: list[SampleRecord] = []
        for r in hits:
            if all(c.index != r.index for c in chosen):
                chosen.append(r)
            if len(chosen) == self.gallery:
                break
        if not chosen:
            return ""
        out = "<h3>Closest adversarial examples</h3>"
        data, why = self._inputs(run)
        x = None if data is None else data.x
        adv: dict[int, tuple[Any, float]] = {}
        regen_note = ""
        if self.regenerate and data is not None:
            adv, regen_note = self._regenerate(run, data, chosen)
        for note in (why, regen_note):
            if note:
                self.notes.append(f"run {run.id}: {note}")
        if not adv:
            out += (
                '<p class="note">The store keeps the distance of each adversarial example found and the attack that '
                "found it, not the adversarial input itself"
                + (
                    "; run the report with regeneration (bastion report --regenerate) to re-run those attacks on "
                    "the stored model and show the adversarial and difference images"
                    if not self.regenerate
                    else ""
                )
                + ".</p>"
            )
        if regen_note:
            out += f'<p class="note">{_e(regen_note)}</p>'
        if why:
            out += f'<p class="note">{_e(why)}</p>'
        head = "<tr><th>index</th><th>threat</th><th>label</th><th>distance found</th><th>decided by</th>"
        rows = []
        images = x is not None
        if images:
            head += "<th>original</th>"
            if adv:
                head += "<th>adversarial (regenerated)</th><th>difference</th><th>regenerated distance</th>"
        head += "</tr>"
        for r in chosen:
            cells = (
                _num(r.index, attrs='data-col="index"') + _text(r.threat, attrs='data-col="threat"')
                + _num(r.label, attrs='data-col="label"') + _num(r.adv_distance, attrs='data-col="adv_distance"')
                + _text(r.attack, attrs='data-col="attack"')
            )  # fmt: skip
            if x is not None:
                cells += self._img_cell(x[r.index], f"original input {r.index}")
                if adv:
                    if r.index in adv:
                        xa, d = adv[r.index]
                        cells += self._img_cell(xa, f"adversarial input {r.index}")
                        cells += self._img_cell(xa - x[r.index], f"difference {r.index}", diff=True)
                        cells += _num(d, attrs='data-col="regenerated_distance"')
                    else:
                        cells += "<td>not regenerated</td><td></td><td></td>"
            rows.append(f"<tr>{cells}</tr>")
        return out + f'<table class="gallery" id="{rid}-gallery">{head}{"".join(rows)}</table>'

    def _img_cell(self, array: Any, alt: str, *, diff: bool = False) -> str:
        png = _image_png(array.detach().cpu().numpy() if hasattr(array, "detach") else array, diff=diff)
        if png is None:
            return "<td>(not an image)</td>"
        self.figs.count += 1
        return f'<td><img src="data:image/png;base64,{base64.b64encode(png).decode("ascii")}" alt="{_e(alt)}"></td>'

    def _inputs(self, run: RunInfo) -> tuple[Any, str]:
        """The run's inputs (loaded again from its data spec and checked against its fingerprint), or a reason."""
        spec = run.config.get("data_spec")
        if not isinstance(spec, str):
            return None, "The run's configuration names no data spec, so its inputs cannot be shown."
        from bastion.data import load_data

        if spec not in self._data:
            try:
                self._data[spec] = load_data(spec)
            except (BastionError, OSError) as exc:
                self._data[spec] = f"The run's data ({spec}) could not be loaded again to show its inputs: {exc}"
        data = self._data[spec]
        if isinstance(data, str):
            return None, data
        if len(data) >= run.n_samples:
            data = data.subset(slice(0, run.n_samples))
        if data.fingerprint() != run.data_fp:
            return None, (
                f"The data loaded from the run's spec ({spec}) no longer matches the data the run used (another "
                "fingerprint), so its inputs are not shown."
            )
        return data, ""

    def _regenerate(
        self, run: RunInfo, data: Any, chosen: list[SampleRecord]
    ) -> tuple[dict[int, tuple[Any, float]], str]:
        """Re-run the attack that found each chosen example on the stored model (fingerprint-checked)."""
        import torch

        from bastion.models import load_model, model_fingerprint

        spec = run.config.get("model_spec")
        if not isinstance(spec, str):
            return {}, "Regeneration: the run's configuration names no model spec."
        try:
            model = load_model(spec, input_shape=data.feature_shape, num_classes=data.num_classes)
        except (BastionError, OSError) as exc:
            return {}, f"Regeneration: the model {spec} could not be loaded again: {exc}"
        if model_fingerprint(model) != run.model_fp:
            return {}, f"Regeneration: the model at {spec} is not the one the run used (another fingerprint)."
        out: dict[int, tuple[Any, float]] = {}
        failed = 0
        for r in chosen:
            attack, threat = _rebuild(run, r)
            if attack is None or threat is None:
                failed += 1
                continue
            xi, yi = data.x[r.index : r.index + 1], torch.tensor([r.label])
            try:
                res = attack(model, xi, yi, threat=threat, seed=0)
            except BastionError:
                failed += 1
                continue
            # success is re-verified by the attack base class, inside the threat set (clipped and re-predicted)
            if bool(res.success[0]):
                out[r.index] = (res.x_adv[0].detach(), float(res.distance[0]))
            else:
                failed += 1
        note = (
            f"Adversarial examples regenerated by re-running the attack that found each one on the stored model "
            f"({len(out)} of {len(chosen)} found again; a fresh run of an attack may land at another distance than "
            "the stored one)."
        )
        return out, note


def _rebuild(run: RunInfo, record: SampleRecord) -> tuple[Any, Any]:
    """The attack object that decided ``record`` (from the run's stored reprs) and its threat, or Nones."""
    import ast

    from bastion.attacks import ATTACKS
    from bastion.threat import LpBall

    norm, eps, domain = _parse_threat(record.threat)
    if eps is None:
        return None, None
    try:
        lo_hi = tuple(float(v) for v in domain[2:-1].split(",")) if domain else (0.0, 1.0)
        threat = LpBall(norm, eps, lo_hi)  # type: ignore[arg-type]
    except (BastionError, ValueError):
        return None, None
    reprs = list(run.config.get("attacks") or [])
    if run.kind == "assess" and run.config.get("minimal") not in (None, "None"):
        reprs.append(run.config["minimal"])
    built = [_from_repr(text, ATTACKS, ast) for text in reprs]
    if not built or any(a is None for a in built):
        return None, threat
    from bastion.evaluate import attack_names

    # the names the run gave its attacks (``pgd``, ``pgd#2``, ...), recomputed the way evaluate and assess do
    by_name = dict(zip(attack_names(built), built))
    minimal = [a for a in built if a.minimal]
    # assess keeps the closest example of any stage, and its minimal attack runs on every correctly classified
    # sample: the distance shown is (nearly always) the minimal attack's, whichever stage decided the sample
    if run.kind == "assess" and minimal:
        return minimal[-1], threat
    return by_name.get(record.attack or ""), threat


def _from_repr(text: str, registry: dict[str, Any], ast: Any) -> Any:
    """An attack rebuilt from its ``repr`` (``Name(key=value, ...)`` with literal values), or None."""
    try:
        node = ast.parse(text, mode="eval").body
        if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Name) or node.args:
            return None
        kwargs = {kw.arg: ast.literal_eval(kw.value) for kw in node.keywords}
    except (SyntaxError, ValueError):
        return None
    for cls in registry.values():
        if cls.__name__ == node.func.id:
            try:
                return cls(**kwargs)
            except (BastionError, TypeError):
                return None
    return None


def _headline(run: RunInfo) -> str:
    """One line for the table of runs: the run's main number, where its summary has a known one."""
    s = run.summary or {}

    def number(key: str) -> float | None:
        v = s.get(key)
        return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else None

    if run.kind == "evaluate" and isinstance(s.get("worst_case"), dict):
        return "worst case " + ", ".join(f"{k} {_fmt(v, pct=True)}" for k, v in s["worst_case"].items())
    if number("certified_accuracy") is not None:
        return f"certified {_fmt(number('certified_accuracy'), pct=True)} at {s.get('threat', '')}"
    if isinstance(s.get("fractions"), dict):
        return ", ".join(f"{_STATUS_LABELS.get(k, k)} {_fmt(v, pct=True)}" for k, v in s["fractions"].items())
    if run.kind == "train" and number("train_acc") is not None:
        return f"train accuracy {_fmt(number('train_acc'), pct=True)} after {s.get('passes', '?')} passes"
    if number("coverage") is not None:
        return f"coverage {_fmt(number('coverage'), pct=True)}"
    if number("pfd") is not None:
        return f"pfd {_fmt(number('pfd'))} (upper {_fmt(number('upper'))})"
    return ""


def _cross_run_brackets(builder: _Builder, runs: list[RunInfo]) -> str:
    """Brackets merged over the runs of one model and data: attacks from one run, certificates from another."""
    groups: dict[tuple[str, str], list[RunInfo]] = defaultdict(list)
    for run in runs:
        groups[(run.model_fp, run.data_fp)].append(run)
    parts = []
    k = 0
    for (model_fp, data_fp), members in groups.items():
        if len(members) < 2:
            continue
        per_run = {run.id: builder.store.records(run.id) for run in members}
        merged = _brackets([r for recs in per_run.values() for r in recs])
        # keep the families where the union knows more than any single run: both ends, from different runs
        useful = {}
        for fam, items in merged.items():
            mine = {rid: [r for r in recs if _family(r.threat) == fam and r.clean_pred == r.label]
                    for rid, recs in per_run.items()}  # fmt: skip
            has_cert = {rid for rid, recs in mine.items() if any(r.certified is not None for r in recs)}
            has_found = {rid for rid, recs in mine.items() if any(r.adv_distance is not None for r in recs)}
            if has_cert and has_found and (has_cert | has_found) != (has_cert & has_found):
                useful[fam] = items
        if not useful:
            continue
        ids = ", ".join(str(run.id) for run in members)
        prefix = f"combined-{k}"
        k += 1
        parts.append(
            f'<div class="combined" id="{prefix}" data-runs="{_e(ids)}" data-model-fp="{_e(model_fp)}">'
            f"<h3>Runs {_e(ids)} (model {_e(model_fp[:12])}…, data {_e(data_fp[:12])}…)</h3>"
            + _bracket_section(builder.figs, prefix, useful, f"runs {ids}")
            + "</div>"
        )
    if not parts:
        return ""
    return (
        '<section id="combined"><h2>Brackets across runs</h2><p class="note">Runs of the same model and data whose '
        "threats share a family: the certified radii of one run and the distances found by another bracket the same "
        "samples.</p>" + "".join(parts) + "</section>"
    )


def write_report(
    store: Store | str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    runs: Sequence[int | str] | None = None,
    gallery: int = 8,
    regenerate: bool = False,
    title: str | None = None,
) -> ReportResult:
    """Write the HTML report of a store's runs to ``out/index.html`` (one self-contained file).

    Args:
        store: a :class:`~bastion.store.Store` or the path of an existing store file (a missing file is an error,
            never created).
        out: the output folder (created if needed).
        runs: ids or keys of the runs to show, in that order; ``None`` for every run (newest first).
        gallery: closest adversarial examples shown per run (0 for none).
        regenerate: re-run the attack behind each gallery example on the run's model (loaded from its stored
            model spec, used only if its fingerprint matches the run's) to show adversarial and difference images.
            Off by default: a model spec may name Python code (``package.module:factory``), which loading runs.
        title: the page's title.

    Returns:
        A :class:`ReportResult` with the page's path.

    Raises:
        InputError: the store file does not exist, holds no runs, a run asked for is not in it, ``gallery`` is
            negative, or ``out`` cannot be written.
        StoreError: the file is not a readable bastion store.
    """
    started = time.perf_counter()
    if isinstance(gallery, bool) or not isinstance(gallery, int) or gallery < 0:
        raise InputError(f"gallery must be a non-negative integer, got {gallery!r}")
    if isinstance(store, Store):
        db, own = store, False
    elif isinstance(store, (str, os.PathLike)):
        path = Path(store).expanduser()
        if not path.is_file():
            raise InputError(f"no result store at {str(path)!r}; give the file written with --store")
        db, own = Store(path), True
    else:
        raise InputError(f"store must be a Store or a path, got {type(store).__name__}")
    try:
        everything = db.runs()
        if not everything:
            raise InputError(f"the result store {str(db.path)!r} holds no runs; run a command with --store first")
        if runs is None:
            chosen = everything
        else:
            if isinstance(runs, (str, int)):
                runs = [runs]
            chosen = []
            for r in runs:
                try:
                    chosen.append(db.run(r))
                except StoreError:
                    known = ", ".join(str(x.id) for x in everything)
                    raise InputError(f"no run {r!r} in {str(db.path)!r}; its runs are {known}") from None
        folder = Path(out).expanduser()
        if folder.exists() and not folder.is_dir():
            raise InputError(f"--out {str(folder)!r} is a file; give a folder for the report")
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise InputError(f"cannot create the report folder {str(folder)!r}: {exc}") from None
        builder = _Builder(db, gallery=gallery, regenerate=regenerate)
        sections = [builder.run_section(run) for run in chosen]
        combined = _cross_run_brackets(builder, chosen)
        page_title = title or f"bastion robustness report: {db.path.name}"
        toc_rows = "".join(
            f'<tr data-run-id="{run.id}"><td><a href="#run-{run.id}">{run.id}</a></td><td>{_e(run.kind)}</td>'
            f"<td>{_e(run.status)}</td>{_num(run.n_samples)}{_num(run.n_records)}<td>{_e(_headline(run))}</td></tr>"
            for run in chosen
        )
        generated = time.strftime("%Y-%m-%d %H:%M:%S %Z")
        page = (
            '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            '<meta name="viewport" content="width=device-width, initial-scale=1">'
            f"<title>{_e(page_title)}</title><style>{_STYLE}</style></head><body>"
            f"<h1>{_e(page_title)}</h1>"
            f'<p class="note">Store <code>{_e(db.path)}</code>, {len(chosen)} of {len(everything)} run(s), generated '
            f"{_e(generated)} by bastion.</p>"
            '<table id="runs"><tr><th>run</th><th>kind</th><th>status</th><th>samples</th><th>records</th>'
            f"<th>headline</th></tr>{toc_rows}</table>" + combined + "".join(sections) + "</body></html>\n"
        )
        index = folder / "index.html"
        try:
            tmp = index.with_name(index.name + ".tmp")
            tmp.write_text(page, encoding="utf-8")
            os.replace(tmp, index)
        except OSError as exc:
            raise InputError(f"cannot write the report to {str(index)!r}: {exc}") from None
        return ReportResult(
            index=index, runs=[r.id for r in chosen], figures=builder.figs.count,
            seconds=time.perf_counter() - started, notes=builder.notes,
        )  # fmt: skip
    finally:
        if own:
            db.close()
