"""Shared set-up of the atheris harnesses: finds the package, instruments mlmix's Python code for
coverage, and names the exceptions that count as a clean refusal of bad input.

The compiled core is not coverage-instrumented (it is built with gcc, without
-fsanitize=fuzzer-no-link); coverage guidance comes from the Python layers, and a memory error in the
core still shows as a crash (run the harness on the ASan build, tools/sanitize.sh, to catch silent
ones: see tests/fuzz/run.sh).
"""

from __future__ import annotations

import glob
import os
import sys

import atheris

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# The package to fuzz: MLMIX_FUZZ_PYTHONPATH (the ASan build), else the source tree when a developer build put
# the extension there (.ci/dev-build), else the installed mlmix (a clean clone with `pip install .`).
_src = os.environ.get("MLMIX_FUZZ_PYTHONPATH") or os.path.join(ROOT, "python")
if "mlmix" not in sys.modules and glob.glob(os.path.join(_src, "mlmix", "_core*.so")):
    sys.path.insert(0, _src)

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
