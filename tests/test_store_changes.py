"""A store whose files change while it is open: the next read raises StoreError naming the file, and
never crashes the process (a memory-mapped file truncated under the mapping raises SIGBUS on read).

The truncation cases run the reader in a subprocess, so that a SIGBUS fails the test instead of
killing pytest. Also here: a build directory given where a store is expected, and a store too small
to give any rank a batch.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

import mlmix
from mlmix.store import StoreError

SEQ_LEN = 64
LIMIT_S = 120


def _examples(n: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    lens = rng.integers(2, 50, n)
    toks = mlmix.Ragged.from_lengths(rng.integers(0, 97, int(lens.sum())).astype(np.uint32), lens)
    mask = mlmix.Ragged.from_lengths(rng.random(int(lens.sum())) < 0.8, lens)
    langs = [("en", "sw")[i] for i in rng.integers(0, 2, n)]
    return toks, mask, langs


def _write(path, n: int = 200, seed: int = 0, shard_sequences: int | None = None) -> str:
    toks, mask, langs = _examples(n, seed)
    mlmix.write_store(path, toks, seq_len=SEQ_LEN, loss_mask=mask, langs=langs, shard_sequences=shard_sequences)
    return str(path)


@pytest.fixture(scope="module")
def template(tmp_path_factory):
    return _write(tmp_path_factory.mktemp("changes") / "store")


@pytest.fixture
def store(template, tmp_path):
    """A fresh copy of the template store (each test changes its files)."""
    path = str(tmp_path / "store")
    shutil.copytree(template, path)
    return path


def _run(code: str, *args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code), *args], env=env, capture_output=True,
                          text=True, timeout=LIMIT_S)


def _assert_store_error(proc: subprocess.CompletedProcess, *needles: str) -> None:
    """The subprocess ended with an uncaught StoreError (exit status 1) whose message holds ``needles``;
    -SIGBUS would be the crash this guards against."""
    assert proc.returncode != -signal.SIGBUS, f"the reader was killed by SIGBUS:\n{proc.stderr[-3000:]}"
    assert proc.returncode == 1, f"exit status {proc.returncode}:\n{proc.stderr[-3000:]}"
    assert "mlmix.store.StoreError" in proc.stderr, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    for needle in needles:
        assert needle in last, (needle, last)


# --- truncation: a subprocess, so that SIGBUS cannot take pytest down ----------------------------------------
_TRUNCATE_STORE = """
import os, sys
import numpy as np
import mlmix

path, name, size, verify, read = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4] == "1", sys.argv[5]
store = mlmix.open(path, verify=verify)
rows = np.arange(len(store))[::-1][:8] if read != "shard1" else np.arange(len(store) - 8, len(store))
store.batch(rows)
store[0]
os.truncate(os.path.join(path, name), size)
if read == "getitem":
    for i in rows:
        store[int(i)]
else:
    store.batch(rows)
print("read the truncated store without an error", file=sys.stderr)
"""


@pytest.mark.parametrize("name,size,verify,read", [
    ("tokens.bin", 0, False, "batch"),
    ("tokens.bin", 4096, True, "batch"),
    ("loss_mask.bin", 0, False, "batch"),
    ("row_offsets.bin", 8, False, "batch"),
    ("seg_lens.bin", 0, True, "getitem"),
    ("seg_lang.bin", 0, False, "getitem"),
])
def test_truncated_file_of_an_open_store(store, name, size, verify, read):
    old = os.path.getsize(os.path.join(store, name))
    proc = _run(_TRUNCATE_STORE, store, name, str(size), str(int(verify)), read)
    _assert_store_error(proc, name, f"truncated from {old} to {size} bytes")


def test_truncated_shard_of_an_open_store(tmp_path):
    path = _write(tmp_path / "sharded", shard_sequences=16)
    store = mlmix.open(path)
    assert store.num_shards > 2
    last = sorted(f for f in os.listdir(path) if f.startswith("tokens-"))[-1]
    del store
    proc = _run(_TRUNCATE_STORE, path, last, "0", "0", "shard1")
    _assert_store_error(proc, last, "truncated from")


_TRUNCATE_LOADER = """
import os, sys, time
import mlmix
from mlmix.torch.data import DataLoader, PackedDataset

path, workers, verify = sys.argv[1], int(sys.argv[2]), sys.argv[3] == "1"
ds = PackedDataset(path, batch_size=4, seed=3, verify=verify)
it = iter(DataLoader(ds, num_workers=workers) if workers else ds)
next(it)
if workers:
    # a worker reads ahead (prefetch_factor batches): let it finish those reads and wait, so that the truncation
    # falls between two reads; one during a read cannot be caught (docs/bad-input.md) and kills the reader
    time.sleep(1.0)
os.truncate(os.path.join(path, "tokens.bin"), 100)  # between two batches
for batch in it:
    pass
print("finished the epoch over a truncated store", file=sys.stderr)
"""


@pytest.mark.parametrize("workers,verify", [(0, False), (1, True)])
def test_loader_over_a_truncated_store(store, workers, verify):
    pytest.importorskip("torch")
    old = os.path.getsize(os.path.join(store, "tokens.bin"))
    proc = _run(_TRUNCATE_LOADER, store, str(workers), str(int(verify)))
    _assert_store_error(proc, "tokens.bin", f"truncated from {old} to 100 bytes")
    if workers:
        assert "in DataLoader worker process 0" in proc.stderr


# --- other changes: the mapping stays valid, so they run in this process -----------------------------------
def _batch_rows(store):
    return np.arange(min(8, len(store)))


def _rewrite_same_size(path: str, value: int = 7) -> bytes:
    """Overwrite a tokens file in place (same inode, same size) with ids ``value``; return its old bytes."""
    with open(path, "r+b") as f:
        old = f.read()
        f.seek(0)
        f.write(np.full(len(old) // 4, value, np.uint32).tobytes())
    return old


def test_file_replaced_by_rename(store):
    s = mlmix.open(store)
    s.batch(_batch_rows(s))
    other = _write(os.path.join(os.path.dirname(store), "other"), n=300, seed=5)
    # another store's tokens, cut to this one's size, renamed over the file
    size = os.path.getsize(os.path.join(store, "tokens.bin"))
    with open(os.path.join(other, "tokens.bin"), "rb") as f:
        data = f.read()[:size]
    assert len(data) == size
    tmp = os.path.join(store, ".tokens.bin.new")
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, os.path.join(store, "tokens.bin"))
    with pytest.raises(StoreError, match=r"tokens.bin was replaced by another file after the store was opened "
                                         r"\(crc32 [0-9a-f]{8}, manifest [0-9a-f]{8}\)"):
        s.batch(_batch_rows(s))


def test_replaced_file_without_verify_reads_the_old_one(store):
    s = mlmix.open(store, verify=False)
    rows = _batch_rows(s)
    before = s.batch(rows)
    tmp = os.path.join(store, ".tokens.bin.new")
    with open(tmp, "wb") as f:
        f.write(bytes(os.path.getsize(os.path.join(store, "tokens.bin"))))
    os.replace(tmp, os.path.join(store, "tokens.bin"))
    after = s.batch(rows)  # documented: no error, the old file's bytes (it stays mapped)
    np.testing.assert_array_equal(after["input_ids"], before["input_ids"])
    with pytest.raises(StoreError, match="tokens.bin"):
        mlmix.open(store)  # a new open checks the checksum


def test_identical_copy_renamed_over_is_accepted(store):
    s = mlmix.open(store)
    rows = _batch_rows(s)
    before = s.batch(rows)
    tmp = os.path.join(store, ".tokens.bin.copy")
    shutil.copyfile(os.path.join(store, "tokens.bin"), tmp)
    os.replace(tmp, os.path.join(store, "tokens.bin"))
    os.utime(os.path.join(store, "loss_mask.bin"))  # touched: same bytes
    np.testing.assert_array_equal(s.batch(rows)["input_ids"], before["input_ids"])


def test_file_overwritten_in_place_with_verify(store):
    s = mlmix.open(store)
    rows = _batch_rows(s)
    s.batch(rows)
    _rewrite_same_size(os.path.join(store, "tokens.bin"))
    with pytest.raises(StoreError, match=r"tokens.bin was rewritten in place .*crc32"):
        s.batch(rows)
    with pytest.raises(StoreError, match="tokens.bin"):
        s[0]


def test_file_overwritten_in_place_without_verify(store):
    s = mlmix.open(store, verify=False)
    rows = _batch_rows(s)
    s.batch(rows)
    _rewrite_same_size(os.path.join(store, "tokens.bin"))
    # documented: a file of the same size is trusted, and the mapping shows its new bytes
    out = s.batch(rows)
    real = np.arange(SEQ_LEN)[None, :] < out["num_tokens"][:, None]
    assert (out["input_ids"][real] == 7).all()


def test_overwrite_long_after_open_is_found_by_its_mtime(store):
    s = mlmix.open(store)
    time.sleep(0.1)  # past the window in which a timestamp cannot tell a rewrite (see _RACY_NS)
    rows = _batch_rows(s)
    s.batch(rows)
    assert not any(w.racy for w in s._watched.values())
    _rewrite_same_size(os.path.join(store, "tokens.bin"))
    with pytest.raises(StoreError, match="tokens.bin was rewritten in place"):
        s.batch(rows)


def test_rewrite_within_the_timestamp_granularity_is_found(tmp_path, monkeypatch):
    from mlmix.store import _is_racy

    second = 1_000_000_000
    assert _is_racy(5 * second + 7, 5 * second + 7 + 10_000_000)  # written 10 ms before it was opened
    assert not _is_racy(5 * second + 7, 6 * second)
    assert _is_racy(5 * second, 7 * second)  # whole-second timestamps: the write may be up to ~2 s later
    monkeypatch.setattr("mlmix.store._RACY_NS", 3600 * second)  # "just written", however slow this machine
    path = _write(tmp_path / "fresh")
    s = mlmix.open(path)  # right after writing: the files are racy (their mtime is too recent to trust)
    w = s._watched["tokens.bin"]
    assert w.racy
    _rewrite_same_size(os.path.join(path, "tokens.bin"))
    st = os.stat(os.path.join(path, "tokens.bin"))
    # as if the rewrite had fallen in the same clock tick as the write: the stat alone shows nothing
    w.key = (st.st_size, st.st_ino, st.st_dev, st.st_mtime_ns, st.st_ctime_ns)
    with pytest.raises(StoreError, match="tokens.bin was rewritten in place"):
        s.batch([0])


@pytest.mark.parametrize("verify", [True, False])
def test_deleted_file(store, verify):
    s = mlmix.open(store, verify=verify)
    s.batch(_batch_rows(s))
    os.remove(os.path.join(store, "seg_offsets.bin"))
    with pytest.raises(StoreError, match="seg_offsets.bin was deleted after the store was opened"):
        s.batch(_batch_rows(s))


def test_grown_file(store):
    s = mlmix.open(store, verify=False)
    with open(os.path.join(store, "tokens.bin"), "ab") as f:
        f.write(bytes(8))
    old = os.path.getsize(os.path.join(store, "tokens.bin")) - 8
    with pytest.raises(StoreError, match=f"tokens.bin was grown from {old} to {old + 8} bytes"):
        s.batch([0])
    with pytest.raises(StoreError, match="tokens.bin"):
        s.array("tokens")


def test_store_rewritten_by_write_store(tmp_path):
    path = _write(tmp_path / "s", seed=1)
    s = mlmix.open(path)
    rows = _batch_rows(s)
    before = s.batch(rows)
    _write(tmp_path / "s", seed=1)  # the same data again: identical files, swapped in atomically
    np.testing.assert_array_equal(s.batch(rows)["input_ids"], before["input_ids"])
    _write(tmp_path / "s", seed=2)  # other data
    with pytest.raises(StoreError, match=r"\.bin was (replaced|truncated|grown)"):
        s.batch(rows)


# --- the loader ------------------------------------------------------------------------------------------
def test_loader_finds_a_rewritten_file_at_the_next_batch(store):
    pytest.importorskip("torch")
    from mlmix.torch.data import PackedDataset

    it = iter(PackedDataset(store, batch_size=4, seed=1))
    next(it)
    _rewrite_same_size(os.path.join(store, "tokens.bin"))
    with pytest.raises(StoreError, match="tokens.bin was rewritten in place"):
        next(it)


def test_worker_reopen_finds_a_change_made_after_the_dataset_opened(store):
    pytest.importorskip("torch")
    from mlmix.torch.data import PackedDataset

    ds = PackedDataset(store, batch_size=4, seed=1)
    copy = pickle.loads(pickle.dumps(ds))  # what a spawned DataLoader worker gets: it re-opens the store
    tmp = os.path.join(store, ".seg_lens.bin.new")
    with open(tmp, "wb") as f:
        f.write(bytes(os.path.getsize(os.path.join(store, "seg_lens.bin"))))
    os.replace(tmp, os.path.join(store, "seg_lens.bin"))
    with pytest.raises(StoreError, match="seg_lens.bin was replaced by another file"):
        next(iter(copy))
    with pytest.raises(StoreError, match="seg_lens.bin"):
        next(iter(ds))


def test_loader_without_verify_reads_on_through_an_in_place_rewrite(store):
    pytest.importorskip("torch")
    from mlmix.torch.data import PackedDataset

    ds = PackedDataset(store, batch_size=4, seed=1, verify=False)
    it = iter(ds)
    next(it)
    _rewrite_same_size(os.path.join(store, "tokens.bin"))
    batch = next(it)  # documented: no error; the new bytes are read
    assert (batch["input_ids"][batch["labels"] != -100] == 7).all()


# --- a build directory where a store is expected -----------------------------------------------------------
@pytest.fixture
def build_dir(template, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    shutil.copytree(template, out / "store")
    (out / "build.json").write_text(json.dumps({"store": str(out / "store")}))
    return str(out)


def test_open_a_build_directory(build_dir):
    s = mlmix.open(build_dir)
    assert s.path == os.path.join(build_dir, "store")
    assert len(s) == len(mlmix.open(os.path.join(build_dir, "store")))


def test_packed_dataset_on_a_build_directory(build_dir):
    pytest.importorskip("torch")
    from mlmix.torch.data import PackedDataset

    ds = PackedDataset(build_dir, batch_size=4, seed=1)
    ref = PackedDataset(os.path.join(build_dir, "store"), batch_size=4, seed=1)
    assert ds.path == os.path.join(build_dir, "store")
    for a, b in zip(ds, ref):
        assert (a["input_ids"] == b["input_ids"]).all()


def test_directory_that_holds_a_store_but_is_no_build_output(template, tmp_path):
    (tmp_path / "d").mkdir()
    shutil.copytree(template, tmp_path / "d" / "store")
    with pytest.raises(StoreError, match=r"manifest.json is missing; it holds one in .*store.*open that"):
        mlmix.open(tmp_path / "d")


def test_directory_that_is_neither_says_what_a_store_is(tmp_path):
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "data.jsonl").write_text("{}\n")
    with pytest.raises(StoreError, match=r"not an mlmix packed store: manifest.json is missing \(a store is a "
                                         r"directory holding manifest.json and the .bin arrays"):
        mlmix.open(tmp_path / "x")
    (tmp_path / "y").mkdir()
    (tmp_path / "y" / "build.json").write_text("{}")
    with pytest.raises(StoreError, match="output of mlmix build .*no store/"):
        mlmix.open(tmp_path / "y")


def test_file_given_for_a_store(template):
    with pytest.raises(FileNotFoundError, match=r"it is a file, not a directory.*its directory"):
        mlmix.open(os.path.join(template, "tokens.bin"))
    with pytest.raises(FileNotFoundError, match="not a directory"):
        mlmix.open(os.path.join(template, "nothing-here"))


# --- fewer rows than ranks ---------------------------------------------------------------------------------
def _rows_store(path, rows: int) -> str:
    """A store of exactly ``rows`` full rows."""
    toks = mlmix.Ragged.from_lengths((np.arange(rows * SEQ_LEN) % 50).astype(np.uint32), [SEQ_LEN] * rows)
    mlmix.write_store(path, toks, seq_len=SEQ_LEN)
    assert len(mlmix.open(path)) == rows
    return str(path)


def test_fewer_rows_than_ranks_warns(tmp_path):
    pytest.importorskip("torch")
    from mlmix.torch.data import PackedDataset

    path = _rows_store(tmp_path / "tiny", 2)
    for rank in range(4):
        with pytest.warns(UserWarning, match=r"has 2 rows, 1 batch of batch_size=4, for 4 ranks \(world_size=4\): "
                                             r"every rank gets 0 batches per epoch.*at most 2 ranks") as rec:
            ds = PackedDataset(path, batch_size=4, rank=rank, world_size=4)
        assert len(rec) == 1 and path in str(rec[0].message)
        assert len(ds) == 0 and list(ds) == []
    with pytest.warns(UserWarning, match=r"has 2 rows, 2 batches of batch_size=1, for 4 ranks"):
        PackedDataset(path, batch_size=1, rank=0, world_size=4)


def test_drop_last_with_less_than_one_step_warns(tmp_path):
    pytest.importorskip("torch")
    from mlmix.torch.data import PackedDataset

    path = _rows_store(tmp_path / "small", 6)
    with pytest.warns(UserWarning, match=r"has 6 rows, 1 batch of batch_size=4, for 2 ranks.*drop_last=True keeps "
                                         r"only full steps of batch_size x world_size = 8 rows.*drop_last=False or "
                                         r"batch_size=3"):
        ds = PackedDataset(path, batch_size=4, rank=0, world_size=2, drop_last=True)
    assert len(ds) == 0
    with pytest.warns(UserWarning, match=r"has 6 rows, 0 batches of batch_size=8, for 1 rank"):
        PackedDataset(path, batch_size=8, drop_last=True)


def test_every_rank_with_a_batch_does_not_warn(tmp_path):
    pytest.importorskip("torch")
    from mlmix.torch.data import PackedDataset

    path = _rows_store(tmp_path / "six", 6)
    # 2 batches of 4 rows for 4 ranks: one step of 6 rows, each rank takes 1 or 2 (filterwarnings=error)
    dss = [PackedDataset(path, batch_size=4, rank=r, world_size=4) for r in range(4)]
    assert [len(d) for d in dss] == [1, 1, 1, 1]
    assert sum(next(iter(d))["input_ids"].shape[0] for d in dss) == 6
    empty = tmp_path / "empty"
    mlmix.write_store(empty, mlmix.Ragged.from_lengths(np.zeros(0, np.uint32), np.zeros(0, np.int64)), seq_len=SEQ_LEN)
    assert len(PackedDataset(empty, batch_size=4, rank=0, world_size=4)) == 0  # nothing to share: no warning
