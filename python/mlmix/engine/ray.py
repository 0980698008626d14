"""The Ray executor: the stages of :mod:`mlmix.engine.stages` as Ray Data operations.

It holds no stage logic; it decides only how blocks of records reach each stage's functions:

- ``read``: one task per source (``map_batches``) yields its records in blocks from the C++ reader, each an
  Arrow table of the records' columns (:meth:`mlmix.recblock.RecordBlock.to_arrow`) with their uids: no record
  becomes a Python object or JSON text on the way to the stages.
- ``langid``, ``tokenize`` and the dedup keys: one ``map_batches`` on an actor pool (the langid model
  and the tokenizer are loaded once per actor), each batch through the stages' block functions; the
  blocks' counts ride on their first row and are merged on the driver. Tokens and loss masks stay in
  the dataset as Arrow list columns (materialised once; spilled to disk when the object store fills).
- ``dedup``: exact: ``groupby((scope, hash)).count()`` finds the hashes held more than once, whose
  records come to the driver; near: each record's band keys are exploded into rows and
  ``groupby(key).count()`` finds the shared keys, whose members come to the driver, are paired, and
  are verified on shingle sets computed on the workers for the candidates only.
- ``mix``: ``groupby(sid).aggregate(Count, Unique(lang))`` gives one row per source; each block is
  summarised and its per-group bottom-k reservoirs kept (``map_batches``), merged on the driver.
- ``pack``: each group of selected examples planned in a task, the plans joined on the driver; each
  selected record's tokens are tagged with the shard(s) they land in and shuffled by shard
  (``groupby(shard).map_groups``): one task per shard writes its files into the output's temporary
  directory (which the workers must share); the driver writes the index arrays and the manifest.

What runs on the driver, and what bounds it, is in docs/ray.md. A worker process that dies is retried
by Ray; every stage is deterministic, so a retried block is the same block.

Ray is an optional dependency (``pip install 'mlmix[ray]'``); :func:`connect` connects to ``address``,
else to ``RAY_ADDRESS``, else starts a local cluster (and the build shuts down only what it started).
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import re
import sys
import time
import warnings
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import numpy as np

from .._atomic import atomic_directory
from .._deps import require
from ..ragged import Ragged
from ..recblock import ARROW_COLUMNS, RecordBlock
from .log import BuildLog, peak_rss_mb
from .stages import dedup as s_dedup
from .stages import langid as s_langid
from .stages import mix as s_mix
from .stages import pack as s_pack
from .stages import read as s_read
from .stages import tokenize as s_tok
from .stages import write as s_write

__all__ = ["RayEngineError", "build_ray", "connect", "run"]

_BATCH = 1024  # records per map_batches call


class RayEngineError(ConnectionError):
    """The Ray cluster could not be reached (a ConnectionError, so an OSError)."""


# ---- the cluster -------------------------------------------------------------------------------
_ADDRESS_RE = re.compile(r"^(auto|local|(ray://)?[A-Za-z0-9_.\-\[\]:]+:\d{1,5})$")


def connect(address: str | None = None, *, num_cpus: int | None = None,
            object_store_memory: int | None = None) -> bool:
    """Connect to a Ray cluster; return True if this call started Ray (so the caller shuts it down).

    address: ``"host:port"``, ``"ray://host:port"`` (Ray client), ``"auto"`` (a cluster started on this
    machine with ``ray start``) or None: ``RAY_ADDRESS`` if set, else a new local cluster with
    ``num_cpus`` CPUs (default: all). An already initialised Ray is used as it is.
    """
    if num_cpus is not None and (isinstance(num_cpus, bool) or not isinstance(num_cpus, int) or num_cpus < 1):
        raise ValueError(f"num_cpus must be an integer >= 1 (or None for all cores), got {num_cpus!r}")
    where = "address"
    if address is None and os.environ.get("RAY_ADDRESS"):
        address, where = os.environ["RAY_ADDRESS"], "RAY_ADDRESS"
    if address is not None and (not isinstance(address, str) or not _ADDRESS_RE.match(address)):
        raise ValueError(f"{where} must be 'host:port', 'ray://host:port', 'auto' or 'local', got {address!r}")
    if address == "local":
        address = None
    ray = require("ray", "the Ray engine")
    if ray.is_initialized():
        return False
    if address not in (None, "auto"):
        _check_reachable(address)
    kwargs: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False, "logging_level": "WARNING"}
    if address is None:
        kwargs.update(num_cpus=num_cpus, object_store_memory=object_store_memory)
    try:
        ray.init(address=address, **kwargs)
    except Exception as exc:  # ConnectionError, TimeoutError, RuntimeError: depends on the Ray version
        raise RayEngineError(
            f"cannot connect to the Ray cluster at address {address!r} ({type(exc).__name__}: {exc}); "
            "check the head node's host:port (`ray status` on the head), or pass address=None / unset "
            "RAY_ADDRESS to start a local cluster") from exc
    return True


def _check_reachable(address: str, timeout: float = 5.0) -> None:
    """Fail fast on a head node that does not answer (Ray itself retries for minutes)."""
    import socket

    host, _, port = address.removeprefix("ray://").rpartition(":")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout):
            pass
    except OSError as exc:
        raise RayEngineError(
            f"cannot connect to the Ray cluster at address {address!r} ({exc.strerror or exc}); check the head "
            "node's host:port (`ray status` on the head), or pass address=None and unset RAY_ADDRESS to start "
            "a local cluster") from exc



# ---- per-block work on the workers (each calls a stage's block function) -------------------------
REC = "rec_"  # the prefix of a record's columns in the datasets (RecordBlock.to_arrow)


def _read_sources(batch: Mapping, sources: list) -> Iterator[Any]:
    """The sources' canonical records in blocks, as the C++ reader gives them (the local executor's read): one
    Arrow table per block, a row per record with its uid and source id (JSON) beside its columns."""
    import pyarrow as pa

    for i in np.asarray(batch["src"]).tolist():
        for uids, block in s_read.blocks(int(i), sources[int(i)], _BATCH):
            t = block.to_arrow(REC)
            t = t.append_column("uid", pa.array(uids, type=pa.int64()))
            yield t.append_column("sid", pa.array(s_mix.sids(block.strings("id")), type=pa.string()))


class _Prepare:
    """langid, tokenize and the dedup keys of a batch of records, with the langid model and the tokenizer
    loaded once per actor. Adds ``lang``/``alive``, ``tokens``/``mask`` (Arrow list columns), ``ntok``, the
    dedup keys, and the block's counts (pickled, on the first row).

    ``fault_marker`` (tests only): the first call of the first actor that finds the file absent creates
    it and kills its own process, so that Ray has to restart the actor and retry the batch.
    """

    def __init__(self, lcfg: Mapping, tcfg: Mapping, dd: Mapping | None = None, fault_marker: str | None = None):
        self.labeler = s_langid.Labeler(lcfg)
        self.tcfg = dict(tcfg)
        self.tokenizer = s_tok.load_tokenizer(self.tcfg)
        self.dd = dict(dd) if dd else None
        self.fault_marker = fault_marker

    def __call__(self, table):
        import pyarrow as pa

        if self.fault_marker is not None:
            try:
                fd = os.open(self.fault_marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                pass
            else:
                os.close(fd)
                os._exit(1)
        block = RecordBlock.from_arrow(table, REC)
        uid = table.column("uid").to_numpy()
        lab = self.labeler.label_block(block)
        tokens, masks, st = s_tok.encode_block(self.tokenizer, block, self.tcfg)
        lengths = tokens.lengths
        alive = lab["alive"] & (lengths > 0)
        counts = {"read": s_read.count_block(uid, block),
                  "langid": s_langid.count(lab), "tokenize": s_tok.count(tokens, masks, st),
                  "read_tokens": Counter(), "alive_langs": Counter(), "alive_tokens": Counter()}
        for lang, n, a in zip(lab["lang"], lengths.tolist(), alive.tolist()):
            counts["read_tokens"][lang] += n
            if a:
                counts["alive_langs"][lang] += 1
                counts["alive_tokens"][lang] += n
        table = table.append_column("lang", pa.array(lab["lang"], type=pa.string()))
        table = table.append_column("alive", pa.array(alive))
        offsets = pa.array(tokens.offsets, type=pa.int64())
        table = table.append_column("tokens", pa.LargeListArray.from_arrays(offsets, pa.array(tokens.values)))
        table = table.append_column("mask", pa.LargeListArray.from_arrays(offsets, pa.array(masks.values)))
        table = table.append_column("ntok", pa.array(lengths, type=pa.int64()))
        if self.dd is not None:
            k = s_dedup.keys(Ragged(*block.text_column(num_threads=1), validate=False), lab["lang"], self.dd,
                             num_threads=1)  # one CPU per actor
            table = table.append_column("scope", pa.array(k["scope"]))
            table = table.append_column("h0", pa.array(k["h"][:, 0]))
            table = table.append_column("h1", pa.array(k["h"][:, 1]))
            if "bands" in k:
                b = np.where(k["has"][:, None], k["bands"], 0).astype(np.uint64)
                n_b = np.where(k["has"], b.shape[1], 0)
                offs = np.zeros(len(block) + 1, dtype=np.int64)
                np.cumsum(n_b, out=offs[1:])
                table = table.append_column("bands", pa.LargeListArray.from_arrays(
                    pa.array(offs), pa.array(b[k["has"]].reshape(-1))))
        col = [None] * len(block)
        if len(block):
            col[0] = pickle.dumps(counts)
        return table.append_column("counts", pa.array(col, type=pa.binary()))


def _explode_bands(table):
    """One row per (record, band key): key, uid, scope."""
    import pyarrow as pa

    col = table.column("bands").combine_chunks()
    offsets = np.asarray(col.offsets, dtype=np.int64)
    take = np.repeat(np.arange(table.num_rows), np.diff(offsets))
    return pa.table({"key": col.values.slice(int(offsets[0]), int(offsets[-1] - offsets[0])),
                     "uid": table.column("uid").take(pa.array(take)),
                     "scope": table.column("scope").take(pa.array(take))})


def _shingle_block(table, wanted: np.ndarray, dd: Mapping):
    """Shingle sets of the records of a batch whose uid is in the sorted array ``wanted`` (their texts from the
    record columns, in the core)."""
    import pyarrow as pa

    uid = table.column("uid").to_numpy()
    pos = np.searchsorted(wanted, uid)
    hit = np.flatnonzero((pos < len(wanted)) & (wanted[np.minimum(pos, len(wanted) - 1)] == uid))
    sub = table.take(pa.array(hit, type=pa.int64()))
    block = RecordBlock.from_arrow(sub, REC)
    sets = s_dedup.shingle_sets(Ragged(*block.text_column(num_threads=1), validate=False), dd, num_threads=1)
    return pa.table({"uid": pa.array(uid[hit], type=pa.int64()),
                     "shingles": pa.LargeListArray.from_arrays(pa.array(sets.offsets), pa.array(sets.values)),
                     "lang": sub.column("lang").cast(pa.string()),
                     "ntok": sub.column("ntok").cast(pa.int64())})


def _summarize_block(batch: dict):
    import pyarrow as pa

    part = s_mix.summarize(batch["sid"].tolist(), batch["count()"].tolist(), [list(x) for x in batch["unique(lang)"]])
    return pa.table({"part": [pickle.dumps(part)]})


def _reservoir_block(batch: dict, plan: Mapping):
    import pyarrow as pa

    part = s_mix.reservoirs(batch["sid"].tolist(), [list(x) for x in batch["unique(lang)"]], plan)
    return pa.table({"part": [pickle.dumps(part)]})


def _tag_shards(table, refs):
    """The selected records of a block, one row per (record, shard it lands in): shard, example, tokens, mask."""
    import pyarrow as pa
    import ray

    r = ray.get(refs)
    uids, pair_ex, pair_shard = r["uids"], r["pair_ex"], r["pair_shard"]
    uid = table.column("uid").to_numpy()
    ex = np.searchsorted(uids, uid)
    hit = (ex < len(uids)) & (uids[np.minimum(ex, len(uids) - 1)] == uid)
    rows, ex = np.flatnonzero(hit), ex[hit]
    lo, hi = np.searchsorted(pair_ex, ex, side="left"), np.searchsorted(pair_ex, ex, side="right")
    counts = hi - lo  # a dropped example (overlong = drop) has no segment, so no row
    take = np.repeat(rows, counts)
    pos = np.repeat(lo - (np.cumsum(counts) - counts), counts) + np.arange(len(take))
    return pa.table({"shard": pa.array(pair_shard[pos], type=pa.int64()), "ex": pa.array(pair_ex[pos], type=pa.int64()),
                     "tokens": table.column("tokens").take(pa.array(take)),
                     "mask": table.column("mask").take(pa.array(take))})


def _write_shard_group(table, plan_ref, bounds: np.ndarray, directory: str):
    """One shard's files from the examples tagged with it (a ``map_groups`` UDF); returns its specs."""
    import pyarrow as pa
    import ray

    t0 = time.perf_counter()
    plan = ray.get(plan_ref)
    k = int(table.column("shard")[0].as_py())
    table = table.take(pa.array(np.argsort(table.column("ex").to_numpy(), kind="stable")))
    ex = table.column("ex").to_numpy()
    tok = table.column("tokens").combine_chunks()
    msk = table.column("mask").combine_chunks()
    offsets = np.asarray(tok.offsets, dtype=np.int64)
    values = np.asarray(tok.values, dtype=np.uint32)[offsets[0]:offsets[-1]]
    moff = np.asarray(msk.offsets, dtype=np.int64)
    mvals = np.asarray(msk.values, dtype=np.uint8)[moff[0]:moff[-1]]
    specs = s_pack.write_shard(directory, k, plan, bounds, ex, np.arange(len(ex)), values, offsets - offsets[0], mvals)
    return pa.table({"shard": pa.array([k], type=pa.int64()), "specs": pa.array([json.dumps(specs)]),
                     "seconds": pa.array([time.perf_counter() - t0], type=pa.float64())})


# ---- Dataset helpers (driver side) -----------------------------------------------------------------
def _collect(ds, columns: list[str]) -> dict[str, np.ndarray]:
    """Columns of a (small) dataset as numpy arrays on the driver."""
    parts: dict[str, list] = {c: [] for c in columns}
    for batch in ds.select_columns(columns).iter_batches(batch_format="numpy", batch_size=None):
        for c in columns:
            parts[c].append(batch[c])
    return {c: (np.concatenate(v) if v else np.zeros(0)) for c, v in parts.items()}


def _multi_keys(ds, keys: list[str], partitions: int) -> dict[str, np.ndarray]:
    """The key tuples that occur more than once in ``ds``: a hash-partitioned ``groupby(...).count()``."""
    counts = ds.groupby(keys, num_partitions=partitions).count()
    multi = counts.map_batches(lambda b: {k: v[b["count()"] > 1] for k, v in b.items()}, batch_format="numpy",
                               batch_size=None)
    return _collect(multi, keys)


def _rows_with_keys(ds, wanted: dict[str, np.ndarray], columns: list[str]) -> dict[str, np.ndarray]:
    """The rows of ``ds`` whose key tuple is in ``wanted`` (broadcast to the workers), collected."""
    if not len(next(iter(wanted.values()))):
        return {c: np.zeros(0) for c in columns}
    ray = require("ray", "the Ray engine")
    ref = ray.put(wanted)
    keys = list(wanted)

    def pick(batch: dict) -> dict:
        import pandas as pd

        w = pd.DataFrame(ray.get(ref)).assign(_hit=True)
        got = pd.DataFrame({c: batch[c] for c in set(keys) | set(columns)}).merge(w, on=keys, how="left")
        hit = got["_hit"].fillna(False).to_numpy(bool)
        return {c: got[c].to_numpy()[hit] for c in columns}

    return _collect(ds.map_batches(pick, batch_format="numpy", batch_size=_BATCH), columns)


def _drop(ds, uids: np.ndarray):
    """ds without the rows whose uid is in ``uids`` (broadcast to the workers)."""
    if not len(uids):
        return ds

    def keep(table, gone: np.ndarray):
        import pyarrow as pa
        import pyarrow.compute as pc

        return table.filter(pc.invert(pc.is_in(table.column("uid"), value_set=pa.array(gone))))

    return ds.map_batches(keep, batch_size=_BATCH, batch_format="pyarrow", fn_kwargs={"gone": uids})


def _pool(size: int):
    """An actor pool of 1..size actors (Ray Data grows it while there is work and CPUs)."""
    import ray.data

    return ray.data.ActorPoolStrategy(min_size=1, max_size=size)


def _parts(ds) -> Iterator[Any]:
    for t in ds.iter_batches(batch_format="pyarrow", batch_size=None):
        for raw in t.column("part").to_pylist():
            yield pickle.loads(raw)


# ---- the stages on the cluster --------------------------------------------------------------------
def _dedup(ds, dd: Mapping | None, partitions: int) -> dict:
    """The dedup stage's removal over the alive records (uid-sorted arrays come to the driver only for
    the shared keys)."""
    alive = ds.map_batches(_alive, batch_format="pyarrow", batch_size=_BATCH)
    if dd is None:
        return dict(s_dedup.nothing(), alive=alive)
    cols = ["uid", "sid", "lang", "ntok", "scope", "h0", "h1"] + (["bands"] if dd["near"] else [])
    alive = alive.select_columns(cols + [REC + c for c in ARROW_COLUMNS]).materialize()
    gone = np.zeros(0, np.int64)
    who: dict = {}  # uid -> (language, tokens) of the records that may be removed
    if dd["exact"]:
        multi = _multi_keys(alive, ["scope", "h0", "h1"], partitions)
        rows = _rows_with_keys(alive, multi, ["uid", "scope", "h0", "h1", "lang", "ntok"])
        who.update(zip(rows["uid"].tolist(), zip(rows["lang"].tolist(), rows["ntok"].tolist())))
        if len(rows["uid"]):
            gone = s_dedup.exact_removed(rows["uid"].astype(np.int64), rows["scope"].astype(np.uint64),
                                         np.stack([rows["h0"], rows["h1"]], axis=1).astype(np.uint64))
    gone_near = np.zeros(0, np.int64)
    info: dict = {}
    if dd["near"]:
        banded = _drop(alive.select_columns(["uid", "scope", "bands"]), gone).map_batches(
            _explode_bands, batch_format="pyarrow", batch_size=_BATCH).materialize()
        multi = _multi_keys(banded, ["key"], partitions)
        members = _rows_with_keys(banded, multi, ["key", "uid", "scope"])
        pairs = s_dedup.candidate_pairs(members["key"].astype(np.uint64), members["uid"].astype(np.int64),
                                        members["scope"].astype(np.uint64))
        info = {"bands": dd["bands"], "rows": dd["rows"], "candidate_pairs": int(len(pairs)), "verified_pairs": 0}
        if len(pairs):
            wanted = np.unique(pairs)
            sets_ds = alive.select_columns(["uid", "lang", "ntok"] + [REC + c for c in ARROW_COLUMNS]).map_batches(
                _shingle_block, batch_size=_BATCH, batch_format="pyarrow", fn_kwargs={"wanted": wanted, "dd": dd})
            uids, sets, langs, ntok = _gather_sets(sets_ds)
            who.update(zip(uids.tolist(), zip(langs, ntok.tolist())))
            gone_near, info["verified_pairs"] = s_dedup.near_removed(pairs, uids, sets, dd)
    removed = np.union1d(gone, gone_near).astype(np.int64)
    removed_tokens: Counter = Counter()
    for u in removed.tolist():
        lg, n = who[u]
        removed_tokens[lg] += int(n)
    return {"removed": removed, "exact_removed": Counter(who[u][0] for u in gone.tolist()),
            "near_removed": Counter(who[u][0] for u in gone_near.tolist()), "lsh": info, "alive": alive,
            "removed_tokens": removed_tokens}


def _alive(table):
    """The records that survived langid and the tokenizer's truncation policy."""
    return table.filter(table.column("alive"))


def _gather_sets(sets_ds):
    """(uids, shingle sets, languages, token counts) of the candidate documents, in uid order, on the driver."""
    uids, parts, langs, ntok = [], [], [], []
    for table in sets_ds.iter_batches(batch_format="pyarrow", batch_size=None):
        col = table.column("shingles").combine_chunks()
        offsets = np.asarray(col.offsets, dtype=np.int64)
        values = np.asarray(col.values, dtype=np.uint64)[offsets[0]:offsets[-1]]
        uids.append(table.column("uid").to_numpy())
        parts.append(Ragged(values, offsets - offsets[0]))
        langs += table.column("lang").to_pylist()
        ntok.append(table.column("ntok").to_numpy())
    uid = np.concatenate(uids).astype(np.int64)
    order = np.argsort(uid, kind="stable")
    sets = Ragged.concat(parts).take(order)
    return uid[order], sets, [langs[i] for i in order.tolist()], np.concatenate(ntok)[order]


def _mix(cfg: dict, kept, lang_tokens: Mapping[str, int], partitions: int):
    """(selected uid/lang/ntok in uid order, the Mixture or None) as the mix stage defines them."""
    mcfg = cfg["mixture"]
    s_mix.check(mcfg)
    if mcfg["recipe"] == "all":
        got = _collect(kept, ["uid", "lang", "ntok"])
        mixture = None
    else:
        from ray.data.aggregate import Count, Unique

        sources = kept.select_columns(["sid", "lang"]).groupby("sid", num_partitions=partitions).aggregate(
            Count(), Unique("lang")).materialize()
        summary = s_mix.merge(_parts(sources.map_batches(_summarize_block, batch_format="numpy", batch_size=None)))
        if summary["dups"]:
            rows = _rows_with_keys(kept, {"sid": np.array(sorted(summary["dups"]), dtype=object)}, ["uid", "sid", "lang"])
            n_src = len(cfg["sources"])
            s_mix.duplicate_error(rows["uid"].astype(np.int64), rows["sid"].tolist(), rows["lang"].tolist(),
                                  lambda u: s_read.uid_name(u, n_src))
        s_mix.check_ids(summary)

        def prefixes(plan: Mapping) -> dict:
            parts = sources.map_batches(_reservoir_block, batch_format="numpy", batch_size=None,
                                        fn_kwargs={"plan": plan})
            return s_mix.merge_prefixes(_parts(parts), plan, [frozenset(g) for g in plan["groups"]])

        mixture = s_mix.run_recipe(mcfg, summary, lang_tokens, prefixes)
        want = sorted(s_mix.selected_keys(mixture))
        wanted = {"sid": np.array([w[0] for w in want], dtype=object), "lang": np.array([w[1] for w in want], dtype=object)}
        got = _rows_with_keys(kept, wanted, ["uid", "lang", "ntok"]) if want else \
            {"uid": np.zeros(0, np.int64), "lang": np.zeros(0, object), "ntok": np.zeros(0, np.int64)}
        if len(got["uid"]) != len(want):
            raise RuntimeError(f"mixture: {len(want)} rows were selected but {len(got['uid'])} records found")
    order = np.argsort(got["uid"], kind="stable")
    sel = {"uid": got["uid"][order].astype(np.int64), "lang": [sys.intern(str(x)) for x in got["lang"][order].tolist()],
           "ntok": got["ntok"][order].astype(np.int64)}
    return sel, mixture


def _pack(cfg: dict, ds, sel: Mapping, tok_stats: Mapping, out_store: str) -> dict:
    """The pack stage: the plan on the driver, each shard written by its own task, the index by the driver."""
    ray = require("ray", "the Ray engine")
    lengths = sel["ntok"]
    pol, n_over = s_pack.policy(cfg["pack"], lengths)
    gb = s_pack.groups(lengths)  # each group of examples planned in its own task
    plan_task = ray.remote(num_cpus=1)(s_pack.plan_group)
    plans = ray.get([plan_task.remote(cfg["pack"], lengths[gb[g]:gb[g + 1]], pol, cfg["seed"], g)
                     for g in range(len(gb) - 1)])
    plan = s_pack.concat(plans, gb)
    per, bounds, shard_examples = s_pack.shards(cfg["pack"], plan)
    n = len(shard_examples)
    pair_ex = np.concatenate(shard_examples)
    pair_shard = np.repeat(np.arange(n, dtype=np.int64), [len(e) for e in shard_examples])
    order = np.lexsort((pair_shard, pair_ex))
    os.makedirs(out_store, exist_ok=True)
    refs = ray.put({"uids": sel["uid"], "pair_ex": pair_ex[order], "pair_shard": pair_shard[order]})
    plan_ref = ray.put(plan)
    tagged = ds.select_columns(["uid", "tokens", "mask"]).map_batches(
        _tag_shards, batch_size=_BATCH, batch_format="pyarrow", fn_kwargs={"refs": refs})
    written = tagged.groupby("shard", num_partitions=max(1, min(n, 64))).map_groups(
        _write_shard_group, batch_format="pyarrow", fn_kwargs={"plan_ref": plan_ref, "bounds": bounds,
                                                               "directory": out_store})
    specs: dict[int, dict] = {}
    task_seconds = 0.0
    for t in written.iter_batches(batch_format="pyarrow", batch_size=None):
        for k, spec, sec in zip(t.column("shard").to_pylist(), t.column("specs").to_pylist(),
                                t.column("seconds").to_pylist()):
            specs[int(k)] = json.loads(spec)
            task_seconds += sec
    if sorted(specs) != list(range(n)):
        raise RuntimeError(f"pack: shards {sorted(set(range(n)) - set(specs))} were not written (a lost block?)")
    stats = s_pack.write_index(out_store, cfg, plan, [specs[k] for k in range(n)], sel["lang"], tok_stats["pad_id"],
                               per, tok_stats["vocab"], pol, n_over)
    return dict(stats, task_seconds=task_seconds)


def run(cfg: dict, log: BuildLog, *, address: str | None = None, num_cpus: int | None = None,
        concurrency: int | None = None, fault_marker: str | None = None) -> dict:
    """Run the build a loaded, checked config describes on Ray; return its summary."""
    ray = require("ray", "the Ray engine")
    if concurrency is not None and (isinstance(concurrency, bool) or not isinstance(concurrency, int)
                                    or concurrency < 1):
        raise ValueError(f"concurrency must be an integer >= 1 (or None), got {concurrency!r}")
    started = connect(address, num_cpus=num_cpus)
    try:
        with warnings.catch_warnings():  # Ray's own defaults trip its deprecation warnings (ray 2.60)
            warnings.simplefilter("ignore", DeprecationWarning)
            ctx = ray.data.DataContext.get_current()
        ctx.enable_progress_bars = bool(log.progress)
        if not log.verbose:  # the stage lines are the log; Ray Data's per-execution INFO lines are noise
            logging.getLogger("ray.data").setLevel(logging.ERROR if log.quiet else logging.WARNING)
        ctx.print_on_execution_start = False
        if concurrency is None:
            concurrency = max(1, int(ray.cluster_resources().get("CPU", 1)))
        return _run(cfg, log, concurrency, fault_marker)
    finally:
        if started:
            ray.shutdown()


def _run(cfg: dict, log: BuildLog, concurrency: int, fault_marker: str | None) -> dict:
    ray = require("ray", "the Ray engine")
    t_start = time.perf_counter()
    timings: dict = {}
    stats: dict = {}
    # A worker process that dies is retried by Ray Data's defaults: tasks are resubmitted, and actor pools
    # restart a dead actor and resubmit its batches; an exception raised by our own code is not retried
    # (it would fail again) and stops the build.

    def done(name: str, t0: float, st: Mapping, line: Callable[[Mapping], str]) -> None:
        sec = time.perf_counter() - t0
        timings[name] = {"seconds": sec, "cached": False, "peak_rss_mb": peak_rss_mb()}
        log.stage(name, line(dict(st, seconds=sec)), sec, False)

    # the stage keys, as the local executor computes them (build.json records the last)
    k_read = s_read.key(cfg)
    k_lid = s_langid.key(k_read, cfg["langid"])
    k_tok = s_tok.key(k_read, cfg["tokenizer"])
    k_dd = s_dedup.key(k_lid, k_tok if "max_length" in cfg["tokenizer"] else None, cfg["dedup"], cfg["seed"])
    k_mix = s_mix.key(k_dd, k_tok, cfg["mixture"])
    k_pack = s_pack.key(k_mix, k_tok, cfg["pack"], cfg["seed"])
    dd = s_dedup.params(cfg) if cfg["dedup"]["exact"] or cfg["dedup"]["near"] else None

    # read (one task per source), then langid + tokenize + dedup keys on an actor pool
    t0 = time.perf_counter()
    sources = cfg["sources"]
    ds = ray.data.from_items([{"src": i} for i in range(len(sources))], override_num_blocks=len(sources))
    # materialised before the actor pool starts, so that its actors never hold every CPU while read tasks wait
    ds = ds.map_batches(_read_sources, batch_size=1, batch_format="numpy",
                        fn_kwargs={"sources": sources}).materialize()
    ds = ds.map_batches(_Prepare, batch_size=_BATCH, batch_format="pyarrow", compute=_pool(concurrency),
                        fn_constructor_kwargs={"lcfg": cfg["langid"], "tcfg": cfg["tokenizer"], "dd": dd,
                                               "fault_marker": fault_marker}).materialize()
    c_read = c_lid = c_tok = None
    read_tokens: Counter = Counter()
    alive_langs: Counter = Counter()
    alive_tokens: Counter = Counter()
    for t in ds.select_columns(["counts"]).iter_batches(batch_format="pyarrow", batch_size=None):
        for raw in t.column("counts").to_pylist():
            if raw is not None:
                c = pickle.loads(raw)
                c_read = s_read.merge(c_read, c["read"])
                c_lid = s_langid.merge(c_lid, c["langid"])
                c_tok = s_tok.merge(c_tok, c["tokenize"])
                read_tokens.update(c["read_tokens"])
                alive_langs.update(c["alive_langs"])
                alive_tokens.update(c["alive_tokens"])
    stats["read"] = s_read.finish(c_read, sources)
    done("read", t0, stats["read"], s_read.summary)
    stats["langid"] = s_langid.finish(c_lid, cfg["langid"])
    done("langid", time.perf_counter(), stats["langid"], s_langid.summary)
    tokenizer = s_tok.load_tokenizer(cfg["tokenizer"])
    stats["tokenize"] = s_tok.finish(c_tok, tokenizer)
    done("tokenize", time.perf_counter(), stats["tokenize"], s_tok.summary)

    # dedup
    t0 = time.perf_counter()
    partitions = 2 * concurrency  # shuffle partitions of the groupby stages
    res = _dedup(ds, dd, partitions)
    kept = _drop(res["alive"].select_columns(["uid", "sid", "lang", "ntok"]), res["removed"]).materialize()
    # records and tokens per language kept: the alive ones counted per block, less what dedup removed
    kept_langs = alive_langs - res["exact_removed"] - res["near_removed"]
    kept_tokens = {k: v for k, v in sorted((alive_tokens - res.get("removed_tokens", Counter())).items())
                   if k in kept_langs}
    stats["dedup"] = s_dedup.finish(res, kept_langs)
    done("dedup", t0, stats["dedup"], s_dedup.summary)

    out = cfg["output"]
    with atomic_directory(out, kind="build") as tmp:
        t0 = time.perf_counter()
        sel, mixture = _mix(cfg, kept, kept_tokens, partitions)
        stats["mix"] = s_mix.stats(cfg["mixture"], sel["lang"], mixture)
        done("mix", t0, stats["mix"], s_mix.summary)
        t0 = time.perf_counter()
        st_pack = _pack(cfg, ds, sel, stats["tokenize"], os.path.join(tmp, "store"))
        stats["pack"] = st_pack
        stats["tokens_by_lang"] = {"read": dict(sorted(read_tokens.items())), "dedup": kept_tokens,
                                   "mix": s_write.by_lang(sel["lang"], sel["ntok"])}
        stats["lengths"] = s_write.length_summary(sel["ntok"], sel["lang"])
        sec = time.perf_counter() - t0
        timings["pack"] = {"seconds": sec, "cached": False, "peak_rss_mb": peak_rss_mb(),
                           "task_seconds": st_pack["task_seconds"]}
        summary = s_write.summary_of(cfg, k_pack, stats, "ray")
        s_write.assemble(tmp, summary, timings, sel["ntok"], sel["lang"], mixture=mixture,
                         tokenizer=tokenizer if "name" not in cfg["tokenizer"] else None)
        log.stage("pack", s_pack.summary(dict(st_pack, seconds=sec)), sec, False)
    return dict(summary, timings=timings, seconds=time.perf_counter() - t_start)


def build_ray(config: str | os.PathLike | Mapping, *, address: str | None = None, num_cpus: int | None = None,
              concurrency: int | None = None, quiet: bool = False, verbose: bool = False,
              progress: bool | None = None, _fault_marker: str | None = None) -> dict:
    """``mlmix.build(config, engine="ray", ...)``: the build on a Ray cluster (see :func:`mlmix.build`).

    Raises:
        ImportError: Ray is not installed (``pip install 'mlmix[ray]'``).
        RayEngineError: the cluster cannot be reached.
        ValueError: a bad config or argument (before anything runs).
    """
    from .._outputs import check_build_targets
    from ..config import load_config

    cfg = load_config(config)
    config_dir = None if isinstance(config, Mapping) else os.path.dirname(os.path.abspath(os.fspath(config)))
    check_build_targets(cfg["output"], cfg["cache_dir"], cfg["sources"], config_dir)
    require("ray", "the Ray engine")
    log = BuildLog(quiet=quiet, verbose=verbose, progress=progress)
    return run(cfg, log, address=address, num_cpus=num_cpus, concurrency=concurrency, fault_marker=_fault_marker)
