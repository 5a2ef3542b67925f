"""Run records: ``_splade/runs/<attempt>.json`` in the output, written by the driver when a run
starts, every :data:`EVERY_S` while it works, and when it has committed, so that
``splade-pipeline status`` can tell who is running (host, process, user), since when, and how far.

A record is a view, not a lock: commits are safe without one (Delta's log). A record that says
``running`` and has not been updated for :data:`STALE_S` belongs to a run that was stopped (killed,
its machine lost); a re-run resumes its files.
"""

from __future__ import annotations

import getpass
import json
import os
import socket
import time
from typing import Any

from pipeline.job.progress import Progress
from pipeline.output.location import OutputLocation

RUNS_DIR = "_splade/runs"
EVERY_S = 30.0
STALE_S = 180.0
KEEP = 20  # finished records kept (the oldest removed)


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


class RunRecord:
    """This run's record; call it with the :class:`Progress` (it writes at most every :data:`EVERY_S`)."""

    def __init__(self, loc: OutputLocation, attempt: str, kind: str, engine: str) -> None:
        self.loc, self.rel = loc, f"{RUNS_DIR}/{attempt}.json"
        try:
            user = getpass.getuser()
        except Exception:  # noqa: BLE001 - no user name in some containers
            user = None
        self.record: dict[str, Any] = {
            "attempt": attempt,
            "kind": kind,
            "engine": engine,
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "user": user,
            "started": _now(),
            "state": "running",
        }
        self.last = 0.0
        self._write()

    def __call__(self, progress: Progress) -> None:
        if time.monotonic() - self.last < EVERY_S and not progress.finished:
            return
        rate = progress.rate()
        self.record |= {
            "done": progress.done,
            "total": progress.total,
            "total_estimated": progress.estimated,
            "rejected": progress.rejected,
            "docs_per_s": round(rate, 1) if rate is not None else None,
        }
        self._write()

    def committed(self, version: int) -> None:
        self.record |= {"state": "committed", "table_version": version, "finished": _now()}
        self._write()
        _prune(self.loc)

    def _write(self) -> None:
        self.last = time.monotonic()
        self.record["updated"] = _now()
        try:
            self.loc.write_bytes(self.rel, json.dumps(self.record).encode())
        except Exception:  # noqa: BLE001 - a record is a view: a failed write never stops the run
            pass


def read_runs(loc: OutputLocation) -> list[dict[str, Any]]:
    """Every run record, newest first; a ``running`` one not updated for :data:`STALE_S` says
    ``stopped`` (with ``"stale_s"``: how long since its last update)."""
    loc.refresh(RUNS_DIR)
    names = [rel.rsplit("/", 1)[-1] for rel in loc.files(RUNS_DIR)]
    runs = []
    for name in sorted(names, reverse=True):
        if not name.endswith(".json"):
            continue
        try:
            run = json.loads(loc.read_bytes(f"{RUNS_DIR}/{name}"))
        except (FileNotFoundError, ValueError):
            continue
        if run.get("state") == "running":
            age = time.time() - _parse(run.get("updated"))
            if age > STALE_S:
                run |= {"state": "stopped", "stale_s": round(age)}
        runs.append(run)
    return runs


def _parse(stamp: str | None) -> float:
    import calendar

    if not stamp:
        return 0.0
    return float(calendar.timegm(time.strptime(stamp, "%Y-%m-%dT%H:%M:%SZ")))


def _prune(loc: OutputLocation) -> None:
    """Keep the newest :data:`KEEP` committed records (attempt names sort by their start time)."""
    try:
        names = [rel for rel in loc.files(RUNS_DIR) if rel.endswith(".json")]
        done = [rel for rel in names if json.loads(loc.read_bytes(rel)).get("state") == "committed"]
        for rel in done[:-KEEP]:
            loc.fs.rm_file(loc.path(rel))
    except Exception:  # noqa: BLE001 - pruning is housekeeping
        pass
