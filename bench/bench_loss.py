"""CPU benchmark of the fused linear cross-entropy: forward + backward time and peak extra memory.

Variants, each in its own process (so that peak RSS is its own):
  materialised   F.cross_entropy(hidden @ weight.T, labels)  -- what a model does by default
  torch_chunked  torch.nn.functional.linear_cross_entropy     -- PyTorch's chunked loss (torch >= 2.13)
  mlmix          mlmix.torch.linear_cross_entropy(impl="cpu"): gradients during the forward, 3 GEMMs
  mlmix_low_memory                          (..., low_memory=True): logits recomputed in the backward, 4 GEMMs
  mlmix_vocab_parallel  mlmix.torch.vocab_parallel_linear_cross_entropy over MLMIX_BENCH_RANKS (default 2) gloo
                 processes on this machine, each with its rows of the weight and its share of the cores; time =
                 the slowest rank's, peak = the largest rank's (the two-pass scheme, so compare with low_memory)
  mlmix_lse_zloss  mlmix with return_lse=True and a z-loss built on the returned (differentiable) lse
  mlmix_compiled   torch.compile(fullgraph=True) of the mlmix step (its custom ops stay opaque to inductor)
  materialised_compiled   torch.compile of the materialised step: what inductor makes of the reference
(MLMIX_BENCH_VARIANTS=materialised,mlmix picks a subset.) The other rows time the first call; a compiled row times
its second call (the first compiles: compile_seconds) next to the same step run eagerly on its second call in the
same process (eager_warm_seconds), and its peak memory would include the compilation, so it is not shown.

Run: ``pytest bench/bench_loss.py`` (small default: tokens=512, hidden=512, vocab=32,768), or with
MLMIX_BENCH_FULL=1 for the issue's size (tokens=2048, hidden=1024, vocab=248,044, float32; several minutes).
``python bench/bench_loss.py`` prints the same table without pytest.
Peak extra memory = max RSS during forward + backward minus RSS once the inputs exist; it includes the weight
gradient (vocab x hidden float32), which every variant must produce.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

FULL = os.environ.get("MLMIX_BENCH_FULL") == "1"
SIZE = dict(tokens=2048, hidden=1024, vocab=248_044) if FULL else dict(tokens=512, hidden=512, vocab=32_768)
VARIANTS = tuple(os.environ.get("MLMIX_BENCH_VARIANTS", "materialised,torch_chunked,mlmix,mlmix_low_memory,"
                                "mlmix_vocab_parallel,mlmix_lse_zloss,mlmix_compiled,materialised_compiled").split(","))
RANKS = int(os.environ.get("MLMIX_BENCH_RANKS", "2"))
COMPILED = ("mlmix_compiled", "materialised_compiled")
ROOT = Path(__file__).resolve().parents[1]


def _inputs(tokens: int, hidden: int, vocab: int):
    """The same hidden states, weight and labels in every variant (and on every rank)."""
    import torch

    torch.manual_seed(0)
    h = torch.randn(tokens, hidden, requires_grad=True)
    # scaled in place: a temporary copy would raise the process's max RSS before the measurement starts
    w = torch.randn(vocab, hidden).div_(hidden**0.5)
    y = torch.randint(0, vocab, (tokens,))
    y[::7] = -100
    return h, w, y


def _run_variant(variant: str, tokens: int, hidden: int, vocab: int) -> dict:
    """Body of the child process: build inputs, run forward + backward once, report time and memory."""
    import torch
    import torch.nn.functional as F

    if variant == "mlmix_vocab_parallel":
        return _run_vocab_parallel(tokens, hidden, vocab)
    h, w, y = _inputs(tokens, hidden, vocab)
    w.requires_grad_(True)
    if variant in ("materialised", "materialised_compiled"):
        def fn():
            return F.cross_entropy(h @ w.T, y, ignore_index=-100)
    elif variant == "torch_chunked":
        if not hasattr(F, "linear_cross_entropy"):
            return {"variant": variant, "error": f"torch {torch.__version__} lacks F.linear_cross_entropy"}

        from torch.nn import LinearCrossEntropyOptions

        def fn():  # options=None would be the materialised reference path; default options = chunked
            return F.linear_cross_entropy(h, w, y, ignore_index=-100, options=LinearCrossEntropyOptions())
    elif variant == "mlmix_lse_zloss":
        from mlmix.torch import linear_cross_entropy

        def fn():
            loss, lse = linear_cross_entropy(h, w, y, impl="cpu", return_lse=True)
            return loss + 1e-4 * (lse**2).mean()
    else:
        from mlmix.torch import linear_cross_entropy

        low_memory = variant == "mlmix_low_memory"

        def fn():
            return linear_cross_entropy(h, w, y, impl="cpu", low_memory=low_memory)

    compile_seconds = eager_seconds = None
    if variant in COMPILED:
        import warnings

        fn().backward()  # eager, warm: the same step without compilation, timed on its second call
        h.grad = w.grad = None
        start = time.perf_counter()
        fn().backward()
        eager_seconds = time.perf_counter() - start
        h.grad = w.grad = None

        with warnings.catch_warnings():  # torch 2.13's inductor import warns that TorchScript is deprecated
            warnings.simplefilter("ignore", DeprecationWarning)
            step = torch.compile(fn, fullgraph=True)
            start = time.perf_counter()
            step().backward()  # compiles the forward and the backward
        compile_seconds = time.perf_counter() - start
        h.grad = w.grad = None
        fn = step

    import psutil

    # baseline = current RSS once the inputs exist (their creation has no transient above it, see above)
    # (if an earlier transient had gone higher, the delta would be overstated, never understated)
    base = psutil.Process().memory_info().rss // 1024
    start = time.perf_counter()
    loss = fn()
    loss.backward()
    elapsed = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if compile_seconds is not None:
        return {"variant": variant, "seconds": elapsed, "compile_seconds": compile_seconds,
                "eager_warm_seconds": eager_seconds, "loss": float(loss)}
    return {"variant": variant, "seconds": elapsed, "peak_extra_bytes": (peak - base) * 1024, "loss": float(loss)}


def _vocab_parallel_rank(rank: int, world: int, port: int, tokens: int, hidden: int, vocab: int, out: str):
    """One rank of mlmix_vocab_parallel: its rows of the weight, the full hidden states and labels."""
    import psutil
    import torch
    import torch.distributed as dist

    from mlmix.torch import vocab_parallel_linear_cross_entropy

    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))  # the cores split between the ranks
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        h, w, y = _inputs(tokens, hidden, vocab)
        shard = w.tensor_split(world)[rank].clone().requires_grad_(True)
        del w
        # the full weight existed a moment ago (the same inputs as the other variants): forget that peak, so that
        # the peak below is the loss's own (Linux: "5" > clear_refs resets VmHWM)
        try:
            Path("/proc/self/clear_refs").write_text("5")
            hwm_reset = True
        except OSError:
            hwm_reset = False  # ru_maxrss below then overstates by the full weight
        base = psutil.Process().memory_info().rss // 1024
        dist.barrier()
        start = time.perf_counter()
        loss = vocab_parallel_linear_cross_entropy(h, shard, y, impl="cpu")
        loss.backward()
        elapsed = time.perf_counter() - start
        peak = _vm_hwm_kib() if hwm_reset else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        with open(f"{out}/rank{rank}.json", "w") as f:
            json.dump({"seconds": elapsed, "peak_extra_bytes": (peak - base) * 1024, "loss": float(loss)}, f)
    finally:
        dist.destroy_process_group()


def _vm_hwm_kib() -> int:
    """This process's peak resident set (KiB) since it started or since VmHWM was last reset."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise RuntimeError("no VmHWM in /proc/self/status")


def _run_vocab_parallel(tokens: int, hidden: int, vocab: int) -> dict:
    """mlmix_vocab_parallel: RANKS gloo processes (torch.multiprocessing.spawn), each measuring itself."""
    import socket
    import tempfile

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as out:
        mp.spawn(_vocab_parallel_rank, args=(RANKS, port, tokens, hidden, vocab, out), nprocs=RANKS, join=True)
        ranks = [json.loads(Path(out, f"rank{r}.json").read_text()) for r in range(RANKS)]
    return {"variant": "mlmix_vocab_parallel", "ranks": RANKS, "seconds": max(r["seconds"] for r in ranks),
            "peak_extra_bytes": max(r["peak_extra_bytes"] for r in ranks), "loss": ranks[0]["loss"]}


def measure(variant: str, size: dict = SIZE) -> dict:
    """Run one variant in a fresh process (niced) and return its figures."""
    env = dict(os.environ, PYTHONPATH=str(ROOT / "python") + os.pathsep + os.environ.get("PYTHONPATH", ""))
    cmd = ["nice", "-n", "10", sys.executable, __file__, "--child", variant,
           str(size["tokens"]), str(size["hidden"]), str(size["vocab"])]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env)
    return json.loads(out.stdout.strip().splitlines()[-1])


def measure_all(size: dict = SIZE) -> dict:
    return {v: measure(v, size) for v in VARIANTS}


def format_table(results: dict, size: dict = SIZE) -> str:
    base = results["materialised"]
    lines = [f"fused linear cross-entropy, CPU, fwd+bwd, float32, tokens={size['tokens']} hidden={size['hidden']} "
             f"vocab={size['vocab']} (peak: per process; vocab_parallel: the largest rank's)",
             f"{'variant':<31}{'time s':>9}{'x materialised':>16}{'peak extra MB':>15}{'x torch_chunked':>17}"]
    chunked = results.get("torch_chunked", {})
    for v, r in results.items():
        name = f"{v} ({r['ranks']} ranks)" if "ranks" in r else v
        if "error" in r:
            lines.append(f"{name:<31}  {r['error']}")
            continue
        if "peak_extra_bytes" not in r:  # compiled: memory includes the compilation
            lines.append(f"{name:<31}{r['seconds']:>9.2f}{r['seconds'] / base['seconds']:>16.2f}{'-':>15}{'-':>17}"
                         f"   (compile {r['compile_seconds']:.1f} s; the same step eager, warm: "
                         f"{r['eager_warm_seconds']:.2f} s)")
            continue
        mem_ratio = (f"{r['peak_extra_bytes'] / chunked['peak_extra_bytes']:.2f}"
                     if chunked.get("peak_extra_bytes") else "-")
        lines.append(f"{name:<31}{r['seconds']:>9.2f}{r['seconds'] / base['seconds']:>16.2f}"
                     f"{r['peak_extra_bytes'] / 2**20:>15.0f}{mem_ratio:>17}")
    return "\n".join(lines)


def test_linear_cross_entropy_cpu(benchmark):
    """One round (each variant runs once in its own process); ratios go to extra_info."""
    results = benchmark.pedantic(measure_all, rounds=1, iterations=1)
    base, ours = results["materialised"], results["mlmix"]  # the subset must include these two
    assert abs(ours["loss"] - base["loss"]) < 1e-4 * abs(base["loss"])  # same loss, else the timing is moot
    benchmark.extra_info.update({f"{v}_{k}": r[k] for v, r in results.items() for k in r if k != "variant"})
    benchmark.extra_info["mlmix_time_vs_materialised"] = ours["seconds"] / base["seconds"]
    vp = results.get("mlmix_vocab_parallel", {})
    if "seconds" in vp:
        assert abs(vp["loss"] - ours["loss"]) < 1e-4 * abs(ours["loss"])
        benchmark.extra_info["mlmix_vocab_parallel_time_vs_mlmix"] = vp["seconds"] / ours["seconds"]
        benchmark.extra_info["mlmix_vocab_parallel_memory_vs_mlmix"] = (
            vp["peak_extra_bytes"] / ours["peak_extra_bytes"])
        if "seconds" in results.get("mlmix_low_memory", {}):
            low = results["mlmix_low_memory"]
            benchmark.extra_info["mlmix_vocab_parallel_time_vs_low_memory"] = vp["seconds"] / low["seconds"]
            benchmark.extra_info["mlmix_vocab_parallel_memory_vs_low_memory"] = (
                vp["peak_extra_bytes"] / low["peak_extra_bytes"])
    if "peak_extra_bytes" in results.get("torch_chunked", {}):
        benchmark.extra_info["mlmix_memory_vs_torch_chunked"] = (
            ours["peak_extra_bytes"] / results["torch_chunked"]["peak_extra_bytes"])
        benchmark.extra_info["mlmix_time_vs_torch_chunked"] = ours["seconds"] / results["torch_chunked"]["seconds"]
    for v in COMPILED:
        if v in results:
            assert abs(results[v]["loss"] - base["loss"]) < 1e-4 * abs(base["loss"])
    if "mlmix_compiled" in results:
        benchmark.extra_info["mlmix_compiled_time_vs_eager"] = results["mlmix_compiled"]["seconds"] / ours["seconds"]
    print("\n" + format_table(results))


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        _, _, variant, tokens, hidden, vocab = sys.argv
        print(json.dumps(_run_variant(variant, int(tokens), int(hidden), int(vocab))))
    else:
        print(format_table(measure_all()))
