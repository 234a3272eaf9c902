"""The module graph: no import circle in the agent (issue 14), imports made inside
functions included (a lazy import hides a circle, it does not remove it), no module
too long to read in one sitting, and the layering of the top-level packages
(ARCHITECTURE.md's "may import" column, docs/dev/layering.md) for every package."""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
AGENT = REPO / "agent"
#: Which of the project's top-level packages each one may import. `planetlab` is the
#: one neutral package (version, log format): everyone may import it, it imports
#: nothing of the project.
PROJECT = ("planetlab", "plc", "agent", "kernel", "sensors")
MAY_IMPORT: dict[str, set[str]] = {
    "planetlab": set(),
    "kernel": {"planetlab"},
    "plc": {"planetlab"},
    "sensors": {"planetlab", "kernel"},
    "agent": {"planetlab", "kernel", "sensors"},
}
MAX_LINES = 500
TOO_LONG_FOR_NOW: set[str] = set()  # every module fits since issue 14 stage 2


def _module_of(path: Path) -> str:
    rel = path.relative_to(AGENT.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_of(p): p for p in sorted(AGENT.rglob("*.py"))}


def _imports(mod: str, path: Path, known: set[str]) -> set[str]:
    """Every agent module `mod` imports, wherever in the file the import is."""
    package = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            names = [base] + [f"{base}.{alias.name}" for alias in node.names]
        else:
            continue
        for name in names:
            # `import agent.a.b` loads agent, agent.a and agent.a.b
            parts = name.split(".")
            for i in range(1, len(parts) + 1):
                prefix = ".".join(parts[:i])
                if prefix in known and prefix != mod:
                    found.add(prefix)
    return found


def import_graph() -> dict[str, set[str]]:
    mods = _modules()
    known = set(mods)
    return {mod: _imports(mod, path, known) for mod, path in mods.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle, as the list of modules around it, or None."""
    WHITE, GREY, BLACK = 0, 1, 2
    colour = dict.fromkeys(graph, WHITE)
    stack: list[str] = []

    def visit(mod: str) -> list[str] | None:
        colour[mod] = GREY
        stack.append(mod)
        for dep in sorted(graph[mod]):
            # A package's __init__ is loaded before its submodules: importing a
            # submodule from its own package's __init__ is not a circle.
            if mod.startswith(dep + "."):
                continue
            if colour[dep] == GREY:
                return stack[stack.index(dep):] + [dep]
            if colour[dep] == WHITE and (cycle := visit(dep)) is not None:
                return cycle
        stack.pop()
        colour[mod] = BLACK
        return None

    for mod in sorted(graph):
        if colour[mod] == WHITE and (cycle := visit(mod)) is not None:
            return cycle
    return None


def test_the_cycle_finder_sees_a_circle() -> None:
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_lazy_imports_are_seen(tmp_path: Path) -> None:
    src = tmp_path / "m.py"
    src.write_text("def f():\n    from agent.x import y\n    import agent.z\n")
    assert _imports("agent.m", src, {"agent", "agent.x", "agent.x.y", "agent.z"}) == {
        "agent", "agent.x", "agent.x.y", "agent.z"}


def test_no_import_circle_in_agent() -> None:
    graph = import_graph()
    assert "agent.main" in graph and "agent.guard" in graph["agent.main"]
    cycle = find_cycle(graph)
    assert cycle is None, "import circle: " + " -> ".join(cycle or [])


def test_no_module_over_500_lines() -> None:
    long = {}
    for path in AGENT.rglob("*.py"):
        rel = str(path.relative_to(AGENT.parent))
        lines = len(path.read_text().splitlines())
        if lines > MAX_LINES and rel not in TOO_LONG_FOR_NOW:
            long[rel] = lines
    assert not long, f"modules over {MAX_LINES} lines: {long}"


def project_imports(path: Path) -> set[tuple[int, str]]:
    """(line, top-level project package) of every import in `path`, lazy ones
    included; relative imports stay inside their own package and are skipped."""
    found: set[tuple[int, str]] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
            names = [node.module]
        else:
            continue
        for name in names:
            top = name.split(".")[0]
            if top in PROJECT:
                found.add((node.lineno, top))
    return found


def layering_violations(root: Path) -> list[str]:
    bad = []
    for package, allowed in MAY_IMPORT.items():
        for path in sorted((root / package).rglob("*.py")):
            for line, top in sorted(project_imports(path)):
                if top != package and top not in allowed:
                    bad.append(f"{path.relative_to(root)}:{line} imports {top}")
    return sorted(bad)


def test_layering_checker_sees_a_lazy_forbidden_import(tmp_path: Path) -> None:
    for package in MAY_IMPORT:
        (tmp_path / package).mkdir()
    (tmp_path / "agent" / "x.py").write_text(
        "import kernel.cgroups\nfrom planetlab.version import version\n"
        "def f():\n    from plc.version import version\n")
    (tmp_path / "kernel" / "y.py").write_text("import sensors\nfrom . import z\n")
    assert layering_violations(tmp_path) == ["agent/x.py:4 imports plc",
                                            "kernel/y.py:1 imports sensors"]


def test_every_package_imports_only_what_the_architecture_allows() -> None:
    assert set(MAY_IMPORT) == {p.name for p in REPO.iterdir()
                               if (p / "__init__.py").exists() and p.name in PROJECT}
    bad = layering_violations(REPO)
    assert not bad, "imports across the layering (docs/dev/layering.md):\n" + "\n".join(bad)
