"""The Ray Data plan every run builds: read + validate (tasks) -> encode (actor pool) -> write
(writer actors); and the driver-side plan that comes before it.

Everything that can fail because of the user's input or settings (nothing matched, unknown
format, missing columns, an unusable output, an unknown model, sink settings) fails in
:func:`make_plan`, on the driver, before any cluster work.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa

from pipeline.config import ComputeConfig, JobConfig
from pipeline.encode.bundled import model_errors_named
from pipeline.encode.fingerprint import Fingerprint, fingerprint, model_folder
from pipeline.errors import SettingError
from pipeline.job.cluster import ensure_ray, placed
from pipeline.job.resume import assign_units
from pipeline.job.stages import EncodeBlocks, WriteBlocks, read_shards
from pipeline.output.location import OutputLocation
from pipeline.sources import Shard, check_columns, list_shards
from pipeline.storage import url_to_fs

READER_MEMORY = 256 * 2**20


@dataclass(frozen=True)
class Plan:
    shards: list[Shard]
    fingerprint: Fingerprint
    output: OutputLocation


def make_plan(config: JobConfig) -> Plan:
    """Driver-side checks and the facts every stage needs; starts nothing."""
    shards = list_shards(config.input)
    check_columns(shards[0], config.input)
    folder = model_folder(config.encoder)  # resolved (downloaded, verified) once
    _check_model_limits(config, folder)
    fp = fingerprint(config.encoder, folder, config.compute.num_gpus_per_actor)
    output = OutputLocation.of(config.output)
    check_apart(config.input.paths, config.input.storage_options, output)
    if config.sink.type:
        from pipeline.job.load import check_sink

        check_sink(config.sink, fp)
    return Plan(assign_units(shards, config, fp), fp, output)


def check_apart(inputs: list[str], storage_options: dict[str, Any], output: OutputLocation) -> None:
    """Refuse an output inside an input (its files would be read back as input next time) or an
    input inside the output."""
    for path in inputs:
        fs, root = url_to_fs(path, storage_options)
        static = root.split("*", 1)[0].split("?", 1)[0].split("[", 1)[0].rstrip("/")  # a glob's fixed prefix
        if type(fs) is not type(output.fs):
            continue
        inside = output.root == static or output.root.startswith(static + "/")
        holds = static.startswith(output.root + "/")
        if inside or holds:
            relation = "is inside" if inside else "contains"
            raise SettingError(
                f"output.path {output.url} {relation} the input {path}: its files would be read back as input on the "
                "next run; use an output location apart from the input"
            )


def check_output_reachable(config: JobConfig, output: OutputLocation) -> None:
    """A local output on a cluster of several nodes would be scattered over each node's own disk.
    Checked before a run takes the lock or clears anything; a cluster this process starts itself
    has one node, so only a joined one is asked."""
    if not output.is_local or not (config.compute.ray_address or os.environ.get("RAY_ADDRESS")):
        return
    import ray

    ensure_ray(config.compute)
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    if output.is_local and len(nodes) > 1:
        raise SettingError(
            f"output.path {output.url} is a local path, and the cluster has {len(nodes)} nodes: each writer would "
            "write its own node's disk. Use shared storage (s3://, gs://, a mounted shared filesystem given as an "
            "fsspec URL)"
        )


def read_dataset(config: JobConfig, shards: list[Shard], fn: Callable[..., Iterator[pa.Table]] = read_shards) -> Any:
    """``fn(shard rows, cfg=config.input)`` over ``shards``, one Ray task per shard: blocks of rows."""
    import ray

    ensure_ray(config.compute)
    limit_object_store(config.compute)
    items = [asdict(s) for s in shards]
    return ray.data.from_items(items, override_num_blocks=len(items)).map_batches(
        fn,
        batch_size=1,
        batch_format="pyarrow",
        fn_kwargs={"cfg": config.input},
        num_cpus=config.compute.io_cpus,
        # A reader holds a file buffer and one block of rows. Declaring that memory (the actors
        # declare none) also keeps Ray from fusing reading into the encoder actors: reading and
        # parsing must not hold a GPU (or the encoder's cores) while storage answers.
        memory=READER_MEMORY,
        **placed(config.compute.io_resources),
    )


def limit_object_store(compute: ComputeConfig) -> None:
    """Cap the object store memory the run's blocks hold (compute.object_store_memory_limit): Ray
    Data stops launching reads while the cap is reached, so reading never outruns encoding."""
    import ray

    if compute.object_store_memory_limit is not None:
        options = ray.data.DataContext.get_current().execution_options  # this process's Ray Data context
        options.resource_limits = options.resource_limits.copy(object_store_memory=compute.object_store_memory_limit)


def encoded_dataset(
    config: JobConfig,
    plan: Plan | None = None,
    work: list[Shard] | None = None,
    attempts: Any = None,
    attempt: str = "",
) -> Any:
    """The lazy ``ray.data.Dataset`` of encoded rows, for custom use (notebooks).

    Columns: ``id``, ``sparse``, ``num_tokens``, ``truncated``, the passthrough columns, and
    the bookkeeping columns of :mod:`pipeline.sources`: rows whose ``_reject`` is not null are
    rejects (with ``sparse`` null) and are kept so that nothing disappears unseen. ``work``:
    the shards to read (default: all of the plan's); ``attempts``: the run's
    :class:`pipeline.job.attempts.AttemptLog` (counts retries, isolates documents that kill encoders,
    bounds deaths while starting); without it (the default here) none of that happens, and an
    encoder that dies while starting is restarted as often as ``compute.max_actor_restarts`` allows.
    """
    import ray

    plan = plan or make_plan(config)
    compute = config.compute
    ds = read_dataset(config, plan.shards if work is None else work)
    with _ray_remote_args_accepted():
        return ds.map_batches(
            EncodeBlocks,
            batch_size=None,  # one reader block per call: blocks stay whole from reader to writer
            batch_format="pyarrow",
            compute=ray.data.ActorPoolStrategy(
                min_size=compute.min_actors,
                max_size=compute.max_actors,
                max_tasks_in_flight_per_actor=compute.max_blocks_in_flight_per_actor,
            ),
            num_cpus=compute.num_cpus_per_actor,
            num_gpus=compute.num_gpus_per_actor,
            max_restarts=compute.max_actor_restarts,
            max_task_retries=compute.max_task_retries,
            **placed(compute.encoder_resources, compute.accelerator_type),
            fn_constructor_kwargs={
                "encoder": config.encoder,
                "expected": plan.fingerprint,
                "threads": compute.torch_threads or max(1, int(compute.num_cpus_per_actor)),
                "attempts": attempts,
                "run": attempt,
                "isolate_after": compute.isolate_after,
                "max_deaths": compute.max_startup_deaths,
            },
        )


def written_dataset(config: JobConfig, plan: Plan, encoded: Any, attempt: str, attempts: Any = None) -> Any:
    """``encoded`` written by a pool of writer actors: one row of stats per written block (piece);
    file names carry ``attempt``; ``attempts``: the run's attempt log (bounds the deaths of writers)."""
    import ray

    compute = config.compute
    with _ray_remote_args_accepted():
        return encoded.map_batches(
            WriteBlocks,
            batch_size=None,
            batch_format="pyarrow",
            compute=ray.data.ActorPoolStrategy(min_size=1, max_size=compute.max_writers),
            num_cpus=compute.io_cpus,
            **placed(compute.io_resources),
            # A writer that dies is restarted and its block written again (same file names, same content).
            max_restarts=compute.max_actor_restarts,
            max_task_retries=compute.max_task_retries,
            fn_constructor_kwargs={
                "output": plan.output,
                "compression": config.output.compression,
                "fingerprint": plan.fingerprint,
                "passthrough": config.input.passthrough_columns,
                "attempt": attempt,
                "attempts": attempts,
                "max_deaths": compute.max_startup_deaths,
            },
        )


@contextmanager
def _ray_remote_args_accepted() -> Iterator[None]:
    """Actor restart and retry limits have no named parameter in Ray Data yet (2.60): they go
    through ``ray_remote_args``, which warns about a future rename."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*ray_remote_args.*deprecated")
        yield


def _check_model_limits(config: JobConfig, folder: Path) -> None:
    from transformers import AutoConfig

    with model_errors_named(config.encoder.model):
        limit = getattr(AutoConfig.from_pretrained(folder), "max_position_embeddings", None)
    if limit and config.encoder.max_length > limit:
        raise SettingError(
            f"encoder.max_length: {config.encoder.max_length} exceeds what the model accepts ({limit} positions)"
        )
    tokenizer = folder / "tokenizer.json"
    if config.encoder.long_documents != "truncate" and tokenizer.is_file():  # before any actor loads the model
        from tokenizers import Tokenizer

        from pipeline.encode.encoder import check_stride

        specials = Tokenizer.from_file(str(tokenizer)).num_special_tokens_to_add(False)
        check_stride(config.encoder.stride, config.encoder.max_length, specials)
