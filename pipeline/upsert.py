"""Loading an encoded output into the configured vector store: after the job, or on its own.

The upsert reads the committed Parquet output, not the live encoding stream: the Parquet
output is complete whatever the store does, a store outage never costs GPU time, and the same
code serves ``splade-pipeline upsert --from <output>`` after an outage or into a second store.
A bounded pool of writer actors (``sink.writers``) applies back-pressure to a slow store.
"""

from __future__ import annotations

import json
import time
from typing import Any

import fsspec
import pyarrow.parquet as pq

from pipeline.config import JobConfig, SinkConfig
from pipeline.output import DATA_DIR, FINGERPRINT_KEY, join
from pipeline.sinks import SinkError, check_caps, open_sink
from pipeline.stages import UpsertBlocks, upsert_batch


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
    """The data files of an encoded output and their (single) fingerprint."""
    fs, root = fsspec.core.url_to_fs(output, **storage_options)
    folder = join(root, DATA_DIR)
    if not fs.isdir(folder):
        raise ValueError(f"{output}: no encoded output here (no {DATA_DIR}/ folder)")
    files = sorted(p for p in fs.find(folder) if p.endswith(".parquet"))
    if not files:
        raise ValueError(f"{output}: the {DATA_DIR}/ folder holds no Parquet files")
    prints = set()
    for path in files:
        with fs.open(path, "rb") as fh:
            prints.add(pq.ParquetFile(fh).schema_arrow.metadata.get(FINGERPRINT_KEY, b"{}"))
    if len(prints) > 1:
        raise ValueError(f"{output}: files were encoded under {len(prints)} different fingerprints; refusing to mix them in one store")
    fingerprint = json.loads(prints.pop())
    if "vocab_size" not in fingerprint:
        raise ValueError(f"{output}: its files carry no encoding fingerprint; it was not written by splade-pipeline")
    return fs, files, fingerprint


def upsert_output(config: JobConfig, output: str | None = None) -> dict[str, Any]:
    """Upsert every vector of ``output`` (default: the job's output) into ``config.sink``."""
    import pyarrow.fs as pafs
    import ray

    from pipeline.run import ensure_ray

    start = time.perf_counter()
    output = output or config.output.path
    fs, files, fingerprint = output_files(output, config.output.storage_options)
    check_sink(config, fingerprint)
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
            results = [dict(zip(("upserted", "empty"), upsert_batch(store, config.sink, batch)))
                       for batch in ds.iter_batches(batch_size=batch_size, batch_format="pyarrow")]
        except Exception:
            store.close()
            raise
    else:
        results = ds.map_batches(
            UpsertBlocks,
            batch_size=batch_size,
            batch_format="pyarrow",
            compute=ray.data.ActorPoolStrategy(size=config.sink.writers),
            num_cpus=config.compute.io_cpus,
            fn_constructor_kwargs={"sink": config.sink, "dimension": dimension},
        ).take_all()
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


__all__ = ["SinkError", "check_sink", "output_files", "upsert_output"]
