"""Bad input: a clear error naming the file/URL, or a counted, reported rejection. Never a silent drop."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import s3fs
from support.jobs import cli, corpus_rows, read_output
from support.pg_server import free_port

from pipeline.cli import main
from pipeline.config import load_config
from pipeline.job.encode import run_job

BIG = "lorem ipsum dolor " * 120_000  # about 2 MB


def run_cli(capsys: pytest.CaptureFixture, *args: str) -> tuple[int, str, str]:
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def bad_rows_run(ray_cluster: str, splade_tiny: Path) -> dict[str, Any]:
    """One job over a bucket holding every kind of bad row, a corrupt Parquet file (skipped) and good data."""
    fs = s3fs.S3FileSystem()
    fs.mkdir("badrows")
    good = corpus_rows(20)
    lines = [json.dumps(r) for r in good[:10]]
    lines += [
        json.dumps({"id": "null-text", "text": None}),
        json.dumps({"id": "empty-text", "text": ""}),
        json.dumps({"id": "blank-text", "text": "   \n\t"}),
        json.dumps({"id": "number-text", "text": 42}),
        json.dumps({"text": "no id here"}),
        '{"id": "broken", "text": "unterminated',
        json.dumps({"id": "d00003", "text": "a second document with an id seen before"}),
        json.dumps({"id": "huge", "text": BIG}),
    ]
    body = "\n".join(lines).encode() + b'\n{"id": "latin1", "text": "caf\xe9"}\n'
    fs.pipe("badrows/in/a-rows.jsonl", body)
    buf = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(good[10:]), buf)
    fs.pipe("badrows/in/b-good.parquet", buf.getvalue())
    fs.pipe("badrows/in/c-corrupt.parquet", b"PAR1 this is not parquet PAR1")
    cfg = load_config(
        None,
        {
            "input.paths": ["s3://badrows/in/"],
            "output.path": "s3://badrows/out",
            "encoder.model": str(splade_tiny),
            "input.on_bad_file": "skip",
        },
    )
    summary = run_job(cfg)
    data, rejects, written_summary = read_output(fs, "badrows/out")
    assert written_summary["rows_read"] == summary["rows_read"]
    return {
        "summary": summary,
        "data": data,
        "rejects": {r["id"] or f"line {r['line']}": r for r in rejects.to_pylist()},
    }


def test_rows_reconcile(bad_rows_run: dict) -> None:
    s = bad_rows_run["summary"]
    assert s["rows_read"] == s["rows_written"] + s["rows_rejected"]
    assert s["rows_written"] == bad_rows_run["data"].num_rows == 10 + 10 + 1  # good + huge
    assert s["rows_rejected"] == len(bad_rows_run["rejects"]) == 8  # the duplicate among them


@pytest.mark.parametrize(
    ("key", "reason"),
    [
        ("null-text", "null_text"),
        ("empty-text", "empty_text"),
        ("blank-text", "empty_text"),
        ("number-text", "non_string_text"),
    ],
)
def test_bad_text_rejected(bad_rows_run: dict, key: str, reason: str) -> None:
    reject = bad_rows_run["rejects"][key]
    assert reject["reason"] == reason
    assert reject["source"] == "s3://badrows/in/a-rows.jsonl" and reject["line"] > 10
    assert bad_rows_run["summary"]["rejected_by_reason"][reason] >= 1


def test_missing_id_rejected(bad_rows_run: dict) -> None:
    reject = bad_rows_run["rejects"]["line 15"]
    assert reject["reason"] == "missing_id" and "fields found: ['text']" in reject["detail"]


def test_malformed_json_line_rejected(bad_rows_run: dict) -> None:
    reject = bad_rows_run["rejects"]["line 16"]
    assert reject["reason"] == "malformed_json" and reject["source"].endswith("a-rows.jsonl")


def test_undecodable_bytes_rejected(bad_rows_run: dict) -> None:
    reject = bad_rows_run["rejects"]["line 19"]
    assert reject["reason"] == "undecodable_bytes" and "0xe9" in reject["detail"]


def test_corrupt_parquet_skipped_and_reported(bad_rows_run: dict) -> None:
    skipped = bad_rows_run["summary"]["skipped_files"]
    assert len(skipped) == 1 and skipped[0].startswith("s3://badrows/in/c-corrupt.parquet: ")
    assert bad_rows_run["summary"]["input_files"] == 3


def test_a_later_duplicate_id_is_rejected_and_the_first_kept(bad_rows_run: dict) -> None:
    assert (
        bad_rows_run["summary"]["duplicate_ids"] == bad_rows_run["summary"]["rejected_by_reason"]["duplicate_id"] == 1
    )
    data = bad_rows_run["data"]
    assert data["id"].to_pylist().count("d00003") == 1
    reject = bad_rows_run["rejects"]["d00003"]
    assert reject["reason"] == "duplicate_id" and reject["source"] == "s3://badrows/in/a-rows.jsonl"
    first = data["content_hash"][data["id"].to_pylist().index("d00003")].as_py()
    from pipeline.sources import content_hash

    assert first != content_hash("a second document with an id seen before")


def test_huge_document_truncated_and_counted(bad_rows_run: dict) -> None:
    data = bad_rows_run["data"]
    row = data["id"].to_pylist().index("huge")
    assert data["truncated"][row].as_py() is True and data["num_tokens"][row].as_py() == 512
    assert bad_rows_run["summary"]["truncated"] == 1


def test_corrupt_parquet_is_an_error_by_default(
    ray_cluster: str, splade_tiny: Path, capsys: pytest.CaptureFixture
) -> None:
    code, _, err = run_cli(
        capsys,
        "encode",
        "--input",
        "s3://badrows/in/",
        "--output",
        "s3://badrows/out-strict",
        "--model",
        str(splade_tiny),
    )
    assert code == 2
    assert "s3://badrows/in/c-corrupt.parquet: cannot read as parquet" in err and "on_bad_file: skip" in err
    assert "Traceback" not in err


def test_missing_path(capsys: pytest.CaptureFixture, tmp_path: Path) -> None:
    code, _, err = run_cli(capsys, "encode", "--input", str(tmp_path / "nowhere"), "--output", str(tmp_path / "out"))
    assert code == 2 and f"{tmp_path / 'nowhere'}: no such file or folder" in err


def test_no_files_matched(capsys: pytest.CaptureFixture, tmp_path: Path) -> None:
    code, _, err = run_cli(capsys, "encode", "--input", str(tmp_path / "*.jsonl"), "--output", str(tmp_path / "out"))
    assert code == 2 and "no input files matched" in err


def test_unknown_format(capsys: pytest.CaptureFixture, tmp_path: Path) -> None:
    (tmp_path / "corpus.xml").write_text("<docs/>")
    code, _, err = run_cli(capsys, "encode", "--input", str(tmp_path / "corpus.xml"), "--output", str(tmp_path / "out"))
    assert code == 2 and "corpus.xml: unknown file format" in err


def test_missing_text_column_lists_columns(s3_endpoint: str, capsys: pytest.CaptureFixture, tmp_path: Path) -> None:
    fs = s3fs.S3FileSystem()
    fs.mkdir("nocol")
    buf = io.BytesIO()
    pq.write_table(pa.table({"doc_id": ["a"], "body": ["x"]}), buf)
    fs.pipe("nocol/x.parquet", buf.getvalue())
    code, _, err = run_cli(capsys, "encode", "--input", "s3://nocol/", "--output", str(tmp_path / "out"))
    assert code == 2
    assert "s3://nocol/x.parquet: missing column(s) ['id', 'text']; columns found: ['doc_id', 'body']" in err


def test_non_empty_output_refused(capsys: pytest.CaptureFixture, tmp_path: Path) -> None:
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "old.parquet").write_bytes(b"x")
    code, _, err = run_cli(capsys, "encode", "--output", str(tmp_path / "out"))
    assert code == 2 and "output is not empty (1 files, e.g. old.parquet) and is not a splade-pipeline table" in err
    assert "choose an empty output" in err


@pytest.mark.cluster  # starts moto's S3 server of its own
def test_wrong_credentials(tmp_path: Path) -> None:
    """An S3 endpoint that checks credentials: a clear error naming the URL, and no secret printed."""
    port = free_port()
    env = {**__import__("os").environ, "INITIAL_NO_AUTH_ACTION_COUNT": "0"}
    server = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        _wait_for(port)
        secret = "wJalrXUtnFEMI-K7MDENG-bPxRfiCYEXAMPLEKEY"
        client_env = env | {
            "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}",
            "AWS_ACCESS_KEY_ID": "AKIAWRONGWRONG",
            "AWS_SECRET_ACCESS_KEY": secret,
        }
        proc = cli("encode", "--input", "s3://private-corpus/docs/", "--output", str(tmp_path / "out"), env=client_env)
    finally:
        server.terminate()
        server.wait(timeout=30)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "s3://private-corpus/docs/: cannot list input" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert secret not in proc.stderr + proc.stdout


def _wait_for(port: int) -> None:
    import socket
    import time

    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise TimeoutError(f"moto server on port {port} did not start")


def test_secrets_refused_in_config(capsys: pytest.CaptureFixture, tmp_path: Path) -> None:
    config = tmp_path / "job.yaml"
    config.write_text("input:\n  storage_options:\n    secret: hunter2hunter2\n")
    code, out, err = run_cli(capsys, "encode", "--config", str(config))
    assert code == 2 and "input.storage_options.secret: credentials are not accepted" in err
    assert "hunter2hunter2" not in err + out
