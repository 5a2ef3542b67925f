"""Run records: ``_splade/runs/<attempt>.json`` in the output, written by the driver when a run
starts, every :data:`EVERY_S` while it works (a heartbeat thread), when it has committed and when
it failed, so that ``splade-pipeline status`` can tell who is running (host, process, user), since
when, and how far.

A record is a view, not a lock: commits are safe without one (Delta's log). A record that says
``running`` and has not been updated for :data:`STALE_S` belongs to a run that was stopped (killed,
its machine lost); a re-run resumes its files.
"""

from __future__ import annotations

import getpass
import json
import os
import socket
import threading
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
    """This run's record, kept up to date while it is entered (``with``): a heartbeat thread writes
    it every :data:`EVERY_S` (also through long silent steps: a Spark stage, the commit, rewrites),
    with the latest :class:`Progress` it was called with; an error that leaves the block marks it
    ``failed`` (with the error's type and text, secrets masked)."""

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
            "pid_namespace": _pid_namespace(),
            "user": user,
            "started": _now(),
            "state": "running",
        }
        self.last = 0.0
        self.lock = threading.Lock()
        self.stopping = threading.Event()
        self.heart: threading.Thread | None = None
        self._write()

    def __enter__(self) -> RunRecord:
        self.heart = threading.Thread(target=self._beat, name="splade-pipeline-run-record", daemon=True)
        self.heart.start()
        return self

    def __exit__(self, kind: type[BaseException] | None, err: BaseException | None, tb: Any) -> None:
        self.stopping.set()
        if err is not None and self.record["state"] == "running":
            self.failed(err)
        if self.heart is not None:
            self.heart.join(timeout=5)

    def _beat(self) -> None:
        while not self.stopping.wait(EVERY_S):
            if time.monotonic() - self.last >= EVERY_S / 2:
                self._write()

    def __call__(self, progress: Progress) -> None:
        rate = progress.rate()
        counts = {
            "done": progress.done,
            "total": progress.total,
            "total_estimated": progress.estimated,
            "rejected": progress.rejected,
            "docs_per_s": round(rate, 1) if rate is not None else None,
        }
        self._write(counts, now=progress.finished or time.monotonic() - self.last >= EVERY_S)

    def committed(self, version: int) -> None:
        self.stopping.set()
        self._write({"state": "committed", "table_version": version, "finished": _now()})
        _settle(self.loc, self.record["attempt"])
        _prune(self.loc)

    def failed(self, err: BaseException) -> None:
        from pipeline.redaction import scrub

        self.stopping.set()
        text = scrub(f"{type(err).__name__}: {err}")
        self._write({"state": "failed", "error": text[:2000], "finished": _now()})

    def _write(self, changes: dict[str, Any] | None = None, now: bool = True) -> None:
        """Apply ``changes``; write the record (unless not ``now``: the heartbeat will)."""
        with self.lock:
            self.record |= changes or {}
            if not now:
                return
            self.last = time.monotonic()
            self.record["updated"] = _now()
            data = json.dumps(self.record).encode()
            try:
                self.loc.write_bytes(self.rel, data)
            except Exception:  # noqa: BLE001 - a record is a view: a failed write never stops the run
                pass


def read_runs(loc: OutputLocation) -> list[dict[str, Any]]:
    """Every run record, newest first; a ``running`` one not updated for :data:`STALE_S`, or whose
    driver ran on this host and is gone (``"process_gone"``), says ``stopped`` (with ``"stale_s"``:
    how long since its last update)."""
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
            if _gone_here(run):
                run |= {"state": "stopped", "stale_s": round(age), "process_gone": True}
            elif age > STALE_S:
                run |= {"state": "stopped", "stale_s": round(age)}
        runs.append(run)
    return runs


def _parse(stamp: str | None) -> float:
    import calendar

    if not stamp:
        return 0.0
    return float(calendar.timegm(time.strptime(stamp, "%Y-%m-%dT%H:%M:%SZ")))


def _settle(loc: OutputLocation, attempt: str) -> None:
    """Once ``attempt`` has committed: the records of earlier runs on this host that still say
    ``running`` but whose process is gone (killed: they never wrote again) say ``stopped``, and
    which run took over. Records of other hosts are judged by their age (:func:`read_runs`)."""
    try:
        host = socket.gethostname()
        loc.refresh(RUNS_DIR)
        for rel in loc.files(RUNS_DIR):
            if not rel.endswith(".json") or rel.rsplit("/", 1)[-1] == f"{attempt}.json":
                continue
            run = json.loads(loc.read_bytes(rel))
            if run.get("state") == "running" and _gone_here(run, host):
                run |= {"state": "stopped", "superseded_by": attempt}
                loc.write_bytes(rel, json.dumps(run).encode())
    except Exception:  # noqa: BLE001 - housekeeping of a view
        pass


def _gone_here(run: dict[str, Any], host: str | None = None) -> bool:
    """The run's driver ran on this host, in this process namespace, and its process is gone. A
    run elsewhere (another container of the same host name, whose pids are not ours to see) is
    judged by its record's age instead (:data:`STALE_S`)."""
    here = _pid_namespace()
    return (
        here is not None
        and run.get("pid_namespace") == here
        and run.get("host") == (host or socket.gethostname())
        and not _alive(run.get("pid"))
    )


def _pid_namespace() -> str | None:
    """This process's pid namespace and boot (Linux), so that a pid is only judged where it means
    the same process: a restarted container (pid 1 again) or machine has a new one."""
    try:
        space = os.stat("/proc/self/ns/pid").st_ino
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f"{space}:{f.read().strip()}"
    except OSError:
        return None


def _alive(pid: Any) -> bool:
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # another user's process: it exists
        return True
    return True


def _finished(run: dict[str, Any]) -> bool:
    """Committed, failed, stopped, or running and not heard from for :data:`STALE_S` (stopped)."""
    return run.get("state") != "running" or time.time() - _parse(run.get("updated")) > STALE_S


def _prune(loc: OutputLocation) -> None:
    """Keep the newest :data:`KEEP` records of finished runs (see :func:`_finished`; attempt names
    sort by their start time)."""
    try:
        names = sorted(rel for rel in loc.files(RUNS_DIR) if rel.endswith(".json"))
        done = [rel for rel in names if _finished(json.loads(loc.read_bytes(rel)))]
        for rel in done[:-KEEP]:
            loc.fs.rm_file(loc.path(rel))
    except Exception:  # noqa: BLE001 - pruning is housekeeping
        pass
