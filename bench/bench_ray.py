"""The pipeline on Ray Data with 1 and 2 workers against the single-machine engine (``mlmix.build``), on the
same config and data: JSONL chat data -> langid off (languages given) -> exact + near dedup -> Qwen
tokenization with ChatML loss masks -> recipe ``temperature`` (alpha 0.3, half of the records: the Ray
engine samples it by per-block reservoirs) -> packed store (seq_len 2048) in shards of 2**20 tokens
(512 rows; the default 2**28 would give one shard at these sizes), written by one Ray task per shard.

Each variant runs in its own process (imports, Ray start-up and the tokenizer load included), and every
Ray variant starts its own local cluster with ``num_cpus`` = the worker count. The single-machine engine
runs with a cold cache. The stores are checked equal byte for byte after the runs.

    pytest bench/bench_ray.py                      # ~4 MB of multilingual chat JSONL (quick)
    MLMIX_BENCH_FULL=1 pytest bench/bench_ray.py   # ~40 MB
    python bench/bench_ray.py [--mb 4]             # prints a table

The per-stage seconds in ``extra_info`` (single-machine ``timings``) are what docs/ray.md's capacity
plan scales from.
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
import json, sys, time
import mlmix
cfg, engine, workers = json.loads(sys.argv[1]), sys.argv[2], int(sys.argv[3])
import mlmix.store
mlmix.store.SHARD_TOKENS = 1 << 20  # several shards at benchmark sizes
t = time.perf_counter()
if engine == "single":
    s = mlmix.build(cfg, quiet=True, use_cache=False)
else:
    from mlmix.ray_engine import build_ray
    s = build_ray(cfg, quiet=True, num_cpus=workers, concurrency=workers)
wall = time.perf_counter() - t
print(json.dumps({"wall": wall, "records": s["stages"]["read"]["records"] if "read" in s["stages"] else None,
                  "tokens": s["tokens"], "timings": s["timings"]}))
"""


def _config(tmp: str, data: str, name: str, records: int) -> dict:
    return {"output": os.path.join(tmp, name, "out"), "cache_dir": os.path.join(tmp, name, "cache"),
            "sources": [{"path": data}], "langid": {"backend": "none"},
            "dedup": {"exact": True, "near": True, "threshold": 0.8},
            "mixture": {"recipe": "temperature", "alpha": 0.3, "total": records // 2, "on_shortfall": "take_all"},
            "tokenizer": {"name": "qwen", "template": "chatml"}, "pack": {"seq_len": 2048, "overlong": "truncate"},
            "report": False}


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


def _store_bytes(out: str) -> dict:
    """Every file of the packed store (shards included) and the mixture manifest."""
    files = {}
    for p in sorted(glob.glob(os.path.join(out, "store", "*")) + glob.glob(os.path.join(out, "mixture.json"))):
        with open(p, "rb") as f:
            files[os.path.basename(p)] = f.read()
    return files


def run_all(mb: float) -> dict:
    sys.path.insert(0, HERE)
    from bench_pipeline import make_data

    tmp = tempfile.mkdtemp(prefix="mlmix-bench-ray-")
    data = os.path.join(tmp, "data.jsonl")
    info = make_data(data, mb)
    results = {"data": info}
    try:
        for engine, workers in (("single", 1), ("ray", 1), ("ray", 2)):
            results[f"{engine}-{workers}"] = run_variant(tmp, data, engine, workers, info["records"])
        results["identical"] = all(_store_bytes(results[k]["output"]) == _store_bytes(results["single-1"]["output"])
                                   for k in ("ray-1", "ray-2"))
        results["shards"] = len(glob.glob(os.path.join(results["single-1"]["output"], "store", "tokens*.bin")))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return results


@pytest.fixture(scope="module")
def results():
    return run_all(DEFAULT_MB)


@pytest.mark.parametrize("variant", ["single-1", "ray-1", "ray-2"])
def test_throughput(benchmark, results, variant):
    r = results[variant]
    n = results["data"]["records"]
    benchmark.pedantic(lambda: time.sleep(0), rounds=1, iterations=1)  # the run itself happened in a child
    benchmark.extra_info.update({
        "records": n, "mb": results["data"]["bytes"] / 1e6, "wall_s": r["wall"], "records_per_s": n / r["wall"],
        "vs_single": results["single-1"]["wall"] / r["wall"], "stage_seconds": {k: v["seconds"] for k, v in
                                                                                r["timings"].items()},
        "identical_store": results["identical"], "shards": results["shards"]})
    assert results["identical"]


def main() -> None:
    mb = float(sys.argv[sys.argv.index("--mb") + 1]) if "--mb" in sys.argv else DEFAULT_MB
    res = run_all(mb)
    n = res["data"]["records"]
    print(f"{n:,} records, {res['data']['bytes'] / 1e6:.1f} MB; mixture and store ({res['shards']} shards) "
          f"identical: {res['identical']}")
    print(f"{'variant':<10} {'wall s':>8} {'rec/s':>9} {'x single':>9}  stages (s)")
    for k in ("single-1", "ray-1", "ray-2"):
        r = res[k]
        stages = " ".join(f"{s}={v['seconds']:.1f}" for s, v in r["timings"].items())
        print(f"{k:<10} {r['wall']:>8.1f} {n / r['wall']:>9.0f} {res['single-1']['wall'] / r['wall']:>9.2f}  {stages}")


if __name__ == "__main__":
    main()
