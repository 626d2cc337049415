"""The package's imports read top-down: no circles, and no module imports one from a layer above it.

Every ``edgeft/**/*.py`` is parsed (nothing is imported), and each ``import edgeft...`` or relative
import, at the top of a file or inside a function, becomes an arrow between two modules. A new
module must be given a layer below; a new arrow that points up fails with both modules named.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "edgeft"

# Bottom to top. A module may import from its own layer or any layer below. An entry names a
# module exactly or, ending in ".", every module under a package; the longest match wins.
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    (
        "foundations",
        (
            "edgeft",
            "edgeft.errors",
            "edgeft.files",
            "edgeft.loading",
            "edgeft.untrusted",
            "edgeft.progress",
            "edgeft.machine",
            "edgeft.config",
            "edgeft.stage",
            "edgeft.build_layout",
            "edgeft.precision_plan",
            "edgeft.proxy_fit",
            "edgeft.decode_model",
            "edgeft.divergence",
            "edgeft.formats",  # the registry: names the format packages, imports none of them
            "edgeft.bench",
            "edgeft.bench.stats",
            "edgeft.bench.device_state",
        ),
    ),
    (
        "inputs",
        (
            "edgeft.weights",
            "edgeft.shards",
            "edgeft.data",
            "edgeft.models",
            "edgeft.adapters",
            "edgeft.nf4",
            "edgeft.checkpoints",
            "edgeft.validation",
            "edgeft.calibration",
            "edgeft.training_report",
            "edgeft.bundle_zip",
            "edgeft.bench.llama_bench",
        ),
    ),
    ("plans", ("edgeft.resources", "edgeft.targets")),
    ("stages and formats", ("edgeft.train", "edgeft.merge", "edgeft.merge_stream", "edgeft.formats.")),
    ("runtimes", ("edgeft.runtimes", "edgeft.runtimes.")),
    ("measurement", ("edgeft.bench.", "edgeft.devices", "edgeft.calibrate")),
    ("reports and bundles", ("edgeft.report", "edgeft.preflight", "edgeft.package")),
    ("remote", ("edgeft.remote",)),
    ("orchestration", ("edgeft.pipeline",)),
    ("interface", ("edgeft.cli", "edgeft.__main__")),
]


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported(node: ast.Import | ast.ImportFrom, module: str, is_package: bool, known: set[str]) -> list[str]:
    """The edgeft modules an import statement names (``from pkg import mod`` names ``pkg.mod``)."""
    if isinstance(node, ast.Import):
        names = [a.name for a in node.names]
    else:
        if node.level:
            base = module.split(".")[: len(module.split(".")) - node.level + (1 if is_package else 0)]
            source = ".".join(base + ([node.module] if node.module else []))
        else:
            source = node.module or ""
        names = [f"{source}.{a.name}" if f"{source}.{a.name}" in known else source for a in node.names]
    found = []
    for name in names:
        while name not in known and "." in name:  # `import edgeft.x.y as z` names a module; an attribute does not
            name = name.rsplit(".", 1)[0]
        if name in known:
            found.append(name)
    return found


def import_graph(root: Path = PACKAGE) -> dict[str, set[str]]:
    files = {module_name(p, root): p for p in sorted(root.rglob("*.py"))}
    graph: dict[str, set[str]] = {m: set() for m in files}
    for module, path in files.items():
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                is_package = path.name == "__init__.py"
                graph[module].update(m for m in imported(node, module, is_package, set(files)) if m != module)
    return graph


def layer_of(module: str) -> int | None:
    best, layer = -1, None
    for i, (_, entries) in enumerate(LAYERS):
        for entry in entries:
            matches = module.startswith(entry) if entry.endswith(".") else module == entry
            if matches and len(entry) > best:
                best, layer = len(entry), i
    return layer


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One circle per strongly connected component of more than one module (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(_circle(graph, sorted(component)))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def _circle(graph: dict[str, set[str]], component: list[str]) -> list[str]:
    """A path a → … → a inside one component, for the message."""
    members, start = set(component), component[0]
    paths = {start: [start]}
    frontier = [start]
    while frontier:
        nxt = []
        for v in frontier:
            for w in sorted(graph[v] & members):
                if w == start:
                    return paths[v] + [start]
                if w not in paths:
                    paths[w] = paths[v] + [w]
                    nxt.append(w)
        frontier = nxt
    return component


def upward_imports(graph: dict[str, set[str]]) -> list[str]:
    problems = []
    for module in sorted(graph):
        here = layer_of(module)
        for target in sorted(graph[module]):
            there = layer_of(target)
            if here is not None and there is not None and there > here:
                problems.append(f"{module} ({LAYERS[here][0]}) imports {target} ({LAYERS[there][0]}), a layer above it")
    return problems


def test_every_module_has_a_layer():
    unplaced = sorted(m for m in import_graph() if layer_of(m) is None)
    assert not unplaced, f"give these modules a layer in tests/test_layering.py's LAYERS: {', '.join(unplaced)}"


def test_the_package_has_no_import_circles():
    found = cycles(import_graph())
    assert not found, "import circles:\n" + "\n".join(" -> ".join(c) for c in found)


def test_no_module_imports_from_a_layer_above_it():
    problems = upward_imports(import_graph())
    assert not problems, "\n".join(problems)


@pytest.fixture
def bad_package(tmp_path):
    """A tiny package with a circle (a <-> b, one of the imports inside a function) and an upward arrow."""
    root = tmp_path / "edgeft"
    (root / "bench").mkdir(parents=True)
    (root / "__init__.py").write_text("")
    (root / "errors.py").write_text("from .cli import main\n")
    (root / "cli.py").write_text("def main():\n    pass\n")
    (root / "bench" / "__init__.py").write_text("")
    (root / "bench" / "stats.py").write_text("def f():\n    from . import fidelity\n")
    (root / "bench" / "fidelity.py").write_text("from edgeft.bench.stats import f\n")
    return root


def test_the_checks_name_a_circle_and_an_upward_import(bad_package):
    graph = import_graph(bad_package)
    assert cycles(graph) == [["edgeft.bench.fidelity", "edgeft.bench.stats", "edgeft.bench.fidelity"]]
    assert upward_imports(graph) == [
        "edgeft.bench.stats (foundations) imports edgeft.bench.fidelity (measurement), a layer above it",
        "edgeft.errors (foundations) imports edgeft.cli (interface), a layer above it",
    ]
