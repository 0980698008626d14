import json
import os

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

import mlmix
from mlmix import Ragged
from mlmix.store import StoreError


def make_data(n, seed=0, lo=1, hi=40, dtype=np.uint32):
    rng = np.random.default_rng(seed)
    lengths = rng.integers(lo, hi, size=n)
    tokens = Ragged.from_lengths(rng.integers(0, 50_000, size=int(lengths.sum())).astype(dtype), lengths)
    mask = Ragged.from_lengths(rng.random(int(lengths.sum())) < 0.7, lengths)
    langs = rng.choice(["en", "de", "sw", "yo"], size=n).tolist()
    return tokens, mask, langs


def test_roundtrip_matches_materialize(tmp_path):
    tokens, mask, langs = make_data(500)
    manifest = mlmix.write_store(tmp_path / "s", tokens, seq_len=64, loss_mask=mask, langs=langs, seed=3, pad_id=9)
    store = mlmix.open(tmp_path / "s")
    plan = mlmix.pack(tokens, 64, seed=3)
    full = plan.materialize(tokens, mask, pad_id=9)
    assert len(store) == plan.num_sequences == manifest["num_sequences"]
    assert store.num_tokens == int(tokens.lengths.sum()) and store.seq_len == 64
    assert store.efficiency == pytest.approx(plan.efficiency)
    assert sorted(store.languages) == ["de", "en", "sw", "yo"]
    batch = store.batch(np.arange(len(store)))
    for k in ("input_ids", "labels", "position_ids"):
        np.testing.assert_array_equal(batch[k], full[k])
    for i in (0, len(store) // 2, len(store) - 1, -1):
        row = store[i]
        r = i % len(store)
        np.testing.assert_array_equal(row["input_ids"], full["input_ids"][r])
        segs = slice(plan.row_offsets[r], plan.row_offsets[r + 1])
        np.testing.assert_array_equal(row["example"], plan.seg_example[segs])
        np.testing.assert_array_equal(row["seq_lens"], plan.seg_len[segs])
        assert row["cu_seqlens"][0] == 0 and row["cu_seqlens"][-1] == 64
        assert [store.languages[k] for k in row["lang_ids"]] == [langs[e] for e in plan.seg_example[segs]]
        assert row["num_tokens"] == plan.row_tokens[r]


@given(st.lists(st.lists(st.integers(1, 50), max_size=30), min_size=1, max_size=5), st.integers(8, 48),
       st.integers(2, 64), st.booleans())
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_streaming_store_holds_every_token_once(tmp_path_factory, chunk_lengths, seq_len, window, with_mask):
    rng = np.random.default_rng(len(chunk_lengths))
    chunks, masks, langs = [], [], []
    for lengths in chunk_lengths:
        lengths = np.array(lengths, dtype=np.int64)
        chunks.append(Ragged.from_lengths(rng.integers(0, 1000, size=int(lengths.sum())).astype(np.int32), lengths))
        masks.append(Ragged.from_lengths(rng.random(int(lengths.sum())) < 0.5, lengths))
        langs.append(rng.choice(["a", "b"], size=lengths.size).tolist())
    everything = Ragged.concat(chunks)
    path = tmp_path_factory.mktemp("stream") / "s"
    if len(everything) == 0:
        with pytest.raises(ValueError, match="no examples"):
            mlmix.write_store(path, chunks, seq_len=seq_len, strategy="bfd_split", window=window)
        return
    mlmix.write_store(path, iter(chunks), seq_len=seq_len, strategy="bfd_split", window=window,
                      loss_mask=iter(masks) if with_mask else None, langs=iter(langs))
    store = mlmix.open(path)
    all_mask = Ragged.concat(masks)
    all_langs = sum(langs, [])
    tokens = store.array("tokens")
    seg_tok = np.concatenate([[0], np.cumsum(store.array("seg_lens"))])
    pieces = {}
    for s, ex in enumerate(store.array("seg_example")):
        start = int(store.array("seg_starts")[s])
        pieces.setdefault(int(ex), []).append((start, tokens[seg_tok[s] : seg_tok[s + 1]]))
        assert store.languages[store.array("seg_lang")[s]] == all_langs[ex]
    assert sorted(pieces) == list(range(len(everything)))
    for ex, parts in pieces.items():
        parts.sort(key=lambda p: p[0])
        assert np.array_equal(np.concatenate([p[1] for p in parts]), everything[ex])
    batch = store.batch(np.arange(len(store)))
    assert np.all(batch["num_tokens"] <= seq_len)
    if with_mask:
        # labels are kept exactly where the mask is set and the token does not start a segment
        m = store.array("loss_mask").astype(bool)
        first = np.zeros(len(tokens), bool)
        first[seg_tok[:-1]] = True
        real = np.arange(seq_len)[None, :] < batch["num_tokens"][:, None]
        kept = batch["labels"][real] != -100
        np.testing.assert_array_equal(kept, m & ~first)
        assert m.sum() == all_mask.values.sum()


def test_wrapped_and_int64_tokens(tmp_path):
    tokens, _, _ = make_data(100, dtype=np.int64, hi=200)
    mlmix.write_store(tmp_path / "w", tokens, seq_len=128, strategy="wrapped")
    store = mlmix.open(tmp_path / "w")
    assert store[0]["input_ids"].dtype == np.int64
    assert len(store) == -(-int(tokens.lengths.sum()) // 128)
    assert store[0]["labels"].dtype == np.int64 and store[0]["position_ids"].dtype == np.int32


def test_truncated_store_fails_even_without_verify(tmp_path):
    tokens, mask, _ = make_data(200)
    mlmix.write_store(tmp_path / "s", tokens, seq_len=64, loss_mask=mask)
    f = tmp_path / "s" / "tokens.bin"
    data = f.read_bytes()
    f.write_bytes(data[:-4])
    for verify in (True, False):
        with pytest.raises(StoreError, match="tokens.bin.*truncated"):
            mlmix.open(tmp_path / "s", verify=verify)
    os.remove(f)
    with pytest.raises(StoreError, match="missing"):
        mlmix.open(tmp_path / "s")


def test_corrupted_store_fails_checksum(tmp_path):
    tokens, mask, _ = make_data(200)
    mlmix.write_store(tmp_path / "s", tokens, seq_len=64, loss_mask=mask)
    f = tmp_path / "s" / "loss_mask.bin"
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 1
    f.write_bytes(bytes(data))
    with pytest.raises(StoreError, match="checksum mismatch in loss_mask.bin"):
        mlmix.open(tmp_path / "s")
    mlmix.open(tmp_path / "s", verify=False)  # sizes still agree: only the checksum catches a flipped bit


def test_version_and_format_mismatch(tmp_path):
    tokens, _, _ = make_data(50)
    mlmix.write_store(tmp_path / "s", tokens, seq_len=64)
    mpath = tmp_path / "s" / "manifest.json"
    m = json.loads(mpath.read_text())
    m["version"] = 99
    mpath.write_text(json.dumps(m))
    with pytest.raises(StoreError, match="version 99.*reads version 1"):
        mlmix.open(tmp_path / "s")
    m["format"] = "other"
    mpath.write_text(json.dumps(m))
    with pytest.raises(StoreError, match="not an mlmix packed store"):
        mlmix.open(tmp_path / "s")
    mpath.write_text("{not json")
    with pytest.raises(StoreError, match="JSON"):
        mlmix.open(tmp_path / "s")
    with pytest.raises(FileNotFoundError):
        mlmix.open(tmp_path / "nothing")
    os.makedirs(tmp_path / "empty")
    with pytest.raises(StoreError, match="manifest.json is missing"):
        mlmix.open(tmp_path / "empty")


def test_failed_write_leaves_nothing(tmp_path):
    tokens, _, _ = make_data(50)

    def chunks():
        yield tokens
        raise RuntimeError("reader died")

    with pytest.raises(RuntimeError, match="reader died"):
        mlmix.write_store(tmp_path / "s", chunks(), seq_len=64)
    assert os.listdir(tmp_path) == []
    # an existing store survives a failed overwrite
    mlmix.write_store(tmp_path / "s", tokens, seq_len=64)
    with pytest.raises(ValueError, match="lengths"):
        mlmix.write_store(tmp_path / "s", tokens, seq_len=8)
    assert len(mlmix.open(tmp_path / "s")) == mlmix.pack(tokens, 64, seed=0).num_sequences
    assert os.listdir(tmp_path) == ["s"]


def test_write_store_bad_input(tmp_path):
    tokens, mask, langs = make_data(20)
    with pytest.raises(ValueError, match="langs"):
        mlmix.write_store(tmp_path / "a", tokens, seq_len=64, langs=langs[:-1])
    with pytest.raises(TypeError, match="langs"):
        mlmix.write_store(tmp_path / "a", tokens, seq_len=64, langs=[1] * 20)
    with pytest.raises(ValueError, match="loss_mask"):
        mlmix.write_store(tmp_path / "a", tokens, seq_len=64, loss_mask=mask[:-1])
    with pytest.raises(TypeError, match="tokens"):
        mlmix.write_store(tmp_path / "a", np.zeros(10, np.uint32), seq_len=64)
    with pytest.raises(TypeError, match="tokens"):
        mlmix.write_store(tmp_path / "a", [tokens, [1, 2]], seq_len=64)
    with pytest.raises(ValueError, match="seq_len"):
        mlmix.write_store(tmp_path / "a", tokens, seq_len=1)
    with pytest.raises(ValueError, match="pad_id"):
        mlmix.write_store(tmp_path / "a", tokens, seq_len=64, pad_id=2**40)
    with pytest.raises(ValueError, match="wrapped"):
        mlmix.write_store(tmp_path / "a", [tokens], seq_len=64, strategy="wrapped")
    assert not os.path.exists(tmp_path / "a")
    mlmix.write_store(tmp_path / "b", tokens, seq_len=64)
    store = mlmix.open(tmp_path / "b")
    with pytest.raises(IndexError):
        store[len(store)]
    with pytest.raises(TypeError):
        store["0"]
    with pytest.raises(IndexError):
        store.batch([0, len(store)])


def test_inconsistent_segments_raise_on_read(tmp_path):
    tokens, _, _ = make_data(100)
    mlmix.write_store(tmp_path / "s", tokens, seq_len=64)
    f = tmp_path / "s" / "seg_lens.bin"
    lens = np.fromfile(f, dtype=np.int32)
    lens[0] += 5
    lens.tofile(f)
    store = mlmix.open(tmp_path / "s", verify=False)  # sizes agree; the checksum pass is skipped
    with pytest.raises(ValueError, match="store row 0"):
        store.batch([0])
    with pytest.raises(StoreError, match="seg_lens.bin"):
        mlmix.open(tmp_path / "s")


# --- shards -----------------------------------------------------------------------------------------------
def _read(path, name):
    with open(os.path.join(path, name), "rb") as f:
        return f.read()


@given(st.integers(1, 400), st.integers(1, 60), st.booleans(), st.sampled_from(["bfd", "wrapped", "bfd_split"]))
@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_sharded_store_reads_like_one_file(tmp_path_factory, n, shard_sequences, with_mask, strategy):
    """Any shard size: the same rows, the same index files, and per-token arrays whose shards end to end
    are the one-shard file (the manifest's whole-array CRC says so too)."""
    tokens, mask, langs = make_data(n, seed=n, hi=90)
    mask = mask if with_mask else None
    d = tmp_path_factory.mktemp("shards")
    kw = dict(seq_len=64, loss_mask=mask, langs=langs, seed=1, strategy=strategy, overlong="split")
    one = mlmix.write_store(d / "one", tokens, **kw)
    many = mlmix.write_store(d / "many", tokens, shard_sequences=shard_sequences, **kw)
    rows = one["num_sequences"]
    num_shards = -(-rows // shard_sequences)
    assert one["version"] == 1 and many["version"] == (1 if num_shards == 1 else 2)
    for name, spec in one["arrays"].items():
        got = many["arrays"][name]
        assert (got["length"], got["crc32"]) == (spec["length"], spec["crc32"])
        if "shards" in got:
            assert name in ("tokens", "loss_mask") and len(got["shards"]) == num_shards
            assert b"".join(_read(d / "many", s["file"]) for s in got["shards"]) == _read(d / "one", spec["file"])
        else:
            assert _read(d / "many", got["file"]) == _read(d / "one", spec["file"])
    a, b = mlmix.open(d / "one"), mlmix.open(d / "many")
    assert b.num_shards == num_shards and b.shard_rows(num_shards - 1)[1] == rows
    idx = np.random.default_rng(0).integers(0, rows, size=min(rows, 40))
    for k, v in a.batch(idx).items():
        np.testing.assert_array_equal(b.batch(idx)[k], v)
    for i in (0, rows - 1):
        for k, v in a[i].items():
            np.testing.assert_array_equal(b[i][k], v)
    np.testing.assert_array_equal(np.asarray(b.array("tokens")), a.array("tokens"))


def test_streaming_store_shards_like_in_memory_rows(tmp_path):
    tokens, mask, langs = make_data(700, seed=4)
    chunks = [tokens[i : i + 90] for i in range(0, 700, 90)]
    mchunks = [mask[i : i + 90] for i in range(0, 700, 90)]
    lchunks = [langs[i : i + 90] for i in range(0, 700, 90)]
    one = mlmix.write_store(tmp_path / "one", chunks, seq_len=48, loss_mask=mchunks, langs=lchunks, window=100)
    many = mlmix.write_store(tmp_path / "many", chunks, seq_len=48, loss_mask=mchunks, langs=lchunks, window=100,
                             shard_sequences=50)
    assert many["version"] == 2 and len(many["arrays"]["tokens"]["shards"]) == -(-one["num_sequences"] // 50)
    for name, spec in one["arrays"].items():
        assert (many["arrays"][name]["length"], many["arrays"][name]["crc32"]) == (spec["length"], spec["crc32"])
    a, b = mlmix.open(tmp_path / "one"), mlmix.open(tmp_path / "many")
    idx = np.arange(len(a))
    for k, v in a.batch(idx).items():
        np.testing.assert_array_equal(b.batch(idx)[k], v)


def test_shard_written_alone_equals_write_store(tmp_path):
    """What the Ray engine does: each shard from only the examples it needs, then the index and manifest."""
    from mlmix.store import shard_bounds, write_index, write_shard

    tokens, mask, langs = make_data(300, seed=5, hi=120)
    ref = mlmix.write_store(tmp_path / "ref", tokens, seq_len=96, loss_mask=mask, langs=langs, seed=7,
                            strategy="bfd_split", pad_id=3, shard_sequences=20)
    plan = mlmix.pack(tokens.lengths, 96, strategy="bfd_split", seed=7)
    out = tmp_path / "out"
    out.mkdir()
    bounds = shard_bounds(plan.num_sequences, 20)
    specs = []
    for k in range(len(bounds) - 1):
        sub = plan.rows(bounds[k], bounds[k + 1])
        need = np.unique(sub.seg_example)  # only this shard's examples, renumbered
        part = tokens[need]
        sub.seg_example = np.searchsorted(need, sub.seg_example)
        pm = mask[need]
        specs.append(write_shard(str(out), k, len(bounds) - 1, sub, part.values, part.offsets,
                                 pm.values.astype(np.uint8)))
    got = write_index(str(out), plan, specs, strategy="bfd_split", langs=langs, pad_id=3, seed=7, shard_sequences=20)
    assert got == ref
    assert sorted(os.listdir(out)) == sorted(os.listdir(tmp_path / "ref"))
    for name in os.listdir(out):
        assert _read(out, name) == _read(tmp_path / "ref", name), name


def _shards_from_mapped(tmp_path, monkeypatch, threads: str, out_name: str):
    """The build's pack stage: every shard written from the whole mapped tokens, in blocks of ~200 tokens
    gathered, checksummed and written at their offsets on ``threads`` threads; returns (plan, specs, out dir)."""
    from mlmix import store as store_mod
    from mlmix.store import shard_bounds, write_shard

    tokens, mask, _ = make_data(300, seed=5, hi=120)
    tokens.save(str(tmp_path / "t"))
    Ragged(mask.values.astype(np.uint8), mask.offsets).save(str(tmp_path / "m"))
    mt, mm = Ragged.load(str(tmp_path / "t")), Ragged.load(str(tmp_path / "m"))
    monkeypatch.setattr(store_mod, "_BLOCK_TOKENS", 200)  # many blocks per shard
    monkeypatch.setenv("MLMIX_NUM_THREADS", threads)
    plan = mlmix.pack(tokens.lengths, 96, strategy="bfd_split", seed=7)
    out = tmp_path / out_name
    out.mkdir()
    bounds = shard_bounds(plan.num_sequences, 20)
    specs = [write_shard(str(out), k, len(bounds) - 1, plan.rows(bounds[k], bounds[k + 1]), mt.values, mt.offsets,
                         mm.values) for k in range(len(bounds) - 1)]
    return plan, specs, out


@pytest.mark.parametrize("threads", ["1", "3"])
def test_shard_blocks_written_in_place_on_threads_equal_write_store(tmp_path, monkeypatch, threads):
    """Blocks of a shard gathered, checksummed and written at their planned offsets on 1 or 3 threads, their
    CRCs joined in order: the same files and manifest as write_store."""
    from mlmix.store import write_index

    tokens, mask, langs = make_data(300, seed=5, hi=120)
    ref = mlmix.write_store(tmp_path / "ref", tokens, seq_len=96, loss_mask=mask, langs=langs, seed=7,
                            strategy="bfd_split", pad_id=3, shard_sequences=20)
    plan, specs, out = _shards_from_mapped(tmp_path, monkeypatch, threads, "out")
    got = write_index(str(out), plan, specs, strategy="bfd_split", langs=langs, pad_id=3, seed=7, shard_sequences=20)
    assert got == ref
    assert sorted(os.listdir(out)) == sorted(os.listdir(tmp_path / "ref"))
    for name in os.listdir(out):
        assert _read(out, name) == _read(tmp_path / "ref", name), name


def test_a_failing_block_write_reaches_the_shard_writer(tmp_path, monkeypatch):
    """A write that fails on a worker thread (a full disk) is the shard write's error, not a short file."""
    calls = []
    real = os.pwrite

    def failing(fd, data, offset):
        calls.append(offset)
        if len(calls) == 5:
            raise OSError(28, "No space left on device")
        return real(fd, data, offset)

    monkeypatch.setattr(os, "pwrite", failing)
    with pytest.raises(OSError, match="No space left"):
        _shards_from_mapped(tmp_path, monkeypatch, "2", "out")
    assert len(calls) >= 5


def test_corrupted_or_missing_shard_is_named(tmp_path):
    tokens, mask, _ = make_data(200, seed=6)
    mlmix.write_store(tmp_path / "s", tokens, seq_len=64, loss_mask=mask, shard_sequences=10)
    f = tmp_path / "s" / "tokens-00002.bin"
    raw = bytearray(f.read_bytes())
    raw[5] ^= 1
    f.write_bytes(bytes(raw))
    with pytest.raises(StoreError, match="checksum mismatch in tokens-00002.bin"):
        mlmix.open(tmp_path / "s")
    mlmix.open(tmp_path / "s", verify=False)  # sizes still match: only the CRC pass sees it
    os.remove(tmp_path / "s" / "loss_mask-00001.bin")
    with pytest.raises(StoreError, match="loss_mask-00001.bin is missing"):
        mlmix.open(tmp_path / "s", verify=False)
    with pytest.raises(ValueError, match=r"shard_sequences must be an integer >= 1.*got 0"):
        mlmix.write_store(tmp_path / "t", tokens, seq_len=64, shard_sequences=0)


def test_sharded_manifest_is_checked(tmp_path):
    from mlmix.store import _manifest_bytes

    tokens, _, _ = make_data(200, seed=8)
    mlmix.write_store(tmp_path / "s", tokens, seq_len=64, shard_sequences=10)
    mpath = tmp_path / "s" / "manifest.json"
    m = json.loads(mpath.read_text())
    m.pop("manifest_crc32")
    for field, value, msg in (("shard_sequences", 0, "shard_sequences"), ("shard_sequences", 10**6, "arrays.tokens.shards"),
                              ("version", 1, "field 'version' must be 2 for a store whose 'tokens' has shards")):
        bad = dict(m, **{field: value})
        mpath.write_bytes(_manifest_bytes(bad))
        with pytest.raises(StoreError, match=msg):
            mlmix.open(tmp_path / "s", verify=False)


def test_torch_loader_reads_a_sharded_store_as_one(tmp_path):
    """mlmix.torch's PackedDataset goes through Store.array: a sharded store gives the same batches."""
    pytest.importorskip("torch")
    from mlmix.torch.data import PackedDataset

    tokens, mask, langs = make_data(400, seed=9)
    mlmix.write_store(tmp_path / "one", tokens, seq_len=64, loss_mask=mask, langs=langs)
    mlmix.write_store(tmp_path / "many", tokens, seq_len=64, loss_mask=mask, langs=langs, shard_sequences=7)
    assert mlmix.open(tmp_path / "many").num_shards > 1
    for layout in ("padded", "flat"):
        a = list(PackedDataset(str(tmp_path / "one"), batch_size=5, seed=2, layout=layout))
        b = list(PackedDataset(str(tmp_path / "many"), batch_size=5, seed=2, layout=layout))
        assert len(a) == len(b) > 1
        for x, y in zip(a, b):
            assert x.keys() == y.keys()
            for k in x:
                assert (x[k] == y[k]).all() if hasattr(x[k], "shape") else x[k] == y[k], k


@given(st.binary(max_size=300), st.binary(max_size=3000))
@settings(max_examples=40, deadline=None)
def test_crc32_combine_is_the_crc_of_the_concatenation(a, b):
    import zlib

    from mlmix.store import crc32_combine

    assert crc32_combine(zlib.crc32(a), zlib.crc32(b), len(b)) == zlib.crc32(a + b)


# ---- the tokenizer a store was written with ---------------------------------------------------------------------
def _word_tokenizer(tokens, model="wordlevel"):
    """A tokenizers.Tokenizer whose id i is tokens[i] (WordLevel, or a BPE over the same table)."""
    from tokenizers import Tokenizer, models

    vocab = {t: i for i, t in enumerate(tokens)}
    if model == "wordlevel":
        return Tokenizer(models.WordLevel(vocab, unk_token=tokens[0]))
    return Tokenizer(models.BPE(vocab, merges=[], unk_token=tokens[0]))


WORDS = ["<unk>", "a", "b", "c", "ab", "bc", "abc", "d", "<|im_end|>", "e"]


def test_vocab_fingerprint_is_the_id_to_token_table():
    pytest.importorskip("tokenizers")
    from mlmix.tokenize import vocab_fingerprint

    fp = vocab_fingerprint(_word_tokenizer(WORDS))
    assert fp["num_ids"] == len(WORDS) and len(fp["vocab_sha256"]) == 64
    # another model over the same table (it segments text differently): the ids mean the same tokens
    assert vocab_fingerprint(_word_tokenizer(WORDS, "bpe")) == fp
    assert vocab_fingerprint(mlmix.Tokenizer(_word_tokenizer(WORDS))) == fp
    swapped = WORDS[:3] + [WORDS[4], WORDS[3]] + WORDS[5:]  # same tokens, two ids exchanged
    assert vocab_fingerprint(_word_tokenizer(swapped)) != fp
    assert vocab_fingerprint(_word_tokenizer(WORDS[:-1] + ["f"])) != fp
    longer = _word_tokenizer(WORDS + ["f", "g"])  # tokens appended after the table
    assert vocab_fingerprint(longer) != fp and vocab_fingerprint(longer, len(WORDS)) == fp
    with pytest.raises(TypeError, match="tokenizer must be an mlmix.Tokenizer.*got int"):
        vocab_fingerprint(3)
    with pytest.raises(ValueError, match="num_ids must be a non-negative integer or None, got -1"):
        vocab_fingerprint(longer, -1)
    with pytest.raises(FileNotFoundError, match="is neither a tokenizer.json nor a directory holding one"):
        vocab_fingerprint("/nonexistent/tokenizer.json")


def test_vocab_fingerprint_agrees_across_tokenizer_objects(qwen_hf, tmp_path):
    """A real vocabulary through every way a user holds it: tokenizers, transformers, mlmix, a file."""
    transformers = pytest.importorskip("transformers")
    from mlmix.tokenize import vocab_fingerprint

    fp = vocab_fingerprint(qwen_hf)
    assert fp["num_ids"] == qwen_hf.get_vocab_size(with_added_tokens=True) > 151_643
    qwen_hf.save(str(tmp_path / "tokenizer.json"))
    assert vocab_fingerprint(tmp_path / "tokenizer.json") == fp
    assert vocab_fingerprint(str(tmp_path)) == fp  # a model directory
    assert vocab_fingerprint(transformers.PreTrainedTokenizerFast(tokenizer_object=qwen_hf)) == fp
    assert vocab_fingerprint(mlmix.Tokenizer.qwen()) == fp
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "tokenizer.json").write_text("{not json")
    with pytest.raises(ValueError, match="is not a readable tokenizer.json"):
        vocab_fingerprint(tmp_path / "bad")


def test_vocab_fingerprint_of_a_tokenizer_not_loaded_into_hf(qwen_hf, tmp_path, monkeypatch):
    """A Tokenizer from a file holds no HF backend until it needs one: its fingerprint is read from the
    tokenizer.json (and remembered per file) and equals the one HF's table gives, added tokens included."""
    from tokenizers import AddedToken, Tokenizer

    from mlmix.tokenize import vocab_fingerprint

    monkeypatch.setenv("MLMIX_CACHE", str(tmp_path / "cache"))
    qwen_hf = Tokenizer.from_str(qwen_hf.to_str())  # a copy: the fixture is shared
    qwen_hf.add_tokens([AddedToken("<extra_a>"), AddedToken("<extra_b>", special=True)])
    qwen_hf.save(str(tmp_path / "tokenizer.json"))
    want = vocab_fingerprint(qwen_hf)
    for num_ids in (None, 1000):
        tok = mlmix.Tokenizer.from_file(tmp_path / "tokenizer.json")
        got = vocab_fingerprint(tok, num_ids)
        assert tok._hf_backend is None  # the HF backend was not built to answer
        assert got == (want if num_ids is None else vocab_fingerprint(qwen_hf, num_ids))
    memos = list((tmp_path / "cache" / "fingerprints").iterdir())
    assert len(memos) == 2
    for m in memos:  # a damaged memo is computed again, never trusted
        m.write_text("{broken")
    assert vocab_fingerprint(mlmix.Tokenizer.from_file(tmp_path / "tokenizer.json")) == want
    # the file changes: its fingerprint follows (the memo is keyed by size and mtime)
    qwen_hf.add_tokens([AddedToken("<extra_c>")])
    qwen_hf.save(str(tmp_path / "tokenizer.json"))
    os.utime(tmp_path / "tokenizer.json", ns=(1, 1))
    assert vocab_fingerprint(mlmix.Tokenizer.from_file(tmp_path / "tokenizer.json")) == vocab_fingerprint(qwen_hf)


def test_store_records_and_checks_its_tokenizer(tmp_path):
    pytest.importorskip("tokenizers")
    from mlmix.store import _manifest_bytes
    from mlmix.tokenize import vocab_fingerprint

    tok = _word_tokenizer(WORDS)
    lengths = np.array([3, 5, 2, 4])
    tokens = Ragged.from_lengths(np.arange(14, dtype=np.uint32) % len(WORDS), lengths)
    for streaming in (False, True):
        path = tmp_path / f"s{int(streaming)}"
        m = mlmix.write_store(path, [tokens] if streaming else tokens, seq_len=8, tokenizer=tok)
        assert m["tokenizer"] == vocab_fingerprint(tok)
        store = mlmix.open(path)
        assert store.vocab_fingerprint == m["tokenizer"]
        store.check_tokenizer(tok)
        store.check_tokenizer(_word_tokenizer(WORDS, "bpe"))
        store.check_tokenizer(_word_tokenizer(WORDS + ["f"]))  # a model that appended tokens
        store.check_tokenizer(m["tokenizer"])
        swapped = WORDS[:3] + [WORDS[4], WORDS[3]] + WORDS[5:]
        with pytest.raises(ValueError, match=r"tokenizer: its ids \[0, 10\) stand for other tokens than those of the "
                                             r"tokenizer that wrote the store at .*tokenized for another model"):
            store.check_tokenizer(_word_tokenizer(swapped))
        with pytest.raises(ValueError, match="tokenizer: it has 9 ids, the tokenizer that wrote the store at .* had 10"):
            store.check_tokenizer(_word_tokenizer(WORDS[:-1]))
        with pytest.raises(ValueError, match="a fingerprint over 11 ids cannot be compared with the store's over 10"):
            store.check_tokenizer(vocab_fingerprint(_word_tokenizer(WORDS + ["f"])))
    # the same store bytes as one written with the fingerprint dict
    mlmix.write_store(tmp_path / "d", tokens, seq_len=8, tokenizer=vocab_fingerprint(tok))
    assert (tmp_path / "d" / "manifest.json").read_bytes() == (tmp_path / "s0" / "manifest.json").read_bytes()
    # ids the tokenizer does not have: refused at write time, nothing is written
    with pytest.raises(ValueError, match=r"tokenizer: token id 9 is outside the tokenizer's 9 ids \[0, 9\)"):
        mlmix.write_store(tmp_path / "bad", tokens, seq_len=8, tokenizer=_word_tokenizer(WORDS[:-1]))
    assert not (tmp_path / "bad").exists()
    for bad in ({"num_ids": 10}, {1: 2, "num_ids": 3}, {"num_ids": True, "vocab_sha256": "0" * 64}):
        with pytest.raises(ValueError, match="tokenizer given as a dict must be a vocab_fingerprint"):
            mlmix.write_store(tmp_path / "bad", tokens, seq_len=8, tokenizer=bad)
    with pytest.raises(ValueError, match=r"pad_id=10 is outside the tokenizer's 10 ids \[0, 10\)"):
        mlmix.write_store(tmp_path / "bad", tokens, seq_len=8, tokenizer=tok, pad_id=10)
    assert not (tmp_path / "bad").exists()
    # a store written without one cannot be checked, and says so
    mlmix.write_store(tmp_path / "none", tokens, seq_len=8)
    assert mlmix.open(tmp_path / "none").vocab_fingerprint is None
    with pytest.raises(ValueError, match="does not record which tokenizer wrote it"):
        mlmix.open(tmp_path / "none").check_tokenizer(tok)
    # a malformed record (checksum made to match) is named
    mpath = tmp_path / "s0" / "manifest.json"
    m = json.loads(mpath.read_text())
    m.pop("manifest_crc32")
    for value in ({"num_ids": -1, "vocab_sha256": "0" * 64}, {"num_ids": 3, "vocab_sha256": "xyz"}, [], None):
        mpath.write_bytes(_manifest_bytes(dict(m, tokenizer=value)))
        with pytest.raises(StoreError, match="manifest field 'tokenizer' must be an object"):
            mlmix.open(tmp_path / "s0", verify=False)


def test_langs_are_checked_and_kept_per_example(tmp_path):
    """Language codes: one str per example (a list or a NumPy array), each example's code read back; anything
    else is an error naming the entry, before a store is written."""
    tokens = Ragged.from_lists([[1, 2], [3], [4, 5, 6], [7]], dtype=np.uint32)
    for langs in (["fi", "en", "fi", "sw"], np.array(["fi", "en", "fi", "sw"])):
        mlmix.write_store(str(tmp_path / "ok"), tokens, seq_len=8, langs=langs)
        ds = mlmix.store.open(str(tmp_path / "ok"))
        assert ds.languages == ["fi", "en", "sw"]  # in order of first appearance
        got = {int(e): ds.languages[int(k)] for i in range(len(ds))
               for e, k in zip(ds[i]["example"], ds[i]["lang_ids"])}
        assert got == dict(enumerate(["fi", "en", "fi", "sw"]))
    cases = [(["fi", 3, "en", "en"], TypeError, r"langs\[1\] = 3"),
             (["fi", "en", ["sw"], "en"], TypeError, r"langs\[2\] = \['sw'\]"),
             (["fi", "en"], ValueError, r"one code per example \(4\), got 2")]
    for langs, exc, match in cases:
        with pytest.raises(exc, match=match):
            mlmix.write_store(str(tmp_path / "bad"), tokens, seq_len=8, langs=langs)
        assert not (tmp_path / "bad").exists()
    many = Ragged.from_lengths(np.ones(65_536, np.uint32), np.ones(65_536, np.int64))
    with pytest.raises(ValueError, match="at most 65535 distinct codes"):
        mlmix.write_store(str(tmp_path / "bad"), many, seq_len=8, langs=[f"x{i}" for i in range(65_536)])
