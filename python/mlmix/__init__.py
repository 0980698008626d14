"""mlmix: language-balanced sampling, dedup, tokenization and sequence packing for multilingual
instruction tuning ("a pinch of multilinguality"), with a C++/CUDA core.

Everything heavier than numpy is imported lazily, on first use of the name that needs it.
"""

from __future__ import annotations

from ._lazy import lazy_exports

from .ragged import Ragged

# Imported eagerly: the submodule mlmix.pack shares its name with the function mlmix.pack, and binding
# the function after the import keeps `mlmix.pack(...)` a function however the submodule is imported.
from .pack import PackPlan, pack  # noqa: E402

# mlmix.study is the package (light: its names load lazily), callable as the function: mlmix.study(config).
from . import study  # noqa: E402

__version__ = "0.1.0"

# public name -> (module, attribute or None for the module itself)
_LAZY = {
    "StreamPacker": ("mlmix.pack", "StreamPacker"),
    "pack_stream": ("mlmix.pack", "pack_stream"),
    "StoreError": ("mlmix.store", "StoreError"),
    "write_store": ("mlmix.store", "write_store"),
    "open": ("mlmix.store", "open"),
    "Store": ("mlmix.store", "Store"),
    "StratifiedReservoir": ("mlmix.sample", "StratifiedReservoir"),
    "Mixture": ("mlmix.recipes", "Mixture"),
    "recipes": ("mlmix.recipes", None),
    "dedup": ("mlmix.dedup", None),
    "Tokenizer": ("mlmix.tokenize", "Tokenizer"),
    "Encoded": ("mlmix.tokenize", "Encoded"),
    "RecordError": ("mlmix.formats", "RecordError"),
    "build": ("mlmix.engine", "build"),
    "build_ray": ("mlmix.engine.ray", "build_ray"),
    "torch": ("mlmix.torch", None),
    "data": ("mlmix.data", None),
    "eval": ("mlmix.eval", None),
}

__all__ = ["Ragged", "pack", "PackPlan", "study", "build_info", "__version__", *_LAZY]


__getattr__, __dir__ = lazy_exports("mlmix", globals(), _LAZY)


def build_info() -> dict:
    """What this installation was compiled with: version, compiler, flags, backends (cpu, cuda)."""
    from ._core_loader import core

    info = dict(core.BUILD_INFO)
    info["package_version"] = __version__
    cuda_ok = False
    if "cuda" in info["backends"]:
        try:
            cuda_ok = bool(getattr(core, "cuda_device_count", lambda: 0)() > 0)
        except Exception:  # no driver on this machine
            cuda_ok = False
    info["cuda_device_available"] = cuda_ok
    return info
