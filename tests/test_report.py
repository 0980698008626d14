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
