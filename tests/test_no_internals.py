"""cis_lightning uses only the public API of torch, Lightning, torchmetrics and jsonargparse, and no ctypes.

A name that begins with an underscore (and is not a dunder) is a library's internal: it may change
in any release within the version ranges pyproject allows. The package's own private names are fine.
These tests read the package's source (ast) and fail on:
- importing ctypes, or any private module or name of the four libraries;
- a private attribute reached from a name the libraries provide (torch._foo, nn.Module._apply, ...);
- a private attribute the package itself never defines (so it must be a library's: tensor._version,
  trainer._logger_connector, module._parameters, ...);
- a package class that defines or sets a private member its library base class has
  (overriding nn.Module._apply, setting torchmetrics' self._update_count, ...);
- getattr / setattr / hasattr with a private name, and private string keys (a library's state dict
  entries such as "_batches_that_stepped").
"""

from __future__ import annotations

import ast
import contextlib
import importlib
import inspect
import re
import textwrap
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "cis_lightning"
LIBRARIES = ("torch", "lightning", "torchmetrics", "jsonargparse")
FILES = sorted(PACKAGE.rglob("*.py"))


def _private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def _library(module: str | None) -> bool:
    return module is not None and module.split(".")[0] in LIBRARIES


def _tree(path: Path) -> ast.Module:
    return ast.parse(path.read_text(), filename=str(path))


def _where(path: Path, node: ast.AST) -> str:
    return f"{path.relative_to(PACKAGE.parent)}:{node.lineno}"


def _own_private_attributes() -> set[str]:
    """Every private attribute the package defines: its classes' methods and class attributes, the
    attributes it assigns, and its classes themselves (reached through their module)."""
    names: set[str] = set()
    for path in FILES:
        for node in ast.walk(_tree(path)):
            if isinstance(node, ast.ClassDef):
                names.add(node.name)
                for item in node.body:
                    if isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef)):
                        names.add(item.name)
                    elif isinstance(item, ast.AnnAssign) and isinstance(item.target, ast.Name):
                        names.add(item.target.id)
                    elif isinstance(item, ast.Assign):
                        names |= {t.id for t in item.targets if isinstance(t, ast.Name)}
            elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store):
                names.add(node.attr)
    return {name for name in names if _private(name)}


def _own_private_names() -> set[str]:
    """Every private name the package defines (attributes, functions, variables, arguments)."""
    names = set(_own_private_attributes())
    for path in FILES:
        for node in ast.walk(_tree(path)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                names.add(node.name)
            elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
                names.add(node.id)
            elif isinstance(node, ast.arg):
                names.add(node.arg)
    return {name for name in names if _private(name)}


def test_the_package_has_no_ctypes_and_no_c_sources():
    found = []
    for path in FILES:
        for node in ast.walk(_tree(path)):
            if (
                isinstance(node, ast.Import)
                and any(a.name.split(".")[0] == "ctypes" for a in node.names)
                or isinstance(node, ast.ImportFrom)
                and (node.module or "").split(".")[0] == "ctypes"
            ):
                found.append(_where(path, node))
    assert found == []
    assert sorted(p.name for p in PACKAGE.rglob("*") if p.suffix in (".c", ".h", ".so")) == []


def test_no_private_module_or_name_of_a_library_is_imported():
    found = []
    for path in FILES:
        for node in ast.walk(_tree(path)):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    if _library(alias.name) and any(_private(part) for part in alias.name.split(".")):
                        found.append(f"{_where(path, node)} import {alias.name}")
            elif isinstance(node, ast.ImportFrom) and _library(node.module):
                if any(_private(part) for part in node.module.split(".")):
                    found.append(f"{_where(path, node)} from {node.module}")
                found += [f"{_where(path, node)} {a.name}" for a in node.names if _private(a.name)]
    assert found == []


def test_no_private_attribute_is_reached_from_a_library_name():
    found = []
    for path in FILES:
        tree = _tree(path)
        library_names = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                library_names |= {(a.asname or a.name).split(".")[0] for a in node.names if _library(a.name)}
            elif isinstance(node, ast.ImportFrom) and _library(node.module):
                library_names |= {a.asname or a.name for a in node.names}
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and _private(node.attr):
                root = node.value
                while isinstance(root, ast.Attribute):
                    root = root.value
                if isinstance(root, ast.Name) and root.id in library_names:
                    found.append(f"{_where(path, node)} {root.id}...{node.attr}")
    assert found == []


def test_every_private_attribute_used_is_one_the_package_defines():
    own = _own_private_attributes()
    found = []
    for path in FILES:
        for node in ast.walk(_tree(path)):
            if isinstance(node, ast.Attribute) and _private(node.attr) and node.attr not in own:
                found.append(f"{_where(path, node)} .{node.attr}")
    assert found == []


def test_no_private_name_of_a_library_is_passed_as_a_string():
    own = _own_private_attributes()
    found = []
    for path in FILES:
        for node in ast.walk(_tree(path)):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
                if node.func.id in ("getattr", "setattr", "hasattr", "delattr") and len(node.args) > 1:
                    name = node.args[1]
                    if isinstance(name, ast.Constant) and isinstance(name.value, str) and _private(name.value):
                        if name.value in own:
                            continue
                        found.append(f"{_where(path, node)} {node.func.id}(..., {name.value!r})")
            elif isinstance(node, ast.Subscript) and isinstance(node.slice, ast.Constant):
                key = node.slice.value
                if isinstance(key, str) and _private(key) and key not in own:
                    found.append(f"{_where(path, node)} [{key!r}]")
    assert found == []


def _package_classes() -> list[type]:
    classes = []
    for path in FILES:
        name = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if name.endswith("__main__"):
            continue
        module = importlib.import_module(name)
        classes += [c for c in vars(module).values() if inspect.isclass(c) and c.__module__ == module.__name__]
    return classes


def _self_attributes(cls: type) -> set[str]:
    """Private attributes the class's own source reads or sets on self."""
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    except (OSError, TypeError):
        return set()
    return {
        node.attr
        for node in ast.walk(tree)
        if isinstance(node, ast.Attribute)
        and isinstance(node.value, ast.Name)
        and node.value.id == "self"
        and _private(node.attr)
    }


@pytest.mark.parametrize("cls", _package_classes(), ids=lambda c: f"{c.__module__}.{c.__qualname__}")
def test_no_class_overrides_or_sets_a_private_member_of_its_library_base(cls):
    bases = [b for b in cls.__mro__[1:] if _library(b.__module__)]
    if not bases:
        return
    sources = []
    for base in bases:
        with contextlib.suppress(OSError, TypeError):
            sources.append(inspect.getsource(base))
    members = {name for name in vars(cls) if _private(name)} | _self_attributes(cls)
    # Less what the metaclass sets on every subclass (ABCMeta's _abc_impl, torch's Function._backward_cls).
    members -= set(vars(type(cls)("Probe", cls.__bases__, {"__module__": __name__})))
    clashes = sorted(
        name
        for name in members
        if any(hasattr(base, name) for base in bases)
        or any(re.search(rf"self\.{name}\b", source) for source in sources)
    )
    assert clashes == [], f"{cls.__qualname__} touches its library base's private members {clashes}"
