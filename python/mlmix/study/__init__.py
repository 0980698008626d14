"""The paper's experiments as one reproducible benchmark: a grid of mixtures over one parallel instruction set,
the same training recipe and the same evaluation for each, one results table and report. See docs/study.md.

``mlmix.study(config)`` runs it (``mlmix study CONFIG`` on the command line); the names below are imported
lazily (torch and transformers load only when a study trains).
"""

from __future__ import annotations

import sys
import types
from typing import Any, Callable, Optional

from .._lazy import lazy_exports

_LAZY = {
    "run": "mlmix.study.runner",
    "add_subparser": "mlmix.study.runner",
    "main": "mlmix.study.runner",
    "load_config": "mlmix.study.config",
    "config_hash": "mlmix.study.config",
    "DEFAULT_CONFIG": "mlmix.study.config",
    "BUNDLED_DEFAULT": "mlmix.study.config",
    "FAMILIES": "mlmix.study.config",
    "Arm": "mlmix.study.arms",
    "expand_arms": "mlmix.study.arms",
    "to_csv": "mlmix.study.results",
    "format_table": "mlmix.study.results",
}

__all__ = ["study", *sorted(_LAZY)]


def study(config: Any = None, *, output: Optional[str] = None, judge: Any = None,
          progress: Optional[Callable[[str], None]] = None) -> dict:
    """Run a study (see :func:`mlmix.study.runner.run`): ``config`` a dict or a .toml / .yaml / .json path (None:
    the bundled reduced grid on the tiny LM); ``judge`` an optional side-by-side judge given in Python. Writes
    ``results.json``, ``results.csv`` and ``report.html`` into the output directory and returns the results."""
    from .runner import run

    return run(config, output=output, judge=judge, progress=progress)


__getattr__, __dir__ = lazy_exports("mlmix.study", globals(), _LAZY)


class _CallableModule(types.ModuleType):
    """The package is also the function: ``mlmix.study(config)`` runs a study, and ``import mlmix.study.runner``
    still finds the package (a function bound over the package's name would hide its submodules)."""

    def __call__(self, config: Any = None, **kwargs: Any) -> dict:
        return study(config, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
