"""How far a run is: documents done of the total, the rate over the last minute, the time left,
rejects so far, encoders up; one live line on a terminal, a line every so often in a log, a
callback for a notebook, and the timeline the run report plots.

The total comes from the plan (:func:`expected_rows`): exact for Parquet (its footers), estimated
from the files' sizes for uncompressed JSONL and CSV (the largest file's first bytes give the bytes
per row; shown with ``~``), unknown otherwise (then the line gives done and the rate only).
"""

from __future__ import annotations

import os
import sys
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import IO, Any

RATE_WINDOW_S = 60.0  # the rate shown is over this many seconds
LOG_EVERY_S = 10.0  # without a terminal: a line this often
REDRAW_EVERY_S = 0.5  # on a terminal: the line redrawn at most this often
MAX_TIMELINE = 2000  # points kept for the report (thinned by halves past this)
SAMPLE_BYTES = 1 << 18  # read from the first text file to estimate its bytes per row
PARQUET_FOOTERS = 2000  # up to this many Parquet files, the total is read from their footers


@dataclass
class Progress:
    """What a run has done so far (``done`` counts rows read: written or rejected, reused ones
    included). ``on_update`` is called with this object after each change (a notebook's bar)."""

    total: int | None = None
    estimated: bool = False  # the total is an estimate from file sizes
    done: int = 0
    rejected: int = 0
    actors: int | None = None  # encoder actors up (None: not known to this engine)
    reused: int = 0
    on_update: Callable[[Progress], None] | None = None
    started: float = field(default_factory=lambda: time.monotonic())
    finished: bool = False
    recent: deque[tuple[float, int]] = field(default_factory=deque)
    timeline: list[tuple[float, int, int]] = field(default_factory=list)  # (seconds, done, rejected)

    def update(self, done: int, rejected: int, actors: int | None = None, exact: bool = False) -> None:
        """``done`` never goes back (an engine's count may lag behind the last one shown) unless
        ``exact``: the run's final count of rows read, which replaces a count ahead of it."""
        now = time.monotonic()
        if not exact:
            done, rejected = max(done, self.done), max(rejected, self.rejected)
        self.done, self.rejected = done, rejected
        if actors is not None:
            self.actors = actors
        self.recent.append((now, done))
        while len(self.recent) > 2 and now - self.recent[1][0] >= RATE_WINDOW_S:
            self.recent.popleft()
        self.timeline = thin([*self.timeline, (round(now - self.started, 3), done, rejected)])
        if self.on_update is not None:
            self.on_update(self)

    def finish(self) -> None:
        self.finished = True
        if self.on_update is not None:
            self.on_update(self)

    def rate(self) -> float | None:
        """Documents per second over the last minute (since the start, before a minute has passed)."""
        if not self.recent:
            return None
        t0, d0 = self.recent[0]
        t1, d1 = self.recent[-1]
        if len(self.recent) == 1 or t1 <= t0:
            elapsed = t1 - self.started
            return max(0.0, (d1 - self.reused) / elapsed) if elapsed > 0 else None
        return max(0.0, (d1 - d0) / (t1 - t0))

    def fraction(self) -> float | None:
        if not self.total or self.done > self.total:
            return None
        return self.done / self.total

    def eta_s(self) -> float | None:
        rate = self.rate()
        if self.fraction() is None or not rate:
            return None
        return max(0.0, (self.total or 0) - self.done) / rate

    def line(self) -> str:
        """``1,200 / 5,000 docs (24%) · 85.3 docs/s · ETA 44 s · 3 rejected · 2 encoders``."""
        total = self.total if self.fraction() is not None else None
        mark = "~" if self.estimated else ""
        parts = [f"{self.done:,} / {mark}{total:,} docs ({self.done / total:.0%})" if total else f"{self.done:,} docs"]
        rate = self.rate()
        parts.append(f"{rate:,.1f} docs/s" if rate is not None else "starting")
        if self.finished:
            parts.append("done")
        elif (eta := self.eta_s()) is not None:
            parts.append(f"ETA {_duration(eta)}")
        parts.append(f"{self.rejected:,} rejected")
        if self.actors is not None:
            parts.append(f"{self.actors} encoder{'s' if self.actors != 1 else ''} up")
        return " · ".join(parts)

    def to_dict(self) -> dict[str, Any]:
        """The timeline for the summary (and the report): seconds since the start, documents done
        and rejected at each point."""
        seconds, done, rejected = (list(c) for c in zip(*self.timeline, strict=True)) if self.timeline else ([], [], [])
        return {
            "seconds": seconds,
            "done": done,
            "rejected": rejected,
            "total": self.total,
            "estimated": self.estimated,
        }


def thin(points: list[Any]) -> list[Any]:
    """``points`` (a timeline), halved once past :data:`MAX_TIMELINE`, its last point kept."""
    if len(points) <= MAX_TIMELINE:
        return points
    return points[::2] + ([points[-1]] if len(points) % 2 == 0 else [])


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"


class Printer:
    """Shows a :class:`Progress` on ``stream``: redrawn in place on a terminal, a line every
    :data:`LOG_EVERY_S` otherwise. Use as ``progress.on_update``."""

    def __init__(self, stream: IO[str] | None = None, every_s: float | None = None) -> None:
        self.stream = stream or sys.stdout  # None: standard output closed (`>&-`): nothing shown
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.every_s = every_s if every_s is not None else (REDRAW_EVERY_S if self.tty else LOG_EVERY_S)
        self.last = 0.0
        self.shown: int | None = None
        self.drawn = False
        if self.tty:
            from pipeline.terminal import live_line

            live_line(self.clear)  # whatever else is printed starts a line of its own

    def __call__(self, progress: Progress) -> None:
        now = time.monotonic()
        if self.stream is None or (not progress.finished and now - self.last < self.every_s):
            return
        if progress.finished and not self.tty and self.shown == progress.done:
            return  # a log has this line already
        self.last, self.shown = now, progress.done
        if self.tty:  # cut to the terminal's width: a wrapped line cannot be redrawn in place
            line = ("  " + progress.line())[: max(20, _columns(self.stream) - 1)]
            self.stream.write("\r\x1b[2K" + line + ("\n" if progress.finished else ""))
            self.drawn = not progress.finished
        else:
            self.stream.write("  ... " + progress.line() + "\n")
        self.stream.flush()

    def clear(self) -> None:
        """End a line drawn in place (before something else is printed)."""
        if self.tty and self.drawn and self.stream is not None:
            self.stream.write("\n")
            self.stream.flush()
            self.drawn = False


def _columns(stream: IO[str]) -> int:
    """The width of the terminal ``stream`` writes to (``$COLUMNS`` first, 80 when unknown)."""
    import shutil

    if os.environ.get("COLUMNS", "").isdigit():
        return int(os.environ["COLUMNS"])
    try:
        return os.get_terminal_size(stream.fileno()).columns
    except (AttributeError, OSError, ValueError):
        return shutil.get_terminal_size((80, 24)).columns


def notebook_bar(total: int | None = None) -> Callable[[Progress], None]:
    """A progress bar for a notebook (``tqdm.auto``: a widget in Jupyter, text elsewhere), to pass as
    ``run_job(config, on_progress=notebook_bar())``."""
    return NotebookBar(total)


class NotebookBar:
    """:func:`notebook_bar`'s callback; ``bar`` is the ``tqdm`` bar. It ends at 100% whatever the
    total said (an estimate passed, or not reached)."""

    def __init__(self, total: int | None = None) -> None:
        from tqdm.auto import tqdm

        self.bar = tqdm(total=total, unit="docs", dynamic_ncols=True)

    def __call__(self, progress: Progress) -> None:
        bar, total = self.bar, progress.total
        if total is not None and (progress.finished or progress.done > total):
            total = progress.done
        if total and bar.total != total:
            bar.total = total
        bar.n = progress.done
        bar.set_postfix_str(f"{progress.rejected} rejected" + (f", {progress.actors} up" if progress.actors else ""))
        bar.refresh()
        if progress.finished:
            bar.close()


def expected_rows(shards: list[Any], input_cfg: Any) -> tuple[int | None, bool]:
    """``(total rows, estimated)`` of ``shards`` where cheap, else ``(None, False)``: Parquet from its
    footers (up to :data:`PARQUET_FOOTERS` files), uncompressed JSONL and CSV from their sizes and
    the largest one's first bytes per row; a shard restricted to ``lines`` counts those."""
    if not shards:
        return 0, False
    if all(s.lines is not None for s in shards):
        return sum(len(s.lines) for s in shards), False
    formats = {s.format for s in shards}
    try:
        if formats == {"parquet"} and len(shards) <= PARQUET_FOOTERS:
            return _parquet_rows(shards, input_cfg), False
        if formats <= {"jsonl", "csv"} and all(_plain(s.url) for s in shards):
            return _estimate_text_rows(shards, input_cfg)
    except Exception:  # noqa: BLE001 - a total is a nicety: without one the line shows done and rate
        return None, False
    return None, False


def _plain(url: str) -> bool:
    return not url.lower().endswith((".gz", ".bz2", ".zst", ".xz", ".zip", ".lz4", ".snappy"))


def _parquet_rows(shards: list[Any], input_cfg: Any) -> int:
    import pyarrow.parquet as pq
    from fsspec.core import url_to_fs

    def rows(shard: Any) -> int:
        fs, path = url_to_fs(shard.url, **input_cfg.storage_options)
        with fs.open(path, "rb") as f:
            return pq.ParquetFile(f).metadata.num_rows

    with ThreadPoolExecutor(16) as pool:
        return sum(pool.map(rows, shards))


def _estimate_text_rows(shards: list[Any], input_cfg: Any) -> tuple[int | None, bool]:
    from fsspec.core import url_to_fs

    first = max(shards, key=lambda s: s.size)
    fs, path = url_to_fs(first.url, **input_cfg.storage_options)
    with fs.open(path, "rb") as f:
        head = f.read(SAMPLE_BYTES)
    header = 1 if first.format == "csv" else 0
    if len(head) < SAMPLE_BYTES:  # the whole file
        lines = sum(1 for line in head.split(b"\n") if line.strip())
        if len(shards) == 1 and first.format == "jsonl":  # a CSV field may hold line breaks
            return max(0, lines - header), False
    else:
        lines = head.count(b"\n")
    if lines == 0:
        return None, False
    per_row = len(head) / lines
    return max(0, sum(round(s.size / per_row) - header for s in shards)), True
