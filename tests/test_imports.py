"""The halves' boundaries: pipeline/ never imports trainer/, and no module imports in a circle."""
import ast
import subprocess
import sys

from conftest import REPO


def imports(package) -> dict:
    """{module: the modules of this repository it imports}, read from the source, lazy imports included."""
    graph = {}
    for path in sorted((REPO / package).glob("*.py")):
        name = f"{package}.{path.stem}"
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                found.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module:
                found.add(node.module)
                found.update(f"{node.module}.{alias.name}" for alias in node.names)
        graph[name] = {m for m in found if m.split(".")[0] in ("pipeline", "trainer") and m != name}
    return graph


def test_pipeline_never_imports_the_trainer():
    assert {m: sorted(i) for m, i in imports("pipeline").items() if any(x.startswith("trainer") for x in i)} == {}
    code = ("import sys, pkgutil, importlib, pipeline\n"
            "for m in pkgutil.iter_modules(pipeline.__path__): importlib.import_module('pipeline.' + m.name)\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] == 'trainer'))")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.stdout.strip() == "[]", result.stderr[-2000:]


def test_no_module_imports_in_a_circle():
    graph = {**imports("pipeline"), **imports("trainer")}
    graph = {m: {i for i in targets if i in graph} for m, targets in graph.items()}

    def circle(module, path):
        if module in path:
            return path[path.index(module):] + [module]
        for target in sorted(graph[module]):
            found = circle(target, path + [module])
            if found:
                return found
        return None

    for module in graph:
        assert circle(module, []) is None, " -> ".join(circle(module, []))
