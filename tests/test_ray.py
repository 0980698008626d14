"""The Ray executor: the same output as the local executor, byte for byte and stage by stage, with 1
and 2 workers on either; a killed actor is retried; bad addresses and a missing extra give clear errors.
One local Ray (2 CPUs) for the whole module."""

from __future__ import annotations

import glob
import os
import subprocess
import sys

import pytest

ray = pytest.importorskip("ray", reason="the Ray engine needs the optional extra mlmix[ray]")

import mlmix
from mlmix.engine.ray import build_ray, connect
from mlmix.engine.stages import pack as s_pack
from pipeline_data import base_config, parallel_rows, train_tiny_bpe, write_jsonl

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO = os.path.join(ROOT, "python", "mlmix", "data", "demo", "*.jsonl")


@pytest.fixture(scope="module")
def local_ray():
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    ray.init(num_cpus=2, include_dashboard=False, object_store_memory=200 * 1024**2, log_to_driver=False,
             logging_level="ERROR")
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def tok_path(tmp_path_factory):
    return train_tiny_bpe(str(tmp_path_factory.mktemp("tok") / "tokenizer.json"))


@pytest.fixture(scope="module")
def data_path(tmp_path_factory):
    rows = parallel_rows()
    rows.append(dict(rows[0], id="dup-exact"))  # an exact duplicate of row 0 under another id
    longest = max(rows, key=lambda r: len(r["response"]))
    rows.append(dict(longest, id="dup-near", response=longest["response"] + " Indeed."))  # one shingle more
    for r in rows[::7]:  # records without a language go to language identification
        r.pop("lang")
    return write_jsonl(str(tmp_path_factory.mktemp("data") / "data.jsonl"), rows)


def _files(out: str) -> dict[str, bytes]:
    """Every file of the packed store plus the mixture manifest, by relative path."""
    paths = sorted(glob.glob(os.path.join(out, "store", "*"))) + glob.glob(os.path.join(out, "mixture.json"))
    out_files = {}
    for p in paths:
        with open(p, "rb") as f:
            out_files[os.path.relpath(p, out)] = f.read()
    return out_files


def test_same_mixture_and_store_as_single_machine_despite_a_killed_actor(tmp_path, local_ray, tok_path, data_path,
                                                                         monkeypatch):
    """Two sources: the bundled demo set (12 languages, CJK and RTL scripts, language given) and parallel
    rows in 4 languages with exact and near duplicates and records without a language (py3langid). The
    pinch recipe, exact + near dedup per language. An actor process of the tokenize stage exits on its
    first batch: Ray restarts it and retries the batch, and the output is still complete and exact. Shards
    of 16 rows, so that the store is several shard files, each written by its own Ray task."""
    import mlmix.store

    monkeypatch.setattr(mlmix.store, "SHARD_TOKENS", 512 * 16)
    def cfg(d: str) -> dict:
        return {"output": str(tmp_path / d / "out"), "cache_dir": str(tmp_path / d / "cache"), "seed": 3,
                "sources": [{"path": DEMO, "where": {"split": "train"}}, {"path": data_path}],
                "dedup": {"exact": True, "near": True, "threshold": 0.8, "scope": "language"},
                "mixture": {"recipe": "pinch", "n_multilingual": 11, "pivot": "en"},
                "tokenizer": {"path": tok_path, "template": "chatml"},
                "pack": {"seq_len": 512, "overlong": "truncate"}, "report": d == "ray"}

    marker = str(tmp_path / "killed-once")
    a = mlmix.build(cfg("single"), quiet=True, use_cache=False)
    b = build_ray(cfg("ray"), quiet=True, concurrency=2, _fault_marker=marker)
    assert os.path.exists(marker)  # an actor process did exit mid-stage
    assert os.path.isfile(os.path.join(b["output"], "report.html"))
    files = _files(b["output"])
    assert "mixture.json" in files and len(files) > 5
    assert "store/tokens-00001.bin" in files and "store/loss_mask-00001.bin" in files
    assert _files(a["output"]) == files
    sa, sb = a["stages"], b["stages"]
    assert sb["read"]["records"] == sa["read"]["records"]
    assert sb["langid"]["identified"] == sa["langid"]["identified"] > 0
    assert sb["dedup"]["exact_removed"] == sa["dedup"]["exact_removed"] != {}
    assert sb["dedup"]["near_removed"] == sa["dedup"]["near_removed"] != {}
    assert sb["dedup"]["kept"] == sa["dedup"]["kept"]
    for key in ("examples", "tokens", "loss_tokens", "pad_id"):
        assert sb["tokenize"][key] == sa["tokenize"][key]
    assert b["langs"] == a["langs"] and len(b["langs"]) == 12
    assert b["sequences"] == a["sequences"] == len(mlmix.open(b["store"])) and b["engine"] == "ray"
    assert sb["pack"]["shards"] == mlmix.open(b["store"]).num_shards > 1


GROUP_TOKENS = 4096  # examples planned in groups of this many tokens: several groups, planned in parallel


def _variant_config(root: str, tok_path: str, data_path: str) -> dict:
    """py3langid for records without a language, exact + near dedup, the pinch recipe, shards of 16 rows:
    every stage has work, and the same paths for every variant (build.json holds the config)."""
    return {"output": os.path.join(root, "out"), "cache_dir": os.path.join(root, "cache"), "seed": 5,
            "sources": [{"path": DEMO, "where": {"split": "train"}}, {"path": data_path}],
            "dedup": {"exact": True, "near": True, "threshold": 0.8, "scope": "language"},
            "mixture": {"recipe": "pinch", "n_multilingual": 11, "pivot": "en"},
            "tokenizer": {"path": tok_path, "template": "chatml"},
            "pack": {"seq_len": 512, "overlong": "truncate", "shard_sequences": 16}, "report": False}


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tok_path, data_path):
    """The local executor with one worker; its output moved aside so that each variant writes the same path."""
    root = str(tmp_path_factory.mktemp("variants"))
    cfg = _variant_config(root, tok_path, data_path)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(s_pack, "GROUP_TOKENS", GROUP_TOKENS)
        mlmix.build(cfg, quiet=True, use_cache=False)
    os.rename(cfg["output"], os.path.join(root, "reference"))
    return root, os.path.join(root, "reference")


def _output_files(d: str) -> dict:
    """Every file of a build's output but its timings and markers, by relative path."""
    out = {}
    for base, _, names in os.walk(d):
        for n in names:
            if n not in ("build.json", "timings.json", ".mlmix-output"):
                with open(os.path.join(base, n), "rb") as f:
                    out[os.path.relpath(os.path.join(base, n), d)] = f.read()
    return out


@pytest.mark.parametrize("engine, workers", [("local", 2), ("ray", 1), ("ray", 2)])
def test_every_stage_the_same_on_both_executors_with_1_and_2_workers(local_ray, tok_path, data_path, reference,
                                                                      engine, workers, monkeypatch):
    """Against the local executor with 1 worker (its plan in groups of 4,096 tokens, so that planning runs
    in several tasks or processes too): each stage's statistics (records per source, languages
    given and identified, tokens, exact and near removals per language, LSH candidate and verified pairs,
    mixture targets, packing), then build.json byte for byte apart from "engine", and every file of the
    output (store, mixture, lengths, languages, tokenizer)."""
    import json

    import numpy as np

    root, ref = reference
    cfg = _variant_config(root, tok_path, data_path)
    monkeypatch.setattr(s_pack, "GROUP_TOKENS", GROUP_TOKENS)
    assert len(s_pack.groups(np.load(os.path.join(ref, "lengths.npy")))) - 1 > 3  # several plan groups
    if engine == "local":
        mlmix.build(cfg, quiet=True, use_cache=False, workers=workers)
    else:
        mlmix.build(cfg, engine="ray", quiet=True, concurrency=workers)
    got = os.path.join(root, f"{engine}-{workers}")
    os.rename(cfg["output"], got)
    with open(os.path.join(ref, "build.json"), encoding="utf-8") as f:
        want_text = f.read()
    with open(os.path.join(got, "build.json"), encoding="utf-8") as f:
        got_text = f.read()
    want, have = json.loads(want_text), json.loads(got_text)
    for stage in ("read", "langid", "tokenize", "dedup", "mix", "pack", "tokens_by_lang", "lengths"):
        assert have["stages"][stage] == want["stages"][stage], stage
    assert want["stages"]["dedup"]["lsh"]["verified_pairs"] > 0 and want["stages"]["langid"]["identified"] > 0
    assert want["engine"] == "local" and have["engine"] == engine
    assert got_text.replace(f'"engine": "{engine}"', '"engine": "local"') == want_text

    a, b = _output_files(ref), _output_files(got)
    assert sorted(a) == sorted(b) and "store/tokens-00001.bin" in a
    assert [k for k in a if a[k] != b[k]] == []


def test_bad_arguments_are_clear(tmp_path, local_ray, tok_path, data_path, monkeypatch):
    cfg = base_config(str(tmp_path), tok_path, data_path)
    with pytest.raises(ValueError, match=r"address must be 'host:port'.*got 'not an address'"):
        build_ray(cfg, address="not an address")
    with pytest.raises(ValueError, match="num_cpus must be an integer >= 1"):
        connect(num_cpus=0)
    with pytest.raises(ValueError, match="concurrency must be an integer >= 1"):
        build_ray(cfg, concurrency=0)
    monkeypatch.setenv("RAY_ADDRESS", "head-without-port")
    with pytest.raises(ValueError, match=r"RAY_ADDRESS must be 'host:port'.*got 'head-without-port'"):
        connect()
    assert not os.path.exists(cfg["output"])


def test_unreachable_cluster_gives_a_clear_error(tmp_path):
    """In a fresh process (the module's Ray is already initialised here)."""
    code = (
        "from mlmix.engine.ray import connect, RayEngineError\n"
        "try:\n    connect('127.0.0.1:9')\n"
        "except RayEngineError as e:\n    print('ERR', e)\n"
    )
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.path.join(ROOT, "python"), os.environ.get("PYTHONPATH", "")]),
               RAY_DEDUP_LOGS="0")
    env.pop("RAY_ADDRESS", None)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env, check=False)
    assert "ERR cannot connect to the Ray cluster at address '127.0.0.1:9'" in out.stdout, out.stdout + out.stderr


def test_missing_ray_names_the_extra(tmp_path, tok_path, data_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray now fails as if it were not installed
    with pytest.raises(ImportError, match=r"pip install 'mlmix\[ray\]'"):
        build_ray(base_config(str(tmp_path), tok_path, data_path))


def test_recipe_group_order_is_a_mergeable_reservoir():
    """docs/ray.md's plan for a distributed mixture rests on this: the recipes' seeded order of an
    availability group (integer source ids) is the order of StratifiedReservoir keys for the stratum
    code of "assign", so per-block reservoirs merged exactly give the group's first k sources."""
    import numpy as np
    from mlmix import recipes
    from mlmix.sample import StratifiedReservoir

    code = recipes._hash_u64(0, "code", "assign")
    ids = np.random.default_rng(1).choice(10**12, 3000, replace=False)
    for seed, k in ((0, 1), (7, 250), (2**63 + 5, 3000)):
        merged = StratifiedReservoir({code: k}, seed=seed)
        for block in np.array_split(ids, 7):
            part = StratifiedReservoir({code: k}, seed=seed)
            part.add(np.full(len(block), code, dtype=np.uint64), block)
            merged.merge(part)
        assert merged.result()[code].tolist() == recipes._seeded_order(ids.tolist(), seed, "assign")[:k]


def test_cli_engine_ray(tmp_path, local_ray, tok_path, data_path, capsys):
    import json

    from mlmix.cli import main

    path = tmp_path / "cfg.json"
    path.write_text(json.dumps(base_config(str(tmp_path), tok_path, data_path)))
    assert main(["build", str(path), "--engine", "ray", "--address", "nohost"]) == 1
    assert "address must be 'host:port'" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "out")


def test_mixture_from_block_reservoirs_equals_the_recipe_on_rows():
    """The mix stage's pieces without a cluster: sources counted per block, every recipe run on a
    GroupedCorpus whose group prefixes come from per-block bottom-k reservoirs merged exactly. Integer
    ids (negative and large ones too) and string ids, so both orders (reservoir keys, hashed keys) run."""
    import json

    import numpy as np
    from mlmix import recipes
    from mlmix.engine.stages import mix

    rng = np.random.default_rng(4)
    langs = ["en", "de", "sw", "fi", "ar"]
    rows, sources = [], []
    for i in range(400):
        have = [lang for lang in langs if rng.random() < 0.6] or ["en"]
        sid = f"s{i}" if "sw" in have else int(rng.integers(-2**62, 2**62))
        sources.append((json.dumps(sid), len(have), have[::-1]))
        rows += [{"id": sid, "lang": lang, "tokens": int(rng.integers(1, 500))} for lang in have]
    blocks = [sources[lo:lo + 70] for lo in range(0, len(sources), 70)]
    summary = mix.merge(mix.summarize([s[0] for s in b], [s[1] for s in b], [s[2] for s in b]) for b in blocks)
    assert not summary["dups"] and not summary["bad"]
    tokens: dict = {}
    for r in rows:
        tokens[r["lang"]] = tokens.get(r["lang"], 0) + r["tokens"]
    integer_groups = []

    def prefixes(active, quotas, seed):
        plan = mix.prefix_plan(summary["groups"], active, quotas, seed)
        integer_groups.extend(plan["integer"])
        return mix.merge_prefixes([mix.reservoirs([s[0] for s in b], [s[2] for s in b], plan) for b in blocks], plan,
                                  list(quotas))

    corpus = recipes.GroupedCorpus({g: c[0] for g, c in summary["groups"].items()}, tokens, prefixes)
    calls = [("pinch", dict(n_multilingual=30, pivot="en", languages=langs)),
             ("percent_mixture", dict(percent=40, pivot="de", languages=langs)),
             ("language_diversity", dict(k=3, order=["en", "fi", "sw"])),
             ("bilingual", dict(pair=["de", "ar"], total=101)),
             ("temperature", dict(alpha=0.5, tokens="tokens", total=60_000)),
             ("unimax", dict(total=300)),
             ("monolingual", dict(lang="sw", n=25))]
    for name, kw in calls:
        for seed in (0, 11):
            kw = dict(kw, on_shortfall="take_all")
            want = getattr(recipes, name)(rows, seed=seed, **kw)
            got = getattr(recipes, name)(corpus, seed=seed, **kw)
            assert (got.rows, got.targets, got.available, got.params) == (
                want.rows, want.targets, want.available, want.params), name
    assert True in integer_groups and False in integer_groups


def test_mixture_errors_match_the_single_machine_engine(tmp_path, local_ray, tok_path):
    """A (source id, language) given twice: the same error from both executors."""
    rows = [{"id": i, "lang": lang, "instruction": f"Question {i} in {lang}?", "response": f"Answer {i} {lang}."}
            for i in range(6) for lang in ("en", "de")]
    rows.append(dict(rows[2], response="Another answer, same id and language."))
    path = write_jsonl(str(tmp_path / "dup.jsonl"), rows)
    cfg = base_config(str(tmp_path), tok_path, path, mixture={"recipe": "pinch", "n_multilingual": 2,
                                                               "languages": ["en", "de"]},
                      dedup={"exact": False, "near": False}, langid={"backend": "none"})
    with pytest.raises(ValueError, match=r"source id '1' appears twice in language 'en' \(records 2 and 12\)"):
        mlmix.build(dict(cfg, cache_dir=str(tmp_path / "cache")), quiet=True, use_cache=False)
    with pytest.raises(ValueError, match=r"source id '1' appears twice in language 'en' \(records 2 and 12\)"):
        build_ray(cfg, quiet=True, concurrency=1)
    assert not os.path.exists(cfg["output"])


def test_every_record_dropped_is_the_same_clear_error_on_ray(tmp_path, local_ray, tok_path):
    rows = [{"id": i, "instruction": f"Question {i}?", "response": f"Answer {i}."} for i in range(5)]
    path = write_jsonl(str(tmp_path / "nolang.jsonl"), rows)
    cfg = base_config(str(tmp_path), tok_path, path, langid={"backend": "none", "drop_unknown": True},
                      dedup={"exact": True, "near": True})
    with pytest.raises(ValueError, match="pack: no examples are left to pack"):
        mlmix.build(cfg, engine="ray", quiet=True, concurrency=1)
    assert not os.path.exists(cfg["output"])


@pytest.mark.parametrize("engine, workers", [("local", 1), ("ray", 2)])
def test_the_same_rows_as_parquet_give_the_same_output(local_ray, tok_path, data_path, reference, tmp_path, engine,
                                                      workers, monkeypatch):
    """The reference's JSON lines source written as a Parquet file (rows read Arrow batch by batch into columns)
    gives every output file byte for byte, on either executor."""
    import json

    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    with open(data_path, encoding="utf-8") as f:
        rows = [json.loads(line) for line in f]
    path = str(tmp_path / "data.parquet")
    pq.write_table(pa.Table.from_pylist(rows), path, row_group_size=37)
    root, ref = reference
    cfg = _variant_config(str(tmp_path), tok_path, data_path)
    cfg["sources"][1]["path"] = path
    monkeypatch.setattr(s_pack, "GROUP_TOKENS", GROUP_TOKENS)
    if engine == "local":
        mlmix.build(cfg, quiet=True, use_cache=False, workers=workers)
    else:
        mlmix.build(cfg, engine="ray", quiet=True, concurrency=workers)

    a, b = _output_files(ref), _output_files(cfg["output"])
    assert sorted(a) == sorted(b) and "store/tokens-00001.bin" in a
    assert [k for k in a if a[k] != b[k]] == []
