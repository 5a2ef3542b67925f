"""The checks every store must pass: search equals brute force, re-runs are idempotent, deletes delete."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np
import psycopg
import pytest

from pipeline.config import JobConfig, SinkConfig, load_config
from pipeline.demo import load_sample_corpus
from pipeline.job.encode import run_job
from pipeline.job.load import upsert_output
from pipeline.search import search
from pipeline.sinks import SinkError, open_sink

from .jobs import corpus_rows, read_delta
from .reference import densify

VOCAB = 30522
QUERIES = [r["title"].lower() for r in load_sample_corpus()[:14]] + [
    "moon gravity and water",
    "how bees make honey",
    "electric battery cars",
    "ancient rome emperors",
    "coffee beans pressure",
    "plants sunlight oxygen",
]


def run_into_store(
    root: Path, model: Path, sink: dict[str, Any], rows: int = 120, **extra: Any
) -> tuple[JobConfig, dict]:
    src = root / "corpus.jsonl"
    src.write_text("\n".join(json.dumps(r) for r in corpus_rows(rows)))
    overrides = {
        "input.paths": [str(src)],
        "input.title_column": "title",
        "output.path": str(root / "out"),
        "encoder.model": str(model),
        **{f"sink.{k}": v for k, v in sink.items()},
        **extra,
    }
    config = load_config(None, overrides)
    return config, run_job(config)


def brute_force(config: JobConfig, k: int = 10) -> list[list[tuple[str, float]]]:
    from pipeline.encode.encoder import SpladeEncoder

    table = read_delta(config.output.path, columns=["id", "sparse"])
    docs = densify(table["sparse"].combine_chunks(), VOCAB)
    queries = densify(SpladeEncoder(config.encoder.model, device="cpu").encode(QUERIES), VOCAB)
    ids = table["id"].to_pylist()
    out = []
    for scores in queries @ docs.T:
        best = np.argsort(-scores, kind="stable")[:k]
        out.append([(ids[i], float(scores[i])) for i in best if scores[i] > 0])
    return out


def assert_search_matches_brute_force(config: JobConfig) -> None:
    got, want = search(config, QUERIES, 10), brute_force(config)
    assert len(got) == len(QUERIES) == 20
    for g, w in zip(got, want):
        assert [i for i, _ in g] == [i for i, _ in w]
        np.testing.assert_allclose([s for _, s in g], [s for _, s in w], rtol=0, atol=1e-4)


def assert_ensure_refused(sink: SinkConfig, match: str, *, count_after: bool = True) -> int | None:
    """``ensure()`` must refuse with ``match``; returns what the store holds afterwards (to show it untouched)."""
    store = open_sink(sink, VOCAB)
    try:
        with pytest.raises(SinkError, match=match):
            store.ensure()
        return store.count() if count_after else None
    finally:
        store.close()


def assert_idempotent_and_delete(config: JobConfig, total: int) -> str:
    """Upsert the same output again (count unchanged), delete the best hit (gone); return its id."""
    result = upsert_output(config)
    assert result["upserted"] == total and result["store_count"] == total
    first_hit = search(config, QUERIES[:1], 10)[0][0][0]
    store = open_sink(config.sink, VOCAB)
    try:
        store.delete([first_hit])
        assert store.count() == total - 1
    finally:
        store.close()
    assert first_hit not in [i for i, _ in search(config, QUERIES[:1], 10)[0]]
    return first_hit


# Ids a store must take as data, never as syntax: quotes, backslashes, brackets, an expression
# that would match every other row if pasted into a filter, unicode, and a Pinecone-style hashed
# id ("sha256-" + the hash another id maps to).
HOSTILE_IDS = [
    "plain",
    "it's",
    'say "hi"',
    "back\\slash",
    "x'] or id not in ['",
    'x"] or id not in ["',
    "[brackets]",
    "naïve café 東京 🚀",
    "line\nbreak",
    "x" * 600,
    "sha256-" + hashlib.sha256(("x" * 600).encode()).hexdigest(),
]


def assert_hostile_ids_round_trip(sink: SinkConfig) -> None:
    """Upsert vectors under ``HOSTILE_IDS``, search them back by exact id, delete the injection-shaped
    ones: exactly those go, every other id stays and is found."""
    store = open_sink(sink, VOCAB)
    try:
        store.ensure()
        # One shared term (7) so a query on it finds every vector; a distinct term per id to tell them apart.
        indices = [np.array([7, 100 + i], np.int32) for i in range(len(HOSTILE_IDS))]
        values = [np.array([1.0, 0.5 + i / 100], np.float32) for i in range(len(HOSTILE_IDS))]
        store.upsert(HOSTILE_IDS, indices, values)
        store.finish()
        assert store.count() == len(HOSTILE_IDS)  # no two ids collapsed onto one point
        hits = store.search(np.array([7], np.int32), np.array([1.0], np.float32), 50)
        assert sorted(i for i, _ in hits) == sorted(HOSTILE_IDS)
        for i, doc_id in enumerate(HOSTILE_IDS):
            found = store.search(np.array([100 + i], np.int32), np.array([1.0], np.float32), 5)
            assert [h for h, _ in found] == [doc_id]
        # the listing and fetch that verify/repair read: every id exactly as it was given, its own vector
        listed = [i for page in store.ids() for i in page]
        assert sorted(listed) == sorted(HOSTILE_IDS)
        fetched = store.fetch([*HOSTILE_IDS, "not-there"])
        assert sorted(fetched) == sorted(HOSTILE_IDS)
        for i, doc_id in enumerate(HOSTILE_IDS):
            got_indices, got_values = fetched[doc_id]
            assert got_indices.tolist() == [7, 100 + i]
            np.testing.assert_allclose(got_values, values[i], rtol=1e-6)
        doomed = ["x'] or id not in ['", 'x"] or id not in ["', "it's", "x" * 600]
        store.delete(doomed)
        store.finish()
        assert store.count() == len(HOSTILE_IDS) - len(doomed)
        assert sorted(i for page in store.ids() for i in page) == sorted(set(HOSTILE_IDS) - set(doomed))
        left = store.search(np.array([7], np.int32), np.array([1.0], np.float32), 50)
        assert sorted(i for i, _ in left) == sorted(set(HOSTILE_IDS) - set(doomed))
    finally:
        store.close()


def assert_search_in_a_fresh_process(config: JobConfig, tmp_path: Path, fresh: dict[str, Any]) -> None:
    """As a user would: ``splade-pipeline upsert --from`` the output into a new collection (``fresh``
    sink settings) in one process, then ``splade-pipeline search`` in another (the store opened
    cold): the hits are brute force's over the output."""
    import subprocess
    import sys

    import yaml

    config = config.model_copy(update={"sink": config.sink.model_copy(update=fresh)})
    config_file = tmp_path / "job.yaml"
    config_file.write_text(yaml.safe_dump(config.model_dump(mode="json")))
    queries = QUERIES[:3]
    commands = [
        ["upsert", "--from", config.output.path, "--config", str(config_file)],
        ["search", "--config", str(config_file), "--k", "5", *queries],
    ]
    for command in commands:
        proc = subprocess.run(
            [sys.executable, "-m", "pipeline.cli", *command], capture_output=True, text=True, timeout=240
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
    for query, want in zip(queries, brute_force(config, 5)):
        block = proc.stdout.split(f"{query!r}:\n", 1)[1].split("\n'", 1)[0]
        got = [line.split()[1] for line in block.strip().splitlines()]
        assert got == [i for i, _ in want], (query, proc.stdout)


def store_vectors(postgres: Any, table: str) -> dict[str, np.ndarray]:
    """The vectors a pgvector table holds, by id, dense."""
    with psycopg.connect(postgres.dsn) as conn:
        rows = conn.execute(f"SELECT id, embedding::text FROM {table}").fetchall()
    out = {}
    for doc_id, text in rows:
        terms, dim = text.rsplit("/", 1)
        dense = np.zeros(int(dim), np.float32)
        for term in filter(None, terms.strip("{}").split(",")):
            index, value = term.split(":")
            dense[int(index) - 1] = float(value)
        out[doc_id] = dense
    return out
