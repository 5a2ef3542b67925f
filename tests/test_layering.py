"""The package's floor plan holds: no import cycle between modules, and the encoder core reaches
no engine, storage, job, output or store code. Every import is read with ``ast``, function-level
ones included (a cycle hidden in a function body is still a cycle)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
from support.layering import PACKAGE_ROOT, cycles, imported_names, internal_edges, read_modules

# What the encoder core may never import, directly or through another pipeline module.
FORBIDDEN_FOR_ENCODE = ("ray", "fsspec", "s3fs", "pyarrow.parquet", "pyarrow.fs", "pyarrow.dataset")
FORBIDDEN_ROOMS_FOR_ENCODE = (
    "pipeline.job",
    "pipeline.output",
    "pipeline.sinks",
    "pipeline.sources",
    "pipeline.storage",
)
NO_RAY = ("pipeline.output", "pipeline.sinks", "pipeline.encode")


def _is_under(name: str, prefixes: tuple[str, ...]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def _reachable(start: str, edges: dict[str, set[str]]) -> set[str]:
    seen, todo = {start}, [start]
    while todo:
        for nxt in edges.get(todo.pop(), ()):
            if nxt not in seen:
                seen.add(nxt)
                todo.append(nxt)
    return seen


def test_the_reader_sees_function_level_and_relative_imports() -> None:
    tree = ast.parse(
        "def f():\n    from pipeline.job import cluster\n    import ray.data\nfrom . import sibling\n"
        "if TYPE_CHECKING:\n    import s3fs\n"
    )
    found = imported_names(tree, "pipeline.encode.encoder", is_package=False)
    assert {"pipeline.job", "pipeline.job.cluster", "ray.data", "pipeline.encode.sibling"} <= found
    assert "s3fs" not in found  # type-checking imports never run


def test_cycle_finder_finds_a_planted_cycle() -> None:
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycles() -> None:
    modules = read_modules()
    assert len(modules) > 30 and "pipeline.encode.encoder" in modules  # the reader found the package
    assert cycles(internal_edges(modules)) == []


def test_the_encoder_core_reaches_no_engine_storage_or_job_code() -> None:
    modules = read_modules()
    edges = internal_edges(modules)
    encode = [name for name in modules if _is_under(name, ("pipeline.encode",))]
    assert len(encode) >= 9
    for name in encode:
        reached = _reachable(name, edges)
        rooms = sorted(r for r in reached if _is_under(r, FORBIDDEN_ROOMS_FOR_ENCODE))
        assert not rooms, f"{name} reaches {rooms}"
        outside = sorted(i for r in reached for i in modules[r].imports if _is_under(i, FORBIDDEN_FOR_ENCODE))
        assert not outside, f"{name} (or a module it imports) imports {outside}"


@pytest.mark.parametrize("room", NO_RAY)
def test_only_the_job_imports_ray(room: str) -> None:
    modules = read_modules()
    offenders = {
        n: sorted(i for i in m.imports if _is_under(i, ("ray",))) for n, m in modules.items() if _is_under(n, (room,))
    }
    assert not {n: i for n, i in offenders.items() if i}


def test_ray_init_only_in_the_cluster_session() -> None:
    callers = [
        path.relative_to(PACKAGE_ROOT.parent).as_posix()
        for path in PACKAGE_ROOT.rglob("*.py")
        if "ray.init(" in path.read_text()
    ]
    assert callers == ["pipeline/job/cluster.py"]


def test_no_module_imports_a_private_name_of_another() -> None:
    modules = read_modules()
    private = sorted(
        f"{name}: {imp}"
        for name, m in modules.items()
        for imp in m.imports
        if imp.startswith("pipeline.")
        and imp.rsplit(".", 1)[-1].startswith("_")
        and imp.rsplit(".", 1)[-1] != "__version__"
    )
    assert not private


def test_tests_import_no_test_module() -> None:
    tests = Path(__file__).resolve().parent
    offenders = []
    for path in sorted(tests.rglob("*.py")):
        tree = ast.parse(path.read_text())
        for name in imported_names(tree, path.stem, is_package=False):
            if name.split(".")[0].startswith("test_") or name.split(".")[0] == "conftest":
                offenders.append(f"{path.name}: {name}")
    assert not offenders


def test_code_is_formatted_and_lint_clean() -> None:
    """``ruff format --check`` and ``ruff check`` at the project's 120 columns (pyproject.toml)."""
    import shutil
    import subprocess
    import sys

    ruff = shutil.which("ruff", path=str(Path(sys.executable).parent)) or shutil.which("ruff")
    assert ruff, "ruff is part of the test extra: pip install -e '.[test]'"
    root = PACKAGE_ROOT.parent
    targets = ["pipeline", "tests", "benchmarks", "jobs"]
    for command in (["format", "--check"], ["check"]):
        proc = subprocess.run([ruff, *command, *targets], cwd=root, capture_output=True, text=True)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-1000:]
