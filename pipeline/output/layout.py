"""The output layout and how one block of encoded rows becomes files.

    <output>/                       a Delta table (pipeline.output.table): the committed vectors
    <output>/_delta_log/            its log: one JSON file per version, checkpoints
    <output>/data/part-<unit>-<block>[-<line>]-<attempt>.parquet
                                    id, content_hash, sparse, num_tokens, truncated, passthrough
    <output>/_rejects/              a second Delta table: id, source, line, reason, detail
    <output>/_splade/entries/       per committed state, the entries of its files (pipeline.output.records)
    <output>/_splade/stores/        per vector store, the table version it was loaded from
    <output>/_SUMMARY.json          the last run's summary

File names carry the unit of work (the input file, its version and the config: see
:func:`pipeline.output.records.unit_key`), the block within it and the attempt that wrote it:
two runs never write the same name, and a file's content never changes under its name. Folders
starting with ``_`` are not part of the table (Delta readers and ``vacuum`` pass them by).
"""

from __future__ import annotations

import json
from collections import Counter
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.encode.fingerprint import Fingerprint
from pipeline.encode.sparse import SPARSE_TYPE
from pipeline.output.location import OutputLocation
from pipeline.output.records import ENTRY_SCHEMA, footer_entry
from pipeline.redaction import scrub
from pipeline.sources import BAD_FILE

DATA_DIR = "data"
REJECTS_DIR = "_rejects"
SUMMARY_FILE = "_SUMMARY.json"
REPORT_FILE = "_REPORT.html"  # the run report (pipeline.report), beside the summary
FINGERPRINT_KEY = b"splade_pipeline.fingerprint"
WINDOWS = "_windows"  # per encoded row: the windows its vector pools (long_documents max), else 1
OOM_SPLITS = "_oom_splits"  # per encoded block, on its first row: micro-batches halved after running out of memory
DATA_COLUMNS = ["id", "content_hash", "sparse", "num_tokens", "truncated"]
SPLIT = "_split"  # long_documents split, per encoded document: its windows (vector, tokens, characters)
SPLIT_TYPE = pa.list_(
    pa.struct(
        [("sparse", SPARSE_TYPE), ("num_tokens", pa.int32()), ("start_char", pa.int64()), ("end_char", pa.int64())]
    )
)
# long_documents split: the data files' columns after DATA_COLUMNS (one row per window, id <parent_id>#<window>)
WINDOW_COLUMNS = [
    ("parent_id", pa.string()),
    ("window", pa.int32()),
    ("start_char", pa.int64()),
    ("end_char", pa.int64()),
]

WINDOW_MARK = "#"  # long_documents split: the window of document <id> numbered k is <id>#<k>
SPLIT_ID_DETAIL = (
    "encoder.long_documents is 'split', which names each window <id>#<k>: an id holding '#' could take the name "
    "of another document's window; map ids without '#' (or use 'max' or 'truncate')"
)


def document_column(split: bool) -> str:
    """The data files' column naming each row's document: ``parent_id`` for split outputs, else ``id``."""
    return "parent_id" if split else "id"


REJECTS_SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("source", pa.string()),
        ("line", pa.int64()),
        ("reason", pa.string()),
        ("detail", pa.string()),
    ]
)
OWN_FOLDERS = (DATA_DIR, REJECTS_DIR, "_splade", "_delta_log")


def foreign_files(loc: OutputLocation) -> list[str]:
    """Files under the output that are not splade-pipeline's (its folders and summary aside)."""
    with loc.failures_named():
        return [
            p for p in loc.files() if p.split("/", 1)[0] not in OWN_FOLDERS and p not in (SUMMARY_FILE, REPORT_FILE)
        ]


def write_summary(loc: OutputLocation, summary: dict[str, Any]) -> None:
    loc.overwrite(SUMMARY_FILE, scrub(json.dumps(summary, indent=2)).encode())


def pooled_length(fingerprint: Fingerprint) -> int | None:
    """The window length of an output whose vectors pool windows (long_documents max), else None."""
    return fingerprint.max_length if fingerprint.long_documents == "max" else None


def fingerprint_metadata(fingerprint: Fingerprint) -> dict[bytes, bytes]:
    """The key-value metadata of every data file: the fingerprint of its vectors."""
    return {FINGERPRINT_KEY: json.dumps(fingerprint.to_dict()).encode()}


def compression_of(name: str) -> str | None:
    return None if name == "none" else name


class BlockWriter:
    """Writes the data and rejects files of encoded blocks into one output (see the module docstring)."""

    def __init__(
        self, loc: OutputLocation, compression: str, fingerprint: Fingerprint, passthrough: list[str], attempt: str
    ) -> None:
        self.loc, self.compression, self.passthrough = loc, compression_of(compression), passthrough
        self.attempt = attempt
        self.metadata = fingerprint_metadata(fingerprint)

    def write(self, table: pa.Table) -> pa.Table:
        """Write the files of every (unit, block) in ``table``; return their entries (stats)."""
        rows = []
        keys = table.select(["_unit", "_block"]).group_by(["_unit", "_block"]).aggregate([]).to_pylist()
        for key in keys:
            same_unit = pc.equal(table["_unit"], key["_unit"])
            piece = table.filter(pc.and_(same_unit, pc.equal(table["_block"], key["_block"])))
            rows.append(self._write_piece(piece))
        return pa.Table.from_pylist(rows, schema=ENTRY_SCHEMA)

    def _write_piece(self, piece: pa.Table) -> dict[str, Any]:
        first = {c: piece[c][0].as_py() for c in ("_unit", "_source", "_shard", "_block", "_block_rows")}
        reason = piece["_reject"]
        marker = pc.fill_null(pc.equal(reason, BAD_FILE), False)
        good = piece.filter(pc.is_null(reason))
        rejects = piece.filter(pc.and_(pc.is_valid(reason), pc.invert(marker)))
        bad = piece.filter(marker)
        # A block split across batches by Ray gets one file per piece, named by its first line.
        name = f"part-{first['_unit']}-{first['_block']:06d}"
        if piece.num_rows != first["_block_rows"]:
            name += f"-{pc.min(piece['_line']).as_py()}"
        name += f"-{self.attempt}"
        stats: dict[str, Any] = {
            "unit": first["_unit"],
            "url": first["_source"],
            "shard": first["_shard"],
            "block": first["_block"],
            "block_rows": first["_block_rows"],
            "last": bool(pc.any(piece["_last"]).as_py()),
            "rows": piece.num_rows - bad.num_rows,
            "data_file": None,
            "data_stats": None,
            "rejects_file": None,
            "rejects_stats": None,
            "bad_file": None,
            "attempt": self.attempt,
        }
        data = rejected = None
        if good.num_rows:
            data = good.select(["id", "_hash", *DATA_COLUMNS[2:], *self.passthrough])
            data = data.rename_columns([*DATA_COLUMNS, *self.passthrough])
            if SPLIT in good.column_names and good[SPLIT].null_count < good.num_rows:
                data = window_rows(data, good[SPLIT], self.passthrough)
            stats["data_file"], stats["data_stats"] = f"{DATA_DIR}/{name}.parquet", delta_stats(data)
        if rejects.num_rows:
            rejected = rejects_table(rejects)
            stats["rejects_file"], stats["rejects_stats"] = f"{REJECTS_DIR}/{name}.parquet", delta_stats(rejected)
        if bad.num_rows:
            stats["bad_file"] = f"{bad['_source'][0].as_py()}: {bad['_detail'][0].as_py()}"
        stats |= {"rejected": json.dumps(Counter(rejects["_reject"].to_pylist()))}
        stats |= data_stats(good if data is None or "parent_id" not in data.column_names else data)
        stats["oom_splits"] = int(pc.sum(piece[OOM_SPLITS]).as_py() or 0) if OOM_SPLITS in piece.column_names else 0
        footer = footer_entry(stats)  # each file describes itself: a re-run finds it without any record
        if data is not None:
            meta = self.metadata | footer
            stats["data_size"] = self.loc.write_parquet(
                stats["data_file"], data.replace_schema_metadata(meta), self.compression
            )
        if rejected is not None:
            stats["rejects_size"] = self.loc.write_parquet(
                stats["rejects_file"], rejected.replace_schema_metadata(footer), self.compression
            )
        return stats


def window_rows(documents: pa.Table, split: pa.ChunkedArray, passthrough: list[str]) -> pa.Table:
    """One row per window of ``documents`` (``split``: their windows): id ``<id>#<k>``, the document's
    content hash and passthrough columns, the window's vector, tokens and characters."""
    split = split.combine_chunks()
    counts = pc.list_value_length(split).to_numpy(zero_copy_only=False)
    take = pa.array(np.repeat(np.arange(documents.num_rows), counts), pa.int64())
    parent = documents.take(take)
    items = pc.list_flatten(split)
    starts = np.repeat(np.cumsum(counts) - counts, counts)
    window = pa.array(np.arange(len(take)) - starts, pa.int32())
    ids = pc.binary_join_element_wise(parent["id"], pc.cast(window, pa.string()), "#")
    columns = {
        "id": ids,
        "content_hash": parent["content_hash"],
        "sparse": pc.struct_field(items, "sparse"),
        "num_tokens": pc.struct_field(items, "num_tokens"),
        "truncated": pa.array(np.zeros(len(take), bool)),
        "parent_id": parent["id"],
        "window": window,
        "start_char": pc.struct_field(items, "start_char"),
        "end_char": pc.struct_field(items, "end_char"),
    }
    return pa.table(columns | {c: parent[c] for c in passthrough})


def copy_without(
    loc: OutputLocation, old: str, drop: pa.Array, new: str, metadata: dict[bytes, bytes], compression: str | None
) -> tuple[str, int, pa.Table] | None:
    """Write a copy of data file ``old`` without the rows at positions ``drop`` as ``new`` (none
    when no row is left); return its name, size and rows."""
    table = loc.read_parquet(old)
    table = table.filter(pc.invert(pc.is_in(pa.array(range(table.num_rows), drop.type), drop)))
    if not table.num_rows:
        return None
    return new, loc.write_parquet(new, table.replace_schema_metadata(metadata), compression), table


def rejects_table(rejects: pa.Table) -> pa.Table:
    """The rejects file's columns from rows carrying the reader's bookkeeping columns."""
    columns = {"id": "id", "source": "_source", "line": "_line", "reason": "_reject", "detail": "_detail"}
    return pa.table({name: rejects[column] for name, column in columns.items()}).cast(REJECTS_SCHEMA)


def delta_stats(table: pa.Table) -> str:
    """Delta file statistics: the row count, nulls per top-level column, and min/max of the integer
    columns (string bounds are left out: Delta truncates them, and a wrong bound skips a file)."""
    nulls = {f.name: table[f.name].null_count for f in table.schema if not pa.types.is_nested(f.type)}
    ints = [f.name for f in table.schema if pa.types.is_integer(f.type) and table[f.name].null_count < table.num_rows]
    bounds = {name: pc.min_max(table[name]).as_py() for name in ints}
    return json.dumps(
        {
            "numRecords": table.num_rows,
            "minValues": {name: b["min"] for name, b in bounds.items()},
            "maxValues": {name: b["max"] for name, b in bounds.items()},
            "nullCount": nulls,
        }
    )


def data_stats(data: pa.Table, pooled: int | None = None) -> dict[str, Any]:
    """The summary's statistics of encoded rows (``sparse``, ``num_tokens``, ``truncated`` columns): with
    ``parent_id`` (long_documents split), rows are windows, and documents are counted by parent.

    ``pooled``: the max_length of a long_documents max output read back from its files (no
    ``_windows`` column there): every window but a document's last holds max_length tokens, so its
    windows are ``ceil(num_tokens / max_length)``."""
    nnz = pc.list_value_length(pc.struct_field(data["sparse"], "indices")).to_numpy()
    split = "parent_id" in data.column_names
    windows = data.num_rows
    if WINDOWS in data.column_names:
        windows = int(pc.sum(data[WINDOWS]).as_py() or 0)
    elif pooled and data.num_rows:
        windows = int(np.sum(-(-data["num_tokens"].to_numpy(zero_copy_only=False).astype(np.int64) // pooled)))
    return {
        "written": int(pc.count_distinct(data["parent_id"]).as_py()) if split else data.num_rows,
        "tokens": int(pc.sum(data["num_tokens"]).as_py() or 0) if data.num_rows else 0,
        "windows": windows,
        "truncated": int(pc.sum(pc.cast(data["truncated"], pa.int64())).as_py() or 0) if data.num_rows else 0,
        "nnz_hist": json.dumps({int(k): int(v) for k, v in zip(*np.unique(nnz, return_counts=True), strict=True)}),
    }
