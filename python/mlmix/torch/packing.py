"""Does a model keep packed examples apart? A probe that answers before training does it wrong.

transformers separates the examples of a packed row by the restarts of ``position_ids`` (sdpa and eager
build a block-diagonal mask, flash-attention a varlen call) when no 2-D ``attention_mask`` and no cache
are in play. A model that does not (custom attention, remote code, an attention backend that ignores
positions) would let every example attend to the ones before it in its row and still train, with a
plausible loss. :func:`check_packed_attention` runs two short random examples packed in one row and
each on its own, in both of mlmix's layouts, and raises :class:`PackingError` if the second example's
logits differ: then train without packing, or with padding-free batches the model supports.
"""

from __future__ import annotations

import weakref

import torch

__all__ = ["PackingError", "check_packed_attention"]

_CHECKED: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


class PackingError(RuntimeError):
    """The model lets packed examples attend to each other: training on packed rows would be wrong."""


def _logits(model, **kwargs) -> torch.Tensor:
    out = model(**kwargs)
    logits = getattr(out, "logits", None)
    if logits is None:
        raise PackingError(f"check_packed_attention: {type(model).__name__} returned no logits for a call "
                           "without labels; it cannot be checked")
    return logits.float()


def check_packed_attention(model, *, lengths: tuple[int, int] = (7, 5), seed: int = 0, cache: bool = True) -> None:
    """Raise :class:`PackingError` unless ``model`` computes each example of a packed row as if alone.

    Runs in ``eval`` mode without gradients (the model's mode is restored), on the model's device and
    dtype, with batches shaped as mlmix gives them: flat ``(1, T)`` with ``cu_seq_lens_*`` and
    ``seq_idx``, and padded ``(2, L)``; ``use_cache=False``, no ``attention_mask``. With ``cache`` the
    answer is remembered per model object. Costs three forward passes over 12 to 24 tokens.
    """
    if cache and model in _CHECKED:
        return
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    vocab = int(getattr(getattr(model, "config", None), "vocab_size", 0) or 0)
    if vocab < 2:
        raise ValueError(f"check_packed_attention needs a model with config.vocab_size >= 2, got {vocab}")
    g = torch.Generator().manual_seed(seed)
    a, b = (torch.randint(0, vocab, (n,), generator=g) for n in lengths)
    ids = torch.cat([a, b])[None].to(device)
    pos = torch.cat([torch.arange(len(a)), torch.arange(len(b))])[None].to(device)
    cu = torch.tensor([0, len(a), len(a) + len(b)], dtype=torch.int32, device=device)
    seq_idx = torch.cat([torch.zeros(len(a)), torch.ones(len(b))]).to(torch.int32)[None].to(device)
    width = len(a) + len(b)
    padded_ids = torch.zeros((2, width), dtype=torch.long, device=device)
    padded_pos = torch.zeros((2, width), dtype=torch.long, device=device)
    padded_ids[0], padded_pos[0] = ids[0], pos[0]  # row 0: the packed pair; row 1: b alone, padded
    padded_ids[1, : len(b)], padded_pos[1, : len(b)] = b.to(device), torch.arange(len(b), device=device)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            alone = _logits(model, input_ids=b[None].to(device), position_ids=torch.arange(len(b), device=device)[None],
                            use_cache=False)[0]
            flat = _logits(model, input_ids=ids, position_ids=pos, cu_seq_lens_q=cu, cu_seq_lens_k=cu,
                           max_length_q=max(lengths), max_length_k=max(lengths), seq_idx=seq_idx,
                           use_cache=False)[0, len(a):]
            padded = _logits(model, input_ids=padded_ids, position_ids=padded_pos, use_cache=False)[0, len(a):]
    finally:
        model.train(was_training)
    low_precision = param is not None and param.dtype in (torch.float16, torch.bfloat16)
    tol = 5e-2 if low_precision else 1e-3
    scale = float(alone.abs().max()) or 1.0
    for name, got in (("flat", flat), ("padded", padded)):
        err = float((got - alone).abs().max()) / scale
        if not err <= tol:
            raise PackingError(
                f"{type(model).__name__} (attn_implementation="
                f"{getattr(getattr(model, 'config', None), '_attn_implementation', None)!r}) lets packed examples "
                f"attend to each other in the {name} layout: an example's logits differ by {err:.2e} (relative) "
                "between its packed row and a forward on its own. Training on packed rows would be silently "
                "wrong; use an attention implementation that honours position_ids (sdpa, eager, "
                "flash_attention_2) or train without packing")
    if cache:
        _CHECKED[model] = True
