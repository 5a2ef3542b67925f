"""The steps every run takes, the encoding job and reindex alike: encode and write the work,
commit the resulting table state as one Delta version, and finish with the summary.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from pipeline.config import JobConfig, redacted
from pipeline.job.cluster import ensure_ray
from pipeline.job.faults import crash_point, pause_point
from pipeline.job.plan import Plan, encoded_dataset, written_dataset
from pipeline.job.summary import Pace, check_rows
from pipeline.job.watch import ClusterWatch
from pipeline.output.layout import DATA_COLUMNS, write_summary
from pipeline.output.location import OutputLocation
from pipeline.output.records import empty_entries
from pipeline.output.state import Committed, commit_state, sync_rejects
from pipeline.sources import Shard

log = logging.getLogger(__name__)
PROGRESS_EVERY_S = 10.0
RESULTS_THREAD = "splade-pipeline-results"  # the CLI looks for it before shutting Ray down
WATCH_EVERY_S = 5.0  # how often the cluster is looked at while no block finishes


def write_work(
    config: JobConfig, plan: Plan, work: list[Shard], attempt: str, pace: Pace
) -> tuple[pa.Table, dict[str, int]]:
    """Encode and write ``work`` (file names carry ``attempt``); return the entries of the written
    files (their times in ``pace``) and the failures ridden through (actor restarts, retried blocks).

    Nothing is recorded besides the files: each carries its entry in its footer, so a re-run
    after a kill finds every block written so far (see :mod:`pipeline.output.records`).
    """
    if not work:
        return empty_entries(), {}
    import ray

    from pipeline.job.attempts import start_log

    ensure_ray(config.compute)  # before the first Ray call, which would otherwise start Ray its own way
    attempts = start_log()
    watch = ClusterWatch(config.compute)
    written = written_dataset(config, plan, encoded_dataset(config, plan, work, attempts), attempt)
    entries = _collect(written, pace, watch)
    pace.encoders_ready = ray.get(attempts.encoders_ready.remote())
    return entries, ray.get(attempts.report.remote()) | watch.report()


def _collect(written: Any, pace: Pace, watch: ClusterWatch) -> pa.Table:
    """The entries of the written blocks, as they come. The dataset is driven from a thread, so
    that this one can say what the cluster does meanwhile (nodes lost, no node for an encoder:
    see :class:`ClusterWatch`) and give up after the deadline instead of waiting without a word."""
    rows = blocks = 0
    parts = [empty_entries()]
    started = last_report = time.monotonic()
    results: queue.Queue[tuple[str, Any]] = queue.Queue(maxsize=256)

    def pump() -> None:
        try:
            for stats in written.iter_batches(batch_size=None, batch_format="pyarrow"):
                results.put(("stats", stats))
            results.put(("done", None))
        except BaseException as err:  # noqa: BLE001 - handed to the main thread, which raises it
            results.put(("error", err))

    threading.Thread(target=pump, name=RESULTS_THREAD, daemon=True).start()
    while True:
        try:
            kind, stats = results.get(timeout=WATCH_EVERY_S)
        except queue.Empty:
            watch.check()
            continue
        if kind == "done":
            break
        if kind == "error":
            raise stats
        for _ in range(stats.num_rows):  # one entry per written block (piece): its files are durable
            crash_point("written")
        parts.append(stats.cast(empty_entries().schema))
        rows, blocks = rows + int(pc.sum(stats["rows"]).as_py() or 0), blocks + stats.num_rows
        pace.block_written(rows)
        if time.monotonic() - last_report >= PROGRESS_EVERY_S:
            last_report = time.monotonic()
            watch.check()
            rate = rows / (last_report - started)
            print(f"  ... {rows} rows in {blocks} blocks written ({rate:.1f} rows/s)", flush=True)
    return pa.concat_tables(parts)


def commit(
    config: JobConfig, plan: Plan, base: Committed | None, entries: pa.Table, record: dict[str, Any], attempt: str
) -> int:
    """Commit ``entries`` (the whole table state) as the version after ``base``; returns it."""
    check_rows(entries)  # nothing lost or doubled, checked before anything is committed
    crash_point("before_commit")
    pause_point("before_commit")
    options = config.output.table_options
    version = commit_state(plan.output, options, base, entries, record, attempt, empty_schema(config))
    crash_point("commit")
    sync_rejects(plan.output, options, version, entries, attempt)
    crash_point("committed")
    return version


def empty_schema(config: JobConfig) -> pa.Schema:
    """The table's columns where no data file gives them (every row rejected): passthrough as text."""
    from pipeline.encode.sparse import SPARSE_TYPE

    types = [pa.string(), pa.int64(), SPARSE_TYPE, pa.int32(), pa.bool_()]
    return pa.schema(
        [*zip(DATA_COLUMNS, types, strict=True), *((c, pa.string()) for c in config.input.passthrough_columns)]
    )


def finish(summary: dict[str, Any], config: JobConfig, loc: OutputLocation, version: int) -> dict[str, Any]:
    """Add what every summary names (table version, output, the config with secrets masked) and write it."""
    summary |= {"table_version": version, "output": config.output.path, "config": redacted(config)}
    write_summary(loc, summary)
    return summary


def store_errors(summary: dict[str, Any], loaded: dict[str, Any]) -> None:
    """Put a store count that does not match the table into the summary's ``errors`` and say it."""
    if loaded.get("count_error"):
        summary.setdefault("errors", []).append(f"store: {loaded['count_error']}")
        print(f"  ERROR: store: {loaded['count_error']}", flush=True)
