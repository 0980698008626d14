"""Data shipped inside the package: the demo's parallel instruction set (see ``demo/README.md``)."""

from __future__ import annotations

import json
from collections.abc import Iterable
from importlib import resources

# English first, then the study's other languages in the order of the issue.
DEMO_LANGUAGES: tuple[str, ...] = ("en", "ar", "zh", "cs", "et", "fi", "he", "hi", "it", "ru", "es", "sw")
DEMO_SPLITS: tuple[str, ...] = ("train", "heldout")


def demo_records(split: str | None = None, langs: Iterable[str] | None = None) -> list[dict]:
    """The bundled parallel instruction set as a list of records.

    Each record is ``{"id", "lang", "split", "instruction", "response"}``; ``id`` (``s001``..``s064`` for
    ``train``, ``h001``..``h016`` for ``heldout``) names the same source in every language.

    Args:
        split: ``"train"``, ``"heldout"`` or None for both.
        langs: language codes from ``DEMO_LANGUAGES`` (None: all of them), returned in the order given.
    """
    if split is not None and split not in DEMO_SPLITS:
        raise ValueError(f"split must be one of {DEMO_SPLITS} or None, got {split!r}")
    if isinstance(langs, str):
        raise ValueError(f"langs must be an iterable of language codes such as ['en', 'fi'], got the string {langs!r}")
    chosen = DEMO_LANGUAGES if langs is None else tuple(langs)
    unknown = [lang for lang in chosen if lang not in DEMO_LANGUAGES]
    if unknown:
        raise ValueError(f"langs must be drawn from {DEMO_LANGUAGES}, got unknown {unknown!r}")
    root = resources.files(__name__) / "demo"
    records: list[dict] = []
    for lang in chosen:
        text = (root / f"{lang}.jsonl").read_text(encoding="utf-8")
        for line in text.splitlines():
            if line.strip():
                record = json.loads(line)
                if split is None or record["split"] == split:
                    records.append(record)
    return records
