"""Resuming an encoding job: what of the output may be kept, and what is left to do.

A re-run of a killed or failed job with the same config reads the table's committed state and
the footers of the files no commit references yet (a killed attempt's: each file names its
unit, block and rows, see :mod:`pipeline.output.records`); blocks fully written under the same
unit (same input file, same version, same config) are kept, units fully written are not even
read again, and only the rest is encoded. A config that would change the vectors is refused;
``output.overwrite`` replaces the table's content instead (as a new version: the old ones stay
readable until vacuumed), still reusing files an interrupted attempt wrote under the same settings.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from pipeline.config import InputConfig, JobConfig
from pipeline.encode.fingerprint import Fingerprint
from pipeline.output.layout import DATA_DIR, REJECTS_DIR, foreign_files
from pipeline.output.location import OutputError, OutputLocation
from pipeline.output.records import (
    complete_blocks,
    complete_units,
    empty_entries,
    entries_on_disk,
    listed_files,
    new_attempt,
    unit_key,
)
from pipeline.output.state import Committed, read_committed
from pipeline.sources import Shard

# Settings that decide the vectors or the rows (besides the encoder's): a change means new output.
MAPPING_FIELDS = ("id_column", "text_column", "title_column", "passthrough_columns", "rows_per_block")


@dataclass(frozen=True)
class Resume:
    attempt: str  # this attempt's name: in its files' names and its commit
    meta: dict[str, Any]  # our record of the run, in the commit (see run_meta)
    reused: pa.Table  # entries of written blocks this run keeps (committed or left by a killed attempt)
    work: list[Shard]  # shards still to read, with their units and the blocks to skip
    base: Committed | None  # the table as this run found it (its commit goes on top of it)

    @property
    def reused_rows(self) -> int:
        return int(pc.sum(self.reused["rows"]).as_py() or 0)


def mapping(cfg: InputConfig) -> dict[str, Any]:
    return {name: getattr(cfg, name) for name in MAPPING_FIELDS}


def run_meta(kind: str, config: JobConfig, fp: Fingerprint) -> dict[str, Any]:
    """The record every progress segment and commit carries: what made this output."""
    return {"kind": kind, "fingerprint": fp.to_dict(), "fingerprint_id": fp.id, "mapping": mapping(config.input)}


def recorded_fingerprint(meta: dict[str, Any]) -> Fingerprint:
    return Fingerprint.from_dict(meta.get("fingerprint") or {})


def differences(before: dict[str, Any], now: dict[str, Any], *, with_mapping: bool = True) -> list[str]:
    """What changed between two runs' records that changes the vectors, as 'field: old -> new'."""
    out = recorded_fingerprint(before).differences(recorded_fingerprint(now))
    if with_mapping:
        old_map, new_map = before.get("mapping", {}), now.get("mapping", {})
        out += [
            f"input.{k}: {old_map.get(k)!r} -> {new_map.get(k)!r}"
            for k in MAPPING_FIELDS
            if old_map.get(k) != new_map.get(k)
        ]
    return out


def assign_units(shards: list[Shard], config: JobConfig, fp: Fingerprint) -> list[Shard]:
    """The shards with their unit of work: one input file (and its version) under one config."""
    meta = run_meta("encode", config, fp)
    return [_unit(s, meta) for s in shards]


def plan_resume(config: JobConfig, shards: list[Shard], fp: Fingerprint, loc: OutputLocation) -> Resume:
    """Decide what this run keeps and what it encodes."""
    meta = run_meta("encode", config, fp)
    base = read_committed(loc, config.output.table_options)
    committed = empty_entries()
    if base is None:
        refuse_foreign(loc, config)
    if base is not None and not config.output.overwrite:
        _check_base(base, meta, config)
        committed = base.entries if base.entries is not None else committed
    committed = _without_stale_dedupes(committed, {s.unit for s in shards})
    # Units the table holds whole are kept as committed; for the others, the files a killed attempt
    # (or a run that lost a race) left are looked for. Never both: copies would replace committed files.
    open_units = {s.unit for s in shards} - complete_units(committed)
    with loc.failures_named("list the files of the"):
        left = entries_on_disk(loc, (DATA_DIR, REJECTS_DIR), listed_files(committed), open_units)
    reused, work = reusable(shards, pa.concat_tables([committed, left]))
    return Resume(new_attempt(), meta, reused, work, base)


def _without_stale_dedupes(committed: pa.Table, units: set[str]) -> pa.Table:
    """``committed`` without the blocks a duplicate id was dropped from, unless the input is the
    same units as the table's: which row of an id comes first depends on every unit, so with a
    unit added, changed or gone a dropped row may be the first one now. Those blocks are taken
    from the files they were first written to (their footers), or encoded again."""
    if not committed.num_rows or set(committed["unit"].to_pylist()) == units:
        return committed
    deduped = pc.fill_null(pc.match_substring(committed["rejected"], '"duplicate_id"'), False)
    return committed.filter(pc.invert(deduped))


def refuse_foreign(loc: OutputLocation, config: JobConfig) -> None:
    """A folder holding files that are not a table is refused, with ``overwrite`` too: a table's
    folder belongs to the table (``vacuum`` deletes any file in it no version reads)."""
    found = foreign_files(loc)
    if found:
        raise OutputError(
            f"{config.output.path}: output is not empty ({len(found)} files, e.g. {found[0]}) and is not a "
            "splade-pipeline table; choose an empty output (or move those files away: `vacuum` would delete them)"
        )


def _check_base(base: Committed, meta: dict[str, Any], config: JobConfig) -> None:
    if base.problem:
        raise OutputError(
            f"{base.problem}; set output.overwrite: true to replace its content (a new version), or choose another "
            "output"
        )
    record = base.record or {}
    if record.get("kind") == "reindex":
        raise OutputError(
            f"{config.output.path}: this output is maintained by `splade-pipeline reindex`; run reindex to update it, "
            "or set output.overwrite: true to encode it anew"
        )
    changed = differences(record, meta)
    if changed:
        raise OutputError(
            f"{config.output.path}: the existing output was encoded with different settings, and vectors must not be "
            "mixed:\n  "
            + "\n  ".join(changed)
            + "\nSet output.overwrite: true to replace its content (a new version; the old one stays readable until "
            "vacuumed), or write to another output."
        )


def reusable(shards: list[Shard], entries: pa.Table) -> tuple[pa.Table, list[Shard]]:
    """Of ``entries``, the complete blocks of ``shards``' units (kept); and the shards still to read,
    each with the blocks to skip (units complete in ``entries`` are not read at all)."""
    units = {s.unit: s for s in shards}
    entries = entries.filter(pc.is_in(entries["unit"], pa.array(list(units), pa.string())))
    reused = complete_blocks(entries)
    done = complete_units(entries)
    skip: dict[str, set[int]] = {}
    for unit, block in zip(reused["unit"].to_pylist(), reused["block"].to_pylist()):
        skip.setdefault(unit, set()).add(block)
    work = [
        replace(shard, skip_blocks=tuple(sorted(skip.get(unit, ()))))
        for unit, shard in units.items()
        if unit not in done
    ]
    # Report the current shard positions (listings can change between attempts).
    position = pa.array([units[u].index for u in reused["unit"].to_pylist()], pa.int32())
    return reused.set_column(reused.schema.get_field_index("shard"), "shard", position), work


def _unit(shard: Shard, meta: dict[str, Any]) -> Shard:
    return replace(shard, unit=unit_key("encode", shard.url, shard.version, meta["fingerprint_id"], meta["mapping"]))
