"""Lost and added nodes (issue 18): simulated multi-node clusters on this machine
(``ray.cluster_utils.Cluster``: a head and worker nodes as separate raylets, each with its own
object store), S3 through moto's server, worker nodes killed as a preemption kills them.

Encoders need the custom resource ``encoder``, which only worker nodes have: the head (where the
driver runs, as under ``ray job submit``) hosts readers, writers and the run's bookkeeping.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import s3fs
from support.jobs import corpus_rows, put_jsonl_shards, read_delta, reference_vectors
from support.node_churn import run_spec
from support.reference import densify

pytestmark = pytest.mark.cluster
VOCAB = 30522
DOCS, FILES = 1200, 6
HEAD = {"num_cpus": 1, "object_store_memory": 120 * 2**20}
WORKER = {"num_cpus": 1, "resources": {"encoder": 1}, "object_store_memory": 120 * 2**20}


@pytest.fixture(scope="module")
def corpus(s3_endpoint: str, splade_tiny: Path) -> dict[str, np.ndarray]:
    fs = s3fs.S3FileSystem()
    if not fs.exists("nodes"):
        fs.mkdir("nodes")
    rows = corpus_rows(DOCS)
    put_jsonl_shards(fs, "nodes/corpus", rows, FILES)
    return reference_vectors(splade_tiny, rows)


def job(splade_tiny: Path, output: str, *extra: str) -> list[str]:
    return [
        "encode",
        "--input",
        "s3://nodes/corpus/",
        "--output",
        output,
        "--model",
        str(splade_tiny),
        "--max-length",
        "64",
        "--max-batch-tokens",
        "256",  # small forward passes: a run long enough to lose nodes in
        "--rows-per-block",
        "20",
        "--min-actors",
        "1",
        "--max-actors",
        "2",
        "--num-cpus-per-actor",
        "0.5",
        "--io-cpus",
        "0.1",
        "--encoder-resources",
        '{"encoder": 1}',
        *extra,
    ]


def churn(spec: dict[str, Any], timeout: float = 900) -> dict[str, Any]:
    """Run ``tests/support/node_churn.py`` with ``spec``; its result."""
    result = run_spec({"head": HEAD, "worker": WORKER, **spec}, timeout)
    for when, what in result["log"]:  # shown with the failure, or with -s
        print(f"{when:7.1f} s  {what}")
    for phase in result["phases"]:
        print(phase["output"][-3000:])
    return result


def exactly_once(output: str, corpus: dict[str, np.ndarray], ids: list[str] | None = None) -> dict[str, Any]:
    """Every document of ``corpus`` (or of ``ids``) once in ``output``, with its reference vector."""
    fs = s3fs.S3FileSystem()
    fs.invalidate_cache()
    data = read_delta(output)
    got = data["id"].to_pylist()
    ids = list(corpus) if ids is None else ids
    assert sorted(got) == sorted(ids) and len(set(got)) == len(got)  # none lost, none twice
    want = np.stack([corpus[i] for i in got])
    assert np.abs(densify(data["sparse"].combine_chunks(), VOCAB) - want).max() <= 1e-5
    summary = json.loads(fs.cat(f"{output.removeprefix('s3://')}/_SUMMARY.json"))
    assert summary["rows_read"] == summary["rows_written"] + summary["rows_rejected"] == len(ids)
    return summary


def test_worker_nodes_lost_and_added_mid_run(corpus: dict, splade_tiny: Path) -> None:
    """A pool of two encoders on a cluster with room for one: the second waits for a node. One
    joins mid-run and takes it (the pool grows); then the first worker is lost while blocks are
    encoded and written, and its encoder is restarted on a node added after it."""
    output = "s3://nodes/out-churn"
    result = churn(
        {
            "workers": 1,
            "phases": [
                {
                    "job": job(splade_tiny, output, "--min-actors", "2"),
                    "output": output,
                    "actions": [
                        {"when": {"files": 1}, "do": "add_worker"},
                        {"when": {"files": 15}, "do": "remove_worker"},
                        {"when": {"after": 2}, "do": "add_worker"},
                    ],
                }
            ],
        }
    )
    phase = result["phases"][0]
    assert phase["exit"] == 0, phase["output"] + json.dumps(result["log"])
    summary = exactly_once(output, corpus)
    faults = summary["faults"]
    # the first worker was lost; the second encoder could only start on the worker that joined
    assert faults["nodes_lost"] == 1 and faults["encoder_actors"] == 2, (faults, result["log"])
    # the replacement may join, and take the restarted encoder, after the last block was written
    assert faults["nodes_added"] >= 1 and faults["encoder_nodes"] >= 2, (faults, result["log"])


@pytest.mark.slow  # 90 s; CI keeps the worker-nodes-lost-and-added and the head-lost tests
def test_all_encoder_nodes_lost_the_run_waits_then_finishes_and_a_commit_rides_through(
    corpus: dict, splade_tiny: Path
) -> None:
    """Every worker lost: the run says it waits for a node that can host an encoder, and goes on
    when one joins; a worker lost while the driver commits changes nothing of the commit."""
    output = "s3://nodes/out-wait"
    result = churn(
        {
            "workers": 2,
            "phases": [
                {
                    "job": job(splade_tiny, output),
                    "output": output,
                    "env": {"SPLADE_PIPELINE_PAUSE_AT": "before_commit:8"},
                    "expect": ["waiting: no live node can host an encoder actor", "is back after"],
                    "actions": [
                        {"when": {"files": 5}, "do": "remove_all_workers"},
                        {"when": {"stderr": "waiting: no live node can host an encoder actor"}, "do": "add_worker"},
                        {"when": {"stderr": "pausing at before_commit"}, "do": "remove_worker"},
                    ],
                }
            ],
        }
    )
    phase = result["phases"][0]
    assert phase["exit"] == 0, phase["output"] + json.dumps(result["log"])
    assert all(phase["seen"].values()), phase["seen"]
    summary = exactly_once(output, corpus)
    # counted while blocks were encoded and written: the one lost during the commit changed nothing
    assert summary["faults"]["nodes_lost"] == 2, (summary["faults"], result["log"])


def test_the_head_lost_fails_the_run_and_the_rerun_resumes_exactly_once(corpus: dict, splade_tiny: Path) -> None:
    output = "s3://nodes/out-head"
    result = churn(
        {
            "workers": 2,
            "phases": [
                {
                    "job": job(splade_tiny, output),
                    "output": output,
                    "actions": [{"when": {"files": 8}, "do": "kill_head"}],
                },
                {"job": job(splade_tiny, output), "output": output, "fresh_cluster": True},
            ],
        }
    )
    first, second = result["phases"]
    assert first["killed"], json.dumps(result["log"])
    assert second["exit"] == 0, second["output"] + json.dumps(result["log"])
    summary = exactly_once(output, corpus)
    assert 0 < summary["rows_reused"] < DOCS


def test_no_node_for_encoders_fails_after_the_deadline_with_a_clear_error(corpus: dict, splade_tiny: Path) -> None:
    """Placement: encoders go only where their resources are. A cluster with none of those nodes
    is waited on, with a message, until compute.wait_for_nodes_s; then a clear error, no traceback."""
    output = "s3://nodes/out-none"
    result = churn(
        {
            "workers": 1,
            "worker": {"num_cpus": 1, "object_store_memory": 120 * 2**20},  # no "encoder" resource anywhere
            "phases": [
                {
                    "job": job(splade_tiny, output, "--wait-for-nodes-s", "12"),
                    "output": output,
                    "timeout": 300,
                    "expect": [
                        "waiting: no live node can host an encoder actor",
                        "no node could host an encoder actor",
                    ],
                }
            ],
        }
    )
    phase = result["phases"][0]
    assert phase["exit"] == 2, phase["output"]
    assert all(phase["seen"].values()), phase["seen"]
    assert "{'CPU': 0.5, 'encoder': 1.0}" in phase["output"]
    assert "Traceback" not in phase["output"]


def test_encoders_on_accelerator_nodes_readers_and_writers_on_io_nodes(corpus: dict, splade_tiny: Path) -> None:
    """Placement settings an operator sets for a GPU cluster: encoders only on nodes of an
    accelerator type, writers only on nodes with an io resource (readers take the same setting;
    the summary names only actors' nodes), one block in flight per encoder."""
    output = "s3://nodes/out-placed"
    placed = [a for a in job(splade_tiny, output) if a not in ("--encoder-resources", '{"encoder": 1}')]
    placed[placed.index("s3://nodes/corpus/")] = "s3://nodes/corpus/part-[01].jsonl"  # 400 of the documents
    result = churn(
        {
            "workers": 2,
            "head": {**HEAD, "num_cpus": 2, "resources": {"io": 10}},
            "worker": {"num_cpus": 1, "resources": {"accelerator_type:L4": 1}, "object_store_memory": 120 * 2**20},
            "phases": [
                {
                    "job": [
                        *placed,
                        "--min-actors",
                        "2",
                        "--accelerator-type",
                        "L4",
                        "--io-resources",
                        '{"io": 0.01}',
                        "--max-blocks-in-flight-per-actor",
                        "1",
                    ],
                    "output": output,
                }
            ],
        }
    )
    phase = result["phases"][0]
    assert phase["exit"] == 0, phase["output"] + json.dumps(result["log"])
    summary = exactly_once(output, corpus, [r["id"] for r in corpus_rows(DOCS)[: 2 * DOCS // FILES]])
    nodes = summary["pace"]["nodes"]
    assert nodes["encoders"] and set(nodes["encoders"]) <= set(result["nodes"]["workers"]), (nodes, result["nodes"])
    assert nodes["writers"] == result["nodes"]["head"], (nodes, result["nodes"])


def test_max_blocks_in_flight_reaches_the_encoder_pool(ray_cluster: str, splade_tiny: Path) -> None:
    from pipeline.config import JobConfig
    from pipeline.job.plan import encoded_dataset

    config = JobConfig.model_validate(
        {
            "input": {"paths": [str(Path(__file__).parents[1] / "pipeline" / "data" / "sample_corpus.jsonl")]},
            "encoder": {"model": str(splade_tiny)},
            "compute": {"max_blocks_in_flight_per_actor": 1, "max_actors": 3},
        }
    )
    strategy = encoded_dataset(config)._logical_plan.dag.compute  # Ray Data's own record of the pool
    assert strategy.max_tasks_in_flight_per_actor == 1 and strategy.max_size == 3
