"""A tokenizer's id -> token table and its fingerprint, shared by mlmix.tokenize and mlmix.store.

``mlmix.tokenize.vocab_fingerprint`` is the public entry point (it documents what the fingerprint means);
``Store.check_tokenizer`` reads the table itself, to say how many ids a tokenizer has before comparing.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Optional

import numpy as np

from ._deps import require

__all__ = ["vocab_of", "fingerprint_vocab"]


def fingerprint_vocab(by_id: dict, num_ids: Optional[int]) -> dict:
    """``{"num_ids": N, "vocab_sha256": hex}`` of an ``{id: token}`` table over ids [0, N) (N: ``num_ids``,
    or the highest id + 1)."""
    n = max(by_id, default=-1) + 1 if num_ids is None else int(num_ids)
    table = [[i, by_id[i]] for i in sorted(by_id) if i < n]
    text = json.dumps(table, ensure_ascii=False, separators=(",", ":"))
    return {"num_ids": n, "vocab_sha256": hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()}


def vocab_of(tokenizer) -> dict:
    """A tokenizer's ``{id: token}`` table (see vocab_fingerprint for what ``tokenizer`` may be)."""
    if isinstance(tokenizer, (str, os.PathLike)):
        path = os.fspath(tokenizer)
        if os.path.isdir(path):
            path = os.path.join(path, "tokenizer.json")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"tokenizer: {os.fspath(tokenizer)!r} is neither a tokenizer.json nor a "
                                    "directory holding one")
        tokenizers = require("tokenizers", "vocab_fingerprint")
        try:
            tokenizer = tokenizers.Tokenizer.from_file(path)
        except Exception as exc:  # the Rust loader's own message says what is wrong with the file
            raise ValueError(f"tokenizer: {path!r} is not a readable tokenizer.json: {exc}") from None
    from .tokenize import Tokenizer  # here, not above: mlmix.tokenize imports this module

    if isinstance(tokenizer, Tokenizer):
        tokenizer = tokenizer.backend
    get_vocab = getattr(tokenizer, "get_vocab", None)
    vocab = get_vocab() if callable(get_vocab) else None
    if not isinstance(vocab, dict):
        raise TypeError("tokenizer must be an mlmix.Tokenizer, a tokenizers.Tokenizer, a transformers tokenizer or "
                        f"a path to a tokenizer.json, got {type(tokenizer).__name__}")
    by_id: dict[int, str] = {}
    for token, i in vocab.items():
        if isinstance(i, bool) or not isinstance(i, (int, np.integer)) or i < 0 or not isinstance(token, str):
            raise ValueError(f"tokenizer: its vocabulary maps {token!r} to {i!r}; expected str tokens and ids >= 0")
        if by_id.setdefault(int(i), token) != token:
            raise ValueError(f"tokenizer: ids must be unique, id {int(i)} is both {by_id[int(i)]!r} and {token!r}")
    return by_id
