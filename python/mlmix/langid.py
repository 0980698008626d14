"""Language identification for records that carry no language code (py3langid's model, normalised
probabilities).

Two backends compute the same thing: ``"native"`` (the default) runs py3langid's classifier in the C++
core, a batch at a time over threads with the GIL released; ``"py3langid"`` calls py3langid itself, one
text at a time, and stays the reference. Both read py3langid's own model file (nothing is vendored),
cut each text to its first 2000 code points and return ``("", 0.0)`` for a text that is empty after
``str.strip()``. Labels are the same (0 disagreements on the tests' texts and 129k documents of
bench/RESULTS.md; only a near-tie within py3langid's float32 rounding could differ); probabilities agree to
that rounding (the native sums are exact, py3langid's float32 ones depend on the BLAS kernel: ~1e-7 to 2e-4
relative), and equal py3langid's pipeline evaluated in float64 to 1e-9.

A prediction whose probability is below ``threshold`` goes to the ``unknown`` bucket (or is dropped,
by the config's choice): a wrong language is worse than an honest "unknown" for a balanced mixture.
"""

from __future__ import annotations

import copy
import functools
import unicodedata
from typing import Any, Iterable, Sequence

import numpy as np

from ._deps import require

__all__ = ["LanguageIdentifier", "identify", "known_languages", "BACKENDS"]

# py3langid reads the first few KB well enough; longer texts only cost time
_MAX_CHARS = 2000
BACKENDS = ("native", "py3langid")
# counts of one feature in one text stay far below this (a text is cut to 2000 code points)
_LOG1P_SIZE = 1 << 16
_BATCH = 4096  # identify(): texts per native call (progress is reported between calls)


def _py3langid():
    require("py3langid", "language identification")
    from py3langid import langid

    return langid


@functools.lru_cache(maxsize=1)
def _full_model():
    langid = _py3langid()
    return langid.LanguageIdentifier.from_model_file(langid.MODEL_FILE, norm_probs=True)


@functools.lru_cache(maxsize=1)
def _classes() -> tuple[str, ...]:
    """The model's class of each column (a label can own two columns: py3langid merges them)."""
    if _full_model.cache_info().currsize:
        return tuple(_full_model().nb_classes)
    return tuple(_native_model()[1])


def known_languages() -> tuple[str, ...]:
    """The language codes py3langid can return (the labels of its model, loaded on first use)."""
    return tuple(dict.fromkeys(_classes()))


@functools.lru_cache(maxsize=1)
def _text_rules() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """What the native text preparation needs to know of Unicode, from this Python's own unicodedata
    and str methods (so it agrees with py3langid's _encode, which uses them): per code point a flag byte
    (csrc/langid.h: isspace, isupper, lower or title case, NFC quick check No / Maybe, has a canonical
    decomposition) and its canonical
    combining class, and the sorted canonical composition pairs ``(first << 21) | second``."""
    n = 0x110000
    flags = np.zeros(n, np.uint8)
    ccc = np.zeros(n, np.uint8)
    pairs: list[int] = []
    combining, decomposition, normalize = unicodedata.combining, unicodedata.decomposition, unicodedata.normalize
    for cp in range(n):
        ch = chr(cp)
        f = 0
        if ch.isspace():
            f |= 1
        if ch.isupper():
            f |= 2
        if not (ch + "A").isupper():  # lower or title case: the text cannot be all upper case
            f |= 4
        c = combining(ch)
        if c:
            ccc[cp] = c
        d = decomposition(ch)
        if d and d[0] != "<":  # a canonical decomposition
            f |= 32
            if normalize("NFC", ch) != ch:
                f |= 8
            parts = d.split()
            if len(parts) == 2:
                a, b = int(parts[0], 16), int(parts[1], 16)
                if normalize("NFC", chr(a) + chr(b)) == ch:  # a primary composite
                    pairs.append((a << 21) | b)
        if f:
            flags[cp] = f
    seconds = np.array([p & 0x1FFFFF for p in pairs], np.int64)
    flags[seconds] |= 16
    flags[0x1161:0x1176] |= 16  # Hangul vowel and trailing jamo compose algorithmically
    flags[0x11A8:0x11C3] |= 16
    return flags, ccc, np.array(sorted(pairs), np.uint64)


@functools.lru_cache(maxsize=1)
def _native_model():
    """(the core's model, the class of each column), from py3langid's model file (its own loader)."""
    from ._core_loader import core

    arrays, classes = _prepared_model()
    model = core._LangidModel(
        arrays["nextmove"], arrays["state_row"], arrays["output"], arrays["ptc"], float(arrays["unit"][0]),
        arrays["pc"], arrays["log1p"], arrays["flags"], arrays["ccc"], arrays["pairs"])
    return model, classes


_PREPARED_VERSION = 1  # what _prepare_model writes; a change of it prepares the model again
_PREPARED = ("nextmove", "state_row", "output", "ptc", "unit", "pc", "log1p", "flags", "ccc", "pairs")


def _prepared_model() -> tuple[dict, tuple[str, ...]]:
    """The arrays the core's model is built from, prepared from py3langid's model file and this Python's
    Unicode database (~2.5 s: decompressing the model, a pass over every code point) once, then read back
    from the mlmix cache (keyed by the model file's path, size and mtime, the Unicode version and the
    format), memory-mapped: the core copies what it keeps."""
    import hashlib
    import json
    import os

    from ._tiktoken import cache_dir

    langid = _py3langid()
    path = os.path.join(str(langid.MODEL_DIR), str(langid.MODEL_FILE))
    st = os.stat(path)
    ident = json.dumps([_PREPARED_VERSION, os.path.abspath(path), st.st_size, st.st_mtime_ns,
                        unicodedata.unidata_version])
    d = os.path.join(cache_dir(), "langid", hashlib.sha256(ident.encode()).hexdigest()[:32])
    try:
        with open(os.path.join(d, "classes.json"), encoding="utf-8") as f:
            classes = tuple(json.load(f))
        arrays = {k: np.load(os.path.join(d, k + ".npy"), mmap_mode="r") for k in _PREPARED}
        return arrays, classes
    except (OSError, ValueError):  # absent or damaged: prepared again
        pass
    arrays, classes = _prepare_model(path)
    import shutil
    import tempfile

    tmp = None
    try:  # written beside, then renamed into place: a reader never sees half a model
        os.makedirs(os.path.dirname(d), exist_ok=True)
        tmp = tempfile.mkdtemp(prefix=".tmp-", dir=os.path.dirname(d))
        for k, a in arrays.items():
            np.save(os.path.join(tmp, k + ".npy"), a)
        with open(os.path.join(tmp, "classes.json"), "w", encoding="utf-8") as f:
            json.dump(list(classes), f)
        shutil.rmtree(d, ignore_errors=True)  # a damaged entry
        os.rename(tmp, d)
        tmp = None
    except OSError:  # a read-only cache directory, or another process just wrote it: not remembered here
        pass
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    return arrays, classes


def _prepare_model(path) -> tuple[dict, tuple[str, ...]]:
    from py3langid import modelio

    ptc, pc, classes, nextmove, state_row, out = modelio.load_model(path)
    ptc, unit = _fixed_point(np.asarray(ptc))
    nm = np.frombuffer(nextmove, dtype=f"u{nextmove.itemsize}")
    rows = np.frombuffer(state_row, dtype=f"u{state_row.itemsize}")
    flags, ccc, pairs = _text_rules()
    arrays = {"nextmove": nm.astype(np.uint32), "state_row": rows.astype(np.uint32),
              "output": np.asarray(out, np.int32), "ptc": ptc, "unit": np.array([unit], np.float64),
              "pc": np.ascontiguousarray(pc, np.float32),
              # the exact float32 log1p py3langid multiplies by (numpy's, for every possible count)
              "log1p": np.log1p(np.arange(_LOG1P_SIZE, dtype=np.float32)),
              "flags": flags, "ccc": ccc, "pairs": pairs}
    return arrays, tuple(str(c) for c in classes)


def _fixed_point(ptc: np.ndarray) -> tuple[np.ndarray, float]:
    """py3langid's float16 table as int16 times a power of two, exactly (a half is an 11-bit integer times
    2**(e - 10); the smallest exponent present gives the unit). The core sums these integers exactly."""
    if ptc.dtype != np.float16:
        raise ValueError(f"langid model: expected a float16 ptc table, got {ptc.dtype}")
    bits = ptc.view(np.uint16)
    exponents = (bits >> 10) & 0x1F
    if not exponents.size or (exponents == 0x1F).any():
        raise ValueError("langid model: the ptc table is empty or holds inf / nan")
    e_min = int(np.maximum(exponents, 1).min()) - 15  # subnormals share the smallest normal exponent
    del exponents
    unit = 2.0 ** (e_min - 10)
    out = np.empty(ptc.shape, np.int16)
    step = 4096  # rows at a time: the float32 temporaries stay small (the table is ~28 MB of halves)
    for r in range(0, ptc.shape[0], step):
        fixed = ptc[r:r + step].astype(np.float32) * np.float32(1.0 / unit)  # exact: a power of two
        if np.abs(fixed).max() > 32767:
            raise ValueError("langid model: the ptc table's range is too wide for the native backend's int16 table")
        out[r:r + step] = fixed
        if not np.array_equal(out[r:r + step], fixed):  # pragma: no cover - exact by construction
            raise ValueError("langid model: the ptc table is not exact in fixed point")
    return out, unit


def _selection(classes: Sequence[str], languages: Sequence[str] | None):
    """Columns of the chosen languages (py3langid's set_languages) and their labels, numbered by first column."""
    keep = set(languages) if languages else None
    columns = [i for i, c in enumerate(classes) if keep is None or c in keep]
    names: dict[str, int] = {}
    labels = [names.setdefault(classes[i], len(names)) for i in columns]
    return np.asarray(columns, np.int32), np.asarray(labels, np.int32), tuple(names)


def _is_utf8_pair(texts: Any) -> bool:
    return isinstance(texts, tuple) and len(texts) == 2 and all(isinstance(a, np.ndarray) for a in texts)


class LanguageIdentifier:
    """``classify(text) -> (lang, probability)`` and ``classify_batch(texts) -> (langs, probs)``, optionally
    restricted to ``languages``; ``backend`` "native" (the C++ core) or "py3langid" (the reference).
    ``num_threads``: the native backend's threads (0: all cores, or ``MLMIX_NUM_THREADS``); results do not
    depend on it."""

    def __init__(self, languages: Sequence[str] | None = None, backend: str = "native", num_threads: int = 0) -> None:
        if backend not in BACKENDS:
            raise ValueError(f"langid backend must be one of {BACKENDS}, got {backend!r}")
        if not isinstance(num_threads, int) or isinstance(num_threads, bool) or not 0 <= num_threads <= 4096:
            raise ValueError(f"num_threads must be an int in [0, 4096], got {num_threads!r}")
        self.backend = backend
        self.num_threads = num_threads
        if languages is not None and isinstance(languages, str):
            raise TypeError("languages must be a sequence of language codes, not a single str")
        if backend == "py3langid":
            # loading the model takes about a second; copies share its arrays (set_languages makes new ones)
            self._model = copy.copy(_full_model())
            classes = tuple(self._model.nb_classes)
        else:
            self._native, classes = _native_model()
        if languages:
            known = set(classes)
            unknown = sorted(set(languages) - known)
            if unknown:
                raise ValueError(
                    f"langid.languages: py3langid does not know {unknown}; it knows {len(known)} codes such as "
                    f"{sorted(known)[:12]}"
                )
            if backend == "py3langid":
                self._model.set_languages(list(languages))
        self._columns, self._labels, self.labels = _selection(classes, languages or None)
        self._names = np.array(list(self.labels) + [""], dtype=object)  # label index -> code; -1 (empty) -> ""

    def classify(self, text: str) -> tuple[str, float]:
        if self.backend == "py3langid":
            if not text.strip():
                return "", 0.0
            lang, prob = self._model.classify(text[:_MAX_CHARS])
            return str(lang), float(prob)
        langs, probs = self.classify_batch([text])
        return langs[0], float(probs[0])

    def classify_batch(self, texts: Sequence[str] | tuple[np.ndarray, np.ndarray]) -> tuple[list[str], np.ndarray]:
        """Language code ("" for an empty text) and probability (float64) of every text: a list of str, or
        ``(values, offsets)``, UTF-8 bytes (uint8) and int64 offsets (count + 1). Invalid UTF-8 raises a
        ValueError that names the text."""
        if self.backend == "py3langid":
            if _is_utf8_pair(texts):
                texts = _decode_all(*texts)
            pairs = [self.classify(t) for t in texts]
            return [p[0] for p in pairs], np.array([p[1] for p in pairs], np.float64)
        labels, probs = self._native_labels(texts)
        return self._names[labels].tolist(), probs

    def _native_labels(self, texts) -> tuple[np.ndarray, np.ndarray]:
        """The core's label indices (-1: empty) and probabilities; texts the core cannot prepare alone
        (all upper case, or perhaps not NFC) go through py3langid's own _encode first."""
        from ._core_loader import core

        if _is_utf8_pair(texts):
            values, offsets = texts
            labels, probs = self._native.classify(values, offsets, self._columns, self._labels, _MAX_CHARS, False,
                                                  self.num_threads)
        else:
            if isinstance(texts, (str, bytes)):
                raise TypeError("texts must be a sequence of str, not a single " + type(texts).__name__)
            texts = texts if isinstance(texts, (list, tuple)) else list(texts)
            labels, probs = self._native.classify(texts, None, self._columns, self._labels, _MAX_CHARS, False,
                                                  self.num_threads)
        todo = np.flatnonzero(labels == core.LANGID_NEEDS_PREP)
        if todo.size:
            encode = _py3langid().LanguageIdentifier._encode
            if _is_utf8_pair(texts):
                raw = texts[0].tobytes()
                off = texts[1]
                chosen = [raw[off[i]:off[i + 1]].decode("utf-8") for i in todo.tolist()]
            else:
                chosen = [t if isinstance(t, str) else bytes(t).decode("utf-8")
                          for t in (texts[i] for i in todo.tolist())]
            prepared = [encode(t[:_MAX_CHARS]) for t in chosen]
            lab2, prob2 = self._native.classify(prepared, None, self._columns, self._labels, _MAX_CHARS, True,
                                                self.num_threads)
            labels[todo] = lab2
            probs[todo] = prob2
        return labels, probs


def _decode_all(values: np.ndarray, offsets: np.ndarray) -> list[str]:
    raw = values.tobytes()
    off = offsets.tolist()
    out = []
    for i in range(len(off) - 1):
        try:
            out.append(raw[off[i]:off[i + 1]].decode("utf-8"))
        except UnicodeDecodeError as exc:
            raise ValueError(f"texts[{i}] is not valid UTF-8 (at byte {exc.start})") from None
    return out


def identify(
    texts: Iterable[str],
    *,
    threshold: float = 0.5,
    unknown: str = "unknown",
    languages: Sequence[str] | None = None,
    on_item=None,
    backend: str = "native",
    num_threads: int = 0,
) -> tuple[list[str], list[float]]:
    """Language code (or ``unknown``) and probability of each text (batches of texts for the native backend)."""
    if not 0.0 <= threshold <= 1.0:
        raise ValueError(f"threshold must be in [0, 1], got {threshold!r}")
    lid = LanguageIdentifier(languages, backend=backend, num_threads=num_threads)
    langs: list[str] = []
    probs: list[float] = []
    batch: list[str] = []

    def flush() -> None:
        got, p = lid.classify_batch(batch)
        for lang, prob in zip(got, p.tolist()):
            langs.append(lang if lang and prob >= threshold else unknown)
            probs.append(prob)
            if on_item is not None:
                on_item()
        batch.clear()

    for t in texts:
        batch.append(t)
        if len(batch) >= (_BATCH if backend == "native" else 1):
            flush()
    if batch:
        flush()
    return langs, probs
