"""Loading an encoded output into the configured vector store: after the job, or on its own.

The upsert reads the committed Parquet output, not the live encoding stream: the Parquet
output is complete whatever the store does, a store outage never costs GPU time, and the same
code serves ``splade-pipeline upsert --from <output>`` after an outage or into a second store.
A bounded pool of writer actors (``sink.writers``) applies back-pressure to a slow store.
"""

from __future__ import annotations

import time
from typing import Any

import fsspec

from pipeline.config import JobConfig, SinkConfig
from pipeline.faults import crash_point
from pipeline.manifest import COMMITS_DIR, join, latest_commit
from pipeline.sinks import SinkError, check_caps, open_sink
from pipeline.stages import UpsertBlocks, upsert_batch
from pipeline.storage import url_to_fs


def is_embedded(sink: SinkConfig) -> bool:
    """Stores kept in local files by one process (Qdrant local mode, Milvus Lite)."""
    return sink.type in ("qdrant", "milvus") and not sink.url


def check_sink(config: JobConfig, fingerprint: dict[str, Any]) -> None:
    """Plan-time checks of the sink settings against the vectors' fingerprint; creates the collection if allowed and missing."""
    sink = config.sink
    check_caps(sink, fingerprint["top_k"])
    if is_embedded(sink) and sink.writers > 1:
        raise ValueError(f"sink.writers: an embedded {sink.type} store allows one writer (one process owns its files); use a server (sink.url) for more")
    store = open_sink(sink, fingerprint["vocab_size"])
    try:
        store.ensure()
    finally:
        store.close()


def output_files(output: str, storage_options: dict[str, Any]) -> tuple[fsspec.AbstractFileSystem, list[str], dict[str, Any]]:
    """The committed data files of an encoded output and their (single) fingerprint."""
    fs, root = url_to_fs(output, storage_options)
    commit = latest_commit(fs, root)
    if commit is None:
        raise ValueError(f"{output}: no committed encoded output here (no {COMMITS_DIR}/ record); run or finish the encode job first")
    files = sorted(join(root, f) for f in commit.entries["data_file"].to_pylist() if f)
    if not files:
        raise ValueError(f"{output}: the committed output holds no data files (every row was rejected?)")
    fingerprint = commit.meta.get("fingerprint") or {}
    if "vocab_size" not in fingerprint:
        raise ValueError(f"{output}: its commit carries no encoding fingerprint; it was not written by splade-pipeline")
    return fs, files, fingerprint


def upsert_output(config: JobConfig, output: str | None = None) -> dict[str, Any]:
    """Upsert every vector of ``output`` (default: the job's output) into ``config.sink``."""
    output = output or config.output.path
    fs, files, fingerprint = output_files(output, config.output.storage_options)
    return upsert_files(config, fs, files, fingerprint)


def delete_ids(config: JobConfig, fingerprint: dict[str, Any], ids: list[str]) -> int:
    """Delete ``ids`` from the store (absent ones are no error), in requests of ``sink.batch_size``."""
    store = open_sink(config.sink, fingerprint["vocab_size"])
    try:
        for i in range(0, len(ids), config.sink.batch_size):
            store.delete(ids[i : i + config.sink.batch_size])
            crash_point("delete")
        store.finish()
    finally:
        store.close()
    return len(ids)


def upsert_files(config: JobConfig, fs: fsspec.AbstractFileSystem, files: list[str], fingerprint: dict[str, Any]) -> dict[str, Any]:
    """Upsert the vectors of the data ``files`` (paths on ``fs``) into ``config.sink``."""
    import pyarrow.fs as pafs
    import ray

    from pipeline.run import ensure_ray

    start = time.perf_counter()
    check_sink(config, fingerprint)
    for folder in {f.rsplit("/", 1)[0] for f in files}:
        fs.invalidate_cache(folder)  # files Ray workers wrote since this client last listed them
    dimension = fingerprint["vocab_size"]
    ensure_ray(config.compute)
    filesystem = pafs.PyFileSystem(pafs.FSSpecHandler(fs))
    ds = ray.data.read_parquet(files, filesystem=filesystem).select_columns(["id", "sparse"])
    batch_size = config.sink.batch_size * 4
    if is_embedded(config.sink):
        # An embedded store is one process's files: the driver is its single writer, fed by
        # Ray Data's streaming reads.
        store = open_sink(config.sink, dimension)
        try:
            results = []
            for batch in ds.iter_batches(batch_size=batch_size, batch_format="pyarrow"):
                results.append(dict(zip(("upserted", "empty"), upsert_batch(store, config.sink, batch))))
                crash_point("upsert")
        except Exception:
            store.close()
            raise
    else:
        loaded = ds.map_batches(
            UpsertBlocks,
            batch_size=batch_size,
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
        store = open_sink(config.sink, dimension)
    try:
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
        "fingerprint": fingerprint,
    }


__all__ = ["SinkError", "check_sink", "delete_ids", "output_files", "upsert_files", "upsert_output"]
