"""The output layout and how one block of encoded rows becomes files.

    <output>/data/part-<unit>-<block>.parquet      id, content_hash, sparse, num_tokens, truncated, passthrough
    <output>/rejects/part-<unit>-<block>.parquet   id, source, line, reason, detail
    <output>/_commits/<generation>.parquet          the committed files (see pipeline.manifest)
    <output>/_SUMMARY.json                          the run summary (written last)

File names derive from the unit of work (the input file, its version and the config: see
``pipeline.manifest.unit_key``) and the block within it, so the same input and config give the
same files, and a file's content never changes under its name.
"""

from __future__ import annotations

import json
from collections import Counter
from typing import Any

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.config import OutputConfig
from pipeline.lock import LOCK_FILE, LockedError, RunLock
from pipeline.manifest import ENTRY_SCHEMA, ensure_folder, join, write_parquet
from pipeline.sources import BAD_FILE
from pipeline.storage import url_to_fs

DATA_DIR = "data"
REJECTS_DIR = "rejects"
SUMMARY_FILE = "_SUMMARY.json"
FINGERPRINT_KEY = b"splade_pipeline.fingerprint"


class OutputError(ValueError):
    """The output location cannot be used as configured; the message names the URL."""


def output_fs(cfg: OutputConfig) -> tuple[fsspec.AbstractFileSystem, str]:
    return url_to_fs(cfg.path, cfg.storage_options)


def existing_files(cfg: OutputConfig) -> list[str]:
    """Files under the output (markers like empty ``prefix/`` objects and the run lock excluded); storage errors name the URL."""
    try:
        fs, root = output_fs(cfg)
        found = fs.find(root) if fs.isdir(root) else []
        return [p for p in found if not p.endswith("/") and p.rsplit("/", 1)[-1] != LOCK_FILE]
    except Exception as err:  # noqa: BLE001 - any storage failure is reported with the URL
        raise OutputError(f"{cfg.path}: cannot use output location: {type(err).__name__}: {err}") from None


def lock_output(cfg: OutputConfig, what: str) -> RunLock:
    """Take the output's run lock (one run at a time); storage errors name the URL."""
    fs, root = output_fs(cfg)
    lock = RunLock(fs, root, what, cfg.lock_ttl_s)
    try:
        return lock.acquire()
    except LockedError:
        raise
    except Exception as err:  # noqa: BLE001 - any storage failure is reported with the URL
        raise OutputError(f"{cfg.path}: cannot use output location: {type(err).__name__}: {err}") from None


def clear_output(cfg: OutputConfig) -> None:
    """Delete everything under the output but the run lock (``overwrite``: the user asked to start over)."""
    try:
        fs, root = output_fs(cfg)
        doomed = existing_files(cfg)
        if doomed:
            fs.rm(doomed)
        ensure_folder(fs, root)
    except OutputError:
        raise
    except Exception as err:  # noqa: BLE001 - any storage failure is reported with the URL
        raise OutputError(f"{cfg.path}: cannot clear output location: {type(err).__name__}: {err}") from None


def write_blocks(table: pa.Table, cfg: OutputConfig, fingerprint: dict[str, Any], passthrough: list[str]) -> pa.Table:
    """Write the data and rejects files of every (shard, block) in ``table``; return their stats."""
    fs, root = output_fs(cfg)
    rows = []
    keys = table.select(["_unit", "_block"]).group_by(["_unit", "_block"]).aggregate([]).to_pylist()
    for key in keys:
        piece = table.filter(pc.and_(pc.equal(table["_unit"], key["_unit"]), pc.equal(table["_block"], key["_block"])))
        rows.append(_write_piece(piece, fs, root, cfg, fingerprint, passthrough))
    return pa.Table.from_pylist(rows, schema=ENTRY_SCHEMA)


def _write_piece(piece: pa.Table, fs: Any, root: str, cfg: OutputConfig, fingerprint: dict[str, Any], passthrough: list[str]) -> dict[str, Any]:
    unit, url, shard, block, block_rows = (piece[c][0].as_py() for c in ("_unit", "_source", "_shard", "_block", "_block_rows"))
    reason = piece["_reject"]
    marker = pc.fill_null(pc.equal(reason, BAD_FILE), False)
    good = piece.filter(pc.is_null(reason))
    rejects = piece.filter(pc.and_(pc.is_valid(reason), pc.invert(marker)))
    bad = piece.filter(marker)
    # A block split across batches by Ray gets one file per piece, named by its first line.
    name = f"part-{unit}-{block:06d}" + ("" if piece.num_rows == block_rows else f"-{pc.min(piece['_line']).as_py()}")
    compression = None if cfg.compression == "none" else cfg.compression
    last = bool(pc.any(piece["_last"]).as_py())
    stats: dict[str, Any] = {"unit": unit, "url": url, "shard": shard, "block": block, "block_rows": block_rows, "last": last,
                             "rows": piece.num_rows - bad.num_rows}  # fmt: skip
    stats["data_file"] = stats["rejects_file"] = stats["bad_file"] = None
    if good.num_rows:
        data = good.select(["id", "_hash", "sparse", "num_tokens", "truncated", *passthrough]).rename_columns(
            ["id", "content_hash", "sparse", "num_tokens", "truncated", *passthrough]
        )
        data = data.replace_schema_metadata({FINGERPRINT_KEY: json.dumps(fingerprint).encode()})
        stats["data_file"] = f"{DATA_DIR}/{name}.parquet"
        write_parquet(fs, root, join(root, stats["data_file"]), data, compression)
    if rejects.num_rows:
        table = pa.table(
            {"id": rejects["id"], "source": rejects["_source"], "line": rejects["_line"], "reason": rejects["_reject"], "detail": rejects["_detail"]}
        )
        stats["rejects_file"] = f"{REJECTS_DIR}/{name}.parquet"
        write_parquet(fs, root, join(root, stats["rejects_file"]), table, compression)
    if bad.num_rows:
        stats["bad_file"] = f"{bad['_source'][0].as_py()}: {bad['_detail'][0].as_py()}"
    stats |= {"rejected": json.dumps(Counter(rejects["_reject"].to_pylist())), **data_stats(good)}
    stats["oom_splits"] = int(pc.sum(piece["_oom"]).as_py() or 0) if "_oom" in piece.column_names else 0
    return stats


def data_stats(data: pa.Table) -> dict[str, Any]:
    """The summary's statistics of encoded rows (``sparse``, ``num_tokens``, ``truncated`` columns)."""
    nnz = pc.list_value_length(pc.struct_field(data["sparse"], "indices")).to_numpy()
    return {
        "written": data.num_rows,
        "tokens": int(pc.sum(data["num_tokens"]).as_py() or 0) if data.num_rows else 0,
        "truncated": int(pc.sum(pc.cast(data["truncated"], pa.int64())).as_py() or 0) if data.num_rows else 0,
        "nnz_hist": json.dumps({int(k): int(v) for k, v in zip(*np.unique(nnz, return_counts=True))}),
    }
