"""The build config of ``mlmix build``: loaded from YAML, TOML or a dict, validated, defaults filled in.

Validation walks a small declarative schema (below) so that every error names the offending key path,
the value found and what is accepted, e.g. ``sources[1].fields.text: expected a string, got 3``.
docs/config.md documents every key.
"""

from __future__ import annotations

import copy
import os
from typing import Any, Mapping

__all__ = ["ConfigError", "load_config", "validate_config", "SCHEMA"]


class ConfigError(ValueError):
    """A config that does not match the schema; the message starts with the key path."""


# ---- schema ------------------------------------------------------------------------------------
# A node is a dict with "type" in {str, int, float, bool, list, dict, any}; dict nodes have "keys"
# ({name: node}) and optionally "extra" (a node for keys not listed, or absent: unknown keys are an
# error); list nodes have "items". "default" fills a missing key; "required" makes it mandatory;
# "enum" lists accepted values; "min"/"max" bound numbers (inclusive); "gt" is an exclusive minimum;
# "one_of_types" accepts several types.

_STR = {"type": "str"}
# keys validate_config adds to each resolved source (not user keys; see there)
_RESOLVED_KEYS = ("given_path", "base_dir", "exclude")
_RECORD_FORMATS = ["auto", "messages", "alpaca", "prompt_response", "text"]
_SOURCE_FORMATS = ["auto", "jsonl", "parquet", "hf-disk", "hub"]
_RECIPES = [
    "all",
    "monolingual",
    "pinch",
    "percent_mixture",
    "unseen_split",
    "language_diversity",
    "bilingual",
    "temperature",
    "unimax",
]

SOURCE = {
    "type": "dict",
    "keys": {
        "path": {"type": "str", "required": True},
        "format": {"type": "str", "enum": _SOURCE_FORMATS, "default": "auto"},
        "records": {"type": "str", "enum": _RECORD_FORMATS, "default": "auto"},
        "name": {"type": "str"},
        "lang": {"type": "str"},
        "lang_field": {"type": "str", "default": "lang"},
        "id_field": {"type": "str", "default": "id"},
        "split": {"type": "str"},
        "where": {"type": "dict", "extra": {"type": "any"}, "default": {}},
        "limit": {"type": "int", "min": 0},
        "fields": {
            "type": "dict",
            "keys": {
                k: _STR
                for k in (
                    "messages",
                    "role",
                    "content",
                    "system",
                    "instruction",
                    "input",
                    "output",
                    "prompt",
                    "response",
                    "text",
                )
            },
            "default": {},
        },
        "roles": {"type": "dict", "extra": _STR, "default": {}},
    },
}

SCHEMA = {
    "type": "dict",
    "keys": {
        "output": {"type": "str", "required": True},
        "cache_dir": {"type": "str"},
        "seed": {"type": "int", "min": 0, "default": 0},
        "fingerprint": {"type": "str", "enum": ["stat", "content"], "default": "stat"},
        "sources": {"type": "list", "items": SOURCE, "required": True, "min_items": 1},
        "langid": {
            "type": "dict",
            "default": {},
            "keys": {
                "backend": {"type": "str", "enum": ["native", "py3langid", "none"], "default": "native"},
                "threshold": {"type": "float", "min": 0.0, "max": 1.0, "default": 0.5},
                "unknown": {"type": "str", "default": "unknown"},
                "drop_unknown": {"type": "bool", "default": False},
                "languages": {"type": "list", "items": _STR},
                "override": {"type": "bool", "default": False},
            },
        },
        "dedup": {
            "type": "dict",
            "default": {},
            "keys": {
                "exact": {"type": "bool", "default": True},
                "near": {"type": "bool", "default": True},
                "threshold": {"type": "float", "gt": 0.0, "max": 1.0, "default": 0.8},
                "num_perm": {"type": "int", "min": 1, "default": 128},
                "ngram": {"type": "int", "min": 1, "default": 5},
                "scope": {"type": "str", "enum": ["language", "global"], "default": "language"},
            },
        },
        "mixture": {
            "type": "dict",
            "default": {},
            "keys": {
                "recipe": {"type": "str", "enum": _RECIPES, "default": "all"},
                "seed": {"type": "int", "min": 0},
            },
            # every other key is a parameter of the recipe (e.g. percent, n_multilingual, pivot)
            "extra": {"type": "any"},
        },
        "tokenizer": {
            "type": "dict",
            "required": True,
            "keys": {
                "name": {"type": "str", "enum": ["qwen", "qwen3_6"]},
                "path": {"type": "str"},
                "pretrained": {"type": "str"},
                "tiktoken": {
                    "type": "dict",
                    "keys": {
                        "path": {"type": "str", "required": True},
                        "pattern": {"type": "str", "required": True},
                        "special_tokens": {"type": "dict", "extra": {"type": "int", "min": 0}, "default": {}},
                    },
                },
                "template": {"type": "str", "default": "auto"},
                "train_on": {"type": "str", "enum": ["all_assistant", "last_assistant", "all"], "default": "all_assistant"},
                "train_glue": {"type": "str", "enum": ["none", "after_turn", "around_turn"], "default": "none"},
                "max_length": {"type": "int", "min": 1},
                "truncation": {"type": "str", "enum": ["drop", "truncate_prompt_left", "truncate_response_right"],
                               "default": "drop"},
            },
        },
        "pack": {
            "type": "dict",
            "default": {},
            "keys": {
                "seq_len": {"type": "int", "min": 2, "default": 2048},
                "strategy": {"type": "str", "enum": ["bfd", "ffd", "wrapped", "bfd_split"], "default": "bfd"},
                "overlong": {"type": "str", "enum": ["error", "truncate", "split", "drop"], "default": "error"},
                "shard_sequences": {"type": "int", "min": 1},
            },
        },
        "report": {"type": "bool", "default": True},
    },
}

_TYPE_NAMES = {
    "str": "a string",
    "int": "an integer",
    "float": "a number",
    "bool": "true or false",
    "list": "a list",
    "dict": "a table (mapping)",
}


def _type_ok(kind: str, value: Any) -> bool:
    if kind == "any":
        return True
    if kind == "str":
        return isinstance(value, str)
    if kind == "bool":
        return isinstance(value, bool)
    if kind == "int":
        return isinstance(value, int) and not isinstance(value, bool)
    if kind == "float":
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if kind == "list":
        return isinstance(value, list)
    if kind == "dict":
        return isinstance(value, Mapping)
    raise AssertionError(f"unknown schema type {kind}")  # a bug in SCHEMA, not user input


def _join(path: str, key) -> str:
    if isinstance(key, int):
        return f"{path}[{key}]"
    return f"{path}.{key}" if path else str(key)


def _check(node: dict, value: Any, path: str) -> Any:
    kind = node["type"]
    where = path or "config"
    if not _type_ok(kind, value):
        raise ConfigError(f"{where}: expected {_TYPE_NAMES[kind]}, got {value!r}")
    if kind == "float":
        value = float(value)
    if "enum" in node and value not in node["enum"]:
        accepted = ", ".join(repr(e) for e in node["enum"])
        raise ConfigError(f"{where}: expected one of {accepted}, got {value!r}")
    if "min" in node and value < node["min"]:
        raise ConfigError(f"{where}: expected a value >= {node['min']}, got {value!r}")
    if "max" in node and value > node["max"]:
        raise ConfigError(f"{where}: expected a value <= {node['max']}, got {value!r}")
    if "gt" in node and not value > node["gt"]:
        raise ConfigError(f"{where}: expected a value > {node['gt']}, got {value!r}")
    if kind == "list":
        if len(value) < node.get("min_items", 0):
            raise ConfigError(f"{where}: expected at least {node['min_items']} item(s), got an empty list")
        item = node.get("items", {"type": "any"})
        return [_check(item, v, _join(path, i)) for i, v in enumerate(value)]
    if kind == "dict":
        keys = node.get("keys", {})
        extra = node.get("extra")
        out = {}
        for k, v in value.items():
            if not isinstance(k, str):
                raise ConfigError(f"{where}: keys must be strings, got {k!r}")
            if k in keys:
                out[k] = _check(keys[k], v, _join(path, k))
            elif extra is not None:
                out[k] = _check(extra, v, _join(path, k))
            else:
                known = ", ".join(sorted(keys)) or "(none)"
                raise ConfigError(f"{_join(path, k)}: unknown key; accepted keys here: {known}")
        for k, sub in keys.items():
            if k in out:
                continue
            if sub.get("required"):
                raise ConfigError(f"{_join(path, k)}: required key is missing")
            if "default" in sub:
                out[k] = _check(sub, copy.deepcopy(sub["default"]), _join(path, k))
        return out
    return value


def validate_config(config: Mapping, *, base_dir: str | os.PathLike | None = None) -> dict:
    """Check ``config`` against the schema and return a new dict with every default filled in.

    Relative paths (``output``, ``cache_dir``, source and tokenizer paths) are resolved against
    ``base_dir`` (the config file's directory; the current directory for a dict). Hub names are
    left as they are.
    """
    if not isinstance(config, Mapping):
        raise ConfigError(f"config: expected a table (mapping), got {type(config).__name__}")
    config = dict(config)
    # a config mlmix resolved before (build.json's "config") holds the source keys added below: keep
    # what they say (the folder and path the user gave), and check the rest as usual
    given: dict[int, tuple[str, str]] = {}
    if isinstance(config.get("sources"), list):
        sources = []
        for i, src in enumerate(config["sources"]):
            if isinstance(src, Mapping) and any(k in src for k in _RESOLVED_KEYS):
                src = dict(src)
                resolved = {k: src.pop(k, None) for k in _RESOLVED_KEYS}
                if isinstance(resolved["given_path"], str) and isinstance(resolved["base_dir"], str):
                    given[i] = (resolved["base_dir"], resolved["given_path"])
            sources.append(src)
        config["sources"] = sources
    cfg = _check(SCHEMA, config, "")
    base = os.path.abspath(os.fspath(base_dir)) if base_dir is not None else os.getcwd()

    def resolve(p: str) -> str:
        return os.path.normpath(os.path.join(base, os.path.expanduser(p)))

    if not cfg["output"].strip():
        raise ConfigError(f"output: expected a path for the build's output directory, got {cfg['output']!r}")
    cfg["output"] = resolve(cfg["output"])
    if "cache_dir" in cfg and not cfg["cache_dir"].strip():
        raise ConfigError(f"cache_dir: expected a path for the stage cache, got {cfg['cache_dir']!r}")
    cfg["cache_dir"] = resolve(cfg["cache_dir"]) if "cache_dir" in cfg else cfg["output"] + ".cache"
    for i, src in enumerate(cfg["sources"]):
        if src["format"] != "hub":
            if not src["path"].strip():
                raise ConfigError(f"sources[{i}].path: expected a file, directory or glob pattern, got {src['path']!r}")
            # kept apart so that only the user's path is a pattern, never the config's folder (see _paths)
            src_base, src["given_path"] = given.get(i, (base, os.path.expanduser(src["path"])))
            src["base_dir"] = src_base
            src["path"] = os.path.normpath(os.path.join(src_base, src["given_path"]))
            # never read: this build's own output and cache (not part of the stage keys, see source_key)
            src["exclude"] = [cfg["output"], cfg["cache_dir"]]
        if "lang" in src and not src["lang"].strip():
            raise ConfigError(f"sources[{i}].lang: expected a language code, got {src['lang']!r}")
    tok = cfg["tokenizer"]
    chosen = [k for k in ("name", "path", "pretrained", "tiktoken") if k in tok]
    if len(chosen) != 1:
        raise ConfigError(
            "tokenizer: give exactly one of name (qwen, qwen3_6), path (tokenizer.json), pretrained (a local model "
            f"directory) or tiktoken (rank file + pattern), got {chosen or 'none'}"
        )
    for key in ("path", "pretrained"):
        if key in tok:
            tok[key] = resolve(tok[key])
    if "tiktoken" in tok:
        tok["tiktoken"]["path"] = resolve(tok["tiktoken"]["path"])
    mix = cfg["mixture"]
    params = [k for k in mix if k not in ("recipe", "seed")]
    if params:  # checked here, not when the mix stage runs after hours of tokenization
        accepted = _recipe_keys(mix["recipe"])
        unknown = [k for k in params if k not in accepted]
        if unknown:
            raise ConfigError(f"mixture.{unknown[0]}: recipe {mix['recipe']!r} takes no such key; accepted keys here: "
                              + (", ".join(["recipe", "seed", *accepted]) if accepted else "recipe (it takes no parameters)"))
    mix.setdefault("seed", cfg["seed"])
    return cfg


def _recipe_keys(recipe: str) -> list[str]:
    """The [mixture] keys a recipe takes: the keyword arguments of the function of that name in mlmix.recipes,
    less ``rows`` and ``seed`` (the table's own keys) and the Python-only field names (a build's rows always
    use ``id`` and ``lang``)."""
    if recipe == "all":
        return []
    import inspect

    from . import recipes

    skip = {"rows", "seed", "id_field", "lang_field"}
    return sorted(k for k in inspect.signature(getattr(recipes, recipe)).parameters if k not in skip)


def read_config_file(path: str | os.PathLike) -> Any:
    """The data of a ``.toml``, ``.yaml``/``.yml`` or ``.json`` config file, not yet validated (None for an
    empty YAML file): FileNotFoundError for a missing file, ConfigError for another extension or a file that
    does not parse. The build's, ``mlmix eval``'s and ``mlmix study``'s configs are read by it."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"config file {path!r} does not exist")
    ext = os.path.splitext(path)[1].lower()
    with open(path, "rb") as f:
        raw = f.read()
    try:
        if ext == ".toml":
            try:
                import tomllib
            except ModuleNotFoundError:  # Python < 3.11
                from ._deps import require

                tomllib = require("tomli", "TOML configs on Python < 3.11")
            return tomllib.loads(raw.decode("utf-8"))
        if ext in (".yaml", ".yml"):
            from ._deps import require

            return require("yaml", "YAML configs").safe_load(raw.decode("utf-8"))
        if ext == ".json":
            import json

            return json.loads(raw.decode("utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:  # TOMLDecodeError and JSONDecodeError are ValueErrors
        raise ConfigError(f"config file {path!r} could not be parsed: {exc}") from exc
    except Exception as exc:  # yaml.YAMLError does not derive from ValueError
        if type(exc).__module__.startswith("yaml"):
            raise ConfigError(f"config file {path!r} could not be parsed: {exc}") from exc
        raise
    raise ConfigError(f"config file {path!r}: expected a .toml, .yaml, .yml or .json file, got "
                      f"{ext or 'no extension'!r}")


def config_source(config: Any) -> tuple[Mapping, str]:
    """(the data, the directory relative paths in it are relative to) of a config given as a file path (read by
    :func:`read_config_file`; its folder) or a mapping (the current directory); anything else, or a file whose top
    level is not a table, is an error. ``mlmix eval``'s and ``mlmix study``'s configs are taken by it."""
    if isinstance(config, (str, os.PathLike)):
        path = os.fspath(config)
        data, base_dir = read_config_file(path), os.path.dirname(os.path.abspath(path))
    elif isinstance(config, Mapping):
        data, base_dir = config, os.getcwd()
    else:
        raise TypeError(f"config must be a path or a dict, got {type(config).__name__}")
    if not isinstance(data, Mapping):
        raise ValueError(f"config: expected a table at the top level, got {type(data).__name__}")
    return data, base_dir


def merge_defaults(base: Mapping, over: Mapping, path: str = "") -> dict:
    """``over`` laid on a deep copy of ``base``, table by table: a key ``base`` lacks, or a value in place of
    one of its tables, is a ValueError naming the key path (``path`` is its prefix, e.g. ``"train."``)."""
    out = copy.deepcopy(dict(base))
    for k, v in over.items():
        if k not in base:
            raise ValueError(f"{path}{k}: unknown key; accepted keys are {sorted(base)}")
        if isinstance(base[k], dict):
            if not isinstance(v, Mapping):
                raise ValueError(f"{path}{k}: expected a table with keys {sorted(base[k])}, got {v!r}")
            out[k] = merge_defaults(base[k], v, f"{path}{k}.")
        else:
            out[k] = v
    return out


def load_config(config: str | os.PathLike | Mapping) -> dict:
    """Load a config from a ``.yaml``/``.yml``/``.toml``/``.json`` file or take a dict; validate it."""
    if isinstance(config, Mapping):
        return validate_config(config)
    path = os.fspath(config)
    data = read_config_file(path)
    if data is None:
        raise ConfigError(f"config file {path!r} is empty")
    return validate_config(data, base_dir=os.path.dirname(os.path.abspath(path)))
