"""Committing Parquet files written by hand as a Delta table version, the way a job commits its own."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pyarrow as pa

from pipeline.encode.fingerprint import Fingerprint
from pipeline.output.layout import delta_stats
from pipeline.output.location import OutputLocation
from pipeline.output.records import ENTRY_SCHEMA
from pipeline.output.state import commit_state


def commit_files(folder: Path, files: dict[str, pa.Table], fingerprint: dict[str, Any]) -> int:
    """Commit ``files`` (relative name -> its content, already written under ``folder``) as an
    encode run's version; returns the version."""
    entries = [
        {
            "unit": "synthetic",
            "block": block,
            "block_rows": table.num_rows,
            "last": block == len(files) - 1,
            "rows": table.num_rows,
            "written": table.num_rows,
            "data_file": name,
            "data_size": (folder / name).stat().st_size,
            "data_stats": delta_stats(table),
        }
        for block, (name, table) in enumerate(files.items())
    ]
    record = {"kind": "encode", "fingerprint": fingerprint, "fingerprint_id": Fingerprint.from_dict(fingerprint).id}
    schema = next(iter(files.values())).schema.remove_metadata()
    table = pa.Table.from_pylist(entries, schema=ENTRY_SCHEMA)
    return commit_state(OutputLocation(str(folder)), {}, None, table, record, "synthetic", schema)


def one_row_table(doc_id: str) -> pa.Table:
    """One document with a one-term vector, in the output's columns."""
    from pipeline.encode.sparse import SPARSE_TYPE

    return pa.table(
        {
            "id": pa.array([doc_id], pa.string()),
            "content_hash": pa.array([1], pa.int64()),
            "sparse": pa.array([{"indices": [7], "values": [1.5]}], SPARSE_TYPE),
            "num_tokens": pa.array([3], pa.int32()),
            "truncated": pa.array([False]),
        }
    )
