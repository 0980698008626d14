"""``mlmix build``: one config runs read -> langid -> tokenize -> dedup -> mix -> pack (-> store, report).

The stages are defined once, in :mod:`mlmix.engine.stages` (one module each: settings, cache key,
per-block function, combine step, statistics and summary line). Two executors run them without any
stage logic of their own:

- :mod:`mlmix.engine.local`: this machine: chunks of records, on ``workers`` processes, with the stage
  cache (a rerun redoes only the stages downstream of a change);
- :mod:`mlmix.engine.ray`: a Ray cluster: the same functions as Ray Data operations (``--engine ray``).

The same config gives the same output, byte for byte, on either executor and any number of workers
(``build.json`` differs only in its ``engine``). See docs/design.md for the layout.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

from .log import BuildLog
from .stages import STAGES
from .stages.tokenize import encode_records, load_tokenizer, save_tokenizer
from .stages.write import BUILD_FORMAT

__all__ = ["build", "BuildLog", "STAGES", "BUILD_FORMAT", "encode_records", "load_tokenizer", "save_tokenizer"]


def _check_workers(workers) -> int:
    if workers is None:
        return 1
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise ValueError(f"workers must be an integer >= 1 (processes of the local executor), got {workers!r}")
    return workers


def build(config: str | os.PathLike | Mapping, *, engine: str = "local", workers: int | None = None,
          quiet: bool = False, verbose: bool = False, progress: bool | None = None, use_cache: bool = True,
          log: BuildLog | None = None, address: str | None = None, num_cpus: int | None = None,
          concurrency: int | None = None) -> dict:
    """Run the whole build a config describes and return its summary (also written to build.json).

    Args:
        config: a path to a ``.toml``/``.yaml``/``.json`` config, or the same content as a dict
            (see docs/config.md; relative paths in a dict resolve against the current directory).
        engine: ``"local"`` (this machine, with the stage cache) or ``"ray"`` (a Ray cluster; needs
            ``pip install 'mlmix[ray]'``; see docs/ray.md). Same output either way.
        workers: local executor: processes that run the per-block work (default 1: this process).
        quiet, verbose, progress: logging on stderr (progress bars default to "stderr is a terminal").
        use_cache: local executor: reuse cached stage outputs (default); False recomputes every stage
            (and refreshes the cache).
        address, num_cpus, concurrency: Ray executor: the cluster (``host:port``, ``ray://host:port``,
            ``auto``; default ``RAY_ADDRESS``, else a local cluster of ``num_cpus`` CPUs) and the actors
            per pooled stage (default: the cluster's CPUs).

    Returns:
        A dict with ``output``, ``store``, ``engine``, per-stage ``stages`` statistics and ``timings``,
        and the headline figures ``examples``, ``tokens``, ``sequences``, ``efficiency``, ``langs``.
    """
    from .._outputs import check_build_targets
    from ..config import load_config

    if engine not in ("local", "ray"):
        raise ValueError(f"engine must be 'local' or 'ray', got {engine!r}")
    if engine == "local":
        given = [f"{k}={v!r}" for k, v in (("address", address), ("num_cpus", num_cpus), ("concurrency", concurrency))
                 if v is not None]
        if given:
            raise ValueError(f"{', '.join(given)}: only the Ray executor takes these; pass engine='ray' "
                             "(the local executor takes workers=)")
    elif workers is not None:
        raise ValueError(f"workers={workers!r}: only the local executor takes it; the Ray executor's parallelism "
                         "is concurrency= (actors) and the cluster's CPUs")
    workers = _check_workers(workers)
    cfg = load_config(config)
    config_dir = None if isinstance(config, Mapping) else os.path.dirname(os.path.abspath(os.fspath(config)))
    check_build_targets(cfg["output"], cfg["cache_dir"], cfg["sources"], config_dir)
    log = log or BuildLog(quiet=quiet, verbose=verbose, progress=progress)
    if engine == "ray":
        from .ray import run as run_ray

        return run_ray(cfg, log, address=address, num_cpus=num_cpus, concurrency=concurrency)
    from .local import run

    return run(cfg, log, use_cache=use_cache, workers=workers)
