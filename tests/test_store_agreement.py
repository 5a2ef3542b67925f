"""The store and the table agree (issue 14, A4-A6, B13, D19, F24): one rule for duplicate ids,
empty and rejected re-encodings, verify/repair and the count check every run makes, skipped
files on reindex, passthrough values in the reindex state, and starting (or not starting) Ray.

Real parts: the session's local Ray cluster, PostgreSQL + pgvector, Milvus Lite, local files.
"""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import psycopg
import pytest
from support.jobs import ROOT, cli, read_delta
from support.reference import densify

import pipeline.job.dedupe as dedupe
from pipeline import SpladeEncoder
from pipeline.config import JobConfig, load_config
from pipeline.job.encode import run_job
from pipeline.job.reindex import run_reindex
from pipeline.job.verify import repair_store, verify_store
from pipeline.sinks import open_sink

VOCAB = 30522


@pytest.fixture(scope="module")
def encoder(splade_tiny: Path) -> SpladeEncoder:
    return SpladeEncoder(str(splade_tiny), device="cpu", max_length=64)


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def config_for(root: Path, splade_tiny: Path, **extra: Any) -> JobConfig:
    return load_config(
        None,
        {
            "input.paths": [str(root / "corpus")],
            "output.path": str(root / "out"),
            "encoder.model": str(splade_tiny),
            "encoder.max_length": 64,
            "input.rows_per_block": 2,  # duplicates land in different blocks, pieces and files
            **extra,
        },
    )


def pg_sink(postgres: Any, table: str) -> dict[str, Any]:
    return {"sink.type": "pgvector", "sink.dsn": postgres.dsn, "sink.collection": table, "sink.batch_size": 4}


def table_vectors(url: str) -> dict[str, np.ndarray]:
    data = read_delta(url, columns=["id", "sparse"])
    ids = data["id"].to_pylist()
    assert len(ids) == len(set(ids)), "the table holds an id twice"
    return dict(zip(ids, densify(data["sparse"].combine_chunks(), VOCAB)))


def store_vectors(config: JobConfig) -> dict[str, np.ndarray]:
    store = open_sink(config.sink, VOCAB)
    try:
        ids = [i for page in store.ids() for i in page]
        fetched = store.fetch(ids) if ids else {}
    finally:
        store.close()
    out = {}
    for doc_id, (indices, values) in fetched.items():
        dense = np.zeros(VOCAB, np.float32)
        dense[indices] = values
        out[doc_id] = dense
    assert sorted(out) == sorted(ids)
    return out


def vector(encoder: SpladeEncoder, text: str) -> np.ndarray:
    return densify(encoder.encode([text]), VOCAB)[0]


def rejects_of(url: str) -> list[dict[str, Any]]:
    return read_delta(url + "/_rejects").to_pylist()


# ---- A5: one rule for duplicate ids ---------------------------------------------------------------

DUP_A = [
    {"id": "x", "text": "Tides are caused by the moon and the sun."},
    {"id": "y", "text": "Honey bees collect nectar from flowers in spring."},
    {"id": "x", "text": "A later x in the same file: rejected, never indexed."},
    {"id": "w", "text": "Roman roads were built with layers of stone and gravel."},
]
DUP_B = [
    {"id": "x", "text": "An x in a later file: rejected too."},
    {"id": "z", "text": "Batteries store chemical energy and release it as electricity."},
    {"id": "y", "text": "A later y: rejected."},
]
DUP_C = [  # two rows of one id in one block (rows_per_block 2): decided by the encoder, which knows the lines
    {"id": "v", "text": "Volcanoes form where magma reaches the surface."},
    {"id": "v", "text": "A second v, the next line of the same block: rejected."},
]


def write_dups(root: Path, a: list[dict[str, Any]] = DUP_A) -> None:
    write_jsonl(root / "corpus/a.jsonl", a)
    write_jsonl(root / "corpus/b.jsonl", DUP_B)
    write_jsonl(root / "corpus/c.jsonl", DUP_C)


def test_duplicate_ids_first_in_corpus_order_everywhere(
    tmp_path: Path, ray_cluster: str, splade_tiny: Path, postgres: Any, encoder: SpladeEncoder
) -> None:
    """Encode keeps the first row of an id (files in order, then lines) and rejects the later ones;
    the store gets exactly the table; a reindex of the same corpus finds nothing to do (it applies
    the same rule); when the first row goes away, the next one becomes the document everywhere."""
    write_dups(tmp_path)
    config = config_for(tmp_path, splade_tiny, **pg_sink(postgres, "dups"))
    summary = run_job(config)

    assert summary["rows_read"] == 9 and summary["rows_written"] == 5 and summary["rows_rejected"] == 4
    assert summary["duplicate_ids"] == summary["rejected_by_reason"]["duplicate_id"] == 4
    table = table_vectors(config.output.path)
    assert sorted(table) == ["v", "w", "x", "y", "z"]
    for doc in (DUP_A[0], DUP_A[1], DUP_A[3], DUP_B[1], DUP_C[0]):
        assert np.abs(table[doc["id"]] - vector(encoder, doc["text"])).max() <= 1e-5
    rejected = sorted((r["id"], r["source"].rsplit("/", 1)[-1], r["reason"]) for r in rejects_of(config.output.path))
    assert rejected == [
        ("v", "c.jsonl", "duplicate_id"),
        ("x", "a.jsonl", "duplicate_id"),
        ("x", "b.jsonl", "duplicate_id"),
        ("y", "b.jsonl", "duplicate_id"),
    ]
    details = {(r["id"], r["source"].rsplit("/", 1)[-1]): r["detail"] for r in rejects_of(config.output.path)}
    assert "c.jsonl line 1" in details[("v", "c.jsonl")] and "a.jsonl" in details[("x", "b.jsonl")]
    stored = store_vectors(config)
    assert sorted(stored) == sorted(table)
    assert max(np.abs(stored[i] - table[i]).max() for i in table) <= 1e-6
    assert summary["sink"]["count_error"] is None and summary["sink"]["expected_count"] == 5

    again = run_reindex(config)  # the same corpus under reindex's rule: nothing differs
    assert again["reindex"]["new"] == again["reindex"]["changed"] == again["reindex"]["deleted"] == 0
    assert again["reindex"]["encoded_now"] == 0

    write_dups(tmp_path, DUP_A[1:])  # the first x is gone: a.jsonl's later x is first now
    after = run_reindex(config)
    assert after["reindex"]["changed"] == 1 and after["reindex"]["deleted"] == 0
    table = table_vectors(config.output.path)
    assert np.abs(table["x"] - vector(encoder, DUP_A[2]["text"])).max() <= 1e-5
    assert np.abs(store_vectors(config)["x"] - table["x"]).max() <= 1e-6
    assert verify_store(config)["ok"]


def test_duplicates_on_the_cluster_path_and_after_the_input_changed(
    tmp_path: Path, ray_cluster: str, splade_tiny: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Over DRIVER_MAX_ROWS written rows, the ids are grouped by Ray: the same rows are kept. A
    re-run on a changed input applies the rule anew (a row dropped before may be the first now)."""
    write_dups(tmp_path)
    monkeypatch.setattr(dedupe, "DRIVER_MAX_ROWS", 0)
    config = config_for(tmp_path, splade_tiny)
    summary = run_job(config)
    assert summary["duplicate_ids"] == 4 and summary["rows_written"] == 5
    data = read_delta(config.output.path, columns=["id", "content_hash"]).sort_by("id")
    assert data["id"].to_pylist() == ["v", "w", "x", "y", "z"]
    from pipeline.sources import content_hash

    assert data["content_hash"][2].as_py() == content_hash(DUP_A[0]["text"])

    # Re-run after a.jsonl lost both its x rows: b.jsonl is unchanged and its blocks are reused,
    # but its x, dropped as a duplicate before, is the first x now and must come back.
    monkeypatch.setattr(dedupe, "DRIVER_MAX_ROWS", 5_000_000)
    write_dups(tmp_path, [DUP_A[1], DUP_A[3]])
    again = run_job(config)
    assert again["duplicate_ids"] == 2 and again["rows_written"] == 5  # b's later y, c's second v
    data = read_delta(config.output.path, columns=["id", "content_hash"]).sort_by("id")
    assert data["id"].to_pylist() == ["v", "w", "x", "y", "z"]
    assert data["content_hash"][2].as_py() == content_hash(DUP_B[0]["text"])


# ---- A6: a changed document whose new encoding is empty or rejected ---------------------------------


def test_an_empty_new_vector_takes_the_old_one_out_of_a_store_that_refuses_empty_vectors(
    tmp_path: Path, ray_cluster: str, splade_tiny: Path, encoder: SpladeEncoder
) -> None:
    """Milvus refuses empty vectors: a document whose new vector is empty (every weight under
    encoder.min_weight) is in the table with its empty vector and is deleted from the store, not
    left there with its old vector."""
    docs = [
        {"id": "t", "text": "Tides are caused by the moon."},
        {"id": "h", "text": "Honey bees collect nectar from flowers in spring."},
    ]
    write_jsonl(tmp_path / "corpus/a.jsonl", docs)
    sink = {"sink.type": "milvus", "sink.path": str(tmp_path / "milvus.db"), "sink.collection": "empties"}
    config = config_for(tmp_path, splade_tiny, **{"encoder.min_weight": 1.8, **sink})
    first = run_job(config)
    assert first["sink"]["store_count"] == 2 and first["sink"]["count_error"] is None
    assert sorted(store_vectors(config)) == ["h", "t"]

    write_jsonl(tmp_path / "corpus/a.jsonl", [{"id": "t", "text": "the"}, docs[1]])  # nothing above 1.8 in "the"
    summary = run_reindex(config)
    assert summary["reindex"]["changed"] == 1
    sparse = read_delta(config.output.path, columns=["id", "sparse"]).to_pylist()
    assert {r["id"]: len(r["sparse"]["indices"]) for r in sparse}["t"] == 0  # in the table, empty
    assert sorted(store_vectors(config)) == ["h"]  # and out of the store
    assert summary["sink"]["store_count"] == summary["sink"]["expected_count"] == 1
    assert summary["sink"]["count_error"] is None and "errors" not in summary
    report = verify_store(config)
    assert report["ok"] and report["expected"] == 1


@pytest.mark.slow  # two runs isolating a poisoned document (actor deaths): 140 s; CI has test_chaos's
def test_a_changed_document_the_encoder_rejects_leaves_table_and_store_alike(
    tmp_path: Path, ray_cluster: str, splade_tiny: Path, postgres: Any
) -> None:
    """A changed document whose new text kills the encoder is rejected (encoder_crash): the table
    drops it, and so does the store (no old vector left behind). Its later duplicate stays a
    duplicate, in reindex and in the encoding job alike (the first row is the document, even one
    the encoder rejects)."""
    docs = [{"id": f"p{i}", "text": f"Passage {i} about rivers, bridges and trains."} for i in range(4)]
    write_jsonl(tmp_path / "corpus/a.jsonl", docs)
    config = config_for(tmp_path, splade_tiny, **pg_sink(postgres, "poisoned"))
    run_job(config)
    assert sorted(store_vectors(config)) == ["p0", "p1", "p2", "p3"]

    poisoned = {"id": "p2", "text": "POISON-MARKER now kills its encoder"}
    later = {"id": "p2", "text": "A later p2 that would encode fine: a duplicate all the same."}
    write_jsonl(tmp_path / "corpus/a.jsonl", [*docs[:2], poisoned, docs[3], later])
    poison = os.environ | {"SPLADE_PIPELINE_POISON": "POISON-MARKER"}
    common = ["--input", str(tmp_path / "corpus"), "--model", str(splade_tiny), "--max-length", "64"]
    common += ["--rows-per-block", "2"]
    sink = ["--sink-type", "pgvector", "--sink-dsn", postgres.dsn, "--sink-batch-size", "4"]
    result = cli("reindex", *common, "--output", config.output.path, *sink, "--sink-collection", "poisoned", env=poison)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((tmp_path / "out/_SUMMARY.json").read_text())
    assert summary["rejected_by_reason"] == {"duplicate_id": 1, "encoder_crash": 1}
    assert sorted(table_vectors(config.output.path)) == ["p0", "p1", "p3"]
    assert sorted(store_vectors(config)) == ["p0", "p1", "p3"]
    assert summary["sink"]["count_error"] is None

    fresh = cli("encode", *common, "--output", str(tmp_path / "fresh"), env=poison)  # the same corpus, encoded anew
    assert fresh.returncode == 0, fresh.stderr[-3000:]
    encoded = json.loads((tmp_path / "fresh/_SUMMARY.json").read_text())
    assert encoded["rejected_by_reason"] == {"duplicate_id": 1, "encoder_crash": 1}
    assert sorted(table_vectors(str(tmp_path / "fresh"))) == ["p0", "p1", "p3"]
    detail = [r["detail"] for r in rejects_of(str(tmp_path / "fresh")) if r["reason"] == "duplicate_id"]
    assert "a.jsonl line 3" in detail[0]  # where the first p2 is, the one the encoder rejected


# ---- A4: verify, repair, and the count check of every run -------------------------------------------


def test_verify_finds_every_kind_of_drift_and_repair_ends_it(
    tmp_path: Path, ray_cluster: str, splade_tiny: Path, postgres: Any
) -> None:
    docs = [{"id": f"v{i:02d}", "text": f"Document {i} on volcanoes, glaciers and deserts."} for i in range(12)]
    write_jsonl(tmp_path / "corpus/a.jsonl", docs)
    config = config_for(tmp_path, splade_tiny, **pg_sink(postgres, "drift"))
    run_job(config)
    assert verify_store(config)["ok"]

    with psycopg.connect(postgres.dsn, autocommit=True) as conn:  # drift, as a crash or a hand edit leaves it
        conn.execute("DELETE FROM drift WHERE id IN ('v01', 'v02')")
        conn.execute("INSERT INTO drift (id, embedding) VALUES ('orphan', '{5:1.5}/30522')")
        conn.execute("UPDATE drift SET embedding = '{7:0.5}/30522' WHERE id = 'v03'")
    report = verify_store(config, sample=100)
    assert not report["ok"]
    assert (report["missing"], report["extra"], report["different"]) == (2, 1, 1)
    assert sorted(report["missing_ids"]) == ["v01", "v02"] and report["extra_ids"] == ["orphan"]
    assert report["different_ids"] == ["v03"] and report["store_count"] == 11 and report["expected"] == 12

    base = ["--output", config.output.path, "--sink-type", "pgvector", "--sink-dsn", postgres.dsn]
    base += ["--sink-collection", "drift"]
    shown = cli("verify", *base)
    assert shown.returncode == 1 and "DIFFERENT" in shown.stdout and "orphan" in shown.stdout, shown.stderr[-2000:]

    # every run with a sink checks the count: a reindex with nothing to do reports the drift as an error
    summary = run_reindex(config)
    assert summary["sink"]["count_error"] and "splade-pipeline repair" in summary["sink"]["count_error"]
    assert summary["errors"] and json.loads((tmp_path / "out/_SUMMARY.json").read_text())["errors"]

    # the table moves on without the store (a reindex with no sink), and the version the store was
    # loaded from is vacuumed away: repair needs only the store's own listing
    docs[5]["text"] += " Revised."
    write_jsonl(tmp_path / "corpus/a.jsonl", docs)
    no_sink = config.model_copy(update={"sink": config.sink.model_copy(update={"type": None})})
    assert run_reindex(no_sink)["reindex"]["changed"] == 1
    from pipeline.job.versions import vacuum

    gone = vacuum(config.model_copy(update={"output": config.output.model_copy(update={"retention_days": 0})}), False)
    assert gone["files"]["table"]  # the old version's files are deleted
    fixed = repair_store(config)
    assert fixed["deleted_extra"] == 1 and fixed["upserted"] == 12 and fixed["after"]["ok"], fixed
    assert fixed["before"]["different"] == 0  # sampled 0: repair does not compare before
    assert cli("verify", *base).returncode == 0
    assert "errors" not in run_reindex(config)

    with psycopg.connect(postgres.dsn, autocommit=True) as conn:  # the same collection under another writer
        conn.execute("INSERT INTO drift (id, embedding) VALUES ('someone-else', '{9:1.0}/30522')")
    assert verify_store(config)["extra_ids"] == ["someone-else"]


# ---- B13: a file that cannot be read on reindex keeps its indexed rows --------------------------------


def test_an_unreadable_file_keeps_its_documents_on_reindex(
    tmp_path: Path, ray_cluster: str, splade_tiny: Path, postgres: Any
) -> None:
    a = [{"id": f"a{i}", "text": f"Alpha passage {i} about maps."} for i in range(3)]
    b = [{"id": f"b{i}", "text": f"Beta passage {i} about clocks."} for i in range(4)]
    write_jsonl(tmp_path / "corpus/a.jsonl", a)
    compressed = tmp_path / "corpus/b.jsonl.gz"
    compressed.write_bytes(gzip.compress("".join(json.dumps(r) + "\n" for r in b).encode()))
    config = config_for(tmp_path, splade_tiny, **{"input.on_bad_file": "skip", **pg_sink(postgres, "skipped")})
    run_job(config)
    before = table_vectors(config.output.path)

    compressed.write_bytes(b"\x1f\x8b this is no longer gzip")  # the same file, unreadable now
    a2 = [*a, {"id": "b3", "text": "Beta passage 3 moved into a.jsonl with a new text."}]
    write_jsonl(tmp_path / "corpus/a.jsonl", a2)
    summary = run_reindex(config)

    counts = summary["reindex"]
    assert counts["deleted"] == 0 and counts["kept_unread"] == 3 and counts["changed"] == 1
    assert len(summary["skipped_files"]) == 1 and "b.jsonl.gz" in summary["skipped_files"][0]
    after = table_vectors(config.output.path)
    assert sorted(after) == sorted(before)
    for i in ("b0", "b1", "b2"):
        assert np.array_equal(after[i], before[i])  # kept as they were
    assert not np.array_equal(after["b3"], before["b3"])  # taken from where the corpus has it now
    assert sorted(store_vectors(config)) == sorted(before)
    assert summary["sink"]["deleted"] == 0


# ---- D19: passthrough values are part of a document's state -------------------------------------------


def test_a_changed_passthrough_value_is_refreshed_by_reindex(
    tmp_path: Path, ray_cluster: str, splade_tiny: Path
) -> None:
    rows = [
        {"id": f"u{i}", "text": f"Page {i} about lighthouses.", "url": f"https://example.org/{i}"} for i in range(4)
    ]
    write_jsonl(tmp_path / "corpus/a.jsonl", rows)
    config = config_for(tmp_path, splade_tiny, **{"input.passthrough_columns": ["url"]})
    run_job(config)
    rows[2]["url"] = "https://example.org/moved"
    write_jsonl(tmp_path / "corpus/a.jsonl", rows)
    summary = run_reindex(config)
    assert summary["reindex"]["changed"] == 1 and summary["reindex"]["unchanged"] == 3
    urls = dict(zip(*read_delta(config.output.path, columns=["id", "url"]).to_pydict().values()))
    assert urls == {r["id"]: r["url"] for r in rows}
    assert run_reindex(config)["reindex"]["changed"] == 0  # and then it is the state


# ---- F24: starting Ray, and not starting it where nothing needs it ------------------------------------


def _without_ray_address() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}


def test_a_local_ray_start_that_times_out_is_tried_again(tmp_path: Path) -> None:
    code = (
        "import ray\nfrom pipeline.config import ComputeConfig\nfrom pipeline.job.cluster import ensure_ray\n"
        "ensure_ray(ComputeConfig())\nprint('UP', ray.is_initialized())\nray.shutdown()\n"
    )
    env = _without_ray_address() | {"SPLADE_PIPELINE_RAY_START_FAILS": "1"}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert done.returncode == 0 and "UP True" in done.stdout, done.stderr[-3000:]
    assert "starting a local Ray timed out" in done.stderr and "trying again (2 of 3)" in done.stderr

    env["SPLADE_PIPELINE_RAY_START_FAILS"] = "3"
    (tmp_path / "c").mkdir()
    write_jsonl(tmp_path / "c/a.jsonl", [{"id": "1", "text": "one"}])
    failed = cli("encode", "--input", str(tmp_path / "c"), "--output", str(tmp_path / "o"), env=env)
    assert failed.returncode == 2, failed.stderr[-2000:]
    assert "could not start a local Ray in 3 tries" in failed.stderr and "Traceback" not in failed.stderr


def test_a_dry_run_reindex_of_a_small_corpus_starts_no_ray(tmp_path: Path, ray_cluster: str, splade_tiny: Path) -> None:
    write_jsonl(tmp_path / "corpus/a.jsonl", [{"id": f"r{i}", "text": f"Row {i} on kites."} for i in range(5)])
    config = config_for(tmp_path, splade_tiny)
    run_job(config)
    write_jsonl(tmp_path / "corpus/a.jsonl", [{"id": f"r{i}", "text": f"Row {i} on kites!"} for i in range(6)])
    code = (
        "import sys\nfrom pipeline.config import load_config\nfrom pipeline.job.reindex import run_reindex\n"
        f"cfg = load_config(None, {{'input.paths': [{str(tmp_path / 'corpus')!r}], "
        f"'output.path': {str(tmp_path / 'out')!r}, 'encoder.model': {str(splade_tiny)!r}, 'encoder.max_length': 64, "
        "'input.rows_per_block': 2})\n"
        "plan = run_reindex(cfg, dry_run=True)\n"
        "print('PLAN', plan['new'], plan['changed'])\n"
        "print('RAY', 'ray' in sys.modules and sys.modules['ray'].is_initialized())\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], env=_without_ray_address(), capture_output=True, text=True, timeout=300, cwd=ROOT
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "PLAN 1 5" in done.stdout and "RAY False" in done.stdout
