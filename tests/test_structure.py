"""Rules of the code's shape that would otherwise live only in comments. The import graph: no circle among
the project's modules (module-level imports), `workers/` never imports `serving/`, and the light modules
stay light (exception and message types import neither torch nor Ray, the configuration not the engine).
The ingress module's two rules (see its docstring)."""

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("serving", "workers")


def _module_imports() -> dict[str, set[str]]:
    """Project module -> project modules it imports at module level (imports inside functions are lazy)."""
    graph: dict[str, set[str]] = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).glob("*.py")):
            name = f"{package}.{path.stem}"
            found = set()
            for node in ast.parse(path.read_text()).body:
                if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] in PACKAGES:
                    target = node.module
                    if target in PACKAGES:  # `from serving import tracing`
                        found |= {f"{target}.{a.name}" for a in node.names}
                    else:
                        found.add(target)
                elif isinstance(node, ast.Import):
                    found |= {a.name for a in node.names if a.name.split(".")[0] in PACKAGES}
            graph[name] = found
    return graph


def test_no_import_circle() -> None:
    graph = _module_imports()
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(module: str, path: list[str]) -> None:
        state[module] = 1
        for nxt in sorted(graph.get(module, ())):
            if state.get(nxt) == 1:
                raise AssertionError("import circle: " + " -> ".join([*path[path.index(nxt) :], nxt]))
            if nxt not in state:
                visit(nxt, [*path, nxt])
        state[module] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])


def test_workers_never_import_serving() -> None:
    for path in sorted((ROOT / "workers").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = (
                [node.module or ""]
                if isinstance(node, ast.ImportFrom)
                else [a.name for a in node.names]
                if isinstance(node, ast.Import)
                else []
            )
            assert not any(n.split(".")[0] == "serving" for n in names), f"{path.name} imports serving"


def _loaded_after(imports: str, watch: tuple[str, ...]) -> list[str]:
    code = f"import sys\nimport {imports}\nprint([m for m in {watch!r} if m in sys.modules])\n"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    return ast.literal_eval(out.stdout.strip())


def test_light_modules_stay_light() -> None:
    heavy = ("torch", "ray", "serving.engine", "serving.scheduler", "serving.pipeline")
    assert _loaded_after("serving.exceptions, serving.messages, workers.modes", heavy) == []
    assert _loaded_after("serving.config", heavy[1:]) == []


def test_ingress_rules() -> None:
    tree = ast.parse((ROOT / "serving" / "ingress.py").read_text())
    future = [n for n in tree.body if isinstance(n, ast.ImportFrom) and n.module == "__future__"]
    assert not future, "serving/ingress.py must not use `from __future__ import annotations`"
    (ingress,) = [n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "Ingress"]
    below = [n for n in tree.body if n.lineno > ingress.lineno and not isinstance(n, ast.Import | ast.ImportFrom)]
    names = [getattr(n, "name", None) or ast.unparse(n)[:40] for n in below]
    assert not below, f"serving/ingress.py defines {names} below the Ingress class: move them above it"
