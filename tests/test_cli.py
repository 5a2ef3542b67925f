"""The command line, run as a user runs it."""

from __future__ import annotations

import json
import os
import pty
import re
import select
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline import SPARSE_TYPE
from pipeline.demo import load_sample_corpus


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "pipeline.cli", *args], capture_output=True, text=True, cwd=cwd, timeout=240
    )


def test_demo_runs_the_job_and_prints_terms(tmp_path: Path, ray_cluster: str) -> None:
    proc = _cli("demo", "--output", str(tmp_path / "out"), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    table = pq.read_table(tmp_path / "out" / "data")
    rows = load_sample_corpus()
    assert sorted(table.column("id").to_pylist()) == [r["id"] for r in rows]
    assert table.schema.field("sparse").type == SPARSE_TYPE
    nnz = pc.list_value_length(pc.struct_field(table["sparse"], "indices")).to_numpy()
    assert nnz.min() > 10
    assert "doc-000: tide" in proc.stdout
    assert "32 rows read = 32 written + 0 rejected" in proc.stdout
    summary = json.loads((tmp_path / "out" / "_SUMMARY.json").read_text())
    assert summary["rows_written"] == 32


def test_help_documents_every_config_field() -> None:
    from pipeline.config import JobConfig

    proc = subprocess.run(
        [sys.executable, "-m", "pipeline.cli", "encode", "--help"], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0
    text = " ".join(proc.stdout.split())  # undo argparse's line wrapping
    for section, field in JobConfig.model_fields.items():
        for name, leaf in field.default_factory().__class__.model_fields.items():
            assert f"[{section}.{name}; default:" in text, f"{section}.{name}"
            assert leaf.description, f"{section}.{name} has no description"


def test_show_config_applies_flags_over_yaml(tmp_path: Path) -> None:
    config = tmp_path / "job.yaml"
    config.write_text("encoder:\n  top_k: 10\n  max_length: 128\ninput:\n  paths: [a.jsonl]\n")
    proc = _cli(
        "encode", "--config", str(config), "--top-k", "32", "--input", "b.jsonl,c.jsonl", "--show-config", cwd=tmp_path
    )
    assert proc.returncode == 0, proc.stderr
    shown = json.loads(proc.stdout)
    assert shown["encoder"]["top_k"] == 32 and shown["encoder"]["max_length"] == 128
    assert shown["input"]["paths"] == ["b.jsonl", "c.jsonl"]


def test_terms_and_errors(tmp_path: Path, splade_tiny: Path) -> None:
    proc = _cli("terms", "machine learning algorithms", "--top", "3", "--model", str(splade_tiny), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("'machine learning algorithms': machine ")
    bad = _cli("terms", "x", "--model", str(tmp_path / "no-such-model"), cwd=tmp_path)
    assert bad.returncode == 2
    assert "splade-pipeline terms: error: model:" in bad.stderr and "no such folder" in bad.stderr
    assert "Traceback" not in bad.stderr


def _in_a_terminal(args: list[str], cwd: Path) -> tuple[int, str]:
    """Run the CLI in a pseudo-terminal, as a person at a terminal does; its exit code and what it showed."""
    master, child = pty.openpty()
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # a fresh user's machine: its own Ray
    env |= {"SPLADE_PIPELINE_LOG_DIR": str(cwd / "logs"), "COLUMNS": "160"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "pipeline.cli", *args], stdin=child, stdout=child, stderr=child, cwd=cwd, env=env
    )
    os.close(child)
    shown = bytearray()
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        ready, _, _ = select.select([master], [], [], 0.5)
        if ready:
            try:
                data = os.read(master, 65536)
            except OSError:  # the terminal's other side closed
                break
            if not data:
                break
            shown += data
        elif proc.poll() is not None:
            break
    os.close(master)
    return proc.wait(timeout=60), shown.decode(errors="replace")


def test_the_demo_in_a_terminal_shows_the_plan_one_progress_line_and_the_summary(tmp_path: Path) -> None:
    """Quiet by default: no Ray or library log line and no warning, the progress line redrawn in place
    up to 100%, the summary; the logs are in the file it names. With --verbose, Ray's lines are back."""
    code, shown = _in_a_terminal(["demo", "--output", str(tmp_path / "out")], tmp_path)
    assert code == 0, shown[-3000:]
    noise = re.compile(r"\b(INFO|WARNING|ERROR|Warning)\b|core_worker|Traceback|\(MapWorker|pid=|dashboard")
    assert not [line for line in shown.splitlines() if noise.search(line)], shown
    assert re.search(r"splade-pipeline: 1 input file, 32 documents; model bundled:splade-tiny; 1 encoder actor", shown)
    redrawn = [part for part in shown.split("\r\x1b[2K") if part.strip()][1:]
    assert redrawn and redrawn[-1].startswith("  32 / 32 docs (100%)") and "done · 0 rejected" in redrawn[-1]
    assert "32 rows read = 32 written + 0 rejected" in shown and "report: file://" in shown
    log = Path(re.search(r"logs in (\S+\.log)", shown).group(1))
    assert log.parent == tmp_path / "logs" and "Started a local Ray instance" in log.read_text()

    code, loud = _in_a_terminal(["demo", "--verbose", "--output", str(tmp_path / "again")], tmp_path)
    assert code == 0, loud[-3000:]
    assert "Started a local Ray instance" in loud and "logs in" not in loud
    assert "32 rows read = 32 written + 0 rejected" in loud
