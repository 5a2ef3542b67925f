"""The encoding job end to end: S3 (moto's HTTP server) in and out, a real local Ray cluster, the CLI."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import s3fs
from support.jobs import VOCAB, cli, corpus_rows, put_corpus, read_output
from support.reference import densify

from pipeline import SPARSE_TYPE, SpladeEncoder
from pipeline.output.layout import FINGERPRINT_KEY
from pipeline.output.location import OutputLocation
from pipeline.output.table import DeltaOutput


def test_s3_job_via_cli(ray_cluster: str, splade_tiny: Path) -> None:
    fs = s3fs.S3FileSystem()
    fs.mkdir("corpus")
    fs.mkdir("vectors")
    rows = put_corpus(fs, "corpus/mixed")
    proc = cli(
        "encode",
        "--input",
        "s3://corpus/mixed/",
        "--output",
        "s3://vectors/run1",
        "--model",
        str(splade_tiny),
        "--title-column",
        "title",
        "--passthrough-columns",
        "lang",
        "--rows-per-block",
        "32",
        "--max-length",
        "64",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "180 rows read = 180 written + 0 rejected" in proc.stdout
    data, rejects, summary = read_output(fs, "vectors/run1")

    assert rejects is None
    assert sorted(data["id"].to_pylist()) == sorted(r["id"] for r in rows)  # each input id exactly once
    assert data.schema.field("sparse").type == SPARSE_TYPE
    assert data.column_names == ["id", "content_hash", "sparse", "num_tokens", "truncated", "lang"]
    assert set(data["lang"].to_pylist()) == {"en"}
    table = DeltaOutput(OutputLocation("s3://vectors/run1")).snapshot()
    assert table is not None and table.version == 0 and table.record["kind"] == "encode"
    fp = table.record["fingerprint"]  # in the commit info, where every Delta reader sees it...
    for rel in table.files:  # ...and in each data file's key-value metadata
        assert json.loads(pq.read_schema(fs.open(f"vectors/run1/{rel}", "rb")).metadata[FINGERPRINT_KEY]) == fp
    assert fp["model"] == str(splade_tiny) and fp["max_length"] == 64 and len(fp["weights_sha256"]) == 64

    by_id = {r["id"]: f"{r['title']} {r['text']}" for r in rows}
    encoder = SpladeEncoder(str(splade_tiny), device="cpu", max_length=64)
    want = densify(encoder.encode([by_id[i] for i in data["id"].to_pylist()]), VOCAB)
    assert np.abs(densify(data["sparse"].combine_chunks(), VOCAB) - want).max() <= 1e-5
    assert (
        data["num_tokens"].to_pylist()
        == encoder.encode_batch([by_id[i] for i in data["id"].to_pylist()]).num_tokens.tolist()
    )

    assert summary["rows_read"] == summary["rows_written"] + summary["rows_rejected"] == 180
    assert summary["input_files"] == 3 and summary["duplicate_ids"] == 0
    assert summary["tokens"] == sum(data["num_tokens"].to_pylist())
    assert 10 < summary["nonzeros_per_doc"]["p50"] <= summary["nonzeros_per_doc"]["p99"]
    assert summary["fingerprint"] == fp


def test_same_input_same_files(ray_cluster: str, splade_tiny: Path, tmp_path: Path) -> None:
    from pipeline.config import load_config
    from pipeline.job.encode import run_job

    src = tmp_path / "in.jsonl"
    src.write_text("\n".join(json.dumps(r) for r in corpus_rows(40)))
    names = []
    for run in ("a", "b"):
        cfg = load_config(
            None,
            {
                "input.paths": [str(src)],
                "output.path": str(tmp_path / run),
                "encoder.model": str(splade_tiny),
                "input.rows_per_block": 16,
            },
        )
        run_job(cfg)
        names.append(sorted(p.name for p in (tmp_path / run / "data").iterdir()))
    # named by the unit (input file, its version, the config), the block and the attempt that wrote it
    parts = [
        [re.fullmatch(r"part-([0-9a-f]{16})-(\d{6})-(\d{8}T\d{6}-[0-9a-f]{8})\.parquet", n) for n in run]
        for run in names
    ]
    assert [[m.group(1, 2) for m in run] for run in parts][0] == [[m.group(1, 2) for m in run] for run in parts][1]
    assert [m.group(2) for m in parts[0]] == ["000000", "000001", "000002"]
    assert {m.group(3) for m in parts[0]} != {m.group(3) for m in parts[1]}  # two runs never share a name
    first = pq.read_table(tmp_path / "a" / "data" / names[0][0])
    assert first["id"].to_pylist() == [f"d{i:05d}" for i in range(16)]
