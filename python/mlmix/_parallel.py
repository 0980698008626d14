"""Threads for the Python side of the kernels: how many cores this process may use, and a function mapped
over items on a few threads with the results in order (for calls that release the GIL)."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator
from typing import Any


def usable_cores() -> int:
    """The cores this process may run on (its affinity, as the C++ kernels count them)."""
    try:
        return len(os.sched_getaffinity(0)) or 1
    except (AttributeError, OSError):  # not Linux
        return os.cpu_count() or 1


def in_order(fn: Callable[[Any], Any], items: Iterable, threads: int, ahead: int | None = None) -> Iterator:
    """``fn`` over ``items`` on ``threads`` threads, yielded in order, with at most ``ahead`` (default: ``threads``)
    calls submitted, running or done, ahead of the one yielded: a larger window keeps the threads busy when
    calls take unequal times, at the cost of holding more results. An exception is raised where its item's result
    would have been yielded; leaving early (or an error) cancels the calls not started and waits for the running
    ones."""
    if threads <= 1:
        for item in items:
            yield fn(item)
        return
    import concurrent.futures as cf
    from collections import deque

    with cf.ThreadPoolExecutor(threads, thread_name_prefix="mlmix") as pool:
        pending: deque = deque()
        try:
            for item in items:
                pending.append(pool.submit(fn, item))
                if len(pending) >= max(threads, ahead or 0):
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()
        finally:
            for f in pending:
                f.cancel()
