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
