"""Packed sequences: plan which example goes into which fixed-length row, then materialise the rows.

A plan is computed from example lengths alone (:func:`pack`), so millions of examples are planned
without their tokens; :meth:`PackPlan.materialize` later copies the tokens into rows with the C++
kernel (multithreaded over rows, GIL released, identical output for any thread count).

Strategies
    ``"bfd"``       best-fit decreasing: pieces in decreasing length, each into the open row with the
                    least room that still holds it (capacity-indexed, O(n + seq_len) after the sort).
    ``"ffd"``       first-fit decreasing: each piece into the lowest-numbered row with room (max-tree).
    ``"wrapped"``   concatenate the examples and cut every ``seq_len`` tokens (pre-training style);
                    examples are split across rows, nothing is padded but the last row.
    ``"bfd_split"`` ``"bfd"`` with ``overlong="split"``.

Over-long examples (``length > seq_len``, BFD/FFD only) follow ``overlong``: ``"error"`` (default:
ValueError naming the example), ``"truncate"`` (keep the first ``seq_len`` tokens), ``"split"``
(pieces of ``seq_len`` tokens, each its own row, plus the remainder packed like any example) or
``"drop"``. The plan counts each case.

``seed``: ``None`` keeps the input order among equal lengths (BFD/FFD) or as the concatenation order
(wrapped); an integer applies a seeded permutation of the examples first (splitmix64 Fisher-Yates, the
same on every platform), which changes which equal-length examples share a row, and for wrapped the
order of the stream.

Output dtypes (see :meth:`PackPlan.materialize`): ``input_ids`` keeps the tokens' dtype (uint32,
int32 or int64); ``labels`` int64 (what ``torch.nn.functional.cross_entropy`` takes, -100 = ignore);
``position_ids`` int32 (half the memory of int64; cast on the device if a model insists);
``cu_seqlens`` int32 (what flash-attention's varlen kernels take).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Iterator

import numpy as np

from ._checks import check_mask, check_pad, check_seed, check_seq_len, check_tokens
from .ragged import Ragged

__all__ = ["pack", "PackPlan", "StreamPacker", "STRATEGIES", "OVERLONG_POLICIES"]

STRATEGIES = ("bfd", "ffd", "wrapped", "bfd_split")
OVERLONG_POLICIES = ("error", "truncate", "split", "drop")
_INT32_MAX = 2**31 - 1


def _core():
    from ._core_loader import core

    return core


def _as_lengths(lengths) -> np.ndarray:
    if isinstance(lengths, Ragged):
        return np.ascontiguousarray(lengths.lengths, dtype=np.int64)
    arr = np.asarray(lengths)
    if arr.ndim != 1:
        raise ValueError(f"lengths must be a 1-D integer array or a Ragged, got shape {arr.shape}")
    if arr.size == 0:
        return np.zeros(0, dtype=np.int64)
    if arr.dtype.kind not in "iu":
        raise TypeError(f"lengths must be an integer array, got dtype {arr.dtype}")
    lo, hi = int(arr.min()), int(arr.max())
    if lo < 1:
        i = int(np.argmin(arr))
        raise ValueError(f"lengths must be positive, got lengths[{i}] = {lo}")
    if hi > _INT32_MAX:
        i = int(np.argmax(arr))
        raise ValueError(f"lengths must be at most {_INT32_MAX} (int32), got lengths[{i}] = {hi}")
    return np.ascontiguousarray(arr, dtype=np.int64)


def pack(lengths, seq_len: int, *, strategy: str = "bfd", overlong: str = "error", seed: int | None = None) -> "PackPlan":
    """Plan the packing of examples into rows of ``seq_len`` tokens.

    Args:
        lengths: 1-D integer array of example lengths in tokens (each in [1, 2**31 - 1]), or a Ragged
            (its ``.lengths``).
        seq_len: row length in tokens, in [2, 2**24].
        strategy: ``"bfd"`` | ``"ffd"`` | ``"wrapped"`` | ``"bfd_split"`` (see the module docstring).
        overlong: ``"error"`` | ``"truncate"`` | ``"split"`` | ``"drop"`` for examples longer than seq_len.
        seed: None, or an int in [0, 2**64) that permutes the examples before planning.

    Returns:
        A :class:`PackPlan`. Memory: about 16 bytes per piece plus 8 per example.
    """
    seq_len = check_seq_len(seq_len)
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
    if overlong not in OVERLONG_POLICIES:
        raise ValueError(f"overlong must be one of {OVERLONG_POLICIES}, got {overlong!r}")
    if strategy == "bfd_split":
        if overlong not in ("error", "split"):
            raise ValueError(f"strategy='bfd_split' always splits over-long examples; got overlong={overlong!r}")
        strategy, overlong = "bfd", "split"
    seed = check_seed(seed)
    lens = _as_lengths(lengths)
    raw = _core()._plan_pack(lens, seq_len, strategy, overlong, seed is not None, 0 if seed is None else seed)
    return PackPlan(seq_len=seq_len, strategy=strategy, lengths=lens, **raw)


@dataclass(eq=False, repr=False)
class PackPlan:
    """Which piece of which example goes where.

    Rows are made of segments: segment ``s`` is ``seg_len[s]`` tokens of example ``seg_example[s]``
    starting at its token ``seg_start[s]``; row ``r`` holds segments ``row_offsets[r]:row_offsets[r+1]``
    in order, then padding.

    Attributes:
        seq_len: row length in tokens.
        lengths: int64 (n,) the example lengths the plan was made for.
        seg_example: int64 (num_segments,); seg_start, seg_len: int32 (num_segments,).
        row_offsets: int64 (num_sequences + 1,).
        assignment: int64 (n,) row of each example's first piece, -1 if dropped.
        num_truncated, num_split, num_dropped: examples handled by the over-long policy (or split by wrapped).
        tokens_dropped: tokens lost to truncation or dropping. tokens_packed: real tokens in rows.
    """

    seq_len: int
    strategy: str
    lengths: np.ndarray
    seg_example: np.ndarray
    seg_start: np.ndarray
    seg_len: np.ndarray
    row_offsets: np.ndarray
    assignment: np.ndarray
    num_truncated: int = 0
    num_split: int = 0
    num_dropped: int = 0
    tokens_dropped: int = 0
    tokens_packed: int = 0
    _row_tokens: np.ndarray | None = field(default=None, repr=False)

    def __repr__(self) -> str:
        # the arrays hold one entry per example or segment: a summary, not millions of numbers
        extra = "".join(f", {k}={getattr(self, k):,}" for k in ("num_truncated", "num_split", "num_dropped",
                                                                 "tokens_dropped") if getattr(self, k))
        return (f"PackPlan(strategy={self.strategy!r}, seq_len={self.seq_len:,}, examples={len(self.lengths):,}, "
                f"sequences={self.num_sequences:,}, segments={self.num_segments:,}, tokens={self.tokens_packed:,}, "
                f"efficiency={self.efficiency:.2%}, lower_bound={self.lower_bound:,}{extra})")

    @property
    def num_sequences(self) -> int:
        return int(self.row_offsets.shape[0] - 1)

    @property
    def num_segments(self) -> int:
        return int(self.seg_len.shape[0])

    @property
    def efficiency(self) -> float:
        """Real tokens / (num_sequences * seq_len); 1.0 for an empty plan."""
        cap = self.num_sequences * self.seq_len
        return self.tokens_packed / cap if cap else 1.0

    @property
    def lower_bound(self) -> int:
        """ceil(tokens_packed / seq_len): no packing of these tokens uses fewer rows."""
        return -(-self.tokens_packed // self.seq_len)

    @property
    def row_tokens(self) -> np.ndarray:
        """int64 (num_sequences,) real tokens per row (the rest is padding)."""
        if self._row_tokens is None:
            csum = np.zeros(self.num_segments + 1, dtype=np.int64)
            np.cumsum(self.seg_len, out=csum[1:])
            self._row_tokens = np.diff(csum[self.row_offsets])
        return self._row_tokens

    def rows(self, start: int, stop: int) -> "PackPlan":
        """The sub-plan of rows [start, stop) (segments re-based; assignment left whole)."""
        n = self.num_sequences
        if not (0 <= start <= stop <= n):
            raise ValueError(f"rows [start, stop) must satisfy 0 <= start <= stop <= {n}, got [{start}, {stop})")
        lo, hi = int(self.row_offsets[start]), int(self.row_offsets[stop])
        sub_len = self.seg_len[lo:hi]
        return PackPlan(
            seq_len=self.seq_len, strategy=self.strategy, lengths=self.lengths,
            seg_example=self.seg_example[lo:hi], seg_start=self.seg_start[lo:hi], seg_len=sub_len,
            row_offsets=self.row_offsets[start : stop + 1] - lo, assignment=self.assignment,
            tokens_packed=int(sub_len.sum(dtype=np.int64)),
        )

    def take(self, rows) -> "PackPlan":
        """The plan of the given rows, in that order, over the same examples (``assignment`` re-made: the
        example's row in the new plan, -1 for the examples that none of ``rows`` starts).

        Args:
            rows: 1-D integer array of row indices in [0, num_sequences).
        """
        rows = np.asarray(rows)
        if rows.ndim != 1 or (rows.size and rows.dtype.kind not in "iu"):
            raise TypeError(f"rows must be a 1-D integer array, got dtype {rows.dtype}, shape {rows.shape}")
        n = self.num_sequences
        lo, hi = (int(rows.min()), int(rows.max())) if rows.size else (0, -1)
        if lo < 0 or hi >= n:
            raise IndexError(f"rows must be in [0, {n}), got {lo if lo < 0 else hi}")
        rows = rows.astype(np.int64, copy=False)
        counts = np.diff(self.row_offsets)[rows]
        row_offsets = np.zeros(rows.size + 1, dtype=np.int64)
        np.cumsum(counts, out=row_offsets[1:])
        seg = (np.repeat(self.row_offsets[rows] - row_offsets[:-1], counts)
               + np.arange(int(row_offsets[-1]), dtype=np.int64))
        seg_len = self.seg_len[seg]
        assignment = np.full(self.lengths.shape[0], -1, dtype=np.int64)
        seg_rows = np.repeat(np.arange(rows.size, dtype=np.int64), counts)
        first = self.seg_start[seg] == 0
        assignment[self.seg_example[seg][first]] = seg_rows[first]
        return PackPlan(
            seq_len=self.seq_len, strategy=self.strategy, lengths=self.lengths, seg_example=self.seg_example[seg],
            seg_start=self.seg_start[seg], seg_len=seg_len, row_offsets=row_offsets, assignment=assignment,
            tokens_packed=int(seg_len.sum(dtype=np.int64)),
        )

    def cu_seqlens(self) -> np.ndarray:
        """int32 cumulative segment lengths over the flattened (num_sequences * seq_len) tokens.

        Every real segment is one entry; each row's padding tail (if any) is one more segment, so the
        array ends at num_sequences * seq_len and row ``r`` starts at ``r * seq_len``: pass it with
        ``max_seqlen=seq_len`` to flash-attention's varlen kernels over ``input_ids.reshape(-1)``.
        """
        pad = self.seq_len - self.row_tokens
        counts = np.diff(self.row_offsets) + (pad > 0)
        lens = np.empty(int(counts.sum()), dtype=np.int64)
        starts = np.zeros(self.num_sequences + 1, dtype=np.int64)
        np.cumsum(counts, out=starts[1:])
        seg_pos = np.arange(self.num_segments, dtype=np.int64) + np.repeat(starts[:-1] - self.row_offsets[:-1], np.diff(self.row_offsets))
        lens[seg_pos] = self.seg_len
        lens[starts[1:][pad > 0] - 1] = pad[pad > 0]
        if self.num_sequences * self.seq_len > _INT32_MAX:
            raise ValueError(
                f"cu_seqlens over {self.num_sequences} rows x {self.seq_len} tokens exceeds int32; materialise fewer rows"
            )
        out = np.zeros(lens.size + 1, dtype=np.int32)
        np.cumsum(lens, out=out[1:])
        return out

    def materialize(self, tokens: Ragged, loss_mask: Ragged | None = None, pad_id: int = 0, *, threads: int = 0) -> dict:
        """Copy the tokens into padded rows.

        Args:
            tokens: Ragged of token ids (uint32, int32 or int64) with the lengths the plan was made for.
            loss_mask: optional Ragged of the same shape (bool or uint8; non-zero = compute the loss on
                that token). None means every token counts.
            pad_id: token id written after each row's real tokens.
            threads: worker threads (0: MLMIX_NUM_THREADS or all cores). Output is identical for any value.

        Returns a dict of numpy arrays (S = num_sequences, L = seq_len, G = num_segments):
            input_ids: (S, L) tokens' dtype. labels: (S, L) int64, the token id, or -100 where the mask is
            0, on padding and on the first token of each segment. position_ids: (S, L) int32, restarting at
            0 per segment, 0 on padding. cu_seqlens: int32, see :meth:`cu_seqlens`. seq_lens: int32 (G,)
            real segment lengths. segment_offsets: int64 (S + 1,) segments of each row. segment_example:
            int64 (G,) example of each segment. num_tokens: int32 (S,) real tokens per row (attention
            mask = ``arange(L) < num_tokens[:, None]``).
        """
        values, offsets, suffix = check_tokens(tokens, "tokens")
        if offsets.shape[0] - 1 != self.lengths.shape[0] or not np.array_equal(np.diff(offsets), self.lengths):
            raise ValueError(
                f"tokens must have the lengths the plan was made for ({self.lengths.shape[0]} examples); "
                f"got {offsets.shape[0] - 1} examples with other lengths"
            )
        mask = None if loss_mask is None else check_mask(loss_mask, offsets)
        pad = check_pad(pad_id, values.dtype)
        ids, labels, pos = getattr(_core(), f"_materialize_{suffix}")(
            values, offsets, mask, self.seg_example, self.seg_start, self.seg_len, self.row_offsets,
            self.seq_len, pad, int(threads),
        )
        return {
            "input_ids": ids,
            "labels": labels,
            "position_ids": pos,
            "cu_seqlens": self.cu_seqlens(),
            "seq_lens": self.seg_len.copy(),
            "segment_offsets": self.row_offsets.copy(),
            "segment_example": self.seg_example.copy(),
            "num_tokens": self.row_tokens.astype(np.int32),
        }

    def gather(self, values: np.ndarray, offsets: np.ndarray) -> np.ndarray:
        """The real tokens (or mask bytes) of all rows, in packed order, without padding (1-D)."""
        suffix = {np.dtype(np.uint32): "u32", np.dtype(np.int32): "i32", np.dtype(np.int64): "i64",
                  np.dtype(np.uint8): "u8", np.dtype(np.uint16): "u16"}.get(values.dtype)
        if suffix is None:
            raise TypeError(f"values must be uint32, int32, int64, uint8 or uint16, got {values.dtype}")
        return getattr(_core(), f"_gather_{suffix}")(
            values, offsets, self.seg_example, self.seg_start, self.seg_len, self.row_offsets
        )


class StreamPacker:
    """Pack an unbounded stream of examples with a bounded window of pending examples.

    Examples are buffered until ``window`` are pending; the window is then packed (BFD/FFD) and every
    row is emitted except the least-filled ones (rows with more than ``slack`` free tokens), whose
    examples wait for the next window, up to half the window. :meth:`flush` packs what is left.
    Memory is bounded by the window, not the stream; efficiency approaches the global one as the
    window grows (``efficiency`` reports what was reached so far).

    Each emitted batch is ``(plan, tokens, loss_mask, example_ids)``: a PackPlan over the batch's own
    Ragged ``tokens`` (and mask, or None), and int64 ``example_ids`` mapping the batch's examples to
    their index in the whole stream.
    """

    def __init__(self, seq_len: int, *, window: int = 65_536, strategy: str = "bfd", overlong: str = "error",
                 slack: int | None = None, seed: int | None = None) -> None:
        self.seq_len = check_seq_len(seq_len)
        if strategy not in ("bfd", "ffd", "bfd_split"):
            raise ValueError(f"strategy for streaming must be 'bfd', 'ffd' or 'bfd_split', got {strategy!r}")
        if isinstance(window, bool) or not isinstance(window, (int, np.integer)) or window < 2:
            raise ValueError(f"window must be an int >= 2, got {window!r}")
        if overlong not in OVERLONG_POLICIES:
            raise ValueError(f"overlong must be one of {OVERLONG_POLICIES}, got {overlong!r}")
        if strategy == "bfd_split" and overlong not in ("error", "split"):
            raise ValueError(f"strategy='bfd_split' always splits over-long examples; got overlong={overlong!r}")
        self.strategy, self.overlong, self.window = strategy, overlong, int(window)
        self.slack = max(self.seq_len // 100, 1) if slack is None else int(slack)
        self.seed = check_seed(seed)
        self._pending: list[tuple[Ragged, Ragged | None, np.ndarray]] = []
        self._pending_n = 0
        self._has_mask: bool | None = None
        self._next_id = 0
        self.rows_emitted = 0
        self.tokens_emitted = 0
        self.examples_seen = 0
        self.num_truncated = self.num_split = self.num_dropped = self.tokens_dropped = 0

    @property
    def efficiency(self) -> float:
        cap = self.rows_emitted * self.seq_len
        return self.tokens_emitted / cap if cap else 1.0

    def push(self, tokens: Ragged, loss_mask: Ragged | None = None) -> Iterator[tuple]:
        """Add a chunk of examples; yields the batches that became ready.

        Windows hold exactly ``window`` examples whatever the chunk sizes, so the output depends only
        on the stream of examples (and the seed), not on how it was cut into chunks.
        """
        check_tokens(tokens, "tokens")
        if loss_mask is not None:
            check_mask(loss_mask, tokens.offsets - tokens.offsets[0])
        if self._has_mask is None:
            self._has_mask = loss_mask is not None
        elif self._has_mask != (loss_mask is not None):
            raise ValueError("loss_mask must be given with every chunk of the stream or with none")
        n = len(tokens)
        ids = np.arange(self._next_id, self._next_id + n, dtype=np.int64)
        self._next_id += n
        self.examples_seen += n
        lo = 0
        while lo < n:
            # after packing at most window // 2 examples stay pending, so every step takes some
            hi = min(n, lo + self.window - self._pending_n)
            self._pending.append((tokens[lo:hi], None if loss_mask is None else loss_mask[lo:hi], ids[lo:hi]))
            self._pending_n += hi - lo
            lo = hi
            if self._pending_n >= self.window:
                yield from self._pack_window(final=False)

    def flush(self) -> Iterator[tuple]:
        """Pack everything pending (call once, at the end of the stream)."""
        while self._pending_n:
            yield from self._pack_window(final=True)

    def _pack_window(self, final: bool) -> Iterator[tuple]:
        tokens = Ragged.concat([p[0] for p in self._pending])
        masks = [p[1] for p in self._pending]
        mask = None if masks[0] is None else Ragged.concat(masks)
        ids = np.concatenate([p[2] for p in self._pending])
        self._pending, self._pending_n = [], 0
        plan = pack(tokens, self.seq_len, strategy=self.strategy, overlong=self.overlong, seed=self.seed)
        self.num_truncated += plan.num_truncated
        self.num_split += plan.num_split
        self.num_dropped += plan.num_dropped
        self.tokens_dropped += plan.tokens_dropped
        keep = np.ones(plan.num_sequences, dtype=bool)
        if not final and plan.num_sequences:
            free = self.seq_len - plan.row_tokens
            seg_rows = np.repeat(np.arange(plan.num_sequences), np.diff(plan.row_offsets))
            # only rows made of whole examples may wait: a split example is never half emitted
            whole = (plan.seg_start == 0) & (plan.seg_len == plan.lengths[plan.seg_example])
            all_whole = np.bincount(seg_rows, weights=~whole, minlength=plan.num_sequences) == 0
            loose = np.flatnonzero((free > self.slack) & all_whole)
            # hold back the emptiest rows, at most half a window of examples so that the stream advances
            loose = loose[np.argsort(-free[loose], kind="stable")]
            n_ex = np.cumsum(np.diff(plan.row_offsets)[loose])
            keep[loose[n_ex <= self.window // 2]] = False
            held_ex = plan.seg_example[~keep[seg_rows]]
            if held_ex.size:
                self._pending.append((tokens.take(held_ex), None if mask is None else mask.take(held_ex), ids[held_ex]))
                self._pending_n += int(held_ex.size)
        out_rows = np.flatnonzero(keep)
        if out_rows.size == 0:
            return
        sub = plan.take(out_rows)
        self.rows_emitted += sub.num_sequences
        self.tokens_emitted += sub.tokens_packed
        yield sub, tokens, mask, ids


def pack_stream(chunks: Iterable[Ragged], seq_len: int, **kwargs) -> Iterator[tuple]:
    """Pack an iterable of Ragged chunks with a :class:`StreamPacker`; yields its batches."""
    packer = StreamPacker(seq_len, **kwargs)
    for chunk in chunks:
        yield from packer.push(chunk)
    yield from packer.flush()
