"""The build pipeline: config validation, readers, langid, the stage cache, and end-to-end builds."""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from mlmix import readers
from mlmix.cache import StageCache
from mlmix.config import ConfigError, load_config, validate_config
from pipeline_data import PARALLEL, base_config, parallel_rows, train_tiny_bpe, write_jsonl

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def tok_path(tmp_path_factory):
    return train_tiny_bpe(str(tmp_path_factory.mktemp("tok") / "tokenizer.json"))


@pytest.fixture()
def data_path(tmp_path):
    rows = parallel_rows()
    rows.append(dict(rows[0], id="dup-exact"))  # an exact duplicate of row 0 under another id
    return write_jsonl(str(tmp_path / "data.jsonl"), rows)


def _cfg(tmp_path, tok_path, data_path, **kw):
    return base_config(str(tmp_path), tok_path, data_path, **kw)


# ---- config ------------------------------------------------------------------------------------
MINIMAL = {"output": "out", "sources": [{"path": "a.jsonl"}], "tokenizer": {"name": "qwen"}}


@pytest.mark.parametrize(
    "patch, message",
    [
        ({"sources": [{"path": "a.jsonl"}, {"path": "b.jsonl", "fields": {"text": 3}}]},
         "sources[1].fields.text: expected a string, got 3"),
        ({"sources": []}, "sources: expected at least 1 item(s)"),
        ({"sources": [{"paht": "a.jsonl"}]}, "sources[0].paht: unknown key"),
        ({"sources": [{"format": "jsonl"}]}, "sources[0].path: required key is missing"),
        ({"pack": {"seq_len": 1}}, "pack.seq_len: expected a value >= 2, got 1"),
        ({"pack": {"strategy": "greedy"}}, "pack.strategy: expected one of 'bfd', 'ffd', 'wrapped', 'bfd_split', got 'greedy'"),
        ({"dedup": {"threshold": 0}}, "dedup.threshold: expected a value > 0.0, got 0"),
        ({"dedup": {"exact": "yes"}}, "dedup.exact: expected true or false, got 'yes'"),
        ({"langid": {"threshold": 1.5}}, "langid.threshold: expected a value <= 1.0, got 1.5"),
        ({"mixture": {"recipe": "pinchh"}}, "mixture.recipe: expected one of"),
        ({"tokenizer": {"name": "qwen", "path": "t.json"}}, "tokenizer: give exactly one of"),
        ({"tokenizer": {}}, "tokenizer: give exactly one of"),
        ({"seed": -1}, "seed: expected a value >= 0, got -1"),
        ({"output": 5}, "output: expected a string, got 5"),
    ],
)
def test_config_errors_name_the_key_path(patch, message):
    cfg = {**MINIMAL, **patch}
    with pytest.raises(ConfigError) as exc:
        validate_config(cfg)
    assert str(exc.value).startswith(message), str(exc.value)


def test_config_missing_required_and_wrong_type():
    with pytest.raises(ConfigError, match=r"^output: required key is missing"):
        validate_config({"sources": [{"path": "a"}], "tokenizer": {"name": "qwen"}})
    with pytest.raises(ConfigError, match=r"^config: expected a table"):
        validate_config(["not", "a", "mapping"])


def test_config_toml_and_yaml_agree_and_resolve_paths(tmp_path):
    (tmp_path / "c.toml").write_text(textwrap.dedent("""
        output = "built"
        [[sources]]
        path = "data/*.jsonl"
        lang = "en"
        [tokenizer]
        path = "tok/tokenizer.json"
        [mixture]
        recipe = "pinch"
        n_multilingual = 40
    """))
    (tmp_path / "c.yaml").write_text(textwrap.dedent("""
        output: built
        sources:
          - path: data/*.jsonl
            lang: en
        tokenizer: {path: tok/tokenizer.json}
        mixture: {recipe: pinch, n_multilingual: 40}
    """))
    a, b = load_config(tmp_path / "c.toml"), load_config(tmp_path / "c.yaml")
    assert a == b
    assert a["output"] == str(tmp_path / "built")
    assert a["cache_dir"] == str(tmp_path / "built") + ".cache"
    assert a["sources"][0]["path"] == str(tmp_path / "data" / "*.jsonl")
    assert a["tokenizer"]["path"] == str(tmp_path / "tok" / "tokenizer.json")
    assert a["mixture"] == {"recipe": "pinch", "n_multilingual": 40, "seed": 0}
    assert a["pack"] == {"seq_len": 2048, "strategy": "bfd", "overlong": "error"}


def test_config_parse_errors_name_the_file(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("output = \n")
    with pytest.raises(ConfigError, match="bad.toml"):
        load_config(bad)
    with pytest.raises(ConfigError, match="expected a .toml, .yaml"):
        load_config(_touch(tmp_path / "c.ini"))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_config(tmp_path / "missing.toml")


def _touch(p):
    p.write_text("x")
    return p


# ---- readers -----------------------------------------------------------------------------------
def _src(path, **kw):
    return validate_config({"output": "o", "tokenizer": {"name": "qwen"}, "sources": [{"path": str(path), **kw}]})["sources"][0]


def test_readers_every_format_gives_the_same_records(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq
    import zstandard
    from datasets import Dataset

    rows = parallel_rows(1)[:10]
    write_jsonl(tmp_path / "a.jsonl", rows)
    with gzip.open(tmp_path / "a.jsonl.gz", "wt", encoding="utf-8") as f:
        f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    (tmp_path / "a.jsonl.zst").write_bytes(
        zstandard.ZstdCompressor().compress((tmp_path / "a.jsonl").read_bytes()))
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "a.parquet")
    Dataset.from_list(rows).save_to_disk(str(tmp_path / "hf"))
    expected = list(readers.iter_source(_src(tmp_path / "a.jsonl")))
    assert len(expected) == 10 and expected[0]["messages"][1]["role"] == "assistant"
    for name, fmt in (("a.jsonl.gz", "auto"), ("a.jsonl.zst", "auto"), ("a.parquet", "auto"), ("hf", "hf-disk"), ("hf", "auto")):
        got = list(readers.iter_source(_src(tmp_path / name, format=fmt)))
        # the same records; only where each was read differs
        strip = lambda recs: [{k: v for k, v in r.items() if k != "where"} for r in recs]  # noqa: E731
        assert strip(got) == strip(expected), name


def test_readers_field_mappings(tmp_path):
    sharegpt = {"uid": 7, "language": "fr", "conversations": [{"from": "human", "value": "Bonjour"}, {"from": "gpt", "value": "Salut"}]}
    alpaca = {"instruction": "Translate", "input": "cat", "output": "chat"}
    custom = {"q": "2+2?", "a": "4", "sys": "Be brief.", "who": "en"}
    text = {"text": "plain pre-training text"}
    write_jsonl(tmp_path / "s.jsonl", [sharegpt])
    write_jsonl(tmp_path / "a.jsonl", [alpaca])
    write_jsonl(tmp_path / "c.jsonl", [custom])
    write_jsonl(tmp_path / "t.jsonl", [text])
    [r] = readers.iter_source(_src(tmp_path / "s.jsonl", id_field="uid", lang_field="language"))
    assert r.pop("where").endswith(":1")
    assert r == {"id": "7", "lang": "fr", "messages": [{"role": "user", "content": "Bonjour"}, {"role": "assistant", "content": "Salut"}]}
    [r] = readers.iter_source(_src(tmp_path / "a.jsonl", lang="en"))
    assert r["lang"] == "en" and r["messages"][0]["content"] == "Translate\n\ncat" and r["messages"][1]["content"] == "chat"
    [r] = readers.iter_source(_src(tmp_path / "c.jsonl", records="prompt_response", lang_field="who",
                                   fields={"prompt": "q", "response": "a", "system": "sys"}))
    assert [m["role"] for m in r["messages"]] == ["system", "user", "assistant"] and r["lang"] == "en"
    [r] = readers.iter_source(_src(tmp_path / "t.jsonl"))
    assert r["text"] == "plain pre-training text" and r["lang"] is None and r["id"].endswith(":1")


def test_readers_where_filter_limit_and_glob(tmp_path):
    rows = [{"id": i, "split": "train" if i % 4 else "test", "prompt": "p", "response": "r"} for i in range(20)]
    write_jsonl(tmp_path / "p1.jsonl", rows[:10])
    write_jsonl(tmp_path / "p2.jsonl", rows[10:])
    got = list(readers.iter_source(_src(tmp_path / "p*.jsonl", where={"split": "test"})))
    assert [r["id"] for r in got] == ["0", "4", "8", "12", "16"]
    got = list(readers.iter_source(_src(tmp_path, limit=3)))  # a directory: every data file in it, sorted
    assert [r["id"] for r in got] == ["0", "1", "2"]


@pytest.mark.parametrize(
    "line, message",
    [
        ('{"prompt": "p", "response": 3}', r"data.jsonl:1: field 'response' must be a string"),
        ('{"messages": [{"role": "wizard", "content": "x"}]}', r"data.jsonl:1: messages\[0\].role = 'wizard' is not a known role"),
        ('{"messages": [{"role": "user", "content": "x"}]}', "no assistant turn"),
        ('{"prompt": "p"', r"data.jsonl:1: not valid JSON"),
        ('[1, 2]', "expected a JSON object per line"),
        ('{"foo": "bar"}', "could not find a prompt"),
    ],
)
def test_readers_bad_records_name_file_and_line(tmp_path, line, message):
    (tmp_path / "data.jsonl").write_text(line + "\n")
    with pytest.raises(ValueError, match=message):
        list(readers.iter_source(_src(tmp_path / "data.jsonl")))


@pytest.mark.parametrize("suffix", [".jsonl", ".jsonl.gz", ".jsonl.zst"])
def test_readers_invalid_utf8_names_file_and_line(tmp_path, suffix):
    import gzip

    import zstandard

    good = '{"prompt": "caf\u00e9", "response": "r"}\r\n'.encode()
    data = good + b"\n" + b'{"prompt": "ab\xff", "response": "r"}\n'
    pack = {".jsonl": bytes, ".jsonl.gz": gzip.compress, ".jsonl.zst": zstandard.ZstdCompressor().compress}[suffix]
    (tmp_path / ("data" + suffix)).write_bytes(pack(data))
    it = readers.iter_source(_src(tmp_path / ("data" + suffix)))
    assert next(it)["messages"][0]["content"] == "caf\u00e9"  # CRLF line ends and blank lines are fine
    with pytest.raises(ValueError, match=r"data\.jsonl(\.gz|\.zst)?:3: not valid UTF-8 at byte 14 of the line "
                                         r"\(invalid start byte: b'\\xff"):
        next(it)


def test_readers_missing_paths(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        readers.expand_paths(_src(tmp_path / "nope.jsonl"))
    with pytest.raises(FileNotFoundError, match="matches no"):
        readers.expand_paths(_src(tmp_path / "*.jsonl"))


def test_hub_source_without_network_is_a_clear_error(monkeypatch):
    import datasets

    def offline(*a, **k):
        raise ConnectionError("no route to host")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(ValueError, match="hub sources need network access"):
        list(readers.iter_source(_src("org/some-dataset", format="hub")))


# ---- langid ------------------------------------------------------------------------------------
def test_langid_identifies_and_uses_the_unknown_bucket():
    from mlmix.langid import identify

    texts = [PARALLEL["fr"][0], PARALLEL["de"][1], PARALLEL["ru"][2], "", "   "]
    langs, probs = identify(texts, threshold=0.5)
    assert langs == ["fr", "de", "ru", "unknown", "unknown"]
    assert all(p > 0.5 for p in probs[:3])
    langs, _ = identify(texts[:3], threshold=1.0, unknown="??")
    assert set(langs) <= {"??", "fr", "de", "ru"} and "??" in langs or all(p == 1.0 for p in probs[:3])
    langs, _ = identify([PARALLEL["fr"][0]], languages=["en", "de"])
    assert langs[0] in ("en", "de", "unknown")
    with pytest.raises(ValueError, match="does not know"):
        identify(["x"], languages=["xx-not-a-code"])


# ---- cache -------------------------------------------------------------------------------------
def test_cache_verifies_checksums_and_discards_corrupt_entries(tmp_path):
    cache = StageCache(tmp_path / "c")

    def write(d):
        np.save(os.path.join(d, "a.npy"), np.arange(100))

    d = cache.save("stage", "k1", write)
    assert cache.load("stage", "k1") == d
    with open(os.path.join(d, "a.npy"), "r+b") as f:
        f.seek(-3, 2)
        f.write(b"\xff\xff\xff")
    assert cache.load("stage", "k1") is None
    assert cache.discarded == ["stage/k1"] and not os.path.exists(d)
    d = cache.save("stage", "k1", write)
    os.remove(os.path.join(d, "entry.json"))
    assert cache.load("stage", "k1") is None
    d = cache.save("stage", "k1", write)
    open(os.path.join(d, "stray"), "w").close()  # a file the checksums do not cover
    assert cache.load("stage", "k1") is None


def test_cache_entry_of_another_format_is_recomputed_without_a_corruption_warning(tmp_path):
    """An entry an older mlmix wrote (format 1: sha256 checksums) is not found, and not reported as damaged."""
    import hashlib
    import json

    cache = StageCache(tmp_path / "c")
    d = cache.save("stage", "k1", lambda t: np.save(os.path.join(t, "a.npy"), np.arange(100)))
    with open(os.path.join(d, "entry.json"), encoding="utf-8") as f:
        meta = json.load(f)
    with open(os.path.join(d, "a.npy"), "rb") as f:
        meta.update(format=1, files={"a.npy": hashlib.sha256(f.read()).hexdigest()})
    with open(os.path.join(d, "entry.json"), "w", encoding="utf-8") as f:
        json.dump(meta, f)
    assert cache.load("stage", "k1") is None
    assert cache.discarded == [] and not os.path.exists(d)
    d = cache.save("stage", "k1", lambda t: np.save(os.path.join(t, "a.npy"), np.arange(100)))
    assert cache.load("stage", "k1") == d


def test_cache_write_failure_leaves_no_entry(tmp_path):
    cache = StageCache(tmp_path / "c")

    def write(d):
        np.save(os.path.join(d, "a.npy"), np.arange(10))
        raise RuntimeError("killed")

    with pytest.raises(RuntimeError):
        cache.save("stage", "k", write)
    assert cache.load("stage", "k") is None
    assert os.listdir(tmp_path / "c" / "stage") == []


# ---- end to end --------------------------------------------------------------------------------
def _store_bytes(out: str) -> dict:
    res = {}
    store = os.path.join(out, "store")
    for base, _, files in os.walk(store):
        for f in sorted(files):
            p = os.path.join(base, f)
            with open(p, "rb") as fh:
                res[os.path.relpath(p, store)] = fh.read()
    return res


def test_build_end_to_end(tmp_path, tok_path, data_path):
    import mlmix

    summary = mlmix.build(_cfg(tmp_path, tok_path, data_path, report=True), quiet=True)
    n_rows = len(parallel_rows()) + 1
    st = summary["stages"]
    assert st["read"]["records"] == n_rows
    assert sum(st["dedup"]["exact_removed"].values()) >= 1 and st["dedup"]["exact_removed"].get("en", 0) >= 1
    assert summary["langs"] == {lang: 24 for lang in PARALLEL}
    store = mlmix.open(summary["store"])
    assert len(store) == summary["sequences"] > 0
    seq = store[0]
    assert np.asarray(seq["input_ids"]).shape == (256,)
    assert summary["tokens"] == sum(st["tokens_by_lang"]["mix"].values())
    assert 0 < summary["efficiency"] <= 1
    assert os.path.isfile(os.path.join(summary["output"], "report.html"))
    with open(os.path.join(summary["output"], "build.json"), encoding="utf-8") as f:
        assert json.load(f)["key"] == summary["key"]
    # trained tokens decode back to assistant responses only
    from tokenizers import Tokenizer

    hf = Tokenizer.from_file(os.path.join(summary["output"], "tokenizer.json"))
    labels = np.asarray(seq["labels"])
    trained_text = hf.decode(np.asarray(seq["input_ids"])[labels != -100].tolist(), skip_special_tokens=False)
    assert "<|im_start|>user" not in trained_text
    # the store records the vocabulary it was tokenized with; the loader checks a model's tokenizer against it
    from mlmix.tokenize import vocab_fingerprint

    assert store.vocab_fingerprint == vocab_fingerprint(tok_path) == st["tokenize"]["vocab"]
    store.check_tokenizer(tok_path)
    store.check_tokenizer(hf)


def test_build_is_deterministic(tmp_path, tok_path, data_path):
    import mlmix

    a = mlmix.build(_cfg(tmp_path / "a", tok_path, data_path), quiet=True)
    b = mlmix.build(_cfg(tmp_path / "b", tok_path, data_path), quiet=True)
    assert _store_bytes(a["output"]) == _store_bytes(b["output"])


def test_pack_shard_sequences_writes_the_same_rows_in_shards(tmp_path, tok_path, data_path):
    import mlmix

    one = mlmix.build(_cfg(tmp_path / "one", tok_path, data_path), quiet=True)
    cfg = _cfg(tmp_path / "sharded", tok_path, data_path)
    cfg["pack"]["shard_sequences"] = 3
    sharded = mlmix.build(cfg, quiet=True)
    a, b = mlmix.open(one["store"]), mlmix.open(sharded["store"])
    assert a.num_shards == 1 and b.num_shards == -(-len(b) // 3) > 1
    assert len(a) == len(b)
    for i in range(len(a)):
        assert np.array_equal(a[i]["input_ids"], b[i]["input_ids"])
        assert np.array_equal(a[i]["labels"], b[i]["labels"])


def test_rerun_redoes_only_what_changed(tmp_path, tok_path, data_path):
    import mlmix

    cfg = _cfg(tmp_path, tok_path, data_path)
    first = mlmix.build(cfg, quiet=True)
    assert not any(t["cached"] for t in first["timings"].values())
    again = mlmix.build(cfg, quiet=True)
    assert all(t["cached"] for t in again["timings"].values())
    assert again["key"] == first["key"]

    cfg["pack"] = {"seq_len": 512}
    t = mlmix.build(cfg, quiet=True)["timings"]
    assert [s for s in t if not t[s]["cached"]] == ["pack"]

    cfg["dedup"] = {"near": False}
    t = mlmix.build(cfg, quiet=True)["timings"]
    assert [s for s in t if not t[s]["cached"]] == ["dedup", "mix", "pack"]

    # a source whose bytes change (same size, new mtime) invalidates everything downstream of read
    with open(data_path, "r+b") as f:
        f.seek(2)
        f.write(b"I")
    os.utime(data_path, ns=(1, 1))
    t = mlmix.build(cfg, quiet=True)["timings"]
    assert not any(v["cached"] for v in t.values())


def test_tokenizer_loads_during_the_read_only_when_the_tokenize_stage_runs(tmp_path, tok_path, data_path,
                                                                          monkeypatch):
    """The local executor loads the tokenizer on a thread while the records are read: a build whose tokenize stage
    is cached loads none, an error loading it is raised as before (and after a failed read, the read's error is
    the one raised), and the output is the one a build without the early load writes."""
    import threading

    import mlmix
    from mlmix.engine.stages import tokenize as s_tok

    real = s_tok.load_tokenizer
    loads: list[str] = []

    def counting(tcfg):
        loads.append(threading.current_thread().name)
        return real(tcfg)

    monkeypatch.setattr(s_tok, "load_tokenizer", counting)
    cfg = _cfg(tmp_path, tok_path, data_path)
    first = mlmix.build(cfg, quiet=True)
    assert loads == ["mlmix-ahead"]
    first_bytes = {name: (tmp_path / "out" / "store" / name).read_bytes() for name in ("tokens.bin", "loss_mask.bin")}
    cfg["pack"] = {"seq_len": 512}
    mlmix.build(cfg, quiet=True)  # tokenize cached: nothing loaded
    assert loads == ["mlmix-ahead"]
    # the same output as the tokenizer loaded in the stage itself (two worker processes: no early load)
    other = _cfg(tmp_path / "w", tok_path, data_path)
    second = mlmix.build(other, quiet=True, workers=2)
    assert loads[1:] == ["MainThread"]
    assert first["key"] == second["key"]
    for name, want in first_bytes.items():
        assert (tmp_path / "w" / "out" / "store" / name).read_bytes() == want, name

    def failing(tcfg):
        raise OSError("tokenizer file went away")

    monkeypatch.setattr(s_tok, "load_tokenizer", failing)
    with pytest.raises(OSError, match="tokenizer file went away"):
        mlmix.build(_cfg(tmp_path / "x", tok_path, data_path), quiet=True)
    bad = _cfg(tmp_path / "y", tok_path, data_path)
    bad["sources"] = [{"path": str(tmp_path / "no-such.jsonl")}]
    with pytest.raises(FileNotFoundError, match="no-such"):
        mlmix.build(bad, quiet=True)


def test_corrupt_cache_is_recomputed_to_the_same_output(tmp_path, tok_path, data_path):
    import mlmix

    cfg = _cfg(tmp_path, tok_path, data_path)
    first = mlmix.build(cfg, quiet=True)
    before = _store_bytes(first["output"])
    tok_dir = os.path.join(cfg["output"] + ".cache", "tokenize")
    [entry] = os.listdir(tok_dir)
    values = os.path.join(tok_dir, entry, "tokens", "values.npy")
    with open(values, "r+b") as f:
        f.seek(-1, 2)
        f.write(b"\x01" if f.read(1) != b"\x01" else b"\x02")
    again = mlmix.build(cfg, quiet=True, use_cache=True)
    assert again["cache_discarded"] == [f"tokenize/{entry}"]
    assert not again["timings"]["tokenize"]["cached"]
    assert _store_bytes(again["output"]) == before


_KILL_SCRIPT = """
import os, signal, sys, json
import numpy as np
import mlmix
cfg = json.loads(sys.argv[1])
stage = sys.argv[2]
# die with SIGKILL (no cleanup, as a killed process) while the chosen stage writes its output
real_save = np.save
def dying_save(path, *a, **k):
    real_save(path, *a, **k)
    if stage in str(path) or (stage == "pack" and "/store" in str(path)) or (stage == "pack" and "lengths" in str(path)):
        os.kill(os.getpid(), signal.SIGKILL)
np.save = dying_save
mlmix.build(cfg, quiet=True)
"""


@pytest.mark.parametrize("stage", ["tokenize", "pack"])
def test_killed_build_resumes_without_corrupt_output(tmp_path, tok_path, data_path, stage):
    import mlmix

    clean = mlmix.build(_cfg(tmp_path / "clean", tok_path, data_path), quiet=True)
    cfg = _cfg(tmp_path / "killed", tok_path, data_path)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    proc = subprocess.run([sys.executable, "-c", _KILL_SCRIPT, json.dumps(cfg), stage], env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == -9, proc.stderr
    assert not os.path.exists(cfg["output"])  # no half-written output under the real name
    resumed = mlmix.build(cfg, quiet=True)
    cached = {s for s, t in resumed["timings"].items() if t["cached"]}
    assert {"read", "langid"} <= cached and stage not in cached
    assert _store_bytes(resumed["output"]) == _store_bytes(clean["output"])


def test_build_from_a_config_file_and_bad_inputs(tmp_path, tok_path, data_path):
    import mlmix

    (tmp_path / "c.yaml").write_text(textwrap.dedent(f"""
        output: out
        sources: [{{path: {data_path}}}]
        tokenizer: {{path: {tok_path}, template: chatml}}
        pack: {{seq_len: 256}}
        report: false
    """))
    s = mlmix.build(tmp_path / "c.yaml", quiet=True)
    assert s["output"] == str(tmp_path / "out") and s["sequences"] > 0
    with pytest.raises(ValueError, match=r"longer than pack.seq_len = 16"):
        mlmix.build(_cfg(tmp_path, tok_path, data_path, pack={"seq_len": 16}), quiet=True)
    with pytest.raises(FileNotFoundError, match="tokenizer.path"):
        mlmix.build(_cfg(tmp_path, str(tmp_path / "none.json"), data_path), quiet=True)


@pytest.mark.parametrize("policy", ["truncate", "drop", "split"])
def test_overlong_policies(tmp_path, tok_path, data_path, policy):
    import mlmix

    s = mlmix.build(_cfg(tmp_path, tok_path, data_path, pack={"seq_len": 64, "overlong": policy}), quiet=True)
    p = s["stages"]["pack"]
    assert p["overlong"] > 0
    assert p[{"truncate": "truncated", "drop": "dropped", "split": "split"}[policy]] == p["overlong"]
    mix = s["stages"]["mix"]
    assert p["examples"] == mix["examples"]
    tokens_in = sum(s["stages"]["tokens_by_lang"]["mix"].values())
    if policy == "split":
        assert p["tokens"] == tokens_in  # every token is kept, in pieces
    else:
        assert p["tokens"] + p["tokens_dropped"] == tokens_in
        assert p["tokens_dropped"] > 0
    store = mlmix.open(s["store"])
    assert store.num_tokens == p["tokens"] and len(store) == p["sequences"]


def test_langid_fills_missing_languages(tmp_path, tok_path):
    import mlmix

    rows = [{k: v for k, v in r.items() if k != "lang"} for r in parallel_rows(1)]
    data = write_jsonl(str(tmp_path / "nolang.jsonl"), rows)
    s = mlmix.build(_cfg(tmp_path, tok_path, data), quiet=True)
    assert s["stages"]["langid"]["identified"] == len(rows)
    assert {"en", "fr", "de", "ru"} <= set(s["langs"])


def test_pinch_recipe_through_the_pipeline(tmp_path, tok_path, data_path):
    import mlmix

    s = mlmix.build(_cfg(tmp_path, tok_path, data_path, mixture={"recipe": "pinch", "n_multilingual": 6,
                                                                       "languages": ["en", "fr", "de", "ru"]},
                         langid={"backend": "none"}), quiet=True)
    counts = s["langs"]
    n_sources = 24  # parallel_rows(4): 4 variants x 6 sentences, each in every language
    assert sum(counts.values()) == n_sources
    assert counts["en"] == n_sources - 6
    assert sorted(counts[l] for l in ("fr", "de", "ru")) == [2, 2, 2]
    assert os.path.isfile(os.path.join(s["output"], "mixture.json"))
    mixture = mlmix.Mixture.load(os.path.join(s["output"], "mixture.json"))
    assert mixture.counts() == counts


def test_pinch_on_own_data_defaults_to_its_languages(tmp_path, tok_path):
    """A pinch on data in three languages (none of them all the study's 12) with the recipe's defaults: the
    mixture's languages are the data's, the study's order first, and mixture.json records them."""
    import mlmix

    rows = [r for r in parallel_rows(4) if r["lang"] in ("en", "ru", "de")]
    data = write_jsonl(str(tmp_path / "three.jsonl"), rows)
    s = mlmix.build(_cfg(tmp_path, tok_path, data, mixture={"recipe": "pinch", "n_multilingual": 4},
                         langid={"backend": "none"}), quiet=True)
    assert s["langs"] == {"en": 20, "ru": 2, "de": 2}
    mixture = mlmix.Mixture.load(os.path.join(s["output"], "mixture.json"))
    assert mixture.params["languages"] == ["en", "ru", "de"]  # en, ru in the study's order; de after
    s = mlmix.build(_cfg(tmp_path, tok_path, data, mixture={"recipe": "percent_mixture", "percent": 50},
                         langid={"backend": "none"}), quiet=True)
    assert sum(s["langs"].values()) == 24 and set(s["langs"]) == {"en", "ru", "de"}


def test_build_log_progress_lines_when_not_a_terminal(tmp_path, tok_path, data_path):
    """Not a terminal, not a notebook: progress comes as plain lines every log_every seconds, and the
    tokenize summary gives the encoder's own rate with the tokenizer's loading apart."""
    import io

    import mlmix
    from mlmix.engine import BuildLog
    from mlmix.engine.stages import tokenize

    stream = io.StringIO()
    log = BuildLog(stream=stream, log_every=0.0)
    assert log.mode == "lines" and not log.progress
    mlmix.build(_cfg(tmp_path, tok_path, data_path), log=log, use_cache=False)
    text = stream.getvalue()
    assert "\r" not in text
    import re

    assert any(re.fullmatch(r"read +[\d,]+ rec, .*rec/s, \d+s", line) for line in text.splitlines()), text
    assert any(re.fullmatch(r"tokenize [\d,]+/[\d,]+ rec \(\d+%\), .*tok/s encoding, \d+s", line)
               for line in text.splitlines()), text
    tok_line = next(line for line in text.splitlines() if line.startswith("tokenize") and "examples" in line)
    assert "tok/s encoding" in tok_line
    assert BuildLog(stream=io.StringIO(), progress=False).mode == "none"
    assert BuildLog(stream=io.StringIO(), progress=True).mode == "bars"
    assert BuildLog(stream=io.StringIO(), quiet=True).mode == "none"
    line = tokenize.summary({"examples": 2, "tokens": 2_000_000, "loss_tokens": 10, "seconds": 10.0,
                             "encode_seconds": 1.0, "load_seconds": 8.5})
    assert "2.0M tok/s encoding; tokenizer loaded in 8.5s" in line


EXAMPLES = sorted(n for n in os.listdir(os.path.join(ROOT, "examples")) if n.endswith((".toml", ".yaml", ".yml", ".json")))


@pytest.mark.parametrize("name", [n for n in EXAMPLES if not n.startswith(("eval", "study"))])
def test_example_configs_validate(name):  # (study.toml is a study's config: tests/test_study.py loads it)
    cfg = load_config(os.path.join(ROOT, "examples", name))
    assert cfg["output"].startswith(os.path.join(ROOT, "runs"))


@pytest.mark.parametrize("name", [n for n in EXAMPLES if n.startswith("eval")])
def test_example_eval_configs_validate(name):
    from mlmix.eval.runner import load_config as load_eval_config

    assert load_eval_config(os.path.join(ROOT, "examples", name))


def test_example_pinch_builds_with_qwen(tmp_path):
    """examples/pinch.toml end to end: the bundled parallel set, Qwen's tokenizer, the pinch."""
    import mlmix

    cfg = load_config(os.path.join(ROOT, "examples", "pinch.toml"))
    cfg["output"] = str(tmp_path / "pinch")
    cfg["cache_dir"] = str(tmp_path / "cache")
    s = mlmix.build(cfg, quiet=True)
    assert s["langs"]["en"] == 64 - 11 and sum(s["langs"].values()) == 64
    assert all(s["langs"][lang] == 1 for lang in s["langs"] if lang != "en")
    info = __import__("mlmix.report", fromlist=["inspect_store"]).inspect_store(s["output"], samples=1)
    text = info["samples"][0]["examples"][0]["text"]
    assert text.startswith("<|im_start|>user\n") and "[[" in text and "<|im_end|>" in text
    store = mlmix.open(s["store"])
    store.check_tokenizer(mlmix.Tokenizer.qwen())
    assert store.vocab_fingerprint["num_ids"] == mlmix.Tokenizer.qwen().vocab_size
    with pytest.raises(ValueError, match="stand for other tokens than those of the tokenizer that wrote the store"):
        store.check_tokenizer(mlmix.Tokenizer.qwen("qwen3_6"))


@pytest.mark.parametrize("workers", [1, 2])
def test_every_record_dropped_by_langid_is_a_clear_error(tmp_path, tok_path, workers):
    """No language given, none identified (backend "none"), unknown ones dropped: dedup has nothing to do
    and the build stops at pack, naming why, with 1 or 2 workers."""
    import mlmix

    rows = [{"id": i, "instruction": f"Question {i}?", "response": f"Answer {i}."} for i in range(5)]
    path = write_jsonl(str(tmp_path / "nolang.jsonl"), rows)
    cfg = _cfg(tmp_path, tok_path, path, langid={"backend": "none", "drop_unknown": True},
               dedup={"exact": True, "near": True})
    with pytest.raises(ValueError, match="pack: no examples are left to pack"):
        mlmix.build(cfg, quiet=True, workers=workers)
    assert not os.path.exists(cfg["output"])


@pytest.mark.parametrize("items", [[], ["en"], ["en", "de", "en"], ['a"b', "\u00e9", "\n", "\\\\", "\u4e2d"] * 3,
                                   ["en", 1, "de"], [["en"], "de"]])
def test_language_code_lists_are_written_as_json_dump_writes_them(tmp_path, items):
    """langs.json (a code per record) goes through a faster writer: the same bytes as json.dump's."""
    from mlmix.engine.stages.write import write_json

    path = tmp_path / "langs.json"
    write_json(str(path), items)
    assert path.read_text(encoding="utf-8") == json.dumps(items, ensure_ascii=False, indent=1, sort_keys=True)
