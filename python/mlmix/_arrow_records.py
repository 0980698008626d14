"""Arrow record batches (Parquet row groups, ``datasets`` tables) into RecordBlock columns, a batch at a time.

:func:`batch_block` reads the columns a source's records format uses straight from the Arrow buffers and
assembles the block in numpy and the core: no Python object per row. It answers only for a batch whose every row it
can vouch for; for any other batch it returns ``None`` and the caller reads that batch row by row through
:func:`mlmix.readers.to_record`, which gives the records, or raises the error, of the Python path. So a block from
here always equals ``RecordBlock.from_records`` of the same rows' ``to_record``: the fast path only ever takes
rows where ``to_record`` would take the same column for every row (a column partly null where ``to_record`` would
then look at the next candidate field, a non-string field, an unknown role, an empty conversation, a row
without an assistant turn: all go the Python way).
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from .recblock import CHAT, TEXT, RecordBlock

__all__ = ["batch_block"]


class _Fallback(Exception):
    """This batch is for the row-by-row path."""


def batch_block(batch, src: Mapping, *, fmt_keys: tuple, roles: Mapping[str, str], id_prefix: str,
                where_prefix: str, where_suffix: str, first: int, take: int | None = None) -> RecordBlock | None:
    """The RecordBlock of the rows of ``batch`` (a ``pyarrow.RecordBatch``), or None where the row-by-row path
    must read them.

    ``fmt_keys``: (messages keys, prompt keys, response keys) as :func:`mlmix.readers.to_record` looks them
    up; ``roles``: the source's role mapping (defaults included); the row at index ``k`` of the batch is row
    ``first + k`` of its file: its fallback id is ``id_prefix`` + that number, its location ``where_prefix`` +
    that number + ``where_suffix``; ``take``: only the first rows (a source's limit), the batch being checked
    whole, as the row-by-row path converts it whole.
    """
    import pyarrow as pa

    # to_pylist converts every column of the batch and fails on any invalid UTF-8 (in any column): the fast path
    # takes only a batch it would convert
    if not all(_plain(f.type) for f in batch.schema):
        return None
    try:
        batch.validate(full=True)
    except pa.ArrowInvalid:
        return None
    if take is not None and take < batch.num_rows:
        batch = batch.slice(0, take)
    try:
        return _block(batch, src, fmt_keys, roles, id_prefix, where_prefix, where_suffix, first)
    except _Fallback:
        return None


def _block(batch, src, fmt_keys, roles, id_prefix, where_prefix, where_suffix, first) -> RecordBlock:
    import pyarrow as pa
    import pyarrow.compute as pc

    n = batch.num_rows
    names = batch.schema.names
    if n == 0 or len(set(names)) != len(names):
        raise _Fallback
    cols = dict(zip(names, batch.columns))
    fields = src["fields"]
    messages_keys, prompt_keys, response_keys = fmt_keys

    # the id, language and location of every row
    idx = pa.array(np.arange(first, first + n, dtype=np.int64))
    digits = pc.cast(idx, pa.string())
    fallback = pc.binary_join_element_wise(id_prefix, digits, "")
    given = cols.get(src["id_field"])
    if given is None or pa.types.is_null(given.type):
        ids = fallback
    elif _is_string(given.type) or pa.types.is_integer(given.type):
        ids = pc.coalesce(pc.cast(given, pa.string()), fallback)
    else:  # str() of a float, bool, list... as Python writes it
        raise _Fallback
    wheres = pc.binary_join_element_wise(where_prefix, digits, where_suffix, "")
    if "lang" in src:
        lang = src["lang"]
        has_lang = np.full(n, lang is not None, np.uint8)
        langs = pa.array([lang or ""] * 1, pa.string()).take(pa.array(np.zeros(n, np.int64)))
    else:
        given = cols.get(src["lang_field"])
        if given is None or pa.types.is_null(given.type):
            has_lang = np.zeros(n, np.uint8)
            langs = pa.array([""] * 1, pa.string()).take(pa.array(np.zeros(n, np.int64)))
        elif _is_string(given.type):
            langs = pc.fill_null(given, "")
            has_lang = (_lengths(langs) > 0).astype(np.uint8)  # "" counts as no language, as None does
        else:
            raise _Fallback

    fmt = src["records"]
    if fmt == "auto":
        if any(k in cols for k in messages_keys) or "messages" in fields:
            fmt = "messages"
        elif ("text" in fields or "text" in cols) and not any(k in cols for k in prompt_keys):
            fmt = "text"
        elif "instruction" in fields or "input" in cols:
            fmt = "alpaca"
        else:
            fmt = "prompt_response"

    out = {"id": _strings(ids), "lang": _strings(langs), "where": _strings(wheres)}
    if fmt == "text":
        text = _required(cols, fields, "text", ("text", "content"))
        out["content"] = _strings(text)
        out["role"] = (np.zeros(0, np.uint8), np.zeros(n + 1, np.int64))
        turn_offsets = np.arange(n + 1, dtype=np.int64)
        kind = TEXT
    else:
        kind = CHAT
        system = _optional(cols, fields, "system", ("system",))
        has_sys = (_lengths(system) > 0) if system is not None else np.zeros(n, bool)
        canon = ["system", "user", "assistant"]  # the role strings the block will hold, by code
        if fmt == "messages":
            lst = _required(cols, fields, "messages", messages_keys, nested=True)
            offsets, role_codes, contents = _conversation(lst, fields, roles, canon)
            counts = np.diff(offsets)
            parts = [contents]
            turn_counts = counts + has_sys
            turn_offsets = _cumsum(turn_counts)
            total = int(turn_offsets[-1])
            order = np.empty(total, np.int64)
            codes = np.empty(total, np.int64)
            rec = np.repeat(np.arange(n), counts)
            pos = turn_offsets[:-1][rec] + has_sys[rec] + np.arange(len(role_codes)) - offsets[:-1][rec]
            order[pos] = np.arange(len(role_codes))
            codes[pos] = role_codes
        else:
            if fmt == "alpaca":
                prompt = _required(cols, fields, "instruction", ("instruction",))
                response = _required(cols, fields, "output", ("output",) + response_keys)
                extra = _optional(cols, fields, "input", ("input",))
            else:
                prompt = _required(cols, fields, "prompt", prompt_keys)
                response = _required(cols, fields, "response", response_keys)
                extra = None
            if extra is not None:
                has_extra = _lengths(extra) > 0
                if has_extra.any():
                    joined = pc.binary_join_element_wise(prompt, pc.fill_null(extra, ""), "\n\n")
                    prompt = pc.if_else(pa.array(has_extra), joined, prompt)
            parts = [prompt, response]
            turn_offsets = _cumsum(2 + has_sys)
            order = np.empty(int(turn_offsets[-1]), np.int64)
            codes = np.empty(len(order), np.int64)
            at = turn_offsets[:-1] + has_sys
            order[at], codes[at] = np.arange(n), 1
            order[at + 1], codes[at + 1] = n + np.arange(n), 2
        if has_sys.any():  # the system prompts come first in the pool, the other parts after them
            sys_at = turn_offsets[:-1][has_sys]
            order += n
            order[sys_at] = np.flatnonzero(has_sys)
            codes[sys_at] = 0
            parts = [pc.fill_null(system, "")] + parts
        # every conversation needs an assistant turn (to_record refuses one without): such a batch goes row by row
        has_asst = np.zeros(n, bool)
        has_asst[np.repeat(np.arange(n), np.diff(turn_offsets))[codes == canon.index("assistant")]] = True
        if not has_asst.all():
            raise _Fallback
        out["content"] = _take(parts, order)
        role_pool = _pool_of([pa.array(canon, pa.string())])
        out["role"] = _take_pool(role_pool, codes)
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
    if pa.types.is_struct(t):
        return all(_plain(t.field(i).type) for i in range(t.num_fields))
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
    import pyarrow as pa

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

    offsets = np.asarray(lst.offsets).astype(np.int64)
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
    role = pc.struct_field(child, [names.index(rk)])
    content = pc.struct_field(child, [names.index(ck)])
    if (not _is_string(role.type) or not _is_string(content.type) or role.null_count or content.null_count):
        raise _Fallback
    keys = list(roles)
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in roles.items()):
        raise _Fallback
    for v in roles.values():
        if v not in canon:
            canon.append(v)
    lut = np.array([canon.index(roles[k]) for k in keys], np.int64)
    found = pc.index_in(role, value_set=pa.array(keys, pa.string()))
    if found.null_count:  # a role the mapping does not know: an error
        raise _Fallback
    return offsets, lut[found.to_numpy(zero_copy_only=False)], content


# ---- strings as (values, offsets) ----------------------------------------------------------------------------------
def _lengths(arr) -> np.ndarray:
    """Byte length of each value (0 where null) of a string array."""
    import pyarrow.compute as pc

    return pc.fill_null(pc.binary_length(arr), 0).to_numpy(zero_copy_only=False).astype(np.int64)


def _raw(arr) -> tuple[np.ndarray, np.ndarray]:
    """(the data buffer as uint8, int64 offsets into it, one per value + 1) of a string array, no copy of the
    data; a null value spans whatever its offsets say (callers fill or refuse nulls first)."""
    import pyarrow as pa

    if pa.types.is_string(arr.type):
        width = 4
    elif pa.types.is_large_string(arr.type):
        width = 8
    else:
        raise _Fallback
    bufs = arr.buffers()
    n = len(arr)
    dtype = np.int32 if width == 4 else np.int64
    offsets = np.frombuffer(bufs[1], dtype, count=n + 1, offset=arr.offset * width).astype(np.int64)
    data = np.frombuffer(bufs[2], np.uint8) if bufs[2] is not None and len(bufs[2]) else np.zeros(0, np.uint8)
    return data, offsets


def _strings(arr) -> tuple[np.ndarray, np.ndarray]:
    """A string array without nulls as a RecordBlock column: (uint8 values, int64 offsets from 0), copied."""
    if arr.null_count:
        raise _Fallback
    data, offsets = _raw(arr)
    values = data[offsets[0]:offsets[-1]].copy()
    return values, offsets - offsets[0]


def _pool_of(parts: list) -> tuple[np.ndarray, np.ndarray]:
    """Several string arrays as one column (values, offsets), in order: one take indexes them all."""
    if len(parts) == 1:
        return _raw(parts[0])
    values, offsets, base = [], [np.zeros(1, np.int64)], 0
    for p in parts:
        data, off = _raw(p)
        values.append(data[off[0]:off[-1]])
        offsets.append(off[1:] - off[0] + base)
        base += int(off[-1] - off[0])
    return np.concatenate(values), np.concatenate(offsets)


def _take_pool(pool: tuple[np.ndarray, np.ndarray], order: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    from ._core_loader import core

    values, offsets = pool
    return core._take_strings(np.ascontiguousarray(values), np.ascontiguousarray(offsets, np.int64),
                              np.ascontiguousarray(order, np.int64), 1)


def _take(parts: list, order: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The strings at ``order`` of the string arrays ``parts`` taken as one pool (nulls refused)."""
    for p in parts:
        if p.null_count:
            raise _Fallback
    return _take_pool(_pool_of(parts), order)


def _cumsum(counts: np.ndarray) -> np.ndarray:
    out = np.zeros(len(counts) + 1, np.int64)
    np.cumsum(counts, out=out[1:])
    return out
