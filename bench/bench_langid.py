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
            "native_1t": LanguageIdentifier(num_threads=1), "native_2t": LanguageIdentifier(num_threads=2)}


def _run(benchmark, name, fn, texts):
    out = benchmark.pedantic(fn, rounds=1 if name == "py3langid" or FULL else 3, iterations=1, warmup_rounds=0)
    mbs = _mb(texts) / benchmark.stats.stats.min
    RESULTS[name] = mbs
    OUTPUTS[name] = out
    benchmark.extra_info.update({"MB_per_s": round(mbs, 2), "MB": round(_mb(texts), 2), "docs": len(texts)})


@pytest.mark.parametrize("name", ["py3langid", "native_1t", "native_2t"])
def test_langid(benchmark, identifiers, texts, name):
    _run(benchmark, name, lambda: identifiers[name].classify_batch(texts), texts)


def test_summary(texts):
    if len(RESULTS) < 3:
        pytest.skip("run the whole file")
    ref_langs, ref_probs = OUTPUTS["py3langid"]
    lines = [f"{len(texts)} texts, {_mb(texts):.2f} MB"]
    for name in ("native_1t", "native_2t"):
        langs, probs = OUTPUTS[name]
        assert langs == ref_langs, f"{name}: labels differ from py3langid"
        rel = np.abs(probs - ref_probs) / np.maximum(ref_probs, 1e-300)
        lines.append(f"{name}: {RESULTS[name]:.2f} MB/s = {RESULTS[name] / RESULTS['py3langid']:.1f}x py3langid "
                     f"({RESULTS['py3langid']:.2f} MB/s); labels equal; max relative probability difference {rel.max():.1e}")
    print("\n" + "\n".join(lines))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mb", type=float, default=TARGET_BYTES / 1e6, help="MB of text")
    args = ap.parse_args()
    texts = make_texts(int(args.mb * 1e6))
    mb = _mb(texts)
    ref = LanguageIdentifier(backend="py3langid")
    t = time.perf_counter()
    ref_langs, ref_probs = ref.classify_batch(texts)
    base = mb / (time.perf_counter() - t)
    print(f"{len(texts)} texts, {mb:.2f} MB")
    print(f"{'variant':<12} {'MB/s':>8} {'ratio':>7} {'labels':>8} {'max rel dp':>11}")
    print(f"{'py3langid':<12} {base:8.2f} {1.0:7.1f} {'-':>8} {'-':>11}")
    for threads in (1, 2):
        lid = LanguageIdentifier(num_threads=threads)
        best = float("inf")
        for _ in range(3):
            t = time.perf_counter()
            langs, probs = lid.classify_batch(texts)
            best = min(best, time.perf_counter() - t)
        same = sum(a == b for a, b in zip(langs, ref_langs))
        rel = float((np.abs(probs - ref_probs) / np.maximum(ref_probs, 1e-300)).max())
        print(f"{f'native {threads}t':<12} {mb / best:8.2f} {mb / best / base:7.1f} {f'{same}/{len(texts)}':>8} {rel:11.1e}")


if __name__ == "__main__":
    main()
