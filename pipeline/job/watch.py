"""What the cluster did while a run worked: nodes lost and added (said as they happen), and
whether the run's actors can be placed at all: an encoder actor, and a reader task or writer
actor (the run waits, saying so, while one cannot; it gives up after ``compute.wait_for_nodes_s``).

Ray replaces what a lost node took: tasks are retried and objects lost with it recomputed (Ray
Data's tasks retry without limit on system failures), actors restarted elsewhere
(``compute.max_actor_restarts``) with the block they held retried (``compute.max_task_retries``).
What Ray cannot do is place an actor where no node has the resources: the run would then wait
without a word. :class:`ClusterWatch` watches from the driver and says it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

from pipeline.config import ComputeConfig
from pipeline.errors import PipelineError
from pipeline.job.plan import READER_MEMORY

log = logging.getLogger(__name__)
REPORT_EVERY_S = 30.0
POLL_EVERY_S = 2.0  # the node table is read at most this often


class NoEncoderNodeError(PipelineError, RuntimeError):
    """No node could host an encoder actor (or a reader/writer) for compute.wait_for_nodes_s."""


def _say(text: str) -> None:
    from pipeline.terminal import clear_line

    clear_line()  # not on the end of a progress line drawn in place
    print(text, flush=True)


def _ray_nodes() -> list[dict[str, Any]]:
    import ray

    return list(ray.nodes())


class ClusterWatch:
    """``nodes``: the cluster's node table (Ray's unless given); ``clock``: seconds (monotonic)."""

    def __init__(
        self,
        compute: ComputeConfig,
        clock: Callable[[], float] = time.monotonic,
        nodes: Callable[[], list[dict[str, Any]]] = _ray_nodes,
        say: Callable[[str], None] | None = None,
    ) -> None:
        self.compute, self.clock, self.nodes = compute, clock, nodes
        self.say = say or _say
        self.initial: set[str] | None = None
        self.alive: set[str] = set()
        self.lost: set[str] = set()
        self.added: set[str] = set()
        self.missing: list[str] = []  # the roles no live node can host, at the last poll
        self.unplaceable_since: float | None = None
        self.last_said = 0.0
        self.last_poll: float | None = None
        self.poll()

    def needs(self) -> dict[str, dict[str, float]]:
        """The resources each of the run's roles takes: one encoder actor, one reader task or writer actor."""
        c = self.compute
        encoder = {"CPU": c.num_cpus_per_actor, **c.encoder_resources}
        if c.num_gpus_per_actor:
            encoder["GPU"] = c.num_gpus_per_actor
        if c.accelerator_type:
            encoder[f"accelerator_type:{c.accelerator_type}"] = 0.001
        reader = {"CPU": c.io_cpus, "memory": float(READER_MEMORY), **c.io_resources}
        return {"an encoder actor": encoder, "a reader or writer": reader}

    def poll(self) -> list[str]:
        """Refresh the node list; say which nodes left or joined since the last poll; return the
        roles that no live node can host."""
        now = self.clock()
        if self.last_poll is not None and now - self.last_poll < POLL_EVERY_S:
            return self.missing
        self.last_poll = now
        alive: dict[str, dict[str, float]] = {
            n["NodeID"]: n.get("Resources") or {} for n in self.nodes() if n.get("Alive")
        }
        if self.initial is None:
            self.initial = set(alive)
        else:
            for node in sorted(self.alive - set(alive)):
                self.say(f"  ... node {node[:12]} lost ({len(alive)} alive): Ray retries what it held")
            for node in sorted(set(alive) - self.alive):
                self.say(f"  ... node {node[:12]} joined ({len(alive)} alive)")
        self.lost |= self.alive - set(alive)
        self.added |= set(alive) - self.initial
        self.alive = set(alive)
        self.missing = [
            role
            for role, need in self.needs().items()
            if not any(all(have.get(k, 0) >= v for k, v in need.items()) for have in alive.values())
        ]
        return self.missing

    def check(self) -> None:
        """Between results: note node changes; say why the run waits, and give up after the deadline."""
        now = self.clock()
        missing = self.poll()
        if not missing:
            if self.unplaceable_since is not None:
                waited = now - self.unplaceable_since
                self.say(f"  ... a node that can host the run's actors is back after {waited:.0f} s; continuing")
            self.unplaceable_since = None
            return
        if self.unplaceable_since is None:
            self.unplaceable_since, self.last_said = now, None
        waited = now - self.unplaceable_since
        what = " or ".join(f"{role} (it needs {self.needs()[role]})" for role in missing)
        if waited >= self.compute.wait_for_nodes_s:
            raise NoEncoderNodeError(
                f"no node could host {what} for {waited:.0f} s (compute.wait_for_nodes_s); {len(self.alive)} "
                "node(s) alive. The files written so far are kept: run the same command again once the cluster "
                "has such a node, and it resumes"
            )
        if self.last_said is None or now - self.last_said >= REPORT_EVERY_S:
            self.last_said = now
            self.say(
                f"  ... waiting: no live node can host {what}; {len(self.alive)} node(s) alive, {len(self.lost)} lost "
                f"so far; the run goes on when one joins, and gives up in "
                f"{self.compute.wait_for_nodes_s - waited:.0f} s"
            )

    def report(self) -> dict[str, int]:
        self.last_poll = None
        self.poll()
        return {"nodes_lost": len(self.lost), "nodes_added": len(self.added)}
