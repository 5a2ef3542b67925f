"""The run summary: computed from the writers' per-block stats (that is, from the data)."""

from __future__ import annotations

import json
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa

from pipeline.encode.fingerprint import Fingerprint
from pipeline.job.progress import Progress, thin


class RowsLostError(RuntimeError):
    """Rows read did not all reach the output or the rejects: a bug, never a user error."""


def summarize(
    entries: pa.Table, *, files: int, seconds: float, fingerprint: Fingerprint, reused_rows: int = 0
) -> dict[str, Any]:
    """The summary of a committed output, from its entries (see :mod:`pipeline.output.records`)."""
    rows = entries.to_pylist()
    _check_blocks(rows)
    rejected: Counter[str] = Counter()
    hist: Counter[int] = Counter()
    for r in rows:
        rejected.update(json.loads(r["rejected"]))
        hist.update({int(k): v for k, v in json.loads(r["nnz_hist"]).items()})
    read = sum(r["rows"] for r in rows)
    written = sum(r["written"] for r in rows)
    summary = {
        "rows_read": read,
        "rows_written": written,
        "rows_rejected": sum(rejected.values()),
        "rows_reused": reused_rows,  # committed by an earlier attempt or run: not read or encoded again
        "rejected_by_reason": dict(sorted(rejected.items())),
        "duplicate_ids": rejected.get("duplicate_id", 0),  # later rows of an id: rejected, the first kept
        "truncated": sum(r["truncated"] for r in rows),
        "tokens": sum(r["tokens"] for r in rows),
        # windows encoded: one per document, except with long_documents max (records older than
        # the count held one per document written)
        "windows": sum(r["written"] if r["windows"] is None else r["windows"] for r in rows),
        "nonzeros_per_doc": _percentiles(hist),
        "input_files": files,
        "skipped_files": sorted(r["bad_file"] for r in rows if r["bad_file"]),
        "output_files": sum(1 for r in rows if r["data_file"]),
        "wall_seconds": round(seconds, 3),
        # Throughput of this run's own work (rows reused from earlier attempts excluded).
        "docs_per_s": round((read - reused_rows) / seconds, 1) if seconds > 0 else None,
        "fingerprint": fingerprint.to_dict(),
        # Failures ridden through (the run adds actor restarts and retried blocks).
        "faults": {
            "oom_splits": sum(r["oom_splits"] or 0 for r in rows),
            "rows_isolated": rejected.get("encoder_crash", 0) + rejected.get("encoder_error", 0),
        },
    }
    if summary["rows_read"] != summary["rows_written"] + summary["rows_rejected"]:
        raise RowsLostError(f"rows_read {read} != rows_written {written} + rows_rejected {summary['rows_rejected']}")
    return summary


@dataclass
class Pace:
    """Start-up apart from the rate once encoders are up (wall-clock ``time.time()`` values).

    On a small job the fixed start-up (planning, actor processes importing torch, loading the
    model) dominates the end-to-end rate; the rate from the first encoder being ready to the
    last block written is what a long job runs at.
    """

    started: float = field(default_factory=time.time)
    encoders_ready: float | None = None  # the first encoder actor's construction finished
    first_block: float | None = None
    last_block: float | None = None
    rows: int = 0
    nodes: dict[str, list[str]] = field(default_factory=dict)  # the nodes that hosted encoders and writers
    progress: Progress = field(default_factory=Progress)  # the live line, a notebook's bar, the report's timeline
    encoded: dict[int, int] = field(default_factory=dict)  # rows encoded per second since the start (Ray)
    reused_rejected: int = 0  # rejects in the blocks reused from an earlier attempt
    written: list[tuple[float, int]] = field(default_factory=list)  # (seconds since the start, rows written)

    def block_written(self, rows_so_far: int) -> None:
        """This run's written blocks so far hold ``rows_so_far`` rows read."""
        now = time.time()
        self.first_block = self.first_block or now
        self.last_block, self.rows = now, rows_so_far
        self.written = thin([*self.written, (round(now - self.started, 3), rows_so_far)])

    def show(self, rows_so_far: int, rejected_so_far: int, actors: int | None = None, exact: bool = False) -> None:
        """Progress: this run has done ``rows_so_far`` rows, ``rejected_so_far`` of them rejected
        (``exact``: the final count, see :meth:`Progress.update`)."""
        p = self.progress
        done = p.reused + rows_so_far
        if p.total is not None and not p.estimated:
            done = min(done, p.total)  # a retried block's rows encoded twice never pass an exact total
        p.update(done, self.reused_rejected + rejected_so_far, actors, exact)

    def summary(self) -> dict[str, Any]:
        since = lambda t: round(t - self.started, 3) if t is not None else None  # noqa: E731
        rate = None
        if self.encoders_ready is not None and self.last_block is not None and self.last_block > self.encoders_ready:
            rate = round(self.rows / (self.last_block - self.encoders_ready), 1)
        return {
            "encoders_up_s": since(self.encoders_ready),
            "first_block_s": since(self.first_block),
            "docs_per_s_encoders_up": rate,
            "nodes": self.nodes,
            "timeline": {
                "progress": self.progress.to_dict(),
                "written": {"seconds": [t for t, _ in self.written], "rows": [r for _, r in self.written]},
                "encoded": {"seconds": sorted(self.encoded), "rows": [self.encoded[k] for k in sorted(self.encoded)]},
            },
        }


def check_rows(entries: pa.Table) -> None:
    """Before a commit: every block's rows arrived once, and each piece's rows are written or rejected."""
    rows = entries.to_pylist()
    _check_blocks(rows)
    for r in rows:
        rejected = sum(json.loads(r["rejected"]).values())
        if not r["bad_file"] and r["rows"] != r["written"] + rejected:
            raise RowsLostError(
                f"{r['data_file'] or r['rejects_file']}: {r['rows']} rows read != {r['written']} written + "
                f"{rejected} rejected"
            )


def _check_blocks(rows: list[dict[str, Any]]) -> None:
    seen: Counter[tuple[str, int]] = Counter()
    expected: dict[tuple[str, int], int] = {}
    for r in rows:
        if r["bad_file"]:
            continue
        seen[(r["unit"], r["block"])] += r["rows"]
        expected[(r["unit"], r["block"])] = r["block_rows"]
    lost = {k: (expected[k], n) for k, n in seen.items() if n != expected[k]}
    if lost:
        raise RowsLostError(
            f"blocks whose rows did not all arrive or arrived twice (unit, block): (read, arrived) = {lost}"
        )


def _percentiles(hist: Counter[int]) -> dict[str, float]:
    if not hist:
        return {"mean": 0.0, "p50": 0.0, "p99": 0.0}
    values = np.array(sorted(hist))
    counts = np.array([hist[v] for v in values])
    cumulative = np.cumsum(counts) / counts.sum()
    pick = lambda q: float(values[np.searchsorted(cumulative, q)])  # noqa: E731
    return {"mean": round(float((values * counts).sum() / counts.sum()), 2), "p50": pick(0.5), "p99": pick(0.99)}


def render(summary: dict[str, Any], output: str) -> str:
    nz = summary["nonzeros_per_doc"]
    lines = [
        f"splade-pipeline: {summary['rows_read']} rows read = {summary['rows_written']} written + "
        f"{summary['rows_rejected']} rejected",
        f"  rejected by reason: {summary['rejected_by_reason'] or 'none'}; duplicate ids: {summary['duplicate_ids']}; "
        f"truncated: {summary['truncated']}",
        f"  reused from earlier attempts (not encoded again): {summary['rows_reused']} rows",
        "  failures ridden through: " + (", ".join(f"{k} {v}" for k, v in summary["faults"].items() if v) or "none"),
        f"  tokens: {summary['tokens']}{_render_windows(summary)}; non-zeros per vector: mean {nz['mean']}, "
        f"p50 {nz['p50']:.0f}, p99 {nz['p99']:.0f}",
        f"  {summary['input_files']} input files, {summary['output_files']} output files, skipped files: "
        f"{len(summary['skipped_files'])}",
        f"  {summary['wall_seconds']} s, {summary['docs_per_s']} docs/s" + _render_pace(summary.get("pace")),
        f"  output: {output}",
    ]
    if summary.get("report"):
        lines.append(f"  report: {summary['report']}")
    lines += [f"  skipped: {s}" for s in summary["skipped_files"]]
    return "\n".join(lines)


def _render_windows(summary: dict[str, Any]) -> str:
    windows = summary.get("windows")
    return f" in {windows} windows" if windows is not None and windows != summary["rows_written"] else ""


def _render_pace(pace: dict[str, float | None] | None) -> str:
    if not pace or pace.get("encoders_up_s") is None:
        return ""
    rate = pace.get("docs_per_s_encoders_up")
    return f" (start-up {pace['encoders_up_s']} s" + (f", then {rate} docs/s)" if rate else ")")
