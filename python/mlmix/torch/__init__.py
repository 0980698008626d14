"""PyTorch integration: the packed-store dataloader and the fused linear cross-entropy loss.

Names are imported lazily so that ``import mlmix.torch`` stays cheap until one is used.
"""

from __future__ import annotations

from .._lazy import lazy_exports

# public name -> module inside mlmix.torch
_LAZY = {
    "PackedDataset": "mlmix.torch.data",
    "PackedIterableDataset": "mlmix.torch.data",
    "DataLoader": "mlmix.torch.data",
    "linear_cross_entropy": "mlmix.torch.loss",
    "LinearCrossEntropy": "mlmix.torch.loss",
    "vocab_parallel_linear_cross_entropy": "mlmix.torch.loss",
    "patch_causal_lm": "mlmix.torch.loss",
    "check_packed_attention": "mlmix.torch.packing",
    "PackingError": "mlmix.torch.packing",
}

__all__ = list(_LAZY)


__getattr__, __dir__ = lazy_exports("mlmix.torch", globals(), _LAZY)
