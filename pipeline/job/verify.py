"""Is the store what the table says it is? ``verify`` compares a vector store with the latest
version of an output; ``repair`` makes it so.

What the store must hold is the table's rows (one per id: see :mod:`pipeline.job.dedupe`), but
for a store that refuses empty vectors (Milvus, Pinecone) the rows whose vector is empty, which
it must not hold at all. ``verify`` compares the counts, every id (the table's ``id`` column
against the store's listing) and the vectors of a sample of documents by value; ``repair``
deletes the ids the store holds and the table does not, loads every vector of the table again
(upserts overwrite), records the version as the store's and verifies again.

Every run that loads a store checks its count against the table
(:func:`pipeline.job.load.count_problem`): a mismatch is an error in the summary, with the
commands that find and repair it.
"""

from __future__ import annotations

import random
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.config import JobConfig
from pipeline.job.load import committed_output, delete_ids, sync_store
from pipeline.output.location import OutputLocation
from pipeline.sinks import SinkError, open_sink, store_limits

SHOWN = 10  # ids named per kind of difference


def verify_store(config: JobConfig, output: str | None = None, sample: int = 1000) -> dict[str, Any]:
    """Compare ``config.sink`` with the latest version of ``output`` (default: the job's output)."""
    return _difference(config, output, sample)[0]


def _difference(config: JobConfig, output: str | None, sample: int) -> tuple[dict[str, Any], list[str]]:
    """The verification report, and every id the store holds that the table does not."""
    loc = OutputLocation(output or config.output.path, config.output.storage_options)
    committed, fingerprint = committed_output(loc, config.output.table_options)
    refuses_empty = not store_limits(config.sink).accepts_empty_vectors
    table = _table_ids(loc, sorted(committed.snapshot.files), refuses_empty)
    store = open_sink(config.sink, fingerprint.vocab_size)
    try:
        listed = [i for page in store.ids() for i in page]
        held = pa.array([i for i in listed if i is not None], pa.string())
        count = store.count()
        checked, different = _compare_sample(loc, store, table, held, sample)
        name = store.name
    finally:
        store.close()
    missing = pc.filter(table["id"], pc.invert(pc.is_in(table["id"], held)))
    extra = pc.unique(pc.filter(held, pc.invert(pc.is_in(held, table["id"]))))
    twice = pc.unique(pc.filter(held, pc.greater(pc.value_counts(held).field("counts"), 1))) if len(held) else held
    problems = {
        "missing": len(missing),
        "extra": len(extra),
        "different": len(different),
        "foreign": len(listed) - len(held),  # points without a document id: not written by splade-pipeline
        "twice": len(twice),  # document ids held by two points (Pinecone ids mapped before the one-to-one rule)
    }
    return {
        "store": name,
        "table_version": committed.version,
        "expected": table.num_rows,
        "store_count": count,
        "store_ids": len(listed),
        **problems,
        "missing_ids": missing.to_pylist()[:SHOWN],
        "extra_ids": extra.to_pylist()[:SHOWN],
        "different_ids": different[:SHOWN],
        "twice_ids": twice.to_pylist()[:SHOWN],
        "sampled": checked,
        "ok": not any(problems.values()) and count == table.num_rows == len(listed),
    }, extra.to_pylist()


def repair_store(config: JobConfig, output: str | None = None, sample: int = 1000) -> dict[str, Any]:
    """Make ``config.sink`` hold exactly the latest version of ``output``; return what was done and
    the verification after it. Points splade-pipeline did not write are not deleted: a store
    holding them is refused (use a collection of its own)."""
    before, extra = _difference(config, output, 0)
    if before["foreign"]:
        raise SinkError(
            f"{before['store']}: holds {before['foreign']} points without a document id, which splade-pipeline did "
            "not write; repair deletes only what it wrote. Load into a collection of its own (or delete those points)"
        )
    loc = OutputLocation(output or config.output.path, config.output.storage_options)
    _, fingerprint = committed_output(loc, config.output.table_options)
    deleted = delete_ids(config.sink, fingerprint, extra) if extra else 0
    # every vector again (upserts overwrite); the versions the store was loaded from are not needed
    loaded = sync_store(config, loc, full=True, listed=True)
    _settle(config, loaded, fingerprint.vocab_size)
    return {
        "before": before,
        "deleted_extra": deleted,
        "upserted": loaded["upserted"],
        "table_version": loaded["table_version"],
        "after": verify_store(config, output, sample=sample),
    }


def _settle(config: JobConfig, loaded: dict[str, Any], dimension: int) -> None:
    """Wait (up to the store's count_settle_s) for a store whose count lags to show the load."""
    deadline = time.monotonic() + store_limits(config.sink).count_settle_s
    pause = 0.5
    count = loaded["store_count"]
    while count != loaded["expected_count"] and time.monotonic() + pause <= deadline:
        time.sleep(pause)
        pause = min(pause * 2, 15.0)
        store = open_sink(config.sink, dimension)
        try:
            count = store.count()
        finally:
            store.close()


def _table_ids(loc: OutputLocation, files: list[str], refuses_empty: bool) -> pa.Table:
    """``(id, file)`` of every row the store must hold."""

    def one(rel: str) -> pa.Table:
        rows = loc.read_parquet(rel, columns=["id", "sparse"] if refuses_empty else ["id"])
        if refuses_empty:
            rows = rows.filter(pc.greater(pc.list_value_length(pc.struct_field(rows["sparse"], "indices")), 0))
        return pa.table({"id": rows["id"], "file": pa.array([rel] * rows.num_rows, pa.string())})

    empty = pa.table({"id": pa.array([], pa.string()), "file": pa.array([], pa.string())})
    with ThreadPoolExecutor(8) as pool:
        return pa.concat_tables([empty, *pool.map(one, files)])


def _compare_sample(
    loc: OutputLocation, store: Any, table: pa.Table, held: pa.Array, sample: int
) -> tuple[int, list[str]]:
    """Compare the vectors of about ``sample`` documents (from a few files picked at random) with
    the store's; return how many were compared and the ids whose vectors differ."""
    present = table.filter(pc.is_in(table["id"], held))
    if not sample or not present.num_rows:
        return 0, []
    files = sorted(set(present["file"].to_pylist()))
    random.Random(len(files)).shuffle(files)
    picked, rows = [], 0
    for f in files:
        if rows >= sample:
            break
        picked.append(f)
        rows += int(pc.sum(pc.equal(present["file"], f)).as_py())
    wanted = set(present.filter(pc.is_in(present["file"], pa.array(picked)))["id"].to_pylist())
    wanted = set(random.Random(rows).sample(sorted(wanted), min(sample, len(wanted))))
    different, checked = [], 0
    for f in picked:
        rows_of = loc.read_parquet(f, columns=["id", "sparse"])
        rows_of = rows_of.filter(pc.is_in(rows_of["id"], pa.array(sorted(wanted), pa.string())))
        ids = rows_of["id"].to_pylist()
        stored: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        for start in range(0, len(ids), 100):
            stored |= store.fetch(ids[start : start + 100])
        for doc_id, vector in zip(ids, rows_of["sparse"].to_pylist()):
            checked += 1
            if not _same(vector, stored.get(doc_id)):
                different.append(doc_id)
    return checked, different


def _same(vector: dict[str, list], stored: tuple[np.ndarray, np.ndarray] | None) -> bool:
    if stored is None:
        return False
    want = dict(zip(vector["indices"], vector["values"]))
    got = dict(zip(stored[0].tolist(), stored[1].tolist()))
    if want.keys() != got.keys():
        return False
    a = np.array([want[k] for k in sorted(want)], np.float32)
    b = np.array([got[k] for k in sorted(want)], np.float32)
    return bool(np.allclose(a, b, rtol=1e-6, atol=0.0))
