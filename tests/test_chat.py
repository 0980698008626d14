"""Chat encoding: the fast templates against transformers' own Jinja rendering, and exact loss masks."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mlmix import chat
from mlmix.formats import RecordError
from mlmix.tokenize import Tokenizer

LLAMA3_SPECIALS = ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]

# a sentence per study language, plus scripts and code points that stress tokenisation boundaries
SAMPLES = {
    "ar": "مرحبا بك في عالم التعلم الآلي، كيف يمكنني مساعدتك اليوم؟",
    "zh": "机器学习正在改变我们处理语言的方式。你今天想学什么？",
    "cs": "Příliš žluťoučký kůň úpěl ďábelské ódy.",
    "en": "The quick brown fox jumps over the lazy dog, doesn't it?",
    "et": "Põdral on õues jäätunud õunad ja kõik näevad seda.",
    "fi": "Hyvää huomenta! Käytämme tekoälyä kääntämiseen.",
    "he": "שלום עולם, זהו מבחן של טקסט מימין לשמאל.",
    "hi": "नमस्ते, आप कैसे हैं? मशीन लर्निंग बहुत रोचक है।",
    "it": "Perché l'intelligenza artificiale è così importante oggi?",
    "ru": "Съешь же ещё этих мягких французских булок да выпей чаю.",
    "es": "¿Dónde está la biblioteca? ¡Mañana iré allí con el niño!",
    "sw": "Habari ya asubuhi! Ninajifunza lugha ya Kiswahili leo.",
    "emoji": "Family: 👨‍👩‍👧‍👦, flags 🇫🇮🇪🇪, skin 👋🏽 and 🤖!",
    "combining": "e\u0301 n\u0303 a\u0308\u0304 Z\u0335\u0321a\u0336l\u0337g\u0338o and Devanagari क्षि",
    "rtl_mixed": "Hello \u202bשלום עולם\u202c and العربية 123 mixed",
}


def _copy_with(hf, specials):
    import tokenizers

    tok = tokenizers.Tokenizer.from_str(hf.to_str())
    tok.add_special_tokens(specials)
    return tok


@pytest.fixture(scope="session")
def qwen_pt(qwen_hf):
    """Qwen's BPE as a transformers tokenizer carrying the ChatML template (the reference renderer)."""
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(tokenizer_object=qwen_hf, chat_template=chat.CHATML_TEMPLATE,
                                   eos_token="<|im_end|>")


@pytest.fixture(scope="session")
def llama_pt(qwen_hf):
    """A Llama-3-like tokenizer (Qwen ranks + Llama-3's special tokens) with the Llama-3 template."""
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(tokenizer_object=_copy_with(qwen_hf, LLAMA3_SPECIALS),
                                   chat_template=chat.LLAMA3_TEMPLATE, bos_token="<|begin_of_text|>",
                                   eos_token="<|eot_id|>")


@pytest.fixture(scope="session")
def qwen_tok(qwen_pt):
    return Tokenizer.from_hf(qwen_pt)


@pytest.fixture(scope="session")
def llama_tok(llama_pt):
    return Tokenizer.from_hf(llama_pt)


def reference(pt, conv, train_on="all_assistant", template=None):
    """transformers' apply_chat_template with {% generation %} masks: the ground truth."""
    out = pt.apply_chat_template(conv, tokenize=True, return_dict=True, return_assistant_tokens_mask=True,
                                 chat_template=template)
    ids = list(out["input_ids"])
    mask = np.asarray(out["assistant_masks"], np.uint8)
    if train_on == "all":
        mask[:] = 1
    elif train_on == "last_assistant":  # keep only the last run of ones
        ones = np.flatnonzero(mask)
        if len(ones):
            start = ones[-1]
            while start > 0 and mask[start - 1]:
                start -= 1
            mask[:start] = 0
    return ids, mask.tolist()


def conversations():
    texts = list(SAMPLES.values())
    convs = []
    for i, text in enumerate(texts):
        other = texts[(i + 5) % len(texts)]
        convs.append([{"role": "user", "content": other}, {"role": "assistant", "content": text}])
        convs.append([
            {"role": "system", "content": "You answer in the user's language."},
            {"role": "user", "content": text},
            {"role": "assistant", "content": other + "\n"},
            {"role": "user", "content": " " + text},
            {"role": "assistant", "content": "\n\n" + text + " "},
        ])
    # boundary cases: empty, whitespace-only, leading newlines, special-token text inside content
    convs.append([{"role": "user", "content": ""}, {"role": "assistant", "content": ""}])
    convs.append([{"role": "user", "content": "\n"}, {"role": "assistant", "content": " \n "}])
    convs.append([{"role": "user", "content": "a"}, {"role": "assistant", "content": "\r\nb"}])
    convs.append([{"role": "user", "content": "x<|im_end|>y"}, {"role": "assistant", "content": "z<|eot_id|>w"}])
    convs.append([{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}, {"role": "user", "content": "tail"}])
    return convs


@pytest.mark.parametrize("which", ["qwen", "llama"])
def test_auto_picks_fast_template(which, qwen_tok, llama_tok):
    tok = qwen_tok if which == "qwen" else llama_tok
    t = tok._template("auto")
    assert isinstance(t, chat.ChatML if which == "qwen" else chat.Llama3)


@pytest.mark.parametrize("which", ["qwen", "llama"])
@pytest.mark.parametrize("train_on", ["all_assistant", "last_assistant", "all"])
def test_fast_path_matches_jinja_reference(which, train_on, request):
    pt = request.getfixturevalue(f"{which}_pt")
    tok = request.getfixturevalue(f"{which}_tok")
    convs = conversations()
    tokens, mask = tok.encode_chat(convs, train_on=train_on)
    assert tokens.dtype == np.uint32 and mask.dtype == np.uint8
    assert len(tokens) == len(convs)
    for i, conv in enumerate(convs):
        ids, ref_mask = reference(pt, conv, train_on)
        assert tokens[i].tolist() == ids, i
        assert mask[i].tolist() == ref_mask, i
    # the generic Jinja path agrees too
    jt, jm = tok.encode_chat(convs, template="jinja", train_on=train_on)
    assert jt.equals(tokens) and jm.equals(mask)


@pytest.mark.parametrize("which", ["qwen", "llama"])
def test_masked_spans_decode_to_assistant_texts(which, request):
    tok = request.getfixturevalue(f"{which}_tok")
    eot = "<|im_end|>" if which == "qwen" else "<|eot_id|>"
    convs = conversations()
    tokens, mask = tok.encode_chat(convs)
    for i, conv in enumerate(convs):
        m = mask[i].astype(bool)
        # contiguous trained runs, one per assistant turn
        edges = np.flatnonzero(np.diff(np.concatenate([[0], m.astype(np.int8), [0]])))
        runs = [tok.decode(tokens[i][a:b]) for a, b in zip(edges[::2], edges[1::2])]
        wanted = []
        for msg in conv:
            if msg["role"] == "assistant":
                content = msg["content"] if which == "qwen" else msg["content"].strip()
                wanted.append(content + eot)
        # a turn whose content begins with whitespace + newline shares a token with the ChatML header
        # ("\n" + "\n" -> "\n\n"): that token is trained, so the run decodes with the header's newline in front
        got = [r[1:] if which == "qwen" and w[:1].isspace() and r == "\n" + w else r
               for r, w in zip(runs, wanted)]
        assert got == wanted, i


@pytest.mark.parametrize("lang", sorted(SAMPLES))
def test_every_language_round_trips(lang, qwen_tok, llama_tok):
    text = SAMPLES[lang]
    for tok, eot in ((qwen_tok, "<|im_end|>"), (llama_tok, "<|eot_id|>")):
        conv = [{"role": "user", "content": "Translate."}, {"role": "assistant", "content": text}]
        tokens, mask = tok.encode_chat([conv])
        assert tok.decode(tokens[0][mask[0] == 1]) == text + eot
        assert tok.decode(tokens[0]) == tok.render_chat(conv)


_piece = st.sampled_from(list("ab \n\t\r.é🙂ש中\u0301") + ["<|im_end|>", "<|eot_id|>", "  ", "\n\n", "'s"])
_text = st.lists(_piece, max_size=12).map("".join)
_conv = st.lists(st.tuples(st.sampled_from(["system", "user", "assistant"]), _text), min_size=1, max_size=5).filter(
    lambda c: any(r == "assistant" for r, _ in c))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(convs=st.lists(_conv, min_size=1, max_size=4))
def test_fast_path_property(convs, qwen_pt, qwen_tok, llama_pt, llama_tok):
    convs = [[{"role": r, "content": c} for r, c in conv] for conv in convs]
    for pt, tok in ((qwen_pt, qwen_tok), (llama_pt, llama_tok)):
        tokens, mask = tok.encode_chat(convs)
        for i, conv in enumerate(convs):
            ids, ref_mask = reference(pt, conv)
            assert tokens[i].tolist() == ids
            assert mask[i].tolist() == ref_mask


def test_template_without_generation_tags_uses_prefix_spans(qwen_hf, qwen_tok):
    plain = chat.CHATML_TEMPLATE.replace("{%- generation -%}", "").replace("{%- endgeneration -%}", "")
    tok = Tokenizer(qwen_hf, chat_template=plain)
    assert isinstance(tok._template("auto"), chat.ChatML)  # proven equal on the probes
    convs = conversations()
    for train_on in ("all_assistant", "last_assistant"):
        jt, jm = tok.encode_chat(convs, template="jinja", train_on=train_on)
        ft, fm = qwen_tok.encode_chat(convs, train_on=train_on)
        assert jt.equals(ft) and jm.equals(fm)


def test_default_system_prompt_is_detected(qwen_hf):
    from transformers import PreTrainedTokenizerFast

    template = ("{%- if messages[0]['role'] != 'system' -%}{{- '<|im_start|>system\\nYou are a helpful assistant."
                "<|im_end|>\\n' -}}{%- endif -%}" + chat.CHATML_TEMPLATE)
    tok = Tokenizer(qwen_hf, chat_template=template)
    t = tok._template("auto")
    assert isinstance(t, chat.ChatML) and t.default_system == "You are a helpful assistant."
    pt = PreTrainedTokenizerFast(tokenizer_object=qwen_hf, chat_template=template)
    convs = conversations()
    tokens, mask = tok.encode_chat(convs)
    for i, conv in enumerate(convs):
        ids, ref_mask = reference(pt, conv)
        assert tokens[i].tolist() == ids and mask[i].tolist() == ref_mask


def test_template_with_other_generation_span_stays_on_jinja(qwen_hf, qwen_pt):
    # a TRL-style template that also trains the newline after <|im_end|>: the fast path must not stand in
    template = chat.CHATML_TEMPLATE.replace(
        "{%- generation -%}{{- message['content'] + '<|im_end|>' -}}{%- endgeneration -%}{{- '\\n' -}}",
        "{%- generation -%}{{- message['content'] + '<|im_end|>\\n' -}}{%- endgeneration -%}")
    assert template != chat.CHATML_TEMPLATE
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(qwen_hf, chat_template=template)
    assert not isinstance(tok._template("auto"), chat.FastTemplate)
    pt = PreTrainedTokenizerFast(tokenizer_object=qwen_hf, chat_template=template)
    convs = conversations()[:6]
    tokens, mask = tok.encode_chat(convs)
    for i, conv in enumerate(convs):
        ids, ref_mask = reference(pt, conv)
        assert tokens[i].tolist() == ids and mask[i].tolist() == ref_mask


def test_explicit_templates_and_errors(qwen_hf, qwen_tok):
    bare = Tokenizer(qwen_hf)
    with pytest.raises(ValueError, match="chat template"):
        bare.encode_chat([[{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]])
    conv = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]
    t1, m1 = bare.encode_chat([conv], template="chatml")
    t2, m2 = qwen_tok.encode_chat([conv])
    assert t1.equals(t2) and m1.equals(m2)
    with pytest.raises(ValueError, match="needs the special token"):
        bare.encode_chat([conv], template="llama3")
    with pytest.raises(ValueError, match="template must be"):
        bare.encode_chat([conv], template="vicuna")
    with pytest.raises(ValueError, match="train_on must be one of"):
        qwen_tok.encode_chat([conv], train_on="assistant")
    with pytest.raises(ValueError, match="on_error must be one of"):
        qwen_tok.encode_chat([conv], on_error="ignore")


BAD = [
    ([], "empty_conversation"),
    ([{"role": "robot", "content": "x"}], "unknown_role"),
    ([{"role": "user", "content": 3}, {"role": "assistant", "content": "x"}], "non_string_content"),
    ([{"role": "user", "content": "a\ud800b"}, {"role": "assistant", "content": "x"}], "invalid_utf8"),
    ([{"role": "user", "content": b"\xff\xfe"}, {"role": "assistant", "content": "x"}], "invalid_utf8"),
    ([{"role": "user"}, {"role": "assistant", "content": "x"}], "missing_field"),
    ([{"role": "user", "content": "only a question"}], "no_assistant_turn"),
    ("not a list", "not_a_conversation"),
]


@pytest.mark.parametrize("bad,kind", BAD)
def test_bad_records_raise_with_index_or_skip(bad, kind, qwen_tok):
    good = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    with pytest.raises(RecordError) as err:
        qwen_tok.encode_chat([good, good, bad, good])
    assert err.value.index == 2 and err.value.kind == kind and "record 2" in str(err.value)
    enc = qwen_tok.encode_chat([good, bad, good], on_error="skip")
    assert len(enc) == 2 and enc.index.tolist() == [0, 2]
    assert dict(enc.stats.skipped) == {kind: 1} and enc.stats.records == 3 and enc.stats.encoded == 2
    ref, _ = qwen_tok.encode_chat([good])
    assert enc.tokens[0].tolist() == ref[0].tolist() == enc.tokens[1].tolist()


def test_bytes_content_is_decoded(qwen_tok):
    a = qwen_tok.encode_chat([[{"role": "user", "content": "é".encode()}, {"role": "assistant", "content": "x"}]])
    b = qwen_tok.encode_chat([[{"role": "user", "content": "é"}, {"role": "assistant", "content": "x"}]])
    assert a.tokens.equals(b.tokens)


def _long_conv():
    return [{"role": "system", "content": "sys " * 20}, {"role": "user", "content": "question " * 30},
            {"role": "assistant", "content": "answer " * 10}]


def test_truncation_policies_are_explicit_and_counted(qwen_tok):
    short = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
    convs = [short, _long_conv(), short]
    full, full_mask = qwen_tok.encode_chat(convs)
    n = int(full.lengths[1])
    with pytest.raises(ValueError, match="explicit truncation policy"):
        qwen_tok.encode_chat(convs, max_length=20)
    with pytest.raises(ValueError, match="truncation must be one of"):
        qwen_tok.encode_chat(convs, max_length=20, truncation="left")
    with pytest.raises(ValueError, match="max_length must be a positive int"):
        qwen_tok.encode_chat(convs, max_length=0, truncation="drop")

    L = 40
    dropped = qwen_tok.encode_chat(convs, max_length=L, truncation="drop")
    assert dropped.index.tolist() == [0, 2] and dropped.stats.dropped_too_long == 1
    assert dropped.stats.truncated == 0

    left = qwen_tok.encode_chat(convs, max_length=L, truncation="truncate_prompt_left")
    assert left.index.tolist() == [0, 1, 2] and left.stats.truncated == 1
    assert left.stats.tokens_removed == n - L
    assert left.tokens[1].tolist() == full[1][n - L:].tolist()
    assert left.loss_mask[1].tolist() == full_mask[1][n - L:].tolist()
    assert int(left.loss_mask[1].sum()) == int(full_mask[1].sum())  # the response is whole

    trained_at = int(np.flatnonzero(full_mask[1])[0])
    R = trained_at + 3  # the prompt fits, the response is cut
    right = qwen_tok.encode_chat(convs, max_length=R, truncation="truncate_response_right")
    assert right.index.tolist() == [0, 1, 2] and right.stats.truncated == 1
    assert right.tokens[1].tolist() == full[1][:R].tolist() and right.stats.tokens_removed == n - R
    assert right.loss_mask[1].tolist() == full_mask[1][:R].tolist()

    # a response longer than max_length cannot be kept by cutting the prompt: dropped and counted
    tiny = qwen_tok.encode_chat(convs, max_length=5, truncation="truncate_prompt_left")
    assert tiny.index.tolist() == [0, 2] and tiny.stats.dropped_too_long == 1
    # nothing of the response would remain after cutting the end: dropped and counted
    rt = qwen_tok.encode_chat(convs, max_length=trained_at, truncation="truncate_response_right")
    assert rt.index.tolist() == [0, 2] and rt.stats.dropped_too_long == 1
    for enc, limit in ((dropped, L), (left, L), (right, R), (tiny, 5), (rt, trained_at)):
        assert int(enc.tokens.lengths.max()) <= limit
        assert enc.tokens.offsets.tolist() == enc.loss_mask.offsets.tolist()
        assert enc.stats.tokens == len(enc.tokens.values)


def test_llama3_needs_its_bos_token(qwen_hf):
    tok = Tokenizer(_copy_with(qwen_hf, LLAMA3_SPECIALS[1:]))  # no <|begin_of_text|>
    conv = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]
    with pytest.raises(ValueError, match="begin_of_text"):
        tok.encode_chat([conv], template="llama3")
    t, m = tok.encode_chat([conv], template=chat.Llama3(bos_token=""))
    assert tok.decode(t[0]) == chat.Llama3(bos_token="").render([("user", "a"), ("assistant", "b")])
    assert tok.decode(t[0][m[0] == 1]) == "b<|eot_id|>"


@pytest.mark.parametrize("name,fast", [("qwen2_5", chat.ChatML), ("qwen2_5_training", None),
                                       ("llama3", chat.Llama3), ("llama3_training", chat.Llama3)])
def test_real_model_templates(name, fast, qwen_pt, llama_pt):
    """Published templates (as bundled with TRL): the fast path stands in exactly where it renders the same."""
    import os

    trl = pytest.importorskip("trl")
    with open(os.path.join(os.path.dirname(trl.__file__), "chat_templates", f"{name}.jinja")) as f:
        template = f.read()
    is_llama = name.startswith("llama")
    pt = llama_pt if is_llama else qwen_pt
    bos = "<|begin_of_text|>" if is_llama else None
    tok = Tokenizer(pt.backend_tokenizer, chat_template=template, bos_token=bos)
    t = tok._template("auto")
    assert isinstance(t, fast) if fast else not isinstance(t, chat.FastTemplate)
    convs = conversations()
    tokens, mask = tok.encode_chat(convs)
    jt, jm = tok.encode_chat(convs, template="jinja")
    assert jt.equals(tokens) and jm.equals(mask)
    eot = "<|eot_id|>" if is_llama else "<|im_end|>"
    for i, conv in enumerate(convs):
        if "training" in name:
            ids, ref_mask = reference(pt, conv, template=template)
            assert mask[i].tolist() == ref_mask
        else:
            out = pt.apply_chat_template(conv, tokenize=True, return_dict=True, chat_template=template)
            ids = list(out["input_ids"])
            last = [m["content"] for m in conv if m["role"] == "assistant"][-1]
            last = last.strip() if is_llama else last
            masked = tok.decode(tokens[i][mask[i] == 1])
            assert masked.endswith(last + eot)
        assert tokens[i].tolist() == ids


def _truncate_reference(seq, mask, limit, policy):
    """One sequence, plainly: the kept (tokens, mask), or None when the policy drops it."""
    n = len(seq)
    if n <= limit:
        return seq, mask
    if policy == "drop":
        return None
    if policy == "truncate_response_right":
        return (seq[:limit], mask[:limit]) if (any(mask[:limit]) or not any(mask)) else None
    cut = n - limit
    if any(mask) and not all(mask):
        last = max(i for i, m in enumerate(mask) if m)
        start = last
        while start > 0 and mask[start - 1]:
            start -= 1
        if cut > start:
            return None
    return seq[cut:], mask[cut:]


@settings(max_examples=80, deadline=None)
@given(seqs=st.lists(st.lists(st.tuples(st.integers(0, 9), st.booleans()), max_size=12), max_size=6),
       limit=st.integers(1, 10), policy=st.sampled_from(["drop", "truncate_prompt_left", "truncate_response_right"]))
def test_truncation_property(seqs, limit, policy):
    from mlmix import Ragged
    from mlmix.tokenize import EncodeStats, _truncate

    tokens = Ragged.from_lists([[t for t, _ in s] for s in seqs], dtype=np.uint32)
    mask = Ragged.from_lists([[int(m) for _, m in s] for s in seqs], dtype=np.uint8)
    stats = EncodeStats()
    out_t, out_m, keep = _truncate(tokens, mask, limit, policy, stats)
    want = [_truncate_reference([t for t, _ in s], [int(m) for _, m in s], limit, policy) for s in seqs]
    assert keep.tolist() == [w is not None for w in want]
    kept = [w for w in want if w is not None]
    assert out_t.to_lists() == [w[0] for w in kept] and out_m.to_lists() == [w[1] for w in kept]
    assert stats.dropped_too_long == sum(w is None for w in want)
    assert stats.truncated == sum(1 for s, w in zip(seqs, want) if w is not None and len(w[0]) < len(s))
    assert stats.tokens_removed == sum(len(s) - len(w[0]) for s, w in zip(seqs, want) if w is not None)


def test_template_that_rewrites_history_is_located(qwen_pt, qwen_tok):
    """Qwen3's published template is not append-only (it adds an empty think block to the last assistant
    turn); without {% generation %} blocks each turn is located in the rendering: content + <|im_end|>."""
    import os

    trl = pytest.importorskip("trl")
    with open(os.path.join(os.path.dirname(trl.__file__), "chat_templates", "qwen3.jinja")) as f:
        template = f.read()
    tok = Tokenizer(qwen_pt.backend_tokenizer, chat_template=template)
    assert not isinstance(tok._template("auto"), chat.FastTemplate)
    # Qwen3's template strips newlines around assistant content; keep the conversations it renders verbatim
    convs = [c for c in conversations() if all(m["content"] == m["content"].strip() for m in c)]
    assert len(convs) >= 15
    for train_on in ("all_assistant", "last_assistant"):
        tokens, mask = tok.encode_chat(convs, train_on=train_on)
        for i, conv in enumerate(convs):
            out = qwen_pt.apply_chat_template(conv, tokenize=True, return_dict=True, chat_template=template)
            assert tokens[i].tolist() == list(out["input_ids"])
            m = mask[i].astype(np.int8)
            edges = np.flatnonzero(np.diff(np.concatenate([[0], m, [0]])))
            runs = [tok.decode(tokens[i][a:b]) for a, b in zip(edges[::2], edges[1::2])]
            wanted = [msg["content"] + "<|im_end|>" for msg in conv if msg["role"] == "assistant"]
            wanted = wanted[-1:] if train_on == "last_assistant" else wanted
            assert runs == wanted
    # a turn whose reasoning the template strips from history cannot be located: reported, not guessed
    think = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "<think>\nr\n</think>\n\na"},
             {"role": "user", "content": "q2"}, {"role": "assistant", "content": "b"}]
    with pytest.raises(RecordError, match="cannot find message 1's content"):
        tok.encode_chat([think])
    enc = tok.encode_chat([think], train_on="last_assistant")
    assert tok.decode(enc.tokens[0][enc.loss_mask[0] == 1]) == "b<|im_end|>"
