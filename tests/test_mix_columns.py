"""The local executor's mix stage as columns (mlmix.engine.stages.mix.Columns) against the per-row functions both
executors share (summarize / merge / reservoirs / merge_prefixes) and against the recipes run on the rows
themselves: the same summary (groups in the same order), the same group prefixes, the same Mixture, the same
records selected."""

from __future__ import annotations

import json

import numpy as np
import pytest

from mlmix import recipes
from mlmix.engine.stages import mix

LANGS = ["en", "de", "sw", "fi", "ar", "zh-Hant"]


def corpus(seed: int, n: int = 300):
    """Records (source id, language, tokens) in a shuffled order: sources available in some languages each, ids
    that are strings (as every record id is), some of them digits or non-ASCII."""
    rng = np.random.default_rng(seed)
    recs = []
    for i in range(n):
        have = [lang for lang in LANGS if rng.random() < 0.5] or ["en"]
        sid = [f"s{i}", str(i), f"ñ{i}", f"{i:05d}"][i % 4]
        recs += [(sid, lang, int(rng.integers(1, 500))) for lang in have]
    order = rng.permutation(len(recs))
    return [recs[k] for k in order.tolist()]


def per_row(recs, chunk=64):
    """What run_mix's general path computes: the groupby by source id (as JSON), then per-block summaries merged."""
    by_sid: dict = {}
    for sid, lang, _ in recs:
        e = by_sid.setdefault(json.dumps(sid), [0, set()])
        e[0] += 1
        e[1].add(lang)
    sids = list(by_sid)
    blocks = [slice(lo, lo + chunk) for lo in range(0, len(sids), chunk)]
    langsets = [by_sid[s][1] for s in sids]
    summary = mix.merge(mix.summarize(sids[b], [by_sid[s][0] for s in sids[b]], langsets[b]) for b in blocks)

    def prefixes(plan):
        return mix.merge_prefixes((mix.reservoirs(sids[b], langsets[b], plan) for b in blocks), plan,
                                  [frozenset(g) for g in plan["groups"]])

    return summary, prefixes


CALLS = [("pinch", dict(n_multilingual=30, pivot="en", languages=LANGS)),
         ("percent_mixture", dict(percent=40, pivot="de", languages=LANGS)),
         ("language_diversity", dict(k=3, order=["en", "fi", "sw"])),
         ("bilingual", dict(pair=["de", "ar"], total=101)),
         ("temperature", dict(alpha=0.3)),
         ("unimax", dict(total=300)),
         ("monolingual", dict(lang="sw", n=25))]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_columns_equal_the_per_row_functions(seed):
    recs = corpus(seed)
    ids, langs, toks = [r[0] for r in recs], [r[1] for r in recs], np.array([r[2] for r in recs])
    cols = mix.Columns.of(ids, langs)
    assert cols is not None
    summary, prefixes = per_row(recs)
    assert list(cols.summary()["groups"].items()) == list(summary["groups"].items())  # order too
    tokens = {}
    for _, lang, t in recs:
        tokens[lang] = tokens.get(lang, 0) + t
    assert cols.tokens(toks) == dict(sorted(tokens.items()))
    rows = [{"id": sid, "lang": lang, "tokens": t} for sid, lang, t in recs]
    for name, kw in CALLS:
        for rseed in (0, 7):
            kw = dict(kw, on_shortfall="take_all")
            mcfg = {"recipe": name, "seed": rseed, **{k: v for k, v in kw.items() if k != "tokens"}}
            got = mix.run_recipe(mcfg, cols.summary(), cols.tokens(toks), cols.prefixes)
            ref = mix.run_recipe(mcfg, summary, cols.tokens(toks), prefixes)
            on_rows = getattr(recipes, name)(rows, seed=rseed, **kw)
            assert (got.rows, got.targets, got.available) == (ref.rows, ref.targets, ref.available), name
            assert sorted(got.rows) == sorted(on_rows.rows), name
            sel = cols.selected(got.rows)
            want = mix.selected_keys(got)
            assert sel.tolist() == [(json.dumps(sid), lang) in want for sid, lang, _ in recs]
            assert int(sel.sum()) == len(got.rows)


def test_columns_refuse_what_the_general_path_must_do():
    """A (source, language) twice (the general path raises the error naming both records) and more than 63
    languages (a source's languages are a 64-bit mask) are left to the per-row functions."""
    assert mix.Columns.of(["a", "b", "a"], ["en", "en", "en"]) is None
    assert mix.Columns.of(["a", "b", "a"], ["en", "en", "de"]) is not None
    many = [f"l{i}" for i in range(64)]
    assert mix.Columns.of(["a"] * 64, many) is None
    assert mix.Columns.of(["a"] * 63, many[:63]) is not None
    empty = mix.Columns.of([], [])
    assert empty is not None and empty.summary()["groups"] == {} and empty.tokens(np.zeros(0)) == {}


def test_local_build_with_a_recipe_selects_as_the_general_path(tmp_path, monkeypatch):
    """A build through the columns and the same build through the general path (Columns.of refusing): the same
    store, mixture and selection, byte for byte."""
    import filecmp
    import os

    import mlmix

    demo = os.path.join(os.path.dirname(mlmix.__file__), "data", "demo")

    def build(out):
        cfg = {"output": str(out), "cache_dir": str(tmp_path / f"cache-{out.name}"), "sources": [{"path": demo}],
               "tokenizer": {"name": "qwen", "template": "chatml"}, "pack": {"seq_len": 512},
               "mixture": {"recipe": "pinch", "n_multilingual": 11, "pivot": "en"}, "report": False}
        mlmix.build(cfg, quiet=True)
        cache = tmp_path / f"cache-{out.name}"
        found = {}
        for root, _, names in os.walk(cache):
            for name in names:
                if name in ("selected.npy", "mixture.json"):
                    found[name] = os.path.join(root, name)
        return found

    fast = build(tmp_path / "fast")
    monkeypatch.setattr(mix.Columns, "of", classmethod(lambda cls, ids, langs: None))
    slow = build(tmp_path / "slow")
    assert set(fast) == {"selected.npy", "mixture.json"} == set(slow)
    for name in fast:
        assert filecmp.cmp(fast[name], slow[name], shallow=False), name
    assert np.load(fast["selected.npy"]).size > 0
    # the store (shards, index) alike; build.json, timings.json and the output marker hold times and paths
    cmp = filecmp.dircmp(tmp_path / "fast", tmp_path / "slow")
    assert not cmp.left_only and not cmp.right_only
    assert set(cmp.diff_files) <= {"build.json", "timings.json", ".mlmix-output"}
    assert {"mixture.json", "langs.json", "lengths.npy"} <= set(cmp.same_files)
    store = [os.path.relpath(os.path.join(r, f), tmp_path / "fast")
             for r, _, names in os.walk(tmp_path / "fast" / "store") for f in names]
    assert len(store) >= 2
    for rel in store:
        assert filecmp.cmp(tmp_path / "fast" / rel, tmp_path / "slow" / rel, shallow=False), rel


def test_prefixes_of_groups_naming_absent_languages():
    """A plan's group naming a language no record has holds no source (as the per-row reservoirs find none), and an
    active language no record has changes nothing."""
    recs = corpus(5, n=60)
    ids, langs = [r[0] for r in recs], [r[1] for r in recs]
    cols = mix.Columns.of(ids, langs)
    _, prefixes = per_row(recs)
    plan = {"active": ["en", "de", "xx"], "groups": [["en"], ["en", "xx"], ["de"], ["de", "en"], []],
            "quotas": [5, 5, 3, 4, 2], "integer": [False] * 5, "seed": 3}
    got = cols.prefixes(plan)
    assert got == prefixes(plan)
    assert got[frozenset(["en", "xx"])] == [] and got[frozenset(["en"])]
