"""The house's import rules, read from the code (every import statement, those inside functions
and under TYPE_CHECKING included): no import circle in cluster/, deploy/ or llama/; imports run
deploy/ -> cluster/ -> llama/; inside llama/, each package imports only what its __init__.py
says it may (the engine above the model, the model above nothing)."""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
TOPS = ("cluster", "deploy", "llama")

# Module prefix -> the prefixes among this project's packages (and ray) it may import.
MAY_IMPORT = {
    "llama.model": ("llama.model",),
    "llama.tokenizers": ("llama.tokenizers",),
    "llama.checkpoints": ("llama.checkpoints", "llama.model.args", "llama.model.stages", "llama.tokenizers"),
    "llama.engine": ("llama.engine", "llama.model", "llama.tokenizers"),
    "llama.distributed": (),
    "llama": ("llama",),  # reference_api.py and the package's face: anything inside llama/
    "cluster": ("cluster", "llama", "ray"),
    "deploy": ("deploy", "cluster", "llama", "ray"),
}
NEVER = {"cluster": ("ray.serve",)}


def _modules() -> dict[str, Path]:
    mods = {}
    for top in TOPS:
        for path in (ROOT / top).rglob("*.py"):
            name = ".".join(path.relative_to(ROOT).with_suffix("").parts)
            mods[name.removesuffix(".__init__")] = path
    return mods


def _imports(path: Path) -> set[str]:
    """Every module name an import statement of `path` names (absolute; this project has no
    relative imports)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, f"{path}: a relative import"
            out |= {node.module} | {f"{node.module}.{a.name}" for a in node.names}
    return out


def _graph() -> dict[str, set[str]]:
    """Each module -> the project's modules it imports (a name imported from a module counts as
    that module)."""
    mods = _modules()
    graph = {}
    for name, path in mods.items():
        targets = set()
        for imported in _imports(path):
            while imported and imported not in mods:
                imported = imported.rpartition(".")[0]
            if imported and imported != name:
                targets.add(imported)
        graph[name] = targets
    return graph


def _circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def _rule(name: str) -> str:
    return max((p for p in MAY_IMPORT if name == p or name.startswith(p + ".")), key=len)


def test_no_import_circle():
    assert _circles(_graph()) == []


def test_the_circle_finder_finds_a_circle():
    assert _circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_each_package_imports_only_what_its_rule_allows():
    mods = _modules()
    wrong = []
    for name, path in sorted(mods.items()):
        allowed = MAY_IMPORT[_rule(name)]
        for imported in sorted(_imports(path)):
            ours = imported.split(".")[0] in (*TOPS, "ray")
            if ours and not any(imported == p or imported.startswith(p + ".") for p in allowed):
                wrong.append(f"{name} imports {imported} (allowed: {', '.join(allowed) or 'nothing of the project'})")
            if any(imported.startswith(p) for p in NEVER.get(name.split(".")[0], ())):
                wrong.append(f"{name} imports {imported}")
    assert wrong == []


def test_every_package_says_what_it_owns_and_may_import():
    for init in sorted((ROOT / "llama").glob("*/__init__.py")):
        doc = ast.get_docstring(ast.parse(init.read_text()))
        assert doc and "May import" in doc, init
