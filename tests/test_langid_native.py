"""The native langid backend against py3langid (mlmix.langid's reference backend).

Two references. ``py3langid``: the labels must be identical; its probabilities are float32 sums done in
OpenBLAS's order (which changes with the CPU kernel: up to ~5e-6 relative between OpenBLAS's Haswell and
Sandybridge kernels on the same texts, ~1.6e-4 on 700-byte texts), so they are compared to within
``REF_TOL``. ``exact``: py3langid's own pipeline (its ``_encode``, ``visit_counts`` and model arrays) with
the naive Bayes sums and the normalisation done in float64; the native backend must equal it to 1e-9
relative, labels included, on every text.
"""

from __future__ import annotations

import math
import string

import numpy as np
import pytest

pytest.importorskip("py3langid")

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from mlmix.langid import LanguageIdentifier, _text_rules, identify, known_languages  # noqa: E402

REF_TOL = 1e-3  # py3langid's float32 rounding (see the module docstring); the exact reference is held to 1e-9
EXACT_TOL = 1e-9
WHITESPACE = "".join(chr(c) for c in range(0x110000) if chr(c).isspace())


@pytest.fixture(scope="module")
def native():
    return LanguageIdentifier()


@pytest.fixture(scope="module")
def reference():
    return LanguageIdentifier(backend="py3langid")


def _exact(lid_ref: LanguageIdentifier, texts):
    """py3langid's classification with its sums and normalisation in float64 (its own _encode and DFA)."""
    from py3langid import langid

    m = lid_ref._model
    ptc, pc = m.nb_ptc.astype(np.float64), m.nb_pc.astype(np.float64)
    langs, probs = [], []
    for t in texts:
        if not t.strip():
            langs.append("")
            probs.append(0.0)
            continue
        b = m._encode(t[:2000])
        v = langid.visit_counts(m.tk_nextmove, m._rowbase, m.tk_output, b)
        if v:
            idx = np.fromiter(v.keys(), dtype=np.intp)
            w = np.log1p(np.fromiter(v.values(), dtype=np.float32)).astype(np.float64)
            s = w @ ptc[idx] + pc
        else:
            s = np.zeros(len(m.nb_classes))
        s = s * (1.0 / math.sqrt(len(b) or 1))
        e = np.exp(s - s.max())
        e /= e.sum()
        for i, j in m._alias_pairs:
            e[i] += e[j]
            e[j] = 0.0
        k = int(e.argmax())
        langs.append(m.nb_classes[k])
        probs.append(float(e[k]))
    return langs, np.array(probs)


def _check(native_lid, ref_lid, texts, *, ref_labels=True):
    langs, probs = native_lid.classify_batch(texts)
    assert isinstance(probs, np.ndarray) and probs.dtype == np.float64 and len(langs) == len(texts)
    ex_langs, ex_probs = _exact(ref_lid, texts)
    assert langs == ex_langs
    np.testing.assert_allclose(probs, ex_probs, rtol=EXACT_TOL, atol=0)
    r_langs, r_probs = ref_lid.classify_batch(texts)
    if ref_labels:
        assert langs == r_langs
    else:  # random text: a label may differ only where py3langid's own top two are within its rounding
        for i in np.flatnonzero([a != b for a, b in zip(langs, r_langs)]):
            assert abs(probs[i] - r_probs[i]) <= REF_TOL * r_probs[i], (texts[i], langs[i], r_langs[i])
    np.testing.assert_allclose(probs, r_probs, rtol=REF_TOL, atol=0)
    return langs, probs


def _demo_texts():
    from mlmix.data import demo_records

    out = []
    for r in demo_records():
        out += [r["instruction"], r["response"], r["instruction"] + "\n" + r["response"]]
    return out


def _utf8(texts):
    enc = [t.encode("utf-8", "surrogatepass") for t in texts]
    offsets = np.zeros(len(enc) + 1, np.int64)
    np.cumsum([len(e) for e in enc], out=offsets[1:])
    return np.frombuffer(b"".join(enc), np.uint8).copy(), offsets


# --- the multilingual fixture ------------------------------------------------------------------


def test_demo_data_identical_labels(native, reference):
    texts = _demo_texts()
    langs, _ = _check(native, reference, texts)
    assert len(set(langs)) >= 12


def test_utf8_pair_equals_list_of_str(native):
    texts = _demo_texts()[:300] + ["", " \t", "ÉCOLE NORMALE", "e\u0301te\u0301"]
    a_langs, a_probs = native.classify_batch(texts)
    b_langs, b_probs = native.classify_batch(_utf8(texts))
    assert a_langs == b_langs
    assert np.array_equal(a_probs, b_probs)


def test_classify_and_identify_match_the_batch(native, reference):
    texts = _demo_texts()[:40] + ["", "   "]
    langs, probs = native.classify_batch(texts)
    for t, lang, p in zip(texts, langs, probs.tolist()):
        assert native.classify(t) == (lang, p)
    got, got_p = identify(texts, threshold=0.9, unknown="??")
    assert got == [lang if lang and p >= 0.9 else "??" for lang, p in zip(langs, probs.tolist())]
    assert got_p == probs.tolist()
    ref, _ = identify(texts, threshold=0.9, unknown="??", backend="py3langid")
    assert ref == got


# --- text preparation: strip, the cut, py3langid's _encode -------------------------------------


def test_empty_after_python_strip(native, reference):
    texts = ["", " ", "\t\n\r\x0b\x0c", "\x1c\x1d\x1e\x1f\x85\xa0", "\u1680\u2000\u200a\u2028\u2029\u202f\u205f\u3000",
             WHITESPACE, WHITESPACE * 300]
    langs, probs = native.classify_batch(texts)
    assert langs == [""] * len(texts) and not probs.any()
    # not whitespace to Python: these are classified
    texts = ["\u200b", "\ufeff", "_", "\x00", " . "]
    langs, _ = _check(native, reference, texts)
    assert all(langs)


def test_cut_at_2000_code_points(native, reference):
    ru = "Сегодня прекрасная погода, и мы гуляем в парке. "
    texts = ["The weather is lovely today. " * 69 + ru * 100,  # English in the first 2000
             "a" * 1999 + ru * 10, "😀" * 2000 + ru, "\u0915\u094d" * 1000 + ru * 50,
             " " * 2100 + "hello world",  # not empty (strip sees the tail), classified on the spaces
             "\n" * 1999 + "x" + ru * 10]
    langs, _ = _check(native, reference, texts)
    assert langs[0] == "en"
    assert native.classify_batch([ru * 100])[0] == ["ru"]


def test_texts_py3langid_rewrites(native, reference):
    """All upper case (lower-cased), not NFC (composed), lone surrogates: prepared by py3langid's _encode."""
    texts = ["THE QUICK BROWN FOX JUMPS OVER THE LAZY DOG", "ΚΑΛΗΜΕΡΑ ΚΟΣΜΟΣ ΣΑΣ", "İSTANBUL BÜYÜKŞEHİR",
             "STRASSE ẞ", "IPA\n_ዶሴዎች", "e\u0301te\u0301 a\u0300 la\u0300", "\u1100\u1161\u11a8 \u1100\u1161",
             "\u212b \u0958 \u0344", "x\u0301 q\u0308", "a\u0328\u0301", "e\u0301\u0328",
             "caf\udce9 na\ud800ve", "\ud83d", "ǅemal ǈuba", "Ⅻ ⓐ", "A", "a"]
    _check(native, reference, texts)


def test_text_rules_ascii_assumptions():
    """csrc/langid.cpp's ASCII fast path: ASCII is a starter, NFC, never the second of a composition, and
    upper / lower case are exactly A-Z / a-z."""
    flags, ccc, pairs = _text_rules()
    for cp in range(128):
        ch = chr(cp)
        assert ccc[cp] == 0 and not flags[cp] & (8 | 16)
        assert bool(flags[cp] & 2) == ("A" <= ch <= "Z")
        assert bool(flags[cp] & 4) == ("a" <= ch <= "z")
    assert not any((int(p) & 0x1FFFFF) < 128 for p in pairs)
    # a one-char str.isupper() (CPython's fast path) equals the per-char rule the core applies
    assert not ((flags & 2).astype(bool) & (flags & 4).astype(bool)).any()
    assert list(pairs) == sorted(set(pairs.tolist()))


# --- hypothesis ----------------------------------------------------------------------------------

SCRIPTS = [string.ascii_letters + " .,", "абвгдежзийклмнопрстуфхцчшщыьэюя ", "αβγδεζηθικλμνξοπρστυφχψω ",
           "ابتثجحخدذرزسشصضطظعغفقكلمنهوي ", "कखगघचछजझटठडढणतथदधनपफबभमयरलवशषसह ािीुूे्ं",
           "的一是不了人我在有他这中大来上国个到说们为子和你地出道也", "กขคงจฉชซญดตถทนบปผพฟมยรลวสหอฮะาิีึืุู ",
           "\u0300\u0301\u0308\u0327\u0328\u093c\u09be\u0bbe\u1161\u11a8", WHITESPACE[:12]]


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.text(max_size=60), min_size=1, max_size=12))
def test_hypothesis_unicode(native, reference, texts):
    _check(native, reference, texts, ref_labels=False)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.lists(st.tuples(st.sampled_from(SCRIPTS), st.integers(0, 40)), max_size=6), min_size=1,
                max_size=8), st.randoms(use_true_random=False))
def test_hypothesis_mixed_scripts(native, reference, spec, rnd):
    texts = ["".join("".join(rnd.choice(alpha) for _ in range(n)) for alpha, n in parts) for parts in spec]
    texts = [t.upper() if rnd.random() < 0.2 else t for t in texts]
    _check(native, reference, texts, ref_labels=False)


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.integers(1900, 2100), st.sampled_from(SCRIPTS[:-1]), st.randoms(use_true_random=False))
def test_hypothesis_long_texts(native, reference, n, alpha, rnd):
    text = "".join(rnd.choice(alpha) for _ in range(n)) + "Сегодня прекрасная погода " * 5
    _check(native, reference, [text], ref_labels=False)


# --- UTF-8 input -------------------------------------------------------------------------------


@pytest.mark.parametrize("bad", [b"\xff", b"\xc0\x80", b"\xe0\x80\x80", b"\xed\xa0\x80", b"\xf4\x90\x80\x80",
                                 b"\xf5\x80\x80\x80", b"abc\xe2\x82", b"\x80", b"ok \xc3"])
def test_invalid_utf8_names_the_text(native, bad):
    good = [t.encode() for t in ["hello world", "", "Сегодня прекрасная погода"]]
    docs = good + [bad] + good + [b"\xff"]
    values = np.frombuffer(b"".join(docs), np.uint8).copy()
    offsets = np.zeros(len(docs) + 1, np.int64)
    np.cumsum([len(d) for d in docs], out=offsets[1:])
    for threads in (1, 2):
        lid = LanguageIdentifier(num_threads=threads)
        with pytest.raises(ValueError, match=r"texts\[3\] is not valid UTF-8"):
            lid.classify_batch((values, offsets))
    with pytest.raises(ValueError, match=r"texts\[3\] is not valid UTF-8"):
        LanguageIdentifier(backend="py3langid").classify_batch((values, offsets))


def test_invalid_utf8_after_the_cut_is_still_an_error(native):
    doc = ("a" * 2500).encode() + b"\xff"
    with pytest.raises(ValueError, match=r"texts\[0\]"):
        native.classify_batch((np.frombuffer(doc, np.uint8).copy(), np.array([0, len(doc)], np.int64)))


@pytest.mark.parametrize("offsets", [[0, 5, 3], [-1, 2], [0, 99], []])
def test_bad_offsets(native, offsets):
    with pytest.raises(ValueError):
        native.classify_batch((np.zeros(10, np.uint8), np.array(offsets, np.int64)))


def test_bad_arguments():
    with pytest.raises(ValueError, match="backend"):
        LanguageIdentifier(backend="fasttext")
    with pytest.raises(ValueError, match="does not know"):
        LanguageIdentifier(["en", "xx-nope"])
    with pytest.raises(TypeError):
        LanguageIdentifier().classify_batch("a single string")
    with pytest.raises(TypeError):
        LanguageIdentifier().classify_batch([b"ok", 3])
    with pytest.raises(TypeError):
        LanguageIdentifier().classify_batch((np.zeros(3, np.int32), np.array([0, 3], np.int64)))


# --- set_languages, threads ----------------------------------------------------------------------


@pytest.mark.parametrize("languages", [["en", "de", "fr"], ["sr", "hr", "bs"], ["uz", "ru"], ["zh", "wuu", "yue"],
                                       ["es"]])
def test_language_restriction(languages):
    native = LanguageIdentifier(languages)
    reference = LanguageIdentifier(languages, backend="py3langid")
    texts = _demo_texts()[::7] + ["Dobar dan, kako ste danas? Idemo u grad.", "Ўзбекистон Республикаси пойтахти"]
    langs, _ = _check(native, reference, texts)
    assert set(langs) <= set(languages)


@pytest.mark.parametrize("languages", [["en", "de", "fr"], ["sr", "hr", "bs"], ["es"], list(known_languages()[:48])])
def test_a_few_languages_score_from_their_own_table(languages):
    """A selection of at most half the model's columns scores from its own cut of the table: the same labels and
    the same probabilities, bit for bit, as scoring the whole table, whatever the thread count; one of more than
    half reads the whole table."""
    lid = LanguageIdentifier(languages)
    texts = _demo_texts()[::5] + ["Dobar dan, kako ste danas?", "", "   ", "ΑΒΓ", "x" * 3000, "¿Qué tal? 😀"]
    docs = [t.encode() for t in texts]
    values = np.frombuffer(b"".join(docs), np.uint8).copy()
    offsets = np.zeros(len(docs) + 1, np.int64)
    np.cumsum([len(d) for d in docs], out=offsets[1:])
    whole = lid._native.classify(values, offsets, lid._columns, lid._labels, 2000, False, 1, False)
    for threads in (1, 2):
        cut = lid._native.classify(values, offsets, lid._columns, lid._labels, 2000, False, threads, True)
        assert np.array_equal(cut[0], whole[0]) and np.array_equal(cut[1], whole[1])
    assert (whole[0] >= 0).sum() > len(texts) // 2
    # switching selections on one model: each call scores with its own
    other = LanguageIdentifier(["de", "nl"])
    assert other._native is lid._native  # the model is shared (one per process)
    a = other._native.classify(values, offsets, other._columns, other._labels, 2000, False, 1, True)
    b = lid._native.classify(values, offsets, lid._columns, lid._labels, 2000, False, 1, True)
    c = other._native.classify(values, offsets, other._columns, other._labels, 2000, False, 1, False)
    assert np.array_equal(b[1], whole[1]) and np.array_equal(a[1], c[1]) and np.array_equal(a[0], c[0])


def test_known_languages_unchanged():
    from py3langid import langid

    m = langid.LanguageIdentifier.from_model_file(langid.MODEL_FILE, norm_probs=True)
    assert known_languages() == tuple(m.labels)
    assert LanguageIdentifier().labels == tuple(m.labels)


def test_thread_count_independence(monkeypatch):
    texts = _demo_texts() + ["", "ΚΑΛΗΜΕΡΑ", "e\u0301"] * 5
    base = LanguageIdentifier(num_threads=1).classify_batch(texts)
    for threads in (2, 3, 8):
        got = LanguageIdentifier(num_threads=threads).classify_batch(texts)
        assert got[0] == base[0] and np.array_equal(got[1], base[1])
    monkeypatch.setenv("MLMIX_NUM_THREADS", "3")
    got = LanguageIdentifier().classify_batch(texts)
    assert got[0] == base[0] and np.array_equal(got[1], base[1])


# --- the build stage -----------------------------------------------------------------------------


@pytest.mark.parametrize("override", [False, True])
def test_labeler_block_call_equals_per_record(override):
    from mlmix.engine.stages.langid import Labeler

    texts = _demo_texts()[:60] + ["", "x", "ΚΑΛΗΜΕΡΑ ΚΟΣΜΟΣ"]
    given = [None if i % 3 else "it" for i in range(len(texts))]
    records = [{"id": str(i), "lang": g, "where": "t", "text": t} for i, (g, t) in enumerate(zip(given, texts))]
    lcfg = {"threshold": 0.6, "unknown": "und", "override": override, "drop_unknown": True}
    out = {}
    for backend in ("native", "py3langid"):
        lab = Labeler(dict(lcfg, backend=backend))
        out[backend] = lab(iter(records))
        for form in (texts, tuple(texts), _utf8(texts)):
            block = lab.label_texts(given, form)
            assert block["lang"] == out[backend]["lang"]
            for k in ("todo", "identified", "alive"):
                assert np.array_equal(block[k], out[backend][k])
    assert out["native"]["lang"] == out["py3langid"]["lang"]
    assert "und" in out["native"]["lang"]
    assert ("it" in out["native"]["lang"]) == (not override)


def test_config_default_backend_is_native():
    from mlmix.config import SCHEMA

    backend = SCHEMA["keys"]["langid"]["keys"]["backend"]
    assert backend["default"] == "native" and set(backend["enum"]) == {"native", "py3langid", "none"}


# --- soundness of the native "no preparation needed" decision ------------------------------------

_TRICKY = "".join(sorted({chr(c) for c in (0x41, 0x61, 0x45, 0x65, 0x55, 0x75, 0x3A3, 0x3C3, 0x1100, 0x1161, 0x11A8,
                                          0xAC00, 0xAC01, 0x0915, 0x093C, 0x0928, 0x09C7, 0x09BE, 0x0B47, 0x0B3E,
                                          0x0BC6, 0x0BBE, 0x0CBF, 0x0CD5, 0x0D46, 0x0D3E, 0x1025, 0x102E, 0x0300,
                                          0x0301, 0x0308, 0x0316, 0x0327, 0x0328, 0x0340, 0x0344, 0x212B, 0x0958,
                                          0x1E0A, 0x1E0C, 0x0307, 0x0323, 0x01C5, 0x2126, 0x0020, 0x05B4, 0x05B7,
                                          0x0E38, 0x0E48, 0x0F71, 0x0F72, 0x0F80, 0xD800, 0x00E9, 0x1EC7, 0x09CB,
                                          0x0BCA, 0x0DDA, 0x0DCF, 0x1F00, 0x0345, 0x03B1)}))


@settings(max_examples=400, deadline=None)
@given(st.lists(st.text(alphabet=_TRICKY, min_size=1, max_size=12), min_size=1, max_size=20))
def test_native_preparation_is_sound(native, texts):
    """Where the core classifies a text itself, py3langid's _encode would only have encoded it (NFC already,
    not all upper case); every other text is handed back for preparation and still ends up exact."""
    from mlmix._core_loader import core
    import unicodedata

    labels, _ = native._native.classify(texts, None, native._columns, native._labels, 2000, False, 1)
    for t, lab in zip(texts, labels.tolist()):
        if lab >= 0:
            assert unicodedata.normalize("NFC", t) == t and not t.isupper(), ascii(t)
        elif lab == core.LANGID_EMPTY:
            assert not t.strip()


def test_labeler_keeps_only_what_is_read():
    from mlmix.engine.stages.langid import Labeler

    texts = ["Сегодня прекрасная погода. " * 200 + "The weather is lovely. " * 200, " " * 2500 + "hello there",
             " " * 2500, "short text here"]
    records = [{"id": str(i), "lang": None, "where": "t", "text": t} for i, t in enumerate(texts)]
    lab = Labeler({"backend": "native", "threshold": 0.0, "unknown": "und", "override": False,
                   "drop_unknown": False})
    want = [lang or "und" for lang in LanguageIdentifier().classify_batch(texts)[0]]
    assert lab(records)["lang"] == want


def test_prepared_model_is_read_back_from_the_cache(tmp_path, monkeypatch):
    """The model arrays prepared once (py3langid's file decompressed, every code point's rules) are written
    to the mlmix cache and read back equal; a damaged entry is prepared again, never trusted."""
    import os

    from mlmix import langid as ml

    monkeypatch.setenv("MLMIX_CACHE", str(tmp_path))
    fresh, classes = ml._prepared_model()  # prepared and written
    (entry,) = (tmp_path / "langid").iterdir()
    assert sorted(os.listdir(entry)) == sorted([k + ".npy" for k in ml._PREPARED] + ["classes.json"])
    again, classes2 = ml._prepared_model()  # read back, memory-mapped
    assert classes2 == classes and isinstance(again["ptc"], np.memmap)
    for k in ml._PREPARED:
        assert np.array_equal(np.asarray(fresh[k]), np.asarray(again[k])), k
    (entry / "ptc.npy").write_bytes(b"not an array")
    third, _ = ml._prepared_model()
    assert np.array_equal(np.asarray(third["ptc"]), np.asarray(fresh["ptc"]))
    assert np.array_equal(np.load(entry / "ptc.npy"), np.asarray(fresh["ptc"]))  # and rewritten
