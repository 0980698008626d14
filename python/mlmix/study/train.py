"""Training one arm: the built-in tiny causal LM on the CPU, or a local transformers model through the HF Trainer.

Both read the arm's packed store with mlmix's loader and compute the loss with mlmix's fused linear
cross-entropy, and both save a transformers model directory (weights, config, tokenizer with its chat
template) that ``AutoModelForCausalLM.from_pretrained`` loads, so any evaluation tool can read an arm.

``tiny``: the demo's model and recipe (:mod:`mlmix.demo`: a Qwen2-shaped LM of about 0.5M parameters trained from
scratch, rows of 8 x 256 tokens, AdamW with warmup and cosine decay), ``train.steps`` and ``train.lr``
configurable. ``hf``: ``transformers.Trainer`` on :class:`mlmix.hf.PackedRows` with the model patched by
:func:`mlmix.torch.patch_causal_lm`; the GPU when one is present (``train.device``), LoRA adapters through
``peft`` when ``train.lora`` (merged into the saved weights).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Any, Callable, Mapping

__all__ = ["Trained", "train_run", "tokenizer_config"]


@dataclass
class Trained:
    """A trained arm: the model (in memory, ready to evaluate), its transformers tokenizer, the saved directory,
    the loss per step, its parameter count and the training time in seconds."""

    model: Any
    tokenizer: Any
    path: str
    train_loss: list
    params: int
    seconds: float
    device: str


def tokenizer_config(tcfg: Mapping, tokenizer_path: str | None) -> dict:
    """The build's ``[tokenizer]`` table for a backend: the study's own BPE (tiny) or the model's (hf)."""
    if tcfg["backend"] == "tiny":
        return {"path": tokenizer_path, "template": "chatml"}
    return {"pretrained": tcfg["model"], "template": tcfg["template"]}


def train_run(store: str, tcfg: Mapping, seed: int, out_dir: str, *, vocab_size: int | None = None,
              tokenizer_path: str | None = None, say: Callable[[str], None] = lambda s: None,
              name: str = "arm") -> Trained:
    """Train one arm on the packed ``store`` with the ``[train]`` settings ``tcfg`` and ``seed``; save the model
    to ``out_dir/model``."""
    if tcfg["backend"] == "tiny":
        return _train_tiny(store, tcfg, seed, out_dir, vocab_size, tokenizer_path, say, name)
    return _train_hf(store, tcfg, seed, out_dir, say)


def _train_tiny(store, tcfg, seed, out_dir, vocab_size, tokenizer_path, say, name) -> Trained:
    from ..demo import save_model, train

    t0 = time.perf_counter()
    model, losses = train(store, vocab_size, tcfg["steps"], seed, say, name, lr=tcfg["lr"])
    seconds = time.perf_counter() - t0
    path = save_model(model, tokenizer_path, os.path.join(out_dir, "model"))
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    model.eval()
    n = sum(p.numel() for p in model.parameters())
    return Trained(model, tok, path, [float(x) for x in losses], int(n), seconds, "cpu")


def _device(name: str) -> str:
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"train.device: {name!r} was asked for but torch sees no CUDA device; use \"auto\" or "
                         "\"cpu\"")
    return name


def _train_hf(store, tcfg, seed, out_dir, say) -> Trained:
    from .._deps import require

    transformers = require("transformers", "the study's hf backend")
    import torch

    from ..chat import CHATML_TEMPLATE, LLAMA3_TEMPLATE
    from ..hf import PackedRows
    from ..torch import patch_causal_lm

    device = _device(tcfg["device"])
    kwargs: dict[str, Any] = {"local_files_only": True}
    if tcfg["dtype"] != "auto":
        kwargs["dtype"] = getattr(torch, tcfg["dtype"])
    bars = transformers.utils.logging.is_progress_bar_enabled()
    transformers.utils.logging.disable_progress_bar()
    try:
        model = transformers.AutoModelForCausalLM.from_pretrained(tcfg["model"], **kwargs)
    finally:
        if bars:
            transformers.utils.logging.enable_progress_bar()
    tok = transformers.AutoTokenizer.from_pretrained(tcfg["model"], local_files_only=True)
    if tcfg["template"] == "chatml" or (tcfg["template"] == "auto" and not getattr(tok, "chat_template", None)):
        tok.chat_template = CHATML_TEMPLATE  # "auto" without a template of its own: ChatML, as the build encodes
    elif tcfg["template"] == "llama3":
        tok.chat_template = LLAMA3_TEMPLATE
    transformers.set_seed(seed)
    patch_causal_lm(model)  # the training loss through mlmix's fused kernel (the LoRA wrapper calls this forward)
    lora = bool(tcfg["lora"])
    if lora:
        peft = require("peft", "train.lora")
        model = peft.get_peft_model(model, peft.LoraConfig(
            r=tcfg["lora_r"], lora_alpha=tcfg["lora_alpha"], lora_dropout=tcfg["lora_dropout"],
            target_modules="all-linear", task_type="CAUSAL_LM"))
    rows = PackedRows(store, vocab_size=model.config.vocab_size)
    dtype = next(model.parameters()).dtype
    args = transformers.TrainingArguments(
        output_dir=os.path.join(out_dir, "trainer"), per_device_train_batch_size=tcfg["batch_size"],
        max_steps=tcfg["steps"], learning_rate=tcfg["lr"], lr_scheduler_type="cosine", warmup_steps=max(
            1, tcfg["steps"] // 10), seed=seed, data_seed=seed, report_to=[], save_strategy="no", logging_steps=1,
        use_cpu=device == "cpu", disable_tqdm=True, bf16=dtype == torch.bfloat16 and device != "cpu",
        fp16=dtype == torch.float16 and device != "cpu")
    trainer = transformers.Trainer(model=model, args=args, train_dataset=rows, data_collator=rows.collator())
    # without tqdm the Trainer prints its log dicts on stdout, which `mlmix study --json` keeps for the JSON
    trainer.remove_callback(transformers.PrinterCallback)
    say(f"  training {os.path.basename(tcfg['model'])} for {tcfg['steps']} steps on {device}"
        f"{' with LoRA' if lora else ''}")
    t0 = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - t0
    losses = [float(h["loss"]) for h in trainer.state.log_history if "loss" in h]
    model = trainer.model
    if lora:
        model = model.merge_and_unload()
    if losses:
        say(f"  loss {losses[0]:.3f} at step 1, {losses[-1]:.3f} at step {len(losses)} ({seconds:.1f}s)")
    path = os.path.join(out_dir, "model")
    transformers.utils.logging.disable_progress_bar()  # its "Writing model shards" bar would cut into our lines
    try:
        model.save_pretrained(path)
    finally:
        if bars:
            transformers.utils.logging.enable_progress_bar()
    tok.save_pretrained(path)
    from .._atomic import relax_modes

    relax_modes(path)
    import shutil

    shutil.rmtree(os.path.join(out_dir, "trainer"), ignore_errors=True)
    model.eval()
    n = sum(p.numel() for p in model.parameters())
    return Trained(model, tok, path, losses, int(n), seconds, device)
