"""The encoding job end to end: S3 (moto's HTTP server) in and out, a real local Ray cluster, the CLI."""

from __future__ import annotations

import csv
import io
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import s3fs
from reference import densify

from pipeline import SPARSE_TYPE, SpladeEncoder
from pipeline.demo import load_sample_corpus
from pipeline.manifest import committed_files
from pipeline.output import FINGERPRINT_KEY

VOCAB = 30522
ROOT = Path(__file__).resolve().parents[1]


def corpus_rows(n: int, offset: int = 0) -> list[dict[str, str]]:
    sample = load_sample_corpus()
    rows = []
    for i in range(n):
        base = sample[(i + offset) % len(sample)]
        rows.append({"id": f"d{i + offset:05d}", "title": base["title"], "text": f"{base['text']} (variant {i + offset})", "lang": "en"})
    return rows


def put_jsonl_shards(fs: s3fs.S3FileSystem, prefix: str, rows: list[dict], files: int) -> None:
    """``rows`` as ``files`` JSONL files of equal size under ``prefix``."""
    per = -(-len(rows) // files)
    for i in range(files):
        fs.pipe(f"{prefix}/part-{i}.jsonl", "\n".join(json.dumps(r) for r in rows[i * per : (i + 1) * per]).encode())


def reference_vectors(model: Path, rows: list[dict], max_length: int = 64) -> dict[str, np.ndarray]:
    """Each row's vector (of its ``text``) from the bare encoder: what the pipeline must write."""
    dense = densify(SpladeEncoder(str(model), device="cpu", max_length=max_length).encode([r["text"] for r in rows]), VOCAB)
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
        [sys.executable, "-m", "pipeline.cli", *args], capture_output=True, text=True, timeout=300, cwd=ROOT, env=env or os.environ.copy()
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


def test_s3_job_via_cli(ray_cluster: str, splade_tiny: Path) -> None:
    fs = s3fs.S3FileSystem()
    fs.mkdir("corpus")
    fs.mkdir("vectors")
    rows = put_corpus(fs, "corpus/mixed")
    proc = cli(
        "encode", "--input", "s3://corpus/mixed/", "--output", "s3://vectors/run1", "--model", str(splade_tiny),
        "--title-column", "title", "--passthrough-columns", "lang", "--rows-per-block", "32", "--max-length", "64",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "180 rows read = 180 written + 0 rejected" in proc.stdout
    data, rejects, summary = read_output(fs, "vectors/run1")

    assert rejects is None
    assert sorted(data["id"].to_pylist()) == sorted(r["id"] for r in rows)  # each input id exactly once
    assert data.schema.field("sparse").type == SPARSE_TYPE
    assert data.column_names == ["id", "content_hash", "sparse", "num_tokens", "truncated", "lang"]
    assert set(data["lang"].to_pylist()) == {"en"}
    fp = json.loads(data.schema.metadata[FINGERPRINT_KEY])
    assert fp["model"] == str(splade_tiny) and fp["max_length"] == 64 and len(fp["weights_sha256"]) == 64

    by_id = {r["id"]: f"{r['title']} {r['text']}" for r in rows}
    encoder = SpladeEncoder(str(splade_tiny), device="cpu", max_length=64)
    want = densify(encoder.encode([by_id[i] for i in data["id"].to_pylist()]), VOCAB)
    assert np.abs(densify(data["sparse"].combine_chunks(), VOCAB) - want).max() <= 1e-5
    assert data["num_tokens"].to_pylist() == encoder.encode_batch([by_id[i] for i in data["id"].to_pylist()]).num_tokens.tolist()

    assert summary["rows_read"] == summary["rows_written"] + summary["rows_rejected"] == 180
    assert summary["input_files"] == 3 and summary["duplicate_ids"] == 0
    assert summary["tokens"] == sum(data["num_tokens"].to_pylist())
    assert 10 < summary["nonzeros_per_doc"]["p50"] <= summary["nonzeros_per_doc"]["p99"]
    assert summary["fingerprint"] == fp


def test_same_input_same_files(ray_cluster: str, splade_tiny: Path, tmp_path: Path) -> None:
    from pipeline.config import load_config
    from pipeline.run import run_job

    src = tmp_path / "in.jsonl"
    src.write_text("\n".join(json.dumps(r) for r in corpus_rows(40)))
    names = []
    for run in ("a", "b"):
        cfg = load_config(None, {"input.paths": [str(src)], "output.path": str(tmp_path / run), "encoder.model": str(splade_tiny), "input.rows_per_block": 16})
        run_job(cfg)
        names.append(sorted(p.name for p in (tmp_path / run / "data").iterdir()))
    assert names[0] == names[1] and len(names[0]) == 3  # named by input file, its version, the config and the block
    assert [re.fullmatch(r"part-[0-9a-f]{16}-(\d{6})\.parquet", n).group(1) for n in names[0]] == ["000000", "000001", "000002"]
    first = pq.read_table(tmp_path / "a" / "data" / names[0][0])
    assert first["id"].to_pylist() == [f"d{i:05d}" for i in range(16)]
