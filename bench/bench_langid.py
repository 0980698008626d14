"""Language identification: mlmix's native backend vs py3langid itself, the same texts, labels compared.

    pytest bench/bench_langid.py                      # ~2 MB of text (quick)
    MLMIX_BENCH_FULL=1 pytest bench/bench_langid.py   # ~10 MB
    python bench/bench_langid.py [--mb N]             # same, printed as a table

Texts: the multilingual demo records (12 languages) cut into documents of varied length: single
instructions (tens of bytes), whole records, and random concatenations of up to four records (some
longer than the 2000 code points both backends read). Variants: ``py3langid`` (mlmix.langid's reference
backend: py3langid's ``classify`` one text at a time, single-threaded like py3langid) and ``native`` with
1 and 2 threads (one ``classify_batch`` call). MB/s counts the UTF-8 bytes of the texts as given;
``test_summary`` reports the ratios and checks that every label agrees and how far the probabilities are
apart (py3langid's are float32, summed in the BLAS's order; the native ones exact in double).

The ``_12`` variants restrict both backends to the demo's 12 languages (``languages=``, py3langid's
``set_languages``), as a build does when it knows its corpus's languages; the native backend then scores from
its own cut of the model's table.
"""

from __future__ import annotations

import argparse
import os
import random
import time

import numpy as np
import pytest

pytest.importorskip("py3langid")

from mlmix.langid import LanguageIdentifier  # noqa: E402

FULL = os.environ.get("MLMIX_BENCH_FULL") == "1"
TARGET_BYTES = (10 if FULL else 2) * 1_000_000
RESULTS: dict[str, float] = {}
OUTPUTS: dict[str, tuple] = {}


def make_texts(target_bytes: int, seed: int = 0) -> list[str]:
    from mlmix.data import demo_records

    recs = demo_records()
    rng = random.Random(seed)
    docs, size = [], 0
    while size < target_bytes:
        kind = rng.random()
        if kind < 0.3:
            doc = rng.choice(recs)["instruction"]
        elif kind < 0.7:
            r = rng.choice(recs)
            doc = r["instruction"] + "\n" + r["response"]
        else:
            doc = "\n\n".join(rng.choice(recs)["response"] for _ in range(rng.randint(2, 4)))
        docs.append(doc)
        size += len(doc.encode())
    return docs


def _mb(texts) -> float:
    return sum(len(t.encode()) for t in texts) / 1e6


@pytest.fixture(scope="module")
def texts() -> list[str]:
    return make_texts(TARGET_BYTES)


@pytest.fixture(scope="module")
def identifiers():
    return {"py3langid": LanguageIdentifier(backend="py3langid"),
            "native_1t": LanguageIdentifier(num_threads=1), "native_2t": LanguageIdentifier(num_threads=2),
            "py3langid_12": LanguageIdentifier(DEMO_LANGS, backend="py3langid"),
            "native_12_1t": LanguageIdentifier(DEMO_LANGS, num_threads=1),
            "native_12_2t": LanguageIdentifier(DEMO_LANGS, num_threads=2)}


DEMO_LANGS = ["ar", "cs", "en", "es", "et", "fi", "he", "hi", "it", "ru", "sw", "zh"]


def _run(benchmark, name, fn, texts):
    out = benchmark.pedantic(fn, rounds=1 if name.startswith("py3langid") or FULL else 3, iterations=1,
                             warmup_rounds=0)
    mbs = _mb(texts) / benchmark.stats.stats.min
    RESULTS[name] = mbs
    OUTPUTS[name] = out
    benchmark.extra_info.update({"MB_per_s": round(mbs, 2), "MB": round(_mb(texts), 2), "docs": len(texts)})


@pytest.mark.parametrize("name", ["py3langid", "native_1t", "native_2t", "py3langid_12", "native_12_1t",
                                  "native_12_2t"])
def test_langid(benchmark, identifiers, texts, name):
    _run(benchmark, name, lambda: identifiers[name].classify_batch(texts), texts)


def test_summary(texts):
    if len(RESULTS) < 6:
        pytest.skip("run the whole file")
    lines = [f"{len(texts)} texts, {_mb(texts):.2f} MB"]
    for ref, names in (("py3langid", ("native_1t", "native_2t")), ("py3langid_12", ("native_12_1t", "native_12_2t"))):
        ref_langs, ref_probs = OUTPUTS[ref]
        for name in names:
            langs, probs = OUTPUTS[name]
            assert langs == ref_langs, f"{name}: labels differ from {ref}"
            rel = np.abs(probs - ref_probs) / np.maximum(ref_probs, 1e-300)
            lines.append(f"{name}: {RESULTS[name]:.2f} MB/s = {RESULTS[name] / RESULTS[ref]:.1f}x {ref} "
                         f"({RESULTS[ref]:.2f} MB/s); labels equal; max relative probability difference "
                         f"{rel.max():.1e}")
    print("\n" + "\n".join(lines))


def _timed(fn, rounds: int):
    """(result, best wall seconds, best CPU seconds of this process) over ``rounds`` runs."""
    wall = cpu = float("inf")
    for _ in range(rounds):
        w, c = time.perf_counter(), time.process_time()
        out = fn()
        wall, cpu = min(wall, time.perf_counter() - w), min(cpu, time.process_time() - c)
    return out, wall, cpu


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mb", type=float, default=TARGET_BYTES / 1e6, help="MB of text")
    ap.add_argument("--rounds", type=int, default=3, help="runs of each native variant (the best counts)")
    args = ap.parse_args()
    texts = make_texts(int(args.mb * 1e6))
    mb = _mb(texts)
    ref = LanguageIdentifier(backend="py3langid")
    (ref_langs, ref_probs), wall, cpu = _timed(lambda: ref.classify_batch(texts), 1)
    base, base_cpu = mb / wall, mb / cpu
    print(f"{len(texts)} texts, {mb:.2f} MB; MB/s by wall time, and by this process's CPU time (fairer on a "
          "shared machine for one thread)")
    print(f"{'variant':<12} {'MB/s':>8} {'ratio':>7} {'MB/CPU-s':>9} {'ratio':>7} {'labels':>11} {'max rel dp':>11}")
    print(f"{'py3langid':<12} {base:8.2f} {1.0:7.1f} {base_cpu:9.2f} {1.0:7.1f} {'-':>11} {'-':>11}")
    for threads in (1, 2):
        lid = LanguageIdentifier(num_threads=threads)
        (langs, probs), wall, cpu = _timed(lambda: lid.classify_batch(texts), args.rounds)
        same = sum(a == b for a, b in zip(langs, ref_langs))
        rel = float((np.abs(probs - ref_probs) / np.maximum(ref_probs, 1e-300)).max())
        print(f"{f'native {threads}t':<12} {mb / wall:8.2f} {mb / wall / base:7.1f} {mb / cpu:9.2f} "
              f"{mb / cpu / base_cpu:7.1f} {f'{same}/{len(texts)}':>11} {rel:11.1e}")
    # both restricted to the demo's 12 languages
    ref12 = LanguageIdentifier(DEMO_LANGS, backend="py3langid")
    (ref_langs, ref_probs), wall, cpu = _timed(lambda: ref12.classify_batch(texts), 1)
    base, base_cpu = mb / wall, mb / cpu
    print(f"{'py3langid 12':<12} {base:8.2f} {1.0:7.1f} {base_cpu:9.2f} {1.0:7.1f} {'-':>11} {'-':>11}")
    for threads in (1, 2):
        lid = LanguageIdentifier(DEMO_LANGS, num_threads=threads)
        (langs, probs), wall, cpu = _timed(lambda: lid.classify_batch(texts), args.rounds)
        same = sum(a == b for a, b in zip(langs, ref_langs))
        rel = float((np.abs(probs - ref_probs) / np.maximum(ref_probs, 1e-300)).max())
        print(f"{f'native 12 {threads}t':<12} {mb / wall:8.2f} {mb / wall / base:7.1f} {mb / cpu:9.2f} "
              f"{mb / cpu / base_cpu:7.1f} {f'{same}/{len(texts)}':>11} {rel:11.1e}")


if __name__ == "__main__":
    main()
