"""What of an output is committed, and what an interrupted attempt left that a new one may reuse.

    <out>/_commits/<generation>.parquet             the committed output: one row per file
    <out>/_progress/<generation>/<attempt>-<n>.parquet  blocks finished by attempts not yet committed

Object storage has no atomic rename, but an object appears whole once its upload completes;
local files are written aside and renamed. So every file here, data or record, is either
absent or complete. A progress segment lists only files already durable; a commit lists only
files already durable; the newest commit is the truth. Files no commit lists (an interrupted
attempt's) are never data: readers go through :func:`committed_files`, and the next commit
deletes them.

An entry (one row of a progress segment or a commit) describes one written piece of one block
of one unit of work: the unit (an input file under one config, see :func:`unit_key`), the
block, how many rows of it the piece holds, its data and rejects files (relative to the
output root) and the statistics the summary is computed from.
"""

from __future__ import annotations

import hashlib
import json
import time
import uuid
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from pipeline.output.location import TMP_DIR, OutputError, OutputLocation

COMMITS_DIR = "_commits"
PROGRESS_DIR = "_progress"
META_KEY = b"splade_pipeline.commit"
ENTRY_SCHEMA = pa.schema(
    [
        ("unit", pa.string()),
        ("url", pa.string()),
        ("shard", pa.int32()),
        ("block", pa.int32()),
        ("block_rows", pa.int32()),
        ("last", pa.bool_()),
        ("rows", pa.int64()),
        ("written", pa.int64()),
        ("rejected", pa.string()),
        ("tokens", pa.int64()),
        ("truncated", pa.int64()),
        ("nnz_hist", pa.string()),
        ("bad_file", pa.string()),
        ("data_file", pa.string()),
        ("rejects_file", pa.string()),
        ("attempt", pa.string()),
        ("oom_splits", pa.int64()),
    ]
)


def unit_key(*parts: Any) -> str:
    """A stable name for a unit of work: the same input file under the same config, same name."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


@dataclass(frozen=True)
class Commit:
    generation: int
    entries: pa.Table
    meta: dict[str, Any]


def _generation_of(path: str) -> int | None:
    stem = path.rsplit("/", 1)[-1].removesuffix(".parquet")
    return int(stem) if stem.isdigit() else None


def latest_commit(loc: OutputLocation) -> Commit | None:
    loc.refresh(COMMITS_DIR)  # another process may have committed since this client last listed
    if not loc.is_folder(COMMITS_DIR):
        return None
    found = [(g, p) for p in loc.listing(COMMITS_DIR) if (g := _generation_of(p)) is not None]
    if not found:
        return None
    generation, rel = max(found)
    entries, meta = _read_entries(loc, rel)
    return Commit(generation, entries, meta)


def _read_entries(loc: OutputLocation, rel: str) -> tuple[pa.Table, dict[str, Any]]:
    table = loc.read_parquet(rel)
    meta = json.loads((table.schema.metadata or {}).get(META_KEY, b"{}"))
    for field in ENTRY_SCHEMA:  # records written before a column existed
        if field.name not in table.column_names:
            table = table.append_column(field, pa.nulls(table.num_rows, field.type))
    return table.select(ENTRY_SCHEMA.names).replace_schema_metadata(None).cast(ENTRY_SCHEMA), meta


def _with_meta(entries: pa.Table, meta: dict[str, Any]) -> pa.Table:
    return entries.cast(ENTRY_SCHEMA).replace_schema_metadata({META_KEY: json.dumps(meta).encode()})


def write_commit(loc: OutputLocation, generation: int, entries: pa.Table, meta: dict[str, Any]) -> None:
    """Make ``entries`` the committed output: one object, written after every file it lists."""
    loc.write_parquet(f"{COMMITS_DIR}/{generation:08d}.parquet", _with_meta(entries, meta))


def read_progress(loc: OutputLocation, generation: int) -> list[tuple[pa.Table, dict[str, Any]]]:
    loc.refresh(PROGRESS_DIR)
    return [_read_entries(loc, p) for p in loc.files(f"{PROGRESS_DIR}/{generation:08d}") if p.endswith(".parquet")]


class Progress:
    """Records what an attempt has written, in segments flushed at most every ``interval_s``."""

    def __init__(self, loc: OutputLocation, generation: int, meta: dict[str, Any], interval_s: float) -> None:
        self.loc, self.meta, self.interval_s = loc, meta, interval_s
        self.folder = f"{PROGRESS_DIR}/{generation:08d}"
        self.attempt = f"{time.strftime('%Y%m%dT%H%M%S')}-{uuid.uuid4().hex[:8]}"
        self.pending: list[pa.Table] = []
        self.done: list[pa.Table] = []
        self.segments = 0
        self.last_flush = time.monotonic()

    def add(self, entries: pa.Table) -> bool:
        """Take the entries of files just written; True when a segment was flushed."""
        if entries.num_rows:
            entries = entries.cast(ENTRY_SCHEMA)
            stamp = pa.array([self.attempt] * entries.num_rows, pa.string())
            self.pending.append(entries.set_column(entries.schema.get_field_index("attempt"), "attempt", stamp))
        if time.monotonic() - self.last_flush >= self.interval_s:
            return self.flush()
        return False

    def flush(self) -> bool:
        self.last_flush = time.monotonic()
        if not self.pending:
            return False
        table = pa.concat_tables(self.pending)
        self.loc.write_parquet(
            f"{self.folder}/{self.attempt}-{self.segments:06d}.parquet", _with_meta(table, self.meta)
        )
        self.done.append(table)
        self.pending, self.segments = [], self.segments + 1
        return True

    def entries(self) -> pa.Table:
        return pa.concat_tables([empty_entries(), *self.done, *self.pending])


def empty_entries() -> pa.Table:
    return ENTRY_SCHEMA.empty_table()


def complete_blocks(entries: pa.Table) -> pa.Table:
    """The entries of complete blocks: for each (unit, block), the newest attempt whose pieces hold
    all of the block's rows (an attempt that redid a block may have cut it differently)."""
    entries = entries.filter(pc.is_null(entries["bad_file"]))
    if not entries.num_rows:
        return entries
    entries = _dedupe_pieces(entries)  # a piece recorded twice (flushed twice) counts once
    keys = ["unit", "block", "attempt"]
    sums = entries.group_by(keys).aggregate([("rows", "sum"), ("block_rows", "max")])
    sums = sums.filter(pc.equal(sums["rows_sum"], pc.cast(sums["block_rows_max"], pa.int64())))
    best = sums.group_by(["unit", "block"]).aggregate([("attempt", "max")]).rename_columns(keys)
    return entries.join(best, keys, join_type="inner").select(ENTRY_SCHEMA.names).cast(ENTRY_SCHEMA)


def _dedupe_pieces(entries: pa.Table) -> pa.Table:
    entries = entries.set_column(
        entries.schema.get_field_index("attempt"), "attempt", pc.fill_null(entries["attempt"], "")
    )
    key = pc.binary_join_element_wise(
        entries["unit"],
        pc.cast(entries["block"], pa.string()),
        entries["attempt"],
        pc.fill_null(entries["data_file"], ""),
        pc.fill_null(entries["rejects_file"], ""),
        "|",
    )
    first = (
        pa.table({"k": key, "i": pa.array(range(entries.num_rows), pa.int64())}).group_by("k").aggregate([("i", "min")])
    )
    return entries.take(pc.sort_indices(first["i_min"]))


def complete_units(entries: pa.Table) -> set[str]:
    """Units all of whose blocks are committed: blocks 0..n are complete and block n was the last."""
    blocks = complete_blocks(entries)
    per_unit = blocks.group_by("unit").aggregate([("block", "count_distinct"), ("block", "max"), ("last", "any")])
    bad = set(entries.filter(pc.is_valid(entries["bad_file"]))["unit"].to_pylist())
    return {
        row["unit"]
        for row in per_unit.to_pylist()
        if row["last_any"] and row["block_count_distinct"] == row["block_max"] + 1 and row["unit"] not in bad
    }


def listed_files(entries: pa.Table) -> set[str]:
    return {f for column in ("data_file", "rejects_file") for f in entries[column].to_pylist() if f}


def clean(loc: OutputLocation, keep: pa.Table, generation: int, folders: tuple[str, ...]) -> int:
    """After commit ``generation``: delete files in ``folders`` it does not list, the progress
    records and older commits. Returns the number of files deleted."""
    wanted = listed_files(keep)
    loc.refresh()  # Ray workers wrote files this client has not seen listed
    doomed = [rel for folder in folders for rel in loc.files(folder) if rel not in wanted]
    if loc.is_folder(COMMITS_DIR):
        doomed += [p for p in loc.listing(COMMITS_DIR) if (g := _generation_of(p)) is not None and g < generation]
    for extra in (PROGRESS_DIR, TMP_DIR):
        doomed += loc.files(extra)
    loc.remove(doomed)
    for extra in (PROGRESS_DIR, TMP_DIR):
        if loc.exists(extra):
            loc.remove_folder(extra)
    return len(doomed)


def committed_files(output: str, storage_options: dict[str, Any] | None = None, kind: str = "data_file") -> list[str]:
    """URLs of the committed data files of ``output`` (``kind="rejects_file"``: the rejects).

    Read the output through this (or the newest ``_commits/*.parquet``) while a run may be in
    progress: files an unfinished attempt wrote are not committed until its commit lists them.
    """
    loc = OutputLocation(output, storage_options)
    commit = latest_commit(loc)
    if commit is None:
        raise OutputError(f"{output}: no committed output here (no {COMMITS_DIR}/ record); was the run finished?")
    return [loc.url_of(f) for f in commit.entries[kind].to_pylist() if f]
