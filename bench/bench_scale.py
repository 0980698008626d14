"""Scale runs: plan the packing of 100M examples, sample 100M items, dedup 10M documents.

Each run is a separate process (peak RSS is the process's own), so the figures do not mix. Reported
per run: wall time of the operation, peak RSS, RSS once the input exists, and their difference (what
the operation itself needed), plus the input's own size for scale.

    pytest bench/bench_scale.py                      # quick sizes: 1M examples, 1M items, 100k documents
    MLMIX_BENCH_FULL=1 pytest bench/bench_scale.py   # the issue's sizes: 100M, 100M, 10M
    python bench/bench_scale.py pack 100000000       # one run, prints its JSON line

The tools users would otherwise pick (TRL's packing, heapq reservoirs, datasketch MinHash LSH) are
compared side by side at sizes they can run in bench_pack.py, bench_sample.py and bench_dedup.py;
at these sizes they take hours or do not fit, so this file measures mlmix alone against its input.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import time

import numpy as np
import pytest

FULL = os.environ.get("MLMIX_BENCH_FULL") == "1"
SIZES = {"pack": 100_000_000, "sample": 100_000_000, "dedup": 10_000_000} if FULL else {
    "pack": 1_000_000, "sample": 1_000_000, "dedup": 100_000}
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _rss_gb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**30


def _peak_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def run_pack(n: int) -> dict:
    import mlmix

    rng = np.random.default_rng(0)
    # instruction-data-like lengths: log-normal around ~400 tokens, clipped to the row length
    lengths = np.clip(rng.lognormal(6.0, 1.0, size=n), 1, 4096).astype(np.int64)
    base = _rss_gb()
    t0 = time.perf_counter()
    plan = mlmix.pack(lengths, 4096, seed=0)
    seconds = time.perf_counter() - t0
    return {"seconds": seconds, "rss_input_gb": base, "input_gb": lengths.nbytes / 2**30,
            "rows": plan.num_sequences, "efficiency": plan.efficiency, "examples_per_s": n / seconds}


def run_sample(n: int) -> dict:
    import mlmix

    langs = ["en", "zh", "es", "ru", "ar", "hi", "sw", "fi", "et", "he", "cs", "it"]
    rng = np.random.default_rng(0)
    base = _rss_gb()
    r = mlmix.StratifiedReservoir({lang: 100_000 for lang in range(len(langs))}, seed=0)
    chunk = 10_000_000
    t0 = time.perf_counter()
    gen = 0.0
    for lo in range(0, n, chunk):
        g0 = time.perf_counter()
        m = min(chunk, n - lo)
        strata = rng.integers(0, len(langs), size=m).astype(np.uint16)
        ids = np.arange(lo, lo + m, dtype=np.uint64)
        gen += time.perf_counter() - g0
        r.add(strata, ids)
    res = r.result()
    seconds = time.perf_counter() - t0 - gen
    return {"seconds": seconds, "rss_input_gb": base, "input_gb": n * 10 / 2**30,
            "sampled": int(sum(v.shape[0] for v in res.values())), "items_per_s": n / seconds,
            "note": "input streamed in 10M-item chunks (strata uint16 + ids uint64); generation time excluded"}


def _documents(n: int):
    """n synthetic documents (60 words of 5 letters from a 50k-word vocabulary; 1 in 10 a copy of
    another with one word changed) as a pyarrow large_string array, built chunk by chunk straight
    into its data buffer (no Python strings, no large temporaries)."""
    import pyarrow as pa

    words, vocab, width = 60, 50_000, 6
    rng = np.random.default_rng(0)
    data = np.empty(n * words * width, dtype=np.uint8)
    view = data.reshape(n, words, width)
    chunk = 500_000
    for lo in range(0, n, chunk):
        hi = min(n, lo + chunk)
        ids = rng.integers(0, vocab, size=(hi - lo, words), dtype=np.int32)
        for k in range(5):
            view[lo:hi, :, 4 - k] = ord("a") + ids % 26
            ids //= 26
        view[lo:hi, :, 5] = ord(" ")
    src = rng.integers(0, n, size=n // 10)
    dst = rng.integers(0, n, size=n // 10)
    view[dst] = view[src]
    view[dst, rng.integers(0, words, size=dst.shape[0]), 0] = ord("z")
    offsets = np.arange(n + 1, dtype=np.int64) * (words * width)
    return pa.LargeStringArray.from_buffers(n, pa.py_buffer(offsets), pa.py_buffer(data))


def run_dedup(n: int) -> dict:
    import mlmix.dedup as dd

    docs = _documents(n)
    base = _rss_gb()
    # CPU seconds (all threads) besides wall time: on a shared machine they are the steadier figure.
    t0, c0 = time.perf_counter(), time.process_time()
    exact = dd.exact_duplicates(docs)
    t_exact, c_exact = time.perf_counter() - t0, time.process_time() - c0
    t0, c0 = time.perf_counter(), time.process_time()
    near = dd.near_duplicates(docs, threshold=0.8, num_perm=128)
    seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
    return {"seconds": seconds, "exact_seconds": t_exact, "cpu_seconds": cpu, "exact_cpu_seconds": c_exact,
            "rss_input_gb": base, "input_gb": docs.nbytes / 2**30,
            "near_removed": near.num_removed, "exact_removed": exact.num_removed, "docs_per_s": n / seconds,
            "docs_per_cpu_s": n / cpu,
            "note": "near_duplicates, num_perm=128, threshold 0.8, verified; 360-byte documents"}


RUNS = {"pack": run_pack, "sample": run_sample, "dedup": run_dedup}


def _child(kind: str, n: int) -> dict:
    env = dict(os.environ, PYTHONPATH=os.path.join(ROOT, "python") + os.pathsep + os.environ.get("PYTHONPATH", ""))
    out = subprocess.run([sys.executable, os.path.abspath(__file__), kind, str(n)], capture_output=True, text=True,
                         env=env, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"{kind} run failed:\n{out.stderr[-4000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("kind", list(RUNS))
def test_scale(benchmark, kind):
    n = SIZES[kind]
    result = benchmark.pedantic(_child, args=(kind, n), rounds=1, iterations=1)
    benchmark.extra_info.update(result)
    print(f"\n{kind} n={n:,}: {json.dumps(result)}")
    assert result["peak_rss_gb"] >= result["rss_input_gb"]


if __name__ == "__main__":
    kind, n = sys.argv[1], int(sys.argv[2])
    res = RUNS[kind](n)
    res.update(kind=kind, n=n, peak_rss_gb=_peak_gb())
    res["extra_gb"] = res["peak_rss_gb"] - res["rss_input_gb"]
    print(json.dumps(res))
