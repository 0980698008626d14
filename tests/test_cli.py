"""The ``mlmix`` command line: help everywhere, exit codes, --json, --quiet, build/inspect/report."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

import mlmix
from mlmix.cli import main
from pipeline_data import parallel_rows, train_tiny_bpe, write_jsonl

COMMANDS = ["demo", "build", "inspect", "report", "study", "info"]


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


def test_build_workers(config_path, built, tmp_path, capsys):
    """--workers N runs the per-block work on N processes: the same store; a bad N is a usage error naming it."""
    with pytest.raises(SystemExit) as exc:
        main(["build", str(config_path), "--workers", "0"])
    assert exc.value.code == 2
    assert "--workers: expected an integer >= 1, got '0'" in capsys.readouterr().err
    assert main(["build", str(config_path), "--workers", "2", "--engine", "ray"]) == 1
    assert "--workers only applies with --engine local" in capsys.readouterr().err
    assert main(["build", str(config_path), "--num-cpus", "2"]) == 1
    assert "--num-cpus only applies with --engine ray" in capsys.readouterr().err
    with pytest.raises(ValueError, match=r"workers=2: only the local executor takes it"):
        mlmix.build(str(config_path), engine="ray", workers=2)
    with pytest.raises(ValueError, match=r"concurrency=2: only the Ray executor takes these"):
        mlmix.build(str(config_path), concurrency=2)
    with pytest.raises(ValueError, match=r"workers must be an integer >= 1 .*got 0"):
        mlmix.build(str(config_path), workers=0)
    with pytest.raises(ValueError, match=r"engine must be 'local' or 'ray', got 'spark'"):
        mlmix.build(str(config_path), engine="spark")
    cfg = config_path.read_text().replace('output = "out"', f'output = "{tmp_path / "out2"}"')
    other = config_path.parent / "build-workers.toml"
    other.write_text(cfg)
    assert main(["build", str(other), "--workers", "2", "--no-cache", "--quiet"]) == 0
    for name in os.listdir(built / "store"):
        assert (tmp_path / "out2" / "store" / name).read_bytes() == (built / "store" / name).read_bytes(), name


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
    # every mixture is detailed, and the trained models load with transformers' own classes, offline
    for name in ("english_only", "pinch", "p100"):
        assert f'id="mixture-{name}"' in html
    import transformers

    for name, path in res["models"].items():
        tok = transformers.AutoTokenizer.from_pretrained(path, local_files_only=True)
        model = transformers.AutoModelForCausalLM.from_pretrained(path, local_files_only=True)
        assert tok.chat_template and tok.eos_token == "<|im_end|>" and model.config.vocab_size == len(tok)
    # one umask-derived mode for every file the demo wrote (the report was once 0600, the builds' 0644)
    umask = os.umask(0)
    os.umask(umask)
    odd = {os.path.join(b, f): oct(os.stat(os.path.join(b, f)).st_mode & 0o777)
           for b, _, fs in os.walk(out) for f in fs if os.stat(os.path.join(b, f)).st_mode & 0o777 != 0o666 & ~umask}
    assert not odd


def test_inspect_shows_padding_once_and_cut_examples_as_cut(tmp_path, capsys):
    """An example cut by --max-tokens says so ("first 20 of 31 tokens"), the rows' padding is one marker,
    never one "example" per pad token, and the mixture's parameters read as key=value."""
    import mlmix

    d = tmp_path
    tok = train_tiny_bpe(str(d / "tokenizer.json"))
    data = write_jsonl(str(d / "data.jsonl"), parallel_rows(1))
    cfg = {"output": str(d / "out"), "sources": [{"path": data}], "tokenizer": {"path": tok, "template": "chatml"},
           "mixture": {"recipe": "pinch", "n_multilingual": 3}, "pack": {"seq_len": 512}, "report": False}
    mlmix.build(cfg, quiet=True)
    store = mlmix.open(str(d / "out" / "store"))
    first = int(store[0]["seq_lens"][0])
    assert main(["inspect", str(d / "out"), "-n", "9", "--max-tokens", "20"]) == 0
    out = capsys.readouterr().out
    assert f"[example at 0, first 20 of {first} tokens]" in out
    assert "mixture    pinch(n_multilingual=3), seed 0" in out
    assert "<|endoftext|>" not in out and "1 tokens]" not in out
    pads = [len(store[i]["input_ids"]) - int(store[i]["num_tokens"]) for i in range(len(store))]
    for p in pads:
        if p:
            assert f"[{p:,} pad token{'s' if p != 1 else ''}]" in out
    assert main(["inspect", str(d / "out"), "--json", "--max-tokens", "100000"]) == 0
    info = json.loads(capsys.readouterr().out)
    for s in info["samples"]:
        assert all(ex["shown"] == ex["tokens"] for ex in s["examples"]) and s["not_shown"] == 0
        assert sum(ex["tokens"] for ex in s["examples"]) + s["padding"] == store.seq_len


def test_info_is_human_readable(capsys):
    import mlmix

    assert main(["info"]) == 0
    out = capsys.readouterr().out
    backends = mlmix.build_info()["backends"]
    assert f"backends               {', '.join(backends)}\n" in out or any(
        line.split()[0] == "backends" and line.split(None, 1)[1] == ", ".join(backends) for line in out.splitlines())
    assert "(" not in out and "[" not in out and "True" not in out and "False" not in out


@pytest.mark.parametrize("args", [["info"], ["build", "--help"], ["inspect", "STORE", "--json"]])
def test_closed_stdout_ends_quietly(built, args):
    """`mlmix inspect --json | head -1`: the reader leaves early; mlmix stops without a traceback."""
    args = [str(built) if a == "STORE" else a for a in args]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    code = "import sys; from mlmix.cli import main; sys.exit(main(sys.argv[1:]))"
    proc = subprocess.Popen([sys.executable, "-c", code, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env=env)
    proc.stdout.close()  # the reader is gone before mlmix writes a byte
    err = proc.stderr.read().decode()
    proc.stderr.close()
    rc = proc.wait(timeout=120)
    assert "Traceback" not in err and "BrokenPipe" not in err and "Exception ignored" not in err, err
    assert rc in (0, 141)


def test_stage_order_is_one_truth():
    """README, `mlmix build --help` and docs/config.md state the order the pipeline runs its stages in."""
    import re
    from pathlib import Path

    from mlmix.cache import STAGE_NAMES
    from mlmix.cli import build_parser
    from mlmix.engine import STAGES

    assert tuple(STAGE_NAMES) == tuple(STAGES)
    root = Path(__file__).resolve().parents[1]
    readme = (root / "README.md").read_text(encoding="utf-8")
    tour = " ".join(readme[readme.index("## A five-minute tour"):].split())
    assert re.search(r"read, langid \(language id\), tokenize \([^)]*\), dedup, mix \([^)]*\), pack", tour)
    helptext = " ".join(build_parser()._subparsers._group_actions[0].choices["build"].format_help().split())
    assert "read -> langid -> tokenize -> dedup -> mix -> pack" in helptext
    assert ", ".join(STAGES) in " ".join(build_parser().format_help().split())  # `mlmix --help`'s one-liner
    config_md = " ".join((root / "docs" / "config.md").read_text(encoding="utf-8").split())
    assert "read -> langid -> tokenize -> dedup -> mix -> pack" in config_md
    assert "Stages run in the order " + ", ".join(STAGES) in config_md
    engine_doc = (root / "python" / "mlmix" / "engine" / "__init__.py").read_text(encoding="utf-8").splitlines()[0]
    assert "read -> langid -> tokenize -> dedup -> mix -> pack" in engine_doc
