"""The layering contract of docs/architecture.md, checked on the source with ast.

Every import statement counts, lazy ones (inside functions) included; imports under `if TYPE_CHECKING:` may
point anywhere. `python -m tests.layering` prints the report (edges between packages, cycles, forbidden edges,
the largest functions); tests/test_layering.py fails on any forbidden edge or file-level cycle.
"""

from __future__ import annotations

import ast
import sys
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("proto", "kernels", "contracts", "server", "trainer", "benchmarks", "livetower")

# Which of our packages each floor may import (besides itself). Read top-down: a floor imports only floors
# below it; server and trainer are siblings that never import each other; nothing imports the CLI.
MAY_IMPORT: dict[str, tuple[str, ...]] = {
    "proto": (),
    "kernels": (),
    "contracts": ("proto",),
    "server": ("contracts", "kernels", "proto"),
    "trainer": ("contracts", "kernels", "proto"),
    "benchmarks": ("server", "trainer", "contracts", "kernels", "proto"),
    "livetower": ("benchmarks", "server", "trainer", "contracts", "kernels", "proto"),
}
# Finer rules inside a floor: modules under `importer` (but not under `except_importer`) must not import modules
# under `target` (but not under `except_target`). A prefix matches a module and its children; "" = no exception.
INNER_RULES: tuple[tuple[str, str, str, str, str], ...] = (
    # importer, except_importer, target, except_target, why
    ("server.engine", "", "server", "server.engine", "the engine runtime knows nothing of the gRPC layer around it"),
    ("contracts.engine_format", "", "contracts.client", "", "the engine format does not depend on the API client"),
    ("trainer", "trainer.studies", "trainer.studies", "", "the sidecar does not depend on the offline studies"),
)
# Third-party modules a floor must not import: the engine side and the trainer never touch gRPC.
FORBIDDEN_THIRD_PARTY: dict[str, tuple[str, ...]] = {
    "server.engine": ("grpc",),
    "contracts.engine_format": ("grpc",),
    "trainer": ("grpc",),
    "kernels": ("grpc",),
}


@dataclass(frozen=True, slots=True)
class Import:
    importer: str       # module that imports
    target: str         # module imported (ours: resolved to a module file; third-party: its top-level name)
    line: int
    lazy: bool          # inside a function body
    ours: bool


def _under(module: str, prefix: str) -> bool:
    return module == prefix or module.startswith(prefix + ".")


def module_files(root: Path = ROOT) -> dict[str, Path]:
    out = {}
    for pkg in PACKAGES:
        for f in sorted((root / pkg).rglob("*.py")):
            parts = f.relative_to(root).with_suffix("").parts
            out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = f
    return out


def _is_type_checking(test: ast.expr) -> bool:
    return "TYPE_CHECKING" in ast.unparse(test)


def imports_of(module: str, path: Path, modules: dict[str, Path]) -> list[Import]:
    """Every import in the file except those under `if TYPE_CHECKING:`, resolved to our modules where ours."""
    is_pkg = path.name == "__init__.py"

    def resolve(name: str) -> str | None:
        parts = name.split(".")
        for i in range(len(parts), 0, -1):
            if ".".join(parts[:i]) in modules:
                return ".".join(parts[:i])
        return None

    found: list[Import] = []

    def add(name: str, line: int, lazy: bool) -> None:
        top = name.split(".")[0]
        if top in PACKAGES:
            target = resolve(name)
            if target and target != module:
                found.append(Import(module, target, line, lazy, True))
        else:
            found.append(Import(module, top, line, lazy, False))

    def walk(node: ast.AST, lazy: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _is_type_checking(child.test):
                for sub in child.orelse:
                    walk_one(sub, lazy)
                continue
            walk_one(child, lazy)

    def walk_one(node: ast.AST, lazy: bool) -> None:
        if isinstance(node, ast.Import):
            for alias in node.names:
                add(alias.name, node.lineno, lazy)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".") if is_pkg else module.split(".")[:-1]
                base = base[:len(base) - (node.level - 1)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            targets = dict.fromkeys(  # `from pkg import mod` imports the module pkg.mod; one edge per module
                f"{mod}.{a.name}" if resolve(f"{mod}.{a.name}") == f"{mod}.{a.name}" else mod for a in node.names)
            for target in targets:
                add(target, node.lineno, lazy)
        walk(node, lazy or isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)))

    walk(ast.parse(path.read_text(), str(path)), False)
    return found


def all_imports(root: Path = ROOT) -> list[Import]:
    modules = module_files(root)
    return [imp for m, f in modules.items() for imp in imports_of(m, f, modules)]


def forbidden(imports: list[Import]) -> list[str]:
    """One line per import that runs against the contract."""
    bad = []
    for imp in imports:
        src = imp.importer.split(".")[0]
        where = f"{imp.importer}:{imp.line} imports {imp.target}{' (lazy)' if imp.lazy else ''}"
        if imp.ours:
            dst = imp.target.split(".")[0]
            if dst != src and dst not in MAY_IMPORT[src]:
                bad.append(f"{where}: {src} may import only {', '.join(MAY_IMPORT[src]) or 'nothing of ours'}")
            for importer, except_importer, target, except_target, why in INNER_RULES:
                if (_under(imp.importer, importer) and not (except_importer and _under(imp.importer, except_importer))
                        and _under(imp.target, target) and not (except_target and _under(imp.target, except_target))):
                    bad.append(f"{where}: {why}")
        else:
            for importer, names in FORBIDDEN_THIRD_PARTY.items():
                if _under(imp.importer, importer) and imp.target in names:
                    bad.append(f"{where}: {importer} must not import {imp.target}")
    return bad


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one node (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []
    nodes = set(edges) | {t for ts in edges.values() for t in ts}
    for start in sorted(nodes):
        if start in index:
            continue
        work = [(start, iter(sorted(edges.get(start, ()))))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            v, it = work[-1]
            w = next(it, None)
            if w is not None:
                if w not in index:
                    index[w] = low[w] = len(index)
                    stack.append(w)
                    on_stack.add(w)
                    work.append((w, iter(sorted(edges.get(w, ())))))
                elif w in on_stack:
                    low[v] = min(low[v], index[w])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[v])
            if low[v] == index[v]:
                comp = []
                while True:
                    w = stack.pop()
                    on_stack.discard(w)
                    comp.append(w)
                    if w == v:
                        break
                if len(comp) > 1:
                    out.append(sorted(comp))
    return out


def graphs(imports: list[Import]) -> tuple[dict[str, set[str]], dict[str, set[str]]]:
    """(file-level edges, top-level package edges) over our modules."""
    files: dict[str, set[str]] = defaultdict(set)
    packages: dict[str, set[str]] = defaultdict(set)
    for imp in imports:
        if imp.ours:
            files[imp.importer].add(imp.target)
            a, b = imp.importer.split(".")[0], imp.target.split(".")[0]
            if a != b:
                packages[a].add(b)
    return files, packages


def largest_functions(root: Path = ROOT, n: int = 10) -> list[tuple[int, str]]:
    sizes = []
    for module, path in module_files(root).items():
        if module.startswith("proto."):
            continue  # generated stubs
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                sizes.append((node.end_lineno - node.lineno + 1, f"{module}.{node.name}"))
    return sorted(sizes, reverse=True)[:n]


def main(argv: list[str] | None = None) -> int:
    root = Path(argv[0]).resolve() if argv else ROOT
    imports = all_imports(root)
    files, packages = graphs(imports)
    print("package edges:")
    for a in sorted(packages):
        print(f"  {a} -> {', '.join(sorted(packages[a]))}")
    print(f"package-level cycles: {cycles(packages) or 'none'}")
    file_cycles = cycles(files)
    print(f"file-level cycles: {len(file_cycles)}" + "".join(f"\n  {' <-> '.join(c)}" for c in file_cycles))
    bad = forbidden(imports)
    print(f"forbidden imports: {len(bad)}" + "".join(f"\n  {b}" for b in bad))
    print("largest functions (lines):")
    for size, name in largest_functions(root):
        print(f"  {size:4d}  {name}")
    return 1 if bad or file_cycles else 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
