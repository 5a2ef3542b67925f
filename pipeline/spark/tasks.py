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

from pipeline.config import EncoderConfig, JobConfig
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


def task_gpu() -> str | None:
    """The address of the GPU Spark gave this task (``spark.task.resource.gpu.amount``), or None."""
    ctx = _context()
    resources = ctx.resources() if ctx is not None else {}
    gpu = resources.get("gpu")
    return str(gpu.addresses[0]) if gpu is not None and gpu.addresses else None


def on_task_device(encoder: EncoderConfig) -> tuple[EncoderConfig, str | None]:
    """``encoder`` for this task's device, and the GPU's address: the GPU Spark gave the task (made
    the current CUDA device), or, given none, the CPU where ``device`` is ``auto``: a worker never
    takes a GPU Spark did not give it (the driver recorded CPU precision, and Spark's other tasks
    on that node would share the GPU unscheduled)."""
    gpu = task_gpu()
    if gpu is None:
        return (encoder.model_copy(update={"device": "cpu"}) if encoder.device == "auto" else encoder), None
    if gpu.isdigit():  # an index; a MIG or UUID address is the only device the executor sees
        import torch

        torch.cuda.set_device(int(gpu))
    return encoder, gpu


def task_threads(configured: int | None = None) -> int:
    """Torch threads for this task: ``configured``, else the CPUs Spark gave the task (``spark.task.cpus``)."""
    ctx = _context()
    return max(1, int(configured or (ctx.cpus() if ctx is not None else 1)))


def encoder_stage(config: JobConfig, expected: Fingerprint) -> EncodeBlocks:
    """This worker's encoder stage for ``config`` on the task's device (loaded on first use, then kept)."""
    encoder, gpu = on_task_device(config.encoder)
    key = (expected.id + encoder.model_dump_json(), gpu)
    stage = _STAGES.get(key)
    if stage is None:
        _STAGES.clear()  # one model per worker: a new config replaces the old one
        stage = _STAGES[key] = EncodeBlocks(encoder, expected, threads=task_threads(config.compute.torch_threads))
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
