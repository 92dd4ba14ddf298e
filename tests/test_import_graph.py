"""No import circles inside a package, nor among the benchmark scripts.

The graph is built from the source with ``ast``, lazy imports inside functions included:
a circle held apart only by a function-level import still couples the two modules both ways
(``checkpoint_io._loop`` and ``_registry`` used to be such a pair, as were
``flyte_checkpoint._cli`` and ``_demo``, and ``checkpoint_bench.py`` and ``transfer_bench.py``;
``checkpoint_format._writer`` read the version from the ``__init__`` that imports it).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = {
    "checkpoint_format": ROOT / "packages" / "checkpoint-format" / "src",
    "checkpoint_io": ROOT / "packages" / "checkpoint-io" / "src",
    "flyte_checkpoint": ROOT / "packages" / "flyte-checkpoint" / "src",
    "checkpoint_testing": ROOT / "packages" / "checkpoint-testing" / "src",
}

# Circles known and left for later, each with who removes it: the test fails when one of
# them disappears too, so that its entry goes with it.
KNOWN: set[tuple[str, ...]] = set()


def _modules(src: Path, top: str) -> dict[str, tuple[Path, bool]]:
    modules = {}
    for path in sorted((src / top).rglob("*.py")):
        parts = list(path.relative_to(src).with_suffix("").parts)
        is_package = parts[-1] == "__init__"
        if is_package:
            parts.pop()
        modules[".".join(parts)] = (path, is_package)
    return modules


def import_graph(modules: dict[str, tuple[Path, bool]]) -> dict[str, set[str]]:
    """Module -> the modules of the same graph it imports, anywhere in its body."""
    graph: dict[str, set[str]] = {}
    for name, (path, is_package) in modules.items():
        package = name.split(".") if is_package else name.split(".")[:-1]
        targets = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
            if isinstance(node, ast.Import):
                targets.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package[: len(package) - node.level + 1]
                    source = ".".join([*base, *([node.module] if node.module else [])])
                else:
                    source = node.module or ""
                for alias in node.names:
                    submodule = f"{source}.{alias.name}"
                    targets.add(submodule if submodule in modules else source)
        graph[name] = {t for t in targets if t in modules and t != name}
    return graph


def circles(graph: dict[str, set[str]]) -> set[tuple[str, ...]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: set[tuple[str, ...]] = set()

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for target in sorted(graph[node]):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.add(tuple(sorted(component)))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_the_check_sees_a_circle_held_apart_by_a_lazy_import(tmp_path):
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from . import b\n")
    (pkg / "b.py").write_text("def f():\n    from .a import x\n")
    (pkg / "c.py").write_text("from pkg.a import y\n")
    assert circles(import_graph(_modules(tmp_path, "pkg"))) == {("pkg.a", "pkg.b")}


@pytest.mark.parametrize("top", sorted(PACKAGES))
def test_no_import_circles_inside_a_package(top):
    found = circles(import_graph(_modules(PACKAGES[top], top)))
    known = {c for c in KNOWN if c[0].split(".")[0] == top}
    assert found - known == set(), f"import circles in {top}: {sorted(found - known)}"
    assert known - found == set(), f"circles gone from {top}: drop them from KNOWN"


def test_no_import_circles_among_the_benchmarks():
    scripts = {p.stem: (p, False) for p in sorted((ROOT / "benchmarks").glob("*.py"))}
    assert {"bench_support", "checkpoint_bench", "transfer_bench"} <= set(scripts)
    found = circles(import_graph(scripts))
    assert found == set(), f"import circles among benchmarks/*.py: {sorted(found)}"


def _reachable(graph: dict[str, set[str]], start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for target in graph[todo.pop()] - seen:
            seen.add(target)
            todo.append(target)
    return seen


# Lower layers that must not reach the layers above them, even through a lazy import:
# module -> the modules it must never reach.
LAYERS = {
    "checkpoint_format": {
        # The spec's values and the version are leaves: every module may import them.
        "checkpoint_format._spec": {"*"},
        "checkpoint_format._version": {"*"},
    },
    "checkpoint_io": {
        # Backends (and the local file steps they share with downloads) sit below the
        # streams, File and shared uploads that drive them.
        f"checkpoint_io.{name}": {"checkpoint_io", "checkpoint_io._stream", "checkpoint_io._file",
                                  "checkpoint_io._shared"}
        for name in ("_backend", "_localfs", "_local", "_memory", "_s3", "_gcs", "_azure",
                     "_obstore")
    },
}


@pytest.mark.parametrize("top", sorted(LAYERS))
def test_lower_layers_never_reach_the_layers_above(top):
    graph = import_graph(_modules(PACKAGES[top], top))
    for module, above in LAYERS[top].items():
        reached = _reachable(graph, module)
        wrong = reached if "*" in above else reached & above
        assert not wrong, f"{module} reaches {sorted(wrong)}"
