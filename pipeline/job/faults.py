"""Test-only fault injection: crash points for the kill-and-resume tests, a poisoned document and
an out-of-memory trigger for the chaos tests. Every hook is a no-op unless its variable is set,
which is never the case in production.

``SPLADE_PIPELINE_CRASH_AT=<point>[:<n>]`` makes the driver kill itself with SIGKILL the n-th
time (default 1st) it passes ``<point>``: ``written`` (a block's files are durable, nothing
committed), ``before_commit`` (every file written, the commit not begun), ``commit`` (the table's
version committed, the rejects table not yet), ``committed`` (both committed, the store not yet
loaded), ``upsert`` (a store request succeeded), ``delete`` (deletions done).

``SPLADE_PIPELINE_PAUSE_AT=<point>:<seconds>`` makes the driver sleep at ``<point>``: two runs
paused before their commits race for the same table version (the concurrency tests).

``SPLADE_PIPELINE_POISON=<text>``: an encoder process that is given a document containing
``<text>`` dies at once (SIGKILL), every time: a document that kills its worker.

``SPLADE_PIPELINE_OOM_ABOVE=<tokens>``: a micro-batch of more than ``<tokens>`` padded tokens
raises ``torch.OutOfMemoryError``, as a GPU too small for the token budget would.

``SPLADE_PIPELINE_LOAD_DIES=1``: every encoder actor dies (SIGKILL) while it starts, before the
model is loaded, as one whose node has too little memory for the model would.

``SPLADE_PIPELINE_TASK_DIES=<n>``: a Spark task's first attempt dies (SIGKILL) once it has written
``<n>`` blocks (see :func:`task_point`).

``SPLADE_PIPELINE_RAY_START_FAILS=<n>``: the first ``n`` starts of a local Ray in this process
fail as a start that timed out does ("Timed out waiting for file .../gcs_server_port").

The driver forwards these variables to its Ray workers (see :func:`forwarded`).
"""

from __future__ import annotations

import os
import signal
import sys
from collections import Counter
from typing import IO

VARIABLE = "SPLADE_PIPELINE_CRASH_AT"
PAUSE = "SPLADE_PIPELINE_PAUSE_AT"
POISON = "SPLADE_PIPELINE_POISON"
OOM_ABOVE = "SPLADE_PIPELINE_OOM_ABOVE"
RAY_START_FAILS = "SPLADE_PIPELINE_RAY_START_FAILS"
LOAD_DIES = "SPLADE_PIPELINE_LOAD_DIES"
TASK_DIES = "SPLADE_PIPELINE_TASK_DIES"
_passed: Counter[str] = Counter()


def crash_point(point: str) -> None:
    wanted = os.environ.get(VARIABLE)
    if not wanted:
        return
    name, _, nth = wanted.partition(":")
    if name != point:
        return
    _passed[point] += 1
    if _passed[point] == int(nth or 1):
        print(f"[{VARIABLE}] killing the driver at {point} #{_passed[point]}", file=_terminal(), flush=True)
        os.kill(os.getpid(), signal.SIGKILL)


def _terminal() -> IO[str]:
    """The driver's terminal, also while the command line is quiet (standard error to a log file)."""
    from pipeline.terminal import err

    return err()


def ray_start_point() -> None:
    fails = int(os.environ.get(RAY_START_FAILS) or 0)
    _passed["ray_start"] += 1
    if _passed["ray_start"] <= fails:
        raise TimeoutError("Timed out waiting for file /tmp/ray/session_latest/logs/gcs_server_port_0 (injected)")


def pause_point(point: str) -> None:
    name, _, seconds = os.environ.get(PAUSE, "").partition(":")
    if name == point:
        import time

        print(f"[{PAUSE}] pausing at {point} for {seconds or 1} s", file=_terminal(), flush=True)
        time.sleep(float(seconds or 1))


def poison_point(texts: list[str]) -> None:
    marker = os.environ.get(POISON)
    if marker and any(marker in t for t in texts):
        print(f"[{POISON}] a poisoned document: killing this worker (pid {os.getpid()})", file=sys.stderr, flush=True)
        os.kill(os.getpid(), signal.SIGKILL)


def load_point() -> None:
    if os.environ.get(LOAD_DIES):
        print(f"[{LOAD_DIES}] an encoder dies while it starts (pid {os.getpid()})", file=sys.stderr, flush=True)
        os.kill(os.getpid(), signal.SIGKILL)


def out_of_memory_point(padded_tokens: int) -> None:
    limit = os.environ.get(OOM_ABOVE)
    if limit and padded_tokens > int(limit):
        import torch

        raise torch.OutOfMemoryError(f"[{OOM_ABOVE}] injected: {padded_tokens} padded tokens > {limit}")


FORWARDED = (POISON, OOM_ABOVE, LOAD_DIES, TASK_DIES)  # the variables the workers' hooks read


def forwarded() -> dict[str, str]:
    """The fault variables set in this (driver) process, for the workers' runtime environment."""
    return {name: os.environ[name] for name in FORWARDED if os.environ.get(name)}


def task_point(attempt_number: int, blocks_written: int) -> None:
    """``SPLADE_PIPELINE_TASK_DIES=<n>``: a Spark task's first attempt kills its Python worker
    (SIGKILL) once it has written ``<n>`` blocks, as a lost executor would; the retry goes on."""
    after = os.environ.get(TASK_DIES)
    if after and attempt_number == 0 and blocks_written == int(after):
        print(f"[{TASK_DIES}] a Spark task dies after {blocks_written} blocks (pid {os.getpid()})", file=sys.stderr)
        os.kill(os.getpid(), signal.SIGKILL)
