"""The job's test helpers: corpora on S3, reference vectors, running the CLI, reading outputs."""

from __future__ import annotations

import csv
import io
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import s3fs

from pipeline import SpladeEncoder
from pipeline.demo import load_sample_corpus
from pipeline.output.commits import committed_files

from .reference import densify

VOCAB = 30522
ROOT = Path(__file__).resolve().parents[2]


def corpus_rows(n: int, offset: int = 0) -> list[dict[str, str]]:
    sample = load_sample_corpus()
    rows = []
    for i in range(n):
        base = sample[(i + offset) % len(sample)]
        rows.append(
            {
                "id": f"d{i + offset:05d}",
                "title": base["title"],
                "text": f"{base['text']} (variant {i + offset})",
                "lang": "en",
            }
        )
    return rows


def put_jsonl_shards(fs: s3fs.S3FileSystem, prefix: str, rows: list[dict], files: int) -> None:
    """``rows`` as ``files`` JSONL files of equal size under ``prefix``."""
    per = -(-len(rows) // files)
    for i in range(files):
        fs.pipe(f"{prefix}/part-{i}.jsonl", "\n".join(json.dumps(r) for r in rows[i * per : (i + 1) * per]).encode())


def reference_vectors(model: Path, rows: list[dict], max_length: int = 64) -> dict[str, np.ndarray]:
    """Each row's vector (of its ``text``) from the bare encoder: what the pipeline must write."""
    dense = densify(
        SpladeEncoder(str(model), device="cpu", max_length=max_length).encode([r["text"] for r in rows]), VOCAB
    )
    return {r["id"]: dense[i] for i, r in enumerate(rows)}


def put_corpus(fs: s3fs.S3FileSystem, prefix: str) -> list[dict[str, str]]:
    """Three shards in three formats: Parquet, JSONL and CSV."""
    a, b, c = corpus_rows(70), corpus_rows(60, 70), corpus_rows(50, 130)
    buf = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(a), buf)
    fs.pipe(f"{prefix}/part-a.parquet", buf.getvalue())
    fs.pipe(f"{prefix}/part-b.jsonl", "\n".join(json.dumps(r) for r in b).encode())
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=["id", "title", "text", "lang"])
    writer.writeheader()
    writer.writerows(c)
    fs.pipe(f"{prefix}/part-c.csv", out.getvalue().encode())
    return a + b + c


def read_output(fs: s3fs.S3FileSystem, root: str) -> tuple[pa.Table, pa.Table | None, dict]:
    """The committed output (through its commit record), checking that the folders hold nothing else."""
    data_files = committed_files(f"s3://{root}")
    reject_files = committed_files(f"s3://{root}", kind="rejects_file")
    listed = {p for folder in ("data", "rejects") if fs.exists(f"{root}/{folder}") for p in fs.find(f"{root}/{folder}")}
    assert listed == {f.removeprefix("s3://") for f in data_files + reject_files}  # nothing uncommitted left behind
    data = [pq.read_table(fs.open(p, "rb")) for p in data_files]
    rejects = [pq.read_table(fs.open(p, "rb")) for p in reject_files]
    summary = json.loads(fs.cat(f"{root}/_SUMMARY.json"))
    return pa.concat_tables(data), (pa.concat_tables(rejects) if rejects else None), summary


def cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "pipeline.cli", *args],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
        env=env or os.environ.copy(),
    )


def start_until_progress(args: list[str], root: str, timeout: float = 180, **popen: Any) -> subprocess.Popen:
    """Start ``splade-pipeline <args>``; return it once its first progress record is on S3 (mid-run)."""
    proc = subprocess.Popen([sys.executable, "-m", "pipeline.cli", *args], cwd=ROOT, text=True, **popen)
    fs = s3fs.S3FileSystem()
    deadline = time.monotonic() + timeout
    while not (fs.exists(f"{root}/_progress") and fs.find(f"{root}/_progress")):
        assert time.monotonic() < deadline and proc.poll() is None, "the run ended or stalled before recording progress"
        time.sleep(0.05)
        fs.invalidate_cache()
    return proc
