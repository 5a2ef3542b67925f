"""The committed output as a Delta Lake table, through delta-rs.

Workers write Parquet files into the table's folder; the driver commits them here as one
version with add (and remove) actions carrying each file's size and statistics. Data never
passes through the driver. Commits are **conditional**: a commit is built on the version the
run read (``base``) and lands only as the next version (``max_commit_retries=0``: delta-rs
writes ``_delta_log/<base+1>.json`` with a conditional PUT, or an exclusive create locally).
When another run committed first, nothing of this run lands and :class:`ConcurrentCommitError`
says so; its written files stay (unreferenced) for a re-run to reuse. No lock decides anything.

Every commit carries an application transaction id unique to the attempt: a commit retried
after its answer was lost (a dropped connection after the PUT landed) finds its own id in the
table and is not applied twice. Our record of the run (kind, fingerprint, entries) travels in
the commit info under :data:`RECORD_KEY`, where every Delta reader can see it.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass
from typing import Any

import pyarrow as pa

from pipeline.output.location import OutputError, OutputLocation

LOG_DIR = "_delta_log"
RECORD_KEY = "splade_pipeline"
APP_PREFIX = "splade-pipeline/"
RECORD_LOOKBACK = 1000  # versions searched back for the newest commit carrying our record, then HEAD_FILE
HEAD_FILE = "_splade/head.json"  # after each commit: its version and record (for when the log was cleaned up)
NO_DATA_CHANGE = ("VACUUM START", "VACUUM END")  # commits a run may be rebased over
COMMIT_TRIES = 4


class ConcurrentCommitError(OutputError):
    """Another run committed to the table since this run read it; nothing of this run was committed."""


@dataclass(frozen=True)
class FileAdd:
    """A file written into the table's folder, to be committed: path relative to the table root."""

    path: str
    size: int
    stats: str  # Delta statistics JSON: numRecords, minValues, maxValues, nullCount


@dataclass(frozen=True)
class Snapshot:
    version: int
    files: dict[str, int]  # path relative to the table root -> size in bytes
    schema: pa.Schema
    record: dict[str, Any] | None  # our record in the newest commit carrying one
    record_version: int | None


def delta_options(loc: OutputLocation, extra: dict[str, str]) -> dict[str, str]:
    """delta-rs storage options for ``loc``: credentials come from the environment or the instance
    role (delta-rs reads ``AWS_*`` like botocore); an ``http://`` endpoint is allowed when set."""
    options: dict[str, str] = {}
    if not loc.is_local:
        so = loc.storage_options
        endpoint = so.get("endpoint_url") or (so.get("client_kwargs") or {}).get("endpoint_url")
        endpoint = endpoint or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        if endpoint:
            options["AWS_ENDPOINT_URL"] = endpoint
            if endpoint.startswith("http://"):
                options["AWS_ALLOW_HTTP"] = "true"
        region = (so.get("client_kwargs") or {}).get("region_name")
        if region:
            options["AWS_REGION"] = region
    return options | {k: str(v) for k, v in extra.items()}


class DeltaOutput:
    """One Delta table: the output (``sub=""``) or the rejects table beside its data (``sub="_rejects"``)."""

    def __init__(self, loc: OutputLocation, sub: str = "", options: dict[str, str] | None = None) -> None:
        self.loc, self.sub = loc, sub
        self.rel = f"{sub}/" if sub else ""
        base = loc.root if loc.is_local else loc.url_of("").rstrip("/")
        self.uri = f"{base}/{sub}" if sub else base
        self.options = delta_options(loc, options or {})

    @property
    def url(self) -> str:
        return f"{self.loc.url.rstrip('/')}/{self.sub}" if self.sub else self.loc.url

    def exists(self) -> bool:
        from deltalake import DeltaTable

        self.loc.refresh(self.rel + LOG_DIR)
        return DeltaTable.is_deltatable(self.uri, storage_options=self.options)

    def open(self, version: int | None = None) -> Any:
        from deltalake import DeltaTable

        return DeltaTable(self.uri, version=version, storage_options=self.options)

    def snapshot(self, version: int | None = None) -> Snapshot | None:
        """The table at ``version`` (default: the latest), or None where no table exists."""
        if not self.exists():
            return None
        dt = self.open(version)
        actions = pa.table(dt.get_add_actions(flatten=True))
        files = dict(zip(actions["path"].to_pylist(), actions["size_bytes"].to_pylist(), strict=True))
        schema = pa.schema(dt.schema().to_arrow())
        record, at = self.record(dt.version())
        return Snapshot(dt.version(), files, schema, record, at)

    def commit_info(self, version: int) -> dict[str, Any] | None:
        """The commitInfo action of ``version`` (None where its log file was cleaned up)."""
        rel = f"{self.rel}{LOG_DIR}/{version:020d}.json"
        try:
            text = self.loc.read_bytes(rel).decode()
        except FileNotFoundError:
            return None
        for line in text.splitlines():
            action = json.loads(line) if line.strip() else {}
            if "commitInfo" in action:
                return action["commitInfo"]
        return {}

    def record(self, version: int) -> tuple[dict[str, Any] | None, int | None]:
        """Our record in the newest commit at or before ``version`` that carries one (commits of
        vacuum and other writers carry none); where the log of that commit was cleaned up, the one
        written beside the table after it (:data:`HEAD_FILE`)."""
        for v in range(version, max(-1, version - RECORD_LOOKBACK), -1):
            info = self.commit_info(v)
            if info is None:
                break
            if RECORD_KEY in info:
                return info[RECORD_KEY], v
        try:
            head = json.loads(self.loc.read_bytes(self.rel + HEAD_FILE))
        except FileNotFoundError:
            return None, None
        return (head["record"], head["version"]) if head["version"] <= version else (None, None)

    def history(self) -> list[dict[str, Any]]:
        """Every version whose log is still kept, newest first: time, operation, our record."""
        if not self.exists():
            return []
        latest = self.open().version()
        out = []
        for v in range(latest, -1, -1):
            info = self.commit_info(v)
            if info is None:
                break
            out.append({"version": v, "timestamp": info.get("timestamp"), "operation": info.get("operation"), **info})
        return out

    def commit(
        self,
        base: Snapshot | None,
        adds: list[FileAdd],
        removes: list[str],
        schema: pa.Schema,
        record: dict[str, Any],
        attempt: str,
    ) -> int:
        """Commit ``adds`` and ``removes`` as version ``base.version + 1`` (0 for a new table).

        The table's schema becomes ``schema``; where it differs from the table's, every file
        of the table must be replaced (``removes`` then covers them all). Raises
        :class:`ConcurrentCommitError` when another commit took that version.
        """
        app_id = APP_PREFIX + attempt
        tries = 0
        while True:
            target = 0 if base is None else base.version + 1
            tries += 1
            try:
                self._commit_once(base, adds, removes, schema, record, app_id, target)
                landed: int | None = target
            except Exception as err:  # noqa: BLE001 - decided below: ours landed, someone else's, or retried
                landed = self._landed(app_id)  # the commit may have landed and only its answer been lost
                if landed is None:
                    other = self.snapshot()
                    if other is not None and (base is None or other.version > base.version):
                        if base is None or not self._only_vacuum_since(base, other, adds):
                            raise self._concurrent(other, target) from None
                        base = other  # vacuum changed no file this commit relies on: build on its version
                        continue
                    if tries >= COMMIT_TRIES or not _transient(err):
                        raise OutputError(f"{self.url}: cannot commit the table: {type(err).__name__}: {err}") from None
                    time.sleep(0.5 * 2**tries)
                    continue
            self.loc.write_bytes(self.rel + HEAD_FILE, json.dumps({"version": landed, "record": record}).encode())
            return landed

    def _only_vacuum_since(self, base: Snapshot, other: Snapshot, adds: list[FileAdd]) -> bool:
        """Whether every commit after ``base`` up to ``other`` is a vacuum's (no data change), and
        this commit's new files survived it (a vacuum whose retention is shorter than a run
        deletes them: then the commit must not land)."""
        infos = [self.commit_info(v) or {} for v in range(base.version + 1, other.version + 1)]
        if not all(info.get("operation") in NO_DATA_CHANGE for info in infos) or other.files != base.files:
            return False
        self.loc.refresh()
        present = self.loc.sizes(self.sub)
        missing = [a.path for a in adds if f"{self.rel}{a.path}" not in present]
        if missing:
            raise OutputError(
                f"{self.url}: a vacuum deleted {len(missing)} files this run wrote (e.g. {missing[0]}) before it "
                "could commit them: output.retention_days is shorter than the run. Nothing was committed; run the "
                "command again with a longer retention."
            )
        return True

    def _commit_once(
        self,
        base: Snapshot | None,
        adds: list[FileAdd],
        removes: list[str],
        schema: pa.Schema,
        record: dict[str, Any],
        app_id: str,
        target: int,
    ) -> None:
        from deltalake import Schema
        from deltalake.transaction import (
            AddAction,
            CommitProperties,
            RemoveAction,
            Transaction,
            create_table_with_add_actions,
        )

        now = int(time.time() * 1000)
        add_actions = [AddAction(a.path, a.size, {}, now, True, a.stats) for a in adds]
        properties = CommitProperties(
            custom_metadata={RECORD_KEY: record},
            max_commit_retries=0,
            app_transactions=[Transaction(app_id, target)],
        )
        delta_schema = Schema.from_arrow(schema)
        if base is None:
            self.loc.ensure_folder(self.sub)
            create_table_with_add_actions(
                self.uri,
                delta_schema,
                add_actions,
                mode="error",  # a table created meanwhile by another run is a conflict, not an append
                storage_options=self.options,
                commit_properties=properties,
            )
            return
        dt = self.open(base.version)
        if _same_schema(delta_schema, base.schema):
            remove_actions = [RemoveAction(p, True, now, base.files.get(p)) for p in removes]
            dt.create_write_transaction(
                [*remove_actions, *add_actions], mode="append", schema=schema, commit_properties=properties
            )
            return
        if set(removes) != set(base.files):
            raise OutputError(
                f"{self.url}: the output's columns would change ({_describe(base.schema)} -> {_describe(schema)}) "
                "while some of its files are kept; set output.overwrite: true to write it anew"
            )
        dt.create_write_transaction(add_actions, mode="overwrite", schema=schema, commit_properties=properties)

    def _landed(self, app_id: str) -> int | None:
        try:
            if not self.exists():
                return None
            return self.open().transaction_version(app_id)
        except Exception:  # noqa: BLE001 - unreadable now: treated as not landed, the caller re-checks
            return None

    def _concurrent(self, other: Snapshot, target: int) -> ConcurrentCommitError:
        info = self.commit_info(target) or {}
        by = (info.get(RECORD_KEY) or {}).get("kind") or info.get("operation") or "another writer"
        when = (
            time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(info["timestamp"] / 1000))
            if "timestamp" in info
            else "?"
        )
        return ConcurrentCommitError(
            f"{self.url}: another run ({by}) committed version {target} at {when} while this run was working "
            f"(the table is now at version {other.version}). Nothing of this run was committed and nothing of the "
            "other run was touched; run the same command again: it starts from the new version and reuses the "
            "files this run wrote."
        )

    def vacuum(self, retention_hours: float, dry_run: bool) -> list[str]:
        """Delete files no version within ``retention_hours`` references, and files never committed
        (a killed run's) older than that; returns them (relative to the table root)."""
        if not self.exists():
            return []
        return list(
            self.open().vacuum(
                retention_hours=math.ceil(retention_hours),
                dry_run=dry_run,
                enforce_retention_duration=False,
                full=True,
            )
        )


def _same_schema(delta_schema: Any, current: pa.Schema) -> bool:
    from deltalake import Schema

    return bool(delta_schema.to_json() == Schema.from_arrow(current).to_json())


def _describe(schema: pa.Schema) -> str:
    return ", ".join(f"{f.name}: {f.type}" for f in schema)


def _transient(err: BaseException) -> bool:
    text = f"{type(err).__name__}: {err}".lower()
    return any(
        word in text for word in ("timeout", "timed out", "connection", "503", "500", "slowdown", "reset", "io error")
    )
