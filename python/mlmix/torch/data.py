"""Training batches from packed sequences: deterministic, resumable, elastic and distributed.

:class:`PackedDataset` reads a packed store (``mlmix.write_store``; memory-mapped, nothing loaded up
front) and yields ready batches; :class:`PackedIterableDataset` packs a tokenized stream on the fly
with a bounded window. Both are ``torch.utils.data.IterableDataset`` objects that make their own
batches: use them with ``torch.utils.data.DataLoader(ds, batch_size=None, ...)`` or, to checkpoint
the exact position while workers prefetch, with :class:`DataLoader`.

The order of samples (rows) is a function of (seed, epoch) only. One *step* is ``batch_size x
world_size`` consecutive rows of that global order; rank r takes ``batch_size`` of them, chosen to
balance real tokens across ranks; DataLoader worker w builds the steps w, w + W, ... which is the
order in which torch's DataLoader returns them. A position is (epoch, rows of the global order
consumed), the same on every rank, so a checkpoint can resume with another number of workers or
ranks: the global order is unchanged, no row is skipped or repeated (see docs/loader.md).
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from typing import Any, Callable, Iterable, Iterator

import numpy as np

from .._deps import require
from .._checks import TOKEN_SUFFIX, check_mask, check_seed, check_seq_len, max_seq_len
from ..pack import StreamPacker
from ..ragged import Ragged
from ..store import Store, StoreError

torch = require("torch", "mlmix.torch")  # ImportError naming the extra when torch is missing
from torch.utils.data import IterableDataset, get_worker_info  # noqa: E402

__all__ = ["PackedDataset", "PackedIterableDataset", "DataLoader", "LAYOUTS", "LANGUAGE_MODES", "STATE_VERSION"]

LAYOUTS = ("padded", "flat")
LANGUAGE_MODES = ("token", "segment", None)
STATE_VERSION = 1
_U64 = np.uint64


# --- helpers -----------------------------------------------------------------------------------------------
def _mix64(z: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser over a uint64 array (wraps mod 2**64; arrays, never scalars, so numpy does
    not warn on the intended overflow)."""
    z = (z ^ (z >> _U64(30))) * _U64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> _U64(27))) * _U64(0x94D049BB133111EB)
    return z ^ (z >> _U64(31))


def _key(*parts: int) -> np.ndarray:
    """A uint64 (1,) key mixed from non-negative ints (seed, epoch, window, ...)."""
    k = np.zeros(1, dtype=np.uint64)
    for p in parts:
        k = _mix64(k ^ np.array([p % 2**64], dtype=np.uint64) + _U64(0x9E3779B97F4A7C15))
    return k


def _permutation(n: int, *key_parts: int) -> np.ndarray:
    """int64 permutation of range(n) that depends only on (n, key_parts): rows sorted by a hash of their
    index, so it is the same on every platform, numpy version and process."""
    keys = _mix64(np.arange(n, dtype=np.uint64) + _key(*key_parts))
    return np.argsort(keys, kind="stable").astype(np.int64, copy=False)


def _check_positive_int(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or int(value) < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return int(value)


def _check_pad_in_vocab(pad_id: int, vocab_size: int | None) -> None:
    if vocab_size is not None and pad_id >= vocab_size:
        raise ValueError(f"vocab_size={vocab_size}: the padding id {pad_id} is outside [0, {vocab_size}) "
                         "(the data was tokenized with a different tokenizer than the model's?)")


def _resolve_rank(rank, world_size) -> tuple[int, int]:
    """(rank, world_size) from the arguments, else torch.distributed, else env RANK / WORLD_SIZE, else (0, 1)."""
    if (rank is None) != (world_size is None):
        raise ValueError(f"give both rank and world_size or neither, got rank={rank!r}, world_size={world_size!r}")
    if rank is None:
        dist = torch.distributed
        if dist.is_available() and dist.is_initialized():
            rank, world_size = dist.get_rank(), dist.get_world_size()
        else:
            env_rank, env_world = os.environ.get("RANK"), os.environ.get("WORLD_SIZE")
            try:
                rank = int(env_rank) if env_rank is not None else 0
                world_size = int(env_world) if env_world is not None else 1
            except ValueError:
                raise ValueError(
                    f"environment RANK / WORLD_SIZE must be integers, got RANK={env_rank!r}, WORLD_SIZE={env_world!r}"
                ) from None
    world_size = _check_positive_int(world_size, "world_size")
    if isinstance(rank, bool) or not isinstance(rank, (int, np.integer)) or not 0 <= int(rank) < world_size:
        raise ValueError(f"rank must be an int in [0, {world_size}) for world_size={world_size}, got {rank!r}")
    return int(rank), world_size


def _rank_share(row_tokens: np.ndarray, world_size: int, rank: int) -> np.ndarray:
    """Positions (sorted) of the rows of one step that ``rank`` takes.

    Rows are dealt by decreasing real-token count in a snake order (0..W-1, W-1..0, ...), so every rank
    gets the same number of rows (+-1 in a final partial step) and nearly the same number of tokens.
    """
    m = row_tokens.shape[0]
    if world_size == 1:
        return np.arange(m, dtype=np.int64)
    by_size = np.argsort(-row_tokens, kind="stable")
    i = np.arange(m, dtype=np.int64)
    j = i % world_size
    owner = np.where((i // world_size) % 2 == 0, j, world_size - 1 - j)
    return np.sort(by_size[owner == rank])


def _heap_alloc(shape, dtype: torch.dtype) -> torch.Tensor:
    return torch.empty(shape, dtype=dtype)


class _Ring:
    """A ring of batch slots in one shared-memory buffer, written by a DataLoader worker.

    torch sends each tensor a worker returns through a new shared-memory segment, which costs
    milliseconds per batch; instead a worker builds its batches straight into the slots of one buffer
    sent once, and the main process (:class:`DataLoader`) copies each batch out when it is returned.
    A slot is reused only after ``slots`` more batches, more than torch lets a worker run ahead.
    """

    def __init__(self, slot_bytes: int, slots: int) -> None:
        self.slot_bytes = -(-slot_bytes // 64) * 64
        self.slots = slots
        self.buffer = torch.empty(self.slot_bytes * slots, dtype=torch.uint8).share_memory_()
        self.token = int.from_bytes(os.urandom(8), "little")
        self.sent = False
        self._next = 0
        self._used = 0
        self._base = 0

    def begin(self) -> None:
        self._base = (self._next % self.slots) * self.slot_bytes
        self._next += 1
        self._used = 0

    def alloc(self, shape, dtype: torch.dtype) -> torch.Tensor:
        itemsize = torch.empty(0, dtype=dtype).element_size()
        n = int(np.prod(shape)) * itemsize
        lo = self._base + self._used
        if self._used + n > self.slot_bytes:
            raise RuntimeError("batch larger than its ring slot (internal error)")
        self._used += -(-n // 8) * 8
        return self.buffer[lo : lo + n].view(dtype).view(shape)

    def message(self, batch: dict) -> "_RingBatch":
        specs, extras = {}, {}
        for key, value in batch.items():
            if isinstance(value, torch.Tensor) and value.untyped_storage().data_ptr() == self.buffer.untyped_storage().data_ptr():
                off = value.storage_offset() * value.element_size() - self._base
                specs[key] = (value.dtype, tuple(value.shape), off)
            else:
                extras[key] = value
        msg = _RingBatch(self.token, None if self.sent else self.buffer, self._base, self._used, specs, extras)
        self.sent = True
        return msg


class _RingBatch:
    """What a worker returns for one batch in ring mode (no tensors but, once, the ring itself); it has
    no ``pin_memory`` method, so torch's pin-memory thread passes it through untouched."""

    __slots__ = ("token", "ring", "base", "used", "specs", "extras")

    def __init__(self, token, ring, base, used, specs, extras) -> None:
        self.token, self.ring, self.base, self.used, self.specs, self.extras = token, ring, base, used, specs, extras

    def unpack(self, rings: dict, pin: bool) -> dict:
        if self.ring is not None:
            rings[self.token] = self.ring
        ring = rings[self.token]
        block = torch.empty(self.used, dtype=torch.uint8, pin_memory=pin)
        # numpy's copy: several times faster than Tensor.copy_ for one flat byte block
        np.copyto(block.numpy(), ring.numpy()[self.base : self.base + self.used])
        out = {}
        for key, value in self.extras.items():
            out[key] = torch.from_numpy(value) if isinstance(value, np.ndarray) else value
        for key, (dtype, shape, off) in self.specs.items():
            n = int(np.prod(shape)) * torch.empty(0, dtype=dtype).element_size()
            out[key] = block[off : off + n].view(dtype).view(shape)
        return out


class _Rows:
    """Packed rows as flat arrays (the store's layout, see docs/store-format.md): a store, or a window
    of the on-the-fly packer."""

    __slots__ = ("tokens", "loss_mask", "row_offsets", "seg_offsets", "seg_lens", "seg_lang")

    def __init__(self, tokens, loss_mask, row_offsets, seg_offsets, seg_lens, seg_lang) -> None:
        self.tokens, self.loss_mask = tokens, loss_mask
        self.row_offsets, self.seg_offsets = row_offsets, seg_offsets
        self.seg_lens, self.seg_lang = seg_lens, seg_lang

    @property
    def num_rows(self) -> int:
        return int(self.row_offsets.shape[0] - 1)

    def row_tokens(self, rows: np.ndarray) -> np.ndarray:
        return self.row_offsets[rows + 1] - self.row_offsets[rows]

    def slice(self, lo: int, hi: int) -> "_Rows":
        """Rows [lo, hi), offsets re-based to 0."""
        t0, t1 = int(self.row_offsets[lo]), int(self.row_offsets[hi])
        s0, s1 = int(self.seg_offsets[lo]), int(self.seg_offsets[hi])
        return _Rows(self.tokens[t0:t1], None if self.loss_mask is None else self.loss_mask[t0:t1],
                     self.row_offsets[lo : hi + 1] - t0, self.seg_offsets[lo : hi + 1] - s0, self.seg_lens[s0:s1],
                     None if self.seg_lang is None else self.seg_lang[s0:s1])

    @staticmethod
    def concat(parts: list["_Rows"]) -> "_Rows":
        if len(parts) == 1:
            return parts[0]

        def offsets(name: str) -> np.ndarray:
            out, base = [np.zeros(1, dtype=np.int64)], 0
            for p in parts:
                o = getattr(p, name)
                out.append(o[1:] + base)
                base += int(o[-1])
            return np.concatenate(out)

        def cat(name: str):
            arrs = [getattr(p, name) for p in parts]
            return None if arrs[0] is None else np.concatenate(arrs)

        return _Rows(cat("tokens"), cat("loss_mask"), offsets("row_offsets"), offsets("seg_offsets"),
                     cat("seg_lens"), cat("seg_lang"))


class _BatchBuilder:
    """Turns rows of a :class:`_Rows` into a batch dict of torch tensors."""

    def __init__(self, *, seq_len: int, pad_id: int, layout: str, languages: str | None, attention_mask: bool,
                 num_languages: int, vocab_size: int | None = None) -> None:
        self.seq_len, self.pad_id, self.layout = seq_len, pad_id, layout
        self.vocab_size = vocab_size
        self.languages, self.attention_mask = languages, attention_mask
        self.lang_dtype = torch.int16 if num_languages < 2**15 else torch.int32
        self._arange = np.zeros(0, dtype=np.int64)

    def _iota(self, n: int) -> np.ndarray:
        if self._arange.shape[0] < n:
            self._arange = np.arange(max(n, 2 * self._arange.shape[0]), dtype=np.int64)
        return self._arange[:n]

    def _check_vocab(self, values: np.ndarray, rows: np.ndarray, row_lengths: np.ndarray) -> None:
        """Token ids outside [0, vocab_size) mean the store was tokenized for another model: raise at the
        batch, before an embedding lookup turns them into an index error or a device-side assert."""
        lo, hi = int(values.min()), int(values.max())
        if lo >= 0 and hi < self.vocab_size:
            return
        k = int(np.flatnonzero((values < 0) | (values >= self.vocab_size))[0])
        row = int(rows[int(np.searchsorted(np.cumsum(row_lengths), k, side="right"))])
        bad = int(values[k])
        raise ValueError(
            f"vocab_size={self.vocab_size}: row {row} holds token id {bad}, outside [0, {self.vocab_size}); "
            "the data was tokenized with a different tokenizer than the model's (or vocab_size is wrong)")

    def slot_bytes(self, batch_size: int) -> int:
        """Bytes of ring slot one batch of ``batch_size`` rows may need."""
        per_token = 3 * 8 + 4 + (4 if self.languages == "token" else 0) + (8 if self.attention_mask else 0)
        return batch_size * self.seq_len * per_token + 64 * 4

    def build(self, src: _Rows, rows: np.ndarray, *, alloc: Callable = _heap_alloc,
              small: Callable = torch.from_numpy) -> dict[str, Any]:
        """The batch of ``rows`` of ``src``; ``alloc(shape, dtype)`` gives the per-token tensors' memory,
        ``small`` converts the small numpy arrays (cu_seq_lens, per-segment languages)."""
        rows = np.asarray(rows, dtype=np.int64)
        b, L = rows.shape[0], self.seq_len
        t0 = src.row_offsets[rows]
        n = src.row_offsets[rows + 1] - t0
        s0 = src.seg_offsets[rows]
        n_seg = src.seg_offsets[rows + 1] - s0
        seg_idx = _ranges(s0, s0 + n_seg)
        seg_len = src.seg_lens[seg_idx].astype(np.int64)
        padded = self.layout == "padded"
        if padded:
            base = np.arange(b, dtype=np.int64) * L
            total = b * L
        else:
            base = np.zeros(b, dtype=np.int64)
            np.cumsum(n[:-1], out=base[1:])
            total = int(n.sum())
        # flat start of every real segment: its row's base + the lengths of the earlier segments of the row
        seg_cum = np.zeros(seg_len.shape[0] + 1, dtype=np.int64)
        np.cumsum(seg_len, out=seg_cum[1:])
        first_seg = np.zeros(b, dtype=np.int64)
        np.cumsum(n_seg[:-1], out=first_seg[1:])
        seg_start = seg_cum[:-1] + np.repeat(base - seg_cum[first_seg], n_seg)
        # cu_seq_lens covers every flat token: in the padded layout each row's padding tail is one more segment
        has_tail = (n < L) if padded else np.zeros(b, dtype=bool)
        starts = np.concatenate([seg_start, (base + n)[has_tail]])
        order = np.argsort(starts, kind="stable")
        cu = np.empty(starts.shape[0] + 1, dtype=np.int32)
        cu[:-1] = starts[order]
        cu[-1] = total
        piece_len = np.diff(cu).astype(np.int64)

        # The pack module's C++ kernel writes ids, labels and positions in one pass over the rows' real
        # tokens (gathered first: each row's tokens are one contiguous slice of the store). The flat
        # layout is one row of `total` tokens holding every segment.
        tok, mask = src.tokens, src.loss_mask
        if b == 1:
            values = np.ascontiguousarray(tok[int(t0[0]) : int(t0[0] + n[0])])
            mvals = None if mask is None else np.ascontiguousarray(mask[int(t0[0]) : int(t0[0] + n[0])])
        else:
            values = np.concatenate([tok[a : a + k] for a, k in zip(t0.tolist(), n.tolist())])
            mvals = None if mask is None else np.concatenate([mask[a : a + k] for a, k in zip(t0.tolist(), n.tolist())])
        if self.vocab_size is not None and values.size:
            self._check_vocab(values, rows, n)
        row_start = np.zeros(b + 1, dtype=np.int64)
        np.cumsum(n, out=row_start[1:])
        seg_row = np.repeat(np.arange(b, dtype=np.int64), n_seg)
        seg_in_row = (seg_cum[:-1] - seg_cum[first_seg][seg_row]).astype(np.int32)
        if padded:
            kernel_rows = np.zeros(b + 1, dtype=np.int64)
            np.cumsum(n_seg, out=kernel_rows[1:])
        else:
            kernel_rows = np.array([0, seg_len.shape[0]], dtype=np.int64)
        suffix = TOKEN_SUFFIX.get(values.dtype)
        if suffix is None:
            raise TypeError(f"store tokens must be uint32, int32 or int64, got {values.dtype}")
        from .._core_loader import core

        ids_k, labels_k, pos_k = getattr(core, f"_materialize_{suffix}")(
            values, row_start, mvals, seg_row, seg_in_row, seg_len.astype(np.int32), kernel_rows,
            L if padded else max(total, 2), self.pad_id, 1)
        shape = (b, L) if padded else (1, total)
        if alloc is _heap_alloc:  # zero-copy where the kernel's dtype is already the one wanted
            out_ids = torch.from_numpy(ids_k.astype(np.int64, copy=False))
            out_labels = torch.from_numpy(labels_k)
            out_pos = torch.from_numpy(pos_k.astype(np.int64))
        else:
            buf = alloc((3, total), torch.int64)
            ids, labels, pos = buf.numpy()
            np.copyto(ids, ids_k.reshape(-1)[:total])
            np.copyto(labels, labels_k.reshape(-1)[:total])
            np.copyto(pos, pos_k.reshape(-1)[:total])
            out_ids, out_labels, out_pos = buf[0], buf[1], buf[2]
        if not padded and total < 2:  # the kernel's rows hold at least 2 tokens
            out_ids, out_labels, out_pos = (t.reshape(-1)[:total] for t in (out_ids, out_labels, out_pos))
        cu_t = small(cu)
        max_len = int(piece_len.max()) if piece_len.size else 0
        out: dict[str, Any] = {
            "input_ids": out_ids.view(shape),
            "labels": out_labels.view(shape),
            "position_ids": out_pos.view(shape),
            "cu_seq_lens_q": cu_t,
            "cu_seq_lens_k": cu_t,
            "max_length_q": max_len,
            "max_length_k": max_len,
            # a model's default config (use_cache=True) would create a cache, and transformers then ignores
            # the example boundaries in position_ids: examples in a row would attend to each other
            "use_cache": False,
        }
        if not padded:  # the example each token belongs to, numbered in the batch (hybrid / linear attention)
            seq_idx = alloc(shape, torch.int32)
            seq_idx.numpy().reshape(-1)[:] = np.repeat(np.arange(piece_len.shape[0], dtype=np.int32), piece_len)
            out["seq_idx"] = seq_idx
        if self.languages is not None and src.seg_lang is not None:
            seg_lang = src.seg_lang[seg_idx]
            if self.languages == "token":
                lang = alloc(shape, self.lang_dtype)
                dst = lang.numpy().reshape(-1)
                piece_lang = np.concatenate([seg_lang.astype(dst.dtype), np.full(int(has_tail.sum()), -1, dst.dtype)])
                dst[:] = np.repeat(piece_lang[order], piece_len)
                out["lang_ids"] = lang
            else:
                out["lang_ids"] = small(seg_lang.astype(np.int32 if self.lang_dtype == torch.int32 else np.int16))
                out["seq_lens"] = small(seg_len.astype(np.int32))
        if self.attention_mask and padded:
            am = alloc(shape, torch.int64)
            am.numpy()[:] = self._iota(L)[None, :] < n[:, None]
            out["attention_mask"] = am
        return out


def _check_layout(layout, languages, attention_mask) -> None:
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    if languages not in LANGUAGE_MODES:
        raise ValueError(f"languages must be one of {LANGUAGE_MODES}, got {languages!r}")
    if attention_mask and layout != "padded":
        raise ValueError("attention_mask=True needs layout='padded' (the flat layout has no padding)")


def _check_flat_size(layout: str, batch_size: int, seq_len: int) -> None:
    limit = max_seq_len()
    if layout == "flat" and batch_size * seq_len > limit:
        raise ValueError(f"layout='flat' holds at most {limit} tokens per batch; batch_size x seq_len = "
                         f"{batch_size} x {seq_len} is more (use fewer rows per batch or layout='padded')")


class _BatchStream(IterableDataset):
    """Shared logic: position (epoch, rows consumed) in shared memory, state_dict, steps and shares."""

    _kind = ""

    def _init_common(self, *, batch_size, seed, shuffle, rank, world_size, layout, drop_last, languages,
                     attention_mask, vocab_size=None) -> None:
        self.batch_size = _check_positive_int(batch_size, "batch_size")
        self.vocab_size = None if vocab_size is None else _check_positive_int(vocab_size, "vocab_size")
        self.seed = check_seed(seed)
        if self.seed is None:
            raise TypeError("seed must be an int (it fixes the order of every epoch), got None")
        self.shuffle, self.drop_last = bool(shuffle), bool(drop_last)
        _check_layout(layout, languages, attention_mask)
        self.layout, self.attention_mask = layout, bool(attention_mask)
        self.rank, self.world_size = _resolve_rank(rank, world_size)
        # (epoch, rows of the epoch's global order consumed); in shared memory so that persistent
        # DataLoader workers see set_epoch / load_state_dict made in the main process.
        self._cursor = torch.zeros(2, dtype=torch.int64).share_memory_()
        self._loader_owned = False  # set by mlmix.torch.DataLoader, which then moves the cursor itself
        self._ring_slots = 0  # > 0: workers hand batches over through a shared ring (set by DataLoader)
        # the position a mlmix DataLoader has handed out in this process; workers read only the cursor,
        # which the loader writes before a pass starts (never during one: workers start at different times)
        self._live: tuple[int, int] | None = None

    def _position(self) -> tuple[int, int]:
        if self._live is not None:
            return self._live
        epoch, consumed = self._cursor.tolist()
        return int(epoch), int(consumed)

    def _set_position(self, epoch: int, consumed: int) -> None:
        self._cursor.copy_(torch.tensor([epoch, consumed]))
        self._live = None

    # --- position ------------------------------------------------------------------------------------------
    @property
    def step_rows(self) -> int:
        """Rows of the global order consumed by one step of all ranks (batch_size x world_size)."""
        return self.batch_size * self.world_size

    @property
    def epoch(self) -> int:
        return self._position()[0]

    def set_epoch(self, epoch: int) -> None:
        """Start epoch ``epoch`` from its beginning (no-op if it is the current epoch, so that a resumed
        position survives the ``set_epoch`` calls of the HF Trainer / accelerate)."""
        if isinstance(epoch, bool) or not isinstance(epoch, (int, np.integer)) or int(epoch) < 0:
            raise ValueError(f"epoch must be a non-negative int, got {epoch!r}")
        if int(epoch) != self.epoch:
            self._set_position(int(epoch), 0)

    def _fingerprint(self) -> dict:
        raise NotImplementedError

    def state_dict(self) -> dict:
        """The position: epoch and rows of its global order consumed, plus what identifies the data.

        Exact when the dataset is iterated in this process (directly, or by a torch DataLoader with
        num_workers=0) or through :class:`DataLoader`; with a plain torch DataLoader with workers, use
        :meth:`DataLoader.state_dict` instead (the workers prefetch, this object cannot know).
        """
        epoch, consumed = self._position()
        return {"format": f"mlmix.torch.{self._kind}", "version": STATE_VERSION, "fingerprint": self._fingerprint(),
                "epoch": epoch, "samples_consumed": consumed, "batch_size": self.batch_size,
                "world_size": self.world_size, "layout": self.layout}

    def load_state_dict(self, state: dict) -> None:
        """Resume at a position from :meth:`state_dict` (also one saved with another number of workers,
        ranks or batch size: the global order is the same). Raises ValueError if it was saved for other
        data, seed or shuffle setting."""
        if not isinstance(state, dict):
            raise TypeError(f"state must be a dict from state_dict(), got {type(state).__name__}")
        want = f"mlmix.torch.{self._kind}"
        if state.get("format") != want:
            raise ValueError(f"state is not a {want} state_dict (format {state.get('format')!r})")
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"state_dict version {state.get('version')!r} is not supported (this mlmix: {STATE_VERSION})")
        mine, theirs = self._fingerprint(), state.get("fingerprint")
        if theirs != mine:
            diff = sorted(k for k in set(mine) | set(theirs or {}) if (theirs or {}).get(k) != mine.get(k))
            raise ValueError(
                f"state_dict was saved for another dataset or seed: {', '.join(diff)} differ "
                f"(saved {[(theirs or {}).get(k) for k in diff]!r}, this dataset {[mine.get(k) for k in diff]!r})"
            )
        epoch, consumed = state.get("epoch"), state.get("samples_consumed")
        for name, v in (("epoch", epoch), ("samples_consumed", consumed)):
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 0:
                raise ValueError(f"state_dict[{name!r}] must be a non-negative int, got {v!r}")
        self._check_consumed(int(consumed))
        self._set_position(int(epoch), int(consumed))

    def _check_consumed(self, consumed: int) -> None:
        pass

    def _ring(self, builder: "_BatchBuilder", in_worker: bool) -> _Ring | None:
        if not in_worker or not self._ring_slots:
            return None
        return _Ring(builder.slot_bytes(self.batch_size), self._ring_slots)

    @staticmethod
    def _emit(builder: "_BatchBuilder", src: "_Rows", rows: np.ndarray, ring: _Ring | None):
        if ring is None:
            return builder.build(src, rows)
        ring.begin()
        return ring.message(builder.build(src, rows, alloc=ring.alloc, small=lambda a: a))

    def _worker(self) -> tuple[int, int, bool]:
        info = get_worker_info()
        if info is None:
            return 0, 1, False
        return info.id, info.num_workers, True


class PackedDataset(_BatchStream):
    """Batches of packed rows read from a packed store, for one rank.

    Args:
        path: a store written by :func:`mlmix.write_store` (or an opened :class:`mlmix.store.Store`), or
            the output directory of ``mlmix build``, whose store (``OUTPUT/store``) is then opened.
        batch_size: rows per batch on this rank.
        seed: fixes the order of every epoch (order = a hash permutation of the rows keyed by (seed, epoch)).
        shuffle: False keeps the store's row order in every epoch.
        rank, world_size: this process's share; default from torch.distributed if initialised, else env
            RANK / WORLD_SIZE, else (0, 1).
        layout: ``"padded"``: tensors (batch_size, seq_len); ``"flat"``: (1, real tokens), no padding
            (what ``DataCollatorWithFlattening`` gives; use with flash-attention / position_ids).
        drop_last: drop the last step of an epoch if it has fewer than batch_size x world_size rows.
            Otherwise it is split over the ranks (row counts differ by at most one); if it has fewer rows
            than there are ranks it is dropped so that every rank makes the same number of steps. A
            store too small to give any rank a batch (fewer rows than ranks; with drop_last, than one
            step) warns (UserWarning) when the dataset is made.
        languages: None (default): batches hold model inputs only, so ``model(**batch)`` passes nothing a
            strict ``forward`` refuses; ``"token"``: ``lang_ids`` shaped like input_ids (int16, -1 on
            padding); ``"segment"``: ``lang_ids`` and ``seq_lens`` per example piece in batch order (pop them
            before calling the model). ``dataset.languages`` is the table they index.
        attention_mask: add a (batch_size, seq_len) int64 padding mask (padded layout only). Leave it off
            for packed rows: with a 2-D mask transformers no longer separates examples by position_ids.
        verify: check the store's CRC-32 checksums on open (worker processes re-open without). Before
            each batch the store's files are compared with what they were when opened: one truncated,
            grown or deleted raises StoreError at that batch whatever ``verify``; with ``verify=True`` so
            does one replaced or rewritten in place (see :meth:`mlmix.store.Store.check_unchanged`). For an
            opened Store, its own ``verify`` applies.
        vocab_size: the model's vocabulary size. Given, every batch's token ids are checked against it (a
            ValueError names the row and the id), so that a store tokenized for another model fails at its
            first batch with a clear message rather than inside the embedding; None checks nothing.
        tokenizer: the model's tokenizer (an mlmix or HF ``tokenizers``/transformers tokenizer, or a path to
            its tokenizer.json). Given, it is checked on open against the vocabulary fingerprint the store
            records (:meth:`mlmix.store.Store.check_tokenizer`): a ValueError if its ids mean other tokens than
            those of the tokenizer that wrote the store, which ``vocab_size`` alone cannot tell when the two
            vocabularies have the same size.

    Each batch is a dict of torch tensors: ``input_ids``, ``labels`` (-100 = ignored: masked tokens,
    padding and the first token of every example), ``position_ids`` (restarting at 0 per example, 0 on
    padding), all int64; ``cu_seq_lens_q`` / ``cu_seq_lens_k`` (int32, cumulative lengths over the
    flattened batch; in the padded layout each padding tail is one more piece), ``max_length_q`` /
    ``max_length_k`` (int), ``use_cache=False`` (so that ``model(**batch)`` under a model's default config
    keeps the examples apart), and in the flat layout ``seq_idx`` (int32, the example of each token,
    as TRL's padding-free collator gives); optional ``lang_ids``, ``seq_lens``, ``attention_mask``.
    """

    _kind = "PackedDataset"

    def __init__(self, path, *, batch_size: int, seed: int = 0, shuffle: bool = True, rank: int | None = None,
                 world_size: int | None = None, layout: str = "padded", drop_last: bool = False,
                 languages: str | None = None, attention_mask: bool = False, verify: bool = True,
                 vocab_size: int | None = None, tokenizer=None) -> None:
        self._init_common(batch_size=batch_size, seed=seed, shuffle=shuffle, rank=rank, world_size=world_size,
                          layout=layout, drop_last=drop_last, languages=languages, attention_mask=attention_mask,
                          vocab_size=vocab_size)
        store = path if isinstance(path, Store) else Store(path, verify=verify)
        if tokenizer is not None:
            store.check_tokenizer(tokenizer)
        self.path = store.path
        self.verify = store.verify
        self._store: Store | None = store
        self._watch: dict | None = None  # the store's files as this dataset opened them (for re-opens)
        m = store.manifest
        self.seq_len, self.pad_id, self.languages = store.seq_len, store.pad_id, list(store.languages)
        _check_pad_in_vocab(self.pad_id, self.vocab_size)
        self.num_samples = len(store)
        self.num_tokens = store.num_tokens
        self._store_hash = hashlib.sha256(json.dumps(
            {"seq_len": m["seq_len"], "pad_id": m["pad_id"], "num_sequences": m["num_sequences"],
             "arrays": {k: [v["length"], v["crc32"]] for k, v in sorted(m["arrays"].items())}},
            sort_keys=True).encode()).hexdigest()[:16]
        _check_flat_size(layout, self.batch_size, self.seq_len)
        self._builder = _BatchBuilder(seq_len=self.seq_len, pad_id=self.pad_id, layout=layout,
                                      languages=languages if self.languages else None,
                                      attention_mask=attention_mask, num_languages=len(self.languages),
                                      vocab_size=self.vocab_size)
        self._rows_cache: _Rows | None = None
        self._order_cache: tuple[int, np.ndarray] | None = None
        if self.num_samples and not len(self):
            warnings.warn(_empty_epoch_message(self.path, self.num_samples, self.batch_size, self.world_size,
                                               self.drop_last), UserWarning, stacklevel=2)

    # --- pickling (DataLoader workers): re-open the memory maps instead of copying them -----------------
    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        if self._store is not None:
            state["_watch"] = self._store.watch_state()
        state["_store"] = None
        state["_rows_cache"] = None
        state["_order_cache"] = None
        return state

    def _rows(self) -> _Rows:
        if self._rows_cache is None:
            if self._store is None:
                store = Store(self.path, verify=False)
                m = store.manifest
                now = {k: [v["length"], v["crc32"]] for k, v in sorted(m["arrays"].items())}
                if store.seq_len != self.seq_len or len(store) != self.num_samples or hashlib.sha256(json.dumps(
                        {"seq_len": m["seq_len"], "pad_id": m["pad_id"], "num_sequences": m["num_sequences"],
                         "arrays": now}, sort_keys=True).encode()).hexdigest()[:16] != self._store_hash:
                    raise StoreError(f"the store at {self.path!r} changed after the dataset was created: its "
                                     "manifest.json describes other data (rows, seq_len or array checksums differ)")
                if self._watch is not None:  # a file changed since the dataset opened it raises here
                    store.watch_from(self._watch, self.verify)
                self._store = store
            a = self._store.array
            names = self._store.manifest["arrays"]
            self._rows_cache = _Rows(a("tokens"), a("loss_mask") if "loss_mask" in names else None,
                                     a("row_offsets"), a("seg_offsets"), a("seg_lens"),
                                     a("seg_lang") if "seg_lang" in names else None)
        return self._rows_cache

    def _fingerprint(self) -> dict:
        return {"store": self._store_hash, "num_samples": self.num_samples, "seed": self.seed, "shuffle": self.shuffle}

    def _check_consumed(self, consumed: int) -> None:
        if consumed > self.num_samples:
            raise ValueError(f"state_dict['samples_consumed'] must be in [0, {self.num_samples}], got {consumed}")

    # --- order and steps ---------------------------------------------------------------------------------
    def order(self, epoch: int) -> np.ndarray:
        """int64 (num_samples,): the global order of the store's rows in ``epoch`` (the same for every rank)."""
        if self._order_cache is None or self._order_cache[0] != epoch:
            if self.shuffle:
                perm = _permutation(self.num_samples, self.seed, epoch)
            else:
                perm = np.arange(self.num_samples, dtype=np.int64)
            self._order_cache = (epoch, perm)
        return self._order_cache[1]

    def _num_steps(self, start: int) -> int:
        """len(self._steps(start)), without building the list."""
        g, w = self.step_rows, self.world_size
        full, tail = divmod(self.num_samples - start, g)
        return full + (1 if tail and not self.drop_last and tail >= w else 0)

    def _steps(self, start: int) -> list[tuple[int, int]]:
        """[lo, hi) ranges of the global order, one per step, from position ``start``."""
        g, w = self.step_rows, self.world_size
        rem = self.num_samples - start
        steps = [(start + k * g, start + (k + 1) * g) for k in range(rem // g)]
        tail = rem % g
        if tail and not self.drop_last and tail >= w:
            steps.append((self.num_samples - tail, self.num_samples))
        return steps

    def __len__(self) -> int:
        """Batches per epoch on this rank (from the start of an epoch)."""
        return self._num_steps(0)

    def rank_rows(self, epoch: int, step: int, start: int = 0) -> np.ndarray:
        """Store rows (int64) of this rank's batch ``step`` of ``epoch`` counted from position ``start``."""
        lo, hi = self._steps(start)[step]
        rows = self.order(epoch)[lo:hi]
        src = self._rows()
        self._store.check_unchanged(rows)
        return rows[_rank_share(src.row_tokens(rows), self.world_size, self.rank)]

    def __iter__(self) -> Iterator[dict]:
        epoch, start = (int(x) for x in self._cursor.tolist())
        wid, nw, in_worker = self._worker()
        src, order, steps = self._rows(), self.order(epoch), self._steps(start)
        ring = self._ring(self._builder, in_worker)
        track = not in_worker and not self._loader_owned
        tag = self._loader_owned  # mlmix's DataLoader wants each batch's end position with it
        store = self._store
        for k in range(wid, len(steps), nw):
            lo, hi = steps[k]
            rows = order[lo:hi]
            # a store file truncated since the last batch raises here, not SIGBUS in the reads below
            store.check_unchanged(rows)
            rows = rows[_rank_share(src.row_tokens(rows), self.world_size, self.rank)]
            batch = self._emit(self._builder, src, rows, ring)
            if track:
                self._cursor[1] = hi
            yield (hi, batch) if tag else batch
        if track:
            self._set_position(epoch + 1, 0)

    def __repr__(self) -> str:
        return (f"PackedDataset({self.path!r}, samples={self.num_samples}, seq_len={self.seq_len}, "
                f"batch_size={self.batch_size}, rank={self.rank}/{self.world_size}, layout={self.layout!r}, "
                f"seed={self.seed}, shuffle={self.shuffle})")


def _empty_epoch_message(path: str, rows: int, batch_size: int, world_size: int, drop_last: bool) -> str:
    """Why a store of ``rows`` rows gives every rank 0 batches per epoch, and what to do."""
    step = batch_size * world_size
    batches = rows // batch_size if drop_last else -(-rows // batch_size)
    have = (f"the store at {path!r} has {rows} row{'s' * (rows != 1)}, {batches} batch{'es' * (batches != 1)} of "
            f"batch_size={batch_size}, for {world_size} rank{'s' * (world_size != 1)} (world_size={world_size})")
    if not drop_last:  # rows < world_size
        return (f"{have}: every rank gets 0 batches per epoch (every rank of a step takes at least one row, and a "
                f"last step with fewer rows than ranks is dropped so that all ranks make the same number of "
                f"steps). Train on at most {rows} ranks, or on a store of at least {world_size} rows.")
    fixes = ["drop_last=False"] + ([f"batch_size={rows // world_size}"] if rows >= world_size else [])
    return (f"{have}: every rank gets 0 batches per epoch (drop_last=True keeps only full steps of batch_size x "
            f"world_size = {step} rows). Pass {' or '.join(fixes)}, use fewer ranks, or a store of at least "
            f"{step} rows.")


def _split_chunk(chunk) -> tuple[Ragged, Ragged | None, Any]:
    if isinstance(chunk, Ragged):
        return chunk, None, None
    if isinstance(chunk, tuple) and 1 <= len(chunk) <= 3:
        tokens = chunk[0]
        mask = chunk[1] if len(chunk) > 1 else None
        langs = chunk[2] if len(chunk) > 2 else None
        if not isinstance(tokens, Ragged) or not (mask is None or isinstance(mask, Ragged)):
            raise TypeError("each chunk must be a Ragged of tokens or a tuple (tokens Ragged, loss_mask Ragged or None"
                            f"[, langs]), got a tuple of {[type(c).__name__ for c in chunk]}")
        return tokens, mask, langs
    raise TypeError(f"each chunk must be a Ragged or a tuple (tokens, loss_mask[, langs]), got {type(chunk).__name__}")


class PackedIterableDataset(_BatchStream):
    """Batches packed on the fly from a stream of tokenized chunks, with bounded memory.

    Args:
        source: a callable returning a fresh iterator of chunks (called once per epoch in each DataLoader
            worker), or a re-iterable collection (a list) of chunks. A chunk is a Ragged of token ids, or
            a tuple ``(tokens, loss_mask)`` or ``(tokens, loss_mask, langs)`` with ``loss_mask`` a Ragged
            shaped like tokens (or None) and ``langs`` one language code per example.
        seq_len, window, strategy, overlong: as :class:`mlmix.pack.StreamPacker` (memory: about ``window``
            pending examples plus one step of rows).
        The other arguments are those of :class:`PackedDataset`.

    Order: the packer (seeded by (seed, epoch) when shuffling) emits rows window by window; each
    window's rows are shuffled by (seed, epoch, window index); that row stream is the global order,
    cut into steps and shared by ranks and workers exactly as in :class:`PackedDataset`.

    Limits: every rank and worker reads and plans the whole stream and materialises only its own
    rows (planning is cheap next to materialising, but reading the source is repeated); resuming
    re-reads and re-plans the consumed part of the epoch (without materialising it); the fingerprint
    covers the packing settings, not the stream's contents, so a changed source is not detected.
    """

    _kind = "PackedIterableDataset"

    def __init__(self, source: Callable[[], Iterable] | Iterable, *, seq_len: int, batch_size: int, seed: int = 0,
                 shuffle: bool = True, window: int = 65_536, strategy: str = "bfd", overlong: str = "error",
                 rank: int | None = None, world_size: int | None = None, layout: str = "padded",
                 drop_last: bool = False, languages: str | None = None, attention_mask: bool = False,
                 pad_id: int = 0, vocab_size: int | None = None) -> None:
        self._init_common(batch_size=batch_size, seed=seed, shuffle=shuffle, rank=rank, world_size=world_size,
                          layout=layout, drop_last=drop_last, languages=languages, attention_mask=attention_mask,
                          vocab_size=vocab_size)
        if not callable(source):
            if not isinstance(source, Iterable) or iter(source) is source:
                raise TypeError(
                    "source must be a callable returning an iterator of chunks, or a re-iterable collection of "
                    f"chunks (it is read once per epoch and per worker); got a one-shot {type(source).__name__}"
                )
        self.source = source
        self.seq_len = check_seq_len(seq_len)
        StreamPacker(self.seq_len, window=window, strategy=strategy, overlong=overlong)  # validates the settings
        _check_flat_size(layout, self.batch_size, self.seq_len)
        self.window, self.strategy, self.overlong = int(window), strategy, overlong
        if isinstance(pad_id, bool) or not isinstance(pad_id, (int, np.integer)) or pad_id < 0:
            raise ValueError(f"pad_id must be a non-negative int, got {pad_id!r}")
        self.pad_id = int(pad_id)
        _check_pad_in_vocab(self.pad_id, self.vocab_size)
        self._languages_mode = languages
        self.languages: list[str] = []  # filled in order of appearance while iterating (in this process)

    def _fingerprint(self) -> dict:
        return {"seq_len": self.seq_len, "seed": self.seed, "shuffle": self.shuffle, "window": self.window,
                "strategy": self.strategy, "overlong": self.overlong}

    def _chunks(self) -> Iterator:
        return iter(self.source() if callable(self.source) else self.source)

    def __iter__(self) -> Iterator[dict]:
        epoch, start = (int(x) for x in self._cursor.tolist())
        wid, nw, in_worker = self._worker()
        g, w = self.step_rows, self.world_size
        track = not in_worker and not self._loader_owned
        tag = self._loader_owned  # mlmix's DataLoader wants each batch's end position with it
        packer = StreamPacker(self.seq_len, window=self.window, strategy=self.strategy, overlong=self.overlong,
                              seed=int(_key(self.seed, epoch)[0]) if self.shuffle else None)
        table: dict[str, int] = {}
        lang_of_example: list[np.ndarray] = []
        has_langs: list[bool] = []
        builder = _BatchBuilder(seq_len=self.seq_len, pad_id=self.pad_id, layout=self.layout,
                                languages=self._languages_mode, attention_mask=self.attention_mask,
                                num_languages=2**15 - 1, vocab_size=self.vocab_size)
        ring = self._ring(builder, in_worker)
        pending: list[_Rows] = []  # my workers' rows not yet built, in global order
        pending_first = start + wid * g  # global index of this worker's next step's first row
        emitted = 0  # rows of the global order produced so far
        window_idx = 0

        def take(plan, toks: Ragged, mask: Ragged | None, ids: np.ndarray) -> None:
            nonlocal emitted, window_idx
            m = plan.num_sequences
            perm = _permutation(m, self.seed, epoch, window_idx) if self.shuffle else np.arange(m, dtype=np.int64)
            window_idx += 1
            glob = emitted + np.arange(m, dtype=np.int64)
            emitted += m
            keep = (glob >= start) & (((glob - start) // g) % nw == wid)
            if not keep.any():
                return
            sub = plan.take(perm[keep])
            values, offsets = toks.values, toks.offsets
            row_offsets = np.zeros(sub.num_sequences + 1, dtype=np.int64)
            np.cumsum(sub.row_tokens, out=row_offsets[1:])
            seg_lang = None
            if has_langs and has_langs[0]:
                if len(lang_of_example) > 1:
                    lang_of_example[:] = [np.concatenate(lang_of_example)]
                seg_lang = lang_of_example[0][ids[sub.seg_example]]
            mask_bytes = None if mask is None else sub.gather(check_mask(mask, offsets), offsets)
            pending.append(_Rows(sub.gather(values, offsets), mask_bytes, row_offsets, sub.row_offsets, sub.seg_len,
                                 seg_lang))

        def ready(final: bool) -> Iterator[dict]:
            nonlocal pending_first, pending
            # pending holds only this worker's steps, in global order: the step starting at
            # pending_first, then the one g * nw rows later, ...; the last of an epoch may be short
            while pending:
                if emitted < pending_first + g and not final:
                    return
                rows = _Rows.concat(pending)
                n_take = min(g, rows.num_rows)
                step_src = rows.slice(0, n_take)
                pending = [rows.slice(n_take, rows.num_rows)] if n_take < rows.num_rows else []
                lo = pending_first
                pending_first += g * nw
                if n_take < g and (self.drop_last or n_take < w):
                    return
                share = _rank_share(step_src.row_tokens(np.arange(n_take, dtype=np.int64)), w, self.rank)
                batch = self._emit(builder, step_src, share, ring)
                if track:
                    self._cursor[1] = lo + n_take
                yield (lo + n_take, batch) if tag else batch

        for chunk in self._chunks():
            tokens, mask, langs = _split_chunk(chunk)
            if not has_langs:
                has_langs.append(langs is not None)
            elif has_langs[0] != (langs is not None):
                raise ValueError("langs must be given for every chunk or for none")
            if langs is not None:
                codes = list(langs)
                if len(codes) != len(tokens):
                    raise ValueError(f"langs must have one code per example ({len(tokens)}), got {len(codes)}")
                idx = np.empty(len(codes), dtype=np.uint16)
                for i, c in enumerate(codes):
                    if not isinstance(c, str):
                        raise TypeError(f"langs must be strings (language codes), got {c!r}")
                    idx[i] = table.setdefault(c, len(table))
                    if len(table) > 2**15 - 1:
                        raise ValueError("langs may hold at most 32767 distinct codes (lang_ids are int16)")
                lang_of_example.append(idx)
            for out in packer.push(tokens, mask):
                take(*out)
                yield from ready(False)
        for out in packer.flush():
            take(*out)
        yield from ready(True)
        if not in_worker:
            self.languages = list(table)
        if track:
            self._set_position(epoch + 1, 0)


def _identity(batch):
    return batch


class DataLoader(torch.utils.data.DataLoader):
    """``torch.utils.data.DataLoader`` for mlmix datasets, with an exact ``state_dict()``.

    Workers prefetch batches, so the dataset cannot know how many reached the training loop; this
    loader counts the batches it has handed out and keeps the dataset's position (epoch, rows
    consumed) up to date, so ``state_dict()`` taken between two steps resumes exactly after the last
    batch returned. A finished pass moves on to the next epoch. All torch DataLoader arguments work
    (num_workers, pin_memory, prefetch_factor, persistent_workers, ...) except ``batch_size``,
    ``sampler`` and ``batch_sampler``: the dataset makes its own batches.
    """

    def __init__(self, dataset: _BatchStream, **kwargs) -> None:
        if not isinstance(dataset, _BatchStream):
            raise TypeError(f"dataset must be a mlmix PackedDataset or PackedIterableDataset, got {type(dataset).__name__}")
        for name in ("batch_size", "sampler", "batch_sampler"):
            if kwargs.get(name) is not None:
                raise ValueError(f"{name} must not be given: the dataset makes its own batches "
                                 f"(batch_size is an argument of the dataset), got {name}={kwargs[name]!r}")
            kwargs.pop(name, None)
        if kwargs.get("in_order", True) is not True:
            raise ValueError("in_order must be True: batches are returned in their deterministic order")
        self._user_collate = kwargs.pop("collate_fn", None)
        super().__init__(dataset, batch_size=None, collate_fn=_identity, **kwargs)
        # more slots than batches torch lets be in flight (prefetch_factor per worker, all workers)
        self._ring_slots = (self.prefetch_factor or 2) * self.num_workers + 2 if self.num_workers > 0 else 0

    def __iter__(self) -> Iterator[dict]:
        ds: _BatchStream = self.dataset
        epoch, start = ds._position()
        ds._set_position(epoch, start)  # what this pass's workers start from
        ds._live = (epoch, start)
        rings: dict[int, torch.Tensor] = {}
        pin = bool(self.pin_memory) and torch.cuda.is_available()
        # the flags reach the worker copies made now; another DataLoader over the same dataset (e.g.
        # accelerate's skip_first_batches) later gets plain batches and leaves the position alone
        ds._ring_slots, ds._loader_owned = self._ring_slots, True
        try:
            it = super().__iter__()
        finally:
            ds._ring_slots = 0
        try:
            # each item is (end, batch): the position after the batch, computed where it was built. A
            # count of batches times the step size would overshoot after a short last step of the
            # on-the-fly dataset, whose epoch length is unknown until it has been packed.
            for end, item in it:
                batch = item.unpack(rings, pin) if isinstance(item, _RingBatch) else item
                if self._user_collate is not None:
                    batch = self._user_collate(batch)
                ds._live = (epoch, int(end))
                yield batch
        finally:
            ds._loader_owned = False
        ds._set_position(epoch + 1, 0)

    def set_epoch(self, epoch: int) -> None:
        self.dataset.set_epoch(epoch)

    def state_dict(self) -> dict:
        """The position after the last batch returned (see :meth:`PackedDataset.state_dict`)."""
        return self.dataset.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.dataset.load_state_dict(state)


def _ranges(starts: np.ndarray, stops: np.ndarray) -> np.ndarray:
    """Concatenation of ``arange(start, stop)`` for each pair (int64)."""
    counts = stops - starts
    total = int(counts.sum())
    base = np.zeros(counts.size, dtype=np.int64)
    np.cumsum(counts[:-1], out=base[1:])
    return np.repeat(starts - base, counts) + np.arange(total, dtype=np.int64)
