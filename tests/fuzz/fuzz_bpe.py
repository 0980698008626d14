"""atheris target: the native BPE encoder (mlmix.bpe.NativeBPE), differentially against HF tokenizers.

Texts are cut from the input bytes and decoded with surrogateescape, so invalid UTF-8 arrives as lone
surrogates. For valid text the native ids must equal HF ``tokenizers``' ids exactly (with and without
special tokens, splitting special tokens or not) and not depend on the thread count; for text with a
lone surrogate both must refuse (the native encoder with a ValueError).
"""

import atheris
import numpy as np

from _common import CLEAN, main

with atheris.instrument_imports(include=["mlmix"]):
    from mlmix._tiktoken import qwen_tokenizer
    from mlmix.bpe import NativeBPE

HF = {name: qwen_tokenizer(name) for name in ("qwen", "qwen3_6")}
NATIVE = {name: NativeBPE.from_hf(tok) for name, tok in HF.items()}


def _valid(t: str) -> bool:
    try:
        t.encode("utf-8")
        return True
    except UnicodeError:
        return False


def TestOneInput(data: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(data)
    name = fdp.PickValueInList(list(HF))
    add_special = fdp.ConsumeBool()
    split_special = fdp.ConsumeBool()
    threads = fdp.PickValueInList([1, 2, 3])
    raw = fdp.ConsumeBytes(fdp.remaining_bytes())
    texts = [p.decode("utf-8", "surrogateescape") for p in raw.split(b"\xfe")[:32]]
    native, hf = NATIVE[name], HF[name]
    try:
        got = native.encode_batch(texts, add_special_tokens=add_special, split_special_tokens=split_special,
                                  num_threads=threads)
    except CLEAN:
        assert not all(_valid(t) for t in texts), "native encoder refused valid text"
        return
    assert all(_valid(t) for t in texts), "native encoder accepted a lone surrogate"
    hf.encode_special_tokens = split_special
    try:
        want = hf.encode_batch(texts, add_special_tokens=add_special)
    finally:
        hf.encode_special_tokens = False
    for i, enc in enumerate(want):
        assert np.array_equal(got[i], np.asarray(enc.ids, dtype=np.uint32)), (
            f"{name}: text {i} {texts[i]!r}: native {got[i].tolist()} != HF {enc.ids}")
    one = native.encode_batch(texts, add_special_tokens=add_special, split_special_tokens=split_special,
                              num_threads=1)
    assert np.array_equal(one.values, got.values) and np.array_equal(one.offsets, got.offsets), "threads changed ids"


if __name__ == "__main__":
    main(TestOneInput)
