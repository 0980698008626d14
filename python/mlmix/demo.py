"""``mlmix demo``: the embedded default job, run on data generated or bundled with the package."""

from __future__ import annotations

import argparse

import numpy as np

from .ragged import Ragged


def main(args: argparse.Namespace) -> int:
    rng = np.random.default_rng(args.seed)
    lengths = rng.integers(64, 3000, size=10_000)
    tokens = Ragged.from_lengths(rng.integers(0, 151_643, size=int(lengths.sum()), dtype=np.uint32), lengths)
    print(f"generated {len(tokens):,} examples, {int(tokens.lengths.sum()):,} tokens")
    return 0
