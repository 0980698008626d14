"""atheris target: mlmix.Tokenizer on the HF tokenizers path (impl="hf") on arbitrary texts and chat records.

Texts are cut from the input bytes and decoded with surrogateescape, so invalid UTF-8 arrives as
lone surrogates. Beyond "no crash": a batch's ids equal the per-text ids (batching never changes
tokens), valid texts round-trip through decode, and bad records are skipped with on_error="skip"
(counted in the stats) rather than raising.
"""

import atheris
import numpy as np

from _common import CLEAN, main
import mlmix

with atheris.instrument_imports(include=["mlmix"]):
    import mlmix.tokenize  # noqa: F401
    import mlmix.chat  # noqa: F401
    import mlmix.formats  # noqa: F401

TOK = mlmix.Tokenizer.qwen("qwen", impl="hf")  # the HF path (the native one: fuzz_bpe and the libFuzzer bpe target)
ROLES = ["user", "assistant", "system", "tool", "", "USER", None, 3]


def TestOneInput(data: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(data)
    what = fdp.ConsumeIntInRange(0, 1)
    # the options first: once the texts take the remaining bytes, every pick would be the first choice
    max_length = fdp.PickValueInList([None, 1, 8, 4096])
    truncation = fdp.PickValueInList(list(mlmix.tokenize.TRUNCATION))
    train_on = fdp.PickValueInList(list(mlmix.tokenize.TRAIN_ON))
    add_eos = fdp.ConsumeBool()
    raw = fdp.ConsumeBytes(fdp.remaining_bytes())
    texts = [p.decode("utf-8", "surrogateescape") for p in raw.split(b"\xfe")[:32]]
    if what == 0:
        try:
            batch = TOK.encode_batch(texts)
        except CLEAN:
            assert any(not _valid(t) for t in texts), "a valid batch was refused"
            return
        for i, t in enumerate(texts):
            ids = TOK.encode(t)
            assert np.array_equal(ids, batch[i]), f"text {i}: batch ids differ from single ids"
            assert TOK.decode(ids) == t, f"text {i} does not round-trip"
        return
    conv = [{"role": ROLES[len(t) % len(ROLES)], "content": t} for t in texts]
    records = [{"messages": conv}, {"messages": conv[:1]}, {"messages": []},
               {"prompt": texts[0], "completion": texts[-1]}]
    try:
        enc = TOK.encode_records(records, on_error="skip", max_length=max_length, train_on=train_on, add_eos=add_eos,
                                 truncation=None if max_length is None else truncation)
    except CLEAN as exc:
        raise AssertionError("on_error='skip' raised") from exc
    assert enc.stats.records == len(records)
    lengths = enc.tokens.lengths
    assert np.array_equal(lengths, enc.loss_mask.lengths), "tokens and loss mask differ in length"
    assert max_length is None or lengths.max(initial=0) <= max_length, f"a record is longer than {max_length}"
    assert np.all(enc.tokens.values < TOK.vocab_size), "ids outside the vocabulary"


def _valid(t: str) -> bool:
    try:
        t.encode("utf-8")
        return True
    except UnicodeError:
        return False


if __name__ == "__main__":
    main(TestOneInput)
