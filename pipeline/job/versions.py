"""The table's versions: history, rollback and vacuum (``splade-pipeline history|rollback|vacuum``)."""

from __future__ import annotations

import time
from typing import Any

from pipeline.config import JobConfig
from pipeline.output.layout import REJECTS_DIR
from pipeline.output.location import OutputError, OutputLocation
from pipeline.output.records import new_attempt, read_entries
from pipeline.output.state import read_committed, sync_rejects
from pipeline.output.table import RECORD_KEY, DeltaOutput


def history(config: JobConfig) -> list[dict[str, Any]]:
    """Every version whose log is kept, newest first: version, time, operation, rows added and
    removed, the fingerprint id and what made it."""
    loc = OutputLocation.of(config.output)
    table = DeltaOutput(loc, options=config.output.table_options)
    with loc.failures_named("read the history of the"):
        versions = table.history()
    if not versions:
        raise OutputError(f"{loc.url}: no Delta table here (no _delta_log/)")
    out = []
    for info in versions:
        record = info.get(RECORD_KEY) or {}
        out.append(
            {
                "version": info["version"],
                "time": _when(info.get("timestamp")),
                "operation": info.get("operation"),
                "kind": record.get("kind"),
                "rows": record.get("rows"),
                "rows_added": record.get("rows_added"),
                "rows_removed": record.get("rows_removed"),
                "fingerprint": record.get("fingerprint_id"),
                "restored": record.get("restored"),
            }
        )
    return out


def render_history(rows: list[dict[str, Any]]) -> str:
    head = (
        f"{'version':>7}  {'time (UTC)':<19}  {'operation':<14} {'by':<9} {'rows':>10} {'+rows':>10} {'-rows':>10}  fp"
    )
    lines = [head]
    for r in rows:
        by = r["kind"] or "-"
        if r["restored"] is not None:
            by = f"rollback to {r['restored']}"
        lines.append(
            f"{r['version']:>7}  {r['time']:<19}  {str(r['operation']):<14} {by:<9} {_n(r['rows']):>10} "
            f"{_n(r['rows_added']):>10} {_n(r['rows_removed']):>10}  {r['fingerprint'] or '-'}"
        )
    return "\n".join(lines)


def rollback(config: JobConfig, version: int) -> dict[str, Any]:
    """Make version ``version``'s content the latest (a new version), the rejects table and the
    store (when configured) along with it."""
    from deltalake.transaction import CommitProperties

    loc = OutputLocation.of(config.output)
    options = config.output.table_options
    current = read_committed(loc, options)
    if current is None:
        raise OutputError(f"{loc.url}: no Delta table here (no _delta_log/)")
    if not 0 <= version < current.version:
        raise OutputError(f"{loc.url}: --to-version must be an earlier version: 0 to {current.version - 1}")
    table = DeltaOutput(loc, options=options)
    with loc.failures_named(f"read version {version} of the"):
        target = table.snapshot(version)
        assert target is not None
        record, _ = table.record(version)
        entries = read_entries(loc, record["entries"]) if record and "entries" in record else None
    rejects = [f for f in entries["rejects_file"].to_pylist() if f] if entries is not None else []
    loc.refresh()
    present = loc.sizes()
    missing = sorted(f for f in [*target.files, *rejects] if f not in present)  # one listing, not a HEAD each
    if missing:
        raise OutputError(
            f"{loc.url}: version {version} cannot be restored: {len(missing)} of its files were vacuumed "
            f"(e.g. {missing[0]})"
        )
    attempt = new_attempt()
    record = (record or {}) | {"restored": version, "rolled_back_from": current.version, "attempt": attempt}
    with loc.failures_named("restore the"):
        table.open().restore(
            version, commit_properties=CommitProperties(custom_metadata={RECORD_KEY: record}, max_commit_retries=0)
        )
        now = table.snapshot()
    assert now is not None
    if entries is not None:
        sync_rejects(loc, options, now.version, entries, attempt)
    result: dict[str, Any] = {"version": now.version, "restored": version, "rolled_back_from": current.version}
    if config.sink.type:
        from pipeline.job.load import sync_store

        result["sink"] = sync_store(config, loc)
    return result


def vacuum(config: JobConfig, dry_run: bool) -> dict[str, Any]:
    """Delete the files no version of the last ``output.retention_days`` reads (and files never
    committed, older than that), in the table and the rejects table."""
    loc = OutputLocation.of(config.output)
    hours = config.output.retention_days * 24
    removed: dict[str, list[str]] = {}
    with loc.failures_named("vacuum the"):
        for name, sub in (("table", ""), ("rejects", REJECTS_DIR)):
            removed[name] = DeltaOutput(loc, sub, config.output.table_options).vacuum(hours, dry_run)
    return {"dry_run": dry_run, "retention_days": config.output.retention_days, "files": removed}


def _when(ms: int | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(ms / 1000)) if ms else "?"


def _n(value: int | None) -> str:
    return "-" if value is None else str(value)
