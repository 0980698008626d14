"""mlmix.torch.linear_cross_entropy against the materialised reference F.cross_entropy(h @ W.T + b) in float64."""

from __future__ import annotations

import copy
import itertools
import math

import pytest

torch = pytest.importorskip("torch")
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from mlmix.torch import LinearCrossEntropy, linear_cross_entropy, patch_causal_lm

IGNORE = -100


def reference(h, w, y, *, bias=None, ignore_index=IGNORE, reduction="mean", label_smoothing=0.0, z_loss=0.0,
              softcap=None, token_weights=None, shift=False):
    """The obvious materialised loss, in float64."""
    vocab = w.shape[0]
    if shift:
        y = torch.cat([y[..., 1:], torch.full_like(y[..., :1], ignore_index)], dim=-1)
        if token_weights is not None:
            token_weights = torch.cat([token_weights[..., 1:], torch.zeros_like(token_weights[..., :1])], dim=-1)
    logits = h.double() @ w.double().T
    if bias is not None:
        logits = logits + bias.double()
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    flat, yf = logits.reshape(-1, vocab), y.reshape(-1).long()
    valid = yf != ignore_index
    per = F.cross_entropy(flat, yf, ignore_index=ignore_index, reduction="none", label_smoothing=label_smoothing)
    if z_loss:
        per = per + z_loss * torch.logsumexp(flat, -1) ** 2 * valid
    tw = torch.ones_like(per) if token_weights is None else token_weights.reshape(-1).double()
    per = per * tw * valid
    if reduction == "none":
        return per.view(y.shape)
    if reduction == "sum":
        return per.sum()
    denom = (tw * valid).sum()
    return per.sum() / denom if denom > 0 else per.sum() * 0.0


def make_inputs(shape, hidden, vocab, *, dtype=torch.float32, bias=False, ignore_frac=0.2, weights=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(*shape, hidden, generator=g).to(dtype)
    w = (torch.randn(vocab, hidden, generator=g) / math.sqrt(hidden) * 2).to(dtype)
    b = (torch.randn(vocab, generator=g) * 0.5).to(dtype) if bias else None
    y = torch.randint(0, vocab, shape, generator=g)
    y[torch.rand(shape, generator=g) < ignore_frac] = IGNORE
    tw = torch.rand(shape, generator=g) * 2 if weights else None
    return h, w, b, y, tw


def rel_err(a, b):
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


def close(a, b, rel=1e-5, abs_=1e-5):
    """Relative error under ``rel``, or everything under ``abs_`` (a loss that is exactly 0 for vocab = 1)."""
    return rel_err(a, b) < rel or float((a.detach().double() - b.detach().double()).abs().max()) < abs_


def loss_and_grads(fn, h, w, b, y, grad_out_seed=1, **kw):
    leaves = [t.detach().clone().requires_grad_(True) for t in (h, w) + ((b,) if b is not None else ())]
    out = fn(leaves[0], leaves[1], y, bias=leaves[2] if b is not None else None, **kw)
    if out.dim():
        g = torch.Generator().manual_seed(grad_out_seed)
        go = torch.randn(out.shape, generator=g).to(out.dtype).to(out.device)
    else:
        go = torch.ones((), dtype=out.dtype, device=out.device)
    grads = torch.autograd.grad(out, leaves, grad_outputs=go)
    return out, grads


# every combination of reduction, smoothing, z-loss, softcap, bias and token weights; shift alternates
OPTIONS = [(*combo, i % 2 == 1) for i, combo in enumerate(itertools.product(
    ("mean", "sum", "none"), (0.0, 0.1), (0.0, 1e-3), (None, 4.0), (False, True), (False, True)))]


@pytest.mark.parametrize("reduction,smoothing,z,cap,bias,weights,shift", OPTIONS)
def test_matches_reference_fp32_every_option(reduction, smoothing, z, cap, bias, weights, shift):
    h, w, b, y, tw = make_inputs((2, 9), 16, 37, bias=bias, weights=weights, seed=len(str((reduction, z, cap))))
    kw = dict(reduction=reduction, label_smoothing=smoothing, z_loss=z, softcap=cap, token_weights=tw, shift=shift)
    # small blocks so that several token and vocabulary blocks (and a ragged last one) are exercised
    low_memory = bias  # half the combinations through each CPU scheme (one pass / logits recomputed)
    out, grads = loss_and_grads(linear_cross_entropy, h, w, b, y, token_block=5, vocab_block=8,
                                low_memory=low_memory, **kw)
    ref, ref_grads = loss_and_grads(reference, h.double(), w.double(), None if b is None else b.double(), y, **kw)
    assert out.dtype == torch.float32 and out.shape == ref.shape
    assert rel_err(out, ref) < 1e-5
    for got, want in zip(grads, ref_grads):
        assert got.dtype == torch.float32
        assert rel_err(got, want) < 1e-5


@pytest.mark.parametrize("low_memory", [False, True])
@pytest.mark.parametrize("blocks", [(0, 0), (7, 13), (1000, 3)])
def test_odd_shapes_fp32(blocks, low_memory):
    # Liger's odd shape: batch 4, seq 47, hidden 31, vocab 123
    h, w, b, y, _ = make_inputs((4, 47), 31, 123, bias=True, seed=3)
    tb, vb = blocks
    out, grads = loss_and_grads(linear_cross_entropy, h, w, b, y, token_block=tb, vocab_block=vb,
                                low_memory=low_memory)
    ref, ref_grads = loss_and_grads(reference, h.double(), w.double(), b.double(), y)
    assert rel_err(out, ref) < 1e-5
    for got, want in zip(grads, ref_grads):
        assert rel_err(got, want) < 1e-5


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_inputs(dtype):
    h, w, b, y, tw = make_inputs((3, 21), 24, 77, dtype=dtype, bias=True, weights=True, seed=5)
    kw = dict(label_smoothing=0.05, z_loss=1e-4, token_weights=tw)
    out, grads = loss_and_grads(linear_cross_entropy, h, w, b, y, vocab_block=16, **kw)
    # the reference sees exactly the same (rounded) inputs, in float64
    ref, ref_grads = loss_and_grads(reference, h.double(), w.double(), b.double(), y, **kw)
    # the loss stays in float32 (accumulated in float32, never rounded to the input dtype)
    assert out.dtype == torch.float32
    assert rel_err(out, ref) < 1e-5
    # the gradients are rounded once to the input dtype (2^-8 relative for bfloat16)
    tol = 2 ** -7 if dtype == torch.bfloat16 else 2 ** -10
    for got, want in zip(grads, ref_grads):
        assert got.dtype == dtype
        assert rel_err(got, want) < tol


def test_float64_is_exact():
    h, w, b, y, _ = make_inputs((50,), 8, 29, dtype=torch.float64, bias=True, seed=7)
    out, grads = loss_and_grads(linear_cross_entropy, h, w, b, y, label_smoothing=0.2, softcap=3.0, vocab_block=6)
    ref, ref_grads = loss_and_grads(reference, h, w, b, y, label_smoothing=0.2, softcap=3.0)
    assert rel_err(out, ref) < 1e-12
    for got, want in zip(grads, ref_grads):
        assert rel_err(got, want) < 1e-12


@settings(max_examples=25, deadline=None)
@given(
    n=st.integers(1, 40), hidden=st.integers(1, 20), vocab=st.integers(1, 70), tb=st.integers(0, 17),
    vb=st.integers(0, 33), ignore_frac=st.sampled_from([0.0, 0.3, 0.9]), seed=st.integers(0, 2**16),
    reduction=st.sampled_from(["mean", "sum", "none"]),
)
def test_property_random_shapes_and_blocks(n, hidden, vocab, tb, vb, ignore_frac, seed, reduction):
    h, w, b, y, tw = make_inputs((n,), hidden, vocab, bias=seed % 2 == 0, weights=seed % 3 == 0,
                                 ignore_frac=ignore_frac, seed=seed)
    kw = dict(reduction=reduction, token_weights=tw, label_smoothing=0.1 if seed % 5 == 0 else 0.0)
    out, grads = loss_and_grads(linear_cross_entropy, h, w, b, y, token_block=tb, vocab_block=vb,
                                low_memory=seed % 7 < 3, **kw)
    ref, ref_grads = loss_and_grads(reference, h.double(), w.double(), None if b is None else b.double(), y, **kw)
    assert close(out, ref)
    for got, want in zip(grads, ref_grads):
        assert close(got, want)


@pytest.mark.parametrize("low_memory", [False, True])
def test_scalar_grad_output_and_second_backward(low_memory):
    h, w, b, y, tw = make_inputs((20,), 8, 31, bias=True, weights=True, seed=17)
    leaves = [t.clone().requires_grad_(True) for t in (h, w, b)]
    loss = linear_cross_entropy(*leaves[:2], y, bias=leaves[2], token_weights=tw, low_memory=low_memory)
    first = torch.autograd.grad(loss, leaves, grad_outputs=torch.tensor(-2.5), retain_graph=True)
    second = torch.autograd.grad(loss, leaves, grad_outputs=torch.tensor(0.5))
    ref_leaves = [t.double().requires_grad_(True) for t in (h, w, b)]
    ref = reference(*ref_leaves[:2], y, bias=ref_leaves[2], token_weights=tw)
    want = torch.autograd.grad(ref, ref_leaves)
    for g1, g2, r in zip(first, second, want):
        assert rel_err(g1, -2.5 * r) < 1e-5
        assert rel_err(g2, 0.5 * r) < 1e-5


def test_return_lse_and_module():
    h, w, b, y, _ = make_inputs((3, 8), 12, 40, bias=True, seed=11)
    loss, lse = linear_cross_entropy(h, w, y, bias=b, return_lse=True, vocab_block=9)
    logits = h.double() @ w.double().T + b.double()
    want = torch.where(y != IGNORE, torch.logsumexp(logits, -1), torch.zeros(()).double())
    assert lse.shape == y.shape and lse.dtype == torch.float32
    assert rel_err(lse, want) < 1e-6
    assert not lse.requires_grad
    assert rel_err(loss, reference(h, w, y, bias=b)) < 1e-5
    module = LinearCrossEntropy(reduction="sum", label_smoothing=0.1)
    assert "reduction='sum'" in repr(module)
    got = module(h, w, y, bias=b)
    assert rel_err(got, reference(h, w, y, bias=b, reduction="sum", label_smoothing=0.1)) < 1e-5


def test_public_names_are_the_same_objects_wherever_they_are_imported_from():
    import mlmix.torch
    from mlmix.torch import loss as loss_mod

    assert set(loss_mod.__all__) == {"linear_cross_entropy", "LinearCrossEntropy", "patch_causal_lm",
                                     "vocab_parallel_linear_cross_entropy"}
    for name in loss_mod.__all__:
        assert getattr(mlmix.torch, name) is getattr(loss_mod, name)
    assert (linear_cross_entropy, LinearCrossEntropy, patch_causal_lm) == (
        loss_mod.linear_cross_entropy, loss_mod.LinearCrossEntropy, loss_mod.patch_causal_lm)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_all_ignored_gives_zero_and_zero_grads(reduction):
    h, w, b, y, _ = make_inputs((2, 5), 8, 11, bias=True, ignore_frac=1.0)
    assert bool((y == IGNORE).all())
    out, grads = loss_and_grads(linear_cross_entropy, h, w, b, y, reduction=reduction)
    assert bool((out == 0).all()) and not bool(out.isnan().any())
    for g in grads:
        assert bool((g == 0).all())


def test_zero_token_weights_mean_is_zero():
    h, w, b, y, _ = make_inputs((6,), 8, 11, ignore_frac=0.0)
    out, grads = loss_and_grads(linear_cross_entropy, h, w, b, y, token_weights=torch.zeros(6))
    assert float(out.detach()) == 0.0 and all(bool((g == 0).all()) for g in grads)


def test_no_grad_forward_and_determinism():
    h, w, b, y, _ = make_inputs((64,), 16, 301, bias=True, seed=2)
    with torch.no_grad():
        a = linear_cross_entropy(h, w, y, bias=b, reduction="none")
    b2 = linear_cross_entropy(h, w, y, bias=b, reduction="none")
    assert torch.equal(a, b2.detach())
    _, g1 = loss_and_grads(linear_cross_entropy, h, w, b, y)
    _, g2 = loss_and_grads(linear_cross_entropy, h, w, b, y)
    assert all(torch.equal(x, z) for x, z in zip(g1, g2))


def test_non_finite_hidden_gives_nan_for_that_token_only():
    h, w, _, y, _ = make_inputs((6,), 8, 11, ignore_frac=0.0)
    h[2, 3] = float("nan")
    h[4, 0] = float("inf")
    out = linear_cross_entropy(h, w, y, reduction="none")
    ref = reference(h, w, y, reduction="none")
    assert torch.equal(out.isnan(), ref.isnan())
    assert bool(out.isnan()[[2, 4]].all())
    assert rel_err(out[[0, 1, 3, 5]], ref[[0, 1, 3, 5]]) < 1e-5
    assert linear_cross_entropy(h, w, y).isnan()


def test_bad_inputs_raise_clear_errors():
    h, w, b, y, _ = make_inputs((2, 5), 8, 11, bias=True)
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 11\).*got label 11"):
        linear_cross_entropy(h, w, torch.where(y == IGNORE, y, torch.full_like(y, 11)))
    with pytest.raises(ValueError, match="got label -3"):
        linear_cross_entropy(h, w, torch.full_like(y, -3))
    with pytest.raises(ValueError, match="weight.dtype must equal hidden.dtype"):
        linear_cross_entropy(h, w.double(), y)
    with pytest.raises(ValueError, match="weight must be"):
        linear_cross_entropy(h, w[:, :7], y)
    with pytest.raises(ValueError, match="labels must have shape"):
        linear_cross_entropy(h, w, y[:, :4])
    with pytest.raises(ValueError, match="labels must be an integer tensor"):
        linear_cross_entropy(h, w, y.float())
    with pytest.raises(ValueError, match="hidden must be"):
        linear_cross_entropy(h[0, 0], w, y[0, 0])
    with pytest.raises(ValueError, match="bias must have shape"):
        linear_cross_entropy(h, w, y, bias=b[:3])
    with pytest.raises(ValueError, match="reduction must be one of"):
        linear_cross_entropy(h, w, y, reduction="avg")
    with pytest.raises(ValueError, match="label_smoothing"):
        linear_cross_entropy(h, w, y, label_smoothing=1.5)
    with pytest.raises(ValueError, match="z_loss"):
        linear_cross_entropy(h, w, y, z_loss=-1.0)
    with pytest.raises(ValueError, match="softcap"):
        linear_cross_entropy(h, w, y, softcap=0.0)
    with pytest.raises(ValueError, match="token_weights must have the shape"):
        linear_cross_entropy(h, w, y, token_weights=torch.ones(3))
    with pytest.raises(ValueError, match="token_weights must be finite and >= 0"):
        linear_cross_entropy(h, w, y, token_weights=-torch.ones(2, 5))
    with pytest.raises(ValueError, match="impl must be one of"):
        linear_cross_entropy(h, w, y, impl="triton")
    with pytest.raises(ValueError, match="token_block"):
        linear_cross_entropy(h, w, y, token_block=-1)
    with pytest.raises(ValueError, match="same device"):
        linear_cross_entropy(h, w.to("meta"), y)
    with pytest.raises(TypeError, match="hidden must be a torch.Tensor"):
        linear_cross_entropy(h.numpy(), w, y)


def test_explicit_unavailable_backend_raises_and_auto_falls_back():
    h, w, _, y, _ = make_inputs((4,), 8, 11)
    # CPU tensors can never use the CUDA kernels: explicit request raises, auto quietly uses the CPU path
    with pytest.raises(ValueError, match="impl='cuda' needs CUDA tensors"):
        linear_cross_entropy(h, w, y, impl="cuda")
    assert rel_err(linear_cross_entropy(h, w, y, impl="auto"), linear_cross_entropy(h, w, y, impl="cpu")) == 0


def test_tiny_llama_matches_its_own_loss():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    torch.manual_seed(0)
    ref_model = transformers.LlamaForCausalLM(cfg).float()
    model = patch_causal_lm(copy.deepcopy(ref_model))
    ids = torch.randint(0, 97, (2, 13))
    labels = ids.clone()
    labels[0, :4] = IGNORE  # a masked prompt
    ref_out = ref_model(input_ids=ids, labels=labels)
    out = model(input_ids=ids, labels=labels)
    assert out.logits is None
    assert abs(float(out.loss.detach()) - float(ref_out.loss.detach())) < 1e-5 * abs(float(ref_out.loss.detach()))
    ref_out.loss.backward()
    out.loss.backward()
    ref_params = dict(ref_model.named_parameters())
    for name, p in model.named_parameters():
        assert rel_err(p.grad, ref_params[name].grad) < 1e-4, name
    # without labels the original forward (with logits) runs
    assert model(input_ids=ids).logits.shape == (2, 13, 97)


# ---------------------------------------------------------------------------------------------------------------
# The CUDA path's orchestration (block loops, pointer offsets, coefficient layout), run on the CPU against a NumPy
# model of the kernels' documented contract (csrc/cuda/lce.h). The kernels themselves are tested on a GPU below.


class NumpyTileKernels:
    """lce_lse_block / lce_grad_block of csrc/bind_loss.cpp, on host pointers, in float64 then stored."""

    @staticmethod
    def _arr(ptr, n, dtype):
        import ctypes

        import numpy as np

        ctype = {np.float32: ctypes.c_float, np.int64: ctypes.c_int64}[dtype]
        return np.ctypeslib.as_array((ctype * n).from_address(ptr))

    def _tile(self, logits, logits_dtype, ld, rows, cols, bias, bias_dtype, v0, labels, softcap):
        import numpy as np

        assert logits_dtype == 0 and bias_dtype == 0  # the CPU stand-in runs float32 only
        z = self._arr(logits, (rows - 1) * ld + cols, np.float32)
        z = np.lib.stride_tricks.as_strided(z, (rows, cols), (ld * 4, 4)).astype(np.float64)
        if bias:
            z = z + self._arr(bias, v0 + cols, np.float32)[v0:].astype(np.float64)
        if softcap > 0:
            z = softcap * np.tanh(z / softcap)
        return z, self._arr(labels, rows, np.int64) - v0

    def lce_lse_block(self, logits, logits_dtype, ld, rows, cols, bias, bias_dtype, v0, labels, softcap,
                      run_max, run_sum, target, logit_sum, stream):
        import numpy as np

        z, col = self._tile(logits, logits_dtype, ld, rows, cols, bias, bias_dtype, v0, labels, softcap)
        m, s = self._arr(run_max, rows, np.float32), self._arr(run_sum, rows, np.float32)
        new = np.maximum(m, z.max(1))
        s[:] = s * np.exp(m - new) + np.exp(z - new[:, None]).sum(1)
        m[:] = new
        inside = (col >= 0) & (col < cols)
        self._arr(target, rows, np.float32)[inside] += z[inside, col[inside]]
        if logit_sum:
            self._arr(logit_sum, rows, np.float32)[:] += z.sum(1)

    def lce_grad_block(self, logits, logits_dtype, ld, rows, cols, bias, bias_dtype, v0, labels, softcap, lse,
                       coef_p, coef_y, coef_u, out, out_dtype, out_ld, stream):
        import numpy as np

        assert out_dtype == 0
        z, col = self._tile(logits, logits_dtype, ld, rows, cols, bias, bias_dtype, v0, labels, softcap)
        lse_, cp, cy, cu = (self._arr(p, rows, np.float32).astype(np.float64) for p in (lse, coef_p, coef_y, coef_u))
        d = cp[:, None] * np.exp(z - lse_[:, None]) - cu[:, None]
        inside = (col >= 0) & (col < cols)
        d[inside, col[inside]] -= cy[inside]
        if softcap > 0:
            d *= 1 - (z / softcap) ** 2
        o = self._arr(out, (rows - 1) * out_ld + cols, np.float32)
        np.lib.stride_tricks.as_strided(o, (rows, cols), (out_ld * 4, 4))[:] = d


@pytest.mark.parametrize("blocks", [(0, 0), (5, 8), (1000, 7)])
@pytest.mark.parametrize("reduction,smoothing,cap,bias,weights", [("mean", 0.0, None, False, False),
                                                                 ("none", 0.1, 3.0, True, True),
                                                                 ("sum", 0.0, 2.0, True, False)])
def test_cuda_orchestration_with_numpy_kernels(monkeypatch, blocks, reduction, smoothing, cap, bias, weights):
    from mlmix.torch import _loss_autograd, _loss_dispatch
    from mlmix.torch import loss as loss_mod

    monkeypatch.setattr(_loss_dispatch, "cuda_kernels", lambda: NumpyTileKernels())
    monkeypatch.setattr(_loss_dispatch, "stream_handle", lambda device: 0)
    h, w, b, y, tw = make_inputs((3, 11), 12, 45, bias=bias, weights=weights, seed=13)
    kw = dict(reduction=reduction, label_smoothing=smoothing, softcap=cap, z_loss=1e-3)
    tb, vb = blocks
    opts = loss_mod._Options(IGNORE, smoothing, 1e-3, cap, tb, vb)

    def via_cuda_path(h_, w_, y_, bias=None, **_):
        tw_flat = None if tw is None else tw.reshape(-1)
        out, _lse = _loss_autograd.fused_linear_cross_entropy(h_.reshape(-1, h_.shape[-1]), w_, bias,
                                                              y_.reshape(-1), tw_flat, opts, reduction, "cuda")
        return out.view(y_.shape) if reduction == "none" else out

    out, grads = loss_and_grads(via_cuda_path, h, w, b, y)
    ref, ref_grads = loss_and_grads(reference, h.double(), w.double(), None if b is None else b.double(), y,
                                    token_weights=tw, **kw)
    assert rel_err(out, ref) < 1e-5
    for got, want in zip(grads, ref_grads):
        assert rel_err(got, want) < 1e-5


# ---------------------------------------------------------------------------------------------------------------
# CUDA (skipped without a device)


@pytest.mark.gpu
@pytest.mark.parametrize("reduction,smoothing,z,cap,bias,weights,shift", OPTIONS[::5])
def test_cuda_matches_reference(reduction, smoothing, z, cap, bias, weights, shift):
    h, w, b, y, tw = make_inputs((2, 33), 64, 1000, bias=bias, weights=weights, seed=9)
    kw = dict(reduction=reduction, label_smoothing=smoothing, z_loss=z, softcap=cap, shift=shift)
    cuda = dict(token_weights=None if tw is None else tw.cuda(), **kw)
    out, grads = loss_and_grads(linear_cross_entropy, h.cuda(), w.cuda(), None if b is None else b.cuda(),
                                y.cuda(), impl="cuda", vocab_block=256, **cuda)
    ref, ref_grads = loss_and_grads(reference, h.double(), w.double(), None if b is None else b.double(), y,
                                    token_weights=tw, **kw)
    # TF32 may be enabled for float32 GEMMs on the GPU; the kernels themselves are float32
    tol = 2e-3 if torch.backends.cuda.matmul.allow_tf32 else 1e-5
    assert rel_err(out.cpu(), ref) < tol
    for got, want in zip(grads, ref_grads):
        assert rel_err(got.cpu(), want) < tol


@pytest.mark.gpu
def test_cuda_bf16_large_vocab():
    h, w, _, y, _ = make_inputs((512,), 256, 50_000, dtype=torch.bfloat16, seed=4)
    out, grads = loss_and_grads(linear_cross_entropy, h.cuda(), w.cuda(), None, y.cuda(), impl="cuda",
                                label_smoothing=0.1)
    ref, ref_grads = loss_and_grads(reference, h.double(), w.double(), None, y, label_smoothing=0.1)
    assert out.dtype == torch.float32
    assert rel_err(out.cpu(), ref) < 1e-4
    for got, want in zip(grads, ref_grads):
        assert rel_err(got.cpu(), want) < 2 ** -6


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cuda_half_many_blocks(dtype):
    """Several token and vocabulary blocks: the float32 accumulators of grad_hidden and grad_weight are summed
    across blocks (inside cuBLAS where torch has the mixed-dtype addmm), and the label lands in different tiles."""
    # 5003 = 7 x 700 + 103: the last tile has a row stride that is not a multiple of 4 (the scalar path)
    h, w, b, y, tw = make_inputs((300,), 96, 5003, dtype=dtype, bias=True, weights=True, seed=11)
    kw = dict(reduction="sum", label_smoothing=0.05, z_loss=1e-3)
    out, grads = loss_and_grads(linear_cross_entropy, h.cuda(), w.cuda(), b.cuda(), y.cuda(), impl="cuda",
                                token_weights=tw.cuda(), token_block=128, vocab_block=700, **kw)
    ref, ref_grads = loss_and_grads(reference, h.double(), w.double(), b.double(), y, token_weights=tw.double(),
                                    **kw)
    assert out.dtype == torch.float32 and rel_err(out.cpu(), ref) < 1e-4
    for got, want in zip(grads, ref_grads):
        assert rel_err(got.cpu(), want) < 2 ** -6


@pytest.mark.gpu
def test_cuda_all_ignored_and_errors():
    h, w, _, y, _ = make_inputs((8,), 16, 50, ignore_frac=1.0)
    out, grads = loss_and_grads(linear_cross_entropy, h.cuda(), w.cuda(), None, y.cuda(), impl="cuda")
    assert float(out.detach()) == 0.0 and all(bool((g == 0).all()) for g in grads)
    with pytest.raises(ValueError, match="same device"):
        linear_cross_entropy(h.cuda(), w, y.cuda())
    with pytest.raises(ValueError, match="labels must lie"):
        linear_cross_entropy(h.cuda(), w.cuda(), torch.full((8,), 50, device="cuda"))
