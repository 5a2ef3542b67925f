"""Incremental reindexing on a real local Ray cluster, S3 through moto's server and PostgreSQL + pgvector.

The store and the committed Parquet output are compared, document by document, with vectors
encoded afresh from the corpus as it is now.
"""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path
from typing import Any

import numpy as np
import psycopg
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import s3fs
from support.jobs import cli, corpus_rows
from support.reference import densify

from pipeline import SpladeEncoder
from pipeline.config import JobConfig, load_config
from pipeline.job.encode import run_job
from pipeline.job.faults import VARIABLE
from pipeline.job.reindex import MassDeleteError, run_reindex
from pipeline.output.commits import committed_files, latest_commit
from pipeline.output.location import OutputLocation
from pipeline.output.lock import LockedError, RunLock

VOCAB = 30522
SHARDS = 4


@pytest.fixture(scope="module", autouse=True)
def bucket(s3_endpoint: str) -> None:
    fs = s3fs.S3FileSystem()
    if not fs.exists("reindex"):
        fs.mkdir("reindex")


@pytest.fixture(scope="module")
def encoder(splade_tiny: Path) -> SpladeEncoder:
    return SpladeEncoder(str(splade_tiny), device="cpu", max_length=64)


def base_docs(n: int = 200) -> dict[str, str]:
    return {r["id"]: f"{r['title']} {r['text']}" for r in corpus_rows(n)}


def evolve(docs: dict[str, str]) -> tuple[dict[str, str], dict[str, list[str]]]:
    """Change 10% of the texts, delete 5%, add 5% (the issue's scenario)."""
    ids = sorted(docs)
    changed, deleted = ids[3::10], ids[7::20]
    out = {i: t for i, t in docs.items() if i not in deleted}
    for i in changed:
        out[i] = docs[i] + " Revised with new facts about tides and honey."
    added = [f"new{k:03d}" for k in range(len(docs) // 20)]
    for k, i in enumerate(added):
        out[i] = f"A new document number {k} about coffee, batteries and the Roman empire."
    return out, {"changed": changed, "deleted": deleted, "added": added}


def write_corpus(prefix: str, docs: dict[str, str]) -> None:
    """Documents in SHARDS JSONL files by id order (old ids keep their file), new ids in their own file."""
    fs = s3fs.S3FileSystem()
    if fs.exists(prefix):
        fs.rm(prefix, recursive=True)
    old = sorted(i for i in docs if i.startswith("d"))
    groups = {f"part-{s}.jsonl": [i for i in old if int(i[1:]) % SHARDS == s] for s in range(SHARDS)}
    groups["part-new.jsonl"] = sorted(i for i in docs if not i.startswith("d"))
    for name, ids in groups.items():
        if ids:
            fs.pipe(f"{prefix}/{name}", "\n".join(json.dumps({"id": i, "text": docs[i]}) for i in ids).encode())
    fs.invalidate_cache()


def make_config(splade_tiny: Path, postgres: Any, name: str, **extra: Any) -> JobConfig:
    return load_config(
        None,
        {
            "input.paths": [f"s3://reindex/{name}/corpus/"],
            "output.path": f"s3://reindex/{name}/out",
            "encoder.model": str(splade_tiny),
            "encoder.max_length": 64,
            "input.rows_per_block": 25,
            "output.commit_interval_s": 0,
            "sink.type": "pgvector",
            "sink.dsn": postgres.dsn,
            "sink.collection": name,
            "sink.batch_size": 50,
            **extra,
        },
    )


def store_vectors(postgres: Any, table: str) -> dict[str, np.ndarray]:
    with psycopg.connect(postgres.dsn) as conn:
        rows = conn.execute(f"SELECT id, embedding::text FROM {table}").fetchall()
    out = {}
    for doc_id, text in rows:
        terms, dim = text.rsplit("/", 1)
        dense = np.zeros(int(dim), np.float32)
        for term in filter(None, terms.strip("{}").split(",")):
            index, value = term.split(":")
            dense[int(index) - 1] = float(value)
        out[doc_id] = dense
    return out


def assert_current(config: JobConfig, postgres: Any, docs: dict[str, str], encoder: SpladeEncoder) -> None:
    """Store and committed output hold exactly the corpus now, each document once, with its current vector."""
    ids = sorted(docs)
    want = dict(zip(ids, densify(encoder.encode([docs[i] for i in ids]), VOCAB)))
    stored = store_vectors(postgres, config.sink.collection)
    assert sorted(stored) == ids
    assert max(np.abs(stored[i] - want[i]).max() for i in ids) <= 1e-5
    fs = s3fs.S3FileSystem()
    data = pa.concat_tables([pq.read_table(fs.open(f, "rb")) for f in committed_files(config.output.path)])
    assert sorted(data["id"].to_pylist()) == ids  # exactly once
    got = densify(data["sparse"].combine_chunks(), VOCAB)
    assert max(np.abs(got[k] - want[i]).max() for k, i in enumerate(data["id"].to_pylist())) <= 1e-5
    root = config.output.path.removeprefix("s3://")
    fs.invalidate_cache()
    assert {f"s3://{p}" for p in fs.find(f"{root}/data")} == set(committed_files(config.output.path))


def test_reindex_encodes_only_new_and_changed(
    ray_cluster: str, splade_tiny: Path, postgres: Any, encoder: SpladeEncoder
) -> None:
    docs = base_docs()
    write_corpus("reindex/main/corpus", docs)
    config = make_config(splade_tiny, postgres, "main")
    run_job(config)  # the initial run: the encoding job, loading the store
    assert_current(config, postgres, docs, encoder)

    now, what = evolve(docs)
    write_corpus("reindex/main/corpus", now)
    plan = run_reindex(config, dry_run=True)
    assert (len(what["added"]), len(what["changed"]), len(what["deleted"])) == (10, 20, 10)
    assert (plan["new"], plan["changed"], plan["deleted"], plan["unchanged"]) == (10, 20, 10, 170) and not plan["full"]
    assert len(store_vectors(postgres, "main")) == 200 and latest_commit(_output(config)).generation == 1  # untouched

    summary = run_reindex(config)
    counts = summary["reindex"]
    assert (counts["new"], counts["changed"], counts["deleted"], counts["unchanged"]) == (10, 20, 10, 170)
    assert counts["encoded_now"] == 30  # rows the encoders actually processed
    assert (
        summary["sink"]["upserted"] == 30 and summary["sink"]["deleted"] == 10 and summary["sink"]["store_count"] == 200
    )
    assert summary["rows_read"] == summary["rows_written"] + summary["rows_rejected"] == 200
    assert_current(config, postgres, now, encoder)

    again = run_reindex(config)
    assert again["reindex"]["encoded_now"] == 0 and again["reindex"]["unchanged"] == 200
    assert "sink" not in again and again["generation"] == summary["generation"] == 2  # nothing sent, nothing committed
    assert_current(config, postgres, now, encoder)
    # The output now belongs to reindex: a plain encode run refuses instead of re-encoding it all.
    refused = cli(
        "encode",
        "--input",
        "s3://reindex/main/corpus/",
        "--output",
        "s3://reindex/main/out",
        "--model",
        str(splade_tiny),
        "--max-length",
        "64",
        "--rows-per-block",
        "25",
    )
    assert refused.returncode == 2 and "maintained by `splade-pipeline reindex`" in refused.stderr


def _output(config: JobConfig) -> OutputLocation:
    return OutputLocation(config.output.path)


@pytest.mark.parametrize("point", ["written:2", "delete"])  # mid-encoding; after the store changed, before the commit
def test_killed_reindex_then_next_completes(
    ray_cluster: str, splade_tiny: Path, postgres: Any, encoder: SpladeEncoder, point: str
) -> None:
    name = f"kill_{point.split(':')[0]}"
    docs = base_docs(120)
    write_corpus(f"reindex/{name}/corpus", docs)
    config = make_config(splade_tiny, postgres, name)
    first = run_reindex(config)  # a first reindex on an empty output: everything is new
    assert first["reindex"]["full"] and first["reindex"]["new"] == 120
    now, _ = evolve(docs)
    write_corpus(f"reindex/{name}/corpus", now)
    args = [
        "reindex",
        "--input",
        f"s3://reindex/{name}/corpus/",
        "--output",
        f"s3://reindex/{name}/out",
        "--model",
        str(splade_tiny),
        "--max-length",
        "64",
        "--rows-per-block",
        "5",
        "--commit-interval-s",
        "0",
        "--sink-type",
        "pgvector",
        "--sink-dsn",
        postgres.dsn,
        "--sink-collection",
        name,
        "--sink-batch-size",
        "50",
    ]
    killed = cli(*args, env=os.environ | {VARIABLE: point})
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    out = _output(config)
    assert latest_commit(out).generation == 1  # killed before its commit: the previous state stays valid

    done = cli(*args)
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads(out.read_bytes("_SUMMARY.json"))
    assert summary["reindex"]["new"] + summary["reindex"]["changed"] == 18
    # Blocks the killed attempt finished are reused, not encoded again.
    assert summary["rows_reused"] > 0 and summary["reindex"]["encoded_now"] == 18 - summary["rows_reused"]
    assert_current(config, postgres, now, encoder)


def test_guards_lock_dry_run_and_full_reencode(
    ray_cluster: str, splade_tiny: Path, postgres: Any, encoder: SpladeEncoder
) -> None:
    docs = base_docs(60)
    write_corpus("reindex/guard/corpus", docs)
    config = make_config(splade_tiny, postgres, "guard")
    run_reindex(config)
    out = _output(config)

    # Half the corpus gone (say, a wrong input path): refused before anything changes.
    half = {i: t for i, t in docs.items() if int(i[1:]) % 2 == 0}
    write_corpus("reindex/guard/corpus", half)
    with pytest.raises(
        MassDeleteError, match=r"would delete 30 of 60 indexed documents \(50.0%\).*--allow-mass-delete"
    ):
        run_reindex(config)
    assert len(store_vectors(postgres, "guard")) == 60 and latest_commit(out).generation == 1
    proc = cli(
        "reindex",
        "--input",
        "s3://reindex/guard/corpus/",
        "--output",
        "s3://reindex/guard/out",
        "--model",
        str(splade_tiny),
        "--max-length",
        "64",
        "--rows-per-block",
        "25",
        "--sink-type",
        "pgvector",
        "--sink-dsn",
        postgres.dsn,
        "--sink-collection",
        "guard",
        "--reindex-max-delete-percent",
        "60",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]  # a higher limit lets it through
    assert_current(config, postgres, half, encoder)

    # Another run holds the output: refused, nothing touched.
    with RunLock(out, "reindex", ttl_s=60), pytest.raises(LockedError, match="another reindex holds this output"):
        run_reindex(config)

    # A setting that changes the vectors: everything re-encoded, and said so.
    changed = make_config(splade_tiny, postgres, "guard", **{"encoder.top_k": 40})
    summary = run_reindex(changed)
    assert summary["reindex"]["full"] and "encoder top_k: None -> 40" in summary["reindex"]["reason"]
    assert summary["reindex"]["encoded_now"] == 30
    stored = store_vectors(postgres, "guard")
    assert sorted(stored) == sorted(half) and max(int((v > 0).sum()) for v in stored.values()) <= 40
