"""Loading an encoded output into the configured vector store: after the job, or on its own.

The upsert reads the committed Parquet output, not the live encoding stream: the Parquet
output is complete whatever the store does, a store outage never costs GPU time, and the same
code serves ``splade-pipeline upsert --from <output>`` after an outage or into a second store.
A bounded pool of writer actors (``sink.writers``) applies back-pressure to a slow store; an
embedded store (one process's files) is written by the driver alone.
"""

from __future__ import annotations

import time
from typing import Any

import pyarrow as pa

from pipeline.config import JobConfig, SinkConfig
from pipeline.encode.fingerprint import Fingerprint
from pipeline.encode.sparse import SPARSE_TYPE
from pipeline.job.cluster import ensure_ray
from pipeline.job.faults import crash_point
from pipeline.job.resume import recorded_fingerprint
from pipeline.job.stages import UpsertBlocks, upsert_batch
from pipeline.output.commits import COMMITS_DIR, OutputError, latest_commit
from pipeline.output.location import OutputLocation
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


def output_files(loc: OutputLocation) -> tuple[list[str], Fingerprint]:
    """The committed data files of an encoded output (relative to it) and their fingerprint."""
    with loc.failures_named("read the commit records of the"):
        commit = latest_commit(loc)
    if commit is None:
        raise OutputError(
            f"{loc.url}: no committed encoded output here (no {COMMITS_DIR}/ record); run or finish the encode job "
            "first"
        )
    files = sorted(f for f in commit.entries["data_file"].to_pylist() if f)
    if not files:
        raise OutputError(f"{loc.url}: the committed output holds no data files (every row was rejected?)")
    if "vocab_size" not in (commit.meta.get("fingerprint") or {}):
        raise OutputError(
            f"{loc.url}: its commit carries no encoding fingerprint; it was not written by splade-pipeline"
        )
    return files, recorded_fingerprint(commit.meta)


def upsert_output(config: JobConfig, output: str | None = None) -> dict[str, Any]:
    """Upsert every vector of ``output`` (default: the job's output) into ``config.sink``."""
    loc = OutputLocation(output or config.output.path, config.output.storage_options)
    files, fingerprint = output_files(loc)
    return upsert_files(config, loc, files, fingerprint)


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


def upsert_files(config: JobConfig, loc: OutputLocation, files: list[str], fingerprint: Fingerprint) -> dict[str, Any]:
    """Upsert the vectors of the data ``files`` (relative to ``loc``) into ``config.sink``.

    A server store is loaded by a pool of Ray actors; an embedded store (one process's files) by
    this process alone, reading the files itself: no Ray is started for it.
    """
    start = time.perf_counter()
    check_sink(config.sink, fingerprint)
    for folder in {f.rsplit("/", 1)[0] for f in files}:
        loc.refresh(folder)  # files Ray workers wrote since this client last listed them
    embedded = store_limits(config.sink).embedded
    results = [] if embedded else _load_in_actors(loc, files, config, fingerprint.vocab_size)
    store = open_sink(config.sink, fingerprint.vocab_size)
    try:
        if embedded:
            results = _load_in_driver(loc, files, store, config.sink)
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


def _load_in_driver(loc: OutputLocation, files: list[str], store: Sink, sink: SinkConfig) -> list[dict[str, int]]:
    """Stream the files' ``id`` and ``sparse`` columns, a file at a time, into the one client in
    batches of ``4 * sink.batch_size`` rows (cut into requests by the store's limits)."""
    size, results = sink.batch_size * 4, []
    pending = pa.table({"id": pa.array([], pa.string()), "sparse": pa.nulls(0, SPARSE_TYPE)})
    for i, rel in enumerate(files):
        pending = pa.concat_tables([pending, loc.read_parquet(rel, columns=["id", "sparse"])])
        final = i == len(files) - 1
        while pending.num_rows >= size or (final and pending.num_rows):
            batch, pending = pending.slice(0, size), pending.slice(size)
            upserted, empty = upsert_batch(store, sink, batch)
            results.append({"upserted": upserted, "empty": empty})
            crash_point("upsert")
    return results


def _load_in_actors(loc: OutputLocation, files: list[str], config: JobConfig, dimension: int) -> list[dict[str, Any]]:
    import pyarrow.fs as pafs
    import ray

    ensure_ray(config.compute)
    filesystem = pafs.PyFileSystem(pafs.FSSpecHandler(loc.fs))
    ds = ray.data.read_parquet([loc.path(f) for f in files], filesystem=filesystem).select_columns(["id", "sparse"])
    loaded = ds.map_batches(
        UpsertBlocks,
        batch_size=config.sink.batch_size * 4,
        batch_format="pyarrow",
        compute=ray.data.ActorPoolStrategy(size=config.sink.writers),
        num_cpus=config.compute.io_cpus,
        fn_constructor_kwargs={"sink": config.sink, "dimension": dimension},
    )
    results = []
    for row in loaded.iter_rows():
        results.append(row)
        crash_point("upsert")
    errors = [r["error"] for r in results if r.get("error")]
    if errors:
        raise SinkError(f"{errors[0]} ({len(errors)} of {len(results)} batches not loaded)")
    return results
