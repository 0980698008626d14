"""Exact and near-duplicate detection for text in any script.

Pipeline (multi-threaded C++ with the GIL released; documents are read in place, never encoded or
copied: a ``str``'s code units as Python stores them, ``bytes`` as UTF-8, a pyarrow string array
without nulls through its buffers):

1. **Normalisation**, in C++ from tables generated from Python's ``unicodedata`` (version
   :data:`UNICODE_VERSION`): format characters (Cf: soft hyphen, zero-width joiners, BOM) are
   dropped first, so that an invisible character never blocks composition or reordering; then
   NFKC, full case folding (exactly ``str.casefold``), NFKC again (folding's output is not always
   NFKC: ``ß`` + U+0301 folds to ``ss`` + U+0301), then every
   run of separators -- whitespace (Z*), controls (Cc), punctuation (P*) and the symbols Sm, Sc,
   Sk -- becomes one space with none at either end. With ``strip_accents``, NFKD stands for NFKC
   and nonspacing and enclosing marks (Mn, Me) are dropped before each canonical ordering.
   Letters, digits, spacing marks (Mc: Devanagari vowel
   signs stay) and other symbols (So: emoji) are kept. It equals ``NFKC(casefold(NFKC(text
   without Cf)))`` followed by that collapsing, computed with ``unicodedata``, and normalising
   its output again changes nothing.
   :func:`normalize` returns this text.
2. **Exact duplicates**: a 128-bit hash of the normalised text (:func:`exact_hashes`); hashes of
   different shards can be concatenated and clustered together.
3. **Near duplicates**: MinHash over shingles. ``shingle="auto"`` picks, per document, character
   n-grams when at least half of its letters belong to scripts written without spaces (Han, kana,
   Thai, Lao, Khmer, Myanmar, Tibetan) and word n-grams otherwise (character n-grams skip the
   spaces left by normalisation); a document with fewer tokens
   than ``ngram`` has one shingle made of all of them. LSH banding (bands x rows chosen from the
   threshold, see :func:`lsh_params`), candidate pairs verified by exact Jaccard of the shingle
   sets (``verify=True``), union-find clustering, and a keep rule per cluster.
4. **The clustering phases, each alone**: :func:`near_duplicates` and :func:`cluster_signatures` are the
   composition (in C++) of phases that can also be called one by one, on blocks of documents computed
   in different processes: :func:`exact_pairs`, :func:`band_keys`, :func:`bucket_pairs`,
   :func:`verify_pairs` and :func:`connected_components`. Documents are named by any distinct int64
   ids, and what a phase computes for a document depends only on its own data (signature row, hash,
   group), never on its position or batch; composing the phases over the same documents gives exactly
   the clusters of :func:`cluster_signatures` (see its docstring for the recipe).

Invalid UTF-8 (``bytes`` input, or lone surrogates inside ``str``) follows ``errors``: ``"replace"``
substitutes U+FFFD (Python's rule for ``bytes.decode``), ``"strict"`` raises ValueError naming the
document. Documents that normalise to nothing (empty, whitespace or punctuation only) have no
shingles: they are exact duplicates of one another and never near duplicates of anything else.

Memory per document: the signature, ``4 * num_perm`` bytes (512 B at 128), plus 16 B of exact hash,
plus during clustering 8 B per document for each band of the group being hashed (4 bands at 16 x 8),
16 B per document for each band being sorted (one per thread) and 16 B per candidate pair. For
verification, ``near_duplicates`` keeps every document's shingle set from the signature pass (8 B per
distinct shingle + 8 B per document) while they total at most 1 GiB; above that it drops them and
rebuilds the sets of the documents of 65536 candidate pairs at a time. 10M documents at num_perm=128
thus need about 5.3 GB for signatures and hashes, within 8 GB (measured: 6.3 GiB at the peak beyond
the text, bench/bench_scale.py). Besides that, the call holds 24 B per document to
view the documents in place (no copy of the text), and each thread holds 4 B per code point of the
document it is normalising (documents over 16M code units, or bytes of UTF-8, are normalised twice, streaming, instead).

Results are identical for any ``num_threads`` (0 = all cores, or ``MLMIX_NUM_THREADS``).
"""

from __future__ import annotations

import numbers
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ._core_loader import core
from ._deps import require
from .ragged import Ragged

__all__ = [
    "DedupResult",
    "UNICODE_VERSION",
    "exact_duplicates",
    "near_duplicates",
    "normalize",
    "exact_hashes",
    "minhash_signatures",
    "cluster_signatures",
    "cluster_hashes",
    "lsh_params",
    "shingle_sets",
    "exact_pairs",
    "band_keys",
    "bucket_pairs",
    "verify_pairs",
    "connected_components",
]

UNICODE_VERSION: str = core.DEDUP_UNICODE_VERSION
"""Unicode version of the C++ class tables (generated by tools/gen_unicode_tables.py)."""

_ERRORS = {"replace": 0, "strict": 1}
_SHINGLE = {"auto": 0, "word": 1, "char": 2}
_SCOPES = ("lang", "global")
# LSH weights (false positives, false negatives): with verification false positives only cost
# time, so recall is favoured; without it the usual balanced choice.
_WEIGHTS_VERIFY = (0.05, 0.95)
_WEIGHTS_NO_VERIFY = (0.5, 0.5)
# Verification keeps the shingle sets of the signature pass (8 B per distinct shingle) up to this
# many entries (1 GiB); beyond it they are rebuilt for the candidate documents only.
_SHINGLE_SET_BUDGET = 1 << 27


@dataclass(frozen=True)
class DedupResult:
    """Clusters of duplicate documents.

    cluster: (n,) int64, for each document the index of the document kept for its cluster
        (so equal values mean duplicates and ``cluster[i] == i`` for kept documents).
    keep: (n,) bool, True for the one document kept per cluster.
    stats: per language (``"all"`` when no ``langs``): ``{"documents": int, "removed": int}``.
    pairs: (m, 2) int64, the duplicate edges (i < j): equal exact hashes (similarity 1.0), then
        LSH candidates that passed verification; clusters are their connected components.
    similarity: (m,) float64, their exact Jaccard (verified) or signature agreement.
    info: parameters and counters (bands, rows, candidate_pairs, exact_merged).
    """

    cluster: np.ndarray
    keep: np.ndarray
    stats: dict
    pairs: np.ndarray = field(default_factory=lambda: np.zeros((0, 2), np.int64))
    similarity: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float64))
    info: dict = field(default_factory=dict)

    @property
    def num_removed(self) -> int:
        """Number of documents not kept."""
        return int(self.keep.size - np.count_nonzero(self.keep))


# --------------------------------------------------------------------------------------------
# Argument checks


def _check_choice(name: str, value: Any, choices: Iterable[str]) -> None:
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{name} must be one of {sorted(choices)}, got {value!r}")


def _check_int(name: str, value: Any, lo: int, hi: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or not lo <= value <= hi:
        raise ValueError(f"{name} must be an integer in [{lo}, {hi}], got {value!r}")
    return int(value)


def _check_threshold(threshold: Any) -> float:
    if (isinstance(threshold, bool) or not isinstance(threshold, numbers.Real)
            or not (0.0 < float(threshold) <= 1.0)):
        raise ValueError(f"threshold must be a number in (0, 1], got {threshold!r}")
    return float(threshold)


def _check_bool(name: str, value: Any) -> bool:
    if not isinstance(value, (bool, np.bool_)):
        raise ValueError(f"{name} must be True or False, got {value!r}")
    return bool(value)


def _check_threads(num_threads: Any) -> int:
    return _check_int("num_threads", num_threads, 0, 4096)


def _check_seed(seed: Any) -> int:
    return _check_int("seed", seed, 0, 2**64 - 1)


def _text_options(strip_accents: Any, errors: Any, num_threads: Any) -> tuple[bool, int, int]:
    """Checked (strip_accents, errors code for the core, num_threads): every text entry point's."""
    strip_accents = _check_bool("strip_accents", strip_accents)
    _check_choice("errors", errors, _ERRORS)
    return strip_accents, _ERRORS[errors], _check_threads(num_threads)


def _shingle_options(ngram: Any, shingle: Any, seed: Any) -> tuple[int, int, int]:
    """Checked (ngram, shingle mode code for the core, seed)."""
    ngram = _check_int("ngram", ngram, 1, 64)
    _check_choice("shingle", shingle, _SHINGLE)
    return ngram, _SHINGLE[shingle], _check_seed(seed)


# --------------------------------------------------------------------------------------------
# Texts -> what the core reads


def _as_list(texts: Any) -> list:
    if isinstance(texts, (str, bytes)):
        raise ValueError(f"texts must be a sequence of documents, not a single {type(texts).__name__}")
    module = type(texts).__module__ or ""
    if module.startswith("pyarrow"):
        if not hasattr(texts, "to_pylist"):
            raise ValueError(f"texts: unsupported pyarrow object {type(texts).__name__}")
        return texts.to_pylist()
    if isinstance(texts, np.ndarray):
        if texts.ndim != 1:
            raise ValueError(f"texts must be 1-D, got an array of shape {texts.shape}")
        return texts.tolist()
    if isinstance(texts, (list, tuple)):
        return texts
    try:
        return list(texts)
    except TypeError:
        raise ValueError(f"texts must be a sequence of str, got {type(texts).__name__}") from None


def _arrow_buffers(texts: Any) -> tuple[np.ndarray, np.ndarray] | None:
    """Zero-copy (uint8 data, int64 offsets) of a pyarrow (large_)string array without nulls."""
    pa = require("pyarrow")
    if isinstance(texts, pa.ChunkedArray):
        texts = texts.combine_chunks() if texts.num_chunks != 1 else texts.chunk(0)
    if not isinstance(texts, pa.Array) or texts.null_count or not (
            pa.types.is_string(texts.type) or pa.types.is_large_string(texts.type)):
        return None
    _, offsets_buf, data_buf = texts.buffers()
    offset_type = np.int64 if pa.types.is_large_string(texts.type) else np.int32
    offsets = np.frombuffer(offsets_buf, dtype=offset_type)[texts.offset:texts.offset + len(texts) + 1]
    start = int(offsets[0]) if len(offsets) else 0
    offsets = offsets.astype(np.int64) - start  # a copy of 8 bytes per document
    data = np.frombuffer(data_buf, dtype=np.uint8)[start:start + int(offsets[-1])] if data_buf is not None \
        else np.zeros(0, np.uint8)
    return data, offsets


def _prepare(texts: Any) -> tuple[Any, np.ndarray | None]:
    """The documents as the core reads them, unnormalised (the core applies normalisation and the
    UTF-8 errors policy): a pyarrow string array as its (uint8 UTF-8 data, int64 offsets) buffers, a uint8
    :class:`~mlmix.Ragged` (UTF-8 texts end to end, e.g. ``RecordBlock.text_column``) as its arrays,
    anything else as (tuple of str / bytes, None), whose documents the core reads in place --
    a str's code units as Python stores them, with no encoding or copy. The tuple is the one
    snapshot every core call of a function reads (sizes, hashes, clusters), whatever another
    thread does to the caller's list meanwhile. The core checks each item (None or another type
    is a ValueError naming its index)."""
    if isinstance(texts, Ragged) and texts.values.dtype == np.uint8:  # a column of UTF-8 texts
        return texts.values, np.ascontiguousarray(texts.offsets, dtype=np.int64)
    if (type(texts).__module__ or "").startswith("pyarrow"):
        buffers = _arrow_buffers(texts)
        if buffers is not None:
            return buffers
    return tuple(_as_list(texts)), None


def _count(data: Any, offsets: np.ndarray | None) -> int:
    return len(data) if offsets is None else len(offsets) - 1


def _groups(langs: Any, n: int, scope: str) -> tuple[np.ndarray | None, list, np.ndarray]:
    """(group ids for the core or None, language names, per-document language index)."""
    _check_choice("scope", scope, _SCOPES)
    if langs is None:
        return None, ["all"], np.zeros(n, dtype=np.int64)
    lang_list = _as_list(langs)
    if len(lang_list) != n:
        raise ValueError(f"langs must have one entry per document ({n}), got {len(lang_list)}")
    ids: dict = {}
    try:
        index = np.fromiter((ids.setdefault(lang, len(ids)) for lang in lang_list), dtype=np.int64, count=n)
    except TypeError:
        raise ValueError("langs entries must be hashable language codes (e.g. 'en')") from None
    names = list(ids)
    return (index if scope == "lang" else None), names, index


def _is_longest(keep: Any) -> bool:
    return isinstance(keep, str) and keep == "longest"  # keep may be an array of scores


def _scores(keep: Any, n: int, lengths: Any) -> np.ndarray | None:
    if isinstance(keep, str):
        _check_choice("keep", keep, ("first", "longest"))
        if keep == "first":
            return None
        if lengths is None:
            raise ValueError("keep='longest' needs document lengths (pass lengths=)")
        return np.asarray(lengths, dtype=np.float64)
    scores = np.asarray(keep, dtype=np.float64)
    if scores.shape != (n,):
        raise ValueError(f"keep scores must have shape ({n},), got {scores.shape}")
    if not np.all(np.isfinite(scores)):
        raise ValueError("keep scores must be finite (no NaN or inf)")
    return np.ascontiguousarray(scores)


def _stats(keep_mask: np.ndarray, names: list, index: np.ndarray) -> dict:
    docs = np.bincount(index, minlength=len(names))
    removed = np.bincount(index, weights=~keep_mask, minlength=len(names)).astype(np.int64)
    return {name: {"documents": int(docs[k]), "removed": int(removed[k])} for k, name in enumerate(names)}


def _result(raw: dict, names: list, index: np.ndarray, info: dict) -> DedupResult:
    cluster = raw["cluster"]
    keep = cluster == np.arange(cluster.size, dtype=np.int64)
    pairs = np.stack([raw["pair_first"], raw["pair_second"]], axis=1) if raw["pair_first"].size else \
        np.zeros((0, 2), np.int64)
    info = dict(info, candidate_pairs=int(raw["candidate_pairs"]), exact_merged=int(raw["exact_merged"]))
    return DedupResult(cluster, keep, _stats(keep, names, index), pairs, raw["pair_similarity"], info)


# --------------------------------------------------------------------------------------------
# Public API


def normalize(texts: Sequence[str] | Any, *, strip_accents: bool = False, errors: str = "replace",
              num_threads: int = 0) -> list[str]:
    """The normalised text of each document (see the module docstring): a list of str."""
    strip_accents, errors_code, num_threads = _text_options(strip_accents, errors, num_threads)
    data, offsets = _prepare(texts)
    out, out_offsets = core._dedup_normalize(data, offsets, strip_accents, errors_code, num_threads)
    raw = out.tobytes()
    return [raw[out_offsets[i]:out_offsets[i + 1]].decode("utf-8") for i in range(len(out_offsets) - 1)]


def exact_hashes(texts: Sequence[str] | Any, *, strip_accents: bool = False, errors: str = "replace",
                 num_threads: int = 0) -> np.ndarray:
    """(n, 2) uint64: a 128-bit hash of each normalised document. Equal normalised texts give
    equal hashes in any process, so shards can be hashed apart and clustered together
    (:func:`cluster_signatures` with ``hashes=``)."""
    strip_accents, errors_code, num_threads = _text_options(strip_accents, errors, num_threads)
    data, offsets = _prepare(texts)
    return core._dedup_exact_hashes(data, offsets, strip_accents, errors_code, num_threads)


def exact_duplicates(texts: Sequence[str] | Any, *, langs: Sequence[str] | None = None, scope: str = "lang",
                     keep: str | Sequence[float] = "first", strip_accents: bool = False,
                     errors: str = "replace", num_threads: int = 0) -> DedupResult:
    """Documents whose normalised texts are equal (by 128-bit hash).

    texts: n documents (str, UTF-8 bytes, a pyarrow string array, or a uint8 :class:`~mlmix.Ragged` of
    UTF-8 texts). langs: optional n language
    codes; with ``scope="lang"`` documents of different languages are never duplicates, with
    ``"global"`` they may be. keep: ``"first"`` (lowest index), ``"longest"`` (most
    UTF-8 bytes) or n float scores (highest kept, ties to the lowest index).
    """
    strip_accents, errors_code, num_threads = _text_options(strip_accents, errors, num_threads)
    data, offsets = _prepare(texts)
    n = _count(data, offsets)
    groups, names, index = _groups(langs, n, scope)
    scores = _scores(keep, n, core._dedup_utf8_sizes(data, offsets) if _is_longest(keep) else None)
    hashes = core._dedup_exact_hashes(data, offsets, strip_accents, errors_code, num_threads)
    return _cluster_exact(hashes, groups, scores, names, index, scope, num_threads)


def _cluster_exact(hashes, groups, scores, names, index, scope, num_threads) -> DedupResult:
    # No LSH: a single all-max signature column marks every document as "no shingles".
    empty = np.full((hashes.shape[0], 1), np.iinfo(np.uint32).max, dtype=np.uint32)
    raw = core._dedup_cluster(empty, hashes, groups, scores, 1.0, 1, 1, False, num_threads)
    return _result(raw, names, index, {"scope": scope})


def cluster_hashes(hashes: np.ndarray, *, langs: Sequence[str] | None = None, scope: str = "lang",
                   keep: str | Sequence[float] = "first", lengths: Sequence[int] | None = None,
                   num_threads: int = 0) -> DedupResult:
    """Exact duplicates from (n, 2) uint64 :func:`exact_hashes`, e.g. of several shards stacked.
    langs/scope/keep as in :func:`exact_duplicates`; keep="longest" needs ``lengths``."""
    hashes = np.asarray(hashes)
    if hashes.ndim != 2 or hashes.shape[1] != 2 or hashes.dtype != np.uint64:
        raise ValueError(f"hashes must be a (n, 2) uint64 array, got dtype {hashes.dtype} shape {hashes.shape}")
    n = hashes.shape[0]
    if lengths is not None and np.shape(lengths) != (n,):
        raise ValueError(f"lengths must have shape ({n},), got {np.shape(lengths)}")
    groups, names, index = _groups(langs, n, scope)
    scores = _scores(keep, n, lengths)
    return _cluster_exact(np.ascontiguousarray(hashes), groups, scores, names, index, scope,
                          _check_threads(num_threads))


def lsh_params(threshold: float = 0.8, num_perm: int = 128, *, verify: bool = True) -> tuple[int, int]:
    """(bands, rows) with bands * rows <= num_perm minimising the weighted false-positive and
    false-negative areas under the LSH S-curve. With ``verify`` false negatives weigh 0.95 and
    false positives 0.05 (verification removes the latter); without, 0.5 each."""
    threshold = _check_threshold(threshold)
    num_perm = _check_int("num_perm", num_perm, 1, 4096)
    fp, fn = _WEIGHTS_VERIFY if verify else _WEIGHTS_NO_VERIFY
    return tuple(core._dedup_lsh_params(threshold, num_perm, fp, fn))


def _bands_rows(bands: Any, threshold: float, num_perm: int, verify: bool) -> tuple[int, int]:
    if bands is None:
        return lsh_params(threshold, num_perm, verify=verify)
    bands = _check_int("bands", bands, 1, num_perm)
    if num_perm % bands:
        raise ValueError(f"num_perm ({num_perm}) is not divisible into bands={bands}; pick a divisor "
                         f"of num_perm or bands=None to choose from the threshold")
    return bands, num_perm // bands


def minhash_signatures(texts: Sequence[str] | Any, *, num_perm: int = 128, ngram: int = 5,
                       shingle: str = "auto", seed: int = 0, strip_accents: bool = False,
                       errors: str = "replace", num_threads: int = 0,
                       with_hashes: bool = False) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
    """(n, num_perm) uint32 MinHash signatures (all 0xFFFFFFFF for a document without shingles).

    Signatures of different shards with the same arguments can be stacked and passed to
    :func:`cluster_signatures`. ``with_hashes=True`` returns ``(signatures, hashes)``, the second being
    what :func:`exact_hashes` gives with the same ``strip_accents`` and ``errors``, from the same pass over
    the texts (each is normalised once for both).
    """
    num_perm = _check_int("num_perm", num_perm, 1, 4096)
    ngram, mode, seed = _shingle_options(ngram, shingle, seed)
    strip_accents, errors_code, num_threads = _text_options(strip_accents, errors, num_threads)
    with_hashes = _check_bool("with_hashes", with_hashes)
    data, offsets = _prepare(texts)
    sig, hashes, _, _ = core._dedup_minhash(data, offsets, num_perm, ngram, mode, seed, strip_accents, errors_code,
                                            num_threads)
    return (sig, hashes) if with_hashes else sig


def shingle_sets(texts: Sequence[str] | Any, *, ngram: int = 5, shingle: str = "auto", seed: int = 0,
                 strip_accents: bool = False, errors: str = "replace", num_threads: int = 0) -> Ragged:
    """Each document's shingle set, as :func:`near_duplicates` verifies it: a :class:`~mlmix.Ragged`
    of n rows of sorted, distinct uint64 shingle hashes (row i: ``values[offsets[i]:offsets[i + 1]]``;
    an empty row for a document without shingles). The exact Jaccard similarity of documents i and
    j is that of their rows (``np.intersect1d`` size over ``np.union1d`` size). Arguments as in
    :func:`near_duplicates`; ``seed`` is accepted for symmetry with it (the shingle hashes do not
    depend on it: only the MinHash permutations do). Memory: 8 B per distinct shingle.
    """
    ngram, mode, seed = _shingle_options(ngram, shingle, seed)
    strip_accents, errors_code, num_threads = _text_options(strip_accents, errors, num_threads)
    data, offsets = _prepare(texts)
    values, set_offsets = core._dedup_shingle_sets(data, offsets, ngram, mode, seed, strip_accents, errors_code,
                                                   num_threads)
    return Ragged(values, set_offsets, validate=False)


def near_duplicates(texts: Sequence[str] | Any, *, threshold: float = 0.8, num_perm: int = 128, ngram: int = 5,
                    langs: Sequence[str] | None = None, verify: bool = True, seed: int = 0,
                    shingle: str = "auto", bands: int | None = None, scope: str = "lang",
                    keep: str | Sequence[float] = "first", strip_accents: bool = False,
                    errors: str = "replace", num_threads: int = 0) -> DedupResult:
    """Clusters of documents whose shingle sets have Jaccard similarity >= threshold.

    texts: n documents (str, UTF-8 bytes, a pyarrow string array, or a uint8 :class:`~mlmix.Ragged` of
    UTF-8 texts). threshold in (0, 1].
    num_perm: MinHash permutations. ngram: words (or characters) per shingle; shingle:
    ``"auto"`` (per document, by script), ``"word"`` or ``"char"``. bands: LSH bands (must divide
    num_perm); None chooses bands x rows from the threshold (:func:`lsh_params`). verify: check
    each candidate pair by exact Jaccard of the shingle sets, else every LSH candidate is a
    duplicate. Exact duplicates are always merged. langs/scope/keep: as in
    :func:`exact_duplicates`.
    Clusters are connected components of the duplicate pairs (``result.pairs``).
    """
    threshold = _check_threshold(threshold)
    verify = _check_bool("verify", verify)
    num_perm = _check_int("num_perm", num_perm, 1, 4096)
    band_count, rows = _bands_rows(bands, threshold, num_perm, verify)
    ngram, mode, seed = _shingle_options(ngram, shingle, seed)
    strip_accents, errors_code, num_threads = _text_options(strip_accents, errors, num_threads)
    data, offsets = _prepare(texts)
    n = _count(data, offsets)
    groups, names, index = _groups(langs, n, scope)
    scores = _scores(keep, n, core._dedup_utf8_sizes(data, offsets) if _is_longest(keep) else None)
    raw = core._dedup_near(data, offsets, num_perm, ngram, mode, seed, strip_accents, errors_code, groups, scores,
                           threshold, band_count, rows, verify, _SHINGLE_SET_BUDGET, num_threads)
    info = {"bands": band_count, "rows": rows, "threshold": threshold, "num_perm": num_perm,
            "ngram": ngram, "scope": scope, "char_shingled": int(np.count_nonzero(raw["char_mode"]))}
    return _result(raw, names, index, info)


def cluster_signatures(signatures: np.ndarray, *, threshold: float = 0.8, bands: int | None = None,
                       hashes: np.ndarray | None = None, langs: Sequence[str] | None = None,
                       scope: str = "lang", keep: str | Sequence[float] = "first",
                       lengths: Sequence[int] | None = None, verify: bool = True,
                       num_threads: int = 0) -> DedupResult:
    """LSH + clustering over signatures computed elsewhere (e.g. per shard, then stacked).

    signatures: (n, num_perm) uint32 from :func:`minhash_signatures`. hashes: optional (n, 2)
    uint64 from :func:`exact_hashes`, merged first (and the only way documents without shingles
    are merged). verify: keep a candidate pair only when the fraction of equal signature entries
    is >= threshold (the texts are not available here). keep="longest" needs ``lengths``.

    It is the composition of the clustering phases, which an executor can run apart (``ids`` the
    documents' ids, increasing with the rows; ``g`` their group codes or None; ``scores`` as ``keep``
    gives them; ``b, r`` the bands and rows in ``result.info``)::

        exact = exact_pairs(hashes, groups=g, docs=ids)           # skip without hashes
        keys, has_keys = band_keys(signatures[:, :b * r], bands=b, rows=r, groups=g)
        lsh = has_keys & ~np.isin(ids, exact[:, 1])               # not a later exact duplicate
        cand = bucket_pairs(keys[lsh].ravel(), np.repeat(ids[lsh], b),
                            groups=None if g is None else np.repeat(g[lsh], b))
        sim, ok = verify_pairs(cand, threshold=t, signatures=signatures, docs=ids)  # if verify
        kept = connected_components(ids, np.vstack([exact, cand[ok]]), scores=scores)

    ``kept == ids`` is ``result.keep`` and ``kept`` is ``result.cluster`` in ids. near_duplicates
    verifies by the exact Jaccard of :func:`shingle_sets` (``shingle_sets=`` instead of ``signatures=``).
    """
    sig = np.asarray(signatures)
    if sig.ndim != 2 or sig.dtype != np.uint32 or not 1 <= sig.shape[1] <= 4096:
        raise ValueError(f"signatures must be a (n, num_perm) uint32 array with 1 <= num_perm <= 4096, "
                         f"got dtype {sig.dtype} shape {sig.shape}")
    sig = np.ascontiguousarray(sig)
    n, num_perm = sig.shape
    threshold = _check_threshold(threshold)
    verify = _check_bool("verify", verify)
    band_count, rows = _bands_rows(bands, threshold, num_perm, verify)
    if hashes is not None:
        hashes = np.asarray(hashes)
        if hashes.shape != (n, 2) or hashes.dtype != np.uint64:
            raise ValueError(f"hashes must be a ({n}, 2) uint64 array, got dtype {hashes.dtype} shape {hashes.shape}")
        hashes = np.ascontiguousarray(hashes)
    if lengths is not None:
        lengths = np.asarray(lengths)
        if lengths.shape != (n,):
            raise ValueError(f"lengths must have shape ({n},), got {lengths.shape}")
    groups, names, index = _groups(langs, n, scope)
    scores = _scores(keep, n, lengths)
    raw = core._dedup_cluster(sig, hashes, groups, scores, threshold, band_count, rows, verify,
                              _check_threads(num_threads))
    info = {"bands": band_count, "rows": rows, "threshold": threshold, "num_perm": num_perm, "scope": scope}
    return _result(raw, names, index, info)


# --------------------------------------------------------------------------------------------
# The clustering phases, each alone


def _array(name: str, value: Any, what: str) -> np.ndarray:
    try:
        return np.asarray(value)
    except Exception as e:  # noqa: BLE001 - numpy raises many types for odd objects
        raise ValueError(f"{name} must be {what}, got {type(value).__name__} ({e})") from None


def _ids(name: str, value: Any, shape: tuple | None = None) -> np.ndarray:
    """An integer array as C-contiguous int64 (every value must fit), of the given shape (None: 1-D)."""
    what = "a 1-D integer array" if shape is None else \
        f"an integer array of shape ({', '.join('m' if d is None else str(d) for d in shape)})"
    a = _array(name, value, what)
    if a.dtype.kind not in "iu" or (a.ndim != 1 if shape is None else a.ndim != len(shape)) or any(
            want is not None and got != want for want, got in zip(shape or (), a.shape)):
        raise ValueError(f"{name} must be {what}, got dtype {a.dtype} shape {a.shape}")
    if a.dtype == np.uint64 and a.size and int(a.max()) > np.iinfo(np.int64).max:
        raise ValueError(f"{name} must hold int64 values, got {int(a.max())}")
    return np.ascontiguousarray(a, dtype=np.int64)


def _group_codes(name: str, value: Any, n: int) -> np.ndarray | None:
    """(n,) uint64 group codes: unsigned values as they are, signed ones by their 64-bit two's complement
    bits (so that cluster_signatures' int64 group indices give the same codes)."""
    if value is None:
        return None
    a = _array(name, value, f"None or an integer array of shape ({n},)")
    if a.dtype.kind not in "iu" or a.shape != (n,):
        raise ValueError(f"{name} must be None or an integer array of shape ({n},), "
                         f"got dtype {a.dtype} shape {a.shape}")
    return np.ascontiguousarray(a.astype(np.int64).view(np.uint64) if a.dtype.kind == "i" else a.astype(np.uint64))


def _pairs(value: Any) -> np.ndarray:
    return _ids("pairs", value, (None, 2))


def _signatures(value: Any, name: str = "signatures") -> np.ndarray:
    sig = _array(name, value, "a (n, num_perm) uint32 array")
    if sig.ndim != 2 or sig.dtype != np.uint32 or not 1 <= sig.shape[1] <= 4096:
        raise ValueError(f"{name} must be a (n, num_perm) uint32 array with 1 <= num_perm <= 4096, "
                         f"got dtype {sig.dtype} shape {sig.shape}")
    return np.ascontiguousarray(sig)


def _docs(value: Any, n: int) -> np.ndarray | None:
    if value is None:
        return None
    docs = _ids("docs", value)
    if docs.shape != (n,):
        raise ValueError(f"docs must have one id per document ({n}), got shape {docs.shape}")
    return docs


def exact_pairs(hashes: np.ndarray, *, groups: np.ndarray | None = None,
                docs: np.ndarray | None = None) -> np.ndarray:
    """Exact-duplicate pairs: documents with equal (group, 128-bit hash).

    hashes: (n, 2) uint64 from :func:`exact_hashes`. groups: optional (n,) integer group codes
    (documents of different groups are never duplicates; as in :func:`band_keys`). docs: optional
    (n,) distinct int64 document ids (default ``0..n-1``).

    Returns (m, 2) int64 id pairs ``(a, b)``, ``a < b``: within each run of documents with equal
    (group, hash), ordered by id, every document after the first is paired with the one before it
    (a chain), so ``pairs[:, 1]`` are exactly the documents that duplicate an earlier one. Pairs come
    in the order :func:`cluster_signatures` reports them (by group, hash, id), not sorted.
    """
    h = _array("hashes", hashes, "a (n, 2) uint64 array")
    if h.ndim != 2 or h.shape[1:] != (2,) or h.dtype != np.uint64:
        raise ValueError(f"hashes must be a (n, 2) uint64 array, got dtype {h.dtype} shape {h.shape}")
    n = h.shape[0]
    g = _group_codes("groups", groups, n)
    return core._dedup_exact_pairs(np.ascontiguousarray(h), None if g is None else g.view(np.int64),
                                   _docs(docs, n))


def band_keys(signatures: np.ndarray, *, bands: int, rows: int, groups: np.ndarray | None = None,
              num_threads: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """LSH band keys: one 64-bit key per (document, band).

    signatures: (n, bands * rows) uint32 from :func:`minhash_signatures` (where :func:`lsh_params`
    leaves columns unused, pass the first ``bands * rows``: LSH reads no others). groups: optional
    (n,) integer group codes, e.g. a stable hash of each document's language when deduplicating per
    language; unsigned values are taken as they are, signed ones by their two's-complement bits.
    Documents of different groups get different keys (the code is hashed in; :func:`bucket_pairs`
    with ``groups=`` drops even a 64-bit collision).

    Returns ``(keys, has_keys)``: keys (n, bands) uint64, ``keys[i, b]`` a hash of the band index ``b``,
    the values ``signatures[i, b * rows:(b + 1) * rows]`` and the group code -- nothing else, so keys
    computed in separate blocks or processes can be bucketed together; has_keys (n,) bool, False for a
    document without shingles (an all-0xFFFFFFFF signature), whose keys are 0 and must not be bucketed
    (such documents are only ever exact duplicates).
    """
    sig = _signatures(signatures)
    n, num_perm = sig.shape
    bands = _check_int("bands", bands, 1, num_perm)
    rows = _check_int("rows", rows, 1, num_perm)
    if bands * rows != num_perm:
        raise ValueError(f"bands * rows must equal the signature width {num_perm}, got bands={bands} rows={rows}")
    g = _group_codes("groups", groups, n)
    return tuple(core._dedup_band_keys(sig, bands, rows, g, _check_threads(num_threads)))


def bucket_pairs(keys: np.ndarray, docs: np.ndarray, *, groups: np.ndarray | None = None) -> np.ndarray:
    """Candidate pairs of LSH buckets, from (key, document id) rows in any order.

    keys: (m,) uint64 band keys (:func:`band_keys`, rows of documents with ``has_keys`` only); docs:
    (m,) int64 the document id of each row (any int64, e.g. ``block << 40 | index``); the rows may
    come from any number of bands, blocks and processes, in any order. Rows of equal key form a
    bucket (a repeated (key, doc) row counts once), whose members are ordered by id. A bucket of up to
    128 members gives all its pairs; a larger one each member with the first and with its
    predecessor, so that a popular band value cannot make the candidates quadratic. groups: optional
    (m,) integer group code of each row's document; pairs whose documents' groups differ are dropped
    (a document with rows of two groups is a ValueError).

    Returns (p, 2) int64 pairs ``(a, b)``, ``a < b``, sorted and unique.
    """
    k = _array("keys", keys, "a 1-D uint64 array")
    if k.ndim != 1 or k.dtype != np.uint64:
        raise ValueError(f"keys must be a 1-D uint64 array, got dtype {k.dtype} shape {k.shape}")
    d = _ids("docs", docs)
    if d.shape != k.shape:
        raise ValueError(f"docs must have one id per key ({k.shape[0]}), got shape {d.shape}")
    return core._dedup_bucket_pairs(np.ascontiguousarray(k), d, _group_codes("groups", groups, k.shape[0]))


def verify_pairs(pairs: np.ndarray, *, threshold: float = 0.8, signatures: np.ndarray | None = None,
                 shingle_sets: Ragged | tuple | None = None, docs: np.ndarray | None = None,
                 num_threads: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """The similarity of each candidate pair and whether it is a duplicate, as the clustering decides.

    pairs: (m, 2) integer document ids. Give either ``shingle_sets`` -- a :class:`~mlmix.Ragged` (or a
    ``(values, offsets)`` pair) of n sorted unique uint64 rows, as :func:`shingle_sets` returns them --
    for the exact Jaccard similarity (what :func:`near_duplicates` verifies), or ``signatures`` (n,
    num_perm) uint32 for the fraction of equal entries (what :func:`cluster_signatures` verifies).
    docs: optional (n,) distinct int64 ids of those n rows (default ``0..n-1``); every id in ``pairs``
    must be one of them.

    Returns ``(similarity, passed)``: (m,) float64, and (m,) bool ``similarity >= threshold``. (The
    clustering without verification keeps every candidate, with similarity 1.0.)
    """
    threshold = _check_threshold(threshold)
    p = _pairs(pairs)
    if (signatures is None) == (shingle_sets is None):
        raise ValueError("verify_pairs needs exactly one of signatures= or shingle_sets=, got "
                         + ("both" if signatures is not None else "neither"))
    if signatures is not None:
        sig = _signatures(signatures)
        similarity = core._dedup_verify_pairs(p, _docs(docs, sig.shape[0]), sig, None, None,
                                              _check_threads(num_threads))
    else:
        if isinstance(shingle_sets, Ragged):
            values, offsets = shingle_sets.values, shingle_sets.offsets
        elif isinstance(shingle_sets, tuple) and len(shingle_sets) == 2:
            values, offsets = shingle_sets
        else:
            raise ValueError(f"shingle_sets must be a Ragged or a (values, offsets) tuple, got "
                             f"{type(shingle_sets).__name__}")
        values = _array("shingle_sets values", values, "a 1-D uint64 array")
        if values.ndim != 1 or values.dtype != np.uint64:
            raise ValueError(f"shingle_sets values must be a 1-D uint64 array, got dtype {values.dtype} "
                             f"shape {values.shape}")
        offsets = _ids("shingle_sets offsets", offsets)
        if offsets.size < 1:
            raise ValueError("shingle_sets offsets must have n + 1 >= 1 entries, got 0")
        similarity = core._dedup_verify_pairs(p, _docs(docs, offsets.size - 1), None, np.ascontiguousarray(values),
                                              offsets, _check_threads(num_threads))
    return similarity, similarity >= threshold


def connected_components(docs: int | np.ndarray, pairs: np.ndarray, *,
                         scores: np.ndarray | None = None) -> np.ndarray:
    """The document kept for each document's cluster: union-find over the duplicate pairs.

    docs: the number of documents n (ids ``0..n-1``) or an (n,) array of distinct int64 ids. pairs:
    (m, 2) integer ids of duplicate documents (exact and verified pairs). scores: optional (n,)
    finite floats, one per document: each cluster keeps its highest score (``keep="longest"`` is the
    lengths), ties -- and all documents without scores -- to the smallest id (``keep="first"``).

    Returns (n,) int64: for each document (in the order of ``docs``), the id of the document its
    cluster keeps; the kept documents are those equal to their own id.
    """
    if isinstance(docs, numbers.Integral) and not isinstance(docs, bool):
        if docs < 0:
            raise ValueError(f"docs must be a number of documents >= 0 or an array of ids, got {docs!r}")
        ids, n = None, int(docs)
    else:
        ids = _ids("docs", docs)
        n = ids.shape[0]
    p = _pairs(pairs)
    sc = None
    if scores is not None:
        sc = _array("scores", scores, f"an array of {n} finite floats")
        if sc.shape != (n,) or sc.dtype.kind not in "iuf":
            raise ValueError(f"scores must be {n} finite numbers, got dtype {sc.dtype} shape {sc.shape}")
        sc = np.ascontiguousarray(sc, dtype=np.float64)
        if not np.all(np.isfinite(sc)):
            raise ValueError("scores must be finite (no NaN or inf)")
    return core._dedup_connected_components(ids, n, p, sc)


def _shingle_set(text: str, *, ngram: int = 5, shingle: str = "auto", strip_accents: bool = False,
                 errors: str = "replace") -> np.ndarray:
    """Sorted unique uint64 shingle hashes of one document (one row of :func:`shingle_sets`)."""
    return shingle_sets([text], ngram=ngram, shingle=shingle, strip_accents=strip_accents, errors=errors,
                        num_threads=1).values

