"""JSONL chat data -> packed training sequences, end to end: ``mlmix.build`` against the usual HF stack.

The usual stack: ``datasets.load_dataset("json")``, ``.map`` with the tokenizer's ``apply_chat_template``
(ChatML with ``{% generation %}``, ``return_assistant_tokens_mask=True``, so both sides produce loss
masks), TRL's ``pack_dataset(strategy="bfd")``, ``save_to_disk``. mlmix: one config (langid off since
every record carries its language, dedup off since the HF stack has none, recipe ``all``), cold cache.
Both use Qwen's 151,643-token BPE (the same ``tokenizers.Tokenizer``) and seq_len 2048.

Each variant runs in its own process, so time includes imports and peak memory (``ru_maxrss``) is that
variant's alone.

    pytest bench/bench_pipeline.py                    # ~8 MB of multilingual chat JSONL
    MLMIX_BENCH_FULL=1 pytest bench/bench_pipeline.py # >= 100 MB
    python bench/bench_pipeline.py [--mb 8]           # prints a table

Measured on the shared 2-core development machine (load average ~8-11 from other jobs, so wall times are
noisy; CPU seconds are steadier), Qwen BPE, seq_len 2048, both producing the same 26,106,960 tokens:

    100 MB: HF 303.6 s (91.0 s CPU, peak 1520 MB)  mlmix 48.5 s (16.0 s CPU, peak 996 MB)  6.3x wall, 5.7x CPU
      8 MB: HF  30.4 s (14.1 s CPU, peak  961 MB)  mlmix  6.5 s ( 3.3 s CPU, peak 291 MB)  4.7x wall, 4.3x CPU
"""

from __future__ import annotations

import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import time

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
SEQ_LEN = 2048
FULL = os.environ.get("MLMIX_BENCH_FULL") == "1"
DEFAULT_MB = 100 if FULL else 8

from mlmix.chat import CHATML_TEMPLATE as CHATML_GENERATION  # noqa: E402  (the same ChatML template mlmix uses)


def make_data(path: str, target_mb: float, seed: int = 0) -> dict:
    """Multilingual chat JSONL (``messages`` + ``lang``) of about ``target_mb`` MB, from the bundled demo set.

    Conversations of 1-3 turns; each turn's texts are random runs of the demo's sentences in one language,
    so lengths vary widely (tens to a few thousand tokens), like real SFT data.
    """
    from mlmix import data

    rng = random.Random(seed)
    by_lang: dict[str, tuple[list[str], list[str]]] = {}
    for r in data.demo_records():
        p, q = by_lang.setdefault(r["lang"], ([], []))
        p.append(r["instruction"])
        q.append(r["response"])
    langs = sorted(by_lang)
    target = int(target_mb * 1e6)
    written = n = 0
    with open(path, "w", encoding="utf-8") as f:
        while written < target:
            lang = langs[n % len(langs)]
            prompts, answers = by_lang[lang]
            msgs = []
            if rng.random() < 0.2:
                msgs.append({"role": "system", "content": "You are a helpful assistant."})
            for _ in range(rng.choice((1, 1, 2, 3))):
                msgs.append({"role": "user", "content": " ".join(rng.choices(prompts, k=rng.randint(1, 3)))})
                k = int(min(rng.lognormvariate(1.2, 1.0), 60)) + 1
                msgs.append({"role": "assistant", "content": " ".join(rng.choices(answers, k=k))})
            line = json.dumps({"id": n, "lang": lang, "messages": msgs}, ensure_ascii=False) + "\n"
            f.write(line)
            written += len(line.encode("utf-8"))
            n += 1
    return {"records": n, "bytes": written}


# ---- the variants (each run in a child process) ----------------------------------------------------
def run_mlmix(data: str, out: str) -> dict:
    import mlmix

    cfg = {
        "output": os.path.join(out, "store_out"),
        "cache_dir": os.path.join(out, "cache"),
        "sources": [{"path": data}],
        "langid": {"backend": "none"},
        "dedup": {"exact": False, "near": False},
        "tokenizer": {"name": "qwen", "template": "chatml"},
        "pack": {"seq_len": SEQ_LEN, "strategy": "bfd", "overlong": "truncate"},
        "report": False,
    }
    s = mlmix.build(cfg, quiet=True)
    return {"examples": s["examples"], "tokens": s["tokens"], "sequences": s["sequences"], "efficiency": s["efficiency"]}


def run_hf(data: str, out: str) -> dict:
    import datasets
    from transformers import PreTrainedTokenizerFast
    from trl import pack_dataset

    from mlmix._tiktoken import qwen_tokenizer

    datasets.disable_progress_bars()
    tok = PreTrainedTokenizerFast(tokenizer_object=qwen_tokenizer("qwen"), eos_token="<|im_end|>",
                                  pad_token="<|endoftext|>")
    tok.chat_template = CHATML_GENERATION
    ds = datasets.load_dataset("json", data_files=data, split="train", cache_dir=os.path.join(out, "hf_cache"))

    def encode(batch):
        enc = tok.apply_chat_template(batch["messages"], tokenize=True, return_dict=True,
                                      return_assistant_tokens_mask=True, truncation=True, max_length=SEQ_LEN)
        return {"input_ids": enc["input_ids"], "assistant_masks": enc["assistant_masks"]}

    ds = ds.map(encode, batched=True, remove_columns=ds.column_names, num_proc=None)
    packed = pack_dataset(ds, seq_length=SEQ_LEN, strategy="bfd")
    packed.save_to_disk(os.path.join(out, "hf_packed"))
    n_tokens = sum(len(x) for x in ds["input_ids"])
    return {"examples": len(ds), "tokens": n_tokens, "sequences": len(packed),
            "efficiency": n_tokens / (len(packed) * SEQ_LEN)}


VARIANTS = {"mlmix": run_mlmix, "hf": run_hf}


def measure(variant: str, data: str) -> dict:
    """Run one variant in a fresh process; its wall time (imports included) and peak RSS."""
    with tempfile.TemporaryDirectory(prefix=f"bench_pipeline_{variant}_") as out:
        env = dict(os.environ, MLMIX_BENCH_CHILD="1")
        t0 = time.perf_counter()
        proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", variant, data, out],
                              capture_output=True, text=True, env=env)
        seconds = time.perf_counter() - t0
        if proc.returncode != 0:
            raise RuntimeError(f"{variant} failed:\n{proc.stderr[-4000:]}")
        res = json.loads(proc.stdout.strip().splitlines()[-1])
    res["seconds"] = seconds
    return res


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("bench_pipeline") / "chat.jsonl")
    info = make_data(path, DEFAULT_MB)
    info["path"] = path
    return info


@pytest.fixture(scope="module")
def results(dataset):
    return {}


@pytest.mark.parametrize("variant", ["hf", "mlmix"])
def test_pipeline_end_to_end(benchmark, dataset, results, variant):
    res = benchmark.pedantic(measure, args=(variant, dataset["path"]), rounds=1, iterations=1)
    results[variant] = res
    mb = dataset["bytes"] / 1e6
    benchmark.extra_info.update({
        "variant": variant, "input_mb": round(mb, 1), "records": dataset["records"],
        "seconds": round(res["seconds"], 2), "mb_per_s": round(mb / res["seconds"], 2),
        "peak_rss_mb": round(res["peak_rss_mb"], 1), "cpu_s": round(res["cpu_s"], 2), "tokens": res["tokens"], "sequences": res["sequences"],
        "efficiency": round(res["efficiency"], 5),
    })
    if "hf" in results and "mlmix" in results:
        benchmark.extra_info["speedup_vs_hf"] = round(results["hf"]["seconds"] / results["mlmix"]["seconds"], 2)
        benchmark.extra_info["cpu_ratio_vs_hf"] = round(results["hf"]["cpu_s"] / results["mlmix"]["cpu_s"], 2)
        benchmark.extra_info["memory_ratio_vs_hf"] = round(results["mlmix"]["peak_rss_mb"] / results["hf"]["peak_rss_mb"], 2)
        print(f"\nmlmix vs HF datasets+TRL on {mb:.0f} MB: {benchmark.extra_info['speedup_vs_hf']}x faster, "
              f"peak memory {results['mlmix']['peak_rss_mb']:.0f} MB vs {results['hf']['peak_rss_mb']:.0f} MB")


def _child(variant: str, data: str, out: str) -> None:
    res = VARIANTS[variant](data, out)
    ru = resource.getrusage(resource.RUSAGE_SELF)
    res["peak_rss_mb"] = ru.ru_maxrss / 1024
    # CPU seconds (all threads): a steadier figure than wall time on a shared machine
    res["cpu_s"] = ru.ru_utime + ru.ru_stime
    print(json.dumps(res))


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        _child(*sys.argv[2:5])
        sys.exit(0)
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mb", type=float, default=DEFAULT_MB, help="input size in MB (default: %(default)s)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "chat.jsonl")
        info = make_data(path, args.mb)
        print(f"{info['bytes'] / 1e6:.1f} MB, {info['records']:,} conversations in 12 languages")
        rows = {v: measure(v, path) for v in ("hf", "mlmix")}
    for v, r in rows.items():
        print(f"{v:<6} {r['seconds']:8.1f} s  cpu {r['cpu_s']:7.1f} s  {info['bytes'] / 1e6 / r['seconds']:6.2f} MB/s  "
              f"peak {r['peak_rss_mb']:7.0f} MB  "
              f"{r['tokens']:,} tokens  {r['sequences']:,} sequences  efficiency {r['efficiency']:.2%}")
    print(f"speedup {rows['hf']['seconds'] / rows['mlmix']['seconds']:.2f}x (cpu {rows['hf']['cpu_s'] / rows['mlmix']['cpu_s']:.2f}x), "
          f"memory {rows['mlmix']['peak_rss_mb'] / rows['hf']['peak_rss_mb']:.2f}x")
