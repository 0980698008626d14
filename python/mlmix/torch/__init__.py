"""PyTorch integration: the packed-store dataloader and the fused linear cross-entropy loss.

Names are imported lazily so that ``import mlmix.torch`` stays cheap until one is used.
"""

from __future__ import annotations

import importlib
from typing import Any

# public name -> module inside mlmix.torch
_LAZY = {
    "PackedDataset": "mlmix.torch.data",
    "PackedIterableDataset": "mlmix.torch.data",
    "DataLoader": "mlmix.torch.data",
    "linear_cross_entropy": "mlmix.torch.loss",
    "LinearCrossEntropy": "mlmix.torch.loss",
    "patch_causal_lm": "mlmix.torch.loss",
}

__all__ = list(_LAZY)


def __getattr__(name: str) -> Any:
    try:
        module = _LAZY[name]
    except KeyError:
        raise AttributeError(f"module 'mlmix.torch' has no attribute {name!r}") from None
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
