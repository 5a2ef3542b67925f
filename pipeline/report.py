"""The run report: ``_REPORT.html`` beside ``_SUMMARY.json``, one self-contained page (plotly.js
inlined: it opens offline) with the plots a person reads at a glance.

- throughput: documents per second over the run, as encoded (Ray: blocks finished by the encoders)
  and as written (blocks durable in the output), with the run's mean;
- document length: tokens per document, with the truncation line (``encoder.max_length``);
- non-zeros per vector: from every block's histogram (all documents, exact);
- top terms: the vocabulary terms in most documents, and their mean weight;
- rejects by reason and failures ridden through: the summary's counts.

Token lengths and terms are read from the table's data files: all of them up to
:data:`SAMPLE_ROWS` rows, else files spread evenly over the table until that many (the page says
which). Each figure's data sits in the page as JSON (``<script type="application/json"
id="fig-<name>">``), drawn from there: what the page shows is what a test reads.
``splade-pipeline report --from <output>`` builds it again from the output alone.
"""

from __future__ import annotations

import html
import json
import logging
import math
from collections import Counter
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.output.layout import REPORT_FILE, SUMMARY_FILE
from pipeline.output.location import OutputLocation

log = logging.getLogger(__name__)
SAMPLE_ROWS = 200_000
TOP_TERMS = 30
MAX_BINS = 120  # the throughput plot's points
FIGURES = ("throughput", "tokens", "nonzeros", "top_terms", "rejects", "faults")


def write_report(loc: OutputLocation, summary: dict[str, Any], options: dict[str, str] | None = None) -> str | None:
    """Build and write the report of ``summary`` (the run just committed at ``loc``); returns its URL.
    A report that cannot be built is said and skipped: it never fails a committed run."""
    try:
        page = build_report(loc, summary, options or {})
        loc.write_bytes(REPORT_FILE, page.encode())
    except Exception as err:  # noqa: BLE001 - the table and the summary are committed; the report is a view of them
        log.warning("the run report was not written: %s: %s", type(err).__name__, err)
        return None
    return loc.url_of(REPORT_FILE)


def rebuild_report(loc: OutputLocation, options: dict[str, str] | None = None) -> str:
    """``splade-pipeline report --from``: the report again, from the output's summary and table."""
    try:
        summary = json.loads(loc.read_bytes(SUMMARY_FILE))
    except FileNotFoundError:
        from pipeline.output.location import OutputError

        raise OutputError(f"{loc.url_of(SUMMARY_FILE)} does not exist: no run has finished at this output") from None
    loc.write_bytes(REPORT_FILE, build_report(loc, summary, options or {}).encode())
    return loc.url_of(REPORT_FILE)


def build_report(loc: OutputLocation, summary: dict[str, Any], options: dict[str, str]) -> str:
    """The page (HTML text) for ``summary`` and the version of the table at ``loc`` its run committed
    (another run may have committed since; the latest where that version can no longer be read)."""
    from pipeline.job.load import committed_output

    version = summary.get("table_version")
    try:
        committed, fingerprint = committed_output(loc, options, version if isinstance(version, int) else None)
    except Exception:  # noqa: BLE001 - its log or files cleaned up by vacuum: the latest version, named on the page
        committed, fingerprint = committed_output(loc, options)
    files = sorted(committed.snapshot.files)
    sample = _sample(loc, files)
    max_length = fingerprint.max_length
    figures = {
        "throughput": throughput_figure(summary),
        "tokens": _histogram(
            sample["num_tokens"], "Document length", "tokens per document", truncation=max_length, note=sample["note"]
        ),
        "nonzeros": _nonzeros_figure(committed.entries),
        "top_terms": _terms_figure(sample["sparse"], fingerprint, sample["note"]),
        "rejects": _bars(summary.get("rejected_by_reason") or {}, "Rejected rows by reason", "rows"),
        "faults": _bars(failures(summary), "Failures ridden through", "count"),
    }
    return _page(summary, committed.version, figures)


NOT_FAILURES = ("encoder_actors", "encoder_nodes")  # in the summary's faults, but counts of what ran


def failures(summary: dict[str, Any]) -> dict[str, Any]:
    """The summary's failures ridden through (its ``faults`` less the counts of actors and nodes)."""
    return {k: v for k, v in (summary.get("faults") or {}).items() if k not in NOT_FAILURES}


def throughput_figure(summary: dict[str, Any]) -> Any:
    """Documents per second over the run: encoded (per second, from the encoders) and written
    (from the blocks' arrival), binned to at most :data:`MAX_BINS` points."""
    import plotly.graph_objects as go

    timeline = (summary.get("pace") or {}).get("timeline") or {}
    written = timeline.get("written") or {}
    encoded = timeline.get("encoded") or {}
    seconds, rows = written.get("seconds") or [], written.get("rows") or []
    end = max([*seconds, *(encoded.get("seconds") or []), 1.0])
    width = max(1.0, math.ceil(end / MAX_BINS))
    edges = np.arange(0.0, end + width, width)
    fig = go.Figure()
    if encoded.get("seconds"):
        counts, _ = np.histogram(encoded["seconds"], bins=edges, weights=encoded["rows"])
        fig.add_scatter(x=edges[:-1].tolist(), y=(counts / width).round(2).tolist(), name="encoded", mode="lines")
    if seconds:
        at = np.interp(edges, [0.0, *seconds], [0, *rows])  # rows written by each edge (0 at the start)
        fig.add_scatter(x=edges[:-1].tolist(), y=(np.diff(at) / width).round(2).tolist(), name="written", mode="lines")
    mean = summary.get("docs_per_s")
    if mean:
        fig.add_hline(y=mean, line_dash="dot", annotation_text=f"run mean {mean} docs/s")
    fig.update_layout(title="Throughput", xaxis_title="seconds since the start", yaxis_title="documents per second")
    return fig


def _sample(loc: OutputLocation, files: list[str]) -> dict[str, Any]:
    """``num_tokens`` and ``sparse`` of the table's rows: all of them up to :data:`SAMPLE_ROWS`,
    else of files spread over the table until that many rows."""
    from pipeline.output.reading import batches

    order = _spread(files)
    tokens: list[pa.Array] = [pa.array([], pa.int32())]
    sparse: list[pa.Array] = []
    rows, used = 0, 0
    cut = False
    for rel in order:
        if rows >= SAMPLE_ROWS:
            break
        used += 1
        for table in batches(loc, [rel], ["num_tokens", "sparse"], batch_size=65536, who="report"):
            if rows + table.num_rows > SAMPLE_ROWS:  # a file larger than the sample: its first rows
                table, cut = table.slice(0, SAMPLE_ROWS - rows), True
            tokens.append(table["num_tokens"].combine_chunks())
            sparse.append(table["sparse"].combine_chunks())
            rows += table.num_rows
            if cut:
                break
    if used == len(files) and not cut:
        note = "every document"
    else:
        note = f"{rows:,} documents from {used} of the table's {len(files)} files"
    return {"num_tokens": pa.concat_arrays(tokens), "sparse": sparse, "note": note}


def _spread(files: list[str]) -> list[str]:
    """``files`` in an order that spreads any prefix over the whole list (halving strides)."""
    order: list[int] = []
    seen: set[int] = set()
    step = 1 << max(0, (len(files) - 1).bit_length())
    while step >= 1:
        for i in range(0, len(files), step):
            if i not in seen:
                seen.add(i)
                order.append(i)
        step //= 2
    return [files[i] for i in order]


def _histogram(values: pa.Array, title: str, axis: str, truncation: int | None = None, note: str = "") -> Any:
    import plotly.graph_objects as go

    counts = Counter(pc.drop_null(values).to_numpy(zero_copy_only=False).tolist())
    x = sorted(counts)
    fig = go.Figure(go.Bar(x=x, y=[counts[v] for v in x], name="documents"))
    if truncation:
        fig.add_vline(x=truncation, line_dash="dash", line_color="red", annotation_text=f"max_length {truncation}")
    fig.update_layout(title=f"{title} ({note})" if note else title, xaxis_title=axis, yaxis_title="documents")
    return fig


def _nonzeros_figure(entries: pa.Table | None) -> Any:
    import plotly.graph_objects as go

    hist: Counter[int] = Counter()
    for text in entries["nnz_hist"].to_pylist() if entries is not None else []:
        hist.update({int(k): int(v) for k, v in json.loads(text or "{}").items()})
    x = sorted(hist)
    fig = go.Figure(go.Bar(x=x, y=[hist[v] for v in x], name="vectors"))
    fig.update_layout(
        title="Non-zeros per vector (every document)", xaxis_title="non-zero terms", yaxis_title="vectors"
    )
    return fig


def _terms_figure(sparse: list[pa.Array], fingerprint: Any, note: str) -> Any:
    import plotly.graph_objects as go

    size = fingerprint.vocab_size
    df = np.zeros(size, np.int64)
    weight = np.zeros(size, np.float64)
    for chunk in sparse:
        chunk = pc.drop_null(chunk)
        indices = pc.list_flatten(chunk.field("indices")).to_numpy(zero_copy_only=False)
        values = pc.list_flatten(chunk.field("values")).to_numpy(zero_copy_only=False)
        df += np.bincount(indices, minlength=size)[:size]
        weight += np.bincount(indices, weights=values, minlength=size)[:size]
    top = [int(i) for i in np.argsort(-df, kind="stable")[:TOP_TERMS] if df[i] > 0]
    names = _term_names(fingerprint.model, top)
    mean = [round(float(weight[i] / df[i]), 4) for i in top]
    fig = go.Figure(
        go.Bar(
            x=[int(df[i]) for i in top][::-1],
            y=names[::-1],
            orientation="h",
            customdata=mean[::-1],
            hovertemplate="%{y}: in %{x} documents, mean weight %{customdata}<extra></extra>",
            name="documents",
        )
    )
    fig.update_layout(title=f"Top terms ({note})", xaxis_title="documents holding the term")
    return fig


def _term_names(model: str, ids: list[int]) -> list[str]:
    """The tokens of ``ids`` (``#id`` where the model's tokenizer cannot be loaded here)."""
    try:
        from pipeline.export import vocabulary

        vocab = vocabulary(model)
        return [f"{vocab[i]} (#{i})" for i in ids]
    except Exception as err:  # noqa: BLE001 - a report without token strings still shows the ids
        log.info("report: no tokenizer for %s (%s); terms shown by id", model, err)
        return [f"#{i}" for i in ids]


def _bars(counts: dict[str, Any], title: str, axis: str) -> Any:
    import plotly.graph_objects as go

    items = sorted(((k, v) for k, v in counts.items() if isinstance(v, int | float)), key=lambda kv: -kv[1])
    fig = go.Figure(go.Bar(x=[k for k, _ in items], y=[v for _, v in items], name=axis))
    if not items or not any(v for _, v in items):
        fig.add_annotation(text="none", showarrow=False, font={"size": 28}, xref="paper", yref="paper", x=0.5, y=0.5)
        fig.update_xaxes(visible=False)
        fig.update_yaxes(visible=False)
    fig.update_layout(title=title, yaxis_title=axis)
    return fig


def _page(summary: dict[str, Any], version: int, figures: dict[str, Any]) -> str:
    from plotly.offline import get_plotlyjs

    facts = _facts(summary, version)
    rows = "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(str(v))}</td></tr>" for k, v in facts.items())
    blocks = []
    for name, fig in figures.items():
        data = fig.to_json().replace("<", "\\u003c")  # no text of the data can close or open a script element
        blocks.append(
            f'<section><div id="plot-{name}" class="plot"></div>'
            f'<script type="application/json" id="fig-{name}">{data}</script></section>'
        )
    draw = (
        "for (const el of document.querySelectorAll('script[id^=fig-]')) {"
        " const fig = JSON.parse(el.textContent);"
        " Plotly.newPlot('plot-' + el.id.slice(4), fig.data, fig.layout, {responsive: true}); }"
    )
    title = f"splade-pipeline run report: {html.escape(str(summary.get('output', '')))}"
    return (
        f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{title}</title>"
        f"<style>{_STYLE}</style><script>{get_plotlyjs()}</script></head><body>"
        f"<h1>{title}</h1><table class='facts'>{rows}</table>{''.join(blocks)}<script>{draw}</script></body></html>"
    )


def _facts(summary: dict[str, Any], version: int) -> dict[str, Any]:
    fp = summary.get("fingerprint") or {}
    faults = summary.get("faults") or {}
    return {
        "rows read": f"{summary.get('rows_read', 0):,} = {summary.get('rows_written', 0):,} written + "
        f"{summary.get('rows_rejected', 0):,} rejected",
        "reused from an earlier attempt": f"{summary.get('rows_reused', 0):,}",
        "tokens": f"{summary.get('tokens', 0):,} ({summary.get('truncated', 0):,} documents truncated)",
        "time": f"{summary.get('wall_seconds')} s, {summary.get('docs_per_s')} docs/s",
        "engine": summary.get("engine", "ray")
        + (
            f", {_count(faults['encoder_actors'], 'encoder actor')} on {_count(faults['encoder_nodes'], 'node')}"
            if "encoder_nodes" in faults
            else ""
        ),
        "model": f"{fp.get('model')} ({fp.get('dtype')}, max_length {fp.get('max_length')})",
        "table version": version,
    }


def _count(n: Any, noun: str) -> str:
    return f"{n} {noun}" + ("" if n == 1 else "s")


_STYLE = (
    "body{font-family:system-ui,sans-serif;margin:2em;max-width:1200px}"
    ".facts th{text-align:left;padding-right:1.5em}.plot{height:420px;margin:1.5em 0}#plot-top_terms{height:720px}"
)
