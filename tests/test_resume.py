"""Killed and re-run: the output holds every document exactly once, and committed work is not redone.

The driver is killed with SIGKILL at chosen points (``SPLADE_PIPELINE_CRASH_AT``, a test-only
hook) or from outside at whatever moment it has reached, on a real local Ray cluster with S3
through moto's server; then the same command runs again.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import s3fs
from support.jobs import cli, corpus_rows, put_jsonl_shards, reference_vectors, start_until_progress
from support.reference import densify

from pipeline.job.faults import VARIABLE
from pipeline.output.commits import committed_files, complete_blocks, read_progress
from pipeline.output.location import OutputLocation
from pipeline.output.lock import RunLock

VOCAB = 30522
FILES, ROWS_PER_FILE, BLOCK = 3, 60, 10


@pytest.fixture(scope="module")
def corpus(ray_cluster: str, splade_tiny: Path) -> dict[str, np.ndarray]:
    """Three JSONL shards of 60 documents on S3, and each document's reference vector."""
    fs = s3fs.S3FileSystem()
    fs.mkdir("resume")
    rows = corpus_rows(FILES * ROWS_PER_FILE)
    put_jsonl_shards(fs, "resume/corpus", rows, FILES)
    return reference_vectors(splade_tiny, rows)


def encode_args(splade_tiny: Path, output: str, *extra: str) -> list[str]:
    return [
        "encode",
        "--input",
        "s3://resume/corpus/",
        "--output",
        output,
        "--model",
        str(splade_tiny),
        "--max-length",
        "64",
        "--rows-per-block",
        str(BLOCK),
        "--commit-interval-s",
        "0",
        *extra,
    ]


def crash_env(point: str) -> dict[str, str]:
    return os.environ | {VARIABLE: point}


def assert_exactly_once(output: str, corpus: dict[str, np.ndarray]) -> dict:
    fs = s3fs.S3FileSystem()
    root = output.removeprefix("s3://")
    files = committed_files(output)
    data = pa.concat_tables([pq.read_table(fs.open(f, "rb")) for f in files])
    ids = data["id"].to_pylist()
    assert sorted(ids) == sorted(corpus) and len(set(ids)) == len(ids)  # every document, exactly once
    want = np.stack([corpus[i] for i in ids])
    assert np.abs(densify(data["sparse"].combine_chunks(), VOCAB) - want).max() <= 1e-5
    assert {f"s3://{p}" for p in fs.find(f"{root}/data")} == set(files)  # no file of a killed attempt left
    assert not fs.exists(f"{root}/_progress") and not fs.exists(f"{root}/_lock")
    summary = json.loads(fs.cat(f"{root}/_SUMMARY.json"))
    assert summary["rows_read"] == summary["rows_written"] == len(corpus)
    return summary


def recorded(output: str) -> tuple[int, dict[str, str]]:
    """Rows in blocks a killed attempt recorded as finished, and those files' modification times."""
    fs = s3fs.S3FileSystem()
    root = output.removeprefix("s3://")
    entries = complete_blocks(pa.concat_tables([t for t, _ in read_progress(OutputLocation(output), 1)]))
    files = [f"{root}/{f}" for f in entries["data_file"].to_pylist()]
    return int(sum(entries["rows"].to_pylist())), {f: str(fs.info(f, refresh=True)["LastModified"]) for f in files}


@pytest.mark.parametrize(("point", "kept_rows"), [("written:2", BLOCK), ("progress:3", 3 * BLOCK)])
def test_killed_while_encoding_resumes_exactly_once(
    corpus: dict, splade_tiny: Path, point: str, kept_rows: int
) -> None:
    output = f"s3://resume/out-{point.replace(':', '-')}"
    killed = cli(*encode_args(splade_tiny, output), env=crash_env(point))
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    rows, mtimes = recorded(output)
    assert rows == kept_rows

    again = cli(*encode_args(splade_tiny, output))
    assert again.returncode == 0, again.stderr[-3000:]
    summary = assert_exactly_once(output, corpus)
    assert summary["rows_reused"] == kept_rows  # committed blocks were not encoded again...
    fs = s3fs.S3FileSystem()
    assert {f: str(fs.info(f, refresh=True)["LastModified"]) for f in mtimes} == mtimes  # ...nor rewritten
    assert f"{kept_rows} rows already committed are kept" in again.stdout


def test_killed_after_commit_reencodes_nothing(corpus: dict, splade_tiny: Path) -> None:
    output = "s3://resume/out-commit"
    killed = cli(*encode_args(splade_tiny, output), env=crash_env("commit"))
    assert killed.returncode == -signal.SIGKILL
    again = cli(*encode_args(splade_tiny, output))
    assert again.returncode == 0, again.stderr[-3000:]
    summary = assert_exactly_once(output, corpus)
    assert summary["rows_reused"] == len(corpus) and summary["generation"] == 1
    # A third run of a finished job is a no-op too.
    third = cli(*encode_args(splade_tiny, output))
    assert (
        third.returncode == 0 and f"{len(corpus)} rows already committed are kept; 0 input files left" in third.stdout
    )


def test_killed_from_outside_at_any_moment(corpus: dict, splade_tiny: Path) -> None:
    output = "s3://resume/out-outside"
    fs = s3fs.S3FileSystem()
    proc = start_until_progress(
        encode_args(splade_tiny, output), "resume/out-outside", stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    fs.invalidate_cache()
    rows, _ = recorded(output)
    again = cli(*encode_args(splade_tiny, output))
    assert again.returncode == 0, again.stderr[-3000:]
    assert assert_exactly_once(output, corpus)["rows_reused"] == rows >= BLOCK


def test_settings_that_change_vectors_are_refused_unless_starting_over(corpus: dict, splade_tiny: Path) -> None:
    output = "s3://resume/out-change"
    killed = cli(*encode_args(splade_tiny, output), env=crash_env("progress:2"))
    assert killed.returncode == -signal.SIGKILL
    refused = cli(*encode_args(splade_tiny, output, "--max-length", "32", "--top-k", "50"))
    assert refused.returncode == 2
    assert "encoded with different settings" in refused.stderr
    assert "encoder max_length: 64 -> 32" in refused.stderr and "encoder top_k: None -> 50" in refused.stderr
    assert "output.overwrite" in refused.stderr
    fresh = cli(*encode_args(splade_tiny, output, "--overwrite", "true"))
    assert fresh.returncode == 0, fresh.stderr[-3000:]
    assert assert_exactly_once(output, corpus)["rows_reused"] == 0


def test_one_run_at_a_time(corpus: dict, splade_tiny: Path) -> None:
    fs = s3fs.S3FileSystem()
    with RunLock(OutputLocation("s3://resume/out-locked"), "reindex", ttl_s=60):
        refused = cli(*encode_args(splade_tiny, "s3://resume/out-locked"))
    assert refused.returncode == 2
    assert "another reindex holds this output" in refused.stderr and "expires at" in refused.stderr
    # A lock whose holder died (no renewal past its expiry) is taken over.
    fs.pipe(
        "resume/out-locked/_lock", json.dumps({"owner": "dead", "what": "encode", "expires": time.time() - 1}).encode()
    )
    done = cli(*encode_args(splade_tiny, "s3://resume/out-locked"))
    assert done.returncode == 0, done.stderr[-3000:]
    assert_exactly_once("s3://resume/out-locked", corpus)


def test_lock_is_exclusive_and_renewed(s3_endpoint: str) -> None:
    fs = s3fs.S3FileSystem()
    fs.mkdir("locks")
    first = RunLock(OutputLocation("s3://locks/a"), "reindex", ttl_s=0.6).acquire()
    try:
        time.sleep(1.0)  # past one ttl: the heartbeat has renewed it
        with pytest.raises(Exception, match="another reindex holds this output"):
            RunLock(OutputLocation("s3://locks/a"), "reindex", ttl_s=0.6).acquire()
        first.check()
    finally:
        first.release()
    assert not fs.exists("locks/a/_lock")
    with RunLock(OutputLocation("s3://locks/a"), "encode", ttl_s=5) as second:
        second.check()


def test_killed_during_upsert_store_holds_each_document_once(corpus: dict, splade_tiny: Path, tmp_path: Path) -> None:
    output, store = "s3://resume/out-upsert", tmp_path / "qdrant"
    args = [
        *encode_args(splade_tiny, output),
        "--sink-type",
        "qdrant",
        "--sink-path",
        str(store),
        "--sink-batch-size",
        "10",
    ]
    killed = cli(*args, env=crash_env("upsert:2"))  # the driver loads an embedded store: killed after 2 batches of 40
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert len(_stored(store)) == 80

    again = cli(*args)
    assert again.returncode == 0, again.stderr[-3000:]
    summary = assert_exactly_once(output, corpus)
    assert summary["rows_reused"] == len(corpus)  # nothing encoded again: only the load is redone
    stored = _stored(store)
    assert sorted(stored) == sorted(corpus)  # each document once (point ids are a function of the document id)
    assert max(np.abs(vector - corpus[doc_id]).max() for doc_id, vector in stored.items()) <= 1e-5


def _stored(path: Path) -> dict[str, np.ndarray]:
    from qdrant_client import QdrantClient

    client = QdrantClient(path=str(path))
    try:
        points, _ = client.scroll("splade", limit=10_000, with_vectors=True, with_payload=True)
    finally:
        client.close()
    out = {}
    for point in points:
        dense = np.zeros(VOCAB, np.float32)
        sparse = point.vector["sparse"]
        dense[sparse.indices] = sparse.values
        out[point.payload["doc_id"]] = dense
    return out
