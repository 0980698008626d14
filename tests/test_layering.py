"""Layering of python/mlmix, read from the source with ``ast`` (nothing is imported).

Rules (docs: ARCHITECTURE.md):

(a) A module's private names (``_x``) are its own: no ``from <mlmix module> import _x`` unless ``_x`` is itself a
    module (``from . import _paths`` imports an internal module, which is how shared helpers are shared).
(b) No ``m._x`` (nor ``getattr(m, "_x")``, ``setattr``, ``hasattr``, ``delattr``) where ``m`` is a name bound by
    importing another mlmix module (``from . import store``, ``import mlmix.pack as p``, ``import mlmix``).
    Dunder names are excepted, and so is the compiled extension ``mlmix._core``: its ``_``-names are the
    binding layer that the documented Python wrappers call (STYLE.md: typed variants such as ``_pack_i32``).
(c) torch, transformers, tokenizers and ray are imported lazily where used: no module-level import of them
    (``import``, ``from``, or ``require("torch", ...)``) outside python/mlmix/torch/ and python/mlmix/hf.py,
    so that ``import mlmix`` and the modules below mlmix.torch stay cheap and work without them.

A violation is reported as ``path:line: message``.
"""

from __future__ import annotations

import ast
import os
import textwrap

PKG_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir, "python", "mlmix")

HEAVY = {"torch", "transformers", "tokenizers", "ray"}
# where a module-level import of a HEAVY package is allowed (relative to python/mlmix, "/"-separated)
HEAVY_ALLOWED_DIRS = ("torch/",)
HEAVY_ALLOWED_FILES = {"hf.py"}
# modules whose "_" names are meant to be called by the other modules (the pybind11 binding layer)
BINDING_MODULES = {"mlmix._core"}
_ATTR_FUNCS = {"getattr", "setattr", "hasattr", "delattr"}
_COMPREHENSIONS = (ast.ListComp, ast.SetComp, ast.DictComp, ast.GeneratorExp)
_MATCH_CAPTURES = tuple(getattr(ast, n) for n in ("MatchAs", "MatchStar") if hasattr(ast, n))  # Python >= 3.10


def _private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def package_modules(pkg_dir: str = PKG_DIR, pkg: str = "mlmix") -> dict[str, str]:
    """{dotted module name: path relative to pkg_dir} of every module in the package, including compiled ones
    (known by their .pyi stub or extension file)."""
    out: dict[str, str] = {}
    for root, dirs, files in os.walk(pkg_dir):
        dirs[:] = sorted(d for d in dirs if d != "__pycache__")
        rel = os.path.relpath(root, pkg_dir).replace(os.sep, "/")
        parts = [pkg] if rel == "." else [pkg, *rel.split("/")]
        if "__init__.py" not in files:
            continue  # a data folder, not a package
        for f in sorted(files):
            path = f if rel == "." else f"{rel}/{f}"
            stem, ext = f.split(".", 1)[0], f.rsplit(".", 1)[-1]
            if f == "__init__.py":
                out[".".join(parts)] = path
            elif ext in ("py", "pyi", "so", "pyd"):
                out.setdefault(".".join([*parts, stem]), path)
    return out


def _module_of(path: str, pkg: str = "mlmix") -> tuple[str, bool]:
    """(dotted name, is a package) of a module at ``path`` (relative to the package folder)."""
    parts = path[: -len(".py")].split("/")
    if parts[-1] == "__init__":
        return ".".join([pkg, *parts[:-1]]), True
    return ".".join([pkg, *parts]), False


def _resolve_from(node: ast.ImportFrom, module: str, is_package: bool) -> str | None:
    """The absolute name of the module that ``from X import ...`` reads."""
    if node.level == 0:
        return node.module
    base = module.split(".") if is_package else module.split(".")[:-1]
    if node.level > 1:
        base = base[: len(base) - (node.level - 1)]
    return ".".join([*base, node.module] if node.module else base)


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


class _Checker:
    def __init__(self, path: str, modules: dict[str, str], pkg: str = "mlmix") -> None:
        self.path, self.modules, self.pkg = path, modules, pkg
        self.module, self.is_package = _module_of(path, pkg)
        self.problems: list[tuple[int, str]] = []

    def ours(self, name: str | None) -> bool:
        return bool(name) and (name == self.pkg or name.startswith(self.pkg + "."))

    # --- (a) and the bindings that (b) follows ------------------------------------------------------------------
    def import_bindings(self, node: ast.stmt) -> dict[str, str | None]:
        """Names an import statement binds -> the mlmix module each stands for (None: anything else)."""
        out: dict[str, str | None] = {}
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.asname:
                    out[a.asname] = a.name if a.name in self.modules else None
                else:
                    top = a.name.split(".")[0]
                    out[top] = top if top in self.modules else None
        elif isinstance(node, ast.ImportFrom):
            src = _resolve_from(node, self.module, self.is_package)
            for a in node.names:
                if a.name == "*":
                    continue
                full = f"{src}.{a.name}"
                out[a.asname or a.name] = full if full in self.modules else None
        return out

    def check_import_from(self, node: ast.ImportFrom) -> None:
        src = _resolve_from(node, self.module, self.is_package)
        if not self.ours(src) or src == self.module:
            return
        for a in node.names:
            if _private(a.name) and f"{src}.{a.name}" not in self.modules:
                self.problems.append((node.lineno, f"imports the private name {a.name!r} of {src} "
                                                   "(share it through an internal module or a public name)"))

    # --- (b) ----------------------------------------------------------------------------------------------------
    def module_of_expr(self, node: ast.expr, env: dict[str, str | None]) -> str | None:
        if isinstance(node, ast.Name):
            return env.get(node.id)
        if isinstance(node, ast.Attribute):
            base = self.module_of_expr(node.value, env)
            if base is not None and f"{base}.{node.attr}" in self.modules:
                return f"{base}.{node.attr}"
        return None

    def check_access(self, owner: ast.expr, attr: str, line: int, env: dict[str, str | None], how: str) -> None:
        target = self.module_of_expr(owner, env)
        if (target is None or target == self.module or target in BINDING_MODULES or not _private(attr)
                or f"{target}.{attr}" in self.modules):
            return
        self.problems.append((line, f"{how} the private name {attr!r} of {target} "
                                    "(share it through an internal module or a public name)"))

    # --- scopes -------------------------------------------------------------------------------------------------
    def local_bindings(self, body: list[ast.AST]) -> tuple[dict[str, str | None], set[str]]:
        """(names bound by imports, names bound otherwise) directly in one scope."""
        imported: dict[str, str | None] = {}
        other: set[str] = set()
        todo = list(body)
        while todo:
            n = todo.pop()
            if isinstance(n, (ast.Import, ast.ImportFrom)):
                imported.update(self.import_bindings(n))
                continue
            if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                other.add(n.name)
                todo.extend(n.decorator_list)
                continue
            if isinstance(n, (ast.Lambda, *_COMPREHENSIONS)):
                continue  # their own scope
            if isinstance(n, ast.Name) and isinstance(n.ctx, (ast.Store, ast.Del)):
                other.add(n.id)
            elif isinstance(n, ast.ExceptHandler) and n.name:
                other.add(n.name)
            elif isinstance(n, _MATCH_CAPTURES) and n.name:
                other.add(n.name)
            todo.extend(ast.iter_child_nodes(n))
        return imported, other

    def scope(self, body: list[ast.AST], env: dict[str, str | None], args: ast.arguments | None = None) -> None:
        imported, other = self.local_bindings(body)
        env = dict(env)
        if args is not None:
            for a in [*args.posonlyargs, *args.args, *args.kwonlyargs, args.vararg, args.kwarg]:
                if a is not None:
                    env[a.arg] = None
        for name in other:
            env[name] = None
        for name, mod in imported.items():
            env[name] = None if name in other else mod
        self.walk(body, env)

    def walk(self, nodes: list[ast.AST], env: dict[str, str | None]) -> None:
        todo = list(reversed(nodes))
        while todo:
            n = todo.pop()
            if isinstance(n, ast.ImportFrom):
                self.check_import_from(n)
            elif isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)):
                self.walk([*n.decorator_list, *n.args.defaults, *[d for d in n.args.kw_defaults if d]], env)
                self.scope(n.body, env, n.args)
                continue
            elif isinstance(n, ast.Lambda):
                self.scope([n.body], env, n.args)
                continue
            elif isinstance(n, ast.ClassDef):
                self.walk([*n.decorator_list, *n.bases, *n.keywords], env)
                self.scope(n.body, env)
                continue
            elif isinstance(n, _COMPREHENSIONS):
                targets = {t.id for g in n.generators for t in ast.walk(g.target) if isinstance(t, ast.Name)}
                self.walk(list(ast.iter_child_nodes(n)), {**env, **dict.fromkeys(targets)})
                continue
            elif isinstance(n, ast.Attribute):
                self.check_access(n.value, n.attr, n.lineno, env, "reads")
            elif (isinstance(n, ast.Call) and isinstance(n.func, ast.Name) and n.func.id in _ATTR_FUNCS
                  and len(n.args) >= 2 and isinstance(n.args[1], ast.Constant) and isinstance(n.args[1].value, str)):
                self.check_access(n.args[0], n.args[1].value, n.lineno, env, f"{n.func.id}() reaches")
            todo.extend(reversed(list(ast.iter_child_nodes(n))))

    # --- (c) ----------------------------------------------------------------------------------------------------
    def check_heavy(self, tree: ast.Module) -> None:
        if self.path.startswith(HEAVY_ALLOWED_DIRS) or self.path in HEAVY_ALLOWED_FILES:
            return
        todo: list[ast.AST] = list(tree.body)
        while todo:
            n = todo.pop()
            if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
                continue  # runs when called: a lazy import
            if isinstance(n, ast.If) and _is_type_checking(n.test):
                todo.extend(n.orelse)
                continue
            names: list[str] = []
            if isinstance(n, ast.Import):
                names = [a.name for a in n.names]
            elif isinstance(n, ast.ImportFrom) and n.level == 0 and n.module:
                names = [n.module]
            elif (isinstance(n, ast.Call) and n.args and isinstance(n.args[0], ast.Constant)
                  and isinstance(n.args[0].value, str)
                  and ((isinstance(n.func, ast.Name) and n.func.id in ("require", "import_module"))
                       or (isinstance(n.func, ast.Attribute) and n.func.attr in ("require", "import_module")))):
                names = [n.args[0].value]
            for name in names:
                if name.split(".")[0] in HEAVY:
                    self.problems.append((n.lineno, f"imports {name} when the module is imported (import it "
                                                    "lazily, inside the function that needs it)"))
            todo.extend(ast.iter_child_nodes(n))

    def run(self, source: str) -> list[tuple[int, str]]:
        tree = ast.parse(source, filename=self.path)
        self.scope(tree.body, {})
        self.check_heavy(tree)
        return sorted(set(self.problems))


def check_source(source: str, path: str, modules: dict[str, str]) -> list[str]:
    """Violations in one module's source; ``path`` is relative to the package folder ("store.py")."""
    return [f"python/mlmix/{path}:{line}: {msg}" for line, msg in _Checker(path, modules).run(source)]


def check_package(pkg_dir: str = PKG_DIR) -> dict[str, list[str]]:
    """{"python/mlmix/<path>": violations} for every .py module of the package."""
    modules = package_modules(pkg_dir)
    out = {}
    for path in sorted(p for p in modules.values() if p.endswith(".py")):
        with open(os.path.join(pkg_dir, path), encoding="utf-8") as f:
            out[f"python/mlmix/{path}"] = check_source(f.read(), path, modules)
    return out


# --- the package ------------------------------------------------------------------------------------------------
def test_no_module_reaches_into_another_or_imports_heavy_packages_eagerly():
    found = check_package()
    assert len(found) > 30, f"the checker found too few modules under {PKG_DIR}: {sorted(found)}"
    bad = [v for vs in found.values() for v in vs]
    assert not bad, "layering violations (see tests/test_layering.py for the rules):\n" + "\n".join(bad)


# --- the checker itself: it must catch what it is meant to catch ------------------------------------------------
MODULES = {
    "mlmix": "__init__.py", "mlmix.store": "store.py", "mlmix.pack": "pack.py", "mlmix._paths": "_paths.py",
    "mlmix._core": "_core.pyi", "mlmix.torch": "torch/__init__.py", "mlmix.torch.data": "torch/data.py",
    "mlmix.eval": "eval/__init__.py", "mlmix.eval.fidelity": "eval/fidelity.py",
}


def _check(src: str, path: str = "store.py") -> list[str]:
    return check_source(textwrap.dedent(src), path, MODULES)


def test_checker_catches_private_imports():
    found = _check("""
        from ..pack import pack, _check_seed
        from mlmix.pack import _core as core
        from ..store import _x  # from mlmix/torch/data.py
    """, "torch/data.py")
    assert found == [
        "python/mlmix/torch/data.py:2: imports the private name '_check_seed' of mlmix.pack "
        "(share it through an internal module or a public name)",
        "python/mlmix/torch/data.py:3: imports the private name '_core' of mlmix.pack "
        "(share it through an internal module or a public name)",
        "python/mlmix/torch/data.py:4: imports the private name '_x' of mlmix.store "
        "(share it through an internal module or a public name)",
    ]
    assert [v.split(": ", 1)[0] for v in _check("from ..langid import _full_model\n", "eval/fidelity.py")] == [
        "python/mlmix/eval/fidelity.py:1"]


def test_checker_allows_internal_modules_public_names_and_outside_packages():
    assert _check("""
        from . import _paths, _core
        from ._paths import check_target
        from .pack import pack
        from os import _exit
        from . import store as _store_mod
        import numpy._core as npc
        from .store import __doc__
        def f():
            _paths.resolve()
            _core._pack_i32()    # the binding layer
            npc._private()       # not ours
    """, "cli.py") == []


def test_checker_catches_attribute_access_through_imported_modules():
    found = _check("""
        from . import store
        import mlmix.pack as p
        import mlmix
        import mlmix.torch.data
        from .torch import data
        store._check_shard_sequences(1, 2)
        x = p._TOKEN_SUFFIX
        def f():
            return mlmix.pack._core(), mlmix.torch.data._key(1)
        class C:
            y = data._mix64
        getattr(store, "_NATIVE_CACHE", None)
        setattr(p, "_x", 1)
        lambda: store._y
    """, "pipeline.py")
    assert [int(v.split(":")[1]) for v in found] == [7, 8, 10, 10, 12, 13, 14, 15], found
    assert "reads the private name '_check_shard_sequences' of mlmix.store" in found[0]
    assert "getattr() reaches the private name '_NATIVE_CACHE' of mlmix.store" in found[5]


def test_checker_follows_scopes_and_ignores_own_names_and_dunders():
    assert _check("""
        from . import store
        def f(store):           # a parameter, not the module
            return store._watch_state()
        def g():
            store = object()
            return store._x
        def h():
            for store in []:
                store._y
        x = store.__name__
        _ = [store._z for store in range(3)]
        def k():
            return store._w     # the module again
    """, "pack.py") == [
        "python/mlmix/pack.py:14: reads the private name '_w' of mlmix.store "
        "(share it through an internal module or a public name)"]
    # the module's own names are its own
    assert _check("import mlmix.store\nmlmix.store._own\nfrom .store import _x\n", "store.py") == []


def test_checker_catches_eager_heavy_imports():
    src = """
        import os
        import torch
        from transformers import AutoModel
        import tokenizers.models
        ray = require("ray", "x")
        try:
            import torch.nn
        except ImportError:
            pass
        class C:
            import ray
        if TYPE_CHECKING:
            import torch
        def f():
            import torch
            tokenizers = require("tokenizers")
    """
    assert [int(v.split(":")[1]) for v in _check(src, "store.py")] == [3, 4, 5, 6, 8, 12]
    assert _check(src, "torch/data.py") == []
    assert _check(src, "hf.py") == []


def test_check_package_walks_a_package_and_reports_file_and_line(tmp_path):
    pkg = tmp_path / "mlmix"
    (pkg / "torch").mkdir(parents=True)
    (pkg / "data").mkdir()  # no __init__.py: a data folder, not read
    (pkg / "__init__.py").write_text("")
    (pkg / "_core.pyi").write_text("def _pack_i32(): ...\n")
    (pkg / "a.py").write_text("def _helper(): ...\n")
    (pkg / "b.py").write_text("from . import _core, a\nfrom .a import _helper\n_core._pack_i32()\na._helper()\n")
    (pkg / "torch" / "__init__.py").write_text("")
    (pkg / "torch" / "data.py").write_text("import torch\nfrom .. import a\n")
    (pkg / "data" / "x.py").write_text("import torch\n")
    found = check_package(str(pkg))
    assert sorted(found) == ["python/mlmix/__init__.py", "python/mlmix/a.py", "python/mlmix/b.py",
                             "python/mlmix/torch/__init__.py", "python/mlmix/torch/data.py"]
    assert [v.split(": ", 1)[0] for v in found["python/mlmix/b.py"]] == ["python/mlmix/b.py:2", "python/mlmix/b.py:4"]
    assert not found["python/mlmix/torch/data.py"]
