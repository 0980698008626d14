"""``mlmix build``: one config runs read -> langid -> tokenize -> dedup -> mix -> pack (-> store, report).

Each stage is a plain function over arrays and lists, cached under ``cache_dir`` by a key that hashes
its configuration and the key of the stage it reads from (see :mod:`mlmix.cache`), so a rerun redoes
only the stages downstream of a change. Order of the stages and why:

- ``read``: every source into canonical records (:mod:`mlmix.readers`), one JSON line each.
- ``langid``: a language for every record that has none (py3langid), below the threshold ``unknown``.
- ``tokenize``: every record, with the chat template and loss mask. It runs before dedup and mixing
  (their keys do not feed it) so that changing a recipe or a dedup threshold, the common iteration,
  never re-tokenizes, and so that the report can count tokens per language at every stage exactly.
- ``dedup``: exact then near duplicates, within each language by default; the first seen is kept.
- ``mix``: the mixture recipe over the (source id, language) rows that survived dedup.
- ``pack``: the selected examples packed into ``seq_len`` sequences and written, with the mixture, the
  tokenizer and ``build.json`` (every stage's statistics), into the output directory. The output is
  assembled in a temporary directory and renamed into place, so it is always complete or absent.

Memory is bounded whatever the input size (docs/memory.md): records are read and written one at a
time, tokens and loss masks are appended to files chunk by chunk and memory-mapped afterwards, dedup
reads texts in chunks (near dedup one language at a time), and packing plans from the lengths alone and
gathers tokens in bounded blocks. What stays in memory is a few arrays with one entry per record.

The output directory::

    OUTPUT/store/          the packed store (mlmix.open)
    OUTPUT/mixture.json    the mixture manifest (mlmix.Mixture.load), absent for recipe "all"
    OUTPUT/tokenizer.json  the tokenizer, to decode samples (inspect, report); absent for the bundled
                           tokenizers (tokenizer.name), which build.json names
    OUTPUT/build.json      config, stage keys and statistics
    OUTPUT/report.html     the report (mlmix report)
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sys
import tempfile
import time
from collections import Counter
from typing import Any, Callable, Iterator, Mapping, Sequence

import numpy as np

from . import readers
from ._atomic import atomic_directory
from ._outputs import check_build_targets, check_sealed, read_marker, seal
from .cache import StageCache, stage_key
from .config import load_config
from .ragged import Ragged, RaggedWriter, drop_mapped_pages

__all__ = ["build", "BuildLog", "STAGES", "BUILD_FORMAT"]

STAGES = ("read", "langid", "tokenize", "dedup", "mix", "pack")
BUILD_FORMAT = 1
# bump when a stage's output format or semantics change, so old cache entries are not reused
_STAGE_VERSION = {"read": 2, "langid": 1, "tokenize": 2, "dedup": 3, "mix": 1, "pack": 3}
_TOKENIZE_CHUNK = 4096  # records encoded at a time ...
_CHUNK_BYTES = 16 << 20  # ... or fewer, once they hold this much JSON (bounds memory for long records)


# ---- logging and progress ----------------------------------------------------------------------
class BuildLog:
    """Stage progress and one summary line per stage, on stderr.

    ``progress`` chooses how running stages show their progress: ``None`` (default) decides by where
    stderr goes: a terminal gets tqdm bars, a Jupyter notebook tqdm's notebook bars (``tqdm.auto``), and
    anything else (a log file, CI, a pipe) a plain line every ``log_every`` seconds while a stage runs
    (``tokenize 41,000/120,000 rec (34%), 1.9M tok/s encoding, 20s``), so logs get progress without
    carriage-return noise. ``True`` forces bars, ``False`` shows no progress (summary lines only).
    ``quiet`` silences everything but errors.
    """

    def __init__(self, *, quiet: bool = False, verbose: bool = False, progress: bool | None = None, stream=None,
                 log_every: float = 15.0):
        self.quiet = quiet
        self.verbose = verbose and not quiet
        self.stream = stream if stream is not None else sys.stderr
        self.log_every = log_every
        if progress is None:
            tty = bool(getattr(self.stream, "isatty", lambda: False)())
            mode = "bars" if tty or _in_notebook() else "lines"
        else:
            mode = "bars" if progress else "none"
        self.mode = "none" if quiet else mode
        self.progress = self.mode == "bars"

    def bar(self, desc: str, total: int | None = None, unit: str = "rec"):
        if self.mode == "lines":
            return _LogLines(self, desc, total, unit)
        if self.mode != "bars":
            return _NoBar()
        try:
            from tqdm.auto import tqdm
        except ImportError:  # bars are a nicety: without tqdm, progress lines
            return _LogLines(self, desc, total, unit)

        return tqdm(total=total, desc=f"{desc:<8}", unit=unit, unit_scale=True, file=self.stream, leave=False,
                    dynamic_ncols=True)

    def line(self, text: str) -> None:
        if not self.quiet:
            print(text, file=self.stream, flush=True)

    def detail(self, text: str) -> None:
        if self.verbose:
            print("         " + text, file=self.stream, flush=True)

    def stage(self, name: str, summary: str, seconds: float, cached: bool) -> None:
        how = "cached" if cached else f"{seconds:.1f}s"
        self.line(f"{name:<8} {summary} [{how}]")


def _in_notebook() -> bool:
    """Running in a Jupyter kernel (stderr is not a terminal there, but tqdm.auto draws notebook bars)."""
    shell = getattr(sys.modules.get("IPython"), "get_ipython", lambda: None)()
    return shell is not None and type(shell).__name__ == "ZMQInteractiveShell"


class _NoBar:
    def update(self, n: int = 1) -> None:
        pass

    def set_postfix_str(self, s: str) -> None:
        pass

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        pass


class _LogLines(_NoBar):
    """Progress as a plain line every ``log.log_every`` seconds (none for a stage that ends sooner)."""

    def __init__(self, log: BuildLog, desc: str, total: int | None, unit: str):
        self.log, self.desc, self.total, self.unit = log, desc, total, unit
        self.n, self.postfix = 0, ""
        self.t0 = self.last = time.perf_counter()

    def update(self, n: int = 1) -> None:
        self.n += n
        now = time.perf_counter()
        if now - self.last >= self.log.log_every:
            self.last = now
            done = f"{self.n:,}/{self.total:,} {self.unit} ({self.n / self.total:.0%})" if self.total else \
                f"{self.n:,} {self.unit}"
            rate = self.postfix or _rate(self.n, now - self.t0, self.unit).lstrip(", ")
            self.log.line(f"{self.desc:<8} {done}, {rate}, {now - self.t0:.0f}s")

    def set_postfix_str(self, s: str) -> None:
        self.postfix = s


def _rate(n: float, seconds: float, unit: str) -> str:
    if seconds <= 0:
        return ""
    r = n / seconds
    for scale, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if r >= scale:
            return f", {r / scale:.1f}{suffix} {unit}/s"
    return f", {r:.0f} {unit}/s"


def _by_lang(langs: Sequence[str], weights=None) -> dict[str, int]:
    c: Counter = Counter()
    if weights is None:
        c.update(langs)
    else:
        for lang, w in zip(langs, weights):
            c[lang] += int(w)
    return dict(sorted(c.items()))


def _write_json(path: str, obj: Any) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, ensure_ascii=False, indent=1, sort_keys=True)


def _read_json(path: str) -> Any:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


# ---- stage: read ---------------------------------------------------------------------------------
def _iter_records(path: str) -> Iterator[dict]:
    with open(path, encoding="utf-8") as f:
        for line in f:
            yield json.loads(line)


def _iter_sized_records(path: str) -> Iterator[tuple[dict, int]]:
    """(record, length of its JSON line in characters), for chunking by size."""
    with open(path, encoding="utf-8") as f:
        for line in f:
            yield json.loads(line), len(line)


def _stage_read(cfg: dict, out: str, log: BuildLog) -> dict:
    per_source = []
    langs: Counter = Counter()
    kinds: Counter = Counter()
    n = 0
    with open(os.path.join(out, "records.jsonl"), "w", encoding="utf-8") as f, log.bar("read") as bar:
        for i, src in enumerate(cfg["sources"]):
            count = 0
            for rec in readers.iter_source(src):
                f.write(json.dumps(rec, ensure_ascii=False))
                f.write("\n")
                langs[rec["lang"] or "?"] += 1
                kinds["text" if "text" in rec else "chat"] += 1
                count += 1
                bar.update()
            if count == 0:
                raise ValueError(f"sources[{i}] ({src.get('name') or src['path']}): no records were read")
            per_source.append({"source": src.get("name") or src["path"], "records": count})
            n += count
    return {"records": n, "sources": per_source, "langs": dict(sorted(langs.items())), "kinds": dict(kinds)}


# ---- stage: langid -------------------------------------------------------------------------------
_LANGID_CHUNK = 4096  # texts classified per call


def _stage_langid(cfg: dict, records_path: str, out: str, log: BuildLog) -> dict:
    """A language code for every record: the record's own, or py3langid's where it has none (or always,
    with ``override``). One pass, one chunk of texts at a time; memory per record: its code (a pointer
    to one shared string per language) and a keep flag."""
    lcfg = cfg["langid"]
    run = lcfg["backend"] == "py3langid"
    langs: list[str] = []
    n_todo = 0
    if run:
        from .langid import identify

    with log.bar("langid") as bar:
        pending: list[tuple[int, str]] = []  # (record index, text) awaiting identification

        def flush() -> None:
            found, _ = identify((t for _, t in pending), threshold=lcfg["threshold"], unknown=lcfg["unknown"],
                                languages=lcfg.get("languages"), on_item=bar.update)
            for (i, _), lang in zip(pending, found):
                langs[i] = sys.intern(lang)
            pending.clear()

        for rec in _iter_records(records_path):
            lang = rec["lang"]
            todo = lcfg["override"] or lang is None
            n_todo += todo
            langs.append(sys.intern(lang if lang is not None else lcfg["unknown"]))  # replaced once identified
            if todo and run:
                pending.append((len(langs) - 1, readers.record_text(rec)))
                if len(pending) >= _LANGID_CHUNK:
                    flush()
        if pending:
            flush()
    keep = np.ones(len(langs), dtype=bool)
    if lcfg["drop_unknown"]:
        keep = np.fromiter((lang != lcfg["unknown"] for lang in langs), dtype=bool, count=len(langs))
    _write_json(os.path.join(out, "langs.json"), langs)
    np.save(os.path.join(out, "keep.npy"), keep)
    identified = n_todo if run else 0
    unknown = sum(1 for lang in langs if lang == lcfg["unknown"])
    return {
        "identified": identified,
        "given": len(langs) - n_todo,
        "unknown": unknown,
        "dropped": int((~keep).sum()),
        "langs": _by_lang(langs),
    }


# ---- stage: tokenize -----------------------------------------------------------------------------
def load_tokenizer(tcfg: Mapping):
    """The mlmix.Tokenizer a config's ``tokenizer`` section names."""
    from .tokenize import Tokenizer

    if "name" in tcfg:
        return Tokenizer.qwen(tcfg["name"])
    if "path" in tcfg:
        if not os.path.isfile(tcfg["path"]):
            raise FileNotFoundError(f"tokenizer.path: {tcfg['path']!r} is not a file (expected a tokenizer.json)")
        return Tokenizer.from_file(tcfg["path"])
    if "pretrained" in tcfg:
        if not os.path.isdir(tcfg["pretrained"]):
            raise FileNotFoundError(f"tokenizer.pretrained: {tcfg['pretrained']!r} is not a local model directory")
        return Tokenizer.from_pretrained(tcfg["pretrained"])
    tk = tcfg["tiktoken"]
    return Tokenizer.from_tiktoken(tk["path"], tk["pattern"], tk["special_tokens"])


def _tokenizer_fingerprint(tcfg: Mapping) -> list:
    """What identifies the tokenizer's files for the cache: (path, size, mtime_ns) of each."""
    if "name" in tcfg:
        return []
    if "tiktoken" in tcfg:
        key, path = "tiktoken.path", tcfg["tiktoken"]["path"]
    else:
        key = "path" if "path" in tcfg else "pretrained"
        path = tcfg[key]
    if not os.path.exists(path):
        raise FileNotFoundError(f"tokenizer.{key}: {path!r} does not exist")
    files = [path] if os.path.isfile(path) else sorted(
        os.path.join(r, f) for r, _, names in os.walk(path) for f in names)
    return [[f, os.stat(f).st_size, os.stat(f).st_mtime_ns] for f in files]


def encode_records(tokenizer, records: Sequence[Mapping], tcfg: Mapping) -> tuple[Ragged, Ragged, dict]:
    """Tokens (uint32) and loss masks (uint8) of canonical records, one per record in order, and the
    encoder's counts. A record the truncation policy drops comes back empty (length 0)."""
    enc = tokenizer.encode_records(
        list(records), format="auto", template=tcfg["template"], train_on=tcfg["train_on"],
        max_length=tcfg.get("max_length"), truncation=tcfg["truncation"] if "max_length" in tcfg else None,
        on_error="raise", train_glue=tcfg.get("train_glue", "none"))
    st = enc.stats
    stats = {"truncated": int(st.truncated), "dropped_too_long": int(st.dropped_too_long),
             "tokens_removed": int(st.tokens_removed)}
    tokens, masks = enc.tokens.astype(np.uint32), enc.loss_mask.astype(np.uint8)
    if len(tokens) == len(records):
        return tokens, masks, stats
    # scatter around the records the policy dropped: they become empty examples, excluded downstream
    lengths = np.zeros(len(records), dtype=np.int64)
    lengths[np.asarray(enc.index, dtype=np.int64)] = tokens.lengths
    return (Ragged.from_lengths(tokens.values, lengths), Ragged.from_lengths(masks.values, lengths), stats)


def _stage_tokenize(cfg: dict, records_path: str, n_records: int, out: str, log: BuildLog) -> dict:
    """Tokens and loss masks of every record, streamed to ``out/tokens`` and ``out/loss_mask`` chunk by
    chunk (memory: one chunk of records and its encodings, plus 8 bytes of length per record)."""
    from .tokenize import vocab_fingerprint

    tcfg = cfg["tokenizer"]
    t_load = time.perf_counter()
    tokenizer = load_tokenizer(tcfg)
    load_seconds = time.perf_counter() - t_load
    n_tokens = n_loss = n_examples = 0
    encode_seconds = 0.0  # in the encoder only: the rate people compare tokenizers by
    enc_stats: dict[str, int] = {}
    with log.bar("tokenize", total=n_records) as bar, \
            RaggedWriter(os.path.join(out, "tokens"), np.uint32) as tok_out, \
            RaggedWriter(os.path.join(out, "loss_mask"), np.uint8) as mask_out:
        chunk: list[dict] = []

        def flush() -> None:
            nonlocal n_tokens, n_loss, n_examples, encode_seconds
            t_enc = time.perf_counter()
            t, m, st = encode_records(tokenizer, chunk, tcfg)
            encode_seconds += time.perf_counter() - t_enc
            for k, v in st.items():
                enc_stats[k] = enc_stats.get(k, 0) + v
            tok_out.append(t)
            mask_out.append(m)
            n_tokens += int(t.offsets[-1])
            n_loss += int(m.values.sum(dtype=np.int64))
            n_examples += int((t.lengths > 0).sum())
            bar.set_postfix_str(_rate(n_tokens, encode_seconds, "tok").lstrip(", ") + " encoding")
            bar.update(len(chunk))
            chunk.clear()

        size = 0
        for rec, n in _iter_sized_records(records_path):
            chunk.append(rec)
            size += n
            if len(chunk) >= _TOKENIZE_CHUNK or size >= _CHUNK_BYTES:
                flush()
                size = 0
        if chunk:
            flush()
    if "name" not in tcfg:  # a bundled tokenizer is found again by its name (saves writing ~7 MB)
        save_tokenizer(tokenizer, os.path.join(out, "tokenizer.json"))
    _forget_native_encoder(tokenizer)
    return {"examples": n_examples, "tokens": n_tokens, "loss_tokens": n_loss, "pad_id": _pad_id(tokenizer),
            "vocab": vocab_fingerprint(tokenizer), "load_seconds": load_seconds, "encode_seconds": encode_seconds,
            **enc_stats}


def _forget_native_encoder(tokenizer) -> None:
    """Drop the native encoder mlmix.tokenize keeps for this tokenizer's backend (~200 MB for Qwen's):
    the backend was loaded for this stage only, so nothing else can use the entry, and the later stages
    then run without the tokenizer in memory."""
    from . import tokenize

    cache = getattr(tokenize, "_NATIVE_CACHE", None)
    backend = getattr(tokenizer, "backend", None)
    if cache is not None and backend is not None:
        hit = cache.get(id(backend))
        if hit is not None and hit[0] is backend:
            del cache[id(backend)]
    _trim_heap()


def _trim_heap() -> None:
    """Hand freed heap memory back to the OS (glibc keeps it otherwise, and it would count in RSS under
    every later stage); a no-op where malloc_trim does not exist."""
    import gc

    gc.collect()
    try:
        import ctypes

        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


def save_tokenizer(tokenizer, path: str) -> None:
    """Write the tokenizer as a tokenizer.json so that a store can be decoded later without its source."""
    with open(path, "w", encoding="utf-8") as f:
        f.write(tokenizer.backend.to_str())


def _pad_id(tokenizer) -> int:
    """The id that pads packed rows: the EOS token's (labels are -100 there anyway), else 0."""
    for tok in (getattr(tokenizer, "eos_token", None), "<|endoftext|>"):
        if tok:
            i = tokenizer.token_to_id(tok)
            if i is not None:
                return int(i)
    return 0


def _load_ragged(path: str) -> Ragged:
    """A cached Ragged: values memory-mapped, offsets in memory (8 bytes per record)."""
    return Ragged(np.load(os.path.join(path, "values.npy"), mmap_mode="r"), np.load(os.path.join(path, "offsets.npy")))


# tokens copied at a time when the selected examples are written out (Ragged.take needs 8 B of
# index per token on top: ~12 MB at this size)
_TAKE_CHUNK_TOKENS = 1 << 20


def _take_to_disk(r: Ragged, index: np.ndarray, path: str) -> Ragged:
    """``r.take(index)`` written to ``path`` chunk by chunk and memory-mapped back, so that selecting
    from a corpus larger than RAM needs memory for one chunk only (``index`` sorted ascending)."""
    lengths = r.lengths[index]
    # chunk boundaries by token count: at most _TAKE_CHUNK_TOKENS tokens (or one example) per chunk
    csum = np.cumsum(lengths, dtype=np.int64)
    with RaggedWriter(path, r.values.dtype) as w:
        lo = 0
        while lo < index.size:
            base = int(csum[lo - 1]) if lo else 0
            hi = max(lo + 1, int(np.searchsorted(csum, base + _TAKE_CHUNK_TOKENS, side="right")))
            w.append(r.take(index[lo:hi]))
            drop_mapped_pages(r.values)
            lo = hi
    return _load_ragged(path)


# ---- stage: dedup --------------------------------------------------------------------------------
_DEDUP_CHUNK = 4096  # records hashed at a time


def _texts_of(r: Ragged):
    """Documents as ``mlmix.dedup`` takes them: a zero-copy pyarrow string array over the UTF-8 bytes
    when pyarrow is installed, else a list of bytes."""
    try:
        import pyarrow as pa
    except ImportError:
        return [bytes(r.values[a:b]) for a, b in zip(r.offsets[:-1].tolist(), r.offsets[1:].tolist())]
    values = np.ascontiguousarray(r.values[int(r.offsets[0]):int(r.offsets[-1])])
    offsets = np.ascontiguousarray(r.offsets - r.offsets[0])
    return pa.LargeStringArray.from_buffers(len(r), pa.py_buffer(offsets), pa.py_buffer(values))


def _select(r: Ragged, mask: np.ndarray) -> Ragged:
    """The sequences of ``r`` where ``mask`` is true; 1 byte of scratch per value (``Ragged.take``
    builds an int64 index per value, 8x the text it selects)."""
    if mask.all():
        return r
    lengths = r.lengths
    return Ragged.from_lengths(r.values[np.repeat(mask, lengths)], lengths[mask])


def _stage_dedup(cfg: dict, records_path: str, langs: list[str], alive: np.ndarray, out: str, log: BuildLog) -> dict:
    """Exact then near duplicates among the ``alive`` records; the first seen of each cluster is kept.

    Memory: exact dedup reads the texts chunk by chunk and keeps a 16-byte hash per document. Near
    dedup needs the texts of the documents it compares: they are spilled to disk per language as UTF-8
    during the same pass and, with scope "language", deduplicated one language at a time (documents of
    different languages are never duplicates then), so the texts of the largest language are in memory
    at once; with scope "global" all of them are.
    """
    dcfg = cfg["dedup"]
    keep = alive.copy()
    exact_removed: Counter = Counter()
    near_removed: Counter = Counter()
    if dcfg["exact"] or dcfg["near"]:
        from . import dedup

        idx = np.flatnonzero(alive)
        n = idx.size
        sub_langs = [langs[i] for i in idx]
        scope = "lang" if dcfg["scope"] == "language" else "global"
        with log.bar("dedup", total=n * (int(dcfg["exact"]) + int(dcfg["near"]))) as bar, \
                _scratch_dir(cfg["cache_dir"]) as scratch:
            # one pass over the records: exact hashes per chunk, and (for near) texts spilled per group
            group_of = (lambda lang: lang) if scope == "lang" else (lambda lang: "")
            spill: dict[str, RaggedWriter] = {}
            members: dict[str, list[int]] = {}  # positions in idx of each group's documents, in order
            hashes: list[np.ndarray] = []
            chunk: list[str] = []
            first = 0

            def flush() -> None:
                nonlocal first
                if dcfg["exact"]:
                    hashes.append(dedup.exact_hashes(chunk))
                    bar.update(len(chunk))
                if dcfg["near"]:
                    encoded = [t.encode("utf-8", "surrogatepass") for t in chunk]
                    by_group: dict[str, list[int]] = {}
                    for j in range(len(chunk)):
                        by_group.setdefault(group_of(sub_langs[first + j]), []).append(j)
                    for g, js in by_group.items():
                        w = spill.get(g)
                        if w is None:
                            w = spill[g] = RaggedWriter(os.path.join(scratch, f"g{len(spill)}"), np.uint8)
                        data = np.frombuffer(b"".join(encoded[j] for j in js), dtype=np.uint8)
                        w.append(Ragged.from_lengths(data, [len(encoded[j]) for j in js]))
                        members.setdefault(g, []).extend(first + j for j in js)
                first += len(chunk)
                chunk.clear()

            it = iter(enumerate(_iter_records(records_path)))
            size = 0
            for i in idx.tolist():
                for k, rec in it:
                    if k == i:
                        chunk.append(readers.record_text(rec))
                        size += len(chunk[-1])
                        break
                if len(chunk) >= _DEDUP_CHUNK or size >= _CHUNK_BYTES:
                    flush()
                    size = 0
            if chunk:
                flush()
            for w in spill.values():
                w.close()

            sub_keep = np.ones(n, dtype=bool)
            if dcfg["exact"] and n:
                res = dedup.cluster_hashes(np.concatenate(hashes), langs=sub_langs, scope=scope)
                exact_keep = np.asarray(res.keep, dtype=bool)
                sub_keep &= exact_keep
                for j in np.flatnonzero(~exact_keep):
                    exact_removed[sub_langs[j]] += 1
                del hashes, res
            if dcfg["near"]:
                for g, w in spill.items():
                    pos = np.asarray(members[g], dtype=np.int64)
                    live = sub_keep[pos]
                    if live.any():
                        texts = _select(Ragged.load(w.path, mmap=False), live)
                        rest = pos[live]
                        res = dedup.near_duplicates(
                            _texts_of(texts),
                            threshold=dcfg["threshold"],
                            num_perm=dcfg["num_perm"],
                            ngram=dcfg["ngram"],
                            langs=[sub_langs[j] for j in rest],
                            scope=scope,
                            seed=cfg["seed"],
                        )
                        del texts
                        near_keep = np.asarray(res.keep, dtype=bool)
                        for j in rest[~near_keep]:
                            near_removed[sub_langs[j]] += 1
                        sub_keep[rest[~near_keep]] = False
                    bar.update(pos.size)
        keep[idx] = sub_keep
    np.save(os.path.join(out, "keep.npy"), keep)
    return {
        "kept": int(keep.sum()),
        "exact_removed": dict(sorted(exact_removed.items())),
        "near_removed": dict(sorted(near_removed.items())),
        "langs": _by_lang([langs[i] for i in np.flatnonzero(keep)]),
    }


# ---- stage: mix ----------------------------------------------------------------------------------
def _recipe_params(mcfg: Mapping) -> dict:
    return {k: v for k, v in mcfg.items() if k not in ("recipe", "seed")}


def _stage_mix(cfg: dict, records_path: str, langs: list[str], keep: np.ndarray, lengths: np.ndarray, out: str,
               log: BuildLog) -> dict:
    mcfg = cfg["mixture"]
    idx = np.flatnonzero(keep)
    if mcfg["recipe"] == "all":
        if _recipe_params(mcfg):
            raise ValueError(f"mixture: recipe 'all' takes no parameters, got {sorted(_recipe_params(mcfg))}")
        selected = idx
        target = None
    else:
        from . import recipes

        ids = [r["id"] for r in _iter_records(records_path)]
        where: dict[tuple[str, str], int] = {}
        for i in idx:
            key = (ids[i], langs[i])
            if key in where:
                raise ValueError(
                    f"mixture: source id {ids[i]!r} appears twice in language {langs[i]!r} (records {where[key]} and {i}); "
                    "recipes need one example per (source id, language): set the sources' id_field to an id shared "
                    "only by translations, or use recipe 'all'"
                )
            where[key] = int(i)
        # each row carries its token count, for recipes that budget in tokens (tokens = "tokens")
        rows = [{"id": ids[i], "lang": langs[i], "tokens": int(lengths[i])} for i in idx]
        recipe = getattr(recipes, mcfg["recipe"])
        try:
            mixture = recipe(rows, seed=mcfg["seed"], **_recipe_params(mcfg))
        except TypeError as exc:
            raise ValueError(f"mixture: bad parameters for recipe {mcfg['recipe']!r}: {exc}") from exc
        selected = np.array(sorted(where[(str(sid), str(lang))] for sid, lang in mixture.rows), dtype=np.int64)
        mixture.save(os.path.join(out, "mixture.json"))
        target = {str(k): int(v) for k, v in mixture.targets.items()}
    np.save(os.path.join(out, "selected.npy"), selected.astype(np.int64))
    counts = _by_lang([langs[i] for i in selected])
    return {"recipe": mcfg["recipe"], "params": _recipe_params(mcfg), "seed": mcfg["seed"], "examples": int(selected.size),
            "langs": counts, "target": dict(target) if target else None}


# ---- stage: pack ---------------------------------------------------------------------------------
def _lang_index(langs: Sequence[str]) -> tuple[list[str], np.ndarray]:
    """(distinct codes in order of appearance, int64 index of each entry's code)."""
    table: dict[str, int] = {}
    idx = np.fromiter((table.setdefault(lang, len(table)) for lang in langs), dtype=np.int64, count=len(langs))
    return list(table), idx


def _length_summary(lengths: np.ndarray, langs: list[str]) -> dict:
    names, idx = _lang_index(langs)
    lengths = np.asarray(lengths)
    out = {}
    for k, lang in sorted(enumerate(names), key=lambda kv: kv[1]):
        a = lengths[idx == k].astype(np.int64)
        q = np.percentile(a, [5, 25, 50, 75, 95]).tolist()
        out[lang] = {"n": int(a.size), "mean": float(a.mean()), "min": int(a.min()), "max": int(a.max()),
                     "p5": q[0], "p25": q[1], "p50": q[2], "p75": q[3], "p95": q[4]}
    return out


def _stage_pack(cfg: dict, tokens: Ragged, masks: Ragged, langs: list[str], pad_id: int, out_store: str,
                vocab: dict) -> dict:
    from .store import write_store

    pcfg = cfg["pack"]
    seq_len, strategy, policy = pcfg["seq_len"], pcfg["strategy"], pcfg["overlong"]
    if len(tokens) == 0:
        raise ValueError("pack: no examples are left to pack (check the mixture and dedup statistics)")
    lengths = tokens.lengths
    n_over = int((lengths > seq_len).sum())
    if strategy == "bfd_split":
        policy = "split"
    elif n_over and policy == "error" and strategy != "wrapped":
        raise ValueError(
            f"{n_over} example(s) are longer than pack.seq_len = {seq_len} (longest {int(lengths.max())} tokens); "
            "set pack.overlong to 'truncate', 'split' or 'drop', or raise pack.seq_len"
        )
    manifest = write_store(out_store, tokens, seq_len=seq_len, loss_mask=masks, strategy=strategy, langs=langs,
                           seed=cfg["seed"], pad_id=pad_id, overlong=policy,
                           shard_sequences=pcfg.get("shard_sequences"), tokenizer=vocab)
    counts = manifest["counts"]
    return {"sequences": manifest["num_sequences"], "seq_len": seq_len, "strategy": strategy, "overlong_policy": policy,
            "examples": manifest["num_examples"], "tokens": manifest["num_tokens"], "efficiency": manifest["efficiency"],
            "lower_bound_sequences": manifest["lower_bound_sequences"], "overlong": n_over,
            "truncated": counts["truncated"], "split": counts["split"], "dropped": counts["dropped"],
            "tokens_dropped": counts["tokens_dropped"]}


# ---- the driver ----------------------------------------------------------------------------------
def _cached_stage(cache: StageCache, log: BuildLog, name: str, key: str, run: Callable[[str], dict],
                  summary: Callable[[dict], str], timings: dict) -> tuple[str, dict]:
    t0 = time.perf_counter()
    d = cache.load(name, key)
    cached = d is not None
    if not cached:
        stats_box: dict = {}

        def write(tmp: str) -> None:
            stats = run(tmp)
            stats["seconds"] = time.perf_counter() - t0
            _write_json(os.path.join(tmp, "stats.json"), stats)
            stats_box.update(stats)

        d = cache.save(name, key, write)
    stats = _read_json(os.path.join(d, "stats.json"))
    seconds = time.perf_counter() - t0
    timings[name] = {"seconds": seconds, "cached": cached, "peak_rss_mb": _peak_rss_mb()}
    log.stage(name, summary(stats), seconds, cached)
    log.detail(f"cache {d}")
    _log_peak(log, timings[name])
    return d, stats


def _peak_rss_mb() -> float | None:
    """The process's peak resident memory so far, in MB (None where the platform does not say)."""
    try:
        import resource
    except ImportError:  # not on POSIX
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return round(peak / (1 << 20 if sys.platform == "darwin" else 1 << 10), 1)  # bytes on macOS, KiB elsewhere


def _log_peak(log: BuildLog, timing: Mapping) -> None:
    if timing.get("peak_rss_mb") is not None:
        log.detail(f"peak memory so far {timing['peak_rss_mb']:,.0f} MB")


def _fmt_langs(counts: Mapping[str, int], limit: int = 6) -> str:
    items = sorted(counts.items(), key=lambda kv: -kv[1])
    text = " ".join(f"{k}:{v:,}" for k, v in items[:limit])
    return text + (f" +{len(items) - limit} more" if len(items) > limit else "")


def build(config: str | os.PathLike | Mapping, *, quiet: bool = False, verbose: bool = False,
          progress: bool | None = None, use_cache: bool = True, log: BuildLog | None = None) -> dict:
    """Run the whole pipeline a config describes and return its summary (also written to build.json).

    Args:
        config: a path to a ``.toml``/``.yaml``/``.json`` config, or the same content as a dict
            (see docs/config.md; relative paths in a dict resolve against the current directory).
        quiet, verbose, progress: logging on stderr (progress bars default to "stderr is a terminal").
        use_cache: reuse cached stage outputs (default); False recomputes every stage (and refreshes the cache).

    Returns:
        A dict with ``output``, ``store``, per-stage ``stages`` statistics and ``timings``, and the
        headline figures ``examples``, ``tokens``, ``sequences``, ``efficiency``, ``langs``.
    """
    cfg = load_config(config)
    config_dir = None if isinstance(config, Mapping) else os.path.dirname(os.path.abspath(os.fspath(config)))
    check_build_targets(cfg["output"], cfg["cache_dir"], cfg["sources"], config_dir)
    log = log or BuildLog(quiet=quiet, verbose=verbose, progress=progress)
    cache = StageCache(cfg["cache_dir"], enabled=True)
    _remove_stale_scratch(cfg["cache_dir"])
    if not use_cache:
        cache.enabled = False
    t_start = time.perf_counter()
    timings: dict = {}

    # read
    fingerprints = [readers.source_fingerprint(s, cfg["fingerprint"]) for s in cfg["sources"]]
    # what a source reads is its settings and its files' fingerprints; where this build writes is not part of it
    k_read = stage_key("read", _STAGE_VERSION["read"], [{k: v for k, v in s.items() if k != "exclude"}
                                                        for s in cfg["sources"]], fingerprints)
    t0 = time.perf_counter()
    d_read, s_read = _cached_stage(
        cache, log, "read", k_read, lambda tmp: _stage_read(cfg, tmp, log),
        lambda s: f"{s['records']:,} records from {len(s['sources'])} source(s)" + _rate(s["records"], s["seconds"], "rec"),
        timings)
    records_path = os.path.join(d_read, "records.jsonl")

    # langid
    k_lid = stage_key("langid", _STAGE_VERSION["langid"], k_read, cfg["langid"])
    d_lid, s_lid = _cached_stage(
        cache, log, "langid", k_lid, lambda tmp: _stage_langid(cfg, records_path, tmp, log),
        lambda s: f"{len(s['langs'])} languages ({s['given']:,} given, {s['identified']:,} identified, "
                  f"{s['unknown']:,} unknown) {_fmt_langs(s['langs'])}"
                  + (_rate(s["identified"], s["seconds"], "rec") if s["identified"] else ""),
        timings)
    # one shared str per language code, not one per record (json makes a new str for every entry)
    langs: list[str] = [sys.intern(lang) for lang in _read_json(os.path.join(d_lid, "langs.json"))]
    alive = np.load(os.path.join(d_lid, "keep.npy"))

    # tokenize (all records; see the module docstring for why it precedes dedup and mix)
    tcfg = cfg["tokenizer"]
    k_tok = stage_key("tokenize", _STAGE_VERSION["tokenize"], k_read, tcfg, _tokenizer_fingerprint(tcfg))
    d_tok, s_tok = _cached_stage(
        cache, log, "tokenize", k_tok, lambda tmp: _stage_tokenize(cfg, records_path, s_read["records"], tmp, log),
        _tokenize_line,
        timings)
    tokens_all = _load_ragged(os.path.join(d_tok, "tokens"))
    masks_all = _load_ragged(os.path.join(d_tok, "loss_mask"))
    lengths_all = tokens_all.lengths
    alive = alive & (lengths_all > 0)  # records the tokenizer's truncation policy dropped are empty

    # dedup
    k_dd = stage_key("dedup", _STAGE_VERSION["dedup"], k_lid, k_tok if "max_length" in tcfg else None, cfg["dedup"],
                     cfg["seed"])
    d_dd, s_dd = _cached_stage(
        cache, log, "dedup", k_dd, lambda tmp: _stage_dedup(cfg, records_path, langs, alive, tmp, log),
        lambda s: f"kept {s['kept']:,}; removed {sum(s['exact_removed'].values()):,} exact, "
                  f"{sum(s['near_removed'].values()):,} near duplicates"
                  + _rate(s["kept"] + sum(s["exact_removed"].values()) + sum(s["near_removed"].values()),
                          s["seconds"], "doc"),
        timings)
    keep = np.load(os.path.join(d_dd, "keep.npy"))

    # mix
    k_mix = stage_key("mix", _STAGE_VERSION["mix"], k_dd, k_tok, cfg["mixture"])
    d_mix, s_mix = _cached_stage(
        cache, log, "mix", k_mix, lambda tmp: _stage_mix(cfg, records_path, langs, keep, lengths_all, tmp, log),
        lambda s: f"recipe {s['recipe']}: {s['examples']:,} examples {_fmt_langs(s['langs'])}",
        timings)
    selected = np.load(os.path.join(d_mix, "selected.npy"))

    # pack + output (the output directory itself is the cache of this stage)
    k_pack = stage_key("pack", _STAGE_VERSION["pack"], k_mix, k_tok, cfg["pack"], cfg["seed"])
    out = cfg["output"]
    summary = _load_existing(out, k_pack, log) if use_cache else None
    t0 = time.perf_counter()
    if summary is not None:
        _sync_report(out, cfg["report"], k_pack)
        timings["pack"] = {"seconds": time.perf_counter() - t0, "cached": True, "peak_rss_mb": _peak_rss_mb()}
        s_pack = summary["stages"]["pack"]
        log.stage("pack", _pack_line(s_pack), 0.0, True)
    else:
        sel_langs = [langs[i] for i in selected]
        stage_stats = {"read": s_read, "langid": s_lid, "tokenize": s_tok, "dedup": s_dd, "mix": s_mix}
        stage_stats["tokens_by_lang"] = {
            "read": _by_lang(langs, lengths_all),
            "dedup": _by_lang([langs[i] for i in np.flatnonzero(keep)], lengths_all[keep]),
            "mix": _by_lang(sel_langs, lengths_all[selected]),
        }
        stage_stats["lengths"] = _length_summary(lengths_all[selected], sel_langs)
        with atomic_directory(out, kind="build") as tmp, _scratch_dir(cfg["cache_dir"]) as scratch:
            if selected.size == len(tokens_all) and np.array_equal(selected, np.arange(selected.size)):
                tokens, masks = tokens_all, masks_all  # everything: pack straight from the cached arrays
            else:
                tokens = _take_to_disk(tokens_all, selected, os.path.join(scratch, "tokens"))
                masks = _take_to_disk(masks_all, selected, os.path.join(scratch, "loss_mask"))
            s_pack = _stage_pack(cfg, tokens, masks, sel_langs, s_tok["pad_id"], os.path.join(tmp, "store"),
                                 s_tok["vocab"])
            del tokens, masks  # unmap the scratch copies before the directory is removed
            s_pack["seconds"] = time.perf_counter() - t0
            stage_stats["pack"] = s_pack
            # lengths of the selected examples, for the report's histograms (int32, one per example)
            np.save(os.path.join(tmp, "lengths.npy"), lengths_all[selected].astype(np.int32))
            _write_json(os.path.join(tmp, "langs.json"), sel_langs)
            if os.path.isfile(os.path.join(d_mix, "mixture.json")):
                shutil.copyfile(os.path.join(d_mix, "mixture.json"), os.path.join(tmp, "mixture.json"))
            if os.path.isfile(os.path.join(d_tok, "tokenizer.json")):
                shutil.copyfile(os.path.join(d_tok, "tokenizer.json"), os.path.join(tmp, "tokenizer.json"))
            summary = {
                "format": BUILD_FORMAT,
                "key": k_pack,
                "config": cfg,
                "stages": stage_stats,
                "output": out,
                "store": os.path.join(out, "store"),
                "examples": s_pack["examples"],
                "tokens": s_pack["tokens"],
                "sequences": s_pack["sequences"],
                "efficiency": s_pack["efficiency"],
                "langs": s_mix["langs"],
            }
            _write_json(os.path.join(tmp, "build.json"), summary)
            if cfg["report"]:
                from .report import write_report

                write_report(tmp, os.path.join(tmp, "report.html"))
            seal(tmp, "build", key=k_pack)  # checksums of every file: a later run or inspect tells a changed one
            # before the rename: an output killed right after it must not keep mkdtemp's 0700/0600 modes
            _relax_modes(tmp)
        timings["pack"] = {"seconds": time.perf_counter() - t0, "cached": False, "peak_rss_mb": _peak_rss_mb()}
        log.stage("pack", _pack_line(s_pack), timings["pack"]["seconds"], False)
        _log_peak(log, timings["pack"])
        log.detail(f"output {out} (key {k_pack})")
    for entry in cache.discarded:
        log.line(f"warning: cache entry {entry} was corrupt and has been recomputed")
    summary = dict(summary)
    summary["timings"] = timings
    summary["seconds"] = time.perf_counter() - t_start
    summary["cache_discarded"] = list(cache.discarded)
    return summary


_SCRATCH = ".scratch-"  # + pid + "-" + random: scratch directories in cache_dir (dot: the cache ignores them)


def _remove_stale_scratch(cache_dir: str) -> None:
    """Remove scratch directories left by builds that were killed (their process no longer exists)."""
    try:
        names = os.listdir(cache_dir)
    except OSError:
        return
    for name in names:
        if not name.startswith(_SCRATCH):
            continue
        try:
            pid = int(name[len(_SCRATCH):].split("-", 1)[0])
            os.kill(pid, 0)
        except ProcessLookupError:
            shutil.rmtree(os.path.join(cache_dir, name), ignore_errors=True)
        except (ValueError, OSError):  # not ours, or a live process we may not signal: leave it
            pass


@contextlib.contextmanager
def _scratch_dir(cache_dir: str) -> Iterator[str]:
    """A temporary directory next to the cache (same filesystem, out of /tmp's RAM disk), removed after."""
    os.makedirs(cache_dir, exist_ok=True)
    d = tempfile.mkdtemp(prefix=f"{_SCRATCH}{os.getpid()}-", dir=cache_dir)
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


def _relax_modes(root: str) -> None:
    """Give the output the usual umask-derived modes (temporary files and directories are created 0600/0700)."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(root, 0o777 & ~umask)
    for base, dirs, files in os.walk(root):
        for d in dirs:
            os.chmod(os.path.join(base, d), 0o777 & ~umask)
        for f in files:
            os.chmod(os.path.join(base, f), 0o666 & ~umask)


def _tokenize_line(s: Mapping) -> str:
    """The tokenize summary: the encoding rate (the encoder's own time; reading, writing and loading the
    tokenizer apart), then the tokenizer's loading time when it is worth saying."""
    line = f"{s['examples']:,} examples, {s['tokens']:,} tokens ({s['loss_tokens']:,} trained)"
    if "encode_seconds" not in s:  # a cache entry from before the encoding was timed on its own
        return line + _rate(s["tokens"], s["seconds"], "tok")
    line += _rate(s["tokens"], s["encode_seconds"], "tok") + " encoding"
    if s.get("load_seconds", 0) >= 0.05:
        line += f"; tokenizer loaded in {s['load_seconds']:.1f}s"
    return line


def _pack_line(s: Mapping) -> str:
    extra = "".join(f", {s[k]:,} {k}" for k in ("truncated", "split", "dropped") if s.get(k))
    return (f"{s['examples']:,} examples -> {s['sequences']:,} sequences of {s['seq_len']:,} "
            f"({s['efficiency']:.2%} full; lower bound {s['lower_bound_sequences']:,}){extra}"
            + _rate(s["tokens"], s.get("seconds") or 0.0, "tok"))


def _load_existing(out: str, key: str, log: BuildLog) -> dict | None:
    """The summary of an existing output built with the same key, if every file in it is as mlmix wrote
    it (the checksums in its marker; the store's own) and the store opens; else None: it is rebuilt."""
    path = os.path.join(out, "build.json")
    try:
        summary = _read_json(path)
        if summary.get("format") != BUILD_FORMAT or summary.get("key") != key:
            return None
    except Exception:  # missing, unreadable or corrupt: rebuild
        return None
    if read_marker(out) is None:
        return None  # written before outputs carried checksums: nothing vouches for its files
    problems = [p for p in check_sealed(out) if not p.startswith("report.html ")]
    if problems:
        log.line(f"warning: output {out}: {'; '.join(problems[:3])}; rebuilding it")
        return None
    try:
        from .store import open as open_store

        open_store(os.path.join(out, "store"))
    except Exception as exc:  # a store file changed or missing: rebuild
        log.line(f"warning: output {out}: the store does not open ({exc}); rebuilding it")
        return None
    return summary


def _sync_report(out: str, want: bool, key: str) -> None:
    """Make an output reused from an earlier build hold a report exactly when the config asks for one
    (``report`` is an output setting, outside the stage keys): write or refresh it, or remove it."""
    path = os.path.join(out, "report.html")
    problems = [p for p in check_sealed(out) if p.startswith("report.html ")]
    if want and (problems or not os.path.isfile(path)):
        from .report import write_report

        write_report(out, path)  # reseals the output
    elif not want and os.path.lexists(path):
        os.unlink(path)
        seal(out, "build", key=key)
