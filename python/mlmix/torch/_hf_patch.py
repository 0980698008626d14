"""What :func:`mlmix.torch.patch_causal_lm` does to a transformers causal LM: the forward it installs, and its routing.

The installed forward sends training calls with labels through the backbone and :func:`mlmix.torch.linear_cross_entropy`
(no logits), ``fused_lm_head=True`` calls (TRL's trainers) to TRL's ``FusedCausalLMOutput`` computed with mlmix
(:mod:`._trl_head`), and everything else (evaluation with logits, generation) to the model's original forward.
The public entry point and its documentation are in :mod:`mlmix.torch.loss`, which passes in the two functions
the forward calls (:class:`PatchOptions`): the fused loss and the reader of TRL's settings.
"""

from __future__ import annotations

import contextlib
import functools
import math
import types
from dataclasses import dataclass, field
from typing import Callable

from .._deps import require
from ._trl_head import TOKEN_STATS, FusedHead, NextTokenStats

torch = require("torch", "mlmix.torch")

# keyword that carries a fused-head request past a forward wrapped over the mlmix one (see _fused_lm_head_pre_hook)
_FUSED_KWARG = "_mlmix_fused_lm_head"


@dataclass(frozen=True)
class PatchOptions:
    """A patched model's settings (``model._mlmix_patch``) and the functions its forward calls.

    ``loss``: :func:`mlmix.torch.linear_cross_entropy`; ``find_trl_head``: ``model -> FusedHead or None``
    (:func:`._trl_head.trl_fused_head`). Two options are equal when the settings are: patching again with the same
    settings is a no-op.
    """

    impl: str
    z_loss: float
    label_smoothing: float
    eval_logits: bool
    loss: Callable = field(compare=False, repr=False)
    find_trl_head: Callable = field(compare=False, repr=False)


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


def _fsdp_module_class():
    """FSDP2's ``FSDPModule`` (the class ``fully_shard`` gives a module), or None where torch has no FSDP2."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:
        return None
    return FSDPModule


def _with_head(head, hidden, fn):
    """``fn(head, hidden)``, run where the output layer's parameters are what the model's own forward would see.

    ``fn`` reads ``head.weight`` (and bias) outside ``head.forward``. That is right for a plain module and for one
    inside a larger FSDP2 group (``fully_shard(model)``: the root's forward has gathered it). An output layer that
    is an FSDP2 module of its own (``fully_shard(model.lm_head)``, or ``fully_shard([embed, lm_head])`` for tied
    weights) holds only its shard until its own forward is called, and must reshard, and gather again for the
    backward, at the points FSDP2 chose: so ``fn`` runs as that module's forward, through ``head(hidden)``, which
    runs FSDP2's hooks (all-gather, mixed-precision cast of ``hidden``, reshard after forward, the backward's
    all-gather and reduce-scatter) exactly as for the model's own ``lm_head(hidden)`` call. The head's forward is
    replaced for the duration of that one call only.

    Anything else that shards the weight (a DTensor outside an FSDP2 forward: tensor parallelism through
    ``parallelize_module``, an FSDP1 wrapper around the head) raises ``ValueError`` rather than computing a loss
    from a shard.
    """
    fsdp2 = _fsdp_module_class()
    if fsdp2 is not None and isinstance(head, fsdp2):
        had_own = "forward" in head.__dict__
        own = head.__dict__.get("forward")
        head.forward = lambda h: fn(head, h)
        try:
            return head(hidden)
        finally:
            if had_own:
                head.forward = own
            else:
                del head.forward
    if type(head).__name__ == "FullyShardedDataParallel" or _is_dtensor(head.weight):
        raise ValueError(
            f"patch_causal_lm: the output layer's weight is sharded outside an FSDP2 forward ({type(head).__name__} "
            f"with weight {type(head.weight).__name__}): it supports FSDP2 (torch.distributed.fsdp.fully_shard) on "
            "the whole model, on lm_head or on a group holding lm_head; for a vocabulary-parallel output layer call "
            "mlmix.torch.vocab_parallel_linear_cross_entropy with the local rows")
    return fn(head, hidden)


def _is_dtensor(t) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:
        return False
    return isinstance(t, DTensor)


def _base_model(model):
    base = getattr(model, model.base_model_prefix, None)
    if base is None or base is model:
        raise ValueError(f"patch_causal_lm needs a causal LM whose backbone is its '{model.base_model_prefix}' "
                         f"attribute, got {type(model).__name__}")
    return base


def _fused_lm_head_output(model, args, kwargs, labels, shift_labels, num_items_in_batch, spec: FusedHead,
                          opts: PatchOptions):
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
    unknown = set(spec.outputs) - {"log_probs", *TOKEN_STATS}
    if unknown:
        raise ValueError(f"fused LM head outputs must be among {('log_probs',) + TOKEN_STATS}, got {sorted(unknown)}")
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
    scale = _logit_scale(text_config) / spec.temperature
    mask = targets != -100
    wanted = tuple(name for name in TOKEN_STATS if name in spec.outputs)

    def head_outputs(head, hidden):
        h, w, b, autocast_off = _head_operands(hidden, head, scale, spec.cast_lm_head_to_fp32)
        with autocast_off:
            log_probs = -opts.loss(h, w, targets, bias=b, reduction="none", softcap=cap, impl=opts.impl)
            stats = [None] * len(TOKEN_STATS)
            if wanted:
                idx = torch.nonzero(mask.reshape(-1)).squeeze(1)
                h_v = h.reshape(-1, h.shape[-1]).index_select(0, idx)
                y_v = targets.reshape(-1).index_select(0, idx)
                for i, t in enumerate(NextTokenStats.apply(h_v, w, b, y_v, cap, wanted)):
                    if t is not None:
                        # scattered into zeros: every field is 0 (False) at ignored positions, as in TRL
                        stats[i] = t.new_zeros(mask.numel()).index_copy(0, idx, t).view(mask.shape)
        return log_probs, stats

    log_probs, stats = _with_head(head, hidden, head_outputs)
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
    opts: PatchOptions = self._mlmix_patch
    spec = kwargs.pop(_FUSED_KWARG, None)
    if fused_lm_head and spec is None:
        spec = opts.find_trl_head(self) or FusedHead()
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
    scale = _logit_scale(text_config)
    reduction = "mean" if num_items_in_batch is None else "sum"

    def head_loss(head, hidden):
        h, w, b, autocast_off = _head_operands(hidden, head, scale)
        with autocast_off:
            return opts.loss(h, w, targets.to(w.device), bias=b, shift=shift, reduction=reduction, softcap=softcap,
                             z_loss=opts.z_loss, label_smoothing=opts.label_smoothing, impl=opts.impl)

    loss = _with_head(head, outputs.last_hidden_state, head_loss)
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
    spec = module._mlmix_patch.find_trl_head(module) or FusedHead()
    return args, {**kwargs, "fused_lm_head": False, _FUSED_KWARG: spec}


def install(model, opts: PatchOptions):
    """Patch ``model`` (see :func:`mlmix.torch.patch_causal_lm`): check that it is a causal LM with an output head
    and a usable logit scale, then replace its forward and add the pre-hook. Returns the model."""
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
