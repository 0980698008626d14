"""Stage ``dedup``: exact then near duplicates, within each language by default; the first seen (the
smallest uid) of each cluster is kept.

Per block of records (:func:`keys`): each document's 128-bit exact hash, its scope code (a hash of its
language, or 0 with a global scope), and with near dedup its MinHash signature's LSH band keys (one
64-bit key per band, a function of the signature, the band and the scope only, so keys computed in
different blocks or processes meet). Then over the whole corpus, the phases of :mod:`mlmix.dedup`:

1. exact: all but the smallest uid of each (scope, hash) are removed (:func:`exact_removed`);
2. near, over the survivors: the band keys shared by several documents are buckets, paired by the rule
   of :func:`mlmix.dedup.bucket_pairs`; the candidate pairs are verified by the exact Jaccard similarity
   of their shingle sets (computed again, for the candidates only); the verified pairs are joined into
   clusters, each represented by its smallest uid (:func:`near_removed`).

The local executor holds the keys of all documents (16 B + 8 B per band each) and groups them in one
process; the Ray executor groups them with shuffles and brings only the shared keys' members to the
driver. Both call the same functions on what they gathered.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from collections.abc import Callable, Mapping, Sequence

import numpy as np

from ...cache import stage_key
from ...ragged import Ragged
from ..log import rate

VERSION = 3


def key(k_lid: str, k_tok_if_truncating, dcfg: Mapping, seed) -> str:
    return stage_key("dedup", VERSION, k_lid, k_tok_if_truncating, dcfg, seed)


def params(cfg: Mapping) -> dict:
    """The settings every block needs, with the LSH bands and rows resolved."""
    from ... import dedup

    dcfg = cfg["dedup"]
    bands, rows = dedup.lsh_params(dcfg["threshold"], dcfg["num_perm"], verify=True)
    return {"by_language": dcfg["scope"] == "language", "exact": bool(dcfg["exact"]), "near": bool(dcfg["near"]),
            "threshold": float(dcfg["threshold"]), "num_perm": dcfg["num_perm"], "ngram": dcfg["ngram"],
            "seed": cfg["seed"], "bands": bands, "rows": rows}


def scope_code(scope: str) -> int:
    return int.from_bytes(hashlib.blake2b(scope.encode("utf-8"), digest_size=8).digest(), "little")


def keys(texts: Sequence[str] | Ragged, langs: Sequence[str], dd: Mapping, num_threads: int = 0) -> dict:
    """The keys of one block: ``h`` (n, 2) uint64 exact hashes, ``scope`` (n,) uint64 codes, and with near
    dedup ``bands`` (n, bands) uint64 LSH keys and ``has`` (n,) bool (False: no shingles, never a near
    duplicate). ``num_threads``: the kernels' threads (0: ``MLMIX_NUM_THREADS``, else the usable cores;
    the keys do not depend on it). ``texts``: str, or a block's text column (a uint8 Ragged of UTF-8)."""
    from ... import dedup

    n = len(texts)
    docs = texts if isinstance(texts, Ragged) else list(texts)
    if dd["by_language"]:  # one hash per distinct language
        codes = {lang: scope_code(lang) for lang in set(langs)}
        scope = np.fromiter((codes[lang] for lang in langs), dtype=np.uint64, count=n)
    else:
        scope = np.zeros(n, np.uint64)
    if not dd["near"]:
        return {"h": dedup.exact_hashes(docs, num_threads=num_threads) if n else np.zeros((0, 2), np.uint64),
                "scope": scope}
    # the exact hashes come from the MinHash pass: each text is normalised once
    if n:
        sig, h = dedup.minhash_signatures(docs, num_perm=dd["num_perm"], ngram=dd["ngram"], seed=dd["seed"],
                                          num_threads=num_threads, with_hashes=True)
    else:
        sig, h = np.zeros((0, dd["num_perm"]), np.uint32), np.zeros((0, 2), np.uint64)
    bands, has = dedup.band_keys(sig[:, :dd["bands"] * dd["rows"]], bands=dd["bands"], rows=dd["rows"],
                                 groups=scope, num_threads=num_threads)
    return {"h": h, "scope": scope, "bands": bands, "has": has}


def concat(parts: Sequence[Mapping], uids: np.ndarray) -> dict:
    """The blocks' keys end to end, with each document's uid."""
    out = {"uid": np.asarray(uids, dtype=np.int64)}
    for name in ("h", "scope", "bands", "has"):
        if parts and name in parts[0]:
            out[name] = np.concatenate([p[name] for p in parts])
    return out


def exact_removed(uid: np.ndarray, scope: np.ndarray, h: np.ndarray) -> np.ndarray:
    """uids (sorted) of the documents whose (scope, exact hash) a smaller uid has."""
    if not len(uid):
        return np.zeros(0, np.int64)
    order = np.lexsort((uid, h[:, 1], h[:, 0], scope))
    s, h0, h1 = scope[order], h[order, 0], h[order, 1]
    first = np.ones(len(order), dtype=bool)
    first[1:] = (s[1:] != s[:-1]) | (h0[1:] != h0[:-1]) | (h1[1:] != h1[:-1])
    return np.sort(uid[order][~first])


def candidate_pairs(band_keys: np.ndarray, uids: np.ndarray, scopes: np.ndarray) -> np.ndarray:
    """(m, 2) sorted unique uid pairs of the LSH buckets (rows of equal key and scope), by mlmix.dedup's
    pairing rule."""
    from ... import dedup

    return dedup.bucket_pairs(band_keys, uids, groups=scopes)


def near_removed(pairs: np.ndarray, uids: np.ndarray, sets, dd: Mapping) -> tuple[np.ndarray, int]:
    """(uids, sorted, of the documents a verified pair joins to a smaller uid's cluster; verified pairs).
    ``sets``: the shingle sets of the documents ``uids`` (every uid in ``pairs``)."""
    from ... import dedup

    _, ok = dedup.verify_pairs(pairs, threshold=dd["threshold"], shingle_sets=sets, docs=uids)
    rep = dedup.connected_components(uids, pairs[ok])
    return np.sort(uids[rep != uids]), int(ok.sum())


def shingle_sets(texts: Sequence[str] | Ragged, dd: Mapping, num_threads: int = 0):
    from ... import dedup

    docs = texts if isinstance(texts, Ragged) else list(texts)
    return dedup.shingle_sets(docs, ngram=dd["ngram"], seed=dd["seed"], num_threads=num_threads)


def flat_band_keys(blocks: Mapping, live: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(key, uid, scope) rows of the ``live`` documents that have band keys."""
    use = live & blocks["has"]
    b = blocks["bands"][use]
    return b.reshape(-1), np.repeat(blocks["uid"][use], b.shape[1]), np.repeat(blocks["scope"][use], b.shape[1])


def resolve(blocks: Mapping, langs: Sequence[str], dd: Mapping,
            shingles: Callable[[np.ndarray], tuple[np.ndarray, object]]) -> dict:
    """Everything after the per-block keys, over all of them in one process (the local executor).
    ``shingles(uids)`` -> (the uids in order, their shingle sets)."""
    uid = blocks["uid"]
    gone = exact_removed(uid, blocks["scope"], blocks["h"]) if dd["exact"] else np.zeros(0, np.int64)
    info: dict = {}
    gone_near = np.zeros(0, np.int64)
    if dd["near"]:
        live = ~np.isin(uid, gone)
        pairs = candidate_pairs(*flat_band_keys(blocks, live))
        info = {"bands": dd["bands"], "rows": dd["rows"], "candidate_pairs": int(len(pairs)), "verified_pairs": 0}
        if len(pairs):
            got, sets = shingles(np.unique(pairs))
            gone_near, info["verified_pairs"] = near_removed(pairs, got, sets, dd)
    return removal(uid, langs, gone, gone_near, info)


def removal(uid: np.ndarray, langs: Sequence[str], gone_exact: np.ndarray, gone_near: np.ndarray, info: Mapping) -> dict:
    """What the stage removed: uids and counts per language of each kind."""
    pos = {u: k for k, u in enumerate(uid.tolist())} if (len(gone_exact) or len(gone_near)) else {}
    return {"removed": np.union1d(gone_exact, gone_near).astype(np.int64),
            "exact_removed": Counter(langs[pos[u]] for u in gone_exact.tolist()),
            "near_removed": Counter(langs[pos[u]] for u in gone_near.tolist()), "lsh": dict(info)}


def nothing() -> dict:
    """The removal of a stage with exact and near dedup off."""
    return {"removed": np.zeros(0, np.int64), "exact_removed": Counter(), "near_removed": Counter(), "lsh": {}}


def finish(result: Mapping, kept_langs: Mapping[str, int]) -> dict:
    """The stage statistics, from what was removed and the kept records per language."""
    langs = {k: int(v) for k, v in sorted(kept_langs.items()) if v}
    return {"kept": sum(langs.values()), "exact_removed": dict(sorted(result["exact_removed"].items())),
            "near_removed": dict(sorted(result["near_removed"].items())), "langs": langs, "lsh": dict(result["lsh"])}


def summary(s: Mapping) -> str:
    ex, near = sum(s["exact_removed"].values()), sum(s["near_removed"].values())
    return f"kept {s['kept']:,}; removed {ex:,} exact, {near:,} near duplicates" + rate(
        s["kept"] + ex + near, s.get("seconds", 0), "doc")
