"""The on-disk packed store: packed rows kept compactly in memory-mapped arrays plus a JSON manifest.

``write_store`` packs tokenized examples (in memory, or streamed chunk by chunk) and writes the store
atomically; ``open`` maps it back without reading it into memory. The format is described in
docs/store-format.md: real tokens only (no padding), an optional loss-mask byte per token, and
per-row / per-segment boundaries; labels, position ids and padding are derived when a row is read.
"""

from __future__ import annotations

import builtins
import dataclasses
import json
import os
import re
import stat
import sys
import threading
import time
import zlib
from typing import NoReturn, Sequence

import numpy as np

from ._atomic import atomic_directory
from ._checks import check_mask, check_pad, check_seed, check_seq_len, check_shard_sequences, check_tokens, max_seq_len
from ._outputs import crc32_combine
from ._parallel import in_order, usable_cores
from .pack import StreamPacker, pack
from .ragged import Ragged, drop_mapped_pages, is_mapped, read_spans, take_spans

__all__ = ["write_store", "open", "Store", "ShardedArray", "StoreError", "FORMAT", "VERSION"]

FORMAT = "mlmix.packed-store"
VERSION = 2  # the newest version written; a store of one shard is written (and read) as version 1
READ_VERSIONS = (1, 2)
MANIFEST = "manifest.json"
MANIFEST_CRC = "manifest_crc32"  # last field of the manifest: CRC-32 of the file's text without it
_ROW_BLOCK = 16_384  # fewest rows gathered and written at a time (most, from memory-mapped inputs)
_BLOCK_TOKENS = 1 << 22  # most tokens gathered at a time from memory-mapped inputs
SHARD_TOKENS = 1 << 28  # default shard size: seq_len-token rows of 2**28 tokens (1 GiB of uint32 ids)
SHARDED_ARRAYS = ("tokens", "loss_mask")  # the per-token arrays, split by rows into shard files


class StoreError(ValueError):
    """A store that is missing, truncated, corrupted or of another format version."""


class _ArrayWriter:
    """Appends to one raw little-endian array file, tracking its length and CRC-32."""

    def __init__(self, directory: str, name: str, dtype, file: str | None = None) -> None:
        self.name, self.dtype = name, np.dtype(dtype)
        self.file = f"{name}.bin" if file is None else file
        self._f = builtins.open(os.path.join(directory, self.file), "wb")
        self.length = 0
        self.crc = 0
        self._kicked = 0  # bytes handed to the disk's writeback so far
        self._reserved = 0  # bytes reserved by reserve()
        self._write_lock = threading.Lock()

    def append(self, arr: np.ndarray) -> None:
        arr = np.ascontiguousarray(arr, dtype=self.dtype.newbyteorder("<"))
        buf = memoryview(arr).cast("B")
        self.crc = zlib.crc32(buf, self.crc)
        self._f.write(buf)
        self.length += arr.shape[0]
        if self.length * self.dtype.itemsize - self._kicked >= _WRITEBACK_BYTES:
            self._kick()

    def reserve(self, length: int) -> int:
        """The byte offset where the next ``length`` items go, written later by :meth:`write_at` (from any thread,
        in any order); :meth:`written` then counts them, in file order. A writer so used takes no :meth:`append`."""
        offset = self._reserved
        self._reserved += int(length) * self.dtype.itemsize
        return offset

    def write_at(self, offset: int, arr: np.ndarray, length: int) -> int:
        """Write ``arr`` (``length`` items) at byte ``offset`` (from :meth:`reserve`); its CRC-32 alone. Thread-safe:
        ``pwrite`` on the file's descriptor (the GIL released for the copy and the checksum)."""
        arr = np.ascontiguousarray(arr, dtype=self.dtype.newbyteorder("<"))
        if arr.shape != (length,):
            raise RuntimeError(f"{self.file}: a block of {arr.shape[0]} items was gathered where {length} were "
                               "planned")
        view = memoryview(arr).cast("B")
        crc = zlib.crc32(view)
        fd = self._f.fileno()
        # one write into a file at a time: the file system serialises them anyway (ext4 holds the inode's lock
        # for each), and a thread waiting here sleeps, where it would spin in the kernel
        with self._write_lock:
            while view:  # a regular file takes the whole write unless it fails (then pwrite raises)
                n = os.pwrite(fd, view, offset)
                view, offset = view[n:], offset + n
        return crc

    def written(self, crc: int, length: int) -> None:
        """Count the next block of the file (in order): ``length`` items whose CRC-32 is ``crc``."""
        self.crc = crc32_combine(self.crc, crc, length * self.dtype.itemsize)
        self.length += length
        if self.length * self.dtype.itemsize - self._kicked >= _WRITEBACK_BYTES:
            self._kick()

    def _kick(self) -> None:
        """Hand the bytes written since the last call to the disk's writeback now (while the rest is gathered),
        instead of leaving them all to the fsync that makes the store durable."""
        written = self.length * self.dtype.itemsize
        if written > self._kicked:
            self._f.flush()
            start_writeback(self._f.fileno(), self._kicked, written - self._kicked)
            self._kicked = written

    def discard(self) -> None:
        """Close the file (idempotent); used when writing fails half-way, so a failing close (a full
        disk flushing its buffer) is ignored here: the error being raised already says what went wrong,
        and every other writer must still be closed."""
        try:
            self._f.close()
        except OSError:
            pass

    def close(self) -> dict:
        self._kick()
        self._f.close()
        return {"file": self.file, "dtype": self.dtype.str.lstrip("<|="), "length": self.length,
                "crc32": f"{self.crc:08x}"}


_WRITEBACK_BYTES = 4 << 20  # a file's written bytes handed to the disk's writeback every 4 MB (see _kick)
_SYNC_FILE_RANGE: list = []


def start_writeback(fd: int, offset: int, nbytes: int) -> None:
    """Start the disk writing ``nbytes`` at ``offset`` of ``fd`` without waiting (Linux ``sync_file_range``
    with ``SYNC_FILE_RANGE_WRITE``), so that the fsync which makes a store durable finds less left to write;
    a no-op where the call is missing or fails (the fsync still writes everything)."""
    if not _SYNC_FILE_RANGE:
        fn = None
        if sys.platform.startswith("linux"):
            try:
                import ctypes

                fn = ctypes.CDLL(None, use_errno=True).sync_file_range
                fn.argtypes = (ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint)
                fn.restype = ctypes.c_int
            except (OSError, AttributeError):
                fn = None
        _SYNC_FILE_RANGE.append(fn)
    fn = _SYNC_FILE_RANGE[0]
    if fn is not None:
        fn(fd, offset, nbytes, 2)  # SYNC_FILE_RANGE_WRITE; an error only means no head start


def shard_file(name: str, shard: int, num_shards: int) -> str:
    """File name of array ``name`` in shard ``shard``: ``tokens.bin`` for a store of one shard (format
    version 1), else ``tokens-00000.bin``, ``tokens-00001.bin``, ..."""
    return f"{name}.bin" if num_shards == 1 else f"{name}-{shard:05d}.bin"


def shard_bounds(num_sequences: int, shard_sequences: int) -> list[int]:
    """Row boundaries of the shards: ``[0, s, 2s, ..., num_sequences]`` (one shard for an empty store)."""
    return list(range(0, num_sequences, shard_sequences)) + [num_sequences] if num_sequences else [0, 0]


def _sharded_spec(dtype: str, shards: list[dict]) -> dict:
    """The manifest entry of an array kept in several shard files: its total length and the CRC-32 of
    the shards' bytes end to end (what one file would have), then each shard's file, length and CRC."""
    crc, itemsize = 0, np.dtype(dtype).itemsize
    for sh in shards:
        crc = crc32_combine(crc, int(sh["crc32"], 16), sh["length"] * itemsize)
    return {"dtype": dtype, "length": sum(sh["length"] for sh in shards), "crc32": f"{crc:08x}",
            "shards": [{"file": sh["file"], "length": sh["length"], "crc32": sh["crc32"]} for sh in shards]}


def write_shard(directory: str, shard: int, num_shards: int, plan, values: np.ndarray, offsets: np.ndarray,
                mask_values: np.ndarray | None) -> dict[str, dict]:
    """Write the per-token arrays of one shard and return their specs (file, dtype, length, crc32).

    ``plan`` is the shard's rows (a PackPlan, e.g. ``full_plan.rows(lo, hi)``) whose ``seg_example``
    indexes ``offsets``: the tokens of only the examples the shard needs may be given. The bytes equal
    those :func:`write_store` writes for the same rows, however the examples reached this call (this is
    how the Ray engine materialises each shard in its own task).
    """
    writers = {"tokens": _ArrayWriter(directory, "tokens", values.dtype, shard_file("tokens", shard, num_shards))}
    if mask_values is not None:
        writers["loss_mask"] = _ArrayWriter(directory, "loss_mask", np.uint8, shard_file("loss_mask", shard, num_shards))
    mapped = is_mapped(values) or (mask_values is not None and is_mapped(mask_values))
    # from memory-mapped inputs (the local executor passes every example's tokens, mapped), blocks of at
    # most _BLOCK_TOKENS tokens, read from the mapped file without touching the mapping (_gather_block):
    # memory stays bounded for any input size
    step = max(1, min(_ROW_BLOCK, _BLOCK_TOKENS // plan.seq_len)) if mapped else _ROW_BLOCK

    arrays = {"tokens": values, "loss_mask": mask_values}
    # each block's place in the files is known from the plan: the tokens of its rows' segments
    seg_end = np.concatenate([[0], np.cumsum(plan.seg_len, dtype=np.int64)])
    row_tokens = seg_end[np.asarray(plan.row_offsets, dtype=np.int64)]

    def put(item: tuple[int, str, int, int]) -> int:
        lo, name, offset, length = item
        block = _gather_block(plan.rows(lo, min(plan.num_sequences, lo + step)), arrays[name], offsets)
        return writers[name].write_at(offset, block, length)

    try:
        # each block's tokens and mask bytes gathered, checksummed and written at their place on worker
        # threads (the copies, CRCs and writes run without the GIL), their CRCs joined here in file order:
        # the bytes do not depend on the threads
        items = []
        for lo in range(0, plan.num_sequences, step):
            length = int(row_tokens[min(plan.num_sequences, lo + step)] - row_tokens[lo])
            items += [(lo, name, w.reserve(length), length) for name, w in writers.items()]
        threads = _write_threads()  # a call's result is a CRC: many may be done ahead (a block is held while running)
        for crc, (_, name, _, length) in zip(in_order(put, items, threads, ahead=4 * threads), items):
            writers[name].written(crc, length)
        return {name: w.close() for name, w in writers.items()}
    finally:
        for w in writers.values():
            w.discard()


def _gather_block(block, values: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """The real tokens (or mask bytes) of a block of rows (a PackPlan whose ``seg_example`` indexes ``offsets``),
    in packed order. From a memory-mapped ``values`` without touching the mapping, so that RSS stays bounded
    for any input size: each segment is read from the mapped file straight into its place (``read_spans``), or
    where the file cannot be read directly, the block's examples are copied in first (``take_spans``)."""
    if not is_mapped(values):
        return block.gather(values, offsets)
    off = np.asarray(offsets, dtype=np.int64)
    starts = off[block.seg_example] + block.seg_start
    if (block.seg_start < 0).any() or (starts + block.seg_len > off[block.seg_example + 1]).any():
        raise ValueError("the plan's segments do not lie within their examples' tokens")
    got = read_spans(values, starts, block.seg_len)
    if got is not None:
        return got
    need = np.unique(block.seg_example)
    local = dataclasses.replace(block, seg_example=np.searchsorted(need, block.seg_example))
    return local.gather(*take_spans(values, offsets, need))


def _write_threads() -> int:
    """Threads that gather a shard's blocks: ``$MLMIX_NUM_THREADS`` when set, else the usable cores (at most 4:
    past that the writes are the limit)."""
    env = os.environ.get("MLMIX_NUM_THREADS", "").strip()
    if env.isdigit() and int(env) > 0:
        return min(int(env), 4)
    return min(usable_cores(), 4)


def _lang_table(langs, n: int, table: dict[str, int]) -> np.ndarray:
    """uint16 language index per example, growing ``table`` (code -> index) in order of appearance."""
    codes = list(langs) if not isinstance(langs, np.ndarray) else langs.tolist()
    if len(codes) != n:
        raise ValueError(f"langs must have one code per example ({n}), got {len(codes)}")
    # the distinct codes in order of first appearance, each checked once (the loop below says what is wrong)
    seen: dict = {}
    try:
        first = np.fromiter((seen.setdefault(c, len(seen)) for c in codes), dtype=np.int64, count=n)
    except TypeError:  # an unhashable entry
        seen = None
    if seen is not None and all(isinstance(c, str) for c in seen) and len(set(table) | set(seen)) < 65_536:
        for c in seen:
            table.setdefault(c, len(table))
        return np.fromiter((table[c] for c in seen), dtype=np.uint16, count=len(seen))[first]
    out = np.empty(n, dtype=np.uint16)
    for i, c in enumerate(codes):
        if not isinstance(c, str):
            raise TypeError(f"langs must be strings (language codes), got langs[{i}] = {c!r}")
        k = table.get(c)
        if k is None:
            if len(table) >= 65_535:
                raise ValueError("langs may hold at most 65535 distinct codes")
            k = table[c] = len(table)
        out[i] = k
    return out


def write_store(path, tokens, *, seq_len: int, loss_mask=None, strategy: str = "bfd", langs=None, seed: int | None = 0,
                pad_id: int = 0, overlong: str = "error", window: int = 65_536,
                shard_sequences: int | None = None, tokenizer=None) -> dict:
    """Pack tokenized examples and write a packed store at ``path`` (atomically; replaces an old one).

    Args:
        path: directory to create.
        tokens: a Ragged of token ids (uint32, int32 or int64; packed globally), or an iterable of such
            Ragged chunks (packed in streaming mode with a window of ``window`` pending examples).
        seq_len: row length in tokens.
        loss_mask: None (every token counts), a Ragged of bool/uint8 shaped like ``tokens``, or for a
            stream an iterable of such chunks, one per token chunk.
        strategy: "bfd", "ffd", "bfd_split" (or "wrapped" for an in-memory Ragged), see mlmix.pack.
        langs: None, or one language code (str) per example (for a stream: an iterable of per-chunk
            sequences); kept per segment so a loader can report loss per language.
        seed: permutes examples before planning (see mlmix.pack); None keeps the input order.
        pad_id: token id used for padding when rows are read.
        overlong: policy for examples longer than seq_len (see mlmix.pack).
        shard_sequences: rows per shard of the per-token arrays (tokens, loss_mask); None: 2**28 //
            seq_len (1 GiB of uint32 ids). A store of one shard is format version 1 (``tokens.bin``);
            more shards give ``tokens-00000.bin``, ... listed in the one manifest (version 2). The row
            data and the index arrays are the same bytes whatever the shard size.
        tokenizer: the tokenizer that made ``tokens`` (anything :func:`mlmix.tokenize.vocab_fingerprint`
            takes, or its result). Its vocabulary fingerprint is recorded in the manifest, so that a loader
            given the model's tokenizer can refuse a store tokenized for another model
            (:meth:`Store.check_tokenizer`); every token id must then be below its ``num_ids``. None
            records nothing.

    Returns the manifest (a dict) that was written.
    """
    vocab = _check_vocab_record(tokenizer, "tokenizer")
    if vocab is not None and isinstance(pad_id, (int, np.integer)) and not 0 <= pad_id < vocab["num_ids"]:
        raise ValueError(f"pad_id={pad_id} is outside the tokenizer's {vocab['num_ids']} ids [0, {vocab['num_ids']})")
    seq_len = check_seq_len(seq_len)
    seed = check_seed(seed)
    shard_rows = check_shard_sequences(shard_sequences, seq_len)
    streaming = not isinstance(tokens, Ragged)
    if streaming:
        if isinstance(tokens, (np.ndarray, list, tuple, str, bytes)) and not (
            isinstance(tokens, (list, tuple)) and all(isinstance(t, Ragged) for t in tokens)
        ):
            raise TypeError(f"tokens must be a Ragged or an iterable of Ragged chunks, got {type(tokens).__name__}")
        if strategy == "wrapped":
            raise ValueError("strategy='wrapped' needs an in-memory Ragged, not a stream of chunks")
    table: dict[str, int] = {}
    with atomic_directory(path, kind="store", arg="path") as tmp:
        writers: dict[str, _ArrayWriter] = {}
        try:
            state = {"rows": 0, "segs": 0, "tokens": 0, "examples": 0, "dtype": None, "has_mask": None,
                     "shard_end": shard_rows}
            closed: dict[str, list[dict]] = {name: [] for name in SHARDED_ARRAYS}  # finished shards' specs

            def next_shard() -> None:
                """Close the per-token files of the current shard and open the next shard's."""
                k = len(closed["tokens"]) + 1
                for name in SHARDED_ARRAYS:
                    if name in writers:
                        spec = writers[name].close()
                        if k == 1:  # the first shard was named as in a one-shard store
                            spec["file"] = shard_file(name, 0, 2)
                            os.replace(os.path.join(tmp, f"{name}.bin"), os.path.join(tmp, spec["file"]))
                        closed[name].append(spec)
                        writers[name] = _ArrayWriter(tmp, name, writers[name].dtype, shard_file(name, k, 2))
                state["shard_end"] += shard_rows

            def ids_in_vocab(block: np.ndarray) -> np.ndarray:
                if vocab is not None and block.size:
                    lo, hi = int(block.min()), int(block.max())
                    if lo < 0 or hi >= vocab["num_ids"]:
                        raise ValueError(f"tokenizer: token id {lo if lo < 0 else hi} is outside the tokenizer's "
                                         f"{vocab['num_ids']} ids [0, {vocab['num_ids']}): the tokens were not made "
                                         "by this tokenizer")
                return block

            def emit(plan, toks: Ragged, mask: Ragged | None, ex_ids: np.ndarray, lang_idx: np.ndarray | None) -> None:
                values, offsets, _ = check_tokens(toks, "tokens")
                if state["dtype"] is None:
                    state["dtype"] = values.dtype
                    state["has_mask"] = mask is not None
                    writers["tokens"] = _ArrayWriter(tmp, "tokens", values.dtype)
                    if mask is not None:
                        writers["loss_mask"] = _ArrayWriter(tmp, "loss_mask", np.uint8)
                    writers["row_offsets"] = _ArrayWriter(tmp, "row_offsets", np.int64)
                    writers["seg_offsets"] = _ArrayWriter(tmp, "seg_offsets", np.int64)
                    writers["seg_lens"] = _ArrayWriter(tmp, "seg_lens", np.int32)
                    writers["seg_starts"] = _ArrayWriter(tmp, "seg_starts", np.int32)
                    writers["seg_example"] = _ArrayWriter(tmp, "seg_example", np.int64)
                    if lang_idx is not None:
                        writers["seg_lang"] = _ArrayWriter(tmp, "seg_lang", np.uint16)
                    writers["row_offsets"].append(np.zeros(1, np.int64))
                    writers["seg_offsets"].append(np.zeros(1, np.int64))
                if values.dtype != state["dtype"]:
                    raise TypeError(f"all token chunks must share one dtype, got {state['dtype']} then {values.dtype}")
                if (mask is not None) != state["has_mask"]:
                    raise ValueError("loss_mask must be given for every chunk or for none")
                if (lang_idx is not None) != ("seg_lang" in writers):
                    raise ValueError("langs must be given for every chunk or for none")
                mvals = None if mask is None else check_mask(mask, offsets)
                mapped = is_mapped(values) or (mvals is not None and is_mapped(mvals))
                if mapped:  # blocks of at most _BLOCK_TOKENS tokens: memory stays bounded for any input size
                    step = max(1, min(_ROW_BLOCK, _BLOCK_TOKENS // plan.seq_len))
                else:  # at most ~8 blocks: each gather re-validates the whole offsets array once
                    step = max(_ROW_BLOCK, -(-plan.num_sequences // 8))
                lo = 0
                while lo < plan.num_sequences:
                    if state["rows"] == state["shard_end"]:
                        next_shard()
                    hi = min(plan.num_sequences, lo + step, lo + state["shard_end"] - state["rows"])
                    block = plan.rows(lo, hi)
                    lo = hi
                    writers["tokens"].append(ids_in_vocab(_gather_block(block, values, offsets)))
                    if mvals is not None:
                        writers["loss_mask"].append(_gather_block(block, mvals, offsets))
                    writers["row_offsets"].append(state["tokens"] + np.cumsum(block.row_tokens))
                    writers["seg_offsets"].append(state["segs"] + block.row_offsets[1:])
                    writers["seg_lens"].append(block.seg_len)
                    writers["seg_starts"].append(block.seg_start)
                    writers["seg_example"].append(ex_ids[block.seg_example])
                    if lang_idx is not None:
                        writers["seg_lang"].append(lang_idx[block.seg_example])
                    state["rows"] += block.num_sequences
                    state["segs"] += block.num_segments
                    state["tokens"] += block.tokens_packed

            counts = {"truncated": 0, "split": 0, "dropped": 0, "tokens_dropped": 0}
            if not streaming:
                if langs is not None:
                    lang_idx = _lang_table(langs, len(tokens), table)
                else:
                    lang_idx = None
                if loss_mask is not None and not isinstance(loss_mask, Ragged):
                    raise TypeError(f"loss_mask must be a Ragged (like tokens) or None, got {type(loss_mask).__name__}")
                check_pad(pad_id, check_tokens(tokens, "tokens")[0].dtype)
                plan = pack(tokens, seq_len, strategy=strategy, overlong=overlong, seed=seed)
                emit(plan, tokens, loss_mask, np.arange(len(tokens), dtype=np.int64), lang_idx)
                state["examples"] = len(tokens)
                counts.update(truncated=plan.num_truncated, split=plan.num_split, dropped=plan.num_dropped,
                              tokens_dropped=plan.tokens_dropped)
            else:
                packer = StreamPacker(seq_len, window=window, strategy=strategy, overlong=overlong, seed=seed)
                mask_it = None if loss_mask is None else iter(loss_mask)
                lang_it = None if langs is None else iter(langs)
                lang_all: list[np.ndarray] = []  # language index per stream example (2 bytes each)

                def emit_all(ready) -> None:
                    for plan, toks, m, ids in ready:
                        emit(plan, toks, m, ids, None if lang_it is None else _gather_lang(lang_all, ids))

                for chunk in tokens:
                    if not isinstance(chunk, Ragged):
                        raise TypeError(f"tokens chunks must be Ragged, got {type(chunk).__name__}")
                    mchunk = None
                    if mask_it is not None:
                        mchunk = next(mask_it, None)
                        if mchunk is None:
                            raise ValueError("loss_mask has fewer chunks than tokens")
                    if lang_it is not None:
                        lchunk = next(lang_it, None)
                        if lchunk is None:
                            raise ValueError("langs has fewer chunks than tokens")
                        lang_all.append(_lang_table(lchunk, len(chunk), table))
                    if state["dtype"] is None:
                        check_pad(pad_id, check_tokens(chunk, "tokens")[0].dtype)
                    emit_all(packer.push(chunk, mchunk))
                emit_all(packer.flush())
                state["examples"] = packer.examples_seen
                counts.update(truncated=packer.num_truncated, split=packer.num_split, dropped=packer.num_dropped,
                              tokens_dropped=packer.tokens_dropped)
            if state["dtype"] is None:
                raise ValueError("tokens holds no examples: nothing to write")
            arrays = {name: w.close() for name, w in writers.items()}
            for name in SHARDED_ARRAYS:
                if closed[name]:
                    arrays[name] = _sharded_spec(arrays[name]["dtype"], closed[name] + [arrays[name]])
            manifest = _manifest_dict(
                seq_len=seq_len, pad_id=pad_id, token_dtype=state["dtype"], has_mask=state["has_mask"],
                strategy=strategy, seed=seed, streaming=streaming, num_examples=state["examples"],
                num_sequences=state["rows"], num_segments=state["segs"], num_tokens=state["tokens"],
                languages=list(table), counts=counts, arrays=arrays,
                shard_sequences=shard_rows if closed["tokens"] else None, tokenizer=vocab)
        finally:
            for w in writers.values():
                w.discard()
        with builtins.open(os.path.join(tmp, MANIFEST), "wb") as f:
            f.write(_manifest_bytes(manifest))
    return manifest


_VOCAB_KEYS = ("num_ids", "vocab_sha256")


def _is_vocab_record(x) -> bool:
    return (isinstance(x, dict) and set(x) == set(_VOCAB_KEYS) and isinstance(x["num_ids"], int)
            and not isinstance(x["num_ids"], bool) and x["num_ids"] >= 0 and isinstance(x["vocab_sha256"], str)
            and re.fullmatch("[0-9a-f]{64}", x["vocab_sha256"]) is not None)


def _check_vocab_record(tokenizer, name: str) -> dict | None:
    """None, a vocabulary fingerprint dict, or a tokenizer to fingerprint -> the record kept in the manifest."""
    if tokenizer is None:
        return None
    if isinstance(tokenizer, dict):
        if not _is_vocab_record(tokenizer):
            raise ValueError(f"{name} given as a dict must be a vocab_fingerprint() result ({{'num_ids': int >= 0, "
                             f"'vocab_sha256': 64 hex digits}}), got {tokenizer!r}")
        return {k: tokenizer[k] for k in _VOCAB_KEYS}
    from .tokenize import vocab_fingerprint

    return vocab_fingerprint(tokenizer)


def _manifest_dict(*, seq_len: int, pad_id: int, token_dtype, has_mask: bool, strategy: str, seed, streaming: bool,
                   num_examples: int, num_sequences: int, num_segments: int, num_tokens: int, languages: list,
                   counts: dict, arrays: dict, shard_sequences: int | None, tokenizer: dict | None = None) -> dict:
    """The manifest's fields, in their order (the file is compared byte for byte across engines)."""
    manifest = {
        "format": FORMAT,
        "version": 1 if shard_sequences is None else 2,
        "seq_len": seq_len,
        "pad_id": int(pad_id),
        "token_dtype": np.dtype(token_dtype).name,
        "has_loss_mask": bool(has_mask),
        "strategy": strategy,
        "seed": seed,
        "streaming": streaming,
        "num_examples": int(num_examples),
        "num_sequences": int(num_sequences),
        "num_segments": int(num_segments),
        "num_tokens": int(num_tokens),
        "efficiency": num_tokens / (num_sequences * seq_len) if num_sequences else 1.0,
        "lower_bound_sequences": -(-int(num_tokens) // seq_len),
        "languages": list(languages),
        **({} if tokenizer is None else {"tokenizer": dict(tokenizer)}),
        "counts": counts,
        "checksum": "crc32 (zlib) of each file's bytes",
        "arrays": arrays,
    }
    if shard_sequences is not None:
        manifest["shard_sequences"] = int(shard_sequences)
    return manifest


def write_index(directory: str, plan, shard_specs: list[dict[str, dict]], *, strategy: str, langs=None,
                pad_id: int = 0, seed: int | None = 0, shard_sequences: int, tokenizer=None) -> dict:
    """Finish a store whose shards :func:`write_shard` wrote into ``directory``: write the index arrays
    (row and segment offsets, segment lengths, starts, examples, languages) from the whole ``plan``, then
    the one manifest; return the manifest. The store equals what :func:`write_store` writes for an
    in-memory Ragged with the same plan (``shard_specs[k]`` are shard k's specs, k in row order).

    ``strategy``, ``seed``, ``pad_id``, ``tokenizer``: as given to write_store (recorded in the manifest;
    the token ids are not re-checked against the tokenizer here). ``directory``
    should be the temporary directory of an atomic write (the Ray engine's output is).
    """
    vocab = _check_vocab_record(tokenizer, "tokenizer")
    table: dict[str, int] = {}
    lang_idx = None if langs is None else _lang_table(langs, len(plan.lengths), table)
    bounds = shard_bounds(plan.num_sequences, shard_sequences)
    if len(shard_specs) != len(bounds) - 1:
        raise ValueError(f"shard_specs must hold one entry per shard ({len(bounds) - 1}), got {len(shard_specs)}")
    names = ["row_offsets", "seg_offsets", "seg_lens", "seg_starts", "seg_example"] + (["seg_lang"] if langs else [])
    dtypes = {"row_offsets": np.int64, "seg_offsets": np.int64, "seg_lens": np.int32, "seg_starts": np.int32,
              "seg_example": np.int64, "seg_lang": np.uint16}
    writers = {name: _ArrayWriter(directory, name, dtypes[name]) for name in names}
    try:
        writers["row_offsets"].append(np.zeros(1, np.int64))
        writers["seg_offsets"].append(np.zeros(1, np.int64))
        tokens = 0
        for lo in range(0, plan.num_sequences, _ROW_BLOCK):
            block = plan.rows(lo, min(plan.num_sequences, lo + _ROW_BLOCK))
            writers["row_offsets"].append(tokens + np.cumsum(block.row_tokens))
            writers["seg_offsets"].append(int(plan.row_offsets[lo]) + block.row_offsets[1:])
            writers["seg_lens"].append(block.seg_len)
            writers["seg_starts"].append(block.seg_start)
            writers["seg_example"].append(block.seg_example)
            if lang_idx is not None:
                writers["seg_lang"].append(lang_idx[block.seg_example])
            tokens += block.tokens_packed
        arrays = {name: w.close() for name, w in writers.items()}
    finally:
        for w in writers.values():
            w.discard()
    first = shard_specs[0]
    for name in SHARDED_ARRAYS:
        if name in first:
            arrays[name] = first[name] if len(shard_specs) == 1 else _sharded_spec(
                first[name]["dtype"], [sp[name] for sp in shard_specs])
    order = ["tokens", "loss_mask", "row_offsets", "seg_offsets", "seg_lens", "seg_starts", "seg_example", "seg_lang"]
    arrays = {name: arrays[name] for name in order if name in arrays}
    counts = {"truncated": plan.num_truncated, "split": plan.num_split, "dropped": plan.num_dropped,
              "tokens_dropped": plan.tokens_dropped}
    manifest = _manifest_dict(
        seq_len=plan.seq_len, pad_id=pad_id, token_dtype=np.dtype(first["tokens"]["dtype"]), has_mask="loss_mask" in first,
        strategy=strategy, seed=seed, streaming=False, num_examples=len(plan.lengths),
        num_sequences=plan.num_sequences, num_segments=plan.num_segments, num_tokens=tokens, languages=list(table),
        counts=counts, arrays=arrays, shard_sequences=shard_sequences if len(shard_specs) > 1 else None,
        tokenizer=vocab)
    with builtins.open(os.path.join(directory, MANIFEST), "wb") as f:
        f.write(_manifest_bytes(manifest))
    return manifest


_BODY_END = b"\n}"  # how json.dumps(..., indent=2) ends a dict


def _crc_field(crc_hex: str) -> bytes:
    return f',\n  "{MANIFEST_CRC}": "{crc_hex}"\n}}\n'.encode()


def _manifest_bytes(manifest: dict) -> bytes:
    """The manifest file: indented JSON whose last field is the CRC-32 of the same text without that field.

    The arrays' CRCs cover the data; this one covers the manifest itself, so that a flipped digit in
    ``seq_len`` or a length cannot pass as a different, valid store.
    """
    body = json.dumps(manifest, indent=2).encode()
    return body[: -len(_BODY_END)] + _crc_field(f"{zlib.crc32(body):08x}")


def _check_manifest_crc(raw: bytes, m: dict, mpath: str) -> None:
    crc = m.get(MANIFEST_CRC)
    field = _crc_field(crc) if isinstance(crc, str) and re.fullmatch("[0-9a-f]{8}", crc) else None
    if field is None or not raw.endswith(field) or f"{zlib.crc32(raw[: -len(field)] + _BODY_END):08x}" != crc:
        raise StoreError(f"{mpath!r}: manifest checksum mismatch ({MANIFEST_CRC} {crc!r}): the manifest is corrupted")


def _gather_lang(lang_all: list[np.ndarray], ids: np.ndarray) -> np.ndarray:
    # stream example ids are global; languages are kept per example as they arrive
    if len(lang_all) > 1:
        lang_all[:] = [np.concatenate(lang_all)]
    return lang_all[0][ids]


# dtypes (numpy short codes) each array may have; tokens keep the dtype they were written with
_ARRAY_DTYPES = {"tokens": ("u4", "i4", "i8"), "loss_mask": ("u1",), "row_offsets": ("i8",), "seg_offsets": ("i8",),
                 "seg_lens": ("i4",), "seg_starts": ("i4",), "seg_example": ("i8",), "seg_lang": ("u2",)}


def _check_manifest_fields(m: dict, where: str) -> None:
    """Types and ranges of the manifest fields the reader uses.

    A manifest that passes its checksum but was written by another tool (or edited and re-summed by
    hand) still gets a StoreError naming the field, never a KeyError, and never names a file outside
    the store's directory.
    """

    def bad(field: str, want: str, got) -> None:
        raise StoreError(f"{where!r}: manifest field {field!r} must be {want}, got {got!r}")

    def is_int(x) -> bool:
        return isinstance(x, int) and not isinstance(x, bool)

    for k in ("seq_len", "pad_id", "num_tokens", "num_examples", "num_sequences", "num_segments"):
        if not is_int(m.get(k)) or m[k] < 0:
            bad(k, "a non-negative integer", m.get(k))
    limit = max_seq_len()
    if not 2 <= m["seq_len"] <= limit:
        bad("seq_len", f"in [2, {limit}]", m["seq_len"])
    if isinstance(m.get("efficiency"), bool) or not isinstance(m.get("efficiency"), (int, float)):
        bad("efficiency", "a number", m.get("efficiency"))
    if not isinstance(m.get("has_loss_mask"), bool):
        bad("has_loss_mask", "true or false", m.get("has_loss_mask"))
    langs = m.get("languages")
    if not isinstance(langs, list) or not all(isinstance(c, str) for c in langs):
        bad("languages", "a list of strings", langs)
    if "tokenizer" in m and not _is_vocab_record(m["tokenizer"]):
        bad("tokenizer", "an object {num_ids: integer >= 0, vocab_sha256: 64 hex digits}", m["tokenizer"])
    arrays = m.get("arrays")
    if not isinstance(arrays, dict):
        bad("arrays", "an object", arrays)
    for name, spec in arrays.items():
        field = f"arrays.{name}"
        if name not in _ARRAY_DTYPES:
            bad("arrays", f"made of {sorted(_ARRAY_DTYPES)}", name)
        if not isinstance(spec, dict):
            bad(field, "an object", spec)
        if spec.get("dtype") not in _ARRAY_DTYPES[name]:
            bad(f"{field}.dtype", f"one of {_ARRAY_DTYPES[name]}", spec.get("dtype"))
        parts = [(field, spec)]
        if "shards" in spec:
            if m["version"] < 2:
                bad("version", f"2 for a store whose {name!r} has shards", m["version"])
            if name not in SHARDED_ARRAYS:
                bad(f"{field}.shards", f"absent (only {list(SHARDED_ARRAYS)} are sharded)", spec["shards"])
            if not isinstance(spec["shards"], list) or not all(isinstance(x, dict) for x in spec["shards"]):
                bad(f"{field}.shards", "a list of objects", spec["shards"])
            parts = [(f"{field}.shards[{k}]", x) for k, x in enumerate(spec["shards"])]
            if not is_int(spec.get("length")) or spec["length"] < 0:
                bad(f"{field}.length", "a non-negative integer", spec.get("length"))
        for where_, part in parts:
            f = part.get("file")
            if not isinstance(f, str) or f in ("", ".", "..", MANIFEST) or os.path.basename(f) != f or "\0" in f:
                bad(f"{where_}.file", "a file name inside the store directory", f)
            if not is_int(part.get("length")) or part["length"] < 0:
                bad(f"{where_}.length", "a non-negative integer", part.get("length"))
            if not isinstance(part.get("crc32"), str):
                bad(f"{where_}.crc32", "8 hex digits", part.get("crc32"))
    if m["version"] >= 2:
        k = m.get("shard_sequences")
        if not is_int(k) or k < 1:
            bad("shard_sequences", "an integer >= 1", k)
        want = len(shard_bounds(m["num_sequences"], k)) - 1
        for name in SHARDED_ARRAYS:
            if name in arrays and len(arrays[name].get("shards", [None])) != want:
                bad(f"arrays.{name}.shards", f"{want} shards ({m['num_sequences']} rows, {k} per shard)",
                    len(arrays[name].get("shards", [None])))
    if "tokens" in arrays:
        info = np.iinfo(np.dtype(arrays["tokens"]["dtype"]))
        if m["pad_id"] > info.max:
            bad("pad_id", f"in [0, {info.max}] for {arrays['tokens']['dtype']} tokens", m["pad_id"])


_REOPEN = ("; the files of an open store must not change: write the new store elsewhere (or let "
           "mlmix.write_store replace it, which swaps the directory atomically) and open it again")


def _file_crc32(path: str, size_hint: int) -> tuple[int, int, os.stat_result]:
    """(CRC-32, bytes read, fstat) of the file at ``path``, read with read() rather than through a
    mapping, so a file truncated meanwhile gives a short count, not SIGBUS."""
    crc, got = 0, 0
    buf = bytearray(min(1 << 24, size_hint + 1))
    with builtins.open(path, "rb", buffering=0) as f:
        st = os.fstat(f.fileno())
        while True:
            k = f.readinto(buf)
            if not k:
                break
            crc = zlib.crc32(memoryview(buf)[:k], crc)
            got += k
    return crc, got, st


BUILD_SUMMARY = "build.json"  # marks the output directory of mlmix build, whose store is in store/
_STORE_LOOKS_LIKE = (f"a store is a directory holding {MANIFEST} and the .bin arrays it lists (tokens.bin, "
                     "row_offsets.bin, ...), as mlmix.write_store writes it; the output directory of mlmix build "
                     "holds one in store/")


def _store_dir(path: str) -> str:
    """The store directory ``path`` names: ``path`` itself, or ``path/store`` when ``path`` is the output
    directory of ``mlmix build`` (it holds build.json and store/, and no manifest of its own)."""
    if not os.path.isdir(path):
        if os.path.isfile(path):
            hint = (f" (the store is probably its directory {os.path.dirname(os.path.abspath(path))!r})"
                    if os.path.basename(path) == MANIFEST or path.endswith(".bin") else "")
            raise FileNotFoundError(f"no packed store at {path!r}: it is a file, not a directory; "
                                    f"{_STORE_LOOKS_LIKE}{hint}")
        raise FileNotFoundError(f"no packed store at {path!r}: not a directory")
    if os.path.lexists(os.path.join(path, MANIFEST)):
        return path
    inner = os.path.join(path, "store")
    if os.path.isfile(os.path.join(path, BUILD_SUMMARY)):
        if os.path.isdir(inner):
            return inner
        raise StoreError(f"{path!r} is the output of mlmix build ({BUILD_SUMMARY}) but holds no store/ directory")
    if os.path.isfile(os.path.join(inner, MANIFEST)):
        raise StoreError(f"{path!r} is not an mlmix packed store: {MANIFEST} is missing; it holds one in "
                         f"{inner!r}: open that")
    raise StoreError(f"{path!r} is not an mlmix packed store: {MANIFEST} is missing ({_STORE_LOOKS_LIKE})")


# A file's timestamps have a granularity (a clock tick, ~1-10 ms, or a whole second on some file
# systems), so a rewrite within the same tick as the last write before opening keeps the mtime. A file
# whose mtime is that close to the time it was opened is "racy" (as git calls it): while it is, each
# check compares its bytes with the manifest's checksum instead of trusting the timestamps.
_RACY_NS = 50_000_000  # sub-second timestamps: well above a clock tick
_RACY_COARSE_NS = 2_500_000_000  # timestamps in whole seconds (ext3, FAT's 2 s, some network file systems)


def _is_racy(mtime_ns: int, now_ns: int) -> bool:
    window = _RACY_COARSE_NS if mtime_ns % 1_000_000_000 == 0 else _RACY_NS
    return -window < now_ns - mtime_ns < window


def _stat_key(st: os.stat_result) -> tuple:
    return (st.st_size, st.st_ino, st.st_dev, st.st_mtime_ns, st.st_ctime_ns)


class _WatchedFile:
    """A mapped file of a store and what it was when mapped (size, inode, device, mtime, ctime, from the
    fstat of the descriptor that was mapped), so that a change under an open store is found before a
    read: the mapping of a truncated file raises SIGBUS on the pages past its new end."""

    __slots__ = ("file", "path", "crc32", "key", "racy", "mapping", "mapped_size")

    def __init__(self, file: str, path: str, crc32: str, st: os.stat_result) -> None:
        self.file, self.path, self.crc32 = file, path, crc32
        self.key = _stat_key(st)
        self.racy = _is_racy(st.st_mtime_ns, time.time_ns())
        self.mapping = None  # the mmap.mmap (None for an empty file): its size() is the mapped file's
        self.mapped_size = st.st_size  # bytes mapped; fixed, whatever key later says (see Store.watch_from)


class Store:
    """A packed store opened read-only; arrays are memory-mapped.

    ``len(store)`` is the number of rows (sequences); ``store[i]`` is row i as a dict (see
    :meth:`batch`, without the leading batch axis). Metadata: ``seq_len``, ``num_tokens``,
    ``num_examples``, ``languages`` (list of codes; ``lang_ids`` index it), ``efficiency``, ``manifest``,
    ``vocab_fingerprint`` (the writing tokenizer's, see :meth:`check_tokenizer`; None if not recorded).

    ``path`` is the store's directory, or the output directory of ``mlmix build`` (which holds
    ``build.json`` and the store in ``store/``; ``store.path`` is then that ``store/``).

    A store's files must not change while it is open. Every read (:meth:`batch`, ``store[i]``,
    :meth:`array`) first compares the files it reads with what they were when mapped
    (:meth:`check_unchanged`): a file truncated, grown or deleted raises StoreError, whatever
    ``verify``; with ``verify=True`` so does a file replaced (renamed over) or rewritten in place whose
    bytes no longer match the manifest's checksum.
    """

    def __init__(self, path, *, verify: bool = True) -> None:
        self.path = _store_dir(os.fspath(path))
        self.verify = bool(verify)  # also: a replaced or rewritten file is found (see check_unchanged)
        mpath = os.path.join(self.path, MANIFEST)
        if not os.path.isfile(mpath):
            raise StoreError(f"{self.path!r} is not an mlmix packed store: {MANIFEST} is missing "
                             f"({_STORE_LOOKS_LIKE})")
        try:
            with builtins.open(mpath, "rb") as f:
                raw = f.read()
            m = json.loads(raw)
        except (OSError, ValueError) as exc:
            raise StoreError(f"{mpath!r} is not a readable JSON manifest: {exc}") from None
        if not isinstance(m, dict) or m.get("format") != FORMAT:
            raise StoreError(f"{self.path!r} is not an mlmix packed store (format {m.get('format') if isinstance(m, dict) else None!r})")
        if m.get("version") not in READ_VERSIONS or isinstance(m.get("version"), bool):
            raise StoreError(
                f"{self.path!r} is packed-store format version {m.get('version')!r}; this mlmix reads version "
                f"{' and '.join(map(str, READ_VERSIONS))}"
            )
        _check_manifest_crc(raw, m, mpath)
        _check_manifest_fields(m, self.path)
        self.manifest = m
        self.seq_len = int(m["seq_len"])
        self.pad_id = int(m["pad_id"])
        self.num_tokens = int(m["num_tokens"])
        self.num_examples = int(m["num_examples"])
        self.efficiency = float(m["efficiency"])
        self.languages: list[str] = list(m["languages"])
        self.vocab_fingerprint: dict | None = dict(m["tokenizer"]) if "tokenizer" in m else None
        self._arrays: dict[str, np.ndarray] = {}
        self._shards: dict[str, list[np.ndarray]] = {}  # per-token arrays kept in several files
        self._watched: dict[str, _WatchedFile] = {}  # every mapped file, by file name
        self._watch_index: list[_WatchedFile] = []  # the files every read uses (all but the shard files)
        self._watch_shard: list[list[_WatchedFile]] = []  # per shard, its files (sharded stores)
        self._watch_array: dict[str, list[_WatchedFile]] = {}  # per array, its files
        for name, spec in m["arrays"].items():
            if "shards" in spec:
                dtype = spec["dtype"]
                self._shards[name] = [self._map(name, dict(x, dtype=dtype), verify) for x in spec["shards"]]
                for k, x in enumerate(spec["shards"]):
                    if len(self._watch_shard) <= k:
                        self._watch_shard.append([])
                    self._watch_shard[k].append(self._watched[x["file"]])
                self._arrays[name] = ShardedArray(self._shards[name])
                if self._arrays[name].shape[0] != spec["length"]:
                    raise StoreError(f"{self.path!r}: the shards of {name!r} hold {self._arrays[name].shape[0]} "
                                     f"entries, the manifest says {spec['length']}")
            else:
                self._arrays[name] = self._map(name, spec, verify)
                self._watch_index.append(self._watched[spec["file"]])
        a = self._arrays
        rows, segs = int(m["num_sequences"]), int(m["num_segments"])
        expect = {"row_offsets": rows + 1, "seg_offsets": rows + 1, "seg_lens": segs, "seg_starts": segs,
                  "seg_example": segs, "tokens": self.num_tokens}
        if m["has_loss_mask"]:
            expect["loss_mask"] = self.num_tokens
        for name, n in expect.items():
            if name not in a or a[name].shape[0] != n:
                raise StoreError(f"{self.path!r}: array {name!r} should hold {n} entries per the manifest")
        if a["row_offsets"][0] != 0 or a["row_offsets"][-1] != self.num_tokens or a["seg_offsets"][-1] != segs:
            raise StoreError(f"{self.path!r}: row or segment offsets do not match the manifest totals")
        self._rows = rows
        # shard k holds rows [bounds[k], bounds[k+1]): its files hold exactly those rows' tokens
        self._bounds = np.asarray(shard_bounds(rows, int(m.get("shard_sequences", max(rows, 1)))), dtype=np.int64)
        if self._shards:
            starts = a["row_offsets"][self._bounds]
            for name, parts in self._shards.items():
                if not np.array_equal(np.diff(starts), [len(p) for p in parts]):
                    raise StoreError(f"{self.path!r}: the shards of {name!r} do not hold the rows the offsets give them")

    def check_tokenizer(self, tokenizer) -> None:
        """Raise ValueError unless ``tokenizer``'s ids ``[0, num_ids)`` mean the same tokens as those of the
        tokenizer that wrote this store (see :func:`mlmix.tokenize.vocab_fingerprint`; a tokenizer with
        more ids, appended after them, passes). ``tokenizer``: anything vocab_fingerprint takes, or its
        result. A store written without ``tokenizer=`` records no fingerprint and raises as well."""
        have = self.vocab_fingerprint
        if have is None:
            raise ValueError(f"tokenizer: the store at {self.path!r} does not record which tokenizer wrote it "
                             "(written by write_store without tokenizer=), so it cannot be checked; rebuild it, or "
                             "check the ids against the model with vocab_size=")
        if isinstance(tokenizer, dict):
            given = _check_vocab_record(tokenizer, "tokenizer")
            if given["num_ids"] != have["num_ids"]:
                raise ValueError(f"tokenizer: a fingerprint over {given['num_ids']} ids cannot be compared with the "
                                 f"store's over {have['num_ids']}; pass the tokenizer itself")
        else:
            from ._vocab import fingerprint_vocab, vocab_of

            vocab = vocab_of(tokenizer)
            n = max(vocab, default=-1) + 1
            if n < have["num_ids"]:
                raise ValueError(f"tokenizer: it has {n} ids, the tokenizer that wrote the store at {self.path!r} had "
                                 f"{have['num_ids']}: the store was tokenized for another model")
            given = fingerprint_vocab(vocab, have["num_ids"])
        if given["vocab_sha256"] != have["vocab_sha256"]:
            raise ValueError(
                f"tokenizer: its ids [0, {have['num_ids']}) stand for other tokens than those of the tokenizer "
                f"that wrote the store at {self.path!r} (vocabulary sha256 {given['vocab_sha256'][:16]}..., the "
                f"store's {have['vocab_sha256'][:16]}...): the store was tokenized for another model")

    def _map(self, name: str, spec: dict, verify: bool) -> np.ndarray:
        fpath = os.path.join(self.path, spec["file"])
        dtype = np.dtype(spec["dtype"])
        if sys.byteorder != "little":  # files are little-endian
            dtype = dtype.newbyteorder("<")
        n = int(spec["length"])
        if not os.path.isfile(fpath):
            raise StoreError(f"{self.path!r} is incomplete: {spec['file']} is missing")
        try:  # O_NONBLOCK: a FIFO put in the file's place must not hang the open
            fd = os.open(fpath, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
        except OSError as exc:
            raise StoreError(f"{self.path!r}: cannot open {spec['file']}: {exc.strerror}") from None
        with builtins.open(fd, "rb") as f:
            st = os.fstat(fd)  # the file mapped below, whatever happens to the path meanwhile
            if not stat.S_ISREG(st.st_mode):
                raise StoreError(f"{self.path!r} is incomplete: {spec['file']} is missing (not a regular file)")
            size = st.st_size
            if size != n * dtype.itemsize:
                raise StoreError(
                    f"{self.path!r}: {spec['file']} has {size} bytes, the manifest expects {n * dtype.itemsize} "
                    f"(truncated or overwritten)"
                )
            watched = _WatchedFile(spec["file"], fpath, spec["crc32"], st)
            arr = np.memmap(f, dtype=dtype, mode="r", shape=(n,)) if n else np.zeros(0, dtype=dtype)
            watched.mapping = getattr(arr, "_mmap", None)
        self._watched[spec["file"]] = watched
        self._watch_array.setdefault(name, []).append(watched)
        if verify:
            crc = 0
            step = 1 << 24
            raw = arr.view(np.uint8) if n else arr
            for lo in range(0, raw.shape[0], step):
                crc = zlib.crc32(memoryview(np.ascontiguousarray(raw[lo : lo + step])), crc)
                drop_mapped_pages(arr)  # the pages just checked leave RSS: memory stays bounded for any size
            if f"{crc:08x}" != spec["crc32"]:
                raise StoreError(
                    f"{self.path!r}: checksum mismatch in {spec['file']} (crc32 {crc:08x}, manifest {spec['crc32']}): "
                    f"the store is corrupted"
                )
        return np.asarray(arr)

    def check_unchanged(self, rows: Sequence[int] | np.ndarray | None = None) -> None:
        """Raise StoreError if a file of the store changed since it was opened; called before every read.

        A store's arrays are memory-mapped: reading a page of a file truncated under the mapping kills the
        process with SIGBUS, and a file rewritten in place shows its new bytes. This compares each file's
        ``stat`` (size, inode, mtime, ctime) with what it was when mapped, a few microseconds per file:

        - truncated, grown or deleted: StoreError, whatever ``verify`` (the SIGBUS case);
        - with ``verify=True``, also replaced (another file renamed over it) or rewritten in place: its
          bytes are checksummed once and compared with the manifest; a match (a ``touch``, an identical
          copy) is accepted, a mismatch raises StoreError. ``verify=False`` trusts files whose size is
          unchanged (a replaced file is not read: the mapping keeps the old one; one rewritten in place
          is read as it now is).

        ``rows``: check only the files these rows are read from (the index arrays and the rows' shards);
        None: every file. A change during a read, after this check, cannot be caught (docs/bad-input.md).
        """
        if rows is None or not self._watch_shard:
            files = self._watch_index if rows is not None else list(self._watched.values())
        else:
            last = self.num_shards - 1  # rows out of range are clipped here and refused by the read
            found = np.searchsorted(self._bounds, np.asarray(rows, dtype=np.int64).reshape(-1), side="right") - 1
            shards = sorted({min(max(k, 0), last) for k in found.tolist()})
            files = self._watch_index + [w for k in shards for w in self._watch_shard[k]]
        for w in files:  # the fast path inline: one stat per file, most of the cost
            try:
                st = os.stat(w.path)
            except OSError as exc:
                self._stat_failed(w, exc)
            if (st.st_size, st.st_ino, st.st_dev, st.st_mtime_ns, st.st_ctime_ns) != w.key or w.racy:
                self._check_changed(w, st)

    def _check_one(self, w: _WatchedFile) -> None:
        try:
            st = os.stat(w.path)
        except OSError as exc:
            self._stat_failed(w, exc)
        if _stat_key(st) != w.key or w.racy:
            self._check_changed(w, st)

    def _stat_failed(self, w: _WatchedFile, exc: OSError) -> NoReturn:
        if isinstance(exc, FileNotFoundError):
            raise StoreError(f"{self.path!r}: {w.file} was deleted after the store was opened{_REOPEN}") from None
        raise StoreError(f"{self.path!r}: {w.file} cannot be read any more ({exc.strerror}){_REOPEN}") from None

    def _check_changed(self, w: _WatchedFile, st: os.stat_result) -> None:
        """The slow path of :meth:`check_unchanged`, for a file whose stat changed (or is racy)."""
        size, ino, dev = w.key[:3]
        replaced = (st.st_ino, st.st_dev) != (ino, dev)
        if replaced and w.mapping is not None:
            # the path is another file now; reads depend on the size of the file still mapped
            try:
                mapped = w.mapping.size()
            except (OSError, ValueError):
                mapped = w.mapped_size
            if mapped < w.mapped_size:
                raise StoreError(f"{self.path!r}: {w.file} was replaced, and the file still mapped was truncated "
                                 f"from {w.mapped_size} to {mapped} bytes{_REOPEN}")
        if st.st_size != size:
            what = (f"replaced by another file of {st.st_size} bytes (it had {size})" if replaced else
                    f"truncated from {size} to {st.st_size} bytes" if st.st_size < size else
                    f"grown from {size} to {st.st_size} bytes")
            raise StoreError(f"{self.path!r}: {w.file} was {what} after the store was opened{_REOPEN}")
        if not self.verify:
            return
        now = time.time_ns()
        try:
            crc, got, st2 = _file_crc32(w.path, size)
        except OSError as exc:
            raise StoreError(f"{self.path!r}: {w.file} cannot be read any more ({exc.strerror}){_REOPEN}") from None
        if got != size:
            raise StoreError(f"{self.path!r}: {w.file} was {'truncated' if got < size else 'grown'} from {size} to "
                             f"{got} bytes after the store was opened{_REOPEN}")
        if f"{crc:08x}" != w.crc32:
            what = "replaced by another file" if replaced else "rewritten in place"
            raise StoreError(f"{self.path!r}: {w.file} was {what} after the store was opened (crc32 {crc:08x}, "
                             f"manifest {w.crc32}){_REOPEN}")
        w.key = _stat_key(st2)  # the same bytes (a touch, an identical copy): watch the file as it is now
        w.racy = _is_racy(st2.st_mtime_ns, now)

    def watch_state(self) -> dict[str, tuple]:
        """What each file was when this store opened it (picklable, opaque), for :meth:`watch_from` in
        another process that re-opens the same store (a loader's worker)."""
        return {name: (w.key, w.racy) for name, w in self._watched.items()}

    def watch_from(self, state: dict[str, tuple], verify: bool) -> None:
        """Check against another Store's view of the same files (``state``, its :meth:`watch_state`)
        instead of what they were when this one mapped them, now and on every later read: a loader
        worker re-opens the store without checksums and still finds a file changed since the loader
        opened it. ``verify`` replaces this store's own (see the class docstring)."""
        self.verify = bool(verify)
        for name, (key, racy) in state.items():
            w = self._watched.get(name)
            if w is not None:
                w.key, w.racy = tuple(key), bool(racy)
        self.check_unchanged()

    def __len__(self) -> int:
        return self._rows

    def __repr__(self) -> str:
        return (f"Store({self.path!r}, sequences={self._rows}, seq_len={self.seq_len}, tokens={self.num_tokens}, "
                f"efficiency={self.efficiency:.4f}, languages={self.languages})")

    def __getitem__(self, i) -> dict:
        if isinstance(i, bool) or not isinstance(i, (int, np.integer)):
            raise TypeError(f"store index must be an int, got {type(i).__name__}")
        n = self._rows
        if not -n <= int(i) < n:
            raise IndexError(f"row {int(i)} is out of range for a store of {n} rows")
        i = int(i) % n
        out = self.batch(np.array([i]))
        row = {k: out[k][0] for k in ("input_ids", "labels", "position_ids")}
        a = self._arrays
        lo, hi = int(a["seg_offsets"][i]), int(a["seg_offsets"][i + 1])
        lens = np.asarray(a["seg_lens"][lo:hi])
        real = int(lens.sum())
        cu = np.zeros(hi - lo + 1 + (real < self.seq_len), dtype=np.int32)
        np.cumsum(lens, out=cu[1 : hi - lo + 1])
        cu[-1] = self.seq_len
        row.update(cu_seqlens=cu, seq_lens=lens.astype(np.int32), example=np.array(a["seg_example"][lo:hi]),
                   num_tokens=real)
        if "seg_lang" in a:
            row["lang_ids"] = np.array(a["seg_lang"][lo:hi])
        return row

    def batch(self, rows: Sequence[int] | np.ndarray, *, threads: int = 1) -> dict:
        """Rows stacked into (B, seq_len) arrays: input_ids (token dtype), labels (int64, -100 on masked
        tokens, padding and each segment's first token), position_ids (int32), num_tokens (int32 (B,)).

        Reads only the selected rows (O(B x seq_len)); ``threads`` workers split the rows (default 1:
        dataloader workers are processes already). Raises IndexError for a row out of range.
        """
        from ._core_loader import core

        idx = np.asarray(rows)
        if idx.dtype.kind not in "iu" or idx.ndim != 1:
            raise TypeError(f"rows must be a 1-D integer array, got dtype {idx.dtype}, shape {idx.shape}")
        idx = np.ascontiguousarray(idx, dtype=np.int64)
        self.check_unchanged(idx)
        a = self._arrays
        suffix = {"uint32": "u32", "int32": "i32", "int64": "i64"}[a["tokens"].dtype.name]
        if self._shards:
            tokens, mask, row_offsets, seg_offsets, seg_lens, idx = self._gather_rows(idx)
        else:
            tokens, mask, row_offsets, seg_offsets, seg_lens = (
                a["tokens"], a.get("loss_mask"), a["row_offsets"], a["seg_offsets"], a["seg_lens"])
        ids, labels, pos = getattr(core, f"_store_rows_{suffix}")(
            tokens, mask, row_offsets, seg_offsets, seg_lens, idx, self.seq_len, self.pad_id, threads,
        )
        num_tokens = np.diff(row_offsets)[idx].astype(np.int32) if self._shards else (
            a["row_offsets"][idx + 1] - a["row_offsets"][idx]).astype(np.int32)
        return {"input_ids": ids, "labels": labels, "position_ids": pos, "num_tokens": num_tokens}

    def _gather_rows(self, idx: np.ndarray) -> tuple:
        """The rows ``idx`` of a sharded store as a compact store of B rows (their tokens, mask, offsets
        and segment lengths copied out: O(B x seq_len)), and the row numbers 0..B-1 to read from it."""
        a = self._arrays
        n = self._rows
        if idx.size and (idx.min() < 0 or idx.max() >= n):
            bad = int(idx[(idx < 0) | (idx >= n)][0])
            raise IndexError(f"row {bad} is out of range for a store of {n} rows")
        t0, t1 = a["row_offsets"][idx], a["row_offsets"][idx + 1]
        s0, s1 = a["seg_offsets"][idx], a["seg_offsets"][idx + 1]
        row_offsets = np.zeros(idx.size + 1, dtype=np.int64)
        np.cumsum(t1 - t0, out=row_offsets[1:])
        seg_offsets = np.zeros(idx.size + 1, dtype=np.int64)
        np.cumsum(s1 - s0, out=seg_offsets[1:])
        seg_lens = np.concatenate([a["seg_lens"][lo:hi] for lo, hi in zip(s0.tolist(), s1.tolist())]) if idx.size \
            else np.zeros(0, np.int32)
        tokens = a["tokens"].take_ranges(t0, t1)
        mask = a["loss_mask"].take_ranges(t0, t1) if "loss_mask" in a else None
        return tokens, mask, row_offsets, seg_offsets, np.ascontiguousarray(seg_lens), np.arange(idx.size, dtype=np.int64)

    def array(self, name: str) -> np.ndarray:
        """A raw memory-mapped array of the store (see docs/store-format.md); for a store of several
        shards, ``tokens`` and ``loss_mask`` are :class:`ShardedArray` views over the shard files.

        Its files are checked (:meth:`check_unchanged`) now, not at each later access: a loader that
        keeps the array calls ``check_unchanged(rows)`` before each batch, as mlmix's does."""
        arr = self._arrays[name]
        for w in self._watch_array.get(name, ()):
            self._check_one(w)
        return arr

    @property
    def num_shards(self) -> int:
        return len(self._bounds) - 1

    def shard_rows(self, shard: int) -> tuple[int, int]:
        """Rows ``[lo, hi)`` held by shard ``shard`` (a dataloader can keep each worker on one shard)."""
        if not 0 <= shard < self.num_shards:
            raise IndexError(f"shard {shard} is out of range for a store of {self.num_shards} shard(s)")
        return int(self._bounds[shard]), int(self._bounds[shard + 1])


class ShardedArray:
    """A read-only 1-D view of several memory-mapped shard files end to end, without copying them.

    Supports ``len``, ``shape``, ``dtype``, ``nbytes``, integer indexing and step-1 slices: a slice
    inside one shard is a memory-mapped view, one across shards a copy. ``np.asarray`` copies the whole
    array. The store's rows never cross a shard, so a row's tokens are always one view.
    """

    def __init__(self, parts: list[np.ndarray]) -> None:
        self._parts = parts
        self.dtype = parts[0].dtype
        self._starts = np.zeros(len(parts) + 1, dtype=np.int64)
        np.cumsum([len(p) for p in parts], out=self._starts[1:])
        self.shape = (int(self._starts[-1]),)
        self.ndim = 1
        self.nbytes = self.shape[0] * self.dtype.itemsize

    def __len__(self) -> int:
        return self.shape[0]

    def __repr__(self) -> str:
        return f"ShardedArray(length={self.shape[0]}, dtype={self.dtype}, shards={len(self._parts)})"

    def _locate(self, i: int) -> int:
        return int(np.searchsorted(self._starts, i, side="right")) - 1

    def __getitem__(self, key):
        n = self.shape[0]
        if isinstance(key, (int, np.integer)) and not isinstance(key, bool):
            i = int(key) + n if key < 0 else int(key)
            if not 0 <= i < n:
                raise IndexError(f"index {int(key)} is out of range for length {n}")
            k = self._locate(i)
            return self._parts[k][i - self._starts[k]]
        if isinstance(key, slice):
            lo, hi, step = key.indices(n)
            if step != 1:
                raise IndexError(f"a ShardedArray takes slices of step 1, got step {step}")
            hi = max(lo, hi)
            k = self._locate(lo) if lo < n else len(self._parts) - 1
            if hi <= self._starts[k + 1]:
                base = int(self._starts[k])
                return self._parts[k][lo - base : hi - base]
            return self.take_ranges(np.array([lo]), np.array([hi]))
        raise TypeError(f"a ShardedArray takes an int or a slice, got {type(key).__name__}")

    def take_ranges(self, starts: np.ndarray, stops: np.ndarray) -> np.ndarray:
        """The ranges ``[starts[i], stops[i])`` end to end, as one new array."""
        out = np.empty(int((np.asarray(stops) - np.asarray(starts)).sum()), dtype=self.dtype)
        pos = 0
        for lo, hi in zip(np.asarray(starts).tolist(), np.asarray(stops).tolist()):
            while lo < hi:
                k = self._locate(lo)
                base = int(self._starts[k])
                end = min(hi, int(self._starts[k + 1]))
                out[pos : pos + end - lo] = self._parts[k][lo - base : end - base]
                pos += end - lo
                lo = end
        return out

    def __array__(self, dtype=None, copy=None):
        out = self.take_ranges(np.array([0]), np.array([self.shape[0]]))
        return out if dtype is None else out.astype(dtype)


def open(path, *, verify: bool = True) -> Store:  # noqa: A001 - the public name is mlmix.open
    """Open a packed store read-only.

    ``verify=True`` (default) checks every file's CRC-32 against the manifest (reads the whole store
    once, ~1-2 GB/s); ``verify=False`` only checks the manifest, the version and each file's exact
    size (instant; use it in dataloader workers after one verified open). Both raise StoreError
    (a ValueError) on a truncated, corrupted or foreign store.
    """
    return Store(path, verify=verify)
