"""Stage ``langid``: a language code for every record: its own, or py3langid's model's where it has none
(or always, with ``override``); below the threshold, ``unknown`` (dropped with ``drop_unknown``). The
``native`` backend (the C++ port) and ``py3langid`` give the same labels."""

from __future__ import annotations

import sys
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence

import numpy as np

from ... import readers
from ...cache import stage_key
from ..log import fmt_langs, rate

VERSION = 2  # 2: codes as an index per record (langs.npy) into lang_codes.json, not a JSON list


def key(k_read: str, lcfg: Mapping) -> str:
    return stage_key("langid", VERSION, k_read, lcfg)


def _head(text: str, n: int = 2000) -> str:
    """What the classifier reads of a text (its first ``n`` code points), unless those are all whitespace:
    then the whole text, since an empty-after-strip text is judged on all of it. Same label, less held."""
    return text if len(text) <= n or not text[:n].strip() else text[:n]


class Labeler:
    """Labels blocks of records; the language model is loaded once per Labeler (per process or actor).
    The native backend classifies a block's texts in one batch call (threads, GIL released)."""

    def __init__(self, lcfg: Mapping) -> None:
        self.lcfg = dict(lcfg)
        self.lid = None
        if self.lcfg["backend"] in ("native", "py3langid"):
            from ...langid import LanguageIdentifier

            self.lid = LanguageIdentifier(self.lcfg.get("languages"), backend=self.lcfg["backend"])

    def __call__(self, records: Iterable[Mapping], on_item=None) -> dict:
        """``lang`` (list of interned codes), ``todo``/``identified``/``alive`` (bool arrays) of a block
        (``records`` may be a generator: each record is read once; only the texts to identify are kept)."""
        override = self.lcfg["override"]
        given: list[str | None] = []
        texts: list[str | None] = []
        for rec in records:
            lang = rec["lang"]
            given.append(lang)
            texts.append(_head(readers.record_text(rec)) if self.lid is not None and (override or lang is None)
                         else None)
        return self.label_texts(given, texts, on_item=on_item)

    def needs_texts(self, given: Sequence[str | None]) -> bool:
        """Whether labelling records whose own languages are ``given`` (None where a record has none) reads their
        texts: only where a model labels some of them. Otherwise :meth:`label_texts` takes ``[None] * n``, and a
        caller holding the records on disk need not read the texts at all."""
        return self.lid is not None and (self.lcfg["override"] or any(g is None for g in given))

    def label_block(self, block) -> dict:
        """As ``__call__`` for a :class:`mlmix.recblock.RecordBlock`: its texts are joined in C++ and
        classified in one batch call, without a Python object per record."""
        given = block.langs()
        return self.label_texts(given, block.text_column() if self.needs_texts(given) else [None] * len(given))

    def label_texts(self, given: Sequence[str | None], texts, on_item=None) -> dict:
        """As ``__call__`` for a block given as columns: each record's own language (None where it has
        none) and its text, a list (None is fine where no text is needed) or UTF-8 ``(values, offsets)``.
        The records that need a language are classified in ONE batch call."""
        c = self.lcfg
        n = len(given)
        todo = np.fromiter((bool(c["override"] or g is None) for g in given), dtype=bool, count=n)
        langs = [g if g is not None else c["unknown"] for g in given]
        if self.lid is not None and todo.any():
            idx = np.flatnonzero(todo)
            if isinstance(texts, tuple) and len(texts) == 2 and all(isinstance(a, np.ndarray) for a in texts):
                values, offsets = texts
                if len(idx) == n:
                    sub_val, sub_off = values, offsets
                else:  # the texts at idx, gathered without a Python step per record
                    starts, ends = offsets[idx], offsets[idx + 1]
                    sub_off = np.zeros(len(idx) + 1, np.int64)
                    np.cumsum(ends - starts, out=sub_off[1:])
                    sub_val = values[np.repeat(starts - sub_off[:-1], ends - starts)
                                     + np.arange(int(sub_off[-1]), dtype=np.int64)]
                got, probs = self.lid.classify_batch((np.ascontiguousarray(sub_val, np.uint8),
                                                      np.ascontiguousarray(sub_off, np.int64)))
            else:
                got, probs = self.lid.classify_batch([texts[i] for i in idx.tolist()])
            for i, lang, p in zip(idx.tolist(), got, probs.tolist()):
                langs[i] = lang if lang and p >= c["threshold"] else c["unknown"]
                if on_item is not None:
                    on_item()
        langs = [sys.intern(x) for x in langs]
        alive = np.ones(n, dtype=bool)
        if c["drop_unknown"]:
            alive = np.fromiter((lang != c["unknown"] for lang in langs), dtype=bool, count=n)
        return {"lang": langs, "todo": todo, "identified": todo & (self.lid is not None), "alive": alive}


def count(block: Mapping, tokens: np.ndarray | None = None) -> dict:
    """The counts of one labelled block (``tokens``: optional token counts per record, per language)."""
    return {"todo": int(block["todo"].sum()), "identified": int(block["identified"].sum()),
            "alive": int(block["alive"].sum()), "records": len(block["lang"]), "langs": Counter(block["lang"])}


def merge(a: dict | None, b: dict) -> dict:
    if a is None:
        return dict(b, langs=Counter(b["langs"]))
    for k in ("todo", "identified", "alive", "records"):
        a[k] += b[k]
    a["langs"].update(b["langs"])
    return a


def finish(counts: dict | None, lcfg: Mapping) -> dict:
    c = counts or {"todo": 0, "identified": 0, "alive": 0, "records": 0, "langs": Counter()}
    return {"identified": c["identified"], "given": c["records"] - c["todo"],
            "unknown": int(c["langs"].get(lcfg["unknown"], 0)), "dropped": c["records"] - c["alive"],
            "langs": dict(sorted(c["langs"].items()))}


def summary(s: Mapping) -> str:
    return (f"{len(s['langs'])} languages ({s['given']:,} given, {s['identified']:,} identified, "
            f"{s['unknown']:,} unknown) {fmt_langs(s['langs'])}"
            + (rate(s["identified"], s.get("seconds", 0), "rec") if s["identified"] else ""))
