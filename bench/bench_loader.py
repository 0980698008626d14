"""Tokens per second delivered to the training loop: mlmix's loader vs HF datasets + DataCollatorWithFlattening.

    pytest bench/bench_loader.py                      # quick: ~4M tokens
    MLMIX_BENCH_FULL=1 pytest bench/bench_loader.py   # the issue's size: ~19M tokens

Data: SFT-like multilingual examples (log-normal lengths, median ~400 tokens, 16..4096; 12 languages;
a loss mask hiding ~30% of tokens as prompts), token ids < 151,643 (Qwen's vocabulary).

- mlmix store: the examples packed once (BFD, seq_len 4096) into a store; ``PackedDataset`` with
  batch_size 8 rows (32,768 token slots) through ``mlmix.torch.DataLoader``, num_workers 0 and 2,
  layouts flat and padded. One epoch per round; every batch has int64 input_ids, labels,
  position_ids, cu_seq_lens and per-token language ids.
- mlmix on the fly: ``PackedIterableDataset`` packing chunks of the same tokenized examples.
- HF: a ``datasets.Dataset`` of input_ids and labels (the same masks), ``DataCollatorWithFlattening``
  (position_ids, cu_seq_lens, labels with -100 separators) and torch's DataLoader with num_workers=2,
  with as many examples per batch as make up 8 x 4096 tokens on average.

Tokens/s counts real tokens (no padding) delivered in one pass (best of 2; workers are persistent, as
in a multi-epoch run); the ratio to the HF stack measured in the same run is in ``extra_info``, with tokens per CPU-second of all processes
(main + workers), the steadier figure on a shared machine.
"""

from __future__ import annotations

import os
import time

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import mlmix  # noqa: E402
from mlmix import Ragged  # noqa: E402
from mlmix.torch.data import DataLoader, PackedDataset, PackedIterableDataset  # noqa: E402

FULL = os.environ.get("MLMIX_BENCH_FULL") == "1"
TOTAL_TOKENS = 19_000_000 if FULL else 4_000_000
SEQ_LEN = 4096
BATCH_ROWS = 8
LANGS = ("en", "zh", "ru", "ar", "hi", "sw", "es", "fi", "cs", "et", "he", "it")
ROUNDS = 2


@pytest.fixture(scope="module")
def examples():
    rng = np.random.default_rng(0)
    lens = np.clip(rng.lognormal(np.log(400), 0.9, size=TOTAL_TOKENS // 400), 16, SEQ_LEN).astype(np.int64)
    lens = lens[np.cumsum(lens) <= TOTAL_TOKENS]
    tokens = Ragged.from_lengths(rng.integers(0, 151_643, size=int(lens.sum()), dtype=np.uint32), lens)
    # a prompt (masked) then a response: the first ~30% of each example is hidden from the loss
    pos = np.arange(int(lens.sum())) - np.repeat(tokens.offsets[:-1], lens)
    mask = Ragged.from_lengths(pos >= np.repeat((lens * 3) // 10, lens), lens)
    langs = [LANGS[i] for i in rng.integers(0, len(LANGS), size=lens.size)]
    return tokens, mask, langs


@pytest.fixture(scope="module")
def store_path(examples, tmp_path_factory):
    tokens, mask, langs = examples
    path = str(tmp_path_factory.mktemp("bench_loader") / "store")
    mlmix.write_store(path, tokens, seq_len=SEQ_LEN, loss_mask=mask, langs=langs)
    return path


_CPU: dict[int, float] = {}  # last CPU seconds seen per process (this one and its DataLoader workers)


def _cpu_seconds() -> float:
    """CPU seconds used since the previous call by this process and its (worker) children."""
    psutil = pytest.importorskip("psutil")
    used = 0.0
    procs = [psutil.Process()]
    procs += procs[0].children(recursive=True)
    for p in procs:
        try:
            t = p.cpu_times()
        except psutil.Error:
            continue
        total = t.user + t.system
        used += total - _CPU.get(p.pid, 0.0)
        _CPU[p.pid] = total
    return used


def _drain(loader) -> tuple[float, float]:
    """(wall seconds, CPU seconds of all processes) of one pass. On a shared machine the CPU time is the
    steadier figure: it does not count time spent waiting for a core."""
    _cpu_seconds()
    t = time.perf_counter()
    for batch in loader:
        batch["input_ids"]
    wall = time.perf_counter() - t
    return wall, _cpu_seconds()


def _best(fn, rounds=ROUNDS) -> tuple[float, float]:
    runs = [fn() for _ in range(rounds)]
    return min(r[0] for r in runs), min(r[1] for r in runs)


@pytest.fixture(scope="module")
def hf_tokens_per_s(examples):
    datasets = pytest.importorskip("datasets")
    pa = pytest.importorskip("pyarrow")
    from transformers import DataCollatorWithFlattening

    tokens, mask, _ = examples
    offsets = pa.array(tokens.offsets.astype(np.int32))
    labels = np.where(mask.values, tokens.values.astype(np.int64), -100)
    table = pa.table({"input_ids": pa.ListArray.from_arrays(offsets, pa.array(tokens.values.astype(np.int64))),
                      "labels": pa.ListArray.from_arrays(offsets, pa.array(labels))})
    ds = datasets.Dataset(table)
    per_batch = max(1, round(BATCH_ROWS * SEQ_LEN / float(tokens.lengths.mean())))
    collator = DataCollatorWithFlattening(return_flash_attn_kwargs=True, return_position_ids=True)
    loader = torch.utils.data.DataLoader(ds, batch_size=per_batch, collate_fn=collator, num_workers=2,
                                         persistent_workers=True)
    wall, cpu = _best(lambda: _drain(loader))
    n = int(tokens.lengths.sum())
    return n / wall, n / cpu


def _measure(benchmark, loader, tokens: int, hf: tuple[float, float], **info) -> None:
    runs = []

    def one_pass():
        runs.append(_drain(loader))

    benchmark.pedantic(one_pass, rounds=ROUNDS, iterations=1)
    rate = tokens / min(r[0] for r in runs)
    cpu_rate = tokens / min(r[1] for r in runs)
    benchmark.extra_info.update(tokens=tokens, tokens_per_s=round(rate), hf_tokens_per_s=round(hf[0]),
                                ratio_vs_hf=round(rate / hf[0], 2), tokens_per_cpu_s=round(cpu_rate),
                                hf_tokens_per_cpu_s=round(hf[1]), cpu_ratio_vs_hf=round(cpu_rate / hf[1], 2), **info)
    print(f"\n{info}: {rate / 1e6:.1f}M tokens/s (HF stack {hf[0] / 1e6:.2f}M, {rate / hf[0]:.1f}x); "
          f"per CPU-second {cpu_rate / 1e6:.1f}M (HF {hf[1] / 1e6:.2f}M, {cpu_rate / hf[1]:.1f}x)")


@pytest.mark.parametrize("layout", ["flat", "padded"])
@pytest.mark.parametrize("num_workers", [0, 2])
def test_store_loader(benchmark, store_path, hf_tokens_per_s, num_workers, layout):
    ds = PackedDataset(store_path, batch_size=BATCH_ROWS, layout=layout, verify=False)
    loader = DataLoader(ds, num_workers=num_workers, persistent_workers=num_workers > 0)
    _measure(benchmark, loader, ds.num_tokens, hf_tokens_per_s, variant="store", layout=layout,
             num_workers=num_workers)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_on_the_fly_loader(benchmark, examples, hf_tokens_per_s, num_workers):
    tokens, mask, langs = examples
    step = 8192
    chunks = [(tokens[i : i + step], mask[i : i + step], langs[i : i + step]) for i in range(0, len(tokens), step)]
    ds = PackedIterableDataset(chunks, seq_len=SEQ_LEN, batch_size=BATCH_ROWS, layout="flat", window=16_384)
    loader = DataLoader(ds, num_workers=num_workers, persistent_workers=num_workers > 0)
    _measure(benchmark, loader, int(tokens.lengths.sum()), hf_tokens_per_s, variant="on-the-fly", layout="flat",
             num_workers=num_workers)
