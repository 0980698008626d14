"""``mlmix build CONFIG --engine ray``: the pipeline of :mod:`mlmix.pipeline` on Ray Data.

The same config gives the same mixture (``mixture.json``) and the same packed store, byte for byte, as
the single-machine engine: every stage is a function of record content and a global record order, never
of block boundaries, worker count or arrival order. How each stage runs:

- ``read``: one Ray task per source (``flat_map`` over the source list) yields canonical records. A record's
  position is ``uid = source_index << 40 | index_in_source`` (int64), which sorts like the single-machine
  record index, so "first seen" and every ordered output agree without a global renumbering.
- ``langid`` and ``tokenize``: one ``map_batches`` with a class UDF on an actor pool, so the py3langid
  model and the tokenizer are loaded once per actor. The same call computes each record's exact hash and
  LSH band keys (the text is at hand). Tokens and loss masks stay in the dataset as Arrow list columns
  (materialised once: later stages read them from the object store, spilled to disk when it fills).
- ``dedup`` exact: ``groupby((scope, 128-bit hash)).count()``, a hash-partitioned shuffle of ~30 B per
  record; the key tuples seen more than once come to the driver, their records are picked out on the
  workers and all but the smallest uid of each are removed (the single-machine engine keeps the first).
- ``dedup`` near: each record's one 64-bit key per LSH band (a hash of scope, band and the band's MinHash
  rows) is exploded into rows; ``groupby(key).count()`` finds the buckets with several members, whose
  members are paired on the driver by the rule of ``mlmix.dedup`` (all pairs up to 128 members, else each
  member with the first and with its predecessor). The shingle sets of the documents in candidate pairs
  are computed on the workers, pairs are verified by exact Jaccard on the driver, and the verified pairs
  are joined into clusters (connected components) by union-find on the driver, uniting toward the
  smaller uid; all but the smallest uid of each cluster are removed. Driver memory: 16 B per candidate
  pair plus the shingle sets of the documents involved (see docs/ray.md).
- ``mix``: recipe ``all`` keeps every surviving record. The other recipes (an exact max-flow assignment
  of sources to languages) run on the driver over counts (:class:`mlmix.recipes.GroupedCorpus`):
  ``groupby(sid).aggregate(Count, Unique(lang))`` gives each source's languages, each block counts its
  sources per language set, and the recipe computes its targets and per-group quotas from those counts.
  Each availability group's chosen sources are the first k in a seeded hash order, i.e. a bottom-k: each
  block keeps its bottom-k per group (a ``StratifiedReservoir`` for integer ids, the recipe's hashed key
  for string ids) and the driver merges them exactly, so only k ids per group and block travel. The
  selected (source id, language) pairs are then picked out on the workers.
- ``pack``: the plan is global (its seed permutes all selected examples before best-fit), so it is made
  on the driver from the selected lengths (O(n) ints), with the shard bounds of ``mlmix.write_store``.
  Each selected record's tokens are tagged with the shard(s) their rows fall in and shuffled by shard
  (``groupby(shard).map_groups``): one task per shard gathers its rows and writes its shard files
  (``mlmix.store.write_shard``) into the output's temporary directory, which the workers must share.
  The driver writes the index arrays and the one manifest (``mlmix.store.write_index``); the output
  directory is renamed into place only when complete.

What runs on the driver is bounded in docs/ray.md (capacity plan), with the steps that would lift each
bound. A worker process that dies (OOM, preemption, a killed actor) is retried by Ray: tasks are
resubmitted, actor pools restart the actor and resubmit its batches; every stage is deterministic, so
a retried block is the same block.

Ray is an optional dependency (``pip install 'mlmix[ray]'``); ``build_ray`` connects to ``address``, else
to ``RAY_ADDRESS``, else starts a local cluster (and shuts down only what it started).
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
import warnings
from collections import Counter
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np

from . import pipeline, readers
from ._atomic import atomic_directory
from ._outputs import check_build_targets, seal
from ._deps import require
from .config import load_config

__all__ = ["RayEngineError", "build_ray", "connect"]

_UID_SHIFT = 40  # uid = source index << 40 | position in source: 2**40 records per source, 2**23 sources
_BATCH = 1024  # records per map_batches call
_MAX_BUCKET_ALL_PAIRS = 128  # the pairing rule of mlmix.dedup (csrc/dedup.cpp kMaxBucketAllPairs)
_U64 = np.uint64
_MASK64 = (1 << 64) - 1


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


# ---- UDFs (run on the workers) -----------------------------------------------------------------
def _read_source(row: Mapping, sources: list) -> Iterator[dict]:
    """Canonical records of one source as rows: uid, source id, given language, the record as JSON."""
    i = int(row["src"])
    for pos, rec in enumerate(readers.iter_source(sources[i])):
        sid = rec.get("id")
        yield {"uid": (i << _UID_SHIFT) | pos, "sid": json.dumps(sid), "given": rec["lang"] or "",
               "text_kind": "text" in rec, "rec": json.dumps(rec, ensure_ascii=False)}


class _Prepare:
    """Language id then tokenization of a batch of records, with the py3langid model and the tokenizer
    loaded once per actor. Adds ``lang``, ``todo``/``identified``/``alive`` flags, ``tokens`` (uint32) and
    ``mask`` (uint8) Arrow list columns, ``ntok``, and the encoder's counts (``st_*``).

    ``fault_marker`` (tests only): the first call of the first actor that finds the file absent creates
    it and kills its own process, so that Ray has to restart the actor and retry the batch.
    """

    def __init__(self, lcfg: Mapping, tcfg: Mapping, dedup: Mapping | None = None,
                 fault_marker: str | None = None) -> None:
        self.lcfg, self.tcfg = dict(lcfg), dict(tcfg)
        self.dedup = dict(dedup) if dedup else None
        self.lid = None
        if self.lcfg["backend"] == "py3langid":
            from .langid import LanguageIdentifier

            self.lid = LanguageIdentifier(self.lcfg.get("languages"))
        self.tokenizer = pipeline.load_tokenizer(self.tcfg)
        self.fault_marker = fault_marker

    def _langs(self, given: list, records: list) -> dict:
        """As pipeline._stage_langid: identify records without a language (all with ``override``)."""
        lcfg = self.lcfg
        todo = [bool(lcfg["override"] or not g) for g in given]
        langs, identified = [], []
        for g, t, rec in zip(given, todo, records):
            if t and self.lid is not None:
                lang, p = self.lid.classify(readers.record_text(rec))
                langs.append(lang if lang and p >= lcfg["threshold"] else lcfg["unknown"])
            else:
                langs.append(g if g else lcfg["unknown"])
            identified.append(t and self.lid is not None)
        alive = [not (lcfg["drop_unknown"] and lang == lcfg["unknown"]) for lang in langs]
        return {"lang": langs, "todo": todo, "identified": identified, "alive": alive}

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
        records = [json.loads(r) for r in table.column("rec").to_pylist()]
        langs = self._langs(table.column("given").to_pylist(), records)
        for name, values in langs.items():
            table = table.append_column(name, pa.array(values))
        if self.dedup is not None:  # the record's exact hash and LSH band keys, for the dedup stage
            texts = [readers.record_text(rec) for rec in records]
            for name, col in _dedup_keys(texts, np.array(langs["lang"], dtype=object), self.dedup).items():
                table = table.append_column(name, col)
        tokens, masks, stats = pipeline.encode_records(self.tokenizer, records, self.tcfg)
        offsets = pa.array(tokens.offsets, type=pa.int64())
        table = table.append_column("tokens", pa.LargeListArray.from_arrays(offsets, pa.array(tokens.values)))
        table = table.append_column("mask", pa.LargeListArray.from_arrays(offsets, pa.array(masks.values)))
        table = table.append_column("ntok", pa.array(tokens.lengths, type=pa.int64()))
        # the batch's encoder counts ride on its first row, so that a sum over rows is exact
        for key in ("truncated", "dropped_too_long", "tokens_removed"):
            col = np.zeros(len(records), dtype=np.int64)
            if len(records):
                col[0] = stats[key]
            table = table.append_column(f"st_{key}", pa.array(col))
        return table


def _mix64(x: np.ndarray) -> np.ndarray:
    """A 64-bit finaliser (splitmix64's) over uint64 arrays, wrapping."""
    x = x ^ (x >> _U64(30))
    x = x * _U64(0xBF58476D1CE4E5B9)
    x = x ^ (x >> _U64(27))
    x = x * _U64(0x94D049BB133111EB)
    return x ^ (x >> _U64(31))


def _scope_code(scope: str) -> int:
    import hashlib

    return int.from_bytes(hashlib.blake2b(scope.encode("utf-8"), digest_size=8).digest(), "little")


def _dedup_keys(texts: list, langs: np.ndarray, dd: Mapping) -> dict:
    """Arrow columns: ``scope`` (the language, or "" with a global scope), the exact hash ``h0``/``h1``,
    and with near dedup the ``bands`` LSH bucket keys (list<uint64>: one per band, none for a record
    without shingles, which is never a near duplicate)."""
    import pyarrow as pa

    from . import dedup

    n = len(texts)
    scope = langs if dd["by_language"] else np.full(n, "", dtype=object)
    h = dedup.exact_hashes(texts, num_threads=1) if n else np.zeros((0, 2), np.uint64)
    out = {"scope": pa.array(scope.tolist(), type=pa.string()), "h0": pa.array(h[:, 0]), "h1": pa.array(h[:, 1])}
    if dd.get("near"):
        bands, rows = dd["bands"], dd["rows"]
        sig = dedup.minhash_signatures(texts, num_perm=dd["num_perm"], ngram=dd["ngram"], seed=dd["seed"],
                                       num_threads=1) if n else np.zeros((0, dd["num_perm"]), np.uint32)
        has = ~np.all(sig == np.iinfo(np.uint32).max, axis=1)
        codes = np.array([_scope_code(x) for x in scope.tolist()], dtype=np.uint64)
        keys = np.empty((n, bands), dtype=np.uint64)
        with np.errstate(over="ignore"):
            for b in range(bands):
                k = _mix64(codes ^ _mix64(np.full(n, b + 1, dtype=np.uint64)))
                for r in range(rows):
                    k = _mix64(k ^ (sig[:, b * rows + r].astype(np.uint64) * _U64(0x9E3779B97F4A7C15)))
                keys[:, b] = k
        keys = keys[has]
        offsets = np.zeros(n + 1, dtype=np.int64)
        np.cumsum(np.where(has, bands, 0), out=offsets[1:])
        out["bands"] = pa.LargeListArray.from_arrays(pa.array(offsets), pa.array(keys.reshape(-1)))
    return out


def _explode_bands(table):
    """One row per (record, band): key, scope, uid."""
    import pyarrow as pa

    col = table.column("bands").combine_chunks()
    offsets = np.asarray(col.offsets, dtype=np.int64)
    counts = np.diff(offsets)
    take = np.repeat(np.arange(table.num_rows), counts)
    return pa.table({"key": col.values.slice(int(offsets[0]), int(offsets[-1] - offsets[0])),
                     "scope": table.column("scope").take(pa.array(take)),
                     "uid": table.column("uid").take(pa.array(take))})


def _bucket_pairs(key: np.ndarray, scope: np.ndarray, uid: np.ndarray) -> np.ndarray:
    """(m, 2) int64 candidate pairs of the multi-member LSH buckets, by the pairing rule of mlmix.dedup:
    in each bucket (members in uid order) all pairs up to 128 members, else each member with the first
    and with its predecessor. A bucket is (key, scope): a 64-bit key collision never joins two scopes."""
    order = np.lexsort((uid, scope, key))
    key, scope, uid = key[order], scope[order], uid[order]
    new = np.ones(len(key), dtype=bool)
    new[1:] = (key[1:] != key[:-1]) | (scope[1:] != scope[:-1])
    starts = np.flatnonzero(new)
    stops = np.append(starts[1:], len(key))
    first, second = [], []
    for lo, hi in zip(starts.tolist(), stops.tolist()):
        members = np.unique(uid[lo:hi])
        n = len(members)
        if n < 2:
            continue
        if n <= _MAX_BUCKET_ALL_PAIRS:
            a, b = np.triu_indices(n, 1)
            first.append(members[a])
            second.append(members[b])
        else:
            first += [np.full(n - 1, members[0]), members[1:-1]]
            second += [members[1:], members[2:]]
    if not first:
        return np.zeros((0, 2), np.int64)
    return np.stack([np.concatenate(first), np.concatenate(second)], axis=1)


def _shingle_sets(batch: dict, wanted: np.ndarray, dd: Mapping):
    """Shingle sets (sorted unique uint64, what mlmix.dedup verifies) of the records whose uid is in the
    sorted array ``wanted``, as an Arrow table (uid, shingles)."""
    import pyarrow as pa

    from . import dedup

    pos = np.searchsorted(wanted, batch["uid"])
    hit = (pos < len(wanted)) & (wanted[np.minimum(pos, len(wanted) - 1)] == batch["uid"])
    uids = np.asarray(batch["uid"][hit], dtype=np.int64)
    sets = dedup.shingle_sets([readers.record_text(json.loads(rec)) for rec in batch["rec"][hit].tolist()],
                              ngram=dd["ngram"], seed=dd["seed"], num_threads=1)  # one Ray task, one CPU
    return pa.table({"uid": pa.array(uids),
                     "shingles": pa.LargeListArray.from_arrays(pa.array(sets.offsets), pa.array(sets.values))})


def _jaccard(x: np.ndarray, y: np.ndarray) -> float:
    common = np.intersect1d(x, y, assume_unique=True).size
    union = x.size + y.size - common
    return 0.0 if union == 0 else common / union


class _DisjointSets:
    """Union-find over uids, uniting toward the smaller uid (the kept "first" document)."""

    def __init__(self) -> None:
        self.parent: dict[int, int] = {}

    def find(self, x: int) -> int:
        p = self.parent
        while p.get(x, x) != x:
            p[x] = p.get(p[x], p[x])
            x = p[x]
        return x

    def unite(self, a: int, b: int) -> None:
        a, b = self.find(a), self.find(b)
        if a != b:
            self.parent[max(a, b)] = min(a, b)


# ---- stages (driver side) ----------------------------------------------------------------------
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


def _exact_removed(ds, partitions: int) -> tuple[np.ndarray, list]:
    """uids (sorted) and languages of the records whose (scope, exact hash) an earlier record has."""
    keys = ["scope", "h0", "h1"]
    multi = _multi_keys(ds, keys, partitions)
    rows = _rows_with_keys(ds, multi, keys + ["uid", "lang"])
    if not len(rows["uid"]):
        return np.zeros(0, np.int64), []
    order = np.lexsort((rows["uid"], rows["h1"], rows["h0"], rows["scope"]))
    r = {k: v[order] for k, v in rows.items()}
    first = np.ones(len(order), dtype=bool)
    first[1:] = (r["scope"][1:] != r["scope"][:-1]) | (r["h0"][1:] != r["h0"][:-1]) | (r["h1"][1:] != r["h1"][:-1])
    gone = np.argsort(r["uid"][~first], kind="stable")
    return r["uid"][~first][gone].astype(np.int64), r["lang"][~first][gone].tolist()


def _near_removed(ds, dd: Mapping, partitions: int) -> tuple[np.ndarray, list, dict]:
    """uids (sorted) and languages of the near duplicates: LSH buckets by groupby, candidate pairs verified
    by exact Jaccard of shingle sets, clusters by union-find; the smallest uid of each cluster is kept."""
    banded = ds.select_columns(["uid", "scope", "bands"]).map_batches(_explode_bands, batch_format="pyarrow",
                                                                      batch_size=_BATCH).materialize()
    multi = _multi_keys(banded, ["key"], partitions)
    members = _rows_with_keys(banded, multi, ["key", "scope", "uid"])
    pairs = _bucket_pairs(members["key"].astype(np.uint64), members["scope"].astype(object),
                          members["uid"].astype(np.int64))
    cand = np.unique(pairs, axis=0) if len(pairs) else pairs
    info = {"bands": dd["bands"], "rows": dd["rows"], "candidate_pairs": len(cand)}
    if not len(cand):
        return np.zeros(0, np.int64), [], info
    wanted = np.unique(cand)
    sets_ds = ds.select_columns(["uid", "rec"]).map_batches(_shingle_sets, batch_size=_BATCH, batch_format="numpy",
                                                            fn_kwargs={"wanted": wanted, "dd": dd})
    sets: dict[int, np.ndarray] = {}
    for table in sets_ds.iter_batches(batch_format="pyarrow", batch_size=None):
        col = table.column("shingles").combine_chunks()
        values, offsets = np.asarray(col.values, dtype=np.uint64), np.asarray(col.offsets, dtype=np.int64)
        for k, uid in enumerate(table.column("uid").to_pylist()):
            sets[uid] = values[offsets[k]:offsets[k + 1]]
    uf = _DisjointSets()
    verified = 0
    for x, y in cand.tolist():
        if _jaccard(sets[x], sets[y]) >= dd["threshold"]:
            uf.unite(x, y)
            verified += 1
    info["verified_pairs"] = verified
    removed = np.array(sorted(u for u in wanted.tolist() if uf.find(u) != u), dtype=np.int64)
    got = _rows_with_keys(ds, {"uid": removed}, ["uid", "lang"])  # the removed records' languages
    lang = dict(zip(got["uid"].tolist(), got["lang"].tolist()))
    return removed, [lang[u] for u in removed.tolist()], info


def _lang_totals(kept, partitions: int) -> tuple[dict[str, int], dict[str, int]]:
    """Records and tokens per language of ``kept`` (``groupby(lang)`` aggregates), sorted by language."""
    from ray.data.aggregate import Count, Sum

    if kept.count() == 0:
        return {}, {}
    got = _collect(kept.groupby("lang", num_partitions=partitions).aggregate(Count(), Sum("ntok")),
                   ["lang", "count()", "sum(ntok)"])
    order = sorted(range(len(got["lang"])), key=lambda i: got["lang"][i])
    return ({got["lang"][i]: int(got["count()"][i]) for i in order},
            {got["lang"][i]: int(got["sum(ntok)"][i]) for i in order})


def _pool(size: int):
    """An actor pool of 1..size actors (Ray Data grows it while there is work and CPUs)."""
    import ray.data

    return ray.data.ActorPoolStrategy(min_size=1, max_size=size)


def _drop(ds, uids: np.ndarray):
    """ds without the rows whose uid is in ``uids`` (broadcast to the workers)."""
    if not len(uids):
        return ds

    def keep(table, gone: np.ndarray):
        import pyarrow as pa
        import pyarrow.compute as pc

        return table.filter(pc.invert(pc.is_in(table.column("uid"), value_set=pa.array(gone))))

    return ds.map_batches(keep, batch_size=_BATCH, batch_format="pyarrow", fn_kwargs={"gone": uids})


def _alive_rows(table):
    """The records that survived langid and the tokenizer's truncation policy (empty = dropped)."""
    import pyarrow.compute as pc

    return table.filter(pc.and_(table.column("alive"), pc.greater(table.column("ntok"), 0)))


def _scan(ds) -> dict:
    """Counts over the tokenized dataset in one pass (small columns only, plus the loss masks)."""
    out: dict[str, Any] = {"per_source": Counter(), "given": Counter(), "kinds": Counter(), "langs": Counter(),
                           "records": 0, "todo": 0, "identified": 0, "alive": 0, "examples": 0, "tokens": 0,
                           "loss_tokens": 0, "encoder": Counter(), "lang_tokens": Counter()}
    cols = ["uid", "given", "text_kind", "lang", "todo", "identified", "alive", "ntok", "mask",
            "st_truncated", "st_dropped_too_long", "st_tokens_removed"]
    for t in ds.select_columns(cols).iter_batches(batch_format="pyarrow", batch_size=None):
        c = {k: t.column(k).to_numpy() for k in cols if k != "mask"}
        out["records"] += t.num_rows
        out["per_source"].update((c["uid"] >> _UID_SHIFT).tolist())
        out["given"].update(g or "?" for g in c["given"].tolist())
        out["kinds"].update("text" if k else "chat" for k in c["text_kind"].tolist())
        out["langs"].update(c["lang"].tolist())
        for lang, n in zip(c["lang"].tolist(), c["ntok"].tolist()):
            out["lang_tokens"][lang] += n
        out["todo"] += int(c["todo"].sum())
        out["identified"] += int(c["identified"].sum())
        out["alive"] += int(c["alive"].sum())
        out["examples"] += int((c["ntok"] > 0).sum())
        out["tokens"] += int(c["ntok"].sum())
        mask = t.column("mask").combine_chunks()
        out["loss_tokens"] += int(np.asarray(mask.flatten(), dtype=np.uint8).sum(dtype=np.int64))
        for key in ("truncated", "dropped_too_long", "tokens_removed"):
            out["encoder"][key] += int(c["st_" + key].sum())
    out["encoder"] = {k: int(out["encoder"][k]) for k in ("truncated", "dropped_too_long", "tokens_removed")}
    return out


def _mix(cfg: dict, kept, lang_tokens: Mapping[str, int], partitions: int, out: str) -> tuple[dict, dict]:
    """The mixture over the surviving records, as the single-machine engine computes it; returns the
    selected records (uid, lang, ntok; in uid order) and the stage statistics.

    Recipe ``all`` selects every surviving record (their uid, language and length come to the driver). The other recipes run on the
    driver over counts only (:class:`mlmix.recipes.GroupedCorpus`): sources are grouped by source id on the
    cluster (``groupby(sid).aggregate(Count, Unique(lang))``), each block counts its sources per language
    set, and once the recipe has its exact per-group quotas, each block keeps the bottom-k of every group
    by the recipe's seeded key (a StratifiedReservoir for integer ids) and the driver merges them exactly:
    only k ids per group and block travel. The selected records are then picked out on the workers.
    """
    mcfg = cfg["mixture"]
    params = pipeline._recipe_params(mcfg)
    if mcfg["recipe"] == "all":
        if params:
            raise ValueError(f"mixture: recipe 'all' takes no parameters, got {sorted(params)}")
        got = _collect(kept, ["uid", "lang", "ntok"])
        order = np.argsort(got["uid"], kind="stable")
        sel = {"uid": got["uid"][order].astype(np.int64), "lang": got["lang"][order].tolist(),
               "ntok": got["ntok"][order].astype(np.int64)}
        target = None
    else:
        from . import recipes

        sources = _source_langs(kept, partitions)
        summary = _group_summary(sources)
        if summary["dups"]:
            _raise_duplicate(kept, summary["dups"])
        if summary["bad"]:
            raise ValueError(f"mixture: source id {summary['bad'][0]!r} is neither an int nor a string; recipes need "
                             "int or str source ids (set the sources' id_field), or use recipe 'all'")
        if summary["big"]:
            raise ValueError(f"mixture: source id {summary['big'][0]!r} is not in [-2**63, 2**63); the Ray engine's "
                             "mixture needs 64-bit signed integer (or string) ids")
        tokens = dict(lang_tokens)
        groups = {g: c[0] for g, c in summary["groups"].items()}

        def prefixes(active: list, quotas: dict, seed: int) -> dict:
            return _group_prefixes(sources, summary["groups"], active, quotas, seed)

        corpus = recipes.GroupedCorpus(groups, tokens, prefixes)
        recipe = getattr(recipes, mcfg["recipe"])
        try:
            mixture = recipe(corpus, seed=mcfg["seed"], **params)
        except TypeError as exc:
            raise ValueError(f"mixture: bad parameters for recipe {mcfg['recipe']!r}: {exc}") from exc
        sel = _selected_rows(kept, mixture.rows)
        mixture.save(os.path.join(out, "mixture.json"))
        target = {str(k): int(v) for k, v in mixture.targets.items()}
    stats = {"recipe": mcfg["recipe"], "params": params, "seed": mcfg["seed"], "examples": len(sel["uid"]),
             "langs": pipeline._by_lang(sel["lang"]), "target": dict(target) if target else None}
    return sel, stats


def _source_langs(kept, partitions: int):
    """One row per source id: ``sid``, ``count()`` (its records) and ``unique(lang)`` (its languages)."""
    from ray.data.aggregate import Count, Unique

    return kept.select_columns(["sid", "lang"]).groupby("sid", num_partitions=partitions).aggregate(
        Count(), Unique("lang")).materialize()


def _is_int_id(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _summarize_sources(table):
    """A block's sources counted per language set: one row holding a pickled dict."""
    import pickle

    import pyarrow as pa

    groups: dict[tuple, list[int]] = {}
    dups, bad, big = [], [], []
    for sid, count, langs in zip(table.column("sid").to_pylist(), table.column("count()").to_pylist(),
                                 table.column("unique(lang)").to_pylist()):
        key = tuple(sorted(langs))
        if count != len(key):
            dups.append(sid)
        x = json.loads(sid)
        is_int = _is_int_id(x)
        if not is_int and not isinstance(x, str):
            bad.append(x)
        elif is_int and not -(1 << 63) <= x < (1 << 63):
            big.append(x)
        c = groups.setdefault(key, [0, 0])
        c[0] += 1
        c[1] += is_int
    return pa.table({"part": [pickle.dumps({"groups": groups, "dups": dups, "bad": bad, "big": big})]})


def _group_summary(sources) -> dict:
    """``groups``: {language set (sorted tuple): [sources, of which integer ids]}; ``dups``: source ids
    with a language twice; ``bad``/``big``: ids that are not int/str, or ints outside int64."""
    parts = sources.map_batches(_summarize_sources, batch_format="pyarrow", batch_size=None)
    return _merge_summaries(parts.iter_batches(batch_format="pyarrow", batch_size=None))


def _merge_summaries(tables) -> dict:
    import pickle

    out: dict = {"groups": {}, "dups": [], "bad": [], "big": []}
    groups: dict[tuple, list[int]] = {}
    for t in tables:
        for raw in t.column("part").to_pylist():
            p = pickle.loads(raw)
            for key, (n, n_int) in p["groups"].items():
                c = groups.setdefault(key, [0, 0])
                c[0] += n
                c[1] += n_int
            for k in ("dups", "bad", "big"):
                out[k] += p[k]
    out["groups"] = groups
    return out


def _raise_duplicate(kept, dup_sids: list) -> None:
    """The error of the single-machine engine for the first (in uid order) record whose (source id,
    language) an earlier record has."""
    rows = _rows_with_keys(kept, {"sid": np.array(sorted(dup_sids), dtype=object)}, ["uid", "sid", "lang"])
    order = np.argsort(rows["uid"], kind="stable")
    first: dict = {}
    for uid, sid, lang in zip(rows["uid"][order].tolist(), rows["sid"][order].tolist(), rows["lang"][order].tolist()):
        if (sid, lang) in first:
            raise ValueError(
                f"mixture: source id {json.loads(sid)!r} appears twice in language {lang!r} (records "
                f"{_uid_str(first[(sid, lang)])} and {_uid_str(uid)}); recipes need one example per "
                "(source id, language): set the sources' id_field to an id shared only by translations, "
                "or use recipe 'all'")
        first[(sid, lang)] = uid
    raise RuntimeError("mixture: a duplicate (source id, language) was counted but not found (a lost block?)")


def _group_prefixes(sources, summary_groups: dict, active: list, quotas: dict, seed: int) -> dict:
    """The first ``quotas[g]`` sources of each availability group ``g`` in the recipe's seeded order:
    per-block bottom-k reservoirs (``map_batches``), merged exactly on the driver."""
    plan = _prefix_plan(summary_groups, active, quotas, seed)
    parts = sources.map_batches(_block_reservoirs, batch_format="pyarrow", batch_size=None, fn_kwargs={"plan": plan})
    return _merge_prefixes(parts.iter_batches(batch_format="pyarrow", batch_size=None), plan, list(quotas))


def _prefix_plan(summary_groups: dict, active: list, quotas: dict, seed: int) -> dict:
    """What each block needs: the active languages, the groups (in ``quotas`` order) with their quotas,
    and whether each group's ids are all integers (then the recipe orders it by reservoir keys)."""
    act = frozenset(active)
    n_int: Counter = Counter()
    n_all: Counter = Counter()
    for key, (n, k_int) in summary_groups.items():
        g = frozenset(key) & act
        n_all[g] += n
        n_int[g] += k_int
    return {"active": sorted(act), "groups": [sorted(g) for g in quotas], "quotas": list(quotas.values()),
            "integer": [n_int[g] == n_all[g] for g in quotas], "seed": seed}


def _merge_prefixes(tables, plan: dict, order: list) -> dict:
    """Merge the blocks' reservoirs (tables of group, part) into each group's ordered prefix."""
    import pickle

    from . import recipes

    merged: dict[int, Any] = {}
    for t in tables:
        for gi, raw in zip(t.column("group").to_pylist(), t.column("part").to_pylist()):
            merged[gi] = _merge_reservoir(merged.get(gi), pickle.loads(raw), plan, gi)
    out = {}
    for gi, g in enumerate(order):
        part = merged.get(gi)
        if part is None:
            out[g] = []
        elif plan["integer"][gi]:
            out[g] = part.result()[recipes.ASSIGN_STRATUM].tolist()
        else:
            out[g] = list(part)
    return out


def _block_reservoirs(table, plan: dict):
    """Each availability group's bottom-k sources of a block, by the recipe's seeded key: one row per
    group (index, pickled reservoir or id list)."""
    import pickle

    import pyarrow as pa

    ids_of = _group_ids(table, plan)
    out_g, out_p = [], []
    for gi, ids in ids_of.items():
        out_g.append(gi)
        out_p.append(pickle.dumps(_reservoir(ids, plan, gi)))
    return pa.table({"group": pa.array(out_g, type=pa.int64()), "part": pa.array(out_p, type=pa.binary())})


def _group_ids(table, plan: dict) -> dict[int, list]:
    """{group index: the block's source ids in that group} for the groups with a quota."""
    act = frozenset(plan["active"])
    index = {frozenset(g): gi for gi, g in enumerate(plan["groups"])}
    ids_of: dict[int, list] = {}
    for sid, langs in zip(table.column("sid").to_pylist(), table.column("unique(lang)").to_pylist()):
        gi = index.get(frozenset(langs) & act)
        if gi is not None:
            ids_of.setdefault(gi, []).append(json.loads(sid))
    return ids_of


def _reservoir(ids: list, plan: dict, gi: int):
    """The bottom-k of ``ids``: a StratifiedReservoir (integer groups) or a sorted list of ids."""
    import heapq

    from . import recipes
    from .sample import StratifiedReservoir

    k, seed = plan["quotas"][gi], plan["seed"]
    if plan["integer"][gi]:
        r = StratifiedReservoir({recipes.ASSIGN_STRATUM: k}, seed=seed)
        r.add(np.full(len(ids), recipes.ASSIGN_STRATUM, dtype=np.uint64), np.array(ids, dtype=np.int64))
        return r
    return heapq.nsmallest(k, ids, key=lambda x: recipes.assign_order_key(seed, x))


def _merge_reservoir(acc, part, plan: dict, gi: int):
    """Exact merge of two bottom-k samples of a group (either may be None)."""
    import heapq

    from . import recipes

    if acc is None:
        return part
    if plan["integer"][gi]:
        return acc.merge(part)
    seed = plan["seed"]
    return heapq.nsmallest(plan["quotas"][gi], acc + part, key=lambda x: recipes.assign_order_key(seed, x))


def _selected_rows(kept, pairs: list) -> dict:
    """uid, lang, ntok of the records the mixture selected (its (source id, lang) pairs), in uid order."""
    if not pairs:
        return {"uid": np.zeros(0, np.int64), "lang": [], "ntok": np.zeros(0, np.int64)}
    wanted = {"sid": np.array([json.dumps(sid) for sid, _ in pairs], dtype=object),
              "lang": np.array([lang for _, lang in pairs], dtype=object)}
    got = _rows_with_keys(kept, wanted, ["uid", "lang", "ntok"])
    if len(got["uid"]) != len(pairs):
        raise RuntimeError(f"mixture: {len(pairs)} rows were selected but {len(got['uid'])} records found")
    order = np.argsort(got["uid"], kind="stable")
    return {"uid": got["uid"][order].astype(np.int64), "lang": got["lang"][order].tolist(),
            "ntok": got["ntok"][order].astype(np.int64)}


def _uid_str(uid: int) -> str:
    return f"{int(uid) >> _UID_SHIFT}:{int(uid) & ((1 << _UID_SHIFT) - 1)}"


# ---- the driver --------------------------------------------------------------------------------
def build_ray(config: str | os.PathLike | Mapping, *, address: str | None = None, num_cpus: int | None = None,
              concurrency: int | None = None, quiet: bool = False, verbose: bool = False,
              progress: bool | None = None, _fault_marker: str | None = None) -> dict:
    """Run the pipeline a config describes on Ray Data; the output equals :func:`mlmix.build`'s.

    Args:
        config: a config path or dict, as for :func:`mlmix.build` (docs/config.md).
        address: the Ray cluster (``host:port``, ``ray://host:port``, ``auto``); None uses
            ``RAY_ADDRESS``, else starts a local cluster of ``num_cpus`` CPUs (default: all cores).
        concurrency: actors per class-based stage (langid, tokenize, shingle sets); default: the cluster's
            CPU count.
        quiet, verbose, progress: logging on stderr, as for :func:`mlmix.build`.

    Returns:
        The summary dict of :func:`mlmix.build` (also written to ``OUTPUT/build.json``) with
        ``engine = "ray"``. The stage cache of the single-machine engine is not used.

    Raises:
        ImportError: Ray is not installed (``pip install 'mlmix[ray]'``).
        RayEngineError: the cluster cannot be reached.
        ValueError: a bad config or argument (before anything runs).
    """
    cfg = load_config(config)
    config_dir = None if isinstance(config, Mapping) else os.path.dirname(os.path.abspath(os.fspath(config)))
    check_build_targets(cfg["output"], cfg["cache_dir"], cfg["sources"], config_dir)
    ray = require("ray", "the Ray engine")
    if concurrency is not None and (isinstance(concurrency, bool) or not isinstance(concurrency, int)
                                    or concurrency < 1):
        raise ValueError(f"concurrency must be an integer >= 1 (or None), got {concurrency!r}")
    log = pipeline.BuildLog(quiet=quiet, verbose=verbose, progress=progress)
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
        return _run(cfg, log, concurrency, _fault_marker)
    finally:
        if started:
            ray.shutdown()


def _run(cfg: dict, log, concurrency: int, fault_marker: str | None) -> dict:
    ray = require("ray", "the Ray engine")
    t_start = time.perf_counter()
    timings: dict = {}
    stats: dict = {}
    # A worker process that dies is retried by Ray Data's defaults: tasks are resubmitted, and actor pools
    # restart a dead actor and resubmit its batches (max_restarts = max_task_retries = -1); an exception
    # raised by our own code is not retried (it would fail again) and stops the build.

    def done(name: str, t0: float, line: str) -> None:
        timings[name] = {"seconds": time.perf_counter() - t0, "cached": False}
        log.stage(name, line, timings[name]["seconds"], False)

    dcfg = cfg["dedup"]
    dd = None
    if dcfg["exact"] or dcfg["near"]:
        from . import dedup

        bands, band_rows = dedup.lsh_params(dcfg["threshold"], dcfg["num_perm"], verify=True)
        dd = {"by_language": dcfg["scope"] == "language", "near": dcfg["near"], "threshold": float(dcfg["threshold"]),
              "num_perm": dcfg["num_perm"], "ngram": dcfg["ngram"], "seed": cfg["seed"], "bands": bands,
              "rows": band_rows}

    # read: one task per source. Materialised before the actor pool starts, so that the pool's actors
    # never hold every CPU while read tasks wait for one.
    t0 = time.perf_counter()
    sources = cfg["sources"]
    ds = ray.data.from_items([{"src": i} for i in range(len(sources))], override_num_blocks=len(sources))
    ds = ds.flat_map(_read_source, fn_kwargs={"sources": sources}).materialize()
    # langid + tokenize: an actor pool (the langid model and the tokenizer are loaded once per actor)
    ds = ds.map_batches(_Prepare, batch_size=_BATCH, batch_format="pyarrow", compute=_pool(concurrency),
                        fn_constructor_kwargs={"lcfg": cfg["langid"], "tcfg": cfg["tokenizer"], "dedup": dd,
                                               "fault_marker": fault_marker}).materialize()
    scan = _scan(ds)
    for i, src in enumerate(sources):
        if scan["per_source"].get(i, 0) == 0:
            raise ValueError(f"sources[{i}] ({src.get('name') or src['path']}): no records were read")
    n_records = scan["records"]
    stats["read"] = {"records": n_records,
                     "sources": [{"source": s.get("name") or s["path"], "records": int(scan["per_source"][i])}
                                 for i, s in enumerate(sources)],
                     "langs": dict(sorted(scan["given"].items())), "kinds": dict(scan["kinds"])}
    stats["langid"] = {"identified": scan["identified"], "given": n_records - scan["todo"],
                       "unknown": scan["langs"].get(cfg["langid"]["unknown"], 0),
                       "dropped": n_records - scan["alive"], "langs": dict(sorted(scan["langs"].items()))}
    from .tokenize import vocab_fingerprint

    tokenizer = pipeline.load_tokenizer(cfg["tokenizer"])
    n_tokens = scan["tokens"]
    stats["tokenize"] = {"examples": scan["examples"], "tokens": n_tokens, "loss_tokens": scan["loss_tokens"],
                         "pad_id": pipeline._pad_id(tokenizer), "vocab": vocab_fingerprint(tokenizer),
                         **scan["encoder"]}
    done("tokenize", t0, f"{n_records:,} records, {n_tokens:,} tokens")

    # dedup
    t0 = time.perf_counter()
    partitions = 2 * concurrency  # shuffle partitions of the groupby stages
    # the surviving records' small columns (the texts stay on the workers)
    alive = ds.drop_columns(["tokens", "mask"]).map_batches(_alive_rows, batch_size=_BATCH,
                                                             batch_format="pyarrow").materialize()
    exact_removed: Counter = Counter()
    near_removed: Counter = Counter()
    info: dict = {}
    if dcfg["exact"] or dcfg["near"]:
        gone, gone_langs = _exact_removed(alive, partitions)
        (exact_removed if dcfg["exact"] else near_removed).update(gone_langs)  # near merges exact dups too
        if dcfg["near"]:
            gone_near, gone_langs, info = _near_removed(_drop(alive, gone), dd, partitions)
            near_removed.update(gone_langs)
            gone = np.union1d(gone, gone_near)
    else:
        gone = np.zeros(0, np.int64)
    # the kept records' small columns stay on the cluster for the mixture
    kept = _drop(alive.select_columns(["uid", "sid", "lang", "ntok"]), gone).materialize()
    kept_langs, kept_tokens = _lang_totals(kept, partitions)
    n_kept = sum(kept_langs.values())
    stats["dedup"] = {"kept": n_kept, "exact_removed": dict(sorted(exact_removed.items())),
                      "near_removed": dict(sorted(near_removed.items())), "langs": kept_langs,
                      "lsh": info}
    done("dedup", t0, f"kept {n_kept:,}; removed {sum(exact_removed.values()):,} exact, "
                      f"{sum(near_removed.values()):,} near duplicates")

    out = cfg["output"]
    with atomic_directory(out, kind="build") as tmp:
        # mix
        t0 = time.perf_counter()
        sel, stats["mix"] = _mix(cfg, kept, kept_tokens, partitions, tmp)
        done("mix", t0, f"recipe {stats['mix']['recipe']}: {len(sel['uid']):,} examples")
        # pack: plan from the selected lengths; shards materialised by Ray tasks
        t0 = time.perf_counter()
        sel_uids, sel_langs, lengths = sel["uid"], sel["lang"], sel["ntok"]
        s_pack = _pack(cfg, ds, sel_uids, lengths, sel_langs, stats["tokenize"]["pad_id"], os.path.join(tmp, "store"),
                       stats["tokenize"]["vocab"])
        s_pack["seconds"] = time.perf_counter() - t0
        stats["pack"] = s_pack
        stats["tokens_by_lang"] = {"read": dict(sorted(scan["lang_tokens"].items())),
                                   "dedup": kept_tokens,
                                   "mix": pipeline._by_lang(sel_langs, lengths)}
        stats["lengths"] = pipeline._length_summary(lengths, sel_langs) if len(lengths) else {}
        np.save(os.path.join(tmp, "lengths.npy"), lengths.astype(np.int32))
        pipeline._write_json(os.path.join(tmp, "langs.json"), sel_langs)
        if "name" not in cfg["tokenizer"]:  # as the single-machine engine: a bundled tokenizer is named, not copied
            pipeline.save_tokenizer(tokenizer, os.path.join(tmp, "tokenizer.json"))
        timings["pack"] = {"seconds": s_pack["seconds"], "cached": False}
        summary = {"format": pipeline.BUILD_FORMAT, "engine": "ray", "config": cfg, "stages": stats, "output": out,
                   "store": os.path.join(out, "store"), "examples": s_pack["examples"], "tokens": s_pack["tokens"],
                   "sequences": s_pack["sequences"], "efficiency": s_pack["efficiency"],
                   "langs": stats["mix"]["langs"]}
        pipeline._write_json(os.path.join(tmp, "build.json"), summary)
        if cfg["report"]:
            from .report import write_report

            write_report(tmp, os.path.join(tmp, "report.html"))
        seal(tmp, "build", engine="ray")
        # before the rename, as the single-machine engine: an output killed right after it keeps no 0700/0600 modes
        pipeline._relax_modes(tmp)
        log.stage("pack", _pack_line(s_pack), s_pack["seconds"], False)
    summary = dict(summary, timings=timings, seconds=time.perf_counter() - t_start)
    return summary


def _pack_line(s: Mapping) -> str:
    """The pack summary: the single-machine engine's line, with the rate of the shard tasks' own work.

    The stage's wall time (shown after the line) is mostly Ray's fixed cost per Dataset execution (the
    tagging map, the shuffle by shard, starting the tasks): a few seconds whatever the size, so tokens over
    it is no packing rate (a 4k-token build read ~1k tok/s). The rate given is over the seconds spent inside
    the shard tasks, summed: what one worker core writes, comparable to the single-machine rate.
    """
    line = pipeline._pack_line({k: v for k, v in s.items() if k != "seconds"})  # without its wall-time rate
    n = s.get("shards", 1)
    tasks = f"{n:,} shard task" + ("s" if n != 1 else "")
    if "task_seconds" not in s:
        return line
    sec = s["task_seconds"]
    spent = f"{sec:.1f}s" if sec >= 1 else f"{sec * 1000:.1f} ms"
    return line + f"; written by {tasks} in {spent} of task time" + pipeline._rate(s["tokens"], sec, "tok")


def _pack(cfg: dict, ds, sel_uids: np.ndarray, lengths: np.ndarray, sel_langs: list, pad_id: int,
          out_store: str, vocab: dict) -> dict:
    """The packed store of the selected examples, written as shards by Ray tasks and indexed on the driver.

    The plan is made on the driver from the selected lengths alone (the planner is global: its seed
    permutes all examples before best-fit), with the shard bounds of :func:`mlmix.write_store`. Each
    selected record's tokens and mask are tagged with the shard(s) its segments land in and shuffled by
    shard (``groupby(shard).map_groups``): one task per shard gathers its rows and writes its files into
    ``out_store`` (a directory the workers share). The driver writes the index arrays and the manifest.
    The bytes equal those of ``write_store`` over the same examples in uid order.
    """
    from . import store
    from .pack import pack

    ray = require("ray", "the Ray engine")
    pcfg = cfg["pack"]
    seq_len, strategy, policy = pcfg["seq_len"], pcfg["strategy"], pcfg["overlong"]
    if len(sel_uids) == 0:
        raise ValueError("pack: no examples are left to pack (check the mixture and dedup statistics)")
    n_over = int((lengths > seq_len).sum())
    if strategy == "bfd_split":
        policy = "split"
    elif n_over and policy == "error" and strategy != "wrapped":
        raise ValueError(
            f"{n_over} example(s) are longer than pack.seq_len = {seq_len} (longest {int(lengths.max())} tokens); "
            "set pack.overlong to 'truncate', 'split' or 'drop', or raise pack.seq_len")
    plan = pack(lengths, seq_len, strategy=strategy, overlong=policy, seed=cfg["seed"])
    # pack.shard_sequences (pipeline._stage_pack passes the same to write_store)
    shard_sequences = store._check_shard_sequences(pcfg.get("shard_sequences"), seq_len)
    bounds = np.asarray(store.shard_bounds(plan.num_sequences, shard_sequences), dtype=np.int64)
    num_shards = len(bounds) - 1
    # (example, shard) pairs: the shards of each example's segments (one, unless split across a boundary)
    seg_row = np.repeat(np.arange(plan.num_sequences, dtype=np.int64), np.diff(plan.row_offsets))
    seg_shard = np.searchsorted(bounds, seg_row, side="right") - 1
    pair = np.unique(plan.seg_example * num_shards + seg_shard)
    os.makedirs(out_store, exist_ok=True)
    refs = ray.put({"uids": sel_uids, "pair_ex": pair // num_shards, "pair_shard": pair % num_shards})
    plan_ref = ray.put(plan)
    tagged = ds.select_columns(["uid", "tokens", "mask"]).map_batches(
        _tag_shards, batch_size=_BATCH, batch_format="pyarrow", fn_kwargs={"refs": refs})
    written = tagged.groupby("shard", num_partitions=max(1, min(num_shards, 64))).map_groups(
        _write_shard_group, batch_format="pyarrow",
        fn_kwargs={"plan_ref": plan_ref, "bounds": bounds, "directory": out_store})
    specs: dict[int, dict] = {}
    task_seconds = 0.0
    for t in written.iter_batches(batch_format="pyarrow", batch_size=None):
        for k, spec, sec in zip(t.column("shard").to_pylist(), t.column("specs").to_pylist(),
                                t.column("seconds").to_pylist()):
            specs[int(k)] = json.loads(spec)
            task_seconds += sec
    if sorted(specs) != list(range(num_shards)):
        raise RuntimeError(f"pack: shards {sorted(set(range(num_shards)) - set(specs))} were not written (a lost block?)")
    manifest = store.write_index(out_store, plan, [specs[k] for k in range(num_shards)], strategy=strategy,
                                 langs=sel_langs, pad_id=pad_id, seed=cfg["seed"], shard_sequences=shard_sequences,
                                 tokenizer=vocab)
    counts = manifest["counts"]
    return {"sequences": manifest["num_sequences"], "seq_len": seq_len, "strategy": strategy, "overlong_policy": policy,
            "examples": manifest["num_examples"], "tokens": manifest["num_tokens"], "efficiency": manifest["efficiency"],
            "lower_bound_sequences": manifest["lower_bound_sequences"], "overlong": n_over,
            "truncated": counts["truncated"], "split": counts["split"], "dropped": counts["dropped"],
            "tokens_dropped": counts["tokens_dropped"], "shards": num_shards, "task_seconds": task_seconds}


def _tag_shards(table, refs):
    """The selected records of a block, one row per (record, shard it lands in): shard, example index
    (position in uid order), tokens, mask."""
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

    from . import store

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
    sub = plan.rows(int(bounds[k]), int(bounds[k + 1]))
    sub.seg_example = np.searchsorted(ex, sub.seg_example)  # the shard's examples, renumbered
    specs = store.write_shard(directory, k, len(bounds) - 1, sub, values, offsets - offsets[0], mvals)
    return pa.table({"shard": pa.array([k], type=pa.int64()), "specs": pa.array([json.dumps(specs)]),
                     "seconds": pa.array([time.perf_counter() - t0], type=pa.float64())})
