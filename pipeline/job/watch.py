"""What the cluster did while a run worked: nodes lost and added, and whether an encoder actor
can be placed at all (the run waits, saying so, while none can; it gives up after
``compute.wait_for_encoders_s``).

Ray replaces what a lost node took: tasks are retried and objects lost with it recomputed (Ray
Data's tasks retry without limit on system failures), actors restarted elsewhere
(``compute.max_actor_restarts``) with the block they held retried (``compute.max_task_retries``).
What Ray cannot do is place an actor where no node has the resources: the run would then wait
without a word. :class:`ClusterWatch` watches from the driver and says it.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from pipeline.config import ComputeConfig
from pipeline.errors import PipelineError

log = logging.getLogger(__name__)
REPORT_EVERY_S = 30.0


class NoEncoderNodeError(PipelineError, RuntimeError):
    """No node could host an encoder actor for compute.wait_for_encoders_s."""


class ClusterWatch:
    def __init__(self, compute: ComputeConfig, clock: Any = time.monotonic) -> None:
        self.compute, self.clock = compute, clock
        self.initial: set[str] | None = None
        self.alive: set[str] = set()
        self.lost: set[str] = set()
        self.added: set[str] = set()
        self.unplaceable_since: float | None = None
        self.last_said = 0.0
        self.poll()

    def needs(self) -> dict[str, float]:
        """The resources one encoder actor takes."""
        c = self.compute
        need = {"CPU": c.num_cpus_per_actor, **c.encoder_resources}
        if c.num_gpus_per_actor:
            need["GPU"] = c.num_gpus_per_actor
        if c.accelerator_type:
            need[f"accelerator_type:{c.accelerator_type}"] = 0.001
        return need

    def poll(self) -> bool:
        """Refresh the node list; return whether some live node can host an encoder actor."""
        import ray

        need, placeable, alive = self.needs(), False, set()
        for node in ray.nodes():
            if not node.get("Alive"):
                continue
            alive.add(node["NodeID"])
            have = node.get("Resources") or {}
            placeable = placeable or all(have.get(k, 0) >= v for k, v in need.items())
        if self.initial is None:
            self.initial = alive
        self.lost |= self.alive - alive
        self.added |= alive - self.initial
        self.alive = alive
        return placeable

    def check(self) -> None:
        """Between results: note node changes; say why the run waits, and give up after the deadline."""
        now = self.clock()
        if self.poll():
            if self.unplaceable_since is not None:
                waited = now - self.unplaceable_since
                print(
                    f"  ... a node that can host an encoder actor is back after {waited:.0f} s; continuing", flush=True
                )
            self.unplaceable_since = None
            return
        if self.unplaceable_since is None:
            self.unplaceable_since, self.last_said = now, 0.0
        waited = now - self.unplaceable_since
        if waited >= self.compute.wait_for_encoders_s:
            raise NoEncoderNodeError(
                f"no node could host an encoder actor (it needs {self.needs()}) for {waited:.0f} s "
                f"(compute.wait_for_encoders_s); {len(self.alive)} node(s) alive. The files written so far are kept: "
                "run the same command again once the cluster has such a node, and it resumes"
            )
        if now - self.last_said >= REPORT_EVERY_S:
            self.last_said = now
            print(
                f"  ... waiting: no live node can host an encoder actor (it needs {self.needs()}; {len(self.alive)} "
                f"node(s) alive, {len(self.lost)} lost so far); the run goes on when one joins, and gives up in "
                f"{self.compute.wait_for_encoders_s - waited:.0f} s",
                flush=True,
            )

    def report(self) -> dict[str, int]:
        self.poll()
        return {"nodes_lost": len(self.lost), "nodes_added": len(self.added)}
