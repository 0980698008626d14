"""``RecordBlock``: canonical records (:mod:`mlmix.readers`) as columns, the build's currency between stages.

A canonical record is ``{"id": str, "lang": str | None, "where": str}`` plus either ``"text": str`` or
``"messages": [{"role": str, "content": str}, ...]``. A block of ``n`` of them is held as flat numpy
arrays, so the C++ core reads a whole block without a Python object per record and a stage cache is
written and read back without parsing text:

=================  ========================  ===========================================================
column             dtype, length             meaning
=================  ========================  ===========================================================
``kind``           uint8, n                  0 = text record, 1 = chat record
``id``             strings, n                the record's id
``lang``           strings, n                its language code ("" where ``has_lang`` is 0)
``has_lang``       uint8, n                  1 where the record gives a language, 0 for None
``where``          strings, n                where it was read (``path:line`` or ``path[row]``)
``turn_offsets``   int64, n + 1              record i owns turns ``turn_offsets[i]:turn_offsets[i+1]``
``role``           strings, one per turn     a chat turn's role; ``""`` for a text record's one turn
``content``        strings, one per turn     a chat turn's content, or a text record's text
=================  ========================  ===========================================================

A column of strings is two arrays, ``<name>_values`` (uint8, UTF-8 bytes) and ``<name>_offsets``
(int64, count + 1), as in :class:`mlmix.ragged.Ragged`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

__all__ = ["RecordBlock", "STRING_COLUMNS", "ARROW_COLUMNS", "TEXT", "CHAT"]

TEXT, CHAT = 0, 1
STRING_COLUMNS = ("id", "lang", "where", "role", "content")
_ARRAYS = ("kind", "has_lang", "turn_offsets") + tuple(
    f"{c}_{part}" for c in STRING_COLUMNS for part in ("values", "offsets"))


def _strings(items: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    encoded = [s.encode("utf-8") for s in items]
    offsets = np.zeros(len(encoded) + 1, np.int64)
    if encoded:
        np.cumsum(np.fromiter(map(len, encoded), np.int64, len(encoded)), out=offsets[1:])
    return np.frombuffer(b"".join(encoded), np.uint8).copy(), offsets


def _decode(values: np.ndarray, offsets: np.ndarray) -> list[str]:
    raw = values.tobytes() if len(values) else b""
    off = offsets.tolist()
    return [raw[off[i]:off[i + 1]].decode("utf-8") for i in range(len(off) - 1)]


class RecordBlock:
    """``n`` canonical records as columns (see the module docstring). Build one with :meth:`from_records`
    (from dicts) or from the C++ JSON lines reader; read it back with :meth:`to_records`."""

    __slots__ = _ARRAYS

    def __init__(self, **arrays: np.ndarray) -> None:
        missing = [a for a in _ARRAYS if a not in arrays]
        extra = sorted(set(arrays) - set(_ARRAYS))
        if missing or extra:
            raise TypeError(f"RecordBlock needs the arrays {list(_ARRAYS)}; missing {missing}, unexpected {extra}")
        for name in _ARRAYS:
            dtype = np.int64 if name.endswith("offsets") else np.uint8
            setattr(self, name, np.ascontiguousarray(np.asarray(arrays[name]), dtype=dtype))

    # --- building -------------------------------------------------------------------------------
    @classmethod
    def from_records(cls, records: Iterable[Mapping[str, Any]]) -> "RecordBlock":
        """Columns of canonical records (dicts as :func:`mlmix.readers.to_record` makes them)."""
        kind, ids, langs, has_lang, wheres, roles, contents = [], [], [], [], [], [], []
        turn_offsets = [0]
        for rec in records:
            ids.append(rec["id"])
            lang = rec.get("lang")
            has_lang.append(lang is not None)
            langs.append(lang or "")
            wheres.append(rec.get("where") or "")
            if "text" in rec:
                kind.append(TEXT)
                roles.append("")
                contents.append(rec["text"])
            else:
                kind.append(CHAT)
                for m in rec["messages"]:
                    roles.append(m["role"])
                    contents.append(m["content"])
            turn_offsets.append(len(contents))
        cols: dict[str, np.ndarray] = {"kind": np.asarray(kind, np.uint8), "has_lang": np.asarray(has_lang, np.uint8),
                                       "turn_offsets": np.asarray(turn_offsets, np.int64)}
        for name, items in (("id", ids), ("lang", langs), ("where", wheres), ("role", roles), ("content", contents)):
            cols[f"{name}_values"], cols[f"{name}_offsets"] = _strings(items)
        return cls(**cols)

    @classmethod
    def empty(cls) -> "RecordBlock":
        return cls.from_records([])

    @classmethod
    def concat(cls, blocks: Sequence["RecordBlock"]) -> "RecordBlock":
        blocks = list(blocks)
        if not blocks:
            return cls.empty()
        if len(blocks) == 1:
            return blocks[0]
        cols = {"kind": np.concatenate([b.kind for b in blocks]),
                "has_lang": np.concatenate([b.has_lang for b in blocks]),
                "turn_offsets": _join_offsets([b.turn_offsets for b in blocks])}
        for c in STRING_COLUMNS:
            cols[f"{c}_values"] = np.concatenate([getattr(b, f"{c}_values") for b in blocks])
            cols[f"{c}_offsets"] = _join_offsets([getattr(b, f"{c}_offsets") for b in blocks])
        return cls(**cols)

    # --- reading --------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.kind)

    def strings(self, column: str) -> list[str]:
        """A string column as Python str (one per record, or one per turn for ``role``/``content``)."""
        if column not in STRING_COLUMNS:
            raise ValueError(f"column must be one of {STRING_COLUMNS}, got {column!r}")
        return _decode(getattr(self, f"{column}_values"), getattr(self, f"{column}_offsets"))

    def langs(self) -> list[str | None]:
        return [lang if has else None for lang, has in zip(self.strings("lang"), self.has_lang.tolist())]

    def to_records(self) -> list[dict]:
        """The canonical records back as dicts (equal to those :meth:`from_records` was given)."""
        ids, langs, wheres = self.strings("id"), self.langs(), self.strings("where")
        roles, contents = self.strings("role"), self.strings("content")
        to = self.turn_offsets.tolist()
        out = []
        for i, k in enumerate(self.kind.tolist()):
            rec: dict = {"id": ids[i], "lang": langs[i], "where": wheres[i]}
            if k == TEXT:
                rec["text"] = contents[to[i]]
            else:
                rec["messages"] = [{"role": roles[t], "content": contents[t]} for t in range(to[i], to[i + 1])]
            out.append(rec)
        return out

    def texts(self) -> list[str]:
        """Each record's text for language identification and dedup (:func:`mlmix.readers.record_text`)."""
        roles, contents = self.strings("role"), self.strings("content")
        to = self.turn_offsets.tolist()
        out = []
        for i, k in enumerate(self.kind.tolist()):
            if k == TEXT:
                out.append(contents[to[i]])
            else:
                out.append("\n".join(contents[t] for t in range(to[i], to[i + 1]) if roles[t] != "system"))
        return out

    def text_column(self, num_threads: int = 0) -> tuple[np.ndarray, np.ndarray]:
        """:meth:`texts` as one column of UTF-8 (values uint8, offsets int64), computed in C++ without a Python
        str per record: equal to ``[t.encode() for t in self.texts()]``."""
        from ._core_loader import core

        return core._record_texts(self.kind, self.turn_offsets, self.role_values, self.role_offsets,
                                  self.content_values, self.content_offsets, num_threads)

    def take(self, index) -> "RecordBlock":
        """The records at ``index`` (ints, in the order given)."""
        idx = np.asarray(index, dtype=np.int64).reshape(-1)
        if len(idx) and (idx.min() < 0 or idx.max() >= len(self)):
            bad = int(idx[(idx < 0) | (idx >= len(self))][0])
            raise ValueError(f"index must hold record numbers in [0, {len(self)}), got {bad}")
        t_lo, t_hi = self.turn_offsets[idx], self.turn_offsets[idx + 1]
        turn_offsets = np.zeros(len(idx) + 1, np.int64)
        np.cumsum(t_hi - t_lo, out=turn_offsets[1:])
        # the turns of each record in order, without a Python step per record
        turns = np.repeat(t_lo - turn_offsets[:-1], t_hi - t_lo) + np.arange(int(turn_offsets[-1]), dtype=np.int64)
        cols = {"kind": self.kind[idx], "has_lang": self.has_lang[idx], "turn_offsets": turn_offsets}
        for c in STRING_COLUMNS:
            rows = turns.astype(np.int64) if c in ("role", "content") else idx
            cols[f"{c}_values"], cols[f"{c}_offsets"] = _take_strings(
                getattr(self, f"{c}_values"), getattr(self, f"{c}_offsets"), rows)
        return RecordBlock(**cols)

    def arrays(self) -> dict[str, np.ndarray]:
        return {name: getattr(self, name) for name in _ARRAYS}

    # --- Arrow ----------------------------------------------------------------------------------
    # One row per record: kind and has_lang (uint8), id, lang and where (large_string), role and content
    # (large_list<large_string>, one entry per turn). The strings' buffers are the block's own arrays, so a
    # block crosses a Ray dataset (or any Arrow table) and comes back without a Python object per record.
    def to_arrow(self, prefix: str = "") -> Any:
        """The records as a ``pyarrow.Table`` (columns :data:`ARROW_COLUMNS`, each name after ``prefix``);
        :meth:`from_arrow` reads any slice or concatenation of such tables back."""
        import pyarrow as pa

        n = len(self)

        def strings(c: str) -> Any:
            off = getattr(self, f"{c}_offsets")
            return pa.LargeStringArray.from_buffers(len(off) - 1, pa.py_buffer(off), pa.py_buffer(getattr(self, f"{c}_values")))

        cols = {"kind": pa.array(self.kind), "has_lang": pa.array(self.has_lang)}
        for c in ("id", "lang", "where"):
            cols[c] = strings(c)
        for c in ("role", "content"):
            cols[c] = pa.LargeListArray.from_arrays(pa.array(self.turn_offsets), strings(c))
        assert all(len(a) == n for a in cols.values())
        return pa.table({prefix + c: a for c, a in cols.items()})

    @classmethod
    def from_arrow(cls, table: Any, prefix: str = "") -> "RecordBlock":
        """The block of a table :meth:`to_arrow` made with this ``prefix`` (or any slice, concatenation or
        selection of its rows that keeps these columns; other columns are ignored)."""
        missing = [prefix + c for c in ARROW_COLUMNS if prefix + c not in table.column_names]
        if missing:
            raise ValueError(f"table: the record columns {missing} are missing (a RecordBlock's table has "
                             f"{[prefix + c for c in ARROW_COLUMNS]})")
        cols = {"kind": _arrow_numbers(table.column(prefix + "kind"), np.uint8, prefix + "kind"),
                "has_lang": _arrow_numbers(table.column(prefix + "has_lang"), np.uint8, prefix + "has_lang")}
        for c in ("id", "lang", "where"):
            cols[f"{c}_values"], cols[f"{c}_offsets"] = _arrow_strings(_one_chunk(table.column(prefix + c)),
                                                                       prefix + c)
        import pyarrow as pa

        for c in ("role", "content"):
            lists = _one_chunk(table.column(prefix + c))
            if not (pa.types.is_list(lists.type) or pa.types.is_large_list(lists.type)):
                raise ValueError(f"table: column {prefix + c!r} must hold lists of strings (one per turn), "
                                 f"got {lists.type}")
            turns, lo, hi = _arrow_offsets(lists, prefix + c)
            if c == "role":
                cols["turn_offsets"] = turns
            elif not np.array_equal(turns, cols["turn_offsets"]):
                raise ValueError("table: role and content must hold the same number of turns per record")
            cols[f"{c}_values"], cols[f"{c}_offsets"] = _arrow_strings(lists.values.slice(lo, hi - lo), prefix + c)
        return cls(**cols)

    def equals(self, other: "RecordBlock") -> bool:
        return all(np.array_equal(getattr(self, a), getattr(other, a)) for a in _ARRAYS)

    def __repr__(self) -> str:
        return f"RecordBlock({len(self)} records, {len(self.role_offsets) - 1} turns, {len(self.content_values):,} bytes)"

    # --- files ----------------------------------------------------------------------------------
    # One file: the 8-byte magic, a little-endian uint64 header length, a JSON header listing each column's
    # name, dtype and length, then the columns' raw bytes, each at a 64-byte aligned offset. Read back with
    # one read and no parsing per column (an .npz costs a CRC32 of every byte and a literal_eval per column).
    def save(self, path: str | os.PathLike) -> None:
        """One binary file holding every column (read it back with :meth:`load`)."""
        header, pos = [], 0
        for name in _ARRAYS:
            a = getattr(self, name)
            header.append([name, a.dtype.str, int(a.size), pos])
            pos += _aligned(a.nbytes)
        head = json.dumps({"columns": header}).encode()
        start = _aligned(len(_MAGIC) + 8 + len(head))
        import zlib

        from ._outputs import note_crc32

        crc = 0

        def write(data) -> None:  # the file's CRC-32 as it is written, noted for the stage cache's seal
            nonlocal crc
            f.write(data)
            crc = zlib.crc32(data, crc)

        with open(path, "wb") as f:
            write(_MAGIC + len(head).to_bytes(8, "little") + head)
            write(b"\0" * (start - f.tell()))
            for name in _ARRAYS:
                a = getattr(self, name)
                write(memoryview(np.ascontiguousarray(a)).cast("B"))
                write(b"\0" * (_aligned(a.nbytes) - a.nbytes))
        note_crc32(os.fspath(path), crc)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "RecordBlock":
        """A block written by :meth:`save`; ValueError if the file is not one (truncated, damaged)."""
        with open(path, "rb") as f:
            # read into uninitialised memory (numpy's, advised for huge pages when large): a bytearray would be
            # zero-filled first, a block's worth of page faults and writes for nothing
            buf = memoryview(np.empty(os.fstat(f.fileno()).st_size, np.uint8))
            got = f.readinto(buf)
        where = os.fspath(path)
        if got != len(buf):
            raise _not_a_block(where, "no RecordBlock header")
        columns, start = _header(buf, where, len(buf))
        arrays = {name: np.frombuffer(buf, dtype, size, start + pos) for name, (dtype, size, pos) in columns.items()}
        return cls(**arrays)

    @staticmethod
    def load_strings(path: str | os.PathLike, column: str) -> list[str]:
        """:meth:`strings` of one column of a saved block, reading only that column's bytes (not the texts)."""
        if column not in STRING_COLUMNS:
            raise ValueError(f"column must be one of {STRING_COLUMNS}, got {column!r}")
        got = _read_columns(path, (f"{column}_values", f"{column}_offsets"))
        return _decode(got[f"{column}_values"], got[f"{column}_offsets"])

    @staticmethod
    def load_langs(path: str | os.PathLike) -> list[str | None]:
        """:meth:`langs` of a saved block, reading only its language columns."""
        got = _read_columns(path, ("has_lang", "lang_values", "lang_offsets"))
        langs = _decode(got["lang_values"], got["lang_offsets"])
        if len(langs) != len(got["has_lang"]):
            raise _not_a_block(os.fspath(path), "its language columns differ in length")
        return [lang if has else None for lang, has in zip(langs, got["has_lang"].tolist())]


def _not_a_block(where: str, why: str) -> ValueError:
    return ValueError(f"{where!r} is not a RecordBlock file ({why})")


def _header(head, where: str, size: int) -> tuple[dict[str, tuple[np.dtype, int, int]], int]:
    """The columns ``{name: (dtype, items, position after the header)}`` and where the data starts, from a file's
    first bytes ``head`` (of a file of ``size`` bytes); ValueError if it is not a RecordBlock file."""
    if len(head) < len(_MAGIC) + 8 or bytes(head[:len(_MAGIC)]) != _MAGIC:
        raise _not_a_block(where, "no RecordBlock header")
    n = int.from_bytes(head[len(_MAGIC):len(_MAGIC) + 8], "little")
    if len(_MAGIC) + 8 + n > len(head):
        raise _not_a_block(where, "damaged header: it runs past the bytes read")
    try:
        header = [(str(name), np.dtype(dtype), int(items), int(pos)) for name, dtype, items, pos in
                  json.loads(bytes(head[len(_MAGIC) + 8:len(_MAGIC) + 8 + n]))["columns"]]
    except (KeyError, TypeError, ValueError) as exc:  # JSONDecodeError and UnicodeDecodeError included
        raise _not_a_block(where, f"damaged header: {exc}") from None
    start = _aligned(len(_MAGIC) + 8 + n)
    columns = {}
    for name, dtype, items, pos in header:
        want = np.dtype(np.int64 if name.endswith("offsets") else np.uint8)
        if name not in _ARRAYS or dtype != want or items < 0 or pos < 0:
            raise _not_a_block(where, f"column {name!r} of dtype {dtype.str!r}")
        if start + pos + items * want.itemsize > size:
            raise _not_a_block(where, f"column {name!r} runs past the end of the file")
        columns[name] = (want, items, pos)
    if sorted(columns) != sorted(_ARRAYS):
        raise _not_a_block(where, f"columns {sorted(columns)}")
    return columns, start


def _read_columns(path: str | os.PathLike, names: Sequence[str]) -> dict[str, np.ndarray]:
    """Some columns of a saved block, each read from its place in the file (the header first)."""
    where = os.fspath(path)
    with open(path, "rb", buffering=0) as f:
        size = os.fstat(f.fileno()).st_size
        head = f.read(min(size, 1 << 16))
        n = int.from_bytes(head[len(_MAGIC):len(_MAGIC) + 8], "little") if len(head) >= len(_MAGIC) + 8 else 0
        if len(_MAGIC) + 8 + n > len(head) and len(_MAGIC) + 8 + n <= size:  # a header longer than 64 KB
            f.seek(0)
            head = f.read(len(_MAGIC) + 8 + n)
        columns, start = _header(head, where, size)
        out = {}
        for name in names:
            dtype, items, pos = columns[name]
            arr = np.empty(items, dtype)
            f.seek(start + pos)
            view = memoryview(arr).cast("B")
            while view:
                got = f.readinto(view)
                if not got:
                    raise _not_a_block(where, f"column {name!r} runs past the end of the file")
                view = view[got:]
            out[name] = arr
    return out


_MAGIC = b"MLMIXRB1"


def _aligned(n: int) -> int:
    return (n + 63) // 64 * 64


ARROW_COLUMNS = ("kind", "has_lang", "id", "lang", "where", "role", "content")


def _one_chunk(col: Any) -> Any:
    """A table column as one Arrow array (chunks joined: copies only when there are several)."""
    return col.combine_chunks() if hasattr(col, "combine_chunks") else col


def _arrow_numbers(col: Any, dtype, name: str) -> np.ndarray:
    arr = _one_chunk(col)
    if arr.null_count:
        raise ValueError(f"table: column {name!r} has {arr.null_count} nulls")
    return np.asarray(arr.to_numpy(zero_copy_only=False), dtype=dtype)


def _arrow_offsets(arr: Any, name: str) -> tuple[np.ndarray, int, int]:
    """(offsets from 0, first and end position in the child) of a (large) string or list array, sliced or not."""
    import pyarrow as pa

    if arr.null_count:
        raise ValueError(f"table: column {name!r} has {arr.null_count} nulls")
    wide = pa.types.is_large_string(arr.type) or pa.types.is_large_list(arr.type)
    raw = np.frombuffer(arr.buffers()[1], np.int64 if wide else np.int32)
    off = raw[arr.offset:arr.offset + len(arr) + 1].astype(np.int64)
    if len(off) == 0:
        off = np.zeros(1, np.int64)
    lo, hi = int(off[0]), int(off[-1])
    return off - lo, lo, hi


def _arrow_strings(arr: Any, name: str) -> tuple[np.ndarray, np.ndarray]:
    """(values uint8, offsets int64) of a string array (large or not, sliced or not), copying only the offsets."""
    import pyarrow as pa

    if not (pa.types.is_string(arr.type) or pa.types.is_large_string(arr.type)):
        raise ValueError(f"table: column {name!r} must hold strings, got {arr.type}")
    off, lo, hi = _arrow_offsets(arr, name)
    data = arr.buffers()[2]
    values = np.frombuffer(data, np.uint8)[lo:hi] if data is not None and hi > lo else np.zeros(0, np.uint8)
    return values, off


def _join_offsets(parts: Sequence[np.ndarray]) -> np.ndarray:
    out = [np.zeros(1, np.int64)]
    base = 0
    for p in parts:
        out.append(p[1:] + base)
        base += int(p[-1])
    return np.concatenate(out)


def _take_strings(values: np.ndarray, offsets: np.ndarray, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    from ._core_loader import core

    return core._take_strings(values, offsets, np.ascontiguousarray(rows, dtype=np.int64))
