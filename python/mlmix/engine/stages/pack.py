"""Stage ``pack``: the selected examples packed into ``seq_len`` rows and written as a store.

The plan is made from the selected lengths alone: consecutive groups of examples (:func:`groups`) are
planned on their own (:func:`plan_group`, in parallel) and joined (:func:`concat`); the rows are cut into shards of
``pack.shard_sequences`` rows (:func:`shards`), and each shard's files are written from the tokens of
only the examples it holds (:func:`write_shard`), then the index arrays and the one manifest
(:func:`write_index`). The local executor writes the shards one after another (or on several cores),
the Ray executor in one task per shard; the bytes are those of :func:`mlmix.write_store` over the same
examples either way.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from ...cache import stage_key
from ..log import rate

VERSION = 3


def key(k_mix: str, k_tok: str, pcfg: Mapping, seed) -> str:
    return stage_key("pack", VERSION, k_mix, k_tok, pcfg, seed)


def policy(pcfg: Mapping, lengths: np.ndarray) -> tuple[str, int]:
    """(overlong policy in effect, number of overlong examples); an error if there are none to pack or
    overlong examples meet the policy "error"."""
    seq_len, strategy, pol = pcfg["seq_len"], pcfg["strategy"], pcfg["overlong"]
    if len(lengths) == 0:
        raise ValueError("pack: no examples are left to pack (check the mixture and dedup statistics)")
    n_over = int((lengths > seq_len).sum())
    if strategy == "bfd_split":
        pol = "split"
    elif n_over and pol == "error" and strategy != "wrapped":
        raise ValueError(
            f"{n_over} example(s) are longer than pack.seq_len = {seq_len} (longest {int(lengths.max())} tokens); "
            "set pack.overlong to 'truncate', 'split' or 'drop', or raise pack.seq_len")
    return pol, n_over


# selected tokens planned together: the examples, in uid order, are cut into consecutive groups of about this
# many tokens, each planned on its own (in parallel), and the groups' rows follow one another. A group of
# 2**28 tokens is ~131k rows of 2048: packing it alone leaves at most a row's slack more than one plan over
# everything (tests/test_pack_groups.py measures the difference)
GROUP_TOKENS = 1 << 28


def groups(lengths: np.ndarray) -> np.ndarray:
    """Bounds ``[0, b1, ..., n]`` of the example groups planned together (group g: examples [b[g], b[g+1]))."""
    n = len(lengths)
    csum = np.cumsum(np.asarray(lengths, dtype=np.int64))
    total = int(csum[-1]) if n else 0
    cuts = np.searchsorted(csum, np.arange(GROUP_TOKENS, total, GROUP_TOKENS, dtype=np.int64), side="left") + 1
    return np.unique(np.concatenate([[0], cuts[cuts < n], [n]])).astype(np.int64)


def group_seed(seed, g: int):
    """Group g's planning seed: the build's seed for the first group (so a build of one group packs as
    ``write_store`` does), a keyed hash of (seed, g) for the others; None stays None (input order)."""
    if seed is None or g == 0:
        return seed
    import hashlib

    return int.from_bytes(hashlib.blake2b(f"{int(seed)}:{g}".encode(), digest_size=8, person=b"mlmix-pk").digest(),
                          "little")


def plan_group(pcfg: Mapping, lengths: np.ndarray, pol: str, seed, g: int):
    """The plan of one group of examples (a :class:`mlmix.PackPlan`, example indices local to the group)."""
    from ...pack import pack

    return pack(np.asarray(lengths, dtype=np.int64), pcfg["seq_len"], strategy=pcfg["strategy"], overlong=pol,
                seed=group_seed(seed, g))


def concat(plans: Sequence, bounds: np.ndarray):
    """The groups' plans as one: rows and segments end to end, example indices shifted by each group's start."""
    from ...pack import PackPlan

    if len(plans) == 1:
        return plans[0]
    seg_base = np.cumsum([0] + [p.num_segments for p in plans])
    row_base = np.cumsum([0] + [p.num_sequences for p in plans])
    row_offsets = [np.zeros(1, np.int64)] + [p.row_offsets[1:] + seg_base[k] for k, p in enumerate(plans)]
    assignment = [np.where(p.assignment >= 0, p.assignment + row_base[k], p.assignment) for k, p in enumerate(plans)]
    first = plans[0]
    return PackPlan(
        seq_len=first.seq_len, strategy=first.strategy, lengths=np.concatenate([p.lengths for p in plans]),
        seg_example=np.concatenate([p.seg_example + bounds[k] for k, p in enumerate(plans)]),
        seg_start=np.concatenate([p.seg_start for p in plans]), seg_len=np.concatenate([p.seg_len for p in plans]),
        row_offsets=np.concatenate(row_offsets).astype(np.int64),
        assignment=np.concatenate(assignment).astype(first.assignment.dtype),
        num_truncated=sum(p.num_truncated for p in plans), num_split=sum(p.num_split for p in plans),
        num_dropped=sum(p.num_dropped for p in plans), tokens_dropped=sum(p.tokens_dropped for p in plans),
        tokens_packed=sum(p.tokens_packed for p in plans))


def shards(pcfg: Mapping, the_plan) -> tuple[int, np.ndarray, list[np.ndarray]]:
    """(rows per shard, row bounds of the shards, the sorted examples each shard holds)."""
    from ... import store
    from ..._checks import check_shard_sequences

    per = check_shard_sequences(pcfg.get("shard_sequences"), pcfg["seq_len"])
    bounds = np.asarray(store.shard_bounds(the_plan.num_sequences, per), dtype=np.int64)
    seg_row = np.repeat(np.arange(the_plan.num_sequences, dtype=np.int64), np.diff(the_plan.row_offsets))
    seg_shard = np.searchsorted(bounds, seg_row, side="right") - 1
    n = len(bounds) - 1
    pair = np.unique(the_plan.seg_example * n + seg_shard)
    ex, sh = pair // n, pair % n
    cut = np.searchsorted(sh[np.argsort(sh, kind="stable")], np.arange(n + 1))
    ordered = ex[np.argsort(sh, kind="stable")]
    return per, bounds, [np.sort(ordered[cut[k]:cut[k + 1]]) for k in range(n)]


def write_shard(directory: str, k: int, the_plan, bounds: np.ndarray, examples: np.ndarray, rows: np.ndarray,
                values: np.ndarray, offsets: np.ndarray, mask_values: np.ndarray | None) -> dict:
    """Shard ``k``'s files; returns its specs. ``examples`` are the shard's example indices (sorted, as
    :func:`shards` gives them) and ``rows`` where each one's tokens are in ``values``/``offsets``: a
    task that was handed only the shard's examples passes ``arange``, one that maps every example's
    tokens passes their positions (``values`` may be memory-mapped: it is read one block of rows at a
    time)."""
    from ... import store

    sub = the_plan.rows(int(bounds[k]), int(bounds[k + 1]))
    sub.seg_example = np.asarray(rows, dtype=np.int64)[np.searchsorted(examples, sub.seg_example)]
    return store.write_shard(directory, k, len(bounds) - 1, sub, values, offsets, mask_values)


def write_index(directory: str, cfg: Mapping, the_plan, specs: Sequence[dict], langs: Sequence[str], pad_id: int,
                per_shard: int, vocab: Mapping | None, pol: str, n_over: int) -> dict:
    """The index arrays and the manifest; returns the stage statistics."""
    from ... import store

    pcfg = cfg["pack"]
    manifest = store.write_index(directory, the_plan, list(specs), strategy=pcfg["strategy"], langs=list(langs),
                                 pad_id=pad_id, seed=cfg["seed"], shard_sequences=per_shard, tokenizer=vocab)
    counts = manifest["counts"]
    return {"sequences": manifest["num_sequences"], "seq_len": pcfg["seq_len"], "strategy": pcfg["strategy"],
            "overlong_policy": pol, "examples": manifest["num_examples"], "tokens": manifest["num_tokens"],
            "efficiency": manifest["efficiency"], "lower_bound_sequences": manifest["lower_bound_sequences"],
            "overlong": n_over, "truncated": counts["truncated"], "split": counts["split"],
            "dropped": counts["dropped"], "tokens_dropped": counts["tokens_dropped"], "shards": len(specs)}


def summary(s: Mapping) -> str:
    """The pack line. With ``task_seconds`` (shards written in separate tasks), the rate is over the time
    spent inside those tasks, summed: what one core writes; the stage's wall time (shown after the line)
    is then mostly the executor's fixed cost per step, so tokens over it is no packing rate."""
    extra = "".join(f", {s[k]:,} {k}" for k in ("truncated", "split", "dropped") if s.get(k))
    line = (f"{s['examples']:,} examples -> {s['sequences']:,} sequences of {s['seq_len']:,} "
            f"({s['efficiency']:.2%} full; lower bound {s['lower_bound_sequences']:,}){extra}")
    if "task_seconds" not in s:
        return line + rate(s["tokens"], s.get("seconds") or 0.0, "tok")
    n = s.get("shards", 1)
    sec = s["task_seconds"]
    spent = f"{sec:.1f}s" if sec >= 1 else f"{sec * 1000:.1f} ms"
    return (line + f"; written by {n:,} shard task" + ("s" if n != 1 else "") + f" in {spent} of task time"
            + rate(s["tokens"], sec, "tok"))
