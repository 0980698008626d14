"""Packing throughput and efficiency: mlmix vs TRL's ``pack_dataset`` on the same SFT-like examples.

    pytest bench/bench_pack.py                      # quick: ~4M tokens, 1M-example plan
    MLMIX_BENCH_FULL=1 pytest bench/bench_pack.py   # the issue's sizes: ~19M tokens, 10M-example plan

Examples have uniform lengths in [64, 3000] tokens. mlmix is timed for plan + materialise of
input_ids, labels and position_ids (TRL emits input_ids and seq_lengths only). Efficiency is real
tokens / (sequences x seq_len), beside the bound ceil(tokens / seq_len). Over-long examples are
truncated by both (TRL's "bfd" does so; mlmix overlong="truncate").
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest

import mlmix
from mlmix import Ragged

FULL = os.environ.get("MLMIX_BENCH_FULL") == "1"
TOTAL_TOKENS = 19_000_000 if FULL else 4_000_000
PLAN_EXAMPLES = 10_000_000 if FULL else 1_000_000
ROUNDS = 3


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(0)
    n = TOTAL_TOKENS // ((64 + 3000) // 2)
    lengths = rng.integers(64, 3001, size=n)
    tokens = Ragged.from_lengths(rng.integers(0, 151_643, size=int(lengths.sum()), dtype=np.uint32), lengths)
    return tokens


@pytest.fixture(scope="module")
def trl_dataset(data):
    pa = pytest.importorskip("pyarrow")
    datasets = pytest.importorskip("datasets")
    column = pa.ListArray.from_arrays(pa.array(data.offsets.astype(np.int32)), pa.array(data.values))
    return datasets.Dataset(pa.table({"input_ids": column}))


def best_of(fn, rounds=ROUNDS):
    best, out = float("inf"), None
    for _ in range(rounds):
        t = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t)
    return best, out


def trl_pack(dataset, seq_len, strategy):
    from trl.data_utils import pack_dataset

    packed = pack_dataset(dataset, seq_len, strategy=strategy)
    return packed


@pytest.mark.parametrize("seq_len", [2048, 8192])
@pytest.mark.parametrize("strategy", ["bfd", "wrapped"])
def test_pack_vs_trl(benchmark, data, trl_dataset, seq_len, strategy):
    pytest.importorskip("trl")
    overlong = "truncate"

    def run_mlmix():
        plan = mlmix.pack(data, seq_len, strategy=strategy, overlong=overlong)
        rows = plan.materialize(data)
        return plan, rows

    plan, rows = benchmark.pedantic(run_mlmix, rounds=ROUNDS, iterations=1)
    del rows
    t_mlmix = benchmark.stats.stats.min
    t_plan, _ = best_of(lambda: mlmix.pack(data, seq_len, strategy=strategy, overlong=overlong))
    t_trl, packed = best_of(lambda: trl_pack(trl_dataset, seq_len, strategy))

    kept = int(np.minimum(data.lengths, seq_len).sum()) if strategy == "bfd" else int(data.lengths.sum())
    bound = -(-kept // seq_len)
    trl_rows = len(packed)
    import pyarrow.compute as pc

    trl_tokens = int(pc.sum(pc.list_value_length(packed.data.column("input_ids"))).as_py())
    info = {
        "examples": len(data),
        "tokens": kept,
        "seq_len": seq_len,
        "mlmix_s": t_mlmix,
        "mlmix_plan_s": t_plan,
        "trl_s": t_trl,
        "speedup_vs_trl": t_trl / t_mlmix,
        "mlmix_tokens_per_s": kept / t_mlmix,
        "trl_tokens_per_s": trl_tokens / t_trl,
        "mlmix_examples_per_s": len(data) / t_mlmix,
        "trl_examples_per_s": len(data) / t_trl,
        "mlmix_sequences": plan.num_sequences,
        "trl_sequences": trl_rows,
        "lower_bound_sequences": bound,
        "mlmix_efficiency": plan.efficiency,
        "trl_efficiency": trl_tokens / (trl_rows * seq_len),
        "bound_efficiency": kept / (bound * seq_len),
    }
    benchmark.extra_info.update(info)
    print(
        f"\n[{strategy} @ {seq_len}] {len(data):,} examples, {kept:,} tokens | mlmix {t_mlmix * 1e3:.1f} ms "
        f"(plan {t_plan * 1e3:.1f} ms, {kept / t_mlmix / 1e6:.0f} M tok/s, eff {plan.efficiency:.4%}) | "
        f"TRL {t_trl * 1e3:.1f} ms ({trl_tokens / t_trl / 1e6:.0f} M tok/s, eff {info['trl_efficiency']:.4%}) | "
        f"bound eff {info['bound_efficiency']:.4%} | speedup x{info['speedup_vs_trl']:.2f}"
    )


_PLAN_SCRIPT = """
import json, sys, time
import numpy as np
import mlmix

def hwm_mb():  # peak resident set of this process (ru_maxrss would include the forking parent's)
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) for l in f if l.startswith("VmHWM")) / 1024

n = int(sys.argv[1])
lengths = np.random.default_rng(0).integers(64, 3001, size=n)
base = hwm_mb()
t = time.perf_counter()
plan = mlmix.pack(lengths, 8192, strategy=sys.argv[2])
dt = time.perf_counter() - t
peak = hwm_mb()
print(json.dumps({"seconds": dt, "peak_rss_mb": peak, "rss_before_mb": base,
                  "sequences": plan.num_sequences, "efficiency": plan.efficiency}))
"""


@pytest.mark.parametrize("strategy", ["bfd", "ffd"])
def test_plan_many_examples(benchmark, strategy):
    """Plan PLAN_EXAMPLES examples in a fresh process: time and peak resident memory (whole process)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([os.path.join(os.path.dirname(__file__), "..", "python"), env.get("PYTHONPATH", "")])

    def run():
        out = subprocess.run([sys.executable, "-c", _PLAN_SCRIPT, str(PLAN_EXAMPLES), strategy],
                             check=True, capture_output=True, text=True, env=env)
        return json.loads(out.stdout)

    res = benchmark.pedantic(run, rounds=1, iterations=1)
    benchmark.extra_info.update(res, examples=PLAN_EXAMPLES)
    print(f"\n[plan {strategy}] {PLAN_EXAMPLES:,} examples @ 8192: {res['seconds']:.2f} s, "
          f"peak RSS {res['peak_rss_mb']:.0f} MB (before planning {res['rss_before_mb']:.0f} MB), "
          f"efficiency {res['efficiency']:.4%}")
