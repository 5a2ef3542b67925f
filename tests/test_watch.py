"""The bookkeeping that node loss relies on, as plain objects: the cluster watch (what it says,
when it gives up) on node tables and a clock the test drives, and the attempt log (which deaths
count against a block, which are a lost node's) with the set of live nodes the test names.
The same objects run inside the multi-node runs of ``test_node_loss.py``."""

from __future__ import annotations

from typing import Any

import pytest

from pipeline.config import ComputeConfig
from pipeline.job.attempts import AttemptLog
from pipeline.job.watch import REPORT_EVERY_S, ClusterWatch, NoEncoderNodeError


def node(node_id: str, alive: bool = True, **resources: float) -> dict[str, Any]:
    return {"NodeID": node_id, "Alive": alive, "Resources": resources}


class Cluster:
    """A node table and a clock the test changes."""

    def __init__(self, *nodes: dict[str, Any]) -> None:
        self.table, self.now, self.said = list(nodes), 0.0, []

    def watch(self, **compute: Any) -> ClusterWatch:
        return ClusterWatch(
            ComputeConfig(**compute), clock=lambda: self.now, nodes=lambda: self.table, say=self.said.append
        )


GIB = float(2**30)
HEAD = node("head" + "0" * 12, CPU=2.0, io=10.0, memory=4 * GIB)
GPU1 = node("gpu1" + "0" * 12, CPU=8.0, GPU=1.0, memory=32 * GIB, **{"accelerator_type:L4": 1.0})
GPU2 = node("gpu2" + "0" * 12, CPU=8.0, GPU=1.0, memory=32 * GIB, **{"accelerator_type:L4": 1.0})


def test_the_watch_waits_says_so_every_30_s_and_gives_up_at_the_deadline() -> None:
    cluster = Cluster(HEAD, GPU1)
    watch = cluster.watch(num_gpus_per_actor=1, accelerator_type="L4", wait_for_nodes_s=100)
    watch.check()
    assert cluster.said == []  # an encoder fits on gpu1
    cluster.table = [HEAD, {**GPU1, "Alive": False}]
    cluster.now = 3.0
    watch.check()
    assert cluster.said[0].startswith("  ... node gpu100000000 lost (1 alive)")
    assert "waiting: no live node can host an encoder actor" in cluster.said[1]
    assert "'GPU': 1.0" in cluster.said[1] and "accelerator_type:L4" in cluster.said[1]
    assert "gives up in 100 s" in cluster.said[1]
    for t in range(5, 31, 2):  # no repeat before 30 s
        cluster.now = 3.0 + t
        watch.check()
    assert len(cluster.said) == 2
    cluster.now = 3.0 + REPORT_EVERY_S + 1
    watch.check()
    assert len(cluster.said) == 3 and "gives up in 69 s" in cluster.said[2]
    cluster.now = 103.5
    with pytest.raises(NoEncoderNodeError, match=r"no node could host an encoder actor .* for 100 s"):
        watch.check()


def test_a_node_back_before_the_deadline_ends_the_wait_and_is_counted() -> None:
    cluster = Cluster(HEAD, GPU1)
    watch = cluster.watch(num_gpus_per_actor=1, wait_for_nodes_s=60)
    cluster.table, cluster.now = [HEAD], 2.0
    watch.check()
    cluster.table, cluster.now = [HEAD, GPU2], 50.0
    watch.check()
    assert any("node gpu200000000 joined (2 alive)" in s for s in cluster.said)
    assert cluster.said[-1] == "  ... a node that can host the run's actors is back after 48 s; continuing"
    cluster.now = 200.0  # well past the first wait's deadline: no error, the wait ended
    watch.check()
    assert watch.report() == {"nodes_lost": 1, "nodes_added": 1}


def test_readers_and_writers_need_a_node_too() -> None:
    """io_resources: a cluster whose CPU nodes are all gone cannot read or write, even with GPUs left."""
    cluster = Cluster(HEAD, GPU1)
    watch = cluster.watch(num_gpus_per_actor=1, io_resources={"io": 0.01}, wait_for_nodes_s=10)
    watch.check()
    assert cluster.said == []
    cluster.table, cluster.now = [GPU1], 3.0
    watch.check()
    assert (
        "no live node can host a reader or writer (it needs {'CPU': 0.25, 'memory': 268435456.0, 'io': 0.01})"
        in (cluster.said[-1])
    )
    assert "an encoder actor" not in cluster.said[-1]
    cluster.now = 14.0
    with pytest.raises(NoEncoderNodeError, match="a reader or writer"):
        watch.check()


def test_the_node_table_is_read_at_most_every_two_seconds() -> None:
    reads = []
    cluster = Cluster(HEAD)
    watch = ClusterWatch(
        ComputeConfig(), clock=lambda: cluster.now, nodes=lambda: reads.append(1) or cluster.table, say=print
    )
    for i in range(10):
        cluster.now = i * 0.5
        watch.check()
    assert len(reads) == 3  # at 0, 2.0 and 4.0 s


def test_deaths_with_a_lost_node_do_not_count_against_a_block() -> None:
    alive = {"a", "b"}
    log = AttemptLog(alive=lambda: set(alive))
    key = ("block", "unit", 0, 1)
    assert log.begin(key, "a") == 0
    alive.discard("a")  # node a preempted with the block on it
    assert log.begin(key, "b") == 0  # not a crash: retried as if for the first time
    assert log.begin(key, "b") == 1  # the attempt on b died with b alive: that one counts
    assert log.begin(key, "b") == 2
    log.end(key, "b")
    report = log.report()
    assert report["attempts_lost_with_node"] == 1 and report["blocks_retried"] == 1 and report["block_retries"] == 3


def test_a_block_done_at_the_first_try_is_forgotten() -> None:
    log = AttemptLog(alive=lambda: {"a"})
    for i in range(1000):
        log.begin(("block", "u", i, 1), "a")
        log.end(("block", "u", i, 1), "a")
    assert not log.begun and not log.open


def test_an_actor_dying_while_it_loads_is_counted_per_actor_and_only_on_live_nodes() -> None:
    alive = {"a", "b"}
    log = AttemptLog(alive=lambda: set(alive))
    assert log.loading("actor1", "a") == 0
    assert log.loading("actor1", "a") == 1  # died loading, restarted
    alive.discard("a")
    assert log.loading("actor1", "b") == 0  # both earlier deaths were on the node now lost
    log.ready(1.0, "b", "actor1")
    assert log.loading("actor1", "b") == 0  # a restart after it was up is not a loading death
    assert log.loading("actor2", "b") == 0
    log.writer_ready("b", "actor2")
    assert log.placement() == {"encoders": ["b"], "writers": ["b"]}


def test_a_reader_needs_its_memory() -> None:
    cluster = Cluster(node("small" + "0" * 12, CPU=4.0, memory=100 * 2.0**20))
    cluster.watch().check()
    assert (
        "no live node can host a reader or writer" in cluster.said[-1] and "'memory': 268435456.0" in cluster.said[-1]
    )


def test_node_losses_stop_being_forgiven_past_a_limit() -> None:
    """A document that takes its whole node down each time is still isolated in the end."""
    from pipeline.job.attempts import NODE_LOSSES_FORGIVEN

    alive = {"n0"}
    log = AttemptLog(alive=lambda: set(alive))
    key = ("row", "unit", 7)
    died = []
    for i in range(NODE_LOSSES_FORGIVEN + 3):
        alive = {f"n{i}"}  # the node of the previous attempt is gone
        died.append(log.begin(key, f"n{i}"))
    assert died[: NODE_LOSSES_FORGIVEN + 1] == [0] * (NODE_LOSSES_FORGIVEN + 1) and died[-2:] == [1, 2]
    for i in range(NODE_LOSSES_FORGIVEN + 3):  # an actor whose node is taken while it starts, again and again
        alive = {f"m{i}"}
        assert log.loading("actor", f"m{i}") == 0


def test_a_started_actor_forgets_its_loading_deaths_and_an_unreadable_node_table_counts_them() -> None:
    def broken() -> set[str]:
        raise RuntimeError("GCS busy")

    log = AttemptLog(alive=broken)
    assert log.loading("actor", "a") == 0
    assert log.loading("actor", "a") == 1  # the table could not be read: counted as a death
    log.ready(1.0, "a", "actor")
    assert log.loading("actor", "a") == 0  # deaths in a row only


def test_encoders_up_drop_while_one_restarts_and_the_encoded_timeline_stays_small(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from pipeline.job import attempts

    log = AttemptLog(alive=lambda: {"a"})
    for actor in ("e1", "e2"):
        log.loading(actor, "a", role="encoder")
        log.ready(1.0, "a", actor)
    assert log.live() == (2, 0)
    log.loading("e1", "a", role="encoder")  # died and Ray restarted it: loading again
    assert log.live()[0] == 1 and log.report()["actor_restarts"] == 1
    log.ready(2.0, "a", "e1")
    assert log.live()[0] == 2

    now = [1_000_000.0]
    monkeypatch.setattr(attempts.time, "time", lambda: now[0])
    for _ in range(3 * attempts.MAX_SECONDS):  # a long run: a block every second
        now[0] += 1
        log.end(("block", "u", now[0], 1), "a", rows=10)
    seconds = log.encoded_per_second(1_000_000.0)
    assert len(seconds) <= attempts.MAX_SECONDS and sum(seconds.values()) == 30 * attempts.MAX_SECONDS
    assert list(seconds) == sorted(seconds) and min(seconds) >= 0
