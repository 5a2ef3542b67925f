"""Retrieval evaluation of a committed output (``splade-pipeline evaluate``).

The judged queries are encoded (:meth:`SpladeEncoder.encode_queries`, the model the output was
encoded with unless told otherwise), every document of the output's latest version is scored by
exact dot product (sparse matrix products on the CPU, one batch of documents at a time, so memory
is bounded by queries x batch whatever the corpus), and the ``depth`` best per query are kept
(zero scores never count as hits). MRR@10, nDCG@10 and Recall@100 are computed by ir-measures
(trec_eval's definitions through pytrec_eval, MS MARCO's RR) and averaged over every judged query
that has a relevant document; a query without a hit scores 0 (trec_eval's ``-c``).

``compare``: a second output scored on the same queries, with per-query differences and index
sizes. ``prune_sweep``: the output's vectors with each ``top_k`` applied (heaviest terms kept, as
the encoder prunes), all in the same pass over the output.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from pipeline.config import SinkConfig
from pipeline.encode.sparse import sparse_csr, sparse_rows
from pipeline.encode.splade import csr_top_k
from pipeline.errors import SettingError
from pipeline.output.location import OutputLocation
from pipeline.output.reading import batches
from pipeline.storage import open_url, url_to_fs

METRICS = ("MRR@10", "nDCG@10", "Recall@100")
DEPTH = 100
SCORES_PER_STEP = 2**23  # queries x documents scored at once (float64: 64 MiB per copy, a few copies a step)
PROGRESS_EVERY_S = 10.0


@dataclass(frozen=True)
class Topics:
    """Judged queries: their texts, and per query the graded judgments (> 0: relevant)."""

    queries: dict[str, str]
    qrels: dict[str, dict[str, int]]
    without_relevant: int = 0  # judged queries with no relevant document: left out, as trec_eval does


@dataclass
class Ranking:
    """The best ``depth`` documents per query: positions in the output's row order (-1: none) and scores."""

    positions: np.ndarray
    scores: np.ndarray
    nonzeros: int = 0

    @classmethod
    def empty(cls, queries: int, depth: int) -> Ranking:
        return cls(np.full((queries, depth), -1, np.int64), np.full((queries, depth), -np.inf))

    def merge(self, scores: np.ndarray, first: int) -> None:
        """Fold in the scores of documents ``first, first + 1, ...`` (one column each)."""
        depth = self.positions.shape[1]
        scores = np.where(scores > 0, scores, -np.inf)
        both = np.concatenate([self.scores, scores], axis=1)
        where = np.concatenate(
            [self.positions, np.broadcast_to(np.arange(first, first + scores.shape[1]), scores.shape)], axis=1
        )
        if both.shape[1] > depth:  # ties at the cut: the earlier document in the output's row order stays
            keep = np.lexsort((where, -both), axis=1)[:, :depth]
            both, where = np.take_along_axis(both, keep, 1), np.take_along_axis(where, keep, 1)
        self.scores, self.positions = both, np.where(np.isfinite(both), where, -1)


@dataclass
class Evaluated:
    """One output (or one pruning of it): the metrics, per query and averaged, and its index size."""

    name: str
    metrics: dict[str, float]
    per_query: dict[str, dict[str, float]]
    documents: int
    nonzeros: int | None  # None: not known (a store's index)
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def index_bytes(self) -> int | None:
        return None if self.nonzeros is None else self.nonzeros * 8  # an int32 term id and a float32 weight

    def row(self) -> dict[str, Any]:
        size = self.index_bytes
        per_doc = None if self.nonzeros is None else round(self.nonzeros / self.documents, 1) if self.documents else 0.0
        return {
            "name": self.name,
            **{m: round(v, 4) for m, v in self.metrics.items()},
            "documents": self.documents,
            "nonzeros": self.nonzeros,
            "nonzeros_per_doc": per_doc,
            "index_mib": None if size is None else round(size / 2**20, 3),
            **self.extra,
        }


# ---- topics ------------------------------------------------------------------------------------


def load_topics(queries: str, qrels: str | None = None, storage_options: dict[str, Any] | None = None) -> Topics:
    """Queries and judgments. ``queries`` is a BEIR folder (``queries.jsonl``, ``qrels/test.tsv``), a
    JSON-lines file (``{"_id", "text"}``) or a TSV (``id<TAB>text``); ``qrels`` a BEIR TSV
    (``query-id corpus-id score`` under a header) or TREC qrels (``qid 0 docid grade``)."""
    fs, root = url_to_fs(queries, storage_options)
    if fs.isdir(root):
        qrels = qrels or f"{queries.rstrip('/')}/qrels/test.tsv"
        queries = f"{queries.rstrip('/')}/queries.jsonl"
    if qrels is None:
        raise SettingError("evaluate: --qrels is needed unless --queries is a BEIR folder (queries.jsonl, qrels/)")
    texts = _read_queries(queries, storage_options)
    judged = _read_qrels(qrels, storage_options)
    missing = sorted(q for q in judged if q not in texts)
    if missing:
        raise SettingError(f"evaluate: {qrels} judges queries that {queries} lacks: {missing[:5]}")
    relevant = {q: docs for q, docs in judged.items() if any(g > 0 for g in docs.values())}
    if not relevant:
        raise SettingError(f"evaluate: {qrels} holds no relevant judgment (grade > 0)")
    return Topics({q: texts[q] for q in relevant}, relevant, len(judged) - len(relevant))


def _lines(url: str, storage_options: dict[str, Any] | None) -> list[str]:
    try:
        with open_url(url, "rb", storage_options, compression="infer") as handle:
            return handle.read().decode("utf-8").splitlines()
    except FileNotFoundError:
        raise SettingError(f"evaluate: {url}: no such file") from None
    except UnicodeDecodeError as err:
        raise SettingError(f"evaluate: {url}: not UTF-8 text ({err})") from None


def _read_queries(url: str, storage_options: dict[str, Any] | None) -> dict[str, str]:
    out: dict[str, str] = {}
    tsv = url.split("?")[0].endswith((".tsv", ".tsv.gz", ".txt"))
    for number, line in enumerate(_lines(url, storage_options), 1):
        if not line.strip():
            continue
        if tsv:
            qid, sep, text = line.partition("\t")
            if not sep:
                raise SettingError(f"evaluate: {url} line {number}: expected 'id<TAB>text'")
        else:
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise SettingError(f"evaluate: {url} line {number}: not JSON ({err.msg})") from None
            qid, text = (record.get("_id"), record.get("text")) if isinstance(record, dict) else (None, None)
            if not isinstance(qid, str | int) or not isinstance(text, str):
                raise SettingError(f'evaluate: {url} line {number}: expected {{"_id": ..., "text": "..."}}')
        out[str(qid)] = text
    return out


def _read_qrels(url: str, storage_options: dict[str, Any] | None) -> dict[str, dict[str, int]]:
    out: dict[str, dict[str, int]] = {}
    for number, line in enumerate(_lines(url, storage_options), 1):
        parts = line.split("\t") if "\t" in line else line.split()
        if not line.strip() or (number == 1 and parts[0].strip().lower() in ("query-id", "query_id", "qid")):
            continue
        if len(parts) == 3:
            qid, doc, grade = parts
        elif len(parts) == 4:
            qid, _, doc, grade = parts
        else:
            raise SettingError(f"evaluate: {url} line {number}: expected 'query-id corpus-id score' or TREC qrels")
        try:
            out.setdefault(qid.strip(), {})[doc.strip()] = int(grade)
        except ValueError:
            raise SettingError(
                f"evaluate: {url} line {number}: the grade {grade.strip()!r} is not an integer"
            ) from None
    return out


# ---- retrieval ---------------------------------------------------------------------------------


def retrieve(
    loc: OutputLocation,
    files: list[str],
    queries: pa.StructArray,
    vocab_size: int,
    prunings: Sequence[int | None],
    *,
    depth: int = DEPTH,
    total: int | None = None,
    say: Callable[[str], None] = print,
    group_by_parent: bool = False,
) -> tuple[list[str], dict[int | None, Ranking]]:
    """The output's document ids (row order) and, per pruning (``top_k``; None: the vectors as they
    are), every query's best ``depth`` documents by exact dot product, in one pass over ``files``.

    ``group_by_parent`` (a long_documents split output, whose rows are windows): a document scores
    the best of its windows' scores, and the ids are the documents' (``parent_id``). A document's
    windows are consecutive rows (the job writes them together), so each batch's windows are
    pooled by runs, and the last document of a batch is held back until the next batch shows
    whether its windows go on."""
    from scipy import sparse

    q_offsets, q_indices, q_values = sparse_csr(queries)
    matrix = sparse.csr_matrix((q_values.astype(np.float64), q_indices, q_offsets), shape=(len(queries), vocab_size))
    rankings = {k: Ranking.empty(len(queries), depth) for k in prunings}
    ids: list[str] = []
    held: tuple[str, dict[int | None, np.ndarray]] | None = None  # group_by_parent: the open document
    step = max(16, SCORES_PER_STEP // max(1, len(queries)))
    started = last = time.monotonic()
    rows = 0
    columns = ["id", "sparse", *(["parent_id"] if group_by_parent else [])]
    for batch in batches(loc, files, columns, batch_size=step, who="evaluate"):
        rows += batch.num_rows
        offsets, indices, values = sparse_csr(batch["sparse"])
        scores = {}
        for k, ranking in rankings.items():
            o, i, v = csr_top_k(offsets, indices, values, k)
            docs = sparse.csr_matrix((v.astype(np.float64), i, o), shape=(batch.num_rows, vocab_size))
            scores[k] = (matrix @ docs.T).toarray()
            ranking.nonzeros += len(i)
        if not group_by_parent:
            for k, ranking in rankings.items():
                ranking.merge(scores[k], len(ids))
            ids += batch["id"].to_pylist()
        elif batch.num_rows:
            parents = batch["parent_id"].to_numpy(zero_copy_only=False)
            starts = np.flatnonzero(np.concatenate([[True], parents[1:] != parents[:-1]]))
            names = parents[starts].tolist()
            pooled = {k: np.maximum.reduceat(s, starts, axis=1) for k, s in scores.items()}
            if held is not None and held[0] == names[0]:  # the held document's windows go on
                for k in pooled:
                    pooled[k][:, 0] = np.maximum(pooled[k][:, 0], held[1][k])
            elif held is not None:
                for k, ranking in rankings.items():
                    ranking.merge(held[1][k][:, None], len(ids))
                ids.append(held[0])
            for k, ranking in rankings.items():
                ranking.merge(pooled[k][:, :-1], len(ids))
            ids += names[:-1]
            held = (names[-1], {k: p[:, -1] for k, p in pooled.items()})
        if time.monotonic() - last >= PROGRESS_EVERY_S:
            last = time.monotonic()
            of = f" of {total}" if total else ""
            say(f"  ... {rows}{of} rows scored ({rows / (last - started):.0f}/s)")
    if held is not None:
        for k, ranking in rankings.items():
            ranking.merge(held[1][k][:, None], len(ids))
        ids.append(held[0])
    return ids, rankings


def measure(topics: Topics, ids: list[str], ranking: Ranking) -> tuple[dict[str, float], dict[str, dict[str, float]]]:
    """The metrics averaged over the judged queries, and per query (0 for a query without a hit)."""
    import ir_measures
    from ir_measures import RR, R, nDCG

    measures = {RR @ 10: "MRR@10", nDCG @ 10: "nDCG@10", R @ 100: "Recall@100"}
    qids = list(topics.queries)
    qrels = [ir_measures.Qrel(q, d, g) for q in qids for d, g in topics.qrels[q].items()]
    run = [
        ir_measures.ScoredDoc(qids[row], ids[p], float(s))
        for row in range(len(qids))
        for p, s in zip(ranking.positions[row], ranking.scores[row], strict=True)
        if p >= 0
    ]
    per_query = {q: dict.fromkeys(METRICS, 0.0) for q in qids}
    for metric in ir_measures.iter_calc(list(measures), qrels, run):
        per_query[metric.query_id][measures[metric.measure]] = float(metric.value)
    means = {m: float(np.mean([per_query[q][m] for q in qids])) for m in METRICS}
    return means, per_query


# ---- the command -------------------------------------------------------------------------------


@dataclass(frozen=True)
class EvalSettings:
    """What ``splade-pipeline evaluate`` does (its command-line flags)."""

    queries: str
    qrels: str | None = None
    compare: str | None = None
    prune_sweep: tuple[int, ...] = ()
    depth: int = DEPTH
    model: str | None = None  # default: the model the output was encoded with
    query_model: str | None = None
    out: str | None = None  # a folder for EVALUATION.json and the sweep's plot (a sweep: ./evaluation)
    group_by_parent: bool = False  # a split output's windows pooled per document (max score)
    through_store: bool = False  # rank with the configured store's search instead of exact dot products

    def __post_init__(self) -> None:
        if self.depth < 100:
            raise SettingError(f"evaluate --depth: {self.depth} must be at least 100 (Recall@100 needs 100 hits)")
        if self.through_store and self.prune_sweep:
            raise SettingError(
                "evaluate --prune-sweep prunes the output's vectors, which a store's search cannot; leave out "
                "--through-store (the sweep is exact)"
            )
        if any(k < 1 for k in self.prune_sweep):
            raise SettingError(f"evaluate --prune-sweep: {list(self.prune_sweep)}: every top_k must be at least 1")


def evaluate(
    source: OutputLocation,
    settings: EvalSettings,
    *,
    table_options: dict[str, str] | None = None,
    storage_options: dict[str, Any] | None = None,
    say: Callable[[str], None] = print,
    sink: SinkConfig | None = None,
) -> dict[str, Any]:
    """Evaluate the output at ``source`` (and ``settings.compare``, and each pruning); returns the report
    (also written as ``EVALUATION.json`` under ``settings.out``). ``settings.through_store``: the
    rankings come from the store ``sink`` (loaded from ``source``) instead."""
    _require("ir_measures", "pytrec_eval", "scipy", *(["matplotlib"] if settings.prune_sweep else []))
    topics = load_topics(settings.queries, settings.qrels, storage_options)
    left_out = f" ({topics.without_relevant} without a relevant document left out)" if topics.without_relevant else ""
    say(f"evaluate: {len(topics.queries)} judged queries{left_out}")
    if settings.through_store:
        if sink is None or not sink.type:
            raise SettingError("evaluate --through-store: no vector store configured (sink.type in --config)")
        main = [_evaluate_store(source, sink, settings, topics, table_options, say)]
    else:
        main = _evaluate_output(source, settings, topics, [None, *settings.prune_sweep], table_options, say)
    how = f"the store's search ({sink.type})" if settings.through_store and sink else "exact dot product"
    report: dict[str, Any] = {"queries": len(topics.queries), "depth": settings.depth, "ranking": how}
    report["outputs"] = [main[0].row()]
    if settings.compare:
        other_loc = OutputLocation(settings.compare, source.storage_options)
        other = _evaluate_output(other_loc, settings, topics, [None], table_options, say, main=False)[0]
        report["outputs"].append(other.row())
        report["per_query_differences"] = _differences(main[0], other)
    if settings.prune_sweep:
        report["prune_sweep"] = [e.row() | {"top_k": k} for k, e in zip(settings.prune_sweep, main[1:], strict=True)]
    folder = settings.out or ("evaluation" if settings.prune_sweep else None)  # a sweep always gets its plot
    if folder:
        out = Path(folder)
        out.mkdir(parents=True, exist_ok=True)
        if settings.prune_sweep:
            report["plot"] = str(plot_sweep(main[0], main[1:], settings.prune_sweep, out / "prune_sweep.png"))
        (out / "EVALUATION.json").write_text(json.dumps(report, indent=2))
    say(render(report))
    return report


def _require(*modules: str) -> None:
    import importlib.util

    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        raise SettingError(
            f"evaluate needs {', '.join(missing)}: pip install 'splade-pipeline[eval]' (ir-measures, "
            "pytrec-eval-terrier, scipy, matplotlib)"
        )


def _evaluate_output(
    loc: OutputLocation,
    settings: EvalSettings,
    topics: Topics,
    prunings: list[int | None],
    table_options: dict[str, str] | None,
    say: Callable[[str], None],
    *,
    main: bool = True,
) -> list[Evaluated]:
    from pipeline.job.load import committed_output

    committed, fingerprint = committed_output(loc, table_options or {})
    model, queries, encoded_s = _encoded_queries(settings, topics, fingerprint)
    group = _grouped(loc, committed, settings, main=main, say=say)
    entries = committed.entries
    counted = "windows" if "parent_id" in committed.snapshot.schema.names else "written"
    total = None if entries is None else int(np.sum(entries[counted].to_numpy(zero_copy_only=False)))
    files = sorted(committed.snapshot.files)
    ids, rankings = retrieve(
        loc,
        files,
        queries,
        fingerprint.vocab_size,
        prunings,
        depth=settings.depth,
        total=total,
        say=say,
        group_by_parent=group,
    )
    if len(set(ids)) != len(ids):
        raise SettingError(
            f"evaluate: {loc.url} holds an id more than once (or a document's windows apart); its rankings would "
            "count it twice"
        )
    out = []
    for k in prunings:
        metrics, per_query = measure(topics, ids, rankings[k])
        name = loc.url if k is None else f"{loc.url} top_k={k}"
        extra = {"model": model, "table_version": committed.version} if k is None else {}
        if k is None:
            extra |= {"parquet_mib": round(sum(committed.snapshot.files.values()) / 2**20, 3)}
            extra |= {"query_seconds": round(encoded_s, 3), "dtype": fingerprint.dtype, "top_k": fingerprint.top_k}
        out.append(Evaluated(name, metrics, per_query, len(ids), rankings[k].nonzeros, extra))
    return out


def _grouped(
    loc: OutputLocation, committed: Any, settings: EvalSettings, *, main: bool, say: Callable[[str], None]
) -> bool:
    """Whether the output's rows are pooled per document: with --group-by-parent, an output of
    windows is; one of documents is as it is (a --compare output), or refused (the main one)."""
    windows = "parent_id" in committed.snapshot.schema.names
    if settings.group_by_parent and not windows and main:
        raise SettingError(
            f"evaluate --group-by-parent: {loc.url} holds one row per document (no parent_id column); it pools the "
            "windows of an output encoded with encoder.long_documents: split"
        )
    if windows and not settings.group_by_parent:
        say(f"  note: {loc.url} holds windows (<id>#<k>): judged as passages; --group-by-parent judges documents")
    return settings.group_by_parent and windows


def _encoded_queries(settings: EvalSettings, topics: Topics, fingerprint: Any) -> tuple[str, pa.StructArray, float]:
    """The query model's name, the judged queries encoded, and the seconds that took."""
    from pipeline.encode.encoder import SpladeEncoder

    model = settings.model or fingerprint.model
    revision = None if settings.model else fingerprint.revision
    encoder = SpladeEncoder(
        model, revision=revision, max_length=fingerprint.max_length, query_model=settings.query_model
    )
    if encoder.vocab_size != fingerprint.vocab_size:
        raise SettingError(
            f"evaluate: {model!r} has {encoder.vocab_size} vocabulary terms, the output's vectors "
            f"{fingerprint.vocab_size}; give the model the output was encoded with (--model)"
        )
    started = time.monotonic()
    queries = encoder.encode_queries(list(topics.queries.values()))
    return model, queries, time.monotonic() - started


def _evaluate_store(
    loc: OutputLocation,
    sink: SinkConfig,
    settings: EvalSettings,
    topics: Topics,
    table_options: dict[str, str] | None,
    say: Callable[[str], None],
) -> Evaluated:
    """The metrics of the store's own search (top ``depth`` per query) for the judged queries."""
    from pipeline.job.load import committed_output, store_record
    from pipeline.search import ranked
    from pipeline.sinks import open_sink, store_limits

    committed, fingerprint = committed_output(loc, table_options or {})
    model, queries, encoded_s = _encoded_queries(settings, topics, fingerprint)
    group = _grouped(loc, committed, settings, main=True, say=say)
    record = store_record(loc, sink) or {}
    if record.get("table_version") != committed.version or record.get("pending") is not None:
        raise SettingError(
            f"evaluate --through-store: {sink.type} was not loaded from table version {committed.version} of "
            f"{loc.url} (its record: {record.get('table_version', 'never loaded')}"
            f"{', a load unfinished' if record.get('pending') is not None else ''}); load it first: "
            f"splade-pipeline upsert --from {loc.url} --config <this config>"
        )
    store = open_sink(sink, fingerprint.vocab_size)
    cap = store_limits(sink).max_search_k
    started = time.monotonic()
    try:
        hits = [ranked(store, i, v, settings.depth, group_by_parent=group, cap=cap) for i, v in sparse_rows(queries)]
        held = store.count()
    finally:
        store.close()
    searched_s = time.monotonic() - started
    say(f"  {sink.type}: {len(hits)} searches in {searched_s:.1f} s; it holds {held} vectors")
    ids: list[str] = []
    where: dict[str, int] = {}
    ranking = Ranking.empty(len(hits), settings.depth)
    for row, found in enumerate(hits):
        for col, (doc, score) in enumerate(found[: settings.depth]):
            if doc not in where:
                where[doc] = len(ids)
                ids.append(doc)
            ranking.positions[row, col], ranking.scores[row, col] = where[doc], score
    metrics, per_query = measure(topics, ids, ranking)
    extra = {"model": model, "table_version": committed.version, "store_vectors": held}
    extra |= {"query_seconds": round(encoded_s, 3), "search_seconds": round(searched_s, 3)}
    return Evaluated(f"store {sink.type} (of {loc.url})", metrics, per_query, held, None, extra)


def _differences(a: Evaluated, b: Evaluated) -> dict[str, Any]:
    """Per metric: how many queries got better, worse or stayed, and the largest moves (b - a)."""
    out: dict[str, Any] = {}
    for metric in METRICS:
        delta = {q: b.per_query[q][metric] - a.per_query[q][metric] for q in a.per_query}
        moved = sorted(((d, q) for q, d in delta.items() if abs(d) > 1e-12), reverse=True)
        out[metric] = {
            "better": sum(1 for d, _ in moved if d > 0),
            "worse": sum(1 for d, _ in moved if d < 0),
            "same": len(delta) - len(moved),
            "largest_gains": [{"query": q, "delta": round(d, 4)} for d, q in moved[:5] if d > 0],
            "largest_losses": [{"query": q, "delta": round(d, 4)} for d, q in moved[::-1][:5] if d < 0],
        }
    return out


def plot_sweep(full: Evaluated, pruned: Sequence[Evaluated], top_ks: Sequence[int], path: Path) -> Path:
    """The sweep as a PNG: each metric against the index size (non-zeros per document), one point
    per ``top_k`` and one for the vectors unpruned."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = [*zip(top_ks, pruned, strict=True), ("all", full)]
    figure, axes = plt.subplots(1, len(METRICS), figsize=(4.2 * len(METRICS), 3.6), constrained_layout=True)
    for axis, metric in zip(axes, METRICS, strict=True):
        xs = [e.nonzeros / max(1, e.documents) for _, e in points]
        ys = [e.metrics[metric] for _, e in points]
        axis.plot(xs, ys, marker="o")
        for (label, _), x, y in zip(points, xs, ys, strict=True):
            axis.annotate(
                f"top_k={label}" if label != "all" else "unpruned",
                (x, y),
                fontsize=8,
                textcoords="offset points",
                xytext=(4, -10) if label != "all" else (-44, 6),
            )
        axis.set_title(metric)
        axis.set_xlabel("non-zeros per document")
        axis.grid(alpha=0.3)
    axes[0].set_ylabel("score")
    figure.suptitle(f"Pruning sweep: {full.name} ({full.documents} documents)", fontsize=10)
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path


def _known(value: Any) -> str:
    return "n/a" if value is None else f"{value}"


def render(report: dict[str, Any]) -> str:
    """The report as a table a person reads at a glance."""
    rows = list(report["outputs"]) + list(report.get("prune_sweep", []))
    head = ["", *METRICS, "nnz/doc", "index MiB"]
    table = [head] + [
        [r["name"], *(f"{r[m]:.4f}" for m in METRICS), _known(r["nonzeros_per_doc"]), _known(r["index_mib"])]
        for r in rows
    ]
    widths = [max(len(str(row[i])) for row in table) for i in range(len(head))]
    how = report.get("ranking", "exact dot product")
    lines = [f"evaluation over {report['queries']} queries ({how}, depth {report['depth']}):"]
    lines += [
        "  " + "  ".join(str(c).ljust(w) if i == 0 else str(c).rjust(w) for i, (c, w) in enumerate(zip(row, widths)))
        for row in table
    ]
    for metric, diff in report.get("per_query_differences", {}).items():
        lines.append(
            f"  {metric}, second vs first: {diff['better']} queries better, {diff['worse']} worse, {diff['same']} same"
        )
    if "plot" in report:
        lines.append(f"  plot: {report['plot']}")
    return "\n".join(lines)
