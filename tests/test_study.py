"""``mlmix study``: a small grid end to end on the tiny LM, resume after a failure without retraining, the
results table against the runs' saved metrics, an HTTP judge filling the score columns, and config errors."""

from __future__ import annotations

import csv
import io
import json
import os
import re
import shutil

import pytest
from loopback_judge import completion, serve

pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

import mlmix  # noqa: E402
from mlmix.cli import main  # noqa: E402
from mlmix.study import load_config  # noqa: E402
from mlmix.study import train as study_train  # noqa: E402

LANGS = ["en", "fi", "sw"]
N_HELD = 3


def _config(out, **over) -> dict:
    """Three languages, 2 training steps, 3 held-out examples per language, short generations."""
    cfg = {
        "name": "test", "output": str(out), "seeds": [0], "languages": LANGS,
        "data": {"max_heldout_per_language": N_HELD},
        "arms": {"monolingual": ["en"], "pinch": [2]},
        "train": {"steps": 2},
        "eval": {"max_new_tokens": 4, "bootstrap": 50},
    }
    for k, v in over.items():  # tables are merged into the defaults above, except arms, which is replaced
        cfg[k] = {**cfg[k], **v} if k != "arms" and isinstance(v, dict) and isinstance(cfg.get(k), dict) else v
    return cfg


@pytest.fixture
def counted(monkeypatch):
    """Counts training runs (arm ids). ``counted.state["fail_on"] = n`` makes the n-th training fail half-way:
    it writes a partial file into the run's temporary directory, leaves a copy of that directory as a writer
    killed mid-arm would (named for a dead process), and raises."""
    calls: list[str] = []
    real = study_train.train_run

    def wrapper(store, tcfg, seed, out_dir, **kwargs):
        calls.append(kwargs.get("name"))
        if counted_state["fail_on"] == len(calls):
            with open(os.path.join(out_dir, "partial"), "w") as f:
                f.write("half a model")
            parent, name = os.path.split(out_dir)
            dead = re.sub(r"-[0-9]+-([^-]+)$", r"-999999999-\1", name)  # .<key>.tmp-<host>-<pid>-<random>
            assert dead != name
            shutil.copytree(out_dir, os.path.join(parent, dead))
            raise RuntimeError("injected failure")
        return real(store, tcfg, seed, out_dir, **kwargs)

    counted_state = {"fail_on": None}
    monkeypatch.setattr(study_train, "train_run", wrapper)
    wrapper.calls, wrapper.state = calls, counted_state
    return wrapper


def _run_json(results, arm) -> dict:
    entry = next(a for a in results["arms"] if a["arm"] == arm)
    with open(os.path.join(os.path.dirname(entry["model"]), "run.json"), encoding="utf-8") as f:
        return json.load(f)


def test_two_arm_study_end_to_end_and_table_matches_saved_metrics(tmp_path, counted):
    out = tmp_path / "study"
    cfg_path = tmp_path / "study.json"
    # diversity-k1 (all in English) is the same mixture as mono-en: one shared run, not a third training
    cfg_path.write_text(json.dumps(_config(out, arms={"monolingual": ["en"], "pinch": [2], "diversity": [1]})))
    assert main(["study", str(cfg_path), "--quiet"]) == 0
    assert counted.calls == ["mono-en", "pinch-n2"]
    res = json.loads((out / "results.json").read_text())
    assert res["schema"] == "mlmix.study/1"
    s = res["study"]
    assert s["languages"] == LANGS and s["backend"] == "tiny" and s["model"] is None and s["seeds"] == [0]
    assert s["seen"] == ["en", "fi", "sw"] and s["unseen"] == [] and s["diversity_order"] == ["en", "fi", "sw"]
    assert s["judge"] is None and s["absent"] == ["judge"] and "judge" in s["absent_reasons"]
    assert isinstance(s["config_hash"], str) and s["created"].endswith("+00:00")
    assert [(a["arm"], a["family"], a["param"]) for a in res["arms"]] == [
        ("mono-en", "monolingual", {"lang": "en"}), ("pinch-n2", "pinch", {"n": 2}),
        ("diversity-k1", "diversity", {"k": 1})]
    mono, pinch, k1 = res["arms"]
    assert mono["mixture"] == {"en": 64} and mono["train_languages"] == ["en"]
    assert pinch["mixture"] == {"en": 62, "fi": 1, "sw": 1} and pinch["train_languages"] == LANGS
    assert k1["run"] == mono["run"] and k1["metrics"] == mono["metrics"]
    for a in res["arms"]:
        assert a["status"] == "done" and a["seed"] == 0
        saved = _run_json(res, a["arm"])["metrics"]
        for lang in LANGS:
            m = a["metrics"][lang]
            assert m["judge"] is None and m["judge_lo"] is None and m["judge_hi"] is None
            assert m["n"] == N_HELD and m["loss_lo"] <= m["loss"] <= m["loss_hi"]
            assert 0.0 <= m["fidelity"] <= 1.0
            for k in ("loss", "loss_lo", "loss_hi", "n", "fidelity"):
                assert m[k] == saved[lang][k], (a["arm"], lang, k)
    rows = list(csv.DictReader(io.StringIO((out / "results.csv").read_text())))
    assert list(rows[0]) == ["arm", "family", "param", "seed", "language", "seen", "loss", "loss_lo", "loss_hi", "n",
                             "judge", "judge_lo", "judge_hi", "fidelity"]
    assert len(rows) == 3 * len(LANGS)
    for row in rows:
        a = next(x for x in res["arms"] if x["arm"] == row["arm"])
        m = a["metrics"][row["language"]]
        assert json.loads(row["param"]) == a["param"] and row["family"] == a["family"]
        assert row["seen"] == ("1" if row["language"] in a["train_languages"] else "0")
        assert float(row["loss"]) == m["loss"] and int(row["n"]) == m["n"] and float(row["fidelity"]) == m["fidelity"]
        assert row["judge"] == row["judge_lo"] == row["judge_hi"] == ""
    assert (out / "report.html").read_text().startswith("<!DOCTYPE html>")
    # a rerun trains nothing and gives the same table
    mtime = os.path.getmtime(os.path.join(os.path.dirname(mono["model"]), "run.json"))
    again = mlmix.study(str(cfg_path))
    assert counted.calls == ["mono-en", "pinch-n2"] and all(a["cached"] for a in again["arms"])
    assert [a["metrics"] for a in again["arms"]] == [a["metrics"] for a in res["arms"]]
    assert os.path.getmtime(os.path.join(os.path.dirname(mono["model"]), "run.json")) == mtime


def test_resume_after_an_arm_dies_half_way_does_not_retrain_the_finished_one(tmp_path, counted):
    cfg = _config(tmp_path / "study", languages=["en", "fi"])
    counted.state["fail_on"] = 2
    with pytest.raises(RuntimeError, match="injected failure"):
        mlmix.study(cfg)
    runs = tmp_path / "study" / "runs"
    done = [d for d in os.listdir(runs) if not d.startswith(".")]
    leftovers = [d for d in os.listdir(runs) if d.startswith(".")]
    assert len(done) == 1 and len(leftovers) == 1  # mono-en finished; pinch-n2's half-written directory
    assert (runs / leftovers[0] / "partial").is_file()
    first = runs / done[0] / "run.json"
    assert json.loads(first.read_text())["arm"] == "mono-en"
    mtime = os.path.getmtime(first)
    counted.state["fail_on"] = None
    res = mlmix.study(cfg)
    assert counted.calls == ["mono-en", "pinch-n2", "pinch-n2"]  # mono-en was not trained again
    assert [a["cached"] for a in res["arms"]] == [False if a == "pinch-n2" else True for a in ("mono-en", "pinch-n2")]
    assert os.path.getmtime(first) == mtime
    assert sorted(os.listdir(runs)) == sorted(a["run"] for a in res["arms"])  # the half-written one was removed
    assert not (runs / res["arms"][1]["run"] / "partial").exists()
    assert res["arms"][1]["metrics"]["fi"]["n"] == N_HELD and res["arms"][1]["mixture"] == {"en": 62, "fi": 2}


@pytest.fixture
def judge_server():
    """An OpenAI-compatible endpoint on 127.0.0.1 that prefers the longer response (ties on equal length)."""
    seen: list[str] = []

    def respond(handler, body):
        prompt = body["messages"][-1]["content"]
        seen.append(prompt)
        a = prompt.split("[Response A]\n", 1)[1].split("\n\n[Response B]\n", 1)[0]
        b = prompt.split("[Response B]\n", 1)[1].rsplit("\n\nWhich response", 1)[0]
        handler.send(200, completion("A" if len(a) > len(b) else "B" if len(b) > len(a) else "tie"))

    with serve(respond) as url:
        yield url, seen


def test_http_judge_fills_the_score_columns_against_each_languages_monolingual_arm(tmp_path, judge_server):
    url, seen = judge_server
    # diversity-k1 is mono-en's mixture: it shares mono-en's run (no third training) but is judged as an arm
    cfg = _config(tmp_path / "study", languages=["en", "fi"], arms={"monolingual": ["en", "fi"], "diversity": [1]},
                  judge={"kind": "http", "base_url": url, "model": "judge", "concurrency": 2})
    res = mlmix.study(cfg)
    s = res["study"]
    assert s["absent"] == [] and s["judge"].startswith("http judge") and s["judge_baseline"] == "monolingual"
    by = {a["arm"]: a for a in res["arms"]}
    for arm in ("mono-en", "mono-fi", "diversity-k1"):
        for lang in ("en", "fi"):
            m = by[arm]["metrics"][lang]
            if arm == f"mono-{lang}":  # the baseline's own cell: empty, not 0.5
                assert m["judge"] is None and m["judge_lo"] is None
                continue
            assert m["baseline"] == f"mono-{lang}"
            assert 0.0 <= m["judge_lo"] <= m["judge"] <= m["judge_hi"] <= 1.0
            assert m["wins"] + m["ties"] + m["losses"] + m["invalid"] == N_HELD and m["invalid"] == 0
    # the same answers (diversity-k1 against mono-en in English) are a tie in both orders: the score is 0.5
    k1 = by["diversity-k1"]["metrics"]["en"]
    assert k1["ties"] == N_HELD and k1["judge"] == 0.5
    # 3 arms x 2 languages - 2 baseline cells = 4 cells of N_HELD items, each judged in both orders; prompts
    # seen before (diversity-k1's answers are mono-en's) come from the judge's disk cache
    assert 0 < len(seen) <= 4 * N_HELD * 2
    assert os.path.isdir(tmp_path / "study" / "judge-cache")
    with open(res["files"]["csv"], encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    filled = [r for r in rows if r["judge"]]
    assert len(filled) == 4, rows
    assert all(float(r["judge"]) == by[r["arm"]]["metrics"][r["language"]]["judge"]
                                    for r in filled)


@pytest.mark.parametrize("over, key, value, accepted", [
    ({"seeds": [0, 0]}, "seeds", "[0, 0]", "distinct integers"),
    ({"arms": {"percent": [10, 150]}}, "arms.percent", "[10, 150]", "numbers in [0, 100]"),
    ({"arms": {"pinch": [-1]}}, "arms.pinch", "[-1]", "integers >= 0"),
    ({"arms": {"diversity": [0]}}, "arms.diversity", "[0]", "integers k >= 1"),
    ({"arms": {"monolingual": "en"}}, "arms.monolingual", "'en'", "a list of language codes"),
    ({"arms": {"pincch": [40]}}, "arms.pincch", "unknown key", "accepted keys are"),
    ({"train": {"backend": "gpu"}}, "train.backend", "'gpu'", '"tiny"'),
    ({"train": {"steps": 0}}, "train.steps", "0", "an integer >= 1"),
    ({"train": {"seq_len": 512}}, "train.seq_len", "512", "256 or nothing"),
    ({"train": {"backend": "hf"}}, "train.model", "None", "local transformers model directory"),
    ({"judge": {"kind": "gpt"}}, "judge.kind", "'gpt'", '"http"'),
    ({"judge": {"kind": "http", "base_url": "localhost:8000", "model": "m"}}, "judge.base_url", "'localhost:8000'",
     "http(s) URL"),
    ({"eval": {"alpha": 1.5}}, "eval.alpha", "1.5", "(0, 1)"),
])
def test_bad_config_values_name_the_key_the_value_and_what_is_accepted(tmp_path, over, key, value, accepted):
    cfg = _config(tmp_path / "s")
    for k, v in over.items():
        cfg[k] = {**cfg.get(k, {}), **v} if isinstance(v, dict) else v
    with pytest.raises(ValueError) as info:
        load_config(cfg)
    msg = str(info.value)
    assert msg.startswith(f"{key}:") and value in msg and accepted in msg, msg


def test_grid_errors_name_the_key(tmp_path, counted):
    for arms, key in (({"monolingual": ["de"]}, "arms.monolingual"), ({"diversity": [5]}, "arms.diversity"),
                      ({"bilingual": ["en"]}, "arms.bilingual")):
        with pytest.raises(ValueError, match=f"^{key}: "):
            mlmix.study(_config(tmp_path / "s", arms=arms))
    with pytest.raises(ValueError, match="^judge.baseline: 'mono-fi' is not an arm"):
        mlmix.study(_config(tmp_path / "s", judge={"baseline": "mono-fi"}), judge=lambda i, a, b: "A")
    assert counted.calls == []  # nothing trained before the grid was checked


def test_study_is_a_function_and_a_package():
    import mlmix.study.runner  # noqa: F401  (importing a submodule leaves mlmix.study the function)

    assert callable(mlmix.study) and mlmix.study.__module__ == "mlmix.study"
    from mlmix.study import BUNDLED_DEFAULT

    a = load_config(None)["arms"]
    assert a["monolingual"] == ["en"] and a["percent"] == [10, 50, 100] and a["unseen"] is True
    assert a["diversity"] == [1, 2, 3] and BUNDLED_DEFAULT["arms"]["pinch"] == [11]


def test_cli_bad_config_exits_1_naming_the_key(tmp_path, capsys):
    cfg = tmp_path / "bad.toml"
    cfg.write_text('[arms]\npercent = [10, 200]\n')
    assert main(["study", str(cfg)]) == 1
    err = capsys.readouterr().err
    assert "mlmix study: error: arms.percent: expected a list of numbers in [0, 100]" in err and "[10, 200]" in err
    assert not (tmp_path / "mlmix-study").exists()  # nothing written


def test_example_full_grid_config_is_valid(tmp_path):
    import tomllib

    path = os.path.join(os.path.dirname(__file__), os.pardir, "examples", "study.toml")
    with open(path, "rb") as f:
        cfg = tomllib.load(f)
    for key in ("train", "heldout"):  # the example's paths stand for the user's files
        (tmp_path / f"{key}.jsonl").write_text('{"id": 1, "lang": "en", "instruction": "a", "response": "b"}\n')
        cfg["data"][key] = str(tmp_path / f"{key}.jsonl")
    cfg["train"]["model"] = str(tmp_path)
    full = load_config(cfg)
    assert full["train"]["backend"] == "hf" and full["arms"]["monolingual"] is True and len(full["seeds"]) == 3
    from mlmix.study import expand_arms
    from mlmix.recipes import STUDY_LANGUAGES

    grid = expand_arms(full["arms"], list(STUDY_LANGUAGES))
    assert len(grid) == 12 + 1 + 10 + 1 + 6 + 11 + 2  # 43 arms, as the example's header says


def test_hf_backend_trains_a_local_model_directory_with_the_trainer(tmp_path, capsys):
    """backend "hf": a transformers model directory (a tiny Qwen2 as from_config leaves it, with a byte-level BPE
    and ChatML) tuned through the HF Trainer on the arm's packed rows; the run saves a loadable model."""
    import transformers

    from mlmix.demo import save_model, train_bpe

    recs = mlmix.data.demo_records(split="train")
    tok_path = train_bpe([f"{r['instruction']}\n{r['response']}" for r in recs], 512, str(tmp_path / "tok.json"))
    model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(
        vocab_size=512, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1))
    model_dir = save_model(model, tok_path, str(tmp_path / "base"))
    cfg = _config(tmp_path / "study", languages=["en", "fi"], arms={"pinch": [2]},
                  train={"backend": "hf", "model": model_dir, "steps": 2, "batch_size": 2, "seq_len": 256,
                         "lr": 1e-3, "device": "cpu"})
    capsys.readouterr()
    res = mlmix.study(cfg)
    assert capsys.readouterr().out == ""  # the Trainer's log lines would break `mlmix study --json`
    (arm,) = res["arms"]
    assert res["study"]["backend"] == "hf" and res["study"]["model"] == model_dir
    assert arm["device"] == "cpu" and arm["mixture"] == {"en": 62, "fi": 2}
    assert all(arm["metrics"][lang]["n"] == N_HELD and arm["metrics"][lang]["loss"] > 0 for lang in ("en", "fi"))
    run = _run_json(res, "pinch-n2")
    assert len(run["train_loss"]) == 2 and "fused" in run["loss_route"]
    tuned = transformers.AutoModelForCausalLM.from_pretrained(arm["model"], local_files_only=True)
    assert not all(
        (a == b).all() for a, b in zip(tuned.state_dict().values(), model.state_dict().values()))  # it was trained
