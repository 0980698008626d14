"""What the modules of the fused linear cross-entropy share: its options, the interface of a backend, block sizes.

:mod:`mlmix.torch.loss` (public API and dispatch) builds an :class:`Options` and picks a :class:`Backend`
(:mod:`._loss_cpu` or :mod:`._loss_cuda`); :mod:`._loss_autograd` runs the backend's passes. The constants here
size the (token block x vocab block) logits buffers of every pass, including the statistics of TRL's fused head
(:mod:`._trl_head`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional

from .._deps import require

torch = require("torch", "mlmix.torch")

# dtype codes of the CUDA kernels' tensors, shared with csrc/bind_loss.cpp and csrc/cuda/lce.h
DTYPE_CODE = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}

# Elements of one (token block x vocab block) logits buffer. 4M floats = 16 MiB keeps the GEMMs large enough
# to run at full speed on a CPU while staying small next to the float32 weight gradient. On a GPU the token block
# covers up to 16k tokens, so that each grad_weight block is one GEMM over all tokens written once (no float32
# vocab x hidden accumulator), and the buffer is 32M floats = 128 MiB (16k tokens x 2k vocabulary entries).
CPU_BLOCK_ELEMS = 1 << 22
CUDA_BLOCK_ELEMS = 1 << 25
CPU_TOKEN_BLOCK = 2048
CUDA_TOKEN_BLOCK = 16384


@dataclass(frozen=True)
class Options:
    """The loss's settings, as :func:`mlmix.torch.linear_cross_entropy` validated them."""

    ignore_index: int
    label_smoothing: float
    z_loss: float
    softcap: Optional[float]
    token_block: int
    vocab_block: int
    low_memory: bool = False


@dataclass(frozen=True)
class Backend:
    """The passes of one backend, as :class:`._loss_autograd.LinearCrossEntropyFunction` calls them.

    * ``lse_pass(h, weight, bias, labels, opts) -> (lse, target, logit_sum)``: per-token log-sum-exp, target
      logit and (with label smoothing, else None) sum of logits, in the accumulation dtype;
    * ``grad_pass(h, weight, bias, labels, lse, coef_p, coef_y, coef_u, opts, need) -> (grad_h, grad_w, grad_b)``:
      the gradients of ``sum_t g_t L_t`` given per-token coefficients (None where ``need`` says no);
    * ``one_pass(h, weight, bias, labels, g, opts, need) -> (lse, target, logit_sum, grad_h, grad_w, grad_b)``:
      both at once for a per-token gradient scale known in the forward, or None if the backend has no such mode.

    ``h`` is (N, H), ``weight`` (V, H), ``bias`` (V,) or None, ``labels`` (N,) int64 in [0, V): no ignored tokens.
    ``contiguous``: the backend hands raw pointers to kernels, so its inputs must be contiguous.
    """

    name: str
    lse_pass: Callable
    grad_pass: Callable
    one_pass: Optional[Callable] = None
    contiguous: bool = False


def acc_dtype(dtype):
    """The accumulation dtype for inputs of ``dtype``: float64 for float64, else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def block_sizes(n_tokens: int, vocab: int, device_type: str, token_block: int, vocab_block: int):
    """(token block, vocab block) of the two-pass scheme; ``token_block``/``vocab_block`` 0 = automatic."""
    elems = CUDA_BLOCK_ELEMS if device_type == "cuda" else CPU_BLOCK_ELEMS
    tb = token_block if token_block > 0 else max(1, min(n_tokens, CUDA_TOKEN_BLOCK if device_type == "cuda"
                                                         else CPU_TOKEN_BLOCK))
    vb = vocab_block if vocab_block > 0 else max(128, elems // max(tb, 1))
    if device_type == "cuda" and vocab_block <= 0:
        # the vocabulary block is the leading dimension of the logits and gradient tiles: a multiple of 256 keeps
        # every row 16-byte aligned, without which cuBLAS falls back to kernels several times slower (measured
        # on an H100: 2275 columns ran 5x slower than 2048)
        vb = max(256, vb // 256 * 256)
    return max(1, min(tb, n_tokens)), max(1, min(vb, vocab))


def lse_accumulators(n: int, acc, device, with_logit_sum: bool):
    """The running state of a log-sum-exp pass over ``n`` tokens: (running max, running sum of exponentials,
    target logit, sum of logits or None), zero-filled (the running max at -inf)."""
    run_max = torch.full((n,), -math.inf, dtype=acc, device=device)
    run_sum = torch.zeros(n, dtype=acc, device=device)
    target = torch.zeros(n, dtype=acc, device=device)
    logit_sum = torch.zeros(n, dtype=acc, device=device) if with_logit_sum else None
    return run_max, run_sum, target, logit_sum


_MM_OUT_DTYPE: Optional[bool] = None


def mm_f32(a, b):
    """a @ b with a float32 result (cuBLAS accumulates in float32 either way; this keeps the logits unrounded)."""
    global _MM_OUT_DTYPE
    if a.dtype == torch.float32:
        return torch.mm(a, b)
    if _MM_OUT_DTYPE is not False:
        try:
            out = torch.mm(a, b, out_dtype=torch.float32)
            _MM_OUT_DTYPE = True
            return out
        except (TypeError, RuntimeError, NotImplementedError):
            _MM_OUT_DTYPE = False
    return torch.mm(a, b)  # logits rounded to the input dtype, as a materialised loss would have them
