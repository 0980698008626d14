"""Argument checks shared by the packing modules: mlmix.pack, mlmix.store and mlmix.torch.data.

Each check takes what a user passed, raises TypeError/ValueError naming the argument, the value and what
is accepted, and returns the value in the form the C++ core reads. One definition, so that ``pack``,
``write_store``, ``PackedDataset`` and the build engines accept the same values with the same messages.
"""

from __future__ import annotations

import numpy as np

from .ragged import Ragged

__all__ = ["TOKEN_SUFFIX", "max_seq_len", "check_seq_len", "check_seed", "check_tokens", "check_mask", "check_pad",
           "check_shard_sequences"]

# token dtype -> suffix of the core's typed kernels (_materialize_u32, _store_rows_i64, ...)
TOKEN_SUFFIX = {np.dtype(np.uint32): "u32", np.dtype(np.int32): "i32", np.dtype(np.int64): "i64"}


def max_seq_len() -> int:
    """The longest row the core packs (PACK_MAX_SEQ_LEN); the extension is imported on first use."""
    from ._core_loader import core

    return int(core.PACK_MAX_SEQ_LEN)


def check_seq_len(seq_len) -> int:
    if isinstance(seq_len, bool) or not isinstance(seq_len, (int, np.integer)):
        raise TypeError(f"seq_len must be an int, got {type(seq_len).__name__} {seq_len!r}")
    limit = max_seq_len()
    if not 2 <= int(seq_len) <= limit:
        raise ValueError(f"seq_len must be in [2, {limit}], got {seq_len!r}")
    return int(seq_len)


def check_seed(seed) -> int | None:
    """None, or an int in [0, 2**64)."""
    if seed is None:
        return None
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise TypeError(f"seed must be an int or None, got {type(seed).__name__} {seed!r}")
    if not 0 <= int(seed) < 2**64:
        raise ValueError(f"seed must be in [0, 2**64), got {seed!r}")
    return int(seed)


def check_tokens(tokens, name: str) -> tuple[np.ndarray, np.ndarray, str]:
    """(values, offsets from 0, dtype suffix) of a Ragged of non-negative token ids; ``name`` is the argument."""
    if not isinstance(tokens, Ragged):
        raise TypeError(f"{name} must be a mlmix.Ragged, got {type(tokens).__name__}")
    values, offsets = tokens.values, tokens.offsets
    suffix = TOKEN_SUFFIX.get(values.dtype)
    if suffix is None:
        raise TypeError(f"{name}.values must be uint32, int32 or int64 token ids, got dtype {values.dtype}")
    lo = int(offsets[0])
    if lo != 0:  # a sliced Ragged: re-base so the kernel sees offsets from 0
        values, offsets = values[lo : int(offsets[-1])], offsets - lo
    if values.dtype.kind == "i" and values.size and int(values.min()) < 0:
        raise ValueError(f"{name} must hold non-negative token ids, got {int(values.min())}")
    return np.ascontiguousarray(values), np.ascontiguousarray(offsets, dtype=np.int64), suffix


def check_mask(loss_mask, offsets: np.ndarray) -> np.ndarray:
    """A Ragged loss mask with the tokens' ``offsets`` (from 0) -> its uint8 values (0 or not)."""
    if not isinstance(loss_mask, Ragged):
        raise TypeError(f"loss_mask must be a mlmix.Ragged or None, got {type(loss_mask).__name__}")
    m_off = loss_mask.offsets - loss_mask.offsets[0]
    if m_off.shape != offsets.shape or not np.array_equal(m_off, offsets):
        raise ValueError("loss_mask must have the same lengths as tokens (one mask value per token)")
    v = loss_mask.values[int(loss_mask.offsets[0]) : int(loss_mask.offsets[-1])]
    if v.dtype == np.bool_:
        v = v.view(np.uint8)
    elif v.dtype.kind in "iu":
        v = (v != 0).view(np.uint8) if v.dtype != np.uint8 else v
    else:
        raise TypeError(f"loss_mask values must be bool or integer, got dtype {v.dtype}")
    return np.ascontiguousarray(v)


def check_pad(pad_id, dtype: np.dtype) -> int:
    """A padding id that tokens of ``dtype`` can hold."""
    if isinstance(pad_id, bool) or not isinstance(pad_id, (int, np.integer)):
        raise TypeError(f"pad_id must be an int, got {type(pad_id).__name__} {pad_id!r}")
    info = np.iinfo(dtype)
    if not max(info.min, 0) <= int(pad_id) <= info.max:
        raise ValueError(f"pad_id must be in [0, {info.max}] for {dtype} tokens, got {pad_id!r}")
    return int(pad_id)


def check_shard_sequences(shard_sequences, seq_len: int) -> int:
    """Rows per store shard: ``shard_sequences``, or None for rows of ``mlmix.store.SHARD_TOKENS`` tokens."""
    if shard_sequences is None:
        from . import store  # read at call time: SHARD_TOKENS is the store's public default, and may be changed

        return max(1, store.SHARD_TOKENS // seq_len)
    if isinstance(shard_sequences, bool) or not isinstance(shard_sequences, (int, np.integer)) or shard_sequences < 1:
        raise ValueError(f"shard_sequences must be an integer >= 1 (rows per shard) or None, got {shard_sequences!r}")
    return int(shard_sequences)
