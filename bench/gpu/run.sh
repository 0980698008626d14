#!/usr/bin/env bash
# Fused linear cross-entropy on a GPU machine (no network needed): build and install mlmix, install the
# competitors' pure-Python wheels from .whl/ when present, run the GPU tests, a compute-sanitizer pass over a
# small call, then the benchmark table (time, peak extra memory, error against float32 logits). The GPU tests include
# the lse gradients (tests/test_loss_lse.py) and torch.compile with CUDA tensors (tests/test_loss_compile.py).
# Run from the repository root or anywhere: bench/gpu/run.sh [extra args for bench_loss_gpu.py].
# Meant to finish within 8 minutes on an H100. Logs go to $OUT when set (the device tool's output folder).
# Bring along (carry) .whl/ with liger_kernel-*.whl and cut_cross_entropy-*.whl (pure Python):
#   pip download --no-deps --only-binary=:all: --python-version 3.12 -d .whl liger-kernel cut-cross-entropy
set -uo pipefail
cd "$(dirname "$0")/../.."
start=$SECONDS; root=$(pwd)
logs=${OUT:-/tmp/mlmix-gpu}; mkdir -p "$logs"
export PYTHONUNBUFFERED=1 CMAKE_BUILD_PARALLEL_LEVEL=${CMAKE_BUILD_PARALLEL_LEVEL:-16}
py=$(command -v python3 || command -v python)
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv,noheader || true
"$py" -c "import torch; print('torch', torch.__version__, torch.version.cuda)"

echo "== build + install (pip install --no-build-isolation --no-deps .)"
timeout 300 "$py" -m pip install --no-build-isolation --no-deps -q \
  -C cmake.define.CMAKE_CUDA_ARCHITECTURES=90 -C build-dir=/tmp/mlmix-build . >"$logs/build.log" 2>&1 \
  || { tail -40 "$logs/build.log"; echo "build failed"; exit 1; }
"$py" - <<'PY'
import importlib.util, subprocess, sys, glob
# install a carried wheel only when the module is missing (never replaces the machine's own packages)
for module, prefix in {"liger_kernel": "liger_kernel-", "cut_cross_entropy": "cut_cross_entropy-"}.items():
    if importlib.util.find_spec(module) is None:
        wheels = sorted(glob.glob(f".whl/{prefix}*.whl"))
        if wheels:
            subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", wheels[-1]], check=False)
        else:
            print(f"note: {module} is not installed and no .whl/{prefix}*.whl was carried")
PY
(cd /tmp && "$py" -c "import mlmix, json; print(json.dumps(mlmix.build_info()))")
echo "== build took $((SECONDS - start)) s"

echo "== GPU tests"
# run from a scratch directory against the installed package (python/ on sys.path would lack _core)
tmp=$(mktemp -d)
cp -r tests "$tmp/" && cp pyproject.toml "$tmp/"
(cd "$tmp" && timeout 180 "$py" -m pytest -q -m gpu -p no:cacheprovider tests/test_loss.py tests/test_loss_lse.py) \
  >"$logs/tests.log" 2>&1
tail -15 "$logs/tests.log"
echo "== tests done at $((SECONDS - start)) s"

echo "== torch.compile on CUDA (the loss's custom ops inside an inductor graph, no graph break, eager's gradients)"
(cd "$tmp" && timeout 150 "$py" -m pytest -q -m gpu -p no:cacheprovider tests/test_loss_compile.py) \
  >"$logs/compile_tests.log" 2>&1
tail -8 "$logs/compile_tests.log"
echo "== compile tests done at $((SECONDS - start)) s"

echo "== compute-sanitizer memcheck (small call, all options)"
if command -v compute-sanitizer >/dev/null; then
  (cd /tmp && timeout 120 compute-sanitizer --tool memcheck --error-exitcode 9 "$py" - <<'PY'
import torch
from mlmix.torch import linear_cross_entropy
torch.manual_seed(0)
for dtype in (torch.bfloat16, torch.float32):
    h = torch.randn(70, 48, device="cuda", dtype=dtype, requires_grad=True)
    w = torch.randn(3001, 48, device="cuda", dtype=dtype, requires_grad=True)
    b = torch.randn(3001, device="cuda", dtype=dtype, requires_grad=True)
    y = torch.randint(0, 3001, (70,), device="cuda"); y[::7] = -100
    loss, lse = linear_cross_entropy(h, w, y, bias=b, impl="cuda", label_smoothing=0.1, z_loss=1e-4, softcap=30.0,
                                     token_block=32, vocab_block=1000, return_lse=True)
    (loss + 1e-4 * (lse ** 2).mean()).backward()  # the lse gradient joins the softmax coefficient
torch.cuda.synchronize()
print("sanitized call ok", float(loss.detach()))
PY
  ) >"$logs/sanitizer.log" 2>&1; echo "compute-sanitizer exit $?"; grep -E "ERROR SUMMARY|sanitized|Error" "$logs/sanitizer.log" | head -5
fi
echo "== sanitizer done at $((SECONDS - start)) s"

echo "== benchmark"
left=$((470 - (SECONDS - start))); [ "$left" -lt 60 ] && left=60
(cd /tmp && timeout "$left" "$py" "$root/bench/gpu/bench_loss_gpu.py" --profile "$@") 2>&1 | tee "$logs/bench.log"
left=$((500 - (SECONDS - start)))
if [ "$left" -gt 90 ]; then
  echo "== second size: a Qwen2-7B-like head (tokens=8192 hidden=3584 vocab=151,646)"
  only=("--only" "materialised,mlmix cuda,liger,cut-cross-entropy,cut-cross-entropy no filter")
  [ $# -gt 0 ] && only=()  # arguments given: the same selection at both sizes
  (cd /tmp && timeout "$left" "$py" "$root/bench/gpu/bench_loss_gpu.py" --tokens 8192 --hidden 3584 --vocab 151646 \
    "${only[@]}" "$@") 2>&1 | tee "$logs/bench2.log"
fi
echo "== total $((SECONDS - start)) s"
