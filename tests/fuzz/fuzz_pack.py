"""atheris target: mlmix.pack (planning + materialize) and StreamPacker on arbitrary lengths and options.

Beyond "no crash", every accepted plan is checked against the packing contract: rows hold at most
seq_len tokens, every example's pieces cover it as the over-long policy says, and materialized rows
give back the example tokens.
"""


import atheris
import numpy as np

from _common import CLEAN, main
import mlmix
from mlmix import Ragged

STRATEGIES = ["bfd", "ffd", "wrapped", "bfd_split", "best", ""]
OVERLONG = ["error", "truncate", "split", "drop", "keep"]
PAD = 2**40  # not a token id of the test data


def check_plan(plan, lengths: np.ndarray, seq_len: int, overlong: str, strategy: str) -> None:
    assert (plan.row_tokens <= seq_len).all() and (plan.row_tokens > 0).all(), "row over seq_len or empty"
    assert plan.tokens_packed + plan.tokens_dropped == int(lengths.sum()), "tokens lost"
    pieces: dict[int, list[tuple[int, int]]] = {}
    for e, s, n in zip(plan.seg_example.tolist(), plan.seg_start.tolist(), plan.seg_len.tolist()):
        pieces.setdefault(e, []).append((s, n))
    for e, length in enumerate(lengths.tolist()):
        got = sorted(pieces.get(e, []))
        if strategy == "wrapped" or length <= seq_len or overlong == "split" or strategy == "bfd_split":
            pos = 0
            for s, n in got:
                assert s == pos and n > 0, f"example {e} pieces {got} do not tile it"
                pos += n
            assert pos == length, f"example {e} covered {pos} of {length} tokens"
        elif overlong == "truncate":
            assert got == [(0, seq_len)], f"truncated example {e}: {got}"
        elif overlong == "drop":
            assert got == [], f"dropped example {e}: {got}"


def TestOneInput(data: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(data)
    seq_len = fdp.ConsumeIntInRange(2, 64) if fdp.ConsumeBool() else fdp.ConsumeIntInRange(-3, 1 << 25)
    strategy = fdp.PickValueInList(STRATEGIES)
    overlong = fdp.PickValueInList(OVERLONG)
    seed = fdp.PickValueInList([None, 0, 1, 7, 2**64 - 1, -1, 2**64])
    n = fdp.ConsumeIntInRange(0, 40)
    huge = fdp.ConsumeIntInRange(0, 20) == 0
    lengths = np.array([fdp.ConsumeIntInRange(-1, 2**40 if huge else 200) for _ in range(n)], dtype=np.int64)
    pieces_bound = int(lengths.clip(0, None).sum()) // max(seq_len, 1)
    if (strategy in ("wrapped", "bfd_split") or overlong == "split") and pieces_bound > 1 << 20:
        return  # legitimately needs ~16 bytes per piece (a 2**31-token example in rows of 2: ~16 GB)
    try:
        plan = mlmix.pack(lengths, seq_len, strategy=strategy, overlong=overlong, seed=seed)
    except CLEAN:
        return
    check_plan(plan, lengths, seq_len, overlong, strategy)
    if int(lengths.sum()) > 1 << 16:
        return
    tokens = Ragged.from_lengths(np.arange(int(lengths.sum()), dtype=np.int64), lengths)
    out = plan.materialize(tokens, pad_id=PAD)
    # every real token of a row is the token at its example's position
    for r in range(plan.num_sequences):
        lo, hi = int(plan.row_offsets[r]), int(plan.row_offsets[r + 1])
        want = np.concatenate([tokens.values[tokens.offsets[e] + s: tokens.offsets[e] + s + k]
                               for e, s, k in zip(plan.seg_example[lo:hi], plan.seg_start[lo:hi], plan.seg_len[lo:hi])])
        assert (out["input_ids"][r, : want.shape[0]] == want).all(), f"row {r} tokens differ"
        assert (out["input_ids"][r, want.shape[0]:] == PAD).all(), f"row {r} padding differs"
    # the streaming packer accepts the same examples in arbitrary chunks
    if strategy in ("bfd", "ffd") and n:
        cut = fdp.ConsumeIntInRange(0, n)
        window = fdp.ConsumeIntInRange(1, 64)
        try:
            sp = mlmix.StreamPacker(seq_len, window=window, strategy=strategy, overlong=overlong, seed=seed)
            rows = 0
            for chunk in (tokens[:cut], tokens[cut:]) if 0 < cut < n else (tokens,):
                for plan_i, *_ in sp.push(chunk):
                    rows += plan_i.num_sequences
            for plan_i, *_ in sp.flush():
                rows += plan_i.num_sequences
        except CLEAN:
            return
        assert sp.examples_seen == n


if __name__ == "__main__":
    main(TestOneInput)
