"""The package's floor plan holds: no import cycle between modules, and the encoder core reaches
no engine, storage, job, output or store code. Every import is read with ``ast``: function-level
ones included (a cycle hidden in a function body is still a cycle), modules named by string in
the lazy public face and the store registry, and ``from pipeline import name`` read as an import
of the module defining ``name``."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest
from support.layering import (
    PACKAGE_ROOT,
    calls_ray_init,
    cycles,
    imported_names,
    internal_edges,
    private_attribute_uses,
    read_modules,
)

# What the encoder core may import, directly or through another pipeline module: the standard
# library, the model stack, numpy, pyarrow arrays (not its file formats or filesystems), and the
# shared base it needs. Everything else is refused: an allow-list, not a deny-list.
ALLOWED_FOR_ENCODE = ("torch", "transformers", "tokenizers", "huggingface_hub", "safetensors", "numpy", "pydantic")
ALLOWED_FOR_ENCODE += ("yaml", "pipeline.encode", "pipeline.config", "pipeline.errors", "pipeline.redaction")
ALLOWED_FOR_ENCODE += ("pipeline.version",)
PYARROW_ALLOWED = ("pyarrow", "pyarrow.compute")
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


def _allowed(name: str) -> bool:
    top = name.split(".")[0]
    if top in sys.stdlib_module_names or top == "__future__" or name == "pipeline":
        return True
    if top == "pyarrow":  # pyarrow and pyarrow.compute (and names imported from them), no file formats
        return name in PYARROW_ALLOWED or (name.rpartition(".")[0] in PYARROW_ALLOWED and name[8:9].isupper())
    return _is_under(name, ALLOWED_FOR_ENCODE)


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
        "if TYPE_CHECKING:\n    import s3fs\nif not TYPE_CHECKING:\n    import boto3\n"
    )
    found = imported_names(tree, "pipeline.encode.encoder", is_package=False)
    assert {"pipeline.job", "pipeline.job.cluster", "ray.data", "pipeline.encode.sibling", "boto3"} <= found
    assert "s3fs" not in found  # type-checking imports never run


def test_lazy_faces_and_registries_count_as_imports() -> None:
    modules = read_modules()
    assert "pipeline.job.encode" in modules["pipeline"].imports  # through _EXPORTS
    assert "pipeline.sinks.qdrant" in modules["pipeline.sinks"].imports  # through STORES
    assert not any(_allowed(m) for m in ("boto3", "requests", "pyarrow.csv", "pyarrow.parquet", "s3fs", "ray"))
    assert _allowed("pyarrow") and _allowed("pyarrow.compute") and _allowed("torch.nn.functional")


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
        outside = sorted({i for r in reached for i in modules[r].imports if not _allowed(i)})
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
        if calls_ray_init(ast.parse(path.read_text()))
    ]
    assert callers == ["pipeline/job/cluster.py"]
    assert calls_ray_init(ast.parse("from ray import init\ninit()"))
    assert calls_ray_init(ast.parse("import ray\nray.init(address='auto')"))


def test_no_module_uses_a_private_name_of_another() -> None:
    modules = read_modules()
    private = sorted(
        f"{name}: {imp}"
        for name, m in modules.items()
        for imp in m.imports
        if imp.startswith("pipeline.") and imp.rsplit(".", 1)[-1].startswith("_") and not imp.endswith("__")
    )
    private += sorted(
        f"{name}: {use}"
        for name, m in modules.items()
        for use in private_attribute_uses(ast.parse(m.path.read_text()), name, m.path.name == "__init__.py")
    )
    assert not private
    planted = ast.parse(
        "from pipeline.job import stages\nstages._rejected(1, 2)\nimport pipeline.sources as s\ns._open()"
    )
    assert private_attribute_uses(planted, "pipeline.cli", False) == {
        "pipeline.job.stages._rejected",
        "pipeline.sources._open",
    }


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

    ruff = shutil.which("ruff", path=str(Path(sys.executable).parent)) or shutil.which("ruff")
    assert ruff, "ruff is part of the test extra: pip install -e '.[test]'"
    targets = ["pipeline", "tests", "benchmarks", "jobs"]
    for command in (["format", "--check"], ["check"]):
        proc = subprocess.run([ruff, *command, *targets], cwd=PACKAGE_ROOT.parent, capture_output=True, text=True)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-1000:]
