"""Atomic writes: build in a temporary sibling, fsync, then rename into place.

Temporary siblings are named ``.<name>.tmp-<host>-<pid>-<random>`` (and ``.<name>.old-...`` for the
old directory of a swap), ``<host>`` a short hash of the host name. A writer killed (SIGKILL, power
loss) leaves its sibling behind; the next write of the same ``<name>`` removes the siblings of writers
of this host whose pid is no longer alive. Siblings of live writers, of other hosts (a shared file
system) and of any name that does not parse are left alone. A dead writer's ``.old-*`` directory is
the complete previous version: if nothing is under ``<name>`` (the writer died between the two renames
of a swap) it is renamed back into place instead of being removed.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import shutil
import socket
import tempfile
from typing import Iterator


def _host_tag() -> str:
    return hashlib.sha256(socket.gethostname().encode("utf-8", "replace")).hexdigest()[:8]


def _prefix(base: str, kind: str) -> str:
    """Name prefix of a temporary sibling of ``base`` made by this process (kind: "tmp" or "old")."""
    return f".{base}.{kind}-{_host_tag()}-{os.getpid()}-"


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return True  # not a pid we could have written: never treat it as dead
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True  # exists (another user's) or unknown: keep its files
    return True


def _stale_siblings(parent: str, base: str) -> list[tuple[str, str]]:
    """(kind, full path) of the temporary siblings of ``base`` left by dead writers of this host."""
    pattern = re.compile(re.escape(f".{base}.") + r"(tmp|old)-([0-9a-f]{8})-([0-9]+)-")
    host = _host_tag()
    out = []
    try:
        names = os.listdir(parent)
    except OSError:
        return out
    for name in names:
        m = pattern.match(name)
        if m is None or m.group(2) != host:
            continue
        pid = int(m.group(3))
        if pid != os.getpid() and not _pid_alive(pid):
            out.append((m.group(1), os.path.join(parent, name)))
    return sorted(out)


def clean_stale(path: str | os.PathLike) -> list[str]:
    """Remove what dead writers of ``path`` left next to it; returns the paths removed or restored.

    If nothing is at ``path`` and a dead writer left exactly one ``.old-*`` directory (it was killed
    between the two renames of a swap), that directory is renamed back to ``path``. Errors are
    ignored: cleaning is an optimisation, never a reason for a write to fail.
    """
    path = os.path.abspath(os.fspath(path))
    parent, base = os.path.dirname(path), os.path.basename(path)
    stale = _stale_siblings(parent, base)
    done = []
    olds = [p for kind, p in stale if kind == "old"]
    if len(olds) == 1 and not os.path.lexists(path):
        with contextlib.suppress(OSError):
            os.rename(olds[0], path)
            done.append(olds[0])
            stale = [(k, p) for k, p in stale if p != olds[0]]
    if olds and not os.path.lexists(path):
        stale = [(k, p) for k, p in stale if k != "old"]  # several candidates: keep them all, decide nothing
    for _, p in stale:
        try:
            if os.path.isdir(p) and not os.path.islink(p):
                shutil.rmtree(p)
            else:
                os.unlink(p)
        except OSError:
            continue
        done.append(p)
    return done


def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike, *, kind: str, overwrite: bool = True,
                     arg: str = "output", durable: bool = True) -> Iterator[str]:
    """Yield a temporary directory next to ``path``; on success it replaces ``path`` atomically.

    ``kind`` is the kind of mlmix output being written (``_outputs``): an existing ``path`` is replaced
    only if it is an output of that kind (or an empty directory); anything else raises
    ``OutputError`` before anything is written, and ``arg`` names the argument in that message. For
    the kinds that carry a marker file, the marker is written into the new directory unless the
    caller wrote it. On any exception the temporary directory is removed and ``path`` is left as it
    was. A crash leaves at most a ``.<name>.tmp-*`` sibling, which never opens as a store and which
    the next write of ``path`` removes (see the module docstring).

    ``durable=False`` skips the fsyncs (of the files and of both directories) that make the new directory survive
    a power loss whole: for a directory whose damage is found and mended on every read (a stage cache entry,
    checked file by file against its CRCs and recomputed when it does not match), the swap stays atomic for every
    reader on a running system, and the writer does not wait for the disk.
    """
    from ._outputs import MARKER, check_target, write_marker

    path = check_target(path, kind, arg=arg)
    parent = os.path.dirname(path)
    os.makedirs(parent, exist_ok=True)
    clean_stale(path)
    if os.path.exists(path) and not overwrite:
        raise FileExistsError(f"{path!r} already exists (pass overwrite=True to replace it)")
    tmp = tempfile.mkdtemp(prefix=_prefix(os.path.basename(path), "tmp"), dir=parent)
    try:
        yield tmp
        if kind in ("build", "demo", "eval", "study", "study-run") and not os.path.isfile(os.path.join(tmp, MARKER)):
            write_marker(tmp, kind)
        for name in os.listdir(tmp) if durable else ():
            full = os.path.join(tmp, name)
            if os.path.isfile(full):
                fd = os.open(full, os.O_RDONLY)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
        if durable:
            _fsync_dir(tmp)
        if os.path.exists(path):
            # rename the old one aside first so that the swap itself is a single rename
            old = tempfile.mkdtemp(prefix=_prefix(os.path.basename(path), "old"), dir=parent)
            os.rmdir(old)
            os.rename(path, old)
            try:
                os.rename(tmp, path)
            except BaseException:
                os.rename(old, path)  # put the old one back: a failed swap must not lose it
                raise
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, path)
        if durable:
            _fsync_dir(parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _umask() -> int:
    """The process umask, read without changing it where the OS says it (Linux); else set and restored."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike, mode: str = "wb", *, kind: str | None = None,
                arg: str = "output") -> Iterator:
    """Open a temporary file next to ``path``; on success fsync and rename it over ``path``.

    With ``kind`` (e.g. ``"report"``), an existing ``path`` is replaced only if it is an mlmix file of
    that kind, and never inside a store or cache entry (``_outputs.check_target``; ``arg`` names the
    argument in its message). Without it, the caller has claimed the directory the file goes into
    (a marked output or the cache) and may replace any file in it.
    """
    if kind is not None:
        from ._outputs import check_target

        check_target(path, kind, arg=arg, directory=False)
    path = os.path.abspath(os.fspath(path))
    parent = os.path.dirname(path)
    os.makedirs(parent, exist_ok=True)
    clean_stale(path)
    fd, tmp = tempfile.mkstemp(prefix=_prefix(os.path.basename(path), "tmp"), dir=parent)
    try:
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fchmod(f.fileno(), 0o666 & ~_umask())  # mkstemp made it 0600: give it a new file's usual mode
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(parent)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def relax_modes(root: str | os.PathLike) -> None:
    """Give the tree at ``root`` the modes of files and directories created under the process umask.

    Files written through a temporary (``mkstemp`` 0600, ``mkdtemp`` 0700), or by libraries that choose their own
    modes (safetensors writes 0600), would otherwise keep them: ``root`` and every directory under it become
    ``0o777 & ~umask``, every file ``0o666 & ~umask``.
    """
    mask = _umask()
    os.chmod(root, 0o777 & ~mask)
    for base, dirs, files in os.walk(root):
        for d in dirs:
            os.chmod(os.path.join(base, d), 0o777 & ~mask)
        for f in files:
            os.chmod(os.path.join(base, f), 0o666 & ~mask)
