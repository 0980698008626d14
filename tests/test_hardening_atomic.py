"""Stale temporary siblings of killed writers (mlmix._atomic): removed only when their writer is dead."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import numpy as np
import pytest

import mlmix
from mlmix import _atomic


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _sibling(parent, base: str, kind: str, pid: int, host: str | None = None) -> str:
    name = f".{base}.{kind}-{host or _atomic._host_tag()}-{pid}-x1y2"
    path = os.path.join(parent, name)
    os.mkdir(path)
    with open(os.path.join(path, "payload"), "w") as f:
        f.write(kind)
    return path


def _files(path: str) -> dict[str, bytes]:
    out = {}
    for n in sorted(os.listdir(path)):
        with open(os.path.join(path, n), "rb") as f:
            out[n] = f.read()
    return out


def _write(path: str, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    lens = rng.integers(2, 20, 30)
    toks = mlmix.Ragged.from_lengths(rng.integers(0, 100, int(lens.sum())).astype(np.uint32), lens)
    mlmix.write_store(path, toks, seq_len=32)


def test_killed_writer_leaves_a_temp_dir_that_the_next_write_removes(tmp_path):
    path = str(tmp_path / "s")
    # a writer SIGKILLed inside atomic_directory, after writing part of its output
    code = ("import os, signal, sys\nfrom mlmix._atomic import atomic_directory\n"
            "with atomic_directory(sys.argv[1], kind='store') as tmp:\n"
            "    open(os.path.join(tmp, 'half'), 'w').write('x')\n"
            "    os.kill(os.getpid(), signal.SIGKILL)\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    proc = subprocess.Popen([sys.executable, "-c", code, path], env=env, stderr=subprocess.PIPE)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL, err
    left = [n for n in os.listdir(tmp_path) if n.startswith(".s.tmp-")]
    assert len(left) == 1 and f"-{proc.pid}-" in left[0] and not os.path.exists(path)
    _write(path)
    assert os.listdir(tmp_path) == ["s"]
    assert len(mlmix.open(path)) > 0


def test_siblings_of_live_writers_other_hosts_and_odd_names_are_kept(tmp_path):
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        dead = _dead_pid()
        keep = [
            _sibling(tmp_path, "s", "tmp", live.pid),  # a writer still running
            _sibling(tmp_path, "s", "tmp", dead, host="0badf00d"),  # written by another host (shared FS)
            _sibling(tmp_path, "t", "tmp", dead),  # the temp dir of another name
            _sibling(tmp_path, "s", "tmp", os.getpid()),  # this process's own
        ]
        odd = tmp_path / ".s.tmp-notapid"
        odd.mkdir()
        gone = [_sibling(tmp_path, "s", "tmp", dead), _sibling(tmp_path, "s", "old", dead)]
        _write(str(tmp_path / "s"))
        for p in keep + [str(odd)]:
            assert os.path.isdir(p), p
        for p in gone:
            assert not os.path.exists(p), p
    finally:
        live.kill()
        live.wait()


def test_old_dir_of_a_writer_killed_mid_swap_is_put_back(tmp_path):
    # the writer renamed the store aside and died before renaming the new one in: nothing under "s"
    path = str(tmp_path / "s")
    _write(path, seed=1)
    before = _files(path)
    dead = _dead_pid()
    old = os.path.join(tmp_path, f".s.old-{_atomic._host_tag()}-{dead}-abcd")
    os.rename(path, old)
    half = _sibling(tmp_path, "s", "tmp", dead)
    assert sorted(_atomic.clean_stale(path)) == sorted([old, half])
    assert _files(path) == before
    assert os.listdir(tmp_path) == ["s"]
    # and a write that refuses to overwrite sees the restored store
    os.rename(path, old)
    with pytest.raises(FileExistsError):
        with _atomic.atomic_directory(path, kind="store", overwrite=False):
            pass
    assert len(mlmix.open(path)) > 0


def test_two_old_dirs_and_nothing_in_place_are_left_for_a_human(tmp_path):
    dead = _dead_pid()
    olds = [_sibling(tmp_path, "s", "old", dead), _sibling(tmp_path, "s", "old", _dead_pid())]
    tmp = _sibling(tmp_path, "s", "tmp", dead)
    assert _atomic.clean_stale(str(tmp_path / "s")) == [tmp]
    assert all(os.path.isdir(p) for p in olds) and not os.path.exists(tmp_path / "s")


def test_atomic_file_removes_stale_temp_files(tmp_path):
    dead = _dead_pid()
    stale = tmp_path / f".f.json.tmp-{_atomic._host_tag()}-{dead}-zz"
    stale.write_text("partial")
    with _atomic.atomic_file(str(tmp_path / "f.json"), "w") as f:
        f.write("{}")
    assert sorted(os.listdir(tmp_path)) == ["f.json"]
