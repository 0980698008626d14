"""Responses of a transformers causal LM to instructions: chat template, left-padded batches, greedy or nucleus
sampling, seeded."""

from __future__ import annotations

from typing import Optional, Sequence

__all__ = ["generate", "left_padded", "chat_prompt"]


def chat_prompt(tokenizer, instruction: str, system: Optional[str] = None) -> str:
    """The text the model sees for one instruction: its chat template with the generation prompt, or the bare
    instruction and a newline for a tokenizer without a template."""
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": instruction}]
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return (f"{system}\n\n" if system else "") + instruction + "\n"


def _pad_id(tokenizer) -> int:
    for pid in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if pid is not None:
            return int(pid)
    return 0


def left_padded(tokenizer, texts: Sequence[str]):
    """(input_ids, attention_mask): int64 tensors (batch, longest), padded on the left, no special tokens added
    (the chat template already has them)."""
    import torch

    seqs = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    width = max((len(s) for s in seqs), default=0)
    ids = torch.full((len(seqs), width), _pad_id(tokenizer), dtype=torch.int64)
    attn = torch.zeros((len(seqs), width), dtype=torch.int64)
    for row, s in enumerate(seqs):
        if s:
            ids[row, width - len(s):] = torch.tensor(s, dtype=torch.int64)
            attn[row, width - len(s):] = 1
    return ids, attn


def generate(
    model,
    tokenizer,
    instructions: Sequence[str],
    *,
    system: Optional[str] = None,
    max_new_tokens: int = 256,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_p: float = 1.0,
    seed: int = 0,
    batch_size: int = 8,
) -> list[str]:
    """One response per instruction (decoded, special tokens removed, surrounding whitespace stripped).

    Greedy by default; ``do_sample=True`` draws with ``temperature`` and nucleus ``top_p``. Each batch seeds
    torch's generator with ``seed + batch index``, so a run is repeatable for a given ``batch_size`` (the draws,
    and with left padding possibly the rounding, depend on how instructions are batched). An empty response is
    returned as ``""``, never dropped: the fidelity and side-by-side reports count it.
    """
    import torch

    if isinstance(instructions, str):
        raise ValueError(f"instructions must be a list of strings, got the string {instructions!r}")
    bad = [i for i, s in enumerate(instructions) if not isinstance(s, str)]
    if bad:
        raise ValueError(f"instructions must be strings, got {type(instructions[bad[0]]).__name__} at index {bad[0]}")
    for name, v, lo in (("max_new_tokens", max_new_tokens, 1), ("batch_size", batch_size, 1)):
        if isinstance(v, bool) or not isinstance(v, int) or v < lo:
            raise ValueError(f"{name} must be an int >= {lo}, got {v!r}")
    if do_sample:
        if not isinstance(temperature, (int, float)) or not temperature > 0:
            raise ValueError(f"temperature must be > 0 when sampling, got {temperature!r}")
        if not isinstance(top_p, (int, float)) or not 0 < top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {top_p!r}")
    device = next(model.parameters()).device
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if eos is None:
        eos = tokenizer.eos_token_id
    kwargs = {"max_new_tokens": max_new_tokens, "do_sample": bool(do_sample), "pad_token_id": _pad_id(tokenizer)}
    if eos is not None:
        kwargs["eos_token_id"] = eos
    if do_sample:
        kwargs.update(temperature=float(temperature), top_p=float(top_p), top_k=0)
    else:  # explicit neutral values, so a model's sampling defaults do not leak into greedy decoding
        kwargs.update(temperature=None, top_p=None, top_k=None)
    was_training = model.training
    model.eval()
    out: list[str] = []
    try:
        for b, start in enumerate(range(0, len(instructions), batch_size)):
            chunk = instructions[start:start + batch_size]
            ids, attn = left_padded(tokenizer, [chat_prompt(tokenizer, s, system) for s in chunk])
            torch.manual_seed(seed + b)
            with torch.inference_mode():
                gen = model.generate(input_ids=ids.to(device), attention_mask=attn.to(device), **kwargs)
            for row in gen[:, ids.shape[1]:].cpu().tolist():
                out.append(tokenizer.decode(row, skip_special_tokens=True).strip())
    finally:
        if was_training:
            model.train()
    return out
