"""Shared set-up of the atheris harnesses: finds the package, instruments mlmix's Python code for
coverage, and names the exceptions that count as a clean refusal of bad input.

The compiled core is not coverage-instrumented (it is built with gcc, without
-fsanitize=fuzzer-no-link); coverage guidance comes from the Python layers, and a memory error in the
core still shows as a crash (run the harness on the ASan build, tools/sanitize.sh, to catch silent
ones: see tests/fuzz/run.sh).
"""

from __future__ import annotations

import os
import sys

import atheris

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if "mlmix" not in sys.modules and os.path.isdir(os.path.join(ROOT, "python", "mlmix")):
    sys.path.insert(0, os.environ.get("MLMIX_FUZZ_PYTHONPATH", os.path.join(ROOT, "python")))

with atheris.instrument_imports(include=["mlmix"]):
    import mlmix  # noqa: F401
    import mlmix.pack  # noqa: F401
    import mlmix.sample  # noqa: F401
    import mlmix.store  # noqa: F401

# Bad input must end in one of these (ValueError covers StoreError and UnicodeError); anything else
# that escapes a harness is reported by atheris as a crash, like a segfault would be.
CLEAN = (ValueError, TypeError, IndexError, MemoryError)


def main(test_one_input) -> None:
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()
