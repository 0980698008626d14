"""Tokenizer.encode_block (the C++ block encoder, csrc/chat.h) against encode_records on the same records:
tokens, masks, index, lang, source, stats and errors must be identical."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mlmix import chat
from mlmix.formats import RecordError
from mlmix.recblock import RecordBlock
from mlmix.tokenize import TRAIN_GLUE, TRAIN_ON, TRUNCATION, Tokenizer

LLAMA3_SPECIALS = ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]


@pytest.fixture(scope="module")
def qwen_tok(qwen_hf):
    return Tokenizer(qwen_hf, chat_template=chat.CHATML_TEMPLATE, eos_token="<|endoftext|>")


@pytest.fixture(scope="module")
def qwen36_tok():
    return Tokenizer.qwen("qwen3_6")


@pytest.fixture(scope="module")
def llama_tok(qwen_hf):
    import tokenizers

    hf = tokenizers.Tokenizer.from_str(qwen_hf.to_str())
    hf.add_special_tokens(LLAMA3_SPECIALS)
    return Tokenizer(hf, chat_template=chat.LLAMA3_TEMPLATE, bos_token="<|begin_of_text|>", eos_token="<|eot_id|>")


@pytest.fixture(scope="module")
def nfc_tok(qwen_hf):
    """Qwen's BPE behind an NFC normalizer: texts NFC would change are encoded by HF (the reencode callback),
    and token byte lengths are not trusted for the header straddle (the count_header callback)."""
    import tokenizers

    d = json.loads(qwen_hf.to_str())
    d["normalizer"] = {"type": "NFC"}
    tok = Tokenizer(tokenizers.Tokenizer.from_str(json.dumps(d)), chat_template=chat.CHATML_TEMPLATE,
                    eos_token="<|endoftext|>")
    assert tok.impl == "native" and not tok._facts.bytes_exact
    return tok


def assert_same(a, b):
    assert a.tokens.equals(b.tokens)
    assert a.loss_mask.equals(b.loss_mask)
    assert a.tokens.values.dtype == b.tokens.values.dtype and a.loss_mask.values.dtype == b.loss_mask.values.dtype
    assert np.array_equal(a.index, b.index) and a.index.dtype == b.index.dtype
    assert a.lang == b.lang and a.source == b.source
    assert a.stats == b.stats


def both(tok, block, **kw):
    return tok.encode_block(block, **kw), tok.encode_records(block.to_records(), **kw)


def demo_block(n: int, seed: int = 0) -> RecordBlock:
    """Chat records (multi-turn, some with a system turn, assistant contents that straddle the header) and
    text records built from the bundled demo set."""
    from mlmix.data import demo_records

    recs = demo_records()
    rng = random.Random(seed)
    out = []
    for i in range(n):
        r = rng.choice(recs)
        base = {"id": f"r{i}", "lang": r["lang"] if rng.random() < 0.8 else None, "where": f"demo:{i}"}
        if rng.random() < 0.1:
            out.append({**base, "text": r["response"]})
            continue
        msgs = [{"role": "system", "content": "Answer in the user's language."}] if rng.random() < 0.4 else []
        for _ in range(rng.randint(1, 3)):
            q = rng.choice(recs)
            msgs.append({"role": "user", "content": q["instruction"]})
            msgs.append({"role": "assistant", "content": rng.choice(["", "", "\n", " ", "\n\n", " \n"]) + q["response"]})
        if rng.random() < 0.2:
            msgs.append({"role": "user", "content": "Thanks!"})
        out.append({**base, "messages": msgs})
    return RecordBlock.from_records(out)


@pytest.fixture(scope="module")
def demo():
    return demo_block(600)


@pytest.mark.parametrize("train_on", TRAIN_ON)
@pytest.mark.parametrize("train_glue", TRAIN_GLUE)
@pytest.mark.parametrize("which", ["qwen", "qwen36", "llama"])
def test_demo_block_identical(which, train_on, train_glue, demo, request):
    tok = request.getfixturevalue(f"{which}_tok")
    assert isinstance(tok._template("auto"), chat.Llama3 if which == "llama" else chat.ChatML)
    a, b = both(tok, demo, train_on=train_on, train_glue=train_glue)
    assert_same(a, b)
    assert a.stats.records == len(demo) == a.stats.encoded


@pytest.mark.parametrize("template", ["chatml", "llama3", chat.ChatML("You are a helpful assistant."),
                                      chat.Llama3(bos_token="")])
@pytest.mark.parametrize("add_eos", [True, False])
def test_explicit_templates(template, add_eos, llama_tok, demo):
    for train_on in TRAIN_ON:
        for glue in TRAIN_GLUE:
            a, b = both(llama_tok, demo, template=template, train_on=train_on, train_glue=glue, add_eos=add_eos)
            assert_same(a, b)


def test_default_system_prompt_from_the_model_template(qwen_hf, demo):
    template = ("{%- if messages[0]['role'] != 'system' -%}{{- '<|im_start|>system\\nYou are a helpful assistant."
                "<|im_end|>\\n' -}}{%- endif -%}" + chat.CHATML_TEMPLATE)
    tok = Tokenizer(qwen_hf, chat_template=template, eos_token="<|endoftext|>")
    assert tok._template("auto").default_system == "You are a helpful assistant."
    for train_on in TRAIN_ON:
        assert_same(*both(tok, demo, train_on=train_on, train_glue="around_turn"))


@pytest.mark.parametrize("policy", TRUNCATION)
@pytest.mark.parametrize("max_length", [1, 16, 64, 200])
def test_truncation(policy, max_length, qwen_tok, demo):
    for train_on in TRAIN_ON:
        a, b = both(qwen_tok, demo, train_on=train_on, max_length=max_length, truncation=policy)
        assert_same(a, b)


def test_text_records_with_and_without_eos(qwen_hf):
    block = RecordBlock.from_records([{"id": "a", "lang": "en", "where": "w", "text": "hello world"},
                                      {"id": "b", "lang": None, "where": "w", "text": "<|im_end|> x\n"}])
    for eos in ("<|endoftext|>", None, "<|not_a_token|>"):
        tok = Tokenizer(qwen_hf, eos_token=eos)  # no chat template: a text-only block never needs one
        for add_eos in (True, False):
            a, b = both(tok, block, add_eos=add_eos)
            assert_same(a, b)
    assert a.tokens[0].tolist() == tok.encode("hello world").tolist()


def test_empty_block(qwen_tok):
    a, b = both(qwen_tok, RecordBlock.empty())
    assert_same(a, b)
    assert len(a) == 0


_piece = st.sampled_from(list("ab \n\t\r.é🙂ש中\u0301\u00a0\u2028\x1c") +
                         ["<|im_end|>", "<|eot_id|>", "<|im_start|>", "<|begin_of_text|>", "  ", "\n\n", "'s", "\r\n",
                          "assistant\n", "\u3000", "e\u0301", "\ufeff"])
_text = st.lists(_piece, max_size=10).map("".join)
_turn = st.tuples(st.sampled_from(["system", "user", "assistant"]), _text)
_chat_rec = st.lists(_turn, min_size=1, max_size=5).map(lambda c: {"messages": [{"role": r, "content": t} for r, t in c]})
_text_rec = _text.filter(bool).map(lambda t: {"text": t})
_records = st.lists(st.one_of(_chat_rec, _chat_rec, _text_rec), max_size=8)


def _block(recs, langs=None):
    out = []
    for i, r in enumerate(recs):
        out.append({"id": str(i), "lang": (langs or [None, "en", "fi"])[i % 3], "where": f"h:{i}", **r})
    return RecordBlock.from_records(out)


def _outcome(fn):
    try:
        return "ok", fn()
    except Exception as exc:  # compared by type and message
        return "raised", (type(exc), str(exc))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(recs=_records, train_on=st.sampled_from(TRAIN_ON), glue=st.sampled_from(TRAIN_GLUE),
       add_eos=st.booleans(), trunc=st.sampled_from([None, *TRUNCATION]), max_length=st.integers(1, 40),
       on_error=st.sampled_from(["raise", "skip"]))
def test_property_identical(recs, train_on, glue, add_eos, trunc, max_length, on_error, qwen_tok, llama_tok, nfc_tok):
    block = _block(recs)
    kw = dict(train_on=train_on, train_glue=glue, add_eos=add_eos, on_error=on_error,
              max_length=max_length if trunc else None, truncation=trunc)
    for tok in (qwen_tok, llama_tok, nfc_tok):
        got = _outcome(lambda: tok.encode_block(block, **kw))
        want = _outcome(lambda: tok.encode_records(block.to_records(), **kw))
        assert got[0] == want[0]
        if got[0] == "ok":
            assert_same(got[1], want[1])
        else:
            assert got[1] == want[1]


def test_thread_count_does_not_matter(qwen_tok, monkeypatch):
    block = demo_block(5000, seed=3)  # enough records for several worker threads
    runs = []
    for threads in ("1", "2", "3"):
        monkeypatch.setenv("MLMIX_NUM_THREADS", threads)
        runs.append(qwen_tok.encode_block(block, train_on="last_assistant", train_glue="after_turn"))
    for r in runs[1:]:
        assert_same(r, runs[0])
    assert_same(runs[0], qwen_tok.encode_records(block.to_records(), train_on="last_assistant", train_glue="after_turn"))


GOOD = {"id": "g", "lang": "en", "where": "f.jsonl:1",
        "messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}


@pytest.mark.parametrize("bad, kind", [
    ({"text": ""}, "empty_text"),
    ({"messages": []}, "empty_conversation"),
    ({"messages": [{"role": "user", "content": "q"}]}, "no_assistant_turn"),
    ({"messages": [{"role": "tool", "content": "q"}, {"role": "assistant", "content": "a"}]}, "unknown_role"),
    ({"messages": [{"role": "", "content": "q"}, {"role": "assistant", "content": "a"}]}, "unknown_role"),
])
@pytest.mark.parametrize("train_on", TRAIN_ON)
def test_bad_records_fall_back_with_the_same_errors(bad, kind, train_on, qwen_tok):
    block = RecordBlock.from_records([GOOD, {"id": "b", "lang": None, "where": "f.jsonl:2", **bad}, GOOD])
    if kind == "no_assistant_turn" and train_on == "all":
        assert_same(*both(qwen_tok, block, train_on=train_on))
        return
    with pytest.raises(RecordError) as got:
        qwen_tok.encode_block(block, train_on=train_on)
    with pytest.raises(RecordError) as want:
        qwen_tok.encode_records(block.to_records(), train_on=train_on)
    assert (str(got.value), got.value.kind, got.value.index) == (str(want.value), want.value.kind, want.value.index)
    assert got.value.kind == kind
    assert_same(*both(qwen_tok, block, train_on=train_on, on_error="skip"))


def test_invalid_utf8_falls_back(qwen_tok):
    def same_error(broken):
        with pytest.raises(UnicodeDecodeError) as got:
            qwen_tok.encode_block(broken)
        with pytest.raises(UnicodeDecodeError) as want:
            broken.to_records()
        assert str(got.value) == str(want.value)

    block = RecordBlock.from_records([GOOD, GOOD])
    for col in ("content", "role", "id", "where", "lang"):
        arrays = block.arrays()
        values = arrays[f"{col}_values"].copy()
        values[0] = 0xFF
        arrays[f"{col}_values"] = values
        same_error(RecordBlock(**arrays))
    # a surrogate encoded as UTF-8 does not decode either, nor does any other bad sequence, wherever it is in a
    # text (the ChatML path checks the contents as it reads them, not in a pass of its own)
    for bad in (b"\xed\xa0\x80", b"\xc0\xaf", b"\xe4\xb8", b"\xf4\x90\x80\x80", b"\x80", b"\xd0\xb0\xff"):
        for where in ("start", "end", "middle"):
            arrays = block.arrays()
            text = "h\u00e9 \u4e2d\u6587".encode()
            content = bad + text if where == "start" else text + bad if where == "end" else text[:3] + bad + text[3:]
            values = arrays["content_values"]
            arrays["content_values"] = np.concatenate([np.frombuffer(content, np.uint8), values])
            arrays["content_offsets"] = np.concatenate([[0], arrays["content_offsets"][1:] + len(content)])
            same_error(RecordBlock(**arrays))
    # a turn that no record owns (before turn_offsets[0], or from turn_offsets[n] on) is never encoded, but
    # to_records() decodes it all the same (found by the chat fuzz target)
    for first, last in ((1, 0), (0, 1), (2, 1)):
        arrays = RecordBlock.from_records([GOOD]).arrays()
        n_turns = len(arrays["role_offsets"]) - 1
        arrays["turn_offsets"] = arrays["turn_offsets"] + first
        for col, extra in (("role", b"user"), ("content", b"ok")):
            values, offsets = arrays[f"{col}_values"].tobytes(), arrays[f"{col}_offsets"]
            items = [values[a:b] for a, b in zip(offsets[:-1], offsets[1:])]
            items = [extra] * first + items + [extra] * last
            if col == "content":
                items[0 if first else n_turns + first] = b"<|im_start|>\xff"
            arrays[f"{col}_values"] = np.frombuffer(b"".join(items), np.uint8).copy()
            arrays[f"{col}_offsets"] = np.concatenate([[0], np.cumsum([len(x) for x in items])])
        for template in ("auto", "llama3"):
            broken = RecordBlock(**arrays)
            with pytest.raises(UnicodeDecodeError) as got:
                qwen_tok.encode_block(broken, template=template)
            with pytest.raises(UnicodeDecodeError) as want:
                broken.to_records()
            assert str(got.value) == str(want.value)


def test_other_paths_fall_back(qwen_hf, demo):
    hf = Tokenizer(qwen_hf, chat_template=chat.CHATML_TEMPLATE, impl="hf")
    small = demo.take(range(60))
    assert_same(*both(hf, small, train_glue="after_turn"))
    tok = Tokenizer(qwen_hf, chat_template=chat.CHATML_TEMPLATE)
    assert_same(*both(tok, small, template="jinja", train_on="last_assistant"))
    bare = Tokenizer(qwen_hf)  # no chat template: the same ValueError
    with pytest.raises(ValueError) as got:
        bare.encode_block(small)
    with pytest.raises(ValueError) as want:
        bare.encode_records(small.to_records())
    assert str(got.value) == str(want.value)
    with pytest.raises(TypeError):
        tok.encode_block(small.to_records())
    with pytest.raises(ValueError, match="train_on"):
        tok.encode_block(small, train_on="everything")


def test_header_straddle_from_byte_lengths(qwen_tok, llama_tok):
    """The straddling header's token count from token byte lengths equals the count from HF's offsets."""
    for tok, t in ((qwen_tok, chat.ChatML()), (llama_tok, chat.Llama3())):
        assert tok._facts.bytes_exact
        for glue in TRAIN_GLUE:
            header = t.untrained_header(glue)
            for content in ["\n", "\n\nx", " \n y", "\r\nb", "  ", "\t\n", "<|im_end|>", "\n<|eot_id|>", "é\n", ""]:
                text = header + content
                ids = tok.encode(text)
                assert tok._header_tokens(text, len(header), ids) == tok._header_tokens(text, len(header))


def test_nfc_tokenizer(nfc_tok, qwen_tok):
    recs = [{"messages": [{"role": "user", "content": "e\u0301 Å"}, {"role": "assistant", "content": "\n\ne\u0301"}]},
            {"text": "A\u030a and \u212b"}, {"messages": [{"role": "assistant", "content": "\nplain"}]}]
    block = _block(recs)
    for train_on in TRAIN_ON:
        a, b = both(nfc_tok, block, train_on=train_on)
        assert_same(a, b)
    # NFC changed the first record's tokens
    assert not np.array_equal(a.tokens[0], qwen_tok.encode_block(block).tokens[0])


# --- the HF backend built on first need --------------------------------------------------------------------
def test_hf_backend_is_built_on_first_need(qwen_hf):
    import pickle

    from mlmix.tokenize import forget_native_encoder

    tok = Tokenizer.qwen("qwen")
    assert tok.impl == "native" and tok._hf_backend is None
    block = demo_block(40)
    enc = tok.encode_block(block)
    tok.encode_records(block.to_records())
    tok.encode_chat([[{"role": "user", "content": "a"}, {"role": "assistant", "content": "\n\nb"}]])
    assert tok.vocab_size == qwen_hf.get_vocab_size(with_added_tokens=True)
    assert tok.token_to_id("<|im_end|>") == qwen_hf.token_to_id("<|im_end|>")
    assert tok._hf_backend is None  # none of the above needed it
    lazy = pickle.loads(pickle.dumps(tok))
    assert lazy._hf_backend is None and lazy.impl == "native"
    assert_same(lazy.encode_block(block), enc)
    assert tok.decode(enc.tokens[0]) == qwen_hf.decode(enc.tokens[0].tolist(), skip_special_tokens=False)
    assert tok._hf_backend is not None and tok.token_to_id("hello") == qwen_hf.token_to_id("hello")
    assert pickle.loads(pickle.dumps(tok)).decode([14990]) == "hello"
    forget_native_encoder(tok)


def test_from_file_is_lazy_and_reports_hf_errors(qwen_hf, tmp_path):
    path = tmp_path / "tokenizer.json"
    path.write_text(qwen_hf.to_str())
    tok = Tokenizer.from_file(path, chat_template=chat.CHATML_TEMPLATE)
    assert tok.impl == "native" and tok._hf_backend is None
    block = demo_block(30, seed=5)
    assert_same(tok.encode_block(block), Tokenizer(qwen_hf, chat_template=chat.CHATML_TEMPLATE).encode_block(block))
    bad = tmp_path / "bad" / "tokenizer.json"
    bad.parent.mkdir()
    bad.write_text("{not json")
    import tokenizers

    with pytest.raises(Exception) as want:
        tokenizers.Tokenizer.from_file(str(bad))
    with pytest.raises(Exception) as got:
        Tokenizer.from_file(bad)
    assert type(got.value) is type(want.value) and str(got.value) == str(want.value)


def test_resident_memory_of_the_qwen36_tokenizer():
    """A fresh process holding Tokenizer.qwen('qwen3_6'): the native encoder (~40 MB) and nothing else large
    (it was ~290 MB with the HF backend and the JSON parse's freed heap kept)."""
    import subprocess
    import sys

    code = ("import gc, numpy, tokenizers, mlmix\n"
            "def rss():\n"
            "    return int(next(l for l in open('/proc/self/status') if l.startswith('VmRSS')).split()[1]) // 1024\n"
            "base = rss()\n"
            "t = mlmix.Tokenizer.qwen('qwen3_6'); gc.collect()\n"
            "print(rss() - base, t.impl)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    if out[1] != "native":
        pytest.skip("no native encoder")
    assert int(out[0]) < 100, f"Tokenizer.qwen('qwen3_6') added {out[0]} MB of RSS"


@settings(max_examples=300, deadline=None)
@given(items=st.lists(st.one_of(st.binary(max_size=12), st.text(max_size=6).map(lambda t: t.encode("utf-8", "surrogatepass")),
                                st.sampled_from([b"\xed\xa0\x80", b"\xed\x9f\xbf", b"\xf4\x90\x80\x80", b"\xf4\x8f\xbf\xbf",
                                                 b"\xe0\x80\xaf", b"\xe0\xa0\x80", b"\xc0\xaf", b"\xc2\x80", b"\xf0\x8f\xbf\xbf",
                                                 b"\xf0\x90\x80\x80", b"abcdefgh\xc3", b"\xe2\x82"])), max_size=6))
def test_utf8_check_agrees_with_python(items):
    """The C++ UTF-8 check (which decides the fallback) accepts exactly what Python's strict decoder does."""
    from mlmix._core_loader import core

    values = np.frombuffer(b"".join(items), np.uint8).copy()
    offsets = np.zeros(len(items) + 1, np.int64)
    np.cumsum([len(x) for x in items], out=offsets[1:])
    want = -1
    for i, x in enumerate(items):
        try:
            x.decode("utf-8")
        except UnicodeDecodeError:
            want = i
            break
    assert core._chat_first_invalid_utf8(values, offsets) == want
