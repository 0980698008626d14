"""Per-language held-out loss and perplexity of a causal LM, with bootstrap confidence intervals.

The loss of an example is the sum of its per-token cross-entropies (nats) over the tokens its loss mask
trains (the assistant's answer and end-of-turn token, as in training); a language's loss is the token-weighted
mean over its examples, ``sum(loss) / sum(tokens)``, and its perplexity ``exp(loss)``. The interval resamples
examples (not tokens) within the language, since tokens of one answer are not independent.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Optional, Sequence

import numpy as np

from ..ragged import Ragged
from .stats import DEFAULT_ALPHA, DEFAULT_BOOTSTRAP, bootstrap_ci, check_ci_args, rng_for

__all__ = ["EvalSet", "encode_eval_set", "heldout_loss", "example_losses", "store_loss", "to_messages"]

# config attributes of transformers models whose logits are not plain ``hidden @ W.T + b``; such models are
# scored through their own logits instead of the fused loss
_LOGIT_POSTPROCESS = ("logit_scale", "logits_scaling", "output_multiplier_scale", "logit_scaling")


def to_messages(record: Mapping) -> Optional[list[dict]]:
    """The conversation of an evaluation record: ``messages`` as they are, else ``instruction`` (+ ``input``)
    or ``prompt`` as the user turn and ``response`` / ``output`` / ``completion`` as the assistant turn.
    None when the record has neither shape."""
    if "messages" in record:
        return record["messages"]
    prompt = record.get("instruction", record.get("prompt"))
    if isinstance(prompt, str) and isinstance(record.get("input"), str) and record["input"]:
        prompt = f"{prompt}\n\n{record['input']}"
    answer = next((record[k] for k in ("response", "output", "completion") if k in record), None)
    if not isinstance(prompt, str) or not isinstance(answer, str):
        return None
    return [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]


@dataclass
class EvalSet:
    """Tokenized evaluation examples, grouped by language.

    Attributes:
        tokens: Ragged uint32, one sequence per example.
        loss_mask: Ragged uint8 with the offsets of ``tokens``; 1 on the tokens whose prediction is scored.
        langs: language code of each example (len == len(tokens)).
        ids: the record's ``id`` (or its index in the input) of each example.
        languages: the languages reported, in order: the requested ones (even when no example is left for
            them) followed by any others present.
        skipped: language -> number of records that could not be encoded (bad shape, template error,
            nothing left to score after truncation); they are reported, not silently dropped.
    """

    tokens: Ragged
    loss_mask: Ragged
    langs: list[str]
    ids: list[str]
    languages: list[str]
    skipped: dict[str, int] = field(default_factory=dict)


def _check_lang(i: int, record: Any) -> str:
    if not isinstance(record, Mapping):
        raise TypeError(f"records[{i}] must be a dict with a 'lang' field, got {type(record).__name__}")
    lang = record.get("lang")
    if not isinstance(lang, str) or not lang:
        raise ValueError(f"records[{i}] must carry a language code in 'lang', got {lang!r}")
    return lang


def encode_eval_set(
    records: Sequence[Mapping],
    tokenizer,
    *,
    languages: Optional[Sequence[str]] = None,
    template: Any = "auto",
    max_length: Optional[int] = None,
    truncation: str = "truncate_prompt_left",
) -> EvalSet:
    """Tokenize evaluation records (each with ``lang``; see :func:`to_messages` for the shapes) with a chat
    template and the assistant-only loss mask.

    Args:
        tokenizer: an :class:`mlmix.Tokenizer`, or a fast transformers tokenizer (wrapped with
            ``mlmix.Tokenizer.from_hf``).
        languages: the languages to report, in order. Records of other languages are left out; a requested
            language without records is still reported (n = 0). None: every language present, in order of
            first appearance.
        max_length, truncation: as in :meth:`mlmix.Tokenizer.encode_chat`; cut records are still scored,
            records with nothing left to score are counted in ``skipped``.
    """
    if isinstance(records, (str, bytes, Mapping)):
        raise TypeError(f"records must be a sequence of dicts, got {type(records).__name__}")
    if languages is not None:
        if isinstance(languages, str):
            raise ValueError(f"languages must be a list of language codes, got the string {languages!r}")
        languages = list(dict.fromkeys(languages))
    tok = _as_mlmix_tokenizer(tokenizer)
    wanted = None if languages is None else set(languages)
    order: list[str] = list(languages or [])
    convs, langs, ids = [], [], []
    skipped: dict[str, int] = {}
    for i, rec in enumerate(records):
        lang = _check_lang(i, rec)
        if wanted is not None and lang not in wanted:
            continue
        if lang not in order:
            order.append(lang)
        msgs = to_messages(rec)
        if msgs is None:
            skipped[lang] = skipped.get(lang, 0) + 1
            continue
        convs.append(msgs)
        langs.append(lang)
        ids.append(str(rec.get("id", i)))
    kwargs: dict[str, Any] = {"template": template, "on_error": "skip"}
    if max_length is not None:
        kwargs.update(max_length=max_length, truncation=truncation)
    enc = tok.encode_chat(convs, **kwargs)
    kept = [int(i) for i in np.asarray(enc.index)]
    for j in sorted(set(range(len(convs))) - set(kept)):
        skipped[langs[j]] = skipped.get(langs[j], 0) + 1
    tokens, mask = enc.tokens, enc.loss_mask
    # a sequence whose only trained token is its first has no scored prediction: skipped, not a 0/0
    keep = [k for k in range(len(kept)) if int(np.asarray(mask[k])[1:].sum()) > 0]
    for k in sorted(set(range(len(kept))) - set(keep)):
        skipped[langs[kept[k]]] = skipped.get(langs[kept[k]], 0) + 1
    if len(keep) != len(kept):
        tokens, mask = tokens.take(keep), mask.take(keep)
    kept = [kept[k] for k in keep]
    return EvalSet(tokens=tokens.astype(np.uint32), loss_mask=mask.astype(np.uint8),
                   langs=[langs[j] for j in kept], ids=[ids[j] for j in kept], languages=order, skipped=skipped)


def _as_mlmix_tokenizer(tokenizer):
    if hasattr(tokenizer, "encode_chat"):
        return tokenizer
    from ..tokenize import Tokenizer

    return Tokenizer.from_hf(tokenizer)


# ---------------------------------------------------------------------------------------------------------
# scoring


def _per_token_losses_fn(model, fused: str) -> tuple[Callable, str]:
    """``fn(input_ids, attention_mask, labels) -> (B, T) float losses`` (position t scored against
    ``labels[:, t + 1]``, 0 where ignored) and a description of the route taken."""
    import torch

    if fused not in ("auto", "always", "never"):
        raise ValueError(f"fused must be 'auto', 'always' or 'never', got {fused!r}")
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    decoder = None
    if head is not None:
        get_decoder = getattr(model, "get_decoder", None)
        decoder = get_decoder() if callable(get_decoder) else getattr(model, "base_model", None)
        if decoder is model:
            decoder = None
    config = getattr(model, "config", None)
    plain_head = isinstance(head, torch.nn.Linear) and not any(
        getattr(config, a, None) not in (None, 1, 1.0) for a in _LOGIT_POSTPROCESS)
    softcap = getattr(config, "final_logit_softcapping", None)

    def from_logits(logits, labels):
        logits = logits[:, :-1].float()
        out = torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1), ignore_index=-100, reduction="none")
        out = out.reshape(labels.shape[0], -1)
        return torch.cat([out, out.new_zeros(labels.shape[0], 1)], dim=1)

    def from_hidden(hidden, weight, bias, labels):
        from ..torch import linear_cross_entropy

        return linear_cross_entropy(hidden, weight, labels, bias=bias, shift=True, reduction="none",
                                    softcap=softcap).float()

    if head is not None and decoder is not None and plain_head and fused != "never":
        def fused_fn(input_ids, attention_mask, labels, **kw):
            out = decoder(input_ids=input_ids, attention_mask=attention_mask, **kw)
            hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
            return from_hidden(hidden, head.weight, head.bias, labels)

        return fused_fn, "fused linear cross-entropy (mlmix.torch.linear_cross_entropy) on the model's hidden states"
    if head is not None:  # a transformers-style model whose head is not a plain linear layer, or fused="never"
        if fused == "always":
            raise ValueError("fused='always' needs a model whose output head is a plain torch.nn.Linear with no "
                             "logit scaling; this model's is not (use fused='auto')")

        def logits_fn(input_ids, attention_mask, labels, **kw):
            return from_logits(model(input_ids=input_ids, attention_mask=attention_mask, **kw).logits, labels)

        return logits_fn, "the model's logits with torch cross-entropy"

    def callable_fn(input_ids, attention_mask, labels):
        out = model(input_ids, attention_mask)
        if isinstance(out, tuple) and len(out) == 2:
            hidden, weight = out
            if fused == "never":
                return from_logits((hidden @ weight.T).float(), labels)
            return from_hidden(hidden, weight, None, labels)
        if isinstance(out, torch.Tensor) and out.dim() == 3:
            if fused == "always":
                raise ValueError("fused='always' needs the callable to return (hidden, lm_head_weight), "
                                 "it returned logits")
            return from_logits(out, labels)
        raise TypeError("a plain model callable must return logits (batch, seq, vocab) or a tuple "
                        f"(hidden (batch, seq, H), lm_head_weight (vocab, H)), got {type(out).__name__}")

    if not callable(model):
        raise TypeError(f"model must be a transformers causal LM or a callable, got {type(model).__name__}")
    return callable_fn, "the callable's output (fused loss for (hidden, weight), torch cross-entropy for logits)"


def _batches(lengths: np.ndarray, batch_tokens: int, max_batch: int) -> list[np.ndarray]:
    """Example indices grouped longest first so that each padded batch holds at most ``batch_tokens``."""
    order = np.argsort(-lengths, kind="stable")
    batches, start = [], 0
    while start < len(order):
        longest = max(int(lengths[order[start]]), 1)
        size = max(1, min(max_batch, batch_tokens // longest))
        batches.append(order[start:start + size])
        start += size
    return batches


def example_losses(
    model,
    evalset: EvalSet,
    *,
    batch_tokens: int = 16384,
    max_batch: int = 64,
    fused: str = "auto",
    pad_id: int = 0,
) -> tuple[np.ndarray, np.ndarray, str]:
    """Summed loss (float64, nats) and scored-token count (int64) of each example, and the route taken.

    Batches are right-padded (attention mask 0 on padding) and sorted by length; an example's loss does not
    depend on which batch it lands in beyond floating-point rounding.

    Args:
        model: a transformers causal LM (its decoder's last hidden state and output head go through
            :func:`mlmix.torch.linear_cross_entropy`, so no (tokens x vocab) logits are materialised), or a
            callable ``f(input_ids (B, T) int64, attention_mask (B, T) int64)`` returning logits
            (B, T, V) or a tuple ``(hidden (B, T, H), lm_head_weight (V, H))``.
        batch_tokens: padded tokens per forward pass. fused: ``"auto"`` (fused when the model allows),
            ``"always"`` (error if not possible) or ``"never"`` (materialised logits).
    """
    import torch

    if isinstance(batch_tokens, bool) or not isinstance(batch_tokens, int) or batch_tokens < 1:
        raise ValueError(f"batch_tokens must be an int >= 1, got {batch_tokens!r}")
    if isinstance(max_batch, bool) or not isinstance(max_batch, int) or max_batch < 1:
        raise ValueError(f"max_batch must be an int >= 1, got {max_batch!r}")
    fn, route = _per_token_losses_fn(model, fused)
    params = list(model.parameters()) if hasattr(model, "parameters") else []
    device = params[0].device if params else torch.device("cpu")
    n = len(evalset.tokens)
    sums = np.zeros(n, dtype=np.float64)
    counts = np.zeros(n, dtype=np.int64)
    lengths = evalset.tokens.lengths.astype(np.int64)
    was_training = getattr(model, "training", False)
    if hasattr(model, "eval"):
        model.eval()
    try:
        with torch.inference_mode():
            for idx in _batches(lengths, batch_tokens, max_batch):
                width = int(lengths[idx].max())
                ids = torch.full((len(idx), width), pad_id, dtype=torch.int64)
                attn = torch.zeros((len(idx), width), dtype=torch.int64)
                labels = torch.full((len(idx), width), -100, dtype=torch.int64)
                for row, i in enumerate(idx):
                    t = torch.from_numpy(evalset.tokens[int(i)].astype(np.int64))
                    m = torch.from_numpy(evalset.loss_mask[int(i)].astype(bool))
                    ids[row, : len(t)] = t
                    attn[row, : len(t)] = 1
                    labels[row, : len(t)] = torch.where(m, t, torch.full_like(t, -100))
                per_token = fn(ids.to(device), attn.to(device), labels.to(device)).double().cpu()
                scored = labels[:, 1:] != -100
                sums[idx] = per_token[:, :-1].mul(scored).sum(1).numpy()
                counts[idx] = scored.sum(1).numpy()
    finally:
        if was_training and hasattr(model, "train"):
            model.train()
    return sums, counts, route


def heldout_loss(
    model,
    evalset: EvalSet,
    *,
    n_bootstrap: int = DEFAULT_BOOTSTRAP,
    alpha: float = DEFAULT_ALPHA,
    seed: int = 0,
    batch_tokens: int = 16384,
    max_batch: int = 64,
    fused: str = "auto",
    pad_id: int = 0,
) -> dict:
    """Loss (nats per scored token) and perplexity of each language, with percentile bootstrap intervals.

    Returns ``{"route": str, "n_bootstrap": B, "alpha": alpha, "seed": seed, "languages": {lang: {...}}}``
    where each language has ``n`` (examples scored), ``skipped`` (records that could not be encoded),
    ``tokens``, ``loss``, ``loss_ci`` ``[lo, hi]``, ``ppl`` and ``ppl_ci`` (``exp`` of the loss bounds).
    A language with no examples has n = 0 and NaN scores (``null`` in JSON), never an error.
    Per language, the B resamples draw n examples with replacement from a generator seeded by
    (``seed``, language), and the interval is the (alpha/2, 1 - alpha/2) quantiles of the B resampled losses.
    """
    check_ci_args(n_bootstrap, alpha)
    sums, counts, route = example_losses(model, evalset, batch_tokens=batch_tokens, max_batch=max_batch,
                                         fused=fused, pad_id=pad_id)
    return summarize_losses(evalset, sums, counts, route=route, n_bootstrap=n_bootstrap, alpha=alpha, seed=seed)


def summarize_losses(evalset: EvalSet, sums: np.ndarray, counts: np.ndarray, *, route: str,
                     n_bootstrap: int, alpha: float, seed: int) -> dict:
    langs = np.asarray(evalset.langs, dtype=object)
    out: dict[str, dict] = {}
    for lang in evalset.languages:
        sel = np.flatnonzero(langs == lang) if len(langs) else np.zeros(0, dtype=np.int64)
        s, c = sums[sel], counts[sel]
        tokens = int(c.sum())
        loss = float(s.sum() / tokens) if tokens else math.nan
        lo, hi = bootstrap_ci((s, c), lambda ss, cc: ss.sum(1) / np.maximum(cc.sum(1), 1),
                              n_bootstrap=n_bootstrap, alpha=alpha, rng=rng_for(seed, lang))
        out[lang] = {
            "n": int(len(sel)), "skipped": int(evalset.skipped.get(lang, 0)), "tokens": tokens,
            "loss": loss, "loss_ci": [lo, hi],
            "ppl": _exp(loss), "ppl_ci": [_exp(lo), _exp(hi)],
        }
    return {"route": route, "n_bootstrap": n_bootstrap, "alpha": alpha, "seed": seed, "languages": out}


def _exp(x: float) -> float:
    if math.isnan(x):
        return math.nan
    return math.exp(x) if x < 700 else math.inf


# ---------------------------------------------------------------------------------------------------------
# packed stores, through mlmix's loader


def _block_causal_mask(position_ids, dtype):
    """(B, 1, T, T) additive mask: causal within each packed example (position_ids restart at 0), nothing
    across examples, so packed examples are scored exactly as if each were alone."""
    import torch

    seg = (position_ids == 0).cumsum(-1)
    t = position_ids.shape[-1]
    causal = torch.ones(t, t, dtype=torch.bool, device=position_ids.device).tril()
    allowed = (seg[:, :, None] == seg[:, None, :]) & causal
    mask = torch.zeros(allowed.shape, dtype=dtype, device=position_ids.device)
    mask.masked_fill_(~allowed, torch.finfo(dtype).min)
    return mask[:, None]


def store_loss(
    model,
    store,
    *,
    batch_size: int = 8,
    n_bootstrap: int = DEFAULT_BOOTSTRAP,
    alpha: float = DEFAULT_ALPHA,
    seed: int = 0,
    languages: Optional[Sequence[str]] = None,
    fused: str = "auto",
) -> dict:
    """Per-language loss and perplexity over a packed store (``mlmix.write_store(..., langs=...)``), read with
    :class:`mlmix.torch.PackedDataset` in store order and scored with the fused loss.

    Each row's examples are kept apart with a block-diagonal causal mask built from ``position_ids``, so an
    example's loss is what it would be alone. Examples are the store's segments: build evaluation stores
    without splitting (``strategy="bfd"``), or a split example counts as two. ``model`` must be a transformers
    causal LM that accepts a 4-D attention mask and ``position_ids``. Returns what :func:`heldout_loss` does
    (``skipped`` is 0: a store holds no unencodable records).
    """
    import torch

    from ..torch import PackedDataset

    check_ci_args(n_bootstrap, alpha)
    if not hasattr(model, "get_output_embeddings"):
        raise TypeError(f"model must be a transformers causal LM for packed rows, got {type(model).__name__}")
    fn, route = _per_token_losses_fn(model, fused)
    ds = PackedDataset(store, batch_size=batch_size, shuffle=False, rank=0, world_size=1, languages="token")
    if not ds.languages:
        raise ValueError("store: this store has no languages; write it with mlmix.write_store(..., langs=[...])")
    params = list(model.parameters())
    device = params[0].device
    dtype = params[0].dtype if params[0].is_floating_point() else torch.float32
    sums, counts, lang_of = [], [], []
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            for batch in ds:
                ids, labels, pos = (batch[k].to(device) for k in ("input_ids", "labels", "position_ids"))
                per_token = fn(ids, _block_causal_mask(pos, dtype), labels, position_ids=pos).double().cpu()
                labels, pos, lang_ids = labels.cpu(), pos.cpu(), batch["lang_ids"]
                scored = labels[:, 1:] != -100          # position t predicts token t + 1
                seg = (pos == 0).cumsum(-1)[:, 1:]      # the example of token t + 1
                rows = torch.arange(ids.shape[0])[:, None].expand_as(seg)
                key = (rows * (seg.max() + 1) + seg)[scored].numpy()
                uniq, first, inv = np.unique(key, return_index=True, return_inverse=True)
                sums.append(np.bincount(inv, weights=per_token[:, :-1][scored].numpy(), minlength=len(uniq)))
                counts.append(np.bincount(inv, minlength=len(uniq)))
                lang_of.append(lang_ids[:, 1:][scored].numpy()[first])
    finally:
        if was_training:
            model.train()
    table = list(ds.languages)
    codes = np.concatenate(lang_of) if lang_of else np.zeros(0, dtype=np.int64)
    langs = [table[int(c)] for c in codes]
    order = list(dict.fromkeys(languages)) if languages is not None else list(dict.fromkeys(langs))
    evalset = EvalSet(tokens=Ragged.from_lists([]), loss_mask=Ragged.from_lists([]), langs=langs,
                      ids=[str(i) for i in range(len(langs))], languages=order)
    cat = (lambda parts, dt: np.concatenate(parts).astype(dt) if parts else np.zeros(0, dtype=dt))
    out = summarize_losses(evalset, cat(sums, np.float64), cat(counts, np.int64), route=route + ", packed rows "
                           "read with mlmix.torch.PackedDataset", n_bootstrap=n_bootstrap, alpha=alpha, seed=seed)
    return out
