"""The study's config: defaults, validation (every error names the key, the value and what is accepted), the
bundled default grid, and the config hash.

A config is a dict or a TOML / YAML / JSON file; see docs/study.md for every key. Unknown keys are errors, so a
typo never silently runs the default.
"""

from __future__ import annotations

import math
import os
from typing import Any, Mapping

from ..cache import stage_key
from ..config import config_source, merge_defaults

__all__ = ["DEFAULT_CONFIG", "BUNDLED_DEFAULT", "FAMILIES", "BACKENDS", "load_config", "config_hash"]

FAMILIES = ("monolingual", "pinch", "percent", "unseen", "diversity", "bilingual", "temperature", "unimax")
BACKENDS = ("tiny", "hf")
JUDGE_KINDS = ("none", "http", "transformers")
TEMPLATES = ("auto", "chatml", "llama3")

# a key set to None means "the backend's default" (see _BACKEND_DEFAULTS)
DEFAULT_CONFIG: dict = {
    "name": "study",
    "output": "mlmix-study",
    "seeds": [0],
    "languages": None,
    "data": {"train": "demo", "heldout": "demo", "max_heldout_per_language": 0},
    "arms": {"monolingual": [], "pinch": [], "percent": [], "unseen": False, "diversity": [], "bilingual": [],
             "temperature": [], "unimax": False, "pivot": "en", "seen": None, "diversity_order": None},
    "train": {"backend": "tiny", "model": None, "steps": None, "lr": None, "batch_size": None, "seq_len": None,
              "template": None, "lora": False, "lora_r": 16, "lora_alpha": 32, "lora_dropout": 0.05,
              "device": "auto", "dtype": "auto", "bpe_vocab_size": 1024},
    "eval": {"generate": True, "max_new_tokens": None, "batch_size": None, "fidelity": True, "bootstrap": 1000,
             "alpha": 0.05},
    "judge": {"kind": "none", "baseline": "monolingual", "ci": "wilson", "base_url": None, "model": None,
              "api_key_env": None, "timeout": 60.0, "max_retries": 4, "backoff": 1.0, "concurrency": 4,
              "max_tokens": 16, "path": None, "batch_size": 8, "template": None},
}

_BACKEND_DEFAULTS = {
    # the demo's recipe for the tiny LM (mlmix.demo): 8 x 256-token rows, lr 3e-3, ChatML; its generations are
    # short and cheap, so they run in few, wide batches (eval_batch_size)
    "tiny": {"steps": 80, "lr": 3e-3, "batch_size": 8, "seq_len": 256, "template": "chatml", "max_new_tokens": 48,
             "eval_batch_size": 64},
    "hf": {"steps": 200, "lr": 2e-5, "batch_size": 8, "seq_len": 2048, "template": "auto", "max_new_tokens": 256,
           "eval_batch_size": 16},
}
_TINY_FIXED = ("batch_size", "seq_len")  # the tiny LM's shape is the demo's; steps and lr may change

#: ``mlmix study`` with no config: a reduced grid on the bundled 12-language set with the tiny LM.
BUNDLED_DEFAULT: dict = {
    "name": "bundled-default",
    "output": "mlmix-study",
    "seeds": [0],
    "arms": {"monolingual": ["en"], "pinch": [11], "percent": [10, 50, 100], "unseen": True,
             "diversity": [1, 2, 3]},
}


def _err(key: str, value: Any, accepted: str) -> ValueError:
    return ValueError(f"{key}: expected {accepted}, got {value!r}")


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _lang_list(key: str, v: Any, allow_true: bool = False) -> Any:
    if allow_true and v is True:
        return True
    if v is False or v is None:
        return []
    if not isinstance(v, list) or not all(isinstance(x, str) and x for x in v):
        extra = ", or true for every language" if allow_true else ""
        raise _err(key, v, f"a list of language codes such as [\"en\", \"fi\"]{extra}")
    if len(set(v)) != len(v):
        raise _err(key, v, "a list without repeated languages")
    return list(v)


def _num_list(key: str, v: Any, check, accepted: str) -> list:
    if v is False or v is None:
        return []
    if not isinstance(v, list) or not all(check(x) for x in v):
        raise _err(key, v, f"a list of {accepted}")
    if len(set(v)) != len(v):
        raise _err(key, v, f"a list of {accepted} without repeats")
    return list(v)


def _resolve(base_dir: str, path: str) -> str:
    return os.path.normpath(os.path.join(base_dir, os.path.expanduser(path)))


def load_config(config: Any = None) -> dict:
    """A config (dict, or the path of a .toml / .yaml / .json file; None: :data:`BUNDLED_DEFAULT`) validated,
    with every default filled in and paths made absolute (relative to the config file, or to the current
    directory for a dict). Raises ValueError naming the key, the value and what is accepted."""
    data, base_dir = config_source(BUNDLED_DEFAULT if config is None else config)
    cfg = merge_defaults(DEFAULT_CONFIG, data)

    if not isinstance(cfg["name"], str) or not cfg["name"]:
        raise _err("name", cfg["name"], "a non-empty string")
    if not isinstance(cfg["output"], (str, os.PathLike)) or not os.fspath(cfg["output"]):
        raise _err("output", cfg["output"], "a directory path")
    cfg["output"] = _resolve(base_dir, os.fspath(cfg["output"]))
    seeds = cfg["seeds"]
    if _is_int(seeds):
        seeds = [seeds]
    if (not isinstance(seeds, list) or not seeds or not all(_is_int(s) and 0 <= s < 2**63 for s in seeds)
            or len(set(seeds)) != len(seeds)):
        raise _err("seeds", cfg["seeds"], "a non-empty list of distinct integers >= 0, e.g. [0, 1, 2]")
    cfg["seeds"] = list(seeds)
    if cfg["languages"] is not None:
        cfg["languages"] = _lang_list("languages", cfg["languages"])
        if not cfg["languages"]:
            raise _err("languages", [], "a non-empty list of language codes (or leave it out: the data's)")

    d = cfg["data"]
    for key in ("train", "heldout"):
        v = d[key]
        if not isinstance(v, str) or not v:
            raise _err(f"data.{key}", v, "\"demo\" (the bundled parallel set) or the path of a JSONL file of "
                       "records with id, lang, instruction and response")
        if v != "demo":
            d[key] = _resolve(base_dir, v)
            if not os.path.isfile(d[key]):
                raise FileNotFoundError(f"data.{key}: {v!r} is not a file (resolved to {d[key]!r})")
    if not _is_int(d["max_heldout_per_language"]) or d["max_heldout_per_language"] < 0:
        raise _err("data.max_heldout_per_language", d["max_heldout_per_language"], "an integer >= 0 (0: all)")

    a = cfg["arms"]
    a["monolingual"] = _lang_list("arms.monolingual", a["monolingual"], allow_true=True)
    a["pinch"] = _num_list("arms.pinch", a["pinch"], lambda x: _is_int(x) and x >= 0,
                           "integers >= 0 (multilingual examples), e.g. [40]")
    a["percent"] = _num_list("arms.percent", a["percent"], lambda x: _is_num(x) and 0 <= x <= 100,
                             "numbers in [0, 100], e.g. [10, 50, 100]")
    if a["diversity"] is True:
        a["diversity"] = True
    else:
        a["diversity"] = _num_list("arms.diversity", a["diversity"], lambda x: _is_int(x) and x >= 1,
                                   "integers k >= 1 (the first k languages of diversity_order), or true for 1..K")
    a["bilingual"] = _lang_list("arms.bilingual", a["bilingual"], allow_true=True)
    a["temperature"] = _num_list("arms.temperature", a["temperature"], lambda x: _is_num(x) and 0 <= x <= 1,
                                 "numbers alpha in [0, 1], e.g. [0.3]")
    for key in ("unseen", "unimax"):
        if not isinstance(a[key], bool):
            raise _err(f"arms.{key}", a[key], "true or false")
    if not isinstance(a["pivot"], str) or not a["pivot"]:
        raise _err("arms.pivot", a["pivot"], "a language code (the pinch's and P% mixtures' pivot, e.g. \"en\")")
    for key in ("seen", "diversity_order"):
        if a[key] is not None:
            a[key] = _lang_list(f"arms.{key}", a[key])
            if not a[key]:
                raise _err(f"arms.{key}", [], "a non-empty list of language codes (or leave it out)")

    t = cfg["train"]
    if t["backend"] not in BACKENDS:
        raise _err("train.backend", t["backend"], "\"tiny\" (the built-in tiny causal LM on the CPU) or \"hf\" "
                   "(a local transformers model directory through the HF Trainer)")
    if t["backend"] == "hf":
        if not isinstance(t["model"], str) or not t["model"]:
            raise _err("train.model", t["model"], "the path of a local transformers model directory (train.backend "
                       "is \"hf\")")
        t["model"] = _resolve(base_dir, t["model"])
        if not os.path.isdir(t["model"]):
            raise FileNotFoundError(f"train.model: {t['model']!r} is not a local model directory")
    elif t["model"] is not None:
        raise _err("train.model", t["model"], "nothing with train.backend = \"tiny\" (the tiny LM is built in; set "
                   "backend = \"hf\" to tune a model directory)")
    defaults = _BACKEND_DEFAULTS[t["backend"]]
    if t["backend"] == "tiny":
        for key in _TINY_FIXED:
            if t[key] is not None and t[key] != defaults[key]:
                raise _err(f"train.{key}", t[key], f"{defaults[key]} or nothing: the tiny LM trains with the demo's "
                           f"rows of {defaults['batch_size']} x {defaults['seq_len']} tokens (use backend \"hf\" to "
                           "choose)")
        if t["lora"]:
            raise _err("train.lora", t["lora"], "false with the tiny backend (LoRA applies to backend \"hf\")")
    for key in ("steps", "lr", "batch_size", "seq_len", "template"):
        if t[key] is None:
            t[key] = defaults[key]
    for key, lo in (("steps", 1), ("batch_size", 1), ("seq_len", 16), ("bpe_vocab_size", 300), ("lora_r", 1)):
        if not _is_int(t[key]) or t[key] < lo:
            raise _err(f"train.{key}", t[key], f"an integer >= {lo}")
    if not _is_num(t["lr"]) or not 0 < t["lr"] < 1:
        raise _err("train.lr", t["lr"], "a learning rate in (0, 1)")
    if t["template"] not in TEMPLATES:
        raise _err("train.template", t["template"], f"one of {list(TEMPLATES)} (auto: the model's own chat template)")
    if t["backend"] == "tiny" and t["template"] != "chatml":
        raise _err("train.template", t["template"], "\"chatml\" with the tiny backend (its tokenizer is trained on "
                   "the spot with ChatML's special tokens)")
    if not isinstance(t["lora"], bool):
        raise _err("train.lora", t["lora"], "true or false (LoRA adapters through peft; backend \"hf\" only)")
    if not _is_num(t["lora_alpha"]) or t["lora_alpha"] <= 0:
        raise _err("train.lora_alpha", t["lora_alpha"], "a number > 0")
    if not _is_num(t["lora_dropout"]) or not 0 <= t["lora_dropout"] < 1:
        raise _err("train.lora_dropout", t["lora_dropout"], "a number in [0, 1)")
    if t["device"] not in ("auto", "cpu", "cuda") and not str(t["device"]).startswith("cuda:"):
        raise _err("train.device", t["device"], "\"auto\", \"cpu\", \"cuda\" or \"cuda:N\"")
    if t["dtype"] not in ("auto", "float32", "bfloat16", "float16"):
        raise _err("train.dtype", t["dtype"], "\"auto\", \"float32\", \"bfloat16\" or \"float16\"")

    e = cfg["eval"]
    for key in ("generate", "fidelity"):
        if not isinstance(e[key], bool):
            raise _err(f"eval.{key}", e[key], "true or false")
    if e["max_new_tokens"] is None:
        e["max_new_tokens"] = defaults["max_new_tokens"]
    if e["batch_size"] is None:
        e["batch_size"] = defaults["eval_batch_size"]
    for key in ("max_new_tokens", "batch_size"):
        if not _is_int(e[key]) or e[key] < 1:
            raise _err(f"eval.{key}", e[key], "an integer >= 1")
    if not _is_int(e["bootstrap"]) or e["bootstrap"] < 1:
        raise _err("eval.bootstrap", e["bootstrap"], "an integer >= 1 (bootstrap resamples)")
    if not _is_num(e["alpha"]) or not 0 < e["alpha"] < 1:
        raise _err("eval.alpha", e["alpha"], "a number in (0, 1) (0.05: 95% intervals)")
    if e["fidelity"] and not e["generate"]:
        raise _err("eval.fidelity", True, "false when eval.generate is false (fidelity reads the generated responses)")

    j = cfg["judge"]
    if j["kind"] not in JUDGE_KINDS:
        raise _err("judge.kind", j["kind"], "\"none\", \"http\" (an OpenAI-compatible endpoint) or \"transformers\" "
                   "(a local judge model); a Python callable is passed as mlmix.study(config, judge=f)")
    if not isinstance(j["baseline"], str) or not j["baseline"]:
        raise _err("judge.baseline", j["baseline"], "\"monolingual\" (each language's monolingual arm) or an arm id "
                   "such as \"mono-en\"")
    if j["ci"] not in ("wilson", "bootstrap"):
        raise _err("judge.ci", j["ci"], "\"wilson\" or \"bootstrap\"")
    if j["kind"] == "http":
        if not isinstance(j["base_url"], str) or not j["base_url"].startswith(("http://", "https://")):
            raise _err("judge.base_url", j["base_url"], "an http(s) URL such as \"http://127.0.0.1:8000/v1\" "
                       "(judge.kind is \"http\")")
        if not isinstance(j["model"], str) or not j["model"]:
            raise _err("judge.model", j["model"], "the endpoint's model name (judge.kind is \"http\")")
    if j["kind"] == "transformers":
        if not isinstance(j["path"], str) or not j["path"]:
            raise _err("judge.path", j["path"], "a local judge model directory (judge.kind is \"transformers\")")
        j["path"] = _resolve(base_dir, j["path"])
    if j["kind"] != "none" and not e["generate"]:
        raise _err("eval.generate", False, "true when a judge is configured (the judge compares generated responses)")
    return cfg


def config_hash(cfg: Mapping) -> str:
    """A hash of what a study computes (not where it is written, nor its name)."""
    return stage_key({k: v for k, v in cfg.items() if k not in ("output", "name")})
