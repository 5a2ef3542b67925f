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
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import s3fs

from pipeline import SpladeEncoder
from pipeline.demo import load_sample_corpus

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


def delta_options() -> dict[str, str]:
    """What a Delta reader needs besides the environment's AWS_* variables: moto's endpoint is http."""
    return {"AWS_ALLOW_HTTP": "true"} if os.environ.get("AWS_ENDPOINT_URL", "").startswith("http://") else {}


def table_filesystem(url: str) -> pafs.FileSystem:
    """A pyarrow filesystem rooted at the table: deltalake's own (the default) can abort the
    interpreter at exit after a scan (delta-rs issue 2184), so readers here pass this one."""
    if url.startswith("s3://"):
        return pafs.SubTreeFileSystem(
            url.removeprefix("s3://"), pafs.PyFileSystem(pafs.FSSpecHandler(s3fs.S3FileSystem()))
        )
    return pafs.SubTreeFileSystem(str(Path(url).resolve()), pafs.LocalFileSystem())


def read_delta(url: str, version: int | None = None, columns: list[str] | None = None) -> pa.Table:
    """The table at ``url`` (latest version by default) as a Delta reader sees it: deltalake."""
    from deltalake import DeltaTable

    table = DeltaTable(url, version=version, storage_options=delta_options())
    return table.to_pyarrow_table(columns=columns, filesystem=table_filesystem(url))


def read_polars(url: str) -> pa.Table:
    import polars as pl

    return pl.read_delta(url, storage_options=delta_options() or None).to_arrow()


def read_ray(url: str) -> pa.Table:
    import ray

    ds = ray.data.read_delta(url, storage_options=delta_options(), filesystem=table_filesystem(url))
    return pa.concat_tables(list(ds.iter_batches(batch_size=None, batch_format="pyarrow")))


def read_output(fs: s3fs.S3FileSystem, root: str) -> tuple[pa.Table, pa.Table | None, dict]:
    """The output's latest version, its rejects table and the summary, read as any Delta reader would."""
    data = read_delta(f"s3://{root}")
    rejects = read_delta(f"s3://{root}/_rejects")
    summary = json.loads(fs.cat(f"{root}/_SUMMARY.json"))
    return data, (rejects if rejects.num_rows else None), summary


def cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "pipeline.cli", *args],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
        env=env or os.environ.copy(),
    )


def settle(root: str, quiet_s: float = 3.0, timeout: float = 90) -> None:
    """Wait until the files under ``root`` stop changing: a killed driver's Ray actors (its writers)
    live on until Ray sees the driver gone, and may finish a file meanwhile."""
    fs = s3fs.S3FileSystem()
    last: list[str] | None = None
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        fs.invalidate_cache()
        now = sorted(fs.find(root))
        if now == last:
            fs.invalidate_cache()  # s3fs instances are shared: no listing of this one may go stale later
            return
        last = now
        time.sleep(quiet_s)
    raise AssertionError(f"files under {root} still changing after {timeout} s")


def start_until_written(args: list[str], root: str, timeout: float = 180, **popen: Any) -> subprocess.Popen:
    """Start ``splade-pipeline <args>``; return it once its first data file is on S3 (mid-run)."""
    proc = subprocess.Popen([sys.executable, "-m", "pipeline.cli", *args], cwd=ROOT, text=True, **popen)
    fs = s3fs.S3FileSystem()
    deadline = time.monotonic() + timeout
    while not (fs.exists(f"{root}/data") and fs.find(f"{root}/data")):
        assert time.monotonic() < deadline and proc.poll() is None, "the run ended or stalled before writing a file"
        time.sleep(0.05)
        fs.invalidate_cache()
    return proc
