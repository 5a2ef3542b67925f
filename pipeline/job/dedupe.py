"""One rule for duplicate ids, the same in the encoding job, reindex and every store load: the
first row of an id in corpus order (input files in their listed order, then line) is the
document; every later row of that id is rejected as ``duplicate_id`` (file named, counted), so
the table holds each id once and a store loaded from it holds what the table holds.

Reindex applies the rule to its scan (:func:`pipeline.job.reindex.compare`). The encoding job
writes blocks in parallel, so it applies the rule after writing and before committing
(:func:`drop_later_duplicates`): only the ``id`` column of the written files is read (on the
driver up to :data:`DRIVER_MAX_ROWS` rows, else by a Ray group-by), and only the files holding
a later duplicate are replaced by copies without it. Their rejects go into the replacing entry's
rejects file, so the entry still accounts for every row of its block.
"""

from __future__ import annotations

import json
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from pipeline.output.layout import (
    DATA_DIR,
    REJECTS_DIR,
    REJECTS_SCHEMA,
    compression_of,
    copy_without,
    data_stats,
    delta_stats,
)
from pipeline.output.location import OutputLocation
from pipeline.output.records import ENTRY_SCHEMA, unit_key

DRIVER_MAX_ROWS = 5_000_000
DUPLICATE = "duplicate_id"
POSITIONS = pa.schema([("id", pa.string()), ("file", pa.string()), ("pos", pa.int64())])


def drop_later_duplicates(
    loc: OutputLocation,
    entries: pa.Table,
    urls: list[str],
    attempt: str,
    compression: str,
    metadata: dict[bytes, bytes],
) -> pa.Table:
    """``entries`` with every later row of an id (order: ``urls``, block, line) moved from its data
    file to its rejects file (copies written under ``attempt``); the entries of other files as they are."""
    files = [f for f in entries["data_file"].to_pylist() if f]
    if not files:
        return entries
    for folder in (DATA_DIR, REJECTS_DIR):
        loc.refresh(folder)  # files Ray workers wrote since this client last listed the folder
    written = int(pc.sum(entries["written"]).as_py() or 0)
    found = _positions_on_driver(loc, files) if written <= DRIVER_MAX_ROWS else _positions_on_cluster(loc, files)
    if not found.num_rows:
        return entries
    later = _later_rows(found, entries, urls)
    rows = entries.to_pylist()
    by_file = {r["data_file"]: i for i, r in enumerate(rows) if r["data_file"]}
    first_in = _first_files(found, later)

    def replace(item: tuple[str, pa.Table]) -> tuple[int, dict[str, Any]]:
        rel, drop = item
        i = by_file[rel]
        return i, _replaced(loc, rows[i], drop, first_in, attempt, compression_of(compression), metadata)

    groups = later.group_by("file").aggregate([("pos", "list"), ("id", "list")])
    items = [
        (f, pa.table({"pos": p, "id": d}))
        for f, p, d in zip(groups["file"].to_pylist(), groups["pos_list"].to_pylist(), groups["id_list"].to_pylist())
    ]
    with ThreadPoolExecutor(8) as pool:
        for i, row in pool.map(replace, items):
            rows[i] = row
    return pa.Table.from_pylist(rows, schema=ENTRY_SCHEMA)


def _positions_on_driver(loc: OutputLocation, files: list[str]) -> pa.Table:
    """``(id, file, pos)`` of every row whose id occurs more than once in ``files``."""

    def one(rel: str) -> pa.Table:
        ids = loc.read_parquet(rel, columns=["id"])["id"]
        return pa.table({"id": ids, "file": pa.array([rel] * len(ids)), "pos": pa.array(range(len(ids)), pa.int64())})

    with ThreadPoolExecutor(16) as pool:
        every = pa.concat_tables([POSITIONS.empty_table(), *pool.map(one, files)])
    counts = every.group_by("id").aggregate([("id", "count")])
    repeated = counts.filter(pc.greater(counts["id_count"], 1))["id"]
    return every.filter(pc.is_in(every["id"], repeated))


def _positions_on_cluster(loc: OutputLocation, files: list[str]) -> pa.Table:
    """The same, with the ids grouped by Ray (the driver gets only the repeated ids and their rows)."""
    import pyarrow.fs as pafs
    import ray
    from ray.data.expressions import col

    filesystem = pafs.PyFileSystem(pafs.FSSpecHandler(loc.fs))
    partitions = max(1, min(200, len(files) // 16))  # each is a task; the ids column is small
    ids = ray.data.read_parquet([loc.path(f) for f in files], filesystem=filesystem).select_columns(["id"])
    counts = ids.groupby("id", num_partitions=partitions).count()
    repeated = counts.filter(expr=col("count()") > 1).select_columns(["id"]).take_all()
    if not repeated:
        return POSITIONS.empty_table()
    wanted = ray.put(pa.array([r["id"] for r in repeated], pa.string()))
    rows_of = ray.remote(num_cpus=0.5)(_rows_of)
    tasks = [rows_of.remote(loc, files[i : i + 64], wanted) for i in range(0, len(files), 64)]
    return pa.concat_tables([POSITIONS.empty_table(), *ray.get(tasks)])


def _rows_of(loc: OutputLocation, files: list[str], wanted: pa.Array) -> pa.Table:
    out = [POSITIONS.empty_table()]
    for rel in files:
        ids = loc.read_parquet(rel, columns=["id"])["id"]
        pos = pc.indices_nonzero(pc.is_in(ids, wanted))
        out.append(pa.table({"id": pc.take(ids, pos), "file": pa.array([rel] * len(pos)), "pos": pos.cast(pa.int64())}))
    return pa.concat_tables(out)


def _later_rows(found: pa.Table, entries: pa.Table, urls: list[str]) -> pa.Table:
    """The rows of ``found`` that are not their id's first in corpus order."""
    order = {u: i for i, u in enumerate(urls)}
    keys = {
        r["data_file"]: (order.get(r["url"], len(urls)), r["block"], r["first_line"] or 0)
        for r in entries.select(["data_file", "url", "block", "first_line"]).to_pylist()
        if r["data_file"]
    }
    ranked = sorted(range(found.num_rows), key=lambda i: (keys[found["file"][i].as_py()], found["pos"][i].as_py()))
    found = found.take(pa.array(ranked, pa.int64()))
    found = found.append_column("i", pa.array(range(found.num_rows), pa.int64()))
    first = found.group_by("id").aggregate([("i", "min")])["i_min"]
    return found.filter(pc.invert(pc.is_in(found["i"], first))).drop_columns(["i"])


def _first_files(found: pa.Table, later: pa.Table) -> dict[str, str]:
    """id -> the data file holding its first row."""
    is_later = pc.is_in(
        pc.binary_join_element_wise(found["file"], pc.cast(found["pos"], pa.string()), "#"),
        pc.binary_join_element_wise(later["file"], pc.cast(later["pos"], pa.string()), "#"),
    )
    first = found.filter(pc.invert(is_later))
    return dict(zip(first["id"].to_pylist(), first["file"].to_pylist()))


def _replaced(
    loc: OutputLocation,
    entry: dict[str, Any],
    drop: pa.Table,
    first_in: dict[str, str],
    attempt: str,
    compression: str | None,
    metadata: dict[bytes, bytes],
) -> dict[str, Any]:
    """``entry`` with the rows at ``drop['pos']`` moved from its data file to its rejects file."""
    old = entry["data_file"]
    unit = "d" + unit_key("dedupe", attempt, old)[:15]  # no plan's unit: a re-run never takes it for a block
    name = f"part-{unit}-000000-{attempt}.parquet"
    kept = copy_without(loc, old, drop["pos"], f"{DATA_DIR}/{name}", metadata, compression)
    rejects = pa.table(
        {
            "id": drop["id"],
            "source": pa.array([entry["url"]] * drop.num_rows, pa.string()),
            "line": pa.nulls(drop.num_rows, pa.int64()),
            "reason": pa.array([DUPLICATE] * drop.num_rows, pa.string()),
            "detail": pa.array(
                [
                    f"an earlier row of the corpus has this id (first kept in {first_in.get(i)})"
                    for i in drop["id"].to_pylist()
                ],
                pa.string(),
            ),
        },
        schema=REJECTS_SCHEMA,
    )
    if entry["rejects_file"]:
        rejects = pa.concat_tables(
            [loc.read_parquet(entry["rejects_file"]).select(REJECTS_SCHEMA.names).cast(REJECTS_SCHEMA), rejects]
        )
    rejects_rel = f"{REJECTS_DIR}/{name}"
    rejects_size = loc.write_parquet(rejects_rel, rejects, compression)
    rejected = Counter(json.loads(entry["rejected"])) + Counter({DUPLICATE: drop.num_rows})
    new = dict(entry)
    new |= {
        "rejected": json.dumps(dict(rejected)),
        "rejects_file": rejects_rel,
        "rejects_size": rejects_size,
        "rejects_stats": delta_stats(rejects),
        "data_file": None if kept is None else kept[0],
        "data_size": None if kept is None else kept[1],
        "data_stats": None if kept is None else delta_stats(kept[2]),
    }
    if kept is None:
        new |= {"written": 0, "tokens": 0, "truncated": 0, "nnz_hist": "{}"}
    else:
        new |= data_stats(kept[2])
    return new
