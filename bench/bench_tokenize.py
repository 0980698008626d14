"""Tokenization throughput on multilingual text (the 12 study languages), Qwen3.6's BPE (248,044 ranks).

    pytest bench/bench_tokenize.py                      # quick: ~4 MB of text
    MLMIX_BENCH_FULL=1 pytest bench/bench_tokenize.py   # the issue's 46 MB
    MLMIX_BENCH_MB=10 pytest bench/bench_tokenize.py    # any size

Variants, all producing the token ids of the same documents in one run:
  hf_encode_batch       tokenizers.Tokenizer.encode_batch + reading .ids (what a user of HF writes)
  hf_encode_batch_fast  tokenizers.Tokenizer.encode_batch_fast (no offsets) + reading .ids
  tiktoken              tiktoken.Encoding.encode_ordinary_batch on the same ranks (its own thread pool)
  mlmix_encode_batch    mlmix.Tokenizer.encode_batch -> Ragged uint32
  mlmix_encode_chat     the same texts as user/assistant conversations -> tokens + loss masks (ChatML fast path)
  trl_style_chat        transformers apply_chat_template(return_assistant_tokens_mask=True) per conversation,
                        on a slice of the data (the usual way to get assistant masks), for reference
  test_encode_block     chat records built from the bundled demo set (MLMIX_BENCH_BLOCK_MB, default 4; 40 with
                        MLMIX_BENCH_FULL) as a RecordBlock, native Qwen3.6 encoder, interleaved rounds:
                        encode_block (C++ assembly) vs encode_records (records as dicts) vs NativeBPE.encode_batch
                        of the message contents alone, MB/s of content bytes and the ratio to the last
Each reports MB/s (UTF-8 bytes of document text) and tokens/s in extra_info, and the ratio to
hf_encode_batch_fast. Another encoder backend is one more entry in ENCODERS.
"""

from __future__ import annotations

import os
import random
import time

import pytest

MB = float(os.environ.get("MLMIX_BENCH_MB", "46" if os.environ.get("MLMIX_BENCH_FULL") else "4"))

SENTENCES = {
    "ar": ["يتعلم النموذج من البيانات المتوازنة بين اللغات.", "ذهبت إلى السوق صباح يوم الجمعة واشتريت الخبز.",
           "هل يمكنك أن تشرح لي كيف تعمل الشبكات العصبية؟"],
    "zh": ["多语言模型需要在不同语言之间保持平衡。", "今天早上我去市场买了新鲜的蔬菜和水果。",
           "请解释一下神经网络是如何工作的？"],
    "cs": ["Model se učí z dat vyvážených mezi jazyky.", "V pátek ráno jsem šel na trh a koupil chléb.",
           "Můžeš mi vysvětlit, jak fungují neuronové sítě?"],
    "en": ["The model learns from data balanced across languages.",
           "On Friday morning I went to the market and bought bread.",
           "Can you explain to me how neural networks work?"],
    "et": ["Mudel õpib keelte vahel tasakaalustatud andmetest.", "Reede hommikul läksin turule ja ostsin leiba.",
           "Kas sa saad mulle selgitada, kuidas närvivõrgud töötavad?"],
    "fi": ["Malli oppii kielten välillä tasapainotetusta datasta.", "Perjantaiaamuna menin torille ja ostin leipää.",
           "Voitko selittää minulle, miten neuroverkot toimivat?"],
    "he": ["המודל לומד מנתונים מאוזנים בין שפות.", "ביום שישי בבוקר הלכתי לשוק וקניתי לחם.",
           "האם תוכל להסביר לי איך רשתות עצביות עובדות?"],
    "hi": ["मॉडल भाषाओं के बीच संतुलित डेटा से सीखता है।", "शुक्रवार की सुबह मैं बाज़ार गया और रोटी खरीदी।",
           "क्या आप मुझे समझा सकते हैं कि तंत्रिका नेटवर्क कैसे काम करते हैं?"],
    "it": ["Il modello impara da dati bilanciati tra le lingue.", "Venerdì mattina sono andato al mercato e ho comprato il pane.",
           "Puoi spiegarmi come funzionano le reti neurali?"],
    "ru": ["Модель учится на данных, сбалансированных между языками.",
           "В пятницу утром я пошёл на рынок и купил хлеб.", "Можешь объяснить мне, как работают нейронные сети?"],
    "es": ["El modelo aprende de datos equilibrados entre idiomas.",
           "El viernes por la mañana fui al mercado y compré pan.", "¿Puedes explicarme cómo funcionan las redes neuronales?"],
    "sw": ["Mfano hujifunza kutoka kwa data iliyosawazishwa kati ya lugha.",
           "Ijumaa asubuhi nilienda sokoni na kununua mkate.", "Je, unaweza kunieleza jinsi mitandao ya neva inavyofanya kazi?"],
}


def make_documents(total_mb: float, seed: int = 0) -> list[str]:
    """Documents of 200-3000 bytes, each in one language: shuffled sentences, words swapped, numbers and
    punctuation inserted, so that the text is varied rather than a few strings repeated."""
    rng = random.Random(seed)
    langs = sorted(SENTENCES)
    words = {k: " ".join(v).split() for k, v in SENTENCES.items()}
    docs, size, target = [], 0, int(total_mb * 1e6)
    while size < target:
        lang = langs[len(docs) % len(langs)]
        want = rng.randint(200, 3000)
        parts, n = [], 0
        while n < want:
            if rng.random() < 0.6:
                s = rng.choice(SENTENCES[lang])
            else:
                s = " ".join(rng.choice(words[lang]) for _ in range(rng.randint(3, 12))) + rng.choice(".!?;:")
            if rng.random() < 0.2:
                s += f" {rng.randint(0, 10 ** rng.randint(1, 6))}"
            if rng.random() < 0.1:
                s += "\n\n"
            parts.append(s)
            n += len(s.encode())
        doc = " ".join(parts)
        docs.append(doc)
        size += len(doc.encode())
    return docs


@pytest.fixture(scope="module")
def data():
    from mlmix._tiktoken import qwen_spec, qwen_tokenizer

    docs = make_documents(MB)
    nbytes = sum(len(d.encode()) for d in docs)
    return {"docs": docs, "bytes": nbytes, "hf": qwen_tokenizer("qwen3_6"), "spec": qwen_spec("qwen3_6")}


RESULTS: dict[str, float] = {}


def _record(benchmark, name, nbytes, ntokens):
    secs = benchmark.stats.stats.min
    mbs = nbytes / 1e6 / secs
    RESULTS[name] = mbs
    benchmark.extra_info.update({"MB": round(nbytes / 1e6, 2), "MB/s": round(mbs, 2),
                                 "tokens/s": round(ntokens / secs), "cores": os.cpu_count()})
    if "hf_encode_batch_fast" in RESULTS and name != "hf_encode_batch_fast":
        benchmark.extra_info["x_hf_encode_batch_fast"] = round(mbs / RESULTS["hf_encode_batch_fast"], 3)


def _run(benchmark, fn, rounds=3):
    return benchmark.pedantic(fn, rounds=rounds, iterations=1, warmup_rounds=0)


def _hf_ids(encodings):
    return [e.ids for e in encodings]


def test_hf_encode_batch_fast(benchmark, data):
    hf = data["hf"]
    ids = _run(benchmark, lambda: _hf_ids(hf.encode_batch_fast(data["docs"], add_special_tokens=False)))
    _record(benchmark, "hf_encode_batch_fast", data["bytes"], sum(map(len, ids)))


def test_hf_encode_batch(benchmark, data):
    hf = data["hf"]
    ids = _run(benchmark, lambda: _hf_ids(hf.encode_batch(data["docs"], add_special_tokens=False)))
    _record(benchmark, "hf_encode_batch", data["bytes"], sum(map(len, ids)))


def test_tiktoken(benchmark, data):
    import tiktoken
    from tiktoken.load import load_tiktoken_bpe

    path, pattern, specials = data["spec"]
    enc = tiktoken.Encoding("qwen3_6", pat_str=pattern, mergeable_ranks=load_tiktoken_bpe(path),
                            special_tokens=specials)
    ids = _run(benchmark, lambda: enc.encode_ordinary_batch(data["docs"], num_threads=os.cpu_count() or 1))
    _record(benchmark, "tiktoken", data["bytes"], sum(map(len, ids)))


def _mlmix(impl: str = "hf"):
    from mlmix.tokenize import Tokenizer

    return Tokenizer.qwen("qwen3_6", impl=impl)


# name -> factory of an object with encode_batch(list[str]) -> Ragged: mlmix over HF tokenizers (the issue-5
# target, >= 0.9x encode_batch_fast) and over its native C++ BPE (the default where supported)
ENCODERS = {"mlmix_encode_batch": _mlmix, "mlmix_encode_batch_native": lambda: _mlmix("native")}


@pytest.mark.parametrize("name", sorted(ENCODERS))
def test_encoder(benchmark, data, name):
    tok = ENCODERS[name]()
    ref = data["hf"].encode_batch_fast(data["docs"][:200], add_special_tokens=False)
    assert tok.encode_batch(data["docs"][:200]).to_lists() == _hf_ids(ref)
    out = _run(benchmark, lambda: tok.encode_batch(data["docs"]))
    _record(benchmark, name, data["bytes"], len(out.values))


def _conversations(docs):
    # user asks with the first sentence, the assistant answers with the document
    return [[{"role": "user", "content": d[: d.find(".") + 1 or 80]}, {"role": "assistant", "content": d}]
            for d in docs]


def test_mlmix_encode_chat(benchmark, data):
    tok = _mlmix()
    convs = _conversations(data["docs"])
    nbytes = sum(len(m["content"].encode()) for c in convs for m in c)
    enc = _run(benchmark, lambda: tok.encode_chat(convs))
    _record(benchmark, "mlmix_encode_chat", nbytes, len(enc.tokens.values))


def test_trl_style_chat(benchmark, data):
    from transformers import PreTrainedTokenizerFast

    from mlmix import chat

    pt = PreTrainedTokenizerFast(tokenizer_object=data["hf"], chat_template=chat.CHATML_TEMPLATE)
    convs = _conversations(data["docs"])[: max(50, len(data["docs"]) // 20)]
    nbytes = sum(len(m["content"].encode()) for c in convs for m in c)

    def run():
        return [pt.apply_chat_template(c, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
                for c in convs]

    out = _run(benchmark, run, rounds=1)
    _record(benchmark, "trl_style_chat", nbytes, sum(len(o["input_ids"]) for o in out))


def test_summary_interleaved(data, capsys):
    """Ratios from rounds that run every variant once in turn (min over rounds), so that load from other
    processes hits all variants alike; the per-variant benchmarks above run back to back."""
    import tiktoken
    from tiktoken.load import load_tiktoken_bpe

    hf, docs = data["hf"], data["docs"]
    path, pattern, specials = data["spec"]
    tt = tiktoken.Encoding("qwen3_6", pat_str=pattern, mergeable_ranks=load_tiktoken_bpe(path),
                           special_tokens=specials)
    tok = _mlmix()
    encoders = {name: make() for name, make in sorted(ENCODERS.items())}
    convs = _conversations(docs)
    chat_texts = [m["content"] for c in convs for m in c]
    chat_bytes = sum(len(t.encode()) for t in chat_texts)
    rendered = [tok.render_chat(c) for c in convs]
    threads = os.cpu_count() or 1
    variants = {
        "hf_encode_batch_fast": (lambda: _hf_ids(hf.encode_batch_fast(docs, add_special_tokens=False)), data["bytes"]),
        "hf_encode_batch": (lambda: _hf_ids(hf.encode_batch(docs, add_special_tokens=False)), data["bytes"]),
        "tiktoken": (lambda: tt.encode_ordinary_batch(docs, num_threads=threads), data["bytes"]),
        **{name: (lambda enc=enc: enc.encode_batch(docs), data["bytes"]) for name, enc in encoders.items()},
        "hf_encode_batch_fast[chat texts]": (
            lambda: _hf_ids(hf.encode_batch_fast(chat_texts, add_special_tokens=False)), chat_bytes),
        # the same token streams without masks: HF on the chats pre-rendered to text (rendering not timed)
        "hf_encode_batch_fast[rendered chats]": (
            lambda: _hf_ids(hf.encode_batch_fast(rendered, add_special_tokens=False)), chat_bytes),
        "mlmix_encode_chat": (lambda: tok.encode_chat(convs), chat_bytes),
    }
    rounds = int(os.environ.get("MLMIX_BENCH_ROUNDS", "3"))
    wall = {name: float("inf") for name in variants}
    cpu = dict(wall)
    for _ in range(rounds):
        for name, (fn, _) in variants.items():
            w0, c0 = time.perf_counter(), time.process_time()
            fn()
            wall[name] = min(wall[name], time.perf_counter() - w0)
            cpu[name] = min(cpu[name], time.process_time() - c0)
    with capsys.disabled():
        print(f"\n{data['bytes'] / 1e6:.1f} MB of text in 12 languages, Qwen3.6 BPE, {threads} cores, "
              f"best of {rounds} interleaved rounds; MB/s (of message/document text) by wall clock and per "
              "CPU-second (all threads); ratios to HF encode_batch_fast on the documents, and for "
              "mlmix_encode_chat to HF encode_batch_fast on the same chats rendered to text")
        for name, (_, nbytes) in variants.items():
            base = "hf_encode_batch_fast[rendered chats]" if name == "mlmix_encode_chat" else "hf_encode_batch_fast"
            w, c = nbytes / 1e6 / wall[name], nbytes / 1e6 / cpu[name]
            wb, cb = variants[base][1] / 1e6 / wall[base], variants[base][1] / 1e6 / cpu[base]
            print(f"  {name:38s} wall {w:7.2f} MB/s {w / wb:5.2f}x   cpu {c:7.2f} MB/s {c / cb:5.2f}x")
    assert all(v > 0 for v in wall.values())


BLOCK_MB = float(os.environ.get("MLMIX_BENCH_BLOCK_MB", "40" if os.environ.get("MLMIX_BENCH_FULL") else "4"))


def demo_chat_records(total_mb: float, seed: int = 0) -> list[dict]:
    """Canonical records (as mlmix.readers makes them) from the demo set: 1-3 user/assistant exchanges, a
    system turn in some, answers with their sentences shuffled and sometimes led by whitespace (the header
    straddle), and one text record in ten."""
    from mlmix.data import demo_records

    rng = random.Random(seed)
    pairs = [(r["instruction"], r["response"], r["lang"]) for r in demo_records()]
    out, size, target = [], 0, int(total_mb * 1e6)

    def shuffled(text):
        parts = text.split(". ")
        rng.shuffle(parts)
        return ". ".join(parts)

    while size < target:
        q, a, lang = rng.choice(pairs)
        rec = {"id": f"r{len(out)}", "lang": lang, "where": f"demo:{len(out)}"}
        if rng.random() < 0.1:
            rec["text"] = shuffled(a)
            size += len(rec["text"].encode())
        else:
            msgs = [{"role": "system", "content": "Answer in the user's language."}] if rng.random() < 0.4 else []
            for _ in range(rng.randint(1, 3)):
                q, a, _ = rng.choice(pairs)
                msgs.append({"role": "user", "content": q})
                msgs.append({"role": "assistant", "content": rng.choice(["", "", "", "\n", " "]) + shuffled(a)})
            rec["messages"] = msgs
            size += sum(len(m["content"].encode()) for m in msgs)
        out.append(rec)
    return out


def test_encode_block(capsys):
    """encode_block vs encode_records vs the native encoder on the contents alone, interleaved rounds."""
    from mlmix.recblock import RecordBlock
    from mlmix.tokenize import Tokenizer

    records = demo_chat_records(BLOCK_MB)
    block = RecordBlock.from_records(records)
    contents = block.strings("content")
    nbytes = len(block.content_values)
    tok = Tokenizer.qwen("qwen3_6")
    assert tok.impl == "native"
    a, b = tok.encode_block(block), tok.encode_records(records)
    assert a.tokens.equals(b.tokens) and a.loss_mask.equals(b.loss_mask)
    variants = {
        "native encode_batch[contents]": lambda: tok._native.encode_batch(contents, add_special_tokens=False),
        "encode_records": lambda: tok.encode_records(records),
        "encode_records[block.to_records()]": lambda: tok.encode_records(block.to_records()),
        "encode_block": lambda: tok.encode_block(block),
    }
    rounds = int(os.environ.get("MLMIX_BENCH_ROUNDS", "3"))
    wall = {name: float("inf") for name in variants}
    cpu = dict(wall)
    for _ in range(rounds):
        for name, fn in variants.items():
            w0, c0 = time.perf_counter(), time.process_time()
            fn()
            wall[name] = min(wall[name], time.perf_counter() - w0)
            cpu[name] = min(cpu[name], time.process_time() - c0)
    base = "native encode_batch[contents]"
    with capsys.disabled():
        print(f"\n{nbytes / 1e6:.1f} MB of message contents in {len(block)} records ({len(contents)} turns), "
              f"Qwen3.6 BPE (native), {os.cpu_count()} cores, best of {rounds} interleaved rounds; MB/s of content "
              "bytes by wall clock and per CPU-second (all threads), ratio to the native encoder on the contents alone")
        for name in variants:
            w, c = nbytes / 1e6 / wall[name], nbytes / 1e6 / cpu[name]
            print(f"  {name:38s} wall {w:7.2f} MB/s {wall[base] / wall[name]:5.2f}x   "
                  f"cpu {c:7.2f} MB/s {cpu[base] / cpu[name]:5.2f}x")
    assert all(v > 0 for v in wall.values())
