"""The command line's terminal: quiet unless ``--verbose``.

What a person at the terminal reads is ours: the plan, one progress line, the summary, our
warnings and errors. Everything else a run's libraries write (Ray's start-up notices and
execution plans, Ray Data's operator logs, C++ log lines from Ray's core worker, library
warnings) goes to a log file, whose path is printed once: :func:`quiet` points the process's
standard error (file descriptor 2, so C++ writers too) at the file and keeps the terminal's for
:func:`err`; Ray is asked not to forward its workers' output (``log_to_driver``, read by
:func:`pipeline.job.cluster.ensure_ray` through :func:`forwards_worker_logs`).
"""

from __future__ import annotations

import logging
import os
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO

LOG_DIR_VARIABLE = "SPLADE_PIPELINE_LOG_DIR"
NO_BARS = "RAY_DATA_DISABLE_PROGRESS_BARS"
KEEP_LOGS = 100  # the newest log files kept in the folder
_state: dict[str, object] = {"err": None, "quiet": False}
_live_line: list[Callable[[], None]] = []  # ends a progress line drawn in place


def live_line(clear: Callable[[], None] | None) -> None:
    """Register (None: forget) how to end the progress line drawn in place on the terminal, so that
    whatever is printed next (:func:`err`, our warnings, :func:`clear_line`) starts a line of its own."""
    _live_line[:] = [clear] if clear is not None else []


def clear_line() -> None:
    """End the progress line drawn in place, if one is (before printing something else)."""
    for clear in list(_live_line):
        try:
            clear()
        except Exception:  # noqa: BLE001 - a closed stream: nothing to end
            pass


def err() -> IO[str]:
    """Where our own warnings and errors go: the terminal's standard error, also when quiet (a
    progress line drawn in place is ended first)."""
    clear_line()
    stream = _state["err"]
    return stream if stream is not None else sys.stderr  # type: ignore[return-value]


def forwards_worker_logs() -> bool:
    """Whether Ray should print its workers' output here (not when quiet)."""
    return not _state["quiet"]


def log_dir() -> Path:
    """``$SPLADE_PIPELINE_LOG_DIR``, else ``~/.cache/splade-pipeline/logs``."""
    configured = os.environ.get(LOG_DIR_VARIABLE)
    if configured:
        return Path(configured)
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return cache / "splade-pipeline" / "logs"


@contextmanager
def quiet(command: str, enabled: bool = True, keep: bool = False) -> Iterator[Path | None]:
    """While the command runs, standard error (file descriptor 2) and the libraries' logs go to a
    new log file (yielded; None when not ``enabled``); the terminal keeps :func:`err` and our
    warnings (the ``pipeline`` logger's). Everything is put back afterwards, unless ``keep`` (the
    process ends next: Ray's shutdown chatter goes to the file too)."""
    if not enabled:
        yield None
        return
    opened = _open_log(command)
    if opened is None:
        print(
            f"splade-pipeline {command}: no log file can be written ({LOG_DIR_VARIABLE}, ~/.cache, the temp "
            "folder); the libraries' logs stay on the terminal",
            file=sys.stderr,
        )
        yield None
        return
    path, fd = opened
    sys.stderr.flush()
    saved = os.dup(2)
    terminal = _terminal_stream(saved)
    os.dup2(fd, 2)  # C++ log lines, Python warnings, library handlers bound to sys.stderr: the file
    os.close(fd)
    level = logging.getLogger().level
    handlers = _log_handlers(path, terminal)
    before = {k: _state[k] for k in ("err", "quiet")}
    _state.update(err=terminal, quiet=True)
    ours = NO_BARS not in os.environ  # set here, taken back after (a notebook's later Ray Data keeps its bars)
    os.environ.setdefault(NO_BARS, "1")
    try:
        yield path
    finally:
        if not keep:
            _restore(before, handlers, level, saved, terminal)
            if ours:
                os.environ.pop(NO_BARS, None)


def _open_log(command: str) -> tuple[Path, int] | None:
    """A new log file (its path, an open descriptor) in :func:`log_dir`, else in the temp folder;
    None when neither can be written (a read-only home, a full disk)."""
    name = f"{time.strftime('%Y%m%dT%H%M%S', time.gmtime())}-{os.getpid()}-{command}.log"
    for folder in (log_dir, lambda: Path(tempfile.gettempdir()) / "splade-pipeline-logs"):
        try:
            where = folder()
            where.mkdir(parents=True, exist_ok=True)
            fd = os.open(where / name, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        except (OSError, RuntimeError):  # RuntimeError: Path.home() with no home to find
            continue
        _prune_logs(where, keep=name)
        return where / name, fd
    return None


def _prune_logs(where: Path, keep: str) -> None:
    """Only the newest :data:`KEEP_LOGS` log files stay (their names begin with their start time)."""
    try:
        logs = sorted(p for p in where.glob("*.log") if p.name != keep)
        for old in logs[: max(0, len(logs) - (KEEP_LOGS - 1))]:
            old.unlink(missing_ok=True)
    except OSError:  # another process pruning too, a read-only file: housekeeping only
        pass


def _restore(
    before: dict[str, object],
    handlers: list[tuple[logging.Logger, logging.Handler]],
    level: int,
    saved: int,
    terminal: IO[str],
) -> None:
    _state.update(before)
    logging.getLogger().setLevel(level)
    for logger, handler in handlers:
        logger.removeHandler(handler)
        handler.close()
    sys.stderr.flush()
    os.dup2(saved, 2)
    os.close(saved)
    terminal.flush()
    if terminal is not sys.stderr:
        terminal.close()  # the copy of fd 2 made for the command


def _terminal_stream(saved_fd: int) -> IO[str]:
    """The terminal's standard error: a copy of file descriptor 2 as it was, unless Python's
    ``sys.stderr`` writes elsewhere (a test's capture), which is then kept."""
    try:
        own = sys.stderr.fileno() == 2
    except (AttributeError, OSError, ValueError):
        own = False
    if not own:
        return sys.stderr
    return os.fdopen(os.dup(saved_fd), "w", buffering=1, encoding="utf-8", errors="replace")


class _Shown(logging.StreamHandler):
    """Our warnings on the terminal, each on a line of its own (a progress line drawn in place ended)."""

    def emit(self, record: logging.LogRecord) -> None:
        clear_line()
        super().emit(record)


class _Scrub(logging.Filter):
    """No secret in the log file: every record's text masked (:func:`pipeline.redaction.scrub`)."""

    def filter(self, record: logging.LogRecord) -> bool:
        from pipeline.redaction import scrub

        try:
            text = record.getMessage()
        except Exception:  # noqa: BLE001 - a library's record whose arguments do not fit its format
            text = f"{record.msg!r} % {record.args!r}"
        record.msg, record.args = scrub(text), ()
        return True


def _log_handlers(path: Path, terminal: IO[str]) -> list[tuple[logging.Logger, logging.Handler]]:
    to_file = logging.FileHandler(path, encoding="utf-8")  # beside what reaches fd 2 (appended, both)
    to_file.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    to_file.addFilter(_Scrub())
    root = logging.getLogger()
    root.addHandler(to_file)
    if root.level > logging.INFO or root.level == logging.NOTSET:
        root.setLevel(logging.INFO)
    shown = _Shown(terminal)
    shown.setLevel(logging.WARNING)
    shown.setFormatter(logging.Formatter("  %(levelname)s: %(message)s"))
    shown.addFilter(_Scrub())
    ours = logging.getLogger("pipeline")
    ours.addHandler(shown)
    return [(root, to_file), (ours, shown)]
