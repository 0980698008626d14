"""The study's arms: each family of the paper's grid expanded into named mixtures over one parallel set.

An arm is one mixture recipe with its parameters (``mlmix.recipes``); with a seed it becomes one training run.
Every arm keeps the set size of the data (all sources), so arms differ only in how the examples are spread
over languages, as in the paper.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping, Sequence

from .. import recipes

__all__ = ["Arm", "expand_arms", "study_languages", "unseen_languages", "diversity_order"]


@dataclass(frozen=True)
class Arm:
    """One cell of the grid.

    Attributes:
        arm: the unique id (``"pinch-n40"``, ``"percent-p10"``, ``"mono-fi"``, ``"diversity-k3"``,
            ``"bilingual-en-fi"``, ``"unseen"``, ``"temperature-a0.3"``, ``"unimax"``).
        family: one of :data:`mlmix.study.config.FAMILIES`.
        param: the family's parameter (``{"lang": "fi"}``, ``{"n": 40}``, ``{"p": 10}``, ``{"k": 3}``,
            ``{"pair": ["en", "fi"]}``, ``{"alpha": 0.3}`` or ``{}``).
        mixture: the build's ``[mixture]`` table (a recipe of :mod:`mlmix.recipes` and its arguments).
    """

    arm: str
    family: str
    param: dict = field(hash=False)
    mixture: dict = field(hash=False)


def _num(x) -> str:
    return str(int(x)) if float(x).is_integer() else repr(float(x))


def study_languages(available: Sequence[str], wanted: Sequence[str] | None) -> list[str]:
    """The study's languages: ``wanted`` (each must have rows), else those of the data, the paper's 12 first in
    the paper's order (:func:`mlmix.recipes.data_languages`)."""
    if wanted is None:
        return recipes.data_languages([{"id": 0, "lang": lang} for lang in available])
    missing = [lang for lang in wanted if lang not in available]
    if missing:
        raise ValueError(f"languages: {missing} have no training rows; languages in data.train: {sorted(available)}")
    return list(wanted)


def unseen_languages(languages: Sequence[str], seen: Sequence[str] | None) -> tuple[list[str], list[str]]:
    """(seen, unseen) of the unseen-language split: ``seen`` (default the paper's en, ar, fi, it, ru, sw) among
    the study's languages, the rest held out."""
    if seen is None:
        seen = [lang for lang in recipes.UNSEEN_TUNING if lang in languages]
    else:
        bad = [lang for lang in seen if lang not in languages]
        if bad:
            raise ValueError(f"arms.seen: {bad} are not among the study's languages {list(languages)}")
    return list(seen), [lang for lang in languages if lang not in seen]


def diversity_order(languages: Sequence[str], order: Sequence[str] | None) -> list[str]:
    """The order in which language-diversity arms add languages: ``order``, else the paper's tuning
    languages (en, ar, fi, it, ru, sw) then the study's others, restricted to the study's languages."""
    if order is None:
        first = [lang for lang in recipes.DIVERSITY_ORDER if lang in languages]
        return first + [lang for lang in languages if lang not in first]
    bad = [lang for lang in order if lang not in languages]
    if bad:
        raise ValueError(f"arms.diversity_order: {bad} are not among the study's languages {list(languages)}")
    return list(order)


def expand_arms(arms_cfg: Mapping, languages: Sequence[str]) -> list[Arm]:
    """The arms a validated ``[arms]`` table asks for, in the order of :data:`FAMILIES`. Raises ValueError
    naming the key when a value does not fit the study's languages."""
    langs = list(languages)
    pivot = arms_cfg["pivot"]
    out: list[Arm] = []

    def need(key: str, wanted: Sequence[str]) -> None:
        bad = [lang for lang in wanted if lang not in langs]
        if bad:
            raise ValueError(f"{key}: {bad} are not among the study's languages {langs}")

    mono = langs if arms_cfg["monolingual"] is True else arms_cfg["monolingual"]
    need("arms.monolingual", mono)
    for lang in mono:
        out.append(Arm(f"mono-{lang}", "monolingual", {"lang": lang}, {"recipe": "monolingual", "lang": lang}))
    if arms_cfg["pinch"] or arms_cfg["percent"]:
        need("arms.pivot", [pivot])
    others = len(langs) - 1
    for n in arms_cfg["pinch"]:
        if n > 0 and others < 1:
            raise ValueError(f"arms.pinch: {n} multilingual examples need a language besides the pivot {pivot!r}; "
                             f"the study's languages are {langs}")
        out.append(Arm(f"pinch-n{n}", "pinch", {"n": n},
                       {"recipe": "pinch", "n_multilingual": n, "pivot": pivot, "languages": langs}))
    for p in arms_cfg["percent"]:
        # spread over every language, the pivot included: P = 100 is the even mixture (recipes.percent_mixture)
        out.append(Arm(f"percent-p{_num(p)}", "percent", {"p": p},
                       {"recipe": "percent_mixture", "percent": p, "pivot": pivot, "languages": langs}))
    if arms_cfg["unseen"]:
        seen, unseen = unseen_languages(langs, arms_cfg["seen"])
        if not seen:
            raise ValueError(f"arms.unseen: none of the tuning languages {list(recipes.UNSEEN_TUNING)} is among the "
                             f"study's languages {langs}; set arms.seen")
        out.append(Arm("unseen", "unseen", {}, {"recipe": "unseen_split", "tuning": seen, "heldout": unseen}))
    order = diversity_order(langs, arms_cfg["diversity_order"])
    ks = list(range(1, len(order) + 1)) if arms_cfg["diversity"] is True else arms_cfg["diversity"]
    for k in ks:
        if k > len(order):
            raise ValueError(f"arms.diversity: k = {k} exceeds the {len(order)} languages of the diversity order "
                             f"{order}; accepted k are 1..{len(order)}")
        out.append(Arm(f"diversity-k{k}", "diversity", {"k": k},
                       {"recipe": "language_diversity", "k": k, "order": order}))
    bil = [lang for lang in langs if lang != pivot] if arms_cfg["bilingual"] is True else arms_cfg["bilingual"]
    need("arms.bilingual", bil)
    for lang in bil:
        if lang == pivot:
            raise ValueError(f"arms.bilingual: {lang!r} is the pivot; list the languages X of the pairs "
                             f"({pivot} + X), e.g. [\"fi\"]")
        pair = [pivot, lang]
        out.append(Arm(f"bilingual-{pivot}-{lang}", "bilingual", {"pair": pair}, {"recipe": "bilingual", "pair": pair}))
    for alpha in arms_cfg["temperature"]:
        out.append(Arm(f"temperature-a{_num(alpha)}", "temperature", {"alpha": alpha},
                       {"recipe": "temperature", "alpha": alpha, "languages": langs}))
    if arms_cfg["unimax"]:
        out.append(Arm("unimax", "unimax", {}, {"recipe": "unimax", "languages": langs}))
    if not out:
        raise ValueError("arms: no arm selected; set at least one of monolingual, pinch, percent, unseen, diversity, "
                         "bilingual, temperature or unimax (e.g. pinch = [40])")
    return out
