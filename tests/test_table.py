"""The Delta table's commits and the store's record, on local disk with the real delta-rs and an
embedded Qdrant store (no Ray): races, lost answers, vacuum meanwhile, and a store load that failed
half-way."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from support.jobs import read_delta
from support.tables import commit_files

from pipeline.config import load_config
from pipeline.encode.fingerprint import Fingerprint
from pipeline.encode.sparse import sparse_array
from pipeline.output.layout import delta_stats
from pipeline.output.location import OutputError, OutputLocation
from pipeline.output.table import ConcurrentCommitError, DeltaOutput, FileAdd, Snapshot
from pipeline.sinks import SinkError

FINGERPRINT = Fingerprint("m", None, "w" * 64, "t" * 64, 30522, 64, None, 0.0, "float32", "0").to_dict()
VACUUM_ALL = 0.0


def rows(ids: list[str], text: str = "") -> pa.Table:
    """Documents with distinct one-term vectors; ``content_hash`` follows ``text`` (what reindex compares)."""
    n = len(ids)
    offsets = pa.array(range(n + 1), pa.int32()).to_numpy()
    indices = pa.array([100 + int(i.lstrip("d")) for i in ids], pa.int32()).to_numpy()
    values = pa.array([1.0 + len(text)] * n, pa.float32()).to_numpy()
    return pa.table(
        {
            "id": pa.array(ids, pa.string()),
            "content_hash": pa.array([hash((i, text)) & 0xFFFF for i in ids], pa.int64()),
            "sparse": sparse_array(offsets, indices, values),
            "num_tokens": pa.array([3] * n, pa.int32()),
            "truncated": pa.array([False] * n),
        }
    )


def write(folder: Path, name: str, table: pa.Table) -> FileAdd:
    (folder / "data").mkdir(parents=True, exist_ok=True)
    pq.write_table(table, folder / name)
    return FileAdd(name, (folder / name).stat().st_size, delta_stats(table))


def table_of(folder: Path) -> tuple[DeltaOutput, Snapshot]:
    out = DeltaOutput(OutputLocation(str(folder)))
    snap = out.snapshot()
    assert snap is not None
    return out, snap


def test_two_commits_on_one_version_one_lands(tmp_path: Path) -> None:
    """Two runs that read version 0 both commit: the second fails (with delta-rs's default of
    rebasing, both would land and every row of the two would be in the table)."""
    commit_files(tmp_path, {"data/a.parquet": _written(tmp_path, "data/a.parquet", ["d1"])}, FINGERPRINT)
    out, base = table_of(tmp_path)
    first = write(tmp_path, "data/b.parquet", rows(["d2"]))
    second = write(tmp_path, "data/c.parquet", rows(["d2"]))
    assert out.commit(base, [first], [], rows(["d2"]).schema, {"kind": "encode"}, "run-one") == 1
    with pytest.raises(ConcurrentCommitError, match="another run \\(encode\\) committed version 1"):
        out.commit(base, [second], [], rows(["d2"]).schema, {"kind": "encode"}, "run-two")
    assert sorted(read_delta(str(tmp_path))["id"].to_pylist()) == ["d1", "d2"]  # d2 once
    assert (tmp_path / "data" / "c.parquet").exists()  # the loser deleted nothing


class AnswerLost(DeltaOutput):
    """A table whose commit lands and whose answer is then lost (a connection reset after the PUT)."""

    def _commit_once(self, *args: object) -> None:
        super()._commit_once(*args)  # type: ignore[arg-type]
        raise ConnectionResetError("connection reset by peer")


def test_a_commit_whose_answer_was_lost_is_not_applied_twice(tmp_path: Path) -> None:
    commit_files(tmp_path, {"data/a.parquet": _written(tmp_path, "data/a.parquet", ["d1"])}, FINGERPRINT)
    _, base = table_of(tmp_path)
    added = write(tmp_path, "data/b.parquet", rows(["d2"]))
    lost = AnswerLost(OutputLocation(str(tmp_path)))
    assert lost.commit(base, [added], [], rows(["d2"]).schema, {"kind": "encode"}, "run-x") == 1
    _, now = table_of(tmp_path)
    assert now.version == 1 and sorted(read_delta(str(tmp_path))["id"].to_pylist()) == ["d1", "d2"]


def test_a_vacuum_meanwhile_does_not_fail_a_run_unless_it_deleted_its_files(tmp_path: Path) -> None:
    commit_files(tmp_path, {"data/a.parquet": _written(tmp_path, "data/a.parquet", ["d1"])}, FINGERPRINT)
    out, base = table_of(tmp_path)
    added = write(tmp_path, "data/b.parquet", rows(["d2"]))
    for name in ("data/old-1.parquet", "data/old-2.parquet"):  # never committed, two days old: vacuum deletes
        (tmp_path / name).write_bytes(b"a killed run's file")
        os.utime(tmp_path / name, (time.time() - 2 * 86400,) * 2)
        out.vacuum(24, dry_run=False)  # each one a VACUUM START and a VACUUM END version
    version = out.commit(base, [added], [], rows(["d2"]).schema, {"kind": "encode"}, "run-y")
    _, now = table_of(tmp_path)
    assert version == now.version > 1 and sorted(read_delta(str(tmp_path))["id"].to_pylist()) == ["d1", "d2"]
    assert now.record is not None and now.record["kind"] == "encode"  # found past the vacuum's commits

    base = now
    late = write(tmp_path, "data/c.parquet", rows(["d3"]))
    out.vacuum(VACUUM_ALL, dry_run=False)  # a retention shorter than the run: its new file is gone
    assert not (tmp_path / "data" / "c.parquet").exists()
    with pytest.raises(OutputError, match="a vacuum deleted 1 files this run wrote"):
        out.commit(base, [late], [], rows(["d3"]).schema, {"kind": "encode"}, "run-z")
    assert sorted(read_delta(str(tmp_path))["id"].to_pylist()) == ["d1", "d2"]


def test_a_store_load_that_failed_half_way_is_redone_in_full(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Version 1 drops d3; the load toward it deletes d3 from the store and then fails (the store
    goes away). Version 2 brings d3 back with the same text: the next load must send it, although
    versions 0 and 2 hold the same d3."""
    from pipeline.job import load

    folder, store = tmp_path / "out", tmp_path / "qdrant"
    commit_files(folder, {"data/a.parquet": _written(folder, "data/a.parquet", ["d1", "d2", "d3"])}, FINGERPRINT)
    config = load_config(None, {"output.path": str(folder), "sink.type": "qdrant", "sink.path": str(store)})
    assert load.sync_store(config, OutputLocation(str(folder)))["store_count"] == 3

    out, base = table_of(folder)
    kept = write(folder, "data/b.parquet", pa.concat_tables([rows(["d1"]), rows(["d2"], "edited")]))
    out.commit(base, [kept], ["data/a.parquet"], rows(["d1"]).schema, base.record or {}, "drop-d3")

    def store_down(*args: object, **kwargs: object) -> None:
        raise SinkError("qdrant: the store went away")

    with monkeypatch.context() as patch:
        patch.setattr(load, "upsert_files", store_down)
        with pytest.raises(SinkError):
            load.sync_store(config, OutputLocation(str(folder)))
    assert _stored(store) == {"d1", "d2"}  # d3 deleted, the load not finished

    out, base = table_of(folder)
    back = write(folder, "data/c.parquet", rows(["d3"]))
    out.commit(base, [back], [], rows(["d3"]).schema, base.record or {}, "bring-d3-back")
    synced = load.sync_store(config, OutputLocation(str(folder)))
    assert _stored(store) == {"d1", "d2", "d3"} and synced["store_count"] == 3
    assert synced["table_version"] == 2


def _written(folder: Path, name: str, ids: list[str]) -> pa.Table:
    table = rows(ids)
    (folder / "data").mkdir(parents=True, exist_ok=True)
    pq.write_table(table, folder / name)
    return table


def _stored(path: Path) -> set[str]:
    from qdrant_client import QdrantClient

    client = QdrantClient(path=str(path))
    try:
        points, _ = client.scroll("splade", limit=100, with_payload=True)
    finally:
        client.close()
    return {p.payload["doc_id"] for p in points}
