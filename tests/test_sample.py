"""StratifiedReservoir against a plain-Python bottom-k reference, plus its statistical behaviour."""

from __future__ import annotations

import hashlib
import math
import pickle

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from mlmix.sample import StratifiedReservoir, stratum_code

M64 = (1 << 64) - 1

# Every statistical test below rejects a correct sampler with probability at most FALSE_ALARM.
FALSE_ALARM = 1e-4
Z_FALSE_ALARM = 3.719  # one-sided standard normal quantile of 1e-4


# -- reference: the documented key, written out in plain Python ------------------------------------
def mix64(z: int) -> int:
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & M64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & M64
    return z ^ (z >> 31)


def ref_stratum_seed(seed: int, code: int) -> tuple[int, int]:
    a = mix64((seed + 0x9E3779B97F4A7C15) & M64)
    b = mix64(a ^ mix64((code + 0x632BE59BD9B4E019) & M64))
    return mix64((b + 0x8CB92BA72F3D8DD7) & M64), mix64(b ^ 0xD1B54A32D192ED03)


def ref_key(h: int, w: float) -> float:
    u = min(float(h) * 2.0**-64, 1.0 - 2.0**-53)
    return -math.log1p(-u) / w


def ref_sample(capacities, seed, strata, ids, weights=None):
    """Bottom-k of (key, hash, id) per stratum over distinct ids (each with its best key)."""
    best: dict = {s: {} for s in capacities}
    for i, (s, item) in enumerate(zip(strata, ids)):
        a, b = ref_stratum_seed(seed, stratum_code(s))
        item = int(item) & M64
        h = mix64(mix64(item ^ a) ^ b)
        w = 1.0 if weights is None else float(weights[i])
        if w == 0:
            continue
        entry = (ref_key(h, w), h, item)
        if item not in best[s] or entry < best[s][item]:
            best[s][item] = entry
    out = {}
    for s, k in capacities.items():
        entries = sorted(best[s].values())[:k]
        out[s] = np.array([e[2] for e in entries], dtype=np.uint64).view(np.int64)
    return out


def assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for s in a:
        np.testing.assert_array_equal(a[s], b[s], err_msg=f"stratum {s!r}")


# -- exactness against the reference ---------------------------------------------------------------
@settings(max_examples=40, deadline=None)
@given(
    n=st.integers(0, 300),
    caps=st.lists(st.integers(0, 40), min_size=1, max_size=5),
    seed=st.integers(0, M64),
    weighted=st.sampled_from(["no", "yes", "mixed"]),
    batch=st.integers(1, 97),
    data=st.data(),
)
def test_matches_reference(n, caps, seed, weighted, batch, data):
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1)))
    capacities = {s: k for s, k in enumerate(caps)}
    strata = rng.integers(0, len(caps), n)
    # few distinct ids so that repeats (one item, best weight) are common; negatives allowed
    ids = rng.integers(-50, 200, n)
    weights = None
    if weighted == "yes":
        weights = rng.random(n) * rng.choice([0.0, 1e-3, 1.0, 50.0], n)
    elif weighted == "mixed":  # mostly exactly 1 (the unit weight, same as no weight), some not
        weights = np.where(rng.random(n) < 0.8, 1.0, rng.random(n) * 3)
    r = StratifiedReservoir(capacities, seed=seed)
    for start in range(0, n, batch):
        end = start + batch
        w = None if weights is None else weights[start:end]
        if w is not None and np.all(w == 1.0) and start % 2 == 0:
            w = None
        r.add(strata[start:end], ids[start:end], w)
    assert_same(r.result(), ref_sample(capacities, seed, strata.tolist(), ids.tolist(), weights))


def test_string_strata_and_result_orders():
    r = StratifiedReservoir({"en": 3, "sw": 10, "fi": 0}, seed=7)
    strata = ["en", "sw", "fi"] * 30
    ids = np.arange(90)
    r.add(strata, ids)
    ref = ref_sample({"en": 3, "sw": 10, "fi": 0}, 7, strata, ids)
    assert_same(r.result(), ref)
    by_id = r.result(order="id")
    for s in ref:
        np.testing.assert_array_equal(by_id[s], np.sort(ref[s]))
    assert r.seen() == {"en": 30, "sw": 30, "fi": 30}
    assert len(r.keys()["en"]) == 3 and np.all(np.diff(r.keys()["en"]) >= 0)


def test_prefix_of_key_order_is_the_smaller_sample():
    strata = np.zeros(5000, np.int64)
    ids = np.arange(5000)
    big = StratifiedReservoir({0: 100}, seed=3).add(strata, ids).result()[0]
    small = StratifiedReservoir({0: 17}, seed=3).add(strata, ids).result()[0]
    np.testing.assert_array_equal(big[:17], small)


def test_uint64_ids_round_trip():
    ids = np.array([2**64 - 1, 2**63, 5], dtype=np.uint64)
    r = StratifiedReservoir({0: 3}, seed=1).add(np.zeros(3, np.int8), ids)
    out = r.result(order="id")[0]
    assert out.dtype == np.uint64
    np.testing.assert_array_equal(out, np.sort(ids))


def test_large_and_negative_integer_strata_use_the_general_path():
    caps = {-5: 2, 2**40: 3}
    strata = np.array([-5, 2**40] * 20)
    ids = np.arange(40)
    r = StratifiedReservoir(caps, seed=11).add(strata, ids)
    assert_same(r.result(), ref_sample(caps, 11, strata.tolist(), ids.tolist()))


# -- independence from order, batching, threads and shards ---------------------------------------
def _stream(n=300_000, n_strata=5, seed=0):
    rng = np.random.default_rng(seed)
    return rng.integers(0, n_strata, n).astype(np.int32), rng.permutation(n).astype(np.int64) * 3 + 1, rng.random(n)


@pytest.mark.parametrize("weighted", [False, True])
def test_shards_merge_bit_for_bit_and_order_and_threads_do_not_matter(weighted):
    strata, ids, w = _stream()
    caps = {0: 1000, 1: 5, 2: 0, 3: 70_000, 4: 1}
    weights = w if weighted else None
    single = StratifiedReservoir(caps, seed=5).add(strata, ids, weights)
    want = single.result()
    want_keys = single.keys()

    # shards in other processes: pickle each shard, merge in an arbitrary order
    cuts = [0, 1, 50_000, 123_457, 300_000]
    shards = []
    for a, b in zip(cuts[:-1], cuts[1:]):
        shard = StratifiedReservoir(caps, seed=5).add(strata[a:b], ids[a:b], None if w is None or not weighted else w[a:b])
        shards.append(pickle.loads(pickle.dumps(shard)))
    merged = StratifiedReservoir(caps, seed=5)
    for shard in reversed(shards):
        merged.merge(shard)
    assert_same(merged.result(), want)
    for s in caps:
        np.testing.assert_array_equal(merged.keys()[s], want_keys[s])
    assert merged.seen() == single.seen()

    perm = np.random.default_rng(1).permutation(len(ids))
    permuted = StratifiedReservoir(caps, seed=5).add(strata[perm], ids[perm], None if not weighted else w[perm])
    assert_same(permuted.result(), want)

    threaded = StratifiedReservoir(caps, seed=5, threads=3).add(strata, ids, weights)
    assert_same(threaded.result(), want)


def test_repeated_ids_count_once_with_their_largest_weight():
    # id 1 repeated with weights 0 and 1000: its 1000 counts, wherever the repeats land
    strata = np.zeros(6, np.int64)
    ids = np.array([1, 2, 3, 1, 1, 4])
    weights = np.array([0.0, 1e-9, 1e-9, 1000.0, 1e-9, 1e-9])
    for split in range(7):
        r = StratifiedReservoir({0: 1}, seed=0)
        r.add(strata[:split], ids[:split], weights[:split])
        other = StratifiedReservoir({0: 1}, seed=0).add(strata[split:], ids[split:], weights[split:])
        r.merge(other)
        assert r.result()[0].tolist() == [1]
    # unweighted: many repeats never take more than one slot
    r = StratifiedReservoir({0: 5}, seed=0).add(np.zeros(10_000, np.int64), np.arange(10_000) % 3)
    assert sorted(r.result()[0].tolist()) == [0, 1, 2]


# -- statistics -------------------------------------------------------------------------------------
def chi2_critical(df: int, alpha: float = FALSE_ALARM) -> float:
    """Upper-alpha quantile of chi-square(df) by the Wilson-Hilferty approximation (alpha = 1e-4)."""
    assert alpha == FALSE_ALARM
    z = Z_FALSE_ALARM
    return df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3


def test_uniform_inclusion_chi_square():
    # 3000 replicates as 3000 strata (keys of distinct strata are independent), each k=4 of n=25.
    n, k, reps = 25, 4, 3000
    strata = np.repeat(np.arange(reps), n)
    ids = np.tile(np.arange(n), reps)
    res = StratifiedReservoir({s: k for s in range(reps)}, seed=2024).add(strata, ids).result()
    counts = np.bincount(np.concatenate(list(res.values())), minlength=n)
    p = k / n
    # inclusion counts of fixed-size samples: covariance reps*p*(1-p)*n/(n-1)*(I - J/n), so this is chi2(n-1)
    stat = float(((counts - reps * p) ** 2).sum() / (reps * p * (1 - p) * n / (n - 1)))
    assert stat < chi2_critical(n - 1), (stat, counts)
    # the first-ranked item is uniform: a multinomial, plain Pearson chi2(n-1)
    first = np.bincount([v[0] for v in res.values()], minlength=n)
    stat_first = float(((first - reps / n) ** 2 / (reps / n)).sum())
    assert stat_first < chi2_critical(n - 1), (stat_first, first)


def test_seeds_give_different_samples():
    strata, ids = np.zeros(1000, np.int64), np.arange(1000)
    a = StratifiedReservoir({0: 50}, seed=1).add(strata, ids).result()[0]
    b = StratifiedReservoir({0: 50}, seed=2).add(strata, ids).result()[0]
    assert len(set(a.tolist()) & set(b.tolist())) < 20  # expected overlap 2.5


def _exact_inclusion(w: list[float], k: int) -> list[float]:
    """P(item i in an Efraimidis-Spirakis sample of size k), by enumerating the successive draws."""
    n = len(w)
    prob = [0.0] * n

    def rec(chosen: tuple, p: float, depth: int) -> None:
        if depth == k:
            for i in chosen:
                prob[i] += p
            return
        rest = sum(w[j] for j in range(n) if j not in chosen)
        for j in range(n):
            if j not in chosen and w[j] > 0:
                rec(chosen + (j,), p * w[j] / rest, depth + 1)

    rec((), 1.0, 0)
    return prob


@pytest.mark.parametrize("k", [1, 2, 3])
def test_weighted_inclusion_matches_theory(k):
    w = [1.0, 2.0, 3.0, 0.5, 6.0, 0.0]
    n, reps = len(w), 20_000
    strata = np.repeat(np.arange(reps), n)
    ids = np.tile(np.arange(n), reps)
    res = StratifiedReservoir({s: k for s in range(reps)}, seed=99).add(strata, ids, np.tile(w, reps)).result()
    counts = np.bincount(np.concatenate(list(res.values())), minlength=n)
    theory = _exact_inclusion(w, k)
    # each count is Binomial(reps, p_i); Bonferroni over the n items keeps the total false alarm at 1e-4
    z = 4.26  # one-sided normal quantile of 1e-4 / (2 * 6)
    for i, p in enumerate(theory):
        sigma = math.sqrt(reps * p * (1 - p))
        assert abs(counts[i] - reps * p) <= z * sigma + 1e-9, (i, counts[i], reps * p)
    assert counts[5] == 0  # weight 0 is never picked


# -- bad input --------------------------------------------------------------------------------------
@pytest.mark.parametrize("bad", [np.nan, np.inf, -1.0, -np.inf])
def test_bad_weights_name_the_argument_and_leave_state_alone(bad):
    r = StratifiedReservoir({0: 2}, seed=0).add([0, 0], [1, 2])
    before = r.result()
    with pytest.raises(ValueError, match="weights"):
        r.add([0, 0, 0], [3, 4, 5], [1.0, bad, 1.0])
    assert_same(r.result(), before)
    assert r.seen() == {0: 2}


def test_bad_input_errors():
    with pytest.raises(ValueError, match="capacities"):
        StratifiedReservoir({}, seed=0)
    with pytest.raises(ValueError, match="capacities"):
        StratifiedReservoir({"en": -1}, seed=0)
    with pytest.raises(ValueError, match="capacities"):
        StratifiedReservoir({"en": 1.5}, seed=0)
    with pytest.raises(ValueError, match="seed"):
        StratifiedReservoir({"en": 1}, seed=-1)
    with pytest.raises(TypeError, match="strata"):
        StratifiedReservoir({(1, 2): 1}, seed=0)
    r = StratifiedReservoir({"en": 1, 3: 2}, seed=0)
    with pytest.raises(ValueError, match="strata"):
        r.add(["en", "xx"], [1, 2])
    with pytest.raises(ValueError, match="strata"):
        r.add(np.array([3, 4]), [1, 2])
    with pytest.raises(ValueError, match="strata"):
        r.add(np.array([-1]), [1])
    with pytest.raises(ValueError, match="same length"):
        r.add([3, 3], [1])
    with pytest.raises(ValueError, match="weights"):
        r.add([3, 3], [1, 2], [1.0])
    with pytest.raises(TypeError, match="ids"):
        r.add([3], [1.5])
    with pytest.raises(ValueError, match="ids"):
        r.add([3], [[1]])
    with pytest.raises(ValueError, match="order"):
        r.result(order="random")
    with pytest.raises(ValueError, match="seeds"):
        r.merge(StratifiedReservoir({"en": 1, 3: 2}, seed=1))
    with pytest.raises(ValueError, match="capacities"):
        r.merge(StratifiedReservoir({"en": 1, 3: 3}, seed=0))
    with pytest.raises(TypeError, match="other"):
        r.merge({"en": 1})
    assert r.seen() == {"en": 0, 3: 0}


def test_stratum_codes_are_stable():
    digest = hashlib.blake2b(b"en", digest_size=8, person=b"mlmix-stratum").digest()
    assert stratum_code("en") == int.from_bytes(digest, "little")
    assert stratum_code(-1) == M64 and stratum_code(np.int16(7)) == 7


def test_unit_weights_are_the_same_as_no_weights():
    strata, ids, _ = _stream(50_000, 3, seed=4)
    caps = {0: 100, 1: 7, 2: 3000}
    plain = StratifiedReservoir(caps, seed=8).add(strata, ids)
    ones = StratifiedReservoir(caps, seed=8).add(strata, ids, np.ones(len(ids)))
    assert_same(plain.result(), ones.result())
    for s in caps:
        np.testing.assert_array_equal(plain.keys()[s], ones.keys()[s])


def test_concurrent_python_threads_on_one_reservoir():
    import threading

    strata, ids, _ = _stream(400_000, 4, seed=6)
    caps = {s: 500 for s in range(4)}
    want = StratifiedReservoir(caps, seed=2).add(strata, ids).result()
    shared = StratifiedReservoir(caps, seed=2)
    other = StratifiedReservoir(caps, seed=2)
    chunks = np.array_split(np.arange(len(ids)), 8)

    def work(part):
        for c in part:
            shared.add(strata[c], ids[c])
            shared.result()

    workers = [threading.Thread(target=work, args=(chunks[i::2],)) for i in range(2)]
    workers.append(threading.Thread(target=lambda: [other.merge(shared) for _ in range(5)]))
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    assert_same(shared.result(), want)


# ---- keyed BLAKE2b of strings (the seeded orders of string source ids) ----------------------------
def _blake2b64(key: bytes, prefix: bytes, strings: list[bytes]) -> list[int]:
    from mlmix._core_loader import core

    offsets = np.zeros(len(strings) + 1, dtype=np.int64)
    offsets[1:] = np.cumsum([len(s) for s in strings])
    values = np.frombuffer(b"".join(strings), dtype=np.uint8)
    return core._sample_blake2b64(key, prefix, values, offsets).tolist()


# lengths around the 128-byte block (the key block comes first, the last block is zero-padded)
_BLOCK_EDGE = st.sampled_from([0, 1, 7, 8, 111, 112, 127, 128, 129, 255, 256, 257, 400])


@settings(max_examples=200, deadline=None)
@given(key=st.binary(min_size=8, max_size=8), prefix=st.one_of(st.binary(max_size=300), _BLOCK_EDGE.map(bytes)),
       strings=st.lists(st.one_of(st.binary(max_size=300), _BLOCK_EDGE.map(lambda n: b"\xab" * n)), max_size=6))
def test_blake2b64_equals_hashlib(key, prefix, strings):
    want = [int.from_bytes(hashlib.blake2b(prefix + s, digest_size=8, key=key).digest(), "little") for s in strings]
    assert _blake2b64(key, prefix, strings) == want


def test_blake2b64_bad_arguments():
    from mlmix._core_loader import core

    v = np.frombuffer(b"abcdef", dtype=np.uint8)
    with pytest.raises(ValueError, match="key must be 8 bytes, got 7"):
        core._sample_blake2b64(b"1234567", b"", v, np.array([0, 6], dtype=np.int64))
    with pytest.raises(ValueError, match=r"offsets must lie in \[0, len\(values\)\] = \[0, 6\], got 0 .. 7"):
        core._sample_blake2b64(b"12345678", b"", v, np.array([0, 7], dtype=np.int64))
    with pytest.raises(ValueError, match=r"nondecreasing, got offsets\[1\] = 4 > offsets\[2\] = 2"):
        core._sample_blake2b64(b"12345678", b"", v, np.array([0, 4, 2, 6], dtype=np.int64))
    with pytest.raises(ValueError, match="at least one entry"):
        core._sample_blake2b64(b"12345678", b"", v, np.zeros(0, dtype=np.int64))
    with pytest.raises(ValueError, match="values has dtype int32"):
        core._sample_blake2b64(b"12345678", b"", v.astype(np.int32), np.array([0, 6], dtype=np.int64))
    assert core._sample_blake2b64(b"12345678", b"", v, np.array([0], dtype=np.int64)).shape == (0,)
