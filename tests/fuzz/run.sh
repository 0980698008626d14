#!/usr/bin/env bash
# Run one atheris fuzz target for a while:  tests/fuzz/run.sh TARGET SECONDS [libFuzzer flags...]
#   TARGET: pack | store | sample | ... (tests/fuzz/fuzz_TARGET.py); SECONDS: wall-clock budget.
# The seed corpus tests/fuzz/corpus/TARGET is read, never written: new inputs go to
# build/fuzz/TARGET/corpus and crash/timeout artifacts to build/fuzz/TARGET/ (a crash exits non-zero;
# turn each one into a regression test). MLMIX_FUZZ_ASAN=1 runs against the ASan build of
# tools/sanitize.sh (build it first), so that memory errors in the C++ core are reported too.
set -euo pipefail
cd "$(dirname "$0")/../.."
target=${1:?usage: tests/fuzz/run.sh TARGET SECONDS [libFuzzer flags...]}
seconds=${2:?usage: tests/fuzz/run.sh TARGET SECONDS [libFuzzer flags...]}
shift 2
harness="tests/fuzz/fuzz_${target}.py"
[ -f "$harness" ] || { echo "no harness $harness (have: $(ls tests/fuzz/fuzz_*.py | sed 's/.*fuzz_//;s/\.py//' | tr '\n' ' '))" >&2; exit 2; }
python3 -c "import atheris" 2>/dev/null || { echo "atheris is not installed: pip install atheris" >&2; exit 2; }
work="build/fuzz/$target"
mkdir -p "$work/corpus" "tests/fuzz/corpus/$target"
env=()
if [ "${MLMIX_FUZZ_ASAN:-0}" = 1 ]; then
  [ -d build/asan/python/mlmix ] || { echo "build the ASan extension first: tools/sanitize.sh" >&2; exit 2; }
  env=(LD_PRELOAD="$(gcc -print-file-name=libasan.so) $(gcc -print-file-name=libstdc++.so)"
       ASAN_OPTIONS="detect_leaks=0:allocator_may_return_null=1" MLMIX_FUZZ_PYTHONPATH="$PWD/build/asan/python"
       MLMIX_SANITIZED=1)
fi
cd tests/fuzz
exec env "${env[@]}" python3 "fuzz_${target}.py" "../../$work/corpus" "corpus/$target" \
  -max_total_time="$seconds" -timeout=30 -rss_limit_mb=4096 -max_len=65536 -print_final_stats=1 \
  -artifact_prefix="../../$work/" "$@"
