"""``Ragged``: a batch of variable-length sequences as one flat ``values`` array plus ``offsets``.

This is the currency between mlmix's stages (tokenize -> pack -> store). Sequence ``i`` is
``values[offsets[i]:offsets[i + 1]]``; ``offsets`` is int64 of length ``n + 1``, starts at 0, never
decreases and ends at ``len(values)``. Both arrays are plain numpy, so a Ragged goes to and from the
C++ core without a copy.
"""

from __future__ import annotations

import os
from typing import Iterable, Iterator, Sequence

import numpy as np

__all__ = ["Ragged", "RaggedWriter", "drop_mapped_pages", "is_mapped", "take_spans"]


def _as_offsets(offsets, n_values: int, name: str = "offsets") -> np.ndarray:
    arr = np.asarray(offsets)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be a 1-D array, got shape {arr.shape}")
    if arr.size == 0:
        raise ValueError(f"{name} must have at least one element (offsets[0] == 0), got an empty array")
    if arr.dtype.kind not in "iu":
        raise TypeError(f"{name} must be an integer array, got dtype {arr.dtype}")
    if arr.dtype != np.int64:
        if arr.dtype.kind == "u" and arr.size and int(arr.max()) > np.iinfo(np.int64).max:
            raise ValueError(f"{name} has values beyond int64")
        arr = arr.astype(np.int64)
    if not arr.flags.c_contiguous:
        arr = np.ascontiguousarray(arr)
    if arr[0] != 0:
        raise ValueError(f"{name}[0] must be 0, got {int(arr[0])}")
    if arr[-1] != n_values:
        raise ValueError(f"{name}[-1] must equal len(values) = {n_values}, got {int(arr[-1])}")
    if arr.size > 1 and bool(np.any(arr[1:] < arr[:-1])):
        i = int(np.argmax(arr[1:] < arr[:-1]))
        raise ValueError(
            f"{name} must be non-decreasing, got {name}[{i}] = {int(arr[i])} > {name}[{i + 1}] = {int(arr[i + 1])}"
        )
    return arr


class Ragged:
    """Variable-length sequences stored flat.

    Args:
        values: 1-D array of all elements, sequence after sequence (token ids: uint32 or int32/int64).
        offsets: 1-D integer array of length ``n + 1`` (stored as int64).
        validate: check the invariants (default True); pass False only for arrays mlmix produced.
    """

    __slots__ = ("values", "offsets")

    def __init__(self, values, offsets, *, validate: bool = True) -> None:
        v = np.asarray(values)
        if validate:
            if v.ndim != 1:
                raise ValueError(f"values must be a 1-D array, got shape {v.shape}")
            if v.dtype == object:
                raise TypeError("values must be a numeric array, got dtype object")
            if not v.flags.c_contiguous:
                v = np.ascontiguousarray(v)
            offsets = _as_offsets(offsets, v.shape[0])
        self.values: np.ndarray = v
        self.offsets: np.ndarray = np.asarray(offsets)

    # --- construction -----------------------------------------------------------------------------
    @classmethod
    def from_lists(cls, seqs: Iterable[Sequence[int]], dtype=None) -> "Ragged":
        """Build from an iterable of sequences (lists or arrays). ``dtype`` defaults to the values' own."""
        arrays = [np.asarray(s) for s in seqs]
        for i, a in enumerate(arrays):
            if a.ndim != 1:
                raise ValueError(f"seqs[{i}] must be 1-D, got shape {a.shape}")
        lengths = np.fromiter((a.shape[0] for a in arrays), dtype=np.int64, count=len(arrays))
        offsets = np.zeros(len(arrays) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        if arrays:
            values = np.concatenate(arrays)
        else:
            values = np.zeros(0, dtype=dtype or np.int64)
        if dtype is not None:
            values = _cast_checked(values, np.dtype(dtype), "seqs")
        elif values.dtype == np.float64 and values.size == 0:
            values = values.astype(np.int64)
        return cls(values, offsets)

    @classmethod
    def from_lengths(cls, values, lengths) -> "Ragged":
        """Build from flat values and per-sequence lengths (non-negative integers summing to len(values))."""
        lengths = np.asarray(lengths)
        if lengths.ndim != 1 or lengths.dtype.kind not in "iu":
            raise ValueError(f"lengths must be a 1-D integer array, got shape {lengths.shape}, dtype {lengths.dtype}")
        if lengths.size and int(lengths.min()) < 0:
            raise ValueError(f"lengths must be non-negative, got {int(lengths.min())}")
        offsets = np.zeros(lengths.size + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        return cls(values, offsets)

    @classmethod
    def concat(cls, parts: Iterable["Ragged"]) -> "Ragged":
        """Concatenate Ragged arrays sequence-wise (values must share a dtype)."""
        parts = list(parts)
        if not parts:
            raise ValueError("concat needs at least one Ragged, got none")
        dtypes = {p.values.dtype for p in parts}
        if len(dtypes) != 1:
            raise TypeError(f"concat needs Ragged arrays of one values dtype, got {sorted(map(str, dtypes))}")
        values = np.concatenate([p.values[p.offsets[0] : p.offsets[-1]] for p in parts])
        offsets = [np.zeros(1, dtype=np.int64)]
        base = 0
        for p in parts:
            offsets.append(p.offsets[1:] - p.offsets[0] + base)
            base += int(p.offsets[-1] - p.offsets[0])
        return cls(values, np.concatenate(offsets), validate=False)

    # --- views ------------------------------------------------------------------------------------
    @property
    def lengths(self) -> np.ndarray:
        """int64 array of the sequence lengths."""
        return np.diff(self.offsets)

    @property
    def dtype(self) -> np.dtype:
        return self.values.dtype

    @property
    def nbytes(self) -> int:
        return int(self.values.nbytes + self.offsets.nbytes)

    def __len__(self) -> int:
        return int(self.offsets.shape[0] - 1)

    def __iter__(self) -> Iterator[np.ndarray]:
        v, o = self.values, self.offsets
        for i in range(len(self)):
            yield v[o[i] : o[i + 1]]

    def __getitem__(self, key):
        n = len(self)
        if isinstance(key, (int, np.integer)):
            i = int(key)
            if i < -n or i >= n:
                raise IndexError(f"index {i} is out of range for a Ragged of {n} sequences")
            if i < 0:
                i += n
            return self.values[self.offsets[i] : self.offsets[i + 1]]
        if isinstance(key, slice):
            start, stop, step = key.indices(n)
            if step == 1:
                stop = max(stop, start)
                lo, hi = int(self.offsets[start]), int(self.offsets[stop])
                return Ragged(self.values[lo:hi], self.offsets[start : stop + 1] - lo, validate=False)
            return self.take(np.arange(start, stop, step))
        return self.take(key)

    def take(self, indices) -> "Ragged":
        """Gather sequences by index (int array, or bool mask of length n) into a new Ragged."""
        idx = np.asarray(indices)
        n = len(self)
        if idx.dtype == bool:
            if idx.shape != (n,):
                raise ValueError(f"a boolean mask must have shape ({n},), got {idx.shape}")
            idx = np.flatnonzero(idx)
        if idx.ndim != 1 or (idx.size and idx.dtype.kind not in "iu"):
            raise TypeError(f"indices must be a 1-D integer array or boolean mask, got dtype {idx.dtype}, shape {idx.shape}")
        idx = idx.astype(np.int64, copy=False)
        if idx.size and (int(idx.min()) < -n or int(idx.max()) >= n):
            bad = int(idx[(idx < -n) | (idx >= n)][0])
            raise IndexError(f"index {bad} is out of range for a Ragged of {n} sequences")
        idx = np.where(idx < 0, idx + n, idx)
        v = self.values
        if v.ndim == 1 and v.dtype.kind in "iufb" and v.dtype.itemsize in (1, 2, 4, 8) and v.flags.c_contiguous:
            # one memcpy per sequence in the core (not an 8-byte index per element)
            from ._core_loader import core

            raw, offsets = core._take_strings(v.view(np.uint8), np.ascontiguousarray(self.offsets, dtype=np.int64),
                                              idx, v.dtype.itemsize)
            return Ragged(raw.view(v.dtype), offsets, validate=False)
        starts = self.offsets[idx]
        lens = self.offsets[idx + 1] - starts
        offsets = np.zeros(idx.size + 1, dtype=np.int64)
        np.cumsum(lens, out=offsets[1:])
        total = int(offsets[-1])
        # position of every output element in the source: start of its sequence + rank within it
        src = np.repeat(starts - offsets[:-1], lens) + np.arange(total, dtype=np.int64)
        return Ragged(self.values[src], offsets, validate=False)

    # --- conversion -------------------------------------------------------------------------------
    def to_lists(self) -> list[list]:
        return [s.tolist() for s in self]

    def astype(self, dtype) -> "Ragged":
        return Ragged(_cast_checked(self.values, np.dtype(dtype), "values"), self.offsets, validate=False)

    def equals(self, other: "Ragged") -> bool:
        """True if both hold the same sequences (values compared after normalising offsets)."""
        if not isinstance(other, Ragged) or len(self) != len(other):
            return False
        if not np.array_equal(self.lengths, other.lengths):
            return False
        a = self.values[self.offsets[0] : self.offsets[-1]]
        b = other.values[other.offsets[0] : other.offsets[-1]]
        return bool(np.array_equal(a, b))

    def __repr__(self) -> str:
        return f"Ragged(n={len(self)}, total={int(self.offsets[-1] - self.offsets[0])}, dtype={self.values.dtype})"

    # --- .npy round trips -------------------------------------------------------------------------
    def save(self, path: str | os.PathLike) -> None:
        """Write ``values.npy`` and ``offsets.npy`` into directory ``path``, atomically."""
        from ._atomic import atomic_directory

        with atomic_directory(path, kind="ragged", arg="path") as tmp:
            lo = int(self.offsets[0])
            np.save(os.path.join(tmp, "values.npy"), self.values[lo : int(self.offsets[-1])])
            np.save(os.path.join(tmp, "offsets.npy"), self.offsets - lo)

    @classmethod
    def load(cls, path: str | os.PathLike, *, mmap: bool = True) -> "Ragged":
        """Read a Ragged saved by :meth:`save` (memory-mapped unless ``mmap=False``)."""
        mode = "r" if mmap else None
        p = os.fspath(path)
        for name in ("values.npy", "offsets.npy"):
            if not os.path.isfile(os.path.join(p, name)):
                raise FileNotFoundError(f"{p!r} is not a saved Ragged: {name} is missing")
        values = np.load(os.path.join(p, "values.npy"), mmap_mode=mode, allow_pickle=False)
        offsets = np.load(os.path.join(p, "offsets.npy"), mmap_mode=mode, allow_pickle=False)
        return cls(values, offsets)


def _cast_checked(values: np.ndarray, dtype: np.dtype, name: str) -> np.ndarray:
    """Cast with a range check so that token ids are never silently wrapped."""
    if values.dtype == dtype:
        return values
    if values.size and dtype.kind in "iu":
        if values.dtype.kind == "f" and not np.all(np.isfinite(values)):
            raise ValueError(f"{name} contains non-finite values; cannot cast to {dtype}")
        lo, hi = values.min(), values.max()
        info = np.iinfo(dtype)
        if lo < info.min or hi > info.max:
            raise ValueError(f"{name} has values in [{lo}, {hi}], outside the range of {dtype} [{info.min}, {info.max}]")
        if values.dtype.kind == "f" and not np.all(values == np.floor(values)):
            raise ValueError(f"{name} has non-integer values; cannot cast to {dtype}")
    return values.astype(dtype)


class RaggedWriter:
    """Writes a Ragged to disk sequence batch by batch, in the layout :meth:`Ragged.save` writes.

    ``values.npy`` grows on disk as batches are appended; only the lengths stay in memory (8 bytes
    per sequence), so a corpus far larger than RAM can be written and then memory-mapped back with
    :meth:`Ragged.load`. Used as a context manager, it finishes (``close``) on success and leaves the
    partial files to the caller's atomic directory on failure.

    Args:
        path: directory to create (it may exist); ``values.npy`` and ``offsets.npy`` are written in it.
        dtype: values dtype; appended values are cast to it with a range check.
    """

    def __init__(self, path: str | os.PathLike, dtype) -> None:
        self.path = os.fspath(path)
        self.dtype = np.dtype(dtype)
        os.makedirs(self.path, exist_ok=True)
        self._f = open(os.path.join(self.path, "values.npy"), "wb")
        # numpy pads a 1-D header so that the length can grow in place: write it for length 0 now and
        # rewrite it, with the same size, once the length is known
        self._header_len = len(self._write_header(0))
        self._crc = 0  # CRC-32 of the values written (the file's, with its final header, is noted at close)
        self._lengths: list[np.ndarray] = []
        self.num_values = 0
        self.closed = False

    def _write_header(self, n: int) -> bytes:
        import io

        self._f.seek(0)
        header = {"descr": np.lib.format.dtype_to_descr(self.dtype), "fortran_order": False, "shape": (n,)}
        buf = io.BytesIO()
        np.lib.format.write_array_header_1_0(buf, header)
        self._f.write(buf.getvalue())
        return buf.getvalue()

    def __len__(self) -> int:
        return sum(a.size for a in self._lengths)

    def append(self, r: "Ragged") -> None:
        """Append the sequences of ``r`` (values cast to the writer's dtype with a range check)."""
        if self.closed:
            raise ValueError("RaggedWriter is closed")
        lo, hi = int(r.offsets[0]), int(r.offsets[-1])
        import zlib

        values = _cast_checked(np.asarray(r.values[lo:hi]), self.dtype, "values")
        data = memoryview(np.ascontiguousarray(values)).cast("B")
        self._f.write(data)
        self._crc = zlib.crc32(data, self._crc)
        self._lengths.append(np.diff(r.offsets).astype(np.int64))
        self.num_values += hi - lo

    def close(self) -> None:
        """Finish ``values.npy`` (its header) and write ``offsets.npy``; idempotent."""
        if self.closed:
            return
        import zlib

        from ._outputs import crc32_combine, note_crc32

        end = self._f.tell()
        header = self._write_header(self.num_values)
        if len(header) != self._header_len:
            raise RuntimeError("values.npy header changed size; cannot finish it in place")
        self._f.seek(end)
        self._f.close()
        note_crc32(os.path.join(self.path, "values.npy"),
                   crc32_combine(zlib.crc32(header), self._crc, end - self._header_len))
        offsets = np.zeros(len(self) + 1, dtype=np.int64)
        if len(self):
            np.cumsum(np.concatenate(self._lengths), out=offsets[1:])
        np.save(os.path.join(self.path, "offsets.npy"), offsets)
        self._lengths = []
        self.closed = True

    def __enter__(self) -> "RaggedWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self._f.close()
            self.closed = True


def _mapping(arr):
    """The mmap.mmap an array's memory lives in, or None."""
    import mmap

    base = arr
    while base is not None:
        if isinstance(base, mmap.mmap):
            return base
        mm = getattr(base, "_mmap", None)
        if isinstance(mm, mmap.mmap):
            return mm
        base = getattr(base, "base", None)
    return None


def is_mapped(arr: np.ndarray) -> bool:
    """Whether ``arr`` is a view of a memory-mapped file (e.g. ``np.load(..., mmap_mode="r")``)."""
    return _mapping(arr) is not None


# examples copied between page releases by take_spans: each read of a mapped file maps up to ~64 KB
# around it (the kernel's fault-around), so this bounds the mapped pages resident at once to ~32 MB
_SPANS_PER_RELEASE = 512


def take_spans(values: np.ndarray, offsets: np.ndarray, index: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(values, int64 offsets) of the sequences ``index`` (ascending int64) of ``values``/``offsets``,
    copied into memory. From a memory-mapped ``values`` they are read from the mapped file itself (one
    ``pread`` per run of consecutive sequences, in the core without the GIL): no page of the mapping is
    touched, so random access over a file larger than RAM keeps RSS bounded by the output size. Where the
    mapped file cannot be opened again (no ``/proc/self/map_files``), the mapping is read instead and the
    pages read are released every few hundred sequences."""
    r = Ragged(values, offsets, validate=False)
    if not is_mapped(values):
        out = r.take(index)
        return out.values, out.offsets
    got = _read_mapped(values, offsets, index)
    if got is not None:
        return got
    if index.size <= _SPANS_PER_RELEASE:
        out = r.take(index)
        drop_mapped_pages(values)
        return out.values, out.offsets
    parts = []
    for lo in range(0, index.size, _SPANS_PER_RELEASE):
        parts.append(r.take(index[lo:lo + _SPANS_PER_RELEASE]))
        drop_mapped_pages(values)
    out = Ragged.concat(parts)
    return out.values, out.offsets


def _mapped_file(values: np.ndarray) -> tuple[int, int] | None:
    """(an open fd of the file ``values`` is mapped from, the byte where ``values`` starts in it), or None where
    that file cannot be read directly: ``values`` not 1-D contiguous, a private writable mapping (its pages may
    differ from the file), a mapping /proc does not list on its own, or no /proc. The caller closes the fd."""
    import mmap

    mm = _mapping(values)
    if (mm is None or values.ndim != 1 or not values.flags.c_contiguous or values.dtype.itemsize not in (1, 2, 4, 8)
            or len(mm) == 0):
        return None
    try:
        start = np.frombuffer(mm, np.uint8).ctypes.data
    except (TypeError, ValueError, BufferError):
        return None
    key = f"{start:x}-{start + -(-len(mm) // mmap.PAGESIZE) * mmap.PAGESIZE:x}"
    try:
        with open("/proc/self/maps", encoding="ascii", errors="replace") as f:
            entry = next((line.split() for line in f if line.startswith(key + " ")), None)
        if entry is None or len(entry) < 3 or (entry[1][1] == "w" and entry[1][3] != "s"):
            return None
        fd = os.open(f"/proc/self/map_files/{key}", os.O_RDONLY)  # the mapped file itself, whatever its name now
    except (OSError, ValueError):
        return None
    return fd, int(entry[2], 16) + (values.ctypes.data - start)


def _read_mapped(values: np.ndarray, offsets: np.ndarray, index: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """take_spans from the file ``values`` is mapped from, or None where that file cannot be read directly
    (see _mapped_file)."""
    opened = _mapped_file(values)
    if opened is None:
        return None
    fd, base = opened
    from ._core_loader import core

    try:
        raw, out_offsets = core._read_strings(fd, base, values.size, np.ascontiguousarray(offsets, dtype=np.int64),
                                              np.ascontiguousarray(index, dtype=np.int64), values.dtype.itemsize)
    except RuntimeError as e:
        raise OSError(f"reading the file mapped at byte {base} of fd {fd}: {e}") from None
    finally:
        os.close(fd)
    return raw.view(values.dtype), out_offsets


def read_spans(values: np.ndarray, starts: np.ndarray, lengths: np.ndarray) -> np.ndarray | None:
    """``values[starts[k]:starts[k] + lengths[k]]`` for each k, end to end (spans in any order), read from the
    file a memory-mapped ``values`` is mapped from (one ``pread`` per run of spans that follow each other in the
    file, in the core without the GIL): no page of the mapping is touched. None where ``values`` is not mapped
    or its file cannot be read directly (see _mapped_file): the caller then gathers from ``values`` itself."""
    if not is_mapped(values):
        return None
    opened = _mapped_file(values)
    if opened is None:
        return None
    fd, base = opened
    from ._core_loader import core

    try:
        raw = core._read_spans(fd, base, values.size, np.ascontiguousarray(starts, dtype=np.int64),
                               np.ascontiguousarray(lengths, dtype=np.int64), values.dtype.itemsize)
    except RuntimeError as e:
        raise OSError(f"reading the file mapped at byte {base} of fd {fd}: {e}") from None
    finally:
        os.close(fd)
    return raw.view(values.dtype)


def drop_mapped_pages(arr: np.ndarray) -> None:
    """Release the resident pages of a memory-mapped array (no-op for an in-memory one).

    Pages of a file mapping that have been read count in the process's RSS until unmapped; after a
    pass over a mapped array, this hands them back (they stay in the OS page cache, and reading the
    array again simply faults them in), so a pass over a file larger than RAM keeps RSS bounded.
    """
    import mmap

    mm = _mapping(arr)
    if mm is not None and hasattr(mm, "madvise") and hasattr(mmap, "MADV_DONTNEED"):
        try:
            mm.madvise(mmap.MADV_DONTNEED)
        except (OSError, ValueError):  # closed or not advisable: only a memory nicety
            pass
