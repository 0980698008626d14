"""atheris target: Tokenizer.encode_block (the C++ block chat encoder, csrc/chat.h) on arbitrary RecordBlocks.

Every column is cut from the input bytes: kinds, turn offsets (sometimes out of order or out of range),
roles and contents as raw bytes (so invalid UTF-8, encoded surrogates and special-token strings arrive),
languages. Beyond "no crash": encode_block must agree with encode_records(block.to_records()) exactly,
on tokens, masks, index, lang and stats, or raise the same exception with the same message.
"""

import atheris
import numpy as np

from _common import main
import mlmix

with atheris.instrument_imports(include=["mlmix"]):
    import mlmix.chat
    import mlmix.recblock
    import mlmix.tokenize

TOK = mlmix.Tokenizer.qwen("qwen")  # native encoder, ChatML
ROLES = [b"user", b"assistant", b"system"] * 4 + [b"", b"tool", b"assistant "]
TEMPLATES = ["auto", "llama3", mlmix.chat.ChatML("You are a helpful assistant."), mlmix.chat.Llama3(bos_token="")]
SPECIALS = [b"<|im_start|>", b"<|im_end|>", b"<|endoftext|>", b"assistant\n", b"\n\n", b" \n", b"\xed\xa0\x80"]


def _strings(items):
    offsets = np.zeros(len(items) + 1, np.int64)
    np.cumsum([len(x) for x in items], out=offsets[1:])
    return np.frombuffer(b"".join(items), np.uint8).copy(), offsets


def _block(fdp: atheris.FuzzedDataProvider):
    n = fdp.ConsumeIntInRange(0, 6)
    kinds, turn_offsets, roles, contents = [], [0], [], []
    for _ in range(n):
        kind = fdp.ConsumeIntInRange(0, 2)  # 2: a chat record too (anything but 0 is)
        kinds.append(kind)
        turns = 1 if kind == 0 and fdp.ConsumeBool() else fdp.ConsumeIntInRange(0, 4)
        for _ in range(turns):
            roles.append(fdp.PickValueInList(ROLES) if kind else b"")
            raw = fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 24))
            if fdp.ConsumeIntInRange(0, 7):  # mostly valid UTF-8, so that most blocks get past decoding
                raw = raw.decode("utf-8", "replace").encode("utf-8")
            if fdp.ConsumeBool():
                raw = fdp.PickValueInList(SPECIALS) + raw
            contents.append(raw)
        turn_offsets.append(len(contents))
    if n and fdp.ConsumeIntInRange(0, 15) == 0:  # a malformed offset
        turn_offsets[fdp.ConsumeIntInRange(0, n)] += fdp.ConsumeIntInRange(-3, 3)
    cols = {"kind": np.asarray(kinds, np.uint8), "turn_offsets": np.asarray(turn_offsets, np.int64),
            "has_lang": np.asarray([i % 2 for i in range(n)], np.uint8)}
    cols["role_values"], cols["role_offsets"] = _strings(roles)
    cols["content_values"], cols["content_offsets"] = _strings(contents)
    for name in ("id", "lang", "where"):
        cols[f"{name}_values"], cols[f"{name}_offsets"] = _strings([b"x%d" % i for i in range(n)])
    return mlmix.recblock.RecordBlock(**cols)


def _outcome(fn):
    try:
        return "ok", fn()
    except Exception as exc:  # the two paths must fail alike
        return "raised", (type(exc), str(exc))


def TestOneInput(data: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(data)
    kw = dict(template=fdp.PickValueInList(TEMPLATES),
              train_on=fdp.PickValueInList(list(mlmix.tokenize.TRAIN_ON)),
              train_glue=fdp.PickValueInList(list(mlmix.tokenize.TRAIN_GLUE)),
              on_error=fdp.PickValueInList(["raise", "skip"]), add_eos=fdp.ConsumeBool())
    max_length = fdp.PickValueInList([None, 1, 5, 40])
    if max_length is not None:
        kw.update(max_length=max_length, truncation=fdp.PickValueInList(list(mlmix.tokenize.TRUNCATION)))
    block = _block(fdp)
    got = _outcome(lambda: TOK.encode_block(block, **kw))
    want = _outcome(lambda: TOK.encode_records(block.to_records(), **kw))
    assert got[0] == want[0], f"encode_block {got} but encode_records {want}"
    if got[0] == "raised":
        assert got[1] == want[1], f"different errors: {got[1]} vs {want[1]}"
        return
    a, b = got[1], want[1]
    assert a.tokens.equals(b.tokens), "tokens differ"
    assert a.loss_mask.equals(b.loss_mask), "loss masks differ"
    assert np.array_equal(a.index, b.index) and a.lang == b.lang and a.stats == b.stats, "metadata differs"


if __name__ == "__main__":
    main(TestOneInput)
