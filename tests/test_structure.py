"""The package's shape: imports point one way (cli -> steps -> models / io / arch -> kernels),
no import cycle, no function-local import of soteria, every module opens with a docstring and
stays under 400 lines unless its docstring says why."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# Lower rank = lower layer; a module may import only from its own room or a lower one.
LAYERS = {
    "soteria_kernels": 0,
    "soteria.version": 1,
    "soteria.defaults": 1,
    "soteria.langs": 1,
    "soteria.progress": 1,
    "soteria.io": 1,
    "soteria.arch": 1,
    "soteria.models": 2,
    "soteria.heads": 3,
    "soteria.harm": 3,
    "soteria.steer": 4,
    "soteria.evaluation": 5,
    "soteria.export": 6,
    "soteria.tune": 6,
    "soteria.cli": 7,
    "soteria.__main__": 8,
}
MAX_LINES = 400


def _modules() -> dict[str, Path]:
    out = {}
    for pkg in ("soteria", "soteria_kernels"):
        for f in sorted((ROOT / pkg).rglob("*.py")):
            parts = list(f.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join(parts)] = f
    return out


def _room(module: str) -> str:
    for room in sorted(LAYERS, key=len, reverse=True):
        if module == room or module.startswith(room + "."):
            return room
    raise AssertionError(f"{module} is in no room of LAYERS: add it")


def _imports(module: str, path: Path) -> list[tuple[str, int, bool]]:
    """``(imported module, line, at module level)`` for every soteria / soteria_kernels import."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    top = {id(n) for n in tree.body} | {id(n) for n in ast.walk(tree) if isinstance(n, ast.If)}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                name = ".".join(base + ([node.module] if node.module else []))
                names = [name] if node.module else [f"{name}.{a.name}" for a in node.names]
            else:
                names = [node.module or ""]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        else:
            continue
        for name in names:
            if name.split(".")[0] in ("soteria", "soteria_kernels"):
                found.append((name, node.lineno, id(node) in top or _under_type_checking(tree, node)))
    return found


def _under_type_checking(tree: ast.Module, node: ast.AST) -> bool:
    for n in tree.body:
        if isinstance(n, ast.If) and getattr(n.test, "id", "") == "TYPE_CHECKING":
            if any(node is c for c in ast.walk(n)):
                return True
    return False


MODULES = _modules()


def test_imports_point_down_and_stay_at_module_level():
    problems = []
    for module, path in MODULES.items():
        if module == "soteria":  # the lazy public names
            continue
        room = _room(module)
        for name, line, at_top in _imports(module, path):
            target = name if name in MODULES else name.rpartition(".")[0]
            if target not in MODULES:
                problems.append(f"{module}:{line} imports {name}, which does not exist")
                continue
            if target == "soteria":
                problems.append(f"{module}:{line} imports the lazy top package; import the module itself")
                continue
            other = _room(target)
            if other != room and LAYERS[other] >= LAYERS[room]:
                problems.append(f"{module}:{line} ({room}) imports {target} ({other}): imports must point down")
            if not at_top:
                problems.append(f"{module}:{line} imports {name} inside a function")
    assert not problems, "\n".join(problems)


def test_no_import_cycle():
    graph = {}
    for module, path in MODULES.items():
        deps = set()
        for name, _, _ in _imports(module, path):
            target = name if name in MODULES else name.rpartition(".")[0]
            if target in MODULES and target != module and not module.startswith(target + "."):
                deps.add(target)
        graph[module] = deps
    state: dict[str, int] = {}

    def visit(m: str, stack: list[str]) -> None:
        state[m] = 1
        for d in sorted(graph[m]):
            if state.get(d) == 1:
                cycle = stack[stack.index(d) :] + [d] if d in stack else [m, d]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if d not in state:
                visit(d, [*stack, d])
        state[m] = 2

    for m in sorted(graph):
        if m not in state and m != "soteria":
            visit(m, [m])


@pytest.mark.parametrize("module", sorted(MODULES))
def test_module_docstring_and_size(module):
    path = MODULES[module]
    text = path.read_text(encoding="utf-8")
    doc = ast.get_docstring(ast.parse(text))
    assert doc, f"{path.relative_to(ROOT)} needs a module docstring saying what it owns"
    n = len(text.splitlines())
    assert n <= MAX_LINES or "over 400 lines" in doc.lower(), (
        f"{path.relative_to(ROOT)} has {n} lines; split it or say at its top why it is one module"
    )
