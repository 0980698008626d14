"""The fused linear cross-entropy as two ``torch.library`` custom ops, and the autograd formula that joins them.

* ``mlmix::lce_forward``: drop ignored tokens, run the backend's log-sum-exp pass (or, where the backend has one
  and the caller allows it, its one-pass mode, which also computes the gradients for an incoming gradient of 1),
  combine the per-token loss terms and reduce. Returns ``(loss, lse, grad_h, grad_w, grad_b)``: ``lse`` in the
  accumulation dtype, 0 at ignored positions; the three gradients are the one-pass ones, or empty tensors.
* ``mlmix::lce_backward``: fold the incoming gradients of the loss *and of lse*, the reduction's scale and the
  token weights into per-token coefficients (``d lse / d s = softmax(s)``, so a gradient of lse only adds to the
  softmax coefficient: no extra GEMM), run the backend's gradient pass, scatter grad_hidden back to every token.

Both ops have fake (shape-only) implementations and every option is an op argument (int, float, str, bool), so
``torch.compile`` keeps them in its graph as opaque calls: no graph break, and the same code runs eagerly and
compiled. :func:`fused_linear_cross_entropy` is the entry point :mod:`mlmix.torch.loss` calls; which backend runs
is a name resolved by :mod:`._loss_dispatch`.

The lse of an ignored position is defined as 0, a constant: a gradient arriving there is dropped (and ignored
rows never reach a GEMM).
"""

from __future__ import annotations

import math

from .._deps import require
from ._loss_common import Options, acc_dtype
from ._loss_dispatch import backend as backend_for

torch = require("torch", "mlmix.torch")

_OPTION_ARGS = ("int ignore_index, float label_smoothing, float z_loss, float? softcap, int token_block, "
                "int vocab_block, str reduction, str backend")
_FORWARD_SCHEMA = (f"(Tensor h, Tensor weight, Tensor? bias, Tensor labels, Tensor? token_weights, {_OPTION_ARGS}, "
                   "bool store_grads, bool need_h, bool need_w, bool need_b) "
                   "-> (Tensor, Tensor, Tensor, Tensor, Tensor)")
_BACKWARD_SCHEMA = ("(Tensor? grad_loss, Tensor? grad_lse, Tensor h, Tensor weight, Tensor? bias, Tensor labels, "
                    f"Tensor? token_weights, Tensor lse, {_OPTION_ARGS}, bool need_h, bool need_w, bool need_b) "
                    "-> (Tensor, Tensor, Tensor)")
_N_FORWARD_ARGS = 17


def _check_label_range(labels, valid, vocab: int, ignore_index: int) -> None:
    bad = valid & ((labels < 0) | (labels >= vocab))
    if bool(bad.any()):
        first = int(labels[bad][0])
        raise ValueError(
            f"labels must lie in [0, {vocab}) or equal ignore_index={ignore_index}, got label {first}"
        )


def _one_pass(backend: str, reduction: str, softcap, store_grads: bool) -> bool:
    """Whether the forward computes the gradients (one-pass mode): decided from the arguments alone, so that the
    fake implementation knows the shapes of the outputs that carry them."""
    return store_grads and reduction != "none" and softcap is None and backend_for(backend).one_pass is not None


class _Valid:
    """The non-ignored tokens of a call: their indices (None when all are valid), compacted inputs, weights and
    the mean's denominator. Computed the same way by the forward and the backward op."""

    def __init__(self, h, weight, bias, labels, token_weights, ignore_index: int, contiguous: bool):
        n, vocab = h.shape[0], weight.shape[0]
        acc = acc_dtype(h.dtype)
        valid = labels != ignore_index
        _check_label_range(labels, valid, vocab, ignore_index)
        tw = None
        if token_weights is not None:
            tw = token_weights.to(acc)
            if not bool(torch.isfinite(tw).all()) or bool((tw < 0).any()):
                raise ValueError("token_weights must be finite and >= 0")
        self.n_valid = int(valid.sum())
        self.all = self.n_valid == n
        # ignored tokens (prompts in instruction tuning) are dropped before any GEMM
        self.idx = None if self.all else torch.nonzero(valid).squeeze(1)
        self.h = h if self.all else h.index_select(0, self.idx)
        self.y = labels if self.all else labels.index_select(0, self.idx)
        self.w = None if tw is None else self.take(tw)
        self.weight, self.bias = weight, bias
        if contiguous:
            self.h, self.y = self.h.contiguous(), self.y.contiguous()
            self.weight = weight.contiguous()
            self.bias = None if bias is None else bias.contiguous()
        self.denom = float(self.w.sum()) if self.w is not None else float(self.n_valid)

    def take(self, t):
        """The rows of ``t`` (N, ...) at the valid tokens."""
        return t if self.all else t.index_select(0, self.idx)

    def scatter(self, t_v, n: int, dtype):
        """(N, ...) in ``dtype``: ``t_v`` at the valid rows, zeros elsewhere."""
        if self.all:
            return t_v.to(dtype)
        out = torch.zeros((n,) + tuple(t_v.shape[1:]), dtype=dtype, device=t_v.device)
        # converted in row chunks: no second full-size copy next to a float32 accumulator
        row = 1 if t_v.dim() == 1 else max(1, math.prod(t_v.shape[1:]))
        step = max(1, (1 << 24) // row)
        for r0 in range(0, t_v.shape[0], step):
            r1 = min(t_v.shape[0], r0 + step)
            out.index_copy_(0, self.idx[r0:r1], t_v[r0:r1].to(dtype))
        return out


# --------------------------------------------------------------------------------------------------------------
# forward


def _lce_forward(h, weight, bias, labels, token_weights, ignore_index, label_smoothing, z_loss, softcap,
                 token_block, vocab_block, reduction, backend, store_grads, need_h, need_w, need_b):
    n = h.shape[0]
    vocab = weight.shape[0]
    acc = acc_dtype(h.dtype)
    be = backend_for(backend)
    opts = Options(ignore_index, label_smoothing, z_loss, softcap, token_block, vocab_block)
    v = _Valid(h, weight, bias, labels, token_weights, ignore_index, be.contiguous)
    need = (need_h, need_w, need_b)
    dev = h.device
    one_pass = _one_pass(backend, reduction, softcap, store_grads) and any(need)
    grads = [torch.empty(0, dtype=acc, device=dev) for _ in range(3)]
    if one_pass and v.n_valid:
        # per-token gradient scale without the incoming (scalar) gradient, applied in the backward
        g = torch.ones(v.n_valid, dtype=acc, device=dev) if v.w is None else v.w.clone()
        if reduction == "mean":
            g.mul_(1.0 / v.denom if v.denom > 0 else 0.0)
        lse, target, logit_sum, gh, gw, gb = be.one_pass(v.h, v.weight, v.bias, v.y, g, opts, need)
        if need_h:
            grads[0] = v.scatter(gh, n, acc)
        if need_w:
            grads[1] = gw
        if need_b:
            grads[2] = gb
    else:
        if one_pass:  # no valid token: every gradient is 0
            shapes = (tuple(h.shape), tuple(weight.shape), (vocab,))
            grads = [torch.zeros(s, dtype=acc, device=dev) if need[i] else grads[i] for i, s in enumerate(shapes)]
        if v.n_valid:
            lse, target, logit_sum = be.lse_pass(v.h, v.weight, v.bias, v.y, opts)
    if v.n_valid:
        eps = label_smoothing
        loss_v = lse - (1.0 - eps) * target
        if eps > 0:
            loss_v = loss_v - (eps / vocab) * logit_sum
        if z_loss > 0:
            loss_v = loss_v + z_loss * lse * lse
    else:
        lse = torch.zeros(0, dtype=acc, device=dev)
        loss_v = torch.zeros(0, dtype=acc, device=dev)
    if v.w is not None:
        loss_v = loss_v * v.w

    if reduction == "none":
        out = v.scatter(loss_v, n, acc)
    elif reduction == "sum":
        out = loss_v.sum()
    else:
        out = loss_v.sum() / v.denom if v.denom > 0 else loss_v.sum() * 0.0
    lse_full = v.scatter(lse.to(acc), n, acc)
    if lse_full is out:  # no token at all: outputs must not alias each other
        lse_full = lse_full.clone()
    return out, lse_full, grads[0], grads[1], grads[2]


def _lce_forward_fake(h, weight, bias, labels, token_weights, ignore_index, label_smoothing, z_loss, softcap,
                      token_block, vocab_block, reduction, backend, store_grads, need_h, need_w, need_b):
    acc = acc_dtype(h.dtype)
    n = h.shape[0]
    out = h.new_empty((n,) if reduction == "none" else (), dtype=acc)
    one_pass = _one_pass(backend, reduction, softcap, store_grads) and (need_h or need_w or need_b)
    shapes = (tuple(h.shape), tuple(weight.shape), (weight.shape[0],))
    grads = [h.new_empty(s if one_pass and need else (0,), dtype=acc)
             for s, need in zip(shapes, (need_h, need_w, need_b))]
    return out, h.new_empty((n,), dtype=acc), *grads


lce_forward = torch.library.custom_op("mlmix::lce_forward", _lce_forward, mutates_args=(), schema=_FORWARD_SCHEMA)
lce_forward.register_fake(_lce_forward_fake)


# --------------------------------------------------------------------------------------------------------------
# backward


def _lce_backward(grad_loss, grad_lse, h, weight, bias, labels, token_weights, lse, ignore_index, label_smoothing,
                  z_loss, softcap, token_block, vocab_block, reduction, backend, need_h, need_w, need_b):
    n = h.shape[0]
    vocab = weight.shape[0]
    acc = lse.dtype
    be = backend_for(backend)
    opts = Options(ignore_index, label_smoothing, z_loss, softcap, token_block, vocab_block)
    v = _Valid(h, weight, bias, labels, token_weights, ignore_index, be.contiguous)
    lse_v = v.take(lse)
    # per-token incoming gradient g_t of the loss (including the reduction's scale and the token weight)
    if grad_loss is None:
        g = torch.zeros(v.n_valid, dtype=acc, device=h.device)
    elif reduction == "none":
        g = v.take(grad_loss.to(acc))
    else:
        scale = grad_loss.to(acc)
        if reduction == "mean":
            scale = scale / v.denom if v.denom > 0 else scale * 0.0
        g = scale.expand(v.n_valid)
    if v.w is not None:
        g = g * v.w
    eps = label_smoothing
    coef_p = g * (1.0 + 2.0 * z_loss * lse_v)
    if grad_lse is not None:
        # d lse_t / d s_tv = softmax_tv: the gradient of lse joins the softmax coefficient
        coef_p = coef_p + v.take(grad_lse.to(acc))
    coef_p = coef_p.contiguous()
    coef_y = (g * (1.0 - eps)).contiguous()
    coef_u = (g * (eps / vocab)).contiguous()

    gh = gw = gb = None
    need = (need_h, need_w, need_b)
    if v.n_valid:
        gh, gw, gb = be.grad_pass(v.h, v.weight, v.bias, v.y, lse_v.contiguous(), coef_p, coef_y, coef_u, opts, need)
    empty = [h.new_empty(0) for _ in range(3)]
    if need_h:
        empty[0] = v.scatter(gh, n, h.dtype) if gh is not None else torch.zeros_like(h)
    if need_w:
        empty[1] = torch.zeros_like(weight) if gw is None else gw.to(weight.dtype)
    if need_b:
        empty[2] = torch.zeros_like(bias) if gb is None else gb.to(bias.dtype)
    return tuple(empty)


def _lce_backward_fake(grad_loss, grad_lse, h, weight, bias, labels, token_weights, lse, ignore_index,
                       label_smoothing, z_loss, softcap, token_block, vocab_block, reduction, backend, need_h, need_w,
                       need_b):
    return (torch.empty_like(h) if need_h else h.new_empty(0),
            torch.empty_like(weight) if need_w else h.new_empty(0),
            torch.empty_like(bias) if need_b else h.new_empty(0))


lce_backward = torch.library.custom_op("mlmix::lce_backward", _lce_backward, mutates_args=(),
                                       schema=_BACKWARD_SCHEMA)
lce_backward.register_fake(_lce_backward_fake)


# --------------------------------------------------------------------------------------------------------------
# autograd


def _setup_context(ctx, inputs, output):
    h, weight, bias, labels, token_weights = inputs[:5]
    ctx.options = inputs[5:13]  # ignore_index .. backend
    _, _, softcap, _, _, reduction, backend = inputs[6:13]
    loss, lse, gh, gw, gb = output
    ctx.set_materialize_grads(False)  # an unused lse brings None, not a tensor of zeros
    ctx.mark_non_differentiable(gh, gw, gb)
    ctx.save_for_backward(h, weight, bias, labels, token_weights, lse)
    ctx.stored = [gh, gw, gb] if _one_pass(backend, reduction, softcap, inputs[13]) and any(inputs[14:17]) else None
    ctx.dtypes = (h.dtype, weight.dtype, None if bias is None else bias.dtype)


def _traced(t) -> bool:
    """Whether the backward runs under torch.compile's tracing (fake tensors), not eagerly."""
    from torch._subclasses.functional_tensor import FunctionalTensor

    return torch.compiler.is_compiling() or isinstance(t, (torch._subclasses.FakeTensor, FunctionalTensor))


def _stored_grads(ctx, grad_loss):
    """One-pass mode: the gradients were computed in the forward for an incoming gradient of 1; scale them.

    Eagerly they are handed out once and scaled in place, not at all for an incoming gradient of 1 (autograd may
    keep them as .grad; a second backward recomputes them with the backward op). A compiled graph cannot look at
    the value: it scales them out of place, one elementwise pass and one temporary of their size."""
    grads, ctx.stored = ctx.stored, None
    if _traced(grad_loss):
        grads = [t * grad_loss.to(t.dtype) for t in grads]
    else:
        scale = grad_loss.to(grads[0].dtype)
        if not bool(scale == 1):
            grads = [t.mul_(scale) for t in grads]
    return [t.to(dt) if dt is not None else t for t, dt in zip(grads, ctx.dtypes)]


def _backward(ctx, grad_loss, grad_lse, _gh, _gw, _gb):
    h, weight, bias, labels, token_weights, lse = ctx.saved_tensors
    need = tuple(ctx.needs_input_grad[:3])
    if grad_loss is None and grad_lse is None:
        grads = [None, None, None]
    elif ctx.stored is not None and grad_lse is None and grad_loss is not None:
        grads = _stored_grads(ctx, grad_loss)
    else:
        grads = lce_backward(grad_loss, grad_lse, h, weight, bias, labels, token_weights, lse, *ctx.options, *need)
    return (*(g if nd else None for g, nd in zip(grads, need)),) + (None,) * (_N_FORWARD_ARGS - 3)


lce_forward.register_autograd(_backward, setup_context=_setup_context)


# --------------------------------------------------------------------------------------------------------------
# entry point


def fused_linear_cross_entropy(h, weight, bias, labels, token_weights, opts: Options, reduction: str, backend: str,
                               lse_grad: bool = False):
    """``(loss, lse)`` through the custom ops.

    ``h`` (N, H), ``weight`` (V, H), ``bias`` (V,) or None, ``labels`` (N,) int64, ``token_weights`` (N,) or None,
    all checked by the caller except the label range and the token weights' values (the ops check those).
    ``backend``: "cpu" or "cuda". ``loss`` is in the accumulation dtype (scalar, or (N,) for
    ``reduction="none"``); so is ``lse`` (N,), 0 at ignored positions, differentiable. ``lse_grad``: the
    caller hands lse to the user, whose gradient may reach it; the CPU's one-pass mode (gradients computed in the
    forward for the loss alone) is then not used.
    """
    grad_on = torch.is_grad_enabled()
    need = (grad_on and h.requires_grad, grad_on and weight.requires_grad,
            grad_on and bias is not None and bias.requires_grad)
    store = any(need) and not opts.low_memory and not lse_grad
    loss, lse, _, _, _ = lce_forward(h, weight, bias, labels, token_weights, opts.ignore_index,
                                     opts.label_smoothing, opts.z_loss, opts.softcap, opts.token_block,
                                     opts.vocab_block, reduction, backend, store, *need)
    return loss, lse
