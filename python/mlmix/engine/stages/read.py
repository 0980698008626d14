"""Stage ``read``: every source into canonical records (:mod:`mlmix.readers`).

A record's identity across the build is its ``uid = source index << 40 | position in the source``
(int64). It sorts like the order in which one process reads the sources, so "the first seen" means the
same thing whichever executor ran the stage and however the records were split into blocks.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator, Mapping, Sequence

import numpy as np

from ... import readers
from ...cache import stage_key
from ...recblock import TEXT, RecordBlock
from ..log import rate

VERSION = 4  # 3: the records are cached as RecordBlock columns, not JSON lines; 4: in RecordBlock files, not .npz
UID_SHIFT = 40  # 2**40 records per source, 2**23 sources


def key(cfg: Mapping) -> str:
    """What a source reads is its settings and its files' fingerprints; where this build writes is not part of it."""
    fingerprints = [readers.source_fingerprint(s, cfg["fingerprint"]) for s in cfg["sources"]]
    return stage_key("read", VERSION, [{k: v for k, v in s.items() if k != "exclude"} for s in cfg["sources"]],
                     fingerprints)


def source_name(src: Mapping) -> str:
    return src.get("name") or src["path"]


def records(index: int, src: Mapping) -> Iterator[tuple[int, dict]]:
    """(uid, canonical record) of source ``index``, in the source's order."""
    base = index << UID_SHIFT
    for pos, rec in enumerate(readers.iter_source(src)):
        yield base | pos, rec


def blocks(index: int, src: Mapping, max_records: int | None = None) -> Iterator[tuple[np.ndarray, RecordBlock]]:
    """(uids, RecordBlock) of source ``index``, in the source's order, in blocks of at most ``max_records``
    records: the columns the C++ reader fills straight from JSON lines (:func:`mlmix.readers.iter_blocks`)."""
    base = np.int64(index) << UID_SHIFT
    pos = 0
    for block in _source_blocks(src):
        n = len(block)
        step = max_records or n or 1
        for lo in range(0, n, step):
            piece = block if (lo == 0 and step >= n) else block.take(np.arange(lo, min(n, lo + step)))
            yield base + np.arange(pos, pos + len(piece), dtype=np.int64), piece
            pos += len(piece)


def _source_blocks(src: Mapping) -> Iterator[RecordBlock]:
    iter_blocks = getattr(readers, "iter_blocks", None)
    if iter_blocks is not None:
        yield from iter_blocks(src)
        return
    batch: list[dict] = []
    for rec in readers.iter_source(src):
        batch.append(rec)
        if len(batch) >= 4096:
            yield RecordBlock.from_records(batch)
            batch = []
    if batch:
        yield RecordBlock.from_records(batch)


def count_block(uids: np.ndarray, block: RecordBlock) -> dict:
    """:func:`count` of a RecordBlock, from its columns (no Python object per record where its language codes
    are short, as they are): the same counters, keys in order of first appearance."""
    n = len(block)
    if len(uids) != n:
        raise ValueError(f"uids must have one entry per record ({n}), got {len(uids)}")
    lens = np.diff(block.lang_offsets) * (block.has_lang != 0)
    width = int(lens.max()) if n else 0
    if width > 64 or not block.lang_values.all():  # long codes, or NUL bytes (fixed-width strings drop them)
        return count(uids, block.langs(), (block.kind == TEXT).tolist())
    # each code as a fixed-width byte string (zero padded), "?" where a record gives none or ""
    raw = np.zeros((n, max(width, 1)), np.uint8)
    rows = np.repeat(np.arange(n), lens)
    starts = block.lang_offsets[:-1]
    pos = np.arange(int(lens.sum())) - np.repeat(np.cumsum(lens) - lens, lens)
    raw[rows, pos] = block.lang_values[np.repeat(starts, lens) + pos]
    raw[lens == 0, 0] = ord("?")
    codes = raw.view(f"S{raw.shape[1]}").ravel()
    return {"per_source": _first_seen(np.asarray(uids, dtype=np.int64) >> UID_SHIFT, int),
            "given": _first_seen(codes, lambda b: b.decode("utf-8")),
            "kinds": _first_seen(np.where(block.kind == TEXT, 0, 1), lambda k: ("text", "chat")[k])}


def _first_seen(values: np.ndarray, name) -> Counter:
    """Counter of ``values`` (keys ``name(value)``) in order of first appearance, as Counter(iterable) makes it."""
    uniq, first, counts = np.unique(values, return_index=True, return_counts=True)
    out: Counter = Counter()
    for k in np.argsort(first, kind="stable").tolist():
        out[name(uniq[k].item())] = int(counts[k])
    return out


def uids_of(per_source: Sequence[int]) -> np.ndarray:
    """The uids of every record, in order, from the number of records of each source."""
    parts = [(np.int64(i) << UID_SHIFT) + np.arange(n, dtype=np.int64) for i, n in enumerate(per_source)]
    return np.concatenate(parts) if parts else np.zeros(0, np.int64)


def uid_name(uid: int, num_sources: int) -> str:
    """How errors name a record: its position (one source), else ``source:position``."""
    src, pos = int(uid) >> UID_SHIFT, int(uid) & ((1 << UID_SHIFT) - 1)
    return str(pos) if num_sources == 1 else f"{src}:{pos}"


def count(uids: np.ndarray, given: Sequence[str | None], kinds: Sequence[bool]) -> dict:
    """The counts of one block of records (``kinds``: True for a text record, False for a chat)."""
    return {"per_source": Counter((np.asarray(uids, dtype=np.int64) >> UID_SHIFT).tolist()),
            "given": Counter(g or "?" for g in given),
            "kinds": Counter("text" if k else "chat" for k in kinds)}


def merge(a: dict | None, b: dict) -> dict:
    if a is None:
        return {k: Counter(v) for k, v in b.items()}
    for k, v in b.items():
        a[k].update(v)
    return a


def finish(counts: dict | None, sources: Sequence[Mapping]) -> dict:
    """The stage statistics; a source that gave no record is an error naming it."""
    counts = counts or {"per_source": Counter(), "given": Counter(), "kinds": Counter()}
    for i, src in enumerate(sources):
        if counts["per_source"].get(i, 0) == 0:
            raise ValueError(f"sources[{i}] ({source_name(src)}): no records were read")
    per = [{"source": source_name(s), "records": int(counts["per_source"][i])} for i, s in enumerate(sources)]
    return {"records": sum(p["records"] for p in per), "sources": per,
            "langs": dict(sorted(counts["given"].items())), "kinds": dict(counts["kinds"])}


def summary(s: Mapping) -> str:
    return f"{s['records']:,} records from {len(s['sources'])} source(s)" + rate(s["records"], s.get("seconds", 0), "rec")
