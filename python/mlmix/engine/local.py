"""The local executor: the stages of :mod:`mlmix.engine.stages` over chunks of records, on this
machine's cores, with the stage cache.

It holds no stage logic: for each stage it reads the previous stage's cached output in chunks, hands
each chunk to the stage's per-block function (in this process, or with ``workers > 1`` in a pool of
worker processes, results taken back in order), combines the blocks' counts with the stage's ``merge``
and ``finish``, and caches what the stage produced under its key (:mod:`mlmix.cache`), so a rerun
redoes only the stages downstream of a change.

Memory is bounded whatever the input size (docs/memory.md): records are read and written one chunk at
a time, tokens and loss masks are appended to files chunk by chunk and memory-mapped afterwards, and
packing gathers tokens one shard at a time. What stays in memory is a few arrays with one entry per
record (language, flags, length, uid; for near dedup its band keys).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import numpy as np

from .._parallel import usable_cores
from ..cache import StageCache
from ..ragged import Ragged, RaggedWriter
from ..recblock import RecordBlock
from .log import BuildLog, peak_rss_mb, rate
from .stages import dedup as s_dedup
from .stages import langid as s_langid
from .stages import mix as s_mix
from .stages import pack as s_pack
from .stages import read as s_read
from .stages import tokenize as s_tok
from .stages import write as s_write

CHUNK = 16384  # records per block at most (the reader cuts blocks at ~16 MB of input too)


# ---- blocks of records ---------------------------------------------------------------------------
RECORDS = "records"  # the read stage's output: RecordBlock files, in order, and their index


def write_blocks(out: str, blocks: Iterable[tuple[int, RecordBlock]]) -> list[list[int]]:
    """Save (source index, RecordBlock) pairs as the read stage's cache; returns the index written."""
    d = os.path.join(out, RECORDS)
    os.makedirs(d, exist_ok=True)
    index = []
    with one_behind() as put:  # each block saved while the next one is parsed
        for k, (src, block) in enumerate(blocks):
            put(block.save, os.path.join(d, f"{k:06d}.rb"))
            index.append([int(src), len(block)])
            del block
    s_write.write_json(os.path.join(d, "index.json"), index)
    return index


@contextlib.contextmanager
def one_behind() -> Iterator[Callable[..., None]]:
    """``put(fn, *args)`` runs ``fn(*args)`` on a writer thread after waiting for the previous call (so calls run
    one at a time, in order, while the caller prepares the next: the writes release the GIL); leaving the block
    waits for the last one. A call's exception is raised by the next ``put`` or on leaving."""
    import concurrent.futures as cf

    with cf.ThreadPoolExecutor(1, thread_name_prefix="mlmix-save") as pool:
        last: list = []

        def put(fn: Callable, *args: Any) -> None:
            if last:
                last.pop().result()
            last.append(pool.submit(fn, *args))

        yield put
        if last:
            last.pop().result()


def block_paths(records_dir: str) -> list[tuple[str, int, int]]:
    """(path, first record, records) of each cached block, in order."""
    index = s_write.read_json(os.path.join(records_dir, "index.json"))
    out, first = [], 0
    for k, (_, n) in enumerate(index):
        out.append((os.path.join(records_dir, f"{k:06d}.rb"), first, n))
        first += n
    return out


def load_block(path: str) -> RecordBlock:
    return RecordBlock.load(path)


_WORKER: dict[str, Any] = {}  # per worker process: what its initializer loaded


def _init_labeler(lcfg: Mapping) -> None:
    _WORKER["labeler"] = s_langid.Labeler(lcfg)


def _label(item: tuple) -> dict:
    path = item[0]
    labeler = _WORKER["labeler"]
    given = RecordBlock.load_langs(path)  # the language columns alone: the texts are read only where needed
    if labeler.needs_texts(given):
        return labeler.label_block(load_block(path))
    return labeler.label_texts(given, [None] * len(given))


def _init_encoder(tcfg: Mapping) -> None:
    _WORKER["tokenizer"] = s_tok.load_tokenizer(tcfg)
    _WORKER["tcfg"] = dict(tcfg)


def _encode(item: tuple) -> tuple:
    block = load_block(item[0])
    t0 = time.perf_counter()
    tokens, masks, stats = s_tok.encode_block(_WORKER["tokenizer"], block, _WORKER["tcfg"])
    return tokens, masks, stats, time.perf_counter() - t0


def _init_keys(dd: Mapping) -> None:
    _WORKER["dd"] = dict(dd)


def _keys(args: tuple) -> dict:
    path, rows, langs = args
    block = load_block(path)
    if len(rows) != len(block):
        block = block.take(rows)
    return s_dedup.keys(Ragged(*block.text_column(), validate=False), langs, _WORKER["dd"])


def _init_worker(threads: int, init: Callable, initargs: tuple) -> None:
    """A worker process: the native kernels' threads shared out among the workers (each kernel would
    otherwise start one thread per core in every worker), then the stage's own initializer."""
    os.environ["MLMIX_NUM_THREADS"] = str(threads)
    os.environ["RAYON_NUM_THREADS"] = str(threads)  # the HF tokenizers backend, where it encodes
    init(*initargs)


def _init_planner(pcfg: Mapping, pol: str, seed) -> None:
    _WORKER["plan"] = (dict(pcfg), pol, seed)


def _plan_group(item: tuple) -> Any:
    g, lengths = item
    pcfg, pol, seed = _WORKER["plan"]
    return s_pack.plan_group(pcfg, lengths, pol, seed, g)


def ordered_map(fn: Callable, init: Callable, initargs: tuple, items: Iterable, workers: int) -> Iterator:
    """``fn`` over ``items`` in order: in this process, or in ``workers`` processes (each ran ``init``),
    with at most ``2 * workers`` items in flight."""
    if workers <= 1:
        init(*initargs)
        try:
            for item in items:
                yield fn(item)
        finally:
            _WORKER.clear()
        return
    import concurrent.futures as cf
    import multiprocessing as mp
    from collections import deque

    # fork on Linux: a script that calls mlmix.build without an ``if __name__ == "__main__"`` guard still
    # works (spawn and forkserver import the caller's main module again); the workers load their own
    # models in ``init``, after the fork
    ctx = mp.get_context("fork" if sys.platform.startswith("linux") else "spawn")
    threads = max(1, usable_cores() // workers)
    with cf.ProcessPoolExecutor(workers, mp_context=ctx, initializer=_init_worker,
                                initargs=(threads, init, initargs)) as pool:
        pending: deque = deque()
        for item in items:
            pending.append(pool.submit(fn, item))
            if len(pending) >= 2 * workers:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


# ---- the stages, run locally ---------------------------------------------------------------------
def run_read(cfg: dict, out: str, log: BuildLog) -> dict:
    """Every source into RecordBlock files (``out/records``): the C++ reader's columns, never JSON again."""
    counts = None

    def blocks() -> Iterator[tuple[int, RecordBlock]]:
        nonlocal counts
        with log.bar("read") as bar:
            for i, src in enumerate(cfg["sources"]):
                for uids, block in s_read.blocks(i, src, CHUNK):
                    counts = s_read.merge(counts, s_read.count_block(uids, block))
                    bar.update(len(block))
                    yield i, block

    write_blocks(out, blocks())
    return s_read.finish(counts, cfg["sources"])


def run_langid(cfg: dict, records_dir: str, out: str, log: BuildLog, workers: int = 1) -> dict:
    """Each record's language code (``out/langs.npy``: an index per record into ``out/lang_codes.json``, the
    codes in order of first appearance) and whether it stays (``out/keep.npy``)."""
    lcfg = cfg["langid"]
    table: dict[str, int] = {}
    codes: list[np.ndarray] = []
    alive: list[np.ndarray] = []
    counts = None
    with log.bar("langid") as bar:
        for block in ordered_map(_label, _init_labeler, (lcfg,), block_paths(records_dir), workers):
            labels = block["lang"]
            codes.append(s_write.factorize(labels, table)[1])
            alive.append(block["alive"])
            counts = s_langid.merge(counts, s_langid.count(block))
            bar.update(len(labels))
    dtype = np.uint16 if len(table) <= 1 << 16 else np.uint32
    np.save(os.path.join(out, "langs.npy"), np.concatenate(codes).astype(dtype) if codes else np.zeros(0, dtype))
    s_write.write_json(os.path.join(out, "lang_codes.json"), list(table))
    np.save(os.path.join(out, "keep.npy"), np.concatenate(alive) if alive else np.zeros(0, bool))
    return s_langid.finish(counts, lcfg)


def load_langs(d: str) -> list[str]:
    """The language code of every record from a langid stage output: one shared str per code."""
    table = np.array([sys.intern(x) for x in s_write.read_json(os.path.join(d, "lang_codes.json"))],
                     dtype=object)
    return table[np.load(os.path.join(d, "langs.npy")).astype(np.int64)].tolist()


class Ahead:
    """``fn(*args)`` started on a thread now, for a later stage: :meth:`result` waits for it and returns its
    value or raises its exception. (Only where no process is forked meanwhile: a fork while the thread runs
    could copy a lock it holds.)"""

    def __init__(self, fn: Callable, *args: Any) -> None:
        self._out: dict = {}
        self._thread = threading.Thread(target=self._run, args=(fn, args), name="mlmix-ahead", daemon=True)
        self._thread.start()

    def _run(self, fn: Callable, args: tuple) -> None:
        try:
            self._out["value"] = fn(*args)
        except BaseException as e:  # handed to the caller of result()
            self._out["error"] = e

    def join(self) -> None:
        """Wait for the call to end, whatever its outcome (kept for :meth:`result`)."""
        self._thread.join()

    def result(self) -> Any:
        self._thread.join()
        if "error" in self._out:
            raise self._out.pop("error")
        return self._out.pop("value")


def run_tokenize(cfg: dict, records_dir: str, n_records: int, out: str, log: BuildLog, workers: int = 1,
                 ahead: Ahead | None = None) -> dict:
    """Tokens and loss masks of every record, streamed to ``out/tokens`` and ``out/loss_mask`` block by
    block (memory: a few blocks of records and their encodings, plus 8 bytes of length per record).
    ``ahead``: the tokenizer, being loaded since the build began (``load_seconds`` is then the wait)."""
    tcfg = cfg["tokenizer"]
    t_load = time.perf_counter()
    tokenizer = ahead.result() if ahead is not None else s_tok.load_tokenizer(tcfg)
    load_seconds = time.perf_counter() - t_load
    counts = None
    encode_seconds = 0.0  # in the encoder only: the rate people compare tokenizers by
    with log.bar("tokenize", total=n_records) as bar, \
            RaggedWriter(os.path.join(out, "tokens"), np.uint32) as tok_out, \
            RaggedWriter(os.path.join(out, "loss_mask"), np.uint8) as mask_out:
        if workers <= 1:  # the tokenizer loaded above encodes
            init, initargs = (lambda: _WORKER.update(tokenizer=tokenizer, tcfg=dict(tcfg))), ()
        else:
            init, initargs = _init_encoder, (tcfg,)
        def save(t: Ragged, m: Ragged) -> None:
            tok_out.append(t)
            mask_out.append(m)

        with one_behind() as put:  # each block's tokens written while the next block encodes
            for t, m, st, sec in ordered_map(_encode, init, initargs, block_paths(records_dir), workers):
                encode_seconds += sec
                put(save, t, m)
                counts = s_tok.merge(counts, s_tok.count(t, m, st))
                bar.set_postfix_str(rate(counts["tokens"], encode_seconds, "tok").lstrip(", ") + " encoding")
                bar.update(len(t))
                del t, m  # held by the writer only until written
    if "name" not in tcfg:  # a bundled tokenizer is found again by its name (saves writing ~7 MB)
        s_tok.save_tokenizer(tokenizer, os.path.join(out, "tokenizer.json"))
    stats = s_tok.finish(counts, tokenizer)
    s_tok.forget(tokenizer)
    return dict(stats, load_seconds=load_seconds, encode_seconds=encode_seconds)


def run_dedup(cfg: dict, records_dir: str, langs: list[str], alive: np.ndarray, uids: np.ndarray, out: str,
              log: BuildLog, workers: int = 1) -> dict:
    """Exact then near duplicates among the ``alive`` records (:mod:`mlmix.engine.stages.dedup`)."""
    dcfg = cfg["dedup"]
    keep = alive.copy()
    result = s_dedup.nothing()
    idx = np.flatnonzero(alive)
    if (dcfg["exact"] or dcfg["near"]) and idx.size:
        dd = s_dedup.params(cfg)
        paths = block_paths(records_dir)

        def alive_blocks() -> Iterator[tuple[str, np.ndarray, list[str]]]:
            for path, first, n in paths:
                rows = np.flatnonzero(alive[first:first + n])
                if rows.size:
                    yield path, rows, [langs[first + r] for r in rows.tolist()]

        with log.bar("dedup", total=idx.size) as bar:
            parts = []
            for part in ordered_map(_keys, _init_keys, (dd,), alive_blocks(), workers):
                parts.append(part)
                bar.update(len(part["h"]))
        sub_uids = uids[idx]
        sub_langs = [langs[i] for i in idx]
        blocks = s_dedup.concat(parts, sub_uids)
        del parts

        def shingles(wanted: np.ndarray):
            """Shingle sets of the records whose uid is in ``wanted`` (a second pass over the texts)."""
            pos = np.unique(np.searchsorted(uids, wanted))
            texts, got = [], []
            for path, first, n in paths:
                rows = pos[(pos >= first) & (pos < first + n)] - first
                if rows.size:
                    texts.append(Ragged(*load_block(path).take(rows).text_column(), validate=False))
                    got.append(uids[first + rows])
            got_uids = np.concatenate(got) if got else np.zeros(0, np.int64)
            column = Ragged.concat(texts) if texts else Ragged(np.zeros(0, np.uint8), np.zeros(1, np.int64))
            return got_uids, s_dedup.shingle_sets(column, dd)

        result = s_dedup.resolve(blocks, sub_langs, dd, shingles)
        keep[idx[np.isin(sub_uids, result["removed"])]] = False
    np.save(os.path.join(out, "keep.npy"), keep)
    return s_dedup.finish(result, s_write.by_lang([langs[i] for i in np.flatnonzero(keep)]))


def run_mix(cfg: dict, records_dir: str, langs: list[str], keep: np.ndarray, lengths: np.ndarray, uids: np.ndarray,
            out: str, log: BuildLog) -> dict:
    mcfg = cfg["mixture"]
    s_mix.check(mcfg)
    idx = np.flatnonzero(keep)
    mixture = None
    if mcfg["recipe"] == "all":
        selected = idx
    elif (cols := _mix_columns(records_dir, langs, keep, idx)) is not None:  # the same, as columns
        summary = cols.summary()
        mixture = s_mix.run_recipe(mcfg, summary, cols.tokens(lengths[idx]), cols.prefixes)
        try:
            selected = idx[cols.selected(mixture.rows)]
        except KeyError as exc:  # pragma: no cover - a recipe returns rows of the corpus it was given
            raise RuntimeError(f"mixture: a selected row names {exc} that no record has") from None
    else:
        # the groupby by source id, in memory: {id as JSON: [records, {languages}]}
        sid_of = np.empty(len(langs), dtype=object)
        sid_of[idx] = np.array(s_mix.sids(_kept_ids(records_dir, keep)), dtype=object)
        by_sid: dict[str, list] = {}
        for i in idx.tolist():
            e = by_sid.setdefault(sid_of[i], [0, set()])
            e[0] += 1
            e[1].add(langs[i])
        sids = list(by_sid)
        langsets = [by_sid[s][1] for s in sids]
        blocks = [slice(lo, lo + CHUNK) for lo in range(0, len(sids), CHUNK)]
        summary = s_mix.merge(s_mix.summarize(sids[b], [by_sid[s][0] for s in sids[b]], langsets[b]) for b in blocks)
        if summary["dups"]:
            dup = set(summary["dups"])
            rows = [i for i in idx.tolist() if sid_of[i] in dup]
            n_src = len(cfg["sources"])
            s_mix.duplicate_error(uids[rows], [sid_of[i] for i in rows], [langs[i] for i in rows],
                                  lambda u: s_read.uid_name(u, n_src))
        s_mix.check_ids(summary)
        lang_tokens = s_write.by_lang([langs[i] for i in idx], lengths[idx])

        def prefixes(plan: Mapping) -> dict:
            return s_mix.merge_prefixes((s_mix.reservoirs(sids[b], langsets[b], plan) for b in blocks), plan,
                                        [frozenset(g) for g in plan["groups"]])

        mixture = s_mix.run_recipe(mcfg, summary, lang_tokens, prefixes)
        want = s_mix.selected_keys(mixture)
        selected = np.array([i for i in idx.tolist() if (sid_of[i], langs[i]) in want], dtype=np.int64)
    if mixture is not None:
        if len(selected) != len(mixture.rows):
            raise RuntimeError(f"mixture: {len(mixture.rows)} rows were selected but {len(selected)} records found")
        mixture.save(os.path.join(out, "mixture.json"))
    np.save(os.path.join(out, "selected.npy"), selected.astype(np.int64))
    return s_mix.stats(mcfg, [langs[i] for i in selected], mixture)


def _kept_ids(records_dir: str, keep: np.ndarray) -> list[str]:
    """The ids of the kept records, in order (each block's id column alone, not its texts)."""
    ids: list[str] = []
    for path, first, n in block_paths(records_dir):
        rows = np.flatnonzero(keep[first:first + n])
        if rows.size:
            got = RecordBlock.load_strings(path, "id")
            ids += [got[r] for r in rows.tolist()]
    return ids


def _mix_columns(records_dir: str, langs: list[str], keep: np.ndarray, idx: np.ndarray) -> s_mix.Columns | None:
    """The kept records' source ids and languages as s_mix.Columns."""
    return s_mix.Columns.of(_kept_ids(records_dir, keep), [langs[i] for i in idx.tolist()])


def run_pack(cfg: dict, tokens: Ragged, masks: Ragged, selected: np.ndarray, langs: list[str], tok_stats: Mapping,
             out_store: str, workers: int = 1) -> dict:
    """The store of the selected examples: the plan, then each shard from its examples' tokens."""
    from .._atomic import atomic_directory

    lengths = tokens.lengths[selected]
    pol, n_over = s_pack.policy(cfg["pack"], lengths)
    gb = s_pack.groups(lengths)
    parts = [(g, lengths[gb[g]:gb[g + 1]]) for g in range(len(gb) - 1)]
    plans = list(ordered_map(_plan_group, _init_planner, (cfg["pack"], pol, cfg["seed"]), parts,
                             min(workers, len(parts))))
    plan = s_pack.concat(plans, gb)
    per, bounds, shard_examples = s_pack.shards(cfg["pack"], plan)
    with atomic_directory(out_store, kind="store", arg="output") as tmp:
        specs = [s_pack.write_shard(tmp, k, plan, bounds, ex, selected[ex], tokens.values, tokens.offsets,
                                    masks.values) for k, ex in enumerate(shard_examples)]
        return s_pack.write_index(tmp, cfg, plan, specs, langs, tok_stats["pad_id"], per, tok_stats["vocab"], pol,
                                  n_over)


# ---- the driver ----------------------------------------------------------------------------------
def cached_stage(cache: StageCache, log: BuildLog, name: str, key: str, run: Callable[[str], dict],
                 summary: Callable[[dict], str], timings: dict) -> tuple[str, dict]:
    t0 = time.perf_counter()
    d = cache.load(name, key)
    cached = d is not None
    if not cached:
        def write(tmp: str) -> None:
            stats = run(tmp)
            stats["seconds"] = time.perf_counter() - t0
            s_write.write_json(os.path.join(tmp, "stats.json"), stats)

        d = cache.save(name, key, write)
    stats = s_write.read_json(os.path.join(d, "stats.json"))
    seconds = time.perf_counter() - t0
    timings[name] = {"seconds": seconds, "cached": cached, "peak_rss_mb": peak_rss_mb()}
    log.stage(name, summary(stats), seconds, cached)
    log.detail(f"cache {d}")
    _log_peak(log, timings[name])
    return d, stats


def _log_peak(log: BuildLog, timing: Mapping) -> None:
    if timing.get("peak_rss_mb") is not None:
        log.detail(f"peak memory so far {timing['peak_rss_mb']:,.0f} MB")


def load_ragged(path: str) -> Ragged:
    """A cached Ragged: values memory-mapped, offsets in memory (8 bytes per record)."""
    return Ragged(np.load(os.path.join(path, "values.npy"), mmap_mode="r"), np.load(os.path.join(path, "offsets.npy")))


def run(cfg: dict, log: BuildLog, *, use_cache: bool = True, workers: int = 1) -> dict:
    """Run the build a loaded, checked config describes; return its summary."""
    from .._atomic import atomic_directory

    cache = StageCache(cfg["cache_dir"], enabled=True)
    remove_stale_scratch(cfg["cache_dir"])
    if not use_cache:
        cache.enabled = False
    t_start = time.perf_counter()
    timings: dict = {}

    k_read = s_read.key(cfg)
    tcfg = cfg["tokenizer"]
    k_tok = s_tok.key(k_read, tcfg)
    # the tokenizer loads (in the core, without the GIL) while the records are read, when the tokenize
    # stage will run and no stage forks worker processes before it
    ahead = None
    if workers <= 1 and not (use_cache and os.path.isdir(cache.path("tokenize", k_tok))):
        ahead = Ahead(s_tok.load_tokenizer, tcfg)
    try:
        d_read, st_read = cached_stage(cache, log, "read", k_read, lambda tmp: run_read(cfg, tmp, log),
                                       s_read.summary, timings)
        records_path = os.path.join(d_read, RECORDS)
        uids = s_read.uids_of([s["records"] for s in st_read["sources"]])

        k_lid = s_langid.key(k_read, cfg["langid"])
        d_lid, st_lid = cached_stage(cache, log, "langid", k_lid,
                                     lambda tmp: run_langid(cfg, records_path, tmp, log, workers), s_langid.summary,
                                     timings)
        langs = load_langs(d_lid)
        alive = np.load(os.path.join(d_lid, "keep.npy"))
    except BaseException:
        # a failed build waits for the tokenizer's load: a process exiting while that thread runs in the core can
        # end in std::terminate instead of its error (seen under load: exit -6 for an injected langid failure)
        if ahead is not None:
            ahead.join()
        raise

    d_tok, st_tok = cached_stage(cache, log, "tokenize", k_tok,
                                 lambda tmp: run_tokenize(cfg, records_path, st_read["records"], tmp, log, workers,
                                                          ahead), s_tok.summary, timings)
    ahead = None  # unused when the entry was found after all: dropped
    tokens_all = load_ragged(os.path.join(d_tok, "tokens"))
    masks_all = load_ragged(os.path.join(d_tok, "loss_mask"))
    lengths_all = tokens_all.lengths
    alive = alive & (lengths_all > 0)  # records the tokenizer's truncation policy dropped are empty

    k_dd = s_dedup.key(k_lid, k_tok if "max_length" in tcfg else None, cfg["dedup"], cfg["seed"])
    d_dd, st_dd = cached_stage(cache, log, "dedup", k_dd,
                               lambda tmp: run_dedup(cfg, records_path, langs, alive, uids, tmp, log, workers),
                               s_dedup.summary, timings)
    keep = np.load(os.path.join(d_dd, "keep.npy"))

    k_mix = s_mix.key(k_dd, k_tok, cfg["mixture"])
    d_mix, st_mix = cached_stage(cache, log, "mix", k_mix,
                                 lambda tmp: run_mix(cfg, records_path, langs, keep, lengths_all, uids, tmp, log),
                                 s_mix.summary, timings)
    selected = np.load(os.path.join(d_mix, "selected.npy"))

    # pack + write (the output directory itself is the cache of this stage)
    k_pack = s_pack.key(k_mix, k_tok, cfg["pack"], cfg["seed"])
    out = cfg["output"]
    summary = s_write.load_existing(out, k_pack, log) if use_cache else None
    t0 = time.perf_counter()
    if summary is not None:
        s_write.sync_report(out, cfg["report"], k_pack, summary.get("engine", "local"))
        timings["pack"] = {"seconds": time.perf_counter() - t0, "cached": True, "peak_rss_mb": peak_rss_mb()}
        log.stage("pack", s_pack.summary(summary["stages"]["pack"]), 0.0, True)
    else:
        sel_langs = [langs[i] for i in selected]
        stages = {"read": st_read, "langid": st_lid, "tokenize": st_tok, "dedup": st_dd, "mix": st_mix,
                  "tokens_by_lang": {
                      "read": s_write.by_lang(langs, lengths_all),
                      "dedup": s_write.by_lang([langs[i] for i in np.flatnonzero(keep)], lengths_all[keep]),
                      "mix": s_write.by_lang(sel_langs, lengths_all[selected])},
                  "lengths": s_write.length_summary(lengths_all[selected], sel_langs)}
        with atomic_directory(out, kind="build") as tmp:
            st_pack = run_pack(cfg, tokens_all, masks_all, selected, sel_langs, st_tok, os.path.join(tmp, "store"),
                               workers)
            st_pack["seconds"] = time.perf_counter() - t0
            stages["pack"] = st_pack
            timings["pack"] = {"seconds": time.perf_counter() - t0, "cached": False, "peak_rss_mb": peak_rss_mb()}
            summary = s_write.summary_of(cfg, k_pack, stages, "local")
            mixture_path = os.path.join(d_mix, "mixture.json")
            tok_path = os.path.join(d_tok, "tokenizer.json")
            mixture = None
            if os.path.isfile(mixture_path):
                from ..recipes import Mixture

                mixture = Mixture.load(mixture_path)
            s_write.assemble(tmp, summary, stage_timings(timings, {"read": st_read, "langid": st_lid,
                                                                   "tokenize": st_tok, "dedup": st_dd,
                                                                   "mix": st_mix, "pack": st_pack}),
                             lengths_all[selected], sel_langs, mixture=mixture,
                             tokenizer_json=tok_path if os.path.isfile(tok_path) else None)
        log.stage("pack", s_pack.summary(st_pack), timings["pack"]["seconds"], False)
        _log_peak(log, timings["pack"])
        log.detail(f"output {out} (key {k_pack})")
    for entry in cache.discarded:
        log.line(f"warning: cache entry {entry} was corrupt and has been recomputed")
    summary = dict(summary)
    summary["timings"] = timings
    summary["seconds"] = time.perf_counter() - t_start
    summary["cache_discarded"] = list(cache.discarded)
    return summary


def stage_timings(timings: Mapping, stats: Mapping[str, Mapping]) -> dict:
    """timings.json: per stage, the seconds it took when it was computed (from its statistics) and in
    this run, and the peak memory."""
    out = {}
    for name, t in timings.items():
        s = stats.get(name, {})
        out[name] = dict(t, **{k: s[k] for k in s_write.TIMING_KEYS if k in s})
    return out


_SCRATCH = ".scratch-"  # + pid + "-" + random: scratch directories earlier versions made in cache_dir


def remove_stale_scratch(cache_dir: str) -> None:
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
