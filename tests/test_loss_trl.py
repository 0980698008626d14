"""patch_causal_lm in TRL's SFTTrainer and the HF Trainer, with default model configs and trainer defaults.

TRL (>= 1.16) computes SFT's loss and its entropy / mean-token-accuracy metrics through its own fused LM head
(``model(..., fused_lm_head=True)``, installed by ``add_fused_lm_head`` when the trainer is built). A model patched by
mlmix before or after the trainer is built must give what TRL's head gives on the same model and batch (loss,
per-token log-probabilities, entropy, top-1 hits, gradients), with mlmix and not TRL's kernel doing the work, and
must still return logits wherever the caller needs them (evaluate / predict, compute_metrics, generate).

Models come from ``from_config`` as users build them (``use_cache`` left at True); trainer options are the
defaults except the ones users must set (output directory, step count, no reporting, ``use_cpu`` on a machine
without a GPU, as the Trainer's own error asks) and per-step logging to compare the metrics.
"""

from __future__ import annotations

import copy
import random

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
datasets = pytest.importorskip("datasets")
trl = pytest.importorskip("trl")
tokenizers = pytest.importorskip("tokenizers")
trl_utils = pytest.importorskip("trl.trainer.utils")
if not hasattr(trl_utils, "add_fused_lm_head"):
    pytest.skip("TRL without add_fused_lm_head (< 1.16)", allow_module_level=True)

import mlmix.torch.loss as loss_mod  # noqa: E402
from mlmix.torch import patch_causal_lm  # noqa: E402

# TRL's SFTConfig sets a deprecated transformers alias itself (not something a user controls)
pytestmark = pytest.mark.filterwarnings("ignore:`gradient_checkpointing` is deprecated:FutureWarning")

WORDS = ("the a cat dog sat ran on under mat log red blue big small quick slow fox jumps over lazy what is where "
         "who how why yes no one two three four five").split()
ALL_OUTPUTS = ("log_probs", "entropy", "is_top1", "log_sum_sq_probs", "mean_logits")


# ---------------------------------------------------------------------------------------------------------------
# a word-level chat tokenizer, tiny models, chat records


@pytest.fixture(scope="module")
def tokenizer():
    specials = ["<pad>", "<unk>", "<|im_start|>", "<|im_end|>"]
    vocab = {t: i for i, t in enumerate(specials + ["system", "user", "assistant"] + WORDS)}
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>",
                                                eos_token="<|im_end|>", additional_special_tokens=["<|im_start|>"])
    fast.chat_template = ("{% for m in messages %}<|im_start|> {{ m['role'] }} {{ m['content'] }} <|im_end|> "
                          "{% endfor %}{% if add_generation_prompt %}<|im_start|> assistant {% endif %}")
    return fast


def _records(n: int, seed: int):
    rng = random.Random(seed)
    words = lambda lo, hi: " ".join(rng.choice(WORDS) for _ in range(rng.randint(lo, hi)))  # noqa: E731
    return [{"messages": [{"role": "user", "content": words(3, 9)}, {"role": "assistant", "content": words(2, 12)}]}
            for _ in range(n)]


@pytest.fixture(scope="module")
def chat_data():
    return datasets.Dataset.from_list(_records(32, 0)), datasets.Dataset.from_list(_records(8, 1))


def _model(kind: str, vocab: int):
    kw = dict(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=128)
    config = {
        "qwen2": lambda: transformers.Qwen2Config(**kw),
        "llama": lambda: transformers.LlamaConfig(**kw),
        # a softcap that bends this tiny model's small logits (the default 30 would leave them almost linear)
        "gemma2": lambda: transformers.Gemma2Config(**kw, head_dim=8, final_logit_softcapping=0.5),
        "cohere": lambda: transformers.CohereConfig(**kw),  # default logit_scale 0.0625
    }[kind]()
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config)
    assert model.config.use_cache is True  # the default users get
    return model


def _batch(vocab: int, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (3, 17), generator=g)
    labels = ids.clone()
    labels[:, :4] = -100  # prompts
    labels[1, 10:] = -100  # a padded row
    attention = torch.ones_like(ids)
    attention[1, 12:] = 0
    return dict(input_ids=ids, attention_mask=attention, labels=labels)


def _spy_on_mlmix(monkeypatch, heads=None):
    """A list that records each call of mlmix's fused loss (its reduction); any call of TRL's kernel fails.

    ``heads``, if given, collects the TRL fused-head settings mlmix finds for each ``fused_lm_head=True`` call.
    """
    calls = []
    real_loss, real_head = loss_mod.linear_cross_entropy, loss_mod._trl_fused_head

    def counted(*args, **kwargs):
        calls.append(kwargs.get("reduction", "mean"))
        return real_loss(*args, **kwargs)

    def found(model):
        head = real_head(model)
        if heads is not None:
            heads.append(head)
        return head

    class NoTrlKernel:
        @staticmethod
        def apply(*args, **kwargs):
            raise AssertionError("TRL's fused LM head ran on an mlmix-patched model")

    monkeypatch.setattr(loss_mod, "linear_cross_entropy", counted)
    monkeypatch.setattr(loss_mod, "_trl_fused_head", found)
    monkeypatch.setattr(trl_utils, "_ChunkedLogProbFunction", NoTrlKernel)
    return calls


@pytest.fixture
def mlmix_calls(monkeypatch):
    return _spy_on_mlmix(monkeypatch)


# ---------------------------------------------------------------------------------------------------------------
# the fused head, called directly


def _fused_call(model, inputs, autocast):
    model.zero_grad()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        out = model(**inputs, fused_lm_head=True)
    # the entropy enters the objective (GRPO's entropy bonus) so that its gradient is checked too
    (out.loss + 0.1 * out.entropy.sum()).backward()
    return out, {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


def _max_diff(a, b):
    return float((a.detach().double() - b.detach().double()).abs().max())


@pytest.mark.parametrize("kind, order, temperature, autocast", [
    ("qwen2", "before", 1.0, False), ("qwen2", "after", 0.7, False), ("qwen2", "before", 1.0, True),
    ("llama", "after", 1.0, False), ("llama", "before", 0.7, False), ("llama", "after", 1.0, True),
    ("gemma2", "before", 0.7, False),  # final_logit_softcapping
    ("cohere", "after", 0.7, False),  # logit_scale
])
def test_fused_head_matches_trl(kind, order, temperature, autocast, monkeypatch):
    base = _model(kind, 53)
    inputs = _batch(53)
    ref = copy.deepcopy(base)
    trl_utils.add_fused_lm_head(ref, temperature=temperature, outputs=ALL_OUTPUTS)
    ref_out, ref_grads = _fused_call(ref, inputs, autocast)  # TRL's own head on a copy of the same model

    calls = _spy_on_mlmix(monkeypatch)
    model = copy.deepcopy(base)
    if order == "before":
        patch_causal_lm(model)
    trl_utils.add_fused_lm_head(model, temperature=temperature, outputs=ALL_OUTPUTS)
    if order == "after":
        patch_causal_lm(model)
    out, grads = _fused_call(model, inputs, autocast)
    assert calls == ["none"]

    assert type(out) is trl_utils.FusedCausalLMOutput
    assert torch.equal(out.label_mask, ref_out.label_mask)
    assert out.log_probs.shape == ref_out.log_probs.shape == (3, 16)
    # float32: float tolerance; bf16 autocast: TRL rounds its logit tiles to bf16, mlmix accumulates them in float32
    tol = 2e-3 if autocast else 2e-6
    assert float(out.loss.detach()) == pytest.approx(float(ref_out.loss.detach()), rel=2e-5 if autocast else 1e-6)
    for field in ("log_probs", "entropy", "log_sum_sq_probs", "mean_logits"):
        assert _max_diff(getattr(out, field), getattr(ref_out, field)) < tol, field
        assert bool((getattr(out, field)[~out.label_mask] == 0).all()), field
    assert torch.equal(out.is_top1, ref_out.is_top1)
    assert set(grads) == set(ref_grads)
    for name, g in ref_grads.items():
        assert _max_diff(grads[name], g) < (2e-2 if autocast else 1e-5) * float(g.abs().max()), name


def test_fused_head_only_computes_what_trl_asks_and_honours_shift_labels(mlmix_calls):
    model = _model("qwen2", 53)
    trl_utils.add_fused_lm_head(model, outputs=("log_probs", "entropy", "is_top1"))  # SFTTrainer's request
    patch_causal_lm(model)
    inputs = _batch(53)
    out = model(**inputs, fused_lm_head=True)
    assert out.log_sum_sq_probs is None and out.mean_logits is None and out.aux_loss is None
    assert out.entropy is not None and out.is_top1.dtype == torch.bool
    # pre-shifted labels (context / sequence parallelism) are scored as given
    shifted = torch.cat([inputs["labels"][:, 1:], torch.full_like(inputs["labels"][:, :1], -100)], dim=1)
    out2 = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], shift_labels=shifted,
                 fused_lm_head=True)
    assert out2.log_probs.shape == (3, 17)
    assert _max_diff(out2.log_probs[:, :-1], out.log_probs) < 1e-6
    assert _max_diff(out2.loss, out.loss) < 1e-6


def test_fused_head_refuses_what_it_cannot_honour():
    model = patch_causal_lm(_model("qwen2", 53), z_loss=1e-4)
    trl_utils.add_fused_lm_head(model)
    with pytest.raises(ValueError, match="z_loss"):
        model(**_batch(53), fused_lm_head=True)
    with pytest.raises(ValueError, match="already patched"):
        patch_causal_lm(model, z_loss=0.0)
    assert patch_causal_lm(model, z_loss=1e-4) is model


# ---------------------------------------------------------------------------------------------------------------
# when logits come back


def test_logits_in_eval_generation_and_on_request(mlmix_calls):
    ref = _model("llama", 53)
    model = patch_causal_lm(copy.deepcopy(ref))
    inputs = _batch(53)
    assert model.training
    out = model(**inputs)
    assert out.logits is None and mlmix_calls == ["mean"]
    assert model(**inputs, return_logits=True).logits.shape == (3, 17, 53)
    model.eval()
    ref.eval()
    with torch.no_grad():
        out, ref_out = model(**inputs), ref(**inputs)
        assert torch.equal(out.logits, ref_out.logits) and torch.equal(out.loss, ref_out.loss)
        assert model(**inputs, return_logits=False).logits is None
        generated = model.generate(inputs["input_ids"][:1, :5], max_new_tokens=4, do_sample=False)
        assert torch.equal(generated, ref.generate(inputs["input_ids"][:1, :5], max_new_tokens=4, do_sample=False))
    loss_only = patch_causal_lm(copy.deepcopy(ref), eval_logits=False)
    with torch.no_grad():
        out = loss_only(**inputs)
    assert out.logits is None and abs(float(out.loss) - float(ref_out.loss)) < 1e-5


def test_deepcopy_of_a_patched_model_runs_its_own_weights():
    """TRL's reference models are deep copies: the copy's forward must use the copy's backbone and head."""
    model = patch_causal_lm(_model("qwen2", 53))
    twin = copy.deepcopy(model)
    with torch.no_grad():
        for p in twin.parameters():
            p.mul_(0.5)
    inputs = _batch(53)
    ref = copy.deepcopy(twin)
    ref.forward = ref._mlmix_original_forward  # the unpatched forward of the copy
    assert abs(float(twin(**inputs).loss.detach()) - float(ref(**inputs).loss.detach())) < 1e-5
    assert abs(float(twin(**inputs).loss.detach()) - float(model(**inputs).loss.detach())) > 1e-3


# ---------------------------------------------------------------------------------------------------------------
# SFTTrainer, end to end


def _sft_run(model, tokenizer, chat_data, tmp_path, patch_after=False):
    train, evaluation = chat_data
    args = trl.SFTConfig(output_dir=str(tmp_path), max_steps=3, report_to=[], use_cpu=True, logging_steps=1,
                         save_strategy="no", disable_tqdm=True)
    trainer = trl.SFTTrainer(model=model, args=args, train_dataset=train, eval_dataset=evaluation,
                             processing_class=tokenizer)
    if patch_after:
        patch_causal_lm(trainer.model)
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    metrics = trainer.evaluate()
    # TRL deprecates the logits SFTTrainer recomputes for compute_metrics / predict (its warning, not mlmix's)
    with pytest.warns(FutureWarning, match="return_outputs=True"):
        prediction = trainer.predict(trainer.eval_dataset)
    return logs, metrics, prediction


@pytest.fixture(scope="module")
def unpatched_sft(tokenizer, chat_data, tmp_path_factory):
    runs = {}

    def get(kind):
        if kind not in runs:
            runs[kind] = _sft_run(_model(kind, len(tokenizer)), tokenizer, chat_data, tmp_path_factory.mktemp(kind))
        return runs[kind]

    return get


@pytest.mark.parametrize("kind, order", [("qwen2", "before"), ("qwen2", "after"), ("llama", "before"),
                                         ("llama", "after")])
def test_sft_trainer_matches_unpatched(kind, order, tokenizer, chat_data, unpatched_sft, tmp_path, monkeypatch):
    ref_logs, ref_metrics, ref_prediction = unpatched_sft(kind)
    heads = []
    calls = _spy_on_mlmix(monkeypatch, heads)
    model = _model(kind, len(tokenizer))
    if order == "before":
        patch_causal_lm(model)
    logs, metrics, prediction = _sft_run(model, tokenizer, chat_data, tmp_path, patch_after=order == "after")

    # every training and evaluation step went through mlmix (TRL's kernel raises under the spy)
    assert len(calls) >= 3 + 2 and set(calls) == {"none"}
    # with SFTTrainer's own settings, found through accelerate's mixed-precision wrapper as well
    assert heads and all(h == loss_mod._FusedHead(1.0, ("log_probs", "entropy", "is_top1"), False) for h in heads)
    assert len(logs) == len(ref_logs) == 3
    # SFTConfig's default bf16 autocast: TRL rounds its logit tiles to bf16, mlmix accumulates in float32
    for got, want in zip(logs, ref_logs):
        assert got["loss"] == pytest.approx(want["loss"], rel=1e-4)
        assert got["entropy"] == pytest.approx(want["entropy"], rel=1e-5)
        assert got["mean_token_accuracy"] == pytest.approx(want["mean_token_accuracy"], abs=1e-7)
        assert got["grad_norm"] == pytest.approx(want["grad_norm"], rel=5e-3)
        assert got["num_tokens"] == want["num_tokens"]
    for key in ("eval_loss", "eval_entropy", "eval_mean_token_accuracy"):
        assert metrics[key] == pytest.approx(ref_metrics[key], rel=1e-4), key
    # predict returns logits, like the unpatched trainer
    assert prediction.predictions is not None
    assert prediction.predictions.shape == ref_prediction.predictions.shape
    assert prediction.predictions.shape[-1] == len(tokenizer)
    assert np.abs(prediction.predictions - ref_prediction.predictions).max() < 0.05
    assert prediction.metrics["test_loss"] == pytest.approx(ref_prediction.metrics["test_loss"], rel=1e-4)


# ---------------------------------------------------------------------------------------------------------------
# the plain HF Trainer: compute_metrics receives logits


def _trainer_run(model, tokenizer, chat_data, tmp_path):
    train, evaluation = (d.map(lambda r: {"input_ids": tokenizer.apply_chat_template(r["messages"], tokenize=True,
                                                                                       return_dict=False)},
                               remove_columns=["messages"]) for d in chat_data)
    seen = {}

    def compute_metrics(prediction):
        logits, labels = prediction.predictions, prediction.label_ids
        seen["shape"] = logits.shape
        hits = (logits[:, :-1].argmax(-1) == labels[:, 1:]) & (labels[:, 1:] != -100)
        return {"accuracy": float(hits.sum() / (labels[:, 1:] != -100).sum())}

    args = transformers.TrainingArguments(output_dir=str(tmp_path), max_steps=2, report_to=[], use_cpu=True,
                                          logging_steps=1, save_strategy="no", disable_tqdm=True)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=train, eval_dataset=evaluation,
                                   data_collator=transformers.DataCollatorForLanguageModeling(tokenizer, mlm=False),
                                   compute_metrics=compute_metrics)
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    return logs, trainer.evaluate(), seen


def test_hf_trainer_trains_fused_and_evaluates_with_logits(tokenizer, chat_data, tmp_path, monkeypatch):
    ref_logs, ref_metrics, ref_seen = _trainer_run(_model("qwen2", len(tokenizer)), tokenizer, chat_data,
                                                   tmp_path / "ref")
    mlmix_calls = _spy_on_mlmix(monkeypatch)
    logs, metrics, seen = _trainer_run(patch_causal_lm(_model("qwen2", len(tokenizer))), tokenizer, chat_data,
                                       tmp_path / "mlmix")
    assert len(mlmix_calls) == 2  # the training steps; evaluation ran the original forward for its logits
    for got, want in zip(logs, ref_logs):
        assert got["loss"] == pytest.approx(want["loss"], rel=1e-5)
        assert got["grad_norm"] == pytest.approx(want["grad_norm"], rel=1e-4)
    assert seen["shape"] == ref_seen["shape"] and seen["shape"][-1] == len(tokenizer)
    assert metrics["eval_accuracy"] == ref_metrics["eval_accuracy"]
    assert metrics["eval_loss"] == pytest.approx(ref_metrics["eval_loss"], rel=1e-5)
