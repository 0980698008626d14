#!/usr/bin/env bash
# The hardening CI job:
#   1. tools/sanitize.sh: build the extension and the C++ tests with ASan + UBSan, run the C++ tests and a
#      representative subset of the Python tests against that build (every kernel's tests, the bindings
#      fuzz, store corruption/crash tests, the loader and its resume test); any sanitizer report fails.
#   2. every fuzz target for MLMIX_FUZZ_SECONDS (default 60) seconds: the libFuzzer targets over the C++
#      core (tests/fuzz/cpp, needs clang) after replaying their seed corpora and regression inputs, and
#      the atheris targets for the Python layers (store manifest parsing, HF tokenizer path, the block chat
#      encoder against encode_records, the C++ JSON lines reader against the Python path, the native language
#      identifier against py3langid); without
#      clang, the atheris target of every kernel instead. Any crash, sanitizer report or failed
#      property check fails the job.
#
#   tools/ci-hardening.sh            both parts
#   tools/ci-hardening.sh sanitize   part 1 only;   tools/ci-hardening.sh fuzz   part 2 only
# Exit status: 0 when everything passed, 1 otherwise (every part runs; failures are listed at the end).
set -uo pipefail
cd "$(dirname "$0")/.."
what=${1:-all}
seconds=${MLMIX_FUZZ_SECONDS:-60}
failed=()
t_start=$(date +%s)

step() {  # step NAME COMMAND...: run, time, remember a failure
  local name=$1 t0 rc
  shift
  echo "=== $name"
  t0=$(date +%s)
  "$@"
  rc=$?
  echo "=== $name: $([ $rc = 0 ] && echo ok || echo "FAILED (exit $rc)") in $(( $(date +%s) - t0 )) s"
  [ $rc = 0 ] || failed+=("$name")
}

if [ "$what" = all ] || [ "$what" = sanitize ]; then
  step "ASan+UBSan: C++ tests and Python subset" tools/sanitize.sh \
    tests/test_pack.py tests/test_store.py tests/test_sample.py tests/test_dedup.py tests/test_bpe.py \
    tests/test_ragged.py tests/test_tokenize.py tests/test_bindings_fuzz.py tests/test_hardening_store.py \
    tests/test_hardening_atomic.py tests/test_loader.py tests/test_resume.py tests/test_encode_block.py \
    tests/test_records_where.py tests/test_langid_native.py \
    --deselect tests/test_encode_block.py::test_resident_memory_of_the_qwen36_tokenizer
  # (that test bounds a process's resident memory, which ASan's shadow memory and quarantine inflate; it runs
  # in the main suite)
fi

if [ "$what" = all ] || [ "$what" = fuzz ]; then
  if command -v clang++ >/dev/null 2>&1; then
    for t in pack store_rows sample dedup bpe; do
      step "libFuzzer $t: seed corpus and regressions" tests/fuzz/cpp/run.sh "$t" 0
      step "libFuzzer $t: ${seconds} s" tests/fuzz/cpp/run.sh "$t" "$seconds"
    done
    atheris_targets=(store tokenize chat records langid)
  else
    echo "clang++ not found: fuzzing the kernels with atheris instead (apt-get install -y clang for libFuzzer)"
    atheris_targets=(pack store sample dedup tokenize bpe chat records langid)
  fi
  if python3 -c "import atheris" 2>/dev/null; then
    for t in "${atheris_targets[@]}"; do
      step "atheris $t: ${seconds} s" tests/fuzz/run.sh "$t" "$seconds"
    done
  else
    echo "atheris is not installed (pip install atheris): atheris targets not run"
    failed+=("atheris missing")
  fi
fi

echo "=== hardening CI: $(( $(date +%s) - t_start )) s"
if [ ${#failed[@]} -gt 0 ]; then
  printf '=== FAILED: %s\n' "${failed[@]}"
  exit 1
fi
echo "=== all passed"
