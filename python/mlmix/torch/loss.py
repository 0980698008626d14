"""Fused linear + cross-entropy: the loss of ``hidden @ weight.T + bias`` against labels, without the logits.

With a 150k-250k token vocabulary the logits tensor (tokens x vocab) dominates training memory. This module
computes the loss and its exact gradients block by block: a block of tokens against a block of vocabulary rows at
a time, so the only extra memory is one (token block x vocab block) buffer plus the gradients themselves.

Two passes over the vocabulary, split between autograd's forward and backward:

* forward: logits block by block -> online log-sum-exp (running max and sum of exponentials), target logit and
  (for label smoothing) the sum of logits; the per-token loss follows from these. Only ``lse`` (one float per
  token) is kept for the backward.
* backward: logits again -> ``d loss / d logits`` in place -> ``grad_hidden += dlogits @ W_v`` and
  ``grad_weight[v] += dlogits.T @ hidden``. The incoming gradient is folded into the per-token coefficients
  before the GEMMs, so ``reduction="none"`` costs the same as ``"mean"``.

That is four GEMMs of ``2 * tokens * hidden * vocab`` flops (one more than a materialised loss) in exchange for
memory that does not grow with the vocabulary. On the CPU, for "mean"/"sum" without softcap, the default is a
one-pass scheme instead: token chunks with full-vocabulary rows (a 256 MiB buffer), gradients computed in the
forward and scaled by the incoming scalar in the backward, three GEMMs (``low_memory=True`` selects the two-pass
scheme). Accumulation is in float32 (float64 for float64 inputs) whatever the input dtype.

Backends (``impl``): ``"cpu"`` runs the blocks with torch tensor ops (it also runs on any device, and is what
``"auto"`` uses on a GPU when mlmix was built without CUDA); ``"cuda"`` runs the per-block softmax, loss and
gradient in mlmix's fused CUDA kernels (``csrc/cuda/lce.cu``), with the GEMMs on cuBLAS through torch.
"""

from __future__ import annotations

import contextlib
import functools
import math
import types
from dataclasses import dataclass
from typing import Any, Optional

from .._deps import require

torch = require("torch", "mlmix.torch")

__all__ = ["linear_cross_entropy", "LinearCrossEntropy", "patch_causal_lm"]

_REDUCTIONS = ("mean", "sum", "none")
_IMPLS = ("auto", "cpu", "cuda")
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
# dtype codes shared with csrc/bind_loss.cpp
_DTYPE_CODE = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}

# Elements of one (token block x vocab block) logits buffer. 4M floats = 16 MiB keeps the GEMMs large enough
# to run at full speed on a CPU while staying small next to the float32 weight gradient. On a GPU the token block
# covers up to 16k tokens, so that each grad_weight block is one GEMM over all tokens written once (no float32
# vocab x hidden accumulator), and the buffer is 32M floats = 128 MiB (16k tokens x 2k vocabulary entries).
_CPU_BLOCK_ELEMS = 1 << 22
_CUDA_BLOCK_ELEMS = 1 << 25
_CPU_TOKEN_BLOCK = 2048
_CUDA_TOKEN_BLOCK = 16384


@dataclass(frozen=True)
class _Options:
    ignore_index: int
    label_smoothing: float
    z_loss: float
    softcap: Optional[float]
    token_block: int
    vocab_block: int
    low_memory: bool = False


# --------------------------------------------------------------------------------------------------------------
# backend selection


@functools.lru_cache(maxsize=None)
def _cuda_kernels() -> Any:
    """The compiled extension if it carries the CUDA kernels, else None."""
    try:
        from .._core_loader import core
    except ImportError:
        return None
    if "cuda" not in core.BUILD_INFO.get("backends", ()) or not hasattr(core, "lce_lse_block"):
        return None
    return core


def _stream_handle(device) -> int:
    """The current CUDA stream of ``device`` as an integer cudaStream_t, for the kernels."""
    return torch.cuda.current_stream(device).cuda_stream


def _resolve_impl(impl: str, device: "torch.device", dtype) -> str:
    if impl not in _IMPLS:
        raise ValueError(f"impl must be one of {_IMPLS}, got {impl!r}")
    if impl == "cuda" and dtype not in _DTYPE_CODE:
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
        if _cuda_kernels() is None:
            raise RuntimeError(
                "impl='cuda' was requested but this mlmix build has no CUDA kernels "
                "(mlmix.build_info()['backends'] lacks 'cuda'); reinstall with a CUDA toolkit or use impl='auto'"
            )
        return "cuda"
    # auto: the fused kernels when they apply, else the blockwise torch path on whatever device the tensors are
    if device.type == "cuda" and dtype in _DTYPE_CODE and _cuda_kernels() is not None:
        return "cuda"
    return "cpu"


# --------------------------------------------------------------------------------------------------------------
# input checks


def _check_inputs(hidden, weight, labels, bias, token_weights, reduction, label_smoothing, z_loss, softcap):
    for name, t in (("hidden", hidden), ("weight", weight), ("labels", labels)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")
    if hidden.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"hidden must be a floating tensor (float16/bfloat16/float32/float64), got {hidden.dtype}")
    if weight.dtype != hidden.dtype:
        raise ValueError(f"weight.dtype must equal hidden.dtype ({hidden.dtype}), got {weight.dtype}")
    if hidden.dim() not in (2, 3):
        raise ValueError(
            f"hidden must be (tokens, hidden) or (batch, seq, hidden), got shape {tuple(hidden.shape)}"
        )
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[-1]:
        raise ValueError(
            f"weight must be (vocab, hidden={hidden.shape[-1]}), got shape {tuple(weight.shape)}"
        )
    if weight.shape[0] == 0:
        raise ValueError("weight must have at least one row (vocab >= 1), got shape (0, ...)")
    if labels.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8, torch.int8):
        raise ValueError(f"labels must be an integer tensor, got {labels.dtype}")
    if tuple(labels.shape) != tuple(hidden.shape[:-1]):
        raise ValueError(
            f"labels must have shape hidden.shape[:-1] = {tuple(hidden.shape[:-1])}, got {tuple(labels.shape)}"
        )
    devices = {("hidden", hidden.device), ("weight", weight.device), ("labels", labels.device)}
    if bias is not None:
        if not isinstance(bias, torch.Tensor):
            raise TypeError(f"bias must be a torch.Tensor or None, got {type(bias).__name__}")
        if bias.dtype != hidden.dtype:
            raise ValueError(f"bias.dtype must equal hidden.dtype ({hidden.dtype}), got {bias.dtype}")
        if tuple(bias.shape) != (weight.shape[0],):
            raise ValueError(f"bias must have shape (vocab,) = ({weight.shape[0]},), got {tuple(bias.shape)}")
        devices.add(("bias", bias.device))
    if token_weights is not None:
        if not isinstance(token_weights, torch.Tensor):
            raise TypeError(f"token_weights must be a torch.Tensor or None, got {type(token_weights).__name__}")
        if not token_weights.is_floating_point():
            raise ValueError(f"token_weights must be a floating tensor, got {token_weights.dtype}")
        if tuple(token_weights.shape) != tuple(labels.shape):
            raise ValueError(
                f"token_weights must have the shape of labels {tuple(labels.shape)}, got {tuple(token_weights.shape)}"
            )
        devices.add(("token_weights", token_weights.device))
    if len({d for _, d in devices}) > 1:
        listed = ", ".join(f"{n} on {d}" for n, d in sorted(devices, key=lambda x: x[0]))
        raise ValueError(f"all tensors must be on the same device, got {listed}")
    if not (isinstance(label_smoothing, (int, float)) and 0.0 <= label_smoothing <= 1.0):
        raise ValueError(f"label_smoothing must be a float in [0, 1], got {label_smoothing!r}")
    if not (isinstance(z_loss, (int, float)) and math.isfinite(z_loss) and z_loss >= 0.0):
        raise ValueError(f"z_loss must be a finite float >= 0, got {z_loss!r}")
    if softcap is not None and not (isinstance(softcap, (int, float)) and math.isfinite(softcap) and softcap > 0):
        raise ValueError(f"softcap must be None or a finite float > 0, got {softcap!r}")


def _check_label_range(labels, valid, vocab: int, ignore_index: int) -> None:
    bad = valid & ((labels < 0) | (labels >= vocab))
    if bool(bad.any()):
        first = int(labels[bad][0])
        raise ValueError(
            f"labels must lie in [0, {vocab}) or equal ignore_index={ignore_index}, got label {first}"
        )


# --------------------------------------------------------------------------------------------------------------
# the two passes


def _acc_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _block_sizes(n_tokens: int, vocab: int, device_type: str, token_block: int, vocab_block: int):
    elems = _CUDA_BLOCK_ELEMS if device_type == "cuda" else _CPU_BLOCK_ELEMS
    tb = token_block if token_block > 0 else max(1, min(n_tokens, _CUDA_TOKEN_BLOCK if device_type == "cuda"
                                                          else _CPU_TOKEN_BLOCK))
    vb = vocab_block if vocab_block > 0 else max(128, elems // max(tb, 1))
    if device_type == "cuda" and vocab_block <= 0:
        # the vocabulary block is the leading dimension of the logits and gradient tiles: a multiple of 256 keeps
        # every row 16-byte aligned, without which cuBLAS falls back to kernels several times slower (measured
        # on an H100: 2275 columns ran 5x slower than 2048)
        vb = max(256, vb // 256 * 256)
    return max(1, min(tb, n_tokens)), max(1, min(vb, vocab))


def _lse_pass(h, weight, bias, labels, opts: _Options, backend: str):
    """Per-token log-sum-exp, target logit and (if smoothing) sum of logits, all in the accumulation dtype.

    h: (N, H); weight: (V, H); bias: (V,) or None; labels: (N,) int64 in [0, V). Returns three (N,) tensors
    (the third is None without label smoothing).
    """
    n, _ = h.shape
    vocab = weight.shape[0]
    acc = _acc_dtype(h.dtype)
    dev = h.device
    run_max = torch.full((n,), -math.inf, dtype=acc, device=dev)
    run_sum = torch.zeros(n, dtype=acc, device=dev)
    target = torch.zeros(n, dtype=acc, device=dev)
    logit_sum = torch.zeros(n, dtype=acc, device=dev) if opts.label_smoothing > 0 else None
    tb, vb = _block_sizes(n, vocab, dev.type, opts.token_block, opts.vocab_block)
    cap = opts.softcap

    if backend == "cuda":
        core = _cuda_kernels()
        stream = _stream_handle(dev)
        for t0 in range(0, n, tb):
            t1 = min(n, t0 + tb)
            hc = h[t0:t1]
            for v0 in range(0, vocab, vb):
                v1 = min(vocab, v0 + vb)
                z = _mm_f32(hc, weight[v0:v1].t())
                core.lce_lse_block(
                    z.data_ptr(), _DTYPE_CODE[z.dtype], z.stride(0), t1 - t0, v1 - v0,
                    0 if bias is None else bias.data_ptr(), _DTYPE_CODE[h.dtype], v0,
                    labels.data_ptr() + 8 * t0, float(cap or 0.0),
                    run_max.data_ptr() + 4 * t0, run_sum.data_ptr() + 4 * t0, target.data_ptr() + 4 * t0,
                    0 if logit_sum is None else logit_sum.data_ptr() + 4 * t0, stream,
                )
        return run_max + torch.log(run_sum), target, logit_sum

    buf = torch.empty(tb * vb, dtype=acc, device=dev)
    for t0 in range(0, n, tb):
        t1 = min(n, t0 + tb)
        hc = h[t0:t1].to(acc)
        yc = labels[t0:t1]
        m_c, s_c, tgt_c = run_max[t0:t1], run_sum[t0:t1], target[t0:t1]
        for v0 in range(0, vocab, vb):
            v1 = min(vocab, v0 + vb)
            z = _logits_block(buf, hc, weight, bias, v0, v1, acc)
            if cap is not None:
                z.div_(cap).tanh_().mul_(cap)
            in_block = (yc >= v0) & (yc < v1)
            picked = z.gather(1, (yc - v0).clamp_(0, v1 - v0 - 1).unsqueeze(1)).squeeze(1)
            tgt_c.add_(torch.where(in_block, picked, torch.zeros_like(picked)))
            if logit_sum is not None:
                logit_sum[t0:t1].add_(z.sum(1))
            new_max = torch.maximum(m_c, z.amax(1))
            # rows whose running max is still -inf (nothing seen yet) contribute exp(-inf) = 0, not NaN
            rescale = torch.exp(torch.where(torch.isneginf(m_c), m_c, m_c - new_max))
            s_c.mul_(rescale).add_(z.sub_(new_max.unsqueeze(1)).exp_().sum(1))
            m_c.copy_(new_max)
    return run_max + torch.log(run_sum), target, logit_sum


def _grad_pass(h, weight, bias, labels, lse, coef_p, coef_y, coef_u, opts: _Options, backend: str, need):
    """Gradients of sum_t L_t * g_t given per-token coefficients.

    d L_t / d s_tv = coef_p[t] * softmax_v - coef_y[t] * [v == y_t] - coef_u[t], with s the (soft-capped)
    logits; coef_p = g (1 + 2 z lse), coef_y = g (1 - eps), coef_u = g eps / V. ``need`` = (hidden, weight,
    bias) flags. Returns (grad_h, grad_w, grad_b) in the accumulation dtype (None where not needed).
    """
    n, hdim = h.shape
    vocab = weight.shape[0]
    acc = _acc_dtype(h.dtype)
    dev = h.device
    cap = opts.softcap
    tb, vb = _block_sizes(n, vocab, dev.type, opts.token_block, opts.vocab_block)
    grad_h = torch.zeros(n, hdim, dtype=acc, device=dev) if need[0] else None
    grad_b = torch.zeros(vocab, dtype=acc, device=dev) if need[2] else None

    if backend == "cuda":
        return _grad_pass_cuda(h, weight, bias, labels, lse, coef_p, coef_y, coef_u, cap, tb, vb, need,
                               grad_h, grad_b)

    single_chunk = tb >= n
    # with one token block every grad_weight row block is written exactly once: no zero fill needed
    grad_w = (torch.empty if single_chunk else torch.zeros)(vocab, hdim, dtype=acc, device=dev) if need[1] else None
    buf = torch.empty(tb * vb, dtype=acc, device=dev)
    # coef_p * exp(s - lse) = exp(s - (lse - log coef_p)) saves a pass over the block when no coefficient is
    # negative (a zero coefficient gives log 0 = -inf and exp(-inf) = 0, as it should)
    fold = bool((coef_p >= 0).all())
    shift = lse - torch.log(coef_p) if fold else lse
    tanh_buf = torch.empty(tb * vb, dtype=acc, device=dev) if cap is not None else None
    hc_all = h.to(acc) if single_chunk else None
    # vocabulary outer, tokens inner: each block of grad_weight is finished while it is hot in cache
    for v0 in range(0, vocab, vb):
        v1 = min(vocab, v0 + vb)
        w_v = weight[v0:v1].to(acc)
        for t0 in range(0, n, tb):
            t1 = min(n, t0 + tb)
            hc = hc_all if single_chunk else h[t0:t1].to(acc)
            yc = labels[t0:t1]
            z = _logits_block(buf, hc, weight, bias, v0, v1, acc, w_v)
            if cap is not None:
                th = tanh_buf[: z.numel()].view_as(z)
                torch.tanh(z.div_(cap), out=th)
                z.copy_(th).mul_(cap)
            # softmax, scaled per token, in place
            z.sub_(shift[t0:t1].unsqueeze(1)).exp_()
            if not fold:
                z.mul_(coef_p[t0:t1].unsqueeze(1))
            if opts.label_smoothing > 0:
                z.sub_(coef_u[t0:t1].unsqueeze(1))
            rows = torch.nonzero((yc >= v0) & (yc < v1)).squeeze(1)
            if rows.numel():
                z.index_put_((rows, yc[rows] - v0), -coef_y[t0:t1][rows], accumulate=True)
            if cap is not None:
                z.mul_(th.mul_(th).neg_().add_(1.0))  # d cap*tanh(x/cap) / dx = 1 - tanh^2
            if grad_h is not None:
                grad_h[t0:t1].addmm_(z, w_v)
            if grad_w is not None:
                if single_chunk:
                    torch.mm(z.t(), hc, out=grad_w[v0:v1])
                else:
                    grad_w[v0:v1].addmm_(z.t(), hc)
            if grad_b is not None:
                grad_b[v0:v1].add_(z.sum(0))
    return grad_h, grad_w, grad_b


def _logits_block(buf, hc, weight, bias, v0, v1, acc, w_v=None):
    """hc @ weight[v0:v1].T (+ bias) into the front of ``buf``, as a contiguous (rows, v1 - v0) view."""
    w_v = weight[v0:v1].to(acc) if w_v is None else w_v
    z = buf[: hc.shape[0] * (v1 - v0)].view(hc.shape[0], v1 - v0)
    if bias is None:
        torch.mm(hc, w_v.t(), out=z)
    else:
        torch.addmm(bias[v0:v1].to(acc), hc, w_v.t(), out=z)
    return z


_MM_OUT_DTYPE: Optional[bool] = None
_ADDMM_OUT_DTYPE: Optional[bool] = None


def _mm_f32(a, b):
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


def _addmm_f32_(acc, a, b):
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
    acc.add_(_mm_f32(a, b))


def _grad_pass_cuda(h, weight, bias, labels, lse, coef_p, coef_y, coef_u, cap, tb, vb, need, grad_h, grad_b):
    core = _cuda_kernels()
    dev = h.device
    n, hdim = h.shape
    vocab = weight.shape[0]
    stream = _stream_handle(dev)
    f32 = torch.float32
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
            z = _mm_f32(hc, w_v.t())
            dl = torch.empty(t1 - t0, v1 - v0, dtype=h.dtype, device=dev)
            core.lce_grad_block(
                z.data_ptr(), _DTYPE_CODE[z.dtype], z.stride(0), t1 - t0, v1 - v0,
                0 if bias is None else bias.data_ptr(), _DTYPE_CODE[h.dtype], v0,
                labels.data_ptr() + 8 * t0, float(cap or 0.0),
                lse.data_ptr() + 4 * t0, coef_p.data_ptr() + 4 * t0, coef_y.data_ptr() + 4 * t0,
                coef_u.data_ptr() + 4 * t0, dl.data_ptr(), _DTYPE_CODE[dl.dtype], dl.stride(0), stream,
            )
            del z
            if grad_h is not None:
                _addmm_f32_(grad_h[t0:t1], dl, w_v)
            if grad_w is not None:
                if single_chunk:
                    torch.mm(dl.t(), hc, out=grad_w[v0:v1])
                else:
                    _addmm_f32_(w_acc, dl.t(), hc)
            if grad_b is not None:
                grad_b[v0:v1].add_(dl.sum(0, dtype=f32))
        if grad_w is not None and not single_chunk:
            grad_w[v0:v1].copy_(w_acc)
    return grad_h, grad_w, grad_b


# Elements of the (token chunk x full vocabulary) buffer of the one-pass CPU mode: 64M floats = 256 MiB, i.e.
# about 270 tokens per chunk at a 248k vocabulary.
_ONE_PASS_ELEMS = 1 << 26


def _one_pass(h, weight, bias, labels, g, opts: _Options, need):
    """Loss terms and gradients together, in token chunks with full-vocabulary rows: three GEMMs, not four.

    Used on the CPU for scalar reductions, where the per-token gradient scale ``g`` (token weight / mean
    denominator) is known in the forward and only the scalar incoming gradient is left for the backward.
    Returns (lse, target, logit_sum, grad_h, grad_w, grad_b), all in the accumulation dtype.
    """
    n, hdim = h.shape
    vocab = weight.shape[0]
    acc = _acc_dtype(h.dtype)
    dev = h.device
    eps, z = opts.label_smoothing, opts.z_loss
    tb = opts.token_block if opts.token_block > 0 else max(1, _ONE_PASS_ELEMS // vocab)
    tb = max(1, min(tb, n))
    w_acc = weight.to(acc)
    b_acc = None if bias is None else bias.to(acc)
    lse = torch.empty(n, dtype=acc, device=dev)
    target = torch.empty(n, dtype=acc, device=dev)
    logit_sum = torch.empty(n, dtype=acc, device=dev) if eps > 0 else None
    grad_h = torch.empty(n, hdim, dtype=acc, device=dev) if need[0] else None
    grad_w = torch.empty(vocab, hdim, dtype=acc, device=dev) if need[1] else None
    grad_b = torch.zeros(vocab, dtype=acc, device=dev) if need[2] else None
    buf = torch.empty(tb * vocab, dtype=acc, device=dev)
    for t0 in range(0, n, tb):
        t1 = min(n, t0 + tb)
        hc = h[t0:t1].to(acc)
        yc = labels[t0:t1]
        zc = buf[: (t1 - t0) * vocab].view(t1 - t0, vocab)
        if b_acc is None:
            torch.mm(hc, w_acc.t(), out=zc)
        else:
            torch.addmm(b_acc, hc, w_acc.t(), out=zc)
        target[t0:t1] = zc.gather(1, yc.unsqueeze(1)).squeeze(1)
        if logit_sum is not None:
            torch.sum(zc, 1, out=logit_sum[t0:t1])
        row_max = zc.amax(1)
        sumexp = zc.sub_(row_max.unsqueeze(1)).exp_().sum(1)  # zc now holds exp(x - max)
        lse_c = row_max.add_(sumexp.log())
        lse[t0:t1] = lse_c
        # softmax * g (1 + 2 z lse) = exp(x - max) * [g (1 + 2 z lse) / sumexp]
        zc.mul_((g[t0:t1] * (1.0 + 2.0 * z * lse_c) / sumexp).unsqueeze(1))
        if eps > 0:
            zc.sub_((g[t0:t1] * (eps / vocab)).unsqueeze(1))
        rows = torch.arange(t1 - t0, device=dev)
        zc.index_put_((rows, yc), -(g[t0:t1] * (1.0 - eps)), accumulate=True)
        if grad_h is not None:
            torch.mm(zc, w_acc, out=grad_h[t0:t1])
        if grad_w is not None:
            if t0 == 0:
                torch.mm(zc.t(), hc, out=grad_w)
            else:
                grad_w.addmm_(zc.t(), hc)
        if grad_b is not None:
            grad_b.add_(zc.sum(0))
    return lse, target, logit_sum, grad_h, grad_w, grad_b


# --------------------------------------------------------------------------------------------------------------
# autograd


class _LinearCrossEntropyFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, weight, bias, labels, token_weights, opts: _Options, reduction: str, backend: str):
        n = h.shape[0]
        vocab = weight.shape[0]
        acc = _acc_dtype(h.dtype)
        valid = labels != opts.ignore_index
        _check_label_range(labels, valid, vocab, opts.ignore_index)
        if token_weights is not None:
            tw = token_weights.to(acc)
            if not bool(torch.isfinite(tw).all()) or bool((tw < 0).any()):
                raise ValueError("token_weights must be finite and >= 0")
        n_valid = int(valid.sum())
        all_valid = n_valid == n
        # ignored tokens (prompts in instruction tuning) are dropped before any GEMM
        idx = None if all_valid else torch.nonzero(valid).squeeze(1)
        h_v = h if all_valid else h.index_select(0, idx)
        y_v = labels if all_valid else labels.index_select(0, idx)
        w_v = None if token_weights is None else (tw if all_valid else tw.index_select(0, idx))
        if backend == "cuda":
            h_v, weight_c = h_v.contiguous(), weight.contiguous()
            bias_c = None if bias is None else bias.contiguous()
            y_v = y_v.contiguous()
        else:
            weight_c, bias_c = weight, bias

        denom = float(w_v.sum()) if w_v is not None else float(n_valid)
        need = tuple(ctx.needs_input_grad[:3])
        one_pass = (backend == "cpu" and not opts.low_memory and reduction != "none" and opts.softcap is None
                    and any(need) and n_valid > 0)
        ctx.grads = None
        if one_pass:
            # per-token gradient scale without the incoming (scalar) gradient, applied in the backward
            g = torch.ones(n_valid, dtype=acc, device=h.device) if w_v is None else w_v.clone()
            if reduction == "mean":
                g.mul_(1.0 / denom if denom > 0 else 0.0)
            lse, target, logit_sum, *ctx.grads = _one_pass(h_v, weight_c, bias_c, y_v, g, opts, need)
        elif n_valid:
            lse, target, logit_sum = _lse_pass(h_v, weight_c, bias_c, y_v, opts, backend)
        if n_valid:
            eps = opts.label_smoothing
            loss_v = lse - (1.0 - eps) * target
            if eps > 0:
                loss_v = loss_v - (eps / vocab) * logit_sum
            if opts.z_loss > 0:
                loss_v = loss_v + opts.z_loss * lse * lse
        else:
            lse = loss_v = torch.zeros(0, dtype=acc, device=h.device)
        if w_v is not None:
            loss_v = loss_v * w_v

        if reduction == "none":
            if all_valid:
                out = loss_v
            else:
                out = torch.zeros(n, dtype=acc, device=h.device).index_copy_(0, idx, loss_v)
        elif reduction == "sum":
            out = loss_v.sum()
        else:
            out = loss_v.sum() / denom if denom > 0 else loss_v.sum() * 0.0
        if all_valid:
            lse_full = lse.to(torch.float32)
        else:
            lse_full = torch.zeros(n, dtype=torch.float32, device=h.device).index_copy_(0, idx, lse.to(torch.float32))

        ctx.save_for_backward(h_v, weight_c, bias_c, y_v, w_v, lse, idx)
        ctx.opts, ctx.reduction, ctx.backend = opts, reduction, backend
        ctx.denom, ctx.n, ctx.h_dtype = denom, n, h.dtype
        ctx.mark_non_differentiable(lse_full)
        return out, lse_full

    @staticmethod
    def backward(ctx, grad_out, _grad_lse):
        h_v, weight, bias, y_v, w_v, lse, idx = ctx.saved_tensors
        need_h, need_w, need_b = ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[2]
        opts = ctx.opts
        acc = lse.dtype
        vocab = weight.shape[0]

        if ctx.grads is not None:
            return _LinearCrossEntropyFunction._scaled_stored_grads(ctx, grad_out, h_v, weight, bias, idx)
        # per-token incoming gradient g_t (including the reduction's scale and the token weight)
        if ctx.reduction == "none":
            g = grad_out.to(acc) if idx is None else grad_out.to(acc).index_select(0, idx)
        else:
            scale = grad_out.to(acc)
            if ctx.reduction == "mean":
                scale = scale / ctx.denom if ctx.denom > 0 else scale * 0.0
            g = scale.expand(lse.shape[0])
        if w_v is not None:
            g = g * w_v
        g = g.contiguous()
        eps = opts.label_smoothing
        coef_p = (g * (1.0 + 2.0 * opts.z_loss * lse)).contiguous()
        coef_y = (g * (1.0 - eps)).contiguous()
        coef_u = (g * (eps / vocab)).contiguous()

        grad_h_v = grad_w = grad_b = None
        if lse.shape[0]:
            grad_h_v, grad_w, grad_b = _grad_pass(
                h_v, weight, bias, y_v, lse, coef_p, coef_y, coef_u, opts, ctx.backend, (need_h, need_w, need_b)
            )
        return _LinearCrossEntropyFunction._finish(ctx, grad_h_v, grad_w, grad_b, h_v, weight, bias, idx)

    @staticmethod
    def _scaled_stored_grads(ctx, grad_out, h_v, weight, bias, idx):
        """One-pass mode: the gradients were computed in the forward for an incoming gradient of 1."""
        # handed out once (autograd may keep them as .grad); a second backward recomputes them instead
        grads, ctx.grads = ctx.grads, None
        scale = grad_out.to(next(t.dtype for t in grads if t is not None))
        if not bool(scale == 1):
            grads = [None if t is None else t.mul_(scale) for t in grads]
        return _LinearCrossEntropyFunction._finish(ctx, *grads, h_v, weight, bias, idx)

    @staticmethod
    def _finish(ctx, grad_h_v, grad_w, grad_b, h_v, weight, bias, idx):
        """Cast to the input dtypes, scatter grad_hidden back to all tokens; autograd's return tuple."""
        need_h, need_w, need_b = ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[2]
        n, dev = ctx.n, h_v.device
        grad_h = grad_weight = grad_bias = None
        if need_h:
            if idx is None and grad_h_v is not None:
                grad_h = grad_h_v.to(ctx.h_dtype)
            else:
                grad_h = torch.zeros(n, h_v.shape[1], dtype=ctx.h_dtype, device=dev)
                if grad_h_v is not None:
                    # converted in row chunks: no second full-size copy next to the float32 accumulator
                    step = max(1, (1 << 24) // max(1, h_v.shape[1]))
                    for r0 in range(0, grad_h_v.shape[0], step):
                        r1 = min(grad_h_v.shape[0], r0 + step)
                        grad_h.index_copy_(0, idx[r0:r1], grad_h_v[r0:r1].to(ctx.h_dtype))
        if need_w:
            grad_weight = torch.zeros_like(weight) if grad_w is None else grad_w.to(weight.dtype)
        if need_b:
            grad_bias = torch.zeros_like(bias) if grad_b is None else grad_b.to(bias.dtype)
        return grad_h, grad_weight, grad_bias, None, None, None, None, None


# --------------------------------------------------------------------------------------------------------------
# public API


def linear_cross_entropy(
    hidden: "torch.Tensor",
    weight: "torch.Tensor",
    labels: "torch.Tensor",
    *,
    bias: Optional["torch.Tensor"] = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    softcap: Optional[float] = None,
    token_weights: Optional["torch.Tensor"] = None,
    shift: bool = False,
    return_lse: bool = False,
    impl: str = "auto",
    token_block: int = 0,
    vocab_block: int = 0,
    low_memory: bool = False,
):
    """Cross-entropy of ``hidden @ weight.T + bias`` against ``labels`` without materialising the logits.

    Args:
        hidden: (tokens, H) or (batch, seq, H), float16/bfloat16/float32/float64.
        weight: (V, H), same dtype and device (e.g. ``lm_head.weight``).
        labels: integer tensor of shape ``hidden.shape[:-1]``; values in [0, V) or ``ignore_index``.
        bias: optional (V,) bias of the output projection.
        ignore_index: label value whose positions contribute no loss and no gradient.
        reduction: ``"mean"`` (sum of weighted per-token losses / sum of the weights of non-ignored tokens;
            with no ``token_weights`` the mean over non-ignored tokens, as ``F.cross_entropy``), ``"sum"``, or
            ``"none"`` (per-token losses times their weights, shape ``labels.shape``, 0 at ignored positions).
            When every label is ignored, ``"mean"`` gives 0 (not NaN) and all gradients are zero.
        label_smoothing: eps in [0, 1], defined as in ``F.cross_entropy``:
            ``(1 - eps) * CE(target) + eps * mean_v CE(v)``.
        z_loss: coefficient of the auxiliary ``z_loss * lse**2`` term added to each token's loss (lse is the
            log-sum-exp of that token's logits).
        softcap: if set, the logits become ``softcap * tanh(logits / softcap)`` before the softmax (Gemma 2).
        token_weights: optional non-negative float weights of shape ``labels.shape`` (e.g. to weight languages);
            each token's loss is multiplied by its weight.
        shift: if True, ``labels`` are aligned with the inputs (Hugging Face style): position i is scored
            against ``labels[..., i + 1]`` and the last position of each sequence is ignored.
            ``token_weights`` are shifted the same way.
        return_lse: if True, also return the per-token log-sum-exp (float32, shape ``labels.shape``, 0 at ignored
            positions; not differentiable).
        impl: ``"auto"`` (fused CUDA kernels for CUDA tensors when compiled in, else the blockwise torch path),
            ``"cuda"`` or ``"cpu"``; an explicitly requested backend that is unavailable raises.
        token_block, vocab_block: block sizes (0 = automatic); they trade memory for GEMM efficiency.
        low_memory: the CPU backend with a scalar reduction, no softcap and gradients required computes the
            gradients during the forward, in token chunks with full-vocabulary rows (three GEMMs; one
            (chunk x vocab) float32 buffer of up to 256 MiB; the backward only scales them). ``low_memory=True``
            keeps the two-pass scheme instead: logits recomputed in the backward (four GEMMs), one 16 MiB block
            buffer. The CUDA backend and ``reduction="none"`` always use the two-pass scheme.

    Returns:
        The loss (scalar for "mean"/"sum", ``labels.shape`` for "none") in float32 (float64 for float64 inputs),
        whatever the dtype of ``hidden``: it is accumulated in float32 and not rounded back to bfloat16/float16,
        as transformers' causal LMs (which upcast the logits), Liger and cut-cross-entropy also return it; with
        ``return_lse`` a tuple ``(loss, lse)``.

    Non-finite hidden states or weights give NaN losses (and gradients) for the tokens they touch, as the
    materialised reference does; nothing is raised. Labels out of range raise ``ValueError``.
    """
    _check_inputs(hidden, weight, labels, bias, token_weights, reduction, label_smoothing, z_loss, softcap)
    if not isinstance(ignore_index, int):
        raise TypeError(f"ignore_index must be an int, got {ignore_index!r}")
    for name, val in (("token_block", token_block), ("vocab_block", vocab_block)):
        if not isinstance(val, int) or val < 0:
            raise ValueError(f"{name} must be an int >= 0 (0 = automatic), got {val!r}")
    backend = _resolve_impl(impl, hidden.device, hidden.dtype)
    lead = tuple(labels.shape)
    labels = labels.to(torch.int64)
    if shift:
        pad = torch.full(lead[:-1] + (1,), ignore_index, dtype=torch.int64, device=labels.device)
        labels = torch.cat([labels[..., 1:], pad], dim=-1)
        if token_weights is not None:
            token_weights = torch.cat([token_weights[..., 1:], torch.zeros_like(token_weights[..., :1])], dim=-1)
    h2 = hidden.reshape(-1, hidden.shape[-1])
    y = labels.reshape(-1)
    tw = None if token_weights is None else token_weights.reshape(-1)
    opts = _Options(ignore_index, float(label_smoothing), float(z_loss),
                    None if softcap is None else float(softcap), token_block, vocab_block, bool(low_memory))
    loss, lse = _LinearCrossEntropyFunction.apply(h2, weight, bias, y, tw, opts, reduction, backend)
    if reduction == "none":
        loss = loss.view(lead)
    if return_lse:
        return loss, lse.view(lead)
    return loss


class LinearCrossEntropy(torch.nn.Module):
    """``nn.Module`` form of :func:`linear_cross_entropy`; options are fixed at construction.

    ``forward(hidden, weight, labels, bias=None, token_weights=None)`` takes the same tensors as the function.
    """

    def __init__(self, *, ignore_index: int = -100, reduction: str = "mean", label_smoothing: float = 0.0,
                 z_loss: float = 0.0, softcap: Optional[float] = None, shift: bool = False,
                 return_lse: bool = False, impl: str = "auto", low_memory: bool = False):
        super().__init__()
        if reduction not in _REDUCTIONS:
            raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")
        if impl not in _IMPLS:
            raise ValueError(f"impl must be one of {_IMPLS}, got {impl!r}")
        self.kwargs = dict(ignore_index=ignore_index, reduction=reduction, label_smoothing=label_smoothing,
                           z_loss=z_loss, softcap=softcap, shift=shift, return_lse=return_lse, impl=impl,
                           low_memory=low_memory)

    def forward(self, hidden, weight, labels, bias=None, token_weights=None):
        return linear_cross_entropy(hidden, weight, labels, bias=bias, token_weights=token_weights, **self.kwargs)

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.kwargs.items())


# --------------------------------------------------------------------------------------------------------------
# transformers / TRL integration

# the per-token fields of TRL's FusedCausalLMOutput besides log_probs, in TRL's order
_TOKEN_STATS = ("entropy", "log_sum_sq_probs", "mean_logits", "is_top1")
# keyword that carries a fused-head request past a forward wrapped over the mlmix one (see _fused_lm_head_pre_hook)
_FUSED_KWARG = "_mlmix_fused_lm_head"


@dataclass(frozen=True)
class _PatchOptions:
    impl: str
    z_loss: float
    label_smoothing: float
    eval_logits: bool


@dataclass(frozen=True)
class _FusedHead:
    """What a ``fused_lm_head=True`` call asks for: TRL's ``add_fused_lm_head`` settings, or these defaults."""

    temperature: float = 1.0
    outputs: tuple = ("log_probs",) + _TOKEN_STATS
    cast_lm_head_to_fp32: bool = False


def _trl_fused_head(model) -> Optional[_FusedHead]:
    """The settings of TRL's ``add_fused_lm_head`` wrapper in ``model.forward``'s chain, or None if there is none.

    TRL binds its settings (temperature, requested outputs, fp32 head) in the closure of the forward it installs;
    they are read from there whether that forward wraps the mlmix one (patched before the trainer was built) or
    is wrapped by it (patched after), also under accelerate's mixed-precision wrapper.
    """
    todo = [model.__dict__.get("forward"), model.__dict__.get("_mlmix_original_forward")]
    seen = set()
    while todo and len(seen) < 64:
        fn = todo.pop()
        if fn is None or id(fn) in seen or isinstance(fn, torch.nn.Module):
            continue
        seen.add(id(fn))
        func = getattr(fn, "__func__", fn)
        code = getattr(func, "__code__", None)
        cells = {}
        if code is not None:
            for name, cell in zip(code.co_freevars, func.__closure__ or ()):
                try:
                    cells[name] = cell.cell_contents
                except ValueError:  # an unset cell
                    pass
        # functools.wraps gives TRL's forward the model's __module__; its globals name the defining module
        module_name = str(getattr(func, "__globals__", {}).get("__name__", ""))
        if code is not None and code.co_name == "_fused_forward" and module_name.startswith("trl."):
            try:
                temperature = float(cells["temperature"])
                outputs = tuple(cells["outputs"])
                cast = bool(cells["cast_lm_head_to_fp32"])
            except (KeyError, TypeError, ValueError):
                import trl

                raise RuntimeError(
                    f"patch_causal_lm cannot read the settings of the fused LM head of TRL {trl.__version__} "
                    f"(closure variables {sorted(cells)}); mlmix supports TRL's add_fused_lm_head of TRL 1.x"
                ) from None
            return _FusedHead(temperature, outputs, cast)
        todo.extend(getattr(fn, name, None) for name in ("__func__", "__wrapped__", "model_forward"))
        todo.extend(v for v in cells.values() if callable(v))
    return None


def _logit_scale(text_config) -> float:
    """The factor a model applies to its logits before the softcap, read from its config as TRL reads it."""
    scale = getattr(text_config, "logit_scale", None)  # Cohere
    if scale is None:
        scale = getattr(text_config, "output_multiplier", None)
    if scale is None:
        scale = getattr(text_config, "lm_head_multiplier", None)  # Falcon-H1
    if scale is None and getattr(text_config, "logits_scaling", None) is not None:
        # Granite and MiniCPM3 divide by logits_scaling, HyperCLOVA X multiplies
        scaling = text_config.logits_scaling
        scale = scaling if getattr(text_config, "model_type", None) == "hyperclovax" else 1 / scaling
    scale = 1.0 if scale is None else float(scale)
    if not (math.isfinite(scale) and scale != 0.0):
        raise ValueError(f"patch_causal_lm needs a finite non-zero logit scale, the model config gives {scale!r}")
    return scale


def _head_operands(hidden, head, scale: float, cast_fp32: bool = False):
    """(hidden, weight, bias, autocast_off) for the fused loss, in the dtype the model's own head would compute in.

    That is float32 with ``cast_fp32``, else the autocast dtype when autocast is on (as ``nn.Linear`` would run
    under it), else the dtype of ``hidden``. ``scale`` (logit scale / temperature) is folded into hidden and bias:
    ``scale * (h W^T + b) = (scale h) W^T + scale b``. ``autocast_off`` is a context that disables autocast around
    the mlmix calls, whose dtypes are then explicit.
    """
    weight = head.weight
    bias = getattr(head, "bias", None)
    hidden = hidden.to(weight.device)
    dev = hidden.device.type
    autocast_on = torch.is_autocast_enabled(dev)
    if cast_fp32:
        dtype = torch.float32
    elif autocast_on:
        dtype = torch.get_autocast_dtype(dev)
    else:
        dtype = hidden.dtype
    hidden, weight = hidden.to(dtype), weight.to(dtype)
    bias = None if bias is None else bias.to(dtype)
    if scale != 1.0:
        hidden = hidden * scale
        bias = None if bias is None else bias * scale
    off = torch.autocast(dev, enabled=False) if autocast_on else contextlib.nullcontext()
    return hidden, weight, bias, off


def _logit_rows(hc, weight, bias, acc):
    """Logits of the rows ``hc`` against the full vocabulary, as a (rows, V) tensor in ``acc``."""
    if hc.device.type == "cuda" and weight.dtype in (torch.float16, torch.bfloat16):
        z = _mm_f32(hc, weight.t())
        return z if bias is None else z.add_(bias.to(acc))
    h_acc = hc.to(acc)
    if weight.dtype == acc:
        return torch.mm(h_acc, weight.t()) if bias is None else torch.addmm(bias, h_acc, weight.t())
    # the product in the accumulation dtype, converting the weight a block of rows at a time
    vocab = weight.shape[0]
    z = torch.empty(hc.shape[0], vocab, dtype=acc, device=hc.device)
    step = max(1, _CPU_BLOCK_ELEMS // max(1, weight.shape[1]))
    for v0 in range(0, vocab, step):
        v1 = min(vocab, v0 + step)
        z[:, v0:v1] = h_acc @ weight[v0:v1].to(acc).t()
        if bias is not None:
            z[:, v0:v1] += bias[v0:v1].to(acc)
    return z


def _stat_rows(vocab: int, device) -> int:
    """Tokens per chunk of the statistics pass: a (chunk x vocabulary) float32 buffer of 16 MiB (CPU) / 128 MiB."""
    elems = _CUDA_BLOCK_ELEMS if device.type == "cuda" else _CPU_BLOCK_ELEMS
    return max(1, elems // max(1, vocab))


class _NextTokenStats(torch.autograd.Function):
    """Entropy, ``log sum_v p_v^2``, mean logit and top-1 hit of ``softmax(s)`` per token, without the full logits.

    ``s = cap * tanh((h W^T + b) / cap)`` (or ``h W^T + b``), computed for a chunk of tokens against the whole
    vocabulary at a time, in float32 (float64 for float64 inputs). Only the entropy is differentiable (TRL's GRPO
    adds an entropy bonus to its loss); its backward recomputes the chunks. The others are marked
    non-differentiable, as in TRL. Fields not in ``outputs`` come back as None.
    """

    @staticmethod
    def forward(ctx, h, weight, bias, labels, softcap, outputs):
        ctx.set_materialize_grads(False)
        n = h.shape[0]
        acc = _acc_dtype(h.dtype)
        dev = h.device
        res = [torch.empty(n, dtype=torch.bool if name == "is_top1" else acc, device=dev) if name in outputs else None
               for name in _TOKEN_STATS]
        entropy, log_sum_sq, mean_logits, is_top1 = res
        lse = torch.empty(n, dtype=acc, device=dev)
        rows = _stat_rows(weight.shape[0], dev)
        for t0 in range(0, n, rows):
            t1 = min(n, t0 + rows)
            z = _logit_rows(h[t0:t1], weight, bias, acc)
            if softcap is not None:
                z.div_(softcap).tanh_().mul_(softcap)
            if mean_logits is not None:
                mean_logits[t0:t1] = z.mean(1)
            if is_top1 is not None:
                # argmax returns the first maximum: a tie with an earlier token is not a hit (TRL's rule)
                is_top1[t0:t1] = z.argmax(1) == labels[t0:t1]
            lse_c = torch.logsumexp(z, 1)
            lse[t0:t1] = lse_c
            z.sub_(lse_c.unsqueeze(1))  # log p
            if log_sum_sq is not None:
                log_sum_sq[t0:t1] = torch.logsumexp(2.0 * z, 1)
            if entropy is not None:
                entropy[t0:t1] = -(z.exp() * z).sum(1)
        if entropy is not None and any(ctx.needs_input_grad[:3]):
            ctx.save_for_backward(h, weight, bias, lse, entropy)
        ctx.softcap = softcap
        ctx.mark_non_differentiable(*(t for t in (log_sum_sq, mean_logits, is_top1) if t is not None))
        return entropy, log_sum_sq, mean_logits, is_top1

    @staticmethod
    def backward(ctx, grad_entropy, *_):
        if grad_entropy is None or not ctx.saved_tensors:
            return None, None, None, None, None, None
        h, weight, bias, lse, entropy = ctx.saved_tensors
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        acc = lse.dtype
        cap = ctx.softcap
        n = h.shape[0]
        g = grad_entropy.to(acc)
        grad_h = torch.zeros(n, h.shape[1], dtype=acc, device=h.device) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=acc, device=h.device) if need_w else None
        grad_b = torch.zeros(weight.shape[0], dtype=acc, device=h.device) if need_b else None
        w_acc = weight.to(acc) if need_h else None
        rows = _stat_rows(weight.shape[0], h.device)
        for t0 in range(0, n, rows):
            t1 = min(n, t0 + rows)
            s = _logit_rows(h[t0:t1], weight, bias, acc)
            tanh = None
            if cap is not None:
                tanh = s.div_(cap).tanh_()
                s = tanh * cap
            log_p = s.sub_(lse[t0:t1].unsqueeze(1))
            # dH/ds_v = -p_v (log p_v + H)
            ds = log_p.exp().mul_(log_p.add_(entropy[t0:t1].unsqueeze(1))).mul_(-g[t0:t1].unsqueeze(1))
            if tanh is not None:
                ds.mul_(tanh.mul_(tanh).neg_().add_(1.0))  # d cap*tanh(x/cap) / dx = 1 - tanh^2
            if grad_h is not None:
                grad_h[t0:t1] = ds @ w_acc
            if grad_w is not None:
                grad_w.addmm_(ds.t(), h[t0:t1].to(acc))
            if grad_b is not None:
                grad_b.add_(ds.sum(0))
        return (None if grad_h is None else grad_h.to(h.dtype), None if grad_w is None else grad_w.to(weight.dtype),
                None if grad_b is None else grad_b.to(bias.dtype), None, None, None)


def _base_model(model):
    base = getattr(model, model.base_model_prefix, None)
    if base is None or base is model:
        raise ValueError(f"patch_causal_lm needs a causal LM whose backbone is its '{model.base_model_prefix}' "
                         f"attribute, got {type(model).__name__}")
    return base


def _fused_lm_head_output(model, args, kwargs, labels, shift_labels, num_items_in_batch, spec: _FusedHead,
                          opts: _PatchOptions):
    """TRL's ``FusedCausalLMOutput`` for ``model(..., labels=..., fused_lm_head=True)``, computed with mlmix.

    Same fields and conventions as TRL's ``add_fused_lm_head``: log-probabilities of the next-token labels (shape
    ``(batch, seq - 1)``, or ``(batch, seq)`` with ``shift_labels``) under ``softmax(transform(logits) / T)``,
    zero where the label is -100; the statistics ``spec.outputs`` asks for; ``loss = -sum(log_probs) /
    num_items_in_batch`` (the valid-token count when not given), plus the MoE load-balancing loss.
    """
    from trl.trainer.utils import FusedCausalLMOutput

    if opts.z_loss or opts.label_smoothing:
        raise ValueError(
            "patch_causal_lm(z_loss=..., label_smoothing=...) cannot apply to a fused_lm_head=True call: TRL computes "
            f"its loss from the log-probabilities (got z_loss={opts.z_loss!r}, "
            f"label_smoothing={opts.label_smoothing!r}); patch without them"
        )
    if not (isinstance(spec.temperature, float) and math.isfinite(spec.temperature) and spec.temperature > 0):
        raise ValueError(f"the fused LM head's temperature must be a finite float > 0, got {spec.temperature!r}")
    unknown = set(spec.outputs) - {"log_probs", *_TOKEN_STATS}
    if unknown:
        raise ValueError(f"fused LM head outputs must be among {('log_probs',) + _TOKEN_STATS}, got {sorted(unknown)}")
    text_config = model.config.get_text_config()
    kwargs.pop("logits_to_keep", None)
    kwargs["use_cache"] = False
    kwargs["return_dict"] = True
    _check_packing_once(model, kwargs.get("position_ids"))
    if getattr(text_config, "output_router_logits", False):
        kwargs.setdefault("output_router_logits", True)
    outputs = _base_model(model)(*args, **kwargs)
    hidden = outputs.last_hidden_state
    head = model.get_output_embeddings()
    if shift_labels is None:
        # position i is scored against labels[i + 1]; the last position of each row is dropped from the output
        labels = labels.to(head.weight.device)
        targets = torch.cat([labels[:, 1:], torch.full_like(labels[:, :1], -100)], dim=1)
    else:
        targets = shift_labels.to(head.weight.device)
    softcap = getattr(text_config, "final_logit_softcapping", None)
    # logits/T = cap/T * tanh(scale/T * y / (cap/T)): temperature and logit scale folded into hidden and softcap
    cap = None if softcap is None else float(softcap) / spec.temperature
    h, w, b, autocast_off = _head_operands(hidden, head, _logit_scale(text_config) / spec.temperature,
                                           spec.cast_lm_head_to_fp32)
    mask = targets != -100
    with autocast_off:
        log_probs = -linear_cross_entropy(h, w, targets, bias=b, reduction="none", softcap=cap, impl=opts.impl)
        stats = [None] * len(_TOKEN_STATS)
        wanted = tuple(name for name in _TOKEN_STATS if name in spec.outputs)
        if wanted:
            idx = torch.nonzero(mask.reshape(-1)).squeeze(1)
            h_v = h.reshape(-1, h.shape[-1]).index_select(0, idx)
            y_v = targets.reshape(-1).index_select(0, idx)
            for i, t in enumerate(_NextTokenStats.apply(h_v, w, b, y_v, cap, wanted)):
                if t is not None:
                    # scattered into zeros: every field is 0 (False) at ignored positions, as in TRL
                    stats[i] = t.new_zeros(mask.numel()).index_copy(0, idx, t).view(mask.shape)
    if shift_labels is None:
        log_probs, mask = log_probs[:, :-1], mask[:, :-1]
        stats = [None if t is None else t[:, :-1] for t in stats]
    denom = mask.sum().clamp(min=1) if num_items_in_batch is None else num_items_in_batch
    loss = -log_probs.sum() / denom
    aux_loss = None
    if kwargs.get("output_router_logits"):
        from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

        num_experts = getattr(text_config, "num_experts", None) or getattr(model, "num_experts")
        aux_loss = load_balancing_loss_func(outputs.router_logits, num_experts, text_config.num_experts_per_tok,
                                            kwargs.get("attention_mask"))
        loss = loss + getattr(text_config, "router_aux_loss_coef", 0.0) * aux_loss
    entropy, log_sum_sq_probs, mean_logits, is_top1 = stats
    return FusedCausalLMOutput(loss=loss, log_probs=log_probs, entropy=entropy, log_sum_sq_probs=log_sum_sq_probs,
                               mean_logits=mean_logits, is_top1=is_top1, label_mask=mask, aux_loss=aux_loss)


def _mlmix_forward(self, *args, labels=None, shift_labels=None, num_items_in_batch=None, logits_to_keep=None,
                   fused_lm_head=False, return_logits=None, **kwargs):
    """The forward ``patch_causal_lm`` installs (bound to the model): see its docstring for the routing."""
    opts: _PatchOptions = self._mlmix_patch
    spec = kwargs.pop(_FUSED_KWARG, None)
    if fused_lm_head and spec is None:
        spec = _trl_fused_head(self) or _FusedHead()
    if spec is not None:
        if labels is None and shift_labels is None:
            raise ValueError("fused_lm_head=True needs labels or shift_labels")
        return _fused_lm_head_output(self, args, kwargs, labels, shift_labels, num_items_in_batch, spec, opts)
    has_labels = labels is not None or shift_labels is not None
    if return_logits is None:
        return_logits = not self.training and opts.eval_logits
    if not has_labels or return_logits:
        for name, value in (("labels", labels), ("shift_labels", shift_labels),
                            ("num_items_in_batch", num_items_in_batch), ("logits_to_keep", logits_to_keep)):
            if value is not None:
                kwargs[name] = value
        return self._mlmix_original_forward(*args, **kwargs)

    from transformers.modeling_outputs import CausalLMOutputWithPast

    kwargs["return_dict"] = True
    # a loss needs no cache, and under a default config (use_cache=True) transformers would create one and
    # then ignore the example boundaries in packed position_ids
    kwargs["use_cache"] = False
    _check_packing_once(self, kwargs.get("position_ids"))
    outputs = _base_model(self)(*args, **kwargs)
    head = self.get_output_embeddings()
    text_config = self.config.get_text_config()
    softcap = getattr(text_config, "final_logit_softcapping", None)
    targets, shift = (shift_labels, False) if shift_labels is not None else (labels, True)
    h, w, b, autocast_off = _head_operands(outputs.last_hidden_state, head, _logit_scale(text_config))
    reduction = "mean" if num_items_in_batch is None else "sum"
    with autocast_off:
        loss = linear_cross_entropy(h, w, targets.to(w.device), bias=b, shift=shift, reduction=reduction,
                                    softcap=softcap, z_loss=opts.z_loss, label_smoothing=opts.label_smoothing,
                                    impl=opts.impl)
    if num_items_in_batch is not None:
        loss = loss / num_items_in_batch
    # the backbone ran without a cache (above): there is none to return
    return CausalLMOutputWithPast(loss=loss, logits=None, past_key_values=None,
                                  hidden_states=getattr(outputs, "hidden_states", None),
                                  attentions=getattr(outputs, "attentions", None))


def _check_packing_once(model, position_ids) -> None:
    """On the first batch with position_ids (packed rows come with them), check that the model keeps packed
    examples apart (:func:`mlmix.torch.check_packed_attention`): a model that would mix them raises
    PackingError instead of training wrongly. Later calls cost an attribute lookup."""
    if position_ids is None or getattr(model, "_mlmix_packing_checked", False):
        return
    from .packing import check_packed_attention

    check_packed_attention(model)
    model._mlmix_packing_checked = True


def _fused_lm_head_pre_hook(module, args, kwargs):
    """Route ``fused_lm_head=True`` calls to the mlmix forward, wherever it sits in the chain of forwards.

    TRL's ``add_fused_lm_head`` (SFTTrainer/DPO/GRPO... ``__init__``) wraps ``model.forward`` and computes the fused
    outputs itself when called with ``fused_lm_head=True``; called without it, it hands every keyword to the forward
    it wrapped. Replacing the flag by a private keyword that carries TRL's settings therefore reaches the mlmix
    forward through TRL's wrapper (model patched before the trainer was built) as well as directly (patched after).
    """
    if not kwargs.get("fused_lm_head"):
        return None
    return args, {**kwargs, "fused_lm_head": False, _FUSED_KWARG: _trl_fused_head(module) or _FusedHead()}


def patch_causal_lm(model, *, impl: str = "auto", z_loss: float = 0.0, label_smoothing: float = 0.0,
                    eval_logits: bool = True):
    """Make a transformers causal LM compute its training loss with :func:`linear_cross_entropy`.

    Replaces ``model.forward`` (on this instance only) by one that routes each call:

    * training (``model.training``) with ``labels`` or ``shift_labels``: runs the backbone and scores its last
      hidden state against ``lm_head.weight`` without materialising the logits; the output's ``logits`` is None.
      Honours ``num_items_in_batch`` (the Trainer's gradient accumulation: sum / num_items_in_batch), the
      config's ``final_logit_softcapping`` and logit scale (``logit_scale``, ``logits_scaling``, ...), and runs the
      head in the autocast dtype under autocast, as the model's own ``lm_head`` would;
    * evaluation (``model.training`` False) with labels, when ``eval_logits`` (the default): the original forward,
      so the output carries ``logits`` and the model's own loss (``Trainer.evaluate``/``predict`` and
      ``compute_metrics`` need them). With ``eval_logits=False`` evaluation takes the fused path too (loss only);
    * without labels (generation, inference): the original forward;
    * ``return_logits=True`` / ``False`` passed to the forward overrides the two rules above for that call;
    * ``fused_lm_head=True`` (TRL >= 1.16 trainers: SFT, DPO, GRPO, KTO, RLOO): TRL's ``FusedCausalLMOutput``
      computed with mlmix: per-token ``log_probs`` of the next-token labels (differentiable, through
      ``linear_cross_entropy(reduction="none")``), the fields TRL requested among ``entropy`` (differentiable),
      ``log_sum_sq_probs``, ``mean_logits`` and ``is_top1`` (token chunks against the whole vocabulary, never the
      full logits), ``label_mask``, ``loss`` and the MoE ``aux_loss``; TRL's temperature, logit scale, softcap and
      ``cast_lm_head_to_fp32`` are honoured. This works whether the model is patched before the trainer is built
      (TRL then wraps the mlmix forward; a forward pre-hook routes the call through TRL's wrapper to mlmix) or
      after it (the mlmix forward wraps TRL's). ``z_loss``/``label_smoothing`` cannot apply there and raise.

    The loss paths run the backbone with ``use_cache=False`` (a model's default config would otherwise create a
    cache, under which transformers ignores the example boundaries of packed ``position_ids``), and the first call
    that passes ``position_ids`` runs :func:`mlmix.torch.check_packed_attention` once: a model that would let
    packed examples attend to each other raises ``PackingError`` instead of training wrongly.

    The model must be called through ``model(...)`` (``nn.Module.__call__``) for the pre-hook to see TRL's calls;
    a wrapper that calls the inner model's ``.forward`` directly (PEFT's tuners) bypasses it when the model was
    patched before TRL's head was added, and TRL's head then runs (PEFT models are untested). Patching twice with
    the same options is a no-op; with other options it raises. Returns the model.
    """
    if impl not in _IMPLS:
        raise ValueError(f"impl must be one of {_IMPLS}, got {impl!r}")
    opts = _PatchOptions(impl, float(z_loss), float(label_smoothing), bool(eval_logits))
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is None or not hasattr(head, "weight") or not hasattr(model, "config"):
        raise ValueError(f"patch_causal_lm needs a causal LM with a decoder and an lm_head, got {type(model).__name__}")
    _base_model(model)
    _logit_scale(model.config.get_text_config())
    previous = model.__dict__.get("_mlmix_patch")
    if previous is not None:
        if previous != opts:
            raise ValueError(f"the model is already patched with {previous}; patch_causal_lm got {opts}")
        return model
    model._mlmix_original_forward = model.forward
    model._mlmix_patch = opts
    # bound to the model, so that copy.deepcopy (TRL's reference models) rebinds it to the copy; signature of the
    # class's forward, which the Trainer and generate() inspect
    forward = functools.wraps(type(model).forward)(
        lambda self, *args, **kwargs: _mlmix_forward(self, *args, **kwargs))
    model.forward = types.MethodType(forward, model)
    model.register_forward_pre_hook(_fused_lm_head_pre_hook, with_kwargs=True)
    return model
