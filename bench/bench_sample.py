"""Stratified sampling throughput: mlmix's StratifiedReservoir vs a Python heapq Efraimidis-Spirakis
reservoir and HF ``datasets.interleave_datasets`` with probabilities, on the same stream.

    pytest bench/bench_sample.py                      # quick: 12M items, 12 strata, 12k per stratum
    MLMIX_BENCH_FULL=1 pytest bench/bench_sample.py   # the issue's sizes: 100M items, 100k per stratum

The stream: item ids 0..n-1 (int64) with a uniformly random stratum in 0..11 (uint8): 9 bytes per
item. Every variant keeps a sample of CAPACITY per stratum. The Python heapq version runs on a
prefix (with the sample size scaled down alike) and is compared per item; HF interleave_datasets draws the same total
sample size from 12 per-stratum datasets (a different kind of sampler: with its probabilities it
emits a stream, not a reservoir) and is compared per item read. Peak memory of mlmix is measured in
child processes on streams of two lengths to show that it does not grow with the stream.

On a shared, loaded machine add ``--benchmark-timer=time.process_time`` (CPU time; every variant here
but test_mlmix_threads runs on one thread, so CPU time is its single-core time).
"""

from __future__ import annotations

import heapq
import json
import math
import os
import random
import subprocess
import sys
import time

import mlmix
import numpy as np
import pytest

FULL = os.environ.get("MLMIX_BENCH_FULL") == "1"
N_ITEMS = 100_000_000 if FULL else 12_000_000
N_STRATA = 12
# keep the full run's ratio of stream length to sample size (~83 items per kept item per stratum)
CAPACITY = 100_000 if FULL else 12_000
PY_PREFIX = 2_000_000 if FULL else 600_000
HF_PER_STRATUM = 200_000 if FULL else 50_000
ROUNDS = 3


@pytest.fixture(scope="module")
def stream():
    rng = np.random.default_rng(0)
    strata = rng.integers(0, N_STRATA, N_ITEMS, dtype=np.uint8)
    ids = np.arange(N_ITEMS, dtype=np.int64)
    return strata, ids


def best_of(fn, timer, rounds=ROUNDS):
    best = float("inf")
    for _ in range(rounds):
        t = timer()
        fn()
        best = min(best, timer() - t)
    return best


def mlmix_sample(strata, ids, weights=None, threads=1):
    r = mlmix.StratifiedReservoir({s: CAPACITY for s in range(N_STRATA)}, seed=0, threads=threads)
    r.add(strata, ids, weights)
    return r.result()


@pytest.fixture(scope="module")
def mlmix_rate(stream, request):
    """mlmix's one-core items/s, timed with the benchmark's timer (--benchmark-timer)."""
    name = str(request.config.getoption("benchmark_timer", None) or "time.perf_counter")
    timer = time.process_time if name.endswith("process_time") else time.perf_counter
    strata, ids = stream
    return N_ITEMS / best_of(lambda: mlmix_sample(strata, ids), timer)


@pytest.mark.parametrize("weighted", [False, True])
def test_mlmix_one_core(benchmark, stream, weighted):
    strata, ids = stream
    weights = np.random.default_rng(1).random(N_ITEMS) + 0.01 if weighted else None
    benchmark.pedantic(lambda: mlmix_sample(strata, ids, weights), rounds=ROUNDS, iterations=1)
    rate = N_ITEMS / benchmark.stats.stats.min
    benchmark.extra_info.update(items=N_ITEMS, strata=N_STRATA, capacity=CAPACITY, items_per_s=rate)
    print(f"\nmlmix {'weighted' if weighted else 'uniform'} 1 core: {rate / 1e6:.0f}M items/s")


def test_mlmix_threads(benchmark, stream, mlmix_rate):
    strata, ids = stream
    benchmark.pedantic(lambda: mlmix_sample(strata, ids, threads=0), rounds=ROUNDS, iterations=1)
    rate = N_ITEMS / benchmark.stats.stats.min
    benchmark.extra_info.update(items_per_s=rate, speedup_vs_one_core=rate / mlmix_rate, threads=os.cpu_count())


def python_heapq_es(strata, ids, weights, capacity, seed=0):
    """Efraimidis-Spirakis A-Res per stratum with heapq: keep the largest u ** (1 / w)."""
    rnd = random.Random(seed)
    heaps: dict[int, list] = {}
    for s, i, w in zip(strata, ids, weights):
        key = math.log(rnd.random() or 1e-300) / w  # log(u ** (1/w)): larger is better
        h = heaps.setdefault(s, [])
        if len(h) < capacity:
            heapq.heappush(h, (key, i))
        elif key > h[0][0]:
            heapq.heapreplace(h, (key, i))
    return {s: [i for _, i in h] for s, h in heaps.items()}


def test_python_heapq_es(benchmark, stream, mlmix_rate):
    strata, ids = stream
    s, i = strata[:PY_PREFIX].tolist(), ids[:PY_PREFIX].tolist()
    w = [1.0] * PY_PREFIX
    # the prefix keeps the stream's ratio of items to sample size, so that the share of items that
    # enter a heap (the expensive ones) is the same as on the whole stream
    capacity = max(1, CAPACITY * PY_PREFIX // N_ITEMS)
    benchmark.pedantic(lambda: python_heapq_es(s, i, w, capacity), rounds=1, iterations=1)
    rate = PY_PREFIX / benchmark.stats.stats.min
    benchmark.extra_info.update(items=PY_PREFIX, items_per_s=rate, mlmix_items_per_s=mlmix_rate,
                                mlmix_speedup=mlmix_rate / rate)
    print(f"\npython heapq ES: {rate / 1e6:.2f}M items/s; mlmix {mlmix_rate / rate:.0f}x faster")


def test_hf_interleave_datasets(benchmark, stream, mlmix_rate):
    datasets = pytest.importorskip("datasets")
    datasets.disable_progress_bars()
    strata, ids = stream
    parts = []
    for s in range(N_STRATA):
        part_ids = ids[strata == s][:HF_PER_STRATUM]
        parts.append(datasets.Dataset.from_dict({"id": part_ids, "lang": np.full(len(part_ids), s)}))
    n_read = sum(len(p) for p in parts)
    want = N_STRATA * min(CAPACITY, HF_PER_STRATUM)

    def run():
        mixed = datasets.interleave_datasets(
            parts, probabilities=[1 / N_STRATA] * N_STRATA, seed=0, stopping_strategy="first_exhausted"
        )
        return mixed.select(range(min(want, len(mixed))))["id"]

    benchmark.pedantic(run, rounds=1, iterations=1)
    rate = n_read / benchmark.stats.stats.min
    benchmark.extra_info.update(items=n_read, items_per_s=rate, mlmix_items_per_s=mlmix_rate,
                                mlmix_speedup=mlmix_rate / rate)
    print(f"\nHF interleave_datasets: {rate / 1e6:.2f}M items/s; mlmix {mlmix_rate / rate:.0f}x faster")


_CHILD = r"""
import json, sys
import numpy as np
import mlmix
n, chunk, cap = int(sys.argv[1]), 1_000_000, int(sys.argv[2])
r = mlmix.StratifiedReservoir({s: cap for s in range(12)}, seed=0)
rng = np.random.default_rng(0)
for start in range(0, n, chunk):   # the stream is generated chunk by chunk, never held whole
    m = min(chunk, n - start)
    r.add(rng.integers(0, 12, m, dtype=np.uint8), np.arange(start, start + m, dtype=np.int64))
r.result()
# VmHWM: this process's own peak (ru_maxrss can carry the forking parent's peak)
hwm_kb = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM:"))
print(json.dumps({"maxrss_mb": hwm_kb / 1024}))
"""


def _peak_rss_mb(n_items: int) -> float:
    env = dict(os.environ)
    out = subprocess.run([sys.executable, "-c", _CHILD, str(n_items), str(CAPACITY)], capture_output=True,
                         text=True, check=True, env=env)
    return json.loads(out.stdout)["maxrss_mb"]


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="reads VmHWM from /proc")
def test_memory_independent_of_stream_length(benchmark):
    short, long = N_ITEMS // 4, N_ITEMS
    rss_empty = _peak_rss_mb(0)
    rss_short = _peak_rss_mb(short)
    rss_long = benchmark.pedantic(lambda: _peak_rss_mb(long), rounds=1, iterations=1)
    benchmark.extra_info.update(peak_rss_mb_no_items=rss_empty, peak_rss_mb_short=rss_short,
                                peak_rss_mb_long=rss_long, items_short=short, items_long=long)
    print(f"\npeak RSS: no items {rss_empty:.0f} MB, {short:,} items {rss_short:.0f} MB, "
          f"{long:,} items {rss_long:.0f} MB (1M-item chunks)")
