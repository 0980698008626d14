"""Every binding of mlmix._core, called with random arguments: wrong dtypes, ranks, strides, byte
orders, huge and negative values, inconsistent lengths. Any Python exception is fine; a crash (which
kills this process), a hang or a C++ exception escaping as something other than a Python exception is
not.

Arguments are generated from each binding's pybind11 signature, so bindings added later are fuzzed
without editing this file. Structured values (monotone offsets, arrays of one shared length) are
mixed in so that calls get past the first checks and reach the kernels.
"""

from __future__ import annotations

import functools
import inspect
import os
import re
import resource

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from mlmix._core_loader import core

EXAMPLES = int(os.environ.get("MLMIX_FUZZ_EXAMPLES", "40"))
SANITIZED = os.environ.get("MLMIX_SANITIZED") == "1"
# Under ASan a failed huge allocation aborts instead of raising MemoryError, and RLIMIT_AS cannot be
# used (ASan reserves terabytes of shadow memory), so element values stay small there.
BIG = 2**16 if SANITIZED else 2**62

DTYPES = ["bool", "int8", "uint8", "int16", "uint16", "int32", "uint32", "int64", "uint64", "float16",
          "float32", "float64", "complex64", ">i8", ">u4", ">f8", "U3", "O"]
INT_EDGES = [0, 1, -1, 2, 7, 64, 255, 256, 65_535, 2**31 - 1, 2**31, -(2**31), 2**32, 2**63 - 1, -(2**63), 2**64 - 1,
             2**64, -(2**64), 10**30]
# option strings the bindings accept (so that fuzzing gets past the option parsing), plus junk
WORDS = ["bfd", "ffd", "wrapped", "error", "truncate", "split", "drop", "cpu", "cuda", "auto", "none", "sum", "mean",
         "", "\x00", "\udcff", "é" * 3, "x" * 1000]


def _signature(fn) -> list[tuple[str, str, bool]] | None:
    """[(name, type text, has default)] of a pybind11 function (first overload), without ``self``;
    None when the docstring holds no signature."""
    doc = (fn.__doc__ or "").strip().splitlines()
    head = doc[0] if doc else ""
    m = re.match(r"^\s*(?:\d+\.\s*)?[\w.]+\((.*)\)\s*->", head)
    if not m:
        return None
    params, depth, cur = [], 0, ""
    for ch in m.group(1):  # split on top-level commas only (types hold brackets)
        if ch == "," and depth == 0:
            params.append(cur.strip())
            cur = ""
            continue
        depth += ch in "[("
        depth -= ch in "])"
        cur += ch
    if cur.strip():
        params.append(cur.strip())
    out = []
    for p in params:
        name, _, rest = p.partition(":")
        typ, _, default = rest.partition("=")
        if name.strip() == "self":
            continue
        out.append((name.strip(), typ.strip(), bool(default.strip())))
    return out


@st.composite
def arrays(draw, n: int):
    """An array of length ~n. Hypothesis picks the structure; the element values come from a numpy
    generator seeded by hypothesis (drawing them one by one is ~20x slower and gains little here)."""
    kind = draw(st.sampled_from(["random", "random", "offsets", "offsets", "edge", "odd"]))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    if kind == "offsets":  # a valid-looking Ragged offsets array: 0, non-decreasing
        return np.concatenate([[0], np.cumsum(rng.integers(0, 5, size=n))]).astype(np.int64)[: max(n, 1)]
    dtype = np.dtype(draw(st.sampled_from(DTYPES)))
    if kind == "odd":
        return np.zeros(draw(st.sampled_from([(), (n, 2), (2, n), (0, 3), (n, 1, 1)])), dtype=dtype)
    if dtype.kind in "iu":
        info = np.iinfo(dtype)
        lo, hi = max(int(info.min), -BIG), min(int(info.max), BIG)
        edges = np.array([v for v in INT_EDGES if lo <= v <= hi], dtype=object)
        pick = rng.integers(0, 3, size=n)
        vals = [int(rng.integers(lo, hi, endpoint=True)) if p == 0 else int(rng.integers(max(lo, -3), min(hi, 64) + 1))
                if p == 1 else int(rng.choice(edges)) for p in pick]
        a = np.array(vals, dtype=dtype)
    elif dtype.kind in "fc":
        vals = rng.choice(np.array([0.0, -0.0, 1.0, -1.0, 0.5, np.nan, np.inf, -np.inf, 1e300, -1e-300, 3.0]), size=n)
        with np.errstate(over="ignore"):  # values beyond float16's range become inf
            a = vals.astype(dtype)
    elif dtype.kind == "b":
        a = rng.random(n) < 0.5
    elif dtype.kind == "U":
        a = np.array(["ab"] * n, dtype=dtype)
    else:
        a = np.array([None] * n, dtype=object)
    if kind == "edge":
        tweak = draw(st.sampled_from(["strided", "readonly", "reversed", "fortran2d"]))
        if tweak == "strided":
            a = np.repeat(a, 2)[::2]
        elif tweak == "readonly":
            a.setflags(write=False)
        elif tweak == "reversed":
            a = a[::-1]
        else:
            a = np.asfortranarray(np.stack([a, a], axis=1))
    return a


@functools.lru_cache(maxsize=None)  # hypothesis validates each new strategy object: build each once
def _value(typ: str, n: int):
    ints = st.one_of(st.integers(-3, 70), st.sampled_from(INT_EDGES))
    if "numpy" in typ:
        return st.one_of(arrays(n), arrays(n), arrays(n), st.none(), st.integers(), st.lists(st.integers(0, 5)))
    if "Sequence" in typ or typ.startswith("list"):
        return st.one_of(st.lists(ints, min_size=n, max_size=n), st.lists(ints, max_size=6), st.just([]),
                         st.none())
    if "SupportsInt" in typ or typ == "int":
        return st.one_of(ints, ints, st.floats(allow_nan=True), st.none(), st.booleans())
    if "float" in typ or "SupportsFloat" in typ:
        return st.one_of(st.floats(allow_nan=True, allow_infinity=True), ints)
    if typ == "str":
        return st.one_of(st.sampled_from(WORDS), st.sampled_from(WORDS), st.text(max_size=8), st.none())
    if typ == "bool":
        return st.one_of(st.booleans(), st.booleans(), st.integers(), st.none())
    if typ == "bytes":
        return st.one_of(st.binary(max_size=64), st.none())
    return st.one_of(st.none(), arrays(n), ints, st.sampled_from(WORDS))  # "object" and anything else


@st.composite
def calls(draw, sig):
    """Arguments for one call: all values share one length n so that consistent calls are common."""
    n = draw(st.sampled_from([0, 1, 2, 3, 5, 8, 17]))
    args = []
    for _name, typ, has_default in sig:
        if has_default and draw(st.booleans()):
            break
        args.append(draw(_value(typ, n)))
    if draw(st.integers(0, 15)) == 0:  # wrong arity now and then
        args = args[:-1] if args and draw(st.booleans()) else args + [None]
    return args


# Bindings that take raw device pointers (as integers, from torch tensors) and launch CUDA kernels on
# them: no binding can validate a pointer, so they are private to mlmix.torch.loss, which checks the
# tensors (device, dtype, shape, contiguity) before passing their addresses; that layer is what
# tests/test_loss.py exercises with bad input.
RAW_POINTER_BINDINGS = ("lce_lse_block", "lce_grad_block")


def _functions():
    out = []
    for name in sorted(dir(core)):
        obj = getattr(core, name)
        if inspect.isclass(obj) or not callable(obj) or name.startswith("__") or name in RAW_POINTER_BINDINGS:
            continue
        out.append(name)
    return out


def _classes():
    return [name for name in sorted(dir(core)) if inspect.isclass(getattr(core, name))
            and not issubclass(getattr(core, name), BaseException)]


class _MemoryCap:
    """Caps the address space while a call runs, so that a requested giant allocation raises
    MemoryError instead of exhausting the machine (skipped under ASan, see BIG)."""

    def __enter__(self):
        self.old = resource.getrlimit(resource.RLIMIT_AS)
        if not SANITIZED:
            with open("/proc/self/statm") as f:
                vm = int(f.read().split()[0]) * resource.getpagesize()
            resource.setrlimit(resource.RLIMIT_AS, (vm + (3 << 30), self.old[1]))
        return self

    def __exit__(self, *exc):
        resource.setrlimit(resource.RLIMIT_AS, self.old)


def _call(fn, args) -> None:
    with _MemoryCap():
        try:
            out = fn(*args)
        except (TypeError, ValueError, IndexError, OverflowError, MemoryError, RuntimeError):
            return
    # results must be readable in full (a bad pointer or size would fault here)
    for x in out if isinstance(out, (tuple, list)) else out.values() if isinstance(out, dict) else [out]:
        if isinstance(x, np.ndarray):
            x.tobytes()


FUNCTIONS = _functions()


def test_every_binding_has_a_signature():
    assert FUNCTIONS, "mlmix._core exposes no functions"
    for name in FUNCTIONS:
        assert _signature(getattr(core, name)) is not None, f"cannot read the signature of {name}"


@pytest.mark.parametrize("name", FUNCTIONS)
def test_function_never_crashes(name):
    fn = getattr(core, name)
    sig = _signature(fn)

    @settings(max_examples=EXAMPLES, deadline=None, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(calls(sig))
    def run(args):
        _call(fn, args)

    run()


@pytest.mark.parametrize("name", _classes())
def test_class_methods_never_crash(name):
    cls = getattr(core, name)
    init_sig = _signature(cls.__init__)
    methods = [m for m in sorted(vars(cls)) if not m.startswith("_") and callable(getattr(cls, m))]

    @settings(max_examples=EXAMPLES * 2, deadline=None, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(calls(init_sig), st.data())
    def run(init_args, data):
        with _MemoryCap():
            try:
                obj = cls(*init_args)
            except (TypeError, ValueError, IndexError, OverflowError, MemoryError, RuntimeError):
                return
        for _ in range(data.draw(st.integers(1, 6))):
            meth = data.draw(st.sampled_from(methods))
            bound = getattr(obj, meth)
            args = data.draw(calls(_signature(bound)))
            if meth == "merge" and data.draw(st.booleans()):
                args = [obj]  # merging with itself, a likely aliasing bug
            _call(bound, args)

    run()
