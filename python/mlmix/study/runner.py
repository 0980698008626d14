"""``mlmix.study(config)`` and ``mlmix study CONFIG``: every arm of the grid built, trained and evaluated the same
way, then judged, tabulated and reported.

Layout of the output directory (``output`` in the config)::

    OUT/tokenizer.json          tiny backend: the byte-level BPE trained once on the training split
    OUT/cache/                  the build's stage cache, shared by every arm (read and tokenize run once)
    OUT/mixtures/<arm>-s<seed>/ each arm's build output (mixture.json, store/)
    OUT/runs/<key>/             one trained run: model/, run.json (metrics, mixture, timings), responses.jsonl
    OUT/judge-cache/            HTTP judge replies (a rerun sends nothing it has sent before)
    OUT/results.json, results.csv, report.html

A run's ``<key>`` hashes everything that determines it: the store's manifest (its arrays' checksums: the
mixture's tokens and packing), the tokenizer's bytes, the ``[train]`` settings, the seed, the held-out records,
the study's languages and the ``[eval]`` settings. A run directory is written atomically (a temporary sibling
renamed into place), so a study killed at any moment leaves each run whole or absent; a rerun trains only the
runs whose directory is missing, and two arms that come out as the same mixture (``diversity-k1`` and
``mono-en``) share one run.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import os
import sys
import time
from typing import Any, Callable, Mapping, Optional, Sequence

from .._outputs import file_sha256
from . import arms as arms_mod
from . import evaluate as evaluate_mod
from . import train as train_mod
from .config import BUNDLED_DEFAULT, config_hash, load_config
from .results import SCHEMA, format_table, to_csv, to_json

__all__ = ["run", "add_subparser", "main", "RUN_FORMAT"]

RUN_FORMAT = "mlmix.study-run/1"
_RUN_FILE = "run.json"


def _say(progress: Optional[Callable[[str], None]], text: str) -> None:
    if progress is not None:
        progress(text)


def _read_jsonl(path: str, what: str) -> list[dict]:
    rows = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if line.strip():
                try:
                    row = json.loads(line)
                except ValueError as exc:
                    raise ValueError(f"{what}: {path}:{lineno} is not valid JSON ({exc})") from None
                if not isinstance(row, dict) or not isinstance(row.get("lang"), str) or "id" not in row:
                    raise ValueError(f"{what}: {path}:{lineno} must be a JSON object with id, lang, instruction and "
                                     f"response, got {line.strip()[:120]!r}")
                rows.append(row)
    return rows


def _demo_dir() -> str:
    from .. import data

    return os.path.join(os.path.dirname(os.path.abspath(data.__file__)), "demo")


def _data(cfg: Mapping) -> tuple[list[dict], list[dict], list[dict]]:
    """(training records, held-out records, the build's [[sources]])."""
    from ..data import demo_records

    d = cfg["data"]
    if d["train"] == "demo":
        train = demo_records(split="train")
        sources = [{"path": os.path.join(_demo_dir(), "*.jsonl"), "where": {"split": "train"}}]
    else:
        train = _read_jsonl(d["train"], "data.train")
        sources = [{"path": d["train"]}]
    held = demo_records(split="heldout") if d["heldout"] == "demo" else _read_jsonl(d["heldout"], "data.heldout")
    if not train:
        raise ValueError(f"data.train: {d['train']!r} holds no records")
    return train, held, sources


def _heldout(records: Sequence[Mapping], languages: Sequence[str], cap: int) -> list[dict]:
    keep, seen = [], {}
    for r in records:
        lang = r.get("lang")
        if lang not in languages:
            continue
        seen[lang] = seen.get(lang, 0) + 1
        if not cap or seen[lang] <= cap:
            keep.append(dict(r))
    return keep


def _tokenizer(cfg: Mapping, out: str, train: Sequence[Mapping], progress) -> tuple[Optional[str], str]:
    """(path of the tiny backend's tokenizer.json or None, a sha256 identifying the tokenizer's files)."""
    t = cfg["train"]
    if t["backend"] == "hf":
        files = sorted(os.path.join(r, f) for r, _, names in os.walk(t["model"]) for f in names
                       if f.startswith(("tokenizer", "special_tokens", "vocab", "merges")) or f.endswith(".tiktoken"))
        h = hashlib.sha256()
        for f in files:
            h.update(os.path.relpath(f, t["model"]).encode() + b"\0" + file_sha256(f).encode())
        return None, h.hexdigest()
    from ..cache import stage_key
    from ..demo import train_bpe

    texts = [f"{r.get('instruction', '')}\n{r.get('response', '')}" for r in train]
    want = stage_key("bpe", t["bpe_vocab_size"], hashlib.sha256("\0".join(texts).encode()).hexdigest())
    path = os.path.join(out, "tokenizer.json")
    meta = os.path.join(out, "tokenizer.key")
    have = None
    if os.path.isfile(path) and os.path.isfile(meta):
        with open(meta, encoding="utf-8") as f:
            have = f.read().strip()
    if have != want:
        # trained once per training set: a rerun keeps the file, so the runs' keys (its bytes) stay the same
        _say(progress, f"tokenizer: training a byte-level BPE of {t['bpe_vocab_size']} tokens on the training split")
        train_bpe(texts, t["bpe_vocab_size"], path)
        from .._atomic import atomic_file

        with atomic_file(meta, "w") as f:
            f.write(want + "\n")
    return path, file_sha256(path)


def _build(arm: arms_mod.Arm, seed: int, cfg: Mapping, out: str, sources: list, tok_path: Optional[str]) -> dict:
    from ..engine import build

    t = cfg["train"]
    bcfg = {
        "output": os.path.join(out, "mixtures", f"{arm.arm}-s{seed}"),
        "cache_dir": os.path.join(out, "cache"),
        "seed": seed,
        "sources": sources,
        "langid": {"backend": "none"},
        "dedup": {"exact": True, "near": True, "scope": "language"},  # translations are not duplicates
        "mixture": dict(arm.mixture),
        "tokenizer": train_mod.tokenizer_config(t, tok_path),
        "pack": {"seq_len": t["seq_len"], "overlong": "truncate"},
        "report": False,
    }
    return build(bcfg, quiet=True, progress=False)


def _load_run(path: str, key: str) -> Optional[dict]:
    """A finished run's record, or None when there is none (or it is of another key or damaged: redone)."""
    try:
        with open(os.path.join(path, _RUN_FILE), encoding="utf-8") as f:
            rec = json.load(f)
    except (OSError, ValueError):
        return None
    if not isinstance(rec, dict) or rec.get("format") != RUN_FORMAT or rec.get("key") != key:
        return None
    if rec.get("status") != "done" or not isinstance(rec.get("metrics"), dict):
        return None
    return rec


def _judge(cfg: Mapping, out: str, judge: Any) -> tuple[Any, Optional[str]]:
    """(the judge object or None, its description)."""
    j = cfg["judge"]
    if judge is not None:
        if j["kind"] != "none":
            raise ValueError(f"judge: both a judge= argument and judge.kind = {j['kind']!r} in the config; give one")
        name = getattr(judge, "__name__", type(judge).__name__)
        return judge, f"callable {name}"
    from ..eval.judge import JUDGE_PROMPT, HTTPJudge, TransformersJudge

    template = j["template"] or JUDGE_PROMPT
    if j["kind"] == "http":
        return HTTPJudge(j["base_url"], j["model"], api_key_env=j["api_key_env"], timeout=float(j["timeout"]),
                         max_retries=j["max_retries"], backoff=float(j["backoff"]), concurrency=j["concurrency"],
                         cache_dir=os.path.join(out, "judge-cache"), max_tokens=j["max_tokens"],
                         template=template), f"http {j['model']} at {j['base_url']}"
    if j["kind"] == "transformers":
        from ..eval.runner import load_model

        model, tok = load_model(j["path"], device=cfg["train"]["device"], dtype=cfg["train"]["dtype"],
                                what="judge.path")
        return (TransformersJudge(model, tok, template=template, batch_size=j["batch_size"]),
                f"transformers {j['path']}")
    return None, None


def _run_arm(arm: arms_mod.Arm, seed: int, ctx: Mapping, progress) -> dict:
    """Build one arm's mixture, then reuse its finished run or train and evaluate it into ``runs/<key>``
    (written atomically). Returns the entry the results table is made from."""
    from .._atomic import atomic_directory, atomic_file
    from ..cache import stage_key

    cfg, out, t = ctx["cfg"], ctx["out"], ctx["cfg"]["train"]
    t0 = time.perf_counter()
    summary = _build(arm, seed, cfg, out, ctx["sources"], ctx["tok_path"])
    build_s = time.perf_counter() - t0
    with open(os.path.join(summary["store"], "manifest.json"), "rb") as f:
        manifest_sha = hashlib.sha256(f.read()).hexdigest()
    key = stage_key(RUN_FORMAT, manifest_sha, ctx["tok_sha"], t, seed, ctx["held_sha"], ctx["langs"], cfg["eval"])
    run_dir = os.path.join(out, "runs", key)
    mixture = {lang: int(n) for lang, n in summary["langs"].items() if int(n) > 0}
    rec = _load_run(run_dir, key)
    cached = rec is not None
    if cached:
        _say(progress, f"{arm.arm} (seed {seed}): done before, run {key} (not retrained)")
    else:
        _say(progress, f"{arm.arm} (seed {seed}): {summary['examples']} examples "
                       f"({', '.join(f'{k} {v}' for k, v in mixture.items())}), training")
        with atomic_directory(run_dir, kind="study-run", arg="output") as tmp:
            trained = train_mod.train_run(summary["store"], t, seed, tmp, vocab_size=ctx["vocab_size"],
                                          tokenizer_path=ctx["tok_path"], name=arm.arm,
                                          say=(lambda s: None) if progress is None else progress)
            t1 = time.perf_counter()
            ev = evaluate_mod.evaluate_run(trained.model, trained.tokenizer, ctx["held"], ctx["langs"], cfg["eval"],
                                           seed=seed, max_length=t["seq_len"])
            eval_s = time.perf_counter() - t1
            if ev["responses"] is not None:
                with atomic_file(os.path.join(tmp, "responses.jsonl"), "w") as f:
                    for row in ev["responses"]:
                        f.write(json.dumps(row, ensure_ascii=False) + "\n")
            rec = {"format": RUN_FORMAT, "key": key, "status": "done", "arm": arm.arm, "seed": seed,
                   "mixture": mixture, "examples": summary["examples"], "tokens": summary["tokens"],
                   "train": dict(t), "params": trained.params, "device": trained.device,
                   "train_loss": trained.train_loss, "loss_route": ev["loss_route"],
                   "metrics": ev["metrics"], "has_responses": ev["responses"] is not None,
                   "seconds": {"train": trained.seconds, "eval": eval_s},
                   "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
            with atomic_file(os.path.join(tmp, _RUN_FILE), "w") as f:
                f.write(to_json(rec))  # last: a run.json is the mark of a finished run
        _say(progress, f"  trained in {rec['seconds']['train']:.1f}s, evaluated in "
                       f"{rec['seconds']['eval']:.1f}s; run {key}")
    return {"arm": arm, "seed": seed, "key": key, "dir": run_dir, "rec": rec, "cached": cached,
            "build_seconds": build_s, "mixture": mixture, "wall_seconds": time.perf_counter() - t0}


def run(config: Any = None, *, output: Optional[str] = None, judge: Any = None,
        progress: Optional[Callable[[str], None]] = None) -> dict:
    """Run a study and write ``results.json``, ``results.csv`` and ``report.html`` into its output directory.

    Args:
        config: a dict or the path of a .toml / .yaml / .json file (docs/study.md); None: the bundled default
            (:data:`mlmix.study.config.BUNDLED_DEFAULT`: English-only, the pinch, P = 10/50/100, the unseen
            split and k = 1..3 on the bundled 12-language set with the tiny LM).
        output: the output directory, overriding the config's.
        judge: a side-by-side judge given in Python (a callable ``f(instruction, first, second) -> "A"|"B"|"tie"``
            or an object with ``verdicts(requests)``, see :mod:`mlmix.eval.judge`); or configure ``[judge]``.
        progress: called with one line of text per step (None: silent).

    Returns the results (the ``mlmix.study/1`` document of ``results.json``, plus ``files``).
    """
    from .._atomic import atomic_file
    from .._outputs import claim_directory

    t_start = time.perf_counter()
    cfg = load_config(config)
    if output is not None:
        cfg["output"] = os.path.abspath(os.fspath(output))
    train_recs, held_recs, sources = _data(cfg)
    available = sorted({r["lang"] for r in train_recs})
    langs = arms_mod.study_languages(available, cfg["languages"])
    grid = arms_mod.expand_arms(cfg["arms"], langs)
    ids = [a.arm for a in grid]
    seen, unseen = arms_mod.unseen_languages(langs, cfg["arms"]["seen"])
    order = arms_mod.diversity_order(langs, cfg["arms"]["diversity_order"])
    held = _heldout(held_recs, langs, cfg["data"]["max_heldout_per_language"])
    if not held:
        raise ValueError(f"data.heldout: no held-out records in the study's languages {langs}")
    j = cfg["judge"]
    if (judge is not None or j["kind"] != "none") and j["baseline"] != "monolingual" and j["baseline"] not in ids:
        raise ValueError(f"judge.baseline: {j['baseline']!r} is not an arm of this study; accepted are "
                         f"\"monolingual\" or one of {ids}")
    out = claim_directory(cfg["output"], "study")
    judge_obj, judge_desc = _judge(cfg, out, judge)
    t = cfg["train"]
    _say(progress, f"mlmix study {cfg['name']!r}: {len(grid)} arm{'s' * (len(grid) != 1)} x {len(cfg['seeds'])} "
                   f"seed{'s' * (len(cfg['seeds']) != 1)}, {len(langs)} languages, backend {t['backend']}"
                   f"{' (' + t['model'] + ')' if t['model'] else ''}, {t['steps']} steps per arm; output {out}")
    tok_path, tok_sha = _tokenizer(cfg, out, train_recs, progress)
    vocab_size = None
    if tok_path is not None:
        from ..engine import load_tokenizer

        vocab_size = load_tokenizer({"path": tok_path}).vocab_size
    held_sha = hashlib.sha256(json.dumps(held, sort_keys=True, ensure_ascii=False).encode()).hexdigest()
    ctx = {"cfg": cfg, "out": out, "sources": sources, "tok_path": tok_path, "tok_sha": tok_sha,
           "vocab_size": vocab_size, "held": held, "held_sha": held_sha, "langs": langs}
    entries = [_run_arm(arm, seed, ctx, progress) for seed in cfg["seeds"] for arm in grid]

    judged: dict = {}
    absent: list[str] = []
    reasons: dict[str, str] = {}
    missing_baselines: list[str] = []
    if judge_obj is not None:
        runs = []
        for e in entries:
            if e["rec"].get("has_responses"):
                runs.append({"arm": e["arm"].arm, "seed": e["seed"],
                             "responses": evaluate_mod.read_responses(os.path.join(e["dir"], "responses.jsonl"))})
        if j["baseline"] == "monolingual":
            missing_baselines = [lang for lang in langs if f"mono-{lang}" not in ids]
        judged = evaluate_mod.judge_runs(runs, langs, held, judge_obj, j, cfg["eval"], progress=progress)
    else:
        absent.append("judge")
        reasons["judge"] = ("no judge configured: the side-by-side score columns (judge, judge_lo, judge_hi) are "
                            "null; add [judge] (kind \"http\" or \"transformers\") to the config, or pass judge= to "
                            "mlmix.study (docs/study.md)")
    if not cfg["eval"]["fidelity"]:
        absent.append("fidelity")
        reasons["fidelity"] = "eval.fidelity is false (or eval.generate is false): no responses were scored"

    arms_out = []
    for e in entries:
        arm, rec = e["arm"], e["rec"]
        cells = judged.get((arm.arm, e["seed"]), {})
        metrics = {}
        for lang in langs:
            m = dict(rec["metrics"][lang])
            c = cells.get(lang)
            m.update(judge=None, judge_lo=None, judge_hi=None)
            if c is not None:
                m.update(c)
            metrics[lang] = m
        arms_out.append({
            "arm": arm.arm, "family": arm.family, "param": dict(arm.param),
            "train_languages": [lang for lang in langs if e["mixture"].get(lang, 0) > 0]
            + [lang for lang in e["mixture"] if lang not in langs],
            "mixture": e["mixture"], "seed": e["seed"], "status": "done", "metrics": metrics,
            "run": e["key"], "model": os.path.join(e["dir"], "model"), "cached": e["cached"],
            "recipe": dict(arm.mixture), "examples": rec["examples"], "train_tokens": rec["tokens"],
            "params": rec["params"], "device": rec["device"], "final_train_loss": (rec["train_loss"] or [None])[-1],
            "seconds": {"build": e["build_seconds"], **rec["seconds"], "wall": e["wall_seconds"]},
        })
    results = {
        "schema": SCHEMA,
        "study": {
            "name": cfg["name"], "config_hash": config_hash(cfg), "backend": t["backend"], "model": t["model"],
            "languages": langs, "seen": seen, "unseen": unseen, "seeds": list(cfg["seeds"]), "judge": judge_desc,
            "absent": absent, "absent_reasons": reasons, "diversity_order": order,
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "judge_baseline": j["baseline"] if judge_obj is not None else None,
            "judge_missing_baselines": missing_baselines, "train": dict(t), "eval": dict(cfg["eval"]),
            "heldout_records": len(held), "bundled_default": config is None,
            "seconds": time.perf_counter() - t_start,
        },
        "arms": arms_out,
    }
    files = {"results": os.path.join(out, "results.json"), "csv": os.path.join(out, "results.csv"),
             "report": os.path.join(out, "report.html")}
    with atomic_file(files["csv"], "w") as f:
        f.write(to_csv(results))
    from ..study_report import write_report

    write_report(results, files["report"])
    results["study"]["seconds"] = time.perf_counter() - t_start
    with atomic_file(files["results"], "w") as f:
        f.write(to_json(results))
    results["files"] = files
    return results


# ---------------------------------------------------------------------------------------------------------
# command line


def add_subparser(subparsers) -> argparse.ArgumentParser:
    """Add ``study`` to an ``argparse`` subparsers object (``mlmix``'s); the command runs :func:`run`."""
    p = subparsers.add_parser(
        "study", help="the paper's experiments as one benchmark: a grid of mixtures, trained and evaluated alike",
        description="Build a grid of the study's mixtures over one parallel instruction set (monolingual, the pinch, "
                    "P% mixtures, the unseen-language split, language diversity, bilingual, temperature, UniMax), "
                    "train the same model on each with the same recipe, evaluate each per language (held-out loss "
                    "with intervals, language fidelity, the side-by-side judge when configured) and write "
                    "results.json, results.csv and report.html. Finished arms are not retrained on a rerun. Without "
                    "CONFIG: a reduced grid on the bundled 12-language set with the tiny LM on the CPU. See "
                    "docs/study.md.")
    g = p.add_mutually_exclusive_group()
    g.add_argument("-q", "--quiet", action="store_true", help="print only errors (and --json output)")
    g.add_argument("-v", "--verbose", action="store_true", help="print more detail")
    p.add_argument("--json", action="store_true", help="print the results as JSON on stdout")
    p.add_argument("config", metavar="CONFIG", nargs="?", default=None,
                   help="the study config (.toml, .yaml/.yml or .json); default: the bundled reduced grid")
    p.add_argument("-o", "--output", default=None, help="output directory (default: the config's output)")
    p.set_defaults(func=_cmd_study)
    return p


def _cmd_study(args: argparse.Namespace) -> int:
    quiet = args.quiet or args.json
    progress = None if quiet else (lambda s: print(s, file=sys.stderr, flush=True))
    if args.config is None and progress is not None:
        a = BUNDLED_DEFAULT["arms"]
        progress("no CONFIG given: running the bundled default, a reduced grid (English-only, the pinch of "
                 f"{a['pinch'][0]}, P = {'/'.join(str(p) for p in a['percent'])}, the unseen-language split, "
                 f"k = 1..{max(a['diversity'])}) on the bundled 12-language set with the tiny LM on the CPU: 8 "
                 "trainings of 80 steps (diversity-k1 reuses mono-en's), about 500 CPU-seconds: 7-8 minutes on 2 "
                 "cores (docs/study.md); examples/study.toml shows the full grid for a real model")
    results = run(args.config, output=args.output, progress=progress)
    if args.json:
        print(to_json(results), end="")
    elif not args.quiet:
        print(format_table(results), end="")
        if results["study"]["absent"]:
            for name in results["study"]["absent"]:
                print(f"absent: {name}: {results['study']['absent_reasons'][name]}")
        for name, path in results["files"].items():
            print(f"{name}: {path}")
        print(f"done in {results['study']['seconds']:.0f}s")
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``python -m mlmix.study [CONFIG]``: the ``mlmix study`` command on its own (exit 1 on a user error)."""
    from ..cli import main as cli_main

    return cli_main(["study", *(sys.argv[1:] if argv is None else argv)])
