"""Loss masks against TRL's: SFTTrainer's own dataset preparation is the reference, on the same conversations.

TRL 1.16 with a ChatML tokenizer (measured here, summarised in docs/tokenize.md "Compared with TRL"):
- ``assistant_only_loss=True`` with a ``{% generation %}`` template: the blocks decide, masks identical.
- ``assistant_only_loss=True`` with Qwen2.5's own template (no blocks): TRL swaps in its Qwen2.5 training
  template, which also trains the header's ``\\n`` and the ``\\n`` after ``<|im_end|>`` of every assistant
  turn; ``train_glue="around_turn"`` reproduces it. A template TRL does not know is refused.
- ``completion_only_loss`` (prompt/completion records): one ``\\n`` more per example, the one after the last
  ``<|im_end|>``; ``train_on="last_assistant", train_glue="after_turn"`` reproduces it.
"""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

import mlmix
from mlmix import chat
from mlmix.config import ConfigError, validate_config
from mlmix.tokenize import Tokenizer
from pipeline_data import PARALLEL, base_config, train_tiny_bpe, write_jsonl

trl = pytest.importorskip("trl")
transformers = pytest.importorskip("transformers")
pytest.importorskip("datasets")

# TRL's SFTConfig sets a deprecated transformers alias itself (not something a user controls)
pytestmark = pytest.mark.filterwarnings("ignore:`gradient_checkpointing` is deprecated:FutureWarning")

PLAIN_CHATML = chat.CHATML_TEMPLATE.replace("{%- generation -%}", "").replace("{%- endgeneration -%}", "")
LLAMA3_SPECIALS = ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]


def _conversations() -> list[list[dict]]:
    """36 chats: a system prompt in every third, 1-3 assistant turns, contents with leading newlines, leading
    and trailing spaces and trailing newlines among them."""
    sents = [s for lang in PARALLEL for s in PARALLEL[lang]]
    convs = []
    for i in range(36):
        conv = [{"role": "system", "content": sents[(5 * i) % len(sents)]}] if i % 3 == 0 else []
        for t in range(1 + i % 3):
            k = 7 * i + 3 * t
            answer = sents[(k + 1) % len(sents)] + " " + sents[(k + 2) % len(sents)]
            if k % 5 == 1:
                answer = "\n" + answer
            elif k % 5 == 3:
                answer = " " + answer + "  "
            elif k % 5 == 4:
                answer += "\n"
            conv += [{"role": "user", "content": sents[k % len(sents)]}, {"role": "assistant", "content": answer}]
        convs.append(conv)
    return convs


CONVS = _conversations()
N_TURNS = sum(m["role"] == "assistant" for c in CONVS for m in c)


@pytest.fixture(scope="module")
def tok_file(tmp_path_factory):
    return train_tiny_bpe(str(tmp_path_factory.mktemp("tok") / "tokenizer.json"))


def _pt(tok_file, template):
    return transformers.PreTrainedTokenizerFast(tokenizer_file=tok_file, chat_template=template,
                                                eos_token="<|im_end|>", pad_token="<|endoftext|>")


@pytest.fixture(scope="module")
def model():
    cfg = transformers.Qwen2Config(vocab_size=1024, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
    return transformers.AutoModelForCausalLM.from_config(cfg)


@pytest.fixture(scope="module")
def llama_pt(tok_file):
    import tokenizers

    backend = tokenizers.Tokenizer.from_file(tok_file)
    backend.add_special_tokens(LLAMA3_SPECIALS)
    return transformers.PreTrainedTokenizerFast(tokenizer_object=backend, chat_template=chat.LLAMA3_TEMPLATE,
                                                bos_token="<|begin_of_text|>", eos_token="<|eot_id|>")


def _trl_masks(model, pt, rows, tmp_path, **config):
    """(input_ids, mask) per row as SFTTrainer prepares them: mask = labels != -100."""
    from datasets import Dataset

    args = trl.SFTConfig(output_dir=str(tmp_path / "trl"), report_to=[], use_cpu=True, **config)
    trainer = trl.SFTTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=pt)
    ds = trainer.train_dataset
    assert len(ds) == len(rows)
    return [(np.asarray(r["input_ids"]), (np.asarray(r["labels"]) != -100).astype(np.uint8)) for r in ds]


def _differences(pt, reference, enc) -> Counter:
    """Tokens whose mask differs, as a Counter of (token, what the text before it ends with: the header's
    "assistant" or "<|im_end|>" or else "other", trained by the reference). Token ids must agree exactly."""
    assert len(reference) == len(enc.tokens)
    out: Counter = Counter()
    for (ids, ref), toks, mask in zip(reference, enc.tokens, enc.loss_mask):
        np.testing.assert_array_equal(ids, toks)
        for j in np.flatnonzero(ref != mask):
            before = pt.decode(ids[:j].tolist())
            after = next((e for e in ("<|im_start|>assistant", "<|im_end|>") if before.endswith(e)), "other")
            out[(pt.decode([int(ids[j])]), after, int(ref[j]))] += 1
    return out


@pytest.mark.parametrize("template", ["mlmix_chatml", "trl_qwen2_5_training"])
def test_assistant_only_loss_with_generation_blocks_is_identical(tok_file, model, tmp_path, template):
    source = chat.CHATML_TEMPLATE if template == "mlmix_chatml" else \
        trl.chat_template_utils.qwen2_5_training_chat_template
    pt = _pt(tok_file, source)
    ref = _trl_masks(model, pt, [{"messages": c} for c in CONVS], tmp_path, assistant_only_loss=True)
    tok = Tokenizer.from_hf(pt)
    for path in ("auto", "jinja"):
        assert _differences(pt, ref, tok.encode_chat(CONVS, template=path)) == Counter()
    # TRL's Qwen2.5 blocks already hold the glue: the option adds nothing to them
    if template == "trl_qwen2_5_training":
        assert _differences(pt, ref, tok.encode_chat(CONVS, train_glue="around_turn")) == Counter()


def test_assistant_only_loss_without_generation_blocks(tok_file, model, tmp_path):
    """Qwen2.5's own template: TRL trains its training template's spans, two newlines more per turn."""
    pt = _pt(tok_file, trl.chat_template_utils.qwen2_5_chat_template)
    ref = _trl_masks(model, pt, [{"messages": c} for c in CONVS], tmp_path, assistant_only_loss=True)
    tok = Tokenizer.from_hf(pt)
    for path in ("auto", "jinja"):  # the fast ChatML renderer (with Qwen's default system prompt) and Jinja
        default = _differences(pt, ref, tok.encode_chat(CONVS, template=path))
        assert default == Counter({("\n", "<|im_end|>", 1): N_TURNS, ("\n", "<|im_start|>assistant", 1): N_TURNS})
        after = _differences(pt, ref, tok.encode_chat(CONVS, template=path, train_glue="after_turn"))
        assert after == Counter({("\n", "<|im_start|>assistant", 1): N_TURNS})
        assert _differences(pt, ref, tok.encode_chat(CONVS, template=path, train_glue="around_turn")) == Counter()


def test_assistant_only_loss_with_llama3s_own_template_is_identical(llama_pt, model, tmp_path):
    """TRL's Llama-3 training template marks content + <|eot_id|>, as mlmix does; there is no glue after it."""
    from pathlib import Path

    source = (Path(trl.__file__).parent / "chat_templates" / "llama3.jinja").read_text(encoding="utf-8")
    pt = transformers.PreTrainedTokenizerFast(tokenizer_object=llama_pt.backend_tokenizer, chat_template=source,
                                              bos_token="<|begin_of_text|>", eos_token="<|eot_id|>",
                                              pad_token="<|endoftext|>")
    ref = _trl_masks(model, pt, [{"messages": c} for c in CONVS], tmp_path, assistant_only_loss=True)
    tok = Tokenizer.from_hf(pt)
    for glue in ("none", "after_turn"):
        assert _differences(pt, ref, tok.encode_chat(CONVS, train_glue=glue)) == Counter()


def test_assistant_only_loss_refuses_a_template_trl_does_not_know(tok_file, model, tmp_path):
    with pytest.raises(ValueError, match="not training-compatible"):
        _trl_masks(model, _pt(tok_file, PLAIN_CHATML), [{"messages": c} for c in CONVS[:2]], tmp_path,
                   assistant_only_loss=True)


@pytest.mark.parametrize("template", ["mlmix_chatml", "qwen2_5"])
def test_completion_only_loss(tok_file, model, tmp_path, template):
    """Prompt/completion records (TRL's default completion_only_loss): one newline more per example."""
    source = chat.CHATML_TEMPLATE if template == "mlmix_chatml" else trl.chat_template_utils.qwen2_5_chat_template
    pt = _pt(tok_file, source)
    ref = _trl_masks(model, pt, [{"prompt": c[:-1], "completion": c[-1:]} for c in CONVS], tmp_path)
    tok = Tokenizer.from_hf(pt)
    for path in ("auto", "jinja"):
        default = _differences(pt, ref, tok.encode_chat(CONVS, template=path, train_on="last_assistant"))
        assert default == Counter({("\n", "<|im_end|>", 1): len(CONVS)})
        glued = tok.encode_chat(CONVS, template=path, train_on="last_assistant", train_glue="after_turn")
        assert _differences(pt, ref, glued) == Counter()
    if template == "mlmix_chatml":  # with assistant_only_loss as well, TRL trains where both masks agree
        both = _trl_masks(model, pt, [{"prompt": c[:-1], "completion": c[-1:]} for c in CONVS], tmp_path,
                          assistant_only_loss=True)
        assert _differences(pt, both, tok.encode_chat(CONVS, train_on="last_assistant")) == Counter()
    # the same records through encode_records (prompt_response shape when the prompt is one user turn)
    records = [{"prompt": c[-2]["content"], "response": c[-1]["content"]} for c in CONVS]
    single = [c[-2:] for c in CONVS]
    for glue in chat.TRAIN_GLUE:
        a = tok.encode_records(records, train_on="last_assistant", train_glue=glue)
        b = tok.encode_chat(single, train_on="last_assistant", train_glue=glue)
        np.testing.assert_array_equal(a.loss_mask.values, b.loss_mask.values)
        (c,) = tok.encode_records_stream(records, train_on="last_assistant", train_glue=glue)
        np.testing.assert_array_equal(c.loss_mask.values, b.loss_mask.values)


@pytest.mark.parametrize("glue", chat.TRAIN_GLUE)
@pytest.mark.parametrize("train_on", ["all_assistant", "last_assistant"])
def test_glue_is_the_same_on_every_path(tok_file, llama_pt, glue, train_on):
    """Fast renderer, Jinja with {% generation %}, Jinja by prefixes and Jinja by located turns agree."""
    from mlmix.tokenize import _JinjaTemplate

    for pt, source, blocks in ((_pt(tok_file, chat.CHATML_TEMPLATE), PLAIN_CHATML, chat.CHATML_TEMPLATE),
                               (llama_pt, chat.LLAMA3_TEMPLATE.replace("{%- generation -%}", "").replace(
                                   "{%- endgeneration -%}", ""), chat.LLAMA3_TEMPLATE)):
        tok = Tokenizer.from_hf(pt)
        fast = tok.encode_chat(CONVS, train_on=train_on, train_glue=glue)
        assert isinstance(tok._template("auto"), chat.FastTemplate)
        located = _JinjaTemplate(source, tok.bos_token, tok.eos_token)
        located._append_only = False  # as for templates that rewrite earlier turns (Qwen3)
        for template in (blocks, source, located):
            t = template if isinstance(template, _JinjaTemplate) else _JinjaTemplate(template, tok.bos_token,
                                                                                     tok.eos_token)
            tokens, mask, ok = tok._encode_jinja(t, [[(m["role"], m["content"]) for m in c] for c in CONVS],
                                                 train_on, glue, "raise", list(range(len(CONVS))), None, CONVS)
            assert ok.all()
            np.testing.assert_array_equal(tokens.values, fast.tokens.values)
            np.testing.assert_array_equal(mask.values, fast.loss_mask.values)
    # Llama-3 has no glue after <|eot_id|>; "around_turn" trains the "\n\n" that ends its header
    llama = Tokenizer.from_hf(llama_pt)
    base = llama.encode_chat(CONVS, train_on=train_on)
    glued = llama.encode_chat(CONVS, train_on=train_on, train_glue=glue)
    extra = glued.loss_mask.values.astype(int) - base.loss_mask.values
    assert extra.min() == 0
    turns = N_TURNS if train_on == "all_assistant" else len(CONVS)
    newlines = "".join(llama.decode([int(t)]) for t in glued.tokens.values[extra == 1])
    assert newlines == ("\n\n" * turns if glue == "around_turn" else "")


def test_bad_train_glue_is_an_error_naming_it(tok_file):
    tok = Tokenizer.from_hf(_pt(tok_file, chat.CHATML_TEMPLATE))
    with pytest.raises(ValueError, match=r"train_glue must be one of .* got 'newline'"):
        tok.encode_chat(CONVS[:1], train_glue="newline")
    with pytest.raises(ValueError, match="train_glue must be one of"):
        next(tok.encode_records_stream([{"prompt": "a", "response": "b"}], train_glue=True))
    with pytest.raises(ConfigError, match="tokenizer.train_glue"):
        validate_config({"output": "o", "sources": [{"path": "a.jsonl"}],
                         "tokenizer": {"name": "qwen", "train_glue": "yes"}})


def test_build_config_trains_the_glue(tmp_path, tok_file):
    """`mlmix build` with tokenizer.train_glue = "after_turn": one more trained token per example, the "\\n"
    after each <|im_end|>."""
    rows = [{"id": f"r{i}", "lang": "en", "prompt": c[-2]["content"], "response": c[-1]["content"]}
            for i, c in enumerate(CONVS)]
    data = write_jsonl(str(tmp_path / "data.jsonl"), rows)
    stats = {}
    for glue in ("none", "after_turn"):
        cfg = base_config(str(tmp_path / glue), tok_file, data, langid={"backend": "none"},
                          dedup={"exact": False, "near": False}, report=False)
        cfg["tokenizer"]["train_glue"] = glue
        stats[glue] = mlmix.build(cfg, quiet=True)["stages"]["tokenize"]
    assert stats["after_turn"]["examples"] == stats["none"]["examples"] == len(rows)
    assert stats["after_turn"]["tokens"] == stats["none"]["tokens"]
    assert stats["after_turn"]["loss_tokens"] == stats["none"]["loss_tokens"] + len(rows)
