"""The core package `ctta` never imports hydra, streams or scripts (checked on the source, statically)."""
import ast
from pathlib import Path

import ctta

FORBIDDEN = {"hydra", "omegaconf", "streams", "scripts"}


def test_ctta_imports_no_hydra_streams_or_scripts():
    offenders = []
    for path in Path(ctta.__file__).parent.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module]
            offenders += [f"{path.name}: {n}" for n in names if n.split(".")[0] in FORBIDDEN]
    assert not offenders, offenders


def _ctta_imports() -> dict[str, set[str]]:
    """Module name -> the ctta modules it imports, anywhere in the file (an import deferred into a function to dodge
    a cycle is still a cycle)."""
    root = Path(ctta.__file__).parent
    graph: dict[str, set[str]] = {}
    for path in root.rglob("*.py"):
        rel = path.relative_to(root.parent).with_suffix("")
        name = ".".join(rel.parts[:-1] if rel.name == "__init__" else rel.parts)
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("ctta"):
                deps.add(node.module)
                deps.update(f"{node.module}.{a.name}" for a in node.names)
            elif isinstance(node, ast.Import):
                deps.update(a.name for a in node.names if a.name.startswith("ctta"))
        graph[name] = deps
    return {m: {d for d in deps if d in graph and d != m} for m, deps in graph.items()}


def test_ctta_has_no_import_cycle():
    graph = _ctta_imports()
    state: dict[str, int] = {}

    def visit(m: str, path: list[str]) -> None:
        state[m] = 1
        for d in sorted(graph[m]):
            if state.get(d) == 1 and not (m.startswith(d + ".") or d == "ctta"):  # a package importing its parts
                raise AssertionError("import cycle: " + " -> ".join(path + [m, d]))
            if d not in state:
                visit(d, path + [m])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [])


def test_no_strategy_calls_a_collective():
    offenders = []
    for path in (Path(ctta.__file__).parent / "strategies").rglob("*.py"):
        text = path.read_text()
        if "ctta import distributed" in text or "ctta.distributed" in text or "torch.distributed" in text:
            offenders.append(path.name)
    assert not offenders, f"strategies must use self.comm (installed by ctta.loop.parallel): {offenders}"
