"""The pack stage plans consecutive groups of examples on their own (in parallel: worker processes
locally, tasks on Ray) and joins the plans. One group packs exactly as one global plan (write_store's);
several groups give the same rows on either executor and lose next to nothing in packing efficiency."""

from __future__ import annotations

import numpy as np
import pytest

from mlmix.engine.stages import pack as s_pack
from mlmix.pack import pack

PCFG = {"seq_len": 2048, "strategy": "bfd", "overlong": "truncate"}


def _lengths(n: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.clip(rng.lognormal(6.3, 0.9, n).astype(np.int64), 1, 6000)  # chat-like: median ~550 tokens


def _grouped(lengths: np.ndarray, seed=7):
    gb = s_pack.groups(lengths)
    plans = [s_pack.plan_group(PCFG, lengths[gb[g]:gb[g + 1]], "truncate", seed, g) for g in range(len(gb) - 1)]
    return s_pack.concat(plans, gb), gb


def test_one_group_is_the_global_plan():
    lengths = _lengths(5000)
    plan, gb = _grouped(lengths)
    assert list(gb) == [0, 5000]
    want = pack(lengths, 2048, strategy="bfd", overlong="truncate", seed=7)
    for f in ("seg_example", "seg_start", "seg_len", "row_offsets", "assignment"):
        assert np.array_equal(getattr(plan, f), getattr(want, f)), f


@pytest.mark.parametrize("group_tokens", [1 << 20, 1 << 22])
def test_groups_join_into_one_valid_plan_close_to_the_global_one(monkeypatch, group_tokens):
    monkeypatch.setattr(s_pack, "GROUP_TOKENS", group_tokens)
    lengths = _lengths(40_000, seed=1)
    plan, gb = _grouped(lengths)
    assert len(gb) - 1 == -(-int(lengths.sum()) // group_tokens) > 1
    # every example's tokens exactly once (overlong ones truncated to seq_len), rows within seq_len
    got = np.zeros(len(lengths), np.int64)
    np.add.at(got, plan.seg_example, plan.seg_len)
    assert np.array_equal(got, np.minimum(lengths, 2048))
    assert plan.row_tokens.max() <= 2048 and plan.tokens_packed == int(np.minimum(lengths, 2048).sum())
    assert np.all(plan.assignment[plan.seg_example[plan.seg_start == 0]] >= 0)
    # each group's rows come after the previous group's
    row_of_seg = np.repeat(np.arange(plan.num_sequences), np.diff(plan.row_offsets))
    group_of_seg = np.searchsorted(gb, plan.seg_example, side="right") - 1
    assert np.all(np.diff(group_of_seg[np.argsort(row_of_seg, kind="stable")]) >= 0)
    # each group costs at most about one row of slack against one global plan; with groups of ~2,000 rows or
    # more (4 MiB of tokens; the default group is 2**28 tokens, ~131k rows of 2048) efficiency is within 0.1 point
    whole = pack(lengths, 2048, strategy="bfd", overlong="truncate", seed=7)
    n_groups = len(gb) - 1
    assert whole.num_sequences <= plan.num_sequences <= whole.num_sequences + n_groups
    if group_tokens >= 1 << 22:
        assert whole.efficiency - plan.efficiency < 0.001, (whole.efficiency, plan.efficiency)


def test_group_seeds():
    assert s_pack.group_seed(None, 3) is None and s_pack.group_seed(5, 0) == 5
    seeds = {s_pack.group_seed(5, g) for g in range(1, 100)}
    assert len(seeds) == 99 and all(0 <= x < 2**64 for x in seeds)
