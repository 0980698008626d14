"""Reading chat JSON lines into canonical records: the C++ reader (readers.iter_blocks) against the Python path.

    pytest bench/bench_read.py                      # quick: ~8 MB of JSON lines
    MLMIX_BENCH_FULL=1 pytest bench/bench_read.py   # ~50 MB
    MLMIX_BENCH_MB=100 pytest bench/bench_read.py   # any size

The data is the bundled demo data (python/mlmix/data/demo, 12 languages, alpaca-style rows) turned into every
records format the readers know (messages, ShareGPT conversations with a system prompt, alpaca with an input,
prompt/response, text) and perturbed (sentences shuffled and repeated, ids, languages, escaped and raw Unicode),
so that rows differ in length and shape. Variants, all producing the same records of the same file:

  python_iter_source       list(readers.iter_source(src)): json.loads + to_record per line (dicts)
  python_to_block          RecordBlock.from_records(list(iter_source(src))): the same, as columns
  mlmix_iter_blocks[N]     RecordBlock columns from readers.iter_blocks(src, num_threads=N), N = 1, 2

Each reports MB/s (bytes of the file) in extra_info and the ratio to python_iter_source;
test_summary_interleaved runs every variant once per round, in turn, and prints the best of the rounds.

The same rows as Parquet (one file per records format, as datasets ship them: a directory of five files) are
read by the Arrow path (columns from each batch's buffers, no Python object per row) and compared with reading
them row by row (the Python path: ``to_pylist`` + ``to_record`` per row, what mlmix did before) and with
pyarrow's ``to_pylist`` alone (the rows as dicts, nothing more: the floor of any row-by-row reader):

  parquet_python_rows      RecordBlock.from_records(list(iter_source(src)))
  parquet_pyarrow_pylist   every batch of every file to_pylist (no records made)
  parquet_mlmix_blocks     RecordBlock columns from readers.iter_blocks(src)

MB/s there are of the JSON lines the rows came from (the same text), so both tables read alike.

Sources with a ``where`` filter (``{"lang": "en"}``: about one row in fifteen kept; every row is still parsed) are
read the same ways, the filter tested in Python (``iter_source``, what mlmix did before) or by the readers
(the C++ JSON lines reader, the Arrow columns): test_summary_where_interleaved.
"""

from __future__ import annotations

import json
import os
import random
import time

import pytest

MB = float(os.environ.get("MLMIX_BENCH_MB", "50" if os.environ.get("MLMIX_BENCH_FULL") else "8"))
DEMO = os.path.join(os.path.dirname(__file__), os.pardir, "python", "mlmix", "data", "demo")


def _demo_rows() -> list[dict]:
    rows = []
    for name in sorted(os.listdir(DEMO)):
        if name.endswith(".jsonl"):
            with open(os.path.join(DEMO, name), encoding="utf-8") as f:
                rows.extend(json.loads(line) for line in f if line.strip())
    return rows


def _perturb(text: str, rnd: random.Random) -> str:
    parts = [p for p in text.replace("\n", " \n ").split(". ") if p]
    rnd.shuffle(parts)
    out = ". ".join(parts * rnd.randint(1, 4))
    if rnd.random() < 0.3:
        out += f" ({rnd.randint(0, 10 ** 6)})"
    return out


def make_jsonl(path: str, total_mb: float, seed: int = 0) -> int:
    """Writes about total_mb of chat JSON lines made from the demo rows; returns the file's size in bytes."""
    rnd = random.Random(seed)
    rows = _demo_rows()
    size, target, i = 0, int(total_mb * 1e6), 0
    with open(path, "wb") as f:
        while size < target:
            r = rnd.choice(rows)
            q, a, lang = _perturb(r["instruction"], rnd), _perturb(r["response"], rnd), r.get("lang")
            shape = i % 5
            if shape == 0:
                row = {"id": f"m{i}", "lang": lang, "messages": [
                    {"role": "user", "content": q}, {"role": "assistant", "content": a},
                    {"role": "user", "content": _perturb(q, rnd)}, {"role": "assistant", "content": _perturb(a, rnd)}]}
            elif shape == 1:
                row = {"id": i, "system": "You are a helpful assistant.", "conversations": [
                    {"from": "human", "value": q}, {"from": "gpt", "value": a}]}
            elif shape == 2:
                row = {"instruction": q, "input": rnd.choice(["", _perturb(a, rnd)[:200]]), "output": a, "lang": lang}
            elif shape == 3:
                row = {"id": f"p{i}", "prompt": q, "response": a, "lang": lang, "meta": {"split": r.get("split"), "n": i}}
            else:
                row = {"text": q + "\n\n" + a, "lang": lang}
            line = json.dumps(row, ensure_ascii=rnd.random() < 0.25).encode() + b"\n"
            f.write(line)
            size += len(line)
            i += 1
    return size


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from mlmix.config import validate_config

    path = str(tmp_path_factory.mktemp("read") / "chat.jsonl")
    nbytes = make_jsonl(path, MB)
    cfg = {"output": "o", "tokenizer": {"name": "qwen"}, "sources": [{"path": path}]}
    return {"src": validate_config(cfg)["sources"][0], "bytes": nbytes}


def _variants(src):
    from mlmix import readers
    from mlmix.recblock import RecordBlock

    def blocks(threads):
        return lambda: RecordBlock.concat(list(readers.iter_blocks(src, num_threads=threads)))

    return {
        "python_iter_source": lambda: list(readers.iter_source(src)),
        "python_to_block": lambda: RecordBlock.from_records(list(readers.iter_source(src))),
        "mlmix_iter_blocks[1]": blocks(1),
        "mlmix_iter_blocks[2]": blocks(2),
    }


RESULTS: dict[str, float] = {}


def _record(benchmark, name, nbytes):
    secs = benchmark.stats.stats.min
    mbs = nbytes / 1e6 / secs
    RESULTS[name] = mbs
    benchmark.extra_info.update({"MB": round(nbytes / 1e6, 2), "MB/s": round(mbs, 2), "cores": os.cpu_count()})
    if "python_iter_source" in RESULTS and name != "python_iter_source":
        benchmark.extra_info["x_python_iter_source"] = round(mbs / RESULTS["python_iter_source"], 3)


@pytest.mark.parametrize("name", ["python_iter_source", "python_to_block", "mlmix_iter_blocks[1]",
                                  "mlmix_iter_blocks[2]"])
def test_read(benchmark, data, name):
    fn = _variants(data["src"])[name]
    out = benchmark.pedantic(fn, rounds=3, iterations=1, warmup_rounds=0)
    assert len(out) > 0
    _record(benchmark, name, data["bytes"])


def test_summary_interleaved(data, capsys):
    """Every variant once per round, in turn (load from other processes hits all alike); best of the rounds.
    Also checks that the variants agree."""
    from mlmix.recblock import RecordBlock

    variants = _variants(data["src"])
    ref = RecordBlock.from_records(variants["python_iter_source"]())
    for name in ("mlmix_iter_blocks[1]", "mlmix_iter_blocks[2]"):
        assert variants[name]().equals(ref), name
    rounds = int(os.environ.get("MLMIX_BENCH_ROUNDS", "3"))
    wall = {name: float("inf") for name in variants}
    cpu = dict(wall)
    for _ in range(rounds):
        for name, fn in variants.items():
            w0, c0 = time.perf_counter(), time.process_time()
            fn()
            wall[name] = min(wall[name], time.perf_counter() - w0)
            cpu[name] = min(cpu[name], time.process_time() - c0)
    mb = data["bytes"] / 1e6
    with capsys.disabled():
        print(f"\n{mb:.1f} MB of chat JSON lines ({len(ref)} records), {os.cpu_count()} cores, best of {rounds} "
              "interleaved rounds; MB/s of the file by wall clock and per CPU-second; ratios to python_iter_source")
        base_w, base_c = mb / wall["python_iter_source"], mb / cpu["python_iter_source"]
        for name in variants:
            w, c = mb / wall[name], mb / cpu[name]
            print(f"  {name:24s} wall {w:8.2f} MB/s {w / base_w:6.2f}x   cpu {c:8.2f} MB/s {c / base_c:6.2f}x")
    assert all(v > 0 for v in wall.values())


def _interleaved(variants: dict) -> tuple[int, dict[str, float]]:
    """(rounds, best wall seconds of each variant): every variant once per round, in turn (load from other
    processes hits all alike); ``MLMIX_BENCH_ROUNDS`` rounds (3)."""
    rounds = int(os.environ.get("MLMIX_BENCH_ROUNDS", "3"))
    wall = {name: float("inf") for name in variants}
    for _ in range(rounds):
        for name, fn in variants.items():
            w0 = time.perf_counter()
            fn()
            wall[name] = min(wall[name], time.perf_counter() - w0)
    return rounds, wall


# ---- Parquet ------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def parquet_data(tmp_path_factory, data):
    """The JSON lines of ``data`` as a directory of Parquet files, one per records format (a file's rows share
    a schema)."""
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    from mlmix.config import validate_config

    by_shape: dict[tuple, list] = {}
    with open(data["src"]["path"], encoding="utf-8") as f:
        for line in f:
            row = json.loads(line)
            by_shape.setdefault(tuple(sorted(row)), []).append(row)
    d = tmp_path_factory.mktemp("read_parquet")
    for k, rows in enumerate(by_shape.values()):
        pq.write_table(pa.Table.from_pylist(rows), str(d / f"part-{k}.parquet"), row_group_size=1000)
    cfg = {"output": "o", "tokenizer": {"name": "qwen"}, "sources": [{"path": str(d)}]}
    return {"src": validate_config(cfg)["sources"][0], "bytes": data["bytes"], "dir": str(d)}


def _parquet_variants(src, directory):
    import pyarrow.parquet as pq

    from mlmix import readers
    from mlmix.recblock import RecordBlock

    def pylist():
        n = 0
        for name in sorted(os.listdir(directory)):
            for batch in pq.ParquetFile(os.path.join(directory, name)).iter_batches(batch_size=8192):
                n += len(batch.to_pylist())
        return [None] * n

    return {
        "parquet_python_rows": lambda: RecordBlock.from_records(list(readers.iter_source(src))),
        "parquet_pyarrow_pylist": pylist,
        "parquet_mlmix_blocks": lambda: RecordBlock.concat(list(readers.iter_blocks(src))),
    }


@pytest.mark.parametrize("name", ["parquet_python_rows", "parquet_pyarrow_pylist", "parquet_mlmix_blocks"])
def test_read_parquet(benchmark, parquet_data, name):
    fn = _parquet_variants(parquet_data["src"], parquet_data["dir"])[name]
    out = benchmark.pedantic(fn, rounds=3, iterations=1, warmup_rounds=0)
    assert len(out) > 0
    secs = benchmark.stats.stats.min
    mbs = parquet_data["bytes"] / 1e6 / secs
    RESULTS[name] = mbs
    benchmark.extra_info.update({"MB": round(parquet_data["bytes"] / 1e6, 2), "MB/s": round(mbs, 2),
                                 "records": len(out), "cores": os.cpu_count()})
    if "parquet_python_rows" in RESULTS and name != "parquet_python_rows":
        benchmark.extra_info["x_parquet_python_rows"] = round(mbs / RESULTS["parquet_python_rows"], 3)


def test_summary_parquet_interleaved(parquet_data, capsys):
    """The Parquet variants once per round, in turn; best of the rounds. Also checks that the Arrow path gives the
    row-by-row path's records."""
    variants = _parquet_variants(parquet_data["src"], parquet_data["dir"])
    ref = variants["parquet_python_rows"]()
    assert variants["parquet_mlmix_blocks"]().equals(ref)
    rounds, wall = _interleaved(variants)
    mb = parquet_data["bytes"] / 1e6
    with capsys.disabled():
        print(f"\n{mb:.1f} MB of chat rows as Parquet ({len(ref)} records, 5 files), {os.cpu_count()} cores, best of "
              f"{rounds} interleaved rounds; MB/s of the rows' JSON lines; ratios to parquet_python_rows")
        base = mb / wall["parquet_python_rows"]
        for name in variants:
            w = mb / wall[name]
            print(f"  {name:24s} wall {w:8.2f} MB/s {w / base:6.2f}x  {len(ref) / wall[name]:12,.0f} records/s")
    assert all(v > 0 for v in wall.values())


# ---- where filters ------------------------------------------------------------------------------------------------
WHERE = {"lang": "en"}


def test_summary_where_interleaved(data, parquet_data, capsys):
    """Filtered sources, JSON lines and Parquet: the filter tested per row in Python (iter_source) against the
    readers' own test; once per round, in turn, best of the rounds. Also checks that both give the same records."""
    from mlmix import readers
    from mlmix.recblock import RecordBlock

    jsrc, psrc = dict(data["src"], where=WHERE), dict(parquet_data["src"], where=WHERE)

    def blocks(src, threads=0):
        return lambda: RecordBlock.concat(list(readers.iter_blocks(src, num_threads=threads)))

    variants = {
        "jsonl_python_where": lambda: RecordBlock.from_records(list(readers.iter_source(jsrc))),
        "jsonl_mlmix_where[1]": blocks(jsrc, 1),
        "jsonl_mlmix_where[2]": blocks(jsrc, 2),
        "parquet_python_where": lambda: RecordBlock.from_records(list(readers.iter_source(psrc))),
        "parquet_mlmix_where": blocks(psrc),
    }
    for a, b in (("jsonl_python_where", "jsonl_mlmix_where[2]"), ("parquet_python_where", "parquet_mlmix_where")):
        ref = variants[a]()
        assert len(ref) and variants[b]().equals(ref), b
    rounds, wall = _interleaved(variants)
    mb = data["bytes"] / 1e6
    with capsys.disabled():
        print(f"\n{mb:.1f} MB of chat rows filtered by where={WHERE} ({len(ref)} records kept), {os.cpu_count()} "
              f"cores, best of {rounds} interleaved rounds; MB/s of the JSON lines; ratios to the Python filter")
        for name in variants:
            base = wall["jsonl_python_where" if name.startswith("jsonl") else "parquet_python_where"]
            print(f"  {name:24s} wall {mb / wall[name]:8.2f} MB/s {base / wall[name]:6.2f}x")
    assert all(v > 0 for v in wall.values())
