"""What one Spark task runs, in a Spark Python worker: read shards, encode their blocks, write the
files; scan shards for reindex; find the rows of repeated ids; load a store's batches.

One encoder stage per Python worker (and GPU), kept across tasks: Spark reuses its Python workers
(``spark.python.worker.reuse``, on by default), so the model loads once per worker, not per task.
Files are named by the task attempt (``<run attempt>-t<task attempt id>``): a retried or
speculative attempt never writes over another's files, and the driver commits only the entries the
attempt that succeeded returned. Nothing here imports a SparkSession; ``TaskContext`` only.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import asdict
from typing import Any

import pyarrow as pa

from pipeline.config import JobConfig
from pipeline.encode.fingerprint import Fingerprint
from pipeline.job.faults import FORWARDED, task_point
from pipeline.job.stages import EncodeBlocks, UpsertBlocks
from pipeline.output.layout import BlockWriter
from pipeline.output.location import OutputLocation
from pipeline.output.records import ENTRY_SCHEMA
from pipeline.sources import Shard, read_shard

TASK_ATTEMPT = "task_attempt"  # beside each entry: the attempt of its task that wrote it (0: the first)
WRITTEN_SCHEMA = ENTRY_SCHEMA.append(pa.field(TASK_ATTEMPT, pa.int32()))
_STAGES: dict[tuple[str, int | None], EncodeBlocks] = {}


def _context() -> Any:
    try:
        from pyspark import TaskContext
    except ImportError:  # called outside Spark (the tests of this module)
        return None
    return TaskContext.get()


def task_gpu() -> int | None:
    """The GPU Spark gave this task (``spark.task.resource.gpu.amount``), or None."""
    ctx = _context()
    resources = ctx.resources() if ctx is not None else {}
    gpu = resources.get("gpu")
    return int(gpu.addresses[0]) if gpu is not None and gpu.addresses else None


def encoder_stage(config: JobConfig, expected: Fingerprint) -> EncodeBlocks:
    """This worker's encoder stage for ``config`` on the task's GPU (loaded on first use, then kept)."""
    gpu = task_gpu()
    key = (expected.id + config.encoder.model_dump_json(), gpu)
    stage = _STAGES.get(key)
    if stage is None:
        _STAGES.clear()  # one model per worker: a new config replaces the old one
        if gpu is not None:
            import torch

            torch.cuda.set_device(gpu)
        ctx = _context()
        threads = config.compute.torch_threads or (ctx.cpus() if ctx is not None else 1)
        stage = _STAGES[key] = EncodeBlocks(config.encoder, expected, threads=max(1, int(threads)))
    return stage


def set_faults(faults: dict[str, str]) -> None:
    """This job's test-only fault variables (:mod:`pipeline.job.faults`), as the driver has them: a
    reused worker keeps none of an earlier job's."""
    for name in FORWARDED:
        if name in faults:
            os.environ[name] = faults[name]
        else:
            os.environ.pop(name, None)


def write_shards(
    batches: Iterator[pa.RecordBatch],
    work: list[Shard],
    config: JobConfig,
    fingerprint: Fingerprint,
    output: OutputLocation,
    attempt: str,
    faults: dict[str, str],
) -> Iterator[pa.RecordBatch]:
    """``mapInArrow`` over rows of shard numbers (``id``: positions in ``work``): every block of
    those shards read, encoded and written; one entry per block written (WRITTEN_SCHEMA)."""
    set_faults(faults)
    ctx = _context()
    name = attempt if ctx is None else f"{attempt}-t{ctx.taskAttemptId()}"
    stage = encoder_stage(config, fingerprint)
    writer = BlockWriter(output, config.output.compression, fingerprint, config.input.passthrough_columns, name)
    written = 0
    for batch in batches:
        for index in batch.column("id").to_pylist():
            for block in read_shard(work[index], config.input):
                stats = writer.write(stage(block))
                written += 1
                number = ctx.attemptNumber() if ctx is not None else 0
                task_point(number, written)
                stats = stats.cast(ENTRY_SCHEMA).append_column(
                    TASK_ATTEMPT, pa.array([number] * stats.num_rows, pa.int32())
                )
                yield from stats.to_batches()


def scan_shards(batches: Iterator[pa.RecordBatch], work: list[Shard], config: JobConfig) -> Iterator[pa.RecordBatch]:
    """``mapInArrow`` over shard numbers: the scan rows of reindex (no texts)."""
    from pipeline.job.reindex import SCAN_SCHEMA, read_for_scan

    for batch in batches:
        for index in batch.column("id").to_pylist():
            shards = pa.Table.from_pylist([asdict(work[index])])
            for table in read_for_scan(shards, config.input):
                yield from table.cast(SCAN_SCHEMA).to_batches()


def rows_of_files(
    batches: Iterator[pa.RecordBatch], files: list[str], loc: OutputLocation, wanted: pa.Array, key: str
) -> Iterator[pa.RecordBatch]:
    """``mapInArrow`` over file numbers: ``(id, file, pos)`` of their rows whose ``key`` is ``wanted``."""
    from pipeline.job.dedupe import rows_of

    for batch in batches:
        chosen = [files[i] for i in batch.column("id").to_pylist()]
        if chosen:
            yield from rows_of(loc, chosen, wanted, key).to_batches()


def keys_of_files(
    batches: Iterator[pa.RecordBatch], files: list[str], loc: OutputLocation, key: str
) -> Iterator[pa.RecordBatch]:
    """``mapInArrow`` over file numbers: ``(id, file)`` of every row (``id``: the ``key`` column)."""
    for batch in batches:
        for index in batch.column("id").to_pylist():
            ids = loc.read_parquet(files[index], columns=[key])[key]
            names = pa.array([files[index]] * len(ids), pa.string())
            yield from pa.table({"id": ids, "file": names}).to_batches()


def upsert_files(
    batches: Iterator[pa.RecordBatch],
    files: list[str],
    loc: OutputLocation,
    config: JobConfig,
    dimension: int,
    rows: Any,
) -> Iterator[pa.RecordBatch]:
    """``mapInArrow`` over file numbers: their ``id`` and ``sparse`` upserted into ``config.sink`` in
    batches of ``4 * sink.batch_size`` rows; one ``(upserted, empty, error)`` row per batch. One
    client per task (closed at its end): a store that failed in an earlier job is asked again."""
    store = UpsertBlocks(config.sink, dimension)
    size = config.sink.batch_size * 4
    try:
        for batch in batches:
            for index in batch.column("id").to_pylist():
                table = rows(loc.read_parquet(files[index], columns=["id", "sparse"]))
                for start in range(0, table.num_rows, size):
                    yield from store(table.slice(start, size)).to_batches()
    finally:
        store.sink.close()
