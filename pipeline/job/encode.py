"""The encoding job: plan -> lock -> resume plan -> encode and write (recording progress) ->
commit -> summary (-> load the store).

A re-run after a crash keeps what was committed or recorded (see :mod:`pipeline.job.resume`).
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from pipeline.config import JobConfig, redacted
from pipeline.job.plan import check_output_reachable, make_plan
from pipeline.job.resume import Resume, plan_resume
from pipeline.job.steps import OUTPUT_FOLDERS, commit, finish, write_work
from pipeline.job.summary import Pace, render, summarize
from pipeline.output.commits import Progress, clean, listed_files
from pipeline.output.layout import write_summary
from pipeline.output.location import OutputLocation
from pipeline.output.lock import lock_output

log = logging.getLogger(__name__)
DRIVER_DEDUP_MAX_ROWS = 5_000_000


def run_job(config: JobConfig) -> dict[str, Any]:
    """Run the whole job (or finish an interrupted one); write ``_SUMMARY.json`` beside the output
    and return the summary."""
    start, pace = time.perf_counter(), Pace()
    log.info("config: %s", json.dumps(redacted(config)))
    plan = make_plan(config)
    loc = plan.output
    check_output_reachable(config, loc)
    with lock_output(loc, "encode", config.output.lock_ttl_s) as lock:
        resume = plan_resume(config, plan.shards, plan.fingerprint, loc)
        _announce(resume, config)
        progress = Progress(loc, resume.generation, resume.meta, config.output.commit_interval_s)
        new, faults = write_work(config, plan, resume.work, progress, pace)
        entries = pa.concat_tables([resume.reused, new])
        if _unchanged(resume, entries):
            generation = resume.previous.generation
            clean(loc, entries, generation, OUTPUT_FOLDERS)
        else:
            generation = resume.generation
            commit(loc, lock, generation, entries, resume.meta)
        data_files = [f for f in entries["data_file"].to_pylist() if f]
        duplicates = count_duplicate_ids(loc, data_files, int(pc.sum(entries["written"]).as_py() or 0))
        summary = summarize(
            entries,
            files=len(plan.shards),
            duplicate_ids=duplicates,
            seconds=time.perf_counter() - start,
            fingerprint=plan.fingerprint,
            reused_rows=resume.reused_rows,
        )
        summary["faults"] |= faults
        summary["pace"] = pace.summary()
        finish(summary, config, loc, generation)
    print(render(summary, config.output.path), flush=True)
    if config.sink.type:
        _load_sink(summary, config, loc)
    return summary


def _unchanged(resume: Resume, entries: pa.Table) -> bool:
    """Nothing to commit: a re-run of a finished job found every file committed already."""
    previous = resume.previous
    return previous is not None and not resume.work and listed_files(entries) == listed_files(previous.entries)


def _announce(resume: Resume, config: JobConfig) -> None:
    if resume.reused.num_rows or resume.previous is not None:
        print(
            f"splade-pipeline: resuming {config.output.path}: {resume.reused_rows} rows already committed are kept; "
            f"{len(resume.work)} input files left to read",
            flush=True,
        )


def _load_sink(summary: dict[str, Any], config: JobConfig, loc: OutputLocation) -> None:
    from pipeline.errors import find_cause
    from pipeline.job.load import upsert_output
    from pipeline.sinks import SinkError

    try:
        summary["sink"] = upsert_output(config)
    except Exception as raised:
        err = find_cause(raised, SinkError)  # the store's error, inside Ray's wrappers
        if err is None:
            raise
        summary["sink"] = {"error": str(err)}
        write_summary(loc, summary)
        raise SinkError(
            f"{err}\nThe Parquet output in {config.output.path} is complete; once the store is back, load it with: "
            f"splade-pipeline upsert --from {config.output.path} --config <this job's config>"
        ) from None
    write_summary(loc, summary)
    sink = summary["sink"]
    print(
        f"  upserted {sink['upserted']} vectors into {sink['store']} ({sink['vectors_per_s']} vectors/s); "
        f"it now holds {sink['store_count']}; empty vectors rejected: {sink['rejected_empty_vectors']}",
        flush=True,
    )


def count_duplicate_ids(loc: OutputLocation, data_files: list[str], rows: int) -> int:
    """Rows whose id was already seen in the output's ``data_files`` (only the id column is read)."""
    if not data_files:
        return 0
    if rows <= DRIVER_DEDUP_MAX_ROWS:
        # A few million ids fit the driver easily, and this costs no cluster round trip.
        ids = pa.chunked_array([loc.read_parquet(f, columns=["id"])["id"] for f in data_files])
        return int(rows - pc.count_distinct(ids).as_py())
    import pyarrow.fs as pafs
    import ray

    filesystem = pafs.PyFileSystem(pafs.FSSpecHandler(loc.fs))
    # Few partitions: each one is a task, and the ids column is small next to the vectors.
    partitions = max(1, min(200, len(data_files) // 16))
    ids = ray.data.read_parquet([loc.path(f) for f in data_files], filesystem=filesystem).select_columns(["id"])
    counts = ids.groupby("id", num_partitions=partitions).count()
    extra = counts.map_batches(lambda b: {"extra": b["count()"] - 1}, batch_format="numpy").sum("extra")
    return int(extra or 0)
