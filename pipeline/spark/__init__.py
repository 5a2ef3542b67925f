"""The job on Spark: the same reading, validation, encoding, files and commit as the Ray job, with
Spark scheduling the tasks (pyspark is imported in this package only).

- ``tasks``: what one Spark task runs (read shards, encode, write files; load a store's batch),
  with one encoder per Python worker kept across tasks
- ``job``: ``run_spark_job`` (the encoding job: plan, resume, write, deduplicate, commit, summary, store)
- ``frames``: ``encode_dataframe`` for notebooks (a DataFrame of id and text in, vectors out)
"""

from __future__ import annotations

from typing import Any

__all__ = ["encode_dataframe", "run_spark_job"]


def __getattr__(name: str) -> Any:
    if name == "encode_dataframe":
        from pipeline.spark.frames import encode_dataframe

        return encode_dataframe
    if name == "run_spark_job":
        from pipeline.spark.job import run_spark_job

        return run_spark_job
    raise AttributeError(name)
