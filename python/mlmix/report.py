"""The build report: one self-contained HTML page with inline SVG charts (no scripts, no network).

It shows, per language: examples and tokens as read, after dedup and after mixing; the mixture against
the recipe's target; length distributions; duplicates removed; packing efficiency; and a few decoded
packed examples with the trained tokens highlighted. Charts are drawn as SVG by hand (a few hundred
lines, no plotting dependency), so the page is crisp at any zoom and weighs a few tens of KB.
"""

from __future__ import annotations

import html
import json
import math
import os
from typing import Mapping, Sequence

import numpy as np

__all__ = ["render_report", "render_comparison", "write_report", "find_build_dir", "inspect_store", "format_inspection",
           "format_params"]

# Okabe-Ito palette: distinguishable with the common colour-vision deficiencies
PALETTE = ["#0072B2", "#E69F00", "#009E73", "#CC79A7", "#56B4E9", "#D55E00", "#F0E442", "#000000"]
_FONT = "system-ui, -apple-system, 'Segoe UI', Roboto, 'Noto Sans', sans-serif"


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("mlmix")
    except Exception:  # not installed as a distribution (a source checkout on sys.path)
        return "dev"


def find_build_dir(path: str | os.PathLike) -> str:
    """The build output directory for ``path``: the directory itself or the parent of its ``store/``."""
    p = os.path.abspath(os.fspath(path))
    if os.path.isfile(os.path.join(p, "build.json")):
        return p
    parent = os.path.dirname(p)
    if os.path.basename(p) == "store" and os.path.isfile(os.path.join(parent, "build.json")):
        return parent
    if not os.path.exists(p):
        raise FileNotFoundError(f"store {os.fspath(path)!r} does not exist")
    raise ValueError(
        f"{os.fspath(path)!r} is not the output of mlmix build (no build.json in it or its parent); "
        "point at the directory that 'output' named in the config"
    )


# ---- SVG primitives ------------------------------------------------------------------------------
def esc(s) -> str:
    """``str(s)`` escaped for HTML text and attribute values."""
    return html.escape(str(s), quote=True)


def _fmt(v: float) -> str:
    a = abs(v)
    if a >= 1e9:
        return f"{v / 1e9:.1f}G"
    if a >= 1e6:
        return f"{v / 1e6:.1f}M"
    if a >= 1e4:
        return f"{v / 1e3:.0f}k"
    if a >= 1e3:
        return f"{v / 1e3:.1f}k"
    if a == int(a):
        return f"{int(v)}"
    return f"{v:.2f}".rstrip("0")  # 2.5, 0.25


MIN_BAR_PX = 3.0  # a non-zero value is drawn at least this tall (or wide): one example must not vanish


def _nice_ticks(vmax: float, n: int = 5, *, integer: bool = False) -> list[float]:
    """Round tick values from 0 to at least ``vmax``, about ``n`` steps. ``integer``: for counts, every
    tick is a whole number (steps of 1, 2, 5 x 10^k; never 2.5 or 0.5)."""
    if vmax <= 0:
        return [0.0, 1.0]
    raw = vmax / n
    if integer and raw < 1:
        raw = 1.0
    mag = 10 ** math.floor(math.log10(raw))
    steps = (1, 2, 5, 10) if integer else (1, 2, 2.5, 5, 10)
    step = next(m * mag for m in steps if m * mag >= raw * (1 - 1e-12))
    if integer:
        step = max(1, round(step))
    top = math.ceil(vmax / step - 1e-9) * step
    return [i * step for i in range(int(round(top / step)) + 1)]


def _bar_px(v: float, scale_max: float, extent: float) -> float:
    """Pixels for value ``v`` on an axis of ``extent`` pixels ending at ``scale_max``; a non-zero value gets
    at least MIN_BAR_PX, so that a bar of one example stays visible beside one of thousands."""
    if v <= 0 or scale_max <= 0:
        return 0.0
    return max(extent * v / scale_max, MIN_BAR_PX)


def _legend(items: Sequence[tuple[str, str]], x: float, y: float) -> str:
    out = []
    for name, color in items:
        out.append(f'<rect x="{x:.1f}" y="{y - 9:.1f}" width="11" height="11" rx="2" fill="{color}"/>'
                   f'<text x="{x + 15:.1f}" y="{y:.1f}" class="lg">{esc(name)}</text>')
        x += 22 + 7.2 * len(name)
    return "".join(out)


def bar_chart(categories: Sequence[str], series: Sequence[tuple[str, Sequence[float]]], *, title: str,
              ylabel: str = "", width: int = 820, height: int = 300, markers: Sequence[float] | None = None,
              marker_label: str = "target", css_class: str = "chart", counts: bool = False,
              value_format: str = ",.0f") -> str:
    """Grouped vertical bars: one group per category, one bar per series; optional target markers.

    ``counts``: the values are counts (examples, tokens), so the axis has whole-number ticks. A non-zero bar
    is at least MIN_BAR_PX tall. ``value_format`` formats the values in the bars' tooltips."""
    left, right, top, bottom = 58, 12, 40, 46
    pw, ph = width - left - right, height - top - bottom
    vmax = max([max(list(v) or [0]) for _, v in series] + [max(markers) if markers else 0] + [1e-9])
    ticks = _nice_ticks(vmax, integer=counts)
    ymax = ticks[-1]
    n_cat, n_ser = max(len(categories), 1), max(len(series), 1)
    group = pw / n_cat
    bw = min(group * 0.8 / n_ser, 38)
    parts = [f'<svg class="{css_class}" role="img" aria-label="{esc(title)}" xmlns="http://www.w3.org/2000/svg" '
             f'viewBox="0 0 {width} {height}" width="{width}" height="{height}">',
             f'<title>{esc(title)}</title>',
             f'<text x="{left}" y="18" class="tt">{esc(title)}</text>']
    for t in ticks:
        y = top + ph - ph * t / ymax
        parts.append(f'<line x1="{left}" x2="{left + pw}" y1="{y:.1f}" y2="{y:.1f}" class="grid"/>'
                     f'<text x="{left - 6}" y="{y + 4:.1f}" class="ax tick" text-anchor="end">{_fmt(t)}</text>')
    if ylabel:
        parts.append(f'<text transform="translate(13,{top + ph / 2:.0f}) rotate(-90)" class="ax" '
                     f'text-anchor="middle">{esc(ylabel)}</text>')
    for ci, cat in enumerate(categories):
        gx = left + ci * group + (group - bw * n_ser) / 2
        for si, (name, values) in enumerate(series):
            v = float(values[ci]) if ci < len(values) else 0.0
            h = _bar_px(v, ymax, ph)
            x = gx + si * bw
            parts.append(f'<rect class="bar" x="{x:.1f}" y="{top + ph - h:.1f}" width="{max(bw - 1.5, 1):.1f}" '
                         f'height="{h:.1f}" fill="{PALETTE[si % len(PALETTE)]}" data-value="{v:g}"><title>{esc(cat)} · '
                         f'{esc(name)}: {format(v, value_format)}</title></rect>')
        if markers is not None and ci < len(markers):
            y = top + ph - ph * markers[ci] / ymax
            parts.append(f'<line x1="{gx - 3:.1f}" x2="{gx + bw * n_ser + 3:.1f}" y1="{y:.1f}" y2="{y:.1f}" '
                         f'class="marker"><title>{esc(cat)} · {marker_label}: {markers[ci]:,.1f}</title></line>')
        parts.append(f'<text x="{left + ci * group + group / 2:.1f}" y="{top + ph + 16}" class="ax" '
                     f'text-anchor="middle">{esc(cat)}</text>')
    parts.append(f'<line x1="{left}" x2="{left + pw}" y1="{top + ph}" y2="{top + ph}" class="axis"/>')
    legend = [(name, PALETTE[i % len(PALETTE)]) for i, (name, _) in enumerate(series)]
    lg = _legend(legend, left, height - 8)
    if markers is not None:
        lx = left + sum(22 + 7.2 * len(n) for n, _ in legend)
        lg += (f'<line x1="{lx:.1f}" x2="{lx + 14:.1f}" y1="{height - 12}" y2="{height - 12}" class="marker"/>'
               f'<text x="{lx + 18:.1f}" y="{height - 8}" class="lg">{esc(marker_label)}</text>')
    parts.append(lg)
    parts.append("</svg>")
    return "".join(parts)


def stacked_hbar(categories: Sequence[str], series: Sequence[tuple[str, Sequence[float]]], *, title: str,
                 width: int = 820, row: int = 22, css_class: str = "chart", total_suffix: str = "",
                 value_format: str = ",.0f") -> str:
    """Horizontal stacked bars, one row per category (e.g. duplicates removed: exact + near). A non-zero
    segment is at least MIN_BAR_PX wide."""
    left, right, top = 58, 70, 32
    height = top + row * max(len(categories), 1) + 34
    pw = width - left - right
    totals = [sum(float(v[i]) for _, v in series) for i in range(len(categories))]
    vmax = max(totals + [1e-9])
    parts = [f'<svg class="{css_class}" role="img" aria-label="{esc(title)}" xmlns="http://www.w3.org/2000/svg" '
             f'viewBox="0 0 {width} {height}" width="{width}" height="{height}">',
             f'<title>{esc(title)}</title><text x="{left}" y="18" class="tt">{esc(title)}</text>']
    for ci, cat in enumerate(categories):
        y = top + ci * row
        x = left
        parts.append(f'<text x="{left - 6}" y="{y + row * 0.65:.1f}" class="ax" text-anchor="end">{esc(cat)}</text>')
        for si, (name, values) in enumerate(series):
            v = float(values[ci])
            w = _bar_px(v, vmax, pw)
            if w > 0:
                parts.append(f'<rect class="bar" x="{x:.1f}" y="{y + 3}" width="{w:.1f}" height="{row - 6}" '
                             f'fill="{PALETTE[si % len(PALETTE)]}" data-value="{v:g}"><title>{esc(cat)} · {esc(name)}: '
                             f'{format(v, value_format)}</title></rect>')
            x += w
        parts.append(f'<text x="{x + 5:.1f}" y="{y + row * 0.65:.1f}" class="ax">{format(totals[ci], value_format)}'
                     f'{total_suffix}</text>')
    parts.append(_legend([(n, PALETTE[i % len(PALETTE)]) for i, (n, _) in enumerate(series)], left, height - 8))
    parts.append("</svg>")
    return "".join(parts)


def box_plot(stats: Mapping[str, Mapping[str, float]], *, title: str, width: int = 820, row: int = 24,
             unit: str = "tokens", css_class: str = "chart") -> str:
    """One horizontal box per language: whiskers p5-p95, box p25-p75, a tick at the median, a dot at the mean."""
    langs = list(stats)
    left, right, top = 58, 16, 32
    height = top + row * max(len(langs), 1) + 40
    pw = width - left - right
    vmax = max([s["p95"] for s in stats.values()] + [s["mean"] for s in stats.values()] + [1.0])
    ticks = _nice_ticks(vmax, integer=True)  # lengths in tokens
    xmax = ticks[-1]

    def X(v: float) -> float:
        return left + pw * v / xmax

    parts = [f'<svg class="{css_class}" role="img" aria-label="{esc(title)}" xmlns="http://www.w3.org/2000/svg" '
             f'viewBox="0 0 {width} {height}" width="{width}" height="{height}">',
             f'<title>{esc(title)}</title><text x="{left}" y="18" class="tt">{esc(title)}</text>']
    base = top + row * len(langs)
    for t in ticks:
        parts.append(f'<line x1="{X(t):.1f}" x2="{X(t):.1f}" y1="{top}" y2="{base}" class="grid"/>'
                     f'<text x="{X(t):.1f}" y="{base + 15}" class="ax tick" text-anchor="middle">{_fmt(t)}</text>')
    parts.append(f'<text x="{left + pw / 2:.0f}" y="{base + 32}" class="ax" text-anchor="middle">{esc(unit)} per '
                 f'example (whiskers 5th-95th percentile, box 25th-75th, line median, dot mean)</text>')
    for i, lang in enumerate(langs):
        s = stats[lang]
        y = top + i * row + row / 2
        color = PALETTE[i % len(PALETTE)]
        tip = (f"{lang}: n={s['n']:,} mean={s['mean']:.0f} p5={s['p5']:.0f} p25={s['p25']:.0f} "
               f"median={s['p50']:.0f} p75={s['p75']:.0f} p95={s['p95']:.0f} max={s['max']:,}")
        parts.append(f'<g class="box"><title>{esc(tip)}</title>'
                     f'<text x="{left - 6}" y="{y + 4:.1f}" class="ax" text-anchor="end">{esc(lang)}</text>'
                     f'<line x1="{X(s["p5"]):.1f}" x2="{X(s["p95"]):.1f}" y1="{y:.1f}" y2="{y:.1f}" stroke="{color}"/>'
                     f'<rect x="{X(s["p25"]):.1f}" y="{y - row * 0.3:.1f}" width="{max(X(s["p75"]) - X(s["p25"]), 1):.1f}" '
                     f'height="{row * 0.6:.1f}" fill="{color}" fill-opacity="0.35" stroke="{color}"/>'
                     f'<line x1="{X(s["p50"]):.1f}" x2="{X(s["p50"]):.1f}" y1="{y - row * 0.3:.1f}" '
                     f'y2="{y + row * 0.3:.1f}" stroke="{color}" stroke-width="2.5"/>'
                     f'<circle cx="{X(s["mean"]):.1f}" cy="{y:.1f}" r="2.6" fill="#222"/></g>')
    parts.append("</svg>")
    return "".join(parts)


def histogram(values: np.ndarray, *, title: str, xlabel: str, bins: int = 40, width: int = 820, height: int = 220,
              css_class: str = "chart", color: str = PALETTE[2], xmax: float | None = None,
              integer_x: bool = False) -> str:
    """Counts of ``values`` in ``bins`` equal bins from 0: whole-number count ticks, a non-zero bin at least
    MIN_BAR_PX tall; ``integer_x``: the values are whole numbers (e.g. tokens), so are the x ticks."""
    values = np.asarray(values, dtype=np.float64)
    hi = xmax if xmax is not None else (float(values.max()) if values.size else 1.0)
    counts, edges = np.histogram(values, bins=bins, range=(0.0, max(hi, 1e-9)))
    left, right, top, bottom = 58, 12, 32, 40
    pw, ph = width - left - right, height - top - bottom
    ticks = _nice_ticks(float(counts.max()) if counts.size else 1.0, 4, integer=True)
    ymax = ticks[-1] or 1
    parts = [f'<svg class="{css_class}" role="img" aria-label="{esc(title)}" xmlns="http://www.w3.org/2000/svg" '
             f'viewBox="0 0 {width} {height}" width="{width}" height="{height}">',
             f'<title>{esc(title)}</title><text x="{left}" y="18" class="tt">{esc(title)}</text>']
    for t in ticks:
        y = top + ph - ph * t / ymax
        parts.append(f'<line x1="{left}" x2="{left + pw}" y1="{y:.1f}" y2="{y:.1f}" class="grid"/>'
                     f'<text x="{left - 6}" y="{y + 4:.1f}" class="ax tick" text-anchor="end">{_fmt(t)}</text>')
    bw = pw / len(counts)
    for i, c in enumerate(counts):
        if c <= 0:
            continue
        h = _bar_px(float(c), ymax, ph)
        parts.append(f'<rect class="bar" x="{left + i * bw:.1f}" y="{top + ph - h:.1f}" width="{max(bw - 1, 0.5):.1f}" '
                     f'height="{h:.1f}" fill="{color}" data-value="{int(c)}"><title>{edges[i]:.3g}-{edges[i + 1]:.3g}: '
                     f'{int(c):,}</title></rect>')
    for t in _nice_ticks(float(edges[-1]), 5, integer=integer_x):
        if t <= edges[-1] * 1.0001:
            x = left + pw * t / edges[-1]
            parts.append(f'<text x="{x:.1f}" y="{top + ph + 15}" class="ax tick" text-anchor="middle">{_fmt(t)}</text>')
    parts.append(f'<line x1="{left}" x2="{left + pw}" y1="{top + ph}" y2="{top + ph}" class="axis"/>'
                 f'<text x="{left + pw / 2:.0f}" y="{height - 6}" class="ax" text-anchor="middle">{esc(xlabel)}</text>')
    parts.append("</svg>")
    return "".join(parts)


def line_chart(series: Mapping[str, Sequence[float]], *, title: str, xlabel: str = "", ylabel: str = "",
               width: int = 820, height: int = 280, css_class: str = "chart") -> str:
    """One polyline per series over its index (e.g. a loss per training step)."""
    left, right, top, bottom = 58, 12, 40, 52
    pw, ph = width - left - right, height - top - bottom
    all_v = [float(v) for vs in series.values() for v in vs if math.isfinite(v)] or [0.0, 1.0]
    lo, hi = min(0.0, min(all_v)), max(all_v)
    ticks = _nice_ticks(hi - lo)
    ymax = lo + ticks[-1]
    n = max((len(v) for v in series.values()), default=1)
    parts = [f'<svg class="{css_class}" role="img" aria-label="{esc(title)}" xmlns="http://www.w3.org/2000/svg" '
             f'viewBox="0 0 {width} {height}" width="{width}" height="{height}">',
             f'<title>{esc(title)}</title><text x="{left}" y="18" class="tt">{esc(title)}</text>']
    for t in ticks:
        y = top + ph - ph * t / (ymax - lo or 1)
        parts.append(f'<line x1="{left}" x2="{left + pw}" y1="{y:.1f}" y2="{y:.1f}" class="grid"/>'
                     f'<text x="{left - 6}" y="{y + 4:.1f}" class="ax tick" text-anchor="end">{_fmt(lo + t)}</text>')
    for t in _nice_ticks(n, 6, integer=True):  # the x axis counts points (e.g. steps)
        if t <= n:
            x = left + pw * t / max(n - 1, 1)
            if x <= left + pw + 0.5:
                parts.append(f'<text x="{x:.1f}" y="{top + ph + 15}" class="ax tick" text-anchor="middle">{_fmt(t)}'
                             '</text>')
    for i, (name, values) in enumerate(series.items()):
        pts = " ".join(f"{left + pw * j / max(n - 1, 1):.1f},{top + ph - ph * (float(v) - lo) / (ymax - lo or 1):.1f}"
                       for j, v in enumerate(values) if math.isfinite(v))
        parts.append(f'<polyline class="line" fill="none" stroke="{PALETTE[i % len(PALETTE)]}" stroke-width="2" '
                     f'points="{pts}"><title>{esc(name)}</title></polyline>')
    parts.append(f'<line x1="{left}" x2="{left + pw}" y1="{top + ph}" y2="{top + ph}" class="axis"/>')
    if xlabel:
        parts.append(f'<text x="{left + pw / 2:.0f}" y="{top + ph + 32}" class="ax" text-anchor="middle">{esc(xlabel)}</text>')
    if ylabel:
        parts.append(f'<text transform="translate(13,{top + ph / 2:.0f}) rotate(-90)" class="ax" '
                     f'text-anchor="middle">{esc(ylabel)}</text>')
    parts.append(_legend([(n_, PALETTE[i % len(PALETTE)]) for i, n_ in enumerate(series)], left, height - 6))
    parts.append("</svg>")
    return "".join(parts)


# ---- the page ------------------------------------------------------------------------------------
_CSS = f"""
body {{ font-family: {_FONT}; margin: 0; background: #f6f7f9; color: #1d2330; }}
main {{ max-width: 880px; margin: 0 auto; padding: 24px 20px 60px; }}
h1 {{ font-size: 26px; margin: 8px 0 2px; }}
h2 {{ font-size: 18px; margin: 34px 0 8px; border-bottom: 1px solid #dde1e8; padding-bottom: 4px; }}
h3 {{ font-size: 16px; margin: 26px 0 6px; }}
section.build {{ margin-top: 40px; }}
.sample .pad {{ color: #8a93a5; font-style: italic; }}
p.sub {{ color: #5b6475; margin: 0 0 18px; font-size: 14px; word-break: break-all; }}
.cards {{ display: grid; grid-template-columns: repeat(auto-fit, minmax(130px, 1fr)); gap: 10px; }}
.card {{ background: #fff; border-radius: 10px; padding: 12px 14px; box-shadow: 0 1px 2px rgba(0,0,0,.06); }}
.card .v {{ font-size: 22px; font-weight: 650; }} .card .k {{ font-size: 12px; color: #5b6475; }}
figure {{ background: #fff; border-radius: 10px; margin: 12px 0; padding: 10px 6px 4px;
          box-shadow: 0 1px 2px rgba(0,0,0,.06); overflow-x: auto; }}
figcaption {{ font-size: 13px; color: #5b6475; padding: 0 14px 8px; }}
svg .tt {{ font: 600 14px {_FONT}; fill: #1d2330; }}
svg .ax, svg .lg {{ font: 12px {_FONT}; fill: #3d4555; }}
svg .grid {{ stroke: #e6e9ef; }} svg .axis {{ stroke: #8a93a5; }}
svg .marker {{ stroke: #d7263d; stroke-width: 2.5; stroke-dasharray: 5 3; }}
table {{ border-collapse: collapse; width: 100%; background: #fff; font-size: 13px; border-radius: 10px; overflow: hidden; }}
th, td {{ padding: 5px 8px; text-align: right; border-bottom: 1px solid #eef0f4; }}
th:first-child, td:first-child {{ text-align: left; }} th {{ background: #eef1f6; font-weight: 600; }}
.sample {{ background: #fff; border-radius: 10px; padding: 10px 14px; margin: 10px 0; font: 13px/1.5 ui-monospace,
          SFMono-Regular, Menlo, monospace; white-space: pre-wrap; word-break: break-word; }}
.sample .hd {{ font-family: {_FONT}; color: #5b6475; font-size: 12px; margin-bottom: 4px; }}
.sample .t {{ background: #d8f0e3; border-radius: 2px; }}
.note {{ font-size: 13px; color: #5b6475; }}
"""


def _card(value: str, label: str) -> str:
    return f'<div class="card"><div class="v">{esc(value)}</div><div class="k">{esc(label)}</div></div>'


def html_table(header: Sequence[str], rows: Sequence[Sequence]) -> str:
    """An HTML table (styled by the report's CSS) of ``rows`` under ``header``, every cell escaped."""
    head = "".join(f"<th>{esc(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{esc(c)}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _lang_order(*counts: Mapping[str, int]) -> list[str]:
    total: dict[str, int] = {}
    for c in counts:
        for k, v in c.items():
            total[k] = total.get(k, 0) + int(v)
    return sorted(total, key=lambda k: (-total[k], k))


def _decoder(directory: str, tok_cfg: Mapping | None):
    """A ``tokenizers.Tokenizer`` to decode a store: tokenizer.json in ``directory``, else the bundled one
    the build config names; None if neither."""
    tok_path = os.path.join(directory, "tokenizer.json")
    if os.path.isfile(tok_path):
        from ._deps import require

        Tokenizer = require("tokenizers", "decoding samples").Tokenizer
        try:
            return Tokenizer.from_file(tok_path)
        except Exception as exc:  # tokenizers raises a bare Exception for a malformed file
            raise ValueError(f"{tok_path!r} is not a tokenizer that HF tokenizers can read ({exc}); rebuild the "
                             "output with mlmix build") from None
    if tok_cfg and "name" in tok_cfg:
        from ._tiktoken import qwen_tokenizer

        return qwen_tokenizer(tok_cfg["name"])
    return None


def _segments(seq: Mapping) -> tuple[list[tuple[int, int]], int]:
    """``([(start, length) of each example segment], padding tokens)`` of one packed row (a store row: its
    ``seq_lens`` say where the examples are; the rest of the row is padding)."""
    n = len(seq["input_ids"])
    if "seq_lens" in seq:
        lens = [int(x) for x in np.asarray(seq["seq_lens"])]
    else:  # a row without its layout: examples start where position ids restart (padding cannot be told apart)
        pos = np.asarray(seq["position_ids"]) if "position_ids" in seq else np.zeros(1, dtype=np.int64)
        starts = [t for t in range(n) if pos[t] == 0] or [0]
        lens = [b - a for a, b in zip(starts, starts[1:] + [n])]
    out, start = [], 0
    for length in lens:
        out.append((start, length))
        start += length
    return out, max(n - start, 0)


def _trained_runs(labels: np.ndarray, a: int, b: int) -> list[tuple[int, int, bool]]:
    """``(start, end, trained)`` runs of tokens ``a..b`` (labels[t] != -100: token t is trained)."""
    runs, run = [], a
    for t in range(a + 1, b + 1):
        if t == b or (labels[t] != -100) != (labels[run] != -100):
            runs.append((run, t, bool(labels[run] != -100)))
            run = t
    return runs


def _pad_marker(n: int) -> str:
    return f"[{n:,} pad token{'s' if n != 1 else ''}]"


def _samples_html(build_dir: str, tok_cfg: Mapping | None, n: int = 3, max_tokens: int = 400) -> str:
    """A few packed sequences decoded, trained tokens highlighted (needs the tokenizer and the store).
    Each example is shown once; the padding after them is one "[N pad tokens]" marker."""
    hf = _decoder(build_dir, tok_cfg)  # a malformed tokenizer.json is an error, as in inspect
    try:
        if hf is None:
            return '<p class="note">No tokenizer.json next to the store, so samples cannot be decoded.</p>'
        from .store import open as open_store

        store = open_store(os.path.join(build_dir, "store"))
    except Exception as exc:  # a report without samples beats no report
        return f'<p class="note">Samples unavailable: {esc(exc)}</p>'
    out = []
    count = len(store)
    picks = sorted({0, count // 2, count - 1})[:n] if count else []
    for i in picks:
        seq = store[i]
        ids = np.asarray(seq["input_ids"])
        labels = np.asarray(seq["labels"])
        segments, padding = _segments(seq)
        pieces, shown, left_out = [], 0, 0
        for k, (a, length) in enumerate(segments):
            if shown >= max_tokens:
                left_out += 1
                continue
            b = a + min(length, max_tokens - shown)
            head = f"example {k + 1} of {len(segments)}, " + (
                f"{length:,} tokens" if b - a == length else f"first {b - a:,} of {length:,} tokens")
            gap = "" if k == 0 else "\n"
            pieces.append(f'<span class="hd">{gap}── {esc(head)} ──\n</span>')
            for ra, rb, trained in _trained_runs(labels, a, b):
                text = hf.decode(ids[ra:rb].tolist(), skip_special_tokens=False)
                cls = ' class="t"' if trained else ""
                pieces.append(f"<span{cls}>{esc(text)}</span>")
            shown += b - a
        if left_out:
            pieces.append(f'<span class="hd">\n── {left_out} more example{"s" if left_out != 1 else ""} not shown ──</span>')
        if padding:
            pieces.append(f'<span class="pad">\n{_pad_marker(padding)}</span>')
        ex = f"{len(segments)} example{'s' if len(segments) != 1 else ''}"
        out.append(f'<div class="sample"><div class="hd">sequence {i}: {ex}, {len(ids) - padding:,} tokens, '
                   f'{_pad_marker(padding) if padding else "no padding"}; <span class="t">highlighted</span> = trained '
                   f'tokens</div>{"".join(pieces)}</div>')
    return "".join(out)


def render_report(build_dir: str | os.PathLike, *, extra_sections: str = "", title: str | None = None) -> str:
    """The HTML report of a build output directory (see :mod:`mlmix.engine.stages.write`), as a string.

    ``extra_sections`` is HTML placed after the headline figures (the demo adds its training results).
    """
    build_dir = find_build_dir(build_dir)
    b = load_build(build_dir)
    try:
        return _render(build_dir, b, extra_sections, title)
    except (KeyError, TypeError, IndexError, AttributeError) as exc:
        raise ValueError(f"{os.path.join(build_dir, 'build.json')!r} lacks what the report needs ({type(exc).__name__}: "
                         f"{exc}); it was not written by this mlmix or was edited: rebuild the output") from None


def load_build(build_dir: str) -> dict:
    """``build.json`` of a build output directory, once the output is checked to be as mlmix wrote it.

    Outputs carry the sha256 of each of their files (``_outputs.seal``): a missing, changed or foreign
    file is a ValueError naming it (the report itself may differ: it is derived and rewritten). A
    malformed build.json is a ValueError naming the file, never a KeyError from deep inside.
    """
    from ._outputs import check_sealed, read_marker

    if read_marker(build_dir) is not None:
        problems = [p for p in check_sealed(build_dir) if not p.startswith("report.html ")]
        if problems:
            raise ValueError(f"{build_dir!r} is not as mlmix wrote it: {'; '.join(problems[:5])}"
                             f"{'; ...' if len(problems) > 5 else ''}. Run mlmix build on its config to rebuild it")
    path = os.path.join(build_dir, "build.json")
    try:
        with open(path, encoding="utf-8") as f:
            b = json.load(f)
    except (OSError, ValueError, RecursionError) as exc:
        raise ValueError(f"{path!r} is not a readable build summary ({type(exc).__name__}: {exc}); rebuild the "
                         "output with mlmix build") from None
    if not isinstance(b, dict) or not isinstance(b.get("stages"), dict) or not isinstance(b.get("config"), dict):
        raise ValueError(f"{path!r} is not a build summary written by mlmix (no 'stages' and 'config' tables); "
                         "rebuild the output with mlmix build")
    return b


def _build_sections(build_dir: str, b: dict, *, h: int = 2, with_extra: str = "") -> list[str]:
    """The report sections of one build (headings at level ``h``): headline cards, ``with_extra`` (HTML),
    then examples and tokens per language, the mixture, lengths, duplicates, packing, samples, stages."""
    st = b["stages"]
    cfg = b["config"]
    tb = st["tokens_by_lang"]
    ex_read = st["langid"]["langs"]
    ex_dedup = st["dedup"]["langs"]
    ex_mix = st["mix"]["langs"]
    langs = _lang_order(ex_read)
    pack = st["pack"]
    sections = []

    def heading(text: str) -> str:
        return f"<h{h}>{esc(text)}</h{h}>"

    cards = "".join([
        _card(f"{b['examples']:,}", "examples packed"),
        _card(_fmt(b["tokens"]), "tokens"),
        _card(f"{b['sequences']:,}", f"sequences of {pack['seq_len']:,}"),
        _card(f"{b['efficiency']:.1%}", "packing efficiency"),
        _card(str(len(ex_mix)), "languages in the mixture"),
        _card(f"{st['read']['records']:,}", "records read"),
    ])
    sections.append(f'<div class="cards">{cards}</div>')
    sections.append(with_extra)

    sections.append(heading("Examples and tokens per language"))
    stage_series = [("read", [ex_read.get(l, 0) for l in langs]), ("after dedup", [ex_dedup.get(l, 0) for l in langs]),
                    ("in the mixture", [ex_mix.get(l, 0) for l in langs])]
    sections.append(f'<figure>{bar_chart(langs, stage_series, title="Examples per language", ylabel="examples", counts=True)}'
                    "<figcaption>As read (after language identification), after removing duplicates, and chosen by "
                    "the mixture recipe.</figcaption></figure>")
    tok_series = [(name, [tb[k].get(l, 0) for l in langs]) for name, k in
                  (("read", "read"), ("after dedup", "dedup"), ("in the mixture", "mix"))]
    sections.append(f'<figure>{bar_chart(langs, tok_series, title="Tokens per language", ylabel="tokens", counts=True)}'
                    "<figcaption>Tokens of the same examples with the chat template applied.</figcaption></figure>")

    mix = st["mix"]
    mix_langs = _lang_order(ex_mix, mix.get("target") or {})
    target = mix.get("target")
    recipe_desc = f"{mix['recipe']}({format_params(mix['params'])})" if mix["params"] else mix["recipe"]
    sections.append(heading("The mixture"))
    if target:
        markers = [float(target.get(l, 0)) for l in mix_langs]
        chart = bar_chart(mix_langs, [("chosen", [ex_mix.get(l, 0) for l in mix_langs])], markers=markers,
                          title=f"Mixture {recipe_desc} against its target", ylabel="examples", counts=True)
        caption = "Bars: examples the recipe chose; dashed lines: the recipe's target per language."
    else:
        pool = [ex_dedup.get(l, 0) for l in mix_langs]
        chart = bar_chart(mix_langs, [("available after dedup", pool), ("chosen", [ex_mix.get(l, 0) for l in mix_langs])],
                          title=f"Mixture {recipe_desc}: chosen against available", ylabel="examples", counts=True)
        caption = "What the recipe chose out of what was available after dedup."
    sections.append(f"<figure>{chart}<figcaption>{esc(caption)} Seed {mix['seed']}.</figcaption></figure>")
    total_mix = max(sum(ex_mix.values()), 1)
    rows = []
    for l in mix_langs:
        row = [l, f"{ex_mix.get(l, 0):,}", f"{ex_mix.get(l, 0) / total_mix:.1%}", f"{tb['mix'].get(l, 0):,}"]
        if target:
            row.append(f"{target.get(l, 0):,}")
        rows.append(row)
    header = ["language", "examples", "share", "tokens"] + (["target"] if target else [])
    sections.append(html_table(header, rows))

    sections.append(heading("Lengths"))
    if st.get("lengths"):
        sections.append(f'<figure>{box_plot(st["lengths"], title="Example length per language (mixture)")}</figure>')
    lengths_path = os.path.join(build_dir, "lengths.npy")
    if os.path.isfile(lengths_path):
        try:
            lengths = np.load(lengths_path)
        except (OSError, ValueError, EOFError) as exc:
            raise ValueError(f"{lengths_path!r} is not a readable array ({exc}); rebuild the output") from None
        chart = histogram(lengths, title="Example lengths (all languages)", xlabel="tokens per example", integer_x=True)
        sections.append(f"<figure>{chart}<figcaption>{lengths.size:,} examples; sequence length {pack['seq_len']:,}; "
                        f"{pack.get('overlong', 0):,} longer than it.</figcaption></figure>")

    sections.append(heading("Duplicates removed"))
    ex_rm, near_rm = st["dedup"]["exact_removed"], st["dedup"]["near_removed"]
    dup_langs = _lang_order(ex_read)
    if sum(ex_rm.values()) + sum(near_rm.values()) > 0:
        sections.append(f'<figure>{stacked_hbar(dup_langs, [("exact", [ex_rm.get(l, 0) for l in dup_langs]), ("near", [near_rm.get(l, 0) for l in dup_langs])], title="Duplicates removed per language")}'
                        "</figure>")
    else:
        dcfg = cfg["dedup"]
        what = "exact and near" if dcfg["exact"] and dcfg["near"] else "exact" if dcfg["exact"] else "near" if dcfg["near"] else "no"
        sections.append(f'<p class="note">No duplicates found ({what} dedup, scope {dcfg["scope"]}).</p>')
    rows = [[l, f"{ex_read.get(l, 0):,}", f"{ex_rm.get(l, 0):,}", f"{near_rm.get(l, 0):,}",
             f"{(ex_rm.get(l, 0) + near_rm.get(l, 0)) / max(ex_read.get(l, 0), 1):.1%}"] for l in dup_langs]
    sections.append(html_table(["language", "read", "exact dups", "near dups", "removed"], rows))

    sections.append(heading("Packing"))
    eff = float(b["efficiency"])
    pad = 1.0 - eff
    sections.append("<figure>" + stacked_hbar(
        ["slots"], [(f"real tokens {eff:.2%}", [eff * 100]), (f"padding {pad:.2%}", [pad * 100])], total_suffix="%",
        value_format=".2f",
        title=f"Packing efficiency: {eff:.2%} of {pack['sequences']:,} x {pack['seq_len']:,} slots hold real tokens")
        + f"<figcaption>Strategy {esc(pack['strategy'])}; {pack['sequences']:,} sequences against a lower bound of "
          f"{pack['lower_bound_sequences']:,} (total tokens / seq_len). Overlong examples: {pack.get('overlong', 0):,} "
          f"(truncated {pack.get('truncated', 0):,}, split {pack.get('split', 0):,}, dropped {pack.get('dropped', 0):,})."
          "</figcaption></figure>")

    sections.append(heading("Samples"))
    sections.append(_samples_html(build_dir, cfg.get("tokenizer")))

    sections.append(heading("Stages"))
    rows = []
    from .engine import STAGES

    timings = _timings(build_dir)
    for name in STAGES:
        # seconds when the stage was computed: timings.json; outputs written before it hold them in build.json
        s = timings.get(name) or st.get(name, {})
        rows.append([name, f"{s.get('seconds', 0):.2f} s"])
    sections.append(html_table(["stage", "time when computed"], rows))
    return sections


def _timings(build_dir: str) -> dict:
    """The output's timings.json ({} when absent or unreadable: the timings are only informative)."""
    try:
        with open(os.path.join(build_dir, "timings.json"), encoding="utf-8") as f:
            t = json.load(f)
    except (OSError, ValueError):
        return {}
    return t if isinstance(t, dict) else {}


def _page(title: str, subtitle: str, sections: Sequence[str]) -> str:
    return ("<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<meta name=\"generator\" content=\"mlmix {_version()}\">"
            f"<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\"><title>{esc(title)}</title>"
            f"<style>{_CSS}</style></head><body><main><h1>{esc(title)}</h1>"
            f"<p class=\"sub\">{esc(subtitle)}</p>{''.join(sections)}</main></body></html>")


def _render(build_dir: str, b: dict, extra_sections: str, title: str | None) -> str:
    title = title or f"mlmix build report: {os.path.basename(b['output'].rstrip(os.sep))}"
    return _page(title, b["output"], _build_sections(build_dir, b, with_extra=extra_sections))


def format_params(params: Mapping) -> str:
    """Recipe parameters as ``key=value, ...`` in their order (strings bare, lists in brackets), e.g.
    ``n_multilingual=11, pivot=en``."""
    def val(v) -> str:
        if isinstance(v, str):
            return v
        if isinstance(v, (list, tuple)):
            return "[" + ", ".join(val(x) for x in v) + "]"
        if isinstance(v, Mapping):
            return "{" + ", ".join(f"{k}={val(x)}" for k, x in v.items()) + "}"
        if isinstance(v, bool):
            return "true" if v else "false"
        return str(v)

    return ", ".join(f"{k}={val(v)}" for k, v in params.items())


def render_comparison(build_dirs: Mapping[str, str | os.PathLike], *, extra_sections: str = "",
                      title: str | None = None) -> str:
    """One HTML page for several builds of the same data (e.g. the demo's mixtures): ``extra_sections``,
    then the mixtures side by side (examples per language, one bar per build; a summary table), then
    every build's own report sections, each under its name."""
    if not build_dirs:
        raise ValueError("build_dirs must name at least one build output, got none")
    builds = {}
    for name, d in build_dirs.items():
        d = find_build_dir(d)
        builds[name] = (d, load_build(d))
    try:
        mixes = {name: b["stages"]["mix"] for name, (_, b) in builds.items()}
        langs = _lang_order(*(m["langs"] for m in mixes.values()))
        sections = [extra_sections, "<h2>Mixtures</h2>"]
        series = [(name, [mixes[name]["langs"].get(l, 0) for l in langs]) for name in builds]
        sections.append(f'<figure>{bar_chart(langs, series, title="Examples per language in each mixture", ylabel="examples", counts=True)}'
                        "<figcaption>Examples each mixture's recipe chose per language (after dedup).</figcaption></figure>")
        rows = []
        for name, (_, b) in builds.items():
            m = mixes[name]
            recipe = f"{m['recipe']}({format_params(m['params'])})" if m["params"] else m["recipe"]
            rows.append([name, recipe, f"{b['examples']:,}", f"{b['tokens']:,}", f"{b['sequences']:,}",
                         f"{b['efficiency']:.1%}", str(sum(1 for v in m["langs"].values() if v))])
        sections.append(html_table(["mixture", "recipe", "examples", "tokens", "sequences", "packing", "languages"], rows))
        sections.append('<p class="note">Each mixture in detail: ' + ", ".join(
            f'<a href="#mixture-{esc(_anchor(name))}">{esc(name)}</a>' for name in builds) + ".</p>")
        for name, (d, b) in builds.items():
            sections.append(f'<section class="build" id="mixture-{esc(_anchor(name))}"><h2>Mixture {esc(name)}</h2>'
                            f'<p class="sub">{esc(b["output"])}</p>')
            sections.extend(_build_sections(d, b, h=3))
            sections.append("</section>")
    except (KeyError, TypeError, IndexError, AttributeError) as exc:
        raise ValueError(f"a build.json among {[d for d, _ in builds.values()]} lacks what the report needs "
                         f"({type(exc).__name__}: {exc}); rebuild the outputs") from None
    return _page(title or "mlmix report: " + ", ".join(builds), ", ".join(builds), sections)


def _anchor(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "-" for c in name)


def write_report(build_dir: str | os.PathLike, path: str | os.PathLike | None = None) -> str:
    """Render the report of ``build_dir`` and write it (atomically) to ``path`` (default build_dir/report.html)."""
    from ._atomic import atomic_file

    from ._outputs import check_target, is_within, read_marker, seal

    build_dir = find_build_dir(build_dir)
    path = os.path.abspath(os.fspath(path)) if path is not None else os.path.join(build_dir, "report.html")
    check_target(path, "report", arg="output", directory=False)  # before the work, and again when writing
    html_text = render_report(build_dir)
    with atomic_file(path, "wb", kind="report", arg="output") as f:
        f.write(html_text.encode("utf-8"))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)
    marker = read_marker(build_dir)
    if marker is not None and "files" in marker and is_within(path, build_dir):
        # a report written into the output becomes part of it: its checksum is recorded with the rest
        seal(build_dir, marker["mlmix"], **{k: v for k, v in marker.items() if k not in ("mlmix", "files", "skip", "format")})
    return path


# ---- mlmix inspect -------------------------------------------------------------------------------
def _decode_sample(hf, seq: Mapping, max_tokens: int) -> dict:
    """A packed sequence as its examples, each decoded with trained spans in [[ ]], and its padding.

    Returns ``{"examples": [{"start", "tokens" (the example's length), "shown" (tokens decoded: at most
    ``max_tokens`` over the whole sequence), "text"}], "not_shown" (examples past the limit), "padding"
    (pad tokens after the examples)}``.
    """
    ids = np.asarray(seq["input_ids"])
    labels = np.asarray(seq["labels"])
    segments, padding = _segments(seq)
    examples, shown, not_shown = [], 0, 0
    for a, length in segments:
        if shown >= max_tokens:
            not_shown += 1
            continue
        b = a + min(length, max_tokens - shown)
        text = []
        for ra, rb, trained in _trained_runs(labels, a, b):
            piece = hf.decode(ids[ra:rb].tolist(), skip_special_tokens=False)
            text.append(f"[[{piece}]]" if trained else piece)
        examples.append({"start": int(a), "tokens": int(length), "shown": int(b - a), "text": "".join(text)})
        shown += b - a
    return {"examples": examples, "not_shown": not_shown, "padding": int(padding)}


def _store_langs(store) -> dict[str, dict[str, int]]:
    """Examples and tokens per language, counted from a store's segments (a split example counts once)."""
    if "seg_lang" not in store.manifest["arrays"]:
        return {}
    seg_lang = np.asarray(store.array("seg_lang"), dtype=np.int64)
    seg_lens = np.asarray(store.array("seg_lens"), dtype=np.int64)
    first = np.asarray(store.array("seg_starts")) == 0
    k = len(store.languages)
    ex = np.bincount(seg_lang[first], minlength=k)
    tok = np.bincount(seg_lang, weights=seg_lens, minlength=k)
    return {lang: {"examples": int(ex[i]), "tokens": int(tok[i])} for i, lang in enumerate(store.languages)}


def inspect_store(path: str | os.PathLike, *, samples: int = 2, max_tokens: int = 200) -> dict:
    """What a store holds: sequences, tokens, efficiency, examples and tokens per language, decoded samples.

    ``path`` is a build's output directory (or its ``store/``), or any packed store written by
    ``mlmix.write_store`` (then there is no mixture information, and samples are decoded only if a
    ``tokenizer.json`` lies next to the store).
    """
    if samples < 0:
        raise ValueError(f"samples must be >= 0, got {samples}")
    if max_tokens < 1:
        raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
    from .store import open as open_store

    p = os.path.abspath(os.fspath(path))
    try:
        build_dir = find_build_dir(p)
        store_path = os.path.join(build_dir, "store")
    except ValueError:
        if not os.path.isfile(os.path.join(p, "manifest.json")):
            raise
        build_dir, store_path = None, p
    store = open_store(store_path)
    info = {
        "store": store_path,
        "sequences": len(store),
        "seq_len": store.seq_len,
        "examples": store.num_examples,
        "tokens": store.num_tokens,
        "efficiency": store.efficiency,
        "strategy": store.manifest.get("strategy"),
        "mixture": None,
        "langs": _store_langs(store),
        "tokenizer": store.vocab_fingerprint,  # what the ids mean (None: not recorded)
        "samples": [],
    }
    tok_cfg = None
    if build_dir is not None:
        b = load_build(build_dir)
        try:
            mix = b["stages"]["mix"]
            info["mixture"] = {"recipe": mix["recipe"], "params": mix["params"], "seed": mix["seed"]}
            tok_cfg = b["config"]["tokenizer"]
        except (KeyError, TypeError) as exc:
            raise ValueError(f"{os.path.join(build_dir, 'build.json')!r} lacks {exc} (not written by this mlmix, "
                             "or edited): rebuild the output") from None
    hf = _decoder(os.path.dirname(store_path), tok_cfg) if samples and len(store) else None
    if hf is not None:
        picks = np.linspace(0, len(store) - 1, num=min(samples, len(store))).round().astype(int)
        for i in sorted(set(picks.tolist())):
            info["samples"].append({"sequence": i, **_decode_sample(hf, store[i], max_tokens)})
    return info


def format_inspection(info: Mapping, *, verbose: bool = False, quiet: bool = False) -> str:
    lines = [f"store      {info['store']}",
             f"sequences  {info['sequences']:,} x {info['seq_len']:,} tokens ({info['strategy']}), "
             f"efficiency {info['efficiency']:.2%}",
             f"examples   {info['examples']:,}, tokens {info['tokens']:,}"]
    if info["mixture"]:
        m = info["mixture"]
        params = f"({format_params(m['params'])})" if m["params"] else ""
        lines.append(f"mixture    {m['recipe']}{params}, seed {m['seed']}")
    if info.get("tokenizer"):
        t = info["tokenizer"]
        lines.append(f"tokenizer  {t['num_ids']:,} ids, vocabulary sha256 {t['vocab_sha256'][:16]}")
    if quiet:
        return "\n".join(lines)
    total = max(sum(v["examples"] for v in info["langs"].values()), 1)
    lines.append("")
    lines.append(f"{'lang':<8}{'examples':>10}{'share':>8}{'tokens':>12}")
    for lang, v in sorted(info["langs"].items(), key=lambda kv: -kv[1]["examples"]):
        lines.append(f"{lang:<8}{v['examples']:>10,}{v['examples'] / total:>8.1%}{v['tokens']:>12,}")
    if not info["samples"] and not quiet:
        lines.append("")
        lines.append("(no samples: no tokenizer.json next to the store to decode them)")
    for s in info["samples"]:
        lines.append("")
        n_ex = len(s["examples"]) + s.get("not_shown", 0)
        pad = s.get("padding", 0)
        lines.append(f"--- sequence {s['sequence']}: {n_ex} example{'s' if n_ex != 1 else ''}"
                     f"{', ' + _pad_marker(pad) if pad else ''} (trained tokens in [[ ]]) ---")
        shown = s["examples"] if verbose else s["examples"][:2]
        for ex in shown:
            size = (f"{ex['tokens']:,} tokens" if ex.get("shown", ex["tokens"]) == ex["tokens"]
                    else f"first {ex['shown']:,} of {ex['tokens']:,} tokens")
            lines.append(f"[example at {ex['start']:,}, {size}]")
            lines.append(ex["text"])
        for hidden, why in ((len(s["examples"]) - len(shown), "-v shows them"),
                            (s.get("not_shown", 0), "past --max-tokens")):
            if hidden:
                lines.append(f"[{hidden} more example{'s' if hidden != 1 else ''} ({why})]")
        if pad:
            lines.append(_pad_marker(pad))
    return "\n".join(lines)
