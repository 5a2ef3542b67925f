"""Retrieval evaluation: the shipped BEIR-format set over outputs the job wrote, every metric
checked against a brute-force computation here (dense scores, a hand-written MRR, nDCG, recall),
compare and prune sweep included; bad topics named by file and line."""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from support.jobs import ROOT, cli, read_delta
from support.reference import VOCAB, densify, pruned, reference_splade

import pipeline.evaluate as evaluation
from pipeline.errors import SettingError
from pipeline.evaluate import METRICS, EvalSettings, evaluate, load_topics, retrieve
from pipeline.output.location import OutputLocation

BEIR = ROOT / "pipeline" / "data" / "beir-sample"


def _encode(out: Path, model: Path, *flags: str) -> Path:
    proc = cli(
        *("encode", "--input", str(BEIR / "corpus.jsonl"), "--output", str(out), "--id-column", "_id"),
        *("--title-column", "title", "--model", str(model), *flags),
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


@pytest.fixture(scope="module")
def outputs(ray_cluster: str, splade_tiny: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The shipped set's corpus encoded by the job in fp32 and in bf16."""
    root = tmp_path_factory.mktemp("evaluate")
    return {
        "fp32": _encode(root / "fp32", splade_tiny),
        "bf16": _encode(root / "bf16", splade_tiny, "--dtype", "bfloat16"),
        # windows of 16 tokens: every passage is cut into 2 or more
        "split": _encode(root / "split", splade_tiny, "--max-length", "16", "--long-documents", "split"),
    }


def brute_force(output: Path, splade_tiny: Path, top_k: int | None = None) -> dict[str, float]:
    """MRR@10, nDCG@10 (trec_eval: linear gains, log2 discount) and Recall@100 from dense scores (an
    output of windows: a document scores its best window)."""
    topics = load_topics(str(BEIR))
    table = read_delta(str(output))
    docs = pruned(densify(table["sparse"].combine_chunks(), VOCAB), top_k)
    queries = reference_splade(str(splade_tiny), list(topics.queries.values()))
    scores = queries.astype(np.float64) @ docs.astype(np.float64).T
    ids = table["id"].to_pylist()
    if "parent_id" in table.column_names:
        parents = table["parent_id"].to_pylist()
        ids = sorted(set(parents))
        scores = np.stack([scores[:, [p == d for p in parents]].max(axis=1) for d in ids], axis=1)
    totals = {"MRR@10": 0.0, "nDCG@10": 0.0, "Recall@100": 0.0}
    for row, qid in enumerate(topics.queries):
        grades = topics.qrels[qid]
        hits = sorted((s, d) for s, d in zip(scores[row], ids) if s > 0)[::-1]  # ties: docno descending
        ranked = [d for _, d in hits]
        first = next((r for r, d in enumerate(ranked[:10], 1) if grades.get(d, 0) > 0), None)
        totals["MRR@10"] += 1 / first if first else 0.0
        dcg = sum(grades.get(d, 0) / math.log2(r + 1) for r, d in enumerate(ranked[:10], 1))
        ideal = sum(g / math.log2(r + 1) for r, g in enumerate(sorted(grades.values(), reverse=True)[:10], 1))
        totals["nDCG@10"] += dcg / ideal
        relevant = {d for d, g in grades.items() if g > 0}
        totals["Recall@100"] += len(relevant & set(ranked[:100])) / len(relevant)
    return {m: v / len(topics.queries) for m, v in totals.items()}


def test_the_shipped_set_loads_as_beir(tmp_path: Path) -> None:
    topics = load_topics(str(BEIR))
    assert len(topics.queries) == 32 and topics.without_relevant == 1  # q33 judges no passage relevant
    assert topics.qrels["q22"] == {"doc-021": 2, "doc-028": 2, "doc-016": 1}
    corpus = [json.loads(line) for line in (BEIR / "corpus.jsonl").read_text().splitlines()]
    sample = [json.loads(line) for line in (ROOT / "pipeline/data/sample_corpus.jsonl").read_text().splitlines()]
    assert [(c["_id"], c["text"]) for c in corpus] == [(s["id"], s["text"]) for s in sample]
    # TREC qrels and TSV queries are read too
    (tmp_path / "q.tsv").write_text("1\tocean tides\n2\tcoffee\n")
    (tmp_path / "qrels.txt").write_text("1 0 doc-000 1\n2 0 doc-005 2\n2 0 doc-025 0\n")
    other = load_topics(str(tmp_path / "q.tsv"), str(tmp_path / "qrels.txt"))
    assert other.queries == {"1": "ocean tides", "2": "coffee"} and other.qrels["2"] == {"doc-005": 2, "doc-025": 0}


@pytest.mark.parametrize(
    ("queries", "qrels", "named"),
    [
        ('{"_id": "a", "text": "x"}\n{"_id": "b"}\n', "a\td\t1\n", r"queries.jsonl line 2: expected"),
        ('{"_id": "a", "text": "x"}\nnot json\n', "a\td\t1\n", r"queries.jsonl line 2: not JSON"),
        (
            '{"_id": "a", "text": "x"}\n',
            "query-id\tcorpus-id\tscore\na\td\thigh\n",
            r"test.tsv line 2: the grade 'high'",
        ),
        ('{"_id": "a", "text": "x"}\n', "a\td\n", r"test.tsv line 1: expected 'query-id corpus-id score'"),
        ('{"_id": "a", "text": "x"}\n', "a\td\t1\nz\td\t1\n", r"judges queries that .*queries.jsonl lacks: \['z'\]"),
        ('{"_id": "a", "text": "x"}\n', "a\td\t0\n", r"no relevant judgment"),
    ],
)
def test_bad_topics_are_named_by_file_and_line(tmp_path: Path, queries: str, qrels: str, named: str) -> None:
    (tmp_path / "qrels").mkdir()
    (tmp_path / "queries.jsonl").write_text(queries)
    (tmp_path / "qrels" / "test.tsv").write_text(qrels)
    with pytest.raises(SettingError, match=named):
        load_topics(str(tmp_path))
    (tmp_path / "good.jsonl").write_text('{"_id": "a", "text": "x"}\n')
    with pytest.raises(SettingError, match="nope.tsv: no such file"):
        load_topics(str(tmp_path / "good.jsonl"), str(tmp_path / "nope.tsv"))


def test_metrics_equal_a_brute_force_computation(outputs: dict[str, Path], splade_tiny: Path, tmp_path: Path) -> None:
    settings = EvalSettings(queries=str(BEIR), compare=str(outputs["bf16"]), prune_sweep=(8, 24), out=str(tmp_path))
    report = evaluate(OutputLocation(str(outputs["fp32"])), settings, say=lambda line: None)
    fp32, bf16 = report["outputs"]
    want = brute_force(outputs["fp32"], splade_tiny)
    assert all(abs(fp32[m] - want[m]) <= 1e-4 for m in want), (fp32, want)
    assert 0.3 < fp32["nDCG@10"] < 1.0  # a real ranking: neither trivial nor broken
    assert fp32["documents"] == 32 and fp32["dtype"] == "float32" and bf16["dtype"] == "bfloat16"
    assert fp32["nonzeros"] == sum(len(r["indices"]) for r in read_delta(str(outputs["fp32"]))["sparse"].to_pylist())
    # the sweep: the same vectors with top_k applied, metrics and sizes per k
    for row, k in zip(report["prune_sweep"], (8, 24), strict=True):
        want_k = brute_force(outputs["fp32"], splade_tiny, top_k=k)
        assert row["top_k"] == k and all(abs(row[m] - want_k[m]) <= 1e-4 for m in want_k), (row, want_k)
        assert row["nonzeros_per_doc"] <= k and row["nonzeros"] < fp32["nonzeros"]
    # compare: the second output's metrics are its own, and per-query differences add up
    want_bf16 = brute_force(outputs["bf16"], splade_tiny)
    assert all(abs(bf16[m] - want_bf16[m]) <= 1e-4 for m in want_bf16), (bf16, want_bf16)
    assert all(d["better"] + d["worse"] + d["same"] == 32 for d in report["per_query_differences"].values())
    written = json.loads((tmp_path / "EVALUATION.json").read_text())
    assert written["outputs"][0]["nDCG@10"] == fp32["nDCG@10"]
    import matplotlib.image

    picture = matplotlib.image.imread(tmp_path / "prune_sweep.png")
    assert picture.shape[0] > 300 and picture.shape[1] > 1000  # three panels, readable


def test_retrieval_in_small_steps_keeps_the_best_per_query(
    outputs: dict[str, Path], splade_tiny: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from pipeline import SpladeEncoder
    from pipeline.job.load import committed_output

    loc = OutputLocation(str(outputs["fp32"]))
    committed, _ = committed_output(loc, {})
    queries = SpladeEncoder(str(splade_tiny)).encode_queries(list(load_topics(str(BEIR)).queries.values()))
    monkeypatch.setattr(evaluation, "SCORES_PER_STEP", 1)  # 16 documents a step: two steps
    ids, rankings = retrieve(loc, sorted(committed.snapshot.files), queries, VOCAB, [None, 4], depth=5)
    table = read_delta(str(outputs["fp32"]))
    dense = {d: v for d, v in zip(table["id"].to_pylist(), densify(table["sparse"].combine_chunks(), VOCAB))}
    q = densify(queries, VOCAB).astype(np.float64)
    for k, ranking in rankings.items():
        docs = pruned(np.stack([dense[d] for d in ids]), k).astype(np.float64)
        scores = q @ docs.T
        for row in range(len(q)):
            got = {ids[p]: s for p, s in zip(ranking.positions[row], ranking.scores[row]) if p >= 0}
            best = np.sort(scores[row][scores[row] > 0])[::-1][:5]
            np.testing.assert_allclose(sorted(got.values(), reverse=True), best, rtol=1e-9)
            assert all(abs(scores[row][ids.index(d)] - s) <= 1e-9 for d, s in got.items())


def test_the_command_line_prints_the_table(outputs: dict[str, Path], tmp_path: Path) -> None:
    proc = cli(
        *("evaluate", "--from", str(outputs["fp32"]), "--queries", str(BEIR)),
        *("--prune-sweep", "16", "--out", str(tmp_path / "eval")),
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "MRR@10" in proc.stdout and "top_k=16" in proc.stdout and (tmp_path / "eval" / "prune_sweep.png").exists()
    bad = cli("evaluate", "--from", str(tmp_path), "--queries", str(BEIR))
    assert bad.returncode == 2 and "no Delta table here" in bad.stderr and "Traceback" not in bad.stderr


@pytest.mark.parametrize("step", [None, 1])
def test_windows_pooled_per_document_equal_a_brute_force_computation(
    outputs: dict[str, Path], splade_tiny: Path, monkeypatch: pytest.MonkeyPatch, step: int | None
) -> None:
    table = read_delta(str(outputs["split"]))
    assert table.num_rows >= 2 * 32 and len(set(table["parent_id"].to_pylist())) == 32
    if step:  # 16 windows a step: documents straddle the steps
        monkeypatch.setattr(evaluation, "SCORES_PER_STEP", step)
    settings = EvalSettings(queries=str(BEIR), group_by_parent=True)
    got = evaluate(OutputLocation(str(outputs["split"])), settings, say=lambda line: None)["outputs"][0]
    want = brute_force(outputs["split"], splade_tiny)
    assert all(abs(got[m] - want[m]) <= 1e-4 for m in want), (got, want)
    assert got["documents"] == 32 and got["nonzeros"] == sum(len(r["indices"]) for r in table["sparse"].to_pylist())
    with pytest.raises(SettingError, match="holds one row per document"):
        evaluate(OutputLocation(str(outputs["fp32"])), settings, say=lambda line: None)
    # passages pooled per document against whole documents: the compared output is taken as it is
    both = replace(settings, compare=str(outputs["fp32"]))
    compared = evaluate(OutputLocation(str(outputs["split"])), both, say=lambda line: None)["outputs"][1]
    want_whole = brute_force(outputs["fp32"], splade_tiny)
    assert compared["documents"] == 32 and all(abs(compared[m] - want_whole[m]) <= 1e-4 for m in want_whole)
    lines: list[str] = []
    evaluate(OutputLocation(str(outputs["split"])), EvalSettings(queries=str(BEIR)), say=lines.append)
    assert any("--group-by-parent judges documents" in line for line in lines)


def test_the_store_ranks_as_the_exact_evaluation_does(outputs: dict[str, Path], postgres: Any) -> None:
    from pipeline.config import load_config
    from pipeline.job.load import upsert_output

    for name, group in (("fp32", False), ("split", True)):
        sink = {"sink.type": "pgvector", "sink.dsn": postgres.dsn, "sink.collection": f"eval_{name}"}
        config = load_config(None, {"output.path": str(outputs[name]), **sink})
        upsert_output(config)
        settings = EvalSettings(queries=str(BEIR), group_by_parent=group)
        exact = evaluate(OutputLocation(str(outputs[name])), settings, say=lambda line: None)["outputs"][0]
        through = replace(settings, through_store=True)
        report = evaluate(OutputLocation(str(outputs[name])), through, say=lambda line: None, sink=config.sink)
        store = report["outputs"][0]
        assert all(abs(store[m] - exact[m]) <= 1e-4 for m in METRICS), (name, store, exact)
        assert store["store_vectors"] == read_delta(str(outputs[name])).num_rows and store["index_mib"] is None
        assert "the store's search (pgvector)" in evaluation.render(report)
    through = EvalSettings(queries=str(BEIR), through_store=True)
    unloaded = load_config(None, {"sink.type": "pgvector", "sink.dsn": postgres.dsn, "sink.collection": "never"})
    with pytest.raises(SettingError, match="was not loaded from table version 0 .*never loaded"):
        evaluate(OutputLocation(str(outputs["fp32"])), through, say=lambda line: None, sink=unloaded.sink)
    with pytest.raises(SettingError, match="no vector store configured"):
        evaluate(OutputLocation(str(outputs["fp32"])), through, say=lambda line: None)
    with pytest.raises(SettingError, match="a store's search cannot"):
        EvalSettings(queries=str(BEIR), through_store=True, prune_sweep=(8,))
