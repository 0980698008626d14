"""The study's results table: ``results.json`` (schema ``mlmix.study/1``), ``results.csv`` (one row per arm, seed
and language) and the plain-text table the command prints.

``results.json``::

    {"schema": "mlmix.study/1",
     "study": {"name", "config_hash", "backend", "model", "languages", "seen", "unseen", "seeds", "judge",
               "absent", "diversity_order", "created", ...},
     "arms": [{"arm", "family", "param", "train_languages", "mixture", "seed", "status",
               "metrics": {lang: {"loss", "loss_lo", "loss_hi", "n", "judge", "judge_lo", "judge_hi",
                                  "fidelity", ...}}, ...}]}

A metric that was not computed is null (empty in the CSV), never a stand-in value; ``study.absent`` names the
metrics left out and ``study.absent_reasons`` says why.
"""

from __future__ import annotations

import csv
import io
import json
import math
from typing import Any, Mapping, Sequence

__all__ = ["SCHEMA", "CSV_COLUMNS", "to_json", "to_csv", "format_table"]

SCHEMA = "mlmix.study/1"
CSV_COLUMNS = ("arm", "family", "param", "seed", "language", "seen", "loss", "loss_lo", "loss_hi", "n", "judge",
               "judge_lo", "judge_hi", "fidelity")


def _clean(x: Any) -> Any:
    """NaN and infinities become None (JSON has no NaN); containers are cleaned recursively."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, Mapping):
        return {k: _clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_clean(v) for v in x]
    return x


def to_json(results: Mapping) -> str:
    return json.dumps(_clean(results), indent=1, ensure_ascii=False, allow_nan=False) + "\n"


def _cell(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return repr(v) if math.isfinite(v) else ""
    return str(v)


def to_csv(results: Mapping) -> str:
    """One row per (arm, seed, language), columns :data:`CSV_COLUMNS`; null metrics are empty cells."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(CSV_COLUMNS)
    langs = results["study"]["languages"]
    for a in results["arms"]:
        trained = set(a["train_languages"])
        param = json.dumps(a["param"], separators=(",", ":"), sort_keys=True)
        for lang in langs:
            m = a["metrics"].get(lang, {})
            w.writerow([a["arm"], a["family"], param, a["seed"], lang, "1" if lang in trained else "0",
                        *(_cell(m.get(k)) for k in ("loss", "loss_lo", "loss_hi", "n", "judge", "judge_lo",
                                                    "judge_hi", "fidelity"))])
    return buf.getvalue()


def _mean(xs: Sequence[Any]) -> float | None:
    vals = [x for x in xs if x is not None]
    return sum(vals) / len(vals) if vals else None


def format_table(results: Mapping, metric: str = "loss") -> str:
    """Arms down, languages across: ``metric`` per language averaged over seeds (``*``: the language is among
    the arm's tuning languages), for a terminal."""
    langs = results["study"]["languages"]
    by_arm: dict[str, list] = {}
    for a in results["arms"]:
        by_arm.setdefault(a["arm"], []).append(a)
    width = max([len(k) for k in by_arm] + [3]) + 2
    head = f"{'arm':<{width}}" + "".join(f"{lang:>8}" for lang in langs)
    lines = [f"{metric} per language (mean over seeds; * = a tuning language of the arm)", head]
    for arm, runs in by_arm.items():
        cells = []
        for lang in langs:
            v = _mean([r["metrics"].get(lang, {}).get(metric) for r in runs])
            mark = "*" if lang in runs[0]["train_languages"] else " "
            cells.append(f"{'-' if v is None else format(v, '.3f')}{mark}".rjust(8))
        lines.append(f"{arm:<{width}}" + "".join(cells))
    return "\n".join(lines) + "\n"
