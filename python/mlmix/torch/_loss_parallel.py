"""The vocabulary-parallel fused linear cross-entropy: the output layer split by vocabulary rows over a process group.

Each rank of the group holds a contiguous block of rows ``[start, start + rows)`` of the (V, H) output weight (and
the same slice of its bias), the same hidden states and the same labels, as in Megatron's tensor-parallel output
layer. Nothing of size V crosses the network, and no rank materialises logits:

* forward: each rank runs its backend's log-sum-exp pass (:meth:`Backend.lse_pass`) over its own rows, with the
  labels moved to its row numbering (a label another rank owns matches none of its columns, so that rank's target
  logit is 0). One ``all_gather`` of the per-token (partial lse, target logit, sum of logits) of every rank follows;
  every rank then combines them in rank order (``logsumexp`` over the partial lse, sums of the other two), so the
  loss is the same bytes on every rank and from one run to the next.
* backward: each rank runs its backend's gradient pass over its rows with the global lse: its weight (and bias)
  gradient is complete and stays local; its hidden-state gradient is the part its rows contribute, and the parts
  are summed by one ``all_reduce`` (float32) before the backward returns, so every rank gets the full
  ``d loss / d hidden`` (``reduce_grad_hidden=False`` leaves the sum to the caller).

Before any of this, one small ``all_gather`` of each rank's shard layout and input sizes (and a checksum of its
labels) lets every rank check the group's inputs the same way: a mismatch raises the same ``ValueError`` on every
rank instead of hanging in a collective or computing a wrong loss.

The public entry point is :func:`mlmix.torch.vocab_parallel_linear_cross_entropy` (:mod:`mlmix.torch.loss`), which
checks the tensors, picks the backend and hands them here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

from .._deps import require
from ._loss_common import Backend, Options, acc_dtype

torch = require("torch", "mlmix.torch")


@dataclass(frozen=True)
class Shard:
    """This rank's rows of the vocabulary and the group that holds the others, as :func:`group_layout` checked them.

    ``group``: the ``torch.distributed`` process group; ``start``: this rank's first row; ``vocab``: the full
    vocabulary size V; ``reduce_grad_hidden``: sum the hidden-state gradient over the group in the backward.
    """

    group: Any
    start: int
    vocab: int
    reduce_grad_hidden: bool = True


# the summary each rank contributes to the layout check (int64)
(_M_ERROR, _M_START, _M_ROWS, _M_TOKENS, _M_HIDDEN, _M_VALID, _M_LABEL_SUM, _M_MIN_LABEL, _M_MAX_LABEL,
 _M_TW_SUM, _M_TW_BAD, _M_GRAD, _M_LEN) = range(13)
_NO_START = -1


def _collective_device(group):
    """Where the group's collectives take their tensors: the current GPU for NCCL, else the CPU (gloo)."""
    if "nccl" in str(torch.distributed.get_backend(group)).lower():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _gather_rows(t, group):
    """(world, *t.shape): ``t`` of every rank of ``group``, in rank order, on ``t``'s device."""
    world = torch.distributed.get_world_size(group)
    dev = _collective_device(group)
    src = t.to(dev).contiguous()
    out = [torch.empty_like(src) for _ in range(world)]
    torch.distributed.all_gather(out, src, group=group)
    return torch.stack(out).to(t.device)


def _summary(h, weight, labels, token_weights, ignore_index: int, vocab_start: Optional[int], need_h: bool):
    """This rank's row of the layout check: its shard, its input sizes and checksums of its labels and weights."""
    m = [0] * _M_LEN
    valid = labels != ignore_index
    y = labels[valid]
    m[_M_START] = _NO_START if vocab_start is None else vocab_start
    m[_M_ROWS], m[_M_TOKENS], m[_M_HIDDEN] = weight.shape[0], h.shape[0], h.shape[1]
    m[_M_VALID], m[_M_LABEL_SUM] = int(y.numel()), int(y.sum())
    m[_M_MIN_LABEL], m[_M_MAX_LABEL] = (int(y.min()), int(y.max())) if y.numel() else (0, -1)
    if token_weights is not None:
        tw = token_weights.double()
        m[_M_TW_BAD] = int(not bool(torch.isfinite(tw).all()) or bool((tw < 0).any()))
        # the bit pattern of the float64 sum: the same weights give the same sum on every rank
        m[_M_TW_SUM] = 0 if m[_M_TW_BAD] else int(tw.sum().view(torch.int64))
    m[_M_GRAD] = int(need_h)
    return m


def group_layout(h, weight, labels, token_weights, ignore_index: int, group, vocab_start: Optional[int],
                 need_h: bool, local_error: Optional[Exception]):
    """(this rank's first row, full vocabulary size V), from one ``all_gather`` of every rank's :func:`_summary`.

    Every rank checks the same gathered rows, so every rank raises the same ``ValueError`` (the rank whose own
    inputs failed the caller's checks, ``local_error``, raises that) instead of leaving the others waiting in a
    collective or computing a loss from inconsistent inputs.
    """
    if local_error is None:
        mine = _summary(h, weight, labels, token_weights, ignore_index, vocab_start, need_h)
    else:
        mine = [0] * _M_LEN
        mine[_M_ERROR] = 1
    rows_of = _gather_rows(torch.tensor(mine, dtype=torch.int64), group).tolist()
    if local_error is not None:
        raise local_error
    failed = [r for r, g in enumerate(rows_of) if g[_M_ERROR]]
    if failed:
        raise ValueError(f"vocab_parallel_linear_cross_entropy: the inputs of rank(s) {failed} of the group are "
                         "invalid (their error says why)")
    return _check_rows(rows_of, torch.distributed.get_rank(group), token_weights is not None)


def _check_rows(rows_of, rank: int, has_token_weights: bool):
    world = len(rows_of)
    given = [g[_M_START] != _NO_START for g in rows_of]
    rows = [g[_M_ROWS] for g in rows_of]
    if any(given) and not all(given):
        missing = [r for r, s in enumerate(given) if not s]
        raise ValueError(f"vocab_start_index must be given on every rank of the group or on none, ranks {missing} "
                         "passed None")
    if all(given):
        starts = [g[_M_START] for g in rows_of]
        pos = 0
        for r in sorted(range(world), key=lambda r: starts[r]):
            if starts[r] != pos:
                raise ValueError(
                    "vocab_start_index and the weight shards' rows must tile [0, V) without gaps or overlaps: "
                    f"expected a shard starting at row {pos}, got rank {r} starting at {starts[r]}; (start, rows) "
                    f"per rank: {list(zip(starts, rows))}")
            pos += rows[r]
    else:
        starts = [sum(rows[:r]) for r in range(world)]
    vocab = sum(rows)
    for key, what in ((_M_TOKENS, "the number of tokens (hidden.shape[:-1])"),
                      (_M_HIDDEN, "the hidden size (hidden.shape[-1], weight.shape[1])")):
        values = [g[key] for g in rows_of]
        if len(set(values)) > 1:
            raise ValueError(f"{what} must be the same on every rank of the group, got {values} per rank")
    if len({(g[_M_VALID], g[_M_LABEL_SUM], g[_M_MIN_LABEL], g[_M_MAX_LABEL]) for g in rows_of}) > 1:
        raise ValueError("labels must be the same on every rank of the group (every rank scores the same tokens "
                         "against its own rows of the weight), got different labels on different ranks")
    lo, hi = rows_of[0][_M_MIN_LABEL], rows_of[0][_M_MAX_LABEL]
    if rows_of[0][_M_VALID] and (lo < 0 or hi >= vocab):
        raise ValueError(f"labels must lie in [0, {vocab}) (the full vocabulary: the shards' rows {rows} summed) "
                         f"or equal ignore_index, got label {lo if lo < 0 else hi}")
    if has_token_weights:
        if any(g[_M_TW_BAD] for g in rows_of):
            raise ValueError("token_weights must be finite and >= 0")
        if len({g[_M_TW_SUM] for g in rows_of}) > 1:
            raise ValueError("token_weights must be the same on every rank of the group")
    if len({g[_M_GRAD] for g in rows_of}) > 1:
        raise ValueError("hidden must require grad on every rank of the group or on none (the backward sums its "
                         "gradient over the group, which needs every rank)")
    return starts[rank], vocab


class VocabParallelFunction(torch.autograd.Function):
    """``apply(h, weight, bias, labels, token_weights, opts, reduction, backend, shard) -> (loss, lse)``.

    ``h`` (N, H) and ``labels`` (N,) int64 in the full vocabulary's numbering, identical on every rank; ``weight``
    (rows, H) and ``bias`` (rows,) this rank's shard; ``token_weights`` (N,) or None; ``opts`` an :class:`Options`,
    ``backend`` a :class:`Backend`, ``shard`` a :class:`Shard` from :func:`group_layout`, which has checked the
    layout, the labels' range and the token weights. ``loss`` and ``lse`` are as in
    :class:`._loss_autograd.LinearCrossEntropyFunction`, the same on every rank (lse is the full vocabulary's).
    """

    @staticmethod
    def forward(ctx, h, weight, bias, labels, token_weights, opts: Options, reduction: str, backend: Backend,
                shard: Shard):
        n = h.shape[0]
        acc = acc_dtype(h.dtype)
        start, vocab = shard.start, shard.vocab
        valid = labels != opts.ignore_index
        n_valid = int(valid.sum())
        all_valid = n_valid == n
        idx = None if all_valid else torch.nonzero(valid).squeeze(1)
        h_v = h if all_valid else h.index_select(0, idx)
        # this rank's row numbering: labels owned by another rank fall outside [0, rows) and match no column
        y_v = (labels if all_valid else labels.index_select(0, idx)) - start
        w_v = None
        if token_weights is not None:
            w_v = token_weights.to(acc)
            w_v = w_v if all_valid else w_v.index_select(0, idx)
        if backend.contiguous:
            h_v, weight, y_v = h_v.contiguous(), weight.contiguous(), y_v.contiguous()
            bias = None if bias is None else bias.contiguous()
        denom = float(w_v.sum()) if w_v is not None else float(n_valid)
        eps = opts.label_smoothing

        if n_valid:
            lse_r, target_r, sum_r = backend.lse_pass(h_v, weight, bias, y_v, opts)
            parts = [lse_r.to(acc), target_r.to(acc)] + ([sum_r.to(acc)] if eps > 0 else [])
            every = _gather_rows(torch.stack(parts), shard.group)  # (world, 2 or 3, n_valid)
            # combined in rank order on every rank: the same bytes everywhere
            lse = torch.logsumexp(every[:, 0], dim=0)
            target = every[:, 1].sum(0)
            loss_v = lse - (1.0 - eps) * target
            if eps > 0:
                loss_v = loss_v - (eps / vocab) * every[:, 2].sum(0)
            if opts.z_loss > 0:
                loss_v = loss_v + opts.z_loss * lse * lse
        else:
            lse = loss_v = torch.zeros(0, dtype=acc, device=h.device)
        if w_v is not None:
            loss_v = loss_v * w_v

        if reduction == "none":
            out = loss_v if all_valid else torch.zeros(n, dtype=acc, device=h.device).index_copy_(0, idx, loss_v)
        elif reduction == "sum":
            out = loss_v.sum()
        else:
            out = loss_v.sum() / denom if denom > 0 else loss_v.sum() * 0.0
        # as linear_cross_entropy returns it: float32 (float64 for float64 inputs), 0 at ignored positions
        lse_full = lse.clone() if all_valid else torch.zeros(n, dtype=acc, device=h.device).index_copy_(0, idx, lse)

        ctx.save_for_backward(h_v, weight, bias, y_v, w_v, lse, idx)
        ctx.opts, ctx.reduction, ctx.backend, ctx.shard = opts, reduction, backend, shard
        ctx.vocab, ctx.denom, ctx.n, ctx.h_dtype = vocab, denom, n, h.dtype
        ctx.mark_non_differentiable(lse_full)
        return out, lse_full

    @staticmethod
    def backward(ctx, grad_out, _grad_lse):
        h_v, weight, bias, y_v, w_v, lse, idx = ctx.saved_tensors
        need_h, need_w, need_b = ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[2]
        opts, acc = ctx.opts, lse.dtype
        if ctx.reduction == "none":
            g = grad_out.to(acc) if idx is None else grad_out.to(acc).index_select(0, idx)
        else:
            scale = grad_out.to(acc)
            if ctx.reduction == "mean":
                scale = scale / ctx.denom if ctx.denom > 0 else scale * 0.0
            g = scale.expand(lse.shape[0])
        if w_v is not None:
            g = g * w_v
        eps = opts.label_smoothing
        coef_p = (g * (1.0 + 2.0 * opts.z_loss * lse)).contiguous()
        coef_y = (g * (1.0 - eps)).contiguous()
        coef_u = (g * (eps / ctx.vocab)).contiguous()  # the full vocabulary's size: smoothing spreads over all of it

        n, hdim, dev = ctx.n, h_v.shape[1], h_v.device
        grad_h_v = grad_w = grad_b = None
        if lse.shape[0]:
            grad_h_v, grad_w, grad_b = ctx.backend.grad_pass(
                h_v, weight, bias, y_v, lse, coef_p, coef_y, coef_u, opts, (need_h, need_w, need_b))
        grad_h = grad_weight = grad_bias = None
        if need_h:
            if grad_h_v is None:  # no valid token (on every rank alike): nothing to sum
                grad_h_v = torch.zeros(lse.shape[0], hdim, dtype=acc, device=dev)
            elif ctx.shard.reduce_grad_hidden:
                # summed in the accumulation dtype, before any rounding to the input dtype
                torch.distributed.all_reduce(grad_h_v, group=ctx.shard.group)
            if idx is None:
                grad_h = grad_h_v.to(ctx.h_dtype)
            else:
                grad_h = torch.zeros(n, hdim, dtype=ctx.h_dtype, device=dev).index_copy_(
                    0, idx, grad_h_v.to(ctx.h_dtype))
        if need_w:
            grad_weight = torch.zeros_like(weight) if grad_w is None else grad_w.to(weight.dtype)
        if need_b:
            grad_bias = torch.zeros_like(bias) if grad_b is None else grad_b.to(bias.dtype)
        return grad_h, grad_weight, grad_bias, None, None, None, None, None, None
