"""Incremental reindexing: encode only what changed since the last commit, delete what disappeared.

The state of a committed output is, per document, its id and the 64-bit hash of exactly the
text that was encoded (title joined in), under the commit's encoding fingerprint: the ``id`` and
``content_hash`` columns of the files of the table's latest version. A reindex:

1. scans the corpus (Ray tasks): ``(id, hash, file, line)`` of every good row, and the rejects;
   texts never reach the driver;
2. compares that with the state (pyarrow joins on id and hash): new, changed, unchanged,
   deleted; a second occurrence of an id is rejected as ``duplicate_id``;
3. encodes the new and changed documents: only the files holding them are read again, only
   those rows (the same Ray Data plan as the encoding job);
4. writes copies of the committed files that hold changed or deleted documents, without those
   rows (the mass-delete guard runs before anything is written);
5. commits one table version: removes for the files replaced, adds for the copies and the new
   files; the version is conditional on the one it read, so a concurrent run's commit makes this
   one fail cleanly instead of mixing the two;
6. brings the store from the version it was loaded from to the new one (upserts the new vectors,
   deletes the ids that disappeared: see :func:`pipeline.job.load.sync_store`).

Killed anywhere, it leaves the previous version as it was; the next reindex starts from it, and
reuses blocks the killed attempt wrote when the same work comes up again. Nothing to do: no
version is written. A fingerprint change (model, weights, max_length, pruning) re-encodes
everything, and says so.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, replace
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from pipeline.config import JobConfig
from pipeline.encode.fingerprint import Fingerprint
from pipeline.errors import PipelineError
from pipeline.job.engine import RAY, Engine
from pipeline.job.plan import Plan, make_plan, read_dataset
from pipeline.job.resume import differences, refuse_foreign, reusable, run_meta
from pipeline.job.runs import RunRecord
from pipeline.job.stages import read_shards
from pipeline.job.steps import commit, finish, store_errors, track
from pipeline.job.summary import Pace, render, summarize
from pipeline.output.layout import (
    DATA_DIR,
    REJECTS_DIR,
    REJECTS_SCHEMA,
    SPLIT_ID_DETAIL,
    WINDOW_MARK,
    compression_of,
    copy_without,
    data_stats,
    delta_stats,
    document_column,
    fingerprint_metadata,
    pooled_length,
    rejects_table,
)
from pipeline.output.location import OutputError, OutputLocation
from pipeline.output.records import empty_entries, entries_on_disk, listed_files, new_attempt, unit_key
from pipeline.output.state import Committed, read_committed, sync_rejects
from pipeline.sources import BAD_FILE, Shard

SCAN_SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("_hash", pa.int64()),
        ("_shard", pa.int32()),
        ("_line", pa.int64()),
        ("_source", pa.string()),
        ("_reject", pa.string()),
        ("_detail", pa.string()),
    ]
)
SCAN_COLUMNS = SCAN_SCHEMA.names


LOCAL_SCAN_BYTES = 64 * 1024 * 1024  # a dry run scans a corpus up to this size without Ray


class MassDeleteError(PipelineError, ValueError):
    """The reindex would delete more of the store than allowed; nothing was changed."""


@dataclass(frozen=True)
class Diff:
    encode: pa.Table  # id, shard, line: the new and changed documents
    kept: pa.Table  # id, file: committed rows that stay as they are
    rewrite: dict[str, pa.Array]  # committed file -> positions of its rows to drop (changed, deleted, duplicate)
    deleted: list[str]  # ids in the state, not in the corpus
    rejects: pa.Table  # id, source, line, reason, detail
    bad_files: list[str]
    counts: dict[str, int]


def run_reindex(
    config: JobConfig,
    *,
    dry_run: bool = False,
    allow_mass_delete: bool = False,
    engine: Engine = RAY,
    on_progress: Callable[..., None] | None = None,
) -> dict[str, Any]:
    """Bring the output (and the store) up to date with the corpus; return the summary. ``engine``:
    what runs the tasks (Ray; Spark in :mod:`pipeline.spark`); ``on_progress``: as for
    :func:`pipeline.job.encode.run_job`."""
    config = engine.configure(config)
    start, pace = time.perf_counter(), Pace()
    plan = make_plan(config)
    loc = plan.output
    meta = run_meta("reindex", config, plan.fingerprint)
    if dry_run:  # a small corpus is scanned in this process: no Ray is started to count
        local = _small(plan.shards)
        diff, full, reason, _ = _compare_now(config, plan, meta, engine, local=local)
        print(_render_plan(diff, full, reason, dry_run=True), flush=True)
        return {"dry_run": True, "full": full, "reason": reason, **diff.counts}
    engine.check_output(config, loc)
    diff, full, reason, base = _compare_now(config, plan, meta, engine)
    print(_render_plan(diff, full, reason, dry_run=False), flush=True)
    _guard(diff, config, allow_mass_delete)
    if base is not None and base.entries is not None and _nothing_to_do(diff, full, base):
        return _nothing_changed(config, plan, diff, base, start, engine)
    attempt = new_attempt()
    todo = _work(diff, plan, meta)
    committed = listed_files(base.entries) if base is not None and base.entries is not None else set()
    with loc.failures_named("list the files of the"):
        left = entries_on_disk(loc, (DATA_DIR, REJECTS_DIR), committed, {s.unit for s in todo})
    reused, work = reusable(todo, left)
    with RunRecord(loc, attempt, "reindex", engine.name) as record:
        track(pace, todo, config, reused, on_progress, record)
        fresh, faults = engine.write(config, plan, work, attempt, pace)
        pace.progress.finish()
        encoded = pa.concat_tables([reused, fresh])
        entries = pa.concat_tables(
            [
                _kept_entries(base, diff),
                rewrite_files(loc, config.output.compression, diff.rewrite, attempt, base, plan.fingerprint),
                encoded,
                _rejects_entry(loc, diff, attempt),
            ]
        )
        version = commit(config, plan, base, entries, meta, attempt)
        record.committed(version)
    summary = _summary(entries, plan, diff, full, reason, reused, fresh, start)
    summary["faults"] |= faults
    summary["pace"] = pace.summary()
    summary["engine"] = engine.name
    finish(summary, config, loc, version)
    print(render(summary, config.output.path), flush=True)
    return _store_step(summary, config, loc, version, engine)


def _store_step(
    summary: dict[str, Any], config: JobConfig, loc: OutputLocation, version: int, engine: Engine
) -> dict[str, Any]:
    """Bring the store (when one is configured) to table version ``version``; say so in the summary
    (the run report, written already, is kept)."""
    if not config.sink.type:
        return summary
    from pipeline.job.load import sync_store

    store = sync_store(config, loc, loader=engine.loader)
    keys = ("store", "upserted", "rejected_empty_vectors", "deleted", "store_count", "expected_count", "count_error")
    summary["sink"] = {k: store[k] for k in keys}
    summary["sink"]["table_version"] = version
    print(
        f"  store {store['store']}: upserted {store['upserted']}, deleted {store['deleted']}; "
        f"it now holds {store['store_count']} (table version {version})",
        flush=True,
    )
    store_errors(summary, store)
    finish(summary, config, loc, version, report=False)
    return summary


def _summary(
    entries: pa.Table, plan: Plan, diff: Diff, full: bool, reason: str, reused: pa.Table, fresh: pa.Table, start: float
) -> dict[str, Any]:
    summary = summarize(
        entries,
        files=len(plan.shards),
        seconds=time.perf_counter() - start,
        fingerprint=plan.fingerprint,
        reused_rows=int(pc.sum(reused["rows"]).as_py() or 0),
    )
    encoded_now = int(pc.sum(fresh["rows"]).as_py() or 0)
    summary["skipped_files"] = sorted(diff.bad_files)
    summary["reindex"] = {
        "full": full,
        "reason": reason,
        **diff.counts,
        "rewritten_files": len(diff.rewrite),
        "encoded_now": encoded_now,
    }
    summary["docs_per_s"] = round(encoded_now / summary["wall_seconds"], 1)  # encoded by this run
    return summary


def _small(shards: list[Shard]) -> bool:
    """Whether the corpus is small enough to scan in this process: under LOCAL_SCAN_BYTES, compressed
    files counted at 8 times their size, a file whose size is unknown counted as large."""
    total = 0
    for shard in shards:
        if shard.size <= 0:
            return False
        total += shard.size * (8 if shard.url.endswith((".gz", ".bz2", ".xz", ".zst", ".zip")) else 1)
    return total <= LOCAL_SCAN_BYTES


def _compare_now(
    config: JobConfig, plan: Plan, meta: dict[str, Any], engine: Engine, *, local: bool = False
) -> tuple[Diff, bool, str, Committed | None]:
    """The difference between the corpus now and the table's latest version."""
    base = read_committed(plan.output, config.output.table_options)
    if base is None:
        refuse_foreign(plan.output, config)
    if base is not None and base.problem and not config.output.overwrite:
        raise OutputError(
            f"{base.problem}; set output.overwrite: true to replace its content (a new version), or choose another "
            "output"
        )
    with plan.output.failures_named("read the state of the"):
        state = read_state(plan.output, base if base is not None and not base.problem else None)
    full, reason = _needs_full(base, meta, config.output.overwrite)
    sources = _sources(base)
    urls = [s.url for s in plan.shards]
    scanned = engine.scan(config, plan) if engine.scan and not local else scan(config, plan, local=local)
    if config.encoder.long_documents == "split":
        scanned = refuse_window_marks(scanned, urls)
    windows = base is not None and not base.problem and "parent_id" in base.snapshot.schema.names
    diff = compare(scanned, state, full, urls, sources, windows=windows)
    return diff, full, reason, base


def _sources(base: Committed | None) -> dict[str, str]:
    """Committed data file -> the input file its rows came from."""
    if base is None or base.entries is None:
        return {}
    pairs = base.entries.select(["data_file", "url"]).to_pylist()
    return {p["data_file"]: p["url"] for p in pairs if p["data_file"] and p["url"]}


def _nothing_changed(
    config: JobConfig, plan: Plan, diff: Diff, base: Committed, start: float, engine: Engine
) -> dict[str, Any]:
    assert base.entries is not None
    # a run killed between its two commits left the rejects table behind: bring it up (else a no-op)
    sync_rejects(plan.output, config.output.table_options, base.version, base.entries, new_attempt())
    seconds = time.perf_counter() - start
    summary = summarize(base.entries, files=len(plan.shards), seconds=seconds, fingerprint=plan.fingerprint)
    summary["reindex"] = {"full": False, "reason": "", **diff.counts, "rewritten_files": 0, "encoded_now": 0}
    summary["docs_per_s"] = 0.0
    finish(summary, config, plan.output, base.version, report=False)  # the report of the version's run stays
    print(f"  nothing changed since table version {base.version}: nothing encoded, no version written", flush=True)
    return _store_step(summary, config, plan.output, base.version, engine)


def _nothing_to_do(diff: Diff, full: bool, base: Committed) -> bool:
    """The corpus is what the table holds: same documents, same texts, same rejects."""
    assert base.entries is not None
    c = diff.counts
    committed_rejects = sum(r["rows"] - r["written"] for r in base.entries.select(["rows", "written"]).to_pylist())
    same_bad = sorted(diff.bad_files) == sorted(b for b in base.entries["bad_file"].to_pylist() if b)
    return (
        not full
        and c["new"] == c["changed"] == c["deleted"] == 0
        and not diff.rewrite
        and c["rejected"] == committed_rejects
        and same_bad
    )


def _needs_full(base: Committed | None, meta: dict[str, Any], overwrite: bool) -> tuple[bool, str]:
    if base is None:
        return True, "no committed output yet"
    if overwrite:
        return True, "output.overwrite is set (start over: every document is encoded again)"
    record = base.record or {}
    changed = differences(record, meta, with_mapping=False)
    old_pass, new_pass = (
        record.get("mapping", {}).get("passthrough_columns"),
        meta["mapping"]["passthrough_columns"],
    )
    if old_pass != new_pass:
        changed.append(f"input.passthrough_columns: {old_pass!r} -> {new_pass!r}")
    if changed:
        return True, f"the encoding settings changed since table version {base.version}: " + "; ".join(changed)
    return False, ""


def scan(config: JobConfig, plan: Plan, *, local: bool = False) -> pa.Table:
    """Every row of the corpus as ``(id, _hash, _shard, _line, _source, _reject, _detail)``, no texts
    (``local``: read in this process, one file after another; else by Ray tasks)."""
    if local:
        shards = pa.Table.from_pylist([asdict(s) for s in plan.shards])
        tables = list(read_for_scan(shards, config.input)) if plan.shards else []
    else:
        ds = read_dataset(config, plan.shards, read_for_scan)
        tables = list(ds.iter_batches(batch_size=None, batch_format="pyarrow"))
    return pa.concat_tables([SCAN_SCHEMA.empty_table(), *(t.select(SCAN_COLUMNS).cast(SCAN_SCHEMA) for t in tables)])


def refuse_window_marks(scanned: pa.Table, urls: list[str]) -> pa.Table:
    """``scanned`` with its good rows whose id holds the window mark rejected (``invalid_id``), as the
    encoder stage rejects them in a long_documents split job."""
    marked = pc.fill_null(
        pc.and_(pc.is_null(scanned["_reject"]), pc.match_substring(scanned["id"], WINDOW_MARK)), False
    )
    if not pc.any(marked).as_py():
        return scanned
    source = pc.if_else(marked, pc.take(pa.array(urls, pa.string()), scanned["_shard"]), scanned["_source"])
    changes = {
        "_source": source,
        "_reject": pc.if_else(marked, pa.scalar("invalid_id"), scanned["_reject"]),
        "_detail": pc.if_else(marked, pa.scalar(SPLIT_ID_DETAIL), scanned["_detail"]),
    }
    for name, values in changes.items():
        scanned = scanned.set_column(scanned.schema.get_field_index(name), name, values)
    return scanned


def read_for_scan(batch: pa.Table, cfg: Any) -> Any:
    for block in read_shards(batch, cfg):
        # The file URL only where a reject needs it: good rows carry the shard's position.
        source = pc.if_else(pc.is_valid(block["_reject"]), block["_source"], pa.scalar(None, pa.string()))
        block = block.set_column(block.schema.get_field_index("_source"), "_source", source)
        yield block.select(SCAN_COLUMNS)


def read_state(loc: OutputLocation, base: Committed | None) -> pa.Table:
    """``(id, hash, file, pos)`` of every row of the table (only those two columns of each file are
    read); ``id`` names the row's document (``parent_id`` in a long_documents split output, whose
    rows are windows)."""
    schema = pa.schema([("id", pa.string()), ("hash", pa.int64()), ("file", pa.string()), ("pos", pa.int32())])
    files = sorted(base.snapshot.files) if base else []
    key = document_column(base is not None and "parent_id" in base.snapshot.schema.names)

    def one(rel: str) -> pa.Table:
        table = loc.read_parquet(rel, columns=[key, "content_hash"])
        n = table.num_rows
        columns = [table[key], table["content_hash"], pa.array([rel] * n, pa.string()), pa.array(range(n), pa.int32())]
        return pa.Table.from_arrays(columns, schema=schema)

    with ThreadPoolExecutor(16) as pool:
        return pa.concat_tables([schema.empty_table(), *pool.map(one, files)])


def _first_rows(state: pa.Table, first: pa.Array, windows: bool) -> pa.Table:
    """The rows of ``state`` at ``first`` (``oi``), or with ``windows`` every row in the file of each
    of those that names the same document: a long_documents split document's windows."""
    if not windows:
        return state.filter(pc.is_in(state["oi"], first))
    pairs = state.filter(pc.is_in(state["oi"], first)).select(["id", "file"])
    return state.join(pairs, keys=["id", "file"], join_type="inner")


def _documents(rows: pa.Table) -> int:
    return int(pc.count_distinct(rows["id"]).as_py()) if rows.num_rows else 0


def compare(
    scanned: pa.Table,
    state: pa.Table,
    full: bool,
    urls: list[str],
    sources: dict[str, str] | None = None,
    *,
    windows: bool = False,
) -> Diff:
    """The per-document difference between the corpus now and the committed state (``urls``: the
    input files in order; ``sources``: committed data file -> its input file; ``windows``: the
    state's rows are the windows of long_documents split, a document's all in one file).

    The indexed documents of an input file that could not be read this time (skipped with
    ``on_bad_file: skip``) stay as they are, unless the corpus holds their id elsewhere: an
    unreadable file is no evidence that its documents are gone.
    """
    marker = pc.fill_null(pc.equal(scanned["_reject"], BAD_FILE), False)
    bad = scanned.filter(marker)
    bad_files = [f"{s}: {d}" for s, d in zip(bad["_source"].to_pylist(), bad["_detail"].to_pylist())]
    unreadable = set(bad["_source"].to_pylist())
    rows = scanned.filter(pc.invert(marker))
    good, duplicates = _first_of_each_id(rows.filter(pc.is_null(rows["_reject"])))
    rejects = pa.concat_tables(
        [rejects_table(rows.filter(pc.is_valid(rows["_reject"]))), _duplicate_rejects(duplicates, urls)]
    )

    state = state.append_column("oi", pa.array(range(state.num_rows), pa.int64()))
    if full:
        keep_rows = pa.array([], pa.int64())
    else:
        matched = state.join(
            good.select(["id", "_hash"]), keys=["id", "hash"], right_keys=["id", "_hash"], join_type="inner"
        )
        keep_rows = _first_rows(state, matched.group_by("id").aggregate([("oi", "min")])["oi_min"], windows)["oi"]
    held = _rows_of_unreadable(state, good, sources or {}, unreadable, windows) if not full else state.slice(0, 0)
    keep_rows = pa.chunked_array([keep_rows, held["oi"]], pa.int64()).combine_chunks()
    is_kept = pc.is_in(state["oi"], keep_rows)
    kept, removed = state.filter(is_kept), state.filter(pc.invert(is_kept))
    encode = good.filter(pc.invert(pc.is_in(good["id"], kept["id"])))
    old_ids = pc.unique(state["id"])
    new = int(pc.sum(pc.invert(pc.is_in(encode["id"], old_ids))).as_py() or 0)
    present = pa.chunked_array([good["id"], held["id"]], pa.string()).combine_chunks()
    deleted = pc.filter(old_ids, pc.invert(pc.is_in(old_ids, present))).to_pylist()
    drops = removed.group_by("file").aggregate([("pos", "list")])
    counts = {
        "documents": good.num_rows,
        "new": new,
        "changed": encode.num_rows - new,
        "unchanged": _documents(kept) - _documents(held),
        "deleted": len(deleted),
        "rejected": rejects.num_rows,
        "indexed_before": len(old_ids),
        "kept_unread": _documents(held),  # indexed documents of files skipped this time, kept as they were
    }
    return Diff(
        encode=encode.select(["id", "_shard", "_line"]).rename_columns(["id", "shard", "line"]),
        kept=kept.select(["id", "file"]),
        rewrite={f: p.values for f, p in zip(drops["file"].to_pylist(), drops["pos_list"].combine_chunks())},
        deleted=deleted,
        rejects=rejects,
        bad_files=bad_files,
        counts=counts,
    )


def _rows_of_unreadable(
    state: pa.Table, good: pa.Table, sources: dict[str, str], unreadable: set[str], windows: bool
) -> pa.Table:
    """State rows from input files that could not be read now, whose id the corpus holds nowhere else."""
    files = [f for f, url in sources.items() if url in unreadable]
    rows = state.filter(pc.is_in(state["file"], pa.array(files, pa.string())))
    rows = rows.filter(pc.invert(pc.is_in(rows["id"], good["id"])))
    return _first_rows(rows, rows.group_by("id").aggregate([("oi", "min")])["oi_min"], windows)


def _first_of_each_id(good: pa.Table) -> tuple[pa.Table, pa.Table]:
    """The first row of each id in corpus order (file, then line), and the later ones."""
    good = good.sort_by([("_shard", "ascending"), ("_line", "ascending")])
    good = good.append_column("i", pa.array(range(good.num_rows), pa.int64()))
    is_first = pc.is_in(good["i"], good.group_by("id").aggregate([("i", "min")])["i_min"])
    return good.filter(is_first), good.filter(pc.invert(is_first))


def _duplicate_rejects(duplicates: pa.Table, urls: list[str]) -> pa.Table:
    n = duplicates.num_rows
    return pa.table(
        {
            "id": duplicates["id"],
            "source": pa.array([urls[i] for i in duplicates["_shard"].to_pylist()], pa.string()),
            "line": duplicates["_line"],
            "reason": pa.array(["duplicate_id"] * n, pa.string()),
            "detail": pa.array(["an earlier row of the corpus has this id; the first one is indexed"] * n, pa.string()),
        }
    )


def _render_plan(diff: Diff, full: bool, reason: str, *, dry_run: bool) -> str:
    c = diff.counts
    head = "splade-pipeline reindex" + (" (dry run: nothing is encoded or changed)" if dry_run else "")
    mode = f"FULL RE-ENCODE: {reason}" if full else "incremental"
    return (
        f"{head}: {mode}\n  documents {c['documents']}: new {c['new']}, changed {c['changed']}, unchanged "
        f"{c['unchanged']}; "
        f"deleted {c['deleted']} (of {c['indexed_before']} indexed); rejected rows {c['rejected']}; "
        f"files to rewrite {len(diff.rewrite)}; to encode {c['new'] + c['changed']}"
        + (
            f"\n  {len(diff.bad_files)} input file(s) could not be read and were skipped; their "
            f"{c['kept_unread']} indexed documents are kept as they were: " + "; ".join(diff.bad_files)
            if diff.bad_files
            else ""
        )
    )


def _guard(diff: Diff, config: JobConfig, allow_mass_delete: bool) -> None:
    before, deleted = diff.counts["indexed_before"], diff.counts["deleted"]
    limit = config.reindex.max_delete_percent
    if before and deleted * 100 / before > limit and not allow_mass_delete:
        raise MassDeleteError(
            f"this reindex would delete {deleted} of {before} indexed documents ({deleted * 100 / before:.1f}%), more "
            "than "
            f"reindex.max_delete_percent ({limit}%). Nothing was changed. Check input.paths (is part of the corpus "
            "missing?); "
            "if the deletions are intended, re-run with --allow-mass-delete."
        )


def _work(diff: Diff, plan: Plan, meta: dict[str, Any]) -> list[Shard]:
    """One unit per input file holding rows to encode, restricted to those rows."""
    lines: dict[int, list[int]] = {}
    for shard, line in zip(diff.encode["shard"].to_pylist(), diff.encode["line"].to_pylist()):
        lines.setdefault(shard, []).append(line)
    work = []
    for index, taken in sorted(lines.items()):
        shard, taken = plan.shards[index], tuple(sorted(taken))
        digest = hashlib.sha256(json.dumps(taken).encode()).hexdigest()
        # Not the table's version: the same rows of the same file version encode the same whatever
        # the table holds, so a re-run after a lost race or a kill reuses what was written.
        unit = unit_key("reindex", shard.url, shard.version, meta["fingerprint_id"], meta["mapping"], digest)
        work.append(replace(shard, unit=unit, lines=taken))
    return work


def _kept_entries(base: Committed | None, diff: Diff) -> pa.Table:
    """Entries of committed data files kept as they are (their old rejects are superseded by this scan's)."""
    if base is None or base.entries is None or base.problem or not diff.kept.num_rows:
        return empty_entries()
    entries = base.entries.filter(pc.is_valid(base.entries["data_file"]))
    entries = entries.filter(pc.invert(pc.is_in(entries["data_file"], pa.array(list(diff.rewrite), pa.string()))))
    entries = entries.filter(pc.is_in(entries["data_file"], pc.unique(diff.kept["file"])))
    n = entries.num_rows
    entries = entries.set_column(entries.schema.get_field_index("rows"), "rows", entries["written"])
    entries = entries.set_column(
        entries.schema.get_field_index("block_rows"), "block_rows", pc.cast(entries["written"], pa.int32())
    )
    entries = entries.set_column(
        entries.schema.get_field_index("rejected"), "rejected", pa.array(["{}"] * n, pa.string())
    )
    for name, kind in (("rejects_file", pa.string()), ("rejects_size", pa.int64()), ("rejects_stats", pa.string())):
        entries = entries.set_column(entries.schema.get_field_index(name), name, pa.nulls(n, kind))
    return entries


def rewrite_files(
    loc: OutputLocation,
    compression: str,
    rewrite: dict[str, pa.Array],
    attempt: str,
    base: Committed | None,
    fp: Fingerprint,
) -> pa.Table:
    """Copies of committed files without their changed and deleted rows (no re-encoding)."""
    if not rewrite:
        return empty_entries()
    entries = base.entries if base is not None and base.entries is not None else empty_entries()
    urls = dict(zip(entries["data_file"].to_pylist(), entries["url"].to_pylist(), strict=True))
    metadata = fingerprint_metadata(fp)

    def one(item: tuple[str, pa.Array]) -> dict[str, Any] | None:
        old, drop = item
        unit = "r" + unit_key("rewrite", attempt, old)[:15]
        name = f"{DATA_DIR}/part-{unit}-000000-{attempt}.parquet"
        copied = copy_without(loc, old, drop, name, metadata, compression_of(compression))
        if copied is None:
            return None
        new, size, table = copied
        stats = data_stats(table, pooled_length(fp))  # documents (not a split document's windows), windows
        return {
            "unit": unit,
            "url": urls.get(old),
            "shard": -1,
            "block": 0,
            "block_rows": stats["written"],
            "last": True,
            "rows": stats["written"],
            "rejected": "{}",
            "bad_file": None,
            "data_file": new,
            "data_size": size,
            "data_stats": delta_stats(table),
            "rejects_file": None,
            "attempt": attempt,
            **stats,
        }

    with ThreadPoolExecutor(8) as pool:
        rows = [r for r in pool.map(one, sorted(rewrite.items())) if r is not None]
    return pa.Table.from_pylist(rows, schema=empty_entries().schema)


def _rejects_entry(loc: OutputLocation, diff: Diff, attempt: str) -> pa.Table:
    entries = [
        {
            "unit": f"bad-{attempt}-{i}",
            "url": s.split(": ", 1)[0],
            "shard": -1,
            "block": 0,
            "block_rows": 1,
            "last": True,
            "rows": 0,
            "written": 0,
            "rejected": "{}",
            "tokens": 0,
            "truncated": 0,
            "nnz_hist": "{}",
            "bad_file": s,
        }
        for i, s in enumerate(diff.bad_files)
    ]
    if diff.rejects.num_rows:
        rejects = diff.rejects.cast(REJECTS_SCHEMA)
        path = f"{REJECTS_DIR}/reindex-{attempt}.parquet"
        size = loc.write_parquet(path, rejects)
        n = rejects.num_rows
        entries.append(
            {
                "unit": f"rejects-{attempt}",
                "url": None,
                "shard": -1,
                "block": 0,
                "block_rows": n,
                "last": True,
                "rows": n,
                "written": 0,
                "rejected": json.dumps(Counter(rejects["reason"].to_pylist())),
                "tokens": 0,
                "truncated": 0,
                "nnz_hist": "{}",
                "bad_file": None,
                "data_file": None,
                "rejects_file": path,
                "rejects_size": size,
                "rejects_stats": delta_stats(rejects),
            }
        )
    return pa.Table.from_pylist(entries, schema=empty_entries().schema)
