"""Qdrant (embedded local mode, the real qdrant-client engine): job -> store -> search equals brute force."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from support.sink_checks import (
    QUERIES,
    VOCAB,
    assert_ensure_refused,
    assert_hostile_ids_round_trip,
    assert_idempotent_and_delete,
    assert_search_in_a_fresh_process,
    assert_search_matches_brute_force,
    run_into_store,
)

from pipeline.cli import main
from pipeline.config import load_config
from pipeline.sinks.protocol import SinkError, is_transient, request_batches, with_retries


@pytest.fixture(scope="module")
def loaded(ray_cluster: str, splade_tiny: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("qdrant-job")
    config, summary = run_into_store(
        root, splade_tiny, {"type": "qdrant", "path": str(root / "qdrant"), "batch_size": 50}
    )
    return {"config": config, "summary": summary}


def test_job_loads_store_and_search_matches_brute_force(loaded: dict) -> None:
    summary = loaded["summary"]
    assert summary["sink"]["upserted"] == summary["rows_written"] == 120
    assert summary["sink"]["store_count"] == 120
    assert_search_matches_brute_force(loaded["config"])


def test_rerun_is_idempotent_and_delete_removes(loaded: dict, capsys: pytest.CaptureFixture) -> None:
    config = loaded["config"]
    first_hit = assert_idempotent_and_delete(config, 120)
    # `upsert --from` puts it back; `search` prints it first again
    args = ["--sink-type", "qdrant", "--sink-path", config.sink.path, "--model", config.encoder.model]
    assert main(["upsert", "--from", config.output.path, *args]) == 0
    assert main(["search", QUERIES[0], "--k", "3", *args]) == 0
    out = capsys.readouterr().out
    assert "upserted 120 vectors" in out and "it holds 120" in out
    assert f"   1. {first_hit}  " in out


def test_incompatible_collection_is_an_error_not_a_drop(loaded: dict) -> None:
    config = loaded["config"]
    other = config.sink.model_copy(update={"vector_name": "other"})
    assert (
        assert_ensure_refused(other, r"without a sparse vector named 'other' \(it has \['sparse'\]\)") == 120
    )  # nothing dropped
    idf = config.sink.model_copy(update={"idf_modifier": True})
    assert assert_ensure_refused(idf, "exists with idf_modifier=False") == 120


def test_missing_collection_without_create(tmp_path: Path) -> None:
    cfg = load_config(None, {"sink.type": "qdrant", "sink.path": str(tmp_path), "sink.create_if_missing": False}).sink
    assert_ensure_refused(cfg, "collection does not exist and sink.create_if_missing is false", count_after=False)


def test_local_mode_allows_one_writer(tmp_path: Path) -> None:
    from pipeline.encode.fingerprint import Fingerprint
    from pipeline.job.load import check_sink

    with pytest.raises(ValueError, match="an embedded qdrant store allows one writer"):
        check_sink(
            load_config(None, {"sink.type": "qdrant", "sink.path": str(tmp_path), "sink.writers": 2}).sink,
            Fingerprint.from_dict({"top_k": None, "vocab_size": VOCAB}),
        )


def test_retries_only_transient_errors() -> None:
    calls = []

    def flaky() -> str:
        calls.append(time.monotonic())
        if len(calls) < 3:
            raise ConnectionError("connection refused")
        return "ok"

    assert with_retries(flaky, "upserting", deadline_s=10, store="teststore") == "ok" and len(calls) == 3

    def broken() -> None:
        raise ValueError("400 Bad Request: wrong vector name")

    with pytest.raises(SinkError, match="teststore: deleting failed: ValueError: 400 Bad Request"):
        with_retries(broken, "deleting", deadline_s=10, store="teststore")

    def down() -> None:
        raise TimeoutError("timed out")

    start = time.monotonic()
    with pytest.raises(SinkError, match="teststore: searching failed: TimeoutError"):
        with_retries(down, "searching", deadline_s=1.0, store="teststore")
    assert time.monotonic() - start < 3
    assert is_transient(RuntimeError("Unexpected Response: 503 (Service Unavailable)"))
    assert not is_transient(RuntimeError("Unexpected Response: 400 (Bad Request)"))
    assert not is_transient(RuntimeError("[413] Request size 114 exceeds the maximum supported size of 50000"))


def test_request_batches_respect_count_and_bytes() -> None:
    from pipeline.encode.sparse import sparse_array

    nnz = np.array([10, 1000, 5, 5, 5, 2000], dtype=np.int32)
    offsets = np.concatenate([[0], np.cumsum(nnz)]).astype(np.int32)
    sparse = sparse_array(offsets, np.zeros(offsets[-1], np.int32), np.ones(offsets[-1], np.float32))
    rows = pa.table({"id": [f"d{i}" for i in range(6)], "sparse": sparse})
    sizes = [b.num_rows for b in request_batches(rows, max_count=3, max_bytes=30_000)]
    assert sizes == [1, 1, 3, 1]  # 10 + 1000 terms overflow 30 kB; a too-large single vector still goes alone
    assert [b.num_rows for b in request_batches(rows, max_count=2, max_bytes=10**9)] == [2, 2, 2]


@pytest.mark.cluster
def test_hostile_ids_are_data(tmp_path: Path) -> None:
    sink = load_config(None, {"sink.type": "qdrant", "sink.path": str(tmp_path / "q"), "sink.collection": "h"}).sink
    assert_hostile_ids_round_trip(sink)


def test_search_in_a_fresh_process(loaded: dict, tmp_path: Path) -> None:
    assert_search_in_a_fresh_process(
        loaded["config"], tmp_path, {"path": str(tmp_path / "fresh"), "collection": "fresh"}
    )


def test_an_embedded_load_starts_no_ray(loaded: dict, tmp_path: Path) -> None:
    """The driver writes an embedded store alone: `upsert --from` reads the files itself, and no Ray
    cluster is started (or joined) for it."""
    import json
    import os
    import subprocess
    import sys

    config = loaded["config"]
    sink = config.sink.model_copy(update={"path": str(tmp_path / "again"), "collection": "again"})
    script = (
        "import json, sys, ray\n"
        "from pipeline.config import JobConfig\n"
        "from pipeline.job.load import upsert_output\n"
        "config = JobConfig.model_validate_json(sys.argv[1])\n"
        "result = upsert_output(config)\n"
        "print(json.dumps({'ray': ray.is_initialized(), 'count': result['store_count']}))\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    arg = config.model_copy(update={"sink": sink}).model_dump_json()
    proc = subprocess.run([sys.executable, "-c", script, arg], capture_output=True, text=True, env=env, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == {"ray": False, "count": 120}
