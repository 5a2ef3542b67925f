"""Counting attempts across encoder-actor deaths, and isolating the documents that cause them.

An encoder actor that dies mid-block (killed, OOM-killed, node lost) is restarted by Ray and the
block retried; its files are named by the block, so a retry rewrites the same files and the
output still holds each document once. What the dead actor knew is lost with it, so attempts are
counted by a small run-wide actor, :class:`AttemptLog`, that outlives the encoders: each block
announces itself before encoding, each restarted actor says so.

A block that has already died ``isolate_after`` times is taken apart: its rows are encoded in
chunks, each chunk announced before and recorded after; a chunk that was announced and never
finished is then encoded row by row; a row that was announced and never finished has killed its
encoder, and is rejected (``encoder_crash``) instead of taking the job down. Each such death
costs one actor restart, so isolating ``k`` bad rows costs about ``isolate_after + 1 + k``.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

CHUNK_ROWS = 32


class AttemptLog:
    """Run-wide attempt counts (a Ray actor with no CPU of its own; see the module docstring)."""

    def __init__(self) -> None:
        self.begun: Counter[Any] = Counter()
        self.done: Counter[Any] = Counter()
        self.restarts = 0
        self.first_ready: float | None = None
        self.nodes: set[str] = set()
        self.actors: set[str] = set()

    def ready(self, at: float, node: str = "", actor: str = "") -> None:
        """An encoder actor (``actor`` on ``node``) finished loading at ``at`` (``time.time()``)."""
        self.first_ready = at if self.first_ready is None else min(self.first_ready, at)
        self.nodes.add(node)
        self.actors.add(actor)

    def encoders_ready(self) -> float | None:
        return self.first_ready

    def begin(self, key: Any) -> int:
        """Announce an attempt at ``key``; returns how many attempts at it died before this one."""
        died = self.begun[key] - self.done[key]
        self.begun[key] += 1
        return died

    def end(self, key: Any) -> None:
        if self.begun[key] == 1:  # done at the first try: forgotten, so memory follows failures, not the corpus
            del self.begun[key]
            self.done.pop(key, None)
        else:
            self.done[key] += 1

    def restarted(self) -> None:
        self.restarts += 1

    def report(self) -> dict[str, int]:
        blocks = [k for k in self.begun if k[0] == "block"]
        retried = [k for k in blocks if self.begun[k] > 1]
        return {
            "actor_restarts": self.restarts,
            "blocks_retried": len(retried),
            "block_retries": sum(self.begun[k] - 1 for k in retried),
            "encoder_actors": len(self.actors),  # encoder actors started (a restarted one keeps its id)
            "encoder_nodes": len(self.nodes),  # nodes that hosted an encoder during the run
        }


def start_log() -> Any:
    """The run's :class:`AttemptLog`, on the driver's node: the run depends on it, so it must not
    be lost with a worker node (the driver's node lost ends the run anyway)."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    return ray.remote(num_cpus=0, max_restarts=0, scheduling_strategy=here)(AttemptLog).remote()
