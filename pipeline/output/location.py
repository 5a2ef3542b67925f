"""The output location, resolved once: a filesystem and a root, and every file operation the
output needs, addressed by paths relative to the root (``data/part-....parquet``).

Every file written here is either absent or complete, whatever happens meanwhile: object
stores have no atomic rename, but an object appears whole once its upload completes (one PUT,
or a multipart upload completed on close); on local disks files are written aside and renamed.
"""

from __future__ import annotations

import io
import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.config import OutputConfig
from pipeline.errors import PipelineError
from pipeline.storage import url_to_fs


class OutputError(PipelineError, ValueError):
    """The output location cannot be used as configured; the message names the URL."""


class OutputLocation:
    """``url`` (as configured) resolved to a filesystem and a root path on it."""

    def __init__(self, url: str, storage_options: dict[str, Any] | None = None) -> None:
        self.url = url
        self.storage_options = dict(storage_options or {})
        try:
            self.fs, root = url_to_fs(url, self.storage_options)
        except Exception as err:  # noqa: BLE001 - unknown protocol, missing fsspec package, bad options
            raise OutputError(f"{url}: cannot use output location: {type(err).__name__}: {err}") from None
        self.root = root.rstrip("/")
        protocol = self.fs.protocol if isinstance(self.fs.protocol, str) else self.fs.protocol[0]
        self.is_local = protocol in ("file", "local")

    @classmethod
    def of(cls, cfg: OutputConfig) -> OutputLocation:
        return cls(cfg.path, cfg.storage_options)

    def __reduce__(self) -> tuple[Any, ...]:  # sent to Ray workers: they resolve their own client
        return (OutputLocation, (self.url, self.storage_options))

    def path(self, rel: str = "") -> str:
        """The filesystem path of ``rel`` (relative to the root)."""
        return f"{self.root}/{rel}" if rel else self.root

    def url_of(self, rel: str) -> str:
        """A full URL of ``rel`` (``s3://bucket/...``, ``file:///...``)."""
        return self.fs.unstrip_protocol(self.path(rel))

    def relative(self, path: str) -> str:
        """``path`` (as this filesystem lists it: no protocol) relative to the root."""
        prefix = self.root + "/"
        if not path.startswith(prefix):
            raise ValueError(f"{path} is not under the output root {self.root}")
        return path[len(prefix) :]

    def ensure_folder(self, rel: str = "") -> None:
        """Create a local folder; object stores have no folders (and a bucket is never created implicitly)."""
        if self.is_local:
            self.fs.makedirs(self.path(rel), exist_ok=True)

    def exists(self, rel: str) -> bool:
        return self.fs.exists(self.path(rel))

    def refresh(self, rel: str = "") -> None:
        """Forget cached listings under ``rel``, its subfolders' too: other processes (Ray workers)
        write here. (fsspec's ``invalidate_cache(path)`` forgets a path and its parents only: a
        folder listed before stayed cached under a refreshed root, and a file written since was
        "not found" on opening it.)"""
        path = self.path(rel).rstrip("/")
        self.fs.invalidate_cache(path)
        cache = getattr(self.fs, "dircache", None)
        if cache is not None:
            for key in [k for k in list(cache) if str(k).startswith(path + "/")]:
                cache.pop(key, None)

    def files(self, rel: str = "") -> list[str]:
        """Every file under ``rel``, relative to the root (markers like empty ``prefix/`` objects left out)."""
        if not self.fs.isdir(self.path(rel)):
            return []
        return sorted(self.relative(p) for p in self.fs.find(self.path(rel)) if not p.endswith("/"))

    def sizes(self, rel: str = "") -> dict[str, int]:
        """Every file under ``rel`` with its size in bytes, relative to the root."""
        if not self.fs.isdir(self.path(rel)):
            return {}
        found = self.fs.find(self.path(rel), detail=True)
        return {self.relative(p): int(info["size"]) for p, info in found.items() if not p.endswith("/")}

    def open(self, rel: str, mode: str = "rb") -> Any:
        return self.fs.open(self.path(rel), mode)

    def read_bytes(self, rel: str) -> bytes:
        return self.fs.cat_file(self.path(rel))

    def write_bytes(self, rel: str, data: bytes) -> None:
        """Write ``data`` so that ``rel`` is either absent or complete, whatever happens meanwhile."""
        if not self.is_local:
            with self.fs.open(self.path(rel), "wb") as fh:
                fh.write(data)
            return
        target = self.path(rel)
        folder = target.rsplit("/", 1)[0]
        os.makedirs(folder, exist_ok=True)
        tmp = f"{folder}/.{target.rsplit('/', 1)[1]}.{uuid.uuid4().hex[:12]}.tmp"  # hidden: no Delta reader lists it
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())  # the content is on disk before the name is
        os.replace(tmp, target)  # a rename on one local filesystem: atomic
        dir_fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(dir_fd)  # and so is the name
        finally:
            os.close(dir_fd)

    def overwrite(self, rel: str, data: bytes) -> None:
        """Replace ``rel`` in one write (no write-aside: for small records that may be rewritten)."""
        with self.fs.open(self.path(rel), "wb") as fh:
            fh.write(data)

    def write_parquet(self, rel: str, table: pa.Table, compression: str | None = "zstd") -> int:
        """Write ``table`` as Parquet to ``rel`` (absent or complete); returns the file's size."""
        buf = io.BytesIO()
        pq.write_table(table, buf, compression=compression)
        self.write_bytes(rel, buf.getvalue())
        return buf.tell()

    def read_parquet(self, rel: str, columns: list[str] | None = None) -> pa.Table:
        with self.open(rel) as fh:
            return pq.read_table(fh, columns=columns)

    @contextmanager
    def failures_named(self, doing: str = "use") -> Iterator[None]:
        """Storage failures inside become an :class:`OutputError` naming the URL."""
        try:
            yield
        except PipelineError:
            raise
        except Exception as err:  # noqa: BLE001 - any storage failure is reported with the URL
            raise OutputError(f"{self.url}: cannot {doing} output location: {type(err).__name__}: {err}") from None

    def __repr__(self) -> str:
        return f"OutputLocation({self.url!r})"
