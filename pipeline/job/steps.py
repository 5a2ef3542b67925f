"""The steps every run takes, the encoding job and reindex alike: encode and write the work while
recording progress, commit, and finish with the summary.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from pipeline.config import JobConfig, redacted
from pipeline.job.cluster import ensure_ray
from pipeline.job.faults import crash_point
from pipeline.job.plan import Plan, encoded_dataset, written_dataset
from pipeline.job.summary import Pace
from pipeline.output.commits import Progress, clean, empty_entries, write_commit
from pipeline.output.layout import DATA_DIR, REJECTS_DIR, write_summary
from pipeline.output.location import OutputLocation
from pipeline.output.lock import RunLock
from pipeline.sources import Shard

log = logging.getLogger(__name__)
PROGRESS_EVERY_S = 10.0
OUTPUT_FOLDERS = (DATA_DIR, REJECTS_DIR)


def write_work(
    config: JobConfig, plan: Plan, work: list[Shard], progress: Progress, pace: Pace
) -> tuple[pa.Table, dict[str, int]]:
    """Encode and write ``work``, recording finished blocks as they arrive (and their times in
    ``pace``); return their entries and the failures ridden through (actor restarts, retried blocks)."""
    if not work:
        return empty_entries(), {}
    import ray

    from pipeline.job.attempts import start_log

    ensure_ray(config.compute)  # before the first Ray call, which would otherwise start Ray its own way
    attempts = start_log()
    written = written_dataset(config, plan, encoded_dataset(config, plan, work, attempts))
    try:
        _record(written, progress, pace)
    except BaseException:
        try:
            progress.flush()  # interrupted or failed: what is durable stays recorded for the re-run
        except Exception as err:  # noqa: BLE001 - the original failure is the one to report
            log.warning("could not record progress before stopping: %s: %s", type(err).__name__, err)
        raise
    if progress.flush():
        crash_point("progress")
    pace.encoders_ready = ray.get(attempts.encoders_ready.remote())
    return progress.entries(), ray.get(attempts.report.remote())


def _record(written: Any, progress: Progress, pace: Pace) -> None:
    rows = blocks = 0
    started = last_report = time.monotonic()
    for stats in written.iter_batches(batch_size=None, batch_format="pyarrow"):
        for i in range(stats.num_rows):  # one entry per written block (piece)
            crash_point("written")
            if progress.add(stats.slice(i, 1)):
                crash_point("progress")
        rows, blocks = rows + int(pc.sum(stats["rows"]).as_py() or 0), blocks + stats.num_rows
        pace.block_written(rows)
        if time.monotonic() - last_report >= PROGRESS_EVERY_S:
            last_report = time.monotonic()
            rate = rows / (last_report - started)
            print(f"  ... {rows} rows in {blocks} blocks written ({rate:.1f} rows/s)", flush=True)


def commit(loc: OutputLocation, lock: RunLock, generation: int, entries: pa.Table, meta: dict[str, Any]) -> None:
    """Commit ``entries`` as generation ``generation`` (while this run holds the lock), then delete
    the files no commit lists."""
    lock.check()
    write_commit(loc, generation, entries, meta)
    crash_point("commit")
    clean(loc, entries, generation, OUTPUT_FOLDERS)


def finish(summary: dict[str, Any], config: JobConfig, loc: OutputLocation, generation: int) -> dict[str, Any]:
    """Add what every summary names (generation, output, the config with secrets masked) and write it."""
    summary |= {"generation": generation, "output": config.output.path, "config": redacted(config)}
    write_summary(loc, summary)
    return summary
