"""The progress line: rate over the last minute, ETA, totals from Parquet footers and file sizes,
redrawn on a terminal and printed every so often in a log; run records and what status makes of them."""

from __future__ import annotations

import gzip
import io
import json
import os
import time
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.config import InputConfig
from pipeline.job import progress as progress_module
from pipeline.job.progress import Printer, Progress, expected_rows
from pipeline.sources import Shard


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    c = Clock()
    monkeypatch.setattr(progress_module.time, "monotonic", c)
    return c


def test_rate_is_over_the_last_minute_and_eta_follows_it(clock: Clock) -> None:
    p = Progress(total=10_000)
    for _ in range(10):  # 100 docs/s for 100 s
        clock.now += 10
        p.update(p.done + 1000, 0)
    assert p.rate() == pytest.approx(100.0)
    clock.now += 60
    p.update(p.done, 0)  # a minute with nothing done: the rate falls to the last minute's
    assert p.rate() == 0.0 and p.eta_s() is None  # stalled: no ETA
    assert "0.0 docs/s" in p.line() and "ETA" not in p.line()
    q = Progress(total=1000)
    clock.now += 10
    q.update(100, 3, actors=2)
    assert q.eta_s() == pytest.approx(90.0)
    assert q.line() == "100 / 1,000 docs (10%) · 10.0 docs/s · ETA 1 min 30 s · 3 rejected · 2 encoders up"


def test_without_a_total_or_past_an_estimate_the_line_shows_done_and_rate(clock: Clock) -> None:
    p = Progress()
    assert p.line().startswith("0 docs · starting")
    clock.now += 4
    p.update(40, 0)
    assert p.line() == "40 docs · 10.0 docs/s · 0 rejected"
    est = Progress(total=30, estimated=True)
    clock.now += 1
    est.update(20, 0)
    assert est.line().startswith("20 / ~30 docs (67%)")
    est.update(45, 1)  # the estimate was short: no percentage above 100, no ETA
    assert est.line().startswith("45 docs · ") and "ETA" not in est.line()


def test_reused_rows_count_as_done_but_not_in_the_rate(clock: Clock) -> None:
    p = Progress(total=1000, reused=600, done=600)
    clock.now += 10
    p.update(700, 0)
    assert p.rate() == pytest.approx(10.0) and p.fraction() == 0.7


def test_the_timeline_is_thinned_not_grown_without_bound(clock: Clock) -> None:
    p = Progress()
    for i in range(progress_module.MAX_TIMELINE * 3):
        clock.now += 1
        p.update(i + 1, 0)
    d = p.to_dict()
    assert len(d["seconds"]) <= progress_module.MAX_TIMELINE
    assert d["done"][-1] == progress_module.MAX_TIMELINE * 3  # the last point is kept
    assert d["seconds"] == sorted(d["seconds"]) and d["seconds"][0] <= 2


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_a_terminal_gets_one_line_redrawn_a_log_gets_a_line_every_few_seconds(clock: Clock) -> None:
    tty = Terminal()
    log = io.StringIO()
    shows = [Printer(tty), Printer(log)]
    p = Progress(total=100, on_update=lambda pr: [s(pr) for s in shows])
    for _ in range(40):  # every 0.5 s for 20 s
        clock.now += 0.5
        p.update(p.done + 2, 0)
    p.finish()
    drawn = tty.getvalue()
    assert "\n" not in drawn[:-1] and drawn.endswith("done · 0 rejected\n")  # one line, ended when done
    assert drawn.count("\r\x1b[2K") == 41  # every update at REDRAW_EVERY_S apart, and the last
    lines = log.getvalue().splitlines()
    assert len(lines) == 3 and all(line.startswith("  ... ") for line in lines)  # at 0.5 s, 10.5 s, done
    assert lines[-1].startswith("  ... 80 / 100 docs (80%)") and "done" in lines[-1]


def test_totals_from_parquet_footers_and_text_sizes(tmp_path: Path) -> None:
    cfg = InputConfig(paths=[str(tmp_path)])
    for i in range(3):
        pq.write_table(
            pa.table({"id": [f"{i}-{k}" for k in range(7 + i)], "text": ["x"] * (7 + i)}), tmp_path / f"{i}.parquet"
        )
    shards = [Shard(i, str(tmp_path / f"{i}.parquet"), "parquet") for i in range(3)]
    assert expected_rows(shards, cfg) == (24, False)

    line = json.dumps({"id": "d", "text": "a passage of some length " * 4}) + "\n"
    one = tmp_path / "one.jsonl"
    one.write_text(line * 50)
    assert expected_rows([Shard(0, str(one), "jsonl", size=one.stat().st_size)], cfg) == (50, False)  # read whole
    big = tmp_path / "big.jsonl"
    big.write_text(line * 20_000)  # past the sample: estimated from the size
    shards = [Shard(i, str(p), "jsonl", size=p.stat().st_size) for i, p in enumerate([big, one])]
    total, estimated = expected_rows(shards, cfg)
    assert estimated and abs(total - 20_050) <= 20_050 * 0.02

    packed = tmp_path / "z.jsonl.gz"
    packed.write_bytes(gzip.compress((line * 10).encode()))
    assert expected_rows([Shard(0, str(packed), "jsonl", size=1)], cfg) == (None, False)  # no cheap total
    restricted = [Shard(0, str(big), "jsonl", lines=(1, 5, 9)), Shard(1, str(one), "jsonl", lines=(2,))]
    assert expected_rows(restricted, cfg) == (4, False)  # a reindex counts the rows it encodes
    missing = [Shard(0, str(tmp_path / "gone.parquet"), "parquet")]
    assert expected_rows(missing, cfg) == (None, False)  # a total is a nicety, never an error


def test_run_records_say_running_committed_or_stopped(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from pipeline.job import runs
    from pipeline.job.runs import RunRecord, read_runs
    from pipeline.output.location import OutputLocation
    from pipeline.status import render_status

    loc = OutputLocation(str(tmp_path / "out"))
    done = RunRecord(loc, "20261201T000000-aaaaaaaa", "encode", "ray")
    p = Progress(total=10)
    p.update(10, 1)
    done(p)
    done.committed(3)
    live = RunRecord(loc, "20261203T000000-bbbbbbbb", "reindex", "spark")
    q = Progress(total=100)
    q.update(40, 0)
    live.last = 0.0
    live(q)
    found = {r["attempt"]: r for r in read_runs(loc)}
    assert found["20261201T000000-aaaaaaaa"]["state"] == "committed"
    assert found["20261201T000000-aaaaaaaa"]["table_version"] == 3
    assert found["20261203T000000-bbbbbbbb"] | {"updated": None} == found["20261203T000000-bbbbbbbb"] | {
        "state": "running",
        "done": 40,
        "total": 100,
        "updated": None,
    }
    later = time.time() + runs.STALE_S + 5
    monkeypatch.setattr(runs.time, "time", lambda: later)  # nothing heard for longer than STALE_S
    stopped = read_runs(loc)[0]
    assert stopped["state"] == "stopped" and stopped["stale_s"] >= runs.STALE_S
    text = render_status({"output": loc.url, "table": None, "runs": read_runs(loc), "stores": []})
    assert "STOPPED without committing" in text and "40 / 100 docs" in text and "committed version 3" in text


def test_hostile_text_cannot_break_out_of_the_report(tmp_path: Path) -> None:
    """An output path, a reject reason or a term with markup stays text: escaped in the page, and
    the figures' JSON cannot close its script element."""
    import re

    import plotly.graph_objects as go

    from pipeline.report import _page

    evil = "</script><script>alert(1)</script><b>x"
    summary = {"output": evil, "rows_read": 1, "rows_written": 1, "rows_rejected": 0, "fingerprint": {"model": evil}}
    fig = go.Figure(go.Bar(x=[evil], y=[1]))
    page = _page(summary, 0, {"rejects": fig})
    assert "<script>alert(1)" not in page and "<b>x" not in page
    data = re.search(r'<script type="application/json" id="fig-rejects">(.*?)</script>', page, re.S).group(1)
    assert json.loads(data)["data"][0]["x"] == [evil]  # the text itself, intact once parsed


def test_a_report_that_cannot_be_built_never_fails_the_run(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    from pipeline.output.location import OutputLocation
    from pipeline.report import REPORT_FILE, write_report

    loc = OutputLocation(str(tmp_path / "no-table"))
    assert write_report(loc, {"rows_read": 0}) is None  # no table here: said, not raised
    assert "the run report was not written" in caplog.text and not (tmp_path / "no-table" / REPORT_FILE).exists()


def test_status_names_a_store_load_that_did_not_finish_and_old_run_records_are_pruned(tmp_path: Path) -> None:
    from pipeline.job import runs
    from pipeline.job.runs import RunRecord, read_runs
    from pipeline.output.location import OutputLocation
    from pipeline.status import render_status

    table = {"version": 5, "committed_at": "2026-12-03T00:00:00Z", "documents": 10, "rejected": 0, "data_files": 1}
    stores = [
        {"record": "qdrant-1.json", "store": "qdrant docs", "table_version": 4, "pending": 5, "at": "t"},
        {"record": "pgvector-2.json", "store": "pgvector t", "table_version": 5, "pending": None, "at": "t"},
    ]
    text = render_status({"output": "o", "table": table, "runs": [], "stores": stores, "uncommitted_files": 2})
    assert "store qdrant docs: a load toward version 5 did not finish" in text
    assert "store pgvector t: up to date" in text and "2 data files written and not committed" in text

    loc = OutputLocation(str(tmp_path / "out"))
    for i in range(runs.KEEP + 5):
        RunRecord(loc, f"20261201T{i:06d}-aaaaaaaa", "encode", "ray").committed(i)
    kept = read_runs(loc)
    assert len(kept) == runs.KEEP and kept[0]["table_version"] == runs.KEEP + 4  # the newest kept, newest first


def test_done_never_goes_back_and_the_rate_is_never_negative(clock: Clock) -> None:
    """An engine's count that lags behind the last one shown (the attempt log did not answer in time)
    cannot move the line back; the run's exact final count may, and the rate stays >= 0."""
    p = Progress(total=100)
    clock.now += 10
    p.update(50, 2)
    clock.now += 10
    p.update(30, 1)
    assert (p.done, p.rejected) == (50, 2) and p.rate() is not None and p.rate() >= 0
    clock.now += 1
    p.update(45, 2, exact=True)  # encoded twice before: the written rows are the truth
    assert p.done == 45 and p.rate() == 0.0 and p.eta_s() is None and "-" not in p.line()


def test_a_line_drawn_in_place_is_ended_before_anything_else_is_printed(
    clock: Clock, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import logging

    from pipeline import terminal
    from pipeline.job.watch import _say

    monkeypatch.setattr(terminal, "_live_line", [])
    tty = Terminal()
    p = Progress(total=10, on_update=Printer(tty))
    clock.now += 1
    p.update(3, 0)
    assert not tty.getvalue().endswith("\n")
    terminal.err()  # an error is about to be printed
    assert tty.getvalue().endswith("\n") and tty.getvalue().count("\n") == 1
    for say in (
        lambda: _say("  a node was lost"),  # the cluster watch
        lambda: terminal._Shown(io.StringIO()).emit(logging.makeLogRecord({"msg": "ours", "levelno": 30})),
    ):
        clock.now += 1
        p.update(p.done + 1, 0)
        assert not tty.getvalue().endswith("\n")
        say()
        assert tty.getvalue().endswith("\n")
    assert tty.getvalue().count("\n") == 3 and "a node was lost" in capsys.readouterr().out


def test_notebook_bar_ends_at_100_percent_whatever_the_estimate(clock: Clock) -> None:
    from pipeline.job.progress import notebook_bar

    for done in (45, 20):  # past an estimate of 30, and short of it
        show = notebook_bar()
        p = Progress(total=30, estimated=True, on_update=show)
        clock.now += 1
        p.update(done, 0)
        assert show.bar.n <= show.bar.total  # type: ignore[attr-defined]
        p.finish()
        assert show.bar.n == show.bar.total == done  # type: ignore[attr-defined]


def test_quiet_falls_back_to_the_temp_folder_then_to_verbose_and_leaks_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import os
    import tempfile

    from pipeline import terminal

    blocker = tmp_path / "a-file"
    blocker.write_text("")
    monkeypatch.setenv(terminal.LOG_DIR_VARIABLE, str(blocker / "logs"))  # under a file: cannot be made
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    monkeypatch.delenv(terminal.NO_BARS, raising=False)
    fds = sorted(os.listdir("/proc/self/fd"))
    with terminal.quiet("encode") as path:
        assert path is not None and path.parent == tmp_path / "tmp" / f"splade-pipeline-logs-{os.getuid()}"
        assert _bars_off(terminal)
    assert sorted(os.listdir("/proc/self/fd")) == fds
    monkeypatch.setattr(tempfile, "tempdir", str(blocker / "tmp"))
    with terminal.quiet("encode") as path:
        assert path is None and terminal.forwards_worker_logs()  # nowhere to write: stays verbose
    assert sorted(os.listdir("/proc/self/fd")) == fds
    shared = tmp_path / "shared"
    (shared / "elsewhere").mkdir(parents=True)
    (shared / f"splade-pipeline-logs-{os.getuid()}").symlink_to(shared / "elsewhere")  # planted by another user
    monkeypatch.setattr(tempfile, "tempdir", str(shared))
    with terminal.quiet("encode") as path:
        assert path is None
    assert not any((shared / "elsewhere").iterdir())


def _bars_off(terminal: Any) -> bool:
    import os
    import sys

    data = sys.modules.get("ray.data")
    if data is not None and not data.DataContext.get_current().enable_progress_bars:
        return True
    return os.environ.get(terminal.NO_BARS) == "1"


def test_ray_datas_progress_bars_are_off_while_quiet_and_back_after(monkeypatch: pytest.MonkeyPatch) -> None:
    import ray.data

    from pipeline import terminal

    monkeypatch.delenv(terminal.NO_BARS, raising=False)
    context = ray.data.DataContext.get_current()
    monkeypatch.setattr(context, "enable_progress_bars", True)
    with terminal.quiet("encode"):
        assert not context.enable_progress_bars  # imported before: its context is changed
    assert context.enable_progress_bars and terminal.NO_BARS not in os.environ


def test_old_log_files_are_pruned(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from pipeline import terminal

    monkeypatch.setenv(terminal.LOG_DIR_VARIABLE, str(tmp_path))
    for i in range(terminal.KEEP_LOGS + 7):
        (tmp_path / f"20260101T{i:06d}-1-encode.log").write_text("")
    (tmp_path / "000-other-tool.log").write_text("not ours")  # a shared folder: left alone
    with terminal.quiet("encode") as path:
        assert path is not None
    assert (tmp_path / "000-other-tool.log").exists()
    logs = sorted(p.name for p in tmp_path.glob("2*.log"))
    assert (
        len(logs) == terminal.KEEP_LOGS and path.name in logs and logs[0] == "20260101T000008-1-encode.log"
    )  # 8 oldest gone


def test_a_library_record_whose_arguments_do_not_fit_still_reaches_the_log_masked() -> None:
    import logging

    from pipeline.terminal import _Scrubbed

    record = logging.LogRecord("lib", logging.WARNING, "f.py", 1, "%d files at s3://k:secret@b", ("x",), None)
    text = _Scrubbed("%(message)s").format(record)
    assert "files at" in text and "secret" not in text
    try:
        raise ValueError("postgresql://u:hunter2@db/x refused")
    except ValueError:
        import sys

        failed = logging.LogRecord("lib", logging.ERROR, "f.py", 1, "load failed", (), sys.exc_info())
    text = _Scrubbed("%(message)s").format(failed)
    assert "Traceback" in text and "refused" in text and "hunter2" not in text  # the traceback masked too


def test_a_run_record_beats_through_silent_steps_and_says_why_it_failed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from pipeline.job import runs
    from pipeline.job.runs import RunRecord, read_runs
    from pipeline.output.location import OutputLocation
    from pipeline.status import render_status

    monkeypatch.setattr(runs, "EVERY_S", 0.05)
    loc = OutputLocation(str(tmp_path / "out"))
    writes: list[str] = []
    with pytest.raises(ValueError), RunRecord(loc, "20261203T000000-cccccccc", "encode", "spark") as record:
        real = record.loc.write_bytes
        monkeypatch.setattr(record.loc, "write_bytes", lambda rel, data: (writes.append(rel), real(rel, data)))
        time.sleep(0.5)  # a Spark stage: no progress call, the heartbeat writes on
        assert len(writes) >= 3
        raise ValueError("the store at postgresql://u:hunter2@db/x refused")
    assert not record.heart.is_alive()  # type: ignore[union-attr]
    failed = read_runs(loc)[0]
    assert failed["state"] == "failed" and "refused" in failed["error"] and "hunter2" not in failed["error"]
    text = render_status({"output": loc.url, "table": None, "runs": [failed], "stores": []})
    assert "FAILED" in text and "hunter2" not in text
    count = len(writes)
    time.sleep(0.2)
    assert len(writes) == count  # no beat after the end


def test_a_killed_run_on_this_host_is_marked_stopped_once_a_later_run_commits(tmp_path: Path) -> None:
    import subprocess
    import sys

    from pipeline.job.runs import RunRecord, read_runs
    from pipeline.output.location import OutputLocation
    from pipeline.status import render_status

    loc = OutputLocation(str(tmp_path / "out"))
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead = RunRecord(loc, "20261203T000000-dddddddd", "encode", "ray")
    dead._write({"pid": int(gone.stdout)})  # its process has exited (a kill -9)
    alive = RunRecord(loc, "20261203T000001-eeeeeeee", "encode", "ray")  # this process: still running
    elsewhere = RunRecord(loc, "20261203T000001-cccccccc", "encode", "ray")  # another container, same host name
    elsewhere._write({"pid": int(gone.stdout), "pid_namespace": "4026531836:another-boot"})
    RunRecord(loc, "20261203T000002-ffffffff", "encode", "ray").committed(1)
    found = {r["attempt"]: r for r in read_runs(loc)}
    assert found["20261203T000000-dddddddd"]["state"] == "stopped"
    assert found["20261203T000000-dddddddd"]["superseded_by"] == "20261203T000002-ffffffff"
    assert found[alive.record["attempt"]]["state"] == "running"  # a live process is never marked
    assert found["20261203T000001-cccccccc"]["state"] == "running"  # its pids are not ours to judge: it ages
    text = render_status({"output": loc.url, "table": None, "runs": list(found.values()), "stores": []})
    assert "its process is gone; run 20261203T000002-ffffffff committed since" in text


def test_status_of_an_empty_path(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from pipeline.cli import main

    assert main(["status", "--output", str(tmp_path / "nothing")]) == 0
    assert capsys.readouterr().out.splitlines() == [
        f"output: {tmp_path / 'nothing'}",
        "  table: none yet (no committed version)",
        "  runs: none recorded",
        "  stores: none loaded from this output",
    ]
    assert main(["status", "--output", str(tmp_path / "nothing"), "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["table"] is None and shown["runs"] == [] and shown["uncommitted_files"] == 0


def test_the_report_sample_stops_at_its_cap_inside_a_large_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from pipeline import report
    from pipeline.encode.sparse import SPARSE_TYPE
    from pipeline.output.location import OutputLocation

    (tmp_path / "data").mkdir()
    n = 1000
    sparse = pa.array([{"indices": [i % 7], "values": [1.0]} for i in range(n)], SPARSE_TYPE)
    pq.write_table(
        pa.table({"num_tokens": pa.array(range(n), pa.int32()), "sparse": sparse}), tmp_path / "data/a.parquet"
    )
    monkeypatch.setattr(report, "SAMPLE_ROWS", 300)
    sample = report._sample(OutputLocation(str(tmp_path)), ["data/a.parquet"])
    assert len(sample["num_tokens"]) == 300 and sum(len(s) for s in sample["sparse"]) == 300
    assert sample["note"] == "300 documents from 1 of the table's 1 files"  # not "every document"
    monkeypatch.setattr(report, "SAMPLE_ROWS", 5000)
    assert report._sample(OutputLocation(str(tmp_path)), ["data/a.parquet"])["note"] == "every document"


def test_a_progress_callback_that_fails_is_dropped_not_the_run(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, capsys: pytest.CaptureFixture[str]
) -> None:
    from pipeline.config import load_config
    from pipeline.job.runs import RunRecord, read_runs
    from pipeline.job.steps import track
    from pipeline.job.summary import Pace
    from pipeline.output.location import OutputLocation
    from pipeline.output.records import empty_entries

    config = load_config(None, {"input.paths": [str(tmp_path)], "output.path": str(tmp_path / "out")})
    calls: list[int] = []

    def broken(p: Progress) -> None:
        calls.append(p.done)
        raise BrokenPipeError("[Errno 32] Broken pipe")  # `splade-pipeline encode | head -3`

    pace = Pace()
    record = RunRecord(OutputLocation(config.output.path), "20261203T000000-abababab", "encode", "ray")
    track(pace, [], config, empty_entries(), broken, record)
    pace.progress.total = None  # (no input here: a total of 0 would cap done)
    pace.show(10, 0)
    pace.show(20, 1)
    pace.progress.finish()
    assert len(calls) == 1 and "progress is no longer shown: BrokenPipeError" in caplog.text
    assert read_runs(record.loc)[0]["done"] == 20  # the run record still follows
    assert "splade-pipeline: 0 input files" in capsys.readouterr().out

    closed = Printer()
    closed.stream = None  # standard output closed (`>&-`): sys.stdout is None
    closed(Progress(total=1))  # nothing shown, nothing raised
