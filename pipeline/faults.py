"""Test-only crash points for the kill-and-resume tests.

``SPLADE_PIPELINE_CRASH_AT=<point>[:<n>]`` makes the driver kill itself with SIGKILL the n-th
time (default 1st) it passes ``<point>``: ``written`` (a block's files are durable, not yet
recorded), ``progress`` (a progress record was just written), ``upsert`` (a store request
succeeded), ``delete`` (deletions done), ``commit`` (the commit is written, old files not yet
cleaned). Nothing happens when the variable is unset, which is always the case in production.
"""

from __future__ import annotations

import os
import signal
import sys
from collections import Counter

VARIABLE = "SPLADE_PIPELINE_CRASH_AT"
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
        print(f"[{VARIABLE}] killing the driver at {point} #{_passed[point]}", file=sys.stderr, flush=True)
        os.kill(os.getpid(), signal.SIGKILL)
