"""NativeBPE must give HF tokenizers' ids exactly, for the GPT-2, Llama-3 and both Qwen pre-tokenizers.

The reference is HF ``tokenizers`` itself (the tool users run today): every test encodes the same texts
with both and compares ids.
"""

from __future__ import annotations

import json
import random

import numpy as np
import pytest

tokenizers = pytest.importorskip("tokenizers")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from mlmix import Ragged  # noqa: E402
from mlmix.bpe import PATTERN_ALIASES, PATTERNS, NativeBPE, Unsupported, supported  # noqa: E402

LLAMA3 = next(p for p, (_, name) in PATTERNS.items() if name == "llama3")

# Short original sentences in the study's 12 languages (and their scripts).
SAMPLES = {
    "ar": "ذهبت الطالبة إلى المكتبة صباحًا، واستعارت ثلاثة كتب عن تاريخ العلوم.",
    "zh": "我们明天早上八点在图书馆门口见面，然后一起去博物馆参观。",
    "cs": "Příliš žluťoučký kůň úpěl ďábelské ódy, řekl učitel dětem ve škole.",
    "en": "The committee's report wasn't ready, so they'll meet again on Tuesday at 3:45 PM.",
    "et": "Jõulude ajal sõitsime vanaema juurde Tartusse ja sõime palju piparkooke.",
    "fi": "Hääyöaieuutinen kertoi, että järven jäällä pilkittiin koko viikonlopun ajan.",
    "he": "הילדים שיחקו בגן הציבורי עד שהשמש שקעה מאחורי ההרים.",
    "hi": "कल शाम हम सब दोस्त मिलकर नदी के किनारे घूमने गए और चाय पी।",
    "it": "L'anno scorso abbiamo visitato Firenze, e il Duomo c'è sembrato più bello che mai.",
    "ru": "Вчера вечером мы долго гуляли по набережной и обсуждали новые книги.",
    "es": "¿Dónde está la estación? El tren de las 18:05 llegará con veinte minutos de retraso.",
    "sw": "Watoto walicheza mpira uwanjani hadi jua lilipozama nyuma ya milima.",
}
TRICKY = [
    "",
    " ",
    "\n",
    "  leading and trailing  ",
    "It's THEY'LL we'VE I'M you'D she'S 'RE 'll 'ſ 'x ''",
    "tabs\tand\r\nCRLF\r\n\r\n  \n\n\t\n end",
    "nbsp\u00a0here ideographic\u3000space thin\u2009space\u2028\u2029 nel\u0085 x",
    "1234567890 ١٢٣٤٥ १२३४ ½ ² Ⅻ 3.14159 1,000,000",
    "👨\u200d👩\u200d👧\u200d👦 👍🏽 🇪🇪 🏳️\u200d🌈 ❤️",
    "a\u0301e\u0300 n\u0303 क्षि ﻻ \u05b0\u05b1 \u0300start",
    "<|im_start|>user\nhello<|im_end|>\n<|endoftext|><|im_start|",
    "code: def f(x):\n    return x**2  # comment\n\n\n\tpass",
    "x" * 300 + " " + "ab" * 200 + "\n" * 50 + " " * 120 + "!" * 130,
    "Ÿ\u0000\u0001\u001f\x7f\x85\xa0\xad",
    "\u105c0\U000105c0\U00031350\u0cf3\U00010940 newly assigned letters",
]


def _gpt2_variant(hf, *, add_prefix_space: bool):
    """The same ranks behind GPT-2's builtin ByteLevel(use_regex=True, add_prefix_space) pre-tokenizer."""
    d = json.loads(hf.to_str())
    d["pre_tokenizer"] = {"type": "ByteLevel", "add_prefix_space": add_prefix_space, "trim_offsets": True, "use_regex": True}
    d["model"]["ignore_merges"] = False
    return tokenizers.Tokenizer.from_str(json.dumps(d))


@pytest.fixture(scope="session")
def llama3_hf():
    """Qwen's ranks with Llama-3's regex (\\p{N}{1,3}) and a BOS template, as Llama-3's tokenizer.json has."""
    from mlmix._tiktoken import qwen_spec, tiktoken_to_hf

    path, _, specials = qwen_spec("qwen")
    tok = tiktoken_to_hf(path, LLAMA3, specials)
    d = json.loads(tok.to_str())
    d["post_processor"] = {
        "type": "TemplateProcessing",
        "single": [{"SpecialToken": {"id": "<|endoftext|>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
        "pair": [{"Sequence": {"id": "A", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 1}}],
        "special_tokens": {"<|endoftext|>": {"id": "<|endoftext|>", "ids": [specials["<|endoftext|>"]], "tokens": ["<|endoftext|>"]}},
    }
    return tokenizers.Tokenizer.from_str(json.dumps(d))


@pytest.fixture(scope="session")
def trained_hf():
    """A GPT-2-style byte-level BPE trained here (its own merge order), with a special and an added token."""
    from tokenizers import decoders, models, pre_tokenizers, trainers

    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=1200, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    corpus = list(SAMPLES.values()) * 20 + TRICKY * 5
    tok.train_from_iterator(corpus, trainer=trainer)
    tok.add_tokens([tokenizers.AddedToken("[MASK]", lstrip=True, rstrip=True, normalized=False)])
    tok.add_tokens([tokenizers.AddedToken("lib", normalized=True)])
    return tok


@pytest.fixture(scope="session")
def pairs(qwen_hf, qwen36_hf, llama3_hf, trained_hf):
    """(name, HF tokenizer, NativeBPE) for every family."""
    out = []
    for name, hf in [
        ("qwen2", qwen_hf),
        ("qwen3.5", qwen36_hf),
        ("llama3", llama3_hf),
        ("gpt2-trained", trained_hf),
        ("gpt2-prefix-space", _gpt2_variant(trained_hf, add_prefix_space=True)),
    ]:
        out.append((name, hf, NativeBPE.from_hf(hf)))
    return out


@pytest.fixture(scope="session")
def native(pairs):
    return {name: nb for name, _, nb in pairs}


@pytest.fixture(scope="session")
def small_split_json(trained_hf):
    """The small trained tokenizer with Qwen's Split + ByteLevel pre-tokenizer structure (cheap to load)."""
    d = json.loads(trained_hf.to_str())
    qwen_pattern = next(p for p, (_, name) in PATTERNS.items() if name == "qwen2")
    d["pre_tokenizer"] = {
        "type": "Sequence",
        "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": qwen_pattern}, "behavior": "Isolated", "invert": False},
            {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False},
        ],
    }
    return d


def _check(pairs, texts, **kw):
    for name, hf, nb in pairs:
        hf.encode_special_tokens = kw.get("split_special_tokens", False)
        try:
            expected = [e.ids for e in hf.encode_batch(list(texts), add_special_tokens=kw.get("add_special_tokens", True))]
        finally:
            hf.encode_special_tokens = False
        got = nb.encode_batch(list(texts), **kw)
        assert isinstance(got, Ragged) and got.values.dtype == np.uint32 and got.offsets.dtype == np.int64
        assert len(got) == len(texts)
        for i, (g, e) in enumerate(zip(got, expected)):
            assert g.tolist() == e, f"{name}: text {texts[i]!r}"


def test_pattern_families(pairs):
    assert [nb.pattern for _, _, nb in pairs] == ["qwen2", "qwen3.5", "llama3", "gpt2", "gpt2"]


def test_languages_and_tricky_cases(pairs):
    _check(pairs, list(SAMPLES.values()) + TRICKY)
    _check(pairs, [" ".join(SAMPLES.values()), "\n\n".join(SAMPLES.values()) * 3])


def test_add_special_tokens_off(pairs):
    _check(pairs, list(SAMPLES.values())[:4] + [""], add_special_tokens=False)


def test_unicode_blocks_match_hf(qwen_hf, qwen36_hf, native):
    """Every code point of a sample of 256-code-point blocks, in contexts that exercise each class.

    The blocks include letters, marks and digits assigned after Unicode 14 (Python 3.11's unicodedata),
    which HF's Oniguruma classifies by Unicode 16.0.
    """
    rng = random.Random(0)
    blocks = {0x00, 0x01, 0x02, 0x03, 0x05, 0x06, 0x09, 0x0C, 0x16, 0x18, 0x20, 0x30, 0xFF, 0x105, 0x10D, 0x11F, 0x16D, 0x1E0, 0x1F6, 0x313}
    blocks |= {rng.randrange(0x1100) for _ in range(4)}
    texts = []
    for b in sorted(blocks):
        chars = [chr(c) for c in range(b * 256, b * 256 + 256) if not 0xD800 <= c <= 0xDFFF]
        texts.append("".join(f"a{c}1{c}{c} {c}'{c}\n{c}\t" for c in chars))
    for hf, nb in ((qwen_hf, native["qwen2"]), (qwen36_hf, native["qwen3.5"])):
        expected = [e.ids for e in hf.encode_batch(texts)]
        got = nb.encode_batch(texts)
        for t, g, e in zip(texts, got, expected):
            assert g.tolist() == e, f"block starting U+{ord(t[1]):04X}"


_letters = st.sampled_from(list("aZsStTlLrReEvVmMdDſ'’ ") + list("".join(SAMPLES.values())))
_spaces = st.sampled_from([" ", "  ", "\t", "\n", "\r", "\r\n", "\u00a0", "\u3000", "\u2009", "\x0b", "\x0c", "\x85", "\u2028"])
_digits = st.sampled_from(list("0123456789١٢٣४५৬Ⅻ½²"))
_symbols = st.sampled_from(list("!?.,;:-_()[]{}<>|/\\\"'`~@#$%^&*+=") + ["<|im_start|>", "<|im_end|>", "<|endoftext|>", "[MASK]", "lib"])
_emoji = st.sampled_from(["👍", "👍🏽", "👨\u200d👩\u200d👧", "🇫🇮", "\u200d", "\ufe0f", "❤️", "\u0301", "\u0903", "\u05b4", "\u20dd"])
_piece = st.one_of(_letters, _spaces, _digits, _symbols, _emoji, st.text(min_size=1, max_size=3))
_text = st.lists(_piece, max_size=40).map("".join)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(texts=st.lists(_text, min_size=1, max_size=6))
def test_random_mixtures_match_hf(pairs, texts):
    _check(pairs, texts)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(texts=st.lists(st.text(st.characters(exclude_categories=["Cs"]), max_size=60), min_size=1, max_size=4))
def test_random_unicode_matches_hf(pairs, texts):
    _check(pairs, texts)


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(word=st.text(st.sampled_from("abcdeéxyzあい 1"), min_size=97, max_size=600))
def test_long_pieces_merge_like_hf(pairs, word):
    """Pieces longer than the short-array path (96 bytes) go through the heap; ids must not change."""
    _check(pairs, [word, word.replace(" ", "")])


_HAN = "的一是不了人我在有他这中大来上国个到说们为子和你地出道也时年得就那要下以生会自着去之过家学对可里后什么没发"


def test_cached_pieces_of_every_length_stay_exact(pairs):
    """The per-worker piece cache keeps pieces in tiers by length and id count (up to 16 bytes and 3 ids, up
    to 48 bytes and 20 ids, up to 128 bytes and 32 ids; longer ones are merged every time). Every piece is
    encoded once, then again from the cache (one thread: one worker's cache): the ids equal HF's both times."""
    pieces = ["ab", "héllo", "автомобиль", "नमस्तेदुनिया", "x" * 40, "é" * 30, " " + "z" * 100]
    pieces += [_HAN[:k] for k in (2, 5, 6, 15, 16, 17, 30, 42, 43, 44, 47)]  # 3 bytes each: around 16/48/128
    texts = [" ".join(pieces)] * 3 + pieces * 3 + ["，".join(pieces)] * 2
    _check(pairs, texts, num_threads=1)
    _check(pairs, texts)


def test_distinct_words_merge_in_batches(pairs):
    """Pieces that miss the worker's cache are merged 16 at a time and spliced back in order (flushed every 64
    and at each text's end). Words made up of random syllables in several scripts miss it nearly always; they
    are mixed with repeated words (cache hits), pieces over 96 bytes (merged at once, between deferred ones),
    numbers, punctuation and special tokens (which split a text into segments). Ids equal HF's at the default
    thread count, 1 and 2."""
    rng = random.Random(7)
    syllables = ["ka", "ri", "to", "mé", "zu", "qa", "па", "ро", "ли", "ще", "κα", "λο", "של", "مر", "नि", "ता",
                 "の", "か", "中", "文", "ü", "ß", "x", "ng"]
    common = ["the", " of", "и", "de", "的"]

    def word():
        r = rng.random()
        if r < 0.2:
            return rng.choice(common)
        if r < 0.22:
            return "".join(rng.choice(syllables) for _ in range(rng.randint(40, 70)))  # > 96 bytes
        if r < 0.27:
            return str(rng.randint(0, 10**6)) + rng.choice([",", ".", "!?", "…"])
        return "".join(rng.choice(syllables) for _ in range(rng.randint(1, 6)))

    texts = []
    for i in range(40):
        words = [word() for _ in range(rng.randint(0, 400))]
        if i % 5 == 0 and words:
            words.insert(len(words) // 2, "<|endoftext|>")
        texts.append(rng.choice([" ", "  ", "\n"]).join(words))
    _check(pairs, texts)  # the default thread count, as users call it
    _check(pairs, texts, num_threads=1)
    _check(pairs, texts, num_threads=2)


def test_special_tokens_as_text(qwen_hf, trained_hf, native):
    texts = ["<|im_start|>user\nhi<|im_end|>", "a<|endoftext|>b [MASK] c"]
    for hf, nb in ((qwen_hf, native["qwen2"]), (trained_hf, native["gpt2-trained"])):
        hf.encode_special_tokens = True
        try:
            expected = [e.ids for e in hf.encode_batch(texts)]
        finally:
            hf.encode_special_tokens = False
        assert nb.encode_batch(texts, split_special_tokens=True).to_lists() == expected
        assert nb.encode_batch(texts).to_lists() == [e.ids for e in hf.encode_batch(texts)]


def test_added_token_flags(trained_hf, native):
    """lstrip/rstrip swallow White_Space around [MASK]; 'lib' (normalized=true) is matched in the gaps only."""
    texts = ["x  [MASK]\u3000 y", "[MASK][MASK]", " \t[MASK]", "library <|endoftext|>lib", "[MAS", "a\u00a0[MASK]\u00a0b"]
    nb = native["gpt2-trained"]
    assert nb.encode_batch(texts).to_lists() == [e.ids for e in trained_hf.encode_batch(texts)]


@pytest.mark.parametrize("seed, words, docs", [(1, (0, 30), 300), (2, (50, 400), 2000)])
def test_threads_do_not_change_ids(native, seed, words, docs):
    """Any thread count gives the same ids; the second batch has over 1M ids, where the work units' ids are also
    copied into the result on the encoding's threads."""
    nb = native["qwen3.5"]
    rng = random.Random(seed)
    pool = list(SAMPLES.values()) + TRICKY
    texts = [" ".join(rng.choice(pool) for _ in range(rng.randrange(*words))) for _ in range(docs)]
    one = nb.encode_batch(texts, num_threads=1)
    assert (len(one.values) > 1 << 20) == (docs == 2000)
    for n in (2, 3, 8):
        assert nb.encode_batch(texts, num_threads=n).equals(one)
    assert np.array_equal(nb.encode(texts[5]), one[5])
    assert np.array_equal(nb.encode(texts[-1]), one[docs - 1])


def test_empty_batch_and_empty_texts(native):
    nb = native["qwen2"]
    r = nb.encode_batch([])
    assert len(r) == 0 and r.offsets.tolist() == [0]
    assert nb.encode_batch(["", ""]).offsets.tolist() == [0, 0, 0]


def test_from_tokenizer_json_and_tiktoken(tmp_path, qwen_hf, trained_hf, small_split_json):
    from mlmix._tiktoken import qwen_spec

    text = SAMPLES["fi"] + " <|endoftext|> [MASK] it's"
    small = tokenizers.Tokenizer.from_str(json.dumps(small_split_json))
    p = tmp_path / "tokenizer.json"
    p.write_text(json.dumps(small_split_json))
    for source in (p, str(p), json.dumps(small_split_json), small_split_json):
        nb = NativeBPE.from_tokenizer_json(source)
        assert nb.pattern == "qwen2" and nb.encode(text).tolist() == small.encode(text).ids
    want = qwen_hf.encode(text).ids
    path, pattern, specials = qwen_spec("qwen")
    assert NativeBPE.from_tiktoken(path, pattern, specials).encode(text).tolist() == want


def test_unicode_version_is_onigurumas():
    from mlmix._core_loader import core

    assert core.BPE_UNICODE_VERSION == "16.0.0"


# --- what is not supported, and why ----------------------------------------------------------------
def _with(d, **changes):
    d = json.loads(json.dumps(d))
    for path, value in changes.items():
        node = d
        keys = path.split("__")
        for k in keys[:-1]:
            node = node[int(k) if isinstance(node, list) else k]
        node[keys[-1]] = value
    return d


@pytest.mark.parametrize(
    "changes, reason",
    [
        ({"normalizer": {"type": "NFKC"}}, "normalizer 'NFKC'"),
        ({"normalizer": {"type": "Sequence", "normalizers": [{"type": "NFC"}, {"type": "Lowercase"}]}}, "['NFC', 'Lowercase']"),
        ({"model__byte_fallback": True}, "byte_fallback"),
        ({"model__dropout": 0.1}, "dropout"),
        ({"truncation": {"max_length": 8, "stride": 0, "strategy": "LongestFirst", "direction": "Right"}}, "truncation"),
        ({"pre_tokenizer": {"type": "Whitespace"}}, "'Whitespace' is not a byte-level"),
        ({"pre_tokenizer__pretokenizers__0__pattern": {"Regex": r"\p{L}+|\s+"}}, "has no native scanner"),
        ({"pre_tokenizer__pretokenizers__0__behavior": "Removed"}, "only Isolated"),
        ({"model__continuing_subword_prefix": "##"}, "continuing_subword_prefix"),
        ({"post_processor": {"type": "BertProcessing", "sep": ["x", 1], "cls": ["y", 2]}}, "'BertProcessing'"),
    ],
)
def test_unsupported_reasons(small_split_json, changes, reason):
    d = _with(small_split_json, **changes)
    ok, why = supported(d)
    assert not ok and reason in why
    with pytest.raises(Unsupported, match="not|only|is set|random|no native"):
        NativeBPE.from_tokenizer_json(d)


def test_unsupported_models_and_flags():
    from tokenizers import models

    wp = tokenizers.Tokenizer(models.WordPiece({"[UNK]": 0, "a": 1}, unk_token="[UNK]"))
    ok, why = supported(wp)
    assert not ok and "WordPiece" in why
    uni = tokenizers.Tokenizer(models.Unigram([("a", -1.0), ("b", -2.0)], 0, False))
    ok, why = supported(uni)
    assert not ok and "Unigram" in why


def test_supported_ones(llama3_hf, trained_hf, small_split_json):
    for tok in (llama3_hf, trained_hf, small_split_json):
        assert supported(tok) == (True, "")
    single = trained_hf.to_str()
    d = json.loads(single)
    d["added_tokens"][-1]["single_word"] = True
    ok, why = supported(d)
    assert not ok and "single_word" in why


# --- bad input ---------------------------------------------------------------------------------------
def test_bad_input(native):
    nb = native["qwen2"]
    with pytest.raises(ValueError, match=r"texts\[1\] is not valid Unicode"):
        nb.encode_batch(["fine", "bad \ud800 surrogate"])
    for threads in (1, 3):  # the first bad text is named, whatever the thread count
        with pytest.raises(ValueError, match=r"texts\[700\] is not valid Unicode: .* at index 2$"):
            nb.encode_batch(["ok"] * 700 + ["ab\udfff", "ok", "\ud800"] + ["ok"] * 900, num_threads=threads)
    with pytest.raises(TypeError, match=r"texts\[0\] must be a str, got bytes"):
        nb.encode_batch([b"bytes"])
    with pytest.raises(TypeError, match="single str"):
        nb.encode_batch("one string")
    with pytest.raises(ValueError, match="num_threads must be an int >= 0"):
        nb.encode_batch(["x"], num_threads=-1)
    with pytest.raises(TypeError, match="text must be a str"):
        nb.encode(None)
    with pytest.raises(FileNotFoundError, match="neither a JSON string nor an existing file"):
        NativeBPE.from_tokenizer_json("/no/such/tokenizer.json")
    with pytest.raises(ValueError, match="pattern has no native scanner"):
        NativeBPE.from_tiktoken("/x", r"\w+")


def test_merges_as_strings_and_foreign_tokens(small_split_json):
    """The older "a b" merges form loads the same; a non-byte-level vocab entry is harmless; a merge naming a
    token that is not in the vocabulary is an error, as in HF."""
    text = SAMPLES["cs"] + " " + SAMPLES["zh"]
    want = NativeBPE.from_tokenizer_json(small_split_json).encode(text).tolist()
    d = json.loads(json.dumps(small_split_json))
    d["model"]["merges"] = [" ".join(m) for m in d["model"]["merges"]]
    d["model"]["vocab"]["not byte-level ✓"] = max(d["model"]["vocab"].values()) + 1
    assert NativeBPE.from_tokenizer_json(d).encode(text).tolist() == want
    d["model"]["merges"].append("Ġzz qq")
    with pytest.raises(ValueError, match="missing from the vocabulary"):
        NativeBPE.from_tokenizer_json(d)


def test_tokens_whose_bytes_do_not_merge_back():
    """A token can be in the vocabulary yet not be what merging its own bytes gives: here "abc" comes from
    (ab, c), but (b, c) ranks before (a, b), so "abc" merges to [a, bc]. Only tokens that merge back are looked
    up whole (marked at construction); the others are merged, as HF does."""
    from tokenizers import decoders, models, pre_tokenizers

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {c: i for i, c in enumerate(sorted(alphabet))}
    for t in ("bc", "ab", "abc", "xy", "xyz"):
        vocab[t] = len(vocab)
    merges = [("b", "c"), ("a", "b"), ("ab", "c"), ("x", "y"), ("xy", "z")]
    hf = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=merges))
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    texts = ["abc", "abc abc", "xyz abc xyz", "abcabc", "zabc"]
    want = [e.ids for e in hf.encode_batch(texts)]
    assert want[0] == [vocab["a"], vocab["bc"]] and want[2][0] == vocab["xyz"]
    assert NativeBPE.from_hf(hf).encode_batch(texts).to_lists() == want


def test_real_multilingual_records(pairs):
    """The project's demo records (12 languages, instruction + response) when present, else the samples."""
    try:
        from mlmix.data import demo_records

        texts = [r["instruction"] + "\n" + r["response"] for r in demo_records()]
    except ImportError:
        texts = list(SAMPLES.values())
    _check(pairs, texts)
    _check(pairs, ["\n\n".join(texts[i : i + 40]) for i in range(0, len(texts), 40)])


_NFC_CASES = [
    "plain ascii and é precomposed",
    "cafe\u0301 decomposed",
    "\u212b angstrom sign, \ufb01 ligature (NFC keeps it), \u2126 ohm sign",
    "a\u0323\u0301 and a\u0301\u0323 (reordered)",
    "क़ नुक़्ता, शब्द हिन्दी",
    "\u1100\u1161 hangul jamo, 한국어",
    "ا\u0653 madda, مرحبا",
    "<|endoftext|>e\u0301[MASK]",
]


@pytest.fixture(scope="session")
def nfc_pair(small_split_json):
    d = json.loads(json.dumps(small_split_json))
    d["normalizer"] = {"type": "NFC"}
    return tokenizers.Tokenizer.from_str(json.dumps(d)), NativeBPE.from_tokenizer_json(d)


def test_nfc_normalizer(nfc_pair):
    """NFC tokenizers: documents the quick check proves normalized are encoded natively, the rest by HF."""
    hf, nb = nfc_pair
    _check([("nfc", hf, nb)], _NFC_CASES + list(SAMPLES.values()))
    _check([("nfc", hf, nb)], _NFC_CASES[::-1], split_special_tokens=True)
    _, _, unencoded = nb._encoder.encode_batch(_NFC_CASES, True, False, 1)
    assert unencoded.tolist() == [1, 2, 3, 4, 5, 6, 7]  # only what NFC may change goes to HF
    _, _, unencoded = nb._encoder.encode_batch(list(SAMPLES.values()), True, False, 2)
    assert unencoded.tolist() == []


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(texts=st.lists(st.text(st.sampled_from("ae\u0301\u0300\u0323\u0308Åå \u093c\u0915\u1100\u1161\u11a8가"), max_size=12), max_size=5))
def test_nfc_random(nfc_pair, texts):
    hf, nb = nfc_pair
    _check([("nfc", hf, nb)], texts)


# --- OpenAI-style patterns: tiktoken's spellings of cl100k, o200k and r50k ----------------------------------------
CL100K = next(p for p, (_, name) in PATTERNS.items() if name == "cl100k-onig")
O200K = next(p for p, (_, name) in PATTERNS.items() if name == "o200k")
R50K = next(p for p, s in PATTERN_ALIASES.items() if p.startswith("'(?:"))
_CASES = [
    "helloWorld HELLOworld Hello's THEY'RE o'clock McDonald's iPhone XMLHttpRequest ǅemal ǈ ʰa ˆb",
    "1234567 12 1,234,567.891 ٣٤٥٦٧ x1y22z333w4444 ½¼ 2026-12-06",
    "path/to/file.txt a/b //x ?!/\n/ ./\r\n/ end/",
    "a\u0301B\u0301 \u0301x \u0301\u0302 Ω\u0301mega ΣΊΣΥΦΟΣ σίσυφος İstanbul ǲ",
    "x'ſ 'S 'ſt it's IT'S we'Ve 'll's''s",
]


@pytest.fixture(scope="session")
def openai_pairs(trained_hf):
    """cl100k's and o200k's regexes over Qwen's ranks (converted as mlmix._tiktoken does), r50k's over the small
    trained model; each with NativeBPE built from it."""
    from mlmix._tiktoken import qwen_spec, tiktoken_to_hf

    path, _, specials = qwen_spec("qwen")
    out = [(name, tiktoken_to_hf(path, pat, specials)) for name, pat in (("cl100k", CL100K), ("o200k", O200K))]
    d = json.loads(trained_hf.to_str())
    d["pre_tokenizer"] = {
        "type": "Sequence",
        "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": R50K}, "behavior": "Isolated", "invert": False},
            {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False},
        ],
    }
    out.append(("r50k", tokenizers.Tokenizer.from_str(json.dumps(d))))
    return [(name, hf, NativeBPE.from_hf(hf)) for name, hf in out]


def test_openai_patterns_are_native(openai_pairs):
    assert [nb.pattern for _, _, nb in openai_pairs] == ["cl100k-onig", "o200k", "gpt2"]


def test_openai_patterns_match_hf(openai_pairs):
    _check(openai_pairs, list(SAMPLES.values()) + TRICKY + _CASES)
    _check(openai_pairs, [" ".join(SAMPLES.values()) + " ".join(_CASES)], add_special_tokens=False)


def test_openai_patterns_unicode_blocks(openai_pairs):
    """Each code point of a sample of blocks between upper- and lower-case letters, digits, apostrophes, slashes."""
    rng = random.Random(2)
    blocks = {0x00, 0x01, 0x02, 0x03, 0x04, 0x05, 0x06, 0x09, 0x10, 0x1E, 0x1F, 0x20, 0x21, 0x2C, 0x30, 0xA6, 0xFF, 0x105, 0x16D, 0x1E9}
    blocks |= {rng.randrange(0x1100) for _ in range(4)}
    texts = []
    for b in sorted(blocks):
        chars = [chr(c) for c in range(b * 256, b * 256 + 256) if not 0xD800 <= c <= 0xDFFF]
        texts.append("".join(f"a{c}B{c}c1{c}{c} {c}'s{c}/\n{c}\tD{c}e{c}{c}'T" for c in chars))
    for name, hf, nb in openai_pairs[:2]:
        expected = [e.ids for e in hf.encode_batch(texts)]
        for t, g, e in zip(texts, nb.encode_batch(texts), expected):
            assert g.tolist() == e, f"{name}: block starting U+{ord(t[1]):04X}"


_cased = st.sampled_from(list("aAbBzZsStTlLdDmMſ'’/ 1234567890") + ["ǅ", "ʰ", "ǈ", "\u0301", "ΣΊ", "σί", "İ", "ß", "ﬆ", "\u212a"])
_openai_text = st.lists(st.one_of(_cased, _piece), max_size=40).map("".join)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(texts=st.lists(_openai_text, min_size=1, max_size=6))
def test_openai_patterns_random_match_hf(openai_pairs, texts):
    _check(openai_pairs, texts)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(texts=st.lists(st.text(st.characters(exclude_categories=["Cs"]), max_size=60), min_size=1, max_size=4))
def test_openai_patterns_random_unicode_match_hf(openai_pairs, texts):
    _check(openai_pairs, texts)


def test_openai_patterns_against_tiktoken(openai_pairs):
    """tiktoken with the same regex and ranks gives the same ids as NativeBPE (and HF) for o200k and cl100k.

    One reading differs, invisibly with these ranks: HF's Oniguruma takes cl100k's `\\p{N}{1,3}+` as a repeated
    group (a whole digit run is one piece), tiktoken as a possessive {1,3} (runs cut into threes). Qwen's ranks have
    single-digit tokens only, so the ids agree; with cl100k's own ranks they would differ on 4+ digit runs, and
    NativeBPE follows HF, its reference."""
    tiktoken = pytest.importorskip("tiktoken")
    from tiktoken.load import load_tiktoken_bpe

    from mlmix._tiktoken import qwen_spec

    path, _, _ = qwen_spec("qwen")
    ranks = load_tiktoken_bpe(path)
    texts = list(SAMPLES.values()) + TRICKY[:10] + _CASES
    try:
        from mlmix.data import demo_records

        texts += [r["instruction"] + "\n" + r["response"] for r in demo_records()[:300]]
    except ImportError:
        pass
    for name, pattern in (("cl100k", CL100K), ("o200k", O200K)):
        enc = tiktoken.Encoding(name, pat_str=pattern, mergeable_ranks=ranks, special_tokens={})
        hf, nb = next((hf, nb) for n, hf, nb in openai_pairs if n == name)
        for t, g in zip(texts, nb.encode_batch(texts, add_special_tokens=False)):
            assert g.tolist() == enc.encode_ordinary(t), f"{name}: {t!r}"
        pieces = [p for p, _ in hf.pre_tokenizer.pre_tokenize_str("12345")]
        assert pieces == (["12345"] if name == "cl100k" else ["123", "45"]), pieces


def test_compiled_spec_builds_the_same_encoder(pairs):
    """bpe.compile_spec (the model as raw bytes and id pairs, what the tokenizer cache keeps) builds an encoder
    with the same ids as the ByteLevel strings it came from; damaged arrays are a ValueError, not a crash."""
    import pickle

    from mlmix.bpe import compile_spec, spec_of

    texts = ["Hello wörld, 你好 — Привет!", "  spaces\tand\nlines 12345", "عربى हिन्दी", ""]
    for name, hf, nb in pairs[:4]:
        spec = spec_of(json.loads(hf.to_str()))
        compiled = pickle.loads(pickle.dumps(compile_spec(spec)))
        assert compile_spec(compiled) is compiled
        assert "vocab_tokens" not in compiled and compiled["vocab_bytes"].dtype == np.uint8
        got = NativeBPE.from_spec(compiled).encode_batch(texts)
        assert got.equals(nb.encode_batch(texts)), name
    bad_offsets = dict(compiled, vocab_offsets=compiled["vocab_offsets"][::-1].copy())
    bad_merge = dict(compiled, merges_left=np.full_like(compiled["merges_left"], 2**31))
    short = dict(compiled, vocab_ids=compiled["vocab_ids"][:-1])
    for bad, match in ((bad_offsets, "vocab_offsets"), (bad_merge, "merge 0"), (short, "vocab_offsets")):
        with pytest.raises(ValueError, match=match):
            NativeBPE.from_spec(bad)


def test_bad_merges_are_named_in_merge_order(small_split_json):
    """A compiled model whose merges refer to an id the vocabulary lacks, or join into bytes it lacks: the first
    bad merge (in rank order) is the one named, whichever kind of error it is, and the good model still builds.
    (The constructor hashes every merge before looking any up; the order of the errors must not follow that.)"""
    from mlmix.bpe import compile_spec, spec_of

    spec = compile_spec(spec_of(small_split_json))
    NativeBPE.from_spec(spec)
    raw, off, ids = spec["vocab_bytes"].tobytes(), spec["vocab_offsets"], spec["vocab_ids"]
    id_of = {raw[off[i]:off[i + 1]]: int(ids[i]) for i in range(len(ids))}
    bad_join = next((id_of[bytes([a])], id_of[bytes([b])]) for a in range(256) for b in range(256)
                    if bytes([a, b]) not in id_of)
    missing = int(ids.max()) + 100
    for first, second, want in ((bad_join, (missing, 0), "merge 1 .* makes a token that is not"),
                                ((missing, 0), bad_join, "merge 1 refers to an id that is not"),
                                ((0, missing), None, "merge 1 refers to an id that is not")):
        left, right = spec["merges_left"].copy(), spec["merges_right"].copy()
        left[1], right[1] = first
        if second is not None:
            left[3], right[3] = second
        with pytest.raises(ValueError, match=want):
            NativeBPE.from_spec(dict(spec, merges_left=left, merges_right=right))
