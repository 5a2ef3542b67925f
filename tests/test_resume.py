"""Killed and re-run: the table holds every document exactly once, and written work is not redone.

The driver is killed with SIGKILL at chosen points (``SPLADE_PIPELINE_CRASH_AT``, a test-only
hook) or from outside at whatever moment it has reached, on a real local Ray cluster with S3
through moto's server; then the same command runs again. Nothing but the files themselves
records progress: a re-run finds what was written by reading the footers of the files no
version references.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
from pathlib import Path

import numpy as np
import pytest
import s3fs
from support.jobs import (
    cli,
    corpus_rows,
    put_jsonl_shards,
    read_delta,
    reference_vectors,
    settle,
    start_until_written,
)
from support.reference import densify

from pipeline.job.faults import VARIABLE
from pipeline.output.location import OutputLocation
from pipeline.output.records import complete_blocks, entries_on_disk, unit_of
from pipeline.output.table import DeltaOutput

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
        *extra,
    ]


def crash_env(point: str) -> dict[str, str]:
    return os.environ | {VARIABLE: point}


def assert_exactly_once(output: str, corpus: dict[str, np.ndarray]) -> dict:
    fs = s3fs.S3FileSystem()
    root = output.removeprefix("s3://")
    data = read_delta(output)
    ids = data["id"].to_pylist()
    assert sorted(ids) == sorted(corpus) and len(set(ids)) == len(ids)  # every document, exactly once
    want = np.stack([corpus[i] for i in ids])
    assert np.abs(densify(data["sparse"].combine_chunks(), VOCAB) - want).max() <= 1e-5
    summary = json.loads(fs.cat(f"{root}/_SUMMARY.json"))
    assert summary["rows_read"] == summary["rows_written"] == len(corpus)
    assert summary["table_version"] == table_version(output)
    return summary


def table_version(output: str) -> int | None:
    snap = DeltaOutput(OutputLocation(output)).snapshot()
    return None if snap is None else snap.version


def written(output: str) -> tuple[int, dict[str, str]]:
    """Rows in complete blocks a killed attempt left (found as a re-run finds them: by their footers),
    and those files' modification times."""
    fs = s3fs.S3FileSystem()
    loc = OutputLocation(output)
    units = {u for f in loc.files("data") if (u := unit_of(f))}
    entries = complete_blocks(entries_on_disk(loc, ("data", "_rejects"), set(), units))
    files = [f"{loc.root}/{f}" for f in entries["data_file"].to_pylist()]
    return int(sum(entries["rows"].to_pylist())), {f: str(fs.info(f, refresh=True)["LastModified"]) for f in files}


@pytest.mark.parametrize(
    ("point", "least"),
    [
        ("written:1", BLOCK),
        pytest.param("written:7", 7 * BLOCK, marks=pytest.mark.slow),  # later writes: as written:1, more of them
        pytest.param("before_commit", FILES * ROWS_PER_FILE, marks=pytest.mark.slow),  # CI: the status test below
    ],
)
def test_killed_before_any_commit_resumes_exactly_once(corpus: dict, splade_tiny: Path, point: str, least: int) -> None:
    """During the first data writes (nothing committed or recorded yet), later writes, and after every
    write but before the commit: the re-run keeps every complete block, rewrites none, ends once."""
    output = f"s3://resume/out-{point.replace(':', '-')}"
    killed = cli(*encode_args(splade_tiny, output), env=crash_env(point))
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert table_version(output) is None  # nothing committed: no table yet
    rows, mtimes = written(output)
    assert rows >= least

    again = cli(*encode_args(splade_tiny, output))
    assert again.returncode == 0, again.stderr[-3000:]
    summary = assert_exactly_once(output, corpus)
    assert summary["table_version"] == 0  # one run, one version
    assert summary["rows_reused"] == rows  # blocks written before the kill were not encoded again...
    fs = s3fs.S3FileSystem()
    assert {f: str(fs.info(f, refresh=True)["LastModified"]) for f in mtimes} == mtimes  # ...nor rewritten
    assert f"{rows} rows already written are kept" in again.stdout


@pytest.mark.parametrize("point", ["commit", "committed"])
def test_killed_during_or_after_the_commit_reencodes_nothing(corpus: dict, splade_tiny: Path, point: str) -> None:
    """``commit``: the table's version landed, the rejects table not yet; ``committed``: both landed."""
    output = f"s3://resume/out-{point}"
    killed = cli(*encode_args(splade_tiny, output), env=crash_env(point))
    assert killed.returncode == -signal.SIGKILL
    assert table_version(output) == 0
    assert (DeltaOutput(OutputLocation(output), "_rejects").snapshot() is None) == (point == "commit")
    again = cli(*encode_args(splade_tiny, output))
    assert again.returncode == 0, again.stderr[-3000:]
    summary = assert_exactly_once(output, corpus)
    assert summary["rows_reused"] == len(corpus) and summary["table_version"] == 0  # no second version
    assert DeltaOutput(OutputLocation(output), "_rejects").snapshot() is not None  # the re-run finished it
    third = cli(*encode_args(splade_tiny, output))
    assert third.returncode == 0 and f"{len(corpus)} rows already written are kept; 0 input files left" in third.stdout
    assert table_version(output) == 0


def test_killed_from_outside_at_any_moment(corpus: dict, splade_tiny: Path) -> None:
    output = "s3://resume/out-outside"
    proc = start_until_written(
        encode_args(splade_tiny, output), "resume/out-outside", stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    settle("resume/out-outside")  # its writer actors may finish a block before Ray stops them
    rows, _ = written(output)
    again = cli(*encode_args(splade_tiny, output))
    assert again.returncode == 0, again.stderr[-3000:]
    assert assert_exactly_once(output, corpus)["rows_reused"] == rows


def test_settings_that_change_vectors_are_refused_unless_overwriting(corpus: dict, splade_tiny: Path) -> None:
    output = "s3://resume/out-change"
    first = cli(*encode_args(splade_tiny, output))
    assert first.returncode == 0, first.stderr[-3000:]
    refused = cli(*encode_args(splade_tiny, output, "--max-length", "32", "--top-k", "50"))
    assert refused.returncode == 2
    assert "encoded with different settings" in refused.stderr
    assert "encoder max_length: 64 -> 32" in refused.stderr and "encoder top_k: None -> 50" in refused.stderr
    assert "output.overwrite" in refused.stderr and table_version(output) == 0
    # overwrite with the same settings: the files are the same units, so nothing is encoded or committed
    same = cli(*encode_args(splade_tiny, output, "--overwrite", "true"))
    assert same.returncode == 0, same.stderr[-3000:]
    assert assert_exactly_once(output, corpus)["rows_reused"] == len(corpus) and table_version(output) == 0
    # overwrite with settings that change the vectors: a new version replaces the content
    fresh = cli(*encode_args(splade_tiny, output, "--overwrite", "true", "--top-k", "50"))
    assert fresh.returncode == 0, fresh.stderr[-3000:]
    data = read_delta(output)
    assert sorted(data["id"].to_pylist()) == sorted(corpus) and table_version(output) == 1
    assert max(len(v["indices"]) for v in data["sparse"].to_pylist()) <= 50
    assert json.loads(s3fs.S3FileSystem().cat("resume/out-change/_SUMMARY.json"))["rows_reused"] == 0
    assert read_delta(output, version=0).num_rows == len(corpus)  # the version it replaced is still readable


def test_a_folder_holding_other_files_is_refused(corpus: dict, splade_tiny: Path) -> None:
    fs = s3fs.S3FileSystem()
    fs.pipe("resume/out-foreign/notes.txt", b"someone else's file")
    for extra in ([], ["--overwrite", "true"]):  # overwrite too: vacuum would delete the stranger's file
        refused = cli(*encode_args(splade_tiny, "s3://resume/out-foreign", *extra))
        assert refused.returncode == 2 and "is not a splade-pipeline table" in refused.stderr
        assert "notes.txt" in refused.stderr
    assert fs.cat("resume/out-foreign/notes.txt") == b"someone else's file"


@pytest.mark.parametrize(("point", "stored_before"), [("committed", 0), ("upsert:2", 80)])
def test_killed_before_or_during_the_store_load_store_holds_each_document_once(
    corpus: dict, splade_tiny: Path, tmp_path: Path, point: str, stored_before: int
) -> None:
    output, store = f"s3://resume/out-load-{point.replace(':', '-')}", tmp_path / "qdrant"
    args = [
        *encode_args(splade_tiny, output),
        "--sink-type",
        "qdrant",
        "--sink-path",
        str(store),
        "--sink-batch-size",
        "10",
    ]
    killed = cli(*args, env=crash_env(point))  # the driver loads an embedded store (batches of 40)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert len(_stored(store)) == stored_before if store.exists() else stored_before == 0
    records = [json.loads(OutputLocation(output).read_bytes(f)) for f in OutputLocation(output).files("_splade/stores")]
    # no load finished: the record says none is held; a load toward version 0 began where it got that far
    assert all(r["table_version"] is None for r in records) and len(records) == (point != "committed")

    again = cli(*args)
    assert again.returncode == 0, again.stderr[-3000:]
    summary = assert_exactly_once(output, corpus)
    assert summary["rows_reused"] == len(corpus)  # nothing encoded again: only the load is redone
    stored = _stored(store)
    assert sorted(stored) == sorted(corpus)  # each document once (point ids are a function of the document id)
    assert max(np.abs(vector - corpus[doc_id]).max() for doc_id, vector in stored.items()) <= 1e-5
    (record,) = OutputLocation(output).files("_splade/stores")
    assert json.loads(OutputLocation(output).read_bytes(record))["table_version"] == 0  # the version it holds


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


def test_status_of_a_run_in_progress_then_killed_then_resumed(corpus: dict, splade_tiny: Path) -> None:
    """``status`` while a run works (paused before its commit: every file written), once it is
    killed (its process gone: stopped at once, its files not committed), and after the re-run,
    which keeps every block written before the kill, rewrites none, and ends once."""
    import sys
    import threading
    import time

    from support.jobs import ROOT

    from pipeline.job.faults import PAUSE

    output = "s3://resume/out-status"

    def status() -> dict:
        shown = cli("status", "--output", output, "--json")
        assert shown.returncode == 0, shown.stderr[-2000:]
        return json.loads(shown.stdout)

    env = os.environ | {PAUSE: "before_commit:300"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "pipeline.cli", *encode_args(splade_tiny, output)],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    said: list[str] = []
    threading.Thread(target=lambda: said.extend(proc.stderr), daemon=True).start()  # type: ignore[arg-type]
    deadline = time.monotonic() + 240
    while not any("pausing at before_commit" in line for line in said):
        assert proc.poll() is None and time.monotonic() < deadline, "".join(said)[-2000:]
        time.sleep(0.5)
    try:
        now = status()
        run = now["runs"][0]
        assert run["state"] == "running" and run["kind"] == "encode" and run["pid"] == proc.pid
        assert run["done"] == len(corpus) and run["total"] == pytest.approx(len(corpus), rel=0.1)  # estimated
        assert now["table"] is None and now["uncommitted_files"] >= FILES
    finally:
        proc.kill()
        proc.wait(timeout=30)
    killed = status()["runs"][0]
    assert killed["state"] == "stopped" and killed["process_gone"] and killed["done"] == len(corpus)
    text = cli("status", "--output", output).stdout
    assert "STOPPED without committing: its process is gone" in text and "data files written and not committed" in text

    rows, mtimes = written(output)
    assert rows == len(corpus)  # every block written before the kill
    again = cli(*encode_args(splade_tiny, output))
    assert again.returncode == 0, again.stderr[-3000:]
    assert assert_exactly_once(output, corpus)["rows_reused"] == rows  # none encoded again...
    fs = s3fs.S3FileSystem()
    assert {f: str(fs.info(f, refresh=True)["LastModified"]) for f in mtimes} == mtimes  # ...nor rewritten
    after = status()
    assert [r["state"] for r in after["runs"]] == ["committed", "stopped"]
    assert after["runs"][1]["superseded_by"] == after["runs"][0]["attempt"]
    assert after["table"]["documents"] == len(corpus) and after["uncommitted_files"] == 0
