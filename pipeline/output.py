"""The output layout and how one block of encoded rows becomes files.

    <output>/data/part-<shard>-<block>.parquet     id, sparse, num_tokens, truncated, passthrough
    <output>/rejects/part-<shard>-<block>.parquet  id, source, line, reason, detail
    <output>/_SUMMARY.json                         the run summary (written last)

File names derive from the input shard (its position in the sorted listing) and the block
within it, so the same input and config give the same files.
"""

from __future__ import annotations

import json
from collections import Counter
from typing import Any

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline.config import OutputConfig
from pipeline.sources import BAD_FILE

DATA_DIR = "data"
REJECTS_DIR = "rejects"
SUMMARY_FILE = "_SUMMARY.json"
FINGERPRINT_KEY = b"splade_pipeline.fingerprint"
STATS_SCHEMA = pa.schema(
    [
        ("shard", pa.int32()), ("block", pa.int32()), ("block_rows", pa.int32()), ("rows", pa.int64()),
        ("written", pa.int64()), ("rejected", pa.string()), ("tokens", pa.int64()), ("truncated", pa.int64()),
        ("nnz_hist", pa.string()), ("bad_file", pa.string()), ("data_file", pa.string()), ("rejects_file", pa.string()),
    ]
)  # fmt: skip


class OutputError(ValueError):
    """The output location cannot be used as configured; the message names the URL."""


def join(root: str, *parts: str) -> str:
    return "/".join([root.rstrip("/"), *parts])


def output_fs(cfg: OutputConfig) -> tuple[fsspec.AbstractFileSystem, str]:
    return fsspec.core.url_to_fs(cfg.path, **cfg.storage_options)


def prepare_output(cfg: OutputConfig) -> None:
    """Refuse a non-empty output unless ``overwrite`` (then clear it: the user asked for that)."""
    try:
        fs, root = output_fs(cfg)
        existing = [p for p in (fs.find(root) if fs.isdir(root) else []) if not p.endswith("/")]
        if existing and not cfg.overwrite:
            raise OutputError(f"{cfg.path}: output is not empty ({len(existing)} files); set output.overwrite: true to replace it")
        if existing:
            fs.rm(root, recursive=True)
        fs.makedirs(root, exist_ok=True)
    except OutputError:
        raise
    except Exception as err:  # noqa: BLE001 - any storage failure is reported with the URL
        raise OutputError(f"{cfg.path}: cannot use output location: {type(err).__name__}: {err}") from None


def write_blocks(table: pa.Table, cfg: OutputConfig, fingerprint: dict[str, Any], passthrough: list[str]) -> pa.Table:
    """Write the data and rejects files of every (shard, block) in ``table``; return their stats."""
    fs, root = output_fs(cfg)
    rows = []
    keys = table.select(["_shard", "_block"]).group_by(["_shard", "_block"]).aggregate([]).to_pylist()
    for key in keys:
        piece = table.filter(pc.and_(pc.equal(table["_shard"], key["_shard"]), pc.equal(table["_block"], key["_block"])))
        rows.append(_write_piece(piece, fs, root, cfg, fingerprint, passthrough))
    return pa.Table.from_pylist(rows, schema=STATS_SCHEMA)


def _write_piece(piece: pa.Table, fs: Any, root: str, cfg: OutputConfig, fingerprint: dict[str, Any], passthrough: list[str]) -> dict[str, Any]:
    shard, block, block_rows = (piece[c][0].as_py() for c in ("_shard", "_block", "_block_rows"))
    reason = piece["_reject"]
    marker = pc.fill_null(pc.equal(reason, BAD_FILE), False)
    good = piece.filter(pc.is_null(reason))
    rejects = piece.filter(pc.and_(pc.is_valid(reason), pc.invert(marker)))
    bad = piece.filter(marker)
    # A block split across batches by Ray gets one file per piece, named by its first line.
    name = f"part-{shard:06d}-{block:06d}" + ("" if piece.num_rows == block_rows else f"-{pc.min(piece['_line']).as_py()}")
    compression = None if cfg.compression == "none" else cfg.compression
    stats: dict[str, Any] = {"shard": shard, "block": block, "block_rows": block_rows, "rows": piece.num_rows - bad.num_rows}
    stats["data_file"] = stats["rejects_file"] = stats["bad_file"] = None
    if good.num_rows:
        data = good.select(["id", "sparse", "num_tokens", "truncated", *passthrough])
        data = data.replace_schema_metadata({FINGERPRINT_KEY: json.dumps(fingerprint).encode()})
        stats["data_file"] = _write_parquet(data, fs, join(root, DATA_DIR, name + ".parquet"), compression)
    if rejects.num_rows:
        table = pa.table(
            {"id": rejects["id"], "source": rejects["_source"], "line": rejects["_line"], "reason": rejects["_reject"], "detail": rejects["_detail"]}
        )
        stats["rejects_file"] = _write_parquet(table, fs, join(root, REJECTS_DIR, name + ".parquet"), compression)
    if bad.num_rows:
        stats["bad_file"] = f"{bad['_source'][0].as_py()}: {bad['_detail'][0].as_py()}"
    nnz = pc.list_value_length(pc.struct_field(good["sparse"], "indices")).to_numpy()
    stats |= {
        "written": good.num_rows,
        "rejected": json.dumps(Counter(rejects["_reject"].to_pylist())),
        "tokens": int(pc.sum(good["num_tokens"]).as_py() or 0) if good.num_rows else 0,
        "truncated": int(pc.sum(pc.cast(good["truncated"], pa.int64())).as_py() or 0) if good.num_rows else 0,
        "nnz_hist": json.dumps({int(k): int(v) for k, v in zip(*np.unique(nnz, return_counts=True))}),
    }
    return stats


def _write_parquet(table: pa.Table, fs: Any, path: str, compression: str | None) -> str:
    fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
    # On object stores the object appears only when close() completes the upload: never half a file.
    with fs.open(path, "wb") as fh:
        pq.write_table(table, fh, compression=compression)
    return fs.unstrip_protocol(path)
