"""``mlmix demo``: the embedded default job, run on generated data.

Until the end-to-end pipeline lands, it exercises the packing engine and the store: SFT-like tokenized
examples (a prompt whose tokens are masked out of the loss, then a response), in several languages,
packed with best-fit decreasing at seq_len 2048, written as a packed store, reopened and verified.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np

from .ragged import Ragged

SEQ_LEN = 2048
LANGS = ("en", "de", "fr", "es", "zh", "ja", "ar", "hi", "sw", "yo")


def sft_examples(n: int, seed: int) -> tuple[Ragged, Ragged, list[str]]:
    """n chat-like examples: log-normal lengths in [64, seq_len], prompt share 10-60% (masked)."""
    rng = np.random.default_rng(seed)
    lengths = np.clip(rng.lognormal(np.log(450), 0.8, size=n), 64, SEQ_LEN).astype(np.int64)
    total = int(lengths.sum())
    tokens = Ragged.from_lengths(rng.integers(0, 151_643, size=total, dtype=np.uint32), lengths)
    prompt = (lengths * rng.uniform(0.1, 0.6, size=n)).astype(np.int64)
    # mask is 1 from each example's prompt end onwards: position within example >= prompt length
    within = np.arange(total, dtype=np.int64) - np.repeat(tokens.offsets[:-1], lengths)
    mask = Ragged.from_lengths(within >= np.repeat(prompt, lengths), lengths)
    langs = [LANGS[k] for k in rng.integers(0, len(LANGS), size=n)]
    return tokens, mask, langs


def main(args: argparse.Namespace) -> int:
    from .pack import pack
    from .store import open as open_store, write_store

    t0 = time.perf_counter()
    tokens, mask, langs = sft_examples(40_000, args.seed)
    n_tok = int(tokens.lengths.sum())
    t_gen = time.perf_counter()

    plan = pack(tokens, SEQ_LEN, strategy="bfd", seed=args.seed)
    rows = plan.materialize(tokens, mask)
    t_pack = time.perf_counter()

    write_store(args.out, tokens, seq_len=SEQ_LEN, loss_mask=mask, langs=langs, seed=args.seed)
    t_write = time.perf_counter()
    store = open_store(args.out, verify=True)
    first = store[0]
    t_open = time.perf_counter()

    bound = plan.lower_bound
    summary = {
        "examples": len(tokens),
        "tokens": n_tok,
        "seq_len": SEQ_LEN,
        "sequences": len(store),
        "lower_bound_sequences": bound,
        "efficiency": store.efficiency,
        "efficiency_lower_bound": n_tok / (bound * SEQ_LEN),
        "loss_tokens": int((rows["labels"] != -100).sum()),
        "languages": len(store.languages),
        "pack_tokens_per_s": n_tok / (t_pack - t_gen),
        "write_tokens_per_s": n_tok / (t_write - t_pack),
        "open_verify_s": t_open - t_write,
        "store": str(args.out),
        "total_s": t_open - t0,
    }
    if not np.array_equal(first["input_ids"], rows["input_ids"][0]):
        raise RuntimeError("store row 0 differs from the packed row 0")
    if getattr(args, "json", False):
        print(json.dumps(summary, indent=2))
        return 0
    print(f"mlmix demo: SFT-like examples packed with BFD at seq_len {SEQ_LEN}, stored at {args.out}")
    table = [
        ("examples", f"{summary['examples']:,}"),
        ("tokens", f"{n_tok:,}"),
        ("loss tokens (after masking)", f"{summary['loss_tokens']:,}"),
        ("languages", f"{summary['languages']}"),
        ("sequences", f"{len(store):,} (lower bound {bound:,})"),
        ("packing efficiency", f"{store.efficiency:.4%} (bound {summary['efficiency_lower_bound']:.4%})"),
        ("plan + materialise", f"{summary['pack_tokens_per_s'] / 1e6:,.1f} M tokens/s"),
        ("write store", f"{summary['write_tokens_per_s'] / 1e6:,.1f} M tokens/s"),
        ("reopen + verify checksums", f"{summary['open_verify_s']:.2f} s"),
        ("total", f"{summary['total_s']:.1f} s"),
    ]
    width = max(len(k) for k, _ in table)
    for k, v in table:
        print(f"  {k:<{width}}  {v}")
    return 0
