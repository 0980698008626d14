"""Shared set-up of the atheris harnesses: finds the package, instruments mlmix's Python code for
coverage, and names the exceptions that count as a clean refusal of bad input.

The compiled core is not coverage-instrumented (it is built with gcc, without
-fsanitize=fuzzer-no-link); coverage guidance comes from the Python layers, and a memory error in the
core still shows as a crash (run the harness on the ASan build, tools/sanitize.sh, to catch silent
ones: see tests/fuzz/run.sh).
"""

from __future__ import annotations

import glob
import importlib.abc
import importlib.util
import os
import site
import sys

import atheris

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# The package to fuzz: MLMIX_FUZZ_PYTHONPATH (the ASan build), else the source tree when a developer build put
# the extension there (.ci/dev-build), else the installed mlmix (a clean clone with `pip install .`).
_src = os.environ.get("MLMIX_FUZZ_PYTHONPATH") or os.path.join(ROOT, "python")


class _InstalledCore(importlib.abc.MetaPathFinder):
    """Finds ``mlmix._core`` where an editable install put it (site-packages)."""

    def __init__(self, path: str) -> None:
        self.path = path

    def find_spec(self, fullname, path=None, target=None):
        if fullname != "mlmix._core":
            return None
        return importlib.util.spec_from_file_location(fullname, self.path)


def _choose_package() -> None:
    """Which mlmix the harness imports. scikit-build-core's editable install (``pip install -e .``) imports mlmix
    through a finder and loader of its own, ahead of ``sys.path``, which atheris cannot instrument (the harness
    would run without coverage guidance: "no interesting inputs were found") and which would win over
    MLMIX_FUZZ_PYTHONPATH. So its finder is set aside, and the sources are imported directly: from _src when it
    holds a built extension, else from the source tree with the compiled core from where the install put it."""
    if "mlmix" in sys.modules:
        return
    editable = [f for f in sys.meta_path if type(f).__module__.startswith("_editable_skbc_")]
    if glob.glob(os.path.join(_src, "mlmix", "_core*.so")):
        for f in editable:
            sys.meta_path.remove(f)
        sys.path.insert(0, _src)
        return
    cores = [c for d in site.getsitepackages() for c in glob.glob(os.path.join(d, "mlmix", "_core*.so"))]
    if not editable or not cores:
        return  # an ordinary install: imported as it is
    for f in editable:
        sys.meta_path.remove(f)
    sys.meta_path.insert(0, _InstalledCore(cores[0]))
    sys.path.insert(0, os.path.join(ROOT, "python"))


_choose_package()

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
