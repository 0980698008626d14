"""Evaluation results as a terminal table, JSON and a chart (score per language per mixture).

The results dict is what :func:`mlmix.eval.evaluate` returns: ``{"languages": [...], "models": [...],
"loss": {model: ...}, "fidelity": {model: ...}, "judge": {"baseline": name, "pairs": {model: ...}}}``; any
section may be missing.
"""

from __future__ import annotations

import io
import json
import math
from typing import Any, Mapping, Optional

__all__ = ["format_table", "to_json", "chart", "html_section", "METRICS"]

#: metric -> (section, value key, interval key, axis label)
METRICS = {
    "judge": ("judge", "score", "score_ci", "side-by-side score vs baseline (wins + ties/2) / n"),
    "loss": ("loss", "loss", "loss_ci", "held-out loss (nats per token; lower is better)"),
    "ppl": ("loss", "ppl", "ppl_ci", "held-out perplexity (lower is better)"),
    "fidelity": ("fidelity", "share", "share_ci", "responses in the instruction's language"),
}


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


def _json_safe(obj: Any) -> Any:
    """NaN and infinities -> None, so the file is strict JSON (``json.loads`` in any language reads it)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, Mapping):
        return {str(k): _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    if hasattr(obj, "item") and callable(obj.item):  # numpy scalars
        return _json_safe(obj.item())
    return obj


def to_json(results: Mapping, *, indent: Optional[int] = 2) -> str:
    """The results as strict JSON (NaN -> null)."""
    return json.dumps(_json_safe(results), indent=indent, ensure_ascii=False, allow_nan=False)


def _series(results: Mapping, metric: str) -> dict[str, Mapping[str, Mapping]]:
    section, _, _, _ = METRICS[metric]
    data = results.get(section) or {}
    if section == "judge":
        data = data.get("pairs", {})
    return {model: res.get("languages", {}) for model, res in data.items()}


def _fmt(v, spec: str) -> str:
    return format(v, spec) if _finite(v) else "-"


def format_table(results: Mapping) -> str:
    """A plain-text table: one row per language, per model its loss (ppl), fidelity and judge score, with
    intervals and the counts that qualify them (invalid verdicts, empty responses, skipped records), then what
    was not measured and how to add it (``results["absent"]``, e.g. the judge when none was given)."""
    langs = list(results.get("languages", []))
    models = list(results.get("models", []))
    lines: list[str] = []
    judge = results.get("judge") or {}
    for model in models:
        cols = []
        loss = (results.get("loss") or {}).get(model, {}).get("languages", {})
        fid = (results.get("fidelity") or {}).get(model, {}).get("languages", {})
        sbs = judge.get("pairs", {}).get(model, {}).get("languages", {})
        if loss:
            cols.append(("loss [95% CI]", lambda l, r=loss: _loss_cell(r.get(l))))
            cols.append(("ppl", lambda l, r=loss: _fmt((r.get(l) or {}).get("ppl"), ".2f")))
        if fid:
            cols.append(("in-language", lambda l, r=fid: _fid_cell(r.get(l))))
        if sbs:
            cols.append((f"vs {judge.get('baseline')} [CI]", lambda l, r=sbs: _judge_cell(r.get(l))))
        if not cols:
            continue
        lines.append(f"== {model}")
        header = ["lang"] + [c[0] for c in cols]
        rows = [[lang] + [fn(lang) for _, fn in cols] for lang in langs]
        widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
        lines.append("  ".join(h.ljust(w) for h, w in zip(header, widths)).rstrip())
        lines.extend("  ".join(str(x).ljust(w) for x, w in zip(row, widths)).rstrip() for row in rows)
        lines.append("")
    text = "\n".join(lines).rstrip() + "\n" if lines else "(no results)\n"
    for what, why in (results.get("absent") or {}).items():
        import textwrap

        text += "\n" + textwrap.fill(f"not measured: {what}: {why}", width=110, subsequent_indent="  ",
                                     break_on_hyphens=False, break_long_words=False) + "\n"
    return text


def _loss_cell(r: Optional[Mapping]) -> str:
    if not r or not r.get("n"):
        skipped = (r or {}).get("skipped", 0)
        return f"no examples{f' ({skipped} skipped)' if skipped else ''}"
    lo, hi = r["loss_ci"]
    extra = f" ({r['skipped']} skipped)" if r.get("skipped") else ""
    return f"{_fmt(r['loss'], '.3f')} [{_fmt(lo, '.3f')}, {_fmt(hi, '.3f')}] n={r['n']}{extra}"


def _fid_cell(r: Optional[Mapping]) -> str:
    if not r or not r.get("n"):
        return "no responses"
    if r.get("unsupported"):
        return "langid n/a"
    extra = f", {r['empty']} empty" if r.get("empty") else ""
    return f"{r['in_language']}/{r['n']} ({_fmt(100 * r['share'], '.0f')}%){extra}"


def _judge_cell(r: Optional[Mapping]) -> str:
    if not r or not r.get("n"):
        return "no items"
    lo, hi = r["score_ci"]
    cell = f"{_fmt(r['score'], '.2f')} [{_fmt(lo, '.2f')}, {_fmt(hi, '.2f')}] {r['wins']}W {r['ties']}T {r['losses']}L"
    if r.get("invalid"):
        cell += f" {r['invalid']} invalid (valid-only {_fmt(r['score_valid'], '.2f')})"
    return cell


def chart(results: Mapping, metric: str = "judge", *, fmt: str = "svg", title: Optional[str] = None):
    """Grouped bars: one group per language, one bar per model (mixture), interval whiskers.

    Args:
        metric: ``"judge"`` (score against the baseline; a dashed line marks 0.5, parity), ``"loss"``,
            ``"ppl"`` or ``"fidelity"``.
        fmt: ``"svg"`` returns the SVG document as a str (to inline in an HTML report); ``"png"`` returns bytes.
    Languages without a value for a model get no bar (and the table says why). Rendered with matplotlib's Agg
    backend; the SVG carries no date and a fixed id salt, so the same results give the same bytes.
    """
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {sorted(METRICS)}, got {metric!r}")
    if fmt not in ("svg", "png"):
        raise ValueError(f"fmt must be 'svg' or 'png', got {fmt!r}")
    from .._deps import require

    require("matplotlib", "evaluation charts")
    import matplotlib

    from matplotlib.figure import Figure
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    _, value_key, ci_key, ylabel = METRICS[metric]
    series = _series(results, metric)
    langs = list(results.get("languages", []))
    fig = Figure(figsize=(min(16.0, max(6.0, 0.45 * len(langs) * max(1, len(series)) + 3)), 3.6), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    n = max(1, len(series))
    width = 0.8 / n
    for k, (model, per_lang) in enumerate(series.items()):
        xs, ys, lo_err, hi_err = [], [], [], []
        for i, lang in enumerate(langs):
            r = per_lang.get(lang) or {}
            v = r.get(value_key)
            if not _finite(v) or not r.get("n"):
                continue
            lo, hi = (r.get(ci_key) or [math.nan, math.nan])
            xs.append(i - 0.4 + width * (k + 0.5))
            ys.append(v)
            lo_err.append(v - lo if _finite(lo) else 0.0)
            hi_err.append(hi - v if _finite(hi) else 0.0)
        ax.bar(xs, ys, width=width * 0.92, label=model, yerr=[lo_err, hi_err], capsize=2, error_kw={"lw": 0.8})
    if metric == "judge":
        ax.axhline(0.5, color="#555555", lw=0.8, ls="--")
        ax.set_ylim(0, 1)
    elif metric == "fidelity":
        ax.set_ylim(0, 1.02)
    ax.set_xlim(-0.6, len(langs) - 0.4)
    ax.set_xticks(range(len(langs)))
    ax.set_xticklabels(langs)
    ax.set_ylabel(ylabel, fontsize=8)
    baseline = (results.get("judge") or {}).get("baseline")
    ax.set_title(title or {"judge": f"Side-by-side against {baseline}", "loss": "Held-out loss per language",
                           "ppl": "Held-out perplexity per language",
                           "fidelity": "Language fidelity per language"}[metric], fontsize=10)
    if series:
        ax.legend(fontsize=8, frameon=False, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    ax.spines[["top", "right"]].set_visible(False)
    fig.tight_layout()
    buf = io.BytesIO()
    with matplotlib.rc_context({"svg.hashsalt": "mlmix", "svg.fonttype": "none"}):
        fig.savefig(buf, format=fmt, metadata={"Date": None} if fmt == "svg" else {"Software": None})
    data = buf.getvalue()
    return data.decode("utf-8") if fmt == "svg" else data


def html_section(results: Mapping) -> str:
    """An HTML fragment (heading, inline SVG charts with captions, the text table) for a report page, e.g.
    ``mlmix.report.render_report(build_dir, extra_sections=html_section(results))``."""
    import html
    import re

    parts = ["<h2>Evaluation per language</h2>"]
    stats = results.get("stats") or {}
    level = f"{100 * (1 - stats.get('alpha', 0.05)):.0f}%"
    captions = {
        "judge": f"Score of each model against {(results.get('judge') or {}).get('baseline')}: judged in both "
                 f"orders; a win needs the same preference in both, a flip is a tie; (wins + ties/2) / n with "
                 f"invalid verdicts counted as ties. Whiskers: {level} "
                 f"{'Wilson' if stats.get('judge_ci', 'wilson') == 'wilson' else 'bootstrap'} intervals.",
        "loss": f"Mean loss per scored token on the held-out set. Whiskers: {level} percentile bootstrap over "
                f"examples (B = {stats.get('n_bootstrap')}).",
        "fidelity": f"Share of responses in the instruction's language (empty responses count as failures). "
                    f"Whiskers: {level} Wilson intervals.",
    }
    for metric, section in (("judge", "judge"), ("loss", "loss"), ("fidelity", "fidelity")):
        if results.get(section):
            svg = chart(results, metric)
            svg = svg[svg.index("<svg"):]  # inline: no XML declaration or doctype
            svg = re.sub(r'width="[0-9.]+pt" height="[0-9.]+pt"', 'style="max-width:100%;height:auto"', svg, count=1)
            parts.append(f"<figure>{svg}<figcaption>{html.escape(captions[metric])}</figcaption></figure>")
    parts.append(f'<pre class="sample">{html.escape(format_table(results))}</pre>')
    return "\n".join(parts)
