"""TRL's fused LM head, answered by mlmix: what a ``fused_lm_head=True`` call asks for, and the per-token statistics.

TRL (>= 1.16) installs ``add_fused_lm_head`` on a model's forward and then calls ``model(..., fused_lm_head=True)``;
its settings (temperature, requested outputs, fp32 head) live in the closure of the forward it installs.
:func:`trl_fused_head` reads them (:class:`FusedHead`), and :class:`NextTokenStats` computes the fields of TRL's
``FusedCausalLMOutput`` besides ``log_probs`` (which :func:`mlmix.torch.linear_cross_entropy` gives) in token
chunks against the whole vocabulary, never the full logits. :mod:`._hf_patch` puts them together.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from .._deps import require
from ._loss_common import CPU_BLOCK_ELEMS, CUDA_BLOCK_ELEMS, acc_dtype, mm_f32

torch = require("torch", "mlmix.torch")

# the per-token fields of TRL's FusedCausalLMOutput besides log_probs, in TRL's order
TOKEN_STATS = ("entropy", "log_sum_sq_probs", "mean_logits", "is_top1")


@dataclass(frozen=True)
class FusedHead:
    """What a ``fused_lm_head=True`` call asks for: TRL's ``add_fused_lm_head`` settings, or these defaults."""

    temperature: float = 1.0
    outputs: tuple = ("log_probs",) + TOKEN_STATS
    cast_lm_head_to_fp32: bool = False


def trl_fused_head(model) -> Optional[FusedHead]:
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
            return FusedHead(temperature, outputs, cast)
        todo.extend(getattr(fn, name, None) for name in ("__func__", "__wrapped__", "model_forward"))
        todo.extend(v for v in cells.values() if callable(v))
    return None


def _logit_rows(hc, weight, bias, acc):
    """Logits of the rows ``hc`` against the full vocabulary, as a (rows, V) tensor in ``acc``."""
    if hc.device.type == "cuda" and weight.dtype in (torch.float16, torch.bfloat16):
        z = mm_f32(hc, weight.t())
        return z if bias is None else z.add_(bias.to(acc))
    h_acc = hc.to(acc)
    if weight.dtype == acc:
        return torch.mm(h_acc, weight.t()) if bias is None else torch.addmm(bias, h_acc, weight.t())
    # the product in the accumulation dtype, converting the weight a block of rows at a time
    vocab = weight.shape[0]
    z = torch.empty(hc.shape[0], vocab, dtype=acc, device=hc.device)
    step = max(1, CPU_BLOCK_ELEMS // max(1, weight.shape[1]))
    for v0 in range(0, vocab, step):
        v1 = min(vocab, v0 + step)
        z[:, v0:v1] = h_acc @ weight[v0:v1].to(acc).t()
        if bias is not None:
            z[:, v0:v1] += bias[v0:v1].to(acc)
    return z


def _stat_rows(vocab: int, device) -> int:
    """Tokens per chunk of the statistics pass: a (chunk x vocabulary) float32 buffer of 16 MiB (CPU) / 128 MiB."""
    elems = CUDA_BLOCK_ELEMS if device.type == "cuda" else CPU_BLOCK_ELEMS
    return max(1, elems // max(1, vocab))


class NextTokenStats(torch.autograd.Function):
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
        acc = acc_dtype(h.dtype)
        dev = h.device
        res = [torch.empty(n, dtype=torch.bool if name == "is_top1" else acc, device=dev) if name in outputs else None
               for name in TOKEN_STATS]
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

