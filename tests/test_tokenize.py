"""Tokenizer loading and text encoding, against HF tokenizers and tiktoken on the same ranks."""

from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mlmix import Ragged, chat
from mlmix.tokenize import Tokenizer

TEXTS = [
    "Hello, world! It's 2024 and we're testing tokenizers.",
    "مرحبا بالعالم",
    "你好，世界！机器学习。",
    "Dobrý den, světe. Tere, maailm! Hei maailma!",
    "שלום עולם",
    "नमस्ते दुनिया",
    "Ciao mondo! ¡Hola mundo! Привет, мир! Habari dunia!",
    "emoji 👨‍👩‍👧‍👦🇫🇮 and combining e\u0301\u0302",
    "",
    "   leading and trailing   \n\n\t",
    "<|im_start|>special tokens in text<|im_end|>",
    "code:\n    def f(x):\n        return x ** 2\n",
    "1234567890 3.14159 1e-9",
]


@pytest.fixture(scope="session")
def qwen(qwen_hf):
    return Tokenizer(qwen_hf)


@pytest.fixture(scope="session")
def tiny_hf():
    """A small byte-level BPE trained here, with ChatML's special tokens (fast to save and load)."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers

    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=["<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(TEXTS * 3, trainer=trainer)
    return tok


def hf_reference(hf, texts):
    return [hf.encode(t, add_special_tokens=False).ids for t in texts]


@pytest.fixture(scope="session")
def tiktoken_qwen():
    import tiktoken

    from mlmix._tiktoken import qwen_spec

    path, pattern, specials = qwen_spec("qwen")
    from tiktoken.load import load_tiktoken_bpe

    return tiktoken.Encoding("qwen", pat_str=pattern, mergeable_ranks=load_tiktoken_bpe(path),
                             special_tokens=specials)


def test_encode_batch_matches_hf_and_tiktoken(qwen, qwen_hf, tiktoken_qwen):
    r = qwen.encode_batch(TEXTS)
    assert isinstance(r, Ragged) and r.values.dtype == np.uint32 and r.offsets.dtype == np.int64
    assert r.to_lists() == hf_reference(qwen_hf, TEXTS)
    assert r.to_lists() == [tiktoken_qwen.encode(t, allowed_special="all") for t in TEXTS]


@pytest.mark.parametrize("impl", ["hf", "native"])
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(texts=st.lists(st.text(max_size=40), max_size=8))
def test_encode_batch_property(impl, texts, qwen_hf, tiktoken_qwen):
    texts = [t for t in texts if not any(0xD800 <= ord(c) <= 0xDFFF for c in t)]
    tok = Tokenizer(qwen_hf, impl=impl)
    assert tok.impl == impl
    r = tok.encode_batch(texts)
    assert len(r) == len(texts)
    assert r.to_lists() == hf_reference(qwen_hf, texts)
    assert r.to_lists() == [tiktoken_qwen.encode(t, allowed_special="all") for t in texts]


def test_impl_choice(qwen_hf):
    assert Tokenizer(qwen_hf).impl == "native"
    assert Tokenizer(qwen_hf, impl="hf").impl == "hf"
    with pytest.raises(ValueError, match="impl must be 'auto', 'native' or 'hf', got 'fast'"):
        Tokenizer(qwen_hf, impl="fast")
    import tokenizers

    wordpiece = tokenizers.Tokenizer(tokenizers.models.WordPiece({"[UNK]": 0, "a": 1}, unk_token="[UNK]"))
    auto = Tokenizer(wordpiece)
    assert auto.impl == "hf" and "unsupported" in auto.impl_reason
    with pytest.raises(ValueError, match="impl='native' cannot encode this tokenizer"):
        Tokenizer(wordpiece, impl="native")


def test_qwen36(qwen36_hf):
    import tiktoken
    from tiktoken.load import load_tiktoken_bpe

    from mlmix._tiktoken import qwen_spec

    path, pattern, specials = qwen_spec("qwen3_6")
    tt = tiktoken.Encoding("qwen3_6", pat_str=pattern, mergeable_ranks=load_tiktoken_bpe(path),
                           special_tokens=specials)
    tok = Tokenizer(qwen36_hf, chat_template=chat.CHATML_TEMPLATE)
    assert tok.vocab_size == qwen36_hf.get_vocab_size() == 248044 + 33
    assert tok.encode_batch(TEXTS).to_lists() == hf_reference(qwen36_hf, TEXTS)
    assert tok.encode_batch(TEXTS).to_lists() == [tt.encode(t, allowed_special="all") for t in TEXTS]
    assert isinstance(tok._template("auto"), chat.ChatML)


def test_qwen_convenience(qwen_hf):
    tok = Tokenizer.qwen("qwen")
    assert tok.chat_template == chat.CHATML_TEMPLATE and tok.eos_token == "<|endoftext|>"
    assert tok.encode_batch(TEXTS).to_lists() == hf_reference(qwen_hf, TEXTS)


def test_encode_batch_bad_input(qwen):
    with pytest.raises(TypeError, match="single str"):
        qwen.encode_batch("abc")
    with pytest.raises(ValueError, match=r"texts\[1\] must be a str, got int"):
        qwen.encode_batch(["a", 5])
    with pytest.raises(ValueError, match=r"texts\[2\] is not valid Unicode"):
        qwen.encode_batch(["a", "b", "x\udc80y"])
    empty = qwen.encode_batch([])
    assert len(empty) == 0 and empty.values.dtype == np.uint32


def test_encode_stream_equals_batch(qwen):
    texts = TEXTS * 7
    parts = list(qwen.encode_stream(iter(texts), chunk_size=10))
    assert [len(p) for p in parts] == [10] * 9 + [1]
    assert Ragged.concat(parts).equals(qwen.encode_batch(texts))
    assert list(qwen.encode_stream(iter([]), chunk_size=3)) == []
    with pytest.raises(ValueError, match="chunk_size must be a positive int"):
        list(qwen.encode_stream(texts, chunk_size=0))


def test_from_file_reads_template_beside_it(tmp_path, tiny_hf):
    tiny_hf.save(str(tmp_path / "tokenizer.json"))
    plain = Tokenizer.from_file(tmp_path / "tokenizer.json")
    assert plain.chat_template is None
    assert plain.encode_batch(TEXTS).to_lists() == hf_reference(tiny_hf, TEXTS)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(
        {"chat_template": chat.CHATML_TEMPLATE, "eos_token": "<|im_end|>", "bos_token": None}))
    tok = Tokenizer.from_file(tmp_path / "tokenizer.json")
    assert tok.chat_template == chat.CHATML_TEMPLATE and tok.eos_token == "<|im_end|>"
    with pytest.raises(FileNotFoundError, match="does not exist"):
        Tokenizer.from_file(tmp_path / "missing.json")


def test_from_pretrained_local_dir(tmp_path, tiny_hf):
    from transformers import PreTrainedTokenizerFast

    pt = PreTrainedTokenizerFast(tokenizer_object=tiny_hf, chat_template=chat.CHATML_TEMPLATE,
                                 eos_token="<|im_end|>")
    pt.save_pretrained(str(tmp_path))
    tok = Tokenizer.from_pretrained(tmp_path)
    assert tok.chat_template == chat.CHATML_TEMPLATE and tok.eos_token == "<|im_end|>"
    assert tok.encode_batch(TEXTS).to_lists() == hf_reference(tiny_hf, TEXTS)
    conv = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
    ref = pt.apply_chat_template(conv, tokenize=True, return_dict=True)["input_ids"]
    assert tok.encode_chat([conv]).tokens[0].tolist() == list(ref)
    with pytest.raises(FileNotFoundError, match="not a directory"):
        Tokenizer.from_pretrained(tmp_path / "nope")


def test_from_hf_objects(tiny_hf):
    from transformers import PreTrainedTokenizerFast

    pt = PreTrainedTokenizerFast(tokenizer_object=tiny_hf, chat_template=chat.CHATML_TEMPLATE)
    a, b = Tokenizer.from_hf(pt), Tokenizer.from_hf(tiny_hf)
    assert a.chat_template == chat.CHATML_TEMPLATE and b.chat_template is None
    assert a.encode_batch(TEXTS).equals(b.encode_batch(TEXTS))
    with pytest.raises(TypeError, match="tokenizers.Tokenizer or a fast transformers tokenizer"):
        Tokenizer.from_hf(object())
    with pytest.raises(TypeError, match="backend must be a tokenizers.Tokenizer"):
        Tokenizer("not a tokenizer")


def test_from_tiktoken(qwen_hf):
    from mlmix._tiktoken import qwen_spec

    path, pattern, specials = qwen_spec("qwen")
    tok = Tokenizer.from_tiktoken(path, pattern, specials)
    assert tok.encode_batch(TEXTS).to_lists() == hf_reference(qwen_hf, TEXTS)
    with pytest.raises(ValueError, match="pattern must be"):
        Tokenizer.from_tiktoken(path, "", specials)
    with pytest.raises(FileNotFoundError):
        Tokenizer.from_tiktoken(path + ".missing", pattern, specials)


def test_qwen_bad_model():
    with pytest.raises(ValueError, match="model must be one of"):
        Tokenizer.qwen("llama")


def test_decode_round_trip(qwen):
    r = qwen.encode_batch(TEXTS)
    assert [qwen.decode(s) for s in r] == TEXTS


def test_pipelined_encoding_keeps_order_and_error_index(qwen, qwen_hf, monkeypatch):
    import mlmix.tokenize as mt

    monkeypatch.setattr(mt, "_PIPELINE_CHUNK", 3)
    texts = TEXTS * 2 + ["tail"]  # 27 texts: 9 chunks, the last one short
    assert qwen.encode_batch(texts).to_lists() == hf_reference(qwen_hf, texts)
    bad = texts[:10] + [None] + texts[10:]
    with pytest.raises(ValueError, match=r"texts\[10\] must be a str"):
        qwen.encode_batch(bad)


def test_pickle_round_trip(qwen_hf):
    import pickle

    tok = Tokenizer(qwen_hf, chat_template=chat.CHATML_TEMPLATE, eos_token="<|endoftext|>")
    conv = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
    before = tok.encode_chat([conv])
    back = pickle.loads(pickle.dumps(tok))
    after = back.encode_chat([conv])
    assert back.eos_token == "<|endoftext|>" and back.chat_template == chat.CHATML_TEMPLATE
    assert after.tokens.equals(before.tokens) and after.loss_mask.equals(before.loss_mask)


def test_decode_rejects_ids_outside_the_vocabulary(qwen_hf):
    tok = Tokenizer(qwen_hf, impl="hf")
    assert tok.decode(tok.encode("héllo")) == "héllo"
    with pytest.raises(ValueError, match=r"ids holds 1000000000, outside the vocabulary \[0, 151851\)"):
        tok.decode([1, 10**9])
    with pytest.raises(ValueError, match="outside the vocabulary"):
        tok.decode([-1])
    with pytest.raises(TypeError, match="ids must be integers"):
        tok.decode([1.5])


def test_tokenizer_repr_says_what_it_is(qwen, qwen_hf):
    tok = Tokenizer(qwen_hf, chat_template=chat.CHATML_TEMPLATE, eos_token="<|endoftext|>")
    assert repr(tok) == (f"Tokenizer(vocab_size={tok.vocab_size:,}, impl={tok.impl!r}, chat_template=ChatML, "
                         "bos_token=None, eos_token='<|endoftext|>')")
    assert "chat_template=none" in repr(qwen)


def test_native_encoder_kept_on_disk_gives_the_same_ids(tmp_path, monkeypatch, qwen_hf):
    """A tokenizer file's parsed native spec is kept in the mlmix cache (keyed by the file's path, size and
    mtime): a later process builds the encoder from it, with the same ids; a damaged entry is parsed again."""
    from mlmix import tokenize as mt

    monkeypatch.setenv("MLMIX_CACHE", str(tmp_path / "cache"))
    qwen_hf.save(str(tmp_path / "tokenizer.json"))
    texts = ["Hello world, привет мир 你好 🌍", "  spaces\n\nand <|im_end|> specials", "12345 numbers"]
    want = [list(e.ids) for e in qwen_hf.encode_batch(texts, add_special_tokens=False)]

    def fresh_ids():
        mt._NATIVE_CACHE.clear()  # as a new process would start
        tok = mt.Tokenizer.from_file(tmp_path / "tokenizer.json")
        assert tok.impl == "native"
        return tok.encode_batch(texts).to_lists()

    assert fresh_ids() == want  # parsed, and kept
    (kept,) = (tmp_path / "cache" / "native").iterdir()
    assert fresh_ids() == want  # from the kept spec
    kept.write_bytes(b"\x80\x05damaged")
    assert fresh_ids() == want  # parsed again
    assert kept.read_bytes() != b"\x80\x05damaged"  # and kept again
    import pickle

    version, spec, facts = pickle.loads(kept.read_bytes())
    assert spec["vocab_bytes"].dtype == np.uint8  # kept compiled (bpe.compile_spec)
    spec["vocab_offsets"] = spec["vocab_offsets"][::-1].copy()
    kept.write_bytes(pickle.dumps((version, spec, facts)))
    assert fresh_ids() == want  # a kept spec that does not build is parsed again
