"""The pack line of shards written in tasks (the Ray executor): its rate is over the seconds spent inside
the shard tasks, not over the stage's wall time, which is mostly Ray's scheduling and shuffle (a 4,143-token
build read '1.0k tok/s' over 4.1 s)."""

from __future__ import annotations

from mlmix.engine.stages import pack

PACK = {"examples": 64, "sequences": 5, "seq_len": 1024, "efficiency": 0.8092, "lower_bound_sequences": 5,
        "tokens": 4143, "truncated": 0, "split": 0, "dropped": 0, "shards": 1}


def test_rate_is_over_the_shard_tasks_time_not_the_stage_wall_time():
    line = pack.summary(dict(PACK, seconds=4.1, task_seconds=0.0045))
    assert line.startswith(pack.summary(dict(PACK)))  # the single-machine line, without a rate
    assert line.endswith("; written by 1 shard task in 4.5 ms of task time, 920.7k tok/s")
    assert "1.0k tok/s" not in line


def test_several_shards_and_long_tasks():
    line = pack.summary(dict(PACK, tokens=30_000_000, shards=3, seconds=40.0, task_seconds=12.0))
    assert line.endswith("; written by 3 shard tasks in 12.0s of task time, 2.5M tok/s")
