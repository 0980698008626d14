"""JSONL chat data -> packed training sequences, end to end: ``mlmix.build`` against the usual HF stack.

The usual stack: ``datasets.load_dataset("json")``, ``.map`` with the tokenizer's ``apply_chat_template``
(ChatML with ``{% generation %}``, ``return_assistant_tokens_mask=True``, so both sides produce loss
masks), TRL's ``pack_dataset(strategy="bfd")``, ``save_to_disk``. mlmix: one config (langid off since
every record carries its language, dedup off since the HF stack has none, recipe ``all``), cold cache.
Both use Qwen's 151,643-token BPE (the same ``tokenizers.Tokenizer``) and seq_len 2048.

Each variant runs in its own process at each of two input sizes, so time includes imports and peak
memory (``ru_maxrss``) is that run's alone; comparing the two sizes shows how peak memory grows with the
input (mlmix's is a fixed amount plus ~100-150 B per record: docs/memory.md).

    pytest bench/bench_pipeline.py                    # 4 and 16 MB of multilingual chat JSONL
    MLMIX_BENCH_FULL=1 pytest bench/bench_pipeline.py # 50 and 200 MB
    python bench/bench_pipeline.py [--mb 8 --mb 32] [--only mlmix] [--parquet]   # prints a table

``--parquet`` (and ``test_pipeline_parquet``) gives both sides the same rows as one Parquet file (row groups of
4,096), as datasets on the hub ship them: ``load_dataset("parquet")`` against mlmix's Arrow reader.

Measured 2026-11-26 on the shared 2-core development machine (load average ~8-11 from other jobs, so wall
times are noisy; CPU seconds are steadier; memory is not affected), Qwen BPE, seq_len 2048, both sides
producing the same tokens (13,091,371 at 50 MB, 52,271,062 at 200 MB):

     50 MB: HF 195.9 s (44.9 s CPU, peak 1228 MB)  mlmix 23.2 s ( 8.1 s CPU, peak 314 MB)  8.4x wall, 5.6x CPU, 0.26x memory
    200 MB: HF 269.4 s (122.5 s CPU, peak 2116 MB) mlmix 41.5 s (23.0 s CPU, peak 307 MB)  6.5x wall, 5.3x CPU, 0.15x memory

HF's peak grows by 5.9 MB per MB of input; mlmix's does not grow (before the streaming stages: 608 MB at
50 MB, 1786 MB at 200 MB).
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
# two input sizes, each variant in its own process at each: peak memory against input size
SIZES_MB = (50.0, 200.0) if FULL else (4.0, 16.0)

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


def to_parquet(path: str) -> str:
    """The JSON lines at ``path`` as a Parquet file beside it (row groups of 4,096 rows); returns its path."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    out = os.path.splitext(path)[0] + ".parquet"
    writer = None
    rows: list = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            rows.append(json.loads(line))
            if len(rows) == 4096:
                t = pa.Table.from_pylist(rows)
                writer = writer or pq.ParquetWriter(out, t.schema)
                writer.write_table(t)
                rows = []
    if rows:
        t = pa.Table.from_pylist(rows)
        writer = writer or pq.ParquetWriter(out, t.schema)
        writer.write_table(t)
    if writer is not None:
        writer.close()
    return out


def _jsonl(data: str) -> str:
    """The JSON lines a data file was made from (a Parquet file is written beside its JSON lines)."""
    return os.path.splitext(data)[0] + ".jsonl" if data.endswith(".parquet") else data


# ---- the variants (each run in a child process) ----------------------------------------------------
def _mlmix_config(data: str, out: str, full: bool) -> dict:
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
    if full:  # every record's language identified, exact + near dedup, a recipe
        cfg["langid"] = {"override": True}
        cfg["dedup"] = {"exact": True, "near": True}
        cfg["mixture"] = {"recipe": "temperature", "alpha": 0.3, "on_shortfall": "take_all"}
    return cfg


def _build(data: str, out: str, full: bool) -> dict:
    import mlmix

    s = mlmix.build(_mlmix_config(data, out, full), quiet=True)
    return {"examples": s["examples"], "tokens": s["tokens"], "sequences": s["sequences"],
            "efficiency": s["efficiency"], "work_seconds": s["seconds"]}


def run_mlmix(data: str, out: str) -> dict:
    """``mlmix build``: recipe ``all``, no langid, no dedup."""
    return _build(data, out, False)


def run_mlmix_full(data: str, out: str) -> dict:
    """``mlmix build`` with language identification on every record, exact + near dedup and a recipe."""
    return _build(data, out, True)


def contents(data: str) -> list[str]:
    """The texts the tokenizer sees: every message's content."""
    out = []
    with open(_jsonl(data), encoding="utf-8") as f:
        for line in f:
            out += [m["content"] for m in json.loads(line)["messages"]]
    return out


_TEXT_BYTES: dict[str, int] = {}


def text_bytes(data: str) -> int:
    """Bytes of the texts the tokenizer sees (computed in the parent: a child's peak memory stays its own)."""
    if data not in _TEXT_BYTES:  # streamed: the parent stays small (see _peak_mb)
        n = 0
        with open(_jsonl(data), encoding="utf-8") as f:
            for line in f:
                n += sum(len(m["content"].encode("utf-8")) for m in json.loads(line)["messages"])
        _TEXT_BYTES[data] = n
    return _TEXT_BYTES[data]


def run_encode(data: str, out: str) -> dict:
    """The native encoder alone on the same texts (no JSON, no chat template, no masks, no packing): the
    rate the whole build is measured against."""
    import mlmix

    texts = contents(data)
    tok = mlmix.Tokenizer.qwen("qwen")
    tok.encode_batch(texts[:64])  # warm: the thread pool and piece caches
    t0 = time.perf_counter()
    n_tokens = 0
    for lo in range(0, len(texts), 65536):
        n_tokens += len(tok.encode_batch(texts[lo:lo + 65536]).values)
    seconds = time.perf_counter() - t0
    return {"examples": len(texts), "tokens": n_tokens, "sequences": 0, "efficiency": 0.0, "work_seconds": seconds}


def run_hf(data: str, out: str) -> dict:
    import datasets
    from transformers import PreTrainedTokenizerFast
    from trl import pack_dataset

    from mlmix._tiktoken import qwen_tokenizer

    datasets.disable_progress_bars()
    t0 = time.perf_counter()
    tok = PreTrainedTokenizerFast(tokenizer_object=qwen_tokenizer("qwen"), eos_token="<|im_end|>",
                                  pad_token="<|endoftext|>")
    tok.chat_template = CHATML_GENERATION
    ds = datasets.load_dataset("parquet" if data.endswith(".parquet") else "json", data_files=data, split="train",
                               cache_dir=os.path.join(out, "hf_cache"))

    def encode(batch):
        enc = tok.apply_chat_template(batch["messages"], tokenize=True, return_dict=True,
                                      return_assistant_tokens_mask=True, truncation=True, max_length=SEQ_LEN)
        return {"input_ids": enc["input_ids"], "assistant_masks": enc["assistant_masks"]}

    ds = ds.map(encode, batched=True, remove_columns=ds.column_names, num_proc=None)
    packed = pack_dataset(ds, seq_length=SEQ_LEN, strategy="bfd")
    packed.save_to_disk(os.path.join(out, "hf_packed"))
    n_tokens = sum(len(x) for x in ds["input_ids"])
    return {"examples": len(ds), "tokens": n_tokens, "sequences": len(packed),
            "efficiency": n_tokens / (len(packed) * SEQ_LEN), "work_seconds": time.perf_counter() - t0}


VARIANTS = {"mlmix": run_mlmix, "mlmix_full": run_mlmix_full, "encode": run_encode, "hf": run_hf}


_PYCACHE: list[str] = []


def _child_env() -> dict:
    """The children's environment, with mlmix's modules compiled to bytecode beforehand (into a folder of this
    run's, as an installed package has them: an editable install under ``PYTHONDONTWRITEBYTECODE`` would
    otherwise compile every module the build imports lazily, inside the timed part; the other variants'
    libraries are installed with their bytecode), and one OpenBLAS thread."""
    env = dict(os.environ)
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    # none of the variants calls the BLAS; numpy's OpenBLAS would otherwise keep a thread spinning for ~0.1
    # CPU-second after its import, inside the timing of a variant that starts work right after importing
    env.setdefault("OPENBLAS_NUM_THREADS", "1")
    if not _PYCACHE:
        import atexit
        import shutil

        import mlmix

        _PYCACHE.append(tempfile.mkdtemp(prefix="bench_pipeline_pycache_"))
        atexit.register(shutil.rmtree, _PYCACHE[0], True)
        env["PYTHONPYCACHEPREFIX"] = _PYCACHE[0]
        subprocess.run([sys.executable, "-m", "compileall", "-q", os.path.dirname(mlmix.__file__)], env=env,
                       check=True, capture_output=True)
    env["PYTHONPYCACHEPREFIX"] = _PYCACHE[0]
    return env


def measure(variant: str, data: str, cores: int | None = None) -> dict:
    """Run one variant in a fresh process (on its first ``cores`` cores, when given); its wall time
    (imports included) and peak RSS."""
    with tempfile.TemporaryDirectory(prefix=f"bench_pipeline_{variant}_") as out:
        env = dict(_child_env(), MLMIX_BENCH_CHILD="1")
        t0 = time.perf_counter()
        cmd = [sys.executable, os.path.abspath(__file__), "--child", variant, data, out]
        if cores:
            cmd.append(str(cores))
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
        seconds = time.perf_counter() - t0
        if proc.returncode != 0:
            raise RuntimeError(f"{variant} failed:\n{proc.stderr[-4000:]}")
        res = json.loads(proc.stdout.strip().splitlines()[-1])
    res["seconds"] = seconds
    res["text_bytes"] = text_bytes(data)
    return res


_DATA: dict[float, dict] = {}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("bench_pipeline")


def _dataset(data_dir, mb: float) -> dict:
    if mb not in _DATA:
        path = str(data_dir / f"chat_{mb:g}mb.jsonl")
        info = make_data(path, mb)
        info["path"] = path
        _DATA[mb] = info
    return _DATA[mb]


@pytest.fixture(scope="module")
def results():
    return {}


@pytest.mark.parametrize("size_mb, variant", [(mb, v) for mb in SIZES_MB for v in ("hf", "mlmix")])
def test_pipeline_end_to_end(benchmark, data_dir, results, size_mb, variant):
    dataset = _dataset(data_dir, size_mb)
    res = benchmark.pedantic(measure, args=(variant, dataset["path"]), rounds=1, iterations=1)
    results[(size_mb, variant)] = res
    mb = dataset["bytes"] / 1e6
    benchmark.extra_info.update({
        "variant": variant, "input_mb": round(mb, 1), "records": dataset["records"],
        "seconds": round(res["seconds"], 2), "mb_per_s": round(mb / res["seconds"], 2),
        "peak_rss_mb": round(res["peak_rss_mb"], 1), "cpu_s": round(res["cpu_s"], 2), "tokens": res["tokens"],
        "sequences": res["sequences"], "efficiency": round(res["efficiency"], 5),
    })
    hf, ml = results.get((size_mb, "hf")), results.get((size_mb, "mlmix"))
    if hf and ml:
        benchmark.extra_info["speedup_vs_hf"] = round(hf["seconds"] / ml["seconds"], 2)
        benchmark.extra_info["cpu_ratio_vs_hf"] = round(hf["cpu_s"] / ml["cpu_s"], 2)
        benchmark.extra_info["memory_ratio_vs_hf"] = round(ml["peak_rss_mb"] / hf["peak_rss_mb"], 2)
        print(f"\n{mb:.0f} MB: mlmix {benchmark.extra_info['speedup_vs_hf']}x faster than HF datasets+TRL "
              f"({benchmark.extra_info['cpu_ratio_vs_hf']}x CPU), peak memory {ml['peak_rss_mb']:.0f} MB vs "
              f"{hf['peak_rss_mb']:.0f} MB ({benchmark.extra_info['memory_ratio_vs_hf']}x)")
    done = [(s, results[(s, v)]) for s in SIZES_MB for v in (variant,) if (s, v) in results]
    if len(done) == len(SIZES_MB) > 1:
        (s0, r0), (s1, r1) = done[0], done[-1]
        growth = (r1["peak_rss_mb"] - r0["peak_rss_mb"]) / (s1 - s0)
        benchmark.extra_info["peak_rss_growth_mb_per_input_mb"] = round(growth, 3)
        print(f"{variant}: peak {r0['peak_rss_mb']:.0f} MB at {s0:g} MB of input, {r1['peak_rss_mb']:.0f} MB at "
              f"{s1:g} MB ({growth:+.2f} MB per MB of input)")


@pytest.mark.parametrize("variant", ["hf", "mlmix"])
def test_pipeline_parquet(benchmark, data_dir, results, variant):
    """The smaller size's rows as one Parquet file, for both sides."""
    pytest.importorskip("pyarrow")
    dataset = _dataset(data_dir, SIZES_MB[0])
    if "parquet" not in dataset:
        dataset["parquet"] = to_parquet(dataset["path"])
    res = benchmark.pedantic(measure, args=(variant, dataset["parquet"]), rounds=1, iterations=1)
    results[("parquet", variant)] = res
    benchmark.extra_info.update({
        "variant": variant, "input": "parquet", "jsonl_mb": round(dataset["bytes"] / 1e6, 1),
        "parquet_mb": round(os.path.getsize(dataset["parquet"]) / 1e6, 1), "records": dataset["records"],
        "seconds": round(res["seconds"], 2), "peak_rss_mb": round(res["peak_rss_mb"], 1), "cpu_s": round(res["cpu_s"], 2),
        "tokens": res["tokens"], "sequences": res["sequences"]})
    hf, ml = results.get(("parquet", "hf")), results.get(("parquet", "mlmix"))
    if hf and ml:
        assert hf["tokens"] == ml["tokens"]  # the same rows, the same tokens on both sides
        benchmark.extra_info["speedup_vs_hf"] = round(hf["seconds"] / ml["seconds"], 2)
        benchmark.extra_info["memory_ratio_vs_hf"] = round(ml["peak_rss_mb"] / hf["peak_rss_mb"], 2)


KERNEL_SIZE_MB = 50.0 if FULL else 8.0


def _rate(res: dict) -> float:
    """MB/s of the texts the tokenizer sees, over the variant's own work (imports and process start apart)."""
    return res["text_bytes"] / 1e6 / res["work_seconds"]


@pytest.mark.parametrize("variant", ["encode", "mlmix", "mlmix_full", "hf"])
def test_build_against_its_encoder(benchmark, data_dir, results, variant):
    """The whole build (JSON lines to packed store) against the native encoder alone on the same texts:
    the goals are >= 0.6x (recipe all) and >= 0.4x (langid, exact + near dedup, a recipe); the HF stack
    (datasets + apply_chat_template + TRL packing) on the same data for comparison."""
    dataset = _dataset(data_dir, KERNEL_SIZE_MB)
    res = benchmark.pedantic(measure, args=(variant, dataset["path"]), rounds=1, iterations=1)
    results[("kernel", variant)] = res
    benchmark.extra_info.update({"variant": variant, "text_mb": round(res["text_bytes"] / 1e6, 1),
                                 "work_seconds": round(res["work_seconds"], 2), "mb_per_s": round(_rate(res), 2),
                                 "peak_rss_mb": round(res["peak_rss_mb"], 1), "tokens": res["tokens"]})
    enc = results.get(("kernel", "encode"))
    if enc and variant != "encode":
        benchmark.extra_info["ratio_vs_encode_batch"] = round(_rate(res) / _rate(enc), 3)
        print(f"\n{variant}: {_rate(res):.1f} MB/s, {_rate(res) / _rate(enc):.2f}x the native encode_batch "
              f"({_rate(enc):.1f} MB/s) on the same {res['text_bytes'] / 1e6:.0f} MB of text")


@pytest.mark.parametrize("cores", [1, 2])
def test_parallel_efficiency(benchmark, data_dir, results, cores):
    """The build (recipe all) on 1 and on 2 cores (CPU affinity): efficiency = t1 / (2 * t2), goal >= 0.8."""
    if len(os.sched_getaffinity(0)) < cores:
        pytest.skip(f"this machine lets the process use {len(os.sched_getaffinity(0))} core(s)")
    dataset = _dataset(data_dir, KERNEL_SIZE_MB)
    res = benchmark.pedantic(measure, args=("mlmix", dataset["path"], cores), rounds=1, iterations=1)
    results[("cores", cores)] = res
    benchmark.extra_info.update({"cores": cores, "work_seconds": round(res["work_seconds"], 2),
                                 "mb_per_s": round(_rate(res), 2)})
    one, two = results.get(("cores", 1)), results.get(("cores", 2))
    if one and two:
        eff = one["work_seconds"] / (2 * two["work_seconds"])
        benchmark.extra_info["parallel_efficiency"] = round(eff, 3)
        print(f"\nbuild on 1 core {one['work_seconds']:.1f} s, on 2 cores {two['work_seconds']:.1f} s: "
              f"parallel efficiency {eff:.2f}")


def _peak_mb(ru) -> float:
    """This process's own peak RSS: VmHWM (a new address space's, reset by exec). ``ru_maxrss`` survives exec
    on Linux, so a child forked from a parent that had grown reports the parent's size when that is larger."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return ru.ru_maxrss / 1024


def _child(variant: str, data: str, out: str, cores: str | None = None) -> None:
    if cores:  # before anything starts a thread: the kernels size their pools from the affinity
        os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[: int(cores)])
    res = VARIANTS[variant](data, out)
    ru = resource.getrusage(resource.RUSAGE_SELF)
    res["peak_rss_mb"] = _peak_mb(ru)
    # CPU seconds (all threads): a steadier figure than wall time on a shared machine
    res["cpu_s"] = ru.ru_utime + ru.ru_stime
    print(json.dumps(res))


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        _child(*sys.argv[2:6])
        sys.exit(0)
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mb", type=float, action="append", help="input size in MB, repeatable (default: %s)"
                    % " ".join(f"{m:g}" for m in SIZES_MB))
    ap.add_argument("--only", choices=tuple(VARIANTS), help="run one variant only")
    ap.add_argument("--kernel", action="store_true",
                    help="the build against the native encoder on the same texts, and on 1 vs 2 cores")
    ap.add_argument("--parquet", action="store_true", help="both sides read the rows as one Parquet file")
    ap.add_argument("--repeat", type=int, default=1,
                    help="--kernel: runs of each variant, taken in turn; each row is its fastest run (the peak: "
                         "the largest); HF runs once")
    args = ap.parse_args()
    if args.repeat < 1:
        ap.error(f"--repeat must be >= 1, got {args.repeat}")
    if args.kernel:
        for mb in args.mb or (KERNEL_SIZE_MB,):
            with tempfile.TemporaryDirectory() as tmp:
                path = os.path.join(tmp, "chat.jsonl")
                info = make_data(path, mb)
                runs: dict = {}
                for _ in range(args.repeat):  # in turn, so that a burst of load hits every variant alike
                    for name, v, cores in (("encode", "encode", None), ("mlmix", "mlmix", None),
                                           ("mlmix_full", "mlmix_full", None), ("mlmix 1 core", "mlmix", 1),
                                           ("mlmix 2 cores", "mlmix", 2)):
                        runs.setdefault(name, []).append(measure(v, path, cores))
                rows = {}
                for name, rs in runs.items():
                    rows[name] = dict(min(rs, key=lambda r: r["work_seconds"]),
                                      peak_rss_mb=max(r["peak_rss_mb"] for r in rs))
                rows["hf"] = measure("hf", path)
            enc = _rate(rows["encode"])
            print(f"{info['bytes'] / 1e6:.1f} MB of JSON lines, {rows['encode']['text_bytes'] / 1e6:.1f} MB of text, "
                  f"{info['records']:,} conversations; uptime load {os.getloadavg()[0]:.1f}", flush=True)
            for v, r in rows.items():
                print(f"  {v:<14} {r['work_seconds']:7.2f} s  {_rate(r):7.1f} MB/s  {_rate(r) / enc:5.2f}x encode_batch  "
                      f"peak {r['peak_rss_mb']:5.0f} MB", flush=True)
            eff = rows["mlmix 1 core"]["work_seconds"] / (2 * rows["mlmix 2 cores"]["work_seconds"])
            print(f"  parallel efficiency 1 -> 2 cores: {eff:.2f}", flush=True)
        sys.exit(0)
    variants = (args.only,) if args.only else ("hf", "mlmix")
    for mb in args.mb or SIZES_MB:
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "chat.jsonl")
            info = make_data(path, mb)
            if args.parquet:
                path = to_parquet(path)
            print(f"{info['bytes'] / 1e6:.1f} MB, {info['records']:,} conversations in 12 languages"
                  + (f", as Parquet ({os.path.getsize(path) / 1e6:.1f} MB)" if args.parquet else ""), flush=True)
            rows = {v: measure(v, path) for v in variants}
        for v, r in rows.items():
            print(f"  {v:<6} {r['seconds']:8.1f} s  cpu {r['cpu_s']:7.1f} s  {info['bytes'] / 1e6 / r['seconds']:6.2f} MB/s  "
                  f"peak {r['peak_rss_mb']:7.0f} MB  "
                  f"{r['tokens']:,} tokens  {r['sequences']:,} sequences  efficiency {r['efficiency']:.2%}", flush=True)
        if len(rows) == 2:
            print(f"  speedup {rows['hf']['seconds'] / rows['mlmix']['seconds']:.2f}x "
                  f"(cpu {rows['hf']['cpu_s'] / rows['mlmix']['cpu_s']:.2f}x), "
                  f"memory {rows['mlmix']['peak_rss_mb'] / rows['hf']['peak_rss_mb']:.2f}x", flush=True)
