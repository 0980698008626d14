"""The build's per-block steps against what they replaced, side by side in one process on the same block:

* ``RecordBlock.take`` of a content column: the C++ gather (``core._take_strings``) vs the numpy per-byte index;
* a block's stage-cache file: RecordBlock's own file (``save`` / ``load``) vs ``.npz``;
* exact dedup hashes of a block: its text column read in place vs a decoded ``str`` per record;
* a kept tokenizer: the compiled spec (``bpe.compile_spec``: arrays) vs the ByteLevel strings, unpickled and built.

``python bench/bench_build_parts.py [--mb 16]`` (best of 5; the text is bench_pipeline's multilingual chat set)
or ``pytest bench/bench_build_parts.py`` (the same rows, ratios in extra_info).
"""

from __future__ import annotations

import argparse
import os
import pickle
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(__file__))
from bench_pipeline import make_data  # noqa: E402


def _best(fn, n: int = 5) -> float:
    out = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return min(out)


def _numpy_take_strings(values, offsets, rows):
    """What RecordBlock.take did before: an int64 index per byte."""
    lo, hi = offsets[rows], offsets[rows + 1]
    lens = hi - lo
    out_off = np.zeros(len(rows) + 1, np.int64)
    np.cumsum(lens, out=out_off[1:])
    gather = np.repeat(lo - out_off[:-1], lens) + np.arange(int(out_off[-1]), dtype=np.int64)
    return values[gather], out_off


def measure(mb: float = 16.0) -> list[dict]:
    from mlmix import bpe, dedup, readers
    from mlmix._core_loader import core
    from mlmix.config import load_config
    from mlmix.ragged import Ragged
    from mlmix.recblock import RecordBlock
    from mlmix.tokenize import Tokenizer

    d = tempfile.mkdtemp(prefix="mlmix-bench-parts-")
    data = os.path.join(d, "data.jsonl")
    make_data(data, mb)
    src = load_config({"sources": [{"path": data}], "output": os.path.join(d, "o"),
                       "tokenizer": {"name": "qwen"}})["sources"][0]
    block = next(iter(readers.iter_blocks(src)))
    rows = np.arange(len(block.role_offsets) - 1)
    out = []

    def row(what, old, new, t_old, t_new):
        out.append({"what": what, "old": old, "new": new, "old_s": t_old, "new_s": t_new, "x": t_old / t_new})

    row(f"take: content column ({len(block.content_values) / 1e6:.1f} MB)", "numpy per-byte index",
        "C++ gather", _best(lambda: _numpy_take_strings(block.content_values, block.content_offsets, rows)),
        _best(lambda: core._take_strings(block.content_values, block.content_offsets, rows)))

    npz, rb = os.path.join(d, "b.npz"), os.path.join(d, "b.rb")

    def save_npz():
        with open(npz, "wb") as f:
            np.savez(f, **block.arrays())

    def load_npz():
        with np.load(npz) as z:
            return {k: z[k] for k in block.arrays()}

    row("block cache file: save", ".npz", "RecordBlock file", _best(save_npz), _best(lambda: block.save(rb)))
    row("block cache file: load", ".npz", "RecordBlock file", _best(load_npz), _best(lambda: RecordBlock.load(rb)))
    row("exact dedup hashes of the block", "str per record", "text column in place",
        _best(lambda: dedup.exact_hashes(block.texts()), 3),
        _best(lambda: dedup.exact_hashes(Ragged(*block.text_column(), validate=False)), 3))

    for name in ("qwen", "qwen3_6"):
        tok = Tokenizer.qwen(name)
        source = next(v for v in vars(tok).values() if type(v).__name__ == "_BackendSource")
        spec = bpe.spec_of(source.load_json())
        strings, arrays = pickle.dumps(spec, protocol=5), pickle.dumps(bpe.compile_spec(spec), protocol=5)
        row(f"kept tokenizer {name}: unpickle + build", f"strings ({len(strings) / 1e6:.1f} MB)",
            f"compiled ({len(arrays) / 1e6:.1f} MB)", _best(lambda: bpe.NativeBPE.from_spec(pickle.loads(strings)), 3),
            _best(lambda: bpe.NativeBPE.from_spec(pickle.loads(arrays)), 3))
    return out


def format_table(rows: list[dict]) -> str:
    lines = [f"{'step':<44}{'before':>30}{'s':>9}{'after':>26}{'s':>9}{'x':>7}"]
    for r in rows:
        lines.append(f"{r['what']:<44}{r['old']:>30}{r['old_s']:>9.4f}{r['new']:>26}{r['new_s']:>9.4f}{r['x']:>7.1f}")
    return "\n".join(lines)


def test_build_parts(benchmark):
    rows = benchmark.pedantic(measure, kwargs={"mb": 4.0}, rounds=1, iterations=1)
    benchmark.extra_info["rows"] = rows
    assert all(r["new_s"] > 0 and r["old_s"] > 0 for r in rows)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mb", type=float, default=16.0, help="size of the generated JSON lines (MB)")
    print(format_table(measure(ap.parse_args().mb)))
