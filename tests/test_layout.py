"""The house's structure, computed from the source with `ast` (imports inside functions included): every module and
every function is small, no module imports another in a circle, and no wing imports one above it in
docs/ARCHITECTURE.md's table."""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("pipeline", "augment", "submissions")
MAX_LINES = 400
MAX_MODULES_PER_FOLDER = 12
MAX_FUNCTION_LINES = 60  # def line to last line, docstring included
FUNCTION_FOLDERS = PACKAGES + ("benchmarks", "kaggle")
# Known to be over, at most this big: each is a room to split next (the list may only shrink).
OVER_LINES: dict[str, int] = {}
OVER_MODULES = {"pipeline/training": 13}

# The wings bottom first, as docs/ARCHITECTURE.md draws them: a module imports only from its own wing or one earlier.
WINGS = ("pipeline.core", "pipeline.data", "augment", "pipeline.model", "pipeline.config", "pipeline.training",
         "pipeline.inference", "submissions", "pipeline.cli", "pipeline.run", "pipeline.kaggle_driver")


def _modules() -> dict[str, Path]:
    out = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            out[".".join(parts)] = path
    return out


def _imports(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The project modules `name` imports anywhere in its file (a package's `__init__` counts as the package)."""
    found = set()
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        targets = []
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            # `from package import module` imports the module; `from module import name`, the module
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base for alias in node.names]
        for target in targets:
            while target and target not in modules:
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(name, path, modules) for name, path in modules.items()}


def _wing(module: str) -> int:
    for rank, wing in enumerate(WINGS):
        if module == wing or module.startswith(wing + "."):
            return rank
    return -1  # the bare packages (pipeline/__init__.py): below everything


def test_every_module_is_small():
    long = {name: n for name, path in _modules().items()
            if (n := len(path.read_text().splitlines())) > OVER_LINES.get(name, MAX_LINES)}
    assert not long, f"modules over {MAX_LINES} lines: {long}"


def _long_functions(path: Path) -> dict[str, int]:
    return {f"{path}:{node.lineno} {node.name}": n
            for node in ast.walk(ast.parse(path.read_text(), str(path)))
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
            and (n := node.end_lineno - node.lineno + 1) > MAX_FUNCTION_LINES}


def test_every_function_is_short():
    long = {}
    for folder in FUNCTION_FOLDERS:
        for path in sorted((ROOT / folder).rglob("*.py")):
            long.update(_long_functions(path))
    assert not long, f"functions over {MAX_FUNCTION_LINES} lines: {long}"


def test_no_folder_is_crowded():
    folders: dict[Path, int] = {}
    for path in _modules().values():
        if path.name == "__init__.py":
            continue
        folders[path.parent] = folders.get(path.parent, 0) + 1
    crowded = {name: n for f, n in folders.items()
               if n > OVER_MODULES.get(name := str(f.relative_to(ROOT)), MAX_MODULES_PER_FOLDER)}
    assert not crowded, crowded


def test_every_module_belongs_to_a_wing_of_the_architecture():
    unplaced = [name for name in _modules() if _wing(name) < 0 and name not in PACKAGES]
    assert not unplaced, f"modules in no wing of docs/ARCHITECTURE.md: {unplaced}"
    table = (ROOT / "docs" / "ARCHITECTURE.md").read_text()
    for wing in WINGS:
        path = wing.replace(".", "/")
        assert f"`{path}/`" in table or f"`{path}.py`" in table, f"{wing} is not in docs/ARCHITECTURE.md's table"


def test_no_import_runs_up_the_wings():
    upward = sorted(f"{a} -> {b}" for a, targets in _graph().items() for b in targets if _wing(b) > _wing(a))
    assert not upward, upward


def test_no_import_circles():
    graph = _graph()
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []
    circles = []

    def visit(node: str) -> None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                circles.append(path[path.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt)
        path.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node)
    assert not circles, circles


def test_the_checks_see_imports_inside_functions(tmp_path: Path):
    """The checks above cannot pass vacuously: an import inside a function body is found, relative imports too; a
    long function is found."""
    source = tmp_path / "pipeline" / "inference" / "x.py"
    source.parent.mkdir(parents=True)
    source.write_text("def f():\n    from pipeline.cli import stages\n    from ..training import train\n")
    modules = {"pipeline.cli.stages": Path(), "pipeline.training.train": Path(), "pipeline.inference.x": source}
    found = _imports("pipeline.inference.x", source, modules)
    assert found == {"pipeline.cli.stages", "pipeline.training.train"}
    assert _wing("pipeline.cli.stages") > _wing("pipeline.inference.x")
    assert {"pipeline.model.trm", "pipeline.training.train", "pipeline.run"} <= set(_graph())
    long = tmp_path / "long.py"
    long.write_text("def f():\n" + "    x = 1\n" * MAX_FUNCTION_LINES + "\n\ndef g():\n    pass\n")
    assert list(_long_functions(long).values()) == [MAX_FUNCTION_LINES + 1]  # f is one line over; g is not
