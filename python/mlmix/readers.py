"""Reading instruction data into mlmix's canonical records.

A canonical record is a dict ``{"id": str, "lang": str | None, "where": str, "messages": [{"role", "content"},
...]}`` (chat-shaped data: ``messages``/ShareGPT ``conversations``, Alpaca ``instruction``/``input``/``output``,
``prompt``/``response``) or ``{"id", "lang", "where", "text": str}`` (pre-training-style text). ``where`` is
the row's location (``data/a.jsonl:17``, ``b.parquet[row 3]``), for errors in later stages; ``id`` is the
source's own id, else :func:`fallback_id`. Everything after the read stage works on these, so a source's
own field names matter only here.

Input is read whole or not at all: a truncated or corrupt compressed stream (gzip, zstd, any number of
frames), a damaged Parquet file, a JSON line cut short or nested too deep raise ValueError naming the
file and, where known, the line, row group or byte offset.

Formats: JSON lines (``.jsonl``/``.json``, optionally ``.gz`` or ``.zst`` compressed), Parquet, HF
``datasets`` saved with ``save_to_disk`` (``hf-disk``) and hub dataset names (``hub``, only where a
network is reachable; otherwise a clear error).
"""

from __future__ import annotations

import gzip
import io
import json
import os
import re
import sys
import zlib
from typing import TYPE_CHECKING, Any, Callable, Generator, Iterator, Mapping

from ._deps import require
from ._shapes import MESSAGES_KEYS, PROMPT_KEYS, RESPONSE_KEYS, records_format, roles_of

if TYPE_CHECKING:
    import numpy as np

    from .recblock import RecordBlock

__all__ = ["expand_paths", "iter_raw", "iter_source", "iter_blocks", "to_record", "fallback_id", "record_text", "source_fingerprint"]

_JSONL_EXT = (".jsonl", ".json", ".ndjson")


def _kind_of(path: str) -> str:
    p = path.lower()
    for comp in ("", ".gz", ".zst"):
        if any(p.endswith(e + comp) for e in _JSONL_EXT):
            return "jsonl"
    if p.endswith(".parquet") or p.endswith(".pq"):
        return "parquet"
    if os.path.isdir(path) and (
        os.path.isfile(os.path.join(path, "dataset_info.json"))
        or os.path.isfile(os.path.join(path, "dataset_dict.json"))
        or os.path.isfile(os.path.join(path, "state.json"))
    ):
        return "hf-disk"
    return "unknown"


def expand_paths(src: Mapping) -> list[str]:
    """The files (or HF dataset directories) a source's ``path`` names: a file, a directory or a glob.

    The path resolves against the config's folder (``base_dir``), taken literally; a path that exists is
    taken literally too, and only otherwise is it a pattern (see :mod:`mlmix._paths` for the rules, the
    escaping of pattern characters and how links, loops and mlmix's own outputs are handled).
    """
    from . import _paths

    path = src["path"]
    fmt = src["format"]
    if fmt == "hub":
        return [path]
    given = src.get("given_path", path)
    base = src.get("base_dir") or os.getcwd()
    exclude = src.get("exclude", ())
    how, found = _paths.expand(base, given, exclude=exclude)
    label = src.get("name") or given
    if fmt == "hf-disk":
        if how != "dir":
            raise FileNotFoundError(f"source {label!r}: {path!r} is not a directory saved by datasets")
        return found
    if how == "missing":
        raise FileNotFoundError(f"source path {given!r} does not exist (looked for {path!r})")
    if how == "file":
        files = found
    elif how == "dir":
        if _kind_of(found[0]) == "hf-disk":
            return found
        files = _paths.walk_files(found[0], lambda p: _kind_of(p) in ("jsonl", "parquet"), exclude=exclude)
    else:
        files = found
    if not files:
        where = f" under {base!r}" if not os.path.isabs(os.path.expanduser(given)) else ""
        raise FileNotFoundError(
            f"source path {given!r} matches no .jsonl(.gz/.zst) or .parquet files{where} (mlmix's own outputs and "
            "names starting with a dot are never matched; to match a pattern character literally, enclose it in "
            "brackets, e.g. 'data[[]1].jsonl')")
    return files


def source_fingerprint(src: Mapping, mode: str = "stat") -> list:
    """What identifies a source's bytes for the cache: (path, size, mtime_ns) per file, or a content hash.

    ``stat`` is instant but trusts the file system's modification times; ``content`` reads every byte
    (sha256). Hub sources are identified by name and split only.
    """
    import hashlib

    out = []
    for p in expand_paths(src):
        if src["format"] == "hub":
            out.append(["hub", p, src.get("split")])
            continue
        files = [p] if os.path.isfile(p) else sorted(
            os.path.join(r, f) for r, _, names in os.walk(p) for f in names
        )
        for f in files:
            st = os.stat(f)
            if mode == "content":
                h = hashlib.sha256()
                with open(f, "rb") as fh:
                    for chunk in iter(lambda: fh.read(1 << 22), b""):
                        h.update(chunk)
                out.append([f, st.st_size, h.hexdigest()])
            else:
                out.append([f, st.st_size, st.st_mtime_ns])
    return out


_ZSTD_PIECE = 1 << 13  # compressed bytes per decompress call: bounds the output of one call (zstd ratios reach ~32768)


class _ZstdFrames(io.RawIOBase):
    """The decompressed bytes of every frame of a ``.zst`` file, in order.

    zstandard's ``stream_reader`` stops at the first frame's end (by default) and, reading across frames,
    returns a frame cut short by a truncated file as if it were whole. This reader decompresses frame by
    frame and raises ``EOFError`` when the file ends inside a frame, as ``gzip`` does for a cut member.
    """

    def __init__(self, path: str):
        zstd = require("zstandard", "reading .zst files")
        self._dctx = zstd.ZstdDecompressor()
        self._frame = self._dctx.decompressobj()
        self._in_frame = False  # the current frame has been given some input and has not ended
        self._fh = open(path, "rb")
        self._out = b""
        self._pos = 0
        self._eof = False
        self._error: Exception | None = None  # raised once the output decoded before it is read

    def readable(self) -> bool:
        return True

    def _fill(self) -> None:
        if self._error is not None:
            raise self._error
        piece = self._fh.read(_ZSTD_PIECE)
        if not piece:
            self._eof = True
            if self._in_frame:
                raise EOFError("the file ends inside a zstd frame")
            return
        parts = []
        try:
            while piece:
                parts.append(self._frame.decompress(piece))
                self._in_frame = True
                if not self._frame.eof:
                    break
                piece = self._frame.unused_data  # the start of the next frame, if any
                self._frame = self._dctx.decompressobj()
                self._in_frame = False
        except Exception as exc:  # the frames that ended whole in this piece are delivered first
            if not parts:
                raise
            self._error = exc
        self._out, self._pos = b"".join(parts), 0

    def readinto(self, buf) -> int:
        while self._pos >= len(self._out):
            if self._eof:
                return 0
            self._fill()
        n = min(len(buf), len(self._out) - self._pos)
        buf[:n] = self._out[self._pos:self._pos + n]
        self._pos += n
        return n

    def close(self) -> None:
        if not self.closed:
            self._fh.close()
        super().close()


def _open_binary(path: str) -> io.BufferedIOBase:
    p = path.lower()
    if p.endswith(".gz"):
        return gzip.open(path, "rb")
    if p.endswith(".zst"):
        return io.BufferedReader(_ZstdFrames(path), buffer_size=1 << 16)
    return open(path, "rb")


def _decompress_errors(path: str) -> tuple:
    """The exceptions a damaged compressed file raises while it is read (none for an uncompressed one)."""
    p = path.lower()
    if p.endswith(".gz"):
        return (EOFError, zlib.error, gzip.BadGzipFile)
    if p.endswith(".zst"):
        return (EOFError, require("zstandard", "reading .zst files").ZstdError)
    return ()


def _damaged(path: str, lineno: int, offset: int, exc: BaseException) -> ValueError:
    where = (f"after line {lineno} (byte offset {offset} of the decompressed data)" if lineno
             else "before its first line")
    if isinstance(exc, EOFError):
        return ValueError(f"{path}: compressed stream is truncated {where}; the file is incomplete "
                          "(an interrupted download or copy?)")
    return ValueError(f"{path}: compressed data is corrupt {where}: {exc}")


def _read_lines(path: str) -> Iterator[tuple[int, bytes]]:
    """(line number, raw line) of a file, decompressing ``.gz``/``.zst``; a damaged or truncated
    compressed stream raises ValueError naming the file and the last line read whole."""
    errors = _decompress_errors(path)
    lineno = offset = 0
    try:
        with _open_binary(path) as f:
            for raw in f:
                lineno += 1
                yield lineno, raw
                offset += len(raw)
    except errors as exc:
        raise _damaged(path, lineno, offset, exc) from None


_MAX_JSON_DEPTH = 512  # deeper lines are refused: Python's json parser recurses once per level
_JSON_STRING = re.compile(r'"(?:[^"\\]|\\.)*"')
_JSON_BRACKET = re.compile(r"[\[\]{}]")


def _json_depth(line: str) -> int:
    """How deep the arrays and objects of a JSON text nest (brackets inside strings do not count)."""
    depth = deepest = 0
    for ch in _JSON_BRACKET.findall(_JSON_STRING.sub("", line)):
        depth += 1 if ch in "[{" else -1
        deepest = max(deepest, depth)
    return deepest


def _parse_line(path: str, lineno: int, line: str, ends_line: bool) -> Any:
    """One JSON line -> its value, or ValueError naming ``path:lineno``."""
    # counting brackets is cheap; only a line with many of them is measured
    if line.count("[") + line.count("{") > _MAX_JSON_DEPTH:
        depth = _json_depth(line)
        if depth > _MAX_JSON_DEPTH:
            raise ValueError(f"{path}:{lineno}: JSON nested deeper than {_MAX_JSON_DEPTH} levels ({depth} levels); "
                             "mlmix does not read such lines")
    try:
        return json.loads(line)
    except RecursionError:  # a recursion limit lowered below what _MAX_JSON_DEPTH assumes
        raise ValueError(f"{path}:{lineno}: JSON nested deeper than Python's recursion limit allows here "
                         f"({_json_depth(line)} levels, sys.getrecursionlimit() = {sys.getrecursionlimit()})") from None
    except json.JSONDecodeError as exc:
        cut = "" if ends_line else "; the file ends inside this line (no newline after it): is it truncated?"
        raise ValueError(f"{path}:{lineno}: not valid JSON ({exc.msg}){cut}") from None


def _jsonl_row(path: str, lineno: int, raw: bytes) -> dict | None:
    """The object of one raw line of a JSON lines file (None for a blank line), or ValueError naming it."""
    # Lines are read as bytes and decoded one by one, so that invalid UTF-8 is reported with its line.
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ValueError(f"{path}:{lineno}: not valid UTF-8 at byte {exc.start} of the line "
                         f"({exc.reason}: {raw[exc.start:exc.start + 4]!r})") from None
    if not line.strip():
        return None
    obj = _parse_line(path, lineno, line, raw.endswith(b"\n"))
    if not isinstance(obj, dict):
        raise ValueError(f"{path}:{lineno}: expected a JSON object per line, got {type(obj).__name__}")
    return obj


def _iter_jsonl(path: str) -> Iterator[tuple[int, str, dict]]:
    """(line number, location, object) of each non-blank line of a JSON lines file."""
    for lineno, raw in _read_lines(path):
        obj = _jsonl_row(path, lineno, raw)
        if obj is not None:
            yield lineno, f"{path}:{lineno}", obj


def _iter_table_rows(table, where: str) -> Iterator[tuple[int, str, dict]]:
    for i, _, rows in _table_batches(table):
        for row in rows():
            yield i, f"{where}[{i}]", row
            i += 1


def _table_batches(table) -> Iterator[tuple[int, Any, Callable[[], list]]]:
    """(index of its first row, record batch, a function giving its rows as dicts) of an Arrow table, 8192 rows
    at most per batch."""
    i = 0
    for batch in table.to_batches(max_chunksize=8192):
        yield i, batch, batch.to_pylist
        i += batch.num_rows


def _open_parquet(path: str):
    pa = require("pyarrow", "reading Parquet files")
    pq = require("pyarrow.parquet", "reading Parquet files")
    try:
        try:  # page checksums, where the writer stored them (pyarrow >= 15 can check them)
            return pq.ParquetFile(path, page_checksum_verification=True)
        except TypeError:
            return pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as exc:
        raise ValueError(f"{path}: not a readable Parquet file (damaged, truncated or another format): {exc}") from None


def _iter_parquet(path: str) -> Iterator[tuple[int, str, dict]]:
    """(row index, location, row) of a Parquet file, row group by row group; a row group that cannot be
    decoded, or that holds fewer or more rows than the footer says, raises ValueError naming it."""
    for i, _, rows in _parquet_batches(path):
        for row in rows():
            yield i, f"{path}[row {i}]", row
            i += 1


def _parquet_batches(path: str) -> Iterator[tuple[int, Any, Callable[[], list]]]:
    """(index of its first row, record batch, a function giving its rows as dicts) of a Parquet file; the errors
    of :func:`_iter_parquet`."""
    pa = require("pyarrow", "reading Parquet files")
    pf = _open_parquet(path)
    i = 0
    for rg in range(pf.num_row_groups):
        expected = pf.metadata.row_group(rg).num_rows
        first = i

        def damaged(exc: BaseException, rg: int = rg, first: int = first, expected: int = expected) -> ValueError:
            return ValueError(f"{path}: row group {rg} (rows {first} to {first + expected - 1}) cannot be "
                              f"read, the file is damaged: {exc}")

        def rows_of(batch) -> Callable[[], list]:
            def rows() -> list:
                try:
                    return batch.to_pylist()
                except (pa.ArrowException, OSError) as exc:
                    raise damaged(exc) from None
            return rows

        batches = pf.iter_batches(batch_size=8192, row_groups=[rg])
        while True:
            try:
                batch = next(batches, None)
            except (pa.ArrowException, OSError) as exc:
                raise damaged(exc) from None
            if batch is None:
                break
            yield i, batch, rows_of(batch)
            i += batch.num_rows
        if i - first != expected:
            raise ValueError(f"{path}: row group {rg} gave {i - first} rows, the file's footer says {expected}: "
                             "the file is damaged")
        # Arrow's allocator keeps what a row group's pages freed for reuse: ~50-100 MB of resident memory that
        # the build never reuses (it holds its records in numpy arrays); handed back to the system here
        release = getattr(pa.default_memory_pool(), "release_unused", None)
        if release is not None:
            release()


def _read_ahead(items: Iterator, depth: int = 2) -> Iterator:
    """The items of ``items`` in order, the next ``depth`` produced on a thread meanwhile (Parquet pages are
    decoded in pyarrow without the GIL while the caller converts the batch before). An exception of ``items``
    is raised here, after the items before it; closing this generator early stops the thread."""
    import queue
    import threading

    q: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def run() -> None:
        try:
            for item in items:
                while not stop.is_set():
                    try:
                        q.put(("item", item), timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
            q.put(("end", None))
        except BaseException as exc:  # handed to the consumer, in order
            q.put(("error", exc))
        finally:
            close = getattr(items, "close", None)
            if close is not None and stop.is_set():
                close()

    thread = threading.Thread(target=run, name="mlmix-read-ahead", daemon=True)
    thread.start()
    try:
        while True:
            kind, value = q.get()
            if kind == "end":
                return
            if kind == "error":
                raise value
            yield value
    finally:
        stop.set()
        while thread.is_alive():  # unblock a put waiting for room, then let the thread see the stop
            try:
                q.get_nowait()
            except queue.Empty:
                pass
            thread.join(timeout=0.05)


def _pick_split(ds, split: str | None, where: str):
    if hasattr(ds, "keys") and not hasattr(ds, "features"):  # a DatasetDict
        names = list(ds.keys())
        if split is None:
            if "train" not in names:
                raise ValueError(f"{where} holds splits {names}; choose one with 'split'")
            split = "train"
        if split not in names:
            raise ValueError(f"{where}: split {split!r} not found; available: {names}")
        return ds[split]
    return ds


def _iter_hf_disk(path: str, split: str | None) -> Iterator[tuple[int, str, dict]]:
    yield from _iter_table_rows(_hf_disk_table(path, split), path)


def _hf_disk_table(path: str, split: str | None):
    datasets = require("datasets", "reading datasets saved to disk")
    ds = _pick_split(datasets.load_from_disk(path), split, path)
    return ds.data.table if hasattr(ds.data, "table") else ds.data


def _iter_hub(name: str, split: str | None) -> Iterator[tuple[int, str, dict]]:
    yield from _iter_table_rows(_hub_table(name, split), f"hub:{name}")


def _hub_table(name: str, split: str | None):
    datasets = require("datasets", "reading hub datasets")
    try:
        ds = datasets.load_dataset(name, split=split or "train")
    except Exception as exc:
        raise ValueError(
            f"hub dataset {name!r} could not be loaded ({type(exc).__name__}: {exc}); hub sources need network "
            "access (or a populated HF cache). Save it with datasets' save_to_disk and use format = 'hf-disk' offline"
        ) from exc
    return ds.data.table if hasattr(ds.data, "table") else ds.data


def _iter_located(src: Mapping) -> Iterator[tuple[str, int, str, dict]]:
    """(file, position in the file, location, raw row) of one source, files sorted by path. The position is
    the line number in a JSON lines file and the row index (from 0) otherwise."""
    fmt = src["format"]
    if fmt == "hub":
        for pos, where, row in _iter_hub(src["path"], src.get("split")):
            yield src["path"], pos, where, row
        return
    for path in expand_paths(src):
        for pos, where, row in _iter_file(src, path, _file_kind(src, path)):
            yield path, pos, where, row


def _file_kind(src: Mapping, path: str) -> str:
    """How one of a source's files is read: 'jsonl', 'parquet' or 'hf-disk' (ValueError otherwise)."""
    kind = src["format"] if src["format"] != "auto" else _kind_of(path)
    if kind not in ("jsonl", "parquet", "hf-disk"):
        raise ValueError(
            f"{path}: cannot tell the format from the name; set the source's format to one of "
            "'jsonl', 'parquet', 'hf-disk' (accepted extensions: .jsonl/.json/.ndjson[.gz|.zst], .parquet)"
        )
    return kind


def _iter_file(src: Mapping, path: str, kind: str) -> Iterator[tuple[int, str, dict]]:
    if kind == "jsonl":
        return _iter_jsonl(path)
    if kind == "parquet":
        return _iter_parquet(path)
    return _iter_hf_disk(path, src.get("split"))


def iter_raw(src: Mapping) -> Iterator[tuple[str, dict]]:
    """(location, raw row) pairs of one source, in a deterministic order (files sorted by path)."""
    for _, _, where, row in _iter_located(src):
        yield where, row


def fallback_id(src: Mapping, file: str, index: int) -> str:
    """The id of a row that has no ``id_field``: where it comes from, unique across the sources of a build.

    ``<file>:<index>``, the file's path relative to the config's folder (``src["base_dir"]``, else the
    current directory) with ``/`` separators and the row's line number (JSON lines) or row index from 0
    (Parquet, datasets); prefixed by ``<name>:`` when the source has a name. A hub source stands as
    ``hub:<dataset>:<split>``, a ``datasets`` directory read with a ``split`` as ``<dir>[<split>]``.
    Two sources share a fallback id only when they read the same row of the same file under the same name.
    """
    if src["format"] == "hub":
        part = f"hub:{src['path']}:{src.get('split') or 'train'}"
    else:
        base = src.get("base_dir") or os.getcwd()
        try:
            part = os.path.relpath(file, base)
        except ValueError:  # another drive (Windows): no relative path exists
            part = os.path.abspath(file)
        part = part.replace(os.sep, "/")
        if src.get("split") is not None and os.path.isdir(file):
            part += f"[{src['split']}]"
    name = src.get("name")
    return f"{name}:{part}:{index}" if name else f"{part}:{index}"


def _as_text(value: Any, where: str, field: str) -> str:
    if not isinstance(value, str):
        raise ValueError(f"{where}: field {field!r} must be a string, got {type(value).__name__} {value!r:.60}")
    return value


def _get(row: Mapping, fields: Mapping, canonical: str, candidates: tuple[str, ...]) -> tuple[str | None, Any]:
    """The (field name, value) for a canonical field: the mapped name if configured, else the first present."""
    if canonical in fields:
        name = fields[canonical]
        return (name, row[name]) if name in row and row[name] is not None else (name, None)
    for name in candidates:
        if name in row and row[name] is not None:
            return name, row[name]
    return None, None


def to_record(row: Mapping, src: Mapping, where: str, index: int, file: str | None = None) -> dict:
    """One raw row -> a canonical record (see the module docstring). Raises ValueError naming ``where``.

    ``where`` is the row's location (``path:line`` or ``path[row i]``), kept in the record under
    ``"where"`` so that later stages name it too; ``file`` (default: the source's path) and ``index`` (the
    row's line number or row index in that file) make the id of a row without one (:func:`fallback_id`).
    """
    fields = src["fields"]
    roles = roles_of(src)
    fmt = src["records"]
    rec_id = row.get(src["id_field"])
    if rec_id is None:
        rec_id = fallback_id(src, src["path"] if file is None else file, index)
    if "lang" in src:
        lang = src["lang"]
    else:
        lang = row.get(src["lang_field"])
        if lang is not None and not isinstance(lang, str):
            raise ValueError(f"{where}: field {src['lang_field']!r} must be a language code string, got {lang!r}")
        lang = lang or None
    out: dict = {"id": str(rec_id), "lang": lang, "where": where}

    fmt = records_format(fmt, row, fields)
    if fmt == "text":
        name, text = _get(row, fields, "text", ("text", "content"))
        if text is None:
            raise ValueError(f"{where}: no text field (looked for {name or 'text'!r}); map it with fields.text")
        out["text"] = _as_text(text, where, name)
        return out

    messages: list[dict] = []
    sys_name, system = _get(row, fields, "system", ("system",))
    if system:
        messages.append({"role": "system", "content": _as_text(system, where, sys_name)})
    if fmt == "messages":
        name, conv = _get(row, fields, "messages", MESSAGES_KEYS)
        if not isinstance(conv, list) or not conv:
            raise ValueError(f"{where}: field {name or 'messages'!r} must be a non-empty list of messages, got {conv!r:.80}")
        role_key = fields.get("role")
        content_key = fields.get("content")
        for j, m in enumerate(conv):
            if not isinstance(m, Mapping):
                raise ValueError(f"{where}: {name}[{j}] must be a mapping with a role and a content, got {m!r:.60}")
            rk = role_key or ("role" if "role" in m else "from")
            ck = content_key or ("content" if "content" in m else "value")
            if rk not in m or ck not in m:
                raise ValueError(f"{where}: {name}[{j}] lacks {rk!r} or {ck!r} (map them with fields.role/fields.content)")
            role = roles.get(m[rk]) if isinstance(m[rk], str) else None
            if role is None:
                raise ValueError(
                    f"{where}: {name}[{j}].{rk} = {m[rk]!r} is not a known role; known: {sorted(roles)} "
                    "(add a mapping under the source's roles)"
                )
            messages.append({"role": role, "content": _as_text(m[ck], where, f"{name}[{j}].{ck}")})
    else:
        if fmt == "alpaca":
            p_name, prompt = _get(row, fields, "instruction", ("instruction",))
            r_name, response = _get(row, fields, "output", ("output",) + RESPONSE_KEYS)
            i_name, extra = _get(row, fields, "input", ("input",))
        else:
            p_name, prompt = _get(row, fields, "prompt", PROMPT_KEYS)
            r_name, response = _get(row, fields, "response", RESPONSE_KEYS)
            i_name, extra = None, None
        if prompt is None or response is None:
            missing = "a prompt" if prompt is None else "a response"
            raise ValueError(
                f"{where}: could not find {missing} (fields present: {sorted(row)[:12]}); "
                "set the source's records format and fields mapping"
            )
        prompt = _as_text(prompt, where, p_name)
        if extra:
            prompt = prompt + "\n\n" + _as_text(extra, where, i_name)
        messages.append({"role": "user", "content": prompt})
        messages.append({"role": "assistant", "content": _as_text(response, where, r_name)})
    if not any(m["role"] == "assistant" for m in messages):
        raise ValueError(f"{where}: the conversation has no assistant turn, so nothing would be learned from it")
    out["messages"] = messages
    return out


def _matches(row: Mapping, where: Mapping) -> bool:
    return all(row.get(k) == v for k, v in where.items())


def iter_source(src: Mapping, on_row: Callable[[], None] | None = None) -> Iterator[dict]:
    """Canonical records of one source, after its ``where`` filter and ``limit``."""
    n = 0
    limit = src.get("limit")
    for file, pos, where, row in _iter_located(src):
        if src["where"] and not _matches(row, src["where"]):
            continue
        if limit is not None and n >= limit:
            break
        yield to_record(row, src, where, pos, file)
        n += 1


# ---- the native reader: JSON lines straight into RecordBlock columns ----------------------------------------------

_RECORD_FORMATS = ("auto", "messages", "alpaca", "prompt_response", "text")


def iter_blocks(src: Mapping, block_bytes: int = 16 << 20, *, num_threads: int = 0) -> Iterator[RecordBlock]:
    """The records of one source as :class:`~mlmix.recblock.RecordBlock` columns, a block at a time.

    Exactly ``RecordBlock.from_records(list(iter_source(src)))`` cut into blocks: the same records in the same
    order, and the same errors with the same messages (an error is raised where that list would stop, and a
    block is only yielded once its records are known to be good). JSON lines files (plain, ``.gz``, ``.zst``;
    decompressed here) are read ``block_bytes`` of whole lines at a time by the C++ reader on ``num_threads``
    threads (0: ``MLMIX_NUM_THREADS``, else every core), with no Python object per record; the few lines it
    does not take on (anything where its result could differ from Python's, including every line that makes
    the Python path raise) go through the Python path. Parquet files, ``datasets`` directories and hub datasets
    are read Arrow batch by batch into columns (:mod:`mlmix._arrow_records`; a batch that path cannot vouch for
    goes row by row through :func:`to_record`). A ``where`` filter is applied on the way: by the C++ reader
    (values that are None, str, int or bool; a source filtering on other values reads its JSON lines in Python)
    and on Arrow columns (:func:`mlmix._arrow_records.where_rows`; a batch it cannot decide is tested row by row).
    """
    if block_bytes < 1:
        raise ValueError(f"block_bytes must be >= 1, got {block_bytes}")
    held = _HeldBack()
    settings = _native_settings(src)
    if settings is None or (src["format"] == "hub" and not _encodable(src["path"])):
        for recs in _record_batches(iter_source(src), block_bytes):
            block = held.encode(recs)
            if block is not None and not held.failed:
                yield block
        held.raise_if_failed()
        return

    limit = src.get("limit")
    count = 0  # records so far
    if src["format"] == "hub":
        yield from _arrow_file_blocks(src, src["path"], "hub", limit, count, block_bytes, held)
        held.raise_if_failed()
        return
    for path in expand_paths(src):
        kind = _file_kind(src, path)
        if kind in ("parquet", "hf-disk") and _encodable(path):
            count, stop = yield from _arrow_file_blocks(src, path, kind, limit, count, block_bytes, held)
            if stop:
                break
            continue
        if kind != "jsonl" or not _encodable(path) or settings["where"] is None:
            rows = _iter_file(src, path, kind)
            if src["where"]:
                rows = (t for t in rows if _matches(t[2], src["where"]))
            if limit is not None and count >= limit:
                if next(rows, None) is not None:
                    break
                continue
            recs: list[dict] = []
            size = 0
            stop = False
            for pos, where, row in rows:
                if limit is not None and count >= limit:
                    stop = True
                    break
                recs.append(to_record(row, src, where, pos, path))
                count += 1
                size += _record_size(recs[-1])
                if size >= block_bytes:
                    block = held.encode(recs)
                    if block is not None and not held.failed:
                        yield block
                    recs, size = [], 0
            if recs:
                block = held.encode(recs)
                if block is not None and not held.failed:
                    yield block
            if stop:
                break
            continue

        reader = _NativeFile(src, path, settings, num_threads)
        stop = False
        first = 1  # the number of the buffer's first line
        for buf in _line_buffers(path, block_bytes):
            if limit is not None and count >= limit:  # the limit is reached: is there a row after it?
                found, nlines = reader.has_row(first, buf)
                if found:
                    stop = True
                    break
                first += nlines
                continue
            block, more, nlines = reader.block(first, buf, None if limit is None else limit - count, held)
            first += nlines
            count += len(block)
            if len(block) and not held.failed:
                yield block
            if more:  # the limit is reached and a row follows it
                stop = True
                break
        if stop:
            break
    held.raise_if_failed()


def _arrow_file_blocks(src: Mapping, path: str, kind: str, limit: int | None, count: int, block_bytes: int,
                       held: "_HeldBack") -> Generator[RecordBlock, None, tuple[int, bool]]:
    """The blocks of a Parquet file, a ``datasets`` directory or a hub dataset (``path`` its name), Arrow batch by
    batch: columns straight from Arrow where :mod:`mlmix._arrow_records` vouches for a batch, else its rows through
    to_record. Returns (records so far, whether the limit stopped the source)."""
    if kind == "parquet":
        batches = _read_ahead(_parquet_batches(path))
        where = (f"{path}[row ", "]")
    elif kind == "hub":
        batches = _table_batches(_hub_table(path, src.get("split")))
        where = (f"hub:{path}[", "]")
    else:
        batches = _table_batches(_hf_disk_table(path, src.get("split")))
        where = (f"{path}[", "]")
    try:
        return (yield from _batch_blocks(src, path, batches, where, limit, count, block_bytes, held))
    finally:  # the read-ahead thread stops here, also where an error keeps this frame alive in its traceback
        close = getattr(batches, "close", None)
        if close is not None:
            close()


def _batch_blocks(src: Mapping, path: str, batches: Iterator, where: tuple[str, str], limit: int | None, count: int,
                  block_bytes: int, held: "_HeldBack") -> Generator[RecordBlock, None, tuple[int, bool]]:
    """:func:`_arrow_file_blocks` over its (first row, batch, rows function) triples; ``where``: the prefix and suffix
    of a row's location around its number."""
    import numpy as np

    from ._arrow_records import batch_block, convertible, where_rows
    from .recblock import RecordBlock

    id_prefix = fallback_id(src, path, 0)[:-1]  # the fallback id of row 0 ends with its number, "0"
    roles = roles_of(src)
    pending: list = []
    size = 0
    stop = False
    filt = src["where"]
    for first, batch, rows in batches:
        # the rows the filter keeps (None: all): from the columns, else (a batch where_rows cannot decide) row by row
        # as iter_source tests them
        select = where_rows(batch, filt) if filt else None
        if filt and select is None:
            select = np.array([k for k, row in enumerate(rows()) if _matches(row, filt)], np.int64)
        n = batch.num_rows if select is None else len(select)
        if n == 0 or (limit is not None and count >= limit):
            # nothing to read here, or the limit is reached (is there a row after it?); the Python path has
            # converted this batch all the same, and fails where that fails
            if batch.num_rows and not convertible(batch):
                rows()
            if n and limit is not None and count >= limit:
                stop = True
                break
            continue
        take = None if limit is None or count + n <= limit else limit - count
        block = batch_block(batch, src, roles=roles, id_prefix=id_prefix, where_prefix=where[0],
                            where_suffix=where[1], first=first, take=take, select=select)
        if block is None:  # row by row: the Python path's records, or its error
            got = rows()
            ks = range(len(got)) if select is None else select.tolist()
            recs = [to_record(got[k], src, f"{where[0]}{first + k}{where[1]}", first + k, path) for k in ks[:take]]
            count += len(recs)
            block = held.encode(recs)
        else:
            count += len(block)
        if block is not None and not held.failed:
            for piece, size in _cut(block, size, block_bytes):
                pending.append(piece)
                if size >= block_bytes:
                    yield RecordBlock.concat(pending)
                    pending, size = [], 0
        if take is not None:  # the limit cut this batch: a row follows
            stop = True
            break
    if pending and not held.failed:
        yield RecordBlock.concat(pending)
    return count, stop


def _cut(block, size: int, block_bytes: int) -> Iterator[tuple[Any, int]]:
    """(piece, size so far) of a block cut where the pending size (``size``, then each record's content bytes +
    64) reaches ``block_bytes``, as the row-by-row path cuts its record lists: the last piece may end short."""
    import numpy as np

    n = len(block)
    co = block.content_offsets
    sizes = co[block.turn_offsets[1:]] - co[block.turn_offsets[:-1]] + 64
    cum = np.cumsum(sizes)
    start, prev = 0, 0
    while start < n:
        k = int(np.searchsorted(cum, block_bytes - size + prev, side="left"))  # first record reaching the bound
        if k >= n:
            yield _slice(block, start, n), size + int(cum[-1]) - prev
            return
        yield _slice(block, start, k + 1), block_bytes
        start, prev, size = k + 1, int(cum[k]), 0


def _native_settings(src: Mapping) -> dict | None:
    """The per-source arguments of the C++ reader, or None where the Python path must read the source (settings
    to_record would read another way, or strings that are not valid Unicode)."""
    try:
        fields, roles = src["fields"], roles_of(src)
        records, id_field = src["records"], src["id_field"]
        if "lang" in src:
            lang_field, lang = None, src["lang"]
            if lang is not None and not isinstance(lang, str):
                return None
        else:
            lang_field, lang = src["lang_field"], None
            if not isinstance(lang_field, str):
                return None
    except (KeyError, TypeError, AttributeError):
        return None
    strings = [id_field, lang, lang_field, *fields.keys(), *fields.values(), *roles.keys(), *roles.values()]
    if (records not in _RECORD_FORMATS or not isinstance(fields, Mapping)
            or not all(s is None or isinstance(s, str) for s in strings) or not all(map(_encodable, strings))):
        return None
    return {"records": records, "fields": dict(fields), "roles": roles, "id_field": id_field,
            "lang_field": lang_field, "lang": lang, "where": _native_where(src.get("where") or {})}


def _native_where(where: Mapping) -> list[tuple[str, str, str]] | None:
    """The C++ reader's terms (key, kind, value) of a ``where`` filter, or None where it has no native test (keys
    that are not str, values other than None, str, int and bool)."""
    terms = []
    for k, v in where.items():
        if type(k) is not str or not _encodable(k):
            return None
        if v is None:
            terms.append((k, "none", ""))
        elif type(v) is bool:
            terms.append((k, "bool", "1" if v else "0"))
        elif type(v) is int:
            try:
                terms.append((k, "int", str(v)))
            except ValueError:  # past sys.get_int_max_str_digits
                return None
        elif type(v) is str and _encodable(v):
            terms.append((k, "str", v))
        else:
            return None
    return terms


def _encodable(s: str | None) -> bool:
    try:
        s is None or s.encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False


def _record_size(rec: Mapping) -> int:
    if "text" in rec:
        return len(rec["text"]) + 64
    return sum(len(m["content"]) for m in rec["messages"]) + 64


def _record_batches(records: Iterator[dict], block_bytes: int) -> Iterator[list[dict]]:
    recs: list[dict] = []
    size = 0
    for rec in records:
        recs.append(rec)
        size += _record_size(rec)
        if size >= block_bytes:
            yield recs
            recs, size = [], 0
    if recs:
        yield recs


class _HeldBack:
    """RecordBlock.from_records of Python-made records, with its failure (a string that UTF-8 cannot encode, such
    as a lone surrogate) held back to the end: ``from_records(list(iter_source(src)))`` raises it only after
    every read and record error. The failing records are kept, so that the error raised at the end is the one
    from_records of all the records raises (the first bad id, else lang, where, role, content)."""

    def __init__(self) -> None:
        self.failed = False
        self._bad: list[dict] = []

    def encode(self, recs: list[dict]):
        from .recblock import RecordBlock

        try:
            return RecordBlock.from_records(recs)
        except Exception:
            self.failed = True
            self._bad.extend(r for r in recs if not _encodes(r))
            return None

    def raise_if_failed(self) -> None:
        from .recblock import RecordBlock

        if self.failed:
            RecordBlock.from_records(self._bad)  # raises
            raise AssertionError("records that failed to encode encoded on their own")  # pragma: no cover


def _encodes(rec: dict) -> bool:
    from .recblock import RecordBlock

    try:
        RecordBlock.from_records([rec])
        return True
    except Exception:
        return False


def _line_buffers(path: str, block_bytes: int) -> Iterator[bytes | memoryview]:
    """Whole lines of a JSON lines file, about ``block_bytes`` at a time (more where one line is longer); the last
    line may lack its newline. A plain file is read into one buffer, reused: each piece is a memoryview of it,
    released when the next piece is asked for. A damaged compressed stream raises as :func:`_read_lines` does,
    after the lines read whole before the damage have been given."""
    if not path.lower().endswith((".gz", ".zst")):
        import numpy as np

        with open(path, "rb", buffering=0) as f:
            # no bigger than the file (many small files must not each cost a block), grown for a longer line;
            # uninitialised (numpy's memory, advised for huge pages when large): a bytearray would be zero-filled
            buf = np.empty(max(1, min(block_bytes, os.fstat(f.fileno()).st_size + 1)), np.uint8)
            have = 0  # bytes of an unfinished line at the front of buf
            while True:
                if have == len(buf):  # a line longer than the buffer
                    grown = np.empty(2 * len(buf), np.uint8)
                    grown[:have] = buf[:have]
                    buf = grown
                with memoryview(buf) as whole, whole[have:] as room:
                    n = f.readinto(room)
                if not n:
                    if have:
                        with memoryview(buf) as whole, whole[:have] as piece:
                            yield piece
                    return
                total = have + n
                cut = _last_newline(buf, total) + 1
                if cut == 0:
                    have = total
                    continue
                with memoryview(buf) as whole, whole[:cut] as piece:
                    yield piece
                buf[:total - cut] = buf[cut:total].copy()
                have = total - cut
    # Compressed: line by line, as _read_lines reads, so that damage is found after the same lines.
    errors = _decompress_errors(path)
    lines, offset, parts, size = 0, 0, [], 0  # lines and bytes given before parts
    try:
        with _open_binary(path) as f:
            for raw in f:
                parts.append(raw)
                size += len(raw)
                if size >= block_bytes:
                    yield b"".join(parts)
                    lines, offset, parts, size = lines + len(parts), offset + size, [], 0
    except errors as exc:
        damage = _damaged(path, lines + len(parts), offset + size, exc)
    else:
        if parts:
            yield b"".join(parts)
        return
    if parts:
        yield b"".join(parts)
    raise damage


def _last_newline(buf: np.ndarray, end: int) -> int:
    """The position of the last b"\\n" in ``buf[:end]``, or -1: searched backwards a window at a time (a line is
    rarely longer than one)."""
    hi = end
    while hi > 0:
        lo = max(0, hi - (1 << 16))
        at = buf[lo:hi].tobytes().rfind(b"\n")
        if at >= 0:
            return lo + at
        hi = lo
    return -1


def _split_lines(first: int, buf: bytes | memoryview) -> Iterator[tuple[int, bytes]]:
    lines = bytes(buf).split(b"\n")
    last = lines.pop()
    for i, line in enumerate(lines):
        yield first + i, line + b"\n"
    if last:
        yield first + len(lines), last


def _python_depth_room() -> int:
    """The deepest nesting the C++ reader takes on: 512 (as _parse_line), less where Python's recursion limit
    would stop json.loads first (those lines go to the Python path, which says so)."""
    depth, f = 0, sys._getframe()
    while f is not None:
        depth, f = depth + 1, f.f_back
    return max(1, min(_MAX_JSON_DEPTH, sys.getrecursionlimit() - depth - 64))


class _NativeFile:
    """The C++ reader on the buffers of one JSON lines file, with the lines it hands back read by the Python path."""

    def __init__(self, src: Mapping, path: str, settings: dict, num_threads: int) -> None:
        fid = fallback_id(src, path, 0)
        if not fid.endswith(":0"):  # pragma: no cover - fallback_id's form is <...>:<index>
            raise AssertionError(f"unexpected fallback id form {fid!r}")
        self.src, self.path = src, path
        self.args = dict(settings, id_prefix=fid[:-1], where_prefix=f"{path}:", num_threads=num_threads)

    def has_row(self, first: int, buf: bytes | memoryview) -> tuple[bool, int]:
        """(whether these lines hold a row, the number of lines); the Python path's checks run on the lines up
        to the row."""
        n = 0
        where = self.src["where"]
        for lineno, raw in _split_lines(first, buf):
            row = _jsonl_row(self.path, lineno, raw)
            if row is not None and (not where or _matches(row, where)):
                return True, n + 1
            n += 1
        return False, n

    def block(self, first: int, buf: bytes | memoryview, room: int | None, held: _HeldBack):
        """(the block of these lines' records, at most ``room`` of them; whether a row follows the last one
        taken when ``room`` cut it short; the number of lines)."""
        import numpy as np

        from ._core_loader import core
        from .recblock import RecordBlock

        cols = core._records_from_jsonl(buf, first, max_depth=_python_depth_room(), **self.args)
        nlines = cols.pop("lines")
        lines = cols.pop("line")
        hb = (cols.pop("handback_line").tolist(), cols.pop("handback_begin").tolist(), cols.pop("handback_end").tolist())
        block = RecordBlock(**cols)
        py_recs: list[dict] = []
        py_lines: list[int] = []
        more = False
        for lineno, begin, end in zip(*hb):
            before = int(np.searchsorted(lines, lineno)) + len(py_recs)  # records on earlier lines
            if room is not None and before > room:
                more = True
                break
            row = _jsonl_row(self.path, lineno, bytes(buf[begin:end]))
            if row is None or (self.src["where"] and not _matches(row, self.src["where"])):
                continue
            if room is not None and before == room:
                more = True
                break
            py_recs.append(to_record(row, self.src, f"{self.path}:{lineno}", lineno, self.path))
            py_lines.append(lineno)
        if room is not None and len(lines) + len(py_recs) > room:
            more = True
        keep = len(lines) + len(py_recs) if room is None else min(room, len(lines) + len(py_recs))
        if py_recs:
            py_block = held.encode(py_recs)
            if py_block is None:  # held back: the source fails at its end; the counts still matter for the limit
                return _Count(keep), more, nlines
            block = _interleave(block, lines, py_block, np.asarray(py_lines, np.int64))
        if keep < len(block):
            block = _slice(block, 0, keep)
        return block, more, nlines


class _Count:
    """Stands for a block that is never yielded (its source will fail): only its length counts."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n


def _slice(block, lo: int, hi: int):
    """Records lo:hi of a block, without a Python step per record."""
    from .recblock import STRING_COLUMNS, RecordBlock

    t0, t1 = int(block.turn_offsets[lo]), int(block.turn_offsets[hi])
    cols = {"kind": block.kind[lo:hi], "has_lang": block.has_lang[lo:hi],
            "turn_offsets": block.turn_offsets[lo:hi + 1] - t0}
    for c in STRING_COLUMNS:
        a, b = (t0, t1) if c in ("role", "content") else (lo, hi)
        offs = getattr(block, f"{c}_offsets")[a:b + 1]
        cols[f"{c}_values"] = getattr(block, f"{c}_values")[int(offs[0]):int(offs[-1])]
        cols[f"{c}_offsets"] = offs - offs[0]
    return RecordBlock(**cols)


def _interleave(native, native_lines, py_block, py_lines):
    """The records of two blocks in line order (each block's records are in line order already)."""
    import numpy as np

    from .recblock import RecordBlock

    at = np.searchsorted(native_lines, py_lines)  # native records before each Python one
    pieces = []
    prev = 0
    for j, a in enumerate(at.tolist()):
        if a > prev:
            pieces.append(_slice(native, prev, a))
        pieces.append(_slice(py_block, j, j + 1))
        prev = a
    if prev < len(native):
        pieces.append(_slice(native, prev, len(native)))
    return RecordBlock.concat(pieces)


def record_text(rec: Mapping) -> str:
    """The text of a record for language identification and dedup: its contents joined by newlines."""
    if "text" in rec:
        return rec["text"]
    return "\n".join(m["content"] for m in rec["messages"] if m["role"] != "system")
