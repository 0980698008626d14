"""Evaluating the study's runs: per language, held-out loss with bootstrap intervals, generation and language
fidelity for each run, then the side-by-side judge of each run against its baseline.

The judge's baseline for language L is, by default, the monolingual arm of L with the same seed: the paper
reports each mixture's side-by-side score against the model tuned on L alone (so monolingual tuning is the 0.5
line of its figures). ``judge.baseline`` may name one arm instead (e.g. ``"mono-en"``, English-only tuning),
against which every language is then judged. A baseline's own cells, and languages whose baseline arm is not
in the study, are left empty (None), never filled.
"""

from __future__ import annotations

import json
import math
from typing import Any, Callable, Mapping, Optional, Sequence

__all__ = ["evaluate_run", "judge_runs", "baseline_arm", "read_responses"]


def _num(x: Any) -> Optional[float]:
    if x is None:
        return None
    x = float(x)
    return x if math.isfinite(x) else None


def evaluate_run(model, tokenizer, records: Sequence[Mapping], languages: Sequence[str], ecfg: Mapping, *,
                 seed: int, max_length: int, progress: Optional[Callable[[str], None]] = None) -> dict:
    """Loss per language (with its interval), and, when ``ecfg["generate"]``, the responses and their language
    fidelity. Returns ``{"metrics": {lang: {"loss", "loss_lo", "loss_hi", "n", "tokens", "fidelity",
    "fidelity_lo", "fidelity_hi"}}, "responses": [{"id", "lang", "response"}] or None, "loss_route": str}``."""
    from ..eval.runner import evaluate

    generation = None
    if ecfg["generate"]:
        generation = {"max_new_tokens": ecfg["max_new_tokens"], "batch_size": ecfg["batch_size"]}
    res = evaluate({"arm": (model, tokenizer)}, records, languages=list(languages), loss=True,
                   generation=generation, fidelity=ecfg["fidelity"], n_bootstrap=ecfg["bootstrap"],
                   alpha=ecfg["alpha"], seed=seed, max_length=max_length, progress=progress)
    loss = res["loss"]["arm"]
    fid = res.get("fidelity", {}).get("arm")
    metrics = {}
    for lang in languages:
        ls = loss["languages"][lang]
        m = {"loss": _num(ls["loss"]), "loss_lo": _num(ls["loss_ci"][0]), "loss_hi": _num(ls["loss_ci"][1]),
             "n": int(ls["n"]), "tokens": int(ls["tokens"]), "fidelity": None, "fidelity_lo": None,
             "fidelity_hi": None}
        if fid is not None:
            f = fid["languages"][lang]
            m.update(fidelity=_num(f["share"]), fidelity_lo=_num(f["share_ci"][0]), fidelity_hi=_num(f["share_ci"][1]))
        metrics[lang] = m
    responses = res.get("responses", {}).get("arm")
    return {"metrics": metrics, "responses": responses, "loss_route": loss["route"]}


def read_responses(path: str) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def baseline_arm(baseline: str, lang: str) -> str:
    """The arm id a language is judged against: ``mono-<lang>`` for ``"monolingual"``, else ``baseline``."""
    return f"mono-{lang}" if baseline == "monolingual" else baseline


def judge_runs(runs: Sequence[Mapping], languages: Sequence[str], records: Sequence[Mapping], judge, jcfg: Mapping,
               ecfg: Mapping, *, progress: Optional[Callable[[str], None]] = None) -> dict:
    """Side-by-side scores of every run against its baseline run, per language, in both orders.

    ``runs``: dicts with ``arm``, ``seed`` and ``responses`` (the run's responses, ``[{"id", "lang",
    "response"}]``). Returns ``{(arm, seed): {lang: {"judge", "judge_lo", "judge_hi", "wins", "ties",
    "losses", "invalid", "baseline"}}}`` for the cells that have a baseline; the others are absent.
    """
    from ..eval.judge import side_by_side

    instr = {}
    from ..eval.loss import to_messages

    for i, r in enumerate(records):
        msgs = to_messages(r) or []
        users = [m.get("content") for m in msgs if isinstance(m, Mapping) and m.get("role") == "user"]
        instr[(r["lang"], str(r.get("id", i)))] = users[-1] if users and isinstance(users[-1], str) else ""
    by_key = {(r["arm"], r["seed"]): r for r in runs}
    out: dict = {}
    for run in runs:
        groups: dict[str, list[str]] = {}
        for lang in languages:
            base = baseline_arm(jcfg["baseline"], lang)
            if base == run["arm"] or (base, run["seed"]) not in by_key:
                continue
            groups.setdefault(base, []).append(lang)
        cells: dict = {}
        for base, langs in groups.items():
            theirs = {(r["lang"], str(r["id"])): r["response"] for r in by_key[(base, run["seed"])]["responses"]}
            items = [{"id": str(r["id"]), "lang": r["lang"], "instruction": instr.get((r["lang"], str(r["id"])), ""),
                      "a": r["response"], "b": theirs.get((r["lang"], str(r["id"])), "")}
                     for r in run["responses"] if r["lang"] in langs]
            if progress is not None:
                progress(f"judge: {run['arm']} (seed {run['seed']}) vs {base} in {', '.join(langs)}")
            res = side_by_side(items, judge, languages=langs, ci=jcfg["ci"], n_bootstrap=ecfg["bootstrap"],
                               alpha=ecfg["alpha"], seed=run["seed"], names=(run["arm"], base))
            for lang in langs:
                s = res["languages"][lang]
                cells[lang] = {"judge": _num(s["score"]), "judge_lo": _num(s["score_ci"][0]),
                               "judge_hi": _num(s["score_ci"][1]), "wins": s["wins"], "ties": s["ties"],
                               "losses": s["losses"], "invalid": s["invalid"], "baseline": base}
        out[(run["arm"], run["seed"])] = cells
    return out
