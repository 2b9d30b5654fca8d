"""The package's imports go one way: application -> engines -> persistence -> core -> kernels.

Read from the source with :mod:`ast` (nothing is imported), so the test also
catches an import hidden inside a function to dodge a cycle.
"""
import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "memoa_fast"

# Layer of every module, from the bottom up; a module may import its own layer or lower ones.
LAYERS = {
    "kernels": 0,
    "_validation": 1, "_backends": 1, "_state": 1, "_version": 1, "_exclusive": 1, "_memory": 1, "_copies": 1,
    "game": 2, "server": 2, "population": 2, "certificates": 2,
    "checkpoint": 3,
    "distributed": 4,
    "timeseries": 5,
    "__init__": 6, "__main__": 6,
}


def _modules():
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE).with_suffix("")
        yield ".".join(("memoa_fast",) + rel.parts), path


def _layer(module: str) -> int:
    parts = module.split(".")
    key = parts[1] if len(parts) > 1 else "__init__"
    if key not in LAYERS:
        pytest.fail(f"module {module} has no layer in tests/test_architecture.py: add it to LAYERS")
    return LAYERS[key]


def _imports(module: str, path: Path):
    """(imported module, line, inside a function?) for every import of a memoa_fast module."""
    tree = ast.parse(path.read_text())
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    functions = {id(n) for f in ast.walk(tree) if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))
                 for n in ast.walk(f)}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            names = [target] if node.module else [f"{target}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        else:
            continue
        for name in names:
            if name.startswith("memoa_fast"):
                yield name, node.lineno, id(node) in functions


def test_imports_go_one_way_and_never_hide_in_functions():
    problems = []
    for module, path in _modules():
        for target, line, in_function in _imports(module, path):
            if _layer(target) > _layer(module):
                problems.append(f"{module}:{line} imports {target} (a higher layer)")
            if in_function and not target.startswith("memoa_fast.kernels"):
                problems.append(f"{module}:{line} imports {target} inside a function")
    assert not problems, "\n".join(problems)


def test_no_private_kernel_name_outside_kernels():
    problems = []
    for module, path in _modules():
        for target, line, _ in _imports(module, path):
            parts = target.split(".")
            if len(parts) > 2 and parts[1] == "kernels" and any(p.startswith("_") for p in parts[2:]):
                problems.append(f"{module}:{line} imports {target}")
    assert not problems, "\n".join(problems)


def test_no_import_cycle_between_modules():
    graph = {}
    for module, path in _modules():
        graph[module] = {t for t, _, _ in _imports(module, path) if t != module}
    # Resolve "package.name" imports of names to the module that defines them.
    modules = set(graph)
    for module, targets in graph.items():
        graph[module] = {t if t in modules else t.rsplit(".", 1)[0] for t in targets} & modules
    state = {}

    def visit(node, stack):
        state[node] = "open"
        for nxt in graph[node]:
            if nxt.endswith("__init__") or nxt == "memoa_fast":
                continue
            if state.get(nxt) == "open":
                pytest.fail("import cycle: " + " -> ".join(stack + [node, nxt]))
            if nxt not in state:
                visit(nxt, stack + [node])
        state[node] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module, [])


def test_every_package_folder_is_a_regular_package():
    """A folder without __init__.py imports from a checkout (a namespace package) but is left out of wheels."""
    missing = [str(p.relative_to(ROOT)) for p in PACKAGE.rglob("*") if p.is_dir() and p.name != "__pycache__"
               and any(p.glob("*.py")) and not (p / "__init__.py").is_file()]
    assert not missing, f"package folders without __init__.py: {missing}"


def test_numpy_is_a_build_requirement_exactly_when_a_cython_kernel_uses_its_c_api():
    # The kernels use typed memoryviews, so the isolated build env installs no NumPy (a 16 MB wheel, 4-5 s of CI's
    # install). A `cimport numpy` added later needs NumPy's headers back in [build-system] requires (and setup.py's
    # np.get_include()); one removed should take them out.
    import re
    import tomllib

    requires = tomllib.loads((ROOT / "pyproject.toml").read_text())["build-system"]["requires"]
    numpy_required = any(re.match(r"numpy\b", req) for req in requires)
    c_api = [pyx.name for pyx in sorted((ROOT / "kernels").glob("*.pyx"))
             if re.search(r"^\s*(cimport\s+numpy|from\s+numpy\s+cimport)", pyx.read_text(), re.MULTILINE)]
    assert numpy_required == bool(c_api), (requires, c_api)
