"""Stage ``tokenize``: every record with the chat template and its loss mask.

It runs before dedup and mixing (their keys do not feed it) so that changing a recipe or a dedup
threshold, the common iteration, never re-tokenizes, and so that the report can count tokens per
language at every stage exactly. A record the truncation policy drops comes back empty (length 0) and
is excluded downstream.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence

import numpy as np

from ...cache import stage_key
from ...ragged import Ragged
from ..log import rate

VERSION = 2
ENCODER_COUNTS = ("truncated", "dropped_too_long", "tokens_removed")


def key(k_read: str, tcfg: Mapping) -> str:
    return stage_key("tokenize", VERSION, k_read, tcfg, fingerprint(tcfg))


def load_tokenizer(tcfg: Mapping):
    """The mlmix.Tokenizer a config's ``tokenizer`` section names."""
    from ...tokenize import Tokenizer

    if "name" in tcfg:
        return Tokenizer.qwen(tcfg["name"])
    if "path" in tcfg:
        if not os.path.isfile(tcfg["path"]):
            raise FileNotFoundError(f"tokenizer.path: {tcfg['path']!r} is not a file (expected a tokenizer.json)")
        return Tokenizer.from_file(tcfg["path"])
    if "pretrained" in tcfg:
        if not os.path.isdir(tcfg["pretrained"]):
            raise FileNotFoundError(f"tokenizer.pretrained: {tcfg['pretrained']!r} is not a local model directory")
        return Tokenizer.from_pretrained(tcfg["pretrained"])
    tk = tcfg["tiktoken"]
    return Tokenizer.from_tiktoken(tk["path"], tk["pattern"], tk["special_tokens"])


def fingerprint(tcfg: Mapping) -> list:
    """What identifies the tokenizer's files for the cache: (path, size, mtime_ns) of each."""
    if "name" in tcfg:
        return []
    if "tiktoken" in tcfg:
        key, path = "tiktoken.path", tcfg["tiktoken"]["path"]
    else:
        key = "path" if "path" in tcfg else "pretrained"
        path = tcfg[key]
    if not os.path.exists(path):
        raise FileNotFoundError(f"tokenizer.{key}: {path!r} does not exist")
    files = [path] if os.path.isfile(path) else sorted(
        os.path.join(r, f) for r, _, names in os.walk(path) for f in names)
    return [[f, os.stat(f).st_size, os.stat(f).st_mtime_ns] for f in files]


def encode_records(tokenizer, records: Sequence[Mapping], tcfg: Mapping) -> tuple[Ragged, Ragged, dict]:
    """Tokens (uint32) and loss masks (uint8) of canonical records, one per record in order, and the
    encoder's counts. A record the truncation policy drops comes back empty (length 0)."""
    enc = tokenizer.encode_records(list(records), format="auto", on_error="raise", **_options(tcfg))
    return _per_record(enc, len(records))


def encode_block(tokenizer, block, tcfg: Mapping) -> tuple[Ragged, Ragged, dict]:
    """:func:`encode_records` of a :class:`mlmix.recblock.RecordBlock`: the whole block in the C++ core
    (chat assembly, BPE, masks) where the tokenizer and template allow, with the same result."""
    encode = getattr(tokenizer, "encode_block", None)
    if encode is None:
        return encode_records(tokenizer, block.to_records(), tcfg)
    return _per_record(encode(block, **_options(tcfg)), len(block))


def _options(tcfg: Mapping) -> dict:
    return {"template": tcfg["template"], "train_on": tcfg["train_on"], "max_length": tcfg.get("max_length"),
            "truncation": tcfg["truncation"] if "max_length" in tcfg else None,
            "train_glue": tcfg.get("train_glue", "none")}


def _per_record(enc, n: int) -> tuple[Ragged, Ragged, dict]:
    st = enc.stats
    stats = {"truncated": int(st.truncated), "dropped_too_long": int(st.dropped_too_long),
             "tokens_removed": int(st.tokens_removed)}
    tokens, masks = enc.tokens.astype(np.uint32), enc.loss_mask.astype(np.uint8)
    if len(tokens) == n:
        return tokens, masks, stats
    # scatter around the records the policy dropped: they become empty examples, excluded downstream
    lengths = np.zeros(n, dtype=np.int64)
    lengths[np.asarray(enc.index, dtype=np.int64)] = tokens.lengths
    return (Ragged.from_lengths(tokens.values, lengths), Ragged.from_lengths(masks.values, lengths), stats)


def save_tokenizer(tokenizer, path: str) -> None:
    """Write the tokenizer as a tokenizer.json so that a store can be decoded later without its source."""
    with open(path, "w", encoding="utf-8") as f:
        f.write(tokenizer.backend.to_str())


def pad_id(tokenizer) -> int:
    """The id that pads packed rows: the EOS token's (labels are -100 there anyway), else 0."""
    for tok in (getattr(tokenizer, "eos_token", None), "<|endoftext|>"):
        if tok:
            i = tokenizer.token_to_id(tok)
            if i is not None:
                return int(i)
    return 0



def forget(tokenizer) -> None:
    """Drop the native encoder kept for this tokenizer (~200 MB for Qwen's) and hand freed heap back to
    the OS: the tokenizer was loaded for this stage only."""
    from ... import tokenize

    forget_native = getattr(tokenize, "forget_native_encoder", None)
    if forget_native is not None:
        forget_native(tokenizer)
    trim_heap()


def trim_heap() -> None:
    """Hand freed heap memory back to the OS (glibc keeps it otherwise, and it would count in RSS under
    every later stage); a no-op where malloc_trim does not exist."""
    import gc

    gc.collect()
    try:
        import ctypes

        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


def count(tokens: Ragged, masks: Ragged, stats: Mapping) -> dict:
    """The counts of one encoded block."""
    lengths = tokens.lengths
    out = {"examples": int((lengths > 0).sum()), "tokens": int(lengths.sum()),
           "loss_tokens": int(np.asarray(masks.values, dtype=np.uint8).sum(dtype=np.int64))}
    out.update({k: int(stats[k]) for k in ENCODER_COUNTS})
    return out


def merge(a: dict | None, b: dict) -> dict:
    if a is None:
        return dict(b)
    for k, v in b.items():
        a[k] += v
    return a


def finish(counts: dict | None, tokenizer) -> dict:
    from ...tokenize import vocab_fingerprint

    c = counts or dict.fromkeys(("examples", "tokens", "loss_tokens") + ENCODER_COUNTS, 0)
    return dict(c, pad_id=pad_id(tokenizer), vocab=vocab_fingerprint(tokenizer))


def summary(s: Mapping) -> str:
    """The tokenize summary: the encoding rate (the encoder's own time; reading, writing and loading the
    tokenizer apart), then the tokenizer's loading time when it is worth saying."""
    line = f"{s['examples']:,} examples, {s['tokens']:,} tokens ({s['loss_tokens']:,} trained)"
    if "encode_seconds" not in s:  # a cache entry from before the encoding was timed on its own
        return line + rate(s["tokens"], s["seconds"], "tok")
    line += rate(s["tokens"], s["encode_seconds"], "tok") + " encoding"
    if s.get("load_seconds", 0) >= 0.05:
        line += f"; tokenizer loaded in {s['load_seconds']:.1f}s"
    return line


