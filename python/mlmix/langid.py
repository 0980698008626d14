"""Language identification for records that carry no language code (py3langid, normalised probabilities).

A prediction whose probability is below ``threshold`` goes to the ``unknown`` bucket (or is dropped,
by the config's choice): a wrong language is worse than an honest "unknown" for a balanced mixture.
"""

from __future__ import annotations

import copy
import functools
from typing import Iterable, Sequence

from ._deps import require

__all__ = ["LanguageIdentifier", "identify", "known_languages"]

# py3langid reads the first few KB well enough; longer texts only cost time
_MAX_CHARS = 2000


@functools.lru_cache(maxsize=1)
def _full_model():
    require("py3langid", "language identification")
    from py3langid import langid

    return langid.LanguageIdentifier.from_model_file(langid.MODEL_FILE, norm_probs=True)


def known_languages() -> tuple[str, ...]:
    """The language codes py3langid can return (the labels of its model, loaded on first use)."""
    return tuple(_full_model().labels)


class LanguageIdentifier:
    """``classify(text) -> (lang, probability)`` with py3langid, optionally restricted to ``languages``."""

    def __init__(self, languages: Sequence[str] | None = None) -> None:
        # loading the model takes about a second; copies share its arrays (set_languages makes new ones)
        self._model = copy.copy(_full_model())
        if languages:
            known = set(self._model.labels)
            unknown = sorted(set(languages) - known)
            if unknown:
                raise ValueError(
                    f"langid.languages: py3langid does not know {unknown}; it knows {len(known)} codes such as "
                    f"{sorted(known)[:12]}"
                )
            self._model.set_languages(list(languages))

    def classify(self, text: str) -> tuple[str, float]:
        if not text.strip():
            return "", 0.0
        lang, prob = self._model.classify(text[:_MAX_CHARS])
        return str(lang), float(prob)


def identify(
    texts: Iterable[str],
    *,
    threshold: float = 0.5,
    unknown: str = "unknown",
    languages: Sequence[str] | None = None,
    on_item=None,
) -> tuple[list[str], list[float]]:
    """Language code (or ``unknown``) and probability of each text."""
    if not 0.0 <= threshold <= 1.0:
        raise ValueError(f"threshold must be in [0, 1], got {threshold!r}")
    lid = LanguageIdentifier(languages)
    langs: list[str] = []
    probs: list[float] = []
    for t in texts:
        lang, p = lid.classify(t)
        langs.append(lang if lang and p >= threshold else unknown)
        probs.append(p)
        if on_item is not None:
            on_item()
    return langs, probs
