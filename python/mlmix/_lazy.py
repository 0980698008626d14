"""Lazy public names for a package: ``__getattr__`` and ``__dir__`` that import a name's module on first use.

Used by ``mlmix``, ``mlmix.torch`` and ``mlmix.eval`` so that importing them stays cheap (no torch, transformers
or matplotlib until a name that needs one is touched).
"""

from __future__ import annotations

import importlib
from typing import Any, Callable, Mapping, MutableMapping, Optional, Tuple, Union

# public name -> "module" (the attribute of the same name in it), or (module, attribute), or (module, None)
# for the module itself
Target = Union[str, Tuple[str, Optional[str]]]


def lazy_exports(package: str, namespace: MutableMapping[str, Any],
                 names: Mapping[str, Target]) -> tuple[Callable[[str], Any], Callable[[], list]]:
    """The module-level ``__getattr__`` and ``__dir__`` for ``package`` whose globals are ``namespace``.

    A resolved name is stored in ``namespace``, so each module is imported once and later lookups are plain
    attribute reads.
    """

    def __getattr__(name: str) -> Any:
        try:
            target = names[name]
        except KeyError:
            raise AttributeError(f"module {package!r} has no attribute {name!r}") from None
        module, attr = (target, name) if isinstance(target, str) else target
        mod = importlib.import_module(module)
        value = mod if attr is None else getattr(mod, attr)
        namespace[name] = value
        return value

    def __dir__() -> list:
        return sorted(set(namespace) | set(names))

    return __getattr__, __dir__
