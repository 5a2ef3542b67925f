"""The encoding job: plan -> resume plan -> encode and write -> commit one table version ->
summary (-> load the store).

The run commits once, at the end: a version of the table is always a whole run, so a reader
never sees a half-encoded corpus, and the log grows by one version per run. A re-run after a
crash keeps every block already written, committed or not (see :mod:`pipeline.job.resume`).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from typing import Any

import pyarrow as pa

from pipeline.config import JobConfig, redacted
from pipeline.job.dedupe import drop_later_duplicates
from pipeline.job.engine import RAY, Engine
from pipeline.job.plan import make_plan
from pipeline.job.progress import Progress
from pipeline.job.resume import Resume, plan_resume
from pipeline.job.runs import RunRecord
from pipeline.job.steps import commit, finish, store_errors, track
from pipeline.job.summary import Pace, render, summarize
from pipeline.output.layout import document_column, fingerprint_metadata, pooled_length, write_summary
from pipeline.output.location import OutputLocation

log = logging.getLogger(__name__)


def run_job(
    config: JobConfig, *, engine: Engine = RAY, on_progress: Callable[[Progress], None] | None = None
) -> dict[str, Any]:
    """Run the whole job (or finish an interrupted one); write ``_SUMMARY.json`` and ``_REPORT.html``
    beside the output and return the summary. ``engine``: what runs the tasks (Ray; Spark in
    :mod:`pipeline.spark`); ``on_progress``: called with a :class:`Progress` as blocks are written
    (default: a live line on stdout; :func:`pipeline.job.progress.notebook_bar` for a notebook)."""
    config = engine.configure(config)
    start, pace = time.perf_counter(), Pace()
    log.info("config: %s", json.dumps(redacted(config)))
    plan = make_plan(config)
    loc = plan.output
    engine.check_output(config, loc)
    resume = plan_resume(config, plan.shards, plan.fingerprint, loc)
    _announce(resume, config)
    with RunRecord(loc, resume.attempt, "encode", engine.name) as record:
        track(pace, plan.shards, config, resume.reused, on_progress, record)
        new, faults = engine.write(config, plan, resume.work, resume.attempt, pace)
        pace.progress.finish()
        entries = pa.concat_tables([resume.reused, new])
        urls = [s.url for s in plan.shards]
        metadata = fingerprint_metadata(plan.fingerprint)
        key = document_column(config.encoder.long_documents == "split")
        pooled = pooled_length(plan.fingerprint)
        entries = drop_later_duplicates(
            loc,
            entries,
            urls,
            resume.attempt,
            config.output.compression,
            metadata,
            config.compute,
            key,
            pooled,
            engine.positions,
        )
        version = commit(config, plan, resume.base, entries, resume.meta, resume.attempt)  # no change: no version
        record.committed(version)
    summary = summarize(
        entries,
        files=len(plan.shards),
        seconds=time.perf_counter() - start,
        fingerprint=plan.fingerprint,
        reused_rows=resume.reused_rows,
    )
    summary["faults"] |= faults
    summary["pace"] = pace.summary()
    summary["engine"] = engine.name
    finish(summary, config, loc, version)
    print(render(summary, config.output.path), flush=True)
    if config.sink.type:
        _load_sink(summary, config, loc, engine)
    return summary


def _announce(resume: Resume, config: JobConfig) -> None:
    if resume.reused.num_rows:
        print(
            f"splade-pipeline: resuming {config.output.path}: {resume.reused_rows} rows already written are kept; "
            f"{len(resume.work)} input files left to read",
            flush=True,
        )


def _load_sink(summary: dict[str, Any], config: JobConfig, loc: OutputLocation, engine: Engine) -> None:
    from pipeline.errors import find_cause
    from pipeline.job.load import sync_store
    from pipeline.sinks import SinkError

    try:
        summary["sink"] = sync_store(config, loc, loader=engine.loader)
    except Exception as raised:
        err = find_cause(raised, SinkError)  # the store's error, inside Ray's wrappers
        if err is None:
            raise
        summary["sink"] = {"error": str(err)}
        write_summary(loc, summary)
        raise SinkError(
            f"{err}\nThe table in {config.output.path} is committed; once the store is back, run the same command "
            "again (it loads the store from the version it was last loaded from) or load it in full with: "
            f"splade-pipeline upsert --from {config.output.path} --config <this job's config>"
        ) from None
    sink = summary["sink"]
    print(
        f"  upserted {sink['upserted']} vectors into {sink['store']} ({sink['vectors_per_s']} vectors/s); "
        f"it now holds {sink['store_count']}; empty vectors rejected: {sink['rejected_empty_vectors']}",
        flush=True,
    )
    store_errors(summary, sink)
    write_summary(loc, summary)
