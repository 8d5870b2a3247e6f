"""The layout: the method at the top level, the harness in folders that import it, never the other
way, and no import circle anywhere (read from the source with ast, nothing is imported)."""
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FOLDERS = ("harness", "federation", "experiments", "bench")  # the roles outside the method
CLI = "mor"  # the command line: the one top-level module that drives the harness


def _modules() -> dict[str, Path]:
    """dotted name -> file, for the top level and the role folders (tests are not modules)."""
    mods = {p.stem: p for p in ROOT.glob("*.py")}
    for folder in FOLDERS:
        mods.update({f"{folder}.{p.stem}": p for p in (ROOT / folder).glob("*.py")})
    return mods


def _imports(path: Path, mods: dict[str, Path]) -> set[str]:
    """The repo modules `path` imports, at any depth of its code (function-level imports count)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        else:
            continue
        out |= {n for n in names if n in mods}
    return out


def find_circle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle of `graph` (module -> modules it imports) as a path, or None: a back
    edge of a depth-first search."""
    state, path = {}, []

    def visit(m):
        state[m] = "open"
        path.append(m)
        for d in sorted(graph[m]):
            if state.get(d) == "open":
                return path[path.index(d):] + [d]
            if d not in state and (found := visit(d)):
                return found
        path.pop()
        state[m] = "done"
        return None

    for m in sorted(graph):
        if m not in state and (found := visit(m)):
            return found
    return None


def test_the_method_imports_no_harness_and_nothing_imports_in_a_circle():
    mods = _modules()
    graph = {m: _imports(p, mods) - {m} for m, p in mods.items()}
    method = [m for m in graph if "." not in m and m != CLI]
    leaks = {m: sorted(d for d in graph[m] if "." in d) for m in method}
    assert not {m: d for m, d in leaks.items() if d}, f"method modules importing the harness: {leaks}"
    assert not any(CLI in graph[m] for m in method), "a method module imports the command line"

    assert find_circle(graph) is None, "import circle: " + " -> ".join(find_circle(graph))


def test_the_circle_check_can_fail(tmp_path):
    """The same walk on a made-up pair that imports each other finds the circle."""
    (tmp_path / "a.py").write_text("import b\n")
    (tmp_path / "b.py").write_text("def f():\n    from a import x\n")
    (tmp_path / "c.py").write_text("import a\n")
    mods = {m: tmp_path / f"{m}.py" for m in "abc"}
    graph = {m: _imports(p, mods) for m, p in mods.items()}
    assert graph == {"a": {"b"}, "b": {"a"}, "c": {"a"}}
    assert find_circle(graph) == ["a", "b", "a"]
    assert find_circle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None


def test_top_level_is_the_method_and_modules_stay_readable():
    top = sorted(p.stem for p in ROOT.glob("*.py"))
    assert {"mor", "reward", "router", "federated", "grpo", "nts"} <= set(top)
    assert len(top) <= 12, f"{len(top)} top-level modules: {top}"
    long = {str(p.relative_to(ROOT)): n for p in _modules().values()
            if (n := len(p.read_text(encoding="utf-8").splitlines())) > 650}
    assert not long, f"modules over 650 lines: {long}"
    # no top-level module shadows a common package when the repo root is on sys.path
    assert not set(top) & {"evaluate", "datasets", "trl", "peft", "accelerate", "progress", "utils", "stats"}
