"""The Python blocks of the docs pages, read from the pages at test time and run as written.

README.md and docs/loader.md have their own tests (test_readme_tour.py, test_docs_recipes.py); this file
covers every other page in PAGES. A page's blocks run in order in one namespace, in a fresh temporary folder,
as a reader pastes them one after the other. Where a block uses a name it does not define, the page says what
it is, and the test provides it:

  bpe.md       hf_tokenizer: Qwen's ``tokenizers.Tokenizer`` (``mlmix.Tokenizer.qwen("qwen").backend``), also
               saved as ./tokenizer.json for ``supported("tokenizer.json")``; texts, text: strings in four scripts
  dedup.md     texts, langs: 40 documents in two languages with exact and near duplicates;
               shards: the same texts in two shards; all_langs: their languages
  loss.md      hidden (tokens, H) with gradients; lm_head (an ``nn.Linear(H, V)``), w = lm_head.weight;
               labels (some -100); lang_w (a weight per token); model (a LlamaForCausalLM as from_config leaves it);
               for the Sharding blocks, the environment torchrun gives one process of a one-process job
               (RANK=0, WORLD_SIZE=1, MASTER_ADDR, MASTER_PORT)
  recipes.md   batches: (strata, ids) pairs, string strata en/sw/fi and int64 ids
  eval.md      model, base: two tiny LlamaForCausalLM (from_config, random weights); tok: a byte-level BPE
               trained on the demo set, with the ChatML template; records: 3 held-out demo records in en and fi;
               url: a local OpenAI-compatible server that answers "A"
  tokenize.md  nothing (the block defines its tokenizer and records)

Blocks that do not run here are in NOT_RUN, each with the reason; test_every_block_is_run_or_listed fails
when a page gains a block that is in neither list. The TOML blocks of config.md and eval.md are checked
against the config validators (every key a real one), not run.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import numpy as np
import pytest
from loopback_judge import completion, serve

import mlmix

DOCS = Path(__file__).resolve().parents[1] / "docs"
PAGES = ["bpe.md", "dedup.md", "tokenize.md", "store-format.md", "loss.md", "ray.md", "memory.md", "recipes.md",
         "eval.md", "config.md", "hardening.md", "bad-input.md", "study.md"]

# (page, a string found in exactly one of its Python blocks): run by the test named after the page
RUN = {
    ("bpe.md", "NativeBPE.from_hf(hf_tokenizer)"),
    ("dedup.md", "dedup.near_duplicates(texts"),
    ("dedup.md", "dedup.cluster_signatures(sig"),
    ("tokenize.md", "tok.encode_records(records"),
    ("loss.md", "linear_cross_entropy(hidden, lm_head.weight, labels)"),
    ("loss.md", "(ce + z).backward()"),
    ("loss.md", "torch.compile(head, fullgraph=True)"),
    ("loss.md", "fully_shard(sharded.lm_head)"),
    ("loss.md", "vocab_parallel_linear_cross_entropy(hidden, shard, labels"),
    ("recipes.md", "mlmix.StratifiedReservoir("),
    ("eval.md", "ev.evaluate("),
}
NOT_RUN = {
    ("study.md", 'mlmix.study("examples/study.toml")'):
        "trains a model per arm (examples/study.toml needs a real model and data; the bundled default takes "
        "minutes); tests/test_study.py runs mlmix.study on small grids, with and without an HTTP judge",
    ("loss.md", "AutoModelForCausalLM.from_pretrained(...)"):
        "loads a pretrained model (a hub name or local weights; the page says so); tests/test_loss_trl.py "
        "runs the same patch_causal_lm + SFTTrainer calls on tiny models",
    ("ray.md", 'mlmix.build("examples/pinch.toml", engine="ray")'):
        "starts a local Ray cluster and builds examples/pinch.toml: about 50 s on 2 cores, past this file's "
        "budget; tests/test_readme_tour.py runs the same build (mlmix build examples/pinch.toml --engine ray) "
        "and tests/test_ray.py the engine",
}


def _page(name: str) -> str:
    return (DOCS / name).read_text(encoding="utf-8")


def _python_blocks(name: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", _page(name), re.S)


def _block(page: str, marker: str) -> str:
    found = [b for b in _python_blocks(page) if marker in b]
    assert len(found) == 1, f"docs/{page}: {len(found)} python blocks contain {marker!r}"
    return found[0]


def _run(page: str, ns: dict) -> dict:
    """The page's runnable blocks, in page order, in one namespace."""
    for block in _python_blocks(page):
        if any(p == page and m in block for p, m in RUN):
            exec(compile(block, f"docs/{page}", "exec"), ns)
    return ns


@pytest.fixture
def fresh(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_every_block_is_run_or_listed():
    listed = RUN | set(NOT_RUN)
    for page in PAGES:
        for block in _python_blocks(page):
            markers = [m for p, m in listed if p == page and m in block]
            assert len(markers) == 1, f"docs/{page}: a python block matched by {markers or 'no marker'}:\n{block}"
    for page, marker in listed:
        _block(page, marker)  # each marker names exactly one block


@pytest.fixture(scope="module")
def qwen():
    pytest.importorskip("tokenizers")
    return mlmix.Tokenizer.qwen("qwen").backend


def test_bpe(fresh, qwen):
    qwen.save("tokenizer.json")
    texts = ["Hello, world!", "Привет, мир", "你好，世界", "مرحبا بالعالم 123"]
    ns = _run("bpe.md", {"hf_tokenizer": qwen, "texts": texts, "text": texts[0]})
    ids = ns["ids"]
    assert ids.values.dtype == np.uint32 and ids.offsets.dtype == np.int64 and len(ids) == len(texts)
    assert [ids[i].tolist() for i in range(len(texts))] == [e.ids for e in qwen.encode_batch(texts)]
    assert ns["one"].dtype == np.uint32 and ns["one"].tolist() == qwen.encode(texts[0]).ids
    assert (ns["ok"], ns["why"]) == (True, "")


def _documents():
    rng = np.random.default_rng(0)
    words = "the a quick brown fox jumps over lazy dog cat runs far away from home every day night".split()
    base = [" ".join(rng.choice(words, 30)) for _ in range(30)]
    texts = base + [b + " indeed" for b in base[:5]] + base[5:10]  # 5 near, 5 exact duplicates
    return texts, ["en", "de"] * 20


def test_dedup(fresh):
    texts, langs = _documents()
    ns = _run("dedup.md", {"texts": texts, "langs": langs, "shards": [texts[:17], texts[17:]], "all_langs": langs})
    kept, r, e = ns["kept"], ns["r"], ns["e"]  # r and e: the second block's (from signatures and hashes)
    assert kept == texts[:30]  # the first block's: the near and the exact duplicates removed
    assert r.cluster.dtype == np.int64 and r.pairs.shape[1] == 2
    assert set(r.stats) == {"en", "de"} and sum(s["removed"] for s in r.stats.values()) == 10
    assert sum(s["removed"] for s in e.stats.values()) == 5  # exact duplicates only


def test_tokenize(fresh):
    ns = _run("tokenize.md", {})
    tokens, loss_mask, enc = ns["tokens"], ns["loss_mask"], ns["enc"]
    assert tokens.values.dtype == np.uint32 and loss_mask.values.dtype == np.uint8
    assert np.array_equal(tokens.offsets, loss_mask.offsets) and loss_mask.values.sum() > 0
    assert enc.stats.encoded == len(ns["records"]) and enc.lang == ["en", "fi"]
    assert ns["tok"].decode(ns["ids"][1]) == "Привет"


def test_loss(fresh, monkeypatch):
    torch = pytest.importorskip("torch")
    pytest.importorskip("transformers")
    import socket
    import sys

    import torch.distributed as dist

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import test_hf  # its tiny Llama, as from_config leaves it

    torch.manual_seed(0)
    hidden_size, vocab, n = 32, test_hf.VOCAB, 40
    lm_head = torch.nn.Linear(hidden_size, vocab, bias=False)
    hidden = torch.randn(n, hidden_size, requires_grad=True)
    labels = torch.randint(0, vocab, (n,))
    labels[:4] = -100
    lang_w = torch.rand(n)
    model = test_hf._model()
    import warnings

    with warnings.catch_warnings():  # the page compiles with inductor, whose import warns (see the page)
        warnings.filterwarnings("ignore", message="`torch.jit.script_method` is deprecated",
                                category=DeprecationWarning)
        import torch._inductor.compile_fx  # noqa: F401
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    for key, value in (("RANK", "0"), ("WORLD_SIZE", "1"), ("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", str(port))):
        monkeypatch.setenv(key, value)
    try:
        ns = _run("loss.md", {"hidden": hidden, "lm_head": lm_head, "w": lm_head.weight, "labels": labels,
                              "lang_w": lang_w, "model": model})
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    # one rank holds every row: the vocabulary-parallel loss is the one-process loss
    torch.testing.assert_close(ns["vp_loss"], torch.nn.functional.cross_entropy(
        hidden @ lm_head.weight.T, labels, label_smoothing=0.1))
    assert ns["shard"].grad is not None and ns["sharded"].lm_head.weight.grad is not None
    # Autograd: the z-loss on the returned lse reached the gradients
    valid = labels != -100
    ref_h = hidden.detach().double().requires_grad_(True)
    logits64 = ref_h @ lm_head.weight.detach().double().T
    ref = torch.nn.functional.cross_entropy(logits64, labels) + 1e-4 * (logits64.logsumexp(-1)[valid] ** 2).mean()
    (ref_grad,) = torch.autograd.grad(ref, ref_h)
    torch.testing.assert_close(ns["lse"].detach()[valid].double(), logits64.logsumexp(-1)[valid].detach())
    # hidden.grad holds the Autograd block's gradient plus the torch.compile block's and the vocabulary-parallel
    # block's (one rank: the one-process loss with label smoothing 0.1)
    head_grad = torch.autograd.grad(ns["head"](hidden, labels), hidden)[0]
    vp_grad = torch.autograd.grad(torch.nn.functional.cross_entropy(hidden @ lm_head.weight.detach().T, labels,
                                                                    label_smoothing=0.1), hidden)[0]
    torch.testing.assert_close(hidden.grad - head_grad - vp_grad, ref_grad.float(), rtol=1e-4, atol=1e-5)
    # torch.compile: the compiled head gives the eager head's loss
    torch.testing.assert_close(ns["compiled"](hidden, labels), ns["head"](hidden, labels), rtol=1e-6, atol=0)
    logits = hidden @ lm_head.weight.T
    torch.testing.assert_close(ns["per_token"][4:], torch.nn.functional.cross_entropy(logits, labels, reduction="none")[4:])
    ref = torch.nn.functional.cross_entropy(logits, labels, reduction="none")
    torch.testing.assert_close(ns["loss"], (lang_w * ref)[4:].sum() / lang_w[4:].sum())
    ids = torch.randint(0, vocab, (2, 12))
    out = ns["model"](input_ids=ids, labels=ids)  # training mode, labels: the fused loss, no logits
    assert out.logits is None and torch.isfinite(out.loss)


def test_recipes(fresh):
    rng = np.random.default_rng(0)
    batches = [(rng.choice(["en", "sw", "fi"], 500), np.arange(i * 500, (i + 1) * 500, dtype=np.int64))
               for i in range(4)]
    ns = _run("recipes.md", {"batches": batches})
    sample = ns["sample"]
    offered = {s: int(sum((st == s).sum() for st, _ in batches)) for s in ("en", "sw", "fi")}
    assert {s: len(v) for s, v in sample.items()} == {"en": offered["en"], "sw": offered["sw"], "fi": 0}
    assert all(v.dtype == np.int64 for v in sample.values())


@pytest.fixture
def judge_url():
    """An OpenAI-compatible chat completions endpoint on 127.0.0.1 that prefers the first response."""
    with serve(lambda handler, body: handler.send(200, completion("A"))) as url:
        yield url


def test_eval(fresh, judge_url):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("py3langid")
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from mlmix.chat import CHATML_TEMPLATE
    from mlmix.data import demo_records

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator([r["instruction"] + "\n" + r["response"] for r in demo_records(split="train")],
                            trainers.BpeTrainer(vocab_size=400, special_tokens=["<|endoftext|>", "<|im_start|>",
                                                                                "<|im_end|>"], show_progress=False,
                                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok = transformers.PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|im_end|>",
                                               pad_token="<|endoftext|>", chat_template=CHATML_TEMPLATE)

    def tiny(seed):
        torch.manual_seed(seed)
        cfg = transformers.LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                       num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=1024,
                                       eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, bos_token_id=None)
        return transformers.LlamaForCausalLM(cfg)

    records = [r for lang in ("en", "fi") for r in demo_records(split="heldout", langs=[lang])[:3]]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: more threads only spin (256 generation steps per model)
    try:
        ns = _run("eval.md", {"model": tiny(0), "base": tiny(1), "tok": tok, "records": records, "url": judge_url})
    finally:
        torch.set_num_threads(threads)
    res = ns["res"]
    pair = res["judge"]["pairs"]["pinch"]["languages"]
    assert {lang: pair[lang]["n"] for lang in ("en", "fi")} == {"en": 3, "fi": 3}
    # the judge always answers "A": each model wins one order, so every item is a tie, none invalid
    assert all(pair[lang]["ties"] == 3 and pair[lang]["invalid"] == 0 for lang in ("en", "fi"))
    assert json.loads(Path("r.json").read_text())["models"] == ["pinch", "english_only"]
    assert ns["svg"].startswith("<?xml") and "<svg" in ns["html"]
    assert len(list(Path("cache").rglob("*.json"))) == 12  # 6 items x 2 orders, cached where the block says


def test_config_blocks_name_real_keys(fresh):
    """config.md's build config (with its [mixture] example swapped in) and eval.md's config validate."""
    import tomllib

    from mlmix.config import load_config
    from mlmix.eval import load_config as load_eval_config

    build, mixture = [tomllib.loads(b) for b in re.findall(r"```toml\n(.*?)```", _page("config.md"), re.S)]
    assert load_config(build)["mixture"]["n_multilingual"] == 40
    assert load_config(dict(build, **mixture))["mixture"]["percent"] == 20
    (eval_toml,) = re.findall(r"```toml\n(.*?)```", _page("eval.md"), re.S)
    Path("eval.toml").write_text(eval_toml, encoding="utf-8")
    cfg = load_eval_config("eval.toml")
    assert [m["name"] for m in cfg["models"]] == ["pinch", "english_only"] and cfg["judge"]["kind"] == "http"
