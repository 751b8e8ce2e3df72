"""The shape of the codebase: imports point one way, the runtime never imports the conversion stage, files stay
readable. Deferred imports (inside functions) count like any other: a cycle hidden in a function is a cycle."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = {"vibevoice_mlx": ROOT / "vibevoice_mlx", "vibevoice_mlx.convert": ROOT / "convert"}
# Commands and integrations: they may use the conversion stage (the hub cache of `say`, `vv.convert`).
APPLICATIONS = ("vibevoice_mlx", "vibevoice_mlx.cli", "vibevoice_mlx.bench", "vibevoice_mlx.comfyui",
                "vibevoice_mlx.server", "vibevoice_mlx.batch", "vibevoice_mlx.say")


def _modules():
    out = {}
    for pkg, folder in PACKAGES.items():
        for path in folder.rglob("*.py"):
            rel = path.relative_to(folder).with_suffix("")
            parts = [p for p in rel.parts if p != "__init__"]
            name = ".".join([pkg, *parts])
            if pkg == "vibevoice_mlx" and parts[:1] == ["convert"]:
                continue
            out[name] = path
    return out


def _imports(name: str, path: Path):
    """Every vibevoice_mlx module `name` imports, anywhere in the file."""
    tree = ast.parse(path.read_text())
    is_pkg = path.name == "__init__.py"
    base = name.split(".") if is_pkg else name.split(".")[:-1]
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                prefix = base[: len(base) - node.level + 1]
                mod = ".".join(prefix + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            if mod.startswith("vibevoice_mlx"):
                found.add(mod)
                found.update(f"{mod}.{a.name}" for a in node.names)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("vibevoice_mlx"))
    return found


def _graph():
    mods = _modules()
    graph = {}
    for name, path in mods.items():
        deps = set()
        for imp in _imports(name, path):
            while imp and imp not in mods:
                imp = imp.rpartition(".")[0]
            if imp and imp != name:
                deps.add(imp)
        graph[name] = deps
    return graph


def test_the_runtime_never_imports_the_conversion_stage():
    offenders = {name: sorted(d for d in deps if d.startswith("vibevoice_mlx.convert"))
                 for name, deps in _graph().items()
                 if not name.startswith("vibevoice_mlx.convert") and not name.startswith(APPLICATIONS[1:])
                 and name != APPLICATIONS[0]}
    assert {k: v for k, v in offenders.items() if v} == {}


def test_no_import_cycles():
    graph = _graph()
    # a package's __init__ re-exporting its own modules (the lazy public API) is a facade, not a layer
    for name in graph:
        graph[name] = {d for d in graph[name] if not d.startswith(name + ".")}
    seen, stack, cycles = set(), [], []

    def visit(node):
        if node in stack:
            cycles.append(stack[stack.index(node):] + [node])
            return
        if node in seen:
            return
        seen.add(node)
        stack.append(node)
        for dep in sorted(graph.get(node, ())):
            visit(dep)
        stack.pop()

    for node in sorted(graph):
        visit(node)
    assert cycles == []


@pytest.mark.parametrize("path", sorted(p for folder in PACKAGES.values() for p in folder.rglob("*.py")),
                         ids=lambda p: str(p.relative_to(ROOT)))
def test_files_stay_readable(path):
    assert len(path.read_text().splitlines()) <= 600, f"{path} is past 600 lines: split it by responsibility"


def test_pyproject_ships_every_package_folder_under_an_spdx_license():
    import tomllib

    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert pyproject["project"]["license"] == "MIT"  # a table is deprecated; a string needs setuptools 77
    assert "setuptools>=77" in pyproject["build-system"]["requires"]
    tool = pyproject["tool"]["setuptools"]
    listed = set(tool["packages"])
    for pkg, folder in tool["package-dir"].items():
        # setuptools warns about (and may leave out) an importable folder under a package that is not listed
        for sub in (ROOT / folder).rglob("*"):
            if sub.is_dir() and sub.name.isidentifier() and sub.name != "__pycache__":
                name = ".".join([pkg, *sub.relative_to(ROOT / folder).parts])
                assert name in listed, f"{name} is not in [tool.setuptools] packages"
    assert tool["package-data"]["vibevoice_mlx.server.static"] == ["*"]
