#!/usr/bin/env bash
# Fused linear cross-entropy on a GPU machine (no network needed): build and install mlmix, install the
# competitors' pure-Python wheels from .whl/ when present, run the GPU tests, then print the benchmark table.
# Run from anywhere: bench/gpu/run.sh [extra args for bench_loss_gpu.py]. Meant to finish within 8 minutes
# on an H100 (build ~2 min, tests <1 min, benchmark ~3 min).
# Bring along (carry) .whl/ with liger_kernel-*.whl, cut_cross_entropy-*.whl, and for a bare Python also
# pytest/hypothesis wheels and their dependencies: `pip download --no-deps -d .whl liger-kernel cut-cross-entropy
# pytest pluggy iniconfig hypothesis sortedcontainers attrs`.
set -uo pipefail
cd "$(dirname "$0")/../.."
start=$SECONDS
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true

echo "== build + install (pip install --no-build-isolation --no-deps .)"
python -m pip install --no-build-isolation --no-deps -q . || { echo "build failed"; exit 1; }
python - <<'PY'
import importlib.util, subprocess, sys, glob
# install a carried wheel only when the module is missing (never replaces the machine's own packages)
wanted = {"liger_kernel": "liger_kernel-", "cut_cross_entropy": "cut_cross_entropy-", "pytest": "pytest-",
          "pluggy": "pluggy-", "iniconfig": "iniconfig-", "hypothesis": "hypothesis-",
          "sortedcontainers": "sortedcontainers-", "attr": "attrs-"}
for module, prefix in wanted.items():
    if importlib.util.find_spec(module) is None:
        wheels = sorted(glob.glob(f".whl/{prefix}*.whl"))
        if wheels:
            subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", wheels[-1]], check=False)
        else:
            print(f"note: {module} is not installed and no .whl/{prefix}*.whl was carried")
PY
python -c "import mlmix, json; print(json.dumps(mlmix.build_info()))"
echo "== build took $((SECONDS - start)) s"

echo "== GPU tests"
# run from a scratch directory against the installed package (python/ on sys.path would lack _core)
tmp=$(mktemp -d)
cp -r tests "$tmp/" && cp pyproject.toml "$tmp/"
(cd "$tmp" && timeout 180 python -m pytest -q -m gpu tests/test_loss.py -p no:cacheprovider) 2>&1 | tail -15
echo "== tests done at $((SECONDS - start)) s"

echo "== benchmark"
left=$((470 - (SECONDS - start))); [ "$left" -lt 60 ] && left=60
timeout "$left" python bench/gpu/bench_loss_gpu.py "$@"
echo "== total $((SECONDS - start)) s"
