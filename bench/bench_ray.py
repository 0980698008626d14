"""The build on the Ray executor with 1 and 2 workers against the local executor with 1 and 2 workers
(``mlmix.build(engine=..., workers=...)``), on the same config and data: JSONL chat data -> langid off
(languages given) -> exact + near dedup -> Qwen tokenization with ChatML loss masks -> recipe
``temperature`` (alpha 0.3, half of the records, sampled by per-block reservoirs merged exactly on either
executor) -> packed store (seq_len 2048) in shards of 2**20 tokens
(512 rows; the default 2**28 would give one shard at these sizes), written by one Ray task per shard.

Each variant runs in its own process (imports, Ray start-up and the tokenizer load included), and every
Ray variant starts its own local cluster with ``num_cpus`` = the worker count. The local executor runs
with a cold cache. Beside the wall time, each variant reports its driver's peak RSS (the process that
called ``mlmix.build``; Ray's workers and object store are other processes). The outputs are checked
equal byte for byte after the runs (store, mixture, and build.json apart from its "engine").

    pytest bench/bench_ray.py                      # ~4 MB of multilingual chat JSONL (quick)
    MLMIX_BENCH_FULL=1 pytest bench/bench_ray.py   # ~40 MB
    python bench/bench_ray.py [--mb 24]            # prints a table

The per-stage seconds in ``extra_info`` are what docs/ray.md's capacity plan scales from.
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
FULL = os.environ.get("MLMIX_BENCH_FULL") == "1"
DEFAULT_MB = 40 if FULL else 4

_CHILD = r"""
import json, resource, sys, time
import mlmix
cfg, engine, workers = json.loads(sys.argv[1]), sys.argv[2], int(sys.argv[3])
import mlmix.store
mlmix.store.SHARD_TOKENS = 1 << 20  # several shards at benchmark sizes
t = time.perf_counter()
if engine == "local":
    s = mlmix.build(cfg, quiet=True, use_cache=False, workers=workers)
else:
    s = mlmix.build(cfg, engine="ray", quiet=True, num_cpus=workers, concurrency=workers)
wall = time.perf_counter() - t
rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
print(json.dumps({"wall": wall, "records": s["stages"]["read"]["records"], "tokens": s["tokens"],
                  "timings": s["timings"], "driver_peak_rss_mb": rss}))
"""


def _config(tmp: str, data: str, name: str, records: int) -> dict:
    return {"output": os.path.join(tmp, name, "out"), "cache_dir": os.path.join(tmp, name, "cache"),
            "sources": [{"path": data}], "langid": {"backend": "none"},
            "dedup": {"exact": True, "near": True, "threshold": 0.8},
            "mixture": {"recipe": "temperature", "alpha": 0.3, "total": records // 2, "on_shortfall": "take_all"},
            "tokenizer": {"name": "qwen", "template": "chatml"}, "pack": {"seq_len": 2048, "overlong": "truncate"},
            "report": False}


VARIANTS = (("local", 1), ("local", 2), ("ray", 1), ("ray", 2))


def run_variant(tmp: str, data: str, engine: str, workers: int, records: int) -> dict:
    name = f"{engine}-{workers}"
    env = dict(os.environ, RAY_DEDUP_LOGS="0", PYTHONPATH=os.pathsep.join(
        [os.path.join(ROOT, "python"), os.environ.get("PYTHONPATH", "")]))
    env.pop("RAY_ADDRESS", None)
    out = subprocess.run([sys.executable, "-c", _CHILD, json.dumps(_config(tmp, data, name, records)), engine, str(workers)],
                         capture_output=True, text=True, env=env, timeout=3600, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"{name} failed:\n{out.stderr[-4000:]}")
    res = json.loads(out.stdout.strip().splitlines()[-1])
    res["output"] = os.path.join(tmp, name, "out")
    return res


def _output_bytes(out: str) -> dict:
    """Every file of the packed store (shards included), the mixture manifest, and build.json without its
    "engine" and output path (each variant writes its own output)."""
    files = {}
    for p in sorted(glob.glob(os.path.join(out, "store", "*")) + glob.glob(os.path.join(out, "mixture.json"))):
        with open(p, "rb") as f:
            files[os.path.basename(p)] = f.read()
    with open(os.path.join(out, "build.json"), encoding="utf-8") as f:
        b = json.load(f)
    for k in ("engine", "output", "store", "config"):
        b.pop(k)
    files["build.json"] = json.dumps(b, sort_keys=True)
    return files


def run_all(mb: float) -> dict:
    sys.path.insert(0, HERE)
    from bench_pipeline import make_data

    tmp = tempfile.mkdtemp(prefix="mlmix-bench-ray-")
    data = os.path.join(tmp, "data.jsonl")
    info = make_data(data, mb)
    results = {"data": info}
    try:
        for engine, workers in VARIANTS:
            results[f"{engine}-{workers}"] = run_variant(tmp, data, engine, workers, info["records"])
        ref = _output_bytes(results["local-1"]["output"])
        results["identical"] = all(_output_bytes(results[f"{e}-{w}"]["output"]) == ref for e, w in VARIANTS)
        results["shards"] = len(glob.glob(os.path.join(results["local-1"]["output"], "store", "tokens*.bin")))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return results


@pytest.fixture(scope="module")
def results():
    return run_all(DEFAULT_MB)


@pytest.mark.parametrize("variant", [f"{e}-{w}" for e, w in VARIANTS])
def test_throughput(benchmark, results, variant):
    r = results[variant]
    n = results["data"]["records"]
    benchmark.pedantic(lambda: time.sleep(0), rounds=1, iterations=1)  # the run itself happened in a child
    benchmark.extra_info.update({
        "records": n, "mb": results["data"]["bytes"] / 1e6, "wall_s": r["wall"], "records_per_s": n / r["wall"],
        "vs_local_1": results["local-1"]["wall"] / r["wall"], "driver_peak_rss_mb": r["driver_peak_rss_mb"],
        "stage_seconds": {k: v["seconds"] for k, v in r["timings"].items()},
        "identical_store": results["identical"], "shards": results["shards"]})
    assert results["identical"]


def main() -> None:
    mb = float(sys.argv[sys.argv.index("--mb") + 1]) if "--mb" in sys.argv else DEFAULT_MB
    res = run_all(mb)
    n = res["data"]["records"]
    print(f"{n:,} records, {res['data']['bytes'] / 1e6:.1f} MB; outputs ({res['shards']} shards) "
          f"identical: {res['identical']}")
    print(f"{'variant':<10} {'wall s':>8} {'rec/s':>9} {'x local-1':>9} {'driver MB':>10}  stages (s)")
    for e, w in VARIANTS:
        r = res[f"{e}-{w}"]
        stages = " ".join(f"{s}={v['seconds']:.1f}" for s, v in r["timings"].items())
        print(f"{e}-{w:<4} {r['wall']:>8.1f} {n / r['wall']:>9.0f} {res['local-1']['wall'] / r['wall']:>9.2f} "
              f"{r['driver_peak_rss_mb']:>10.0f}  {stages}")


if __name__ == "__main__":
    main()
