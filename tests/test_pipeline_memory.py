"""Bounded-memory building blocks of the pipeline: streamed Ragged writing, page-bounded span copies,
stores packed from memory-mapped tokens, and chunked / per-language dedup. Each is checked against the
plain in-memory computation it replaces (same values, same bytes)."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import mlmix.ragged as ragged_mod
import mlmix.store as store_mod
from mlmix import dedup
from mlmix.engine import BuildLog, local
from mlmix.ragged import Ragged, RaggedWriter, is_mapped, take_spans
from mlmix.store import write_store

lists = st.lists(st.lists(st.integers(0, 2**32 - 1), max_size=6), max_size=8)


@settings(max_examples=30, deadline=None)
@given(chunks=st.lists(lists, max_size=5))
def test_ragged_writer_equals_concat(tmp_path_factory, chunks):
    path = str(tmp_path_factory.mktemp("rw") / "r")
    parts = [Ragged.from_lists(c, dtype=np.uint32) if c else Ragged(np.zeros(0, np.uint32), np.zeros(1, np.int64))
             for c in chunks]
    with RaggedWriter(path, np.uint32) as w:
        for p in parts:
            w.append(p)
    got = Ragged.load(path)
    assert is_mapped(got.values) or got.values.size == 0
    want = [x for c in chunks for x in c]
    assert got.to_lists() == want
    assert got.values.dtype == np.uint32 and got.offsets.dtype == np.int64


def test_ragged_writer_checks_range_and_closed(tmp_path):
    w = RaggedWriter(str(tmp_path / "m"), np.uint8)
    with pytest.raises(ValueError, match="outside the range of uint8"):
        w.append(Ragged.from_lists([[1, 300]], dtype=np.int64))
    w.close()
    with pytest.raises(ValueError, match="closed"):
        w.append(Ragged.from_lists([[1]], dtype=np.uint8))


@settings(max_examples=30, deadline=None)
@given(seqs=st.lists(st.lists(st.integers(0, 1000), max_size=7), min_size=1, max_size=40), data=st.data())
def test_take_spans_equals_take(tmp_path_factory, monkeypatch_module, seqs, data):
    r = Ragged.from_lists(seqs, dtype=np.uint32)
    path = str(tmp_path_factory.mktemp("ts") / "r")
    r.save(path)
    mapped = Ragged.load(path)
    index = np.array(sorted(set(data.draw(st.lists(st.integers(0, len(seqs) - 1), max_size=20)))), dtype=np.int64)
    want = r.take(index)
    for src in (r, mapped):
        values, offsets = take_spans(src.values, src.offsets, index)
        assert Ragged(values, offsets).equals(want)
    # where the mapped file cannot be opened again: the mapping is read, its pages released in batches
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(ragged_mod, "_read_mapped", lambda *a: None)
        values, offsets = take_spans(mapped.values, mapped.offsets, index)
        assert Ragged(values, offsets).equals(want)


MAP_FILES = os.path.isdir("/proc/self/map_files")


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.uint32, np.int64])
@pytest.mark.parametrize("skip", [0, 1, 4097])
def test_take_spans_reads_the_mapped_file(tmp_path, dtype, skip):
    """A mapped array (a whole file, or a view starting anywhere in it) is read from its file with pread:
    the same sequences as an in-memory take, runs of consecutive sequences included."""
    rng = np.random.default_rng(skip)
    lengths = rng.integers(0, 50, 3000)
    r = Ragged.from_lengths(rng.integers(0, 200, int(lengths.sum())).astype(dtype), lengths)
    path = tmp_path / "values.npy"
    np.save(path, r.values)
    mapped = np.load(path, mmap_mode="r")[skip:]  # a view: the sequences start `skip` items in
    offsets = np.maximum(r.offsets - skip, 0)
    shifted = Ragged(np.asarray(r.values[skip:]), offsets)
    index = np.unique(np.concatenate([rng.integers(0, len(r), 400), np.arange(100, 160), [0, len(r) - 1]]))
    if MAP_FILES:
        assert ragged_mod._read_mapped(mapped, offsets, index) is not None
    values, got_offsets = take_spans(mapped, offsets, index)
    assert values.dtype == np.dtype(dtype) and not is_mapped(values)
    assert Ragged(values, got_offsets).equals(shifted.take(index))


def test_take_spans_reads_the_mapping_not_whatever_has_its_name_now(tmp_path):
    """The file read is the one mapped: replaced under its name since, or a copy-on-write mapping changed in
    memory, the sequences are the mapped ones."""
    r = Ragged.from_lists([[1, 2, 3], [4, 5], [6]], dtype=np.uint32)
    path = tmp_path / "values.npy"
    np.save(path, r.values)
    mapped = np.load(path, mmap_mode="r")
    np.save(tmp_path / "other.npy", r.values + 100)
    os.replace(tmp_path / "other.npy", path)
    values, offsets = take_spans(mapped, r.offsets, np.array([0, 2]))
    assert Ragged(values, offsets).to_lists() == [[1, 2, 3], [6]]

    private = np.load(path, mmap_mode="c")  # the file now holds 101..106
    private[0] = 7  # in this process's pages only
    assert ragged_mod._read_mapped(private, r.offsets, np.array([0])) is None
    values, offsets = take_spans(private, r.offsets, np.array([0, 1]))
    assert Ragged(values, offsets).to_lists() == [[7, 102, 103], [104, 105]]


def test_take_spans_bad_offsets_are_errors(tmp_path):
    np.save(tmp_path / "v.npy", np.arange(10, dtype=np.uint32))
    mapped = np.load(tmp_path / "v.npy", mmap_mode="r")
    with pytest.raises(ValueError, match="offsets"):
        take_spans(mapped, np.array([0, 5, 11], dtype=np.int64), np.array([1]))
    with pytest.raises((ValueError, IndexError)):
        take_spans(mapped, np.array([0, 5, 10], dtype=np.int64), np.array([2]))


@pytest.fixture(scope="module")
def monkeypatch_module():
    # tiny release batches, so that the chunked path of take_spans runs on small inputs
    mp = pytest.MonkeyPatch()
    mp.setattr(ragged_mod, "_SPANS_PER_RELEASE", 3)
    yield mp
    mp.undo()


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.uint32, np.int64])
def test_read_spans_reads_the_mapped_file(tmp_path, dtype):
    """Spans in any order (adjacent ones read together, empty ones, the file's first and last item) from a
    mapped array or a view into it: what slicing gives; bad spans are errors naming the span; an array in
    memory is left to the caller (None)."""
    rng = np.random.default_rng(int(np.dtype(dtype).itemsize))
    values = rng.integers(0, 200, 5000).astype(dtype)
    np.save(tmp_path / "v.npy", values)
    for skip in (0, 3):
        mapped = np.load(tmp_path / "v.npy", mmap_mode="r")[skip:]
        n = len(mapped)
        starts = np.concatenate([rng.integers(0, n - 60, 300), [0, n - 1, 10, 15, 15, 40]]).astype(np.int64)
        lengths = np.concatenate([rng.integers(0, 60, 300), [3, 1, 5, 0, 7, 2]]).astype(np.int64)
        want = np.concatenate([np.asarray(mapped[a:a + k]) for a, k in zip(starts, lengths)])
        got = ragged_mod.read_spans(mapped, starts, lengths)
        if MAP_FILES:
            assert got is not None and got.dtype == np.dtype(dtype) and not is_mapped(got)
            assert np.array_equal(got, want)
            for bad_start, bad_len in ((n - 2, 3), (-1, 1), (0, -1), (n + 1, 0)):
                with pytest.raises(ValueError, match="span 1 "):
                    ragged_mod.read_spans(mapped, np.array([0, bad_start]), np.array([1, bad_len]))
            with pytest.raises(ValueError, match="starts and lengths differ"):
                ragged_mod.read_spans(mapped, np.array([0, 1]), np.array([1]))
    assert ragged_mod.read_spans(values, np.array([0]), np.array([1])) is None


@pytest.mark.parametrize("direct", [True, False])
@pytest.mark.parametrize("threads", ["1", "3"])
@pytest.mark.parametrize("strategy, overlong", [("bfd", "truncate"), ("ffd", "split"), ("bfd_split", "split")])
def test_store_from_memory_mapped_tokens_is_byte_identical(tmp_path, monkeypatch, strategy, overlong, threads,
                                                           direct):
    """Blocks gathered on 1 or 3 threads (MLMIX_NUM_THREADS) from mapped tokens, read span by span from the
    mapped file (direct) or, where it cannot be read directly, from the mapping: the bytes of the store written
    from memory."""
    if not direct:
        monkeypatch.setattr(ragged_mod, "_mapped_file", lambda values: None)
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 90, size=300)
    tokens = Ragged.from_lengths(rng.integers(0, 50_000, size=int(lengths.sum())).astype(np.uint32), lengths)
    masks = Ragged.from_lengths((rng.random(int(lengths.sum())) < 0.6).astype(np.uint8), lengths)
    langs = [("en", "fi", "sw")[i % 3] for i in range(len(lengths))]
    kw = dict(seq_len=64, strategy=strategy, overlong=overlong, langs=langs, seed=3, pad_id=7)
    write_store(str(tmp_path / "mem"), tokens, loss_mask=masks, **kw)
    tokens.save(str(tmp_path / "t"))
    masks.save(str(tmp_path / "m"))
    monkeypatch.setattr(store_mod, "_BLOCK_TOKENS", 200)  # many blocks
    monkeypatch.setattr(ragged_mod, "_SPANS_PER_RELEASE", 5)
    monkeypatch.setenv("MLMIX_NUM_THREADS", threads)
    assert store_mod._write_threads() == int(threads)
    mt, mm = Ragged.load(str(tmp_path / "t")), Ragged.load(str(tmp_path / "m"))
    assert is_mapped(mt.values) and is_mapped(mm.values)
    write_store(str(tmp_path / "mapped"), mt, loss_mask=mm, **kw)
    names = sorted(os.listdir(tmp_path / "mem"))
    assert names == sorted(os.listdir(tmp_path / "mapped"))
    for name in names:
        assert (tmp_path / "mem" / name).read_bytes() == (tmp_path / "mapped" / name).read_bytes(), name


@pytest.mark.parametrize("reader", ["read_spans", "take_spans"])
def test_a_failing_block_gather_fails_the_shard_write(tmp_path, monkeypatch, reader):
    """An error gathering one block on a worker thread reaches the caller (after the blocks before it), and no
    file is left half-written under the store's name: whether the blocks are read from the mapped file span by
    span (read_spans) or, where it cannot be read directly, their examples copied in (take_spans)."""
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 60, size=200)
    tokens = Ragged.from_lengths(rng.integers(0, 1000, size=int(lengths.sum())).astype(np.uint32), lengths)
    tokens.save(str(tmp_path / "t"))
    mt = Ragged.load(str(tmp_path / "t"))
    monkeypatch.setattr(store_mod, "_BLOCK_TOKENS", 200)
    monkeypatch.setenv("MLMIX_NUM_THREADS", "2")
    calls = []
    real = getattr(store_mod, reader)
    if reader == "take_spans":
        monkeypatch.setattr(ragged_mod, "_mapped_file", lambda values: None)

    def flaky(*args):
        calls.append(1)
        if len(calls) == 4:
            raise OSError("disk went away")
        return real(*args)

    monkeypatch.setattr(store_mod, reader, flaky)
    with pytest.raises(OSError, match="disk went away"):
        write_store(str(tmp_path / "s"), mt, seq_len=64, seed=0)
    assert not (tmp_path / "s").exists()


def _records(tmp_path, texts, langs, chunk=4096, name="read"):
    """The read stage's cache of text records, in blocks of ``chunk`` records."""
    from mlmix.recblock import RecordBlock

    recs = [{"id": str(i), "lang": lang, "where": f"f:{i + 1}", "text": t}
            for i, (t, lang) in enumerate(zip(texts, langs))]
    out = tmp_path / name
    out.mkdir()
    local.write_blocks(str(out), ((0, RecordBlock.from_records(recs[i:i + chunk]))
                                  for i in range(0, len(recs), chunk)))
    return str(out / local.RECORDS)


@pytest.mark.parametrize("scope", ["language", "global"])
def test_dedup_stage_equals_whole_corpus_dedup(tmp_path, scope):
    rng = np.random.default_rng(1)
    words = ["alpha", "beta", "gamma", "delta", "épsilon", "ζήτα", "эта", "θήτα", "iota", "каппа", "lambda", "mu"]
    base = [" ".join(rng.choice(words, size=int(rng.integers(3, 30)))) for _ in range(60)]
    texts, langs = [], []
    for i in range(200):
        t = base[int(rng.integers(0, len(base)))]
        if rng.random() < 0.3:  # a near duplicate: one word changed
            w = t.split(" ")
            w[len(w) // 2] = "zzz"
            t = " ".join(w)
        texts.append(t)
        langs.append(("en", "ru", "el")[int(rng.integers(0, 3))])
    texts[5] = ""  # a document without shingles
    path = _records(tmp_path, texts, langs, chunk=7)
    alive = rng.random(len(texts)) < 0.9
    cfg = {"cache_dir": str(tmp_path / "cache"), "seed": 4,
           "dedup": {"exact": True, "near": True, "scope": scope, "threshold": 0.7, "num_perm": 64, "ngram": 2}}
    out = tmp_path / "out"
    out.mkdir()
    uids = np.arange(len(texts), dtype=np.int64)  # one source: uid = position
    stats = local.run_dedup(cfg, path, langs, alive, uids, str(out), BuildLog(quiet=True))
    got = np.load(out / "keep.npy")

    # the reference: every alive text at once, as the stage did before it streamed
    idx = np.flatnonzero(alive)
    sub_texts, sub_langs = [texts[i] for i in idx], [langs[i] for i in idx]
    s = "lang" if scope == "language" else "global"
    keep = np.asarray(dedup.exact_duplicates(sub_texts, langs=sub_langs, scope=s).keep, dtype=bool)
    rest = np.flatnonzero(keep)
    near = dedup.near_duplicates([sub_texts[j] for j in rest], threshold=0.7, num_perm=64, ngram=2,
                                 langs=[sub_langs[j] for j in rest], scope=s, seed=4)
    keep[rest[~np.asarray(near.keep, dtype=bool)]] = False
    want = np.zeros(len(texts), dtype=bool)
    want[idx] = keep
    assert np.array_equal(got, want)
    assert stats["kept"] == int(want.sum())
    assert sum(stats["near_removed"].values()) > 0 and sum(stats["exact_removed"].values()) > 0
    assert not os.path.isdir(cfg["cache_dir"]) or [e for e in os.listdir(cfg["cache_dir"]) if e.startswith(".scratch")] == []


@pytest.mark.parametrize("override", [False, True])
def test_langid_stage_in_chunks_equals_identify_over_all(tmp_path, override):
    from mlmix.langid import identify

    texts = ["The weather is lovely today and we walk in the park.", "Hoy hace buen tiempo y paseamos por el parque.",
             "Tänään on kaunis sää ja kävelemme puistossa.", "Сегодня прекрасная погода, и мы гуляем в парке.",
             "x", "Oggi il tempo è bello e passeggiamo nel parco.", ""]
    langs = [None, "es", None, None, None, "it", None]
    path = _records(tmp_path, texts, langs, chunk=2)  # "lang": null where missing
    lcfg = {"backend": "py3langid", "threshold": 0.6, "unknown": "und", "override": override, "drop_unknown": True}
    out = tmp_path / "out"
    out.mkdir()
    stats = local.run_langid({"langid": lcfg}, path, str(out), BuildLog(quiet=True))
    got = local.load_langs(str(out))
    assert np.load(out / "langs.npy").dtype == np.uint16

    todo = [i for i, lang in enumerate(langs) if override or lang is None]
    found, _ = identify([texts[i] for i in todo], threshold=0.6, unknown="und")
    want = [lang if lang is not None else "und" for lang in langs]
    for i, lang in zip(todo, found):
        want[i] = lang
    assert got == want
    assert np.array_equal(np.load(out / "keep.npy"), np.array([lang != "und" for lang in want]))
    assert stats["identified"] == len(todo) and stats["given"] == len(langs) - len(todo)
    assert "und" in got and "fi" in got


def test_stale_scratch_directories_are_removed(tmp_path):
    import subprocess
    import sys

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(dead.stdout)  # a process that has exited
    cache = tmp_path / "cache"
    (cache / f".scratch-{dead_pid}-abc").mkdir(parents=True)
    (cache / f".scratch-{os.getpid()}-def").mkdir()
    (cache / ".scratch-notapid").mkdir()
    local.remove_stale_scratch(str(cache))
    assert sorted(os.listdir(cache)) == sorted([f".scratch-{os.getpid()}-def", ".scratch-notapid"])


def test_tokenize_stage_chunking_does_not_change_the_tokens(tmp_path):
    from mlmix.config import load_config

    texts = [f"Record {i}: " + "word " * (i % 17) for i in range(40)]
    cfg = load_config({"output": str(tmp_path / "o"), "sources": [{"path": str(tmp_path)}],
                       "tokenizer": {"name": "qwen", "template": "chatml"}})
    outs = []
    for chunk in (4096, 3, 1):
        path = _records(tmp_path, texts, ["en"] * len(texts), chunk=chunk, name=f"read{chunk}")
        out = tmp_path / f"t{chunk}"
        out.mkdir()
        stats = local.run_tokenize(cfg, path, len(texts), str(out), BuildLog(quiet=True))
        outs.append((stats, Ragged.load(str(out / "tokens")), Ragged.load(str(out / "loss_mask"))))
    (s0, t0, m0) = outs[0]
    assert len(t0) == len(texts) and s0["tokens"] == t0.values.size > 0
    timings = ("encode_seconds", "load_seconds")  # how long each run took differs, not what it counted
    for s, t, m in outs[1:]:
        assert {k: v for k, v in s.items() if k not in timings} == {k: v for k, v in s0.items() if k not in timings}
        assert t.equals(t0) and m.equals(m0)
