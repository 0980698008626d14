"""Two real torch.distributed (gloo) processes read one store: every row exactly once per epoch."""

from __future__ import annotations

import json
import socket

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import mlmix  # noqa: E402

WORLD = 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, path: str, port: int, out: str) -> None:
    import torch.distributed as dist

    from mlmix.torch.data import DataLoader, PackedDataset

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    try:
        ds = PackedDataset(path, batch_size=3, seed=11)  # rank and world size from torch.distributed
        seen = {"rank": ds.rank, "world": ds.world_size, "epochs": []}
        loader = DataLoader(ds, num_workers=1 if rank == 0 else 0)
        for _ in range(2):
            rows, steps = [], 0
            for batch in loader:
                ids = batch["input_ids"].numpy()
                rows.extend(r.tobytes().hex() for r in ids)
                steps += 1
            seen["epochs"].append({"rows": rows, "steps": steps})
        gathered = [None] * WORLD
        dist.all_gather_object(gathered, seen)
        if rank == 0:
            with open(out, "w") as f:
                json.dump(gathered, f)
    finally:
        dist.destroy_process_group()


def test_two_ranks_cover_every_row_once(tmp_path):
    rng = np.random.default_rng(1)
    lens = rng.integers(3, 40, 150)
    toks = mlmix.Ragged.from_lengths(rng.integers(0, 1000, int(lens.sum())).astype(np.uint32), lens)
    path = str(tmp_path / "store")
    mlmix.write_store(path, toks, seq_len=48)
    store = mlmix.open(path)
    n = len(store)
    all_ids = store.batch(np.arange(n))["input_ids"].astype(np.int64)
    row_of = {r.tobytes().hex(): i for i, r in enumerate(all_ids)}
    assert len(row_of) == n  # rows are distinguishable by content
    out = str(tmp_path / "seen.json")
    torch.multiprocessing.spawn(_worker, args=(path, _free_port(), out), nprocs=WORLD, join=True)
    with open(out) as f:
        gathered = json.load(f)
    assert [g["rank"] for g in gathered] == [0, 1] and all(g["world"] == WORLD for g in gathered)
    step_rows = 3 * WORLD
    expect = n if n % step_rows == 0 or n % step_rows >= WORLD else n - n % step_rows
    orders = []
    for epoch in range(2):
        per_rank = [g["epochs"][epoch] for g in gathered]
        assert per_rank[0]["steps"] == per_rank[1]["steps"]  # no rank waits for another in a collective
        rows = [row_of[h] for p in per_rank for h in p["rows"]]
        assert len(rows) == len(set(rows)) == expect  # exactly once across ranks
        orders.append([row_of[h] for h in per_rank[0]["rows"]])
    assert orders[0] != orders[1]  # each epoch reshuffles
