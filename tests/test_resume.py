"""Resume equivalence of mlmix.torch.data over randomized configurations.

Each configuration trains (iterates) two epochs of a dataset through ``mlmix.torch.DataLoader`` on
every rank of a simulated world (one loader per rank in this process, iterated in lock step), stops
at one or more checkpoints, and resumes each time in fresh loaders, possibly with another number of
workers or ranks. What the ranks yield, step by step, must be the next rows of the epoch's global
order, and the hash of every token yielded must equal the hash of an uninterrupted run.

The normal suite runs a small slice; ``MLMIX_RESUME_CONFIGS=N`` runs N configurations instead
(``MLMIX_RESUME_REPORT=path`` writes a JSON tally of what was covered).
"""

from __future__ import annotations

import collections
import hashlib
import json
import os

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import mlmix  # noqa: E402
from mlmix.torch.data import DataLoader, PackedDataset, PackedIterableDataset  # noqa: E402

# 4 workers per loader on a 2-core machine is the point of some configurations
pytestmark = [pytest.mark.filterwarnings("ignore:This DataLoader will create:UserWarning"),
              # some random worlds have more ranks than rows on purpose: each rank then makes 0 steps
              pytest.mark.filterwarnings("ignore:the store at .* every rank gets 0 batches:UserWarning")]

SEQ_LEN = 32
EPOCHS = 2
FULL = int(os.environ.get("MLMIX_RESUME_CONFIGS", "0"))
WHERE = ("first", "fewer_than_workers", "mid", "last")


def _make_config(i: int, ci: bool) -> dict:
    """Configuration number ``i``: a pure function of (i, ci)."""
    rng = np.random.default_rng([1234, i])
    n_phases = int(rng.integers(2, 5))  # 1 to 3 checkpoints, chained
    if ci:  # worker processes cost ~0.1 s each to start: keep them rare in the normal suite
        workers_choice, world_choice = (0, 0, 0, 0, 1), (1, 2, 2, 4)
    else:
        workers_choice, world_choice = (0, 1, 4), (1, 2, 4)
    phases = [{"world": int(rng.choice(world_choice)), "workers": int(rng.choice(workers_choice))}]
    for _ in range(n_phases - 1):
        prev = phases[-1]
        change = rng.choice(["same", "workers", "world", "both"])
        world = int(rng.choice(world_choice)) if change in ("world", "both") else prev["world"]
        workers = int(rng.choice(workers_choice)) if change in ("workers", "both") else prev["workers"]
        phases.append({"world": world, "workers": workers})
    return {
        "index": i,
        "kind": "stream" if rng.random() < 0.25 else "store",
        "seed": int(rng.integers(0, 2**31)),
        "examples": int(rng.integers(20, 160)),
        "batch_size": int(rng.integers(1, 6)),
        "drop_last": bool(rng.random() < 0.3),
        "shuffle": bool(rng.random() < 0.85),
        "persistent": bool(rng.random() < 0.2),
        "phases": phases,
        "where": [str(rng.choice(WHERE)) for _ in range(n_phases - 1)],
        "rng": int(rng.integers(0, 2**31)),
    }


def _ci_configs() -> list[dict]:
    configs = [_make_config(i, ci=True) for i in range(14)]
    # the worker-count cases that must stay in the normal suite, pinned (few: each worker is a process)
    pinned = [
        ([{"world": 1, "workers": 4}, {"world": 1, "workers": 0}], ["fewer_than_workers"], "store"),
        ([{"world": 2, "workers": 1}, {"world": 1, "workers": 4}, {"world": 4, "workers": 0}], ["mid", "last"], "store"),
        ([{"world": 1, "workers": 0}, {"world": 2, "workers": 1}], ["first"], "stream"),
    ]
    for k, (phases, where, kind) in enumerate(pinned):
        c = _make_config(1000 + k, ci=True)
        c.update(phases=phases, where=where, kind=kind)
        configs.append(c)
    return configs


CONFIGS = [_make_config(i, ci=False) for i in range(FULL)] if FULL else _ci_configs()


# --- data -------------------------------------------------------------------------------------------------
def _data(cfg: dict, tmp_path):
    rng = np.random.default_rng(cfg["seed"])
    lens = rng.integers(2, 30, cfg["examples"])
    toks = mlmix.Ragged.from_lengths(rng.integers(0, 50_000, int(lens.sum())).astype(np.uint32), lens)
    mask = mlmix.Ragged.from_lengths(rng.random(int(lens.sum())) < 0.8, lens)
    if cfg["kind"] == "store":
        path = str(tmp_path / f"store{cfg['index']}")
        mlmix.write_store(path, toks, seq_len=SEQ_LEN, loss_mask=mask)

        def make(rank: int, world: int, batch_size: int, drop_last: bool):
            return PackedDataset(path, batch_size=batch_size, seed=cfg["seed"], shuffle=cfg["shuffle"],
                                 rank=rank, world_size=world, drop_last=drop_last, verify=False)
    else:
        # a few chunks and a small window, so that the stream has several windows per epoch
        cuts = np.sort(rng.choice(np.arange(1, len(toks)), size=min(3, len(toks) - 1), replace=False))
        bounds = [0, *cuts.tolist(), len(toks)]
        chunks = [(toks[a:b], mask[a:b]) for a, b in zip(bounds[:-1], bounds[1:]) if b > a]

        def make(rank: int, world: int, batch_size: int, drop_last: bool):
            return PackedIterableDataset(chunks, seq_len=SEQ_LEN, batch_size=batch_size, seed=cfg["seed"],
                                         shuffle=cfg["shuffle"], window=24, rank=rank, world_size=world,
                                         drop_last=drop_last)
    return make


def _row_keys(batch) -> list[bytes]:
    ids, labels = batch["input_ids"].numpy(), batch["labels"].numpy()
    return [ids[r].tobytes() + labels[r].tobytes() for r in range(ids.shape[0])]


def _reference_order(make) -> list[list[bytes]]:
    """Per epoch, every row of the global order (one rank, one row per step, no worker, nothing dropped)."""
    ds = make(0, 1, 1, False)
    out = []
    for _ in range(EPOCHS):
        out.append([k for b in ds for k in _row_keys(b)])
        assert len(set(out[-1])) == len(out[-1]), "rows must be distinguishable by content"
    return out


def _kept(n: int, start: int, batch_size: int, world: int, drop_last: bool) -> int:
    """Position at the end of the epoch for a pass from ``start``: the documented tail rule (a last step
    shorter than batch_size x world is dropped with drop_last, or if it has fewer rows than ranks)."""
    g = batch_size * world
    tail = (n - start) % g
    return n - tail if tail and (drop_last or tail < world) else n


# --- one run ----------------------------------------------------------------------------------------------
class _Run:
    """Iterates the ranks' loaders in lock step and checks each step against the global order."""

    def __init__(self, cfg: dict, make, order: list[list[bytes]]) -> None:
        self.cfg, self.make, self.order = cfg, make, order
        self.pos = [{k: i for i, k in enumerate(o)} for o in order]
        self.streams: list[list[int]] = [[] for _ in range(EPOCHS)]
        self.hash = hashlib.sha256()
        self.steps = 0

    def phase(self, world: int, workers: int, state: dict | None, stop_after: int | None) -> dict | None:
        cfg = self.cfg
        kwargs = {"num_workers": workers}
        if workers:
            kwargs["persistent_workers"] = cfg["persistent"]
        loaders = [DataLoader(self.make(r, world, cfg["batch_size"], cfg["drop_last"]), **kwargs)
                   for r in range(world)]
        if state is not None:
            for loader in loaders:
                loader.load_state_dict(json.loads(json.dumps(state)))  # a checkpoint is JSON
        done = 0
        while loaders[0].dataset.epoch < EPOCHS:
            epoch = loaders[0].dataset.epoch
            assert all(ld.dataset.epoch == epoch for ld in loaders)
            its = [iter(ld) for ld in loaders]
            while True:
                batches = []
                for it in its:
                    batches.append(next(it, None))
                if all(b is None for b in batches):
                    break
                assert all(b is not None for b in batches), f"ranks made different numbers of steps: {batches}"
                positions = sorted(self.pos[epoch][k] for b in batches for k in _row_keys(b))
                stream = self.streams[epoch]
                lo = len(stream)
                # the step is exactly the next rows of the global order, shared by the ranks
                assert positions == list(range(lo, lo + len(positions))), (epoch, lo, positions)
                stream.extend(positions)
                for p in positions:
                    self.hash.update(self.order[epoch][p])
                self.steps += 1
                done += 1
                if done == stop_after:
                    states = [ld.state_dict() for ld in loaders]
                    assert all(s == states[0] for s in states), "ranks disagree on the position"
                    assert states[0]["epoch"] == epoch and states[0]["samples_consumed"] == len(stream)
                    del its
                    return states[0]
        return None


def _steps_left(n: int, start: int, batch_size: int, world: int, drop_last: bool) -> int:
    g = batch_size * world
    full, tail = divmod(n - start, g)
    return full + (1 if tail and not drop_last and tail >= world else 0)


def _resumed(cfg: dict, make, order) -> tuple[_Run, list[str], list[int]]:
    """The run with checkpoints; returns it, where each checkpoint fell, and each epoch's end position."""
    rng = np.random.default_rng(cfg["rng"])
    run = _Run(cfg, make, order)
    state = None
    epoch, start = 0, 0
    ends = [None] * EPOCHS
    where_done = []
    phases = cfg["phases"]
    for i, ph in enumerate(phases):
        last = i == len(phases) - 1
        n = len(order[epoch]) if epoch < EPOCHS else 0
        stop = None
        if not last and epoch < EPOCHS:
            left = _steps_left(n, start, cfg["batch_size"], ph["world"], cfg["drop_last"])
            later = sum(_steps_left(len(o), 0, cfg["batch_size"], ph["world"], cfg["drop_last"])
                        for o in order[epoch + 1:])
            where = cfg["where"][i]
            if where == "first":
                stop = 1
            elif where == "fewer_than_workers":
                stop = int(rng.integers(1, max(ph["workers"], 2)))
            elif where == "mid":
                stop = int(rng.integers(1, max(left + later, 2)))
            else:  # the last batch of the current epoch (or of the next if this one has no step left)
                stop = left if left else left + _steps_left(len(order[min(epoch + 1, EPOCHS - 1)]), 0,
                                                            cfg["batch_size"], ph["world"], cfg["drop_last"])
            stop = max(1, min(stop, left + later)) if left + later else None
            where_done.append(where)
        before = [len(s) for s in run.streams]
        state = run.phase(ph["world"], ph["workers"], state, stop)
        # the end of every epoch this phase finished follows the tail rule of this phase's shape
        new_epoch = state["epoch"] if state is not None else EPOCHS
        for e in range(epoch, min(new_epoch, EPOCHS)):
            s0 = start if e == epoch else 0
            assert before[e] == s0
            ends[e] = _kept(len(order[e]), s0, cfg["batch_size"], ph["world"], cfg["drop_last"])
        if state is None:
            break
        epoch, start = state["epoch"], state["samples_consumed"]
    return run, where_done, ends


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: f"c{c['index']}")
def test_resume_equivalence(cfg, tmp_path):
    make = _data(cfg, tmp_path)
    order = _reference_order(make)
    first = cfg["phases"][0]
    straight = _Run(cfg, make, order)
    assert straight.phase(first["world"], first["workers"], None, None) is None
    for e in range(EPOCHS):  # the uninterrupted run: the whole global order, less the tail rule's rows
        assert len(straight.streams[e]) == _kept(len(order[e]), 0, cfg["batch_size"], first["world"], cfg["drop_last"])

    run, where_done, ends = _resumed(cfg, make, order)
    for e in range(EPOCHS):
        assert len(run.streams[e]) == ends[e], f"epoch {e}: rows {len(run.streams[e])}, expected {ends[e]}"
    same_tails = all(len(run.streams[e]) == len(straight.streams[e]) for e in range(EPOCHS))
    if same_tails:
        assert run.hash.hexdigest() == straight.hash.hexdigest()
    _tally(cfg, where_done, same_tails, run, straight)


_TALLY: collections.Counter = collections.Counter()


def _tally(cfg, where_done, same_tails, run, straight) -> None:
    report = os.environ.get("MLMIX_RESUME_REPORT")
    if not report:
        return
    t = _TALLY
    t["configs"] += 1
    t[f"kind={cfg['kind']}"] += 1
    t["checkpoints"] += len(where_done)
    t[f"chain_len={len(where_done)}"] += 1
    for w in where_done:
        t[f"where={w}"] += 1
    for ph in cfg["phases"]:
        t[f"phase_world={ph['world']}"] += 1
        t[f"phase_workers={ph['workers']}"] += 1
    for a, b in zip(cfg["phases"], cfg["phases"][1:]):
        t["resume_other_world"] += a["world"] != b["world"]
        t["resume_other_workers"] += a["workers"] != b["workers"]
    t["hash_equal_to_uninterrupted"] += same_tails
    t["elastic_tail_differs (rule-checked)"] += not same_tails
    t["steps"] += run.steps
    t["rows"] += sum(len(s) for s in run.streams)
    with open(report, "w") as f:
        json.dump(dict(sorted(t.items())), f, indent=1)


@pytest.mark.parametrize("workers", [0, 1])
def test_state_after_a_short_last_step_counts_the_rows_yielded(workers):
    # regression: the loader counted batches x (batch_size x world_size), which overshot the epoch's
    # rows after a short last step of the on-the-fly dataset (whose length it cannot know)
    rng = np.random.default_rng(5)
    lens = rng.integers(2, 30, 61)
    toks = mlmix.Ragged.from_lengths(rng.integers(0, 1000, int(lens.sum())).astype(np.uint32), lens)
    ds = PackedIterableDataset([toks], seq_len=SEQ_LEN, batch_size=4, seed=2, window=16)
    rows = sum(b["input_ids"].shape[0] for b in ds)
    assert rows % 4  # the data has a short last step
    loader = DataLoader(PackedIterableDataset([toks], seq_len=SEQ_LEN, batch_size=4, seed=2, window=16),
                        num_workers=workers)
    seen = 0
    for batch in loader:
        seen += batch["input_ids"].shape[0]
        assert loader.state_dict()["samples_consumed"] == seen
    assert seen == rows and loader.state_dict()["epoch"] == 1
