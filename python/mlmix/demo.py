"""``mlmix demo``: the study's effect in miniature, end to end, on the bundled parallel instruction set.

1. Train a small byte-level BPE (HF ``tokenizers``' trainer, ChatML special tokens) on the training split,
   so the tiny model's embedding table stays small (Qwen's 151k vocabulary would dwarf it).
2. Build three of the study's mixtures with ``mlmix.build`` (English-only, the pinch, P=100): read,
   tokenize with ChatML and loss masks, dedup, mix, pack; print their per-language tables. The three
   builds share one stage cache, so reading and tokenizing happen once.
3. Train the same tiny randomly initialised causal LM (transformers' Qwen2 architecture, about 1M
   parameters) on the CPU twice with the same budget, once on English-only and once on the pinch, reading
   the packed stores with mlmix's dataloader and computing the loss with mlmix's fused linear
   cross-entropy; print the loss as it falls.
4. Compare held-out loss per language (the held-out split: sources neither model saw) and write the
   report, with the loss curves, the per-language comparison and every mixture's build details.
5. Save both trained models as transformers model directories (``OUT/models/english_only``,
   ``OUT/models/pinch``: weights, config, and the tokenizer with its ChatML chat template), so that
   ``mlmix eval examples/eval.toml`` can evaluate them (and ``AutoModelForCausalLM.from_pretrained``
   load them).

Seeded and deterministic: the same seed gives the same numbers on the same machine and thread count.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from typing import Iterator, Mapping

import numpy as np

SEQ_LEN = 256
BATCH_SIZE = 8
DEFAULT_STEPS = 80
VOCAB_SIZE = 1024
N_PINCH = 11  # one example in each non-English language: "a pinch" at this set's scale (64 sources)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
MIXTURES = {
    "english_only": {"recipe": "monolingual", "lang": "en"},
    "pinch": {"recipe": "pinch", "n_multilingual": N_PINCH},
    "p100": {"recipe": "percent_mixture", "percent": 100},
}
TRAINED = ("english_only", "pinch")
MODELS_DIR = "models"  # OUT/models/<mixture>: the trained models, as transformers directories


def train_bpe(texts, vocab_size: int, path: str, seed: int = 0) -> str:
    """Train a byte-level BPE with ChatML's special tokens on ``texts``; save it as a tokenizer.json."""
    from ._deps import require

    require("tokenizers", "training the demo's tokenizer")
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    from ._atomic import atomic_file

    with atomic_file(path, "wb") as f:
        f.write(tok.to_str().encode("utf-8"))
    return path


def _demo_data_dir() -> str:
    from . import data

    return os.path.join(os.path.dirname(os.path.abspath(data.__file__)), "demo")


class _Printer:
    def __init__(self, quiet: bool, stream=None):
        self.quiet = quiet
        self.stream = stream or sys.stdout

    def __call__(self, text: str = "") -> None:
        if not self.quiet:
            print(text, file=self.stream, flush=True)


# ---- the model ---------------------------------------------------------------------------------
def _tiny_lm(vocab_size: int, seed: int):
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    cfg = Qwen2Config(vocab_size=vocab_size, hidden_size=128, intermediate_size=384, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=SEQ_LEN,
                      tie_word_embeddings=True, attn_implementation="sdpa")
    return Qwen2ForCausalLM(cfg)


def _block_causal_mask(position_ids):
    """(batch, 1, T, T) additive mask: causal within each packed example, nothing across examples."""
    import torch

    seg = (position_ids == 0).cumsum(-1)
    t = position_ids.shape[-1]
    allowed = (seg[:, :, None] == seg[:, None, :]) & torch.ones(t, t, dtype=torch.bool).tril()
    mask = torch.zeros(allowed.shape, dtype=torch.float32)
    mask.masked_fill_(~allowed, torch.finfo(torch.float32).min)
    return mask[:, None]


def _fused_loss():
    """mlmix's fused linear cross-entropy, or None if this install lacks it."""
    try:
        from .torch import linear_cross_entropy
    except (ImportError, AttributeError):
        return None
    return linear_cross_entropy


def _loss_fn():
    """mlmix's fused linear cross-entropy, or a plain materialised one (and say so) if it is missing."""
    fused = _fused_loss()
    if fused is not None:
        return fused, "mlmix.torch.linear_cross_entropy (fused)"
    import torch.nn.functional as F

    def plain(hidden, weight, labels, *, shift=False, reduction="mean", ignore_index=-100):
        if shift:
            hidden, labels = hidden[..., :-1, :], labels[..., 1:]
        logits = hidden.reshape(-1, hidden.shape[-1]).float() @ weight.float().T
        return F.cross_entropy(logits, labels.reshape(-1), ignore_index=ignore_index, reduction=reduction)

    return plain, "torch cross-entropy (mlmix.torch.linear_cross_entropy is not available in this install)"


def _batches(store_path: str, seed: int) -> tuple[Iterator[dict], str]:
    """Endless training batches from a packed store (padded layout): mlmix's loader, else the store by index."""
    import torch

    try:
        from .torch import PackedDataset
    except (ImportError, AttributeError):
        PackedDataset = None
    if PackedDataset is not None:
        # drop_last: every step sees BATCH_SIZE rows, so both models get the same token budget
        ds = PackedDataset(store_path, batch_size=BATCH_SIZE, seed=seed, shuffle=True, drop_last=True, languages=None)

        def gen():
            epoch = 0
            while True:
                if hasattr(ds, "set_epoch"):
                    ds.set_epoch(epoch)
                for batch in ds:
                    yield {k: batch[k] for k in ("input_ids", "labels", "position_ids")}
                epoch += 1

        return gen(), "mlmix.torch.PackedDataset"
    from .store import open as open_store

    store = open_store(store_path)

    def gen_plain():
        rng = np.random.default_rng(seed)
        while True:
            order = rng.permutation(len(store))
            for s in range(0, len(order) - BATCH_SIZE + 1 if len(order) >= BATCH_SIZE else 1, BATCH_SIZE):
                rows = [store[int(i)] for i in order[s : s + BATCH_SIZE]]
                yield {k: torch.from_numpy(np.stack([np.asarray(r[k], dtype=np.int64) for r in rows]))
                       for k in ("input_ids", "labels", "position_ids")}

    return gen_plain(), "the packed store read by index (mlmix.torch.PackedDataset is not available in this install)"


def train(store_path: str, vocab_size: int, steps: int, seed: int, say, name: str, *,
          lr: float = 3e-3) -> tuple[object, list[float]]:
    """Train the tiny LM on a packed store for ``steps`` steps (AdamW at peak ``lr``, warmup then cosine);
    returns the model and the loss per step."""
    import torch

    model = _tiny_lm(vocab_size, seed)
    loss_fn, _ = _loss_fn()
    batches, _ = _batches(store_path, seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.01)
    warmup = max(steps // 10, 1)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min((s + 1) / warmup, 0.5 * (1 + math.cos(math.pi * min(s / steps, 1.0)))))
    losses: list[float] = []
    model.train()
    t0 = time.perf_counter()
    for step in range(steps):
        batch = next(batches)
        ids, labels, pos = (torch.as_tensor(batch[k]).long() for k in ("input_ids", "labels", "position_ids"))
        hidden = model.model(input_ids=ids, position_ids=pos, attention_mask=_block_causal_mask(pos)).last_hidden_state
        loss = loss_fn(hidden, model.lm_head.weight, labels, shift=True)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(loss.detach().item())
        if step == 0 or (step + 1) % 20 == 0 or step + 1 == steps:
            recent = losses[-20:]
            say(f"  {name:<13} step {step + 1:>4}/{steps}  loss {sum(recent) / len(recent):6.3f}  "
                f"({time.perf_counter() - t0:5.1f}s)")
    return model, losses


def save_model(model, tokenizer_path: str, path: str) -> str:
    """Save a trained tiny LM as a transformers model directory that ``AutoModelForCausalLM`` and
    ``AutoTokenizer`` load offline: weights and config, and the tokenizer with ChatML as its chat template
    (``<|im_end|>`` ends a turn and generation, ``<|endoftext|>`` pads). Returns ``path``."""
    from transformers import PreTrainedTokenizerFast
    from transformers.utils import logging as hf_logging

    from ._atomic import relax_modes
    from .chat import CHATML_TEMPLATE

    tok = PreTrainedTokenizerFast(tokenizer_file=tokenizer_path, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                  chat_template=CHATML_TEMPLATE)
    for cfg in (model.config, model.generation_config):
        cfg.bos_token_id = None
        cfg.eos_token_id = tok.eos_token_id
        cfg.pad_token_id = tok.pad_token_id
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # its "Writing model shards" bar would interleave with the demo's lines
    try:
        model.save_pretrained(path)
    finally:
        if bars:
            hf_logging.enable_progress_bar()
    tok.save_pretrained(path)
    relax_modes(path)  # safetensors writes 0600; the rest of the output follows the umask
    return path


def heldout_loss(model, tokenizer, records: list[Mapping], *, template: str = "chatml",
                 seed: int = 0) -> dict[str, float]:
    """Mean loss per trained token (nats) of each language's held-out examples, in order of first appearance.

    Scored by :func:`mlmix.eval.heldout_loss` (the assistant's answer and end-of-turn token, as trained), with the
    examples cut to the demo's sequence length at the end of the response, as in training.
    """
    from .eval.loss import encode_eval_set
    from .eval.loss import heldout_loss as eval_heldout_loss

    langs = list(dict.fromkeys(r["lang"] for r in records))
    evalset = encode_eval_set(records, tokenizer, languages=langs, template=template, max_length=SEQ_LEN,
                              truncation="truncate_response_right")
    scores = eval_heldout_loss(model, evalset, seed=seed, fused="auto" if _fused_loss() is not None else "never")
    return {lang: scores["languages"][lang]["loss"] for lang in langs}


# ---- report additions ----------------------------------------------------------------------------
def _demo_section(result: Mapping) -> str:
    from .report import bar_chart, esc, html_table, line_chart

    langs = list(result["heldout"]["english_only"])
    losses = {name: result["train_loss"][name] for name in TRAINED}
    parts = ["<h2>Demo: English-only against the pinch</h2>",
             f'<p class="note">The same tiny causal LM ({result["params"]:,} parameters, randomly initialised) '
             f'trained for {result["steps"]} steps of {BATCH_SIZE} x {SEQ_LEN} tokens on each mixture; '
             f'data loaded with {esc(result["loader"])}, loss by {esc(result["loss"])}. Seed {result["seed"]}: one '
             'draw of the mixture, the initialisation and the batch order; <code>python examples/demo_seeds.py</code> '
             'measures the spread over seeds.</p>']
    parts.append("<figure>" + line_chart(losses, title="Training loss", xlabel="step", ylabel="loss (nats/token)")
                 + "</figure>")
    series = [(name.replace("_", " "), [result["heldout"][name][l] for l in langs]) for name in TRAINED]
    parts.append("<figure>" + bar_chart(langs, series, title="Held-out loss per language (lower is better)",
                                        ylabel="nats/token", value_format=".3f") + "</figure>")
    rows = [[l, f"{result['heldout']['english_only'][l]:.3f}", f"{result['heldout']['pinch'][l]:.3f}",
             f"{result['heldout']['pinch'][l] - result['heldout']['english_only'][l]:+.3f}"] for l in langs]
    parts.append(html_table(["language", "English-only", "pinch", "difference"], rows))
    return "".join(parts)


# ---- main ----------------------------------------------------------------------------------------
def run(out: str, *, seed: int = 0, steps: int = DEFAULT_STEPS, quiet: bool = False, verbose: bool = False) -> dict:
    """Run the demo into directory ``out``; returns its results (also written to ``out/demo.json``)."""
    from ._deps import require

    require("torch", "the demo's training")
    require("transformers", "the demo's tiny model")
    import torch

    from . import data
    from .engine import build, load_tokenizer

    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    say = _Printer(quiet)
    t_start = time.perf_counter()
    from ._outputs import claim_directory

    out = claim_directory(out, "demo", arg="out")
    torch.manual_seed(seed)

    train_recs = data.demo_records(split="train")
    heldout = data.demo_records(split="heldout")
    langs = list(data.DEMO_LANGUAGES)
    say(f"mlmix demo: {len(train_recs) // len(langs)} training and {len(heldout) // len(langs)} held-out "
        f"instruction/response sources, each in {len(langs)} languages ({', '.join(langs)})")

    tok_path = os.path.join(out, "tokenizer.json")
    texts = [f"{r['instruction']}\n{r['response']}" for r in train_recs]
    train_bpe(texts, VOCAB_SIZE, tok_path, seed=seed)
    tcfg = {"path": tok_path, "template": "chatml", "train_on": "all_assistant"}
    tokenizer = load_tokenizer(tcfg)
    vocab_size = tokenizer.vocab_size
    say(f"tokenizer: byte-level BPE trained on the training split, {vocab_size:,} tokens, ChatML template")

    summaries = {}
    for name, mixture in MIXTURES.items():
        cfg = {
            "output": os.path.join(out, name),
            "cache_dir": os.path.join(out, "cache"),
            "seed": seed,
            "sources": [{"path": os.path.join(_demo_data_dir(), "*.jsonl"), "where": {"split": "train"}}],
            "langid": {"backend": "none"},
            "dedup": {"exact": True, "near": True},
            "mixture": dict(mixture),
            "tokenizer": {"path": tok_path, "template": "chatml"},
            "pack": {"seq_len": SEQ_LEN, "overlong": "truncate"},
            "report": False,
        }
        say(f"\nbuilding mixture {name} ({', '.join(f'{k}={v}' for k, v in mixture.items())})")
        summaries[name] = build(cfg, quiet=quiet or not verbose, progress=False)
        s = summaries[name]
        say(f"  {s['examples']} examples, {s['tokens']:,} tokens, {s['sequences']} sequences of {SEQ_LEN} "
            f"({s['efficiency']:.1%} full)")

    say("\nexamples per language in each mixture:")
    say(f"  {'lang':<6}" + "".join(f"{n:>14}" for n in MIXTURES))
    for lang in langs:
        say(f"  {lang:<6}" + "".join(f"{summaries[n]['langs'].get(lang, 0):>14}" for n in MIXTURES))
    say(f"  {'total':<6}" + "".join(f"{summaries[n]['examples']:>14}" for n in MIXTURES))

    _, loss_name = _loss_fn()
    _, loader_name = _batches(summaries["pinch"]["store"], seed)
    say(f"\ntraining the same tiny LM twice, {steps} steps of {BATCH_SIZE} x {SEQ_LEN} tokens each, on the CPU")
    say(f"  loader: {loader_name}\n  loss:   {loss_name}")
    models, curves = {}, {}
    for name in TRAINED:
        models[name], curves[name] = train(summaries[name]["store"], vocab_size, steps, seed, say, name)
    n_params = sum(p.numel() for p in models["pinch"].parameters())
    saved = {name: save_model(models[name], tok_path, os.path.join(out, MODELS_DIR, name)) for name in TRAINED}

    say("\nheld-out loss per language (nats per trained token; lower is better):")
    results = {name: heldout_loss(models[name], tokenizer, heldout, template=tcfg["template"], seed=seed)
               for name in TRAINED}
    say(f"  {'lang':<6}{'English-only':>14}{'pinch':>10}{'change':>10}")
    for lang in langs:
        a, b = results["english_only"][lang], results["pinch"][lang]
        say(f"  {lang:<6}{a:>14.3f}{b:>10.3f}{b - a:>+10.3f}")
    better = [l for l in langs if results["pinch"][l] < results["english_only"][l]]
    others = [l for l in langs if l != "en"]
    say(f"  on seed {seed} the pinch ({N_PINCH} non-English examples of {summaries['pinch']['examples']}, one per "
        f"language) lowers held-out loss in {sum(l in better for l in others)}\n  of the {len(others)} other "
        f"languages and changes English by {results['pinch']['en'] - results['english_only']['en']:+.3f} (it has "
        f"{N_PINCH} fewer English examples); one seed is\n  one draw: python examples/demo_seeds.py measures the "
        "spread over seeds (README)")

    result = {
        "out": out, "seed": seed, "steps": steps, "params": n_params, "loader": loader_name, "loss": loss_name,
        "mixtures": {n: summaries[n]["langs"] for n in MIXTURES},
        "stores": {n: summaries[n]["store"] for n in MIXTURES},
        "train_loss": curves, "heldout": results, "improved_languages": better, "models": saved,
    }
    from .report import render_comparison

    report_path = os.path.join(out, "report.html")
    html_text = render_comparison({n: summaries[n]["output"] for n in MIXTURES}, extra_sections=_demo_section(result),
                                  title="mlmix demo: a pinch of multilinguality")
    from ._atomic import atomic_file

    with atomic_file(report_path, "wb") as f:
        f.write(html_text.encode("utf-8"))
    result["report"] = report_path
    result["seconds"] = time.perf_counter() - t_start
    with atomic_file(os.path.join(out, "demo.json"), "wb") as f:
        f.write(json.dumps(result, indent=1).encode("utf-8"))
    say(f"\nmodels: {', '.join(saved.values())}\n  (transformers model directories; examples/eval.toml evaluates "
        "those of the default --out, mlmix-demo)")
    say(f"report: {report_path}")
    say(f"done in {result['seconds']:.0f}s")
    return result


def main(args: argparse.Namespace) -> int:
    result = run(args.out, seed=args.seed, steps=args.steps or DEFAULT_STEPS, quiet=args.quiet or args.json,
                 verbose=args.verbose)
    if args.json:
        print(json.dumps({k: v for k, v in result.items() if k != "train_loss"}, indent=2))
    return 0
