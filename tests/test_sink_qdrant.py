"""Qdrant (embedded local mode, the real qdrant-client engine): job -> store -> search equals brute force."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads
import pytest
from reference import densify
from test_job import corpus_rows

from pipeline.cli import main
from pipeline.config import load_config
from pipeline.demo import load_sample_corpus
from pipeline.run import run_job
from pipeline.search import search
from pipeline.sinks import SinkError, is_transient, open_sink, request_batches, with_retries
from pipeline.upsert import upsert_output

VOCAB = 30522
QUERIES = [r["title"].lower() for r in load_sample_corpus()[:14]] + [
    "moon gravity and water", "how bees make honey", "electric battery cars", "ancient rome emperors",
    "coffee beans pressure", "plants sunlight oxygen",
]  # fmt: skip


@pytest.fixture(scope="module")
def loaded(ray_cluster: str, splade_tiny: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("qdrant-job")
    src = root / "corpus.jsonl"
    src.write_text("\n".join(json.dumps(r) for r in corpus_rows(120)))
    overrides = {
        "input.paths": [str(src)], "input.title_column": "title", "output.path": str(root / "out"),
        "encoder.model": str(splade_tiny), "sink.type": "qdrant", "sink.path": str(root / "qdrant"), "sink.batch_size": 50,
    }  # fmt: skip
    config = load_config(None, overrides)
    summary = run_job(config)
    return {"config": config, "summary": summary, "root": root}


def brute_force(config, k: int = 10) -> list[list[tuple[str, float]]]:
    from pipeline.encoder import SpladeEncoder

    table = pads.dataset(f"{config.output.path}/data", format="parquet").to_table()
    docs = densify(table["sparse"].combine_chunks(), VOCAB)
    queries = densify(SpladeEncoder(config.encoder.model, device="cpu").encode(QUERIES), VOCAB)
    ids = table["id"].to_pylist()
    out = []
    for scores in queries @ docs.T:
        best = np.argsort(-scores, kind="stable")[:k]
        out.append([(ids[i], float(scores[i])) for i in best if scores[i] > 0])
    return out


def test_job_loads_store_and_search_matches_brute_force(loaded: dict) -> None:
    config, summary = loaded["config"], loaded["summary"]
    assert summary["sink"]["upserted"] == summary["rows_written"] == 120
    assert summary["sink"]["store_count"] == 120
    got = search(config, QUERIES, 10)
    want = brute_force(config)
    assert len(got) == 20
    for g, w in zip(got, want):
        assert [i for i, _ in g] == [i for i, _ in w]
        np.testing.assert_allclose([s for _, s in g], [s for _, s in w], rtol=0, atol=1e-4)


def test_rerun_is_idempotent_and_delete_removes(loaded: dict, capsys: pytest.CaptureFixture) -> None:
    config = loaded["config"]
    result = upsert_output(config)
    assert result["upserted"] == 120 and result["store_count"] == 120  # same ids: overwritten, not added
    first_hit = search(config, QUERIES[:1], 10)[0][0][0]
    store = open_sink(config.sink)
    try:
        store.delete([first_hit])
        assert store.count() == 119
    finally:
        store.close()
    assert first_hit not in [i for i, _ in search(config, QUERIES[:1], 10)[0]]
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
    store = open_sink(other)
    try:
        with pytest.raises(SinkError, match="without a sparse vector named 'other' \\(it has \\['sparse'\\]\\)"):
            store.ensure()
        assert store.count() == 120  # nothing was dropped or recreated
    finally:
        store.close()
    idf = config.sink.model_copy(update={"idf_modifier": True})
    store = open_sink(idf)
    try:
        with pytest.raises(SinkError, match="exists with idf_modifier=False"):
            store.ensure()
    finally:
        store.close()


def test_missing_collection_without_create(tmp_path: Path) -> None:
    cfg = load_config(None, {"sink.type": "qdrant", "sink.path": str(tmp_path), "sink.create_if_missing": False}).sink
    store = open_sink(cfg)
    try:
        with pytest.raises(SinkError, match="collection does not exist and sink.create_if_missing is false"):
            store.ensure()
    finally:
        store.close()


def test_local_mode_allows_one_writer(tmp_path: Path) -> None:
    from pipeline.upsert import check_sink

    with pytest.raises(ValueError, match="Qdrant local mode allows one writer"):
        check_sink(load_config(None, {"sink.type": "qdrant", "sink.path": str(tmp_path), "sink.writers": 2}))


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


def test_request_batches_respect_count_and_bytes() -> None:
    from pipeline.schema import sparse_array

    nnz = np.array([10, 1000, 5, 5, 5, 2000], dtype=np.int32)
    offsets = np.concatenate([[0], np.cumsum(nnz)]).astype(np.int32)
    sparse = sparse_array(offsets, np.zeros(offsets[-1], np.int32), np.ones(offsets[-1], np.float32))
    rows = pa.table({"id": [f"d{i}" for i in range(6)], "sparse": sparse})
    sizes = [b.num_rows for b in request_batches(rows, max_count=3, max_bytes=20_000)]
    assert sizes == [1, 1, 3, 1]  # 10 + 1000 terms overflow 20 kB; a too-large single vector still goes alone
    assert [b.num_rows for b in request_batches(rows, max_count=2, max_bytes=10**9)] == [2, 2, 2]
