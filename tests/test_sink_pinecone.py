"""Pinecone, as a protocol test: the official SDK against a local server speaking Pinecone's data plane.

No Pinecone service can run here. `pinecone_protocol.PineconeProtocolServer` checks what the SDK
sends (paths, Api-Key, bodies, documented limits) and answers as the service does, throttling
and 413s included; its search is an exact dot product.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from support.pinecone_protocol import PINECONE_TEST_KEY, PineconeProtocolServer
from support.sink_checks import (
    assert_hostile_ids_round_trip,
    assert_idempotent_and_delete,
    assert_search_in_a_fresh_process,
    assert_search_matches_brute_force,
    run_into_store,
)
from support.tables import commit_files

from pipeline.cli import main
from pipeline.config import load_config
from pipeline.encode.sparse import sparse_array
from pipeline.job.load import upsert_output
from pipeline.output.layout import FINGERPRINT_KEY
from pipeline.sinks.pinecone import point_id
from pipeline.sinks.protocol import SinkError


@pytest.fixture(scope="module")
def server() -> PineconeProtocolServer:
    srv = PineconeProtocolServer(PINECONE_TEST_KEY)
    yield srv
    srv.close()


@pytest.fixture(scope="module")
def loaded(
    ray_cluster: str, splade_tiny: Path, server: PineconeProtocolServer, tmp_path_factory: pytest.TempPathFactory
) -> dict:
    root = tmp_path_factory.mktemp("pinecone-job")
    server.throttle_next = 3  # the first upserts are throttled (429), as a busy index does
    sink = {"type": "pinecone", "url": server.url, "namespace": "docs", "batch_size": 25}
    config, summary = run_into_store(root, splade_tiny, sink, **{"encoder.top_k": 64})
    return {"config": config, "summary": summary}


def test_job_loads_index_through_throttling(loaded: dict, server: PineconeProtocolServer) -> None:
    assert loaded["summary"]["sink"]["upserted"] == loaded["summary"]["sink"]["store_count"] == 120
    statuses = [status for path, _, status in server.requests if path == "/vectors/upsert"]
    assert statuses[:3] == [429, 429, 429] and statuses.count(200) == 120 // 25 + 1
    assert_search_matches_brute_force(loaded["config"])


def test_rerun_is_idempotent_and_delete_removes(loaded: dict) -> None:
    assert_idempotent_and_delete(loaded["config"], 120)


def _big_output(loaded: dict, folder: Path, rows: int, nnz: int) -> Path:
    """An encoded output whose vectors are far too big for one 2 MB request."""
    source = next((Path(loaded["config"].output.path) / "data").glob("*.parquet"))
    fingerprint = pq.read_schema(source).metadata[FINGERPRINT_KEY]
    rng = np.random.default_rng(0)
    indices = np.concatenate([np.sort(rng.choice(30522, nnz, replace=False)) for _ in range(rows)]).astype(np.int32)
    offsets = np.arange(rows + 1, dtype=np.int32) * nnz
    table = pa.table(
        {
            "id": [f"big-{i}" for i in range(rows)],
            "sparse": sparse_array(offsets, indices, rng.random(rows * nnz, dtype=np.float32) + 0.1),
        }
    )
    (folder / "data").mkdir(parents=True)
    pq.write_table(
        table.replace_schema_metadata({FINGERPRINT_KEY: fingerprint}), folder / "data" / "part-000000-000000.parquet"
    )
    commit_files(folder, {"data/part-000000-000000.parquet": table}, json.loads(fingerprint))
    return folder


def test_requests_cut_to_pinecone_limits(loaded: dict, server: PineconeProtocolServer, tmp_path: Path) -> None:
    out = _big_output(loaded, tmp_path / "big", rows=150, nnz=2000)
    sink = loaded["config"].sink.model_copy(update={"namespace": "big", "batch_size": 5000, "max_request_bytes": 10**9})
    before = len(server.requests)
    result = upsert_output(loaded["config"].model_copy(update={"sink": sink}), str(out))
    assert result["upserted"] == result["store_count"] == 150
    upserts = [(size, status) for path, size, status in server.requests[before:] if path == "/vectors/upsert"]
    assert len(upserts) >= 5 and all(status == 200 and size <= 2 * 1024 * 1024 for size, status in upserts)


def test_oversized_request_fails_clearly_without_retry(
    loaded: dict, server: PineconeProtocolServer, tmp_path: Path
) -> None:
    out = _big_output(loaded, tmp_path / "big413", rows=4, nnz=2000)
    server.max_body = 50_000  # an index host with a lower limit than Pinecone documents
    try:
        sink = loaded["config"].sink.model_copy(update={"namespace": "small", "retry_deadline_s": 30})
        before = len(server.requests)
        with pytest.raises(
            SinkError, match=r"pinecone http://127\.0\.0\.1:\d+ namespace 'small': upserting 4 vectors .*413"
        ):
            upsert_output(loaded["config"].model_copy(update={"sink": sink}), str(out))
        assert [s for p, _, s in server.requests[before:] if p == "/vectors/upsert"] == [413]  # not retried
    finally:
        server.max_body = 2 * 1024 * 1024


def test_top_k_cap_enforced_before_encoding(
    splade_tiny: Path, server: PineconeProtocolServer, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    code = main(
        [
            "encode",
            "--output",
            str(tmp_path / "out"),
            "--model",
            str(splade_tiny),
            "--sink-type",
            "pinecone",
            "--sink-url",
            server.url,
        ]
    )
    assert code == 2
    assert "Pinecone takes at most 2048 non-zeros per vector, but encoder.top_k is None" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_ids_fit_pinecone() -> None:
    assert point_id("doc-1") == "doc-1"
    long_id, unicode_id = "x" * 600, "café-1"
    assert point_id(long_id).startswith("sha256-") and len(point_id(long_id)) <= 512
    assert point_id(unicode_id).isascii() and point_id(unicode_id) == point_id(unicode_id)
    # One-to-one: an id that looks hashed is hashed itself, so it cannot meet another id's hash.
    spelled = point_id(long_id)
    assert point_id(spelled) != spelled and point_id(spelled).startswith("sha256-")


def test_missing_api_key(server: PineconeProtocolServer, monkeypatch: pytest.MonkeyPatch) -> None:
    from pipeline.sinks import open_sink

    monkeypatch.delenv("PINECONE_API_KEY", raising=False)
    cfg = load_config(None, {"sink.type": "pinecone", "sink.url": server.url}).sink
    with pytest.raises(SinkError, match="no API key; set the PINECONE_API_KEY environment variable"):
        open_sink(cfg, 30522)


def test_hostile_ids_are_data_and_ids_map_one_to_one(
    server: PineconeProtocolServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A real id "sha256-<hex>" and the long id whose hash it spells stay two vectors."""
    monkeypatch.setenv("PINECONE_API_KEY", PINECONE_TEST_KEY)
    sink = load_config(None, {"sink.type": "pinecone", "sink.url": server.url, "sink.namespace": "hostile"}).sink
    assert_hostile_ids_round_trip(sink)


def test_search_in_a_fresh_process(loaded: dict, tmp_path: Path) -> None:
    assert_search_in_a_fresh_process(loaded["config"], tmp_path, {"namespace": "fresh"})
