"""mlmix.torch.check_packed_attention: passes models that keep packed examples apart, refuses one that does not."""

from __future__ import annotations

import os
import sys

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import test_hf  # noqa: E402

from mlmix.torch import PackingError, check_packed_attention  # noqa: E402


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_default_configs_keep_examples_apart(kind, impl):
    model = test_hf._model(kind, impl).train()
    check_packed_attention(model, cache=False)
    assert model.training  # the mode is restored


class _IgnoresPositions(transformers.LlamaForCausalLM):
    """A model whose forward drops position_ids, as some remote-code models do."""

    def forward(self, *args, position_ids=None, **kwargs):
        return super().forward(*args, **kwargs)


def test_a_model_that_mixes_examples_is_refused():
    model = _IgnoresPositions(test_hf._model().config)
    with pytest.raises(PackingError, match="lets packed examples attend to each other"):
        check_packed_attention(model)
