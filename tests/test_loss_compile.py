"""``torch.compile(..., fullgraph=True)`` over mlmix's fused loss: no graph break, and the loss and gradients of
the eager run.

The loss runs as the ``torch.library`` custom ops ``mlmix::lce_forward`` / ``mlmix::lce_backward``, which dynamo
and inductor keep opaque. Checked on a module that calls :func:`linear_cross_entropy` in its forward (several
option sets, the differentiable lse included) and on a tiny transformers causal LM patched with
:func:`patch_causal_lm`, compiled with inductor on the CPU.
"""

from __future__ import annotations

import copy
import warnings

import pytest

torch = pytest.importorskip("torch")
with warnings.catch_warnings():
    # inductor's import chain (torch.utils.mkldnn) defines a TorchScript module, and torch 2.13 warns that
    # TorchScript is deprecated: torch's own warning, which pytest's filterwarnings="error" would turn into a
    # compile failure. Imported once here with that one warning silenced.
    warnings.filterwarnings("ignore", message="`torch.jit.script_method` is deprecated", category=DeprecationWarning)
    import torch._inductor.compile_fx  # noqa: F401
from mlmix.torch import linear_cross_entropy, patch_causal_lm

from test_loss import IGNORE, make_inputs, rel_err

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    yield
    torch._dynamo.reset()


def graph_breaks() -> int:
    return sum(torch._dynamo.utils.counters["graph_break"].values())


class Head(torch.nn.Module):
    """A projection, then the fused loss against an output embedding (what a causal LM's head does)."""

    def __init__(self, hidden: int, vocab: int, *, bias: bool, **loss_kw):
        super().__init__()
        self.proj = torch.nn.Linear(hidden, hidden)
        self.out = torch.nn.Linear(hidden, vocab, bias=bias)
        self.loss_kw = loss_kw

    def forward(self, x, labels, token_weights=None):
        h = torch.nn.functional.gelu(self.proj(x))
        out = linear_cross_entropy(h, self.out.weight, labels, bias=self.out.bias, token_weights=token_weights,
                                   **self.loss_kw)
        if isinstance(out, tuple):  # return_lse: a z-loss from the returned lse, as cut-cross-entropy users write
            loss, lse = out
            return loss.sum() + 1e-4 * (lse ** 2).mean()
        return out.sum()


def run_step(model, *args):
    """Loss and parameter gradients of one step; ``model`` may be the torch.compile wrapper of a module."""
    params = getattr(model, "_orig_mod", model).named_parameters()
    for p in model.parameters():
        p.grad = None
    loss = model(*args)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in params if p.grad is not None}


CASES = {
    "mean": dict(),
    "mean-low-memory-shift": dict(shift=True, low_memory=True, label_smoothing=0.1),
    "none-softcap-zloss": dict(reduction="none", softcap=4.0, z_loss=1e-3),
    "sum-lse": dict(reduction="sum", return_lse=True, label_smoothing=0.05),
    "mean-lse-softcap-shift": dict(return_lse=True, softcap=3.0, shift=True),
}


# inductor (the default backend) on two cases; "aot_eager" (dynamo + AOTAutograd without code generation: the same
# graph capture, fake implementations and autograd formulas, minus inductor's C++ compile time) on the others
BACKENDS = {"mean": "inductor", "mean-lse-softcap-shift": "inductor"}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", list(CASES))
def test_compiled_module_matches_eager(case, device):
    kw = CASES[case]
    torch.manual_seed(0)
    model = Head(16, 67, bias=case.startswith("sum"), token_block=5, vocab_block=16, **kw).to(device)
    x, _, _, y, tw = make_inputs((2, 9), 16, 67, weights=True, seed=3)
    args = (x.to(device), y.to(device), tw.to(device))
    eager_loss, eager_grads = run_step(model, *args)
    compiled = torch.compile(copy.deepcopy(model), fullgraph=True, backend=BACKENDS.get(case, "aot_eager"))
    loss, grads = run_step(compiled, *args)
    assert graph_breaks() == 0
    assert rel_err(loss, eager_loss) < 1e-6
    assert set(grads) == set(eager_grads)
    for name, g in eager_grads.items():
        assert rel_err(grads[name], g) < 1e-5, name
    # a second step reuses the compiled graph (no recompilation for new values)
    x2 = torch.randn_like(args[0])
    eager_loss2, _ = run_step(model, x2, *args[1:])
    loss2, _ = run_step(compiled, x2, *args[1:])
    assert rel_err(loss2, eager_loss2) < 1e-6
    assert graph_breaks() == 0


def test_explain_reports_one_graph_and_the_custom_ops():
    torch.manual_seed(0)
    model = Head(8, 33, bias=True, return_lse=True)
    x, _, _, y, _ = make_inputs((12,), 8, 33, seed=1)
    explanation = torch._dynamo.explain(model)(x, y)
    assert explanation.graph_break_count == 0 and explanation.graph_count == 1
    code = explanation.graphs[0].code
    assert "mlmix.lce_forward" in code


def test_bad_labels_raise_value_error_inside_a_compiled_graph():
    torch.manual_seed(0)
    model = torch.compile(Head(8, 33, bias=False), fullgraph=True, backend="aot_eager")
    x, _, _, y, _ = make_inputs((12,), 8, 33, seed=1)
    model(x, y)
    y[3] = 40
    with pytest.raises(ValueError, match="labels must lie in"):
        model(x, y)


def tiny_causal_lm(kind: str):
    transformers = pytest.importorskip("transformers")
    config = transformers.AutoConfig.for_model(kind, vocab_size=97, hidden_size=32, intermediate_size=64,
                                               num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
                                               max_position_embeddings=64)
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(config)


# Qwen2 through inductor, as users compile; Llama through aot_eager (the same capture, no C++ code generation)
@pytest.mark.parametrize("kind,backend", [("qwen2", "inductor"), ("llama", "aot_eager")])
def test_compiled_patched_causal_lm_matches_eager(kind, backend):
    model = patch_causal_lm(tiny_causal_lm(kind))
    model.train()
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(0, 97, (2, 13), generator=g)
    labels = ids.clone()
    labels[0, :4] = IGNORE  # a masked prompt

    def step(m):
        for p in m.parameters():
            p.grad = None
        out = m(input_ids=ids, labels=labels)
        assert out.logits is None
        out.loss.backward()
        params = getattr(m, "_orig_mod", m).named_parameters()
        return out.loss.detach(), {n: p.grad.clone() for n, p in params if p.grad is not None}

    eager_model = copy.deepcopy(model)
    eager_loss, eager_grads = step(eager_model)
    compiled = torch.compile(model, fullgraph=True, backend=backend)
    loss, grads = step(compiled)
    assert graph_breaks() == 0
    assert rel_err(loss, eager_loss) < 1e-5
    assert set(grads) == set(eager_grads)
    for name, want in eager_grads.items():
        assert rel_err(grads[name], want) < 1e-4, name
