"""atheris target: the native language identifier (mlmix.langid, backend "native"), differentially
against py3langid.

Texts are cut from the input bytes and given as str (decoded with surrogateescape, so invalid UTF-8
becomes lone surrogates, which py3langid encodes with surrogatepass), as UTF-8 ``(values, offsets)``
(invalid UTF-8 must raise a ValueError naming the first bad text, never crash), or as a list of bytes.
Some inputs restrict the languages. Beyond "no crash": labels and probabilities equal py3langid's own
pipeline summed in float64 (labels exactly, probabilities to 1e-9), labels equal py3langid's except
where its float32 top two are within its rounding, and nothing depends on the thread count.
"""

import math

import atheris
import numpy as np

from _common import CLEAN, main

with atheris.instrument_imports(include=["mlmix"]):
    from mlmix.langid import LanguageIdentifier, known_languages

from py3langid import langid as _py3  # noqa: E402

LANGS = sorted(known_languages())
_CACHE: dict = {}


def _pair(langs):
    key = tuple(langs) if langs else None
    if key not in _CACHE:
        if len(_CACHE) >= 16:  # each restricted py3langid holds its own slice of the model (up to ~28 MB)
            del _CACHE[next(iter(_CACHE))]
        _CACHE[key] = (LanguageIdentifier(langs, num_threads=1), LanguageIdentifier(langs, num_threads=3),
                       LanguageIdentifier(langs, backend="py3langid"))
    return _CACHE[key]


def _exact(ref, texts):
    m = ref._model
    out = []
    for t in texts:
        if not t.strip():
            out.append(("", 0.0))
            continue
        b = m._encode(t[:2000])
        v = _py3.visit_counts(m.tk_nextmove, m._rowbase, m.tk_output, b)
        if v:
            idx = np.fromiter(v.keys(), dtype=np.intp)
            w = np.log1p(np.fromiter(v.values(), dtype=np.float32)).astype(np.float64)
            s = w @ m.nb_ptc[idx].astype(np.float64) + m.nb_pc.astype(np.float64)
        else:
            s = np.zeros(len(m.nb_classes))
        s = s * (1.0 / math.sqrt(len(b) or 1))
        e = np.exp(s - s.max())
        e /= e.sum()
        for i, j in m._alias_pairs:
            e[i] += e[j]
            e[j] = 0.0
        k = int(e.argmax())
        out.append((m.nb_classes[k], float(e[k])))
    return out


def TestOneInput(data: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(data)
    form = fdp.ConsumeIntInRange(0, 2)
    restrict = fdp.ConsumeIntInRange(0, 3)
    langs = sorted({fdp.PickValueInList(LANGS) for _ in range(restrict)}) if restrict else None
    repeat = fdp.ConsumeIntInRange(0, 3)
    raw = fdp.ConsumeBytes(fdp.remaining_bytes())
    parts = raw.split(b"\xfe")[:24]
    if repeat and parts:  # a text beyond the 2000 code point cut
        parts[0] = parts[0] * (2100 // max(len(parts[0]), 1) + 1) if parts[0] else parts[0]
    one, three, ref = _pair(langs)
    if form == 1:
        values = np.frombuffer(b"".join(parts), np.uint8).copy()
        offsets = np.zeros(len(parts) + 1, np.int64)
        np.cumsum([len(p) for p in parts], out=offsets[1:])
        first_bad = None
        for i, p in enumerate(parts):
            try:
                p.decode("utf-8")
            except UnicodeDecodeError:
                first_bad = i
                break
        try:
            got = one.classify_batch((values, offsets))
        except CLEAN as exc:
            assert first_bad is not None and isinstance(exc, ValueError), exc
            assert f"texts[{first_bad}]" in str(exc), (first_bad, str(exc))
            return
        assert first_bad is None, "invalid UTF-8 accepted"
        texts = [p.decode("utf-8") for p in parts]
        other = three.classify_batch((values, offsets))
    elif form == 2:
        texts = [p.decode("utf-8", "replace") for p in parts]
        docs = [t.encode("utf-8") for t in texts]
        got = one.classify_batch(docs)
        other = three.classify_batch(docs)
    else:
        texts = [p.decode("utf-8", "surrogateescape") for p in parts]
        got = one.classify_batch(texts)
        other = three.classify_batch(texts)
    assert got[0] == other[0] and np.array_equal(got[1], other[1]), "thread count changed the result"
    exact = _exact(ref, texts)
    for (lang, p), (e_lang, e_p) in zip(zip(*got), exact):
        assert lang == e_lang and abs(p - e_p) <= 1e-9 * max(e_p, 1e-300), (lang, p, e_lang, e_p)
    # py3langid itself: its float32 probabilities within its rounding; a label may differ only on such a
    # near-tie (then the two winners' probabilities are within that rounding too, which the check covers)
    r_langs, r_probs = ref.classify_batch(texts)
    for i, r_lang in enumerate(r_langs):
        assert abs(got[1][i] - r_probs[i]) <= 1e-3 * max(r_probs[i], 1e-300), (texts[i], got[0][i], r_lang)


if __name__ == "__main__":
    main(TestOneInput)
