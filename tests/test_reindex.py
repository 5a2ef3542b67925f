"""Incremental reindexing on a real local Ray cluster, S3 through moto's server and PostgreSQL + pgvector.

The store and the committed Parquet output are compared, document by document, with vectors
encoded afresh from the corpus as it is now.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import s3fs
from deltalake import DeltaTable
from support.jobs import ROOT, cli, corpus_rows, delta_options, read_delta, read_polars, read_ray, table_filesystem
from support.reference import densify
from support.sink_checks import store_vectors

from pipeline import SpladeEncoder
from pipeline.config import JobConfig, load_config
from pipeline.job.encode import run_job
from pipeline.job.faults import PAUSE, VARIABLE
from pipeline.job.reindex import MassDeleteError, run_reindex
from pipeline.output.location import OutputLocation
from pipeline.output.table import DeltaOutput
from pipeline.report import REPORT_FILE, build_report
from pipeline.status import output_status

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
            "sink.type": "pgvector",
            "sink.dsn": postgres.dsn,
            "sink.collection": name,
            "sink.batch_size": 50,
            **extra,
        },
    )


def assert_current(
    config: JobConfig, postgres: Any, docs: dict[str, str], encoder: SpladeEncoder, *, store: bool = True
) -> None:
    """Store and table hold exactly the corpus now, each document once, with its current vector."""
    ids = sorted(docs)
    want = dict(zip(ids, densify(encoder.encode([docs[i] for i in ids]), VOCAB)))
    if store:
        stored = store_vectors(postgres, config.sink.collection)
        assert sorted(stored) == ids
        assert max(np.abs(stored[i] - want[i]).max() for i in ids) <= 1e-5
    assert_table(config.output.path, docs, want)


def assert_table(url: str, docs: dict[str, str], want: dict[str, np.ndarray]) -> None:
    data = read_delta(url)
    assert sorted(data["id"].to_pylist()) == sorted(docs)  # exactly once
    got = densify(data["sparse"].combine_chunks(), VOCAB)
    assert max(np.abs(got[k] - want[i]).max() for k, i in enumerate(data["id"].to_pylist())) <= 1e-5


def version(config: JobConfig) -> int | None:
    snap = DeltaOutput(OutputLocation(config.output.path)).snapshot()
    return None if snap is None else snap.version


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
    assert len(store_vectors(postgres, "main")) == 200 and version(config) == 0  # untouched

    before = DeltaTable(config.output.path, storage_options=delta_options())  # a reader on version 0...
    summary = run_reindex(config)
    counts = summary["reindex"]
    assert (counts["new"], counts["changed"], counts["deleted"], counts["unchanged"]) == (10, 20, 10, 170)
    assert counts["encoded_now"] == 30  # rows the encoders actually processed
    assert (
        summary["sink"]["upserted"] == 30 and summary["sink"]["deleted"] == 10 and summary["sink"]["store_count"] == 200
    )
    assert summary["rows_read"] == summary["rows_written"] + summary["rows_rejected"] == 200
    assert summary["table_version"] == version(config) == 1  # the whole change is one version
    assert_current(config, postgres, now, encoder)
    # ...keeps reading version 0 after the commit: no file of it was deleted
    old = before.to_pyarrow_table(filesystem=table_filesystem(config.output.path))
    assert sorted(old["id"].to_pylist()) == sorted(docs)
    # every Delta reader sees the same rows
    for reader in (read_polars, read_ray):
        other = reader(config.output.path)
        assert sorted(other["id"].to_pylist()) == sorted(now)
        assert sorted(map(str, other["sparse"].to_pylist())) == sorted(
            map(str, read_delta(config.output.path)["sparse"].to_pylist())
        )

    loc = OutputLocation(config.output.path)
    shown = output_status(loc)  # the files version 1 rewrote or deleted are not "not committed"
    assert shown["table"]["version"] == 1 and shown["uncommitted_files"] == 0
    report = loc.read_bytes(REPORT_FILE)
    # a report of the run that committed version 0, built now: of version 0, not of the latest
    page = build_report(loc, summary | {"table_version": 0}, config.output.table_options)
    assert "<th>table version</th><td>0</td>" in page and "<th>table version</th><td>1</td>" in report.decode()

    again = run_reindex(config)
    assert again["reindex"]["encoded_now"] == 0 and again["reindex"]["unchanged"] == 200
    assert loc.read_bytes(REPORT_FILE) == report  # nothing changed: the report of version 1's run stays
    assert again["table_version"] == version(config) == 1  # nothing to do: no version written
    assert again["sink"]["upserted"] == again["sink"]["deleted"] == 0  # the store already holds version 1
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

    history = cli("history", "--output", config.output.path)
    assert history.returncode == 0, history.stderr[-2000:]
    lines = history.stdout.splitlines()
    assert lines[1].split()[:5] == ["1", *lines[1].split()[1:3], "WRITE", "reindex"]
    assert "CREATE" in lines[2] and "encode" in lines[2] and len(lines) == 3

    # rollback to version 0: the table and the store hold the first corpus again
    args = ["--output", config.output.path, "--sink-type", "pgvector", "--sink-dsn", postgres.dsn]
    back = cli("rollback", "--to-version", "0", *args, "--sink-collection", "main")
    assert back.returncode == 0, back.stderr[-2000:]
    assert version(config) == 2 and "restored version 0" in back.stdout
    assert_current(config, postgres, docs, encoder)


def _output(config: JobConfig) -> OutputLocation:
    return OutputLocation(config.output.path)


@pytest.mark.parametrize(
    ("point", "version_after_kill"),
    [
        pytest.param("written:2", 0, marks=pytest.mark.slow),  # the encode job's resume tests kill there too
        pytest.param("before_commit", 0, marks=pytest.mark.slow),
        ("commit", 1),
        ("delete", 1),
    ],
)  # mid-encoding; all written; the table committed, rejects not; the store half-synced
def test_killed_reindex_then_next_completes(
    ray_cluster: str, splade_tiny: Path, postgres: Any, encoder: SpladeEncoder, point: str, version_after_kill: int
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
    assert version(config) == version_after_kill  # before its commit: the previous version stays as it was

    done = cli(*args)
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads(out.read_bytes("_SUMMARY.json"))
    assert version(config) == 1  # one version for the whole change, whatever the kill
    if version_after_kill == 0:
        assert summary["reindex"]["new"] + summary["reindex"]["changed"] == 18
        # Blocks the killed attempt wrote are reused, not encoded again.
        assert summary["rows_reused"] > 0 and summary["reindex"]["encoded_now"] == 18 - summary["rows_reused"]
    else:
        assert summary["reindex"]["encoded_now"] == 0  # committed already: the re-run only finishes the store
    assert_current(config, postgres, now, encoder)


def test_guards_dry_run_and_full_reencode(
    ray_cluster: str, splade_tiny: Path, postgres: Any, encoder: SpladeEncoder
) -> None:
    docs = base_docs(60)
    write_corpus("reindex/guard/corpus", docs)
    config = make_config(splade_tiny, postgres, "guard")
    run_reindex(config)

    # Half the corpus gone (say, a wrong input path): refused before anything changes.
    half = {i: t for i, t in docs.items() if int(i[1:]) % 2 == 0}
    write_corpus("reindex/guard/corpus", half)
    with pytest.raises(
        MassDeleteError, match=r"would delete 30 of 60 indexed documents \(50.0%\).*--allow-mass-delete"
    ):
        run_reindex(config)
    assert len(store_vectors(postgres, "guard")) == 60 and version(config) == 0
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

    # A setting that changes the vectors: everything re-encoded, and said so.
    changed = make_config(splade_tiny, postgres, "guard", **{"encoder.top_k": 40})
    summary = run_reindex(changed)
    assert summary["reindex"]["full"] and "encoder top_k: None -> 40" in summary["reindex"]["reason"]
    assert summary["reindex"]["encoded_now"] == 30
    stored = store_vectors(postgres, "guard")
    assert sorted(stored) == sorted(half) and max(int((v > 0).sum()) for v in stored.values()) <= 40


def test_two_racing_reindexes_leave_one_of_the_two_outcomes(
    ray_cluster: str, splade_tiny: Path, postgres: Any, encoder: SpladeEncoder, tmp_path: Path
) -> None:
    """No lock at all: two reindexes of different corpora read the same version, write their files,
    and commit at the same moment. Delta's conditional commit lets one land; the other fails with a
    clear message and changes nothing; the table is exactly one of the two outcomes."""
    docs = base_docs(80)
    write_corpus("reindex/race/a", docs)
    config = make_config(splade_tiny, postgres, "race", **{"input.paths": ["s3://reindex/race/a/"], "sink.type": None})
    run_reindex(config)
    one, _ = evolve(docs)
    two = {i: t + " Second edit." for i, t in docs.items() if int(i[1:]) % 3}
    write_corpus("reindex/race/a", one)
    write_corpus("reindex/race/b", two)

    def race_args(corpus: str) -> list[str]:
        args = ["reindex", "--input", corpus, "--output", config.output.path, "--model", str(splade_tiny)]
        return [*args, "--max-length", "64", "--rows-per-block", "25", "--reindex-max-delete-percent", "100"]

    def start(corpus: str, log: Path) -> subprocess.Popen:
        env = os.environ | {PAUSE: "before_commit:8"}  # both reach their commit with the same base version
        with log.open("w") as out:  # files, not pipes: a full pipe would hold a run back from the race
            return subprocess.Popen(
                [sys.executable, "-m", "pipeline.cli", *race_args(corpus)], cwd=ROOT, env=env, stdout=out, stderr=out
            )

    logs = [tmp_path / "a.log", tmp_path / "b.log"]
    runs = [start("s3://reindex/race/a/", logs[0]), start("s3://reindex/race/b/", logs[1])]
    results = [(p.wait(timeout=600), "", log.read_text()) for p, log in zip(runs, logs)]
    codes = sorted(code for code, _, _ in results)
    assert codes == [0, 2], [r[2][-2000:] for r in results]
    loser = next(err for code, _, err in results if code == 2)
    assert "another run (reindex) committed version 1" in loser and "Nothing of this run was committed" in loser
    assert version(config) == 1
    winner = one if results[0][0] == 0 else two
    want = {i: v for i, v in zip(sorted(winner), densify(encoder.encode([winner[i] for i in sorted(winner)]), VOCAB))}
    assert_table(config.output.path, winner, want)

    # the loser's re-run applies its change on top of the winner's version
    loser_corpus = "s3://reindex/race/b/" if winner is one else "s3://reindex/race/a/"
    rerun = cli(*race_args(loser_corpus))
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    final = two if winner is one else one
    want = {i: v for i, v in zip(sorted(final), densify(encoder.encode([final[i] for i in sorted(final)]), VOCAB))}
    assert_table(config.output.path, final, want)
    assert version(config) == 2


def test_vacuum_keeps_files_inside_the_retention_window(
    ray_cluster: str, splade_tiny: Path, postgres: Any, encoder: SpladeEncoder
) -> None:
    docs = base_docs(40)
    write_corpus("reindex/vacuum/corpus", docs)
    config = make_config(splade_tiny, postgres, "vacuum", **{"sink.type": None})
    run_reindex(config)
    now, _ = evolve(docs)
    write_corpus("reindex/vacuum/corpus", now)
    run_reindex(config)  # version 1 removes the files of the documents that changed
    fs = s3fs.S3FileSystem()
    fs.pipe("reindex/vacuum/out/data/part-0123456789abcdef-000000-orphan.parquet", b"a killed run's file")
    out = ["--output", config.output.path]

    kept = cli("vacuum", *out)  # default 7 days: everything is younger
    assert kept.returncode == 0 and "table: deleted 0 files" in kept.stdout, kept.stderr[-2000:]
    assert read_delta(config.output.path, version=0).num_rows == 40  # the old version still reads

    dry = cli("vacuum", *out, "--retention-days", "0", "--dry-run")
    assert dry.returncode == 0 and "would delete" in dry.stdout and "orphan" in dry.stdout
    gone = cli("vacuum", *out, "--retention-days", "0")
    assert gone.returncode == 0, gone.stderr[-2000:]
    fs.invalidate_cache()
    assert not fs.exists("reindex/vacuum/out/data/part-0123456789abcdef-000000-orphan.parquet")
    assert_current(config, postgres, now, encoder, store=False)  # the latest version is whole
    with pytest.raises(Exception):  # noqa: B017 - version 0's replaced files are gone now
        read_delta(config.output.path, version=0)
    # the vacuum's own commits (two per table per call) do not hide the table's record from the next run
    again, _ = evolve(now)
    write_corpus("reindex/vacuum/corpus", again)
    assert run_reindex(config)["table_version"] == version(config) > 2
    assert_current(config, postgres, again, encoder, store=False)
