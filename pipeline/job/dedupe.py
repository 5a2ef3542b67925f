"""One rule for duplicate ids, the same in the encoding job, reindex and every store load: the
first row of an id in corpus order (input files in their listed order, then line) that passes
reading is the document; every later row of that id is rejected as ``duplicate_id`` (file named,
counted), so the table holds each id once and a store loaded from it holds what the table holds.
A first row the encoder rejects (``encoder_crash``, ``encoder_error``, ``non_finite_weights``)
still is the document: the id then has no vector, and its later rows are duplicates (reindex,
which decides before encoding, could not do otherwise).

Reindex applies the rule to its scan (:func:`pipeline.job.reindex.compare`). The encoding job
applies it in two places: within what one encoder call holds, where the lines are known
(:func:`later_in_block`); across calls, after writing and before committing
(:func:`drop_later_duplicates`), where the order is the input file's position, then the block:
only the ``id`` column of the written files is read (on the driver up to
:data:`DRIVER_MAX_ROWS` rows, else by a Ray group-by), with the encoder's rejects, and only the
files holding a later duplicate are replaced by copies without it. Their rejects go into the
replacing entry's rejects file, so the entry still accounts for every row of its block.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
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
ENCODER_REASONS = {"encoder_crash", "encoder_error", "non_finite_weights"}
POSITIONS = pa.schema([("id", pa.string()), ("file", pa.string()), ("pos", pa.int64())])


def later_in_block(block: pa.Table) -> dict[int, str]:
    """Positions of the rows of ``block`` (one encoder call: Ray may hand it several reader
    blocks, of several files) that are not their id's first in corpus order (file position, then
    line), each with where that first row is."""
    ids, shards, lines = (block[c].to_pylist() for c in ("id", "_shard", "_line"))
    sources = block["_source"].to_pylist()
    first: dict[str, int] = {}
    later: dict[int, str] = {}
    for pos in sorted(range(len(ids)), key=lambda i: (shards[i], lines[i])):
        doc = ids[pos]
        if doc is None:
            continue
        if doc in first:
            later[pos] = f"{sources[first[doc]]} line {lines[first[doc]]}"
        else:
            first[doc] = pos
    return later


def drop_later_duplicates(
    loc: OutputLocation,
    entries: pa.Table,
    urls: list[str],
    attempt: str,
    compression: str,
    metadata: dict[bytes, bytes],
    compute: Any = None,
    key: str = "id",
    pooled: int | None = None,
    positions: Callable[..., pa.Table] | None = None,
) -> pa.Table:
    """``entries`` with every later row of an id (order: ``urls``, then block) moved from its data
    file to its rejects file (copies written under ``attempt``); the entries of other files as they are.

    ``key``: the data files' column naming the document (``parent_id`` where rows are windows, in a
    long_documents split output: a later document's windows all go, and count as one reject);
    ``pooled``: the window length of a long_documents max output (see :func:`data_stats`);
    ``positions``: who groups the ids past :data:`DRIVER_MAX_ROWS` (default: Ray; the Spark runner
    passes Spark), called as ``(loc, files, rejected, compute, key)``."""
    files = [f for f in entries["data_file"].to_pylist() if f]
    if not files:
        return entries
    for folder in (DATA_DIR, REJECTS_DIR):
        loc.refresh(folder)  # files Ray workers wrote since this client last listed the folder
    rejected = _encoder_rejects(loc, entries)
    windows = key != "id"
    written = int(pc.sum(entries["windows" if windows else "written"]).as_py() or 0)  # the rows read back
    if written <= DRIVER_MAX_ROWS:
        found = _positions_on_driver(loc, files, rejected, key)
    else:
        found = (positions or _positions_on_cluster)(loc, files, rejected, compute, key)
    if not found.num_rows:
        return entries
    found = _in_corpus_order(found, entries, urls)
    later = _later_rows(found, windows)
    if not later.num_rows:
        return entries
    rows = entries.to_pylist()
    by_file = {r["data_file"]: i for i, r in enumerate(rows) if r["data_file"]}
    first_of = _first_rows(found)

    def replace(item: tuple[str, pa.Table]) -> tuple[int, dict[str, Any]]:
        rel, drop = item
        i = by_file[rel]
        return i, _replaced(loc, rows[i], drop, first_of, attempt, compression_of(compression), metadata, pooled)

    groups = later.group_by("file").aggregate([("pos", "list"), ("id", "list")])
    items = [
        (f, pa.table({"pos": p, "id": d}))
        for f, p, d in zip(groups["file"].to_pylist(), groups["pos_list"].to_pylist(), groups["id_list"].to_pylist())
    ]
    with ThreadPoolExecutor(8) as pool:
        for i, row in pool.map(replace, items):
            rows[i] = row
    return pa.Table.from_pylist(rows, schema=ENTRY_SCHEMA)


def _encoder_rejects(loc: OutputLocation, entries: pa.Table) -> pa.Table:
    """``(id, file, pos)`` of the rows the encoder rejected (``pos``: their line; ``file``: the
    rejects file), the first rows of an id just as written ones are."""
    parts = [POSITIONS.empty_table()]
    for entry in entries.select(["rejected", "rejects_file"]).to_pylist():
        if entry["rejects_file"] and ENCODER_REASONS & set(json.loads(entry["rejected"] or "{}")):
            table = loc.read_parquet(entry["rejects_file"], columns=["id", "line", "reason"])
            table = table.filter(pc.is_in(table["reason"], pa.array(sorted(ENCODER_REASONS))))
            n = table.num_rows
            file = pa.array([entry["rejects_file"]] * n, pa.string())
            parts.append(pa.table({"id": table["id"], "file": file, "pos": pc.cast(table["line"], pa.int64())}))
    return pa.concat_tables(parts)


def _positions_on_driver(loc: OutputLocation, files: list[str], rejected: pa.Table, key: str) -> pa.Table:
    """``(id, file, pos)`` of every row (written, or ``rejected`` by the encoder) whose id is in more
    than one file (``id``: the ``key`` column)."""

    def one(rel: str) -> pa.Table:
        ids = loc.read_parquet(rel, columns=[key])[key]
        return pa.table(
            {"id": ids, "file": pa.array([rel] * len(ids), pa.string()), "pos": pa.array(range(len(ids)), pa.int64())}
        )

    with ThreadPoolExecutor(16) as pool:
        every = pa.concat_tables([POSITIONS.empty_table(), rejected, *pool.map(one, files)])
    return repeated(every, key != "id")


def repeated(rows: pa.Table, windows: bool) -> pa.Table:
    """The rows whose id occurs more than once (``windows``: in more than one file, a split
    document's windows being rows of one file)."""
    if windows:
        counts = rows.group_by("id").aggregate([("file", "count_distinct")])
        return rows.filter(pc.is_in(rows["id"], counts.filter(pc.greater(counts["file_count_distinct"], 1))["id"]))
    counts = rows.group_by("id").aggregate([("id", "count")])
    return rows.filter(pc.is_in(rows["id"], counts.filter(pc.greater(counts["id_count"], 1))["id"]))


def _positions_on_cluster(
    loc: OutputLocation, files: list[str], rejected: pa.Table, compute: Any, key: str
) -> pa.Table:
    """The same, with the ids grouped by Ray (the driver gets only the repeated ids and their rows)."""
    import pyarrow.fs as pafs
    import ray
    from ray.data.expressions import col

    from pipeline.job.cluster import ensure_ray, placed

    if compute is not None:
        ensure_ray(compute)  # joined as configured, not as ray.data would start it
    filesystem = pafs.PyFileSystem(pafs.FSSpecHandler(loc.fs))
    partitions = max(1, min(200, len(files) // 16))  # each is a task; the ids column is small
    io = placed(compute.io_resources) if compute is not None else {}
    paths = [loc.path(f) for f in files]
    if key == "id":
        ids = ray.data.read_parquet(paths, filesystem=filesystem, ray_remote_args=io).select_columns([key])
        counts = ids.groupby(key, num_partitions=partitions).count()
    else:  # a split document's windows are rows of one file: count the files holding each document
        ids = ray.data.read_parquet(paths, filesystem=filesystem, ray_remote_args=io, include_paths=True)
        pairs = ids.select_columns([key, "path"]).groupby([key, "path"], num_partitions=partitions).count()
        counts = pairs.select_columns([key]).groupby(key, num_partitions=partitions).count()
    twice = [r[key] for r in counts.filter(expr=col("count()") > 1).select_columns([key]).take_all()]
    wanted_ids = sorted(set(twice) | set(rejected["id"].to_pylist()))
    if not wanted_ids:
        return POSITIONS.empty_table()
    wanted = ray.put(pa.array(wanted_ids, pa.string()))
    remote = ray.remote(num_cpus=0.5, **io)(rows_of)
    tasks = [remote.remote(loc, files[i : i + 64], wanted, key) for i in range(0, len(files), 64)]
    return repeated(pa.concat_tables([POSITIONS.empty_table(), rejected, *ray.get(tasks)]), key != "id")


def rows_of(loc: OutputLocation, files: list[str], wanted: pa.Array, key: str) -> pa.Table:
    out = [POSITIONS.empty_table()]
    for rel in files:
        ids = loc.read_parquet(rel, columns=[key])[key]
        pos = pc.indices_nonzero(pc.is_in(ids, wanted))
        out.append(
            pa.table(
                {"id": pc.take(ids, pos), "file": pa.array([rel] * len(pos), pa.string()), "pos": pos.cast(pa.int64())}
            )
        )
    return pa.concat_tables(out)


def _in_corpus_order(found: pa.Table, entries: pa.Table, urls: list[str]) -> pa.Table:
    """``found`` sorted by corpus order, with each row's input file (``url``). Within one encoder
    call the encoder already kept one row per id, so the input file's position and the block
    order the rows of one id; ``pos`` only breaks ties that cannot occur."""
    order = {u: i for i, u in enumerate(urls)}
    where: dict[str, tuple[int, int, str]] = {}
    for r in entries.select(["data_file", "rejects_file", "url", "block"]).to_pylist():
        for rel in (r["data_file"], r["rejects_file"]):
            if rel:
                where[rel] = (order.get(r["url"], len(urls)), r["block"], r["url"])
    keys = [where[f] for f in found["file"].to_pylist()]
    pos = found["pos"].to_pylist()
    ranked = sorted(range(found.num_rows), key=lambda i: (keys[i][0], keys[i][1], pos[i]))
    found = found.take(pa.array(ranked, pa.int64()))
    return found.append_column("url", pa.array([keys[i][2] for i in ranked], pa.string()))


def _later_rows(found: pa.Table, windows: bool) -> pa.Table:
    """The written rows of ``found`` (in corpus order) that are not their id's first (``windows``: not
    in the file of its first row, which holds all of that document's windows)."""
    found = found.append_column("i", pa.array(range(found.num_rows), pa.int64()))
    first = found.filter(pc.is_in(found["i"], found.group_by("id").aggregate([("i", "min")])["i_min"]))
    if windows:
        firsts = first.select(["id", "file"]).append_column("first", pa.array(np.ones(first.num_rows, bool)))
        marked = found.join(firsts, keys=["id", "file"], join_type="left outer").sort_by("i")
        later = marked.filter(pc.is_null(marked["first"])).drop_columns(["first"])
    else:
        later = found.filter(pc.invert(pc.is_in(found["i"], first["i"])))
    later = later.filter(pc.starts_with(later["file"], DATA_DIR + "/"))
    return later.select([c for c in found.column_names if c != "i"])


def _first_rows(found: pa.Table) -> dict[str, str]:
    """id -> where its first row is, in words (an input file, and the line where known)."""
    out: dict[str, str] = {}
    for doc, file, pos, url in zip(*(found[c].to_pylist() for c in ("id", "file", "pos", "url"))):
        if doc not in out:
            rejected = not file.startswith(DATA_DIR + "/")
            out[doc] = f"{url} line {pos}, which the encoder rejected" if rejected else f"{url}"
    return out


def _replaced(
    loc: OutputLocation,
    entry: dict[str, Any],
    drop: pa.Table,
    first_of: dict[str, str],
    attempt: str,
    compression: str | None,
    metadata: dict[bytes, bytes],
    pooled: int | None,
) -> dict[str, Any]:
    """``entry`` with the rows at ``drop['pos']`` moved from its data file to its rejects file."""
    old = entry["data_file"]
    unit = "d" + unit_key("dedupe", attempt, old)[:15]  # no plan's unit: a re-run never takes it for a block
    name = f"part-{unit}-000000-{attempt}.parquet"
    kept = copy_without(loc, old, drop["pos"], f"{DATA_DIR}/{name}", metadata, compression)
    documents = list(dict.fromkeys(drop["id"].to_pylist()))  # a split document's windows: one reject
    n = len(documents)
    rejects = pa.table(
        {
            "id": documents,
            "source": pa.array([entry["url"]] * n, pa.string()),
            "line": pa.nulls(n, pa.int64()),
            "reason": pa.array([DUPLICATE] * n, pa.string()),
            "detail": pa.array(
                [f"an earlier row of the corpus has this id (in {first_of.get(i)})" for i in documents], pa.string()
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
    rejected = Counter(json.loads(entry["rejected"])) + Counter({DUPLICATE: n})
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
        new |= {"written": 0, "tokens": 0, "windows": 0, "truncated": 0, "nnz_hist": "{}"}
    else:
        new |= data_stats(kept[2], pooled)
    return new
