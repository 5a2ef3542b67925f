"""The cluster session: the only place that starts or joins Ray.

:func:`ensure_ray` joins the cluster named by ``compute.ray_address`` or ``RAY_ADDRESS``, or
starts a local one. With ``compute.stop_on_sigterm`` (the command line sets it), SIGTERM stops
the run as Ctrl-C does: progress recorded, lock released, a hint to resume; the handler is
installed again after ``ray.init``, which installs its own that exits without the hint.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from typing import Any

from pipeline.config import ComputeConfig
from pipeline.errors import PipelineError
from pipeline.job.faults import forwarded, ray_start_point

log = logging.getLogger(__name__)
START_TRIES = 3
START_PAUSE_S = 3.0
START_TIMEOUT_SIGNS = (
    "timed out waiting for file",  # gcs_server_port_..., raylet ports
    "timed out during startup",  # "The current node timed out during startup"
    "timed out while waiting for node to startup",
    "timed out while waiting for gcs",
)


class ClusterStartError(PipelineError, RuntimeError):
    """A local Ray could not be started; the message says what to try."""


def ensure_ray(compute: ComputeConfig) -> None:
    """Start or join Ray once per process, and warn when the cluster is too small to start."""
    import ray

    if not ray.is_initialized():
        env = forwarded()  # test-only fault injection reaches the workers; empty in production
        from pipeline.terminal import forwards_worker_logs

        options: dict[str, Any] = {
            "log_to_driver": forwards_worker_logs(),  # quiet: the workers' output stays in Ray's logs
            **({"runtime_env": {"env_vars": env}} if env else {}),
        }
        if compute.ray_address is None and not os.environ.get("RAY_ADDRESS"):
            start_local_ray(**options)
        else:
            ray.init(address=compute.ray_address, **options)
        if compute.stop_on_sigterm:
            stop_on_sigterm()
    _warn_if_small(compute, ray.cluster_resources().get("CPU", 0))


def _warn_if_small(compute: ComputeConfig, cpus: float) -> None:
    needed = compute.min_actors * compute.num_cpus_per_actor + 2 * compute.io_cpus
    if needed > cpus:
        # Not an error: an autoscaling cluster may add the nodes once asked.
        log.warning(
            "the cluster has %s CPUs now; %d encoder actors x %s CPUs + %s for a reader and a writer need %s. Unless "
            "it scales up, lower compute.min_actors or compute.num_cpus_per_actor.",
            cpus,
            compute.min_actors,
            compute.num_cpus_per_actor,
            2 * compute.io_cpus,
            needed,
        )


def start_local_ray(**options: Any) -> None:
    """Start a Ray cluster on this machine that keeps idle task workers alive.

    Ray keeps about one idle worker process per CPU and kills the rest after a second; on a
    small machine, where the encoder actors already hold most CPUs, nearly every reader or scan
    task then starts a fresh Python process that imports pyarrow and s3fs and builds a storage
    client first. Measured on a 2-core x86_64 VM with `python -m benchmarks.reindex_bench`
    (10,000 passages, 10 shards): the scan of a reindex with nothing to do took 10 s instead of
    1.6 s. On a cluster started by others, the same setting is the ``RAY_num_workers_soft_limit``
    environment variable of ``ray start``.
    """
    import ray

    system = {"num_workers_soft_limit": max(8, 2 * (os.cpu_count() or 1))}
    for attempt in range(1, START_TRIES + 1):
        try:
            ray_start_point()
            # address "local": a new cluster, never one a `ray start` left on this machine (joined
            # only when asked: compute.ray_address, RAY_ADDRESS)
            ray.init(address="local", **options, _system_config=system)
            return
        except Exception as err:  # noqa: BLE001 - only a start that timed out is tried again
            if not _start_timed_out(err):
                raise
            ray.shutdown()  # whatever half-started goes, so the next try starts clean
            if attempt == START_TRIES:
                raise ClusterStartError(
                    f"could not start a local Ray in {START_TRIES} tries ({type(err).__name__}: {err}). Ray processes "
                    "of an earlier command may still be shutting down (`ray status`, `ray stop`), or the machine is "
                    "too busy to start them in time; run the command again, or join a running Ray with "
                    "compute.ray_address / RAY_ADDRESS"
                ) from None
            log.warning("starting a local Ray timed out (%s); trying again (%d of %d)", err, attempt + 1, START_TRIES)
            time.sleep(START_PAUSE_S * attempt)


def _start_timed_out(err: BaseException) -> bool:
    """Ray's own start-up timeouts: GCS or raylet files that did not appear, a node that did not register.

    Measured here: about 2 in 15 back-to-back commands (each starting and stopping its own local
    Ray on a 2-core VM) failed with "Timed out waiting for file .../gcs_server_port_...": the
    previous command's Ray processes were still exiting while the new GCS started.
    """
    text = str(err).lower()
    return isinstance(err, TimeoutError) or any(sign in text for sign in START_TIMEOUT_SIGNS)


def stop_on_sigterm() -> None:
    """Make SIGTERM stop this process as Ctrl-C does (a ``KeyboardInterrupt`` in the main thread)."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _interrupt)


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def placed(resources: dict[str, float], accelerator: str | None = None) -> dict[str, Any]:
    """Ray placement arguments: custom resources, an accelerator type (only those given)."""
    return {
        **({"resources": dict(resources)} if resources else {}),
        **({"accelerator_type": accelerator} if accelerator else {}),
    }
