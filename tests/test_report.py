"""The run report (_REPORT.html) and ``status`` on a real run: every plot present, its numbers the
summary's and the table's; ``report --from`` builds it again; the notebook's progress callback."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pyarrow.compute as pc
from support.jobs import corpus_rows, read_delta

from pipeline.report import FIGURES, REPORT_FILE

FIGURE = re.compile(r'<script type="application/json" id="fig-(\w+)">(.*?)</script>', re.S)


def figures(page: str) -> dict[str, dict[str, Any]]:
    return {name: json.loads(data) for name, data in FIGURE.findall(page)}


def bars(fig: dict[str, Any]) -> dict[Any, Any]:
    trace = fig["data"][0]
    return dict(zip(trace.get("x", []), trace.get("y", []), strict=True))


def counts(values: Any) -> dict[int, int]:
    found = pc.value_counts(values)
    return dict(zip(found.field("values").to_pylist(), found.field("counts").to_pylist(), strict=True))


def test_report_and_status_of_a_run(ray_cluster: str, splade_tiny: Path, tmp_path: Path) -> None:
    from pipeline.cli import main
    from pipeline.config import load_config
    from pipeline.job.encode import run_job
    from pipeline.job.progress import Progress
    from pipeline.output.location import OutputLocation
    from pipeline.status import output_status

    rows = corpus_rows(90)
    rows[3]["text"] = "   "  # empty_text
    rows[7]["id"] = ""  # missing_id
    rows[11]["id"] = rows[10]["id"]  # a duplicate id
    rows[20]["text"] = "long " * 200  # truncated at max_length
    src = tmp_path / "in.jsonl"
    src.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    out = tmp_path / "out"
    config = load_config(
        None,
        {
            "input.paths": [str(src)],
            "output.path": str(out),
            "encoder.model": str(splade_tiny),
            "encoder.max_length": 48,
            "input.rows_per_block": 16,
        },
    )
    seen: list[tuple[int, int | None, bool]] = []

    def on_progress(p: Progress) -> None:
        seen.append((p.done, p.total, p.finished))

    summary = run_job(config, on_progress=on_progress)
    assert seen[-1] == (90, 90, True) and [d for d, _, _ in seen] == sorted(d for d, _, _ in seen)
    assert len(seen) >= 2 and all(total == 90 for _, total, _ in seen)  # the total known from the start

    page = (out / REPORT_FILE).read_text()
    assert summary["report"] == f"file://{out / REPORT_FILE}"
    figs = figures(page)
    assert tuple(figs) == FIGURES
    assert (
        bars(figs["rejects"]) == summary["rejected_by_reason"] == {"empty_text": 1, "missing_id": 1, "duplicate_id": 1}
    )
    faults = {k: v for k, v in summary["faults"].items() if k not in ("encoder_actors", "encoder_nodes")}
    assert bars(figs["faults"]) == faults and "oom_splits" in faults
    table = read_delta(str(out))
    tokens = bars(figs["tokens"])
    assert sum(tokens.values()) == summary["rows_written"] == table.num_rows == 87
    assert max(tokens) == 48 and tokens[48] == summary["truncated"] >= 1
    assert tokens == counts(table["num_tokens"])  # the table's own
    assert [s["x0"] for s in figs["tokens"]["layout"]["shapes"]] == [48]  # the truncation line
    nnz = bars(figs["nonzeros"])
    assert sum(nnz.values()) == 87
    assert nnz == counts(pc.list_value_length(table["sparse"].combine_chunks().field("indices")))
    terms = figs["top_terms"]["data"][0]
    assert len(terms["y"]) == 30 and all(re.fullmatch(r".+ \(#\d+\)", t) for t in terms["y"])
    assert max(terms["x"]) <= 87 and terms["x"] == sorted(terms["x"])  # drawn bottom-up
    names = [t["name"] for t in figs["throughput"]["data"]]
    assert names == ["encoded", "written"]
    encoded = figs["throughput"]["data"][0]
    width = encoded["x"][1] - encoded["x"][0] if len(encoded["x"]) > 1 else 1
    assert round(sum(encoded["y"]) * width) == 90  # every row read was encoded once (rejects included)
    written = figs["throughput"]["data"][1]
    assert round(sum(written["y"]) * width) == 90 and written["x"] == encoded["x"]  # every row read, written
    assert f"{summary['rows_read']:,} = 87 written + 3 rejected" in page

    (out / REPORT_FILE).unlink()
    assert main(["report", "--from", str(out)]) == 0
    assert figures((out / REPORT_FILE).read_text()) == figs  # built again from the output alone

    status = output_status(OutputLocation(str(out)))
    assert status["table"]["version"] == summary["table_version"] == 0
    assert (status["table"]["documents"], status["table"]["rejected"]) == (87, 3)
    assert status["table"]["fingerprint"]["max_length"] == 48 and status["uncommitted_files"] == 0
    assert [r["state"] for r in status["runs"]] == ["committed"] and status["runs"][0]["done"] == 90
    assert status["stores"] == []

    # the encoders' metrics on the node's Prometheus endpoint, tagged with the run's attempt
    attempt = status["runs"][0]["attempt"]
    metrics = _scrape_until(lambda m: m.get(("documents_total", "encoded"), 0) > 0, attempt)
    assert set(metrics) >= {("documents_total", "encoded"), ("tokens_total", ""), ("block_documents_count", "")}
    assert metrics[("documents_total", "encoded")] <= 87 and metrics[("tokens_total", "")] <= summary["tokens"]


def _scrape_until(done: Any, attempt: str, timeout: float = 60) -> dict[tuple[str, str], float]:
    """Our series on the head node's metrics endpoint for ``attempt`` (name less prefix, outcome) -> value."""
    import time
    import urllib.request

    import ray

    port = ray.nodes()[0]["MetricsExportPort"]
    found: dict[tuple[str, str], float] = {}
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
        found = {}
        for m in re.finditer(r"^ray_splade_pipeline_(\w+)\{([^}]*)\} (\S+)$", text, re.M):
            tags = dict(re.findall(r'(\w+)="([^"]*)"', m.group(2)))
            if tags.get("attempt") == attempt:
                key = (m.group(1), tags.get("outcome", ""))
                found[key] = found.get(key, 0.0) + float(m.group(3))
        if done(found):
            return found
        time.sleep(1)
    raise AssertionError(f"no metrics of {attempt} on the endpoint in {timeout} s: {found}")
