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

The code is split by responsibility: this module holds the public API (:func:`linear_cross_entropy`,
:class:`LinearCrossEntropy`, :func:`vocab_parallel_linear_cross_entropy`, :func:`patch_causal_lm`) and the input
checks; ``_loss_autograd`` the ``torch.library`` custom ops and their autograd formula (what ``torch.compile``
sees); ``_loss_dispatch`` the choice of backend; ``_loss_parallel`` the vocabulary-parallel autograd function (the
output layer split by rows over a process group); ``_loss_cpu`` and ``_loss_cuda`` the two backends' passes;
``_loss_common`` what they share (options, the backend interface, block sizes); ``_hf_patch`` and ``_trl_head``
the transformers / TRL integration behind :func:`patch_causal_lm`.
"""

from __future__ import annotations

import math
from typing import Optional

from .._deps import require
from . import _loss_parallel
from ._hf_patch import PatchOptions, install
from ._loss_autograd import fused_linear_cross_entropy as _fused
from ._loss_common import Options as _Options
from ._loss_dispatch import IMPLS as _IMPLS
from ._loss_dispatch import backend as _backend
from ._loss_dispatch import resolve_impl as _resolve_impl
from ._trl_head import FusedHead as _FusedHead  # noqa: F401  (the name tests/test_loss_trl.py compares with)
from ._trl_head import trl_fused_head as _trl_fused_head

torch = require("torch", "mlmix.torch")

__all__ = ["linear_cross_entropy", "LinearCrossEntropy", "vocab_parallel_linear_cross_entropy", "patch_causal_lm"]

_REDUCTIONS = ("mean", "sum", "none")
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


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


def _flat_inputs(hidden, labels, token_weights, shift: bool, ignore_index: int):
    """(hidden (N, H), labels (N,) int64, token_weights (N,) or None), the labels and weights shifted if asked."""
    labels = labels.to(torch.int64)
    if shift:
        lead = tuple(labels.shape)
        pad = torch.full(lead[:-1] + (1,), ignore_index, dtype=torch.int64, device=labels.device)
        labels = torch.cat([labels[..., 1:], pad], dim=-1)
        if token_weights is not None:
            token_weights = torch.cat([token_weights[..., 1:], torch.zeros_like(token_weights[..., :1])], dim=-1)
    tw = None if token_weights is None else token_weights.reshape(-1)
    return hidden.reshape(-1, hidden.shape[-1]), labels.reshape(-1), tw


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
        return_lse: if True, also return the per-token log-sum-exp (float32, float64 for float64 inputs, shape
            ``labels.shape``, 0 at ignored positions). It is differentiable (``d lse / d logits = softmax``, through the softcap), so a term the
            caller builds on it (a z-loss) trains; the lse of an ignored position is the constant 0 and passes no
            gradient. On the CPU this selects the two-pass scheme when gradients are required.
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
    h2, y, tw = _flat_inputs(hidden, labels, token_weights, shift, ignore_index)
    opts = _Options(ignore_index, float(label_smoothing), float(z_loss),
                    None if softcap is None else float(softcap), token_block, vocab_block, bool(low_memory))
    loss, lse = _fused(h2, weight, bias, y, tw, opts, reduction, backend, lse_grad=bool(return_lse))
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


def vocab_parallel_linear_cross_entropy(
    hidden: "torch.Tensor",
    weight: "torch.Tensor",
    labels: "torch.Tensor",
    *,
    process_group=None,
    vocab_start_index: Optional[int] = None,
    bias: Optional["torch.Tensor"] = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    softcap: Optional[float] = None,
    token_weights: Optional["torch.Tensor"] = None,
    shift: bool = False,
    return_lse: bool = False,
    reduce_grad_hidden: bool = True,
    impl: str = "auto",
    token_block: int = 0,
    vocab_block: int = 0,
):
    """:func:`linear_cross_entropy` with the output layer split by vocabulary rows over a process group.

    Tensor parallelism of the output layer, as in Megatron-LM: every rank of ``process_group`` passes the same
    ``hidden``, ``labels`` (and ``token_weights``) and its own block of rows of the full (V, H) weight. Each rank
    computes its rows' partial log-sum-exp and target logit block by block (no logits are materialised); one
    ``all_gather`` of three floats per token combines them, and every rank returns the loss of the full vocabulary
    (the same bytes on every rank). In the backward each rank's weight and bias gradients cover its own rows and
    stay local, and the hidden-state gradient is summed over the group with one ``all_reduce``, so that every rank
    gets the full ``d loss / d hidden``, as Megatron's column-parallel output layer gives it back to the replicated
    hidden states. Every rank must call the function and backpropagate through it.

    Args:
        hidden: (tokens, H) or (batch, seq, H), identical on every rank.
        weight: (rows, H), this rank's rows ``[start, start + rows)`` of the (V, H) output weight; the shards of
            the group tile ``[0, V)`` (they may differ in size, e.g. V not divisible by the group size).
        labels: as in :func:`linear_cross_entropy`, numbered in the full vocabulary ``[0, V)``, identical on every
            rank.
        process_group: the ``torch.distributed`` group that holds the shards (None: the default group).
        vocab_start_index: this rank's first row ``start``; None (on every rank) means rank-ordered shards: rank r
            starts after the rows of ranks 0..r-1 (Megatron's layout, also with uneven shards).
        bias: this rank's (rows,) slice of the bias, or None.
        reduce_grad_hidden: sum the hidden-state gradient over the group in the backward (default). Pass False
            when the layer before already all-reduces it (e.g. your own ``copy_to_tensor_model_parallel_region``):
            each rank then gets only its rows' part.
        ignore_index, reduction, label_smoothing, z_loss, softcap, token_weights, shift, impl, token_block,
        vocab_block: as in :func:`linear_cross_entropy` (label smoothing spreads over the full V; ``z_loss``
        uses the full lse). The two-pass scheme always runs (the one-pass CPU mode needs the full vocabulary).
        return_lse: also return the full vocabulary's per-token log-sum-exp (float32, float64 for float64 inputs;
            not differentiable).

    Returns:
        As :func:`linear_cross_entropy`: the loss over the full vocabulary, the same on every rank.

    Raises ``ValueError``, on every rank alike, when the shards do not tile ``[0, V)``, when the ranks disagree
    on the number of tokens, the hidden size, the labels or the token weights, or for a label outside ``[0, V)``
    of the full vocabulary (one small ``all_gather`` of sizes and checksums per call checks this).
    """
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        raise ValueError("process_group: vocab_parallel_linear_cross_entropy needs an initialised torch.distributed "
                         "process group (torch.distributed.init_process_group), got none")
    group = dist.group.WORLD if process_group is None else process_group
    if dist.get_rank(group) < 0:
        raise ValueError(f"process_group must contain this process (global rank {dist.get_rank()}), "
                         f"got {process_group!r}")
    # this rank's own checks; an error joins the group's layout check below, so that the other ranks raise too
    # instead of waiting for this one in a collective
    local_error = flat = backend = None
    try:
        _check_inputs(hidden, weight, labels, bias, token_weights, reduction, label_smoothing, z_loss, softcap)
        if not isinstance(ignore_index, int):
            raise TypeError(f"ignore_index must be an int, got {ignore_index!r}")
        for name, val in (("token_block", token_block), ("vocab_block", vocab_block)):
            if not isinstance(val, int) or val < 0:
                raise ValueError(f"{name} must be an int >= 0 (0 = automatic), got {val!r}")
        if vocab_start_index is not None and (isinstance(vocab_start_index, bool)
                                              or not isinstance(vocab_start_index, int) or vocab_start_index < 0):
            raise ValueError(f"vocab_start_index must be None or an int >= 0, got {vocab_start_index!r}")
        backend = _resolve_impl(impl, hidden.device, hidden.dtype)
        flat = _flat_inputs(hidden, labels, token_weights, shift, ignore_index)
    except (TypeError, ValueError, RuntimeError) as e:
        local_error = e
    h2, y, tw = flat if flat is not None else (None, None, None)
    need_h = torch.is_grad_enabled() and isinstance(hidden, torch.Tensor) and hidden.requires_grad
    start, vocab = _loss_parallel.group_layout(h2, weight, y, tw, ignore_index, group, vocab_start_index, need_h,
                                               local_error)
    lead = tuple(labels.shape)
    opts = _Options(ignore_index, float(label_smoothing), float(z_loss),
                    None if softcap is None else float(softcap), token_block, vocab_block, True)
    shard = _loss_parallel.Shard(group, start, vocab, bool(reduce_grad_hidden))
    loss, lse = _loss_parallel.VocabParallelFunction.apply(h2, weight, bias, y, tw, opts, reduction, _backend(backend),
                                                           shard)
    if reduction == "none":
        loss = loss.view(lead)
    if return_lse:
        return loss, lse.view(lead)
    return loss


# --------------------------------------------------------------------------------------------------------------
# transformers / TRL integration


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

    FSDP2 (``torch.distributed.fsdp.fully_shard``) may shard the model before or after patching, with the output
    layer in the root's group (with or without per-layer groups) or in a group of its own (with the embedding
    when the weights are tied): where ``lm_head`` is an FSDP2 module the loss runs as its forward (``lm_head(hidden)``), so
    FSDP2 gathers, reshards and reduce-scatters its weight as for the model's own call. An output weight sharded
    any other way (a DTensor from tensor parallelism, an FSDP1-wrapped head) raises ``ValueError``; see
    :func:`vocab_parallel_linear_cross_entropy` for a vocabulary-parallel head.

    The model must be called through ``model(...)`` (``nn.Module.__call__``) for the pre-hook to see TRL's calls;
    a wrapper that calls the inner model's ``.forward`` directly (PEFT's tuners) bypasses it when the model was
    patched before TRL's head was added, and TRL's head then runs (PEFT models are untested). Patching twice with
    the same options is a no-op; with other options it raises. Returns the model.
    """
    if impl not in _IMPLS:
        raise ValueError(f"impl must be one of {_IMPLS}, got {impl!r}")
    # the patched forward calls the fused loss and TRL's settings reader that these options carry: passed from
    # here (this module's names when the model is patched), so that _hf_patch imports nothing of this module
    opts = PatchOptions(impl, float(z_loss), float(label_smoothing), bool(eval_logits),
                        loss=linear_cross_entropy, find_trl_head=_trl_fused_head)
    return install(model, opts)
