"""GPU benchmark of fused linear cross-entropy: forward + backward time and peak extra memory, one process.

Variants: materialised torch cross-entropy, a torch.compile'd chunked loss, Liger's fused linear cross-entropy,
Apple's cut-cross-entropy (CCE), and mlmix (impl="cuda"); plus the matmul floor: 3 GEMMs of 2*N*H*V flops timed
with torch.matmul at the same shapes. Default size: tokens=16384, hidden=4096, vocab=248,044, bfloat16
(override with --tokens/--hidden/--vocab). Peak extra memory = torch.cuda.max_memory_allocated during forward +
backward minus what was allocated before (inputs); it includes the gradients (hidden and weight) every variant
returns. Each variant: one warm-up, then the median of --iters timed runs. A variant that fails (missing
package, out of memory) prints its error and the table goes on.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F
import torch.utils.checkpoint

IGNORE = -100


def materialised(h, w, y):
    return F.cross_entropy((h @ w.T).float(), y, ignore_index=IGNORE)


_compiled_chunk = None


def compiled_chunked(h, w, y, chunk=2048):
    """Token-chunked loss, each chunk recomputed in the backward (checkpoint) and compiled: the usual DIY."""
    global _compiled_chunk
    if _compiled_chunk is None:
        def chunk_loss(hc, w, yc):
            return F.cross_entropy((hc @ w.T).float(), yc, ignore_index=IGNORE, reduction="sum")
        _compiled_chunk = torch.compile(chunk_loss, dynamic=False)
    total = 0.0
    for hc, yc in zip(h.split(chunk), y.split(chunk)):
        total = total + torch.utils.checkpoint.checkpoint(_compiled_chunk, hc, w, yc, use_reentrant=False)
    return total / (y != IGNORE).sum().clamp_min(1)


def liger(h, w, y):
    from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

    return LigerFusedLinearCrossEntropyLoss(ignore_index=IGNORE)(w, h, y)


def cce(h, w, y, filter_eps="auto"):
    from cut_cross_entropy import linear_cross_entropy

    if filter_eps == "auto":  # the package's default, whatever this version calls it
        return linear_cross_entropy(h, w, y, ignore_index=IGNORE)
    return linear_cross_entropy(h, w, y, ignore_index=IGNORE, filter_eps=filter_eps)


def mlmix_cuda(h, w, y, vocab_block=0, token_block=0):
    from mlmix.torch import linear_cross_entropy

    return linear_cross_entropy(h, w, y, impl="cuda", vocab_block=vocab_block, token_block=token_block)


VARIANTS = {"materialised": materialised, "mlmix cuda": mlmix_cuda,
            "mlmix cuda vb=1024": lambda h, w, y: mlmix_cuda(h, w, y, 1024),
            "mlmix cuda vb=4096": lambda h, w, y: mlmix_cuda(h, w, y, 4096),
            "mlmix cuda tb=4096 vb=4096": lambda h, w, y: mlmix_cuda(h, w, y, 4096, 4096),
            "liger": liger, "cut-cross-entropy": cce,
            "cut-cross-entropy no filter": lambda h, w, y: cce(h, w, y, filter_eps=None),
            "torch.compile chunked": compiled_chunked}


def reference_grads(h, w, y):
    """Loss and gradients from float32 logits of the same bf16 inputs (TF32 off): the accuracy yardstick."""
    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        hf = h.detach().float().requires_grad_(True)
        wf = w.detach().float().requires_grad_(True)
        loss = F.cross_entropy(hf @ wf.T, y, ignore_index=IGNORE)
        loss.backward()
        return float(loss.detach()), hf.grad, wf.grad
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32


def rel_norm(got, ref):
    return float((got.float() - ref).norm() / ref.norm().clamp_min(1e-30))


def timed(fn, iters):
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=16384)
    ap.add_argument("--hidden", type=int, default=4096)
    ap.add_argument("--vocab", type=int, default=248_044)
    ap.add_argument("--iters", type=int, default=3)
    ap.add_argument("--only", default="", help="comma-separated variant names to run")
    ap.add_argument("--no-check", action="store_true", help="skip the float32 reference and the error columns")
    ap.add_argument("--profile", action="store_true", help="print the CUDA kernel time split of one mlmix step")
    args = ap.parse_args()
    dev = torch.device("cuda")
    torch.manual_seed(0)
    n, hdim, vocab = args.tokens, args.hidden, args.vocab
    h = torch.randn(n, hdim, device=dev, dtype=torch.bfloat16).requires_grad_(True)
    w = (torch.randn(vocab, hdim, device=dev) / hdim**0.5).to(torch.bfloat16).requires_grad_(True)
    y = torch.randint(0, vocab, (n,), device=dev)
    y[::10] = IGNORE

    # matmul floor: the three GEMMs every exact method performs (logits, grad hidden, grad weight), at the bf16
    # rate measured on the same operands. The full (tokens x vocab) product has rows of 248,044 elements, not
    # 16-byte aligned, which sends cuBLAS to slower kernels; the rate is taken from the aligned leading part of the
    # vocabulary (a multiple of 256 rows), which is the rate a kernel working in aligned tiles can reach.
    with torch.no_grad():
        a, b = h.detach(), w.detach()
        va = max(256, vocab // 256 * 256)
        torch.matmul(a, b[:va].T)  # warm-up (handles, heuristics)
        mm_aligned = timed(lambda: torch.matmul(a, b[:va].T), args.iters + 2) * vocab / va
        mm_full = timed(lambda: torch.matmul(a, b.T), args.iters + 1)
    mm = min(mm_aligned, mm_full)
    floor = 3 * mm
    tflops = 2 * n * hdim * vocab / mm / 1e12
    print(f"{torch.cuda.get_device_name()}  torch {torch.__version__}  tokens={n} hidden={hdim} vocab={vocab} "
          f"bf16, fwd+bwd; one GEMM {mm * 1e3:.1f} ms ({tflops:.0f} TFLOP/s; the unaligned full product took "
          f"{mm_full * 1e3:.1f} ms), floor = 3 GEMMs = {floor * 1e3:.1f} ms", flush=True)

    ref = None
    if not args.no_check:
        try:
            ref = reference_grads(h, w, y)
            print(f"reference (float32 logits, TF32 off): loss {ref[0]:.6f}", flush=True)
        except Exception as exc:  # noqa: BLE001
            print(f"reference failed: {type(exc).__name__}: {str(exc).splitlines()[0][:100]}", flush=True)
        torch.cuda.empty_cache()

    rows = []
    names = [v for v in VARIANTS if not args.only or v in args.only.split(",")]
    ref_loss = None
    for name in names:
        fn = VARIANTS[name]

        def step(fn=fn):
            h.grad = None
            w.grad = None
            loss = fn(h, w, y)
            loss.backward()
            return loss

        try:
            h.grad = w.grad = None
            torch.cuda.empty_cache()
            loss = step()  # warm-up (compilation, autotuning)
            h.grad = w.grad = None
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            step()
            torch.cuda.synchronize()
            peak = torch.cuda.max_memory_allocated() - base
            err = ""
            if ref is not None:
                # fresh gradient tensors (not accumulated into .grad), compared by norm with the float32 ones
                loss = fn(h, w, y)
                gh, gw = torch.autograd.grad(loss, (h, w))
                finite = bool(torch.isfinite(gh).all()) and bool(torch.isfinite(gw).all())
                err = (f"loss {abs(float(loss.detach()) - ref[0]) / abs(ref[0]):.1e} dh {rel_norm(gh, ref[1]):.1e} "
                       f"dw {rel_norm(gw, ref[2]):.1e}" + ("" if finite else " NON-FINITE"))
                del gh, gw
            t = timed(step, args.iters)
            loss_val = float(loss.detach())
            ref_loss = loss_val if ref_loss is None else ref_loss
            rows.append((name, t, peak, loss_val, err))
        except Exception as exc:  # noqa: BLE001 - report and continue with the other variants
            rows.append((name, None, None, None, f"{type(exc).__name__}: {str(exc).splitlines()[0][:80]}"))
        finally:
            h.grad = w.grad = None
            torch.cuda.empty_cache()
        r = rows[-1]
        print(f"  done: {name}: " + (f"{r[1] * 1e3:.1f} ms, {r[2] / 2**30:.2f} GB, {r[4]}" if r[1] is not None
                                    else r[4]), flush=True)

    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        def one():
            loss = mlmix_cuda(h, w, y)
            torch.autograd.grad(loss, (h, w))
        try:
            one()
            torch.cuda.synchronize()
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                one()
                torch.cuda.synchronize()
            print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=12, max_name_column_width=60))
        except Exception as exc:  # noqa: BLE001 - the table below matters more
            print(f"profile failed: {type(exc).__name__}: {exc}")

    print()
    print(f"{'variant':<24}{'time ms':>10}{'x floor':>9}{'peak extra GB':>15}{'loss':>10}  rel. error vs float32")
    for name, t, peak, loss_val, err in rows:
        if t is None:
            print(f"{name:<24}  failed: {err}")
        else:
            print(f"{name:<24}{t * 1e3:>10.1f}{t / floor:>9.2f}{peak / 2**30:>15.2f}{loss_val:>10.4f}  {err}")


if __name__ == "__main__":
    main()
