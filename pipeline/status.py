"""``splade-pipeline status``: what an output holds and what is happening to it, from the output
alone: the last committed version (its time, documents, rejects, the fingerprint of its vectors),
the runs recorded there (:mod:`pipeline.job.runs`: one in progress, who and since when and how
far; one that stopped without committing), the files written and not committed yet (a re-run
resumes them), and each vector store loaded from it (the version it holds, a load not finished).
"""

from __future__ import annotations

import json
import time
from typing import Any

import pyarrow.compute as pc

from pipeline.output.location import OutputLocation


def output_status(loc: OutputLocation, options: dict[str, str] | None = None) -> dict[str, Any]:
    """The status of the output at ``loc`` as a dict (see :func:`render_status`)."""
    from pipeline.job.runs import read_runs
    from pipeline.output.records import rejected_rows
    from pipeline.output.state import read_committed

    committed = read_committed(loc, options or {})
    status: dict[str, Any] = {"output": loc.url, "table": None, "runs": read_runs(loc), "stores": _stores(loc)}
    if committed is None:
        status["uncommitted_files"] = _uncommitted(loc, set())  # a first run killed before its commit
        return status
    entries = committed.entries
    table: dict[str, Any] = {"version": committed.version, "committed_at": _commit_time(loc, committed.version)}
    if entries is not None:
        windows = "parent_id" in committed.snapshot.schema.names
        table["documents"] = int(pc.sum(entries["written"]).as_py() or 0)
        if windows:
            table["windows"] = int(pc.sum(entries["windows"]).as_py() or 0)
        table["rejected"] = rejected_rows(entries)
    table["data_files"] = len(committed.snapshot.files)
    record = committed.record or {}
    table["fingerprint"] = record.get("fingerprint")
    table["problem"] = committed.problem
    status["table"] = table
    status["uncommitted_files"] = _uncommitted(loc, set(committed.snapshot.files))
    return status


def _commit_time(loc: OutputLocation, version: int) -> str | None:
    from pipeline.output.table import DeltaOutput

    info = DeltaOutput(loc).commit_info(version) or {}
    stamp = info.get("timestamp")
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(stamp / 1000)) if stamp else None


def _uncommitted(loc: OutputLocation, committed: set[str]) -> int:
    """Data files neither in the latest version nor removed by a version (a reindex's rewritten and
    deleted files stay until ``vacuum``): written and never committed."""
    from pipeline.output.layout import DATA_DIR

    loc.refresh(DATA_DIR)
    left = [rel for rel in loc.files(DATA_DIR) if rel.endswith(".parquet") and rel not in committed]
    return len(set(left) - _ever_removed(loc)) if left else 0


def _ever_removed(loc: OutputLocation) -> set[str]:
    """The files the table's commits (those whose log files are still there) removed."""
    from concurrent.futures import ThreadPoolExecutor
    from urllib.parse import unquote

    loc.refresh("_delta_log")
    logs = [rel for rel in loc.files("_delta_log") if rel.endswith(".json") and "checkpoint" not in rel]

    def removed(rel: str) -> list[str]:
        actions = (json.loads(line) for line in loc.read_bytes(rel).splitlines() if b'"remove"' in line)
        return [unquote(a["remove"]["path"]) for a in actions if "remove" in a]

    with ThreadPoolExecutor(16) as pool:
        return {path for paths in pool.map(removed, logs) for path in paths}


def _stores(loc: OutputLocation) -> list[dict[str, Any]]:
    from pipeline.job.load import STORES_DIR

    loc.refresh(STORES_DIR)
    stores = []
    for rel in loc.files(STORES_DIR):
        if not rel.endswith(".json"):
            continue
        try:
            record = json.loads(loc.read_bytes(rel))
        except (FileNotFoundError, ValueError):
            continue
        stores.append({"record": rel.rsplit("/", 1)[-1]} | record)
    return stores


def render_status(status: dict[str, Any]) -> str:
    """The status as lines for a terminal."""
    lines = [f"output: {status['output']}"]
    table = status.get("table")
    uncommitted = status.get("uncommitted_files", 0)
    if table is None:
        lines.append("  table: none yet (no committed version)")
        lines += [_uncommitted_line(uncommitted)] if uncommitted else []
    else:
        lines += _render_table(table, uncommitted)
    runs = status.get("runs") or []
    lines += [_render_run(run) for run in runs[:5]] or ["  runs: none recorded"]
    stores = status.get("stores") or []
    lines += [_render_store(s, table) for s in stores] or ["  stores: none loaded from this output"]
    return "\n".join(lines)


def _render_table(table: dict[str, Any], uncommitted: int) -> list[str]:
    fp = table.get("fingerprint") or {}
    documents = f"{table.get('documents', '?'):,}" if isinstance(table.get("documents"), int) else "?"
    windows = f" in {table['windows']:,} windows" if table.get("windows") is not None else ""
    lines = [
        f"  table: version {table['version']}, committed {table.get('committed_at') or '?'}; {documents} documents"
        f"{windows}, {table.get('rejected', '?')} rows rejected, {table['data_files']} data files",
        f"  vectors: {fp.get('model')} (weights sha256 {str(fp.get('weights_sha256', ''))[:12]}), {fp.get('dtype')}, "
        f"max_length {fp.get('max_length')}, long_documents {fp.get('long_documents')}, top_k {fp.get('top_k')}",
    ]
    if table.get("problem"):
        lines.append(f"  note: {table['problem']}")
    if uncommitted:
        lines.append(_uncommitted_line(uncommitted))
    return lines


def _uncommitted_line(files: int) -> str:
    return f"  {files} data files written and not committed (a run in progress, or one a re-run resumes)"


def _render_run(run: dict[str, Any]) -> str:
    who = f"{run.get('user') or '?'}@{run.get('host')} pid {run.get('pid')}"
    done = run.get("done")
    total = run.get("total")
    far = ""
    if done is not None:
        mark = "~" if run.get("total_estimated") else ""
        far = f", {done:,}" + (f" / {mark}{total:,}" if total else "") + " docs"
        far += f" at {run['docs_per_s']} docs/s" if run.get("docs_per_s") else ""
    state = run.get("state")
    head = f"  run {run['attempt']} ({run.get('kind')}, {run.get('engine')}"
    if state == "committed":
        return f"{head}): committed version {run.get('table_version')} at {run.get('finished')}{far}"
    if state == "failed":
        return (
            f"{head}, {who}): FAILED at {run.get('finished')}{far}: {run.get('error')}; the same command resumes "
            "it once the cause is fixed"
        )
    if state == "stopped":
        if run.get("superseded_by"):
            return (
                f"{head}, {who}): STOPPED without committing{far}: its process is gone; run "
                f"{run['superseded_by']} committed since"
            )
        gone = "its process is gone, " if run.get("process_gone") else ""
        return (
            f"{head}, {who}): STOPPED without committing: {gone}last heard {run.get('updated')} "
            f"({run.get('stale_s')} s ago){far}; the same command resumes it"
        )
    return f"{head}, {who}): RUNNING since {run.get('started')}, updated {run.get('updated')}{far}"


def _render_store(store: dict[str, Any], table: dict[str, Any] | None) -> str:
    latest = table["version"] if table else None
    version = store.get("table_version")
    state = "up to date" if version == latest else f"holds version {version}, the table is at {latest}"
    if store.get("pending") is not None:
        state = f"a load toward version {store['pending']} did not finish (the next load or upsert redoes it)"
    return f"  store {store.get('store') or store['record']}: {state} (recorded {store.get('at')})"
