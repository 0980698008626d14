"""Tests of mlmix.dedup against a plain Python reference: unicodedata normalisation, shingle sets as
Python sets of tuples, exact Jaccard over all pairs."""

from __future__ import annotations

import importlib.util
import itertools
import random
import unicodedata
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mlmix import dedup
from mlmix._core_loader import core

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("gen_unicode_tables", ROOT / "tools" / "gen_unicode_tables.py")
gen_tables = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(gen_tables)

# --------------------------------------------------------------------------------------------
# Reference


def ref_collapse(text: str, strip_accents: bool = False) -> str:
    """Class-based collapsing of already normalised and case-folded text, straight from unicodedata."""
    out: list[str] = []
    pending = False
    for ch in text:
        cat = unicodedata.category(ch)
        if cat[0] in "ZP" or cat in ("Cc", "Sm", "Sc", "Sk"):
            pending = bool(out)
            continue
        if cat == "Cf" or (strip_accents and cat in ("Mn", "Me")):
            continue
        if pending:
            out.append(" ")
            pending = False
        out.append(ch)
    return "".join(out)


def ref_nfk(text: str, strip_accents: bool) -> str:
    """NFKC; or, stripping accents, NFKD with marks dropped before canonical ordering."""
    if not strip_accents:
        return unicodedata.normalize("NFKC", text)
    kept = [c for c in unicodedata.normalize("NFKD", text) if unicodedata.category(c) not in ("Mn", "Me")]
    out: list[str] = []
    run: list[str] = []  # a stable sort of each run of nonzero combining classes
    for c in kept + [""]:
        if c and unicodedata.combining(c):
            run.append(c)
            continue
        out += sorted(run, key=unicodedata.combining) + [c]
        run = []
    return "".join(out)


def ref_normalize(text: str | bytes, strip_accents: bool = False) -> str:
    if isinstance(text, bytes):
        text = text.decode("utf-8", "replace")
    text = "".join(c for c in text if unicodedata.category(c) != "Cf")  # format characters go first
    t = ref_nfk(text, strip_accents)
    t = t.encode("utf-8", "surrogatepass").decode("utf-8", "replace")
    # Normalised again after case folding, whose output is not always normalised (ß + U+0301).
    return ref_collapse(ref_nfk(t.casefold(), strip_accents), strip_accents)


def no_space_script(ch: str) -> bool:
    cp = ord(ch)
    return any(lo <= cp <= hi for lo, hi in gen_tables.NO_SPACE_RANGES)


def ref_char_mode(norm: str) -> bool:
    letters = [c for c in norm if c != " "]
    return bool(letters) and 2 * sum(map(no_space_script, letters)) >= len(letters)


def ref_shingles(text: str, ngram: int = 5, shingle: str = "auto") -> set:
    norm = ref_normalize(text)
    char_mode = ref_char_mode(norm) if shingle == "auto" else shingle == "char"
    tokens = [c for c in norm if c != " "] if char_mode else (norm.split(" ") if norm else [])
    if 0 < len(tokens) < ngram:
        return {tuple(tokens)}
    return {tuple(tokens[i:i + ngram]) for i in range(len(tokens) - ngram + 1)}


def jaccard(a: set, b: set) -> float:
    return len(a & b) / len(a | b) if a or b else 0.0


# --------------------------------------------------------------------------------------------
# Text in many scripts, written for these tests

SAMPLES = {
    "en": "The quick brown fox — jumps over the lazy dog!  Ligatures: ﬁne ﬂow; café, naïve, Straße.",
    "ru": "Съешь же ещё этих мягких французских булок, да выпей чаю. Ёлка и ЁЖИК!",
    "ar": "اَلسَّلَامُ عَلَيْكُمْ، كَيْفَ حَالُكَ اليوم؟ هذا نصٌّ للتجربة.",
    "he": "שָׁלוֹם עוֹלָם! זֶה טֶקְסְט לִבְדִיקָה, בְּסֵדֶר?",
    "hi": "नमस्ते दुनिया! यह एक परीक्षण पाठ है। क्या आप ठीक हैं?",
    "zh": "我们今天去公园散步，天气非常好。你想一起来吗？ＡＢＣ１２３",
    "ja": "今日はいい天気ですね。ｶﾀｶﾅとひらがなを混ぜた文章です！",
    "th": "สวัสดีครับ วันนี้อากาศดีมาก เราจะไปเที่ยวทะเลกัน",
    "ko": "안녕하세요, 오늘 날씨가 정말 좋네요! 같이 산책할까요?",
    "misc": "soft\u00adhyphen zero\u200bwidth a\u200db \ufeffbom\ttab\nnewline\u3000ideographic 😀 emoji ½ ⅷ ㎏",
}

# Whole paragraphs and near-copies (edited punctuation, case, one or two words).
REAL_PAIRS = [
    ("en",
     "Deduplication removes repeated documents from a training corpus so that the model does not "
     "memorise them and the compute budget is spent on new information instead of copies.",
     "Deduplication removes repeated documents from a training corpus, so that the model does not "
     "memorise them and the compute budget is spent on new information instead of copies!"),
    ("de",
     "Die Deduplizierung entfernt wiederholte Dokumente aus einem Trainingskorpus, damit das Modell "
     "sie nicht auswendig lernt und das Rechenbudget für neue Informationen verwendet wird.",
     "DIE DEDUPLIZIERUNG ENTFERNT WIEDERHOLTE DOKUMENTE AUS EINEM TRAININGSKORPUS, DAMIT DAS MODELL "
     "SIE NICHT AUSWENDIG LERNT UND DAS RECHENBUDGET FÜR NEUE INFORMATIONEN VERWENDET WIRD."),
    ("ru",
     "Дедупликация удаляет повторяющиеся документы из обучающего корпуса, чтобы модель не запоминала "
     "их и вычислительный бюджет тратился на новую информацию, а не на копии текста.",
     "Дедупликация удаляет повторяющиеся документы из обучающего корпуса, чтобы модель не запоминала "
     "их, и вычислительный бюджет тратился на новую информацию — а не на копии текста."),
    ("ar",
     "تزيل إزالة التكرار المستندات المكررة من مجموعة بيانات التدريب حتى لا يحفظها النموذج ويتم "
     "إنفاق ميزانية الحوسبة على معلومات جديدة بدلا من النسخ المتكررة من النصوص.",
     "تزيل إزالة التكرار المستندات المكررة من مجموعة بيانات التدريب، حتى لا يحفظها النموذج ويتم "
     "إنفاق ميزانية الحوسبة على معلومات جديدة بدلا من النسخ المتكررة من النصوص!"),
    ("hi",
     "डुप्लिकेट हटाने से प्रशिक्षण संग्रह से दोहराए गए दस्तावेज़ निकल जाते हैं ताकि मॉडल उन्हें याद न करे "
     "और गणना का बजट नई जानकारी पर खर्च हो न कि प्रतियों पर।",
     "डुप्लिकेट हटाने से प्रशिक्षण संग्रह से दोहराए गए दस्तावेज़ निकल जाते हैं, ताकि मॉडल उन्हें याद न करे "
     "और गणना का बजट नई जानकारी पर खर्च हो, न कि प्रतियों पर!"),
    ("zh",
     "去重会从训练语料中删除重复的文档，这样模型就不会死记硬背它们，计算预算也会花在新的信息上，而不是花在副本上。"
     "我们在多种语言的数据上都这样做。",
     "去重会从训练语料中删除重复的文档。这样模型就不会死记硬背它们，计算预算也会花在新的信息上而不是花在副本上！"
     "我们在多种语言的数据上都这样做。"),
    ("ja",
     "重複除去は学習コーパスから繰り返し現れる文書を取り除き、モデルがそれらを暗記しないようにし、"
     "計算資源を複製ではなく新しい情報に使えるようにします。",
     "重複除去は、学習コーパスから繰り返し現れる文書を取り除き、モデルがそれらを暗記しないようにし、"
     "計算資源を複製ではなく新しい情報に使えるようにします！"),
    ("th",
     "การลบข้อมูลซ้ำจะนำเอกสารที่ซ้ำกันออกจากคลังข้อมูลสำหรับการฝึก เพื่อไม่ให้โมเดลจำข้อความเหล่านั้น "
     "และใช้งบประมาณการคำนวณกับข้อมูลใหม่แทนการใช้กับสำเนา",
     "การลบข้อมูลซ้ำจะนำเอกสารที่ซ้ำกันออกจากคลังข้อมูลสำหรับการฝึก, เพื่อไม่ให้โมเดลจำข้อความเหล่านั้น "
     "และใช้งบประมาณการคำนวณกับข้อมูลใหม่แทนการใช้กับสำเนา!"),
]

ALPHABETS = {
    "en": "abcdefghijklmnopqrstuvwxyz",
    "ru": "абвгдеёжзийклмнопрстуфхцчшщъыьэюя",
    "ar": "ابتثجحخدذرزسشصضطظعغفقكلمنهوي",
    "he": "אבגדהוזחטיכלמנסעפצקרשת",
    "hi": "कखगघचछजझटठडढणतथदधनपफबभमयरलवशषसह",
}
CHAR_ALPHABETS = {
    "zh": "的一是不了人我在有他这中大来上国个到说们为子和你地出道也时年得就那要下以生会自着去之过家学对可她里后小么心多天而能好都然没日于起还发成事只作当想看文无开手十用主行方又如前所本见经头面公同三已老从动两长",
    "th": "กขคงจฉชซญดตถทนบปผพฟมยรลวสหอฮะาิีึืุูเแโใไ็่้๊๋",
}


def make_corpus(seed: int = 1, bases_per_lang: int = 6, variants: int = 5):
    """Base documents per language with edited copies (more edits, lower Jaccard)."""
    rng = random.Random(seed)
    texts, langs = [], []
    for lang, alphabet in ALPHABETS.items():
        vocab = ["".join(rng.choice(alphabet) for _ in range(rng.randint(2, 8))) for _ in range(300)]
        for _ in range(bases_per_lang):
            words = [rng.choice(vocab) for _ in range(rng.randint(40, 90))]
            texts.append(" ".join(words))
            langs.append(lang)
            for v in range(variants):
                w = list(words)
                for _ in range(v):  # 0..variants-1 word edits
                    k = rng.randrange(len(w))
                    op = rng.random()
                    if op < 0.4:
                        w[k] = rng.choice(vocab)
                    elif op < 0.7:
                        del w[k]
                    else:
                        w.insert(k, rng.choice(vocab))
                texts.append(" ".join(w) + rng.choice(["", ".", "!", " ?"]))
                langs.append(lang)
    for lang, alphabet in CHAR_ALPHABETS.items():
        for _ in range(bases_per_lang):
            chars = [rng.choice(alphabet) for _ in range(rng.randint(120, 250))]
            texts.append("".join(chars))
            langs.append(lang)
            for v in range(variants):
                c = list(chars)
                for _ in range(2 * v):
                    k = rng.randrange(len(c))
                    op = rng.random()
                    if op < 0.4:
                        c[k] = rng.choice(alphabet)
                    elif op < 0.7:
                        del c[k]
                    else:
                        c.insert(k, rng.choice("，。！" if lang == "zh" else alphabet))
                texts.append("".join(c))
                langs.append(lang)
    return texts, langs


def ref_pairs(texts, langs, threshold, ngram=5):
    sets = [ref_shingles(t, ngram) for t in texts]
    out = {}
    for i, j in itertools.combinations(range(len(texts)), 2):
        if langs[i] == langs[j] and sets[i] and sets[j]:
            out[(i, j)] = jaccard(sets[i], sets[j])
    return out


# --------------------------------------------------------------------------------------------
# Normalisation


def test_unicode_version_pinned():
    assert dedup.UNICODE_VERSION == gen_tables.PINNED_UNIDATA_VERSION == unicodedata.unidata_version


@pytest.mark.parametrize("strip_accents", [False, True])
def test_normalize_matches_reference_on_every_script(strip_accents):
    texts = list(SAMPLES.values())
    got = dedup.normalize(texts, strip_accents=strip_accents)
    assert got == [ref_normalize(t, strip_accents) for t in texts]


def test_normalize_examples():
    got = dedup.normalize(["  Hello,\tWORLD!! ", "Straße ﬁ", "ＡＢＣ１２３", "café", "a\u00adb"])
    assert got == ["hello world", "strasse fi", "abc123", "café", "ab"]
    assert dedup.normalize(["café", "naïve"], strip_accents=True) == ["cafe", "naive"]
    # Devanagari spacing vowel signs (Mc) stay even when stripping; the virama (Mn) goes.
    assert dedup.normalize(["हिंदी"], strip_accents=True) == [ref_normalize("हिंदी", True)]


@settings(max_examples=80, deadline=None)
@given(st.lists(st.text(max_size=40), max_size=6), st.booleans())
def test_normalize_property(texts, strip_accents):
    assert dedup.normalize(texts, strip_accents=strip_accents) == [ref_normalize(t, strip_accents) for t in texts]


def test_normalize_every_code_point_below_0x20000():
    texts = [chr(cp) for cp in range(0x20000) if not 0xD800 <= cp <= 0xDFFF]
    assert dedup.normalize(texts) == [ref_normalize(t) for t in texts]
    assert dedup.normalize(texts[:0x3000], strip_accents=True) == [ref_normalize(t, True) for t in texts[:0x3000]]


# Characters around which NFKC composes, reorders or expands: combining marks of several classes,
# precomposed letters, Hangul syllables and jamo, compatibility forms, Indic nuktas, Greek ypogegrammeni.
TRICKY = list("aeiouAEOSsnNcCyYwWzZ\u03b1\u03c9\u0391\u1f00\u0434\u0418\u05d0\u05b7\u05bc\u0915\u093c\u0928"
              "\u0300\u0301\u0302\u0303\u0308\u0323\u0327\u0328\u031b\u0345\u0342\u0306\u0313\u0314"
              "\u00e9\u00c5\u212b\u1e9b\u1ea0\u01c4\u00df\u1e9e\ufb01\ufb03\u2460\u33a1\u3392\uff21\uff41"
              "\u1100\u1161\u11a8\uac00\ud4db\u3131\u0b47\u0b3e\u0b57\u0dd9\u0dcf\u0dca\u0e33\u0e4d\u0e32"
              "\u0f71\u0f72\u0f80\u2126\u00bd\u2075\u1d2c\u0130\u0131\u03d0\u1fbe ")


@settings(max_examples=200, deadline=None)
@given(st.lists(st.sampled_from(TRICKY), max_size=24).map("".join), st.booleans())
def test_nfkc_composition_property(text, strip_accents):
    assert dedup.normalize([text], strip_accents=strip_accents) == [ref_normalize(text, strip_accents)]


@settings(max_examples=80, deadline=None)
@given(st.lists(st.binary(max_size=30), max_size=5))
def test_core_utf8_decoding_matches_python_replace(docs):
    # Straight into the core: invalid sequences become U+FFFD exactly as bytes.decode(errors="replace").
    data = np.frombuffer(b"".join(docs), dtype=np.uint8)
    offsets = np.concatenate([[0], np.cumsum([len(d) for d in docs])]).astype(np.int64)
    out, out_offsets = core._dedup_normalize(data, offsets, False, 0, 2)
    raw = out.tobytes()
    got = [raw[out_offsets[i]:out_offsets[i + 1]].decode("utf-8") for i in range(len(docs))]
    assert got == [ref_normalize(d) for d in docs]


# Sequences at the edges of the inline 2- and 3-byte decoding (overlong, surrogate, truncated,
# largest and smallest valid) next to ASCII and to each other.
UTF8_EDGES = [b"\xc2\x80", b"\xc1\xbf", b"\xdf\xbf", b"\xe0\x80\x80", b"\xe0\x9f\xbf", b"\xe0\xa0\x80",
              b"\xed\x9f\xbf", b"\xed\xa0\x80", b"\xef\xbf\xbf", b"\xee\x80", b"\xe2\x82", b"\xc3",
              b"\xf0\x9f\x98\x80", b"\xf4\x90\x80\x80", b"\x80", b"e\xcc\x81", b"A", b" "]


@settings(max_examples=150, deadline=None)
@given(st.lists(st.sampled_from(UTF8_EDGES), max_size=12).map(b"".join))
def test_utf8_fast_decoding_edges(doc):
    data = np.frombuffer(doc, dtype=np.uint8)
    out, out_offsets = core._dedup_normalize(data, np.array([0, len(doc)], np.int64), False, 0, 1)
    assert out.tobytes().decode("utf-8") == ref_normalize(doc)


def test_invalid_utf8_policies():
    bad = [b"ok text", b"caf\xc3 \xff\xfe end", "lone \ud800 surrogate"]
    assert dedup.normalize(bad) == [ref_normalize(t) for t in bad]
    with pytest.raises(ValueError, match=r"texts\[1\] is not valid UTF-8"):
        dedup.normalize(bad, errors="strict")
    with pytest.raises(ValueError, match=r"texts\[0\] is not valid UTF-8"):
        dedup.near_duplicates(["lone \udfff surrogate"], errors="strict")
    for fn in (dedup.exact_duplicates, dedup.near_duplicates):
        r = fn(bad)
        assert r.cluster.tolist() == [0, 1, 2]


# --------------------------------------------------------------------------------------------
# Shingles and signatures


@settings(max_examples=60, deadline=None)
@given(st.lists(st.sampled_from(list("ab c.日本ไทย") + ["ab", " xy "]), max_size=40).map("".join),
       st.integers(1, 6), st.sampled_from(["auto", "word", "char"]))
def test_shingle_set_size_matches_reference(text, ngram, shingle):
    got = dedup._shingle_set(text, ngram=ngram, shingle=shingle)
    assert len(got) == len(ref_shingles(text, ngram, shingle))
    assert np.all(np.diff(got.astype(np.float64)) >= 0)


@pytest.mark.parametrize("text", [
    " ".join(f"w{k % 997} x{k % 13}" for k in range(3000)),  # thousands of distinct shingles
    "ab " * 2000,                                               # one shingle repeated
    "".join(chr(0x4E00 + (k * 7919) % 20000) for k in range(5000)),
])
def test_large_shingle_sets_sorted_unique(text):
    # Sets past the small-size path go through the bucket sort: strictly increasing, complete.
    got = dedup._shingle_set(text)
    assert len(got) == len(ref_shingles(text))
    assert all(int(a) < int(b) for a, b in zip(got[:-1], got[1:]))


def test_auto_shingle_mode_by_script():
    texts = [SAMPLES[k] for k in ("en", "ru", "ar", "he", "hi", "ko", "zh", "ja", "th")]
    r = dedup.near_duplicates(texts)
    assert r.info["char_shingled"] == 3
    assert [ref_char_mode(ref_normalize(t)) for t in texts] == [False] * 6 + [True] * 3


def ref_signature(text: str, num_perm: int, seed: int = 0) -> np.ndarray:
    """MinHash of the core's 64-bit shingle hashes: h_k(x) = ((a_k * x + b_k) mod 2^64) >> 32 of the
    top 32 bits x, with (a_k, b_k) drawn by splitmix64 from the seed."""
    m64 = (1 << 64) - 1

    def mix(x):
        x ^= x >> 32
        x = (x * 0xD6E8FEB86659FD93) & m64
        x ^= x >> 29
        x = (x * 0xC2B2AE3D27D4EB4F) & m64
        return x ^ (x >> 32)

    state = mix(seed ^ 0x6A09E667F3BCC908)
    params = []
    for _ in range(num_perm):
        state = (state + 0x9E3779B97F4A7C15) & m64
        a = mix(state)
        state = (state + 0x9E3779B97F4A7C15) & m64
        params.append((a, mix(state)))
    keys = [int(h) >> 32 for h in dedup._shingle_set(text)]
    return np.array([min((((a * x + b) & m64) >> 32 for x in keys), default=0xFFFFFFFF) for a, b in params],
                    dtype=np.uint32)


@pytest.mark.parametrize("num_perm", [1, 7, 8, 9, 16, 23, 40, 128])
def test_signatures_match_reference(num_perm):
    # Every vector width's full groups and the scalar tail; one document over 256 shingles (two
    # kernel blocks), one short, one with no shingles.
    texts = [" ".join(f"{SAMPLES['en']} {k}" for k in range(30)), SAMPLES["zh"], "ab cd", "..."]
    sig = dedup.minhash_signatures(texts, num_perm=num_perm, seed=12345)
    for i, text in enumerate(texts):
        np.testing.assert_array_equal(sig[i], ref_signature(text, num_perm, seed=12345))


def test_signature_estimates_jaccard():
    texts, langs = make_corpus(seed=3, bases_per_lang=2)
    sig = dedup.minhash_signatures(texts, num_perm=256)
    assert sig.shape == (len(texts), 256) and sig.dtype == np.uint32
    errors = [abs(np.mean(sig[i] == sig[j]) - j_ref) for (i, j), j_ref in ref_pairs(texts, langs, 0.0).items()]
    assert np.mean(errors) < 0.03
    assert np.max(errors) < 0.2


def test_empty_and_short_documents():
    texts = ["", "   \t\n", "!!! ...", "one", "one", "two words", "Two, words!", "two other"]
    sig = dedup.minhash_signatures(texts)
    assert np.all(sig[:3] == np.iinfo(np.uint32).max)
    assert not np.all(sig[3:] == np.iinfo(np.uint32).max, axis=1).any()
    for fn in (dedup.exact_duplicates, dedup.near_duplicates):
        r = fn(texts)
        # Empty-after-normalisation documents are duplicates of each other only; shorter than one
        # shingle means one shingle of the whole document.
        assert r.cluster.tolist() == [0, 0, 0, 3, 3, 5, 5, 7]


# --------------------------------------------------------------------------------------------
# Exact duplicates


def test_exact_duplicates_match_reference_grouping():
    texts, langs = make_corpus(seed=5, bases_per_lang=2)
    texts = texts + [t.upper() + " !" for t in texts[:20]] + list(SAMPLES.values()) * 2
    langs = langs + langs[:20] + ["x"] * (2 * len(SAMPLES))
    r = dedup.exact_duplicates(texts, langs=langs)
    first = {}
    expected = [first.setdefault((lang, ref_normalize(t)), i) for i, (t, lang) in enumerate(zip(texts, langs))]
    assert r.cluster.tolist() == expected
    assert r.keep.tolist() == [c == i for i, c in enumerate(expected)]
    removed = {lang: sum(1 for i, la in enumerate(langs) if la == lang and expected[i] != i) for lang in set(langs)}
    assert {k: v["removed"] for k, v in r.stats.items()} == removed


@given(st.lists(st.text(max_size=80) | st.sampled_from(list(SAMPLES.values())), max_size=12),
       st.booleans(), st.sampled_from(["word", "char", "auto"]), st.integers(1, 4))
@settings(max_examples=80, deadline=None)
def test_minhash_pass_gives_the_exact_hashes(texts, strip, shingle, threads):
    """with_hashes: the exact hashes out of the MinHash pass (what the build's dedup stage uses) are
    exact_hashes' for the same normalisation, and the signatures are unchanged."""
    texts = [t.encode("utf-8", "replace").decode("utf-8") for t in texts]  # no lone surrogates
    sig, h = dedup.minhash_signatures(texts, num_perm=16, shingle=shingle, strip_accents=strip,
                                      num_threads=threads, with_hashes=True)
    np.testing.assert_array_equal(h, dedup.exact_hashes(texts, strip_accents=strip).reshape(len(texts), 2))
    np.testing.assert_array_equal(sig, dedup.minhash_signatures(texts, num_perm=16, shingle=shingle,
                                                                strip_accents=strip))
    with pytest.raises(ValueError, match="with_hashes"):
        dedup.minhash_signatures(texts, with_hashes="yes")


def test_exact_hashes_shard_and_merge():
    texts = [SAMPLES["en"], SAMPLES["zh"], SAMPLES["en"].upper(), "x", SAMPLES["zh"] + "。"]
    whole = dedup.exact_hashes(texts)
    assert whole.shape == (5, 2) and whole.dtype == np.uint64
    np.testing.assert_array_equal(np.vstack([dedup.exact_hashes(texts[:2]), dedup.exact_hashes(texts[2:])]), whole)
    assert (whole[0] == whole[2]).all() and (whole[1] == whole[4]).all() and not (whole[0] == whole[1]).all()
    merged = dedup.cluster_hashes(np.vstack([dedup.exact_hashes(texts[:2]), dedup.exact_hashes(texts[2:])]))
    np.testing.assert_array_equal(merged.cluster, dedup.exact_duplicates(texts).cluster)
    assert merged.cluster.tolist() == [0, 1, 0, 3, 1]
    with pytest.raises(ValueError, match="hashes must be a"):
        dedup.cluster_hashes(whole.astype(np.int64))


def test_keep_policies():
    texts = ["abc", "ABC!!", "Abc.", "other"]
    assert dedup.exact_duplicates(texts).cluster.tolist() == [0, 0, 0, 3]
    assert dedup.exact_duplicates(texts, keep="longest").cluster.tolist() == [1, 1, 1, 3]
    r = dedup.exact_duplicates(texts, keep=[0.0, 1.0, 5.0, 0.0])
    assert r.cluster.tolist() == [2, 2, 2, 3] and r.keep.tolist() == [False, False, True, True]
    assert dedup.near_duplicates(texts, keep="longest").cluster.tolist() == [1, 1, 1, 3]


def test_language_scope():
    texts = ["the same text here"] * 3
    langs = ["en", "de", "en"]
    r = dedup.near_duplicates(texts, langs=langs)
    assert r.cluster.tolist() == [0, 1, 0]
    assert r.stats == {"en": {"documents": 2, "removed": 1}, "de": {"documents": 1, "removed": 0}}
    assert dedup.near_duplicates(texts, langs=langs, scope="global").cluster.tolist() == [0, 0, 0]
    assert dedup.exact_duplicates(texts, langs=langs, scope="global").cluster.tolist() == [0, 0, 0]


# --------------------------------------------------------------------------------------------
# Near duplicates vs exact Jaccard


@pytest.mark.parametrize("threshold", [0.8, 0.6])
def test_near_duplicates_recall_and_precision(threshold):
    texts, langs = make_corpus(seed=11)
    ref = ref_pairs(texts, langs, threshold)
    r = dedup.near_duplicates(texts, threshold=threshold, langs=langs)
    # Every reported pair is a true pair, with its exact Jaccard.
    for (i, j), sim in zip(r.pairs.tolist(), r.similarity.tolist()):
        assert ref[(i, j)] >= threshold
        assert sim == pytest.approx(ref[(i, j)], abs=1e-12)
    # Recall of pairs at or above the threshold, overall and for character-shingled scripts.
    true_pairs = [p for p, s in ref.items() if s >= threshold]
    assert len(true_pairs) > 100
    found = [r.cluster[i] == r.cluster[j] for i, j in true_pairs]
    assert np.mean(found) >= 0.95
    for script in ("zh", "th", "ru"):
        sub = [r.cluster[i] == r.cluster[j] for i, j in true_pairs if langs[i] == script]
        assert len(sub) >= 10 and np.mean(sub) >= 0.95, script
    # Clusters are exactly the connected components of the reported pairs.
    parent = list(range(len(texts)))

    def find(x):
        while parent[x] != x:
            x = parent[x]
        return x

    for i, j in r.pairs.tolist():
        parent[max(find(i), find(j))] = min(find(i), find(j))
    roots = [find(i) for i in range(len(texts))]
    assert all((roots[i] == roots[j]) == (r.cluster[i] == r.cluster[j])
               for i, j in itertools.combinations(range(len(texts)), 2))


def test_real_multilingual_near_copies():
    texts = [t for _, a, b in REAL_PAIRS for t in (a, b)]
    langs = [lang for lang, _, _ in REAL_PAIRS for _ in (0, 1)]
    r = dedup.near_duplicates(texts, langs=langs, threshold=0.7)
    for k, (lang, a, b) in enumerate(REAL_PAIRS):
        assert jaccard(ref_shingles(a), ref_shingles(b)) >= 0.7, lang
        assert r.cluster[2 * k] == r.cluster[2 * k + 1] == 2 * k, lang
    assert r.num_removed == len(REAL_PAIRS)
    # Translations of one another are not duplicates, even across languages.
    assert dedup.near_duplicates(texts, threshold=0.7, scope="global", langs=langs).num_removed == len(REAL_PAIRS)


def test_verify_false_and_signature_clustering_across_shards():
    texts, langs = make_corpus(seed=7, bases_per_lang=3)
    full = dedup.near_duplicates(texts, langs=langs, verify=False)
    half = len(texts) // 2
    sig = np.vstack([dedup.minhash_signatures(texts[:half]), dedup.minhash_signatures(texts[half:])])
    hashes = np.vstack([dedup.exact_hashes(texts[:half]), dedup.exact_hashes(texts[half:])])
    merged = dedup.cluster_signatures(sig, hashes=hashes, langs=langs, verify=False)
    np.testing.assert_array_equal(merged.cluster, full.cluster)
    # Agreement verification keeps a subset of the candidate edges.
    agreed = dedup.cluster_signatures(sig, hashes=hashes, langs=langs, verify=True)
    assert len(agreed.pairs) > 0 and np.all(agreed.similarity >= 0.8)
    for (i, j), sim in zip(agreed.pairs.tolist(), agreed.similarity.tolist()):
        assert sim == np.mean(sig[i] == sig[j]) or (hashes[i] == hashes[j]).all()


def test_deterministic_across_thread_counts():
    texts, langs = make_corpus(seed=13, bases_per_lang=3)
    texts = texts * 2
    langs = langs * 2
    runs = [dedup.near_duplicates(texts, langs=langs, num_threads=t) for t in (1, 2, 3, 7)]
    sigs = [dedup.minhash_signatures(texts, num_threads=t) for t in (1, 3)]
    np.testing.assert_array_equal(sigs[0], sigs[1])
    for r in runs[1:]:
        np.testing.assert_array_equal(r.cluster, runs[0].cluster)
        np.testing.assert_array_equal(r.pairs, runs[0].pairs)
        np.testing.assert_array_equal(r.similarity, runs[0].similarity)
    assert dedup.normalize(texts, num_threads=1) == dedup.normalize(texts, num_threads=3)


def test_seed_changes_signatures_not_clusters_much():
    texts, langs = make_corpus(seed=17, bases_per_lang=2)
    a, b = dedup.minhash_signatures(texts, seed=0), dedup.minhash_signatures(texts, seed=1)
    assert not np.array_equal(a, b)


def test_pyarrow_input_matches_list():
    pa = pytest.importorskip("pyarrow")
    texts = [SAMPLES["en"], SAMPLES["en"] + "!", SAMPLES["zh"], SAMPLES["zh"]]
    expected = dedup.near_duplicates(texts).cluster
    for arr in (pa.array(texts), pa.array(texts, type=pa.large_string()), pa.chunked_array([texts[:1], texts[1:]])):
        np.testing.assert_array_equal(dedup.near_duplicates(arr).cluster, expected)
        np.testing.assert_array_equal(dedup.exact_duplicates(arr).cluster, [0, 0, 2, 2])
    # Slices of an arrow array are read at their offset, without a copy of the data.
    sliced = pa.array(["x"] + texts + ["y"])[1:-1]
    np.testing.assert_array_equal(dedup.near_duplicates(sliced).cluster, expected)
    assert dedup.normalize(pa.array(texts)[2:3]) == [ref_normalize(texts[2])]
    with pytest.raises(ValueError, match=r"texts\[1\] is None"):
        dedup.exact_duplicates(pa.array(["a", None]))


def test_large_document():
    # About 17.6 MB: above the 16 MB under which the core buffers normalised code points, so the
    # streaming path (normalise twice) runs.
    words = list(map(str, np.random.default_rng(0).integers(0, 50000, 3_000_000).tolist()))
    big = " ".join(words)
    assert len(big) > 16 << 20
    edited = " ".join(words[:-10])
    r = dedup.near_duplicates([big, "small doc", edited])
    assert r.cluster.tolist() == [0, 1, 0]


# --------------------------------------------------------------------------------------------
# Bad input


@pytest.mark.parametrize("kwargs, match", [
    ({"threshold": 0.0}, "threshold must be a number in"),
    ({"threshold": 1.5}, "threshold must be a number in"),
    ({"threshold": float("nan")}, "threshold must be a number in"),
    ({"threshold": True}, "threshold must be a number in"),
    ({"num_perm": 0}, "num_perm must be an integer"),
    ({"num_perm": 128, "bands": 7}, r"not divisible into bands=7"),
    ({"bands": 0}, "bands must be an integer"),
    ({"ngram": 0}, "ngram must be an integer"),
    ({"shingle": "sentence"}, "shingle must be one of"),
    ({"errors": "ignore"}, "errors must be one of"),
    ({"langs": ["en"]}, "langs must have one entry per document"),
    ({"scope": "world"}, "scope must be one of"),
    ({"keep": "last"}, "keep must be one of"),
    ({"keep": [1.0]}, r"keep scores must have shape \(2,\)"),
    ({"keep": [1.0, float("nan")]}, "keep scores must be finite"),
    ({"seed": -1}, "seed must be an integer"),
    ({"verify": "yes"}, "verify must be True or False"),
    ({"num_threads": -2}, "num_threads must be an integer"),
])
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        dedup.near_duplicates(["a b c", "a b d"], **kwargs)


def test_bad_texts():
    with pytest.raises(ValueError, match="not a single str"):
        dedup.near_duplicates("just one string")
    with pytest.raises(ValueError, match=r"texts\[1\] must be str or UTF-8 bytes, got int"):
        dedup.exact_duplicates(["a", 3])
    with pytest.raises(ValueError, match="signatures must be a"):
        dedup.cluster_signatures(np.zeros((3, 4), dtype=np.int64))
    with pytest.raises(ValueError, match="hashes must be a"):
        dedup.cluster_signatures(np.zeros((3, 4), dtype=np.uint32), hashes=np.zeros((2, 2), np.uint64))
    with pytest.raises(ValueError, match="keep='longest' needs"):
        dedup.cluster_signatures(np.zeros((3, 4), dtype=np.uint32), keep="longest")
    with pytest.raises(ValueError, match="offsets must be non-decreasing"):
        core._dedup_normalize(np.zeros(4, np.uint8), np.array([0, 3, 2], np.int64), False, 0, 1)
    with pytest.raises(ValueError, match="exceeds the data size"):
        core._dedup_normalize(np.zeros(4, np.uint8), np.array([0, 9], np.int64), False, 0, 1)
    assert dedup.near_duplicates([]).cluster.shape == (0,)
    assert dedup.exact_duplicates([]).keep.dtype == bool


def test_lsh_params_minimise_weighted_error():
    def brute(t, p, wfp, wfn):
        xs = np.linspace(0, 1, 4097)
        best = None
        for b in range(1, p + 1):
            for r in range(1, p // b + 1):
                prob = 1 - (1 - xs ** r) ** b
                fp = np.trapezoid(np.where(xs <= t, prob, 0), xs)
                fn = np.trapezoid(np.where(xs >= t, 1 - prob, 0), xs)
                err = wfp * fp + wfn * fn
                if best is None or err < best[0] - 1e-6:
                    best = (err, b, r)
        return best[1:]

    for t, p in [(0.8, 32), (0.5, 24), (0.9, 40)]:
        assert dedup.lsh_params(t, p, verify=False) == brute(t, p, 0.5, 0.5)
        b, r = dedup.lsh_params(t, p)
        assert b * r <= p


def test_verification_without_kept_shingle_sets(monkeypatch):
    # Over the budget the sets from the signature pass are dropped and rebuilt for candidates.
    texts, langs = make_corpus(seed=19, bases_per_lang=2)
    kept = dedup.near_duplicates(texts, langs=langs)
    monkeypatch.setattr(dedup, "_SHINGLE_SET_BUDGET", 100)
    rebuilt = dedup.near_duplicates(texts, langs=langs, num_threads=2)
    np.testing.assert_array_equal(rebuilt.cluster, kept.cluster)
    np.testing.assert_array_equal(rebuilt.pairs, kept.pairs)
    np.testing.assert_array_equal(rebuilt.similarity, kept.similarity)
    assert len(kept.pairs) > 10


def test_large_lsh_bucket_stays_linear():
    # 300 near copies share most LSH buckets; buckets over 128 documents are paired as a star plus
    # a chain, so the candidates stay linear while the cluster is still found whole.
    rng = random.Random(23)
    base = [f"w{rng.randrange(10**6)}" for _ in range(400)]
    texts = []
    for k in range(300):
        words = list(base)
        words[k % 400] = f"x{k}"
        texts.append(" ".join(words))
    r = dedup.near_duplicates(texts)
    assert r.cluster.tolist() == [0] * 300
    assert r.info["candidate_pairs"] < 300 * 299 // 2
    assert r.num_removed == 299


# --------------------------------------------------------------------------------------------
# shingle_sets: the sets verification compares, for every document at once


def test_shingle_sets_match_reference_jaccard():
    texts, _ = make_corpus(bases_per_lang=2, variants=3)
    texts = texts + ["", "   ", "...", "one", list(SAMPLES.values())[0]]
    sets = dedup.shingle_sets(texts)
    assert sets.values.dtype == np.uint64 and sets.offsets.dtype == np.int64
    assert sets.offsets.shape == (len(texts) + 1,) and sets.offsets[0] == 0
    rows = [sets.values[sets.offsets[i]:sets.offsets[i + 1]] for i in range(len(texts))]
    ref = [ref_shingles(t) for t in texts]
    for row, r in zip(rows, ref):
        assert len(row) == len(r)
        assert all(int(a) < int(b) for a, b in zip(row[:-1], row[1:]))
    # Distinct shingles get distinct hashes here, so the Jaccard of the rows is the reference's.
    for i, j in itertools.combinations(range(len(texts)), 2):
        inter = np.intersect1d(rows[i], rows[j], assume_unique=True).size
        union = rows[i].size + rows[j].size - inter
        got = inter / union if union else 0.0
        assert got == pytest.approx(jaccard(ref[i], ref[j]), abs=1e-12), (i, j)


@settings(max_examples=30, deadline=None)
@given(st.lists(st.lists(st.sampled_from(list("ab c.日本ไทย") + ["ab", " xy ", "\u0301"]), max_size=30)
                .map("".join), max_size=12),
       st.integers(1, 6), st.sampled_from(["auto", "word", "char"]), st.booleans())
def test_shingle_sets_rows_equal_single_documents(texts, ngram, shingle, strip_accents):
    sets = dedup.shingle_sets(texts, ngram=ngram, shingle=shingle, strip_accents=strip_accents, num_threads=2)
    assert len(sets.offsets) == len(texts) + 1
    for i, text in enumerate(texts):
        row = sets.values[sets.offsets[i]:sets.offsets[i + 1]]
        one = dedup.shingle_sets([text], ngram=ngram, shingle=shingle, strip_accents=strip_accents)
        assert np.array_equal(row, one.values)
        if not strip_accents:
            assert len(row) == len(ref_shingles(text, ngram, shingle))


def test_shingle_sets_deterministic_and_seed_independent():
    texts, _ = make_corpus(bases_per_lang=3, variants=4)
    texts = texts * 3  # enough documents for several chunks per thread
    a = dedup.shingle_sets(texts, num_threads=1)
    b = dedup.shingle_sets(texts, num_threads=3, seed=7)
    assert np.array_equal(a.values, b.values) and np.array_equal(a.offsets, b.offsets)


def test_shingle_sets_bad_arguments():
    assert dedup.shingle_sets([]).offsets.tolist() == [0]
    with pytest.raises(ValueError, match="ngram must be an integer"):
        dedup.shingle_sets(["a"], ngram=0)
    with pytest.raises(ValueError, match="shingle must be one of"):
        dedup.shingle_sets(["a"], shingle="line")
    with pytest.raises(ValueError, match="errors must be one of"):
        dedup.shingle_sets(["a"], errors="ignore")
    with pytest.raises(ValueError, match="not valid UTF-8"):
        dedup.shingle_sets(["a", b"\xff"], errors="strict")


def _utf8_buffer(texts):
    """The (uint8 data, int64 offsets) form of documents: str as surrogatepass UTF-8, bytes as given."""
    encoded = [t.encode("utf-8", "surrogatepass") if isinstance(t, str) else bytes(t) for t in texts]
    offsets = np.zeros(len(encoded) + 1, np.int64)
    np.cumsum([len(e) for e in encoded], out=offsets[1:])
    return np.frombuffer(b"".join(encoded), np.uint8), offsets


# Every layout a str can have (Latin-1 with ASCII and accents, UCS-2, UCS-4) and the invalid code
# points each can hold (lone surrogates), besides UTF-8 bytes, bytearray and memoryview documents.
VIEW_DOCS = [
    "plain ascii text with five words and more", "caf\u00e9 cr\u00e8me br\u00fbl\u00e9e \u00c9T\u00c9",
    "\u041f\u0440\u0438\u0432\u0435\u0442 \u043c\u0438\u0440 \ufb01 \u2460", SAMPLES["zh"], SAMPLES["hi"], SAMPLES["ar"],
    "emoji \U0001F600 and \U0001D400 math", "bad \ud800 surrogate \u4e2d\u6587", "bad \udfff \U0001F600 in UCS-4",
    "", "   ", b"bytes \xff here", bytearray(b"ok bytes"), memoryview(b"a view of bytes"),
    "A\u030a ring e\u0301 \u1e9b\u0323", "\u00df strasse STRASSE",
]


@pytest.mark.parametrize("strip_accents", [False, True])
def test_str_read_in_place_equals_utf8_buffer(strip_accents):
    # The core reads str code units in place; the same documents as one UTF-8 buffer (the pyarrow
    # path) give the same normalised text, hashes, signatures and shingle sets, lone surrogates
    # included (replaced, as their surrogatepass bytes are).
    data, offsets = _utf8_buffer(VIEW_DOCS)
    assert {type(t) for t in VIEW_DOCS} == {str, bytes, bytearray, memoryview}
    for threads in (1, 3):
        args = (strip_accents, 0, threads)
        a, a_off = core._dedup_normalize(VIEW_DOCS, None, *args)
        b, b_off = core._dedup_normalize(data, offsets, *args)
        assert a.tobytes() == b.tobytes() and np.array_equal(a_off, b_off)
        np.testing.assert_array_equal(core._dedup_exact_hashes(VIEW_DOCS, None, *args),
                                      core._dedup_exact_hashes(data, offsets, *args))
        for mode in (0, 1, 2):
            mh = (64, 3, mode, 7, strip_accents, 0, threads)
            for x, y in zip(core._dedup_minhash(VIEW_DOCS, None, *mh), core._dedup_minhash(data, offsets, *mh)):
                np.testing.assert_array_equal(x, y)
            sh = (3, mode, 7, strip_accents, 0, threads)
            for x, y in zip(core._dedup_shingle_sets(VIEW_DOCS, None, *sh), core._dedup_shingle_sets(data, offsets, *sh)):
                np.testing.assert_array_equal(x, y)
    np.testing.assert_array_equal(core._dedup_utf8_sizes(VIEW_DOCS, None), np.diff(offsets))
    assert dedup.normalize(VIEW_DOCS[:11], strip_accents=strip_accents) == [
        ref_normalize(t, strip_accents) for t in VIEW_DOCS[:11]]


def test_str_subclasses_arrays_tuples_and_iterators_read_alike():
    class Text(str):
        pass

    texts = ["h\u00e9llo w\u00f6rld \u4e2d\u6587 text", "plain", "\U0001F600 emoji", ""]
    expected = dedup.exact_hashes(texts)
    for form in ([Text(t) for t in texts], np.array(texts), tuple(texts), iter(texts), (t for t in texts)):
        np.testing.assert_array_equal(dedup.exact_hashes(form), expected)


def test_str_read_in_place_errors():
    base = [f"doc {k} text" for k in range(70)]
    with pytest.raises(ValueError, match=r"texts\[2\] is not valid UTF-8: a lone surrogate \(0xd800\) at index 4"):
        dedup.exact_hashes(["ok", "caf\u00e9", "bad \ud800", "bad \udfff"], errors="strict")
    with pytest.raises(ValueError, match=r"texts\[1\] is not valid UTF-8: a lone surrogate \(0xdfff\) at index 6"):
        dedup.near_duplicates(["ok", "\U0001F600 bad \udfff"], errors="strict")
    with pytest.raises(ValueError, match=r"texts\[66\] is None"):
        dedup.exact_hashes(base[:66] + [None])
    with pytest.raises(ValueError, match=r"texts\[67\] must be str or UTF-8 bytes, got int"):
        dedup.exact_hashes(base[:67] + [5])
    with pytest.raises(ValueError, match="not a single str"):
        core._dedup_exact_hashes("one string", None, False, 0, 1)
    # keep="longest" compares UTF-8 sizes, computed from the code units
    r = dedup.exact_duplicates(["\u00e9t\u00e9", "ETE\u0301", "\u00c9T\u00c9"], keep="longest", strip_accents=True)
    assert r.cluster.tolist() == [0, 0, 0]
    r = dedup.exact_duplicates(["\u00e9t\u00e9", "\u00c9T\u00c9\u200b"], keep="longest")
    assert r.cluster.tolist() == [1, 1]


def test_format_characters_never_block_composition_or_reordering():
    # Found by the libFuzzer dedup target: U+0604 (Cf) between an acute (class 230) and a fatha (30)
    # kept them out of canonical order, and normalising the output again reordered them.
    docs = ["\u0928\u092e\u093c\u094d\u0301\u0604\u064e x", "e\u200d\u0301", "e\u00ad\u0301\u200b",
            "a\u0301\ufeff\u0316"]
    for strip in (False, True):
        once = dedup.normalize(docs, strip_accents=strip)
        assert dedup.normalize(once, strip_accents=strip) == once
        assert once == [ref_normalize(d, strip) for d in docs]
    assert dedup.normalize(["e\u200d\u0301"]) == ["\u00e9"]  # the joiner no longer blocks composition
    assert dedup.exact_duplicates(["caf\u00e9", "cafe\u200d\u0301"]).cluster.tolist() == [0, 0]


def test_normalised_again_after_case_folding():
    # Found by the libFuzzer dedup target: U+00DF + U+0301 folds to "ss" + U+0301, which is not NFKC;
    # normalising the output again composed it to "s" + U+015B.
    docs = ["\u00df\u0301", "stra\u1e9e\u0301e", "\u0130\u0301", "\u1f88\u0345\u0301", "\u03a3\u0342x"]
    for strip in (False, True):
        once = dedup.normalize(docs, strip_accents=strip)
        assert dedup.normalize(once, strip_accents=strip) == once
        assert once == [ref_normalize(d, strip) for d in docs]
    assert dedup.normalize(["\u00df\u0301"]) == ["s\u015b"]
    assert dedup.exact_duplicates(["\u00df\u0301", "ss\u0301", "s\u015b"]).cluster.tolist() == [0, 0, 0]


def test_stripping_marks_keeps_the_rest_in_canonical_order():
    # A mark of class 0 (U+0900) between two spacing marks of classes 226 and 216: dropped before
    # canonical ordering, so that the output does not change when normalised again.
    docs = ["a\U0001d16d\u0900\U0001d165", "a\U0001d16d\U0001d165"]
    once = dedup.normalize(docs, strip_accents=True)
    assert once == ["a\U0001d165\U0001d16d"] * 2
    assert dedup.normalize(once, strip_accents=True) == once
    assert once == [ref_normalize(d, True) for d in docs]


def test_one_snapshot_of_the_documents_per_call():
    # Sizes (keep="longest"), hashes and clusters come from one reading of the input, even when the
    # sequence gives other items on a later pass (as a list changed by another thread would).
    first = ["a b c d e f", "a b c d e f", "x"]

    class Shifting(list):
        passes = 0

        def __iter__(self):
            Shifting.passes += 1
            return iter(first if Shifting.passes == 1 else ["q", "a b c d e f" * 50, "a b c d e f"])

    for fn in (dedup.exact_duplicates, dedup.near_duplicates):
        Shifting.passes = 0
        got = fn(Shifting(first), keep="longest")
        want = fn(list(first), keep="longest")
        np.testing.assert_array_equal(got.cluster, want.cluster)
        np.testing.assert_array_equal(got.keep, want.keep)


def test_documents_outlive_a_mutated_list():
    # The call holds every document while the GIL is released: a list changed by another thread
    # meanwhile cannot free them under the core.
    import threading

    texts = ["w%d " % (i % 97) * 200 for i in range(4000)]
    expected = dedup.exact_hashes(list(texts), num_threads=2)
    stop = threading.Event()

    def mutate():  # replaces every document by an equal new str: the old one is freed unless held
        while not stop.is_set():
            for i in range(len(texts)):
                texts[i] = (texts[i] + ".")[:-1]

    t = threading.Thread(target=mutate)
    t.start()
    try:
        for _ in range(5):
            got = dedup.exact_hashes(texts, num_threads=2)
    finally:
        stop.set()
        t.join()
    np.testing.assert_array_equal(got, expected)


# --------------------------------------------------------------------------------------------
# The clustering phases, each alone, and their composition


def ref_bucket_pairs(keys, docs, groups=None):
    """Plain reference of bucket_pairs: buckets of equal key, members by id, all pairs up to 128
    members, else each member with the first and with its predecessor; sorted, unique, one group."""
    buckets: dict = {}
    for k, d in zip(keys.tolist(), docs.tolist()):
        buckets.setdefault(k, set()).add(d)
    group_of = {} if groups is None else dict(zip(docs.tolist(), groups.tolist()))
    pairs = set()
    for members in buckets.values():
        m = sorted(members)
        if len(m) <= 128:
            pairs.update(itertools.combinations(m, 2))
        else:
            for y in range(1, len(m)):
                pairs.add((m[0], m[y]))
                if y > 1:
                    pairs.add((m[y - 1], m[y]))
    if groups is not None:
        pairs = {(a, b) for a, b in pairs if group_of[a] == group_of[b]}
    return np.array(sorted(pairs), dtype=np.int64).reshape(-1, 2)


def ref_components(ids, pairs, scores=None):
    """Kept id per document: connected components, highest score, ties to the smallest id."""
    parent = {i: i for i in ids}

    def find(x):
        while parent[x] != x:
            x = parent[x]
        return x

    for a, b in pairs:
        ra, rb = find(a), find(b)
        if ra != rb:
            parent[max(ra, rb)] = min(ra, rb)
    score = dict(zip(ids, scores)) if scores is not None else {i: 0.0 for i in ids}
    best: dict = {}
    for i in sorted(ids):
        r = find(i)
        if r not in best or score[i] > score[best[r]]:
            best[r] = i
    return np.array([best[find(i)] for i in ids], dtype=np.int64)


def compose(sig, hashes, *, bands, rows, ids, groups=None, scores=None, verify=True, threshold=0.8,
            sets=None, split=None, shuffle_seed=0):
    """cluster_signatures from the Python-level phases: band keys computed in two halves (rows
    [0, split) and [split, n)), their rows bucketed together in a shuffled order."""
    n = len(ids)
    split = n // 2 if split is None else split
    exact = dedup.exact_pairs(hashes, groups=groups, docs=ids) if hashes is not None else np.zeros((0, 2), np.int64)
    # lsh_params may leave trailing columns unused: LSH reads the first bands * rows.
    parts = [dedup.band_keys(sig[lo:hi, :bands * rows], bands=bands, rows=rows,
                             groups=None if groups is None else groups[lo:hi])
             for lo, hi in ((0, split), (split, n))]
    keys = np.vstack([p[0] for p in parts])
    has_keys = np.concatenate([p[1] for p in parts])
    lsh = has_keys & ~np.isin(ids, exact[:, 1])
    row_keys = keys[lsh].ravel()
    row_docs = np.repeat(ids[lsh], bands)
    row_groups = None if groups is None else np.repeat(groups[lsh], bands)
    order = np.random.default_rng(shuffle_seed).permutation(row_keys.size)
    cand = dedup.bucket_pairs(row_keys[order], row_docs[order],
                              groups=None if row_groups is None else row_groups[order])
    if verify:
        if sets is not None:
            sim, ok = dedup.verify_pairs(cand, threshold=threshold, shingle_sets=sets, docs=ids)
        else:
            sim, ok = dedup.verify_pairs(cand, threshold=threshold, signatures=sig, docs=ids)
    else:
        sim, ok = np.ones(len(cand)), np.ones(len(cand), bool)
    pairs = np.vstack([exact, cand[ok]])
    similarity = np.concatenate([np.ones(len(exact)), sim[ok]])
    return dedup.connected_components(ids, pairs, scores=scores), pairs, similarity


def _same_result(r, ids, kept, pairs, similarity):
    np.testing.assert_array_equal(kept, ids[r.cluster])
    np.testing.assert_array_equal(kept == ids, r.keep)
    # The same duplicate edges, in the same order (exact pairs first, then the kept candidates).
    np.testing.assert_array_equal(pairs, ids[r.pairs])
    np.testing.assert_array_equal(similarity, r.similarity)


def _phase_corpus():
    texts, langs = make_corpus(seed=29, bases_per_lang=3, variants=4)
    rng = random.Random(29)
    extra = [t for _, a, b in REAL_PAIRS for t in (a, b)]
    extra_langs = [lang for lang, _, _ in REAL_PAIRS for _ in (0, 1)]
    dups = [texts[rng.randrange(len(texts))] for _ in range(12)]  # exact copies, some across languages
    dup_langs = [rng.choice(["en", "ru", "zh"]) for _ in dups]
    empty = ["", "  ", "...", "!!"]  # no shingles: exact duplicates of one another only
    texts = texts + extra + [d.upper() + " ." for d in dups] + dups + empty + list(SAMPLES.values())
    langs = langs + extra_langs + dup_langs + dup_langs + ["en", "en", "ru", "en"] + list(SAMPLES)
    order = rng.sample(range(len(texts)), len(texts))
    return [texts[i] for i in order], [langs[i] for i in order]


@pytest.mark.parametrize("scope, keep, threshold", [
    ("lang", "first", 0.8), ("global", "first", 0.7), ("lang", "longest", 0.6), ("global", "scores", 0.8),
])
def test_phases_compose_to_near_duplicates(scope, keep, threshold):
    texts, langs = _phase_corpus()
    n = len(texts)
    r = dedup.near_duplicates(texts, langs=langs, scope=scope, threshold=threshold,
                              keep=np.random.default_rng(3).random(n) if keep == "scores" else keep)
    ids = np.arange(n, dtype=np.int64) * (1 << 40) + 12345  # increasing, far from 0..n-1
    index = {lang: k for k, lang in enumerate(dict.fromkeys(langs))}
    groups = np.array([index[lang] for lang in langs], np.int64) if scope == "lang" else None
    scores = {"first": None, "longest": np.array([len(t.encode()) for t in texts], float),
              "scores": np.random.default_rng(3).random(n)}[keep]
    num_perm, bands, rows = 128, r.info["bands"], r.info["rows"]
    sig = dedup.minhash_signatures(texts, num_perm=num_perm)
    kept, pairs, similarity = compose(sig, dedup.exact_hashes(texts), bands=bands, rows=rows, ids=ids,
                                      groups=groups, scores=scores, threshold=threshold,
                                      sets=dedup.shingle_sets(texts), split=n // 3)
    assert r.num_removed > 20 and r.info["candidate_pairs"] > len(r.pairs) - r.info["exact_merged"]
    _same_result(r, ids, kept, pairs, similarity)


@pytest.mark.parametrize("verify", [True, False])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_phases_compose_to_cluster_signatures_on_random_signatures(verify, seed):
    # Few distinct signature values: large buckets (star + chain past 128 members), exact duplicates,
    # rows without shingles, groups, and ids that are neither 0..n-1 nor in order of the rows.
    rng = np.random.default_rng(seed)
    n, num_perm, bands = 700, 16, 8
    sig = rng.integers(0, 3, size=(n, num_perm)).astype(np.uint32)
    sig[: n // 2] = sig[rng.integers(0, 20, n // 2)]  # many equal rows, hence buckets over 128 members
    sig[rng.random(n) < 0.05] = np.iinfo(np.uint32).max
    hashes = rng.integers(0, 2**63, size=(n, 2)).astype(np.uint64)
    hashes[rng.random(n) < 0.2] = hashes[0]
    langs = [str(g) for g in rng.integers(0, 3, n)]
    index = {lang: k for k, lang in enumerate(dict.fromkeys(langs))}  # cluster_signatures' group codes
    groups = np.array([index[lang] for lang in langs], np.int64)
    scores = rng.integers(0, 4, n).astype(np.float64)  # ties
    ids = rng.permutation(n).astype(np.int64) * 1_000_003 - 500_000_000
    for hs, gr, sc in ((hashes, groups, scores), (None, None, None), (hashes, None, None)):
        r = dedup.cluster_signatures(sig, hashes=hs, langs=None if gr is None else langs, bands=bands,
                                     threshold=0.5, verify=verify,
                                     keep="first" if sc is None else sc)
        assert r.info["candidate_pairs"] > 128 * 4
        # cluster_signatures numbers documents by row: the ids must order like the rows for its ties.
        order = np.sort(ids)
        kept, pairs, similarity = compose(sig, hs, bands=bands, rows=num_perm // bands, ids=order, groups=gr,
                                          scores=sc, verify=verify, threshold=0.5, shuffle_seed=seed)
        _same_result(r, order, kept, pairs, similarity)
        # Ids in another order than the rows: the same as cluster_signatures of the rows sorted by id
        # (which members a large bucket pairs, and which exact duplicate goes on, follow the id order).
        by_id = np.argsort(ids)
        r2 = dedup.cluster_signatures(sig[by_id], hashes=None if hs is None else hs[by_id],
                                      langs=None if gr is None else [langs[i] for i in by_id], bands=bands,
                                      threshold=0.5, verify=verify, keep="first" if sc is None else sc[by_id])
        index2 = {lang: k for k, lang in enumerate(dict.fromkeys(langs[i] for i in by_id))}
        gr2 = None if gr is None else np.array([index2[lang] for lang in langs], np.int64)
        kept2, pairs2, similarity2 = compose(sig, hs, bands=bands, rows=num_perm // bands, ids=ids, groups=gr2,
                                             scores=sc, verify=verify, threshold=0.5, split=123)
        np.testing.assert_array_equal(kept2[by_id], ids[by_id][r2.cluster])
        np.testing.assert_array_equal(pairs2, ids[by_id][r2.pairs])
        np.testing.assert_array_equal(similarity2, r2.similarity)


def test_band_keys_depend_only_on_the_row_band_and_group():
    texts, _ = make_corpus(seed=31, bases_per_lang=2, variants=2)
    texts = texts + ["", "..."]
    sig = dedup.minhash_signatures(texts, num_perm=64)
    keys, has = dedup.band_keys(sig, bands=16, rows=4)
    assert keys.shape == (len(texts), 16) and keys.dtype == np.uint64 and has.dtype == bool
    assert has[:-2].all() and not has[-2:].any() and not keys[-2:].any()
    perm = np.random.default_rng(0).permutation(len(texts))
    np.testing.assert_array_equal(dedup.band_keys(sig[perm], bands=16, rows=4)[0], keys[perm])
    parts = [dedup.band_keys(sig[k:k + 7], bands=16, rows=4, num_threads=t)[0] for t, k in
             zip(itertools.cycle([1, 3]), range(0, len(texts), 7))]
    np.testing.assert_array_equal(np.vstack(parts), keys)
    # The group is hashed in: equal rows of different groups share no key; group 0 is no group.
    twice = np.vstack([sig[:5], sig[:5]])
    g = np.array([0] * 5 + [7] * 5, np.uint64)
    k2, _ = dedup.band_keys(twice, bands=16, rows=4, groups=g)
    np.testing.assert_array_equal(k2[:5], keys[:5])
    assert not np.isin(k2[5:], k2[:5]).any()
    # Signed group codes are their two's-complement bits.
    np.testing.assert_array_equal(dedup.band_keys(sig[:3], bands=16, rows=4, groups=np.array([-1, 2, 3]))[0],
                                  dedup.band_keys(sig[:3], bands=16, rows=4,
                                                  groups=np.array([2**64 - 1, 2, 3], np.uint64))[0])
    # Other band shapes read other columns: one band of all 64 values.
    k64, _ = dedup.band_keys(sig, bands=1, rows=64)
    assert k64.shape == (len(texts), 1) and len(np.unique(k64[:-2])) == len(np.unique(sig[:-2], axis=0))


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 6), st.integers(-3, 300)), max_size=400), st.booleans(),
       st.integers(0, 2**32 - 1))
def test_bucket_pairs_match_reference(rows, with_groups, seed):
    rng = np.random.default_rng(seed)
    keys = np.array([k for k, _ in rows], np.uint64) * np.uint64(0x9E3779B97F4A7C15)
    docs = np.array([d for _, d in rows], np.int64) * (1 << 40)
    groups = (docs // (1 << 40)) % 3 if with_groups else None  # a function of the document
    got = dedup.bucket_pairs(keys, docs, groups=groups)
    np.testing.assert_array_equal(got, ref_bucket_pairs(keys, docs, groups))
    perm = rng.permutation(len(rows))
    np.testing.assert_array_equal(dedup.bucket_pairs(keys[perm], docs[perm],
                                                     groups=None if groups is None else groups[perm]), got)


def test_bucket_pairs_large_buckets_stay_linear():
    docs = np.arange(1000, dtype=np.int64)[::-1] * 3
    keys = np.zeros(1000, np.uint64)
    pairs = dedup.bucket_pairs(keys, docs)
    assert len(pairs) == 2 * 999 - 1
    np.testing.assert_array_equal(pairs, ref_bucket_pairs(keys, docs))
    small = dedup.bucket_pairs(keys[:128], docs[:128])
    assert len(small) == 128 * 127 // 2
    assert dedup.bucket_pairs(np.zeros(0, np.uint64), np.zeros(0, np.int64)).shape == (0, 2)


def test_verify_pairs_match_reference():
    texts, _ = make_corpus(seed=37, bases_per_lang=2, variants=3)
    texts = texts + [""]
    sets = dedup.shingle_sets(texts)
    sig = dedup.minhash_signatures(texts, num_perm=64)
    rng = np.random.default_rng(5)
    n = len(texts)
    pairs = np.vstack([rng.integers(0, n, (200, 2)), [[0, 1], [n - 1, 0], [n - 1, n - 1]]])
    sim, ok = dedup.verify_pairs(pairs, threshold=0.5, shingle_sets=sets)
    rows = [sets.values[sets.offsets[i]:sets.offsets[i + 1]] for i in range(n)]
    for (i, j), s in zip(pairs.tolist(), sim.tolist()):
        inter = np.intersect1d(rows[i], rows[j]).size
        union = rows[i].size + rows[j].size - inter
        assert s == (inter / union if union else 0.0)
    np.testing.assert_array_equal(ok, sim >= 0.5)
    sim_sig, ok_sig = dedup.verify_pairs(pairs, threshold=0.5, signatures=sig)
    np.testing.assert_array_equal(sim_sig, [np.mean(sig[i] == sig[j]) for i, j in pairs])
    # Ids, and the (values, offsets) form of the sets.
    ids = np.arange(n, dtype=np.int64)[::-1] * 11 - 7
    got, _ = dedup.verify_pairs(ids[::-1][pairs], threshold=0.5, shingle_sets=(sets.values, sets.offsets),
                                docs=ids[::-1], num_threads=3)
    np.testing.assert_array_equal(got, sim)


@settings(max_examples=60, deadline=None)
@given(st.integers(0, 60), st.integers(0, 80), st.booleans(), st.integers(0, 2**32 - 1))
def test_connected_components_match_reference(n, m, with_scores, seed):
    rng = np.random.default_rng(seed)
    ids = rng.choice(2**62, size=n, replace=False).astype(np.int64) - 2**61
    pairs = ids[rng.integers(0, n, (m, 2))] if n else np.zeros((0, 2), np.int64)
    scores = rng.integers(0, 3, n).astype(float) if with_scores else None
    got = dedup.connected_components(ids, pairs, scores=scores)
    np.testing.assert_array_equal(got, ref_components(ids.tolist(), pairs.tolist(),
                                                      None if scores is None else scores.tolist()))
    if n:
        dense = dedup.connected_components(n, rng.integers(0, n, (m, 2)))
        assert dense.dtype == np.int64 and (dense <= np.arange(n)).all()


def test_exact_pairs_chain_runs_of_equal_hashes():
    texts = ["a b c", "x", "A B C!", "a b c", "x", "y", "", "..."]
    hashes = dedup.exact_hashes(texts)
    pairs = dedup.exact_pairs(hashes)
    assert sorted(pairs.tolist()) == [[0, 2], [1, 4], [2, 3], [6, 7]]  # runs chained in id order
    np.testing.assert_array_equal(pairs, dedup.cluster_hashes(hashes).pairs)  # in its order
    ids = np.array([50, 40, 30, 20, 10, 0, -10, -20])
    pairs = dedup.exact_pairs(hashes, docs=ids)
    assert sorted(pairs.tolist()) == [[-20, -10], [10, 40], [20, 30], [30, 50]]
    grouped = dedup.exact_pairs(hashes, groups=np.array([0, 0, 1, 0, 1, 0, 0, 0]))
    assert sorted(grouped.tolist()) == [[0, 3], [6, 7]]


def test_phases_bad_input():
    sig = np.zeros((4, 8), np.uint32)
    pairs = np.array([[0, 1]])
    cases = [
        (lambda: dedup.band_keys(sig, bands=3, rows=2), r"bands \* rows must equal the signature width 8"),
        (lambda: dedup.band_keys(sig.astype(np.int64), bands=4, rows=2), "signatures must be a"),
        (lambda: dedup.band_keys(sig, bands=4, rows=2, groups=[1, 2]),
         r"groups must be None or an integer array of shape \(4,\)"),
        (lambda: dedup.band_keys(sig, bands=0, rows=8), "bands must be an integer"),
        (lambda: dedup.bucket_pairs(np.zeros(3, np.int64), np.zeros(3, np.int64)), "keys must be a 1-D uint64"),
        (lambda: dedup.bucket_pairs(np.zeros(3, np.uint64), np.zeros(2, np.int64)),
         r"docs must have one id per key \(3\)"),
        (lambda: dedup.bucket_pairs(np.zeros(3, np.uint64), np.zeros(3)), "docs must be a 1-D integer array"),
        (lambda: dedup.bucket_pairs(np.zeros(2, np.uint64), np.array([1, 1]), groups=np.array([0, 1])),
         "document 1 has rows of two groups"),
        (lambda: dedup.verify_pairs(pairs, signatures=sig, docs=[0, 2, 3, 4]),
         r"pairs\[0\] = \(0, 1\) names document 1"),
        (lambda: dedup.verify_pairs(np.array([[0, 9]]), signatures=sig),
         r"names document 9, which is not one of the 4"),
        (lambda: dedup.verify_pairs(pairs, signatures=sig, docs=[0, 1, 1, 2]),
         "docs must be distinct document ids: 1"),
        (lambda: dedup.verify_pairs(pairs), "exactly one of signatures= or shingle_sets=, got neither"),
        (lambda: dedup.verify_pairs(pairs, signatures=sig, shingle_sets=(np.zeros(0, np.uint64), [0, 0])),
         "got both"),
        (lambda: dedup.verify_pairs(pairs, shingle_sets=(np.array([3, 2], np.uint64), [0, 2, 2])),
         "shingle_sets row 0 is not sorted strictly ascending"),
        (lambda: dedup.verify_pairs(pairs, shingle_sets=(np.array([3], np.uint64), [0, 2, 2])),
         "shingle_sets offsets must be non-decreasing and at most 1"),
        (lambda: dedup.verify_pairs(pairs, shingle_sets=[1, 2]), "shingle_sets must be a Ragged"),
        (lambda: dedup.verify_pairs(pairs, threshold=0, signatures=sig), "threshold must be a number in"),
        (lambda: dedup.verify_pairs(np.array([0, 1]), signatures=sig),
         r"pairs must be an integer array of shape \(m, 2\)"),
        (lambda: dedup.connected_components(3, np.array([[0, 3]])), r"pairs\[0\] = \(0, 3\) names document 3"),
        (lambda: dedup.connected_components(-1, pairs), "docs must be a number of documents >= 0"),
        (lambda: dedup.connected_components([5, 5], pairs), "docs must be distinct document ids: 5"),
        (lambda: dedup.connected_components(2, pairs, scores=[1.0, np.nan]), "scores must be finite"),
        (lambda: dedup.connected_components(2, pairs, scores=[1.0]), "scores must be 2 finite numbers"),
        (lambda: dedup.connected_components(np.array([2**63], np.uint64), pairs), "docs must hold int64 values"),
        (lambda: dedup.exact_pairs(np.zeros((3, 2), np.int64)), "hashes must be a"),
        (lambda: dedup.exact_pairs(np.zeros((3, 2), np.uint64), docs=[1, 2]),
         r"docs must have one id per document \(3\)"),
    ]
    for call, match in cases:
        with pytest.raises(ValueError, match=match):
            call()


def test_keep_scores_as_an_array():
    # keep= may be a numpy array of scores (comparing it with "longest" once raised "truth value ... ambiguous").
    texts = ["abc", "ABC!!", "Abc.", "other"]
    scores = np.array([0.0, 1.0, 5.0, 0.0])
    assert dedup.near_duplicates(texts, keep=scores).cluster.tolist() == [2, 2, 2, 3]
    assert dedup.exact_duplicates(texts, keep=scores).cluster.tolist() == [2, 2, 2, 3]


def test_document_type_error_is_a_type_and_a_value_error():
    # One rule for str/bytes documents in every binding (csrc/bind_convert.h).
    for exc in (TypeError, ValueError):
        with pytest.raises(exc, match=r"texts\[1\] must be str or UTF-8 bytes, got float"):
            dedup.exact_hashes(["a", 1.5])
    assert issubclass(core.DocumentTypeError, TypeError) and issubclass(core.DocumentTypeError, ValueError)
    with pytest.raises(core.DocumentTypeError, match="not a single bytes"):
        core._dedup_exact_hashes(b"one document", None, False, 0, 1)


def test_a_column_of_utf8_texts_gives_what_the_strs_give():
    """A uint8 Ragged (a RecordBlock's text column) is read as UTF-8 in place: hashes, signatures, shingle sets
    and duplicates equal those of the same texts as str."""
    from mlmix.ragged import Ragged
    from mlmix.recblock import RecordBlock

    rng = random.Random(3)
    alpha = "abc xyz éüß жизнь 中文字 𝔘𝔫𝔦 \u0301\t\n"
    texts = ["".join(rng.choice(alpha) for _ in range(rng.randint(0, 50))) for _ in range(400)]
    texts += [t.upper() for t in texts[:40]] + texts[:40]
    block = RecordBlock.from_records([{"id": str(i), "text": t} for i, t in enumerate(texts)])
    col = Ragged(*block.text_column())
    assert np.array_equal(dedup.exact_hashes(texts), dedup.exact_hashes(col))
    assert np.array_equal(dedup.minhash_signatures(texts, ngram=3), dedup.minhash_signatures(col, ngram=3))
    assert dedup.shingle_sets(texts, ngram=3).equals(dedup.shingle_sets(col, ngram=3))
    assert np.array_equal(dedup.exact_duplicates(texts).cluster, dedup.exact_duplicates(col).cluster)
    with pytest.raises((TypeError, ValueError)):
        dedup.exact_hashes(Ragged(np.zeros(3, np.int32), np.array([0, 3])))
