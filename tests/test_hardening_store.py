"""Hardening of the packed store: corruption, SIGKILL of the writer, failing writes.

Sizes are small so that the suite stays fast; the documented long runs (docs/hardening.md) use the
same tests with more iterations:

    MLMIX_HARDEN_MUTATIONS=10000 MLMIX_HARDEN_KILLS=1000 pytest -s tests/test_hardening_store.py
"""

from __future__ import annotations

import builtins
import collections
import errno
import os
import shutil
import signal
import stat
import tempfile
import time

import numpy as np
import pytest

import mlmix
from mlmix import Ragged
from mlmix.store import StoreError

MUTATIONS = int(os.environ.get("MLMIX_HARDEN_MUTATIONS", "400"))
KILLS = int(os.environ.get("MLMIX_HARDEN_KILLS", "24"))


def make_chunks(n_chunks: int, per_chunk: int, seed: int = 0):
    """A stream of (tokens, mask, langs) chunks, deterministic in ``seed``."""
    rng = np.random.default_rng(seed)
    toks, masks, langs = [], [], []
    for _ in range(n_chunks):
        lengths = rng.integers(1, 250, size=per_chunk)
        total = int(lengths.sum())
        toks.append(Ragged.from_lengths(rng.integers(0, 150_000, size=total).astype(np.uint32), lengths))
        masks.append(Ragged.from_lengths(rng.random(total) < 0.8, lengths))
        langs.append(rng.choice(["en", "sw", "zh", "hi"], size=per_chunk).tolist())
    return toks, masks, langs


def write(path, data, seq_len: int = 512) -> dict:
    toks, masks, langs = data
    return mlmix.write_store(path, iter(toks), seq_len=seq_len, loss_mask=iter(masks), langs=iter(langs),
                             window=2048, seed=1)


def snapshot(path) -> dict[str, bytes]:
    out = {}
    for name in sorted(os.listdir(path)):
        with open(os.path.join(path, name), "rb") as f:
            out[name] = f.read()
    return out


def read_all(store) -> None:
    """Touch every row of an opened store (through the C++ reader) and every per-row field."""
    n = len(store)
    for lo in range(0, n, 64):
        store.batch(np.arange(lo, min(n, lo + 64)))
    for i in range(min(n, 8)):
        store[i]


@pytest.fixture(scope="module")
def small_store(tmp_path_factory):
    path = tmp_path_factory.mktemp("store") / "s"
    write(path, make_chunks(3, 40), seq_len=256)
    return path, snapshot(path)


# --- corruption ------------------------------------------------------------------------------------


def mutate(data: bytes, rng: np.random.Generator) -> tuple[str, bytes | None]:
    """One random mutation of a file's bytes: (kind, new bytes or None for 'delete the file')."""
    n = len(data)
    kind = rng.choice(["flip", "flip", "flip", "burst", "truncate", "extend", "zero", "delete", "swap"])
    b = bytearray(data)
    if kind == "flip" and n:
        i = int(rng.integers(n)) if rng.random() < 0.8 else int(rng.choice([0, n - 1]))
        b[i] ^= 1 << int(rng.integers(8))
    elif kind == "burst" and n:
        i = int(rng.integers(n))
        k = int(rng.integers(1, 64))
        b[i : i + k] = rng.integers(0, 256, size=len(b[i : i + k])).astype(np.uint8).tobytes()
    elif kind == "truncate":
        cut = int(rng.choice([0, 1, n // 2, n - 1, int(rng.integers(n + 1))]))
        b = b[: max(0, min(cut, n - 1))]
    elif kind == "extend":
        b += rng.integers(0, 256, size=int(rng.integers(1, 16))).astype(np.uint8).tobytes()
    elif kind == "zero" and n:
        i = int(rng.integers(n))
        k = min(n - i, int(rng.integers(1, 4096)))
        b[i : i + k] = bytes(k)
    elif kind == "swap" and n >= 16:
        # two aligned 8-byte words exchanged: same bytes, same length, only the order changes
        i, j = sorted(int(x) for x in rng.choice(n // 8, size=2, replace=False) * 8)
        b[i : i + 8], b[j : j + 8] = data[j : j + 8], data[i : i + 8]
    elif kind == "delete":
        return "delete", None
    return str(kind), bytes(b)


def test_every_mutation_is_detected(small_store, tmp_path):
    path, original = small_store
    work = tmp_path / "s"
    shutil.copytree(path, work)
    rng = np.random.default_rng(12)
    names = sorted(original)
    outcomes: collections.Counter = collections.Counter()
    tried = 0
    while tried < MUTATIONS:
        name = names[int(rng.integers(len(names)))]
        kind, new = mutate(original[name], rng)
        if new == original[name]:
            continue  # e.g. a burst that wrote the same bytes: no mutation
        tried += 1
        fpath = work / name
        if new is None:
            os.remove(fpath)
        else:
            fpath.write_bytes(new)
        try:
            with pytest.raises(StoreError) as info:
                mlmix.open(work, verify=True)
            msg = str(info.value)
            outcomes[(name, kind, _category(msg))] += 1
            # without the CRC pass a flipped data byte may open; reading it must still never crash
            try:
                store = mlmix.open(work, verify=False)
            except StoreError:
                pass
            else:
                try:
                    read_all(store)
                except (ValueError, IndexError):
                    pass
                del store
        finally:
            fpath.write_bytes(original[name])
    assert snapshot(work) == original
    mlmix.open(work)  # restored: opens again
    if os.environ.get("MLMIX_HARDEN_VERBOSE"):
        _print_outcomes(outcomes)


def _category(msg: str) -> str:
    for key in ("manifest checksum", "checksum mismatch", "truncated", "missing", "JSON", "format version",
                "not an mlmix packed store", "should hold", "offsets"):
        if key in msg:
            return key
    return msg


def _print_outcomes(outcomes) -> None:
    by_file: collections.Counter = collections.Counter()
    by_kind: collections.Counter = collections.Counter()
    by_cat: collections.Counter = collections.Counter()
    for (name, kind, cat), k in outcomes.items():
        by_file[name] += k
        by_kind[kind] += k
        by_cat[cat] += k
    print(f"\nmutations: {sum(outcomes.values())}, all detected")
    print("  by file:", dict(by_file))
    print("  by kind:", dict(by_kind))
    print("  detected as:", dict(by_cat))


def test_manifest_edits_that_keep_valid_json_are_detected(small_store, tmp_path):
    path, original = small_store
    work = tmp_path / "s"
    shutil.copytree(path, work)
    text = original["manifest.json"].decode()
    edits = [
        ('"seq_len": 256', '"seq_len": 257'),
        ('"pad_id": 0', '"pad_id": 1'),
        ('"has_loss_mask": true', '"has_loss_mask": false'),
        ('"sw"', '"sx"'),
        ("\n}\n", "\n}"),  # the trailing newline is part of the checked text
        ("  ", "   ", ),
    ]
    for old, new in edits:
        assert old in text
        (work / "manifest.json").write_text(text.replace(old, new, 1))
        with pytest.raises(StoreError, match="manifest checksum mismatch|JSON"):
            mlmix.open(work, verify=False)
    (work / "manifest.json").write_text(text)
    mlmix.open(work)


def test_stale_file_from_another_store_is_detected(small_store, tmp_path):
    path, _ = small_store
    other = tmp_path / "other"
    write(other, make_chunks(3, 40, seed=99), seq_len=256)
    for name in sorted(os.listdir(path)):
        if name == "manifest.json" or (other / name).read_bytes() == (path / name).read_bytes():
            continue  # (e.g. seg_starts, all zero in both stores when nothing was split)
        work = tmp_path / f"w-{name}"
        shutil.copytree(path, work)
        shutil.copy(other / name, work / name)
        with pytest.raises(StoreError, match=name):
            mlmix.open(work)


# --- SIGKILL of the writer -------------------------------------------------------------------------


def _fork_writer(target, data) -> int:
    pid = os.fork()
    if pid == 0:  # the child writes and exits without running the parent's cleanup (pytest's atexit)
        code = 1
        try:
            write(target, data)
            code = 0
        finally:
            os._exit(code)
    return pid


def _siblings(parent, name: str) -> list[str]:
    return sorted(s for s in os.listdir(parent) if s.startswith(f".{name}."))


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_sigkill_never_leaves_a_partial_store(tmp_path):
    data = make_chunks(4, 600, seed=3)
    ref = tmp_path / "ref"
    write(ref, data)
    ref_bytes = snapshot(ref)
    old = tmp_path / "old"
    write(old, make_chunks(2, 500, seed=4))
    old_bytes = snapshot(old)

    # calibrate: how long a whole child write takes
    t0 = time.perf_counter()
    pid = _fork_writer(tmp_path / "calib", data)
    assert os.waitpid(pid, 0)[1] == 0
    duration = time.perf_counter() - t0
    assert snapshot(tmp_path / "calib") == ref_bytes

    rng = np.random.default_rng(7)
    outcomes: collections.Counter = collections.Counter()
    for k in range(KILLS):
        parent = tmp_path / f"k{k % 2}"
        shutil.rmtree(parent, ignore_errors=True)
        parent.mkdir()
        target = parent / "s"
        replacing = k % 2 == 1
        if replacing:
            shutil.copytree(old, target)
        pid = _fork_writer(target, data)
        time.sleep(float(rng.uniform(0, duration)))
        os.kill(pid, signal.SIGKILL)
        _, status = os.waitpid(pid, 0)
        outcome = _check_after_kill(parent, target, ref_bytes, old_bytes if replacing else None)
        how = "killed" if os.WIFSIGNALED(status) else "finished"
        outcomes[("replace" if replacing else "fresh", outcome, how)] += 1
        # a rerun gives the same bytes as an uninterrupted run
        write(target, data)
        assert snapshot(target) == ref_bytes
    assert sum(v for (_, _, how), v in outcomes.items() if how == "killed") > 0
    if os.environ.get("MLMIX_HARDEN_VERBOSE"):
        print(f"\nkills: {KILLS} (one write: {duration * 1e3:.0f} ms)")
        for key, v in sorted(outcomes.items()):
            print("  ", key, v)


def _check_after_kill(parent, target, ref_bytes, old_bytes) -> str:
    """The store under its final name is either absent, the complete old one or the complete new one;
    any temporary sibling either refuses to open or is a complete copy of the new store."""
    refused = 0
    for sib in _siblings(parent, "s"):
        sp = os.path.join(parent, sib)
        try:
            mlmix.open(sp)
        except (StoreError, FileNotFoundError):
            refused += 1
            continue
        assert snapshot(sp) in (ref_bytes, old_bytes), f"{sib} opened but holds neither store"
    return _final_state(target, parent, ref_bytes, old_bytes) + (", partial temp refused" if refused else "")


def _final_state(target, parent, ref_bytes, old_bytes) -> str:
    if not os.path.exists(target):
        if old_bytes is not None:
            # killed between the two renames of the swap: the old store is complete in its .old sibling
            olds = [s for s in _siblings(parent, "s") if ".old-" in s]
            assert any(snapshot(os.path.join(parent, s)) == old_bytes for s in olds), "old store lost"
            return "between renames"
        return "absent"
    mlmix.open(target)  # must not raise: whatever is under the final name is complete
    got = snapshot(target)
    if got == ref_bytes:
        return "new"
    assert got == old_bytes, "a store opened that is neither the old nor the new one"
    return "old"


# --- failing writes --------------------------------------------------------------------------------


class _Injector:
    """Counts every write point of the store writer and raises OSError(err) at the chosen ones."""

    def __init__(self, fail_at: int | None, err: int, persistent: bool) -> None:
        self.fail_at, self.err, self.persistent = fail_at, err, persistent
        self.points: list[str] = []

    def hit(self, what: str, renaming: bool = False) -> None:
        i = len(self.points)
        self.points.append(what)
        if self.fail_at is None:
            return
        # a full disk keeps failing writes, but renames (metadata only) still succeed
        if i == self.fail_at or (self.persistent and i > self.fail_at and not renaming):
            raise OSError(self.err, os.strerror(self.err), what)


class _FaultyFile:
    def __init__(self, f, inj: _Injector, name: str) -> None:
        self._f, self._inj, self._name = f, inj, name

    def write(self, b):
        self._inj.hit(f"write {self._name}")
        return self._f.write(b)

    def close(self):
        if self._f.closed:
            return
        self._f.close()
        self._inj.hit(f"close {self._name}")  # buffered data reaches the disk on close: it may fail there

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __getattr__(self, name):
        return getattr(self._f, name)


@pytest.fixture
def inject(monkeypatch):
    real_open, real_fsync, real_rename = builtins.open, os.fsync, os.rename
    real_replace, real_mkdtemp = os.replace, tempfile.mkdtemp

    def install(inj: _Injector) -> None:
        def fopen(file, mode="r", *a, **k):
            f = real_open(file, mode, *a, **k)
            if any(c in mode for c in "wax+"):
                return _FaultyFile(f, inj, os.path.basename(os.fspath(file)))
            return f

        def fsync(fd):
            inj.hit("fsync dir" if stat.S_ISDIR(os.fstat(fd).st_mode) else "fsync file")
            return real_fsync(fd)

        def rename(a, b):
            inj.hit(f"rename {os.path.basename(a)[:6]}->{os.path.basename(b)[:6]}", renaming=True)
            return real_rename(a, b)

        def replace(a, b):
            inj.hit("replace", renaming=True)
            return real_replace(a, b)

        def mkdtemp(*a, **k):
            inj.hit("mkdtemp")
            return real_mkdtemp(*a, **k)

        monkeypatch.setattr(builtins, "open", fopen)
        monkeypatch.setattr(os, "fsync", fsync)
        monkeypatch.setattr(os, "rename", rename)
        monkeypatch.setattr(os, "replace", replace)
        monkeypatch.setattr(tempfile, "mkdtemp", mkdtemp)

    yield install
    monkeypatch.undo()


@pytest.mark.parametrize("err", [errno.ENOSPC, errno.EIO])
@pytest.mark.parametrize("persistent", [False, True])
def test_failing_writes_give_a_clean_error_and_no_output(tmp_path, inject, err, persistent):
    data = make_chunks(2, 60, seed=5)
    ref = tmp_path / "ref"
    write(ref, data, seq_len=256)
    ref_bytes = snapshot(ref)
    old = tmp_path / "old"
    write(old, make_chunks(1, 30, seed=6), seq_len=256)
    old_bytes = snapshot(old)

    tolerated = collections.Counter()
    for replacing in (False, True):
        # the write points of this scenario (replacing a store adds a mkdtemp and two renames)
        count_dir = tmp_path / f"count{int(replacing)}"
        count_dir.mkdir()
        if replacing:
            shutil.copytree(old, count_dir / "s")
        counter = _Injector(None, err, persistent)
        inject(counter)
        write(count_dir / "s", data, seq_len=256)
        inject(_Injector(None, err, persistent))
        points = list(counter.points)
        assert sum(p.startswith("write") for p in points) >= 8 and "mkdtemp" in points
        assert sum(p.startswith("rename") for p in points) == (2 if replacing else 1)
        for i, what in enumerate(points):
            parent = tmp_path / f"p{int(replacing)}-{i}"
            parent.mkdir()
            target = parent / "s"
            if replacing:
                shutil.copytree(old, target)
            inj = _Injector(i, err, persistent)
            inject(inj)
            try:
                write(target, data, seq_len=256)
            except OSError as exc:
                assert exc.errno == err, f"failure at {what} surfaced as {exc!r}"
                leftovers = _siblings(parent, "s")
                assert leftovers == [], f"failure at {what} left {leftovers}"
                if replacing:
                    assert snapshot(target) == old_bytes, f"failure at {what} damaged the old store"
                else:
                    assert not os.path.exists(target), f"failure at {what} left a store"
            else:
                # only a failed fsync of a directory is tolerated (some file systems refuse it);
                # then the store must be complete
                assert what == "fsync dir", f"failure at {what} was swallowed"
                tolerated[what] += 1
                assert snapshot(target) == ref_bytes
            finally:
                inject(_Injector(None, err, persistent))
            mlmix.open(target) if os.path.exists(target) else None
            shutil.rmtree(parent)
    assert set(tolerated) <= {"fsync dir"}
