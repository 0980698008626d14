"""The CUDA backend of the fused linear cross-entropy (``impl="cuda"``): the orchestration around mlmix's kernels.

The GEMMs run on cuBLAS through torch (float32 results from half-precision inputs where torch allows it); between
them, ``lce_lse_block`` and ``lce_grad_block`` of the compiled extension (``csrc/cuda/lce.cu``, bound in
``csrc/bind_loss.cpp``) apply bias and softcap, run the online log-sum-exp and write the logit gradient, reading
and writing raw device pointers on the current stream. Python owns every allocation and every pointer offset:
the bindings cannot validate a pointer, so nothing but this module calls them.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Optional

from .._deps import require
from ._loss_common import DTYPE_CODE, Backend, Options, block_sizes, lse_accumulators, mm_f32

torch = require("torch", "mlmix.torch")


def stream_handle(device) -> int:
    """The current CUDA stream of ``device`` as an integer cudaStream_t, for the kernels."""
    return torch.cuda.current_stream(device).cuda_stream


def backend(kernels: Any, stream: Callable[[Any], int]) -> Backend:
    """The CUDA backend over ``kernels`` (the extension, or anything with its ``lce_*_block`` functions), with
    ``stream(device)`` giving the stream each pass runs on."""
    return Backend("cuda", functools.partial(lse_pass, kernels=kernels, stream=stream),
                   functools.partial(grad_pass, kernels=kernels, stream=stream), contiguous=True)


def lse_pass(h, weight, bias, labels, opts: Options, *, kernels, stream):
    """:meth:`Backend.lse_pass` with the kernels (float32 accumulators: 4-byte pointer offsets)."""
    n, _ = h.shape
    vocab = weight.shape[0]
    dev = h.device
    run_max, run_sum, target, logit_sum = lse_accumulators(n, torch.float32, dev, opts.label_smoothing > 0)
    tb, vb = block_sizes(n, vocab, dev.type, opts.token_block, opts.vocab_block)
    cap = opts.softcap
    handle = stream(dev)
    for t0 in range(0, n, tb):
        t1 = min(n, t0 + tb)
        hc = h[t0:t1]
        for v0 in range(0, vocab, vb):
            v1 = min(vocab, v0 + vb)
            z = mm_f32(hc, weight[v0:v1].t())
            kernels.lce_lse_block(
                z.data_ptr(), DTYPE_CODE[z.dtype], z.stride(0), t1 - t0, v1 - v0,
                0 if bias is None else bias.data_ptr(), DTYPE_CODE[h.dtype], v0,
                labels.data_ptr() + 8 * t0, float(cap or 0.0),
                run_max.data_ptr() + 4 * t0, run_sum.data_ptr() + 4 * t0, target.data_ptr() + 4 * t0,
                0 if logit_sum is None else logit_sum.data_ptr() + 4 * t0, handle,
            )
    return run_max + torch.log(run_sum), target, logit_sum


_ADDMM_OUT_DTYPE: Optional[bool] = None


def addmm_f32_(acc, a, b):
    """acc += a @ b for a float32 ``acc`` and half-precision a, b, accumulated inside cuBLAS (beta = 1).

    Falls back to a float32 product added afterwards (one (rows x cols) float32 temporary) where torch lacks the
    mixed-dtype addmm.
    """
    global _ADDMM_OUT_DTYPE
    if a.dtype == acc.dtype:
        acc.addmm_(a, b)
        return
    if _ADDMM_OUT_DTYPE is not False:
        try:
            torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)
            _ADDMM_OUT_DTYPE = True
            return
        except (TypeError, RuntimeError, NotImplementedError):
            _ADDMM_OUT_DTYPE = False
    acc.add_(mm_f32(a, b))


def grad_pass(h, weight, bias, labels, lse, coef_p, coef_y, coef_u, opts: Options, need, *, kernels, stream):
    """:meth:`Backend.grad_pass` with the kernels: grad_hidden and grad_bias in float32, grad_weight in the weight's
    dtype (one cuBLAS GEMM per block over all tokens when they fit one token block)."""
    dev = h.device
    n, hdim = h.shape
    vocab = weight.shape[0]
    f32 = torch.float32
    tb, vb = block_sizes(n, vocab, dev.type, opts.token_block, opts.vocab_block)
    grad_h = torch.zeros(n, hdim, dtype=f32, device=dev) if need[0] else None
    grad_b = torch.zeros(vocab, dtype=f32, device=dev) if need[2] else None
    cap = opts.softcap
    handle = stream(dev)
    single_chunk = tb >= n
    # with one token block, each grad_weight block is one GEMM over all tokens (float32 accumulation inside
    # cuBLAS) written once in the weight's dtype: no float32 (vocab x hidden) buffer is needed
    grad_w = torch.empty_like(weight) if need[1] else None
    w_acc = None
    for v0 in range(0, vocab, vb):
        v1 = min(vocab, v0 + vb)
        w_v = weight[v0:v1]
        if grad_w is not None and not single_chunk:
            w_acc = torch.zeros(v1 - v0, hdim, dtype=f32, device=dev)
        for t0 in range(0, n, tb):
            t1 = min(n, t0 + tb)
            hc = h[t0:t1]
            z = mm_f32(hc, w_v.t())
            dl = torch.empty(t1 - t0, v1 - v0, dtype=h.dtype, device=dev)
            kernels.lce_grad_block(
                z.data_ptr(), DTYPE_CODE[z.dtype], z.stride(0), t1 - t0, v1 - v0,
                0 if bias is None else bias.data_ptr(), DTYPE_CODE[h.dtype], v0,
                labels.data_ptr() + 8 * t0, float(cap or 0.0),
                lse.data_ptr() + 4 * t0, coef_p.data_ptr() + 4 * t0, coef_y.data_ptr() + 4 * t0,
                coef_u.data_ptr() + 4 * t0, dl.data_ptr(), DTYPE_CODE[dl.dtype], dl.stride(0), handle,
            )
            del z
            if grad_h is not None:
                addmm_f32_(grad_h[t0:t1], dl, w_v)
            if grad_w is not None:
                if single_chunk:
                    torch.mm(dl.t(), hc, out=grad_w[v0:v1])
                else:
                    addmm_f32_(w_acc, dl.t(), hc)
            if grad_b is not None:
                grad_b[v0:v1].add_(dl.sum(0, dtype=f32))
        if grad_w is not None and not single_chunk:
            grad_w[v0:v1].copy_(w_acc)
    return grad_h, grad_w, grad_b
