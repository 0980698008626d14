"""Where mlmix may write: it replaces a path only when mlmix wrote what is there, or nothing is there.

Every writer (``mlmix build``, ``write_store``, ``Ragged.save``, ``Mixture.save``, ``mlmix report -o``,
``mlmix demo``, ``mlmix eval``, the stage cache) goes through :func:`check_target` (directly, or through
``_atomic.atomic_directory``/``atomic_file``, which call it), so one rule decides for all of them:

- a path that does not exist may be written;
- an existing path is replaced only if it is an mlmix output of the kind being written (see
  :func:`kind_of`): a build directory, demo or eval output, or stage cache carries a marker file
  (:data:`MARKER`, or the standard ``CACHEDIR.TAG`` for the cache); a packed store is recognised by its
  checksummed manifest, a cache entry by its ``entry.json``, a report by its generator tag. Outputs
  written by mlmix before the marker existed are recognised by the same files;
- an empty directory may be used (nothing is in it to lose), except the current directory;
- anything else (a user's folder or file, a symbolic link, a device) is a :class:`OutputError` naming
  the path and what is there, and nothing is touched. There is no ``--force``: a user removes such a
  path themself.

Nothing may be written inside a packed store or a cache entry (their files are checksummed as a whole).
"""

from __future__ import annotations

import json
import os
from typing import Callable, Iterable

__all__ = ["OutputError", "MARKER", "CACHEDIR_TAG", "kind_of", "check_target", "write_marker", "read_marker",
           "is_within", "describe", "file_sha256", "files_sha256", "file_crc32", "files_crc32", "crc32_combine"]

MARKER = ".mlmix-output"
CACHEDIR_TAG = "CACHEDIR.TAG"
# https://bford.info/cachedir/: backup and sync tools skip a directory holding this file
_CACHEDIR_SIGNATURE = "Signature: 8a477f597d28d172789f06886806bc55"
_REPORT_TAG = b'<meta name="generator" content="mlmix'
_LEGACY_REPORT_TITLES = (b"<title>mlmix build report", b"<title>mlmix demo", b"<title>mlmix eval")

# what a kind is called in messages
_KIND_NAMES = {
    "build": "an mlmix build output",
    "demo": "an mlmix demo output",
    "eval": "an mlmix eval output",
    "study": "an mlmix study output",
    "study-run": "a run (trained arm) of an mlmix study",
    "store": "an mlmix packed store",
    "ragged": "a Ragged array saved by mlmix",
    "cache": "an mlmix stage cache",
    "cache-entry": "an mlmix stage-cache entry",
    "report": "an HTML report written by mlmix",
    "mixture": "a mixture manifest written by mlmix",
}
_MARKED = ("build", "demo", "eval", "study", "study-run")  # directory kinds that carry MARKER
# kinds whose files are checksummed as a whole: nothing else may be written into them
_SEALED = ("store", "cache-entry", "ragged")


class OutputError(ValueError):
    """mlmix refused to write a path because something it did not write is there (nothing was touched)."""


def _read_head(path: str, n: int = 4096) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read(n)
    except OSError:
        return b""


def _load_json(path: str):
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError, RecursionError):
        return None


def read_marker(directory: str) -> dict | None:
    """The parsed MARKER of ``directory`` if it is a valid mlmix marker, else None."""
    m = _load_json(os.path.join(directory, MARKER))
    if isinstance(m, dict) and m.get("mlmix") in _MARKED:
        return m
    return None


def _is_store(directory: str) -> bool:
    m = _load_json(os.path.join(directory, "manifest.json"))
    return isinstance(m, dict) and "manifest_crc32" in m and isinstance(m.get("arrays"), dict) and "format" in m


def _is_legacy_build(directory: str) -> bool:
    b = _load_json(os.path.join(directory, "build.json"))
    return (isinstance(b, dict) and isinstance(b.get("key"), str) and "format" in b and "stages" in b
            and os.path.isdir(os.path.join(directory, "store")))


def _is_legacy_demo(directory: str) -> bool:
    """A demo output written before markers existed: its demo.json summary (held-out losses, seed)."""
    d = _load_json(os.path.join(directory, "demo.json"))
    return isinstance(d, dict) and isinstance(d.get("heldout"), dict) and "seed" in d


def _is_cache_entry(directory: str) -> bool:
    e = _load_json(os.path.join(directory, "entry.json"))
    return isinstance(e, dict) and {"format", "stage", "key", "files"} <= set(e)


def _is_cache(directory: str) -> bool:
    tag = _read_head(os.path.join(directory, CACHEDIR_TAG), 512)
    if tag.startswith(_CACHEDIR_SIGNATURE.encode()) and b"mlmix" in tag:
        return True
    # a cache written before the tag: only stage folders, each holding only entries (or temporary siblings)
    from .cache import STAGE_NAMES

    try:
        names = [n for n in os.listdir(directory) if not n.startswith(".")]
    except OSError:
        return False
    if not names or any(n not in STAGE_NAMES for n in names):
        return False
    for n in names:
        sub = os.path.join(directory, n)
        if os.path.islink(sub) or not os.path.isdir(sub):
            return False
        for e in os.listdir(sub):
            if not e.startswith(".") and not _is_cache_entry(os.path.join(sub, e)):
                return False
    return True


def _is_ragged(directory: str) -> bool:
    try:
        names = set(os.listdir(directory))
    except OSError:
        return False
    return names == {"values.npy", "offsets.npy"}


# directory kinds recognised by their own files (no marker, or written before markers existed), in order
_UNMARKED = (("store", _is_store), ("cache-entry", _is_cache_entry), ("build", _is_legacy_build),
             ("demo", _is_legacy_demo), ("ragged", _is_ragged), ("cache", _is_cache))


def kind_of(path: str | os.PathLike) -> str | None:
    """The kind of mlmix output at ``path`` (a key of the kinds above), or None if it is not one."""
    path = os.fspath(path)
    if os.path.islink(path):
        return None
    if os.path.isdir(path):
        m = read_marker(path)
        if m is not None:
            return m["mlmix"]
        return next((kind for kind, recognise in _UNMARKED if recognise(path)), None)
    if os.path.isfile(path):
        head = _read_head(path)
        if _REPORT_TAG in head or any(t in head for t in _LEGACY_REPORT_TITLES):
            return "report"
        if path.endswith(".json"):
            m = _load_json(path)
            if isinstance(m, dict) and {"recipe", "rows", "targets"} <= set(m):
                return "mixture"
    return None


def describe(path: str) -> str:
    """What is at ``path``, in a few words, for error messages."""
    if os.path.islink(path):
        return f"a symbolic link to {os.readlink(path)!r}"
    if os.path.isdir(path):
        try:
            names = sorted(os.listdir(path))
        except OSError as exc:
            return f"a directory that cannot be listed ({exc.strerror})"
        shown = ", ".join(names[:5]) + (", ..." if len(names) > 5 else "")
        return f"a directory with {len(names)} entr{'y' if len(names) == 1 else 'ies'} ({shown})"
    if os.path.isfile(path):
        return f"a file of {os.path.getsize(path):,} bytes"
    return "something that is neither a file nor a directory"


def is_within(path: str, root: str) -> bool:
    """True if ``path`` is ``root`` or lies under it (both made absolute and real first)."""
    p, r = os.path.realpath(path), os.path.realpath(root)
    return p == r or p.startswith(r.rstrip(os.sep) + os.sep)


def _sealed_ancestor(path: str) -> str | None:
    """The nearest existing ancestor directory of ``path`` that is a store, cache entry or Ragged."""
    d = os.path.dirname(os.path.abspath(path))
    while True:
        if os.path.isdir(d) and kind_of(d) in _SEALED:
            return d
        parent = os.path.dirname(d)
        if parent == d:
            return None
        d = parent


def check_target(path: str | os.PathLike, kinds: str | Iterable[str], *, arg: str = "output",
                 directory: bool = True) -> str:
    """Raise :class:`OutputError` unless mlmix may write (and replace) ``path`` as one of ``kinds``.

    ``directory`` says whether the target is a directory (an empty one is then accepted) or a file.
    Returns the absolute path. Touches nothing.
    """
    kinds = (kinds,) if isinstance(kinds, str) else tuple(kinds)
    want = " or ".join(_KIND_NAMES.get(k, k) for k in kinds)
    given = os.fspath(path)
    if given == "":
        raise OutputError(f"{arg}: an empty path is not a place to write {want}; give a new path")
    p = os.path.abspath(given)
    sealed = _sealed_ancestor(p)
    if sealed is not None:
        raise OutputError(f"{arg}: {given!r} lies inside {_KIND_NAMES[kind_of(sealed)]} at {sealed!r}, whose files "
                          "are checksummed as a whole; mlmix writes nothing into it. Choose a path outside it")
    if not os.path.lexists(p):
        return p
    if is_within(os.getcwd(), p):
        raise OutputError(f"{arg}: {given!r} is the current directory or one above it ({describe(p)}); mlmix "
                          f"replaces only its own outputs. Give a new path for {want}, e.g. {os.path.join(given, 'out')!r}")
    kind = kind_of(p)
    if kind in kinds:
        return p
    if directory and kind is None and not os.path.islink(p) and os.path.isdir(p):
        try:
            if not os.listdir(p):
                return p  # an empty directory: nothing in it to lose
        except OSError:
            pass
    what = _KIND_NAMES[kind] if kind is not None else describe(p)
    raise OutputError(
        f"{arg}: {given!r} already exists and is not {want} ({'it is ' + what if kind else 'found ' + what}); "
        "mlmix replaces only what it wrote and has touched nothing. Choose a new path, or move or delete "
        "it yourself if it is no longer needed")


def write_marker(directory: str, kind: str, **fields) -> None:
    """Write ``directory``'s MARKER (kind ``build``, ``demo``, ``eval``, ``study`` or ``study-run``; extra JSON
    ``fields``)."""
    if kind not in _MARKED:
        raise ValueError(f"kind: expected one of {_MARKED}, got {kind!r}")
    from ._atomic import atomic_file

    with atomic_file(os.path.join(directory, MARKER), "w") as f:
        json.dump({"mlmix": kind, "format": 1, **fields}, f, sort_keys=True, indent=1)


def write_cachedir_tag(directory: str) -> None:
    """Tag ``directory`` as mlmix's stage cache (the standard CACHEDIR.TAG, so backups skip it)."""
    path = os.path.join(directory, CACHEDIR_TAG)
    if os.path.isfile(path):
        return
    from ._atomic import atomic_file

    with atomic_file(path, "w") as f:
        f.write(f"{_CACHEDIR_SIGNATURE}\n# This file was created by mlmix: this directory is its stage cache.\n"
                "# For information about cache directory tags see https://bford.info/cachedir/\n")


def claim_directory(path: str | os.PathLike, kind: str, *, arg: str = "output") -> str:
    """Make ``path`` a directory of ``kind`` that mlmix writes into in place (demo, eval outputs, the cache).

    It must not exist, be empty, or already be one of that kind (:func:`check_target`); it is created and
    marked. Returns the absolute path.
    """
    p = check_target(path, kind, arg=arg)
    os.makedirs(p, exist_ok=True)
    if kind == "cache":
        write_cachedir_tag(p)
    elif read_marker(p) is None:
        write_marker(p, kind)
    return p


def check_build_targets(output: str, cache_dir: str, sources: Iterable, config_dir: str | None) -> None:
    """The placement rules of a build's output and cache, checked before anything is read or written.

    The output must be absent, empty or an mlmix build output; the cache absent, empty or an mlmix
    cache; neither may be the config's folder (or above it), a source, above a source, or inside a
    source folder; output and cache may not contain each other. Sources are the resolved source dicts
    of the config (their ``path``; a glob's own matches never include mlmix outputs, see ``_paths``).
    """
    def rel(a: str, b: str) -> str | None:
        if is_within(a, b):
            return "is" if os.path.realpath(a) == os.path.realpath(b) else "lies inside"
        if is_within(b, a):
            return "contains"
        return None

    for arg, path in (("output", output), ("cache_dir", cache_dir)):
        if config_dir is not None:
            r = rel(path, config_dir)
            if r in ("is", "contains"):
                raise OutputError(f"{arg}: {path!r} {r} the config's folder {config_dir!r}; mlmix would replace "
                                  "your project. Name a new folder inside it, e.g. 'runs/NAME'")
        for i, src in enumerate(sources):
            if src.get("format") == "hub":
                continue
            sp = src["path"]
            if not os.path.exists(sp):  # a glob: its matches exclude the output and the cache
                continue
            r = rel(path, sp)
            if r is None or (r == "lies inside" and not os.path.isdir(sp)):
                continue
            what = "the source folder" if os.path.isdir(sp) else "the source file"
            raise OutputError(f"{arg}: {path!r} {r} {what} of sources[{i}] ({sp!r}); outputs never go into, "
                              "onto or above what a build reads. Choose a folder outside the sources")
    r = rel(output, cache_dir)
    if r is not None:
        raise OutputError(f"output: {output!r} {r} cache_dir {cache_dir!r}; give them separate folders "
                          "(by default the cache is OUTPUT.cache, next to the output)")
    check_target(output, "build", arg="output")
    check_target(cache_dir, "cache", arg="cache_dir")


def _each_chunk(path: str, update: Callable[[memoryview], None]) -> None:
    """``update`` with a file's bytes in order, read into one 1 MiB buffer."""
    buf = bytearray(1 << 20)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        while True:
            n = f.readinto(buf)
            if not n:
                break
            update(view[:n])


def file_sha256(path: str) -> str:
    """The sha256 of a file's bytes (hex): what seals an output."""
    import hashlib

    h = hashlib.sha256()
    _each_chunk(path, h.update)
    return h.hexdigest()


_NOTED_CRC32: dict[str, tuple[tuple[int, int, int], int]] = {}  # path -> ((inode, size, mtime_ns), CRC-32)
_NOTED_MAX = 4096


def note_crc32(path: str, crc: int) -> None:
    """Record ``crc`` as the CRC-32 of the file at ``path`` as it is now: for a writer that checksummed the bytes as
    it wrote them and has closed the file. :func:`file_crc32` takes it (once) instead of reading the file back, as
    long as the file's inode, size and modification time are those seen here; the stage cache then seals an entry
    without a second pass over its files."""
    st = os.stat(path)
    key = os.path.abspath(path)
    _NOTED_CRC32.pop(key, None)
    while len(_NOTED_CRC32) >= _NOTED_MAX:  # notes nobody asked for (files written outside a cache entry)
        _NOTED_CRC32.pop(next(iter(_NOTED_CRC32)), None)
    _NOTED_CRC32[key] = ((st.st_ino, st.st_size, st.st_mtime_ns), crc & 0xFFFFFFFF)


def file_crc32(path: str) -> str:
    """The CRC-32 of a file's bytes (8 hex digits): what checks a stage cache entry's files against damage
    (a truncated or garbled file, not tampering), at twice sha256's speed. A CRC noted by the file's writer
    (:func:`note_crc32`) is taken instead of reading the file when the file is unchanged since."""
    import zlib

    noted = _NOTED_CRC32.pop(os.path.abspath(path), None)
    if noted is not None:
        st = os.stat(path)
        if noted[0] == (st.st_ino, st.st_size, st.st_mtime_ns):
            return f"{noted[1]:08x}"
    crc = [0]
    _each_chunk(path, lambda chunk: crc.__setitem__(0, zlib.crc32(chunk, crc[0])))
    return f"{crc[0]:08x}"


_CRC32_POLY = 0xEDB88320  # zlib's CRC-32 polynomial, bit-reflected (bit 31 stands for x**0)
_CRC32_X8: tuple[int, ...] = ()  # x**(8 * 2**k) modulo the polynomial, k = 0..63 (made on first use)


def _crc32_mulmod(a: int, b: int) -> int:
    """``a * b`` modulo the CRC-32 polynomial, both bit-reflected."""
    p = 0
    for _ in range(32):
        if a & 0x80000000:
            p ^= b
        a = (a << 1) & 0xFFFFFFFF
        b = (b >> 1) ^ _CRC32_POLY if b & 1 else b >> 1
    return p


def crc32_combine(crc1: int, crc2: int, len2: int) -> int:
    """``zlib.crc32(a + b)`` from ``crc1 = zlib.crc32(a)``, ``crc2 = zlib.crc32(b)`` and ``len2 = len(b)``: so that
    blocks of a file can be checksummed on several threads and their CRCs joined in order (0.1 ms a call).

    Appending ``b`` multiplies ``a``'s CRC by x**(8 * len(b)) modulo the polynomial (the conditioning of both CRCs
    cancels out), which is found by squaring: at most one multiplication per bit of ``len2``."""
    global _CRC32_X8
    if not 0 <= len2 < 1 << 64:
        raise ValueError(f"len2 must be a byte count in [0, 2**64), got {len2}")
    if not _CRC32_X8:  # (two threads may both make it: the same values)
        table = [0x00800000]  # x**8
        while len(table) < 64:
            table.append(_crc32_mulmod(table[-1], table[-1]))
        _CRC32_X8 = tuple(table)
    shift, k, n = 0x80000000, 0, len2  # x**0
    while n:
        if n & 1:
            shift = _crc32_mulmod(_CRC32_X8[k], shift)
        n >>= 1
        k += 1
    return _crc32_mulmod(shift, crc1 & 0xFFFFFFFF) ^ (crc2 & 0xFFFFFFFF)


def files_sha256(directory: str, rels) -> dict[str, str]:
    """``{rel: file_sha256(directory/rel)}`` (see :func:`_files_digest`)."""
    return _files_digest(directory, rels, file_sha256)


def files_crc32(directory: str, rels) -> dict[str, str]:
    """``{rel: file_crc32(directory/rel)}`` (see :func:`_files_digest`)."""
    return _files_digest(directory, rels, file_crc32)


def _files_digest(directory: str, rels, digest: Callable[[str], str]) -> dict[str, str]:
    """``{rel: digest(directory/rel)}``, the files hashed on up to 4 threads (the hashes and the reads
    release the GIL); an error reading any file is raised."""
    rels = list(rels)
    paths = [os.path.join(directory, rel) for rel in rels]
    big = sum(1 for p in paths if _size(p) >= 1 << 20)
    if big < 2:
        return {rel: digest(p) for rel, p in zip(rels, paths)}
    import concurrent.futures as cf

    with cf.ThreadPoolExecutor(min(4, big, os.cpu_count() or 1)) as pool:
        return dict(zip(rels, pool.map(digest, paths)))


def _size(path: str) -> int:
    try:
        return os.path.getsize(path)
    except OSError:  # reported by file_sha256 itself
        return 0


def _sealable_files(directory: str, skip: tuple[str, ...]) -> list[str]:
    out = []
    for base, dirs, names in os.walk(directory):
        rel_base = os.path.relpath(base, directory)
        if rel_base != "." and rel_base.split(os.sep)[0] in skip:
            dirs[:] = []
            continue
        dirs[:] = [d for d in dirs if not (rel_base == "." and d in skip)]
        for n in names:
            rel = os.path.normpath(os.path.join(rel_base, n))
            if rel != MARKER:
                out.append(rel)
    return sorted(out)


def seal(directory: str, kind: str, *, skip: tuple[str, ...] = ("store",), **fields) -> None:
    """Write ``directory``'s MARKER with the sha256 of every file in it (but those under ``skip``:
    the store checks its own files), so that a later run can tell a changed or missing file."""
    files = files_sha256(directory, _sealable_files(directory, skip))
    write_marker(directory, kind, files=files, skip=list(skip), **fields)


def check_sealed(directory: str) -> list[str]:
    """What differs between ``directory`` and its MARKER's checksums: one line per missing, changed or
    unexpected file; empty when everything matches. A directory without checksums gives one line."""
    m = read_marker(directory)
    if m is None or not isinstance(m.get("files"), dict):
        return [f"{MARKER} is missing or holds no checksums"]
    skip = tuple(m.get("skip") or ())
    want: dict = m["files"]
    have = set(_sealable_files(directory, skip))
    problems = []
    for rel in sorted(set(want) | have):
        if rel not in have:
            problems.append(f"{rel} is missing")
        elif rel not in want:
            problems.append(f"{rel} was not written by mlmix")
        else:
            try:
                ok = file_sha256(os.path.join(directory, rel)) == want[rel]
            except OSError as exc:
                problems.append(f"{rel} cannot be read ({exc.strerror})")
                continue
            if not ok:
                problems.append(f"{rel} was changed after mlmix wrote it")
    return problems
