"""python/mlmix/_core.pyi lists what the built extension exports (regenerate with tools/gen_stubs.sh)."""

from __future__ import annotations

import ast
import os

import mlmix
from mlmix._core_loader import core

STUB = os.path.join(os.path.dirname(mlmix.__file__), "_core.pyi")
CUDA_ONLY = {"lce_lse_block", "lce_grad_block"}


def _stub_names() -> set[str]:
    with open(STUB, encoding="utf-8") as f:
        tree = ast.parse(f.read())
    return {n.name for n in tree.body if isinstance(n, (ast.FunctionDef, ast.ClassDef))}


def _module_names() -> set[str]:
    return {name for name in dir(core) if not name.startswith("__") and callable(getattr(core, name))}


def test_stub_lists_every_binding():
    stub, module = _stub_names(), _module_names()
    missing = module - stub
    assert not missing, f"bindings missing from _core.pyi (run tools/gen_stubs.sh): {sorted(missing)}"
    extra = stub - module
    if "cuda" not in core.BUILD_INFO.get("backends", ()):
        extra -= CUDA_ONLY  # a build without a CUDA toolkit lacks the kernels' bindings
    assert not extra, f"_core.pyi lists names the extension lacks (run tools/gen_stubs.sh): {sorted(extra)}"
