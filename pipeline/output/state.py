"""The committed state of an output and how a run commits a new one.

A run ends with the entries of the whole table state it wants (the files it keeps, rewrote and
wrote). :func:`commit_state` writes those entries, then commits the difference with the state
it started from (``base``) to the Delta table as one version: removes for the files that go,
adds for the new ones. Then the rejects table is brought to the same state (:func:`sync_rejects`):
a second table cannot be committed atomically with the first, so it follows it, and any later
run finishes the job if this one was killed in between.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline.output.layout import REJECTS_DIR, REJECTS_SCHEMA
from pipeline.output.location import OutputError, OutputLocation
from pipeline.output.records import empty_entries, first_of_each, listed_files, read_entries, write_entries
from pipeline.output.table import RECORD_KEY, ConcurrentCommitError, DeltaOutput, FileAdd, Snapshot

REJECTS_SYNC_TRIES = 5


@dataclass(frozen=True)
class Committed:
    """The table as a run finds it: its snapshot and, where splade-pipeline made it, our record and
    the entries of its files."""

    snapshot: Snapshot
    record: dict[str, Any] | None
    entries: pa.Table | None
    problem: str | None  # why the table cannot be resumed or updated incrementally (None: it can)

    @property
    def version(self) -> int:
        return self.snapshot.version


def read_committed(loc: OutputLocation, options: dict[str, str], version: int | None = None) -> Committed | None:
    """The output's committed state (at ``version``; default: the latest); None where no table exists yet."""
    out = DeltaOutput(loc, options=options)
    with loc.failures_named("read the Delta table at the"):
        snap = out.snapshot(version)
        if snap is None:
            return None
        if snap.record is None or "entries" not in snap.record:
            problem = (
                f"{loc.url} is a Delta table splade-pipeline did not write (no {RECORD_KEY} record in its recent "
                "commits)"
            )
            return Committed(snap, None, None, problem)
        entries = read_entries(loc, snap.record["entries"])
    listed = {f for f in entries["data_file"].to_pylist() if f}
    if listed != set(snap.files):
        problem = (
            f"{loc.url}: the table was changed by another writer since splade-pipeline's commit of version "
            f"{snap.record_version} (its files are not the ones that commit recorded)"
        )
        return Committed(snap, snap.record, entries, problem)
    return Committed(snap, snap.record, entries, None)


def commit_state(
    loc: OutputLocation,
    options: dict[str, str],
    base: Committed | None,
    entries: pa.Table,
    record: dict[str, Any],
    attempt: str,
    fallback_schema: pa.Schema,
) -> int:
    """Commit ``entries`` (the whole table state) on top of ``base``; returns the new version (or
    ``base``'s, where ``entries`` name the same files: no version is written).
    The rejects table follows with :func:`sync_rejects` (the caller's next step).

    Raises :class:`ConcurrentCommitError` when another run committed since ``base`` was read.
    """
    entries = _unique_files(entries)
    data = entries.filter(pc.is_valid(entries["data_file"]))
    wanted = dict(zip(data["data_file"].to_pylist(), data.to_pylist(), strict=True))
    current = base.snapshot.files if base else {}
    adds = [FileAdd(p, int(e["data_size"]), e["data_stats"]) for p, e in wanted.items() if p not in current]
    removes = [p for p in current if p not in wanted]
    if base is not None and base.entries is not None and listed_files(entries) == listed_files(base.entries):
        return base.version  # the same files, data and rejects: nothing to commit, no version written
    schema = _schema(loc, list(wanted), base, fallback_schema)
    old_rows = _rows_by_file(base.entries) if base and base.entries is not None else {}
    record = record | {
        "attempt": attempt,
        "entries": write_entries(loc, attempt, entries),
        "rows": int(pc.sum(data["written"]).as_py() or 0),
        "files_added": len(adds),
        "files_removed": len(removes),
        "rows_added": sum(int(wanted[a.path]["written"]) for a in adds),
        "rows_removed": sum(old_rows.get(p, 0) for p in removes) if old_rows or not removes else None,
    }
    table = DeltaOutput(loc, options=options)
    with loc.failures_named("commit the"):
        return table.commit(base.snapshot if base else None, adds, removes, schema, record, attempt)


def sync_rejects(loc: OutputLocation, options: dict[str, str], version: int, entries: pa.Table, attempt: str) -> None:
    """Make the rejects table hold the rejects files of ``entries`` (those of main version ``version``)."""
    rejects = DeltaOutput(loc, REJECTS_DIR, options)
    rows = entries.filter(pc.is_valid(entries["rejects_file"])).to_pylist()
    prefix = REJECTS_DIR + "/"
    wanted = {r["rejects_file"].removeprefix(prefix): r for r in rows}
    for _ in range(REJECTS_SYNC_TRIES):
        with loc.failures_named("read the rejects table of the"):
            snap = rejects.snapshot()
        if snap is not None and (snap.record or {}).get("main_version", -1) >= version:
            return  # a later run brought it further already
        current = snap.files if snap else {}
        adds = [FileAdd(p, int(r["rejects_size"]), r["rejects_stats"]) for p, r in wanted.items() if p not in current]
        removes = [p for p in current if p not in wanted]
        try:
            with loc.failures_named("commit the rejects table of the"):
                rejects.commit(snap, adds, removes, REJECTS_SCHEMA, {"main_version": version}, f"{attempt}-rejects")
            return
        except ConcurrentCommitError:
            continue
    raise OutputError(f"{rejects.url}: the rejects table kept changing under this run; run the command again")


def _schema(loc: OutputLocation, data_files: list[str], base: Committed | None, fallback: pa.Schema) -> pa.Schema:
    """The table's schema: that of a data file this state holds (all share it), else the table's, else
    ``fallback`` (a state with no data files)."""
    if data_files:
        first = sorted(data_files)[0]
        loc.refresh(first.rsplit("/", 1)[0])  # written by Ray workers since this client last listed
        with loc.open(first) as fh:
            return pq.read_schema(fh).remove_metadata()
    return base.snapshot.schema if base else fallback


def _rows_by_file(entries: pa.Table) -> dict[str, int]:
    data = entries.filter(pc.is_valid(entries["data_file"]))
    return dict(zip(data["data_file"].to_pylist(), data["written"].to_pylist(), strict=True))


def _unique_files(entries: pa.Table) -> pa.Table:
    """Each file once (a piece found in two places, committed and on disk, counts once)."""
    if not entries.num_rows:
        return empty_entries()
    key = pc.binary_join_element_wise(
        pc.fill_null(entries["data_file"], ""), pc.fill_null(entries["rejects_file"], ""), entries["unit"], "|"
    )
    return first_of_each(entries, key)
