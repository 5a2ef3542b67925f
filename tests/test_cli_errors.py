"""A user's mistake ends with one clear message and exit code 2, never a traceback: every case
here raises before any cluster work, each through the command line as a user runs it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipeline.cli import main


def _run(args: list[str], capsys: pytest.CaptureFixture) -> str:
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.startswith("splade-pipeline ")
    return err


def _corpus(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "docs.jsonl").write_text(json.dumps({"id": "a", "text": "some text"}) + "\n")
    return folder


def test_a_corrupt_first_input_file_is_named(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.parquet").write_bytes(b"not a parquet file at all")
    err = _run(["encode", "--input", str(tmp_path / "in"), "--output", str(tmp_path / "out")], capsys)
    assert "a.parquet: cannot read as parquet" in err and "on_bad_file: skip" in err


def test_a_model_folder_without_a_model_is_named(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "model.safetensors").write_bytes(b"")  # weights present, no config.json
    args = ["encode", "--input", str(_corpus(tmp_path / "in")), "--output", str(tmp_path / "out")]
    err = _run([*args, "--model", str(tmp_path / "model")], capsys)
    assert f"model {str(tmp_path / 'model')!r}: cannot be loaded" in err


@pytest.mark.parametrize("model", ["no-such-org/no-such-splade-model", "./missing-folder"])
def test_terms_with_a_model_that_cannot_load(model: str, capsys: pytest.CaptureFixture) -> None:
    err = _run(["terms", "hello", "--model", model], capsys)
    assert repr(model) in err


def test_terms_with_an_empty_model_name(capsys: pytest.CaptureFixture) -> None:
    err = _run(["terms", "hello", "--model", ""], capsys)
    assert "encoder: Value error, model: must name a Hugging Face model id" in err


def test_an_output_url_no_filesystem_knows(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    sink = ["--sink-type", "qdrant", "--sink-path", str(tmp_path / "q")]
    err = _run(["upsert", "--from", "nosuchprotocol://bucket/out", *sink], capsys)
    assert "nosuchprotocol://bucket/out: cannot use output location" in err
    err = _run(["encode", "--input", str(_corpus(tmp_path / "in")), "--output", "nosuchprotocol://x/y"], capsys)
    assert "nosuchprotocol://x/y: cannot use output location" in err


def test_upsert_from_an_output_with_no_commit(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    err = _run(["upsert", "--from", str(tmp_path), "--sink-type", "qdrant", "--sink-path", str(tmp_path / "q")], capsys)
    assert "no Delta table here (no _delta_log/); run or finish the encode job first" in err


def test_an_error_of_ours_is_rebuilt_from_an_engines_text_only_when_it_ended_the_task() -> None:
    """Spark and Ray pass a task's error on as text: ours is rebuilt with its whole message (the
    indented lines under it too), never an earlier one that another exception replaced."""
    from pipeline.errors import raised_in_text
    from pipeline.sinks.protocol import SinkError
    from pipeline.sources import InputError

    frames = 'Traceback (most recent call last):\n  File "/x/tasks.py", line 9, in upsert\n    store(batch)\n'
    store = (
        frames + "pipeline.sinks.protocol.SinkError: connection refused\n\tIs the server running?\n\nJVM stacktrace:\n"
    )
    found = raised_in_text(store)
    assert isinstance(found, SinkError) and str(found) == "connection refused\n\tIs the server running?"
    replaced = frames + "pipeline.sources.InputError: a.jsonl: bad\n\nDuring handling of the above exception, another "
    assert raised_in_text(replaced + "exception occurred:\n\n" + frames + "OSError: disk gone\n") is None
    caused = frames + "pipeline.sources.InputError: a.jsonl: bad\n\nThe above exception was the direct cause of"
    assert raised_in_text(caused + " the following exception:\n\n" + frames + "RuntimeError: x\n") is None
    last = frames + "pipeline.sources.InputError: a.jsonl: line 3 bad\n"
    assert isinstance(raised_in_text(last), InputError) and str(raised_in_text(last)) == "a.jsonl: line 3 bad"
    assert raised_in_text(frames + "pipeline.job.summary.RowsLostError: lost\n") is None  # a bug, not a user error
    assert raised_in_text(frames + "pipeline.nowhere.Error: x\n") is None
