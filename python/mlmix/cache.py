"""The pipeline's stage cache: one directory per (stage, key), written atomically, verified by checksum.

A stage's key is a hash of its configuration and of the key of the stage before it (the first stage
hashes its sources' fingerprints), so a change anywhere invalidates exactly the stages downstream of it.
Each entry holds the stage's files plus ``entry.json`` with the CRC-32 of every file; an entry whose
files do not match (a truncated write from an older version, a disk error, a hand edit) is discarded
and recomputed, never trusted. Entries are written in a temporary directory renamed into place
(``_atomic.atomic_directory``), so a run killed at any moment leaves either the whole entry or none.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from typing import Any, Callable

from ._atomic import atomic_directory
from ._outputs import files_crc32

__all__ = ["StageCache", "stage_key", "STAGE_NAMES"]

_ENTRY = "entry.json"
_FORMAT = 2  # 2: CRC-32 of each file (was sha256)
# the stage folders a cache root holds (its other entries: CACHEDIR.TAG and dot-named scratch/temporary ones)
STAGE_NAMES = ("read", "langid", "tokenize", "dedup", "mix", "pack")
_KEY_CHARS = frozenset("0123456789abcdef")


def stage_key(*parts: Any) -> str:
    """A stable hex key for JSON-serialisable ``parts`` (dict keys sorted)."""
    blob = json.dumps(parts, sort_keys=True, separators=(",", ":"), default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:24]


def _files_under(root: str) -> list[str]:
    out = []
    for base, _, names in os.walk(root):
        for n in names:
            rel = os.path.relpath(os.path.join(base, n), root)
            if rel != _ENTRY:
                out.append(rel)
    return sorted(out)


class StageCache:
    """Stage outputs under ``root/<stage>/<key>/``; ``keep`` most recently used entries per stage survive."""

    def __init__(self, root: str | os.PathLike, *, enabled: bool = True, keep: int = 3) -> None:
        from ._outputs import check_target

        # an existing root must be mlmix's cache (or empty): corrupt and old entries are removed under it
        self.root = check_target(root, "cache", arg="cache_dir")
        self.enabled = enabled
        self.keep = keep
        self.discarded: list[str] = []  # entries found corrupt during this run (for the log)

    def path(self, stage: str, key: str) -> str:
        return os.path.join(self.root, stage, key)

    def load(self, stage: str, key: str) -> str | None:
        """The entry's directory if it exists and every checksum matches; otherwise None (corrupt ones removed)."""
        if not self.enabled:
            return None
        d = self.path(stage, key)
        meta_path = os.path.join(d, _ENTRY)
        if not os.path.isdir(d):
            return None
        try:
            with open(meta_path, encoding="utf-8") as f:
                meta = json.load(f)
            if isinstance(meta, dict) and isinstance(meta.get("format"), int) and meta["format"] != _FORMAT:
                # written by another version of mlmix (format 1 kept sha256s): recomputed, but not damaged
                shutil.rmtree(d, ignore_errors=True)
                return None
            ok = (
                meta.get("format") == _FORMAT
                and meta.get("stage") == stage
                and meta.get("key") == key
                and sorted(meta["files"]) == _files_under(d)
                and files_crc32(d, sorted(meta["files"])) == meta["files"]
            )
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            ok = False
        if not ok:
            self.discarded.append(f"{stage}/{key}")
            shutil.rmtree(d, ignore_errors=True)
            return None
        os.utime(d)  # most recently used, for pruning
        return d

    def save(self, stage: str, key: str, write: Callable[[str], Any]) -> str:
        """Run ``write(tmpdir)`` and commit its files as the entry ``(stage, key)``; returns the entry's directory."""
        from ._outputs import claim_directory

        claim_directory(self.root, "cache", arg="cache_dir")
        d = self.path(stage, key)
        # not fsynced: an entry that a power loss left damaged fails its CRCs on the next load and is recomputed
        with atomic_directory(d, kind="cache-entry", durable=False) as tmp:
            write(tmp)
            files = files_crc32(tmp, _files_under(tmp))
            with open(os.path.join(tmp, _ENTRY), "w", encoding="utf-8") as f:
                json.dump({"format": _FORMAT, "stage": stage, "key": key, "created": time.time(), "files": files}, f)
        self._prune(stage, keep_key=key)
        return d

    def _prune(self, stage: str, keep_key: str) -> None:
        base = os.path.join(self.root, stage)
        try:
            # only names a key can have: anything else under the root was not written here
            entries = [e for e in os.listdir(base) if len(e) == 24 and set(e) <= _KEY_CHARS]
        except OSError:
            return
        entries.sort(key=lambda e: os.path.getmtime(os.path.join(base, e)), reverse=True)
        for e in entries[self.keep :]:
            if e != keep_key:
                shutil.rmtree(os.path.join(base, e), ignore_errors=True)
