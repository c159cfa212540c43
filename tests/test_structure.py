"""Rules of the code's shape that would otherwise live only in comments. The import graph: no circle among
the project's modules (module-level imports), `workers/` never imports `serving/`, serving's wings import
one way (below), and the light modules stay light (exception and message types import neither torch nor
Ray, the configuration not the engine). The ingress module's two rules (see its docstring)."""

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("serving", "workers")


# serving's wings, lowest first: a module may import its own wing and the wings listed before it. `api` may
# ask `deploy` (the ingress asks whether any pipeline's workers answer); `deploy` never imports `api`, and
# `quality` neither of them. `top` is serving/app.py and serving/cli.py.
WINGS = ("telemetry", "engine", "config", "quality", "deploy", "api", "top")
ALLOWED = {
    "telemetry": {"telemetry"},
    "engine": {"engine", "telemetry"},
    "config": {"config", "engine"},
    "quality": {"quality", "config", "engine", "telemetry"},
    "deploy": {"deploy", "config", "engine", "telemetry"},
    "api": {"api", "deploy", "config", "engine", "telemetry"},
    "top": set(WINGS),
}


def _modules() -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def _imports(nodes, modules: dict[str, Path]) -> set[str]:
    """The project modules these import statements name (`from serving.x import m`: module m where it is one)."""
    found = set()
    for node in nodes:
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] in PACKAGES:
            found |= {f"{node.module}.{a.name}" for a in node.names if f"{node.module}.{a.name}" in modules}
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.split(".")[0] in PACKAGES}
    return found


def _module_imports(lazy: bool = False) -> dict[str, set[str]]:
    """Project module -> project modules it imports at module level (with `lazy`, inside functions too)."""
    modules = _modules()
    graph = {}
    for name, path in modules.items():
        tree = ast.parse(path.read_text())
        graph[name] = _imports(ast.walk(tree) if lazy else tree.body, modules) - {name}
    return graph


def wing(module: str) -> str | None:
    """The wing of a serving module (None for workers and the serving package itself)."""
    parts = module.split(".")
    if parts[0] != "serving" or len(parts) == 1:
        return None
    if parts[1] in WINGS:
        return parts[1]
    return {"app": "top", "cli": "top", "config": "config"}[parts[1]]


def wing_arrows() -> dict[tuple[str, str], int]:
    """(wing, wing it imports) -> how many module imports make that arrow (lazy imports included)."""
    arrows: dict[tuple[str, str], int] = {}
    for module, targets in _module_imports(lazy=True).items():
        for target in targets:
            a, b = wing(module), wing(target)
            if a and b and a != b:
                arrows[a, b] = arrows.get((a, b), 0) + 1
    return arrows


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


def test_every_serving_module_is_in_a_wing() -> None:
    for module in _modules():
        if module.startswith("serving."):
            assert wing(module), module


def test_wings_import_one_way() -> None:
    upward = {arrow: n for arrow, n in wing_arrows().items() if arrow[1] not in ALLOWED[arrow[0]]}
    assert not upward, f"imports against the wings' order {WINGS}: {upward}"


def test_workers_never_import_serving() -> None:
    for path in sorted((ROOT / "workers").rglob("*.py")):
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
    heavy = ("torch", "ray", "serving.engine.engine", "serving.engine.scheduler", "serving.engine.pipeline")
    light = "serving.engine.exceptions, serving.engine.messages, serving.engine.params, workers.modes"
    assert _loaded_after(light, heavy) == []
    assert _loaded_after("serving.config", heavy[1:]) == []


def test_ingress_rules() -> None:
    tree = ast.parse((ROOT / "serving" / "api" / "ingress.py").read_text())
    future = [n for n in tree.body if isinstance(n, ast.ImportFrom) and n.module == "__future__"]
    assert not future, "serving/api/ingress.py must not use `from __future__ import annotations`"
    (ingress,) = [n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "Ingress"]
    below = [n for n in tree.body if n.lineno > ingress.lineno and not isinstance(n, ast.Import | ast.ImportFrom)]
    names = [getattr(n, "name", None) or ast.unparse(n)[:40] for n in below]
    assert not below, f"serving/api/ingress.py defines {names} below the Ingress class: move them above it"
