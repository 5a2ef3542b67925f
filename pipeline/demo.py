"""The built-in default run: the shipped sample corpus through the Ray job with the bundled SPLADE-tiny."""

from __future__ import annotations

import json
from typing import Any

import pyarrow as pa

from pipeline.config import SAMPLE_CORPUS_PATH, load_config


def load_sample_corpus() -> list[dict[str, str]]:
    """The shipped sample: ``{"id", "title", "text"}`` rows (short encyclopedic passages)."""
    with open(SAMPLE_CORPUS_PATH, encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


def run_demo(output: str, show: int = 3) -> dict[str, Any]:
    """Run the encoding job on the sample corpus into ``output`` and print a few documents' top terms."""
    from transformers import AutoTokenizer

    from pipeline.encode.encoder import decode
    from pipeline.encode.fingerprint import model_folder
    from pipeline.job.encode import run_job
    from pipeline.output.location import OutputLocation
    from pipeline.output.table import DeltaOutput

    config = load_config(None, {"input.title_column": "title", "output.path": output, "output.overwrite": True})
    summary = run_job(config)
    loc = OutputLocation(output)
    files = sorted(DeltaOutput(loc).snapshot().files)  # the latest version's files, not every file in data/
    table = pa.concat_tables([loc.read_parquet(f, columns=["id", "sparse"]) for f in files])
    table = table.sort_by("id").slice(0, show)
    tokenizer = AutoTokenizer.from_pretrained(model_folder(config.encoder))
    for doc_id, terms in zip(table["id"].to_pylist(), decode(tokenizer, table["sparse"], top=8)):
        print(f"{doc_id}: " + ", ".join(f"{t} {w:.2f}" for t, w in terms.items()))
    return summary
