"""Runs every bad input of the catalogue (docs/bad-input.md) and prints what mlmix does, as a
Markdown table: `python tests/fuzz/bad_inputs.py > /tmp/table.md` (paste it into the doc).

Each case is one call; the outcome is the exception type and its message, or what came back.
A case whose outcome is a crash would kill this script: that is the point of running it.
"""

from __future__ import annotations

import glob
import json
import os
import re
import shutil
import sys
import tempfile

import numpy as np

# the source tree when a developer build put the extension there, else the installed mlmix
_SRC = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "python")
if glob.glob(os.path.join(_SRC, "mlmix", "_core*.so")):
    sys.path.insert(0, _SRC)

import mlmix  # noqa: E402
from mlmix import Ragged  # noqa: E402

CASES: list[tuple[str, str, object]] = []


def case(area: str, what: str):
    def deco(fn):
        CASES.append((area, what, fn))
        return fn

    return deco


def _toks(lengths, dtype=np.uint32):
    lengths = np.asarray(lengths)
    return Ragged.from_lengths(np.arange(int(lengths.sum())).astype(dtype), lengths)


TMP = tempfile.mkdtemp(prefix="mlmix-bad-")


def _store(name="s", **kw):
    p = os.path.join(TMP, name)
    mlmix.write_store(p, _toks([5, 9, 3]), seq_len=16, loss_mask=Ragged.from_lengths(np.ones(17, bool), [5, 9, 3]),
                      langs=["en", "sw", "en"], **kw)
    return p


def _mutate_store(fname, fn):
    p = _store(f"m-{fname}-{len(CASES)}")
    path = os.path.join(p, fname)
    with open(path, "rb") as f:
        data = bytearray(f.read())
    data = fn(data)
    if data is None:
        os.remove(path)
    else:
        with open(path, "wb") as f:
            f.write(data)
    return mlmix.open(p)


# --- packing ---------------------------------------------------------------------------------------
case("pack", "example longer than seq_len, default policy")(lambda: mlmix.pack(np.array([5, 40]), 16))
case("pack", "length 0")(lambda: mlmix.pack(np.array([5, 0]), 16))
case("pack", "negative length")(lambda: mlmix.pack(np.array([5, -3]), 16))
case("pack", "length 2**40 (giant record)")(lambda: mlmix.pack(np.array([2**40]), 16, overlong="truncate"))
case("pack", "float lengths")(lambda: mlmix.pack(np.array([1.5, 2.0]), 16))
case("pack", "NaN length")(lambda: mlmix.pack(np.array([np.nan]), 16))
case("pack", "seq_len=1")(lambda: mlmix.pack(np.array([1]), 1))
case("pack", "seq_len=True (bool)")(lambda: mlmix.pack(np.array([1]), True))
case("pack", "unknown strategy")(lambda: mlmix.pack(np.array([1]), 16, strategy="best"))
case("pack", "seed=-1")(lambda: mlmix.pack(np.array([1]), 16, seed=-1))
case("pack", "2-D lengths")(lambda: mlmix.pack(np.ones((2, 2), np.int64), 16))
case("pack", "empty input")(lambda: mlmix.pack(np.zeros(0, np.int64), 16).num_sequences)
case("pack", "Ragged with decreasing offsets")(lambda: Ragged(np.arange(4), np.array([0, 3, 1, 4])))
case("pack", "materialize with a mask shaped unlike the tokens")(
    lambda: mlmix.pack(_toks([3, 4]), 8).materialize(_toks([3, 4]), Ragged.from_lengths(np.ones(6, bool), [3, 3])))
case("pack", "pad_id outside the token dtype")(lambda: mlmix.pack(_toks([3]), 8).materialize(_toks([3]), pad_id=-1))

# --- store writing ---------------------------------------------------------------------------------
case("store", "no examples")(lambda: mlmix.write_store(os.path.join(TMP, "e"), _toks(np.zeros(0, np.int64)), seq_len=8))
case("store", "langs not strings")(lambda: mlmix.write_store(os.path.join(TMP, "l"), _toks([2]), seq_len=8, langs=[3]))
case("store", "langs of the wrong length")(
    lambda: mlmix.write_store(os.path.join(TMP, "l2"), _toks([2, 2]), seq_len=8, langs=["en"]))
case("store", "chunks of different token dtypes")(lambda: mlmix.write_store(
    os.path.join(TMP, "d"), iter([_toks([2]), _toks([2], np.int64)]), seq_len=8))
case("store", "mask for some chunks only")(lambda: mlmix.write_store(
    os.path.join(TMP, "mk"), iter([_toks([2]), _toks([2])]), seq_len=8,
    loss_mask=iter([Ragged.from_lengths(np.ones(2, bool), [2])])))
case("store", "tokens given as a numpy array")(
    lambda: mlmix.write_store(os.path.join(TMP, "n"), np.arange(5), seq_len=8))

# --- store reading ---------------------------------------------------------------------------------
case("store", "path that does not exist")(lambda: mlmix.open(os.path.join(TMP, "nope")))
case("store", "directory without manifest")(lambda: (os.makedirs(os.path.join(TMP, "empty"), exist_ok=True),
                                                      mlmix.open(os.path.join(TMP, "empty")))[1])
case("store", "one bit flipped in tokens.bin")(
    lambda: _mutate_store("tokens.bin", lambda d: d.__setitem__(3, d[3] ^ 1) or d))
case("store", "tokens.bin truncated by 4 bytes")(
    lambda: _mutate_store("tokens.bin", lambda d: d[:-4]))
case("store", "seg_lens.bin deleted")(lambda: _mutate_store("seg_lens.bin", lambda d: None))
case("store", "manifest: seq_len 16 -> 17 (valid JSON)")(
    lambda: _mutate_store("manifest.json", lambda d: bytearray(bytes(d).replace(b'"seq_len": 16', b'"seq_len": 17'))))
case("store", "manifest: truncated")(lambda: _mutate_store("manifest.json", lambda d: d[: len(d) // 2]))


def _crafted(edit):
    """A manifest edited and re-summed (as a foreign writer would): checks beyond the checksum."""
    from mlmix import store as sm

    p = _store(f"c-{len(CASES)}-{id(edit)}")
    mp = os.path.join(p, "manifest.json")
    with open(mp) as f:
        m = json.load(f)
    m.pop(sm.MANIFEST_CRC)
    edit(m)
    with open(mp, "wb") as f:
        f.write(sm._manifest_bytes(m))
    return mlmix.open(p)


case("store", "manifest: a future format version (99), checksum re-summed")(
    lambda: _crafted(lambda m: m.update(version=99)))
case("store", "crafted manifest: array file '../../etc/passwd'")(
    lambda: _crafted(lambda m: m["arrays"]["tokens"].update(file="../../etc/passwd")))
case("store", "crafted manifest: tokens dtype 'f8'")(
    lambda: _crafted(lambda m: m["arrays"]["tokens"].update(dtype="f8")))
case("store", "crafted manifest: seq_len missing")(lambda: _crafted(lambda m: m.pop("seq_len")))
case("store", "crafted manifest: row offsets past the tokens (lengths consistent)")(
    lambda: _crafted(lambda m: m.update(num_tokens=m["num_tokens"] + 1)))
case("store", "row index out of range")(lambda: mlmix.open(_store("r"))[10])
case("store", "batch of float row indices")(lambda: mlmix.open(_store("r2")).batch(np.array([0.5])))

# --- sampling --------------------------------------------------------------------------------------
case("sample", "NaN weight")(lambda: mlmix.StratifiedReservoir({"en": 2}).add(["en"], [1], np.array([np.nan])))
case("sample", "negative weight")(lambda: mlmix.StratifiedReservoir({"en": 2}).add(["en"], [1], np.array([-1.0])))
case("sample", "infinite weight")(
    lambda: mlmix.StratifiedReservoir({"en": 2}).add(["en"], [1], np.array([np.inf])).result())
case("sample", "stratum not in capacities")(lambda: mlmix.StratifiedReservoir({"en": 2}).add(["de"], [1]))
case("sample", "negative capacity")(lambda: mlmix.StratifiedReservoir({"en": -1}))
case("sample", "negative ids")(lambda: mlmix.StratifiedReservoir({"en": 2}).add(["en"], np.array([-5])).result())
case("sample", "bool stratum")(lambda: mlmix.StratifiedReservoir({True: 2}))
case("sample", "merge with another seed")(
    lambda: mlmix.StratifiedReservoir({"en": 2}, seed=1).merge(mlmix.StratifiedReservoir({"en": 2}, seed=2)))
case("recipes", "language sizes with NaN (temperature allocation)")(
    lambda: mlmix.recipes.allocate_temperature({"en": float("nan"), "sw": 10.0}, 100))
case("recipes", "negative budget")(lambda: mlmix.recipes.allocate_proportional({"en": 5.0}, -1))

# --- dedup -----------------------------------------------------------------------------------------
case("dedup", "invalid UTF-8 bytes, errors='replace'")(lambda: mlmix.dedup.normalize([b"ab\xffcd"]))
case("dedup", "invalid UTF-8 bytes, errors='strict'")(lambda: mlmix.dedup.normalize([b"ab\xffcd"], errors="strict"))
case("dedup", "lone surrogate in str")(lambda: mlmix.dedup.normalize(["ab\udcffcd"]))
case("dedup", "None document")(lambda: mlmix.dedup.exact_duplicates(["a", None]))
case("dedup", "empty and punctuation-only documents")(lambda: mlmix.dedup.near_duplicates(["", "!!", " "]).cluster)
case("dedup", "a 64 MB document")(
    lambda: mlmix.dedup.near_duplicates(["ab " * ((64 << 20) // 3), "x"]).cluster)
case("dedup", "threshold 0")(lambda: mlmix.dedup.near_duplicates(["a"], threshold=0))
case("dedup", "a single str instead of a list")(lambda: mlmix.dedup.exact_duplicates("abc"))

# --- tokenization ----------------------------------------------------------------------------------
try:
    TOK = mlmix.Tokenizer.qwen("qwen")
except Exception as exc:  # pragma: no cover
    TOK = None
    print(f"(no tokenizer: {exc})", file=sys.stderr)
if TOK is not None:
    case("tokenize", "lone surrogate in a text")(lambda: TOK.encode_batch(["ok", "bad \udcff"]))
    case("tokenize", "empty text")(lambda: TOK.encode("").tolist())
    case("tokenize", "a single str instead of a list")(lambda: TOK.encode_batch("abc"))
    case("tokenize", "None text")(lambda: TOK.encode_batch([None]))
    case("tokenize", "record with an unknown role, on_error='raise'")(
        lambda: TOK.encode_records([{"messages": [{"role": "wizard", "content": "x"}]}]))
    case("tokenize", "record with an unknown role, on_error='skip'")(
        lambda: TOK.encode_records([{"messages": [{"role": "wizard", "content": "x"}]}], on_error="skip").stats.skipped)
    case("tokenize", "content of the wrong type (int)")(
        lambda: TOK.encode_records([{"messages": [{"role": "user", "content": 3}]}]))
    case("tokenize", "empty conversation")(lambda: TOK.encode_records([{"messages": []}]))
    case("tokenize", "record that is a list, not an object")(lambda: TOK.encode_records([["user", "hi"]]))
    case("tokenize", "ids beyond the vocabulary to decode")(lambda: TOK.decode([10**9]))


# --- the pipeline (`mlmix build`) on bad source files ------------------------------------------------
GOOD_LINE = b'{"prompt": "What is the capital of France?", "response": "Paris."}'


def _build(lines: list[bytes], **cfg):
    """`mlmix build` on a JSONL file of these lines (Qwen tokenizer, no langid or dedup)."""
    d = tempfile.mkdtemp(dir=TMP)
    with open(os.path.join(d, "data.jsonl"), "wb") as f:
        f.write(b"\n".join(lines) + b"\n")
    config = {"output": os.path.join(d, "out"), "sources": [{"path": os.path.join(d, "data.jsonl")}],
              "tokenizer": {"name": "qwen"}, "langid": {"backend": "none"}, "dedup": {"exact": False, "near": False},
              "pack": {"seq_len": 256}, "report": False, **cfg}
    s = mlmix.build(config, quiet=True)
    pk = s["stages"]["pack"]
    return {k: s[k] for k in ("examples", "tokens", "sequences")} | {k: pk[k] for k in ("truncated", "tokens_dropped")}


case("pipeline", "JSONL line that is not JSON (line 2)")(lambda: _build([GOOD_LINE, b'{"prompt": "p"']))
case("pipeline", "JSONL line that is an array")(lambda: _build([GOOD_LINE, b"[1, 2]"]))
case("pipeline", "invalid UTF-8 in line 2")(lambda: _build([GOOD_LINE, b'{"prompt": "ab\xff", "response": "r"}']))
case("pipeline", "field of the wrong type (response: 3)")(lambda: _build([b'{"prompt": "p", "response": 3}']))
case("pipeline", "no prompt or text field")(lambda: _build([b'{"foo": "bar"}']))
case("pipeline", "empty file")(lambda: _build([b""]))
case("pipeline", "a 16 MB record, seq_len 256, default overlong policy")(
    lambda: _build([GOOD_LINE, b'{"prompt": "p", "response": "' + b"word " * (16 << 18) + b'"}']))
case("pipeline", "a 16 MB record, overlong='truncate'")(
    lambda: _build([GOOD_LINE, b'{"prompt": "p", "response": "' + b"word " * (16 << 18) + b'"}'],
                   pack={"seq_len": 256, "overlong": "truncate"}))
case("pipeline", "mixture recipe 'temperature' with alpha NaN")(
    lambda: _build([GOOD_LINE], mixture={"recipe": "temperature", "alpha": float("nan")}))

# --- the loader on a store tokenized for another model ---------------------------------------------
def _first_batch(pad_id=0, recorded=None, **kw):
    """The first batch of a one-row store of Qwen ids; ``recorded``: the bundled tokenizer (by name)
    whose vocabulary the store records, None for none."""
    from mlmix.torch import PackedDataset

    p = os.path.join(TMP, f"qwen-store-{pad_id}-{recorded}")
    if not os.path.exists(p):
        ids = np.array([9707, 11, 1879, 151643], dtype=np.uint32)  # Qwen ids, up to its <|endoftext|>
        mlmix.write_store(p, Ragged.from_lengths(ids, [4]), seq_len=8, pad_id=pad_id,
                          tokenizer=None if recorded is None else mlmix.Tokenizer.qwen(recorded))
    return next(iter(PackedDataset(p, batch_size=1, **kw)))["input_ids"].tolist()


case("loader", "Qwen-tokenized store, model vocab_size=32000")(lambda: _first_batch(vocab_size=32000))
case("loader", "Qwen-tokenized store, no vocab_size given")(lambda: _first_batch())
case("loader", "store padded with id 151643, model vocab_size=32000")(
    lambda: _first_batch(pad_id=151643, vocab_size=32000))
case("loader", "store written with Qwen's tokenizer, model tokenizer Qwen3.6's (tokenizer=)")(
    lambda: _first_batch(recorded="qwen", tokenizer=mlmix.Tokenizer.qwen("qwen3_6")))
case("loader", "store written with Qwen3.6's tokenizer (more ids), model tokenizer Qwen's (tokenizer=)")(
    lambda: _first_batch(recorded="qwen3_6", tokenizer=mlmix.Tokenizer.qwen()))
case("loader", "store without a recorded tokenizer, tokenizer= given")(
    lambda: _first_batch(tokenizer=mlmix.Tokenizer.qwen()))
case("store", "token ids the given tokenizer does not have (tokenizer=)")(
    lambda: mlmix.write_store(os.path.join(TMP, "foreign"), Ragged.from_lengths(np.array([5, 160000], np.uint32), [2]),
                              seq_len=8, tokenizer=mlmix.Tokenizer.qwen()))


def _outcome(fn) -> str:
    try:
        out = fn()
    except Exception as exc:  # the catalogue records whatever comes out
        # a temporary store directory reads <store>; a file keeps its name (source files name their line)
        msg = re.sub(re.escape(TMP) + r"/[^'\s:)]*",
                     lambda m: ".../" + os.path.basename(m[0]) if re.search(r"\.(jsonl?|bin)$", m[0]) else "<store>",
                     str(exc)).replace("\n", " ").replace("|", "\\|")
        if len(msg) > 200:
            msg = msg[:200] + "..."
        return f"`{type(exc).__name__}`: {msg}"
    text = repr(out)
    if isinstance(out, mlmix.Store) or "Store(" in text:
        return "opens (no error)"
    return "returns " + (text if len(text) < 80 else text[:80] + "...").replace("|", "\\|")


def main() -> None:
    print("| area | bad input | what mlmix does |")
    print("|---|---|---|")
    for area, what, fn in CASES:
        print(f"| {area} | {what} | {_outcome(fn)} |")
    shutil.rmtree(TMP, ignore_errors=True)


if __name__ == "__main__":
    main()
