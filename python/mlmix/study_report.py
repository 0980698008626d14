"""The study report: one self-contained HTML page of ``mlmix study``'s results, drawn as the paper's figures.

Input: the study engine's results dict (``results.json``, schema ``mlmix.study/1``; docs/study_report.md
says what each key holds). Output: HTML with inline CSS and hand-drawn SVG, no scripts and no network
requests. The same results give the same bytes: nothing reads the clock, no ids are random, and every
number is formatted with a fixed precision.

Figures (each states its metric and which direction is better):

1. the score of every arm in every language (a heatmap, arms x languages);
2. the average over languages against P, the percentage of multilingual examples (log axis, the pinch
   placed at n / total examples and marked);
3. seen against unseen languages (the unseen arm beside the arms tuned on every language);
4. the average against k, the number of tuning languages;
5. bilingual pairs, English + X.

The score is the judge's when the study has one; without it, the held-out loss minus the held-out loss of
the monolingual arm of that language (lower is better). Error bars are mean +- sd across seeds; an arm that
ran one seed shows its own interval instead (``loss_lo``..``loss_hi``, ``judge_lo``..``judge_hi``). A
figure whose arms did not run is replaced by one line naming the arms that would draw it.
"""

from __future__ import annotations

import math
import numbers
import os
import statistics
from dataclasses import dataclass
from typing import Mapping, Optional, Sequence

from .report import PALETTE, esc, html_table

__all__ = ["render", "write_report", "SCHEMA", "FAMILIES"]

SCHEMA = "mlmix.study/1"
#: arm families, in the order the report lists them
FAMILIES = ("monolingual", "pinch", "percent", "unseen", "diversity", "bilingual", "temperature", "unimax")
_STUDY_KEYS = ("name", "config_hash", "backend", "model", "languages", "seen", "unseen", "seeds", "judge", "absent",
               "diversity_order", "created")
_RUN_KEYS = ("arm", "family", "param", "train_languages", "mixture", "seed", "status", "metrics")
_METRIC_REQUIRED = ("loss", "loss_lo", "loss_hi", "n")
_METRIC_OPTIONAL = ("judge", "judge_lo", "judge_hi", "fidelity", "fidelity_lo", "fidelity_hi")
_DASH = "\u2014"  # what a value that is missing or not finite reads as
_FONT = "system-ui, -apple-system, 'Segoe UI', Roboto, 'Noto Sans', sans-serif"
_BETTER, _WORSE, _NEUTRAL = (0, 114, 178), (213, 94, 0), (247, 247, 247)  # Okabe-Ito blue and vermillion


# ---- validation --------------------------------------------------------------------------------------------
def _show(x) -> str:
    r = repr(x)
    return r if len(r) <= 80 else r[:77] + "..."


def _bad(where: str, expected: str, got) -> ValueError:
    return ValueError(f"results{where} must be {expected}, got {_show(got)}")


def _is_num(x) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, bool)


def _is_int(x) -> bool:
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def _number(x, where: str, *, nullable: bool) -> Optional[float]:
    """A metric value as a float; None (missing) for null and for NaN or an infinity, which render as a dash."""
    if x is None and nullable:
        return None
    if not _is_num(x):
        raise _bad(where, "a number" + (" or null" if nullable else ""), x)
    x = float(x)
    return x if math.isfinite(x) else None


def _get(d: Mapping, key: str, where: str):
    if key not in d:
        raise ValueError(f"results{where} lacks the key {key!r} (the study results contract, schema {SCHEMA!r})")
    return d[key]


def _str_list(x, where: str, *, allowed: Sequence[str] | None = None, unique: bool = True) -> list[str]:
    if not isinstance(x, list) or not all(isinstance(s, str) for s in x):
        raise _bad(where, "a list of strings", x)
    if unique and len(set(x)) != len(x):
        raise _bad(where, "a list without repeats", x)
    if allowed is not None:
        extra = [s for s in x if s not in allowed]
        if extra:
            raise _bad(where, f"languages of study['languages'] ({', '.join(allowed)})", extra)
    return list(x)


@dataclass(frozen=True)
class _Run:
    """One arm run with one seed; metrics[lang][key] is a float, None where missing or not finite."""

    arm: str
    family: str
    param: dict
    train_languages: tuple
    mixture: dict
    seed: int
    status: str
    metrics: dict


def _check_param(family: str, param, where: str) -> dict:
    if not isinstance(param, dict):
        raise _bad(where, "a dict", param)
    need = {"monolingual": ("lang", "a language code", lambda v: isinstance(v, str)),
            "pinch": ("n", "an integer > 0", lambda v: _is_int(v) and v > 0),
            "percent": ("p", "a percentage in (0, 100]", lambda v: _is_num(v) and 0 < v <= 100),
            "diversity": ("k", "an integer >= 1", lambda v: _is_int(v) and v >= 1),
            "bilingual": ("pair", "two language codes", lambda v: isinstance(v, list) and len(v) == 2
                          and all(isinstance(s, str) for s in v)),
            "temperature": ("alpha", "a number", lambda v: _is_num(v) and math.isfinite(v))}.get(family)
    if need is not None:
        key, what, ok = need
        if not ok(_get(param, key, where)):
            raise _bad(f"{where}[{key!r}]", what, param[key])
    return dict(param)


def _check_run(r, i: int, languages: list[str]) -> _Run:
    where = f"['arms'][{i}]"
    if not isinstance(r, dict):
        raise _bad(where, "a dict (one arm run with one seed)", r)
    for k in _RUN_KEYS:
        _get(r, k, where)
    if not isinstance(r["arm"], str) or not r["arm"]:
        raise _bad(f"{where}['arm']", "a non-empty string", r["arm"])
    if r["family"] not in FAMILIES:
        raise _bad(f"{where}['family']", f"one of {', '.join(FAMILIES)}", r["family"])
    param = _check_param(r["family"], r["param"], f"{where}['param']")
    for key in ("lang", "pair"):
        codes = param.get(key)
        codes = [codes] if isinstance(codes, str) else codes or []
        if r["family"] in ("monolingual", "bilingual") and any(c not in languages for c in codes):
            raise _bad(f"{where}['param'][{key!r}]", "languages of study['languages']", param[key])
    train = _str_list(r["train_languages"], f"{where}['train_languages']")  # the data may hold other languages
    mix = r["mixture"]
    if not isinstance(mix, dict) or not all(isinstance(k, str) and _is_int(v) and v >= 0 for k, v in mix.items()):
        raise _bad(f"{where}['mixture']", "a dict of language -> example count (integer >= 0)", mix)
    if not _is_int(r["seed"]):
        raise _bad(f"{where}['seed']", "an integer", r["seed"])
    if not isinstance(r["status"], str):
        raise _bad(f"{where}['status']", "a string", r["status"])
    if not isinstance(r["metrics"], dict):
        raise _bad(f"{where}['metrics']", "a dict of language -> metrics", r["metrics"])
    metrics = {}
    for lang, m in r["metrics"].items():
        mw = f"{where}['metrics'][{lang!r}]"
        if lang not in languages:
            raise _bad(f"{where}['metrics']", "keyed by languages of study['languages']", lang)
        if not isinstance(m, dict):
            raise _bad(mw, "a dict", m)
        vals = {k: _number(_get(m, k, mw), f"{mw}[{k!r}]", nullable=True) for k in _METRIC_REQUIRED if k != "n"}
        n = _get(m, "n", mw)
        if not (_is_int(n) and n >= 0):
            raise _bad(f"{mw}['n']", "an integer >= 0", n)
        vals["n"] = int(n)
        for k in _METRIC_OPTIONAL:
            vals[k] = _number(m.get(k), f"{mw}[{k!r}]", nullable=True)
        metrics[lang] = vals
    return _Run(r["arm"], r["family"], param, tuple(train), dict(mix), int(r["seed"]), r["status"], metrics)


def _validate(results) -> tuple[dict, list[_Run]]:
    if not isinstance(results, dict):
        raise ValueError(f"results must be a dict (the study's results.json), got {type(results).__name__}")
    if _get(results, "schema", "") != SCHEMA:
        raise _bad("['schema']", repr(SCHEMA), results["schema"])
    study = _get(results, "study", "")
    if not isinstance(study, dict):
        raise _bad("['study']", "a dict", study)
    for k in _STUDY_KEYS:
        _get(study, k, "['study']")
    for k in ("name", "config_hash", "created"):
        if not isinstance(study[k], str):
            raise _bad(f"['study'][{k!r}]", "a string", study[k])
    if study["backend"] not in ("tiny", "hf"):
        raise _bad("['study']['backend']", "'tiny' or 'hf'", study["backend"])
    for k in ("model", "judge"):
        if study[k] is not None and not isinstance(study[k], str):
            raise _bad(f"['study'][{k!r}]", "a string or null", study[k])
    langs = _str_list(study["languages"], "['study']['languages']")
    if not langs:
        raise _bad("['study']['languages']", "a non-empty list of language codes", langs)
    for k in ("seen", "unseen", "diversity_order"):
        _str_list(study[k], f"['study'][{k!r}]", allowed=langs)
    _str_list(study["absent"], "['study']['absent']")
    seeds = study["seeds"]
    if not isinstance(seeds, list) or not seeds or not all(_is_int(s) for s in seeds) or len(set(seeds)) != len(seeds):
        raise _bad("['study']['seeds']", "a non-empty list of distinct integers", seeds)
    arms = _get(results, "arms", "")
    if not isinstance(arms, list) or not arms:
        raise _bad("['arms']", "a non-empty list of arm runs", arms)
    runs = [_check_run(r, i, langs) for i, r in enumerate(arms)]
    seen: dict[tuple, int] = {}
    first: dict[str, _Run] = {}
    for i, run in enumerate(runs):
        if (run.arm, run.seed) in seen:
            raise _bad(f"['arms'][{i}]", f"unique per arm and seed (['arms'][{seen[run.arm, run.seed]}] is the same "
                       f"arm and seed)", {"arm": run.arm, "seed": run.seed})
        seen[run.arm, run.seed] = i
        if run.seed not in seeds:
            raise _bad(f"['arms'][{i}]['seed']", f"one of study['seeds'] {seeds}", run.seed)
        f = first.setdefault(run.arm, run)
        if (f.family, f.param) != (run.family, run.param):
            raise _bad(f"['arms'][{i}]", f"the family and param of the other seeds of arm {run.arm!r} "
                       f"({f.family}, {f.param})", {"family": run.family, "param": run.param})
    # a metric the study says it did not compute has no numbers: none is drawn that the study disowns
    missing = {k: why for k, why in (("judge", "the study has no judge (study['judge'] is null)"),) if study[k] is None}
    missing.update({k: f"study['absent'] lists {k!r}" for k in ("judge", "fidelity") if k in study["absent"]})
    for i, run in enumerate(runs):
        for lang, m in run.metrics.items():
            for key, why in missing.items():
                if m[key] is not None:
                    raise _bad(f"['arms'][{i}]['metrics'][{lang!r}][{key!r}]", f"null: {why}", m[key])
    return study, runs


# ---- the numbers: scores, and their spread across seeds ----------------------------------------------------
@dataclass(frozen=True)
class _Est:
    """A value and its error bar: mean +- sd across seeds ("sd"), or one seed's interval ("ci")."""

    mean: float
    lo: Optional[float]
    hi: Optional[float]
    seeds: int
    kind: str


def _across_seeds(values: Sequence[Optional[tuple]]) -> Optional[_Est]:
    got = [v for v in values if v is not None]
    if not got:
        return None
    if len(got) == 1:
        v, lo, hi = got[0]
        return _Est(v, lo, hi, 1, "ci" if lo is not None and hi is not None else "")
    vs = [v for v, _, _ in got]
    m = math.fsum(vs) / len(vs)
    sd = math.sqrt(math.fsum((v - m) ** 2 for v in vs) / (len(vs) - 1))  # the sample sd (n - 1)
    return _Est(m, m - sd, m + sd, len(got), "sd")


def _combine(triples: Sequence[tuple]) -> Optional[tuple]:
    """The mean over languages of one run's values; its interval combines the languages' as independent."""
    if not triples:
        return None
    n = len(triples)
    v = statistics.fmean(t[0] for t in triples)
    lo = hi = None
    if all(t[1] is not None and t[2] is not None for t in triples):
        lo = v - math.sqrt(sum((t[0] - t[1]) ** 2 for t in triples)) / n
        hi = v + math.sqrt(sum((t[2] - t[0]) ** 2 for t in triples)) / n
    return v, lo, hi


@dataclass(frozen=True)
class _Metric:
    key: str         # "judge", "delta" (loss minus the monolingual arm's) or "loss"
    name: str        # what the figures call it
    unit: str        # the axis label
    better: str      # "higher" or "lower"
    center: Optional[float]  # the reference value (parity, monolingual), None: none


class _Study:
    """The validated results, arms grouped over seeds, and the score functions the figures use."""

    def __init__(self, results) -> None:
        self.meta, runs = _validate(results)
        self.langs: list[str] = list(self.meta["languages"])
        self.not_done = [r for r in runs if r.status != "done"]
        self.runs: dict[str, list[_Run]] = {}
        for r in sorted((r for r in runs if r.status == "done"), key=lambda r: (self._arm_key(r), r.seed)):
            self.runs.setdefault(r.arm, []).append(r)
        self.mono = {r[0].param["lang"]: arm for arm, r in self.runs.items() if r[0].family == "monolingual"}
        self.has = {k: any(m.get(k) is not None for rs in self.runs.values() for r in rs for m in r.metrics.values())
                    for k in ("loss", "judge", "fidelity")}
        self.loss_metric = (
            _Metric("delta", "held-out loss minus the monolingual arm's", "\u0394 loss (nats/token)", "lower", 0.0)
            if self.mono else _Metric("loss", "held-out loss", "loss (nats/token)", "lower", None))
        judge_vals = [m["judge"] for rs in self.runs.values() for r in rs for m in r.metrics.values()
                      if m["judge"] is not None]
        in_unit = bool(judge_vals) and all(0.0 <= v <= 1.0 for v in judge_vals)
        self.judge_metric = _Metric("judge", f"judge score ({self.meta['judge']})", "judge score", "higher",
                                    0.5 if in_unit else None)
        self.metric = self.judge_metric if self.has["judge"] else self.loss_metric
        # optional keys the study engine adds: what the judge compared against, and why a metric is absent
        base = self.meta.get("judge_baseline")
        self.judge_baseline = base if isinstance(base, str) else None
        missing = self.meta.get("judge_missing_baselines")
        self.missing_baselines = [x for x in missing if isinstance(x, str)] if isinstance(missing, list) else []
        reasons = self.meta.get("absent_reasons")
        self.absent_reasons = ({k: v for k, v in reasons.items() if isinstance(k, str) and isinstance(v, str)}
                               if isinstance(reasons, dict) else {})

    def _arm_key(self, r: _Run) -> tuple:
        p = r.param
        order = {l: i for i, l in enumerate(self.meta["languages"])}
        sub = {"monolingual": lambda: order.get(p["lang"], 0), "pinch": lambda: p["n"], "percent": lambda: p["p"],
               "diversity": lambda: p["k"], "temperature": lambda: p["alpha"],
               "bilingual": lambda: tuple(order.get(c, 0) for c in p["pair"])}.get(r.family, lambda: 0)()
        return FAMILIES.index(r.family), sub, r.arm

    def family(self, name: str) -> list[str]:
        return [a for a, rs in self.runs.items() if rs[0].family == name]

    def ref_arm(self, lang: str) -> Optional[str]:
        """The monolingual arm a language is compared against: its own, else English-only."""
        return self.mono.get(lang) or self.mono.get("en")

    def _ref_loss(self, lang: str, seed: int) -> Optional[float]:
        arm = self.ref_arm(lang)
        if arm is None:
            return None
        same = [r for r in self.runs[arm] if r.seed == seed]
        vals = [r.metrics.get(lang, {}).get("loss") for r in (same or self.runs[arm])]
        vals = [v for v in vals if v is not None]
        return statistics.fmean(vals) if vals else None

    def score(self, run: _Run, lang: str, metric: _Metric) -> Optional[tuple]:
        """(value, lo, hi) of one run in one language; lo/hi None where there is no interval."""
        m = run.metrics.get(lang)
        if m is None:
            return None
        key = "judge" if metric.key == "judge" else "loss"
        v = m[key]
        if v is None:
            return None
        lo, hi = m[f"{key}_lo"], m[f"{key}_hi"]
        if metric.key == "delta":
            ref = self._ref_loss(lang, run.seed)
            if ref is None:
                return None
            v, lo, hi = v - ref, (lo - ref if lo is not None else None), (hi - ref if hi is not None else None)
        return v, lo, hi

    def cell(self, arm: str, lang: str, metric: _Metric) -> Optional[_Est]:
        return _across_seeds([self.score(r, lang, metric) for r in self.runs[arm]])

    def average(self, arm: str, langs: Sequence[str], metric: _Metric) -> Optional[_Est]:
        per_seed = []
        for r in self.runs[arm]:
            per_seed.append(_combine([t for t in (self.score(r, l, metric) for l in langs) if t is not None]))
        return _across_seeds(per_seed)

    def raw_average(self, arm: str, key: str) -> Optional[_Est]:
        """A raw metric (loss, judge, fidelity) averaged over languages, then mean +- sd across seeds."""
        vals = []
        for r in self.runs[arm]:
            got = [m[key] for m in r.metrics.values() if m.get(key) is not None]
            vals.append((statistics.fmean(got), None, None) if got else None)
        return _across_seeds(vals)

    def total(self, arm: str) -> int:
        return sum(self.runs[arm][0].mixture.values())


# ---- formatting --------------------------------------------------------------------------------------------
def _f(v: Optional[float], digits: int = 3) -> str:
    if v is None or not math.isfinite(v):
        return _DASH
    s = f"{v:.{digits}f}"
    return s[1:] if s.startswith("-") and float(s) == 0 else s  # no "-0.000"


def _pm(e: Optional[_Est], digits: int = 3) -> str:
    """``mean ± sd`` or ``mean [lo, hi]``: what a table cell or a tooltip says about an estimate."""
    if e is None:
        return _DASH
    if e.kind == "sd":
        return f"{_f(e.mean, digits)} \u00b1 {_f(e.hi - e.mean, digits)}"
    if e.kind == "ci":
        return f"{_f(e.mean, digits)} [{_f(e.lo, digits)}, {_f(e.hi, digits)}]"
    return _f(e.mean, digits)


def _pct(p: float) -> str:
    return f"{p:.2g}%" if p < 1 else f"{p:.3g}%"


def _short(s: str, n: int) -> str:
    return s if len(s) <= n else s[: n - 1] + "\u2026"


def _param_text(run: _Run) -> str:
    p = run.param
    return {"monolingual": lambda: f"lang={p['lang']}", "pinch": lambda: f"n={p['n']}", "percent": lambda: f"P={p['p']:g}%",
            "diversity": lambda: f"k={p['k']}", "bilingual": lambda: "+".join(p["pair"]),
            "temperature": lambda: f"alpha={p['alpha']:g}"}.get(run.family, lambda: "")()


def _error_words(st: _Study, metric: _Metric) -> str:
    counts = sorted({len(rs) for rs in st.runs.values()})
    interval = "judge_lo..judge_hi" if metric.key == "judge" else "loss_lo..loss_hi"
    if counts == [1]:
        return (f"Error bars: every arm ran one seed, so each shows its own interval ({interval}); an average over "
                "languages combines the languages' intervals as independent.")
    return ("Error bars: mean \u00b1 sd across seeds" + (
        f"; an arm that ran one seed shows its own interval ({interval}) instead." if 1 in counts else "."))


# ---- SVG ---------------------------------------------------------------------------------------------------
def _ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    """Round tick values covering [lo, hi], about ``n`` steps (lo may be negative)."""
    if not (math.isfinite(lo) and math.isfinite(hi)) or hi - lo <= 1e-12:
        pad = max(abs(lo), abs(hi), 1e-3) * 0.1 if math.isfinite(lo) and math.isfinite(hi) else 1.0
        lo, hi = (lo - pad, hi + pad) if math.isfinite(lo) and math.isfinite(hi) else (0.0, 1.0)
    raw = (hi - lo) / n
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw * (1 - 1e-9))
    start = math.floor(lo / step + 1e-9) * step
    count = int(math.ceil((hi - start) / step - 1e-9))
    return [round(start + i * step, 12) for i in range(count + 1)]


def _tick_text(t: float, ticks: Sequence[float]) -> str:
    step = abs(ticks[1] - ticks[0]) if len(ticks) > 1 else 1.0
    exp = math.floor(math.log10(step) + 1e-9)
    digits = max(0, -exp) + (1 if exp <= 0 and round(step / 10 ** exp, 6) == 2.5 else 0)  # 0.25: one more than 0.2
    return _f(t, digits)


def _svg_open(title: str, width: int, height: int, fig: str) -> list[str]:
    return [f'<svg class="fig" data-figure="{esc(fig)}" role="img" aria-label="{esc(title)}" '
            f'xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {width} {height}" width="{width}" height="{height}">',
            f"<title>{esc(title)}</title>", f'<text x="12" y="20" class="tt">{esc(_short(title, 110))}</text>']


def _legend(items: Sequence[tuple[str, str, str]], x: float, y: float) -> str:
    """(label, colour, shape "box" | "line" | "dash" | "diamond") in one row."""
    out = []
    for label, color, shape in items:
        if shape == "box":
            out.append(f'<rect x="{x:.1f}" y="{y - 9:.1f}" width="11" height="11" rx="2" fill="{color}"/>')
        elif shape == "diamond":
            out.append(f'<path d="M{x + 5.5:.1f} {y - 10:.1f}l6 6-6 6-6-6z" fill="{color}"/>')
        else:
            dash = ' stroke-dasharray="5 3"' if shape == "dash" else ""
            out.append(f'<line x1="{x:.1f}" x2="{x + 12:.1f}" y1="{y - 4:.1f}" y2="{y - 4:.1f}" stroke="{color}" '
                       f'stroke-width="2"{dash}/>')
        out.append(f'<text x="{x + 16:.1f}" y="{y:.1f}" class="lg">{esc(label)}</text>')
        x += 28 + 6.6 * len(label)
    return "".join(out)


def _whisker(x: float, y1: float, y2: float, cap: float = 4.0) -> str:
    return (f'<path class="err" d="M{x - cap:.1f} {y1:.1f}H{x + cap:.1f}M{x:.1f} {y1:.1f}V{y2:.1f}'
            f'M{x - cap:.1f} {y2:.1f}H{x + cap:.1f}"/>')


def _y_domain(ests: Sequence[Optional[_Est]], extra: Sequence[float]) -> list[float]:
    vals = list(extra)
    for e in ests:
        if e is not None:
            vals += [v for v in (e.mean, e.lo, e.hi) if v is not None]
    return _ticks(min(vals), max(vals)) if vals else [0.0, 1.0]


def _y_axis(ticks: Sequence[float], Y, left: float, right: float, label: str, mid: float) -> str:
    out = []
    for t in ticks:
        out.append(f'<line x1="{left}" x2="{right}" y1="{Y(t):.1f}" y2="{Y(t):.1f}" class="grid"/>'
                   f'<text x="{left - 6}" y="{Y(t) + 4:.1f}" class="ax tick" text-anchor="end">{_tick_text(t, ticks)}</text>')
    out.append(f'<text transform="translate(14,{mid:.0f}) rotate(-90)" class="ax" text-anchor="middle">{esc(label)}</text>')
    return "".join(out)


def _ref_lines(refs: Sequence[tuple[float, str]], Y, left: float, right: float) -> str:
    return "".join(f'<line x1="{left}" x2="{right}" y1="{Y(y):.1f}" y2="{Y(y):.1f}" class="ref"><title>{esc(label)}'
                   f"</title></line>" for y, label in refs)


def _colour(v: float, center: float, scale: float, better: str) -> str:
    t = max(-1.0, min(1.0, (v - center) / scale))
    if better == "lower":
        t = -t
    target = _BETTER if t > 0 else _WORSE
    rgb = [round(a + abs(t) * (b - a)) for a, b in zip(_NEUTRAL, target)]
    return "#%02x%02x%02x" % tuple(rgb)


def _heatmap(st: _Study, arms: Sequence[str], metric: _Metric, title: str, fig: str) -> str:
    """Arms x languages; a cell's colour is its mean (blue: better), its text the mean and the +- of its bar."""
    langs = st.langs
    label_w, cw, ch, top = 150, max(44, min(60, 680 // max(len(langs), 1))), 30, 52
    width = max(int(label_w + cw * len(langs) + 16), 820)  # room for the title and the colour key
    height = top + ch * len(arms) + 56
    cells = {(a, l): st.cell(a, l, metric) for a in arms for l in langs}
    means = [e.mean for e in cells.values() if e is not None]
    if metric.center is not None:
        center = metric.center
        scale = max([abs(v - center) for v in means] + [1e-12])
    else:
        center = (min(means) + max(means)) / 2 if means else 0.0
        scale = max((max(means) - min(means)) / 2, 1e-12) if means else 1.0
    parts = _svg_open(title, width, height, fig)
    for j, lang in enumerate(langs):
        parts.append(f'<text x="{label_w + cw * j + cw / 2:.1f}" y="{top - 8}" class="ax" text-anchor="middle">'
                     f"{esc(_short(lang, 7))}</text>")
    for i, arm in enumerate(arms):
        y = top + i * ch
        parts.append(f'<text x="{label_w - 8}" y="{y + ch / 2 + 4:.1f}" class="ax" text-anchor="end">'
                     f"<title>{esc(arm)}</title>{esc(_short(arm, 21))}</text>")
        for j, lang in enumerate(langs):
            e = cells[arm, lang]
            x = label_w + cw * j
            if e is None:
                parts.append(f'<rect class="cell na" x="{x + 1}" y="{y + 1}" width="{cw - 2}" height="{ch - 2}">'
                             f'<title>{esc(arm)} \u00b7 {esc(lang)}: no value</title></rect>'
                             f'<text x="{x + cw / 2:.1f}" y="{y + ch / 2 + 4:.1f}" class="cv" text-anchor="middle">'
                             f"{_DASH}</text>")
                continue
            fill = _colour(e.mean, center, scale, metric.better)
            dark = abs(e.mean - center) / scale > 0.65
            tip = f"{arm} \u00b7 {lang}: {_pm(e, 4)} ({e.seeds} seed{'s' if e.seeds != 1 else ''})"
            spread = (f"\u00b1{_f(e.hi - e.mean, 2)}" if e.kind == "sd" else
                      f"\u00b1{_f((e.hi - e.lo) / 2, 2)}" if e.kind == "ci" else "")
            cls = "cv dk" if dark else "cv"
            parts.append(f'<rect class="cell" x="{x + 1}" y="{y + 1}" width="{cw - 2}" height="{ch - 2}" fill="{fill}" '
                         f'data-value="{e.mean!r}"><title>{esc(tip)}</title></rect>'
                         f'<text x="{x + cw / 2:.1f}" y="{y + 13}" class="{cls}" text-anchor="middle">{_f(e.mean, 2)}</text>'
                         f'<text x="{x + cw / 2:.1f}" y="{y + 25}" class="{cls} sm" text-anchor="middle">{spread}</text>')
    # the colour key: from the best to the worst value drawn
    ky = top + ch * len(arms) + 18
    lo_v, hi_v = center - scale, center + scale
    good, bad = (lo_v, hi_v) if metric.better == "lower" else (hi_v, lo_v)
    steps = 15
    for s in range(steps):
        v = good + (bad - good) * s / (steps - 1)
        fill = _colour(v, center, scale, metric.better)
        parts.append(f'<rect x="{label_w + 70 + s * 14}" y="{ky}" width="14" height="12" fill="{fill}"/>')
    parts.append(f'<text x="{label_w + 64}" y="{ky + 10}" class="lg" text-anchor="end">better {_f(good, 2)}</text>'
                 f'<text x="{label_w + 76 + steps * 14}" y="{ky + 10}" class="lg">{_f(bad, 2)} worse</text>'
                 f'<text x="{label_w + 70}" y="{ky + 30}" class="lg">cell: mean over seeds; \u00b1: sd across seeds, or '
                 f"half the interval of a one-seed arm; {_DASH}: no value</text>")
    parts.append("</svg>")
    return "".join(parts)


def _bars(groups: Sequence[str], series: Sequence[tuple[str, Sequence[Optional[_Est]]]], *, title: str,
          ylabel: str, refs: Sequence[tuple[float, str]], fig: str, domain: Sequence[float] = ()) -> str:
    """Grouped bars from 0 with error bars; a missing value is a dash at 0, never a bar."""
    width, left, right, top, bottom = 820, 64, 14, 36, 62
    height = 350
    pw, ph = width - left - right, height - top - bottom
    ticks = _y_domain([e for _, es in series for e in es], [0.0, *[y for y, _ in refs], *domain])
    y0, y1 = ticks[0], ticks[-1]

    def Y(v: float) -> float:
        return top + ph - ph * (v - y0) / (y1 - y0)

    parts = _svg_open(title, width, height, fig)
    parts.append(_y_axis(ticks, Y, left, left + pw, ylabel, top + ph / 2))
    group = pw / max(len(groups), 1)
    bw = min(group * 0.8 / max(len(series), 1), 34)
    for gi, g in enumerate(groups):
        gx = left + gi * group + (group - bw * len(series)) / 2
        for si, (name, ests) in enumerate(series):
            e = ests[gi]
            cx = gx + si * bw + (bw - 1.5) / 2
            if e is None:
                parts.append(f'<text x="{cx:.1f}" y="{Y(0) - 3:.1f}" class="ax na" text-anchor="middle">{_DASH}'
                             f"<title>{esc(g)} \u00b7 {esc(name)}: no value</title></text>")
                continue
            ya, yb = sorted((Y(0), Y(e.mean)))
            parts.append(f'<rect class="bar" x="{gx + si * bw:.1f}" y="{ya:.1f}" width="{max(bw - 1.5, 1):.1f}" '
                         f'height="{max(yb - ya, 0.5):.1f}" fill="{PALETTE[si % len(PALETTE)]}" data-value="{e.mean!r}">'
                         f"<title>{esc(g)} \u00b7 {esc(name)}: {esc(_pm(e, 4))}</title></rect>")
            if e.lo is not None and e.hi is not None:
                parts.append(_whisker(cx, Y(e.lo), Y(e.hi), min(4.0, bw / 3)))
        parts.append(f'<text x="{left + gi * group + group / 2:.1f}" y="{top + ph + 16}" class="ax" text-anchor="middle">'
                     f"{esc(_short(g, max(4, int(group / 7))))}<title>{esc(g)}</title></text>")
    parts.append(f'<line x1="{left}" x2="{left + pw}" y1="{Y(0):.1f}" y2="{Y(0):.1f}" class="axis"/>')
    parts.append(_ref_lines(refs, Y, left, left + pw))
    items = [(n, PALETTE[i % len(PALETTE)], "box") for i, (n, _) in enumerate(series)]
    items += [(label, "#d7263d", "dash") for _, label in refs]
    parts.append(_legend(items, left, height - 10))
    parts.append("</svg>")
    return "".join(parts)


def _xy(series: Sequence[tuple[str, str, Sequence[tuple[float, _Est]]]], marks: Sequence[tuple[float, _Est, str]], *,
        title: str, xlabel: str, ylabel: str, log_x: bool, x_ticks: Sequence[tuple[float, str]],
        x_range: tuple[float, float], refs: Sequence[tuple[float, str]], fig: str,
        domain: Sequence[float] = (), baseline: Optional[tuple[_Est, str]] = None) -> str:
    """Points with error bars joined per series; ``marks`` are single points drawn as labelled diamonds;
    ``baseline`` an arm with no place on the x axis (English-only at P = 0), drawn as a grey line and band."""
    width, left, right, top, bottom = 820, 64, 20, 36, 70
    height = 360
    pw, ph = width - left - right, height - top - bottom
    ests = [e for _, _, pts in series for _, e in pts] + [e for _, e, _ in marks] + ([baseline[0]] if baseline else [])
    ticks = _y_domain(ests, [*[y for y, _ in refs], *domain])
    y0, y1 = ticks[0], ticks[-1]
    tx = math.log10 if log_x else (lambda v: v)
    a, b = tx(x_range[0]), tx(x_range[1])

    def X(v: float) -> float:
        return left + pw * (tx(v) - a) / (b - a)

    def Y(v: float) -> float:
        return top + ph - ph * (v - y0) / (y1 - y0)

    parts = _svg_open(title, width, height, fig)
    parts.append(_y_axis(ticks, Y, left, left + pw, ylabel, top + ph / 2))
    for v, label in x_ticks:
        parts.append(f'<line x1="{X(v):.1f}" x2="{X(v):.1f}" y1="{top + ph}" y2="{top + ph + 4}" class="axis"/>'
                     f'<text x="{X(v):.1f}" y="{top + ph + 17}" class="ax tick" text-anchor="middle">{esc(label)}</text>')
    parts.append(f'<line x1="{left}" x2="{left + pw}" y1="{top + ph}" y2="{top + ph}" class="axis"/>'
                 f'<text x="{left + pw / 2:.0f}" y="{top + ph + 36}" class="ax" text-anchor="middle">{esc(xlabel)}</text>')
    parts.append(_ref_lines(refs, Y, left, left + pw))
    if baseline is not None:
        e, label = baseline
        if e.lo is not None and e.hi is not None:
            ya, yb = sorted((Y(e.lo), Y(e.hi)))
            parts.append(f'<rect class="band" x="{left}" y="{ya:.1f}" width="{pw}" height="{max(yb - ya, 0.5):.1f}"/>')
        parts.append(f'<line class="base" x1="{left}" x2="{left + pw}" y1="{Y(e.mean):.1f}" y2="{Y(e.mean):.1f}" '
                     f'data-value="{e.mean!r}"><title>{esc(label)}: {esc(_pm(e, 4))}</title></line>')
    for si, (name, color, pts) in enumerate(series):
        pts = sorted(pts, key=lambda p: p[0])
        if len(pts) > 1:
            path = " ".join(f"{X(x):.1f},{Y(e.mean):.1f}" for x, e in pts)
            parts.append(f'<polyline class="line" fill="none" stroke="{color}" stroke-width="2" points="{path}"/>')
        for x, e in pts:
            if e.lo is not None and e.hi is not None:
                parts.append(_whisker(X(x), Y(e.lo), Y(e.hi)))
            parts.append(f'<circle class="pt" cx="{X(x):.1f}" cy="{Y(e.mean):.1f}" r="4" fill="{color}" '
                         f'data-value="{e.mean!r}"><title>{esc(name)} at {esc(_short(str(round(x, 4)), 12))}: '
                         f"{esc(_pm(e, 4))}</title></circle>")
    for x, e, label in marks:
        cx, cy = X(x), Y(e.mean)
        parts.append(f'<line x1="{cx:.1f}" x2="{cx:.1f}" y1="{top}" y2="{top + ph}" class="guide"/>')
        if e.lo is not None and e.hi is not None:
            parts.append(_whisker(cx, Y(e.lo), Y(e.hi)))
        parts.append(f'<path class="pinch" d="M{cx:.1f} {cy - 7:.1f}l7 7-7 7-7-7z" fill="{PALETTE[5]}" '
                     f'data-value="{e.mean!r}"><title>{esc(label)}: {esc(_pm(e, 4))}</title></path>'
                     f'<text x="{cx + 9:.1f}" y="{top + 12}" class="lg">{esc(label)}</text>')
    items = [(name, color, "line") for name, color, _ in series]
    if marks:
        items.append(("pinch", PALETTE[5], "diamond"))
    if baseline is not None:
        items.append((baseline[1], "#5b6475", "line"))
    items += [(label, "#d7263d", "dash") for _, label in refs]
    parts.append(_legend(items, left, height - 10))
    parts.append("</svg>")
    return "".join(parts)


# ---- the figures -------------------------------------------------------------------------------------------
def _figure(fig: str, number: int, svg: str, caption: str) -> str:
    return (f'<figure id="fig-{fig}" data-figure="{fig}">{svg}<figcaption><b>Figure {number}.</b> '
            f"{caption}</figcaption></figure>")


def _omitted(fig: str, number: int, what: str, needs: str) -> str:
    return (f'<p class="note omitted" id="fig-{fig}" data-figure="{fig}"><b>Figure {number} ({esc(what)}) is omitted:</b> '
            f"{esc(needs)}</p>")


def _metric_words(st: _Study, metric: _Metric, *, lines: bool = True) -> str:
    """What a figure's metric is and which direction is better; ``lines``: the figure draws its reference line."""
    if metric.key == "judge":
        parity = f" 0.5 is parity{' (dashed line)' if lines else ''}." if metric.center == 0.5 else ""
        base = st.judge_baseline
        if base is None:
            return (f"Metric: the judge's score ({esc(st.meta['judge'])}) as the study recorded it; "
                    f"<b>higher is better</b>.{parity}")
        against = ("the monolingual arm of the same language (mono-&lt;lang&gt;)" if base == "monolingual"
                   else esc(base))
        missing = (f" Languages without their baseline arm ({esc(', '.join(st.missing_baselines))}) have no score."
                   if st.missing_baselines else "")
        return (f"Metric: side-by-side score of each arm against {against}, judged by {esc(st.meta['judge'])} in "
                f"both orders, (wins + ties/2) / n; <b>higher is better</b>.{parity} The baseline's own cells have "
                f"no score.{missing}")
    if metric.key == "loss":
        return ("Metric: held-out loss in nats per token (no monolingual arm ran, so there is nothing to subtract); "
                "<b>lower is better</b>.")
    return ("Metric: held-out loss minus the held-out loss of the monolingual arm in the same language and seed "
            f"(nats per token); <b>lower is better</b>, below 0{' (dashed line)' if lines else ''} beats monolingual.")


def _reference_words(st: _Study) -> str:
    if not st.mono:
        return ""
    own = [l for l in st.langs if l in st.mono]
    borrowed = [l for l in st.langs if l not in st.mono]
    if set(st.mono) == {"en"}:
        return (" The study ran one monolingual arm, English-only (mono-en), so every language is compared "
                "against English-only.")
    if borrowed and "en" in st.mono:
        return (f" Languages without a monolingual arm of their own ({esc(', '.join(borrowed))}) are compared "
                "against English-only (mono-en).")
    if borrowed:
        return f" Languages without a monolingual arm ({esc(', '.join(borrowed))}) have no value."
    return " Every language is compared against its own monolingual arm (mono-&lt;lang&gt;)."


def _axis(metric: _Metric) -> str:
    return f"{metric.unit} \u00b7 {metric.better} is better"


def _refs(metric: _Metric) -> list[tuple[float, str]]:
    if metric.key == "judge" and metric.center == 0.5:
        return [(0.5, "parity (0.5)")]
    if metric.key == "delta":
        return [(0.0, "monolingual (0)")]
    return []


def _domain(metric: _Metric) -> list[float]:
    return [0.0, 1.0] if metric.key == "judge" and metric.center == 0.5 else []


def _fig_per_language(st: _Study, metric: _Metric, number: int, fig: str) -> str:
    arms = list(st.runs)
    title = f"Score per language, every arm: {metric.name} ({metric.better} is better)"
    caption = (f"{_metric_words(st, metric, lines=False)}{_reference_words(st) if metric.key == 'delta' else ''} "
               f"Rows: arms ({len(arms)}); columns: evaluation languages. Blue is better, vermillion worse. "
               f"{esc(_error_words(st, metric))}")
    return _figure(fig, number, _heatmap(st, arms, metric, title, fig), caption)


def _fig_percent(st: _Study, number: int) -> str:
    metric = st.metric
    percent = st.family("percent")
    pinch = [a for a in st.family("pinch") if st.total(a) > 0]
    if not percent:
        ran = f" (the study ran {', '.join(pinch)}, a single P)" if pinch else ""
        return _omitted("percent", number, "average against P",
                        "it needs the percent-p* arms (family percent: P% of the examples multilingual); "
                        f"none ran{ran}.")
    pts = [(float(st.runs[a][0].param["p"]), st.average(a, st.langs, metric)) for a in percent]
    pts = [(x, e) for x, e in pts if e is not None]
    marks = []
    for a in pinch:
        n = st.runs[a][0].param["n"]
        p = 100.0 * n / st.total(a)
        e = st.average(a, st.langs, metric)
        if e is not None:
            marks.append((p, e, f"{a}: n={n} of {st.total(a):,} = {_pct(p)}"))
    if not pts and not marks:
        return _omitted("percent", number, "average against P", "the percent and pinch arms have no values.")
    xs = [x for x, _ in pts] + [x for x, _, _ in marks]
    lo, hi = min(xs) / 1.6, max(100.0, max(xs)) * 1.25
    cand = [m * 10.0 ** d for d in range(-3, 3) for m in (1, 2, 5)]
    ticks = [(v, _pct(v)) for v in cand if lo <= v <= hi]
    en_only = st.mono.get("en")
    base = st.average(en_only, st.langs, metric) if en_only else None
    mono_en = (f" English-only ({esc(en_only)}, P = 0) has no place on a log axis: its average is the grey line, "
               "its error bar the grey band." if base else "")
    svg = _xy([("percent-p* arms", PALETTE[0], pts)], marks,
              title=f"Average over {len(st.langs)} languages against P: {metric.name}",
              xlabel="P: multilingual examples, % of the tuning set (log scale)", ylabel=_axis(metric), log_x=True,
              x_ticks=ticks, x_range=(lo, hi), refs=_refs(metric), fig="percent", domain=_domain(metric),
              baseline=(base, "English-only, P = 0") if base else None)
    caption = (f"{_metric_words(st, metric)} Each point: the mean over the {len(st.langs)} evaluation languages. "
               f"The pinch (diamond, dotted guide) sits at its share of multilingual examples, n / total examples."
               f"{mono_en} {esc(_error_words(st, metric))}")
    return _figure("percent", number, svg, caption)


def _fig_unseen(st: _Study, number: int) -> str:
    metric = st.metric
    unseen = st.family("unseen")
    seen_l, unseen_l = st.meta["seen"], st.meta["unseen"]
    if not unseen:
        return _omitted("unseen", number, "seen against unseen languages",
                        "it needs the unseen arm (family unseen: tuned on the seen languages only); it did not run.")
    if not seen_l or not unseen_l:
        return _omitted("unseen", number, "seen against unseen languages",
                        f"study[{'seen' if not seen_l else 'unseen'!r}] is empty, so there is nothing to split.")
    others = [a for a in st.runs if a not in unseen and (
        a == st.mono.get("en") or st.runs[a][0].family == "pinch")]
    percent = st.family("percent")
    if percent:
        others.append(max(percent, key=lambda a: st.runs[a][0].param["p"]))
    others += [a for a in st.family("diversity") if st.runs[a][0].param["k"] == len(seen_l)]
    arms = unseen + others
    series = [(f"seen ({', '.join(seen_l)})", [st.average(a, seen_l, metric) for a in arms]),
              (f"unseen ({', '.join(unseen_l)})", [st.average(a, unseen_l, metric) for a in arms])]
    svg = _bars(arms, series, title=f"Seen against unseen languages: {metric.name}", ylabel=_axis(metric),
                refs=_refs(metric), fig="unseen", domain=_domain(metric))
    caption = (f"{_metric_words(st, metric)} The unseen arm ({esc(', '.join(unseen))}) was tuned on the seen languages "
               f"only; beside it, arms for comparison. Bars: the mean over the seen languages and over the unseen ones. "
               f"{esc(_error_words(st, metric))}")
    return _figure("unseen", number, svg, caption)


def _fig_diversity(st: _Study, number: int) -> str:
    metric = st.metric
    arms = st.family("diversity")
    if not arms:
        return _omitted("diversity", number, "average against k",
                        "it needs the diversity-k* arms (family diversity: the same budget over k languages); "
                        "none ran.")
    pts = [(float(st.runs[a][0].param["k"]), st.average(a, st.langs, metric)) for a in arms]
    pts = [(x, e) for x, e in pts if e is not None]
    if not pts:
        return _omitted("diversity", number, "average against k", "the diversity arms have no values.")
    kmax = max(max(x for x, _ in pts), 1.0)
    ticks = [(float(k), str(k)) for k in range(1, int(kmax) + 1)]
    svg = _xy([("diversity-k* arms", PALETTE[2], pts)], [],
              title=f"Average over languages against k, the number of tuning languages: {metric.name}",
              xlabel="k: languages in the tuning set", ylabel=_axis(metric), log_x=False,
              x_ticks=ticks, x_range=(0.5, kmax + 0.5), refs=_refs(metric), fig="diversity", domain=_domain(metric))
    order = st.meta["diversity_order"]
    added = f" Languages are added in the order {esc(', '.join(order))}." if order else ""
    caption = (f"{_metric_words(st, metric)} Each point: the mean over the {len(st.langs)} evaluation languages."
               f"{added} {esc(_error_words(st, metric))}")
    return _figure("diversity", number, svg, caption)


def _fig_bilingual(st: _Study, number: int) -> str:
    metric = st.metric
    arms = st.family("bilingual")
    if not arms:
        return _omitted("bilingual", number, "bilingual pairs",
                        "it needs the bilingual-en-* arms (family bilingual: English + one language X); none ran.")
    xs = []
    for a in arms:
        pair = st.runs[a][0].param["pair"]
        xs.append(next((c for c in pair if c != "en"), pair[-1]))
    on_x = [st.average(a, [x], metric) for a, x in zip(arms, xs)]
    on_en = [st.average(a, ["en"], metric) if "en" in st.langs else None for a in arms]
    rest = [st.average(a, [l for l in st.langs if l not in (x, "en")], metric) for a, x in zip(arms, xs)]
    groups = ["+".join(st.runs[a][0].param["pair"]) for a in arms]
    svg = _bars(groups, [("on X", on_x), ("on English", on_en), ("mean over the other languages", rest)],
                title=f"Bilingual pairs, English + X: {metric.name}", ylabel=_axis(metric), refs=_refs(metric),
                fig="bilingual",
                domain=_domain(metric))
    caption = (f"{_metric_words(st, metric)} One group per pair: the score in X, in English, and the mean over the "
               f"languages in neither. {esc(_error_words(st, metric))}")
    return _figure("bilingual", number, svg, caption)


# ---- tables ------------------------------------------------------------------------------------------------
def _absent(st: _Study) -> list[tuple[str, Optional[str]]]:
    """(line, the study's reason or None) per metric the study did not compute, named as study['absent'] names it."""
    names = list(st.meta["absent"])
    if st.meta["judge"] is None and "judge" not in names:
        names.insert(0, "judge")
    for key in ("judge", "fidelity"):
        if key not in names and not st.has[key]:
            names.append(key)
    lines = []
    for name in names:
        if name == "judge":
            why = ("not configured" if st.meta["judge"] is None else
                   f"configured ({st.meta['judge']}) but no scores were recorded")
            line = f"judge: {why} \u2014 the score columns are absent, not zero."
        elif name == "fidelity":
            line = "fidelity: not computed \u2014 the fidelity columns are absent, not zero."
        else:
            line = f"{name}: not computed \u2014 its columns are absent, not zero."
        lines.append((line, st.absent_reasons.get(name)))
    return lines


def _td(v: Optional[float], digits: int = 3, **attrs) -> str:
    extra = "".join(f' data-{k}="{esc(repr(x) if isinstance(x, float) else x)}"' for k, x in attrs.items()
                    if x is not None)
    if v is None:
        return f'<td class="na"{extra}>{_DASH}</td>'
    return f'<td data-value="{v!r}"{extra}>{_f(v, digits)}</td>'


def _summary_table(st: _Study) -> str:
    cols = ["arm", "family", "param", "langs", "examples", "seeds"]
    loss_cols = (["loss"] + (["\u0394 loss"] if st.mono else [])) if st.has["loss"] else []
    cols += loss_cols
    keys = [k for k in ("judge", "fidelity") if st.has[k]]
    cols += keys
    head = "".join(f"<th>{esc(c)}</th>" for c in cols)
    rows = []
    for arm, runs in st.runs.items():
        r = runs[0]
        train = ", ".join(r.train_languages)
        cells = [f"<td>{esc(arm)}</td>", f"<td>{esc(r.family)}</td>", f"<td>{esc(_param_text(r))}</td>",
                 f'<td title="{esc(train)}">{len(r.train_languages)}</td>', f"<td>{st.total(arm):,}</td>",
                 f"<td>{esc(', '.join(str(x.seed) for x in runs))}</td>"]
        ests = [st.raw_average(arm, "loss")] if loss_cols else []
        if len(loss_cols) == 2:
            ests.append(st.average(arm, st.langs, st.loss_metric))
        ests += [st.raw_average(arm, k) for k in keys]
        cells += [f'<td data-value="{e.mean!r}">{esc(_pm(e))}</td>' if e else f'<td class="na">{_DASH}</td>'
                  for e in ests]
        rows.append(f'<tr data-arm="{esc(arm)}">{"".join(cells)}</tr>')
    return f'<table class="summary"><thead><tr>{head}</tr></thead><tbody>{"".join(rows)}</tbody></table>'


def _lang_table(st: _Study, key: str) -> str:
    """Every run's value per language, exactly as in the results (data-value: the float's repr)."""
    head = "".join(f"<th>{esc(c)}</th>" for c in ["arm", "seed", *st.langs])
    rows = []
    for arm, runs in st.runs.items():
        for r in runs:
            cells = [f"<td>{esc(arm)}</td>", f"<td>{r.seed}</td>"]
            for lang in st.langs:
                m = r.metrics.get(lang)
                if m is None:
                    cells.append(f'<td class="na" data-lang="{esc(lang)}">{_DASH}</td>')
                    continue
                lo, hi = m[f"{key}_lo"], m[f"{key}_hi"]
                cells.append(_td(m[key], lang=lang, lo=lo, hi=hi, n=m["n"]))
            rows.append(f'<tr data-arm="{esc(arm)}" data-seed="{r.seed}">{"".join(cells)}</tr>')
    return (f'<table class="per-lang" data-metric="{key}"><thead><tr>{head}</tr></thead>'
            f'<tbody>{"".join(rows)}</tbody></table>')


def _meta_table(st: _Study) -> str:
    m = st.meta
    n_runs = sum(len(rs) for rs in st.runs.values())
    rows = [["name", m["name"]], ["schema", SCHEMA], ["config hash", m["config_hash"]], ["backend", m["backend"]],
            ["model", m["model"] if m["model"] is not None else "(none: the tiny backend's model)"],
            ["judge", m["judge"] if m["judge"] is not None else "(not configured)"],
            ["languages", ", ".join(m["languages"])], ["seen (tuning languages of the unseen arm)", ", ".join(m["seen"])],
            ["unseen", ", ".join(m["unseen"])], ["seeds", ", ".join(str(s) for s in m["seeds"])],
            ["diversity order", ", ".join(m["diversity_order"]) or "(none)"],
            ["absent metrics", ", ".join(m["absent"]) or "(none)"],
            ["arms", f"{len(st.runs)} arms, {n_runs} runs"], ["created", m["created"]]]
    return f'<div class="meta">{html_table(["key", "value"], rows)}</div>'


# ---- the page ----------------------------------------------------------------------------------------------
_CSS = f"""
body {{ font-family: {_FONT}; margin: 0; background: #f6f7f9; color: #1d2330; }}
main {{ max-width: 900px; margin: 0 auto; padding: 24px 20px 60px; }}
h1 {{ font-size: 26px; margin: 8px 0 2px; }}
h2 {{ font-size: 18px; margin: 34px 0 8px; border-bottom: 1px solid #dde1e8; padding-bottom: 4px; }}
p.sub {{ color: #5b6475; margin: 0 0 18px; font-size: 14px; word-break: break-all; }}
figure {{ background: #fff; border-radius: 10px; margin: 12px 0; padding: 10px 6px 4px;
          box-shadow: 0 1px 2px rgba(0,0,0,.06); overflow-x: auto; }}
figure svg {{ max-width: 100%; height: auto; display: block; }}
figcaption {{ font-size: 13px; color: #5b6475; padding: 4px 14px 8px; }}
svg .tt {{ font: 600 14px {_FONT}; fill: #1d2330; }}
svg .ax, svg .lg {{ font: 12px {_FONT}; fill: #3d4555; }}
svg .cv {{ font: 11px {_FONT}; fill: #1d2330; }} svg .cv.sm {{ font-size: 9.5px; }} svg .cv.dk {{ fill: #fff; }}
svg .cell.na {{ fill: #eceef2; }}
svg .grid {{ stroke: #e6e9ef; }} svg .axis {{ stroke: #8a93a5; }}
svg .err {{ stroke: #1d2330; stroke-width: 1.3; fill: none; }}
svg .ref {{ stroke: #d7263d; stroke-width: 1.6; stroke-dasharray: 5 3; }}
svg .base {{ stroke: #5b6475; stroke-width: 2; }} svg .band {{ fill: #5b6475; fill-opacity: .12; }}
svg .guide {{ stroke: {PALETTE[5]}; stroke-width: 1; stroke-dasharray: 2 3; }}
table {{ border-collapse: collapse; width: 100%; background: #fff; font-size: 12.5px; }}
th, td {{ padding: 4px 7px; text-align: right; border-bottom: 1px solid #eef0f4; white-space: nowrap; }}
th:first-child, td:first-child {{ text-align: left; }} th {{ background: #eef1f6; font-weight: 600; }}
td.na {{ color: #8a93a5; }} .meta td, .meta th {{ text-align: left; white-space: normal; }}
table.summary td:nth-child(-n+3), table.summary th:nth-child(-n+3) {{ text-align: left; }}
.scroll {{ overflow-x: auto; }}
.note {{ font-size: 13px; color: #5b6475; }}
p.omitted {{ background: #fff; border-left: 3px solid #E69F00; padding: 8px 12px; border-radius: 4px; }}
details summary {{ cursor: pointer; font-size: 14px; margin: 10px 0; }}
"""


def render(results: dict) -> str:
    """The study report of ``results`` (the study engine's results dict, schema ``mlmix.study/1``) as HTML.

    The page is self-contained (inline CSS and SVG, no scripts, nothing fetched) and deterministic: the same
    results give the same bytes. Raises ValueError naming the key when ``results`` does not match the
    contract (docs/study_report.md). Values that are NaN or infinite are shown as a dash, never drawn.
    """
    from . import __version__

    st = _Study(results)
    if not st.runs:
        raise ValueError("results['arms'] has no run with status 'done': there is nothing to report "
                         f"({len(st.not_done)} runs not done)")
    m = st.meta
    title = f"mlmix study: {m['name']}"
    sub = (f"{len(st.runs)} arms \u00d7 seeds {', '.join(str(s) for s in m['seeds'])}; backend {m['backend']}"
           f"{', model ' + m['model'] if m['model'] else ''}; judge {m['judge'] or 'not configured'}; "
           f"config {m['config_hash']}; created {m['created']}")
    s: list[str] = []
    s.append("<h2>How to read this report</h2>")
    reference = _reference_words(st) if st.metric.key == "delta" else ""
    s.append(f'<p class="note">{_metric_words(st, st.metric, lines=False)}{reference} {esc(_error_words(st, st.metric))}</p>')
    absent = _absent(st)
    if absent:
        s.append('<ul class="note absent">' + "".join(
            f"<li>{esc(line)}{f' <i>{esc(why)}</i>' if why else ''}</li>" for line, why in absent) + "</ul>")
    if st.not_done:
        s.append(f'<p class="note">Runs not done, left out of every figure and table: '
                 f'{esc(", ".join(f"{r.arm} (seed {r.seed}: {r.status})" for r in st.not_done))}.</p>')
    if st.metric.key == "delta" or (st.metric.key == "judge" and st.judge_baseline == "monolingual"):
        s.append("<h2>Score per language against monolingual</h2>")
    elif st.metric.key == "judge" and st.judge_baseline:
        s.append(f"<h2>Score per language against {esc(st.judge_baseline)}</h2>")
    else:
        s.append("<h2>Score per language, every arm (the monolingual arms among them)</h2>")
    s.append(_fig_per_language(st, st.metric, 1, "per-language"))
    if st.metric.key == "judge" and st.has["loss"]:
        s.append(_fig_per_language(st, st.loss_metric, 1, "per-language-loss").replace(
            "<b>Figure 1.</b>", "<b>Figure 1b.</b> The same, on held-out loss."))
    s.append("<h2>How much multilinguality: the average against P</h2>")
    s.append(_fig_percent(st, 2))
    s.append("<h2>Seen and unseen languages</h2>")
    s.append(_fig_unseen(st, 3))
    s.append("<h2>Language diversity: the average against k</h2>")
    s.append(_fig_diversity(st, 4))
    s.append("<h2>Bilingual pairs</h2>")
    s.append(_fig_bilingual(st, 5))
    s.append("<h2>Results</h2>")
    averaged = (["loss"] + (["\u0394 loss (minus the monolingual arm's; lower is better)"] if st.mono else [])
                if st.has["loss"] else [])
    averaged += [k for k in ("judge", "fidelity") if st.has[k]]
    s.append(f'<p class="note">One row per arm. langs: how many languages it tuned on (hover for which); '
             f"{esc(', '.join(averaged))}: each averaged over the evaluation languages, then mean \u00b1 sd across "
             "seeds (one seed: the value alone; the \u0394 loss of a one-seed arm: its combined interval).</p>")
    if absent:
        s.append('<p class="note absent">' + " ".join(esc(line) for line, _ in absent) + "</p>")
    s.append(f'<div class="scroll">{_summary_table(st)}</div>')
    for key, what in (("loss", "Held-out loss (nats per token; lower is better)"),
                      ("judge", f"Judge score ({m['judge']}; higher is better)"),
                      ("fidelity", "Language fidelity (share of responses in the instruction's language)")):
        if st.has[key]:
            n_rows = sum(len(rs) for rs in st.runs.values())
            s.append(f"<details><summary>{esc(what)} per language, every arm and seed ({n_rows} rows)</summary>"
                     f'<div class="scroll">{_lang_table(st, key)}</div></details>')
    s.append("<h2>The study</h2>")
    s.append(_meta_table(st))
    return ('<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
            f'<meta name="generator" content="mlmix {esc(__version__)} study report">'
            f'<meta name="viewport" content="width=device-width, initial-scale=1"><title>{esc(title)}</title>'
            f"<style>{_CSS}</style></head><body><main><h1>{esc(title)}</h1>"
            f'<p class="sub">{esc(sub)}</p>{"".join(s)}</main></body></html>')


def write_report(results: dict, path: str | os.PathLike) -> str:
    """Render ``results`` (see :func:`render`) and write the HTML atomically to ``path``; returns its absolute path.

    An existing ``path`` is replaced only if it is a report mlmix wrote (``_outputs.check_target``); the
    results are validated before anything is written.
    """
    from ._atomic import atomic_file

    html_text = render(results)
    path = os.path.abspath(os.fspath(path))
    with atomic_file(path, "wb", kind="report", arg="path") as f:
        f.write(html_text.encode("utf-8"))
    return path
