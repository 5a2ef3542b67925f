"""The store protocol every vector store implements, the limits each store declares, and the
request cutting and retry rules they share. No Ray, no job code.

Ids in a store are a pure function of the document id (see each store's ``point_id``), so a
re-run overwrites instead of duplicating. Only transient failures are retried (throttling,
5xx, timeouts, refused connections), with exponential backoff and jitter up to a deadline;
then the error names the store, the batch and the cause.
"""

from __future__ import annotations

import random
import re
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Protocol, TypeVar

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.config import SinkConfig
from pipeline.errors import PipelineError
from pipeline.redaction import scrub

T = TypeVar("T")
TRANSIENT_STATUS = {429, 500, 502, 503, 504}
# Whole-token HTTP codes only: "exceeds the maximum size of 50000" is no 500.
_STATUS_IN_TEXT = re.compile(r"(?<![\d.])(429|500|502|503|504)(?![\d.])")
TRANSIENT_PHRASES = (
    "too many requests",
    "service unavailable",
    "bad gateway",
    "gateway timeout",
    "internal server error",
    "timed out",
    "timeout",
    "connection refused",
    "connection reset",
    "temporarily unavailable",
    "server closed the connection",
    "slowdown",
    "terminating connection",
    "the database system is",
    "connection is lost",
    "connection is closed",
    "could not receive data",
    "eof detected",
)


class SinkError(PipelineError, RuntimeError):
    """The store refused or failed; the message names the store, what was being done and why."""


class SinkSettingError(PipelineError, ValueError):
    """The sink settings cannot work with this store or these vectors; nothing was started."""


@dataclass(frozen=True)
class StoreLimits:
    """What a store accepts, declared by the store's own module (``limits(cfg)``)."""

    embedded: bool  # kept in local files by one process: the driver is its only writer
    accepts_empty_vectors: bool  # False: an empty vector is a counted reject, not an upsert
    max_nonzeros: int | None = None  # per vector
    nonzeros_reason: str = ""  # who imposes max_nonzeros, for the error message
    nonzeros_remedy: str = ""  # another way out than a smaller top_k, if any
    max_vectors_per_request: int | None = None
    max_request_bytes: int | None = None
    count_settle_s: float = 0.0  # how long its count may lag an upsert or delete that returned
    max_search_k: int = 10_000  # hits one search returns at most


class Sink(Protocol):
    name: str

    def ensure(self) -> None: ...
    def upsert(self, ids: list[str], indices: list[np.ndarray], values: list[np.ndarray]) -> None: ...
    def delete(self, ids: list[str]) -> None: ...
    def search(self, indices: np.ndarray, values: np.ndarray, k: int) -> list[tuple[str, float]]: ...
    def ids(self) -> Iterator[list[str | None]]: ...  # every document id held, by pages; None: not ours
    def fetch(self, ids: list[str]) -> dict[str, tuple[np.ndarray, np.ndarray]]: ...  # absent ids: absent
    def finish(self) -> None: ...  # make everything upserted so far searchable (Milvus: flush)
    def count(self) -> int: ...
    def close(self) -> None: ...

    @classmethod
    def limits(cls, cfg: SinkConfig) -> StoreLimits: ...


def request_limits(cfg: SinkConfig, limits: StoreLimits) -> tuple[int, int]:
    """Vectors and bytes per request: the configured ones, within the store's hard limits."""
    count, size = cfg.batch_size, cfg.max_request_bytes
    if limits.max_vectors_per_request is not None:
        count = min(count, limits.max_vectors_per_request)
    if limits.max_request_bytes is not None:
        size = min(size, limits.max_request_bytes)
    return count, size


def check_caps(cfg: SinkConfig, limits: StoreLimits, top_k: int | None) -> None:
    """The store's per-vector cap against the encoding's ``top_k``, checked before any work."""
    cap = limits.max_nonzeros
    if cap is not None and (top_k is None or top_k > cap):
        raise SinkSettingError(
            f"encoder.top_k: {limits.nonzeros_reason} takes at most {cap} non-zeros per vector, but encoder.top_k is "
            f"{top_k}; set encoder.top_k to {cap} or less"
            + (f", {limits.nonzeros_remedy}" if limits.nonzeros_remedy else "")
        )


def is_transient(err: BaseException) -> bool:
    """Throttling, server errors, timeouts and dropped connections: worth another try."""
    if isinstance(err, (TimeoutError, ConnectionError)):
        return True
    for attr in ("status", "status_code"):  # HTTP clients' structured status, when they give one
        status = getattr(err, attr, None)
        if isinstance(status, int) and 100 <= status < 600:
            return status in TRANSIENT_STATUS
    text = f"{type(err).__name__} {err}".lower()
    return bool(_STATUS_IN_TEXT.search(text)) or any(phrase in text for phrase in TRANSIENT_PHRASES)


def with_retries(action: Callable[[], T], what: str, deadline_s: float, store: str) -> T:
    """Run ``action``; retry transient errors with exponential backoff and jitter until ``deadline_s``."""
    start, delay = time.monotonic(), 0.2
    while True:
        try:
            return action()
        except Exception as err:  # noqa: BLE001 - classified right below
            if not is_transient(err) or time.monotonic() - start + delay > deadline_s:
                raise SinkError(scrub(f"{store}: {what} failed: {type(err).__name__}: {err}")) from err
            time.sleep(delay * (0.5 + random.random()))
            delay = min(delay * 2, 10.0)


def request_batches(rows: pa.Table, max_count: int, max_bytes: int) -> Iterator[pa.Table]:
    """Cut ``rows`` (id + sparse) into requests of at most ``max_count`` vectors and ``max_bytes``.

    Bytes are estimated generously for a JSON body (about 32 bytes a term, the id twice for id
    and metadata, plus framing); a single vector larger than ``max_bytes`` still goes alone.
    """
    nnz = pc.list_value_length(pc.struct_field(rows["sparse"], "indices")).to_numpy()
    sizes = nnz * 32 + 96 + 2 * np.array([len(i.encode()) for i in rows["id"].to_pylist()], dtype=np.int64)
    start = 0
    while start < rows.num_rows:
        stop, total = start, 0
        while stop < rows.num_rows and stop - start < max_count and (stop == start or total + sizes[stop] <= max_bytes):
            total += sizes[stop]
            stop += 1
        yield rows.slice(start, stop - start)
        start = stop
