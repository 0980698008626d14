"""Arrow record batches (Parquet row groups, ``datasets`` tables) into RecordBlock columns, a batch at a time.

:func:`batch_block` reads the columns a source's records format uses straight from the Arrow buffers and
assembles the block in numpy and the core (one gather of byte ranges per column): no Python object per row. It
answers only for a batch whose every row it can vouch for; for any other batch it returns ``None`` and the caller
reads that batch row by row through :func:`mlmix.readers.to_record`, which gives the records, or raises the error,
of the Python path. So a block from here always equals ``RecordBlock.from_records`` of the same rows'
``to_record``: the fast path only takes rows where ``to_record`` would take the same column for every row (a
column null in some rows only, where ``to_record`` would then look at the next candidate field, a non-string
field, an unknown role, an empty conversation, a row without an assistant turn: all go the Python way).

Arrays are read through their buffers and built with ``Array.from_buffers``: ``pyarrow.array``, scalars made from
Python values and ``to_numpy`` import pandas where it is installed (~0.2 s per process).
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from ._shapes import MESSAGES_KEYS, PROMPT_KEYS, RESPONSE_KEYS, records_format
from .recblock import CHAT, TEXT, RecordBlock

__all__ = ["batch_block", "convertible", "where_rows"]


class _Fallback(Exception):
    """This batch is for the row-by-row path."""


def convertible(batch) -> bool:
    """Whether ``batch.to_pylist()`` (what the row-by-row path does to every batch) is sure to succeed: every column
    of a type it converts without fail, and valid (every string valid UTF-8)."""
    import pyarrow as pa

    if not all(_plain(f.type) for f in batch.schema):
        return False
    try:
        batch.validate(full=True)
    except pa.ArrowInvalid:
        return False
    return True


def batch_block(batch, src: Mapping, *, roles: Mapping[str, str], id_prefix: str, where_prefix: str,
                where_suffix: str, first: int, take: int | None = None,
                select: np.ndarray | None = None) -> RecordBlock | None:
    """The RecordBlock of the rows of ``batch`` (a ``pyarrow.RecordBatch``), or None where the row-by-row path
    must read them.

    ``roles``: the source's role mapping (defaults included); the row at index ``k`` of the batch is row
    ``first + k`` of its file: its fallback id is ``id_prefix`` + that number, its location ``where_prefix`` +
    that number + ``where_suffix``; ``select``: the indices (increasing) of the rows to read (a source's ``where``
    filter; None: every row); ``take``: only the first of those (a source's limit). The batch is checked whole, as
    the row-by-row path converts it whole.
    """
    # to_pylist converts every column of the batch and fails on any invalid UTF-8 (in any column): the fast path
    # takes only a batch it would convert
    if not convertible(batch):
        return None
    rows = np.arange(batch.num_rows, dtype=np.int64) if select is None else np.asarray(select, np.int64)
    if take is not None:
        rows = rows[:take]
    if len(rows) < batch.num_rows:
        if len(rows) and int(rows[-1]) - int(rows[0]) + 1 == len(rows):  # a run: a slice, no copy
            batch = batch.slice(int(rows[0]), len(rows))
        else:
            batch = batch.take(_int64_array(rows))
    try:
        return _block(batch, src, roles, id_prefix, where_prefix, where_suffix, first + rows)
    except _Fallback:
        return None


def _block(batch, src, roles, id_prefix, where_prefix, where_suffix, numbers: np.ndarray) -> RecordBlock:
    """The block of a batch whose row ``k`` is row ``numbers[k]`` of its file."""
    import pyarrow as pa
    import pyarrow.compute as pc

    n = batch.num_rows
    names = batch.schema.names
    if n == 0 or len(set(names)) != len(names):
        raise _Fallback
    cols = dict(zip(names, batch.columns))
    fields = src["fields"]
    rows = np.arange(n, dtype=np.int64)
    out: dict[str, tuple[np.ndarray, np.ndarray]] = {}

    # the id, language and location of every row
    given = cols.get(src["id_field"])
    if given is None or pa.types.is_null(given.type):
        out["id"] = _numbered(id_prefix.encode(), numbers, b"")
    elif _is_string(given.type) or pa.types.is_integer(given.type):
        ids = given if _is_string(given.type) else pc.cast(given, pa.string())  # decimal, as str() writes ints
        pool = _Pool()
        at = pool.add(ids)
        if ids.null_count:  # rows without an id get their fallback id
            back = pool.add_raw(*_numbered(id_prefix.encode(), numbers, b""))
            out["id"] = pool.take(np.where(_valid(ids), at + rows, back + rows))
        else:
            out["id"] = pool.take(at + rows)
    else:  # str() of a float, bool, list... as Python writes it
        raise _Fallback
    out["where"] = _numbered(where_prefix.encode(), numbers, where_suffix.encode())
    pool = _Pool()
    if "lang" in src:
        lang = src["lang"]
        has_lang = np.full(n, lang is not None, np.uint8)
        out["lang"] = pool.take(np.full(n, pool.add_literal((lang or "").encode())))
    else:
        given = cols.get(src["lang_field"])
        if given is None or pa.types.is_null(given.type):
            has_lang = np.zeros(n, np.uint8)
            out["lang"] = (np.zeros(0, np.uint8), np.zeros(n + 1, np.int64))
        elif _is_string(given.type):
            at = pool.add(given)
            keep = _valid(given) & (_lengths(given) > 0)  # "" counts as no language, as None does
            has_lang = keep.astype(np.uint8)
            out["lang"] = pool.take(np.where(keep, at + rows, pool.add_literal(b"")))
        else:
            raise _Fallback

    fmt = records_format(src["records"], cols, fields)

    if fmt == "text":
        pool = _Pool()
        at = pool.add(_required(cols, fields, "text", ("text", "content")))
        out["content"] = pool.take(at + rows)
        out["role"] = (np.zeros(0, np.uint8), np.zeros(n + 1, np.int64))
        turn_offsets = np.arange(n + 1, dtype=np.int64)
        kind = TEXT
    else:
        kind = CHAT
        canon = ["system", "user", "assistant"]  # the role strings the block holds, by code
        pool = _Pool()
        system = _optional(cols, fields, "system", ("system",))
        if system is not None:
            has_sys = _valid(system) & (_lengths(system) > 0)
            at_sys = pool.add(system)
        else:
            has_sys = np.zeros(n, bool)
            at_sys = 0
        if fmt == "messages":
            lst = _required(cols, fields, "messages", MESSAGES_KEYS, nested=True)
            offsets, role_codes, contents = _conversation(lst, fields, roles, canon)
            at = pool.add(contents)
            counts = np.diff(offsets)
            turn_offsets = _cumsum(counts + has_sys)
            pieces = np.empty(int(turn_offsets[-1]), np.int64)
            codes = np.empty(len(pieces), np.int64)
            rec = np.repeat(rows, counts)
            pos = turn_offsets[:-1][rec] + has_sys[rec] + np.arange(len(role_codes)) - offsets[:-1][rec]
            pieces[pos] = at + np.arange(len(role_codes))
            codes[pos] = role_codes
            if has_sys.any():
                sys_at = turn_offsets[:-1][has_sys]
                pieces[sys_at] = at_sys + np.flatnonzero(has_sys)
                codes[sys_at] = 0
            content = pool.take(pieces)
        else:
            if fmt == "alpaca":
                prompt = _required(cols, fields, "instruction", ("instruction",))
                response = _required(cols, fields, "output", ("output",) + RESPONSE_KEYS)
                extra = _optional(cols, fields, "input", ("input",))
            else:
                prompt = _required(cols, fields, "prompt", PROMPT_KEYS)
                response = _required(cols, fields, "response", RESPONSE_KEYS)
                extra = None
            at_p, at_r = pool.add(prompt), pool.add(response)
            # a turn is one string or several end to end: the user's is the prompt, then "\n\n" + input if given
            has_extra = (_valid(extra) & (_lengths(extra) > 0)) if extra is not None else np.zeros(n, bool)
            at_x = pool.add(extra) if extra is not None else 0
            sep = pool.add_literal(b"\n\n")
            per_rec = has_sys + 1 + 2 * has_extra + 1  # pieces: [system] prompt [sep input] response
            starts = _cumsum(per_rec)
            pieces = np.empty(int(starts[-1]), np.int64)
            s = starts[:-1]
            pieces[s[has_sys]] = at_sys + np.flatnonzero(has_sys)
            p = s + has_sys
            pieces[p] = at_p + rows
            pieces[p[has_extra] + 1] = sep
            pieces[p[has_extra] + 2] = at_x + np.flatnonzero(has_extra)
            pieces[starts[1:] - 1] = at_r + rows
            turn_offsets = _cumsum(2 + has_sys)
            codes = np.empty(int(turn_offsets[-1]), np.int64)
            codes[turn_offsets[:-1][has_sys]] = 0
            codes[turn_offsets[:-1] + has_sys] = 1
            codes[turn_offsets[1:] - 1] = 2
            # the piece each turn starts at: a turn's pieces are consecutive
            turn_start = np.empty(int(turn_offsets[-1]) + 1, np.int64)
            turn_start[turn_offsets[:-1][has_sys]] = s[has_sys]
            turn_start[turn_offsets[:-1] + has_sys] = p
            turn_start[turn_offsets[1:] - 1] = starts[1:] - 1
            turn_start[-1] = len(pieces)
            values, piece_offsets = pool.take(pieces)
            content = (values, piece_offsets[turn_start])
        # every conversation needs an assistant turn (to_record refuses one without): such a batch goes row by row
        asst = canon.index("assistant")
        has_asst = np.zeros(n, bool)
        has_asst[np.repeat(rows, np.diff(turn_offsets))[codes == asst]] = True
        if not has_asst.all():
            raise _Fallback
        out["content"] = content
        roles_pool = _Pool()
        base = roles_pool.add_raw(*_literals([c.encode() for c in canon]))
        out["role"] = roles_pool.take(base + codes)
    cols_out = {"kind": np.full(n, kind, np.uint8), "has_lang": has_lang, "turn_offsets": turn_offsets}
    for name, (values, offsets) in out.items():
        cols_out[f"{name}_values"], cols_out[f"{name}_offsets"] = values, offsets
    return RecordBlock(**cols_out)


# ---- columns -------------------------------------------------------------------------------------------------------
def _is_string(t) -> bool:
    import pyarrow as pa

    return pa.types.is_string(t) or pa.types.is_large_string(t)


def _plain(t) -> bool:
    """A type whose values ``to_pylist`` turns into Python objects without fail (strings once checked as UTF-8):
    the fast path takes only batches made of such columns, as the row-by-row path converts every column."""
    import pyarrow as pa

    if (pa.types.is_null(t) or pa.types.is_boolean(t) or pa.types.is_integer(t) or pa.types.is_floating(t)
            or _is_string(t) or pa.types.is_binary(t) or pa.types.is_large_binary(t)):
        return True
    if pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t):
        return _plain(t.value_type)
    if pa.types.is_struct(t):  # to_pylist refuses a struct with a field name twice
        names = [t.field(i).name for i in range(t.num_fields)]
        return len(set(names)) == len(names) and all(_plain(t.field(i).type) for i in range(t.num_fields))
    return False


def _required(cols: Mapping, fields: Mapping, canonical: str, candidates: tuple, nested: bool = False):
    """The column ``to_record``'s ``_get`` takes for every row: a mapped field, else the first candidate present
    and not null. A column null in some rows only (``_get`` would look further for those) or of another type
    than strings (a list of messages where ``nested``), or none at all (an error), is for the row-by-row path."""
    import pyarrow as pa

    names = (fields[canonical],) if canonical in fields else candidates
    for name in names:
        arr = cols.get(name)
        if arr is None or arr.null_count == len(arr):
            continue  # absent, or null in every row: _get looks further (or finds nothing) for every row
        if arr.null_count:
            raise _Fallback
        if nested:
            if not (pa.types.is_list(arr.type) or pa.types.is_large_list(arr.type)):
                raise _Fallback
            return arr
        if not _is_string(arr.type):
            raise _Fallback
        return arr
    raise _Fallback


def _optional(cols: Mapping, fields: Mapping, canonical: str, candidates: tuple):
    """An optional string field (system prompt, alpaca input): the column (null where absent), or None where no
    row has it. A column of another type (where a truthy value is an error and a falsy one is skipped) is for
    the row-by-row path."""
    names = (fields[canonical],) if canonical in fields else candidates
    if len(names) != 1:
        raise _Fallback
    arr = cols.get(names[0])
    if arr is None or arr.null_count == len(arr):
        return None
    if not _is_string(arr.type):
        raise _Fallback
    return arr


def _conversation(lst, fields: Mapping, roles: Mapping[str, str], canon: list[str]):
    """(list offsets from 0, canonical role code per message, contents) of a list<struct> column, every list
    non-empty, every message a struct with a known role and a string content; else the row-by-row path."""
    import pyarrow as pa
    import pyarrow.compute as pc

    offsets = _ints(lst.offsets)
    if np.any(offsets[1:] == offsets[:-1]):  # an empty conversation: an error
        raise _Fallback
    child = lst.values.slice(int(offsets[0]), int(offsets[-1] - offsets[0]))
    offsets = offsets - offsets[0]
    if not pa.types.is_struct(child.type) or child.null_count:
        raise _Fallback
    names = [child.type.field(i).name for i in range(child.type.num_fields)]
    if len(set(names)) != len(names):
        raise _Fallback
    rk = fields.get("role") or ("role" if "role" in names else "from")
    ck = fields.get("content") or ("content" if "content" in names else "value")
    if rk not in names or ck not in names:
        raise _Fallback
    role, content = child.field(names.index(rk)), child.field(names.index(ck))
    if not _is_string(role.type) or not _is_string(content.type) or role.null_count or content.null_count:
        raise _Fallback
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in roles.items()):
        raise _Fallback
    keys = list(roles)
    for v in roles.values():
        if v not in canon:
            canon.append(v)
    lut = np.array([canon.index(roles[k]) for k in keys], np.int64)
    found = pc.index_in(role, value_set=_string_array(*_literals([k.encode() for k in keys])))
    if found.null_count:  # a role the mapping does not know: an error
        raise _Fallback
    return offsets, lut[_ints(found)], content


# ---- where filters -------------------------------------------------------------------------------------------------
def where_rows(batch, where: Mapping) -> np.ndarray | None:
    """The indices of the rows of ``batch`` whose ``to_pylist`` dict ``row`` passes ``all(row.get(k) == v for k, v in
    where.items())`` (readers.iter_source's filter), computed on the columns; None where that takes Python's
    comparison itself: a value other than None, str, int or bool, a column other than null, bool, integer or
    string compared with anything but None, a name the batch has twice."""
    names = batch.schema.names
    n = batch.num_rows
    keep = np.ones(n, bool)
    undecided = False
    safe = True  # whether == with every undecided value is sure not to raise (builtin values only)
    for k, v in where.items():
        got = _where_mask(batch, names, k, v) if type(k) is str else None
        if got is None:
            undecided = True
            safe = safe and _builtin(v)
        else:
            keep &= got
    if not keep.any() and safe:  # one term false in every row decides, as no other term can raise
        return np.zeros(0, np.int64)
    return None if undecided else np.flatnonzero(keep)


def _builtin(value) -> bool:
    """A value made of None, bool, int, float, str, bytes, lists, tuples and dicts only, whose == with what
    to_pylist gives never raises (a numpy array's does: "truth value ... is ambiguous")."""
    if value is None or type(value) in (bool, int, float, str, bytes):
        return True
    if type(value) in (list, tuple):
        return all(_builtin(x) for x in value)
    if type(value) is dict:
        return all(_builtin(k) and _builtin(x) for k, x in value.items())
    return False


def _where_mask(batch, names: list, key: str, value) -> np.ndarray | None:
    import pyarrow as pa

    n = batch.num_rows
    if names.count(key) > 1:
        return None
    if key not in names:  # row.get(key) is None
        return np.full(n, value is None)
    arr = batch.column(names.index(key))
    t = arr.type
    if pa.types.is_null(t):
        return np.full(n, value is None)
    if not (pa.types.is_boolean(t) or pa.types.is_integer(t) or _is_string(t)):
        return None
    valid = _valid(arr)
    if value is None:
        return ~valid
    if type(value) is str:
        if not _is_string(t):
            return np.zeros(n, bool)  # a number never equals a str
        try:  # offsets within the data, valid UTF-8 (else the row-by-row path raises what to_pylist raises)
            arr.validate(full=True)
        except pa.ArrowInvalid:
            return None
        return valid & _equal_strings(arr, value.encode("utf-8", "surrogatepass"))
    if type(value) not in (int, bool):
        return None  # floats (exact int/float comparisons), lists, dicts...: Python's own ==
    if _is_string(t):
        return np.zeros(n, bool)
    if pa.types.is_boolean(t):
        bits = _bits(arr.buffers()[1], arr.offset, n)
        if value not in (0, 1):  # True == 1, False == 0 and nothing else
            return np.zeros(n, bool)
        return valid & (bits == int(value))
    dtype = _INT_TYPES[str(t)]
    info = np.iinfo(dtype)
    if not info.min <= int(value) <= info.max:
        return np.zeros(n, bool)
    values = np.frombuffer(arr.buffers()[1], dtype, count=n, offset=arr.offset * dtype.itemsize)
    return valid & (values == dtype.type(int(value)))


def _equal_strings(arr, want: bytes) -> np.ndarray:
    """Whether each value of a string array is ``want`` byte for byte (nulls: whatever they span; callers mask)."""
    data, offsets = _raw(arr)
    starts = offsets[:-1]
    out = (offsets[1:] - starts) == len(want)
    cand = np.flatnonzero(out)
    if len(want) and len(cand):
        w = np.frombuffer(want, np.uint8)
        step = max(1, (1 << 22) // len(want))  # a few MB of gathered bytes at a time
        for lo in range(0, len(cand), step):
            c = cand[lo:lo + step]
            out[c] = (data[starts[c][:, None] + np.arange(len(want))] == w).all(axis=1)
    return out


# ---- arrays through their buffers ----------------------------------------------------------------------------------
def _int64_array(values: np.ndarray):
    import pyarrow as pa

    return pa.Array.from_buffers(pa.int64(), len(values), [None, pa.py_buffer(np.ascontiguousarray(values, np.int64))])


def _ints(arr) -> np.ndarray:
    """An integer array without nulls as int64 numpy."""
    dtype = _INT_TYPES.get(str(arr.type))
    if dtype is None or arr.null_count:
        raise _Fallback
    buf = arr.buffers()[1]
    return np.frombuffer(buf, dtype, count=len(arr), offset=arr.offset * dtype.itemsize).astype(np.int64)


_INT_TYPES = {"int8": np.dtype(np.int8), "int16": np.dtype(np.int16), "int32": np.dtype(np.int32),
              "int64": np.dtype(np.int64), "uint8": np.dtype(np.uint8), "uint16": np.dtype(np.uint16),
              "uint32": np.dtype(np.uint32), "uint64": np.dtype(np.uint64)}


def _valid(arr) -> np.ndarray:
    """Whether each value is not null (from the validity bitmap)."""
    n = len(arr)
    bitmap = arr.buffers()[0]
    if arr.null_count == 0 or bitmap is None:
        return np.full(n, arr.null_count == 0)
    return _bits(bitmap, arr.offset, n).astype(bool)


def _bits(buffer, offset: int, n: int) -> np.ndarray:
    """Bits offset..offset + n of an Arrow bitmap (least significant bit first), as uint8 0 / 1."""
    return np.unpackbits(np.frombuffer(buffer, np.uint8), bitorder="little")[offset:offset + n]


def _raw(arr) -> tuple[np.ndarray, np.ndarray]:
    """(the data buffer as uint8, int64 offsets into it, one per value + 1) of a string array, no copy of the
    data; a null value spans whatever its offsets say (callers never take one)."""
    import pyarrow as pa

    width = 4 if pa.types.is_string(arr.type) else 8 if pa.types.is_large_string(arr.type) else 0
    if not width:
        raise _Fallback
    bufs = arr.buffers()
    dtype = np.int32 if width == 4 else np.int64
    offsets = np.frombuffer(bufs[1], dtype, count=len(arr) + 1, offset=arr.offset * width).astype(np.int64)
    data = np.frombuffer(bufs[2], np.uint8) if bufs[2] is not None and len(bufs[2]) else np.zeros(0, np.uint8)
    return data, offsets


def _lengths(arr) -> np.ndarray:
    """Byte length of each value of a string array (whatever a null spans: callers mask nulls)."""
    offsets = _raw(arr)[1]
    return offsets[1:] - offsets[:-1]


def _literals(items: list[bytes]) -> tuple[np.ndarray, np.ndarray]:
    values = np.frombuffer(b"".join(items), np.uint8) if any(items) else np.zeros(0, np.uint8)
    return values, _cumsum(np.array([len(x) for x in items], np.int64))


def _string_array(values: np.ndarray, offsets: np.ndarray):
    import pyarrow as pa

    return pa.Array.from_buffers(pa.large_string(), len(offsets) - 1,
                                 [None, pa.py_buffer(np.ascontiguousarray(offsets, np.int64)),
                                  pa.py_buffer(np.ascontiguousarray(values, np.uint8))])


def _numbered(prefix: bytes, nums: np.ndarray, suffix: bytes) -> tuple[np.ndarray, np.ndarray]:
    """The strings prefix + str(x) + suffix for each x of ``nums`` (increasing, >= 0), as (values, offsets)."""
    nums = np.asarray(nums, np.int64)
    n = len(nums)
    nd = np.ones(n, np.int64)  # decimal digits of each number (all >= 0)
    p = 10
    while n and p <= int(nums.max()):
        nd += nums >= p
        p *= 10
    maxd = int(nd.max()) if n else 1
    digits = (nums[:, None] // (10 ** np.arange(maxd - 1, -1, -1, dtype=np.int64))) % 10 + ord("0")
    a, b = len(prefix), len(prefix) + maxd
    grid = np.empty((n, b + len(suffix)), np.uint8)
    grid[:, :a] = np.frombuffer(prefix, np.uint8)
    grid[:, a:b] = digits
    grid[:, b:] = np.frombuffer(suffix, np.uint8)
    keep = np.ones(grid.shape, bool)
    keep[:, a:b] = np.arange(maxd) >= (maxd - nd)[:, None]  # no leading zeros
    return grid[keep], _cumsum(a + nd + len(suffix))


class _Pool:
    """Strings from several sources as one indexable column: ``add*`` return the index of the source's first
    string; :meth:`take` gathers strings by index into a new column (values, offsets) in the core."""

    def __init__(self) -> None:
        self._values: list[np.ndarray] = []
        self._offsets: list[np.ndarray] = [np.zeros(1, np.int64)]
        self._count = 0
        self._bytes = 0

    def add(self, arr) -> int:
        return self.add_raw(*_raw(arr))

    def add_literal(self, s: bytes) -> int:
        return self.add_raw(*_literals([s]))

    def add_raw(self, data: np.ndarray, offsets: np.ndarray) -> int:
        lo, hi = int(offsets[0]), int(offsets[-1])
        if lo < 0 or hi > len(data) or np.any(offsets[1:] < offsets[:-1]):
            raise _Fallback  # offsets that do not fit their data (validate() refuses these already)
        self._values.append(data[lo:hi])
        self._offsets.append(offsets[1:] - lo + self._bytes)
        self._bytes += hi - lo
        at = self._count
        self._count += len(offsets) - 1
        return at

    def take(self, order: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        from ._core_loader import core

        values = self._values[0] if len(self._values) == 1 else np.concatenate(self._values)
        offsets = np.concatenate(self._offsets)
        return core._take_strings(np.ascontiguousarray(values, np.uint8), offsets,
                                  np.ascontiguousarray(order, np.int64), 1)


def _cumsum(counts: np.ndarray) -> np.ndarray:
    out = np.zeros(len(counts) + 1, np.int64)
    np.cumsum(counts, out=out[1:])
    return out
