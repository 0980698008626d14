"""Exhaustive check of dedup normalisation on short strings (documented run, not in CI: ~3 min).

Idempotence of ``mlmix.dedup.normalize`` over every pair X + Y, X a code point below U+30000 with a case
folding or a decomposition, Y a mark or the second half of a canonical composition (38.9M strings),
in both modes; 300k of them and 200k letter + mark + class-0 mark + mark triples against the
``unicodedata`` reference of tests/test_dedup.py.

    python tests/fuzz/normalize_pairs.py
"""
import os, sys, time, unicodedata, random
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from mlmix import dedup
import test_dedup as T
allc = [chr(c) for c in range(0x30000) if not 0xD800 <= c <= 0xDFFF]
X = [c for c in allc if c.casefold() != c or unicodedata.normalize("NFKD", c) != c]
comp2 = set()
for c in allc:
    d = unicodedata.decomposition(c)
    if d and not d.startswith("<") and len(d.split()) == 2:
        comp2.add(chr(int(d.split()[1], 16)))
Y = sorted(set(c for c in allc if unicodedata.combining(c) or unicodedata.category(c) in ("Mn", "Mc", "Me")) | comp2)
print(len(X), len(Y), len(X) * len(Y), flush=True)
t0 = time.time()
bad = {False: 0, True: 0}
for strip in (False, True):
    for i in range(0, len(X), 200):
        docs = [x + y for x in X[i:i + 200] for y in Y]
        once = dedup.normalize(docs, strip_accents=strip)
        twice = dedup.normalize(once, strip_accents=strip)
        for d, a, b in zip(docs, once, twice):
            if a != b:
                bad[strip] += 1
                if bad[strip] <= 5:
                    print("not idempotent", strip, [hex(ord(c)) for c in d], flush=True)
    print("strip", strip, "failures", bad[strip], round(time.time() - t0), "s", flush=True)
random.seed(1)
sample = random.sample([(x, y) for x in X for y in Y], 300000)
docs = [x + y for x, y in sample]
for strip in (False, True):
    got = dedup.normalize(docs, strip_accents=strip)
    mism = sum(g != T.ref_normalize(d, strip) for g, d in zip(got, docs))
    print("reference mismatches", strip, mism, "of", len(docs), round(time.time() - t0), "s", flush=True)
# triples: letter + (marks of nonzero class, marks of class 0, spacing marks of nonzero class)
M = [c for c in allc if unicodedata.category(c) in ("Mn", "Mc", "Me")]
mc = [c for c in M if unicodedata.combining(c) and unicodedata.category(c) == "Mc"]
mn0 = [c for c in M if not unicodedata.combining(c)][:300]
mnc = [c for c in M if unicodedata.combining(c)][::4]
docs = ["a" + p + q + r for p in mc + mnc[:40] for q in mn0 for r in mc + mnc[:40]]
for strip in (False, True):
    once = dedup.normalize(docs, strip_accents=strip)
    fails = sum(a != b for a, b in zip(once, dedup.normalize(once, strip_accents=strip)))
    ref = sum(g != T.ref_normalize(d, strip) for g, d in zip(once[:200000], docs[:200000]))
    print("triples", len(docs), "strip", strip, "not idempotent", fails, "reference mismatches", ref, flush=True)
