"""One run at a time per output: a lock object beside it, with an expiry, on the same storage.

The lock is created with an exclusive create (``If-None-Match: *`` on S3, ``O_EXCL`` on local
disks), so of two runs starting together exactly one gets it. A heartbeat renews the expiry
while the run lives; a lock whose holder died expires and is taken over. Before committing, the
holder checks the lock is still its own (a run that was paused past its expiry must not commit
over a newer one). A lock held by a process of this host that no longer exists is taken over at
once (the usual case: a killed run re-run on the same machine).
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid
from typing import Any

from pipeline.errors import PipelineError
from pipeline.output.location import OutputLocation

LOCK_FILE = "_lock"
log = logging.getLogger(__name__)


class LockedError(PipelineError, RuntimeError):
    """Another run holds the output; the message says who, since when and until when."""


def _holder_died(held: dict[str, Any]) -> bool:
    """True when the holder ran on this host and its process is gone (a killed run re-run in place)."""
    if held.get("host") != socket.gethostname() or not isinstance(held.get("pid"), int):
        return False
    try:
        os.kill(held["pid"], 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False  # alive, someone else's
    return False


class RunLock:
    def __init__(self, loc: OutputLocation, what: str, ttl_s: float) -> None:
        self.loc, self.what, self.ttl_s = loc, what, ttl_s
        self.path = loc.path(LOCK_FILE)  # for messages
        self.owner = uuid.uuid4().hex
        self.since = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.lost: str | None = None

    def _record(self) -> bytes:
        record = {
            "owner": self.owner,
            "what": self.what,
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "since": self.since,
            "expires": time.time() + self.ttl_s,
        }
        return json.dumps(record).encode()

    def _read(self) -> dict[str, Any] | None:
        try:
            return json.loads(self.loc.read_bytes(LOCK_FILE))
        except FileNotFoundError:
            return None

    def acquire(self) -> RunLock:
        for _ in range(3):
            try:
                self.loc.create_exclusive(LOCK_FILE, self._record())
                break
            except FileExistsError:
                held = self._read()
                if held is None:
                    continue  # released meanwhile: try again
                if held.get("owner") == self.owner:
                    break  # our own create, retried by the client after a lost answer
                if held.get("expires", 0) > time.time() and not _holder_died(held):
                    until = time.strftime("%H:%M:%S UTC", time.gmtime(held["expires"]))
                    raise LockedError(
                        f"{self.path}: another {held.get('what', 'run')} holds this output (host {held.get('host')}, "
                        "pid "
                        f"{held.get('pid')}, since {held.get('since')}); its lock expires at {until} unless renewed. "
                        "Wait for it to finish; if it died, the lock expires by itself."
                    ) from None
                self.loc.remove([LOCK_FILE])  # expired: its holder is gone
        else:
            raise LockedError(f"{self.path}: could not take the lock (it kept changing hands)")
        self._thread = threading.Thread(target=self._heartbeat, name="splade-pipeline-lock", daemon=True)
        self._thread.start()
        return self

    def _heartbeat(self) -> None:
        while not self._stop.wait(self.ttl_s / 3):
            try:
                held = self._read()
                if held is None or held.get("owner") != self.owner:
                    self.lost = f"the lock was taken over by {held}" if held else "the lock file disappeared"
                    return
                self.loc.overwrite(LOCK_FILE, self._record())
            except Exception as err:  # noqa: BLE001 - a failed renewal is retried at the next beat
                log.warning("%s: could not renew the lock (%s: %s); retrying", self.path, type(err).__name__, err)

    def check(self) -> None:
        """Raise unless the lock is still this run's (called before committing)."""
        held = self._read()
        if self.lost or held is None or held.get("owner") != self.owner:
            lost = self.lost or "it is held by another run"
            raise LockedError(f"{self.path}: this run lost its lock ({lost}); not committing")

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        held = self._read()
        if held is not None and held.get("owner") == self.owner:
            self.loc.remove([LOCK_FILE])

    def __enter__(self) -> RunLock:
        return self if self._thread is not None else self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


def lock_output(loc: OutputLocation, what: str, ttl_s: float) -> RunLock:
    """Take the output's run lock (one run at a time); storage errors name the URL."""
    with loc.failures_named():
        return RunLock(loc, what, ttl_s).acquire()
