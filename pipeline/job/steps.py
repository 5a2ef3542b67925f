"""The steps every run takes, the encoding job and reindex alike: encode and write the work,
commit the resulting table state as one Delta version, and finish with the summary.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from functools import partial
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from pipeline.config import JobConfig, redacted
from pipeline.errors import actor_start_error
from pipeline.job.cluster import ensure_ray
from pipeline.job.faults import crash_point, pause_point
from pipeline.job.plan import Plan, encoded_dataset, written_dataset
from pipeline.job.progress import Printer, Progress, expected_rows
from pipeline.job.runs import RunRecord
from pipeline.job.summary import Pace, check_rows
from pipeline.job.watch import ClusterWatch
from pipeline.output.layout import DATA_COLUMNS, WINDOW_COLUMNS, write_summary
from pipeline.output.location import OutputLocation
from pipeline.output.records import empty_entries, rejected_rows
from pipeline.output.state import Committed, commit_state, sync_rejects
from pipeline.sources import Shard

log = logging.getLogger(__name__)
LIVE_EVERY_S = 2.0  # how often the progress line asks the attempt log (encoders up, rows encoded)
RESULTS_THREAD = "splade-pipeline-results"  # the CLI looks for it before shutting Ray down
WATCH_EVERY_S = 5.0  # how often the cluster is looked at while no block finishes


def write_work(
    config: JobConfig, plan: Plan, work: list[Shard], attempt: str, pace: Pace
) -> tuple[pa.Table, dict[str, int]]:
    """Encode and write ``work`` (file names carry ``attempt``); return the entries of the written
    files (their times and the nodes that did the work in ``pace``) and the failures ridden through
    (actor restarts, retried blocks, nodes lost).

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
    encoded = encoded_dataset(config, plan, work, attempts, attempt)
    entries = _collect(written_dataset(config, plan, encoded, attempt, attempts), pace, watch, partial(_live, attempts))
    pace.encoded = ray.get(attempts.encoded_per_second.remote(pace.started))
    pace.encoders_ready = ray.get(attempts.encoders_ready.remote())
    pace.nodes = ray.get(attempts.placement.remote())
    return entries, ray.get(attempts.report.remote()) | watch.report()


def track(
    pace: Pace,
    shards: list[Shard],
    config: JobConfig,
    reused: pa.Table,
    on_progress: Callable[[Progress], None] | None,
    record: RunRecord,
) -> None:
    """Set up ``pace.progress`` before the work: the total of ``shards`` where cheap (see
    :func:`pipeline.job.progress.expected_rows`), the rows ``reused`` from an earlier attempt as
    done, and who is told: ``on_progress`` (default: a :class:`Printer` on stdout) and the run's
    ``record`` in the output."""
    progress = pace.progress
    progress.total, progress.estimated = expected_rows(shards, config.input)
    progress.reused = progress.done = int(pc.sum(reused["rows"]).as_py() or 0)
    pace.reused_rejected = progress.rejected = rejected_rows(reused)
    print(_plan_line(config, shards, progress, record.record["engine"]), flush=True)
    show: Callable[[Progress], None] | None = on_progress if on_progress is not None else Printer()

    def tell(p: Progress) -> None:
        nonlocal show
        if show is not None:
            try:
                show(p)
            except Exception as err:  # noqa: BLE001 - showing progress never fails a run (a closed pipe, a widget)
                log.warning("progress is no longer shown: %s: %s", type(err).__name__, err)
                show = None
        record(p)

    progress.on_update = tell


def _plan_line(config: JobConfig, shards: list[Shard], progress: Progress, engine: str) -> str:
    """What the run is about to do: files, documents (where counted), model, device, encoders, output."""
    total, mark = progress.total, "~" if progress.estimated else ""
    docs = f"{mark}{total:,} documents" if total is not None else "documents not counted ahead"
    compute = config.compute
    device = "GPU" if compute.num_gpus_per_actor > 0 else "CPU"
    if engine == "ray":
        pool = (
            compute.min_actors
            if compute.min_actors == compute.max_actors
            else f"{compute.min_actors}-{compute.max_actors}"
        )
        workers = f"{pool} encoder actor{'s' if compute.max_actors > 1 else ''} on {device}"
    else:
        workers = f"{engine} tasks on {device}"
    files = f"{len(shards)} input file{'s' if len(shards) != 1 else ''}"
    return f"splade-pipeline: {files}, {docs}; model {config.encoder.model}; {workers} -> {config.output.path}"


def _collect(written: Any, pace: Pace, watch: ClusterWatch, live: Callable[[], tuple[int | None, int]]) -> pa.Table:
    """The entries of the written blocks, as they come. The dataset is driven from a thread, so
    that this one can say what the cluster does meanwhile (nodes lost, no node for an encoder:
    see :class:`ClusterWatch`), show progress (``live()``: encoders up and rows encoded so far,
    asked every :data:`LIVE_EVERY_S`) and give up after the deadline instead of waiting without a
    word. Whatever ends this loop early (the deadline, Ctrl-C, an error) stops the dataset's
    execution too: a notebook's process goes on, and must not keep a pool of actors working for nobody."""
    rows = rejected = encoded = 0
    up: int | None = None
    parts = [empty_entries()]
    asked = 0.0

    def show() -> None:
        nonlocal asked, up, encoded
        if time.monotonic() - asked >= LIVE_EVERY_S:
            asked = time.monotonic()
            now_up, now_encoded = live()
            if now_up is not None:  # else the log did not answer in time: what it said last stands
                up, encoded = now_up, max(encoded, now_encoded)
        pace.show(max(rows, encoded), rejected, up)  # encoded: ahead of the written blocks Ray Data hands over

    watched = time.monotonic()

    def idle() -> None:
        nonlocal watched
        if time.monotonic() - watched >= WATCH_EVERY_S:
            watched = time.monotonic()
            watch.check()
        show()

    pump = _Pump(written)
    try:
        for stats in pump.results(idle, LIVE_EVERY_S):
            for _ in range(stats.num_rows):  # one entry per written block (piece): its files are durable
                crash_point("written")
            parts.append(stats.cast(empty_entries().schema))
            rows, rejected = rows + int(pc.sum(stats["rows"]).as_py() or 0), rejected + rejected_rows(stats)
            pace.block_written(rows)
            show()
            watch.check()
    except BaseException:
        pump.stop()
        raise
    asked = 0.0
    show()  # encoders up, asked once more
    pace.show(rows, rejected, up, exact=True)  # the written rows: exact, whatever was encoded twice
    return pa.concat_tables(parts)


def _live(attempts: Any) -> tuple[int | None, int]:
    """Encoder actors up and rows encoded so far, by the run's attempt log (``(None, 0)`` when it does
    not answer within a second: the line shows what it knew)."""
    import ray

    try:
        up, encoded = ray.get(attempts.live.remote(), timeout=1.0)
        return int(up), int(encoded)
    except Exception:  # noqa: BLE001 - a busy log
        return None, 0


class _Pump:
    """Drives a Ray Data dataset in a thread (:data:`RESULTS_THREAD`), its batches handed over
    through a bounded queue; :meth:`stop` ends the dataset's execution from the outside."""

    def __init__(self, dataset: Any) -> None:
        self.dataset = dataset
        self.queue: queue.Queue[tuple[str, Any]] = queue.Queue(maxsize=256)
        self.stopping = threading.Event()
        self.before = set(threading.enumerate())
        self.thread = threading.Thread(target=self._run, name=RESULTS_THREAD, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            for stats in self.dataset.iter_batches(batch_size=None, batch_format="pyarrow"):
                if not self._put(("stats", stats)):
                    return
            self._put(("done", None))
        except BaseException as err:  # noqa: BLE001 - handed to the main thread, which raises it
            self._put(("error", err))

    def _put(self, item: tuple[str, Any]) -> bool:
        while not self.stopping.is_set():
            try:
                self.queue.put(item, timeout=0.5)
                return True
            except queue.Full:
                continue
        return False

    def results(self, idle: Any, every_s: float) -> Any:
        """The batches as they come; ``idle()`` is called every ``every_s`` without one."""
        while True:
            try:
                kind, item = self.queue.get(timeout=every_s)
            except queue.Empty:
                idle()
                continue
            if kind == "done":
                return
            if kind == "error":
                known = actor_start_error(item)
                if known is not None:
                    raise known from item
                raise item
            yield item

    def stop(self, wait_s: float = 20.0) -> None:
        """Stop the dataset's execution (its executor thread, its actors) and the thread driving it;
        an executor that starts meanwhile (the stop came while Ray Data planned) is stopped too."""
        self.stopping.set()
        stopped: set[Any] = set()
        deadline = time.monotonic() + wait_s
        while True:
            for executor in self._executors():
                if executor in stopped:
                    continue
                stopped.add(executor)
                try:
                    executor.shutdown(force=True)
                except Exception as err:  # noqa: BLE001 - stopping anyway; said, not raised over the real error
                    log.warning("stopping the dataset's execution: %s", err)
            if not self.thread.is_alive() or time.monotonic() >= deadline:
                return
            self.thread.join(timeout=0.2)

    def _executors(self) -> list[Any]:
        """The Ray Data executors started since this pump began: each runs as a thread of its own
        (Ray Data's StreamingExecutor), found by that rather than through Ray's private attributes."""
        return [
            t
            for t in threading.enumerate()
            if t not in self.before and type(t).__name__ == "StreamingExecutor" and hasattr(t, "shutdown")
        ]


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
    windows = WINDOW_COLUMNS if config.encoder.long_documents == "split" else []
    return pa.schema(
        [
            *zip(DATA_COLUMNS, types, strict=True),
            *windows,
            *((c, pa.string()) for c in config.input.passthrough_columns),
        ]
    )


def finish(
    summary: dict[str, Any], config: JobConfig, loc: OutputLocation, version: int, report: bool = True
) -> dict[str, Any]:
    """Add what every summary names (table version, output, the config with secrets masked), write
    the run report (:mod:`pipeline.report`; not ``report``: the one there is kept, that of the run
    that wrote the table's version) and the summary."""
    from pipeline.output.layout import REPORT_FILE
    from pipeline.report import write_report

    summary |= {"table_version": version, "output": config.output.path, "config": redacted(config)}
    if report:
        summary["report"] = write_report(loc, summary, config.output.table_options)
    else:
        try:
            summary["report"] = loc.url_of(REPORT_FILE) if loc.exists(REPORT_FILE) else None
        except Exception:  # noqa: BLE001 - a view: never fails a committed run
            summary["report"] = None
    write_summary(loc, summary)
    return summary


def store_errors(summary: dict[str, Any], loaded: dict[str, Any]) -> None:
    """Put a store count that does not match the table into the summary's ``errors`` and say it."""
    if loaded.get("count_error"):
        summary.setdefault("errors", []).append(f"store: {loaded['count_error']}")
        print(f"  ERROR: store: {loaded['count_error']}", flush=True)
