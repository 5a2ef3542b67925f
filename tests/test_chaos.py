"""Chaos: real failures on a real local Ray cluster with S3 through moto's server, each test bounded
in time. Every test checks counts, ids and vectors against the corpus, not only exit codes.

- encoder actors killed by PID mid-run (2-3 times): restarted, their blocks retried;
- a fault-injecting proxy in front of S3: 7% of requests answered 503 SlowDown, 3% dropped;
- a document that kills its encoder process every time (a test-only hook): rejected, the rest written;
- an encoder that runs out of memory above a token budget (a test-only hook): smaller batches;
- SIGTERM to the driver mid-run, then a re-run: exactly once;
- an encoder that dies every time it starts (a test-only hook): the run stops with a message, not
  restarting it forever; a run that gives up inside a notebook's process stops its dataset too.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import s3fs
from support.fault_proxy import FaultProxy
from support.jobs import ROOT, cli, corpus_rows, put_jsonl_shards, read_delta, reference_vectors, start_until_written
from support.reference import densify

from pipeline.job.faults import LOAD_DIES, OOM_ABOVE, POISON

VOCAB = 30522
FILES, ROWS_PER_FILE = 8, 100
PILL = "POISON-PILL-7f3a"


@pytest.fixture(scope="module")
def corpus(ray_cluster: str, splade_tiny: Path) -> dict[str, np.ndarray]:
    """Eight JSONL shards of 100 documents on S3 (one of them carries the poison pill in a second
    corpus), and each document's reference vector."""
    fs = s3fs.S3FileSystem()
    fs.mkdir("chaos")
    rows = corpus_rows(FILES * ROWS_PER_FILE)
    put_jsonl_shards(fs, "chaos/corpus", rows, FILES)
    poisoned = [
        *rows[:60],
        {"id": "pill", "title": "x", "text": f"an ordinary looking text {PILL}", "lang": "en"},
        *rows[60:120],
    ]
    fs.pipe("chaos/poisoned/part-0.jsonl", "\n".join(json.dumps(r) for r in poisoned).encode())
    return reference_vectors(splade_tiny, rows)


def args(splade_tiny: Path, output: str, source: str = "s3://chaos/corpus/", *extra: str) -> list[str]:
    return [
        "encode",
        "--input",
        source,
        "--output",
        output,
        "--model",
        str(splade_tiny),
        "--max-length",
        "64",
        "--rows-per-block",
        "20",
        "--min-actors",
        "2",
        "--max-actors",
        "2",
        "--num-cpus-per-actor",
        "0.8",
        "--io-cpus",
        "0.1",
        *extra,
    ]


def check_output(output: str, corpus: dict[str, np.ndarray], ids: list[str] | None = None) -> dict:
    """The committed output holds each expected document once, with its reference vector."""
    fs = s3fs.S3FileSystem()
    fs.invalidate_cache()
    data = read_delta(output)
    got = data["id"].to_pylist()
    assert sorted(got) == sorted(ids if ids is not None else corpus) and len(set(got)) == len(
        got
    )  # none lost, none twice
    want = np.stack([corpus[i] for i in got])
    assert np.abs(densify(data["sparse"].combine_chunks(), VOCAB) - want).max() <= 1e-5
    summary = json.loads(fs.cat(f"{output.removeprefix('s3://')}/_SUMMARY.json"))
    assert summary["rows_read"] == summary["rows_written"] + summary["rows_rejected"]
    return summary


def encoder_actor_pids() -> list[int]:
    from ray.util.state import list_actors

    actors = list_actors(filters=[("state", "=", "ALIVE")], limit=1000)
    return [a.pid for a in actors if "EncodeBlocks" in (a.class_name or "") and a.pid]


def test_encoder_actors_killed_mid_run(corpus: dict, splade_tiny: Path) -> None:
    output = "s3://chaos/out-killed"
    slower = ("--max-batch-tokens", "128")  # smaller forward passes: a run long enough to kill encoders in
    job = subprocess.Popen(
        [sys.executable, "-m", "pipeline.cli", *args(splade_tiny, output, "s3://chaos/corpus/", *slower)],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    fs = s3fs.S3FileSystem()
    killed: list[int] = []
    deadline = time.monotonic() + 240
    while job.poll() is None and len(killed) < 3:
        assert time.monotonic() < deadline
        fs.invalidate_cache()
        started = fs.exists("chaos/out-killed/data") and fs.find("chaos/out-killed/data")
        pids = [p for p in encoder_actor_pids() if p not in killed] if started else []
        if pids:
            os.kill(pids[0], signal.SIGKILL)  # an encoder dies mid-run, as under the OOM killer
            killed.append(pids[0])
            time.sleep(1.0)
        time.sleep(0.1)
    out, _ = job.communicate(timeout=300)
    assert job.returncode == 0, out[-3000:]
    assert len(killed) >= 2, f"the job finished before the encoders could be killed twice ({killed})"
    summary = check_output(output, corpus)
    assert summary["rows_written"] == len(corpus) and summary["rows_rejected"] == 0
    assert summary["faults"]["actor_restarts"] >= 1, summary["faults"]
    print(f"killed encoder actors {len(killed)} times; faults: {summary['faults']}")


def test_flaky_object_storage(corpus: dict, splade_tiny: Path, s3_endpoint: str) -> None:
    output = "s3://chaos/out-flaky"
    with FaultProxy(s3_endpoint, slow_down=0.07, drop=0.03, seed=7) as proxy:
        options = json.dumps({"endpoint_url": proxy.url})
        proc = cli(
            *args(
                splade_tiny,
                output,
                "s3://chaos/corpus/",
                "--input-storage-options",
                options,
                "--output-storage-options",
                options,
            )
        )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert proxy.counts["slow_down"] >= 5 and proxy.counts["dropped"] >= 2, proxy.counts  # faults were really injected
    summary = check_output(output, corpus)
    assert summary["rows_written"] == len(corpus)
    print(f"S3 through the fault proxy: {proxy.counts}")


def test_document_that_kills_its_encoder_is_rejected(corpus: dict, splade_tiny: Path) -> None:
    output = "s3://chaos/out-poison"
    proc = cli(*args(splade_tiny, output, "s3://chaos/poisoned/"), env=os.environ | {POISON: PILL})
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    expected = [r["id"] for r in corpus_rows(120)]
    summary = check_output(output, corpus, expected)
    assert summary["rows_read"] == 121 and summary["rows_written"] == 120
    assert summary["rejected_by_reason"] == {"encoder_crash": 1}
    rejects = read_delta(f"{output}/_rejects")
    assert rejects["id"].to_pylist() == ["pill"] and "died on this document" in rejects["detail"][0].as_py()
    assert rejects["source"][0].as_py() == "s3://chaos/poisoned/part-0.jsonl" and rejects["line"][0].as_py() == 61
    assert summary["faults"]["actor_restarts"] >= 3 and summary["faults"]["blocks_retried"] == 1, summary["faults"]


def test_out_of_memory_halves_the_batch(corpus: dict, splade_tiny: Path) -> None:
    output = "s3://chaos/out-oom"
    proc = cli(*args(splade_tiny, output), env=os.environ | {OOM_ABOVE: "256"})  # the CPU budget is 1024 tokens
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    summary = check_output(output, corpus)
    assert summary["rows_written"] == len(corpus) and summary["faults"]["oom_splits"] >= 10, summary["faults"]


def test_sigterm_stops_promptly_then_resumes(corpus: dict, splade_tiny: Path) -> None:
    output = "s3://chaos/out-sigterm"
    job = start_until_written(
        args(splade_tiny, output), "chaos/out-sigterm", stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    fs = s3fs.S3FileSystem()
    job.send_signal(signal.SIGTERM)
    stopped = time.monotonic()
    _, err = job.communicate(timeout=60)
    assert time.monotonic() - stopped < 30  # promptly
    assert job.returncode == 130 and "interrupted" in err and "run the same command again to resume" in err
    fs.invalidate_cache()

    again = cli(*args(splade_tiny, output))
    assert again.returncode == 0, again.stderr[-3000:]
    summary = check_output(output, corpus)
    assert 0 < summary["rows_reused"] < len(corpus)


def test_permanent_storage_errors_fail_fast(
    corpus: dict, splade_tiny: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """Missing buckets are not retried like throttling: a prompt error naming the URL."""
    from pipeline.cli import main

    for args_, url in (
        (["--input", "s3://no-such-bucket-1/docs/", "--output", str(tmp_path / "out")], "s3://no-such-bucket-1/docs/"),
        (["--input", "s3://chaos/corpus/", "--output", "s3://no-such-bucket-2/out"], "s3://no-such-bucket-2/out"),
    ):
        start = time.monotonic()
        code = main(["encode", *args_, "--model", str(splade_tiny)])
        err = capsys.readouterr().err
        assert code == 2 and url in err and "Traceback" not in err, err
        assert time.monotonic() - start < 20


def test_an_encoder_that_dies_whenever_it_starts_stops_the_run_with_a_message(corpus: dict, splade_tiny: Path) -> None:
    """Unlimited restarts are for lost nodes: an actor dying while it loads the model on a node
    that stays up (too little memory for the model) dies max_startup_deaths times; its next start
    ends the run with exit 2, saying why."""
    output = "s3://chaos/out-load-dies"
    start = time.monotonic()
    proc = cli(
        *args(splade_tiny, output, "s3://chaos/corpus/", "--max-startup-deaths", "2"), env=os.environ | {LOAD_DIES: "1"}
    )
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-3000:]
    said = [line for line in proc.stderr.splitlines() if line.startswith("splade-pipeline encode: error:")]
    assert said and "the encoder actor died 2 times while starting" in said[0], proc.stderr[-3000:]
    assert "compute.max_startup_deaths = 2" in said[0] and "kept for the re-run" in said[0]
    print(f"stopped after {time.monotonic() - start:.0f} s")


def test_a_run_that_gives_up_in_a_notebook_process_stops_its_dataset(
    corpus: dict, splade_tiny: Path, tmp_path: Path
) -> None:
    """In-process (a notebook): the run gives up (no node can host an encoder) and raises; the Ray
    Data execution behind it is stopped with it: no executor thread, no thread driving it, no
    encoder actor left pending for a run that has ended."""
    import threading

    from ray.util.state import list_actors

    from pipeline.config import JobConfig
    from pipeline.job.encode import run_job
    from pipeline.job.steps import RESULTS_THREAD
    from pipeline.job.watch import NoEncoderNodeError

    config = JobConfig.model_validate(
        {
            "input": {"paths": ["s3://chaos/corpus/"], "rows_per_block": 20},
            "output": {"path": "s3://chaos/out-notebook-stop"},
            "encoder": {"model": str(splade_tiny), "max_length": 64},
            "compute": {
                "encoder_resources": {"no_such_node": 1},
                "wait_for_nodes_s": 3,
                "io_cpus": 0.1,
                "num_cpus_per_actor": 0.5,
            },
        }
    )
    with pytest.raises(NoEncoderNodeError, match="no_such_node"):
        run_job(config)
    deadline = time.monotonic() + 30

    def running() -> list[str]:
        threads = [t.name for t in threading.enumerate() if t.name == RESULTS_THREAD]
        threads += [t.name for t in threading.enumerate() if type(t).__name__ == "StreamingExecutor"]
        actors = list_actors(filters=[("state", "!=", "DEAD")], limit=1000)
        return threads + [a.class_name for a in actors if "EncodeBlocks" in (a.class_name or "")]

    while running() and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not running()
