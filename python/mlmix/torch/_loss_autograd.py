"""The autograd function of the fused linear cross-entropy, over whichever backend it is given.

Forward: drop ignored tokens, run the backend's log-sum-exp pass (or, where the backend has one and the reduction
is a scalar, its one-pass mode, which computes the gradients too), combine the per-token loss terms and reduce.
Backward: fold the incoming gradient, the reduction's scale and the token weights into per-token coefficients,
run the backend's gradient pass (or scale the stored one-pass gradients), scatter grad_hidden back to every token.
Which backend runs is decided by :mod:`mlmix.torch.loss`.
"""

from __future__ import annotations

from .._deps import require
from ._loss_common import Backend, Options, acc_dtype

torch = require("torch", "mlmix.torch")


def _check_label_range(labels, valid, vocab: int, ignore_index: int) -> None:
    bad = valid & ((labels < 0) | (labels >= vocab))
    if bool(bad.any()):
        first = int(labels[bad][0])
        raise ValueError(
            f"labels must lie in [0, {vocab}) or equal ignore_index={ignore_index}, got label {first}"
        )


class LinearCrossEntropyFunction(torch.autograd.Function):
    """``apply(h, weight, bias, labels, token_weights, opts, reduction, backend) -> (loss, lse)``.

    ``h`` (N, H), ``weight`` (V, H), ``bias`` (V,) or None, ``labels`` (N,) int64, ``token_weights`` (N,) or None,
    all checked by the caller except the label range and the token weights' values; ``opts`` an
    :class:`Options`, ``backend`` a :class:`Backend`. ``loss`` is in the accumulation dtype (scalar, or (N,) for
    ``reduction="none"``); ``lse`` is float32 (N,), 0 at ignored positions, not differentiable.
    """

    @staticmethod
    def forward(ctx, h, weight, bias, labels, token_weights, opts: Options, reduction: str, backend: Backend):
        n = h.shape[0]
        vocab = weight.shape[0]
        acc = acc_dtype(h.dtype)
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
        if backend.contiguous:
            h_v, weight_c = h_v.contiguous(), weight.contiguous()
            bias_c = None if bias is None else bias.contiguous()
            y_v = y_v.contiguous()
        else:
            weight_c, bias_c = weight, bias

        denom = float(w_v.sum()) if w_v is not None else float(n_valid)
        need = tuple(ctx.needs_input_grad[:3])
        one_pass = (backend.one_pass is not None and not opts.low_memory and reduction != "none"
                    and opts.softcap is None and any(need) and n_valid > 0)
        ctx.grads = None
        if one_pass:
            # per-token gradient scale without the incoming (scalar) gradient, applied in the backward
            g = torch.ones(n_valid, dtype=acc, device=h.device) if w_v is None else w_v.clone()
            if reduction == "mean":
                g.mul_(1.0 / denom if denom > 0 else 0.0)
            lse, target, logit_sum, *ctx.grads = backend.one_pass(h_v, weight_c, bias_c, y_v, g, opts, need)
        elif n_valid:
            lse, target, logit_sum = backend.lse_pass(h_v, weight_c, bias_c, y_v, opts)
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
            return LinearCrossEntropyFunction._scaled_stored_grads(ctx, grad_out, h_v, weight, bias, idx)
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
            grad_h_v, grad_w, grad_b = ctx.backend.grad_pass(
                h_v, weight, bias, y_v, lse, coef_p, coef_y, coef_u, opts, (need_h, need_w, need_b)
            )
        return LinearCrossEntropyFunction._finish(ctx, grad_h_v, grad_w, grad_b, h_v, weight, bias, idx)

    @staticmethod
    def _scaled_stored_grads(ctx, grad_out, h_v, weight, bias, idx):
        """One-pass mode: the gradients were computed in the forward for an incoming gradient of 1."""
        # handed out once (autograd may keep them as .grad); a second backward recomputes them instead
        grads, ctx.grads = ctx.grads, None
        scale = grad_out.to(next(t.dtype for t in grads if t is not None))
        if not bool(scale == 1):
            grads = [None if t is None else t.mul_(scale) for t in grads]
        return LinearCrossEntropyFunction._finish(ctx, *grads, h_v, weight, bias, idx)

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
