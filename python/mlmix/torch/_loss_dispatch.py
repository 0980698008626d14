"""Which backend runs the fused linear cross-entropy: the ``impl`` rule and the backend object behind a name.

:func:`resolve_impl` turns the user's ``impl`` ("auto", "cpu", "cuda") into a backend name, once per call of
:func:`mlmix.torch.linear_cross_entropy`; the custom ops of :mod:`._loss_autograd` carry that name (a string is
what a ``torch.library`` op can take) and turn it into the passes with :func:`backend` when they run. Both are
plain functions that ``torch.compile`` traces without a graph break.
"""

from __future__ import annotations

from typing import Any

from .._deps import require
from . import _loss_cpu, _loss_cuda
from ._loss_common import DTYPE_CODE, Backend
from ._loss_cuda import stream_handle

torch = require("torch", "mlmix.torch")

IMPLS = ("auto", "cpu", "cuda")

# the compiled extension if it carries the CUDA kernels, else None; looked up on first use (a list, not
# functools.lru_cache, which torch.compile would have to trace into)
_KERNELS: list = []


def _find_cuda_kernels() -> Any:
    try:
        from .._core_loader import core
    except ImportError:
        return None
    if "cuda" not in core.BUILD_INFO.get("backends", ()) or not hasattr(core, "lce_lse_block"):
        return None
    return core


def cuda_kernels() -> Any:
    """The compiled extension if it carries the CUDA kernels, else None."""
    if not _KERNELS:
        _KERNELS.append(_find_cuda_kernels())
    return _KERNELS[0]


def resolve_impl(impl: str, device: "torch.device", dtype) -> str:
    """The backend name ("cpu" or "cuda") for ``impl`` and tensors on ``device`` of ``dtype``; an explicitly
    requested backend that cannot run raises, ``"auto"`` falls back to "cpu"."""
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    if impl == "cuda" and dtype not in DTYPE_CODE:
        raise ValueError(f"impl='cuda' supports float32/bfloat16/float16 tensors, got {dtype}; use impl='auto'")
    if impl == "cpu":
        if device.type != "cpu":
            raise ValueError(
                f"impl='cpu' needs CPU tensors, got tensors on {device}; use impl='auto' or move them to the CPU"
            )
        return "cpu"
    if impl == "cuda":
        if device.type != "cuda":
            raise ValueError(f"impl='cuda' needs CUDA tensors, got tensors on {device}")
        if cuda_kernels() is None:
            raise RuntimeError(
                "impl='cuda' was requested but this mlmix build has no CUDA kernels "
                "(mlmix.build_info()['backends'] lacks 'cuda'); reinstall with a CUDA toolkit or use impl='auto'"
            )
        return "cuda"
    # auto: the fused kernels when they apply, else the blockwise torch path on whatever device the tensors are
    if device.type == "cuda" and dtype in DTYPE_CODE and cuda_kernels() is not None:
        return "cuda"
    return "cpu"


def backend(name: str) -> Backend:
    """The passes of the backend ``name`` ("cpu" or "cuda", as :func:`resolve_impl` chose it)."""
    if name == "cuda":
        return _loss_cuda.backend(cuda_kernels(), stream_handle)
    if name == "cpu":
        return _loss_cpu.BACKEND
    raise ValueError(f"backend must be 'cpu' or 'cuda', got {name!r}")
