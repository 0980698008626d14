"""Sources with a ``where`` filter, read in blocks (readers.iter_blocks): the C++ JSON lines reader tests the filter
itself (csrc/records.cpp, ``RecordMaker::matches``) and the Arrow reader tests it on the columns
(``mlmix._arrow_records.where_rows``). Both must give exactly what ``iter_source`` gives, whose filter is Python's
``all(row.get(k) == v for k, v in where.items())`` on the parsed row: the same records, or the same error.

The values a filter is tested with stand for the classes Python's ``==`` treats apart: None against missing and
null fields, str against escaped and unescaped JSON strings, int and bool against each other (``True == 1``), floats
(``1.0 == 1``, left to Python), lists and dicts (never equal to a scalar), and big ints.
"""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings, strategies as st

from mlmix import _arrow_records, readers

from test_records_native import assert_same, handbacks, make_src, row, source_settings, write_lines

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")

from test_records_arrow import _table  # noqa: E402

# what rows hold in the filtered fields, and what filters compare them with
FIELD_VALUES = [None, "train", "test", "", "1", 0, 1, -1, 2, True, False, 1.0, 0.0, 2.5, 2**70, [1], {"a": 1}, "trаin"]
WHERE_VALUES = [None, "train", "test", "", "1", 0, 1, -1, True, False, 1.0, 2**70, [1], {"a": 1}]
KEYS = ["split", "tag", "absent"]


@st.composite
def filtered_row(draw):
    r = dict(draw(row()))
    for k in ("split", "tag"):
        if draw(st.integers(0, 4)):
            r[k] = draw(st.sampled_from(FIELD_VALUES))
    return r


WHERE = st.dictionaries(st.sampled_from(KEYS), st.sampled_from(WHERE_VALUES), min_size=1, max_size=2)


def dump(r: dict, rnd: random.Random) -> bytes:
    text = json.dumps(r, ensure_ascii=rnd.random() < 0.5)
    return text.encode("utf-8", "surrogatepass") + b"\n"


# ---- JSON lines ----------------------------------------------------------------------------------------------------
@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                   HealthCheck.too_slow])
@given(rows=st.lists(filtered_row(), min_size=1, max_size=20), kw=source_settings(), where=WHERE,
       limit=st.one_of(st.none(), st.integers(0, 6)), seed=st.integers(0, 2**32 - 1),
       block=st.sampled_from([1, 300, 1 << 20]), threads=st.sampled_from([1, 2]))
def test_hypothesis_jsonl(tmp_path, rows, kw, where, limit, seed, block, threads):
    rnd = random.Random(seed)
    path = write_lines(tmp_path / "w.jsonl", [dump(r, rnd) for r in rows])
    extra = {"limit": limit} if limit is not None else {}
    assert_same(make_src(path, where=where, **kw, **extra), block_bytes=block, num_threads=threads)


# JSON spellings Python's json reads into the values above, some of which the C++ reader must decide itself
SPELLINGS = ['"train"', '"tr\\u0061in"', '"\\u0074rain"', '""', '"1"', "0", "-0", "1", "-1", "10", "1.0", "1e0",
             "0.0", "-0.0", "true", "false", "null", "[]", "[1]", "{}", '{"a": 1}', "1180591620717411303424",
             '"trаin"']


@pytest.mark.parametrize("value", [None, "train", "", "1", 0, 1, -1, 10, True, False, 1.0, 0.0, 2**70, [1], {"a": 1}])
def test_every_spelling_against_every_value(tmp_path, value):
    """Each JSON spelling of the filtered field (and an absent field, a duplicated key, an escaped key), one per
    line, against one filter value: the Python path's records."""
    lines = [f'{{"split": {sp}, "text": "t{i}"}}\n'.encode() for i, sp in enumerate(SPELLINGS)]
    lines += [b'{"text": "absent"}\n', b'{"split": "test", "split": "train", "text": "dup"}\n',
              b'{"spl\\u0069t": "train", "text": "escaped key"}\n', b'{"split": 1, "text": "x", "split": null}\n']
    path = write_lines(tmp_path / "s.jsonl", lines)
    for limit in (None, 1, 3):
        kw = {"limit": limit} if limit is not None else {}
        assert_same(make_src(path, where={"split": value}, **kw))
        assert_same(make_src(path, where={"split": value, "text": "t4"}, **kw))


def test_filtered_rows_are_not_handed_back(tmp_path):
    """Rows the filter drops never become records, so their shape does not matter and the C++ reader does not hand
    them back; kept rows are read natively; only a float compared with an int or a bool goes to Python."""
    data = b"".join([
        b'{"split": "train", "text": "kept"}\n',
        b'{"split": "test", "messages": 7}\n',  # would be an error as a record: filtered out
        b'{"split": "test"}\n',
        b'{"split": 1.0, "text": "float"}\n',
        b'{"split": ["train"], "text": "list"}\n',
        b'{"split": "tr\\u0061in", "text": "escaped"}\n',
    ])
    src = make_src("f.jsonl", where={"split": "train"})
    assert handbacks(src, data) == []
    src = make_src("f.jsonl", where={"split": 1})
    assert handbacks(src, data) == [4]
    src = make_src("f.jsonl", where={"split": True})
    assert handbacks(src, data) == [4]
    src = make_src("f.jsonl", where={"split": None})
    assert handbacks(src, data) == []


def test_filters_without_a_native_test_read_in_python(tmp_path):
    """A float, list or dict value (or a key that is not a str) has no native test: the file is read by the Python
    path, with the same result."""
    lines = [f'{{"split": {sp}, "text": "t{i}"}}\n'.encode() for i, sp in enumerate(SPELLINGS)]
    path = write_lines(tmp_path / "s.jsonl", lines)
    for where in ({"split": 1.0}, {"split": [1]}, {"split": {"a": 1}}, {"split": 0.0, "text": "t1"}):
        src = make_src(path, where=where)
        assert readers._native_settings(src)["where"] is None
        assert_same(src)
    assert readers._native_where({1: "x"}) is None
    assert readers._native_where({"k": 2**70}) == [("k", "int", str(2**70))]
    assert readers._native_where({"k": True, "j": None}) == [("k", "bool", "1"), ("j", "none", "")]


def test_errors_before_after_and_in_filtered_rows(tmp_path):
    """A line that is not JSON fails wherever it is (the Python path parses every line before filtering); a row that
    is not a record fails only where the filter keeps it; after the limit, the reader looks for the next kept row
    and fails on a bad line before it."""
    good = b'{"split": "train", "text": "a"}\n'
    other = b'{"split": "test", "text": "b"}\n'
    cases = [
        [good, b"{not json\n", good],
        [good, b'{"split": "test", "messages": 7}\n', good],
        [good, b'{"split": "train", "messages": 7}\n', good],
        [good, other, b"[1, 2]\n", good],
        [good, other, b"{bad\n", other, good],
    ]
    for i, lines in enumerate(cases):
        path = write_lines(tmp_path / f"e{i}.jsonl", lines)
        for limit in (None, 1, 2):
            kw = {"limit": limit} if limit is not None else {}
            assert_same(make_src(path, where={"split": "train"}, **kw))


def test_filtered_jsonl_directory_with_limit(tmp_path):
    d = tmp_path / "d"
    d.mkdir()
    rnd = random.Random(3)
    for f in range(3):
        rows = [{"id": f"{f}-{i}", "split": rnd.choice(["train", "test"]), "prompt": "p", "response": f"r{i}"}
                for i in range(200)]
        write_lines(d / f"part-{f}.jsonl", [json.dumps(r).encode() + b"\n" for r in rows])
    for limit in (None, 0, 1, 99, 100, 101, 250, 600):
        kw = {"limit": limit} if limit is not None else {}
        assert_same(make_src(d, where={"split": "train"}, **kw), block_bytes=2000, num_threads=2)


# ---- Parquet -------------------------------------------------------------------------------------------------------
@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                   HealthCheck.too_slow, HealthCheck.filter_too_much])
@given(rows=st.lists(filtered_row(), min_size=1, max_size=12), kw=source_settings(), where=WHERE,
       limit=st.one_of(st.none(), st.integers(0, 6)), reps=st.integers(1, 3), group=st.sampled_from([1, 3, 1000]))
def test_hypothesis_parquet(tmp_path, rows, kw, where, limit, reps, group):
    table = _table(rows * reps)
    assume(table is not None)
    try:
        pq.write_table(table, tmp_path / "w.parquet", row_group_size=group)
    except pa.ArrowException:
        assume(False)
    extra = {"limit": limit} if limit is not None else {}
    assert_same(make_src(tmp_path / "w.parquet", where=where, **kw, **extra), block_bytes=300)


def _typed_columns(n: int, seed: int = 0) -> pa.Table:
    """Chat rows with a filter column of each type the columns decide (string, int, uint, bool, null) and one they
    do not (float), nulls here and there."""
    rnd = random.Random(seed)

    def maybe(v):
        return None if rnd.random() < 0.1 else v

    return pa.table({
        "id": [f"r{i}" for i in range(n)],
        "prompt": [f"p{i}" for i in range(n)],
        "response": [f"r{i}" for i in range(n)],
        "split": pa.array([maybe(rnd.choice(["train", "test", "", "trai"])) for _ in range(n)], pa.string()),
        "big": pa.array([maybe(rnd.choice(["train", "test"])) for _ in range(n)], pa.large_string()),
        "n": pa.array([maybe(rnd.choice([0, 1, -1, 5])) for _ in range(n)], pa.int8()),
        "u": pa.array([maybe(rnd.choice([0, 1, 2**64 - 1])) for _ in range(n)], pa.uint64()),
        "flag": pa.array([maybe(rnd.choice([True, False])) for _ in range(n)], pa.bool_()),
        "nothing": pa.array([None] * n, pa.null()),
        "score": pa.array([maybe(rnd.choice([0.0, 1.0, 0.5])) for _ in range(n)], pa.float64()),
    })


DECIDED = [{"split": "train"}, {"split": ""}, {"split": None}, {"split": 1}, {"big": "test"}, {"n": 1}, {"n": True},
           {"n": 0}, {"u": 0}, {"flag": False}, {"n": False},
           {"n": -1}, {"n": 300}, {"n": "1"}, {"u": 2**64 - 1}, {"u": -1}, {"u": 1}, {"flag": True}, {"flag": 0},
           {"flag": 2}, {"flag": None}, {"nothing": None}, {"nothing": 0}, {"absent": None}, {"absent": "x"},
           {"split": "train", "flag": False}, {"score": 1, "split": "nope"}]
UNDECIDED = [{"score": 1}, {"score": 0.5}, {"score": None}, {"n": 1.0}, {"split": [1]}, {"flag": 1.0}]


@pytest.mark.parametrize("where,on_columns", [(w, True) for w in DECIDED] + [(w, False) for w in UNDECIDED],
                         ids=lambda w: repr(w))
def test_typed_columns(tmp_path, monkeypatch, where, on_columns):
    """Each column type against each kind of value: the Python path's records; decided on the columns (every batch
    made by the fast path) for the filters the columns can decide, row by row for the others."""
    path = tmp_path / "t.parquet"
    pq.write_table(_typed_columns(3000), path, row_group_size=700)
    src = make_src(path, where=where)
    decided = []
    real = _arrow_records.where_rows

    def counted(batch, w):
        out = real(batch, w)
        decided.append(out is not None)
        return out

    monkeypatch.setattr(_arrow_records, "where_rows", counted)
    kind, _ = assert_same(src, block_bytes=20_000)
    assert kind == "ok"
    assert decided and all(decided) == on_columns  # (1.0 == 1: DECIDED holds {'n': 1.0} for Python's `in`)
    for limit in (0, 1, 699, 700, 701):
        assert_same(make_src(path, where=where, limit=limit), block_bytes=20_000)


def test_row_numbers_of_kept_rows(tmp_path):
    """Kept rows keep their own row numbers: fallback ids and locations name the row in the file, whatever the filter
    dropped before them."""
    path = tmp_path / "t.parquet"
    rows = [{"prompt": f"p{i}", "response": f"r{i}", "split": "train" if i % 3 == 0 else "test"} for i in range(50)]
    pq.write_table(pa.Table.from_pylist(rows), path, row_group_size=7)
    block = next(readers.iter_blocks(make_src(path, where={"split": "train"})))
    recs = block.to_records()
    assert [r["where"] for r in recs] == [f"{path}[row {i}]" for i in range(0, 50, 3)]
    assert [r["id"].rsplit(":", 1)[1] for r in recs] == [str(i) for i in range(0, 50, 3)]


def test_invalid_utf8_in_a_filtered_batch(tmp_path):
    """A batch whose every row the filter drops still fails as to_pylist fails on it, as the Python path converts it."""
    good = pa.table({"split": ["train"], "text": ["ok"]})
    bad = pa.table({"split": pa.array([b"test"], pa.binary()).view(pa.string()),
                    "text": pa.array([b"\xff"], pa.binary()).view(pa.string())})
    path = tmp_path / "b.parquet"
    with pq.ParquetWriter(path, good.schema) as w:
        w.write_table(good)
        w.write_table(bad)
        w.write_table(good)
    for limit in (None, 1, 2):
        kw = {"limit": limit} if limit is not None else {}
        assert assert_same(make_src(path, where={"split": "train"}, **kw))[0] == "error"


def test_where_rows_is_exact_on_slices(tmp_path):
    """where_rows reads sliced arrays (offsets into shared buffers) right."""
    t = _typed_columns(500, seed=4)
    batch = t.to_batches()[0].slice(37, 300)
    rows = batch.to_pylist()
    for where in DECIDED:
        got = _arrow_records.where_rows(batch, where)
        want = [k for k, r in enumerate(rows) if readers._matches(r, where)]
        assert got is not None and got.tolist() == want, where
    assert np.array_equal(_arrow_records._numbered(b"p", np.array([3, 10, 99, 100]), b"]")[1], [0, 3, 7, 11, 16])


def test_struct_with_a_field_name_twice(tmp_path):
    """to_pylist refuses a struct column with a field name twice: the source fails as the Python path fails, with or
    without a filter, whether the filter keeps rows or none (review finding)."""
    st_ = pa.StructArray.from_arrays([pa.array([1, 2]), pa.array([3, 4])], names=["a", "a"])
    path = tmp_path / "dup.parquet"
    pq.write_table(pa.table({"text": ["x", "y"], "split": ["test", "test"], "meta": st_}), path)
    for where in ({}, {"split": "train"}, {"split": "test"}):
        kind, _ = assert_same(make_src(path, where=where))
        assert kind == "error"


def test_a_value_whose_equality_raises_is_left_to_python(tmp_path):
    """A filter value built in Python whose == raises (a numpy array) is compared by Python, which raises, even where
    another term is false in every row (review finding)."""
    path = tmp_path / "n.parquet"
    pq.write_table(pa.table({"text": ["x", "y"], "split": ["a", "b"], "n": pa.array([[1, 2], [3, 4]])}), path)
    src = make_src(path)
    src = dict(src, where={"n": np.array([1, 2]), "split": "zzz"})
    kind, detail = assert_same(src)
    assert kind == "error" and "ambiguous" in detail[1]
    assert _arrow_records._builtin({"a": [1, (2.5, None, b"x")]}) and not _arrow_records._builtin([np.int64(1)])


def test_an_error_kept_by_the_caller_stops_the_read_ahead(tmp_path):
    """A record error raised while batches are read ahead: the thread is stopped and the file closed even while the
    caller keeps the exception (and with it the reader's frame) alive (review finding)."""
    import threading

    rows = [{"text": f"t{i}"} for i in range(50_000)]
    rows[10] = {"text": None}
    path = tmp_path / "bad.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path, row_group_size=8192)
    saved = None
    try:
        list(readers.iter_blocks(make_src(path)))
    except ValueError as exc:
        saved = exc
    assert saved is not None
    for _ in range(100):
        if not any(t.name == "mlmix-read-ahead" for t in threading.enumerate()):
            break
        threading.Event().wait(0.02)
    assert not any(t.name == "mlmix-read-ahead" for t in threading.enumerate())


def test_invalid_utf8_in_the_batch_after_the_limit(tmp_path):
    """Without a filter too: the batch after the one that reaches the limit is converted by the Python path (to
    find the row after the limit), so invalid UTF-8 there fails the source on both paths."""
    good = pa.table({"text": ["ok"]})
    bad = pa.table({"text": pa.array([b"\xff"], pa.binary()).view(pa.string())})
    path = tmp_path / "b.parquet"
    with pq.ParquetWriter(path, good.schema) as w:
        w.write_table(good)
        w.write_table(bad)
    assert assert_same(make_src(path, limit=1))[0] == "error"
    assert assert_same(make_src(path, limit=0))[0] == "ok"  # the first row already reaches it: nothing after
