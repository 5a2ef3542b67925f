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
import io
import json
import time
import uuid
from dataclasses import dataclass
from typing import Any

import fsspec
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline.storage import url_to_fs

COMMITS_DIR = "_commits"
PROGRESS_DIR = "_progress"
TMP_DIR = "_tmp"
META_KEY = b"splade_pipeline.commit"
ENTRY_SCHEMA = pa.schema(
    [
        ("unit", pa.string()), ("url", pa.string()), ("shard", pa.int32()), ("block", pa.int32()),
        ("block_rows", pa.int32()), ("last", pa.bool_()), ("rows", pa.int64()), ("written", pa.int64()),
        ("rejected", pa.string()), ("tokens", pa.int64()), ("truncated", pa.int64()), ("nnz_hist", pa.string()),
        ("bad_file", pa.string()), ("data_file", pa.string()), ("rejects_file", pa.string()), ("attempt", pa.string()),
        ("oom_splits", pa.int64()),
    ]
)  # fmt: skip


def join(root: str, *parts: str) -> str:
    return "/".join([root.rstrip("/"), *parts])


def ensure_folder(fs: fsspec.AbstractFileSystem, path: str) -> None:
    """Create a local folder; object stores have no folders (and a bucket is never created implicitly)."""
    if is_local(fs):
        fs.makedirs(path, exist_ok=True)


def is_local(fs: fsspec.AbstractFileSystem) -> bool:
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    return protocol in ("file", "local")


def write_bytes(fs: fsspec.AbstractFileSystem, root: str, path: str, data: bytes) -> None:
    """Write ``data`` so that ``path`` is either absent or complete, whatever happens meanwhile."""
    if not is_local(fs):
        # One PUT (or a multipart upload completed on close): the object appears whole or not at all.
        with fs.open(path, "wb") as fh:
            fh.write(data)
        return
    tmp = join(root, TMP_DIR, uuid.uuid4().hex)
    fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
    fs.makedirs(tmp.rsplit("/", 1)[0], exist_ok=True)
    with fs.open(tmp, "wb") as fh:
        fh.write(data)
    fs.mv(tmp, path)  # a rename on one local filesystem: atomic


def write_parquet(fs: fsspec.AbstractFileSystem, root: str, path: str, table: pa.Table, compression: str | None = "zstd") -> None:
    buf = io.BytesIO()
    pq.write_table(table, buf, compression=compression)
    write_bytes(fs, root, path, buf.getvalue())


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


def latest_commit(fs: fsspec.AbstractFileSystem, root: str) -> Commit | None:
    folder = join(root, COMMITS_DIR)
    fs.invalidate_cache(folder)  # another process may have committed since this client last listed
    if not fs.isdir(folder):
        return None
    found = [(g, p) for p in fs.ls(folder, detail=False) if (g := _generation_of(p)) is not None]
    if not found:
        return None
    generation, path = max(found)
    entries, meta = _read_entries(fs, path)
    return Commit(generation, entries, meta)


def _read_entries(fs: fsspec.AbstractFileSystem, path: str) -> tuple[pa.Table, dict[str, Any]]:
    with fs.open(path, "rb") as fh:
        table = pq.read_table(fh)
    meta = json.loads((table.schema.metadata or {}).get(META_KEY, b"{}"))
    for field in ENTRY_SCHEMA:  # records written before a column existed
        if field.name not in table.column_names:
            table = table.append_column(field, pa.nulls(table.num_rows, field.type))
    return table.select(ENTRY_SCHEMA.names).replace_schema_metadata(None).cast(ENTRY_SCHEMA), meta


def _with_meta(entries: pa.Table, meta: dict[str, Any]) -> pa.Table:
    return entries.cast(ENTRY_SCHEMA).replace_schema_metadata({META_KEY: json.dumps(meta).encode()})


def write_commit(fs: fsspec.AbstractFileSystem, root: str, generation: int, entries: pa.Table, meta: dict[str, Any]) -> None:
    """Make ``entries`` the committed output: one object, written after every file it lists."""
    write_parquet(fs, root, join(root, COMMITS_DIR, f"{generation:08d}.parquet"), _with_meta(entries, meta))


def read_progress(fs: fsspec.AbstractFileSystem, root: str, generation: int) -> list[tuple[pa.Table, dict[str, Any]]]:
    folder = join(root, PROGRESS_DIR, f"{generation:08d}")
    fs.invalidate_cache(join(root, PROGRESS_DIR))
    if not fs.isdir(folder):
        return []
    return [_read_entries(fs, p) for p in sorted(fs.find(folder)) if p.endswith(".parquet")]


class Progress:
    """Records what an attempt has written, in segments flushed at most every ``interval_s``."""

    def __init__(self, fs: fsspec.AbstractFileSystem, root: str, generation: int, meta: dict[str, Any], interval_s: float) -> None:
        self.fs, self.root, self.meta, self.interval_s = fs, root, meta, interval_s
        self.folder = join(root, PROGRESS_DIR, f"{generation:08d}")
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
        path = join(self.folder, f"{self.attempt}-{self.segments:06d}.parquet")
        write_parquet(self.fs, self.root, path, _with_meta(table, self.meta))
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
    entries = entries.set_column(entries.schema.get_field_index("attempt"), "attempt", pc.fill_null(entries["attempt"], ""))
    key = pc.binary_join_element_wise(
        entries["unit"], pc.cast(entries["block"], pa.string()), entries["attempt"], pc.fill_null(entries["data_file"], ""),
        pc.fill_null(entries["rejects_file"], ""), "|",
    )  # fmt: skip
    first = pa.table({"k": key, "i": pa.array(range(entries.num_rows), pa.int64())}).group_by("k").aggregate([("i", "min")])
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


def clean(fs: fsspec.AbstractFileSystem, root: str, keep: pa.Table, generation: int, folders: tuple[str, ...]) -> int:
    """After commit ``generation``: delete files in ``folders`` it does not list, the progress
    records and older commits. Returns the number of files deleted."""
    wanted = {fs._strip_protocol(join(root, f)) for f in listed_files(keep)}
    fs.invalidate_cache(root)  # Ray workers wrote files this client has not seen listed
    doomed = []
    for folder in folders:
        path = join(root, folder)
        if fs.isdir(path):
            doomed += [p for p in fs.find(path) if fs._strip_protocol(p) not in wanted]
    commits = join(root, COMMITS_DIR)
    doomed += [p for p in fs.ls(commits, detail=False) if (g := _generation_of(p)) is not None and g < generation]
    for extra in (PROGRESS_DIR, TMP_DIR):
        if fs.isdir(join(root, extra)):
            doomed += fs.find(join(root, extra))
    if doomed:
        fs.rm(doomed)
    for extra in (PROGRESS_DIR, TMP_DIR):
        if fs.exists(join(root, extra)):
            try:
                fs.rm(join(root, extra), recursive=True)
            except FileNotFoundError:  # object stores have no empty folders to remove
                pass
    return len(doomed)


def committed_files(output: str, storage_options: dict[str, Any] | None = None, kind: str = "data_file") -> list[str]:
    """URLs of the committed data files of ``output`` (``kind="rejects_file"``: the rejects).

    Read the output through this (or the newest ``_commits/*.parquet``) while a run may be in
    progress: files an unfinished attempt wrote are not committed until its commit lists them.
    """
    fs, root = url_to_fs(output, storage_options)
    commit = latest_commit(fs, root)
    if commit is None:
        raise ValueError(f"{output}: no committed output here (no {COMMITS_DIR}/ record); was the run finished?")
    return [fs.unstrip_protocol(join(root, f)) for f in commit.entries[kind].to_pylist() if f]
