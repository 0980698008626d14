"""atheris target: mlmix.StratifiedReservoir on arbitrary strata, ids, weights and capacities.

Beyond "no crash": an accepted stream gives the same sample whatever its batching and thread count,
and when split over two reservoirs that are merged; each stratum's sample has at most its capacity,
holds only ids offered to it, never an id of weight 0, and round-trips through pickle.
"""

import pickle

import atheris
import numpy as np

from _common import CLEAN, main
import mlmix

STRATA = [0, 1, 2, -1, 2**63 - 1, 2**64 - 1, "en", "sw", "", "\udcff", "zh-Hant"]
WEIGHTS = [1.0, 0.0, 0.5, 1e-300, 1e300, float("inf"), float("nan"), -1.0, 2.0, 5e-324]


def build(caps, seed, strata, ids, weights, cuts, threads):
    r = mlmix.StratifiedReservoir(caps, seed=seed, threads=threads)
    lo = 0
    for hi in [*cuts, len(ids)]:
        r.add(strata[lo:hi], ids[lo:hi], None if weights is None else weights[lo:hi])
        lo = hi
    return r


def TestOneInput(data: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(data)
    k = fdp.ConsumeIntInRange(1, 4)
    names = [fdp.PickValueInList(STRATA) for _ in range(k)]
    caps = {s: fdp.ConsumeIntInRange(-1, 6) for s in names}
    seed = fdp.PickValueInList([0, 1, 2**64 - 1, -1, 2**64, 12345])
    n = fdp.ConsumeIntInRange(0, 200)
    strata_pool = names + [fdp.PickValueInList(STRATA)]
    strata = [strata_pool[fdp.ConsumeIntInRange(0, len(strata_pool) - 1)] for _ in range(n)]
    ids = np.array([fdp.ConsumeIntInRange(0, 30) if fdp.ConsumeBool() else fdp.ConsumeIntInRange(0, 2**64 - 1)
                    for _ in range(n)], dtype=np.uint64)
    weights = None
    if fdp.ConsumeBool():
        weights = np.array([fdp.PickValueInList(WEIGHTS) for _ in range(n)], dtype=np.float64)
    cuts = sorted(fdp.ConsumeIntInRange(0, n) for _ in range(fdp.ConsumeIntInRange(0, 3)))
    if all(isinstance(s, int) for s in strata) and fdp.ConsumeBool():
        try:  # both signs and 2**64-1 fit no numpy integer type: then the list stays a list
            strata = np.array(strata, dtype=np.int64 if min(strata, default=0) < 0 else np.uint64)
        except OverflowError:
            pass
    try:
        ref = build(caps, seed, strata, ids, weights, [], 1)
    except CLEAN:
        return
    result = ref.result()
    offered: dict = {}
    for s, i, w in zip(list(strata), ids.tolist(), [1.0] * n if weights is None else weights.tolist()):
        offered.setdefault(s.item() if hasattr(s, "item") else s, {}).setdefault(i, []).append(w)
    for s, got in result.items():
        assert got.shape[0] <= caps[s], f"stratum {s!r}: {got.shape[0]} ids over capacity {caps[s]}"
        assert len(set(got.tolist())) == got.shape[0], f"stratum {s!r}: repeated ids"
        for i in got.tolist():
            assert i in offered.get(s, {}), f"stratum {s!r}: id {i} never offered"
            assert max(offered[s][i]) > 0, f"stratum {s!r}: id {i} of weight 0 sampled"
    other = build(caps, seed, strata, ids, weights, cuts, 2)
    assert _same(other.result(), result), "batching or threads changed the sample"
    if n:
        half = fdp.ConsumeIntInRange(0, n)
        a = build(caps, seed, strata[:half], ids[:half], None if weights is None else weights[:half], [], 1)
        b = build(caps, seed, strata[half:], ids[half:], None if weights is None else weights[half:], [], 1)
        assert _same(a.merge(b).result(), result), "merging shards changed the sample"
    assert _same(pickle.loads(pickle.dumps(ref)).result(), result), "pickle changed the sample"


def _same(x: dict, y: dict) -> bool:
    return x.keys() == y.keys() and all(np.array_equal(x[k], y[k]) for k in x)


if __name__ == "__main__":
    main(TestOneInput)
