"""The blockwise torch backend of the fused linear cross-entropy (``impl="cpu"``; it runs on any device).

Two passes over the vocabulary (log-sum-exp in the forward, gradients in the backward), one (token block x vocab
block) logits buffer at a time, or, for scalar reductions without softcap, one pass that computes the gradients in
the forward in token chunks with full-vocabulary rows (three GEMMs instead of four). Accumulation is in
float32 (float64 for float64 inputs). See :mod:`mlmix.torch.loss` for the scheme.
"""

from __future__ import annotations

from .._deps import require
from ._loss_common import Backend, Options, acc_dtype, block_sizes, lse_accumulators

torch = require("torch", "mlmix.torch")

# Elements of the (token chunk x full vocabulary) buffer of the one-pass mode: 64M floats = 256 MiB, i.e.
# about 270 tokens per chunk at a 248k vocabulary.
_ONE_PASS_ELEMS = 1 << 26


def lse_pass(h, weight, bias, labels, opts: Options):
    """Per-token log-sum-exp, target logit and (if smoothing) sum of logits, all in the accumulation dtype.

    h: (N, H); weight: (V, H); bias: (V,) or None; labels: (N,) int64 in [0, V). Returns three (N,) tensors
    (the third is None without label smoothing).
    """
    n, _ = h.shape
    vocab = weight.shape[0]
    acc = acc_dtype(h.dtype)
    dev = h.device
    run_max, run_sum, target, logit_sum = lse_accumulators(n, acc, dev, opts.label_smoothing > 0)
    tb, vb = block_sizes(n, vocab, dev.type, opts.token_block, opts.vocab_block)
    cap = opts.softcap

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


def grad_pass(h, weight, bias, labels, lse, coef_p, coef_y, coef_u, opts: Options, need):
    """Gradients of sum_t L_t * g_t given per-token coefficients.

    d L_t / d s_tv = coef_p[t] * softmax_v - coef_y[t] * [v == y_t] - coef_u[t], with s the (soft-capped)
    logits; coef_p = g (1 + 2 z lse), coef_y = g (1 - eps), coef_u = g eps / V. ``need`` = (hidden, weight,
    bias) flags. Returns (grad_h, grad_w, grad_b) in the accumulation dtype (None where not needed).
    """
    n, hdim = h.shape
    vocab = weight.shape[0]
    acc = acc_dtype(h.dtype)
    dev = h.device
    cap = opts.softcap
    tb, vb = block_sizes(n, vocab, dev.type, opts.token_block, opts.vocab_block)
    grad_h = torch.zeros(n, hdim, dtype=acc, device=dev) if need[0] else None
    grad_b = torch.zeros(vocab, dtype=acc, device=dev) if need[2] else None

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


def one_pass(h, weight, bias, labels, g, opts: Options, need):
    """Loss terms and gradients together, in token chunks with full-vocabulary rows: three GEMMs, not four.

    Used on the CPU for scalar reductions, where the per-token gradient scale ``g`` (token weight / mean
    denominator) is known in the forward and only the scalar incoming gradient is left for the backward.
    Returns (lse, target, logit_sum, grad_h, grad_w, grad_b), all in the accumulation dtype.
    """
    n, hdim = h.shape
    vocab = weight.shape[0]
    acc = acc_dtype(h.dtype)
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


BACKEND = Backend("cpu", lse_pass, grad_pass, one_pass)
