"""Parquet files and ``datasets`` directories read Arrow batch by batch (readers.iter_blocks, mlmix._arrow_records)
against the Python path.

As for JSON lines (tests/test_records_native.py): ``iter_blocks(src)`` must be exactly
``RecordBlock.from_records(list(iter_source(src)))``, the same columns or the same exception and message. The fast
path may refuse a batch (it then goes row by row through to_record); the tests check both that the result is
the Python path's and, for batches of valid rows, that the fast path itself made it.
"""

from __future__ import annotations

import random

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings, strategies as st

from mlmix import _arrow_records, readers
from mlmix._shapes import MESSAGES_KEYS, roles_of
from mlmix.recblock import RecordBlock

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")

from test_records_native import assert_same, make_src, row, source_settings  # noqa: E402


class Counting:
    """Counts the batches the fast path made and refused."""

    def __init__(self, monkeypatch):
        self.made = self.refused = 0
        real = _arrow_records.batch_block

        def counted(*a, **kw):
            out = real(*a, **kw)
            if out is None:
                self.refused += 1
            else:
                self.made += 1
            return out

        monkeypatch.setattr(_arrow_records, "batch_block", counted)


def write_parquet(path, rows_or_table, **kw) -> str:
    table = rows_or_table if isinstance(rows_or_table, pa.Table) else pa.Table.from_pylist(rows_or_table)
    pq.write_table(table, path, **kw)
    return str(path)


def chat_rows(n: int, seed: int = 0) -> list[dict]:
    rnd = random.Random(seed)
    words = ["héllo", "世界", "😀", "a\nb", "", "x" * 50, "مرحبا", "\x00"]
    return [{"id": f"r{i}" if i % 7 else None, "lang": rnd.choice(["en", "zh", None, ""]),
             "system": rnd.choice([None, "", "be brief"]),
             "messages": [{"role": rnd.choice(["user", "human"]), "content": rnd.choice(words) * rnd.randint(0, 3)},
                          {"role": rnd.choice(["assistant", "gpt"]), "content": rnd.choice(words)}]
             + [{"role": "user", "content": "more"}, {"role": "model", "content": "yes"}] * rnd.randint(0, 2)}
            for i in range(n)]


# ---- each record format, fast ------------------------------------------------------------------------------------
SHAPES = {
    "messages": lambda i: {"id": i, "lang": "en", "messages": [{"role": "user", "content": f"q{i}"},
                                                              {"role": "assistant", "content": f"a{i}"}]},
    "sharegpt": lambda i: {"system": "sys" if i % 2 else "", "conversations": [{"from": "human", "value": f"q{i}"},
                                                                              {"from": "gpt", "value": f"a{i}"}]},
    "alpaca": lambda i: {"instruction": f"do {i}", "input": "" if i % 3 else f"with {i}", "output": f"done {i}"},
    "prompt_response": lambda i: {"id": f"p{i}", "prompt": f"p{i}", "completion": f"c{i}", "language": "de"},
    "text": lambda i: {"text": f"text {i} " * (i % 5), "lang": None},
}


@pytest.mark.parametrize("shape", sorted(SHAPES))
@pytest.mark.parametrize("kw", [{}, {"name": "src"}, {"lang": "xx"}, {"lang_field": "language"}, {"limit": 1234}])
def test_each_shape_is_read_fast(tmp_path, monkeypatch, shape, kw):
    path = write_parquet(tmp_path / "d.parquet", [SHAPES[shape](i) for i in range(3000)], row_group_size=700)
    src = make_src(path, **kw)
    seen = Counting(monkeypatch)
    kind, block = assert_same(src, block_bytes=20_000)
    assert kind == "ok" and len(block) == kw.get("limit", 3000)
    assert seen.made >= 2 and seen.refused == 0


def test_system_prompts_mapped_roles_and_row_numbers(tmp_path, monkeypatch):
    rows = chat_rows(20_000, seed=3)
    path = write_parquet(tmp_path / "c.parquet", rows, row_group_size=5000)
    seen = Counting(monkeypatch)
    kind, block = assert_same(make_src(path, roles={"model": "assistant"}))
    assert kind == "ok" and seen.refused == 0 and seen.made >= 4
    recs = block.to_records()
    assert recs[19_999]["where"].endswith("c.parquet[row 19999]") and recs[7]["id"].endswith("c.parquet:7")
    assert any(r["messages"][0]["role"] == "system" for r in recs)


@pytest.mark.parametrize("limit", [0, 1, 4999, 5000, 5001, 8192, 8193, 19_999, 20_000, 20_001])
def test_limits_across_batches_and_files(tmp_path, limit):
    d = tmp_path / "dir"
    d.mkdir()
    rows = chat_rows(20_000, seed=5)
    write_parquet(d / "a.parquet", rows[:12_000], row_group_size=5000)
    write_parquet(d / "b.parquet", rows[12_000:], row_group_size=9000)
    assert_same(make_src(d, limit=limit), block_bytes=100_000)


def test_datasets_directory(tmp_path, monkeypatch):
    datasets = pytest.importorskip("datasets")
    rows = chat_rows(9000, seed=7)
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "ds"))
    datasets.DatasetDict({"train": datasets.Dataset.from_list(rows[:100]),
                          "test": datasets.Dataset.from_list(rows[100:300])}).save_to_disk(str(tmp_path / "dd"))
    seen = Counting(monkeypatch)
    kind, block = assert_same(make_src(tmp_path / "ds", format="hf-disk"))
    assert kind == "ok" and len(block) == 9000 and block.to_records()[8999]["where"].endswith("ds[8999]")
    kind, block = assert_same(make_src(tmp_path / "dd", format="hf-disk", split="test"))
    assert kind == "ok" and len(block) == 200
    assert seen.refused == 0 and seen.made >= 3


# ---- batches the fast path refuses: the Python path's records or error ---------------------------------------------
def test_odd_batches_go_row_by_row(tmp_path, monkeypatch):
    good = chat_rows(50, seed=1)
    cases = {
        "text partly null": [{"text": "t" if i % 3 else None, "content": "c"} for i in range(20)],
        "unknown role": good[:10] + [{"messages": [{"role": "alien", "content": "x"}]}],
        "no assistant": good[:10] + [{"messages": [{"role": "user", "content": "x"}]}],
        "empty conversation": good[:10] + [{"messages": []}],
        "null message": good[:5] + [{"messages": [None, {"role": "assistant", "content": "a"}]}],
        "null content": good[:5] + [{"messages": [{"role": "assistant", "content": None}]}],
        "float ids": [{"id": 1.5 + i, "prompt": "p", "response": "r"} for i in range(5)],
        "bool ids": [{"id": i % 2 == 0, "prompt": "p", "response": "r"} for i in range(5)],
        "int lang": [{"lang": 3, "prompt": "p", "response": "r"}],
        "int system": [{"system": i % 2, "prompt": "p", "response": "r"} for i in range(4)],
        "int input": [{"instruction": "i", "input": i % 2, "output": "o"} for i in range(4)],
        "string messages": [{"messages": "not a list", "prompt": "p", "response": "r"}],
        "null prompt": [{"prompt": None if i == 2 else "p", "question": "q", "response": "r"} for i in range(5)],
        "struct without content": [{"messages": [{"role": "assistant", "text": "x"}]}],
        "list of strings": [{"messages": [["assistant", "c"]]}],
        "no fields at all": [{"meta": 1}],
    }
    for name, rows in cases.items():
        path = write_parquet(tmp_path / f"{len(name)}.parquet", rows)
        for kw in ({}, {"records": "messages"}, {"records": "text"}):
            assert_same(make_src(path, **kw)), name
    # timestamps and other types to_pylist converts its own way: the row-by-row path
    t = pa.table({"prompt": ["p", "q"], "response": ["r", "s"],
                  "at": pa.array([0, 10**9], pa.timestamp("s"))})
    path = write_parquet(tmp_path / "ts.parquet", t)
    seen = Counting(monkeypatch)
    kind, _ = assert_same(make_src(path))
    assert kind == "ok" and seen.refused == 1


def _with_bytes(column: str, raw: bytes, n: int = 3) -> pa.Table:
    bad = pa.Array.from_buffers(pa.string(), 1, [None, pa.py_buffer(np.array([0, len(raw)], np.int32).tobytes()),
                                                 pa.py_buffer(raw)])
    cols = {"prompt": pa.array(["p"] * n), "response": pa.array(["r"] * n), column: pa.array(["ok"] * n)}
    t = pa.table(cols)
    return pa.concat_tables([t, t.slice(0, 1).set_column(t.schema.get_field_index(column), column, bad)])


@pytest.mark.parametrize("column", ["prompt", "meta"])
def test_invalid_utf8_anywhere_in_the_batch(tmp_path, column):
    """to_pylist fails on invalid UTF-8 in any column, the records' own or not: the same error either way."""
    path = write_parquet(tmp_path / "u.parquet", _with_bytes(column, b"caf\xc3"))
    kind, err = assert_same(make_src(path))
    assert kind == "error" and err[0] is UnicodeDecodeError
    # past a limit, within the batch the limit cuts: to_pylist has converted the whole batch all the same
    assert_same(make_src(path, limit=2))


# ---- hypothesis: rows of every shape, written as Parquet -----------------------------------------------------------
def _table(rows):
    try:
        return pa.Table.from_pylist(rows)
    except (pa.ArrowException, TypeError, ValueError, OverflowError):
        return None


@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                   HealthCheck.too_slow, HealthCheck.filter_too_much])
@given(rows=st.lists(row(), min_size=1, max_size=12), kw=source_settings(), reps=st.integers(1, 3),
       group=st.sampled_from([1, 3, 1000]), block=st.sampled_from([1, 300, 1 << 20]))
def test_hypothesis_parquet(tmp_path, rows, kw, reps, group, block):
    table = _table(rows * reps)
    assume(table is not None)
    try:
        path = write_parquet(tmp_path / "h.parquet", table, row_group_size=group)
    except pa.ArrowException:  # a type Parquet cannot hold (a struct without fields)
        assume(False)
    assert_same(make_src(path, **kw), block_bytes=block)


@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
@given(rows=st.lists(row(), min_size=1, max_size=8), kw=source_settings())
def test_hypothesis_python_accepts_are_fast(rows, kw):
    """A batch whose every row to_record reads, with string or int ids and string (or null) fields, is made by the
    fast path, equal to the Python path's columns."""
    table = _table(rows)
    assume(table is not None)
    batch = table.to_batches()[0] if table.num_rows else None
    assume(batch is not None)
    src = make_src("f.parquet", **kw)
    try:
        want = RecordBlock.from_records([readers.to_record(r, src, f"f.parquet[row {i}]", i, "f.parquet")
                                         for i, r in enumerate(batch.to_pylist())])
    except Exception:
        return
    roles = roles_of(src)
    got = _arrow_records.batch_block(batch, src, roles=roles, id_prefix=readers.fallback_id(src, "f.parquet", 0)[:-1],
                                     where_prefix="f.parquet[row ", where_suffix="]", first=0)
    if got is None:
        # refused only for what the fast path does not take on: a non-string field type or one partly null
        # where to_record would look further
        schema = batch.schema
        plain = all(_arrow_records._plain(f.type) for f in schema)
        idt = schema.field(src["id_field"]).type if src["id_field"] in schema.names else pa.null()
        odd_id = not (pa.types.is_null(idt) or pa.types.is_integer(idt) or pa.types.is_string(idt))
        partly_null = any(0 < c.null_count < len(c) for c in batch.columns)
        # an int system prompt or input, a list where a string is read (an empty list as input: falsy, skipped by
        # to_record): refused; lists are the conversation's type only
        conversation = (src["fields"]["messages"],) if "messages" in src["fields"] else MESSAGES_KEYS
        odd_type = any(not (pa.types.is_string(f.type) or pa.types.is_null(f.type)
                            or (pa.types.is_list(f.type) and f.name in conversation))
                       for f in schema if f.name != src["id_field"])
        assert not plain or odd_id or partly_null or odd_type, (batch.to_pylist(), src)
        return
    assert got.equals(want), (got.to_records(), want.to_records())


_TEXT = st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=12)


@st.composite
def clean_rows(draw):
    """Rows of one shape, every field a string (or null where to_record allows it): what datasets hold."""
    shape = draw(st.sampled_from(["messages", "sharegpt", "alpaca", "prompt_response", "text"]))
    n = draw(st.integers(1, 12))
    ids = draw(st.sampled_from(["none", "str", "int", "mixed"]))
    lang = draw(st.sampled_from(["none", "str", "absent"]))
    system = shape != "text" and draw(st.booleans())
    rows = []
    for i in range(n):
        r: dict = {}
        if shape in ("messages", "sharegpt"):
            rk, ck, key = ("role", "content", "messages") if shape == "messages" else ("from", "value", "conversations")
            turns = draw(st.lists(st.tuples(st.sampled_from(["user", "human", "system", "tool", "gpt", "assistant",
                                                              "model", "bot"]), _TEXT), min_size=0, max_size=3))
            r[key] = [{rk: role, ck: text} for role, text in turns] + [{rk: draw(st.sampled_from(["gpt", "assistant"])),
                                                                       ck: draw(_TEXT)}]
        elif shape == "alpaca":
            r.update(instruction=draw(_TEXT), input=draw(st.one_of(st.none(), st.just(""), _TEXT)), output=draw(_TEXT))
        elif shape == "prompt_response":
            r.update(question=draw(_TEXT), answer=draw(_TEXT))
        else:
            r["text"] = draw(_TEXT)
        if system:
            r["system"] = draw(st.one_of(st.none(), st.just(""), _TEXT))
        if ids != "none":
            r["id"] = (draw(st.one_of(st.none(), _TEXT)) if ids == "str" else
                       draw(st.one_of(st.none(), st.integers(-2**63, 2**63 - 1))) if ids == "int" else
                       draw(st.one_of(st.none(), st.integers(0, 99))))
        if lang != "absent":
            r["lang"] = draw(st.one_of(st.none(), st.just(""), st.sampled_from(["en", "zh"]))) if lang == "str" else None
        rows.append(r)
    return rows


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                   HealthCheck.too_slow])
@given(rows=clean_rows(), kw=source_settings(), group=st.sampled_from([1, 4, 1000]))
def test_hypothesis_clean_rows_are_fast(tmp_path, rows, kw, group):
    """Rows of one shape with string fields: whatever to_record makes of them (records or an error), the Arrow path
    gives the same; where every row is a record, the fast path made every batch."""
    path = write_parquet(tmp_path / "h.parquet", rows, row_group_size=group)
    src = make_src(path, **{k: v for k, v in kw.items() if k != "id_field"})
    made = []
    real = _arrow_records.batch_block

    def counted(*a, **k):
        out = real(*a, **k)
        made.append(out is not None)
        return out

    _arrow_records.batch_block = counted
    try:
        kind, _ = assert_same(src)
    finally:
        _arrow_records.batch_block = real
    if kind == "ok":
        assert made and all(made), (rows, src)


def test_hub_dataset(monkeypatch):
    """A hub source (load_dataset stood in for by a local Dataset: no network here) is read as a table too."""
    datasets = pytest.importorskip("datasets")
    rows = chat_rows(3000, seed=9)
    calls = []

    def load_dataset(name, split=None):
        calls.append((name, split))
        return datasets.Dataset.from_list(rows)

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    seen = Counting(monkeypatch)
    for kw in ({}, {"limit": 2500, "name": "h"}, {"split": "test"}):
        kind, block = assert_same(make_src("org/chat", format="hub", **kw))
        assert kind == "ok" and len(block) == kw.get("limit", 3000)
        recs = block.to_records()
        assert recs[1]["where"] == "hub:org/chat[1]" and recs[7]["id"].startswith(("hub:org/chat:", "h:hub:org/chat:"))
    assert seen.made >= 3 and seen.refused == 0 and ("org/chat", "test") in calls


def test_reading_parquet_does_not_import_pandas(tmp_path):
    """pyarrow.array(), scalars from Python values and to_numpy() import pandas where it is installed (~0.2 s
    of every build and every worker): the Arrow path builds its arrays from buffers instead."""
    import subprocess
    import sys

    path = write_parquet(tmp_path / "c.parquet", chat_rows(500) + [dict(r, system="s") for r in chat_rows(5)])
    alpaca = write_parquet(tmp_path / "a.parquet", [SHAPES["alpaca"](i) for i in range(50)])
    code = ("import sys; from mlmix import readers; from mlmix.config import validate_config\n"
            "for p in sys.argv[1:]:\n"
            "    src = validate_config({'output': 'o', 'tokenizer': {'name': 'qwen'}, 'sources': [{'path': p}]})"
            "['sources'][0]\n"
            "    assert sum(len(b) for b in readers.iter_blocks(src)) > 0\n"
            "print('pandas' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code, path, alpaca], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False", out.stdout + out.stderr


def test_large_types_slices_and_empty_files(tmp_path, monkeypatch):
    """large_string / large_list columns, dictionary-encoded strings (read row by row), a file of no rows, alone
    and beside another: the Python path's records or error."""
    rows = chat_rows(300, seed=11)
    t = pa.Table.from_pylist(rows)
    large = t.cast(pa.schema([pa.field(f.name, _large(f.type)) for f in t.schema]))
    seen = Counting(monkeypatch)
    path = write_parquet(tmp_path / "large.parquet", large, row_group_size=70)
    assert assert_same(make_src(path, limit=250))[0] == "ok"
    assert seen.made >= 3 and seen.refused == 0
    path = write_parquet(tmp_path / "dict.parquet", t, row_group_size=70)
    src = make_src(path)
    dict_batches = [b for _, b, _ in readers._parquet_batches(path)]
    with monkeypatch.context() as mp:  # a reader that keeps dictionaries: such columns go row by row
        mp.setattr(readers, "_parquet_batches", _dictionary_batches)
        assert assert_same(src)[0] == "ok"
    assert dict_batches and seen.refused >= 5
    empty = write_parquet(tmp_path / "empty.parquet", t.slice(0, 0))
    kind, block = assert_same(make_src(empty))  # no records (the read stage then names the empty source)
    assert kind == "ok" and len(block) == 0
    d = tmp_path / "two"
    d.mkdir()
    write_parquet(d / "a.parquet", t.slice(0, 0))
    write_parquet(d / "b.parquet", t.slice(0, 5))
    kind, block = assert_same(make_src(d))
    assert kind == "ok" and len(block) == 5


def _large(t):
    if pa.types.is_string(t):
        return pa.large_string()
    if pa.types.is_list(t):
        return pa.large_list(_large(t.value_type))
    if pa.types.is_struct(t):
        return pa.struct([pa.field(f.name, _large(f.type)) for f in t])
    return t


def _dictionary_batches(path):
    pf = pq.ParquetFile(path, read_dictionary=["lang", "system"])
    i = 0
    for batch in pf.iter_batches(batch_size=8192):
        yield i, batch, batch.to_pylist
        i += batch.num_rows


# ---- reading ahead -------------------------------------------------------------------------------------------------
def test_read_ahead_keeps_order_errors_and_stops():
    """Parquet batches are read one or two ahead on a thread: the same items in order, an error after the items
    before it, and a reader closed early (a limit) stops the thread and closes the source."""
    import threading

    assert list(readers._read_ahead(iter(range(1000)))) == list(range(1000))
    assert list(readers._read_ahead(iter([]))) == []

    def failing():
        yield from range(5)
        raise ValueError("row group 3 cannot be read")

    got = []
    with pytest.raises(ValueError, match="row group 3"):
        for x in readers._read_ahead(failing()):
            got.append(x)
    assert got == list(range(5))

    closed = threading.Event()

    def endless():
        try:
            i = 0
            while True:
                yield i
                i += 1
        finally:
            closed.set()

    before = threading.active_count()
    gen = readers._read_ahead(endless())
    assert [next(gen) for _ in range(3)] == [0, 1, 2]
    gen.close()
    assert closed.wait(5)
    for _ in range(50):
        if threading.active_count() == before:
            break
        threading.Event().wait(0.02)
    assert threading.active_count() == before


def test_damaged_row_group_after_good_ones_read_ahead(tmp_path):
    """A file whose later row group cannot be read: the records before it, then the Python path's error (the
    row-by-row reader and the Arrow reader with its read-ahead agree)."""
    path = write_parquet(tmp_path / "d.parquet", chat_rows(3000, seed=5), row_group_size=500)
    with open(path, "rb") as f:
        data = bytearray(f.read())
    col = pq.read_metadata(path).row_group(4).column(0)
    start = col.dictionary_page_offset or col.data_page_offset
    data[start + 40:start + 400] = b"\x00" * 360  # damage row group 4's first pages
    with open(path, "wb") as f:
        f.write(bytes(data))
    kind, detail = assert_same(make_src(path), block_bytes=50_000)
    assert kind == "error" and "row group" in detail[1], detail
