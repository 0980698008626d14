"""RecordBlock: canonical records as columns, the build's currency between stages (mlmix.recblock)."""

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from mlmix.recblock import RecordBlock

_text = st.text(st.characters(blacklist_categories=("Cs",)), max_size=20)
_lang = st.one_of(st.none(), st.sampled_from(["en", "fi", "zh", "sw"]))
_text_rec = st.fixed_dictionaries({"id": _text, "lang": _lang, "where": _text, "text": _text})
_chat_rec = st.fixed_dictionaries({
    "id": _text, "lang": _lang, "where": _text,
    "messages": st.lists(st.fixed_dictionaries({"role": st.sampled_from(["system", "user", "assistant", "tool"]),
                                                "content": _text}), min_size=1, max_size=4)})
_records = st.lists(st.one_of(_text_rec, _chat_rec), max_size=12)


@settings(max_examples=60, deadline=None)
@given(_records, _records, st.data())
def test_columns_round_trip_take_and_concat(tmp_path_factory, a, b, data):
    ba, bb = RecordBlock.from_records(a), RecordBlock.from_records(b)
    assert ba.to_records() == a and len(ba) == len(a)
    joined = RecordBlock.concat([ba, bb])
    assert joined.to_records() == a + b
    idx = data.draw(st.lists(st.integers(0, max(len(a) + len(b) - 1, 0)), max_size=20)) if a or b else []
    assert joined.take(idx).to_records() == [(a + b)[i] for i in idx]
    assert joined.texts() == [r["text"] if "text" in r else
                              "\n".join(m["content"] for m in r["messages"] if m["role"] != "system") for r in a + b]
    path = tmp_path_factory.mktemp("rb") / "b.npz"
    joined.save(path)
    back = RecordBlock.load(path)
    assert back.equals(joined) and back.to_records() == a + b


def test_empty_block_and_bad_construction():
    empty = RecordBlock.empty()
    assert len(empty) == 0 and empty.to_records() == [] and empty.texts() == []
    assert RecordBlock.concat([]).to_records() == []
    assert empty.take(np.zeros(0, np.int64)).to_records() == []
    with pytest.raises(TypeError, match="missing .*'kind'"):
        RecordBlock(has_lang=np.zeros(0))
    with pytest.raises(ValueError, match="column must be one of"):
        empty.strings("nope")


def test_take_rejects_rows_out_of_range_and_bad_offsets():
    block = RecordBlock.from_records([{"id": "a", "text": "x"}, {"id": "b", "text": "yz"}])
    assert block.take([1, 1, 0]).texts() == ["yz", "yz", "x"]
    for bad in ([2], [-1], [0, 5]):
        with pytest.raises(ValueError, match=r"index must hold record numbers in \[0, 2\), got (2|-1|5)"):
            block.take(bad)
    from mlmix._core_loader import core

    values = np.frombuffer(b"abcdef", np.uint8)
    assert [bytes(v) for v in [core._take_strings(values, np.array([0, 2, 6]), np.array([1, 0]))[0]]] == [b"cdefab"]
    with pytest.raises(ValueError, match=r"rows\[0\] = 3 is out of range \[0, 2\)"):
        core._take_strings(values, np.array([0, 2, 6]), np.array([3]))
    with pytest.raises(ValueError, match="offsets must not decrease"):
        core._take_strings(values, np.array([0, 4, 2]), np.array([0]))
    with pytest.raises(ValueError, match=r"exceeds the number of values \(6\)"):
        core._take_strings(values, np.array([0, 2, 9]), np.array([1]))
    # items wider than a byte: offsets count items, the values are their bytes
    wide = np.arange(6, dtype=np.uint32)
    got, offs = core._take_strings(wide.view(np.uint8), np.array([0, 2, 6]), np.array([1, 0]), 4)
    assert got.view(np.uint32).tolist() == [2, 3, 4, 5, 0, 1] and offs.tolist() == [0, 4, 6]
    with pytest.raises(ValueError, match=r"exceeds the number of values \(6\)"):
        core._take_strings(wide.view(np.uint8), np.array([0, 2, 7]), np.array([1]), 4)
    with pytest.raises(ValueError, match="itemsize must be 1, 2, 4 or 8, got 3"):
        core._take_strings(wide.view(np.uint8), np.array([0, 2, 6]), np.array([1]), 3)
    with pytest.raises(ValueError, match=r"not a multiple of itemsize 8"):
        core._take_strings(wide.view(np.uint8)[:20], np.array([0, 1]), np.array([0]), 8)
    with pytest.raises(ValueError, match="offsets must have at least one entry"):
        core._take_strings(values, np.zeros(0, np.int64), np.zeros(0, np.int64))


def test_block_file_round_trip_and_damage(tmp_path):
    block = RecordBlock.from_records([{"id": "a", "lang": "fi", "text": "hyvä"},
                                      {"id": "b", "messages": [{"role": "user", "content": "x" * 100}]}])
    path = tmp_path / "b.rb"
    block.save(path)
    back = RecordBlock.load(path)
    assert back.equals(block) and back.to_records() == block.to_records()
    back.take([1])  # the loaded columns are ordinary arrays
    RecordBlock.empty().save(tmp_path / "e.rb")
    assert RecordBlock.load(tmp_path / "e.rb").to_records() == []
    raw = path.read_bytes()
    cases = {"trunc.rb": raw[: len(raw) - 70], "magic.rb": b"NOTABLOCK" + raw[9:], "short.rb": raw[:5], "empty.rb": b"",
             "header.rb": raw[:17] + b"]" + raw[18:]}
    for name, data in cases.items():
        (tmp_path / name).write_bytes(data)
        for load in (RecordBlock.load, RecordBlock.load_langs, lambda p: RecordBlock.load_strings(p, "id")):
            with pytest.raises(ValueError, match=r"is not a RecordBlock file"):
                load(tmp_path / name)
    # one column read alone: the loaded block's, without the texts
    assert RecordBlock.load_langs(path) == block.langs()
    for column in ("id", "lang", "where", "role", "content"):
        assert RecordBlock.load_strings(path, column) == block.strings(column)
    with pytest.raises(ValueError, match="column must be one of"):
        RecordBlock.load_strings(path, "kind")


@given(_records, st.data())
@settings(max_examples=80, deadline=None)
def test_arrow_table_round_trip_under_slices_and_concatenation(records, data):
    """to_arrow / from_arrow: the records back from the table, from any slice of it, from tables joined (several
    chunks), and from a selection of rows: the table a Ray dataset carries between stages."""
    pa = pytest.importorskip("pyarrow")
    block = RecordBlock.from_records(records)
    table = block.to_arrow("rec_")
    assert table.num_rows == len(records)
    assert RecordBlock.from_arrow(table, "rec_").to_records() == records
    lo = data.draw(st.integers(0, len(records)))
    hi = data.draw(st.integers(lo, len(records)))
    assert RecordBlock.from_arrow(table.slice(lo, hi - lo), "rec_").to_records() == records[lo:hi]
    joined = pa.concat_tables([table.slice(lo, hi - lo), table.slice(0, lo)])
    assert RecordBlock.from_arrow(joined, "rec_").to_records() == records[lo:hi] + records[:lo]
    rows = data.draw(st.lists(st.integers(0, max(0, len(records) - 1)), max_size=8)) if records else []
    picked = table.take(pa.array(rows, type=pa.int64()))
    back = RecordBlock.from_arrow(picked, "rec_")
    assert back.to_records() == [records[i] for i in rows]
    # the C++ text column reads the block straight from Arrow's buffers
    assert [bytes(back.text_column()[0][a:b]) for a, b in zip(back.text_column()[1][:-1], back.text_column()[1][1:])] \
        == [t.encode() for t in back.texts()]


def test_arrow_table_errors_name_the_column():
    pa = pytest.importorskip("pyarrow")
    table = RecordBlock.from_records([{"id": "a", "lang": "en", "where": "w", "text": "x"}]).to_arrow()
    with pytest.raises(ValueError, match=r"the record columns \['rec_kind'"):
        RecordBlock.from_arrow(table, "rec_")
    with pytest.raises(ValueError, match=r"column 'id' must hold strings, got int64"):
        RecordBlock.from_arrow(table.set_column(2, "id", pa.array([1])))
    with pytest.raises(ValueError, match=r"column 'lang' has 1 nulls"):
        RecordBlock.from_arrow(table.set_column(3, "lang", pa.array([None], type=pa.string())))
    two = RecordBlock.from_records([{"id": "a", "lang": "en", "where": "w",
                                    "messages": [{"role": "user", "content": "x"}]}]).to_arrow()
    bad = two.set_column(6, "content", pa.array([["x", "y"]], type=pa.large_list(pa.large_string())))
    with pytest.raises(ValueError, match="role and content must hold the same number of turns"):
        RecordBlock.from_arrow(bad)
    # a turn column that is not a list of strings, under a prefix: the column named as the table has it
    pre = two.rename_columns(["rec_" + c for c in two.column_names])
    with pytest.raises(ValueError, match=r"column 'rec_role' must hold lists of strings \(one per turn\), got int64"):
        RecordBlock.from_arrow(pre.set_column(5, "rec_role", pa.array([5])), "rec_")
    with pytest.raises(ValueError, match=r"column 'rec_content' must hold strings, got int64"):
        RecordBlock.from_arrow(pre.set_column(6, "rec_content", pa.array([[1]], type=pa.list_(pa.int64()))), "rec_")
    with pytest.raises(ValueError, match=r"column 'rec_content' has 1 nulls"):
        RecordBlock.from_arrow(pre.set_column(6, "rec_content", pa.array([None], type=pa.list_(pa.string()))), "rec_")
    # plain (32-bit offset) strings are read too
    small = table.set_column(2, "id", pa.array(["a"], type=pa.string()))
    assert RecordBlock.from_arrow(small).to_records()[0]["id"] == "a"


def test_read_stage_counts_from_columns_equal_counting_each_record():
    """The read stage counts a block from its columns: the same counters, in the same key order, as counting the
    records one by one (languages absent, empty, long, non-ASCII, with NUL bytes; text and chat records)."""
    import random

    from mlmix.engine.stages import read as s_read

    rnd = random.Random(1)
    for _ in range(300):
        n = rnd.randint(0, 40)
        recs = []
        for i in range(n):
            lang = rnd.choice([None, "", "en", "zh-Hant", "é", "?", "x" * rnd.randint(1, 70), "日本", "en\x00", "\x00"])
            body = ({"text": "t"} if rnd.random() < 0.5 else {"messages": [{"role": "user", "content": "c"}]})
            recs.append({"id": str(i), "lang": lang, "where": "", **body})
        block = RecordBlock.from_records(recs)
        uids = np.array([(rnd.randint(0, 2) << s_read.UID_SHIFT) + i for i in range(n)], np.int64)
        want = s_read.count(uids, block.langs(), (block.kind == 0).tolist())
        got = s_read.count_block(uids, block)
        assert {k: list(v.items()) for k, v in got.items()} == {k: list(v.items()) for k, v in want.items()}
    with pytest.raises(ValueError, match="uids must have one entry per record"):
        s_read.count_block(np.zeros(3, np.int64), RecordBlock.from_records([]))
