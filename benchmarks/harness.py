"""What the pipeline benchmarks share: a local S3 endpoint (moto's server) and Parquet shards on it."""

from __future__ import annotations

import io
import os
import socket
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_s3() -> Any:
    """moto's S3 server on 127.0.0.1 in its own process (see tests.support.s3_server), exported to every
    client through AWS_ENDPOINT_URL; returns the server."""
    from tests.support.s3_server import S3Server

    server = S3Server().start()
    os.environ.update(
        AWS_ENDPOINT_URL=server.url,
        AWS_ACCESS_KEY_ID="bench",
        AWS_SECRET_ACCESS_KEY="bench",
        AWS_DEFAULT_REGION="us-east-1",
        RAY_AUTH_MODE="disabled",
        RAY_DATA_DISABLE_PROGRESS_BARS="1",
        HF_HUB_OFFLINE="1",
    )
    return server


def put_shards(fs: Any, prefix: str, ids: list[str], texts: list[str], shards: int) -> None:
    """``ids``/``texts`` as ``shards`` Parquet files under ``prefix`` (consecutive slices)."""
    per = -(-len(texts) // shards)
    for i in range(shards):
        buf = io.BytesIO()
        pq.write_table(pa.table({"id": ids[i * per : (i + 1) * per], "text": texts[i * per : (i + 1) * per]}), buf)
        fs.pipe(f"{prefix}/shard-{i:03d}.parquet", buf.getvalue())
