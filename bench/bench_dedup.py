"""Near-duplicate detection: mlmix vs datasketch (MinHash + MinHashLSH) vs rensa (RMinHash + RMinHashLSH).

Same documents (generated multilingual families: Latin, Cyrillic, Arabic, Devanagari words; Chinese
and Thai characters without spaces), same normalisation and shingles (word 5-grams, character
5-grams for scripts without spaces), num_perm=128, threshold 0.8. Each variant runs in its own
process, which reports wall time and peak RSS above its baseline.

- mlmix (all cores; mlmix_1t: num_threads=1): ``near_duplicates`` (normalise, shingle, MinHash, LSH, exact-Jaccard verification,
  union-find), all in one call.
- datasketch / rensa: a Python normaliser + shingler (unicodedata NFKC + casefold, words as
  runs of letters and digits), MinHash, their LSH index (datasketch: its own bands x rows for the threshold; rensa:
  16 bands), candidates accepted when the estimated Jaccard >= threshold, union-find in Python.

Recall and precision are over pairs, against exact Jaccard of the shingle sets: true pairs are the
pairs within a generated family with Jaccard >= threshold (documents of different families share
no 5-grams beyond chance); recall counts true pairs in the same cluster, precision the reported
edges whose exact Jaccard is >= threshold.

    pytest bench/bench_dedup.py                 # quick: 20k documents (datasketch on 4k)
    MLMIX_BENCH_FULL=1 pytest bench/bench_dedup.py   # 200k documents (datasketch on 20k)
    python bench/bench_dedup.py [--docs N]      # same, printed as a table
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import subprocess
import sys
import time
import unicodedata

THRESHOLD = 0.8
NUM_PERM = 128
NGRAM = 5
SEED = 0

WORD_ALPHABETS = {
    "en": "abcdefghijklmnopqrstuvwxyz",
    "ru": "абвгдеёжзийклмнопрстуфхцчшщыьэюя",
    "ar": "ابتثجحخدذرزسشصضطظعغفقكلمنهوي",
    "hi": "कखगघचछजझटठडढणतथदधनपफबभमयरलवशषसह",
}
CHAR_ALPHABETS = {
    "zh": "的一是不了人我在有他这中大来上国个到说们为子和你地出道也时年得就那要下以生会自着去之过家学对可她里后小么心多天而能好都然没日于起还发成事只作当想看文无开手十用主行方又如前所本见经头面公同三已老从动两长",
    "th": "กขคงจฉชซญดตถทนบปผพฟมยรลวสหอฮะาิีึืุูเแโใไ็่้๊๋",
}
PUNCT = [".", ",", "!", "?", "。", "，", "—"]


def make_corpus(n_docs: int, seed: int = 1):
    """Families of 1 base + up to 4 edited copies; returns texts, langs, family ids."""
    rng = random.Random(seed)
    vocab = {lang: ["".join(rng.choice(a) for _ in range(rng.randint(2, 9))) for _ in range(5000)]
             for lang, a in WORD_ALPHABETS.items()}
    langs_all = list(WORD_ALPHABETS) + list(CHAR_ALPHABETS)
    texts, langs, family = [], [], []
    fam = 0
    while len(texts) < n_docs:
        lang = langs_all[fam % len(langs_all)]
        copies = rng.randint(0, 4)
        if lang in WORD_ALPHABETS:
            base = [rng.choice(vocab[lang]) for _ in range(rng.randint(60, 160))]
            pool = vocab[lang]
        else:
            base = [rng.choice(CHAR_ALPHABETS[lang]) for _ in range(rng.randint(150, 400))]
            pool = CHAR_ALPHABETS[lang]
        for c in range(copies + 1):
            toks = list(base)
            for _ in range(c * rng.randint(0, 3)):
                k = rng.randrange(len(toks))
                op = rng.random()
                if op < 0.4:
                    toks[k] = rng.choice(pool)
                elif op < 0.7:
                    del toks[k]
                else:
                    toks.insert(k, rng.choice(pool))
            sep = " " if lang in WORD_ALPHABETS else ""
            text = sep.join(toks)
            if c and rng.random() < 0.5:
                text = text.capitalize() + rng.choice(PUNCT)
            texts.append(text)
            langs.append(lang)
            family.append(fam)
        fam += 1
    return texts[:n_docs], langs[:n_docs], family[:n_docs]


# --------------------------------------------------------------------------------------------
# The Python normaliser + shingler the competitors use (same classes as mlmix's tables).

# Runs of word characters and the combining marks of the corpus's scripts. On this corpus (no
# symbols, no underscores) this splits words exactly where mlmix's separator classes do, at C speed.
_WORD = re.compile("[\\w\u0300-\u036F\u0483-\u0489\u0591-\u05C7\u0610-\u061A\u064B-\u065F\u0670"
                   "\u06D6-\u06ED\u0900-\u0903\u093A-\u094F\u0951-\u0957\u0962\u0963\u0E31\u0E34-\u0E3A"
                   "\u0E47-\u0E4E]+")
_FORMAT = re.compile("[\u00ad\u200b-\u200f\u2060-\u2064\ufeff]")
_NO_SPACE = re.compile("[\u0E00-\u0FFF\u1000-\u109F\u1780-\u17FF\u2E80-\u2FDF\u3040-\u30FF"
                       "\u3400-\u4DBF\u4E00-\u9FFF\uF900-\uFAFF]")


def python_shingles(text: str) -> list[str]:
    """The same normalisation and shingles as mlmix, in plain Python (re and unicodedata)."""
    norm = _FORMAT.sub("", unicodedata.normalize("NFKC", text).casefold())
    tokens = _WORD.findall(norm)
    letters = sum(map(len, tokens))
    if letters and 2 * len(_NO_SPACE.findall(norm)) >= letters:
        chars = "".join(tokens)
        if len(chars) < NGRAM:
            return [chars]
        return [chars[i:i + NGRAM] for i in range(len(chars) - NGRAM + 1)]
    if 0 < len(tokens) < NGRAM:
        return [" ".join(tokens)]
    return [" ".join(tokens[i:i + NGRAM]) for i in range(len(tokens) - NGRAM + 1)]


class _UnionFind:
    def __init__(self, n):
        self.parent = list(range(n))

    def find(self, x):
        while self.parent[x] != x:
            self.parent[x] = self.parent[self.parent[x]]
            x = self.parent[x]
        return x

    def union(self, a, b):
        a, b = self.find(a), self.find(b)
        if a != b:
            self.parent[max(a, b)] = min(a, b)


# --------------------------------------------------------------------------------------------
# Variants: each returns (cluster list, edge list, timings)

def run_mlmix(texts, langs, threads):
    from mlmix import dedup

    t0 = time.perf_counter()
    c0 = time.process_time()
    r = dedup.near_duplicates(texts, threshold=THRESHOLD, num_perm=NUM_PERM, ngram=NGRAM, langs=langs,
                              seed=SEED, num_threads=threads)
    t1 = time.perf_counter()
    return r.cluster.tolist(), r.pairs.tolist(), {"total_s": t1 - t0, "cpu_s": time.process_time() - c0,
                                                  "bands": r.info["bands"], "rows": r.info["rows"]}


def _python_lsh_pipeline(texts, langs, make_digests, build_index, query, est_jaccard):
    t0 = time.perf_counter()
    c0 = time.process_time()
    shingles = [python_shingles(t) for t in texts]
    t1 = time.perf_counter()
    digests = make_digests(shingles)
    index = build_index(digests, langs)
    uf = _UnionFind(len(texts))
    edges = []
    for i, d in enumerate(digests):
        for j in query(index, d, langs[i]):
            if j < i and langs[j] == langs[i] and est_jaccard(digests[j], d) >= THRESHOLD:
                uf.union(j, i)
                edges.append((j, i))
    t2 = time.perf_counter()
    return [uf.find(i) for i in range(len(texts))], edges, {"total_s": t2 - t0, "shingle_s": t1 - t0,
                                                            "minhash_lsh_s": t2 - t1,
                                                            "cpu_s": time.process_time() - c0}


def run_datasketch(texts, langs, threads):
    from datasketch import MinHash, MinHashLSH

    def make(shingles):
        out = []
        for sh in shingles:
            m = MinHash(num_perm=NUM_PERM, seed=SEED)
            m.update_batch([s.encode("utf-8") for s in sh])
            out.append(m)
        return out

    def build(digests, langs):
        lsh = MinHashLSH(threshold=THRESHOLD, num_perm=NUM_PERM)
        for i, m in enumerate(digests):
            lsh.insert(i, m)
        return lsh

    return _python_lsh_pipeline(texts, langs, make, build, lambda lsh, m, _: lsh.query(m),
                                lambda a, b: a.jaccard(b))


def run_rensa(texts, langs, threads):
    from rensa import RMinHash, RMinHashLSH

    def make(shingles):
        return RMinHash.from_token_sets(shingles, NUM_PERM, SEED)

    def build(digests, langs):
        lsh = RMinHashLSH(THRESHOLD, NUM_PERM, 16)
        lsh.insert_many(digests, 0)
        return lsh

    return _python_lsh_pipeline(texts, langs, make, build, lambda lsh, m, _: lsh.query(m),
                                lambda a, b: a.jaccard(b))


def run_mlmix_1t(texts, langs, threads):
    return run_mlmix(texts, langs, 1)


VARIANTS = {"mlmix": run_mlmix, "mlmix_1t": run_mlmix_1t, "datasketch": run_datasketch, "rensa": run_rensa}


def _rss_bytes() -> int:
    import psutil

    return psutil.Process().memory_info().rss


def _peak_rss_bytes() -> int:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def child(variant: str, n_docs: int, threads: int) -> dict:
    texts, langs, family = make_corpus(n_docs)
    base = _rss_bytes()
    cluster, edges, timing = VARIANTS[variant](texts, langs, threads)
    peak = _peak_rss_bytes()
    return {"variant": variant, "docs": len(texts), "mb": sum(len(t.encode()) for t in texts) / 1e6,
            "peak_rss_mb": max(0, peak - base) / 1e6, "cluster": cluster, "edges": edges, **timing}


def run_variant(variant: str, n_docs: int, threads: int = 0) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--child", variant, "--docs", str(n_docs),
           "--threads", str(threads)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True)
    return json.loads(out.stdout.splitlines()[-1])


def quality(texts, family, result) -> dict:
    """Pair recall (same cluster) and precision (reported edges) against exact Jaccard."""
    from collections import defaultdict

    sets = {}

    def shingle_set(i):
        if i not in sets:
            sets[i] = set(python_shingles(texts[i]))
        return sets[i]

    def jac(i, j):
        a, b = shingle_set(i), shingle_set(j)
        return len(a & b) / len(a | b) if a or b else 0.0

    members = defaultdict(list)
    for i, f in enumerate(family):
        members[f].append(i)
    true_pairs = [(i, j) for m in members.values() for k, i in enumerate(m) for j in m[k + 1:]
                  if jac(i, j) >= THRESHOLD]
    cluster = result["cluster"]
    recall = sum(cluster[i] == cluster[j] for i, j in true_pairs) / max(1, len(true_pairs))
    edges = result["edges"]
    precision = sum(jac(i, j) >= THRESHOLD for i, j in edges) / max(1, len(edges))
    return {"true_pairs": len(true_pairs), "recall": recall, "edges": len(edges), "precision": precision}


def sizes() -> tuple[int, int]:
    if os.environ.get("MLMIX_BENCH_FULL"):
        return 200_000, 20_000
    return 20_000, 4_000


def compare(n_docs: int, n_docs_datasketch: int, quality_docs: int = 4000) -> dict:
    rows = {}
    for variant, n in (("mlmix", n_docs), ("mlmix_1t", n_docs), ("rensa", n_docs),
                       ("datasketch", n_docs_datasketch)):
        r = run_variant(variant, n)
        texts, _, family = make_corpus(r["docs"])
        k = min(quality_docs, r["docs"])
        # Quality on the first k documents: families are contiguous, so cut at a family boundary.
        while k < len(family) and family[k] == family[k - 1]:
            k += 1
        sub = {"cluster": r["cluster"][:k], "edges": [e for e in r["edges"] if e[1] < k]}
        q = quality(texts[:k], family[:k], sub)
        rows[variant] = {"docs": r["docs"], "docs_per_s": r["docs"] / r["total_s"],
                         "docs_per_cpu_s": r["docs"] / r["cpu_s"],
                         "mb_per_s": r["mb"] / r["total_s"], "peak_rss_mb": r["peak_rss_mb"],
                         "recall": q["recall"], "precision": q["precision"], "true_pairs": q["true_pairs"],
                         **{key: r[key] for key in ("shingle_s", "minhash_lsh_s", "bands", "rows") if key in r}}
    rows["ratios"] = {
        "mlmix_vs_rensa_docs_per_s": rows["mlmix"]["docs_per_s"] / rows["rensa"]["docs_per_s"],
        "mlmix_vs_datasketch_docs_per_s": rows["mlmix"]["docs_per_s"] / rows["datasketch"]["docs_per_s"],
        "mlmix_1_thread_vs_rensa_docs_per_s": rows["mlmix_1t"]["docs_per_s"] / rows["rensa"]["docs_per_s"],
        "mlmix_1_thread_vs_datasketch_docs_per_s": rows["mlmix_1t"]["docs_per_s"] / rows["datasketch"]["docs_per_s"],
        # CPU time is less disturbed than wall time on a shared machine.
        "mlmix_1_thread_vs_rensa_docs_per_cpu_s": rows["mlmix_1t"]["docs_per_cpu_s"] / rows["rensa"]["docs_per_cpu_s"],
        "mlmix_1_thread_vs_datasketch_docs_per_cpu_s":
            rows["mlmix_1t"]["docs_per_cpu_s"] / rows["datasketch"]["docs_per_cpu_s"],
    }
    return rows


def test_near_duplicates_vs_datasketch_rensa(benchmark):
    n_docs, n_ds = sizes()
    result = benchmark.pedantic(compare, args=(n_docs, n_ds), rounds=1, iterations=1)
    benchmark.extra_info.update(result)
    print(json.dumps(result, indent=1))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--child")
    parser.add_argument("--docs", type=int, default=None)
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="the small default size")
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.docs, args.threads)))
        return
    n_docs, n_ds = sizes()
    if args.docs:
        n_docs, n_ds = args.docs, max(1000, args.docs // 5)
    result = compare(n_docs, n_ds)
    print(f"{'variant':<11}{'docs':>8}{'docs/s':>11}{'docs/cpu-s':>12}{'MB/s':>9}{'peak MB':>9}{'recall':>8}"
          f"{'precision':>10}")
    for v in ("mlmix", "mlmix_1t", "rensa", "datasketch"):
        r = result[v]
        print(f"{v:<11}{r['docs']:>8}{r['docs_per_s']:>11.0f}{r['docs_per_cpu_s']:>12.0f}{r['mb_per_s']:>9.2f}"
              f"{r['peak_rss_mb']:>9.1f}"
              f"{r['recall']:>8.3f}{r['precision']:>10.4f}")
    print(json.dumps(result["ratios"]))


if __name__ == "__main__":
    main()
