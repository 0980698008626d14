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


def test_patch_causal_lm_is_exact_on_packed_rows_under_default_configs_and_refuses_a_mixing_model(tmp_path):
    """patch_causal_lm outside the Trainer (model(**batch) in a plain loop, default config): the fused loss on
    mlmix's packed rows equals the per-example loss; a model that mixes packed examples fails on the first batch."""
    import mlmix
    from mlmix.hf import PackedRows
    from mlmix.torch import patch_causal_lm

    toks, mask = test_hf._examples(40)
    mlmix.write_store(str(tmp_path / "s"), toks, seq_len=48, loss_mask=mask)
    rows = PackedRows(str(tmp_path / "s"))
    batch = rows.collator()([rows[i] for i in range(4)])
    batch.pop("use_cache")  # what a hand-made batch looks like: nothing but the tensors
    model = test_hf._model().train()
    total, count = test_hf._per_example_loss_sum(model, rows, range(4))
    patch_causal_lm(model)
    fused = model(**batch).loss
    assert fused.detach().item() == pytest.approx((total / count).detach().item(), rel=1e-5)
    mixing = patch_causal_lm(_IgnoresPositions(test_hf._model().config).train())
    with pytest.raises(PackingError):
        mixing(**batch)
