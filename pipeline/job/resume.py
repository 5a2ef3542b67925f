"""Resuming an encoding job: what of the output may be kept, and what is left to do.

A re-run of a killed or failed job with the same config reads the newest commit and the
progress records of attempts since; blocks fully written under the same unit (same input file,
same version, same config) are kept, units fully written are not even read again, and only
the rest is encoded. A config that would change the vectors is refused (or, with
``output.overwrite``, the output is cleared and the job starts over).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from pipeline.config import InputConfig, JobConfig
from pipeline.encode.fingerprint import Fingerprint
from pipeline.output.commits import (
    Commit,
    OutputError,
    complete_blocks,
    complete_units,
    empty_entries,
    latest_commit,
    read_progress,
    unit_key,
)
from pipeline.output.layout import clear_output, existing_files
from pipeline.output.location import OutputLocation
from pipeline.sources import Shard

# Settings that decide the vectors or the rows (besides the encoder's): a change means new output.
MAPPING_FIELDS = ("id_column", "text_column", "title_column", "passthrough_columns", "rows_per_block")


@dataclass(frozen=True)
class Resume:
    generation: int  # the generation this run commits
    meta: dict[str, Any]  # recorded with every progress segment and the commit (see run_meta)
    reused: pa.Table  # entries of committed blocks this run keeps
    work: list[Shard]  # shards still to read, with their units and the blocks to skip
    previous: Commit | None

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
    """Decide what this run keeps and what it encodes (clearing the output first with ``overwrite``)."""
    meta = run_meta("encode", config, fp)
    if config.output.overwrite:
        clear_output(loc)
        return Resume(1, meta, empty_entries(), shards, None)
    with loc.failures_named("read the commit records of the"):
        commit = latest_commit(loc)
        generation = (commit.generation if commit else 0) + 1
        progress = read_progress(loc, generation)
    records = ([commit.meta] if commit else []) + [m for _, m in progress]
    if not records:
        found = existing_files(loc)
        if found:
            raise OutputError(
                f"{config.output.path}: output is not empty ({len(found)} files) and holds no splade-pipeline commit "
                "records; "
                "set output.overwrite: true to replace it, or choose an empty output"
            )
        return Resume(1, meta, empty_entries(), shards, None)
    if commit is not None and commit.meta.get("kind") == "reindex":
        raise OutputError(
            f"{config.output.path}: this output is maintained by `splade-pipeline reindex`; run reindex to update it, "
            "or set output.overwrite: true to encode it anew"
        )
    for record in records:
        changed = differences(record, meta)
        if changed:
            raise OutputError(
                f"{config.output.path}: the existing output was encoded with different settings, and vectors must not "
                "be mixed:\n  "
                + "\n  ".join(changed)
                + "\nSet output.overwrite: true to start over (the existing output is deleted), or write to another "
                "output."
            )
    reused, work = reusable(
        shards, pa.concat_tables([(commit.entries if commit else empty_entries()), *(t for t, _ in progress)])
    )
    return Resume(generation, meta, reused, work, commit)


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
