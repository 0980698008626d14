#!/usr/bin/env bash
# Build and run one libFuzzer target over the C++ core:  tests/fuzz/cpp/run.sh TARGET SECONDS [libFuzzer flags...]
#   TARGET: pack | store_rows | sample | dedup | bpe (tests/fuzz/cpp/fuzz_TARGET.cpp); SECONDS: wall-clock budget.
# Built with clang -fsanitize=fuzzer,address,undefined (coverage-guided inside the kernels; any memory
# error, undefined behaviour, uncaught exception or failed check aborts and fails the run) into
# build/fuzz-cpp/. The seed corpus tests/fuzz/cpp/corpus/TARGET is read, never written: new inputs go to
# build/fuzz-cpp/TARGET/corpus, crash artifacts to build/fuzz-cpp/TARGET/ (turn each into a regression
# test: tests/fuzz/cpp/regressions/TARGET/ is replayed by `run.sh TARGET 0`).
# MLMIX_FUZZ_JOBS=N runs N fuzzing processes sharing the corpus (libFuzzer -fork=N).
set -euo pipefail
cd "$(dirname "$0")/../../.."
target=${1:?usage: tests/fuzz/cpp/run.sh TARGET SECONDS [libFuzzer flags...]}
seconds=${2:?usage: tests/fuzz/cpp/run.sh TARGET SECONDS [libFuzzer flags...]}
shift 2
src="tests/fuzz/cpp/fuzz_${target}.cpp"
[ -f "$src" ] || { echo "no harness $src (have: $(ls tests/fuzz/cpp/fuzz_*.cpp | sed 's/.*fuzz_//;s/\.cpp//' | tr '\n' ' '))" >&2; exit 2; }
CXX=${CXX_FUZZ:-$(command -v clang++ || true)}
[ -n "$CXX" ] || { echo "clang++ is needed for libFuzzer (apt-get install -y clang)" >&2; exit 2; }
out="build/fuzz-cpp"
mkdir -p "$out/obj" "$out/$target/corpus" "tests/fuzz/cpp/corpus/$target"
flags=(-std=c++20 -O1 -g -fno-omit-frame-pointer -fsanitize=address,undefined -fno-sanitize-recover=undefined
       -fsanitize=fuzzer-no-link -Icsrc -pthread)
# the core's sources, instrumented once (make-like: rebuilt when the source or a header is newer)
objs=()
for f in csrc/*.cpp; do
  case "$f" in csrc/bind_*|csrc/bindings.cpp) continue ;; esac
  o="$out/obj/$(basename "${f%.cpp}").o"
  if [ ! -f "$o" ] || [ "$f" -nt "$o" ] || [ -n "$(find csrc -name '*.h' -newer "$o" -print -quit)" ]; then
    "$CXX" "${flags[@]}" -c "$f" -o "$o"
  fi
  objs+=("$o")
done
bin="$out/fuzz_$target"
if [ ! -x "$bin" ] || [ "$src" -nt "$bin" ] || [ -n "$(find "$out/obj" -newer "$bin" -print -quit)" ]; then
  "$CXX" "${flags[@]/-fsanitize=fuzzer-no-link/-fsanitize=fuzzer}" "$src" "${objs[@]}" -o "$bin"
fi
export ASAN_OPTIONS="detect_leaks=1:abort_on_error=1:allocator_may_return_null=1${ASAN_OPTIONS:+:$ASAN_OPTIONS}"
export UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1"
regressions="tests/fuzz/cpp/regressions/$target"
if [ "$seconds" = 0 ]; then  # replay the seed corpus and the regression inputs only
  inputs=("tests/fuzz/cpp/corpus/$target")
  [ -d "$regressions" ] && inputs+=("$regressions")
  exec "$bin" -runs=0 "${inputs[@]}"
fi
jobs=()
[ -n "${MLMIX_FUZZ_JOBS:-}" ] && jobs=(-fork="$MLMIX_FUZZ_JOBS" -ignore_crashes=0)
exec "$bin" "$out/$target/corpus" "tests/fuzz/cpp/corpus/$target" -max_total_time="$seconds" -timeout=20 \
  -rss_limit_mb=2048 -max_len=4096 -print_final_stats=1 -artifact_prefix="$out/$target/" "${jobs[@]}" "$@"
