"""Import of the compiled extension with a helpful message when the build is missing."""

from __future__ import annotations

try:
    from . import _core  # noqa: F401
except ImportError as exc:  # pragma: no cover - only when the package was not built
    raise ImportError(
        "mlmix's compiled extension mlmix._core could not be imported; install mlmix with "
        "'pip install .' (it is built by scikit-build-core), not by putting python/ on sys.path. "
        f"Original error: {exc}"
    ) from exc

core = _core
