"""Stratified weighted reservoir sampling whose result depends only on (seed, stratum, item id, weight).

Each stratum keeps a sample of its capacity from a stream of (stratum, id, weight) items:

- unweighted: a uniform random subset of the distinct ids seen in the stratum;
- weighted: Efraimidis-Spirakis sampling without replacement (an item's chance to be picked first is
  proportional to its weight; weight 0 is never picked).

Every item's random key is ``-log(1 - u) / weight`` with ``u`` a uniform derived from a 64-bit hash of
``(seed, stratum, id)``, and the sample is the ``capacity`` smallest keys (ties broken by the hash, then
the id). So the sample does not depend on arrival order, batching, thread count or sharding: reservoirs
filled on separate shards and merged give the single-pass result bit for bit, and a reservoir pickles
so that shards can live in other processes. Memory is ``O(sum of capacities)``, whatever the stream length.

An id seen more than once in a stratum is one item (with the largest of its weights). The same id in two
strata is two items with independent keys.
"""

from __future__ import annotations

import hashlib
from collections.abc import Hashable, Mapping
from typing import Any

import numpy as np

from ._core_loader import core

__all__ = ["StratifiedReservoir", "stratum_code"]

_U64 = (1 << 64) - 1
# Integer strata in [0, _LUT_LIMIT) are mapped to reservoir slots in C++ through a lookup table.
_LUT_LIMIT = 1 << 20


def stratum_code(stratum: Hashable) -> int:
    """The stable 64-bit code of a stratum that is mixed into its items' keys.

    Integers are their own code (two's complement for negatives); strings hash their UTF-8 bytes, so
    the code (and the sample) is the same in every process, whatever order strata are first seen in.
    """
    if isinstance(stratum, (bool, np.bool_)):
        raise TypeError(f"strata must be integers or strings, got the bool {stratum!r}")
    if isinstance(stratum, (int, np.integer)):
        value = int(stratum)
        if not -(1 << 63) <= value <= _U64:
            raise ValueError(f"integer strata must fit in 64 bits, got {value!r}")
        return value & _U64
    if isinstance(stratum, str):
        digest = hashlib.blake2b(stratum.encode("utf-8"), digest_size=8, person=b"mlmix-stratum").digest()
        return int.from_bytes(digest, "little")
    raise TypeError(f"strata must be integers or strings, got {type(stratum).__name__} {stratum!r}")


def _as_ids(ids) -> tuple[np.ndarray, bool]:
    """ids as a contiguous uint64 view, and whether they were unsigned."""
    arr = np.asarray(ids)
    if arr.ndim != 1:
        raise ValueError(f"ids must be a 1-D array, got shape {arr.shape}")
    if arr.size == 0 and arr.dtype.kind not in "iu":
        arr = arr.astype(np.int64)
    if arr.dtype.kind not in "iu":
        raise TypeError(f"ids must be an integer array (int64 or uint64), got dtype {arr.dtype}")
    unsigned = arr.dtype.kind == "u"
    arr = np.ascontiguousarray(arr, dtype=np.uint64 if unsigned else np.int64)
    return arr.view(np.uint64), unsigned


class StratifiedReservoir:
    """A bounded, mergeable, per-stratum sample of a stream of item ids.

    Args:
        capacities: ``{stratum: k}``, the number of ids to keep per stratum (``k >= 0``). Strata are
            integers or strings; items of a stratum not listed here are an error (list it with
            capacity 0 to ignore it).
        seed: 64-bit seed (``0 <= seed < 2**64``) of the hash that gives every item its key.
        threads: worker threads for :meth:`add` (default 1; 0 = all cores). The sample is the same
            for any value.

    Example::

        r = StratifiedReservoir({"en": 2, "sw": 1}, seed=0)
        r.add(["en", "sw", "en", "en"], [10, 11, 12, 13])
        r.result()   # {"en": array([...2 ids...]), "sw": array([11])}
    """

    def __init__(self, capacities: Mapping[Hashable, int], *, seed: int = 0, threads: int = 1) -> None:
        if not isinstance(capacities, Mapping):
            raise TypeError(f"capacities must be a dict {{stratum: k}}, got {type(capacities).__name__}")
        if len(capacities) == 0:
            raise ValueError("capacities must name at least one stratum, got an empty dict")
        if isinstance(seed, (bool, np.bool_)) or not isinstance(seed, (int, np.integer)) or not 0 <= int(seed) <= _U64:
            raise ValueError(f"seed must be an integer in [0, 2**64), got {seed!r}")
        if not isinstance(threads, (int, np.integer)) or int(threads) < 0:
            raise ValueError(f"threads must be an integer >= 0 (0 = all cores), got {threads!r}")
        self._strata: list[Hashable] = []
        caps: list[int] = []
        codes: list[int] = []
        seen_codes: dict[int, Hashable] = {}
        for stratum, k in capacities.items():
            code = stratum_code(stratum)
            if code in seen_codes:
                raise ValueError(f"capacities lists strata {seen_codes[code]!r} and {stratum!r}, which are the same stratum")
            if isinstance(k, (bool, np.bool_)) or not isinstance(k, (int, np.integer)) or int(k) < 0:
                raise ValueError(f"capacities[{stratum!r}] must be an integer >= 0, got {k!r}")
            seen_codes[code] = stratum
            self._strata.append(int(stratum) if isinstance(stratum, np.integer) else stratum)
            caps.append(int(k))
            codes.append(code)
        self._capacities = dict(zip(self._strata, caps))
        self._index = {s: i for i, s in enumerate(self._strata)}
        self.seed = int(seed)
        self.threads = int(threads)
        self._unsigned_ids = False
        self._core = core._StratifiedReservoir(self.seed, codes, caps)
        self._int_lut = self._build_int_lut()

    # -- the stream ------------------------------------------------------------------------------
    def _build_int_lut(self) -> np.ndarray | None:
        """Lookup table value -> slot for integer strata in [0, _LUT_LIMIT), or None if not applicable."""
        ints = [s for s in self._strata if isinstance(s, int)]
        if not ints or min(ints) < 0 or max(ints) >= _LUT_LIMIT:
            return None
        lut = np.full(max(ints) + 1, -1, dtype=np.int32)
        for s in ints:
            lut[s] = self._index[s]
        return lut

    def _slots(self, strata) -> tuple[np.ndarray, np.ndarray]:
        """(stratum values, lookup table) for the C++ kernel, which checks every value."""
        arr = strata if isinstance(strata, np.ndarray) else np.asarray(strata)
        if arr.ndim != 1:
            raise ValueError(f"strata must be a 1-D array, got shape {arr.shape}")
        if arr.dtype.kind in "iu" and self._int_lut is not None:
            return np.ascontiguousarray(arr), self._int_lut
        if arr.dtype.kind == "b" or (arr.dtype.kind not in "iuUO" and arr.size):
            raise TypeError(f"strata must hold integers or strings, got dtype {arr.dtype}")
        # General path: map the distinct values of the batch to slots in Python.
        uniques, inverse = np.unique(arr, return_inverse=True)
        slot_of_unique = np.empty(len(uniques), dtype=np.int32)
        for j, value in enumerate(uniques.tolist()):
            slot = self._index.get(value)
            if slot is None or type(value) is not type(self._strata[slot]):
                raise ValueError(
                    f"strata holds {value!r}, which is not one of the reservoir's strata "
                    f"{self._strata!r} (give it a capacity, 0 to ignore it)"
                )
            slot_of_unique[j] = slot
        slots = slot_of_unique[inverse.reshape(-1)] if len(uniques) else np.empty(0, np.int32)
        return np.ascontiguousarray(slots, dtype=np.int32), np.arange(len(self._strata), dtype=np.int32)

    def add(self, strata, ids, weights=None, *, threads: int | None = None) -> StratifiedReservoir:
        """Offer a batch of items.

        Args:
            strata: 1-D array (or list) of length n: each item's stratum, integers or strings.
            ids: 1-D int64 or uint64 array of length n: item ids (the sample's unit; repeats of an id
                within a stratum are one item).
            weights: optional 1-D float array of length n, finite and >= 0 (default: all 1). The chance
                to be picked first is proportional to the weight; weight 0 is never picked.
            threads: overrides the reservoir's ``threads`` for this call.

        A bad batch raises ValueError/TypeError and leaves the reservoir unchanged. Returns self.
        """
        id_arr, unsigned = _as_ids(ids)
        values, lut = self._slots(strata)
        w = None
        if weights is not None:
            w = np.asarray(weights)
            if w.dtype.kind not in "fiu":
                raise TypeError(f"weights must be a float array, got dtype {w.dtype}")
            w = np.ascontiguousarray(w, dtype=np.float64)
            if w.ndim != 1:
                raise ValueError(f"weights must be a 1-D array, got shape {w.shape}")
        if len(id_arr) != len(values):
            raise ValueError(f"ids and strata must have the same length, got {len(id_arr)} and {len(values)}")
        nthreads = self.threads if threads is None else int(threads)
        if nthreads < 0:
            raise ValueError(f"threads must be >= 0 (0 = all cores), got {threads!r}")
        self._core.add(values, lut, id_arr, w, nthreads)
        self._unsigned_ids |= unsigned
        return self

    def merge(self, other: StratifiedReservoir) -> StratifiedReservoir:
        """Fold in a reservoir filled elsewhere (same capacities and seed). Returns self.

        The result equals one reservoir that saw both streams, bit for bit.
        """
        if not isinstance(other, StratifiedReservoir):
            raise TypeError(f"other must be a StratifiedReservoir, got {type(other).__name__}")
        if other.seed != self.seed:
            raise ValueError(f"cannot merge reservoirs with different seeds: {self.seed} and {other.seed}")
        if other._capacities != self._capacities or other._strata != self._strata:
            raise ValueError(
                f"cannot merge reservoirs with different capacities: {self._capacities!r} and {other._capacities!r}"
            )
        self._core.merge(other._core)
        self._unsigned_ids |= other._unsigned_ids
        return self

    # -- results ---------------------------------------------------------------------------------
    def result(self, order: str = "key") -> dict[Hashable, np.ndarray]:
        """``{stratum: ids}``: each stratum's sample (at most its capacity; fewer if it saw fewer ids).

        Ids are int64 (uint64 if any uint64 ids were added). ``order="key"`` (default) lists them best
        key first, so the first j ids are exactly the sample of capacity j; ``order="id"`` sorts by id.
        """
        if order not in ("key", "id"):
            raise ValueError(f"order must be 'key' or 'id', got {order!r}")
        out = {}
        for slot, stratum in enumerate(self._strata):
            _, _, ids = self._core.sample(slot)
            if order == "id":
                ids = np.sort(ids)
            out[stratum] = ids if self._unsigned_ids else ids.view(np.int64)
        return out

    def keys(self) -> dict[Hashable, np.ndarray]:
        """``{stratum: float64 keys}`` of the sample, aligned with ``result(order="key")``."""
        return {stratum: self._core.sample(slot)[0] for slot, stratum in enumerate(self._strata)}

    def seen(self) -> dict[Hashable, int]:
        """``{stratum: number of items offered}`` (repeats counted; merges add up)."""
        return {stratum: int(self._core.seen(slot)) for slot, stratum in enumerate(self._strata)}

    @property
    def capacities(self) -> dict[Hashable, int]:
        return dict(self._capacities)

    def __repr__(self) -> str:
        return f"StratifiedReservoir({self._capacities!r}, seed={self.seed})"

    # -- pickling (shards in other processes) -------------------------------------------------
    def __getstate__(self) -> dict[str, Any]:
        samples = [self._core.sample(slot) for slot in range(len(self._strata))]
        return {
            "capacities": self._capacities,
            "seed": self.seed,
            "threads": self.threads,
            "unsigned_ids": self._unsigned_ids,
            "samples": samples,
            "seen": [int(self._core.seen(slot)) for slot in range(len(self._strata))],
        }

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["capacities"], seed=state["seed"], threads=state["threads"])
        self._unsigned_ids = bool(state["unsigned_ids"])
        for slot, ((keys, hashes, ids), seen) in enumerate(zip(state["samples"], state["seen"])):
            self._core.load(slot, keys, hashes, ids, seen)
