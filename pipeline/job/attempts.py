"""Counting attempts across actor deaths, and isolating the documents that cause them.

An encoder actor that dies mid-block (killed, OOM-killed, node lost) is restarted by Ray and the
block retried; its files are named by the block, so a retry rewrites the same files and the
output still holds each document once. What the dead actor knew is lost with it, so attempts are
counted by a small run-wide actor, :class:`AttemptLog`, that outlives the encoders: each block
announces itself (and the node it runs on) before encoding and says when it is done.

An attempt that was announced and never finished died. If its node is gone too, the node took
it (a preemption): that says nothing about the block, and is not counted against it (up to
:data:`NODE_LOSSES_FORGIVEN` times per block: a document that takes its whole node down must
still be isolated). Otherwise the process died on its own node, and the block is suspect. The
node table is read when the retry starts: a node being drained (its processes killed while Ray
still lists it as alive) looks like a crash, and is counted as one.

A block that has already died ``isolate_after`` times is taken apart: its rows are encoded in
chunks, each chunk announced before and recorded after; a chunk that was announced and never
finished is then encoded row by row; a row that was announced and never finished has killed its
encoder, and is rejected (``encoder_crash``) instead of taking the job down. Each such death
costs one actor restart, so isolating ``k`` bad rows costs about ``isolate_after + 1 + k``.

Deaths that no isolation can help are bounded too (``compute.max_startup_deaths``): an actor that
keeps dying while it loads (the model does not fit the node's memory) and a block that keeps
killing its writer fail the run with a message saying so, instead of being restarted forever.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable
from typing import Any

CHUNK_ROWS = 32
MAX_SECONDS = 2000  # points of the encoded-rows timeline handed to the report
NODE_LOSSES_FORGIVEN = 8  # per block, chunk or row (never an actor start): node losses beyond these count as deaths


def _alive_nodes() -> set[str]:
    import ray

    return {n["NodeID"] for n in ray.nodes() if n.get("Alive")}


class AttemptLog:
    """Run-wide attempt counts (a Ray actor with no CPU of its own; see the module docstring).
    ``alive``: the ids of the cluster's live nodes (Ray's node table unless given)."""

    def __init__(self, alive: Callable[[], set[str]] | None = None) -> None:
        self.alive = alive or _alive_nodes
        self.begun: Counter[Any] = Counter()
        self.open: dict[Any, list[str]] = {}  # the nodes of the attempts announced and not finished, per key
        self.lost_with_node = 0
        self.forgiven: Counter[Any] = Counter()  # per key: attempts lost with their node
        self.restarts = 0
        self.first_ready: float | None = None
        self.nodes: set[str] = set()
        self.actors: set[str] = set()
        self.writer_nodes: set[str] = set()
        self.encoded: Counter[int] = Counter()  # rows of blocks encoded, per second (time.time())
        self.started: set[str] = set()  # encoder actors that began loading at least once
        self.up: set[str] = set()  # encoder actors loaded and not seen starting again since (dead ones restart)

    def begin(self, key: Any, node: str = "") -> int:
        """Announce an attempt at ``key`` on ``node``; returns how many attempts at it died before
        this one on their own (not with their node)."""
        unfinished = self.open.setdefault(key, [])
        if unfinished:
            try:
                alive = self.alive()
            except Exception:  # noqa: BLE001 - the node table unreadable (a busy head): count every death
                alive = set(unfinished)
            taken = [n for n in unfinished if n not in alive]
            self.lost_with_node += len(taken)
            self.forgiven[key] += len(taken)
            unfinished[:] = [n for n in unfinished if n in alive]
        # A document that takes its whole node down (a GPU fault) would be forgiven forever: past
        # NODE_LOSSES_FORGIVEN losses of one block, chunk or row, losses count as deaths too. An
        # actor's start holds no document: a churning cluster may take its node any number of times.
        died = len(unfinished)
        if key[0] != "load":
            died += max(0, self.forgiven[key] - NODE_LOSSES_FORGIVEN)
        unfinished.append(node)
        self.begun[key] += 1
        return died

    def end(self, key: Any, node: str = "", rows: int = 0) -> None:
        """``key`` done on ``node`` (``rows``: the rows of a block, for the run's timeline)."""
        if rows:
            self.encoded[int(time.time())] += rows
        unfinished = self.open.get(key, [])
        if node in unfinished:
            unfinished.remove(node)
        if self.begun.get(key) == 1 and not unfinished:  # done at the first try: forgotten, so memory follows failures
            self._forget(key)

    def _forget(self, key: Any) -> None:
        self.begun.pop(key, None)
        self.open.pop(key, None)
        self.forgiven.pop(key, None)

    def loading(self, actor: str, node: str = "", role: str = "") -> int:
        """An actor starts loading (its constructor); returns how many times it died loading before.
        An encoder whose id started before is one Ray restarted (the id stays): counted."""
        if role == "encoder":
            if actor in self.started:
                self.restarts += 1
            self.started.add(actor)
            self.up.discard(actor)
        return self.begin(("load", actor), node)

    def ready(self, at: float, node: str = "", actor: str = "") -> None:
        """An encoder actor (``actor`` on ``node``) finished loading at ``at`` (``time.time()``): its
        deaths while loading are forgotten (only deaths in a row stop the run)."""
        self._forget(("load", actor))
        self.first_ready = at if self.first_ready is None else min(self.first_ready, at)
        self.nodes.add(node)
        self.actors.add(actor)
        self.up.add(actor)

    def writer_ready(self, node: str = "", actor: str = "") -> None:
        self._forget(("load", actor))
        self.writer_nodes.add(node)

    def encoders_ready(self) -> float | None:
        return self.first_ready

    def live(self) -> tuple[int, int]:
        """Encoder actors up (loaded, and not restarting since: a restarted one keeps its id and loads
        again), and the rows of the blocks encoded so far (a retried block's counted again: the
        progress line's, not the summary's)."""
        return len(self.up), sum(self.encoded.values())

    def encoded_per_second(self, started: float) -> dict[int, int]:
        """Rows whose block finished encoding, per second since ``started`` (``time.time()``); past
        :data:`MAX_SECONDS` seconds, summed over wider buckets (the report's plot, not a log)."""
        seconds = {int(second - started): rows for second, rows in sorted(self.encoded.items())}
        width = 1
        while len(seconds) > MAX_SECONDS:
            width *= 2
            wider: Counter[int] = Counter()
            for second, rows in seconds.items():
                wider[second - second % width] += rows
            seconds = dict(sorted(wider.items()))
        return seconds

    def placement(self) -> dict[str, list[str]]:
        """The nodes that hosted encoder and writer actors during the run."""
        return {"encoders": sorted(self.nodes), "writers": sorted(self.writer_nodes)}

    def report(self) -> dict[str, int]:
        blocks = [k for k in self.begun if k[0] == "block"]
        retried = [k for k in blocks if self.begun[k] > 1]
        return {
            "actor_restarts": self.restarts,
            "blocks_retried": len(retried),
            "block_retries": sum(self.begun[k] - 1 for k in retried),
            "attempts_lost_with_node": self.lost_with_node,  # not counted against their blocks
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
