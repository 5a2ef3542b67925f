"""What schedules the work: the one thing the Ray runner and the Spark runner do differently.

The encoding job and reindex (:mod:`pipeline.job.encode`, :mod:`pipeline.job.reindex`) plan,
resume, deduplicate, commit and summarize the same way whatever runs the tasks; an
:class:`Engine` reads, encodes and writes the work, scans a corpus for reindex, groups ids past
the driver's size, and loads a server store. :data:`RAY` is the default;
:func:`pipeline.spark.job.spark_engine` gives Spark's.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pyarrow as pa

# write(config, plan, work, attempt, pace) -> (entries of the written files, failures ridden through)
Write = Callable[..., tuple[pa.Table, dict[str, int]]]


@dataclass(frozen=True)
class Engine:
    name: str
    write: Write
    check_output: Callable[..., None]  # (config, output location) -> None, or a SettingError
    scan: Callable[..., pa.Table] | None = None  # (config, plan) -> reindex's scan rows; None: Ray tasks
    positions: Callable[..., pa.Table] | None = None  # pipeline.job.dedupe: ids grouped past the driver
    loader: Callable[..., list[dict[str, Any]]] | None = None  # pipeline.job.load: a server store's load
    gpus: float | None = None  # GPUs each encoder gets, where the engine decides it (not compute.*)

    def configure(self, config: Any) -> Any:
        """``config`` with the GPUs per encoder this engine gives (they decide the compute dtype the
        fingerprint records: bf16 autocast on a GPU, fp32 on a CPU)."""
        if self.gpus is None or self.gpus == config.compute.num_gpus_per_actor:
            return config
        return config.model_copy(
            update={"compute": config.compute.model_copy(update={"num_gpus_per_actor": self.gpus})}
        )


def _ray_write(*args: Any) -> tuple[pa.Table, dict[str, int]]:
    from pipeline.job.steps import write_work

    return write_work(*args)


def _ray_check(config: Any, output: Any) -> None:
    from pipeline.job.plan import check_output_reachable

    check_output_reachable(config, output)


RAY = Engine("ray", _ray_write, _ray_check)
