"""Loading an encoded output into the configured vector store: after the job, or on its own.

The upsert reads a committed version of the table, not the live encoding stream: the table is
complete whatever the store does, a store outage never costs GPU time, and the same code serves
``splade-pipeline upsert --from <output>`` after an outage or into a second store.

Each store's load is recorded beside the table (``_splade/stores/<store>.json``: the table
version it holds). After a run, a reindex or a rollback the store is brought from its recorded
version to the latest (:func:`sync_store`): the vectors of files added since are upserted, and
the ids of files removed since that no added file holds are deleted. A load that failed or was
killed records nothing, so the next run loads from the same recorded version again (upserts
and deletes are idempotent).
A bounded pool of writer actors (``sink.writers``) applies back-pressure to a slow store; an
embedded store (one process's files) is written by the driver alone.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from pipeline.config import JobConfig, SinkConfig
from pipeline.encode.fingerprint import Fingerprint
from pipeline.encode.sparse import SPARSE_TYPE
from pipeline.job.cluster import ensure_ray, placed
from pipeline.job.faults import crash_point
from pipeline.job.resume import recorded_fingerprint
from pipeline.job.stages import UpsertBlocks, upsert_batch
from pipeline.output.location import OutputError, OutputLocation
from pipeline.output.state import Committed, read_committed
from pipeline.output.table import DeltaOutput
from pipeline.sinks import Sink, SinkError, SinkSettingError, open_sink, store_limits
from pipeline.sinks.protocol import check_caps


def check_sink(sink: SinkConfig, fingerprint: Fingerprint) -> None:
    """Plan-time checks of the sink settings against the vectors' fingerprint; creates the
    collection if allowed and missing."""
    limits = store_limits(sink)
    check_caps(sink, limits, fingerprint.top_k)
    if limits.embedded and sink.writers > 1:
        raise SinkSettingError(
            f"sink.writers: an embedded {sink.type} store allows one writer (one process owns its files); "
            "use a server (sink.url) for more"
        )
    store = open_sink(sink, fingerprint.vocab_size)
    try:
        store.ensure()
    finally:
        store.close()


STORES_DIR = "_splade/stores"


def expected_count(committed: Committed, sink: SinkConfig) -> int | None:
    """How many vectors the store must hold for the table's latest version (None: unknown): one per
    document, or per window of a long_documents split output."""
    entries = committed.entries
    if entries is None:
        return None
    per_window = "parent_id" in committed.snapshot.schema.names
    written = int(pc.sum(entries["windows" if per_window else "written"]).as_py() or 0)
    if store_limits(sink).accepts_empty_vectors:
        return written
    empty = sum(int(json.loads(h or "{}").get("0", 0)) for h in entries["nnz_hist"].to_pylist())
    return written - empty


def count_problem(config: JobConfig, committed: Committed, store_count: int, recount: Any) -> str | None:
    """None when the store holds as many vectors as it must, else the error to report. A store
    whose count lags (Pinecone) is counted again for up to its ``count_settle_s``."""
    expected = expected_count(committed, config.sink)
    deadline = time.monotonic() + max(store_limits(config.sink).count_settle_s, 1.0)
    pause = 0.5
    while expected is not None and store_count != expected and time.monotonic() + pause <= deadline:
        time.sleep(pause)
        pause = min(pause * 2, 15.0)
        store_count = recount()
    if expected is None or store_count == expected:
        return None
    return (
        f"the store holds {store_count} vectors, but table version {committed.version} has {expected} vectors "
        f"that belong in it; see the difference with `splade-pipeline verify --from {config.output.path}` and fix "
        f"it with `splade-pipeline repair --from {config.output.path}` (same --config)"
    )


def committed_output(
    loc: OutputLocation, options: dict[str, str], version: int | None = None
) -> tuple[Committed, Fingerprint]:
    """The output's latest version (or ``version``) and the fingerprint of its vectors."""
    committed = read_committed(loc, options, version)
    if committed is None:
        raise OutputError(f"{loc.url}: no Delta table here (no _delta_log/); run or finish the encode job first")
    if committed.record is None or "vocab_size" not in (committed.record.get("fingerprint") or {}):
        raise OutputError(
            f"{loc.url}: its commits carry no encoding fingerprint; it was not written by splade-pipeline"
        )
    return committed, recorded_fingerprint(committed.record)


def upsert_output(config: JobConfig, output: str | None = None) -> dict[str, Any]:
    """Upsert every vector of the latest version of ``output`` (default: the job's output) into
    ``config.sink`` (deleting the ids the store got from an earlier version that this one lacks),
    and record that version as the store's."""
    loc = OutputLocation(output or config.output.path, config.output.storage_options)
    return sync_store(config, loc, full=True)


def sync_store(
    config: JobConfig, loc: OutputLocation, *, full: bool = False, listed: bool = False, loader: Loader | None = None
) -> dict[str, Any]:
    """Bring ``config.sink`` from the table version it was last loaded from to the latest one
    (``full``: upsert every vector of the latest one; ``loader``: who sends a server store its
    vectors, see :func:`upsert_files`).

    Before the store is touched its record says which versions it may hold pieces of (``pending``):
    a load that fails or is killed half-way is redone by the next one from both, sending every
    vector again, so nothing it deleted or had not yet upserted is skipped as "already there".
    ``listed``: the ids the table lacks were found in the store's own listing and deleted already
    (``repair``), so the versions the store was loaded from are not read (they may be vacuumed).
    """
    options = config.output.table_options
    committed, fingerprint = committed_output(loc, options)
    record = store_record(loc, config.sink) or {}
    held = [v for v in (record.get("table_version"), record.get("pending")) if v is not None]
    if not full and record.get("pending") is None and held == [committed.version]:
        loaded = _checked(config, committed, fingerprint, _count_only(config, fingerprint))
        return loaded | {"table_version": committed.version, "deleted": 0}
    before: set[str] = set() if listed else set().union(*(_files_at(loc, options, v) for v in held))
    now = set(committed.snapshot.files)
    resend = full or record.get("pending") is not None or record.get("fingerprint_id") != fingerprint.id
    added, removed = sorted(now if resend else now - before), sorted(before - now)
    columns = ["id"] if resend else ["id", "content_hash"]  # hashes only to find rows merely copied
    old = _documents(loc, removed, columns)
    new = _documents(loc, added, columns) if len(old) or not resend else old.slice(0, 0)
    gone = pc.filter(old["id"], pc.invert(pc.is_in(old["id"], new["id"])))
    stay = pa.array([], pa.string())  # ids of removed files that files kept as they are hold
    if len(gone):
        kept = _documents(loc, sorted(now - set(added)), ["id"])
        stay = pc.unique(pc.filter(gone, pc.is_in(gone, kept["id"])))
        gone = pc.filter(gone, pc.invert(pc.is_in(gone, kept["id"])))
    # unchanged rows in a rewritten copy, encoded the same way: the store holds them already
    moved = (
        pa.array([], pa.string())
        if resend
        else new.join(old, ["id", "content_hash"], join_type="inner")["id"].combine_chunks()
    )
    _record_store(loc, config.sink, record.get("table_version"), fingerprint, pending=committed.version)
    deleted = delete_ids(config.sink, fingerprint, pc.unique(gone).to_pylist()) if len(gone) else 0
    if len(stay):
        # A table written before duplicate ids were rejected lost a later row of an id that a
        # kept file holds first: the store may hold the later row's vector. Send the first's.
        upsert_files(config, loc, sorted(now - set(added)), fingerprint, only=stay, loader=loader)
    if added and (resend or len(moved) < new.num_rows):
        loaded = upsert_files(config, loc, added, fingerprint, skip=moved, loader=loader)
    else:
        loaded = _count_only(config, fingerprint)
    _record_store(loc, config.sink, committed.version, fingerprint, store=loaded["store"])
    return _checked(config, committed, fingerprint, loaded) | {
        "table_version": committed.version,
        "from_version": record.get("table_version"),
        "deleted": deleted,
    }


def _checked(config: JobConfig, committed: Committed, fp: Fingerprint, loaded: dict[str, Any]) -> dict[str, Any]:
    """``loaded`` with the store's count checked against the table: ``expected_count``, and
    ``count_error`` when they differ."""

    def recount() -> int:
        store = open_sink(config.sink, fp.vocab_size)
        try:
            return store.count()
        finally:
            store.close()

    problem = count_problem(config, committed, loaded["store_count"], recount)
    return loaded | {"expected_count": expected_count(committed, config.sink), "count_error": problem}


def _files_at(loc: OutputLocation, options: dict[str, str], version: int) -> set[str]:
    try:
        snap = DeltaOutput(loc, options=options).snapshot(version)
    except Exception as err:  # noqa: BLE001 - its log was cleaned up: only a full load can tell
        raise OutputError(
            f"{loc.url}: the store was last loaded from table version {version}, which cannot be read any more "
            f"({type(err).__name__}: {err}); bring the store to the latest version with `splade-pipeline repair "
            f"--from {loc.url}` (it finds what to delete in the store's own listing)"
        ) from None
    return set(snap.files) if snap else set()


def _documents(loc: OutputLocation, files: list[str], columns: list[str]) -> pa.Table:
    """``columns`` (``id``, ``content_hash``) of the rows of ``files``."""
    types = {"id": pa.string(), "content_hash": pa.int64()}
    out = [pa.table({c: pa.array([], types[c]) for c in columns})]
    for rel in files:
        try:
            out.append(loc.read_parquet(rel, columns=columns))
        except FileNotFoundError:
            raise OutputError(
                f"{loc.url}: {rel}, a file of the version the store was last loaded from, was vacuumed; bring the "
                f"store to the latest version with `splade-pipeline repair --from {loc.url}`"
            ) from None
    return pa.concat_tables(out)


def _store_key(sink: SinkConfig) -> str:
    where = sink.url or sink.path or sink.dsn or ""
    identity = f"{sink.type}|{where}|{sink.collection}|{sink.namespace}"
    return f"{STORES_DIR}/{sink.type}-{hashlib.sha256(identity.encode()).hexdigest()[:16]}.json"


def store_record(loc: OutputLocation, sink: SinkConfig) -> dict[str, Any] | None:
    """What the output records of ``sink``: the table version it was loaded from (``table_version``),
    a load under way (``pending``); None when it was never loaded from this output."""
    try:
        return dict(json.loads(loc.read_bytes(_store_key(sink))))
    except FileNotFoundError:
        return None


def _record_store(
    loc: OutputLocation,
    sink: SinkConfig,
    version: int | None,
    fp: Fingerprint,
    *,
    pending: int | None = None,
    store: str | None = None,
) -> None:
    """The store's record: the version it holds (``pending``: a load toward that version has begun)."""
    record = {
        "table_version": version,
        "pending": pending,
        "fingerprint_id": fp.id,
        "store": store,
        "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    loc.write_bytes(_store_key(sink), json.dumps(record).encode())


def _count_only(config: JobConfig, fingerprint: Fingerprint) -> dict[str, Any]:
    store = open_sink(config.sink, fingerprint.vocab_size)
    try:
        store.ensure()
        name, count = store.name, store.count()
    finally:
        store.close()
    return {
        "store": name,
        "upserted": 0,
        "rejected_empty_vectors": 0,
        "store_count": count,
        "seconds": 0.0,
        "vectors_per_s": None,
    }


def delete_ids(sink: SinkConfig, fingerprint: Fingerprint, ids: list[str]) -> int:
    """Delete ``ids`` from the store (absent ones are no error), in requests of ``sink.batch_size``."""
    store = open_sink(sink, fingerprint.vocab_size)
    try:
        for i in range(0, len(ids), sink.batch_size):
            store.delete(ids[i : i + sink.batch_size])
            crash_point("delete")
        store.finish()
    finally:
        store.close()
    return len(ids)


def upsert_files(
    config: JobConfig,
    loc: OutputLocation,
    files: list[str],
    fingerprint: Fingerprint,
    skip: pa.Array | None = None,
    only: pa.Array | None = None,
    loader: Loader | None = None,
) -> dict[str, Any]:
    """Upsert the vectors of the data ``files`` (relative to ``loc``) into ``config.sink``, but
    those of the ids in ``skip`` (``only``: just those of these ids).

    A server store is loaded by ``loader`` (default: a pool of Ray actors; the Spark runner passes
    Spark tasks); an embedded store (one process's files) by this process alone, reading the files
    itself: no engine is started for it.
    """
    start = time.perf_counter()
    check_sink(config.sink, fingerprint)
    for folder in {f.rsplit("/", 1)[0] for f in files}:
        loc.refresh(folder)  # files Ray workers wrote since this client last listed them
    embedded = store_limits(config.sink).embedded
    skipped = skip if skip is not None else pa.array([], pa.string())
    rows = Rows(skipped, only)
    results = [] if embedded else (loader or _load_in_actors)(loc, files, config, fingerprint.vocab_size, rows)
    store = open_sink(config.sink, fingerprint.vocab_size)
    try:
        if embedded:
            results = _load_in_driver(loc, files, store, config.sink, rows)
        store.finish()
        name, count = store.name, store.count()
    finally:
        store.close()
    upserted = sum(r["upserted"] for r in results)
    seconds = time.perf_counter() - start
    return {
        "store": name,
        "upserted": upserted,
        "rejected_empty_vectors": sum(r["empty"] for r in results),
        "store_count": count,
        "seconds": round(seconds, 3),
        "vectors_per_s": round(upserted / seconds, 1) if seconds else None,
        "fingerprint": fingerprint.to_dict(),
    }


def _load_in_driver(
    loc: OutputLocation, files: list[str], store: Sink, sink: SinkConfig, rows: Rows
) -> list[dict[str, int]]:
    """Stream the files' ``id`` and ``sparse`` columns, a file at a time, into the one client in
    batches of ``4 * sink.batch_size`` rows (cut into requests by the store's limits)."""
    size, results = sink.batch_size * 4, []
    pending = pa.table({"id": pa.array([], pa.string()), "sparse": pa.nulls(0, SPARSE_TYPE)})
    for i, rel in enumerate(files):
        pending = pa.concat_tables([pending, rows(loc.read_parquet(rel, columns=["id", "sparse"]))])
        final = i == len(files) - 1
        while pending.num_rows >= size or (final and pending.num_rows):
            batch, pending = pending.slice(0, size), pending.slice(size)
            upserted, empty = upsert_batch(store, sink, batch)
            results.append({"upserted": upserted, "empty": empty})
            crash_point("upsert")
    return results


@dataclass(frozen=True)
class Rows:
    """Which rows of a file to load: all but the ids in ``skip``; with ``only``, just those ids."""

    skip: pa.Array
    only: pa.Array | None = None

    def __call__(self, table: pa.Table) -> pa.Table:
        if self.only is not None:
            table = table.filter(pc.is_in(table["id"], self.only))
        return table.filter(pc.invert(pc.is_in(table["id"], self.skip))) if len(self.skip) else table


# Sends a server store the vectors of some files: (output, files, config, dimension, rows) -> one
# {"upserted", "empty", "error"} per batch; a store failure comes back as "error", not raised.
Loader = Callable[[OutputLocation, list[str], JobConfig, int, "Rows"], list[dict[str, Any]]]


def raise_load_errors(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """``results``, or the first batch's store error (a :class:`SinkError` with how many failed)."""
    errors = [r["error"] for r in results if r.get("error")]
    if errors:
        raise SinkError(f"{errors[0]} ({len(errors)} of {len(results)} batches not loaded)")
    return results


def _load_in_actors(
    loc: OutputLocation, files: list[str], config: JobConfig, dimension: int, rows: Rows
) -> list[dict[str, Any]]:
    import pyarrow.fs as pafs
    import ray

    ensure_ray(config.compute)
    filesystem = pafs.PyFileSystem(pafs.FSSpecHandler(loc.fs))
    io = placed(config.compute.io_resources)
    paths = [loc.path(f) for f in files]
    ds = ray.data.read_parquet(paths, filesystem=filesystem, ray_remote_args=io).select_columns(["id", "sparse"])
    if len(rows.skip) or rows.only is not None:
        ds = ds.map_batches(rows, batch_format="pyarrow", batch_size=None)
    loaded = ds.map_batches(
        UpsertBlocks,
        batch_size=config.sink.batch_size * 4,
        batch_format="pyarrow",
        compute=ray.data.ActorPoolStrategy(size=config.sink.writers),
        num_cpus=config.compute.io_cpus,
        **io,
        fn_constructor_kwargs={"sink": config.sink, "dimension": dimension},
    )
    results = []
    for row in loaded.iter_rows():
        results.append(row)
        crash_point("upsert")
    return raise_load_errors(results)
