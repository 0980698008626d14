"""mlmix.hf in the real HF Trainer and TRL SFTTrainer, with default model configs and trainer defaults.

Models are built with ``from_config`` as users build them (``use_cache`` left at its default, True): the
packed batches must give exactly the loss and gradients of the examples run one by one, and the
Trainer's own ``resume_from_checkpoint`` must continue with exactly the batches an uninterrupted run
trains on, at steps inside epochs 0, 1 and 2, with 0 and 2 dataloader workers.
"""

from __future__ import annotations

import hashlib

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import mlmix  # noqa: E402
from mlmix.hf import PackedCollator, PackedRows  # noqa: E402

VOCAB = 97
SEQ_LEN = 48

pytestmark = pytest.mark.filterwarnings("ignore:This DataLoader will create:UserWarning")


def _examples(n: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    lengths = rng.integers(3, 30, n)
    toks = mlmix.Ragged.from_lengths(rng.integers(1, VOCAB, int(lengths.sum())).astype(np.uint32), lengths)
    # loss on the second half of each example (a "completion")
    mask = np.concatenate([(np.arange(k) >= k // 2).astype(np.uint8) for k in lengths])
    return toks, mlmix.Ragged.from_lengths(mask, lengths)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    toks, mask = _examples(60)
    path = str(tmp_path_factory.mktemp("hf") / "store")
    mlmix.write_store(path, toks, seq_len=SEQ_LEN, loss_mask=mask, seed=0)
    return path, toks, mask


def _model(kind: str = "llama", impl: str = "sdpa"):
    torch.manual_seed(0)
    if kind == "llama":
        cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
        model = transformers.LlamaForCausalLM(cfg)
    else:
        cfg = transformers.Qwen2Config(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
        model = transformers.Qwen2ForCausalLM(cfg)
    assert model.config.use_cache is True  # the default users get
    model.config._attn_implementation = impl
    return model


def _tokenizer():
    """A word-level tokenizer over the VOCAB ids the stores hold (what SFTTrainer's processing_class needs)."""
    from tokenizers import Tokenizer, models

    tok = Tokenizer(models.WordLevel({f"t{i}": i for i in range(VOCAB)}, unk_token="t0"))
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="t0", eos_token="t1")


def _per_example_loss_sum(model, rows: PackedRows, idx):
    """Sum of token losses and count, each example of the rows run alone (no packing)."""
    total, count = 0.0, 0
    for i in idx:
        r = rows[i]
        starts = torch.nonzero(r["position_ids"] == 0).flatten().tolist() + [r["input_ids"].numel()]
        for a, b in zip(starts[:-1], starts[1:]):
            ids, labels = r["input_ids"][a:b][None], r["labels"][a:b][None]
            n = int((labels[:, 1:] != -100).sum())
            if n == 0:
                continue
            loss = model(input_ids=ids, labels=labels).loss
            total = total + loss * n
            count += n
    return total, count


@pytest.mark.parametrize("kind, impl, layout, mode", [
    ("llama", "sdpa", "flat", "train"), ("llama", "sdpa", "padded", "eval"), ("llama", "eager", "flat", "eval"),
    ("llama", "eager", "padded", "train"), ("qwen2", "sdpa", "flat", "eval"), ("qwen2", "sdpa", "padded", "train"),
    ("qwen2", "eager", "flat", "train"), ("qwen2", "eager", "padded", "eval")])
def test_packed_batches_are_exact_under_default_configs(store, kind, impl, layout, mode):
    path = store[0]
    rows = PackedRows(path, vocab_size=VOCAB)
    collate = rows.collator(layout)
    model = _model(kind, impl)
    getattr(model, mode)()
    idx = [0, 3, 5, 7]
    batch = collate([rows[i] for i in idx])
    model.zero_grad()
    packed = model(**batch).loss  # the whole batch, as the Trainer and README's loop pass it
    packed.backward()
    g_packed = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    total, count = _per_example_loss_sum(model, rows, idx)
    (total / count).backward()
    g_ref = [p.grad.clone() for p in model.parameters()]
    assert packed.detach().item() == pytest.approx((total / count).detach().item(), rel=1e-5, abs=1e-6)
    for a, b in zip(g_packed, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_collator_flat_keys_and_seq_idx(store):
    rows = PackedRows(store[0])
    b = rows.collator("flat")([rows[0], rows[1]])
    pos = b["position_ids"][0]
    assert b["input_ids"].shape == b["labels"].shape == b["seq_idx"].shape == b["position_ids"].shape
    starts = torch.nonzero(pos == 0).flatten()
    assert b["cu_seq_lens_q"].tolist() == starts.tolist() + [pos.numel()]
    assert b["seq_idx"][0, starts].tolist() == list(range(starts.numel()))
    assert "lang_ids" not in b and "attention_mask" not in b and b["use_cache"] is False


def test_collator_refuses_truncated_rows(store):
    rows = PackedRows(store[0])
    r = dict(rows[0])
    r["input_ids"] = r["input_ids"][:5]
    with pytest.raises(ValueError, match="different lengths"):
        rows.collator()([r])
    with pytest.raises(ValueError, match="layout must be"):
        PackedCollator("ragged")


def _hash(t) -> str:
    return hashlib.sha1(t.numpy().tobytes()).hexdigest()[:12]


def _train(rows, out, max_steps, *, workers, resume=None):
    """Train with the Trainer's defaults; returns the hashes of the batches the model was called on."""
    log = []
    model = _model()
    model.register_forward_pre_hook(lambda m, args, kw: log.append(_hash(kw["input_ids"])), with_kwargs=True)
    args = transformers.TrainingArguments(output_dir=out, max_steps=max_steps, per_device_train_batch_size=4,
                                          save_steps=1, report_to=[], dataloader_num_workers=workers,
                                          use_cpu=True)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=rows, data_collator=rows.collator())
    trainer.train(resume_from_checkpoint=resume)
    assert trainer.state.global_step == max_steps
    return log


@pytest.mark.parametrize("workers", [0, 2])
def test_trainer_default_resume_is_exact_in_every_epoch(store, tmp_path, workers):
    """Default Trainer, default resume_from_checkpoint, at steps inside epochs 0, 1 and 2."""
    rows = PackedRows(store[0])
    steps_per_epoch = -(-len(rows) // 4)
    total = 3 * steps_per_epoch - 1
    full = _train(rows, str(tmp_path / "full"), total, workers=workers)
    assert len(full) == total and len(set(full[:steps_per_epoch])) == steps_per_epoch
    for stop in (2, steps_per_epoch + 1, 2 * steps_per_epoch + 2):
        out = str(tmp_path / f"run{stop}")
        assert _train(rows, out, stop, workers=workers) == full[:stop]
        resumed = _train(rows, out, total, workers=workers, resume=f"{out}/checkpoint-{stop}")
        assert resumed == full[stop:], f"resume at step {stop} (epoch {stop // steps_per_epoch})"


def test_trainer_metrics_count_packed_rows(store, tmp_path):
    rows = PackedRows(store[0])
    model = _model()
    args = transformers.TrainingArguments(output_dir=str(tmp_path), num_train_epochs=1, per_device_train_batch_size=4,
                                          report_to=[], use_cpu=True, save_strategy="no")
    out = transformers.Trainer(model=model, args=args, train_dataset=rows, data_collator=rows.collator()).train()
    assert out.global_step == -(-len(rows) // 4)
    assert out.metrics["train_samples_per_second"] == pytest.approx(len(rows) / out.metrics["train_runtime"], rel=0.05)


# TRL's SFTConfig sets the deprecated alias itself (trl 1.16 with transformers 5.25)
@pytest.mark.filterwarnings("ignore:`gradient_checkpointing` is deprecated:FutureWarning")
def test_sft_trainer_takes_the_rows_and_resumes_exactly(store, tmp_path):
    """TRL's SFTTrainer, its defaults but the two settings docs/loader.md gives: train and resume."""
    trl = pytest.importorskip("trl")
    rows = PackedRows(store[0], vocab_size=VOCAB)
    train = rows.to_hf(cache_dir=str(tmp_path / "hf-cache"))
    assert len(train) == len(rows) and train[3]["input_ids"] == rows[3]["input_ids"].tolist()

    def run(out, steps, resume=None):
        log = []
        model = _model("qwen2")
        model.register_forward_pre_hook(lambda m, a, kw: log.append(_hash(kw["input_ids"])), with_kwargs=True)
        config = trl.SFTConfig(output_dir=out, max_steps=steps, per_device_train_batch_size=4, save_steps=1,
                               report_to=[], use_cpu=True, max_length=None, logging_steps=1)
        trainer = trl.SFTTrainer(model=model, args=config, train_dataset=train, processing_class=_tokenizer(),
                                 data_collator=rows.collator())
        trainer.train(resume_from_checkpoint=resume)
        return log, trainer

    steps_per_epoch = -(-len(rows) // 4)
    full, trainer = run(str(tmp_path / "full"), steps_per_epoch + 3)
    assert trainer.state.global_step == steps_per_epoch + 3
    logged = [h for h in trainer.state.log_history if "loss" in h]
    assert logged and all(np.isfinite(h["loss"]) for h in logged)
    out = str(tmp_path / "part")
    run(out, steps_per_epoch + 1)
    resumed, _ = run(out, steps_per_epoch + 3, resume=f"{out}/checkpoint-{steps_per_epoch + 1}")
    assert resumed == full[steps_per_epoch + 1:]
