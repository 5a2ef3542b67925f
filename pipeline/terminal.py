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
import re
import stat
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
    bars_back = _bars_off()
    try:
        yield path
    finally:
        if not keep:
            _restore(before, handlers, level, saved, terminal)
            bars_back()


def _bars_off() -> Callable[[], None]:
    """Turn Ray Data's progress bars off; returns what turns them back on. Ray Data reads
    ``$RAY_DATA_DISABLE_PROGRESS_BARS`` once, for its default context, when it is imported: before
    that the variable is set (and taken back after), after that the current context is changed."""
    data = sys.modules.get("ray.data")
    if data is not None:
        context = data.DataContext.get_current()
        was = context.enable_progress_bars
        context.enable_progress_bars = False
        return lambda: setattr(context, "enable_progress_bars", was)
    if NO_BARS in os.environ:
        return lambda: None

    os.environ[NO_BARS] = "1"

    def back() -> None:
        os.environ.pop(NO_BARS, None)
        imported = sys.modules.get("ray.data")
        if imported is not None:  # imported meanwhile, its default read from the variable
            imported.DataContext.get_current().enable_progress_bars = True

    return back


def _open_log(command: str) -> tuple[Path, int] | None:
    """A new log file (its path, an open descriptor) in :func:`log_dir`, else in a folder of this
    user's own in the temp folder; None when neither can be written (a read-only home, a full disk)."""
    stamp = f"{time.strftime('%Y%m%dT%H%M%S', time.gmtime())}-{os.getpid()}"
    for folder in (log_dir, _temp_log_dir):
        try:
            where = folder()
            where.mkdir(parents=True, exist_ok=True, mode=0o700)
        except (OSError, RuntimeError):  # RuntimeError: Path.home() with no home to find
            continue
        for n in range(100):  # a notebook may run two commands within a second
            name = f"{stamp}-{command}.log" if n == 0 else f"{stamp}.{n}-{command}.log"
            try:
                fd = os.open(where / name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
            except FileExistsError:
                continue
            except OSError:
                break
            _prune_logs(where, keep=name)
            return where / name, fd
    return None


def _temp_log_dir() -> Path:
    """``<temp>/splade-pipeline-logs-<uid>``, refused unless it is a folder this user owns (on a
    shared machine another user could have made it, to read or redirect the logs)."""
    uid = os.getuid() if hasattr(os, "getuid") else 0
    where = Path(tempfile.gettempdir()) / f"splade-pipeline-logs-{uid}"
    where.mkdir(mode=0o700, parents=True, exist_ok=True)
    info = os.lstat(where)
    if not stat.S_ISDIR(info.st_mode) or (hasattr(os, "getuid") and info.st_uid != uid):
        raise PermissionError(f"{where} is not a folder of this user's")
    return where


LOG_NAME = re.compile(r"^\d{8}T\d{6}-\d+(\.\d+)?-[a-z-]+\.log$")  # ours: other files in the folder are left alone


def _prune_logs(where: Path, keep: str) -> None:
    """Only the newest :data:`KEEP_LOGS` of our log files stay (their names begin with their start time)."""
    try:
        logs = sorted(p for p in where.iterdir() if LOG_NAME.match(p.name) and p.name != keep)
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


class _Scrubbed(logging.Formatter):
    """Every line masked (:func:`pipeline.redaction.scrub`) as a whole: the message, a traceback
    (``exc_info``) and a stack, so that no secret a library logs reaches the log file or the
    terminal through a record. (What is written to file descriptor 2 directly, as C++ and the JVM
    do, is not a record: it reaches the file as it is.)"""

    def format(self, record: logging.LogRecord) -> str:
        from pipeline.redaction import scrub

        try:
            text = super().format(record)
        except Exception:  # noqa: BLE001 - a library's record whose arguments do not fit its format
            text = f"{record.levelname} {record.name}: {record.msg!r} % {record.args!r}"
        return scrub(text)


def _log_handlers(path: Path, terminal: IO[str]) -> list[tuple[logging.Logger, logging.Handler]]:
    to_file = logging.FileHandler(path, encoding="utf-8")  # beside what reaches fd 2 (appended, both)
    to_file.setFormatter(_Scrubbed("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.addHandler(to_file)
    if root.level > logging.INFO or root.level == logging.NOTSET:
        root.setLevel(logging.INFO)
    shown = _Shown(terminal)
    shown.setLevel(logging.WARNING)
    shown.setFormatter(_Scrubbed("  %(levelname)s: %(message)s"))
    ours = logging.getLogger("pipeline")
    ours.addHandler(shown)
    return [(root, to_file), (ours, shown)]
