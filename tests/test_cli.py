"""The command line, run as a user runs it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from pipeline import SPARSE_TYPE
from pipeline.demo import load_sample_corpus


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipeline.cli", *args], capture_output=True, text=True, cwd=cwd, timeout=240)


def test_demo_writes_vectors_and_prints_terms(tmp_path: Path, splade_tiny: Path) -> None:
    proc = _cli("demo", "--output", str(tmp_path / "out"), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    table = pq.read_table(tmp_path / "out" / "sample.parquet")
    rows = load_sample_corpus()
    assert table.column("id").to_pylist() == [r["id"] for r in rows]
    assert table.schema.field("sparse").type == SPARSE_TYPE
    nnz = np.diff(table.column("sparse").combine_chunks().field("indices").offsets.to_numpy())
    assert nnz.min() > 10
    assert "doc-000  'Tides': tide" in proc.stdout
    assert "documents=32" in proc.stdout


def test_terms_and_errors(tmp_path: Path, splade_tiny: Path) -> None:
    proc = _cli("terms", "machine learning algorithms", "--top", "3", "--model", str(splade_tiny), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("'machine learning algorithms': machine ")
    bad = _cli("terms", "x", "--model", str(tmp_path / "no-such-model"), cwd=tmp_path)
    assert bad.returncode == 2
    assert "splade-pipeline terms: error: model:" in bad.stderr and "no such folder" in bad.stderr
    assert "Traceback" not in bad.stderr
