"""Record shapes -> conversations, and encode_records against encode_chat on the equivalent conversations."""

from __future__ import annotations

import numpy as np
import pytest

from mlmix import Ragged, chat
from mlmix.formats import Fields, RecordError
from mlmix.tokenize import Tokenizer


@pytest.fixture(scope="session")
def tok(qwen_hf):
    return Tokenizer(qwen_hf, chat_template=chat.CHATML_TEMPLATE, eos_token="<|endoftext|>")


def conv(*turns):
    return [{"role": r, "content": c} for r, c in turns]


# (record, the conversation it means, or the text)
CASES = [
    ({"messages": conv(("user", "Hi"), ("assistant", "Hello")), "lang": "en", "source": "s1"},
     conv(("user", "Hi"), ("assistant", "Hello"))),
    ({"conversations": [{"from": "system", "value": "S"}, {"from": "human", "value": "Kysymys?"},
                        {"from": "gpt", "value": "Vastaus."}], "lang": "fi"},
     conv(("system", "S"), ("user", "Kysymys?"), ("assistant", "Vastaus."))),
    ({"instruction": "Translate to Swahili.", "input": "Good morning", "output": "Habari za asubuhi", "lang": "sw"},
     conv(("user", "Translate to Swahili.\n\nGood morning"), ("assistant", "Habari za asubuhi"))),
    ({"instruction": "Name a colour.", "input": "", "output": "Červená", "system": "Be short."},
     conv(("system", "Be short."), ("user", "Name a colour."), ("assistant", "Červená"))),
    ({"prompt": "2+2?", "response": "4", "source": 7}, conv(("user", "2+2?"), ("assistant", "4"))),
    ({"prompt": "Столица?", "completion": "Москва"}, conv(("user", "Столица?"), ("assistant", "Москва"))),
    ({"text": "Plain pre-training text. 中文。", "lang": "zh"}, "Plain pre-training text. 中文。"),
]


def expected(tok, meaning, train_on="all_assistant"):
    if isinstance(meaning, str):
        ids = tok.encode(meaning).tolist() + [tok.token_to_id("<|endoftext|>")]
        return ids, [1] * len(ids)
    t, m = tok.encode_chat([meaning], train_on=train_on)
    return t[0].tolist(), m[0].tolist()


@pytest.mark.parametrize("train_on", ["all_assistant", "all"])
def test_auto_format_mixed_batch_keeps_order_and_metadata(tok, train_on):
    records = [r for r, _ in CASES]
    enc = tok.encode_records(records, train_on=train_on)
    assert len(enc) == len(records) and enc.index.tolist() == list(range(len(records)))
    for i, (_, meaning) in enumerate(CASES):
        ids, mask = expected(tok, meaning, train_on)
        assert enc.tokens[i].tolist() == ids, i
        assert enc.loss_mask[i].tolist() == mask, i
    assert enc.lang == [r.get("lang") for r in records]
    assert enc.source == [r.get("source") for r in records]
    assert enc.stats.tokens == len(enc.tokens.values)
    assert enc.stats.trained_tokens == int(enc.loss_mask.values.sum())


@pytest.mark.parametrize("fmt", ["messages", "sharegpt", "alpaca", "prompt_response", "text"])
def test_explicit_format(tok, fmt):
    picks = {"messages": 0, "sharegpt": 1, "alpaca": 2, "prompt_response": 4, "text": 6}
    rec, meaning = CASES[picks[fmt]]
    enc = tok.encode_records([rec], format=fmt)
    ids, mask = expected(tok, meaning)
    assert enc.tokens[0].tolist() == ids and enc.loss_mask[0].tolist() == mask
    # a record of another shape is a bad record under an explicit format
    other = CASES[6][0] if fmt != "text" else CASES[0][0]
    with pytest.raises(RecordError, match="record 0"):
        tok.encode_records([other], format=fmt)


def test_field_names_are_configurable(tok):
    rec = {"dialog": [{"speaker": "user", "text": "Ciao"}, {"speaker": "assistant", "text": "Ciao!"}], "language": "it"}
    enc = tok.encode_records([rec], fields={"messages": "dialog", "role": "speaker", "content": "text",
                                            "lang": "language"})
    ids, mask = expected(tok, conv(("user", "Ciao"), ("assistant", "Ciao!")))
    assert enc.tokens[0].tolist() == ids and enc.loss_mask[0].tolist() == mask and enc.lang == ["it"]
    enc = tok.encode_records([{"q": "a", "a": "b"}], format="prompt_response", fields=Fields(prompt="q", response=("a",)))
    assert enc.tokens[0].tolist() == expected(tok, conv(("user", "a"), ("assistant", "b")))[0]
    with pytest.raises(ValueError, match="unknown keys"):
        tok.encode_records([rec], fields={"dialogue": "x"})
    with pytest.raises(ValueError, match="format must be one of"):
        tok.encode_records([rec], format="jsonl")


def test_text_records_without_eos(tok):
    enc = tok.encode_records([{"text": "abc"}], add_eos=False)
    assert enc.tokens[0].tolist() == tok.encode("abc").tolist()


@pytest.mark.parametrize("rec,kind", [
    ({"foo": 1}, "unknown_format"),
    ("just a string", "not_a_dict"),
    ({"text": ""}, "empty_text"),
    ({"text": 12}, "non_string_content"),
    ({"instruction": "x", "output": None}, "non_string_content"),
    ({"conversations": [{"from": "bot", "value": "x"}]}, "unknown_role"),
    ({"messages": []}, "empty_conversation"),
    ({"text": "ok", "lang": 5}, "bad_metadata"),
    ({"text": b"\xc3\x28"}, "invalid_utf8"),
])
def test_bad_records(tok, rec, kind):
    good = {"text": "fine"}
    with pytest.raises(RecordError) as err:
        tok.encode_records([good, rec])
    assert err.value.index == 1 and err.value.kind == kind
    enc = tok.encode_records([good, rec, good], on_error="skip")
    assert enc.index.tolist() == [0, 2] and enc.stats.skipped == {kind: 1}


def test_records_stream_matches_one_call(tok):
    records = [r for r, _ in CASES] * 5 + [{"bad": True}]
    whole = tok.encode_records(records, on_error="skip")
    parts = list(tok.encode_records_stream(iter(records), chunk_size=4, on_error="skip"))
    assert Ragged.concat([p.tokens for p in parts]).equals(whole.tokens)
    assert Ragged.concat([p.loss_mask for p in parts]).equals(whole.loss_mask)
    assert np.concatenate([p.index for p in parts]).tolist() == whole.index.tolist()
    with pytest.raises(RecordError, match=f"record {len(records) - 1}:"):
        list(tok.encode_records_stream(iter(records), chunk_size=4))
