"""Stage ``write``: the output directory around the packed store, and the one ``build.json`` writer.

::

    OUTPUT/store/          the packed store (mlmix.open)
    OUTPUT/mixture.json    the mixture manifest (mlmix.Mixture.load), absent for recipe "all"
    OUTPUT/tokenizer.json  the tokenizer, to decode samples (inspect, report); absent for the bundled
                           tokenizers (tokenizer.name), which build.json names
    OUTPUT/lengths.npy     the selected examples' lengths (int32), OUTPUT/langs.json their languages
    OUTPUT/build.json      config, stage keys and statistics: the same bytes whichever executor ran the
                           build, apart from its "engine"
    OUTPUT/timings.json    seconds and peak memory per stage (differs from run to run)
    OUTPUT/report.html     the report (mlmix report), when the config asks for it

The output is assembled in a temporary directory and renamed into place, so it is always complete or
absent; its marker holds the sha256 of every file, so a later run tells a changed one.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from ..._outputs import check_sealed, read_marker, seal

BUILD_FORMAT = 1
# what differs from run to run: kept out of build.json (timings.json holds it)
TIMING_KEYS = ("seconds", "load_seconds", "encode_seconds", "task_seconds")


def write_json(path: str, obj: Any) -> None:
    with open(path, "w", encoding="utf-8") as f:
        if isinstance(obj, list) and len(obj) > 1 and all(type(x) is str for x in obj):
            f.write(_codes_json(obj))
        else:
            json.dump(obj, f, ensure_ascii=False, indent=1, sort_keys=True)


def _codes_json(items: list[str]) -> str:
    """``json.dumps(items, ensure_ascii=False, indent=1)`` of a list of strings (a language code per record:
    few distinct values, each encoded once; the indented encoder is pure Python, ~0.3 us per item)."""
    encoded: dict[str, str] = {}
    for x in set(items):
        encoded[x] = " " + json.dumps(x, ensure_ascii=False)
    return "[\n" + ",\n".join([encoded[x] for x in items]) + "\n]"


def read_json(path: str) -> Any:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def by_lang(langs: Sequence[str], weights=None) -> dict[str, int]:
    """Records (or the sum of ``weights``, integers) per language code, sorted by code."""
    if weights is None:
        return dict(sorted(Counter(langs).items()))
    table, idx = factorize(langs)
    w = np.asarray(weights, dtype=np.int64)
    if w.shape != idx.shape:
        raise ValueError(f"weights must have one entry per language code ({idx.size}), got shape {w.shape}")
    sums = np.zeros(len(table), dtype=np.int64)
    np.add.at(sums, idx, w)  # exact in int64 (bincount would sum in float64)
    return {lang: int(sums[table[lang]]) for lang in sorted(table)}


def factorize(items: Sequence, table: dict | None = None) -> tuple[dict, np.ndarray]:
    """(item -> index in order of first appearance, the index of every entry); ``table``: one to extend (items it
    holds keep their index)."""
    table = {} if table is None else table
    idx = np.fromiter((table.setdefault(x, len(table)) for x in items), dtype=np.int64, count=len(items))
    return table, idx


def length_summary(lengths: np.ndarray, langs: Sequence[str]) -> dict:
    """Per language: count, mean, min, max and percentiles of the selected examples' lengths."""
    table, idx = factorize(langs)
    lengths = np.asarray(lengths)
    out = {}
    for k, lang in sorted(enumerate(table), key=lambda kv: kv[1]):
        a = lengths[idx == k].astype(np.int64)
        q = np.percentile(a, [5, 25, 50, 75, 95]).tolist()
        out[lang] = {"n": int(a.size), "mean": float(a.mean()), "min": int(a.min()), "max": int(a.max()),
                     "p5": q[0], "p25": q[1], "p50": q[2], "p75": q[3], "p95": q[4]}
    return out


def without_timings(stats: Mapping) -> dict:
    return {k: v for k, v in stats.items() if k not in TIMING_KEYS}


def summary_of(cfg: Mapping, key: str, stages: Mapping[str, Mapping], engine: str) -> dict:
    """The build's summary, as build.json holds it: nothing in it depends on the executor but ``engine``."""
    out = cfg["output"]
    from . import STAGES

    stages = {name: (without_timings(s) if name in STAGES else s) for name, s in stages.items()}
    p = stages["pack"]
    return {"format": BUILD_FORMAT, "engine": engine, "key": key, "config": dict(cfg), "stages": stages,
            "output": out, "store": os.path.join(out, "store"), "examples": p["examples"], "tokens": p["tokens"],
            "sequences": p["sequences"], "efficiency": p["efficiency"], "langs": stages["mix"]["langs"]}


def assemble(tmp: str, summary: Mapping, timings: Mapping, lengths: np.ndarray, langs: Sequence[str], *,
             mixture=None, tokenizer_json: str | None = None, tokenizer=None) -> None:
    """Everything but the store into the temporary output ``tmp``, then the report and the seal."""
    from ..._atomic import relax_modes

    np.save(os.path.join(tmp, "lengths.npy"), np.asarray(lengths).astype(np.int32))
    write_json(os.path.join(tmp, "langs.json"), list(langs))
    if mixture is not None:
        mixture.save(os.path.join(tmp, "mixture.json"))
    if tokenizer_json is not None:
        import shutil

        shutil.copyfile(tokenizer_json, os.path.join(tmp, "tokenizer.json"))
    elif tokenizer is not None:
        from .tokenize import save_tokenizer

        save_tokenizer(tokenizer, os.path.join(tmp, "tokenizer.json"))
    write_json(os.path.join(tmp, "build.json"), summary)
    write_json(os.path.join(tmp, "timings.json"), timings)
    if summary["config"]["report"]:
        from ...report import write_report

        write_report(tmp, os.path.join(tmp, "report.html"))
    seal(tmp, "build", key=summary["key"], engine=summary["engine"])  # a later run or inspect tells a changed file
    # before the rename: an output killed right after it must not keep mkdtemp's 0700/0600 modes
    relax_modes(tmp)


def load_existing(out: str, key: str, log) -> dict | None:
    """The summary of an existing output built with the same key, if every file in it is as mlmix wrote
    it (the checksums in its marker; the store's own) and the store opens; else None: it is rebuilt."""
    try:
        summary = read_json(os.path.join(out, "build.json"))
        if summary.get("format") != BUILD_FORMAT or summary.get("key") != key:
            return None
    except Exception:  # missing, unreadable or corrupt: rebuild
        return None
    if read_marker(out) is None:
        return None  # written before outputs carried checksums: nothing vouches for its files
    problems = [p for p in check_sealed(out) if not p.startswith("report.html ")]
    if problems:
        log.line(f"warning: output {out}: {'; '.join(problems[:3])}; rebuilding it")
        return None
    try:
        from ...store import open as open_store

        open_store(os.path.join(out, "store"))
    except Exception as exc:  # a store file changed or missing: rebuild
        log.line(f"warning: output {out}: the store does not open ({exc}); rebuilding it")
        return None
    return summary


def sync_report(out: str, want: bool, key: str, engine: str) -> None:
    """Make an output reused from an earlier build hold a report exactly when the config asks for one
    (``report`` is an output setting, outside the stage keys): write or refresh it, or remove it."""
    path = os.path.join(out, "report.html")
    problems = [p for p in check_sealed(out) if p.startswith("report.html ")]
    if want and (problems or not os.path.isfile(path)):
        from ...report import write_report

        write_report(out, path)  # reseals the output
    elif not want and os.path.lexists(path):
        os.unlink(path)
        seal(out, "build", key=key, engine=engine)
