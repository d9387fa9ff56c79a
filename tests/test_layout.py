"""The package's import graph, read from the source (AST, nothing imported): no import cycle between lemur_torch's
modules, counting imports inside functions too (a lazy import still makes the two modules depend on each other),
and no private name (a leading underscore) taken from another module."""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = "lemur_torch"


def module_name(path: Path, src: Path) -> str:
    parts = list(path.relative_to(src).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules(src: Path = SRC) -> dict[str, Path]:
    return {module_name(p, src): p for p in sorted((src / PACKAGE).rglob("*.py"))}


def absolute(node: ast.ImportFrom, name: str, path: Path) -> str:
    """The module an ImportFrom reads from, with relative imports resolved."""
    if not node.level:
        return node.module or ""
    base = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    base = base[: len(base) - node.level + 1]
    return ".".join(base + ([node.module] if node.module else []))


def owner(target: str, known: dict[str, Path]) -> str | None:
    """The lemur_torch module that defines `target` (a module, or a name inside one)."""
    while target:
        if target in known:
            return target
        target = target.rpartition(".")[0]
    return None


def imports(name: str, path: Path, known: dict[str, Path]):
    """(the lemur_torch module imported, the names taken from it) for every import in the module, at any depth."""
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if owner(alias.name, known):
                    yield owner(alias.name, known), []
        elif isinstance(node, ast.ImportFrom):
            base = absolute(node, name, path)
            for alias in node.names:
                sub = owner(f"{base}.{alias.name}", known)
                if sub and sub != owner(base, known):  # `from package import module`
                    yield sub, []
                elif owner(base, known):
                    yield owner(base, known), [alias.name]


def private_imports(known: dict[str, Path]) -> list[str]:
    """`from lemur_torch.x import _y` and `x._y` on an imported lemur_torch module, from another module."""
    found = []
    for name, path in known.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
        module_aliases = {}  # local name -> the lemur_torch module it is bound to
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.asname and owner(alias.name, known) == alias.name:
                        module_aliases[alias.asname] = alias.name
            elif isinstance(node, ast.ImportFrom):
                base = absolute(node, name, path)
                for alias in node.names:
                    full = f"{base}.{alias.name}"
                    if full in known:
                        module_aliases[alias.asname or alias.name] = full
                    elif owner(base, known) and owner(base, known) != name and alias.name.startswith("_"):
                        found.append(f"{name} imports {base}.{alias.name}")
        for node in ast.walk(tree):
            if (
                isinstance(node, ast.Attribute)
                and isinstance(node.value, ast.Name)
                and node.value.id in module_aliases
                and module_aliases[node.value.id] != name
                and node.attr.startswith("_")
                and not node.attr.startswith("__")
            ):
                found.append(f"{name} uses {module_aliases[node.value.id]}.{node.attr}")
    return sorted(set(found))


def graph(known: dict[str, Path]) -> dict[str, set[str]]:
    edges = {}
    for name, path in known.items():
        edges[name] = {dep for dep, _ in imports(name, path, known) if dep != name}
    return edges


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each sorted."""
    index, low, stack, on_stack, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in sorted(edges.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return sorted(out)


def test_no_import_cycle_between_modules():
    known = modules()
    assert len(known) > 50, sorted(known)  # the walk found the package
    assert cycles(graph(known)) == []


def test_no_private_name_crosses_a_module():
    assert private_imports(modules()) == []


def test_the_checks_find_a_cycle_and_a_private_import(tmp_path):
    pkg = tmp_path / PACKAGE
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from lemur_torch.sub import b\n_hidden = 1\n")
    (pkg / "sub" / "b.py").write_text("def f():\n    from ..c import g\n    return g\n")
    (pkg / "c.py").write_text("import lemur_torch.a as a\nfrom lemur_torch.a import _hidden\nx = a._hidden\n")
    known = modules(tmp_path)
    assert cycles(graph(known)) == [["lemur_torch.a", "lemur_torch.c", "lemur_torch.sub.b"]]
    assert private_imports(known) == [
        "lemur_torch.c imports lemur_torch.a._hidden",
        "lemur_torch.c uses lemur_torch.a._hidden",
    ]
