"""Language fidelity: the share of responses written in the language of their instruction.

Each response is identified with py3langid (through :mod:`mlmix.langid`, as the pipeline does). By default the
candidate labels are the evaluation's own languages plus English: a tuned model's usual failure is answering in
English (or in a neighbouring language of the set), and restricting the labels makes short answers in closely
related varieties reliable (unrestricted, py3langid labels some short Chinese answers ``wuu`` or ``yue``). The
price: an answer in a language outside the candidates is labelled with the nearest candidate, which may be the
instruction's own language. ``candidates="all"`` uses all 97 py3langid languages instead.

An empty (or whitespace-only) response is a failure: it stays in the denominator and is also counted in
``empty``. A language that py3langid does not know is reported with ``unsupported: true`` and no share.
"""

from __future__ import annotations

import math
from typing import Mapping, Optional, Sequence, Union

from .stats import DEFAULT_ALPHA, check_ci_args, wilson_ci

__all__ = ["language_fidelity"]

# the pipeline's language identification (same model, settings and text limit), so both read a text alike
from ..langid import LanguageIdentifier, known_languages  # noqa: E402


def language_fidelity(
    responses: Sequence[Mapping],
    *,
    languages: Optional[Sequence[str]] = None,
    candidates: Union[str, Sequence[str]] = "eval",
    threshold: float = 0.0,
    alpha: float = DEFAULT_ALPHA,
) -> dict:
    """Per language, how many responses are in the instruction's language.

    Args:
        responses: dicts with ``lang`` (the instruction's language) and ``response`` (str; None or a non-string
            counts as empty), optionally ``id``.
        languages: the languages to report, in order (a language without responses is reported with n = 0);
            None: those present, in order of first appearance.
        candidates: ``"eval"`` (the reported languages plus ``"en"``), ``"all"`` (every py3langid language) or an
            explicit list of codes.
        threshold: a detection whose (normalised) probability is below it counts as ``unknown`` (a failure).
        alpha: the intervals are Wilson score intervals at level 1 - alpha.

    Returns ``{"candidates": [...] or "all", "threshold", "languages": {lang: {"n", "in_language", "empty",
    "share", "share_ci", "detected": {code: count}}}, "items": [{"id", "lang", "detected", "prob", "ok"}]}``.
    """
    check_ci_args(1, alpha)
    if not isinstance(threshold, (int, float)) or not 0.0 <= threshold <= 1.0:
        raise ValueError(f"threshold must be in [0, 1], got {threshold!r}")
    if isinstance(responses, (str, bytes, Mapping)):
        raise TypeError(f"responses must be a sequence of dicts, got {type(responses).__name__}")
    rows = []
    for i, r in enumerate(responses):
        if not isinstance(r, Mapping):
            raise TypeError(f"responses[{i}] must be a dict, got {type(r).__name__}")
        lang = r.get("lang")
        if not isinstance(lang, str) or not lang:
            raise ValueError(f"responses[{i}] must carry the instruction's language code in 'lang', got {lang!r}")
        text = r.get("response")
        rows.append((str(r.get("id", i)), lang, text if isinstance(text, str) else ""))
    order = list(dict.fromkeys(languages)) if languages is not None else list(dict.fromkeys(l for _, l, _ in rows))

    known = set(known_languages())
    if isinstance(candidates, str):
        if candidates not in ("eval", "all"):
            raise ValueError(f"candidates must be 'eval', 'all' or a list of language codes, got {candidates!r}")
        chosen = None if candidates == "all" else sorted({*order, "en"} & known)
    else:
        chosen = list(dict.fromkeys(candidates))
        unknown = [c for c in chosen if c not in known]
        if unknown:
            raise ValueError(f"candidates: py3langid does not know {unknown}; known codes include {sorted(known)[:12]}")
    lid = LanguageIdentifier(chosen)

    items, by_lang = [], {}
    for lang in order:
        by_lang[lang] = {"n": 0, "in_language": 0, "empty": 0, "share": math.nan, "share_ci": [math.nan, math.nan],
                         "detected": {}, "unsupported": lang not in known}
    for item_id, lang, text in rows:
        if lang not in by_lang:
            continue
        res = by_lang[lang]
        res["n"] += 1
        if not text.strip():
            res["empty"] += 1
            detected, prob = "", 0.0
        else:
            detected, prob = lid.classify(text)
            if prob < threshold:
                detected = "unknown"
            res["detected"][detected] = res["detected"].get(detected, 0) + 1
        ok = bool(text.strip()) and detected == lang
        res["in_language"] += ok
        items.append({"id": item_id, "lang": lang, "detected": detected, "prob": prob, "ok": ok})
    for res in by_lang.values():
        if res["n"] and not res["unsupported"]:
            res["share"] = res["in_language"] / res["n"]
            res["share_ci"] = list(wilson_ci(res["in_language"], res["n"], alpha=alpha))
        res["detected"] = dict(sorted(res["detected"].items(), key=lambda kv: (-kv[1], kv[0])))
    return {"candidates": "all" if chosen is None else chosen, "threshold": threshold, "alpha": alpha,
            "languages": by_lang, "items": items}
