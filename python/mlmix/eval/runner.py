"""``evaluate`` (models in memory) and ``mlmix eval CONFIG`` (models on disk): loss, generation, fidelity and the
side-by-side judge, per language, written as a table, JSON and charts."""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any, Callable, Mapping, Optional, Sequence

from .stats import DEFAULT_ALPHA, DEFAULT_BOOTSTRAP, check_ci_args

__all__ = ["evaluate", "run", "load_config", "load_model", "main", "add_subparser", "DEFAULT_CONFIG"]

DEFAULT_CONFIG: dict = {
    "data": {"source": "demo", "split": "heldout", "languages": None, "max_per_language": 0},
    "models": [],
    "loss": {"enabled": True, "batch_tokens": 16384, "max_length": 4096, "fused": "auto"},
    "generate": {"enabled": True, "max_new_tokens": 256, "do_sample": False, "temperature": 0.7, "top_p": 0.9,
                 "batch_size": 8, "system": None},
    "fidelity": {"enabled": True, "candidates": "eval", "threshold": 0.0},
    "judge": {"kind": "none", "baseline": None, "ci": "wilson", "base_url": None, "model": None,
              "api_key_env": None, "timeout": 60.0, "max_retries": 4, "backoff": 1.0, "concurrency": 4,
              "cache_dir": None, "max_tokens": 16, "path": None, "batch_size": 8, "template": None},
    "stats": {"bootstrap": DEFAULT_BOOTSTRAP, "alpha": DEFAULT_ALPHA, "seed": 0},
    "device": "auto",
    "dtype": "auto",
    "output": "mlmix-eval",
}
_MODEL_KEYS = {"name", "path", "tokenizer", "responses", "template"}
_TEMPLATES = ("auto", "chatml", "llama3")
_NO_JUDGE_API = ("no judge given, so the side-by-side columns (each model's score against the baseline per "
                 "language, with its interval and wins/ties/losses) are absent; pass judge= (a callable, "
                 "HTTPJudge or TransformersJudge) and baseline= to add them (docs/eval.md)")


def _say(progress: Optional[Callable[[str], None]], text: str) -> None:
    if progress is not None:
        progress(text)


# ---------------------------------------------------------------------------------------------------------
# the Python API


def _languages(records: Sequence[Mapping], languages: Optional[Sequence[str]]) -> list[str]:
    if languages is not None:
        if isinstance(languages, str):
            raise ValueError(f"languages must be a list of language codes, got the string {languages!r}")
        return list(dict.fromkeys(languages))
    out: list[str] = []
    for i, r in enumerate(records):
        lang = r.get("lang") if isinstance(r, Mapping) else None
        if not isinstance(lang, str) or not lang:
            raise ValueError(f"records[{i}] must be a dict with a language code in 'lang', got {r!r:.120}")
        if lang not in out:
            out.append(lang)
    return out


def _instruction(r: Mapping) -> Optional[str]:
    from .loss import to_messages

    msgs = to_messages(r)
    if not msgs:
        return None
    users = [m.get("content") for m in msgs if isinstance(m, Mapping) and m.get("role") == "user"]
    return users[-1] if users and isinstance(users[-1], str) else None


def evaluate(
    models: Mapping[str, Any],
    records: Sequence[Mapping],
    *,
    languages: Optional[Sequence[str]] = None,
    loss: bool = True,
    generation: Optional[Mapping[str, Any]] = None,
    responses: Optional[Mapping[str, Sequence[Optional[str]]]] = None,
    fidelity: bool = True,
    fidelity_candidates: Any = "eval",
    judge=None,
    baseline: Optional[str] = None,
    ci: str = "wilson",
    n_bootstrap: int = DEFAULT_BOOTSTRAP,
    alpha: float = DEFAULT_ALPHA,
    seed: int = 0,
    batch_tokens: int = 16384,
    max_length: Optional[int] = 4096,
    fused: str = "auto",
    progress: Optional[Callable[[str], None]] = None,
) -> dict:
    """Evaluate models (mixtures) per language on one evaluation set.

    Args:
        models: name -> ``(model, tokenizer)`` (a transformers causal LM and its transformers tokenizer; the
            model may be None for a model known only by its ``responses``).
        records: the evaluation set: dicts with ``lang`` and a conversation (``messages``, or ``instruction`` +
            ``response``; see :func:`mlmix.eval.loss.to_messages`). Loss is computed on the reference responses;
            generation answers the last user turn.
        languages: languages to report, in order (missing ones are reported with n = 0); None: those present.
        loss: compute held-out loss/perplexity (models given as objects only).
        generation: keyword arguments of :func:`mlmix.eval.generate.generate` (``max_new_tokens``, ``do_sample``,
            ``temperature``, ``top_p``, ``batch_size``, ``system``); None: do not generate.
        responses: name -> one response per record (precomputed generations, e.g. from a served model);
            these take precedence over generation.
        fidelity: language fidelity of every model's responses (candidates as in
            :func:`mlmix.eval.fidelity.language_fidelity`).
        judge, baseline: when both are given, every other model with responses is judged against ``baseline``
            with :func:`mlmix.eval.judge.side_by_side` (``ci``, ``n_bootstrap``, ``alpha``, ``seed``).

    Returns ``{"languages", "models", "records": n, "loss": {name: ...}, "responses": {name: [...]},
    "fidelity": {name: ...}, "judge": {"baseline", "pairs": {name: ...}}}``; see :mod:`mlmix.eval.results`.
    """
    from .fidelity import language_fidelity
    from .judge import side_by_side
    from .loss import encode_eval_set, heldout_loss

    check_ci_args(n_bootstrap, alpha)
    if not isinstance(models, Mapping):
        raise TypeError(f"models must be a dict name -> (model, tokenizer), got {type(models).__name__}")
    if isinstance(records, (str, bytes, Mapping)):
        raise TypeError(f"records must be a sequence of dicts, got {type(records).__name__}")
    records = list(records)
    langs = _languages(records, languages)
    keep = [r for r in records if isinstance(r, Mapping) and r.get("lang") in set(langs)]
    responses = dict(responses or {})
    for name, resp in responses.items():
        if name not in models:
            raise ValueError(f"responses: {name!r} is not one of the models {list(models)}")
        if isinstance(resp, str) or len(resp) != len(records):
            raise ValueError(f"responses[{name!r}] must hold one response per record ({len(records)}), "
                             f"got {len(resp) if not isinstance(resp, str) else 'a string'}")
    if baseline is not None and baseline not in models:
        raise ValueError(f"baseline must be one of the models {list(models)}, got {baseline!r}")
    results: dict[str, Any] = {"languages": langs, "models": list(models), "records": len(keep),
                               "stats": {"n_bootstrap": n_bootstrap, "alpha": alpha, "seed": seed, "judge_ci": ci}}

    if loss:
        results["loss"] = {}
        for name, pair in models.items():
            model, tok = _pair(name, pair)
            if model is None:
                continue
            _say(progress, f"loss: {name}")
            es = encode_eval_set(keep, tok, languages=langs, max_length=max_length)
            results["loss"][name] = heldout_loss(model, es, n_bootstrap=n_bootstrap, alpha=alpha, seed=seed,
                                                 batch_tokens=batch_tokens, fused=fused,
                                                 pad_id=_pad_id(tok))

    index = [i for i, r in enumerate(records) if isinstance(r, Mapping) and r.get("lang") in set(langs)]
    instructions = [_instruction(records[i]) for i in index]
    answered: dict[str, list[str]] = {}
    for name, pair in models.items():
        if name in responses:
            answered[name] = [r if isinstance(r, str) else "" for r in (responses[name][i] for i in index)]
            continue
        model, tok = _pair(name, pair)
        if generation is None or model is None:
            continue
        from .generate import generate

        _say(progress, f"generate: {name} ({len(index)} instructions)")
        todo = [k for k, s in enumerate(instructions) if s is not None]
        outs = generate(model, tok, [instructions[k] for k in todo], **{"seed": seed, **dict(generation)})
        got = [""] * len(index)  # a record without an instruction gets an empty response: counted, not dropped
        for k, text in zip(todo, outs):
            got[k] = text
        answered[name] = got
    if answered:
        results["responses"] = {
            name: [{"id": str(records[i].get("id", i)), "lang": records[i]["lang"], "response": text}
                   for i, text in zip(index, texts)]
            for name, texts in answered.items()
        }
    if fidelity and answered:
        results["fidelity"] = {name: language_fidelity(rows, languages=langs, candidates=fidelity_candidates)
                               for name, rows in results["responses"].items()}
    if judge is not None and baseline is not None and baseline in answered:
        pairs = {}
        for name, texts in answered.items():
            if name == baseline:
                continue
            _say(progress, f"judge: {name} vs {baseline}")
            items = [{"id": str(records[i].get("id", i)), "lang": records[i]["lang"],
                      "instruction": instructions[k] or "", "a": texts[k], "b": answered[baseline][k]}
                     for k, i in enumerate(index)]
            pairs[name] = side_by_side(items, judge, languages=langs, ci=ci, n_bootstrap=n_bootstrap, alpha=alpha,
                                       seed=seed, names=(name, baseline))
        results["judge"] = {"baseline": baseline, "pairs": pairs}
        for attr in ("requests_sent", "cache_hits", "retries"):
            if hasattr(judge, attr):
                results["judge"][attr] = getattr(judge, attr)
    elif judge is None:
        results["absent"] = {"judge": _NO_JUDGE_API}
    elif baseline is None:
        results["absent"] = {"judge": "a judge was given without baseline=, the model every other model is judged "
                                      "against; pass baseline= (one of the models) to add the side-by-side columns"}
    return results


def _pair(name: str, pair: Any) -> tuple[Any, Any]:
    if pair is None:
        return None, None
    if not isinstance(pair, (tuple, list)) or len(pair) != 2:
        raise ValueError(f"models[{name!r}] must be a (model, tokenizer) pair, got {type(pair).__name__}")
    return pair[0], pair[1]


def _pad_id(tok) -> int:
    for attr in ("pad_token_id", "eos_token_id"):
        v = getattr(tok, attr, None)
        if isinstance(v, int):
            return v
    return 0


# ---------------------------------------------------------------------------------------------------------
# config


def load_config(config: Any) -> dict:
    """A config dict, or the path of a TOML / YAML / JSON file, validated, with defaults filled in
    (see docs/eval.md)."""
    from ..config import config_source, merge_defaults

    data, base_dir = config_source(config)
    cfg = merge_defaults(DEFAULT_CONFIG, data)
    models = cfg["models"] = list(cfg["models"]) if isinstance(cfg["models"], list) else cfg["models"]
    if not isinstance(models, list) or not models:
        raise ValueError("models: expected a list of [[models]] tables with name and path (or responses), "
                         f"got {models!r}")
    names = []
    for i, m in enumerate(models):
        if not isinstance(m, Mapping):
            raise ValueError(f"models[{i}]: expected a table with name and path, got {m!r}")
        extra = set(m) - _MODEL_KEYS
        if extra:
            raise ValueError(f"models[{i}]: unknown keys {sorted(extra)}; accepted are {sorted(_MODEL_KEYS)}")
        if not isinstance(m.get("name"), str) or not m["name"]:
            raise ValueError(f"models[{i}].name: expected a non-empty string, got {m.get('name')!r}")
        if m.get("path") is None and m.get("responses") is None:
            raise ValueError(f"models[{i}] ({m['name']}): give path (a local transformers model directory) "
                             "and/or responses (a JSONL file of id, lang, response)")
        if m.get("template", "auto") not in _TEMPLATES:
            raise ValueError(f"models[{i}].template: expected one of {list(_TEMPLATES)} (auto: the tokenizer's own "
                             f"chat template), got {m['template']!r}")
        for key in ("path", "tokenizer", "responses"):
            if m.get(key) is not None:
                if not isinstance(m[key], str):
                    raise ValueError(f"models[{i}].{key}: expected a path string, got {m[key]!r}")
                m = {**m, key: _resolve(base_dir, m[key])}
        models[i] = m
        names.append(m["name"])
    if len(set(names)) != len(names):
        raise ValueError(f"models: names must be unique, got {names}")
    j = cfg["judge"]
    if j["kind"] not in ("none", "http", "transformers"):
        raise ValueError(f"judge.kind: expected 'none', 'http' or 'transformers', got {j['kind']!r}")
    if j["kind"] != "none":
        if j["baseline"] not in names:
            raise ValueError(f"judge.baseline: expected one of the model names {names}, got {j['baseline']!r}")
        if j["kind"] == "http" and (not j["base_url"] or not j["model"]):
            raise ValueError("judge: kind 'http' needs base_url (e.g. 'http://127.0.0.1:8000/v1') and model, "
                             f"got base_url={j['base_url']!r}, model={j['model']!r}")
        if j["kind"] == "transformers" and not j["path"]:
            raise ValueError("judge.path: kind 'transformers' needs the judge model's local directory")
    if j["ci"] not in ("wilson", "bootstrap"):
        raise ValueError(f"judge.ci: expected 'wilson' or 'bootstrap', got {j['ci']!r}")
    st = cfg["stats"]
    check_ci_args(st["bootstrap"], st["alpha"])
    if isinstance(st["seed"], bool) or not isinstance(st["seed"], int):
        raise ValueError(f"stats.seed: expected an int, got {st['seed']!r}")
    d = cfg["data"]
    if not isinstance(d["source"], str):
        raise ValueError(f"data.source: expected 'demo' or a JSONL path, got {d['source']!r}")
    if d["source"] != "demo":
        d["source"] = _resolve(base_dir, d["source"])
    langs = d["languages"]
    if langs is not None and (not isinstance(langs, list) or not all(isinstance(x, str) and x for x in langs)):
        raise ValueError(f"data.languages: expected a list of language codes, got {langs!r}")
    if not isinstance(d["max_per_language"], int) or d["max_per_language"] < 0:
        raise ValueError(f"data.max_per_language: expected an int >= 0 (0: all), got {d['max_per_language']!r}")
    if cfg["device"] not in ("auto", "cpu", "cuda") and not str(cfg["device"]).startswith("cuda:"):
        raise ValueError(f"device: expected 'auto', 'cpu', 'cuda' or 'cuda:N', got {cfg['device']!r}")
    if cfg["dtype"] not in ("auto", "float32", "bfloat16", "float16"):
        raise ValueError(f"dtype: expected 'auto', 'float32', 'bfloat16' or 'float16', got {cfg['dtype']!r}")
    cfg["output"] = _resolve(base_dir, str(cfg["output"]))
    return cfg


def _resolve(base_dir: str, path: str) -> str:
    return os.path.normpath(os.path.join(base_dir, os.path.expanduser(path)))


def _read_jsonl(path: str, what: str) -> list[dict]:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{what}: {path!r} does not exist")
    rows = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except ValueError as exc:
                    raise ValueError(f"{what}: {path}:{lineno} is not valid JSON ({exc})") from None
    return rows


def _records(cfg: Mapping) -> list[dict]:
    d = cfg["data"]
    if d["source"] == "demo":
        from ..data import demo_records

        recs = demo_records(split=d["split"])
    else:
        recs = _read_jsonl(d["source"], "data.source")
    if d["max_per_language"]:
        seen: dict[str, int] = {}
        kept = []
        for r in recs:
            lang = r.get("lang") if isinstance(r, Mapping) else None
            seen[lang] = seen.get(lang, 0) + 1
            if seen[lang] <= d["max_per_language"]:
                kept.append(r)
        recs = kept
    return recs


def _aligned_responses(path: str, records: Sequence[Mapping]) -> list[Optional[str]]:
    """A responses file's texts in record order, matched by (lang, id); a record without one gets None
    (an empty response, counted as such)."""
    rows = _read_jsonl(path, "models.responses")
    by_key = {}
    for k, row in enumerate(rows):
        if not isinstance(row, Mapping) or "lang" not in row or "id" not in row:
            raise ValueError(f"models.responses: {path} line {k + 1} needs 'id', 'lang' and 'response'")
        by_key[(row["lang"], str(row["id"]))] = row.get("response")
    return [by_key.get((r.get("lang"), str(r.get("id", i)))) for i, r in enumerate(records)]


def _load_model(path: str, tokenizer_path: Optional[str], device: str, dtype: str,
                template: Optional[str] = None, what: str = "models.path"):
    """A local transformers model directory as ``(model, tokenizer)``; ``template`` ``"chatml"`` or
    ``"llama3"`` gives the tokenizer that chat template, ``"auto"`` requires it to carry its own, None
    leaves it as it is."""
    from .._deps import require

    transformers = require("transformers", "mlmix eval")
    import torch

    if not os.path.isdir(path):
        raise FileNotFoundError(f"{what}: {path!r} is not a local model directory")
    kwargs: dict[str, Any] = {"local_files_only": True}
    if dtype != "auto":
        kwargs["dtype"] = getattr(torch, dtype)
    with _quiet_transformers(transformers):
        model = transformers.AutoModelForCausalLM.from_pretrained(path, **kwargs)
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    model.to(device)
    tok = transformers.AutoTokenizer.from_pretrained(tokenizer_path or path, local_files_only=True)
    if template in ("chatml", "llama3"):
        from .. import chat

        tok.chat_template = chat.CHATML_TEMPLATE if template == "chatml" else chat.LLAMA3_TEMPLATE
    elif template == "auto" and not getattr(tok, "chat_template", None):
        raise ValueError(f"{what}: the tokenizer in {tokenizer_path or path!r} has no chat template; set template = "
                         "\"chatml\" or \"llama3\" in its [[models]] table (the template the model was tuned with)")
    return model, tok


def load_model(path: str, *, device: str = "auto", dtype: str = "auto", tokenizer_path: Optional[str] = None,
               template: Optional[str] = None, what: str = "path"):
    """A local transformers model directory as ``(model, tokenizer)`` on ``device`` (``"auto"``: CUDA when
    present); ``template`` as for ``[[models]]`` (None leaves the tokenizer's own); ``what`` names the setting
    in errors."""
    return _load_model(path, tokenizer_path, device, dtype, template, what)


class _quiet_transformers:
    """Silence transformers' weight-loading progress bar (its own lines on stderr would interleave with
    ours); restores the setting after."""

    def __init__(self, transformers):
        self.logging = transformers.utils.logging

    def __enter__(self):
        self.was = self.logging.is_progress_bar_enabled()
        self.logging.disable_progress_bar()

    def __exit__(self, *exc):
        if self.was:
            self.logging.enable_progress_bar()


def _make_judge(cfg: Mapping):
    j = cfg["judge"]
    from .judge import JUDGE_PROMPT, HTTPJudge, TransformersJudge

    template = j["template"] or JUDGE_PROMPT
    if j["kind"] == "http":
        cache = j["cache_dir"] or os.path.join(cfg["output"], "judge-cache")
        return HTTPJudge(j["base_url"], j["model"], api_key_env=j["api_key_env"], timeout=float(j["timeout"]),
                         max_retries=j["max_retries"], backoff=float(j["backoff"]), concurrency=j["concurrency"],
                         cache_dir=cache, max_tokens=j["max_tokens"], template=template)
    if j["kind"] == "transformers":
        model, tok = _load_model(j["path"], None, cfg["device"], cfg["dtype"], what="judge.path")
        return TransformersJudge(model, tok, template=template, batch_size=j["batch_size"])
    return None


def run(config: Any, *, output: Optional[str] = None, progress: Optional[Callable[[str], None]] = None) -> dict:
    """Run the evaluation a config describes and write ``results.json``, ``responses/<model>.jsonl`` and the
    charts (``judge.svg``, ``loss.svg``, ``fidelity.svg``) into its output directory. Returns the results."""
    from .._atomic import atomic_file
    from .results import chart, to_json

    from .._outputs import claim_directory

    cfg = load_config(config)
    if output is not None:
        cfg["output"] = os.path.abspath(output)
    # claimed before anything runs: the judge's cache and the results go into it
    cfg["output"] = claim_directory(cfg["output"], "eval")
    records = _records(cfg)
    langs = cfg["data"]["languages"]
    models, responses = {}, {}
    for i, m in enumerate(cfg["models"]):
        if m.get("path"):
            _say(progress, f"loading {m['name']} from {m['path']}")
            models[m["name"]] = _load_model(m["path"], m.get("tokenizer"), cfg["device"], cfg["dtype"],
                                            m.get("template", "auto"), f"models[{i}] ({m['name']}).path")
        else:
            models[m["name"]] = None
        if m.get("responses"):
            responses[m["name"]] = _aligned_responses(m["responses"], records)
    judge = _make_judge(cfg)
    gen = cfg["generate"]
    generation = None
    if gen["enabled"]:
        generation = {k: gen[k] for k in ("max_new_tokens", "do_sample", "temperature", "top_p", "batch_size",
                                          "system")}
    st = cfg["stats"]
    results = evaluate(
        models, records, languages=langs, loss=cfg["loss"]["enabled"], generation=generation, responses=responses,
        fidelity=cfg["fidelity"]["enabled"], fidelity_candidates=cfg["fidelity"]["candidates"], judge=judge,
        baseline=cfg["judge"]["baseline"] if judge is not None else None, ci=cfg["judge"]["ci"],
        n_bootstrap=st["bootstrap"], alpha=st["alpha"], seed=st["seed"], batch_tokens=cfg["loss"]["batch_tokens"],
        max_length=cfg["loss"]["max_length"], fused=cfg["loss"]["fused"], progress=progress)
    if "judge" in results.get("absent", {}):
        results["absent"]["judge"] = _no_judge_config([m["name"] for m in cfg["models"]])
    out = claim_directory(cfg["output"], "eval")
    os.makedirs(os.path.join(out, "responses"), exist_ok=True)
    for name, rows in results.get("responses", {}).items():
        with atomic_file(os.path.join(out, "responses", f"{_safe(name)}.jsonl"), "w") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
    charts = {}
    for metric, section in (("judge", "judge"), ("loss", "loss"), ("fidelity", "fidelity")):
        if results.get(section):
            charts[metric] = os.path.join(out, f"{metric}.svg")
            with atomic_file(charts[metric], "w") as f:
                f.write(chart(results, metric))
    results["files"] = {"results": os.path.join(out, "results.json"), "charts": charts,
                        "responses": os.path.join(out, "responses")}
    with atomic_file(results["files"]["results"], "w") as f:
        f.write(to_json(results))
    return results


def _no_judge_config(names: Sequence[str]) -> str:
    base = names[0] if names else "MODEL"
    return (f"no [judge] in the config, so the side-by-side columns are absent (each model's score against the "
            f"baseline per language, with its interval and wins/ties/losses, and judge.svg). To add them, add "
            f"[judge] with kind = \"http\", base_url (an OpenAI-compatible server, e.g. vLLM's "
            f"http://127.0.0.1:8000/v1), model and baseline = \"{base}\", or kind = \"transformers\" with "
            f"path = a local judge model; see docs/eval.md")


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)


# ---------------------------------------------------------------------------------------------------------
# command line


def add_subparser(subparsers) -> argparse.ArgumentParser:
    """Add ``eval`` to an ``argparse`` subparsers object (``mlmix``'s); the command runs :func:`run`."""
    p = subparsers.add_parser(
        "eval", help="per-language loss, generation, language fidelity and side-by-side judging of tuned models",
        description="Evaluate models tuned on mlmix mixtures as the study did: held-out loss and perplexity per "
                    "language with bootstrap intervals, generation, language fidelity, and the side-by-side judge "
                    "protocol (both orders). CONFIG is TOML, YAML or JSON; see docs/eval.md.")
    g = p.add_mutually_exclusive_group()
    g.add_argument("-q", "--quiet", action="store_true", help="print only errors (and --json output)")
    g.add_argument("-v", "--verbose", action="store_true", help="print more detail")
    p.add_argument("--json", action="store_true", help="print the results as JSON on stdout")
    p.add_argument("config", metavar="CONFIG", help="the evaluation config (.toml, .yaml/.yml or .json)")
    p.add_argument("-o", "--output", default=None, help="output directory (default: the config's output)")
    p.set_defaults(func=_cmd_eval)
    return p


def _cmd_eval(args: argparse.Namespace) -> int:
    from .results import format_table, to_json

    quiet = args.quiet or args.json
    progress = None if quiet else (lambda s: print(s, file=sys.stderr, flush=True))
    results = run(args.config, output=args.output, progress=progress)
    if args.json:
        print(to_json(results))
    elif not args.quiet:
        print(format_table(results), end="")
        print(f"results: {results['files']['results']}")
        for path in results["files"]["charts"].values():
            print(f"chart: {path}")
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``python -m mlmix.eval CONFIG``: the ``mlmix eval`` command on its own (exit 1 on a user error)."""
    parser = argparse.ArgumentParser(prog="mlmix eval")
    sub = parser.add_subparsers(dest="command")
    add_subparser(sub)
    args = parser.parse_args(["eval", *(sys.argv[1:] if argv is None else argv)])
    try:
        rc = args.func(args)
        sys.stdout.flush()
        return rc
    except BrokenPipeError:
        from ..cli import stdout_closed

        return stdout_closed()
    except KeyboardInterrupt:
        print("mlmix eval: interrupted", file=sys.stderr)
        return 130
    except (ValueError, TypeError, OSError, ImportError) as exc:
        print(f"mlmix eval: error: {exc}", file=sys.stderr)
        return 1
