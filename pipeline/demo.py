"""The built-in default run: the shipped sample corpus through the bundled SPLADE-tiny, offline."""

from __future__ import annotations

import json
import time
from importlib.resources import files
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.encoder import SpladeEncoder

SAMPLE_CORPUS = files("pipeline") / "data" / "sample_corpus.jsonl"


def load_sample_corpus() -> list[dict[str, str]]:
    """The shipped sample: ``{"id", "title", "text"}`` rows (short encyclopedic passages)."""
    return [json.loads(line) for line in SAMPLE_CORPUS.read_text(encoding="utf-8").splitlines() if line.strip()]


def run_demo(output: Path, model: str, show: int = 3) -> dict[str, float]:
    """Encode the sample corpus, write ``output/sample.parquet`` and print a few top terms."""
    rows = load_sample_corpus()
    encoder = SpladeEncoder(model)
    texts = [f"{r['title']} {r['text']}" for r in rows]
    start = time.perf_counter()
    batch = encoder.encode_batch(texts)
    seconds = time.perf_counter() - start
    output.mkdir(parents=True, exist_ok=True)
    table = pa.table(
        {
            "id": [r["id"] for r in rows],
            "sparse": batch.sparse,
            "num_tokens": pa.array(batch.num_tokens, pa.int32()),
            "truncated": pa.array(batch.truncated),
        }
    )
    pq.write_table(table, output / "sample.parquet")
    for row, terms in zip(rows[:show], encoder.decode(batch.sparse[:show], top=8)):
        print(f"{row['id']}  {row['title']!r}: " + ", ".join(f"{t} {w:.2f}" for t, w in terms.items()))
    nnz = np.diff(batch.sparse.field("indices").offsets.to_numpy())
    summary = {
        "documents": len(rows),
        "tokens": int(batch.num_tokens.sum()),
        "truncated": int(batch.truncated.sum()),
        "nonzeros_mean": float(nnz.mean()),
        "seconds": round(seconds, 3),
        "docs_per_s": round(len(rows) / seconds, 1),
    }
    print(f"wrote {output / 'sample.parquet'}  " + "  ".join(f"{k}={v}" for k, v in summary.items()))
    return summary
