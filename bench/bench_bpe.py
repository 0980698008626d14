"""NativeBPE vs HF tokenizers vs tiktoken: the same texts, the same Qwen3.6 ranks, ids compared.

    pytest bench/bench_bpe.py                      # ~8 MB of text (quick)
    MLMIX_BENCH_FULL=1 pytest bench/bench_bpe.py   # ~46 MB, the issue's size

Texts: the multilingual demo records (12 languages) when ``mlmix.data`` has them, else
``$MLMIX_BENCH_TEXT_DIR/*.jsonl``, else the test samples; documents are random concatenations of records so that
lengths vary. Threads: ``$MLMIX_BENCH_THREADS`` (default: all cores) for every tool. Each variant records MB/s
(UTF-8 bytes) in ``extra_info``; ``test_summary`` reports the ratios and checks ids.
"""

from __future__ import annotations

import glob
import json
import os
import random
import time

import pytest

tokenizers = pytest.importorskip("tokenizers")
tiktoken = pytest.importorskip("tiktoken")

from mlmix._tiktoken import qwen_spec, qwen_tokenizer  # noqa: E402
from mlmix.bpe import NativeBPE  # noqa: E402

FULL = os.environ.get("MLMIX_BENCH_FULL") == "1"
TARGET_BYTES = (46 if FULL else 8) * 1_000_000
THREADS = int(os.environ.get("MLMIX_BENCH_THREADS", "0")) or (os.cpu_count() or 1)
RESULTS: dict[str, float] = {}


def _records() -> list[str]:
    try:
        from mlmix.data import demo_records  # the project's multilingual demo set, when present

        recs = demo_records()
        return [r["instruction"] + "\n" + r["response"] for r in recs]
    except Exception:
        pass
    d = os.environ.get("MLMIX_BENCH_TEXT_DIR")
    out = []
    for path in sorted(glob.glob(os.path.join(d, "*.jsonl"))) if d else []:
        with open(path, encoding="utf-8") as f:
            for line in f:
                r = json.loads(line)
                out.append(r.get("instruction", "") + "\n" + r.get("response", r.get("text", "")))
    if not out:
        import sys

        sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
        from test_bpe import SAMPLES, TRICKY

        out = list(SAMPLES.values()) + TRICKY
    return out


@pytest.fixture(scope="module")
def texts() -> list[str]:
    recs = _records()
    rng = random.Random(0)
    docs, size = [], 0
    while size < TARGET_BYTES:
        doc = "\n\n".join(rng.choice(recs) for _ in range(rng.randint(1, 12)))
        docs.append(doc)
        size += len(doc.encode())
    return docs


@pytest.fixture(scope="module")
def tools():
    path, pattern, specials = qwen_spec("qwen3_6")
    hf = qwen_tokenizer("qwen3_6")
    from tiktoken.load import load_tiktoken_bpe

    tk = tiktoken.Encoding("qwen3_6", pat_str=pattern, mergeable_ranks=load_tiktoken_bpe(path), special_tokens=specials)
    return {"hf": hf, "tiktoken": tk, "native": NativeBPE.from_hf(hf)}


def _mb(texts) -> float:
    return sum(len(t.encode()) for t in texts) / 1e6


def _run(benchmark, name, fn, texts):
    out = benchmark.pedantic(fn, rounds=3 if not FULL else 1, iterations=1, warmup_rounds=0)
    mbs = _mb(texts) / benchmark.stats.stats.min
    RESULTS[name] = mbs
    benchmark.extra_info.update({"MB_per_s": round(mbs, 2), "threads": THREADS, "MB": round(_mb(texts), 1)})
    return out


def test_native(benchmark, tools, texts):
    _run(benchmark, "native", lambda: tools["native"].encode_batch(texts, add_special_tokens=False, num_threads=THREADS), texts)


def test_tiktoken(benchmark, tools, texts):
    _run(benchmark, "tiktoken", lambda: tools["tiktoken"].encode_ordinary_batch(texts, num_threads=THREADS), texts)


def test_hf_encode_batch_fast(benchmark, tools, texts):
    _run(benchmark, "hf_fast", lambda: tools["hf"].encode_batch_fast(texts, add_special_tokens=False), texts)


def test_hf_encode_batch(benchmark, tools, texts):
    _run(benchmark, "hf", lambda: tools["hf"].encode_batch(texts, add_special_tokens=False), texts)


_MEMORY_CHILD = r"""
import json, sys
texts = json.load(open(sys.argv[1]))
variant, threads = sys.argv[2], int(sys.argv[3])
from mlmix._tiktoken import qwen_spec, qwen_tokenizer
path, pattern, specials = qwen_spec("qwen3_6")
if variant == "native":
    from mlmix.bpe import NativeBPE
    tool = NativeBPE.from_hf(qwen_tokenizer("qwen3_6"))
    run = lambda: tool.encode_batch(texts, add_special_tokens=False, num_threads=threads)
elif variant == "tiktoken":
    import tiktoken
    from tiktoken.load import load_tiktoken_bpe
    tool = tiktoken.Encoding("q", pat_str=pattern, mergeable_ranks=load_tiktoken_bpe(path), special_tokens=specials)
    run = lambda: tool.encode_ordinary_batch(texts, num_threads=threads)
else:
    tool = qwen_tokenizer("qwen3_6")
    run = lambda: tool.encode_batch_fast(texts, add_special_tokens=False)
import gc, os, threading, time
page_kb = os.sysconf("SC_PAGE_SIZE") // 1024
def rss_kb():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * page_kb
gc.collect()
before = rss_kb()
peak, done = [before], threading.Event()
def sample():  # the lifetime peak (ru_maxrss) is set by loading; sample the encode phase alone
    while not done.is_set():
        peak[0] = max(peak[0], rss_kb())
        time.sleep(0.002)
t = threading.Thread(target=sample); t.start()
out = run()
done.set(); t.join()
print(json.dumps({"peak_kb_before_encode": before, "peak_kb_after_encode": max(peak[0], rss_kb())}))
"""


def test_peak_memory(benchmark, texts, tmp_path):
    """Peak RSS growth while encoding (output included), each tool in its own process, sampled every 2 ms
    from just before the call (tokenizer and texts already loaded)."""
    import subprocess
    import sys

    data = tmp_path / "texts.json"
    data.write_text(json.dumps(texts))
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([os.path.join(os.path.dirname(__file__), "..", "python"), env.get("PYTHONPATH", "")])
    info = {}
    for variant in ("native", "tiktoken", "hf_fast"):
        out = subprocess.run(
            [sys.executable, "-c", _MEMORY_CHILD, str(data), variant, str(THREADS)], capture_output=True, text=True, env=env, check=True
        )
        r = json.loads(out.stdout.strip().splitlines()[-1])
        info[f"{variant}_encode_peak_MB"] = round((r["peak_kb_after_encode"] - r["peak_kb_before_encode"]) / 1024, 1)
    benchmark.pedantic(lambda: None, rounds=1, iterations=1)
    benchmark.extra_info.update(info)
    RESULTS.update({k: v for k, v in info.items()})
    print("\nbench_bpe memory:", json.dumps(info))


def test_summary(benchmark, tools, texts):
    """Ratios of the runs above, and the ids: native must equal HF exactly; tiktoken is compared too."""
    native = tools["native"].encode_batch(texts, add_special_tokens=False, num_threads=THREADS)
    hf = tools["hf"].encode_batch_fast(texts, add_special_tokens=False)
    assert all(n.tolist() == h.ids for n, h in zip(native, hf)), "native ids differ from HF"
    tk = tools["tiktoken"].encode_ordinary_batch(texts, num_threads=THREADS)
    tk_diff = sum(n.tolist() != t for n, t in zip(native, tk))
    t = time.perf_counter()
    benchmark.pedantic(lambda: None, rounds=1, iterations=1)
    info = {k: round(v, 2) for k, v in RESULTS.items()}
    if "native" in RESULTS and not isinstance(RESULTS["native"], str):
        for other in ("tiktoken", "hf_fast", "hf"):
            if other in RESULTS:
                info[f"native_over_{other}"] = round(RESULTS["native"] / RESULTS[other], 2)
    info["docs_where_tiktoken_differs"] = tk_diff
    info["docs"] = len(texts)
    benchmark.extra_info.update(info)
    print("\nbench_bpe:", json.dumps(info), f"({time.perf_counter() - t:.1f}s)")
