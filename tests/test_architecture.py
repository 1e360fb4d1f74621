"""The package's layout: dependencies point one way, and only the Lightning layer imports Lightning.

Layers, lowest first (a module may import its own layer and the layers its entry allows):

    core          torch only: models, mixing, task, loss, baselines
    evaluation    the estimators of L / p (core)
    fastpath      the CPU fast backend of the training loss (core)
    backends      the one seam between training and fastpath (core, fastpath)
    analysis      weight analyses and figures (core, evaluation)
    runs          a run's files: config files, results, weights, `load_run` (core, evaluation)
    lightning     LightningModule, data module, callbacks, checkpointing, the LightningCLI
    experiments   the paper's experiments, the report, `cis reproduce`
    entry points  cis_lightning.cli (`cis`), cis_lightning.demo, the package's __init__

Read from the source with ast (every import, also those inside functions), so a cycle hidden by a
local import is found too.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "cis_lightning"

ALLOWED = {
    "core": {"core"},
    "evaluation": {"core", "evaluation"},
    "fastpath": {"core", "fastpath"},
    "backends": {"core", "fastpath", "backends"},
    "analysis": {"core", "evaluation", "analysis"},
    "runs": {"core", "evaluation", "runs"},
    "lightning": {"core", "evaluation", "backends", "analysis", "runs", "lightning"},
    "experiments": {"core", "evaluation", "analysis", "runs", "lightning", "experiments"},
}
ENTRY_POINTS = {"__init__", "__main__", "cli", "demo"}
LIGHTNING_LAYERS = {"lightning", "experiments"}  # the only layers that may import lightning


def layer(path: Path) -> str:
    """The layer of a module file: its subpackage, or its own name for a top-level module."""
    relative = path.relative_to(PACKAGE)
    return relative.parts[0] if len(relative.parts) > 1 else relative.stem


def modules() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py"))


def imports(path: Path) -> list[tuple[str, int]]:
    """(absolute module name, line) of every import in the file, relative imports resolved."""
    package = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts[:-1])
    found = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found += [(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*parts, base] if base else parts)
            # `from cis_lightning import analysis` imports the submodule cis_lightning.analysis
            names = [f"{base}.{alias.name}" for alias in node.names] if base == "cis_lightning" else [base]
            found += [(name, node.lineno) for name in names]
    return found


def module_name(path: Path) -> str:
    return ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts).removesuffix(".__init__")


def target_layer(module: str) -> str | None:
    parts = module.split(".")
    if parts[0] != "cis_lightning" or len(parts) < 2:
        return None
    return parts[1]


def test_every_module_sits_in_a_known_layer():
    unknown = {str(p.relative_to(PACKAGE)) for p in modules() if layer(p) not in ALLOWED | dict.fromkeys(ENTRY_POINTS)}
    assert not unknown, f"modules outside the layers of this test: {sorted(unknown)}"


@pytest.mark.parametrize("path", modules(), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_imports_point_down(path):
    own = layer(path)
    # The entry points may import any layer; no layer imports them (below).
    allowed = set(ALLOWED) if own in ENTRY_POINTS else ALLOWED[own]
    wrong = []
    for module, line in imports(path):
        target = target_layer(module)
        if target is None:
            continue
        if target in ENTRY_POINTS and own not in ENTRY_POINTS:
            wrong.append(f"line {line}: {module} (an entry point)")
        elif target not in ENTRY_POINTS and target not in allowed:
            wrong.append(f"line {line}: {module} (layer {target})")
    assert not wrong, f"{own} may import only {sorted(allowed)}; {path.name} imports " + "; ".join(wrong)


@pytest.mark.parametrize("path", modules(), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_only_the_lightning_layers_import_lightning(path):
    if layer(path) in LIGHTNING_LAYERS or layer(path) in ENTRY_POINTS - {"__init__"}:
        return
    lightning = [
        f"line {line}: {m}" for m, line in imports(path) if m.split(".")[0] in ("lightning", "pytorch_lightning")
    ]
    assert not lightning, f"{path.relative_to(PACKAGE)} (layer {layer(path)}) imports Lightning: {lightning}"


def test_no_import_cycles_between_modules():
    """No module imports, directly or through others, a module that imports it back."""
    names = {
        p: ".".join(p.relative_to(PACKAGE.parent).with_suffix("").parts).removesuffix(".__init__") for p in modules()
    }
    known = set(names.values())
    graph = {
        name: {m for m, _ in imports(path) if m in known and m != name and not name.startswith(m + ".")}
        for path, name in names.items()
    }
    for name in graph:  # a package's __init__ that imports its own submodules is no cycle
        graph[name] = {m for m in graph[name] if not m.startswith(name + ".")}
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycle = stack[stack.index(nxt) :] + [nxt]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node)


def test_the_core_and_the_notebook_api_import_without_lightning():
    """A notebook imports the package, its core and `load_run` without loading Lightning."""
    import subprocess
    import sys

    code = (
        "import sys, cis_lightning, cis_lightning.core.models, cis_lightning.evaluation, cis_lightning.analysis; "
        "from cis_lightning import load_run; "
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('lightning', 'pytorch_lightning')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
