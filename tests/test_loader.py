"""Tests of mlmix.torch.data: batches against the store's own reader, order/sharding/resume properties,
real transformers models and the HF Trainer, and bad input."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

torch = pytest.importorskip("torch")

import mlmix  # noqa: E402
from mlmix.store import StoreError  # noqa: E402
from mlmix.torch.data import DataLoader, PackedDataset, PackedIterableDataset  # noqa: E402

SEQ_LEN = 64
VOCAB = 97
LANGS = ("en", "sw", "zh")


def _examples(n: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    lens = rng.integers(2, 50, n)
    toks = mlmix.Ragged.from_lengths(rng.integers(0, VOCAB, int(lens.sum())).astype(np.uint32), lens)
    mask = mlmix.Ragged.from_lengths(rng.random(int(lens.sum())) < 0.8, lens)
    langs = [LANGS[i] for i in rng.integers(0, len(LANGS), n)]
    return toks, mask, langs


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    toks, mask, langs = _examples(240)
    path = str(tmp_path_factory.mktemp("loader") / "store")
    mlmix.write_store(path, toks, seq_len=SEQ_LEN, loss_mask=mask, langs=langs)
    return path, toks, mask, langs


def _reference(store, rows, layout):
    """The batch the loader must produce for these store rows, from Store.batch / Store[i]."""
    ref = store.batch(rows)
    ids, labels, pos = ref["input_ids"].astype(np.int64), ref["labels"], ref["position_ids"].astype(np.int64)
    langs, pieces = [], []
    for r in rows:
        row = store[int(r)]
        langs.append(np.concatenate([np.repeat(row["lang_ids"], row["seq_lens"]),
                                     np.full(SEQ_LEN - row["num_tokens"], -1)]))
        pieces.append(list(row["seq_lens"]) + ([SEQ_LEN - row["num_tokens"]] if row["num_tokens"] < SEQ_LEN else []))
    lang = np.stack(langs)
    if layout == "flat":  # the rows' real tokens, concatenated; no padding pieces
        real = np.concatenate([np.arange(SEQ_LEN) < n for n in ref["num_tokens"]])
        ids, labels, pos, lang = (a.reshape(-1)[real][None] for a in (ids, labels, pos, lang))
        pieces = [list(store[int(r)]["seq_lens"]) for r in rows]
    cu = np.concatenate([[0], np.cumsum(np.concatenate(pieces))]).astype(np.int32)
    return {"input_ids": ids, "labels": labels, "position_ids": pos, "lang_ids": lang, "cu_seq_lens_q": cu}


def _check_batch(batch, store, rows, layout):
    ref = _reference(store, rows, layout)
    for key in ("input_ids", "labels", "position_ids"):
        assert batch[key].dtype == torch.int64
        np.testing.assert_array_equal(batch[key].numpy(), ref[key], err_msg=key)
    np.testing.assert_array_equal(batch["lang_ids"].numpy(), ref["lang_ids"])
    np.testing.assert_array_equal(batch["cu_seq_lens_q"].numpy(), ref["cu_seq_lens_q"])
    assert batch["cu_seq_lens_k"] is batch["cu_seq_lens_q"] or torch.equal(batch["cu_seq_lens_k"], batch["cu_seq_lens_q"])
    assert batch["max_length_q"] == int(np.diff(ref["cu_seq_lens_q"]).max()) == batch["max_length_k"]


def _collect(loader):
    return [{k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in b.items()} for b in loader]


def _same(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for k in x:
            if isinstance(x[k], torch.Tensor):
                assert torch.equal(x[k], y[k]), k
            else:
                assert x[k] == y[k], k


# --- batches are the store's rows -------------------------------------------------------------------------
@pytest.mark.parametrize("layout", ["padded", "flat"])
def test_batches_match_store_reader(data, layout):
    path, *_ = data
    store = mlmix.open(path)
    ds = PackedDataset(path, batch_size=5, layout=layout, seed=3, languages="token")
    batches = list(ds)
    assert len(batches) == len(ds) == -(-len(store) // 5)
    seen = []
    for k, b in enumerate(batches):
        rows = ds.rank_rows(0, k)
        _check_batch(b, store, rows, layout)
        seen.extend(rows.tolist())
    assert sorted(seen) == list(range(len(store)))  # every row once
    assert seen != sorted(seen)  # shuffled
    np.testing.assert_array_equal(ds.order(0), seen)


def test_order_depends_on_seed_and_epoch_only(data):
    path, *_ = data
    a = PackedDataset(path, batch_size=4, seed=1)
    b = PackedDataset(path, batch_size=7, seed=1)
    np.testing.assert_array_equal(a.order(0), b.order(0))
    assert not np.array_equal(a.order(0), a.order(1))
    assert not np.array_equal(a.order(0), PackedDataset(path, batch_size=4, seed=2).order(0))
    np.testing.assert_array_equal(PackedDataset(path, batch_size=4, shuffle=False).order(5), np.arange(a.num_samples))


def test_epochs_advance_and_set_epoch(data):
    path, *_ = data
    ds = PackedDataset(path, batch_size=8, seed=0)
    first = _collect(ds)
    assert ds.epoch == 1  # a finished pass moves on
    second = _collect(ds)
    assert not torch.equal(first[0]["input_ids"], second[0]["input_ids"])
    ds.set_epoch(0)
    _same(_collect(ds), first)


def test_attention_mask_and_segment_languages(data):
    path, *_ = data
    store = mlmix.open(path)
    ds = PackedDataset(path, batch_size=3, attention_mask=True, languages="segment")
    b = next(iter(ds))
    rows = ds.rank_rows(0, 0)
    n = np.array([store[int(r)]["num_tokens"] for r in rows])
    np.testing.assert_array_equal(b["attention_mask"].numpy(), np.arange(SEQ_LEN)[None] < n[:, None])
    np.testing.assert_array_equal(b["lang_ids"].numpy(), np.concatenate([store[int(r)]["lang_ids"] for r in rows]))
    np.testing.assert_array_equal(b["seq_lens"].numpy(), np.concatenate([store[int(r)]["seq_lens"] for r in rows]))
    assert ds.languages == mlmix.open(path).languages


# --- distribution: every row exactly once, balanced ranks ------------------------------------------------
@settings(max_examples=25, deadline=None)
@given(batch_size=st.integers(1, 9), world=st.integers(1, 5), drop_last=st.booleans(), seed=st.integers(0, 3))
def test_ranks_share_each_step(data, batch_size, world, drop_last, seed):
    path, *_ = data
    dss = [PackedDataset(path, batch_size=batch_size, rank=r, world_size=world, drop_last=drop_last, seed=seed)
           for r in range(world)]
    n = dss[0].num_samples
    steps = len(dss[0])
    assert all(len(d) == steps for d in dss)  # every rank makes the same number of steps
    order = dss[0].order(0)
    tokens = np.diff(mlmix.open(path, verify=False).array("row_offsets"))
    covered = []
    for k in range(steps):
        parts = [d.rank_rows(0, k) for d in dss]
        sizes = [p.size for p in parts]
        assert max(sizes) - min(sizes) <= 1 and min(sizes) >= 1
        step = np.concatenate(parts)
        # the step is the next slice of the global order, whatever the world size
        np.testing.assert_array_equal(np.sort(step), np.sort(order[len(covered) : len(covered) + step.size]))
        covered.extend(step.tolist())
        if min(sizes) == max(sizes):  # snake dealing: per-rank totals within one row's tokens
            tot = [int(tokens[p].sum()) for p in parts]
            assert max(tot) - min(tot) <= int(tokens[step].max())
    g = batch_size * world
    expect = n - n % g if drop_last or n % g < world else n
    assert len(covered) == len(set(covered)) == expect


def test_rank_from_env_and_invalid_rank(data, monkeypatch):
    path, *_ = data
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "3")
    ds = PackedDataset(path, batch_size=2)
    assert (ds.rank, ds.world_size) == (1, 3)
    with pytest.raises(ValueError, match=r"rank must be an int in \[0, 3\).*got 3"):
        PackedDataset(path, batch_size=2, rank=3, world_size=3)
    with pytest.raises(ValueError, match="rank must be"):
        PackedDataset(path, batch_size=2, rank=-1, world_size=2)
    with pytest.raises(ValueError, match="both rank and world_size"):
        PackedDataset(path, batch_size=2, rank=0)
    with pytest.raises(ValueError, match="world_size must be a positive int"):
        PackedDataset(path, batch_size=2, rank=0, world_size=0)
    monkeypatch.setenv("RANK", "two")
    with pytest.raises(ValueError, match="RANK / WORLD_SIZE must be integers.*'two'"):
        PackedDataset(path, batch_size=2)
    monkeypatch.setenv("RANK", "5")
    with pytest.raises(ValueError, match="rank must be"):
        PackedDataset(path, batch_size=2)


def test_bad_arguments(data):
    path, *_ = data
    with pytest.raises(ValueError, match="batch_size must be a positive int, got 0"):
        PackedDataset(path, batch_size=0)
    with pytest.raises(ValueError, match="layout must be one of"):
        PackedDataset(path, batch_size=2, layout="ragged")
    with pytest.raises(ValueError, match="attention_mask=True needs layout='padded'"):
        PackedDataset(path, batch_size=2, layout="flat", attention_mask=True)
    with pytest.raises(ValueError, match="batch_size must not be given"):
        DataLoader(PackedDataset(path, batch_size=2), batch_size=4)
    with pytest.raises(TypeError, match="PackedDataset or PackedIterableDataset"):
        DataLoader([1, 2, 3])


def test_vocab_size_catches_a_store_tokenized_for_another_model(data, tmp_path):
    path, toks, mask, langs = data
    # ids below the model's vocabulary: the check changes nothing
    plain = _collect(DataLoader(PackedDataset(path, batch_size=5, seed=1)))
    checked = _collect(DataLoader(PackedDataset(path, batch_size=5, seed=1, vocab_size=VOCAB)))
    assert len(plain) == len(checked)
    for a, b in zip(plain, checked):
        assert torch.equal(a["input_ids"], b["input_ids"]) and torch.equal(a["labels"], b["labels"])
    # a model with a smaller vocabulary: the first batch holding a larger id names its row and the id
    store = mlmix.Store(path)
    with pytest.raises(ValueError, match=r"vocab_size=40: row (\d+) holds token id (\d+), outside \[0, 40\); the data "
                                         "was tokenized with a different tokenizer") as exc:
        _collect(DataLoader(PackedDataset(path, batch_size=5, seed=1, vocab_size=40)))
    import re

    row, tid = (int(x) for x in re.search(r"row (\d+) holds token id (\d+)", str(exc.value)).groups())
    assert tid >= 40 and tid in store[row]["input_ids"].tolist()
    # the streaming dataset checks the same way; a padding id outside the vocabulary is refused up front
    with pytest.raises(ValueError, match=r"vocab_size=40: row \d+ holds token id"):
        _collect(DataLoader(PackedIterableDataset([(toks, mask)], seq_len=SEQ_LEN, batch_size=5, vocab_size=40)))
    with pytest.raises(ValueError, match=r"vocab_size=8: the padding id 9 is outside \[0, 8\)"):
        PackedIterableDataset([toks], seq_len=SEQ_LEN, batch_size=5, pad_id=9, vocab_size=8)
    with pytest.raises(ValueError, match="vocab_size must be a positive int, got 0"):
        PackedDataset(path, batch_size=2, vocab_size=0)


def test_tokenizer_catches_a_store_tokenized_for_another_model_of_the_same_size(data, tmp_path):
    """Two vocabularies of one size: vocab_size cannot tell them apart, the recorded fingerprint can."""
    from tokenizers import Tokenizer, models

    _, toks, mask, langs = data
    words = [f"w{i}" for i in range(VOCAB)]
    ours = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="w0"))
    other = Tokenizer(models.WordLevel({w: i for i, w in enumerate(reversed(words))}, unk_token="w0"))
    path = str(tmp_path / "store")
    mlmix.write_store(path, toks, seq_len=SEQ_LEN, loss_mask=mask, langs=langs, tokenizer=ours)
    plain = _collect(DataLoader(PackedDataset(path, batch_size=5, seed=1, vocab_size=VOCAB)))
    checked = _collect(DataLoader(PackedDataset(path, batch_size=5, seed=1, vocab_size=VOCAB, tokenizer=ours)))
    assert len(plain) == len(checked) and all(torch.equal(a["input_ids"], b["input_ids"]) for a, b in zip(plain, checked))
    with pytest.raises(ValueError, match="stand for other tokens than those of the tokenizer that wrote the store"):
        PackedDataset(path, batch_size=5, vocab_size=VOCAB, tokenizer=other)
    with pytest.raises(ValueError, match="does not record which tokenizer wrote it"):
        PackedDataset(data[0], batch_size=5, tokenizer=ours)


# --- resume -----------------------------------------------------------------------------------------------
def test_resume_with_other_num_workers_is_exact(data):
    path, *_ = data
    full = _collect(DataLoader(PackedDataset(path, batch_size=6, seed=5)))
    ds = PackedDataset(path, batch_size=6, seed=5)
    loader = DataLoader(ds, num_workers=2, prefetch_factor=2)
    head = []
    for b in loader:
        head.append({k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in b.items()})
        if len(head) == 7:
            state = loader.state_dict()
            break
    assert state["samples_consumed"] == 42 and state["epoch"] == 0
    state = json.loads(json.dumps(state))  # a checkpoint survives JSON
    ds2 = PackedDataset(path, batch_size=6, seed=5)
    loader2 = DataLoader(ds2, num_workers=0)
    loader2.load_state_dict(state)
    tail = _collect(loader2)
    _same(head + tail, full)
    assert loader2.state_dict()["epoch"] == 1 and loader2.state_dict()["samples_consumed"] == 0


def test_dataset_state_in_process(data):
    path, *_ = data
    ds = PackedDataset(path, batch_size=4, seed=2, layout="flat")
    it = iter(ds)
    head = [next(it) for _ in range(3)]
    state = ds.state_dict()
    assert state["samples_consumed"] == 12
    rest = list(it)
    ds2 = PackedDataset(path, batch_size=4, seed=2, layout="flat")
    ds2.load_state_dict(state)
    _same(_collect(ds2), rest)
    ds3 = PackedDataset(path, batch_size=4, seed=2, layout="flat")
    ds3.load_state_dict(state)
    ds3.set_epoch(0)  # the HF Trainer calls set_epoch(current epoch): a resumed position survives it
    assert ds3.state_dict()["samples_consumed"] == 12
    assert len(head) == 3


def test_elastic_resume_changes_world_size(data):
    path, *_ = data
    world = 3
    dss = [PackedDataset(path, batch_size=4, rank=r, world_size=world, seed=9) for r in range(world)]
    consumed = [d.rank_rows(0, k) for d in dss for k in range(5)]
    state = dss[0].state_dict()
    state["samples_consumed"] = 5 * 4 * world  # what a loader reports after 5 steps on every rank
    two = [PackedDataset(path, batch_size=4, rank=r, world_size=2, seed=9) for r in range(2)]
    for d in two:
        d.load_state_dict(state)
    rest = [d.rank_rows(0, k, start=60) for d in two for k in range(len(d._steps(60)))]
    rows = np.concatenate(consumed + rest)
    order = dss[0].order(0)
    tail = (order.size - 60) % 8
    kept = order if tail >= 2 else order[: order.size - tail]  # a last step smaller than the world is dropped
    assert len(rows) == len(set(rows.tolist()))  # nothing repeated
    assert sorted(rows.tolist()) == sorted(kept.tolist())  # nothing else skipped
    np.testing.assert_array_equal(np.sort(np.concatenate(rest)), np.sort(kept[60:]))


def test_persistent_workers_follow_epochs(data):
    path, *_ = data
    ref = PackedDataset(path, batch_size=16, seed=4)
    want = [_collect(ref), _collect(ref)]  # epochs 0 and 1 in process
    ds = PackedDataset(path, batch_size=16, seed=4)
    loader = DataLoader(ds, num_workers=2, persistent_workers=True, pin_memory=False)
    got = [_collect(loader), _collect(loader)]
    _same(got[0], want[0])
    _same(got[1], want[1])
    # a plain torch DataLoader with workers gives the same batches, epoch chosen with set_epoch
    plain = torch.utils.data.DataLoader(PackedDataset(path, batch_size=16, seed=4), batch_size=None, num_workers=2)
    plain.dataset.set_epoch(1)
    _same(_collect(plain), want[1])


def test_state_from_other_dataset_or_seed_is_refused(data, tmp_path):
    path, toks, mask, langs = data
    state = PackedDataset(path, batch_size=4, seed=0).state_dict()
    with pytest.raises(ValueError, match="another dataset or seed: seed differ"):
        PackedDataset(path, batch_size=4, seed=1).load_state_dict(state)
    with pytest.raises(ValueError, match="shuffle"):
        PackedDataset(path, batch_size=4, seed=0, shuffle=False).load_state_dict(state)
    other = str(tmp_path / "other")
    mlmix.write_store(other, toks[:100], seq_len=SEQ_LEN)
    with pytest.raises(ValueError, match="another dataset or seed"):
        PackedDataset(other, batch_size=4, seed=0).load_state_dict(state)
    with pytest.raises(ValueError, match="not a mlmix.torch.PackedDataset state_dict"):
        PackedDataset(path, batch_size=4).load_state_dict({"epoch": 0})
    bad = dict(state, samples_consumed=10**6)
    with pytest.raises(ValueError, match="samples_consumed"):
        PackedDataset(path, batch_size=4).load_state_dict(bad)
    with pytest.raises(ValueError, match="version"):
        PackedDataset(path, batch_size=4).load_state_dict(dict(state, version=99))


# --- bad stores ---------------------------------------------------------------------------------------------
def _copy(path, tmp_path):
    dst = str(tmp_path / "copy")
    shutil.copytree(path, dst)
    return dst


def test_store_of_other_version_is_refused(data, tmp_path):
    dst = _copy(data[0], tmp_path)
    mpath = Path(dst) / "manifest.json"
    m = json.loads(mpath.read_text())
    m["version"] = 99
    mpath.write_text(json.dumps(m))
    with pytest.raises(StoreError, match="version 99; this mlmix reads version 1 and 2"):
        PackedDataset(dst, batch_size=2)


def test_truncated_or_corrupted_store_is_refused(data, tmp_path):
    dst = _copy(data[0], tmp_path)
    tokens = Path(dst) / "tokens.bin"
    raw = bytearray(tokens.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    tokens.write_bytes(bytes(raw))
    with pytest.raises(StoreError, match="checksum mismatch in tokens.bin"):
        PackedDataset(dst, batch_size=2)
    tokens.write_bytes(bytes(raw[:-8]))
    with pytest.raises(StoreError, match="truncated"):
        PackedDataset(dst, batch_size=2, verify=False)


def test_store_changed_under_a_worker_is_refused(data, tmp_path):
    path, toks, *_ = data
    dst = _copy(path, tmp_path)
    ds = PackedDataset(dst, batch_size=2)
    mlmix.write_store(dst, toks[:50], seq_len=SEQ_LEN)  # replaced after the dataset was made
    clone = pickle_roundtrip(ds)
    with pytest.raises(StoreError, match="changed after the dataset was created"):
        next(iter(clone))


def pickle_roundtrip(obj):
    import pickle

    return pickle.loads(pickle.dumps(obj))


# --- on-the-fly packing -------------------------------------------------------------------------------------
def _chunks(toks, mask, langs, size=37):
    return [(toks[i : i + size], mask[i : i + size], langs[i : i + size]) for i in range(0, len(toks), size)]


def _pieces(batches, languages):
    """(example tokens, language) of every real piece of the batches, cut at cu_seq_lens."""
    out = []
    for b in batches:
        cu = b["cu_seq_lens_q"].numpy()
        flat_ids = b["input_ids"].reshape(-1).numpy()
        flat_lang = b["lang_ids"].reshape(-1).numpy()
        flat_pos = b["position_ids"].reshape(-1).numpy()
        assert (flat_pos[flat_lang < 0] == 0).all()  # padding
        for lo, hi in zip(cu[:-1], cu[1:]):
            if flat_lang[lo] >= 0:
                np.testing.assert_array_equal(flat_pos[lo:hi], np.arange(hi - lo))
                out.append((tuple(flat_ids[lo:hi].tolist()), languages[flat_lang[lo]]))
    return out


@pytest.mark.parametrize("layout", ["padded", "flat"])
def test_iterable_packs_every_token_once(data, layout):
    _, toks, mask, langs = data
    ds = PackedIterableDataset(_chunks(toks, mask, langs), seq_len=SEQ_LEN, batch_size=3, window=50, layout=layout,
                               languages="token")
    batches = list(ds)
    want = sorted(zip((tuple(t.tolist()) for t in toks), langs))
    assert sorted(_pieces(batches, ds.languages)) == want


def test_iterable_ranks_share_the_stream(data):
    _, toks, mask, langs = data
    chunks = _chunks(toks, mask, langs)
    dss = [PackedIterableDataset(chunks, seq_len=SEQ_LEN, batch_size=3, window=50, rank=r, world_size=2, seed=3,
                                 languages="token")
           for r in range(2)]
    per_rank = [list(d) for d in dss]
    assert len(per_rank[0]) == len(per_rank[1])
    single = PackedIterableDataset(chunks, seq_len=SEQ_LEN, batch_size=6, window=50, seed=3, languages="token")
    steps = list(single)  # one process with the same global step: the same rows, step by step
    if steps[-1]["input_ids"].shape[0] < 2:  # a last step smaller than the world is dropped by the ranks
        steps = steps[:-1]
    assert len(steps) == len(per_rank[0])
    for k, step in enumerate(steps):
        got = _pieces([per_rank[0][k]], dss[0].languages) + _pieces([per_rank[1][k]], dss[1].languages)
        assert sorted(got) == sorted(_pieces([step], single.languages))


def test_iterable_resume_and_workers_are_exact(data):
    _, toks, mask, langs = data
    chunks = _chunks(toks, mask, langs)

    def make():
        return PackedIterableDataset(chunks, seq_len=SEQ_LEN, batch_size=4, window=60, seed=1)

    full = _collect(make())
    _same(_collect(DataLoader(make(), num_workers=2)), full)
    loader = DataLoader(make(), num_workers=0)
    head = []
    for b in loader:
        head.append({k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in b.items()})
        if len(head) == 5:
            state = loader.state_dict()
            break
    resumed = make()
    resumed.load_state_dict(state)
    _same(head + _collect(DataLoader(resumed, num_workers=2)), full)
    with pytest.raises(ValueError, match="another dataset or seed"):
        PackedIterableDataset(chunks, seq_len=SEQ_LEN, batch_size=4, window=60, seed=2).load_state_dict(state)


def test_iterable_rejects_one_shot_iterators(data):
    _, toks, *_ = data
    with pytest.raises(TypeError, match="re-iterable"):
        PackedIterableDataset(iter([toks]), seq_len=SEQ_LEN, batch_size=2)
    with pytest.raises(TypeError, match="chunk must be a Ragged"):
        list(PackedIterableDataset([[1, 2, 3]], seq_len=SEQ_LEN, batch_size=2))


# --- real clients --------------------------------------------------------------------------------------------
def _tiny_llama(impl):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                   attn_implementation=impl)  # use_cache left at its default (True), as users do
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(cfg).eval()


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
@pytest.mark.parametrize("layout", ["padded", "flat"])
def test_packed_loss_equals_unpacked_loss(data, impl, layout):
    path, toks, mask, _ = data
    model = _tiny_llama(impl)
    store = mlmix.open(path)
    ds = PackedDataset(path, batch_size=4, layout=layout, seed=7)
    batch = next(iter(ds))
    assert "attention_mask" not in batch
    with torch.no_grad():
        packed = float(model(**batch).loss)  # the whole dict, as the HF Trainer passes it
    total, count = 0.0, 0
    for r in ds.rank_rows(0, 0):
        for e in store[int(r)]["example"]:
            ids = torch.from_numpy(toks[int(e)].astype(np.int64))[None]
            labels = ids.clone()
            labels[0, ~mask[int(e)]] = -100
            k = int((labels[0, 1:] != -100).sum())
            if k:
                with torch.no_grad():
                    total += float(model(input_ids=ids, labels=labels).loss) * k
                count += k
    assert abs(packed - total / count) < 1e-5


def test_hf_trainer_runs_steps(data, tmp_path):
    transformers = pytest.importorskip("transformers")
    path, *_ = data
    model = _tiny_llama("sdpa").train()
    ds = PackedDataset(path, batch_size=4, layout="flat")

    class MlmixTrainer(transformers.Trainer):
        def get_train_dataloader(self):
            return DataLoader(self.train_dataset, num_workers=0)

    args = transformers.TrainingArguments(output_dir=str(tmp_path), max_steps=3, learning_rate=1e-2,
                                          per_device_train_batch_size=1, save_strategy="no", report_to=[],
                                          logging_steps=1, use_cpu=True, disable_tqdm=True)
    before = [p.detach().clone() for p in model.parameters()]
    trainer = MlmixTrainer(model=model, args=args, train_dataset=ds)
    out = trainer.train()
    assert out.global_step == 3 and np.isfinite(out.training_loss)
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert ds.state_dict()["samples_consumed"] == 12


# TRL's SFTConfig sets a deprecated transformers alias itself (not something a user controls)
@pytest.mark.filterwarnings("ignore:`gradient_checkpointing` is deprecated:FutureWarning")
def test_trl_sft_trainer_recipe(data, tmp_path):
    """The SFTTrainer recipe of docs/loader.md runs optimisation steps on mlmix batches."""
    datasets = pytest.importorskip("datasets")
    trl = pytest.importorskip("trl")
    tokenizers = pytest.importorskip("tokenizers")
    transformers = pytest.importorskip("transformers")
    path, *_ = data

    class MlmixSFTTrainer(trl.SFTTrainer):
        def __init__(self, *args, mlmix_dataset, **kwargs):
            self.mlmix_dataset = mlmix_dataset
            super().__init__(*args, train_dataset=datasets.Dataset.from_dict({"input_ids": [[0]]}), **kwargs)

        def get_train_dataloader(self):
            return DataLoader(self.mlmix_dataset, num_workers=0)

    vocab = {"<pad>": 0, **{f"t{i}": i for i in range(1, VOCAB)}}
    tokenizer = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<pad>")), pad_token="<pad>")
    config = trl.SFTConfig(output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=1, report_to=[],
                           save_strategy="no", use_cpu=True, dataset_kwargs={"skip_prepare_dataset": True},
                           padding_free=True, max_length=None, disable_tqdm=True)
    ds = PackedDataset(path, batch_size=4, layout="flat")
    trainer = MlmixSFTTrainer(model=_tiny_llama("sdpa").train(), args=config, processing_class=tokenizer,
                              mlmix_dataset=ds)
    out = trainer.train()
    assert out.global_step == 2 and np.isfinite(out.training_loss)
    assert ds.state_dict()["samples_consumed"] == 8
