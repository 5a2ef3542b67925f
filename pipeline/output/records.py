"""What a run wrote, file by file: the entries a commit records and a re-run reuses.

An entry describes one written piece of one block of one unit of work: the unit (an input file
under one config, see :func:`unit_key`), the block, how many rows of it the piece holds, its
data and rejects files (relative to the output root), their sizes and Delta statistics, and the
statistics the summary is computed from.

Each file carries its own entry in its Parquet footer (:data:`ENTRY_KEY`), and a file is
either absent or complete (see :mod:`pipeline.output.location`). So a run killed at any point,
even before anything was committed, left files that describe themselves: a re-run lists the
files no commit references, reads their footers only, and reuses every complete block
(:func:`entries_on_disk`). A commit writes the entries of the whole table state it commits in
one Parquet file under ``_splade/entries/`` and names it in its commit info: the summary and
the next run's plan read that file, not every footer.
"""

from __future__ import annotations

import hashlib
import json
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline.output.location import OutputLocation

ENTRIES_DIR = "_splade/entries"
ENTRY_KEY = b"splade_pipeline.entry"
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
        ("data_size", pa.int64()),
        ("data_stats", pa.string()),
        ("rejects_file", pa.string()),
        ("rejects_size", pa.int64()),
        ("rejects_stats", pa.string()),
        ("attempt", pa.string()),
        ("oom_splits", pa.int64()),
        ("windows", pa.int64()),  # windows encoded (long_documents max: several per document)
    ]
)


def new_attempt() -> str:
    """A name for one attempt of one run: in its files' names, its entries and its commit."""
    return f"{time.strftime('%Y%m%dT%H%M%S', time.gmtime())}-{uuid.uuid4().hex[:8]}"


def unit_key(*parts: Any) -> str:
    """A stable name for a unit of work: the same input file under the same config, same name."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


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
    return first_of_each(entries, key)


def first_of_each(table: pa.Table, key: pa.ChunkedArray | pa.Array) -> pa.Table:
    """The first row of ``table`` for each value of ``key``, in table order."""
    if not table.num_rows:
        return table
    rows = pa.table({"k": key, "i": pa.array(range(table.num_rows), pa.int64())})
    first = rows.group_by("k").aggregate([("i", "min")])["i_min"]
    return table.take(pc.take(first, pc.sort_indices(first)))


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


def write_entries(loc: OutputLocation, attempt: str, entries: pa.Table) -> str:
    """Write the entries of a table state about to be committed; returns the file (relative)."""
    rel = f"{ENTRIES_DIR}/{attempt}.parquet"
    loc.write_parquet(rel, entries.cast(ENTRY_SCHEMA))
    return rel


def read_entries(loc: OutputLocation, rel: str) -> pa.Table:
    return _conform(loc.read_parquet(rel))


def _conform(table: pa.Table) -> pa.Table:
    for field in ENTRY_SCHEMA:  # records written before a column existed
        if field.name not in table.column_names:
            table = table.append_column(field, pa.nulls(table.num_rows, field.type))
    return table.select(ENTRY_SCHEMA.names).replace_schema_metadata(None).cast(ENTRY_SCHEMA)


def footer_entry(entry: dict[str, Any]) -> dict[bytes, bytes]:
    """The key-value metadata a written file carries: its own entry (sizes are the listing's)."""
    return {ENTRY_KEY: json.dumps({k: v for k, v in entry.items() if not k.endswith("_size")}).encode()}


def entries_on_disk(loc: OutputLocation, folders: tuple[str, ...], skip: set[str], units: set[str]) -> pa.Table:
    """Entries of the files under ``folders`` that no commit references (``skip``) and that belong
    to ``units`` (file names start ``part-<unit>-``), read from their footers; an entry counts
    only where every file it names exists, sizes taken from the listing."""
    sizes: dict[str, int] = {}
    loc.refresh()
    for folder in folders:
        sizes |= loc.sizes(folder)
    wanted = [rel for rel in sizes if rel not in skip and unit_of(rel) in units]

    def one(rel: str) -> dict[str, Any] | None:
        with loc.open(rel) as fh:
            meta = pq.read_schema(fh).metadata or {}
        raw = meta.get(ENTRY_KEY)
        return json.loads(raw) if raw else None

    with ThreadPoolExecutor(16) as pool:
        found = [e for e in pool.map(one, wanted) if e is not None]
    rows = []
    for entry in found:
        named = [entry.get("data_file"), entry.get("rejects_file")]
        if all(f is None or f in sizes for f in named):
            entry["data_size"] = sizes.get(entry.get("data_file") or "")
            entry["rejects_size"] = sizes.get(entry.get("rejects_file") or "")
            rows.append(entry)
    table = pa.Table.from_pylist(rows, schema=ENTRY_SCHEMA) if rows else empty_entries()
    return _dedupe_pieces(table) if table.num_rows else table


def unit_of(rel: str) -> str | None:
    name = rel.rsplit("/", 1)[-1]
    return name.split("-", 2)[1] if name.startswith("part-") and name.count("-") >= 2 else None


def rejected_rows(entries: pa.Table) -> int:
    """The rows that ``entries`` (one per written block) say were rejected."""
    return sum(sum(json.loads(r or "{}").values()) for r in entries["rejected"].to_pylist())
