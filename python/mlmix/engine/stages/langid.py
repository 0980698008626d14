"""Stage ``langid``: a language code for every record: its own, or py3langid's where it has none (or
always, with ``override``); below the threshold, ``unknown`` (dropped with ``drop_unknown``)."""

from __future__ import annotations

import sys
from collections import Counter
from collections.abc import Iterable, Mapping

import numpy as np

from ... import readers
from ...cache import stage_key
from ..log import fmt_langs, rate

VERSION = 1


def key(k_read: str, lcfg: Mapping) -> str:
    return stage_key("langid", VERSION, k_read, lcfg)


class Labeler:
    """Labels blocks of records; the py3langid model is loaded once per Labeler (per process or actor)."""

    def __init__(self, lcfg: Mapping) -> None:
        self.lcfg = dict(lcfg)
        self.lid = None
        if self.lcfg["backend"] == "py3langid":
            from ...langid import LanguageIdentifier

            self.lid = LanguageIdentifier(self.lcfg.get("languages"))

    def __call__(self, records: Iterable[Mapping], on_item=None) -> dict:
        """``lang`` (list of interned codes), ``todo``/``identified``/``alive`` (bool arrays) of a block
        (``records`` may be a generator: each record is read once)."""
        c = self.lcfg
        langs, todo_list = [], []
        for rec in records:
            given = rec["lang"]
            todo = bool(c["override"] or given is None)
            todo_list.append(todo)
            if todo and self.lid is not None:
                lang, p = self.lid.classify(readers.record_text(rec))
                lang = lang if lang and p >= c["threshold"] else c["unknown"]
                if on_item is not None:
                    on_item()
            else:
                lang = given if given is not None else c["unknown"]
            langs.append(sys.intern(lang))
        todo = np.array(todo_list, dtype=bool)
        alive = np.ones(len(langs), dtype=bool)
        if c["drop_unknown"]:
            alive = np.fromiter((lang != c["unknown"] for lang in langs), dtype=bool, count=len(langs))
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
