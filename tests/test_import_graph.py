"""The package's imports run down the data flow (issue 13 item 3).

Every module under python/proalign is parsed with `ast` (no import runs), and every import inside
the package, at module level or inside a function, is resolved to the modules it names. Checked:

- nothing below the facade imports the facade (`from .. import X`, `from proalign import X`):
  the version lives in `_version.py`, everything else in its defining module;
- no import cycles between the package's parts (subpackages and top-level modules), save the
  ones listed in ALLOWED_CYCLES with their reason;
- the store is a leaf: it imports only the leaf modules in LEAVES;
- slides know no model: `slides` imports nothing from `encoders` (nor from `prototypes`), and
  `encoders` nothing from `prototypes` (prototypes are built with an encoder, not the reverse);
- the fused ops know only kernels: `ops` and `kernels` import nothing else from the package
  but the leaves (a kernel never depends on how a method, a pipeline or a store uses it);
- `import proalign` is cheap: it loads neither torch nor numpy nor any subpackage.
"""
from __future__ import annotations

import ast
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "python" / "proalign"
KERNELS = ROOT / "kernels"  # installed as proalign.kernels (setup.py package_dir)
FACADE = "proalign"
# Modules every part may import: they import nothing from the package themselves.
LEAVES = {"proalign._version", "proalign.errors", "proalign.report_file", "proalign._C"}
# Part-level cycles that are allowed, each with the reason. Empty: there are none.
ALLOWED_CYCLES: dict[frozenset[str], str] = {}


def _modules() -> dict[str, Path | None]:
    out: dict[str, Path | None] = {"proalign._C": None}  # the native module (C++), built or not
    for root, prefix in ((PACKAGE, ("proalign",)), (KERNELS, ("proalign", "kernels"))):
        for path in sorted(root.rglob("*.py")):
            parts = prefix + path.relative_to(root).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join(parts)] = path
    return out


MODULES = _modules()


def _is_package(name: str) -> bool:
    path = MODULES[name]
    return path is not None and path.name == "__init__.py"


def _targets(module: str, node: ast.AST) -> list[str]:
    """The package modules an import statement names (relative imports resolved)."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names if a.name == FACADE or a.name.startswith(FACADE + ".")]
    assert isinstance(node, ast.ImportFrom)
    if node.level:
        base = module.split(".") if _is_package(module) else module.split(".")[:-1]
        base = base[: len(base) - (node.level - 1)]
        source = ".".join(base + ([node.module] if node.module else []))
    else:
        source = node.module or ""
    if source != FACADE and not source.startswith(FACADE + "."):
        return []
    # `from pkg import sub` names the submodule when there is one, else the package itself.
    subs = [f"{source}.{a.name}" for a in node.names if f"{source}.{a.name}" in MODULES]
    names_left = [a.name for a in node.names if f"{source}.{a.name}" not in MODULES]
    return subs + ([source] if names_left or not subs else [])


def import_edges() -> list[tuple[str, str, int, bool]]:
    """(importer, imported, line, at module level) for every import inside the package."""
    edges = []
    for module, path in MODULES.items():
        if path is None:
            continue
        tree = ast.parse(path.read_text(), str(path))
        top = {id(n) for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))}
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                for target in _targets(module, node):
                    edges.append((module, target, node.lineno, id(node) in top))
    return edges


def part(module: str) -> str:
    """The part of the package a module belongs to: its subpackage or top-level module."""
    parts = module.split(".")
    if len(parts) > 1 and parts[1] == "kernels":
        return "ops"  # the Triton kernels are the ops' device code (kernels/<op>.py beside ops/<op>/)
    return "facade" if len(parts) == 1 else parts[1]


def _cycles(graph: dict[str, set[str]]) -> list[set[str]]:
    """Strongly connected components with more than one node (Tarjan)."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = set()
            while True:
                w = stack.pop()
                on.discard(w)
                comp.add(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(comp)

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def violations() -> list[str]:
    edges = import_edges()
    found = []
    for src, dst, line, _ in edges:
        where = f"{src} (line {line})"
        if dst == FACADE and src != FACADE:
            found.append(f"{where} imports the facade `proalign`")
        if part(src) == "store" and part(dst) != "store" and dst not in LEAVES:
            found.append(f"{where} imports {dst}: the store is a leaf")
        if part(src) == "slides" and part(dst) in ("encoders", "prototypes"):
            found.append(f"{where} imports {dst}: slides know no model")
        if part(src) == "encoders" and part(dst) == "prototypes":
            found.append(f"{where} imports {dst}: encoders come before prototypes")
        if part(src) == "ops" and part(dst) != "ops" and dst not in LEAVES:
            found.append(f"{where} imports {dst}: the ops know only kernels and leaves")
        if src in LEAVES:
            found.append(f"{where} imports {dst}: {src} is a leaf")
    graph: dict[str, set[str]] = defaultdict(set)
    why: dict[tuple[str, str], list[str]] = defaultdict(list)
    for src, dst, line, _ in edges:
        a, b = part(src), part(dst)
        if a != b and "facade" not in (a, b):
            graph[a].add(b)
            why[a, b].append(f"{src}:{line} -> {dst}")
    for comp in _cycles(graph):
        if frozenset(comp) in ALLOWED_CYCLES:
            continue
        links = [f"{w}" for a in sorted(comp) for b in sorted(graph[a] & comp) for w in why[a, b]]
        found.append(f"import cycle between {sorted(comp)}: " + "; ".join(links))
    return found


def test_imports_run_down_the_data_flow():
    found = violations()
    assert not found, "\n".join(found)


def test_the_graph_sees_relative_and_function_level_imports():
    edges = {(s, d): top for s, d, _, top in import_edges()}
    assert edges[("proalign.store", "proalign.store.lmdb_store")] is True  # from .lmdb_store import ...
    assert any(not top for top in edges.values())  # some imports are inside functions
    missing = sorted({d for _, d in edges} - set(MODULES))
    assert not missing, f"imports of modules the package does not have: {missing}"


def test_import_proalign_is_cheap():
    code = ("import sys, proalign; heavy = sorted(m for m in ('torch', 'numpy', 'lmdb', 'h5py', 'proalign.aggregate',"
            " 'proalign.slides', 'proalign.store', 'proalign.prototypes') if m in sys.modules); print(heavy)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]", out


def test_facade_keeps_real_signatures():
    import inspect

    import proalign
    from proalign.aggregate import aggregate
    from proalign.pipeline.embed_slides import embed_slide

    assert proalign.aggregate is aggregate
    assert inspect.signature(proalign.embed_slide) == inspect.signature(embed_slide)
    assert proalign.__version__ == __import__("proalign._version", fromlist=["x"]).__version__
    assert set(proalign.__all__) <= set(dir(proalign))
    for name in proalign.__all__:
        getattr(proalign, name)


if __name__ == "__main__":
    print("\n".join(violations()) or "no violations")

