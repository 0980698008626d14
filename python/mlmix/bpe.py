"""A native byte-level BPE encoder that reproduces HF ``tokenizers`` ids exactly, several times faster.

:class:`NativeBPE` loads the same ``tokenizer.json`` (or a tiktoken rank file through
:func:`mlmix._tiktoken.tiktoken_to_hf`) and encodes batches of documents on all cores with the GIL released,
straight into a :class:`~mlmix.Ragged` of uint32 ids. It covers the byte-level BPE tokenizers of the GPT-2,
Llama-3 and Qwen families; :func:`supported` says why any other tokenizer is not covered.

What is reproduced (tokenizers 0.23 semantics):

* added tokens split out of the raw text first (normalized=false ones, then normalized=true ones in the gaps,
  leftmost-longest), with their lstrip/rstrip flags; ``split_special_tokens=True`` encodes special tokens as
  text, like HF's ``encode_special_tokens``;
* the pre-tokenizer regex, by a hand-written scanner per recognised pattern (see ``PATTERNS``), with
  ``\\p{L}``/``\\p{N}``/``\\p{M}``/``\\s`` from Unicode 16.0, the version of the Oniguruma engine HF uses;
* ByteLevel's ``add_prefix_space``; merges by rank (lowest first, leftmost among equals); ``ignore_merges``;
* the post-processor's fixed ids (TemplateProcessing's single template) with ``add_special_tokens=True``;
* an NFC normalizer: documents the NFC quick check proves normalized are encoded natively, the others by HF
  ``tokenizers`` itself (kept for that), so ids stay exact.

Invalid input: a string with a lone surrogate raises ValueError (HF raises too: it cannot convert it).
"""

from __future__ import annotations

import json
import os
import unicodedata
from typing import Any, Mapping, Sequence

import numpy as np

from .ragged import Ragged

__all__ = ["NativeBPE", "Unsupported", "supported", "spec_of", "compile_spec", "PATTERNS", "PATTERN_ALIASES"]

# Pre-tokenizer regexes with a native scanner (csrc/pretokenize.h) -> (scanner id, family name).
_GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
PATTERNS: dict[str, tuple[int, str]] = {
    _GPT2: (0, "gpt2"),
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+": (
        1,
        "llama3",
    ),
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+": (
        2,
        "qwen2",
    ),
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+": (
        3,
        "qwen3.5",
    ),
    # cl100k_base as tiktoken spells it. HF's Oniguruma reads `\p{N}{1,3}+` as (?:\p{N}{1,3})+ (in its Ruby syntax
    # only ?+ *+ ++ are possessive), so whole digit runs are one piece: scanner 4 reproduces that, HF's ids.
    # (tiktoken cuts digit runs into threes; the Llama-3 spelling above is that grammar.)
    r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}++|\p{N}{1,3}+| ?[^\s\p{L}\p{N}]++[\r\n]*+|\s++$|\s*[\r\n]|\s+(?!\S)|\s""": (
        4,
        "cl100k-onig",
    ),
    # o200k_base (and o200k_harmony): case-aware words with their contractions, \p{N}{1,3}, '/' after punctuation
    "|".join(
        [
            r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
            r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
            r"""\p{N}{1,3}""",
            r""" ?[^\s\p{L}\p{N}]+[\r\n/]*""",
            r"""\s*[\r\n]+""",
            r"""\s+(?!\S)""",
            r"""\s+""",
        ]
    ): (5, "o200k"),
}
# Other spellings of the same grammars (same matches, so the same scanner; the name is the family's).
PATTERN_ALIASES: dict[str, int] = {
    # r50k/p50k/gpt2 as tiktoken spells them: possessive runs, \s++$ (a trailing run is one piece either way) and a
    # last \s where GPT-2 has \s+ (reached only by a single space before a non-space: one character either way)
    r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s""": 0,
    # GPT-2's with bracketed classes (tiktoken's comment)
    r"""'s|'t|'re|'ve|'m|'ll|'d| ?[\p{L}]+| ?[\p{N}]+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+""": 0,
}


class Unsupported(ValueError):
    """The tokenizer uses something the native encoder does not reproduce (the message says what)."""


def _load_json(tokenizer_json) -> dict:
    if isinstance(tokenizer_json, Mapping):
        return dict(tokenizer_json)
    if hasattr(tokenizer_json, "to_str") and callable(tokenizer_json.to_str):  # a tokenizers.Tokenizer
        return json.loads(tokenizer_json.to_str())
    if isinstance(tokenizer_json, (str, os.PathLike)):
        s = os.fspath(tokenizer_json)
        if isinstance(s, str) and s.lstrip().startswith("{"):
            return json.loads(s)
        if not os.path.isfile(s):
            raise FileNotFoundError(f"tokenizer_json: {s!r} is neither a JSON string nor an existing file")
        with open(s, encoding="utf-8") as f:
            return json.load(f)
    raise TypeError(
        "tokenizer_json must be a path, a JSON string, a dict or a tokenizers.Tokenizer, "
        f"got {type(tokenizer_json).__name__}"
    )


def _scanner_of(regex: str) -> int | None:
    """The native scanner id for a pre-tokenizer regex (a recognised spelling), or None."""
    if regex in PATTERNS:
        return PATTERNS[regex][0]
    return PATTERN_ALIASES.get(regex)


def _parse_pre_tokenizer(pt) -> tuple[int, bool]:
    """-> (scanner id, add_prefix_space) or raise Unsupported."""
    if pt is None:
        raise Unsupported("pre_tokenizer is null: a byte-level BPE needs ByteLevel (whole text as one piece is not supported)")
    kind = pt.get("type")
    if kind == "Sequence":
        items = pt.get("pretokenizers") or []
        if len(items) == 1:
            return _parse_pre_tokenizer(items[0])
        if len(items) == 2 and items[0].get("type") == "Split" and items[1].get("type") == "ByteLevel":
            split, bl = items
            pattern = split.get("pattern") or {}
            if "Regex" not in pattern:
                raise Unsupported(f"Split pattern {pattern!r} is a plain string, not one of the recognised regexes")
            regex = pattern["Regex"]
            scanner = _scanner_of(regex)
            if scanner is None:
                raise Unsupported(f"Split regex {regex!r} has no native scanner (recognised: {sorted(n for _, n in PATTERNS.values())})")
            if split.get("behavior") != "Isolated" or split.get("invert", False):
                raise Unsupported(
                    f"Split behavior {split.get('behavior')!r} with invert={split.get('invert')!r}: only Isolated, invert=false"
                )
            if bl.get("use_regex", True) or bl.get("add_prefix_space", False):
                raise Unsupported(
                    "a ByteLevel after Split must have use_regex=false and add_prefix_space=false, got "
                    f"use_regex={bl.get('use_regex', True)!r}, add_prefix_space={bl.get('add_prefix_space', False)!r}"
                )
            return scanner, False
        raise Unsupported(f"pre_tokenizer Sequence of {[p.get('type') for p in items]}: only [Split, ByteLevel] or [ByteLevel]")
    if kind == "ByteLevel":
        if not pt.get("use_regex", True):
            raise Unsupported("ByteLevel(use_regex=false) alone would keep the whole text as one piece: not supported")
        return 0, bool(pt.get("add_prefix_space", False))
    raise Unsupported(f"pre_tokenizer {kind!r} is not a byte-level pre-tokenizer (ByteLevel, or Split + ByteLevel)")


def _parse_normalizer(norm) -> bool:
    """-> whether the normalizer is NFC (None: False), or raise Unsupported."""
    if norm is None:
        return False
    kind = norm.get("type")
    if kind == "Sequence":
        inner = [n.get("type") for n in norm.get("normalizers") or []]
        if inner == []:
            return False
        if inner == ["NFC"]:
            return True
        raise Unsupported(f"normalizer Sequence of {inner}: only none or NFC is supported")
    if kind == "NFC":
        return True
    raise Unsupported(f"normalizer {kind!r}: only none or NFC is supported")


def _special_ids(post, added_by_content: dict[str, int]) -> tuple[list[int], list[int]]:
    """Fixed ids the post-processor puts before / after a single sequence, or raise Unsupported."""
    if post is None:
        return [], []
    kind = post.get("type")
    if kind == "ByteLevel":
        return [], []
    if kind == "Sequence":
        pre, suf = [], []
        for p in post.get("processors") or []:
            a, b = _special_ids(p, added_by_content)
            pre, suf = pre + a, b + suf
        return pre, suf
    if kind == "TemplateProcessing":
        specials = post.get("special_tokens") or {}
        pre, suf, seen_seq = [], [], False
        for piece in post.get("single") or []:
            if "Sequence" in piece:
                if piece["Sequence"].get("id") != "A" or seen_seq:
                    raise Unsupported(f"TemplateProcessing single template {post.get('single')!r}: only one $A")
                seen_seq = True
            elif "SpecialToken" in piece:
                name = piece["SpecialToken"]["id"]
                if name not in specials:
                    raise Unsupported(f"TemplateProcessing names special token {name!r} without ids")
                (suf if seen_seq else pre).extend(int(i) for i in specials[name]["ids"])
            else:
                raise Unsupported(f"TemplateProcessing piece {piece!r} is not understood")
        if not seen_seq:
            raise Unsupported("TemplateProcessing single template has no $A")
        return pre, suf
    raise Unsupported(f"post_processor {kind!r} is not supported (ByteLevel, TemplateProcessing, Sequence of them)")


def _parse(d: dict) -> dict[str, Any]:
    """tokenizer.json (as a dict) -> the arguments of the native encoder, or raise Unsupported."""
    if d.get("truncation") is not None:
        raise Unsupported("truncation is set: call no_truncation() first (mlmix truncates on its own terms)")
    if d.get("padding") is not None:
        raise Unsupported("padding is set: call no_padding() first")
    nfc = _parse_normalizer(d.get("normalizer"))
    model = d.get("model") or {}
    if model.get("type", "BPE") != "BPE" or "merges" not in model:
        raise Unsupported(f"model {model.get('type')!r} is not BPE (WordPiece, Unigram, WordLevel are not supported)")
    if model.get("dropout") not in (None, 0, 0.0):
        raise Unsupported(f"BPE dropout={model.get('dropout')!r} is random: not supported")
    if model.get("byte_fallback"):
        raise Unsupported("BPE byte_fallback=true (a SentencePiece-style BPE) is not supported")
    for key in ("continuing_subword_prefix", "end_of_word_suffix"):
        if model.get(key):
            raise Unsupported(f"BPE {key}={model[key]!r} is not supported")
    scanner, add_prefix_space = _parse_pre_tokenizer(d.get("pre_tokenizer"))

    vocab: dict[str, int] = model["vocab"]
    merges = model["merges"]
    if merges and isinstance(merges[0], str):  # the older "a b" form
        merges = [m.split(" ", 1) for m in merges]
    if any(len(m) != 2 for m in merges):
        raise Unsupported("model.merges must be pairs of tokens")
    added, added_by_content = [], {}
    for t in d.get("added_tokens") or []:
        if t.get("single_word"):
            raise Unsupported(f"added token {t['content']!r} has single_word=true: not supported")
        if nfc and t.get("normalized") and unicodedata.normalize("NFC", t["content"]) != t["content"]:
            raise Unsupported(f"added token {t['content']!r} is matched after NFC but is not itself in NFC")
        added.append(
            (t["content"], int(t["id"]), bool(t.get("special")), bool(t.get("lstrip")), bool(t.get("rstrip")), bool(t.get("normalized")))
        )
        added_by_content[t["content"]] = int(t["id"])
    prefix, suffix = _special_ids(d.get("post_processor"), added_by_content)
    return dict(
        pre_tokenizer=scanner,
        add_prefix_space=add_prefix_space,
        ignore_merges=bool(model.get("ignore_merges", False)),
        nfc=nfc,
        vocab_tokens=list(vocab.keys()),
        vocab_ids=[int(i) for i in vocab.values()],
        merges_left=[m[0] for m in merges],
        merges_right=[m[1] for m in merges],
        added_tokens=added,
        prefix_ids=np.asarray(prefix, dtype=np.uint32),
        suffix_ids=np.asarray(suffix, dtype=np.uint32),
    )


def spec_of(d: dict) -> dict[str, Any]:
    """A parsed tokenizer.json -> the native encoder's arguments (plain lists and scalars, picklable), or
    raise :class:`Unsupported`."""
    return _parse(d)


_MODEL_STRINGS = ("vocab_tokens", "vocab_ids", "merges_left", "merges_right")
_MODEL_ARRAYS = ("vocab_bytes", "vocab_offsets", "vocab_ids", "merges_left", "merges_right")


def compile_spec(spec: dict[str, Any]) -> dict[str, Any]:
    """:func:`spec_of`'s result with the model as the encoder holds it: the vocabulary's raw bytes, offsets and
    ids, and the merges as id pairs (numpy arrays), instead of ByteLevel strings. The same encoder builds from
    either; this one without converting or looking up ~10^6 strings (~0.5 s less for a 150k-250k vocabulary),
    and it pickles as a few arrays. A compiled spec is returned as it is."""
    if "vocab_bytes" in spec:
        return spec
    from ._core_loader import core

    arrays = core._bpe_compile_model(*(spec[k] for k in _MODEL_STRINGS))
    out = {k: v for k, v in spec.items() if k not in _MODEL_STRINGS}
    out.update(zip(_MODEL_ARRAYS, arrays))
    return out


def supported(tokenizer_json) -> tuple[bool, str]:
    """Whether :class:`NativeBPE` reproduces this tokenizer, and if not, why.

    Args:
        tokenizer_json: a tokenizer.json path, its JSON text, the parsed dict, or a ``tokenizers.Tokenizer``.

    Returns:
        ``(True, "")`` or ``(False, reason)``, e.g. ``(False, "model 'WordPiece' is not BPE ...")``.
    """
    d = _load_json(tokenizer_json)
    try:
        _check_structure(d)
    except Unsupported as exc:
        return False, str(exc)
    return True, ""


def _check_structure(d: dict) -> None:
    """The cheap part of :func:`_parse`: everything but the vocabulary conversion."""
    light = dict(d)
    model = dict(d.get("model") or {})
    model["vocab"], model["merges"] = {}, [] if "merges" in model else None
    if model["merges"] is None:
        del model["merges"]
    light["model"] = model
    _parse(light)


class NativeBPE:
    """Byte-level BPE encoder with HF ``tokenizers``' exact ids (see the module docstring for what is covered).

    Build it with :meth:`from_tokenizer_json`, :meth:`from_hf` or :meth:`from_tiktoken`; an unsupported
    tokenizer raises :class:`Unsupported` (a ValueError) saying why, so ``impl="auto"`` can catch it and fall
    back without parsing the tokenizer twice (:func:`supported` asks without building anything).
    """

    def __init__(self, spec: dict[str, Any], *, reference=None) -> None:
        from ._core_loader import core

        self._encoder = core._bpe_encoder_from_model(**spec) if "vocab_bytes" in spec else core._BpeEncoder(**spec)
        self._pattern = next(n for s, n in PATTERNS.values() if s == spec["pre_tokenizer"])
        # With an NFC normalizer, documents that the NFC quick check cannot prove normalized are encoded by HF
        # tokenizers itself (a tokenizers.Tokenizer, or the JSON text to build one on first need).
        self._reference = reference if spec["nfc"] else None

    @classmethod
    def from_spec(cls, spec: dict[str, Any]) -> "NativeBPE":
        """From :func:`spec_of`'s result (for a caller that keeps specs, e.g. on disk). A spec with an NFC
        normalizer needs the tokenizer itself as the reference encoder: use the other constructors."""
        if spec.get("nfc"):
            raise ValueError("spec: an NFC tokenizer's encoder needs its reference tokenizer; build it with "
                             "from_tokenizer_json or from_hf")
        return cls(spec)

    @classmethod
    def from_tokenizer_json(cls, path_or_json_str) -> "NativeBPE":
        """From a tokenizer.json file, its JSON text or the parsed dict."""
        d = _load_json(path_or_json_str)
        spec = _parse(d)
        return cls(spec, reference=json.dumps(d) if spec["nfc"] else None)

    @classmethod
    def from_hf(cls, tokenizer) -> "NativeBPE":
        """From a ``tokenizers.Tokenizer`` (its current state, via ``to_str()``)."""
        if not hasattr(tokenizer, "to_str"):
            raise TypeError(f"tokenizer must be a tokenizers.Tokenizer, got {type(tokenizer).__name__}")
        return cls(_parse(json.loads(tokenizer.to_str())), reference=tokenizer)

    @classmethod
    def from_tiktoken(cls, path, pattern: str, special_tokens=None) -> "NativeBPE":
        """From a tiktoken rank file, with the same ids as :func:`mlmix._tiktoken.tiktoken_to_hf` gives HF."""
        if _scanner_of(pattern) is None:
            raise Unsupported(f"pattern has no native scanner; recognised: {list(PATTERNS) + list(PATTERN_ALIASES)}, got {pattern!r}")
        from ._tiktoken import tiktoken_to_hf

        return cls.from_hf(tiktoken_to_hf(path, pattern, special_tokens))

    @property
    def pattern(self) -> str:
        """The pre-tokenizer family: 'gpt2', 'llama3', 'qwen2', 'qwen3.5', 'cl100k-onig' or 'o200k'."""
        return self._pattern

    @property
    def vocab_size(self) -> int:
        """Number of byte-level tokens of the model vocabulary (added tokens not included)."""
        return int(self._encoder.vocab_size)

    def encode_batch(
        self,
        texts: Sequence[str],
        *,
        add_special_tokens: bool = True,
        split_special_tokens: bool = False,
        num_threads: int = 0,
    ) -> Ragged:
        """Encode documents in parallel.

        Args:
            texts: a sequence of str.
            add_special_tokens: add the post-processor's ids (e.g. a BOS), as HF ``encode_batch`` does.
            split_special_tokens: encode special tokens found in the text as plain text (HF's
                ``encode_special_tokens``); by default they become their ids.
            num_threads: worker threads; 0 uses all cores (or $MLMIX_NUM_THREADS).

        Returns:
            Ragged of uint32 ids, one sequence per text; identical whatever ``num_threads``.
        """
        if isinstance(texts, str):
            raise TypeError("texts must be a sequence of str, got a single str (use encode())")
        if not isinstance(num_threads, int) or num_threads < 0:
            raise ValueError(f"num_threads must be an int >= 0 (0: all cores), got {num_threads!r}")
        if not isinstance(texts, (list, tuple)):
            texts = list(texts)
        values, offsets, unencoded = self._encoder.encode_batch(
            texts, bool(add_special_tokens), bool(split_special_tokens), num_threads
        )
        if len(unencoded):
            values, offsets = self._encode_unnormalized(texts, values, offsets, unencoded, add_special_tokens, split_special_tokens)
        return Ragged(values, offsets, validate=False)

    def _encode_unnormalized(self, texts, values, offsets, unencoded, add_special_tokens, split_special_tokens):
        """Encode with HF the documents that NFC would change (left empty by the native pass) and splice them in."""
        if isinstance(self._reference, str):
            from ._deps import require

            self._reference = require("tokenizers", "NFC tokenizers").Tokenizer.from_str(self._reference)
        hf = self._reference
        before = hf.encode_special_tokens
        hf.encode_special_tokens = bool(split_special_tokens)
        try:
            encs = hf.encode_batch([texts[int(i)] for i in unencoded], add_special_tokens=bool(add_special_tokens))
        finally:
            hf.encode_special_tokens = before
        lengths = np.diff(offsets)
        lengths[unencoded] = [len(e.ids) for e in encs]
        pieces, start = [], 0
        for i, e in zip(unencoded.tolist(), encs):
            pieces.append(values[offsets[start] : offsets[i]])
            pieces.append(np.asarray(e.ids, dtype=np.uint32))
            start = i + 1
        pieces.append(values[offsets[start] :])
        new_offsets = np.zeros(len(offsets), dtype=np.int64)
        np.cumsum(lengths, out=new_offsets[1:])
        return np.concatenate(pieces), new_offsets

    def encode(self, text: str, *, add_special_tokens: bool = True, split_special_tokens: bool = False) -> np.ndarray:
        """Encode one document -> uint32 array of ids."""
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, got {type(text).__name__}")
        if self._reference is not None:
            return self.encode_batch([text], add_special_tokens=add_special_tokens, split_special_tokens=split_special_tokens, num_threads=1)[0]
        values, _, _ = self._encoder.encode_batch([text], bool(add_special_tokens), bool(split_special_tokens), 1)
        return values

    def __repr__(self) -> str:
        return f"NativeBPE(pattern={self._pattern!r}, vocab_size={self.vocab_size})"
