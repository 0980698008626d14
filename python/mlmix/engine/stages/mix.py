"""Stage ``mix``: the mixture recipe over the (source id, language) rows that survived dedup.

Recipe ``all`` keeps every surviving record. The other recipes (an exact max-flow assignment of sources
to languages) run over counts, never over one row per record (:class:`mlmix.recipes.GroupedCorpus`):

1. Records are grouped by source id (a groupby: a dict in one process, a shuffle on Ray) into one row
   per source: its id (as JSON), its number of records and its languages.
2. Each block of those rows is :func:`summarize`\\ d: its sources counted per language set; the
   summaries :func:`merge` exactly. The recipe computes its targets and per-group quotas from them and
   the tokens per language.
3. Each availability group's chosen sources are the first k in a seeded hash order, i.e. a bottom-k:
   each block keeps its bottom-k per group (:func:`reservoirs`: a ``StratifiedReservoir`` for integer
   ids, the recipe's hashed key for string ids) and :func:`merge_prefixes` merges them exactly, so only
   k ids per group and block travel.
4. The selected (source id, language) pairs are picked out of the records.

Both executors run exactly these functions; they differ only in how the rows reach them. The local executor, which
holds every row in one process, runs them as columns (:class:`Columns`: the same summary, prefixes and selection,
with numpy in place of a Python step per record), except where only the per-row functions can answer.
"""

from __future__ import annotations

import json
import pickle
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from json.decoder import scanstring
from json.encoder import encode_basestring_ascii
from typing import Any

import numpy as np

from ...cache import stage_key
from ..log import fmt_langs

VERSION = 1


def key(k_dedup: str, k_tok: str, mcfg: Mapping) -> str:
    return stage_key("mix", VERSION, k_dedup, k_tok, mcfg)


def recipe_params(mcfg: Mapping) -> dict:
    return {k: v for k, v in mcfg.items() if k not in ("recipe", "seed")}


def check(mcfg: Mapping) -> None:
    if mcfg["recipe"] == "all" and recipe_params(mcfg):
        raise ValueError(f"mixture: recipe 'all' takes no parameters, got {sorted(recipe_params(mcfg))}")


def sids(ids: Sequence[str]) -> list[str]:
    """Each record id (a str) as JSON, the key the mixture groups records by: ``json.dumps(x)`` without its
    per-call setup."""
    return [encode_basestring_ascii(x) if type(x) is str else json.dumps(x) for x in ids]


def source_id(sid: str) -> Any:
    """``json.loads(sid)``, the string ids :func:`sids` writes read without the decoder's per-call setup."""
    if sid[:1] == '"':
        try:
            x, end = scanstring(sid, 1)
        except ValueError:  # json.loads says what is wrong
            pass
        else:
            if end == len(sid):
                return x
    return json.loads(sid)


def _is_int_id(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def summarize(sids: Sequence[str], counts: Sequence[int], langsets: Sequence[Iterable[str]]) -> dict:
    """One block of per-source rows (id as JSON, records, languages) counted per language set.

    ``groups``: {sorted language tuple: [sources, of which integer ids]}; ``dups``: ids with a language
    twice; ``bad``/``big``: ids that are not int/str, or ints outside int64."""
    groups: dict[tuple, list[int]] = {}
    dups, bad, big = [], [], []
    for sid, n, langs in zip(sids, counts, langsets):
        key_ = tuple(sorted(langs))
        if n != len(key_):
            dups.append(sid)
        x = source_id(sid)
        is_int = _is_int_id(x)
        if not is_int and not isinstance(x, str):
            bad.append(x)
        elif is_int and not -(1 << 63) <= x < (1 << 63):
            big.append(x)
        c = groups.setdefault(key_, [0, 0])
        c[0] += 1
        c[1] += is_int
    return {"groups": groups, "dups": dups, "bad": bad, "big": big}


def merge(parts: Iterable[Mapping]) -> dict:
    out: dict = {"groups": {}, "dups": [], "bad": [], "big": []}
    for p in parts:
        for key_, (n, n_int) in p["groups"].items():
            c = out["groups"].setdefault(key_, [0, 0])
            c[0] += n
            c[1] += n_int
        for k in ("dups", "bad", "big"):
            out[k] += p[k]
    return out


def check_ids(summary: Mapping) -> None:
    if summary["bad"]:
        raise ValueError(f"mixture: source id {summary['bad'][0]!r} is neither an int nor a string; recipes need "
                         "int or str source ids (set the sources' id_field), or use recipe 'all'")
    if summary["big"]:
        raise ValueError(f"mixture: source id {summary['big'][0]!r} is not in [-2**63, 2**63); the mixture needs "
                         "64-bit signed integer (or string) ids")


def duplicate_error(uids: np.ndarray, sids: Sequence[str], langs: Sequence[str], name: Callable[[int], str]) -> None:
    """Raise the error for the first record (in uid order) whose (source id, language) an earlier record
    has, given the records of the duplicated source ids."""
    first: dict = {}
    for k in np.argsort(np.asarray(uids, dtype=np.int64), kind="stable").tolist():
        sid, lang, uid = sids[k], langs[k], int(uids[k])
        if (sid, lang) in first:
            raise ValueError(
                f"mixture: source id {json.loads(sid)!r} appears twice in language {lang!r} (records "
                f"{name(first[(sid, lang)])} and {name(uid)}); recipes need one example per "
                "(source id, language): set the sources' id_field to an id shared only by translations, "
                "or use recipe 'all'")
        first[(sid, lang)] = uid
    raise RuntimeError("mixture: a duplicate (source id, language) was counted but not found (a lost block?)")


def prefix_plan(summary_groups: Mapping, active: list, quotas: Mapping, seed: int) -> dict:
    """What each block needs: the active languages, the groups (in ``quotas`` order) with their quotas,
    and whether each group's ids are all integers (then the recipe orders it by reservoir keys)."""
    act = frozenset(active)
    n_int: Counter = Counter()
    n_all: Counter = Counter()
    for key_, (n, k_int) in summary_groups.items():
        g = frozenset(key_) & act
        n_all[g] += n
        n_int[g] += k_int
    return {"active": sorted(act), "groups": [sorted(g) for g in quotas], "quotas": list(quotas.values()),
            "integer": [n_int[g] == n_all[g] for g in quotas], "seed": seed}


def reservoirs(sids: Sequence[str], langsets: Sequence[Iterable[str]], plan: Mapping) -> dict[int, bytes]:
    """Each availability group's bottom-k sources of one block, by the recipe's seeded key:
    {group index: pickled reservoir (integer ids) or sorted id list}."""
    act = frozenset(plan["active"])
    index = {frozenset(g): gi for gi, g in enumerate(plan["groups"])}
    ids_of: dict[int, list] = {}
    for sid, langs in zip(sids, langsets):
        gi = index.get(frozenset(langs) & act)
        if gi is not None:
            ids_of.setdefault(gi, []).append(source_id(sid))
    return {gi: pickle.dumps(_reservoir(ids, plan, gi)) for gi, ids in ids_of.items()}


def _reservoir(ids: list, plan: Mapping, gi: int):
    from ... import recipes
    from ...sample import StratifiedReservoir

    k, seed = plan["quotas"][gi], plan["seed"]
    if plan["integer"][gi]:
        r = StratifiedReservoir({recipes.ASSIGN_STRATUM: k}, seed=seed)
        r.add(np.full(len(ids), recipes.ASSIGN_STRATUM, dtype=np.uint64), np.array(ids, dtype=np.int64))
        return r
    return recipes.assign_bottom_k(seed, ids, k)


def _merge_reservoir(acc, part, plan: Mapping, gi: int):
    from ... import recipes

    if acc is None:
        return part
    if plan["integer"][gi]:
        return acc.merge(part)
    return recipes.assign_bottom_k(plan["seed"], acc + part, plan["quotas"][gi])


def merge_prefixes(parts: Iterable[Mapping[int, bytes]], plan: Mapping, order: list) -> dict:
    """Merge the blocks' reservoirs into each group's ordered prefix ({group: [ids]})."""
    from ... import recipes

    merged: dict[int, Any] = {}
    for part in parts:
        for gi, raw in part.items():
            merged[gi] = _merge_reservoir(merged.get(gi), pickle.loads(raw), plan, gi)
    out = {}
    for gi, g in enumerate(order):
        got = merged.get(gi)
        if got is None:
            out[g] = []
        elif plan["integer"][gi]:
            out[g] = got.result()[recipes.ASSIGN_STRATUM].tolist()
        else:
            out[g] = list(got)
    return out


def run_recipe(mcfg: Mapping, summary: Mapping, lang_tokens: Mapping[str, int],
               prefixes: Callable[[Mapping], dict]):
    """The recipe's Mixture over counts. ``prefixes(plan)`` returns the merged group prefixes of a
    :func:`prefix_plan` (the executor runs :func:`reservoirs` over its blocks and :func:`merge_prefixes`)."""
    from ... import recipes

    groups = {g: c[0] for g, c in summary["groups"].items()}

    def group_prefixes(active: list, quotas: dict, seed: int) -> dict:
        plan = prefix_plan(summary["groups"], active, quotas, seed)
        return prefixes(plan)

    corpus = recipes.GroupedCorpus(groups, dict(lang_tokens), group_prefixes)
    recipe = getattr(recipes, mcfg["recipe"])
    try:
        return recipe(corpus, seed=mcfg["seed"], **recipe_params(mcfg))
    except TypeError as exc:
        raise ValueError(f"mixture: bad parameters for recipe {mcfg['recipe']!r}: {exc}") from exc


class Columns:
    """The kept records' sources as columns, in one process (the local executor): what :func:`summarize`,
    :func:`merge`, :func:`reservoirs` and :func:`merge_prefixes` give over the same rows, and the selection of a
    mixture's rows, with numpy in place of a Python step per record.

    ``ids``: each record's source id (a str, as every record's id is), ``langs``: its language, both in record
    order. :meth:`of` returns None where the per-row functions must run: more than 63 languages (a source's
    languages are a 64-bit mask here), or a (source, language) twice (their error names the records)."""

    def __init__(self, ids: Sequence[str], langs: Sequence[str]) -> None:
        from .write import factorize

        self.code, self.src = factorize(ids)
        self.sources = list(self.code)  # in order of first appearance, as the groupby's dict holds them
        self.table, self.lang = factorize(langs)
        self.names = list(self.table)
        self.key = self.src * max(len(self.table), 1) + self.lang  # one per (source, language)
        self.mask = np.zeros(len(self.sources), np.uint64)
        np.bitwise_or.at(self.mask, self.src, np.left_shift(np.uint64(1), self.lang.astype(np.uint64)))

    @classmethod
    def of(cls, ids: Sequence[str], langs: Sequence[str]) -> Columns | None:
        if len(set(langs)) > 63 or any(type(x) is not str for x in ids):
            return None
        cols = cls(ids, langs)
        if len(np.unique(cols.key)) != len(cols.key):
            return None
        return cols

    def _mask_of(self, langs: Iterable[str]) -> int | None:
        """The mask of ``langs``; None where one of them no record has."""
        m = 0
        for lang in langs:
            if lang not in self.table:
                return None
            m |= 1 << self.table[lang]
        return m

    def summary(self) -> dict:
        """:func:`merge` of the :func:`summarize` of every source, in the order of first appearance."""
        uniq, first, n = np.unique(self.mask, return_index=True, return_counts=True)
        groups: dict[tuple, list[int]] = {}
        for k in np.argsort(first, kind="stable").tolist():
            m = int(uniq[k])
            groups[tuple(sorted(name for b, name in enumerate(self.names) if m >> b & 1))] = [int(n[k]), 0]
        return {"groups": groups, "dups": [], "bad": [], "big": []}

    def prefixes(self, plan: Mapping) -> dict:
        """:func:`merge_prefixes` of the :func:`reservoirs` of every source under ``plan``: each group's first
        ``quota`` sources in the seeded order (string ids: :func:`mlmix.recipes.assign_bottom_k`)."""
        from ... import recipes

        act = self._mask_of([lang for lang in plan["active"] if lang in self.table])
        sub = self.mask & np.uint64(act)
        out = {}
        for gi, g in enumerate(plan["groups"]):
            m = self._mask_of(g)  # a group naming a language no record has holds no source
            members = np.flatnonzero(sub == np.uint64(m)) if m is not None else np.zeros(0, np.int64)
            ids = [self.sources[j] for j in members.tolist()]
            out[frozenset(g)] = recipes.assign_bottom_k(plan["seed"], ids, plan["quotas"][gi]) if ids else []
        return out

    def selected(self, rows: Sequence[tuple[str, str]]) -> np.ndarray:
        """Whether each record is one of a mixture's (source id, language) rows."""
        width = max(len(self.table), 1)
        want = np.fromiter((self.code[str(sid)] * width + self.table[str(lang)] for sid, lang in rows), np.int64,
                           count=len(rows))
        return np.isin(self.key, want)

    def tokens(self, lengths: np.ndarray) -> dict[str, int]:
        """Tokens per language (``lengths``: one per record), as :func:`mlmix.engine.stages.write.by_lang`."""
        sums = np.zeros(len(self.names), np.int64)
        np.add.at(sums, self.lang, np.asarray(lengths, np.int64))
        return {name: int(sums[self.table[name]]) for name in sorted(self.names)}


def selected_keys(mixture) -> set[tuple[str, str]]:
    """The (source id as JSON, language) pairs a mixture selected."""
    return set(zip(sids([sid for sid, _ in mixture.rows]), (str(lang) for _, lang in mixture.rows)))


def stats(mcfg: Mapping, sel_langs: Sequence[str], mixture) -> dict:
    from .write import by_lang

    target = {str(k): int(v) for k, v in mixture.targets.items()} if mixture is not None else None
    return {"recipe": mcfg["recipe"], "params": recipe_params(mcfg), "seed": mcfg["seed"],
            "examples": len(sel_langs), "langs": by_lang(sel_langs), "target": target or None}


def summary(s: Mapping) -> str:
    return f"recipe {s['recipe']}: {s['examples']:,} examples {fmt_langs(s['langs'])}"
