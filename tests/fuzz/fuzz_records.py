"""atheris target: the C++ JSON lines reader (mlmix.readers.iter_blocks), differentially against the Python path.

An input is a source's settings (its first 4 bytes: records format, fields, roles, language, name, id field,
limit, where filter, block size, threads) and a JSON lines file (the rest). ``iter_blocks`` must give
exactly ``RecordBlock.from_records(list(iter_source(src)))``, the same columns or the same exception type and
message, for any block size and thread count; and the hand-back contract must hold: every line the C++ reader
keeps is one Python reads without error. The seed corpus (tests/fuzz/corpus/records) holds rows of every
records format and odd lines; the fuzzer's byte edits make invalid UTF-8, broken JSON, NaN, deep nesting and
every other way a line can go wrong.
"""

import atexit
import os
import shutil
import tempfile

import atheris

from _common import main

with atheris.instrument_imports(include=["mlmix"]):
    from mlmix import readers
    from mlmix.config import validate_config
    from mlmix.recblock import RecordBlock

WORK = tempfile.mkdtemp(prefix="mlmix-fuzz-records-", dir="/dev/shm" if os.path.isdir("/dev/shm") else None)
atexit.register(shutil.rmtree, WORK, True)
PATH = os.path.join(WORK, "data.jsonl")

FORMATS = ["auto", "messages", "alpaca", "prompt_response", "text"]
FIELDS = [{}, {"text": "body"}, {"messages": "turns", "role": "speaker", "content": "says"},
          {"prompt": "question", "response": "answer"}, {"instruction": "task", "input": "ctx", "output": "out"},
          {"system": "sys"}, {"role": "", "content": ""}]
ROLES = [{}, {"customer": "user", "agent": "assistant"}, {"user": "assistant", "assistant": "user"}, {"tool": "tool"}]
LANGS = [{}, {"lang": "en"}, {"lang_field": "language"}, {"lang_field": "id"}]
BLOCKS = [1, 64, 4096, 16 << 20]
# where filters (the seed rows carry "split" and "lang"): strings, ints and bools against every JSON spelling the
# fuzzer makes of those fields, None against missing and null ones, and a float (the Python path's own test)
WHERES = [{}, {}, {}, {}, {"split": "train"}, {"split": "test", "lang": "en"}, {"lang": None}, {"split": 1},
          {"split": True}, {"id": 0}, {"split": False, "lang": "en"}, {"split": 1.0}, {"id": "s001"}, {"lang": "zh"},
          {"split": None}, {"split": ""}]


def settings_of(head: bytes) -> tuple[dict, int, int]:
    head = head.ljust(4, b"\x00")
    kw = {"records": FORMATS[head[0] % len(FORMATS)], "fields": FIELDS[(head[0] // 8) % len(FIELDS)],
          "roles": ROLES[head[1] % len(ROLES)], **LANGS[(head[1] // 4) % len(LANGS)]}
    if head[2] & 1:
        kw["name"] = "fz"
    if head[2] & 2:
        kw["id_field"] = "uid"
    if head[2] & 4:
        kw["limit"] = head[2] >> 3
    if WHERES[head[1] >> 4]:
        kw["where"] = WHERES[head[1] >> 4]
    block = BLOCKS[head[3] % len(BLOCKS)]
    threads = 1 + (head[3] >> 2) % 3
    return kw, block, threads


def outcome(fn):
    try:
        return "ok", fn()
    except Exception as exc:  # compared, type and message
        return "error", (type(exc), str(exc))


def TestOneInput(data: bytes) -> None:
    kw, block, threads = settings_of(data[:4])
    with open(PATH, "wb") as f:
        f.write(data[4:])
    cfg = {"output": os.path.join(WORK, "out"), "tokenizer": {"name": "qwen"}, "sources": [{"path": PATH, **kw}]}
    src = validate_config(cfg)["sources"][0]
    want = outcome(lambda: RecordBlock.from_records(list(readers.iter_source(src))))
    got = outcome(lambda: RecordBlock.concat(list(readers.iter_blocks(src, block, num_threads=threads))))
    assert want[0] == got[0], f"Python path {want}, native {got}"
    if want[0] == "ok":
        assert got[1].equals(want[1]), f"records differ: {got[1].to_records()[:4]} != {want[1].to_records()[:4]}"
    else:
        assert got[1] == want[1], f"errors differ: {got[1]} != {want[1]}"


if __name__ == "__main__":
    main(TestOneInput)
