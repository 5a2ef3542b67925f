"""The encoding job as a Ray Data plan: list -> read + validate -> encode (actor pool) -> write
-> record progress -> commit -> summary (-> load the store).

Everything that can fail because of the user's input or settings (nothing matched, unknown
format, missing columns, an unusable output, an unknown model) fails here on the driver,
before any cluster work. A re-run after a crash keeps what was committed (see
:mod:`pipeline.resume`).
"""

from __future__ import annotations

import json
import os
import logging
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from pipeline.config import ComputeConfig, JobConfig, redacted
from pipeline.faults import crash_point
from pipeline.fingerprint import fingerprint, model_folder
from pipeline.manifest import Progress, clean, empty_entries, join, listed_files, write_commit
from pipeline.output import DATA_DIR, REJECTS_DIR, SUMMARY_FILE, lock_output, output_fs
from pipeline.resume import Resume, assign_units, plan_resume
from pipeline.sources import Shard, check_columns, list_shards
from pipeline.stages import EncodeBlocks, WriteBlocks, read_shards
from pipeline.summary import Pace, render, summarize

log = logging.getLogger(__name__)
READER_MEMORY = 256 * 2**20
DRIVER_DEDUP_MAX_ROWS = 5_000_000
PROGRESS_EVERY_S = 10.0
STOP_ON_SIGTERM = False  # set by the command line; notebooks keep their own signal handling


@dataclass(frozen=True)
class Plan:
    shards: list[Shard]
    fingerprint: dict[str, Any]


def make_plan(config: JobConfig) -> Plan:
    """Driver-side checks and the facts every stage needs; starts nothing."""
    shards = list_shards(config.input)
    check_columns(shards[0], config.input)
    folder = model_folder(config.encoder)  # resolved (downloaded, verified) once
    _check_model_limits(config, folder)
    fp = fingerprint(config.encoder, folder)
    if config.sink.type:
        from pipeline.upsert import check_sink

        check_sink(config, fp)
    return Plan(assign_units(shards, config, fp), fp)


def encoded_dataset(config: JobConfig, plan: Plan | None = None, work: list[Shard] | None = None, attempts: Any = None) -> Any:
    """The lazy ``ray.data.Dataset`` of encoded rows, for custom use (notebooks).

    Columns: ``id``, ``sparse``, ``num_tokens``, ``truncated``, the passthrough columns, and
    the bookkeeping columns of :mod:`pipeline.sources`: rows whose ``_reject`` is not null are
    rejects (with ``sparse`` null) and are kept so that nothing disappears unseen. ``work``:
    the shards to read (default: all of the plan's); ``attempts``: the run's
    :class:`pipeline.attempts.AttemptLog` (counts retries, isolates documents that kill encoders).
    """
    import ray

    plan = plan or make_plan(config)
    ensure_ray(config.compute)
    compute = config.compute
    shards = [asdict(s) for s in (plan.shards if work is None else work)]
    ds = ray.data.from_items(shards, override_num_blocks=len(shards))
    ds = ds.map_batches(
        read_shards,
        batch_size=1,
        batch_format="pyarrow",
        fn_kwargs={"cfg": config.input},
        num_cpus=compute.io_cpus,
        # A reader holds a file buffer and one block of rows. Declaring that memory (the actors
        # declare none) also keeps Ray from fusing reading into the encoder actors: reading and
        # parsing must not hold a GPU (or the encoder's cores) while storage answers.
        memory=READER_MEMORY,
    )
    with warnings.catch_warnings():
        # Actor restart and retry limits have no named parameter in Ray Data yet (2.60): they go
        # through ray_remote_args, which warns about a future rename.
        warnings.filterwarnings("ignore", message=".*ray_remote_args.*deprecated")
        return _encode_stage(ds, config, plan, attempts)


def _write_stage(ds: Any, config: JobConfig, plan: Plan) -> Any:
    import ray

    compute = config.compute
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*ray_remote_args.*deprecated")  # as in encoded_dataset
        return ds.map_batches(
            WriteBlocks,
            batch_size=None,
            batch_format="pyarrow",
            compute=ray.data.ActorPoolStrategy(min_size=1, max_size=compute.max_writers),
            num_cpus=compute.io_cpus,
            # A writer that dies is restarted and its block written again (same file names).
            max_restarts=compute.max_actor_restarts,
            max_task_retries=compute.max_task_retries,
            fn_constructor_kwargs={
                "cfg": config.output, "fingerprint": plan.fingerprint, "passthrough": config.input.passthrough_columns,
            },
        )  # fmt: skip


def _encode_stage(ds: Any, config: JobConfig, plan: Plan, attempts: Any) -> Any:
    import ray

    compute = config.compute
    return ds.map_batches(
        EncodeBlocks,
        batch_size=None,  # one reader block per call: blocks stay whole from reader to writer
        batch_format="pyarrow",
        compute=ray.data.ActorPoolStrategy(min_size=compute.min_actors, max_size=compute.max_actors),
        num_cpus=compute.num_cpus_per_actor,
        num_gpus=compute.num_gpus_per_actor,
        max_restarts=compute.max_actor_restarts,
        max_task_retries=compute.max_task_retries,
        fn_constructor_kwargs={
            "encoder": config.encoder,
            "expected_fingerprint": plan.fingerprint,
            "threads": compute.torch_threads or max(1, int(compute.num_cpus_per_actor)),
            "attempts": attempts,
            "isolate_after": compute.isolate_after,
        },
    )


def run_job(config: JobConfig) -> dict[str, Any]:
    """Run the whole job (or finish an interrupted one); write ``_SUMMARY.json`` beside the output and return the summary."""
    start, pace = time.perf_counter(), Pace()
    log.info("config: %s", json.dumps(redacted(config)))
    plan = make_plan(config)
    fs, root = output_fs(config.output)
    with lock_output(config.output, "encode") as lock:
        resume = plan_resume(config, plan.shards, plan.fingerprint)
        _announce(resume, config)
        progress = Progress(fs, root, resume.generation, resume.meta, config.output.commit_interval_s)
        new, faults = write_work(config, plan, resume.work, progress, pace)
        entries = pa.concat_tables([resume.reused, new])
        generation = commit_output(config, resume, entries, lock)
        data_files = [fs.unstrip_protocol(join(root, f)) for f in entries["data_file"].to_pylist() if f]
        duplicates = count_duplicate_ids(data_files, config, int(pc.sum(entries["written"]).as_py() or 0))
        summary = summarize(
            entries, files=len(plan.shards), duplicate_ids=duplicates, seconds=time.perf_counter() - start,
            fingerprint=plan.fingerprint, reused_rows=resume.reused_rows,
        )  # fmt: skip
        summary["faults"] |= faults
        summary["pace"] = pace.summary()
        summary |= {"generation": generation, "output": config.output.path, "config": redacted(config)}
        _write_summary(summary, config)
    print(render(summary, config.output.path), flush=True)
    if config.sink.type:
        _load_sink(summary, config)
    return summary


def ray_get(ref: Any) -> Any:
    import ray

    return ray.get(ref)


def _announce(resume: Resume, config: JobConfig) -> None:
    if resume.reused.num_rows or resume.previous is not None:
        print(f"splade-pipeline: resuming {config.output.path}: {resume.reused_rows} rows already committed are kept; "
              f"{len(resume.work)} input files left to read", flush=True)


def write_work(config: JobConfig, plan: Plan, work: list[Shard], progress: Progress, pace: Pace) -> tuple[pa.Table, dict[str, int]]:
    """Encode and write ``work``, recording finished blocks as they arrive (and their times in
    ``pace``); return their entries and the failures ridden through (actor restarts, retried blocks)."""
    if not work:
        return empty_entries(), {}
    from pipeline.attempts import start_log

    ensure_ray(config.compute)  # before the first Ray call, which would otherwise start Ray its own way
    attempts = start_log()
    written = _write_stage(encoded_dataset(config, plan, work, attempts), config, plan)
    rows = blocks = 0
    started = last_report = time.monotonic()
    try:
        for stats in written.iter_batches(batch_size=None, batch_format="pyarrow"):
            for i in range(stats.num_rows):  # one entry per written block (piece)
                crash_point("written")
                if progress.add(stats.slice(i, 1)):
                    crash_point("progress")
            rows, blocks = rows + int(pc.sum(stats["rows"]).as_py() or 0), blocks + stats.num_rows
            pace.block_written(rows)
            if time.monotonic() - last_report >= PROGRESS_EVERY_S:
                last_report = time.monotonic()
                print(f"  ... {rows} rows in {blocks} blocks written ({rows / (last_report - started):.1f} rows/s)", flush=True)
    except BaseException:
        try:
            progress.flush()  # interrupted or failed: what is durable stays recorded for the re-run
        except Exception as err:  # noqa: BLE001 - the original failure is the one to report
            log.warning("could not record progress before stopping: %s: %s", type(err).__name__, err)
        raise
    if progress.flush():
        crash_point("progress")
    pace.encoders_ready = ray_get(attempts.encoders_ready.remote())
    return progress.entries(), ray_get(attempts.report.remote())


def commit_output(config: JobConfig, resume: Resume, entries: pa.Table, lock: Any) -> int:
    """Commit ``entries`` as the output (unless nothing changed) and delete what no commit lists."""
    fs, root = output_fs(config.output)
    generation = resume.generation
    unchanged = resume.previous is not None and not resume.work and listed_files(entries) == listed_files(resume.previous.entries)
    if unchanged:
        generation = resume.previous.generation
    else:
        lock.check()
        write_commit(fs, root, generation, entries, resume.meta)
        crash_point("commit")
    clean(fs, root, entries, generation, (DATA_DIR, REJECTS_DIR))
    return generation


def _load_sink(summary: dict[str, Any], config: JobConfig) -> None:
    from pipeline.errors import find_cause
    from pipeline.upsert import SinkError, upsert_output

    try:
        summary["sink"] = upsert_output(config)
    except Exception as raised:
        err = find_cause(raised, SinkError)  # the store's error, inside Ray's wrappers
        if err is None:
            raise
        summary["sink"] = {"error": str(err)}
        _write_summary(summary, config)
        raise SinkError(
            f"{err}\nThe Parquet output in {config.output.path} is complete; once the store is back, load it with: "
            f"splade-pipeline upsert --from {config.output.path} --config <this job's config>"
        ) from None
    _write_summary(summary, config)
    sink = summary["sink"]
    print(f"  upserted {sink['upserted']} vectors into {sink['store']} ({sink['vectors_per_s']} vectors/s); "
          f"it now holds {sink['store_count']}; empty vectors rejected: {sink['rejected_empty_vectors']}", flush=True)


def _write_summary(summary: dict[str, Any], config: JobConfig) -> None:
    fs, root = output_fs(config.output)
    with fs.open(join(root, SUMMARY_FILE), "w") as fh:
        json.dump(summary, fh, indent=2)


def count_duplicate_ids(data_files: list[str], config: JobConfig, rows: int) -> int:
    """Rows whose id was already seen in the output (only the id column is read)."""
    if not data_files:
        return 0
    import pyarrow.fs as pafs
    import pyarrow.parquet as pq

    fs, _ = output_fs(config.output)
    paths = [fs._strip_protocol(f) for f in data_files]
    if rows <= DRIVER_DEDUP_MAX_ROWS:
        # A few million ids fit the driver easily, and this costs no cluster round trip.
        ids = pa.chunked_array([pq.read_table(fs.open(p, "rb"), columns=["id"])["id"] for p in paths])
        return int(rows - pc.count_distinct(ids).as_py())
    import ray

    filesystem = pafs.PyFileSystem(pafs.FSSpecHandler(fs))
    # Few partitions: each one is a task, and the ids column is small next to the vectors.
    partitions = max(1, min(200, len(paths) // 16))
    ids = ray.data.read_parquet(paths, filesystem=filesystem).select_columns(["id"])
    counts = ids.groupby("id", num_partitions=partitions).count()
    extra = counts.map_batches(lambda b: {"extra": b["count()"] - 1}, batch_format="numpy").sum("extra")
    return int(extra or 0)


def stop_on_sigterm() -> None:
    """SIGTERM (``kill``, ``ray job stop``, a pod being evicted) stops the run as Ctrl-C does:
    progress recorded, lock released, a hint to resume."""
    import signal
    import threading

    def stop(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, stop)


def ensure_ray(compute: ComputeConfig) -> None:
    import ray

    if not ray.is_initialized():
        from pipeline.faults import forwarded

        env = forwarded()  # test-only fault injection reaches the workers; empty in production
        options: dict[str, Any] = {"log_to_driver": True, **({"runtime_env": {"env_vars": env}} if env else {})}
        if compute.ray_address is None and not os.environ.get("RAY_ADDRESS"):
            start_local_ray(**options)
        else:
            ray.init(address=compute.ray_address, **options)
        if STOP_ON_SIGTERM:
            stop_on_sigterm()  # ray.init installed its own handler, which exits without the resume hint
    cpus = ray.cluster_resources().get("CPU", 0)
    needed = compute.min_actors * compute.num_cpus_per_actor + 2 * compute.io_cpus
    if needed > cpus:
        # Not an error: an autoscaling cluster may add the nodes once asked.
        log.warning(
            "the cluster has %s CPUs now; %d encoder actors x %s CPUs + %s for a reader and a writer need %s. Unless it "
            "scales up, lower compute.min_actors or compute.num_cpus_per_actor.", cpus, compute.min_actors,
            compute.num_cpus_per_actor, 2 * compute.io_cpus, needed,
        )


def start_local_ray(**options: Any) -> None:
    """Start a Ray cluster on this machine that keeps idle task workers alive.

    Ray keeps about one idle worker process per CPU and kills the rest after a second; on a
    small machine, where the encoder actors already hold most CPUs, nearly every reader or scan
    task then starts a fresh Python process that imports pyarrow and s3fs and builds a storage
    client first. Measured on 2 cores (10,000 passages, 10 shards): the scan of a reindex with
    nothing to do took 10 s instead of 1.6 s. On a cluster started by others, the same setting is
    the ``RAY_num_workers_soft_limit`` environment variable of ``ray start``.
    """
    import ray

    ray.init(**options, _system_config={"num_workers_soft_limit": max(8, 2 * (os.cpu_count() or 1))})


def _check_model_limits(config: JobConfig, folder: Path) -> None:
    from transformers import AutoConfig

    model_config = AutoConfig.from_pretrained(folder)
    limit = getattr(model_config, "max_position_embeddings", None)
    if limit and config.encoder.max_length > limit:
        raise ValueError(f"encoder.max_length: {config.encoder.max_length} exceeds what the model accepts ({limit} positions)")
