"""The language mixtures of "Multilingual Instruction Tuning With Just a Pinch of Multilinguality"
(Shaham et al., 2024), and the allocation policies behind them, over a parallel (translated) corpus.

A parallel corpus is given as ``rows``: the available (source id, language) pairs, i.e. which
translations of each source example exist. ``rows`` is an iterable of mappings, a pyarrow Table or a
pandas DataFrame, with the fields ``id`` and ``lang`` by default (``id_field=``/``lang_field=``).
Source ids are ints or strings.

Every recipe picks **at most one language per source id** (no content repeated across languages) and
returns a :class:`Mixture`. How it works:

1. per-language targets: budgets that do not divide evenly are spread so that counts differ by at
   most one; which languages get the extra example is decided by the seed;
2. an exact assignment: sources are grouped by the set of target languages they are available in,
   and a max-flow over (language -> availability group) finds counts that meet every target whenever
   any assignment can (missing translations included); if none can, ``on_shortfall="error"`` raises
   and ``"take_all"`` keeps a maximum assignment and reports each language's shortfall;
3. inside each availability group, sources are ordered by a hash of (seed, source id) and dealt to
   languages in consecutive blocks, so each language gets a uniformly random subset of the group.

The result depends only on the rows (as a set), the parameters and the seed.

``STUDY_LANGUAGES`` keeps the study's order: ar, zh, cs, en, et, fi, he, hi, it, ru, es, sw.
P% mixtures (and the pinch) spread the multilingual examples over the non-pivot languages, replacing
pivot (English) examples so that the set size stays constant. ``DIVERSITY_ORDER`` (en, ar, fi, it, ru,
sw: the unseen-split tuning languages) is our default order for ``language_diversity``; pass the
study's order explicitly with ``order=`` if it differs.

Languages default to the data's: a recipe whose languages are not given uses those that have rows
(:func:`data_languages`: the study's 12 that are present, in the study's order, then any others by
code), so a corpus in three languages gets a three-language pinch rather than an error about the nine
it lacks. Give ``languages`` (or ``tuning``, ``order``) to choose.
"""

from __future__ import annotations

import collections
import hashlib
import heapq
import json
import math
import os
from collections.abc import Hashable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any

import numpy as np

from ._atomic import atomic_file
from ._core_loader import core

__all__ = [
    "DIVERSITY_ORDER",
    "STUDY_LANGUAGES",
    "UNSEEN_HELDOUT",
    "UNSEEN_TUNING",
    "Mixture",
    "allocate_proportional",
    "allocate_temperature",
    "allocate_unimax",
    "bilingual",
    "data_languages",
    "even_split",
    "language_diversity",
    "monolingual",
    "percent_mixture",
    "pinch",
    "temperature",
    "unimax",
    "unseen_split",
]

STUDY_LANGUAGES: tuple[str, ...] = ("ar", "zh", "cs", "en", "et", "fi", "he", "hi", "it", "ru", "es", "sw")
UNSEEN_TUNING: tuple[str, ...] = ("en", "ar", "fi", "it", "ru", "sw")
UNSEEN_HELDOUT: tuple[str, ...] = ("cs", "et", "he", "hi", "es", "zh")
DIVERSITY_ORDER: tuple[str, ...] = UNSEEN_TUNING

_SHORTFALL = ("error", "take_all")
_MIXTURE_FORMAT = "mlmix.mixture/1"


# ---------------------------------------------------------------------------------------------------
# the result
@dataclass
class Mixture:
    """A chosen set of (source id, language) pairs with what it was asked to be.

    Attributes:
        recipe: the recipe's name (e.g. ``"pinch"``).
        seed: the seed it was built with.
        params: the recipe's parameters (JSON-able).
        rows: list of ``(source id, lang)``, grouped by language in ``targets`` order; within a language
            in the seeded hash order (so any prefix is a random subset). No source id appears twice.
        targets: ``{lang: count asked for}``.
        available: ``{lang: number of sources available in that language}``.
    """

    recipe: str
    seed: int
    params: dict
    rows: list
    targets: dict
    available: dict = field(default_factory=dict)

    def counts(self) -> dict[str, int]:
        """``{lang: number of rows}`` for every target language (0 included), in target order."""
        c = collections.Counter(lang for _, lang in self.rows)
        return {lang: c.get(lang, 0) for lang in self.targets}

    def shortfall(self) -> dict[str, int]:
        """``{lang: target - actual}`` for the languages that got fewer than asked (empty if none)."""
        got = self.counts()
        return {lang: t - got[lang] for lang, t in self.targets.items() if got[lang] < t}

    def __len__(self) -> int:
        return len(self.rows)

    def compare(self) -> list[dict[str, Any]]:
        """Target vs actual per language, for a report: lang, available, target, actual, missing, share."""
        got = self.counts()
        total = max(1, len(self.rows))
        return [
            {
                "lang": lang,
                "available": self.available.get(lang, 0),
                "target": t,
                "actual": got[lang],
                "missing": max(0, t - got[lang]),
                "share": got[lang] / total,
            }
            for lang, t in self.targets.items()
        ]

    def to_table(self) -> str:
        """A plain-text table: one line per language plus the total."""
        from .report import format_params

        lines = [f"{self.recipe}({format_params(self.params)}), seed {self.seed}"]
        lines.append(f"{'lang':<8}{'available':>10}{'target':>9}{'actual':>9}{'missing':>9}{'share':>8}")
        for r in self.compare():
            lines.append(
                f"{r['lang']:<8}{r['available']:>10}{r['target']:>9}{r['actual']:>9}{r['missing']:>9}{r['share']:>7.1%}"
            )
        lines.append(
            f"{'total':<8}{'':>10}{sum(self.targets.values()):>9}{len(self.rows):>9}"
            f"{sum(self.shortfall().values()):>9}{'':>8}"
        )
        return "\n".join(lines)

    __str__ = to_table

    def __repr__(self) -> str:
        # rows can number millions: the recipe and the counts, not every (source id, lang) pair
        return (f"Mixture(recipe={self.recipe!r}, seed={self.seed}, rows={len(self.rows):,}, "
                f"counts={self.counts()})")

    def save(self, path: str | os.PathLike) -> None:
        """Write a small JSON file (atomically: a crash leaves the old file or none)."""
        doc = {
            "format": _MIXTURE_FORMAT,
            "recipe": self.recipe,
            "seed": self.seed,
            "params": self.params,
            "targets": self.targets,
            "available": self.available,
            "rows": [[sid, lang] for sid, lang in self.rows],
        }
        with atomic_file(path, "w", kind="mixture", arg="path") as f:
            f.write(json.dumps(doc, separators=(",", ":")))  # dumps, not dump: dump runs the pure-Python encoder

    @classmethod
    def load(cls, path: str | os.PathLike) -> Mixture:
        """Read a file written by :meth:`save`."""
        with open(path, encoding="utf-8") as f:
            doc = json.load(f)
        if not isinstance(doc, dict) or doc.get("format") != _MIXTURE_FORMAT:
            raise ValueError(f"{os.fspath(path)!r} is not an mlmix mixture file (format {_MIXTURE_FORMAT!r})")
        return cls(
            recipe=doc["recipe"],
            seed=doc["seed"],
            params=doc["params"],
            rows=[(sid, lang) for sid, lang in doc["rows"]],
            targets=doc["targets"],
            available=doc["available"],
        )


# ---------------------------------------------------------------------------------------------------
# input
def _check_seed(seed) -> int:
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or not 0 <= int(seed) < 2**64:
        raise ValueError(f"seed must be an integer in [0, 2**64), got {seed!r}")
    return int(seed)


def _columns(rows, fields: Sequence[str]) -> list[list]:
    """One list per field from rows given as a pyarrow Table, a pandas DataFrame or mappings (read once)."""
    if rows is None or isinstance(rows, (str, bytes, Mapping)):
        raise TypeError(f"rows must be an iterable of mappings, a pyarrow Table or a pandas DataFrame, got {rows!r}")
    names = getattr(rows, "column_names", None)  # pyarrow Table
    if names is not None and hasattr(rows, "column"):
        for f in fields:
            if f not in names:
                raise ValueError(f"rows has no field {f!r} (columns: {list(names)}); set id_field/lang_field")
        return [rows.column(f).to_pylist() for f in fields]
    if hasattr(rows, "columns") and hasattr(rows, "iloc"):  # pandas DataFrame
        for f in fields:
            if f not in rows.columns:
                raise ValueError(f"rows has no field {f!r} (columns: {list(rows.columns)}); set id_field/lang_field")
        return [rows[f].tolist() for f in fields]
    out: list[list] = [[] for _ in fields]
    for i, row in enumerate(rows):
        if not isinstance(row, Mapping):
            raise TypeError(f"rows[{i}] must be a mapping with fields {list(fields)}, got {row!r}")
        for col, f in zip(out, fields):
            if f not in row:
                raise ValueError(f"rows[{i}] has no field {f!r}: {row!r}; set id_field/lang_field")
            col.append(row[f])
    return out


class _Corpus:
    """Availability of a parallel corpus: {lang: list of source ids}, validated.

    The recipes see a corpus only through ``require``, ``languages``, ``available``, ``count_sources``,
    ``tokens``, ``group_sizes`` and ``group_prefixes``; :class:`GroupedCorpus` answers the same questions
    from counts, with the group prefixes computed elsewhere (per-block reservoirs on a cluster).
    """

    def __init__(self, rows, id_field: str, lang_field: str, tokens_field: str | None = None) -> None:
        if isinstance(rows, _Corpus):
            self.by_lang, self.tokens = rows.by_lang, rows.tokens
            return
        fields = [id_field, lang_field] + ([tokens_field] if tokens_field is not None else [])
        cols = _columns(rows, fields)
        ids, langs = cols[0], cols[1]
        toks = cols[2] if tokens_field is not None else None
        self.by_lang: dict[str, list] = {}
        self.tokens: dict[str, float] = collections.defaultdict(float)
        seen: set = set()
        for i, (sid, lang) in enumerate(zip(ids, langs)):
            if isinstance(sid, np.integer):
                sid = int(sid)
            if isinstance(sid, bool) or not isinstance(sid, (int, str)):
                raise ValueError(f"rows[{i}] has source id {sid!r}; source ids must be int or str")
            if not isinstance(lang, str) or not lang:
                raise ValueError(f"rows[{i}] has language {lang!r}; languages must be non-empty strings")
            if (sid, lang) in seen:
                raise ValueError(f"rows holds (source id, lang) = {(sid, lang)!r} twice (at rows[{i}])")
            seen.add((sid, lang))
            self.by_lang.setdefault(lang, []).append(sid)
            if toks is not None:
                t = toks[i]
                if t is None or isinstance(t, bool) or not isinstance(t, (int, float, np.number)) or not (
                    math.isfinite(t) and t >= 0
                ):
                    raise ValueError(f"rows[{i}] has {tokens_field}={t!r}; token counts must be finite and >= 0")
                self.tokens[lang] += float(t)

    def require(self, langs: Iterable[str], arg: str) -> None:
        for lang in langs:
            if lang not in self.by_lang:
                raise ValueError(
                    f"{arg} names language {lang!r}, which has no rows; languages in rows: {sorted(self.by_lang)}"
                )

    def sources(self, langs: Iterable[str]) -> set:
        out: set = set()
        for lang in langs:
            out.update(self.by_lang.get(lang, ()))
        return out

    def languages(self) -> list[str]:
        return sorted(self.by_lang)

    def available(self, lang: str) -> int:
        """Sources available in ``lang``."""
        return len(self.by_lang.get(lang, ()))

    def count_sources(self, langs: Iterable[str]) -> int:
        """Sources available in any of ``langs``."""
        return len(self.sources(langs))

    def _groups(self, active: Sequence[str]) -> dict[frozenset, list]:
        membership: dict[Hashable, set] = collections.defaultdict(set)
        for lang in active:
            for sid in self.by_lang.get(lang, ()):
                membership[sid].add(lang)
        by_group: dict[frozenset, list] = collections.defaultdict(list)
        for sid, langs in membership.items():
            by_group[frozenset(langs)].append(sid)
        return by_group

    def group_sizes(self, active: Sequence[str]) -> dict[frozenset, int]:
        """``{availability group: sources}``: sources by the set of ``active`` languages they are in
        (sources in none are left out)."""
        return {g: len(ids) for g, ids in self._groups(active).items()}

    def group_prefixes(self, active: Sequence[str], quotas: Mapping[frozenset, int], seed: int) -> dict[frozenset, list]:
        """The first ``quotas[g]`` sources of each group ``g`` in the seeded order ``_seeded_order(...,
        seed, "assign")``: the bottom-k of the keys :func:`assign_order_keys` gives."""
        by_group = self._groups(active)
        return {g: _seeded_order(by_group[g], seed, "assign")[:k] for g, k in quotas.items()}


def _corpus(rows, id_field: str, lang_field: str, tokens_field: str | None = None) -> _Corpus:
    """A recipe's corpus: ``rows`` itself when it is one already (handed on, or a GroupedCorpus)."""
    return rows if isinstance(rows, _Corpus) else _Corpus(rows, id_field, lang_field, tokens_field)


def _check_langs(langs, arg: str) -> tuple[str, ...]:
    if isinstance(langs, str):
        raise ValueError(f"{arg} must be a sequence of language codes, got the string {langs!r}")
    langs = tuple(langs)
    if not langs:
        raise ValueError(f"{arg} must name at least one language, got none")
    for lang in langs:
        if not isinstance(lang, str) or not lang:
            raise ValueError(f"{arg} must hold non-empty language codes, got {lang!r}")
    dup = [lang for lang, c in collections.Counter(langs).items() if c > 1]
    if dup:
        raise ValueError(f"{arg} names {dup[0]!r} more than once: {langs!r}")
    return langs


def data_languages(rows, *, id_field: str = "id", lang_field: str = "lang", first: Sequence[str] = STUDY_LANGUAGES
                   ) -> list[str]:
    """The languages that have rows, in the order the recipes default to: those of ``first`` (the study's
    12) in its order, then any others sorted by code. ``rows`` as for the recipes (or a corpus)."""
    present = set(_corpus(rows, id_field, lang_field).languages())
    head = [lang for lang in first if lang in present]
    return head + sorted(present - set(head))


def _languages_or_data(corpus: _Corpus, languages, arg: str = "languages", first: Sequence[str] = STUDY_LANGUAGES
                       ) -> tuple[str, ...]:
    """``languages`` checked, or (None) the languages of the data in the default order."""
    if languages is None:
        return _check_langs(data_languages(corpus, first=first), arg)
    return _check_langs(languages, arg)


# ---------------------------------------------------------------------------------------------------
# seeded orders
def _hash_u64(seed: int, tag: str, value: Hashable) -> int:
    data = f"{tag}\x00{type(value).__name__}\x00{value}".encode()
    key = seed.to_bytes(8, "little")
    return int.from_bytes(hashlib.blake2b(data, digest_size=8, key=key).digest(), "little")


def _seeded_order(items: Sequence, seed: int, tag: str) -> list:
    """items in a pseudo-random order that depends only on (seed, tag, the items)."""
    ints = [x for x in items if isinstance(x, int) and -(2**63) <= x < 2**64]
    if len(ints) == len(items) and items:
        # vectorised: the reservoir's own keyed hash (a bijection, so no ties) for integer ids
        arr = np.array([x & (2**64 - 1) for x in items], dtype=np.uint64)
        code = _hash_u64(0, "code", tag)
        h = core._sample_hash_ids(seed, code, arr)
        return [items[i] for i in np.argsort(h, kind="stable")]
    order = _order_of_strings(seed, tag, items)
    if order is not None:
        return [items[i] for i in order.tolist()]
    return sorted(items, key=lambda x: (_hash_u64(seed, tag, x), type(x).__name__, str(x)))


def _order_of_strings(seed: int, tag: str, items: Sequence) -> np.ndarray | None:
    """The indices of ``items`` (every one a str) in the order of the key ``_seeded_order`` sorts by,
    with every ``_hash_u64(seed, tag, x)`` computed in one call to the core; None where that path does
    not apply (an item that is not a str, a seed outside [0, 2**64), a string that does not encode, or
    two equal hashes, which the key orders by the strings): the caller sorts in Python then."""
    if type(seed) is not int or not 0 <= seed < 1 << 64 or not items or any(type(x) is not str for x in items):
        return None
    try:
        prefix = f"{tag}\x00str\x00".encode()
        encoded = [x.encode() for x in items]
    except UnicodeEncodeError:
        return None
    offsets = np.zeros(len(encoded) + 1, dtype=np.int64)
    np.cumsum(np.fromiter(map(len, encoded), dtype=np.int64, count=len(encoded)), out=offsets[1:])
    values = np.frombuffer(b"".join(encoded), dtype=np.uint8)
    h = core._sample_blake2b64(seed.to_bytes(8, "little"), prefix, values, offsets)
    order = np.argsort(h, kind="stable")
    ranked = h[order]
    if np.any(ranked[1:] == ranked[:-1]):
        return None
    return order


def even_split(total: int, langs: Sequence[str], seed: int = 0) -> dict[str, int]:
    """``total`` spread over ``langs`` so that counts differ by at most one.

    The ``total % len(langs)`` languages that get one more are chosen by the seed. Returns
    ``{lang: count}`` in ``langs`` order.
    """
    langs = _check_langs(langs, "langs")
    if isinstance(total, bool) or not isinstance(total, (int, np.integer)) or total < 0:
        raise ValueError(f"total must be an integer >= 0, got {total!r}")
    base, extra = divmod(int(total), len(langs))
    lucky = set(_seeded_order(list(langs), _check_seed(seed), "even-split")[:extra])
    return {lang: base + (lang in lucky) for lang in langs}


def _largest_remainder(quotas: dict[str, float], total: int, seed: int) -> dict[str, int]:
    """Integers summing to ``total`` closest to the real quotas; ties among remainders by the seed."""
    floors = {lang: int(math.floor(q)) for lang, q in quotas.items()}
    left = total - sum(floors.values())
    order = _seeded_order(list(quotas), seed, "remainder")
    rank = {lang: i for i, lang in enumerate(order)}
    by_remainder = sorted(quotas, key=lambda lang: (-(quotas[lang] - floors[lang]), rank[lang]))
    for lang in by_remainder[: max(0, left)]:
        floors[lang] += 1
    return floors


# ---------------------------------------------------------------------------------------------------
# allocation policies: sizes (examples or tokens) -> per-language budgets
def _check_sizes(sizes: Mapping[str, float]) -> dict[str, float]:
    if not isinstance(sizes, Mapping) or not sizes:
        raise ValueError(f"sizes must be a non-empty dict {{lang: size}}, got {sizes!r}")
    out = {}
    for lang, n in sizes.items():
        if isinstance(n, bool) or not isinstance(n, (int, float, np.number)) or not (math.isfinite(n) and n >= 0):
            raise ValueError(f"sizes[{lang!r}] must be finite and >= 0, got {n!r}")
        out[lang] = float(n)
    if sum(out.values()) == 0:
        raise ValueError(f"sizes are all 0: {sizes!r}")
    return out


def _check_budget(budget) -> int:
    if isinstance(budget, bool) or not isinstance(budget, (int, np.integer)) or budget < 0:
        raise ValueError(f"budget must be an integer >= 0, got {budget!r}")
    return int(budget)


def allocate_proportional(sizes: Mapping[str, float], budget: int, *, seed: int = 0) -> dict[str, int]:
    """Budgets proportional to ``sizes`` (examples or tokens), summing exactly to ``budget``."""
    return allocate_temperature(sizes, budget, alpha=1.0, seed=seed)


def allocate_temperature(sizes: Mapping[str, float], budget: int, *, alpha: float = 0.3, seed: int = 0) -> dict[str, int]:
    """Budgets with ``p_L`` proportional to ``sizes[L] ** alpha`` (mT5/XLM-R use alpha = 0.3).

    alpha = 1 is proportional, alpha = 0 uniform over languages with a non-zero size. Sums exactly to
    ``budget`` (largest remainder); budgets may exceed a size (up-sampling): recipes cap them.
    """
    sizes = _check_sizes(sizes)
    budget = _check_budget(budget)
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not (math.isfinite(alpha) and alpha >= 0):
        raise ValueError(f"alpha must be finite and >= 0, got {alpha!r}")
    mass = {lang: (n**alpha if n > 0 else 0.0) for lang, n in sizes.items()}
    z = sum(mass.values())
    return _largest_remainder({lang: budget * m / z for lang, m in mass.items()}, budget, _check_seed(seed))


def allocate_unimax(
    sizes: Mapping[str, float], budget: int, *, max_epochs: float = 1.0, seed: int = 0
) -> dict[str, int]:
    """UniMax (Chung et al., 2023): a uniform budget per language, capped at ``max_epochs * size``.

    Languages are visited from the smallest; each gets the remaining budget split evenly over the
    languages left, or its cap if smaller. The caps are respected exactly (floored to integers); any
    budget the caps cannot absorb is left unallocated.
    """
    sizes = _check_sizes(sizes)
    budget = _check_budget(budget)
    if isinstance(max_epochs, bool) or not isinstance(max_epochs, (int, float)) or not (
        math.isfinite(max_epochs) and max_epochs > 0
    ):
        raise ValueError(f"max_epochs must be finite and > 0, got {max_epochs!r}")
    seed = _check_seed(seed)
    rank = {lang: i for i, lang in enumerate(_seeded_order(list(sizes), seed, "unimax"))}
    order = sorted(sizes, key=lambda lang: (sizes[lang], rank[lang]))
    out: dict[str, int] = {}
    left = budget
    for i, lang in enumerate(order):
        cap = int(math.floor(sizes[lang] * max_epochs))
        share = even_split(left, order[i:], seed)[lang]
        out[lang] = min(cap, share)
        left -= out[lang]
    return {lang: out[lang] for lang in sizes}


# ---------------------------------------------------------------------------------------------------
# exact disjoint assignment
def _max_flow_assign(groups: list[tuple[frozenset, int]], targets: dict[str, int]) -> dict[tuple[str, int], int]:
    """Max flow source -> lang (cap target) -> group (if lang in group) -> sink (cap group size).

    Returns {(lang, group index): count}. Dinic's algorithm over a graph of (languages + groups) nodes.
    """
    langs = list(targets)
    n = 2 + len(langs) + len(groups)
    src, sink = 0, n - 1
    graph: list[list[int]] = [[] for _ in range(n)]
    to: list[int] = []
    cap: list[int] = []

    def edge(u: int, v: int, c: int) -> int:
        graph[u].append(len(to))
        to.append(v)
        cap.append(c)
        graph[v].append(len(to))
        to.append(u)
        cap.append(0)
        return len(to) - 2

    lang_edges = {}
    for li, lang in enumerate(langs):
        edge(src, 1 + li, targets[lang])
    for gi, (members, size) in enumerate(groups):
        edge(1 + len(langs) + gi, sink, size)
        for li, lang in enumerate(langs):
            if lang in members:
                lang_edges[(lang, gi)] = edge(1 + li, 1 + len(langs) + gi, size)

    while True:
        level = [-1] * n
        level[src] = 0
        queue = collections.deque([src])
        while queue:
            u = queue.popleft()
            for e in graph[u]:
                if cap[e] > 0 and level[to[e]] < 0:
                    level[to[e]] = level[u] + 1
                    queue.append(to[e])
        if level[sink] < 0:
            break
        it = [0] * n

        def push(u: int, f: int) -> int:
            if u == sink:
                return f
            while it[u] < len(graph[u]):
                e = graph[u][it[u]]
                v = to[e]
                if cap[e] > 0 and level[v] == level[u] + 1:
                    d = push(v, min(f, cap[e]))
                    if d > 0:
                        cap[e] -= d
                        cap[e ^ 1] += d
                        return d
                it[u] += 1
            return 0

        while push(src, 1 << 62) > 0:
            pass
    return {key: cap[e ^ 1] for key, e in lang_edges.items() if cap[e ^ 1] > 0}


def _assign(
    corpus: _Corpus, targets: dict[str, int], seed: int, on_shortfall: str
) -> list[tuple[Hashable, str]]:
    """Disjoint rows meeting ``targets`` (see the module docstring), grouped by language."""
    if on_shortfall not in _SHORTFALL:
        raise ValueError(f"on_shortfall must be one of {_SHORTFALL}, got {on_shortfall!r}")
    active = [lang for lang, t in targets.items() if t > 0]
    sizes = corpus.group_sizes(active)
    # deterministic group order: by the languages' positions in targets
    pos = {lang: i for i, lang in enumerate(targets)}
    keys = sorted(sizes, key=lambda g: sorted(pos[lang] for lang in g))
    groups = [(g, sizes[g]) for g in keys]
    flow = _max_flow_assign(groups, {lang: targets[lang] for lang in active})
    got = collections.Counter()
    for (lang, _), c in flow.items():
        got[lang] += c
    short = {lang: targets[lang] - got[lang] for lang in active if got[lang] < targets[lang]}
    if short and on_shortfall == "error":
        avail = {lang: corpus.available(lang) for lang in targets}
        raise ValueError(
            f"the rows cannot meet the targets {targets} with each source in one language "
            f"(short by {short}; sources available per language: {avail}); "
            "pass on_shortfall='take_all' to keep what can be met and report the shortfall"
        )
    chosen: dict[str, list] = {lang: [] for lang in targets}
    # each group's sources in the seeded order, as far as the flow takes them
    quotas = {g: sum(flow.get((lang, gi), 0) for lang in targets) for gi, g in enumerate(keys)}
    prefixes = corpus.group_prefixes(active, {g: k for g, k in quotas.items() if k > 0}, seed)
    for gi, g in enumerate(keys):
        ordered = prefixes.get(g, [])
        start = 0
        for lang in targets:
            c = flow.get((lang, gi), 0)
            chosen[lang].extend(ordered[start : start + c])
            start += c
    out = []
    for lang in targets:
        # one seeded order per language, so that a prefix of a language's rows is a random subset
        out.extend((sid, lang) for sid in _seeded_order(chosen[lang], seed, "rows-" + lang))
    return out


def _mixture(
    recipe: str,
    corpus: _Corpus,
    targets: dict[str, int],
    seed: int,
    on_shortfall: str,
    params: dict,
) -> Mixture:
    rows = _assign(corpus, targets, seed, on_shortfall)
    available = {lang: corpus.available(lang) for lang in targets}
    return Mixture(recipe=recipe, seed=seed, params=params, rows=rows, targets=dict(targets), available=available)


def _total(corpus: _Corpus, langs: Sequence[str], total) -> int:
    """The set size: ``total`` if given, else the number of sources available in any of ``langs``."""
    if total is None:
        return corpus.count_sources(langs)
    if isinstance(total, bool) or not isinstance(total, (int, np.integer)) or total < 0:
        raise ValueError(f"total must be an integer >= 0 (or None for all sources), got {total!r}")
    return int(total)


# ---------------------------------------------------------------------------------------------------
# the study's recipes
def monolingual(
    rows, lang: str, *, n: int | None = None, seed: int = 0, id_field: str = "id", lang_field: str = "lang",
    on_shortfall: str = "error",
) -> Mixture:
    """The set in one language: all its sources (``n=None``) or a seeded random ``n`` of them."""
    seed = _check_seed(seed)
    corpus = _corpus(rows, id_field, lang_field)
    (lang,) = _check_langs([lang], "lang")
    corpus.require([lang], "lang")
    count = _total(corpus, [lang], n)
    return _mixture("monolingual", corpus, {lang: count}, seed, on_shortfall, {"lang": lang, "n": n})


def _pivot_mixture(
    recipe, rows, n_multi, pivot, languages, total, seed, id_field, lang_field, on_shortfall, params, spread_over="others"
):
    seed = _check_seed(seed)
    corpus = _corpus(rows, id_field, lang_field)
    given = languages is not None
    languages = _languages_or_data(corpus, languages)
    if pivot not in languages:
        if given:
            raise ValueError(f"pivot {pivot!r} must be one of languages {languages!r}")
        raise ValueError(f"pivot {pivot!r} has no rows; languages in rows: {list(languages)} (set pivot to one of them)")
    corpus.require(languages, "languages")
    params = params | {"languages": list(languages)}
    size = _total(corpus, languages, total)
    if n_multi > size:
        raise ValueError(f"{recipe}: {n_multi} multilingual examples exceed the set size {size}")
    others = [lang for lang in languages if lang != pivot]
    if n_multi > 0 and not others:
        raise ValueError(f"languages must hold a language besides the pivot {pivot!r}, got {languages!r}")
    spread = list(languages) if spread_over == "all" else others
    split = even_split(n_multi, spread, seed) if spread else {}
    targets = {lang: (size - n_multi if lang == pivot else 0) + split.get(lang, 0) for lang in languages}
    return _mixture(recipe, corpus, targets, seed, on_shortfall, params | {"total": size})


def pinch(
    rows, n_multilingual: int = 40, pivot: str = "en", languages: Sequence[str] | None = None, seed: int = 0,
    *, total: int | None = None, id_field: str = "id", lang_field: str = "lang", on_shortfall: str = "error",
) -> Mixture:
    """The study's "pinch": ``n_multilingual`` examples spread evenly over the non-pivot languages, the
    rest of the set in ``pivot``. The set size (``total``, default all sources) stays constant.

    ``languages`` (default: every language of the rows, the study's 12 first in the study's order, see
    :func:`data_languages`) are the mixture's languages, ``pivot`` among them; ``params["languages"]``
    records the ones used."""
    if isinstance(n_multilingual, bool) or not isinstance(n_multilingual, (int, np.integer)) or n_multilingual < 0:
        raise ValueError(f"n_multilingual must be an integer >= 0, got {n_multilingual!r}")
    params = {"n_multilingual": int(n_multilingual), "pivot": pivot}
    return _pivot_mixture(
        "pinch", rows, int(n_multilingual), pivot, languages, total, seed, id_field, lang_field, on_shortfall, params
    )


def percent_mixture(
    rows, percent: float, pivot: str = "en", languages: Sequence[str] | None = None, seed: int = 0,
    *, total: int | None = None, id_field: str = "id", lang_field: str = "lang", on_shortfall: str = "error",
    spread_over: str = "all",
) -> Mixture:
    """P% of the set (rounded half up) spread evenly over the languages, the rest in ``pivot``.

    ``percent`` is a number in [0, 100] (the study uses 10, 20, ..., 100). With ``spread_over="all"``
    (default) the multilingual share is split over every language of ``languages``, the pivot included,
    so P=100 is the even 12-language mixture that the study compares with monolingual tuning; with
    ``spread_over="others"`` it is split over the non-pivot languages only (as the pinch is).
    ``languages`` defaults to every language of the rows, as for :func:`pinch`.
    """
    if spread_over not in ("all", "others"):
        raise ValueError(f"spread_over must be 'all' or 'others', got {spread_over!r}")
    if isinstance(percent, bool) or not isinstance(percent, (int, float, np.number)) or not (
        math.isfinite(percent) and 0 <= percent <= 100
    ):
        raise ValueError(f"percent must be a number in [0, 100], got {percent!r}")
    # the set size turns P% into a count; the corpus is read once and handed on
    corpus = _corpus(rows, id_field, lang_field)
    size = _total(corpus, _languages_or_data(corpus, languages), total)
    n_multi = int(math.floor(Fraction(percent) * size / 100 + Fraction(1, 2)))
    params = {"percent": percent, "pivot": pivot, "languages": None, "spread_over": spread_over}  # languages: resolved
    return _pivot_mixture(
        "percent_mixture", corpus, n_multi, pivot, languages, size, seed, id_field, lang_field, on_shortfall, params,
        spread_over,
    )


def _even_mixture(recipe, rows, langs, arg, total, seed, id_field, lang_field, on_shortfall, params):
    """The set spread evenly over ``langs`` (``arg``: the argument that named them, for errors)."""
    seed = _check_seed(seed)
    corpus = _corpus(rows, id_field, lang_field)
    corpus.require(langs, arg)
    size = _total(corpus, langs, total)
    return _mixture(recipe, corpus, even_split(size, langs, seed), seed, on_shortfall, params | {"total": size})


def unseen_split(
    rows, tuning: Sequence[str] | None = None, heldout: Sequence[str] = UNSEEN_HELDOUT, seed: int = 0,
    *, total: int | None = None, id_field: str = "id", lang_field: str = "lang", on_shortfall: str = "error",
) -> Mixture:
    """The unseen-language split: the set spread evenly over the ``tuning`` languages (default: the study's,
    en, ar, fi, it, ru, sw, those of them that have rows); ``heldout`` (cs, et, he, hi, es, zh) is recorded
    in ``params`` for evaluation only."""
    corpus = _corpus(rows, id_field, lang_field)
    if tuning is None:
        present = set(corpus.languages())
        tuning = [lang for lang in UNSEEN_TUNING if lang in present]
        if not tuning:
            raise ValueError(f"tuning: none of the study's tuning languages {list(UNSEEN_TUNING)} has rows; languages "
                             f"in rows: {corpus.languages()} (pass tuning= and heldout=)")
    tuning = _check_langs(tuning, "tuning")
    heldout = _check_langs(heldout, "heldout")
    both = sorted(set(tuning) & set(heldout))
    if both:
        raise ValueError(f"tuning and heldout must not share languages, both hold {both}")
    params = {"tuning": list(tuning), "heldout": list(heldout)}
    return _even_mixture("unseen_split", corpus, tuning, "tuning", total, seed, id_field, lang_field, on_shortfall, params)


def language_diversity(
    rows, k: int, order: Sequence[str] | None = None, seed: int = 0,
    *, total: int | None = None, id_field: str = "id", lang_field: str = "lang", on_shortfall: str = "error",
) -> Mixture:
    """The same budget spread evenly over the first ``k`` languages of ``order`` (1 <= k <= len(order)).

    ``order`` defaults to the languages of the rows: those of :data:`DIVERSITY_ORDER` (en, ar, fi, it, ru, sw)
    first in that order, then the rest of the study's 12 in the study's order, then any others by code."""
    corpus = _corpus(rows, id_field, lang_field)
    if order is None:
        order = data_languages(corpus, first=tuple(DIVERSITY_ORDER) + tuple(
            lang for lang in STUDY_LANGUAGES if lang not in DIVERSITY_ORDER))
    order = _check_langs(order, "order")
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 1 <= k <= len(order):
        raise ValueError(f"k must be an integer in [1, {len(order)}] (the number of languages in order), got {k!r}")
    langs = order[: int(k)]
    params = {"k": int(k), "order": list(order)}
    return _even_mixture("language_diversity", corpus, langs, "order", total, seed, id_field, lang_field, on_shortfall,
                         params)


def bilingual(
    rows, pair: Sequence[str], seed: int = 0,
    *, total: int | None = None, id_field: str = "id", lang_field: str = "lang", on_shortfall: str = "error",
) -> Mixture:
    """Two languages at 50%/50% (an odd total gives one of them, chosen by the seed, one more)."""
    pair = _check_langs(pair, "pair")
    if len(pair) != 2:
        raise ValueError(f"pair must name exactly two languages, got {pair!r}")
    params = {"pair": list(pair)}
    return _even_mixture("bilingual", rows, pair, "pair", total, seed, id_field, lang_field, on_shortfall, params)


def _policy_mixture(recipe, rows, languages, total, seed, id_field, lang_field, on_shortfall, tokens, allocate, params):
    seed = _check_seed(seed)
    corpus = _corpus(rows, id_field, lang_field, tokens)
    langs = _check_langs(languages if languages is not None else corpus.languages(), "languages")
    corpus.require(langs, "languages")
    n_avail = {lang: corpus.available(lang) for lang in langs}
    if tokens is None:
        sizes = n_avail
        budget = _total(corpus, langs, total)
        targets = allocate(sizes, budget)
    else:
        # budgets in tokens, turned into example counts with each language's mean example length
        sizes = {lang: corpus.tokens[lang] for lang in langs}
        budget = int(sum(sizes.values())) if total is None else _check_budget(total)
        token_targets = allocate(sizes, budget)
        targets = {
            lang: (int(round(token_targets[lang] * n_avail[lang] / sizes[lang])) if sizes[lang] > 0 else 0)
            for lang in langs
        }
    params = params | {"languages": list(langs), "total": budget, "unit": "tokens" if tokens else "examples"}
    return _mixture(recipe, corpus, targets, seed, on_shortfall, params)


def temperature(
    rows, alpha: float = 0.3, languages: Sequence[str] | None = None, seed: int = 0,
    *, total: int | None = None, tokens: str | None = None, id_field: str = "id", lang_field: str = "lang",
    on_shortfall: str = "error",
) -> Mixture:
    """Temperature sampling: budgets proportional to (language size) ** alpha.

    Sizes are the languages' example counts, or token counts summed from the field ``tokens`` (then
    ``total`` is in tokens too, and token budgets become example counts by each language's mean
    length). A budget above what a language has is a shortfall (``on_shortfall``).
    """
    params = {"alpha": alpha}
    return _policy_mixture(
        "temperature", rows, languages, total, seed, id_field, lang_field, on_shortfall, tokens,
        lambda sizes, budget: allocate_temperature(sizes, budget, alpha=alpha, seed=seed), params,
    )


def unimax(
    rows, total: int | None = None, max_epochs: float = 1.0, languages: Sequence[str] | None = None, seed: int = 0,
    *, tokens: str | None = None, id_field: str = "id", lang_field: str = "lang", on_shortfall: str = "error",
) -> Mixture:
    """UniMax: a uniform budget per language, capped at ``max_epochs`` passes over its data.

    Each source appears at most once, so ``max_epochs`` must be <= 1 here (use
    :func:`allocate_unimax` for budgets with repetition).
    """
    if isinstance(max_epochs, bool) or not isinstance(max_epochs, (int, float)) or not 0 < max_epochs <= 1:
        raise ValueError(f"max_epochs must be in (0, 1] for a mixture without repeats, got {max_epochs!r}")
    params = {"max_epochs": max_epochs}
    return _policy_mixture(
        "unimax", rows, languages, total, seed, id_field, lang_field, on_shortfall, tokens,
        lambda sizes, budget: allocate_unimax(sizes, budget, max_epochs=max_epochs, seed=seed), params,
    )


# ---------------------------------------------------------------------------------------------------
# a corpus known by counts (the build's mix stage, on either executor)
class GroupedCorpus(_Corpus):
    """A parallel corpus given by counts, for recipes run where the rows do not fit one process.

    Pass it as a recipe's ``rows``: the recipe computes its targets and the exact assignment from
    ``groups`` alone, then asks ``prefixes`` for the first ``k`` sources of each availability group in
    the seeded order (the bottom-k of a keyed hash: per-block reservoirs merged exactly give them, see
    mlmix.engine.stages.mix). The Mixture equals the one the rows themselves give.

    Args:
        groups: ``{languages: number of sources}``, where ``languages`` (any iterable of codes) is the
            full set of languages a source is available in.
        tokens: ``{lang: tokens summed over its rows}`` (for recipes with ``tokens=``).
        prefixes: ``prefixes(active, quotas, seed) -> {group: [source ids]}`` where a group is a
            frozenset of active languages and ``quotas`` maps groups to counts (see
            :meth:`_Corpus.group_prefixes`).
    """

    def __init__(self, groups: Mapping[Iterable[str], int], tokens: Mapping[str, float], prefixes) -> None:
        self.groups = {frozenset(g): int(n) for g, n in groups.items() if int(n) > 0}
        self.tokens = collections.defaultdict(float, {k: float(v) for k, v in tokens.items()})
        self._prefixes = prefixes
        self._langs = sorted(set().union(*self.groups)) if self.groups else []

    def require(self, langs: Iterable[str], arg: str) -> None:
        for lang in langs:
            if lang not in self._langs:
                raise ValueError(f"{arg} names language {lang!r}, which has no rows; languages in rows: {self._langs}")

    def sources(self, langs: Iterable[str]) -> set:
        raise NotImplementedError("a GroupedCorpus knows its sources by count only")

    def languages(self) -> list[str]:
        return list(self._langs)

    def available(self, lang: str) -> int:
        return sum(n for g, n in self.groups.items() if lang in g)

    def count_sources(self, langs: Iterable[str]) -> int:
        want = set(langs)
        return sum(n for g, n in self.groups.items() if g & want)

    def group_sizes(self, active: Sequence[str]) -> dict[frozenset, int]:
        out: dict[frozenset, int] = collections.Counter()
        act = frozenset(active)
        for g, n in self.groups.items():
            if g & act:
                out[g & act] += n
        return dict(out)

    def group_prefixes(self, active: Sequence[str], quotas: Mapping[frozenset, int], seed: int) -> dict[frozenset, list]:
        got = self._prefixes(list(active), dict(quotas), seed)
        for g, k in quotas.items():
            if len(got.get(g, ())) != k:
                raise RuntimeError(f"group {sorted(g)}: {len(got.get(g, ()))} sources came back for a quota of {k}")
        return got


def assign_order_key(seed: int, source_id) -> tuple:
    """The sort key of ``source_id`` in an availability group whose ids are not all 64-bit integers
    (``_seeded_order(..., seed, "assign")``); groups of integer ids sort by StratifiedReservoir keys of
    the stratum :data:`ASSIGN_STRATUM` instead (a bijective hash, so no ties)."""
    return (_hash_u64(seed, "assign", source_id), type(source_id).__name__, str(source_id))


def assign_bottom_k(seed: int, ids: list, k: int) -> list:
    """``heapq.nsmallest(k, ids, key=lambda x: assign_order_key(seed, x))``: the first ``k`` of ``ids`` in
    the seeded "assign" order (string ids hashed in the core)."""
    if k <= 0:
        return []
    order = _order_of_strings(seed, "assign", ids)
    if order is not None:
        return [ids[i] for i in order[:k].tolist()]
    return heapq.nsmallest(k, ids, key=lambda x: assign_order_key(seed, x))


ASSIGN_STRATUM = _hash_u64(0, "code", "assign")  # the stratum code of _seeded_order(..., "assign") on int ids
