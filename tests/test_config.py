"""mlmix.config: a [mixture] key the recipe does not take is an error when the config is loaded, before any
stage runs (a typo used to surface only at the mix stage, after reading, tokenizing and dedup)."""

from __future__ import annotations

import pytest

from mlmix.config import ConfigError, load_config

BASE = {"output": "out", "sources": [{"path": "data.jsonl"}], "tokenizer": {"name": "qwen"}}


@pytest.mark.parametrize("mixture, bad, accepted", [
    ({"recipe": "pinch", "n_multilingal": 11}, "mixture.n_multilingal: recipe 'pinch'", "n_multilingual"),
    ({"recipe": "all", "percent": 20}, "mixture.percent: recipe 'all'", "no parameters"),
    ({"recipe": "percent_mixture", "percent": 20, "id_field": "uid"}, "mixture.id_field", "spread_over"),
])
def test_a_key_the_recipe_does_not_take_is_refused_up_front(mixture, bad, accepted):
    with pytest.raises(ConfigError, match=bad) as info:
        load_config(dict(BASE, mixture=mixture))
    assert accepted in str(info.value)


def test_every_recipe_parameter_is_accepted():
    cfg = load_config(dict(BASE, mixture={"recipe": "percent_mixture", "percent": 20, "pivot": "en",
                                          "languages": ["en", "fi"], "spread_over": "others", "total": 10,
                                          "on_shortfall": "take_all", "seed": 3}))
    assert cfg["mixture"]["spread_over"] == "others" and cfg["mixture"]["seed"] == 3
    assert load_config(dict(BASE, mixture={"recipe": "temperature", "alpha": 0.5, "tokens": "tokens"}))


def _loaders():
    from mlmix.eval.runner import load_config as eval_load
    from mlmix.study.config import load_config as study_load

    return {"build": load_config, "eval": eval_load, "study": study_load}


@pytest.mark.parametrize("loader", ["build", "eval", "study"])
@pytest.mark.parametrize("name, text, exc, match", [
    ("missing.toml", None, FileNotFoundError, r"missing\.toml' does not exist"),
    ("c.ini", "[a]\n", ConfigError, r"c\.ini': expected a \.toml, \.yaml, \.yml or \.json file, got '\.ini'"),
    ("c", "{}", ConfigError, r"expected a \.toml, \.yaml, \.yml or \.json file, got 'no extension'"),
    ("c.toml", "name = \n", ConfigError, r"c\.toml' could not be parsed"),
    ("c.json", '{"name": ', ConfigError, r"c\.json' could not be parsed"),
    ("c.toml", "\xff\xfe", ConfigError, r"c\.toml' could not be parsed"),
    ("c.json", "[1, 2]", ValueError, r"top level|expected a mapping|table|list"),
    ("c.json", '{"no_such_key": 1}', ValueError, r"no_such_key"),
])
def test_every_config_file_is_read_alike(tmp_path, loader, name, text, exc, match):
    """The build's, mlmix eval's and mlmix study's configs go through one reader: the same errors for a
    missing file, another extension, a file that does not parse, and one whose top level is not a table."""
    path = tmp_path / name
    if text is not None:
        path.write_bytes(text.encode("latin-1") if "\xff" in text else text.encode())
    with pytest.raises(exc, match=match):
        _loaders()[loader](str(path))


def test_merge_defaults_names_the_key_path():
    from mlmix.config import merge_defaults

    base = {"a": 1, "t": {"x": 1, "y": {"z": 2}}}
    got = merge_defaults(base, {"t": {"y": {"z": 3}}})
    assert got == {"a": 1, "t": {"x": 1, "y": {"z": 3}}} and base["t"]["y"]["z"] == 2  # base untouched
    with pytest.raises(ValueError, match=r"t\.y\.w: unknown key; accepted keys are \['z'\]"):
        merge_defaults(base, {"t": {"y": {"w": 0}}})
    with pytest.raises(ValueError, match=r"t: expected a table with keys \['x', 'y'\], got 5"):
        merge_defaults(base, {"t": 5})
