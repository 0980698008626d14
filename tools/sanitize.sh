#!/usr/bin/env bash
# Build the extension and the C++ tests with AddressSanitizer + UndefinedBehaviorSanitizer into
# build/asan, then run the C++ tests and the Python test suite against that build.
#
#   tools/sanitize.sh [pytest args...]      default: tests/ (the whole Python suite)
#
# Exit status is non-zero on any test failure and on any sanitizer report (reports are collected
# under build/asan/reports/ and printed). The Python interpreter itself is not instrumented, so
# libasan is preloaded (it must be the first library loaded) and leak detection is off: CPython
# keeps interned objects alive at exit, which LeakSanitizer would report as leaks of ours.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)
build="$root/build/asan"
reports="$build/reports"
jobs=${MLMIX_JOBS:-2}

if [ ! -f "$build/build.ninja" ]; then
  # CUDA stays off: nvcc device code is not instrumented by ASan and the static cudart confuses its
  # interceptors; the CUDA kernels are tested on a GPU machine by the gpu-marked tests instead.
  cmake -S . -B "$build" -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo -DMLMIX_SANITIZE=ON -DMLMIX_CUDA=OFF \
    -DMLMIX_BUILD_PYTHON=ON -DMLMIX_BUILD_TESTS=ON -DSKBUILD_PROJECT_VERSION=0.1.0 \
    -Dpybind11_DIR="$(python3 -m pybind11 --cmakedir)" >/dev/null
fi
cmake --build "$build" -j"$jobs"

# A private copy of the Python package holding the instrumented extension, so that the developer
# build in python/mlmix stays untouched.
pkg="$build/python"
rm -rf "$pkg"
mkdir -p "$pkg"
cp -r python/mlmix "$pkg/"
rm -f "$pkg"/mlmix/_core*.so
cp "$build"/_core*.so "$pkg/mlmix/"

rm -rf "$reports"
mkdir -p "$reports"
# libasan first; libstdc++ right after it, so that ASan's __cxa_throw interceptor finds the real
# one at start-up (python does not link libstdc++, and without this every C++ throw aborts).
preload="$(gcc -print-file-name=libasan.so) $(gcc -print-file-name=libstdc++.so)"
export ASAN_OPTIONS="detect_leaks=0:log_path=$reports/asan:abort_on_error=1:strict_string_checks=1:detect_stack_use_after_return=1:check_initialization_order=1"
export UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1:log_path=$reports/ubsan"

status=0
echo "== C++ tests under ASan+UBSan"
for t in "$build"/test_*; do
  [ -x "$t" ] || continue
  if ASAN_OPTIONS="${ASAN_OPTIONS/detect_leaks=0/detect_leaks=1}" "$t" >"$reports/$(basename "$t").out" 2>&1; then
    echo "   $(basename "$t"): ok"
  else
    echo "   $(basename "$t"): FAILED (exit $?)"; cat "$reports/$(basename "$t").out"; status=1
  fi
done

echo "== Python tests under ASan+UBSan (instrumented _core: $(ls "$pkg"/mlmix/_core*.so))"
args=("$@")
[ ${#args[@]} -eq 0 ] && args=(tests/)
# The instrumented build reports itself; a test run against an uninstrumented _core would prove nothing.
LD_PRELOAD="$preload" PYTHONPATH="$pkg" python3 -c \
  "import mlmix; s = mlmix.build_info()['sanitizers']; assert s == 'address,undefined', s; print('   build_info sanitizers:', s)"
if ! LD_PRELOAD="$preload" PYTHONPATH="$pkg" MLMIX_SANITIZED=1 python3 -m pytest -q -p no:cacheprovider -m "not gpu" "${args[@]}"; then
  status=1
fi

shopt -s nullglob
found=("$reports"/asan.* "$reports"/ubsan.*)
if [ ${#found[@]} -gt 0 ]; then
  echo "== ${#found[@]} sanitizer report(s):"
  for f in "${found[@]}"; do echo "--- $f"; cat "$f"; done
  status=1
else
  echo "== sanitizer reports: 0"
fi
exit $status
