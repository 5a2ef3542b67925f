"""The encoding job and reindex on Spark: :func:`run_spark_job`, :func:`run_spark_reindex`.

The driver plans exactly as the Ray job does (list and version the input files, resume from the
table and the files a killed run left, refuse a config that would mix vectors); Spark runs one
task per input file left to do (``mapInArrow`` over shard numbers: the task reads the file
through fsspec, validates, encodes and writes its blocks, and returns their entries); the driver
then deduplicates, commits one Delta version and writes the summary, as after the Ray job. A
store is loaded by Spark tasks (one client per task). Spark's retries and speculative
attempts are safe: each attempt writes files of its own name, and only the entries of the attempt
that succeeded reach the driver (see :mod:`pipeline.spark.tasks`).
"""

from __future__ import annotations

import logging
import time
from functools import partial
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from pipeline.config import JobConfig
from pipeline.errors import SettingError, raised_in_text
from pipeline.job.engine import Engine
from pipeline.job.faults import forwarded
from pipeline.job.summary import Pace
from pipeline.output.location import OutputLocation
from pipeline.output.records import ENTRY_SCHEMA, empty_entries, rejected_rows
from pipeline.sources import Shard
from pipeline.spark.tasks import (
    TASK_ATTEMPT,
    WRITTEN_SCHEMA,
    keys_of_files,
    rows_of_files,
    scan_shards,
    upsert_files,
    write_shards,
)

APP_NAME = "splade-pipeline"
log = logging.getLogger(__name__)


def session(master: str | None = None) -> Any:
    """The active SparkSession, or a new one (``master``: e.g. ``local[2]``; default: spark-submit's)."""
    from pyspark.sql import SparkSession

    builder = SparkSession.builder.appName(APP_NAME)
    if master:
        builder = builder.master(master)
    return builder.getOrCreate()


def spark_engine(spark: Any) -> Engine:
    """The :class:`pipeline.job.engine.Engine` that runs the tasks on ``spark``."""
    gpus = float(spark.conf.get("spark.task.resource.gpu.amount", "0") or 0)
    return Engine(
        "spark",
        gpus=gpus,
        write=partial(_write, spark),
        check_output=partial(_check_output, spark),
        scan=partial(_scan, spark),
        positions=partial(_positions, spark),
        loader=partial(_load, spark),
    )


def run_spark_job(config: JobConfig, spark: Any = None) -> dict[str, Any]:
    """The encoding job (:func:`pipeline.job.encode.run_job`) with Spark running the tasks."""
    from pipeline.job.encode import run_job

    return run_job(config, engine=spark_engine(spark or session()))


def run_spark_reindex(config: JobConfig, spark: Any = None, **options: Any) -> dict[str, Any]:
    """Reindexing (:func:`pipeline.job.reindex.run_reindex`) with Spark running the tasks."""
    from pipeline.job.reindex import run_reindex

    return run_reindex(config, engine=spark_engine(spark or session()), **options)


def _numbers(spark: Any, n: int) -> Any:
    """A DataFrame of the numbers 0..n-1 in column ``id``, one per partition (one task each)."""
    return spark.range(0, n, 1, max(1, n))


def _spark_schema(schema: pa.Schema) -> Any:
    from pyspark.sql.pandas.types import from_arrow_schema

    return from_arrow_schema(schema)


def _collect(frame: Any, schema: pa.Schema) -> pa.Table:
    """The rows of ``frame`` on the driver; an error of ours raised in a task is raised here as itself
    (Spark passes it on as the text of a ``PythonException``), not as Spark's wrapper."""
    try:
        table = frame.toArrow()
    except Exception as err:
        ours = raised_in_text(str(err))
        if ours is None:
            raise
        raise ours from None
    return pa.concat_tables([schema.empty_table(), table.select(schema.names).cast(schema)])


def _write(
    spark: Any, config: JobConfig, plan: Any, work: list[Shard], attempt: str, pace: Pace
) -> tuple[pa.Table, dict[str, int]]:
    if not work:
        return empty_entries(), {}
    run = partial(
        write_shards,
        work=work,
        config=config,
        fingerprint=plan.fingerprint,
        output=plan.output,
        attempt=attempt,
        faults=forwarded(),
    )
    started = time.monotonic()
    frame = _numbers(spark, len(work)).mapInArrow(run, _spark_schema(WRITTEN_SCHEMA))
    written = _collect(frame, WRITTEN_SCHEMA)
    rows = int(pc.sum(written["rows"]).as_py() or 0)
    pace.block_written(rows)
    pace.show(rows, rejected_rows(written))
    log.info("%d rows in %d blocks written by Spark in %.1f s", rows, written.num_rows, time.monotonic() - started)
    # a task's attempt number counts its failed (or speculative) attempts before the one kept
    attempts = written.group_by("url").aggregate([(TASK_ATTEMPT, "max")])[f"{TASK_ATTEMPT}_max"]
    return written.select(ENTRY_SCHEMA.names), {"task_retries": int(pc.sum(attempts).as_py() or 0)}


def _scan(spark: Any, config: JobConfig, plan: Any) -> pa.Table:
    from pipeline.job.reindex import SCAN_SCHEMA

    if not plan.shards:
        return SCAN_SCHEMA.empty_table()
    run = partial(scan_shards, work=plan.shards, config=config)
    return _collect(_numbers(spark, len(plan.shards)).mapInArrow(run, _spark_schema(SCAN_SCHEMA)), SCAN_SCHEMA)


def _check_output(spark: Any, config: JobConfig, output: OutputLocation) -> None:
    master = spark.conf.get("spark.master", "")  # also where a Spark Connect session has no sparkContext
    if output.is_local and not master.startswith("local"):
        raise SettingError(
            f"output.path {output.url} is a local path, and Spark runs on {master}: each executor would write its "
            "own disk. Use object storage every executor reaches (s3://, gs://, abfs://, dbfs:/)"
        )


def _positions(
    spark: Any, loc: OutputLocation, files: list[str], rejected: pa.Table, compute: Any, key: str
) -> pa.Table:
    """``(id, file, pos)`` of the rows of repeated ids (:mod:`pipeline.job.dedupe`), the ids grouped by
    Spark: only the repeated ones reach the driver."""
    from pyspark.sql import functions as F

    from pipeline.job.dedupe import POSITIONS, repeated

    pairs = pa.schema([("id", pa.string()), ("file", pa.string())])
    run = partial(keys_of_files, files=files, loc=loc, key=key)
    keys = _numbers(spark, len(files)).mapInArrow(run, _spark_schema(pairs))
    if key == "id":
        counts = keys.groupBy("id").count()
    else:  # a split document's windows are rows of one file: count files
        counts = keys.groupBy("id").agg(F.countDistinct("file").alias("count"))
    found = {r["id"] for r in counts.where(F.col("count") > 1).select("id").collect()}
    wanted = sorted(found | set(rejected["id"].to_pylist()))
    if not wanted:
        return POSITIONS.empty_table()
    run = partial(rows_of_files, files=files, loc=loc, wanted=pa.array(wanted, pa.string()), key=key)
    rows = _collect(_numbers(spark, len(files)).mapInArrow(run, _spark_schema(POSITIONS)), POSITIONS)
    return repeated(pa.concat_tables([POSITIONS.empty_table(), rejected, rows]), key != "id")


def _load(
    spark: Any, loc: OutputLocation, files: list[str], config: JobConfig, dimension: int, rows: Any
) -> list[dict[str, Any]]:
    """A server store loaded by Spark tasks (a file each; ``sink.writers`` at most at once)."""
    from pipeline.job.load import raise_load_errors

    if not files:
        return []
    schema = pa.schema([("upserted", pa.int64()), ("empty", pa.int64()), ("error", pa.string())])
    run = partial(upsert_files, files=files, loc=loc, config=config, dimension=dimension, rows=rows)
    numbers = spark.range(0, len(files), 1, max(1, min(len(files), config.sink.writers)))
    return raise_load_errors(_collect(numbers.mapInArrow(run, _spark_schema(schema)), schema).to_pylist())
