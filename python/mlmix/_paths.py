"""The files a source names: exactly those, each once, never mlmix's own outputs.

A source's ``path`` is resolved against the config's folder (``base``), which is always taken
literally: brackets or stars in the folder's name are just characters. Then:

- a ``path`` that exists (a file or a directory, even one whose name holds ``*``, ``?`` or ``[``) is
  taken literally;
- otherwise, if it holds a pattern character, it is a glob pattern (``*``, ``?``, ``[abc]``, and ``**``
  for any number of folders, as in Python's ``glob`` with ``recursive=True``). To match a pattern
  character literally inside a pattern, enclose it in brackets: ``data[[]1]/*.jsonl`` matches the files
  of ``data[1]/``. Names starting with a dot are matched only by a pattern part that starts with a dot;
- a directory is read recursively: its ``.jsonl``/``.json``/``.ndjson`` (optionally ``.gz``/``.zst``) and
  ``.parquet`` files, skipping names that start with a dot.

Walking never enters mlmix's outputs, caches or temporary folders (``_outputs.kind_of``, the folders
named in ``exclude``, and any folder tagged ``CACHEDIR.TAG``), and follows symbolic links, but visits
each real folder once per pattern position and returns each real file once (the first path in sorted
order), so links and link loops can neither hang a build nor read a file twice.
"""

from __future__ import annotations

import fnmatch
import os
import re
from typing import Callable, Iterable, Iterator

__all__ = ["has_magic", "expand", "walk_files"]

_MAGIC = re.compile(r"[*?\[]")


def has_magic(s: str) -> bool:
    return _MAGIC.search(s) is not None


def _skip_dir(path: str, excluded: tuple[str, ...]) -> bool:
    from ._outputs import CACHEDIR_TAG, kind_of

    real = os.path.realpath(path)
    if any(real == e or real.startswith(e + os.sep) for e in excluded):
        return True
    return os.path.isfile(os.path.join(path, CACHEDIR_TAG)) or kind_of(path) is not None


def _entries(d: str) -> list[os.DirEntry]:
    try:
        with os.scandir(d) as it:
            return sorted(it, key=lambda e: e.name)
    except (FileNotFoundError, NotADirectoryError, PermissionError):
        return []


def _is_dir(e: os.DirEntry) -> bool:
    try:
        return e.is_dir()  # follows links; a dangling link is no directory
    except OSError:
        return False


def _is_file(e: os.DirEntry) -> bool:
    try:
        return e.is_file()
    except OSError:
        return False


def _dir_id(path: str) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def _name_matches(name: str, part: str) -> bool:
    if name.startswith(".") and not part.startswith("."):
        return False
    return fnmatch.fnmatchcase(name, part)


def _glob(root: str, parts: list[str], excluded: tuple[str, ...]) -> Iterator[str]:
    seen: set[tuple] = set()  # (dev, ino, position in the pattern) of each folder expanded

    def visit(d: str, i: int) -> Iterator[str]:
        ident = _dir_id(d)
        if ident is None or (ident + (i,)) in seen:
            return
        seen.add(ident + (i,))
        if i == len(parts):
            return
        part, last = parts[i], i == len(parts) - 1
        if part == "**":
            if last:  # "dir/**" names every file below dir
                for e in _entries(d):
                    if e.name.startswith("."):
                        continue
                    if _is_file(e):
                        yield e.path
                    elif _is_dir(e) and not _skip_dir(e.path, excluded):
                        yield from visit(e.path, i)
                return
            yield from visit(d, i + 1)  # ** matches no folder ...
            for e in _entries(d):  # ... or one more, and stays
                if not e.name.startswith(".") and _is_dir(e) and not _skip_dir(e.path, excluded):
                    yield from visit(e.path, i)
            return
        if not has_magic(part):
            p = os.path.join(d, part)
            if last:
                if os.path.isfile(p):
                    yield p
            elif os.path.isdir(p) and not _skip_dir(p, excluded):
                yield from visit(p, i + 1)
            return
        for e in _entries(d):
            if not _name_matches(e.name, part):
                continue
            if last:
                if _is_file(e):
                    yield e.path
            elif _is_dir(e) and not _skip_dir(e.path, excluded):
                yield from visit(e.path, i + 1)

    yield from visit(root, 0)


def _dedup_files(paths: Iterable[str]) -> list[str]:
    out, seen = [], set()
    for p in sorted(set(paths)):
        try:
            st = os.stat(p)
        except OSError:
            continue
        ident = (st.st_dev, st.st_ino)
        if ident in seen:
            continue
        seen.add(ident)
        out.append(p)
    return out


def walk_files(directory: str, keep: Callable[[str], bool], *, exclude: Iterable[str] = ()) -> list[str]:
    """Files under ``directory`` (recursively, links followed, each real folder and file once) for which
    ``keep(path)`` is true; names starting with a dot and mlmix's outputs are skipped; sorted."""
    excluded = tuple(os.path.realpath(e) for e in exclude)
    found = [p for p in _glob(directory, ["**"], excluded) if keep(p)]
    return _dedup_files(found)


def _split(pattern: str) -> tuple[str, list[str]]:
    """(literal root, pattern parts) of an absolute pattern: the root is its longest magic-free prefix."""
    parts = [p for p in pattern.split(os.sep) if p not in ("", ".")]
    root = os.sep if pattern.startswith(os.sep) else ""
    i = 0
    while i < len(parts) - 1 and not has_magic(parts[i]):
        i += 1
    return os.path.join(root, *parts[:i]) if i else (root or "."), parts[i:]


def expand(base: str, path: str, *, exclude: Iterable[str] = ()) -> tuple[str, list[str]]:
    """How ``path`` (relative to the literal folder ``base``, or absolute) resolves.

    Returns ``("file", [file])``, ``("dir", [dir])`` for an existing literal path (the caller lists a
    directory), or ``("glob", files)`` for a pattern (files sorted, each real file once; possibly empty).
    ``("missing", [])`` when the path neither exists nor holds a pattern character.
    """
    path = os.path.expanduser(path)
    literal = os.path.normpath(os.path.join(base, path))
    if os.path.isfile(literal):
        return "file", [literal]
    if os.path.isdir(literal):
        return "dir", [literal]
    if not has_magic(path):
        return "missing", []
    excluded = tuple(os.path.realpath(e) for e in exclude)
    if os.path.isabs(path):
        root, parts = _split(os.path.normpath(path))
    else:
        # the base is literal: only the user's path is split into a literal prefix and a pattern
        rel_root, parts = _split(os.path.normpath(path))
        root = os.path.normpath(os.path.join(base, rel_root))
    # ".." after a pattern part cannot be walked: glob treats it as a name, and so do we
    found = _glob(root, parts, excluded)
    files = []
    for f in found:
        real = os.path.realpath(f)
        if any(real == e or real.startswith(e + os.sep) for e in excluded):
            continue
        files.append(os.path.normpath(f))
    return "glob", _dedup_files(files)
