"""Instruction-data record shapes -> one normal form (a conversation, or a plain text).

Accepted shapes (field names configurable through :class:`Fields`):

==================  ==========================================================================
``messages``        ``{"messages": [{"role": "system"|"user"|"assistant", "content": str}, ...]}``
``sharegpt``        ``{"conversations": [{"from": "system"|"human"|"gpt", "value": str}, ...]}``
``alpaca``          ``{"instruction": str, "input": str (optional), "output": str}`` (or ``"response"``/``"completion"``)
``prompt_response`` ``{"prompt": str, "response": str}`` (or ``"completion"`` instead of ``"response"``)
``text``            ``{"text": str}``: pre-training style, every token is trained
==================  ==========================================================================

Any shape may also carry ``"system"`` (for the non-chat shapes), a language code (``"lang"``) and a source id
(``"source"``), which are carried through to the encoded output. Alpaca's ``input``, when non-empty, follows the
instruction after a blank line: ``instruction + "\\n\\n" + input``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Mapping, Optional

__all__ = ["FORMATS", "ROLES", "Fields", "RecordError", "BadRecord", "normalize_record", "detect_format", "parse_turns"]

FORMATS = ("auto", "messages", "sharegpt", "alpaca", "prompt_response", "text")
ROLES = ("system", "user", "assistant")
# ShareGPT speaker names -> roles
_SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}


@dataclass(frozen=True)
class Fields:
    """Field names of the record shapes; override any of them, e.g. ``Fields(messages="dialog")``."""

    messages: str = "messages"
    role: str = "role"
    content: str = "content"
    conversations: str = "conversations"
    sharegpt_role: str = "from"
    sharegpt_content: str = "value"
    instruction: str = "instruction"
    input: str = "input"
    output: str = "output"
    prompt: str = "prompt"
    response: tuple = ("response", "completion")
    system: str = "system"
    text: str = "text"
    lang: str = "lang"
    source: str = "source"

    @classmethod
    def coerce(cls, fields) -> "Fields":
        if fields is None:
            return cls()
        if isinstance(fields, Fields):
            return fields
        if not isinstance(fields, Mapping):
            raise TypeError(f"fields must be a mlmix.formats.Fields or a dict of field names, got {fields!r}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(fields) - known)
        if unknown:
            raise ValueError(f"fields: unknown keys {unknown}; accepted keys are {sorted(known)}")
        kw = dict(fields)
        if isinstance(kw.get("response"), str):
            kw["response"] = (kw["response"],)
        return cls(**kw)


class RecordError(ValueError):
    """A bad record: ``index`` is its position in the input, ``reason`` says what is wrong."""

    def __init__(self, index: int, kind: str, reason: str):
        super().__init__(f"record {index}: {reason}")
        self.index = index
        self.kind = kind
        self.reason = reason


class BadRecord(Exception):
    """A record is bad, before its position is known: ``kind`` is a short category (counted when skipping),
    ``reason`` the detail. What :func:`normalize_record` and :func:`detect_format` raise; a caller that knows
    the record's index turns it into a :class:`RecordError`."""

    def __init__(self, kind: str, reason: str):
        super().__init__(reason)
        self.kind = kind
        self.reason = reason


def _text(value: Any, where: str) -> str:
    """A record's text field as str: bytes must be valid UTF-8, str must encode to UTF-8 (no lone surrogates)."""
    if isinstance(value, str):
        if not value.isascii():
            try:
                value.encode("utf-8")
            except UnicodeEncodeError as exc:
                raise BadRecord("invalid_utf8", f"{where} is not valid Unicode ({exc.reason} at character {exc.start})") from None
        return value
    if isinstance(value, (bytes, bytearray)):
        try:
            return bytes(value).decode("utf-8")
        except UnicodeDecodeError as exc:
            raise BadRecord("invalid_utf8", f"{where} is not valid UTF-8 ({exc.reason} at byte {exc.start})") from None
    raise BadRecord("non_string_content", f"{where} must be a string, got {type(value).__name__}")


def detect_format(record: Mapping, fields: Fields) -> str:
    """The shape of one record (see the module docstring), or raise ``BadRecord``."""
    if fields.messages in record:
        return "messages"
    if fields.conversations in record:
        return "sharegpt"
    if fields.instruction in record and (fields.output in record or any(r in record for r in fields.response)):
        return "alpaca"
    if fields.prompt in record and any(r in record for r in fields.response):
        return "prompt_response"
    if fields.text in record:
        return "text"
    keys = sorted(map(str, record))[:8]
    raise BadRecord("unknown_format", f"cannot tell the record's format from its keys {keys}")


def parse_turns(turns, fields: Fields, role_key: str, content_key: str, role_map: Optional[dict], where: str):
    """A conversation (a list of ``{role_key: ..., content_key: ...}`` dicts) -> list of (role, content);
    ``role_map`` maps the record's speaker names to :data:`ROLES` (None: they must be ROLES already), ``where``
    names the conversation in messages. Raises :class:`BadRecord`."""
    if not isinstance(turns, (list, tuple)):
        raise BadRecord("not_a_conversation", f"{where} must be a list of messages, got {type(turns).__name__}")
    if not turns:
        raise BadRecord("empty_conversation", f"{where} is an empty conversation")
    out = []
    for j, m in enumerate(turns):
        if not isinstance(m, Mapping):
            raise BadRecord("not_a_conversation", f"{where}[{j}] must be a dict, got {type(m).__name__}")
        if role_key not in m:
            raise BadRecord("missing_field", f"{where}[{j}] has no {role_key!r}")
        role = m[role_key]
        if role_map is not None:
            role = role_map.get(role) if isinstance(role, str) else None
        if role not in ROLES:
            accepted = sorted(role_map) if role_map is not None else list(ROLES)
            raise BadRecord("unknown_role", f"{where}[{j}] has unknown role {m[role_key]!r}; accepted roles are {accepted}")
        if content_key not in m:
            raise BadRecord("missing_field", f"{where}[{j}] has no {content_key!r}")
        out.append((role, _text(m[content_key], f"{where}[{j}].{content_key}")))
    return out


def normalize_record(record: Any, fmt: str, fields: Fields):
    """One record -> ``(kind, payload, lang, source)``; kind is ``"chat"`` (payload: list of (role, content))
    or ``"text"`` (payload: str). Raises ``BadRecord`` with the reason."""
    if not isinstance(record, Mapping):
        raise BadRecord("not_a_dict", f"a record must be a dict, got {type(record).__name__}")
    if fmt == "auto":
        fmt = detect_format(record, fields)
    lang = record.get(fields.lang)
    source = record.get(fields.source)
    if lang is not None and not isinstance(lang, str):
        raise BadRecord("bad_metadata", f"{fields.lang!r} must be a string or absent, got {type(lang).__name__}")
    if source is not None and not isinstance(source, (str, int)):
        raise BadRecord("bad_metadata", f"{fields.source!r} must be a string, an int or absent, got {type(source).__name__}")

    def need(key):
        if key not in record:
            raise BadRecord("missing_field", f"{fmt} record has no {key!r}")
        return _text(record[key], key)

    if fmt == "messages":
        conv = parse_turns(record[fields.messages] if fields.messages in record else None, fields, fields.role,
                     fields.content, None, fields.messages)
        return "chat", conv, lang, source
    if fmt == "sharegpt":
        conv = parse_turns(record.get(fields.conversations), fields, fields.sharegpt_role, fields.sharegpt_content,
                     _SHAREGPT_ROLES, fields.conversations)
        return "chat", conv, lang, source
    if fmt == "text":
        return "text", need(fields.text), lang, source
    system = record.get(fields.system)
    conv = [] if system is None or system == "" else [("system", _text(system, fields.system))]
    if fmt == "alpaca":
        instruction = need(fields.instruction)
        extra = record.get(fields.input)
        extra = "" if extra is None else _text(extra, fields.input)
        user = instruction + "\n\n" + extra if extra else instruction
        # the answer under `output` (Alpaca) or, failing that, `response`/`completion` (Dolly-style sets)
        out_key = fields.output if fields.output in record else next(
            (r for r in fields.response if r in record), fields.output)
        conv += [("user", user), ("assistant", need(out_key))]
        return "chat", conv, lang, source
    if fmt == "prompt_response":
        key = next((r for r in fields.response if r in record), None)
        if key is None:
            raise BadRecord("missing_field", f"prompt_response record has none of {list(fields.response)}")
        conv += [("user", need(fields.prompt)), ("assistant", _text(record[key], key))]
        return "chat", conv, lang, source
    raise ValueError(f"format must be one of {FORMATS}, got {fmt!r}")
