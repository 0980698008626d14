import os

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import mlmix
from mlmix import Ragged


seqs_st = st.lists(st.lists(st.integers(0, 2**32 - 1), max_size=20), max_size=30)


@given(seqs_st)
@settings(max_examples=100, deadline=None)
def test_roundtrip_lists(seqs):
    r = Ragged.from_lists(seqs, dtype=np.uint32)
    assert len(r) == len(seqs)
    assert r.to_lists() == seqs
    assert r.lengths.dtype == np.int64
    assert r.lengths.tolist() == [len(s) for s in seqs]
    assert r.values.dtype == np.uint32


@given(seqs_st, st.integers(-35, 35), st.integers(-35, 35), st.sampled_from([1, 2, -1, 3]))
@settings(max_examples=100, deadline=None)
def test_slicing_matches_list(seqs, a, b, step):
    r = Ragged.from_lists(seqs, dtype=np.uint32)
    assert r[a:b:step].to_lists() == seqs[a:b:step]


@given(seqs_st, st.data())
@settings(max_examples=50, deadline=None)
def test_take_and_concat(seqs, data):
    r = Ragged.from_lists(seqs, dtype=np.uint32)
    if seqs:
        idx = data.draw(st.lists(st.integers(-len(seqs), len(seqs) - 1), max_size=40))
    else:
        idx = []
    assert r.take(np.array(idx, dtype=np.int64)).to_lists() == [seqs[i] for i in idx]
    both = Ragged.concat([r, r[1:]])
    assert both.to_lists() == seqs + seqs[1:]


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.int32, np.uint32, np.int64, np.float32, np.float64, bool])
def test_take_every_dtype_and_layout(dtype, tmp_path):
    """take copies whole sequences in the core for contiguous numeric values (in memory or memory-mapped) and
    gathers element-wise otherwise (strided values): the same sequences every way."""
    seqs = [[1, 2, 3], [], [4], [5, 6, 0, 1], [1]]
    r = Ragged.from_lists(seqs, dtype=dtype)
    idx = [3, 0, 1, 3, -1, 2]
    want = [[dtype(x) for x in seqs[i]] for i in idx]
    np.save(tmp_path / "v.npy", r.values)
    mapped = np.load(tmp_path / "v.npy", mmap_mode="r")
    strided = np.repeat(r.values, 2)[::2]  # every other element: not contiguous
    assert not strided.flags.c_contiguous
    for values in (r.values, mapped, strided):
        got = Ragged(values, r.offsets).take(np.array(idx))
        assert got.values.dtype == np.dtype(dtype) and got.to_lists() == want
        assert got.offsets.dtype == np.int64 and got.offsets.tolist() == [0, 4, 7, 7, 11, 12, 13]
    assert Ragged(r.values, r.offsets).take(np.zeros(0, np.int64)).to_lists() == []


def test_indexing_errors():
    r = Ragged.from_lists([[1, 2], [3]])
    assert r[-1].tolist() == [3]
    with pytest.raises(IndexError, match="out of range"):
        r[2]
    with pytest.raises(IndexError, match="out of range"):
        r.take([0, 5])


@pytest.mark.parametrize(
    "offsets, match",
    [
        ([1, 2, 3], r"offsets\[0\] must be 0"),
        ([0, 2, 1, 3], "non-decreasing"),
        ([0, 2], r"offsets\[-1\] must equal len\(values\) = 3"),
        ([], "at least one element"),
        ([[0, 3]], "1-D"),
    ],
)
def test_bad_offsets(offsets, match):
    with pytest.raises(ValueError, match=match):
        Ragged(np.arange(3), np.array(offsets, dtype=np.int64))


def test_bad_dtypes():
    with pytest.raises(TypeError, match="integer"):
        Ragged(np.arange(3), np.array([0.0, 3.0]))
    with pytest.raises(ValueError, match="outside the range of uint32"):
        Ragged.from_lists([[1, -1]], dtype=np.uint32)


def test_save_load_roundtrip(tmp_path):
    r = Ragged.from_lists([[1, 2, 3], [], [4]], dtype=np.uint32)[1:]
    r.save(tmp_path / "r")
    back = Ragged.load(tmp_path / "r")
    assert back.equals(r)
    assert not back.values.flags.owndata  # memory-mapped, not loaded
    with pytest.raises(FileNotFoundError, match="values.npy"):
        Ragged.load(tmp_path / "missing")


def test_build_info():
    info = mlmix.build_info()
    assert info["version"] == mlmix.__version__
    assert "cpu" in info["backends"]
    assert "-O3" in info["cxx_flags"]


def test_require_names_extra():
    from mlmix import _deps

    _deps._EXTRA["mlmix_surely_missing_pkg"] = "io"
    try:
        with pytest.raises(ImportError, match=r"pip install 'mlmix\[io\]'"):
            _deps.require("mlmix_surely_missing_pkg")
    finally:
        del _deps._EXTRA["mlmix_surely_missing_pkg"]


@pytest.mark.parametrize("chunks", [[], [[1, 2], [3]], [[5] * 1000, [], [7, 8, 9]]])
def test_writer_notes_the_crc_of_what_it_wrote(tmp_path, chunks):
    """RaggedWriter and RecordBlock.save checksum their files as they write them, for the stage cache's seal: the
    noted CRC is the file's (its final header included), and a file changed since is read again, not trusted."""
    import zlib

    from mlmix import _outputs
    from mlmix.ragged import RaggedWriter
    from mlmix.recblock import RecordBlock

    with RaggedWriter(tmp_path / "w", np.uint32) as w:
        for c in chunks:
            w.append(Ragged.from_lists([c], dtype=np.uint32))
    block = RecordBlock.from_records([{"id": "a", "lang": "fr", "messages": [{"role": "user", "content": "hi"},
                                                    {"role": "assistant", "content": "héllo"}]}, {"id": "b", "text": "x"}])
    block.save(tmp_path / "b.rb")
    for path in (tmp_path / "w" / "values.npy", tmp_path / "b.rb"):
        want = f"{zlib.crc32(path.read_bytes()):08x}"
        assert _outputs._NOTED_CRC32[os.path.abspath(path)][1] == int(want, 16)
        assert _outputs.file_crc32(str(path)) == want
    block.save(tmp_path / "b.rb")  # noted again, then changed behind the writer's back
    raw = bytearray((tmp_path / "b.rb").read_bytes())
    raw[-1] ^= 1
    (tmp_path / "b.rb").write_bytes(bytes(raw))
    assert _outputs.file_crc32(str(tmp_path / "b.rb")) == f"{zlib.crc32(bytes(raw)):08x}"
