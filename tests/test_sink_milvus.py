"""Milvus Lite (pymilvus + milvus-lite, the real engine in a local file): job -> store -> search equals brute force."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from support.sink_checks import (
    assert_ensure_refused,
    assert_hostile_ids_round_trip,
    assert_idempotent_and_delete,
    assert_search_in_a_fresh_process,
    assert_search_matches_brute_force,
    run_into_store,
)

from pipeline.config import load_config
from pipeline.encode.fingerprint import Fingerprint
from pipeline.encode.sparse import SPARSE_TYPE
from pipeline.job.load import upsert_files
from pipeline.output.layout import FINGERPRINT_KEY
from pipeline.output.location import OutputLocation


@pytest.fixture(scope="module")
def loaded(ray_cluster: str, splade_tiny: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("milvus-job")
    config, summary = run_into_store(
        root, splade_tiny, {"type": "milvus", "path": str(root / "milvus.db"), "batch_size": 50}
    )
    return {"config": config, "summary": summary, "root": root}


def test_job_loads_store_and_search_matches_brute_force(loaded: dict) -> None:
    assert loaded["summary"]["sink"]["upserted"] == loaded["summary"]["sink"]["store_count"] == 120
    assert_search_matches_brute_force(loaded["config"])


def test_rerun_is_idempotent_and_delete_removes(loaded: dict) -> None:
    assert_idempotent_and_delete(loaded["config"], 120)


def test_empty_vector_is_a_counted_reject(loaded: dict, tmp_path: Path) -> None:
    """Milvus refuses empty sparse vectors: such a row is counted, not sent, and the rest loads."""
    config = loaded["config"]
    source = next((Path(config.output.path) / "data").glob("*.parquet"))
    table = pq.read_table(source).select(["id", "sparse"])
    empty = pa.table({"id": ["empty-doc"], "sparse": pa.array([{"indices": [], "values": []}], SPARSE_TYPE)})
    combined = pa.concat_tables([table.slice(0, 5), empty])
    pq.write_table(combined, tmp_path / "with-empty.parquet")
    sink = config.sink.model_copy(update={"collection": "with_empty"})
    fingerprint = Fingerprint.from_dict(json.loads(table.schema.metadata[FINGERPRINT_KEY]))
    result = upsert_files(
        config.model_copy(update={"sink": sink}), OutputLocation(str(tmp_path)), ["with-empty.parquet"], fingerprint
    )
    assert result["upserted"] == 5 and result["rejected_empty_vectors"] == 1 and result["store_count"] == 5


def test_incompatible_collection_is_an_error_not_a_drop(loaded: dict) -> None:
    other = loaded["config"].sink.model_copy(update={"vector_name": "other_vector"})
    assert (
        assert_ensure_refused(other, "needs primary key 'id' and a SPARSE_FLOAT_VECTOR 'other_vector'") >= 119
    )  # untouched


def test_missing_collection_without_create(tmp_path: Path) -> None:
    cfg = load_config(
        None, {"sink.type": "milvus", "sink.path": str(tmp_path / "m.db"), "sink.create_if_missing": False}
    ).sink
    assert_ensure_refused(cfg, "collection does not exist", count_after=False)


@pytest.mark.cluster
def test_hostile_ids_are_data_not_filter_syntax(tmp_path: Path) -> None:
    """Deleting "x'] or id not in ['" deletes that id only (pymilvus would paste it into the filter)."""
    sink = load_config(None, {"sink.type": "milvus", "sink.path": str(tmp_path / "m.db"), "sink.collection": "h"}).sink
    assert_hostile_ids_round_trip(sink)


def test_search_in_a_fresh_process(loaded: dict, tmp_path: Path) -> None:
    """A new process finds the collection 'released' by the one that loaded it: the store loads it."""
    assert_search_in_a_fresh_process(
        loaded["config"], tmp_path, {"path": str(tmp_path / "fresh.db"), "collection": "fresh"}
    )


def test_a_store_another_process_holds_is_an_error_not_a_traceback(loaded: dict, tmp_path: Path) -> None:
    """Milvus Lite's file belongs to one process: `search` from a second one while this test process
    holds it fails with the store named, exit 2."""
    import subprocess
    import sys

    import yaml

    from pipeline.sinks import open_sink

    config = loaded["config"]
    store = open_sink(config.sink, 30522)  # this process now holds the Lite file's lock
    try:
        store.count()
        config_file = tmp_path / "job.yaml"
        config_file.write_text(yaml.safe_dump(config.model_dump(mode="json")))
        proc = subprocess.run(
            [sys.executable, "-m", "pipeline.cli", "search", "--config", str(config_file), "tides"],
            capture_output=True,
            text=True,
            timeout=240,
        )
    finally:
        store.close()
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert "cannot open the Milvus Lite file: another process holds the lock" in proc.stderr
