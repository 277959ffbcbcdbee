"""The shipped packages' import graph: no cycles, and nothing from e2e/ or the tests.

Every import counts, lazy ones inside functions included (a lazy import hides a cycle, it does not
remove it); only imports under `if TYPE_CHECKING:` are left out, since they never run."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = {
    "replica_agent": ROOT / "replica_agent",
    "collm_operator": ROOT / "operator/collm_operator",
    "collm_control": ROOT / "control/collm_control",
    "collm_rpc": ROOT / "rpc/collm_rpc",
}


def module_name(package: str, folder: Path, path: Path) -> str:
    parts = [package, *path.relative_to(folder).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(name: str, path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    skip = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test) for n in ast.walk(node)}
    found = set()
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            found.add(base)
            found |= {f"{base}.{a.name}" for a in node.names}
    return found


def graph() -> dict[str, set[str]]:
    modules = {module_name(p, folder, path): path for p, folder in PACKAGES.items() for path in folder.rglob("*.py")}
    return {name: {m for m in imports_of(name, path) if m in modules and m != name} for name, path in modules.items()}


def test_shipped_packages_import_nothing_from_e2e_or_tests():
    for package, folder in PACKAGES.items():
        for path in folder.rglob("*.py"):
            bad = {m for m in imports_of(module_name(package, folder, path), path) if m.split(".")[0] in ("e2e", "tests")}
            assert not bad, f"{path.relative_to(ROOT)} imports {sorted(bad)}"


def test_the_import_graph_has_no_cycles():
    edges = graph()
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(edges[node]):
            if state.get(nxt) == 1:
                raise AssertionError("import cycle: " + " -> ".join([*path[path.index(nxt) :], nxt]))
            if nxt not in state:
                visit(nxt)
        path.pop()
        state[node] = 2

    for node in sorted(edges):
        if node not in state:
            visit(node)


def test_the_control_core_and_the_operator_import_one_way():
    edges = graph()
    for module, targets in edges.items():
        if module.startswith("collm_control"):
            assert not {t for t in targets if not t.startswith("collm_control")}, f"{module} imports {sorted(targets)}"
        if module.startswith("collm_rpc"):  # the wire contract rests on the control core only
            assert not {t for t in targets if not t.startswith(("collm_rpc", "collm_control"))}, f"{module} imports {sorted(targets)}"
        if module.startswith("collm_operator"):  # the operator: the control core and the wire contract, no agent code
            assert not {t for t in targets if t.startswith("replica_agent")}, f"{module} imports {sorted(targets)}"
        if module.startswith("replica_agent.engine"):
            upward = ("replica_agent.serving", "replica_agent.federated", "replica_agent.agent", "replica_agent.local")
            assert not {t for t in targets if t.startswith(upward)}, module
