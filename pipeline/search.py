"""Querying the store the job loaded: encode the queries (:meth:`SpladeEncoder.encode_queries`), ask the store."""

from __future__ import annotations

from pipeline.config import JobConfig
from pipeline.encode.sparse import sparse_rows
from pipeline.sinks import open_sink


def search(config: JobConfig, queries: list[str], k: int) -> list[list[tuple[str, float]]]:
    """Top ``k`` ``(doc_id, score)`` per query, by the store's dot product (zero-score hits dropped)."""
    from pipeline.encode.encoder import SpladeEncoder

    encoder = SpladeEncoder.from_config(config.encoder)
    store = open_sink(config.sink, encoder.vocab_size)
    try:
        return [store.search(indices, values, k) for indices, values in sparse_rows(encoder.encode_queries(queries))]
    finally:
        store.close()
