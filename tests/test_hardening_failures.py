"""A failed DataLoader worker or build stage ends the run with a clear error and a non-zero exit within
60 s, never a hang. Each case runs in its own process under a 60 s timeout (a hang fails the test)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import mlmix  # noqa: E402
from pipeline_data import base_config, parallel_rows, train_tiny_bpe, write_jsonl  # noqa: E402

LIMIT_S = 60


def _run(code: str, *args: str) -> tuple[int, str, float]:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code), *args], env=env, capture_output=True,
                          text=True, timeout=LIMIT_S)  # TimeoutExpired = a hang = a failure
    return proc.returncode, proc.stderr, time.perf_counter() - t0


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    rng = np.random.default_rng(0)
    lens = rng.integers(2, 40, 400)
    toks = mlmix.Ragged.from_lengths(rng.integers(0, 1000, int(lens.sum())).astype(np.uint32), lens)
    path = str(tmp_path_factory.mktemp("fail") / "store")
    mlmix.write_store(path, toks, seq_len=64)
    return path


_LOADER = """
import os, signal, sys
import numpy as np
import torch
import mlmix
from mlmix.torch.data import DataLoader, PackedDataset, PackedIterableDataset

case, path = sys.argv[1], sys.argv[2]

def die(how):
    if how == "exit":
        os._exit(3)
    if how == "sigkill":
        os.kill(os.getpid(), signal.SIGKILL)
    if how == "sigsegv":
        os.kill(os.getpid(), signal.SIGSEGV)
    raise RuntimeError("the source failed in worker %d" % torch.utils.data.get_worker_info().id)

how, where, persistent = case.split("-")

class Dying(PackedDataset):
    # worker 1 dies when it builds its third batch
    def _emit(self, builder, src, rows, ring):
        info = torch.utils.data.get_worker_info()
        self._n = getattr(self, "_n", 0) + 1
        if where == "mid" and info is not None and info.id == 1 and self._n == 3:
            die(how)
        return super()._emit(builder, src, rows, ring)

def init(worker_id):
    if where == "init" and worker_id == 1:
        die(how)

ds = Dying(path, batch_size=4, seed=1)
loader = DataLoader(ds, num_workers=2, worker_init_fn=init, persistent_workers=persistent == "persistent")
for epoch in range(3):
    for batch in loader:
        pass
print("finished without noticing the dead worker", file=sys.stderr)
"""


# each case is a process importing torch (seconds on a loaded 2-core machine): the normal suite runs
# two, MLMIX_HARDEN_FAILURES=all every one
_ALL = os.environ.get("MLMIX_HARDEN_FAILURES") == "all"
_LOADER_CASES = (["exit-mid-plain", "sigkill-mid-plain", "sigkill-mid-persistent", "sigsegv-mid-plain",
                  "exit-init-plain", "raise-mid-plain", "raise-init-persistent"] if _ALL
                 else ["exit-mid-plain", "sigkill-mid-persistent"])


@pytest.mark.parametrize("case", _LOADER_CASES)
def test_dead_dataloader_worker_ends_the_run(store, case):
    rc, err, seconds = _run(_LOADER, case, store)
    assert rc != 0, err
    assert seconds < LIMIT_S
    if os.environ.get("MLMIX_HARDEN_VERBOSE") == "1":
        print(f"\n{case}: exit {rc} after {seconds:.1f} s")
    if case.startswith("raise"):
        assert "the source failed in worker 1" in err
    else:
        assert "DataLoader worker (pid" in err and ("exited unexpectedly" in err or "killed by signal" in err), err[-2000:]


def test_dead_worker_of_the_on_the_fly_dataset(store):
    code = """
    import os, signal, sys
    import numpy as np
    import torch
    import mlmix
    from mlmix.torch.data import DataLoader, PackedIterableDataset

    rng = np.random.default_rng(0)
    lens = rng.integers(2, 40, 300)
    toks = mlmix.Ragged.from_lengths(rng.integers(0, 1000, int(lens.sum())).astype(np.uint32), lens)

    def source():  # the user's reader dies half-way in worker 0
        for k in range(0, 300, 50):
            info = torch.utils.data.get_worker_info()
            if k == 150 and info is not None and info.id == 0:
                os.kill(os.getpid(), signal.SIGKILL)
            yield toks[k : k + 50]

    loader = DataLoader(PackedIterableDataset(source, seq_len=64, batch_size=2, window=64), num_workers=2)
    for batch in loader:
        pass
    """
    rc, err, seconds = _run(code)
    assert rc != 0 and "DataLoader worker (pid" in err, err[-2000:]


_BUILD = """
import json, os, signal, sys
import mlmix.engine.local as local
from mlmix.cli import main

stage, how, cfg_path = sys.argv[1], sys.argv[2], sys.argv[3]
real = getattr(local, "run_" + stage)

def failing(*args, **kwargs):
    if how == "raise":
        raise ValueError(f"{stage}: injected failure")
    if how == "oserror":
        raise OSError(28, "No space left on device (injected)")
    os.kill(os.getpid(), signal.SIGKILL)

setattr(local, "run_" + stage, failing)
sys.exit(main(["build", cfg_path, "--quiet"]))
"""


@pytest.fixture(scope="module")
def build_inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("failbuild")
    return train_tiny_bpe(str(root / "tokenizer.json")), write_jsonl(str(root / "data.jsonl"), parallel_rows(2))


# an exception in every stage; a full disk and a hard kill in two of them (normal suite: a few)
_STAGE_FAILURES = ([(s, "raise") for s in ("read", "langid", "tokenize", "dedup", "mix", "pack")]
                   + [(s, h) for s in ("tokenize", "pack") for h in ("oserror", "sigkill")])
if not _ALL:
    _STAGE_FAILURES = [("langid", "raise"), ("tokenize", "oserror"), ("pack", "sigkill")]


@pytest.mark.parametrize("stage, how", _STAGE_FAILURES)
def test_failed_build_stage_exits_non_zero(tmp_path, build_inputs, stage, how):
    cfg = base_config(str(tmp_path / "run"), *build_inputs, dedup={"near": False})  # a cold cache: every stage runs
    path = str(tmp_path / "build.json")
    with open(path, "w") as f:
        json.dump(cfg, f)
    rc, err, seconds = _run(_BUILD, stage, how, path)
    assert seconds < LIMIT_S
    if how == "sigkill":
        assert rc == -9
    else:
        assert rc == 1, err
        assert ("injected failure" in err) if how == "raise" else ("No space left on device" in err), err
    assert not os.path.exists(cfg["output"])  # nothing partial under the output's name
