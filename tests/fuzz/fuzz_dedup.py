"""atheris target: mlmix.dedup (normalize, exact and near duplicates) on arbitrary documents.

Documents are cut from the input bytes and given as str (decoded with surrogateescape, so invalid
UTF-8 becomes lone surrogates), as raw bytes, or mixed. Beyond "no crash": identical documents are
always in one cluster, every cluster keeps exactly one document, the result does not depend on the
thread count, and errors="strict" raises only when some document is not valid UTF-8.
"""

import atheris
import numpy as np

from _common import CLEAN, main

with atheris.instrument_imports(include=["mlmix"]):
    import mlmix.dedup as dd


def _valid(doc) -> bool:
    try:
        (doc if isinstance(doc, bytes) else doc.encode("utf-8")).decode("utf-8")
        return True
    except UnicodeError:
        return False


def TestOneInput(data: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(data)
    mode = fdp.ConsumeIntInRange(0, 2)
    strict = fdp.ConsumeBool()
    fn = fdp.ConsumeIntInRange(0, 2)
    num_perm = fdp.PickValueInList([1, 2, 8, 16, 32])
    ngram = fdp.ConsumeIntInRange(1, 6)
    shingle = fdp.PickValueInList(["auto", "word", "char"])
    strip = fdp.ConsumeBool()
    threshold = fdp.PickValueInList([0.1, 0.5, 0.8, 1.0])
    raw = fdp.ConsumeBytes(fdp.remaining_bytes())
    parts = raw.split(b"\xfe")[:64]
    docs = []
    for i, p in enumerate(parts):
        as_bytes = mode == 1 or (mode == 2 and i % 2)
        docs.append(p if as_bytes else p.decode("utf-8", "surrogateescape"))
    if len(docs) > 1:
        docs.append(docs[0])  # a guaranteed exact duplicate
    errors = "strict" if strict else "replace"
    try:
        if fn == 0:
            out = dd.normalize(docs, strip_accents=strip, errors=errors)
            assert len(out) == len(docs)
            again = dd.normalize(out, strip_accents=strip, errors=errors)
            assert again == out, "normalize is not idempotent"
            return
        if fn == 1:
            res = dd.exact_duplicates(docs, strip_accents=strip, errors=errors, num_threads=1)
            other = dd.exact_duplicates(docs, strip_accents=strip, errors=errors, num_threads=3)
        else:
            res = dd.near_duplicates(docs, threshold=threshold, num_perm=num_perm, ngram=ngram, shingle=shingle,
                                     strip_accents=strip, errors=errors, num_threads=1)
            other = dd.near_duplicates(docs, threshold=threshold, num_perm=num_perm, ngram=ngram, shingle=shingle,
                                       strip_accents=strip, errors=errors, num_threads=3)
    except CLEAN as exc:
        if strict and isinstance(exc, ValueError) and not all(_valid(d) for d in docs):
            return
        if fn != 2 or "bands" not in str(exc):  # (num_perm without a banding for the threshold)
            raise
        return
    assert not strict or all(_valid(d) for d in docs), "strict accepted invalid UTF-8"
    n = len(docs)
    assert res.cluster.shape == (n,) and res.keep.shape == (n,)
    assert np.array_equal(res.cluster, other.cluster), "thread count changed the clusters"
    assert (res.cluster[res.cluster] == res.cluster).all(), "a cluster's representative is not its own"
    assert (res.keep == (res.cluster == np.arange(n))).all(), "keep does not mark the representatives"
    if n > 1:
        assert res.cluster[0] == res.cluster[n - 1], "identical documents in different clusters"


if __name__ == "__main__":
    main(TestOneInput)
