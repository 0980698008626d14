"""The record shapes the readers know: which fields of a row they look at, and which shape a row has.

Shared by the row-by-row reader (:func:`mlmix.readers.to_record`) and the Arrow batch reader
(:mod:`mlmix._arrow_records`), so that both read a row the same way.
"""

from __future__ import annotations

from collections.abc import Container, Mapping

DEFAULT_ROLES = {"human": "user", "gpt": "assistant", "bot": "assistant", "model": "assistant", "user": "user",
                 "assistant": "assistant", "system": "system", "tool": "tool"}
PROMPT_KEYS = ("prompt", "instruction", "question", "query")
RESPONSE_KEYS = ("response", "completion", "output", "answer", "chosen")
MESSAGES_KEYS = ("messages", "conversations", "conversation")


def roles_of(src: Mapping) -> dict:
    """A source's role mapping: the defaults, then the source's own ``roles``."""
    return {**DEFAULT_ROLES, **src["roles"]}


def records_format(fmt: str, keys: Container[str], fields: Mapping) -> str:
    """The records format of a row with these keys (a dict, or a batch's column names) where ``fmt`` is "auto"."""
    if fmt != "auto":
        return fmt
    if any(k in keys for k in MESSAGES_KEYS) or "messages" in fields:
        return "messages"
    if ("text" in fields or "text" in keys) and not any(k in keys for k in PROMPT_KEYS):
        return "text"
    if "instruction" in fields or "input" in keys:
        return "alpaca"
    return "prompt_response"
