"""Incremental reindexing: encode only what changed since the last commit, delete what disappeared.

The state of a committed output is, per document, its id and the 64-bit hash of exactly the
text that was encoded (title joined in), under the commit's encoding fingerprint: the ``id`` and
``content_hash`` columns of the committed Parquet files. A reindex, holding the output's lock:

1. scans the corpus (Ray tasks): ``(id, hash, file, line)`` of every good row, and the rejects;
   texts never reach the driver;
2. compares that with the state (pyarrow joins on id and hash): new, changed, unchanged,
   deleted; a second occurrence of an id is rejected as ``duplicate_id``;
3. encodes the new and changed documents: only the files holding them are read again, only
   those rows (the same Ray Data plan as the encoding job);
4. rewrites the committed files that hold changed or deleted documents, without those rows;
5. upserts the new vectors and deletes the ids that disappeared (the mass-delete guard runs
   before anything is written);
6. commits the new generation in one object and deletes the files no commit lists.

Killed anywhere, it leaves the previous commit valid; the next reindex starts from it, and
reuses blocks the killed attempt finished when the same work comes up again. A fingerprint
change (model, weights, max_length, pruning) re-encodes everything, and says so.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, replace
from typing import Any

import fsspec
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline.config import JobConfig, redacted
from pipeline.faults import crash_point
from pipeline.manifest import (
    Commit,
    Progress,
    clean,
    empty_entries,
    join,
    latest_commit,
    read_progress,
    unit_key,
    write_commit,
    write_parquet,
)
from pipeline.output import DATA_DIR, REJECTS_DIR, data_stats, lock_output, output_fs
from pipeline.resume import differences, reusable, run_meta
from pipeline.run import READER_MEMORY, Plan, _write_summary, ensure_ray, make_plan, write_work
from pipeline.sources import BAD_FILE, Shard
from pipeline.stages import read_shards
from pipeline.summary import Pace, render, summarize

SCAN_COLUMNS = ["id", "_hash", "_shard", "_line", "_source", "_reject", "_detail"]


class MassDeleteError(ValueError):
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


def run_reindex(config: JobConfig, *, dry_run: bool = False, allow_mass_delete: bool = False) -> dict[str, Any]:
    """Bring the output (and the store) up to date with the corpus; return the summary."""
    start, pace = time.perf_counter(), Pace()
    plan = make_plan(config)
    fs, root = output_fs(config.output)
    meta = run_meta("reindex", config, plan.fingerprint)
    if dry_run:
        commit = latest_commit(fs, root)
        full, reason = _needs_full(commit, meta, config.output.overwrite)
        diff = compare(scan(config, plan), read_state(fs, root, commit), full, [s.url for s in plan.shards])
        print(_render_plan(diff, full, reason, dry_run=True), flush=True)
        return {"dry_run": True, "full": full, "reason": reason, **diff.counts}
    with lock_output(config.output, "reindex") as lock:
        commit = latest_commit(fs, root)
        full, reason = _needs_full(commit, meta, config.output.overwrite)
        generation = (commit.generation if commit else 0) + 1
        diff = compare(scan(config, plan), read_state(fs, root, commit), full, [s.url for s in plan.shards])
        print(_render_plan(diff, full, reason, dry_run=False), flush=True)
        _guard(diff, config, allow_mass_delete)
        if commit is not None and _nothing_to_do(diff, full, commit):
            clean(fs, root, commit.entries, commit.generation, (DATA_DIR, REJECTS_DIR))  # a killed attempt's leftovers
            summary = summarize(commit.entries, files=len(plan.shards), duplicate_ids=0, seconds=time.perf_counter() - start,
                                fingerprint=plan.fingerprint, reused_rows=0)  # fmt: skip
            summary["reindex"] = {"full": False, "reason": "", **diff.counts, "rewritten_files": 0, "encoded_now": 0}
            summary |= {"docs_per_s": 0.0, "generation": commit.generation, "output": config.output.path, "config": redacted(config)}
            _write_summary(summary, config)
            print(f"  nothing changed since generation {commit.generation}: nothing encoded, the store untouched", flush=True)
            return summary
        reused, work = reusable(_work(diff, plan, generation, meta), pa.concat_tables([empty_entries(), *(t for t, _ in read_progress(fs, root, generation))]))
        progress = Progress(fs, root, generation, meta, config.output.commit_interval_s)
        fresh, faults = write_work(config, plan, work, progress, pace)
        encoded = pa.concat_tables([reused, fresh])
        entries = pa.concat_tables([
            _kept_entries(commit, diff), rewrite_files(config, diff.rewrite, generation, commit), encoded,
            _rejects_entry(config, diff, generation),
        ])  # fmt: skip
        store = _update_store(config, plan, fs, root, encoded, diff.deleted) if config.sink.type else None
        lock.check()
        write_commit(fs, root, generation, entries, meta)
        crash_point("commit")
        clean(fs, root, entries, generation, (DATA_DIR, REJECTS_DIR))
        summary = summarize(
            entries, files=len(plan.shards), duplicate_ids=0, seconds=time.perf_counter() - start,
            fingerprint=plan.fingerprint, reused_rows=int(pc.sum(reused["rows"]).as_py() or 0),
        )  # fmt: skip
        summary["skipped_files"] = sorted(diff.bad_files)
        summary["faults"] |= faults
        summary["pace"] = pace.summary()
        summary["reindex"] = {"full": full, "reason": reason, **diff.counts, "rewritten_files": len(diff.rewrite),
                              "encoded_now": int(pc.sum(fresh["rows"]).as_py() or 0)}  # fmt: skip
        summary |= {"generation": generation, "output": config.output.path, "config": redacted(config)}
        summary["docs_per_s"] = round(summary["reindex"]["encoded_now"] / summary["wall_seconds"], 1)  # encoded by this run
        if store is not None:
            summary["sink"] = store
        _write_summary(summary, config)
    print(render(summary, config.output.path), flush=True)
    if store is not None:
        print(f"  store {store['store']}: upserted {store['upserted']}, deleted {store['deleted']}; it now holds {store['store_count']}", flush=True)
    return summary


def _nothing_to_do(diff: Diff, full: bool, commit: Commit) -> bool:
    """The corpus is what the commit holds: same documents, same texts, same rejects."""
    c = diff.counts
    committed_rejects = sum(r["rows"] - r["written"] for r in commit.entries.select(["rows", "written"]).to_pylist())
    same_bad = sorted(diff.bad_files) == sorted(b for b in commit.entries["bad_file"].to_pylist() if b)
    return not full and c["new"] == c["changed"] == c["deleted"] == 0 and not diff.rewrite and c["rejected"] == committed_rejects and same_bad


def _needs_full(commit: Commit | None, meta: dict[str, Any], overwrite: bool) -> tuple[bool, str]:
    if commit is None:
        return True, "no committed output yet"
    if overwrite:
        return True, "output.overwrite is set (start over: every document is encoded again)"
    changed = differences(commit.meta, meta, with_mapping=False)
    old_pass, new_pass = commit.meta.get("mapping", {}).get("passthrough_columns"), meta["mapping"]["passthrough_columns"]
    if old_pass != new_pass:
        changed.append(f"input.passthrough_columns: {old_pass!r} -> {new_pass!r}")
    if changed:
        return True, "the encoding settings changed since generation " + f"{commit.generation}: " + "; ".join(changed)
    return False, ""


def scan(config: JobConfig, plan: Plan) -> pa.Table:
    """Every row of the corpus as ``(id, _hash, _shard, _line, _source, _reject, _detail)``, no texts."""
    import ray

    ensure_ray(config.compute)
    items = [asdict(s) for s in plan.shards]
    ds = ray.data.from_items(items, override_num_blocks=len(items)).map_batches(
        _read_for_scan, batch_size=1, batch_format="pyarrow", fn_kwargs={"cfg": config.input},
        num_cpus=config.compute.io_cpus, memory=READER_MEMORY,
    )  # fmt: skip
    tables = list(ds.iter_batches(batch_size=None, batch_format="pyarrow"))
    schema = pa.schema([("id", pa.string()), ("_hash", pa.int64()), ("_shard", pa.int32()), ("_line", pa.int64()),
                        ("_source", pa.string()), ("_reject", pa.string()), ("_detail", pa.string())])  # fmt: skip
    return pa.concat_tables([schema.empty_table(), *(t.select(SCAN_COLUMNS).cast(schema) for t in tables)])


def _read_for_scan(batch: pa.Table, cfg: Any) -> Any:
    for block in read_shards(batch, cfg):
        # The file URL only where a reject needs it: good rows carry the shard's position.
        block = block.set_column(block.schema.get_field_index("_source"), "_source",
                                 pc.if_else(pc.is_valid(block["_reject"]), block["_source"], pa.scalar(None, pa.string())))  # fmt: skip
        yield block.select(SCAN_COLUMNS)


def read_state(fs: fsspec.AbstractFileSystem, root: str, commit: Commit | None) -> pa.Table:
    """``(id, hash, file, pos)`` of every committed row (only those two columns of each file are read)."""
    schema = pa.schema([("id", pa.string()), ("hash", pa.int64()), ("file", pa.string()), ("pos", pa.int32())])
    files = [f for f in commit.entries["data_file"].to_pylist() if f] if commit else []

    def one(rel: str) -> pa.Table:
        with fs.open(join(root, rel), "rb") as fh:
            table = pq.read_table(fh, columns=["id", "content_hash"])
        n = table.num_rows
        return pa.table({"id": table["id"], "hash": table["content_hash"], "file": pa.array([rel] * n, pa.string()), "pos": pa.array(range(n), pa.int32())})

    with ThreadPoolExecutor(16) as pool:
        return pa.concat_tables([schema.empty_table(), *pool.map(one, files)])


def compare(scanned: pa.Table, state: pa.Table, full: bool, urls: list[str]) -> Diff:
    """The per-document difference between the corpus now and the committed state (``urls``: the input files in order)."""
    marker = pc.fill_null(pc.equal(scanned["_reject"], BAD_FILE), False)
    bad_files = [f"{s}: {d}" for s, d in zip(scanned.filter(marker)["_source"].to_pylist(), scanned.filter(marker)["_detail"].to_pylist())]
    rows = scanned.filter(pc.invert(marker))
    good = rows.filter(pc.is_null(rows["_reject"])).sort_by([("_shard", "ascending"), ("_line", "ascending")])
    good = good.append_column("i", pa.array(range(good.num_rows), pa.int64()))
    first = good.group_by("id").aggregate([("i", "min")])["i_min"]
    is_first = pc.is_in(good["i"], first)
    dups = good.filter(pc.invert(is_first))
    good = good.filter(is_first)
    rejects = rows.filter(pc.is_valid(rows["_reject"]))
    rejects = pa.table({"id": rejects["id"], "source": rejects["_source"], "line": rejects["_line"], "reason": rejects["_reject"], "detail": rejects["_detail"]})
    if dups.num_rows:
        rejects = pa.concat_tables([rejects, pa.table({
            "id": dups["id"], "source": pa.array([urls[i] for i in dups["_shard"].to_pylist()], pa.string()), "line": dups["_line"],
            "reason": pa.array(["duplicate_id"] * dups.num_rows, pa.string()),
            "detail": pa.array(["an earlier row of the corpus has this id; the first one is indexed"] * dups.num_rows, pa.string()),
        })])  # fmt: skip

    state = state.append_column("oi", pa.array(range(state.num_rows), pa.int64()))
    if full:
        keep_rows = pa.array([], pa.int64())
    else:
        matched = state.join(good.select(["id", "_hash"]), keys=["id", "hash"], right_keys=["id", "_hash"], join_type="inner")
        keep_rows = matched.group_by("id").aggregate([("oi", "min")])["oi_min"]
    is_kept = pc.is_in(state["oi"], keep_rows)
    kept, removed = state.filter(is_kept), state.filter(pc.invert(is_kept))
    encode = good.filter(pc.invert(pc.is_in(good["id"], kept["id"])))
    old_ids = pc.unique(state["id"])
    new = int(pc.sum(pc.invert(pc.is_in(encode["id"], old_ids))).as_py() or 0)
    deleted = pc.filter(old_ids, pc.invert(pc.is_in(old_ids, good["id"]))).to_pylist()
    drops = removed.group_by("file").aggregate([("pos", "list")])
    rewrite = {f: p.values for f, p in zip(drops["file"].to_pylist(), drops["pos_list"].combine_chunks())}
    counts = {
        "documents": good.num_rows, "new": new, "changed": encode.num_rows - new, "unchanged": kept.num_rows,
        "deleted": len(deleted), "rejected": rejects.num_rows, "indexed_before": len(old_ids),
    }  # fmt: skip
    return Diff(
        encode=encode.select(["id", "_shard", "_line"]).rename_columns(["id", "shard", "line"]),
        kept=kept.select(["id", "file"]), rewrite=rewrite, deleted=deleted, rejects=rejects, bad_files=bad_files, counts=counts,
    )  # fmt: skip


def _render_plan(diff: Diff, full: bool, reason: str, *, dry_run: bool) -> str:
    c = diff.counts
    head = "splade-pipeline reindex" + (" (dry run: nothing is encoded or changed)" if dry_run else "")
    mode = f"FULL RE-ENCODE: {reason}" if full else "incremental"
    return (
        f"{head}: {mode}\n  documents {c['documents']}: new {c['new']}, changed {c['changed']}, unchanged {c['unchanged']}; "
        f"deleted {c['deleted']} (of {c['indexed_before']} indexed); rejected rows {c['rejected']}; "
        f"files to rewrite {len(diff.rewrite)}; to encode {c['new'] + c['changed']}"
    )


def _guard(diff: Diff, config: JobConfig, allow_mass_delete: bool) -> None:
    before, deleted = diff.counts["indexed_before"], diff.counts["deleted"]
    limit = config.reindex.max_delete_percent
    if before and deleted * 100 / before > limit and not allow_mass_delete:
        raise MassDeleteError(
            f"this reindex would delete {deleted} of {before} indexed documents ({deleted * 100 / before:.1f}%), more than "
            f"reindex.max_delete_percent ({limit}%). Nothing was changed. Check input.paths (is part of the corpus missing?); "
            "if the deletions are intended, re-run with --allow-mass-delete."
        )


def _work(diff: Diff, plan: Plan, generation: int, meta: dict[str, Any]) -> list[Shard]:
    """One unit per input file holding rows to encode, restricted to those rows."""
    lines: dict[int, list[int]] = {}
    for shard, line in zip(diff.encode["shard"].to_pylist(), diff.encode["line"].to_pylist()):
        lines.setdefault(shard, []).append(line)
    work = []
    for index, taken in sorted(lines.items()):
        shard, taken = plan.shards[index], tuple(sorted(taken))
        digest = hashlib.sha256(json.dumps(taken).encode()).hexdigest()
        unit = unit_key("reindex", generation, shard.url, shard.version, meta["fingerprint_id"], meta["mapping"], digest)
        work.append(replace(shard, unit=unit, lines=taken))
    return work


def _kept_entries(commit: Commit | None, diff: Diff) -> pa.Table:
    """Entries of committed data files kept as they are (their old rejects are superseded by this scan's)."""
    if commit is None or not diff.kept.num_rows:
        return empty_entries()
    entries = commit.entries.filter(pc.is_valid(commit.entries["data_file"]))
    entries = entries.filter(pc.invert(pc.is_in(entries["data_file"], pa.array(list(diff.rewrite), pa.string()))))
    entries = entries.filter(pc.is_in(entries["data_file"], pc.unique(diff.kept["file"])))
    n = entries.num_rows
    entries = entries.set_column(entries.schema.get_field_index("rows"), "rows", entries["written"])
    entries = entries.set_column(entries.schema.get_field_index("block_rows"), "block_rows", pc.cast(entries["written"], pa.int32()))
    entries = entries.set_column(entries.schema.get_field_index("rejected"), "rejected", pa.array(["{}"] * n, pa.string()))
    return entries.set_column(entries.schema.get_field_index("rejects_file"), "rejects_file", pa.nulls(n, pa.string()))


def rewrite_files(config: JobConfig, rewrite: dict[str, pa.Array], generation: int, commit: Commit | None) -> pa.Table:
    """Copies of committed files without their changed and deleted rows (no re-encoding)."""
    if not rewrite:
        return empty_entries()
    fs, root = output_fs(config.output)
    urls = dict(zip(commit.entries["data_file"].to_pylist(), commit.entries["url"].to_pylist())) if commit else {}
    compression = None if config.output.compression == "none" else config.output.compression

    def one(item: tuple[str, pa.Array]) -> dict[str, Any] | None:
        old, drop = item
        with fs.open(join(root, old), "rb") as fh:
            table = pq.read_table(fh)
        table = table.filter(pc.invert(pc.is_in(pa.array(range(table.num_rows), pa.int32()), drop)))
        if not table.num_rows:
            return None
        unit = "r" + unit_key("rewrite", generation, old)[:15]
        new = f"{DATA_DIR}/part-{unit}-000000.parquet"
        write_parquet(fs, root, join(root, new), table, compression)
        return {"unit": unit, "url": urls.get(old), "shard": -1, "block": 0, "block_rows": table.num_rows, "last": True,
                "rows": table.num_rows, "rejected": "{}", "bad_file": None, "data_file": new, "rejects_file": None,
                "attempt": "", **data_stats(table)}  # fmt: skip

    with ThreadPoolExecutor(8) as pool:
        rows = [r for r in pool.map(one, sorted(rewrite.items())) if r is not None]
    return pa.Table.from_pylist(rows, schema=empty_entries().schema)


def _rejects_entry(config: JobConfig, diff: Diff, generation: int) -> pa.Table:
    entries = [
        {"unit": f"bad-{generation}-{i}", "url": s.split(": ", 1)[0], "shard": -1, "block": 0, "block_rows": 1, "last": True,
         "rows": 0, "written": 0, "rejected": "{}", "tokens": 0, "truncated": 0, "nnz_hist": "{}", "bad_file": s}
        for i, s in enumerate(diff.bad_files)
    ]  # fmt: skip
    if diff.rejects.num_rows:
        fs, root = output_fs(config.output)
        rejects = diff.rejects
        path = f"{REJECTS_DIR}/reindex-{generation:08d}.parquet"
        write_parquet(fs, root, join(root, path), rejects)
        n = rejects.num_rows
        entries.append({"unit": f"rejects-{generation}", "url": None, "shard": -1, "block": 0, "block_rows": n, "last": True, "rows": n,
                        "written": 0, "rejected": json.dumps(Counter(rejects["reason"].to_pylist())), "tokens": 0, "truncated": 0,
                        "nnz_hist": "{}", "bad_file": None, "data_file": None, "rejects_file": path})  # fmt: skip
    return pa.Table.from_pylist(entries, schema=empty_entries().schema)


def _update_store(config: JobConfig, plan: Plan, fs: fsspec.AbstractFileSystem, root: str, encoded: pa.Table, deleted: list[str]) -> dict[str, Any]:
    from pipeline.sinks import open_sink
    from pipeline.upsert import delete_ids, upsert_files

    files = [join(root, f) for f in encoded["data_file"].to_pylist() if f]
    result = upsert_files(config, fs, files, plan.fingerprint) if files else {"upserted": 0, "rejected_empty_vectors": 0}
    removed = delete_ids(config, plan.fingerprint, deleted) if deleted else 0
    store = open_sink(config.sink, plan.fingerprint["vocab_size"])
    try:
        name, count = store.name, store.count()
    finally:
        store.close()
    return {"store": name, "upserted": result["upserted"], "rejected_empty_vectors": result["rejected_empty_vectors"], "deleted": removed, "store_count": count}
