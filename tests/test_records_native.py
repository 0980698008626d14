"""The C++ JSON lines reader (readers.iter_blocks, csrc/records.cpp) against the Python path.

``iter_blocks(src)`` must be exactly ``RecordBlock.from_records(list(iter_source(src)))`` cut into blocks: the
same columns, or the same exception type and message. Checked on the bundled demo data, on hypothesis-made rows
of every records format (fields, roles, ids, languages, Unicode written raw and escaped), on damaged and odd
lines, on compressed files and limits, for any thread count and block size. Where the native reader is expected
to take a line on itself (valid rows), the tests also check that it did, so that the equivalence is not the
Python path's alone.
"""

from __future__ import annotations

import gzip
import json
import os
import random
import sys

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from mlmix import readers
from mlmix._core_loader import core
from mlmix.config import validate_config
from mlmix.recblock import RecordBlock

DEMO = os.path.join(os.path.dirname(readers.__file__), "data", "demo")


def make_src(path, **kw) -> dict:
    """A source as the config validates it; lang "" (which the config refuses) is set afterwards, as a source
    built by hand may have it."""
    after = {"lang": kw.pop("lang")} if kw.get("lang") == "" else {}
    cfg = {"output": "o", "tokenizer": {"name": "qwen"}, "sources": [{"path": str(path), **kw}]}
    return {**validate_config(cfg)["sources"][0], **after}


def outcome(fn):
    try:
        return "ok", fn()
    except Exception as exc:  # the exception itself is what is compared
        return "error", (type(exc), str(exc))


def reference(src):
    return outcome(lambda: RecordBlock.from_records(list(readers.iter_source(src))))


def native(src, **kw):
    return outcome(lambda: RecordBlock.concat(list(readers.iter_blocks(src, **kw))))


def assert_same(src, **kw):
    want, got = reference(src), native(src, **kw)
    assert want[0] == got[0], (want, got)
    if want[0] == "ok":
        assert got[1].equals(want[1]), (got[1].to_records()[:3], want[1].to_records()[:3])
    else:
        assert got[1] == want[1]
    return want


def handbacks(src, data: bytes, path: str = "f.jsonl") -> list[int]:
    """The lines the C++ reader hands back for this source's settings."""
    settings = readers._native_settings(src)
    out = core._records_from_jsonl(data, 1, id_prefix="x:", where_prefix=f"{path}:", **settings)
    return out["handback_line"].tolist()


def write_lines(path, lines: list[bytes]) -> str:
    with open(path, "wb") as f:
        f.write(b"".join(lines))
    return str(path)


# ---- (a) the bundled demo data -----------------------------------------------------------------------------------
@pytest.mark.parametrize("block_bytes", [1, 4096, 16 << 20])
@pytest.mark.parametrize("threads", [1, 2, 5])
def test_demo_data(block_bytes, threads):
    src = make_src(DEMO)
    kind, block = assert_same(src, block_bytes=block_bytes, num_threads=threads)
    assert kind == "ok" and len(block) == 960


@pytest.mark.parametrize("name", sorted(f for f in os.listdir(DEMO) if f.endswith(".jsonl")))
def test_demo_files_are_read_natively(name):
    path = os.path.join(DEMO, name)
    src = make_src(path)
    with open(path, "rb") as f:
        assert handbacks(src, f.read(), path) == []


@pytest.mark.parametrize("kw", [{"records": "prompt_response"}, {"lang": "xx"}, {"name": "demo"},
                                {"id_field": "split"}, {"lang_field": "split"}, {"limit": 7},
                                {"fields": {"prompt": "response", "response": "instruction"}},
                                {"where": {"split": "train"}}, {"records": "text", "fields": {"text": "response"}}])
def test_demo_data_settings(kw):
    assert_same(make_src(DEMO, **kw), block_bytes=3000)


def test_text_column_equals_texts():
    block = RecordBlock.concat(list(readers.iter_blocks(make_src(DEMO))))
    recs = block.to_records()
    recs[3] = {"id": "t", "lang": None, "where": "", "text": "just text"}
    recs[4]["messages"].insert(0, {"role": "system", "content": "sys"})
    block = RecordBlock.from_records(recs)
    for threads in (1, 3):
        values, offsets = block.text_column(threads)
        assert values.dtype == np.uint8 and offsets.dtype == np.int64
        got = [values[offsets[i]:offsets[i + 1]].tobytes() for i in range(len(block))]
        assert got == [t.encode() for t in block.texts()]
    values, offsets = RecordBlock.empty().text_column()
    assert len(values) == 0 and offsets.tolist() == [0]


def test_text_column_refuses_inconsistent_columns():
    block = RecordBlock.from_records([{"id": "a", "lang": None, "where": "", "text": "t"}])
    args = [block.kind, block.turn_offsets, block.role_values, block.role_offsets, block.content_values,
            block.content_offsets]
    bad = list(args)
    bad[1] = np.array([0, 5], np.int64)
    with pytest.raises(ValueError):
        core._record_texts(*bad)
    bad = list(args)
    bad[5] = np.array([0, 99], np.int64)
    with pytest.raises(ValueError):
        core._record_texts(*bad)
    bad = list(args)
    bad[0] = np.array([7], np.uint8)
    with pytest.raises(ValueError):
        core._record_texts(*bad)
    bad = list(args)
    bad[1] = np.array([0, 1], np.int32)
    with pytest.raises(TypeError):
        core._record_texts(*bad)


# ---- (b) hypothesis: rows of every format ------------------------------------------------------------------------
_ALPHABET = st.characters(codec="utf-8", exclude_categories=("Cs",))
_SPICY = st.sampled_from(["你好，世界", "😀👍🏽", "\u2028", "\x00", "\"quoted\"", "back\\slash", "tab\tnew\nline",
                          "Ω≈ç√", "\ud83d\ude00", "é", "\u00a0", "", " ", "\x7f", "𝔘𝔫𝔦𝔠𝔬𝔡𝔢"])
TEXT = st.one_of(st.text(_ALPHABET, max_size=30), _SPICY, st.lists(_SPICY, max_size=4).map("".join))
KEYS = st.sampled_from(["messages", "conversations", "conversation", "text", "content", "prompt", "instruction",
                        "question", "query", "input", "output", "response", "completion", "answer", "chosen",
                        "system", "id", "lang", "role", "from", "value", "meta", "uid", "language", "msgs"])
SCALAR = st.one_of(st.none(), st.booleans(), st.integers(-10**30, 10**30), st.floats(allow_nan=False), TEXT)
JSONISH = st.recursive(SCALAR, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                        st.dictionaries(TEXT, inner, max_size=3)), max_leaves=6)
ROLE = st.sampled_from(["user", "assistant", "system", "human", "gpt", "bot", "model", "tool", "customer", "agent",
                        "User", ""])
ID = st.one_of(st.none(), TEXT, st.integers(-10**20, 10**20), st.floats(allow_nan=False), st.booleans(),
               st.just(0), st.lists(st.integers(), max_size=2))
LANG = st.one_of(st.none(), st.just(""), st.sampled_from(["en", "zh", "cs", "sw"]), TEXT, st.integers(0, 3))
FALSY_OR_TEXT = st.one_of(st.none(), st.just(""), TEXT, st.just(0), st.just(False), st.just([]), st.just({}),
                          st.just(1), st.just(0.0), st.just(["x"]))


@st.composite
def message(draw):
    m = {}
    rk = draw(st.sampled_from(["role", "from", "speaker"]))
    ck = draw(st.sampled_from(["content", "value", "text"]))
    if draw(st.integers(0, 9)):
        m[rk] = draw(st.one_of(ROLE, ROLE, ROLE, st.none(), st.integers(0, 2)))
    if draw(st.integers(0, 9)):
        m[ck] = draw(st.one_of(TEXT, TEXT, TEXT, st.none(), st.integers(0, 2), st.lists(TEXT, max_size=2)))
    if draw(st.integers(0, 4)) == 0:
        m[draw(KEYS)] = draw(JSONISH)
    return m


@st.composite
def row(draw):
    shape = draw(st.sampled_from(["messages", "sharegpt", "alpaca", "prompt_response", "text", "random"]))
    r: dict = {}
    if shape in ("messages", "sharegpt"):
        key = draw(st.sampled_from(["messages", "conversations", "conversation", "msgs"]))
        r[key] = draw(st.one_of(st.lists(message(), min_size=0, max_size=4), st.lists(message(), min_size=2, max_size=4),
                                st.just([]), st.just(None), TEXT))
    elif shape == "alpaca":
        r["instruction"] = draw(st.one_of(TEXT, TEXT, st.none(), st.integers()))
        r["input"] = draw(FALSY_OR_TEXT)
        r[draw(st.sampled_from(["output", "response", "answer"]))] = draw(st.one_of(TEXT, TEXT, st.none()))
    elif shape == "prompt_response":
        r[draw(st.sampled_from(["prompt", "question", "query", "instruction"]))] = draw(st.one_of(TEXT, TEXT, st.none()))
        r[draw(st.sampled_from(["response", "completion", "answer", "chosen", "output"]))] = draw(
            st.one_of(TEXT, TEXT, st.none(), st.booleans()))
    elif shape == "text":
        r[draw(st.sampled_from(["text", "content"]))] = draw(st.one_of(TEXT, TEXT, st.none(), st.integers()))
    for _ in range(draw(st.integers(0, 3))):
        r[draw(KEYS)] = draw(JSONISH)
    if draw(st.booleans()):
        r["system"] = draw(FALSY_OR_TEXT)
    if draw(st.integers(0, 3)):
        r[draw(st.sampled_from(["id", "uid"]))] = draw(ID)
    if draw(st.integers(0, 3)):
        r[draw(st.sampled_from(["lang", "language"]))] = draw(LANG)
    return r


@st.composite
def source_settings(draw):
    kw: dict = {}
    if draw(st.integers(0, 2)) == 0:
        kw["records"] = draw(st.sampled_from(["auto", "messages", "alpaca", "prompt_response", "text"]))
    if draw(st.integers(0, 3)) == 0:
        canon = ["messages", "role", "content", "system", "instruction", "input", "output", "prompt", "response", "text"]
        kw["fields"] = draw(st.dictionaries(st.sampled_from(canon), KEYS, max_size=3))
    if draw(st.integers(0, 3)) == 0:
        kw["roles"] = draw(st.dictionaries(ROLE, st.sampled_from(["user", "assistant", "system", "tool", "other"]),
                                           max_size=3))
    if draw(st.integers(0, 4)) == 0:
        kw["id_field"] = draw(st.sampled_from(["uid", "meta", "text"]))
    pick = draw(st.integers(0, 5))
    if pick == 0:
        kw["lang"] = draw(st.sampled_from(["en", "", "zh-Hant"]))
    elif pick == 1:
        kw["lang_field"] = "language"
    if draw(st.booleans()):
        kw["name"] = draw(st.sampled_from(["src", "名前"]))
    return kw


def dump(r: dict, rnd: random.Random) -> bytes:
    text = json.dumps(r, ensure_ascii=rnd.random() < 0.5, separators=rnd.choice([(",", ":"), (", ", ": ")]))
    return text.encode("utf-8", "surrogatepass") + rnd.choice([b"\n", b"\r\n", b" \n", b"\n\n"])


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                   HealthCheck.too_slow])
@given(rows=st.lists(row(), min_size=1, max_size=8), kw=source_settings(), seed=st.integers(0, 2**32 - 1))
def test_hypothesis_rows_one_by_one(tmp_path, rows, kw, seed):
    """Each row alone: the same record or the same error."""
    rnd = random.Random(seed)
    for i, r in enumerate(rows):
        path = write_lines(tmp_path / f"r{i}.jsonl", [dump(r, rnd)])
        assert_same(make_src(path, **kw))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                   HealthCheck.too_slow])
@given(rows=st.lists(row(), min_size=1, max_size=30), kw=source_settings(), seed=st.integers(0, 2**32 - 1),
       block=st.sampled_from([1, 200, 1 << 20]), threads=st.sampled_from([1, 2, 4]))
def test_hypothesis_files(tmp_path, rows, kw, seed, block, threads):
    """A file of rows (the first error wins), any block size and thread count."""
    rnd = random.Random(seed)
    path = write_lines(tmp_path / "data.jsonl", [dump(r, rnd) for r in rows])
    assert_same(make_src(path, **kw), block_bytes=block, num_threads=threads)


@settings(max_examples=200, deadline=None)
@given(rows=st.lists(row(), min_size=1, max_size=10), kw=source_settings(), seed=st.integers(0, 2**32 - 1))
def test_hypothesis_rows_python_accepts_are_native(rows, kw, seed):
    """A row to_record reads without error, with string or int ids and no float anywhere near the record's
    own fields, is read by the C++ reader itself (not handed back), and its columns are the Python ones."""
    rnd = random.Random(seed)
    src = make_src("f.jsonl", **kw)
    for r in rows:
        line = dump(r, rnd)
        try:
            rec = readers.to_record(json.loads(line.decode("utf-8")), src, "f.jsonl:1", 1, "f.jsonl")
            want = RecordBlock.from_records([rec])
        except Exception:
            continue
        rid = r.get(src["id_field"])
        if rid is not None and (isinstance(rid, bool) or not isinstance(rid, (str, int))):
            continue  # str() of a float, bool, list or dict: handed back
        if any(isinstance(readers._get(r, src["fields"], k, (k,))[1], float) for k in ("system", "input")):
            continue  # a float's truth: handed back
        if b"Infinity" in line:
            continue
        assert handbacks(src, line) == [], (line, src)
        settings_ = readers._native_settings(src)
        got = core._records_from_jsonl(line, 1, id_prefix=readers.fallback_id(src, "f.jsonl", 0)[:-1],
                                       where_prefix="f.jsonl:", **settings_)
        for k in ("line", "lines", "handback_line", "handback_begin", "handback_end"):
            got.pop(k)
        assert RecordBlock(**got).equals(want), (line, RecordBlock(**got).to_records(), rec)


# ---- (c) damaged and odd lines -----------------------------------------------------------------------------------
GOOD = b'{"prompt": "p", "response": "r"}\n'
ODD_LINES = [
    b"\xff\xfe{}\n", b'{"prompt": "caf\xc3", "response": "r"}\n', b'{"prompt": "\xed\xa0\x80", "response": "r"}\n',
    b'{"prompt": "\xc0\xaf", "response": "r"}\n', b'{"prompt": "\xf4\x90\x80\x80", "response": "r"}\n',
    b'{"prompt": "p", "response": "r"', b'{"prompt": "p", "response": "r"\n', b'{"prompt": "p", "resp', b"{",
    b'{"prompt": "p", "response": NaN}\n', b'{"prompt": "p", "response": "r", "x": Infinity}\n',
    b'{"prompt": "p", "response": "r", "x": -Infinity}\n', b'{"prompt": "p", "response": "r", "x": nan}\n',
    b'{"prompt": "p", "prompt": "q", "response": "r", "response": "s"}\n',
    b'{"prompt": null, "prompt": "q", "response": "r"}\n', b'{"prompt": "q", "prompt": null, "response": "r"}\n',
    b'{"prompt": "a\x01b", "response": "r"}\n', b'{"prompt": "a\tb", "response": "r"}\n',
    b'{"prompt": "a\\u0001b\\u0000", "response": "r"}\n',
    b'\xef\xbb\xbf{"prompt": "p", "response": "r"}\n', b'{"prompt": "\xef\xbb\xbfp", "response": "r"}\n',
    b'{"prompt": "\\ud800", "response": "r"}\n', b'{"prompt": "\\udc00x", "response": "r"}\n',
    b'{"prompt": "\\ud83d\\ude00", "response": "r"}\n', b'{"prompt": "\\ud83d\\u0041", "response": "r"}\n',
    b'{"meta": "\\ud800", "prompt": "p", "response": "r"}\n', b'{"prompt": "\\uZZZZ", "response": "r"}\n',
    b'{"prompt": "\\x41", "response": "r"}\n', b'{"prompt": "\\/\\b\\f\\n\\r\\t\\"\\\\", "response": "r"}\n',
    b'{"id": -0, "prompt": "p", "response": "r"}\n', b'{"id": 0, "prompt": "p", "response": "r"}\n',
    b'{"id": -12, "prompt": "p", "response": "r"}\n', b'{"id": 1.5, "prompt": "p", "response": "r"}\n',
    b'{"id": 1e3, "prompt": "p", "response": "r"}\n', b'{"id": true, "prompt": "p", "response": "r"}\n',
    b'{"id": [1], "prompt": "p", "response": "r"}\n', b'{"id": {}, "prompt": "p", "response": "r"}\n',
    b'{"id": 123456789012345678901234567890, "prompt": "p", "response": "r"}\n',
    b'{"id": ' + b"7" * 700 + b', "prompt": "p", "response": "r"}\n',
    b'{"id": ' + b"7" * 5000 + b', "prompt": "p", "response": "r"}\n',
    b'{"id": 01, "prompt": "p", "response": "r"}\n', b'{"id": +1, "prompt": "p", "response": "r"}\n',
    b'{"id": .5, "prompt": "p", "response": "r"}\n', b'{"id": 1., "prompt": "p", "response": "r"}\n',
    b'{"id": 1e, "prompt": "p", "response": "r"}\n', b'{"id": -, "prompt": "p", "response": "r"}\n',
    b'{"lang": 5, "prompt": "p", "response": "r"}\n', b'{"lang": "", "prompt": "p", "response": "r"}\n',
    b'{"lang": [], "prompt": "p", "response": "r"}\n', b'{"system": 0, "prompt": "p", "response": "r"}\n',
    b'{"system": -0, "prompt": "p", "response": "r"}\n', b'{"system": 0.0, "prompt": "p", "response": "r"}\n',
    b'{"system": 1e-400, "prompt": "p", "response": "r"}\n', b'{"system": 2, "prompt": "p", "response": "r"}\n',
    b'{"system": true, "prompt": "p", "response": "r"}\n', b'{"system": false, "prompt": "p", "response": "r"}\n',
    b'{"system": [], "prompt": "p", "response": "r"}\n', b'{"system": {}, "prompt": "p", "response": "r"}\n',
    b'{"system": ["s"], "prompt": "p", "response": "r"}\n', b'{"system": "s", "prompt": "p", "response": "r"}\n',
    b'{"instruction": "i", "input": 0, "output": "o"}\n', b'{"instruction": "i", "input": 3, "output": "o"}\n',
    b'{"instruction": "i", "input": "x", "output": "o"}\n', b'{"instruction": "i", "input": null, "output": "o"}\n',
    b'{"prompt": "p", "response": 5}\n', b'{"prompt": 5, "response": "r"}\n', b'{"prompt": "p"}\n', b"{}\n",
    b'{"text": null}\n', b'{"text": "t", "prompt": "p"}\n', b'{"text": 3}\n', b'{"content": "c"}\n',
    b'{"messages": []}\n', b'{"messages": null, "conversations": [{"from": "gpt", "value": "v"}]}\n',
    b'{"messages": [{"role": "tool", "content": "x"}, {"role": "assistant", "content": "a"}]}\n',
    b'{"messages": [{"role": "alien", "content": "x"}]}\n', b'{"messages": [{"role": "user", "content": "x"}]}\n',
    b'{"messages": [{"role": "assistant", "content": null}]}\n', b'{"messages": [{"role": 1, "content": "c"}]}\n',
    b'{"messages": [["assistant", "c"]]}\n', b'{"messages": [{"role": "assistant"}]}\n',
    b'{"messages": [{"role": "assistant", "value": "v", "content": "c", "content": "d"}]}\n',
    b'{"messages": [{"from": "gpt", "value": "v"}, {"role": "user", "content": "c"}]}\n',
    b'{"messages": "no"}\n', b'{"messages": {"role": "assistant"}}\n', b'[1, 2]\n', b'"str"\n', b"3\n", b"null\n",
    b"\n", b"   \n", b"\t\r\n", b"\x0b\x0c\n", b"\x1c\x1d\x1e\x1f \n", b"\xc2\xa0\n", b"\xe2\x80\xa8\n", b"\xc2\x85\n",
    b"\xe3\x80\x80 \n", b"\r\n", b"\r", b" ", b'  {"prompt": "p", "response": "r"}  \r\n',
    b'\x0c{"prompt": "p", "response": "r"}\n', b'{"prompt": "p", "response": "r"}\x0b\n',
    b'{"prompt": "p", "response": "r"} x\n', b'{"prompt": "p", "response": "r"}{}\n',
    b'{"prompt": "p",, "response": "r"}\n', b'{"prompt": "p", "response": "r",}\n', b"{'prompt': 'p'}\n",
    b'{"prompt": "p", "response": "r", "x": [1, 2,]}\n', b'{"prompt": "p", "response": "r", "x": tru}\n',
    b'{"prompt"  :  "p" , "response":"r","x":[ ],"y":{ },"z":[{"a":[true,false,null,-1.5e+3,0.0,1E-2]}]}\n',
    b'{"\\u0070rompt": "p", "respons\\u0065": "r", "\\u0069d": "escaped key"}\n',
    b'{"id": "\\u4f60\\u597d", "prompt": "\\u00e9\\u00E9", "response": "\xe4\xbd\xa0"}\n',
]


@pytest.mark.parametrize("i", range(len(ODD_LINES)))
def test_odd_line_alone_and_between_good_lines(tmp_path, i):
    line = ODD_LINES[i]
    path = write_lines(tmp_path / "a.jsonl", [line])
    assert_same(make_src(path))
    path = write_lines(tmp_path / "b.jsonl", [GOOD, GOOD, line + (b"" if line.endswith(b"\n") else b"\n"), GOOD])
    assert_same(make_src(path), num_threads=2)
    assert_same(make_src(path, records="messages", name="n"))
    assert_same(make_src(path, lang="en", limit=2), block_bytes=1)


def test_odd_lines_all_in_one_file(tmp_path):
    lines = [GOOD] + [ln if ln.endswith(b"\n") else ln + b"\n" for ln in ODD_LINES]
    path = write_lines(tmp_path / "a.jsonl", lines)
    assert_same(make_src(path))
    # one by one, each error found where the Python path finds it
    for k in range(1, len(lines)):
        path = write_lines(tmp_path / "b.jsonl", [GOOD] * 3 + lines[k:])
        assert_same(make_src(path), block_bytes=97)


def test_good_odd_lines_are_native():
    """Lines that are valid and need no Python-only answer are not handed back."""
    src = make_src("f.jsonl")
    for line in [GOOD, b'{"prompt": "\\ud83d\\ude00", "response": "r"}\n', b'{"id": -12, "prompt": "p", "response": "r"}\n',
                 b'{"system": 0, "prompt": "p", "response": "r"}\n', b'{"system": [], "prompt": "p", "response": "r"}\n',
                 b'{"prompt": "p", "prompt": "q", "response": "r", "response": "s"}\n', b"   \n", b"\x1c\x0b\n",
                 b'{"prompt"  :  "p" , "response":"r","x":[ ],"y":{ },"z":[{"a":[true,false,null,-1.5e+3,0.0,1E-2]}]}\n',
                 b'{"\\u0070rompt": "p", "respons\\u0065": "r", "\\u0069d": "escaped key"}\n',
                 b'{"meta": ' + b"[" * 511 + b"]" * 511 + b', "prompt": "p", "response": "r"}\n']:
        assert handbacks(src, line) == [], line


def test_deep_nesting(tmp_path):
    for depth in (511, 512, 513, 600, 5000):
        line = b'{"prompt": "p", "response": "r", "m": ' + b"[" * (depth - 1) + b"]" * (depth - 1) + b"}\n"
        path = write_lines(tmp_path / f"d{depth}.jsonl", [GOOD, line])
        assert_same(make_src(path))
    path = write_lines(tmp_path / "deep.jsonl", [GOOD, b"[" * 600 + b"]" * 600 + b"\n", b'{"a":' * 600 + b"1" + b"}" * 600])
    kind, err = assert_same(make_src(path))
    assert kind == "error" and "nested deeper than 512 levels (600 levels)" in err[1]


def test_nesting_past_a_lowered_recursion_limit(tmp_path):
    path = write_lines(tmp_path / "data.jsonl", [b'{"prompt": "p", "response": "r", "m": ' + b"[" * 400 + b"]" * 400 + b"}\n"])
    src = make_src(path)
    want, got = readers.iter_source(src), readers.iter_blocks(src)
    old = sys.getrecursionlimit()
    sys.setrecursionlimit(200)
    try:
        with pytest.raises(ValueError) as a:
            next(want)
        with pytest.raises(ValueError) as b:
            next(got)
    finally:
        sys.setrecursionlimit(old)
    assert str(a.value) == str(b.value) and "recursion limit" in str(a.value)


def test_huge_field(tmp_path):
    big = "é" * (5 << 20)  # 10 MB of UTF-8
    rows = [json.dumps({"prompt": "p", "response": big}, ensure_ascii=False).encode() + b"\n",
            json.dumps({"prompt": big[:1000], "response": big}).encode() + b"\n", GOOD]
    path = write_lines(tmp_path / "big.jsonl", rows)
    kind, block = assert_same(make_src(path), block_bytes=1 << 16, num_threads=2)
    assert kind == "ok" and len(block) == 3
    assert handbacks(make_src(path), b"".join(rows)) == []


def test_random_mutations(tmp_path):
    """Bytes flipped, dropped, doubled and cut in valid lines: the same records or the same error."""
    rnd = random.Random(1234)
    base = [json.dumps(r, ensure_ascii=rnd.random() < 0.5).encode() for r in [
        {"id": 3, "lang": "cs", "messages": [{"role": "user", "content": "Ahoj 😀"}, {"role": "assistant", "content": "Čau"}]},
        {"conversations": [{"from": "human", "value": "你好"}, {"from": "gpt", "value": "好\n"}], "system": "s"},
        {"instruction": "i", "input": "x", "output": "o", "id": "a\\b"},
        {"text": "plain \"text\"", "lang": None, "meta": [1, 2.5, {"k": None}]}]]
    specials = b'{}[]",:\\ \n\t\r0123456789-+.eEtrufalsn\x00\x80\xc3\xe4\xf0\xff'
    for trial in range(1500):
        line = bytearray(rnd.choice(base))
        for _ in range(rnd.randint(1, 3)):
            op = rnd.randrange(4)
            k = rnd.randrange(len(line) + 1)
            if op == 0 and k < len(line):
                line[k] = rnd.choice(specials)
            elif op == 1 and k < len(line):
                del line[k]
            elif op == 2:
                line[k:k] = bytes([rnd.choice(specials)])
            else:
                line = line[:k]
        path = write_lines(tmp_path / "m.jsonl", [GOOD, bytes(line) + b"\n", GOOD])
        assert_same(make_src(path), num_threads=rnd.choice([1, 2]))


# ---- files, compression, limits, threads -------------------------------------------------------------------------
def _mixed_rows(n: int, seed: int = 0) -> list[bytes]:
    rnd = random.Random(seed)
    out = []
    for i in range(n):
        pick = rnd.randrange(5)
        if pick == 0:
            r = {"id": f"m{i}", "lang": "en", "messages": [{"role": "user", "content": f"q{i} 你好"},
                                                          {"role": "assistant", "content": "a" * rnd.randrange(400)}]}
        elif pick == 1:
            r = {"conversations": [{"from": "human", "value": "x"}, {"from": "gpt", "value": "y😀" * rnd.randrange(50)}]}
        elif pick == 2:
            r = {"id": i, "instruction": "do", "input": rnd.choice(["", "more"]), "output": "done " * rnd.randrange(90)}
        elif pick == 3:
            r = {"text": "t" * rnd.randrange(900), "lang": rnd.choice(["sw", "", None])}
        else:
            r = {"prompt": "p", "response": "r", "id": 2.5 if rnd.random() < 0.05 else f"s{i}"}
        out.append(json.dumps(r, ensure_ascii=rnd.random() < 0.3).encode() + (b"\n\n" if rnd.random() < 0.05 else b"\n"))
    return out


def test_thread_count_does_not_change_the_output():
    data = b"".join(_mixed_rows(9000, seed=3))
    assert len(data) > 2 << 20  # enough for 8 threads (256 KiB each at least)
    src = make_src("f.jsonl")
    settings_ = readers._native_settings(src)
    outs = [core._records_from_jsonl(data, 10, id_prefix="x:", where_prefix="f:", num_threads=t, **settings_)
            for t in (1, 2, 3, 8)]
    assert len(outs[0]["handback_line"]) > 0 and len(outs[0]["kind"]) > 5000
    for o in outs[1:]:
        assert sorted(o) == sorted(outs[0])
        for k in o:
            assert np.array_equal(o[k], outs[0][k]), k


def test_env_thread_count(monkeypatch, tmp_path):
    path = write_lines(tmp_path / "a.jsonl", _mixed_rows(4000, seed=5))
    want = reference(make_src(path))
    for n in ("1", "3"):
        monkeypatch.setenv("MLMIX_NUM_THREADS", n)
        got = native(make_src(path), block_bytes=1 << 20)
        assert got[1].equals(want[1])


@pytest.mark.parametrize("suffix", ["", ".gz", ".zst"])
@pytest.mark.parametrize("limit", [None, 0, 1, 57, 299, 300, 301, 1000])
def test_compressed_and_limits(tmp_path, suffix, limit):
    zstandard = pytest.importorskip("zstandard")
    data = b"".join(_mixed_rows(300, seed=7))
    path = tmp_path / f"data.jsonl{suffix}"
    pack = {"": lambda b: b, ".gz": gzip.compress, ".zst": lambda b: zstandard.ZstdCompressor().compress(b)}[suffix]
    path.write_bytes(pack(data))
    kw = {} if limit is None else {"limit": limit}
    for block in (1, 5000, 1 << 20):
        assert_same(make_src(path, **kw), block_bytes=block)


@pytest.mark.parametrize("suffix", [".gz", ".zst"])
@pytest.mark.parametrize("keep", [0.0, 0.3, 0.6, 0.95])
def test_truncated_compressed(tmp_path, suffix, keep):
    zstandard = pytest.importorskip("zstandard")
    data = b"".join(_mixed_rows(2000, seed=8))
    packed = gzip.compress(data) if suffix == ".gz" else zstandard.ZstdCompressor().compress(data)
    path = tmp_path / f"data.jsonl{suffix}"
    path.write_bytes(packed[: max(1, int(len(packed) * keep))])
    for kw in ({}, {"limit": 10}, {"limit": 1500}):
        for block in (1000, 1 << 20):
            assert_same(make_src(path, **kw), block_bytes=block)


def test_corrupt_gzip(tmp_path):
    data = b"".join(_mixed_rows(2000, seed=9))
    packed = bytearray(gzip.compress(data))
    packed[len(packed) // 2] ^= 0xFF
    path = tmp_path / "data.jsonl.gz"
    path.write_bytes(bytes(packed))
    kind, err = assert_same(make_src(path))
    assert kind == "error"


def test_bad_line_after_the_limit(tmp_path):
    rows = [GOOD] * 3 + [b"\n", b"   \n", b"{bad\n", GOOD]
    path = write_lines(tmp_path / "a.jsonl", rows)
    for limit in range(6):
        assert_same(make_src(path, limit=limit))
        assert_same(make_src(path, limit=limit), block_bytes=1)


def test_directory_of_files_with_limit(tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    d = tmp_path / "d"
    d.mkdir()
    write_lines(d / "a.jsonl", _mixed_rows(40, seed=1))
    write_lines(d / "b.jsonl", [b"\n", b"  \n"])
    pq.write_table(pa.Table.from_pylist([{"prompt": f"p{i}", "response": "r"} for i in range(30)]), d / "c.parquet")
    write_lines(d / "d.jsonl", [GOOD, b"{oops\n"])
    write_lines(d / "e.jsonl.gz", [b""])
    (d / "e.jsonl.gz").write_bytes(gzip.compress(b"".join(_mixed_rows(20, seed=2))))
    for limit in (None, 0, 39, 40, 41, 69, 70, 71, 72):
        kw = {} if limit is None else {"limit": limit}
        assert_same(make_src(d, **kw), block_bytes=700)


def test_unencodable_strings_fail_at_the_end(tmp_path):
    # a lone surrogate escape in a field the record keeps: to_record accepts it, from_records cannot encode it
    rows = [GOOD, b'{"prompt": "\\udc80", "response": "r"}\n', GOOD, b'{"id": "\\ud800", "prompt": "p", "response": "r"}\n']
    path = write_lines(tmp_path / "a.jsonl", rows)
    kind, err = assert_same(make_src(path), block_bytes=1)
    assert kind == "error" and err[0] is UnicodeEncodeError
    # a read error later in the source comes first, as list(iter_source(...)) meets it first
    path = write_lines(tmp_path / "b.jsonl", rows + [b"{bad\n"])
    kind, err = assert_same(make_src(path), block_bytes=1)
    assert kind == "error" and err[0] is ValueError


def test_python_path_sources_are_blocks_too(tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    pq.write_table(pa.Table.from_pylist([{"prompt": f"p{i}", "response": "r" * i} for i in range(300)]),
                   tmp_path / "c.parquet")
    blocks = list(readers.iter_blocks(make_src(tmp_path / "c.parquet"), block_bytes=2000))
    assert len(blocks) > 3
    assert_same(make_src(tmp_path / "c.parquet", limit=100), block_bytes=2000)
    assert_same(make_src(DEMO, where={"lang": "en"}), block_bytes=2000)


def test_blocks_are_bounded(tmp_path):
    path = write_lines(tmp_path / "a.jsonl", _mixed_rows(3000, seed=11))
    blocks = list(readers.iter_blocks(make_src(path), block_bytes=64 << 10))
    assert len(blocks) > 5 and all(len(b) for b in blocks)


def test_last_line_without_newline_and_crlf(tmp_path):
    path = write_lines(tmp_path / "a.jsonl", [GOOD, b'{"prompt": "p", "response": "r"}\r\n', b'{"prompt": "q", "response": "r"}'])
    kind, block = assert_same(make_src(path))
    assert kind == "ok" and len(block) == 3
    path = write_lines(tmp_path / "b.jsonl", [GOOD, b'{"prompt": "q", "response": '])
    kind, err = assert_same(make_src(path))
    assert "is it truncated?" in err[1]


def test_records_from_jsonl_argument_checks():
    with pytest.raises(ValueError):
        core._records_from_jsonl(b"", 1, "nope", {}, {}, "id", "lang", None, "", "")
    with pytest.raises(ValueError):
        core._records_from_jsonl(b"", 1, "auto", {}, {}, "id", "lang", "en", "", "")
    with pytest.raises(ValueError):
        core._records_from_jsonl(b"", 1, "auto", {}, {}, "id", "lang", None, "", "", max_depth=513)
    with pytest.raises(TypeError):
        core._records_from_jsonl(b"", 1, "auto", {"text": 3}, {}, "id", "lang", None, "", "")
    out = core._records_from_jsonl(b"", 1, "auto", {}, {}, "id", "lang", None, "", "")
    assert len(out["kind"]) == 0 and out["turn_offsets"].tolist() == [0]


def test_records_from_jsonl_takes_bytes_like_and_counts_lines():
    data = GOOD + b"\n  \n{bad\n" + GOOD.rstrip(b"\n")
    args = ("auto", {}, {"user": "user", "assistant": "assistant"}, "id", "lang", None, "x:", "f:")
    outs = [core._records_from_jsonl(d, 5, *args) for d in (data, bytearray(data), memoryview(data))]
    for o in outs:
        assert o["lines"] == 5 and o["line"].tolist() == [5, 9] and o["handback_line"].tolist() == [8]
        assert np.array_equal(o["content_values"], outs[0]["content_values"])
    with pytest.raises(TypeError):
        core._records_from_jsonl("text", 1, *args)


def test_path_that_is_not_valid_unicode(tmp_path):
    """A file name that is not UTF-8 (a lone surrogate in Python): the Python path reads it, and from_records
    fails on its where / id exactly as for list(iter_source(...))."""
    d = os.fsencode(tmp_path / "d")
    os.mkdir(d)
    with open(os.path.join(d, b"\xff.jsonl"), "wb") as f:
        f.write(GOOD * 3)
    kind, err = assert_same(make_src(os.fsdecode(d)))
    assert kind == "error" and err[0] is UnicodeEncodeError


@pytest.mark.parametrize("fields", [{"role": "", "content": ""}, {"role": "speaker"}, {"content": "text"},
                                    {"messages": ""}, {"messages": "turns", "system": "sys"}])
def test_messages_field_mappings(tmp_path, fields):
    rows = [{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]},
            {"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]},
            {"turns": [{"speaker": "human", "text": "q"}, {"speaker": "gpt", "text": "a"}], "sys": "s"},
            {"": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]},
            {"turns": [{"speaker": "human", "text": "q", "role": "gpt", "content": "c"}]}]
    for i, r in enumerate(rows):
        path = write_lines(tmp_path / f"m{i}.jsonl", [json.dumps(r).encode() + b"\n"])
        assert_same(make_src(path, fields=fields))


@pytest.mark.parametrize("n,where", [(0, []), (5, []), (5, [0]), (5, [4]), ((1 << 16) * 3 + 7, [3]),
                                     ((1 << 16) * 3 + 7, [1 << 16]), ((1 << 16) * 3 + 7, [(1 << 16) - 1, 190_000])])
def test_last_newline_is_rfind(n, where):
    """The reader's backwards search for the last line end, window by window, agrees with bytes.rfind at window
    edges and past them, for every end."""
    from mlmix.readers import _last_newline

    buf = np.full(n, ord("x"), np.uint8)
    buf[where] = ord("\n")
    raw = buf.tobytes()
    for end in sorted({0, 1, n, n - 1, *where, *(w + 1 for w in where), 1 << 16, (1 << 16) + 1}):
        if 0 <= end <= n:
            assert _last_newline(buf, end) == raw.rfind(b"\n", 0, end), end
