"""The study report: figures drawn (in headless Chromium), omitted figures explained, absent metrics stated,
input validated, numbers exact, output deterministic and inert."""

from __future__ import annotations

import copy
import html as html_lib
import json
import math
import os
import random
import re
import statistics
from html.parser import HTMLParser

import numpy as np
import pytest

from mlmix import study_report
from test_report import _run_chromium

LANGS = ["ar", "zh", "cs", "en", "et", "fi", "he", "hi", "it", "ru", "es", "sw"]
SEEN = ["en", "ar", "fi", "it", "ru", "sw"]
UNSEEN = ["cs", "et", "he", "hi", "es", "zh"]
ORDER = ["en", "ar", "fi", "it", "ru", "sw", "cs", "et", "he", "hi", "es", "zh"]
TOTAL = 4640


def _spread(n: int, langs: list[str]) -> dict[str, int]:
    """``n`` examples spread as evenly as whole numbers allow over ``langs`` (the first get the remainder)."""
    q, r = divmod(n, len(langs))
    return {l: q + (1 if i < r else 0) for i, l in enumerate(langs)}


def _mixture(family: str, param: dict) -> dict[str, int]:
    others = [l for l in LANGS if l != "en"]
    if family == "monolingual":
        return {param["lang"]: TOTAL}
    if family == "pinch":
        return {"en": TOTAL - param["n"], **_spread(param["n"], others)}
    if family == "percent":
        multi = round(TOTAL * param["p"] / 100)
        return {"en": TOTAL - multi, **_spread(multi, others)} if param["p"] < 100 else _spread(TOTAL, LANGS)
    if family == "unseen":
        return _spread(TOTAL, SEEN)
    if family == "diversity":
        return _spread(TOTAL, ORDER[: param["k"]])
    if family == "bilingual":
        return _spread(TOTAL, param["pair"])
    return _spread(TOTAL, LANGS)  # temperature, unimax: every language, in shares the tests do not read


def study_results(*, arms: str = "full", seeds=(0, 1, 2), judge: bool = True, fidelity: bool = True) -> dict:
    """A results dict as the study engine writes it (schema mlmix.study/1), with plausible numbers.

    ``arms``: "full" (every family: 12 monolingual arms, the pinch, P in 1..100, unseen, k = 1..6, 11 bilingual
    pairs, two temperatures, unimax) or "reduced" (English-only, the pinch, a temperature and unimax).
    A language's loss falls the more of its examples an arm tuned on, and a little with every other language
    (the transfer the paper measures); the judge score, side by side against the monolingual arm of the language,
    rises the same way and is null in the baseline's own cell; each seed adds its own noise. Extra keys the engine
    writes (absent_reasons, judge_baseline, per-run and per-cell details) are there too: the report ignores or
    reads them.
    """
    if arms == "full":
        spec = [("monolingual", {"lang": l}, f"mono-{l}") for l in LANGS]
        spec += [("pinch", {"n": 40}, "pinch-n40")]
        spec += [("percent", {"p": p}, f"percent-p{p}") for p in (1, 5, 10, 25, 50, 100)]
        spec += [("unseen", {}, "unseen")]
        spec += [("diversity", {"k": k}, f"diversity-k{k}") for k in range(1, 7)]
        spec += [("bilingual", {"pair": ["en", x]}, f"bilingual-en-{x}") for x in LANGS if x != "en"]
        spec += [("temperature", {"alpha": a}, f"temperature-a{a}") for a in (0.3, 0.7)]
        spec += [("unimax", {}, "unimax")]
    else:
        spec = [("monolingual", {"lang": "en"}, "mono-en"), ("pinch", {"n": 40}, "pinch-n40"),
                ("temperature", {"alpha": 0.3}, "temperature-a0.3"), ("unimax", {}, "unimax")]
    absent = ([] if judge else ["judge"]) + ([] if fidelity else ["fidelity"])
    out = {
        "schema": "mlmix.study/1",
        "study": {"name": f"pinch-{arms}", "config_hash": "9f2c4e1ab37d5c60", "backend": "tiny", "model": None,
                  "languages": list(LANGS), "seen": list(SEEN), "unseen": list(UNSEEN), "seeds": list(seeds),
                  "judge": "qwen-judge-7b" if judge else None, "absent": absent, "diversity_order": list(ORDER),
                  "created": "2026-12-06T22:00:00+00:00",
                  "absent_reasons": {k: f"no {k} was configured (set [{k}] to add it)" for k in absent},
                  "judge_baseline": "monolingual" if judge else None, "judge_missing_baselines": [],
                  "heldout_records": 600},
        "arms": [],
    }
    for family, param, arm in spec:
        mix = _mixture(family, param)
        for seed in seeds:
            rng = random.Random(f"{arm}/{seed}")
            metrics = {}
            for i, lang in enumerate(LANGS):
                share = mix.get(lang, 0) / TOTAL
                breadth = sum(1 for v in mix.values() if v) / len(LANGS)
                loss = 3.2 + 0.05 * i - 0.55 * share ** 0.25 - 0.15 * breadth + rng.gauss(0, 0.02)
                half = 0.04 + 0.01 * rng.random()
                score = min(0.97, max(0.03, 0.2 + 0.45 * share ** 0.25 + 0.2 * breadth + rng.gauss(0, 0.03)))
                judged = judge and arm != f"mono-{lang}"  # the baseline is not judged against itself
                fid = min(1.0, 0.5 + share + 0.1 * rng.random())
                metrics[lang] = {"loss": loss, "loss_lo": loss - half, "loss_hi": loss + half, "n": 50 + i,
                                 "tokens": 900 + 7 * i,
                                 "judge": score if judged else None, "judge_lo": score - 0.08 if judged else None,
                                 "judge_hi": score + 0.08 if judged else None,
                                 "fidelity": fid if fidelity else None, "fidelity_lo": fid - 0.1 if fidelity else None,
                                 "fidelity_hi": min(1.0, fid + 0.1) if fidelity else None,
                                 **({"wins": 30, "ties": 4, "losses": 16, "invalid": 0, "baseline": f"mono-{lang}"}
                                    if judged else {})}
            out["arms"].append({"arm": arm, "family": family, "param": copy.deepcopy(param),
                                "train_languages": [l for l in LANGS if mix.get(l, 0) > 0], "mixture": mix,
                                "seed": seed, "status": "done", "metrics": metrics, "run": f"{arm}-{seed:04d}",
                                "cached": False, "examples": TOTAL, "seconds": {"train": 12.5}})
    return out


@pytest.fixture(scope="module")
def full():
    return study_results()


@pytest.fixture(scope="module")
def full_html(full):
    return study_report.render(full)


# ---- reading the page back -------------------------------------------------------------------------------
class _Cells(HTMLParser):
    """Rows of the per-language tables: (metric, arm, seed, lang, data attributes, text)."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.cells: list[dict] = []
        self.tags: list[str] = []
        self.links: list[str] = []  # src and href attributes: what a browser would fetch or follow
        self._metric = self._row = self._cell = None

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        self.tags.append(tag)
        self.links += [v for k, v in attrs if k in ("src", "href")]
        if tag == "table" and "per-lang" in (a.get("class") or ""):
            self._metric = a["data-metric"]
        elif tag == "tr" and self._metric and "data-seed" in a:
            self._row = a
        elif tag == "td" and self._row is not None and "data-lang" in a:
            self._cell = {"metric": self._metric, "arm": self._row["data-arm"], "seed": int(self._row["data-seed"]),
                          **a, "text": ""}

    def handle_endtag(self, tag):
        if tag == "td" and self._cell is not None:
            self.cells.append(self._cell)
            self._cell = None
        elif tag == "tr":
            self._row = None
        elif tag == "table":
            self._metric = None

    def handle_data(self, data):
        if self._cell is not None:
            self._cell["text"] += data


def _parse(page: str) -> _Cells:
    p = _Cells()
    p.feed(page)
    return p


def _omitted(page: str) -> dict[str, str]:
    return {m.group(1): re.sub(r"<[^>]+>", "", m.group(2)) for m in
            re.finditer(r'<p class="note omitted" id="fig-[^"]+" data-figure="([^"]+)">(.*?)</p>', page, re.S)}


_PROBE = """<script>
const figs = [...document.querySelectorAll('figure')].map(f => {
  const svg = f.querySelector('svg'); const b = svg.getBoundingClientRect();
  const marks = [...svg.querySelectorAll('rect.bar, rect.cell, circle.pt, path.pinch')].map(m => {
    const r = m.getBoundingClientRect(); return [r.width, r.height]; });
  return {figure: f.dataset.figure, width: b.width, height: b.height, marks,
          whiskers: svg.querySelectorAll('path.err').length, caption: f.querySelector('figcaption').innerText};
});
const pre = document.createElement('pre'); pre.id = 'probe'; pre.textContent = JSON.stringify(figs);
document.body.appendChild(pre);
</script>"""


def _console_messages(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if "CONSOLE" in line or "Uncaught" in line]


def _render_in_chromium(page: str, tmp_path) -> tuple[list[dict], str]:
    """Every figure as laid out by Chromium (size, drawn marks, whiskers, caption), and its console output."""
    path = tmp_path / "probe.html"
    path.write_text(page.replace("</body>", _PROBE + "</body>"), encoding="utf-8")
    dom = _run_chromium("--dump-dom", "--window-size=1000,2000", "--enable-logging=stderr", "--v=0",
                        "file://" + str(path))
    assert dom.returncode == 0, dom.stderr[-2000:]
    m = re.search(r'<pre id="probe">(.*?)</pre>', dom.stdout, re.S)
    assert m, dom.stdout[-2000:]
    return json.loads(html_lib.unescape(m.group(1))), dom.stderr


# ---- the figures ---------------------------------------------------------------------------------------------
def test_full_grid_draws_every_figure_in_chromium(full, tmp_path):
    path = study_report.write_report(full, str(tmp_path / "study.html"))
    with open(path, encoding="utf-8") as f:
        page = f.read()
    assert page == study_report.render(full) and os.path.isabs(path)
    assert "<script" not in page and _parse(page).links == []  # self-contained and inert: CSS and SVG inline
    figs, stderr = _render_in_chromium(page, tmp_path)
    assert _console_messages(stderr) == []
    by_name = {f["figure"]: f for f in figs}
    assert sorted(by_name) == ["bilingual", "diversity", "per-language", "per-language-loss", "percent", "unseen"]
    assert _omitted(page) == {}
    for f in figs:
        assert f["width"] > 300 and f["height"] > 150, f
        assert f["marks"] and all(w > 0 and h > 0 for w, h in f["marks"]), f["figure"]
        assert f["whiskers"] > 0 or f["figure"].startswith("per-language"), f["figure"]
        assert "better" in f["caption"] and "sd across seeds" in f["caption"]
    # what each figure holds: 40 arms x 12 languages; P: 6 percent arms + the pinch; unseen: the unseen arm and
    # 4 others (English-only, pinch, P=100, k=6) x seen/unseen; k = 1..6; 11 pairs x 3 bars
    assert len(by_name["per-language"]["marks"]) == 40 * 12
    assert len(by_name["percent"]["marks"]) == 6 + 1
    assert len(by_name["unseen"]["marks"]) == 5 * 2
    assert len(by_name["diversity"]["marks"]) == 6
    assert len(by_name["bilingual"]["marks"]) == 11 * 3
    assert ("side-by-side score of each arm against the monolingual arm of the same language (mono-<lang>), judged "
            "by qwen-judge-7b") in by_name["per-language"]["caption"]
    assert "higher is better" in by_name["per-language"]["caption"]
    assert "lower is better" in by_name["per-language-loss"]["caption"]

    shot = tmp_path / "study.png"
    res = _run_chromium(f"--screenshot={shot}", "--window-size=1000,3000", "file://" + path)
    assert res.returncode == 0 and shot.is_file(), res.stderr[-2000:]
    from PIL import Image

    img = np.asarray(Image.open(shot).convert("RGB")).astype(int)
    saturation = img.max(axis=2) - img.min(axis=2)
    assert (saturation > 60).mean() > 0.03  # the heatmap and the bars are painted, not just text


def test_console_check_sees_console_errors(tmp_path):
    """The check above is not vacuous: a page that logs an error is caught by it."""
    figs, stderr = _render_in_chromium(
        '<html><body><figure data-figure="x"><svg width="10" height="10"><rect class="bar" width="5" height="5"/>'
        '</svg><figcaption>c</figcaption></figure><script>console.error("boom")</script></body></html>', tmp_path)
    assert any("boom" in line for line in _console_messages(stderr))
    assert figs[0]["width"] == 10


def test_pinch_is_placed_at_its_percentage_on_a_log_axis(full_html):
    fig = re.search(r'<figure id="fig-percent".*?</figure>', full_html, re.S).group(0)
    assert "pinch-n40: n=40 of 4,640 = 0.86%" in fig  # 40 / 4640 = 0.862%
    ticks = re.findall(r'class="ax tick" text-anchor="middle">([^<]+)<', fig)
    assert {"1%", "10%", "100%"} <= set(ticks)
    xs = {t: float(x) for x, t in re.findall(r'<text x="([\d.]+)" y="[\d.]+" class="ax tick" text-anchor="middle">'
                                             r"([^<]+)<", fig)}
    pinch_x = float(re.search(r'<path class="pinch" d="M([\d.]+) ', fig).group(1))
    decade = xs["10%"] - xs["1%"]
    assert xs["100%"] - xs["10%"] == pytest.approx(decade, abs=0.2)  # log scale: equal decades
    assert pinch_x == pytest.approx(xs["1%"] + decade * math.log10(40 / 4640 * 100), abs=0.2)


def test_averages_are_mean_and_sd_across_seeds(full, full_html):
    """The P figure's points and the table's means are the per-seed average over languages, then mean +- sd."""
    runs = [r for r in full["arms"] if r["arm"] == "percent-p10"]
    per_seed = [statistics.fmean(m["judge"] for m in r["metrics"].values()) for r in runs]
    mean, sd = statistics.fmean(per_seed), statistics.stdev(per_seed)
    fig = re.search(r'<figure id="fig-percent".*?</figure>', full_html, re.S).group(0)
    values = [float(v) for v in re.findall(r'<circle class="pt"[^>]*data-value="([^"]+)"', fig)]
    assert any(v == pytest.approx(mean, rel=1e-12) for v in values)
    row = re.search(r'<tr data-arm="percent-p10">(.*?)</tr>', full_html).group(1)
    assert f"{mean:.3f} \u00b1 {sd:.3f}" in html_lib.unescape(row)
    # the loss figure subtracts the monolingual arm of each language, seed by seed
    fi = {r["seed"]: r["metrics"]["fi"]["loss"] for r in full["arms"] if r["arm"] == "mono-fi"}
    diffs = [r["metrics"]["fi"]["loss"] - fi[r["seed"]] for r in runs]
    cells = re.search(r'<figure id="fig-per-language-loss".*?</figure>', full_html, re.S).group(0)
    tip = f"percent-p10 \u00b7 fi: {statistics.fmean(diffs):.4f} \u00b1 {statistics.stdev(diffs):.4f} (3 seeds)"
    assert html_lib.escape(tip) in cells


def test_reduced_study_explains_the_omitted_figures(tmp_path):
    res = study_results(arms="reduced", seeds=(0,), judge=False, fidelity=False)
    page = study_report.render(res)
    notes = _omitted(page)
    assert sorted(notes) == ["bilingual", "diversity", "percent", "unseen"]
    assert "percent-p*" in notes["percent"] and "pinch-n40" in notes["percent"]
    assert "unseen arm" in notes["unseen"] and "diversity-k*" in notes["diversity"]
    assert "bilingual-en-*" in notes["bilingual"]
    assert all(n.count("\n") == 0 and len(n) < 220 for n in notes.values())  # one line each
    assert page.count("<svg") == 1  # the per-language figure only: no empty charts
    fig = re.search(r'<figure id="fig-per-language".*?</figure>', page, re.S).group(0)
    assert "compared against English-only" in fig and "lower is better" in fig
    assert "every arm ran one seed" in fig  # one seed: the runs' own intervals are the error bars
    figs, stderr = _render_in_chromium(page, tmp_path)
    assert _console_messages(stderr) == [] and len(figs) == 1 and figs[0]["height"] > 100
    assert len(figs[0]["marks"]) == 4 * 12


def test_no_judge_states_the_absent_columns_and_invents_no_scores():
    res = study_results(judge=False, seeds=(0, 1))
    page = study_report.render(res)
    assert "judge: not configured \u2014 the score columns are absent, not zero." in page
    assert "<th>judge</th>" not in page and 'data-metric="judge"' not in page
    assert "per-language-loss" not in page  # the loss is the main metric: one heatmap
    fig = re.search(r'<figure id="fig-per-language".*?</figure>', page, re.S).group(0)
    assert "lower is better" in fig and "judge score" not in fig and "higher is better" not in fig
    assert {c["metric"] for c in _parse(page).cells} == {"loss", "fidelity"}
    # judge numbers claimed by a study that has no judge are refused, not drawn
    bad = copy.deepcopy(res)
    bad["arms"][3]["metrics"]["fi"]["judge"] = 0.7
    with pytest.raises(ValueError, match=r"\['arms'\]\[3\]\['metrics'\]\['fi'\]\['judge'\] must be null"):
        study_report.render(bad)


def test_table_numbers_are_the_input_numbers(full, full_html):
    cells = _parse(full_html).cells
    runs = {(r["arm"], r["seed"]): r for r in full["arms"]}
    assert len(cells) == len(runs) * 12 * 3  # loss, judge and fidelity tables
    blanks = 0
    for c in cells:
        m = runs[c["arm"], c["seed"]]["metrics"][c["data-lang"]]
        v = m[c["metric"]]
        assert int(c["data-n"]) == m["n"]
        if v is None:  # the monolingual baseline's own judge cell: no score, and none shown
            blanks += 1
            assert c["text"] == "\u2014" and "data-value" not in c and "data-lo" not in c
            continue
        assert float(c["data-value"]) == v  # exact: the float's repr
        assert c["text"] == f"{v:.3f}"
        assert float(c["data-lo"]) == m[c["metric"] + "_lo"] and float(c["data-hi"]) == m[c["metric"] + "_hi"]
    assert blanks == 12 * 3  # mono-<lang> in <lang>, three seeds


def test_same_input_same_bytes(full, tmp_path):
    a = study_report.write_report(full, str(tmp_path / "a.html"))
    shuffled = copy.deepcopy(full)
    random.Random(1).shuffle(shuffled["arms"])  # the order of the runs in the file does not matter either
    b = study_report.write_report(shuffled, str(tmp_path / "b.html"))
    with open(a, "rb") as fa, open(b, "rb") as fb:
        assert fa.read() == fb.read()
    assert study_report.render(full) == study_report.render(full)
    # and in another process, whose str hashes (set and dict orders of strings) differ
    import hashlib
    import subprocess
    import sys

    code = ("import hashlib, sys; sys.path.insert(0, sys.argv[1]); from test_study_report import study_results; "
            "from mlmix import study_report; "
            "print(hashlib.sha256(study_report.render(study_results()).encode()).hexdigest())")
    out = subprocess.run([sys.executable, "-c", code, os.path.dirname(os.path.abspath(__file__))], check=True,
                         capture_output=True, text=True, env={**os.environ, "PYTHONHASHSEED": "12345"}).stdout
    assert out.strip() == hashlib.sha256(study_report.render(full).encode()).hexdigest()


def test_write_report_replaces_only_its_own_output(full, tmp_path):
    from mlmix._outputs import OutputError

    mine = tmp_path / "report.html"
    assert study_report.write_report(full, mine) == str(mine)
    study_report.write_report(full, mine)  # its own report: replaced
    theirs = tmp_path / "notes.html"
    theirs.write_text("<html>a user's page</html>")
    with pytest.raises(OutputError):
        study_report.write_report(full, theirs)
    assert theirs.read_text() == "<html>a user's page</html>"
    with pytest.raises(ValueError, match="schema"):
        study_report.write_report({"schema": "other"}, tmp_path / "never.html")
    assert not (tmp_path / "never.html").exists()
    assert sorted(os.listdir(tmp_path)) == ["notes.html", "report.html"]  # no temporary left behind


def _rename_lang(res: dict, old: str, new: str) -> None:
    """Give language ``old`` the code ``new`` everywhere the results name it."""
    def swap(codes):
        return [new if c == old else c for c in codes]

    st = res["study"]
    for k in ("languages", "seen", "unseen", "diversity_order"):
        st[k] = swap(st[k])
    for r in res["arms"]:
        r["train_languages"] = swap(r["train_languages"])
        for k in ("mixture", "metrics"):
            r[k] = {new if c == old else c: v for c, v in r[k].items()}
        if r["param"].get("lang") == old:
            r["param"]["lang"] = new
        if "pair" in r["param"]:
            r["param"]["pair"] = swap(r["param"]["pair"])


def test_hostile_strings_are_escaped(tmp_path):
    res = study_results(arms="reduced", seeds=(0, 1))
    _rename_lang(res, "sw", '"><script>alert(5)</script>')
    evil = "<script>alert(1)</script>"
    res["study"]["model"] = evil
    res["study"]["name"] = '"><img src=x onerror=alert(2)>'
    res["study"]["judge"] = "</title><script>alert(3)</script>"
    res["study"]["created"] = "<iframe src=//x>"
    for r in res["arms"]:
        if r["arm"] == "unimax":
            r["arm"] = "uni<b onmouseover=alert(4)>max</b>&amp;"
    page = study_report.render(res)
    parsed = _parse(page)
    assert not set(parsed.tags) & {"script", "img", "iframe"} and parsed.links == []  # nothing runs or is fetched
    assert "<script" not in page and "<img" not in page and "<iframe" not in page and "<b onmouseover" not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "uni&lt;b onmouseover=alert(4)&gt;max&lt;/b&gt;&amp;amp;" in page
    assert "&quot;&gt;&lt;script&gt;alert(5)" in page  # the language code, in text and in attributes
    figs, stderr = _render_in_chromium(page, tmp_path)
    assert _console_messages(stderr) == [] and len(figs) == 2  # judge and loss heatmaps


def test_non_finite_values_render_as_a_dash():
    res = study_results(arms="reduced", seeds=(0,), judge=False)
    metrics = res["arms"][1]["metrics"]  # pinch-n40
    metrics["fi"].update(loss=float("nan"), loss_lo=float("nan"), loss_hi=float("nan"))
    metrics["sw"]["loss"] = float("inf")
    metrics["ar"]["fidelity"] = float("-inf")
    del res["arms"][2]["metrics"]["zh"]  # a language the run has no value for
    page = study_report.render(res)
    assert "nan" not in page.lower().replace("nanum", "") and "inf<" not in page and "Infinity" not in page
    cells = {(c["metric"], c["arm"], c["data-lang"]): c for c in _parse(page).cells}
    for key in (("loss", "pinch-n40", "fi"), ("loss", "pinch-n40", "sw"), ("fidelity", "pinch-n40", "ar"),
                ("loss", "temperature-a0.3", "zh")):
        assert cells[key]["text"] == "\u2014" and "data-value" not in cells[key], key
    fig = re.search(r'<figure id="fig-per-language".*?</figure>', page, re.S).group(0)
    assert "pinch-n40 \u00b7 fi: no value" in html_lib.unescape(fig)
    # the other languages keep their values, and the averages skip the missing one
    assert cells["loss", "pinch-n40", "en"]["text"] == f"{metrics['en']['loss']:.3f}"


def _set(d: dict, path: tuple, value):
    for k in path[:-1]:
        d = d[k]
    if value is _DELETE:
        del d[path[-1]]
    else:
        d[path[-1]] = value


_DELETE = object()


@pytest.mark.parametrize("path, value, message", [
    ((), None, "results must be a dict"),
    (("schema",), "mlmix.study/2", r"results\['schema'\] must be 'mlmix.study/1'"),
    (("study",), _DELETE, r"results lacks the key 'study'"),
    (("study", "languages"), _DELETE, r"results\['study'\] lacks the key 'languages'"),
    (("study", "seeds"), "0,1", r"results\['study'\]\['seeds'\] must be a non-empty list of distinct integers"),
    (("study", "backend"), "gpu", r"\['backend'\] must be 'tiny' or 'hf'"),
    (("study", "unseen"), ["cs", "xx"], r"\['unseen'\] must be languages of study"),
    (("arms",), [], r"results\['arms'\] must be a non-empty list"),
    (("arms", 0, "metrics"), _DELETE, r"results\['arms'\]\[0\] lacks the key 'metrics'"),
    (("arms", 0, "family"), "trilingual", r"results\['arms'\]\[0\]\['family'\] must be one of monolingual"),
    (("arms", 0, "param"), {"language": "en"}, r"results\['arms'\]\[0\]\['param'\] lacks the key 'lang'"),
    (("arms", 2, "param", "n"), "40", r"\['arms'\]\[2\]\['param'\]\['n'\] must be an integer > 0, got '40'"),
    (("arms", 0, "seed"), 1.5, r"\['arms'\]\[0\]\['seed'\] must be an integer"),
    (("arms", 0, "seed"), 7, r"\['arms'\]\[0\]\['seed'\] must be one of study\['seeds'\]"),
    (("arms", 0, "metrics", "fi", "loss"), "2.3", r"\['metrics'\]\['fi'\]\['loss'\] must be a number or null, got '2.3'"),
    (("arms", 0, "metrics", "fi", "loss"), True, r"\['fi'\]\['loss'\] must be a number or null, got True"),
    (("arms", 0, "metrics", "fi", "n"), -1, r"\['fi'\]\['n'\] must be an integer >= 0"),
    (("arms", 0, "metrics", "fi"), _DELETE, None),  # a language without values: allowed (a dash)
    (("arms", 0, "metrics", "xx"), {}, r"\['arms'\]\[0\]\['metrics'\] must be keyed by languages"),
    (("arms", 0, "mixture", "en"), -3, r"\['arms'\]\[0\]\['mixture'\] must be a dict of language -> example count"),
    (("arms", 2, "arm"), "mono-en", r"\['arms'\]\[2\] must be unique per arm and seed"),
    (("arms", 1, "param", "lang"), "fi", r"\['arms'\]\[1\] must be the family and param of the other seeds"),
    (("study", "absent"), ["judge", "fidelity"], r"\['fidelity'\] must be null: study\['absent'\] lists 'fidelity'"),
])
def test_malformed_results_raise_value_error_naming_the_key(path, value, message):
    res = study_results(arms="reduced", seeds=(0, 1), judge=False)
    if path:
        _set(res, path, value)
    else:
        res = value
    if message is None:
        assert "<svg" in study_report.render(res)
        return
    with pytest.raises(ValueError, match=message):
        study_report.render(res)


def test_runs_not_done_are_listed_not_drawn():
    res = study_results(arms="reduced", seeds=(0, 1), judge=False)
    res["arms"][-1]["status"] = "failed"  # unimax, seed 1
    page = study_report.render(res)
    assert "unimax (seed 1: failed)" in page
    assert [c["seed"] for c in _parse(page).cells if c["arm"] == "unimax" and c["data-lang"] == "en"] == [0, 0]


def test_arms_with_one_seed_beside_arms_with_several():
    """An arm run once shows its own interval; a monolingual arm missing a seed is subtracted as its seeds' mean."""
    res = study_results()
    res["arms"] = [r for r in res["arms"] if not (r["arm"] in ("mono-fi", "pinch-n40") and r["seed"] != 0)]
    page = html_lib.unescape(study_report.render(res))
    fig = re.search(r'<figure id="fig-per-language-loss".*?</figure>', page, re.S).group(0)
    assert "mean \u00b1 sd across seeds; an arm that ran one seed shows its own interval (loss_lo..loss_hi)" in fig
    mono_fi = next(r for r in res["arms"] if r["arm"] == "mono-fi")["metrics"]["fi"]["loss"]
    pinch = next(r for r in res["arms"] if r["arm"] == "pinch-n40")["metrics"]["fi"]
    lo, d, hi = (pinch[k] - mono_fi for k in ("loss_lo", "loss", "loss_hi"))
    assert f"pinch-n40 \u00b7 fi: {d:.4f} [{lo:.4f}, {hi:.4f}] (1 seed)" in fig
    diffs = [r["metrics"]["fi"]["loss"] - mono_fi for r in res["arms"] if r["arm"] == "percent-p10"]
    assert f"percent-p10 \u00b7 fi: {statistics.fmean(diffs):.4f} \u00b1 {statistics.stdev(diffs):.4f} (3 seeds)" in fig


def test_judge_captions_name_the_baseline_and_absent_metrics_their_reason():
    res = study_results(arms="reduced", seeds=(0, 1), fidelity=False)
    page = html_lib.unescape(study_report.render(res))
    assert "<h2>Score per language against monolingual</h2>" in page
    assert "The baseline's own cells have no score." in page
    assert ("fidelity: not computed \u2014 the fidelity columns are absent, not zero. "
            "<i>no fidelity was configured (set [fidelity] to add it)</i>") in page
    res["study"]["judge_baseline"] = "mono-en"
    page = html_lib.unescape(study_report.render(res))
    assert "<h2>Score per language against mono-en</h2>" in page and "against mono-en, judged by" in page
    del res["study"]["judge_baseline"]  # an engine that does not say: the score is shown as recorded
    page = html_lib.unescape(study_report.render(res))
    assert "the judge's score (qwen-judge-7b) as the study recorded it" in page


def test_unseen_figure_needs_both_language_groups():
    res = study_results(seeds=(0,), judge=False)
    res["study"]["unseen"] = []  # a study over languages that all were tuned on
    notes = _omitted(study_report.render(res))
    assert list(notes) == ["unseen"] and "study['unseen'] is empty" in html_lib.unescape(notes["unseen"])
