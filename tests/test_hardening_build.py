"""Crash safety of ``mlmix build``: SIGKILL the command at random moments of every stage.

A chain of runs of the real command line (``python -m mlmix build CONFIG``) is killed with SIGKILL
after a uniformly random delay in [0, bound], bound adapted so that about two runs in three are
killed (runs that finish first are not counted as kills); after each kill the state on
disk is checked:

- the output directory, if present, is complete: its store opens with checksums verified and its
  files are byte-identical to an uninterrupted build's (or, in the "replacing" scenario, to the older
  output the build was replacing);
- no temporary sibling of the output opens as a different store;
- every stage-cache entry under its final name verifies (the cache discards nothing);

then, half of the time (always if it finished before the kill), the build is rerun to completion, which must give byte-identical output;
otherwise the next kill lands on the state this one left (chained crashes). After a completed run
the state is reset: output removed, cache kept, partly removed or removed, or an older output put in
place to be replaced.

The normal suite makes ``MLMIX_HARDEN_BUILD_KILLS`` (default 12) kills; the documented run 1,000
(``MLMIX_HARDEN_VERBOSE=1`` prints the tally).
"""

from __future__ import annotations

import collections
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

import mlmix
from mlmix.cache import StageCache
from mlmix.store import StoreError
from pipeline_data import base_config, parallel_rows, train_tiny_bpe, write_jsonl

KILLS = int(os.environ.get("MLMIX_HARDEN_BUILD_KILLS", "12"))
VERBOSE = os.environ.get("MLMIX_HARDEN_VERBOSE") == "1"
REPORT = os.environ.get("MLMIX_HARDEN_BUILD_REPORT")  # a JSON file: the tally, rewritten after every run
STAGES = ("read", "langid", "tokenize", "dedup", "mix")
OUTPUT_FILES = ("langs.json", "lengths.npy", "tokenizer.json", "mixture.json")


def _store_only(files: dict[str, bytes]) -> dict[str, bytes]:
    return {k: v for k, v in files.items() if k.startswith("store/")}


def _output_bytes(out: str, store_only: bool = False) -> dict[str, bytes]:
    """The build's deterministic output: every store file and the other data files (build.json holds
    timings, so only its key is compared)."""
    res = {}
    store = os.path.join(out, "store")
    for name in sorted(os.listdir(store)):
        with open(os.path.join(store, name), "rb") as f:
            res[f"store/{name}"] = f.read()
    if store_only:
        return res
    for name in OUTPUT_FILES:
        p = os.path.join(out, name)
        if os.path.exists(p):
            with open(p, "rb") as f:
                res[name] = f.read()
    with open(os.path.join(out, "build.json"), encoding="utf-8") as f:
        res["build.json:key"] = json.load(f)["key"].encode()
    return res


def _complete(out: str, expected: list[dict]) -> int:
    """Index in ``expected`` of the complete output found at ``out``; fails if it is anything else."""
    mlmix.open(os.path.join(out, "store"), verify=True)  # raises on a partial or corrupt store
    got = _output_bytes(out)
    for i, e in enumerate(expected):
        if got == e:
            return i
    raise AssertionError(f"{out} opens but matches no complete output")


class _Campaign:
    def __init__(self, root: str) -> None:
        self.root = root
        tok = train_tiny_bpe(os.path.join(root, "tokenizer.json"))
        rows = parallel_rows()
        rows.append(dict(rows[0], id="dup-exact"))
        data = write_jsonl(os.path.join(root, "data.jsonl"), rows)
        self.cfg = base_config(os.path.join(root, "run"), tok, data, seed=3)
        self.out = self.cfg["output"]
        self.cache_root = self.out + ".cache"
        self.cfg_path = os.path.join(root, "build.json")
        with open(self.cfg_path, "w") as f:
            json.dump(self.cfg, f)
        self.env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
        # the uninterrupted build (timed as a cold command-line run) and an older output to replace
        t0 = time.perf_counter()
        self._cli(None)
        self.cold = time.perf_counter() - t0
        self.clean = _output_bytes(self.out)
        old_cfg = dict(self.cfg, output=os.path.join(root, "old", "out"), seed=4, pack={"seq_len": 512})
        mlmix.build(old_cfg, quiet=True)
        self.old_dir = old_cfg["output"]
        self.old = _output_bytes(self.old_dir)
        assert self.old != self.clean
        self.tally: collections.Counter = collections.Counter()
        self.replacing = False

    def _cli(self, delay: float | None) -> int:
        proc = subprocess.Popen([sys.executable, "-m", "mlmix", "build", self.cfg_path, "--quiet"], env=self.env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        if delay is None:
            _, err = proc.communicate(timeout=300)
            assert proc.returncode == 0, err.decode()[-2000:]
            return 0
        try:
            proc.wait(timeout=delay)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGKILL)
        _, err = proc.communicate(timeout=300)
        assert proc.returncode in (0, -signal.SIGKILL), err.decode()[-2000:]
        return proc.returncode

    def _stage_reached(self) -> str:
        for stage in STAGES:
            base = os.path.join(self.cache_root, stage)
            if not os.path.isdir(base) or not any(not e.startswith(".") for e in os.listdir(base)):
                return stage
        return "pack"

    def reset(self, rng: np.random.Generator) -> None:
        shutil.rmtree(self.out, ignore_errors=True)
        what = rng.choice(["keep cache", "drop some stages", "cold", "replace old output"])
        if what == "drop some stages":
            for stage in STAGES[int(rng.integers(0, len(STAGES))):]:
                shutil.rmtree(os.path.join(self.cache_root, stage), ignore_errors=True)
        elif what == "cold":
            shutil.rmtree(self.cache_root, ignore_errors=True)
        self.replacing = what == "replace old output"
        if self.replacing:
            shutil.copytree(self.old_dir, self.out)
        self.tally[f"reset: {what}"] += 1

    def check_state(self) -> str:
        """Assert the on-disk invariants after a kill; returns what is under the output's name."""
        expected = [self.clean, self.old] if self.replacing else [self.clean]
        if os.path.exists(self.out):
            found = "complete new output" if _complete(self.out, expected) == 0 else "complete old output"
        else:
            found = "no output"
        parent, base = os.path.dirname(self.out), os.path.basename(self.out)
        for name in os.listdir(parent):
            if name.startswith(f".{base}.") and os.path.isdir(os.path.join(parent, name)):
                self.tally["temp sibling of the output left"] += 1
                try:
                    mlmix.open(os.path.join(parent, name, "store"), verify=True)
                except (StoreError, OSError, ValueError):
                    continue
                # the output's temp dir of a killed build: its store is written (atomically) before the
                # other files, so it may open; then it must be a whole store, byte for byte
                self.tally["temp sibling of the output holding a complete store"] += 1
                got = _store_only(_output_bytes(os.path.join(parent, name), store_only=True))
                assert got in (_store_only(self.clean), _store_only(self.old)), name
        cache = StageCache(self.cache_root)
        for stage in STAGES:
            base_dir = os.path.join(self.cache_root, stage)
            if not os.path.isdir(base_dir):
                continue
            for entry in os.listdir(base_dir):
                if entry.startswith("."):
                    self.tally["temp dir in the cache left"] += 1
                    continue
                assert cache.load(stage, entry) is not None, f"cache entry {stage}/{entry} is partial"
        assert cache.discarded == []
        return found

    def run(self, kills: int, seed: int) -> None:
        rng = np.random.default_rng(seed)
        self.reset(rng)
        # the kill delay is uniform in [0, bound]; bound shrinks when a run finishes first and grows when
        # it is killed, so that about two runs in three are killed, at moments spread over whole runs
        # (a cold build takes several times a warm one, and the machine's load varies)
        bound = 1.1 * self.cold
        while self.tally["kills"] < kills:
            rc = self._cli(float(rng.uniform(0, bound)))
            found = self.check_state()
            if rc == 0:
                self.tally["runs that finished before the kill"] += 1
                assert found == "complete new output"
                bound = max(0.2, bound * 0.9)
            else:
                # the first stage without a cache entry is the one the build was in (or had not reached)
                stage = self._stage_reached() if found != "complete new output" else "after the output's rename"
                self.tally[f"killed in (or before) {stage}: {found}"] += 1
                self.tally["kills"] += 1
                bound = min(2.0 * self.cold, bound * 1.05)
            if REPORT:  # the tally so far, after every run (a long campaign can be stopped at any time)
                with open(REPORT, "w") as f:
                    json.dump(dict(sorted(self.tally.items())), f, indent=1)
            if rc == 0 or rng.random() < 0.5:  # rerun to the end: byte-identical output
                summary = mlmix.build(self.cfg_path, quiet=True)  # the same config file: its folder is the base of fallback ids
                assert summary["cache_discarded"] == []
                assert _output_bytes(self.out) == self.clean
                self.tally["reruns, byte-identical"] += 1
                self.replacing = False
                self.reset(rng)
            else:
                self.tally["chained: next kill on this state"] += 1


def test_sigkill_mlmix_build_at_random_moments(tmp_path):
    campaign = _Campaign(str(tmp_path))
    t0 = time.perf_counter()
    campaign.run(KILLS, seed=int(os.environ.get("MLMIX_HARDEN_BUILD_SEED", KILLS)))
    if VERBOSE:
        seed = os.environ.get("MLMIX_HARDEN_BUILD_SEED", "")
        print(f"\ncold build {campaign.cold:.2f} s; {KILLS} kills in {time.perf_counter() - t0:.0f} s (seed {seed!r})")
        for k, v in sorted(campaign.tally.items()):
            print(f"  {k}: {v}")
    assert campaign.tally["kills"] == KILLS


_KILL_BEFORE_MODES = """
import os, signal, sys
import mlmix._atomic
from mlmix.cli import main
# SIGKILL where the build gives its files their usual modes (before the output's rename)
mlmix._atomic.relax_modes = lambda root: os.kill(os.getpid(), signal.SIGKILL)
sys.exit(main(["build", sys.argv[1], "--quiet"]))
"""


def test_killed_while_setting_modes_output_gets_the_usual_modes(tmp_path):
    tok = train_tiny_bpe(str(tmp_path / "tokenizer.json"))
    data = write_jsonl(str(tmp_path / "data.jsonl"), parallel_rows(2))
    cfg = base_config(str(tmp_path / "run"), tok, data, dedup={"near": False})
    cfg_path = str(tmp_path / "build.json")
    with open(cfg_path, "w") as f:
        json.dump(cfg, f)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    proc = subprocess.run([sys.executable, "-c", _KILL_BEFORE_MODES, cfg_path], env=env, capture_output=True,
                          timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    mlmix.build(cfg, quiet=True)  # the rerun: finds the complete output (same key)
    umask = os.umask(0)
    os.umask(umask)
    store = os.path.join(cfg["output"], "store")
    assert os.stat(cfg["output"]).st_mode & 0o777 == 0o777 & ~umask
    assert os.stat(os.path.join(store, "manifest.json")).st_mode & 0o777 == 0o666 & ~umask
