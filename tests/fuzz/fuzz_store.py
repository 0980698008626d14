"""atheris target: the packed-store reader (mlmix.open, Store.batch, Store[i]) on arbitrary store files.

An input is a store serialized as frames (name, NUL, 4-byte little-endian length, bytes); the seed
corpus holds real stores written by mlmix.write_store. When the first byte is odd the harness
recomputes every checksum after the fuzzer's edits, so that crafted stores (wrong lengths, offsets,
dtypes, manifest fields) get past the CRC check and reach the parser and the C++ row reader.
"""

import atexit
import json
import os
import shutil
import struct
import tempfile
import zlib

import numpy as np

from _common import CLEAN, main
import mlmix
from mlmix import store as store_mod

WORK = tempfile.mkdtemp(prefix="mlmix-fuzz-store-", dir="/dev/shm" if os.path.isdir("/dev/shm") else None)
atexit.register(shutil.rmtree, WORK, True)
NAMES = {"manifest.json", "tokens.bin", "loss_mask.bin", "row_offsets.bin", "seg_offsets.bin", "seg_lens.bin",
         "seg_starts.bin", "seg_example.bin", "seg_lang.bin"}


def serialize(path) -> bytes:
    out = bytearray(b"\x00")
    for name in sorted(os.listdir(path)):
        with open(os.path.join(path, name), "rb") as f:
            data = f.read()
        out += name.encode() + b"\x00" + struct.pack("<I", len(data)) + data
    return bytes(out)


def deserialize(data: bytes) -> tuple[bool, dict[str, bytes]]:
    fix = bool(data[:1]) and data[0] & 1 == 1
    files, i = {}, 1
    while i < len(data):
        j = data.find(b"\x00", i)
        if j < 0 or j + 5 > len(data):
            break
        name = data[i:j].decode("ascii", "replace")
        n = struct.unpack("<I", data[j + 1 : j + 5])[0]
        files[name if name in NAMES else f"x{len(files)}.bin"] = data[j + 5 : j + 5 + n]
        i = j + 5 + n
    return fix, files


def fix_checksums(files: dict[str, bytes]) -> None:
    try:
        m = json.loads(files["manifest.json"])
        for spec in m["arrays"].values():
            spec["crc32"] = f"{zlib.crc32(files.get(spec['file'], b'')):08x}"
        m.pop(store_mod.MANIFEST_CRC, None)
        files["manifest.json"] = store_mod._manifest_bytes(m)
    except Exception:  # not a manifest the fixer understands: leave the bytes as they are
        pass


def TestOneInput(data: bytes) -> None:
    fix, files = deserialize(data)
    if fix:
        fix_checksums(files)
    shutil.rmtree(WORK, ignore_errors=True)
    os.makedirs(WORK)
    for name, content in files.items():
        with open(os.path.join(WORK, name), "wb") as f:
            f.write(content)
    for verify in (True, False):
        try:
            s = mlmix.open(WORK, verify=verify)
        except CLEAN:
            continue
        n = len(s)
        try:
            rows = np.arange(min(n, 64))
            out = s.batch(rows)
            assert out["input_ids"].shape == (rows.shape[0], s.seq_len)
            for i in range(min(n, 4)):
                s[i]
            s.batch(np.array([n]))  # one past the end must raise
            raise AssertionError(f"row {n} of a {n}-row store was read")
        except CLEAN:
            pass


def make_seeds(out_dir: str) -> None:
    """Writes the seed corpus: a few small valid stores of each kind."""
    rng = np.random.default_rng(0)
    os.makedirs(out_dir, exist_ok=True)
    for k, (dtype, mask, langs, seq_len) in enumerate([(np.uint32, True, True, 16), (np.int32, False, False, 8),
                                                        (np.int64, True, False, 32), (np.uint32, False, True, 4)]):
        n = 6 + k
        lengths = rng.integers(1, seq_len, size=n)
        toks = mlmix.Ragged.from_lengths(rng.integers(0, 1000, size=int(lengths.sum())).astype(dtype), lengths)
        m = mlmix.Ragged.from_lengths(rng.random(int(lengths.sum())) < 0.5, lengths) if mask else None
        lg = rng.choice(["en", "sw"], size=n).tolist() if langs else None
        path = os.path.join(WORK, f"seed{k}")
        mlmix.write_store(path, toks, seq_len=seq_len, loss_mask=m, langs=lg)
        for fix in (0, 1):
            blob = bytes([fix]) + serialize(path)[1:]
            with open(os.path.join(out_dir, f"store{k}-fix{fix}"), "wb") as f:
                f.write(blob)


if __name__ == "__main__":
    import sys

    if sys.argv[1:2] == ["--make-seeds"]:
        make_seeds(sys.argv[2])
    else:
        main(TestOneInput)
