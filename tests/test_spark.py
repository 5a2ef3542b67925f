"""The job on Spark (local mode, a real JVM): the same output as the Ray job on the same corpus,
the same rejects and counts, task deaths and a killed driver that lose or double nothing, reindex,
a store load, ``encode_dataframe`` against the bare encoder, and ``spark-submit`` end to end.

Spark needs Java: `.ci/run` installs it and sets SPLADE_PIPELINE_REQUIRE_SPARK, so CI never skips these.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pytest
import s3fs
from support.jobs import ROOT, corpus_rows, put_corpus, read_delta
from support.reference import VOCAB, densify
from support.sink_checks import store_vectors

from pipeline import SpladeEncoder
from pipeline.config import JobConfig, load_config
from pipeline.job.encode import run_job

if os.environ.get("SPLADE_PIPELINE_REQUIRE_SPARK"):
    import pyspark  # noqa: F401 - CI: missing is a failure, not a skip
else:
    pytest.importorskip("pyspark")


@pytest.fixture(scope="module")
def spark(s3_endpoint: str) -> Iterator[Any]:
    """A local Spark session: 2 cores, a failed task tried up to 3 times; its Python workers run this
    interpreter and inherit the S3 endpoint's environment (started after it)."""
    if shutil.which("java") is None:
        if os.environ.get("SPLADE_PIPELINE_REQUIRE_SPARK"):
            pytest.fail("SPLADE_PIPELINE_REQUIRE_SPARK is set and there is no java: .ci/run installs it")
        pytest.skip("no Java runtime (apt-get install openjdk-17-jre-headless)")
    from pyspark.sql import SparkSession

    os.environ["PYSPARK_PYTHON"] = os.environ["PYSPARK_DRIVER_PYTHON"] = sys.executable
    session = (
        SparkSession.builder.master("local[2,3]")
        .appName("splade-pipeline-tests")
        .config("spark.ui.enabled", "false")
        .config("spark.sql.shuffle.partitions", "4")
        .getOrCreate()
    )
    yield session
    session.stop()


@pytest.fixture(scope="module", autouse=True)
def bucket(s3_endpoint: str) -> None:
    fs = s3fs.S3FileSystem()
    if not fs.exists("spark"):
        fs.mkdir("spark")


def _config(model: Path, name: str, **extra: Any) -> JobConfig:
    return load_config(
        None,
        {
            "input.paths": [f"s3://spark/{name}/corpus/"],
            "output.path": f"s3://spark/{name}/out",
            "encoder.model": str(model),
            "encoder.max_length": 64,
            "input.rows_per_block": 40,
            "input.passthrough_columns": ["lang"],
            **extra,
        },
    )


def _bad_rows(fs: s3fs.S3FileSystem, prefix: str) -> None:
    lines = [
        json.dumps({"id": "ok-1", "text": "a good one", "lang": "en"}),
        json.dumps({"id": "empty", "text": "   ", "lang": "en"}),
        json.dumps({"text": "no id at all"}),
        "{not json",
        json.dumps({"id": 1.5, "text": "a float id"}),
        json.dumps({"id": "d00003", "text": "a later row of an id in another file", "lang": "en"}),
    ]
    fs.pipe(f"{prefix}/part-z.jsonl", "\n".join(lines).encode())


def _by_id(url: str) -> dict[str, dict[str, Any]]:
    table = read_delta(url)
    dense = densify(table["sparse"].combine_chunks(), VOCAB)
    rows = table.drop_columns(["sparse"]).to_pylist()
    return {r["id"]: r | {"dense": dense[i]} for i, r in enumerate(rows)}


def _rejects(url: str) -> list[tuple]:
    rejects = read_delta(url + "/_rejects")
    return sorted(zip(*(rejects[c].to_pylist() for c in ("id", "source", "line", "reason")), strict=True), key=str)


def test_the_spark_job_writes_what_the_ray_job_writes(
    spark: Any, ray_cluster: str, splade_tiny: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from pipeline.job import dedupe
    from pipeline.spark import run_spark_job

    monkeypatch.setattr(dedupe, "DRIVER_MAX_ROWS", 0)  # duplicate ids grouped by each engine, not the driver

    fs = s3fs.S3FileSystem()
    rows = put_corpus(fs, "spark/same/corpus")
    _bad_rows(fs, "spark/same/corpus")
    fs.invalidate_cache()
    config = _config(splade_tiny, "same")
    ray_config = config.model_copy(update={"output": config.output.model_copy(update={"path": "s3://spark/same/ray"})})
    ray_summary = run_job(ray_config)
    summary = run_spark_job(config, spark)
    assert summary["engine"] == "spark" and ray_summary["engine"] == "ray"
    for key in ("rows_read", "rows_written", "rows_rejected", "rejected_by_reason", "duplicate_ids", "tokens"):
        assert summary[key] == ray_summary[key], key
    assert summary["rows_read"] == len(rows) + 6 == summary["rows_written"] + summary["rows_rejected"]
    assert summary["rows_written"] == len(rows) + 1
    ours, theirs = _by_id(config.output.path), _by_id(ray_config.output.path)
    assert sorted(ours) == sorted(theirs)
    for doc, row in ours.items():
        other = theirs[doc]
        assert np.abs(row["dense"] - other["dense"]).max() <= 1e-5, doc
        assert {k: row[k] for k in ("content_hash", "num_tokens", "truncated", "lang")} == {
            k: other[k] for k in ("content_hash", "num_tokens", "truncated", "lang")
        }
    assert _rejects(config.output.path) == _rejects(ray_config.output.path)
    assert {r[3] for r in _rejects(config.output.path)} >= {"empty_text", "missing_id", "malformed_json", "invalid_id"}


def test_tasks_that_die_leave_every_document_once_and_a_reindex_follows(
    spark: Any, splade_tiny: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from pipeline.job.faults import TASK_DIES
    from pipeline.spark import run_spark_job
    from pipeline.spark.job import run_spark_reindex

    fs = s3fs.S3FileSystem()
    rows = corpus_rows(240)
    for i in range(3):
        part = rows[i * 80 : (i + 1) * 80]
        fs.pipe(f"spark/dies/corpus/part-{i}.jsonl", "\n".join(json.dumps(r) for r in part).encode())
    fs.invalidate_cache()
    config = _config(splade_tiny, "dies")
    monkeypatch.setenv(TASK_DIES, "1")  # every task's first attempt dies after writing its first block
    summary = run_spark_job(config, spark)
    monkeypatch.delenv(TASK_DIES)
    table = read_delta(config.output.path)
    ids = table["id"].to_pylist()
    assert sorted(ids) == sorted(r["id"] for r in rows) and len(set(ids)) == len(ids)
    assert summary["rows_read"] == summary["rows_written"] == 240
    assert summary["faults"]["task_retries"] == 3, summary["faults"]  # each file's task, once
    files = {p.rsplit("/", 1)[1] for p in fs.ls("spark/dies/out/data")}
    committed = {p.rsplit("/", 1)[1] for p in read_delta_files(config.output.path)}
    assert len(files - committed) >= 3  # the dead attempts' first blocks: written, never committed
    want = densify(
        SpladeEncoder(str(splade_tiny), device="cpu", max_length=64).encode(
            [r["text"] for r in rows]  # no title_column: the text alone
        ),
        VOCAB,
    )
    got = densify(table["sparse"].combine_chunks(), VOCAB)
    order = {r["id"]: i for i, r in enumerate(rows)}
    assert np.abs(got - want[[order[i] for i in ids]]).max() <= 1e-5

    # reindex on Spark: one changed, one removed, one new
    now = rows[1:]
    now[0] = now[0] | {"text": now[0]["text"] + " Revised."}
    now.append({"id": "new-1", "title": "New", "text": "A new document about tides.", "lang": "en"})
    fs.rm("spark/dies/corpus", recursive=True)
    fs.pipe("spark/dies/corpus/part-0.jsonl", "\n".join(json.dumps(r) for r in now).encode())
    fs.invalidate_cache()
    again = run_spark_reindex(config, spark)
    counts = again["reindex"]
    assert (counts["new"], counts["changed"], counts["deleted"], counts["encoded_now"]) == (1, 1, 1, 2), counts
    assert again["engine"] == "spark" and sorted(read_delta(config.output.path)["id"].to_pylist()) == sorted(
        r["id"] for r in now
    )


def read_delta_files(url: str) -> list[str]:
    from deltalake import DeltaTable
    from support.jobs import delta_options

    return DeltaTable(url, storage_options=delta_options()).file_uris()


def test_a_store_is_loaded_by_spark_tasks(spark: Any, splade_tiny: Path, postgres: Any) -> None:
    from pipeline.spark import run_spark_job

    fs = s3fs.S3FileSystem()
    rows = corpus_rows(90)
    fs.pipe("spark/store/corpus/part-0.jsonl", "\n".join(json.dumps(r) for r in rows).encode())
    fs.invalidate_cache()
    sink = {"sink.type": "pgvector", "sink.dsn": postgres.dsn, "sink.collection": "spark_store", "sink.writers": 2}
    summary = run_spark_job(_config(splade_tiny, "store", **sink), spark)
    assert summary["sink"]["store_count"] == summary["sink"]["upserted"] == 90 and not summary.get("errors")
    stored = store_vectors(postgres, "spark_store")
    table = read_delta("s3://spark/store/out")
    dense = densify(table["sparse"].combine_chunks(), VOCAB)
    assert sorted(stored) == sorted(table["id"].to_pylist())
    for i, doc in enumerate(table["id"].to_pylist()):
        assert np.abs(stored[doc] - dense[i]).max() <= 1e-6


def test_encode_dataframe_equals_the_bare_encoder_and_keeps_bad_rows(
    spark: Any, splade_tiny: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from pipeline.config import EncoderConfig
    from pipeline.errors import SettingError
    from pipeline.job.faults import OOM_ABOVE
    from pipeline.spark import encode_dataframe
    from pipeline.spark.tasks import on_task_device

    rows = [
        {"doc": "a", "body": "The moon pulls the tides.", "lang": "en"},
        {"doc": "b", "body": "   ", "lang": "en"},
        {"doc": None, "body": "no id", "lang": "de"},
        {"doc": "c", "body": "Bees make honey from nectar. " * 40, "lang": "en"},
    ]
    frame = spark.createDataFrame(rows, "doc string, body string, lang string").repartition(2)
    encoder = EncoderConfig(model=str(splade_tiny), device="cpu", max_length=32)
    out = encode_dataframe(frame, encoder, id_column="doc", text_column="body", passthrough_columns=["lang"])
    got = {r["id"]: r for r in out.toArrow().to_pylist()}
    assert set(got) == {"a", "b", None, "c"}  # nothing dropped
    assert (got["b"]["reject"], got[None]["reject"]) == ("empty_text", "missing_id") and got["b"]["sparse"] is None
    want = SpladeEncoder(str(splade_tiny), device="cpu", max_length=32).encode_batch([rows[0]["body"], rows[3]["body"]])
    vectors = pa.array([got["a"]["sparse"], got["c"]["sparse"]], want.sparse.type)
    assert np.abs(densify(vectors, VOCAB) - densify(want.sparse, VOCAB)).max() <= 1e-5
    assert [got["a"]["num_tokens"], got["c"]["num_tokens"]] == want.num_tokens.tolist()
    assert got["c"]["truncated"] and got["a"]["lang"] == "en" and got["a"]["reject"] is None

    # a document the encoder fails on even alone (out of memory) is rejected; the others are encoded
    monkeypatch.setenv(OOM_ABOVE, "20")  # c has 32 tokens, a fewer than 20
    out = encode_dataframe(frame, encoder, id_column="doc", text_column="body", passthrough_columns=["lang"])
    again = {r["id"]: r for r in out.toArrow().to_pylist()}
    assert again["c"]["reject"] == "encoder_error" and "out of memory even alone" in again["c"]["detail"]
    assert again["c"]["sparse"] is None and again["c"]["content_hash"] is None and again["c"]["lang"] == "en"
    assert again["a"]["sparse"] == got["a"]["sparse"] and again["a"]["reject"] is None

    # every document failing alone is a broken device, not bad data: the task fails (Spark retries it)
    monkeypatch.setenv(OOM_ABOVE, "1")
    broken = encode_dataframe(frame.coalesce(1), encoder, id_column="doc", text_column="body")
    with pytest.raises(Exception, match="every document of the batch failed to encode"):
        broken.toArrow()
    monkeypatch.delenv(OOM_ABOVE)

    # settings are validated; a task with no GPU from Spark encodes on the CPU, whatever the node has
    with pytest.raises(SettingError, match="text_colum"):
        encode_dataframe(frame, encoder, id_column="doc", text_colum="body")
    with pytest.raises(SettingError, match="'detail' is a column it writes itself"):
        encode_dataframe(frame, encoder, id_column="doc", text_column="body", passthrough_columns=["detail"])
    chosen, gpu = on_task_device(encoder.model_copy(update={"device": "auto"}))
    assert (chosen.device, gpu) == ("cpu", None)


def test_spark_submit_runs_the_job_and_a_killed_driver_resumes(
    splade_tiny: Path, s3_endpoint: str, tmp_path: Path
) -> None:
    import pyspark

    if shutil.which("java") is None:
        pytest.skip("no Java runtime")
    submit = Path(pyspark.__file__).parent / "bin" / "spark-submit"
    fs = s3fs.S3FileSystem()
    rows = corpus_rows(60)
    fs.pipe("spark/submit/corpus/part-0.jsonl", "\n".join(json.dumps(r) for r in rows[:30]).encode())
    fs.pipe("spark/submit/corpus/part-1.jsonl", "\n".join(json.dumps(r) for r in rows[30:]).encode())
    fs.invalidate_cache()
    config = tmp_path / "job.yaml"
    config.write_text(
        json.dumps(
            {
                "input": {"paths": ["s3://spark/submit/corpus/"], "rows_per_block": 20},
                "encoder": {"model": str(splade_tiny), "max_length": 64},
                "output": {"path": "s3://spark/submit/out"},
            }
        )
    )
    env = os.environ | {"PYSPARK_PYTHON": sys.executable, "PYSPARK_DRIVER_PYTHON": sys.executable}
    args = [str(submit), "--master", "local[2]", str(ROOT / "jobs" / "spark_encode.py"), "--config", str(config)]

    def run(**extra: str) -> subprocess.CompletedProcess:
        return subprocess.run(args, capture_output=True, text=True, timeout=300, cwd=ROOT, env=env | extra)

    killed = run(SPLADE_PIPELINE_CRASH_AT="before_commit")  # every file written, nothing committed
    assert killed.returncode != 0 and "killing the driver at before_commit" in killed.stdout + killed.stderr
    done = run()
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads(fs.cat("spark/submit/out/_SUMMARY.json"))
    assert summary["engine"] == "spark" and summary["rows_reused"] == 60 == summary["rows_written"]
    assert sorted(read_delta("s3://spark/submit/out")["id"].to_pylist()) == sorted(r["id"] for r in rows)


def test_an_error_of_ours_in_a_task_reaches_the_driver_as_itself(spark: Any, splade_tiny: Path) -> None:
    from pipeline.sources import InputError
    from pipeline.spark import run_spark_job

    fs = s3fs.S3FileSystem()
    fs.pipe("spark/bad/corpus/part-0.jsonl", "\n".join(json.dumps(r) for r in corpus_rows(10)).encode())
    fs.pipe("spark/bad/corpus/part-1.jsonl.gz", b"this is not gzip at all")
    fs.invalidate_cache()
    with pytest.raises(InputError, match=r"part-1\.jsonl\.gz") as raised:
        run_spark_job(_config(splade_tiny, "bad", **{"input.on_bad_file": "error"}), spark)
    assert "PythonException" not in str(raised.value) and "Traceback" not in str(raised.value)
