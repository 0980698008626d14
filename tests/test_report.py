"""The HTML report: content, self-containment, and rendering in headless Chromium."""

from __future__ import annotations

import os
import re
import shutil
import subprocess

import numpy as np
import pytest

from mlmix import report
from pipeline_data import base_config, parallel_rows, train_tiny_bpe, write_jsonl


def _chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    pytest.fail("headless Chromium is needed to test the report: apt-get install -y chromium (.ci/run does)")


def _run_chromium(*args: str) -> subprocess.CompletedProcess:
    cmd = [_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--no-first-run",
           "--disable-dev-shm-usage", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    import mlmix

    d = tmp_path_factory.mktemp("report")
    tok = train_tiny_bpe(str(d / "tokenizer.json"))
    rows = parallel_rows(2)
    rows += [dict(rows[1], id="copy-1"), dict(rows[30], id="copy-30")]  # duplicates in two languages
    rows.append({"id": "xss", "lang": "en", "instruction": "Say <script>alert(1)</script> & more",
                 "response": "<b>not bold</b>"})
    data = write_jsonl(str(d / "data.jsonl"), rows)
    cfg = base_config(str(d), tok, data, report=True)
    return mlmix.build(cfg, quiet=True)


def test_report_content(built):
    out = built["output"]
    with open(os.path.join(out, "report.html"), encoding="utf-8") as f:
        html = f.read()
    assert html == report.render_report(out)
    for heading in ("Examples and tokens per language", "The mixture", "Lengths", "Duplicates removed", "Packing",
                    "Samples"):
        assert f"<h2>{heading}</h2>" in html
    assert html.count("<svg") >= 6
    for lang in ("en", "fr", "de", "ru"):
        assert f">{lang}</text>" in html
    # self-contained and inert: no scripts, no external resources; user text is escaped
    assert "<script" not in html and not re.search(r"(src|href)=\"?https?:", html)
    assert "&lt;script&gt;" in html and "&lt;b&gt;not bold" in html
    removed = built["stages"]["dedup"]["exact_removed"]
    assert sum(removed.values()) >= 2
    assert "Duplicates removed per language" in html


def test_bar_chart_bars_are_proportional():
    svg = report.bar_chart(["a", "b", "c"], [("s", [10, 20, 40])], title="t")
    heights = [float(h) for h in re.findall(r'class="bar"[^>]*height="([\d.]+)"', svg)]
    assert len(heights) == 3
    assert heights[1] == pytest.approx(2 * heights[0], rel=0.02)
    assert heights[2] == pytest.approx(4 * heights[0], rel=0.02)
    assert report._nice_ticks(0) == [0.0, 1.0]
    assert report._nice_ticks(97)[-1] >= 97


def test_report_errors(tmp_path):
    with pytest.raises(FileNotFoundError):
        report.render_report(tmp_path / "missing")
    with pytest.raises(ValueError, match="not the output of mlmix build"):
        report.render_report(tmp_path)


def test_report_renders_in_headless_chromium(built, tmp_path):
    page = "file://" + os.path.join(built["output"], "report.html")
    dom = _run_chromium("--dump-dom", page)
    assert dom.returncode == 0, dom.stderr[-2000:]
    n_svg = dom.stdout.count("<svg")
    assert n_svg >= 6
    assert dom.stdout.count('class="bar"') >= 20

    shot = tmp_path / "report.png"
    res = _run_chromium(f"--screenshot={shot}", "--window-size=900,2400", page)
    assert res.returncode == 0 and shot.is_file(), res.stderr[-2000:]
    from PIL import Image

    img = np.asarray(Image.open(shot).convert("RGB")).astype(int)
    assert img.shape[:2] == (2400, 900)
    # charts are drawn: many pixels in the palette's saturated colours, not just text on a plain background
    saturation = img.max(axis=2) - img.min(axis=2)
    assert (saturation > 80).mean() > 0.02
    assert len(np.unique(img.reshape(-1, 3)[::37], axis=0)) > 50


# ---- what the charts and samples say, measured where a reader sees them -------------------------------
_PROBE = """<script>
const charts = [...document.querySelectorAll('svg.chart')].map(svg => ({
  title: svg.getAttribute('aria-label'),
  bars: [...svg.querySelectorAll('rect.bar')].map(r => {
    const b = r.getBoundingClientRect();
    return [parseFloat(r.dataset.value), b.width, b.height];
  }),
  ticks: [...svg.querySelectorAll('text.tick')].map(t => t.textContent),
}));
const samples = [...document.querySelectorAll('.sample')].map(s => s.innerText);
const pre = document.createElement('pre');
pre.id = 'probe';
pre.textContent = JSON.stringify({charts, samples});
document.body.appendChild(pre);
</script>"""


def _probe(html: str, tmp_path) -> dict:
    """Render ``html`` in headless Chromium and read back, from its layout, every chart's bars (value, width,
    height in CSS pixels) and tick labels, and every sample's text as displayed."""
    import html as html_lib
    import json

    page = tmp_path / "probe.html"
    page.write_text(html.replace("</body>", _PROBE + "</body>"), encoding="utf-8")
    dom = _run_chromium("--dump-dom", "--window-size=900,2000", "file://" + str(page))
    assert dom.returncode == 0, dom.stderr[-2000:]
    m = re.search(r'<pre id="probe">(.*?)</pre>', dom.stdout, re.S)
    assert m, dom.stdout[-2000:]
    return json.loads(html_lib.unescape(m.group(1)))


def _tick_value(label: str) -> float:
    scale = {"k": 1e3, "M": 1e6, "G": 1e9}.get(label[-1:], 1)
    return float(label[:-1] if scale != 1 else label) * scale


@pytest.fixture(scope="module")
def mixtures(tmp_path_factory):
    """Three builds of one corpus (4 languages, 360 sources): everything, a pinch of one example per other
    language beside 357 English ones (a bar 1/360 of the axis: under a pixel if drawn to scale), and English
    only; the last row of each ends in padding."""
    import mlmix

    d = tmp_path_factory.mktemp("mixtures")
    tok = train_tiny_bpe(str(d / "tokenizer.json"))
    data = write_jsonl(str(d / "data.jsonl"), parallel_rows(60))
    out = {}
    for name, mixture in (("all", {"recipe": "all"}), ("pinch", {"recipe": "pinch", "n_multilingual": 3}),
                          ("english_only", {"recipe": "monolingual", "lang": "en"})):
        cfg = base_config(str(d), tok, data, output=str(d / name), cache_dir=str(d / "cache"), mixture=mixture,
                          pack={"seq_len": 1024}, dedup={"exact": False, "near": False})  # the variants stay
        out[name] = mlmix.build(cfg, quiet=True)["output"]
    return out


def test_comparison_report_in_chromium(mixtures, tmp_path):
    """Every mixture is detailed, every bar of a non-zero count is visible (one example beside dozens),
    count axes have whole-number ticks, and padding shows as padding, never as examples."""
    html = report.render_comparison(mixtures, title="three mixtures")
    for name in mixtures:
        assert f'id="mixture-{name}"' in html and f"<h2>Mixture {name}</h2>" in html
    got = _probe(html, tmp_path)
    charts = got["charts"]
    # one detailed set of charts per mixture, plus the overview
    assert sum(c["title"] == "Examples per language" for c in charts) == len(mixtures)
    overview = next(c for c in charts if c["title"] == "Examples per language in each mixture")
    assert len([b for b in overview["bars"] if b[0] > 0]) == 4 + 4 + 1  # all: 4 languages, pinch: 4, English: 1
    for c in charts:
        for value, w, h in c["bars"]:
            if value > 0:
                assert min(w, h) >= 2, f"{c['title']}: a bar of {value} is {w:.1f} x {h:.1f} px"
        for label in c["ticks"]:  # the build charts count examples and tokens: whole numbers only
            assert _tick_value(label) == int(_tick_value(label)), f"{c['title']}: tick {label!r}"
    # the pinch's single examples: tiny against English, but drawn
    pinch_chart = [c for c in charts if c["title"].startswith("Mixture pinch(")]
    assert pinch_chart and sum(1 for v, _, h in pinch_chart[0]["bars"] if v == 1 and h >= 2) == 3

    assert got["samples"]
    for text in got["samples"]:
        assert "<|endoftext|>" not in text  # the tiny tokenizer's pad token
        header = text.splitlines()[0]
        n_examples = int(re.search(r"(\d+) examples?", header).group(1))
        more = re.search(r"── (\d+) more examples? not shown", text)  # past the sample's token limit
        assert text.count("── example ") + (int(more.group(1)) if more else 0) == n_examples
        pads = re.findall(r"\[(\d[\d,]*) pad tokens?\]", text)
        assert len(pads) == 2 and pads[0] == pads[1]  # in the header and once after the examples


def test_count_ticks_are_whole_numbers_and_small_bars_show():
    for vmax in (1, 2, 3, 4, 7, 9, 11, 13, 97, 1234):
        ticks = report._nice_ticks(vmax, 4, integer=True)
        assert all(t == int(t) for t in ticks) and ticks[-1] >= vmax and len(ticks) >= 2, (vmax, ticks)
    assert 2.5 in report._nice_ticks(9, 4)  # measurements may have fractional ticks
    svg = report.bar_chart(["en", "sw"], [("chosen", [5000, 1])], title="t", counts=True)
    heights = [float(h) for h in re.findall(r'class="bar"[^>]*height="([\d.]+)"', svg)]
    assert heights[1] >= report.MIN_BAR_PX and heights[0] > 100
    assert ">2.50<" not in report.histogram(np.array([1, 1, 2, 3, 3, 3, 9, 9, 9, 9, 9, 9, 9, 9, 9]), title="h",
                                            xlabel="tokens", bins=5, integer_x=True)
