"""The lse returned by ``linear_cross_entropy(..., return_lse=True)`` is differentiable: its gradients (alone, and
mixed with the loss's, e.g. a z-loss the caller builds on it) against float64 autograd of the materialised logits.

The grid varies what a fused backward can get wrong (after cut-cross-entropy's backward tests, our own grid):
shapes whose tokens are not a multiple of the token block or whose vocabulary is not a multiple of the vocabulary
block, a vocabulary of 1 or 2, softcap, bias, shift, ignored tokens, label smoothing, z-loss, reductions, token
weights, both CPU schemes (``low_memory``), float32/bfloat16/float64 inputs; plus ``gradcheck`` in float64.
"""

from __future__ import annotations

import itertools
import math

import pytest

torch = pytest.importorskip("torch")
from mlmix.torch import linear_cross_entropy

from test_loss import IGNORE, NumpyTileKernels, close, make_inputs, reference, rel_err


def reference_lse(h, w, y, *, bias=None, softcap=None, shift=False, ignore_index=IGNORE):
    """logsumexp of the materialised (soft-capped) logits in float64, 0 at ignored positions (as returned)."""
    if shift:
        y = torch.cat([y[..., 1:], torch.full_like(y[..., :1], ignore_index)], dim=-1)
    logits = h.double() @ w.double().T
    if bias is not None:
        logits = logits + bias.double()
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    lse = torch.logsumexp(logits, -1)
    return torch.where(y != ignore_index, lse, torch.zeros((), dtype=lse.dtype))


def both(h, w, y, *, bias=None, **kw):
    """(loss, lse) of the reference with the options of linear_cross_entropy."""
    lse_kw = {k: kw[k] for k in ("softcap", "shift") if k in kw}
    return reference(h, w, y, bias=bias, **kw), reference_lse(h, w, y, bias=bias, **lse_kw)


def grads_of(fn, h, w, b, y, objective, **kw):
    """Leaves' gradients of ``objective(loss, lse)`` with ``(loss, lse) = fn(...)``; also returns loss and lse."""
    leaves = [t.detach().clone().requires_grad_(True) for t in (h, w) + ((b,) if b is not None else ())]
    loss, lse = fn(leaves[0], leaves[1], y, bias=leaves[2] if b is not None else None, **kw)
    return loss, lse, torch.autograd.grad(objective(loss, lse), leaves)


def fused(h, w, y, **kw):
    return linear_cross_entropy(h, w, y, return_lse=True, **kw)


def random_weights(shape, seed):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)).double()


def objective_random(go_loss, go_lse):
    """sum(go_loss * loss) + sum(go_lse * lse): any gradient of both outputs at once."""
    return lambda loss, lse: (loss * go_loss.to(loss.dtype)).sum() + (lse * go_lse.to(lse.dtype)).sum()


def z_loss_objective(loss, lse):
    """The combined loss a cut-cross-entropy user writes: the loss plus a z-loss from the returned lse."""
    return loss.sum() + 1e-4 * (lse ** 2).mean()


def check(h, w, b, y, objective, tol=1e-5, **kw):
    loss, lse, grads = grads_of(fused, h, w, b, y, objective, **kw)
    kw_ref = {k: v for k, v in kw.items() if k not in ("token_block", "vocab_block", "low_memory", "impl")}
    rloss, rlse, rgrads = grads_of(both, h.double(), w.double(), None if b is None else b.double(), y, objective,
                                   **kw_ref)
    assert lse.shape == y.shape
    assert rel_err(loss, rloss) < tol and rel_err(lse, rlse) < tol
    for got, want in zip(grads, rgrads):
        assert got.dtype == h.dtype and got.shape == want.shape
        # relative to the largest entry, or (vocab 1: a loss of exactly 0 whose gradient terms cancel) absolute
        assert close(got, want, tol, 1e-6)


# shape, hidden, vocab, token_block, vocab_block: a ragged last token block and vocabulary block, a single block,
# vocabularies of 1 and 2 (lse = the single logit: its gradient is the whole weight row), 3-d inputs
SHAPES = [((2, 9), 16, 37, 5, 8), ((31,), 12, 50, 8, 16), ((3, 7), 8, 1, 4, 1), ((6,), 4, 2, 0, 0),
          ((4, 5), 8, 130, 0, 0)]


@pytest.mark.parametrize("shape,hidden,vocab,tb,vb", SHAPES)
@pytest.mark.parametrize("cap,bias,shift", [(None, False, False), (4.0, True, False), (None, True, True),
                                            (2.0, False, True)])
@pytest.mark.parametrize("low_memory", [False, True])
def test_lse_gradient_grid(shape, hidden, vocab, tb, vb, cap, bias, shift, low_memory):
    seed = len(shape) * 100 + vocab + (cap or 0) * 7 + bias * 3 + shift
    h, w, b, y, _ = make_inputs(shape, hidden, vocab, bias=bias, seed=int(seed))
    go_loss = random_weights(shape, 1)
    go_lse = random_weights(shape, 2)
    check(h, w, b, y, objective_random(go_loss, go_lse), reduction="none", softcap=cap, shift=shift,
          token_block=tb, vocab_block=vb, low_memory=low_memory)
    # the gradient of lse alone (the loss unused), and the z-loss a user builds on the returned lse
    check(h, w, b, y, lambda loss, lse: (lse * go_lse.to(lse.dtype)).sum(), softcap=cap, shift=shift,
          token_block=tb, vocab_block=vb, low_memory=low_memory)
    check(h, w, b, y, z_loss_objective, softcap=cap, shift=shift, token_block=tb, vocab_block=vb,
          low_memory=low_memory)


# every reduction, smoothing, z-loss and token-weight combination, softcap and bias alternating
OPTIONS = [(*combo, i % 2 == 1, i % 3 == 0) for i, combo in enumerate(itertools.product(
    ("mean", "sum", "none"), (0.0, 0.1), (0.0, 1e-3), (False, True)))]


@pytest.mark.parametrize("reduction,smoothing,z,weights,cap,bias", OPTIONS)
def test_lse_gradient_with_every_loss_option(reduction, smoothing, z, weights, cap, bias):
    h, w, b, y, tw = make_inputs((3, 11), 12, 45, bias=bias, weights=weights, ignore_frac=0.3, seed=21)
    kw = dict(reduction=reduction, label_smoothing=smoothing, z_loss=z, token_weights=tw,
              softcap=3.0 if cap else None, shift=bias, token_block=7, vocab_block=10)
    check(h, w, b, y, z_loss_objective, **kw)
    go_lse = random_weights((3, 11), 5)
    go_loss = random_weights((3, 11) if reduction == "none" else (), 6)
    check(h, w, b, y, objective_random(go_loss, go_lse), **kw)


def test_lse_gradient_bfloat16():
    h, w, b, y, tw = make_inputs((3, 21), 24, 77, dtype=torch.bfloat16, bias=True, weights=True, seed=5)
    kw = dict(label_smoothing=0.05, token_weights=tw, softcap=5.0, vocab_block=16)
    loss, lse, grads = grads_of(fused, h, w, b, y, z_loss_objective, **kw)
    assert loss.dtype == lse.dtype == torch.float32
    _, _, rgrads = grads_of(both, h.double(), w.double(), b.double(), y, z_loss_objective,
                            label_smoothing=0.05, token_weights=tw, softcap=5.0)
    for got, want in zip(grads, rgrads):
        assert got.dtype == torch.bfloat16
        assert rel_err(got, want) < 2 ** -7


def test_lse_unused_or_detached_changes_nothing():
    """return_lse=True without using lse gives the loss's gradients exactly as return_lse=False does."""
    h, w, b, y, tw = make_inputs((40,), 16, 97, bias=True, weights=True, seed=8)
    kw = dict(bias=b, token_weights=tw, label_smoothing=0.1, z_loss=1e-3)
    for low_memory in (False, True):
        leaves = [t.clone().requires_grad_(True) for t in (h, w)]
        plain = torch.autograd.grad(linear_cross_entropy(*leaves, y, low_memory=low_memory, **kw), leaves)
        loss, lse = linear_cross_entropy(*leaves, y, low_memory=low_memory, return_lse=True, **kw)
        assert lse.requires_grad
        with_lse = torch.autograd.grad(loss + 0.0 * lse.detach().sum(), leaves)
        ref_leaves = [t.double().requires_grad_(True) for t in (h, w)]
        want = torch.autograd.grad(reference(*ref_leaves, y, **kw), ref_leaves)
        for a, c, r in zip(plain, with_lse, want):
            assert rel_err(a, r) < 1e-5 and rel_err(c, r) < 1e-5


def test_ignored_positions_have_zero_lse_and_pass_no_gradient():
    h, w, _, y, _ = make_inputs((12,), 8, 19, ignore_frac=0.0, seed=4)
    y[[1, 5, 6]] = IGNORE
    hl = h.clone().requires_grad_(True)
    _, lse = linear_cross_entropy(hl, w, y, return_lse=True)
    assert bool((lse[[1, 5, 6]] == 0).all())
    (g,) = torch.autograd.grad(lse.sum(), hl)
    assert bool((g[[1, 5, 6]] == 0).all()) and bool((g[[0, 2]] != 0).any())
    # all ignored: lse is all zeros and every gradient is 0
    y_all = torch.full((12,), IGNORE)
    loss, lse = linear_cross_entropy(hl, w, y_all, return_lse=True)
    (g,) = torch.autograd.grad(loss + (lse ** 2).sum(), hl)
    assert bool((lse == 0).all()) and bool((g == 0).all())


def test_second_backward_through_lse():
    h, w, b, y, _ = make_inputs((10,), 8, 23, bias=True, seed=6)
    leaves = [t.clone().requires_grad_(True) for t in (h, w, b)]
    loss, lse = linear_cross_entropy(*leaves[:2], y, bias=leaves[2], return_lse=True)
    obj = z_loss_objective(loss, lse)
    first = torch.autograd.grad(obj, leaves, retain_graph=True)
    second = torch.autograd.grad(obj, leaves)
    assert all(torch.equal(a, c) for a, c in zip(first, second))


@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("cap,shift,low_memory", [(None, False, False), (3.0, True, False), (None, True, True)])
def test_gradcheck_float64(reduction, cap, shift, low_memory):
    h, w, b, y, tw = make_inputs((2, 5), 4, 7, dtype=torch.float64, bias=True, weights=True, seed=31)
    tw = tw.double()

    def fn(h_, w_, b_):
        return linear_cross_entropy(h_, w_, y, bias=b_, return_lse=True, reduction=reduction, softcap=cap,
                                    shift=shift, token_weights=tw, label_smoothing=0.1, z_loss=1e-2,
                                    low_memory=low_memory, token_block=3, vocab_block=4)

    inputs = tuple(t.clone().requires_grad_(True) for t in (h, w, b))
    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-8, rtol=1e-6)


def test_lse_of_float64_inputs_is_float64_and_exact():
    h, w, b, y, _ = make_inputs((3, 4), 6, 11, dtype=torch.float64, bias=True, seed=2)
    loss, lse = linear_cross_entropy(h, w, y, bias=b, return_lse=True)
    assert lse.dtype == torch.float64
    assert rel_err(lse, reference_lse(h, w, y, bias=b)) < 1e-12
    assert math.isfinite(float(loss))


# ---------------------------------------------------------------------------------------------------------------
# the CUDA backend: its orchestration with lse gradients on the CPU (NumPy model of the kernels, as in
# test_loss.py), then the kernels themselves on a GPU


@pytest.mark.parametrize("cap,bias,shift", [(None, False, False), (3.0, True, True)])
def test_cuda_orchestration_lse_gradient_with_numpy_kernels(monkeypatch, cap, bias, shift):
    from mlmix.torch import _loss_dispatch

    monkeypatch.setattr(_loss_dispatch, "cuda_kernels", lambda: NumpyTileKernels())
    monkeypatch.setattr(_loss_dispatch, "stream_handle", lambda device: 0)
    real_resolve = _loss_dispatch.resolve_impl
    from mlmix.torch import loss as loss_mod

    # impl="cuda" on CPU tensors: the name "cuda" with the NumPy kernels
    monkeypatch.setattr(loss_mod, "_resolve_impl", lambda impl, device, dtype: "cuda" if impl == "cuda" else
                        real_resolve(impl, device, dtype))
    h, w, b, y, tw = make_inputs((3, 11), 12, 45, bias=bias, weights=True, seed=13)
    go_lse = random_weights((3, 11), 3)
    kw = dict(softcap=cap, shift=shift, token_weights=tw, z_loss=1e-3, label_smoothing=0.1)
    check(h, w, b, y, z_loss_objective, impl="cuda", token_block=5, vocab_block=8, **kw)
    check(h, w, b, y, objective_random(random_weights((3, 11), 4), go_lse), reduction="none", impl="cuda",
          token_block=4, vocab_block=16, **kw)


@pytest.mark.gpu
@pytest.mark.parametrize("shape,hidden,vocab,tb,vb", SHAPES)
@pytest.mark.parametrize("cap,bias,shift", [(None, False, False), (4.0, True, True)])
def test_cuda_lse_gradient_grid(shape, hidden, vocab, tb, vb, cap, bias, shift):
    h, w, b, y, tw = make_inputs(shape, hidden, vocab, bias=bias, weights=True, seed=vocab)
    cuda = lambda t: None if t is None else t.cuda()  # noqa: E731
    go_loss, go_lse = random_weights(shape, 1), random_weights(shape, 2)
    kw = dict(softcap=cap, shift=shift, label_smoothing=0.05)
    # TF32 may be enabled for float32 GEMMs on the GPU; the kernels themselves are float32
    tol = 2e-3 if torch.backends.cuda.matmul.allow_tf32 else 1e-5
    for objective, red in ((z_loss_objective, "mean"), (objective_random(go_loss, go_lse), "none")):
        loss, lse, grads = grads_of(fused, cuda(h), cuda(w), cuda(b), cuda(y), objective, impl="cuda",
                                    reduction=red, token_weights=cuda(tw), token_block=tb, vocab_block=vb, **kw)
        _, rlse, rgrads = grads_of(both, h.double(), w.double(), None if b is None else b.double(), y, objective,
                                   reduction=red, token_weights=tw, **kw)
        assert rel_err(lse.cpu(), rlse) < tol
        for got, want in zip(grads, rgrads):
            assert close(got.cpu(), want, tol, 1e-6)


@pytest.mark.gpu
def test_cuda_lse_gradient_bfloat16():
    h, w, b, y, _ = make_inputs((300,), 96, 5003, dtype=torch.bfloat16, bias=True, seed=11)
    loss, lse, grads = grads_of(fused, h.cuda(), w.cuda(), b.cuda(), y.cuda(), z_loss_objective, impl="cuda",
                                softcap=20.0, token_block=128, vocab_block=700)
    assert lse.dtype == torch.float32
    _, _, rgrads = grads_of(both, h.double(), w.double(), b.double(), y, z_loss_objective, softcap=20.0)
    for got, want in zip(grads, rgrads):
        assert got.dtype == torch.bfloat16 and rel_err(got.cpu(), want) < 2 ** -6
