"""The ``mlmix`` command line: help everywhere, exit codes, --json, --quiet, build/inspect/report."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

from mlmix.cli import main
from pipeline_data import parallel_rows, train_tiny_bpe, write_jsonl

COMMANDS = ["demo", "build", "inspect", "report", "info"]


@pytest.fixture(scope="module")
def config_path(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli")
    tok = train_tiny_bpe(str(d / "tokenizer.json"))
    write_jsonl(str(d / "data.jsonl"), parallel_rows(2))
    (d / "build.toml").write_text(textwrap.dedent(f"""
        output = "out"
        [[sources]]
        path = "data.jsonl"
        [tokenizer]
        path = "{tok}"
        template = "chatml"
        [pack]
        seq_len = 256
    """))
    return d / "build.toml"


@pytest.fixture(scope="module")
def built(config_path):
    assert main(["build", str(config_path), "--quiet"]) == 0
    return config_path.parent / "out"


@pytest.mark.parametrize("cmd", COMMANDS)
def test_help_for_every_command(cmd, capsys):
    with pytest.raises(SystemExit) as exc:
        main([cmd, "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: mlmix {cmd}") and "--json" in out and "--quiet" in out


def test_top_level_help_and_usage_errors(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert all(c in out for c in COMMANDS)
    assert main([]) == 2
    with pytest.raises(SystemExit) as exc:
        main(["frobnicate"])
    assert exc.value.code == 2
    with pytest.raises(SystemExit) as exc:
        main(["build"])  # CONFIG is required
    assert exc.value.code == 2
    with pytest.raises(SystemExit) as exc:
        main(["build", "x.toml", "--quiet", "--verbose"])  # mutually exclusive
    assert exc.value.code == 2


def test_bad_config_exits_1_naming_the_key(tmp_path, capsys):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("output: o\nsources:\n  - path: a.jsonl\n  - path: b.jsonl\n    fields: {text: 3}\ntokenizer: {name: qwen}\n")
    assert main(["build", str(cfg)]) == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    assert "sources[1].fields.text: expected a string, got 3" in captured.err
    assert main(["build", str(tmp_path / "missing.toml")]) == 1
    assert "does not exist" in capsys.readouterr().err


def test_build_json_summary_and_quiet(config_path, built, capsys):
    capsys.readouterr()
    assert main(["build", str(config_path), "--json"]) == 0
    captured = capsys.readouterr()
    summary = json.loads(captured.out)
    assert summary["output"] == str(built) and summary["sequences"] > 0
    assert set(summary["timings"]) == {"read", "langid", "tokenize", "dedup", "mix", "pack"}
    assert all(t["cached"] for t in summary["timings"].values())
    assert captured.err == ""  # --json keeps stderr free of stage lines too
    assert main(["build", str(config_path), "--quiet"]) == 0
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err == ""
    assert main(["build", str(config_path), "--no-progress"]) == 0
    captured = capsys.readouterr()
    assert "wrote" in captured.out
    for stage in ("read", "langid", "tokenize", "dedup", "mix", "pack"):
        assert f"\n{stage} " in "\n" + captured.err


def test_inspect(built, capsys):
    assert main(["inspect", str(built), "--json", "-n", "2"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert set(info["langs"]) == {"en", "fr", "de", "ru"}
    assert info["sequences"] > 0 and 0 < info["efficiency"] <= 1
    assert 1 <= len(info["samples"]) <= 2
    assert info["tokenizer"]["num_ids"] > 0 and len(info["tokenizer"]["vocab_sha256"]) == 64
    text = info["samples"][0]["examples"][0]["text"]
    assert "<|im_start|>user" in text and "[[" in text
    assert main(["inspect", str(built / "store")]) == 0  # the store directory itself works too
    out = capsys.readouterr().out
    assert "efficiency" in out and "trained tokens in [[ ]]" in out
    assert f"tokenizer  {info['tokenizer']['num_ids']:,} ids, vocabulary sha256 " in out
    assert main(["inspect", str(built.parent / "nope")]) == 1
    assert "does not exist" in capsys.readouterr().err
    assert main(["inspect", str(built.parent)]) == 1
    assert "not the output of mlmix build" in capsys.readouterr().err


def test_report_command(built, tmp_path, capsys):
    target = tmp_path / "r.html"
    assert main(["report", str(built), "-o", str(target), "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == {"report": str(target)}
    html = target.read_text(encoding="utf-8")
    assert html.startswith("<!DOCTYPE html>") and html.count("<svg") >= 5


def test_console_entry_point_runs():
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    proc = subprocess.run([sys.executable, "-m", "mlmix", "build", "--help"], capture_output=True, text=True, env=env,
                          timeout=60)
    assert proc.returncode == 0 and "usage: mlmix build" in proc.stdout


def test_demo_smoke(tmp_path, capsys):
    """The demo end to end with a token training budget (the real one trains longer)."""
    from mlmix.data import DEMO_LANGUAGES

    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--steps", "2", "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert set(res["heldout"]) == {"english_only", "pinch"}
    for model in res["heldout"].values():
        assert set(model) == set(DEMO_LANGUAGES) and all(v > 0 for v in model.values())
    assert res["mixtures"]["english_only"] == {"en": 64}
    assert sum(res["mixtures"]["pinch"].values()) == 64 and res["mixtures"]["pinch"]["en"] == 64 - 11
    assert sum(res["mixtures"]["p100"].values()) == 64 and len(res["mixtures"]["p100"]) == 12
    with open(res["report"], encoding="utf-8") as f:
        html = f.read()
    assert "Demo: English-only against the pinch" in html and html.count("<svg") >= 8
